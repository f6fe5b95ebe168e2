"""Error types the command line maps to exit codes (see :mod:`flamingo_vlm.cli`), kept below the
modules that raise them so that nothing imports the CLI; :func:`one_line` and :func:`report_errors`,
how every entry point prints an error; and :func:`plain_help`, which every parser
built from docstrings (``flamingo-vlm``, ``python -m flamingo_vlm.train``) shares."""

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input: flags that contradict each other or values out of range (exit code 2)."""


def one_line(e: BaseException | str) -> str:
    """An error's message as the command line prints it: one line, at most 2000 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def report_errors(name: str, call: Callable[[], int], user_errors: Callable[[], tuple[type[BaseException], ...]],
                  prefix: str = "") -> int:
    """``call()`` as an entry point (``name``: how it signs its lines) runs it: Ctrl-C is one line and
    exit 130; ``SystemExit("message")`` (``prefix`` removed from it) and ``user_errors`` (bad input) one
    line ``{name}: error: ...`` and exit 1 (:class:`UsageError`: 2); anything else is a bug and keeps
    its traceback, as every error does with ``FLAMINGO_VLM_TRACEBACK=1``. ``user_errors`` is called only
    once an error is raised: naming the types imports the training package (torch and transformers),
    seconds that ``--help`` and usage errors need not wait for."""
    try:
        return call()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # subcommands that stop with a message (SystemExit("..."))
        if not isinstance(e.code, str):
            raise
        print(f"{name}: error: {one_line(e.code.removeprefix(prefix))}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("FLAMINGO_VLM_TRACEBACK") or not (isinstance(e, UsageError) or isinstance(e, user_errors())):
            raise
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser``'s descriptions, taken from docstrings, without their reST markup (``x``,
    :class:`X`) in ``--help``, for it and its subcommands (and theirs: ``data write``, ...)."""

    def plain(text: str | None) -> str | None:
        return text and re.sub(r"``([^`]*)``", r"\1", re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text))

    parser.description = plain(parser.description)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain(choice.help)
            for sub in set(action.choices.values()):
                plain_help(sub)
    return parser


def why_not_fetched(e: BaseException, local_only: bool, cache_dir=None) -> str:
    """Why a Hub download failed, for a message a command line prints too. Where the download asked
    the cache only (``local_only``: the loaders' offline answer, or ``HF_HUB_OFFLINE``), huggingface_hub's
    "not cached" error ends in advice for Python callers ("pass 'local_files_only=False'"), which says
    nothing to someone at ``flamingo-vlm generate``: it is said plainly, naming the cache. Other failures
    (a network error, an unknown repo) keep their own text."""
    from huggingface_hub import constants

    if type(e).__name__ == "LocalEntryNotFoundError" and (local_only or constants.HF_HUB_OFFLINE):
        return (f"not in the local Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}), and the Hub was not "
                "contacted (offline, or asked for local files only)")
    return f"{type(e).__name__}: {e}"


def missing_local_path(name: str) -> str | None:
    """For an error about a model that could not be fetched from the Hub either, where ``name`` reads as a
    local path with a typo: ``runs/nothere`` beside a ``runs/`` folder (also a valid Hub repo id, so it
    was looked up on the Hub, and the error said only that the Hub could not give it), a clause naming
    what that folder holds; ``None`` where the path exists or no folder of it is here."""
    path = Path(os.path.expanduser(str(name)))
    if path.exists():
        return None
    parent = next((p for p in path.parents if str(p) not in ("", ".") and p.is_dir()), None)
    if parent is None:
        return None
    try:
        entries = sorted(e.name for e in parent.iterdir() if not e.name.startswith("."))
    except OSError:
        return None
    held = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    return f"there is no {path} here ({parent}/ holds: {held})"


def at_least(least: float, *, integer: bool = True, strict: bool = False):
    """An argparse type: a whole number (``integer``) or a finite number, ``>= least`` (``> least`` if
    ``strict``). A value out of range is a usage error (exit code 2) naming the flag, at once: the
    library's own check said "samples_per_shard must be >= 1" with exit code 1 (and ``--n-train -1``
    wrote a benchmark without a training split), and a bad serve limit gave a server that refused
    every request."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < least or (strict and value == least):
            kind = "a whole number" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{text!r}: give {kind} {'>' if strict else '>='} {least:g}")
        return value

    parse.__name__ = f"{'int' if integer else 'number'} {'>' if strict else '>='} {least:g}"
    return parse


def check_device(text: str | None, flag: str = "--device") -> None:
    """A device argument that names a device this machine has (a :class:`UsageError` otherwise, before
    anything loads; a missing GPU ended in torch's "module 'torch._C' has no attribute
    '_cuda_setDevice'" traceback). Imports torch: call it from a command's handler."""
    if text is None or text.strip().lower() == "cpu":  # (every machine has one: no torch import for it)
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {text}: no CUDA GPU is available here; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {text}: there are only {torch.cuda.device_count()} GPU(s)")
