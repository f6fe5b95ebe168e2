#!/usr/bin/env python
"""Which drawing axis of the in-context episodes stops a model recognising a scene?

The card's scenes (evaluation generator, test split) are asked about 0-shot in the card's own
``Question:... Short answer:`` format, colour, shape, count and position, ranking every possible
answer (ranking, not generation: the question is whether the answer reaches the LM). Each scene is
drawn the card's way and then with one axis of :class:`~flamingo_vlm.synthetic.render.Style` (or
the episodes' off-grid offsets) changed at a time, and finally with an episode's whole random style.

    python research/style_probe.py --model smol-synthetic --scenes 30

A row far below ``card`` names an axis the model does not read through; the episodes' styles
combine several axes, so their row is lower than any one alone if the effects add up.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm


def variants() -> dict[str, dict]:
    from flamingo_vlm.synthetic.render import Style

    out: dict[str, dict] = {"card": {}, "styled, no change": {"style": Style()}, "off-grid offsets": {"offsets": True}}
    out["outline 2 px"] = {"style": Style(outline=2)}
    out["blur 1 px"] = {"style": Style(blur=1.0)}
    out["scale 0.8"] = {"style": Style(scale=0.8)}
    out["scale 1.15"] = {"style": Style(scale=1.15)}
    for fill in ("outline", "striped", "dotted", "hatched", "checked"):
        out[f"fill {fill}"] = {"style": Style(fill=fill)}
    for back in ("gradient", "noise", "paper", "lines", "checker"):
        out[f"background {back}"] = {"style": Style(background=back)}
    out["episode style (train)"] = {"episode": "train"}
    out["episode style (heldout)"] = {"episode": "heldout"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model name or folder (repeatable; default smol-synthetic)")
    p.add_argument("--scenes", type=int, default=30, help="scenes per row")
    p.add_argument("--only", nargs="*", help="only these rows")
    args = p.parse_args(argv)

    import torch

    from flamingo_vlm.eval.card import eval_generator
    from flamingo_vlm.generate import rank_candidates
    from flamingo_vlm.pretrained import from_pretrained
    from flamingo_vlm.synthetic import COLORS, SHAPES
    from flamingo_vlm.synthetic.icl import restyle
    from flamingo_vlm.synthetic.render import POSITIONS, Style

    gen = eval_generator()
    scenes = []
    i = 0
    while len(scenes) < args.scenes:
        s = gen.scene(i, split="test")
        i += 1
        shapes, colours = [o.shape for o in s.objects], [o.color for o in s.objects]
        by_shape = next((o for o in s.objects if shapes.count(o.shape) == 1), None)
        by_colour = next((o for o in s.objects if colours.count(o.color) == 1), None)
        both = next((o for o in s.objects if shapes.count(o.shape) == 1 and colours.count(o.color) == 1), None)
        if by_shape and by_colour and both:
            scenes.append((s, by_shape, by_colour, both))
    rows = {k: v for k, v in variants().items() if not args.only or k in args.only}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.model or ["smol-synthetic"]:
        model, ip, tok = from_pretrained(name, dtype=torch.float32)
        model.eval()
        table: dict[str, dict[str, float]] = {}
        for row, how in tqdm(rows.items(), desc=name):
            hits = defaultdict(list)
            for k, (s, by_shape, by_colour, both) in enumerate(scenes):
                rng = np.random.default_rng([7, k])
                scene, style = s, how.get("style")
                if "episode" in how:  # a random style of the split, off the grid
                    scene, style = restyle(s, rng, how["episode"])
                elif how.get("offsets"):
                    scene = restyle(s, rng, style=Style())[0]
                image = scene.render(224, style)
                asks = [("colour", f"What color is the {by_shape.shape}?", list(COLORS), by_shape.color),
                        ("shape", f"What shape is the {by_colour.color} object?", list(SHAPES), by_colour.shape),
                        ("count", "How many shapes are there?", ["1", "2", "3", "4"], str(len(s.objects))),
                        ("position", f"Where is the {both.color} {both.shape}?", list(POSITIONS), both.position)]
                for kind, q, names, want in asks:
                    ranked = rank_candidates(model, ip, tok, [image, f"Question:{q} Short answer:"], names)
                    hits[kind].append(ranked[0][0] == want)
            table[row] = {k: 100 * sum(v) / len(v) for k, v in hits.items()}
        results[name] = table
        del model
    for name, table in results.items():
        print(f"\n{name}: top-1 % of the ranked answer, 0-shot, {args.scenes} card test scenes per row "
              "(chance: colour 17, shape 17, count 25, position 20)")
        print("| drawn | colour | shape | count | position |")
        print("|---|---|---|---|---|")
        for row, r in table.items():
            print(f"| {row} | {r['colour']:.0f} | {r['shape']:.0f} | {r['count']:.0f} | {r['position']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
