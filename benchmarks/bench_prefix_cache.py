#!/usr/bin/env python
"""Time to first token of a repeated 4-shot request on the built-in model, through the server's
engine: cold (nothing cached), warm with the image-latent cache only (``--prefix-cache-mb 0``), and
warm with the prefix cache (the demonstrations' LM keys/values reused).

The request is a 4-shot captioning prompt of the synthetic benchmark's test split (four
``<image>Output:{caption}<|endofchunk|>`` demonstrations, then a query image and ``Output:``), greedy,
as ``/v1/completions`` would hand it to the engine (images preprocessed, keyed by a hash of their bytes).
Time to first token: from submitting the job to the first text event (the first new token); also
the process's CPU time over that span (all threads: less sensitive to other processes' load). Each
mode runs ``--repeats`` times (median and best shown); cold runs clear both caches first. The
warm outputs are checked to be the cold ones.

Speed figures depend on what else runs on the machine: the other processes' CPU use during the run
and the load average are printed with the table.

Usage::

    PYTHONPATH=src python benchmarks/bench_prefix_cache.py            # ~30 s on 2 cores
    PYTHONPATH=src python benchmarks/bench_prefix_cache.py --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from flamingo_vlm.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_inference import contention_line  # noqa: E402
from bench_speculative import caption_prompts  # noqa: E402
from bench_train import OthersLoad, kernel_summary  # noqa: E402


def request(engine, text, images):
    """A job as the HTTP layer builds it: token ids, preprocessed images, keys from the PNG bytes."""
    from flamingo_vlm.serve.jobs import Prompt

    keys = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        keys.append(hashlib.sha256(buf.getvalue()).hexdigest())
    return Prompt(engine.encode(text), [engine.preprocess(im) for im in images], max_tokens=8, image_keys=keys)


def first_token(engine, prompt) -> tuple[float, str]:
    from flamingo_vlm.serve.jobs import ChoiceFinished, Failed, GenerationJob, JobDone, TokenDelta

    done, first, text = threading.Event(), [], []

    def sink(event):
        if isinstance(event, (TokenDelta, ChoiceFinished)) and not first:
            first.append((time.perf_counter(), time.process_time()))
        if isinstance(event, ChoiceFinished):
            text.append(event.text)
        if isinstance(event, Failed):
            raise SystemExit(f"the request failed: {event.error}")
        if isinstance(event, JobDone):
            done.set()

    job = GenerationJob(prompts=[prompt], temperature=0, sink=sink)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.submit(job)
    done.wait(600)
    return first[0][0] - t0, first[0][1] - c0, text[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smol-synthetic")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefix-cache-mb", type=float, default=256)
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="prefix cache block (tokens)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from flamingo_vlm.pretrained import from_pretrained
    from flamingo_vlm.serve.engine import Engine

    model, ip, tok = from_pretrained(args.model, dtype=torch.float32)
    kernels = kernel_summary()  # the kernel probe (cached per machine) runs here, before any timing
    engine = Engine(model, ip, tok, max_batch_size=1, batch_wait_ms=0, prefix_cache_mb=args.prefix_cache_mb).start()
    prefix_cache = engine.prefix_cache = PrefixCache(int(args.prefix_cache_mb * 2**20), args.block_size)
    text, images = caption_prompts(1)[0]
    prompt = request(engine, text, images)
    load0 = os.getloadavg()
    others = OthersLoad()
    first_token(engine, prompt)  # warm-up (allocations, kernel choices)
    modes = ("cold", "warm, image cache only", "warm, prefix cache")
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    outputs = set()

    def measure(mode):
        t, c, out = first_token(engine, prompt)
        times[mode].append(t)
        cpu[mode].append(c)
        outputs.add(out)

    for _ in range(args.repeats):
        prefix_cache.clear()
        engine._image_cache.clear()
        measure("cold")
        engine.prefix_cache = None  # the engine reads it per batch: this request runs without it
        measure("warm, image cache only")
        engine.prefix_cache = prefix_cache
        first_token(engine, prompt)  # fills the prefix cache
        measure("warm, prefix cache")
    engine.stop()
    if len(outputs) != 1:
        raise SystemExit(f"the modes gave different outputs: {outputs}")
    n_tokens = len(prompt.ids)
    stats = prefix_cache.snapshot()
    cold, cold_cpu = statistics.median(times["cold"]), statistics.median(cpu["cold"])
    print(f"# Prefix cache: time to first token of a repeated 4-shot request, {args.model} (fp32), "
          f"{n_tokens}-token prompt with 5 images, prefix cache blocks of {args.block_size} tokens, "
          f"{args.repeats} runs per mode")
    print()
    print("| mode | TTFT median (ms) | best (ms) | vs cold | process CPU time median (ms) | vs cold |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        med, c = statistics.median(ts), statistics.median(cpu[name])
        print(f"| {name} | {med * 1e3:.0f} | {min(ts) * 1e3:.0f} | {cold / med:.1f}x faster | {c * 1e3:.0f} | "
              f"{cold_cpu / c:.1f}x less |")
    print()
    print(f"Prefix cache after the run: {stats['entries']} entries, {stats['bytes'] / 2**20:.1f} MiB of "
          f"{stats['max_bytes'] / 2**20:.0f} MiB; {stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens "
          f"reused over {stats['rows']} requests. Same output in every mode: {outputs.pop()!r}.")
    print(kernels)
    print(contention_line(others.cores(), load0[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
