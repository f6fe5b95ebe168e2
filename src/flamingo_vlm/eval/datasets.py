"""Evaluation datasets in their standard (as-downloaded) layouts.

Every loader checks its layout up front and raises :class:`DatasetLayoutError` saying which file
or folder it expected where; ``files(root, split)`` of each class does the file part of that check
alone (no file read), which the evaluation runs for every task before the model loads, then reads
every split and checks the image files the run will use (:func:`image_problem`: header and end
marker; :func:`flamingo_vlm.eval.evaluator.check_eval_files`). Samples are plain dicts (picklable,
cheap); images are decoded only when needed (:meth:`EvalDataset.load_image`).

=================  ==========================================================================
dataset            layout under its root (``from_root``)
=================  ==========================================================================
COCO               ``dataset_coco.json`` (Karpathy splits) + ``train2014/``, ``val2014/`` (each
                   entry's ``filepath``/``filename``); image id = ``cocoid``
Flickr30K          ``dataset_flickr30k.json`` + ``flickr30k-images/``; image id = file stem
VQAv2              ``v2_OpenEnded_mscoco_{split}2014_questions.json``,
                   ``v2_mscoco_{split}2014_annotations.json``, ``{split}2014/COCO_{split}2014_{id:012d}.jpg``
OK-VQA             ``OpenEnded_mscoco_{split}2014_questions.json``, ``mscoco_{split}2014_annotations.json``,
                   ``{split}2014/``
TextVQA            ``{split}_questions_vqa_format.json``, ``{split}_annotations_vqa_format.json``,
                   ``train_images/{image_id}.jpg`` (val images live there too)
VizWiz             ``{split}_questions_vqa_format.json``, ``{split}_annotations_vqa_format.json``,
                   ``{split}/{image_id}`` (the image id is the file name)
Hateful Memes      ``{split}.jsonl`` (or ``.json``: JSON lines or one array of the records; ``dev_seen.jsonl``) + ``img/``
ImageNet           ``{split}/<wnid>/<image>`` + class names: the built-in 1000 (OpenAI CLIP's) when
                   the folders are the 1000 ImageNet-1k WordNet ids and there is no ``classnames.txt``,
                   else ``classnames.txt`` / ``LOC_synset_mapping.txt`` (``<wnid> <name>[, other names]``)
=================  ==========================================================================
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "CaptionDataset",
    "DatasetLayoutError",
    "EvalDataset",
    "HatefulMemesDataset",
    "ImageNetDataset",
    "VQADataset",
    "check_images",
    "image_problem",
    "read_class_names",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder or file is missing or malformed; the message says what was expected."""


