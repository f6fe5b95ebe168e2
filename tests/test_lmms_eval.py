"""lmms-eval integration: lmms-eval's own evaluator runs local tasks (a handful of images saved with
`datasets`, task YAMLs written here, nothing downloaded) on a tiny random Flamingo through
``flamingo_vlm.integrations.lmms_eval.FlamingoVLM``; its predictions and log-likelihoods must be
what Flamingo.generate / Flamingo.score give for the same prompts."""

from __future__ import annotations

import math
import textwrap

import pytest

from PIL import ImageFile  # noqa: E402

_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
pytest.importorskip("lmms_eval.evaluator", reason="lmms-eval not installed (scripts/setup.sh installs it)")
# Importing lmms-eval sets PIL's process-wide LOAD_TRUNCATED_IMAGES = True (lmms_eval/api/task.py); this
# module is imported while pytest collects, so put it back for every other test (which check that a
# truncated image is an error).
ImageFile.LOAD_TRUNCATED_IMAGES = _truncated
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from flamingo_vlm import FlamingoProcessor  # noqa: E402
from tiny import random_images, tiny_flamingo  # noqa: E402

QUESTIONS = ["what colour?", "what shape?", "two cats?", "a red car?"]
CHOICES = ["red", "blue", "a dog", "two cats"]
UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "Question:" + doc["question"] + " Short answer:"


def doc_to_choice(doc):
    return list(doc["choices"])


def ll_process_results(doc, results):  # lmms-eval 0.7.3's default unpacks [(ll, is_greedy)] as (ll, is_greedy)
    ll, is_greedy = results[0]
    return {"acc": int(is_greedy)}
