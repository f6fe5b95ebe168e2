"""The aiming data (``TrainConfig.aim``): one-image questions that name what to look at, and where it is.

Scenes of the synthetic generator's ``pretrain`` split (:mod:`flamingo_vlm.synthetic`), made on the
fly, each with one question that names an object ("What color is the <shape>?", "What shape is the
<colour> object?", "Where is the <colour> <shape>?"), the objects it counts ("How many <shape>s are
there?") or the written word ("What word/number is written in the image?"). The generator knows
where every object and the word are, so the target of the attention is exact: the grid cells the
named objects (or the word) cover. Rows carry ``aim_cells`` (B, cells) and ``aim_positions`` (B, 2:
the naming word's last token and the last prompt token) for :class:`~.losses.AttentionAim`; only the
answer is trained by the LM loss (``loss_after: ["Short answer:"]``).

With ``episode_rate`` a share of the rows are in-context episodes of the training split instead
(:func:`~flamingo_vlm.synthetic.icl.icl_episode`: 1 to ``episode_shots`` demonstrations and a query
sharing a phrasing, a framing, an answer map and a drawing style). The target is the query's named
object (or word), ``aim_media`` says which of the row's images is the query, and only the query's
answer is trained. Aiming in the card's wording alone teaches the cross-attention to look when asked
"Question:What color is the circle? Short answer:"; the episodes ask in many other words.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.dataset import Sample, collate, pad_token_id
from ..data.preprocess import EOC_TOKEN, MEDIA_TOKEN, encode, pair_text, prompt_token_mask
from ..synthetic import COLORS, SHAPES, SIZES, SceneGenerator
from ..synthetic.icl import icl_episode, restyle

#: the ``aim.questions`` kinds and the generator's question types they select
QUESTION_TYPES = {"color": "what color is the", "shape": "what shape is the", "position": "where is the",
                  "count": "how many", "word": "what word is", "number": "what number is"}
TEXT_TYPES = (QUESTION_TYPES["word"], QUESTION_TYPES["number"])  # about the written word, not an object
#: the in-context episodes' question types (:data:`flamingo_vlm.synthetic.icl.QUESTION_TYPES`) of each kind
EPISODE_TYPES = {"color": "color", "shape": "shape", "position": "position", "count": "count", "word": "word"}
GRID = 7  # the built-in EfficientNet-Lite0's feature grid at 224 px


def object_cells(obj, grid: int = GRID, scale: float = 1.0) -> list[int]:
    """Row-major cells whose centre lies inside the object's bounding box (drawn ``scale`` times its
    size), and always the cell under its centre."""
    (cx, cy), r = obj.centre, SIZES[obj.size] * scale
    centre = min(int(cy * grid), grid - 1) * grid + min(int(cx * grid), grid - 1)
    inside = [row * grid + col for row in range(grid) for col in range(grid)
              if abs((col + 0.5) / grid - cx) <= r and abs((row + 0.5) / grid - cy) <= r]
    return sorted(set(inside) | {centre})


def named_objects(scene, question: dict) -> tuple[list, str]:
    """The objects a question is about and the word that names them. A colour, shape or position
    question names one object (the generator asks only about unique ones; for a position question
    the word is its shape); a counting question names every object it counts ("shapes", "circles")."""
    words = question["question"].rstrip("?").split()
    kind = question["question_type"]
    if kind == "what color is the":
        keys, word = {"shape": words[-1]}, words[-1]
    elif kind == "what shape is the":
        keys, word = {"color": words[-2]}, words[-2]
    elif kind == "where is the":
        keys, word = {"color": words[-2], "shape": words[-1]}, words[-1]
    elif kind == "how many":  # "How many <shape>s are there?"
        word = words[2]
        keys = {} if word == "shapes" else {"shape": word[:-1]}
    else:
        raise ValueError(f"no named object in a {kind!r} question")
    matches = [o for o in scene.objects if all(getattr(o, k) == v for k, v in keys.items())]
    if not matches or (kind != "how many" and len(matches) != 1):
        raise ValueError(f"{question['question']!r} names {len(matches)} objects of the scene")
    return matches, word


def text_cells(scene, size: int, grid: int = GRID) -> list[int]:
    """Row-major cells that the written word covers by at least a twentieth of their area, in the scene
    rendered at ``size`` pixels (the word is one row of cells high, one to three wide)."""
    x0, y0, x1, y1 = scene.text_box(size)
    cell = size / grid
    out = []
    for row in range(grid):
        for col in range(grid):
            w = min(x1, (col + 1) * cell) - max(x0, col * cell)
            h = min(y1, (row + 1) * cell) - max(y0, row * cell)
            if w > 0 and h > 0 and w * h >= 0.05 * cell * cell:
                out.append(row * grid + col)
    return out


def question_target(scene, question: dict, size: int, grid: int = GRID, scale: float = 1.0) -> tuple[list[int], str]:
    """The cells a question is about and the word of the question that names them: the named
    objects' cells (shapes drawn ``scale`` times their size), or, for "What word/number is written
    in the image?", the written word's."""
    if question["question_type"] in TEXT_TYPES:
        return text_cells(scene, size, grid), question["question"].split()[1]
    objs, word = named_objects(scene, question)
    return sorted({c for o in objs for c in object_cells(o, grid, scale)}), word


