"""Writing a trained model in the ``from_pretrained`` format.

:func:`export_trained` is what a run does at its end (``<output_dir>/final``, rank 0; under FSDP the
full trainable weights are gathered first and the model is rebuilt from the config on rank 0);
:func:`export_checkpoint` turns a saved training checkpoint into a model directory
(``flamingo-vlm train --export-checkpoint``). LoRA adapters are merged into (a copy of) the LM,
which is then saved with the model. A failed write raises :class:`~.checkpoint.WriteError` saying why.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import checkpoint as ckpt
from .build import build_model, declare_demo_separator
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, barrier, unwrap
from .lora import apply_lora, has_lora, merge_lora

logger = logging.getLogger("flamingo_vlm.train")


def export_trained(cfg: TrainConfig, model, info: DistInfo, out: str | os.PathLike, *, tokenizer=None,
                   image_processor=None, rebuildable: bool = True, rebuild: bool = False) -> Path | None:
    """Save the (possibly DDP/FSDP-wrapped) trained ``model`` to ``out``; every rank calls it, rank 0
    writes and returns the path. ``rebuildable``: the model was built from ``cfg.model`` (FSDP needs
    that to rebuild it on one process); ``rebuild``: save its trained weights into a model rebuilt
    from ``cfg.model`` (its frozen weights are not the original ones, e.g. held in bf16)."""
    out = Path(out)
    try:
        return _export(cfg, model, info, out, tokenizer, image_processor, rebuildable, rebuild)
    except ckpt.WriteError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: RuntimeError "unexpected pos", ...
        if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("unexpected pos", "write")):
            raise
        raise ckpt.WriteError(ckpt.explain_write_error(e, out, "the exported model")) from e


def _export(cfg, model, info, out, tokenizer, image_processor, rebuildable, rebuild) -> Path | None:
    if cfg.distributed == "fsdp" or (rebuild and rebuildable):
        trainable = ckpt.gather_trainable(unwrap(model))  # collective
        path = None
        if info.is_main:
            if not rebuildable:
                logger.warning("export skipped: an FSDP run on a model passed in code cannot be rebuilt; "
                               "use the checkpoint's trainable.safetensors")
            else:
                path = export_weights(cfg, trainable, out)
        barrier(info)
        return path
    path = None
    if info.is_main:
        model = unwrap(model)
        lora = has_lora(model)
        if lora:
            model = copy.deepcopy(model)
            merge_lora(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            path = model.save_pretrained(out, tokenizer=tokenizer, image_processor=image_processor,
                                         include_backbones=True if lora else None)
    barrier(info)
    return path


def export_weights(cfg: TrainConfig, trainable: dict[str, torch.Tensor], out: str | os.PathLike) -> Path:
    """Rebuild the model of ``cfg`` on this process, load ``trainable`` (raw names, full tensors),
    merge LoRA and save in the ``from_pretrained`` format."""
    torch.manual_seed(cfg.seed)
    model, image_processor, tokenizer = build_model(cfg.model)
    declare_demo_separator(model, cfg)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        raise ConfigError(f"the trained weights do not match the model of the config: "
                          f"{sorted(set(params) ^ set(trainable))[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name].to(p.dtype))
    lora = has_lora(model)
    if lora:
        merge_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.save_pretrained(out, tokenizer=tokenizer, image_processor=image_processor,
                                     include_backbones=True if lora else None)


def export_checkpoint(config: TrainConfig, checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export a training checkpoint (``.../checkpoints/step_N``) to the ``from_pretrained`` format."""
    from ..checkpoints import load_weights_file

    path = ckpt.resolve_resume(config.output_dir, str(checkpoint), flag="--export-checkpoint")
    return export_weights(config, load_weights_file(path / ckpt.TRAINABLE), out)
