"""The few-shot evaluation loop (OpenFlamingo's protocol, its known bugs fixed).

For every task, shot count and trial: pick the evaluated samples, choose demonstrations (random
from the query set, or RICES), let the task run the model on each batch (:meth:`Task.predict`:
its prompts, beam-search generation for captioning/VQA or :meth:`Flamingo.score` for
classification, its post-processing), gather the predictions of all ranks and score them on rank
0 (:meth:`Task.score`), then write the unit's JSON atomically. What differs between datasets lives
in the task objects (:mod:`.task_kinds`, their table in :mod:`.tasks`); this loop is the same for
all. See ``README.md`` beside this file for the protocol table.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from .datasets import DatasetLayoutError, EvalDataset, check_images
from .demos import RICES, FeatureExtractor, RandomDemoSelector, weights_fingerprint
from .distributed import DistContext, init_distributed, shard_indices
from .. import hub
from ..locking import hold_for_job
from ..modeling.quantize import scheme as quant_scheme
from .results import atomic_write_json, atomic_write_text, markdown_table, read_unit, summarize, unit_path
from .task_kinds import QueryBatch, continuation_ids, score_classes
from .tasks import Task, check_task_files, extra_metrics, get_task, own_demos_error

__all__ = ["EvalConfig", "Evaluator", "TaskData", "check_eval_files", "continuation_ids", "eval_order", "evaluate",
           "held_out_ids", "images_in_use", "load_task", "score_classes"]

logger = logging.getLogger(__name__)

#: The sample index whose random draw is the shared demo set (``demo_selection="shared"``).
SHARED_DEMOS_INDEX = 2**40

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
    seeds: list[int] | None = None  # one per trial; default 42, 43, ...
    num_samples: int | None = None  # evaluate a random subset (per trial seed), >= 1; None: the whole split
    query_set_size: int = 2048
    batch_size: int = 8
    demo_selection: str = "random"  # or "rices", or "shared": one demo set per trial for every query
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
    quantize: str | None = None  # "int8"/"int4": weight-only, applied when the model is loaded from a path
    save_predictions: bool = True
    # MiB for the LM keys/values (and image latents) of prompt prefixes that queries share (0: off);
    # pays with demo_selection="shared" (every query starts with the same demos). Results are unchanged.
    prefix_cache_mb: float = 0.0
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
        """Refuse values out of range or unknown (the CLI's usage errors, before the model loads); the
        task names keying ``task_roots`` and ``max_new_tokens`` are replaced by the tasks' own names (an
        alias such as ``vqa`` was silently ignored there)."""
        if not self.tasks:  # (--tasks ",": the run wrote an empty table)
            raise ValueError("tasks is empty: name at least one (--tasks coco,vqav2)")
        # a unit listed twice was summarised as two trials of itself ("trials 2", ± 0.00)
        for what, values in (("tasks", [get_task(t).name for t in self.tasks]), ("shots", list(self.shots)),
                             ("seeds", self.trial_seeds())):
            twice = sorted({v for v in values if values.count(v) > 1}, key=str)
            if twice:
                raise ValueError(f"{what} lists {', '.join(map(str, twice))} more than once (--{what}"
                                 + (": an alias names the same task)" if what == "tasks" else ")"))
        for name, flag in (("task_roots", "--task-root"), ("max_new_tokens", "--max-new-tokens")):
            named = {}
            for key, value in getattr(self, name).items():
                try:
                    named[get_task(key).name] = value
                except ValueError as e:
                    raise ValueError(f"{name} ({flag}): {e}") from None
            setattr(self, name, named)
        bad = {t: n for t, n in self.max_new_tokens.items() if int(n) < 1}
        if bad:
            raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {bad}")
        for name, least in (("batch_size", 1), ("num_beams", 1), ("class_chunk_size", 1), ("ensemble_max", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not self.shots:
            raise ValueError("shots is empty: give at least one number of demonstrations (--shots 0,4,8)")
        if any(s < 0 for s in self.shots):
            raise ValueError(f"shots must be non-negative, got {self.shots}")
        if self.trials < 1:
            raise ValueError("trials must be >= 1")
        if self.seeds and len(self.seeds) != self.trials:  # (they were cut or extended: 5 -> 5, 6, 7)
            raise ValueError(f"seeds gives {len(self.seeds)} seed(s) but trials is {self.trials}: give one seed per "
                             f"trial (trials={len(self.seeds)})")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples} (leave it out to evaluate the whole split)")
        if self.demo_selection not in ("random", "rices", "shared"):
            raise ValueError(f"demo_selection must be 'random', 'rices' or 'shared', got {self.demo_selection!r}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0: no prefix cache), got {self.prefix_cache_mb}")
        if self.vqa_compat not in ("official", "openflamingo"):
            raise ValueError(f"vqa_compat must be 'official' or 'openflamingo', got {self.vqa_compat!r}")
        # said after the first captioning unit had run (an unknown name), or never (a NaN length penalty:
        # its units, their fingerprint holding NaN, were evaluated again on every rerun)
        unknown = sorted({m.lower() for m in self.caption_metrics} - {"cider", "bleu", "rouge", "meteor"})
        if unknown or not self.caption_metrics:
            raise ValueError(f"caption_metrics (--caption-metrics): unknown {unknown}; choose from cider, bleu, "
                             "rouge, meteor" if unknown else "caption_metrics (--caption-metrics) is empty")
        if "meteor" in {m.lower() for m in self.caption_metrics} and any(
                get_task(t).kind == "captioning" for t in self.tasks):
            from .metrics import java_available

            if not java_available():
                raise ValueError("caption_metrics (--caption-metrics) meteor needs Java: install a JRE (`java` on the "
                                 "PATH) or leave meteor out")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.demo_selection == "rices" and self.rices_vision_encoder:
            from ..references import reloadable, vision_ref

            if not reloadable(vision_ref(self.rices_vision_encoder, self.rices_vision_pretrained)):
                # (OpenFlamingo's --rices_vision_encoder_pretrained defaulted to openai: here nothing was
                # loaded, and RICES ranked the demos by a randomly initialised encoder's features)
                raise ValueError(f"rices_vision_encoder {self.rices_vision_encoder!r} without weights: pass "
                                 "--rices-vision-pretrained (e.g. openai, the paper's) or leave --rices-vision-encoder "
                                 "out to use the model's own vision encoder")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        # (said as "[Errno 17] File exists", after the model had loaded)
        out = Path(self.out_dir)
        blocker = next((p for p in (out, *out.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(f"out_dir (--out) {self.out_dir}: {blocker} is a file, not a folder; give a folder for "
                             "the results (it is made if missing)")
        if self.data_root is None and not all(get_task(t).name in self.task_roots for t in self.tasks):
            raise ValueError("give data_root (--data-root DIR: a folder with one subfolder per task; with --synthetic "
                             "the synthetic tasks are written there), or a task root for every task")


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


def synthetic_data(root: str | os.PathLike) -> bool:
    """Whether the task folder ``root`` was written by the synthetic benchmark (``held_out.json`` beside
    its files, or ``synthetic_icl``'s ``episodes.json``): its scores are labelled so."""
    return (Path(root) / "held_out.json").is_file() or (Path(root) / "episodes.json").is_file()


class Evaluator:
    def __init__(self, model, image_processor, tokenizer, config: EvalConfig, ctx: DistContext | None = None):
        config.validate()
        self.model, self.image_processor, self.tokenizer, self.config = model.eval(), image_processor, tokenizer, config
        self._raw_model, self._weights_id = model, None  # (see weights_id)
        self.prefix_cache = None
        if config.prefix_cache_mb > 0:  # tasks call self.model.generate/score: they go through the cache
            from ..prefix_cache import PrefixCache

            self.prefix_cache = PrefixCache(int(config.prefix_cache_mb * 2**20))
            self.model = self.prefix_cache.wrap(self.model)
        self.ctx = ctx or DistContext(device=model.device)
        self.processor = FlamingoProcessor(tokenizer, image_processor)
        self.images = _ImageCache(image_processor)
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.out_dir = Path(config.out_dir)
        self._rices_extractor: FeatureExtractor | None = None
        self._candidates: dict[tuple, list[list[int]]] = {}
        self._said: set[str] = set()  # task warnings already logged

    # -- helpers -------------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "amp_bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tensors(self, samples: list[dict]) -> list[torch.Tensor]:
        return list(self.pool.map(self.images.get, samples))

    @property
    def weights_id(self) -> str:
        """:func:`~.demos.weights_fingerprint` of the model, computed once when a unit's fingerprint
        is first needed (rank 0): units of another model saved at the same path are redone."""
        if self._weights_id is None:
            self._weights_id = weights_fingerprint(self._raw_model)
        return self._weights_id

    def fingerprint(self, spec: Task, shots: int, seed: int, n_eval: int, data: str | None = None) -> dict[str, Any]:
        c = self.config
        fp = {
            "model": c.model_name, "weights": self.weights_id, "task": spec.name, "shots": shots, "seed": seed, "num_eval": n_eval,
            "num_samples": c.num_samples, "demo_selection": c.demo_selection, "precision": c.precision,
        }
        if data is not None:  # the splits' contents (data_fingerprint)
            fp["data"] = data
        if c.quantize:  # a quantized model's units are not the full-precision model's
            fp["quantize"] = quant_scheme(c.quantize)
        if c.demo_selection in ("random", "shared"):
            fp["query_set_size"] = c.query_set_size
        else:
            fp["rices_vision_encoder"] = c.rices_vision_encoder or "model"
            fp["rices_vision_pretrained"] = c.rices_vision_pretrained
        fp.update(spec.fingerprint(c))  # decoding and scoring settings of the task's kind
        return fp

    def _rices(self, spec: Task, train: EvalDataset) -> RICES:
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
    def run(self, *, files_checked: bool = False, datasets: dict[str, TaskData] | None = None) -> dict:
        """Evaluate every task x shots x trial not already finished; returns the summary (rank 0 writes
        ``results.json`` and ``results.md``). Every task's files are checked and read first
        (:func:`check_eval_files`), unless the caller just did: ``datasets`` (what it returned, used and
        released task by task) or ``files_checked`` (the tasks then read their files when they come up)."""
        with contextlib.ExitStack() as stack:
            hold_for_job(stack, self.out_dir, is_main=self.ctx.is_main, broadcast=self.ctx.broadcast)
            return self._run_locked(files_checked, datasets)

    def _run_locked(self, files_checked: bool = False, datasets: dict[str, TaskData] | None = None) -> dict:
        c = self.config
        if datasets is None and not files_checked:  # every task's files, before the first task's units (hours) run
            datasets = check_eval_files(c)
        datasets = datasets if datasets is not None else {}
        units: list[dict] = []
        for name in c.tasks:
            spec = get_task(name)
            units += self.run_task(spec, datasets.pop(spec.name, None))  # (popped: its samples freed after it)
        summary = summarize(units)
        result = {"model": c.model_name, "config": asdict(c), "results": summary}
        if self.ctx.is_main:
            all_units = self._all_finished_units()
            full = summarize(all_units)
            atomic_write_json(self.out_dir / "results.json", {**result, "all_results": full})
            md = markdown_table(summary, title=f"Few-shot evaluation of {c.model_name or 'the model'}", extra=extra_metrics())
            earlier = [u for u in all_units if u["task"] not in summary]  # tasks of earlier runs into this folder
            if earlier:
                md += "\n" + markdown_table(summarize(earlier), extra=extra_metrics(),
                                             title="Other tasks finished in this folder (earlier runs)")
            atomic_write_text(self.out_dir / "results.md", md)
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

    def run_task(self, spec: Task, data: TaskData | None = None) -> list[dict]:
        """The task's units; ``data``: its splits as :func:`check_eval_files` read them (else read here)."""
        c = self.config
        if data is None:
            root = check_task_files(spec, c.data_root or ".", c.task_roots)
            data = load_task(spec, root, c, images=False)
        root, train, test = data.root, data.train, data.test
        held_out = held_out_ids(root)
        synthetic = synthetic_data(root)
        own_demos = spec.own_demos(test)
        check_shots(spec, root, train, own_demos, c)
        data_id = data_fingerprint(root, train, test)
        units = []
        rices = None
        for shots in c.shots:
            for trial, seed in enumerate(self._trial_seeds(spec, test, shots, own_demos)):
                order = eval_order(len(test), seed, c.num_samples)
                fp = self.fingerprint(spec, shots, seed, len(order), data_id)
                path = unit_path(self.out_dir, spec.name, shots, seed)
                done = None
                if self.ctx.is_main:
                    prev = read_unit(path)
                    if prev is not None and _same_unit(prev.get("fingerprint"), fp):
                        done = {k: v for k, v in prev.items() if k != "predictions"}
                    elif prev is not None:
                        logger.warning("%s: settings or data changed since it was written; evaluating again", path)
                done = self.ctx.broadcast(done)
                if done is not None and synthetic:  # (units written before the label was)
                    done["scoring"] = {**(done.get("scoring") or {}), "data": "synthetic"}
                if done is not None:
                    if self.ctx.is_main and c.progress:
                        print(f"[{spec.name}] {shots}-shot seed {seed}: done before ({done['metric']} {done['score']:.2f}), skipped")
                    units.append(done)
                    continue
                if c.demo_selection == "rices" and rices is None and own_demos is None:
                    rices = self._rices(spec, train)
                t0 = time.time()
                unit = self.run_unit(spec, train, test, shots, trial, seed, order, rices, held_out=held_out,
                                     own_demos=own_demos is not None)
                unit["elapsed_s"] = time.time() - t0
                unit["fingerprint"] = fp
                if synthetic:  # (said beside every score)
                    unit["scoring"] = {**(unit.get("scoring") or {}), "data": "synthetic"}
                if self.ctx.is_main:
                    atomic_write_json(path, unit)
                    if c.progress:
                        print(f"[{spec.name}] {shots}-shot seed {seed}: {unit['metric']} = {unit['score']:.2f}")
                unit.pop("predictions", None)
                units.append(self.ctx.broadcast(unit))  # the scores exist on rank 0 only
        return units

    def _trial_seeds(self, spec: Task, test: EvalDataset, shots: int, own_demos: int | None) -> list[int]:
        """The trial seeds of ``shots``: only the first where the trials could only repeat it, i.e. the
        demonstrations do not depend on the seed (RICES, or queries that bring their own) and every trial
        evaluates the whole split (no smaller ``--num-samples``), unless the task draws something else
        with it (:meth:`Task.seed_matters`: prompt-ensembling orders). They were evaluated (``--trials 3``,
        the default: three times the work) and reported as 3 trials, ± 0.00."""
        c = self.config
        seeds = c.trial_seeds()
        fixed_demos = c.demo_selection == "rices" or own_demos is not None
        whole = c.num_samples is None or c.num_samples >= len(test)
        if len(seeds) == 1 or not fixed_demos or not whole or spec.seed_matters(c, shots):
            return seeds
        message = (f"{spec.name}: every trial would evaluate the whole {test.split} split with the same "
                   f"demonstrations ({'RICES' if own_demos is None else 'each query brings its own'}), so only the "
                   f"first of the {len(seeds)} trials is run (seed {seeds[0]}); --num-samples N gives each trial "
                   "its own subset")
        if message not in self._said:
            self._said.add(message)
            logger.warning(message)
        return seeds[:1]

    def run_unit(self, spec, train, test, shots, trial, seed, order, rices, held_out: set[str] | None = None,
                 own_demos: bool = False) -> dict:
        c = self.config
        k = shots if shots > 0 else P.TEXT_ONLY_DEMOS_AT_ZERO_SHOT
        selector = RandomDemoSelector(train, c.query_set_size, seed) if c.demo_selection != "rices" else None
        mine = [order[i] for i in shard_indices(len(order), self.ctx.rank, self.ctx.world_size)]
        batches = [mine[i : i + c.batch_size] for i in range(0, len(mine), c.batch_size)]
        if c.progress and self.ctx.is_main:
            from ..progress import progress as tqdm

            batches = tqdm(batches, desc=f"{spec.name} {shots}-shot seed {seed}", unit="batch",
                           total=math.ceil(len(mine) / c.batch_size))
        records: list[dict] = []
        for idx in batches:
            queries = [test[i] for i in idx]
            query_images = self._tensors(queries)
            if own_demos:  # the queries bring their demonstrations (the task takes them from the query)
                demo_ids = [[] for _ in idx]
            elif c.demo_selection == "shared":  # one draw per trial (an index no sample has), for every query
                demo_ids = [selector.select(SHARED_DEMOS_INDEX, k)] * len(idx)
            elif selector is not None:
                demo_ids = [selector.select(i, k) for i in idx]
            else:
                feats = self._rices_extractor(
                    [EvalDataset.load_image(q) for q in queries] if c.rices_vision_encoder else query_images
                )
                demo_ids = rices.select(feats, k)
            demos = [[train[j] for j in row] for row in demo_ids]
            with torch.inference_mode(), self._autocast():
                records += spec.predict(self, QueryBatch(test, queries, query_images, demos, shots, seed, idx))
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

    # -- what tasks call (see task_kinds.Runner) ---------------------------------------------------------
    def encode(self, texts: list[str], images: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Prompts and their images as model inputs on this process's device."""
        batch = self.processor(list(zip(texts, images)))
        device = self.ctx.device
        return {k: v.to(device) for k, v in batch.items()}

    def prompt_images(self, demos: list[dict], query_image: torch.Tensor, shots: int) -> list[torch.Tensor]:
        # 0 shots: the demos are text only and their images are not passed (OpenFlamingo bug 15).
        return (self._tensors(demos) if shots > 0 else []) + [query_image]

    def candidate_ids(self, anchor: str, names: list[str]) -> list[list[int]]:
        """Token ids of each name as it continues ``anchor`` (computed once per anchor and names)."""
        key = (anchor, tuple(names))
        if key not in self._candidates:
            self._candidates[key] = [continuation_ids(self.tokenizer, anchor, n) for n in names]
        return self._candidates[key]

    # -- scoring -----------------------------------------------------------------------------------------
    def _score(self, spec: Task, test: EvalDataset, records: list[dict], held_out: set[str] | None = None) -> dict:
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

    def _score_records(self, spec: Task, test: EvalDataset, records: list[dict]) -> dict:
        for message in spec.warnings(self.config):  # each said once per evaluator
            if message not in self._said:
                self._said.add(message)
                logger.warning(message)
        return spec.score(test, records, self.config)


def data_fingerprint(root: Path, *splits: EvalDataset) -> str:
    """A short id of the samples of ``splits`` (every field: ids, questions, answers, captions,
    labels, image paths relative to the task folder ``root``, so moving the folder keeps it): a unit
    of other data under the same folder (OK-VQA v1.0 and v1.1 annotations: same questions, other
    answers) is evaluated again instead of being taken as done."""
    h = hashlib.sha1()
    prefix = str(root).rstrip(os.sep) + os.sep
    for ds in dict.fromkeys(splits):  # (one object when the splits are the same)
        h.update(f"{ds.split}:{len(ds)};".encode())
        for sample in ds:
            h.update(json.dumps(sample, sort_keys=True, default=str).replace(json.dumps(prefix)[1:-1], "").encode())
    return h.hexdigest()[:16]


def _same_unit(written: dict | None, fp: dict) -> bool:
    """A finished unit's fingerprint is this one's (units written before the data entered it: the rest matches)."""
    if not isinstance(written, dict):
        return False
    if "data" not in written:
        fp = {k: v for k, v in fp.items() if k != "data"}
    return written == fp


def eval_order(n: int, seed: int, num_samples: int | None) -> list[int]:
    """Indices of the evaluated samples: all, or a random subset of ``num_samples`` drawn with the
    trial seed (as OpenFlamingo did), in ascending order."""
    if num_samples is None or num_samples >= n:  # (validate() refuses num_samples < 1)
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, num_samples, replace=False).tolist())


def check_shots(spec: Task, root: Path, train: EvalDataset, own_demos: int | None, config: EvalConfig) -> None:
    """Refuse shot counts the demonstrations cannot fill, before the model loads (they failed mid-run
    after the smaller shot counts, and a task whose queries bring their own demos silently ran its 8
    demos under the label 16 or 32 shots)."""
    c = config
    if own_demos is not None:
        if max(c.shots) > own_demos:
            raise own_demos_error(spec, max(c.shots), root, own_demos)
        return
    needed = max(s if s > 0 else P.TEXT_ONLY_DEMOS_AT_ZERO_SHOT for s in c.shots)
    if c.demo_selection == "rices" or c.query_set_size <= 0 or c.query_set_size >= len(train):
        pool, what = len(train), f"its {spec.demo_split} split in {root} holds"
    else:
        pool, what = c.query_set_size, "--query-set-size is"
    if needed > pool:
        larger = "" if what.startswith("its") else " or give a larger --query-set-size"
        if max(c.shots) < needed:  # only 0 shots asked for more: its two text-only demos
            raise ValueError(f"{spec.name}: 0 shots uses {needed} text-only demonstrations, but {what} {pool}; "
                             f"leave 0 out of --shots{larger}")
        raise ValueError(f"{spec.name}: --shots {max(c.shots)} needs {needed} demonstrations, but {what} {pool}; "
                         f"use --shots up to {pool}{larger}")


