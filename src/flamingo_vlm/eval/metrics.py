"""Metrics of the OpenFlamingo evaluation suite.

* Captioning: CIDEr (the paper's number, x100), BLEU-1..4 and ROUGE-L through ``pycocoevalcap``'s
  pure-Python scorers. Captions are first tokenised like ``COCOEvalCap`` does (Stanford
  PTBTokenizer, lower-cased, punctuation tokens dropped): with the jar shipped in
  ``pycocoevalcap`` when ``java`` is on the PATH, else with :func:`ptb_tokenize_python`, a
  pure-Python tokenizer written to give the jar's output (``ptb.py``; line breaks inside captions
  are made spaces so that captions never shift, see there). METEOR (Java) is
  optional; SPICE is not offered (it downloads Stanford CoreNLP models at run time).
* VQA accuracy: the official VQA script (``vqaEval.py``): answer normalisation (punctuation,
  number words, articles, contractions; applied when the human answers disagree, as there) and
  ``min(1, #matching humans / 3)`` averaged over the 10 leave-one-out subsets of the human answers;
  optionally OpenFlamingo's variant (``entries``: leave-one-out by entry equality, see
  :func:`vqa_accuracy`).
* OK-VQA: the prediction is also stemmed (:func:`okvqa_stem`, in ``okvqa.py``): OpenFlamingo's
  procedure (its manual table, WordNet verb lemmas of -ing words, singular of plural nouns) offline.
* ROC-AUC (Hateful Memes) and top-k accuracy (ImageNet).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from ._tables import (
    VQA_ARTICLES,
    VQA_CONTRACTIONS,
    VQA_NUMBER_WORDS,
    VQA_PUNCTUATION,
)
from .okvqa import okvqa_stem
from .ptb import ptb_tokenize_java, ptb_tokenize_python, sanitize_caption

__all__ = [
    "caption_metrics",
    "java_available",
    "normalize_vqa_answer",
    "okvqa_stem",
    "ptb_tokenize",
    "ptb_tokenize_python",
    "resolve_caption_tokenizer",
    "sanitize_caption",
    "roc_auc",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_score",
]


# -- VQA accuracy -----------------------------------------------------------------------------------
# Both regular expressions are the official script's, quirks included: the period "lookbehind" is
# written ``(?!<=\d)`` (a negative lookahead for "<=digit", so it never fires) and ``re.sub`` is
# given ``re.UNICODE`` (= 32) as its *count*, so at most 32 periods are removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in VQA_PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official normalisation of a predicted answer: whitespace, punctuation, number words to
    digits, articles dropped, contractions restored (``"Two dogs."`` -> ``"2 dogs"``)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(
    prediction: str,
    answers: Sequence[str],
    *,
    gt_normalization: str = "official",
    entries: Sequence[Hashable] | None = None,
) -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers, in [0, 1].

    For each human answer, the prediction scores ``min(1, #other humans giving it / 3)``; the
    result is the mean over the humans. Normalisation follows the official script
    (``gt_normalization="official"``, ``vqaEval.py`` at its last revision): everything is
    whitespace-stripped, and only when the humans disagree are both their answers and the
    prediction normalised (punctuation, number words, articles, contractions); unanimous answers
    are compared as they are. ``"always"`` normalises every time (OpenFlamingo's copy of the script).

    ``entries`` (one per answer: the annotation entry's other fields, e.g. ``answer_confidence``)
    switches to OpenFlamingo's leave-one-out: it removes the left-out answer's dict by equality
    (``item != gtAnsDatum``), so without an ``answer_id`` every entry identical to it (same
    normalised answer, same other fields) is removed too. On VizWiz-format files, which have no
    ``answer_id``, that lowers the score of common answers; with ``answer_id`` it changes nothing.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    if entries is not None and len(entries) != len(answers):
        raise ValueError(f"entries must have one item per answer ({len(answers)}), got {len(entries)}")
    clean = lambda t: t.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    res = clean(prediction)
    gts = [clean(a) for a in answers]
    if gt_normalization == "always" or (gt_normalization == "official" and len(set(gts)) > 1):
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        res = _process_digit_article(_process_punctuation(res))
    elif gt_normalization != "official":
        raise ValueError(f"gt_normalization must be 'official' or 'always', got {gt_normalization!r}")
    keys = list(zip(gts, entries)) if entries is not None else None
    total = 0.0
    for i in range(len(gts)):
        if keys is None:  # the official leave-one-out: this one answer out
            matches = sum(1 for j, g in enumerate(gts) if j != i and g == res)
        else:  # OpenFlamingo's: every entry equal to this one out
            matches = sum(1 for j, g in enumerate(gts) if keys[j] != keys[i] and g == res)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def vqa_score(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    *,
    gt_normalization: str = "official",
) -> float:
    """Mean VQA accuracy x100 over the questions in ``predictions`` (each must have answers)."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise KeyError(f"{len(missing)} predicted question id(s) have no annotation, e.g. {missing[:3]}")
    accs = [vqa_accuracy(p, answers[q], gt_normalization=gt_normalization) for q, p in predictions.items()]
    return 100.0 * float(np.mean(accs))


