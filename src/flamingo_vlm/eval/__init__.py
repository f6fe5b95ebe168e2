"""Few-shot evaluation of Flamingo models with OpenFlamingo's protocol (see README.md here).

Public API::

    from flamingo_vlm.eval import EvalConfig, evaluate
    evaluate("path/to/model", EvalConfig(tasks=["coco", "vqav2"], data_root="data", shots=[0, 4]))

Datasets: :class:`CaptionDataset`, :class:`VQADataset`, :class:`HatefulMemesDataset`,
:class:`ImageNetDataset`. Metrics: :func:`caption_metrics`, :func:`vqa_accuracy`,
:func:`okvqa_stem`, :func:`roc_auc`. Synthetic data: :mod:`flamingo_vlm.synthetic`.
Tasks: :data:`TASKS` by dataset name, :func:`register_task` (the kinds: :mod:`flamingo_vlm.eval.task_kinds`).
"""

from .datasets import (
    CaptionDataset,
    DatasetLayoutError,
    EvalDataset,
    HatefulMemesDataset,
    ImageNetDataset,
    VQADataset,
)
from .demos import RICES, FeatureExtractor, RandomDemoSelector
from .distributed import init_distributed, shard_indices
from .evaluator import EvalConfig, Evaluator, continuation_ids, evaluate
from .metrics import (
    caption_metrics,
    normalize_vqa_answer,
    okvqa_stem,
    ptb_tokenize,
    roc_auc,
    topk_accuracy,
    vqa_accuracy,
    vqa_score,
)
from .tasks import TASKS, Task, get_task, register_task

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
