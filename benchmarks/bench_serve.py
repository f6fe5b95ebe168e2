#!/usr/bin/env python
"""Load test for ``flamingo-vlm serve``: latency p50/p99 and throughput at concurrency 1, 4 and 16.

By default it builds a small random-weights model (LLaMA-style LM: 4 layers, hidden 256; a
64-pixel ViT; cross-attention every layer), saves it to a temporary directory, starts the real
server on it in a subprocess (``python -m flamingo_vlm.serve``, loopback only, a free port), and
drives it with an asyncio ``httpx`` client. Every request is a few-shot chat completion with two
images (data URLs), greedy, 16 new tokens (the model is built so that it never ends early, so
every request does the same work). The demonstration's image is the same in every request (its
encoding comes from the server's image cache), the query's image is new in each. Concurrency 1 is sequential serving; higher concurrency is
served with dynamic batching, and the table shows the server's batch sizes.

Usage::

    PYTHONPATH=src python benchmarks/bench_serve.py                 # ~1 minute on 2 CPU cores
    PYTHONPATH=src python benchmarks/bench_serve.py --quick         # smoke run (seconds)
    PYTHONPATH=src python benchmarks/bench_serve.py --model DIR     # a saved model instead
    PYTHONPATH=src python benchmarks/bench_serve.py --url http://127.0.0.1:8000   # a running server
    PYTHONPATH=src python benchmarks/bench_serve.py --mixed 0,64    # a long generation and short requests

``--mixed SLICES``: instead of the load test, one long request (``--long-tokens``, 400) and, while it
runs, short requests one after another; a server per ``--decode-slice`` value in ``SLICES`` (taking
turns, ``--rounds`` times): how long the short ones wait behind the long one, and what pausing costs it.
``--mixed SLICES --builtin``: the same on the built-in model, through the server's engine in this
process (the built-in model answers in a few words, so its end-of-text tokens are switched off there to
make the long request long; no HTTP).

Results: a markdown table on stdout and in ``benchmarks/results/serve.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import httpx  # noqa: E402


def build_small_model(directory: Path) -> Path:
    """A small random Flamingo whose LM never writes <|endofchunk|> or its eos (fixed-length answers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer

    torch.manual_seed(0)
    corpus = ["an image of two cats on a sofa. a red car parked on the street. a dog in the park. "
              "Output: Question: what colour is it? Short answer: red blue green yellow"] * 8
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                  max_position_embeddings=512)
    lm = AutoModelForCausalLM.from_config(config)
    vision = OpenCLIPVisionTransformer(image_size=64, patch_size=16, width=128, layers=2, heads=4, embed_dim=64)
    model, image_processor, tokenizer = create_model_and_transforms(vision, None, lm, tokenizer,
                                                                    cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers():
            block.attn_gate.uniform_(-1, 1)
            block.ff_gate.uniform_(-1, 1)
        head = model.lang_encoder.get_output_embeddings()
        for name in ("<|endofchunk|>", "<|endoftext|>"):
            head.weight[tokenizer.convert_tokens_to_ids(name)] = 0  # logit 0: never the argmax in practice
    return model.save_pretrained(directory, tokenizer=tokenizer, image_processor=image_processor)


def images(n: int) -> list[str]:
    import numpy as np

    from flamingo_vlm.serve.testing import data_url

    rng = np.random.default_rng(0)
    return [data_url(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)) for _ in range(n)]


def request_body(model: str, urls: list[str], i: int, max_tokens: int, vary: bool = False) -> dict:
    # The demonstration's image is the same in every request (the server's image cache keeps its
    # encoding); the query's image is new each time (encoded for every request). ``vary``: request i
    # asks for between 1/4 and all of max_tokens and its question has 0-8 more words (prompts of
    # different lengths and answers that end at different steps, as a server's traffic has).
    a, b = urls[0], urls[1 + i % (len(urls) - 1)]
    question = "Output:" + " please describe the image" * (i % 3) if vary else "Output:"
    tokens = max(1, max_tokens // 4 + (i * 7919) % (max_tokens - max_tokens // 4 + 1)) if vary else max_tokens
    return {
        "model": model, "max_tokens": tokens, "temperature": 0,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                         {"type": "text", "text": "Output:"}]},
            {"role": "assistant", "content": " two cats on a sofa."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": b}},
                                         {"type": "text", "text": question}]},
        ],
    }


