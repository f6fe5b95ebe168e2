"""``create_model_and_transforms``: OpenFlamingo's factory, on current transformers.

A user's OpenFlamingo script runs after changing only the import. Backbones can also be given
as ready modules (``nn.Module`` encoder, ``PreTrainedModel`` LM, tokenizer object), which is
how tests build tiny random models.

Names are parsed by :mod:`.references` into typed references; the model's ``config``
(:class:`~flamingo_vlm.modeling.config.FlamingoConfig`) records them with the architecture, so
``save_pretrained`` names reloadable backbones instead of copying them. :func:`assemble` is also
how ``from_pretrained`` rebuilds a saved model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .backbones import build_builtin_tokenizer, build_builtin_vision
from .files import byte_span, release_file_pages
from .image_processing import ImageProcessor
from .modeling.config import BackboneRef, CrossAttentionConfig, FlamingoConfig, PerceiverConfig, TokenConfig
from .modeling.flamingo import Flamingo
from .modeling.quantize import check_mode as check_quantize_mode
from .modeling.quantize import quantize_model
from .modeling.vision import (
    HFVisionEncoder,
    OpenCLIPVisionTransformer,
    VisionEncoder,
    load_open_clip_state_dict,
    resolve_open_clip_pretrained,
)
from .processing import EOC_TOKEN, MEDIA_TOKEN, add_flamingo_tokens
from .references import is_builtin, lm_ref_of, vision_ref, vision_ref_of


def build_vision_encoder(
    path: str | Path | nn.Module,
    pretrained: str | None,
    *,
    cache_dir: str | None = None,
    use_local_files: bool = False,
    tokens_ln_post: bool = False,
    builtin_options: dict | None = None,
) -> VisionEncoder:
    """An encoder from an open_clip name ("ViT-L-14"), an open_clip model-config JSON, a Hugging
    Face CLIP/SigLIP id or directory, a packaged backbone (``"builtin:efficientnet-lite0"``), or a
    ready :class:`VisionEncoder`."""
    if isinstance(path, nn.Module):
        return path
    ref = vision_ref(path, pretrained, tokens_ln_post=tokens_ln_post, options=builtin_options)
    # offline: the local cache at once (RICES's encoder retried the Hub for ~30 s before its error); an
    # open_clip architecture is code, only its weights may come from the Hub
    names = [n for n in ((pretrained,) if ref.kind in ("open_clip", "open_clip_config") else (path, pretrained)) if n]
    if names:
        use_local_files = hub.local_files_only(use_local_files, *names)
    return vision_encoder_from_ref(ref, cache_dir=cache_dir, local_files_only=use_local_files)


def vision_encoder_from_ref(ref: BackboneRef, *, cache_dir=None, local_files_only: bool = False) -> VisionEncoder:
    """Build the encoder ``ref`` names (see :mod:`.references`); it keeps ``ref`` as ``encoder.reference``
    so that a saved model names it instead of copying it."""
    if ref.kind == "builtin":
        return build_builtin_vision(ref.name, **ref.options)  # records its own reference, options filled in
    if ref.kind == "hf":
        encoder = HFVisionEncoder.from_pretrained(ref.name, cache_dir=cache_dir, local_files_only=local_files_only)
        encoder.reference = ref
        return encoder
    # OpenAI's CLIP weights were trained with QuickGELU: a tag "openai..." or a file named so.
    quick_gelu = bool(ref.pretrained) and Path(ref.pretrained).name.startswith("openai")
    if ref.kind == "open_clip_config":
        if not Path(ref.name).is_file():
            raise FileNotFoundError(f"open_clip model config {ref.name} does not exist")
        config = json.loads(Path(ref.name).read_text())
        encoder = OpenCLIPVisionTransformer.from_open_clip_config(
            config, tokens_ln_post=ref.tokens_ln_post, quick_gelu=quick_gelu or bool(config.get("quick_gelu"))
        )
    elif ref.kind == "open_clip":
        encoder = OpenCLIPVisionTransformer.from_open_clip_name(
            ref.name, tokens_ln_post=ref.tokens_ln_post, quick_gelu=quick_gelu
        )
    else:
        raise ValueError(f"unknown vision encoder kind {ref.kind!r} (of {ref.name!r})")
    if ref.pretrained:
        weights = resolve_open_clip_pretrained(ref.name, ref.pretrained, cache_dir=cache_dir,
                                               local_files_only=local_files_only)
        load_open_clip_state_dict(encoder, weights)
    encoder.reference = ref  # without weights it is not reloadable, and a saved model embeds it
    return encoder


def build_language_model(path, *, cache_dir=None, use_local_files=False, dtype=None, **kwargs) -> nn.Module:
    if isinstance(path, nn.Module):
        return path
    from .lm_loading import load_causal_lm

    return load_causal_lm(str(path), cache_dir=cache_dir, local_files_only=use_local_files,
                          dtype=dtype or torch.float32, **kwargs)


def build_tokenizer(path, *, cache_dir=None, use_local_files=False):
    if not isinstance(path, (str, Path)):
        return path
    if is_builtin(str(path)):
        return build_builtin_tokenizer(str(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, local_files_only=use_local_files)
    except (OSError, ValueError) as e:  # transformers' words ("We couldn't connect to ...", "Couldn't
        # instantiate the backend tokenizer ...") name neither the tokenizer nor the folder
        if str(path) in str(e):
            raise
        raise OSError(f"could not load the tokenizer '{path}' ({e}); pass a tokenizer's directory or Hub id "
                      "(an LM directory without tokenizer files has none)") from e


def assemble(vision: VisionEncoder, lm: nn.Module, tokenizer, config: FlamingoConfig, *,
             gradient_checkpointing: bool = False) -> Flamingo:
    """Join backbones into a Flamingo as ``config`` says (a saved model's, or what
    ``create_model_and_transforms`` was asked for). Adds the Flamingo tokens to ``tokenizer`` if
    needed, sizes the LM's embeddings to the tokenizer and fills in ``config.tokens``."""
    base_vocab_size = config.tokens.base_vocab_size if config.tokens is not None else None
    if tokenizer.convert_tokens_to_ids(MEDIA_TOKEN) in (None, tokenizer.unk_token_id):
        base_vocab_size = len(tokenizer)
        add_flamingo_tokens(tokenizer)
    eoc_id, media_id = tokenizer.convert_tokens_to_ids([EOC_TOKEN, MEDIA_TOKEN])
    if base_vocab_size is None:
        base_vocab_size = min(eoc_id, media_id)
    if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        # (addresses taken before: resize_token_embeddings gives the Parameter objects their new data in place)
        old = [byte_span(m.weight) for m in (lm.get_input_embeddings(), lm.get_output_embeddings())
               if isinstance(getattr(m, "weight", None), torch.Tensor)]
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # the old matrices' pages in a mapped weights file would stay resident for the model's life
        release_file_pages(old, live=[*lm.parameters(), *lm.buffers()])
    tokens = TokenConfig(eoc_token_id=eoc_id, media_token_id=media_id, pad_token_id=tokenizer.pad_token_id,
                         base_vocab_size=base_vocab_size)
    return Flamingo.from_config(vision, lm, config.replace(tokens=tokens), gradient_checkpointing=gradient_checkpointing)


