"""Procedurally drawn scenes: a benchmark and training data that need no download.

A scene holds 1-4 coloured shapes (circle, square, triangle, star, diamond, hexagon), each small or
large, each at its own position (left, right, top, bottom, center), and optionally a word or a
number written in a corner with PIL's default font. A seed decides everything: scene ``i`` of
split ``s`` of generator ``seed`` is drawn from ``numpy.random.default_rng([seed, s, i])``, so any
scene can be regenerated alone (pixels are reproducible for a given Pillow version).

From scenes come reference captions, VQA questions with 10 human-style answers, and a class label
(``"<color> <shape>"`` for single-object scenes). Some (shape, color) combinations are *held out*:
they never appear in training splits, only in evaluation splits, to test compositional
generalisation.

Writers:

* :func:`write_synthetic_benchmark` writes captioning (COCO Karpathy layout, optionally Flickr30K),
  VQA (VQAv2 layout) and classification (ImageNet class-folder layout) datasets that the ordinary
  loaders of :mod:`flamingo_vlm.eval.datasets` read, so ``flamingo-vlm evaluate --data-root DIR``
  runs on them unchanged.
* :func:`write_training_shards` writes webdataset training shards (image-text pairs and
  interleaved few-shot documents) through :func:`flamingo_vlm.data.custom.write_shards`.

Command line: ``python -m flamingo_vlm.eval.synthetic benchmark OUT`` /
``python -m flamingo_vlm.eval.synthetic shards OUT``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "SceneGenerator",
    "SceneObject",
    "write_synthetic_benchmark",
    "write_training_shards",
    "write_episode_shards",
    "binding_episode",
    "episode_items",
    "NONCE_NAMES_TRAIN",
    "NONCE_NAMES_EVAL",
]

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
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "tree", "boat", "moon", "fish", "bird", "car", "home",
                          "3", "7", "12", "25", "42", "88")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "pretrain": 3, "class_train": 4, "class_val": 5, "class_test": 6}
TRAIN_SPLITS = frozenset({"train", "pretrain", "class_train"})


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


@dataclass(frozen=True)
class Scene:
    """One drawable scene; :meth:`render`, :meth:`captions`, :meth:`questions` are pure functions of it."""

    objects: tuple[SceneObject, ...]
    text: str | None = None
    text_corner: str | None = None
    background: tuple[int, int, int] = (245, 245, 245)
    seed: int = 0  # drives the wording of captions and answers

    # -- pixels -------------------------------------------------------------------------------------
    def render(self, size: int = 128) -> Image.Image:
        im = Image.new("RGB", (size, size), self.background)
        draw = ImageDraw.Draw(im)
        for obj in self.objects:
            ax, ay = POSITIONS[obj.position]
            cx, cy = (ax + obj.offset[0]) * size, (ay + obj.offset[1]) * size
            _draw_shape(draw, obj.shape, cx, cy, SIZES[obj.size] * size, COLORS[obj.color])
        if self.text:
            font, origin, _ = self._text_layout(size)
            draw.text(origin, self.text, fill=(0, 0, 0), font=font)
        return im

    def text_box(self, size: int = 128) -> tuple[int, int, int, int] | None:
        """Pixel box (left, top, right, bottom) of the written word in :meth:`render` at ``size``."""
        return self._text_layout(size)[2] if self.text else None

    def _text_layout(self, size: int):
        """The font, the origin to draw the word from, and its ink box, in the scene's corner."""
        font = _font(max(9, size // 9))
        left, top, right, bottom = font.getbbox(self.text)
        w, h = right - left, bottom - top
        margin = max(2, size // 40)
        x = margin if "left" in self.text_corner else size - w - margin
        y = margin if "top" in self.text_corner else size - h - margin
        return font, (x - left, y - top), (x, y, x + w, y + h)

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


# -- benchmark writer --------------------------------------------------------------------------------
BENCHMARK_TASKS = ("coco", "flickr30k", "vqav2", "imagenet")


def _save(im: Image.Image, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=quality, subsampling=0)
    else:
        im.save(path)


def write_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    tasks: Sequence[str] = ("coco", "vqav2", "imagenet"),
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    n_class_train_per_class: int = 8,
    n_class_val_per_class: int = 4,
    questions_per_image: int = 3,
    image_size: int = 128,
    jpeg_quality: int = 95,
    generator: SceneGenerator | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic benchmark under ``root`` in the standard layouts; returns
    ``{task: folder}``. ``root/synthetic.json`` records the settings and the held-out pairs, and
    each task folder a ``held_out.json`` listing the evaluation ids that show a held-out pair."""
    root = Path(root)
    gen = generator or SceneGenerator(seed=seed)
    bad = set(tasks) - set(BENCHMARK_TASKS)
    if bad:
        raise ValueError(f"synthetic tasks must be among {BENCHMARK_TASKS}, got {sorted(bad)}")
    out: dict[str, Path] = {}
    folders = {"coco": "mscoco_karpathy", "flickr30k": "flickr30k", "vqav2": "vqav2", "imagenet": "imagenet"}
    for task in tasks:
        folder = root / folders[task]
        if folder.exists():
            if not overwrite:
                raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if task in ("coco", "flickr30k"):
            _write_captioning(folder, gen, task, n_train, n_val, n_test, image_size, jpeg_quality)
        elif task == "vqav2":
            _write_vqa(folder, gen, n_train, n_val + n_test, questions_per_image, image_size, jpeg_quality)
        else:
            _write_classification(folder, gen, n_class_train_per_class, n_class_val_per_class, image_size, jpeg_quality)
        out[task] = folder
    meta = {
        "generator": "flamingo_vlm.eval.synthetic", "version": 1, "seed": gen.seed, "image_size": image_size,
        "held_out_pairs": sorted([list(p) for p in gen.held_out_pairs]), "tasks": {t: str(p) for t, p in out.items()},
        "sizes": {"n_train": n_train, "n_val": n_val, "n_test": n_test,
                  "n_class_train_per_class": n_class_train_per_class, "n_class_val_per_class": n_class_val_per_class},
    }
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return out


def _caption_entry(gen, scene, split, index, cocoid, filepath, filename, sent_start):
    sentences = scene.captions(5)
    return {
        "filepath": filepath, "filename": filename, "imgid": index, "split": split, "cocoid": cocoid,
        "sentids": list(range(sent_start, sent_start + len(sentences))),
        "sentences": [{"tokens": s.rstrip(".").replace(",", "").replace(":", "").split(), "raw": s, "imgid": index,
                       "sentid": sent_start + j} for j, s in enumerate(sentences)],
    }


def _write_captioning(folder: Path, gen: SceneGenerator, task: str, n_train, n_val, n_test, size, quality):
    images, held, sent = [], [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            scene = gen.scene(i, split)
            index = len(images)
            if task == "coco":
                coco_split = "train2014" if split == "train" else "val2014"
                cocoid = 1 + SPLIT_IDS[split] * 1_000_000 + i
                filename = f"COCO_{coco_split}_{cocoid:012d}.jpg"
                _save(scene.render(size), folder / coco_split / filename, quality)
                entry = _caption_entry(gen, scene, split, index, cocoid, coco_split, filename, sent)
            else:
                filename = f"{1_000_000 * (1 + SPLIT_IDS[split]) + i}.jpg"
                _save(scene.render(size), folder / "flickr30k-images" / filename, quality)
                entry = _caption_entry(gen, scene, split, index, None, None, filename, sent)
                del entry["cocoid"], entry["filepath"]
            sent += len(entry["sentences"])
            images.append(entry)
            if split != "train" and gen.is_held_out(scene):
                held.append(entry.get("cocoid", Path(filename).stem))
    name = "dataset_coco.json" if task == "coco" else "dataset_flickr30k.json"
    (folder / name).write_text(json.dumps({"images": images, "dataset": task}))
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))


def _write_vqa(folder: Path, gen: SceneGenerator, n_train, n_eval, per_image, size, quality):
    held = []
    for vqa_split, scene_split, n in (("train", "train", n_train), ("val", "test", n_eval)):
        coco_split = f"{vqa_split}2014"
        questions, annotations = [], []
        for i in range(n):
            scene = gen.scene(i, scene_split)
            image_id = 1 + SPLIT_IDS[scene_split] * 1_000_000 + i
            _save(scene.render(size), folder / coco_split / f"COCO_{coco_split}_{image_id:012d}.jpg", quality)
            for j, q in enumerate(scene.questions(per_image)):
                qid = image_id * 10 + j
                questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": q["question_type"],
                    "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(q["answers"])],
                })
                if vqa_split == "val" and gen.is_held_out(scene):
                    held.append(qid)
        common = {"info": {"description": "flamingo-vlm synthetic VQA"}, "license": {}, "data_subtype": coco_split}
        (folder / f"v2_OpenEnded_mscoco_{coco_split}_questions.json").write_text(json.dumps(
            {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
        (folder / f"v2_mscoco_{coco_split}_annotations.json").write_text(json.dumps(
            {**common, "data_type": "mscoco", "annotations": annotations}))
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))


def _write_classification(folder: Path, gen: SceneGenerator, per_class_train, per_class_val, size, quality):
    classes = gen.classes()
    wnids = {name: f"n{90000000 + k:08d}" for k, name in enumerate(classes)}
    (folder / "classnames.txt").write_text("".join(f"{wnids[c]} {c}\n" for c in classes))
    held = []
    counter = 0
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        scene_split = "class_train" if split == "train" else "class_val"
        for name in classes:
            color, shape = name.split(" ", 1)
            if split == "train" and (shape, color) in gen.held_out_pairs:
                continue
            for i in range(per_class):
                scene = gen.class_scene(counter, scene_split, label=name)
                counter += 1
                fname = f"{wnids[name]}_{i:05d}.JPEG"
                _save(scene.render(size), folder / split / wnids[name] / fname, quality)
                if split == "val" and (shape, color) in gen.held_out_pairs:
                    held.append(f"{wnids[name]}/{fname}")
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))


# -- training shards --------------------------------------------------------------------------------
def write_training_shards(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_pairs: int = 1000,
    n_documents: int = 200,
    images_per_document: tuple[int, int] = (2, 5),
    image_size: int = 128,
    samples_per_shard: int = 1000,
    generator: SceneGenerator | None = None,
    overwrite: bool = False,
    keep_source: bool = False,
) -> dict[str, list[Path]]:
    """Webdataset training shards from synthetic scenes of the ``pretrain`` split (held-out pairs
    excluded): ``<out>/pairs/pairs-*.tar`` (image + caption) and ``<out>/interleaved/interleaved-*.tar``
    (documents of 2-5 images, each followed by ``Output:<caption>`` or
    ``Question:<q> Short answer:<a>``, the evaluation prompt formats). The source JSONL and images
    are written to ``<out>/source`` and removed afterwards unless ``keep_source``."""
    from ..data.custom import write_shards

    out = Path(out_dir)
    gen = generator or SceneGenerator(seed=seed)
    src = out / "source"
    if src.exists():
        shutil.rmtree(src)
    (src / "images").mkdir(parents=True)
    index = 0
    pairs, docs = [], []

    def image(scene) -> str:
        nonlocal index
        rel = f"images/{index:08d}.png"
        scene.render(image_size).save(src / rel)
        index += 1
        return rel

    for i in range(n_pairs):
        scene = gen.scene(i, "pretrain")
        caption = scene.captions(5)[i % 5]
        pairs.append({"text": f"<image>{caption}", "images": [image(scene)]})
    lo, hi = images_per_document
    for d in range(n_documents):
        rng = np.random.default_rng([gen.seed, 77, d])
        items = []
        style = int(rng.integers(2))  # a document is all captions or all questions, like a few-shot prompt
        for k in range(int(rng.integers(lo, hi + 1))):
            scene = gen.scene(n_pairs + d * hi + k, "pretrain")
            items.append({"image": image(scene)})
            if style == 0:
                items.append({"text": f"Output:{scene.captions(5)[int(rng.integers(5))]}"})
            else:
                q = scene.questions()[int(rng.integers(len(scene.questions())))]
                items.append({"text": f"Question:{q['question']} Short answer:{q['answer']}"})
        docs.append({"items": items})
    for name, rows in (("pairs.jsonl", pairs), ("interleaved.jsonl", docs)):
        (src / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {}
    try:
        if n_pairs:
            result["pairs"] = write_shards(src / "pairs.jsonl", out / "pairs", kind="pairs",
                                           samples_per_shard=samples_per_shard, overwrite=overwrite, strict=True)
        if n_documents:
            result["interleaved"] = write_shards(src / "interleaved.jsonl", out / "interleaved", kind="interleaved",
                                                 samples_per_shard=samples_per_shard, overwrite=overwrite, strict=True)
    finally:
        if not keep_source:
            shutil.rmtree(src, ignore_errors=True)
    return result


# -- few-shot episodes --------------------------------------------------------------------------------
#: Made-up names for in-context name binding; evaluation uses names never seen in training.
NONCE_NAMES_TRAIN: tuple[str, ...] = (
    "dax", "blicket", "wug", "toma", "fep", "zorp", "gazzer", "kiki", "bouba", "tufa", "lorp", "mib",
    "snorb", "glim", "pim", "yad", "rint", "vop", "teebo", "nart", "quib", "slen", "morb", "jek",
)
NONCE_NAMES_EVAL: tuple[str, ...] = ("wif", "dupe", "kern", "zib", "vosk", "rell", "tiv", "mott", "plax", "sorn")
EPISODE_KINDS = ("caption", "vqa", "classify", "binding")
#: Text of one binding chunk; the query stops after ``BINDING_QUERY``.
BINDING_QUERY = "This is a"


def binding_text(name: str | None = None) -> str:
    return BINDING_QUERY if name is None else f"{BINDING_QUERY} {name}."


@dataclass
class BindingEpisode:
    """``shots`` demonstrations (scene, name) and a query scene whose answer is one of ``names``."""

    demos: list[tuple[Scene, str]]
    query: Scene
    answer: str
    names: list[str]


def _single_object_scene(gen: SceneGenerator, rng, shape: str, color: str) -> Scene:
    pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return gen._scene(rng, [gen._object(rng, shape, color, pos)])  # no written text


def binding_episode(gen: SceneGenerator, index: int, *, ways: int = 2, shots: int = 2, split: str = "test",
                    names: Sequence[str] | None = None) -> BindingEpisode:
    """A name-binding episode: ``ways`` categories (a colour and a shape; two categories differ in
    both), each given a made-up name; ``shots`` demonstrations cycle through the categories in a
    random order (so ``shots >= ways`` shows every name), then a new image of one category.
    Training splits use :data:`NONCE_NAMES_TRAIN` and skip held-out pairs; others use
    :data:`NONCE_NAMES_EVAL` and all pairs."""
    if ways < 2:
        raise ValueError(f"ways must be >= 2, got {ways}")
    train = split in TRAIN_SPLITS
    pool = list(names if names is not None else (NONCE_NAMES_TRAIN if train else NONCE_NAMES_EVAL))
    if len(pool) < ways:
        raise ValueError(f"need at least {ways} names, got {len(pool)}")
    rng = np.random.default_rng([gen.seed, 4242, SPLIT_IDS[split], int(index), ways, shots])
    cats: list[tuple[str, str]] = []
    while len(cats) < ways:
        shape = gen.shapes[int(rng.integers(len(gen.shapes)))]
        color = gen.colors[int(rng.integers(len(gen.colors)))]
        if train and (shape, color) in gen.held_out_pairs:
            continue
        if all(shape != s and color != c for s, c in cats):
            cats.append((shape, color))
    chosen = [pool[i] for i in rng.choice(len(pool), ways, replace=False)]
    order: list[int] = []
    while len(order) < shots:
        order.extend(int(i) for i in rng.permutation(ways))
    demos = [(_single_object_scene(gen, rng, *cats[c]), chosen[c]) for c in order[:shots]]
    target = int(rng.integers(ways))
    return BindingEpisode(demos, _single_object_scene(gen, rng, *cats[target]), chosen[target], chosen)


def _pick_question(rng, questions: list[dict], weights: dict[str, float] | None) -> dict:
    """One of a scene's questions: uniformly, or with each ``question_type`` weighted (default 1)."""
    if not weights:
        return questions[int(rng.integers(len(questions)))]
    w = np.asarray([weights.get(q["question_type"], 1.0) for q in questions], dtype=np.float64)
    if w.sum() <= 0:
        return questions[int(rng.integers(len(questions)))]
    return questions[int(rng.choice(len(questions), p=w / w.sum()))]


def episode_items(gen: SceneGenerator, index: int, kind: str, shots: int, split: str = "pretrain",
                  question_weights: dict[str, float] | None = None) -> list[tuple[Scene, str]]:
    """One training document: ``shots`` (scene, text) chunks of one task, in the evaluation prompt
    formats (``Output:{caption}``, ``Question:{q} Short answer:{a}``, ``Output:{class}``,
    ``This is a {name}.``). ``question_weights`` ({question_type: weight}, others 1) makes VQA
    documents ask some kinds of question more often than a scene's list has them."""
    rng = np.random.default_rng([gen.seed, 7777, SPLIT_IDS[split], int(index)])
    base = int(index) * 16
    if kind == "caption":
        out = []
        for k in range(shots):
            scene = gen.scene(base + k, split)
            out.append((scene, f"Output:{scene.captions(5)[int(rng.integers(5))]}"))
        return out
    if kind == "vqa":
        out = []
        for k in range(shots):
            scene = gen.scene(base + k, split)
            q = _pick_question(rng, scene.questions(), question_weights)
            out.append((scene, f"Question:{q['question']} Short answer:{q['answer']}"))
        return out
    if kind == "classify":
        class_split = "class_train" if split in TRAIN_SPLITS else "class_val"
        return [(sc, f"Output:{sc.label}") for sc in (gen.class_scene(base + k, class_split) for k in range(shots))]
    if kind == "binding":
        ways = 2 + int(rng.random() < 0.35)
        ep = binding_episode(gen, index, ways=ways, shots=max(shots - 1, ways), split=split)
        return [(sc, binding_text(n)) for sc, n in ep.demos] + [(ep.query, binding_text(ep.answer))]
    raise ValueError(f"kind must be one of {EPISODE_KINDS}, got {kind!r}")


def write_episode_shards(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_documents: int = 1000,
    mix: dict[str, float] | None = None,
    shots: tuple[int, int] = (1, 8),
    image_size: int = 224,
    samples_per_shard: int = 500,
    start: int = 0,
    generator: SceneGenerator | None = None,
    overwrite: bool = False,
    progress: bool = False,
    question_weights: dict[str, float] | None = None,
) -> list[Path]:
    """Interleaved webdataset shards of few-shot episodes (``pretrain`` split, held-out pairs and
    evaluation names excluded), ``mix`` giving each :data:`EPISODE_KINDS` kind's share. Documents
    ``start .. start+n_documents`` of a seed are always the same, so data can be added in pieces.
    ``question_weights``: see :func:`episode_items`."""
    from ..data.custom import write_shards

    mix = dict(mix or {"caption": 0.25, "vqa": 0.3, "classify": 0.15, "binding": 0.3})
    bad = set(mix) - set(EPISODE_KINDS)
    if bad:
        raise ValueError(f"unknown episode kinds {sorted(bad)}; choose from {EPISODE_KINDS}")
    if question_weights and any(w < 0 for w in question_weights.values()):
        raise ValueError(f"question weights must be >= 0, got {question_weights}")
    kinds, weights = list(mix), np.asarray([mix[k] for k in mix], dtype=np.float64)
    weights = weights / weights.sum()
    gen = generator or SceneGenerator(seed=seed)
    out = Path(out_dir)
    src = out / "source"
    shutil.rmtree(src, ignore_errors=True)
    (src / "images").mkdir(parents=True)
    rows = []
    bar = range(start, start + n_documents)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="episodes", unit="doc")
    n_img = 0
    try:
        for d in bar:
            rng = np.random.default_rng([gen.seed, 31337, int(d)])
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            k = int(rng.integers(shots[0], shots[1] + 1))
            items = []
            for scene, text in episode_items(gen, d, kind, k, question_weights=question_weights):
                rel = f"images/{n_img:08d}.png"
                scene.render(image_size).save(src / rel)
                n_img += 1
                items += [{"image": rel}, {"text": text}]
            rows.append(json.dumps({"items": items}))
        (src / "episodes.jsonl").write_text("\n".join(rows) + "\n")
        return write_shards(src / "episodes.jsonl", out, kind="interleaved", samples_per_shard=samples_per_shard,
                            overwrite=overwrite, strict=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)


# -- command line ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flamingo_vlm.eval.synthetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("benchmark", help="write the synthetic evaluation datasets in standard layouts")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tasks", default="coco,vqav2,imagenet", help=f"comma-separated, from {','.join(BENCHMARK_TASKS)}")
    b.add_argument("--n-train", type=int, default=256)
    b.add_argument("--n-val", type=int, default=32)
    b.add_argument("--n-test", type=int, default=64)
    b.add_argument("--image-size", type=int, default=128)
    b.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("shards", help="write synthetic webdataset training shards")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pairs", type=int, default=1000)
    s.add_argument("--documents", type=int, default=200)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("episodes", help="write few-shot episode shards (captioning, VQA, classification, name binding)")
    e.add_argument("out")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--documents", type=int, default=16000)
    e.add_argument("--start", type=int, default=0, help="first document index (to add data in pieces)")
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--samples-per-shard", type=int, default=500)
    e.add_argument("--shots", default="1,8", help="least,most images per document")
    e.add_argument("--mix", default="caption=0.25,vqa=0.3,classify=0.15,binding=0.3",
                   help=f"kind=share,... over {','.join(EPISODE_KINDS)}")
    e.add_argument("--question-weights", default="",
                   help="question_type=weight,... for VQA documents (others 1), e.g. 'what color is the=4'")
    e.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "episodes":
        try:
            lo, hi = (int(x) for x in args.shots.split(","))
            mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(",") if item)}
            qweights = {k.strip(): float(v) for k, v in (item.split("=") for item in args.question_weights.split(",") if item)}
        except ValueError:
            parser.error(f"--shots wants 'least,most', --mix 'kind=share,...' and --question-weights "
                         f"'question_type=weight,...', got {args.shots!r} / {args.mix!r} / {args.question_weights!r}")
        if not 1 <= lo <= hi:
            parser.error(f"--shots must satisfy 1 <= least <= most, got {args.shots!r}")
        paths = write_episode_shards(args.out, seed=args.seed, n_documents=args.documents, start=args.start,
                                     shots=(lo, hi), mix=mix, question_weights=qweights or None,
                                     image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                     overwrite=args.overwrite, progress=True)
        print(f"episodes: {len(paths)} shard(s) in {args.out}")
        return 0
    if args.command == "benchmark":
        paths = write_synthetic_benchmark(args.out, seed=args.seed, tasks=[t for t in args.tasks.split(",") if t],
                                          n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                          image_size=args.image_size, overwrite=args.overwrite)
        for task, path in paths.items():
            print(f"{task}: {path}")
    else:
        shards = write_training_shards(args.out, seed=args.seed, n_pairs=args.pairs, n_documents=args.documents,
                                       image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                       overwrite=args.overwrite)
        for kind, paths in shards.items():
            print(f"{kind}: {len(paths)} shard(s) in {paths[0].parent if paths else '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
