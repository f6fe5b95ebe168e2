"""In-context episodes whose answer format only the demonstrations show (flamingo_vlm.synthetic.icl)
and their evaluation task (synthetic_icl)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from flamingo_vlm.synthetic import SceneGenerator
from flamingo_vlm.synthetic.icl import (
    FRAMINGS, LEXICONS, NONCE, PHRASINGS, QUESTION_TYPES, STYLE_AXES, WRAPS, icl_episode, write_icl_benchmark,
    write_icl_shards,
)
from flamingo_vlm.synthetic.render import COLORS, POSITIONS, SHAPES, SIZES

N = 60  # episodes per check (12 per question type)


def _episodes(split, n=N, shots=4):
    return [icl_episode(i, split=split, shots=shots, qtype=QUESTION_TYPES[i % 5]) for i in range(n)]


def test_same_seed_same_episode_and_files(tmp_path):
    a, b = icl_episode(7, split="train", shots=5), icl_episode(7, split="train", shots=5)
    assert a.texts() == b.texts() and a.style == b.style and a.answer_map == b.answer_map
    assert [s for s, _, _ in a.demos] == [s for s, _, _ in b.demos]
    other = icl_episode(7, split="train", shots=5, seed=1)
    assert other.texts() != a.texts() or [s for s, _, _ in other.demos] != [s for s, _, _ in a.demos]
    for name in ("x", "y"):
        write_icl_benchmark(tmp_path / name, n_episodes=5, shots=2, image_size=32)
    assert (tmp_path / "x/episodes.json").read_bytes() == (tmp_path / "y/episodes.json").read_bytes()
    images = sorted(p.name for p in (tmp_path / "x/images").iterdir())
    assert len(images) == 5 * 3
    assert all((tmp_path / "x/images" / f).read_bytes() == (tmp_path / "y/images" / f).read_bytes() for f in images)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_icl_benchmark(tmp_path / "x", n_episodes=1)


def test_held_out_values_are_disjoint_from_training_on_every_axis():
    for qt in QUESTION_TYPES:
        assert not set(PHRASINGS[qt]["train"]) & set(PHRASINGS[qt]["heldout"])
        assert not set(LEXICONS[qt]["train"]) & set(LEXICONS[qt]["heldout"])
    assert not set(FRAMINGS["train"]) & set(FRAMINGS["heldout"])
    assert not set(WRAPS["train"]) & set(WRAPS["heldout"])
    assert not set(NONCE["train"]) & set(NONCE["heldout"])
    for axis in STYLE_AXES.values():
        assert not set(axis["train"]) & set(axis["heldout"])
    # and the episodes drawn use them so: every axis of a held-out episode is unseen in training,
    # except the canonical answer map, the one value both splits share (about half the held-out episodes)
    seen = {"phrasing": set(), "framing": set(), "map": set(), "fill": set(), "background": set(), "labels": set()}

    def axes(ep):
        labels = set(ep.answer_map.table.values())
        return {"phrasing": {ep.phrasing}, "framing": {ep.framing}, "map": {ep.answer_map.name},
                "fill": {ep.style.fill}, "background": {ep.style.background}, "labels": labels}

    for ep in _episodes("train", 200, shots=1):
        for k, v in axes(ep).items():
            seen[k] |= v
    held = _episodes("heldout", 200, shots=1)
    canonical = sum(not ep.answer_format for ep in held)
    assert 0.3 * len(held) < canonical < 0.7 * len(held)
    for ep in held:
        for k, v in axes(ep).items():
            if k == "map" and not ep.answer_format:
                assert ep.answer_map.name in seen["map"]  # shared on purpose
                continue
            assert not v & seen[k], (k, v)


def _expected(scene, qtype, question):
    """The answer from the scene description alone, reading which object the question names."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    shape = next((s for s in SHAPES if s in words or s + "s" in words), None)
    color = next((c for c in COLORS if c in words), None)
    if qtype == "word":
        return scene.text
    if qtype == "count":
        return str(sum(o.shape == shape for o in scene.objects) if shape else len(scene.objects))
    matches = [o for o in scene.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)]
    assert len(matches) == 1, (question, scene.objects)  # the question names exactly one object
    return {"color": matches[0].color, "shape": matches[0].shape, "position": matches[0].position}[qtype]


