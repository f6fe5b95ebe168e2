"""Measure a model on the synthetic world at several shot counts: the built-in model's model card.

    python -m flamingo_vlm.eval.card --model smol-synthetic --out results/smol-synthetic

1. writes the synthetic benchmark from a generator seed the model was not trained on (seed 1),
   keeping the training run's held-out (shape, colour) pairs held out (they show up in ~30% of
   the evaluation scenes);
2. runs the standard harness (:mod:`flamingo_vlm.eval.evaluator`): captioning (CIDEr), VQA
   (VQAv2 accuracy) and classification (top-1 over the 36 colour-shape classes);
   and the in-context episodes (``synthetic_icl``: held-out phrasings, answer maps, framings and
   drawing styles; accuracy per question type and on the answer-format split, whose answers only
   the demonstrations show; see :mod:`flamingo_vlm.synthetic.icl`);
3. runs in-context name binding (:mod:`flamingo_vlm.eval.binding`) with held-out names;
4. writes ``card.json``, ``card.md`` (a table) and ``shots.png`` (score vs shots).

Finished harness units are reused when run again (the harness is resumable).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ..files import atomic_file
from ..locking import exclusive_directory
from .results import atomic_write_json, atomic_write_text

TRAIN_SEED = 0
EVAL_SEED = 1
HARNESS_TASKS = ("coco", "vqav2", "imagenet", "synthetic_icl")
LABELS = {"coco": "captioning CIDEr", "vqav2": "VQA accuracy (%)", "imagenet": "classification top-1 (%)",
          "synthetic_icl": "in-context episodes, held out (%)", "binding": "name binding, 2-way (%)"}
_FOLDERS = {"coco": "mscoco_karpathy", "vqav2": "vqav2", "imagenet": "imagenet", "synthetic_icl": "synthetic_icl"}


def eval_generator():
    """The card's evaluation scene generator: seed 1, with the training run's (seed 0) held-out
    (shape, colour) pairs held out (the probes in ``research/`` evaluate on it too)."""
    from ..synthetic import SceneGenerator

    held = SceneGenerator(seed=TRAIN_SEED).held_out_pairs
    return SceneGenerator(seed=EVAL_SEED, held_out=held)


def run_card(model: str, out: str | Path, *, shots=(0, 1, 2, 4, 8), n_test: int = 100, trials: int = 1,
             binding_episodes: int = 200, precision: str = "bf16", num_beams: int = 3, batch_size: int = 8,
             progress: bool = True, quantize: str | None = None) -> dict:
    shots = list(shots)
    # said before the data is written and the model loads (a traceback after writing the data: n_test=0
    # left a benchmark without test scenes that every later run took as written)
    for name, value in (("n_test", n_test), ("binding_episodes", binding_episodes), ("trials", trials)):
        if value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}")
    if not shots or min(shots) < 0 or len(set(shots)) < len(shots):
        raise ValueError(f"shots (--shots) must be distinct non-negative numbers, got {shots}")
    out = Path(out)
    with exclusive_directory(out):  # the benchmark data and the harness units are shared by reruns
        return _run_card(model, out, shots=shots, n_test=n_test, trials=trials, binding_episodes=binding_episodes,
                         precision=precision, num_beams=num_beams, batch_size=batch_size, progress=progress,
                         quantize=quantize)


def _run_card(model: str, out: Path, *, shots, n_test, trials, binding_episodes, precision, num_beams, batch_size,
              progress, quantize=None) -> dict:
    from ..pretrained import from_pretrained
    from .binding import evaluate_binding
    from .evaluator import PRECISIONS, EvalConfig, evaluate
    from ..synthetic import write_synthetic_benchmark

    data = out / "data"
    gen = eval_generator()
    sizes = {"n_train": 256, "n_val": 8, "n_test": n_test, "n_class_train_per_class": 8,
             "n_class_val_per_class": max(1, n_test // 36 + 1)}
    try:
        written = json.loads((data / "synthetic.json").read_text())
    except (OSError, ValueError):
        written = {}
    if written.get("sizes") != sizes or written.get("image_size") != 224:
        # data written for another --n-test: all of it again (it was kept, and a card asked for 50 queries
        # evaluated the 4 of an earlier run's data, and said 50)
        missing = list(HARNESS_TASKS)
    else:  # a card folder from before a task was added gets just that task's data
        missing = [t for t in HARNESS_TASKS if not (data / _FOLDERS[t]).is_dir()]
    if missing:
        write_synthetic_benchmark(data, generator=gen, tasks=missing, **sizes, image_size=224, overwrite=True)
    icl_demos = json.loads((data / _FOLDERS["synthetic_icl"] / "episodes.json").read_text())["meta"]["shots"]
    if max(shots) > icl_demos:  # (said after the other tasks had run, minutes later)
        raise ValueError(f"--shots {max(shots)}: the in-context episodes hold {icl_demos} demonstrations; "
                         f"use --shots up to {icl_demos}")
    dtype = PRECISIONS[precision]
    loaded = from_pretrained(model, dtype=None if dtype == torch.float32 else dtype, quantize=quantize)
    t0 = time.perf_counter()
    config = EvalConfig(tasks=list(HARNESS_TASKS), data_root=str(data), out_dir=str(out / "harness"), shots=list(shots),
                        trials=trials, num_samples=n_test, batch_size=batch_size, num_beams=num_beams,
                        precision=precision, quantize=quantize, progress=progress, model_name=model)
    harness = evaluate(loaded[0], config, image_processor=loaded[1], tokenizer=loaded[2])["results"]
    binding = {}
    for k in shots:
        r = evaluate_binding(*loaded, shots=k, ways=2, episodes=binding_episodes, generator=gen, progress=progress)
        binding[k] = r.accuracy * 100
    seconds = time.perf_counter() - t0
    table = {task: {int(r["shots"]): float(r["mean"]) for r in rows} for task, rows in harness.items()}
    table["binding"] = binding
    vqa_types: dict[str, dict[int, float]] = {}  # which questions the model gets right
    for r in harness.get("vqav2", []):
        for qtype, acc in r["metrics"].get("per_question_type", {}).items():
            vqa_types.setdefault(qtype, {})[int(r["shots"])] = acc
    icl: dict[str, dict[int, float]] = {}  # in-context episodes by question type, and the answer-format split
    for r in harness.get("synthetic_icl", []):
        m = r["metrics"]
        for qtype, acc in m.get("per_question_type", {}).items():
            icl.setdefault(qtype, {})[int(r["shots"])] = acc
        icl.setdefault("answer-format split", {})[int(r["shots"])] = m.get("answer_format_split", float("nan"))
        icl.setdefault("content (any vocabulary)", {})[int(r["shots"])] = m.get("content_accuracy", float("nan"))
    by_pair: dict[str, dict[int, dict[str, float]]] = {}  # scenes that show a held-out pair, and the others
    for task, rows in harness.items():
        for r in rows:
            split = r.get("metrics", {}).get("held_out_pairs")
            if split:
                by_pair.setdefault(task, {})[int(r["shots"])] = dict(split)
    card = {"model": model, "shots": list(shots), "scores": table, "labels": LABELS, "vqa_by_question": vqa_types,
            "icl_by_question": icl, "by_held_out_pair": by_pair,
            "n_test": n_test,
            "trials": trials, "binding_episodes": binding_episodes, "precision": precision, "quantize": quantize, "num_beams": num_beams,
            "eval_seed": EVAL_SEED, "held_out_pairs": sorted(map(list, gen.held_out_pairs)), "seconds": round(seconds, 1)}
    atomic_write_json(out / "card.json", card)
    atomic_write_text(out / "card.md", markdown(card))
    try:
        plot(card, out / "shots.png")
    except ImportError:  # matplotlib is optional
        pass
    return card


def _num(value) -> float:
    """A score of the card: ``null`` in card.json (a score that does not exist: strict JSON has no NaN)
    is NaN, as it was before writing."""
    return math.nan if value is None else value


def markdown(card: dict) -> str:
    """The card as markdown tables (``card`` as :func:`run_card` returns it, or as read from card.json)."""
    shots = card["shots"]
    lines = ["| task | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for task, label in card["labels"].items():
        row = {int(k): v for k, v in card["scores"].get(task, {}).items()}  # (card.json: keys are strings)
        lines.append(f"| {label} | " + " | ".join(f"{_num(row[k]):.1f}" if k in row else "-" for k in
                                                   (int(s) for s in shots)) + " |")
    by_question = card.get("vqa_by_question")
    if by_question:
        lines += ["", "VQA accuracy (%) by question type:", "",
                  "| question | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for qtype, row in sorted(by_question.items()):
            row = {int(k): v for k, v in row.items()}  # JSON keys are strings
            lines.append(f"| {qtype} ... | " + " | ".join(f"{_num(row[k]):.0f}" if k in row else "-" for k in
                                                          (int(s) for s in shots)) + " |")
    icl = card.get("icl_by_question")
    if icl:
        lines += ["", "In-context episodes (held-out phrasings, answer maps, framings, styles; 0 shots = the query "
                  "alone), accuracy (%) by question type; the answer-format split's answers only the demos show:", "",
                  "| episodes | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for name, row in icl.items():
            row = {int(k): v for k, v in row.items()}
            lines.append(f"| {name} | " + " | ".join(f"{_num(row[k]):.0f}" if k in row else "-" for k in
                                                     (int(s) for s in shots)) + " |")
    by_pair = card.get("by_held_out_pair")
    if by_pair:
        lines += ["", "Scores on the queries that show a (shape, colour) pair held out of training, and on the others:",
                  "", "| task | queries | " + " | ".join(f"{k} shots" for k in shots) + " |",
                  "|---|---|" + "---|" * len(shots)]
        for task, label in card["labels"].items():
            row = {int(k): v for k, v in by_pair.get(task, {}).items()}
            if not row:
                continue
            for part, name in (("shown", "held-out pair"), ("not_shown", "seen pairs only")):
                lines.append(f"| {label} | {name} | " + " | ".join(
                    f"{_num(row[k][part]):.1f}" if k in row else "-" for k in (int(s) for s in shots)) + " |")
    # how the model was run (card.json had it, the page did not: int8 numbers read as the model's own)
    run = [f"{name} `{card[key]}`" for key, name in (("precision", "precision"), ("quantize", "quantized"),
                                                      ("num_beams", "beams")) if card.get(key) is not None]
    run += [f"{card['n_test']} queries per task and shot count"] if card.get("n_test") else []
    run += [f"{card['trials']} trial(s)"] if card.get("trials") else []
    if run:
        lines += ["", "Run: " + ", ".join(run) + "."]
    return "\n".join(lines) + "\n"


def plot(card: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for task in ("vqav2", "imagenet", "synthetic_icl", "binding"):
        row = {int(k): _num(v) for k, v in card["scores"].get(task, {}).items()}
        if row:
            ax1.plot(list(row), list(row.values()), marker="o", label=card["labels"][task])
    ax1.axhline(50, color="grey", lw=0.8, ls=":", label="binding chance")
    ax1.set(xlabel="shots", ylabel="%", ylim=(0, 100), title="accuracy vs shots")
    ax1.legend(fontsize=8)
    row = {int(k): _num(v) for k, v in card["scores"].get("coco", {}).items()}
    ax2.plot(list(row), list(row.values()), marker="o", color="C3")
    ax2.set(xlabel="shots", ylabel="CIDEr", title="captioning CIDEr vs shots")
    # from 0 (a zoomed axis makes a few points of noise look like a trend), with room above the highest point
    # (a flat line sat on the frame, its markers cut in half)
    # (a NaN CIDEr is a gap in the line, not the axis limit: matplotlib refuses NaN limits)
    ax2.set_ylim(0, 1.1 * max((v for v in row.values() if math.isfinite(v)), default=0) or None)
    for ax in (ax1, ax2):
        ax.set_xticks(card["shots"])
        ax.grid(alpha=0.3)
    quantized = f", {card['quantize']}" if card.get("quantize") else ""
    fig.suptitle(f"{card['model']}{quantized} on held-out synthetic scenes (seed {card['eval_seed']})")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flamingo_vlm.eval.card", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smol-synthetic")
    p.add_argument("--out", default="results/smol-synthetic")
    p.add_argument("--shots", default="0,1,2,4,8")
    p.add_argument("--n-test", type=int, default=100, help="queries per task and shot count")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--binding-episodes", type=int, default=200)
    p.add_argument("--precision", choices=("fp32", "bf16", "amp_bf16"), default="bf16")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantized LM/cross-attention/perceiver")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    def run() -> int:
        try:
            shots = [int(s) for s in a.shots.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--shots takes comma-separated integers, got {a.shots!r}") from None
        card = run_card(a.model, a.out, shots=shots, n_test=a.n_test, trials=a.trials,
                        binding_episodes=a.binding_episodes, precision=a.precision, num_beams=a.num_beams,
                        batch_size=a.batch_size, progress=not a.quiet, quantize=a.quantize)
        print(markdown(card))
        print(f"wrote {Path(a.out) / 'card.json'}, card.md, shots.png ({card['seconds']:.0f} s)")
        return 0

    from ..errors import report_errors
    from ..train.cli import user_errors

    # bad input and Ctrl-C in one line (a traceback), as the flamingo-vlm commands say them
    return report_errors("python -m flamingo_vlm.eval.card", run, user_errors)


if __name__ == "__main__":
    raise SystemExit(main())
