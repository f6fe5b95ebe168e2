"""Metrics of the OpenFlamingo evaluation suite.

* Captioning: CIDEr (the paper's number, x100), BLEU-1..4 and ROUGE-L through ``pycocoevalcap``'s
  pure-Python scorers. Captions are first tokenised like ``COCOEvalCap`` does (Stanford
  PTBTokenizer, lower-cased, punctuation tokens dropped): with the jar shipped in
  ``pycocoevalcap`` when ``java`` is on the PATH, else with :func:`ptb_tokenize_python`, a
  pure-Python re-implementation of the rules that matter for captions. METEOR (Java) is
  optional; SPICE is not offered (it downloads Stanford CoreNLP models at run time).
* VQA accuracy: the official VQA script (``vqaEval.py``): answer normalisation (punctuation,
  number words, articles, contractions; applied when the human answers disagree, as there) and
  ``min(1, #matching humans / 3)`` averaged over the 10 leave-one-out subsets of the human answers.
* OK-VQA: the prediction is also stemmed (:func:`okvqa_stem`), an offline stand-in for
  OpenFlamingo's nltk (POS tagger + WordNet) procedure.
* ROC-AUC (Hateful Memes) and top-k accuracy (ImageNet).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from ._tables import (
    VQA_ARTICLES,
    VQA_CONTRACTIONS,
    VQA_NUMBER_WORDS,
    VQA_PUNCTUATION,
)

__all__ = [
    "caption_metrics",
    "java_available",
    "normalize_vqa_answer",
    "okvqa_stem",
    "ptb_tokenize",
    "ptb_tokenize_python",
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


def vqa_accuracy(prediction: str, answers: Sequence[str], *, gt_normalization: str = "official") -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers, in [0, 1].

    For each human answer, the prediction scores ``min(1, #other humans giving it / 3)``; the
    result is the mean over the humans. Normalisation follows the official script
    (``gt_normalization="official"``, ``vqaEval.py`` at its last revision): everything is
    whitespace-stripped, and only when the humans disagree are both their answers and the
    prediction normalised (punctuation, number words, articles, contractions); unanimous answers
    are compared as they are. ``"always"`` normalises every time (OpenFlamingo's copy of the script).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    clean = lambda t: t.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    res = clean(prediction)
    gts = [clean(a) for a in answers]
    if gt_normalization == "always" or (gt_normalization == "official" and len(set(gts)) > 1):
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        res = _process_digit_article(_process_punctuation(res))
    elif gt_normalization != "official":
        raise ValueError(f"gt_normalization must be 'official' or 'always', got {gt_normalization!r}")
    total = 0.0
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == res)
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


# -- OK-VQA stemming ----------------------------------------------------------------------------------
# OpenFlamingo: nltk.word_tokenize + nltk.pos_tag; then WordNet's verb
# lemma for words ending in -ing, then inflection.singularize for plural nouns (NNS/NNPS). The
# nltk tagger and WordNet need data downloads; this version uses rules instead (see the README).
_CLITICS = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PUNCT_SPLIT = re.compile(r"([,;:!?()\[\]{}\"]|\.\.\.)")
_ING_EXCEPTIONS = {"lying": "lie", "dying": "die", "tying": "tie", "vying": "vie"}
# -ing words that are not verb forms WordNet can reduce (it leaves them unchanged).
_ING_NOUNS = frozenset(
    "nothing something anything everything awning sibling duckling earring herring shilling viking "
    "darling sterling gosling seedling pudding wedding".split()
) - {"wedding"}  # WordNet does reduce "wedding" to "wed"
# Words ending in -s that are not plural nouns (the tagger would not mark them NNS).
_NOT_PLURAL = frozenset(
    "yes this thus has was does is his hers its ours yours theirs always perhaps sometimes whereas "
    "towards afterwards besides nevertheless less unless across plus minus bus gas chaos lens bias "
    "atlas canvas iris virus campus status bonus census circus cactus corpus focus octopus apparatus "
    "tennis physics mathematics news series species means whats thats lets christmas police".split()
)
_VOWELS = set("aeiou")


def _tokenize_words(text: str) -> list[str]:
    """A small Treebank-style word tokenizer (what ``nltk.word_tokenize`` does to short answers)."""
    text = text.replace('"', " ")
    tokens: list[str] = []
    for chunk in _PUNCT_SPLIT.sub(r" \1 ", text).split():
        if len(chunk) > 1 and chunk.endswith(".") and chunk.count(".") == 1:
            chunk_parts = [chunk[:-1], "."]
        else:
            chunk_parts = [chunk]
        for part in chunk_parts:
            m = _CLITICS.match(part)
            if m and m.group(1):
                tokens.extend([m.group(1), m.group(2)])
            else:
                tokens.append(part)
    return tokens


def _vowel_groups(word: str) -> int:
    groups, prev = 0, False
    for ch in word:
        v = ch in _VOWELS
        groups += v and not prev
        prev = v
    return groups


def _lemmatize_ing(word: str) -> str:
    """Verb lemma of an -ing form by rule (WordNet's morphy + exception list does it by lexicon)."""
    lower = word.lower()
    if lower in _ING_EXCEPTIONS:
        return _ING_EXCEPTIONS[lower]
    if len(word) <= 4 or lower in _ING_NOUNS:
        return word
    stem = word[:-3]
    if not any(c in "aeiouy" for c in stem.lower()):
        return word  # bring, string, thing: no verb stem left
    low = stem.lower()
    if len(low) >= 2 and low[-1] == low[-2] and low[-1] not in _VOWELS and low[-1] not in "lsz":
        return stem[:-1]  # running -> run, sitting -> sit (but falling, kissing, buzzing keep theirs)
    if low[-1] in "vu" or (low[-1] in "cz" and low[-2:] not in ("ck", "zz")):
        return stem + "e"  # driving, serving, dancing, racing, grazing, arguing
    if (
        _vowel_groups(low) == 1
        and low[-1] not in _VOWELS and low[-1] not in "wxy"
        and low[-2] in _VOWELS
        and (len(low) == 2 or low[-3] not in _VOWELS)
    ):
        return stem + "e"  # making, riding, skating, hiking, using
    return stem


def _singularize(word: str) -> str:
    import inflection

    return inflection.singularize(word)


def _looks_plural(word: str) -> bool:
    lower = word.lower()
    return (
        len(lower) > 3
        and lower.isalpha()
        and lower.endswith("s")
        and not lower.endswith(("ss", "us", "is"))
        and lower not in _NOT_PLURAL
    )


def okvqa_stem(text: str) -> str:
    """Stem an answer like OK-VQA v1.1's answers were stemmed: -ing verbs to their lemma, plural
    nouns to the singular, by rule (no word list copied from elsewhere). Tokens are re-joined with single spaces."""
    out = []
    for w in _tokenize_words(text):
        if w.endswith("ing"):
            w = _lemmatize_ing(w)
        elif _looks_plural(w):
            w = _singularize(w)
        out.append(w)
    return " ".join(out)


# -- caption tokenisation ---------------------------------------------------------------------------
#: Tokens ``pycocoevalcap``'s PTBTokenizer wrapper removes after tokenising.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc ltd co corp mt prof gen rev".split())
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PTB_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}


