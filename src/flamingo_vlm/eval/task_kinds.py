"""The kinds of evaluation task, one class each: what a task does with a batch of queries.

A task object owns its dataset loader, its prompt format (demonstration and query templates from
:mod:`.prompts`, and how they are joined), its decoding defaults, the post-processing of the
model's output and its metric. The evaluator (:mod:`.evaluator`) only chooses samples and demos,
runs :meth:`Task.predict` on batches, and hands the gathered records to :meth:`Task.score`; it
never asks which dataset it is evaluating. Scoring modes (``--vqa-compat``, the caption tokenizer,
the caption metrics) and decoding settings travel in as the run's settings (:class:`EvalSettings`,
which the evaluator's ``EvalConfig`` satisfies: tasks sit below the evaluator and never import it).

* :class:`CaptioningTask`: beam search, cut at ``Output``, CIDEr (COCO, Flickr30K);
* :class:`VQATask` / :class:`OKVQATask`: beam search, cut at ``Question``/``Answer``/``Short``,
  VQA accuracy (OK-VQA: answers stemmed);
* :class:`ClassificationTask`: every class name scored as a continuation, top-1/top-5 (ImageNet);
* :class:`HatefulMemesTask`: ``no``/``yes`` scored the same way, ROC-AUC of p(yes);
* :class:`IclTask`: episodes whose answer format only their own demonstrations show (greedy,
  exact match per question type and on the answer-format split; the synthetic ``synthetic_icl``).

The table of tasks by dataset name is in :mod:`.tasks`. A new dataset of an existing kind is one
entry there; a new kind is one subclass of :class:`Task`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ..processing import EOC_TOKEN, MEDIA_TOKEN
from . import prompts as P
from .datasets import CaptionDataset, EvalDataset, HatefulMemesDataset, ImageNetDataset, VQADataset
from .metrics import caption_metrics, java_available, okvqa_stem, resolve_caption_tokenizer, roc_auc, vqa_accuracy

__all__ = [
    "CaptioningTask", "ClassificationTask", "EvalSettings", "HatefulMemesTask", "IclDataset", "IclTask", "OKVQATask",
    "QueryBatch", "Runner", "Task",
    "VQATask", "continuation_ids", "demo_orders", "score_classes",
]


class EvalSettings(Protocol):
    """The run settings a task reads (:class:`flamingo_vlm.eval.evaluator.EvalConfig` has them)."""

    num_beams: int
    length_penalty: float
    max_new_tokens: dict[str, int]
    ensemble: bool
    ensemble_max: int
    class_chunk_size: int
    caption_metrics: list[str]
    caption_tokenizer: str

    def vqa_scoring(self) -> dict[str, str]: ...


@dataclass
class QueryBatch:
    """One batch of evaluated samples with their demonstrations (``shots`` of them; two text-only
    ones at 0 shots), from ``dataset`` at indices ``indices``, in trial ``seed``."""

    dataset: EvalDataset
    queries: list[dict]
    images: list[torch.Tensor]  # the queries' preprocessed images
    demos: list[list[dict]]
    shots: int
    seed: int
    indices: list[int]


class Runner(Protocol):
    """What a task needs from the evaluator to run the model (see :class:`.evaluator.Evaluator`)."""

    model: Any
    tokenizer: Any
    config: EvalSettings

    def encode(self, texts: list[str], images: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def prompt_images(self, demos: list[dict], query_image: torch.Tensor, shots: int) -> list[torch.Tensor]: ...

    def candidate_ids(self, anchor: str, names: list[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class Task:
    """A dataset and what to do with it. Subclasses give the class attributes and methods below."""

    name: str
    folders: tuple[str, ...]  # candidate folder names under --data-root
    description: str = ""
    demo_split: str = "train"
    eval_split: str = "val"
    max_new_tokens: int | None = None  # generation tasks: the default budget (--max-new-tokens overrides)

    kind: ClassVar[str] = ""
    metric: ClassVar[str] = ""  # the headline metric key
    extra_metrics: ClassVar[tuple[str, ...]] = ()  # further rows of results.md
    separator: ClassVar[str] = ""  # between the prompt's pieces
    # the dataset class (its ``files`` and ``from_root``) and the keyword arguments this task passes to both
    dataset_class: ClassVar[type | None] = None

    def dataset_options(self) -> dict[str, Any]:
        return {}

    def load(self, root: Path, split: str) -> EvalDataset:
        """``split`` of the dataset under ``root`` (``dataset_class.from_root``), :meth:`check_samples` checked."""
        dataset = self.dataset_class.from_root(root, split, **self.dataset_options())
        self.check_samples(dataset)
        return dataset

    def check_samples(self, dataset: EvalDataset) -> None:
        """Raise :class:`~.datasets.DatasetLayoutError` naming ``dataset.source`` where a sample lacks
        what this task needs of it (the dataset class accepts it for other uses). Default: nothing."""

    def check_files(self, root: Path, split: str) -> list[Path | None]:
        """Raise :class:`~.datasets.DatasetLayoutError` naming the first file or folder of ``split`` that
        :meth:`load` needs and ``root`` lacks, without reading any (run for every task before the
        model loads); returns the files and folders found, which the check then opens (an unreadable
        one is named before the model loads). The same class and options as :meth:`load`
        (``dataset_class.files``, which its ``from_root`` calls first)."""
        return list(self.dataset_class.files(root, split, **self.dataset_options()))

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        """The task's own settings that decide its numbers (recorded in each unit file)."""
        return {}

    def seed_matters(self, config: EvalSettings, shots: int) -> bool:
        """Whether the trial seed changes a ``shots``-shot unit beyond choosing its demos and samples
        (then trials differ even with RICES over the whole split). Default: no."""
        return False

    def own_demos(self, test: EvalDataset) -> int | None:
        """How many demonstrations every query brings itself (None: they are chosen from the demo split)."""
        return None

    def images_of(self, sample: dict, shots: int) -> list[str]:
        """The image files a ``shots``-shot query of ``sample`` reads besides its demos' from the demo
        split (checked before the model loads): its own image."""
        return [sample["image"]]

    def prompt(self, demo_texts: list[str], query_text: str, shots: int) -> str:
        return P.build_prompt(demo_texts, query_text, separator=self.separator, with_demo_images=shots > 0)

    def predict(self, runner: Runner, batch: QueryBatch) -> list[dict]:
        """One record per query: its ``id``, prediction and demo ids (rank-local; scored later)."""
        raise NotImplementedError

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        """``{"metric", "score", "metrics"[, "scoring"]}`` of the gathered records."""
        raise NotImplementedError

    def warnings(self, config: EvalSettings) -> list[str]:
        """Things to say (once per run) about how this task is scored."""
        return []