'''


def _prompt(question: str) -> str:
    return "<image>Question:" + question + " Short answer:"


@pytest.fixture(scope="module")
def tiny():
    model, image_processor, tokenizer = tiny_flamingo(seed=1)
    return model, image_processor, tokenizer, FlamingoProcessor(tokenizer, image_processor)


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(a) for a in random_images(len(QUESTIONS), seed=1)]


def _greedy_ids(tiny, image, question, n):
    """Greedy continuation ids of length <= n, nothing suppressed (what lmms-eval calls greedy)."""
    model, _, _, processor = tiny
    batch = processor([(_prompt(question), [image])])
    out = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"],
                         max_new_tokens=n, num_beams=1, do_sample=False, allow_image_tokens=True)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny, images):
    """Three tasks over one saved dataset: generate_until, multiple_choice and loglikelihood."""
    _, _, tokenizer, _ = tiny
    root = tmp_path_factory.mktemp("lmms_tasks")
    # loglikelihood targets: docs 0 and 2 continue with the model's own greedy token, docs 1 and 3
    # with a first token the model does not pick, so `acc` (is_greedy) must be exactly 0.5.
    def continuation(question, text):
        whole = tokenizer(_prompt(question) + text, add_special_tokens=False)["input_ids"]
        return whole[len(tokenizer(_prompt(question), add_special_tokens=False)["input_ids"]):]

    # multiple_choice labels: each document's likeliest choice by Flamingo.score, so `acc` must be 1.0
    # (lmms-eval ranks the returned values by argmin: the least likely choice would give 0.0)
    model, _, _, processor = tiny
    labels = []
    for image, question in zip(images, QUESTIONS):
        batch = processor([(_prompt(question), [image])])
        cands = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in CHOICES]
        scores = model.score(batch["vision_x"], batch["input_ids"], cands, batch["attention_mask"])[0]
        assert scores.max() > scores.min()  # a likeliest choice exists
        labels.append(int(scores.argmax()))
    targets = []
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        ids = _greedy_ids(tiny, image, question, 1)
        if i % 2:
            text = next(w for w in (" red", " blue", " dog", " cats") if continuation(question, w)[0] != ids[0])
        else:
            text = tokenizer.decode(ids)
            assert continuation(question, text) == ids  # the greedy tokens survive decode + encode
        targets.append(text)
    data = datasets.Dataset.from_dict(
        {"image": images, "question": QUESTIONS, "choices": [CHOICES] * len(QUESTIONS),
         "label": labels, "answer": ["red", "square", "yes", "no"], "target": targets},
        features=datasets.Features({
            "image": datasets.Image(), "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int64"),
            "answer": datasets.Value("string"), "target": datasets.Value("string"),
        }),
    )
    datasets.DatasetDict({"test": data}).save_to_disk(str(root / "data"))
    (root / "utils.py").write_text(UTILS)
    common = f"""
        dataset_path: {root / "data"}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
    """
    (root / "gen.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: flamingo_local_gen
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          until: ["Question"]
          max_new_tokens: 6
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """))
    (root / "mc.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: flamingo_local_mc
        output_type: multiple_choice
        doc_to_target: label
        doc_to_choice: !function utils.doc_to_choice
        metric_list:
          - metric: acc
    """))
    (root / "ll.yaml").write_text(textwrap.dedent(common) + textwrap.dedent("""
        task: flamingo_local_ll
        output_type: loglikelihood
        doc_to_target: target
        process_results: !function utils.ll_process_results
        metric_list:
          - metric: acc
    """))
    return root, targets


@pytest.fixture(scope="module")
def evaluated(task_dir, tiny):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from flamingo_vlm.integrations.lmms_eval import FlamingoVLM

    model, image_processor, tokenizer, _ = tiny
    lm = FlamingoVLM(model=model, image_processor=image_processor, tokenizer=tokenizer, batch_size=2)
    manager = TaskManager("ERROR", include_path=str(task_dir[0]), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        out = simple_evaluate(model=lm, tasks=["flamingo_local_gen", "flamingo_local_mc", "flamingo_local_ll"],
                              task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return out


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


def test_generate_until_matches_flamingo_generate(evaluated, tiny, images):
    model, _, tokenizer, processor = tiny
    samples = _by_doc(evaluated["samples"]["flamingo_local_gen"])
    assert sorted(samples) == list(range(len(QUESTIONS)))
    hits = 0
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        batch = processor([(_prompt(question), [image])])
        out = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"],
                             max_new_tokens=6, num_beams=1, do_sample=False)
        expected = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        expected = expected.split("Question")[0]
        assert samples[i]["resps"][0][0] == expected
        hits += expected.strip() == ["red", "square", "yes", "no"][i]
    assert evaluated["results"]["flamingo_local_gen"]["exact_match,none"] == hits / len(QUESTIONS)


def test_multiple_choice_matches_flamingo_score(evaluated, tiny, images):
    model, _, tokenizer, processor = tiny
    samples = _by_doc(evaluated["samples"]["flamingo_local_mc"])
    correct = 0
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        batch = processor([(_prompt(question), [image])])
        candidates = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in CHOICES]
        expected = model.score(batch["vision_x"], batch["input_ids"], candidates, batch["attention_mask"])[0]
        got = [resp[0][0] for resp in samples[i]["resps"]]
        assert got == pytest.approx((-expected).tolist(), abs=1e-4)  # a loss, as lmms-eval's models return
        assert all(isinstance(r[0][1], bool) for r in samples[i]["resps"])
        correct += int(expected.argmax()) == samples[i]["doc"]["label"]
    assert correct == len(QUESTIONS)  # the labels are the likeliest choices (task_dir)
    assert evaluated["results"]["flamingo_local_mc"]["acc,none"] == 1.0


def test_loglikelihood_value_and_greedy_flag(evaluated, tiny, images, task_dir):
    model, _, tokenizer, processor = tiny
    targets = task_dir[1]
    samples = _by_doc(evaluated["samples"]["flamingo_local_ll"])
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        batch = processor([(_prompt(question), [image])])
        ids = tokenizer(_prompt(question) + targets[i], add_special_tokens=False)["input_ids"]
        cont = ids[len(tokenizer(_prompt(question), add_special_tokens=False)["input_ids"]):]
        expected = model.score(batch["vision_x"], batch["input_ids"], [cont], batch["attention_mask"])[0, 0]
        ll, is_greedy = samples[i]["resps"][0][0]
        assert math.isfinite(ll) and ll == pytest.approx(-float(expected), abs=1e-4)
        assert is_greedy is (i % 2 == 0)
    assert evaluated["results"]["flamingo_local_ll"]["acc,none"] == 0.5


def test_registered_with_lmms_eval_and_bad_input():
    from lmms_eval import models

    from flamingo_vlm.integrations.lmms_eval import FlamingoVLM

    # Through the `lmms_eval.models` entry point in pyproject.toml (needs an install of this checkout).
    assert models.get_model("flamingo_vlm") is FlamingoVLM
    assert models.get_model("flamingo-vlm") is FlamingoVLM
    with pytest.raises(TypeError, match="unknown model_args colour"):
        FlamingoVLM(colour="red")
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but the task gives 1 image"):
        FlamingoVLM._prompt("<image>a<image>b", 1)
    assert FlamingoVLM._prompt("Output:", 2) == "<image><image>Output:"
    with pytest.raises(ValueError, match="gives a video"):
        FlamingoVLM._image("clip.mp4", "t", 0)


def test_package_imports_without_lmms_eval():
    import subprocess
    import sys

    code = ("import sys; sys.modules['lmms_eval'] = None; import flamingo_vlm, flamingo_vlm.integrations; "
            "print(sorted(m for m in sys.modules if m.startswith('lmms_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['lmms_eval']"  # only the blocked placeholder: nothing imported it


def test_openai_compatible_server_gives_the_same_predictions(evaluated, task_dir, tiny):
    """lmms-eval's `openai` model against our server (README's recipe) answers as in-process does."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from flamingo_vlm.serve.app import ServeConfig, create_app
    from flamingo_vlm.serve.engine import Engine
    from flamingo_vlm.serve.testing import serve_in_thread

    model, image_processor, tokenizer, _ = tiny
    app = create_app(Engine(model, image_processor, tokenizer, max_batch_size=1), ServeConfig(model_name="tiny"))
    manager = TaskManager("ERROR", include_path=str(task_dir[0]), include_defaults=False)
    with serve_in_thread(app) as base_url:
        out = simple_evaluate(model="openai", model_args=f"model=tiny,base_url={base_url}/v1,api_key=unused",
                              tasks=["flamingo_local_gen"], task_manager=manager, log_samples=True,
                              bootstrap_iters=0, verbosity="ERROR")
    via_api = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["flamingo_local_gen"]}
    in_process = {i: s["resps"][0][0] for i, s in _by_doc(evaluated["samples"]["flamingo_local_gen"]).items()}
    assert via_api == in_process


def test_instances_text_only_and_multi_round(tiny, images):
    """lmms-eval's own Instance objects: a text-only (mutual-information style) pair, and two rounds."""
    from lmms_eval.api.instance import Instance

    from flamingo_vlm.integrations.lmms_eval import FlamingoVLM

    model, image_processor, tokenizer, processor = tiny
    lm = FlamingoVLM(model=model, image_processor=image_processor, tokenizer=tokenizer)
    lm.task_dict = {"t": {"test": [{"image": images[0]}]}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    [(ll, _)] = lm.loglikelihood([Instance("loglikelihood", ("An image of", " two cats"), idx=0, metadata=meta)])
    batch = processor(["An image of"])
    cont = tokenizer(" two cats", add_special_tokens=False)["input_ids"]
    assert -ll == pytest.approx(float(model.score(batch["vision_x"], batch["input_ids"], [cont], batch["attention_mask"])[0, 0]), abs=1e-4)

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        done = round_idx == 2
        return [doc["image"]], "Output:" + previous_output[-1], done, previous_output, None

    gen = {"max_new_tokens": 3}
    [rounds] = lm.generate_until_multi_round([Instance(
        "generate_until_multi_round", ("Output:", gen, lambda doc: [doc["image"]], doc_to_text, 0, "t", "test"), idx=0,
        metadata=meta)])
    first = lm._generate([("<image>Output:", [images[0]])], gen)[0]
    second = lm._generate([("<image>Output:" + first, [images[0]])], gen)[0]
    assert rounds == (first, second)