def create_model_and_transforms(
    clip_vision_encoder_path: str | nn.Module,
    clip_vision_encoder_pretrained: str | None,
    lang_encoder_path: str | nn.Module,
    tokenizer_path: Any,
    cross_attn_every_n_layers: int = 1,
    use_local_files: bool = False,
    decoder_layers_attr_name: str | None = None,
    freeze_lm_embeddings: bool = False,
    cache_dir: str | None = None,
    *,
    vision_tokens_ln_post: bool = False,
    lm_dtype: torch.dtype | None = None,
    perceiver_kwargs: dict | PerceiverConfig | None = None,
    cross_attn_kwargs: dict | CrossAttentionConfig | None = None,
    gradient_checkpointing: bool = False,
    quantize: str | None = None,
) -> tuple[Flamingo, ImageProcessor, Any]:
    """Build a Flamingo model; returns ``(model, image_processor, tokenizer)`` like OpenFlamingo.

    ``vision_tokens_ln_post=False`` (default) feeds the perceiver the ViT tokens *before*
    ``ln_post``, which is what the released OpenFlamingo weights were trained on (open_clip <=
    2.22). open_clip >= 2.23 applies ``ln_post`` to the tokens; set True to match that.

    ``quantize="int8"``/``"int4"``: weight-only quantization of the LM, cross-attention and perceiver
    linears for CPU inference (:mod:`.modeling.quantize`; the model cannot then be trained or saved).
    """
    check_quantize_mode(quantize)
    # offline: the cache at once, not ~30 s of retries
    use_local_files = hub.local_files_only(use_local_files, clip_vision_encoder_path, lang_encoder_path, tokenizer_path)
    vision = build_vision_encoder(
        clip_vision_encoder_path,
        clip_vision_encoder_pretrained,
        cache_dir=cache_dir,
        use_local_files=use_local_files,
        tokens_ln_post=vision_tokens_ln_post,
    )
    tokenizer = build_tokenizer(tokenizer_path, cache_dir=cache_dir, use_local_files=use_local_files)
    lm = build_language_model(lang_encoder_path, cache_dir=cache_dir, use_local_files=use_local_files, dtype=lm_dtype)
    config = FlamingoConfig(
        vision=vision_ref_of(vision),
        lm=lm_ref_of(lm),
        perceiver=PerceiverConfig.coerce(perceiver_kwargs),
        cross_attention=CrossAttentionConfig.coerce(cross_attn_kwargs),
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        decoder_layers_attr_name=decoder_layers_attr_name,
        freeze_lm_embeddings=freeze_lm_embeddings,
    )
    model = assemble(vision, lm, tokenizer, config, gradient_checkpointing=gradient_checkpointing)
    quantize_model(model, quantize)
    return model, vision.default_image_processor(), tokenizer
