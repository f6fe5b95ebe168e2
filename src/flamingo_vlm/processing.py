"""Interleaved image/text prompts -> batched tensors for :class:`~flamingo_vlm.Flamingo`.

A sample is either a list of items in reading order (``str`` text, images, or ``{"text": ...}`` /
``{"image": ...}`` dicts), or a pair ``(text, images)`` whose text marks each image with
``<image>``. Images are PIL images, numpy arrays, ``pathlib.Path`` files, or already-preprocessed
tensors (C,H,W) / video (F,C,H,W). A plain ``str`` is always text.

``return_labels=True`` adds training labels by the one set of label rules the training data uses
too (:func:`flamingo_vlm.data.labels.make_labels`: OpenFlamingo's, except that the end-of-sequence
token is trained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .prompt_format import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN, cut_at_stop, stop_holdback  # noqa: F401 (re-exported)


def add_flamingo_tokens(tokenizer) -> list[int]:
    """Add ``<|endofchunk|>``, ``<image>`` and, if the tokenizer has no pad token, ``<PAD>``,
    in OpenFlamingo's order, so vocabulary sizes match released checkpoints.

    Returns the ids of the Flamingo tokens whose embedding rows are trainable.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    new = [EOC_TOKEN, MEDIA_TOKEN]
    if tokenizer.pad_token is None or tokenizer.pad_token == PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        new.append(PAD_TOKEN)
    return tokenizer.convert_tokens_to_ids(new)


def _is_image(item: Any) -> bool:
    return isinstance(item, (Image.Image, np.ndarray, torch.Tensor, Path))


class FlamingoProcessor:
    """Turns interleaved samples into ``input_ids``, ``attention_mask`` and ``vision_x``.

    ``vision_x`` is (B, T_img, F, C, H, W) with T_img the largest image count in the batch;
    rows with fewer images are zero-padded (those slots are never attended to).
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
        if self.media_token_id == tokenizer.unk_token_id or self.media_token_id is None:
            raise ValueError("the tokenizer has no <image> token; call add_flamingo_tokens(tokenizer) first")

    # -- pieces ------------------------------------------------------------------------------
    def split_sample(self, sample, index: int = 0) -> tuple[str, list]:
        """Normalise a sample to (text with <image> markers, images)."""
        if isinstance(sample, str):
            return sample, []
        if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], str):
            text, images = sample
            images = list(images) if images is not None else []
        elif isinstance(sample, (list, tuple)):
            parts, images = [], []
            for item in sample:
                if isinstance(item, dict) and len(item) == 1 and ("text" in item or "image" in item):
                    item = item.get("text", Path(item["image"]) if isinstance(item.get("image"), str) else item.get("image"))
                if isinstance(item, str):
                    if MEDIA_TOKEN in item:  # (it would be counted as an image and fail the count below, misleadingly)
                        raise ValueError(
                            f"sample {index}: text item {item!r} holds {MEDIA_TOKEN}; in a list of items each image "
                            f"is an item of its own (PIL image, array, tensor, Path or {{'image': ...}}), so take "
                            f"{MEDIA_TOKEN} out of the text, or pass (text with {MEDIA_TOKEN} markers, images)"
                        )
                    parts.append(item)  # strings are always text; pass images as PIL/array/tensor/Path
                elif _is_image(item):
                    parts.append(MEDIA_TOKEN)
                    images.append(item)
                else:
                    raise TypeError(f"sample {index}: items must be text or images, got {type(item).__name__}")
            text = "".join(parts)
        else:
            raise TypeError(
                f"sample {index}: expected a list of text/image items or a (text, images) pair, got {type(sample).__name__}"
            )
        n_markers = text.count(MEDIA_TOKEN)
        if n_markers != len(images):
            raise ValueError(
                f"sample {index} has {n_markers} {MEDIA_TOKEN} marker(s) but {len(images)} image(s); "
                f"put one {MEDIA_TOKEN} in the text where each image goes"
            )
        return text, images

    def image_tensor(self, image) -> torch.Tensor:
        """One image -> (F, C, H, W) (F=1 for still images)."""
        if isinstance(image, torch.Tensor):
            if image.ndim == 3:
                return image.unsqueeze(0)
            if image.ndim == 4:
                return image
            raise ValueError(f"an image tensor must be (C,H,W) or (F,C,H,W), got {tuple(image.shape)}")
        return self.image_processor(image).unsqueeze(0)

    def images_tensor(self, batch_images: Sequence[Sequence]) -> torch.Tensor:
        per_row = [[self.image_tensor(im) for im in images] for images in batch_images]
        shapes = {t.shape for row in per_row for t in row}
        if len(shapes) > 1:
            raise ValueError(f"all images in a batch must preprocess to one shape, got {sorted(map(tuple, shapes))}")
        if not shapes:
            size = getattr(self.image_processor, "image_size", 224)
            shape = (1, 3, size, size)
        else:
            shape = next(iter(shapes))
        t_max = max(1, max(len(r) for r in per_row))
        out = torch.zeros(len(per_row), t_max, *shape)
        for b, row in enumerate(per_row):
            for t, x in enumerate(row):
                out[b, t] = x
        return out

    # -- whole batches -------------------------------------------------------------------------
    def __call__(
        self,
        samples: Sequence,
        *,
        padding_side: str = "left",
        max_length: int | None = None,
        return_labels: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Left padding (default) is for generation, right padding for training."""
        if isinstance(samples, (str, tuple)) or (samples and not isinstance(samples[0], (list, tuple, str))):
            samples = [samples]
        texts, images = zip(*(self.split_sample(s, i) for i, s in enumerate(samples)))
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        try:
            enc = self.tokenizer(
                list(texts),
                padding="longest",
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
        finally:
            self.tokenizer.padding_side = old_side
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "vision_x": self.images_tensor(images),
        }
        if return_labels:
            batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"])
        return batch

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training labels of a batch, as the training data makes them (:mod:`flamingo_vlm.data.labels`):
        padding, ``<image>`` tokens, the text before the first image and the text between an
        ``<|endofchunk|>`` and the next image are ignored (-100); the end-of-sequence token is trained."""
        # imported here: the data package's __init__ imports its custom-data module, which imports this one
        from .data.labels import make_labels

        return make_labels(input_ids, attention_mask, media_token_id=self.media_token_id,
                           eoc_token_id=self.eoc_token_id, eos_token_id=self.tokenizer.eos_token_id)
