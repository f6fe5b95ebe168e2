"""Trainable rows for the tokens Flamingo adds (``<|endofchunk|>``, ``<image>``, ``<PAD>``).

The LM's embedding matrix stays frozen; the added tokens' rows live in a small trainable
``new_weight`` table, so an optimizer holds state for a few rows instead of the whole
vocabulary (OpenFlamingo trained the full matrix and masked gradients). ``state_dict`` still
presents the full matrix under the LM's own key (``...embed_tokens.weight``, ``...wte.weight``,
``...embed_in.weight``) and loading splits it again, so OpenFlamingo checkpoints round-trip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cross_attention import host_values
from .fast_linear import linear


#: Inputs of at most this many ids (decoding steps) are checked on the host for added tokens; without
#: any (and without gradients) the embedding is a plain lookup.
_HOST_CHECK_MAX = 64


class _NewRows(nn.Module):
    """Shared logic: a frozen full ``weight`` plus a trainable ``new_weight`` for ``new_ids``."""

    weight: nn.Parameter

    def _init_new_rows(self, new_ids: list[int], new_weight: nn.Parameter | None) -> None:
        self.new_id_list = sorted(new_ids)
        self.new_id_set = frozenset(self.new_id_list)
        ids = torch.tensor(self.new_id_list, dtype=torch.long)
        self.register_buffer("new_ids", ids, persistent=False)
        slot = torch.full((self.weight.shape[0],), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)
        if new_weight is None:
            new_weight = nn.Parameter(self.weight.detach()[ids].clone())
        self.new_weight = new_weight
        self.register_state_dict_post_hook(_merge_rows)
        self.register_load_state_dict_pre_hook(_split_rows)

    def merged_weight(self) -> torch.Tensor:
        return self.weight.detach().index_copy(0, self.new_ids, self.new_weight.detach().to(self.weight.dtype))


def _merge_rows(module: _NewRows, state_dict, prefix, local_metadata):
    key = prefix + "weight"
    if key in state_dict and prefix + "new_weight" in state_dict:
        state_dict[key] = module.merged_weight()
    state_dict.pop(prefix + "new_weight", None)


def _split_rows(module: _NewRows, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    key = prefix + "weight"
    if key in state_dict and prefix + "new_weight" not in state_dict:
        full = state_dict[key]
        if full.shape[0] == module.weight.shape[0]:
            state_dict[prefix + "new_weight"] = full[module.new_ids.to(full.device)]


class ExtendedEmbedding(_NewRows):
    """Drop-in for ``nn.Embedding`` whose added-token rows are a separate trainable table."""

    def __init__(self, base: nn.Embedding, new_ids: list[int]):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.padding_idx = base.padding_idx
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self._init_new_rows(new_ids, None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids, self.weight, self.padding_idx)
        if (
            input_ids.numel() <= _HOST_CHECK_MAX
            and not torch.is_grad_enabled()
            and self.new_id_set.isdisjoint(host_values(input_ids))
        ):
            # A decoding step without added tokens: the base rows alone (the result is the same).
            return out
        slot = self.slot[input_ids]
        new = F.embedding(slot.clamp(min=0), self.new_weight).to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class ExtendedLMHead(_NewRows):
    """Output head for LMs with tied embeddings: the added tokens' logits use the same trainable
    rows as their input embeddings, as they did in OpenFlamingo (where the tied matrix trained)."""

    def __init__(self, base: nn.Linear, embedding: ExtendedEmbedding):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_new_rows(embedding.new_id_list, embedding.new_weight)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight``: the frozen base rows to use instead of ``self.weight`` (the training loss
        passes them cast to the autocast dtype once per call, see ``train.fastpath``)."""
        # As 2-D: a strided 3-D input (e.g. hidden[:, -1:]) against a frozen weight makes torch run
        # bmm over a per-row expanded weight, which bf16 CPU kernels materialise (a vocab-sized copy).
        lead = hidden.shape[:-1]
        h2 = hidden.reshape(-1, hidden.shape[-1])
        weight = self.weight if weight is None else weight
        logits = linear(h2, weight, self.bias)  # oneDNN inside onednn_linears (CPU inference)
        bias = self.bias[self.new_ids] if self.bias is not None else None
        new_weight = self.new_weight if self.new_weight.dtype == hidden.dtype else self.new_weight.to(hidden.dtype)
        new_logits = linear(h2, new_weight, bias)
        if new_logits.dtype != logits.dtype:
            new_logits = new_logits.to(logits.dtype)
        logits.index_copy_(-1, self.new_ids, new_logits)  # in place: no second logits tensor
        return logits.view(*lead, logits.shape[-1])
