"""Building what a training run needs from its config: the model (``model:`` section) and the datasets.

:func:`build_model` makes ``(model, image_processor, tokenizer)`` from :class:`~.config.ModelConfig`
(a saved model, or new backbones joined by a fresh adapter); :func:`config_datasets` makes the
``data:`` mixture for one rank and :func:`aim_dataset` the aiming data of ``aim:``
(:mod:`.aiming`); :func:`set_gates` and :func:`set_gradient_checkpointing` are the model-side
switches of the config, and :func:`declare_demo_separator` records the data's few-shot format in the
model's config (``demo_separator``, what the server and ``generate --demo`` join demonstrations with).
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from ..modeling.lm_info import lm_context_limit
from . import checkpoint as ckpt
from .config import ConfigError, DataError, ModelConfig, TrainConfig  # noqa: F401 (DataError re-exported)
from .lean import make_lean
from .lora import apply_lora
from .optim import GATE_NAMES

logger = logging.getLogger("flamingo_vlm.train")


# -- model -----------------------------------------------------------------------------------------
# ModelConfig fields that must agree with a loaded model's FlamingoConfig (same names, same types)
_ARCH_FIELDS = ("cross_attn_every_n_layers", "decoder_layers_attr_name", "freeze_lm_embeddings",
                "perceiver", "cross_attention")


def build_model(cfg: ModelConfig):
    """``(model, image_processor, tokenizer)`` as the model section says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.from_pretrained:
            from ..pretrained import from_pretrained

            model, image_processor, tokenizer = from_pretrained(
                cfg.from_pretrained, cache_dir=cfg.cache_dir, local_files_only=cfg.local_files_only
            )
            saved = model.config
            for name in _ARCH_FIELDS:
                wanted = getattr(cfg, name)
                have = getattr(saved, name)
                if wanted is not None and wanted != have:
                    raise ConfigError(
                        f"model.{name}={wanted!r} does not match the model at {cfg.from_pretrained}, which was "
                        f"built with {name}={have!r}; remove model.{name} (it is read from the saved model)"
                    )
        else:
            from ..factory import create_model_and_transforms

            model, image_processor, tokenizer = create_model_and_transforms(
                cfg.vision, cfg.vision_pretrained, cfg.lm, cfg.tokenizer or cfg.lm,
                cross_attn_every_n_layers=cfg.cross_attn_every_n_layers or 1,
                use_local_files=cfg.local_files_only,
                decoder_layers_attr_name=cfg.decoder_layers_attr_name,
                freeze_lm_embeddings=bool(cfg.freeze_lm_embeddings),
                cache_dir=cfg.cache_dir,
                vision_tokens_ln_post=cfg.vision_tokens_ln_post,
                perceiver_kwargs=cfg.perceiver,
                cross_attn_kwargs=cfg.cross_attention,
            )
    if cfg.gate_init is not None:
        set_gates(model, cfg.gate_init)
    return model, image_processor, tokenizer


def set_gates(model, value: float) -> None:
    """Set every cross-attention tanh gate so that ``tanh(gate) == value`` (-1 < value < 1)."""
    if not -1.0 < value < 1.0:
        raise ConfigError(f"model.gate_init must be in (-1, 1) (it is tanh(gate)), got {value}")
    gates = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATE_NAMES]
    if not gates:
        raise ConfigError("model.gate_init: the model has no cross-attention gates")
    with torch.no_grad():
        for p in gates:
            p.fill_(math.atanh(value))