def _check_drawn(scene, style, size=96):
    """The pixels agree with the description: each object's colour is drawn around its own
    position (in its third of the image), shapes do not touch, the word's box holds dark ink."""
    plain = dataclasses.replace(style, blur=0.0, outline=0)
    im = np.asarray(scene.render(size, plain)).astype(int)
    centres = []
    for o in scene.objects:
        ax, ay = POSITIONS[o.position]
        cx, cy = ax + o.offset[0], ay + o.offset[1]
        r = SIZES[o.size] * plain.scale
        centres.append((cx, cy, r))
        assert r < cx < 1 - r and r < cy < 1 - r  # inside the image
        box = im[int((cy - r) * size):int((cy + r) * size) + 1, int((cx - r) * size):int((cx + r) * size) + 1]
        ink = (np.abs(box - np.asarray(COLORS[o.color])).sum(-1) == 0).sum()
        assert ink >= 6, (o, plain)
        third = {"left": cx < 0.34, "right": cx > 0.66, "top": cy < 0.34, "bottom": cy > 0.66,
                 "center": 0.34 < cx < 0.66 and 0.34 < cy < 0.66}[o.position]
        assert third, o
    for i, (x1, y1, r1) in enumerate(centres):
        for x2, y2, r2 in centres[i + 1:]:
            assert np.hypot(x1 - x2, y1 - y2) > r1 + r2
    if scene.text:
        l, t, r, b = scene.text_box(size)
        assert (im[t:b, l:r].sum(-1) < 300).sum() >= 3


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_answer_is_right_for_the_drawn_scene(split):
    gen = SceneGenerator(seed=0)
    for ep in _episodes(split, 40, shots=3):
        for k, (scene, question, answer) in enumerate(ep.demos + [ep.query]):
            value = _expected(scene, ep.qtype, question)
            assert answer == ep.answer_map.apply(value)
            if k == len(ep.demos):
                assert value == ep.value
            if split == "train":
                assert not gen.is_held_out(scene)
            if k < 2:
                _check_drawn(scene, ep.style)


def test_answer_values_are_balanced():
    for qt in ("color", "shape", "count", "position"):
        values = [icl_episode(i, shots=0, qtype=qt).value for i in range(150)]
        counts = np.unique(values, return_counts=True)[1]
        assert len(counts) == {"color": 6, "shape": 6, "count": 4, "position": 5}[qt]
        assert counts.min() >= 0.4 * counts.mean()


def test_answer_map_framing_and_phrasing_are_shared_within_an_episode():
    for ep in _episodes("train", 80, shots=6) + _episodes("heldout", 40, shots=6):
        amap = ep.answer_map
        by_value = {}
        for scene, question, answer in ep.demos + [ep.query]:
            value = _expected(scene, ep.qtype, question)
            by_value.setdefault(value, set()).add(answer)
        assert all(len(a) == 1 for a in by_value.values())  # one answer per value
        assert len({a for s in by_value.values() for a in s}) == len(by_value)  # different values, different answers
        if amap.table:  # a made-up label map: one label per value, shown for the query in the first 4 demos
            assert len(set(amap.table.values())) == len(amap.table)
            assert ep.query[2] in [a for _, _, a in ep.demos[:4]]
        prefix, _, suffix = ep.framing.partition("{q}")
        for text, (_, question, answer) in zip(ep.texts(), ep.demos + [ep.query]):
            assert text == ep.framing.format(q=question, a=answer) and text.startswith(prefix.format())
        stems = {re.sub(r"\b(" + "|".join(SHAPES + tuple(COLORS)) + r")s?\b", "_", q) for _, q, _ in ep.demos}
        assert len(stems) == 1  # the same phrasing, only the object names change
        assert ep.chunk(ep.query[1]) + " " + ep.query[2] == ep.texts()[-1] or ep.framing.endswith(":{a}")


