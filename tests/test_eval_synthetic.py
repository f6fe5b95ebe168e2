"""The synthetic scene generator: determinism, held-out combinations, standard layouts, shards."""

import json

import numpy as np
import pytest

from flamingo_vlm.eval.datasets import CaptionDataset, ImageNetDataset, VQADataset
from flamingo_vlm.synthetic import POSITIONS, SceneGenerator, write_synthetic_benchmark, write_training_shards


def test_a_seed_decides_everything():
    a, b = SceneGenerator(seed=3), SceneGenerator(seed=3)
    b.scene(0, "test")  # order of generation does not matter
    for i in (0, 5, 17):
        sa, sb = a.scene(i, "test"), b.scene(i, "test")
        assert sa == sb
        assert sa.captions() == sb.captions() and sa.questions(3) == sb.questions(3)
        assert np.array_equal(np.asarray(sa.render(64)), np.asarray(sb.render(64)))
    assert a.held_out_pairs == b.held_out_pairs
    other = SceneGenerator(seed=4)
    assert [other.scene(i, "test") for i in range(5)] != [a.scene(i, "test") for i in range(5)]
    assert a.scene(0, "train") != a.scene(0, "test")  # splits are separate streams


def test_scene_contents_and_language():
    g = SceneGenerator(seed=0)
    for i in range(50):
        s = g.scene(i, "val")
        assert 1 <= len(s.objects) <= 4
        assert len({o.position for o in s.objects}) == len(s.objects) and all(o.position in POSITIONS for o in s.objects)
        caps = s.captions(5)
        assert len(caps) == 5 and all(o.color in caps[0] and o.shape in caps[0] for o in s.objects)
        for q in s.questions():
            assert len(q["answers"]) == 10 and q["answers"].count(q["answer"]) >= 8
            if q["question"] == "How many shapes are there?":
                assert q["answer"] == str(len(s.objects))
        if s.text:
            assert any(q["answer"] == s.text for q in s.questions())
    one = g.class_scene(0, "class_val", label="red star")
    assert one.label == "red star" and len(one.objects) == 1


def test_held_out_pairs_only_in_evaluation_splits():
    g = SceneGenerator(seed=1, n_held_out=3)
    held = g.held_out_pairs
    assert len(held) == 3
    for split in ("train", "pretrain"):
        for i in range(300):
            assert not g.is_held_out(g.scene(i, split))
    assert sum(g.is_held_out(g.scene(i, "test")) for i in range(100)) > 10
    shape, color = sorted(held)[0]
    with pytest.raises(ValueError, match="held out"):
        g.class_scene(0, "class_train", label=f"{color} {shape}")
    fixed = SceneGenerator(seed=1, held_out=[("circle", "red")])
    assert fixed.held_out_pairs == {("circle", "red")}


