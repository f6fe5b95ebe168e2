"""Our checkpoint format (``save_pretrained`` / ``from_pretrained``) and Hub resolution.

A saved model is a directory (local or a Hub repo):

- ``config.json``: how to rebuild the model: backbone references (or embedded copies), perceiver
  and cross-attention settings, token ids, image preprocessing;
- ``model.safetensors``: the trainable weights only (perceiver, cross-attention, new-token rows);
- ``language_model/`` and ``vision_encoder/``: the backbones, only when they cannot be referenced
  (e.g. built from a random config), or when asked with ``include_backbones=True``;
- the tokenizer files.

Released OpenFlamingo repos (see :mod:`.registry`) load through their ``checkpoint.pt``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoints import CheckpointError, load_openflamingo_checkpoint
from .files import atomic_directory, load_weights_file
from .image_processing import ImageProcessor

FORMAT = "flamingo-vlm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# -- Hub -------------------------------------------------------------------------------------------
def resolve_directory(name_or_path: str | os.PathLike, *, cache_dir=None, local_files_only=False, revision=None) -> Path:
    """A local directory, or a Hub repo id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; expected a model directory or a Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(name_or_path), cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
            )
        )
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise OSError(
            f"could not get model '{name_or_path}' from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "It is not a local directory either. Download it where the Hub is reachable "
            "(`huggingface-cli download " + str(name_or_path) + "`) and pass the directory, or pass cache_dir."
        ) from e


def hub_file(repo_id: str, filename: str, *, cache_dir=None, local_files_only=False) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only))
    except Exception as e:
        raise OSError(
            f"could not get '{filename}' of '{repo_id}' from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "download it where the Hub is reachable and pass a local path or cache_dir"
        ) from e


# -- describing backbones --------------------------------------------------------------------------
def vision_spec(encoder, *, embed: bool) -> dict[str, Any]:
    from .modeling.vision import HFVisionEncoder, OpenCLIPVisionTransformer

    source = getattr(encoder, "source", None)
    if source and not embed:
        return {"type": "reference", **source}
    if isinstance(encoder, OpenCLIPVisionTransformer):
        return {"type": "open_clip", "config": encoder.config}
    if isinstance(encoder, HFVisionEncoder):
        return {
            "type": "hf",
            "config": encoder.model.config.to_dict(),
            "apply_post_layernorm": encoder.apply_post_layernorm,
            "image_mean": list(encoder.image_mean),
            "image_std": list(encoder.image_std),
            "resize_mode": encoder.resize_mode,
            "interpolation": encoder.interpolation,
        }
    if source:
        return {"type": "reference", **source}
    raise ValueError(
        f"cannot save a {type(encoder).__name__} vision encoder: give it a `source` "
        "(a dict build_vision_encoder understands) or use a built-in or open_clip/HF encoder"
    )


