"""Shard lists and raw webdataset samples.

A webdataset shard is a tar whose members are named ``<key>.<ext>``; consecutive members with the
same key form one sample, e.g. ``000123.jpg`` + ``000123.txt``. Samples come out *raw*
(``{"__key__", "__url__", ext: bytes}``): nothing is decoded here, so samples can be shuffled, split
across ranks and skipped (on resume) without paying for image decoding.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["ShardError", "expand_urls", "iter_raw_samples", "shuffle_buffer"]

logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_REMOTE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
# webdataset's base_plus_ext: the key is everything up to the first dot of the file name
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]*)$")


class ShardError(OSError):
    """A shard could not be opened or is not a tar file."""


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
        for item in _expand_braces(os.path.expanduser(pattern)):
            if _GLOB_CHARS.search(item):
                found.extend(sorted(p for p in glob.glob(item) if os.path.isfile(p)))
            elif os.path.isdir(item):
                found.extend(sorted(str(p) for p in Path(item).glob("*.tar") if p.is_file()))
            elif os.path.isfile(item):
                found.append(item)
            else:
                raise FileNotFoundError(f"shard not found: {item!r} (from {pattern!r})")
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


def iter_raw_samples(url: str, stats: Counter | None = None) -> Iterator[dict]:
    """Raw samples of one shard, in tar order.

    A shard that cannot be opened raises :class:`ShardError` naming it. A shard that breaks part way
    (truncated download) ends early: ``stats["shard_read_errors"]`` is incremented and the partial
    last sample is dropped, so a run never crashes on it.
    """
    try:
        stream = _open_stream(url)
    except OSError as e:
        raise ShardError(f"cannot open shard {url!r}: {e}") from e
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"cannot open shard {url!r}: not a readable tar file ({e})") from e
        current: dict | None = None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if current is None or key != current["__key__"] or ext in current:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
        except (tarfile.TarError, OSError, EOFError) as e:
            if stats is not None:
                stats["shard_read_errors"] += 1
            where = f"sample {current['__key__']!r}" if current else "its start"
            logger.warning("shard %s is damaged at %s: %s (rest of the shard skipped)", url, where, e)
            return
        if current is not None:
            yield current
    finally:
        stream.close()


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
