#!/usr/bin/env python
"""Weight-only quantization (``quantize="int8"``/``"int4"``): memory, batch-1 decode speed and greedy agreement.

Models:

* ``shape``: the speed issue's benchmark shape (``bench_decode_profile.SHAPE``, built by
  ``bench_inference.build_models``): a ViT-B/32-shaped encoder, an MPT (or ``--lm llama``) of d_model
  768 x 12 layers, vocab 400, cross-attention every layer, 3 images, a 54-token prompt, 32 new
  tokens, random weights;
* ``builtin``: the built-in model (``from_pretrained("smol-synthetic")``) on the demo prompts of
  ``flamingo-vlm generate --demo`` (2 images + text), 32 new tokens.

Variants: ``fp32``; ``bf16`` (``model.to(torch.bfloat16)``); ``int8`` and ``int4`` (the fp32 model with
its LM, cross-attention and perceiver linears quantized by
:func:`flamingo_vlm.modeling.quantize.quantize_model`, and with int8 its LM head, as by default;
activations stay fp32 outside those layers); on request (``--variants``) ``int4+head``: the LM's
output head quantized too (``int8+head`` is ``int8``), and
``int8-aten``: int8 on torch's ``aten._weight_int8pack_mm`` only (``int8`` takes our C kernel for
decode-sized calls where this machine measured it faster, see :mod:`flamingo_vlm.modeling.native`),
``bf16-packed`` and ``fp32-onednn``: every decode-sized call on oneDNN (bf16: on its packed copies;
``bf16`` and ``fp32`` take our C kernel or oneDNN, as this machine measured for each row count).

Columns: **weights MB** (all parameters and buffers of the model), **+ packed MB** (copies of bf16
weights in oneDNN's blocked layout that bf16 decoding keeps where this CPU measured them faster, see
:func:`flamingo_vlm.modeling.kernels.packed_linear`), **first token ms** (t(1): encoding the images, the
prompt's prefill and one step; median of the rounds), **ms/token** (one decode step:
(t(32 new tokens) - t(1)) / 31, median of ``--repeats``, as ``bench_decode_profile.py``; then the median of
``--rounds`` rounds in which the variants take turns, so that all of them see the same machine), speed-up vs
our fp32 and bf16, and for the built-in model the **greedy agreement** with fp32 and bf16 on the
demo prompts (share of positions where the generated token ids are equal, and whether the whole
output is identical). The CPU, its flags, the kernel choices and the CPU time other processes used
while each figure was taken are printed: figures from a busy machine are not comparable.

Usage::

    python benchmarks/bench_quantize.py                     # both models, all four variants
    python benchmarks/bench_quantize.py --models builtin --variants fp32,bf16,int4,int4+head --repeats 5
    python benchmarks/bench_quantize.py --quick             # tiny shape, a smoke run

Writes the table to stdout and ``benchmarks/results/quantize[-quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from bench_decode_profile import SHAPE, decode_ms, measure_bandwidth  # noqa: E402
from bench_inference import QUICK, Shape, build_models, cpu_flags, cpu_model, interleaved_prompt, write_results  # noqa: E402

from flamingo_vlm.modeling import fused_decode, kernels  # noqa: E402
from flamingo_vlm.modeling.kernels import packed_bytes  # noqa: E402
from flamingo_vlm.modeling.quantize import QuantizedLinear, quantize_model, weight_bytes  # noqa: E402

VARIANTS = ("fp32", "bf16", "int8", "int4", "int8+head", "int4+head", "int8-aten", "bf16-packed", "fp32-onednn",
            "fp32-unfused", "bf16-unfused", "int8-unfused")


def variant(base: torch.nn.Module, name: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if name.startswith("bf16"):
        return model.to(torch.bfloat16)
    if name.startswith("int"):
        quantize_model(model, name.split("+")[0].split("-")[0], head=True if name.endswith("+head") else None)
    if name.endswith("-aten"):  # int8 on torch's kernel only, beside our C kernel's "int8"
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.native = False
    return model


PINNED = {"bf16-packed": ("bf16", "packed"), "fp32-onednn": ("fp32", "onednn")}


@contextlib.contextmanager
def routes(name: str):
    """``bf16-packed`` / ``fp32-onednn``: every decode-sized call on oneDNN (bf16: its packed copies),
    beside ``bf16`` / ``fp32``, which take what this machine measured fastest per row count (our C
    kernel or oneDNN). ``<dtype>-unfused``: the decoding steps of the cross-attention blocks and the LM's
    layers run module by module (``FLAMINGO_VLM_FUSED=0``), not as native calls (``flamingo_vlm.modeling.fused_decode``)."""
    if name.endswith("-unfused"):
        old = os.environ.get(fused_decode.ENV)
        os.environ[fused_decode.ENV] = "0"
        try:
            yield
        finally:
            if old is None:
                del os.environ[fused_decode.ENV]
            else:
                os.environ[fused_decode.ENV] = old
        return
    if name not in PINNED:
        yield
        return
    kind, route = PINNED[name]
    kernels.decide(f"{kind}_decode")
    saved = kernels._MEMO[f"{kind}_routes"]
    kernels.set_routes(kind, (route,) * len(kernels.DECODE_BUCKETS))
    try:
        yield
    finally:
        kernels.set_routes(kind, saved)


def shape_inputs(s: Shape, kind: str):
    model, _bare, ids = build_models(kind, s, seed=0)
    gen = torch.Generator().manual_seed(1)
    lang_x = interleaved_prompt(1, s.prompt_len, s.n_images, ids, gen)
    vision_x = torch.randn(1, s.n_images, 1, 3, s.image_size, s.image_size, generator=gen)
    return model, [(lang_x, vision_x)], s.new_tokens


def builtin_inputs(quick: bool):
    from flamingo_vlm.generate import _model_inputs, _read_image, demo_tasks, example_image
    from flamingo_vlm.pretrained import from_pretrained

    model, image_processor, tokenizer = from_pretrained("smol-synthetic")
    prompts = []
    for task in demo_tasks()[: 1 if quick else None]:
        sample = [_read_image(str(example_image(v))) if k == "image" else v
                  for k, v in task.joined(model.config.demo_separator)]
        vision_x, input_ids, _mask = _model_inputs(model, image_processor, tokenizer, sample)
        prompts.append((input_ids, vision_x))
    return model, prompts, 4 if quick else 32


def greedy(model, prompts, new_tokens: int) -> list[list[int]]:
    outs = []
    dtype = next(model.perceiver.parameters()).dtype
    with torch.inference_mode():
        for lang_x, vision_x in prompts:
            out = model.generate(vision_x.to(dtype), lang_x, torch.ones_like(lang_x), max_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1)
            outs.append(out[0, lang_x.shape[1]:].tolist())
    return outs


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Share of equal token ids over all positions (a missing token counts as unequal), and how many
    outputs are identical."""
    same = total = identical = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(p == q for p, q in zip(x, y))
        total += n
        identical += x == y
    return same / max(total, 1), identical


