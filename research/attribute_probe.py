#!/usr/bin/env python
"""Can a model tell an object's colour, and its shape, and does that hold as scenes get busier?

For scenes of 1-4 objects (evaluation generator seed, never trained on) it asks, 0-shot,
"What color is the <shape>?" and "What shape is the <colour> object?" about an object whose shape
(or colour) is unique in the scene, ranks every colour (or shape) name as the answer, and prints
top-1 accuracy by number of objects. Ranking, not generation: it measures whether the answer is in
what reaches the LM, whatever the decoding does.

    python research/attribute_probe.py --model smol-synthetic --scenes 40

A model that sees colour but cannot bind it to the right object is right on 1-object scenes and
falls towards chance (1/6) as objects are added. The same answers are then split by whether the
asked-about object is one of the (shape, colour) pairs held out of training (the evaluation split
shows one in about 30% of its scenes).

Then it traces where the answer's information goes: for one centred object in 6 colours (one
shape) and in 6 shapes (one colour), how far apart the 6 images are (mean pairwise distance over
mean norm) in the vision tokens, the perceiver latents, each gated cross-attention block's
residual at the answer position, and the LM's last hidden state there. Where the colour row falls
far below the shape row is where colour is lost.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from tqdm.auto import tqdm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smol-synthetic")
    p.add_argument("--scenes", type=int, default=40, help="scenes per object count")
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)

    import torch

    from flamingo_vlm.eval.card import eval_generator
    from flamingo_vlm.generate import rank_candidates
    from flamingo_vlm.pretrained import from_pretrained
    from flamingo_vlm.synthetic import COLORS, SHAPES

    model, image_processor, tokenizer = from_pretrained(args.model, dtype=torch.bfloat16)
    model.eval()
    gen = eval_generator()
    colours, shapes = list(COLORS), list(SHAPES)
    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    by_pair: dict[tuple[str, bool], list[bool]] = defaultdict(list)  # (kind, held out) -> hits
    index = 0
    bar = tqdm(total=4 * args.scenes, desc="scenes")
    while any(len(hits["colour", n]) < args.scenes for n in range(1, 5)):
        scene = gen.scene(index, split="test")
        index += 1
        n = len(scene.objects)
        if len(hits["colour", n]) >= args.scenes:
            continue
        image = scene.render(args.image_size)
        scene_shapes = [o.shape for o in scene.objects]
        scene_colours = [o.color for o in scene.objects]
        by_shape = next((o for o in scene.objects if scene_shapes.count(o.shape) == 1), None)
        by_colour = next((o for o in scene.objects if scene_colours.count(o.color) == 1), None)
        if by_shape is None or by_colour is None:
            continue
        ask = [("colour", f"Question:What color is the {by_shape.shape}? Short answer:", colours, by_shape),
               ("shape", f"Question:What shape is the {by_colour.color} object? Short answer:", shapes, by_colour)]
        for kind, text, names, obj in ask:
            ranked = rank_candidates(model, image_processor, tokenizer, [image, text], names)
            right = ranked[0][0] == (obj.color if kind == "colour" else obj.shape)
            hits[kind, n].append(right)
            by_pair[kind, (obj.shape, obj.color) in gen.held_out_pairs].append(right)
        bar.update(1)
    bar.close()

    trace = trace_spread(model, image_processor, tokenizer, gen, colours, shapes, args.image_size)

    print(f"\n{args.model}: top-1 accuracy (%) of the ranked answer, {args.scenes} scenes per column")
    print("| question | 1 object | 2 objects | 3 objects | 4 objects | chance |")
    print("|---|---|---|---|---|---|")
    for kind, names in (("colour", colours), ("shape", shapes)):
        cells = " | ".join(f"{100 * sum(hits[kind, n]) / len(hits[kind, n]):.0f}" for n in range(1, 5))
        print(f"| {kind} | {cells} | {100 / len(names):.0f} |")
    print("\nThe same answers by the asked-about object's (shape, colour) pair: % right (of how many)")
    print("| question | a pair seen in training | a held-out pair |")
    print("|---|---|---|")
    for kind in ("colour", "shape"):
        cells = " | ".join(f"{100 * sum(v) / max(len(v), 1):.0f} ({len(v)})"
                           for v in (by_pair[kind, False], by_pair[kind, True]))
        print(f"| {kind} | {cells} |")
    stages = list(trace["colour"])
    print("\nHow far apart 6 images of one object are (mean pairwise distance / mean norm), by what differs:")
    print("| images differ in | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for kind, row in trace.items():
        print(f"| {kind} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    return 0


def relative_spread(x) -> float:
    import torch

    x = x.flatten(1).float()
    n = len(x)
    return float(torch.cdist(x, x).sum() / (n * (n - 1)) / x.norm(dim=1).mean())


def trace_spread(model, image_processor, tokenizer, gen, colours, shapes, size: int) -> dict[str, dict[str, float]]:
    import numpy as np
    import torch

    from flamingo_vlm.generate import _model_inputs

    def image(shape, colour):
        rng = np.random.default_rng(5)  # the same placement for every image of a set
        return gen._scene(rng, [gen._object(rng, shape, colour, "center")]).render(size)

    sets = {"colour": ([image("circle", c) for c in colours], "Question:What color is the circle? Short answer:"),
            "shape": ([image(s, "blue") for s in shapes], "Question:What shape is the blue object? Short answer:")}
    blocks = [m for name, m in model.named_modules() if name.endswith("gated_cross_attn_layer") and m is not None]
    out = {}
    for kind, (images, question) in sets.items():
        seen = {name: [] for name in ("vision tokens", "latents", *[f"xattn {i}" for i in range(len(blocks))], "last hidden")}
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen[f"xattn {i}"].append((o - a[0])[:, -1]))
                 for i, b in enumerate(blocks)]
        try:
            for im in images:
                vision_x, ids, mask = _model_inputs(model, image_processor, tokenizer, [im, question])
                with torch.inference_mode():
                    seen["vision tokens"].append(model.vision_encoder(vision_x.flatten(0, 2)))
                    seen["latents"].append(model.encode_vision_x(vision_x))
                    hidden = model(vision_x, ids, mask, output_hidden_states=True).hidden_states[-1]
                seen["last hidden"].append(hidden[:, -1])
        finally:
            for h in hooks:
                h.remove()
        out[kind] = {name: relative_spread(torch.cat(v)) for name, v in seen.items()}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