def _members(path):
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_training_shards_and_cli(tmp_path):
    from flamingo_vlm.cli import build_parser
    from flamingo_vlm.data import inspect_shards

    paths = write_icl_shards(tmp_path / "a", n_documents=4, shots=(1, 2), image_size=32, samples_per_shard=3)
    summary = inspect_shards([str(p) for p in paths], n=4)
    assert summary["samples"] == 4 and summary["corrupt"] == 0 and len(paths) == 2
    assert not (tmp_path / "a/source").exists()
    parallel = write_icl_shards(tmp_path / "w", n_documents=4, shots=(1, 2), image_size=32, samples_per_shard=3,
                                workers=2)
    assert [_members(p) for p in parallel] == [_members(p) for p in paths]  # same data whatever the workers
    args = build_parser().parse_args(["data", "icl-episodes", str(tmp_path / "b"), "--documents", "2", "--shots", "1,1",
                                      "--image-size", "32", "--split", "heldout"])
    assert args.func(args) == 0
    assert inspect_shards([str(tmp_path / "b")], n=2)["images"] == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "icl-episodes", str(tmp_path / "c"), "--split", "test"])
    with pytest.raises(ValueError, match="split must be one of"):
        icl_episode(0, split="test")


# -- the evaluation task ------------------------------------------------------------------------------------
def test_scoring_of_the_task():
    from flamingo_vlm.eval.task_kinds import EvalDataset, IclTask
    from flamingo_vlm.eval.tasks import get_task

    task = get_task("icl")
    assert isinstance(task, IclTask) and task.name == "synthetic_icl"
    samples = [
        {"id": 0, "question_type": "color", "lexicon": "german", "answer_format": True, "answer": "It's Rot.",
         "content_answers": ["red", "rot", "rouge"]},
        {"id": 1, "question_type": "color", "lexicon": "canonical", "answer_format": False, "answer": "red",
         "content_answers": ["red", "rot"]},
        {"id": 2, "question_type": "count", "lexicon": "canonical", "answer_format": False, "answer": "2",
         "content_answers": ["2", "two"]},
    ]
    records = [{"id": 0, "prediction": "It's  Rot."}, {"id": 1, "prediction": "rot"}, {"id": 2, "prediction": "3"}]
    m = task.score(EvalDataset(samples, "heldout"), records, None)["metrics"]
    assert m["accuracy"] == pytest.approx(100 / 3) and m["content_accuracy"] == pytest.approx(200 / 3)
    assert m["per_question_type"] == {"color": 50.0, "count": 0.0}
    assert m["answer_format_split"] == 100.0 and m["per_answer_format"]["False"] == 0.0
    assert IclTask.cut("blau\nQ. next", "Q. {q} A. {a}") == "blau"
    assert IclTask.cut(" It's blau. Q. What", "Q. {q} A. {a}") == "It's blau."


def test_task_runs_in_the_harness(tmp_path):
    from tiny import tiny_flamingo

    from flamingo_vlm.eval.evaluator import EvalConfig, evaluate
    from flamingo_vlm.synthetic import write_synthetic_benchmark

    write_synthetic_benchmark(tmp_path / "data", tasks=["synthetic_icl"], n_test=5, image_size=32)
    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=512)
    cfg = EvalConfig(tasks=["icl"], data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), shots=[0, 2],
                     trials=1, batch_size=3, progress=False)
    results = evaluate(model, cfg, image_processor=ip, tokenizer=tok)["results"]["synthetic_icl"]
    assert [r["shots"] for r in results] == [0, 2]
    for r in results:
        assert r["num_samples"] == 5 and set(r["metrics"]["per_question_type"]) == set(QUESTION_TYPES)
        assert 0 <= r["metrics"]["accuracy"] <= r["metrics"]["content_accuracy"] <= 100
    for shots in (0, 2):
        unit = json.loads(next((tmp_path / "out/synthetic_icl").glob(f"shots{shots}_*.json")).read_text())
        assert all(len(p["demos"]) == shots for p in unit["predictions"])  # 0 shots: the query alone
        assert all(p["demos"] == [f"{p['id']}-{j}" for j in range(shots)] for p in unit["predictions"])


