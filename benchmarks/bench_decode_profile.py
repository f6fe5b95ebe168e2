#!/usr/bin/env python
"""Where a batch-1 decode step goes: a torch.profiler breakdown with a roofline, against the floor.

Shape (the speed issue's, and ``../shared/peer/bench_generate.py``'s): a ViT-B/32-shaped encoder, an
LM of d_model 768 x 12 layers x 12 heads with a 400-token vocabulary (MPT as in three of the five
OpenFlamingo releases, or LLaMA of the same size), cross-attention in every layer (``--cross-attn-every``),
3 images, a 54-token prompt, 32 new tokens, greedy, batch 1; random weights, gates drawn from U(-1, 1).

For each LM family, each dtype (``fp32``, ``bf16`` = ``model.to(torch.bfloat16)``, on request ``int8``: the fp32
models with weight-only int8 layers, as ``quantize="int8"`` loads them) and each model (the
bare LM, and the Flamingo built on a copy of it) it measures:

* **ms/token**: one decode step, unprofiled: (time for 32 new tokens - time for 1) / 31, median of
  ``--repeats`` (so prompt processing and image encoding are left out);
* **floor**: the weights one step must read (every LM weight but the input embedding table, unless
  tied to the head; for Flamingo also the cross-attention blocks, less their key/value projections,
  which run once per call) divided by the memory bandwidth **this script measures** (a large tensor
  copy and sum on the same threads, best of 5);
* a **profile** of 32-token decoding (torch.profiler, CPU): self time per op group per step, and for
  the matrix products their achieved GFLOP/s and GB/s (bytes of their operands, from the recorded
  shapes); our C library's calls (the fused decoding steps and the decode-sized products on our
  kernels, ``flamingo_vlm.modeling.native``) are recorded as ``native::`` spans, the group
  "native"; "outside ops" is wall time spent in neither (Python, generate's logic, dispatch), as a
  share of the profiled step.

Usage::

    python benchmarks/bench_decode_profile.py                       # MPT and LLaMA, fp32 and bf16
    python benchmarks/bench_decode_profile.py --lm mpt --dtypes fp32 --repeats 5
    python benchmarks/bench_decode_profile.py --lm mpt --dtypes bf16,int8    # int8's floor: one byte a weight
    python benchmarks/bench_decode_profile.py --quick               # tiny shapes, a smoke run

Writes a markdown table to stdout and ``benchmarks/results/decode-profile[-quick].{md,json}``. The CPU
model and flags, threads, and the CPU time other processes used while it ran are printed with it:
figures taken on a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from bench_inference import (  # noqa: E402
    MONITOR,
    QUICK,
    Shape,
    build_models,
    cpu_flags,
    cpu_model,
    decode_weight_floor,
    interleaved_prompt,
    write_results,
)

SHAPE = Shape(mpt_vocab=400, llama_vocab=400, prompt_len=54, new_tokens=32, n_images=3, decode_batches=(1,))

# op group by aten name (self time); the first matching rule wins
GROUPS = [
    ("native", ("native::",)),  # our C library's calls (_native_spans)
    ("matmul", ("addmm", "aten::mm", "bmm", "linear_pointwise", "mkldnn_linear", "aten::matmul", "aten::linear",
                "_weight_int", "mkl_linear")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax", "baddbmm")),
    ("norm", ("layer_norm", "rms_norm")),
    ("copy/cat/index", ("copy_", "aten::cat", "index", "embedding", "clone", "_to_copy", "aten::to", "contiguous",
                        "gather", "scatter", "masked_fill", "where", "fill_", "zero_", "empty", "arange", "full")),
    ("views", ("view", "reshape", "transpose", "permute", "slice", "select", "unsqueeze", "squeeze", "expand",
               "as_strided", "split", "chunk", "unbind", "narrow", "t", "detach", "alias", "lift", "unflatten",
               "flatten")),
    ("elementwise", ("add", "mul", "sub", "div", "tanh", "gelu", "silu", "neg", "exp", "pow", "rsqrt", "sqrt",
                     "mean", "sum", "clamp", "sigmoid", "cos", "sin", "max", "min", "argmax", "eq", "ne", "lt",
                     "gt", "ge", "le", "logical", "bitwise", "cumsum", "abs", "isin", "any", "all", "topk", "sort")),
]
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "mkldnn::_linear_pointwise")


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def measure_bandwidth(mb: int = 256) -> float:
    """GB/s of reading + writing a large fp32 tensor (copy) and of reading it (sum): the best of both,
    best of 5 runs each, on torch's current threads."""
    n = mb * 2**20 // 4
    a, b = torch.ones(n), torch.empty(n)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def decode_fn(model, lang_x, vision_x, new_tokens: int, flamingo: bool):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    mask = torch.ones_like(lang_x)
    if flamingo:
        return lambda: model.generate(vision_x, lang_x, mask, **kw)
    return lambda: model.generate(input_ids=lang_x, attention_mask=mask, pad_token_id=0, **kw)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``repeats`` runs after one warm-up, and the other processes' mean CPU use (cores)."""
    fn()
    times, others = [], []
    for _ in range(repeats):
        tok = MONITOR.start()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        o = MONITOR.others_cores(tok)
        if o is not None:
            others.append(o)
    return statistics.median(times), (statistics.mean(others) if others else float("nan"))


