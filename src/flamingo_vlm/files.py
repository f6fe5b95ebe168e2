"""Files, below every other layer: reading weights (each error names its file) and writing
directories atomically.

:func:`load_weights_file` is used by the model layer (vision-encoder weights), the loaders
(``from_pretrained``, OpenFlamingo checkpoints, MosaicGPT weights) and training checkpoints;
:func:`atomic_directory` by ``save_pretrained``, the built-in LM's conversion cache and training
checkpoints; :func:`atomic_file` for every single file the library writes in place (results, caches,
plots, data shards, the compiled kernel library).
:func:`release_file_pages` by the factory, after resizing a loaded LM's embeddings, and by
``quantize_model``, after replacing its linear layers.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)


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
    kind = _weights_format(path)
    # the first bytes decide where they are clear (a torch file saved as .safetensors loads), else the suffix
    safetensors = kind == "safetensors" if kind else path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as fh:  # (torch 2.13's load of a path ending .safetensors reads it as safetensors)
            return torch.load(fh, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise PermissionError(f"cannot read weights file {path}: permission denied") from e
    except MemoryError:
        raise
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError/UnpicklingError/EOFError, ...
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        if "Unsupported global" in str(e):  # a real pickle of classes torch will not run on load
            why = "it holds objects other than tensors, which torch.load(weights_only=True) refuses"
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), detail)[:300]
        elif kind is None and path.suffix.lower() not in _WEIGHTS_SUFFIXES:  # (a config or image given in its place)
            head = _text_head(path)
            raise WeightsFileError(path, f"cannot read weights file {path}: it is not a torch (.pt, .bin, .pth) or "
                                         "safetensors weights file" + (f" but text, beginning {head!r}" if head else "")) from e
        else:
            why = "it is truncated or corrupt; download or save it again"
            head = _text_head(path) if kind is None else None
            if head:  # (an HTML error page or a Git LFS pointer saved under the weights' name)
                why += f"; it holds text, beginning {head!r}"
        if kind is None and not safetensors:  # (torch's text is about unpickling, and suggests weights_only=False)
            raise WeightsFileError(path, f"cannot read torch file {path}: {why} (neither a zip archive nor a pickle)") from e
        kind = "safetensors" if safetensors else "torch"
        raise WeightsFileError(path, f"cannot read {kind} file {path}: {why} ({type(e).__name__}: {detail})") from e


_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def _weights_format(path: Path) -> str | None:
    """``"torch"`` (a zip archive, or a legacy pickle) or ``"safetensors"`` (a little-endian header length,
    then its JSON) by the first bytes of ``path``; ``None`` for neither (or an unreadable file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    # safetensors first: its header length is a multiple of 8 whose low byte can be 0x80, a pickle's first
    # byte (a legacy torch pickle has 0xf9 at byte 8, a zip archive its compression method, 0 or 8)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


def _text_head(path: Path) -> str | None:
    """The first line of ``path`` (up to 60 characters) where its first bytes are UTF-8 text, else ``None``."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # (a character cut at byte 256 is still text; anything earlier is not)
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    lines = text.strip().splitlines()  # (CRLF too)
    line = lines[0] if lines else ""
    return line[:60] if line and line.isprintable() else None


# A local LM whose weight files are smaller than this loads in well under a second: transformers'
# "Loading weights" bar over its tensors is then noise on stderr (a trained tiny model's `generate`,
# the built-in model's every `generate` and `serve`). Larger ones, and Hub downloads, keep it.
QUIET_LOAD_BYTES = 1 << 30


@contextlib.contextmanager
def quiet_small_load(name_or_path):
    """transformers' progress bars off while loading ``name_or_path``, where it is a local directory
    whose weight files total less than :data:`QUIET_LOAD_BYTES`; as they were otherwise, and after."""
    from transformers.utils import logging as hf_logging

    path = Path(str(name_or_path))
    small = path.is_dir() and sum(
        f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHTS_SUFFIXES)
    ) < QUIET_LOAD_BYTES
    shown = hf_logging.is_progress_bar_enabled()
    if small and shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if small and shown:
            hf_logging.enable_progress_bar()


def release_file_pages(dropped, live=()) -> int:
    """Take the pages of memory-mapped weight files that back ``dropped`` (tensors the caller has
    just replaced, or their :func:`byte_span` taken before, so as not to keep them alive) out of this
    process's resident memory; returns the bytes given up.

    Weights loaded from safetensors are views of the file's mapping, which stays mapped while any of
    its tensors lives. A tensor replaced after loading (the embeddings that
    ``resize_token_embeddings`` copies into a larger matrix) was read once, so its pages stay
    resident, and count in the process's memory, for the life of the model: the whole embedding
    again (0.15 GB for MPT-125M, 0.5 GB for a 7B LLaMA in fp32, twice where the head is untied).

    Only pages wholly inside a dropped tensor and outside the storage of every ``live`` tensor are
    released, and only in private file mappings no page of which was ever written (smaps
    ``Anonymous``, ``Swap`` and ``Private_Hugetlb`` all 0: a written page is one of these, in memory,
    swapped out or huge): such a page holds nothing but the file's bytes, so a later read of it, if
    any, faults the same bytes back in. Anywhere else (another OS, anonymous memory, a mapping
    written to) nothing is done."""
    if not os.path.exists("/proc/self/smaps"):
        return 0
    page = os.sysconf("SC_PAGE_SIZE")

    def storage_span(t):  # a live tensor's whole storage: its views, contiguous or not, are kept
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_sparse or t.is_meta:
            return None
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # (tensor subclasses without one)
            return None
        return (st.data_ptr(), st.data_ptr() + st.nbytes()) if st.nbytes() else None

    spans = (t if isinstance(t, tuple) else byte_span(t) for t in dropped if t is not None)
    want = sorted(s for s in spans if s[1] > s[0])
    if not want:
        return 0
    clean = []  # (lo, hi) of private file mappings without written pages, in address order
    current = None  # [lo, hi, counted] of the private file mapping being read; None once a written page shows
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(\S*)", line)
            if m:
                if current and current[2]:
                    clean.append((current[0], current[1]))
                current = None
                if m[3].endswith("p") and m[4] != "0" and m[5].startswith("/"):
                    current = [int(m[1], 16), int(m[2], 16), False]
            elif current and line.startswith(("Anonymous:", "Swap:", "Private_Hugetlb:")):
                if int(line.split()[1]):  # written pages: in memory, swapped out, or huge
                    current = None
                elif line.startswith("Anonymous:"):
                    current[2] = True  # (a kernel that does not count them leaves the mapping alone)
        if current and current[2]:
            clean.append((current[0], current[1]))
    clean.sort()
    # pages to give back: the dropped tensors' whole pages inside a clean mapping ...
    cut = []
    for a, b in want:
        i = bisect.bisect_right(clean, (a, float("inf"))) - 1
        if i >= 0 and clean[i][0] <= a < clean[i][1]:
            lo, hi = -(-a // page) * page, min(b, clean[i][1]) // page * page
            if hi > lo:
                cut.append((lo, hi))
    # ... less every page a live tensor touches
    keep = _merge((a // page * page, -(-b // page) * page) for a, b in filter(None, map(storage_span, live)))
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for lo, hi in _merge(cut):
        j = max(bisect.bisect_left(keep, (lo, 0)) - 1, 0)  # (the one before may reach into lo)
        while j < len(keep) and keep[j][0] < hi:
            k_lo, k_hi = keep[j]
            if k_hi > lo:
                if k_lo > lo:
                    released += _dontneed(madvise, lo, k_lo)
                lo = max(lo, k_hi)
            j += 1
        if hi > lo:
            released += _dontneed(madvise, lo, hi)
    return released


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``(start, end)`` addresses of a contiguous CPU tensor's bytes (``(0, 0)`` for any other), for
    :func:`release_file_pages` after the tensor is gone."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return (0, 0)
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _merge(ranges):
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _dontneed(madvise, lo: int, hi: int) -> int:
    return hi - lo if madvise(lo, hi - lo, 4) == 0 else 0  # MADV_DONTNEED


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, *, fsync: bool = True, mode: int = 0o666,
                tmp_stem: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``target`` (same suffix, so ``savefig`` and ``torch.save``
    see the format they expect) to write; when the block succeeds it is fsynced and renamed over
    ``target``, so a reader sees the old file or the new one whole. On any failure (a full disk, a
    value that does not serialise, Ctrl-C) the temporary file is removed and ``target`` is left as
    it was. The name is unique per call, so two processes writing one file never share it. The file
    gets ``mode`` less the umask, as ``open`` would give it (``mkstemp`` makes 0600). ``tmp_stem``
    names the temporary file instead of ``target``'s stem (where a watcher reads files by name)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{tmp_stem or target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool = True,
                     keep_other: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``target`` to write into; when the block succeeds it takes
    ``target``'s place, so readers never see a half-written directory.

    On success the files and the directory are fsynced (a crash right after cannot leave an empty
    file under a complete-looking name), their modes are what a plain ``mkdir``/``open`` would give
    (``mkdtemp`` makes 0700 and safetensors writes 0600, which would lock other users out of a shared
    or packaged model), and the parent is fsynced after the rename. An existing ``target`` is replaced
    (``replace=False``: it wins and the new copy is dropped); if the swap fails, the old one is put
    back. On any failure the temporary directory is removed. Temporary names are
    ``.{name}.tmp-*`` (see :func:`remove_leftovers`).

    ``keep_other(name)``: entries of a replaced directory that the new one does not have and for
    which it returns True are moved into the new one after the swap (a user's notes beside a saved
    model survive a save over it, as they would with transformers' ``save_pretrained``); a crash
    while moving leaves them in the hidden ``.{name}.old-*`` directory (a unique name: a later write
    never deletes it), as does an entry that cannot be moved (logged). A symbolic link at ``target``
    is replaced as a link: what it pointed to is left alone."""
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
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")  # (never an earlier one)
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(old) and not os.path.lexists(target):
            old.rename(target)
        raise
    if old is None:
        return
    if old.is_symlink():  # a link was replaced: what it pointed to is not ours to move or delete
        old.unlink()
        return
    left = []
    if keep_other is not None:
        for entry in old.iterdir():
            if keep_other(entry.name) and not os.path.lexists(target / entry.name):
                try:
                    entry.rename(target / entry.name)
                except OSError as e:
                    left.append(f"{entry.name} ({e.strerror or e})")
    if left:  # the save itself succeeded: say where the rest is, delete nothing
        logger.warning("%s is saved; %s could not be moved into it and stay in %s", target, ", ".join(left), old)
    else:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(parent: str | os.PathLike, name_glob: str = "*") -> None:
    """Remove what interrupted :func:`atomic_directory` writes left in ``parent`` (their hidden
    temporary directories, for targets matching ``name_glob``)."""
    for path in Path(parent).glob(f".{name_glob}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _umask_permissions(root: Path) -> None:
    umask = _umask()
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
