"""Each evaluation loader on tiny data written in its standard layout, and its layout errors."""

import json

import pytest
from PIL import Image

from flamingo_vlm.eval.datasets import (
    CaptionDataset,
    DatasetLayoutError,
    HatefulMemesDataset,
    ImageNetDataset,
    EvalDataset,
    VQADataset,
    check_images,
    image_problem,
    read_class_names,
)
from flamingo_vlm.eval.tasks import get_task, resolve_task_root


def _img(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _karpathy_entry(split, filename, filepath=None, cocoid=None, sentences=("a red square", "a square")):
    e = {"split": split, "filename": filename, "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]}
    if filepath is not None:
        e["filepath"] = filepath
    if cocoid is not None:
        e["cocoid"] = cocoid
    return e


def test_coco_karpathy(tmp_path):
    entries = [
        _karpathy_entry("train", "COCO_train2014_000000000001.jpg", "train2014", 1),
        _karpathy_entry("restval", "COCO_val2014_000000000002.jpg", "val2014", 2),
        _karpathy_entry("test", "COCO_val2014_000000000003.jpg", "val2014", 3, ("a dog.", "the dog", "one dog")),
    ]
    for e in entries:
        _img(tmp_path / e["filepath"] / e["filename"])
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    test = CaptionDataset.from_root(tmp_path, "test", dataset="coco")
    assert len(test) == 1 and test[0]["id"] == 3
    assert test[0]["captions"] == ["a dog.", "the dog", "one dog"] and test[0]["caption"] == "a dog."
    assert test.load_image(test[0]).size == (8, 8)
    assert [s["id"] for s in CaptionDataset.from_root(tmp_path, "train", dataset="coco")] == [1]
    assert [s["id"] for s in CaptionDataset.from_root(tmp_path, "train+restval", dataset="coco")] == [1, 2]


def test_coco_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="dataset_coco.json"):
        CaptionDataset.from_root(tmp_path, "test", dataset="coco")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetLayoutError, match="no 'images' list"):
        CaptionDataset.from_root(tmp_path, "test", dataset="coco")
    entry = _karpathy_entry("test", "COCO_val2014_000000000003.jpg", "val2014", 3)
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(DatasetLayoutError, match=r"image of sample 3 not found at .*val2014.*Expected layout"):
        CaptionDataset.from_root(tmp_path, "test", dataset="coco")
    with pytest.raises(DatasetLayoutError, match="no entries in split 'train'"):
        CaptionDataset.from_root(tmp_path, "train", dataset="coco")


def test_flickr30k(tmp_path):
    entries = [_karpathy_entry("train", "100.jpg"), _karpathy_entry("test", "200.jpg")]
    for e in entries:
        _img(tmp_path / "flickr30k-images" / e["filename"])
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    test = CaptionDataset.from_root(tmp_path, "test", dataset="flickr30k")
    assert [s["id"] for s in test] == ["200"]
    (tmp_path / "flickr30k-images" / "200.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="200.jpg"):
        CaptionDataset.from_root(tmp_path, "test", dataset="flickr30k")


def _vqa_files(root, qname, aname, questions, answers, image_names, image_dir):
    (root / qname).write_text(json.dumps({"data_subtype": image_dir if "2014" in image_dir else None, "questions": questions}))
    (root / aname).write_text(json.dumps({"annotations": answers}))
    for n in image_names:
        _img(root / image_dir / n)


@pytest.mark.parametrize("dataset, split, qname, aname, image_dir, image_id, image_name", [
    ("vqav2", "val", "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014",
     42, "COCO_val2014_000000000042.jpg"),
    ("ok_vqa", "train", "OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json", "train2014",
     7, "COCO_train2014_000000000007.jpg"),
    ("textvqa", "val", "val_questions_vqa_format.json", "val_annotations_vqa_format.json", "train_images",
     "0054c91397f2fe05", "0054c91397f2fe05.jpg"),
    ("vizwiz", "val", "val_questions_vqa_format.json", "val_annotations_vqa_format.json", "val",
     "VizWiz_val_00000000.jpg", "VizWiz_val_00000000.jpg"),
])
def test_vqa_layouts(tmp_path, dataset, split, qname, aname, image_dir, image_id, image_name):
    questions = [{"image_id": image_id, "question": "What color?", "question_id": 1},
                 {"image_id": image_id, "question": "How many?", "question_id": 2}]
    # annotations deliberately in another order than the questions
    answers = [{"question_id": 2, "answers": [{"answer": "2"}] * 10}, {"question_id": 1, "answers": [{"answer": "red"}] * 10}]
    _vqa_files(tmp_path, qname, aname, questions, answers, [image_name], image_dir)
    ds = VQADataset.from_root(tmp_path, split, dataset=dataset)
    assert [s["id"] for s in ds] == [1, 2]
    assert ds[0]["answers"] == ["red"] * 10 and ds[1]["answers"] == ["2"] * 10  # matched by question_id
    assert ds[0]["image"].endswith(f"{image_dir}/{image_name}")
    assert ds.load_image(ds[0]).size == (8, 8)
    assert get_task(dataset).eval_split in ("val",)


def test_vqa_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"v2_OpenEnded_mscoco_val2014_questions.json.*Expected layout"):
        VQADataset.from_root(tmp_path, "val", dataset="vqav2")
    questions = [{"image_id": 1, "question": "q?", "question_id": 1}, {"image_id": 1, "question": "q2?", "question_id": 9}]
    answers = [{"question_id": 1, "answers": [{"answer": "a"}] * 10}]
    _vqa_files(tmp_path, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
               questions, answers, ["COCO_val2014_000000000001.jpg"], "val2014")
    with pytest.raises(DatasetLayoutError, match=r"1 question\(s\).*no annotation.*\[9\]"):
        VQADataset.from_root(tmp_path, "val", dataset="vqav2")
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(DatasetLayoutError, match="no 'annotations' list"):
        VQADataset.from_root(tmp_path, "val", dataset="vqav2")


