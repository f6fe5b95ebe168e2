"""End-to-end evaluation runs with a tiny random model on tiny synthetic data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flamingo_vlm.errors import UsageError
from flamingo_vlm.eval import EvalConfig, Evaluator, continuation_ids
from flamingo_vlm.eval.cli import main as eval_main
from flamingo_vlm.eval.demos import RICES, FeatureExtractor, RandomDemoSelector
from flamingo_vlm.eval.distributed import shard_indices
from flamingo_vlm.eval.task_kinds import demo_orders
from flamingo_vlm.synthetic import SceneGenerator, write_synthetic_benchmark
from eval_formats import write_eval_datasets
from tiny import tiny_flamingo

pytest.importorskip("pycocoevalcap")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model and a tiny synthetic benchmark (6 classes)."""
    root = tmp_path_factory.mktemp("eval")
    gen = SceneGenerator(seed=0, shapes=("circle", "square", "star"), colors=("red", "blue"), n_held_out=1)
    write_synthetic_benchmark(root / "data", generator=gen, tasks=("coco", "vqav2", "imagenet"), n_train=6, n_val=1,
                              n_test=3, n_class_train_per_class=1, n_class_val_per_class=1, image_size=32)
    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=512)
    model.save_pretrained(root / "model", tokenizer=tok, image_processor=ip)
    return root, (model, ip, tok)


def _cli(root, out, *extra):
    return eval_main([
        "--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(out),
        "--tasks", "coco,vqav2,imagenet", "--shots", "0,2", "--trials", "1", "--batch-size", "2",
        "--num-samples", "3", "--caption-tokenizer", "python", "--quiet", *extra,
    ])


def test_results_md_keeps_the_tasks_of_earlier_runs_into_the_same_folder(tiny, tmp_path):
    """Tasks evaluated one run at a time into one --out: results.md shows this run's tasks, then the
    others finished there (results.json's all_results holds them all)."""
    root, _ = tiny
    out = tmp_path / "out"
    assert _cli(root, out, "--tasks", "coco", "--shots", "0") == 0
    assert _cli(root, out, "--tasks", "imagenet", "--shots", "0") == 0
    md = (out / "results.md").read_text()
    this_run, _, earlier = md.partition("## Other tasks finished in this folder (earlier runs)")
    assert "| imagenet (synthetic) | top1 |" in this_run and "| coco" not in this_run
    assert "| coco (synthetic) | CIDEr |" in earlier and "| imagenet" not in earlier
    assert set(json.loads((out / "results.json").read_text())["all_results"]) == {"coco", "imagenet"}
    assert _cli(root, out, "--tasks", "coco,imagenet", "--shots", "0") == 0  # (resumed: nothing to run)
    assert "earlier runs" not in (out / "results.md").read_text()


def test_full_run_writes_json_and_markdown_then_resumes(tiny, tmp_path, monkeypatch, caplog):
    root, _ = tiny
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="flamingo_vlm.eval.evaluator"):
        assert _cli(root, out) == 0
    # Captions tokenised without Java: said in the log, the unit, the summary and the markdown.
    assert [r for r in caplog.records if "pure-Python PTB tokenizer" in r.getMessage()]
    assert json.loads((out / "coco" / "shots0_seed42.json").read_text())["scoring"] == {"caption_tokenizer": "python",
                                                                                         "data": "synthetic"}
    assert json.loads((out / "results.json").read_text())["results"]["coco"][0]["scoring"]["caption_tokenizer"] == "python"
    assert "- coco: caption_tokenizer = `python`: captions tokenised with the pure-Python" in (out / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert set(results) == {"coco", "vqav2", "imagenet"}
    for task, metric in (("coco", "CIDEr"), ("vqav2", "accuracy"), ("imagenet", "top1")):
        rows = results[task]
        assert [r["shots"] for r in rows] == [0, 2]
        assert all(r["metric"] == metric and len(r["trials"]) == 1 and 0 <= r["mean"] <= 100 for r in rows)
    assert results["imagenet"][0]["num_samples"] == 3
    assert {"top1", "top5"} <= set(results["imagenet"][0]["metrics"])
    md = (out / "results.md").read_text()
    assert "| task | metric | 0-shot | 2-shot |" in md and "| coco (synthetic) | CIDEr |" in md and "| imagenet (synthetic) | top5 |" in md
    unit = json.loads((out / "vqav2" / "shots2_seed42.json").read_text())
    assert len(unit["predictions"]) == unit["num_samples"] == 3
    assert all(len(p["demos"]) == 2 for p in unit["predictions"])
    # per answer type and question type, as the official VQA evaluation reports them
    from flamingo_vlm.eval.datasets import VQADataset
    from flamingo_vlm.eval.metrics import vqa_accuracy

    questions = {q["id"]: q for q in VQADataset.from_root(root / "data" / "vqav2", "val", dataset="vqav2")}
    for field, key in (("answer_type", "per_answer_type"), ("question_type", "per_question_type")):
        expected: dict[str, list[float]] = {}
        for p in unit["predictions"]:
            q = questions[p["id"]]
            expected.setdefault(q[field], []).append(100 * vqa_accuracy(p["prediction"], q["answers"]))
        assert unit["metrics"][key] == pytest.approx({t: sum(v) / len(v) for t, v in expected.items()})
    assert results["vqav2"][1]["metrics"]["per_answer_type"] == pytest.approx(unit["metrics"]["per_answer_type"])
    cls_unit = json.loads((out / "imagenet" / "shots0_seed42.json").read_text())
    assert all(len(p["top5"]) == 5 for p in cls_unit["predictions"])

    # A rerun finds every unit finished and evaluates nothing.
    calls = []
    monkeypatch.setattr(Evaluator, "run_unit", lambda self, *a, **k: calls.append(a) or pytest.fail("re-evaluated"))
    mtime = (out / "coco" / "shots0_seed42.json").stat().st_mtime_ns
    assert _cli(root, out) == 0
    assert calls == [] and (out / "coco" / "shots0_seed42.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # Only the missing unit, and units whose settings changed, run again.
    (out / "imagenet" / "shots2_seed42.json").unlink()
    ran = []
    original = Evaluator.run_unit

    def spy(self, spec, *a, **k):
        ran.append((spec.name, a[2]))
        return original(self, spec, *a, **k)

    monkeypatch.setattr(Evaluator, "run_unit", spy)
    assert _cli(root, out) == 0
    assert ran == [("imagenet", 2)]
    ran.clear()
    assert _cli(root, out, "--num-beams", "2") == 0
    assert sorted(ran) == [("coco", 0), ("coco", 2), ("vqav2", 0), ("vqav2", 2)]
    assert (out / "imagenet" / "shots2_seed42.json").is_file()


def test_zero_shot_passes_only_the_query_image(tiny, tmp_path, monkeypatch):
    root, (model, ip, tok) = tiny
    seen = []
    media = tok.convert_tokens_to_ids("<image>")

    def record(fn):
        def wrapped(vision_x, lang_x, *a, **k):
            for row in range(lang_x.shape[0]):
                n_markers = int((lang_x[row] == media).sum())
                text = tok.decode(lang_x[row], skip_special_tokens=False)
                seen.append((fn.__name__, vision_x.shape[1], n_markers, text.count("Output:") + text.count("Question:")))
            return fn(vision_x, lang_x, *a, **k)
        wrapped.__name__ = fn.__name__
        return wrapped

    monkeypatch.setattr(model, "generate", record(model.generate))
    monkeypatch.setattr(model, "score", record(model.score))
    for shots in (0, 2):
        seen.clear()
        cfg = EvalConfig(tasks=["vqav2", "imagenet"], data_root=str(root / "data"), out_dir=str(tmp_path / str(shots)),
                         shots=[shots], trials=1, num_samples=2, batch_size=2, progress=False)
        Evaluator(model, ip, tok, cfg).run()
        assert {name for name, *_ in seen} == {"generate", "score"}
        for _, n_images, n_markers, n_prompts in seen:
            assert n_prompts == 3  # two demos and the query, at 0 shots too (text-only demos)
            assert n_markers == (1 if shots == 0 else 3)
            assert n_images == n_markers  # 0 shots: no demo images (OpenFlamingo passed them for classification)


def test_shard_indices_cover_each_sample_once():
    for n in (0, 1, 7, 64, 101):
        for world in (1, 2, 3, 8):
            parts = [shard_indices(n, r, world) for r in range(world)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


def test_random_demos_are_per_sample_and_distinct(tiny):
    root, _ = tiny
    from flamingo_vlm.eval.datasets import VQADataset

    train = VQADataset.from_root(root / "data" / "vqav2", "train", dataset="vqav2")
    sel = RandomDemoSelector(train, query_set_size=5, seed=1)
    assert len(sel.pool) == 5
    picks = sel.select(3, 4)
    assert len(set(picks)) == 4 and set(picks) <= set(sel.pool.tolist())
    assert RandomDemoSelector(train, 5, 1).select(3, 4) == picks  # independent of anything else
    assert RandomDemoSelector(train, 5, 2).pool.tolist() != sel.pool.tolist() or sel.select(4, 4) != picks


def test_rices_most_similar_last_and_cache(tiny, tmp_path, monkeypatch):
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.8, 0.6, 0], [0, 0, 1.0]]), dim=-1)
    rices = RICES(feats)
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0]]), dim=-1)
    # cosine similarities: 0.995 (0), 0.856 (2), 0.0995 (1), 0 (3); the most similar comes last
    assert rices.select(query, 3) == [[1, 2, 0]]
    assert rices.select(query, 0) == [[]]

    root, (model, ip, tok) = tiny
    from flamingo_vlm.eval.datasets import CaptionDataset

    train = CaptionDataset.from_root(root / "data" / "mscoco_karpathy", "train", dataset="coco")
    ex = FeatureExtractor(model.vision_encoder, ip)
    assert ex.mode == "encode_image"
    cache = tmp_path / "f.pt"
    built = RICES.build(train, ex, cache_path=cache, batch_size=4)
    assert built.features.shape[0] == len(train) and cache.is_file()
    torch.testing.assert_close(built.features.norm(dim=-1), torch.ones(len(train)))
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda *a: pytest.fail("cache not used"))
    again = RICES.build(train, ex, cache_path=cache)
    torch.testing.assert_close(again.features, built.features)
    # a training image's nearest neighbour is itself, and comes last
    monkeypatch.undo()
    q = ex([CaptionDataset.load_image(train[2])])
    assert built.select(q, 3)[0][-1] == 2