def test_benchmark_in_standard_layouts(tmp_path):
    kw = dict(seed=2, tasks=("coco", "flickr30k", "vqav2", "imagenet"), n_train=6, n_val=2, n_test=3,
              n_class_train_per_class=1, n_class_val_per_class=1, image_size=32)
    paths = write_synthetic_benchmark(tmp_path / "a", **kw)
    coco_test = CaptionDataset.from_root(paths["coco"], "test", dataset="coco")
    assert len(coco_test) == 3 and len(coco_test[0]["captions"]) == 5
    assert len(CaptionDataset.from_root(paths["coco"], "train", dataset="coco")) == 6
    assert len(CaptionDataset.from_root(paths["flickr30k"], "test", dataset="flickr30k")) == 3
    vqa = VQADataset.from_root(paths["vqav2"], "val", dataset="vqav2")
    assert len(vqa) >= 5 and all(len(s["answers"]) == 10 for s in vqa)
    assert len(VQADataset.from_root(paths["vqav2"], "train", dataset="vqav2")) >= 6
    g = SceneGenerator(seed=2)
    inet_val = ImageNetDataset.from_root(paths["imagenet"], "val")
    inet_train = ImageNetDataset.from_root(paths["imagenet"], "train")
    assert inet_val.class_names == g.classes() and len(inet_val) == len(g.classes())
    assert len(inet_train) == len(g.classes()) - len(g.held_out_pairs)
    held = {f"{c} {s}" for s, c in g.held_out_pairs}
    assert not held & {s["class_name"] for s in inet_train}
    meta = json.loads((tmp_path / "a" / "synthetic.json").read_text())
    assert meta["seed"] == 2 and len(meta["held_out_pairs"]) == 4
    # the same settings write the same files
    write_synthetic_benchmark(tmp_path / "b", **kw)
    for rel in ("mscoco_karpathy/dataset_coco.json", "vqav2/v2_mscoco_val2014_annotations.json", "imagenet/classnames.txt"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    first = sorted((tmp_path / "a" / "mscoco_karpathy" / "val2014").iterdir())[0]
    assert first.read_bytes() == (tmp_path / "b" / "mscoco_karpathy" / "val2014" / first.name).read_bytes()
    with pytest.raises(FileExistsError):
        write_synthetic_benchmark(tmp_path / "a", **kw)


def test_training_shards(tmp_path):
    from flamingo_vlm.data.custom import inspect_shards

    shards = write_training_shards(tmp_path, seed=0, n_pairs=5, n_documents=3, image_size=32, samples_per_shard=4)
    assert len(shards["pairs"]) == 2 and len(shards["interleaved"]) == 1
    assert not (tmp_path / "source").exists()
    pairs = inspect_shards([str(p) for p in shards["pairs"]])
    assert pairs["samples"] == 5 and pairs["corrupt"] == 0 and pairs["kinds"] == {"pairs": 5}
    docs = inspect_shards([str(p) for p in shards["interleaved"]], n=3)
    assert docs["samples"] == 3 and docs["kinds"] == {"interleaved": 3} and docs["images"] >= 6
    text = docs["examples"][0]["text"]
    assert text.count("<image>") >= 2 and ("Output:" in text or "Short answer:" in text)


def test_an_interrupted_benchmark_write_leaves_no_task_folder(tmp_path, monkeypatch):
    """A task folder was written in place: interrupted (Ctrl-C, a full disk) it lacked files, and
    ``evaluate --synthetic`` took the folder for written (it writes only missing ones). It is written
    to a temporary folder and renamed now; an interrupted write leaves nothing."""
    from flamingo_vlm.synthetic import benchmark

    calls = []
    real = benchmark._save

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(benchmark, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_benchmark(tmp_path, tasks=("vqav2",), n_train=4, n_val=1, n_test=1, image_size=16)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_synthetic_benchmark(tmp_path, tasks=("vqav2",), n_train=4, n_val=1, n_test=1, image_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.json", "vqav2"]
    assert (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").is_file()


def test_benchmark_folders_get_mkdirs_modes_and_synthetic_json_lists_every_task_written(tmp_path, monkeypatch):
    """The task folders were written by ``mkdtemp`` and renamed, so they stayed 0700: another user could
    not read a shared benchmark. ``synthetic.json`` held only the tasks of the last write, as paths
    relative to the writer's working directory."""
    import os
    import stat

    kw = dict(seed=3, n_train=4, n_val=1, n_test=2, n_class_train_per_class=1, n_class_val_per_class=1, image_size=16)
    old = os.umask(0o022)
    try:
        monkeypatch.chdir(tmp_path)
        write_synthetic_benchmark("data", tasks=("vqav2",), **kw)
        write_synthetic_benchmark("data", tasks=("coco", "synthetic_icl"), **kw)
    finally:
        os.umask(old)
    for folder in ("vqav2", "mscoco_karpathy", "synthetic_icl"):
        assert stat.S_IMODE((tmp_path / "data" / folder).stat().st_mode) == 0o755, folder
    meta = json.loads((tmp_path / "data" / "synthetic.json").read_text())
    assert meta["tasks"] == {"vqav2": "vqav2", "coco": "mscoco_karpathy", "synthetic_icl": "synthetic_icl"}
    # another seed's write lists only its own tasks (the others were written with other settings)
    write_synthetic_benchmark(tmp_path / "data", tasks=("imagenet",), **{**kw, "seed": 4})
    assert json.loads((tmp_path / "data" / "synthetic.json").read_text())["tasks"] == {"imagenet": "imagenet"}


def test_synthetic_json_lists_earlier_tasks_only_when_written_with_the_same_questions_and_quality(tmp_path):
    """questions_per_image and jpeg_quality were not recorded: a write with other values listed the
    earlier tasks as if they were its own."""
    kw = dict(seed=3, n_train=4, n_val=1, n_test=2, n_class_train_per_class=1, n_class_val_per_class=1, image_size=16)
    write_synthetic_benchmark(tmp_path, tasks=("vqav2",), **kw)
    write_synthetic_benchmark(tmp_path, tasks=("coco",), **kw)
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert meta["tasks"] == {"vqav2": "vqav2", "coco": "mscoco_karpathy"}
    assert (meta["questions_per_image"], meta["jpeg_quality"]) == (3, 95)
    write_synthetic_benchmark(tmp_path, tasks=("imagenet",), jpeg_quality=50, **kw)
    assert json.loads((tmp_path / "synthetic.json").read_text())["tasks"] == {"imagenet": "imagenet"}
    write_synthetic_benchmark(tmp_path, tasks=("coco",), questions_per_image=2, jpeg_quality=50, overwrite=True, **kw)
    assert json.loads((tmp_path / "synthetic.json").read_text())["tasks"] == {"coco": "mscoco_karpathy"}
