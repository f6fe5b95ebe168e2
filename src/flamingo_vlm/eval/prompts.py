"""Prompt templates and answer post-processing of the OpenFlamingo evaluation protocol.

A prompt is a list of demonstrations followed by the query; each piece is one of the templates
below. Demonstrations carry their answer and end in ``<|endofchunk|>``; the query stops where the
model must continue. Captioning and VQA join the pieces with ``"\\n"``, classification with ``""``.

At 0 shots the prompt still holds two demonstrations, text only: their ``<image>`` markers are
removed and their images are *not* passed to the model (OpenFlamingo passed them for
classification, so the query attended to a demo image; see the README).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..processing import EOC_TOKEN, MEDIA_TOKEN

__all__ = [
    "TEXT_ONLY_DEMOS_AT_ZERO_SHOT",
    "build_prompt",
    "caption_prompt",
    "classification_prompt",
    "hateful_memes_prompt",
    "postprocess_caption",
    "postprocess_vqa",
    "vqa_prompt",
]

#: Demonstrations shown (as text only) in a "0-shot" prompt, following Flamingo and OpenFlamingo.
TEXT_ONLY_DEMOS_AT_ZERO_SHOT = 2


def _answer(value: str | None) -> str:
    return "" if value is None else f"{value}{EOC_TOKEN}"


def caption_prompt(caption: str | None = None) -> str:
    """``<image>Output:{caption}<|endofchunk|>``; without a caption, the query ``<image>Output:``."""
    return f"{MEDIA_TOKEN}Output:{_answer(caption)}"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """``<image>Question:{question} Short answer:{answer}<|endofchunk|>``."""
    return f"{MEDIA_TOKEN}Question:{question} Short answer:{_answer(answer)}"


def classification_prompt(class_name: str | None = None) -> str:
    """ImageNet: ``<image>Output:{class name}<|endofchunk|>``."""
    return f"{MEDIA_TOKEN}Output:{_answer(class_name)}"


def hateful_memes_prompt(ocr: str, label: str | None = None) -> str:
    """``<image>is an image with: '{ocr}' written on it. Is it hateful? Answer:{yes|no}<|endofchunk|>``."""
    return f"{MEDIA_TOKEN}is an image with: '{ocr}' written on it. Is it hateful? Answer:{_answer(label)}"


def build_prompt(demos: Sequence[str], query: str, *, separator: str, with_demo_images: bool) -> str:
    """Join filled demonstration templates and the query template into one prompt string.

    ``with_demo_images=False`` (the 0-shot case) strips the demos' ``<image>`` markers; the caller
    then passes only the query image.
    """
    demos = [d if with_demo_images else d.replace(MEDIA_TOKEN, "") for d in demos]
    return "".join(d + separator for d in demos) + query


_VQA_STOP = re.compile("Question|Answer|Short")


def postprocess_caption(text: str) -> str:
    """Cut a generated caption at the first ``Output`` (the model starting a new demo) and drop
    double quotes, as OpenFlamingo did."""
    return text.split("Output", 1)[0].replace('"', "").strip()


def postprocess_vqa(text: str) -> str:
    """Cut a generated answer at ``Question``/``Answer``/``Short``, then at the first ``", "``."""
    answer = _VQA_STOP.split(text, maxsplit=1)[0]
    return answer.split(", ", 1)[0].strip()
