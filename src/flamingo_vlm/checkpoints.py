"""Loading OpenFlamingo checkpoints, validated.

OpenFlamingo files come as the released filtered dict, as ``{"model_state_dict": ...}`` from its
training script, with ``module.`` prefixes from DDP, or as a full ``state_dict()`` with alias keys.
Keys renamed by newer transformers are mapped. Every trainable parameter must be filled, or the
load fails naming what is missing; keys that match nothing are reported.

:func:`~flamingo_vlm.files.load_weights_file` is how every weights file of the package is read (here,
``from_pretrained``, training checkpoints, backbones): a missing, truncated or corrupt file raises an
error that names it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .files import WeightsFileError, load_weights_file  # noqa: F401  (re-exported)
from .modeling.keys import unwrap_key

logger = logging.getLogger(__name__)

# Renames between the transformers release OpenFlamingo was written for and transformers 5.
KEY_RENAMES: list[tuple[str, str]] = [
    (r"^lang_encoder\.embed_out\.", "lang_encoder.lm_head."),  # GPT-NeoX
]
# Buffers older transformers saved that current ones recompute.
OBSOLETE_KEYS = re.compile(
    r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attention\.masked_bias|\.attention\.bias|\.attn\.bias$)"
)
# In-memory aliases of OpenFlamingo's full state_dict (the same tensors under other names).
ALIAS_KEYS = re.compile(r"^lang_encoder\.(old_decoder_blocks|gated_cross_attn_layers)\.")


class CheckpointError(ValueError):
    pass


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing_trainable: list[str] = field(default_factory=list)
    missing_frozen: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing trainable {len(self.missing_trainable)}; "
            f"missing frozen {len(self.missing_frozen)} (kept from the backbones); unexpected {len(self.unexpected)}"
        )


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict from a file (.pt/.bin/.safetensors) or a mapping,
    unwrapping ``model_state_dict``/``state_dict`` and the wrappers' prefixes (DDP's ``module.``,
    ``torch.compile``'s ``_orig_mod.``: :func:`~flamingo_vlm.modeling.keys.unwrap_key`)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        sd = load_weights_file(path)
    else:
        sd = source
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        where = f"{source}" if isinstance(source, (str, Path)) else "the checkpoint"
        raise CheckpointError(f"{where} is not a state dict of tensors")
    return {unwrap_key(k): v for k, v in sd.items()}


def normalise_openflamingo_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if ALIAS_KEYS.search(key) or OBSOLETE_KEYS.search(key):
            continue
        for pattern, repl in KEY_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _tied_aliases(model) -> list[tuple[str, str]]:
    """(output key, input key) pairs of parameters that are one tensor under two names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [tuple(v) for v in names.values() if len(v) > 1]


def _untied_head_key(model) -> str | None:
    """The state-dict key of the LM's output head when it is a matrix of its own (not tied)."""
    lm = model.lang_encoder
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight is getattr(emb, "weight", None):
        return None
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def _state_key(param_name: str) -> str:
    # Trainable new-token rows are saved inside the full matrix of their module.
    return param_name[: -len("new_weight")] + "weight" if param_name.endswith(".new_weight") else param_name


_CROSS_ATTN_LAYER = re.compile(r"\.(\d+)\.gated_cross_attn_layer\.")


def _cross_attention_layers(keys) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := _CROSS_ATTN_LAYER.search(k))})


def _interval(layers: list[int]) -> int | None:
    """The ``cross_attn_every_n_layers`` that places cross-attention before ``layers`` (0-based:
    before layer ``i`` when ``(i + 1) % n == 0``), or None when none does."""
    n = layers[0] + 1
    return n if layers == list(range(n - 1, layers[-1] + 1, n)) else None


def cross_attention_interval(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The ``cross_attn_every_n_layers`` a state dict's cross-attention layers were built with (the
    released 3B: 1, 4B: 2, 9B: 4), or None when it holds none or they follow no interval."""
    layers = _cross_attention_layers(normalise_openflamingo_keys(sd))
    return _interval(layers) if layers else None


def _decoder_list(keys) -> str | None:
    """Where the cross-attention blocks of ``keys`` live: the decoder-layer list's key prefix
    (``lang_encoder.model.layers``), which tells the LM's family apart; None without any."""
    return next((k[: m.start()] for k in keys if (m := _CROSS_ATTN_LAYER.search(k))), None)


