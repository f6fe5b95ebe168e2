"""The evaluation tasks: where each dataset lives under ``--data-root``, its splits, prompt,
decoding budget and metric."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import CaptionDataset, DatasetLayoutError, EvalDataset, HatefulMemesDataset, ImageNetDataset, VQADataset

__all__ = ["TASKS", "TaskSpec", "get_task", "resolve_task_root"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "captioning" | "vqa" | "classification"
    metric: str  # the headline metric key
    folders: tuple[str, ...]  # candidate folder names under --data-root
    demo_split: str
    eval_split: str
    load: Callable[[Path, str], EvalDataset]
    max_new_tokens: int | None = None  # generation tasks
    description: str = ""
    extra: dict = field(default_factory=dict)


def _caption(dataset):
    return lambda root, split: CaptionDataset.from_root(root, split, dataset=dataset)


def _vqa(dataset):
    return lambda root, split: VQADataset.from_root(root, split, dataset=dataset)


TASKS: dict[str, TaskSpec] = {
    "coco": TaskSpec("coco", "captioning", "CIDEr", ("mscoco_karpathy", "coco", "mscoco"), "train", "test",
                     _caption("coco"), 20, "COCO captions, Karpathy test split"),
    "flickr30k": TaskSpec("flickr30k", "captioning", "CIDEr", ("flickr30k", "flickr"), "train", "test",
                          _caption("flickr30k"), 20, "Flickr30K captions, Karpathy test split"),
    "vqav2": TaskSpec("vqav2", "vqa", "accuracy", ("vqav2",), "train", "val", _vqa("vqav2"), 5, "VQAv2 val"),
    "ok_vqa": TaskSpec("ok_vqa", "vqa", "accuracy", ("okvqa", "ok_vqa"), "train", "val", _vqa("ok_vqa"), 5,
                       "OK-VQA val (answers stemmed)"),
    "textvqa": TaskSpec("textvqa", "vqa", "accuracy", ("textvqa",), "train", "val", _vqa("textvqa"), 10, "TextVQA val"),
    "vizwiz": TaskSpec("vizwiz", "vqa", "accuracy", ("vizwiz",), "train", "val", _vqa("vizwiz"), 5, "VizWiz val"),
    "hateful_memes": TaskSpec("hateful_memes", "classification", "roc_auc", ("hateful_memes", "hatefulmemes"),
                              "train", "dev", lambda root, split: HatefulMemesDataset.from_root(root, split),
                              None, "Hateful Memes dev (ROC-AUC of p(yes))"),
    "imagenet": TaskSpec("imagenet", "classification", "top1", ("imagenet", "ILSVRC2012", "imagenet1k"), "train", "val",
                         lambda root, split: ImageNetDataset.from_root(root, split), None, "ImageNet-1k val"),
}
TASK_ALIASES = {"flickr": "flickr30k", "okvqa": "ok_vqa", "hm": "hateful_memes", "hatefulmemes": "hateful_memes",
                "vqa": "vqav2", "mscoco": "coco"}


def get_task(name: str) -> TaskSpec:
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[key]


def resolve_task_root(spec: TaskSpec, data_root: str | os.PathLike, overrides: dict[str, str] | None = None) -> Path:
    """The task's folder: an explicit override, else the first of its usual names under data_root."""
    if overrides and spec.name in overrides:
        return Path(overrides[spec.name])
    root = Path(data_root)
    for name in spec.folders:
        if (root / name).is_dir():
            return root / name
    raise DatasetLayoutError(
        f"no folder for task {spec.name!r} under {root} (tried {', '.join(spec.folders)}); "
        f"pass --task-root {spec.name}=PATH"
    )