# -- generation --------------------------------------------------------------------------------------
class GenerationTask(Task):
    """Beam-search generation from the prompt, then :meth:`postprocess`."""

    separator: ClassVar[str] = "\n"

    def new_tokens(self, config: EvalSettings) -> int:
        return int(config.max_new_tokens.get(self.name, self.max_new_tokens or 0))

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        return {"num_beams": config.num_beams, "length_penalty": config.length_penalty,
                "max_new_tokens": self.new_tokens(config)}

    def demo_text(self, demo: dict) -> str:
        raise NotImplementedError

    def query_text(self, query: dict) -> str:
        raise NotImplementedError

    def postprocess(self, text: str) -> str:
        raise NotImplementedError

    def predict(self, runner: Runner, batch: QueryBatch) -> list[dict]:
        config = runner.config
        texts, images = [], []
        for q, qi, ds in zip(batch.queries, batch.images, batch.demos):
            texts.append(self.prompt([self.demo_text(d) for d in ds], self.query_text(q), batch.shots))
            images.append(runner.prompt_images(ds, qi, batch.shots))
        enc = runner.encode(texts, images)
        # length_penalty only exists for beam search: with one beam transformers warns that the flag
        # is not valid, so it is passed only with several beams (the fingerprint records it either way)
        beam = {"length_penalty": config.length_penalty} if config.num_beams > 1 else {}
        out = runner.model.generate(
            enc["vision_x"], enc["input_ids"], enc["attention_mask"],
            num_beams=config.num_beams, max_new_tokens=self.new_tokens(config), min_new_tokens=0,
            do_sample=False, **beam,
        )
        raw = runner.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [{"id": q["id"], "prediction": self.postprocess(text), "raw": text, "demos": [d["id"] for d in ds]}
                for q, ds, text in zip(batch.queries, batch.demos, raw)]