def test_rices_encodes_each_image_once(tiny):
    """VQA splits ask several questions per image; RICES encoded the image again for every question
    (5.4x the work on VQAv2 train). Each image is encoded once; every question of it gets its features."""
    from flamingo_vlm.eval.datasets import VQADataset

    root, (model, ip, tok) = tiny
    train = VQADataset.from_root(root / "data" / "vqav2", "train", dataset="vqav2")
    images = [s["image"] for s in train]
    assert len(set(images)) < len(images)  # (the fixture asks several questions per image)
    ex = FeatureExtractor(model.vision_encoder, ip)
    encoded = []
    loader = lambda sample: encoded.append(sample["image"]) or VQADataset.load_image(sample)
    built = RICES.build(train, ex, batch_size=4, load_image=loader)
    assert sorted(encoded) == sorted(set(images))
    for i, sample in enumerate(train):
        torch.testing.assert_close(built.features[i], ex([VQADataset.load_image(sample)])[0], atol=1e-5, rtol=1e-5)


def test_rices_run(tiny, tmp_path):
    root, (model, ip, tok) = tiny
    cfg = EvalConfig(tasks=["coco"], data_root=str(root / "data"), out_dir=str(tmp_path), shots=[2], trials=1,
                     num_samples=2, batch_size=2, demo_selection="rices", caption_tokenizer="python", progress=False)
    Evaluator(model, ip, tok, cfg).run()
    unit = json.loads((tmp_path / "coco" / "shots2_seed42.json").read_text())
    assert unit["demo_selection"] == "rices" and unit["fingerprint"]["rices_vision_encoder"] == "model"
    assert list((tmp_path / "rices").glob("coco_train_*.pt"))
    # results.md says the demos were RICES' (the paper's RICES numbers are another table than random demos')
    assert "- coco: demo_selection = `rices`: demos chosen by image similarity" in (tmp_path / "results.md").read_text()


def test_classification_ensembling_and_continuation_ids(tiny, tmp_path):
    root, (model, ip, tok) = tiny
    ids = continuation_ids(tok, "Output:", "red circle")
    assert ids == tok("red circle", add_special_tokens=False)["input_ids"]  # byte-level BPE: same as alone
    assert demo_orders(2, 6, 0, 0) == [[0, 1], [1, 0]]
    perms = demo_orders(4, 6, 0, 3)
    assert len(perms) == 6 and len({tuple(p) for p in perms}) == 6 and perms[0] == [0, 1, 2, 3]
    cfg = EvalConfig(tasks=["imagenet"], data_root=str(root / "data"), out_dir=str(tmp_path), shots=[2], trials=1,
                     num_samples=2, batch_size=2, ensemble=True, progress=False)
    result = Evaluator(model, ip, tok, cfg).run()
    assert result["results"]["imagenet"][0]["metric"] == "top1"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_two_processes_match_one(tiny, tmp_path):
    """Two gloo processes evaluate disjoint shares whose union is what one process evaluates."""
    root, _ = tiny
    args = ["--model", str(root / "model"), "--data-root", str(root / "data"), "--tasks", "vqav2", "--shots", "0",
            "--trials", "1", "--batch-size", "1", "--num-samples", "5", "--quiet", "--device", "cpu"]
    assert eval_main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "flamingo_vlm.eval", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "vqav2" / "shots0_seed42.json").read_text())
    two = json.loads((tmp_path / "two" / "vqav2" / "shots0_seed42.json").read_text())
    ids = [p["id"] for p in two["predictions"]]
    assert len(ids) == len(set(ids)) == 5 and two["num_samples"] == 5
    assert two["predictions"] == one["predictions"] and two["score"] == one["score"]


