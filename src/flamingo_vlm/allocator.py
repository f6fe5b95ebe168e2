"""The memory allocator of the ``flamingo-vlm`` command: tcmalloc where it is installed.

A training step or a decode frees and re-allocates the same large tensors again and again. glibc
malloc hands large freed blocks back to the OS and faults fresh, zeroed pages in for the next step
(or, past its moving mmap threshold, keeps them and fragments); tcmalloc keeps them for reuse. The
measurements are in the README's benchmark section ("Memory allocator"): a CPU training step was
smaller (5-12% of peak memory) and mostly faster (5-10%, within run-to-run noise once) with tcmalloc
on both CPUs we measured, AMD EPYC Zen 4 and AMD Zen 5, and decoding no slower.

An allocator can only be chosen before a process starts, so the command line re-executes itself
once, at start, with the library preloaded (``LD_PRELOAD``), as torch's own CPU launcher
(``python -m torch.backends.xeon.run_cpu``) does. Same process id, arguments and environment;
``torchrun`` keeps tracking its workers. ``scripts/setup.sh`` installs tcmalloc (Debian's
``libtcmalloc-minimal4``) where it can; without it nothing changes.

``FLAMINGO_VLM_ALLOCATOR``: ``auto`` (default: tcmalloc if found), ``system`` (never preload), or
the path of an allocator library to preload. A process that already has an ``LD_PRELOAD`` keeps it
as it is (an allocator, or a sanitizer runtime that must come first).
Code that imports ``flamingo_vlm`` in its own process keeps that process's allocator:
:func:`preload_hint` says what to prepend to the command.

Standard library only: this runs before torch is imported.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

__all__ = ["ENV", "KNOWN", "find_tcmalloc", "launched_as", "preload_env", "preload_hint", "preloaded",
           "reexec_with_allocator", "start"]

ENV = "FLAMINGO_VLM_ALLOCATOR"
_DONE = "_FLAMINGO_VLM_ALLOCATOR_SET"  # set in the re-executed process: never re-execute twice
KNOWN = ("tcmalloc", "jemalloc", "mimalloc")
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4", "/opt/homebrew/lib/libtcmalloc_minimal.dylib",
)


def preloaded(environ=None) -> str | None:
    """The allocator named in ``LD_PRELOAD`` (tcmalloc, jemalloc, mimalloc), or None."""
    pre = (environ if environ is not None else os.environ).get("LD_PRELOAD", "")
    return next((name for name in KNOWN if name in pre), None)


def preload_env(lib: str) -> dict[str, str]:
    """The environment variables that preload ``lib``. tcmalloc reports every allocation over 1 GB
    on stderr ("large alloc ..."), which a model's weights are: the report threshold is raised."""
    return {"LD_PRELOAD": lib, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc library, or None."""
    for path in TCMALLOC_PATHS:
        if Path(path).is_file():
            return path
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found and Path(found).is_absolute() and Path(found).is_file():
            return found
    return None


def _choice(environ) -> str | None:
    """The library to preload, or None (already preloaded, asked not to, or none found)."""
    mode = environ.get(ENV, "auto").strip() or "auto"
    if mode.lower() in ("auto", "system"):
        mode = mode.lower()
    # a process that already preloads anything keeps its preloads as they are (an allocator, or a
    # sanitizer runtime that must come first)
    if mode == "system" or environ.get(_DONE) or environ.get("LD_PRELOAD") or sys.platform != "linux":
        return None
    if mode == "auto":
        return find_tcmalloc()
    if not Path(mode).is_file():
        raise ValueError(f"{ENV}={mode!r}: no such file; use auto, system or the path of an allocator library")
    return mode


def launched_as(module: str, orig_argv=None) -> bool:
    """Whether this process was started as the ``flamingo-vlm`` command or ``python -m module``
    (and not, say, a test running that module's ``__main__`` inside its own process)."""
    args = iter(list((sys.orig_argv if orig_argv is None else orig_argv)[1:]))
    for arg in args:  # the interpreter's options, up to what it runs
        if arg == "-m":
            return next(args, None) == module
        if arg == "-c":
            return False
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # options that take a value
            next(args, None)
        elif not arg.startswith("-"):  # a script
            return Path(arg).name in ("flamingo-vlm", "flamingo-vlm.exe")
    return False


def reexec_with_allocator(entry: str | None = None, environ=None, execve=os.execve) -> None:
    """Re-execute this Python process with the allocator preloaded, when there is one to preload;
    otherwise return. Call first thing in a command's entry point, before torch is imported.
    ``entry``: the module a command runs as (``flamingo_vlm``, ``flamingo_vlm.train``, ...): only
    a process started as that command re-executes (None: this process, whatever it runs)."""
    if entry is not None and not launched_as(entry):
        return
    environ = dict(os.environ if environ is None else environ)
    lib = _choice(environ)
    if lib is None:
        return
    environ = {**environ, **preload_env(lib), _DONE: lib}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # could not re-execute (no interpreter path, ...): go on with the system's allocator
        return


def start(entry: str) -> None:
    """For a command's entry point: :func:`reexec_with_allocator`, a bad ``FLAMINGO_VLM_ALLOCATOR``
    being a one-line error (exit 2)."""
    try:
        reexec_with_allocator(entry)
    except ValueError as e:
        print(f"flamingo-vlm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def preload_hint() -> str:
    """What to prepend to a command that imports flamingo_vlm, for the allocator the CLI would use
    (empty when it already runs with one, or none is installed)."""
    try:
        lib = _choice(os.environ)
    except ValueError:
        return ""
    return " ".join(f"{k}={v}" for k, v in preload_env(lib).items()) if lib else ""
