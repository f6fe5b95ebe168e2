"""Rank-0 metric sinks: CSV (always), TensorBoard and wandb (optional), tqdm, a loss-curve PNG; and
the run's result (:class:`TrainResult`, with the damaged data it skipped)."""

from __future__ import annotations

import csv
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_file
from .distributed import all_reduce_sum

logger = logging.getLogger("flamingo_vlm.train")

METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOSS_PNG = "loss.png"

# Damaged data skipped so far (cumulative over the run, resumes included; summed over datasets):
# corrupt samples over all ranks, and damaged shards (every rank reads every shard; rank 0's count).
DATA_PROBLEM_COLUMNS = ("corrupt_samples", "unreadable_shards", "truncated_shards")


def dataset_problems(ds) -> dict:
    """A dataset's damaged data (:meth:`ShardDataset.problems`; nothing for datasets without it)."""
    get = getattr(ds, "problems", None)
    return get() if callable(get) else {}


def problem_counts(datasets, is_main: bool) -> list[float]:
    """This rank's part of :data:`DATA_PROBLEM_COLUMNS` (summed over ranks: damaged shards count on
    rank 0 only, since every rank reads every shard)."""
    problems = [dataset_problems(ds) for ds in datasets]
    return [float(sum(p.get("corrupt_samples", 0) for p in problems)),
            float(sum(len(p.get("unreadable_shards", ())) for p in problems)) if is_main else 0.0,
            float(sum(len(p.get("truncated_shards", ())) for p in problems)) if is_main else 0.0]


def run_problems(datasets, names: list[str], info) -> dict[str, dict]:
    """Per dataset name: the damaged shards (rank 0 reads them all) and corrupt samples of all ranks
    (a collective: every rank calls it)."""
    problems = [dataset_problems(ds) for ds in datasets]
    corrupt = torch.tensor([float(p.get("corrupt_samples", 0)) for p in problems], dtype=torch.float64,
                           device=info.device)
    all_reduce_sum(corrupt, info)
    for p, n in zip(problems, corrupt.tolist()):
        if p:
            p["corrupt_samples"] = int(n)
    return {name: p for name, p in zip(names, problems) if p}


def record_columns(dataset_names: list[str], *, aim: bool = False) -> list[str]:
    """The columns of a step's record (``metrics.csv``), in order."""
    return (["step", "loss"] + [f"loss/{n}" for n in dataset_names]
            + ["lr", "grad_norm", "skipped", "samples", "tokens", "trained_tokens", "step_time",
               "samples_per_s", "tokens_per_s"] + list(DATA_PROBLEM_COLUMNS) + (["aim_attention"] if aim else []))


@dataclass
class TrainResult:
    """What :meth:`~.trainer.Trainer.fit` returns: the last step, every step's record, where things went."""

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


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly: resumed and uninterrupted runs compare bitwise
    return str(v)


class MetricsCSV:
    """``metrics.csv`` with one row per logged step. On resume, rows after the resumed step are
    dropped (they belong to the interrupted run's lost tail)."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path = path
        self.columns = columns
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step") and int(r["step"]) <= resume_step]
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")

    def write(self, record: dict) -> None:
        try:
            self._w.writerow({k: _fmt(v) for k, v in record.items()})
            self._f.flush()
        except OSError as e:  # a full disk: say so and name the file
            from .checkpoint import WriteError, explain_write_error

            raise WriteError(explain_write_error(e, self.path, "metrics")) from e

    def close(self) -> None:
        self._f.close()


def _event_records(data: bytes):
    """(event, record bytes) of each whole record of a TensorBoard event file (TFRecord framing:
    u64 length, u32 crc, data, u32 crc); stops at a torn or unreadable record (a killed writer's)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        try:
            event = Event.FromString(data[pos + 12:pos + 12 + length])
        except DecodeError:
            return
        yield event, data[pos:end]
        pos = end


def truncate_event_files(log_dir: Path, keep_through: int) -> None:
    """Drop every event after step ``keep_through`` from the TensorBoard event files in ``log_dir``
    (each file rewritten atomically; one left without summaries is removed), so that a resumed run's
    steps are not in the files twice. TensorBoard's own purge on restart (``purge_step``) hides them
    only from some of its readers, and from none that read the files directly."""
    if not log_dir.is_dir():
        return
    for path in sorted(log_dir.iterdir()):
        if "tfevents" not in path.name or not path.is_file():
            continue
        try:
            data = path.read_bytes()
            records = list(_event_records(data))
            kept = [(event, r) for event, r in records if event.step <= keep_through]
            if len(kept) == len(records) and sum(len(r) for _, r in kept) == len(data):
                continue  # nothing after keep_through, no torn tail
            if not any(event.HasField("summary") for event, _ in kept):
                path.unlink()
                continue
            with atomic_file(path, tmp_stem="resume-truncate") as tmp:  # (a name TensorBoard does not read)
                tmp.write_bytes(b"".join(r for _, r in kept))
        except OSError as e:
            from .checkpoint import WriteError, explain_write_error

            raise WriteError(explain_write_error(e, path, "TensorBoard log")) from e


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.csv`` with numbers parsed back (exactly, for floats)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                if v is None or v == "":
                    parsed[k] = None
                    continue
                try:
                    parsed[k] = int(v)
                except ValueError:
                    try:
                        parsed[k] = float(v)
                    except ValueError:
                        parsed[k] = v
            out.append(parsed)
    return out


class Sinks:
    """Everything rank 0 writes about progress. Other ranks get a no-op instance."""

    def __init__(self, cfg, output_dir: Path, columns: list[str], *, enabled: bool, start_step: int,
                 resumed: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.csv = self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.csv = MetricsCSV(output_dir / METRICS_CSV, columns, start_step if resumed else None)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = output_dir / TENSORBOARD_DIR
                # Steps after start_step belong to the lost tail (or, on a fresh run, to a run that never
                # checkpointed): dropped from the files, as from metrics.csv. purge_step also marks the
                # restart for TensorBoard readers that honour it.
                truncate_event_files(tb_dir, start_step)
                self.tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                logger.warning("tensorboard is not installed (pip install tensorboard): TensorBoard logs are off")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(config=cfg.to_dict(), dir=str(output_dir), resume="allow", **cfg.wandb)
            except ImportError:
                logger.warning("wandb is not installed (pip install wandb): wandb logging is off")
        if cfg.progress:
            from ..progress import progress

            self.bar = progress(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.csv.write(record)
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def progress(self, step: int, record: dict | None) -> None:
        if self.bar is None:
            return
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                samples_s=f"{record['samples_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
        # (an update, not a forced refresh: it redraws as often as the bar's mininterval allows, once a
        # minute in a log file, where a refresh at every step wrote every step)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.csv is not None:
            self.csv.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss(csv_path: Path, png_path: Path, dataset_names: list[str]) -> Path | None:
    """Loss (and per-dataset losses) against step, from ``metrics.csv``."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): no loss plot")
        return None
    rows = [r for r in read_metrics(csv_path) if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss (weighted)", linewidth=1.5)
    if len(dataset_names) > 1:
        for name in dataset_names:
            key = f"loss/{name}"
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, linewidth=1, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(png_path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return png_path
