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

Precision. ``fp32``; ``amp_bf16`` (fp32 weights, bf16 autocast; the frozen linear/convolution
weights held in bf16, as autocast uses them: ``frozen_bf16``, :func:`.fastpath.frozen_matrices_to`);
``bf16`` (every weight, gradient and optimizer state in bf16). Token ids and masks are never cast;
the loss is computed in fp32.

Speed/memory with the same math (:mod:`.fastpath`, each can be switched off in the config): the loss
is computed from the last hidden states in chunks (no full logits; verified once against the
model's logits, with a fallback), fp32 GEMMs run on oneDNN on CPUs where a cached probe measured
it faster (:mod:`..modeling.kernels`), AdamW is the fused kernel. Less memory with the same forward
and gradients equal up to rounding (:mod:`.lean`, ``lean_backward``): the perceiver and the
cross-attention recompute their LayerNorm and GELU outputs in backward, fold the tanh gates into
their last products, and under bf16 autocast keep the fp32 trained weights instead of bf16 copies.

Aiming (``aim:``, off by default): the aiming data joins the mixture as dataset ``aim`` and its
batches add ``aim.loss_weight`` times the attention loss to their answer loss (:mod:`.losses`).

Around the loop: :mod:`.build` makes the model and datasets from the config, :mod:`.losses` holds
the losses, :mod:`.export` writes the trained model, :mod:`.checkpoint` saves and resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..allocator import preload_hint
from ..data.dataset import NoFullBatch
from ..data.labels import IGNORE_INDEX
from ..locking import hold_for_job
from ..modeling.fast_linear import fast_bf16, onednn_available
from ..modeling.kernels import decide
from ..pretrained import check_save_target
from . import checkpoint as ckpt
from .build import DataError, build_model, check_batch, prepare_model, run_datasets
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, full_tensor, setup, teardown, wrap
from .export import export_trained
from .fastpath import (
    capture_hidden,
    frozen_matrices_to,
    glibc_reuse_freed_memory,
    head_cross_entropy_sum,
    matmul_context,
    restore_frozen_matrices,
    set_malloc_mmap_threshold,
)
from .losses import AttentionAim, cross_entropy_sum, losses_agree, trained_tokens
from .metrics import (
    DATA_PROBLEM_COLUMNS,
    LOSS_PNG,
    METRICS_CSV,
    Sinks,
    TrainResult,
    plot_loss,
    problem_counts,
    record_columns,
    run_problems,
)
from .optim import build_optimizer, build_scheduler, lr_factor

# DataError, TrainResult and build_model live in .config, .metrics and .build; imported from here too
__all__ = ["Callback", "DataError", "TrainResult", "Trainer", "build_model", "train"]

logger = logging.getLogger("flamingo_vlm.train")


class Callback:
    """Hooks for tests and extensions; override what you need."""

    def on_loss(self, trainer: "Trainer", step: int, micro: int, dataset: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_step_end(self, trainer: "Trainer", record: dict) -> None:
        pass


# -- trainer ---------------------------------------------------------------------------------------

def _check_row(batch: dict) -> dict:
    """The batch's row with the most trained tokens, as a batch of one (without aiming data: the check
    compares token losses)."""
    row = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).argmax())
    return {k: batch[k][row:row + 1] for k in ("vision_x", "input_ids", "attention_mask", "labels")}


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
        config.validate(require_model=model is None)  # (a TrainConfig built in code was never checked)
        self.cfg = config
        self.callbacks = list(callbacks)
        self.info: DistInfo = setup(config.distributed)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.history: list[dict] = []
        self._given_model = model is not None
        self._frozen_cast: list = []  # frozen weights held in bf16 (frozen_bf16), put back by close()
        self._hold = contextlib.ExitStack()  # the output directory's lock, released by close()
        self._made_dirs: list[Path] = []  # the output directory and its parents this run created
        self._locked = False  # this process holds the output directory's lock
        try:
            self._hold_output_dir()
            self._setup(model, datasets, dataset_names, loss_weights)
        except BaseException:
            if self._locked:  # (while the lock is held: another run cannot have taken the directory)
                self._remove_untouched_output_dir()
            self.close()
            raise

    def _remove_untouched_output_dir(self) -> None:
        """A run that failed before it wrote anything (a model or data not found, ``--resume`` with no
        checkpoint) left its new output directory holding only the lock file: removed, with the
        parents it created, where they hold nothing else."""
        for d in self._made_dirs:  # (the output directory first, then its new parents)
            try:
                if {e.name for e in d.iterdir()} <= {".lock"}:
                    (d / ".lock").unlink(missing_ok=True)
                    d.rmdir()
            except OSError:
                return

    def _hold_output_dir(self) -> None:
        """A second run resuming the same output_dir would interleave checkpoints and metrics with
        this one: refuse it before anything is read or written (rank 0 holds the lock for the job).
        An output_dir that cannot be written (read-only, no permission, under a file) is refused
        first, on every rank, with one line saying why."""
        error = None
        if self.info.is_main:
            self._made_dirs = [d for d in (self.output_dir, *self.output_dir.parents) if not d.exists()]
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.output_dir).close()
            except OSError as e:
                error = ckpt.explain_write_error(e, self.output_dir, "output_dir")
            if error is None and self.cfg.export:
                try:  # the export at the end would refuse it: say so now, not after training
                    check_save_target(self.output_dir / "final")
                except FileExistsError as e:
                    error = f"cannot export the trained model at the end: {e}"
        error = broadcast_object(error, self.info)
        if error:
            raise ckpt.WriteError(error)
        hold_for_job(self._hold, self.output_dir, is_main=self.info.is_main,
                     broadcast=lambda obj: broadcast_object(obj, self.info))
        self._locked = self.info.is_main

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self, model, datasets, dataset_names, loss_weights) -> None:
        cfg, info = self.cfg, self.info
        # The newest checkpoint that reads whole; damaged newer ones are skipped with a warning.
        loaded = ckpt.open_run(self.output_dir, cfg.resume, info.world_size,
                               warn=logger.warning if info.is_main else logger.debug)
        self.resume_from = loaded.path if loaded is not None else None
        state = loaded.state if loaded is not None else None
        if state is not None and int(state["step"]) > cfg.max_steps:  # (before the model is built; fit would train
            # nothing and export the checkpoint's model again)
            raise ConfigError(f"{self.resume_from} is at step {state['step']}, past max_steps {cfg.max_steps}: raise "
                              "max_steps (--max-steps) to train on from it, or give another output_dir for a new run")

        if info.device.type == "cpu" and cfg.malloc_mmap_threshold:
            set_malloc_mmap_threshold(cfg.malloc_mmap_threshold)
        elif info.device.type == "cpu" and cfg.glibc_reuse and glibc_reuse_freed_memory():
            logger.debug("glibc malloc: freed blocks kept for reuse (glibc_reuse)")
        if info.device.type == "cpu" and info.is_main and (hint := preload_hint()):
            # the flamingo-vlm command preloads it itself; code that calls the Trainer cannot
            logger.info("CPU training is faster and smaller with tcmalloc (README, 'Memory allocator'): "
                        "start this program as `%s python ...`", hint)
        if info.device.type == "cpu" and cfg.precision != "fp32" and not fast_bf16("cpu"):
            logger.warning(
                "precision %s on a CPU where bf16 is not faster than fp32 (%s)%s", cfg.precision,
                torch.backends.cpu.get_cpu_capability(),
                ": its linear layers' bf16 products run as fp32 GEMMs of the bf16 values (the same results up to "
                "rounding), so a step takes about fp32's time, with bf16's memory" if cfg.cpu_matmul == "auto"
                and decide("bf16_gemm") else "; consider --precision fp32")
        # Model: identical on every rank (same seed), before any wrapping.
        torch.manual_seed(cfg.seed)
        if model is None:
            model, image_processor, tokenizer = build_model(cfg.model)
        elif isinstance(model, tuple):
            model, image_processor, tokenizer = model
        else:
            image_processor = tokenizer = None
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.lora_targets = prepare_model(model, cfg, info.device, loaded)
        if self._frozen_bf16():
            self._frozen_cast = frozen_matrices_to(model, torch.bfloat16,
                                                   skip=(model.lang_encoder.get_output_embeddings(),))
            if info.is_main and self._frozen_cast:
                n = sum(getattr(m, name).numel() for m, name in self._frozen_cast)
                logger.info("amp_bf16: %d frozen linear/convolution weights (%.1f MB) stored in bf16, as autocast "
                            "computes with them (frozen_bf16)", len(self._frozen_cast), n * 2 / 1e6)
        self.vocab_size = model.lang_encoder.get_input_embeddings().weight.shape[0]
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        # Data (the aiming data last, when on), built before the model is wrapped.
        self.datasets, self.dataset_names, self.loss_weights = run_datasets(
            cfg, model, tokenizer, image_processor, info, datasets, dataset_names, loss_weights)
        self.aim = AttentionAim(model, cfg.aim.heads) if cfg.aim.enabled else None
        if loaded is not None:
            ckpt.restore_data_positions(loaded, info.rank, self.datasets)
        self._iters = [iter(ds) for ds in self.datasets]
        self.flamingo, self.model = model, wrap(model, cfg.distributed, info)

        self.head = model.lang_encoder.get_output_embeddings()
        self.chunked_loss = bool(cfg.chunked_loss and self.head is not None)
        self._loss_checked = False
        self.onednn = cfg.cpu_matmul == "onednn" or (
            cfg.cpu_matmul == "auto" and info.device.type == "cpu" and decide("gemm")  # measured per machine
        )
        if (not self.onednn and cfg.cpu_matmul == "auto" and info.device.type == "cpu" and cfg.precision != "fp32"
                and decide("bf16_gemm")):
            self.onednn = None  # route the linears per call: bf16 products as fp32 GEMMs (emulated bf16 here)
        if cfg.cpu_matmul == "onednn" and not onednn_available():
            raise ConfigError("cpu_matmul: onednn, but this torch build has no oneDNN (mkldnn) linear kernel")

        self.optimizer = build_optimizer(self.flamingo, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.max_steps)
        if loaded is not None:
            self.step = ckpt.restore_optimizer(loaded, self.optimizer, self.scheduler)
            # The next update's lr on this run's schedule: the saved lr unless the schedule or max_steps
            # changed. A run extended from 30 to 60 steps had saved where its 30-step schedule ends (0 for
            # a decay to 0), and its first resumed step would have trained with that.
            factor = lr_factor(self.scheduler.last_epoch, cfg.schedule, cfg.max_steps)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

        # Output (rank 0 writes).
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())
            # (before the progress bar below, which it was printed onto)
            n_train = sum(p.numel() for p in self.flamingo.parameters() if p.requires_grad)
            logger.info("training %d parameters on %d process(es) (%s, %s); %s", n_train, info.world_size,
                        cfg.distributed, cfg.precision,
                        f"resumed from {self.resume_from} at step {self.step}" if loaded is not None else "fresh run")
            if cfg.schedule.warmup_steps >= cfg.max_steps:  # (the defaults, 1875 and 1000, trained at ~0 lr)
                logger.warning("schedule.warmup_steps %d >= max_steps %d: the lr never reaches optim.lr (%g; at the "
                               "last step %.2g); set --warmup-steps (schedule.warmup_steps) below max_steps",
                               cfg.schedule.warmup_steps, cfg.max_steps, cfg.optim.lr,
                               cfg.optim.lr * lr_factor(cfg.max_steps - 1, cfg.schedule, cfg.max_steps))
        barrier(info)
        self.sinks = Sinks(cfg, self.output_dir, record_columns(self.dataset_names, aim=self.aim is not None),
                           enabled=info.is_main, start_step=self.step, resumed=state is not None)

        # RNG last: whatever building consumed, training continues from the same state.
        if state is not None:
            ckpt.set_rng_state(state["rng"][info.rank], info.device)
        else:
            torch.manual_seed(cfg.seed + info.rank)

    def _frozen_bf16(self) -> bool:
        cfg = self.cfg
        if cfg.frozen_bf16 is not None:
            return cfg.frozen_bf16
        return (cfg.precision == "amp_bf16" and not self._given_model and not cfg.lora.enabled
                and cfg.distributed != "fsdp")

    def _embeds_backbones(self) -> bool:
        """Whether an export writes the LM or vision encoder weights (they are not referenced by a Hub
        id or path): then frozen weights held in bf16 must not be what it writes."""
        config = getattr(self.flamingo, "config", None)
        return config is None or config.lm is None or config.vision is None

    def _restore_frozen(self) -> None:
        """The model goes back with fp32 frozen weights (their values bf16-rounded; the export, where it
        writes backbones, rebuilds them from the config instead)."""
        if self._frozen_cast:
            restore_frozen_matrices(self._frozen_cast)
            self._frozen_cast = []

    # -- data ----------------------------------------------------------------------------------
    def _next_batch(self, d: int) -> dict:
        try:
            batch = next(self._iters[d])
        except StopIteration:
            raise DataError(f"dataset {self.dataset_names[d]} ended; training datasets must be endless") from None
        except NoFullBatch as e:  # (read fine but too small was "could not read dataset ...: RuntimeError: ...")
            raise DataError(f"{'could not read dataset' if e.damaged else 'dataset'} {self.dataset_names[d]}: {e}") from e
        except (OSError, RuntimeError, ValueError) as e:
            raise DataError(f"could not read dataset {self.dataset_names[d]}: {type(e).__name__}: {e}") from e
        return check_batch(batch, self.dataset_names[d], self.vocab_size)

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

    def _forward_loss(self, batch: dict, aim_log: list | None = None) -> torch.Tensor:
        """The batch's token-sum loss; for aiming batches plus ``aim.loss_weight`` times the attention
        loss times the trained tokens (so that the dataset's mean is answer + weight x attention);
        the attention loss goes to ``aim_log``."""
        dev = self.info.device
        vision_x = batch["vision_x"].to(dev, non_blocking=True)
        if self.cfg.precision == "bf16":
            vision_x = vision_x.to(torch.bfloat16)  # pixels only; token ids stay int64
        input_ids = batch["input_ids"].to(dev, non_blocking=True)
        attention_mask = batch["attention_mask"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        aiming = self.aim is not None and "aim_cells" in batch
        with self._autocast(), (self.aim.capture(batch, dev) if aiming else contextlib.nullcontext()) as aim_losses:
            if self.chunked_loss:
                with capture_hidden(self.head) as captured:
                    self.model(vision_x, input_ids, attention_mask=attention_mask)
                token_sum = head_cross_entropy_sum(captured.hidden, labels, self.head)
            else:
                token_sum = cross_entropy_sum(self.model(vision_x, input_ids, attention_mask=attention_mask).logits,
                                              labels)
        if not aiming:
            return token_sum
        return self.aim.add(token_sum, aim_losses, batch["labels"], self.cfg.aim.loss_weight, aim_log)

    def _check_chunked_loss(self, batch: dict) -> None:
        """Once: the chunked loss must equal the loss from the model's own logits (it would not for
        an LM that transforms logits after its head, e.g. soft-capping); otherwise fall back. A property
        of the model, not of the batch: checked on the batch's row with the most trained tokens (two
        forwards of one row cost a quarter of two of the benchmark's 4 rows)."""
        self._loss_checked = True
        batch = _check_row(batch)
        with torch.no_grad():
            chunked = self._forward_loss(batch)
            self.chunked_loss = False
            full = self._forward_loss(batch)
        self.chunked_loss = losses_agree(chunked, full, self.cfg.precision, self.info)
        if not self.chunked_loss and self.info.is_main:
            logger.warning("chunked loss differs from the model's logits (%s vs %s): using full logits",
                           float(chunked), float(full))

    def _clip(self) -> float:
        params = [p for p in self.flamingo.parameters() if p.requires_grad and p.grad is not None]
        max_norm = self.cfg.optim.max_grad_norm
        # once per optimizer step on the global norm (works on DTensor gradients)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
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
        stats[n_data + 2:] += stats.new_tensor(problem_counts(self.datasets, info.is_main))
        all_reduce_sum(stats, info)
        counts = stats[:n_data].tolist()
        with matmul_context(self.onednn, self.model):
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
        if self.aim is not None:  # mean attention loss of the step's aiming batches (all ranks)
            record["aim_attention"] = float(loss_sums[n_data]) / max(float(loss_sums[n_data + 1]), 1.0)
        return record

    def _accumulate(self, batches, counts, step) -> torch.Tensor:
        """Forward/backward every micro-batch of every dataset; returns the per-dataset token sums, then
        the sum and count of the aiming batches' attention losses."""
        info, n_data = self.info, len(self.datasets)
        loss_sums = torch.zeros(n_data + 2, dtype=torch.float64, device=info.device)
        aim_log: list[torch.Tensor] = []
        last = (len(batches) - 1, n_data - 1)
        for m, micro in enumerate(batches):
            for d, batch in enumerate(micro):
                scale = self.loss_weights[d] * info.world_size / max(counts[d], 1.0)
                with self._sync((m, d) == last):
                    token_sum = self._forward_loss(batch, aim_log)
                    loss = token_sum * scale
                    for cb in self.callbacks:
                        loss = cb.on_loss(self, step, m, d, loss)
                    loss.backward()
                loss_sums[d] += token_sum.detach().double()
        if aim_log:
            loss_sums[n_data:] += torch.stack([torch.stack(aim_log).double().sum(), loss_sums.new_tensor(len(aim_log))])
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
            self._restore_frozen()  # the model generates as it is, outside autocast, right after fit()
        problems = run_problems(self.datasets, self.dataset_names, self.info)
        result = TrainResult(self.step, self.history, self.output_dir, export_dir, last_ckpt, problems)
        summary = result.data_summary()
        if summary and info.is_main:
            logger.warning("%s", summary)
        return result

    def close(self) -> None:
        self._restore_frozen()
        self._hold.close()
        teardown(self.info, getattr(self, "model", None))

    # -- checkpoints and export ------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        return ckpt.save_checkpoint(
            self.output_dir, self.step, model=self.flamingo, optimizer=self.optimizer, scheduler=self.scheduler,
            datasets=self.datasets, config=self.cfg.to_dict(), info=self.info, keep_last=self.cfg.keep_last,
        )

    def export(self, out: str | os.PathLike | None = None) -> Path | None:
        """Write the trained model in the ``from_pretrained`` format (rank 0; default
        ``<output_dir>/final``; see :func:`.export.export_trained`). With frozen weights held in bf16
        (``frozen_bf16``), a model the trainer built is rebuilt from the config for the export (exact
        fp32 backbones); a model passed in gets its frozen weights back in fp32 first."""
        if self._given_model:
            self._restore_frozen()
        return export_trained(self.cfg, self.flamingo, self.info, out if out is not None else self.output_dir / "final",
                              tokenizer=self.tokenizer, image_processor=self.image_processor,
                              rebuildable=not self._given_model,
                              rebuild=bool(self._frozen_cast) and self._embeds_backbones())


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """Build a :class:`Trainer` from ``config`` and run it to ``config.max_steps``."""
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