def set_gradient_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """``True``: ``model.set_gradient_checkpointing(True)`` (LM layers + cross-attention), with a
    fallback for transformers >= 5.2x, whose ``activation_checkpointing_enable`` takes
    ``activation_checkpointing_kwargs`` (Flamingo's method passes ``gradient_checkpointing_kwargs``
    and raises ``TypeError`` there). ``"lm"``: the LM's decoder layers only."""
    enabled = bool(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if mode != "lm":
            try:
                model.set_gradient_checkpointing(enabled)
                return
            except TypeError:
                pass
        lm = model.lang_encoder
        if getattr(lm, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if enabled and hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif enabled:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            elif hasattr(lm, "activation_checkpointing_disable"):
                lm.activation_checkpointing_disable()
            else:
                lm.gradient_checkpointing_disable()
        # Last: transformers sets `gradient_checkpointing` on every module that has the attribute,
        # our FlamingoLayers (which checkpoint the cross-attention) included.
        for layer in model.decoder_layers():
            layer.gradient_checkpointing = enabled and mode != "lm"


def declare_demo_separator(model, cfg: TrainConfig) -> None:
    """Set ``model.config.demo_separator`` to the ``chunk_separator`` the run's interleaved datasets
    give, the format the model learns (a model saved from the run declares it). Pair datasets have one
    chunk and no say, nor has a dataset that leaves it unset (it joins its chunks with the model's own);
    without one that sets it, the model keeps its own; when they disagree too (warned). A fine-tune of
    the built-in model on interleaved data without the setting changed its "\n" to "", silently."""
    separators = {d.chunk_separator for d in cfg.data if d.kind == "interleaved" and d.chunk_separator is not None}
    if len(separators) == 1:
        separator = separators.pop()
        if separator != model.config.demo_separator:
            logger.info("the model's demo_separator changes from %r to %r (the data's chunk_separator)",
                        model.config.demo_separator, separator)
        model.config = model.config.replace(demo_separator=separator)
    elif len(separators) > 1:
        logger.warning("the interleaved datasets join their chunks differently (chunk_separator %s); the model keeps "
                       "demo_separator=%r (edit config.json of the exported model to choose)",
                       " / ".join(sorted(map(repr, separators))), model.config.demo_separator)


def prepare_model(model: nn.Module, cfg: TrainConfig, device, loaded=None) -> list[str]:
    """Make ``model`` ready to train as ``cfg`` says, in place: LoRA adapters, the trained weights of
    a checkpoint being resumed (``loaded``), gradient checkpointing, the lean backward (:mod:`.lean`),
    precision, device, train mode with the frozen vision encoder in eval mode, the data's
    ``demo_separator`` (:func:`declare_demo_separator`). Returns the LoRA target layers."""
    declare_demo_separator(model, cfg)
    targets = apply_lora(model, cfg.lora) if cfg.lora.enabled else []
    if loaded is not None:
        ckpt.load_trainable(model, loaded.path, loaded.trainable)
    set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
    if cfg.lean_backward:
        make_lean(model, autocast=cfg.precision == "amp_bf16")
    if cfg.precision == "bf16":
        model.to(torch.bfloat16)  # floating tensors only: index buffers stay int64
    model.to(device)
    model.train()
    model.vision_encoder.eval()  # frozen feature extractor
    return targets


# -- data ------------------------------------------------------------------------------------------
def config_datasets(cfg: TrainConfig, model, tokenizer, image_processor, *, rank: int = 0,
                    world_size: int = 1) -> list:
    """The datasets of ``cfg.data`` for one rank (what the trainer builds when none are passed in;
    scripts that add a dataset of their own build these first and pass all of them)."""
    from ..data import DatasetSpec, build_datasets
    from ..processing import FlamingoProcessor

    limit, absolute = lm_context_limit(model.lang_encoder)
    specs = []
    for i, (d, weight) in enumerate(zip(cfg.data, cfg.loss_weights())):
        spec = DatasetSpec(
            kind=d.kind, urls=list(d.urls), batch_size=d.batch_size, loss_weight=weight,
            max_tokens=d.max_tokens, max_images=d.max_images, min_images=d.min_images,
            similarity_threshold=d.similarity_threshold, min_image_bytes=d.min_image_bytes,
            chunk_separator=d.chunk_separator if d.chunk_separator is not None else model.config.demo_separator,
            loss_after=tuple(d.loss_after), caption_prefix=d.caption_prefix,
        )
        if limit is not None and spec.resolved_max_tokens > limit:
            msg = (f"data[{i}] ({d.kind}) makes sequences of up to {spec.resolved_max_tokens} tokens but the LM "
                   f"takes at most {limit} positions; set data[{i}].max_tokens <= {limit}")
            if absolute:
                raise ConfigError(msg)
            if rank == 0:
                logger.warning(msg)
        specs.append(spec)
    processor = FlamingoProcessor(tokenizer, image_processor)
    try:
        return build_datasets(specs, processor, seed=cfg.seed, rank=rank, world_size=world_size,
                              eos_token_id=tokenizer.eos_token_id)
    except FileNotFoundError as e:
        idx = _which_dataset(cfg, str(e))
        raise DataError(f"no training data found{idx}: {e} (the config's data[].urls, or --data KIND=PATH)") from e


def run_datasets(cfg: TrainConfig, model, tokenizer, image_processor, info, datasets=None, names=None,
                 weights=None) -> tuple[list, list[str], list[float]]:
    """A run's datasets, their names and loss weights: ``datasets`` as given (benchmarks, tests) or
    ``cfg.data``'s for this rank, then the aiming data when ``cfg.aim`` is on (named ``aim``, answer
    loss weight 1)."""
    if datasets is None:
        if tokenizer is None or image_processor is None:
            raise ConfigError("building datasets from the config needs the model's tokenizer and image processor")
        datasets = config_datasets(cfg, model, tokenizer, image_processor, rank=info.rank, world_size=info.world_size)
        names, weights = cfg.dataset_names(), cfg.loss_weights()
    else:
        datasets = list(datasets)
        names = list(names or [f"data{i}" for i in range(len(datasets))])
        weights = list(weights or [float(getattr(getattr(d, "spec", None), "loss_weight", 1.0)) for d in datasets])
    if cfg.aim.enabled:
        if tokenizer is None or image_processor is None:
            raise ConfigError("aim: the aiming data needs the model's tokenizer and image processor")
        aim = aim_dataset(cfg, model, tokenizer, image_processor)
        datasets, names, weights = [*datasets, aim], [*names, "aim"], [*weights, 1.0]
    if not datasets:
        raise ConfigError("no training data: add at least one dataset under `data:` (or --data)")
    return datasets, names, weights


BATCH_KEYS = ("vision_x", "input_ids", "attention_mask", "labels")


def check_batch(batch: dict, name: str, vocab_size: int) -> dict:
    """``batch`` if it has every key of a training batch and token ids the model's vocabulary has."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise DataError(f"dataset {name} gave a batch without {missing}")
    ids = batch["input_ids"]
    if ids.dtype != torch.long:
        raise DataError(f"dataset {name}: input_ids must be int64, got {ids.dtype}")
    top = int(ids.max()) if ids.numel() else 0
    if top >= vocab_size:
        raise ConfigError(
            f"dataset {name} has token id {top} but the model's vocabulary has {vocab_size} "
            "rows: the data was tokenized with a different tokenizer than the model's"
        )
    return batch


def aim_dataset(cfg: TrainConfig, model, tokenizer, image_processor):
    """The aiming data of ``cfg.aim`` (:class:`~.aiming.AimDataset`), after checking that ``model``
    can be aimed: its perceiver passes the vision tokens through and they are a grid of feature
    tokens followed by one colour token per cell (the grid size is read from one blank image)."""
    from ..processing import FlamingoProcessor
    from .aiming import EPISODE_TYPES, QUESTION_TYPES, AimDataset

    if getattr(model.perceiver, "passthrough_norm", None) is None:
        raise ConfigError("aim: the model's perceiver does not pass its input cells through; grow it with "
                          "`flamingo-vlm grow-adapter SOURCE TARGET --media-passthrough` and train from TARGET")
    if getattr(model.vision_encoder, "color_encoding", None) not in ("tokens", "both"):
        raise ConfigError("aim needs a feature-grid vision encoder with colour tokens (color_encoding 'tokens' or "
                          "'both', e.g. the built-in efficientnet-lite0); this model's has none")
    size = int(getattr(image_processor, "image_size", 224))
    param = next(model.vision_encoder.parameters(), None)
    blank = torch.zeros(1, 3, size, size, device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None else None)
    with torch.no_grad():
        tokens = model.vision_encoder(blank).shape[-2]
    grid = math.isqrt(tokens // 2)
    if 2 * grid * grid != tokens:
        raise ConfigError(f"aim: the vision encoder gives {tokens} tokens per image, not a square grid of cells "
                          "followed by one colour token each")
    a = cfg.aim
    return AimDataset(FlamingoProcessor(tokenizer, image_processor), batch_size=a.batch_size, start=a.start,
                      image_size=size, max_tokens=a.max_tokens, grid=grid,
                      question_types=[QUESTION_TYPES[k] for k in a.questions],
                      question_weights=({QUESTION_TYPES[k]: float(w) for k, w in a.question_weights.items()}
                                        if a.question_weights else None), style_rate=a.style_rate,
                      episode_rate=a.episode_rate, episode_shots=a.episode_shots,
                      episode_types=[EPISODE_TYPES[k] for k in a.questions if k in EPISODE_TYPES])


def _which_dataset(cfg: TrainConfig, message: str) -> str:
    for i, d in enumerate(cfg.data):
        if any(str(u) in message for u in d.urls):
            return f" for data[{i}] ({d.kind})"
    return ""
