#!/usr/bin/env python
"""Is an object's shape in the vision token of its own grid cell, even in busy scenes?

Fits a linear classifier (softmax regression, L-BFGS) from the feature token at the cell holding an
object's centre to that object's shape, on training-split scenes of 1-4 objects, and prints its
accuracy on test-split scenes by number of objects. High accuracy with 2-4 objects means the
information for "what shape is the red object" is in the tokens, cell by cell; what is left is for
the adapter to look in the right cell.

    python research/cell_probe.py --model smol-synthetic --train-scenes 500 --test-scenes 200

``--style train`` (or ``heldout``) draws every scene as the in-context episodes do (a random style of
that split, objects off the grid; see ``style_probe.py``), training and testing the probe on those:
whether the frozen features still hold the shape when the drawing varies.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smol-synthetic", help="a model with a 7x7 feature-grid vision encoder")
    p.add_argument("--train-scenes", type=int, default=500)
    p.add_argument("--test-scenes", type=int, default=200)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="fp32 where bf16 is emulated (AVX2 only)")
    p.add_argument("--style", choices=["none", "train", "heldout"], default="none",
                   help="draw the scenes in the episodes' random styles of this split, off the grid")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from flamingo_vlm.eval.card import eval_generator
    from flamingo_vlm.pretrained import from_pretrained
    from flamingo_vlm.synthetic import SHAPES
    from flamingo_vlm.synthetic.icl import restyle

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, image_processor, _ = from_pretrained(args.model, dtype=dtype)
    gen = eval_generator()
    side = 7

    def collect(split: str, n: int):
        feats, labels, counts = [], [], []
        for i in tqdm(range(n), desc=f"{split} scenes"):
            scene, style = gen.scene(i, split=split), None
            if args.style != "none":
                rng = np.random.default_rng([7, i, split == "test"])
                scene, style = restyle(scene, rng, args.style)
            pixels = image_processor(scene.render(args.image_size, style))[None].to(dtype)
            with torch.no_grad():
                tokens = model.vision_encoder(pixels)[0].float()
            if tokens.shape[0] < side * side:
                raise SystemExit(f"{args.model}'s vision encoder gives {tokens.shape[0]} tokens, not a {side}x{side} grid")
            for obj in scene.objects:
                x, y = obj.centre
                feats.append(tokens[int(y * side) * side + int(x * side)])
                labels.append(SHAPES.index(obj.shape))
                counts.append(len(scene.objects))
        return torch.stack(feats), torch.tensor(labels), torch.tensor(counts)

    x_train, y_train, _ = collect("train", args.train_scenes)
    x_test, y_test, n_test = collect("test", args.test_scenes)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    weight = torch.zeros(x_train.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300)

    def logits(x):
        return ((x - mean) / std) @ weight + bias

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits(x_train), y_train) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        hit = logits(x_test).argmax(1) == y_test
    print(f"\n{args.model}: shape from the token of the object's own cell, linear probe "
          f"({args.train_scenes} train / {args.test_scenes} test scenes, style {args.style}); chance {100 / len(SHAPES):.0f}%")
    print("| objects in the scene | 1 | 2 | 3 | 4 |")
    print("|---|---|---|---|---|")
    print("| accuracy (%) | " + " | ".join(f"{100 * hit[n_test == n].float().mean():.0f}" for n in range(1, 5)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
