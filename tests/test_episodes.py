"""Few-shot episodes for training the built-in model, and in-context name binding."""

import importlib.util
import json

import pytest
import torch
from tiny import tiny_flamingo

from flamingo_vlm.synthetic import (
    NONCE_NAMES_EVAL,
    NONCE_NAMES_TRAIN,
    SceneGenerator,
    binding_episode,
    episode_items,
    write_episode_shards,
)


def test_binding_episodes_are_deterministic_and_well_formed():
    gen = SceneGenerator(seed=0)
    a = binding_episode(gen, 3, ways=2, shots=4, split="test")
    b = binding_episode(gen, 3, ways=2, shots=4, split="test")
    assert a.answer == b.answer and [n for _, n in a.demos] == [n for _, n in b.demos]
    assert a.query == b.query
    for i in range(40):
        ep = binding_episode(gen, i, ways=3, shots=3, split="test")
        assert set(n for _, n in ep.demos) == set(ep.names)  # shots >= ways: every name shown
        assert ep.answer in ep.names and set(ep.names) <= set(NONCE_NAMES_EVAL)
        cats = {}
        for scene, name in ep.demos + [(ep.query, ep.answer)]:
            (obj,) = scene.objects
            cats.setdefault(name, set()).add((obj.shape, obj.color))
        assert all(len(v) == 1 for v in cats.values())  # a name always means one category
        pairs = [next(iter(v)) for v in cats.values()]
        assert len({s for s, _ in pairs}) == len(pairs) and len({c for _, c in pairs}) == len(pairs)


def test_training_episodes_avoid_eval_names_and_held_out_pairs():
    gen = SceneGenerator(seed=0)
    for i in range(60):
        for kind in ("caption", "vqa", "classify", "binding"):
            items = episode_items(gen, i, kind, 4)
            assert 1 <= len(items) <= 5
            for scene, text in items:
                assert not gen.is_held_out(scene)
                if kind == "binding":
                    assert text.split()[-1].rstrip(".") in NONCE_NAMES_TRAIN
    with pytest.raises(ValueError, match="kind must be one of"):
        episode_items(gen, 0, "poetry", 2)


def test_episode_shards_read_back_through_the_training_pipeline(tmp_path):
    from flamingo_vlm.data import DatasetSpec, ShardDataset

    paths = write_episode_shards(tmp_path / "ep", n_documents=12, samples_per_shard=5, image_size=32)
    assert len(paths) == 3 and not (tmp_path / "ep" / "source").exists()
    again = write_episode_shards(tmp_path / "ep2", n_documents=12, samples_per_shard=5, image_size=32)
    assert [p.read_bytes() == q.read_bytes() for p, q in zip(paths, again)] == [True] * 3
    _, ip, tok = tiny_flamingo("llama")
    from flamingo_vlm.processing import FlamingoProcessor

    spec = DatasetSpec("interleaved", [str(p) for p in paths], batch_size=2, max_images=8, shuffle_buffer=0)
    batch = next(iter(ShardDataset(spec, FlamingoProcessor(tok, ip))))
    media = tok.convert_tokens_to_ids("<image>")
    per_row = (batch["input_ids"] == media).sum(1)
    assert batch["vision_x"].shape[:2] == (2, int(per_row.max())) and (per_row >= 1).all()
    text = tok.decode(batch["input_ids"][0])
    assert any(k in text for k in ("Output:", "Question:", "This is a"))


def test_binding_evaluation_counts_correct_answers(monkeypatch):
    from flamingo_vlm.eval import binding

    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=512)
    gen = SceneGenerator(seed=1)
    r = binding.evaluate_binding(model, ip, tok, shots=2, ways=2, episodes=6, generator=gen, image_size=32, batch_size=4)
    assert r.episodes == 6 and r.chance == 0.5 and 0.0 <= r.accuracy <= 1.0

    # A scorer that always prefers the right name gives 100%, the wrong one 0%.
    seen = []
    real = binding.binding_episode

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(binding, "binding_episode", spy)
    names = sorted(NONCE_NAMES_EVAL)
    monkeypatch.setattr(binding, "_candidate_names", lambda eps: names)
    for sign, want in ((1.0, 1.0), (-1.0, 0.0)):
        seen.clear()

        def score(vision_x, input_ids, candidates, attention_mask=None, _s=sign, **kw):
            assert len(candidates) == len(names)
            rows = seen[-input_ids.shape[0]:]
            return torch.tensor([[_s if n == ep.answer else 0.0 for n in names] for ep in rows])

        monkeypatch.setattr(model, "score", score)
        r = binding.evaluate_binding(model, ip, tok, shots=2, episodes=4, generator=gen, image_size=32, batch_size=4)
        assert r.accuracy == want


