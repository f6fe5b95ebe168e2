"""Evaluation metrics against hand-computed values and the published formulas."""

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from flamingo_vlm.eval.metrics import (
    _ptb_jar,
    caption_metrics,
    java_available,
    normalize_vqa_answer,
    okvqa_stem,
    ptb_tokenize,
    ptb_tokenize_python,
    roc_auc,
    topk_accuracy,
    vqa_accuracy,
    vqa_score,
)
from flamingo_vlm.eval.prompts import postprocess_caption, postprocess_vqa


# -- VQA accuracy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("the cat, dog", "cat dog"),  # ", " -> removed, article dropped
    ("1,000", "1000"),  # comma between digits
    ("dont", "don't"),  # contraction restored
    ("a  Red\tball\n", "red ball"),
    ("none", "0"),
    ("yes!", "yes"),
    ("3.5", "3.5"),  # a period between digits stays
])
def test_vqa_normalization(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_hand_computed():
    # all ten humans agree: each leave-one-out subset has 9 matches -> min(1, 9/3) = 1
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    # 2 "yes" / 8 "no", predict "yes": the 2 yes-humans see 1 other yes (1/3), the 8 no-humans see 2 (2/3)
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 "red": red-humans see 2 others (2/3), the other 7 see 3 (1)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # one matching human: only the 9 subsets that keep him count 1/3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("horse", ["cat"] * 10) == 0.0
    # disagreeing humans: both sides normalised ("The dog." -> "dog", "two" -> "2")
    assert vqa_accuracy("The dog.", ["dog"] * 4 + ["puppy"] * 6) == 1.0
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)


def test_vqa_gt_normalization_official_vs_always():
    # The official script compares unanimous answers as they are (only stripped); OpenFlamingo's
    # variant ("always") normalises them and the prediction every time.
    assert vqa_accuracy(" 2 ", ["2"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10, gt_normalization="official") == 0.0
    assert vqa_accuracy("two", ["2"] * 10, gt_normalization="always") == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, gt_normalization="always") == 1.0
    # Disagreeing answers are normalised: "t-shirt" -> "t shirt" on both sides.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], gt_normalization="sometimes")


def test_vqa_score_is_mean_times_100_and_checks_ids():
    preds = {1: "yes", 2: "no"}
    answers = {1: ["yes"] * 10, 2: ["yes"] * 10, 3: ["no"] * 10}
    assert vqa_score(preds, answers) == 50.0
    with pytest.raises(KeyError, match="no annotation"):
        vqa_score({4: "yes"}, answers)


def test_vqa_postprocessing():
    assert postprocess_vqa("red Question: what") == "red"
    assert postprocess_vqa("two, three") == "two"
    assert postprocess_vqa(" blue Short answer: x") == "blue"
    assert postprocess_caption('a "red" circle Output: a dog') == "a red circle"


@pytest.mark.parametrize("word, stem", [
    ("running", "run"), ("riding", "ride"), ("skating", "skate"), ("surfing", "surf"), ("skiing", "ski"),
    ("flying", "fly"), ("lying", "lie"), ("building", "build"), ("nothing", "nothing"), ("string", "string"),
    ("dogs", "dog"), ("glasses", "glass"), ("buses", "bus"), ("wolves", "wolf"), ("tennis", "tennis"),
    ("yes", "yes"), ("christmas", "christmas"), ("playing frisbee", "play frisbee"),
    ("domino's", "domino 's"),  # word_tokenize splits the clitic, as OpenFlamingo's nltk path does
])
def test_okvqa_stem(word, stem):
    pytest.importorskip("inflection")
    pytest.importorskip("nltk")  # its word tokenizer (no data download)
    assert okvqa_stem(word) == stem


