"""Our checkpoint format (``save_pretrained`` / ``from_pretrained``) and Hub resolution.

A saved model is a directory (local or a Hub repo):

- ``config.json``: how to rebuild the model: its :class:`~flamingo_vlm.modeling.config.FlamingoConfig`
  (backbone references or embedded specs, perceiver and cross-attention settings, token ids) plus
  the image preprocessing, under the keys format 1 has always had (:func:`config_to_json`), so
  directories written by any earlier version load;
- ``model.safetensors``: the trainable weights only (perceiver, cross-attention, new-token rows);
- ``language_model/`` and ``vision_encoder/``: the backbones, only when they cannot be referenced
  (e.g. built from a random config), or when asked with ``include_backbones=True``;
- the tokenizer files.

Released OpenFlamingo repos (see :mod:`.registry`) load through their ``checkpoint.pt``. Which of
these a name means is decided by :func:`flamingo_vlm.registry.model_source`.

This module sits at the top of the loading layer and installs ``save_pretrained``, ``from_pretrained``
and the validated OpenFlamingo state-dict loader into the model class on import
(:func:`~flamingo_vlm.modeling.flamingo.install_persistence`): the methods ``Flamingo.save_pretrained``
/ ``Flamingo.from_pretrained`` call them, and the model layer imports nothing from here.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import hub
from .hub import hub_file, resolve_directory  # noqa: F401 (re-exported)
from .checkpoints import CheckpointError, load_openflamingo_checkpoint
from .factory import assemble, create_model_and_transforms, vision_encoder_from_ref
from .files import atomic_directory, load_weights_file
from .image_processing import ImageProcessor
from .lm_loading import load_causal_lm
from .modeling.config import BackboneRef, FlamingoConfig
from .modeling.flamingo import install_persistence
from .modeling.quantize import check_mode as check_quantize_mode
from .modeling.quantize import check_not_quantized, quantize_model
from .modeling.vision import HFVisionEncoder, OpenCLIPVisionTransformer
from .references import lm_ref, model_source, vision_ref, vision_ref_of

FORMAT = "flamingo-vlm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# -- describing backbones --------------------------------------------------------------------------
_REF_KEYS = ("path", "pretrained", "tokens_ln_post")


def vision_ref_to_json(ref: BackboneRef) -> dict[str, Any]:
    """``{"type": "reference", "path", "pretrained", "tokens_ln_post", <built-in options>}``; the kind
    is not written: :func:`~flamingo_vlm.references.vision_ref` derives it from the name again."""
    return {"type": "reference", "path": ref.name, "pretrained": ref.pretrained,
            "tokens_ln_post": ref.tokens_ln_post, **ref.options}


def vision_ref_from_json(spec: dict[str, Any]) -> BackboneRef:
    """Inverse of :func:`vision_ref_to_json`; entries written earlier lack ``tokens_ln_post`` (False)
    or a built-in's newer options (their defaults, which is what those models were built with)."""
    options = {k: v for k, v in spec.items() if k not in ("type", *_REF_KEYS)}
    return vision_ref(spec["path"], spec.get("pretrained"), tokens_ln_post=spec.get("tokens_ln_post", False),
                      options=options)


def vision_spec(encoder, *, embed: bool, ref: BackboneRef | None = None) -> dict[str, Any]:
    """The ``vision_encoder`` entry of ``config.json``: a reference (``ref``, else the encoder's own
    ``reference``) unless ``embed``, else the encoder's architecture (its weights go alongside)."""
    ref = ref or vision_ref_of(encoder)
    if ref is not None and not embed:
        return vision_ref_to_json(ref)
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
    if ref is not None:  # an encoder we cannot describe (a built-in) is referenced even when embedded
        return vision_ref_to_json(ref)
    raise ValueError(
        f"cannot save a {type(encoder).__name__} vision encoder: give it a `reference` "
        "(flamingo_vlm.references.vision_ref) or use a built-in or open_clip/HF encoder"
    )


def build_vision_from_spec(spec: dict, directory: Path, *, cache_dir=None, local_files_only=False):
    kind = spec["type"]
    if kind == "reference":
        return vision_encoder_from_ref(vision_ref_from_json(spec), cache_dir=cache_dir,
                                       local_files_only=local_files_only)
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


