"""In-context episodes whose answer format can only be learnt from their demonstrations.

An episode (:func:`icl_episode`) is a few demonstrations and a query, all of one question type
(:data:`QUESTION_TYPES`: colour, shape, count, position, written word) and sharing four choices
the query text alone does not reveal:

* the **phrasing** of the question (:data:`PHRASINGS`, many per type; never one template);
* the **answer map** (:class:`AnswerMap`): a lexicon (the scene's own words, synonyms, count
  words, French/Spanish/German, a made-up label map such as ``red -> blicket`` drawn per episode,
  ...), a case (as is, Capitalised, UPPER) and a wrap (bare, ``The answer is {}.``, ...);
* the **framing** of each chunk (:data:`FRAMINGS`: ``Question:/Short answer:``, ``Q:/A:``, no
  prefix, ...);
* the **drawing style** (:class:`~flamingo_vlm.synthetic.render.Style`: outlines, textured fills
  and backgrounds, blur, sizes; objects sit off the five grid positions by up to
  :data:`MAX_OFFSET` of the image side, never overlapping).

Every axis has values for ``split="train"`` and others, used only by ``split="heldout"`` (the
evaluation): phrasings, framings, lexicons, wraps, nonce names, fills and backgrounds. The one
value both splits share is the *canonical* answer map (the scene's own words, as is, bare): half
of the held-out episodes use it, so that a model can answer them without demonstrations; the
other half (``answer_format=True``, the *answer-format split*) use a held-out map, which only the
demonstrations show. Answers are computed from the scene description, and balanced per type.

Writers: :func:`write_icl_shards` (interleaved training shards, ``flamingo-vlm data icl-episodes``)
and :func:`write_icl_benchmark` (the evaluation folder of the ``synthetic_icl`` task, written by
``flamingo-vlm data synthetic-benchmark OUT --tasks synthetic_icl``). Episode ``i`` of a seed and split is always
the same (``numpy.random.default_rng([seed, 2525, split, i])``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .render import BACKGROUNDS, FILLS, POSITIONS, SIZES, Style
from .scenes import COLORS, CORNERS, SHAPES, WORDS, Scene, SceneGenerator, SceneObject

__all__ = [
    "FRAMINGS", "ICL_SPLITS", "LEXICONS", "LOSS_MARKERS", "MAX_OFFSET", "PHRASINGS", "QUESTION_TYPES", "STYLE_AXES",
    "WRAPS", "AnswerMap", "IclEpisode", "icl_episode", "restyle", "write_icl_benchmark", "write_icl_shards",
]

QUESTION_TYPES = ("color", "shape", "count", "position", "word")
ICL_SPLITS = ("train", "heldout")
_SPLIT_NUM = {"train": 0, "heldout": 1}
MAX_OFFSET = 0.08  # objects sit up to this far (fraction of the image side) off their grid anchor

# -- phrasings: {qtype: {split: templates}}; {shape}/{color} name the asked-about object ----------------
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "train": ("What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
                  "The {shape} is what color?", "Tell me the color of the {shape}.", "What is the color of the {shape}?",
                  "Name the colour of the {shape}.", "Color of the {shape}?", "Which colour does the {shape} have?",
                  "what color is the {shape}"),
        "heldout": ("What hue is the {shape}?", "In what color is the {shape} drawn?", "Identify the {shape}'s colour.",
                    "The {shape}: which colour?"),
    },
    "shape": {
        "train": ("What shape is the {color} object?", "What is the {color} shape?", "Which shape is {color}?",
                  "Name the {color} shape.", "What kind of shape is the {color} one?",
                  "The {color} thing is which shape?",
                  "Shape of the {color} object?", "What form does the {color} figure have?",
                  "Tell me what the {color} shape is.", "what shape is {color}"),
        "heldout": ("Which figure is painted {color}?", "What is drawn in {color}?",
                    "Identify the {color} figure's shape.",
                    "The {color} object: what shape?"),
    },
    "count": {
        "train": ("How many shapes are there?", "How many objects are in the picture?", "Count the shapes.",
                  "What is the number of shapes?", "How many {shape}s are there?", "Count the {shape}s.",
                  "How many {shape}s can you see?", "Number of figures?", "How many things are drawn?",
                  "how many {shape}s"),
        "heldout": ("How many figures appear in the image?", "What's the total count of shapes?",
                    "Tally the {shape}s.", "How many {shape}s are shown?"),
    },
    "position": {
        "train": ("Where is the {color} {shape}?", "Where is the {color} {shape} located?",
                  "In which part of the image is the {color} {shape}?", "Where can you find the {color} {shape}?",
                  "Position of the {color} {shape}?", "Where does the {color} {shape} sit?",
                  "Tell me where the {color} {shape} is.", "where is the {color} {shape}"),
        "heldout": ("Locate the {color} {shape}.", "Whereabouts is the {color} {shape}?",
                    "In what region is the {color} {shape}?", "The {color} {shape}: where?"),
    },
    "word": {
        "train": ("What word is written?", "What is written in the image?", "What does the text say?",
                  "Read the text in the image.", "Which word appears in the corner?", "What is written in the corner?",
                  "What text is shown?", "What's written on the picture?"),
        "heldout": ("What do the letters spell?", "Transcribe the writing.", "Which text is printed in the corner?",
                    "What label is in the corner?"),
    },
}

# -- framings: one chunk's text; the query stops before {a} -----------------------------------------------
FRAMINGS: dict[str, tuple[str, ...]] = {
    "train": ("Question:{q} Short answer:{a}", "Q: {q} A: {a}", "{q} {a}", "Question: {q} Answer: {a}",
              "User: {q} Assistant: {a}", "Input: {q} Output: {a}", "Looking at the picture. {q} {a}"),
    "heldout": ("Q. {q} A. {a}", "Query: {q} Reply: {a}", "{q} -> {a}", "Ask: {q} Say: {a}"),
}
#: The answer prefixes of the framings (for ``loss_after`` in a training config: only the answer is
#: trained); the prefix-less framings train their whole chunk.
LOSS_MARKERS: tuple[str, ...] = ("Short answer:", " A:", " Answer:", " Assistant:", " Output:")

# -- answer maps: lexicons (canonical -> surface), cases, wraps ---------------------------------------------
_FR = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet", "orange": "orange",
       "circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "diamond": "losange",
       "hexagon": "hexagone", "1": "un", "2": "deux", "3": "trois", "4": "quatre",
       "left": "gauche", "right": "droite", "top": "haut", "bottom": "bas", "center": "centre"}
_ES = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado", "orange": "naranja",
       "circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "diamond": "rombo",
       "hexagon": "hexágono", "1": "uno", "2": "dos", "3": "tres", "4": "cuatro",
       "left": "izquierda", "right": "derecha", "top": "arriba", "bottom": "abajo", "center": "centro"}
_DE = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "lila", "orange": "orange",
       "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "diamond": "Raute",
       "hexagon": "Sechseck", "1": "eins", "2": "zwei", "3": "drei", "4": "vier",
       "left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "center": "Mitte"}
_SYN_A = {"red": "crimson", "green": "lime", "blue": "navy", "yellow": "gold", "purple": "violet", "orange": "tangerine",
          "circle": "disc", "square": "box", "triangle": "wedge", "star": "starburst", "diamond": "rhombus",
          "hexagon": "honeycomb", "left": "west", "right": "east", "top": "north", "bottom": "south", "center": "middle"}
_SYN_B = {"red": "scarlet", "green": "emerald", "blue": "azure", "yellow": "lemon", "purple": "lilac", "orange": "amber",
          "circle": "ring", "square": "block", "triangle": "pyramid", "star": "asterisk", "diamond": "lozenge",
          "hexagon": "hex", "left": "9 o'clock", "right": "3 o'clock", "top": "12 o'clock", "bottom": "6 o'clock",
          "center": "centre"}
_WORDS_EN = {"1": "one", "2": "two", "3": "three", "4": "four"}
_ROMAN = {"1": "I", "2": "II", "3": "III", "4": "IV"}
#: Made-up names for label maps (``red -> blicket``); held-out episodes use names never seen in training.
NONCE = {"train": ("blicket", "dax", "wug", "toma", "fep", "zorp", "gazzer", "kiki", "bouba", "tufa", "lorp", "mib"),
         "heldout": ("wif", "dupe", "kern", "zib", "vosk", "rell", "tiv", "mott")}


def _table(table: dict[str, str]) -> Callable[[str], str]:
    return lambda v: table.get(v, v)


#: {qtype: {split: {lexicon name: canonical value -> surface}}}; ``nonce`` lexicons are drawn per episode.
LEXICONS: dict[str, dict[str, dict[str, Callable[[str], str] | None]]] = {
    qt: {
        "train": {"canonical": lambda v: v,
                  **({"synonyms": _table(_SYN_A)} if qt != "count" else {"words": _table(_WORDS_EN)}),
                  "french": _table(_FR), "spanish": _table(_ES), "nonce": None},
        "heldout": {"synonyms-b" if qt != "count" else "roman": _table(_SYN_B if qt != "count" else _ROMAN),
                    "german": _table(_DE), "nonce-heldout": None},
    } for qt in ("color", "shape", "count", "position")
}
LEXICONS["word"] = {"train": {"canonical": lambda v: v, "spaced": lambda v: " ".join(v)},
                    "heldout": {"hyphenated": lambda v: "-".join(v), "quoted": lambda v: f"'{v}'"}}
CASES: dict[str, Callable[[str], str]] = {"as-is": lambda s: s, "capitalized": lambda s: s[:1].upper() + s[1:],
                                          "upper": str.upper}
WRAPS: dict[str, tuple[str, ...]] = {"train": ("{}", "The answer is {}.", "{}."), "heldout": ("It's {}.", "I see {}.")}
#: Drawing-style axes held out of training: held-out episodes use only the held-out fills and backgrounds.
STYLE_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "fill": {"train": ("solid", "outline", "striped", "dotted"), "heldout": ("hatched", "checked")},
    "background": {"train": ("plain", "gradient", "noise", "paper"), "heldout": ("lines", "checker")},
}
assert set(FILLS) == {f for s in STYLE_AXES["fill"].values() for f in s}
assert set(BACKGROUNDS) == {b for s in STYLE_AXES["background"].values() for b in s}

_VALUES = {"color": tuple(COLORS), "shape": SHAPES, "count": ("1", "2", "3", "4"), "position": tuple(POSITIONS)}


@dataclass(frozen=True)
class AnswerMap:
    """How an episode writes its answers: ``lexicon`` (its ``table``: canonical value -> word),
    then ``case``, then ``wrap`` (a format string). ``apply("red")`` -> e.g. ``"The answer is ROUGE."``."""

    qtype: str
    lexicon: str
    case: str = "as-is"
    wrap: str = "{}"
    table: dict[str, str] = field(default_factory=dict)  # nonce lexicons: the episode's own labels

    @property
    def name(self) -> str:
        return f"{self.lexicon}/{self.case}/{self.wrap}"

    @property
    def canonical(self) -> bool:
        return self.lexicon == "canonical" and self.case == "as-is" and self.wrap == "{}"

    def word(self, value: str) -> str:
        """The lexicon's word for ``value`` (no case, no wrap)."""
        if self.table:
            return self.table[value]
        split = "train" if self.lexicon in LEXICONS[self.qtype]["train"] else "heldout"
        return LEXICONS[self.qtype][split][self.lexicon](value)

    def apply(self, value: str) -> str:
        return self.wrap.format(CASES[self.case](self.word(value)))


