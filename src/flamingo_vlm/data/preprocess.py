"""Turn raw webdataset samples into Flamingo text + images (pure functions, no torch state).

* image-text pairs (LAION style): ``<image>{caption}<|endofchunk|>{eos}``;
* interleaved documents (MMC4 style): images are matched one-to-one to sentences, each matched
  sentence becomes ``<|endofchunk|><image>{sentence}``, the first ``<|endofchunk|>`` is dropped and
  ``<|endofchunk|>{eos}`` is appended, as OpenFlamingo does, but with the images kept in the order
  of their ``<image>`` tokens (OpenFlamingo sorted them by image index, misaligning non-monotonic
  matchings) and the image cap applied in text order.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..prompt_format import EOC_TOKEN, MEDIA_TOKEN

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SkipSample(Exception):
    """A sample that is not used; ``reason`` is the stats key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def clean_text(text: str, special_tokens: Sequence[str] = ()) -> str:
    """Remove ``<image>``, ``<|endofchunk|>`` and the tokenizer's special tokens from raw text, so
    that web text cannot add image markers or chunk ends that have no image behind them."""
    for tok in (MEDIA_TOKEN, EOC_TOKEN, *special_tokens):
        if tok and tok in text:
            text = text.replace(tok, "")
    return text


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises ``ValueError`` for anything undecodable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.width < 1 or im.height < 1:
                    raise ValueError(f"empty image {im.size}")
                return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError, ...
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # (PIL names the in-memory buffer)
        raise ValueError(f"undecodable image ({type(e).__name__}: {why})") from e


def pair_text(caption: str, prefix: str = "") -> str:
    """The LAION text, without the eos (appended as a token id by the tokenising step); ``prefix`` goes
    between the image and the caption (``"Output:"``: the built-in model's captioning prompt)."""
    return f"{MEDIA_TOKEN}{prefix}{caption.strip()}{EOC_TOKEN}"


@dataclass
class InterleavedPlan:
    text: str  # without the final eos
    images: list[int]  # indices into image_info, in <image> order
    sentences: list[int]  # the matched sentence of each image
    dropped: Counter = field(default_factory=Counter)


def plan_interleaved(
    sentences: Sequence[str],
    similarity: np.ndarray,
    available: Sequence[bool],
    *,
    threshold: float,
    max_images: int,
    separator: str = "",
) -> InterleavedPlan:
    """Match images to sentences and build the interleaved text.

    ``similarity`` is (n_images, n_sentences). Images that are not ``available`` (missing, too
    small, undecodable) are left out. Then:

    1. images whose best sentence scores below ``threshold`` are dropped (``images_below_threshold``);
    2. the rest are assigned one-to-one to sentences by ``linear_sum_assignment`` on ``-similarity``
       (images left without a sentence: ``images_unassigned``), and a pair whose assigned similarity
       is below ``threshold`` is dropped too (``images_below_threshold``);
    3. pairs are sorted by sentence, i.e. by where their ``<image>`` lands in the text, and only the
       first ``max_images`` are kept (``images_over_max``).

    ``separator`` goes between a chunk's ``<|endofchunk|>`` and the next ``<image>``: ``""`` is
    OpenFlamingo's MMC4 layout; ``"\n"`` is the layout of its few-shot evaluation prompts.
    """
    from scipy.optimize import linear_sum_assignment

    dropped: Counter = Counter()
    n_img, n_sent = similarity.shape
    cand = [i for i in range(n_img) if available[i]]
    pairs: list[tuple[int, int]] = []  # (sentence, image)
    if cand and n_sent:
        sim = np.nan_to_num(similarity[cand].astype(np.float64), nan=-1e6, posinf=1e6, neginf=-1e6)
        best = sim.max(axis=1)
        keep = best >= threshold
        dropped["images_below_threshold"] += int((~keep).sum())
        cand = [c for c, k in zip(cand, keep) if k]
        sim = sim[keep]
        if cand:
            rows, cols = linear_sum_assignment(-sim)
            dropped["images_unassigned"] += len(cand) - len(rows)
            for r, c in zip(rows, cols):
                if sim[r, c] >= threshold:
                    pairs.append((int(c), cand[r]))
                else:
                    dropped["images_below_threshold"] += 1
    elif cand:
        dropped["images_unassigned"] += len(cand)
    pairs.sort()
    if len(pairs) > max_images:
        dropped["images_over_max"] += len(pairs) - max_images
        pairs = pairs[:max_images]

    parts = list(sentences)
    for s, _ in pairs:
        parts[s] = f"{EOC_TOKEN}{MEDIA_TOKEN}{parts[s]}"
    text = " ".join(parts)
    text = text.replace(EOC_TOKEN, "", 1)  # no chunk to end before the first image
    text = (
        text.replace(f" {EOC_TOKEN}", EOC_TOKEN)
        .replace(f"{MEDIA_TOKEN} ", MEDIA_TOKEN)
        .replace(f" {MEDIA_TOKEN}", MEDIA_TOKEN)
    )
    if separator:
        text = text.replace(f"{EOC_TOKEN}{MEDIA_TOKEN}", f"{EOC_TOKEN}{separator}{MEDIA_TOKEN}")
    text = f"{text}{EOC_TOKEN}"
    return InterleavedPlan(text, [i for _, i in pairs], [s for s, _ in pairs], dropped)


def encode(tokenizer, text: str, max_tokens: int | None, eos_token_id: int | None) -> list[int]:
    """Token ids of ``text`` followed by ``eos``, cut to ``max_tokens`` (so a caption that does not
    fit loses its ``<|endofchunk|>`` and eos rather than teaching the model to stop mid-sentence)."""
    if max_tokens is not None:
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    if eos_token_id is not None and (max_tokens is None or len(ids) < max_tokens):
        if not ids or ids[-1] != eos_token_id:
            ids.append(eos_token_id)
    return ids


def prompt_token_mask(tokenizer, text: str, n_tokens: int, markers: Sequence[str]) -> list[bool]:
    """For ``loss_after``: which of ``text``'s first ``n_tokens`` tokens may be trained. In each chunk
    (an ``<image>`` up to its ``<|endofchunk|>``) the text up to the end of the last of ``markers`` is
    the prompt an evaluation would give, so it is not trained; what follows is, with the chunk's
    ``<|endofchunk|>``. Chunks without a marker stay trainable. A token that straddles a marker's end
    counts as prompt. Needs a fast tokenizer (character offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("loss_after needs a fast tokenizer (character offsets); this one is not")
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"][:n_tokens]
    prompt: list[tuple[int, int]] = []  # character spans [start, end) that are prompt
    start = text.find(MEDIA_TOKEN)
    while start >= 0:
        end = text.find(EOC_TOKEN, start)
        end = len(text) if end < 0 else end
        chunk = text[start:end]
        cut = max((chunk.rfind(m) + len(m) for m in markers if m in chunk), default=-1)
        if cut >= 0:
            prompt.append((start, start + cut))
        start = text.find(MEDIA_TOKEN, end)
    keep = [not any(a <= tok_start < b for a, b in prompt) for tok_start, _ in offsets]
    return keep + [True] * (n_tokens - len(keep))
