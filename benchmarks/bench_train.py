#!/usr/bin/env python
"""Training-step benchmark for flamingo-vlm on random weights.

Model: a ViT-B/32-sized open_clip vision encoder (224 px, width 768, 12 layers) + a ~125M MPT LM
(d_model 768, 12 layers, 12 heads, vocab 50280 + the 3 Flamingo tokens), gated cross-attention in
every LM layer, OpenFlamingo's perceiver (depth 6, 64 latents). Batch: 4 rows x 256 tokens x 3 images.

Each case runs in a fresh process (so its peak memory is its own) through the real training loop
(:class:`flamingo_vlm.train.Trainer`: forward, token-sum loss, backward, clip, AdamW step):

* ``fp32``, ``fp32+gc`` (gradient checkpointing of the LM and the cross-attention),
  ``fp32+gclm`` (of the LM's layers only), ``amp_bf16``, ``bf16`` (pure bf16);
* ``fp32-default``: fp32 without the fast paths (torch's default GEMM, full logits, glibc's
  default allocator thresholds), i.e. the straightforward implementation of the same loop;
* ``lm-fp32`` / ``lm-bf16``: the bare MPT LM (no images), forward + loss + backward with all of its
  weights trainable (no optimizer step), as a reference for what the LM alone costs.

``--memory-phases`` adds, per case, the live heap at its peak in each phase of the step (vision
encoder, perceiver, LM, loss, backward, clip + AdamW), read from tcmalloc's counters every 2 ms,
beside the weights, gradients and AdamW state computed from the parameters: where the peak is and
what it is made of.

Reported: median step time over the timed steps (after one warm-up step), samples/s, and peak
memory: the process's peak RSS (``ru_maxrss``: weights, optimizer state, activations, the Python and
torch runtime) and its growth over the RSS right after building the model. For scale, the original
OpenFlamingo code took ~9.9 s per step and 5.6 GB peak for this shape in fp32 on an AMD Zen 5 (the
"vs OpenFlamingo" columns use those figures); side by side on the machine at hand:
``bench_vs_original.py --cases train``. Targets in fp32: >= 2x faster and <= 60 % of the memory.
The header names the CPU and the kernel choices (:mod:`flamingo_vlm.modeling.kernels`).
``--profile``: where one fp32 step goes (torch.profiler) against this CPU's matmul FLOP/s.
``--saved``: what one step keeps for backward (its activation memory), by module.

Usage::

    PYTHONPATH=src python benchmarks/bench_train.py              # all cases, 3 timed steps each
    PYTHONPATH=src python benchmarks/bench_train.py --quick      # tiny shapes (seconds)
    PYTHONPATH=src python benchmarks/bench_train.py --cases fp32 bf16 --steps 5
    PYTHONPATH=src python benchmarks/bench_train.py --cases fp32 fp32+gclm --memory-phases
    PYTHONPATH=src python benchmarks/bench_train.py --saved              # kept for backward, by module

Results: a markdown table on stdout and ``benchmarks/results/train-cpu[-glibc][-quick][-set].{md,json}`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

OPENFLAMINGO_STEP_S = 9.9
OPENFLAMINGO_PEAK_GB = 5.6
SPEEDUP_TARGET = 2.0
MEMORY_TARGET = 0.6
CASES = ("fp32", "fp32+gc", "fp32+gclm", "fp32-default", "amp_bf16", "bf16", "lm-fp32", "lm-bf16")


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
    expansion_ratio: int = 4
    vocab: int = 50280
    batch: int = 4
    length: int = 256
    images: int = 3
    perceiver_kwargs: dict | None = None
    cross_attn_kwargs: dict | None = None


QUICK = Shape(
    image_size=32, patch_size=16, vis_width=64, vis_layers=2, vis_heads=2, lm_dim=64, lm_layers=2, lm_heads=4,
    vocab=1000, batch=2, length=32, images=2,
    perceiver_kwargs={"depth": 1, "heads": 2, "dim_head": 16, "num_latents": 8},
    cross_attn_kwargs={"heads": 2, "dim_head": 16},
)


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


class OthersLoad:
    """CPU cores used by other processes over an interval (from /proc/stat minus this process)."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.perf_counter()
        self.busy0, self.self0 = self._snap()

    def _snap(self):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        t = os.times()
        return user + nice + system + irq + softirq + steal, t.user + t.system

    def cores(self) -> float:
        busy, own = self._snap()
        dt = time.perf_counter() - self.t0
        return max(0.0, ((busy - self.busy0) / self.hz - (own - self.self0)) / dt)