# -- caption tokenisation (see ptb.py) ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _ptb_jar() -> str | None:
    try:
        import pycocoevalcap
    except ImportError:
        return None
    for base in getattr(pycocoevalcap, "__path__", []):
        jar = os.path.join(base, "tokenizer", "stanford-corenlp-3.4.1.jar")
        if os.path.isfile(jar):
            return jar
    return None


def _ptb_tokenize_java(sentences: list[str]) -> list[str]:
    jar = _ptb_jar()
    if jar is None:
        raise RuntimeError("pycocoevalcap's stanford-corenlp-3.4.1.jar was not found; pip install pycocoevalcap")
    return ptb_tokenize_java(sentences, jar)


def resolve_caption_tokenizer(backend: str = "auto") -> str:
    """The caption tokenizer ``backend`` stands for: ``"auto"`` is ``"java"`` when a working
    ``java`` and pycocoevalcap's jar exist, else ``"python"``."""
    if backend not in ("auto", "java", "python"):
        raise ValueError(f"caption tokenizer must be 'auto', 'java' or 'python', got {backend!r}")
    if backend == "auto":
        return "java" if java_available() and _ptb_jar() is not None else "python"
    return backend


def ptb_tokenize(
    captions: Mapping[Hashable, Sequence[str]], backend: str = "auto"
) -> tuple[dict[Hashable, list[str]], str]:
    """Tokenise ``{key: [caption, ...]}`` in one call; returns the tokenised dict and the backend
    used (``"java"``: the Stanford PTBTokenizer COCOEvalCap uses; ``"python"``:
    :func:`ptb_tokenize_python`). ``backend="auto"`` picks Java when ``java`` and the jar are
    available. Line breaks inside captions become spaces first, so every caption stays on its
    own line and keys never shift."""
    backend = resolve_caption_tokenizer(backend)
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    if backend == "java":
        if not java_available():
            raise RuntimeError("caption tokenizer 'java' asked for, but no working `java` is on the PATH")
        tokenized = _ptb_tokenize_java(flat)
    else:
        tokenized = [ptb_tokenize_python(c) for c in flat]
    if len(tokenized) != len(flat):  # never: both paths return one line per caption or raise
        raise RuntimeError(f"caption tokenizer returned {len(tokenized)} captions for {len(flat)}")
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, t in zip(keys, tokenized):
        out[k].append(t)
    return out, backend


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    metrics: Iterable[str] = ("cider", "bleu", "rouge"),
    tokenizer: str = "auto",
) -> dict[str, float | str]:
    """Corpus captioning metrics x100 (``CIDEr``, ``BLEU_1..4``, ``ROUGE_L``, ``METEOR``) over the
    images in ``predictions``; ``tokenizer`` is the key ``"tokenizer"`` of the result.

    CIDEr is pycocoevalcap's (CIDEr-D: sigma 6, clipped counts, x10, document frequencies from
    the references of the evaluated images), which is what COCOEvalCap and OpenFlamingo report.
    """
    metrics = [m.lower() for m in metrics]
    unknown = set(metrics) - {"cider", "bleu", "rouge", "meteor"}
    if unknown:
        raise ValueError(f"unknown caption metric(s) {sorted(unknown)}; choose from cider, bleu, rouge, meteor")
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references or not references[k]]
    if missing:
        raise KeyError(f"{len(missing)} predicted image(s) have no reference captions, e.g. {missing[:3]}")
    keys = list(predictions)
    # COCOEvalCap indexes by image id; map to strings so mixed id types never collide.
    gts_raw = {str(i): list(references[k]) for i, k in enumerate(keys)}
    res_raw = {str(i): [predictions[k]] for i, k in enumerate(keys)}
    # References and predictions are tokenised in two calls, as COCOEvalCap does, each checked to
    # come back with exactly one line per caption.
    gts, backend = ptb_tokenize(gts_raw, tokenizer)
    res, _ = ptb_tokenize(res_raw, backend)
    out: dict[str, float | str] = {}
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    if "bleu" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, s in enumerate(scores, 1):
            out[f"BLEU_{n}"] = 100.0 * float(s)
    if "rouge" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE_L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "meteor" in metrics:
        if not java_available():
            raise RuntimeError("METEOR needs Java: install a JRE (`java` on the PATH) or leave it out of the metrics")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = 100.0 * float(scorer.compute_score(gts, res)[0])
        finally:
            close = getattr(scorer, "close", None)
            if close is not None:
                close()
    out["tokenizer"] = backend
    return out


# -- classification ---------------------------------------------------------------------------------
def roc_auc(labels: Sequence[int | bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (ties count half), i.e.
    the Mann-Whitney U statistic over (#positives x #negatives)."""
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative example")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def topk_accuracy(ranked_predictions: Sequence[Sequence[str]], targets: Sequence[str], k: int) -> float:
    """Share (x100) of examples whose target is among the first ``k`` ranked predictions."""
    if len(ranked_predictions) != len(targets) or not targets:
        raise ValueError("need one ranked prediction list per target, and at least one target")
    hits = sum(t in list(p)[:k] for p, t in zip(ranked_predictions, targets))
    return 100.0 * hits / len(targets)
