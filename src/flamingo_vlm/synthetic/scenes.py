"""The scene model and the seeded scene generator.

A :class:`Scene` holds 1-4 coloured shapes (:data:`SHAPES` x :data:`COLORS`), each small or large,
each at its own position (:data:`POSITIONS`), and optionally a word or a number written in a
corner. Its reference captions, VQA questions (10 human-style answers each) and class label
(``"<color> <shape>"``, single-object scenes only) are pure functions of it; its pixels come from
:mod:`flamingo_vlm.synthetic.render` (which this module imports; the renderer never imports it), as
do the drawable shapes, colours, sizes and positions.

A :class:`SceneGenerator` decides everything from a seed: scene ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])``, so any scene can be regenerated alone. Some (shape,
color) pairs are *held out*: they never appear in training splits (:data:`TRAIN_SPLITS`), only in
evaluation splits, to test compositional generalisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .render import COLORS, POSITIONS, SHAPES, SIZES, Style, render_scene, text_layout

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLIT_IDS",
    "TRAIN_SPLITS",
    "Scene",
    "SceneGenerator",
    "SceneObject",
]

# -- vocabulary ---------------------------------------------------------------------------------------
# SHAPES, COLORS (their RGB), SIZES (radius / image side), POSITIONS (anchors): see .render
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "tree", "boat", "moon", "fish", "bird", "car", "home",
                          "3", "7", "12", "25", "42", "88")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
#: Every split's number in the seed of its scenes; changing one changes every scene of that split.
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "pretrain": 3, "class_train": 4, "class_val": 5, "class_test": 6}
TRAIN_SPLITS = frozenset({"train", "pretrain", "class_train"})


# -- the scene model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)  # jitter, as a fraction of the image side

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        """Where the object is drawn: its grid anchor moved by its offset (fractions of the side)."""
        ax, ay = POSITIONS[self.position]
        return ax + self.offset[0], ay + self.offset[1]


@dataclass(frozen=True)
class Scene:
    """One drawable scene; :meth:`render`, :meth:`captions`, :meth:`questions` are pure functions of it."""

    objects: tuple[SceneObject, ...]
    text: str | None = None
    text_corner: str | None = None
    background: tuple[int, int, int] = (245, 245, 245)
    seed: int = 0  # drives the wording of captions and answers

    # -- pixels (drawn by flamingo_vlm.synthetic.render) --------------------------------------------
    def render(self, size: int = 128, style: Style | None = None) -> Image.Image:
        """The scene's pixels; ``style`` (:class:`~flamingo_vlm.synthetic.render.Style`) varies the drawing."""
        return render_scene(self, size, style)

    def text_box(self, size: int = 128) -> tuple[int, int, int, int] | None:
        """Pixel box (left, top, right, bottom) of the written word in :meth:`render` at ``size``."""
        return text_layout(self, size)[2] if self.text else None

    # -- language -----------------------------------------------------------------------------------
    def _rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def describe(self, obj: SceneObject, *, with_size: bool = True, with_position: bool = True) -> str:
        words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
        phrase = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
        return f"{phrase} {POSITION_PHRASES[obj.position]}" if with_position else phrase

    def captions(self, n: int = 5) -> list[str]:
        """``n`` reference captions (different wordings and object orders of the same content)."""
        rng = self._rng(1)
        count = len(self.objects)
        out = []
        for v in range(n):
            order = [self.objects[i] for i in rng.permutation(count)]
            kind = v % 5
            parts = [self.describe(o, with_size=kind != 3, with_position=kind != 2 or count == 1) for o in order]
            listing = parts[0] if count == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            shapes_word = "shape" if count == 1 else "shapes"
            if kind == 0:
                cap = listing
            elif kind == 1:
                cap = f"an image of {listing}"
            elif kind == 2:
                cap = f"a picture with {NUMBER_WORDS[count]} {shapes_word}: {listing}"
            elif kind == 3:
                cap = f"there is {listing}"
            else:
                cap = f"{NUMBER_WORDS[count]} {shapes_word} on a plain background: {listing}"
            if self.text:
                what = "number" if self.text.isdigit() else "word"
                cap += f", with the {what} {self.text} in the {self.text_corner} corner"
            out.append(cap + ".")
        return out

    def caption(self) -> str:
        return self.captions(1)[0]

    def questions(self, max_questions: int | None = None) -> list[dict]:
        """VQA questions about the scene: ``{"question", "answers" (10), "answer",
        "question_type", "answer_type"}``; answers are mostly the canonical one with a few
        human-like variants."""
        rng = self._rng(2)
        objs = self.objects
        shapes = [o.shape for o in objs]
        colors = [o.color for o in objs]
        qs: list[tuple[str, str, str, str, list[str]]] = []  # question, answer, qtype, atype, variants
        for o in objs:
            if shapes.count(o.shape) == 1:
                qs.append((f"What color is the {o.shape}?", o.color, "what color is the", "other",
                           [f"dark {o.color}", f"light {o.color}"]))
            if colors.count(o.color) == 1:
                variants = {"circle": ["round", "oval"], "square": ["rectangle", "box"]}.get(o.shape, [])
                qs.append((f"What shape is the {o.color} object?", o.shape, "what shape is the", "other", variants))
            if shapes.count(o.shape) == 1 and colors.count(o.color) == 1:
                pos = o.position
                qs.append((f"Where is the {o.color} {o.shape}?", pos, "where is the", "other",
                           [POSITION_PHRASES[pos], f"{pos} side" if pos in ("left", "right") else pos]))
        qs.append(("How many shapes are there?", str(len(objs)), "how many", "number", []))
        for shape in sorted(set(shapes)):
            qs.append((f"How many {shape}s are there?", str(shapes.count(shape)), "how many", "number", []))
        present = {(o.shape, o.color) for o in objs}
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        qs.append((f"Is there a {color} {shape}?", "yes" if (shape, color) in present else "no", "is there a", "yes/no", []))
        if self.text:
            what = "number" if self.text.isdigit() else "word"
            qs.append((f"What {what} is written in the image?", self.text, f"what {what} is", "other", []))
        if max_questions is not None and len(qs) > max_questions:
            keep = sorted(rng.choice(len(qs), max_questions, replace=False).tolist())
            qs = [qs[i] for i in keep]
        out = []
        for question, answer, qtype, atype, variants in qs:
            answers = [answer] * 10
            if variants:
                for slot in rng.choice(10, int(rng.integers(0, 3)), replace=False):
                    answers[int(slot)] = variants[int(rng.integers(len(variants)))]
            out.append({"question": question, "answer": answer, "answers": answers,
                        "question_type": qtype, "answer_type": atype})
        return out

    @property
    def label(self) -> str:
        """The class of a single-object scene: ``"<color> <shape>"``."""
        if len(self.objects) != 1:
            raise ValueError("only single-object scenes have a class label")
        return self.objects[0].name

    def to_dict(self) -> dict:
        return asdict(self)


