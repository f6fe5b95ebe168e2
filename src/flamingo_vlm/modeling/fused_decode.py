"""A gated cross-attention block's decoding step in one native call.

At a decoding step (one token per row, a few rows) the block's four products read ~5.5 M weights,
and the ~40 torch calls around them (two LayerNorms, the head split, SDPA, GELU, gates, sums) cost
as much again in dispatch: on an AMD EPYC Zen 4 (2 threads, benchmark shape, int8 weights) a block
took 289 us, its four products 170 us. :func:`prepare` hands the whole step to
:class:`.native.XattnStep` instead, which computes what the modules compute (the same roundings in
bf16; fp32 within rounding), its products on the C kernels the layers would have used. Whole decode
steps there (``bench_quantize.py --variants bf16,int8,bf16-unfused,int8-unfused --rounds 5``): bf16
17.9 -> 15.4 ms/token, int8 12.7 -> 11.1; the same greedy tokens on the benchmark's prompt.

It is prepared once per block per LM call sequence (``injection.Conditioning``, one ``generate`` or
forward call: the weights, routes and gates do not change within it), and taken only where every
product would have run on our C kernel anyway (``QuantizedLinear`` int8 layers where their probe
chose it; ``nn.Linear`` layers routed by ``onednn_linears`` whose decode probe chose it for this row
count), so a machine where torch's kernels measured faster keeps them; and only for the modules as
they are built here: exact types, exact GELU, no hooks on the block, its modules or globally, the
activations, norms and gates in one dtype, no gradients, not training, not under ``torch.compile``
or tracing. Anything else gets ``None`` and the caller runs the modules. ``FLAMINGO_VLM_FUSED=0``
turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import native
from .cross_attention import GatedCrossAttentionBlock, MaskedCrossAttention
from .fast_linear import _FUNCTORCH_WRAPPED, native_decode_isa
from .kernels import DECODE_ROWS, PLAIN_TYPES
from .quantize import QuantizedLinear

__all__ = ["ENV", "enabled", "prepare"]

ENV = "FLAMINGO_VLM_FUSED"
_FLOATS = (torch.float32, torch.bfloat16)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off") and native.library() is not None


def _wrapped(x: torch.Tensor) -> bool:
    return _FUNCTORCH_WRAPPED is not None and _FUNCTORCH_WRAPPED(x)


def _hooked(modules) -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _product(layer: nn.Module, x: torch.Tensor) -> native.Product | None:
    """``layer`` as our kernel would run it on ``x`` here, or ``None`` where it would not."""
    kind = type(layer)
    if kind is QuantizedLinear:
        if layer.mode != "int8" or "forward" in vars(layer):
            return None
        isa = layer._native_isa(x)  # (the layer's own decision: its probe, its buffers, no tracing)
        b = layer._buffers
        return None if isa is None else native.Product(b["qweight"], b["scales"], b["bias"], isa)
    if kind is nn.Linear:
        isa = native_decode_isa(layer, x.dtype, x.shape[0])
        return None if isa is None else native.Product(layer.weight, None, layer.bias, isa)
    return None


def _norm(norm: nn.Module, dtype: torch.dtype, dim: int) -> native.Norm | None:
    if type(norm) is not nn.LayerNorm or "forward" in vars(norm) or tuple(norm.normalized_shape) != (dim,):
        return None
    w, b = norm.weight, norm.bias
    if any(t is not None and (t.dtype is not dtype or type(t) not in PLAIN_TYPES) for t in (w, b)):
        return None
    return native.Norm(w, b, float(norm.eps))


def prepare(block: GatedCrossAttentionBlock, x: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor]) -> Callable | None:
    """For decoding steps of ``block`` on inputs like ``x`` (rows, 1, D)
    with these tanh ``gates``: ``run(x, keys_values, blind) -> y``, the block's output where its queries
    attend to all of ``keys_values`` (cut to what they see; ``blind``: to nothing), or ``None`` where a
    call's operands do not fit (then, as where this returns ``None``, the caller runs the modules)."""
    attn_gate, ff_gate = gates
    if (block.training or torch.is_grad_enabled() or type(x) not in PLAIN_TYPES or x.dtype not in _FLOATS
            or not x.is_cpu or x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= DECODE_ROWS
            or attn_gate.dtype is not x.dtype or ff_gate.dtype is not x.dtype or not enabled()
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or _wrapped(x)):
        return None
    attn, ff = block.attn, block.ff
    if not (type(block) is GatedCrossAttentionBlock and type(attn) is MaskedCrossAttention and type(ff) is nn.Sequential
            and len(ff) == 4 and type(ff[2]) is nn.GELU and ff[2].approximate == "none"
            and not any("forward" in vars(m) for m in (block, attn, ff, ff[2]))):
        return None
    if _hooked((block, attn, attn.norm, attn.to_q, attn.to_out, ff, *ff)):
        return None
    products = [_product(layer, x) for layer in (attn.to_q, attn.to_out, ff[1], ff[3])]
    norms = [_norm(attn.norm, x.dtype, x.shape[-1]), _norm(ff[0], x.dtype, x.shape[-1])]
    if any(p is None for p in products) or any(n is None for n in norms):
        return None
    try:
        step = native.XattnStep(tuple(products), tuple(norms), heads=attn.heads, dtype=x.dtype)
    except ValueError:  # shapes or layouts the C code does not take
        return None
    ag, fg = float(attn_gate), float(ff_gate)
    nothing = x.new_empty(1, step.heads, 0, step.dim_head)

    def run(x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], blind: bool) -> torch.Tensor | None:
        k, v = (nothing, nothing) if blind else keys_values
        if torch.is_grad_enabled() or not step.fits(x, k, v):
            return None
        return step(x, k, v, ag, fg, blind, check=False)

    return run
