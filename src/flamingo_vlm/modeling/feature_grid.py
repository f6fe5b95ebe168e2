"""`FeatureGridEncoder`: any backbone that returns a feature grid ``(N, D, h, w)`` or tokens ``(N, T, D)``,
as a vision encoder for the perceiver (the built-in model's EfficientNet-Lite0), with the optional
fixed position and colour codes it adds. The other encoders are in :mod:`.vision`."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..image_processing import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor
from .config import COLOR_MODES
from .vision import VisionEncoder

__all__ = ["FeatureGridEncoder"]


# --------------------------------------------------------------------------------------------------
# Any backbone
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _color_projection(n_in: int, hidden_size: int) -> Tensor:
    """The colour code's fixed random ``(n_in, hidden_size)`` projection: the same on every machine (a
    seeded CPU generator) and always fp32. Not a parameter or buffer, so neither saving nor
    ``.to(dtype)`` touches it (a bf16 copy would code colours differently from the fp32 model it was
    trained as). Cached, never written to: a constant of the settings."""
    gen = torch.Generator().manual_seed(20261123)
    return torch.randn(n_in, hidden_size, generator=gen) / n_in**0.5


class FeatureGridEncoder(VisionEncoder):
    """Wrap a backbone (or its method ``method``, e.g. ``"extract_features"``) mapping ``(N, C, H, W)``
    to a feature grid ``(N, D, h, w)`` (flattened row-major to ``(N, h*w, D)``) or to tokens ``(N, T, D)``
    (returned as they are). Outputs with a ``last_hidden_state`` attribute are unwrapped.

    Two fixed codes (no parameters) can be added to a grid's tokens: ``position_encoding``, where the
    cell is (the perceiver is blind to token order), and ``color_encoding``, the cell's colours
    (:meth:`grid_color_code`), for backbones whose deep features are nearly colour-blind, as
    ImageNet CNNs trained with colour augmentation are. ``color_encoding`` is ``"add"`` (``True``):
    the code is summed into each cell's feature token, ``"tokens"``: each cell's code becomes a
    token of its own (with the cell's position code), appended after the grid's ``h*w`` tokens, or
    ``"both"``: summed and appended. The perceiver layer-normalises every token, so a code of its own
    reaches it at full scale; a summed one travels with the cell's features, so a latent that
    attends to an object's features gets its colour with them (which object has which colour)."""

    #: Sub-cells per grid cell side whose mean RGB the colour code carries, and the sine/cosine
    #: frequencies (times pi) that turn each value into features a linear layer can separate.
    COLOR_SUBCELLS = 2
    COLOR_FREQS = (1.0, 2.0, 4.0)
    COLOR_MODES = COLOR_MODES  # where the colour code goes (see .config)

    def __init__(
        self,
        module: nn.Module | Callable[[Tensor], Any],
        hidden_size: int,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        method: str | None = None,
        position_encoding: bool = False,
        position_scale: float = 0.25,
        color_encoding: bool | str = False,
        color_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if method is not None and not callable(getattr(module, method, None)):
            raise ValueError(f"{type(module).__name__} has no callable attribute {method!r}")
        if method is None and not callable(module):
            raise TypeError(f"module must be callable, got {type(module).__name__}")
        self.module = module  # registered as a submodule when it is an nn.Module (moves with .to())
        self.method = method
        self.hidden_size, self.image_size = int(hidden_size), int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        if position_encoding and self.hidden_size % 4:
            raise ValueError(f"position_encoding needs hidden_size divisible by 4, got {self.hidden_size}")
        self.position_encoding, self.position_scale = bool(position_encoding), float(position_scale)
        self.color_encoding = self._color_mode(color_encoding)
        self.color_scale = float(color_scale)

    @classmethod
    def _color_mode(cls, value: bool | str | None) -> str | None:
        if value is True:
            return "add"
        if value in (False, None):
            return None
        if value not in cls.COLOR_MODES:
            raise ValueError(f"color_encoding must be one of False, True, {', '.join(map(repr, cls.COLOR_MODES))}; got {value!r}")
        return value

    def grid_position_code(self, h: int, w: int, device=None, dtype=None) -> Tensor:
        """A fixed 2-D sine-cosine code, ``(h*w, hidden_size)``: half the channels encode the row,
        half the column (the perceiver itself does not know where a token came from)."""
        quarter = self.hidden_size // 4
        freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
        rows = torch.arange(h, dtype=torch.float64)[:, None] * freqs
        cols = torch.arange(w, dtype=torch.float64)[:, None] * freqs
        row_code = torch.cat([rows.sin(), rows.cos()], -1)[:, None, :].expand(h, w, 2 * quarter)
        col_code = torch.cat([cols.sin(), cols.cos()], -1)[None, :, :].expand(h, w, 2 * quarter)
        code = torch.cat([row_code, col_code], -1).reshape(h * w, self.hidden_size) * self.position_scale
        return code.to(device=device, dtype=dtype)

    def grid_color_code(self, pixel_values: Tensor, h: int, w: int) -> Tensor:
        """``(N, h*w, hidden_size)``: each cell's colours as the mean RGB (0..1) of its
        ``COLOR_SUBCELLS``^2 sub-cells, through sines and cosines and the fixed projection."""
        mean = torch.tensor(self.mean, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
        rgb = (pixel_values.float() * std + mean).clamp(0, 1)
        k = self.COLOR_SUBCELLS
        sub = F.adaptive_avg_pool2d(rgb, (h * k, w * k))  # (N, 3, h*k, w*k)
        n = sub.shape[0]
        cells = sub.view(n, 3, h, k, w, k).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, 3 * k * k)
        freqs = torch.tensor(self.COLOR_FREQS, device=cells.device) * math.pi
        angles = cells[..., None] * freqs  # (N, h*w, 3k^2, n_freqs)
        feats = torch.cat([angles.sin(), angles.cos()], -1).flatten(2)
        return (feats @ _color_projection(feats.shape[-1], self.hidden_size).to(feats.device)) * self.color_scale

    def forward(self, pixel_values: Tensor) -> Tensor:
        fn = getattr(self.module, self.method) if self.method else self.module
        out = fn(pixel_values)
        out = getattr(out, "last_hidden_state", out)
        if not isinstance(out, Tensor):
            raise TypeError(f"backbone returned {type(out).__name__}, expected a Tensor")
        if out.dim() == 4:
            if out.shape[1] != self.hidden_size:
                raise ValueError(f"grid {tuple(out.shape)} should be (N, {self.hidden_size}, h, w)")
            tokens = out.flatten(2).transpose(1, 2)
            pos = self.grid_position_code(*out.shape[2:], device=out.device, dtype=out.dtype) if self.position_encoding else 0
            tokens = tokens + pos
            if self.color_encoding:
                colors = self.grid_color_code(pixel_values, *out.shape[2:]).to(tokens.dtype)
                # "add": into the feature tokens (which carry the position code already); "tokens":
                # tokens of their own after the grid's, each with its cell's position code; "both"
                summed = tokens + colors if self.color_encoding in ("add", "both") else tokens
                tokens = summed if self.color_encoding == "add" else torch.cat([summed, colors + pos], dim=1)
            return tokens
        if out.dim() == 3 and out.shape[-1] == self.hidden_size:
            if self.color_encoding:
                raise ValueError("color_encoding needs a backbone that returns a feature grid (N, D, h, w)")
            return out
        raise ValueError(
            f"backbone output {tuple(out.shape)} is neither (N, {self.hidden_size}, h, w) "
            f"nor (N, T, {self.hidden_size})"
        )

    def default_image_processor(self) -> ImageProcessor:
        return ImageProcessor(self.image_size, self.mean, self.std)
