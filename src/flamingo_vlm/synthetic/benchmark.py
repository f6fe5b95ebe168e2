"""The synthetic evaluation benchmark, written in the standard dataset layouts.

:func:`write_synthetic_benchmark` writes captioning (COCO Karpathy layout, optionally Flickr30K),
VQA (VQAv2 layout) and classification (ImageNet class-folder layout) datasets from the scenes of a
:class:`~flamingo_vlm.synthetic.scenes.SceneGenerator`, so the ordinary loaders of
:mod:`flamingo_vlm.eval.datasets` read them and ``flamingo-vlm evaluate --data-root DIR`` runs on
them unchanged. Training examples (few-shot demonstrations) come from the ``train`` splits, which
never show a held-out (shape, color) pair; each task folder's ``held_out.json`` lists the
evaluation ids that show one. ``synthetic_icl`` writes the folder of that name: ``n_test`` held-out
in-context episodes (:func:`~flamingo_vlm.synthetic.icl.write_icl_benchmark`), each with its own
demonstrations. Command line: ``flamingo-vlm data synthetic-benchmark OUT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .icl import write_icl_benchmark
from .scenes import SPLIT_IDS, SceneGenerator

__all__ = ["BENCHMARK_TASKS", "write_synthetic_benchmark"]

BENCHMARK_TASKS = ("coco", "flickr30k", "vqav2", "imagenet", "synthetic_icl")
#: The ``generator`` recorded in ``synthetic.json``: the module that wrote version 1 of this format.
#: Kept at the old module path (the code now lives in ``flamingo_vlm.synthetic``) so that data
#: written by this version stays byte-identical to data written before the move.
_FORMAT_NAME = "flamingo_vlm.eval.synthetic"


def _save(im: Image.Image, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=quality, subsampling=0)
    else:
        im.save(path)


_DEFAULT_ENCODING = {"questions_per_image": 3, "jpeg_quality": 95}  # write_synthetic_benchmark's defaults


def write_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    tasks: Sequence[str] = ("coco", "vqav2", "imagenet"),
    n_train: int = 256,
    n_val: int = 32,
    n_test: int = 64,
    n_class_train_per_class: int = 8,
    n_class_val_per_class: int = 4,
    questions_per_image: int = 3,
    image_size: int = 128,
    jpeg_quality: int = 95,
    generator: SceneGenerator | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic benchmark under ``root`` in the standard layouts; returns
    ``{task: folder}``. ``root/synthetic.json`` records the settings and the held-out pairs, and
    each task folder a ``held_out.json`` listing the evaluation ids that show a held-out pair."""
    root = Path(root)
    gen = generator or SceneGenerator(seed=seed)
    bad = set(tasks) - set(BENCHMARK_TASKS)
    if bad:
        raise ValueError(f"synthetic tasks must be among {BENCHMARK_TASKS}, got {sorted(bad)}")
    out: dict[str, Path] = {}
    folders = {"coco": "mscoco_karpathy", "flickr30k": "flickr30k", "vqav2": "vqav2", "imagenet": "imagenet",
               "synthetic_icl": "synthetic_icl"}
    for task in tasks:
        folder = root / folders[task]
        if task == "synthetic_icl":  # held-out in-context episodes, n_test of them (see flamingo_vlm.synthetic.icl)
            out[task] = write_icl_benchmark(folder, n_episodes=n_test, generator=gen, image_size=image_size,
                                            jpeg_quality=jpeg_quality, overwrite=overwrite)
            continue
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        # written to a temporary folder, then renamed (as write_icl_benchmark does): an interrupted write left a
        # folder without some of its files, which `evaluate --synthetic` then took for written
        from ..files import atomic_directory  # (here: files imports torch, which the CLI's parser must not)

        # (modes as mkdir gives them: mkdtemp's 0700 locked other users out of a shared benchmark)
        with atomic_directory(folder) as tmp:
            if task in ("coco", "flickr30k"):
                _write_captioning(tmp, gen, task, n_train, n_val, n_test, image_size, jpeg_quality)
            elif task == "vqav2":
                _write_vqa(tmp, gen, n_train, n_val + n_test, questions_per_image, image_size, jpeg_quality)
            else:
                _write_classification(tmp, gen, n_class_train_per_class, n_class_val_per_class, image_size, jpeg_quality)
        out[task] = folder
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test,
             "n_class_train_per_class": n_class_train_per_class, "n_class_val_per_class": n_class_val_per_class}
    # the task folders, relative to root (they were relative to the writer's working directory); the
    # tasks written before with the same settings stay listed (the file held only the last ones written)
    tasks_written = {t: p.name for t, p in out.items()}
    try:
        before = json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError):
        before = {}
    encoding = {"questions_per_image": questions_per_image, "jpeg_quality": jpeg_quality}
    if (isinstance(before, dict) and before.get("seed") == gen.seed and before.get("image_size") == image_size
            and before.get("sizes") == sizes and isinstance(before.get("tasks"), dict)
            # (not recorded before: files without them were written with the defaults)
            and all(before.get(k, _DEFAULT_ENCODING[k]) == v for k, v in encoding.items())):
        tasks_written = {t: Path(p).name for t, p in before["tasks"].items()
                         if t in folders and (root / folders[t]).is_dir()} | tasks_written
    meta = {
        "generator": _FORMAT_NAME, "version": 1, "seed": gen.seed, "image_size": image_size,
        "held_out_pairs": sorted([list(p) for p in gen.held_out_pairs]), "tasks": tasks_written, "sizes": sizes,
        **encoding,
    }
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1))
    return out


