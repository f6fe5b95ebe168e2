"""Rank-0 metric sinks: CSV (always), TensorBoard and wandb (optional), tqdm, a loss-curve PNG."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger("flamingo_vlm.train")

METRICS_CSV = "metrics.csv"
LOSS_PNG = "loss.png"


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
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        os.replace(tmp, path)
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

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
            except ImportError:
                logger.warning("tensorboard is not installed (pip install tensorboard): TensorBoard logs are off")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(config=cfg.to_dict(), dir=str(output_dir), resume="allow", **cfg.wandb)
            except ImportError:
                logger.warning("wandb is not installed (pip install wandb): wandb logging is off")
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
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
        self.bar.n = step
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                samples_s=f"{record['samples_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
        self.bar.refresh()

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
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