def episode_target(scene, qtype: str, question: str, value: str, size: int, grid: int = GRID,
                   scale: float = 1.0) -> tuple[list[int], str]:
    """The cells an in-context episode's question (any phrasing) is about and the word of the
    question that names them: the object of the named shape (colour question), of the named colour
    (shape question) or both (position); for counting, every object of the named shape, or every
    object when none is named; for the written word, the word's cells."""
    words = question.lower().replace("?", " ").replace(".", " ").replace(":", " ").replace("'", " ").split()
    shape = next((w for w in words for s in SHAPES if w in (s, s + "s")), None)
    color = next((w for w in words if w in COLORS), None)
    if qtype == "word":
        return text_cells(scene, size, grid), words[-1]
    if qtype == "count":
        objs = [o for o in scene.objects if shape is None or o.shape == shape.removesuffix("s")]
        if len(objs) != int(value):
            raise ValueError(f"{question!r} counts {len(objs)} objects, the answer says {value}")
        word = shape or words[-1]
    else:
        keys = {"color": {"shape": shape}, "shape": {"color": color}, "position": {"shape": shape, "color": color}}[qtype]
        objs = [o for o in scene.objects if all(getattr(o, k) == v for k, v in keys.items())]
        if len(objs) != 1:
            raise ValueError(f"{question!r} names {len(objs)} objects of the scene")
        word = shape if qtype != "shape" else color
    return sorted({c for o in objs for c in object_cells(o, grid, scale)}), word


