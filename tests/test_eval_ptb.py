"""Caption tokenisation: the pure-Python PTB tokenizer against Stanford's output, line separators
that must never shift captions, and the line-count check of the Java path."""

import json
import subprocess
from pathlib import Path

import pytest

from flamingo_vlm.eval import metrics as M
from flamingo_vlm.eval.ptb import LINE_BREAKS, PTB_PUNCTUATIONS, ptb_tokenize_java, ptb_tokenize_python, sanitize_caption

pytest.importorskip("pycocoevalcap")

# Stanford PTBTokenizer output (the jar in pycocoevalcap, run by hand; see the file's "source").
STANFORD = json.loads((Path(__file__).parent / "data" / "ptb_stanford.json").read_text(encoding="utf-8"))["captions"]
HAS_JAVA = M.java_available() and M._ptb_jar() is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs java and pycocoevalcap's PTBTokenizer jar")

# The cases the issue names, with Stanford's tokens (from the data file, checked here to be there).
NAMED = {
    "What?! A dog on a skateboard?!": "what ?! a dog on a skateboard ?!",
    "AT&T store on the corner of a busy street.": "at&t store on the corner of a busy street",
    "Y'all should see this dog.": "y' all should see this dog",
    "A man said “hello” to the woman.": "a man said hello to the woman",
    "Don’t walk on the grass.": "do n't walk on the grass",
    "A woman – wearing a hat – walks by.": "a woman wearing a hat walks by",
    "The crowd waits… and waits.": "the crowd waits and waits",
    "A man (wearing a hat) walks a dog.": "a man -lrb- wearing a hat -rrb- walks a dog",
    "A man with 100,000,000 dollars.": "a man with 100,000,000 dollars",
    "I'd've gone.": "i 'd 've gone",
}


def test_named_cases_are_stanford_output():
    for caption, tokens in NAMED.items():
        assert STANFORD[caption] == tokens
        assert ptb_tokenize_python(caption) == tokens


def test_python_tokenizer_reproduces_stanford_on_every_stored_caption():
    assert len(STANFORD) > 700
    wrong = {c: (ptb_tokenize_python(c), t) for c, t in STANFORD.items() if ptb_tokenize_python(c) != t}
    assert not wrong, f"{len(wrong)} differ, e.g. {list(wrong.items())[:5]}"


@needs_java
def test_python_tokenizer_matches_the_jar():
    captions = list(STANFORD)
    java = M._ptb_tokenize_java(captions)
    assert java == [STANFORD[c] for c in captions]  # the stored file is still the jar's output
    assert [ptb_tokenize_python(c) for c in captions] == java


@pytest.mark.parametrize("sep", list(LINE_BREAKS) + ["\r\n"], ids=lambda s: f"U+{ord(s[0]):04X}")
@pytest.mark.parametrize("backend", ["python", pytest.param("java", marks=needs_java)])
def test_line_separators_never_shift_captions(sep, backend):
    refs = {1: ["a red circle", f"a red{sep}circle on the left"], 2: ["two blue squares"], 3: [f"a{sep}green star"]}
    preds = {1: "a red circle", 2: "two blue squares", 3: "a green star"}
    tok, used = M.ptb_tokenize(refs, backend)
    assert used == backend
    assert tok == {1: ["a red circle", "a red circle on the left"], 2: ["two blue squares"], 3: ["a green star"]}
    spaced = {k: [c.replace(sep, " ") for c in v] for k, v in refs.items()}
    assert M.caption_metrics(preds, refs, tokenizer=backend) == M.caption_metrics(preds, spaced, tokenizer=backend)
    assert sanitize_caption(f"x{sep}y").split() == ["x", "y"]


def test_line_separator_in_a_prediction_does_not_shift_the_others():
    refs = {i: [f"caption number {w}"] for i, w in enumerate("one two three four".split())}
    preds = {0: "caption number\u2028one", 1: "caption number two", 2: "caption number three", 3: "caption number four"}
    tok, _ = M.ptb_tokenize({k: [v] for k, v in preds.items()}, "python")
    assert tok[0] == ["caption number one"] and tok[3] == ["caption number four"]
    assert M.caption_metrics(preds, refs, metrics=["bleu"], tokenizer="python")["BLEU_1"] == pytest.approx(100.0)


def _fake_java(stdout: bytes):
    def run(cmd, capture_output=True, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr=b"")
    return run


@pytest.mark.parametrize("stdout, sent", [(b"a\nb\nc", 2), (b"a", 2), (b"a\nb\n\n", 2)])
def test_java_line_count_is_checked_both_ways(monkeypatch, stdout, sent):
    monkeypatch.setattr(subprocess, "run", _fake_java(stdout))
    with pytest.raises(RuntimeError, match=f"lines for {sent} captions"):
        ptb_tokenize_java(["first caption", "second caption"][:sent], "stanford.jar")


def test_java_output_with_one_trailing_newline_and_blank_captions(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_java(b"a , b\nc .\n"))
    # blank captions are not sent (their tokenisation is empty); the two others come back in order
    assert ptb_tokenize_java(["A, b", "   ", "C.", ""], "stanford.jar") == ["a b", "", "c", ""]


def test_java_failure_names_the_jar(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, b"", b"Error: boom"))
    with pytest.raises(RuntimeError, match=r"PTBTokenizer \(stanford.jar\) failed .*boom"):
        ptb_tokenize_java(["a"], "stanford.jar")


def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert PTB_PUNCTUATIONS == frozenset(PUNCTUATIONS)


def test_resolve_caption_tokenizer(monkeypatch):
    assert M.resolve_caption_tokenizer("python") == "python"
    monkeypatch.setattr(M, "java_available", lambda: False)
    assert M.resolve_caption_tokenizer("auto") == "python"
    with pytest.raises(ValueError, match="caption tokenizer"):
        M.resolve_caption_tokenizer("perl")
