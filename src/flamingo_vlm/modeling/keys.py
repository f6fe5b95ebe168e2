"""Parameter names as wrappers leave them in a saved state dict.

DDP saves ``module.<name>``, ``torch.compile`` ``_orig_mod.<name>`` (both, nested either way, when a
compiled model is wrapped or the other way round), and FSDP1 / activation checkpointing insert
``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` inside a name. A checkpoint trained any of
these ways loads as the plain model's: OpenFlamingo stripped only ``module.``, and a compiled model's
checkpoint read as one "trained on another language model".
"""

from __future__ import annotations

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrap_key(key: str) -> str:
    """``key`` without the wrappers' prefixes and inner segments."""
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key
