"""Drawing a :class:`~flamingo_vlm.synthetic.scenes.Scene` with PIL.

The shapes are filled polygons/ellipses on the scene's background; the written word uses PIL's
default font in the scene's corner. Pixels are reproducible for a given Pillow version (Pillow
< 10.1 has only a bitmap default font, so its text looks different).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scenes import COLORS, POSITIONS, SIZES, Scene

__all__ = ["render_scene", "text_layout"]


def render_scene(scene: Scene, size: int = 128) -> Image.Image:
    """The ``size`` x ``size`` RGB image of ``scene`` (what :meth:`Scene.render` returns)."""
    im = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(im)
    for obj in scene.objects:
        ax, ay = POSITIONS[obj.position]
        cx, cy = (ax + obj.offset[0]) * size, (ay + obj.offset[1]) * size
        _draw_shape(draw, obj.shape, cx, cy, SIZES[obj.size] * size, COLORS[obj.color])
    if scene.text:
        font, origin, _ = text_layout(scene, size)
        draw.text(origin, scene.text, fill=(0, 0, 0), font=font)
    return im


def text_layout(scene: Scene, size: int):
    """The font, the origin to draw the scene's word from, and its ink box, in the scene's corner."""
    font = _font(max(9, size // 9))
    left, top, right, bottom = font.getbbox(scene.text)
    w, h = right - left, bottom - top
    margin = max(2, size // 40)
    x = margin if "left" in scene.text_corner else size - w - margin
    y = margin if "top" in scene.text_corner else size - h - margin
    return font, (x - left, y - top), (x, y, x + w, y + h)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "hexagon":
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