def run_model(label: str, base, prompts, new_tokens: int, args, log) -> list[dict[str, Any]]:
    """Times every variant once per round, the variants interleaved (a bandwidth-bound step drifts by
    20% and more over minutes on a shared VM: interleaving lets every variant see the same drift);
    ms/token is the median over the rounds, and each round's ratio to bf16 is kept."""
    names = args.variants.split(",")
    models = {name: variant(base, name) for name in names}
    lang_x, vision_x = prompts[0]
    times: dict[str, list[float]] = {name: [] for name in names}
    firsts: dict[str, list[float]] = {name: [] for name in names}
    others: dict[str, float] = {name: 0.0 for name in names}
    bandwidth: list[float] = []
    for k in range(args.rounds):
        bandwidth.append(measure_bandwidth(64 if args.quick else 256))
        log(f"{label}: round {k + 1}/{args.rounds}: memory bandwidth {bandwidth[-1]:.1f} GB/s")
        for name, model in models.items():
            dtype = next(model.perceiver.parameters()).dtype
            with routes(name):
                ms, first, o = decode_ms(model, lang_x, vision_x.to(dtype), True, new_tokens, args.repeats)
            times[name].append(ms)
            firsts[name].append(first)
            others[name] = max(others[name], o)
            log(f"{label} {name}: round {k + 1}/{args.rounds}: {ms:.1f} ms/token, first token {first:.0f} ms "
                f"(other processes {o:.2f} cores)")
    rows, outputs = [], {}
    for name, model in models.items():
        row = {"model": label, "variant": name, "weights_mb": weight_bytes(model) / 1e6,
               "packed_mb": packed_bytes(model) / 1e6,
               "ms_per_token": statistics.median(times[name]), "ms_per_token_rounds": times[name],
               "first_token_ms": statistics.median(firsts[name]),
               "others_cores": others[name], "bandwidth_gbs_rounds": bandwidth}
        if args.quality:
            with routes(name):
                outputs[name] = greedy(model, prompts, new_tokens)
            log(f"{label} {name}: greedy {outputs[name]}")
        rows.append(row)
    del models
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for ref in ("fp32", "bf16"):
            if ref in by:
                r[f"x_vs_{ref}"] = by[ref]["ms_per_token"] / r["ms_per_token"]
                rounds = [a / b for a, b in zip(by[ref]["ms_per_token_rounds"], r["ms_per_token_rounds"])]
                r[f"x_vs_{ref}_range"] = [min(rounds), max(rounds)]
            if ref in outputs and r["variant"] in outputs:
                share, identical = agreement(outputs[ref], outputs[r["variant"]])
                r[f"agree_{ref}"] = f"{share:.0%} ({identical}/{len(prompts)} identical)"
    return rows