def _ptb_tokens(sentence: str) -> list[str]:
    s = sentence.lower()
    s = re.sub(r'(^|[\s(\[{])"', r"\1 `` ", s)
    s = s.replace('"', " '' ")
    s = re.sub(r"(^|[\s(\[{])'(?=\S)", r"\1 ` ", s)
    s = s.replace("`", " ` ")
    s = re.sub(r"\.\.\.", " ... ", s)
    s = re.sub(r"--", " -- ", s)
    s = re.sub(r"([;!?&%$])", r" \1 ", s)
    s = re.sub(r"([(\[{)\]}])", r" \1 ", s)
    s = re.sub(r",(?!\d)|(?<!\d),", " , ", s)
    s = re.sub(r":(?!\d)|(?<!\d):", " : ", s)
    tokens: list[str] = []
    words = s.split()
    for i, w in enumerate(words):
        if w in _BRACKETS:
            tokens.append(_BRACKETS[w])
            continue
        trailing: list[str] = []
        if len(w) > 1 and w.endswith("'") and not w.endswith("''") and w[-2].isalpha() and "'" not in w[:-1]:
            w, trailing = w[:-1], ["'"]
        if w.endswith(".") and len(w) > 1 and w != "...":
            body = w[:-1]
            last = i == len(words) - 1
            if "." not in body and body not in _ABBREVIATIONS or (last and "." not in body):
                w, trailing = body, ["."] + trailing
        if w in _PTB_SPLIT_WORDS:
            tokens.extend(_PTB_SPLIT_WORDS[w])
        else:
            m = _PTB_CLITIC.match(w)
            if m:
                tokens.extend([m.group(1), m.group(2)])
            else:
                tokens.append(w)
        tokens.extend(trailing)
    return tokens


def ptb_tokenize_python(sentence: str) -> str:
    """Tokenise one caption like ``PTBTokenizer -preserveLines -lowerCase`` and drop the same
    punctuation tokens as ``pycocoevalcap``. Bracket tokens stay (lower-cased ``-lrb-`` is not in
    ``pycocoevalcap``'s list, a quirk kept for equality with the Java path)."""
    return " ".join(t for t in _ptb_tokens(sentence.replace("\n", " ")) if t not in PTB_PUNCTUATIONS)


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
        raise RuntimeError("pycocoevalcap's stanford-corenlp-3.4.1.jar was not found")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(s.replace("\n", " ") for s in sentences))
        path = f.name
    try:
        proc = subprocess.run(
            ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
            capture_output=True, check=True,
        )
    finally:
        os.unlink(path)
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS) for line in lines[: len(sentences)]]


def ptb_tokenize(
    captions: Mapping[Hashable, Sequence[str]], backend: str = "auto"
) -> tuple[dict[Hashable, list[str]], str]:
    """Tokenise ``{key: [caption, ...]}``; returns the tokenised dict and the backend used
    (``"java"``: the Stanford PTBTokenizer COCOEvalCap uses; ``"python"``: :func:`ptb_tokenize_python`).
    ``backend="auto"`` picks Java when ``java`` and the jar are available."""
    if backend not in ("auto", "java", "python"):
        raise ValueError(f"backend must be 'auto', 'java' or 'python', got {backend!r}")
    if backend == "auto":
        backend = "java" if java_available() and _ptb_jar() is not None else "python"
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    if backend == "java":
        if not java_available():
            raise RuntimeError("caption tokenizer 'java' asked for, but no working `java` is on the PATH")
        tokenized = _ptb_tokenize_java(flat)
    else:
        tokenized = [ptb_tokenize_python(c) for c in flat]
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
    both, backend = ptb_tokenize({**{("g", k): v for k, v in gts_raw.items()}, **{("r", k): v for k, v in res_raw.items()}}, tokenizer)
    gts = {k: both[("g", k)] for k in gts_raw}
    res = {k: both[("r", k)] for k in res_raw}
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
