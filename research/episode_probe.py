#!/usr/bin/env python
"""Do a model's in-context answers depend on the drawing style, or on the episode's wording?

Writes four ``synthetic_icl`` benchmark folders of the same episodes (generator seed 1, 224 px):
the training split and the held-out split, each drawn in the episodes' own styles and drawn plain
(solid fills, plain background, no outline or blur; the objects' sizes and off-grid places kept),
then runs ``flamingo-vlm evaluate`` on each at one shot count and prints accuracy, content accuracy
(the right thing named in any vocabulary) and per-type accuracy.

    python research/episode_probe.py --model runs/smol-synthetic-stage16/final --episodes 100 --shots 4

If plain rows score like styled ones, drawing is not what holds the episodes back. The script also
prints how often the answer is one of the demonstrations' answers and, among those, how often it is
the right one: a model that copies the demos' form but ignores the query image lands near 1 / shots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from flamingo_vlm.eval.results import read_unit

FOLDERS = ("train-plain", "train-styled", "heldout-plain", "heldout-styled")


def write(root: Path, episodes: int, shots: int) -> None:
    from flamingo_vlm.synthetic import icl

    original = icl._style
    for name in FOLDERS:
        split, look = name.split("-")
        folder = root / name
        if (folder / "synthetic.json").is_file():
            continue
        icl._style = original if look == "styled" else (
            lambda rng, s: dataclasses.replace(original(rng, s), fill="solid", background="plain", outline=0, blur=0.0))
        try:
            icl.write_icl_benchmark(folder / "synthetic_icl", n_episodes=episodes, shots=shots, seed=1, split=split,
                                    image_size=224, overwrite=True)
        finally:
            icl._style = original
        (folder / "synthetic.json").write_text(json.dumps({"generator": "flamingo_vlm.eval.synthetic", "version": 1,
                                                           "seed": 1, "image_size": 224,
                                                           "tasks": {"synthetic_icl": str(folder / "synthetic_icl")}}))


def copying(folder: Path, result: Path, shots: int) -> tuple[int, int, int]:
    """(answers that repeat a demo's answer, of those the right ones, all answers)."""
    episodes = {e["id"]: e for e in json.loads((folder / "synthetic_icl" / "episodes.json").read_text())["episodes"]}
    repeated = right = 0
    preds = read_unit(result)["predictions"]
    for p in preds:
        e = episodes[p["id"]]
        pre, rest = e["framing"].split("{q}")
        mid = rest.split("{a}")[0]
        # a demo is pre + question + mid + answer; its question has the phrasing's number of words
        skip = len(e["phrasing"].split()) + len(mid.split())
        answers = [" ".join(d["text"][len(pre):].split()[skip:]) for d in e["demos"][:shots]]
        if " ".join(p["prediction"].split()) in answers:
            repeated += 1
            right += " ".join(p["prediction"].split()) == " ".join(e["answer"].split())
    return repeated, right, len(preds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--root", default="results/episode_probe")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    root = Path(args.root)
    write(root, args.episodes, args.shots)
    print("| model | episodes | accuracy | content | colour / shape / count / position / word | repeats a demo (right) |")
    print("|---|---|---|---|---|---|")
    for model in args.model:
        for name in FOLDERS:
            out = root / "out" / model.replace("/", "_") / name
            result = out / "synthetic_icl" / f"shots{args.shots}_seed42.json"
            if not result.is_file():
                subprocess.run([sys.executable, "-m", "flamingo_vlm.cli", "evaluate", "--model", model, "--tasks",
                                "synthetic_icl", "--data-root", str(root / name), "--shots", str(args.shots),
                                "--trials", "1", "--precision", args.precision, "--out", str(out)],
                               check=True, stdout=subprocess.DEVNULL)
            m = read_unit(result)["metrics"]  # (null scores back to NaN)
            t = m["per_question_type"]
            rep, right, n = copying(root / name, result, args.shots)
            print(f"| {model} | {name} | {m['accuracy']:.0f} | {m['content_accuracy']:.0f} | "
                  + " / ".join(f"{t.get(k, float('nan')):.0f}" for k in ("color", "shape", "count", "position", "word"))
                  + f" | {rep}/{n} ({right}) |")


if __name__ == "__main__":
    main()
