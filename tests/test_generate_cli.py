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


def test_the_token_count_leaves_out_the_padding_of_sequences_that_ended_early(saved):
    """Returned sequences of different lengths: the shorter is padded to the longer; the count is of the
    tokens generated (it had counted the padding too: 2 + 6 tokens reported as 12)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    root, (model, ip, tok) = saved
    eoc = model.eoc_token_id

    class EndFirstRowAfterTwo(LogitsProcessor):
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            self.start = input_ids.shape[1] if self.start is None else self.start
            scores[:, eoc] = -float("inf")
            if input_ids.shape[1] - self.start == 2:
                scores[0, :] = -float("inf")
                scores[0, eoc] = 0.0
            return scores

    sample = ("<image>Output:", [Image.fromarray(random_images(1, size=32)[0])])
    texts, n = generate_text(model, ip, tok, sample, max_new_tokens=6, do_sample=True, num_return_sequences=2,
                             logits_processor=LogitsProcessorList([EndFirstRowAfterTwo()]))
    assert len(texts) == 2 and n == 2 + 6


def test_the_token_count_leaves_out_the_padding_of_rows_a_stopping_criterion_ended(saved):
    """A row ended by a stop string (a stopping criterion) is filled with the pad token, not an end token."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    root, (model, ip, tok) = saved
    assert model.pad_token_id is not None and model.pad_token_id != model.eoc_token_id

    class NoEnd(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, model.eoc_token_id] = -float("inf")
            return scores

    class FirstRowAfterTwo(StoppingCriteria):
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores, **kwargs):
            self.start = input_ids.shape[1] - 1 if self.start is None else self.start
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] - self.start >= 2
            return done

    sample = ("<image>Output:", [Image.fromarray(random_images(1, size=32)[0])])
    texts, n = generate_text(model, ip, tok, sample, max_new_tokens=6, do_sample=True, num_return_sequences=2,
                             logits_processor=LogitsProcessorList([NoEnd()]),
                             stopping_criteria=StoppingCriteriaList([FirstRowAfterTwo()]))
    assert len(texts) == 2 and n == 2 + 6


def test_sampling_flags_without_do_sample_are_named_in_a_note(saved, capsys):
    root, _ = saved
    common = ["--model", str(root / "model"), "--prompt", "<image>Output:", "--images", str(root / "im0.png"),
              "--max-new-tokens", "4", "--json"]
    _, greedy = _run(capsys, *common)
    code, out = _run(capsys, *common, "--temperature", "0.5", "--top-k", "3")
    assert code == 0 and json.loads(out.out)["outputs"] == json.loads(greedy.out)["outputs"]
    assert "note: --temperature, --top-k only act with --do-sample" in out.err
    code, out = _run(capsys, *common, "--top-p", "0.5")
    assert code == 0 and "note: --top-p only acts with --do-sample" in out.err
    assert "note:" not in greedy.err
    _, sampled = _run(capsys, *common, "--do-sample", "--temperature", "0.5", "--seed", "0")
    assert "note:" not in sampled.err


def test_sampling_returns_several_sequences(saved, capsys):
    root, _ = saved
    code, out = _run(capsys, "--model", str(root / "model"), "--prompt", "<image>Output:", "--images",
                     str(root / "im0.png"), "--do-sample", "--num-return-sequences", "3", "--seed", "1",
                     "--max-new-tokens", "5", "--json")
    assert code == 0 and len(json.loads(out.out)["outputs"]) == 3


