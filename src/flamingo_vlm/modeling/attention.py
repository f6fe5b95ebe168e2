"""Attention on CPU: transformers' SDPA attention, with bf16 decode steps in fp32 and a prompt's later
chunks split at their past.

torch's CPU ``scaled_dot_product_attention`` takes 3-4x longer on one bf16 query than on fp32 copies
of the same tensors (measured on an AMD EPYC Zen 4 with 64-2048 cached keys, casts included). The
attention function registered here as ``"flamingo_sdpa"`` is transformers' ``sdpa_attention_forward``
with that one change: a bf16 call on CPU with at most ``FP32_MAX_QUERIES`` queries and no gradient
wanted runs on fp32 copies and is rounded back to bf16 once. Everything else (prompts, training,
other dtypes and devices) is transformers' call as it was. :func:`use_for` switches an LM that uses
transformers' ``"sdpa"`` to it (``Flamingo`` does so for its LM); masks are built as for ``"sdpa"``.
Our MPT/MosaicGPT (:mod:`.mpt`) does the same inside its own attention.

On a CPU whose bf16 is emulated (the ``bf16_gemm`` choice of :mod:`.kernels`: no AVX512-BF16 or AMX),
torch's bf16 flash-attention *backward* runs 16x slower than in fp32 while its forward keeps pace. A
bf16 training call there (:func:`bf16_backward_in_fp32`) gets its backward in fp32: :func:`sdpa`, which
our MPT, cross-attention and perceiver call, keeps the forward and the bf16 tensors it saves and
computes the backward on fp32 copies; transformers' LMs, whose SDPA call is theirs, run that call on
fp32 copies (forward too, so it keeps fp32 copies for backward), also any such call under bf16
autocast, whatever its inputs' dtypes (a LLaMA's rotary embedding makes its query and key fp32, the
value stays bf16; autocast would run the call in bf16), on their values rounded to bf16; so does a
decoding step under bf16 autocast (evaluation's ``amp_bf16``).

A chunk of queries after a past (a long prompt prefilled in chunks by the server, a prompt whose
demonstrations the prefix cache holds) gets an explicit mask from transformers, and SDPA computes its
whole last block of keys, half of which the mask hides. Where that mask is the plain causal one (no
padding; checked once per mask, which every layer of a call shares) and no gradient is wanted, the
call is split (:func:`past_then_causal`): the queries over the past keys without a mask, over their
own keys causally, the two merged by their log-sum-exp. Quiet AMD EPYC Zen 4, 9 heads of 64, one
row: 2048 queries after 2048 keys 135 -> 103 ms in bf16 (138 -> 98 in fp32), after 6144 keys
281 -> 227 ms; the same values to rounding (the two halves are each rounded to bf16 before merging).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu_bf16_autocast, decide

NAME = "flamingo_sdpa"
FP32_MAX_QUERIES = 8  # decoding steps, speculative checks
_registered = False
_causal_seen: tuple | None = None  # (a weak reference to the last mask checked, whether it was plain causal)


def fp32_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, training: bool) -> bool:
    """A bf16 attention call on CPU (bf16 inputs, or any under bf16 autocast, which runs it in bf16)
    with few queries and no gradient wanted. Callers compute it on fp32 copies with autocast off
    (inputs that are fp32 already, as an int8 layer's output, are not rounded to bf16 first)."""
    return (query.device.type == "cpu" and (query.dtype == torch.bfloat16 or cpu_bf16_autocast())
            and not training and query.shape[-2] <= FP32_MAX_QUERIES
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)))


