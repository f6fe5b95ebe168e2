"""The few-shot evaluation loop (OpenFlamingo's protocol, its known bugs fixed).

For every task, shot count and trial: pick the evaluated samples, choose demonstrations (random
from the query set, or RICES), build the prompts, run the model (beam-search generation for
captioning/VQA, :meth:`Flamingo.score` for classification), gather the predictions of all ranks
and score them on rank 0, then write the unit's JSON atomically. See ``README.md`` beside this
file for the protocol table.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..processing import FlamingoProcessor
from . import prompts as P
from .datasets import EvalDataset
from .demos import RICES, FeatureExtractor, RandomDemoSelector
from .distributed import DistContext, init_distributed, shard_indices
from .metrics import caption_metrics, java_available, okvqa_stem, resolve_caption_tokenizer, roc_auc, vqa_accuracy
from ..locking import hold_for_job
from .results import atomic_write_json, markdown_table, read_unit, summarize, unit_path
from .tasks import TaskSpec, get_task, resolve_task_root

__all__ = ["EvalConfig", "Evaluator", "continuation_ids", "evaluate", "score_classes"]

logger = logging.getLogger(__name__)

EXTRA_METRICS = {
    "coco": ["BLEU_4", "ROUGE_L"],
    "flickr30k": ["BLEU_4", "ROUGE_L"],
    "imagenet": ["top5"],
    "hateful_memes": ["accuracy"],
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.float32}


@dataclass
class EvalConfig:
    """Everything that decides an evaluation's numbers (and a few things that do not)."""

    tasks: list[str]
    data_root: str | None = None
    task_roots: dict[str, str] = field(default_factory=dict)  # task -> folder, overrides data_root
    out_dir: str = "results"
    shots: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32])
    trials: int = 3
    seeds: list[int] | None = None  # default 42, 43, ...
    num_samples: int | None = None  # evaluate a random subset (per trial seed); None: the whole split
    query_set_size: int = 2048
    batch_size: int = 8
    demo_selection: str = "random"  # or "rices"
    rices_vision_encoder: str | None = None  # open_clip name / HF id; None: the model's own encoder
    rices_vision_pretrained: str | None = None
    rices_cache_dir: str | None = None  # default <out_dir>/rices
    num_beams: int = 3
    length_penalty: float = 0.0
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per-task overrides
    ensemble: bool = False  # classification: average over demo-order permutations
    ensemble_max: int = 6
    class_chunk_size: int = 128  # candidates per Flamingo.score chunk
    caption_metrics: list[str] = field(default_factory=lambda: ["cider", "bleu", "rouge"])
    caption_tokenizer: str = "auto"  # "java" (Stanford PTB), "python", or "auto"
    vqa_gt_normalization: str = "official"  # or "always" (OpenFlamingo's variant)
    vqa_compat: str = "official"  # or "openflamingo": OpenFlamingo's vqa_metric.py (see vqa_scoring)
    precision: str = "fp32"
    save_predictions: bool = True
    progress: bool = True
    model_name: str = ""

    def vqa_scoring(self) -> dict[str, str]:
        """How VQA answers are scored. ``vqa_compat="openflamingo"`` is OpenFlamingo's
        ``vqa_metric.py`` at its last revision: every answer normalised (``"always"``) and its
        leave-one-out by entry equality, which on files without ``answer_id`` (VizWiz) removes
        every identical (answer, confidence) entry; the default is the official metric."""
        if self.vqa_compat == "openflamingo":
            return {"vqa_compat": "openflamingo", "vqa_gt_normalization": "always"}
        return {"vqa_compat": "official", "vqa_gt_normalization": self.vqa_gt_normalization}

    def trial_seeds(self) -> list[int]:
        seeds = list(self.seeds) if self.seeds else []
        if len(seeds) < self.trials:
            start = (max(seeds) + 1) if seeds else 42
            seeds += list(range(start, start + self.trials - len(seeds)))
        return seeds[: self.trials]

    def validate(self) -> None:
        for t in self.tasks:
            get_task(t)
        if not self.shots or any(s < 0 for s in self.shots):
            raise ValueError(f"shots must be non-negative, got {self.shots}")
        if self.trials < 1:
            raise ValueError("trials must be >= 1")
        if self.demo_selection not in ("random", "rices"):
            raise ValueError(f"demo_selection must be 'random' or 'rices', got {self.demo_selection!r}")
        if self.vqa_compat not in ("official", "openflamingo"):
            raise ValueError(f"vqa_compat must be 'official' or 'openflamingo', got {self.vqa_compat!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.data_root is None and not all(get_task(t).name in self.task_roots for t in self.tasks):
            raise ValueError("give data_root, or a task root for every task")


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


class _ImageCache:
    """Preprocessed image tensors by path, least recently used dropped first."""

    def __init__(self, preprocess, maxsize: int = 256):
        self.preprocess, self.maxsize = preprocess, maxsize
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # get() runs in a thread pool

    def get(self, sample: dict) -> torch.Tensor:
        key = sample["image"]
        with self._lock:
            t = self._d.get(key)
            if t is not None:
                self._d.move_to_end(key)
                return t
        t = self.preprocess(EvalDataset.load_image(sample))  # decoding and resizing run unlocked
        with self._lock:
            self._d[key] = t
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
        return t


def held_out_ids(root: str | os.PathLike) -> set[str] | None:
    """The evaluation ids that show a pair held out of training (``held_out.json`` of the synthetic
    benchmark's task folders), as strings; None for a folder without one. Scores are then also
    reported on those samples and on the others (``metrics["held_out_pairs"]``: ``{"shown",
    "not_shown"}``, their sizes in ``metrics["held_out_pairs_samples"]``)."""
    path = Path(root) / "held_out.json"
    if not path.is_file():
        return None
    try:
        return {str(i) for i in json.loads(path.read_text())["held_out_ids"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a held-out list ({{'held_out_ids': [...]}}): {e}") from e


class Evaluator:
    def __init__(self, model, image_processor, tokenizer, config: EvalConfig, ctx: DistContext | None = None):
        config.validate()
        self.model, self.image_processor, self.tokenizer, self.config = model.eval(), image_processor, tokenizer, config
        self.ctx = ctx or DistContext(device=model.device)
        self.processor = FlamingoProcessor(tokenizer, image_processor)
        self.images = _ImageCache(image_processor)
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.out_dir = Path(config.out_dir)
        self._rices_extractor: FeatureExtractor | None = None
        self._candidates: dict[tuple, list[list[int]]] = {}

    # -- helpers -------------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "amp_bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tensors(self, samples: list[dict]) -> list[torch.Tensor]:
        return list(self.pool.map(self.images.get, samples))

    def _batch(self, texts: list[str], images: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = self.processor(list(zip(texts, images)))
        device = self.ctx.device
        return {k: v.to(device) for k, v in batch.items()}

    def fingerprint(self, spec: TaskSpec, shots: int, seed: int, n_eval: int) -> dict[str, Any]:
        c = self.config
        fp = {
            "model": c.model_name, "task": spec.name, "shots": shots, "seed": seed, "num_eval": n_eval,
            "num_samples": c.num_samples, "demo_selection": c.demo_selection, "precision": c.precision,
        }
        if c.demo_selection == "random":
            fp["query_set_size"] = c.query_set_size
        else:
            fp["rices_vision_encoder"] = c.rices_vision_encoder or "model"
            fp["rices_vision_pretrained"] = c.rices_vision_pretrained
        if spec.kind != "classification":
            fp.update(num_beams=c.num_beams, length_penalty=c.length_penalty, max_new_tokens=self.max_new_tokens(spec))
        if spec.kind == "captioning":  # the tokenizer actually used: "auto" differs with and without Java
            fp.update(caption_tokenizer=resolve_caption_tokenizer(c.caption_tokenizer),
                      caption_metrics=sorted(c.caption_metrics))
        if spec.kind == "vqa":  # vqa_compat only when not the default, so older unit files stay valid
            fp.update({k: v for k, v in c.vqa_scoring().items() if k != "vqa_compat" or v != "official"})
        if spec.kind == "classification":
            fp["ensemble"] = c.ensemble and c.ensemble_max
        return fp

    def max_new_tokens(self, spec: TaskSpec) -> int:
        return int(self.config.max_new_tokens.get(spec.name, spec.max_new_tokens or 0))

    def _rices(self, spec: TaskSpec, train: EvalDataset) -> RICES:
        c = self.config
        if self._rices_extractor is None:
            if c.rices_vision_encoder:
                from ..factory import build_vision_encoder

                enc = build_vision_encoder(c.rices_vision_encoder, c.rices_vision_pretrained).to(self.ctx.device).eval()
                self._rices_extractor = FeatureExtractor(enc, enc.default_image_processor(), self.ctx.device,
                                                         name=f"{c.rices_vision_encoder}|{c.rices_vision_pretrained}")
            else:
                self._rices_extractor = FeatureExtractor(self.model.vision_encoder, self.image_processor, self.ctx.device,
                                                         name="model")
        ex = self._rices_extractor
        loader = EvalDataset.load_image if c.rices_vision_encoder else self.images.get  # its own preprocessing
        cache_dir = Path(c.rices_cache_dir) if c.rices_cache_dir else self.out_dir / "rices"
        cache = cache_dir / f"{spec.name}_{train.split}_{ex.fingerprint}.pt"
        return RICES.build(train, ex, cache_path=cache, batch_size=max(8, c.batch_size), load_image=loader,
                           ctx=self.ctx, progress=c.progress)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Evaluate every task x shots x trial not already finished; returns the summary (rank 0 writes
        ``results.json`` and ``results.md``)."""
        with contextlib.ExitStack() as stack:
            hold_for_job(stack, self.out_dir, is_main=self.ctx.is_main, broadcast=self.ctx.broadcast)
            return self._run_locked()

    def _run_locked(self) -> dict:
        c = self.config
        units: list[dict] = []
        for name in c.tasks:
            spec = get_task(name)
            units += self.run_task(spec)
        summary = summarize(units)
        result = {"model": c.model_name, "config": asdict(c), "results": summary}
        if self.ctx.is_main:
            all_units = self._all_finished_units()
            full = summarize(all_units)
            atomic_write_json(self.out_dir / "results.json", {**result, "all_results": full})
            md = markdown_table(summary, title=f"Few-shot evaluation of {c.model_name or 'the model'}", extra=EXTRA_METRICS)
            (self.out_dir / "results.md").write_text(md, encoding="utf-8")
        self.ctx.barrier()
        return result

    def _all_finished_units(self) -> list[dict]:
        out = []
        for p in sorted(self.out_dir.glob("*/shots*_seed*.json")):
            u = read_unit(p)
            if u is not None and "task" in u:
                u.pop("predictions", None)
                out.append(u)
        return out

    def run_task(self, spec: TaskSpec) -> list[dict]:
        c = self.config
        root = resolve_task_root(spec, c.data_root or ".", c.task_roots)
        train = spec.load(root, spec.demo_split)
        test = spec.load(root, spec.eval_split)
        held_out = held_out_ids(root)
        units = []
        rices = None
        for shots in c.shots:
            for trial, seed in enumerate(c.trial_seeds()):
                order = self._eval_order(len(test), seed)
                fp = self.fingerprint(spec, shots, seed, len(order))
                path = unit_path(self.out_dir, spec.name, shots, seed)
                done = None
                if self.ctx.is_main:
                    prev = read_unit(path)
                    if prev is not None and prev.get("fingerprint") == fp:
                        done = {k: v for k, v in prev.items() if k != "predictions"}
                    elif prev is not None:
                        logger.warning("%s: settings changed since it was written; evaluating again", path)
                done = self.ctx.broadcast(done)
                if done is not None:
                    if self.ctx.is_main and c.progress:
                        print(f"[{spec.name}] {shots}-shot seed {seed}: done before ({done['metric']} {done['score']:.2f}), skipped")
                    units.append(done)
                    continue
                if c.demo_selection == "rices" and rices is None:
                    rices = self._rices(spec, train)
                t0 = time.time()
                unit = self.run_unit(spec, train, test, shots, trial, seed, order, rices, held_out=held_out)
                unit["elapsed_s"] = time.time() - t0
                unit["fingerprint"] = fp
                if self.ctx.is_main:
                    atomic_write_json(path, unit)
                    if c.progress:
                        print(f"[{spec.name}] {shots}-shot seed {seed}: {unit['metric']} = {unit['score']:.2f}")
                unit.pop("predictions", None)
                units.append(self.ctx.broadcast(unit))  # the scores exist on rank 0 only
        return units

    def _eval_order(self, n: int, seed: int) -> list[int]:
        """Indices of the evaluated samples: all, or a random subset of ``num_samples`` drawn with
        the trial seed (as OpenFlamingo did), in ascending order."""
        k = self.config.num_samples
        if k is None or k <= 0 or k >= n:
            return list(range(n))
        return sorted(np.random.default_rng(seed).choice(n, k, replace=False).tolist())

    def run_unit(self, spec, train, test, shots, trial, seed, order, rices, held_out: set[str] | None = None) -> dict:
        c = self.config
        k = shots if shots > 0 else P.TEXT_ONLY_DEMOS_AT_ZERO_SHOT
        selector = RandomDemoSelector(train, c.query_set_size, seed) if c.demo_selection == "random" else None
        mine = [order[i] for i in shard_indices(len(order), self.ctx.rank, self.ctx.world_size)]
        batches = [mine[i : i + c.batch_size] for i in range(0, len(mine), c.batch_size)]
        if c.progress and self.ctx.is_main:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"{spec.name} {shots}-shot seed {seed}", unit="batch",
                           total=math.ceil(len(mine) / c.batch_size))
        records: list[dict] = []
        for idx in batches:
            queries = [test[i] for i in idx]
            query_images = self._tensors(queries)
            if selector is not None:
                demo_ids = [selector.select(i, k) for i in idx]
            else:
                feats = self._rices_extractor(
                    [EvalDataset.load_image(q) for q in queries] if c.rices_vision_encoder else query_images
                )
                demo_ids = rices.select(feats, k)
            demos = [[train[j] for j in row] for row in demo_ids]
            with torch.inference_mode(), self._autocast():
                if spec.kind == "classification":
                    records += self._classify(spec, test, queries, query_images, demos, shots, seed, idx)
                else:
                    records += self._generate(spec, queries, query_images, demos, shots)
        gathered = [r for part in self.ctx.gather(records) for r in part]
        result = {
            "task": spec.name, "shots": shots, "trial": trial, "seed": seed, "num_samples": len(gathered),
            "demo_selection": c.demo_selection,
        }
        if self.ctx.is_main:
            result.update(self._score(spec, test, gathered, held_out))
            if c.save_predictions:
                result["predictions"] = sorted(gathered, key=lambda r: str(r["id"]))
        return result

    # -- generation tasks --------------------------------------------------------------------------------
    def _prompt_images(self, demos: list[dict], query_image: torch.Tensor, shots: int) -> list[torch.Tensor]:
        # 0 shots: the demos are text only and their images are not passed (OpenFlamingo bug 15).
        return (self._tensors(demos) if shots > 0 else []) + [query_image]

    def _generate(self, spec, queries, query_images, demos, shots) -> list[dict]:
        texts, images = [], []
        for q, qi, ds in zip(queries, query_images, demos):
            if spec.kind == "captioning":
                demo_texts = [P.caption_prompt(d["caption"].strip()) for d in ds]
                query = P.caption_prompt()
            else:
                demo_texts = [P.vqa_prompt(d["question"], d["answers"][0]) for d in ds]
                query = P.vqa_prompt(q["question"])
            texts.append(P.build_prompt(demo_texts, query, separator="\n", with_demo_images=shots > 0))
            images.append(self._prompt_images(ds, qi, shots))
        batch = self._batch(texts, images)
        out = self.model.generate(
            batch["vision_x"], batch["input_ids"], batch["attention_mask"],
            num_beams=self.config.num_beams, max_new_tokens=self.max_new_tokens(spec), min_new_tokens=0,
            length_penalty=self.config.length_penalty, do_sample=False,
        )
        raw = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        records = []
        for q, ds, text in zip(queries, demos, raw):
            if spec.kind == "captioning":
                pred = P.postprocess_caption(text)
            else:
                pred = P.postprocess_vqa(text)
                if spec.name == "ok_vqa":
                    pred = okvqa_stem(pred)
            records.append({"id": q["id"], "prediction": pred, "raw": text, "demos": [d["id"] for d in ds]})
        return records

    # -- classification --------------------------------------------------------------------------------
    def _class_names(self, spec: TaskSpec, test: EvalDataset) -> list[str]:
        if spec.name == "hateful_memes":
            return ["no", "yes"]
        return list(dict.fromkeys(test.class_names))  # duplicates (ImageNet has two) scored once

    def _classify(self, spec, test, queries, query_images, demos, shots, seed, idx) -> list[dict]:
        names = self._class_names(spec, test)
        if spec.name == "hateful_memes":
            demo_fn = lambda d: P.hateful_memes_prompt(d["ocr"], d["class_name"])  # noqa: E731
            query_fn = lambda q: P.hateful_memes_prompt(q["ocr"])  # noqa: E731
            anchor = "Answer:"
        else:
            demo_fn = lambda d: P.classification_prompt(d["class_name"])  # noqa: E731
            query_fn = lambda q: P.classification_prompt()  # noqa: E731
            anchor = "Output:"
        key = (anchor, tuple(names))
        if key not in self._candidates:
            self._candidates[key] = [continuation_ids(self.tokenizer, anchor, n) for n in names]
        candidates = self._candidates[key]
        k = len(demos[0]) if demos else 0
        n_perm = min(self.config.ensemble_max, math.factorial(k)) if self.config.ensemble and k > 1 else 1
        orders = [self._permutations(k, n_perm, seed, i) for i in idx]
        total = None
        for p in range(n_perm):
            texts, images = [], []
            for q, qi, ds, perms in zip(queries, query_images, demos, orders):
                ds_p = [ds[j] for j in perms[p]]
                texts.append(P.build_prompt([demo_fn(d) for d in ds_p], query_fn(q), separator="", with_demo_images=shots > 0))
                images.append(self._prompt_images(ds_p, qi, shots))
            batch = self._batch(texts, images)
            scores = score_classes(self.model, batch["vision_x"], batch["input_ids"], batch["attention_mask"], candidates,
                                   chunk_size=self.config.class_chunk_size).float().cpu()
            total = scores if total is None else total + scores
        logprobs = total / n_perm
        probs = logprobs.softmax(-1)
        records = []
        for q, ds, lp, pr in zip(queries, demos, logprobs, probs):
            top = lp.topk(min(5, len(names))).indices.tolist()
            rec = {"id": q["id"], "label": q.get("class_name"), "top5": [names[j] for j in top],
                   "demos": [d["id"] for d in ds]}
            if spec.name == "hateful_memes":
                rec["p_yes"] = float(pr[names.index("yes")])
            records.append(rec)
        return records

    @staticmethod
    def _permutations(k: int, n: int, seed: int, index: int) -> list[list[int]]:
        """``n`` distinct orders of ``k`` demos: the selected order first, then random others."""
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

    # -- scoring -----------------------------------------------------------------------------------------
    def _warn_python_tokenizer(self) -> None:
        """Say loudly, once, that captions are tokenised without Java (CIDEr then comes from the
        pure-Python PTB tokenizer; the result files record ``caption_tokenizer: python``)."""
        if getattr(self, "_warned_tokenizer", False) or resolve_caption_tokenizer(self.config.caption_tokenizer) != "python":
            return
        self._warned_tokenizer = True
        why = "asked for with --caption-tokenizer python" if self.config.caption_tokenizer == "python" else (
            "no working `java` on the PATH" if not java_available() else "pycocoevalcap's Stanford jar not found")
        logger.warning("caption metrics use the pure-Python PTB tokenizer (%s), not Stanford's Java one that "
                       "pycocoevalcap and the papers use; scores can differ slightly. Install a JRE "
                       "(apt-get install default-jre-headless) for the reference tokenizer.", why)

    def _score(self, spec: TaskSpec, test: EvalDataset, records: list[dict], held_out: set[str] | None = None) -> dict:
        scored = self._score_records(spec, test, records)
        if held_out:
            shown = [r for r in records if str(r["id"]) in held_out]
            if shown and len(shown) < len(records):
                rest = [r for r in records if str(r["id"]) not in held_out]
                parts = {"shown": shown, "not_shown": rest}
                scored["metrics"]["held_out_pairs"] = {k: self._score_records(spec, test, v)["score"]
                                                       for k, v in parts.items()}
                scored["metrics"]["held_out_pairs_samples"] = {k: len(v) for k, v in parts.items()}
        return scored

    def _score_records(self, spec: TaskSpec, test: EvalDataset, records: list[dict]) -> dict:
        c = self.config
        by_id = {s["id"]: s for s in test}
        if spec.kind == "captioning":
            self._warn_python_tokenizer()
            m = caption_metrics({r["id"]: r["prediction"] for r in records},
                                {r["id"]: by_id[r["id"]]["captions"] for r in records},
                                metrics=c.caption_metrics, tokenizer=c.caption_tokenizer)
            return {"metric": "CIDEr" if "CIDEr" in m else next(k for k in m if k != "tokenizer"),
                    "score": m.get("CIDEr", next(v for k, v in m.items() if k != "tokenizer")), "metrics": m,
                    "scoring": {"caption_tokenizer": m["tokenizer"]}}
        if spec.kind == "vqa":
            scoring = c.vqa_scoring()
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
        top1 = 100.0 * float(np.mean([r["top5"][0] == r["label"] for r in records]))
        if spec.name == "hateful_memes":
            labels = [int(by_id[r["id"]]["label"]) for r in records]
            try:
                auc = 100.0 * roc_auc(labels, [r["p_yes"] for r in records])
            except ValueError:
                auc = float("nan")  # one class only (tiny subsets)
            return {"metric": "roc_auc", "score": auc, "metrics": {"roc_auc": auc, "accuracy": top1}}
        top5 = 100.0 * float(np.mean([r["label"] in r["top5"] for r in records]))
        return {"metric": "top1", "score": top1, "metrics": {"top1": top1, "top5": top5}}


def evaluate(model_or_path, config: EvalConfig, *, image_processor=None, tokenizer=None, device: str | None = None) -> dict:
    """Evaluate a model (a :class:`Flamingo` with its ``image_processor`` and ``tokenizer``, or a
    directory / Hub id for :func:`flamingo_vlm.load_pretrained`) under ``torchrun`` or alone."""
    ctx = init_distributed(device)
    try:
        if isinstance(model_or_path, (str, Path)):
            from ..pretrained import from_pretrained

            dtype = PRECISIONS[config.precision]
            model, image_processor, tokenizer = from_pretrained(model_or_path, device=ctx.device,
                                                                dtype=None if dtype == torch.float32 else dtype)
            config.model_name = config.model_name or str(model_or_path)
        else:
            model = model_or_path
            if image_processor is None or tokenizer is None:
                raise ValueError("pass image_processor and tokenizer with a model object")
            model.to(ctx.device)
        return Evaluator(model, image_processor, tokenizer, config, ctx).run()
    finally:
        ctx.close()
