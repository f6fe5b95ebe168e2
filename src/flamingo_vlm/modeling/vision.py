"""Vision encoders: image pixels -> patch tokens ``(N, T, D)`` for the perceiver resampler.

* `OpenCLIPVisionTransformer`: an open_clip-compatible ViT (parameter names identical to open_clip's
  ``VisionTransformer``, so OpenFlamingo ``vision_encoder.*`` and open_clip ``visual.*`` weights load
  unchanged), plus loading helpers for open_clip checkpoints and the Hugging Face Hub.
* `HFVisionEncoder`: transformers ``CLIPVisionModel`` / ``SiglipVisionModel``.
* `FeatureGridEncoder` (in :mod:`.feature_grid`): any backbone that returns a feature grid or tokens.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import load_weights_file
from ..errors import why_not_fetched
from ..image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from .fast_linear import conv, linear
from .keys import unwrap_key

__all__ = [
    "OPEN_CLIP_PRETRAINED",
    "OPEN_CLIP_VISION_CONFIGS",
    "HFVisionEncoder",
    "OpenCLIPVisionTransformer",
    "VisionEncoder",
    "load_open_clip_state_dict",
    "resolve_open_clip_pretrained",
]


class VisionEncoder(nn.Module):
    """Interface: ``forward(pixel_values (N, C, H, W)) -> tokens (N, T, hidden_size)``.

    Subclasses set ``hidden_size`` (token width D), ``image_size`` (expected square input side) and
    implement `default_image_processor` (the preprocessing the weights were trained with). The
    loaders set ``reference`` (a :class:`~.config.BackboneRef`) to where the weights came from, so a
    saved model can name them instead of copying them.
    """

    hidden_size: int
    image_size: int
    reference: Any = None

    def default_image_processor(self) -> ImageProcessor:
        raise NotImplementedError

    def forward(self, pixel_values: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# open_clip-compatible ViT
# --------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x): the OpenAI weights were trained with it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """open_clip's per-channel learnt scale of a residual branch (``gamma``), for ViTs trained with it."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run through SDPA."""

    # used only through fast_linear.linear, which is F.linear unless a routing block sends the call to
    # oneDNN (plain fp32 only; training may store them in the autocast dtype when frozen)
    AUTOCAST_MATRIX_PARAMS = ("in_proj_weight", "in_proj_bias")

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init

    def forward(self, x: Tensor) -> Tensor:
        n, length, width = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (routed like the nn.Linear layers)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (n, heads, length, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """A pre-LayerNorm ViT block (self-attention then MLP), with open_clip's parameter names."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init_value: float | None, act: str) -> None:
        super().__init__()
        mlp_width = int(width * mlp_ratio)  # open_clip truncates too (e.g. bigG: 1664 * 4.9231 -> 8192)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=QuickGELU() if act == "quick_gelu" else nn.GELU(),
                c_proj=nn.Linear(mlp_width, width),
            )
        )
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _Transformer(nn.Module):
    """The ViT's stack of blocks (open_clip's ``transformer.resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, ls_init_value: float | None, act: str):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act) for _ in range(layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


# Standard open_clip model configs (vision part), in open_clip's own JSON layout.
OPEN_CLIP_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}},
    "ViT-L-14-336": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
    },
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    },
    "ViT-bigG-14": {
        "embed_dim": 1280,
        "vision_cfg": {
            "image_size": 224,
            "layers": 48,
            "width": 1664,
            "head_width": 104,
            "mlp_ratio": 4.9231,
            "patch_size": 14,
        },
    },
}

# (model, tag) -> (Hub repo, file). open_clip's own pretrained registry points at these repos.
OPEN_CLIP_PRETRAINED: dict[tuple[str, str], tuple[str, str]] = {
    ("ViT-B-32", "openai"): ("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("ViT-B-16", "openai"): ("timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("ViT-L-14", "openai"): ("timm/vit_large_patch14_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("ViT-B-32", "laion2b_s34b_b79k"): ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin"),
    ("ViT-L-14", "laion2b_s32b_b82k"): ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "open_clip_pytorch_model.bin"),
    ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin"),
}
_QUICK_GELU_TAGS = {"openai"}  # OpenAI's CLIP weights were trained with QuickGELU