@pytest.mark.parametrize("argv, message, code", [
    (["--prompt", "<image><image>x", "--images", "IM0"], "2 <image> marker(s) but 1 image", 2),
    (["--image", "MISSING.png", "--text", "x"], "image MISSING.png does not exist", 1),
    ([], "give a prompt", 2),
    (["--prompt", "x", "--image", "IM0"], "not both", 2),
    (["--demo", "--text", "x"], "--demo runs the bundled prompts", 2),
    (["--prompt", ""], "--prompt is empty", 2),
    (["--text", ""], "the prompt is empty", 2),
    (["--text", " ", "--text", ""], "the prompt is empty", 2),
    (["--text", "<image>x", "--image", "IM0"], "--text must not contain <image>", 2),
    (["--image", "DIR", "--text", "x"], "image DIR is a directory, not an image file", 1),
    (["--prompt", "<image>x", "--images", "DIR"], "image DIR is a directory", 1),
    (["--text", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1", 2),
    (["--text", "x", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1", 2),
    (["--text", "x", "--num-beams", "0"], "--num-beams must be >= 1", 2),
    (["--text", "x", "--num-return-sequences", "0"], "--num-return-sequences must be >= 1", 2),
    (["--text", "x", "--num-return-sequences", "2"], "needs --do-sample", 2),
    (["--text", "x", "--do-sample", "--temperature", "0"], "--temperature must be > 0", 2),
    (["--text", "x", "--top-p", "0"], "--top-p must be in (0, 1]", 2),
    (["--text", "x", "--stop", ""], "--stop needs a non-empty string", 2),
    (["--text", "x", "--device", "nonsense"], "--device 'nonsense' is not a device", 2),
    (["--text", "x", "--seed", str(2**70)], "--seed must fit in 64 bits", 2),
])
def test_bad_input_is_a_clear_error_before_loading(saved, capsys, argv, message, code):
    root, _ = saved
    argv = [a.replace("IM0", str(root / "im0.png")).replace("DIR", str(root)) for a in argv]
    message = message.replace("DIR", str(root))
    # the model does not exist: each error comes before it would be loaded
    assert main(["generate", "--model", str(root / "does-not-exist"), *argv]) == code
    err = capsys.readouterr().err
    assert err.startswith("flamingo-vlm generate: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def _bad_images(tmp_path, saved):
    root, _ = saved
    (tmp_path / "notes.png").write_text("hello")
    data = (root / "im0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    return {"notes.png": "is not a readable image", "cut.png": "is not a readable image (OSError",
            "empty.png": "is not a readable image"}


def test_unreadable_images_are_named(saved, tmp_path, capsys, monkeypatch):
    from PIL import Image

    for name, message in _bad_images(tmp_path, saved).items():
        assert main(["generate", "--image", str(tmp_path / name), "--text", "x"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name} {message}" in err, err
    # a decompression bomb (here: any image over a lowered pixel limit) is refused, not a traceback
    root, _ = saved
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert main(["generate", "--image", str(root / "im0.png"), "--text", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"image {root / 'im0.png'} is too large to decode safely" in err, err


def test_an_empty_tokenization_is_an_error_not_an_index_error(saved):
    _, (model, ip, tok) = saved
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_text(model, ip, tok, ("", []), max_new_tokens=2)


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


def test_every_subcommand_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    """The rule of `flamingo-vlm` (cli.main): bad input -> `flamingo-vlm CMD: error: ...`, exit 1 or 2,
    no traceback; FLAMINGO_VLM_TRACEBACK=1 shows it."""
    cases = [
        (["data", "write", str(tmp_path / "nowhere.jsonl"), str(tmp_path / "out")], 1, "nowhere.jsonl"),
        (["data", "inspect", str(tmp_path / "gone.tar")], 1, "gone.tar"),
        (["convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--release", "nope/nope"], 2,
         "unknown release 'nope/nope'"),
        (["convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--vision", "v", "--lm", "l"], 1,
         "missing.pt does not exist"),
    ]
    for argv, code, named in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        command = " ".join(argv[:2] if argv[0] == "data" else argv[:1])  # signed as argparse signs its usage errors
        assert err.startswith(f"flamingo-vlm {command}: error: ") and named in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setenv("FLAMINGO_VLM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(cases[1][0])


def test_help_texts_show_no_docstring_markup():
    """--help of flamingo-vlm, of each subcommand (and theirs) and of python -m flamingo_vlm.train
    shows the docstrings they come from as plain text."""
    import argparse

    from flamingo_vlm.cli import build_parser
    from flamingo_vlm.train.cli import build_parser as train_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in set(action.choices.values()):
                    yield from parsers(sub)

    seen = list(parsers(build_parser())) + [train_parser()]
    assert len(seen) > 6
    for p in seen:
        text = p.format_help()
        assert "``" not in text and ":class:`" not in text and ":func:`" not in text, p.prog


def test_stop_strings_end_the_output_at_the_stop(saved, capsys):
    root, _ = saved
    common = ["--model", str(root / "model"), "--prompt", "<image>Output:", "--images", str(root / "im0.png"),
              "--max-new-tokens", "12", "--json"]
    code, full = _run(capsys, *common)
    text = json.loads(full.out)["outputs"][0]
    assert code == 0 and len(text) >= 2, text
    stop = text[1:3]  # a piece of what greedy decoding writes, after its first character
    code, cut = _run(capsys, *common, "--stop", stop)
    assert code == 0, cut.err
    out = json.loads(cut.out)["outputs"][0]
    assert out == text[:text.find(stop)], (text, out)  # the stop string ends the answer, not part of it (as served)


class _CharTokenizer:
    """One character per token id (its code point)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_the_stream_holds_back_what_may_become_a_stop_string_and_never_shows_it():
    import torch

    from flamingo_vlm.generate import _Streamer

    for text, stops, shown in [("a green triangle at the top", [" at"], "a green triangle"),
                               ("a cat and a hat", ["hats", "x"], "a cat and a hat"),  # held back, then shown
                               ("stop at once", ["at", "st"], "")]:
        pieces = []
        streamer = _Streamer(_CharTokenizer(), pieces.append, stops)
        streamer.put(torch.tensor([[1, 2]]))  # the prompt
        for ch in text:
            streamer.put(torch.tensor([ord(ch)]))
            seen = "".join(pieces)
            assert not any(s in seen for s in stops) and text.startswith(seen)
            if text == "a green triangle at the top" and streamer.ids[-2:] == [ord(" "), ord("a")]:
                assert seen == "a green triangle"  # " a" may still become " at": held back
        streamer.end()
        assert "".join(pieces) == shown, (text, pieces)


def test_a_prompt_past_the_context_is_a_clear_error(saved, capsys):
    root, _ = saved  # the tiny LM has 256 positions
    common = ["--model", str(root / "model"), "--images", str(root / "im0.png")]
    assert main(["generate", *common, "--prompt", "a " * 300 + "<image>Output:"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the load's progress lines)
    assert last.startswith("flamingo-vlm generate: error: ") and "more than this model's context of 256" in last
    assert main(["generate", *common, "--prompt", "<image>Output:", "--max-new-tokens", "300"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_new_tokens asks for 300 more" in last and "(at most" in last, last


@pytest.mark.parametrize("argv, prog", [(["generate", "--bogus"], "flamingo-vlm generate"),
                                        (["data", "write", "a.jsonl", "out", "--nope"], "flamingo-vlm data write"),
                                        (["train", "--config", "c.yaml", "extra"], "flamingo-vlm train")])
def test_an_unknown_flag_is_said_by_its_subcommand(argv, prog, capsys):
    """`flamingo-vlm generate --bogus` printed the top-level usage (the list of subcommands) and
    "flamingo-vlm: error: unrecognized arguments"; the subcommand says it now, with its own usage."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"usage: {prog} ") and f"{prog}: error: unrecognized arguments: {argv[-1]}" in err, err


def test_the_parser_imports_neither_torch_nor_transformers():
    """Every `flamingo-vlm` command builds the whole parser first (--help and usage errors too):
    pulling transformers into it (train.grow importing ..pretrained did) made `--help` take 8 s, and
    torch (generate, data and grow imported it at module level) 3.6 s, where it takes 0.75-0.9 s
    without either on a 2-core AMD EPYC. The handlers import them when they run."""
    import subprocess
    import sys

    code = ("import sys; from flamingo_vlm.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'safetensors'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("argv", [["train", "--config", "/nonexistent.yaml"], ["data", "inspect", "/nonexistent.tar"],
                                  ["generate", "--text", "x", "--max-new-tokens", "0"],
                                  ["generate", "--demo", "--text", "x"],
                                  ["convert", "missing.pt", "--out", "x"],  # (5 s before it said --vision/--lm)
                                  ["convert", "missing.pt", "--out", "x", "--release", "nope"]])
def test_bad_input_that_needs_no_model_is_reported_without_importing_torch(argv):
    """Naming the error types that are bad input (train.cli.user_errors) imported the trainer, so a
    missing config or shard took 13-20 s to report on a busy 2-core EPYC (0.3-0.6 s now)."""
    import subprocess
    import sys

    code = (f"import sys; from flamingo_vlm.cli import main; code = main({argv!r}); "
            "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split()[0] in ("1", "2") and run.stdout.strip().endswith("[]"), run
    assert "error:" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_lazy_handler_runs_the_function_it_names(tmp_path):
    """The parser stores `generate`'s handler by name (flamingo_vlm.lazy.lazy_function); parsing then
    calling it reaches generate._run, which refuses a missing image before any model loads."""
    from flamingo_vlm.cli import build_parser

    from flamingo_vlm import generate_cli

    args = build_parser().parse_args(["generate", "--image", str(tmp_path / "no.png"), "--text", "Output:"])
    assert args.func is generate_cli._generate  # (its flag checks, then:)
    assert generate_cli._RUN.__name__ == "flamingo_vlm.generate._run"
    with pytest.raises(FileNotFoundError, match="no.png"):
        args.func(args)


def test_generate_runs_in_float16(saved, capsys):
    root, _ = saved
    code, out = _run(capsys, "--model", str(root / "model"), "--prompt", "<image>Output:", "--images",
                     str(root / "im0.png"), "--max-new-tokens", "3", "--dtype", "fp16", "--json")
    assert code == 0 and len(json.loads(out.out)["outputs"]) == 1, out.err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_dtype_takes_the_spellings_of_configs_and_torch(command, capsys):
    from flamingo_vlm.cli import build_parser

    parser = build_parser()
    for given, want in (("bf16", "bfloat16"), ("FP32", "float32"), ("torch.bfloat16", "bfloat16"), ("auto", "auto"),
                        ("fp16", "float16"), ("float16", "float16")):  # (generate refused fp16, serve took it)
        assert parser.parse_args([command, "--dtype", given]).dtype == want
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--dtype", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.parametrize("fp16_native", [False, True])
def test_the_load_line_names_the_dtype_and_emulated_float16_gets_a_note(saved, capsys, monkeypatch, fp16_native):
    """``--dtype auto`` says what it picked; float16 on a CPU without float16 arithmetic (emulated,
    5x slower on the AVX2-only EPYC) says so once, after loading."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16_native, raising=False)
    root, _ = saved
    common = ["--model", str(root / "model"), "--prompt", "<image>Output:", "--images", str(root / "im0.png"),
              "--max-new-tokens", "2"]
    code, out = _run(capsys, *common, "--dtype", "float32")
    assert code == 0 and "loaded in" in out.err and ": float32]" in out.err and "note:" not in out.err
    code, out = _run(capsys, *common, "--dtype", "float16")
    assert code == 0 and ": float16]" in out.err
    assert ("note: this CPU has no float16 arithmetic" in out.err) is not fp16_native
    from flamingo_vlm.modeling.fast_linear import emulated_fp16_note

    assert emulated_fp16_note(torch.float16, "cuda") is None and emulated_fp16_note(torch.float16, "cuda:0") is None
    assert emulated_fp16_note(torch.bfloat16, "cpu") is None


def test_a_small_local_model_loads_without_transformers_bar_and_a_large_one_keeps_it(saved, capsys, tmp_path):
    """transformers' "Loading weights" bar over a local LM that loads in well under a second is noise
    on stderr; a large local LM (its weight files past ``QUIET_LOAD_BYTES``) keeps it, and the bar's
    setting is what it was after either."""
    from transformers.utils import logging as hf_logging

    from flamingo_vlm.files import QUIET_LOAD_BYTES, quiet_small_load

    root, _ = saved
    code, out = _run(capsys, "--model", str(root / "model"), "--prompt", "<image>Output:", "--images",
                     str(root / "im0.png"), "--max-new-tokens", "2")
    assert code == 0 and "loaded in" in out.err and "Loading weights" not in out.err
    assert hf_logging.is_progress_bar_enabled()

    large = tmp_path / "large"
    large.mkdir()
    with open(large / "model.safetensors", "wb") as f:  # (sparse: no disk used)
        f.truncate(QUIET_LOAD_BYTES)
    with quiet_small_load(large):
        assert hf_logging.is_progress_bar_enabled()
    (large / "model.safetensors").unlink()
    with quiet_small_load(large):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_demo_skips_a_prompt_past_a_short_context_and_runs_the_others(tmp_path, capsys):
    """`generate --demo` on the README's tiny trained model (context 128) printed three tasks, then ended
    with exit 1 on the fourth's 186-token prompt, its error on the `model:` line."""
    for ctx in (128, 32):
        model, ip, tok = tiny_flamingo("llama", max_position_embeddings=ctx)
        model.save_pretrained(tmp_path / f"ctx{ctx}", tokenizer=tok, image_processor=ip)
    code, out = _run(capsys, "--model", str(tmp_path / "ctx128"), "--demo", "--json", "--max-new-tokens", "2")
    results = json.loads(out.out)["results"]
    skipped = [r for r in results if "skipped" in r]
    assert code == 0 and len(results) == 4 and 0 < len(skipped) < 4
    assert all("more than this model's context of 128" in r["skipped"] for r in skipped)
    code, out = _run(capsys, "--model", str(tmp_path / "ctx128"), "--demo", "--max-new-tokens", "2")
    assert code == 0 and "model:  (skipped: the prompt has" in out.out and "error" not in out.err
    code, out = _run(capsys, "--model", str(tmp_path / "ctx32"), "--demo", "--max-new-tokens", "2")
    assert code == 1 and out.err.strip().endswith("error: no demo prompt fits this model's context")


@pytest.mark.parametrize(("argv", "imported"), [
    (["generate", "--model", "no/such-model", "--text", "x"], "['torch']"),  # (after the checks that need torch)
    (["generate", "--model", "./no/such-model", "--text", "x"], "['torch']"),
    (["serve", "--model", "no/such-model", "--port", "0"], "[]"),
    (["evaluate", "--model", "no/such-model", "--synthetic", "--data-root", "DATA", "--tasks", "coco"], "['torch']")])
def test_a_model_that_is_not_there_is_refused_before_the_loading_layer_is_imported(argv, imported, tmp_path):
    """A typo'd --model (neither a directory nor a cached Hub repo, with the Hub out of reach) took ~5 s
    to be refused: the loading layer (transformers, the model code) was imported first. Now 0.4-1.5 s
    on a 2-core AMD EPYC (evaluate's after its data checks, here the synthetic benchmark written)."""
    if argv[0] == "serve":
        pytest.importorskip("fastapi")
    import os
    import subprocess
    import sys

    argv = [str(tmp_path / "data") if a == "DATA" else a for a in argv]
    code = (f"import sys; from flamingo_vlm.cli import main; code = main({argv!r}); "
            "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.stdout.strip().split(maxsplit=1) == ["1", imported], run
    assert "no/such-model" in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("command", [["generate", "--text", "x"], ["serve", "--port", "0"],
                                     ["evaluate", "--tasks", "vqav2", "--data-root", "."]])
def test_a_gpu_this_machine_lacks_is_a_usage_error_in_every_command(command, capsys):
    """evaluate --device cuda on a machine without a GPU ended in torch's "module 'torch._C' has no
    attribute '_cuda_setDevice'" traceback; generate said what to do."""
    import torch

    from flamingo_vlm.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if command[0] == "serve":
        pytest.importorskip("fastapi")
    assert main([*command, "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available here; use --device cpu" in capsys.readouterr().err