# -- the generator ------------------------------------------------------------------------------------
@dataclass
class SceneGenerator:
    """Deterministic scenes: ``scene(i, split)`` depends only on (seed, split, i) and the settings.

    ``held_out``: (shape, color) pairs kept out of training splits (``train``, ``pretrain``,
    ``class_train``); by default ``n_held_out`` pairs chosen by the seed. Evaluation splits show a
    held-out pair in about ``held_out_rate`` of their scenes.
    """

    seed: int = 0
    shapes: Sequence[str] = SHAPES
    colors: Sequence[str] = tuple(COLORS)
    max_objects: int = 4
    text_rate: float = 0.5
    words: Sequence[str] = WORDS
    n_held_out: int = 4
    held_out: frozenset[tuple[str, str]] | None = None
    held_out_rate: float = 0.3
    _held: frozenset = field(init=False, repr=False)

    def __post_init__(self):
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colors) - set(COLORS))
        if unknown:
            raise ValueError(f"unknown shapes/colors {sorted(unknown)}")
        if not 1 <= self.max_objects <= len(POSITIONS) - 1:
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS) - 1}")
        pairs = list(itertools.product(self.shapes, self.colors))
        if self.held_out is None:
            rng = np.random.default_rng([self.seed, 999])
            picks = rng.choice(len(pairs), min(self.n_held_out, len(pairs) - 1), replace=False)
            self._held = frozenset(pairs[i] for i in sorted(picks))
        else:
            self._held = frozenset(tuple(p) for p in self.held_out)
        if len(self._held) >= len(pairs):
            raise ValueError("every (shape, color) pair is held out: nothing left to train on")

    @property
    def held_out_pairs(self) -> frozenset[tuple[str, str]]:
        return self._held

    def classes(self) -> list[str]:
        """Class names ``"<color> <shape>"`` in a fixed order (shape-major)."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        return np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])

    def _pair(self, rng, split: str, force_held: bool) -> tuple[str, str]:
        if force_held:
            held = sorted(self._held)
            return held[int(rng.integers(len(held)))]
        while True:
            pair = (self.shapes[int(rng.integers(len(self.shapes)))], self.colors[int(rng.integers(len(self.colors)))])
            if split not in TRAIN_SPLITS or pair not in self._held:
                return pair

    def _object(self, rng, shape, color, position) -> SceneObject:
        size = ("small", "large")[int(rng.integers(2))]
        offset = tuple(float(x) for x in np.round(rng.uniform(-0.02, 0.02, 2), 4))
        return SceneObject(shape, color, size, position, offset)

    def _finish(self, rng, objects, split, index) -> Scene:
        text = corner = None
        if rng.random() < self.text_rate and self.words:
            text = self.words[int(rng.integers(len(self.words)))]
            corner = CORNERS[int(rng.integers(len(CORNERS)))]
        return self._scene(rng, objects, text, corner)

    def _scene(self, rng, objects, text=None, corner=None) -> Scene:
        """The scene of ``objects`` on a random near-white background."""
        base = int(rng.integers(228, 252))
        background = tuple(int(base + t) for t in rng.integers(-4, 5, 3))
        return Scene(tuple(objects), text, corner, background, seed=int(rng.integers(2**31)))

    def scene(self, index: int, split: str = "train") -> Scene:
        """A scene of 1..max_objects objects at distinct positions."""
        rng = self._rng(split, index)
        n = int(rng.integers(1, self.max_objects + 1))
        positions = [list(POSITIONS)[i] for i in rng.choice(len(POSITIONS), n, replace=False)]
        force = split not in TRAIN_SPLITS and rng.random() < self.held_out_rate
        objects = []
        for k, pos in enumerate(positions):
            shape, color = self._pair(rng, split, force and k == 0)
            objects.append(self._object(rng, shape, color, pos))
        return self._finish(rng, objects, split, index)

    def class_scene(self, index: int, split: str = "class_train", label: str | None = None) -> Scene:
        """A single-object scene whose label is ``label`` (``"<color> <shape>"``), or drawn at random
        (held-out classes only outside training splits)."""
        rng = self._rng(split, index)
        if label is None:
            shape, color = self._pair(rng, split, split not in TRAIN_SPLITS and rng.random() < self.held_out_rate)
        else:
            color, shape = label.split(" ", 1)
            if split in TRAIN_SPLITS and (shape, color) in self._held:
                raise ValueError(f"{label!r} is held out of training splits")
        pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        return self._finish(rng, [self._object(rng, shape, color, pos)], split, index)

    def is_held_out(self, scene: Scene) -> bool:
        return any((o.shape, o.color) in self._held for o in scene.objects)
