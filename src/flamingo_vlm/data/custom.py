"""Your own data -> webdataset shards that :class:`~flamingo_vlm.data.ShardDataset` trains on.

Sources
-------
* a JSONL file, one document per line, in either form (image paths relative to the JSONL's folder,
  or absolute)::

      {"items": [{"image": "imgs/a.png"}, {"text": "A cat."}, {"image": "imgs/b.png"}, {"text": "A dog."}]}
      {"text": "Intro. <image>A cat. <image>A dog.", "images": ["imgs/a.png", "imgs/b.png"]}

  or an MMC4 document as MMC4's release has them (``text_list``, ``image_info`` with each image's
  ``image_name`` and ``matched_text_index``, ``similarity_matrix``), its images downloaded beside the
  JSONL under their ``image_name`` (or an ``image_path`` of their own); its similarities are kept,
  so training places the images as on MMC4's own shards, and images that failed to download are
  left out of their document (counted).

* a folder of images (searched recursively) each with a same-named ``.txt`` caption
  (``cat.png`` + ``cat.txt``).

Output
------
* ``kind="pairs"``: LAION-style samples ``<key>.jpg|png|webp`` + ``<key>.txt`` (one image followed
  by its caption). Other image formats are re-encoded to PNG.
* ``kind="interleaved"``: MMC4-style ``<key>.json`` documents: ``text_list`` (the text items),
  ``image_info`` (``image_name``, ``matched_text_index``, ``matched_sim``, ``image_base64``) and a
  ``similarity_matrix`` (images x sentences) of 1.0 on each image's matched sentence (the text
  right after it; an empty sentence when another image or the end follows) and 0.0 elsewhere.
* ``kind="auto"``: pairs when every document is one image followed by text, interleaved otherwise.

Shards are named ``<kind>-000000.tar`` ...; each is written under a temporary name then renamed, so
a reader never sees a half-written shard.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import at_least
from ..prompt_format import MEDIA_TOKEN
from .preprocess import IMAGE_EXTS, clean_text, decode_image, pair_text, plan_interleaved
from .shards import expand_urls, iter_raw_samples

__all__ = ["add_data_subcommand", "inspect_shards", "read_source", "write_shards"]

logger = logging.getLogger(__name__)

# The image files a folder source is read for (kept as they are if JPEG, PNG or WebP, else re-encoded);
# preprocess.IMAGE_EXTS are the image keys a shard's samples may have.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Text files in an image folder that are not captions (not counted as captions without an image)
_NOT_CAPTIONS = {"readme", "license", "licence", "notice", "changelog", "attribution", "credits"}
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SHARD_NAME = re.compile(r"^(pairs|interleaved)-\d{6}\.tar$")
_LIST_OK_SHARDS = 20  # `data inspect` lists the ok shards one by one up to this many


@dataclass
class Document:
    """A source document: ``("text", str)`` and ``("image", Path)`` items in reading order."""

    items: list[tuple[str, object]]
    origin: str  # "file.jsonl:line" or the image path, for messages
    # an MMC4 record: its text_list, similarity_matrix and per image (path, matched_text_index, matched_sim)
    mmc4: dict | None = None

    @property
    def n_images(self) -> int:
        return sum(kind == "image" for kind, _ in self.items)

    def is_pair(self) -> bool:
        """One image first, then text (an MMC4 document stays a document)."""
        return (
            self.mmc4 is None
            and self.n_images == 1
            and self.items[0][0] == "image"
            and any(kind == "text" and str(v).strip() for kind, v in self.items[1:])
        )


class SourceError(ValueError):
    pass


# -- reading sources --------------------------------------------------------------------------------
def _parse_mmc4(rec: dict, base: Path, origin: str, stats: Counter) -> Document:
    """An MMC4 record: images by ``image_path`` or ``image_name`` relative to ``base``; those not
    there (MMC4's images are downloaded separately, and some always fail) are left out and counted."""
    texts, infos = rec["text_list"], rec["image_info"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts) or not isinstance(infos, list):
        raise SourceError(f"{origin}: an MMC4 record needs 'text_list' (strings) and 'image_info' (a list)")
    sim = rec.get("similarity_matrix")
    if sim is not None:
        try:
            sim = np.asarray(sim, dtype=np.float64)
        except (TypeError, ValueError):  # (ragged rows, or not numbers)
            raise SourceError(f"{origin}: similarity_matrix must be rows of numbers, one row per image") from None
        if sim.shape != (len(infos), len(texts)):
            raise SourceError(f"{origin}: similarity_matrix is {sim.shape}, expected (images {len(infos)}, "
                              f"sentences {len(texts)})")
    images, rows = [], []
    for i, info in enumerate(infos):
        name = info.get("image_path") or info.get("image_name") if isinstance(info, dict) else None
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        score = info.get("matched_sim", 1.0) if isinstance(info, dict) else None
        if (not isinstance(name, str) or not isinstance(index, int) or not 0 <= index < len(texts)
                or isinstance(score, bool) or not isinstance(score, (int, float))):
            raise SourceError(f"{origin}: image_info[{i}] needs 'image_name', a 'matched_text_index' in "
                              f"0..{len(texts) - 1} and a numeric 'matched_sim', got {info!r}")
        path = base / name
        if not path.is_file():
            stats["missing_images"] += 1
            continue
        images.append((path, index, float(score)))
        rows.append(sim[i] if sim is not None else [1.0 if j == index else 0.0 for j in range(len(texts))])
    by_text: dict[int, list[Path]] = {}  # (reading order: each image before its matched sentence)
    for path, index, _ in images:
        by_text.setdefault(index, []).append(path)
    items: list[tuple[str, object]] = []
    for j, text in enumerate(texts):
        items += [("image", path) for path in by_text.get(j, [])]
        items.append(("text", text))
    mmc4 = {"text_list": texts, "images": images, "similarity_matrix": [list(map(float, r)) for r in rows]}
    return Document(items, origin, mmc4)


def _parse_record(rec, base: Path, origin: str, stats: Counter | None = None) -> Document:
    if not isinstance(rec, dict):
        raise SourceError(f"{origin}: expected a JSON object, got {type(rec).__name__}")
    items: list[tuple[str, object]] = []
    if "text_list" in rec and "image_info" in rec:
        return _parse_mmc4(rec, base, origin, stats if stats is not None else Counter())
    if "items" in rec:
        if not isinstance(rec["items"], list):
            raise SourceError(f"{origin}: 'items' must be a list")
        for it in rec["items"]:
            if isinstance(it, dict) and isinstance(it.get("image"), str) and "text" not in it:
                items.append(("image", base / it["image"]))
            elif isinstance(it, dict) and isinstance(it.get("text"), str) and "image" not in it:
                items.append(("text", it["text"]))
            else:
                raise SourceError(f"{origin}: each item must be {{'image': path}} or {{'text': str}}, got {it!r}")
    elif "text" in rec:
        text, images = rec["text"], rec.get("images", [])
        if not isinstance(text, str) or not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise SourceError(f"{origin}: 'text' must be a string and 'images' a list of paths")
        parts = text.split(MEDIA_TOKEN)
        if len(parts) - 1 != len(images):
            raise SourceError(f"{origin}: {len(parts) - 1} {MEDIA_TOKEN} marker(s) but {len(images)} image(s)")
        if parts[0].strip():
            items.append(("text", parts[0]))
        for path, part in zip(images, parts[1:]):
            items.append(("image", base / path))
            if part.strip():
                items.append(("text", part))
    else:
        raise SourceError(f"{origin}: expected an 'items' list, 'text' (+ 'images'), or an MMC4 record "
                          "('text_list', 'image_info')")
    items = [(k, clean_text(v).strip()) if k == "text" else (k, v) for k, v in items]
    items = [(k, v) for k, v in items if k == "image" or v]
    if not items:
        raise SourceError(f"{origin}: empty document")
    return Document(items, origin)


def read_source(source: str | os.PathLike, stats: Counter | None = None, strict: bool = False) -> list[Document]:
    """Parse a JSONL file or an image/caption folder into documents (images are not read yet)."""
    stats = stats if stats is not None else Counter()
    source = Path(source)
    docs: list[Document] = []
    if source.is_file():
        if source.suffix.lower() in IMAGE_SUFFIXES:  # (it was read as JSONL: "'utf-8' codec can't decode byte 0x89")
            raise SourceError(f"{source} is an image: give a .jsonl file (one JSON document per line) or the "
                              "folder of images with a .txt caption beside each")
        try:  # (line by line: an MMC4-sized file is not held whole)
            with open(source, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    origin = f"{source}:{lineno}"
                    try:
                        missing = stats["missing_images"]
                        docs.append(_parse_record(json.loads(line), source.parent, origin, stats))
                        if strict and stats["missing_images"] > missing:
                            raise SourceError(f"{origin}: {stats['missing_images'] - missing} of its images are not "
                                              f"under {source.parent} (by image_name): download them there, or "
                                              "drop --strict to leave them out")
                    except (ValueError, SourceError) as e:
                        if strict:
                            raise SourceError(str(e) if isinstance(e, SourceError) else f"{origin}: bad JSON ({e})") from e
                        stats["bad_records"] += 1
                        logger.warning("skipping %s", e if isinstance(e, SourceError) else f"{origin}: bad JSON ({e})")
        except UnicodeDecodeError as e:  # (a UnicodeDecodeError is a ValueError: raised by the read, not json)
            raise SourceError(f"{source} is not a UTF-8 text file ({e.reason}): give a .jsonl file (one JSON "
                              "document per line) or a folder of images with .txt captions") from None
    elif source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for path in found:
            cap = path.with_suffix(".txt")
            if not cap.is_file():
                if strict:
                    raise SourceError(f"{path}: no caption file {cap.name}")
                stats["missing_caption"] += 1
                logger.warning("skipping %s: no caption file %s beside it", path, cap.name)
                continue
            text = clean_text(cap.read_text(encoding="utf-8", errors="replace")).strip()
            if not text:
                stats["empty_caption"] += 1
                logger.warning("skipping %s: its caption file %s is empty", path, cap.name)
                continue
            docs.append(Document([("image", path), ("text", text)], str(path)))
        # a caption whose image has another name or an unsupported format was left out without a word
        stems = {path.with_suffix("") for path in found}
        orphans = sorted(t for t in source.rglob("*.txt") if t.is_file() and t.with_suffix("") not in stems
                         and t.stem.lower() not in _NOT_CAPTIONS)
        if orphans and strict:
            raise SourceError(f"{orphans[0]}: a caption with no image of the same name beside it")
        if orphans:
            stats["caption_without_image"] += len(orphans)
            logger.warning("skipping %d caption file(s) with no image of the same name beside them (%s%s; images: %s)",
                           len(orphans), orphans[0], ", ..." if len(orphans) > 1 else "",
                           ", ".join(sorted(IMAGE_SUFFIXES)))
    else:
        raise FileNotFoundError(f"data source not found: {source} (expected a .jsonl file or a folder of images)")
    stats["documents"] += len(docs)
    return docs


# -- encoding -----------------------------------------------------------------------------------------
def _image_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and webdataset extension; formats outside jpg/png/webp are re-encoded as PNG.
    Raises ``ValueError`` if the file is missing or not a decodable image."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    try:
        image = decode_image(data)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
    ext = _KEEP_FORMATS.get(fmt or "")
    if ext is None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    return data, ext


def _pair_sample(doc: Document, key: str) -> dict:
    data, ext = _image_bytes(doc.items[0][1])
    caption = " ".join(str(v) for k, v in doc.items[1:] if k == "text")
    return {"__key__": key, ext: data, "txt": caption.encode("utf-8")}


def _interleaved_sample(doc: Document, key: str) -> dict:
    """An MMC4-format ``json`` sample: an MMC4 record's own sentences and similarities, else each image
    matched (similarity 1) to the text right after it (an empty sentence when another image or the end
    follows)."""
    if doc.mmc4 is not None:
        sentences, images, sim = doc.mmc4["text_list"], doc.mmc4["images"], doc.mmc4["similarity_matrix"]
    else:
        sentences, images = [], []
        items, i = doc.items, 0
        while i < len(items):
            kind, value = items[i]
            if kind == "text":
                sentences.append(str(value))
                i += 1
                continue
            if i + 1 < len(items) and items[i + 1][0] == "text":
                sentences.append(str(items[i + 1][1]))
                i += 2
            else:
                sentences.append("")
                i += 1
            images.append((Path(value), len(sentences) - 1, 1.0))
        sim = [[1.0 if j == index else 0.0 for j in range(len(sentences))] for _, index, _ in images]
    info = [{"image_name": path.name, "matched_text_index": index, "matched_sim": score,
             "image_base64": base64.b64encode(_image_bytes(path)[0]).decode("ascii")} for path, index, score in images]
    doc_json = {"text_list": sentences, "image_info": info, "similarity_matrix": sim}
    return {"__key__": key, "json": json.dumps(doc_json, ensure_ascii=False).encode("utf-8")}


# -- writing ------------------------------------------------------------------------------------------
def write_shards(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "auto",
    samples_per_shard: int = 1000,
    *,
    overwrite: bool = False,
    strict: bool = False,
    stats: Counter | None = None,
    progress: bool = False,
) -> list[Path]:
    """Write ``source`` (JSONL file or image/caption folder) as webdataset shards in ``out_dir``.

    Documents whose images are missing or undecodable are skipped and counted in ``stats``
    (``strict=True`` raises instead). ``out_dir`` must not already hold ``*.tar`` files unless
    ``overwrite`` (which removes the earlier ``pairs-*.tar``/``interleaved-*.tar`` shards).
    ``progress``: a tqdm bar of the documents written (on stderr).
    Returns the shard paths.
    """
    if kind not in ("auto", "pairs", "interleaved"):
        raise ValueError(f"kind must be 'auto', 'pairs' or 'interleaved', got {kind!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    import webdataset as wds

    stats = stats if stats is not None else Counter()
    docs = read_source(source, stats, strict=strict)
    if not docs:
        raise ValueError(f"no documents found in {source}")
    if strict and (imageless := next((d for d in docs if d.n_images == 0), None)):  # (before any shard is written)
        raise SourceError(f"{imageless.origin}: a document without an image")
    if kind == "auto":
        kind = "pairs" if all(d.is_pair() for d in docs) else "interleaved"
    elif kind == "pairs":
        bad = [d for d in docs if not d.is_pair()]
        if bad:
            raise SourceError(
                f"{len(bad)} document(s) are not one image followed by a caption (first: {bad[0].origin}); "
                "write them with --kind interleaved (kind='interleaved')"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar"))
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds {len(existing)} .tar file(s); pass --overwrite (overwrite=True) "
                                  "to replace them")
        for p in existing:
            if _SHARD_NAME.match(p.name):
                p.unlink()

    make = _pair_sample if kind == "pairs" else _interleaved_sample
    paths: list[Path] = []
    writer = tmp = f = None
    count = 0

    def close():
        nonlocal writer, tmp, f
        if writer is not None:
            writer.close()
            f.close()
            final = tmp.with_name(tmp.name[: -len(".tmp")])
            os.replace(tmp, final)
            paths.append(final)
            writer = tmp = f = None

    rows = docs
    if progress:  # reading and checking every image takes minutes for a large folder
        from ..progress import progress as tqdm

        rows = tqdm(docs, desc="write", unit="doc")
    try:
        for doc in rows:
            if doc.n_images == 0:  # (written, it was a sample every reader skips: `data inspect` said corrupt)
                stats["no_image"] += 1
                logger.warning("skipping %s: a document without an image%s", doc.origin,
                               " (none of its MMC4 images was found)" if doc.mmc4 is not None else "")
                continue
            try:
                sample = make(doc, f"{stats['written']:09d}")
            except ValueError as e:
                if strict:
                    raise SourceError(f"{doc.origin}: {e}") from e
                stats["bad_images"] += 1
                logger.warning("skipping %s: %s", doc.origin, e)
                continue
            if writer is None:
                tmp = out / f"{kind}-{len(paths):06d}.tar.tmp"
                f = open(tmp, "wb")
                writer = wds.TarWriter(f, encoder=False, mtime=0)
                count = 0
            writer.write(sample)
            stats["written"] += 1
            stats["images"] += doc.n_images
            count += 1
            if count >= samples_per_shard:
                close()
        close()
    finally:
        if rows is not docs:
            rows.close()
        if writer is not None:  # an exception left a shard half-written
            writer.close()
            f.close()
            tmp.unlink(missing_ok=True)
    stats["shards"] = len(paths)
    return paths


# -- inspecting ---------------------------------------------------------------------------------------
def _describe(raw: dict, threshold: float) -> tuple[str, str, list[tuple[int, int]], int]:
    """(kind, text, image sizes, corrupt images) of one raw sample; raises ValueError if corrupt."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is not None and "txt" in raw:  # a pair (LAION shards also carry a metadata json)
        image = decode_image(raw[ext])
        return "pairs", pair_text(clean_text(raw["txt"].decode("utf-8"))), [image.size], 0
    if "json" in raw:
        doc = json.loads(raw["json"])
        sentences, info, sim = doc["text_list"], doc["image_info"], doc["similarity_matrix"]
        sim = np.asarray(sim, dtype=np.float64)
        if sim.shape != (len(info), len(sentences)):
            raise ValueError(f"similarity_matrix shape {sim.shape} != ({len(info)}, {len(sentences)})")
        sizes, available, bad = [], [], 0
        for im in info:
            try:
                image = decode_image(base64.b64decode(im["image_base64"]))
                sizes.append(image.size)
                available.append(True)
            except (ValueError, KeyError, TypeError):
                bad += 1
                available.append(False)
        plan = plan_interleaved([clean_text(s) for s in sentences], sim, available,
                                threshold=threshold, max_images=len(info) or 1)
        return "interleaved", plan.text, sizes, bad
    raise ValueError(f"neither a pair (image + txt) nor a json document: {sorted(k for k in raw if k[0] != '_')}")


def inspect_shards(urls: str | Iterable[str], n: int = 3, *, similarity_threshold: float = 0.24) -> dict:
    """Read every sample of the shards (decoding all images) and summarise them.

    Returns ``{"shards", "samples", "kinds", "images", "images_per_sample", "corrupt",
    "images_corrupt", "shard_read_errors", "files", "examples"}``; ``files`` holds one entry per
    shard, ``{"shard", "status": "ok" | "unreadable" | "truncated" | "missing", "samples", "error"}``
    (``shard_read_errors`` counts the shards that are not ok: they never stop the summary; a path or
    pattern of ``urls`` that names no shard is one ``missing`` entry, unless none names any: then
    ``FileNotFoundError``, as for training);
    ``examples`` holds the first ``n`` samples' Flamingo text (``<image>`` markers, without eos;
    interleaved documents after matching with ``similarity_threshold``) and image sizes.
    """
    shards, files = _shards_and_missing(urls)
    read_stats: Counter = Counter()
    kinds: Counter = Counter()
    per_sample: Counter = Counter()
    examples: list[dict] = []
    samples = images = corrupt = images_corrupt = 0
    for url in shards:
        problem: list[tuple[str, str]] = []
        entry = {"shard": url, "status": "ok", "samples": 0, "error": None}
        files.append(entry)
        for raw in iter_raw_samples(url, read_stats, lambda _url, kind, reason: problem.append((kind, reason))):
            entry["samples"] += 1
            samples += 1
            try:
                kind, text, sizes, bad = _describe(raw, similarity_threshold)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                corrupt += 1
                logger.info("corrupt sample %s in %s: %s", raw.get("__key__"), url, e)
                continue
            kinds[kind] += 1
            images += len(sizes)
            images_corrupt += bad
            per_sample[len(sizes)] += 1
            if len(examples) < n:
                examples.append({"shard": url, "key": raw["__key__"], "kind": kind, "text": text,
                                 "images": len(sizes), "image_sizes": [list(s) for s in sizes]})
        if problem:
            entry["status"], entry["error"] = problem[0]
    return {
        "shards": len(files),
        "samples": samples,
        "kinds": dict(kinds),
        "images": images,
        "images_per_sample": dict(sorted(per_sample.items())),
        "corrupt": corrupt,
        "images_corrupt": images_corrupt,
        "shard_read_errors": sum(f["status"] != "ok" for f in files),
        "files": files,
        "examples": examples,
    }


def _shards_and_missing(urls) -> tuple[list[str], list[dict]]:
    """The shards ``urls`` names (each entry expanded as :func:`expand_urls` does), and a ``missing``
    file entry for each entry that names none; ``FileNotFoundError`` where no entry names a shard."""
    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards: dict[str, None] = {}  # (ordered, without duplicates)
    missing: list[dict] = []
    for spec in specs:
        try:
            shards.update(dict.fromkeys(expand_urls(spec)))
        except FileNotFoundError as e:
            missing.append({"shard": os.fspath(spec), "status": "missing", "samples": 0, "error": str(e)})
    if not shards:
        expand_urls(specs)  # raises, naming what matched nothing
    return list(shards), missing


# -- command line -------------------------------------------------------------------------------------
SKIPPED = {"bad_records": "bad record(s)", "missing_caption": "image(s) without a caption file",
           "empty_caption": "image(s) with an empty caption", "caption_without_image": "caption(s) without an image",
           "bad_images": "unreadable image(s)", "no_image": "document(s) without an image",
           "missing_images": "image(s) of MMC4 records not found (left out of their documents)"}
# (what `data write` counts, as it says them)


def _cmd_write(args: argparse.Namespace) -> int:
    stats: Counter = Counter()
    paths = write_shards(args.source, args.out_dir, kind=args.kind, samples_per_shard=args.samples_per_shard,
                         overwrite=args.overwrite, strict=args.strict, stats=stats, progress=sys.stderr.isatty())
    kind = paths[0].name.split("-")[0] if paths else ("" if args.kind == "auto" else args.kind)
    for p in paths:
        print(p)
    skipped = [f"{stats[k]} {what}" for k, what in SKIPPED.items() if stats[k]]
    print(f"wrote {stats['written']} {kind + ' ' if kind else ''}sample(s) with {stats['images']} image(s) in {len(paths)} shard(s)"
          + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    if not stats["written"]:
        print(f"flamingo-vlm data write: error: no sample of {args.source} could be written (see the skipped "
              "records above)", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    summary = inspect_shards(args.urls, n=args.n, similarity_threshold=args.similarity_threshold)
    usable = summary["samples"] - summary["corrupt"]
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        _print_inspection(summary)
    if not usable:  # exit status 1, so that `data inspect ... && train ...` stops here
        print(f"flamingo-vlm data inspect: error: no usable sample in {summary['shards']} shard(s) "
              f"({summary['shard_read_errors']} unreadable, damaged or missing, {summary['corrupt']} corrupt "
              "sample(s))",
              file=sys.stderr)
        return 1
    return 0


def _print_inspection(summary: dict) -> None:
    print(f"{summary['shards']} shard(s), {summary['samples']} sample(s): {summary['kinds']}")
    print(f"images: {summary['images']} (per sample: {summary['images_per_sample']})")
    print(f"corrupt samples: {summary['corrupt']}, corrupt images: {summary['images_corrupt']}, "
          f"damaged or missing shards: {summary['shard_read_errors']}")
    ok = [f for f in summary["files"] if f["status"] == "ok"]
    for f in summary["files"]:
        if f["status"] != "ok" or len(ok) <= _LIST_OK_SHARDS:
            detail = f"{f['samples']} sample(s)" + (f"; {f['error']}" if f["error"] else "")
            print(f"  {f['status']:<10} {f['shard']}: {detail}")
    if len(ok) > _LIST_OK_SHARDS:
        print(f"  ok         {len(ok)} other shard(s)")
    for ex in summary["examples"]:
        print(f"- [{ex['kind']}] {ex['key']} ({ex['images']} image(s) {ex['image_sizes']}): {ex['text']!r}")


def add_data_subcommand(subparsers, extra: Iterable = ()) -> argparse.ArgumentParser:
    """Register ``data write`` and ``data inspect`` on an argparse subparsers object, then call
    each of ``extra`` on the ``data`` command's own subparsers (the top-level CLI passes
    :func:`flamingo_vlm.synthetic.cli.add_synthetic_subcommands`: ``data synthetic-benchmark``,
    ``synthetic-shards``, ``episodes``, ``icl-episodes``; the synthetic package sits above this one and
    writes through :func:`write_shards`, so this module never imports it).

    The handlers are stored as ``func`` (they take the parsed namespace and return an exit code).
    """
    p = subparsers.add_parser("data", help="write and inspect webdataset training shards; write synthetic data",
                              description="Write webdataset training shards from your own data, and inspect shards; "
                                          "write the synthetic benchmark and training data (drawn scenes).")
    sub = p.add_subparsers(dest="data_command", required=True)

    w = sub.add_parser("write", help="JSONL of interleaved image paths and text (or MMC4 records), or a folder "
                                     "of images + .txt captions -> webdataset shards")
    w.add_argument("source", help="a .jsonl file (documents, or MMC4 records with their images beside it) or a "
                                  "folder of images with same-named .txt captions")
    w.add_argument("out_dir", help="output folder for the shards")
    w.add_argument("--kind", choices=("auto", "pairs", "interleaved"), default="auto",
                   help="write pairs (image + caption, LAION style) or interleaved documents (as MMC4's shards: "
                        "json with the images inside); auto picks pairs when every document is one image "
                        "followed by text")
    w.add_argument("--samples-per-shard", type=at_least(1), default=1000)
    w.add_argument("--overwrite", action="store_true", help="replace shards already in out_dir")
    w.add_argument("--strict", action="store_true", help="fail on a bad record or image instead of skipping it")
    w.set_defaults(func=_cmd_write)

    i = sub.add_parser("inspect", help="summarise shards: counts, images, corrupt samples, example texts")
    i.add_argument("urls", nargs="+", help="shards: paths, globs, brace ranges or folders")
    i.add_argument("-n", type=int, default=3, help="example samples to show")
    i.add_argument("--similarity-threshold", type=float, default=0.24)
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_cmd_inspect)

    for register in extra:
        register(sub)
    return p