def content_words(qtype: str, value: str) -> list[str]:
    """Every lexicon's word for ``value`` (lower case): an answer naming the right thing in any
    known vocabulary (used for the evaluation's ``content_accuracy``)."""
    if qtype == "word":
        return [value.lower()]
    out = {value.lower()}
    for split in ICL_SPLITS:
        for fn in LEXICONS[qtype][split].values():
            if fn is not None:
                out.add(fn(value).lower())
    return sorted(out)


@dataclass
class IclEpisode:
    """Demonstrations and a query sharing a phrasing, an answer map, a framing and a style.

    ``demos`` and ``query`` are ``(scene, question, answer)``; ``value`` is the query's canonical
    answer (what the scene description says), ``answer`` the map applied to it."""

    qtype: str
    split: str
    phrasing: str
    framing: str
    answer_map: AnswerMap
    style: Style
    demos: list[tuple[Scene, str, str]]
    query: tuple[Scene, str, str]
    value: str

    @property
    def answer_format(self) -> bool:
        """Whether the answers are not in the canonical map (only the demos show their form)."""
        return not self.answer_map.canonical

    def chunk(self, question: str, answer: str | None = None) -> str:
        """One chunk's text in the framing; ``answer=None``: the query, stopping where the answer goes."""
        if answer is None:
            return self.framing.split("{a}")[0].format(q=question).rstrip(" ")
        return self.framing.format(q=question, a=answer)

    def texts(self) -> list[str]:
        """The demos' chunks, then the query's with its answer (a training document)."""
        return [self.chunk(q, a) for _, q, a in self.demos] + [self.chunk(self.query[1], self.query[2])]