def step_ms(model, lang_x, vision_x, flamingo: bool, new_tokens: int, repeats: int) -> tuple[float, float]:
    ms, _first, others = decode_ms(model, lang_x, vision_x, flamingo, new_tokens, repeats)
    return ms, others


def decode_ms(model, lang_x, vision_x, flamingo: bool, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(ms per decode step, ms to the first token: images, prompt and one step, the cores other processes used)."""
    with torch.inference_mode():
        t_long, o1 = timed(decode_fn(model, lang_x, vision_x, new_tokens, flamingo), repeats)
        t_one, o2 = timed(decode_fn(model, lang_x, vision_x, 1, flamingo), repeats)
    return (t_long - t_one) / (new_tokens - 1) * 1e3, t_one * 1e3, max(o1, o2)


def matmul_bytes_flops(name: str, shapes: list, elem: int) -> tuple[float, float]:
    """Operand bytes and FLOPs of one matrix product from its recorded input shapes."""
    try:
        if name == "aten::addmm":  # bias, (m,k), (k,n)
            (m, k), (_, n) = shapes[1], shapes[2]
            return (m * k + k * n + m * n + n) * elem, 2 * m * k * n
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return (m * k + k * n + m * n) * elem, 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b * (m * k + k * n + m * n) * elem, 2 * b * m * k * n
        if name == "mkldnn::_linear_pointwise":  # x (..., k), w (n, k)
            x, w = shapes[0], shapes[1]
            m = 1
            for d in x[:-1]:
                m *= d
            n, k = w
            return (m * k + k * n + m * n) * elem, 2 * m * k * n
    except (TypeError, ValueError, IndexError):
        pass
    return 0.0, 0.0


# our C library's entry points: not aten ops, so the profiler sees them only as spans we record
_NATIVE_CALLS = [("LlamaStep", "pre"), ("LlamaStep", "post"), ("MptStep", "pre"), ("MptStep", "post"),
                 ("XattnStep", "__call__"), ("MlpStep", "__call__"), (None, "int8_linear"), (None, "fp32_linear"),
                 (None, "bf16_linear")]


@contextlib.contextmanager
def _native_spans():
    """Each call into our C library recorded as a ``native::<name>`` span for the length of the block."""
    from flamingo_vlm.modeling import native

    saved = []
    for owner_name, attr in _NATIVE_CALLS:
        owner = getattr(native, owner_name) if owner_name else native
        real = getattr(owner, attr)

        def span(*a, _real=real, _name=f"native::{owner_name or ''}{'.' if owner_name else ''}{attr}", **k):
            with torch.profiler.record_function(_name):
                return _real(*a, **k)

        saved.append((owner, attr, real))
        setattr(owner, attr, span)
    try:
        yield
    finally:
        for owner, attr, real in saved:
            setattr(owner, attr, real)


def _profiled(fn) -> tuple[float, dict[str, float], list[float]]:
    """Wall ms, self ms per op group, and [matmul bytes, FLOPs, ms] of one profiled call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode(), _native_spans():
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            fn()
            wall = (time.perf_counter() - t0) * 1e3
    groups: dict[str, float] = defaultdict(float)
    mm = [0.0, 0.0, 0.0]
    for ev in prof.key_averages(group_by_input_shape=True):
        groups[group_of(ev.key)] += ev.self_cpu_time_total / 1e3
        if ev.key in MATMUL_OPS:
            b, f = matmul_bytes_flops(ev.key, ev.input_shapes, ELEM[0])
            mm = [mm[0] + b * ev.count, mm[1] + f * ev.count, mm[2] + ev.self_cpu_time_total / 1e3]
    return wall, groups, mm


ELEM = [4]  # bytes per element of the model being profiled


def profile(model, lang_x, vision_x, flamingo: bool, new_tokens: int, elem: int) -> dict[str, Any]:
    """The decode steps alone: a profiled call for ``new_tokens`` minus one for a single token (the
    prompt step, image encoding and generate's set-up), per step."""
    ELEM[0] = elem
    wall_n, groups_n, mm_n = _profiled(decode_fn(model, lang_x, vision_x, new_tokens, flamingo))
    wall_1, groups_1, mm_1 = _profiled(decode_fn(model, lang_x, vision_x, 1, flamingo))
    steps = new_tokens - 1
    groups = {g: max(0.0, groups_n[g] - groups_1.get(g, 0.0)) / steps for g in groups_n}
    wall = (wall_n - wall_1) / steps
    mm_bytes, mm_flops, mm_ms = (a - b for a, b in zip(mm_n, mm_1))
    return {
        "profiled_ms_per_step": wall,
        "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "outside_ops_share": max(0.0, 1 - sum(groups.values()) / wall) if wall > 0 else None,
        "matmul_gbps": mm_bytes / mm_ms / 1e6 if mm_ms > 0 else None,
        "matmul_gflops": mm_flops / mm_ms / 1e6 if mm_ms > 0 else None,
    }


def run(kind: str, dtype_name: str, s: Shape, args, bandwidth: float, log) -> list[dict[str, Any]]:
    model, bare, ids = build_models(kind, s, seed=0, cross_attn_every=args.cross_attn_every)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, bare = model.to(dtype), bare.to(dtype)
    floor = decode_weight_floor(model, bare)  # (weights counted before quantizing: the same matrices)
    if dtype_name == "int8":  # weight-only int8 of the fp32 models, as quantize="int8" loads them
        from flamingo_vlm.modeling.quantize import quantize_model

        quantize_model(model.eval(), "int8")
        quantize_model(bare.eval(), "int8")
    gen = torch.Generator().manual_seed(1)
    lang_x = interleaved_prompt(1, s.prompt_len, s.n_images, ids, gen)
    vision_x = torch.randn(1, s.n_images, 1, 3, s.image_size, s.image_size, generator=gen).to(dtype)
    elem = 1 if dtype_name == "int8" else 2 if dtype == torch.bfloat16 else 4  # (int8: the floor; its scales are <1%)
    rows = []
    for name, m, is_flamingo, weights_m in (
        ("bare LM", bare, False, floor["lm_step_m"]),
        ("Flamingo", model, True, floor["lm_step_m"] + floor["xattn_step_m"]),
    ):
        log(f"{kind} {dtype_name} {name}: timing")
        ms, others = step_ms(m, lang_x, vision_x, is_flamingo, s.new_tokens, args.repeats)
        log(f"{kind} {dtype_name} {name}: profiling")
        prof = profile(m, lang_x, vision_x, is_flamingo, s.new_tokens, elem)
        floor_ms = weights_m * 1e6 * elem / (bandwidth * 1e9) * 1e3
        rows.append({
            "lm": kind, "dtype": dtype_name, "model": name, "ms_per_token": ms, "floor_ms": floor_ms,
            "x_floor": ms / floor_ms, "weights_read_m": weights_m, "others_cores": others, **prof,
        })
    del model, bare
    return rows


def render(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        "# Batch-1 decode: profile and floor", "",
        f"CPU: {env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX2'}), {env['threads']} threads, "
        f"torch {env['torch']}; measured memory bandwidth {env['bandwidth_gbps']:.1f} GB/s; "
        f"other processes used {env['others_cores_max']:.2f} cores at most during the timings.",
        *([f"Kernels: {env['kernels']}."] if env.get("kernels") else []), "",
        "| LM | dtype | model | ms/token | floor (ms) | x floor | matmul GB/s | matmul GFLOP/s | outside ops | "
        "top groups (ms/step, profiled) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        top = ", ".join(f"{g} {v:.1f}" for g, v in list(r["groups_ms_per_step"].items())[:5])
        lines.append(
            f"| {r['lm']} | {r['dtype']} | {r['model']} | {r['ms_per_token']:.1f} | {r['floor_ms']:.1f} | "
            f"{r['x_floor']:.1f}x | {r['matmul_gbps'] or 0:.1f} | {r['matmul_gflops'] or 0:.1f} | "
            f"{(r['outside_ops_share'] or 0):.0%} | {top} |"
        )
    lines += ["", "ms/token: unprofiled, (t(32 tokens) - t(1 token)) / 31. floor: weights read per step x bytes per "
              "weight / measured bandwidth. Groups (native: our C library's calls, the fused decoding steps and decode-sized "
              "products on our kernels), matmul rates (aten's products only) and the share outside aten ops and native "
              "calls: a profiled 32-token "
              "call minus a profiled 1-token call, per step (the profiler adds overhead per op, so its steps are "
              "slower than the unprofiled ms/token; read the shares, not the sums)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm", default="mpt,llama", help="comma-separated: mpt,llama")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16,int8 (weight-only, of the fp32 model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--cross-attn-every", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script runs")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/decode-profile[-quick])")
    args = p.parse_args(argv)
    bad = set(args.dtypes.split(",")) - {"fp32", "bf16", "int8"}
    if bad:
        p.error(f"unknown --dtypes {', '.join(sorted(bad))}: use fp32, bf16, int8")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Shape(**{**QUICK.__dict__, "decode_batches": (1,), "new_tokens": 4}) if args.quick else SHAPE
    log = lambda msg: print(f"[decode-profile] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    import transformers

    bandwidth = measure_bandwidth(32 if args.quick else 256)
    rows = []
    for kind in args.lm.split(","):
        for dtype_name in args.dtypes.split(","):
            rows += run(kind, dtype_name, s, args, bandwidth, log)
    env = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "bandwidth_gbps": bandwidth,
        "others_cores_max": max((r["others_cores"] for r in rows if r["others_cores"] == r["others_cores"]), default=0.0),
        "shape": s.__dict__, "cross_attn_every": args.cross_attn_every,
        "kernels": __import__("flamingo_vlm.modeling.kernels", fromlist=["summary"]).summary(),
    }
    result = {"env": env, "rows": rows}
    text = render(result)
    print(text)
    stem = Path(args.out) if args.out else HERE / "results" / ("decode-profile" + ("-quick" if args.quick else ""))
    write_results(stem, text, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
