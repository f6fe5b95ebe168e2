"""Few-shot evaluation of Flamingo models with OpenFlamingo's protocol (see README.md here).

Public API::

    from flamingo_vlm.eval import EvalConfig, evaluate
    evaluate("path/to/model", EvalConfig(tasks=["coco", "vqav2"], data_root="data", shots=[0, 4]))

Datasets: :class:`CaptionDataset`, :class:`VQADataset`, :class:`HatefulMemesDataset`,
:class:`ImageNetDataset`. Metrics: :func:`caption_metrics`, :func:`vqa_accuracy`,
:func:`okvqa_stem`, :func:`roc_auc`. Synthetic data: :mod:`flamingo_vlm.synthetic`.
Tasks: :data:`TASKS` by dataset name, :func:`register_task` (the kinds: :mod:`flamingo_vlm.eval.task_kinds`).
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = [
    "CaptionDataset",
    "DatasetLayoutError",
    "EvalConfig",
    "EvalDataset",
    "Evaluator",
    "FeatureExtractor",
    "HatefulMemesDataset",
    "ImageNetDataset",
    "RICES",
    "RandomDemoSelector",
    "TASKS",
    "Task",
    "VQADataset",
    "caption_metrics",
    "continuation_ids",
    "evaluate",
    "get_task",
    "register_task",
    "init_distributed",
    "normalize_vqa_answer",
    "okvqa_stem",
    "ptb_tokenize",
    "roc_auc",
    "shard_indices",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_score",
]

_LAZY = {
    "CaptionDataset": ".datasets",
    "DatasetLayoutError": ".datasets",
    "EvalDataset": ".datasets",
    "HatefulMemesDataset": ".datasets",
    "ImageNetDataset": ".datasets",
    "VQADataset": ".datasets",
    "RICES": ".demos",
    "FeatureExtractor": ".demos",
    "RandomDemoSelector": ".demos",
    "init_distributed": ".distributed",
    "shard_indices": ".distributed",
    "EvalConfig": ".evaluator",
    "Evaluator": ".evaluator",
    "continuation_ids": ".evaluator",
    "evaluate": ".evaluator",
    "caption_metrics": ".metrics",
    "normalize_vqa_answer": ".metrics",
    "okvqa_stem": ".metrics",
    "ptb_tokenize": ".metrics",
    "roc_auc": ".metrics",
    "topk_accuracy": ".metrics",
    "vqa_accuracy": ".metrics",
    "vqa_score": ".metrics",
    "TASKS": ".tasks",
    "Task": ".tasks",
    "get_task": ".tasks",
    "register_task": ".tasks",
}

# Loaded on first use: see flamingo_vlm.lazy.
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