# vision_cfg options that change the architecture and that this ViT does not implement.
_UNSUPPORTED_VISION_CFG = (
    "timm_model_name",
    "hf_model_name",
    "attentional_pool",
    "no_ln_pre",
    "global_average_pool",
    "attn_pooler_queries",
    "input_patchnorm",
)


def _canonical_model_name(name: str) -> tuple[str, bool]:
    """'ViT-L/14-quickgelu' -> ('ViT-L-14', True)."""
    name = name.replace("/", "-")
    quick = name.endswith("-quickgelu")
    return (name.removesuffix("-quickgelu"), quick)


class OpenCLIPVisionTransformer(VisionEncoder):
    """open_clip's ``VisionTransformer``, returning patch tokens.

    Parameter names equal open_clip's (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.{i}.{ln_1,attn,ls_1,ln_2,mlp.c_fc,mlp.c_proj,ls_2}``,
    ``ln_post``, ``proj``), so open_clip ``visual.*`` and OpenFlamingo ``vision_encoder.*`` weights load
    as they are.

    ``forward`` returns the patch tokens (class token dropped, no projection). ``tokens_ln_post``
    selects whether ``ln_post`` is applied to them:

    * ``False`` (default): tokens straight from the last block. open_clip <= 2.22 returned these as
      ``output_tokens`` and the released OpenFlamingo weights were trained on them.
    * ``True``: ``ln_post`` applied, as open_clip >= 2.23 does (``final_ln_after_pool=False``). The
      golden fixtures of this project were produced that way (open_clip 3.3).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        embed_dim: int | None = None,
        act: str = "gelu",
        tokens_ln_post: bool = False,
        head_width: int = 64,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {act!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if heads is None:  # open_clip's rule
            if head_width < 1:
                raise ValueError(f"vision head_width must be >= 1, got {head_width}")
            if width < head_width:
                raise ValueError(f"vision width {width} is smaller than head_width {head_width}, which would give "
                                 f"no attention head (heads = width // head_width): set head_width (or heads)")
            heads = width // head_width
        if heads < 1:
            raise ValueError(f"vision heads must be >= 1, got {heads}")
        # Constructor arguments as data, so a saved model can rebuild this encoder.
        self.config = dict(
            image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
            mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, embed_dim=embed_dim, act=act,
            tokens_ln_post=tokens_ln_post, image_mean=list(image_mean), image_std=list(image_std),
        )
        self.image_size, self.patch_size, self.hidden_size = image_size, patch_size, width
        self.grid_size = image_size // patch_size
        self.num_tokens = self.grid_size**2
        self.act, self.tokens_ln_post = act, tokens_ln_post
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

        scale = width**-0.5  # open_clip's init scale for the embeddings
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_tokens + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, mlp_ratio, ls_init_value, act)
        self.ln_post = nn.LayerNorm(width)
        # `proj` only serves `encode_image` (CLIP embeddings, e.g. for RICES); tokens are unprojected.
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim)) if embed_dim is not None else None

    def _trunk(self, pixel_values: Tensor) -> Tensor:
        """All tokens (class token first) after the last block, before ``ln_post``."""
        x = conv(self.conv1, pixel_values.to(self.conv1.weight.dtype))  # (N, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, width), row-major patches like open_clip
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, pixel_values: Tensor) -> Tensor:
        tokens = self._trunk(pixel_values)[:, 1:]
        return self.ln_post(tokens) if self.tokens_ln_post else tokens

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """open_clip's image embedding: ``ln_post(class token) @ proj`` (not normalised)."""
        if self.proj is None:
            raise ValueError("this encoder has no `proj` (built with embed_dim=None)")
        return self.ln_post(self._trunk(pixel_values)[:, 0]) @ self.proj

    def default_image_processor(self) -> ImageProcessor:
        return ImageProcessor(self.image_size, mean=self.image_mean, std=self.image_std)

    @classmethod
    def from_open_clip_config(
        cls, config: str | os.PathLike | Mapping[str, Any], tokens_ln_post: bool = False, quick_gelu: bool = False
    ) -> OpenCLIPVisionTransformer:
        """Build from an open_clip model config (a JSON file path or dict with ``embed_dim`` and
        ``vision_cfg``; the Hub's ``open_clip_config.json`` layout ``{"model_cfg": ...}`` works too).
        QuickGELU is used if ``quick_gelu`` or the config's top-level ``quick_gelu`` is true."""
        if isinstance(config, (str, os.PathLike)):
            try:  # (a bad value, or not JSON: the message names the file)
                return cls.from_open_clip_config(json.loads(Path(config).read_text()), tokens_ln_post, quick_gelu)
            except ValueError as e:
                raise ValueError(f"{config}: {e}") from e
        config = dict(config)
        preprocess = config.get("preprocess_cfg", {})
        config = config.get("model_cfg", config)
        if "vision_cfg" not in config:
            raise ValueError(f"open_clip config has no 'vision_cfg' (keys: {sorted(config)})")
        vcfg = dict(config["vision_cfg"])
        bad = [k for k in _UNSUPPORTED_VISION_CFG if vcfg.get(k)]
        if bad:
            raise ValueError(f"unsupported open_clip vision_cfg options for OpenCLIPVisionTransformer: {bad}")
        image_size, patch_size = vcfg.get("image_size", 224), vcfg.get("patch_size", 16)
        for name, value in (("image_size", image_size), ("patch_size", patch_size)):
            if isinstance(value, (list, tuple)):  # open_clip allows (h, w); we only support squares
                if value[0] != value[1]:
                    raise ValueError(f"non-square {name} {value} is not supported")
                value = value[0]
            vcfg[name] = int(value)
        return cls(
            image_size=vcfg["image_size"],
            patch_size=vcfg["patch_size"],
            width=vcfg.get("width", 768),
            layers=vcfg.get("layers", 12),
            head_width=vcfg.get("head_width", 64),
            heads=vcfg.get("heads"),  # (not open_clip's: a config that names its heads means them)
            mlp_ratio=vcfg.get("mlp_ratio", 4.0),
            ls_init_value=vcfg.get("ls_init_value"),
            embed_dim=config.get("embed_dim"),
            act="quick_gelu" if (quick_gelu or config.get("quick_gelu", False)) else "gelu",
            tokens_ln_post=tokens_ln_post,
            image_mean=preprocess.get("mean", vcfg.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=preprocess.get("std", vcfg.get("image_std", OPENAI_CLIP_STD)),
        )

    @classmethod
    def from_open_clip_name(
        cls, name: str, tokens_ln_post: bool = False, quick_gelu: bool = False
    ) -> OpenCLIPVisionTransformer:
        """Random-weight model of a standard open_clip architecture (``"ViT-L-14"``, ``"ViT-L-14-quickgelu"``...)."""
        base, quick = _canonical_model_name(name)
        if base not in OPEN_CLIP_VISION_CONFIGS:
            raise ValueError(f"unknown open_clip model {name!r}; known: {sorted(OPEN_CLIP_VISION_CONFIGS)}")
        return cls.from_open_clip_config(OPEN_CLIP_VISION_CONFIGS[base], tokens_ln_post, quick_gelu or quick)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        tokens_ln_post: bool = False,
        quick_gelu: bool | None = None,
    ) -> OpenCLIPVisionTransformer:
        """``open_clip.create_model_and_transforms(model_name, pretrained)``'s vision tower, in eval mode.

        ``quick_gelu=None`` picks QuickGELU for OpenAI weights (tag ``"openai"`` or a ``-quickgelu`` name)."""
        if quick_gelu is None:
            quick_gelu = str(pretrained) in _QUICK_GELU_TAGS or _canonical_model_name(model_name)[1]
        model = cls.from_open_clip_name(model_name, tokens_ln_post=tokens_ln_post, quick_gelu=quick_gelu)
        load_open_clip_state_dict(model, resolve_open_clip_pretrained(model_name, pretrained, cache_dir))
        return model.eval()


