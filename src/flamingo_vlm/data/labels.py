"""Training labels for Flamingo sequences (vectorised, no per-token Python loops): the one set of
label rules, used by the training data (:mod:`.dataset`, the aiming data of :mod:`flamingo_vlm.train`)
and by ``FlamingoProcessor(..., return_labels=True)``. ``IGNORE_INDEX`` is defined here only.

Rules, for each row of ``input_ids`` (positions where ``attention_mask == 0`` are padding):

* padding is ``-100``;
* every ``<image>`` token is ``-100``;
* everything before the first ``<image>`` is ``-100`` (the text has no image to attend to yet);
* a chunk starts at an ``<image>`` and ends with the ``<|endofchunk|>`` that closes it: the
  ``<|endofchunk|>`` itself **is** trained (the model learns where a chunk stops), the tokens after
  it up to the next ``<image>`` are ``-100``; an ``<|endofchunk|>`` that is not inside a chunk (e.g.
  a second one in a row) is ``-100`` too;
* the end-of-sequence token (``eos_token_id``) is trained wherever it appears after the first image,
  in particular the final one that follows the last ``<|endofchunk|>`` (OpenFlamingo masked it, so
  its MMC4 models never learnt to stop a document).

OpenFlamingo (``train_utils.py``) had two rules: for LAION pairs, padding, ``<image>`` and the first
token ignored; for MMC4, also the text before the first ``<image>`` and from each ``<|endofchunk|>``
up to the next ``<image>`` (which masked the final eos). These rules give OpenFlamingo's labels for
both (a pair ``[bos]<image>caption<|endofchunk|>eos`` comes out the same), except the final eos of
an MMC4 document, which is trained.

Labels are *not* shifted: the causal-LM loss shifts them, as for Hugging Face models. Left and right
padding both work, since padding is read from the attention mask.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def make_labels(
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    *,
    media_token_id: int,
    eoc_token_id: int,
    eos_token_id: int | None,
) -> torch.LongTensor:
    """Labels for ``input_ids`` (B, L) following the rules in the module docstring."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    valid = attention_mask.bool()
    is_media = (input_ids == media_token_id) & valid
    is_eoc = (input_ids == eoc_token_id) & valid

    length = input_ids.shape[1]
    pos = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(pos, -1)
    # position of the latest <image> at or before t, and of the latest <|endofchunk|> strictly before t
    last_media = torch.where(is_media, pos, none).cummax(dim=1).values
    last_eoc_incl = torch.where(is_eoc, pos, none).cummax(dim=1).values
    last_eoc = torch.cat([none[:, :1], last_eoc_incl[:, :-1]], dim=1)

    seen_image = last_media >= 0
    in_chunk = seen_image & (last_media > last_eoc)
    train = valid & in_chunk & ~is_media
    if eos_token_id is not None:
        train |= valid & seen_image & (input_ids == eos_token_id)

    return torch.where(train, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
