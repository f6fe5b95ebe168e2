"""Files, below every other layer: reading weights (each error names its file) and writing
directories atomically.

:func:`load_weights_file` is used by the model layer (vision-encoder weights), the loaders
(``from_pretrained``, OpenFlamingo checkpoints, MosaicGPT weights) and training checkpoints;
:func:`atomic_directory` by ``save_pretrained``, the built-in LM's conversion cache and training
checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


class WeightsFileError(ValueError):
    """A weights file that exists but cannot be read (truncated, corrupt, not that format)."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(message)
        self.path = Path(path)


def cache_root() -> Path:
    """Where the library caches what it makes (converted backbones, kernel choices, built kernels):
    ``$FLAMINGO_VLM_CACHE`` or ``~/.cache/flamingo-vlm``."""
    env = os.environ.get("FLAMINGO_VLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flamingo-vlm"


def load_weights_file(path: str | Path) -> Any:
    """Read a ``.safetensors`` file (a dict of CPU tensors) or a torch file (``torch.load`` with
    ``weights_only=True``, on CPU). Every failure names the file: :class:`FileNotFoundError`,
    :class:`IsADirectoryError`, :class:`PermissionError`, or :class:`WeightsFileError` for a file
    that is truncated, corrupt or of another format."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a weights file")
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise PermissionError(f"cannot read weights file {path}: permission denied") from e
    except MemoryError:
        raise
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError/UnpicklingError/EOFError, ...
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        if "Unsupported global" in str(e):  # a real pickle of classes torch will not run on load
            why = "it holds objects other than tensors, which torch.load(weights_only=True) refuses"
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), detail)[:300]
        else:
            why = "it is truncated or corrupt; download or save it again"
        kind = "safetensors" if safetensors else "torch"
        raise WeightsFileError(path, f"cannot read {kind} file {path}: {why} ({type(e).__name__}: {detail})") from e


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``target`` to write into; when the block succeeds it takes
    ``target``'s place, so readers never see a half-written directory.

    On success the files and the directory are fsynced (a crash right after cannot leave an empty
    file under a complete-looking name), their modes are what a plain ``mkdir``/``open`` would give
    (``mkdtemp`` makes 0700 and safetensors writes 0600, which would lock other users out of a shared
    or packaged model), and the parent is fsynced after the rename. An existing ``target`` is replaced
    (``replace=False``: it wins and the new copy is dropped); if the swap fails, the old one is put
    back. On any failure the temporary directory is removed. Temporary names are
    ``.{name}.tmp-*`` (see :func:`remove_leftovers`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        _umask_permissions(tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not target.exists():
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(parent: str | os.PathLike, name_glob: str = "*") -> None:
    """Remove what interrupted :func:`atomic_directory` writes left in ``parent`` (their hidden
    temporary directories, for targets matching ``name_glob``)."""
    for path in Path(parent).glob(f".{name_glob}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _umask_permissions(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)
