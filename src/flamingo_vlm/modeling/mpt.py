"""MPT / MosaicGPT that computes what MosaicML's own code computes.

transformers' ``MptForCausalLM`` reads ``attn_config.qk_ln`` but never applies it, hard-codes the
ALiBi ``alibi_bias_max`` to 8, never reads ``logit_scale``, ``no_bias=False`` or ``expansion_ratio``
(its MLP is always 4x, without biases). :class:`MosaicMptForCausalLM` is that model with those
settings honoured, so the MosaicGPT checkpoints behind OpenFlamingo-3B (QK-LayerNorm) and any MPT
load exactly. Module and state-dict names are transformers' MPT names (``attn.q_ln``/``attn.k_ln``
as in MosaicML's code), so the decoder blocks are still ``transformer.blocks`` and cross-attention
injection, the KV cache and ``generate`` work unchanged.

The attention (MosaicGPT ``MultiheadAttention``, ``attn_impl: torch``), per decoder block:

    qkv = Wqkv(x); qkv = clamp(qkv, -clip_qkv, clip_qkv) if clip_qkv
    q, k, v = split(qkv)                       # each d_model wide
    q, k = q_ln(q), k_ln(k) if qk_ln           # LayerNorm over all of d_model, before the head split
    softmax(q_h k_h^T * softmax_scale + alibi_h + mask) v_h   # softmax_scale defaults to 1/sqrt(head_dim)

ALiBi: head ``h`` adds ``slope_h * (j - i)`` to the score of query ``i`` and key ``j <= i``. MosaicML
builds ``slope_h * (j - (L - 1))`` for a buffer of length L; the two differ by a constant per query
row, which softmax ignores, so the results are the same in exact arithmetic. Ours is built in fp32
once per forward from the positions (never larger than the distance) and stays accurate in bf16,
where MosaicGPT, which builds its buffer in the model dtype, rounds it early in long sequences. The slopes:

- ``"mpt"`` (MPT / llm-foundry ``gen_slopes``, also transformers): ``2^(-m*k/n)`` for
  ``k = 1..n``, with ``n`` = ``n_heads`` rounded up to a power of two, and when ``n_heads`` is not a
  power of two, the odd-indexed then the even-indexed slopes, the first ``n_heads`` of them;
- ``"mosaic_gpt"`` (the MosaicGPT code shipped with mpt-1b-redpajama-200b, before MosaicML's
  "HF/FT-compatible ALiBi" change): ``2^(-m*k/n_heads)`` for ``k = 1..n_heads``.

Both are ``m = alibi_bias_max``, and they agree whenever ``n_heads`` is a power of two (16 for mpt-1b).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with that bias as the
mask. A bf16 model on CPU runs its decode steps' attention (<= ``attention.FP32_MAX_QUERIES`` queries,
no gradient) on fp32 copies of the queries, keys and values, rounded back to bf16: torch's CPU SDPA
took 3-4x longer on one bf16 query than on fp32 ones (300-2000 cached keys, AMD EPYC Zen 4), more
than the casts cost; a decode step with 512 / 1500 tokens of context 10% / 16% faster (bare MPT
d768 x 12), logits as close to the fp32 model's as before. ``logit_scale`` (a number or ``"inv_sqrt_d_model"``) multiplies the logits before the loss.
Dropout: ``attn_pdrop`` on the attention weights and ``resid_pdrop`` on both residual branches, in
training mode only (transformers used ``attn_pdrop`` for all three). Attention weights are not
returned (``output_attentions`` gives None per layer): SDPA does not produce them.

Which settings are honoured, irrelevant or refused when loading: ``docs/lm-config-audit.md``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers import MptConfig, MptForCausalLM
from transformers.models.mpt.modeling_mpt import MptModel, MptPreTrainedModel

from .attention import fp32_decode, sdpa

ALIBI_SLOPE_SCHEMES = ("mpt", "mosaic_gpt")


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, scheme: str = "mpt", device=None) -> torch.Tensor:
    """ALiBi slope of each head, fp32, shape ``(n_heads,)`` (see the module docstring)."""
    if scheme == "mosaic_gpt":
        k = torch.arange(1, n_heads + 1, dtype=torch.float32, device=device)
        return torch.pow(2.0, -k * (alibi_bias_max / n_heads))
    if scheme != "mpt":
        raise ValueError(f"alibi_slopes scheme must be one of {ALIBI_SLOPE_SCHEMES}, got {scheme!r}")
    padded = 2 ** math.ceil(math.log2(n_heads))
    k = torch.arange(1, padded + 1, dtype=torch.float32, device=device)
    slopes = torch.pow(2.0, -k * (alibi_bias_max / padded))
    if padded != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def logit_scale_value(config) -> float | None:
    """``config.logit_scale`` as a number (``"inv_sqrt_d_model"`` is ``1/sqrt(d_model)``), or None."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        return None
    if isinstance(scale, str):
        if scale != "inv_sqrt_d_model":
            raise ValueError(f"logit_scale={scale!r} is not a number or 'inv_sqrt_d_model'")
        return 1 / math.sqrt(config.d_model)
    return float(scale)