def config_to_json(config: FlamingoConfig, *, vision_entry: dict[str, Any], embed_lm: bool) -> dict[str, Any]:
    """``config.json``'s model part: format, architecture (:meth:`FlamingoConfig.architecture_dict`),
    ``vision_encoder`` (a reference or an embedded spec) and ``lang_encoder`` (``{"path": ...}`` or
    ``{"embedded": true}``)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **config.architecture_dict(),
        "vision_encoder": vision_entry,
        "lang_encoder": {"embedded": True} if embed_lm else {"path": config.lm.name},
    }


def config_from_json(data: dict[str, Any]) -> FlamingoConfig:
    """The :class:`FlamingoConfig` of a ``config.json`` (any format-1 file, old ones included)."""
    vision_entry, lm_entry = data["vision_encoder"], data["lang_encoder"]
    vision = vision_ref_from_json(vision_entry) if vision_entry.get("type") == "reference" else None
    lm = None if lm_entry.get("embedded") else lm_ref(lm_entry["path"])
    return FlamingoConfig.from_architecture_dict(data, vision=vision, lm=lm)


def read_config(directory: str | os.PathLike) -> tuple[FlamingoConfig, dict[str, Any]]:
    """``(FlamingoConfig, the raw JSON)`` of a saved model directory, checked to be our format."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        if (Path(directory) / "final" / CONFIG_NAME).is_file():  # a training run's output directory
            raise FileNotFoundError(f"{directory} is a training run's directory, not a model: its exported model is "
                                    f"{Path(directory) / 'final'}")
        if (Path(directory) / "trainable.safetensors").is_file():  # a training checkpoint (train/checkpoint.py)
            raise FileNotFoundError(f"{directory} is a training checkpoint, not a model: export it with `flamingo-vlm "
                                    f"train --export-checkpoint {directory} --export-to DIR` and load DIR")
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a flamingo-vlm model directory?")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); save the model again") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{config_path} is not a {FORMAT} config (format={got!r})")
    try:
        return config_from_json(data), data
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path} does not describe a model ({type(e).__name__}: {e})") from e


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


# What a save writes, and the files a tokenizer may write: a directory saved over keeps everything else.
_MODEL_ENTRIES = frozenset({CONFIG_NAME, WEIGHTS_NAME, "added_token_rows.safetensors", "vision_encoder", "language_model",
                            "special_tokens_map.json", "added_tokens.json", "merges.txt"})
_TOKENIZER_PREFIXES = ("tokenizer", "vocab.", "chat_template", "spiece.", "sentencepiece.")


def _written_by_a_save(name: str) -> bool:
    return name in _MODEL_ENTRIES or name.startswith(_TOKENIZER_PREFIXES) or name.endswith(".model")