class LoadResult(NamedTuple):
    """What :func:`load_open_clip_state_dict` left unfilled and what it did not use."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data; never let it run code on load. Errors name the file.
    return load_weights_file(path)


def _extract_vision_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Find the vision tower in an open_clip / OpenFlamingo / bare state dict and strip its prefix."""
    for wrapper in ("state_dict", "model_state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    sd = {unwrap_key(k): v for k, v in state_dict.items() if isinstance(v, Tensor)}  # (DDP, torch.compile)
    for prefix in ("visual.", "vision_encoder.visual.", "vision_encoder."):
        found = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if found:
            return found
    if "conv1.weight" in sd:  # already a bare vision-tower dict
        return sd
    sample = sorted(sd)[:5]
    raise ValueError(
        f"no vision-tower weights found: expected keys starting with 'visual.' (open_clip) or "
        f"'vision_encoder.' (OpenFlamingo); first keys are {sample}"
    )


class VisionWeightsError(ValueError, RuntimeError):
    """Vision weights that do not fit the encoder: bad input (a ValueError, one line, as the command line
    reports it), and a RuntimeError as it always was for code that catches that."""


def load_open_clip_state_dict(
    module: OpenCLIPVisionTransformer,
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    strict: bool = True,
) -> LoadResult:
    """Load open_clip vision weights into ``module``.

    Accepts a path (``.bin``/``.pt``/``.safetensors``) or a dict: an open_clip state dict (``visual.*``;
    text-tower keys are ignored), an OpenFlamingo one (``vision_encoder.*``), a bare vision dict, any
    of them wrapped in ``{"state_dict": ...}`` and/or with a DDP ``module.`` prefix. Shape mismatches
    always raise; missing/unexpected keys raise when ``strict`` and are returned otherwise.
    """
    where = ""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        where = f"{state_dict_or_path}: "  # errors name the file
        state_dict_or_path = _read_checkpoint(Path(state_dict_or_path))
    try:
        sd = _extract_vision_state_dict(state_dict_or_path)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        def few(items: list[str]) -> str:
            return f"{items[:5]}" + (f" ... ({len(items)} in all)" if len(items) > 5 else "")

        parts = [f"{what}: {few(items)}" for what, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
        raise VisionWeightsError(f"{where}could not load open_clip vision weights (is the model config the one "
                                 f"these weights were trained with?): {'; '.join(parts)}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadResult(missing, unexpected)


def resolve_open_clip_pretrained(
    model_name: str, pretrained: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Path of an open_clip checkpoint: ``pretrained`` is a local file (or a directory holding
    ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``), an ``hf-hub:org/repo`` id, or a
    tag from `OPEN_CLIP_PRETRAINED` (e.g. ``"openai"``) downloaded from the Hugging Face Hub (only
    the local cache with ``local_files_only`` or ``HF_HUB_OFFLINE=1``)."""
    local = Path(pretrained).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (local / name).is_file():
                return local / name
        raise FileNotFoundError(f"no open_clip_model.safetensors or open_clip_pytorch_model.bin in {local}")

    tag = str(pretrained)
    if tag.startswith("hf-hub:"):
        repo_id, filenames = tag.removeprefix("hf-hub:"), ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    else:
        base, _ = _canonical_model_name(model_name)
        key = (base, tag.lower())
        if key not in OPEN_CLIP_PRETRAINED:
            known = sorted(t for m, t in OPEN_CLIP_PRETRAINED if m == base)
            raise ValueError(
                f"{tag!r} is neither an existing file nor a known pretrained tag for {model_name!r} "
                f"(known tags: {known}); pass a local checkpoint path or 'hf-hub:<repo>'"
            )
        repo_id, filename = OPEN_CLIP_PRETRAINED[key]
        filenames = [filename]

    from huggingface_hub import hf_hub_download

    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only))
        except Exception as e:  # offline, missing repo/file, HTTP errors: all get the same advice
            errors.append(f"{filename}: {why_not_fetched(e, local_files_only, cache_dir)}")
    raise OSError(
        f"could not get {' or '.join(filenames)} from the Hugging Face Hub repo {repo_id!r} "
        f"(cache_dir={cache_dir}). Download it where the Hub is reachable (e.g. `hf download {repo_id} "
        f"{filenames[-1]}`: into the Hugging Face cache, or set HF_HOME to one that holds it), or give a local "
        f"checkpoint file in place of {tag!r}.\n" + "\n".join(errors)
    )


# --------------------------------------------------------------------------------------------------
# transformers CLIP / SigLIP
# --------------------------------------------------------------------------------------------------

_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _hf_vision_class(model_type: str) -> type[nn.Module]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel
    raise ValueError(f"HFVisionEncoder supports CLIP and SigLIP vision models, got model_type {model_type!r}")


def _read_preprocessor_config(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> dict | None:
    path = Path(name_or_path) / "preprocessor_config.json"
    if not path.is_file():
        if Path(name_or_path).is_dir():
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(name_or_path), "preprocessor_config.json", cache_dir=cache_dir))
        except Exception:  # optional file: fall back to the model family's defaults
            return None
    return json.loads(path.read_text())


class HFVisionEncoder(VisionEncoder):
    """A transformers ``CLIPVisionModel`` or ``SiglipVisionModel`` producing patch tokens.

    CLIP: ``last_hidden_state[:, 1:]``, the class token dropped and *before* ``post_layernorm`` (what
    OpenFlamingo's released models were trained on) unless ``apply_post_layernorm``.
    SigLIP: ``last_hidden_state`` (no class token; SigLIP applies its ``post_layernorm`` itself).
    """

    def __init__(
        self,
        model: nn.Module,
        apply_post_layernorm: bool = False,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resize_mode: str | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        config = model.config
        self.is_clip = config.model_type == "clip_vision_model"
        if not self.is_clip and config.model_type != "siglip_vision_model":
            raise ValueError(f"expected a CLIP or SigLIP vision model, got model_type {config.model_type!r}")
        self.model = model
        self.apply_post_layernorm = apply_post_layernorm
        self.hidden_size = int(config.hidden_size)
        self.image_size = int(config.image_size)
        default_mean, default_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if self.is_clip else ((0.5,) * 3, (0.5,) * 3)
        self.image_mean = tuple(image_mean or default_mean)
        self.image_std = tuple(image_std or default_std)
        # CLIP processors resize the short side and crop; SigLIP's resize to a square.
        self.resize_mode = resize_mode or ("shortest" if self.is_clip else "squash")
        self.interpolation = interpolation

    @staticmethod
    def _vision_config(config: Any) -> Any:
        return getattr(config, "vision_config", None) or config  # full CLIP/SigLIP config -> vision part

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> HFVisionEncoder:
        """Random weights from a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or a full CLIP/SigLIP config)."""
        config = cls._vision_config(config)
        return cls(_hf_vision_class(config.model_type)(config), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        apply_post_layernorm: bool = False,
        **kwargs: Any,
    ) -> HFVisionEncoder:
        """Load a CLIP/SigLIP vision tower (from a full or vision-only checkpoint); ``kwargs`` go to
        the model's ``from_pretrained`` (``dtype``, ``revision``...). Mean/std/size come from
        ``preprocessor_config.json`` when present."""
        from transformers import AutoConfig

        config = cls._vision_config(AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir))
        model = _hf_vision_class(config.model_type).from_pretrained(name_or_path, cache_dir=cache_dir, **kwargs)
        proc = _read_preprocessor_config(name_or_path, cache_dir) or {}
        size = proc.get("size")
        resize_mode = None
        if isinstance(size, Mapping):
            resize_mode = "shortest" if "shortest_edge" in size else "squash"
        return cls(
            model.eval(),
            apply_post_layernorm=apply_post_layernorm,
            image_mean=proc.get("image_mean"),
            image_std=proc.get("image_std"),
            resize_mode=resize_mode,
            interpolation=_PIL_RESAMPLE_NAMES.get(proc.get("resample", 3), "bicubic"),
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        if not self.is_clip:
            return hidden
        tokens = hidden[:, 1:]
        if self.apply_post_layernorm:
            tokens = getattr(self.model, "vision_model", self.model).post_layernorm(tokens)
        return tokens

    def default_image_processor(self) -> ImageProcessor:
        return ImageProcessor(
            self.image_size, self.image_mean, self.image_std, resize_mode=self.resize_mode,
            interpolation=self.interpolation,
        )