class CaptioningTask(GenerationTask):
    kind: ClassVar[str] = "captioning"
    metric: ClassVar[str] = "CIDEr"
    extra_metrics: ClassVar[tuple[str, ...]] = ("BLEU_4", "ROUGE_L")
    dataset_class: ClassVar[type] = CaptionDataset

    def dataset_options(self) -> dict[str, Any]:
        return {"dataset": self.name}  # coco or flickr30k: its file names

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        # the tokenizer actually used: "auto" differs with and without Java
        return super().fingerprint(config) | {"caption_tokenizer": resolve_caption_tokenizer(config.caption_tokenizer),
                                              "caption_metrics": sorted(config.caption_metrics)}

    def demo_text(self, demo: dict) -> str:
        return P.caption_prompt(demo["caption"].strip())

    def query_text(self, query: dict) -> str:
        return P.caption_prompt()

    def postprocess(self, text: str) -> str:
        return P.postprocess_caption(text)

    def warnings(self, config: EvalSettings) -> list[str]:
        """Say loudly that captions are tokenised without Java (CIDEr then comes from the pure-Python
        PTB tokenizer; the result files record ``caption_tokenizer: python``)."""
        if resolve_caption_tokenizer(config.caption_tokenizer) != "python":
            return []
        why = "asked for with --caption-tokenizer python" if config.caption_tokenizer == "python" else (
            "no working `java` on the PATH" if not java_available() else "pycocoevalcap's Stanford jar not found")
        return [f"caption metrics use the pure-Python PTB tokenizer ({why}), not Stanford's Java one that "
                "pycocoevalcap and the papers use; scores can differ slightly. Install a JRE "
                "(apt-get install default-jre-headless) for the reference tokenizer."]

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        by_id = {s["id"]: s for s in test}
        m = caption_metrics({r["id"]: r["prediction"] for r in records},
                            {r["id"]: by_id[r["id"]]["captions"] for r in records},
                            metrics=config.caption_metrics, tokenizer=config.caption_tokenizer)
        return {"metric": "CIDEr" if "CIDEr" in m else next(k for k in m if k != "tokenizer"),
                "score": m.get("CIDEr", next(v for k, v in m.items() if k != "tokenizer")), "metrics": m,
                "scoring": {"caption_tokenizer": m["tokenizer"]}}


class VQATask(GenerationTask):
    kind: ClassVar[str] = "vqa"
    metric: ClassVar[str] = "accuracy"
    dataset_class: ClassVar[type] = VQADataset

    def dataset_options(self) -> dict[str, Any]:
        return {"dataset": self.name}  # vqav2, ok_vqa, textvqa or vizwiz: its file names

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        # vqa_compat only when not the default, so older unit files stay valid
        return super().fingerprint(config) | {k: v for k, v in config.vqa_scoring().items()
                                              if k != "vqa_compat" or v != "official"}

    def demo_text(self, demo: dict) -> str:
        return P.vqa_prompt(demo["question"], demo["answers"][0])

    def query_text(self, query: dict) -> str:
        return P.vqa_prompt(query["question"])

    def postprocess(self, text: str) -> str:
        return P.postprocess_vqa(text)

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        by_id = {s["id"]: s for s in test}
        scoring = config.vqa_scoring()
        compat = scoring["vqa_compat"] == "openflamingo"
        per_question = {r["id"]: vqa_accuracy(r["prediction"], by_id[r["id"]]["answers"],
                                              gt_normalization=scoring["vqa_gt_normalization"],
                                              entries=by_id[r["id"]].get("answer_entries") if compat else None)
                        for r in records}
        acc = 100.0 * float(np.mean(list(per_question.values())))  # as vqa_score
        metrics = {"accuracy": acc}
        for attr, key in (("answer_type", "per_answer_type"), ("question_type", "per_question_type")):
            groups: dict[str, list[float]] = {}
            for qid, a in per_question.items():
                if attr in by_id[qid]:
                    groups.setdefault(by_id[qid][attr], []).append(a)
            if groups:  # as the official VQA evaluation reports them
                metrics[key] = {g: 100.0 * float(np.mean(v)) for g, v in sorted(groups.items())}
        return {"metric": "accuracy", "score": acc, "metrics": metrics, "scoring": scoring}


class OKVQATask(VQATask):
    """OK-VQA: the post-processed answer is stemmed (as OpenFlamingo did; see :func:`okvqa_stem`)."""

    def postprocess(self, text: str) -> str:
        return okvqa_stem(super().postprocess(text))