def _first_existing(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        p = root / n
        if p.exists():
            return p
    return None


def _require(root: Path, names: Sequence[str], what: str, layout: str) -> Path:
    found = _first_existing(root, names)
    if found is None:
        tried = ", ".join(str(root / n) for n in names)
        raise DatasetLayoutError(f"{what} not found (tried {tried}). Expected layout: {layout}")
    return found


def _load_json(path: Path, what: str, layout: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DatasetLayoutError(f"{what} not found: {path}. Expected layout: {layout}") from e
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{what} {path} is not valid JSON ({e}). Expected layout: {layout}") from e


# The last bytes of an intact file of these formats hold this marker (JPEG's EOI, PNG's IEND chunk).
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image file at ``path`` cannot be used (``"is not there"``, ``"is not an image ..."``,
    ``"is cut short ..."``), or None. Cheap: the header is parsed (not there, no permission, empty,
    not an image: an HTML error page saved under the image's name) and, for JPEG and PNG, the last
    64 bytes are looked at for the end-of-image marker; only a file without it is decoded (JPEG at
    1/8 scale, which still reads every byte: data after the marker is legal, a cut-off download is
    not). A file damaged in its middle passes and fails when it is decoded (the error names it)."""
    try:
        with Image.open(path) as im:
            marker = _END_MARKERS.get(im.format or "")
            if marker is None:
                return None
            fp = im.fp
            fp.seek(0, os.SEEK_END)
            fp.seek(max(0, fp.tell() - 64))
            if marker in fp.read():
                return None
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (1, 1))
            im.load()
            return None
    except FileNotFoundError:
        return "is not there"
    except PermissionError:
        return "cannot be read (no permission)"
    except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, EOFError, ...)
        if Path(path).is_file() and os.path.getsize(path) == 0:
            return "is empty"
        if isinstance(e, OSError) and "truncated" in str(e).lower():
            return f"is cut short ({e})"
        return f"is not an image PIL can read ({type(e).__name__}: {str(e).replace(f' {str(path)!r}', '')})"


def check_images(images: dict[str, str], *, workers: int = 8) -> list[tuple[str, str, str]]:
    """:func:`image_problem` of every path of ``images`` (path -> the file that names it), in a thread
    pool (the checks are mostly waiting for the disk); ``[(path, named in, problem)]`` of the bad ones,
    in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(images)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        problems = list(pool.map(image_problem, paths, chunksize=64))
    return [(p, images[p], why) for p, why in zip(paths, problems) if why is not None]


class EvalDataset:
    """A list of samples (dicts with at least ``id`` and ``image``: a path); ``source`` is the file
    (or folder) that lists them, for messages."""

    name: str = "dataset"
    layout: str = ""

    def __init__(self, samples: list[dict], split: str, source: str | os.PathLike | None = None):
        self.samples = samples
        self.split = split
        self.source = str(source) if source is not None else f"{self.name} {split}"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]

    def __iter__(self):
        return iter(self.samples)

    @staticmethod
    def load_image(sample: dict) -> Image.Image:
        path = Path(sample["image"])
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise DatasetLayoutError(f"image of sample {sample['id']!r} not found: {path}") from e
        except Exception as e:  # noqa: BLE001 (a truncated file said "image file is truncated", naming none)
            raise DatasetLayoutError(f"image of sample {sample['id']!r} cannot be decoded: {path} "
                                     f"({type(e).__name__}: {e}); replace it with a good copy") from e

    def _check_images(self, count: int = 3) -> None:
        """Check the first and last few images exist (a full scan of COCO would take long)."""
        picks = self.samples[:count] + self.samples[-count:]
        for s in picks:
            if not Path(s["image"]).is_file():
                raise DatasetLayoutError(
                    f"{self.name} {self.split}: image of sample {s['id']!r} not found at {s['image']}. "
                    f"Expected layout: {self.layout}"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, samples={len(self)})"


# -- captioning ---------------------------------------------------------------------------------------
class CaptionDataset(EvalDataset):
    """COCO / Flickr30K in Karpathy's split JSON (``{"images": [{"split", "filename", "sentences":
    [{"raw": ...}], "filepath"?, "cocoid"?}]}``).

    Sample: ``{"id", "image", "captions": [raw sentences], "caption": first sentence}``; the first
    sentence is what a demonstration shows (as in OpenFlamingo), all are CIDEr references.
    """

    LAYOUTS = {
        "coco": "<root>/dataset_coco.json (Karpathy splits) with images in <root>/<filepath>/<filename>, "
        "i.e. <root>/train2014/ and <root>/val2014/",
        "flickr30k": "<root>/dataset_flickr30k.json (Karpathy splits) with images in <root>/flickr30k-images/",
    }

    def __init__(
        self,
        karpathy_json: str | os.PathLike,
        image_root: str | os.PathLike | Callable[[dict], Path],
        split: str,
        *,
        dataset: str = "coco",
        check_images: bool = True,
    ):
        if dataset not in self.LAYOUTS:
            raise ValueError(f"dataset must be one of {sorted(self.LAYOUTS)}, got {dataset!r}")
        self.name, self.layout = dataset, self.LAYOUTS[dataset]
        data = _load_json(Path(karpathy_json), "Karpathy split file", self.layout)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetLayoutError(
                f"{karpathy_json} has no 'images' list; is it a Karpathy split file (dataset_{dataset}.json)?"
            )
        if isinstance(data.get("annotations"), list) and data["images"] and "split" not in data["images"][0]:
            # ("entry 0 lacks 'split'": COCO's own captions_*.json has 'images' too)
            raise DatasetLayoutError(
                f"{karpathy_json} is a COCO captions file (captions_*.json: 'images' and 'annotations'), not "
                f"Karpathy's split file: the protocol's splits are in Karpathy's dataset_{dataset}.json "
                "(caption_datasets.zip)")
        splits = {split} | ({"train", "restval"} if split == "train+restval" else set())
        samples = []
        for n, entry in enumerate(data["images"]):
            try:
                if entry["split"] not in splits:
                    continue
                sentences = [s["raw"] for s in entry["sentences"]]
                filename = entry["filename"]
            except (KeyError, TypeError) as e:
                raise DatasetLayoutError(
                    f"{karpathy_json}: entry {n} lacks {e}; Karpathy entries need 'split', 'filename' and "
                    "'sentences' [{'raw': ...}]"
                ) from None
            if not sentences:
                raise DatasetLayoutError(f"{karpathy_json}: entry {n} ({filename}) has no sentences")
            if dataset == "coco":
                if "cocoid" not in entry:
                    raise DatasetLayoutError(f"{karpathy_json}: COCO entry {n} ({filename}) has no 'cocoid'")
                sample_id = entry["cocoid"]
            else:
                sample_id = Path(filename).stem
            if callable(image_root):
                image = image_root(entry)
            elif dataset == "coco":
                image = Path(image_root) / entry.get("filepath", "") / filename
            else:
                image = Path(image_root) / filename
            samples.append({"id": sample_id, "image": str(image), "captions": sentences, "caption": sentences[0]})
        if not samples:
            present = sorted({e.get("split") for e in data["images"] if isinstance(e, dict)}, key=str)
            raise DatasetLayoutError(f"{karpathy_json}: no entries in split {split!r} (splits present: {present})")
        super().__init__(samples, split, karpathy_json)
        if check_images:
            self._check_images()

    @classmethod
    def files(cls, root: str | os.PathLike, split: str, *, dataset: str = "coco") -> tuple[Path, Path]:
        """(Karpathy file, image root) under ``root``, or :class:`DatasetLayoutError` naming what is missing."""
        root = Path(root)
        layout = cls.LAYOUTS.get(dataset, "")
        if not root.is_dir():
            raise DatasetLayoutError(f"{dataset} folder not found: {root}. Expected layout: {layout}")
        if dataset == "coco":
            return _require(root, ["dataset_coco.json", "annotations/dataset_coco.json"], "COCO Karpathy file", layout), root
        ann = _require(root, ["dataset_flickr30k.json", "annotations/dataset_flickr30k.json"],
                       "Flickr30K Karpathy file", layout)
        images = _require(root, ["flickr30k-images", "flickr30k_images", "images", "Images"], "Flickr30K image folder", layout)
        return ann, images

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, *, dataset: str = "coco", **kw) -> "CaptionDataset":
        ann, images = cls.files(root, split, dataset=dataset)
        return cls(ann, images, split, dataset=dataset, **kw)


# -- VQA ----------------------------------------------------------------------------------------------
_VQA_FILES = {
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json", "{split}2014"),
    "ok_vqa": ("OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json", "{split}2014"),
    "textvqa": ("{split}_questions_vqa_format.json", "{split}_annotations_vqa_format.json", "train_images"),
    "vizwiz": ("{split}_questions_vqa_format.json", "{split}_annotations_vqa_format.json", "{split}"),
}


def _vqa_layout(dataset: str) -> str:
    q, a, d = _VQA_FILES[dataset]
    return f"<root>/{q}, <root>/{a} and images in <root>/{d}/ (split = train or val)"


class VQADataset(EvalDataset):
    """VQA-format questions/annotations JSON (VQAv2, OK-VQA, TextVQA, VizWiz).

    Sample: ``{"id": question_id, "image", "image_id", "question", "answers": [10 answers]}``
    (``answers`` absent without annotations), plus the annotation's ``question_type`` and
    ``answer_type`` where it has them (VQAv2 does), for per-type accuracy. Annotations are matched to questions by
    ``question_id``, not by position (OpenFlamingo assumed the same order). When the answers lack
    ``answer_id`` (VizWiz), ``answer_entries`` holds each answer's other fields (JSON text, e.g.
    ``{"answer_confidence": "yes"}``) for OpenFlamingo's leave-one-out (``--vqa-compat openflamingo``).
    """

    def __init__(
        self,
        questions_json: str | os.PathLike,
        annotations_json: str | os.PathLike | None,
        image_dir: str | os.PathLike,
        split: str,
        *,
        dataset: str = "vqav2",
        image_name: Callable[[Any], str] | None = None,
        check_images: bool = True,
    ):
        if dataset not in _VQA_FILES:
            raise ValueError(f"dataset must be one of {sorted(_VQA_FILES)}, got {dataset!r}")
        self.name, self.layout = dataset, _vqa_layout(dataset)
        qdata = _load_json(Path(questions_json), "questions file", self.layout)
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            swapped = isinstance(qdata, dict) and isinstance(qdata.get("annotations"), list)
            raise DatasetLayoutError(f"{questions_json} has no 'questions' list; expected VQA-format questions JSON"
                                     + ("; it holds 'annotations': the questions and annotations files swapped?"
                                        if swapped else ""))
        answers: dict[Any, list[str]] | None = None
        if annotations_json is not None:
            adata = _load_json(Path(annotations_json), "annotations file", self.layout)
            if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
                swapped = isinstance(adata, dict) and isinstance(adata.get("questions"), list)
                raise DatasetLayoutError(
                    f"{annotations_json} has no 'annotations' list; expected VQA-format annotations JSON"
                    + ("; it holds 'questions': the questions and annotations files swapped?" if swapped else "")
                )
            answers, types = {}, {}
            for n, ann in enumerate(adata["annotations"]):
                try:
                    if ann["question_id"] in answers:
                        raise DatasetLayoutError(f"{annotations_json}: question_id {ann['question_id']} is annotated twice "
                                                 f"(annotation {n} and an earlier one); one annotation per question")
                    if not ann["answers"]:
                        raise DatasetLayoutError(f"{annotations_json}: annotation {n} (question_id {ann['question_id']}) "
                                                 "has no answers; VQA annotations hold the (10) human answers")
                    answers[ann["question_id"]] = [a["answer"] for a in ann["answers"]]
                    types[ann["question_id"]] = {k: ann[k] for k in ("question_type", "answer_type") if k in ann}
                    if not all("answer_id" in a for a in ann["answers"]):
                        # Without answer_id (VizWiz, OpenFlamingo's files), OpenFlamingo's leave-one-out
                        # tells entries apart by their other fields (--vqa-compat openflamingo).
                        types[ann["question_id"]]["answer_entries"] = [
                            json.dumps({k: v for k, v in a.items() if k != "answer"}, sort_keys=True)
                            for a in ann["answers"]]
                except (KeyError, TypeError) as e:
                    raise DatasetLayoutError(
                        f"{annotations_json}: annotation {n} lacks {e}; need 'question_id' and 'answers' [{{'answer'}}]"
                    ) from None
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DatasetLayoutError(f"{dataset} image folder not found: {image_dir}. Expected layout: {self.layout}")
        name_fn = image_name or self._default_image_name(dataset, image_dir, qdata)
        samples, unanswered, seen = [], [], set()
        for n, q in enumerate(qdata["questions"]):
            try:
                qid, image_id, question = q["question_id"], q["image_id"], q["question"]
            except (KeyError, TypeError) as e:
                raise DatasetLayoutError(
                    f"{questions_json}: question {n} lacks {e}; need 'question_id', 'image_id' and 'question'"
                ) from None
            if qid in seen:  # (it was evaluated, and counted, twice)
                raise DatasetLayoutError(f"{questions_json}: question_id {qid} occurs twice (question {n} and an earlier "
                                         "one); question ids are unique in a VQA questions file")
            seen.add(qid)
            sample = {"id": qid, "image": str(image_dir / name_fn(image_id)), "image_id": image_id, "question": question}
            if answers is not None:
                if qid not in answers:
                    unanswered.append(qid)
                    continue
                sample["answers"] = answers[qid]
                sample.update(types[qid])
            samples.append(sample)
        if unanswered:
            raise DatasetLayoutError(
                f"{annotations_json}: {len(unanswered)} question(s) of {questions_json} have no annotation "
                f"(e.g. question_id {unanswered[:3]}); are the two files of the same split?"
            )
        if not samples:
            raise DatasetLayoutError(f"{questions_json} holds no questions")
        super().__init__(samples, split, questions_json)
        if check_images:
            self._check_images()

    @staticmethod
    def _default_image_name(dataset: str, image_dir: Path, qdata: dict) -> Callable[[Any], str]:
        if dataset in ("vqav2", "ok_vqa"):
            subtype = qdata.get("data_subtype")
            coco_split = subtype if isinstance(subtype, str) and re.fullmatch(r"[a-z]+20\d\d", subtype) else image_dir.name
            return lambda image_id: f"COCO_{coco_split}_{int(image_id):012d}.jpg"
        if dataset == "textvqa":
            return lambda image_id: f"{image_id}.jpg"
        return lambda image_id: str(image_id)  # VizWiz: the id is the file name

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, *, dataset: str = "vqav2", **kw) -> "VQADataset":
        questions, annotations, images = cls.files(root, split, dataset=dataset)
        return cls(questions, annotations, images, split, dataset=dataset, **kw)

    @classmethod
    def files(cls, root: str | os.PathLike, split: str, *, dataset: str = "vqav2") -> tuple[Path, Path, Path]:
        """(questions, annotations, image folder) under ``root``, or :class:`DatasetLayoutError` naming
        what is missing."""
        if dataset not in _VQA_FILES:
            raise ValueError(f"dataset must be one of {sorted(_VQA_FILES)}, got {dataset!r}")
        root = Path(root)
        layout = _vqa_layout(dataset)
        if not root.is_dir():
            raise DatasetLayoutError(f"{dataset} folder not found: {root}. Expected layout: {layout}")
        qname, aname, dname = (s.format(split=split) for s in _VQA_FILES[dataset])
        questions = _require(root, [qname], f"{dataset} {split} questions", layout)
        annotations = _require(root, [aname], f"{dataset} {split} annotations", layout)
        images = _require(root, [dname], f"{dataset} {split} image folder", layout)
        return questions, annotations, images


