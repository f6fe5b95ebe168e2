#!/usr/bin/env python
"""Train with a loss on *where* the cross-attention looks, not only on the answer (a step of the
built-in model's recipe, not a library feature).

The aiming pilots (``research/aim_probe.py``) showed heads that pool every object in the picture and
never learn, from the answer's loss alone, to look at the object a question names. This script adds
a dataset of one-image questions that name one object ("What color is the <shape>?", "What shape
is the <colour> object?" and, with ``--aim-questions color,shape,position``, "Where is the
<colour> <shape>?"; scenes of the generator's ``pretrain`` split, made on the fly) and, for its
batches, a second loss: for the first ``--aim-heads`` heads of every cross-attention block, at
the named word and at the answer position, minus the log of the attention mass those heads give to
the named object's cells (each cell's feature token and its colour token; for a counting
question, "How many <shape>s are there?" with ``count``, the cells of every object it counts; for
"What word/number is written in the image?" with ``word``/``number``, the cells the written word
covers). The scene generator knows where every object and the word are, so the target is exact.
It needs a model whose perceiver passes its input cells through (``scripts/grow_adapter.py
--media-passthrough``).

The config's own datasets (if any) train as usual alongside; the aiming dataset adds
``--aim-batch`` documents per step with weight 1 on its answer loss and ``--aim-weight`` on its
attention loss. Checkpoints, ``--resume`` and the export are the trainer's.

    python scripts/aim_supervised.py --config research/configs/smol-synthetic-pilot-aim5.yaml --aim-batch 16
    python scripts/aim_supervised.py --config configs/smol-synthetic-stage12.yaml --aim-batch 8 \
        --aim-start 1100000 --aim-questions color,shape,position
    python scripts/aim_supervised.py --config configs/smol-synthetic-stage14.yaml --aim-batch 8 \
        --aim-start 1300000 --aim-questions color,shape,position,count,word,number \
        --aim-question-weights word=4,number=4
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import torch

from flamingo_vlm.data.dataset import Sample, collate, pad_token_id
from flamingo_vlm.data.preprocess import encode, pair_text, prompt_token_mask
from flamingo_vlm.modeling.cross_attention import MaskedCrossAttention, split_heads
from flamingo_vlm.synthetic import POSITIONS, SIZES, SceneGenerator
from flamingo_vlm.train.trainer import Callback, Trainer, trained_tokens

logger = logging.getLogger("flamingo_vlm.train")
GRID = 7  # EfficientNet-Lite0's feature grid at 224 px
QUESTION_TYPES = {"color": "what color is the", "shape": "what shape is the", "position": "where is the",
                  "count": "how many", "word": "what word is", "number": "what number is"}
TEXT_TYPES = (QUESTION_TYPES["word"], QUESTION_TYPES["number"])  # about the written word, not an object


def object_cells(obj, grid: int = GRID) -> list[int]:
    """Row-major cells whose centre lies inside the object's bounding box, and always the cell
    under its centre."""
    ax, ay = POSITIONS[obj.position]
    cx, cy, r = ax + obj.offset[0], ay + obj.offset[1], SIZES[obj.size]
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


def question_target(scene, question: dict, size: int) -> tuple[list[int], str]:
    """The cells a question is about and the word of the question that names them: the named
    objects' cells, or, for "What word/number is written in the image?", the written word's."""
    if question["question_type"] in TEXT_TYPES:
        return text_cells(scene, size), question["question"].split()[1]
    objs, word = named_objects(scene, question)
    return sorted({c for o in objs for c in object_cells(o)}), word


class AimDataset:
    """Endless batches of one-image questions of ``question_types`` with, per row, ``aim_cells`` (49 bools:
    the named objects' cells) and ``aim_positions`` (the named word's last token, the last prompt
    token). Deterministic in ``start``; its position is the next scene index."""

    def __init__(self, processor, *, batch_size: int, start: int, image_size: int = 224, max_tokens: int = 64,
                 question_types=("what color is the", "what shape is the"), generator: SceneGenerator | None = None,
                 question_weights: dict[str, float] | None = None):
        self.question_types = tuple(question_types)
        # None keeps the uniform draw of stages 12-13 (and their random stream)
        self.question_weights = question_weights
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.batch_size, self.image_size, self.max_tokens = batch_size, image_size, max_tokens
        self.gen = generator or SceneGenerator(seed=0)
        self.index = start
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = pad_token_id(self.tokenizer, self.eos_token_id)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def sample(self, index: int) -> dict | None:
        """Row of scene ``index``, or None when no object of it is unique in shape or colour."""
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
        cell_ids, word = question_target(scene, q, self.image_size)
        text = pair_text(f"Question:{q['question']} Short answer:{q['answer']}")
        ids = encode(self.tokenizer, text, self.max_tokens, self.eos_token_id)
        offsets = self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        word_end = text.rindex(word, 0, text.index("?")) + len(word)
        prompt_end = text.index("Short answer:") + len("Short answer:")
        positions = [max(i for i, (a, _) in enumerate(offsets) if a < end) for end in (word_end, prompt_end)]
        cells = torch.zeros(GRID * GRID, dtype=torch.bool)
        cells[cell_ids] = True
        image = self.processor.image_processor(scene.render(self.image_size))
        trainable = prompt_token_mask(self.tokenizer, text, len(ids), ("Short answer:",))
        return {"sample": Sample(ids, [image], trainable), "cells": cells, "positions": positions}

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
        return batch


def aim_loss(q: torch.Tensor, k: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Mean over rows, positions and heads of -log(attention mass on the target tokens).

    q (B, H, P, d) at the supervised positions, k (B, H, S, d) for one image whose last 98 tokens
    are the 49 feature and 49 colour tokens of the cells; cells (B, 49) bool."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # B, H, P, S
    base = k.shape[-2] - 2 * cells.shape[-1]
    target = torch.zeros(cells.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
    target[:, base:base + cells.shape[-1]] = cells
    target[:, base + cells.shape[-1]:] = cells
    on_target = logits.masked_fill(~target[:, None, None, :], -torch.inf).logsumexp(-1)
    return (logits.logsumexp(-1) - on_target).mean()


class AimTrainer(Trainer):
    """The trainer, plus the attention loss on batches that carry ``aim_cells``."""

    def __init__(self, *args, aim_weight: float, aim_heads: int, **kwargs):
        self.aim_weight, self.aim_heads = aim_weight, aim_heads
        self.aim_losses: list[tuple[float, float]] = []  # per aiming batch: answer loss, attention loss
        super().__init__(*args, **kwargs)
        self.blocks = [m for m in self.flamingo.modules() if isinstance(m, MaskedCrossAttention)]

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        if "aim_cells" not in batch:
            return super()._forward_loss(batch)
        cells = batch["aim_cells"].to(self.info.device)
        positions = batch["aim_positions"].to(self.info.device)
        losses: list[torch.Tensor] = []

        def hook(module, args):
            x, (k, _v) = args[0], args[1]
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            h = x[rows, positions]  # B, P, D
            q = split_heads(module.to_q(module.norm(h)), module.heads)[:, : self.aim_heads]
            losses.append(aim_loss(q, k[:, : self.aim_heads], cells))

        handles = [b.register_forward_pre_hook(hook) for b in self.blocks]
        try:
            token_sum = super()._forward_loss(batch)
        finally:
            for h in handles:
                h.remove()
        aim = torch.stack(losses).mean()
        n = trained_tokens(batch["labels"])
        self.aim_losses.append((float(token_sum.detach()) / max(n, 1), float(aim.detach())))
        # The trainer divides a dataset's token sum by its trained-token count: scale to match
        # (so the logged loss/aim is the answer loss plus aim_weight times the attention loss).
        return token_sum + self.aim_weight * aim * n


def main(argv=None) -> int:
    from flamingo_vlm.train.cli import _add_arguments, _setup_logging, config_from_args
    from flamingo_vlm.train.trainer import build_model, config_datasets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.add_argument("--aim-batch", type=int, default=16, help="aiming documents per step")
    p.add_argument("--aim-weight", type=float, default=1.0, help="weight of the attention loss")
    p.add_argument("--aim-heads", type=int, default=4, help="supervised heads of each block (the first ones)")
    p.add_argument("--aim-start", type=int, default=800000, help="first scene index of the aiming data")
    p.add_argument("--aim-questions", default="color,shape", help=f"question kinds, of {','.join(QUESTION_TYPES)}")
    p.add_argument("--aim-question-weights", default=None, metavar="KIND=W,...",
                   help="relative weight of a question kind when a scene has several (default: all 1, drawn "
                        "uniformly), e.g. word=6,number=6")
    args = p.parse_args(argv)
    kinds = args.aim_questions.split(",")
    if not kinds or set(kinds) - set(QUESTION_TYPES):
        p.error(f"--aim-questions: choose from {', '.join(QUESTION_TYPES)}, got {args.aim_questions!r}")
    weights = None
    if args.aim_question_weights:
        try:
            pairs = [item.split("=") for item in args.aim_question_weights.split(",")]
            weights = {QUESTION_TYPES[k.strip()]: float(v) for k, v in pairs}
        except (KeyError, ValueError):
            p.error(f"--aim-question-weights: expected KIND=W,... with KIND of {', '.join(kinds)}, "
                    f"got {args.aim_question_weights!r}")
        if any(w <= 0 for w in weights.values()) or set(weights) - {QUESTION_TYPES[k] for k in kinds}:
            p.error(f"--aim-question-weights: give positive weights to kinds of --aim-questions "
                    f"({args.aim_questions}), got {args.aim_question_weights!r}")
    cfg = config_from_args(args)
    _setup_logging()

    from flamingo_vlm.processing import FlamingoProcessor

    torch.manual_seed(cfg.seed)
    model, image_processor, tokenizer = build_model(cfg.model)
    if model.perceiver.passthrough_norm is None:
        raise SystemExit(f"{cfg.model.from_pretrained}: the perceiver does not pass its cells through; grow the "
                         "model with scripts/grow_adapter.py --media-passthrough")
    datasets = config_datasets(cfg, model, tokenizer, image_processor)
    datasets.append(AimDataset(FlamingoProcessor(tokenizer, image_processor), batch_size=args.aim_batch,
                               start=args.aim_start, question_types=[QUESTION_TYPES[k] for k in kinds],
                               question_weights=weights))

    class LogAim(Callback):
        def on_step_end(self, trainer, record):
            if record["step"] % cfg.log_every == 0:
                answer, attention = np.mean(trainer.aim_losses[-cfg.log_every:], axis=0)
                logger.info("step %d, aiming data: answer loss %.3f, attention loss %.3f (means over %d steps)",
                            record["step"], answer, attention, cfg.log_every)

    trainer = AimTrainer(cfg, model=(model, image_processor, tokenizer), datasets=datasets,
                         dataset_names=cfg.dataset_names() + ["aim"],
                         loss_weights=[d.effective_loss_weight() for d in cfg.data] + [1.0],
                         callbacks=[LogAim()], aim_weight=args.aim_weight, aim_heads=args.aim_heads)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    print(f"trained {result.step} steps; model saved to {result.export_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