def _hateful_memes(tmp_path: Path, *, dev: int, one_class: bool = False) -> Path:
    """A Hateful Memes folder of 4 train and ``dev`` dev memes (synthetic scenes), labels alternating
    (``one_class``: every dev label 0)."""
    from flamingo_vlm.synthetic import SceneGenerator as G

    hm = tmp_path / "hateful_memes"
    (hm / "img").mkdir(parents=True)
    g = G(seed=5)
    for split, n in (("train", 4), ("dev", dev)):
        lines = []
        for i in range(n):
            sid = 100 * (split == "dev") + i
            g.scene(sid, "test").render(32).save(hm / "img" / f"{sid:05d}.png")
            label = 0 if one_class and split == "dev" else i % 2
            lines.append(json.dumps({"id": sid, "img": f"img/{sid:05d}.png", "label": label, "text": f"meme number {i}"}))
        (hm / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return hm


def test_hateful_memes_run_reports_roc_auc(tiny, tmp_path):
    root, (model, ip, tok) = tiny
    hm = _hateful_memes(tmp_path, dev=6)
    cfg = EvalConfig(tasks=["hateful_memes"], task_roots={"hateful_memes": str(hm)}, out_dir=str(tmp_path / "out"),
                     shots=[0, 2], trials=1, batch_size=3, progress=False)
    result = Evaluator(model, ip, tok, cfg).run()
    rows = result["results"]["hateful_memes"]
    assert [r["metric"] for r in rows] == ["roc_auc", "roc_auc"] and all(0 <= r["mean"] <= 100 for r in rows)
    unit = json.loads((tmp_path / "out" / "hateful_memes" / "shots2_seed42.json").read_text())
    assert len(unit["predictions"]) == 6 and all(0 < p["p_yes"] < 1 for p in unit["predictions"])
    assert {"roc_auc", "accuracy"} == set(unit["metrics"])


def _strict_json(path: Path):
    """The file parsed as strict JSON: a bare NaN/Infinity (not JSON; JavaScript's JSON.parse refuses it) raises."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_score_that_does_not_exist_is_null_in_strict_json_and_nan_when_read_back(tiny, tmp_path, monkeypatch):
    """ROC-AUC of a dev set with one class is NaN: the unit and results.json said bare ``NaN``, which
    strict parsers refuse. It is ``null`` now; resuming reads it back as NaN, as do old files."""
    import math

    root, (model, ip, tok) = tiny
    hm = _hateful_memes(tmp_path, dev=3, one_class=True)  # the dev set holds one class: no ROC-AUC
    out = tmp_path / "out"

    def run():
        cfg = EvalConfig(tasks=["hateful_memes"], task_roots={"hateful_memes": str(hm)}, out_dir=str(out),
                         shots=[0], trials=1, batch_size=3, progress=False)
        return Evaluator(model, ip, tok, cfg).run()["results"]["hateful_memes"][0]

    first = run()
    assert math.isnan(first["mean"]) and math.isnan(first["metrics"]["roc_auc"])
    unit_file = out / "hateful_memes" / "shots0_seed42.json"
    unit = _strict_json(unit_file)
    assert unit["score"] is None and unit["metrics"]["roc_auc"] is None and unit["metrics"]["accuracy"] >= 0
    summary = _strict_json(out / "results.json")
    assert summary["results"]["hateful_memes"][0]["mean"] is None and summary["all_results"]["hateful_memes"][0]["trials"] == [None]
    from flamingo_vlm.eval.evaluator import Evaluator as E

    monkeypatch.setattr(E, "run_unit", lambda *a, **k: pytest.fail("a finished unit with a null score was evaluated again"))
    again = run()  # resumed from the file: the null score is NaN again, as when it was computed
    assert math.isnan(again["mean"]) and math.isnan(again["metrics"]["roc_auc"]) and again["trials"][0] != again["trials"][0]
    assert "| hateful_memes | roc_auc | nan |" in (out / "results.md").read_text()
    # a unit written by an older version, with bare NaN, is still read (and skipped)
    old = json.loads(unit_file.read_text())
    old["score"] = old["metrics"]["roc_auc"] = float("nan")
    unit_file.write_text(json.dumps(old))
    assert "NaN" in unit_file.read_text()
    assert math.isnan(run()["mean"])


def test_a_failed_write_leaves_the_previous_results_and_no_temporary_file(tiny, tmp_path, monkeypatch):
    """results.md was written in place (a full disk left it cut short) and a failed JSON write left
    its half-written temporary file behind; both now keep the previous file whole and remove it."""
    import errno

    from flamingo_vlm.eval import results

    root, (model, ip, tok) = tiny
    out = tmp_path / "out"
    cfg = lambda: EvalConfig(tasks=["imagenet"], data_root=str(root / "data"), out_dir=str(out), shots=[0], trials=1,
                             num_samples=1, progress=False)
    Evaluator(model, ip, tok, cfg()).run()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"results.json", "results.md"} <= set(before)
    calls = []

    def full_disk(fd):  # the disk fills up at the second file the resumed run writes (results.md)
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        Evaluator(model, ip, tok, cfg()).run()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "results.json"} == \
        {k: v for k, v in before.items() if k != "results.json"}
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not JSON: the file keeps what it held
        results.atomic_write_json(out / "results.json", {"x": object()})
    assert json.loads((out / "results.json").read_text())["results"]["imagenet"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_cli_synthetic_writes_data_then_evaluates(tiny, tmp_path):
    import argparse

    from flamingo_vlm.eval.cli import add_evaluate_subcommand

    root, _ = tiny
    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    add_evaluate_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", "--model", str(root / "model"), "--tasks", "vqav2", "--data-root",
                              str(tmp_path / "synth"), "--synthetic", "--shots", "0", "--trials", "1",
                              "--num-samples", "2", "--out", str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 0
    assert (tmp_path / "synth" / "vqav2" / "v2_mscoco_val2014_annotations.json").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["vqav2"][0]["num_samples"] == 2
    # another --synthetic-seed on that folder: its seed-0 data was evaluated, silently, as the other seed's
    args = parser.parse_args(["evaluate", "--model", str(root / "model"), "--tasks", "vqav2", "--data-root",
                              str(tmp_path / "synth"), "--synthetic", "--synthetic-seed", "1", "--out", str(tmp_path / "o"),
                              "--shots", "0", "--trials", "1", "--num-samples", "1", "--quiet"])
    with pytest.raises(UsageError, match=r"synth holds the synthetic benchmark of --synthetic-seed 0 .*not 1: give another "
                                         r"--data-root for seed 1, or --synthetic-seed 0"):
        args.func(args)


@pytest.mark.parametrize("flags, message", [(["--shots", "-1"], "shots must be non-negative"),
                                           (["--num-samples", "0"], "num_samples must be >= 1"),
                                           # a ZeroDivisionError traceback; "range() arg 3 must not be zero"
                                           (["--num-beams", "0"], "num_beams must be >= 1, got 0"),
                                           (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
                                           # silently ignored; transformers' error after the model loaded
                                           (["--max-new-tokens", "vqa3=4"],
                                            "max_new_tokens (--max-new-tokens): unknown task 'vqa3'; choose from coco"),
                                           (["--max-new-tokens", "vqav2=0"], "must be >= 1, got {'vqav2': 0}"),
                                           (["--task-root", "vqa3=x"], "task_roots (--task-root): unknown task 'vqa3'"),
                                           # a unit listed twice was reported as 2 trials of itself
                                           (["--tasks", "vqav2,vqa"], "tasks lists vqav2 more than once (--tasks: an alias"),
                                           (["--shots", "0,4,0"], "shots lists 0 more than once (--shots)"),
                                           (["--trials", "2", "--seeds", "5,5"], "seeds lists 5 more than once (--seeds)"),
                                           # ran seed 1 only / seeds 5 and 6 (OpenFlamingo asserted they agree)
                                           (["--trials", "1", "--seeds", "1", "2"], "--seeds gives 2 seed(s) but --trials is 1"),
                                           (["--trials", "2", "--seeds", "5"], "--seeds gives 1 seed(s) but --trials is 2"),
                                           # ran with no task and wrote an empty table
                                           (["--tasks", ","], "tasks is empty: name at least one"),
                                           # said "no folder for task 'hateful_memes' under ..." (it has no synthetic data)
                                           (["--tasks", "hm,coco", "--synthetic"],
                                            "hateful_memes has no synthetic data: give its own with --task-root"),
                                           # said after the model loaded and the captions were generated
                                           (["--tasks", "coco", "--caption-metrics", "cider,spice"],
                                            "caption_metrics (--caption-metrics): unknown ['spice']"),
                                           # every rerun evaluated its units again (NaN in their fingerprint)
                                           (["--length-penalty", "nan"], "length_penalty must be a finite number"),
                                           # RICES ranked demos by a randomly initialised ViT-L/14's features
                                           (["--rices", "--rices-vision-encoder", "ViT-L-14"],
                                            "rices_vision_encoder 'ViT-L-14' without weights: pass --rices-vision-pretrained")])
def test_cli_values_out_of_range_are_usage_errors_before_the_model_loads(flags, message, tmp_path, monkeypatch, capsys):
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: pytest.fail("the evaluation started"))
    tasks = [] if "--tasks" in flags else ["--tasks", "vqav2"]
    code = cli.main(["evaluate", "--model", "m", *tasks, "--data-root", str(tmp_path), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_synthetic_with_a_task_of_its_own_data_takes_its_task_root_by_alias(tmp_path, monkeypatch, capsys):
    """--task-root takes the aliases --tasks takes (okvqa for ok_vqa): the --synthetic check compared the
    raw key, and said "give its own with --task-root ok_vqa=PATH" to a user who had."""
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    seen = {}
    monkeypatch.setattr(evaluator, "evaluate", lambda model, config, **k: seen.setdefault("config", config))
    (tmp_path / "okvqa").mkdir()
    code = cli.main(["evaluate", "--model", "m", "--tasks", "okvqa", "--synthetic", "--data-root", str(tmp_path / "d"),
                     "--task-root", f"okvqa={tmp_path / 'okvqa'}", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0 and seen["config"].tasks == ["ok_vqa"], capsys.readouterr().err


@pytest.mark.parametrize("fp16_native", [False, True])
def test_fp16_on_a_cpu_without_float16_arithmetic_gets_a_note(fp16_native, tmp_path, monkeypatch, capsys):
    """`evaluate --precision fp16` on a CPU where torch emulates float16 (several times slower) says so,
    naming evaluate's own flag, as `generate --dtype float16` does; where it is native, nothing."""
    import torch

    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16_native, raising=False)
    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: {"ran": True})
    common = ["evaluate", "--model", "m", "--tasks", "vqav2", "--data-root", str(tmp_path), "--device", "cpu",
              "--quiet", "--out", str(tmp_path / "out")]
    assert cli.main([*common, "--precision", "fp16"]) == 0
    err = capsys.readouterr().err
    assert ("note: this CPU has no float16 arithmetic" in err and "--precision fp32 or bf16" in err) is not fp16_native
    assert cli.main([*common, "--precision", "bf16"]) == 0 and "note:" not in capsys.readouterr().err


