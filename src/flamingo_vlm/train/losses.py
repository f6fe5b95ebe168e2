"""The training losses: the causal-LM cross-entropy and the aiming loss on the cross-attention.

Cross-entropy. Token sums in fp32 (the trainer divides by the step's trained-token count, see
:mod:`.trainer`); labels are not shifted (position ``t`` predicts ``labels[t+1]``, as in Hugging
Face models) and ``IGNORE_INDEX`` (from :mod:`flamingo_vlm.data.labels`, the one label-rule module)
marks untrained positions. :func:`~.fastpath.head_cross_entropy_sum` is the same sum from hidden
states in chunks.

Aiming (``TrainConfig.aim``; not in Flamingo or OpenFlamingo). A loss on *where* the cross-attention
looks, for models whose perceiver passes its input cells through (``media_passthrough``) and whose
vision tokens are a grid of feature tokens followed by one colour token per cell (the built-in
feature-grid encoder with ``color_encoding: tokens`` or ``both``). For the first ``heads`` heads of
every cross-attention block, at each row's supervised positions (the word that names the object and
the answer position, :class:`~.aiming.AimDataset`), it is minus the log of the attention mass on the
target cells' tokens (feature and colour), averaged over rows, positions, heads and blocks. Answer
loss alone never taught the built-in model's heads to look at the object a question names (see
``research/README.md``); this loss does (stages 12-14 of its recipe).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..modeling.cross_attention import MaskedCrossAttention, split_heads
from .config import ConfigError

__all__ = ["IGNORE_INDEX", "AttentionAim", "aim_loss", "cross_entropy_sum", "losses_agree", "trained_tokens"]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-sum causal LM cross-entropy in fp32: position t predicts ``labels[t+1]``."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def trained_tokens(labels: torch.Tensor) -> int:
    """How many positions the causal loss trains (labels after the shift that are not ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def losses_agree(chunked: torch.Tensor, full: torch.Tensor, precision: str, info) -> bool:
    """Whether the chunked loss (:mod:`.fastpath`) equals the loss from the model's own logits on
    every rank (it would not for an LM that transforms logits after its head, e.g. soft-capping);
    a non-finite reference counts as agreeing."""
    tol = 1e-4 if precision == "fp32" else 2e-2
    ok = torch.tensor([1.0 if torch.isclose(chunked.float(), full.float(), rtol=tol, atol=tol).item()
                       or not torch.isfinite(full).item() else 0.0], device=info.device)
    if info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def aim_loss(q: torch.Tensor, k: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Mean over rows, positions and heads of -log(attention mass on the target tokens).

    ``q`` (B, H, P, d) at the supervised positions, ``k`` (B, H, S, d) for one image whose last
    ``2 * C`` tokens are the C feature tokens and then the C colour tokens of the grid cells;
    ``cells`` (B, C) bool, the target cells."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # B, H, P, S
    n_cells = cells.shape[-1]
    base = k.shape[-2] - 2 * n_cells
    target = torch.zeros(cells.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
    target[:, base:base + n_cells] = cells
    target[:, base + n_cells:] = cells
    on_target = logits.masked_fill(~target[:, None, None, :], -torch.inf).logsumexp(-1)
    return (logits.logsumexp(-1) - on_target).mean()


class AttentionAim:
    """The aiming loss of a model's forward pass: ``with aim.capture(batch) as losses: model(...)``
    leaves one :func:`aim_loss` per cross-attention block in ``losses`` (added to the LM loss by
    :meth:`add`). ``heads``: how many heads of each block are supervised (the first ones)."""

    def __init__(self, model: nn.Module, heads: int):
        self.blocks = [m for m in model.modules() if isinstance(m, MaskedCrossAttention)]
        if not self.blocks:
            raise ConfigError("aim: the model has no cross-attention blocks to aim")
        most = min(b.heads for b in self.blocks)
        if not 1 <= heads <= most:
            raise ConfigError(f"aim.heads must be between 1 and the cross-attention's {most} heads, got {heads}")
        self.heads = heads

    @contextlib.contextmanager
    def capture(self, batch: dict, device=None):
        """For an aiming batch: ``aim_cells`` (B, C) bool, the target cells, ``aim_positions``
        (B, P), the token positions whose queries are supervised, and optionally ``aim_media`` (B,),
        which of a row's images the cells are in (default: each row has one)."""
        cells, positions = batch["aim_cells"].to(device), batch["aim_positions"].to(device)
        media = batch.get("aim_media")
        num_media = batch["vision_x"].shape[1]
        losses: list[torch.Tensor] = []

        def hook(module, args):
            x, k = args[0], args[1][0]
            rows = torch.arange(x.shape[0], device=x.device)
            if media is not None and num_media > 1:  # the target image's keys only: a query sees no other
                if k.shape[-2] % num_media:
                    raise RuntimeError(f"aim: {k.shape[-2]} cross-attention keys are not {num_media} images' worth")
                k = k.unflatten(-2, (num_media, -1))[rows, :, media.to(k.device)]
            q = split_heads(module.to_q(module.norm(x[rows[:, None], positions])), module.heads)[:, : self.heads]
            losses.append(aim_loss(q, k[:, : self.heads], cells))

        handles = [b.register_forward_pre_hook(hook) for b in self.blocks]
        try:
            yield losses
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def add(token_sum: torch.Tensor, losses: list[torch.Tensor], labels: torch.Tensor, weight: float,
            log: list | None = None) -> torch.Tensor:
        """``token_sum`` plus ``weight`` times the mean of the captured ``losses`` times the batch's
        trained tokens: the trainer divides a dataset's token sum by its trained-token count, so the
        dataset's loss is the answer loss plus ``weight`` times the attention loss. The attention loss
        is appended to ``log``."""
        if not losses:
            raise RuntimeError("no cross-attention block ran: nothing to aim (does the batch have images?)")
        attention = torch.stack(losses).mean()
        if log is not None:
            log.append(attention.detach())
        return token_sum + weight * attention * trained_tokens(labels)