async def run_level(base: str, model: str, urls: list[str], concurrency: int, total: int, max_tokens: int,
                    vary: bool = False) -> dict:
    latencies: list[float] = []
    tokens = 0
    errors = 0
    counter = iter(range(total))
    before = httpx.get(base + "/health").json()

    async with httpx.AsyncClient(base_url=base, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker():
            nonlocal tokens, errors
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=request_body(model, urls, i, max_tokens, vary))
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    continue
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start

    after = httpx.get(base + "/health").json()
    hist = {int(k): v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    hist = {k: v for k, v in sorted(hist.items()) if v}
    batches = sum(hist.values())
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": total, "errors": errors, "wall_s": wall,
        "req_per_s": total / wall, "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "mean_batch": sum(k * v for k, v in hist.items()) / max(1, batches), "batches": batches, "hist": hist,
    }


async def run_mixed(base: str, model: str, urls: list[str], long_tokens: int, max_tokens: int) -> dict:
    """One long request; short ones sent one after another (from 0.2 s on) until it ends."""
    before = httpx.get(base + "/health").json()
    short: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        async def long_one():
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=request_body(model, urls, 0, long_tokens))
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

        task = asyncio.create_task(long_one())
        await asyncio.sleep(0.2)
        i = 1
        while not task.done():
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=request_body(model, urls, i, max_tokens))
            r.raise_for_status()
            short.append(time.perf_counter() - t0)
            i += 1
        long_s, long_n = await task
    after = httpx.get(base + "/health").json()
    return {"long_s": long_s, "long_tokens": long_n, "short": sorted(short), "short_first": short[0],
            "slices": after.get("decode_slices", 0) - before.get("decode_slices", 0)}


def mixed_builtin(args) -> int:
    """``--mixed --builtin``: the built-in model in this process, its engine as the server builds it."""
    import threading

    import torch
    from PIL import Image

    from flamingo_vlm.generate import example_image
    from flamingo_vlm.modeling.fast_linear import auto_dtype
    from flamingo_vlm.pretrained import from_pretrained
    from flamingo_vlm.serve.engine import Engine
    from flamingo_vlm.serve.jobs import ChoiceFinished, Failed, GenerationJob, JobDone, Prompt

    dtype = auto_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    model, image_processor, tokenizer = from_pretrained("smol-synthetic", dtype=dtype)
    model.lang_encoder.generation_config.eos_token_id = None
    images = [Image.open(example_image(f"scene{i}.png")).convert("RGB") for i in (1, 2)]
    load_before = os.getloadavg()[0]

    def job(engine, image, max_tokens):
        done, out = threading.Event(), {}

        def sink(event):
            if isinstance(event, ChoiceFinished):
                out["tokens"], out["text"] = event.tokens, event.text
            if isinstance(event, (JobDone, Failed)):
                out["end"] = time.perf_counter()
                done.set()

        prompt = Prompt(engine.encode("<image>Output:"), [engine.preprocess(image)], max_tokens=max_tokens,
                        image_keys=[f"image-{id(image)}"])
        return GenerationJob(prompts=[prompt], temperature=0, sink=sink), done, out

    slices = [int(x) for x in args.mixed.split(",")]
    runs: dict[int, list[dict]] = {sl: [] for sl in slices}
    for _ in range(args.rounds):
        for sl in slices:
            engine = Engine(model, image_processor, tokenizer, batch_wait_ms=args.batch_wait_ms, decode_slice=sl)
            engine.eos_ids = set()
            engine.start()
            try:
                warm, warm_done, _ = job(engine, images[1], 4)
                engine.submit(warm)
                warm_done.wait(600)
                long, long_done, long_out = job(engine, images[0], args.long_tokens)
                t0 = time.perf_counter()
                engine.submit(long)
                time.sleep(0.5)
                short_waits = []
                while not long_done.is_set():
                    short, short_done, short_out = job(engine, images[1], args.max_tokens)
                    t1 = time.perf_counter()
                    engine.submit(short)
                    short_done.wait(600)
                    short_waits.append(short_out["end"] - t1)
                    time.sleep(0.5)
                long_done.wait(600)
            finally:
                engine.stop()
            runs[sl].append({"long_s": long_out["end"] - t0, "short": sorted(short_waits), "short_first": short_waits[0],
                             "slices": engine.stats.snapshot()["decode_slices"], "text": long_out["text"]})
    texts = {r["text"] for rs in runs.values() for r in rs}
    desc = (f"the built-in model (smol-synthetic, {str(dtype).removeprefix('torch.')}), engine in process, its "
            f"end-of-text tokens off; short requests every 0.5 s after the last one ended; the long request's "
            f"text was the same in every run: {'yes' if len(texts) == 1 else f'no ({len(texts)} different)'}")
    return _mixed_table(args, runs, desc, load_before, "serve-mixed-builtin.md")


