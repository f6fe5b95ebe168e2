#!/usr/bin/env python
"""Does a model read its images? Its loss on episodes with the true images, with images moved to
another document of the batch, and with blank images.

    flamingo-vlm data episodes data/ep-ablation --documents 400 --start 90000 \
        --shots 1,4 --mix caption=0.35,vqa=0.45,classify=0.2
    python research/image_ablation.py --model smol-synthetic --data "data/ep-ablation/interleaved-000000.tar"

A model that ignores its images scores the same in all three columns (what stage 1 of the built-in
model did); the gap between "true" and the others is what the images are worth to it.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tqdm.auto import tqdm


def masked_loss(model, vision_x, batch) -> tuple[float, int]:
    from flamingo_vlm.train.losses import cross_entropy_sum, trained_tokens

    out = model(vision_x, batch["input_ids"], attention_mask=batch["attention_mask"])
    return float(cross_entropy_sum(out.logits.float(), batch["labels"])), trained_tokens(batch["labels"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smol-synthetic")
    p.add_argument("--data", required=True, help="interleaved shards (brace ranges and globs work)")
    p.add_argument("--batches", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-separator", default="\n")
    args = p.parse_args(argv)

    from flamingo_vlm import FlamingoProcessor
    from flamingo_vlm.data import DatasetSpec
    from flamingo_vlm.data.dataset import ShardDataset
    from flamingo_vlm.pretrained import from_pretrained

    model, image_processor, tokenizer = from_pretrained(args.model)
    model.eval()
    spec = DatasetSpec("interleaved", [args.data], batch_size=args.batch_size, max_images=8, max_tokens=256,
                       similarity_threshold=0.5, shuffle_buffer=0, chunk_separator=args.chunk_separator)
    data = ShardDataset(spec, FlamingoProcessor(tokenizer, image_processor), seed=0)
    totals = {"true": [0.0, 0], "shuffled": [0.0, 0], "blank": [0.0, 0]}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in tqdm(itertools.islice(iter(data), args.batches), total=args.batches, desc="batches"):
            vx = batch["vision_x"]
            for name, images in (("true", vx), ("shuffled", vx.roll(1, dims=0)), ("blank", torch.zeros_like(vx))):
                loss, n = masked_loss(model, images, batch)
                totals[name][0] += loss
                totals[name][1] += n
    print(f"| model | true images | shuffled images | blank images |\n|---|---|---|---|\n| {args.model} | "
          + " | ".join(f"{s / max(n, 1):.3f}" for s, n in totals.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
