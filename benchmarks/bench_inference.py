#!/usr/bin/env python
"""Inference benchmark for flamingo-vlm on random weights.

Model: a ViT-B/32-sized open_clip vision encoder + a ~125M-parameter causal LM (MPT, as
OpenFlamingo's "MPT-124M" measurement, or a LLaMA-style one with ``--lm llama``), gated
cross-attention in every LM layer, gates drawn from U(-1, 1) so the cross-attention work is real.

Workloads (each also run on the *bare* LM, the same LM without Flamingo, for an overhead ratio):

* decode: 32 new tokens, greedy, from a 64-token prompt with 3 images, batch 1 and batch 4
  (``min_new_tokens == max_new_tokens`` so eos never stops it; the bare LM gets the same
  min-length processor as ``Flamingo.generate``, ``flamingo.MinLength``). Flamingo's time includes
  encoding the images; a "media precomputed" row shows the LM-side cost alone.
* forward+loss: batch 4 x 256 tokens with 3 images per row, no grad (as OpenFlamingo measured);
  optionally forward+backward (``--backward``, on by default).
* encode: 8 images through the vision encoder + perceiver (baseline: vision encoder alone).

Kernels: ``fp32`` is the library's default inference path, where Flamingo's generate/score/no-grad
forward run fp32 linear layers on oneDNN where this machine's probe chose it
(:mod:`flamingo_vlm.modeling.kernels`); its bare-LM baseline runs under the same ``onednn_linears``
block, and decodes with the same fused LM layer steps (:func:`flamingo_vlm.modeling.fused_decode.fused_lm`),
so the ratio compares like with like (``bf16`` too: decode-sized bf16 calls of both run on
packed weights where the machine's probe chose it). ``fp32-mkl`` is torch's default kernels for both
(``Flamingo.cpu_onednn = False``), and ``fp32+onednn`` forces oneDNN linear layers for both,
forward and backward (the route the trainer uses). The header names the CPU and the choices.

For fp32 on CPU with the MPT LM, a "speed-up vs OpenFlamingo" column compares against the original
OpenFlamingo's figures for this shape measured on this machine. For bf16 the whole model is cast
with ``.to(torch.bfloat16)`` and the forward workload's logits are compared with fp32's.

Usage::

    PYTHONPATH=src python benchmarks/bench_inference.py                 # full run, fp32 + bf16
    PYTHONPATH=src python benchmarks/bench_inference.py --dtypes fp32,fp32-mkl,bf16
    PYTHONPATH=src python benchmarks/bench_inference.py --quick         # tiny smoke run (seconds)
    PYTHONPATH=src python benchmarks/bench_inference.py --device cuda --lm llama

Results: a markdown table on stdout, and ``benchmarks/results/inference-<device>[-<lm>][-quick][-<tag>].{md,json}``
(untagged runs limited by ``--only``/``--dtypes`` get a suffix naming them, never the full table's name).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from flamingo_vlm.modeling.fused_decode import fused_lm  # noqa: E402
from flamingo_vlm.modeling.flamingo import Flamingo, MinLength  # noqa: E402
from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer  # noqa: E402

# OpenFlamingo (original code, MPT-124M + ViT-B/32, fp32) on this machine, seconds.
OPENFLAMINGO_SECONDS = {"decode_b1": 2.97, "decode_b4": 7.2, "forward_b4": 3.9}
# torch.testing's default rtol for bfloat16, applied to the logits' scale (max |fp32 logit|).
BF16_RTOL = 1.6e-2
DECODE_RATIO_TARGET = 1.3
SPEEDUP_TARGET = 3.0


@dataclasses.dataclass
class Shape:
    image_size: int = 224
    patch_size: int = 32
    vis_width: int = 768
    vis_layers: int = 12
    vis_heads: int = 12
    lm_dim: int = 768
    lm_layers: int = 12
    lm_heads: int = 12
    mpt_expansion_ratio: int = 4
    llama_intermediate: int = 2048
    mpt_vocab: int = 50280
    llama_vocab: int = 32000
    prompt_len: int = 64
    new_tokens: int = 32
    n_images: int = 3
    decode_batches: tuple[int, ...] = (1, 4)
    fwd_batch: int = 4
    fwd_len: int = 256
    encode_images: int = 8
    perceiver_kwargs: dict | None = None  # None: OpenFlamingo's (depth 6, 8 heads x 64, 64 latents)
    cross_attn_kwargs: dict | None = None  # None: OpenFlamingo's (8 heads x 64, ff_mult 4)


QUICK = Shape(
    image_size=32, patch_size=16, vis_width=64, vis_layers=2, vis_heads=2,
    lm_dim=64, lm_layers=2, lm_heads=4, llama_intermediate=128, mpt_vocab=1000, llama_vocab=1000,
    prompt_len=16, new_tokens=4, n_images=2, decode_batches=(1, 2), fwd_batch=2, fwd_len=32, encode_images=2,
    perceiver_kwargs={"depth": 1, "heads": 2, "dim_head": 16, "num_latents": 8},
    cross_attn_kwargs={"heads": 2, "dim_head": 16},
)


# ------------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------------


def build_lm(kind: str, s: Shape) -> torch.nn.Module:
    if kind == "mpt":
        from transformers import MptConfig, MptForCausalLM

        cfg = MptConfig(
            d_model=s.lm_dim, n_heads=s.lm_heads, n_layers=s.lm_layers, expansion_ratio=s.mpt_expansion_ratio,
            vocab_size=s.mpt_vocab, max_seq_len=2048, use_cache=True,
        )
        return MptForCausalLM(cfg).eval()
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=s.lm_dim, num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
            num_key_value_heads=s.lm_heads, intermediate_size=s.llama_intermediate, vocab_size=s.llama_vocab,
            max_position_embeddings=2048, tie_word_embeddings=False, use_cache=True,
        )
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(f"unknown --lm {kind!r}")


def build_models(
    kind: str, s: Shape, seed: int, cross_attn_every: int = 1
) -> tuple[Flamingo, torch.nn.Module, dict[str, int]]:
    """(Flamingo, bare LM with identical weights, token ids)."""
    torch.manual_seed(seed)
    lm = build_lm(kind, s)
    vocab = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(vocab + 3, mean_resizing=False)
    ids = {"vocab": vocab, "eoc": vocab, "media": vocab + 1, "pad": vocab + 2}
    bare = copy.deepcopy(lm)  # the same LM, untouched by Flamingo
    vision = OpenCLIPVisionTransformer(
        image_size=s.image_size, patch_size=s.patch_size, width=s.vis_width, layers=s.vis_layers, heads=s.vis_heads,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient_checkpointing_disable rename
        model = Flamingo(
            vision, lm, eoc_token_id=ids["eoc"], media_token_id=ids["media"], vis_dim=s.vis_width,
            cross_attn_every_n_layers=cross_attn_every, pad_token_id=ids["pad"],
            perceiver_kwargs=s.perceiver_kwargs, cross_attn_kwargs=s.cross_attn_kwargs,
        )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers():
            for gate in (block.attn_gate, block.ff_gate):
                gate.copy_(torch.rand(gate.shape, generator=gen) * 2 - 1)
    return model.eval(), bare.eval(), ids


def interleaved_prompt(batch: int, length: int, n_images: int, ids: dict[str, int], gen: torch.Generator) -> torch.Tensor:
    """``<image> text <|endofchunk|> <image> text ...``: n_images equal chunks of random text."""
    x = torch.randint(0, ids["vocab"], (batch, length), generator=gen)
    chunk = length // n_images
    for i in range(n_images):
        if i:
            x[:, i * chunk - 1] = ids["eoc"]
        x[:, i * chunk] = ids["media"]
    return x


def make_inputs(s: Shape, ids: dict[str, int], seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 2)
    pix = lambda b, t: torch.randn(b, t, 1, 3, s.image_size, s.image_size, generator=gen)  # noqa: E731
    inputs: dict[str, Any] = {}
    for b in s.decode_batches:
        inputs[f"decode_b{b}"] = (pix(b, s.n_images), interleaved_prompt(b, s.prompt_len, s.n_images, ids, gen))
    lang = interleaved_prompt(s.fwd_batch, s.fwd_len, s.n_images, ids, gen)
    labels = lang.clone()
    labels[labels == ids["media"]] = -100
    inputs["forward"] = (pix(s.fwd_batch, s.n_images), lang, labels)
    inputs["encode"] = pix(1, s.encode_images)
    return inputs


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuMonitor:
    """CPU time used by *other* processes (in cores) over an interval, from /proc/stat minus this
    process's own time. The machine may be shared: OpenMP threads that lose their core to another
    process stall at every barrier, so contended runs are flagged and retried."""

    def __init__(self) -> None:
        self.ok = Path("/proc/stat").exists()
        self.hz = os.sysconf("SC_CLK_TCK") if self.ok else 100

    def _snap(self) -> tuple[int, float]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        t = os.times()
        return user + nice + system + irq + softirq + steal, t.user + t.system

    def start(self) -> Any:
        return (time.perf_counter(), self._snap()) if self.ok else None

    def others_cores(self, token: Any) -> float | None:
        if token is None:
            return None
        t0, (busy0, self0) = token
        busy1, self1 = self._snap()
        dt = time.perf_counter() - t0
        if dt * self.hz < 20:  # /proc/stat counts in clock ticks: too coarse below ~20 of them
            return None
        others = (busy1 - busy0) / self.hz - (self1 - self0)
        return max(0.0, others / dt)


MONITOR = CpuMonitor()


def wait_quiet(max_wait: float, threshold: float, log: Callable[[str], None]) -> float | None:
    """Sleep (up to max_wait s) until other processes use < threshold cores over a 2 s window."""
    if max_wait <= 0 or not MONITOR.ok:
        return None
    deadline = time.monotonic() + max_wait
    announced = False
    while True:
        tok = MONITOR.start()
        time.sleep(2.0)
        load = MONITOR.others_cores(tok)
        if load is None or load < threshold or time.monotonic() > deadline:
            return load
        if not announced:
            log(f"    waiting for other processes to go quiet (using {load:.2f} cores) ...")
            announced = True


def measure(fn: Callable[[], Any], args: argparse.Namespace, device: torch.device, log) -> dict[str, Any]:
    """1 warm-up run, then ``args.repeats`` timed runs; returns median and all times (seconds).

    On CPU, a run during which other processes used >= ``args.contention`` cores is "contended";
    up to ``args.retries`` extra runs replace contended ones, and the median is taken over the
    uncontended runs when there are enough of them (``contended`` tells whether it was not)."""
    fn()
    sync(device)
    runs = []
    cpu = device.type == "cpu"
    while True:
        if cpu:
            wait_quiet(args.wait_quiet, args.contention, log)
        sync(device)
        tok = MONITOR.start() if cpu else None
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        others = MONITOR.others_cores(tok) if cpu else None
        runs.append({"s": dt, "others_cores": others})
        clean = [r for r in runs if r["others_cores"] is None or r["others_cores"] < args.contention]
        if len(clean) >= args.repeats or len(runs) >= args.repeats + args.retries:
            break
    contended = len(clean) < args.repeats
    use = runs if contended else clean
    return {
        "median_s": statistics.median(r["s"] for r in use),
        "min_s": min(r["s"] for r in runs),
        "times_s": [r["s"] for r in runs],
        "others_cores": [r["others_cores"] for r in runs],
        "contended": contended,
    }


def to_dev(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_dev(t, device) for t in x)
    return x


def matmul_mode(dtype_name: str, model: torch.nn.Module | None = None) -> Callable[[], Any]:
    """``fp32+onednn``: every fp32 linear layer of ``model`` on oneDNN, forward and backward
    (forced; the route the trainer uses where the probe picks it)."""
    if dtype_name != "fp32+onednn" or model is None:
        return contextlib.nullcontext
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    return lambda: onednn_linears(model, enabled=True)


def baseline_mode(dtype_name: str, modules: list[torch.nn.Module], mode: Callable[[], Any]) -> Callable[[], Any]:
    """The baselines' kernels: the same linear-layer kernels Flamingo uses (``fp32``: the machine's
    choice; ``fp32+onednn``: forced; ``bf16``: the machine's choice of packed bf16 weights for
    decode-sized calls)."""
    if dtype_name not in ("fp32", "fp32+onednn", "bf16"):
        return mode
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    forced = True if dtype_name == "fp32+onednn" else None
    return lambda: onednn_linears(torch.nn.ModuleList(modules), enabled=forced)


def in_mode(fn: Callable[[], Any], mode: Callable[[], Any]) -> Callable[[], Any]:
    if mode is contextlib.nullcontext:
        return fn

    def wrapped():
        with mode():
            return fn()

    return wrapped


def run_dtype(
    model: Flamingo, bare: torch.nn.Module, inputs: dict[str, Any], ids: dict[str, int], s: Shape,
    args: argparse.Namespace, dtype_name: str, log: Callable[[str], None],
) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    n = s.new_tokens
    mode = matmul_mode(dtype_name, model)
    model.cpu_onednn = {"fp32-mkl": False, "fp32+onednn": True}.get(dtype_name)  # None: the machine's choice
    base_mode = baseline_mode(dtype_name, [bare, model.vision_encoder], mode)
    gen_kwargs = dict(min_new_tokens=n, max_new_tokens=n, do_sample=False, num_beams=1)

    def add(workload: str, key: str | None, flamingo: Callable, baseline: Callable | None, baseline_name: str, **extra):
        if args.only and not any(w in workload for w in args.only):
            return
        log(f"  [{dtype_name}] {workload} ...")
        flamingo, baseline = in_mode(flamingo, mode), (in_mode(baseline, base_mode) if baseline is not None else None)
        r_f = measure(flamingo, args, device, log)
        r_b = measure(baseline, args, device, log) if baseline is not None else None
        row = {
            "workload": workload, "key": key, "dtype": dtype_name, "flamingo": r_f, "baseline": r_b,
            "baseline_name": baseline_name,
            "ratio": (r_f["median_s"] / r_b["median_s"]) if r_b else None,
            "contended": r_f["contended"] or bool(r_b and r_b["contended"]), **extra,
        }
        if key in OPENFLAMINGO_SECONDS and dtype_name.startswith("fp32") and args.reference_applies:
            row["openflamingo_s"] = OPENFLAMINGO_SECONDS[key]
            row["speedup_vs_openflamingo"] = OPENFLAMINGO_SECONDS[key] / r_f["median_s"]
        log(
            f"    flamingo {r_f['median_s']:.3f} s"
            + (f", {baseline_name} {r_b['median_s']:.3f} s, ratio {row['ratio']:.2f}" if r_b else "")
            + (" (CONTENDED: other processes were using the CPU)" if row["contended"] else "")
        )
        rows.append(row)

    for b in s.decode_batches:
        vx, lang = to_dev(inputs[f"decode_b{b}"], device)
        mask = torch.ones_like(lang)

        def fl(vx=vx, lang=lang, mask=mask):
            out = model.generate(vx, lang, attention_mask=mask, **gen_kwargs)
            assert out.shape[1] == lang.shape[1] + n, out.shape

        def lm_only(lang=lang, mask=mask):
            # the same fused LM layer steps as Flamingo.generate gives its LM (flamingo_vlm.modeling.fused_decode),
            # and its min_new_tokens processor (flamingo.MinLength: transformers' two cost ~0.5 ms a step more)
            kw = {k: v for k, v in gen_kwargs.items() if k != "min_new_tokens"}
            least = LogitsProcessorList([MinLength(lang.shape[1] + n, [ids["eoc"]])])
            with torch.no_grad(), fused_lm(bare):
                out = bare.generate(
                    input_ids=lang, attention_mask=mask, eos_token_id=ids["eoc"], pad_token_id=ids["pad"],
                    logits_processor=least, **kw
                )
            assert out.shape[1] == lang.shape[1] + n, out.shape

        add(f"decode {n} tok, batch {b}, {s.n_images} images", f"decode_b{b}", fl, lm_only, "bare LM")
        if b == s.decode_batches[0]:
            with torch.no_grad(), mode():
                media = model.encode_vision_x(vx)

            def fl_media(lang=lang, mask=mask, media=media):
                out = model.generate(None, lang, attention_mask=mask, media=media, **gen_kwargs)
                assert out.shape[1] == lang.shape[1] + n, out.shape

            add(f"decode {n} tok, batch {b}, media precomputed", f"decode_b{b}_media", fl_media, lm_only, "bare LM")

    vx, lang, labels = to_dev(inputs["forward"], device)
    mask = torch.ones_like(lang)

    @torch.no_grad()
    def fl_fwd():
        return model(vx, lang, attention_mask=mask, labels=labels).loss.item()

    @torch.no_grad()
    def lm_fwd():
        return bare(input_ids=lang, attention_mask=mask, labels=labels).loss.item()

    add(f"forward+loss, {s.fwd_batch}x{s.fwd_len}, {s.n_images} images, no grad", f"forward_b{s.fwd_batch}",
        fl_fwd, lm_fwd, "bare LM")

    if args.backward:
        def fl_bwd():
            model.zero_grad(set_to_none=True)
            model(vx, lang, attention_mask=mask, labels=labels).loss.backward()

        def lm_bwd():
            bare.zero_grad(set_to_none=True)
            bare(input_ids=lang, attention_mask=mask, labels=labels).loss.backward()

        add(f"forward+backward, {s.fwd_batch}x{s.fwd_len}, {s.n_images} images", f"backward_b{s.fwd_batch}",
            fl_bwd, lm_bwd, "bare LM (all params trainable)")
        model.zero_grad(set_to_none=True)
        bare.zero_grad(set_to_none=True)

    enc = to_dev(inputs["encode"], device)

    @torch.no_grad()
    def fl_enc():
        return model.encode_vision_x(enc)

    @torch.no_grad()
    def vit_only():
        return model.vision_encoder(enc.flatten(0, 2).to(next(model.vision_encoder.parameters()).dtype))

    add(f"encode {s.encode_images} images (ViT + perceiver)", f"encode_{s.encode_images}", fl_enc, vit_only,
        "ViT alone")
    return rows


@torch.no_grad()
def forward_logits(
    model: torch.nn.Module, inputs: dict[str, Any], device: torch.device, bare: bool = False, dtype_name: str = "fp32"
):
    vx, lang, labels = to_dev(inputs["forward"], device)
    mask = torch.ones_like(lang)
    with matmul_mode(dtype_name, model)():
        out = model(input_ids=lang, attention_mask=mask, labels=labels) if bare else model(vx, lang, mask, labels=labels)
    return out.logits.float().cpu(), float(out.loss)


def logits_diff(ref: torch.Tensor, ref_loss: float, got: torch.Tensor, got_loss: float) -> dict[str, Any]:
    diff = (got - ref).abs()
    scale = ref.abs().max().item()
    max_abs = diff.max().item()
    return {
        "max_abs_diff": max_abs,
        "mean_abs_diff": diff.mean().item(),
        "logits_max_abs": scale,
        "logits_std": ref.std().item(),
        "rel_max_abs_diff": max_abs / scale,
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "loss_fp32": ref_loss,
        "loss_bf16": got_loss,
        "tolerance_rel": BF16_RTOL,
        "within_tolerance": max_abs <= BF16_RTOL * scale,
    }


# ------------------------------------------------------------------------------------------------
# environment and report
# ------------------------------------------------------------------------------------------------


def calibrate(device: torch.device) -> dict[str, float]:
    """Machine speed now, to compare runs on a machine whose speed drifts (shared hosts): an fp32
    GEMM like the forward workload's FFN (GFLOP/s) and an fp32 GEMV like a decode step's (GB/s)."""
    out = {}
    for name, m in (("gemm_fp32_gflops", 1024), ("gemv_fp32_gbps", 1)):
        a = torch.randn(m, 768, device=device)
        w = torch.randn(3072, 768, device=device)
        n = 20 if m > 1 else 200
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            torch.nn.functional.linear(a, w)
        sync(device)
        dt = (time.perf_counter() - t0) / n
        out[name] = (2 * m * 768 * 3072 / dt / 1e9) if m > 1 else (w.numel() * 4 / dt / 1e9)
    return out


def cpu_model() -> str:
    from flamingo_vlm.modeling.kernels import cpu_model as model_name

    return model_name()


def write_results(stem: Path, text: str, result: dict) -> None:
    """``stem.md`` (the printed table) and ``stem.json`` (the numbers), for every benchmark here."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))