# -- models ------------------------------------------------------------------------------------------
class PhaseMemory:
    """Live heap bytes per phase of a training step, sampled every 2 ms from tcmalloc
    (``generic.current_allocated_bytes``; needs tcmalloc preloaded, as the cases run by default):
    what is allocated, not what the allocator holds, so it shows where the peak is and what it is
    made of. Phases: vision encoder, perceiver, LM, loss (after the LM, the chunked head), backward,
    clip + AdamW step."""

    PHASES = ("vision", "perceiver", "lm", "loss", "backward", "clip+step")

    def __init__(self, trainer, model) -> None:
        import ctypes
        import threading

        try:
            fn = ctypes.CDLL(None).MallocExtension_GetNumericProperty
        except AttributeError as e:
            raise RuntimeError("--memory-phases needs tcmalloc preloaded (--allocator tcmalloc)") from e
        fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
        value = ctypes.c_size_t()

        def allocated() -> int:
            fn(b"generic.current_allocated_bytes", ctypes.byref(value))
            return value.value

        self.allocated, self.phase, self.peaks, self.on = allocated, "start", {}, False
        for module, name in ((model.vision_encoder, "vision"), (model.perceiver, "perceiver"),
                             (model.lang_encoder, "lm")):
            module.register_forward_pre_hook(lambda *a, n=name: self._enter(n))
            module.register_forward_hook(lambda *a, n=name: self._enter("loss" if n == "lm" else "start"))
        forward_loss, clip = trainer._forward_loss, trainer._clip

        def wrapped_forward_loss(*a, **k):
            out = forward_loss(*a, **k)
            self._enter("backward")
            return out

        def wrapped_clip(*a, **k):
            self._enter("clip+step")
            return clip(*a, **k)

        trainer._forward_loss, trainer._clip = wrapped_forward_loss, wrapped_clip
        self.stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _enter(self, phase: str) -> None:
        self._note()
        self.phase = phase

    def _note(self) -> None:
        if self.on:
            b = self.allocated()
            if b > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = b

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self._note()

    def result(self) -> dict:
        self.stop.set()
        return {p: round(self.peaks[p] / 1e9, 3) for p in self.PHASES if p in self.peaks}


def build_lm(s: Shape):
    """The MPT class flamingo-vlm loads every MPT / MosaicGPT checkpoint into (SDPA attention)."""
    from transformers import MptConfig

    from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM

    cfg = MptConfig(d_model=s.lm_dim, n_heads=s.lm_heads, n_layers=s.lm_layers, expansion_ratio=s.expansion_ratio,
                    vocab_size=s.vocab, max_seq_len=2048, use_cache=False)
    lm = MosaicMptForCausalLM(cfg)
    lm.resize_token_embeddings(s.vocab + 3, mean_resizing=False)
    return lm


