"""``create_model_and_transforms``: OpenFlamingo's factory, on current transformers.

A user's OpenFlamingo script runs after changing only the import. Backbones can also be given
as ready modules (``nn.Module`` encoder, ``PreTrainedModel`` LM, tokenizer object), which is
how tests build tiny random models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import build_builtin_tokenizer, build_builtin_vision, is_builtin
from .image_processing import ImageProcessor
from .modeling.flamingo import Flamingo
from .modeling.vision import (
    OPEN_CLIP_VISION_CONFIGS,
    HFVisionEncoder,
    OpenCLIPVisionTransformer,
    VisionEncoder,
    load_open_clip_state_dict,
    resolve_open_clip_pretrained,
)
from .processing import EOC_TOKEN, MEDIA_TOKEN, add_flamingo_tokens


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
    path_str = str(path)
    if is_builtin(path_str):
        return build_builtin_vision(path_str, **(builtin_options or {}))
    quick_gelu = pretrained == "openai" or (pretrained or "").startswith("openai")
    if path_str.endswith(".json"):
        if not Path(path_str).is_file():
            raise FileNotFoundError(f"open_clip model config {path_str} does not exist")
        config = json.loads(Path(path_str).read_text())
        encoder = OpenCLIPVisionTransformer.from_open_clip_config(
            config, tokens_ln_post=tokens_ln_post, quick_gelu=quick_gelu or bool(config.get("quick_gelu"))
        )
    elif path_str in OPEN_CLIP_VISION_CONFIGS:
        encoder = OpenCLIPVisionTransformer.from_open_clip_name(
            path_str, tokens_ln_post=tokens_ln_post, quick_gelu=quick_gelu
        )
    else:
        encoder = HFVisionEncoder.from_pretrained(path_str, cache_dir=cache_dir, local_files_only=use_local_files)
        encoder.source = {"path": path_str, "pretrained": None}
        return encoder
    if pretrained:
        weights = resolve_open_clip_pretrained(path_str, pretrained, cache_dir=cache_dir)
        load_open_clip_state_dict(encoder, weights)
        # Where the weights came from: a saved model references them instead of copying them.
        encoder.source = {"path": path_str, "pretrained": pretrained, "tokens_ln_post": tokens_ln_post}
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

    return AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, local_files_only=use_local_files)


def assemble(vision: VisionEncoder, lm: nn.Module, tokenizer, build_config: dict[str, Any]) -> Flamingo:
    """Join backbones into a Flamingo as ``build_config`` says (``Flamingo.build_config`` of a
    saved model, or what ``create_model_and_transforms`` was asked for). Adds the Flamingo tokens
    to ``tokenizer`` if needed and sizes the LM's embeddings to the tokenizer."""
    base_vocab_size = build_config.get("base_vocab_size")
    if tokenizer.convert_tokens_to_ids(MEDIA_TOKEN) in (None, tokenizer.unk_token_id):
        base_vocab_size = len(tokenizer)
        add_flamingo_tokens(tokenizer)
    eoc_id, media_id = tokenizer.convert_tokens_to_ids([EOC_TOKEN, MEDIA_TOKEN])
    if base_vocab_size is None:
        base_vocab_size = min(eoc_id, media_id)
    if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return Flamingo(
        vision,
        lm,
        eoc_token_id=eoc_id,
        media_token_id=media_id,
        vis_dim=vision.hidden_size,
        cross_attn_every_n_layers=build_config.get("cross_attn_every_n_layers", 1),
        gradient_checkpointing=build_config.get("gradient_checkpointing", False),
        decoder_layers_attr_name=build_config.get("decoder_layers_attr_name"),
        pad_token_id=tokenizer.pad_token_id,
        freeze_lm_embeddings=build_config.get("freeze_lm_embeddings", False),
        perceiver_kwargs=build_config.get("perceiver_kwargs"),
        cross_attn_kwargs=build_config.get("cross_attn_kwargs"),
        base_vocab_size=base_vocab_size,
    )


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
    perceiver_kwargs: dict | None = None,
    cross_attn_kwargs: dict | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[Flamingo, ImageProcessor, Any]:
    """Build a Flamingo model; returns ``(model, image_processor, tokenizer)`` like OpenFlamingo.

    ``vision_tokens_ln_post=False`` (default) feeds the perceiver the ViT tokens *before*
    ``ln_post``, which is what the released OpenFlamingo weights were trained on (open_clip <=
    2.22). open_clip >= 2.23 applies ``ln_post`` to the tokens; set True to match that.
    """
    vision = build_vision_encoder(
        clip_vision_encoder_path,
        clip_vision_encoder_pretrained,
        cache_dir=cache_dir,
        use_local_files=use_local_files,
        tokens_ln_post=vision_tokens_ln_post,
    )
    tokenizer = build_tokenizer(tokenizer_path, cache_dir=cache_dir, use_local_files=use_local_files)
    lm = build_language_model(lang_encoder_path, cache_dir=cache_dir, use_local_files=use_local_files, dtype=lm_dtype)
    model = assemble(
        vision,
        lm,
        tokenizer,
        dict(
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            decoder_layers_attr_name=decoder_layers_attr_name,
            freeze_lm_embeddings=freeze_lm_embeddings,
            perceiver_kwargs=perceiver_kwargs,
            cross_attn_kwargs=cross_attn_kwargs,
            gradient_checkpointing=gradient_checkpointing,
        ),
    )
    return model, vision.default_image_processor(), tokenizer
