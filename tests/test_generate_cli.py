"""`flamingo-vlm generate`: argument order, streaming, JSON, errors; on a saved tiny model."""

import json

import pytest
import torch
from PIL import Image
from tiny import random_images, tiny_flamingo

from flamingo_vlm.cli import main
from flamingo_vlm.generate import generate_text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=256)
    model.save_pretrained(root / "model", tokenizer=tok, image_processor=ip)
    for i, im in enumerate(random_images(2, size=32)):
        Image.fromarray(im).save(root / f"im{i}.png")
    return root, (model, ip, tok)


def _run(capsys, *argv):
    code = main(["generate", *argv])
    return code, capsys.readouterr()


def test_image_text_order_equals_prompt_form(saved, capsys):
    root, _ = saved
    common = ["--model", str(root / "model"), "--max-new-tokens", "6", "--json"]
    _, a = _run(capsys, *common, "--image", str(root / "im0.png"), "--text", "Output:a b<|endofchunk|>",
                "--image", str(root / "im1.png"), "--text", "Output:")
    _, b = _run(capsys, *common, "--prompt", "<image>Output:a b<|endofchunk|><image>Output:",
                "--images", str(root / "im0.png"), str(root / "im1.png"))
    ja, jb = json.loads(a.out), json.loads(b.out)
    assert ja["prompt"] == "<image>Output:a b<|endofchunk|><image>Output:"
    assert ja["outputs"] == jb["outputs"] and len(ja["outputs"]) == 1
    # swapping the images changes what the model is conditioned on
    _, c = _run(capsys, *common, "--prompt", "<image>Output:a b<|endofchunk|><image>Output:",
                "--images", str(root / "im1.png"), str(root / "im0.png"))
    assert json.loads(c.out)["prompt"] == ja["prompt"]


def test_streamed_text_equals_returned_text(saved):
    root, (model, ip, tok) = saved
    from flamingo_vlm.processing import MEDIA_TOKEN

    sample = (f"{MEDIA_TOKEN}Output:", [Image.fromarray(random_images(1, size=32)[0])])
    pieces = []
    streamed, n = generate_text(model, ip, tok, sample, stream=pieces.append, max_new_tokens=8, do_sample=False)
    plain, n2 = generate_text(model, ip, tok, sample, max_new_tokens=8, do_sample=False)
    assert "".join(pieces) == streamed[0] == plain[0]
    assert n == n2 and 0 <= n <= 8


def test_sampling_returns_several_sequences(saved, capsys):
    root, _ = saved
    code, out = _run(capsys, "--model", str(root / "model"), "--prompt", "<image>Output:", "--images",
                     str(root / "im0.png"), "--do-sample", "--num-return-sequences", "3", "--seed", "1",
                     "--max-new-tokens", "5", "--json")
    assert code == 0 and len(json.loads(out.out)["outputs"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "<image><image>x", "--images", "IM0"], "2 <image> marker(s) but 1 image"),
    (["--image", "MISSING.png", "--text", "x"], "does not exist"),
    ([], "give a prompt"),
    (["--prompt", "x", "--image", "IM0"], "not both"),
    (["--demo", "--text", "x"], "--demo runs the bundled prompts"),
])
def test_bad_input_is_a_clear_error_before_loading(saved, capsys, argv, message):
    root, _ = saved
    argv = [a.replace("IM0", str(root / "im0.png")) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(root / "does-not-exist"), *argv])
    assert message in str(e.value)


def test_not_an_image_is_named(saved, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit, match="notes.png is not a readable image"):
        main(["generate", "--image", str(bad), "--text", "x"])


def test_demo_prompts_reference_bundled_images():
    from flamingo_vlm.generate import demo_tasks, example_image

    tasks = demo_tasks()
    assert len(tasks) >= 3
    for t in tasks:
        images = [v for k, v in t.items if k == "image"]
        assert images and all(example_image(v).stat().st_size > 0 for v in images)
        assert t.items[-1][0] == "text" and t.expected
    with pytest.raises(FileNotFoundError):
        example_image("nope.png")


def test_demo_candidates_hold_the_expected_answer():
    from flamingo_vlm.generate import demo_tasks

    ranked = [t for t in demo_tasks() if t.candidates]
    assert ranked and all(t.expected in t.candidates for t in ranked)


def test_rank_candidates_agrees_with_the_models_scores(saved):
    from flamingo_vlm.eval.evaluator import continuation_ids
    from flamingo_vlm.generate import rank_candidates
    from flamingo_vlm.processing import FlamingoProcessor

    _, (model, ip, tok) = saved
    images = [Image.fromarray(im) for im in random_images(2, size=32)]
    sample = [images[0], "This is a dax.<|endofchunk|>\n", images[1], "This is a"]
    ranked = rank_candidates(model, ip, tok, sample, ["dax", "wug", "blicket"])
    assert sorted(c for c, _ in ranked) == ["blicket", "dax", "wug"]
    probs = [p for _, p in ranked]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
    batch = FlamingoProcessor(tok, ip)([sample])
    direct = model.score(batch["vision_x"], batch["input_ids"],
                         [continuation_ids(tok, "This is a", " " + c) for c in ("dax", "wug", "blicket")],
                         batch["attention_mask"])[0]
    assert ranked[0][0] == ("dax", "wug", "blicket")[int(direct.argmax())]
    with pytest.raises(ValueError, match="no candidates"):
        rank_candidates(model, ip, tok, sample, [])
