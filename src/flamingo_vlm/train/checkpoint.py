"""Training checkpoints: atomic, complete, resumable.

``<output_dir>/checkpoints/step_00000040/`` holds

- ``trainable.safetensors``: the trainable weights, full tensors under their raw parameter names
  (``perceiver.latents``, ``lang_encoder....gated_cross_attn_layer.attn_gate``,
  ``...embed_tokens.new_weight``, LoRA's ``lora_A``/``lora_B``), as ``save_pretrained`` names them;
- ``optimizer.pt``: AdamW state keyed by parameter *name* (full tensors, so any sharding reloads);
- ``trainer_state.pt``: step, scheduler, every rank's RNG states and data positions, world size,
  and the run's config;
- ``COMPLETE``: written last.

A checkpoint is written into a hidden temporary directory and renamed into place, so a process
killed mid-write leaves the previous checkpoints intact and no half-written one that looks complete.
Only rank 0 writes; tensors sharded by FSDP2 are gathered (a collective every rank joins) first. A
write that fails (disk full, read-only, no permission) removes its temporary directory and raises
:class:`WriteError` on every rank with one line saying why and where (``torch.save`` reports a
full disk as ``RuntimeError: ... unexpected pos``; the free space is checked to say so).

Reading: every file is read through :func:`flamingo_vlm.checkpoints.load_weights_file`, so a
damaged one is named. :func:`load_checkpoint` reads a whole checkpoint up front; :func:`open_resume`
reads the one ``--resume`` continues, falling back past damaged newer ones with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..checkpoints import CheckpointError
from ..files import WeightsFileError, atomic_directory, load_weights_file, remove_leftovers
from .config import ConfigError
from .distributed import DistInfo, all_gather_objects, broadcast_object, full_tensor, like_param

logger = logging.getLogger("flamingo_vlm.train")

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.pt"


class WriteError(OSError):
    """A run's file could not be written; the message says why (no space, read-only, ...) and where."""


_WHY = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of it is a file, not a directory", errno.EISDIR: "it is a directory",
}
# Messages of writers that do not raise OSError (torch.save's RuntimeError, safetensors' Rust IoError).
_WHY_TEXT = (("no space left", errno.ENOSPC), ("storagefull", errno.ENOSPC), ("code: 28", errno.ENOSPC),
             ("read-only file system", errno.EROFS), ("readonlyfilesystem", errno.EROFS), ("code: 30", errno.EROFS),
             ("permission denied", errno.EACCES), ("code: 13", errno.EACCES))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _free_space(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def explain_write_error(e: BaseException, path: str | os.PathLike, what: str, needed: int | None = None) -> str:
    """One line: ``cannot write {what} {path}: {why}``, with the free space when it may be the cause."""
    path = Path(path)
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    text = str(e).lower()
    if code not in _WHY:
        code = next((c for needle, c in _WHY_TEXT if needle in text), code)
    free = _free_space(path)
    if code not in _WHY and isinstance(e, RuntimeError) and ("unexpected pos" in text or "write" in text):
        # torch.save's zip writer: a full disk shows up as "unexpected pos" / "file write failed"
        if free is not None and free < max(needed or 0, 1 << 20):
            code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        room = f" ({_size(free)} free there" + (f", about {_size(needed)} needed" if needed else "") + ")"
        why = _WHY[code] + (room if free is not None else "") + "; free some space or choose another output_dir"
    elif code in _WHY:
        why = _WHY[code] + "; choose a writable output_dir"
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}" + (f" ({_size(free)} free there)" if free is not None else "")
    return f"cannot write {what} {path}: {why}"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# -- gathering (collective under FSDP2) ------------------------------------------------------------
