"""Shard lists and raw webdataset samples.

A webdataset shard is a tar whose members are named ``<key>.<ext>``; consecutive members with the
same key form one sample, e.g. ``000123.jpg`` + ``000123.txt``. Samples come out *raw*
(``{"__key__", "__url__", ext: bytes}``): nothing is decoded here, so samples can be shuffled, split
across ranks and skipped (on resume) without paying for image decoding.

Damaged shards never stop a reader: a shard that cannot be read at all (missing, not a tar, empty)
yields nothing, and a shard that breaks part way yields the samples before the break; both are
reported to an ``on_error`` callback (default: a warning naming the shard). A tar's end is checked:
Python's ``tarfile`` ends silently when a shard is cut at a header or block boundary, so a shard
whose last header is not the end-of-archive (all-zero) block counts as truncated too.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = ["TRUNCATED", "UNREADABLE", "expand_urls", "iter_raw_samples", "shuffle_buffer"]

logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
# webdataset's base_plus_ext: the key is everything up to the first dot of the file name
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")


UNREADABLE = "unreadable"  # nothing could be read: missing, unreadable, not a tar, empty
TRUNCATED = "truncated"  # it broke part way: the samples before the break were read
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


def _expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b`` -> a000b a001b a002b; ``{x,y}`` -> x y; nested and repeated groups work."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = max(len(lo_s), len(hi_s)) if (lo_s.startswith("0") or hi_s.startswith("0")) else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal "{...}" with neither a range nor a list
        return [head + "{" + body + "}" + x for x in _expand_braces(tail)]
    return [y for opt in options for y in _expand_braces(head + opt + tail)]


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a shard specification into a list of shards.

    Each entry may be a brace pattern (``shards/{000..009}.tar``, ``{a,b}.tar``), a glob
    (``shards/*.tar``), a directory (every ``*.tar`` directly in it, sorted), a local file, or a
    remote url (``pipe:cmd``, ``http(s)://``, ... opened with ``webdataset.gopen``). Order is kept,
    duplicates are removed. Raises ``FileNotFoundError`` naming the pattern that matched nothing.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    out: list[str] = []
    for pattern in urls:
        pattern = os.fspath(pattern)
        if _REMOTE.match(pattern):
            out.extend(_expand_braces(pattern))
            continue
        found: list[str] = []
        items = _expand_braces(os.path.expanduser(pattern))
        missing = [item for item in items if not _GLOB_CHARS.search(item) and not os.path.exists(item)]
        if missing:
            some = (f"; {len(missing)} of the {len(items)} shards of {pattern!r} are missing" if len(items) > 1
                    else "")
            raise FileNotFoundError(f"shard not found: {missing[0]!r}{some}: write them, or give "
                                    "the folder or a pattern that matches the shards there are")
        for item in items:
            if _GLOB_CHARS.search(item):
                found.extend(sorted(p for p in glob.glob(item) if os.path.isfile(p)))
            elif os.path.isdir(item):
                found.extend(sorted(str(p) for p in Path(item).glob("*.tar") if p.is_file()))
            elif os.path.isfile(item):
                found.append(item)
            else:
                raise FileNotFoundError(f"shard not found: {item!r} (from {pattern!r}): not a file or folder")
        if not found:
            raise FileNotFoundError(f"no shards found for {pattern!r}")
        out.extend(found)
    if not out:
        raise FileNotFoundError(f"no shards found for {list(urls)!r}")
    return list(dict.fromkeys(out))


def _open_stream(url: str):
    if _REMOTE.match(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def _warn(url: str, kind: str, reason: str) -> None:
    logger.warning("skipping %s shard %s: %s", kind, url, reason)


def iter_raw_samples(url: str, stats: Counter | None = None,
                     on_error: Callable[[str, str, str], None] | None = _warn) -> Iterator[dict]:
    """Raw samples of one shard, in tar order; never raises for a damaged shard.

    A shard that cannot be read at all yields nothing (``stats["shards_unreadable"]``); one that
    breaks part way, wherever it is cut, yields the samples before the break and drops the partial
    last one (``stats["shards_truncated"]``). Either way ``on_error(url, kind, reason)`` is called
    once, with ``kind`` :data:`UNREADABLE` or :data:`TRUNCATED` and a one-line reason.
    """

    def fail(kind: str, reason: str) -> None:
        if stats is not None:
            stats[f"shards_{kind}"] += 1
        if on_error is not None:
            on_error(url, kind, reason)

    ends: list[Exception] = []  # the header errors that ended the tar (the last one tells how)

    class _Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as e:
                ends.append(e)
                raise

    try:
        stream = _open_stream(url)
    except OSError as e:
        fail(UNREADABLE, f"cannot open it ({e.strerror or e})")
        return
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Info)
        except _READ_ERRORS as e:
            fail(UNREADABLE, f"not a readable tar file ({type(e).__name__}: {e})")
            return
        current: dict | None = None
        reading = None  # the key of the member whose data is being read
        try:
            for member in tar:
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                reading = key
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                reading = None
                if current is None or key != current["__key__"] or ext in current:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if ends and not isinstance(ends[-1], tarfile.EOFHeaderError):
                # tarfile stops without an error at a cut or garbage header; a whole tar ends with zeros
                raise tarfile.ReadError(f"no end-of-archive marker ({ends[-1]})")
        except _READ_ERRORS as e:
            if current is not None and reading is not None and reading != current["__key__"]:
                yield current  # the cut is in the next sample's data: this one is whole
                current = None
            where = f"at sample {(reading or current['__key__'])!r}" if (reading or current) else "before its first sample"
            fail(TRUNCATED, f"damaged {where}: {e} (that sample and the rest of the shard are skipped)")
            return
        if current is not None:
            yield current
    finally:
        try:
            stream.close()
        except OSError:  # e.g. a pipe: command that failed; already reported as a damaged shard
            pass


def shuffle_buffer(items: Iterable, size: int, rng) -> Iterator:
    """Shuffle a stream with a buffer of ``size`` items (``size <= 1`` keeps the order)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf
