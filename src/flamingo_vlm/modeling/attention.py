"""Attention for bf16 decoding on CPU: transformers' SDPA attention, run in fp32 for decode steps.

torch's CPU ``scaled_dot_product_attention`` takes 3-4x longer on one bf16 query than on fp32 copies
of the same tensors (measured on an AMD EPYC Zen 4 with 64-2048 cached keys, casts included). The
attention function registered here as ``"flamingo_sdpa"`` is transformers' ``sdpa_attention_forward``
with that one change: a bf16 call on CPU with at most ``FP32_MAX_QUERIES`` queries and no gradient
wanted runs on fp32 copies and is rounded back to bf16 once. Everything else (prompts, training,
other dtypes and devices) is transformers' call as it was. :func:`use_for` switches an LM that uses
transformers' ``"sdpa"`` to it (``Flamingo`` does so for its LM); masks are built as for ``"sdpa"``.
Our MPT/MosaicGPT (:mod:`.mpt`) does the same inside its own attention.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "flamingo_sdpa"
FP32_MAX_QUERIES = 8  # decoding steps, speculative checks
_registered = False


def fp32_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, training: bool) -> bool:
    """A bf16 attention call on CPU with few queries and no gradient wanted."""
    return (query.dtype == torch.bfloat16 and query.device.type == "cpu" and not training
            and query.shape[-2] <= FP32_MAX_QUERIES
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)))


def flamingo_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not fp32_decode(query, key, value, module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


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
