"""The server's settings (the ``flamingo-vlm serve`` options that reach the app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .images import ImageLimits


@dataclass
class ServeConfig:
    """Server settings (the ``flamingo-vlm serve`` options)."""

    model_name: str = "flamingo"
    image_dir: Path | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    max_images: int = 8
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_request_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 300.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    default_max_tokens: int = 64
    max_score_candidates: int = 64
    extra_model_names: list[str] = field(default_factory=list)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
            image_dir=Path(self.image_dir) if self.image_dir else None,
            allow_remote=self.allow_remote_images, remote_timeout=self.remote_timeout,
        )
