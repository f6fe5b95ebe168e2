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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(
        self,
        x: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        text_media: torch.Tensor,
        num_media: int,
    ) -> torch.Tensor:
        k, v = keys_values
        q = split_heads(self.to_q(self.norm(x)), self.heads)  # (b, heads, L, dim_head)
        mask, has_media = media_attention_mask(
            text_media, num_media, k.shape[-2] // num_media, self.only_attend_immediate_media
        )
        out = self._attend(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.to_out(merge_heads(out)) * has_media.to(x.dtype)

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
        q = q.reshape(rows, r, heads, length, dim_head).transpose(1, 2).reshape(rows, heads, r * length, dim_head)
        mask = mask.reshape(rows, r * length, -1).unsqueeze(1)  # (b, 1, L, S) -> (rows, 1, r*L, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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

    def forward(
        self,
        x: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        text_media: torch.Tensor,
        num_media: int,
    ) -> torch.Tensor:
        x = self.attn(x, keys_values, text_media, num_media) * self.attn_gate.tanh() + x
        # As in OpenFlamingo, the feed-forward applies to every token, with or without an image.
        return self.ff(x) * self.ff_gate.tanh() + x
