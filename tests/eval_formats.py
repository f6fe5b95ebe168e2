"""Tiny evaluation datasets in the layouts and file formats the datasets are published in (Karpathy
split JSON, VQA questions/annotations JSON, Hateful Memes JSON lines, ImageNet class folders), a
few 8x8 images each: enough for every task's train and evaluation split at 0 and 2 shots."""

import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}


def _img(path: Path, n: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), list(COLORS.values())[n % 3]).save(path, fmt)


def _karpathy(root: Path, name: str, images: list[tuple[str, str, str, int | None]]) -> None:
    """``images``: (split, image folder, filename, cocoid: None for Flickr30K, whose entries have no filepath)."""
    entries = []
    for n, (split, filepath, filename, cocoid) in enumerate(images):
        _img(root / filepath / filename, n)
        color = list(COLORS)[n % 3]
        entry = {"split": split, "filename": filename, "imgid": n,
                 "sentences": [{"raw": f"A {color} square.", "tokens": ["a", color, "square"]},
                               {"raw": f"a picture in {color}", "tokens": ["a", "picture", "in", color]}]}
        if cocoid is not None:
            entry.update(filepath=filepath, cocoid=cocoid)
        entries.append(entry)
    (root / name).write_text(json.dumps({"images": entries, "dataset": name.split("_")[1].split(".")[0]}))


def _vqa(root: Path, questions: str, annotations: str, subtype: str, image_ids: list, image_path, *,
         answer_ids: bool = True) -> None:
    qs, anns = [], []
    for n, image_id in enumerate(image_ids):
        _img(root / image_path(image_id), n)
        qid = 100 * (n + 1) + len(subtype)
        qs.append({"image_id": image_id, "question": "What color is it?", "question_id": qid})
        answers = [list(COLORS)[n % 3]] * 8 + ["dark", "two"]
        anns.append({"question_id": qid, "image_id": image_id, "question_type": "what color is the",
                     "answer_type": "other", "multiple_choice_answer": answers[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", **({"answer_id": i + 1} if answer_ids else {})}
                                 for i, a in enumerate(answers)]})
    (root / questions).write_text(json.dumps({"task_type": "Open-Ended", "data_type": "mscoco",
                                              "data_subtype": subtype, "questions": qs}))
    (root / annotations).write_text(json.dumps({"data_subtype": subtype, "annotations": anns}))


def write_eval_datasets(data: Path) -> Path:
    """Every task's folder under ``data`` (except ``synthetic_icl``), as each dataset is published."""
    _karpathy(data / "mscoco_karpathy", "dataset_coco.json",
              [("train", "train2014", f"COCO_train2014_{n:012d}.jpg", n) for n in (1, 2, 3)]
              + [("restval", "val2014", "COCO_val2014_000000000004.jpg", 4)]
              + [("test", "val2014", f"COCO_val2014_{n:012d}.jpg", n) for n in (5, 6)])
    _karpathy(data / "flickr30k", "dataset_flickr30k.json",
              [(split, "flickr30k-images", f"{n}.jpg", None) for split, n in
               (("train", 1001), ("train", 1002), ("train", 1003), ("test", 2001), ("test", 2002))])
    for split, ids in (("train", [1, 2, 3]), ("val", [7, 8])):
        _vqa(data / "vqav2", f"v2_OpenEnded_mscoco_{split}2014_questions.json", f"v2_mscoco_{split}2014_annotations.json",
             f"{split}2014", ids, lambda i, s=split: f"{s}2014/COCO_{s}2014_{i:012d}.jpg")
        _vqa(data / "okvqa", f"OpenEnded_mscoco_{split}2014_questions.json", f"mscoco_{split}2014_annotations.json",
             f"{split}2014", ids, lambda i, s=split: f"{s}2014/COCO_{s}2014_{i:012d}.jpg")
        _vqa(data / "textvqa", f"{split}_questions_vqa_format.json", f"{split}_annotations_vqa_format.json", split,
             [f"{split}{i:014x}" for i in ids], lambda i: f"train_images/{i}.jpg")
        _vqa(data / "vizwiz", f"{split}_questions_vqa_format.json", f"{split}_annotations_vqa_format.json", split,
             [f"VizWiz_{split}_{i:08d}.jpg" for i in ids], lambda i, s=split: f"{s}/{i}", answer_ids=False)
    hm = data / "hateful_memes"
    for split, ids in (("train", [10, 11, 12, 13]), ("dev", [20, 21])):
        for n, i in enumerate(ids):
            _img(hm / "img" / f"{i:05d}.png", n)
        (hm / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": n % 2, "text": f"meme {i}"}) + "\n"
            for n, i in enumerate(ids)))
    inet = data / "imagenet"
    for split, per in (("train", 2), ("val", 1)):
        for c, wnid in enumerate(("n00000001", "n00000002")):
            for j in range(per):
                _img(inet / split / wnid / f"{split}_{c}_{j}.JPEG", c, "JPEG")
    (inet / "classnames.txt").write_text("n00000001 red thing\nn00000002 green thing\n")
    return data