# -- drawing the scenes ---------------------------------------------------------------------------------------
def _style(rng, split: str) -> Style:
    fills, backs = STYLE_AXES["fill"][split], STYLE_AXES["background"][split]
    plain = split == "train" and rng.random() < 0.3  # the classic look stays common in training
    return Style(fill="solid" if plain else fills[int(rng.integers(len(fills)))],
                 background="plain" if plain else backs[int(rng.integers(len(backs)))],
                 outline=int(rng.choice([0, 0, 1, 2])), blur=float(rng.choice([0.0, 0.0, 0.5, 1.0])),
                 scale=float(np.round(rng.uniform(0.8, 1.15), 3)))


def _fits(positions, offsets, radii) -> bool:
    """Whether shapes of ``radii`` at grid ``positions`` moved by ``offsets`` lie inside the image
    and do not touch one another."""
    centres = [(POSITIONS[p][0] + o[0], POSITIONS[p][1] + o[1]) for p, o in zip(positions, offsets)]
    inside = all(r + 0.01 < x < 0.99 - r and r + 0.01 < y < 0.99 - r for (x, y), r in zip(centres, radii))
    n = len(centres)
    return inside and all(np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]) > radii[i] + radii[j] + 0.02
                          for i in range(n) for j in range(i + 1, n))