def mixed(args, model_dir: Path, model_desc: str) -> int:
    slices = [int(x) for x in args.mixed.split(",")]
    urls = images(64)
    runs: dict[int, list[dict]] = {sl: [] for sl in slices}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for sl in slices:
            proc, base = start_server(model_dir, args, ["--decode-slice", str(sl)])
            try:
                model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
                asyncio.run(run_level(base, model, urls[:3], 1, 2, args.max_tokens))  # warm-up
                runs[sl].append(asyncio.run(run_mixed(base, model, urls, args.long_tokens, args.max_tokens)))
            finally:
                proc.terminate()
                proc.wait(20)
    desc = (f"{model_desc}; server `--threads {args.threads} --dtype {args.dtype}`, one per `--decode-slice` "
            f"value; short requests sent one after another")
    return _mixed_table(args, runs, desc, load_before, "serve-mixed.md")


def _mixed_table(args, runs: dict[int, list[dict]], desc: str, load_before: float, name: str) -> int:
    from flamingo_vlm.modeling import kernels

    lines = [
        "# flamingo-vlm serve: a long generation and short requests",
        "",
        f"One request of {args.long_tokens} greedy tokens and, from shortly after it until it ends, requests of "
        f"{args.max_tokens} tokens: {desc}. Settings taking turns, {args.rounds} rounds, medians. "
        f"{kernels.summary().split(';')[0]}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
        "after (other work on the machine shows here).",
        "",
        "| `--decode-slice` | long request (s) | short requests during it | first short (ms) | short p50 (ms) | short max (ms) | pauses |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sl, rs in runs.items():
        med = statistics.median
        lines.append(f"| {sl} | {med(r['long_s'] for r in rs):.2f} | {med(len(r['short']) for r in rs):g} | "
                     f"{1000 * med(r['short_first'] for r in rs):.0f} | "
                     f"{1000 * med(statistics.median(r['short']) for r in rs):.0f} | "
                     f"{1000 * med(max(r['short']) for r in rs):.0f} | {med(r['slices'] for r in rs):g} |")
    table = "\n".join(lines + [""])
    print(table)
    if not args.quick:
        out = args.out.with_name(name)
        out.write_text(table)
        print(f"saved {out}")
    return 0


def start_server(model_dir: Path, args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    from flamingo_vlm.serve.testing import free_port

    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "flamingo_vlm.serve", "--model", str(model_dir), "--port", str(port),
           "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--batch-wait-ms", str(args.batch_wait_ms), "--dtype", args.dtype, "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("the server did not start")
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a saved model directory (default: build a small random one)")
    p.add_argument("--url", help="benchmark a server that is already running (loopback) instead")
    p.add_argument("--levels", default="1,4,16", help="concurrency levels (1,4,16)")
    p.add_argument("--requests", type=int, default=24, help="requests per level: the larger of this and 8 x concurrency (24)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="server torch threads (1: the client keeps a core)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the server's --dtype (auto, its default: bfloat16 where native and faster, else float32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="a few requests per level (smoke run)")
    p.add_argument("--vary", action="store_true", help="requests of different lengths: max_tokens from 1/4 of "
                   "--max-tokens to all of it, questions 0-8 words longer")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve.md")
    p.add_argument("--mixed", metavar="SLICES", help="instead: a long request and short ones, on a server per "
                   "--decode-slice value (comma-separated, e.g. 0,64)")
    p.add_argument("--long-tokens", type=int, default=400, help="--mixed: the long request's tokens (400)")
    p.add_argument("--rounds", type=int, default=2, help="--mixed: rounds over the --decode-slice values (2)")
    p.add_argument("--builtin", action="store_true", help="--mixed: the built-in model, in this process")
    args = p.parse_args(argv)
    if args.mixed and args.builtin:
        return mixed_builtin(args)
    if args.mixed:
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            model_dir = args.model or build_small_model(Path(tmp) / "small-flamingo")
            return mixed(args, model_dir, str(args.model) if args.model else "small random Flamingo (see the load test)")
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be a loopback address")
    levels = [int(x) for x in args.levels.split(",")]
    per_level = {c: (4 if args.quick else max(args.requests, 8 * c)) for c in levels}

    load_before = os.getloadavg()[0]
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    try:
        if args.url:
            base = args.url.rstrip("/")
            model_desc = "server at " + base
        else:
            model_dir = args.model or build_small_model(Path(tmp.name) / "small-flamingo")
            model_desc = str(args.model) if args.model else (
                "small random Flamingo: LLaMA LM 4 layers x 256 hidden, ViT 64 px, cross-attention every layer")
            proc, base = start_server(model_dir, args)
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        total = 2 + sum(per_level.values())
        urls = images(total + 1)
        results, offset = [], 2
        asyncio.run(run_level(base, model, urls[:3], 1, 2, args.max_tokens))  # warm-up
        for c in levels:  # every request's query image is one the server has not seen
            level_urls = [urls[0], *urls[offset + 1 : offset + 1 + per_level[c]]]
            results.append(asyncio.run(run_level(base, model, level_urls, c, per_level[c], args.max_tokens, args.vary)))
            offset += per_level[c]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()

    seq = results[0]["req_per_s"]
    lines = [
        "# flamingo-vlm serve: load test",
        "",
        f"Model: {model_desc}. Requests: few-shot chat completions with 2 images (data URLs: the same "
        "demonstration image each time, a new query image each time), greedy, "
        + (f"{args.max_tokens // 4}-{args.max_tokens} new tokens, questions of 0-8 more words (`--vary`). "
           if args.vary else f"{args.max_tokens} new tokens each. ")
        + f"Server: `--threads {args.threads} --max-batch-size {args.max_batch_size} "
        f"--dtype {args.dtype} "
        f"--batch-wait-ms {args.batch_wait_ms:g}`, client and server on the same machine "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after: other work on the machine shows here).",
        "",
        "| concurrency | requests | errors | p50 latency (ms) | p99 latency (ms) | requests/s | tokens/s | vs concurrency 1 | mean batch | batch sizes (rows: calls) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        hist = ", ".join(f"{k}: {v}" for k, v in r["hist"].items())
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['req_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['req_per_s'] / seq:.2f}x | "
                     f"{r['mean_batch']:.1f} | {hist} |")
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"saved {args.out}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
