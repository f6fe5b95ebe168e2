#!/usr/bin/env python
"""Does the cross-attention look at the object a question names?

For scenes of two objects with different shapes (evaluation generator seed, never trained on) it
asks "What color is the <shape>?" and records, for every head of every gated cross-attention block,
where the attention over the image goes: on the named object's cell, on the other object's cell
(each counting the cell's feature token and its colour token), and on the perceiver's latents.
It does this at two text positions: the answer position (after "Short answer:") and the shape
word itself. A model that aims has heads whose named-object mass is well above the other's in
nearly every scene; a model that pools the objects ("bag of attributes") has them about equal.

The attention masses need a model whose perceiver passes its input cells through
(``media_passthrough``, 49 feature and 49 colour tokens after the latents, as
``flamingo-vlm grow-adapter --media-passthrough`` makes). Then, for any model, how much the
cross-attention's queries at the shape word depend on the word: for one two-object picture and the
6 shape names, the relative spread (mean pairwise distance over mean norm) of the block's normed
input and of its query. A query that has stopped depending on the word cannot aim.

    python research/aim_probe.py --model runs/pilot-aim2/final --scenes 40
    python research/cells_only.py research/aim_probe.py --model runs/pilot-aim3/final   # latents dropped
"""

from __future__ import annotations

import argparse
import math


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)

    import torch

    from flamingo_vlm.modeling.cross_attention import MaskedCrossAttention
    from flamingo_vlm.pretrained import from_pretrained

    model, image_processor, tokenizer = from_pretrained(args.model, dtype=torch.bfloat16)
    model.eval()
    blocks = [m for m in model.modules() if isinstance(m, MaskedCrossAttention)]
    if model.perceiver.passthrough_norm is None:
        print(f"{args.model}: its perceiver does not pass its input tokens through (media_passthrough; "
              "grow it with flamingo-vlm grow-adapter --media-passthrough): query spread only")
    else:
        attention_masses(model, image_processor, tokenizer, blocks, args)
    query_spread(model, image_processor, tokenizer, blocks, args.image_size)
    return 0


def attention_masses(model, image_processor, tokenizer, blocks, args) -> None:
    import torch

    from flamingo_vlm.eval.card import eval_generator
    from flamingo_vlm.generate import _model_inputs
    from flamingo_vlm.modeling.cross_attention import split_heads
    from flamingo_vlm.synthetic import POSITIONS

    attn: dict[int, torch.Tensor] = {}

    def record(i):
        def hook(module, inputs):
            x, (k, _v) = inputs[0], inputs[1]
            q = split_heads(module.to_q(module.norm(x)), module.heads).float()
            attn[i] = (q @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[0]  # heads, L, S
        return hook

    def cell(obj) -> int:
        x, y = POSITIONS[obj.position]
        return int(y * 7) * 7 + int(x * 7)

    hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(blocks)]
    # masses[where][block]: per scene a (3, heads) tensor: named object, other object, latents
    masses = {where: {i: [] for i in range(len(blocks))} for where in ("answer", "shape word")}
    gen = eval_generator()
    index = 0
    try:
        while len(masses["answer"][0]) < args.scenes:
            scene = gen.scene(index, split="test")
            index += 1
            if len(scene.objects) != 2 or scene.objects[0].shape == scene.objects[1].shape:
                continue
            named, other = scene.objects
            text = f"Question:What color is the {named.shape}? Short answer:"
            vision_x, ids, mask = _model_inputs(model, image_processor, tokenizer, [scene.render(args.image_size), text])
            with torch.inference_mode():
                model(vision_x, ids, mask)
            tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
            positions = {"answer": len(tokens) - 1,
                         "shape word": max(j for j, t in enumerate(tokens) if "?" in t) - 1}
            for i, a in attn.items():
                base = a.shape[-1] - 98  # the latents (none when dropped), then 49 + 49 cell tokens
                for where, pos in positions.items():
                    row = a[:, pos]
                    at = row[:, base + cell(named)] + row[:, base + 49 + cell(named)]
                    ao = row[:, base + cell(other)] + row[:, base + 49 + cell(other)]
                    masses[where][i].append(torch.stack([at, ao, row[:, :base].sum(-1)]))
    finally:
        for h in hooks:
            h.remove()

    print(f"\n{args.model}: attention mass per head (named object / other object / latents), "
          f"mean over {args.scenes} two-object scenes; 'named > other' is the share of scenes where "
          "the head gives the named object more")
    for where, per_block in masses.items():
        print(f"\nat the {where}:")
        print("| block | " + " | ".join(f"head {h}" for h in range(blocks[0].heads)) + " | named > other, best head |")
        print("|---|" + "---|" * (blocks[0].heads + 1))
        for i, rows in per_block.items():
            v = torch.stack(rows)  # scenes, 3, heads
            m = v.mean(0)
            cells = " | ".join(f"{m[0, h]:.2f} / {m[1, h]:.2f} / {m[2, h]:.2f}" for h in range(m.shape[1]))
            wins = (v[:, 0] > v[:, 1]).float().mean(0)
            print(f"| xattn {i} | {cells} | {100 * wins.max():.0f}% |")


def query_spread(model, image_processor, tokenizer, blocks, size: int) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from attribute_probe import relative_spread  # research/ is on sys.path when a script runs
    from flamingo_vlm.eval.card import eval_generator
    from flamingo_vlm.generate import _model_inputs
    from flamingo_vlm.synthetic import SHAPES

    gen = eval_generator()
    rng = np.random.default_rng(5)
    image = gen._scene(rng, [gen._object(rng, "circle", "red", "left"),
                             gen._object(rng, "square", "blue", "right")]).render(size)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    normed = {i: [] for i in range(len(blocks))}
    queries = {i: [] for i in range(len(blocks))}
    try:
        for shape in SHAPES:
            text = f"Question:What color is the {shape}? Short answer:"
            vision_x, ids, mask = _model_inputs(model, image_processor, tokenizer, [image, text])
            tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
            pos = max(j for j, t in enumerate(tokens) if "?" in t) - 1
            with torch.inference_mode():
                model(vision_x, ids, mask)
                for i, block in enumerate(blocks):
                    h = inputs[i][0, pos:pos + 1]
                    normed[i].append(F.layer_norm(h.float(), h.shape[-1:])[0])
                    queries[i].append(block.to_q(block.norm(h))[0].float())
    finally:
        for h in hooks:
            h.remove()

    print(f"\nAt the shape word, over the {len(SHAPES)} shape names (relative spread):")
    print("| block | normed LM state | query |")
    print("|---|---|---|")
    for i in range(len(blocks)):
        print(f"| xattn {i} | {relative_spread(torch.stack(normed[i])):.2f} | "
              f"{relative_spread(torch.stack(queries[i])):.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
