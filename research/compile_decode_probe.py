#!/usr/bin/env python
"""Does compiling the decode step take away the work a batch-1 decode step does besides reading weights?

Question (issue 27, the int8 >= 1.5x bf16 target): a decode step of the benchmark shape is the weight
products (our C kernels, at the memory's bandwidth) plus per-layer work in Python and small ops,
which is the same in every precision; int8 halves only the first. Would ``torch.compile`` of the
step (static cache, our kernel as an opaque custom op so the graph keeps it) remove the rest?

Model: a bare LLaMA of the benchmark shape's size (d768 x 12, 2048 MLP, vocab 400, random weights),
bf16, batch 1, a 54-token prompt; every decode-sized linear on our bf16 kernel (``native.bf16_linear``
registered as ``fvprobe::bf16_linear``). Prints ms/token (t(33) - t(1)) / 32, median of 5) for eager
with transformers' dynamic and static caches, ``torch.compile`` (inductor, default) and inductor with
``cpp_wrapper=True`` (its graph wrapper in C++), the compile time of each, the time of the same 84
products alone (the floor of this step on our kernel), and how many of 32 greedy tokens match eager's
(random weights in bf16: fused elementwise ops round differently, and near-ties flip).

Usage (from the repository root; ~3 min on 2 cores)::

    python research/compile_decode_probe.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from flamingo_vlm.modeling import native  # noqa: E402


def main() -> None:
    if native.library() is None:
        raise SystemExit(f"needs our C kernels: {native.unavailable_reason()}")
    isa = native.library().fv_isa()

    @torch.library.custom_op("fvprobe::bf16_linear", mutates_args=())
    def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return native.bf16_linear(x.contiguous(), w, None, isa=isa, check=False)

    @bf16_linear.register_fake
    def _(x, w):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    class Linear(nn.Linear):
        def forward(self, x):
            return bf16_linear(x, self.weight) if x.numel() // x.shape[-1] <= 8 else F.linear(x, self.weight)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                      intermediate_size=2048, vocab_size=400, max_position_embeddings=2048, use_cache=True)
    model = LlamaForCausalLM(cfg).eval().to(torch.bfloat16)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear:
                new = Linear(child.in_features, child.out_features, bias=False, dtype=torch.bfloat16)
                new.weight = child.weight
                setattr(mod, name, new)
    ids = torch.randint(0, 400, (1, 54), generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    xs = {k: torch.randn(1, 1, k).bfloat16() for k in {m.in_features for m in layers}}

    def run(k, **kw):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, **kw)

    def per_token(**kw) -> float:
        run(2, **kw)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            run(1, **kw)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            run(33, **kw)
            times.append((time.perf_counter() - t - t1) / 32 * 1e3)
        return statistics.median(times)

    def kernels_alone() -> float:
        with torch.inference_mode():
            for _ in range(3):
                [native.bf16_linear(xs[m.in_features], m.weight, None, isa=isa, check=False) for m in layers]
            t = time.perf_counter()
            for _ in range(20):
                [native.bf16_linear(xs[m.in_features], m.weight, None, isa=isa, check=False) for m in layers]
        return (time.perf_counter() - t) / 20 * 1e3

    mb = sum(m.weight.numel() for m in layers) * 2 / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(layers)} decode-sized products, {mb:.0f} MB")
    reference = run(32, cache_implementation="static")[0, -32:].tolist()
    rows = [("eager, dynamic cache", per_token(), None, None),
            ("eager, static cache", per_token(cache_implementation="static"), None, None)]
    eager_forward = model.forward
    for label, cpp in (("compiled (inductor)", False), ("compiled (inductor, cpp_wrapper)", True)):
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        inductor_config.cpp_wrapper = cpp
        model.forward = torch.compile(eager_forward)
        t = time.perf_counter()
        tokens = run(32, cache_implementation="static")[0, -32:].tolist()
        compile_s = time.perf_counter() - t
        same = sum(a == b for a, b in zip(tokens, reference))
        rows.append((label, per_token(cache_implementation="static"), compile_s, same))
    floor = kernels_alone()
    print("\n| step | ms/token | outside the products | compile + first call s | greedy tokens = eager's |\n"
          "|---|---:|---:|---:|---|")
    for label, ms, compile_s, same in rows:
        print(f"| {label} | {ms:.2f} | {ms - floor:.2f} | {'' if compile_s is None else f'{compile_s:.0f}'} | "
              f"{'' if same is None else f'{same} of 32'} |")
    print(f"| the products alone | {floor:.2f} | 0 | | |")


if __name__ == "__main__":
    main()