def contention_line(others_cores: float, load_at_start: float) -> str:
    """The machine and how busy it was: a figure is only a quiet-machine figure when both loads are near 0."""
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}. "
            f"Contention: other processes used {others_cores:.2f} cores during the run; load average "
            f"{load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end (figures are not quiet-machine figures "
            "unless both are near 0).")


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "calibration_start": calibrate(torch.device(args.device)),
    }
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    else:
        from flamingo_vlm.modeling import kernels

        env["kernels"] = kernels.summary()  # the CPU and the kernel choices this run used
    return env


def fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}" if x < 10 else f"{x:.2f}"


def render(result: dict[str, Any]) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [
        f"# flamingo-vlm inference benchmark ({result['config']['lm']}, {env['device']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs; {', '.join(env['cpu_flags']) or 'no AVX-512'}),"
        f" torch threads: {env['threads']}" + (f"; GPU: {env['gpu']}" if "gpu" in env else ""),
        *([f"- kernels: {env['kernels']}"] if env.get("kernels") else []),
        f"- model: {result['config']['description']}",
        f"- params: Flamingo {result['params']['flamingo_m']:.1f} M (LM {result['params']['lm_m']:.1f} M,"
        f" vision {result['params']['vision_m']:.1f} M, perceiver {result['params']['perceiver_m']:.1f} M,"
        f" cross-attention {result['params']['xattn_m']:.1f} M)",
        f"- timing: 1 warm-up run, median of {result['config']['repeats']} runs (on CPU: runs during which other"
        f" processes used >= {result['config']['contention']} cores are replaced, up to {result['config']['retries']}"
        " extra runs); random weights, gates ~ U(-1, 1)",
        f"- load average (1/5/15 min) at start {fmt_load(env.get('loadavg_start'))}, at end {fmt_load(env.get('loadavg_end'))}",
        f"- machine speed at start / end: {fmt_cal(env.get('calibration_start'))} / {fmt_cal(env.get('calibration_end'))}",
        "",
        "| workload | dtype | Flamingo (s) | baseline (s) | baseline | Flamingo / baseline | OpenFlamingo (s) | speed-up vs OpenFlamingo |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        speedup = r.get("speedup_vs_openflamingo")
        speedup = "—" if speedup is None else f"{speedup:.1f}x"
        baseline = fmt_s(r["baseline"]["median_s"] if r["baseline"] else None)
        lines.append(
            f"| {r['workload']}{' †' if r['contended'] else ''} | {r['dtype']} | {fmt_s(r['flamingo']['median_s'])} | {baseline} | "
            f"{r['baseline_name']} | {ratio} | {fmt_s(r.get('openflamingo_s'))} | {speedup} |"
        )
    floor = result.get("decode_floor")
    if floor:
        lines += ["", f"Decode floor: each new token reads the bare LM's {floor['lm_step_m']:.1f} M weights (LM head "
                  f"included, input embeddings not) and Flamingo's cross-attention adds {floor['xattn_step_m']:.1f} M "
                  f"(key/value projections excluded: computed once per call), so by weight traffic alone batch-1 "
                  f"decoding takes at least {floor['ratio']:.2f}x the bare LM's time, before encoding the images."]
    if any(r["contended"] for r in rows):
        lines += ["", "† contended: fewer than `--repeats` of the `--repeats` + `--retries` timed runs had the CPU to "
                  "themselves; the median includes contended runs and overstates the time (see `others_cores` "
                  "in the JSON)."]
    acc = result.get("bf16_accuracy")
    if acc:
        lines += [
            "",
            f"bf16 vs fp32 logits (forward workload): max |diff| {acc['max_abs_diff']:.4g}, logits' max |value| "
            f"{acc['logits_max_abs']:.4g} -> relative {acc['rel_max_abs_diff']:.3%} (tolerance {acc['tolerance_rel']:.1%},"
            f" torch.testing's bf16 rtol); mean |diff| {acc['mean_abs_diff']:.3g} (logits std {acc['logits_std']:.3g});"
            f" top-1 agreement {acc['top1_agreement']:.2%}; loss fp32 {acc['loss_fp32']:.4f} vs bf16 {acc['loss_bf16']:.4f}.",
        ]
        bare_acc = result.get("bf16_accuracy_bare_lm")
        if bare_acc:
            lines += [
                "",
                f"For reference, the bare LM alone (same tokens, no images): max |diff| {bare_acc['max_abs_diff']:.4g} / "
                f"max |logit| {bare_acc['logits_max_abs']:.4g} = {bare_acc['rel_max_abs_diff']:.3%}; top-1 agreement "
                f"{bare_acc['top1_agreement']:.2%}.",
            ]
    linear = result.get("onednn_linear_accuracy")
    if linear:
        lines += [
            "",
            f"fp32 (oneDNN linear layers) vs fp32-mkl logits: max |diff| {linear['max_abs_diff']:.3g} (relative "
            f"{linear['rel_max_abs_diff']:.2e}), top-1 agreement {linear['top1_agreement']:.2%}.",
        ]
    onednn = result.get("onednn_accuracy")
    if onednn:
        lines += [
            "",
            f"fp32+onednn vs fp32 logits: max |diff| {onednn['max_abs_diff']:.3g} (relative {onednn['rel_max_abs_diff']:.2e}),"
            f" top-1 agreement {onednn['top1_agreement']:.2%}.",
        ]
    if result.get("targets"):
        lines += ["", "Targets:", ""]
        for t in result["targets"]:
            lines.append(f"- {'PASS' if t['pass'] else 'FAIL'}: {t['name']} ({t['detail']})")
    return "\n".join(lines) + "\n"


def fmt_cal(cal) -> str:
    if not cal:
        return "—"
    return f"fp32 GEMM {cal['gemm_fp32_gflops']:.0f} GFLOP/s, fp32 GEMV {cal['gemv_fp32_gbps']:.0f} GB/s"


def fmt_load(load) -> str:
    return "—" if not load else "/".join(f"{x:.2f}" for x in load)


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    rows = result["rows"]
    for r in rows:
        if r["key"] == "decode_b1" and r["ratio"] is not None:
            targets.append({
                "name": f"decode batch 1 within {DECODE_RATIO_TARGET}x of the bare LM ({r['dtype']})",
                "pass": r["ratio"] <= DECODE_RATIO_TARGET,
                "detail": f"{r['ratio']:.2f}x; weight-traffic floor {result['decode_floor']['ratio']:.2f}x",
            })
    for r in rows:
        if "speedup_vs_openflamingo" in r:
            targets.append({
                "name": f">= {SPEEDUP_TARGET:.0f}x faster than OpenFlamingo: {r['workload']} ({r['dtype']})",
                "pass": r["speedup_vs_openflamingo"] >= SPEEDUP_TARGET,
                "detail": f"{r['speedup_vs_openflamingo']:.1f}x ({r['flamingo']['median_s']:.3f} s vs {r['openflamingo_s']} s)",
            })
    acc = result.get("bf16_accuracy")
    if acc:
        targets.append({
            "name": "bf16 logits within bf16 tolerance of fp32",
            "pass": acc["within_tolerance"],
            "detail": f"max |diff| / max |logit| = {acc['rel_max_abs_diff']:.3%} <= {acc['tolerance_rel']:.1%}",
        })
    return targets


def count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def decode_weight_floor(model: Flamingo, bare: torch.nn.Module) -> dict[str, float]:
    """Batch-1 decoding reads every weight once per token, so its time is bounded below by weight
    traffic. The bare LM reads all its weights but the input embedding table (one row per token),
    unless the table is tied to the LM head. Flamingo adds its cross-attention blocks, less their
    key/value projections (the images' keys/values are computed once per call). The ratio is the
    least Flamingo/bare-LM decode time could be, before image encoding and per-layer overheads."""
    emb, head = bare.get_input_embeddings().weight, bare.get_output_embeddings().weight
    lm = sum(p.numel() for p in bare.parameters()) - (0 if emb is head else emb.numel())
    xattn = sum(p.numel() for b in model.gated_cross_attn_layers() for n, p in b.named_parameters() if "to_kv" not in n)
    return {"lm_step_m": lm / 1e6, "xattn_step_m": xattn / 1e6, "ratio": (lm + xattn) / lm}


def results_stem(args, device_type: str) -> str:
    """``inference-<device>[-<lm>][-xattn<N>][-quick]`` then ``-<tag>``, or, untagged, a suffix naming
    ``--only``/``--dtypes`` when they limit the run, so a partial run never overwrites the full table."""
    stem = (f"inference-{device_type}" + ("" if args.lm == "mpt" else f"-{args.lm}")
            + ("" if args.cross_attn_every == 1 else f"-xattn{args.cross_attn_every}") + ("-quick" if args.quick else ""))
    if args.tag:
        return f"{stem}-{args.tag}"
    if args.only:  # (words as a name: "batch 1" -> batch-1)
        stem += "-only-" + "-".join("-".join(w.split()) for w in args.only)
    if args.dtypes != "fp32,bf16":
        stem += "-" + args.dtypes.replace(",", "-").replace("+", "")
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--lm", choices=("mpt", "llama"), default="mpt")
    p.add_argument("--cross-attn-every", type=int, default=1, metavar="N",
                   help="cross-attention every N LM layers (default 1, the shape of OpenFlamingo's figures)")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated: fp32 (the default inference path: oneDNN linear layers on CPU), fp32-mkl "
                        "(torch's default kernels), fp32+onednn (every fp32 GEMM through oneDNN, CPU only), bf16; "
                        "default fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median); 1 warm-up run before")
    p.add_argument("--retries", type=int, default=3,
                   help="CPU: extra timed runs allowed to replace runs contended by other processes (default 3)")
    p.add_argument("--contention", type=float, default=0.25,
                   help="CPU: a run is contended if other processes used >= this many cores during it (default 0.25)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="CPU: before each timed run, wait up to SECONDS for other processes to go quiet (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes: a smoke run of a few seconds")
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                   help="also time forward+backward (default on)")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only workloads whose name contains one of these words (decode, forward, backward, encode)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-save", action="store_true", help="print only, do not write results files")
    p.add_argument("--tag", default="", help="suffix for the results files' names (inference-<device>[-<lm>]...-<tag>)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    known = ("fp32", "fp32-mkl", "fp32+onednn", "bf16")
    bad = [d for d in dtypes if d not in known]
    if bad:
        raise SystemExit("bench_inference.py: error: " + f"unknown dtype(s) {bad}")
    dtypes.sort(key=known.index)  # fp32 first: the bf16 model is the fp32 one cast in place
    device = torch.device(args.device)
    if ("fp32+onednn" in dtypes or "fp32-mkl" in dtypes) and device.type != "cpu":
        raise SystemExit("bench_inference.py: error: " + "fp32+onednn and fp32-mkl are CPU modes")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_inference.py: error: " + "--device cuda but torch.cuda.is_available() is False")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    args.reference_applies = device.type == "cpu" and args.lm == "mpt" and not args.quick and args.cross_attn_every == 1

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    s = QUICK if args.quick else Shape()
    env = environment(args)
    log(f"torch {env['torch']}, transformers {env['transformers']}, CPU {env['cpu']}, threads {env['threads']}"
        + (f", GPU {env['gpu']}" if "gpu" in env else ""))
    model, bare, ids = build_models(args.lm, s, args.seed, args.cross_attn_every)
    model.to(device)
    bare.to(device)
    inputs = make_inputs(s, ids, args.seed)
    lm_desc = (
        f"MPT (d_model {s.lm_dim}, {s.lm_layers} layers, {s.lm_heads} heads, expansion {s.mpt_expansion_ratio}, vocab {ids['vocab']}+3)"
        if args.lm == "mpt"
        else f"LLaMA (hidden {s.lm_dim}, {s.lm_layers} layers, {s.lm_heads} heads, intermediate {s.llama_intermediate}, vocab {ids['vocab']}+3)"
    )
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_inference.py" + ("" if not (argv or sys.argv[1:]) else " " + " ".join(argv or sys.argv[1:])),
        "environment": env,
        "config": {
            "lm": args.lm, "cross_attn_every": args.cross_attn_every, "quick": args.quick, "repeats": args.repeats, "dtypes": dtypes,
            "retries": args.retries, "contention": args.contention, "wait_quiet_s": args.wait_quiet,
            "shape": dataclasses.asdict(s),
            "description": (
                f"ViT (image {s.image_size}, patch {s.patch_size}, width {s.vis_width}, {s.vis_layers} layers, "
                f"{s.vis_heads} heads) + {lm_desc}, cross-attention "
                + ("every layer" if args.cross_attn_every == 1 else f"every {args.cross_attn_every} layers")
            ),
        },
        "params": {
            "flamingo_m": count(model), "lm_m": count(bare), "vision_m": count(model.vision_encoder),
            "perceiver_m": count(model.perceiver),
            "xattn_m": sum(count(b) for b in model.gated_cross_attn_layers()),
        },
        "decode_floor": decode_weight_floor(model, bare),
        "rows": [],
    }
    log(f"model: {result['config']['description']}; Flamingo {result['params']['flamingo_m']:.1f} M params")

    ref_logits = ref_bare = None
    for dtype_name in dtypes:
        if dtype_name == "bf16":
            if ref_logits is None:  # fp32 reference, taken before the in-place cast
                ref_logits, ref_bare = forward_logits(model, inputs, device), forward_logits(bare, inputs, device, True)
            model.to(torch.bfloat16)
            bare.to(torch.bfloat16)
        result["rows"] += run_dtype(model, bare, inputs, ids, s, args, dtype_name, log)
        if dtype_name == "fp32" and ("bf16" in dtypes or "fp32+onednn" in dtypes):
            ref_logits, ref_bare = forward_logits(model, inputs, device), forward_logits(bare, inputs, device, True)
        if dtype_name == "fp32" and device.type == "cpu":  # oneDNN linear layers vs torch's default kernels
            model.cpu_onednn = True  # forced: the accuracy of oneDNN whatever the machine chose
            onednn_out = forward_logits(model, inputs, device)
            model.cpu_onednn = False
            result["onednn_linear_accuracy"] = logits_diff(*forward_logits(model, inputs, device), *onednn_out)
            model.cpu_onednn = None
        if dtype_name == "fp32+onednn" and ref_logits is not None:
            result["onednn_accuracy"] = logits_diff(*ref_logits, *forward_logits(model, inputs, device, False, dtype_name))
        if dtype_name == "bf16":
            result["bf16_accuracy"] = logits_diff(*ref_logits, *forward_logits(model, inputs, device))
            # The same comparison for the bare LM: how much of the difference is bf16 itself.
            result["bf16_accuracy_bare_lm"] = logits_diff(*ref_bare, *forward_logits(bare, inputs, device, True))
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["calibration_end"] = calibrate(device)
    result["targets"] = [] if args.quick else evaluate_targets(result)  # targets are for the full shape

    md = render(result)
    print(md)
    if not args.no_save:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = results_stem(args, device.type)
        for path, text in ((out / f"{stem}.md", md), (out / f"{stem}.json", json.dumps(result, indent=2) + "\n")):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        log(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