def build_flamingo(s: Shape):
    from flamingo_vlm.modeling.flamingo import Flamingo
    from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer

    lm = build_lm(s)
    vision = OpenCLIPVisionTransformer(image_size=s.image_size, patch_size=s.patch_size, width=s.vis_width,
                                       layers=s.vis_layers, heads=s.vis_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return Flamingo(vision, lm, eoc_token_id=s.vocab, media_token_id=s.vocab + 1, vis_dim=s.vis_width,
                        cross_attn_every_n_layers=1, pad_token_id=s.vocab + 2,
                        perceiver_kwargs=s.perceiver_kwargs, cross_attn_kwargs=s.cross_attn_kwargs)


class RandomBatches:
    """Interleaved-looking batches: ``<image> text <|endofchunk|>`` x images, all tokens trained."""

    def __init__(self, s: Shape, seed: int = 0):
        import torch

        self.s, self.k, self.torch = s, 0, torch
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"epoch": 0, "batches": self.k}

    def load_state_dict(self, state):
        self.k = state["batches"]

    def __iter__(self):
        torch, s = self.torch, self.s
        while True:
            ids = torch.randint(0, s.vocab, (s.batch, s.length), generator=self.gen)
            chunk = s.length // s.images
            for i in range(s.images):
                if i:
                    ids[:, i * chunk - 1] = s.vocab  # <|endofchunk|>
                ids[:, i * chunk] = s.vocab + 1  # <image>
            labels = ids.masked_fill(ids == s.vocab + 1, -100)
            vision_x = torch.randn(s.batch, s.images, 1, 3, s.image_size, s.image_size, generator=self.gen)
            self.k += 1
            yield {"vision_x": vision_x, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# -- one case (child process) -------------------------------------------------------------------------
def run_case(case: str, s: Shape, steps: int, threads: int | None, phases: bool = False,
             overrides: dict | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_rss = rss_gb()
    if case.startswith("lm-"):
        return run_bare_lm(case, s, steps, base_rss)
    from flamingo_vlm.train import Trainer, TrainConfig

    precision = case.split("+")[0].removesuffix("-default")
    default = case.endswith("-default")
    gc = {"gc": True, "gclm": "lm"}.get(case.partition("+")[2], False)
    model = build_flamingo(s)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict({
            "precision": precision, "max_steps": steps + 1, "checkpoint_every": 10_000, "output_dir": out,
            "schedule": {"warmup_steps": 0}, "progress": False, "export": False, "tensorboard": False,
            "plot": False, "model": {"gradient_checkpointing": gc},
            # what `flamingo-vlm train` does for the model it builds (off by default for models passed in)
            **({"frozen_bf16": True} if precision == "amp_bf16" and not default else {}),
            **({"chunked_loss": False, "cpu_matmul": "default", "malloc_mmap_threshold": None, "glibc_reuse": False,
                "lean_backward": False}
               if default else {}),
            **(overrides or {}),  # --set
        }, require_model=False)
        trainer = Trainer(cfg, model=model, datasets=[RandomBatches(s)], loss_weights=[1.0])
        model_rss = rss_gb()
        load = None
        memory = PhaseMemory(trainer, model) if phases else None
        try:
            times = []
            for i in range(steps + 1):
                batches = trainer.next_batches()
                if i == 1:
                    load = OthersLoad()
                    if memory:
                        memory.on = True  # steady state: the AdamW state exists from the first step on
                t0 = time.perf_counter()
                rec = trainer.train_step(batches)
                if i:
                    times.append(time.perf_counter() - t0)
            others = load.cores() if load else None
        finally:
            trainer.close()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpu = {"gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9} if torch.cuda.is_available() else {}
    if memory:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        gpu["memory_phases_gb"] = memory.result()
        gpu["memory_static_gb"] = {"weights": round(weights / 1e9, 3), "gradients": round(trained / 1e9, 3),
                                   "adamw_state": round(2 * trained / 1e9, 3)}  # fp32 exp_avg + exp_avg_sq
    return _result(case, s, times, base_rss, model_rss, others, loss=rec["loss"], trainable=n_train, **gpu)


def run_bare_lm(case: str, s: Shape, steps: int, base_rss: float) -> dict:
    import torch
    import torch.nn.functional as F

    lm = build_lm(s)
    if case == "lm-bf16":
        lm.to(torch.bfloat16)
    lm.train()
    data = iter(RandomBatches(s))
    model_rss = rss_gb()
    times, load = [], None
    for i in range(steps + 1):
        batch = next(data)
        if i == 1:
            load = OthersLoad()
        t0 = time.perf_counter()
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = torch.cat([batch["labels"][:, 1:], torch.full((s.batch, 1), -100)], dim=1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        lm.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return _result(case, s, times, base_rss, model_rss, load.cores() if load else None, loss=float(loss),
                   trainable=sum(p.numel() for p in lm.parameters()))


def _result(case, s, times, base_rss, model_rss, others, **extra) -> dict:
    med = statistics.median(times)
    return {
        "case": case, "step_s": med, "steps_s": times, "samples_per_s": s.batch / med,
        "tokens_per_s": s.batch * s.length / med, "peak_rss_gb": peak_rss_gb(), "rss_after_build_gb": model_rss,
        "rss_at_start_gb": base_rss, "others_cores": others, **extra,
    }


def distributed_smoke(mode: str) -> int:
    """2 training steps of the quick model through the Trainer with ``distributed: mode`` (run under
    torchrun); prints the losses, fails on a non-finite one."""
    import math

    import torch

    from flamingo_vlm.train import Trainer, TrainConfig

    torch.manual_seed(0)
    model = build_flamingo(QUICK)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict({
            "precision": "amp_bf16" if torch.cuda.is_available() else "fp32", "max_steps": 2, "distributed": mode,
            "checkpoint_every": 10_000, "output_dir": out, "schedule": {"warmup_steps": 0}, "progress": False,
            "export": False, "tensorboard": False, "plot": False}, require_model=False)
        trainer = Trainer(cfg, model=model, datasets=[RandomBatches(QUICK)], loss_weights=[1.0])
        try:
            losses = [trainer.train_step(trainer.next_batches())["loss"] for _ in range(2)]
        finally:
            trainer.close()
    print(f"{mode} smoke on {trainer.info.device} (world size {trainer.info.world_size}): losses {losses}")
    return 0 if all(math.isfinite(x) for x in losses) else 1


# -- profile -----------------------------------------------------------------------------------------
def matmul_gflops(seconds: float = 1.0, dtype=None) -> float:
    """This CPU's GEMM rate (fp32, or ``dtype``) with torch's default kernel at training shape (1024 x 768 x 3072)."""
    import torch

    a, b = torch.randn(1024, 768, dtype=dtype), torch.randn(768, 3072, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 768 * 3072 * n / (time.perf_counter() - t0) / 1e9


_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("GEMM (mm/addmm/linear/oneDNN)", ("aten::mm", "aten::addmm", "aten::linear", "mkldnn::_linear", "aten::matmul")),
    ("attention (bmm/baddbmm/SDPA)", ("bmm", "scaled_dot_product", "_flash_attention", "aten::softmax", "_softmax")),
    ("convolution (patch embedding)", ("conv",)),
    ("optimizer (AdamW)", ("_fused_adamw", "_foreach", "adamw")),
    ("normalisation", ("layer_norm", "native_layer_norm")),
    ("elementwise / activation", ("gelu", "aten::add", "aten::mul", "aten::div", "aten::sub", "where", "masked_fill",
                                  "aten::copy_", "aten::fill_", "aten::zero_", "to_copy", "aten::cat", "aten::pow",
                                  "aten::sum", "aten::mean", "clamp", "aten::exp", "aten::neg", "aten::rsqrt")),
    ("loss (log-softmax / NLL)", ("log_softmax", "nll_loss", "cross_entropy")),
)


def profile_step(s: Shape, threads: int | None, precision: str = "fp32", out_dir: Path | None = None) -> int:
    """One step (``precision``: fp32 or amp_bf16) of the real Trainer under torch.profiler: self CPU
    time per op group, GEMM FLOP/s against the matmul rate measured here (in bf16 for amp_bf16, unless
    this CPU runs bf16 products as fp32 GEMMs: then fp32's), and time outside ops (Python, autograd)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from flamingo_vlm.modeling import kernels
    from flamingo_vlm.train import Trainer, TrainConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    bf16_rate = precision == "amp_bf16" and not kernels.decide("bf16_gemm")  # (else the products run in fp32)
    peak = matmul_gflops(dtype=torch.bfloat16 if bf16_rate else None)
    model = build_flamingo(s)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict({"precision": precision, "max_steps": 10, "checkpoint_every": 10_000,
                                     "output_dir": out, "schedule": {"warmup_steps": 0}, "progress": False,
                                     "export": False, "tensorboard": False, "plot": False}, require_model=False)
        trainer = Trainer(cfg, model=model, datasets=[RandomBatches(s)], loss_weights=[1.0])
        try:
            # Two warm-up steps: the first makes the AdamW state, so the second's forward reaches a new peak
            # and first touches that memory (page faults land in whichever op allocates it: ~0.6 s of
            # copies in a bf16 step); from the third on the heap is warm.
            for _ in range(2):
                trainer.train_step(trainer.next_batches())
            batches = trainer.next_batches()
            load = OthersLoad()
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                t0 = time.perf_counter()
                trainer.train_step(batches)
                wall = time.perf_counter() - t0
            others = load.cores()
        finally:
            trainer.close()
    groups: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        name = ev.key
        group = next((g for g, keys in _GROUPS if any(k in name for k in keys)), "other ops")
        acc = groups.setdefault(group, [0.0, 0.0, 0])
        acc[0] += ev.self_cpu_time_total / 1e6
        acc[1] += ev.flops or 0
        acc[2] += ev.count
    in_ops = sum(v[0] for v in groups.values())
    lines = [f"One {precision} training step, batch {s.batch} x {s.length} tokens x {s.images} images (Trainer defaults), "
             f"{wall:.2f} s wall ({wall - in_ops:.2f} s outside ops: Python, autograd, profiler); "
             f"other processes used {others:.2f} cores.",
             kernels.summary() + ".",
             f"This CPU's {'bf16' if bf16_rate else 'fp32'} matmul rate (1024x768x3072, torch default "
             f"kernel): {peak:.0f} GFLOP/s.", "",
             "| op group | self CPU s | share of step | calls | GFLOP | GFLOP/s | of matmul rate |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for g, (t, flops, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        rate = flops / t / 1e9 if t and flops else 0.0
        lines.append(f"| {g} | {t:.3f} | {t / wall:.0%} | {n} | {flops / 1e9:.1f} | "
                     f"{rate:.0f} | {rate / peak:.0%} |" if flops else
                     f"| {g} | {t:.3f} | {t / wall:.0%} | {n} | — | — | — |")
    lines += ["", "Top ops by self CPU time:", "", "| op | self CPU s | calls |", "|---|---:|---:|"]
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        lines.append(f"| {ev.key} | {ev.self_cpu_time_total / 1e6:.3f} | {ev.count} |")
    total_flops = sum(v[1] for v in groups.values())
    lines += ["", f"GEMM FLOPs counted by the profiler: {total_flops / 1e9:.0f} GFLOP; at the matmul rate they "
              f"would take {total_flops / 1e9 / peak:.2f} s (the step's compute floor for those ops)."
              + (" The profiler counts no FLOPs for oneDNN's linear op (chosen here for training GEMMs): the GEMM "
                 "row's GFLOP/s is low by that share." if kernels.decide("gemm") else "")]
    table = "\n".join(lines)
    print(table)
    out_dir = out_dir or REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ("train-profile.md" if precision == "fp32" else f"train-profile-{precision}.md")).write_text(table + "\n")
    return 0


def saved_census(s: Shape, threads: int | None, precision: str = "fp32", out_dir: Path | None = None) -> int:
    """What one training step (``precision``: fp32 or amp_bf16, Trainer defaults) keeps from forward to
    backward, by module: every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``),
    counted once per storage, parameters aside. The module is the innermost ``nn.Module`` method on the
    Python stack when the tensor is saved, so no module hook is added (hooks turn the lean paths off);
    layer indices are folded into ``N``. This is the activation memory of the step's peak: where it
    comes from, tensor by tensor."""
    import collections
    import re

    import torch

    from flamingo_vlm.train import Trainer, TrainConfig

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_flamingo(s)
    names = {m: n for n, m in model.named_modules()}

    def where() -> str:
        f = sys._getframe(2)
        while f is not None:
            owner = f.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and owner in names:
                return re.sub(r"\.\d+(?=\.|$)", ".N", names[owner] or "(model)")
            f = f.f_back
        return "(outside modules)"

    kept: dict[int, tuple[str, tuple, str, int]] = {}
    alive: list = []
    params: set[int] = set()

    def pack(t):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # (tensors without storage)
            return t
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in kept:
            kept[ptr] = (where(), tuple(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes())
            alive.append(t)  # (a storage freed within forward, the loss's, would free its address for another)
        return t

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict({"precision": precision, "max_steps": 10, "checkpoint_every": 10_000,
                                     "output_dir": out, "schedule": {"warmup_steps": 0}, "progress": False,
                                     "export": False, "tensorboard": False, "plot": False,
                                     **({"frozen_bf16": True} if precision == "amp_bf16" else {})},
                                    require_model=False)
        trainer = Trainer(cfg, model=model, datasets=[RandomBatches(s)], loss_weights=[1.0])
        try:
            trainer.train_step(trainer.next_batches())
            params.update(p.untyped_storage().data_ptr() for p in model.parameters())  # (after any casts)
            batches = trainer.next_batches()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer.train_step(batches)
        finally:
            trainer.close()
    groups: dict[str, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for module, shape, dtype, nbytes in kept.values():
        g = groups[module]
        g[0] += nbytes
        g[1] += 1
        g[2][f"{shape} {dtype}"] += 1
    total = sum(g[0] for g in groups.values())
    lines = [f"What one {precision} training step keeps for backward, batch {s.batch} x {s.length} tokens x "
             f"{s.images} images (Trainer defaults): {total / 1e9:.3f} GB in {len(kept)} tensors (one count per "
             "storage, parameters aside), by the module that saved them.",
             kernel_summary() + ".", "",
             "| module | MB | tensors | most common shapes (count) |", "|---|---:|---:|---|"]
    for module, (nbytes, n, shapes) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        common = ", ".join(f"{k} ({c})" for k, c in shapes.most_common(3))
        lines.append(f"| {module} | {nbytes / 1e6:.1f} | {n} | {common} |")
    lines += ["", "The LM head's tensors are saved and freed inside the chunked loss's forward, which runs the head's "
              "backward chunk by chunk there: they are not kept until the step's backward."]
    table = "\n".join(lines)
    print(table)
    out_dir = out_dir or REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "train-saved" + ("" if precision == "fp32" else f"-{precision}") + ("-quick" if s is QUICK else "")
    (out_dir / f"{name}.md").write_text(table + "\n")
    return 0


def kernel_summary(allocator: str | None = None) -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (the cases train on it; peak GPU memory in the JSON)"
    from flamingo_vlm.modeling import kernels

    return kernels.summary(allocator=allocator)


# -- driver ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    ap.add_argument("--allocator", default="auto", choices=("auto", "tcmalloc", "glibc"),
                    help="memory allocator of the case processes: tcmalloc (LD_PRELOAD) if installed (auto)")
    ap.add_argument("--profile", nargs="?", const="fp32", choices=("fp32", "amp_bf16"),
                    help="instead of the table: where one training step (fp32, or amp_bf16) goes (torch.profiler), "
                         "against this CPU's matmul FLOP/s")
    ap.add_argument("--saved", nargs="?", const="fp32", choices=("fp32", "amp_bf16"),
                    help="instead of the table: what one training step keeps for backward, by module "
                         "(saved-tensor hooks; benchmarks/results/train-saved*.md)")
    ap.add_argument("--distributed-smoke", choices=("ddp", "fsdp"),
                    help="under torchrun: 2 steps of the quick model with DDP or FSDP2 (scripts/gpu_check.sh)")
    ap.add_argument("--memory-phases", action="store_true",
                    help="also report each case's live heap by phase of the step (needs tcmalloc)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                    help="a TrainConfig field for every Flamingo case, value as YAML (repeatable), e.g. "
                         "lean_backward=false: which of the defaults a step's time or memory comes from")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                    help="where the tables go (train-cpu[-glibc][-quick][-set].{md,json}, --profile and --saved tables; "
                         "default benchmarks/results)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import yaml

    overrides = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--set {item!r}: expected KEY=VALUE, e.g. lean_backward=false")
        overrides[key.strip()] = yaml.safe_load(value)
    shape = QUICK if args.quick else Shape()
    if args.distributed_smoke:
        return distributed_smoke(args.distributed_smoke)
    if args.profile:
        return profile_step(shape, args.threads, args.profile, args.out_dir)
    if args.saved:
        return saved_census(shape, args.threads, args.saved, args.out_dir)
    if args.child:
        print("RESULT " + json.dumps(run_case(args.child, shape, args.steps, args.threads, args.memory_phases,
                                              overrides)), flush=True)
        return 0

    import torch

    preload = None
    if args.memory_phases and args.allocator == "glibc":
        ap.error("--memory-phases reads tcmalloc's counters: use --allocator auto or tcmalloc")
    if args.allocator != "glibc":
        from flamingo_vlm.allocator import find_tcmalloc, preload_env  # what the flamingo-vlm command preloads

        preload = find_tcmalloc()
        if preload is None and (args.allocator == "tcmalloc" or args.memory_phases):
            raise SystemExit("tcmalloc not found (apt-get install libtcmalloc-minimal4)")
    allocator = "tcmalloc" if preload else "glibc malloc"
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--steps", str(args.steps)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--memory-phases"] if args.memory_phases and not case.startswith("lm-") else []
        cmd += [f"--set={item}" for item in args.sets]
        print(f"running {case} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("LD_PRELOAD", None)
        if preload:
            env.update(preload_env(preload))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed (exit {proc.returncode})")
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"  {case}: {r['step_s']:.2f} s/step, peak RSS {r['peak_rss_gb']:.2f} GB", file=sys.stderr)

    lines = [
        f"Training step, batch {shape.batch} x {shape.length} tokens x {shape.images} images "
        f"({'quick shapes' if args.quick else 'ViT-B/32 + MPT-125M, xattn every layer'}); "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps after 1 warm-up; allocator: {allocator}"
        + (f"; set for every case: {', '.join(args.sets)}." if args.sets else "."),
        f"{kernel_summary(allocator)}.",
        "",
        "| case | s/step | samples/s | tokens/s | peak RSS (GB) | RSS growth over model build (GB) | vs OpenFlamingo time | vs OpenFlamingo memory | other procs (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        is_flamingo = not r["case"].startswith("lm-") and not args.quick
        speed = f"{OPENFLAMINGO_STEP_S / r['step_s']:.2f}x faster" if is_flamingo else "-"
        mem = f"{r['peak_rss_gb'] / OPENFLAMINGO_PEAK_GB:.0%}" if is_flamingo else "-"
        others = f"{r['others_cores']:.2f}" if r["others_cores"] is not None else "?"
        lines.append(
            f"| {r['case']} | {r['step_s']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] - r['rss_after_build_gb']:.2f} | {speed} | {mem} | {others} |"
        )
    if not args.quick:
        verdicts = []
        for r in results:
            if not r["case"].startswith("fp32") or r["case"].endswith("-default"):
                continue
            ok_t = OPENFLAMINGO_STEP_S / r["step_s"] >= SPEEDUP_TARGET
            ok_m = r["peak_rss_gb"] <= MEMORY_TARGET * OPENFLAMINGO_PEAK_GB
            verdicts.append(f"{r['case']}: time {'met' if ok_t else 'not met'}, memory {'met' if ok_m else 'not met'}")
        if verdicts:
            lines += ["", f"fp32 targets (>= {SPEEDUP_TARGET:.0f}x faster, <= {MEMORY_TARGET:.0%} of the peak memory): "
                      + "; ".join(verdicts) + "."]
    phased = [r for r in results if r.get("memory_phases_gb")]
    if phased:
        lines += ["", "Live heap (tcmalloc's allocated bytes), peak per phase of the timed steps, GB; the static "
                      "part as computed from the parameters:", "",
                  "| case | " + " | ".join(PhaseMemory.PHASES) + " | weights | gradients | AdamW state |",
                  "|---|" + "---:|" * (len(PhaseMemory.PHASES) + 3)]
        for r in phased:
            ph, st = r["memory_phases_gb"], r["memory_static_gb"]
            lines.append(f"| {r['case']} | " + " | ".join(f"{ph[p]:.2f}" if p in ph else "-" for p in PhaseMemory.PHASES)
                         + f" | {st['weights']:.2f} | {st['gradients']:.2f} | {st['adamw_state']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # a quick run, or one with --set, never takes the default table's file name
    stem = f"train-cpu{'-glibc' if not preload else ''}{'-quick' if args.quick else ''}{'-set' if args.sets else ''}"
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"shape": dataclasses.asdict(shape), "platform": platform.platform(), "allocator": allocator,
         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