def restyle(scene: Scene, rng, split: str = "train", style: Style | None = None) -> tuple[Scene, Style]:
    """``scene`` as an episode of ``split`` draws its scenes: in ``style`` (default: a random drawing
    style of that split), its objects moved off their grid anchors by up to :data:`MAX_OFFSET` where
    they fit (after 15 tries they stay on them). Every question about the scene keeps its answer, so
    the card's kinds of documents and the aiming data can be drawn this way too (``style_rate``)."""
    if split not in ICL_SPLITS:
        raise ValueError(f"split must be one of {ICL_SPLITS}, got {split!r}")
    style = style or _style(rng, split)
    radii = [SIZES[o.size] * style.scale for o in scene.objects]
    positions = [o.position for o in scene.objects]
    for _ in range(15):
        offsets = [tuple(float(x) for x in np.round(rng.uniform(-MAX_OFFSET, MAX_OFFSET, 2), 4)) for _ in positions]
        if _fits(positions, offsets, radii):
            objects = tuple(dataclasses.replace(o, offset=off) for o, off in zip(scene.objects, offsets))
            return dataclasses.replace(scene, objects=objects), style
    return scene, style


def _place(rng, specs: list[tuple[str, str]], scale: float, text: str | None, first_at: str | None = None) -> Scene:
    """``specs`` (shape, color) at distinct grid positions (the first at ``first_at`` if given),
    each moved off its anchor by up to :data:`MAX_OFFSET`, inside the image and not touching another
    shape (after 15 tries: on the anchors, small)."""
    n = len(specs)
    names = list(POSITIONS)
    if first_at is None:
        positions = [names[i] for i in rng.choice(len(names), n, replace=False)]
    else:
        rest = [p for p in names if p != first_at]
        positions = [first_at] + [rest[i] for i in rng.choice(len(rest), n - 1, replace=False)]
    sizes = [("small", "large")[int(rng.integers(2))] for _ in specs]
    for attempt in range(20):
        limit = MAX_OFFSET if attempt < 15 else 0.0
        offsets = [tuple(float(x) for x in np.round(rng.uniform(-limit, limit, 2), 4)) for _ in specs]
        if attempt >= 15:
            sizes = ["small"] * n
        if _fits(positions, offsets, [SIZES[z] * scale for z in sizes]):
            break
    objects = tuple(SceneObject(s, c, z, p, o) for (s, c), z, p, o in zip(specs, sizes, positions, offsets))
    base = int(rng.integers(228, 252))
    background = tuple(int(base + t) for t in rng.integers(-4, 5, 3))
    corner = CORNERS[int(rng.integers(len(CORNERS)))] if text else None
    return Scene(objects, text, corner, background, seed=int(rng.integers(2**31)))


