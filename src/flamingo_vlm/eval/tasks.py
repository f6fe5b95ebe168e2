"""The evaluation tasks by dataset name: where each dataset lives under ``--data-root``, its splits,
its kind (which brings its prompt, decoding, post-processing and metric; see :mod:`.task_kinds`)
and its generation budget.

Adding a dataset of an existing kind is one entry in :data:`TASKS` (or a call to
:func:`register_task`); a dataset that needs its own prompt or metric is one subclass of a kind.
"""

from __future__ import annotations

import os
from pathlib import Path

from .datasets import DatasetLayoutError
from .task_kinds import CaptioningTask, ClassificationTask, HatefulMemesTask, IclTask, OKVQATask, Task, VQATask

__all__ = ["TASKS", "TASK_ALIASES", "Task", "check_task_files", "extra_metrics", "get_task", "given_by", "own_demos_error",
           "register_task", "resolve_task_root"]

TASKS: dict[str, Task] = {}
TASK_ALIASES: dict[str, str] = {}


def register_task(task: Task, aliases: tuple[str, ...] = ()) -> Task:
    """Add ``task`` to the table under its name (and ``aliases``), replacing one of that name."""
    TASKS[task.name] = task
    TASK_ALIASES.update({a: task.name for a in aliases})
    return task


for _task, _aliases in (
    (CaptioningTask("coco", ("mscoco_karpathy", "coco", "mscoco"), "COCO captions, Karpathy test split",
                    eval_split="test", max_new_tokens=20), ("mscoco",)),
    (CaptioningTask("flickr30k", ("flickr30k", "flickr"), "Flickr30K captions, Karpathy test split",
                    eval_split="test", max_new_tokens=20), ("flickr",)),
    (VQATask("vqav2", ("vqav2",), "VQAv2 val", max_new_tokens=5), ("vqa",)),
    (OKVQATask("ok_vqa", ("okvqa", "ok_vqa"), "OK-VQA val (answers stemmed)", max_new_tokens=5), ("okvqa",)),
    (VQATask("textvqa", ("textvqa",), "TextVQA val", max_new_tokens=10), ()),
    (VQATask("vizwiz", ("vizwiz",), "VizWiz val", max_new_tokens=5), ()),
    (HatefulMemesTask("hateful_memes", ("hateful_memes", "hatefulmemes"), "Hateful Memes dev (ROC-AUC of p(yes))",
                      eval_split="dev"), ("hm", "hatefulmemes")),
    (ClassificationTask("imagenet", ("imagenet", "ILSVRC2012", "imagenet1k"), "ImageNet-1k val"), ()),
    (IclTask("synthetic_icl", ("synthetic_icl",), "synthetic in-context episodes, held-out phrasings/answer maps/"
             "framings/styles", demo_split="heldout", eval_split="heldout", max_new_tokens=12), ("icl",)),
):
    register_task(_task, _aliases)


def get_task(name: str) -> Task:
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[key]


def extra_metrics() -> dict[str, list[str]]:
    """Per task, the metrics ``results.md`` shows beside the headline one."""
    return {name: list(t.extra_metrics) for name, t in TASKS.items() if t.extra_metrics}


def resolve_task_root(spec: Task, data_root: str | os.PathLike, overrides: dict[str, str] | None = None) -> Path:
    """The task's folder: an explicit override, else the first of its usual names under data_root."""
    if overrides and spec.name in overrides:
        return Path(overrides[spec.name])
    root = Path(data_root)
    for name in spec.folders:
        if (root / name).is_dir():
            return root / name
    if not root.is_dir():  # (it said "no folder for task 'coco' under X", as if X held other things)
        raise DatasetLayoutError(f"--data-root {root} " + ("is a file, not a folder" if root.exists() else "does not exist")
                                 + f": give the folder that holds the task folders ({', '.join(spec.folders)}, ...)")
    raise DatasetLayoutError(
        f"no folder for task {spec.name!r} under {root} (tried {', '.join(spec.folders)}); "
        f"pass --task-root {spec.name}=PATH"
    )


def own_demos_error(spec: Task, shots: int, root: Path, available: int) -> ValueError:
    """The one-line refusal of ``shots`` for a task whose queries bring ``available`` demonstrations each."""
    return ValueError(f"{spec.name}: --shots {shots} needs {shots} demonstrations per query, but the queries in "
                      f"{root} bring {available}; use --shots up to {available}")


def _check_readable(path: Path | None) -> None:
    """A file that cannot be opened, or a folder that cannot be listed (no permission, ...):
    :class:`~.datasets.DatasetLayoutError` naming it. Opens, reads nothing (no image is decoded)."""
    if path is None:
        return
    try:
        if path.is_dir():
            with os.scandir(path):
                pass
        else:
            open(path, "rb").close()
    except OSError as e:
        what = "folder" if path.is_dir() else "file"
        fix = "; fix its permissions" if isinstance(e, PermissionError) else ""
        raise DatasetLayoutError(f"cannot read the {what} {path} ({e.strerror or e}){fix}") from None


def check_task_files(spec: Task, data_root: str | os.PathLike, overrides: dict[str, str] | None = None) -> Path:
    """The task's folder (:func:`resolve_task_root`), once every file its demo and evaluation splits
    need is there and can be opened (:meth:`Task.check_files`: no data is read, no image decoded).
    Run for every task before the model loads, before any task's files are read: a missing
    annotation file was said only when its task came up, after the model had loaded and the tasks
    before it had run. The error names the file and the flag that gave its folder."""
    root = resolve_task_root(spec, data_root, overrides)
    for split in dict.fromkeys((spec.demo_split, spec.eval_split)):
        try:
            for path in spec.check_files(root, split) or ():
                _check_readable(path)
        except DatasetLayoutError as e:
            raise DatasetLayoutError(f"{e} (the folder {root} is from {given_by(spec, root, data_root, overrides)})") from None
    return root


def given_by(spec: Task, root: Path, data_root: str | os.PathLike, overrides: dict[str, str] | None = None) -> str:
    """Which flag gave the task's folder ``root`` (for messages)."""
    if overrides and spec.name in overrides:
        return f"--task-root {spec.name}={root}"
    return f"--data-root {data_root}; another folder: --task-root {spec.name}=PATH"
