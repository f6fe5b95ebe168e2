"""Parameter names as wrappers leave them in a saved state dict.

DDP saves ``module.<name>``, and ``torch.compile`` (of the model or of a submodule), FSDP1 and
activation checkpointing insert ``_orig_mod.``, ``_fsdp_wrapped_module.`` and
``_checkpoint_wrapped_module.`` (at the start or inside a name, nested either way). A checkpoint trained any of
these ways loads as the plain model's: OpenFlamingo stripped only ``module.``, and a compiled model's
checkpoint read as one "trained on another language model".
"""

from __future__ import annotations

WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})  # (never a real name)


def unwrap_key(key: str) -> str:
    """``key`` without the wrappers' parts: DDP's leading ``module`` (only leading: a submodule may be
    named "module"), and ``_orig_mod`` / ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``
    wherever they are."""
    parts = [p for p in key.split(".") if p not in WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)
