"""Synthetic training data: webdataset shards of scene-text pairs and few-shot episodes.

* :func:`write_training_shards`: image-caption pairs and interleaved few-shot documents of the
  ``pretrain`` split (``flamingo-vlm data synthetic-shards OUT``).
* :func:`write_episode_shards`: interleaved few-shot *episodes* of one task each, captioning, VQA,
  classification or in-context name binding (:func:`binding_episode`: made-up names given to
  categories by the demonstrations), in the evaluation prompt formats; what the built-in model
  trains on (``flamingo-vlm data episodes OUT``).

Both write through :func:`flamingo_vlm.data.custom.write_shards`, leave out the held-out (shape,
color) pairs and the evaluation names, and are deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scenes import POSITIONS, SPLIT_IDS, TRAIN_SPLITS, Scene, SceneGenerator

__all__ = [
    "BINDING_QUERY",
    "EPISODE_KINDS",
    "NONCE_NAMES_EVAL",
    "NONCE_NAMES_TRAIN",
    "BindingEpisode",
    "binding_episode",
    "binding_text",
    "episode_items",
    "write_episode_shards",
    "write_training_shards",
]


# -- training shards ----------------------------------------------------------------------------------
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
    try:  # (the source folder goes on any error, Ctrl-C while drawing included)
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
    style_rate: float = 0.0,
) -> list[Path]:
    """Interleaved webdataset shards of few-shot episodes (``pretrain`` split, held-out pairs and
    evaluation names excluded), ``mix`` giving each :data:`EPISODE_KINDS` kind's share. Documents
    ``start .. start+n_documents`` of a seed are always the same, so data can be added in pieces.
    ``question_weights``: see :func:`episode_items`. ``style_rate``: the share of documents whose
    scenes are drawn as the in-context episodes draw theirs (one random training style per
    document, objects off the grid: :func:`~flamingo_vlm.synthetic.icl.restyle`); the texts, and
    with ``style_rate=0`` the images, are the same as without it."""
    from ..data.custom import write_shards
    from .icl import restyle

    mix = dict(mix or {"caption": 0.25, "vqa": 0.3, "classify": 0.15, "binding": 0.3})
    bad = set(mix) - set(EPISODE_KINDS)
    if bad:
        raise ValueError(f"unknown episode kinds {sorted(bad)}; choose from {EPISODE_KINDS}")
    if not 0.0 <= style_rate <= 1.0:
        raise ValueError(f"style_rate must be between 0 and 1, got {style_rate}")
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
        from ..progress import progress as tqdm

        bar = tqdm(bar, desc="episodes", unit="doc")
    n_img = 0
    try:
        for d in bar:
            rng = np.random.default_rng([gen.seed, 31337, int(d)])
            kind = kinds[int(rng.choice(len(kinds), p=weights))]
            k = int(rng.integers(shots[0], shots[1] + 1))
            items = []
            srng = np.random.default_rng([gen.seed, 31338, int(d)])
            styled, style = srng.random() < style_rate, None
            for scene, text in episode_items(gen, d, kind, k, question_weights=question_weights):
                rel = f"images/{n_img:08d}.png"
                if styled:  # one style per document, as an episode has; offsets per scene
                    scene, style = restyle(scene, srng, style=style)
                scene.render(image_size, style).save(src / rel)
                n_img += 1
                items += [{"image": rel}, {"text": text}]
            rows.append(json.dumps({"items": items}))
        (src / "episodes.jsonl").write_text("\n".join(rows) + "\n")
        return write_shards(src / "episodes.jsonl", out, kind="interleaved", samples_per_shard=samples_per_shard,
                            overwrite=overwrite, strict=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