def test_model_card_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from flamingo_vlm.eval.card import LABELS, markdown, plot

    card = {"model": "m", "shots": [0, 2], "labels": LABELS, "eval_seed": 1,
            "scores": {"coco": {0: 10.0, 2: 55.5}, "vqav2": {0: 20.0, 2: 60.0}, "binding": {0: 50.0, 2: 81.0}}}
    md = markdown(card)
    assert "| captioning CIDEr | 10.0 | 55.5 |" in md and "| classification top-1 (%) | - | - |" in md
    assert "by question type" not in md
    card["vqa_by_question"] = {"what color is the": {"0": 12.5, "2": 80.0}, "how many": {"2": 40.0}}
    md = markdown(card)
    assert "| what color is the ... | 12 | 80 |" in md and "| how many ... | - | 40 |" in md
    assert "held-out pair" not in md
    card["by_held_out_pair"] = {"vqav2": {"2": {"shown": 25.0, "not_shown": 75.0}}}
    md = markdown(card)
    assert "| VQA accuracy (%) | held-out pair | - | 25.0 |" in md
    assert "| VQA accuracy (%) | seen pairs only | - | 75.0 |" in md
    assert "Run:" not in md
    card |= {"precision": "bf16", "quantize": "int8", "num_beams": 3, "n_test": 50, "trials": 1}
    # card.json recorded how the model was run, the page did not (int8 numbers read as the model's own)
    assert markdown(card).endswith("\nRun: precision `bf16`, quantized `int8`, beams `3`, 50 queries per task and "
                                   "shot count, 1 trial(s).\n")
    png = plot(card, tmp_path / "shots.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))


def test_model_card_with_a_missing_score_is_strict_json_and_renders_from_card_json(tmp_path):
    """A score that does not exist (the answer-format split with no such query, a NaN CIDEr) was bare
    ``NaN`` in card.json (not JSON); it is ``null``, and the page and plot made from card.json read it
    as NaN (the plot refused a NaN axis limit)."""
    import math

    from flamingo_vlm.eval.card import LABELS, markdown, plot
    from flamingo_vlm.eval.results import atomic_write_json

    nan = float("nan")
    card = {"model": "m", "shots": [0, 2], "labels": LABELS, "eval_seed": 1,
            "scores": {"coco": {0: nan, 2: 55.5}, "vqav2": {0: 20.0, 2: 60.0}},
            "vqa_by_question": {"how many": {"2": nan}},
            "icl_by_question": {"answer-format split": {0: nan, 2: 50.0}},
            "by_held_out_pair": {"vqav2": {"2": {"shown": nan, "not_shown": 75.0}}}}
    path = atomic_write_json(tmp_path / "card.json", card)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    read = json.loads(path.read_text(), parse_constant=refuse)
    assert read["scores"]["coco"]["0"] is None
    assert markdown(read) == markdown(card)  # the page from card.json is the page from the run
    assert "| captioning CIDEr | nan | 55.5 |" in markdown(read) and "| answer-format split | nan | 50 |" in markdown(read)
    if importlib.util.find_spec("matplotlib"):
        for c in (card, read):
            assert plot(c, tmp_path / "shots.png").read_bytes()[:4] == b"\x89PNG"
    assert math.isnan(card["scores"]["coco"][0])  # (the card itself is not changed by writing it)


def test_model_card_data_follows_n_test_and_bad_values_are_refused_first(tmp_path, monkeypatch, capsys,
                                                                         no_model_load):
    """The card kept the benchmark data of its first run: asked for --n-test 3 after 2, it evaluated the
    2 queries of the old data and said 3 (and --n-test 0 wrote data without test scenes, then failed
    with a traceback, and every later run failed on that data)."""
    from flamingo_vlm import synthetic
    from flamingo_vlm.eval import card
    from flamingo_vlm.eval.datasets import CaptionDataset

    Loaded = no_model_load
    out = tmp_path / "card"
    assert card.main(["--out", str(out), "--n-test", "0"]) == 1
    assert "n_test (--n-test) must be >= 1, got 0" in capsys.readouterr().err and not out.exists()
    for n in (2, 3):
        with pytest.raises(Loaded):
            card.run_card("m", out, shots=[0], n_test=n)
        assert len(CaptionDataset.from_root(out / "data" / "mscoco_karpathy", "test", check_images=False)) == n
    writes = []
    monkeypatch.setattr(synthetic, "write_synthetic_benchmark", lambda *a, **k: writes.append(k))
    with pytest.raises(Loaded):  # the same settings: the data is kept
        card.run_card("m", out, shots=[0], n_test=3)
    assert writes == []
    with pytest.raises(ValueError, match="the in-context episodes hold 8 demonstrations"):  # before the model loads
        card.run_card("m", out, shots=[0, 16], n_test=3)


def test_episodes_command_line(tmp_path, capsys):
    from flamingo_vlm.cli import main

    assert main(["data", "episodes", str(tmp_path / "e"), "--documents", "4", "--shots", "1,2", "--mix", "caption=1",
                 "--image-size", "32", "--samples-per-shard", "2"]) == 0
    assert len(list((tmp_path / "e").glob("interleaved-*.tar"))) == 2
    for bad in (["--shots", "3,1"], ["--mix", "caption"], ["--question-weights", "what color is the"],
                ["--mix", "caption=2,foo=1"], ["--mix", "caption=0"]):  # (the last two: exit code 1, after the parse)
        with pytest.raises(SystemExit) as e:
            main(["data", "episodes", str(tmp_path / "f"), "--documents", "1", *bad])
        assert e.value.code == 2
    assert "--mix: unknown kind(s) foo; choose from caption," in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # (said "samples_per_shard must be >= 1", exit code 1)
        main(["data", "write", str(tmp_path), str(tmp_path / "g"), "--samples-per-shard", "0"])
    assert e.value.code == 2 and "argument --samples-per-shard: '0': give a whole number >= 1" in capsys.readouterr().err


def test_question_weights_make_vqa_documents_ask_some_questions_more_often(tmp_path):
    from flamingo_vlm.synthetic import SceneGenerator, episode_items, write_episode_shards

    gen = SceneGenerator(seed=0)

    def colour_share(weights):
        texts = [t for i in range(150) for _, t in episode_items(gen, i, "vqa", 2, question_weights=weights)]
        return sum("What color is the" in t for t in texts) / len(texts)

    plain, weighted = colour_share(None), colour_share({"what color is the": 4.0})
    assert 0.05 < plain < 0.3 and weighted > plain + 0.15
    assert colour_share({"what color is the": 0.0}) == 0.0
    # documents of other kinds are the same with or without weights
    assert episode_items(gen, 3, "caption", 2, question_weights={"what color is the": 4.0}) == episode_items(gen, 3, "caption", 2)
    with pytest.raises(ValueError, match="question weights must be >= 0"):
        write_episode_shards(tmp_path / "bad", n_documents=1, question_weights={"how many": -1.0})


def test_style_rate_draws_documents_in_the_episodes_styles(tmp_path):
    import json
    import tarfile

    from flamingo_vlm.synthetic import write_episode_shards

    def documents(out, rate):
        write_episode_shards(out, n_documents=12, shots=(1, 2), mix={"vqa": 1}, image_size=48, style_rate=rate)
        with tarfile.open(next(out.glob("interleaved-*.tar"))) as tar:
            rows = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        return [r["text_list"] for r in rows], [json.dumps(r["image_info"]) for r in rows]

    plain_text, plain = documents(tmp_path / "a", 0.0)
    assert documents(tmp_path / "b", 0.0)[1] == plain  # deterministic
    half_text, half = documents(tmp_path / "c", 0.5)
    assert half_text == plain_text  # the texts do not change, only how the scenes are drawn
    changed = sum(a != b for a, b in zip(plain, half))
    assert 0 < changed < len(plain)
    with pytest.raises(ValueError, match="style_rate"):
        write_episode_shards(tmp_path / "bad", n_documents=1, style_rate=1.5)


@pytest.mark.parametrize("argv, said", [
    (["synthetic-benchmark", "--n-train", "-1"], "argument --n-train: '-1': give a whole number >= 0"),  # wrote no train split
    (["synthetic-benchmark", "--n-test", "0"], "argument --n-test: '0': give a whole number >= 1"),
    (["synthetic-benchmark", "--image-size", "0"], "argument --image-size: '0': give a whole number >= 1"),  # PIL: "cannot write empty image"
    (["episodes", "--start", "-4"], "argument --start: '-4': give a whole number >= 0"),  # numpy: "expected non-negative integer"
    (["episodes", "--seed", "-1"], "argument --seed: '-1': give a whole number >= 0"),
    (["icl-episodes", "--documents", "two"], "argument --documents: 'two': give a whole number >= 1"),
    (["synthetic-shards", "--pairs", "0", "--documents", "0"], "--pairs 0 and --documents 0 write nothing"),
])
def test_synthetic_data_commands_refuse_counts_out_of_range_before_writing(tmp_path, capsys, argv, said):
    from flamingo_vlm.cli import main

    out = tmp_path / "out"
    try:
        code = main(["data", argv[0], str(out), *argv[1:]])  # (a UsageError: main returns 2)
    except SystemExit as e:  # argparse's usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and f"flamingo-vlm data {argv[0]}: error: {said}" in err, err
    assert not out.exists()
