"""Deterministic, resumable, rank-split training batches from webdataset shards.

Sample order
------------
For epoch ``e`` the shard list is shuffled with ``random.Random(seed + e)``; the shards' raw
samples (undecoded bytes) are read in that order and pass through a shuffle buffer of
``spec.shuffle_buffer`` samples seeded with ``random.Random(f"{seed}:{e}:samples")``. This gives
one *global* sequence ``s_0, s_1, ...`` per epoch that is the same on every rank and a pure function
of ``(seed, epoch)`` and the shards.

Rank split
----------
The global sequence is cut into groups of ``world_size`` consecutive samples; rank ``r`` takes the
``r``-th sample of every *complete* group (``index % world_size == r``; an incomplete last group is
dropped on every rank). Each rank fills batches of ``batch_size`` from its samples, so with no
skipped samples rank ``r``'s batch ``k`` holds global samples
``{(k*b + j)*W + r : j < b}`` and the union over ranks of batch ``k`` is exactly global samples
``k*b*W .. (k+1)*b*W - 1``: what one process with batch ``b*W`` gets as its batch ``k``, and every
rank yields the same number of batches per epoch. A sample that a rank skips (corrupt, too few
images, ...) is replaced by that rank's next sample, so after a skip the ranks' batches are no longer
the exact split of a single-process batch (the data are still disjoint across ranks and every
epoch still covers each usable sample once, up to the dropped tail).

Per-sample randomness (``single_image_keep_prob``, ``hflip_prob``) is drawn from
``random.Random(f"{seed}:{epoch}:{index}")`` with the global index, so it does not depend on the rank
split or on resuming.

Epochs and resume
-----------------
Iteration never ends: when the shards run out the partial batch is dropped and the next epoch
starts. ``state_dict()`` is ``{"epoch", "batches", "consumed"}``: the epoch, the batches yielded in
it and the number of global samples consumed by those batches. ``load_state_dict`` then makes the
next ``iter()`` re-read the shards (bytes only) and skip the first ``consumed`` samples *without
decoding them*, giving the same following batches bitwise. A state without ``"consumed"`` (only
epoch and batches) is honoured by replaying the epoch, which decodes the skipped samples. Each rank
has its own state (ranks that skipped different numbers of samples have different ``consumed``).

Damaged shards
--------------
A shard that cannot be read (missing, not a tar, empty) gives no samples and one that is cut gives
the samples before the cut (see :mod:`.shards`): the run goes on, the shard is named in a warning
(once) and in :meth:`ShardDataset.problems`. The global sequence stays a pure function of the seed
and the shards' *contents*, so positions saved with damaged shards resume exactly as long as the
shards are not repaired or damaged further in between. The state also carries the damaged shards
seen so far and the number of corrupt samples skipped, so the counts of a resumed run continue
those of the interrupted one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .labels import IGNORE_INDEX, make_labels
from .preprocess import (
    IMAGE_EXTS,
    SkipSample,
    clean_text,
    decode_image,
    encode,
    pair_text,
    plan_interleaved,
    prompt_token_mask,
)
from .shards import TRUNCATED, UNREADABLE, expand_urls, iter_raw_samples, shuffle_buffer

__all__ = ["DatasetSpec", "Sample", "ShardDataset", "build_datasets", "collate", "pad_token_id"]

logger = logging.getLogger(__name__)

KINDS = ("pairs", "interleaved")
DEFAULT_MAX_TOKENS = {"pairs": 32, "interleaved": 256}
DEFAULT_SHUFFLE_BUFFER = {"pairs": 1000, "interleaved": 100}
_MAX_WARNINGS = 10


@dataclass
class DatasetSpec:
    """One training data source.

    ``urls``: shard paths; brace ranges (``shards/{000..009}.tar``), globs and directories (all
    ``*.tar`` in it) are expanded; ``pipe:``/``http(s)://`` urls are read with ``webdataset.gopen``.

    ``max_tokens`` defaults to 32 for pairs and 256 for interleaved (OpenFlamingo's values).
    ``min_image_bytes``: images with fewer encoded bytes are dropped (OpenFlamingo dropped images of
    10 KB or less on MMC4, i.e. ``min_image_bytes=10_001``); 0 keeps every image.
    ``single_image_keep_prob``: probability of keeping an interleaved document that ends up with a
    single image (OpenFlamingo used 0.5 to favour multi-image documents); 1.0 keeps them all.
    ``hflip_prob``: per-image horizontal flip probability; off by default because flips contradict
    "left"/"right" in the text and mirror text inside images (OpenFlamingo flipped with p=0.5).
    ``chunk_separator``: text between a chunk's ``<|endofchunk|>`` and the next ``<image>`` in
    interleaved documents (not trained on); ``""`` is OpenFlamingo's layout, ``"\n"`` matches the
    few-shot evaluation prompts of captioning and VQA.
    ``loss_after``: markers such as ``("Short answer:", "Output:")``; in a chunk holding one, only the
    text after the last marker (and the chunk's ``<|endofchunk|>``) is trained, the way the few-shot
    evaluation asks: the question is prompt, the answer is the target. Chunks without a marker are
    trained whole. Empty (the default) trains every chunk's text, as OpenFlamingo did.
    ``caption_prefix``: text between a pair's ``<image>`` and its caption, the prompt the model will be
    asked with (``"Output:"`` for the built-in model; with ``loss_after=("Output:",)`` it is not
    trained); ``""`` is OpenFlamingo's LAION layout.
    ``shuffle_buffer``: samples held (as raw bytes) for shuffling; defaults to 1000 for pairs and 100
    for interleaved documents (which carry their images); 0 or 1 disables sample shuffling.
    """

    kind: str
    urls: list[str]
    batch_size: int = 8
    loss_weight: float = 1.0
    max_tokens: int | None = None
    max_images: int = 6
    min_images: int = 1
    similarity_threshold: float = 0.24
    min_image_bytes: int = 0
    single_image_keep_prob: float = 1.0
    hflip_prob: float = 0.0
    shuffle_buffer: int | None = None
    chunk_separator: str = ""
    loss_after: tuple[str, ...] = ()
    caption_prefix: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.urls, str) or not hasattr(self.urls, "__iter__"):
            self.urls = [self.urls]
        self.urls = [str(u) for u in self.urls]
        if not self.urls:
            raise ValueError("DatasetSpec.urls is empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (an <image> and one token), got {self.max_tokens}")
        if self.max_images < 1 or self.min_images < 0 or self.min_images > self.max_images:
            raise ValueError(
                f"need 0 <= min_images <= max_images and max_images >= 1, got {self.min_images}, {self.max_images}"
            )
        if not 0.0 <= self.single_image_keep_prob <= 1.0 or not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError("single_image_keep_prob and hflip_prob must be in [0, 1]")
        if isinstance(self.loss_after, str):
            self.loss_after = (self.loss_after,)
        self.loss_after = tuple(self.loss_after)
        if not all(isinstance(m, str) and m for m in self.loss_after):
            raise ValueError(f"loss_after must be non-empty strings (e.g. 'Short answer:'), got {self.loss_after!r}")

    @property
    def resolved_max_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS[self.kind]

    @property
    def resolved_shuffle_buffer(self) -> int:
        return self.shuffle_buffer if self.shuffle_buffer is not None else DEFAULT_SHUFFLE_BUFFER[self.kind]


@dataclass
class Sample:
    """One training row before batching: token ids, its images in ``<image>`` order, and which
    tokens may be trained (None: all, by the label rules of :mod:`.labels`)."""

    input_ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    trainable: list[bool] | None = None  # per token, from DatasetSpec.loss_after


def pad_token_id(tokenizer, eos_token_id: int | None) -> int:
    """The id that right-pads a batch: the tokenizer's pad token, else eos, else 0."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (eos_token_id if eos_token_id is not None else 0)


def collate(samples: list[Sample], *, pad_token_id: int, media_token_id: int, eoc_token_id: int,
            eos_token_id: int | None, empty_image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Right-padded batch ``{"vision_x" (B, T_img, 1, C, H, W), "input_ids", "attention_mask",
    "labels"}`` of ``samples``; rows with fewer images are zero-padded (a batch without images gets
    one of ``empty_image_shape``)."""
    B = len(samples)
    L = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(samples):
        input_ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[b, : len(s.input_ids)] = 1
    shapes = {tuple(x.shape) for s in samples for x in s.images}
    if len(shapes) > 1:
        raise ValueError(f"images preprocess to different shapes {sorted(shapes)}")
    shape = next(iter(shapes)) if shapes else tuple(empty_image_shape)
    T = max(1, max(len(s.images) for s in samples))
    vision_x = torch.zeros((B, T, 1, *shape), dtype=torch.float32)
    for b, s in enumerate(samples):
        if s.images:
            vision_x[b, : len(s.images), 0] = torch.stack(s.images)
    labels = make_labels(input_ids, attention_mask, media_token_id=media_token_id, eoc_token_id=eoc_token_id,
                         eos_token_id=eos_token_id)
    if any(s.trainable is not None for s in samples):
        trainable = torch.ones((B, L), dtype=torch.bool)
        for b, s in enumerate(samples):
            if s.trainable is not None:
                trainable[b, : len(s.trainable)] = torch.tensor(s.trainable, dtype=torch.bool)
        labels = labels.masked_fill(~trainable, IGNORE_INDEX)
    return {"vision_x": vision_x, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class NoFullBatch(RuntimeError):
    """A dataset's epoch gave this process no full batch: too few usable samples for its share, or
    ``damaged`` shards (unreadable, truncated) where they were."""

    def __init__(self, message: str, *, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


class ShardDataset(IterableDataset):
    """Endless stream of right-padded training batches from one :class:`DatasetSpec`.

    Each batch is ``{"vision_x" (B, T_img, 1, C, H, W), "input_ids", "attention_mask", "labels"}``
    with exactly ``spec.batch_size`` rows; ``T_img`` is the largest image count in the batch and rows
    with fewer images are zero-padded. The number of images of a row always equals its number of
    ``<image>`` tokens. See the module docstring for order, rank split and resume. Iterate it in the
    main process: in a DataLoader worker its position (``state_dict``) would stay in the worker, and
    several workers would each yield the whole stream (``num_workers > 1`` raises).

    ``stats`` counts ``raw_samples`` (looked at by this rank), ``samples`` (usable), ``batches``,
    ``epochs``, ``images`` and each reason for skipping a sample (``skipped_corrupt``: bad bytes,
    bad JSON, missing fields; ``skipped_no_images``, ``skipped_too_few_images``,
    ``skipped_single_image``, ``skipped_small_image``, ``skipped_empty_text``) or dropping an image
    of a document (``images_missing``, ``images_corrupt``, ``images_small``,
    ``images_below_threshold``, ``images_unassigned``, ``images_over_max``, ``images_truncated``),
    plus ``shards_unreadable`` / ``shards_truncated`` (reads of damaged shards, once per epoch).
    :meth:`problems` names the damaged shards and counts corrupt samples over the whole run.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        processor,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        eos_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.processor = processor
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shards = expand_urls(spec.urls)
        tok = processor.tokenizer
        self.tokenizer = tok
        self.eos_token_id = eos_token_id if eos_token_id is not None else tok.eos_token_id
        self.pad_token_id = pad_token_id(tok, self.eos_token_id)
        self.media_token_id = processor.media_token_id
        self.eoc_token_id = processor.eoc_token_id
        specials = set(getattr(tok, "all_special_tokens", []) or [])
        if self.eos_token_id is not None:
            specials.add(tok.convert_ids_to_tokens(self.eos_token_id))
        self._special_tokens = sorted((s for s in specials if s), key=len, reverse=True)
        self.stats: Counter = Counter()
        self._warned = 0
        self._epoch = 0
        self._batches = 0
        self._consumed = 0
        self._replay_batches = 0
        self.shard_problems: dict[str, tuple[str, str]] = {}  # url -> (kind, reason), over the whole run
        self._corrupt_before = 0  # corrupt samples skipped before the loaded position

    # -- damaged data --------------------------------------------------------------------------
    def _on_shard_error(self, url: str, kind: str, reason: str) -> None:
        if self.shard_problems.get(url, (None,))[0] != kind:
            # every rank reads every shard: rank 0 tells
            log = logger.warning if self.rank == 0 else logger.debug
            log("%s data: skipping %s shard %s: %s", self.spec.kind, kind, url, reason)
        self.shard_problems[url] = (kind, reason)

    def problems(self) -> dict:
        """Damaged data so far (the whole run, resumes included): ``{"unreadable_shards": {url:
        reason}, "truncated_shards": {url: reason}, "corrupt_samples": n}`` (this rank's samples)."""
        return {
            "unreadable_shards": {u: r for u, (k, r) in sorted(self.shard_problems.items()) if k == UNREADABLE},
            "truncated_shards": {u: r for u, (k, r) in sorted(self.shard_problems.items()) if k == TRUNCATED},
            "corrupt_samples": self._corrupt_before + self.stats["skipped_corrupt"],
        }

    def _describe_problems(self) -> str:
        p = self.problems()
        parts = [f"{len(p[k])} {k.split('_')[0]} shard(s): " + "; ".join(f"{u} ({r})" for u, r in list(p[k].items())[:3])
                 for k in ("unreadable_shards", "truncated_shards") if p[k]]
        return ("; " + "; ".join(parts)) if parts else ""

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the last yielded batch: ``{"epoch", "batches", "consumed"}``, plus the
        damaged shards seen and corrupt samples skipped so far (``"shard_problems"``, ``"corrupt"``)."""
        extra = {"shard_problems": {u: list(v) for u, v in sorted(self.shard_problems.items())},
                 "corrupt": self.problems()["corrupt_samples"]}
        if self._replay_batches:  # loaded from a state without "consumed", not replayed yet
            return {"epoch": self._epoch, "batches": self._batches + self._replay_batches, "consumed": None, **extra}
        return {"epoch": self._epoch, "batches": self._batches, "consumed": self._consumed, **extra}

    def load_state_dict(self, state: dict) -> None:
        """Make the next ``iter()`` continue right after the batch the state was taken at."""
        epoch, batches = int(state["epoch"]), int(state.get("batches", 0))
        if epoch < 0 or batches < 0:
            raise ValueError(f"invalid data state {state!r}")
        consumed = state.get("consumed")
        for url, (kind, reason) in (state.get("shard_problems") or {}).items():
            self.shard_problems.setdefault(url, (kind, reason))
        # a replayed epoch (no "consumed") processes, and counts, its samples again
        replay = consumed is None and batches > 0
        self._corrupt_before = 0 if replay else int(state.get("corrupt") or 0) - self.stats["skipped_corrupt"]
        self._epoch = epoch
        if consumed is not None or batches == 0:
            self._batches, self._consumed, self._replay_batches = batches, int(consumed or 0), 0
        else:  # only a batch count: replay the epoch (decodes what it skips)
            self._batches, self._consumed, self._replay_batches = 0, 0, batches

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "ShardDataset yields the whole stream in each DataLoader worker; use num_workers <= 1"
            )
        while True:
            yield from self._iter_epoch(self._epoch)
            if self._batches == 0:  # nothing in this epoch (those before a resume point count)
                bs, ws, damaged = self.spec.batch_size, self.world_size, self._describe_problems()
                counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.stats.items() if v) or "no samples"
                advice = ("write the damaged shards again, or give other data" if damaged else
                          f"give it at least {bs} usable samples per process{f' ({bs * ws} in all)' if ws > 1 else ''}, "
                          "or a smaller batch_size")
                raise NoFullBatch(
                    f"{self.spec.kind} data {self._describe_shards()} gave no full batch of {bs} in epoch "
                    f"{self._epoch} (rank {self.rank}/{ws}: {counts}){damaged}; {advice}", damaged=bool(damaged))
            if self._replay_batches:
                logger.warning("the loaded data position %d batches into epoch %d is past the epoch's end (%d batches)",
                               self._batches + self._replay_batches, self._epoch, self._batches)
                self._replay_batches = 0
            self.stats["epochs"] += 1
            self._epoch += 1
            self._batches = 0
            self._consumed = 0

    def _describe_shards(self) -> str:
        names = self.shards[:3] + (["..."] if len(self.shards) > 3 else [])
        return f"{names} ({len(self.shards)} shards)"

    def _global_stream(self, epoch: int) -> Iterator[dict]:
        shards = list(self.shards)
        random.Random(self.seed + epoch).shuffle(shards)

        def raw():
            for url in shards:
                yield from iter_raw_samples(url, self.stats, self._on_shard_error)

        rng = random.Random(f"{self.seed}:{epoch}:samples")
        return shuffle_buffer(raw(), self.spec.resolved_shuffle_buffer, rng)

    def _iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        W, r = self.world_size, self.rank
        start = self._consumed
        pending: list[Sample] = []
        held: tuple[int, dict] | None = None  # this rank's sample, waiting for its group to be complete
        for g, raw in enumerate(self._global_stream(epoch)):
            if g < start:
                continue  # consumed before the saved position: not decoded
            q, pos = divmod(g - start, W)
            if pos == r:
                held = (g, raw)
            if pos != W - 1 or held is None:
                continue
            g_mine, raw_mine = held
            held = None
            sample = self._process(raw_mine, epoch, g_mine)
            if sample is None:
                continue
            pending.append(sample)
            if len(pending) < self.spec.batch_size:
                continue
            batch_samples, pending = pending, []
            self._consumed = start + (q + 1) * W
            if self._replay_batches:
                self._replay_batches -= 1
                self._batches += 1
                continue
            batch = self.collate(batch_samples)
            self._batches += 1
            self.stats["batches"] += 1
            yield batch

    # -- samples -------------------------------------------------------------------------------
    def _process(self, raw: dict, epoch: int, index: int) -> Sample | None:
        self.stats["raw_samples"] += 1
        try:
            if self.spec.kind == "pairs":
                sample = self._pair(raw, epoch, index)
            else:
                sample = self._interleaved(raw, epoch, index)
        except SkipSample as e:
            self.stats[e.reason] += 1
            if e.reason == "skipped_corrupt":
                self._warn(f"skipping corrupt sample {raw.get('__key__')!r} of {raw.get('__url__')}: {e.detail}")
            return None
        except Exception as e:  # data this code did not foresee: skip it rather than end the run
            self.stats["skipped_corrupt"] += 1
            self._warn(f"skipping sample {raw.get('__key__')!r} of {raw.get('__url__')} after an unexpected "
                       f"{type(e).__name__}: {e}")
            return None
        self.stats["samples"] += 1
        self.stats["images"] += len(sample.images)
        return sample

    def _warn(self, msg: str) -> None:
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            logger.warning(msg + (" (further ones are logged at DEBUG level)" if self._warned == _MAX_WARNINGS else ""))
        else:
            logger.debug(msg)

    def _rng(self, epoch: int, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{epoch}:{index}")

    def _image_tensor(self, image, rng: random.Random | None) -> torch.Tensor:
        x = self.processor.image_processor(image)
        if self.spec.hflip_prob > 0 and rng is not None and rng.random() < self.spec.hflip_prob:
            x = torch.flip(x, dims=[-1])
        return x

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, self.spec.resolved_max_tokens, self.eos_token_id)

    def _trainable(self, text: str, ids: list[int]) -> list[bool] | None:
        if not self.spec.loss_after:
            return None
        return prompt_token_mask(self.tokenizer, text, len(ids), self.spec.loss_after)

    def _pair(self, raw: dict, epoch: int, index: int) -> Sample:
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None or "txt" not in raw:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("skipped_corrupt", f"a pair needs an image ({'/'.join(IMAGE_EXTS)}) and txt, got {have}")
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSample("skipped_corrupt", f"caption is not UTF-8 ({e})") from None
        caption = clean_text(caption, self._special_tokens).strip()
        if not caption:
            raise SkipSample("skipped_empty_text")
        data = raw[ext]
        if len(data) < self.spec.min_image_bytes:
            raise SkipSample("skipped_small_image")
        text = pair_text(caption, self.spec.caption_prefix)
        ids = self._encode(text)
        if ids.count(self.media_token_id) != 1:
            raise SkipSample("skipped_no_images", "max_tokens cut the <image> token")
        try:
            image = decode_image(data)
            rng = self._rng(epoch, index) if self.spec.hflip_prob > 0 else None
            x = self._image_tensor(image, rng)
        except Exception as e:
            raise SkipSample("skipped_corrupt", str(e)) from None
        return Sample(ids, [x], self._trainable(text, ids))

    def _interleaved(self, raw: dict, epoch: int, index: int) -> Sample:
        spec = self.spec
        if "json" not in raw:
            have = sorted(k for k in raw if not k.startswith("__"))
            raise SkipSample("skipped_corrupt", f"an interleaved document needs a json member, got {have}")
        try:
            doc = json.loads(raw["json"])
            sentences = doc["text_list"]
            image_info = doc["image_info"]
            sim = np.asarray(doc["similarity_matrix"], dtype=np.float64)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise SkipSample("skipped_corrupt", f"bad document json ({type(e).__name__}: {e})") from None
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise SkipSample("skipped_corrupt", "text_list must be a list of strings")
        if not isinstance(image_info, list):
            raise SkipSample("skipped_corrupt", "image_info must be a list")
        if len(image_info) == 0:
            raise SkipSample("skipped_no_images")
        if sim.ndim != 2 or sim.shape != (len(image_info), len(sentences)):
            raise SkipSample(
                "skipped_corrupt",
                f"similarity_matrix has shape {sim.shape}, expected (images, sentences) = "
                f"({len(image_info)}, {len(sentences)})",
            )
        sentences = [clean_text(s, self._special_tokens) for s in sentences]

        data: dict[int, bytes] = {}
        for i, info in enumerate(image_info):
            b64 = info.get("image_base64") if isinstance(info, dict) else None
            if not b64 or not isinstance(b64, str):
                self.stats["images_missing"] += 1
                continue
            try:
                b = base64.b64decode(b64, validate=False)
            except (binascii.Error, ValueError):
                self.stats["images_corrupt"] += 1
                continue
            if len(b) < spec.min_image_bytes:
                self.stats["images_small"] += 1
                continue
            data[i] = b

        rng = self._rng(epoch, index) if (spec.hflip_prob > 0 or spec.single_image_keep_prob < 1) else None
        bad: set[int] = set()
        decoded: dict[int, object] = {}
        while True:
            available = [i in data and i not in bad for i in range(len(image_info))]
            plan = plan_interleaved(
                sentences, sim, available, threshold=spec.similarity_threshold, max_images=spec.max_images,
                separator=spec.chunk_separator,
            )
            ids = self._encode(plan.text)
            # a trailing <image> has no text to caption: drop it with its image
            while ids and ids[-1] == self.media_token_id:
                ids.pop()
            n = ids.count(self.media_token_id)
            order = plan.images[:n]
            failed = False
            for i in order:
                if i in decoded:
                    continue
                try:
                    decoded[i] = decode_image(data[i])
                except ValueError:
                    bad.add(i)
                    failed = True
                    break
            if not failed:
                break
        self.stats.update(plan.dropped)
        self.stats["images_corrupt"] += len(bad)
        self.stats["images_truncated"] += len(plan.images) - n
        if n == 0:
            raise SkipSample("skipped_no_images")
        if n < spec.min_images:
            raise SkipSample("skipped_too_few_images")
        if n == 1 and spec.single_image_keep_prob < 1 and rng.random() >= spec.single_image_keep_prob:
            raise SkipSample("skipped_single_image")
        try:
            images = [self._image_tensor(decoded[i], rng) for i in order]
        except Exception as e:
            raise SkipSample("skipped_corrupt", str(e)) from None
        return Sample(ids, images, self._trainable(plan.text, ids))

    # -- batches -------------------------------------------------------------------------------
    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        size = getattr(self.processor.image_processor, "image_size", 224)
        return collate(samples, pad_token_id=self.pad_token_id, media_token_id=self.media_token_id,
                       eoc_token_id=self.eoc_token_id, eos_token_id=self.eos_token_id,
                       empty_image_shape=(3, size, size))

    def __repr__(self) -> str:
        return (
            f"ShardDataset(kind={self.spec.kind!r}, shards={len(self.shards)}, batch_size={self.spec.batch_size}, "
            f"rank={self.rank}/{self.world_size}, seed={self.seed}, position={self.state_dict()})"
        )


def build_datasets(
    specs: list[DatasetSpec],
    processor,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    eos_token_id: int | None = None,
) -> list[ShardDataset]:
    """One :class:`ShardDataset` per spec, all with the same seed and rank split."""
    return [
        ShardDataset(spec, processor, seed=seed, rank=rank, world_size=world_size, eos_token_id=eos_token_id)
        for spec in specs
    ]