def _caption_entry(gen, scene, split, index, cocoid, filepath, filename, sent_start):
    sentences = scene.captions(5)
    return {
        "filepath": filepath, "filename": filename, "imgid": index, "split": split, "cocoid": cocoid,
        "sentids": list(range(sent_start, sent_start + len(sentences))),
        "sentences": [{"tokens": s.rstrip(".").replace(",", "").replace(":", "").split(), "raw": s, "imgid": index,
                       "sentid": sent_start + j} for j, s in enumerate(sentences)],
    }


def _write_captioning(folder: Path, gen: SceneGenerator, task: str, n_train, n_val, n_test, size, quality):
    images, held, sent = [], [], 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            scene = gen.scene(i, split)
            index = len(images)
            if task == "coco":
                coco_split = "train2014" if split == "train" else "val2014"
                cocoid = 1 + SPLIT_IDS[split] * 1_000_000 + i
                filename = f"COCO_{coco_split}_{cocoid:012d}.jpg"
                _save(scene.render(size), folder / coco_split / filename, quality)
                entry = _caption_entry(gen, scene, split, index, cocoid, coco_split, filename, sent)
            else:
                filename = f"{1_000_000 * (1 + SPLIT_IDS[split]) + i}.jpg"
                _save(scene.render(size), folder / "flickr30k-images" / filename, quality)
                entry = _caption_entry(gen, scene, split, index, None, None, filename, sent)
                del entry["cocoid"], entry["filepath"]
            sent += len(entry["sentences"])
            images.append(entry)
            if split != "train" and gen.is_held_out(scene):
                held.append(entry.get("cocoid", Path(filename).stem))
    name = "dataset_coco.json" if task == "coco" else "dataset_flickr30k.json"
    (folder / name).write_text(json.dumps({"images": images, "dataset": task}))
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))


def _write_vqa(folder: Path, gen: SceneGenerator, n_train, n_eval, per_image, size, quality):
    held = []
    for vqa_split, scene_split, n in (("train", "train", n_train), ("val", "test", n_eval)):
        coco_split = f"{vqa_split}2014"
        questions, annotations = [], []
        for i in range(n):
            scene = gen.scene(i, scene_split)
            image_id = 1 + SPLIT_IDS[scene_split] * 1_000_000 + i
            _save(scene.render(size), folder / coco_split / f"COCO_{coco_split}_{image_id:012d}.jpg", quality)
            for j, q in enumerate(scene.questions(per_image)):
                qid = image_id * 10 + j
                questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": q["question_type"],
                    "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(q["answers"])],
                })
                if vqa_split == "val" and gen.is_held_out(scene):
                    held.append(qid)
        common = {"info": {"description": "flamingo-vlm synthetic VQA"}, "license": {}, "data_subtype": coco_split}
        (folder / f"v2_OpenEnded_mscoco_{coco_split}_questions.json").write_text(json.dumps(
            {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
        (folder / f"v2_mscoco_{coco_split}_annotations.json").write_text(json.dumps(
            {**common, "data_type": "mscoco", "annotations": annotations}))
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))


def _write_classification(folder: Path, gen: SceneGenerator, per_class_train, per_class_val, size, quality):
    classes = gen.classes()
    wnids = {name: f"n{90000000 + k:08d}" for k, name in enumerate(classes)}
    (folder / "classnames.txt").write_text("".join(f"{wnids[c]} {c}\n" for c in classes))
    held = []
    counter = 0
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        scene_split = "class_train" if split == "train" else "class_val"
        for name in classes:
            color, shape = name.split(" ", 1)
            if split == "train" and (shape, color) in gen.held_out_pairs:
                continue
            for i in range(per_class):
                scene = gen.class_scene(counter, scene_split, label=name)
                counter += 1
                fname = f"{wnids[name]}_{i:05d}.JPEG"
                _save(scene.render(size), folder / split / wnids[name] / fname, quality)
                if split == "val" and (shape, color) in gen.held_out_pairs:
                    held.append(f"{wnids[name]}/{fname}")
    (folder / "held_out.json").write_text(json.dumps({"held_out_ids": held}))