def _check_cross_attention_layout(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's cross-attention must sit before the model's decoder layers. A model built with
    a larger ``cross_attn_every_n_layers`` dropped the checkpoint's other layers with only an
    "unexpected keys" warning (and a smaller one named 20 missing parameters without saying why).
    A model built on an LM of another family (OPT for a LLaMA checkpoint) named every cross-attention
    parameter as missing, without saying that the LM was the wrong one."""
    their_list, our_list = _decoder_list(sd), _decoder_list(own)
    if their_list and our_list and their_list != our_list:
        raise CheckpointError(
            f"the checkpoint was trained on another language model: its cross-attention sits in {their_list}.*, "
            f"the model's in {our_list}.*; build the model with the LM (and tokenizer) the checkpoint was trained "
            "with (convert: --lm/--tokenizer, or --release for a released model)")
    theirs, ours = _cross_attention_layers(sd), _cross_attention_layers(own)
    if theirs and ours and theirs != ours:
        n_theirs, n_ours = _interval(theirs), _interval(ours)
        said = lambda n: f" (cross_attn_every_n_layers={n})" if n else ""  # noqa: E731
        raise CheckpointError(
            f"the checkpoint's cross-attention sits before decoder layers {theirs}{said(n_theirs)}, the model's "
            f"before {ours}{said(n_ours)}: build the model with the checkpoint's layout"
            + (f" (convert: --cross-attn-every-n-layers {n_theirs})" if n_theirs else "")
        )


def load_openflamingo_checkpoint(model, source, *, require_trainable: bool = True,
                                 name: str | Path | None = None) -> LoadReport:
    """Load an OpenFlamingo checkpoint (any of its shapes) into ``model``, validated. Errors
    (:class:`CheckpointError`) name the file: ``source`` when it is a path, else ``name`` (the file a
    dict was read from) when given."""
    name = name if name is not None else (source if isinstance(source, (str, Path)) else None)
    try:
        return _load_openflamingo_checkpoint(model, source, require_trainable=require_trainable)
    except CheckpointError as e:
        if name is None or str(e).startswith(f"{name}"):
            raise
        raise CheckpointError(f"{name}: {e}") from e


def _load_openflamingo_checkpoint(model, source, *, require_trainable: bool) -> LoadReport:
    from .modeling.quantize import quantization_of

    mode = quantization_of(model)
    if mode:  # its linear weights are integer buffers now: the checkpoint's fp32 weights match no parameter
        raise CheckpointError(
            f"this model is quantized to {mode}: load the checkpoint into the model built without quantize=, "
            f"then quantize it (flamingo_vlm.modeling.quantize.quantize_model(model, {mode!r})); a saved model "
            f"loads quantized with load_pretrained(dir, quantize={mode!r})")
    sd = normalise_openflamingo_keys(read_state_dict(source))
    if not any(k.startswith("perceiver.") or _CROSS_ATTN_LAYER.search(k) for k in sd):
        # (an LM's or an image encoder's weights file given in its place: "does not fill 114 of 114")
        shown = ", ".join(sorted(sd)[:3]) + (" ..." if len(sd) > 3 else "") if sd else "no tensors at all"
        raise CheckpointError(
            f"the checkpoint holds no Flamingo weights (no perceiver.* or *.gated_cross_attn_layer.* keys; it has "
            f"{shown}): pass OpenFlamingo's checkpoint.pt, or a model or training checkpoint of this package")
    own = model.state_dict()
    # Our own files (a training checkpoint's trainable.safetensors, save_pretrained's model.safetensors)
    # hold the trainable added-token rows as "<module>.new_weight", which state_dict() folds into the
    # full matrix and leaves out: accept them under that name (OpenFlamingo's files have the matrix).
    params = dict(model.named_parameters())
    for key in sd:
        if key.endswith(".new_weight") and key not in own and key in params:
            own[key] = params[key].detach()
    # Tied weights: fill every name of a shared tensor from whichever name the file has.
    for group in _tied_aliases(model):
        present = [n for n in group if n in sd]
        for n in group:
            if n not in sd and present and n in own:
                sd[n] = sd[present[0]]
    _check_cross_attention_layout(sd, own)
    report = LoadReport()
    mismatched = []
    for key, value in sd.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            report.loaded.append(key)
    if mismatched:
        raise CheckpointError(
            f"{len(mismatched)} tensor(s) of the checkpoint do not fit the model: " + "; ".join(sorted(mismatched)[:5])
            + (" ..." if len(mismatched) > 5 else "") + "; build the model with the LM, tokenizer (vocabulary) "
            "and vision encoder the checkpoint was trained with"
        )
    trainable = {_state_key(n) for n, p in model.named_parameters() if p.requires_grad}
    loaded = set(report.loaded) | {_state_key(k) for k in report.loaded}
    report.missing_trainable = sorted(k for k in trainable if k not in loaded)
    report.missing_frozen = sorted(k for k in own if k not in loaded and k not in trainable)
    if require_trainable and report.missing_trainable:
        raise CheckpointError(
            f"the checkpoint does not fill {len(report.missing_trainable)} of the model's "
            f"{len(trainable)} trainable parameters: " + ", ".join(report.missing_trainable[:10])
            + (f" ... ({len(report.missing_trainable) - 10} more)" if len(report.missing_trainable) > 10 else "")
            + "; pass the whole checkpoint (OpenFlamingo's checkpoint.pt, a training checkpoint's "
            "trainable.safetensors), not a part of it (a part on purpose: flamingo_vlm.checkpoints."
            "load_openflamingo_checkpoint(model, state_dict, require_trainable=False))"
        )
    if report.unexpected:
        logger.warning("checkpoint keys that match no parameter: %s", ", ".join(report.unexpected[:20]))
    head = _untied_head_key(model)
    if head is not None and head not in loaded:
        # OpenFlamingo's training script keeps frozen parameters only when their name holds "embed":
        # a separate output head (LLaMA's lm_head, GPT-NeoX's after transformers 5 renamed embed_out)
        # is not in its checkpoints, and its added rows were random in the original on every load.
        logger.warning(
            "the checkpoint has no %s: the output head keeps the backbone's rows for the added tokens "
            "(<|endofchunk|>, <image>, <PAD>), random where the vocabulary resize created them (as in "
            "OpenFlamingo); <|endofchunk|>'s logit, the default eos, is then arbitrary", head)
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False, _validated=True)
    return report
