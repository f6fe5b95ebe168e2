#!/usr/bin/env python
"""Does the cross-attention look at the object a question names?

For scenes of two objects with different shapes (evaluation generator seed, never trained on) it
asks "What color is the <shape>?" and records, for every head of every gated cross-attention block,
where the attention over the image goes: on the named object's cell, on the other object's cell
(each counting the cell's feature token and its colour token), and on the perceiver's latents.
It does this at two text positions: the answer position (after "Short answer:") and the shape
word itself. A model that aims has heads whose named-object mass is well above the other's in
nearly every scene; a model that pools the objects ("bag of attributes") has them about equal.

Needs a model whose perceiver passes its input cells through (``media_passthrough``, 49 feature
and 49 colour tokens after the latents, as ``scripts/grow_adapter.py --media-passthrough`` makes).

    python scripts/aim_probe.py --model runs/pilot-aim2/final --scenes 40
    python scripts/cells_only.py scripts/aim_probe.py --model runs/pilot-aim3/final   # latents dropped
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

    from flamingo_vlm.eval.card import _eval_generator
    from flamingo_vlm.eval.synthetic import POSITIONS
    from flamingo_vlm.generate import _model_inputs
    from flamingo_vlm.modeling.cross_attention import MaskedCrossAttention, split_heads
    from flamingo_vlm.pretrained import from_pretrained

    model, image_processor, tokenizer = from_pretrained(args.model, dtype=torch.bfloat16)
    model.eval()
    if model.perceiver.passthrough_norm is None:
        raise SystemExit(f"{args.model}: its perceiver does not pass its input tokens through "
                         "(media_passthrough); grow it with scripts/grow_adapter.py --media-passthrough")
    blocks = [m for m in model.modules() if isinstance(m, MaskedCrossAttention)]
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
    gen = _eval_generator()
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
