"""Decoding steps in one native call: a gated cross-attention block's, and an LM MLP's.

At a decoding step (one token per row, a few rows) the block's four products read ~5.5 M weights,
and the ~40 torch calls around them (two LayerNorms, the head split, SDPA, GELU, gates, sums) cost
as much again in dispatch: on an AMD EPYC Zen 4 (2 threads, benchmark shape, int8 weights) a block
took 289 us, its four products 170 us. :func:`prepare` hands the whole step to
:class:`.native.XattnStep` instead, which computes what the modules compute (the same roundings in
bf16; fp32 within rounding), its products on the C kernels the layers would have used. The LM's
MLPs get the same (:func:`fused_mlps`, :class:`.native.MlpStep`). Whole decode steps there, both fused
(``bench_quantize.py --variants bf16,int8,bf16-unfused,int8-unfused --rounds 5``): bf16 18.3 -> 15.4
ms/token, int8 12.2 -> 10.1; the built-in model 25.4 -> 24.5 and 20.5 -> 17.9; the same greedy tokens.

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

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import native
from .cross_attention import GatedCrossAttentionBlock, MaskedCrossAttention
from .fast_linear import native_decode_isa, outside_tracing
from .kernels import DECODE_ROWS, PLAIN_TYPES
from .quantize import QuantizedLinear

__all__ = ["ENV", "enabled", "fused_mlps", "mlp_kind", "prepare"]

ENV = native.FUSED_ENV


def enabled() -> bool:
    """``FLAMINGO_VLM_FUSED`` is not ``0`` and our C library loads."""
    return native.fused_allowed() and native.library() is not None


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
    if (block.training or torch.is_grad_enabled() or type(x) not in PLAIN_TYPES or x.dtype not in native.FLOAT_DTYPES
            or not x.is_cpu or x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= DECODE_ROWS
            or attn_gate.dtype is not x.dtype or ff_gate.dtype is not x.dtype or not enabled()
            or not outside_tracing(x)):
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


# -- the LM's MLPs ------------------------------------------------------------------------------------
# transformers' MLP classes whose forward is one of the two MlpStep computes, by (module, class name):
# MPT: down(GELU(up(x))) + residual (forward(hidden_states, residual)); LLaMA: down(act(gate(x)) * up(x)).
_MLPS = {("transformers.models.mpt.modeling_mpt", "MptMLP"): "mpt",
         ("transformers.models.llama.modeling_llama", "LlamaMLP"): "llama"}


def _is_silu(act: nn.Module) -> bool:
    kind = type(act)
    return "forward" not in vars(act) and (kind is nn.SiLU or (
        kind.__module__ == "transformers.activations" and kind.__name__ == "SiLUActivation"
        and kind.forward.__qualname__ == "SiLUActivation.forward"))


def mlp_kind(module: nn.Module) -> str | None:
    """``"mpt"`` / ``"llama"`` for the transformers MLPs :class:`.native.MlpStep` computes (exact GELU;
    SiLU), else ``None``."""
    kind = _MLPS.get((type(module).__module__, type(module).__name__))
    if kind == "mpt":
        act = getattr(module, "act", None)
        ok = type(act) is nn.GELU and act.approximate == "none" and "forward" not in vars(act)
    elif kind == "llama":
        ok = _is_silu(getattr(module, "act_fn", None))
    else:
        return None
    return kind if ok else None


def _prepare_mlp(mlp: nn.Module, kind: str, x: torch.Tensor) -> native.MlpStep | None:
    if mlp.training or _hooked((mlp, *mlp.children())):
        return None
    names = ("up_proj", "down_proj", "gate_proj") if kind == "llama" else ("up_proj", "down_proj")
    products = [_product(getattr(mlp, n), x) for n in names]
    if any(p is None for p in products):
        return None
    try:
        return native.MlpStep(*products, act="silu" if kind == "llama" else "gelu", dtype=x.dtype)
    except ValueError:
        return None


def _fused_mlp_forward(mlp: nn.Module, kind: str):
    stock = type(mlp).forward
    steps: dict = {}  # (module, dtype, rows) -> MlpStep or None, for the length of the block

    def forward(self, x: torch.Tensor, *args, **kwargs):
        # MPT's forward(hidden_states, residual), LLaMA's forward(x): anything else runs the module's own
        residual = (args[0] if args else kwargs.get("residual")) if kind == "mpt" else None
        expected = (len(args) == 1 and not kwargs) or (not args and list(kwargs) == ["residual"]) if kind == "mpt" \
            else not (args or kwargs)
        if (expected and (kind != "mpt" or type(residual) in PLAIN_TYPES) and type(x) in PLAIN_TYPES
                and x.dtype in native.FLOAT_DTYPES and x.is_cpu and x.is_contiguous() and x.dim() >= 2
                and 0 < x.numel() // max(x.shape[-1], 1) <= DECODE_ROWS and not torch.is_grad_enabled()
                and outside_tracing(x)):
            rows = x.numel() // x.shape[-1]
            key = (id(self), x.dtype, rows)  # (a deep copy of the module inside the block is bound to itself)
            if key not in steps:
                steps[key] = _prepare_mlp(self, kind, x.reshape(rows, 1, -1))
            step = steps[key]
            if step is not None and step.fits(x, residual):
                return step(x, residual, check=False)
        return stock(self, x, *args, **kwargs)

    return forward


@contextlib.contextmanager
def fused_mlps(module: nn.Module) -> Iterator[int]:
    """Inside the block, the LM MLPs of ``module`` that :func:`mlp_kind` knows run their decode-sized
    calls without gradients (at most ``DECODE_ROWS`` rows) as one native call each (:class:`.native.MlpStep`),
    where each of their products would have run on our C kernel (as for the cross-attention steps:
    module docstring); yields how many MLPs it patched. Nothing changes where gradients are enabled
    at entry or ``FLAMINGO_VLM_FUSED=0``. Restored on exit, also when the block raises."""
    on = enabled() and not torch.is_grad_enabled()
    mlps = [(m, k) for m in module.modules() if "forward" not in vars(m) and (k := mlp_kind(m))] if on else []
    try:
        for m, kind in mlps:
            m.forward = _fused_mlp_forward(m, kind).__get__(m)
        yield len(mlps)
    finally:
        for m, _ in mlps:
            vars(m).pop("forward", None)