def _pair(rng, gen: SceneGenerator, split: str, shape: str | None = None, color: str | None = None,
          avoid_shapes=(), avoid_colors=()) -> tuple[str, str]:
    shapes = [s for s in gen.shapes if s not in avoid_shapes] if shape is None else [shape]
    colors = [c for c in gen.colors if c not in avoid_colors] if color is None else [color]
    pairs = [(s, c) for s in shapes for c in colors if split != "train" or (s, c) not in gen.held_out_pairs]
    return pairs[int(rng.integers(len(pairs)))]


def _question(rng, gen: SceneGenerator, qtype: str, phrasing: str, split: str, scale: float, want: str | None = None):
    """A scene for ``phrasing`` whose canonical answer is ``want`` (else drawn uniformly):
    (scene, question, canonical answer)."""
    text = WORDS[int(rng.integers(len(WORDS)))] if qtype == "word" or rng.random() < 0.3 else None
    n = int(rng.integers(1, 5)) if want is None or qtype != "count" else int(want)
    if qtype == "count":
        if "{shape}" in phrasing:
            k = int(rng.integers(1, 5)) if want is None else int(want)
            shape = gen.shapes[int(rng.integers(len(gen.shapes)))]
            specs = [_pair(rng, gen, split, shape=shape) for _ in range(k)]
            specs += [_pair(rng, gen, split, avoid_shapes=(shape,)) for _ in range(int(rng.integers(0, 5 - k)))]
            scene = _place(rng, [specs[i] for i in rng.permutation(len(specs))], scale, text)
            return scene, phrasing.format(shape=shape), str(k)
        specs = [_pair(rng, gen, split) for _ in range(n)]
        return _place(rng, specs, scale, text), phrasing, str(n)
    if qtype == "word":
        specs = [_pair(rng, gen, split) for _ in range(int(rng.integers(1, 4)))]
        return _place(rng, specs, scale, text), phrasing, text
    # colour / shape / position: one target object, identifiable by the words the question uses
    values = _VALUES[qtype]
    want = values[int(rng.integers(len(values)))] if want is None else want
    if qtype == "color":
        target = _pair(rng, gen, split, color=want)
        others = [_pair(rng, gen, split, avoid_shapes=(target[0],)) for _ in range(n - 1)]
    elif qtype == "shape":
        target = _pair(rng, gen, split, shape=want)
        others = [_pair(rng, gen, split, avoid_colors=(target[1],)) for _ in range(n - 1)]
    else:
        target = _pair(rng, gen, split)
        others = [_pair(rng, gen, split, avoid_shapes=(target[0],), avoid_colors=(target[1],)) for _ in range(n - 1)]
    where = want if qtype == "position" else None
    scene = _place(rng, [target] + others, scale, text, first_at=where)
    question = phrasing.format(shape=target[0], color=target[1])
    return scene, question, {"color": target[1], "shape": target[0], "position": want}[qtype]


