"""Compatibility modes that reproduce OpenFlamingo's scoring: VizWiz's leave-one-out
(``--vqa-compat openflamingo``), recorded in the unit, the summary and the markdown."""

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from flamingo_vlm.eval import EvalConfig, Evaluator
from flamingo_vlm.eval.cli import build_parser
from flamingo_vlm.eval.datasets import VQADataset
from flamingo_vlm.eval.metrics import vqa_accuracy
from flamingo_vlm.eval.results import markdown_table, summarize
from flamingo_vlm.eval.tasks import get_task


def _conf(c):
    return json.dumps({"answer_confidence": c})


def test_openflamingo_leave_one_out_hand_computed():
    answers = ["white"] * 4 + ["blue"] * 6
    entries = [_conf("yes")] * 3 + [_conf("maybe")] + [_conf("yes")] * 6
    # official: each white human sees 3 other whites (1), each blue human 4 (1)
    assert vqa_accuracy("white", answers) == 1.0
    # OpenFlamingo: leaving out a (white, yes) entry removes all three of them, leaving 1 white (1/3);
    # (white, maybe) leaves 3 whites (1); a (blue, yes) entry leaves the 4 whites (1)
    assert vqa_accuracy("white", answers, entries=entries) == pytest.approx((3 * (1 / 3) + 1 + 6) / 10)
    # distinct entries (an answer_id each) change nothing
    ids = [json.dumps({"answer_id": i}) for i in range(10)]
    assert vqa_accuracy("white", answers, entries=ids) == vqa_accuracy("white", answers)
    # entries compare after normalisation: "White" and "white" with one confidence are one entry, so
    # leaving out any white removes all three (0); leaving out a blue leaves 3 whites (1). Were
    # "White" its own entry, leaving it out would leave 2 whites (2/3) instead of 0.
    mixed = ["White", "white", "white", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]
    assert vqa_accuracy("white", mixed, gt_normalization="always", entries=[_conf("yes")] * 10) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="one item per answer"):
        vqa_accuracy("white", answers, entries=entries[:3])


@pytest.fixture()
def vizwiz(tmp_path):
    """A VizWiz-format folder (answers without answer_id) with 3 questions."""
    root = tmp_path / "vizwiz"
    (root / "val").mkdir(parents=True)
    rows = [
        (["white"] * 4 + ["blue"] * 6, ["yes"] * 3 + ["maybe"] + ["yes"] * 6),
        (["unanswerable"] * 8 + ["no"] * 2, ["yes", "no", "maybe", "yes", "yes", "no", "yes", "maybe", "yes", "yes"]),
        (["soup"] * 10, ["yes"] * 10),
    ]
    questions, annotations = [], []
    for q, (answers, confs) in enumerate(rows):
        image = f"VizWiz_val_{q:08d}.jpg"
        Image.new("RGB", (8, 8)).save(root / "val" / image)
        questions.append({"question_id": q, "image_id": image, "question": "What is this?"})
        annotations.append({"question_id": q, "image_id": image, "question_type": "other",
                            "answers": [{"answer": a, "answer_confidence": c} for a, c in zip(answers, confs)]})
    (root / "val_questions_vqa_format.json").write_text(json.dumps({"questions": questions}))
    (root / "val_annotations_vqa_format.json").write_text(json.dumps({"annotations": annotations}))
    return root


def _score(root, compat, predictions):
    spec = get_task("vizwiz")
    test = VQADataset.from_root(root, "val", dataset="vizwiz")
    fake = SimpleNamespace(config=EvalConfig(tasks=["vizwiz"], data_root=str(root.parent), vqa_compat=compat))
    records = [{"id": q, "prediction": p} for q, p in enumerate(predictions)]
    return Evaluator._score_records(fake, spec, test, records)


def test_vizwiz_official_by_default_openflamingo_on_request(vizwiz):
    test = VQADataset.from_root(vizwiz, "val", dataset="vizwiz")
    assert test[0]["answer_entries"][3] == _conf("maybe")
    majority = ["blue", "unanswerable", "soup"]
    official = _score(vizwiz, "official", majority)
    compat = _score(vizwiz, "openflamingo", majority)
    assert official["score"] == pytest.approx(100.0)
    # question 1: "unanswerable" entries (yes x5, no, maybe x2); leaving out a "yes" one removes all 5,
    # leaving 3 matches (1); the others leave >= 6 (1). Question 0: blue (yes) x6 all removed -> 0 for
    # those 6; white entries leave 6 blues (1) -> 0.4. Question 2: all ten equal -> 0.
    assert compat["score"] == pytest.approx(100 * (0.4 + 1.0 + 0.0) / 3)
    assert official["scoring"] == {"vqa_compat": "official", "vqa_gt_normalization": "official"}
    assert compat["scoring"] == {"vqa_compat": "openflamingo", "vqa_gt_normalization": "always"}
    unit = {"task": "vizwiz", "shots": 0, "trial": 0, "seed": 42, "num_samples": 3, **compat}
    summary = summarize([unit])
    assert summary["vizwiz"][0]["scoring"]["vqa_compat"] == "openflamingo"
    assert "- vizwiz: vqa_compat = `openflamingo`: VQA accuracy: OpenFlamingo's leave-one-out" in markdown_table(summary)


def test_vqa_compat_flag_and_validation():
    args = build_parser().parse_args(["--tasks", "vizwiz", "--vqa-compat", "openflamingo"])
    assert args.vqa_compat == "openflamingo"
    assert build_parser().parse_args(["--tasks", "vizwiz"]).vqa_compat == "official"
    with pytest.raises(ValueError, match="vqa_compat must be"):
        EvalConfig(tasks=["vizwiz"], data_root=".", vqa_compat="paper").validate()
