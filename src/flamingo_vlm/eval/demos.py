"""Choosing in-context demonstrations: random from a query set, or by RICES.

* Random (the paper's default): a query set of ``query_set_size`` (2048) training examples is
  drawn once per trial seed; each evaluated sample gets ``k`` distinct demos drawn from it with a
  generator seeded by ``(trial seed, sample index)``, so the demos of a sample do not depend on
  the batch size, the number of processes or which samples were evaluated before.
* RICES (Retrieval-based In-Context Example Selection): the ``k`` training examples whose image
  features are most cosine-similar to the query's, **most similar last** (closest to the query).
  Features come from the model's own vision encoder (``encode_image``, i.e. open_clip's pooled and
  projected embedding, when it has one; otherwise the mean of its output tokens) or from another
  encoder, and are cached on disk per dataset split and encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_file
from .datasets import EvalDataset

__all__ = ["FeatureExtractor", "RICES", "RandomDemoSelector", "encoder_fingerprint", "query_set_indices",
           "weights_fingerprint"]


def query_set_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The training indices of the query set: ``size`` distinct ones drawn with ``seed`` (all of
    them, in order, when the split is not larger than ``size``)."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, size, replace=False)


class RandomDemoSelector:
    def __init__(self, train: EvalDataset, query_set_size: int, seed: int):
        self.train = train
        self.seed = seed
        self.pool = query_set_indices(len(train), query_set_size, seed)

    def select(self, sample_index: int, k: int) -> list[int]:
        """Training indices of ``k`` distinct random demos for eval sample ``sample_index``."""
        if k > len(self.pool):
            raise ValueError(f"asked for {k} demos but the query set holds {len(self.pool)} examples")
        rng = np.random.default_rng([self.seed, int(sample_index)])
        return [int(self.pool[i]) for i in rng.choice(len(self.pool), k, replace=False)]


def encoder_fingerprint(encoder: nn.Module, extra: str = "") -> str:
    """A short id of an encoder's architecture and weights (shapes of all parameters plus a sample
    of values from a few of them), to key cached features."""
    h = hashlib.sha1(type(encoder).__name__.encode())
    h.update(extra.encode())
    params = list(encoder.state_dict().items())
    for name, t in params:
        h.update(f"{name}:{tuple(t.shape)};".encode())
    for _, t in params[:2] + params[-2:]:
        flat = t.detach().flatten()
        h.update(flat[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A short id of a model's weights, so that the results of another model saved at the same path
    (a run resumed and exported again, a folder overwritten) are not taken for this one's: every
    tensor by its name, shape and dtype, and its values, in full up to 1M per trained weight
    (``requires_grad``: what ``save_pretrained`` writes) and 4096 per other tensor (a merged LoRA
    changes every entry), else at an even stride (training changes every value; the hash of a
    9B model's ~1.4B trained weights stays a few hundred MB read)."""
    if not isinstance(model, nn.Module):  # (a stand-in object that answers like a model)
        return type(model).__name__
    h = hashlib.sha1()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        data = t.detach().reshape(-1)
        budget = 1 << 20 if isinstance(t, nn.Parameter) and t.requires_grad else 4096
        data = data[:: -(-data.numel() // budget)] if data.numel() > budget else data
        h.update(data.contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class FeatureExtractor:
    """Images -> L2-normalised feature vectors (float32, CPU) with a vision encoder.

    ``encode_image`` is used when the encoder has it (and it works: an open_clip ViT built without
    a projection has none); otherwise the encoder's output tokens are mean-pooled.
    """

    def __init__(self, encoder: nn.Module, preprocess: Callable, device: torch.device | str = "cpu", *, name: str = ""):
        self.encoder = encoder
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.mode = "encode_image" if self._has_projection(encoder) else "mean_tokens"
        self.fingerprint = encoder_fingerprint(encoder, f"{name}|{self.mode}")

    @staticmethod
    def _has_projection(encoder: nn.Module) -> bool:
        if not hasattr(encoder, "encode_image"):
            return False
        return getattr(encoder, "proj", True) is not None

    @torch.no_grad()
    def __call__(self, images: Sequence) -> torch.Tensor:
        if not len(images):
            raise ValueError("no images to encode")
        pixels = torch.stack([im if isinstance(im, torch.Tensor) else self.preprocess(im) for im in images])
        param = next(self.encoder.parameters(), None)
        pixels = pixels.to(self.device, dtype=param.dtype if param is not None else torch.float32)
        if self.mode == "encode_image":
            feats = self.encoder.encode_image(pixels)
        else:
            out = self.encoder(pixels)
            feats = out.mean(dim=1) if out.ndim == 3 else out.flatten(1)
        feats = feats.float()
        return (feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()


class RICES:
    """Nearest training examples by image-feature cosine similarity."""

    def __init__(self, features: torch.Tensor, ids: Sequence | None = None):
        if features.ndim != 2:
            raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
        self.features = features.float()
        self.ids = list(ids) if ids is not None else None

    def select(self, query_features: torch.Tensor, k: int) -> list[list[int]]:
        """For each query row, the indices of the ``k`` most similar examples, most similar last."""
        if k > self.features.shape[0]:
            raise ValueError(f"asked for {k} demos but the RICES pool holds {self.features.shape[0]} examples")
        if k == 0:
            return [[] for _ in range(query_features.shape[0])]
        sims = query_features.float().cpu() @ self.features.T  # both on CPU: no device mismatch
        top = sims.topk(k, dim=-1).indices  # most similar first
        return [list(reversed(row)) for row in top.tolist()]

    @classmethod
    def build(
        cls,
        dataset: EvalDataset,
        extractor: FeatureExtractor,
        *,
        cache_path: str | os.PathLike | None = None,
        batch_size: int = 64,
        load_image: Callable | None = None,
        ctx=None,
        progress: bool = False,
    ) -> "RICES":
        """Features of every sample of ``dataset`` (shared among ``ctx``'s ranks, each encoding a
        strided share), read from / written to ``cache_path`` when given. Each image is encoded once:
        VQA splits ask several questions per image (VQAv2 train: 443,757 questions on 82,783 images),
        and every question's sample encoded its image again (as OpenFlamingo's RICES did)."""
        from .distributed import shard_indices

        ids = [s["id"] for s in dataset]
        cache = Path(cache_path) if cache_path else None
        is_main = ctx is None or ctx.is_main
        cached = None
        if is_main and cache is not None and cache.is_file():
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if json.loads(blob["ids"]) == json.loads(json.dumps(ids)) and blob["fingerprint"] == extractor.fingerprint:
                cached = blob["features"]
        if ctx is not None:
            cached = ctx.broadcast(cached)  # every rank takes the same path (collectives below)
        if cached is not None:
            return cls(cached, ids)
        load_image = load_image or dataset.load_image
        first: dict[str, int] = {}  # image -> its first sample; each image is encoded once, for that sample
        of_image = [first.setdefault(str(s["image"]), i) for i, s in enumerate(dataset)]
        unique = list(first.values())
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        mine = [unique[j] for j in shard_indices(len(unique), rank, world)]
        feats = []
        batches = range(0, len(mine), batch_size)
        if progress and is_main:
            from ..progress import progress as tqdm

            batches = tqdm(batches, desc=f"RICES features {dataset.name} {dataset.split}", unit="batch")
        for start in batches:
            chunk = mine[start : start + batch_size]
            feats.append(extractor([load_image(dataset[i]) for i in chunk]))
        local = torch.cat(feats) if feats else torch.zeros(0, 0)
        parts = ctx.gather((mine, local)) if ctx is not None else [(mine, local)]
        dim = max(p[1].shape[1] for p in parts if p[1].numel())
        features = torch.zeros(len(dataset), dim)
        for idx, f in parts:
            if len(idx):
                features[torch.as_tensor(idx)] = f
        features = features[torch.as_tensor(of_image)]  # every sample of an image gets its features
        if cache is not None and is_main:
            with atomic_file(cache) as tmp:
                torch.save({"ids": json.dumps(ids), "fingerprint": extractor.fingerprint, "features": features}, tmp)
        return cls(features, ids)