def _answer_map(rng, qtype: str, split: str, canonical_rate: float) -> AnswerMap:
    if split == "heldout" and rng.random() < canonical_rate:
        return AnswerMap(qtype, "canonical")
    lexicons = list(LEXICONS[qtype][split])
    lexicon = lexicons[int(rng.integers(len(lexicons)))]
    case = list(CASES)[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
    wraps = WRAPS[split]
    wrap = wraps[int(rng.integers(len(wraps)))]
    table = {}
    if lexicon.startswith("nonce"):
        pool = NONCE[split]
        picks = rng.choice(len(pool), len(_VALUES[qtype]), replace=False)
        table = {v: pool[int(i)] for v, i in zip(_VALUES[qtype], picks)}
    return AnswerMap(qtype, lexicon, case, wrap, table)


def icl_episode(index: int, *, split: str = "train", shots: int = 8, seed: int = 0, qtype: str | None = None,
                generator: SceneGenerator | None = None, canonical_rate: float = 0.5) -> IclEpisode:
    """Episode ``index`` of ``split`` (:data:`ICL_SPLITS`): ``shots`` demonstrations and a query of
    one question type (``qtype``, else drawn), sharing a phrasing, an answer map, a framing and a
    style drawn from ``split``'s values. In training, (shape, colour) pairs held out by
    ``generator`` (default ``SceneGenerator(seed)``) never appear. ``canonical_rate``: the share of
    held-out episodes answered in the canonical map (the rest form the answer-format split). With a
    made-up label map, one of the first ``min(shots, 4)`` demonstrations (at random) shows the
    query's answer, so from 4 shots on the label is always learnable (below, only sometimes)."""
    if split not in ICL_SPLITS:
        raise ValueError(f"split must be one of {ICL_SPLITS}, got {split!r}")
    if qtype is not None and qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    gen = generator or SceneGenerator(seed=seed)
    rng = np.random.default_rng([gen.seed, 2525, _SPLIT_NUM[split], int(index)])
    qt = qtype or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    phrasings, framings = PHRASINGS[qt][split], FRAMINGS[split]
    phrasing = phrasings[int(rng.integers(len(phrasings)))]
    framing = framings[int(rng.integers(len(framings)))]
    amap = _answer_map(rng, qt, split, canonical_rate)
    style = _style(rng, split)
    chunks = [_question(rng, gen, qt, phrasing, split, style.scale) for _ in range(shots + 1)]
    if amap.table and shots:  # a made-up label is learnt only from a demo: show the query's within the first 4
        j = int(rng.integers(min(shots, 4)))
        chunks[j] = _question(rng, gen, qt, phrasing, split, style.scale, want=chunks[-1][2])
    demos = [(s, q, amap.apply(v)) for s, q, v in chunks[:-1]]
    scene, question, value = chunks[-1]
    return IclEpisode(qt, split, phrasing, framing, amap, style, demos, (scene, question, amap.apply(value)), value)


# -- writers ----------------------------------------------------------------------------------------------------
def _write_document(job: tuple) -> str:
    """Draw document ``d``'s images into ``src/images`` and return its JSONL row (a worker's unit)."""
    d, split, shots, gen, src, image_size, jpeg_quality = job
    k = int(np.random.default_rng([gen.seed, 2526, int(d)]).integers(shots[0], shots[1] + 1))
    ep = icl_episode(d, split=split, shots=k, generator=gen)
    items = []
    for j, (scene, text) in enumerate(zip([s for s, _, _ in ep.demos] + [ep.query[0]], ep.texts())):
        rel = f"images/{d:09d}_{j}.jpg"
        scene.render(image_size, ep.style).save(Path(src) / rel, quality=jpeg_quality)
        items += [{"image": rel}, {"text": text}]
    return json.dumps({"items": items}, ensure_ascii=False)


def write_icl_shards(out_dir: str | os.PathLike, *, split: str = "train", n_documents: int = 10000, start: int = 0,
                     shots: tuple[int, int] = (1, 8), seed: int = 0, image_size: int = 224,
                     samples_per_shard: int = 500, jpeg_quality: int = 92, overwrite: bool = False,
                     progress: bool = False, workers: int = 1, generator: SceneGenerator | None = None) -> list[Path]:
    """Interleaved webdataset shards of :func:`icl_episode` documents ``start .. start+n_documents``
    (each ``shots[0]..shots[1]`` demonstrations and the answered query); the same for a seed
    whatever ``workers`` (processes drawing the images), so data can be added in pieces. The
    source images are written to ``<out>/source`` and removed."""
    from ..data.custom import write_shards  # synthetic sits above data; this is a downward import

    lo, hi = shots
    if not 0 <= lo <= hi:
        raise ValueError(f"shots must satisfy 0 <= least <= most, got {shots}")
    if split not in ICL_SPLITS or workers < 1:
        raise ValueError(f"need split in {ICL_SPLITS} and workers >= 1, got {split!r}, {workers}")
    gen = generator or SceneGenerator(seed=seed)
    out = Path(out_dir)
    src = out / "source"
    shutil.rmtree(src, ignore_errors=True)
    (src / "images").mkdir(parents=True)
    jobs = [(d, split, (lo, hi), gen, str(src), image_size, jpeg_quality) for d in range(start, start + n_documents)]
    pool = None
    try:
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers)
            rows = pool.map(_write_document, jobs, chunksize=16)
        else:
            rows = map(_write_document, jobs)
        if progress:
            from ..progress import progress as tqdm

            rows = tqdm(rows, total=len(jobs), desc="icl episodes", unit="doc")
        (src / "episodes.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return write_shards(src / "episodes.jsonl", out, kind="interleaved", samples_per_shard=samples_per_shard,
                            overwrite=overwrite, strict=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(src, ignore_errors=True)


def write_icl_benchmark(folder: str | os.PathLike, *, n_episodes: int = 200, shots: int = 8, seed: int = 1,
                        split: str = "heldout", image_size: int = 224, jpeg_quality: int = 95,
                        generator: SceneGenerator | None = None, overwrite: bool = False) -> Path:
    """The evaluation folder of the ``synthetic_icl`` task: ``episodes.json`` and ``images/``.
    Episode ``i`` asks question type ``QUESTION_TYPES[i % 5]`` and holds ``shots`` demonstrations
    (a ``k``-shot evaluation uses the first ``k``). Written to a temporary folder, then renamed."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    gen = generator or SceneGenerator(seed=seed)
    from ..files import atomic_directory  # (here: files imports torch, which the CLI's parser must not)

    with atomic_directory(folder) as tmp:  # (modes as mkdir gives them: a shared benchmark stays readable)
        (tmp / "images").mkdir()
        episodes = []
        for i in range(n_episodes):
            ep = icl_episode(i, split=split, shots=shots, qtype=QUESTION_TYPES[i % len(QUESTION_TYPES)], generator=gen)

            def image(scene: Scene, name: str) -> str:
                scene.render(image_size, ep.style).save(tmp / "images" / name, quality=jpeg_quality, subsampling=0)
                return f"images/{name}"

            query, question, answer = ep.query
            episodes.append({
                "id": i, "question_type": ep.qtype, "phrasing": ep.phrasing, "framing": ep.framing,
                "answer_map": ep.answer_map.name, "lexicon": ep.answer_map.lexicon, "answer_format": ep.answer_format,
                "style": {"fill": ep.style.fill, "background": ep.style.background, "outline": ep.style.outline,
                          "blur": ep.style.blur, "scale": ep.style.scale},
                "image": image(query, f"{i:06d}_q.jpg"), "prompt": ep.chunk(question), "question": question,
                "answer": answer, "value": ep.value,
                "content_answers": content_words(ep.qtype, ep.value) + sorted(
                    {ep.answer_map.word(ep.value).lower()} - set(content_words(ep.qtype, ep.value))),
                "scene": query.to_dict(),
                "demos": [{"id": f"{i}-{j}", "image": image(s, f"{i:06d}_{j}.jpg"), "text": ep.chunk(q, a)}
                          for j, (s, q, a) in enumerate(ep.demos)],
            })
        meta = {"generator": "flamingo_vlm.synthetic.icl", "version": 1, "seed": gen.seed, "split": split,
                "shots": shots, "image_size": image_size, "question_types": list(QUESTION_TYPES)}
        (tmp / "episodes.json").write_text(json.dumps({"meta": meta, "episodes": episodes}, ensure_ascii=False),
                                           encoding="utf-8")
    return folder