def test_hateful_memes(tmp_path):
    lines = [{"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character"},
             {"id": 23058, "img": "img/23058.png", "label": 1, "text": "don't be afraid"}]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for x in lines:
        _img(tmp_path / x["img"])
    ds = HatefulMemesDataset.from_root(tmp_path, "dev")
    assert [(s["id"], s["label"], s["class_name"], s["ocr"]) for s in ds] == [
        (42953, 0, "no", "its their character"), (23058, 1, "yes", "don't be afraid")]
    # the same records as one JSON array (some mirrors' dev.json): read as such (it failed on line 1, cryptically)
    (tmp_path / "dev.jsonl").write_text(json.dumps(lines, indent=1))
    assert [s["id"] for s in HatefulMemesDataset.from_root(tmp_path, "dev")] == [42953, 23058]
    (tmp_path / "dev.jsonl").write_text(json.dumps(lines)[:-1])
    with pytest.raises(DatasetLayoutError, match=r"dev.jsonl is not valid JSON"):
        HatefulMemesDataset.from_root(tmp_path, "dev")
    (tmp_path / "dev.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 0}\n')
    with pytest.raises(DatasetLayoutError, match=r"dev.jsonl:1: expected a JSON line with 'id', 'img', 'text'"):
        HatefulMemesDataset.from_root(tmp_path, "dev")
    with pytest.raises(DatasetLayoutError, match="train.jsonl"):
        HatefulMemesDataset.from_root(tmp_path, "train")


def test_imagenet_with_class_name_file(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    for split in ("train", "val"):
        _img(tmp_path / split / "n01440764" / "a.JPEG")
        _img(tmp_path / split / "n01443537" / "b.JPEG")
    (tmp_path / "val" / "n01443537" / "notes.txt").write_text("not an image")
    ds = ImageNetDataset.from_root(tmp_path, "val")
    assert ds.class_names == ["tench", "goldfish"]
    assert [(s["id"], s["class_id"], s["class_name"]) for s in ds] == [
        ("n01440764/a.JPEG", 0, "tench"), ("n01443537/b.JPEG", 1, "goldfish")]
    assert read_class_names(tmp_path / "LOC_synset_mapping.txt") == {"n01440764": "tench", "n01443537": "goldfish"}


def test_imagenet_builtin_names_and_errors(tmp_path):
    from flamingo_vlm.eval.imagenet_classnames import IMAGENET_CLASSNAMES

    wnids = [f"n{10000000 + i:08d}" for i in range(1000)]
    for w in wnids:
        (tmp_path / "val" / w).mkdir(parents=True)
    _img(tmp_path / "val" / wnids[1] / "x.JPEG")
    ds = ImageNetDataset.from_root(tmp_path, "val")
    assert ds.class_names == list(IMAGENET_CLASSNAMES) and ds[0]["class_name"] == IMAGENET_CLASSNAMES[1]
    # the download's LOC_synset_mapping.txt (WordNet names) beside the 1000 folders: still the protocol's
    # CLIP names, as OpenFlamingo evaluated with (it took the mapping's names, e.g. "cock" for "rooster")
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} wordnet name {i}, other\n" for i, w in enumerate(wnids)))
    assert ImageNetDataset.from_root(tmp_path, "val").class_names == list(IMAGENET_CLASSNAMES)
    (tmp_path / "classnames.txt").write_text("".join(f"{w} mine {i}\n" for i, w in enumerate(wnids)))  # a choice
    assert ImageNetDataset.from_root(tmp_path, "val").class_names[:2] == ["mine 0", "mine 1"]

    other = tmp_path / "other"
    _img(other / "val" / "cats" / "x.png")
    with pytest.raises(DatasetLayoutError, match=r"no class-name file.*classnames.txt"):
        ImageNetDataset.from_root(other, "val")
    (other / "classnames.txt").write_text("dogs dog\n")
    with pytest.raises(DatasetLayoutError, match=r"class folder\(s\) have no class name.*cats"):
        ImageNetDataset.from_root(other, "val")
    with pytest.raises(DatasetLayoutError, match=r"train folder not found"):
        ImageNetDataset.from_root(other, "train")


def test_task_root_resolution(tmp_path):
    (tmp_path / "mscoco_karpathy").mkdir()
    assert resolve_task_root(get_task("coco"), tmp_path) == tmp_path / "mscoco_karpathy"
    assert resolve_task_root(get_task("okvqa"), tmp_path, {"ok_vqa": "/x"}).as_posix() == "/x"
    with pytest.raises(DatasetLayoutError, match="--task-root vqav2=PATH"):
        resolve_task_root(get_task("vqav2"), tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("mnist")


def _noise(path, fmt, size=48):
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, fmt)
    return path.read_bytes()


def test_image_problem_finds_cut_empty_and_foreign_files_and_passes_good_ones(tmp_path):
    """The check before the model loads: the header, and the end-of-image marker of JPEG/PNG (a file
    without it is decoded: bytes after the marker are legal and pass)."""
    jpg, png = tmp_path / "a.jpg", tmp_path / "a.png"
    data_jpg, data_png = _noise(jpg, "JPEG"), _noise(png, "PNG")
    assert image_problem(jpg) is None and image_problem(png) is None
    (tmp_path / "trailing.jpg").write_bytes(data_jpg + b"\0" * 200)  # (some cameras append data)
    assert image_problem(tmp_path / "trailing.jpg") is None
    (tmp_path / "cut.jpg").write_bytes(data_jpg[: len(data_jpg) // 2])
    (tmp_path / "cut.png").write_bytes(data_png[: len(data_png) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html>404</html>")
    assert image_problem(tmp_path / "cut.jpg").startswith("is cut short (image file is truncated")
    assert image_problem(tmp_path / "cut.png").startswith("is")  # (PIL: "Truncated File Read" or a broken chunk)
    assert image_problem(tmp_path / "empty.jpg") == "is empty"
    assert image_problem(tmp_path / "page.jpg") == ("is not an image PIL can read (UnidentifiedImageError: cannot "
                                                    "identify image file)")
    assert image_problem(tmp_path / "gone.jpg") == "is not there"
    paths = {str(tmp_path / n): "list.json" for n in ("a.jpg", "cut.jpg", "a.png", "cut.png", "gone.jpg")}
    assert [(p.rsplit("/", 1)[1], src) for p, src, _ in check_images(paths)] == [
        ("cut.jpg", "list.json"), ("cut.png", "list.json"), ("gone.jpg", "list.json")]


def test_an_image_that_cannot_be_decoded_is_named(tmp_path):
    """A truncated image failed mid-run as "image file is truncated (31 bytes not processed)", naming no file."""
    data = _noise(tmp_path / "a.jpg", "JPEG")
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetLayoutError, match=rf"^image of sample 7 cannot be decoded: {tmp_path}/a.jpg "
                                                 r"\(OSError: image file is truncated.*\); replace it with a good copy$"):
        EvalDataset.load_image({"id": 7, "image": str(tmp_path / "a.jpg")})
