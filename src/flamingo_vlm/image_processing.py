"""Image preprocessing for the vision encoders, without torchvision.

`ImageProcessor` reproduces open_clip's default eval transform (torchvision ``Resize`` of the short
side on a PIL image, ``CenterCrop``, RGB conversion, ``ToTensor``, ``Normalize``) with PIL + numpy
only, so that pixel values match what OpenFlamingo fed its models.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_RESIZE_MODES = ("shortest", "squash")
# Past this long/short side ratio, "shortest" resamples only the centre crop (see _resize_crop).
_MAX_ASPECT = 64

ImageInput = Image.Image | np.ndarray | str | os.PathLike


def _to_pil(image: Any) -> Image.Image:
    """Turn a supported input into an RGB PIL image, or raise a TypeError/ValueError saying why not."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()  # decode now: the file handle closes on leaving the block
                return im.convert("RGB")
        except UnidentifiedImageError as e:
            raise ValueError(f"not a readable image file: {path}") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # handles L, LA, P, RGBA, CMYK, I;16 ... like open_clip does
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (HWC or HW), got dtype {image.dtype} and shape {image.shape}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            return Image.fromarray(image, mode="L").convert("RGB")
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
        raise ValueError(
            f"numpy images must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    raise TypeError(
        f"unsupported image type {type(image).__name__}: expected a PIL.Image, a uint8 numpy array or a path"
    )


class ImageProcessor:
    """Resize, centre-crop, convert to RGB and normalise images into ``(3, S, S)`` float32 tensors.

    ``resize_mode="shortest"`` (open_clip's default): the short side becomes ``image_size`` (the long
    side ``int(image_size * long / short)``, as torchvision computes it), then a centre crop.
    ``resize_mode="squash"``: resize straight to ``image_size x image_size`` (aspect ratio lost).
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {interpolation!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std!r}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_mode = resize_mode
        self.interpolation = interpolation

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        size, resample = self.image_size, _RESAMPLE[self.interpolation]
        if 0 in image.size:  # (a ZeroDivisionError from the scale below)
            raise ValueError(f"an image of {image.size[0]} x {image.size[1]} pixels has nothing to show; "
                             "give an image at least 1 x 1")
        if self.resize_mode == "squash":
            return image.resize((size, size), resample=resample)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # torchvision truncates, it does not round
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        # torchvision's CenterCrop rounds the offsets: top = int(round((h - size) / 2)).
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        if new_long > _MAX_ASPECT * size:
            # (Deviation from open_clip.) An extreme aspect ratio: resizing the whole image first would
            # make it new_long x size pixels (a 1 x 20,000 PNG of a few hundred bytes: 224 x 4.5M,
            # 3.7 GB and 11 s; 1 x 25M, within any pixel limit, terabytes), so only the part the crop
            # keeps is resampled, at the same scale (PIL's box: its pixels differ a little from the
            # whole image's, which is why ordinary images keep open_clip's exact path).
            sx, sy = w / new_w, h / new_h
            return image.resize((size, size), resample=resample,
                                box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=resample)
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: ImageInput) -> torch.Tensor:
        pixels = np.asarray(self._resize_crop(_to_pil(image)), dtype=np.float32) / 255.0  # (S, S, 3)
        x = torch.from_numpy(pixels).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def preprocess_batch(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """Preprocess several images into one ``(N, 3, S, S)`` tensor."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            raise TypeError("preprocess_batch expects a sequence of images; call the processor for one image")
        tensors = [self(im) for im in images]
        if not tensors:
            raise ValueError("preprocess_batch got no images")
        return torch.stack(tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        unknown = set(config) - {"image_size", "mean", "std", "resize_mode", "interpolation"}
        if unknown:
            raise ValueError(f"unknown ImageProcessor config keys: {sorted(unknown)}")
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageProcessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({args})"