@dataclass
class TaskData:
    """A task's folder and its two splits, read once: by the check before the model loads (:func:`load_task`),
    then by the run."""

    root: Path
    train: EvalDataset
    test: EvalDataset


def images_in_use(spec: Task, train: EvalDataset, test: EvalDataset, config: EvalConfig) -> dict[str, str]:
    """The image files the run of ``spec`` will read, each with the file that names it: the evaluated
    samples' (every trial's subset with ``--num-samples``, with their own demonstrations' for a task
    whose queries bring them) and, with shots above 0, the random demonstrations': the ones drawn, or
    every trial's query set where that is fewer files than the draws. RICES demonstrations are left
    out: the feature pass reads the whole demo split (VQAv2: 82,783 images) and names a bad image then."""
    c = config
    shots = [s for s in c.shots if s > 0]
    top = max(c.shots)
    out: dict[str, str] = {}
    orders = {seed: eval_order(len(test), seed, c.num_samples) for seed in c.trial_seeds()}
    for order in orders.values():
        for i in order:
            for path in spec.images_of(test[i], top):
                out.setdefault(str(path), test.source)
    if not shots or spec.own_demos(test) is not None or c.demo_selection == "rices":
        return out
    for seed, order in orders.items():
        selector = RandomDemoSelector(train, c.query_set_size, seed)
        queries = [SHARED_DEMOS_INDEX] if c.demo_selection == "shared" else order
        if len(queries) * len(shots) < len(selector.pool):  # the draws themselves (--num-samples)
            picked = {j for i in queries for k in shots for j in selector.select(i, k)}
        else:  # a whole split's draws reach (almost) every example of the query set
            picked = selector.pool.tolist()
        for j in sorted(picked):
            out.setdefault(str(train[j]["image"]), train.source)
    return out


def load_task(spec: Task, root: Path, config: EvalConfig, *, images: bool = True) -> TaskData:
    """Read the task's demo and evaluation splits (:meth:`Task.load`: the same code the run uses, so a
    malformed annotation file, mismatched question and annotation ids, an empty split are said here),
    refuse more shots than its demonstrations fill, and, with ``images``, check the image files the
    run will read (:func:`images_in_use`, :func:`~.datasets.image_problem`: their header and end
    marker, not a full decode): one :class:`~.datasets.DatasetLayoutError` naming the first bad file,
    the file that names it and how many there are."""
    train = spec.load(root, spec.demo_split)
    test = train if spec.eval_split == spec.demo_split else spec.load(root, spec.eval_split)
    check_shots(spec, root, train, spec.own_demos(test), config)
    if images:
        bad = check_images(images_in_use(spec, train, test, config))
        if bad:
            path, named_in, why = bad[0]
            more = f" ({len(bad) - 1} more image(s) of {spec.name} too)" if len(bad) > 1 else ""
            raise DatasetLayoutError(f"the image {path}, named in {named_in}, {why}; replace it with a good copy "
                                     f"(the dataset's download){more}")
    return TaskData(root, train, test)


def check_eval_files(config: EvalConfig) -> dict[str, TaskData]:
    """Every task's files, before the model loads (loading takes minutes, the tasks before a broken
    one hours): first that each file and folder is there and can be opened (:func:`~.tasks.check_task_files`,
    every task, nothing read), then each task's splits read and checked (:func:`load_task`: their
    contents, the shots, the images the run uses). Each problem is one error naming the file.
    Returns the splits read, by task name, for :meth:`Evaluator.run` (which then reads nothing again)."""
    specs = [get_task(name) for name in config.tasks]
    roots = [check_task_files(spec, config.data_root or ".", config.task_roots) for spec in specs]
    return {spec.name: load_task(spec, root, config) for spec, root in zip(specs, roots)}


