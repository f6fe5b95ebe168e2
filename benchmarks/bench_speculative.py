#!/usr/bin/env python
"""Speculative decoding on the built-in model's few-shot captions: plain greedy vs prompt lookup
(and, with ``--assistant``, assisted generation by the same model in bf16).

Each prompt is a 4-shot captioning episode of the synthetic benchmark's test split (``<image>Output:
{caption}<|endofchunk|>`` x 4, then the query image and ``Output:``), as the model was trained.
Every mode decodes every prompt greedily; the outputs must equal plain greedy's token for token
(the script fails otherwise). Reported: tokens/s (new tokens over decoding time, prompt included,
best of ``--repeats``), the speed-up over plain greedy, and for the speculative modes the share of
proposed candidate tokens the model accepted and the number of LM calls per new token.

Speed figures depend on what else runs on the machine: the other processes' CPU use during the run
and the load average are printed with the table.

Usage::

    PYTHONPATH=src python benchmarks/bench_speculative.py                 # ~1 minute on 2 cores
    PYTHONPATH=src python benchmarks/bench_speculative.py --quick         # 2 prompts, 1 repeat
    PYTHONPATH=src python benchmarks/bench_speculative.py --lookup 3,5 --assistant
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_inference import contention_line  # noqa: E402
from bench_train import OthersLoad, kernel_summary  # noqa: E402


def caption_prompts(n: int, shots: int = 4):
    """``n`` few-shot caption samples (FlamingoProcessor samples) from the synthetic test split."""
    from flamingo_vlm.processing import EOC_TOKEN, MEDIA_TOKEN
    from flamingo_vlm.synthetic import episode_items
    from flamingo_vlm.synthetic.scenes import SceneGenerator

    gen = SceneGenerator(seed=0)
    samples = []
    for i in range(n):
        items = episode_items(gen, 1000 + i, "caption", shots + 1, split="test")
        text = "".join(f"{MEDIA_TOKEN}{t}{EOC_TOKEN}\n" for _, t in items[:-1]) + f"{MEDIA_TOKEN}Output:"
        samples.append((text, [scene.render(224) for scene, _ in items]))
    return samples


class Calls:
    """The main LM's calls during one generate: how many tokens each took."""

    def __init__(self, lm):
        self.lm, self.chunks = lm, []

    def __enter__(self):
        self.h = self.lm.register_forward_pre_hook(lambda m, a, kw: self.chunks.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.h.remove()


def run_mode(model, inputs, kw, repeats):
    outs, best, calls, proposed, new_total = [], float("inf"), 0, 0, 0
    for _ in range(repeats):
        total, outs_r, calls_r, proposed_r, new_r = 0.0, [], 0, 0, 0
        for batch in inputs:
            with Calls(model.lang_encoder) as c, torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], **kw)
                total += time.perf_counter() - t0
            new = out.shape[1] - batch["input_ids"].shape[1]
            outs_r.append(out[0].tolist())
            calls_r += len(c.chunks)
            # The first call carries the prompt, plus the candidates already proposed from it (an
            # assistant or a lookup can propose before the main LM's first forward); each later call
            # carries the last token and its candidates.
            proposed_r += max(0, c.chunks[0] - batch["input_ids"].shape[1]) + sum(k - 1 for k in c.chunks[1:])
            new_r += new
        if total < best:
            best, outs, calls, proposed, new_total = total, outs_r, calls_r, proposed_r, new_r
    accepted = new_total - calls  # each call adds one token of its own plus the candidates it accepted
    return {"seconds": best, "tokens": new_total, "outs": outs, "calls": calls, "proposed": proposed,
            "accepted": accepted}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smol-synthetic")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lookup", default="3,5,10", help="prompt_lookup_num_tokens values to try (3,5,10)")
    p.add_argument("--assistant", action="store_true", help="also assisted generation by the model in bf16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="2 prompts, 1 repeat, prompt lookup 5 only")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.repeats, args.lookup = 2, 1, "5"
    if args.threads:
        torch.set_num_threads(args.threads)
    from flamingo_vlm import FlamingoProcessor
    from flamingo_vlm.pretrained import from_pretrained

    model, ip, tok = from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    kernels = kernel_summary()  # the kernel probe (cached per machine) runs here, outside inference mode
    proc = FlamingoProcessor(tok, ip)
    inputs = [proc([s]) for s in caption_prompts(args.prompts)]
    base_kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    modes = [("plain greedy", {})]
    modes += [(f"prompt lookup {k}", {"prompt_lookup_num_tokens": int(k)}) for k in args.lookup.split(",") if k]
    if args.assistant:
        modes.append(("assisted (same model, bf16)", {"assistant_model": copy.deepcopy(model).to(torch.bfloat16)}))
    load0 = os.getloadavg()
    others = OthersLoad()
    run_mode(model, inputs[:1], dict(base_kw, max_new_tokens=4), 1)  # warm-up
    results = []
    for name, extra in modes:
        r = run_mode(model, inputs, {**base_kw, **extra}, args.repeats)
        results.append((name, r))
    plain = results[0][1]
    for name, r in results[1:]:
        if r["outs"] != plain["outs"]:
            raise SystemExit(f"{name} gave different tokens from plain greedy decoding")
    print(f"# Speculative decoding, {args.model}, {args.prompts} few-shot caption prompts (4 shots), "
          f"greedy, up to {args.max_new_tokens} new tokens, best of {args.repeats}")
    print()
    print("| mode | tokens/s | vs plain | accepted / proposed candidates | LM calls per new token | same output as plain |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results:
        tps = r["tokens"] / r["seconds"]
        rate = f"{r['accepted']}/{r['proposed']} ({r['accepted'] / r['proposed']:.0%})" if r["proposed"] else "-"
        print(f"| {name} | {tps:.1f} | {tps / (plain['tokens'] / plain['seconds']):.2f}x | {rate} | "
              f"{r['calls'] / r['tokens']:.2f} | yes |")
    print()
    print(kernels)
    print(contention_line(others.cores(), load0[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
