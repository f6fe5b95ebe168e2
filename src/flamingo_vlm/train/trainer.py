"""The training loop.

One optimizer step = ``grad_accum`` micro-steps; each micro-step runs one batch of every dataset of
the mixture (forward + backward per batch, as OpenFlamingo did for LAION then MMC4).

Loss. For dataset ``d`` the step's loss is the token-sum cross-entropy over all of its micro-batches
on all ranks, divided by the number of trained tokens (labels != -100, after the causal shift) in
those batches on all ranks, times the dataset's loss weight; the step loss is the sum over datasets.
The token counts are all-reduced *before* the forward passes, so every micro-batch backpropagates
``weight_d * token_sum / count_d`` (times ``world_size``, which DDP's and FSDP's gradient averaging
divides out). Two ranks with batch ``b`` therefore compute exactly the gradient of one process with
batch ``2b``, and accumulation over micro-batches is exact, whatever the padding.

Robustness. Every rank always runs every backward; non-finite values are detected afterwards from
all-reduced quantities (the loss and the global gradient norm), so a NaN on one rank makes all ranks
skip the same step together (OpenFlamingo ``continue``d on one rank and desynchronised). Gradients are
clipped once per optimizer step, on the global norm.

Precision. ``fp32``; ``amp_bf16`` (fp32 weights, bf16 autocast); ``bf16`` (every weight, gradient
and optimizer state in bf16). Token ids and masks are never cast; the loss is computed in fp32.

Speed/memory with the same math (:mod:`.fastpath`, each can be switched off in the config): the loss
is computed from the last hidden states in chunks (no full logits; verified once against the
model's logits, with a fallback), fp32 GEMMs run on oneDNN on CPU, the perceiver/cross-attention
feed-forwards recompute their GELU in backward, AdamW is the fused kernel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..locking import hold_for_job
from ..modeling.fast_linear import fast_bf16, onednn_available
from ..modeling.lm_info import lm_context_limit
from . import checkpoint as ckpt
from .config import ConfigError, ModelConfig, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    setup,
    teardown,
    unwrap,
    wrap_ddp,
    wrap_fsdp,
)
from .fastpath import (
    capture_hidden,
    head_cross_entropy_sum,
    matmul_context,
    recompute_gelu,
    set_malloc_mmap_threshold,
)
from .lora import apply_lora, has_lora, merge_lora
from .metrics import LOSS_PNG, METRICS_CSV, Sinks, plot_loss
from .optim import GATE_NAMES, build_optimizer, build_scheduler

logger = logging.getLogger("flamingo_vlm.train")

BATCH_KEYS = ("vision_x", "input_ids", "attention_mask", "labels")


class DataError(RuntimeError):
    """The training data could not be found or read."""


# Damaged data skipped so far (cumulative over the run, resumes included; summed over datasets):
# corrupt samples over all ranks, and damaged shards (every rank reads every shard; rank 0's count).
DATA_PROBLEM_COLUMNS = ("corrupt_samples", "unreadable_shards", "truncated_shards")


def _problems(ds) -> dict:
    """A dataset's damaged data (:meth:`ShardDataset.problems`; nothing for datasets without it)."""
    get = getattr(ds, "problems", None)
    return get() if callable(get) else {}


@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    export_dir: Path | None = None
    last_checkpoint: Path | None = None
    # per dataset name: {"unreadable_shards": {url: reason}, "truncated_shards": {...}, "corrupt_samples": n}
    data_problems: dict[str, dict] = field(default_factory=dict)

    def data_summary(self) -> str | None:
        """One line about the damaged data the run skipped, naming the shards; None if there was none."""
        parts = []
        for name, p in self.data_problems.items():
            bits = [f"{len(p[k])} {k.split('_')[0]} shard(s) skipped (" + "; ".join(f"{u}: {r}" for u, r in p[k].items())
                    + ")" for k in ("unreadable_shards", "truncated_shards") if p.get(k)]
            if p.get("corrupt_samples"):
                bits.append(f"{p['corrupt_samples']} corrupt sample(s) skipped")
            if bits:
                parts.append(f"{name}: " + ", ".join(bits))
        return ("damaged data: " + " | ".join(parts)) if parts else None