# -- classification ----------------------------------------------------------------------------------
def continuation_ids(tokenizer, anchor: str, text: str) -> list[int]:
    """Token ids of ``text`` as it is tokenised right after ``anchor`` (the end of the prompt),
    so class names get the ids they would have in context (for byte-level BPE this equals
    tokenising the name alone, what OpenFlamingo did; SentencePiece would add a spurious "▁")."""
    base = tokenizer(anchor, add_special_tokens=False)["input_ids"]
    full = tokenizer(anchor + text, add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return full[len(base):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score_classes(model, vision_x, input_ids, attention_mask, candidates: list[list[int]], *, media=None,
                  chunk_size: int = 128, normalize: bool = True) -> torch.Tensor:
    """:meth:`Flamingo.score` with the candidates sorted by token length, so that each chunk pads
    them to about the same length (class names range from 1 to ~10 tokens); the returned columns
    are in the original order."""
    order = sorted(range(len(candidates)), key=lambda j: len(candidates[j]))
    scores = model.score(vision_x, input_ids, [candidates[j] for j in order], attention_mask, media=media,
                         normalize=normalize, chunk_size=chunk_size)
    out = torch.empty_like(scores)
    out[:, torch.as_tensor(order, device=scores.device)] = scores
    return out


def demo_orders(k: int, n: int, seed: int, index: int) -> list[list[int]]:
    """``n`` distinct orders of ``k`` demos (prompt ensembling): the selected order first, then
    random others (OpenFlamingo drew shuffles that could repeat)."""
    base = list(range(k))
    if n <= 1:
        return [base]
    if math.factorial(k) <= n:
        return [base] + [list(p) for p in itertools.permutations(base) if list(p) != base]
    rng = np.random.default_rng([seed, int(index), 1])
    out, seen = [base], {tuple(base)}
    while len(out) < n:
        p = rng.permutation(k).tolist()
        if tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


class ClassificationTask(Task):
    """Every class name scored as a continuation of the prompt (length-normalised log-probability);
    with ``--ensemble``, averaged over up to ``ensemble_max`` demo orders. ImageNet by default."""

    kind: ClassVar[str] = "classification"
    metric: ClassVar[str] = "top1"
    extra_metrics: ClassVar[tuple[str, ...]] = ("top5",)
    anchor: ClassVar[str] = "Output:"  # the end of the query prompt, where the class name follows
    dataset_class: ClassVar[type] = ImageNetDataset

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        return {"ensemble": config.ensemble and config.ensemble_max}

    def seed_matters(self, config: EvalSettings, shots: int) -> bool:
        """Prompt ensembling draws its demo orders with the seed when it cannot take all ``shots``! of them."""
        return config.ensemble and shots > 1 and math.factorial(shots) > config.ensemble_max

    def class_names(self, test: EvalDataset) -> list[str]:
        return list(dict.fromkeys(test.class_names))  # duplicates (ImageNet has two) scored once

    def demo_text(self, demo: dict) -> str:
        return P.classification_prompt(demo["class_name"])

    def query_text(self, query: dict) -> str:
        return P.classification_prompt()

    def record_extra(self, names: list[str], probs: torch.Tensor) -> dict:
        """Further fields of a query's record, from its class probabilities."""
        return {}

    def predict(self, runner: Runner, batch: QueryBatch) -> list[dict]:
        config = runner.config
        names = self.class_names(batch.dataset)
        candidates = runner.candidate_ids(self.anchor, names)
        k = len(batch.demos[0]) if batch.demos else 0
        n_perm = min(config.ensemble_max, math.factorial(k)) if config.ensemble and k > 1 else 1
        orders = [demo_orders(k, n_perm, batch.seed, i) for i in batch.indices]
        total = None
        for p in range(n_perm):
            texts, images = [], []
            for q, qi, ds, perms in zip(batch.queries, batch.images, batch.demos, orders):
                ds_p = [ds[j] for j in perms[p]]
                texts.append(self.prompt([self.demo_text(d) for d in ds_p], self.query_text(q), batch.shots))
                images.append(runner.prompt_images(ds_p, qi, batch.shots))
            enc = runner.encode(texts, images)
            scores = score_classes(runner.model, enc["vision_x"], enc["input_ids"], enc["attention_mask"], candidates,
                                   chunk_size=config.class_chunk_size).float().cpu()
            total = scores if total is None else total + scores
        logprobs = total / n_perm
        probs = logprobs.softmax(-1)
        records = []
        for q, ds, lp, pr in zip(batch.queries, batch.demos, logprobs, probs):
            top = lp.topk(min(5, len(names))).indices.tolist()
            records.append({"id": q["id"], "label": q.get("class_name"), "top5": [names[j] for j in top],
                            "demos": [d["id"] for d in ds]} | self.record_extra(names, pr))
        return records

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        top1 = 100.0 * float(np.mean([r["top5"][0] == r["label"] for r in records]))
        top5 = 100.0 * float(np.mean([r["label"] in r["top5"] for r in records]))
        return {"metric": "top1", "score": top1, "metrics": {"top1": top1, "top5": top5}}


class HatefulMemesTask(ClassificationTask):
    """``no``/``yes`` after the meme's OCR text; ROC-AUC of p(yes) (softmax over the two), and accuracy."""

    metric: ClassVar[str] = "roc_auc"
    extra_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    anchor: ClassVar[str] = "Answer:"
    dataset_class: ClassVar[type] = HatefulMemesDataset

    def class_names(self, test: EvalDataset) -> list[str]:
        return ["no", "yes"]

    def check_samples(self, dataset: EvalDataset) -> None:
        """Demonstrations show their label and the metric needs the evaluated ones': a file without
        labels (the test files) failed as ``KeyError: 'label'`` after the unit had run."""
        from .datasets import DatasetLayoutError

        unlabelled = [s["id"] for s in dataset if "label" not in s]
        if unlabelled:
            raise DatasetLayoutError(
                f"{dataset.source}: {len(unlabelled)} example(s) have no 'label' (e.g. id {unlabelled[0]}); the "
                "evaluation needs labelled splits (train.jsonl and dev.jsonl / dev_seen.jsonl; the test files have none)")

    def demo_text(self, demo: dict) -> str:
        return P.hateful_memes_prompt(demo["ocr"], demo["class_name"])

    def query_text(self, query: dict) -> str:
        return P.hateful_memes_prompt(query["ocr"])

    def record_extra(self, names: list[str], probs: torch.Tensor) -> dict:
        return {"p_yes": float(probs[names.index("yes")])}

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        by_id = {s["id"]: s for s in test}
        top1 = 100.0 * float(np.mean([r["top5"][0] == r["label"] for r in records]))
        labels = [int(by_id[r["id"]]["label"]) for r in records]
        try:
            auc = 100.0 * roc_auc(labels, [r["p_yes"] for r in records])
        except ValueError:
            auc = float("nan")  # one class only (tiny subsets)
        return {"metric": "roc_auc", "score": auc, "metrics": {"roc_auc": auc, "accuracy": top1}}


# -- in-context episodes ---------------------------------------------------------------------------------
class IclDataset(EvalDataset):
    """The episodes of :func:`flamingo_vlm.synthetic.icl.write_icl_benchmark`: each sample is a
    query (``image``, ``prompt``, ``answer``, ``question_type``, ``answer_format``, ...) with its
    own ``demos`` (``image``, ``text``)."""

    name = "synthetic_icl"
    layout = "<root>/episodes.json and <root>/images/ (flamingo-vlm data synthetic-benchmark OUT --tasks synthetic_icl)"

    @classmethod
    def files(cls, root: Path, split: str = "heldout") -> tuple[Path]:
        """(the episodes file,) under ``root``, or :class:`DatasetLayoutError` naming it (one file holds
        every split)."""
        from .datasets import DatasetLayoutError

        path = Path(root) / "episodes.json"
        if not path.is_file():
            raise DatasetLayoutError(f"{path} not found; expected layout: {cls.layout}")
        return (path,)

    @classmethod
    def from_root(cls, root: Path, split: str) -> IclDataset:
        from .datasets import DatasetLayoutError

        (path,) = cls.files(root, split)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            episodes = data["episodes"]
        except FileNotFoundError:
            raise DatasetLayoutError(f"{path} not found; expected layout: {cls.layout}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetLayoutError(f"{path} is not an episodes file ({{'meta', 'episodes'}}): {e}") from e
        for ep in episodes:
            ep["image"] = str(Path(root) / ep["image"])
            for d in ep["demos"]:
                d["image"] = str(Path(root) / d["image"])
        ds = cls(episodes, split, path)
        ds._check_images()
        return ds


class IclTask(GenerationTask):
    """Few-shot episodes whose answer format only their demonstrations show (the ``synthetic_icl``
    folder). Each query brings its own demonstrations (same phrasing, answer map, framing and
    drawing style); a ``k``-shot prompt uses the first ``k``. Deviations from the protocol of the
    other tasks, on purpose: 0 shots is the query alone (no text-only demos, which would give the
    answer format away), decoding is greedy (answers are a few tokens), and the answer is cut at
    the end of the chunk, a new line or the framing's next question. Metric: exact match
    (whitespace collapsed, case kept: capitalisation is part of the format), overall, per question
    type, per answer lexicon and on the answer-format split (``answer_format``: the answers are not
    in the scene's own words); ``content_accuracy`` also counts a right answer in any vocabulary."""

    kind: ClassVar[str] = "icl"
    metric: ClassVar[str] = "accuracy"
    extra_metrics: ClassVar[tuple[str, ...]] = ("content_accuracy",)
    dataset_class: ClassVar[type] = IclDataset

    def fingerprint(self, config: EvalSettings) -> dict[str, Any]:
        return {"decoding": "greedy", "max_new_tokens": self.new_tokens(config), "zero_shot": "query only"}

    def own_demos(self, test: EvalDataset) -> int | None:
        return min(len(q["demos"]) for q in test)

    def images_of(self, sample: dict, shots: int) -> list[str]:
        """The query's image and those of the first ``shots`` of its own demonstrations."""
        return [sample["image"], *(d["image"] for d in sample["demos"][:shots])]

    def prompt_of(self, query: dict, shots: int) -> tuple[str, list[dict]]:
        demos = query["demos"][:shots]
        text = "".join(f"{MEDIA_TOKEN}{d['text']}{EOC_TOKEN}{self.separator}" for d in demos)
        return text + MEDIA_TOKEN + query["prompt"], demos

    @staticmethod
    def cut(text: str, framing: str) -> str:
        """The answer in a generation: up to a new line or the framing's next question marker
        (``Q:`` of ``Q: {q} A: {a}``; framings without one end at ``<|endofchunk|>`` only)."""
        text = text.split("\n", 1)[0]
        marker = framing.split("{q}", 1)[0].strip()
        if marker and marker in text:
            text = text.split(marker, 1)[0]
        return " ".join(text.split())

    def predict(self, runner: Runner, batch: QueryBatch) -> list[dict]:
        texts, images, used = [], [], []
        for q, qi in zip(batch.queries, batch.images):
            text, demos = self.prompt_of(q, batch.shots)
            texts.append(text)
            images.append(runner.prompt_images(demos, qi, batch.shots))
            used.append(demos)
        enc = runner.encode(texts, images)
        out = runner.model.generate(enc["vision_x"], enc["input_ids"], enc["attention_mask"], num_beams=1,
                                    max_new_tokens=self.new_tokens(runner.config), min_new_tokens=0, do_sample=False)
        raw = runner.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [{"id": q["id"], "prediction": self.cut(r, q["framing"]), "raw": r, "demos": [d["id"] for d in ds]}
                for q, ds, r in zip(batch.queries, used, raw)]

    @staticmethod
    def correct(prediction: str, sample: dict) -> tuple[bool, bool]:
        """(exact, content): the answer in the episode's format, and the right thing named in any vocabulary."""
        exact = " ".join(prediction.split()) == " ".join(sample["answer"].split())
        bare = prediction.strip().rstrip(".!").lower()
        for prefix in ("the answer is ", "it's ", "i see "):
            bare = bare.removeprefix(prefix)
        bare = bare.strip("'\" ")
        if sample["question_type"] == "word":
            bare = bare.replace("-", "").replace(" ", "")
        return exact, exact or bare in sample["content_answers"]

    def score(self, test: EvalDataset, records: list[dict], config: EvalSettings) -> dict:
        by_id = {s["id"]: s for s in test}
        hits = {r["id"]: self.correct(r["prediction"], by_id[r["id"]]) for r in records}

        def mean(ids, k=0) -> float:
            return 100.0 * float(np.mean([hits[i][k] for i in ids])) if ids else float("nan")

        ids = list(hits)
        groups = {"per_question_type": "question_type", "per_lexicon": "lexicon", "per_answer_format": "answer_format"}
        metrics: dict[str, Any] = {"accuracy": mean(ids), "content_accuracy": mean(ids, 1)}
        for key, attr in groups.items():
            values = sorted({str(by_id[i][attr]) for i in ids})
            metrics[key] = {v: mean([i for i in ids if str(by_id[i][attr]) == v]) for v in values}
        metrics["answer_format_split"] = metrics["per_answer_format"].get("True", float("nan"))
        return {"metric": "accuracy", "score": metrics["accuracy"], "metrics": metrics}