# -- Hateful Memes ------------------------------------------------------------------------------------
class HatefulMemesDataset(EvalDataset):
    """Hateful Memes: JSON lines ``{"id", "img": "img/01235.png", "label": 0|1, "text": OCR}``.

    Sample: ``{"id", "image", "ocr", "label": 0|1, "class_name": "no"|"yes"}``.
    """

    name = "hateful_memes"
    layout = "<root>/{train,dev}.jsonl (or .json: JSON lines or one array; or dev_seen.jsonl) and images in <root>/img/"
    SPLIT_FILES = {
        "train": ["train.jsonl", "train.json"],
        "dev": ["dev.jsonl", "dev.json", "dev_seen.jsonl", "dev_seen.json"],
        "test": ["test.jsonl", "test.json", "test_seen.jsonl", "test_seen.json"],
    }

    def __init__(self, annotations: str | os.PathLike, image_dir: str | os.PathLike, split: str, *, check_images: bool = True):
        annotations, image_dir = Path(annotations), Path(image_dir)
        if not annotations.is_file():
            raise DatasetLayoutError(f"Hateful Memes annotations not found: {annotations}. Expected layout: {self.layout}")
        if not image_dir.is_dir():
            raise DatasetLayoutError(f"Hateful Memes image folder not found: {image_dir}. Expected layout: {self.layout}")
        samples = []
        with open(annotations, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):  # a JSON array of the same records (some mirrors' .json), not JSON lines
            try:
                records = [(f"record {i}", rec) for i, rec in enumerate(json.loads(text))]
            except json.JSONDecodeError as e:
                raise DatasetLayoutError(f"{annotations} is not valid JSON: {e}") from None
        else:
            records = [(lineno, line) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
        for lineno, rec in records:
            try:
                rec = json.loads(rec) if isinstance(rec, str) else rec
                label = int(rec["label"]) if "label" in rec else None
                sample = {
                    "id": rec["id"],
                    "image": str(image_dir / Path(rec["img"]).name),
                    "ocr": rec["text"],
                }
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DatasetLayoutError(
                    f"{annotations}:{lineno}: expected a JSON line with 'id', 'img', 'text' (and 'label'): "
                    f"{type(e).__name__}: {e}"
                ) from None
            if label is not None:
                if label not in (0, 1):
                    raise DatasetLayoutError(f"{annotations}:{lineno}: label must be 0 or 1, got {label}")
                sample["label"] = label
                sample["class_name"] = "yes" if label == 1 else "no"
            samples.append(sample)
        if not samples:
            raise DatasetLayoutError(f"{annotations} holds no examples")
        super().__init__(samples, split, annotations)
        if check_images:
            self._check_images()

    @classmethod
    def files(cls, root: str | os.PathLike, split: str) -> tuple[Path, Path]:
        """(annotations, image folder) under ``root``, or :class:`DatasetLayoutError` naming what is missing."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"hateful_memes folder not found: {root}. Expected layout: {cls.layout}")
        names = cls.SPLIT_FILES.get(split, [f"{split}.jsonl", f"{split}.json"])
        ann = _require(root, names, f"Hateful Memes {split} annotations", cls.layout)
        images = _require(root, ["img"], "Hateful Memes image folder", cls.layout)
        return ann, images

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, **kw) -> "HatefulMemesDataset":
        return cls(*cls.files(root, split), split, **kw)


# -- ImageNet -----------------------------------------------------------------------------------------
_CLASSNAME_FILES = ("classnames.txt", "LOC_synset_mapping.txt", "synset_words.txt")
_WNID = re.compile(r"^n\d{8}$")


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """``<wnid> <name>[, other names]`` per line (``LOC_synset_mapping.txt``'s format, or a tab
    instead of the first space) -> ``{wnid: first name}``; the file's order is kept."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"[\t ]", line, maxsplit=1)
        if len(parts) != 2 or not parts[1].strip():
            raise DatasetLayoutError(f"{path}:{lineno}: expected '<folder name> <class name>', got {line!r}")
        out[parts[0]] = parts[1].split(",")[0].strip()
    if not out:
        raise DatasetLayoutError(f"{path} lists no classes")
    return out


class ImageNetDataset(EvalDataset):
    """ImageNet-style class folders: ``<root>/<split>/<wnid>/<image>``.

    The class list (and class index) comes from the built-in ImageNet-1k names (OpenAI CLIP's, sorted
    WordNet ids) when the split has the 1000 ImageNet folders and the root no ``classnames.txt``,
    else from the class-name file in file order.
    Sample: ``{"id": "<wnid>/<file>", "image", "class_id", "class_name"}``.
    """

    name = "imagenet"
    layout = (
        "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, with class names in "
        f"<root>/{_CLASSNAME_FILES[0]} or <root>/{_CLASSNAME_FILES[1]} ('<wnid> <name>' per line) unless the "
        "folders are the 1000 ImageNet-1k WordNet ids"
    )

    def __init__(self, root: str | os.PathLike, split: str, *, class_names: dict[str, str] | str | os.PathLike | None = None,
                 check_images: bool = True):
        root = Path(root)
        split_dir, folders, names_file = self._layout(root, split)
        if class_names is None:
            class_names = read_class_names(names_file) if names_file is not None else self._builtin_names(root, folders)
        elif not isinstance(class_names, dict):
            class_names = read_class_names(class_names)
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            raise DatasetLayoutError(
                f"{split_dir}: {len(unknown)} class folder(s) have no class name (e.g. {unknown[:3]}). "
                f"Expected layout: {self.layout}"
            )
        self.wnids = list(class_names)
        self.class_names = [class_names[w] for w in self.wnids]
        index = {w: i for i, w in enumerate(self.wnids)}
        samples = []
        for wnid in folders:
            for f in sorted((split_dir / wnid).iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    samples.append({"id": f"{wnid}/{f.name}", "image": str(f), "class_id": index[wnid],
                                    "class_name": class_names[wnid]})
        if not samples:
            raise DatasetLayoutError(f"{split_dir}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
        super().__init__(samples, split, split_dir)

    @classmethod
    def _layout(cls, root: Path, split: str) -> tuple[Path, list[str], Path | None]:
        """(split folder, its class folders, the class-name file to read: None for the built-in names)."""
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetLayoutError(f"ImageNet {split} folder not found: {split_dir}. Expected layout: {cls.layout}")
        folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not folders:
            raise DatasetLayoutError(f"{split_dir} has no class folders. Expected layout: {cls.layout}")
        names_file = _first_existing(root, _CLASSNAME_FILES)
        if names_file is not None and names_file.name != _CLASSNAME_FILES[0] and cls._is_imagenet_1k(folders):
            # the download's WordNet mapping ("cock", "hammerhead", "maillot") is not the protocol's class
            # names: the 1000 ImageNet-1k folders get OpenAI CLIP's, as OpenFlamingo's evaluation used, unless a
            # classnames.txt says otherwise
            names_file = None
        return split_dir, folders, names_file

    @classmethod
    def files(cls, root: str | os.PathLike, split: str) -> tuple[Path, Path | None]:
        """(split folder, class-name file or None for the built-in names) under ``root``, or
        :class:`DatasetLayoutError` naming what is missing."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"imagenet folder not found: {root}. Expected layout: {cls.layout}")
        split_dir, folders, names_file = cls._layout(root, split)
        if names_file is None:
            cls._builtin_names(root, folders)  # (raises where these folders have no built-in names)
        return split_dir, names_file

    @staticmethod
    def _is_imagenet_1k(folders: list[str]) -> bool:
        return len(folders) == 1000 and all(_WNID.match(f) for f in folders)

    @classmethod
    def _builtin_names(cls, root: Path, folders: list[str]) -> dict[str, str]:
        from .imagenet_classnames import IMAGENET_CLASSNAMES

        if cls._is_imagenet_1k(folders):
            return dict(zip(folders, IMAGENET_CLASSNAMES))
        raise DatasetLayoutError(
            f"no class-name file in {root} (tried {', '.join(_CLASSNAME_FILES)}) and the {len(folders)} folders are not "
            f"the 1000 ImageNet-1k WordNet ids. Expected layout: {cls.layout}"
        )

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, **kw) -> "ImageNetDataset":
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"imagenet folder not found: {root}. Expected layout: {cls.layout}")
        return cls(root, split, **kw)