class Callback:
    """Hooks for tests and extensions; override what you need."""

    def on_loss(self, trainer: "Trainer", step: int, micro: int, dataset: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, trainer: "Trainer", record: dict) -> None:
        pass


# -- model -----------------------------------------------------------------------------------------
_ARCH_FIELDS = ("cross_attn_every_n_layers", "decoder_layers_attr_name", "freeze_lm_embeddings",
                "perceiver_kwargs", "cross_attn_kwargs")


def build_model(cfg: ModelConfig):
    """``(model, image_processor, tokenizer)`` as the model section says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.from_pretrained:
            from ..pretrained import from_pretrained

            model, image_processor, tokenizer = from_pretrained(
                cfg.from_pretrained, cache_dir=cfg.cache_dir, local_files_only=cfg.local_files_only
            )
            saved = model.build_config
            for name in _ARCH_FIELDS:
                wanted = getattr(cfg, name)
                have = saved.get(name)
                if name.endswith("_kwargs"):
                    have = dict(have or {})
                if wanted is not None and wanted != have:
                    raise ConfigError(
                        f"model.{name}={wanted!r} does not match the model at {cfg.from_pretrained}, which was "
                        f"built with {name}={have!r}; remove model.{name} (it is read from the saved model)"
                    )
        else:
            from ..factory import create_model_and_transforms

            model, image_processor, tokenizer = create_model_and_transforms(
                cfg.vision, cfg.vision_pretrained, cfg.lm, cfg.tokenizer or cfg.lm,
                cross_attn_every_n_layers=cfg.cross_attn_every_n_layers or 1,
                use_local_files=cfg.local_files_only,
                decoder_layers_attr_name=cfg.decoder_layers_attr_name,
                freeze_lm_embeddings=bool(cfg.freeze_lm_embeddings),
                cache_dir=cfg.cache_dir,
                vision_tokens_ln_post=cfg.vision_tokens_ln_post,
                perceiver_kwargs=cfg.perceiver_kwargs,
                cross_attn_kwargs=cfg.cross_attn_kwargs,
            )
    if cfg.gate_init is not None:
        set_gates(model, cfg.gate_init)
    return model, image_processor, tokenizer


def set_gates(model, value: float) -> None:
    """Set every cross-attention tanh gate so that ``tanh(gate) == value`` (-1 < value < 1)."""
    if not -1.0 < value < 1.0:
        raise ConfigError(f"model.gate_init must be in (-1, 1) (it is tanh(gate)), got {value}")
    gates = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATE_NAMES]
    if not gates:
        raise ConfigError("model.gate_init: the model has no cross-attention gates")
    with torch.no_grad():
        for p in gates:
            p.fill_(math.atanh(value))


def _set_gradient_checkpointing(model: nn.Module, mode: bool | str) -> None:
    """``True``: ``model.set_gradient_checkpointing(True)`` (LM layers + cross-attention), with a
    fallback for transformers >= 5.2x, whose ``activation_checkpointing_enable`` takes
    ``activation_checkpointing_kwargs`` (Flamingo's method passes ``gradient_checkpointing_kwargs``
    and raises ``TypeError`` there). ``"lm"``: the LM's decoder layers only."""
    enabled = bool(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if mode != "lm":
            try:
                model.set_gradient_checkpointing(enabled)
                return
            except TypeError:
                pass
        lm = model.lang_encoder
        if getattr(lm, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if enabled and hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif enabled:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            elif hasattr(lm, "activation_checkpointing_disable"):
                lm.activation_checkpointing_disable()
            else:
                lm.gradient_checkpointing_disable()
        # Last: transformers sets `gradient_checkpointing` on every module that has the attribute,
        # our FlamingoLayers (which checkpoint the cross-attention) included.
        for layer in model.decoder_layers():
            layer.gradient_checkpointing = enabled and mode != "lm"


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-sum causal LM cross-entropy in fp32: position t predicts ``labels[t+1]``."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# -- trainer ---------------------------------------------------------------------------------------
def config_datasets(cfg: TrainConfig, model, tokenizer, image_processor, *, rank: int = 0,
                    world_size: int = 1) -> list:
    """The datasets of ``cfg.data`` for one rank (what the trainer builds when none are passed in;
    scripts that add a dataset of their own build these first and pass all of them)."""
    from ..data import DatasetSpec, build_datasets
    from ..processing import FlamingoProcessor

    limit, absolute = lm_context_limit(model.lang_encoder)
    specs = []
    for i, d in enumerate(cfg.data):
        spec = DatasetSpec(
            kind=d.kind, urls=list(d.urls), batch_size=d.batch_size, loss_weight=d.effective_loss_weight(),
            max_tokens=d.max_tokens, max_images=d.max_images, min_images=d.min_images,
            similarity_threshold=d.similarity_threshold, min_image_bytes=d.min_image_bytes,
            chunk_separator=d.chunk_separator, loss_after=tuple(d.loss_after),
        )
        if limit is not None and spec.resolved_max_tokens > limit:
            msg = (f"data[{i}] ({d.kind}) makes sequences of up to {spec.resolved_max_tokens} tokens but the LM "
                   f"takes at most {limit} positions; set data[{i}].max_tokens <= {limit}")
            if absolute:
                raise ConfigError(msg)
            if rank == 0:
                logger.warning(msg)
        specs.append(spec)
    processor = FlamingoProcessor(tokenizer, image_processor)
    try:
        return build_datasets(specs, processor, seed=cfg.seed, rank=rank, world_size=world_size,
                              eos_token_id=tokenizer.eos_token_id)
    except FileNotFoundError as e:
        idx = _which_dataset(cfg, str(e))
        raise DataError(f"no training data found{idx}: {e}") from e


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the loop (:meth:`fit`).

    ``model``: an already built ``(model, image_processor, tokenizer)`` (or a bare model) instead of
    ``config.model``; ``datasets``: ready datasets (the ``ShardDataset`` interface: endless batches,
    ``state_dict``/``load_state_dict``) instead of ``config.data``. Both exist for benchmarks and
    tests; the command line always builds from the config.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Any = None,
        datasets: Sequence | None = None,
        callbacks: Sequence[Callback] = (),
        dataset_names: list[str] | None = None,
        loss_weights: list[float] | None = None,
    ):
        self.cfg = config
        self.callbacks = list(callbacks)
        self.info: DistInfo = setup(config.distributed)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.history: list[dict] = []
        self._given_model = model is not None
        self._hold = contextlib.ExitStack()  # the output directory's lock, released by close()
        try:
            self._hold_output_dir()
            self._setup(model, datasets, dataset_names, loss_weights)
        except BaseException:
            self.close()
            raise

    def _hold_output_dir(self) -> None:
        """A second run resuming the same output_dir would interleave checkpoints and metrics with
        this one: refuse it before anything is read or written (rank 0 holds the lock for the job).
        An output_dir that cannot be written (read-only, no permission, under a file) is refused
        first, on every rank, with one line saying why."""
        error = None
        if self.info.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.output_dir).close()
            except OSError as e:
                error = ckpt.explain_write_error(e, self.output_dir, "output_dir")
        error = broadcast_object(error, self.info)
        if error:
            raise ckpt.WriteError(error)
        hold_for_job(self._hold, self.output_dir, is_main=self.info.is_main,
                     broadcast=lambda obj: broadcast_object(obj, self.info))

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self, model, datasets, dataset_names, loss_weights) -> None:
        cfg, info = self.cfg, self.info
        # The newest checkpoint that reads whole; damaged newer ones are skipped with a warning.
        loaded = ckpt.open_resume(self.output_dir, cfg.resume,
                                  warn=logger.warning if info.is_main else logger.debug)
        self.resume_from = loaded.path if loaded is not None else None
        if self.resume_from is None and ckpt.list_checkpoints(self.output_dir):
            raise ConfigError(
                f"{self.output_dir} already has checkpoints; pass --resume (or resume: auto) to continue that "
                "run, or choose another output_dir"
            )
        state = loaded.state if loaded is not None else None
        if state is not None and state["world_size"] != info.world_size:
            raise ConfigError(
                f"checkpoint {self.resume_from} was written by {state['world_size']} process(es) but this run has "
                f"{info.world_size}; resume with the same number of processes (data positions are per rank)"
            )

        if info.device.type == "cpu" and cfg.malloc_mmap_threshold:
            set_malloc_mmap_threshold(cfg.malloc_mmap_threshold)
        if info.device.type == "cpu" and cfg.precision != "fp32" and not fast_bf16("cpu"):
            logger.warning(
                "precision %s on a CPU without bf16 instructions (%s): bf16 matrix products are emulated and a "
                "step can take 20x longer than in fp32; consider --precision fp32", cfg.precision,
                torch.backends.cpu.get_cpu_capability())
        # Model: identical on every rank (same seed), before any wrapping.
        torch.manual_seed(cfg.seed)
        if model is None:
            model, image_processor, tokenizer = build_model(cfg.model)
        elif isinstance(model, tuple):
            model, image_processor, tokenizer = model
        else:
            image_processor = tokenizer = None
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.lora_targets = apply_lora(model, cfg.lora) if cfg.lora.enabled else []
        if loaded is not None:
            ckpt.load_trainable(model, loaded.path, loaded.trainable)
        _set_gradient_checkpointing(model, cfg.model.gradient_checkpointing)
        if cfg.recompute_gelu and cfg.precision != "amp_bf16":  # (autocast would need custom_fwd plumbing)
            recompute_gelu(model)
        if cfg.precision == "bf16":
            model.to(torch.bfloat16)  # floating tensors only: index buffers stay int64
        model.to(info.device)
        model.train()
        model.vision_encoder.eval()  # frozen feature extractor
        self.vocab_size = model.lang_encoder.get_input_embeddings().weight.shape[0]
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.flamingo = model
        if cfg.distributed == "ddp":
            self.model = wrap_ddp(model, info)
        elif cfg.distributed == "fsdp":
            self.model = wrap_fsdp(model, info)
        else:
            self.model = model

        self.head = model.lang_encoder.get_output_embeddings()
        self.chunked_loss = bool(cfg.chunked_loss and self.head is not None)
        self._loss_checked = False
        self.onednn = cfg.cpu_matmul == "onednn" or (
            cfg.cpu_matmul == "auto" and info.device.type == "cpu" and onednn_available()
        )
        if cfg.cpu_matmul == "onednn" and not onednn_available():
            raise ConfigError("cpu_matmul: onednn, but this torch build has no oneDNN (mkldnn) linear kernel")

        self.optimizer = build_optimizer(self.flamingo, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.max_steps)
        if loaded is not None:
            ckpt.load_optimizer(self.optimizer, loaded.path, loaded.optimizer)
            loaded.trainable = loaded.optimizer = None  # copied into the model and optimizer
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])

        # Data.
        if datasets is None:
            self.datasets = self._build_datasets(model)
            self.dataset_names = cfg.dataset_names()
            self.loss_weights = [d.effective_loss_weight() for d in cfg.data]
        else:
            self.datasets = list(datasets)
            self.dataset_names = dataset_names or [f"data{i}" for i in range(len(self.datasets))]
            self.loss_weights = loss_weights or [float(getattr(getattr(d, "spec", None), "loss_weight", 1.0))
                                                 for d in self.datasets]
        if not self.datasets:
            raise ConfigError("no training data: add at least one dataset under `data:` (or --data)")
        if state is not None:
            positions = state["data"][info.rank]
            if len(positions) != len(self.datasets):
                raise ConfigError(f"checkpoint {self.resume_from} has {len(positions)} dataset positions, the config "
                                  f"has {len(self.datasets)} datasets")
            for ds, pos in zip(self.datasets, positions):
                ds.load_state_dict(pos)
        self._iters = [iter(ds) for ds in self.datasets]

        # Output (rank 0 writes).
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())
        barrier(info)
        columns = (["step", "loss"] + [f"loss/{n}" for n in self.dataset_names]
                   + ["lr", "grad_norm", "skipped", "samples", "tokens", "trained_tokens", "step_time",
                      "samples_per_s", "tokens_per_s"] + list(DATA_PROBLEM_COLUMNS))
        self.sinks = Sinks(cfg, self.output_dir, columns, enabled=info.is_main, start_step=self.step,
                           resumed=state is not None)

        # RNG last: whatever building consumed, training continues from the same state.
        if state is not None:
            ckpt.set_rng_state(state["rng"][info.rank], info.device)
        else:
            torch.manual_seed(cfg.seed + info.rank)
        if info.is_main:
            n_train = sum(p.numel() for p in self.flamingo.parameters() if p.requires_grad)
            logger.info("training %d parameters on %d process(es) (%s, %s); %s", n_train, info.world_size,
                        cfg.distributed, cfg.precision,
                        f"resumed from {self.resume_from} at step {self.step}" if state else "fresh run")

    def _build_datasets(self, model) -> list:
        if self.tokenizer is None or self.image_processor is None:
            raise ConfigError("building datasets from the config needs the model's tokenizer and image processor")
        return config_datasets(self.cfg, model, self.tokenizer, self.image_processor,
                               rank=self.info.rank, world_size=self.info.world_size)

    # -- data ----------------------------------------------------------------------------------
    def _next_batch(self, d: int) -> dict:
        try:
            batch = next(self._iters[d])
        except StopIteration:
            raise DataError(f"dataset {self.dataset_names[d]} ended; training datasets must be endless") from None
        except (OSError, RuntimeError, ValueError) as e:
            raise DataError(f"could not read dataset {self.dataset_names[d]}: {type(e).__name__}: {e}") from e
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise DataError(f"dataset {self.dataset_names[d]} gave a batch without {missing}")
        ids = batch["input_ids"]
        if ids.dtype != torch.long:
            raise DataError(f"dataset {self.dataset_names[d]}: input_ids must be int64, got {ids.dtype}")
        top = int(ids.max()) if ids.numel() else 0
        if top >= self.vocab_size:
            raise ConfigError(
                f"dataset {self.dataset_names[d]} has token id {top} but the model's vocabulary has {self.vocab_size} "
                "rows: the data was tokenized with a different tokenizer than the model's"
            )
        return batch

    def next_batches(self) -> list[list[dict]]:
        """One optimizer step's batches: ``[micro_step][dataset]``."""
        return [[self._next_batch(d) for d in range(len(self.datasets))] for _ in range(self.cfg.grad_accum)]

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "amp_bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self, last: bool):
        if not last and self.cfg.distributed == "ddp":
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _forward_loss(self, batch: dict) -> torch.Tensor:
        dev = self.info.device
        vision_x = batch["vision_x"].to(dev, non_blocking=True)
        if self.cfg.precision == "bf16":
            vision_x = vision_x.to(torch.bfloat16)  # pixels only; token ids stay int64
        input_ids = batch["input_ids"].to(dev, non_blocking=True)
        attention_mask = batch["attention_mask"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        with self._autocast():
            if self.chunked_loss:
                with capture_hidden(self.head) as captured:
                    self.model(vision_x, input_ids, attention_mask=attention_mask)
                return head_cross_entropy_sum(captured.hidden, labels, self.head)
            out = self.model(vision_x, input_ids, attention_mask=attention_mask)
            return cross_entropy_sum(out.logits, labels)

    def _check_chunked_loss(self, batch: dict) -> None:
        """Once: the chunked loss must equal the loss from the model's own logits (it would not for
        an LM that transforms logits after its head, e.g. soft-capping); otherwise fall back."""
        self._loss_checked = True
        with torch.no_grad():
            chunked = self._forward_loss(batch)
            self.chunked_loss = False
            full = self._forward_loss(batch)
        tol = 1e-4 if self.cfg.precision == "fp32" else 2e-2
        ok = torch.tensor([1.0 if torch.isclose(chunked.float(), full.float(), rtol=tol, atol=tol).item()
                           or not torch.isfinite(full).item() else 0.0], device=self.info.device)
        if self.info.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        self.chunked_loss = bool(ok.item())
        if not self.chunked_loss and self.info.is_main:
            logger.warning("chunked loss differs from the model's logits (%s vs %s): using full logits",
                           float(chunked), float(full))

    def _clip(self) -> float:
        params = [p for p in self.flamingo.parameters() if p.requires_grad and p.grad is not None]
        max_norm = self.cfg.optim.max_grad_norm
        # once per optimizer step on the global norm (works on DTensor gradients)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        from .distributed import full_tensor

        return float(full_tensor(norm))

    def train_step(self, batches: list[list[dict]]) -> dict:
        """Forward/backward every batch of one optimizer step, clip once, step (or skip on non-finite
        values, on every rank alike). Returns the step's record (all values global)."""
        t0 = time.perf_counter()
        info, n_data = self.info, len(self.datasets)
        step = self.step + 1
        dev = info.device
        # [trained tokens per dataset..., rows, attended tokens, damaged data (DATA_PROBLEM_COLUMNS)]:
        # one all-reduce before any forward.
        stats = torch.zeros(n_data + 5, dtype=torch.float64, device=dev)
        for micro in batches:
            for d, batch in enumerate(micro):
                stats[d] += trained_tokens(batch["labels"])
                stats[n_data] += batch["input_ids"].shape[0]
                stats[n_data + 1] += int(batch["attention_mask"].sum())
        for ds in self.datasets:
            p = _problems(ds)
            stats[n_data + 2] += p.get("corrupt_samples", 0)
            if info.is_main:
                stats[n_data + 3] += len(p.get("unreadable_shards", ()))
                stats[n_data + 4] += len(p.get("truncated_shards", ()))
        all_reduce_sum(stats, info)
        counts = stats[:n_data].tolist()
        with matmul_context(self.onednn):
            if self.chunked_loss and not self._loss_checked:
                self._check_chunked_loss(batches[0][0])
            loss_sums = self._accumulate(batches, counts, step)
        all_reduce_sum(loss_sums, info)
        means = [float(s) / max(c, 1.0) for s, c in zip(loss_sums.tolist(), counts)]
        total = sum(w * m for w, m in zip(self.loss_weights, means))
        grad_norm = self._clip()
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(total) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        elif info.is_main:
            logger.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped on every rank",
                           step, total, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step = step
        dt = time.perf_counter() - t0
        rows, tokens = float(stats[n_data]), float(stats[n_data + 1])
        record = {"step": step, "loss": total}
        record.update({f"loss/{n}": m for n, m in zip(self.dataset_names, means)})
        record.update({
            "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped), "samples": int(rows), "tokens": int(tokens),
            "trained_tokens": int(sum(counts)), "step_time": dt, "samples_per_s": rows / dt, "tokens_per_s": tokens / dt,
        })
        record.update({k: int(v) for k, v in zip(DATA_PROBLEM_COLUMNS, stats[n_data + 2:].tolist())})
        return record

    def _accumulate(self, batches, counts, step) -> torch.Tensor:
        """Forward/backward every micro-batch of every dataset; returns the per-dataset token sums."""
        info, n_data = self.info, len(self.datasets)
        loss_sums = torch.zeros(n_data, dtype=torch.float64, device=info.device)
        last = (len(batches) - 1, n_data - 1)
        for m, micro in enumerate(batches):
            for d, batch in enumerate(micro):
                scale = self.loss_weights[d] * info.world_size / max(counts[d], 1.0)
                with self._sync((m, d) == last):
                    token_sum = self._forward_loss(batch)
                    loss = token_sum * scale
                    for cb in self.callbacks:
                        loss = cb.on_loss(self, step, m, d, loss)
                    loss.backward()
                loss_sums[d] += token_sum.detach().double()
        return loss_sums

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        last_ckpt = self.resume_from
        try:
            while self.step < cfg.max_steps:
                record = self.train_step(self.next_batches())
                self.history.append(record)
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
                step = record["step"]
                if step % cfg.log_every == 0 or step == cfg.max_steps or record["skipped"]:
                    self.sinks.log(record)
                self.sinks.progress(step, record)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    last_ckpt = self.save_checkpoint() or last_ckpt
            export_dir = self.export() if cfg.export else None
            if info.is_main and cfg.plot and (self.output_dir / METRICS_CSV).is_file():
                plot_loss(self.output_dir / METRICS_CSV, self.output_dir / LOSS_PNG, self.dataset_names)
        finally:
            self.sinks.close()
            self._hold.close()  # the run is over: another may resume this directory
        result = TrainResult(self.step, self.history, self.output_dir, export_dir, last_ckpt, self._data_problems())
        summary = result.data_summary()
        if summary and info.is_main:
            logger.warning("%s", summary)
        return result

    def _data_problems(self) -> dict[str, dict]:
        """Per dataset: the damaged shards (rank 0 reads them all) and corrupt samples of all ranks."""
        problems = [_problems(ds) for ds in self.datasets]
        corrupt = torch.tensor([float(p.get("corrupt_samples", 0)) for p in problems], dtype=torch.float64,
                               device=self.info.device)
        all_reduce_sum(corrupt, self.info)
        for p, n in zip(problems, corrupt.tolist()):
            if p:
                p["corrupt_samples"] = int(n)
        return {name: p for name, p in zip(self.dataset_names, problems) if p}

    def close(self) -> None:
        self._hold.close()
        teardown(self.info)

    # -- checkpoints and export ------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        return ckpt.save_checkpoint(
            self.output_dir, self.step, model=self.flamingo, optimizer=self.optimizer, scheduler=self.scheduler,
            datasets=self.datasets, config=self.cfg.to_dict(), info=self.info, keep_last=self.cfg.keep_last,
        )

    def export(self, out: str | os.PathLike | None = None) -> Path | None:
        """Write the trained model in the ``from_pretrained`` format (rank 0; default
        ``<output_dir>/final``). LoRA adapters are merged into (a copy of) the LM, which is then saved
        with the model. A failed write raises :class:`~.checkpoint.WriteError` saying why."""
        out = Path(out) if out is not None else self.output_dir / "final"
        try:
            return self._export(out)
        except ckpt.WriteError:
            raise
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: RuntimeError "unexpected pos", ...
            if isinstance(e, RuntimeError) and not any(w in str(e).lower() for w in ("unexpected pos", "write")):
                raise
            raise ckpt.WriteError(ckpt.explain_write_error(e, out, "the exported model")) from e

    def _export(self, out: Path) -> Path | None:
        info = self.info
        if self.cfg.distributed == "fsdp":
            trainable = ckpt.gather_trainable(self.flamingo)  # collective
            path = None
            if info.is_main:
                if self._given_model:
                    logger.warning("export skipped: an FSDP run on a model passed in code cannot be rebuilt; "
                                   "use the checkpoint's trainable.safetensors")
                else:
                    path = export_weights(self.cfg, trainable, out)
            barrier(info)
            return path
        path = None
        if info.is_main:
            model = unwrap(self.model)
            lora = has_lora(model)
            if lora:
                import copy

                model = copy.deepcopy(model)
                merge_lora(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                path = model.save_pretrained(out, tokenizer=self.tokenizer, image_processor=self.image_processor,
                                             include_backbones=True if lora else None)
        barrier(info)
        return path


def export_weights(cfg: TrainConfig, trainable: dict[str, torch.Tensor], out: str | os.PathLike) -> Path:
    """Rebuild the model of ``cfg`` on this process, load ``trainable`` (raw names, full tensors),
    merge LoRA and save in the ``from_pretrained`` format."""
    torch.manual_seed(cfg.seed)
    model, image_processor, tokenizer = build_model(cfg.model)
    if cfg.lora.enabled:
        apply_lora(model, cfg.lora)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(trainable):
        raise ConfigError(f"the trained weights do not match the model of the config: "
                          f"{sorted(set(params) ^ set(trainable))[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name].to(p.dtype))
    lora = has_lora(model)
    if lora:
        merge_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.save_pretrained(out, tokenizer=tokenizer, image_processor=image_processor,
                                     include_backbones=True if lora else None)


def export_checkpoint(config: TrainConfig, checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export a training checkpoint (``.../checkpoints/step_N``) to the ``from_pretrained`` format."""
    from ..checkpoints import load_weights_file

    path = ckpt.resolve_resume(config.output_dir, str(checkpoint))
    return export_weights(config, load_weights_file(path / ckpt.TRAINABLE), out)


def _which_dataset(cfg: TrainConfig, message: str) -> str:
    for i, d in enumerate(cfg.data):
        if any(str(u) in message for u in d.urls):
            return f" for data[{i}] ({d.kind})"
    return ""


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Build a :class:`Trainer` from ``config`` and run it to ``config.max_steps``."""
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