class AimDataset:
    """Endless batches of one-image questions of ``question_types`` with, per row, ``aim_cells``
    (``grid * grid`` bools: the target cells) and ``aim_positions`` (the named word's last token, the
    last prompt token). Deterministic in ``start``; its position is the next scene index.
    ``question_weights`` (question type -> weight): how a scene's question is drawn when it has
    several (None: uniformly). ``style_rate``: the share of scenes drawn as the in-context episodes
    draw theirs (:func:`~flamingo_vlm.synthetic.icl.restyle`), their target cells moved with them.
    ``episode_rate``: the share of rows that are in-context episodes of 1 to ``episode_shots``
    demonstrations (of ``episode_types``, the in-context question types), ``aim_media`` (B,) the
    query's image; ``max_tokens`` must hold them (an episode that does not fit is drawn again)."""

    def __init__(self, processor, *, batch_size: int, start: int, image_size: int = 224, max_tokens: int = 64,
                 question_types=("what color is the", "what shape is the"), generator: SceneGenerator | None = None,
                 question_weights: dict[str, float] | None = None, grid: int = GRID, style_rate: float = 0.0,
                 episode_rate: float = 0.0, episode_shots: int = 4, episode_types=("color", "shape")):
        self.question_types = tuple(question_types)
        self.question_weights = question_weights
        self.style_rate = style_rate
        self.episode_rate, self.episode_shots, self.episode_types = episode_rate, episode_shots, tuple(episode_types)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.batch_size, self.image_size, self.max_tokens, self.grid = batch_size, image_size, max_tokens, grid
        self.gen = generator or SceneGenerator(seed=0)
        self.index = start
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = pad_token_id(self.tokenizer, self.eos_token_id)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def sample(self, index: int) -> dict | None:
        """Row of scene ``index``, or None when the scene has no question of the chosen types."""
        if self.episode_rate and np.random.default_rng([self.gen.seed, 4244, index]).random() < self.episode_rate:
            return self.episode(index)
        scene = self.gen.scene(index, "pretrain")
        rng = np.random.default_rng([self.gen.seed, 4242, index])
        questions = [q for q in scene.questions() if q["question_type"] in self.question_types]
        if not questions:
            return None
        if self.question_weights is None:
            q = questions[int(rng.integers(len(questions)))]
        else:
            w = np.array([self.question_weights.get(q["question_type"], 1.0) for q in questions])
            q = questions[int(rng.choice(len(questions), p=w / w.sum()))]
        style = None
        srng = np.random.default_rng([self.gen.seed, 4243, index]) if self.style_rate else None
        if srng is not None and srng.random() < self.style_rate:  # drawn as an in-context episode would be; answers unchanged
            scene, style = restyle(scene, srng)
        cell_ids, word = question_target(scene, q, self.image_size, self.grid, style.scale if style else 1.0)
        text = pair_text(f"Question:{q['question']} Short answer:{q['answer']}")
        ids = encode(self.tokenizer, text, self.max_tokens, self.eos_token_id)
        offsets = self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        word_end = text.rindex(word, 0, text.index("?")) + len(word)
        prompt_end = text.index("Short answer:") + len("Short answer:")
        positions = [max(i for i, (a, _) in enumerate(offsets) if a < end) for end in (word_end, prompt_end)]
        cells = torch.zeros(self.grid * self.grid, dtype=torch.bool)
        cells[cell_ids] = True
        image = self.processor.image_processor(scene.render(self.image_size, style))
        trainable = prompt_token_mask(self.tokenizer, text, len(ids), ("Short answer:",))
        return {"sample": Sample(ids, [image], trainable), "cells": cells, "positions": positions, "media": 0}

    def episode(self, index: int) -> dict | None:
        """Row ``index`` as an in-context episode of the training split (None when it does not fit
        ``max_tokens``): demonstrations, then the query with its answer, chunks joined by a new line
        as the ``synthetic_icl`` evaluation joins them."""
        rng = np.random.default_rng([self.gen.seed, 4245, index])
        shots = int(rng.integers(1, self.episode_shots + 1))
        qtype = self.episode_types[int(rng.integers(len(self.episode_types)))]
        ep = icl_episode(index, split="train", shots=shots, qtype=qtype, generator=self.gen)
        (scene, question, answer), style = ep.query, ep.style
        cell_ids, word = episode_target(scene, qtype, question, ep.value, self.image_size, self.grid, style.scale)
        text = "".join(f"{MEDIA_TOKEN}{ep.chunk(q, a)}{EOC_TOKEN}\n" for _, q, a in ep.demos)
        query_at = len(text) + len(MEDIA_TOKEN)
        prompt_end = query_at + len(ep.chunk(question))
        text += f"{MEDIA_TOKEN}{ep.chunk(question, answer)}{EOC_TOKEN}"
        offsets = self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) + 1 > self.max_tokens:  # + the eos
            return None
        ids = encode(self.tokenizer, text, self.max_tokens, self.eos_token_id)
        word_at = query_at + ep.chunk(question).index(question)
        word_end = word_at + question.lower().rindex(word) + len(word)
        positions = [max(i for i, (a, _) in enumerate(offsets) if a < end) for end in (word_end, prompt_end)]
        cells = torch.zeros(self.grid * self.grid, dtype=torch.bool)
        cells[cell_ids] = True
        images = [self.processor.image_processor(s.render(self.image_size, style)) for s, _, _ in ep.demos]
        images.append(self.processor.image_processor(scene.render(self.image_size, style)))
        trainable = [a >= prompt_end for a, _ in offsets] + [True] * (len(ids) - len(offsets))
        return {"sample": Sample(ids, images, trainable[:len(ids)]), "cells": cells, "positions": positions,
                "media": len(images) - 1}

    def __iter__(self):
        while True:
            rows = []
            while len(rows) < self.batch_size:
                row = self.sample(self.index)
                self.index += 1
                if row is not None:
                    rows.append(row)
            yield self.collate(rows)

    def collate(self, rows: list[dict]) -> dict:
        batch = collate([r["sample"] for r in rows], pad_token_id=self.pad_token_id,
                        media_token_id=self.processor.media_token_id, eoc_token_id=self.processor.eoc_token_id,
                        eos_token_id=self.eos_token_id, empty_image_shape=(3, self.image_size, self.image_size))
        batch["aim_cells"] = torch.stack([r["cells"] for r in rows])
        batch["aim_positions"] = torch.tensor([r["positions"] for r in rows])
        batch["aim_media"] = torch.tensor([r["media"] for r in rows])
        return batch
