"""Speculative decoding with images: prompt lookup and assisted generation for :meth:`Flamingo.generate`.

Both are transformers' own (``prompt_lookup_num_tokens=k``; ``assistant_model=``): candidates are
proposed, the Flamingo checks them all in one LM call, keeps the longest prefix that greedy
decoding would have produced and crops the rest off the KV cache. Greedy output is therefore
plain greedy's. Two things make that hold with images:

* which image a position sees is read from the KV cache's length (:mod:`.injection`), so rejected
  candidates (an ``<image>`` among them included) leave no trace;
* an assistant that is itself a :class:`~.flamingo.Flamingo` (the same model in a cheaper precision,
  ``copy.deepcopy(model).to(torch.bfloat16)``, or a smaller Flamingo with the same tokenizer) gets
  its own image conditioning for the call: its LM is what transformers drives, with the images
  encoded by its own vision encoder and perceiver (or, given only ``media``, the main model's latents
  cast to its dtype). A bare LM sharing the tokenizer works too: it drafts from the text alone.

transformers' assisted decoding takes one row at a time; a batch of several rows is decoded row by
row here (each without its left padding) and re-assembled as a batched ``generate`` returns it:
the left-padded prompt, then each row's new tokens, padded on the right with the pad token.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

# Flamingo calls in here (modeling/flamingo.py imports this module), so its type is named in the
# docstrings and annotated as nn.Module, never imported: no cycle.


def is_speculative(generate_kwargs: dict[str, Any]) -> bool:
    return generate_kwargs.get("prompt_lookup_num_tokens") is not None or generate_kwargs.get("assistant_model") is not None


def assistant_conditioning(model: nn.Module, generate_kwargs: dict[str, Any], vision_x, media, lang_x,
                           stack: contextlib.ExitStack) -> None:
    """When ``assistant_model`` is a Flamingo: replace it by its LM (what transformers drives) and
    enter its image conditioning on ``stack`` for the length of the call."""
    assistant = generate_kwargs.get("assistant_model")
    if assistant is not None:
        stack.enter_context(_without_assistant_deprecation())
    if not isinstance(assistant, type(model)):  # a bare LM drafts from text alone
        _check_bare_vocabulary(model, assistant, generate_kwargs)
        return
    if assistant is model:
        raise ValueError("assistant_model is the model itself; pass a copy in a cheaper precision "
                         "(copy.deepcopy(model).to(torch.bfloat16)) or a smaller Flamingo with the same tokenizer")
    if vision_x is None:
        dtype = next(assistant.perceiver.parameters()).dtype
        if media.shape[-1] != assistant.vis_dim:
            raise ValueError(f"the assistant reads images of width {assistant.vis_dim}, the given media has "
                             f"{media.shape[-1]}: pass vision_x (pixels) so that it encodes them itself")
        media = media.to(device=assistant.device, dtype=dtype)
        vision_x = None
    else:
        vision_x = vision_x.to(assistant.device)
    cond = assistant._conditioning(vision_x, media if vision_x is None else None, lang_x.to(assistant.device))
    stack.enter_context(assistant._slot.use(cond))
    generate_kwargs["assistant_model"] = assistant.lang_encoder


def _vocab_size(lm: nn.Module) -> int | None:
    config = getattr(lm, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def _check_bare_vocabulary(model: nn.Module, assistant: nn.Module, generate_kwargs: dict[str, Any]) -> None:
    """A bare LM must have the Flamingo's vocabulary: the backbone it was built on lacks the added
    tokens, and transformers then refused it as having "different tokenizers", advising
    ``assistant_tokenizer=`` (universal assisted decoding), which is not what is wrong."""
    if generate_kwargs.get("assistant_tokenizer") is not None:  # (universal assisted decoding: asked for)
        return
    ours, theirs = _vocab_size(model.lang_encoder), _vocab_size(assistant)
    if ours is not None and theirs is not None and theirs < ours:
        raise ValueError(
            f"assistant_model has {theirs} tokens, the model {ours} (the Flamingo tokens <|endofchunk|>, <image> "
            f"and maybe <PAD> come after the LM's): give it the same vocabulary first, "
            f"assistant_model.resize_token_embeddings({ours})")


class _AssistantDeprecation(logging.Filter):
    """transformers' own candidate generator calls the assistant's ``generate`` with a
    ``generation_config`` and ``min_new_tokens``/``max_new_tokens`` together, and the same
    ``generate`` then warns that doing so "is deprecated": a message about transformers' code that
    reached users of ``assistant_model=`` as if they had passed something wrong. Dropped for the
    length of an assisted call; every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing `generation_config` together with generation-related")


@contextlib.contextmanager
def _without_assistant_deprecation():
    logger, quiet = logging.getLogger("transformers.generation.utils"), _AssistantDeprecation()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def generate_rows(model: nn.Module, vision_x, media: torch.Tensor, lang_x: torch.Tensor,
                  attention_mask: torch.Tensor, allow_image_tokens: bool, **generate_kwargs) -> torch.Tensor:
    """Speculative ``generate`` of a batch, one row at a time (transformers' assisted decoding is
    batch-1), returned as a batched ``generate`` would return it."""
    if generate_kwargs.get("return_dict_in_generate"):
        raise ValueError("speculative decoding of several rows returns token ids only: drop return_dict_in_generate "
                         "or pass one row at a time")
    if generate_kwargs.get("streamer") is not None:
        raise ValueError("a streamer takes one row: pass one row at a time")
    pad = generate_kwargs.get("pad_token_id", model.pad_token_id)
    if pad is None:
        raise ValueError("speculative decoding of several rows needs a pad_token_id to pad the rows' outputs")
    outs = []
    for b in range(lang_x.shape[0]):
        keep = attention_mask[b].bool()
        start = int(keep.long().argmax()) if bool(keep.any()) else lang_x.shape[1]
        if not bool(keep[start:].all()):
            raise ValueError("speculative decoding of several rows needs left padding (row "
                             f"{b} of attention_mask has a 0 after its first 1)")
        row = model.generate(
            None if vision_x is None else vision_x[b : b + 1], lang_x[b : b + 1, start:],
            attention_mask[b : b + 1, start:], media=media[b : b + 1], allow_image_tokens=allow_image_tokens,
            **generate_kwargs,
        )
        outs.append(row[0, lang_x.shape[1] - start :])
    longest = max(o.shape[0] for o in outs)
    new = lang_x.new_full((lang_x.shape[0], longest), pad)
    for b, o in enumerate(outs):
        new[b, : o.shape[0]] = o
    return torch.cat([lang_x, new], dim=1)