def test_card_tabulates_the_episodes():
    from flamingo_vlm.eval.card import HARNESS_TASKS, LABELS, markdown
    from flamingo_vlm.synthetic import BENCHMARK_TASKS

    assert "synthetic_icl" in HARNESS_TASKS and set(HARNESS_TASKS) <= set(BENCHMARK_TASKS)
    card = {"shots": [0, 4], "labels": LABELS, "scores": {"synthetic_icl": {0: 10.0, 4: 55.0}},
            "icl_by_question": {"count": {"0": 5.0, "4": 61.0}, "answer-format split": {"0": 1.0, "4": 40.0}}}
    md = markdown(card)
    assert "| in-context episodes, held out (%) | 10.0 | 55.0 |" in md
    assert "| count | 5 | 61 |" in md and "| answer-format split | 1 | 40 |" in md


def test_restyle_moves_objects_off_the_grid_and_keeps_every_answer():
    from flamingo_vlm.synthetic.icl import MAX_OFFSET, restyle

    gen = SceneGenerator(seed=0)
    moved = styled = 0
    for i in range(40):
        scene = gen.scene(i, "pretrain")
        again, style = restyle(scene, np.random.default_rng(i))
        assert again == restyle(scene, np.random.default_rng(i))[0]  # deterministic in the generator
        assert style.fill in STYLE_AXES["fill"]["train"] and style.background in STYLE_AXES["background"]["train"]
        styled += style.fill != "solid" or style.background != "plain"
        assert again.questions() == scene.questions() and again.captions(5) == scene.captions(5)
        assert [(o.shape, o.color, o.size, o.position) for o in again.objects] == \
               [(o.shape, o.color, o.size, o.position) for o in scene.objects]
        assert all(max(abs(v) for v in o.offset) <= MAX_OFFSET for o in again.objects)
        moved += again != scene
        _check_drawn(again, style)
        # a given style is kept (one style per document)
        assert restyle(scene, np.random.default_rng(99), style=style)[1] == style
    assert moved >= 30 and styled >= 20
    with pytest.raises(ValueError, match="split must be one of"):
        restyle(gen.scene(0), np.random.default_rng(0), split="test")


def test_more_shots_than_the_episodes_hold_is_refused_before_any_unit(tmp_path):
    """The episodes hold 8 demonstrations: --shots 16 ran them under the label 16 shots. And with
    fewer episodes than shots, demos were drawn from them that the task never uses, and failed."""
    from tiny import tiny_flamingo

    from flamingo_vlm.eval.evaluator import EvalConfig, evaluate
    from flamingo_vlm.synthetic import write_synthetic_benchmark

    write_synthetic_benchmark(tmp_path / "data", tasks=["synthetic_icl"], n_test=3, image_size=32)
    n_demos = len(json.loads((tmp_path / "data/synthetic_icl/episodes.json").read_text())["episodes"][0]["demos"])
    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=512)
    cfg = EvalConfig(tasks=["icl"], data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                     shots=[0, n_demos, n_demos + 1], trials=1, batch_size=3, progress=False)
    with pytest.raises(ValueError, match=rf"synthetic_icl: --shots {n_demos + 1} needs .* bring {n_demos}; use --shots up to {n_demos}"):
        evaluate(model, cfg, image_processor=ip, tokenizer=tok)
    assert not list((tmp_path / "out").glob("*/shots*.json"))  # nothing ran
    cfg.shots = [n_demos]  # more shots than there are episodes (3): the episodes' own demos serve
    unit = evaluate(model, cfg, image_processor=ip, tokenizer=tok)["results"]["synthetic_icl"][0]
    assert unit["shots"] == n_demos and unit["num_samples"] == 3
