"""Drawing scenes with PIL: what can be drawn (shapes, colours, sizes, positions) and how.

This module sits below :mod:`~flamingo_vlm.synthetic.scenes` (which imports its tables and calls
:func:`render_scene` from :meth:`Scene.render`) and never imports it: a scene is read by its
attributes (``objects`` with ``shape``/``color``/``size``/``position``/``offset``, ``text``,
``text_corner``, ``background``, ``seed``).

Without a :class:`Style` a scene is drawn as it always was: filled polygons/ellipses on the scene's
background, the written word in PIL's default font in the scene's corner. A :class:`Style` varies
the drawing (outlines, textured fills, textured backgrounds, blur, a size factor) for the
in-context episodes of :mod:`~flamingo_vlm.synthetic.icl`; the colour of a shape stays its ink, so
every question about the scene keeps its answer. Pixels are reproducible for a given Pillow
version (Pillow < 10.1 has only a bitmap default font, so its text looks different).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["BACKGROUNDS", "COLORS", "FILLS", "POSITIONS", "SHAPES", "SIZES", "Style", "render_scene", "text_layout"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
SIZES: dict[str, float] = {"small": 0.075, "large": 0.13}  # radius / image side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5),
}
#: How a shape's inside is drawn (its ink is always the shape's colour).
FILLS: tuple[str, ...] = ("solid", "outline", "striped", "dotted", "hatched", "checked")
#: What is behind the shapes (light and colourless, so a colour question keeps one answer).
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "lines", "checker", "paper")


@dataclass(frozen=True)
class Style:
    """How to draw a scene: ``fill`` (:data:`FILLS`), ``background`` (:data:`BACKGROUNDS`), a dark
    ``outline`` width in pixels at 128 px (0: none), Gaussian ``blur`` radius in pixels at 128 px,
    and ``scale``, a factor on every shape's radius."""

    fill: str = "solid"
    background: str = "plain"
    outline: int = 0
    blur: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if not 0.3 <= self.scale <= 2.0 or self.outline < 0 or self.blur < 0:
            raise ValueError(f"style needs 0.3 <= scale <= 2, outline >= 0, blur >= 0; got {self}")


def render_scene(scene, size: int = 128, style: Style | None = None) -> Image.Image:
    """The ``size`` x ``size`` RGB image of ``scene`` (what :meth:`Scene.render` returns)."""
    if style is None:
        im = Image.new("RGB", (size, size), scene.background)
        draw = ImageDraw.Draw(im)
        for obj in scene.objects:
            cx, cy, r = _geometry(obj, size, 1.0)
            _draw_shape(draw, obj.shape, cx, cy, r, fill=COLORS[obj.color])
    else:
        im = _styled(scene, size, style)
    if scene.text:
        font, origin, _ = text_layout(scene, size)
        ImageDraw.Draw(im).text(origin, scene.text, fill=(0, 0, 0), font=font)
    return im


def text_layout(scene, size: int):
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


def _geometry(obj, size: int, scale: float) -> tuple[float, float, float]:
    ax, ay = POSITIONS[obj.position]
    return (ax + obj.offset[0]) * size, (ay + obj.offset[1]) * size, SIZES[obj.size] * size * scale


# -- styled drawing -----------------------------------------------------------------------------------
def _styled(scene, size: int, style: Style) -> Image.Image:
    rng = np.random.default_rng([int(scene.seed), 5151])
    canvas = _background(np.asarray(scene.background, dtype=np.float32), size, style.background, rng)
    unit = size / 128.0
    pattern = _pattern(size, style.fill)
    for obj in scene.objects:
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        cx, cy, r = _geometry(obj, size, style.scale)
        inside = _mask(obj.shape, cx, cy, r, size, width=0)
        if style.fill == "outline":
            ink = _mask(obj.shape, cx, cy, r, size, width=max(2, round(3 * unit)))
            canvas[ink] = color
        else:
            tint = 0.45 * color + 0.55 * 255.0  # the pattern's gaps: a light tint of the same colour
            canvas[inside] = tint
            canvas[inside & pattern] = color
        if style.outline:
            canvas[_mask(obj.shape, cx, cy, r, size, width=max(1, round(style.outline * unit)))] = 30.0
    im = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    if style.blur:
        im = im.filter(ImageFilter.GaussianBlur(style.blur * unit))
    return im


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy, xx


@functools.lru_cache(maxsize=32)
def _pattern(size: int, fill: str) -> np.ndarray:
    """Where a textured fill puts the full colour (elsewhere inside the shape: a light tint)."""
    yy, xx = _grid(size)
    unit = size / 128.0

    def step(px: float) -> int:
        return max(2, round(px * unit))

    if fill == "solid":
        return np.ones((size, size), bool)
    if fill == "outline":
        return np.zeros((size, size), bool)
    if fill == "striped":
        return (yy // step(3)) % 2 == 0
    if fill == "dotted":
        return ((yy % (step(3) + 2)) < step(3)) & ((xx % (step(3) + 2)) < step(3))
    if fill == "hatched":
        return ((xx + yy) // step(3)) % 2 == 0
    return ((xx // step(4)) + (yy // step(4))) % 2 == 0  # checked


def _background(base: np.ndarray, size: int, kind: str, rng) -> np.ndarray:
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = base
    yy, xx = _grid(size)
    if kind == "gradient":
        t = (yy / max(size - 1, 1))[..., None]
        canvas = canvas * (1 - 0.22 * t)
    elif kind == "noise":
        canvas = canvas + rng.normal(0, 9, (size, size, 1)).astype(np.float32)
    elif kind == "lines":
        canvas[(yy % max(4, size // 16)) == 0] -= 45
    elif kind == "checker":
        cell = max(4, size // 8)
        canvas = canvas - 22 * ((((xx // cell) + (yy // cell)) % 2) == 0)[..., None]
    elif kind == "paper":
        grain = rng.normal(0, 1, (size // 4 + 1, size // 4 + 1)).repeat(4, 0).repeat(4, 1)[:size, :size]
        canvas = canvas * np.asarray([1.0, 0.97, 0.9], np.float32) + 6 * grain[..., None]
    return np.asarray(canvas, dtype=np.float32)


def _mask(shape: str, cx: float, cy: float, r: float, size: int, width: int) -> np.ndarray:
    """Where ``shape`` is: its inside (``width=0``) or an outline ``width`` pixels wide."""
    m = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(m)
    if width:
        _draw_shape(draw, shape, cx, cy, r, outline=255, width=width)
    else:
        _draw_shape(draw, shape, cx, cy, r, fill=255)
    return np.asarray(m) > 127


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill=None, outline=None,
                width: int = 1) -> None:
    kw = {"fill": fill} if outline is None else {"fill": fill, "outline": outline, "width": width}
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], **kw)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], **kw)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], **kw)
    elif shape == "hexagon":
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3], **kw)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        draw.polygon(pts, **kw)
    else:
        raise ValueError(f"unknown shape {shape!r}")
