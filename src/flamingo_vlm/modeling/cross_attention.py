"""Tanh-gated, masked cross-attention from text tokens to image latents.

Parameter names follow OpenFlamingo v2 (``attn.norm``, ``attn.to_q``, ``attn.to_kv``,
``attn.to_out``, ``ff.{0,1,3}``, ``attn_gate``, ``ff_gate``).

The image keys/values depend only on the images, so they are computed once per call
(:meth:`MaskedCrossAttention.image_keys_values`) and reused at every decoding step, and by every
copy of a row (beams, sampled sequences, scored candidates): the copies' queries are folded into
one longer query of their image row instead of repeating the keys/values per copy.

Which image a text token may see is data, not state: ``text_media`` holds, for every text
position, the 1-based index of the image it is conditioned on (0 = no image yet). It is the
running count of ``<image>`` tokens, so a token sees the image immediately before it.

What the queries of one LM call may see is worked out once per call, for every layer
(:func:`plan_media_attention`, a :class:`MediaPlan`). When every query sees the same images (a
decoding step of one token per row, all rows past the same image: the usual case), the plan is a
range of the keys instead of a mask: the layers attend over that slice of the keys/values without
any mask, and with no image at all yet the attention branch is skipped (its output is exactly
zero either way). Deciding that reads the (few) image indices on the host, so it is done only for
small chunks without gradients (decoding, scoring), never for a training forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .attention import fp32_decode, sdpa
from .perceiver import feed_forward, merge_heads, split_heads


def media_attention_mask(
    text_media: torch.Tensor, num_media: int, tokens_per_media: int, only_immediate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean SDPA mask (b, 1, L, num_media*tokens_per_media) and a (b, L, 1) has-image gate.

    Rows with no image to see get an all-True mask row (so softmax stays finite) and a zero gate,
    which makes their cross-attention output exactly zero in both modes. OpenFlamingo's
    "all previous images" mode instead let such rows attend uniformly to every image, future
    ones included.
    """
    media_time = torch.arange(1, num_media + 1, device=text_media.device)
    media_time = media_time.repeat_interleave(tokens_per_media)  # (S,)
    t = text_media.unsqueeze(-1)  # (b, L, 1)
    allowed = (t == media_time) if only_immediate else (media_time <= t)
    has_media = text_media > 0
    allowed = allowed | ~has_media.unsqueeze(-1)
    return allowed.unsqueeze(1), has_media.unsqueeze(-1)


class MediaPlan(NamedTuple):
    """What the queries of one LM call see, for every cross-attention layer of that call.

    ``span`` set: every query sees exactly ``keys[..., span[0]:span[1], :]`` (no mask needed).
    ``blind``: no query sees any image; the attention branch is exactly zero and is skipped.
    Otherwise ``mask`` / ``has_media`` as :func:`media_attention_mask` makes them. A plan with
    everything unset means "attend to all the keys given" (keys already cut to ``span``).
    """

    mask: torch.Tensor | None = None
    has_media: torch.Tensor | None = None
    span: tuple[int, int] | None = None
    blind: bool = False


ATTEND_ALL = MediaPlan()

#: Chunks of at most this many positions are checked on the host for one shared image index.
UNIFORM_CHECK_MAX = 256


def plan_media_attention(
    text_media: torch.Tensor, num_media: int, tokens_per_media: int, only_immediate: bool
) -> MediaPlan:
    """The :class:`MediaPlan` for queries whose image indices are ``text_media`` (b, L)."""
    if text_media.numel() <= UNIFORM_CHECK_MAX and not torch.is_grad_enabled():
        values = host_values(text_media)
        if len(values) == 1:
            (m,) = values
            if m <= 0:
                return MediaPlan(blind=True)
            start = (m - 1) * tokens_per_media if only_immediate else 0
            return MediaPlan(span=(start, m * tokens_per_media))
    mask, has_media = media_attention_mask(text_media, num_media, tokens_per_media, only_immediate)
    return MediaPlan(mask=mask, has_media=has_media)


def host_values(t: torch.Tensor) -> set[int]:
    """The distinct values of a small integer tensor, read on the host (one scalar read for one value)."""
    if t.numel() == 1:
        return {t.item()}
    return {v for row in t.reshape(-1, t.shape[-1]).tolist() for v in row}


def cut_keys_values(
    keys_values: tuple[torch.Tensor, torch.Tensor], plan: MediaPlan
) -> tuple[tuple[torch.Tensor, torch.Tensor], MediaPlan]:
    """Keys/values and plan for the attention itself: a ``span`` plan becomes its slice of the
    keys/values, attended in full."""
    if plan.span is None:
        return keys_values, plan
    start, stop = plan.span
    k, v = keys_values
    return (k[..., start:stop, :], v[..., start:stop, :]), ATTEND_ALL