class AlibiBias:
    """The additive attention bias of one forward pass: ALiBi plus the causal/padding mask.

    Built on first use and shared by every block (they all get the same mask), so a forward pass
    computes it once. ``mask`` is what transformers' MPT hands its blocks: bool, True = masked,
    ``(batch, 1, query_len, key_len)``.
    """

    def __init__(self, slopes: torch.Tensor, max_seq_len: int):
        self.slopes = slopes
        self.max_seq_len = max_seq_len
        self._cached: tuple | None = None
        self._last_row: torch.Tensor | None = None

    def last_row(self, k_len: int) -> torch.Tensor | None:
        """fp32 ``(heads, 1, k_len)``: the bias of the last of ``k_len`` positions over all of them, mask
        aside (the values :meth:`__call__` gives that row in fp32), for the fused decoding steps
        (``fused_decode``): built once per forward, shared by the blocks. ``None`` past ``max_seq_len``
        (where :meth:`__call__` raises)."""
        if not 0 < k_len <= self.max_seq_len:
            return None
        row = self._last_row
        if row is None or row.shape[-1] != k_len:
            distance = torch.arange(1 - k_len, 1, dtype=torch.float32, device=self.slopes.device)  # j - i
            row = self._last_row = self.slopes.view(-1, 1, 1) * distance
        return row

    def __call__(self, mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        key = (id(mask), q_len, k_len, dtype, device)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        if k_len > self.max_seq_len:
            raise ValueError(
                f"the sequence is {k_len} tokens long (with the cache) but this MPT/MosaicGPT model has "
                f"max_seq_len={self.max_seq_len}; shorten the prompt or max_new_tokens"
            )
        keys = torch.arange(k_len, device=device, dtype=torch.float32)
        distance = keys.view(1, -1) - keys[k_len - q_len:].view(-1, 1)  # j - i, (q, k)
        if mask is None:  # causal only
            mask = (distance > 0).view(1, 1, q_len, k_len)
        slopes = self.slopes.to(device).view(1, -1, 1, 1)
        bias = (slopes * distance.clamp(max=0)).to(dtype)  # (1, H, q, k)
        bias = bias.masked_fill(mask.to(device), torch.finfo(dtype).min)  # (batch, H, q, k)
        self._cached = (key, bias)
        return bias


class MosaicMptAttention(nn.Module):
    """MosaicGPT/MPT multi-head attention (see the module docstring); takes the place of
    transformers' ``MptAttention`` and is called the same way by ``MptBlock``."""

    def __init__(self, config: MptConfig, layer_idx: int | None = None):
        super().__init__()
        attn = config.attn_config
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = self.d_model // self.n_heads
        self.softmax_scale = attn.softmax_scale if attn.softmax_scale is not None else 1 / math.sqrt(self.head_dim)
        self.clip_qkv = attn.clip_qkv
        self.attn_dropout_p = attn.attn_pdrop
        self.layer_idx = layer_idx
        bias = not config.no_bias
        self.Wqkv = nn.Linear(self.d_model, 3 * self.d_model, bias=bias)
        self.qk_ln = bool(attn.qk_ln)
        if self.qk_ln:
            self.q_ln = nn.LayerNorm(self.d_model, eps=config.layer_norm_epsilon, bias=bias)
            self.k_ln = nn.LayerNorm(self.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.out_proj = nn.Linear(self.d_model, self.d_model, bias=bias)

    def forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, past_key_values=None,
                **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, q_len = hidden_states.shape[:2]
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=-1)
        if self.qk_ln:
            query = self.q_ln(query).to(value.dtype)
            key = self.k_ln(key).to(value.dtype)
        shape = (batch, q_len, self.n_heads, self.head_dim)
        query = query.reshape(shape).transpose(1, 2)
        key = key.reshape(shape).transpose(1, 2)
        value = value.reshape(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if not isinstance(position_bias, AlibiBias):
            raise TypeError("MosaicMptAttention must run inside MosaicMptModel (it builds the ALiBi bias)")
        dtype = query.dtype
        in_fp32 = fp32_decode(query, key, value, self.training)
        if in_fp32:
            # torch's CPU SDPA is 3-4x slower on one bf16 query than on fp32 ones (decode, 300-2000
            # cached keys, AMD EPYC Zen 4), more than the casts cost: the product runs in fp32
            query, key, value = query.float(), key.float(), value.float()
        bias = position_bias(attention_mask, q_len, key.shape[-2], query.dtype, query.device)
        # (under bf16 autocast SDPA would take the fp32 copies back to bf16)
        with torch.autocast("cpu", enabled=False) if in_fp32 else contextlib.nullcontext():
            context = sdpa(
                query, key, value, attn_mask=bias, scale=self.softmax_scale,
                dropout_p=self.attn_dropout_p if self.training else 0.0,
            ).to(dtype)
        context = context.transpose(1, 2).reshape(batch, q_len, self.d_model)
        return self.out_proj(context), None


def _check_supported(config: MptConfig) -> None:
    attn = config.attn_config
    if not attn.alibi:
        raise ValueError("MPT with attn_config.alibi=false (learned or no positions) is not supported; "
                         "only ALiBi models are")
    scheme = getattr(config, "alibi_slopes", "mpt")
    if scheme not in ALIBI_SLOPE_SCHEMES:
        raise ValueError(f"config.alibi_slopes must be one of {ALIBI_SLOPE_SCHEMES}, got {scheme!r}")
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model={config.d_model} is not divisible by n_heads={config.n_heads}")
    logit_scale_value(config)


class MosaicMptModel(MptModel):
    """transformers' ``MptModel`` with :class:`MosaicMptAttention`, biases when ``no_bias`` is
    false, an MLP of ``expansion_ratio * d_model`` and our ALiBi bias."""

    def __init__(self, config: MptConfig):
        _check_supported(config)
        super().__init__(config)
        bias = not config.no_bias
        d = config.d_model
        hidden = int(config.expansion_ratio * d)
        resid_pdrop = getattr(config, "resid_pdrop", 0.0) or 0.0
        for i, block in enumerate(self.blocks):
            block.attn = MosaicMptAttention(config, layer_idx=i)
            block.ffn.up_proj = nn.Linear(d, hidden, bias=bias)
            block.ffn.down_proj = nn.Linear(hidden, d, bias=bias)
            block.ffn.hidden_dropout = resid_pdrop
            block.resid_attn_dropout = nn.Dropout(resid_pdrop)
            if bias:
                block.norm_1.bias = nn.Parameter(torch.zeros(d))
                block.norm_2.bias = nn.Parameter(torch.zeros(d))
        if bias:
            self.norm_f.bias = nn.Parameter(torch.zeros(d))
        self.post_init()

    def build_mpt_alibi_tensor(self, num_heads, sequence_length, alibi_bias_max=8, device=None):
        # MptModel.forward calls this once per forward with a hard-coded alibi_bias_max of 8; the
        # config's value and slope scheme are used instead, and the result is built lazily.
        attn = self.config.attn_config
        slopes = alibi_slopes(num_heads, attn.alibi_bias_max, getattr(self.config, "alibi_slopes", "mpt"), device)
        return AlibiBias(slopes, self.config.max_seq_len)


class MosaicMptForCausalLM(MptForCausalLM):
    """``MptForCausalLM`` on :class:`MosaicMptModel`, with ``logit_scale`` applied."""

    def __init__(self, config: MptConfig):
        MptPreTrainedModel.__init__(self, config)
        self.transformer = MosaicMptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_scale = logit_scale_value(config)
        self.post_init()

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        out = super().forward(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            labels=None if self.logit_scale is not None else labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        if self.logit_scale is not None:
            out.logits = out.logits * self.logit_scale
            if labels is not None:
                out.loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size,
                                              **kwargs)
        if return_dict is False:
            return out.to_tuple()
        return out
