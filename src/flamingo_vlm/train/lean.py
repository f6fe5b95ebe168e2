"""Less memory for backward in the trained layers, with the same forward and the same gradients.

What a training step keeps from forward to backward is its peak memory. In the trained layers (the
perceiver and the gated cross-attention blocks) the usual autograd graph keeps tensors that are
either recomputed in microseconds or already kept by another node:

* a LayerNorm's output, kept by the linear layer after it (as its input), while the LayerNorm keeps
  its own input: the linear here keeps the LayerNorm's input (shared) and recomputes the
  normalisation in backward (one pass over tokens x dim);
* a GELU's output, kept by the linear layer after it, while the GELU keeps its input: recomputed;
* a gated branch's output ``y`` (``y * tanh(gate)``), kept for the gate's gradient: the gate is
  folded into the branch's last product instead. With ``y = a W^T + b`` and ``g`` the gradient at
  the output, ``dL/dgate = sum(g * y) = sum((g W) * a) + sum(g) . b``, and ``g W`` is computed
  anyway for ``dL/da = gate * (g W)``: no extra product, and ``y`` is not kept;
* under bf16 autocast, the bf16 copy of every trained weight (autocast keeps the cast it
  computed with for backward): the fp32 parameter is kept instead (held anyway) and cast again in
  backward (~4 bytes read per trained weight, ~10 ms for the benchmark model);
* the cross-attention's images under autocast: each of the LM's blocks keeps its own bf16 copy of the
  same perceiver output for its key/value product; the fp32 tensor, shared, is kept instead.
* in a SiLU-gated MLP (transformers' ``LlamaMLP``: ``down(silu(gate(x)) * up(x))``, frozen in the LM
  of a LLaMA-based Flamingo, the built-in model's included), ``silu(gate(x))``, kept by the product
  with ``up(x)`` while the SiLU keeps its input: recomputed (:class:`SiluMul`). The frozen
  projections keep nothing, so the MLP keeps two of its hidden-sized tensors instead of three: on a
  SmolLM2-135M-shaped LM (30 layers, MLP width 1536) with the benchmark's 4 x 256 tokens, 0.19 GB of the
  1.77 GB an fp32 step kept.

The forward is computed as the stock modules compute it (under autocast: the same casts in the
same order), so losses are bitwise equal, and so are the weight gradients of ungated products.
Elsewhere gradients are equal up to rounding: with a gate, the product's input gets
``gate * (g W)`` instead of ``(gate * g) W``, and ``dL/dgate`` sums ``(g W) * a`` instead of
``g * y`` (under autocast each rounds a bf16 product at another point; on random data of the
benchmark's shapes both land within the same ~1e-3 of the exact value).
``bench_train.py`` (ViT-B/32 + MPT-125M, 4 x 256 tokens x 3 images, AMD EPYC Zen 4, interleaved
runs): peak RSS 3.43 -> 3.11 GB under amp_bf16 and 3.89 -> 3.71 GB in fp32, step times unchanged
within the run-to-run spread (amp_bf16 4.35 / 4.27 -> 4.10 / 4.42 s, fp32 8.30 / 7.98 -> 8.18 /
7.89 s).

:func:`make_lean` patches ``forward`` of a model's feed-forwards, cross-attention blocks, SiLU-gated
MLPs and (under autocast) trained linear layers; the patched forwards take the lean path only while
gradients are recorded and fall back to the stock forward otherwise (evaluation, generation).
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.cross_attention import GatedCrossAttentionBlock, cut_keys_values
from ..modeling.fast_linear import linear, outside_tracing
from ..modeling.fused_decode import mlp_kind
from ..modeling.kernels import PLAIN_TYPES
from ..modeling.perceiver import merge_heads, split_heads


class Prologue(NamedTuple):
    """What happens to the input before the product: nothing, a LayerNorm (``eps``), or a GELU."""

    kind: str = "none"  # "none" | "norm" | "gelu"
    eps: float = 1e-5
    keep_input: bool = False  # "none" under autocast: keep the input as given (shared) instead of its cast


NONE, GELU, KEEP = Prologue(), Prologue("gelu"), Prologue(keep_input=True)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _prologue(pro: Prologue, x, norm_weight, norm_bias):
    """(h, mean, rstd): the product's input before its cast, and the LayerNorm's statistics."""
    if pro.kind == "norm":
        return torch.native_layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, pro.eps)
    if pro.kind == "gelu":
        return F.gelu(x), None, None
    return x, None, None


class LeanLinear(torch.autograd.Function):
    """``[gate *] [row_scale *] linear(prologue(x), weight, bias)``, keeping for backward only ``x``
    (or, for a plain input under autocast, its cast), the parameters, and a LayerNorm's statistics.

    ``compute_dtype``: autocast's dtype where it is on (the products and the prologue's output in it,
    as autocast runs them), else ``x``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, row_scale, norm_weight, norm_bias, pro: Prologue, compute_dtype):
        cdt = compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            h, mean, rstd = _prologue(pro, x, norm_weight, norm_bias)
            hc = h.to(cdt)
            y = linear(hc, weight.to(cdt), None if bias is None else bias.to(cdt))
            if row_scale is not None:
                y = y * row_scale.to(y.dtype)
            out = y * gate if gate is not None else y
        keep = hc if pro.kind == "none" and not pro.keep_input else x
        ctx.save_for_backward(keep, weight, bias, gate, row_scale, norm_weight, norm_bias, mean, rstd)
        ctx.pro, ctx.cdt, ctx.x_dtype = pro, cdt, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        keep, weight, bias, gate, row_scale, norm_weight, norm_bias, mean, rstd = ctx.saved_tensors
        with torch.autocast(keep.device.type, enabled=False):
            return LeanLinear._backward(ctx, grad, keep, weight, bias, gate, row_scale, norm_weight, norm_bias,
                                        mean, rstd)

    @staticmethod
    def _backward(ctx, grad, keep, weight, bias, gate, row_scale, norm_weight, norm_bias, mean, rstd):
        pro, cdt = ctx.pro, ctx.cdt
        need = ctx.needs_input_grad
        hc = _prologue(pro, keep, norm_weight, norm_bias)[0].to(cdt)  # recomputed (a LayerNorm: same values)
        hc2 = hc.reshape(-1, hc.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        if row_scale is not None:
            g2 = g2 * row_scale.reshape(-1, 1).to(g2.dtype)
        wc = weight.to(cdt)
        # the gradient at y (the product's output), in the product's dtype
        gy = (g2 * gate if gate is not None else g2).to(cdt)
        gx = gw = gb = ggate = gnw = gnb = None
        if need[1]:
            gw = linear(gy.t(), hc2.t()).to(weight.dtype)  # dL/dW = gy^T h, as the stock backward computes it
        if bias is not None and need[2]:
            gb = gy.float().sum(0).to(bias.dtype)
        if need[0] or need[5] or need[6] or (gate is not None and need[3]):
            if gate is None:
                gh = linear(gy, wc.t())  # dL/dh = gy W
            else:
                # dL/dh = gate * (g W); dL/dgate = sum(g * y) = sum((g W) * h) + sum(g) . b, without y
                gu = linear(g2.to(cdt), wc.t())
                if need[3]:
                    ggate = (gu.float() * hc2.float()).sum()
                    if bias is not None:
                        ggate = ggate + (g2.float().sum(0) * bias.to(cdt).float()).sum()
                    ggate = ggate.reshape(gate.shape).to(gate.dtype)
                gh = gu * gate
            gh = gh.view(hc.shape)
            if pro.kind == "norm":
                mask = [need[0], norm_weight is not None and need[5], norm_bias is not None and need[6]]
                gx, gnw, gnb = torch.ops.aten.native_layer_norm_backward(
                    gh.to(keep.dtype), keep, (keep.shape[-1],), mean, rstd, norm_weight, norm_bias, mask)
            elif pro.kind == "gelu":
                gx = torch.ops.aten.gelu_backward(gh.to(keep.dtype), keep)
            else:
                gx = gh
            gx = gx.to(ctx.x_dtype) if gx is not None and need[0] else None
        return gx, gw, gb, ggate, None, gnw, gnb, None, None


def lean_linear(x: torch.Tensor, layer: nn.Linear, *, norm: nn.LayerNorm | None = None, gelu: bool = False,
                gate: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                keep_input: bool = False) -> torch.Tensor:
    """``layer(prologue(x))`` (times ``row_scale`` and ``gate`` if given) through :class:`LeanLinear`."""
    if norm is not None:
        pro = Prologue("norm", norm.eps)
        nw, nb = norm.weight, norm.bias
    else:
        pro = GELU if gelu else KEEP if keep_input else NONE
        nw = nb = None
    return LeanLinear.apply(x, layer.weight, layer.bias, gate, row_scale, nw, nb, pro, _compute_dtype(x))


# -- which calls take the lean path ------------------------------------------------------------------
def _plain(*ts) -> bool:
    return all(t is None or type(t) in PLAIN_TYPES for t in ts)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _lean_ok(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Gradients recorded, plain tensors, operands the product can take as the stock forward would
    (autocast on, or the input in the weights' dtype), and no hooks on the modules whose calls the
    lean path replaces (e.g. the aiming loss's pre-hook on the cross-attention)."""
    if not torch.is_grad_enabled() or not _plain(x):
        return False
    autocast = torch.is_autocast_enabled(x.device.type)
    for layer in layers:
        if _hooked(layer):
            return False
        for p in layer.parameters(recurse=False):
            if not _plain(p) or (not autocast and p.dtype != x.dtype) or (autocast and p.dtype != torch.float32):
                return False
    return True


def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm -> Linear -> GELU -> Linear keeping ``x`` and the GELU's input only."""
    norm, up, down = self[0], self[1], self[3]
    if not _lean_ok(x, norm, up, self[2], down):
        return nn.Sequential.forward(self, x)
    return lean_linear(lean_linear(x, up, norm=norm), down, gelu=True)


def _block(self, x, keys_values, media, num_media=None, gates=None):
    """:class:`GatedCrossAttentionBlock`'s forward for training: the LayerNorm outputs recomputed and
    the tanh gates folded into the branches' last products. Same computation as the stock forward
    (which runs wherever this one does not apply: no gradients, or a plan that is not a mask)."""
    attn, ff = self.attn, self.ff
    media_plan = media if not isinstance(media, torch.Tensor) else None
    if (media_plan is None or media_plan.blind or media_plan.span is not None
            or not _lean_ok(x, attn, attn.norm, attn.to_q, attn.to_out, ff, ff[0], ff[1], ff[2], ff[3])):
        return GatedCrossAttentionBlock.forward(self, x, keys_values, media, num_media, gates)
    attn_gate, ff_gate = gates if gates is not None else self.gates()
    (k, v), plan = cut_keys_values(keys_values, media_plan)
    q = lean_linear(x, attn.to_q, norm=attn.norm)
    q = split_heads(q, attn.heads)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = merge_heads(attn._attend(q, k, v, plan.mask))
    x = lean_linear(out, attn.to_out, gate=attn_gate, row_scale=plan.has_media) + x
    return lean_linear(lean_linear(x, ff[1], norm=ff[0]), ff[3], gelu=True, gate=ff_gate) + x


def _trained_linear(self, x: torch.Tensor) -> torch.Tensor:
    """A trained ``nn.Linear`` under autocast: keeps its fp32 weight, not a bf16 copy. Elsewhere (no
    gradients: the trainer's one-off loss check, evaluation during training; or a call the lean path
    does not take: hooks, tensor subclasses) :func:`linear`, as a routing block would run the layer
    (its bf16 products as fp32 GEMMs where bf16 is emulated, with gradients too). The stock
    ``nn.Linear.forward`` took torch's emulated bf16 GEMM there: the loss check alone made the first
    amp_bf16 step ~45 s instead of ~18 on the AVX2-only EPYC."""
    if not (torch.is_autocast_enabled(x.device.type) and _lean_ok(x, self)):
        return linear(x, self.weight, self.bias)
    return lean_linear(x, self, keep_input=getattr(self, "_lean_keep_input", False))


class SiluMul(torch.autograd.Function):
    """``silu(g) * u``, keeping ``g`` and ``u`` for backward (autograd keeps ``silu(g)`` as well) and
    recomputing ``silu(g)`` there: the same operations as autograd's backward of the two, so the same
    gradients, bit for bit."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # a backward that is itself differentiated (create_graph): silu's
            s = torch.sigmoid(g)     # derivative in differentiable ops (aten's silu_backward has none)
            grad_g = grad * u * (s * (1 + g * (1 - s))) if ctx.needs_input_grad[0] else None
        else:
            grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


def _gated_mlp(self, x: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP.forward`` keeping ``silu(gate(x))`` out of the graph; its three products are called
    as modules (their hooks, LoRA wrappers and routes as usual)."""
    if not torch.is_grad_enabled() or _hooked(self.act_fn) or not outside_tracing(x):  # (torch.func, compile)
        return type(self).forward(self, x)
    g, u = self.gate_proj(x), self.up_proj(x)
    if not (_plain(g, u) and g.dtype == u.dtype and g.shape == u.shape):
        return self.down_proj(self.act_fn(g) * u)
    return self.down_proj(SiluMul.apply(g, u))


_gated_mlp.stock_without_grad = True  # (read by fused_decode.fused_lm: decoding may replace it for its block)


def _is_feed_forward(m: nn.Module) -> bool:
    return (type(m) is nn.Sequential and len(m) == 4 and type(m[0]) is nn.LayerNorm and type(m[1]) is nn.Linear
            and type(m[2]) is nn.GELU and m[2].approximate == "none" and type(m[3]) is nn.Linear)


def _is_plain_block(m: nn.Module) -> bool:
    a = m.attn
    return (type(a.norm) is nn.LayerNorm and type(a.to_q) is nn.Linear and type(a.to_out) is nn.Linear
            and _is_feed_forward(m.ff))


def make_lean(model: nn.Module, autocast: bool) -> dict[str, int]:
    """Patch ``forward`` of ``model``'s feed-forwards (LayerNorm, Linear, GELU, Linear), gated
    cross-attention blocks, SiLU-gated MLPs (:class:`SiluMul`), and, with ``autocast`` (bf16 autocast
    training), its trained plain ``nn.Linear`` layers. Parameters and forward results are unchanged;
    modules that are not plain (LoRA-wrapped layers, subclasses) keep their forward. Returns how many
    of each were patched."""
    counts = {"feed_forward": 0, "cross_attention": 0, "gated_mlp": 0, "linear": 0}
    for m in list(model.modules()):
        if "forward" in vars(m):
            continue
        if mlp_kind(m) == "llama":
            m.forward = types.MethodType(_gated_mlp, m)
            counts["gated_mlp"] += 1
        elif _is_feed_forward(m):
            m.forward = types.MethodType(_feed_forward, m)
            counts["feed_forward"] += 1
        elif type(m) is GatedCrossAttentionBlock and _is_plain_block(m):
            m.forward = types.MethodType(_block, m)
            counts["cross_attention"] += 1
    if autocast:
        for m in model.modules():
            if isinstance(m, GatedCrossAttentionBlock) and type(m.attn.to_kv) is nn.Linear:
                m.attn.to_kv._lean_keep_input = True  # the same perceiver output for every block: keep it once
        for m in model.modules():
            if type(m) is nn.Linear and "forward" not in vars(m) and m.weight.requires_grad:
                m.forward = types.MethodType(_trained_linear, m)
                counts["linear"] += 1
    return counts