def build_vision_from_spec(spec: dict, directory: Path, *, cache_dir=None, local_files_only=False):
    from .factory import build_vision_encoder
    from .modeling.vision import HFVisionEncoder, OpenCLIPVisionTransformer

    kind = spec["type"]
    if kind == "reference":
        return build_vision_encoder(
            spec["path"], spec.get("pretrained"), cache_dir=cache_dir, use_local_files=local_files_only,
            tokens_ln_post=spec.get("tokens_ln_post", False),
            builtin_options={k: spec[k] for k in ("position_encoding", "color_encoding") if k in spec},
        )
    if kind == "open_clip":
        encoder = OpenCLIPVisionTransformer(**spec["config"])
    elif kind == "hf":
        from transformers import AutoConfig

        cfg = dict(spec["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        encoder = HFVisionEncoder.from_config(
            config, apply_post_layernorm=spec["apply_post_layernorm"], image_mean=spec["image_mean"],
            image_std=spec["image_std"], resize_mode=spec["resize_mode"], interpolation=spec["interpolation"],
        )
    else:
        raise ValueError(f"unknown vision encoder type {kind!r} in {directory / CONFIG_NAME}")
    weights = directory / "vision_encoder" / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the config says the vision encoder is embedded")
    encoder.load_state_dict(load_weights_file(weights))
    return encoder


def _lm_reference(lm) -> str | None:
    name = getattr(lm.config, "_name_or_path", "") or ""
    if not name:
        return None
    if name.startswith("builtin:"):
        return name
    if Path(name).exists():
        return str(Path(name).resolve())
    return name if "/" in name else None


def plain_lm_state_dict(model) -> dict[str, torch.Tensor]:
    """The LM's weights under its own (un-wrapped) names, without cross-attention."""
    out = {}
    for key, value in model.lang_encoder.state_dict().items():
        if ".gated_cross_attn_layer." in key:
            continue
        out[key.replace(".decoder_layer.", ".")] = value.detach().contiguous().clone()
    return out


# -- save ------------------------------------------------------------------------------------------
def _tokenizer_without_call_state(tokenizer):
    """A copy of a fast tokenizer without the truncation/padding its last call left in its backend
    (a training run's ``max_length`` would otherwise be written into ``tokenizer.json``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.truncation is None and backend.padding is None):
        return tokenizer
    clean = copy.deepcopy(tokenizer)
    clean.backend_tokenizer.no_truncation()
    clean.backend_tokenizer.no_padding()
    return clean


def save_pretrained(
    model,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    image_processor: ImageProcessor | None = None,
    include_backbones: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save ``model`` in our format; backbones are embedded when they cannot be referenced
    (``include_backbones=None``), always (True) or never (False, an error if impossible)."""
    target = Path(save_directory)
    lm_ref = _lm_reference(model.lang_encoder)
    vis_ref = getattr(model.vision_encoder, "source", None)
    embed_lm = include_backbones if include_backbones is not None else lm_ref is None
    embed_vis = include_backbones if include_backbones is not None else vis_ref is None
    if not embed_lm and lm_ref is None:
        raise ValueError("the language model has no Hub id or path to reference; save with include_backbones=True")
    with atomic_directory(target) as tmp:
        cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype else (lambda t: t)
        trainable = {n: cast(p.detach().contiguous()) for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **model.build_config,
            "vision_encoder": vision_spec(model.vision_encoder, embed=embed_vis),
            "lang_encoder": {"embedded": True} if embed_lm else {"path": lm_ref},
            "image_processor": (image_processor or model.vision_encoder.default_image_processor()).to_dict(),
            "vocab_size": model.lang_encoder.get_input_embeddings().weight.shape[0],
        }
        if embed_vis:
            (tmp / "vision_encoder").mkdir()
            save_file({k: cast(v.contiguous()) for k, v in model.vision_encoder.state_dict().items()},
                      str(tmp / "vision_encoder" / WEIGHTS_NAME))
        if embed_lm:
            lm_dir = tmp / "language_model"
            lm_dir.mkdir()
            model.lang_encoder.config.save_pretrained(lm_dir)
            save_file({k: cast(v) for k, v in plain_lm_state_dict(model).items()}, str(lm_dir / WEIGHTS_NAME))
        else:
            # New-token rows beyond the referenced LM's vocabulary (the <PAD> row, the output head's rows
            # of untied LMs) are not trainable but must come back identical.
            emb = model.lang_encoder.get_input_embeddings()
            extra = {"input_rows": emb.weight.detach()[model.build_config["base_vocab_size"]:].clone()}
            head = model.lang_encoder.get_output_embeddings()
            if head is not None and head.weight is not emb.weight:
                extra["output_rows"] = head.weight.detach()[model.build_config["base_vocab_size"]:].clone()
            save_file({k: cast(v.contiguous()) for k, v in extra.items()}, str(tmp / "added_token_rows.safetensors"))
        if tokenizer is not None:
            _tokenizer_without_call_state(tokenizer).save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return target


# -- load ------------------------------------------------------------------------------------------
def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cache_dir=None,
    local_files_only: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """Returns ``(model, image_processor, tokenizer)`` for a built-in model name (``"smol-synthetic"``),
    a directory or Hub repo in our format, or a released OpenFlamingo repo id."""
    from .registry import builtin_model_dir, get_release

    release = get_release(str(name_or_path))
    builtin = builtin_model_dir(str(name_or_path)) if not Path(name_or_path).is_dir() else None
    if builtin is not None:
        if not (builtin / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"the built-in model '{name_or_path}' has no weights in this install ({builtin / WEIGHTS_NAME}); "
                "reinstall flamingo-vlm from a full checkout or wheel"
            )
        result = _load_directory(builtin, cache_dir=cache_dir, local_files_only=True)
    elif release is not None and not Path(name_or_path).is_dir():
        result = load_openflamingo_release(release, cache_dir=cache_dir, local_files_only=local_files_only)
    else:
        directory = resolve_directory(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
        result = _load_directory(directory, cache_dir=cache_dir, local_files_only=local_files_only)
    model, image_processor, tokenizer = result
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval(), image_processor, tokenizer


def _load_directory(directory: Path, *, cache_dir=None, local_files_only=False):
    from transformers import AutoTokenizer

    from .factory import assemble

    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a flamingo-vlm model directory?")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a {FORMAT} config (format={config.get('format')!r})")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vision = build_vision_from_spec(config["vision_encoder"], directory, cache_dir=cache_dir, local_files_only=local_files_only)
    lm_spec = config["lang_encoder"]
    from .lm_loading import load_causal_lm

    if lm_spec.get("embedded"):  # through load_causal_lm: an MPT's qk_ln etc. are honoured, not dropped
        lm = load_causal_lm(str(directory / "language_model"), dtype=torch.float32)
    else:
        lm = load_causal_lm(lm_spec["path"], cache_dir=cache_dir, local_files_only=local_files_only)
    model = assemble(vision, lm, tokenizer, config)
    if not lm_spec.get("embedded"):
        rows = load_weights_file(directory / "added_token_rows.safetensors")
        base = config["base_vocab_size"]
        with torch.no_grad():
            model.lang_encoder.get_input_embeddings().weight[base:] = rows["input_rows"]
            if "output_rows" in rows:
                model.lang_encoder.get_output_embeddings().weight[base:] = rows["output_rows"]
    weights = load_weights_file(directory / WEIGHTS_NAME)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(weights))
    unexpected = sorted(set(weights) - {n for n, _ in model.named_parameters()})
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(weights, strict=False, _validated=True)
    image_processor = ImageProcessor.from_dict(config["image_processor"])
    return model, image_processor, tokenizer


def load_openflamingo_release(release, *, cache_dir=None, local_files_only=False):
    from .factory import create_model_and_transforms

    model, image_processor, tokenizer = create_model_and_transforms(
        release.vision, release.vision_pretrained, release.lang_encoder, release.tokenizer,
        cross_attn_every_n_layers=release.cross_attn_every_n_layers, cache_dir=cache_dir,
        use_local_files=local_files_only, vision_tokens_ln_post=release.vision_tokens_ln_post,
    )
    checkpoint = hub_file(release.repo_id, release.checkpoint_file, cache_dir=cache_dir, local_files_only=local_files_only)
    load_openflamingo_checkpoint(model, checkpoint)
    return model, image_processor, tokenizer
