#!/usr/bin/env python
"""int8 against bf16 at the size of a released model: batch-1 decode of OpenFlamingo-3B's language side.

``bench_quantize.py``'s benchmark shape (MPT d768 x 12) reads ~0.3 GB of weights per token, so a
large share of its step is per-layer work that int8 does not shrink. The released models are larger:
this one is OpenFlamingo-3B-vitl-mpt1b's LM and cross-attention (MosaicGPT-1B as flamingo-vlm loads
it, ``MosaicMptForCausalLM``: d_model 2048 x 24 layers, 16 heads, vocab 50432 + 3; OpenFlamingo's
perceiver and cross-attention in every layer, 8 heads x 64, ff_mult 4), random weights, with a small
stand-in vision encoder (width 1024 as ViT-L/14's, 2 layers: it runs once per prompt and is outside
the per-token figure). 3 images, a 54-token prompt, greedy.

Variants: ``bf16`` (built in bf16, as ``model.to(torch.bfloat16)`` gives) and ``int8``
(``quantize_model(model, "int8")`` on the fp32 model: int8 LM, cross-attention, perceiver and LM head,
everything else fp32). Each runs in its own process (the fp32 model needs ~9 GB before quantizing; two
variants side by side would not fit a 24 GB machine), the variants taking turns over ``--rounds``.
Per round: **ms/token** = (t(1 + N new tokens) - t(1)) / N with N = ``--tokens``, median of ``--repeats``;
**first token** = t(1) (images, prefill, one step). Reported: the median over rounds, the ratio
int8 / bf16 per round, weights, the CPU and kernel choices, and the cores other processes used.

Usage::

    python benchmarks/bench_quantize_large.py                 # 2 rounds, ~8 min on 2 cores
    python benchmarks/bench_quantize_large.py --quick         # a d256 x 2 model: checks the script runs

Writes ``benchmarks/results/quantize-large[-quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

FULL = {"d_model": 2048, "n_heads": 16, "n_layers": 24, "vocab": 50432, "vis_width": 1024, "vis_heads": 16}
QUICK = {"d_model": 256, "n_heads": 4, "n_layers": 2, "vocab": 1000, "vis_width": 128, "vis_heads": 2}


def worker(variant: str, shape: dict, tokens: int, repeats: int) -> dict:
    import gc

    import torch
    from bench_inference import MONITOR
    from transformers import MptConfig

    from flamingo_vlm.modeling.flamingo import Flamingo
    from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM
    from flamingo_vlm.modeling.quantize import quantize_model, weight_bytes
    from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer

    torch.manual_seed(0)
    if variant == "bf16":
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: the fp32 model would not be needed
    cfg = MptConfig(d_model=shape["d_model"], n_heads=shape["n_heads"], n_layers=shape["n_layers"], expansion_ratio=4,
                    vocab_size=shape["vocab"], max_seq_len=2048, attn_config={"alibi": True}, use_cache=True)
    vocab = shape["vocab"]
    lm = MosaicMptForCausalLM(cfg).eval()
    lm.resize_token_embeddings(vocab + 3, mean_resizing=False)
    vision = OpenCLIPVisionTransformer(image_size=224, patch_size=32, width=shape["vis_width"], layers=2,
                                       heads=shape["vis_heads"])
    model = Flamingo(vision, lm, eoc_token_id=vocab, media_token_id=vocab + 1, vis_dim=shape["vis_width"],
                     cross_attn_every_n_layers=1, pad_token_id=vocab + 2).eval()
    torch.set_default_dtype(torch.float32)
    if variant == "int8":
        quantize_model(model, "int8")
    gc.collect()
    gen = torch.Generator().manual_seed(1)
    lang = torch.randint(0, vocab, (1, 54), generator=gen)
    for i in range(3):
        lang[0, i * 18] = vocab + 1
    vis = torch.randn(1, 3, 1, 3, 224, 224, generator=gen).to(torch.bfloat16 if variant == "bf16" else torch.float32)

    def run(k: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(vision_x=vis, lang_x=lang, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t

    run(2)
    steps, firsts, others = [], [], 0.0
    for _ in range(repeats):
        tok = MONITOR.start()
        t1, tn = run(1), run(1 + tokens)
        others = max(others, MONITOR.others_cores(tok) or 0.0)
        steps.append((tn - t1) / tokens * 1e3)
        firsts.append(t1 * 1e3)
    return {"ms_per_token": statistics.median(steps), "first_token_ms": statistics.median(firsts),
            "weights_gb": weight_bytes(model) / 1e9, "others_cores": others}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds in which the variants take turns (median of them)")
    p.add_argument("--repeats", type=int, default=3, help="timings per variant per round (their median)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens timed after the first")
    p.add_argument("--quick", action="store_true", help="a tiny model: checks that the script runs")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/quantize-large[-quick])")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.worker:
        print(json.dumps(worker(args.worker, shape, args.tokens, args.repeats)))
        return 0

    import torch
    from bench_inference import cpu_flags, cpu_model, write_results

    variants, rows = ("bf16", "int8"), {"bf16": [], "int8": []}
    for r in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--worker", v, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True,
                                 env=os.environ.copy())
            if out.returncode:
                raise SystemExit(f"{v} worker failed:\n{out.stderr[-2000:]}")
            rows[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            x = rows[v][-1]
            print(f"[quantize-large] round {r + 1}/{args.rounds} {v}: {x['ms_per_token']:.1f} ms/token, first token "
                  f"{x['first_token_ms']:.0f} ms (other processes {x['others_cores']:.2f} cores)", file=sys.stderr)
    from flamingo_vlm.modeling.kernels import kernel_choice, summary

    kernels = summary(kernel_choice(("decode", "gemm", "bf16", "fp32_decode", "bf16_decode", "int8_decode", "int8_gemm")))
    med = {v: {k: statistics.median(x[k] for x in rows[v]) for k in ("ms_per_token", "first_token_ms", "weights_gb")}
           for v in variants}
    ratios = [b["ms_per_token"] / i["ms_per_token"] for b, i in zip(rows["bf16"], rows["int8"])]
    name = "d256 x 2 (quick)" if args.quick else "OpenFlamingo-3B's LM (MosaicGPT-1B d2048 x 24)"
    lines = ["# int8 against bf16 at a released model's size: batch-1 decode", "",
             f"CPU: {cpu_model()} ({', '.join(cpu_flags()) or 'no AVX2'}), {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; other processes used {max(x['others_cores'] for v in variants for x in rows[v]):.2f} "
             "cores at most during the timings.", "",
             "| model | variant | weights GB | first token ms | ms/token | x vs bf16 (rounds: min-max) |",
             "|---|---|---:|---:|---:|---:|"]
    for v in variants:
        x = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if v == "int8" else "1.00"
        lines.append(f"| {name} | {v} | {med[v]['weights_gb']:.2f} | {med[v]['first_token_ms']:.0f} | "
                     f"{med[v]['ms_per_token']:.1f} | {x} |")
    lines += ["", f"ms/token: (t(1 + {args.tokens} new tokens) - t(1)) / {args.tokens}, median of {args.repeats}, then "
              f"the median of {args.rounds} rounds (each variant in its own process, taking turns); int8 runs with "
              "fp32 activations (its vision encoder, embeddings and norms in fp32).", "", kernels]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = Path(args.out) if args.out else HERE / "results" / ("quantize-large-quick" if args.quick else "quantize-large")
    write_results(stem, text, {"rows": rows, "median": med, "ratios": ratios, "kernels": kernels, "shape": shape})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