def check_save_target(save_directory: str | os.PathLike) -> Path:
    """The directory a model may be saved to (absolute): a new or empty one, or one holding a saved
    flamingo-vlm model (replaced; files it does not write are kept). A file, or a non-empty
    directory that holds something else, is refused before anything is built or written, so a
    mistyped ``--out ~/models`` cannot delete what was there."""
    target = Path(save_directory).expanduser().absolute()
    if target.is_symlink():  # a link to a saved model ("latest -> run3"): the save goes where it points
        target = target.resolve()
    cwd = Path.cwd()
    if target.is_dir() and (cwd == target.resolve() or target.resolve() in cwd.parents):
        raise FileExistsError(f"{save_directory} is the current directory (or holds it), which a save would replace; "
                              "save into a subdirectory")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{save_directory} is a file, not a directory; name a new directory to save the model in")
    if not target.is_dir():
        return target
    entries = sorted(p.name for p in target.iterdir() if not p.name.startswith("."))  # (.DS_Store, ...)
    if not entries:
        return target
    try:
        saved = json.loads((target / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        saved = False
    if not saved:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{save_directory} is a directory that does not hold a saved flamingo-vlm model ({shown}); "
            "save into a new or empty directory (or remove this one first)")
    return target


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
    check_not_quantized(model, "save_pretrained")  # its weights are integer buffers: nothing loadable to save
    target = check_save_target(save_directory)  # absolute: '.' has no name to make a sibling from
    model_config: FlamingoConfig = model.config
    embed_lm = include_backbones if include_backbones is not None else model_config.lm is None
    embed_vis = include_backbones if include_backbones is not None else model_config.vision is None
    if not embed_lm and model_config.lm is None:
        raise ValueError("the language model has no Hub id or path to reference; save with include_backbones=True")
    base_vocab_size = model_config.tokens.base_vocab_size
    with atomic_directory(target, keep_other=lambda name: not _written_by_a_save(name)) as tmp:
        cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype else (lambda t: t)
        trainable = {n: cast(p.detach().contiguous()) for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        vision_entry = vision_spec(model.vision_encoder, embed=embed_vis, ref=model_config.vision)
        config = {
            **config_to_json(model_config, vision_entry=vision_entry, embed_lm=embed_lm),
            "image_processor": (image_processor or model.vision_encoder.default_image_processor()).to_dict(),
            "vocab_size": model.lang_encoder.get_input_embeddings().weight.shape[0],
        }
        if embed_vis and vision_entry.get("type") != "reference":  # (a built-in is referenced even when asked
            (tmp / "vision_encoder").mkdir()                         # embedded: its weights would go unread)
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
            extra = {"input_rows": emb.weight.detach()[base_vocab_size:].clone()}
            head = model.lang_encoder.get_output_embeddings()
            if head is not None and head.weight is not emb.weight:
                extra["output_rows"] = head.weight.detach()[base_vocab_size:].clone()
            save_file({k: cast(v.contiguous()) for k, v in extra.items()}, str(tmp / "added_token_rows.safetensors"))
        if tokenizer is not None:
            _tokenizer_without_call_state(tokenizer).save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is None:  # (the folder was written without a word; its load then failed on the tokenizer)
        import warnings

        warnings.warn(f"{target} was saved without a tokenizer: load_pretrained reads one from the folder, so pass "
                      "tokenizer= (the one create_model_and_transforms or load_pretrained returned) or add its files "
                      "there", UserWarning, stacklevel=3)
    return Path(save_directory).expanduser()


# -- load ------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _dtype(dtype, device) -> torch.dtype | None:
    """``dtype`` as the command line takes it too: a torch dtype, ``"auto"`` (bf16 where it runs natively,
    else fp32: what ``generate`` and ``serve`` load with), or a name (``"bfloat16"``, ``"bf16"``,
    ``"torch.float16"``); a string reached ``model.to`` and failed there as torch's TypeError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        from .modeling.fast_linear import auto_dtype

        return auto_dtype(device)
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: give a torch dtype, 'auto' or one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    cache_dir=None,
    local_files_only: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    revision: str | None = None,
):
    """Returns ``(model, image_processor, tokenizer)`` for a built-in model name (``"smol-synthetic"``),
    a directory or Hub repo in our format, or a released OpenFlamingo repo id. ``quantize="int8"`` /
    ``"int4"``: weight-only quantization for CPU inference (:mod:`flamingo_vlm.modeling.quantize`).
    ``dtype``: a torch dtype, ``"auto"`` (as the command line loads: bf16 where it runs natively) or a
    name (``"bfloat16"``, ``"bf16"``); None: as saved (fp32). ``revision``: a branch, tag or commit of a Hub repo (ours, or a release's ``checkpoint.pt``), as in
    transformers; the backbones a saved model references load as that model names them."""
    check_quantize_mode(quantize)  # before the (slow) load
    dtype = _dtype(dtype, device)
    source = model_source(name_or_path)
    if revision is not None and source.kind in ("builtin", "directory"):
        raise ValueError(f"revision={revision!r} picks a version of a Hub repo; {name_or_path} is "
                         f"{'a built-in model' if source.kind == 'builtin' else 'a local directory'}: drop revision=")
    if source.kind == "builtin":
        builtin = source.path
        if not (builtin / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"the built-in model '{name_or_path}' has no weights in this install ({builtin / WEIGHTS_NAME}); "
                "reinstall flamingo-vlm from a full checkout or wheel"
            )
        result = _load_directory(builtin, cache_dir=cache_dir, local_files_only=True)
    elif source.kind == "release":
        local_files_only = hub.local_files_only(local_files_only, name_or_path)  # offline: the cache at once
        result = load_openflamingo_release(source.release, cache_dir=cache_dir, local_files_only=local_files_only,
                                           revision=revision)
    else:
        local_files_only = hub.local_files_only(local_files_only, name_or_path)  # (a directory: no lookup)
        directory = resolve_directory(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only,
                                      revision=revision)
        result = _load_directory(directory, cache_dir=cache_dir, local_files_only=local_files_only)
    model, image_processor, tokenizer = result
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    quantize_model(model.eval(), quantize)
    return model, image_processor, tokenizer


def _check_local_backbones(directory: Path, config: dict[str, Any]) -> None:
    """A saved model names backbones that were local files by their absolute paths: one moved or deleted
    since (or a model copied to another machine) was looked up as a Hub repo id ("Repo id must be in the
    form 'repo_name' ...") or a weights tag, without a word about the model that names it."""
    vision = config["vision_encoder"] if config["vision_encoder"].get("type") == "reference" else {}
    named = [("language model", (config["lang_encoder"].get("path"),)),
             ("vision encoder", (vision.get("path"), vision.get("pretrained")))]
    for what, paths in named:
        for path in paths:
            if isinstance(path, str) and Path(path).is_absolute() and not Path(path).exists():
                raise FileNotFoundError(
                    f"{directory / CONFIG_NAME} names its {what} by the local path {path}, which does not exist "
                    "(moved, deleted, or another machine's): put it back there, or save the model with its "
                    "backbones (save_pretrained(..., include_backbones=True); convert --include-backbones)")


def _load_directory(directory: Path, *, cache_dir=None, local_files_only=False):
    from transformers import AutoTokenizer

    model_config, config = read_config(directory)
    _check_local_backbones(directory, config)
    referenced = [model_config.lm.name if model_config.lm is not None else None,
                  config["vision_encoder"].get("path") if config["vision_encoder"].get("type") == "reference" else None]
    local_files_only = hub.local_files_only(local_files_only, *referenced)  # backbones by reference may need the Hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:  # transformers' words name neither the folder nor a file
        raise OSError(f"{directory}: could not load the saved model's tokenizer (tokenizer.json, "
                      f"tokenizer_config.json, ... missing or damaged: {e}); save or download the model again") from e
    vision = build_vision_from_spec(config["vision_encoder"], directory, cache_dir=cache_dir, local_files_only=local_files_only)
    if model_config.lm is None:  # embedded; through load_causal_lm: an MPT's qk_ln etc. are honoured, not dropped
        lm = load_causal_lm(str(directory / "language_model"), dtype=torch.float32)
    else:
        try:
            lm = load_causal_lm(model_config.lm.name, cache_dir=cache_dir, local_files_only=local_files_only)
        except OSError as e:
            raise OSError(f"{e} (the language model {directory / CONFIG_NAME} names)") from e
    model = assemble(vision, lm, tokenizer, model_config)
    if model_config.lm is not None:
        rows = load_weights_file(directory / "added_token_rows.safetensors")
        base = model_config.tokens.base_vocab_size
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


def load_openflamingo_release(release, *, cache_dir=None, local_files_only=False, revision=None):
    model, image_processor, tokenizer = create_model_and_transforms(
        release.vision, release.vision_pretrained, release.lang_encoder, release.tokenizer,
        cross_attn_every_n_layers=release.cross_attn_every_n_layers, cache_dir=cache_dir,
        use_local_files=local_files_only, vision_tokens_ln_post=release.vision_tokens_ln_post,
    )
    checkpoint = hub_file(release.repo_id, release.checkpoint_file, cache_dir=cache_dir,
                          local_files_only=local_files_only, revision=revision)
    load_openflamingo_checkpoint(model, checkpoint)
    return model, image_processor, tokenizer


install_persistence(save_pretrained=save_pretrained, from_pretrained=from_pretrained,
                    load_openflamingo_state_dict=load_openflamingo_checkpoint)
