"""Perceiver Resampler: maps a variable number of vision tokens to a fixed set of latents.

Parameter names and shapes follow OpenFlamingo v2 so released checkpoints load as they are:
``latents``, ``layers.{i}.0`` (attention), ``layers.{i}.1`` (feed-forward), ``norm``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import sdpa


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, no biases (indices 0, 1, 3 in checkpoints)."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads*d) -> (..., heads, L, d)."""
    *lead, length, width = x.shape
    return x.view(*lead, length, heads, width // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) -> (..., L, heads*d)."""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class PerceiverAttention(nn.Module):
    """Latents attend to one image's vision tokens and to themselves (keys/values of both)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (b, T, n, D) media tokens; latents: (b, T, L, D). Returns (b, T, L, D)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        # Latents attend to the media tokens and to themselves.
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        # One batch dimension (b * T): torch's CPU flash kernel takes 4-D inputs only, and a 5-D
        # call runs the math path (2x slower here, and it keeps the attention weights for backward).
        lead = q.shape[:-3]
        out = sdpa(*(t.reshape(-1, *t.shape[-3:]) for t in (q, k, v)))
        return self.to_out(merge_heads(out.reshape(*lead, *out.shape[1:])))


class PerceiverResampler(nn.Module):
    """Resamples each image's variable number of vision tokens into ``num_latents`` learnt latent
    tokens (optionally followed by the normed input tokens, ``media_passthrough``)."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        ff_mult: int = 4,
        media_passthrough: bool = False,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # Frame and media-time embeddings are off in OpenFlamingo v2 (None); frames (video) use them.
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = (
            nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # Not in OpenFlamingo. With depth 1 every latent's query is the same for every image, so a
        # latent that pools several objects mixes their attributes; passing the (normed) input
        # tokens through as well lets the LM's cross-attention read one cell's features directly.
        self.passthrough_norm = nn.LayerNorm(dim) if media_passthrough else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, T, F, v, D) vision tokens per image and frame. Returns (b, T, num_latents, D), or
        with ``media_passthrough`` (b, T, num_latents + F*v, D): the latents, then the input tokens."""
        b, T, n_frames, v, dim = x.shape
        if self.frame_embs is not None:
            if n_frames > self.frame_embs.shape[0]:
                raise ValueError(
                    f"got {n_frames} frames per image but the perceiver was built with "
                    f"max_num_frames={self.frame_embs.shape[0]}"
                )
            x = x + self.frame_embs[:n_frames].view(1, 1, n_frames, 1, dim)
        elif n_frames > 1:
            raise ValueError(
                f"got {n_frames} frames per image; build the perceiver with max_num_frames >= "
                f"{n_frames} (frame embeddings) to use video input"
            )
        x = x.reshape(b, T, n_frames * v, dim)
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        if self.passthrough_norm is None:
            return self.norm(latents)
        return torch.cat((self.norm(latents), self.passthrough_norm(x)), dim=-2)