def bf16_backward_in_fp32(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """A bf16 attention call on CPU (bf16 inputs, or any under bf16 autocast) that wants gradients, on
    a CPU whose bf16 is emulated (the ``bf16_gemm`` choice of :mod:`.kernels`): torch's bf16
    flash-attention backward took 148 ms a call there (the AVX2-only AMD EPYC, the training
    benchmark's 4 x 256 tokens, 12 heads), 16x its fp32 time, while its bf16 forward is as fast as
    fp32's. Such calls get their backward in fp32. (Under autocast: the built-in model's recipe, whose
    LLaMA makes its query and key fp32 through the rotary embedding, spent 5.17 of a 16.8 s step in
    the 37 flash-attention backward calls, 0.92 s in fp32.)"""
    return (query.device.type == "cpu" and (query.dtype == torch.bfloat16 or cpu_bf16_autocast())
            and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            and decide("bf16_gemm"))


class _Fp32Backward(torch.autograd.Function):
    """torch's CPU flash attention, forward as it is, backward on fp32 copies of what the forward
    kept (bf16 query, key, value and output, fp32 log-sum-exp), the gradients rounded back to bf16:
    what the bf16 backward computes, up to its internal rounding, and the same memory kept."""

    @staticmethod
    def forward(ctx, query, key, value, mask, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(query, key, value, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, mask, out, lse = ctx.saved_tensors
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), query.float(), key.float(), value.float(), out.float(), lse, 0.0, ctx.is_causal,
            attn_mask=mask, scale=ctx.scale)
        return (*(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None, None)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; a 4-D call of :func:`bf16_backward_in_fp32` without dropout
    or a mask that wants a gradient runs torch's flash kernel with its backward in fp32
    (:class:`_Fp32Backward`; a bool mask becomes the additive one torch makes of it)."""
    if (query.dtype == torch.bfloat16 and torch.is_grad_enabled()  # (cheapest first: every attention call comes here)
            and dropout_p == 0.0 and query.dim() == 4 and key.dtype == value.dtype == query.dtype
            and (attn_mask is None or not attn_mask.requires_grad)
            and not torch.compiler.is_compiling() and bf16_backward_in_fp32(query, key, value)):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill_(~attn_mask, float("-inf"))
        return _Fp32Backward.apply(query, key, value, attn_mask, is_causal, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale)


def _plain_causal(mask: torch.Tensor, q: int, kv: int) -> bool:
    """``mask`` (rows, 1, q, kv) bool lets every query see all ``kv - q`` earlier keys and its own
    chunk's keys up to itself, and no other: no padding (remembered for the last mask checked)."""
    global _causal_seen
    if _causal_seen is not None and _causal_seen[0]() is mask:
        return _causal_seen[1]
    past = kv - q
    ok = (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and tuple(mask.shape[2:]) == (q, kv)
          and bool(mask[..., :past].all())
          and bool((mask[..., past:] == torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()).all()))
    _causal_seen = (weakref.ref(mask), ok)
    return ok


def _split_applies(module: nn.Module, query, key, value, attention_mask, kwargs) -> bool:
    q, kv = query.shape[-2], key.shape[-2]
    return (query.device.type == "cpu" and not module.training and q > FP32_MAX_QUERIES and kv > q
            and query.dtype in (torch.float32, torch.bfloat16) and key.dtype == value.dtype == query.dtype
            and key.shape[-1] == value.shape[-1] == query.shape[-1]
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            and not kwargs.get("dropout") and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
            and kwargs.get("position_bias") is None and kwargs.get("is_causal") in (None, True)
            and getattr(module, "is_causal", True) and attention_mask is not None
            and _plain_causal(attention_mask, q, kv))


def past_then_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of the last ``q`` of ``kv`` positions (query (B, H, q, D), key/value (B, H, kv, D)):
    the queries over the ``kv - q`` earlier keys (no mask) and over their own (causal), merged by the
    log-sum-exp of each part; (B, H, q, D) in the query's dtype."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    past = key.shape[-2] - query.shape[-2]
    old, old_lse = flash(query, key[..., :past, :], value[..., :past, :], 0.0, False, scale=scale)[:2]
    new, new_lse = flash(query, key[..., past:, :], value[..., past:, :], 0.0, True, scale=scale)[:2]
    top = torch.maximum(old_lse, new_lse)
    w_old, w_new = (old_lse - top).exp_().unsqueeze(-1), (new_lse - top).exp_().unsqueeze(-1)
    return ((old.float() * w_old + new.float() * w_new) / (w_old + w_new)).to(query.dtype)


def flamingo_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _split_applies(module, query, key, value, attention_mask, kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (as the masked call does)
        out = past_then_causal(query, key, value, kwargs.get("scaling"))
        return out.transpose(1, 2).contiguous(), None
    # (bf16 decoding steps, and bf16 training where bf16 is emulated: transformers' own SDPA call on
    # fp32 copies, forward too. Under bf16 autocast the call is a bf16 one whatever its inputs' dtypes,
    # e.g. a LLaMA's fp32 query and key from its rotary embedding: their values are rounded to bf16
    # as autocast would, computed in fp32 with autocast off, bf16 out.)
    if not (fp32_decode(query, key, value, module.training) or bf16_backward_in_fp32(query, key, value)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # (not rounded: bf16 would make fp32's lowest value -inf)
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, *(t.to(torch.bfloat16).float() for t in (query, key, value)),
                                              attention_mask, **kwargs)
    return out.to(torch.bfloat16), weights


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, flamingo_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True


def use_for(lm: nn.Module) -> bool:
    """Switch ``lm`` (a transformers model) from ``"sdpa"`` to :data:`NAME`; returns whether it did."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    config._attn_implementation = NAME
    return True