def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters by raw name. Never calls ``state_dict()`` (the
    new-token embedding's hooks would merge rows into the frozen matrix)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = full_tensor(p.detach()).cpu().clone().contiguous()
    return out


def gather_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state by parameter name with full tensors (groups carry their ``names``)."""
    state, groups = {}, []
    for group in optimizer.param_groups:
        names = group["names"]
        groups.append({k: v for k, v in group.items() if k != "params"})
        for name, p in zip(names, group["params"]):
            st = optimizer.state.get(p)
            if not st:
                continue
            state[name] = {
                k: (full_tensor(v).cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()
            }
    return {"state": state, "param_groups": groups}


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- writing ---------------------------------------------------------------------------------------
def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    datasets: list,
    config: dict,
    info: DistInfo,
    keep_last: int,
) -> Path | None:
    """Every rank calls this; rank 0 writes. Returns the checkpoint path (rank 0) or None. A failed
    write raises :class:`WriteError` on every rank (the previous checkpoints stay as they were)."""
    trainable = gather_trainable(model)
    optim_state = gather_optimizer(optimizer)
    per_rank = all_gather_objects(
        {"rng": rng_state(info.device), "data": [ds.state_dict() for ds in datasets]}, info
    )
    path = error = None
    if info.is_main:
        state = {
            "step": step,
            "world_size": info.world_size,
            "scheduler": scheduler.state_dict(),
            "rng": [r["rng"] for r in per_rank],
            "data": [r["data"] for r in per_rank],
            "config": config,
        }
        try:
            path = _write_atomic(checkpoints_root(output_dir), step, trainable, optim_state, state)
        except WriteError as e:
            error = str(e)
        else:
            prune(output_dir, keep_last)
    error = broadcast_object(error, info)  # also the barrier: no rank goes on while rank 0 writes
    if error:
        raise WriteError(error)
    return path


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _write_atomic(root: Path, step: int, trainable, optim_state, state) -> Path:
    """Write one checkpoint through :func:`~flamingo_vlm.files.atomic_directory` (a checkpoint of the
    same step being replaced is put back if the write fails). OS and writer errors -> WriteError."""
    final = root / f"step_{step:08d}"
    try:
        with atomic_directory(final) as tmp:
            save_file(trainable, str(tmp / TRAINABLE), metadata={"format": "flamingo-vlm-trainable", "step": str(step)})
            torch.save(optim_state, tmp / OPTIMIZER)
            torch.save(state, tmp / STATE)
            (tmp / COMPLETE).write_text(f"{step}\n")
    except (OSError, RuntimeError, SafetensorError) as e:
        needed = _nbytes(trainable) + _nbytes(optim_state)
        raise WriteError(explain_write_error(e, final, "checkpoint", needed)) from e
    return final


def prune(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of interrupted writes."""
    found = list_checkpoints(output_dir)
    for _, path in found[:-keep_last] if keep_last > 0 else found:
        shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(checkpoints_root(output_dir), "step_*")


# -- reading ---------------------------------------------------------------------------------------
def resolve_resume(output_dir: str | os.PathLike, resume: str | None, *, flag: str = "--resume") -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the latest checkpoint if any; ``"latest"`` -> the latest
    (an error if none); anything else -> that checkpoint directory (or a run directory's latest).
    ``flag``: the option errors name (``--export-checkpoint`` names a checkpoint too)."""
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        path = latest_checkpoint(output_dir)
        if path is None and resume == "latest":
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoints_root(output_dir)}")
        return path
    path = Path(resume)
    if not path.exists():  # (said "not a complete checkpoint directory (no COMPLETE file)")
        raise ConfigError(f"{flag} {resume}: {resume} does not exist; give a checkpoint directory "
                          f"(OUTPUT_DIR/{CHECKPOINTS}/step_N) or a run's output directory")
    if (path / COMPLETE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise ConfigError(f"{flag} {resume}: not a complete checkpoint directory (no {COMPLETE} file) nor a run with checkpoints")


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory: its directory, trainer state, trainable weights, optimizer state."""

    path: Path
    state: dict
    trainable: dict
    optimizer: dict


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read every file of a checkpoint (errors name the damaged file, see ``load_weights_file``)."""
    path = Path(path)
    state = load_weights_file(path / STATE)
    if not isinstance(state, dict) or not {"step", "world_size", "scheduler", "rng", "data"} <= set(state):
        raise CheckpointError(f"{path / STATE} is not a trainer state (missing step/scheduler/rng/data)")
    return LoadedCheckpoint(path, state, load_weights_file(path / TRAINABLE), load_weights_file(path / OPTIMIZER))


def resume_candidates(output_dir: str | os.PathLike, resume: str | None) -> tuple[list[Path], bool]:
    """The checkpoints ``--resume`` may use, preferred first, and whether it may fall back to the next
    one when a checkpoint is damaged (not when one checkpoint directory was named)."""
    path = resolve_resume(output_dir, resume)
    if path is None:
        return [], False
    if resume not in ("auto", "latest") and (Path(resume) / COMPLETE).is_file():
        return [path], False
    run = output_dir if resume in ("auto", "latest") else resume
    return [p for _, p in reversed(list_checkpoints(run))], True


def open_resume(output_dir: str | os.PathLike, resume: str | None, *, warn=logger.warning) -> LoadedCheckpoint | None:
    """Read the checkpoint to resume from. ``auto``/``latest``/a run directory: the newest checkpoint
    that reads whole; each damaged one skipped is named in a ``warn``-ing. A named checkpoint
    directory that is damaged is an error naming the file. Raises :class:`ConfigError`."""
    candidates, fallback = resume_candidates(output_dir, resume)
    damaged = []
    for path in candidates:
        try:
            return load_checkpoint(path)
        except (OSError, CheckpointError, WeightsFileError) as e:
            if not fallback:
                raise ConfigError(f"--resume {path}: {e}") from e
            damaged.append(f"{path.name}: {e}")
            warn("checkpoint %s is damaged, resuming from an earlier one: %s", path, e)
    if damaged:
        raise ConfigError(f"--resume: no intact checkpoint in {candidates[0].parent} ({'; '.join(damaged)})")
    return None


def open_run(output_dir: str | os.PathLike, resume: str | None, world_size: int, *,
             warn=logger.warning) -> LoadedCheckpoint | None:
    """:func:`open_resume` for a run of ``world_size`` processes writing to ``output_dir``: refuses to
    start afresh over another run's checkpoints, or to resume a checkpoint of another process count
    (data positions are per rank). Raises :class:`ConfigError`."""
    loaded = open_resume(output_dir, resume, warn=warn)
    if loaded is None and list_checkpoints(output_dir):
        raise ConfigError(
            f"{output_dir} already has checkpoints; pass --resume (or resume: auto) to continue that "
            "run, or choose another output_dir"
        )
    if loaded is not None and loaded.state["world_size"] != world_size:
        raise ConfigError(
            f"checkpoint {loaded.path} was written by {loaded.state['world_size']} process(es) but this run has "
            f"{world_size}; resume with the same number of processes (data positions are per rank)"
        )
    return loaded


_HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps")


def restore_optimizer(loaded: LoadedCheckpoint, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Load the optimizer and scheduler states of ``loaded`` (whose trainable weights the model has
    already taken: both are dropped from it) and return its step.

    The run's own hyperparameters are kept (lr, weight decay, betas, eps, as its config says; a
    warning names each one that differs from the checkpoint's): loading the saved parameter groups
    and the scheduler's base rates put the checkpoint's back, so a resume with ``--lr 5e-5`` trained
    on at the old rate while config.yaml recorded the new one. Unchanged, the resume is exact."""
    asked = [{k: group[k] for k in _HYPERPARAMETERS if k in group} for group in optimizer.param_groups]
    load_optimizer(optimizer, loaded.path, loaded.optimizer)
    loaded.trainable = loaded.optimizer = None
    scheduler.load_state_dict(loaded.state["scheduler"])
    changed = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, asked)):
        for key, value in want.items():
            if key in group and _differs(group[key], value):
                changed.append(f"{'lr' if key == 'initial_lr' else key} {group[key]} -> {value}"
                               + (f" (parameter group {i})" if len(asked) > 1 else ""))
                group[key] = value
                if key == "initial_lr":
                    scheduler.base_lrs[i] = value  # (the trainer then sets this step's lr from it)
    if changed:
        logger.warning("resuming %s with this run's %s (the checkpoint's were the first)", loaded.path,
                       "; ".join(dict.fromkeys(changed)))
    return int(loaded.state["step"])