def _x(row: dict[str, Any], ref: str) -> str:
    if f"x_vs_{ref}" not in row:
        return "-"
    lo, hi = row[f"x_vs_{ref}_range"]
    return f"{row[f'x_vs_{ref}']:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if hi - lo >= 0.005 else "")


def _bandwidth(rows: list[dict[str, Any]]) -> str:
    """The memory bandwidth measured before each round (a shared VM's drifts by 2x within an hour,
    and batch-1 decoding is bound by it), or nothing for results written before it was measured."""
    seen = [b for r in rows for b in r.get("bandwidth_gbs_rounds", [])]
    return f"; memory bandwidth before each round {min(seen):.1f}-{max(seen):.1f} GB/s" if seen else ""


def render(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        "# Weight-only quantization: memory and batch-1 decode", "",
        f"CPU: {env['cpu']} ({', '.join(env['cpu_flags']) or 'no AVX2'}), {env['threads']} threads, torch "
        f"{env['torch']}; load average {env['loadavg']}; other processes used {env['others_cores_max']:.2f} cores "
        "at most during the timings" + _bandwidth(result["rows"]) + ".", "",
        "| model | variant | weights MB | + packed MB | first token ms | ms/token | x vs fp32 | "
        "x vs bf16 (rounds: min-max) | other procs (cores) | greedy = fp32 | greedy = bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['weights_mb']:.0f} | {r.get('packed_mb', 0):.0f} | "
            f"{r.get('first_token_ms', float('nan')):.0f} | {r['ms_per_token']:.1f} | "
            f"{_x(r, 'fp32')} | {_x(r, 'bf16')} | "
            f"{r['others_cores']:.2f} | {r.get('agree_fp32', '-')} | {r.get('agree_bf16', '-')} |"
        )
    lines += ["", "first token ms: t(1), the images, the prompt and one decode step (median, as ms/token). "
              "ms/token: (t(N new tokens) - t(1)) / (N - 1), median of the repeats, then median of "
              f"{result.get('rounds', 1)} rounds in which the variants take turns; everything but the "
              "quantized layers runs in fp32; int4 and int8-aten run those layers on torch's kernels with bf16 "
              "activations, int8 its decode-sized calls on our C kernel (fp32 activations) where the kernel "
              "probe chose it (see flamingo_vlm/modeling/quantize.py and native.py); int8 quantizes the LM head. "
              "Greedy agreement: token ids equal position by position over the prompts. + packed MB: copies of bf16 "
              "weights in oneDNN's layout that decoding made (flamingo_vlm.modeling.kernels.packed_linear), on top "
              "of the weights."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="shape,builtin", help="comma-separated: shape,builtin")
    p.add_argument("--lm", default="mpt", choices=["mpt", "llama"], help="the LM family of the 'shape' model")
    p.add_argument("--variants", default=",".join(VARIANTS[:4]), help="comma-separated: " + ",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3, help="timings per variant per round (their median)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all variants, interleaved (median of rounds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip the greedy-agreement runs")
    p.add_argument("--quick", action="store_true", help="tiny shape and 4 tokens: checks that the script runs")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/quantize[-quick])")
    args = p.parse_args(argv)
    bad = set(args.variants.split(",")) - set(VARIANTS)
    if bad:
        p.error(f"unknown --variants {', '.join(sorted(bad))}: use {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[quantize] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    s = Shape(**{**QUICK.__dict__, "decode_batches": (1,), "new_tokens": 4}) if args.quick else SHAPE
    rows = []
    for which in args.models.split(","):
        if which == "shape":
            base, prompts, n = shape_inputs(s, args.lm)
            label = f"{args.lm} d{s.lm_dim}x{s.lm_layers}" + (" (quick)" if args.quick else "")
        elif which == "builtin":
            base, prompts, n = builtin_inputs(args.quick)
            label = "smol-synthetic"
        else:
            p.error(f"unknown --models entry {which!r}: use shape, builtin")
        rows += run_model(label, base.eval(), prompts, n, args, log)
        del base
    try:  # the CPU kernel choices the rest of the model ran with
        from flamingo_vlm.modeling.kernels import kernel_choice, summary

        kernels = summary(kernel_choice(("decode", "gemm", "bf16", "fp32_decode", "bf16_decode", "int8_decode",
                                         "int8_gemm")))
    except Exception as e:  # noqa: BLE001 (a report line, not a reason to lose the figures)
        kernels = f"kernel choices unavailable: {type(e).__name__}: {e}"
    env = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "kernels": kernels,
           "others_cores_max": max((r["others_cores"] for r in rows if r["others_cores"] == r["others_cores"]),
                                   default=0.0)}
    result = {"env": env, "rows": rows, "rounds": args.rounds}
    text = render(result) + f"\n{env['kernels']}\n"
    print(text)
    stem = Path(args.out) if args.out else HERE / "results" / ("quantize" + ("-quick" if args.quick else ""))
    write_results(stem, text, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