# -- captioning -------------------------------------------------------------------------------------
def _cider_d_reference(gts: dict, res: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D written from its definition (Vedantam et al. 2015, as in the coco-caption code):
    tf-idf n-gram vectors (idf over the evaluated images' references), clipped cosine, a Gaussian
    length penalty (lengths counted as pycocoevalcap does), x10, averaged over n and references."""
    def grams(sentence):
        w = sentence.split()
        return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    refs = {k: [grams(r) for r in v] for k, v in gts.items()}
    df = Counter(g for rs in refs.values() for g in set().union(*[set(r) for r in rs]))
    log_n = math.log(len(refs))

    def vec(counts):
        v = [defaultdict(float) for _ in range(n)]
        norms, length = [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norms[k] += v[k][g] ** 2
            length += tf if k == 1 else 0
        return v, [math.sqrt(x) for x in norms], length

    scores = []
    for key, hyp in res.items():
        vh, nh, lh = vec(grams(hyp[0]))
        total = np.zeros(n)
        for r in refs[key]:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(vh[k][g], vr[k][g]) * vr[k][g] for g in vh[k])
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(total.mean() / len(refs[key]) * 10.0)
    return float(np.mean(scores))


GTS = {
    1: ["a red circle on the left", "a small red circle", "an image of a red circle on the left side"],
    2: ["two blue squares at the top", "blue squares on a white background", "two squares that are blue"],
    3: ["a green star in the center", "a star", "there is a green star in the middle"],
    4: ["a dog playing with a frisbee", "a dog catches a frisbee in a park", "the dog jumps for the frisbee"],
}
RES = {1: "a red circle on the left", 2: "two blue squares", 3: "a green star at the top", 4: "a cat on a sofa"}


def test_cider_matches_definition_and_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    tokenized = {k: [ptb_tokenize_python(c) for c in v] for k, v in GTS.items()}
    res_tok = {k: [ptb_tokenize_python(v)] for k, v in RES.items()}
    theirs, _ = Cider().compute_score(tokenized, res_tok)
    ours = caption_metrics(RES, GTS, metrics=["cider", "bleu", "rouge"], tokenizer="python")
    assert ours["CIDEr"] == pytest.approx(100 * theirs, abs=1e-9)
    assert ours["CIDEr"] == pytest.approx(100 * _cider_d_reference(tokenized, res_tok), rel=1e-9)
    assert 0 < ours["CIDEr"] and 0 < ours["BLEU_1"] <= 100 and 0 < ours["ROUGE_L"] <= 100
    assert ours["tokenizer"] == "python"
    # A perfect copy of every first reference beats the mixed predictions.
    perfect = caption_metrics({k: v[0] for k, v in GTS.items()}, GTS, metrics=["cider"], tokenizer="python")
    assert perfect["CIDEr"] > ours["CIDEr"]


def test_caption_metrics_errors():
    pytest.importorskip("pycocoevalcap")
    with pytest.raises(KeyError, match="no reference"):
        caption_metrics({9: "x"}, GTS, tokenizer="python")
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_metrics(RES, GTS, metrics=["spice"], tokenizer="python")


PTB_CASES = [
    "A man's red T-shirt, isn't it? (yes) 3.5 U.S. e-mail \"quoted\" it's",
    "The centre of the theatre; cannot won't gonna ... wait... $5 & 10% @home #tag",
    "Two dogs playing -- frisbee; a cat's toy & a red/blue ball: 1,000 people!",
    "a  skateboarder   doing a trick.Another sentence. Mr. Smith's car",
    "we're they'll I'd you've 'quoted' [bracket] {brace} don't can't",
    "A large red circle on the left, a small blue square at the top.",
]


def test_python_ptb_tokenizer_hand_examples():
    assert ptb_tokenize_python("A man's red T-shirt, isn't it?") == "a man 's red t-shirt is n't it"
    assert ptb_tokenize_python("Two dogs (brown) play.") == "two dogs -lrb- brown -rrb- play"


@pytest.mark.skipif(not java_available() or _ptb_jar() is None, reason="needs java and pycocoevalcap's PTBTokenizer jar")
def test_python_ptb_tokenizer_matches_stanford():
    captions = {i: [c] for i, c in enumerate(PTB_CASES)}
    java, backend = ptb_tokenize(captions, "java")
    assert backend == "java"
    python, _ = ptb_tokenize(captions, "python")
    assert python == java


# -- classification ---------------------------------------------------------------------------------
def test_roc_auc_hand_computed():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half
    assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    # positives 0.2, 0.7, 0.7 vs negatives 0.2, 0.9: 0.5 + 0 + 1 + 0 + 1 + 0
    assert roc_auc([1, 0, 1, 0, 1], [0.2, 0.2, 0.7, 0.9, 0.7]) == pytest.approx(2.5 / 6)
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([1, 1], [0.2, 0.3])


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200) / 10  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(pairwise, abs=1e-12)


def test_topk_accuracy():
    ranked = [["a", "b"], ["b", "a"], ["c", "a"]]
    assert topk_accuracy(ranked, ["a", "a", "b"], 1) == pytest.approx(100 / 3)
    assert topk_accuracy(ranked, ["a", "a", "b"], 2) == pytest.approx(200 / 3)