def test_an_out_that_is_a_file_is_a_usage_error_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`--out notes.txt` (or a folder under a file) said "[Errno 17] File exists: ..." once the model had
    loaded."""
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    monkeypatch.setattr(evaluator, "evaluate", lambda *a, **k: pytest.fail("the evaluation started"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for out in (notes, notes / "results"):
        code = cli.main(["evaluate", "--model", "m", "--tasks", "vqav2", "--data-root", str(tmp_path), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"{notes} is a file, not a folder" in err and err.count("\n") == 1, err
    assert notes.read_text() == "mine\n"


@pytest.mark.parametrize("tasks, message", [("cocoo", "--tasks: unknown task 'cocoo'; choose from coco,"),
                                             ("coco, vqa3", "--tasks: unknown task 'vqa3'")])
def test_an_unknown_task_is_a_usage_error(tmp_path, capsys, tasks, message):
    from flamingo_vlm import cli

    code = cli.main(["evaluate", "--model", "m", "--tasks", tasks, "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("flamingo-vlm evaluate: error: ") and message in err and err.count("\n") == 1


def test_a_max_new_tokens_that_is_no_number_names_the_flag(tmp_path, capsys):
    from flamingo_vlm import cli

    code = cli.main(["evaluate", "--model", "m", "--tasks", "vqav2", "--data-root", str(tmp_path), "--max-new-tokens",
                     "vqav2=abc"])  # said "invalid literal for int() with base 10: 'abc'"
    assert code != 0 and "--max-new-tokens takes TASK=VALUE with an integer VALUE, got 'vqav2=abc'" in capsys.readouterr().err


def test_python_m_flamingo_vlm_eval_says_bad_input_in_one_line(tmp_path, capsys):
    """``python -m flamingo_vlm.eval`` (what torchrun starts on every rank) printed a traceback for bad
    input, on every rank; it says it in one line, as ``flamingo-vlm evaluate`` does."""
    from flamingo_vlm.eval.cli import entry

    assert entry(["--tasks", "coco", "--data-root", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m flamingo_vlm.eval: error: --data-root ") and "does not exist" in err
    assert "Traceback" not in err
    assert entry(["--tasks", "coco", "--data-root", str(tmp_path), "--num-samples", "0"]) == 2
    assert "error: num_samples must be >= 1" in capsys.readouterr().err
    assert "from .cli import entry" in (REPO / "src" / "flamingo_vlm" / "eval" / "__main__.py").read_text()


def test_meteor_without_java_is_refused_before_the_model_loads(monkeypatch):
    from flamingo_vlm.eval import metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.raises(ValueError, match="meteor needs Java"):  # said after the captions were generated
        EvalConfig(tasks=["coco"], data_root=".", caption_metrics=["cider", "meteor"]).validate()
    EvalConfig(tasks=["vqav2"], data_root=".", caption_metrics=["cider", "meteor"]).validate()  # (no captioning)


class _Oracle:
    """Stands in for the model: answers from the ground truth of the query image it is shown, so
    the whole pipeline (prompts, ids, post-processing, gathering, metrics) must score it perfectly."""

    def __init__(self, model, ip, tok, samples):
        from collections import Counter

        from flamingo_vlm.eval.datasets import EvalDataset

        self.model, self.tok, self.device, self.vision_encoder = model, tok, torch.device("cpu"), model.vision_encoder
        self.media_id = tok.convert_tokens_to_ids("<image>")
        self.truth = {}
        for s in samples:
            key = (ip(EvalDataset.load_image(s)).numpy().tobytes(), s.get("question"))
            if "answers" in s:
                self.truth[key] = Counter(s["answers"]).most_common(1)[0][0]
            else:
                self.truth[key] = s.get("caption") or s["class_name"]

    def eval(self):
        return self

    def _query(self, vision_x, input_ids, b):
        n = int((input_ids[b] == self.media_id).sum())
        text = self.tok.decode(input_ids[b], skip_special_tokens=True)
        question = text.rsplit("Question:", 1)[1].rsplit(" Short answer:", 1)[0] if "Question:" in text else None
        return self.truth[(vision_x[b, n - 1, 0].numpy().tobytes(), question)]

    def generate(self, vision_x, input_ids, attention_mask, **kw):
        rows = [self.tok(self._query(vision_x, input_ids, b) + "<|endofchunk|>", add_special_tokens=False)["input_ids"]
                for b in range(input_ids.shape[0])]
        new = torch.full((len(rows), max(map(len, rows))), self.tok.pad_token_id)
        for b, r in enumerate(rows):
            new[b, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)

    def score(self, vision_x, input_ids, candidates, attention_mask, **kw):
        out = torch.full((input_ids.shape[0], len(candidates)), -5.0)
        for b in range(input_ids.shape[0]):
            right = continuation_ids(self.tok, "Output:", self._query(vision_x, input_ids, b))
            out[b, candidates.index(right)] = 0.0
        return out


def test_oracle_predictions_score_perfectly(tiny, tmp_path):
    root, (model, ip, tok) = tiny
    from flamingo_vlm.eval.tasks import get_task

    samples = []
    for task, folder in (("coco", "mscoco_karpathy"), ("vqav2", "vqav2"), ("imagenet", "imagenet")):
        spec = get_task(task)
        samples += list(spec.load(root / "data" / folder, spec.eval_split))
    oracle = _Oracle(model, ip, tok, samples)
    cfg = EvalConfig(tasks=["coco", "vqav2", "imagenet"], data_root=str(root / "data"), out_dir=str(tmp_path), shots=[0, 2],
                     trials=1, batch_size=2, caption_tokenizer="python", progress=False)
    results = Evaluator(oracle, ip, tok, cfg).run()["results"]
    assert all(r["mean"] == 100.0 for r in results["vqav2"])
    assert all(r["mean"] == 100.0 and r["metrics"]["top5"] == 100.0 for r in results["imagenet"])
    unit = json.loads((tmp_path / "coco" / "shots2_seed42.json").read_text())
    coco = {s["id"]: s for s in get_task("coco").load(root / "data" / "mscoco_karpathy", "test")}
    assert [p["prediction"] for p in unit["predictions"]] == [coco[p["id"]]["caption"] for p in unit["predictions"]]
    assert unit["metrics"]["BLEU_1"] > 90 and unit["score"] > 0


def test_a_second_run_on_the_same_out_dir_is_refused(tiny, tmp_path):
    """Two resumable runs writing the same units at once would each trust the other's half; the
    second one is refused with the holder's pid, and a holder that dies releases the directory."""
    from flamingo_vlm.locking import DirectoryBusy, exclusive_directory

    root, _ = tiny
    out = tmp_path / "out"
    with exclusive_directory(out):
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {os.getpid()}\)"):
            _cli(root, out)
    assert not list(out.glob("*/shots*_seed*.json")) and not (out / "results.json").exists()

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom flamingo_vlm.locking import exclusive_directory\n"
         "with exclusive_directory(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=rf"pid {holder.pid}\b"):
            with exclusive_directory(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_directory(out):  # the dead holder left nothing to clean up
        pass


def test_scores_are_split_by_whether_the_query_shows_a_held_out_pair(tiny, tmp_path):
    """The synthetic benchmark lists the evaluation ids that show a (shape, colour) pair held out of
    training; every unit then also scores those and the others. An oracle that is wrong exactly on
    the listed ids must score 0 on them and 100 on the rest."""
    from flamingo_vlm.eval.datasets import EvalDataset
    from flamingo_vlm.eval.evaluator import held_out_ids
    from flamingo_vlm.eval.tasks import get_task

    _, (model, ip, tok) = tiny
    gen = SceneGenerator(seed=3, shapes=("circle", "square", "star"), colors=("red", "blue"), n_held_out=1,
                         held_out_rate=0.5)
    write_synthetic_benchmark(tmp_path / "data", generator=gen, tasks=("vqav2", "imagenet"), n_train=6, n_val=1,
                              n_test=8, n_class_train_per_class=1, n_class_val_per_class=1, image_size=32)
    samples, held = [], set()
    for task, folder in (("vqav2", "vqav2"), ("imagenet", "imagenet")):
        spec = get_task(task)
        samples += list(spec.load(tmp_path / "data" / folder, spec.eval_split))
        held |= held_out_ids(tmp_path / "data" / folder)
    oracle = _Oracle(model, ip, tok, samples)
    wrong = 0
    for s in samples:
        if str(s["id"]) in held:
            key = (ip(EvalDataset.load_image(s)).numpy().tobytes(), s.get("question"))
            oracle.truth[key] = "not an answer" if "answers" in s else next(
                c for c in gen.classes() if c != s["class_name"])
            wrong += 1
    assert 0 < wrong < len(samples)
    cfg = EvalConfig(tasks=["vqav2", "imagenet"], data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                     shots=[0], trials=1, batch_size=4, progress=False)
    results = Evaluator(oracle, ip, tok, cfg).run()["results"]
    for task in ("vqav2", "imagenet"):
        metrics = results[task][0]["metrics"]
        assert metrics["held_out_pairs"] == {"shown": 0.0, "not_shown": 100.0}
        assert sum(metrics["held_out_pairs_samples"].values()) == results[task][0]["num_samples"]
    assert held_out_ids(tmp_path) is None  # a folder without a list: no split


def test_units_of_another_model_saved_at_the_same_path_are_evaluated_again(tiny, tmp_path, monkeypatch):
    root, (model, ip, tok) = tiny
    path, out = tmp_path / "model", tmp_path / "out"

    def run():
        return eval_main(["--model", str(path), "--data-root", str(root / "data"), "--out", str(out),
                          "--tasks", "vqav2", "--shots", "0", "--trials", "1", "--num-samples", "2", "--quiet"])

    model.save_pretrained(path, tokenizer=tok, image_processor=ip)
    assert run() == 0
    ran = []
    original = Evaluator.run_unit
    monkeypatch.setattr(Evaluator, "run_unit", lambda self, spec, *a, **k: ran.append(spec.name) or original(self, spec, *a, **k))
    assert run() == 0 and ran == []  # the same weights: nothing to redo
    other, _, _ = tiny_flamingo("llama", max_position_embeddings=512)  # the same architecture and weights
    with torch.no_grad():
        next(p for p in other.parameters() if p.requires_grad).mul_(0.5)  # ... as after more training
    other.save_pretrained(path, tokenizer=tok, image_processor=ip)
    assert run() == 0 and ran == ["vqav2"]


def test_one_beam_passes_no_length_penalty_so_transformers_does_not_warn(tiny, tmp_path):
    """``length_penalty`` only applies to beam search: with ``--num-beams 1`` transformers warned
    "generation flags are not valid ... ['length_penalty']" to every user of ``evaluate``."""
    import logging

    from transformers.utils import logging as hf_logging

    _, (model, ip, tok) = tiny
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # said once per process: a test before this one may have said it
    try:
        for beams in (1, 2):
            cfg = EvalConfig(tasks=["vqav2"], data_root=str(tiny[0] / "data"), out_dir=str(tmp_path / str(beams)),
                             shots=[0], trials=1, num_samples=2, batch_size=2, num_beams=beams, progress=False)
            Evaluator(model, ip, tok, cfg).run()
    finally:
        hf_logger.removeHandler(handler)
    assert not [m for m in messages if "length_penalty" in m], messages


def test_quantized_and_reduced_precision_runs_say_so_in_the_results(tiny, tmp_path):
    """``--quantize`` entered the units' fingerprints but not results.md / results.json, so a table of
    int8 numbers read like the full-precision model's; it is now listed with the scoring settings."""
    root, _ = tiny
    out = tmp_path / "out"
    assert eval_main(["--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(out),
                      "--tasks", "vqav2", "--shots", "0", "--trials", "1", "--num-samples", "2", "--quiet",
                      "--quantize", "int8"]) == 0
    md = (out / "results.md").read_text()
    assert "- vqav2: quantize = `int8+head`: weight-only int8" in md, md
    assert json.loads((out / "results.json").read_text())["results"]["vqav2"][0]["scoring"]["quantize"] == "int8+head"
    out = tmp_path / "bf16"
    assert eval_main(["--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(out),
                      "--tasks", "vqav2", "--shots", "0", "--trials", "1", "--num-samples", "2", "--quiet",
                      "--precision", "bf16"]) == 0
    md = (out / "results.md").read_text()
    assert "- vqav2: precision = `bf16`: weights cast to bf16" in md and "quantize" not in md, md


@pytest.mark.parametrize("flags, message", [
    (["--shots", "0,2,8"], r"coco: --shots 8 needs 8 demonstrations, but its train split in .*mscoco_karpathy holds 6; "
                           r"use --shots up to 6$"),
    (["--shots", "0,4", "--query-set-size", "3"], r"coco: --shots 4 needs 4 demonstrations, but --query-set-size is 3; "
                                                  r"use --shots up to 3 or give a larger --query-set-size$"),
    (["--shots", "0", "--query-set-size", "1"], r"coco: 0 shots uses 2 text-only demonstrations, but --query-set-size is 1"),
    (["--shots", "8", "--rices"], r"coco: --shots 8 needs 8 demonstrations, but its train split"),
])
def test_more_shots_than_the_demo_pool_is_refused_before_any_unit(tiny, tmp_path, flags, message):
    """It failed at the first unit that asked for too many ("asked for 8 demos but the query set holds
    6 examples", naming neither task nor flag), after the smaller shot counts had been evaluated."""
    root, _ = tiny
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        eval_main(["--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(out),
                   "--tasks", "coco", "--trials", "1", "--num-samples", "2", "--caption-tokenizer", "python",
                   "--quiet", *flags])
    assert not list(out.glob("*/shots*.json"))


def test_a_missing_dataset_folder_is_said_before_the_model_loads(tiny, tmp_path, monkeypatch):
    from flamingo_vlm import pretrained
    from flamingo_vlm.eval.datasets import DatasetLayoutError

    root, _ = tiny
    monkeypatch.setattr(pretrained, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(DatasetLayoutError, match=r"no folder for task 'ok_vqa' under .*data \(tried okvqa, ok_vqa\); "
                                                 r"pass --task-root ok_vqa=PATH"):
        eval_main(["--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(tmp_path),
                   "--tasks", "vqav2,ok_vqa", "--shots", "0", "--trials", "1", "--quiet"])


# Every file and folder each task's loaders look for first (empty: the check before the model loads reads nothing).
_TASK_FILES = {
    "coco": ["mscoco_karpathy/dataset_coco.json"],
    "flickr30k": ["flickr30k/dataset_flickr30k.json", "flickr30k/flickr30k-images/"],
    "vqav2": [f"vqav2/{f}" for s in ("train", "val") for f in (
        f"v2_OpenEnded_mscoco_{s}2014_questions.json", f"v2_mscoco_{s}2014_annotations.json", f"{s}2014/")],
    "ok_vqa": [f"okvqa/{f}" for s in ("train", "val") for f in (
        f"OpenEnded_mscoco_{s}2014_questions.json", f"mscoco_{s}2014_annotations.json", f"{s}2014/")],
    "textvqa": [f"textvqa/{s}_{k}_vqa_format.json" for s in ("train", "val") for k in ("questions", "annotations")]
               + ["textvqa/train_images/"],
    "vizwiz": [f"vizwiz/{f}" for s in ("train", "val") for f in (
        f"{s}_questions_vqa_format.json", f"{s}_annotations_vqa_format.json", f"{s}/")],
    "hateful_memes": ["hateful_memes/train.jsonl", "hateful_memes/dev.jsonl", "hateful_memes/img/"],
    "imagenet": ["imagenet/classnames.txt", "imagenet/train/n00000001/", "imagenet/val/n00000001/"],
    "synthetic_icl": ["synthetic_icl/episodes.json"],
}


@pytest.fixture(scope="module")
def icl_data(tmp_path_factory) -> tuple[Path, int]:
    """A tiny synthetic_icl folder and how many demonstrations each of its queries brings."""
    data = tmp_path_factory.mktemp("icl") / "data"
    write_synthetic_benchmark(data, tasks=["synthetic_icl"], n_test=3, image_size=32)
    return data, len(json.loads((data / "synthetic_icl" / "episodes.json").read_text())["episodes"][0]["demos"])


@pytest.fixture(scope="module")
def formats(tmp_path_factory, icl_data) -> Path:
    """Every task's folder, in the formats the datasets are published in (``eval_formats``), and synthetic_icl."""
    import shutil

    data = write_eval_datasets(tmp_path_factory.mktemp("formats") / "data")
    shutil.copytree(icl_data[0] / "synthetic_icl", data / "synthetic_icl")
    return data


def _copy(formats: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(formats, tmp_path / "data"))


@pytest.mark.parametrize("missing", [f if f.count("/") < 3 else f.rsplit("/", 2)[0] + "/"  # imagenet/val/
                                     for files in _TASK_FILES.values() for f in files])
def test_a_missing_dataset_file_is_said_before_the_model_loads(formats, tmp_path, no_model_load, missing):
    """A dataset folder without one of its files (an annotation file, a split folder) was said only
    when its task came up: after the model had loaded and the tasks before it had run."""
    import shutil

    from flamingo_vlm.eval.datasets import DatasetLayoutError

    Loaded = no_model_load
    data = _copy(formats, tmp_path)
    argv = ["--model", "some/model", "--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks",
            ",".join(_TASK_FILES), "--shots", "0", "--trials", "1", "--quiet"]
    with pytest.raises(Loaded):  # every file there: the model loads
        eval_main(argv)
    shutil.rmtree(data / missing) if missing.endswith("/") else (data / missing).unlink()
    task = next(t for t, files in _TASK_FILES.items() if any(f.startswith(missing) for f in files))
    named = "no class-name file" if missing.endswith("classnames.txt") else (data / missing.rstrip("/")).name
    with pytest.raises(DatasetLayoutError, match=rf"{named}.* \(the folder {data}/\w+ is from --data-root {data}; "
                                                 rf"another folder: --task-root {task}=PATH\)$"):
        eval_main(argv)


def test_more_shots_than_the_episodes_bring_is_said_before_the_model_loads(icl_data, tmp_path, no_model_load):
    """synthetic_icl's queries bring their own demonstrations: more shots were refused only after the
    model had loaded (minutes), when the task came up."""
    data, n = icl_data
    argv = ["--model", "some/model", "--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks", "icl",
            "--trials", "1", "--quiet", "--shots"]
    with pytest.raises(ValueError, match=rf"^synthetic_icl: --shots {n + 1} needs {n + 1} demonstrations per query, "
                                         rf"but the queries in {data / 'synthetic_icl'} bring {n}; "
                                         rf"use --shots up to {n}$"):
        eval_main(argv + [f"0,{n + 1}"])
    with pytest.raises(no_model_load):  # as many as they bring: the model loads
        eval_main(argv + [f"0,{n}"])


def _as_a_user(monkeypatch):
    """Root reads files whatever their mode: make the checks see mode bits as any other user would."""
    if os.geteuid() != 0:
        return
    import builtins
    import stat

    real_open, real_access = builtins.open, os.access

    def unreadable(path) -> bool:
        try:
            return not os.stat(path).st_mode & stat.S_IRUSR
        except (OSError, TypeError):
            return False

    def user_open(file, *args, **kwargs):
        if unreadable(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", user_open)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not unreadable(path) and real_access(path, mode, **kw))


def test_an_unreadable_dataset_file_is_said_before_the_model_loads(tiny, icl_data, tmp_path, no_model_load,
                                                                   monkeypatch):
    """An annotation file without read permission (or an episode image) failed only when its task
    came up, after the model had loaded and the tasks before it had run."""
    import shutil

    from flamingo_vlm.eval.datasets import DatasetLayoutError

    data = tmp_path / "data"
    shutil.copytree(tiny[0] / "data", data)
    shutil.copytree(icl_data[0] / "synthetic_icl", data / "synthetic_icl")
    argv = ["--model", "some/model", "--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks",
            "coco,vqav2,icl", "--shots", "0,2", "--trials", "1", "--quiet"]
    _as_a_user(monkeypatch)
    with pytest.raises(no_model_load):
        eval_main(argv)
    annotations = data / "vqav2" / "v2_mscoco_val2014_annotations.json"
    image = data / "synthetic_icl" / json.loads((data / "synthetic_icl" / "episodes.json").read_text())[
        "episodes"][1]["demos"][0]["image"]
    try:
        annotations.chmod(0)
        with pytest.raises(DatasetLayoutError, match=rf"^cannot read the file {annotations} \(Permission denied\).* "
                                                     rf"\(the folder {data / 'vqav2'} is from --data-root {data}"):
            eval_main(argv)
        annotations.chmod(0o644)
        image.chmod(0)
        with pytest.raises(DatasetLayoutError, match=rf"^the image {image}, named in .*episodes.json, cannot be read"):
            eval_main(argv)
    finally:
        annotations.chmod(0o644)
        image.chmod(0o644)


def test_the_cli_checks_each_tasks_files_once(tiny, tmp_path, monkeypatch):
    """`flamingo-vlm evaluate` checked every task's files before the model loaded, then again in the
    evaluator's run."""
    from flamingo_vlm.eval import evaluator

    root, _ = tiny
    calls = []
    from flamingo_vlm.eval.task_kinds import Task

    real, load = evaluator.check_task_files, Task.load
    loads = []
    monkeypatch.setattr(evaluator, "check_task_files", lambda spec, *a, **k: calls.append(spec.name) or real(spec, *a, **k))
    monkeypatch.setattr(Task, "load", lambda self, root, split: loads.append((self.name, split)) or load(self, root, split))
    assert eval_main(["--model", str(root / "model"), "--data-root", str(root / "data"), "--out", str(tmp_path / "o"),
                      "--tasks", "vqav2,imagenet", "--shots", "0", "--trials", "1", "--num-samples", "1",
                      "--quiet"]) == 0
    assert calls == ["vqav2", "imagenet"]
    # each split read once: by the check before the model loads, whose samples the run then uses
    assert loads == [("vqav2", "train"), ("vqav2", "val"), ("imagenet", "train"), ("imagenet", "val")]


def test_an_evaluator_checks_every_task_before_the_first_unit(tiny, tmp_path):
    """With the model already built (the Python API), a task's missing file is said before the tasks
    before it run (they ran, maybe for hours, then the error came)."""
    import shutil

    from flamingo_vlm.eval.datasets import DatasetLayoutError

    root, (model, ip, tok) = tiny
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    (data / "vqav2" / "v2_mscoco_val2014_annotations.json").unlink()
    cfg = EvalConfig(tasks=["coco", "vqav2"], data_root=str(data), out_dir=str(tmp_path / "out"), shots=[0], trials=1,
                     num_samples=1, caption_tokenizer="python", progress=False)
    with pytest.raises(DatasetLayoutError, match=r"v2_mscoco_val2014_annotations.json"):
        Evaluator(model, ip, tok, cfg).run()
    assert not list((tmp_path / "out").glob("*/shots*.json"))


def test_task_aliases_key_task_roots_and_max_new_tokens():
    """``--max-new-tokens vqa=1`` and ``--task-root vqa=DIR`` (``vqa`` is vqav2's alias, as in --tasks)
    were silently ignored: both dicts are keyed by the task's own name."""
    from flamingo_vlm.eval.tasks import get_task

    cfg = EvalConfig(tasks=["vqa"], max_new_tokens={"vqa": 1}, task_roots={"VQA": "somewhere"})
    cfg.validate()  # (no data_root: the alias gives vqav2 its root)
    assert get_task("vqav2").new_tokens(cfg) == 1
    assert cfg.task_roots == {"vqav2": "somewhere"}


def _jpeg(path: Path, size: int = 64) -> bytes:
    """A JPEG of noise (so that it has some length), written to ``path``; its bytes."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path.read_bytes()


def _edit(path: Path, change) -> None:
    path.write_text(change(path.read_text()))


def _cut(path: Path) -> None:
    data = _jpeg(path)
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("task, shots, spoil, message", [
    ("vqav2", "0", lambda d: (d / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(""),
     r"annotations file \S+/vqav2/v2_mscoco_val2014_annotations.json is not valid JSON"),
    ("vqav2", "0", lambda d: (d / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(
        (d / "vqav2" / "v2_mscoco_train2014_annotations.json").read_text()),
     r"v2_mscoco_val2014_annotations.json: 2 question\(s\) of \S+v2_OpenEnded_mscoco_val2014_questions.json have no "
     r"annotation"),
    ("coco", "0", lambda d: (d / "mscoco_karpathy" / "dataset_coco.json").write_text(
        (d / "mscoco_karpathy" / "dataset_coco.json").read_text().replace('"test"', '"val"')),
     r"dataset_coco.json: no entries in split 'test'"),
    ("hateful_memes", "0", lambda d: (d / "hateful_memes" / "dev.jsonl").write_text("{oops\n"),
     r"dev.jsonl:1: expected a JSON line"),
    # said "entry 0 lacks 'split'" and "has no 'questions' list"
    ("coco", "0", lambda d: (d / "mscoco_karpathy" / "dataset_coco.json").write_text(json.dumps(
        {"images": [{"id": 5, "file_name": "COCO_val2014_000000000005.jpg"}], "annotations": [{"image_id": 5}]})),
     r"dataset_coco.json is a COCO captions file \(captions_\*.json: 'images' and 'annotations'\), not Karpathy's"),
    ("vqav2", "0", lambda d: (d / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        (d / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text()),
     r"questions.json has no 'questions' list; .*; it holds 'annotations': the questions and annotations files swapped\?"),
    # contents the loader took, which failed after the unit had run (KeyError: 'label'; "vqa_accuracy needs at
    # least one human answer") or were evaluated twice (a question id listed twice)
    ("hateful_memes", "0", lambda d: _edit(d / "hateful_memes" / "dev.jsonl", lambda t: t.replace('"label": 0, ', "")),
     r"dev.jsonl: 1 example\(s\) have no 'label' \(e.g. id 20\); the evaluation needs labelled splits"),
    ("vqav2", "0", lambda d: _edit(d / "vqav2" / "v2_mscoco_val2014_annotations.json",
                                   lambda t: t.replace('"answers": [{', '"answers": [], "x": [{', 1)),
     r"v2_mscoco_val2014_annotations.json: annotation 0 \(question_id 107\) has no answers"),
    ("textvqa", "0", lambda d: _edit(d / "textvqa" / "val_questions_vqa_format.json",
                                     lambda t: t.replace('"question_id": 203', '"question_id": 103')),
     r"val_questions_vqa_format.json: question_id 103 occurs twice \(question 1 and an earlier one\)"),
    ("flickr30k", "0,3", lambda d: (d / "flickr30k" / "dataset_flickr30k.json").write_text(
        (d / "flickr30k" / "dataset_flickr30k.json").read_text().replace('"train"', '"val"', 1)),
     r"flickr30k: --shots 3 needs 3 demonstrations, but its train split in \S+ holds 2; use --shots up to 2$"),
    # images: the evaluated ones, and the demonstrations' when shots > 0
    ("coco", "0", lambda d: (d / "mscoco_karpathy" / "val2014" / "COCO_val2014_000000000005.jpg").write_text("<html>"),
     r"the image \S+COCO_val2014_000000000005.jpg, named in \S+dataset_coco.json, is not an image PIL can read "
     r"\(UnidentifiedImageError: cannot identify image file\); replace it"),
    ("vqav2", "0", lambda d: _cut(d / "vqav2" / "val2014" / "COCO_val2014_000000000008.jpg"),
     r"the image \S+COCO_val2014_000000000008.jpg, named in \S+v2_OpenEnded_mscoco_val2014_questions.json, is cut short"),
    ("hateful_memes", "0", lambda d: (d / "hateful_memes" / "img" / "00021.png").write_bytes(b""),
     r"the image \S+00021.png, named in \S+dev.jsonl, is empty"),
    ("imagenet", "0,2", lambda d: _cut(d / "imagenet" / "train" / "n00000002" / "train_1_0.JPEG"),
     r"the image \S+train_1_0.JPEG, named in \S+imagenet/train, is cut short"),
    ("synthetic_icl", "0,2", lambda d: _cut(d / "synthetic_icl" / json.loads((d / "synthetic_icl" / "episodes.json")
                                                                            .read_text())["episodes"][0]["demos"][1]["image"]),
     r"the image \S+, named in \S+episodes.json, is cut short"),
])
def test_broken_dataset_contents_are_said_before_the_model_loads(formats, tmp_path, no_model_load, task, shots, spoil,
                                                                 message):
    """Malformed annotation files, a split that is not there, too many shots and corrupt images were
    said when the task came up, after the model had loaded and the tasks before it had run (a corrupt
    image: mid-unit, as "image file is truncated", naming no file)."""
    from flamingo_vlm.eval.datasets import DatasetLayoutError

    data = _copy(formats, tmp_path)
    argv = ["--model", "some/model", "--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks",
            f"imagenet,{task}" if task != "imagenet" else "coco,imagenet", "--shots", shots, "--trials", "2", "--quiet"]
    with pytest.raises(no_model_load):
        eval_main(argv)
    spoil(data)
    with pytest.raises((DatasetLayoutError, ValueError), match=message) as e:
        eval_main(argv)
    assert "\n" not in str(e.value)


def test_only_the_images_the_run_reads_are_checked(formats, tmp_path, no_model_load):
    """A bad demo-split image stops nothing at 0 shots (demonstrations are text only there), nor an
    evaluation image outside every trial's --num-samples subset."""
    data = _copy(formats, tmp_path)
    (data / "imagenet" / "train" / "n00000001" / "train_0_1.JPEG").write_text("<html>")
    argv = ["--model", "some/model", "--data-root", str(data), "--out", str(tmp_path / "out"), "--tasks", "imagenet",
            "--trials", "1", "--quiet", "--shots"]
    with pytest.raises(no_model_load):
        eval_main(argv + ["0"])
    with pytest.raises(Exception, match="train_0_1.JPEG"):
        eval_main(argv + ["0,2"])
    from flamingo_vlm.eval.evaluator import eval_order

    test = sorted((data / "imagenet" / "val").glob("*/*.JPEG"))
    (picked,) = eval_order(len(test), 42, 1)
    test[1 - picked].write_text("<html>")
    with pytest.raises(no_model_load):
        eval_main(argv + ["0", "--num-samples", "1"])
    with pytest.raises(Exception, match=test[1 - picked].name):
        eval_main(argv + ["0"])


def test_openflamingo_spellings_of_shots_trials_and_seeds():
    """`--shots 0 4 8`, `--num-trials`, `--trial-seeds` (OpenFlamingo's evaluate.py) failed as
    "unrecognized arguments"."""
    from flamingo_vlm.eval.cli import build_parser

    args = build_parser().parse_args(["--tasks", "coco", "--shots", "0", "4,8", "--num-trials", "2",
                                      "--trial-seeds", "42", "43"])
    assert (args.shots, args.trials, args.seeds) == ([0, 4, 8], 2, [42, 43])
    args = build_parser().parse_args(["--tasks", "coco", "--shots", "0,4", "--trials", "1", "--seeds", "7"])
    assert (args.shots, args.trials, args.seeds) == ([0, 4], 1, [7])


def test_rices_over_the_whole_split_runs_one_trial(tiny, tmp_path, caplog):
    """With RICES the demonstrations do not depend on the seed: over the whole split, --trials 2 evaluated
    the same unit twice and reported it as 2 trials, ± 0.00. With a --num-samples subset the trials differ."""
    root, (model, ip, tok) = tiny
    cfg = dict(tasks=["coco"], data_root=str(root / "data"), shots=[0, 2], trials=2, batch_size=3,
               demo_selection="rices", caption_tokenizer="python", progress=False)
    with caplog.at_level("WARNING", logger="flamingo_vlm.eval.evaluator"):
        Evaluator(model, ip, tok, EvalConfig(out_dir=str(tmp_path / "a"), **cfg)).run()
    assert sorted(p.name for p in (tmp_path / "a" / "coco").iterdir()) == ["shots0_seed42.json", "shots2_seed42.json"]
    assert [r["seeds"] for r in json.loads((tmp_path / "a" / "results.json").read_text())["results"]["coco"]] == [[42], [42]]
    assert [r.getMessage() for r in caplog.records if "trials is run" in r.getMessage()] == [
        "coco: every trial would evaluate the whole test split with the same demonstrations (RICES), so only the "
        "first of the 2 trials is run (seed 42); --num-samples N gives each trial its own subset"]
    Evaluator(model, ip, tok, EvalConfig(out_dir=str(tmp_path / "b"), num_samples=2, **cfg)).run()
    assert len(list((tmp_path / "b" / "coco").iterdir())) == 4


def test_units_of_other_data_in_the_same_folder_are_evaluated_again(tiny, tmp_path, caplog):
    """Annotations replaced by others with the same questions (OK-VQA v1.0 -> v1.1 changed only the
    answers) left the units of the old ones "done before", scores and all. Moving the folder keeps them,
    and a unit written before the data entered the fingerprint is still taken."""
    import shutil

    root, (model, ip, tok) = tiny
    data = Path(shutil.copytree(root / "data", tmp_path / "data"))
    out = tmp_path / "out"

    def run(data_root):
        cfg = EvalConfig(tasks=["vqav2"], data_root=str(data_root), out_dir=str(out), shots=[0], trials=1,
                         num_samples=2, batch_size=2, progress=False)
        with caplog.at_level("WARNING", logger="flamingo_vlm.eval.evaluator"):
            caplog.clear()
            Evaluator(model, ip, tok, cfg).run()
        return json.loads((out / "vqav2" / "shots0_seed42.json").read_text()), [
            r.getMessage() for r in caplog.records if "evaluating again" in r.getMessage()]

    first, again = run(data)
    assert again == [] and len(first["fingerprint"]["data"]) == 16
    moved = Path(shutil.move(str(data), str(tmp_path / "moved")))
    unit, again = run(moved)
    assert again == [] and unit["elapsed_s"] == first["elapsed_s"]  # the same unit, not evaluated again
    ann = moved / "vqav2" / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(ann.read_text())
    for a in doc["annotations"]:
        a["answers"] = [dict(x, answer="zebra") for x in a["answers"]]
    ann.write_text(json.dumps(doc))
    unit, again = run(moved)
    assert again == [f"{out / 'vqav2' / 'shots0_seed42.json'}: settings or data changed since it was written; "
                     "evaluating again"]
    assert unit["score"] == 0.0 and unit["fingerprint"]["data"] != first["fingerprint"]["data"]
    unit["fingerprint"].pop("data")  # a unit from before
    (out / "vqav2" / "shots0_seed42.json").write_text(json.dumps(unit))
    assert run(moved)[1] == []


def test_seeds_alone_set_the_number_of_trials(tmp_path, monkeypatch):
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    seen = []
    monkeypatch.setattr(evaluator, "evaluate", lambda model, config, **k: seen.append(config.trial_seeds()) or {})
    base = ["evaluate", "--model", "m", "--tasks", "vqav2", "--data-root", str(tmp_path), "--quiet"]
    for extra in (["--seeds", "7"], ["--seeds", "7,9"], [], ["--trials", "2"]):
        cli.main([*base, *extra])
    assert seen == [[7], [7, 9], [42, 43, 44], [42, 43]]


def test_a_prefix_cache_without_shared_demonstrations_gets_a_note(tmp_path, monkeypatch, capsys):
    """--prefix-cache-mb without --demo-selection shared silently did nothing."""
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator

    monkeypatch.setattr(evaluator, "evaluate", lambda model, config, **k: {})
    base = ["evaluate", "--model", "m", "--tasks", "vqav2", "--data-root", str(tmp_path), "--quiet", "--prefix-cache-mb", "64"]
    cli.main(base)
    assert "note: --prefix-cache-mb reuses demonstrations that queries share; with random" in capsys.readouterr().err
    cli.main([*base, "--demo-selection", "shared"])
    assert "note" not in capsys.readouterr().err


def test_scores_on_the_synthetic_benchmark_are_labelled_so(tiny, tmp_path):
    """Nothing in results.md or results.json said the data was synthetic: copied out, the table read
    as real COCO CIDEr."""
    root, _ = tiny
    out = tmp_path / "out"
    assert _cli(root, out, "--tasks", "coco,vqav2", "--shots", "0") == 0
    md = (out / "results.md").read_text()
    assert "| coco (synthetic) | CIDEr |" in md and "| vqav2 (synthetic) | accuracy |" in md
    assert "- coco: data = `synthetic`: flamingo-vlm's synthetic scenes" in md
    rows = json.loads((out / "results.json").read_text())["all_results"]["coco"]
    assert all(r["scoring"]["data"] == "synthetic" for r in rows)
    # units written before the label was are labelled when resumed
    unit = out / "coco" / "shots0_seed42.json"
    written = json.loads(unit.read_text())
    written["scoring"].pop("data")
    written["metrics"].pop("held_out_pairs", None)
    unit.write_text(json.dumps(written))
    assert _cli(root, out, "--tasks", "coco", "--shots", "0") == 0
    assert "| coco (synthetic) | CIDEr |" in (out / "results.md").read_text()


def test_synthetic_beside_a_real_dataset_gets_a_note(tmp_path, monkeypatch, capsys):
    """--synthetic on a data root with a real COCO wrote synthetic tasks beside it without a word, and
    the table mixed real and synthetic scores."""
    from flamingo_vlm import cli
    from flamingo_vlm.eval import evaluator
    from flamingo_vlm.synthetic import write_synthetic_benchmark

    monkeypatch.setattr(evaluator, "evaluate", lambda model, config, **k: {})
    write_synthetic_benchmark(tmp_path, tasks=("coco", "synthetic_icl"), n_train=2, n_val=1, n_test=1, image_size=16)
    (tmp_path / "mscoco_karpathy" / "held_out.json").unlink()  # (as a real dataset's folder)
    cli.main(["evaluate", "--model", "m", "--tasks", "coco,imagenet,icl", "--data-root", str(tmp_path), "--synthetic",
              "--quiet"])
    assert (f"note: coco under {tmp_path} is not the synthetic benchmark's: evaluated as found, beside synthetic "
            "imagenet") in capsys.readouterr().err


def test_a_data_root_that_is_not_there_is_said_so(tmp_path, no_model_load):
    """A --data-root with a typo said "no folder for task 'coco' under X", as if X held other things."""
    from flamingo_vlm.eval.datasets import DatasetLayoutError

    argv = ["--model", "some/model", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "out"),
            "--tasks", "coco", "--quiet"]
    with pytest.raises(DatasetLayoutError, match=rf"--data-root {tmp_path}/nope does not exist: give the folder that "
                                                 r"holds the task folders \(mscoco_karpathy"):
        eval_main(argv)


def test_an_eval_config_with_seeds_for_other_trials_is_refused():
    """EvalConfig(trials=3, seeds=[5]) ran seeds 5, 6 and 7; trials=1, seeds=[1, 2] seed 1 only."""
    from flamingo_vlm.eval.evaluator import EvalConfig

    for trials, seeds in ((3, [5]), (1, [1, 2])):
        with pytest.raises(ValueError, match=rf"seeds gives {len(seeds)} seed\(s\) but trials is {trials}"):
            EvalConfig(tasks=["vqav2"], data_root=".", trials=trials, seeds=seeds).validate()
    EvalConfig(tasks=["vqav2"], data_root=".", trials=2, seeds=[5, 9]).validate()