class MaskedCrossAttention(nn.Module):
    """Text queries attend to the image tokens each text position may see (``text_media``); image
    keys/values come precomputed from :meth:`image_keys_values`."""

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.heads = heads
        self.only_attend_immediate_media = only_attend_immediate_media
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def image_keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media (b, T_img, n, Dv) -> keys, values (b, heads, T_img*n, dim_head)."""
        b, t_img, n, dv = media.shape
        k, v = self.to_kv(media.reshape(b, t_img * n, dv)).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def plan(self, text_media: torch.Tensor, num_media: int, tokens_per_media: int) -> MediaPlan:
        return plan_media_attention(text_media, num_media, tokens_per_media, self.only_attend_immediate_media)

    def forward(
        self,
        x: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        media: torch.Tensor | MediaPlan,
        num_media: int | None = None,
    ) -> torch.Tensor:
        """``media``: the queries' image indices (``text_media``, with ``num_media``) or a
        :class:`MediaPlan` made from them (the keys/values cut to its span already if it has one)."""
        k, v = keys_values
        plan = media if isinstance(media, MediaPlan) else self.plan(media, num_media, k.shape[-2] // num_media)
        if plan.blind:  # no query has an image: the output is zero (as the has_media gate makes it)
            return torch.zeros_like(x)
        (k, v), plan = cut_keys_values((k, v), plan)
        b, length = x.shape[:2]
        q = self.to_q(self.norm(x))
        # (b, heads, L, dim_head); with one query per row (decoding) the head split is a plain view.
        q = q.view(b, self.heads, 1, -1) if length == 1 else split_heads(q, self.heads)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if fp32_decode(q, k, v, self.training):  # bf16 (or bf16-autocast) decode step on CPU: SDPA on fp32 copies
            with torch.autocast("cpu", enabled=False):  # (under bf16 autocast SDPA would take them back to bf16)
                out = self._attend(q.float(), k.float(), v.float(), plan.mask).to(q.dtype)
        else:
            out = self._attend(q, k, v, plan.mask)
        out = self.to_out(out.reshape(b, 1, -1) if length == 1 else merge_heads(out))
        return out if plan.has_media is None else out * plan.has_media.to(out.dtype)

    @staticmethod
    def _attend(q, k, v, mask) -> torch.Tensor:
        """Attention for ``b = rows * r`` query rows over ``rows`` image rows, where query row
        ``i`` belongs to image row ``i // r`` (generate() and scoring repeat rows with
        ``repeat_interleave``; ``r = 1`` otherwise): each image row's ``r`` copies attend as one
        query of ``r * L`` tokens, so the keys/values are never copied (for ``r = 1`` the reshapes
        are views)."""
        rows = k.shape[0]
        b, heads, length, dim_head = q.shape
        if b % rows:
            raise RuntimeError(f"batch of {b} rows cannot be matched to {rows} image rows")
        r = b // rows
        if r == 1:
            return sdpa(q, k, v, attn_mask=mask)
        q = q.reshape(rows, r, heads, length, dim_head).transpose(1, 2).reshape(rows, heads, r * length, dim_head)
        if mask is not None:
            mask = mask.reshape(rows, r * length, -1).unsqueeze(1)  # (b, 1, L, S) -> (rows, 1, r*L, S)
        out = sdpa(q, k, v, attn_mask=mask)
        return out.reshape(rows, heads, r, length, dim_head).transpose(1, 2).reshape(b, heads, length, dim_head)


class GatedCrossAttentionBlock(nn.Module):
    """Masked cross-attention then a feed-forward, each added to the residual stream through a
    tanh gate that starts at zero; inserted before an LM decoder layer."""

    def __init__(
        self,
        *,
        dim: int,
        dim_visual: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
    ):
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim,
            dim_visual=dim_visual,
            dim_head=dim_head,
            heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
        )
        # Gates start at zero so that an untrained block leaves the LM unchanged.
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh of the attention and feed-forward gates (computed once per call by the caller)."""
        return self.attn_gate.tanh(), self.ff_gate.tanh()

    def forward(
        self,
        x: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        media: torch.Tensor | MediaPlan,
        num_media: int | None = None,
        gates: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``media``: per-token image indices (``text_media``) with ``num_media``, or a
        :class:`MediaPlan`; ``gates``: :meth:`gates`, if already computed."""
        attn_gate, ff_gate = gates if gates is not None else self.gates()
        k, v = keys_values
        plan = media if isinstance(media, MediaPlan) else self.attn.plan(media, num_media, k.shape[-2] // num_media)
        if not plan.blind:  # with no image to see, the attention branch adds exactly zero: skip it
            x = self.attn(x, keys_values, plan) * attn_gate + x
        # As in OpenFlamingo, the feed-forward applies to every token, with or without an image.
        return self.ff(x) * ff_gate + x