def evaluate(model_or_path, config: EvalConfig, *, image_processor=None, tokenizer=None, device: str | None = None) -> dict:
    """Evaluate a model (a :class:`Flamingo` with its ``image_processor`` and ``tokenizer``, or a
    directory / Hub id for :func:`flamingo_vlm.load_pretrained`) under ``torchrun`` or alone."""
    config.validate()
    datasets = check_eval_files(config)  # a dataset file missing or broken is said before the model loads (minutes)
    if isinstance(model_or_path, (str, Path)):  # a missing model, before the seconds of importing the loading layer
        hub.check_model_available(model_or_path)
    ctx = init_distributed(device)
    try:
        if isinstance(model_or_path, (str, Path)):
            from ..pretrained import from_pretrained

            dtype = PRECISIONS[config.precision]
            model, image_processor, tokenizer = from_pretrained(model_or_path, device=ctx.device,
                                                                dtype=None if dtype == torch.float32 else dtype,
                                                                quantize=config.quantize)
            config.model_name = config.model_name or str(model_or_path)
        else:
            model = model_or_path
            if image_processor is None or tokenizer is None:
                raise ValueError("pass image_processor and tokenizer with a model object")
            model.to(ctx.device)
        return Evaluator(model, image_processor, tokenizer, config, ctx).run(datasets=datasets)
    finally:
        ctx.close()