def _differs(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    return a != b


def restore_data_positions(loaded: LoadedCheckpoint, rank: int, datasets) -> None:
    """Put every dataset back where this rank's position in the checkpoint says."""
    positions = loaded.state["data"][rank]
    if len(positions) != len(datasets):
        raise ConfigError(f"checkpoint {loaded.path} has {len(positions)} dataset positions, the config "
                          f"has {len(datasets)} datasets")
    for ds, pos in zip(datasets, positions):
        ds.load_state_dict(pos)


def load_trainer_state(path: Path) -> dict:
    return load_weights_file(path / STATE)


def load_trainable(model: nn.Module, path: Path, weights: dict | None = None) -> None:
    """Copy the checkpoint's trainable weights into ``model`` (before any DDP/FSDP wrapping).
    The names and shapes must match the model's trainable parameters exactly. ``weights``: the
    checkpoint's ``trainable.safetensors`` when already read."""
    weights = load_weights_file(path / TRAINABLE) if weights is None else weights
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    shapes = [
        f"{n}: checkpoint {tuple(weights[n].shape)} vs model {tuple(params[n].shape)}"
        for n in sorted(set(params) & set(weights))
        if weights[n].shape != params[n].shape
    ]
    lora = lambda names: any(".lora_" in n for n in names)  # noqa: E731
    rank = next((t.shape[0] for n, t in weights.items() if ".lora_A." in n), None)  # (the checkpoint's lora.r)
    if lora(unexpected) and not lora(params) or lora(missing) and not lora(weights):  # (a dump of LoRA keys)
        trained = lora(weights)
        raise ConfigError(
            f"checkpoint {path} was trained {'with LoRA' + (f' (r {rank})' if rank else '') if trained else 'without LoRA'}"
            f" and this run is {'not' if trained else 'with LoRA'}: resume with "
            + (f"--lora{f' --lora-r {rank}' if rank else ''} (lora.enabled: true), as the run's config.yaml has it"
               if trained else "--no-lora (lora.enabled: false), as the run's config.yaml has it"))
    if lora(params) and lora(weights) and shapes:
        raise ConfigError(f"checkpoint {path} was trained with LoRA r {rank}: resume with --lora-r {rank} "
                          "(lora.r), as the run's config.yaml has it")
    if missing or unexpected or shapes:
        raise ConfigError(
            f"checkpoint {path} does not match the model (different architecture, LoRA setting or "
            f"model config?): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(dtype=p.dtype))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, saved: dict | None = None) -> None:
    """Load a name-keyed optimizer state into ``optimizer`` (whose params may be FSDP2 shards);
    ``saved``: the checkpoint's ``optimizer.pt`` when already read."""
    saved = load_weights_file(path / OPTIMIZER) if saved is None else saved
    current = optimizer.state_dict()
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise ConfigError(f"{path / OPTIMIZER}: {len(saved['param_groups'])} parameter groups, the optimizer has "
                          f"{len(current['param_groups'])}")
    new_state = {}
    groups = []
    for group, saved_group, live_group in zip(current["param_groups"], saved["param_groups"], optimizer.param_groups):
        if list(saved_group["names"]) != list(live_group["names"]):
            raise ConfigError(f"{path / OPTIMIZER}: parameter names differ from the model's trainable parameters")
        merged = {**saved_group, "params": group["params"]}
        groups.append(merged)
        for pid, name, p in zip(group["params"], live_group["names"], live_group["params"]):
            st = saved["state"].get(name)
            if st is None:
                continue
            new_state[pid] = {
                k: (v if k == "step" or not isinstance(v, torch.Tensor) else like_param(v, p)) for k, v in st.items()
            }
    optimizer.load_state_dict({"state": new_state, "param_groups": groups})
