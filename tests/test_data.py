"""Training data: labels, LAION/MMC4 shards, determinism, resume, rank split, custom data, CLI."""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_vlm import FlamingoProcessor, add_flamingo_tokens
from flamingo_vlm.data import (
    DatasetSpec,
    ShardDataset,
    add_data_subcommand,
    build_datasets,
    expand_urls,
    inspect_shards,
    make_labels,
    write_shards,
)
from flamingo_vlm.data.preprocess import plan_interleaved
from flamingo_vlm.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from tiny import tiny_tokenizer

M, E, S, P = 100, 101, 102, 0  # <image>, <|endofchunk|>, eos, pad in the hand-written label tests
X = -100

COLOURS = {
    "red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210), "yellow": (230, 220, 30),
    "cyan": (20, 210, 220), "magenta": (200, 30, 200), "grey": (128, 128, 128), "black": (5, 5, 5),
    "white": (250, 250, 250), "orange": (240, 140, 10), "purple": (110, 30, 160), "brown": (120, 70, 20),
    "pink": (250, 160, 190), "olive": (120, 130, 20), "navy": (10, 20, 100), "teal": (10, 120, 120),
}
NAMES = list(COLOURS)


# -- helpers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor() -> FlamingoProcessor:
    tok = tiny_tokenizer()
    add_flamingo_tokens(tok)
    return FlamingoProcessor(tok, ImageProcessor(image_size=8))


def png(colour: str, size=(12, 10), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> str:
    """Samples are {"__key__": key, ext: bytes | str | dict}."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value)
                if isinstance(value, str):
                    value = value.encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return str(path)


def pair_shards(tmp_path: Path, names: list[str], per_shard: int) -> list[str]:
    urls = []
    for s in range(0, len(names), per_shard):
        chunk = names[s : s + per_shard]
        samples = [{"__key__": f"{s + i:06d}", "png": png(n), "txt": f"a {n} square"} for i, n in enumerate(chunk)]
        urls.append(write_tar(tmp_path / f"pairs-{s // per_shard:03d}.tar", samples))
    return urls


def mmc4_doc(sentences: list[str], colours: list[str], sim) -> dict:
    return {
        "text_list": sentences,
        "image_info": [
            {"image_name": f"{c}.png", "matched_text_index": int(np.argmax(row)), "matched_sim": float(max(row)),
             "image_base64": base64.b64encode(png(c)).decode()}
            for c, row in zip(colours, sim)
        ],
        "similarity_matrix": [list(map(float, row)) for row in sim],
    }


def image_colour(x: torch.Tensor) -> tuple[int, int, int]:
    """Undo the normalisation of a (1, 3, H, W) or (3, H, W) tensor of a solid image."""
    x = x.reshape(3, -1).mean(dim=1)
    rgb = (x * torch.tensor(OPENAI_CLIP_STD) + torch.tensor(OPENAI_CLIP_MEAN)) * 255
    return tuple(int(round(v)) for v in rgb.tolist())


def colour_name(x: torch.Tensor) -> str | None:
    if x.abs().sum() == 0:
        return None  # a zero-padded slot
    rgb = np.array(image_colour(x))
    return min(COLOURS, key=lambda n: np.abs(np.array(COLOURS[n]) - rgb).sum())


def rows(batch) -> list[tuple[int, ...]]:
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def take(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def texts(processor, batch) -> list[str]:
    return [processor.tokenizer.decode(list(r)) for r in rows(batch)]


def check_consistent(processor, batch) -> None:
    """Each row has as many images (non-zero slots) as <image> tokens, right padding, labels in range."""
    ids, mask, vx, labels = batch["input_ids"], batch["attention_mask"], batch["vision_x"], batch["labels"]
    B = ids.shape[0]
    assert vx.ndim == 6 and vx.shape[0] == B and vx.shape[2] == 1
    for b in range(B):
        n_tokens = int((ids[b] == processor.media_token_id).sum())
        n_images = int((vx[b].flatten(1).abs().sum(1) > 0).sum())
        assert n_tokens == n_images
        L = int(mask[b].sum())
        assert mask[b, :L].all() and not mask[b, L:].any()  # right padded
    assert ((labels == X) | (labels == ids)).all()
    assert (labels[ids == processor.media_token_id] == X).all()
    assert (labels[mask == 0] == X).all()


# -- labels -------------------------------------------------------------------------------------------
def _labels(ids, mask, eos=S):
    return make_labels(torch.tensor(ids), torch.tensor(mask), media_token_id=M, eoc_token_id=E, eos_token_id=eos).tolist()


def test_make_labels_rules():
    ids = [[5, M, 6, 7, E, 8, 9, M, 10, E, S, P, P]]
    mask = [[1] * 11 + [0, 0]]
    # before the first image: masked; <image>: masked; eoc: trained; after eoc until next image: masked;
    # final eos: trained; padding: masked
    assert _labels(ids, mask) == [[X, X, 6, 7, E, X, X, X, 10, E, S, X, X]]
    # without an eos id, the final eos falls after the last eoc and is masked
    assert _labels(ids, mask, eos=None) == [[X, X, 6, 7, E, X, X, X, 10, E, X, X, X]]


def test_make_labels_edge_cases():
    ids = [
        [3, 4, 5, 6, E, S],  # no image: nothing trained
        [P, P, M, 3, E, S],  # left padding
        [E, M, 3, E, E, 4, M, 5],  # eoc before the first image, a second eoc in a row
        [M, 3, E, S, S, S],  # pad == eos: padding stays masked through the attention mask
    ]
    mask = [[1] * 6, [0, 0, 1, 1, 1, 1], [1] * 8, [1, 1, 1, 1, 0, 0]]
    width = max(map(len, ids))
    ids = [r + [P] * (width - len(r)) for r in ids]
    mask = [r + [0] * (width - len(r)) for r in mask]
    assert _labels(ids, mask) == [
        [X, X, X, X, X, X, X, X],
        [X, X, X, 3, E, S, X, X],
        [X, X, 3, E, X, X, X, 5],
        [X, 3, E, S, X, X, X, X],
    ]


def _reference_labels(ids, mask, media, eoc, eos):
    """A per-token loop, to check the vectorised version against."""
    out = []
    for row, m in zip(ids.tolist(), mask.tolist()):
        labels, in_chunk, seen = [], False, False
        for t, v in zip(row, m):
            if not v:
                labels.append(X)
                continue
            if t == media:
                in_chunk = seen = True
                labels.append(X)
            elif t == eoc:
                labels.append(t if in_chunk else X)
                in_chunk = False
            elif t == eos and seen:
                labels.append(t)
            else:
                labels.append(t if in_chunk else X)
        out.append(labels)
    return out


def test_make_labels_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 40), generator=g)  # 5=<image>, 6=eoc, 7=eos frequent
    lengths = torch.randint(0, 41, (64,), generator=g)
    mask = (torch.arange(40)[None] < lengths[:, None]).long()
    for eos in (7, None):
        got = make_labels(ids, mask, media_token_id=5, eoc_token_id=6, eos_token_id=eos)
        assert got.tolist() == _reference_labels(ids, mask, 5, 6, eos)


def test_processor_labels_are_the_training_datasets_labels(tmp_path, processor):
    """One set of label rules: FlamingoProcessor(return_labels=True) labels a batch exactly as the
    training data does (text before the first image ignored, eoc and the final eos trained, padding)."""
    docs = [mmc4_doc(["Intro text.", "The green one.", "Some words after.", "The blue one.", "The end."],
                     ["green", "blue"], [[0.1, 0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.9, 0.1]]),
            mmc4_doc(["A red one.", "Two more words."], ["red"], [[0.9, 0.1]])]
    batch = next(iter(interleaved_ds(tmp_path, processor, docs, batch_size=2, similarity_threshold=0.5)))
    samples = [(text, [x[0] for x in batch["vision_x"][b] if x.abs().sum() > 0])
               for b, text in enumerate(texts(processor, batch))]
    assert samples[0][0].startswith("Intro text.<image>")  # text the rules ignore, before the first image
    got = processor(samples, padding_side="right", return_labels=True)
    assert torch.equal(got["input_ids"], batch["input_ids"])
    assert torch.equal(got["labels"], batch["labels"])
    assert (got["labels"] != X).any() and (got["labels"][0, :3] == X).all()


# -- pairs --------------------------------------------------------------------------------------------
def test_pairs_batches(tmp_path, processor):
    names = NAMES[:5]
    urls = pair_shards(tmp_path, names, per_shard=5)
    ds = ShardDataset(DatasetSpec("pairs", urls, batch_size=2, shuffle_buffer=0), processor)
    batches = take(ds, 2)
    eos = processor.tokenizer.eos_token
    seen = []
    for batch in batches:
        check_consistent(processor, batch)
        assert batch["vision_x"].shape[:3] == (2, 1, 1) and batch["vision_x"].shape[3:] == (3, 8, 8)
        for b, text in enumerate(texts(processor, batch)):
            colour = colour_name(batch["vision_x"][b, 0])
            assert text == f"<image>a {colour} square<|endofchunk|>{eos}"
            seen.append(colour)
            n = int(batch["attention_mask"][b].sum())
            ids, labels = batch["input_ids"][b], batch["labels"][b]
            assert labels[0] == X and torch.equal(labels[1:n], ids[1:n])  # caption, eoc and eos trained
            assert (labels[n:] == X).all()
    assert len(set(seen)) == 4 and set(seen) <= set(names)
    assert ds.stats["samples"] == 4 and ds.stats["batches"] == 2


def test_pairs_max_tokens_truncates_and_loses_eos(tmp_path, processor):
    url = write_tar(tmp_path / "p.tar", [{"__key__": "0", "png": png("red"), "txt": "a red car and two dogs and a cat " * 4}])
    ds = ShardDataset(DatasetSpec("pairs", [url], batch_size=1, max_tokens=6), processor)
    batch = next(iter(ds))
    assert batch["input_ids"].shape == (1, 6)
    assert batch["input_ids"][0, 0] == processor.media_token_id
    assert processor.tokenizer.eos_token_id not in batch["input_ids"][0].tolist()


# -- interleaved --------------------------------------------------------------------------------------
def interleaved_ds(tmp_path, processor, docs, **spec_kw) -> ShardDataset:
    url = write_tar(tmp_path / "docs.tar", [{"__key__": f"{i:04d}", "json": d} for i, d in enumerate(docs)])
    spec_kw.setdefault("batch_size", 1)
    spec_kw.setdefault("shuffle_buffer", 0)
    return ShardDataset(DatasetSpec("interleaved", [url], **spec_kw), processor)


def test_interleaved_keeps_image_order_for_non_monotonic_matching(tmp_path, processor):
    # image 0 belongs to the last sentence: OpenFlamingo would emit images in index order (red, green,
    # blue) while the <image> tokens go green, blue, red
    sentences = ["Intro text.", "The green one.", "The blue one.", "The red one."]
    sim = [[0.1, 0.1, 0.1, 0.9], [0.1, 0.8, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]]
    ds = interleaved_ds(tmp_path, processor, [mmc4_doc(sentences, ["red", "green", "blue"], sim)])
    batch = next(iter(ds))
    check_consistent(processor, batch)
    eos = processor.tokenizer.eos_token
    assert texts(processor, batch)[0] == (
        f"Intro text.<image>The green one.<|endofchunk|><image>The blue one.<|endofchunk|>"
        f"<image>The red one.<|endofchunk|>{eos}"
    )
    assert [colour_name(batch["vision_x"][0, t]) for t in range(3)] == ["green", "blue", "red"]
    labels = batch["labels"][0]
    ids = batch["input_ids"][0]
    first_image = int((ids == processor.media_token_id).nonzero()[0])
    assert (labels[: first_image + 1] == X).all()  # nothing before the first image
    assert labels[-1] == processor.tokenizer.eos_token_id  # final eos trained


def test_plan_uses_one_to_one_assignment():
    # argmax would put both images on sentence 0; the assignment gives each its own sentence
    sim = np.array([[0.9, 0.8], [0.85, 0.3]])
    plan = plan_interleaved(["s0", "s1"], sim, [True, True], threshold=0.24, max_images=6)
    assert plan.images == [1, 0] and plan.sentences == [0, 1]
    assert plan.text == "<image>s0<|endofchunk|><image>s1<|endofchunk|>"


def test_interleaved_threshold_and_max_images(tmp_path, processor):
    sentences = [f"Sentence {i}." for i in range(5)]
    # image -> sentence: red->3, green->0, blue->4 (below threshold), yellow->2, cyan->1
    best = {0: 3, 1: 0, 2: 4, 3: 2, 4: 1}
    sim = np.full((5, 5), 0.05)
    for i, s in best.items():
        sim[i, s] = 0.2 if i == 2 else 0.5
    doc = mmc4_doc(sentences, ["red", "green", "blue", "yellow", "cyan"], sim)
    ds = interleaved_ds(tmp_path, processor, [doc], max_images=3)
    batch = next(iter(ds))
    check_consistent(processor, batch)
    # blue is dropped by the threshold; of the rest the first 3 *in text order* stay: green (s0), cyan (s1),
    # yellow (s2); red (s3) goes even though its image index is lowest
    assert [colour_name(batch["vision_x"][0, t]) for t in range(3)] == ["green", "cyan", "yellow"]
    assert texts(processor, batch)[0].count("<image>") == 3
    assert ds.stats["images_below_threshold"] == 1 and ds.stats["images_over_max"] == 1

    ds = interleaved_ds(tmp_path, processor, [doc], similarity_threshold=0.1, max_images=6)
    batch = next(iter(ds))
    assert [colour_name(batch["vision_x"][0, t]) for t in range(5)] == ["green", "cyan", "yellow", "red", "blue"]


def test_interleaved_truncation_keeps_counts_consistent(tmp_path, processor):
    sentences = ["A red car and two dogs and a cat.", "Two small cats in a big car.", "A blue dog.", "A green car."]
    sim = np.eye(4) * 0.9
    colours = ["red", "green", "blue", "yellow"]
    docs = [mmc4_doc(sentences, colours, sim)]
    full = next(iter(interleaved_ds(tmp_path, processor, docs, max_tokens=256)))
    n_full = int(full["attention_mask"].sum())
    ids = full["input_ids"][0, :n_full].tolist()
    image_pos = [i for i, t in enumerate(ids) if t == processor.media_token_id]
    assert len(image_pos) == 4
    for max_tokens in range(image_pos[1], n_full):
        ds = interleaved_ds(tmp_path, processor, docs, max_tokens=max_tokens, batch_size=1)
        batch = next(iter(ds))
        check_consistent(processor, batch)
        row = batch["input_ids"][0]
        assert row.shape[0] <= max_tokens and row[-1] != processor.media_token_id  # no trailing <image>
        n = int((row == processor.media_token_id).sum())
        assert batch["vision_x"].shape[1] == n
        assert [colour_name(batch["vision_x"][0, t]) for t in range(n)] == colours[:n]
        assert ds.stats["images_truncated"] == 4 - n


def test_interleaved_batch_zero_pads_images(tmp_path, processor):
    docs = [
        mmc4_doc(["One.", "Two."], ["red", "green"], np.eye(2)),
        mmc4_doc(["Only one."], ["blue"], [[0.5]]),
    ]
    batch = next(iter(interleaved_ds(tmp_path, processor, docs, batch_size=2)))
    check_consistent(processor, batch)
    assert batch["vision_x"].shape[1] == 2
    assert colour_name(batch["vision_x"][1, 0]) == "blue" and colour_name(batch["vision_x"][1, 1]) is None


def test_interleaved_min_images_and_single_image_prob(tmp_path, processor):
    one = mmc4_doc(["Only one."], ["blue"], [[0.5]])
    two = mmc4_doc(["One.", "Two."], ["red", "green"], np.eye(2))
    ds = interleaved_ds(tmp_path, processor, [one, two, one], min_images=2)
    batch = next(iter(ds))
    assert batch["vision_x"].shape[1] == 2 and ds.stats["skipped_too_few_images"] == 1
    ds = interleaved_ds(tmp_path, processor, [one, one, two], single_image_keep_prob=0.0)
    batch = next(iter(ds))
    assert batch["vision_x"].shape[1] == 2 and ds.stats["skipped_single_image"] == 2
    none = mmc4_doc(["Low."], ["blue"], [[0.1]])
    ds = interleaved_ds(tmp_path, processor, [none, two])
    next(iter(ds))
    assert ds.stats["skipped_no_images"] == 1


# -- corrupt data and errors --------------------------------------------------------------------------
def test_corrupt_samples_are_skipped_and_counted(tmp_path, processor):
    samples = [
        {"__key__": "0", "png": png("red"), "txt": "a red square", "json": {"url": "http://x/0.png"}},  # LAION metadata
        {"__key__": "1", "png": b"\x89PNG not really", "txt": "broken"},
        {"__key__": "2", "txt": "no image"},
        {"__key__": "3", "jpg": png("green", fmt="JPEG")[:40], "txt": "truncated jpeg"},
        {"__key__": "4", "png": png("blue"), "txt": "a blue square"},
    ]
    ds = ShardDataset(DatasetSpec("pairs", [write_tar(tmp_path / "p.tar", samples)], batch_size=2), processor)
    batch = next(iter(ds))
    assert sorted(colour_name(batch["vision_x"][b, 0]) for b in range(2)) == ["blue", "red"]
    assert ds.stats["skipped_corrupt"] == 3 and ds.stats["samples"] == 2
    summary = inspect_shards(str(tmp_path / "p.tar"))
    assert summary["kinds"] == {"pairs": 2} and summary["corrupt"] == 3

    good = mmc4_doc(["One.", "Two."], ["red", "green"], np.eye(2))
    broken_image = mmc4_doc(["One.", "Two."], ["red", "green"], np.eye(2))
    broken_image["image_info"][0]["image_base64"] = base64.b64encode(b"garbage").decode()
    docs = [
        {"__key__": "0", "json": "{not json"},
        {"__key__": "1", "json": {"text_list": ["x"]}},  # missing fields
        {"__key__": "2", "json": {**good, "similarity_matrix": [[1.0]]}},  # wrong shape
        {"__key__": "3", "json": broken_image},
        {"__key__": "4", "json": good},
    ]
    ds = ShardDataset(DatasetSpec("interleaved", [write_tar(tmp_path / "d.tar", docs)], batch_size=2,
                                  shuffle_buffer=0), processor)
    batch = next(iter(ds))
    check_consistent(processor, batch)
    # the document with one bad image keeps its other image (green, matched to "Two.")
    assert texts(processor, batch)[0].startswith("One.<image>Two.")
    assert colour_name(batch["vision_x"][0, 0]) == "green"
    assert ds.stats["skipped_corrupt"] == 3 and ds.stats["images_corrupt"] == 1


def test_min_image_bytes(tmp_path, processor):
    big = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    samples = [{"__key__": "0", "png": png("red"), "txt": "small"}, {"__key__": "1", "png": buf.getvalue(), "txt": "big"}]
    url = write_tar(tmp_path / "p.tar", samples)
    ds = ShardDataset(DatasetSpec("pairs", [url], batch_size=1, min_image_bytes=1000, shuffle_buffer=0), processor)
    assert texts(processor, next(iter(ds)))[0].startswith("<image>big")
    assert ds.stats["skipped_small_image"] == 1
    doc = mmc4_doc(["Small.", "Big."], ["red", "green"], np.eye(2))
    doc["image_info"][1]["image_base64"] = base64.b64encode(buf.getvalue()).decode()
    ds = interleaved_ds(tmp_path, processor, [doc], min_image_bytes=1000)
    assert texts(processor, next(iter(ds)))[0].startswith("Small.<image>Big.<|endofchunk|>")
    assert ds.stats["images_small"] == 1


def test_shard_errors(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="missing-000.tar'; 2 of the 2 shards of .* are missing"):
        ShardDataset(DatasetSpec("pairs", [str(tmp_path / "missing-{000..001}.tar")]), processor)
    (tmp_path / "some-000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"some-001.tar'; 2 of the 3 shards of .*some-\{000..002\}.tar' are"):
        expand_urls(str(tmp_path / "some-{000..002}.tar"))
    with pytest.raises(FileNotFoundError, match=r"^shard not found: '[^']*one.tar': write them"):  # named once
        expand_urls(str(tmp_path / "one.tar"))
    # nothing readable at all: the "no full batch" error names the damaged shard and why
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    ds = ShardDataset(DatasetSpec("pairs", [str(bad)]), processor)
    with pytest.raises(RuntimeError, match=r"no full batch.*1 unreadable shard\(s\): .*bad.tar \(not a readable tar"):
        next(iter(ds))
    # a truncated shard yields what it has and is counted
    urls = pair_shards(tmp_path, NAMES[:6], per_shard=6)
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: 3 * 2048 + 700])  # 3 samples (2 files of 1024 bytes each) and a bit
    ds = ShardDataset(DatasetSpec("pairs", urls, batch_size=3), processor)
    next(iter(ds))
    assert ds.stats["shards_truncated"] == 1 and ds.stats["samples"] == 3
    assert list(ds.problems()["truncated_shards"]) == urls


def _damaged_mix(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Good pair shards mixed with a non-tar, an empty, a vanished and a truncated one."""
    good = pair_shards(tmp_path, NAMES[:12], per_shard=4)  # 3 shards of 4 samples
    garbage, empty, gone = tmp_path / "garbage.tar", tmp_path / "empty.tar", tmp_path / "gone.tar"
    garbage.write_bytes(bytes(range(256)) * 20)
    empty.write_bytes(b"")
    gone.write_bytes(b"")  # expanded as a shard, then deleted before it is read
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(good[2]).read_bytes()[: 5 * 512])  # cut at a header: no end-of-archive marker
    urls = [good[0], str(garbage), good[1], str(empty), str(gone), str(truncated)]
    return urls, {"garbage": str(garbage), "empty": str(empty), "gone": str(gone), "truncated": str(truncated)}


def test_unreadable_shards_are_skipped_counted_and_named(tmp_path, processor, caplog):
    urls, bad = _damaged_mix(tmp_path)
    ds = ShardDataset(DatasetSpec("pairs", urls, batch_size=2, shuffle_buffer=0), processor)
    Path(bad["gone"]).unlink()
    with caplog.at_level("WARNING", logger="flamingo_vlm.data"):
        batches = take(ds, 10)  # 8 or 9 usable samples -> 4 batches per epoch: this reads 2 epochs and more
    assert ds.stats["epochs"] == 2
    colours = [colour_name(b["vision_x"][i, 0]) for b in batches[:4] for i in range(2)]
    assert sorted(colours) == sorted(NAMES[:8])  # the 8 samples of the two good shards, none lost
    problems = ds.problems()
    assert sorted(problems["unreadable_shards"]) == sorted([bad["garbage"], bad["empty"], bad["gone"]])
    assert "not a readable tar file" in problems["unreadable_shards"][bad["garbage"]]
    assert "cannot open" in problems["unreadable_shards"][bad["gone"]]
    assert list(problems["truncated_shards"]) == [bad["truncated"]]
    assert ds.stats["shards_unreadable"] >= 2 * 3 and ds.stats["shards_truncated"] >= 2  # each epoch reads them
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for url in bad.values():  # named in the log, once for the whole run
        assert sum(url in m for m in warned) == 1, (url, warned)


def _tar_layout(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(data start, data end) of each member, and where the end-of-archive block starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        spans = [(m.offset_data, m.offset_data + m.size) for m in tar.getmembers()]
    end = -(-spans[-1][1] // 512) * 512
    return spans, end


def test_truncated_tars_are_counted_wherever_they_are_cut(tmp_path):
    from flamingo_vlm.data.shards import iter_raw_samples

    samples = [{"__key__": f"{i:04d}", "png": png(n), "txt": f"a {n} square"} for i, n in enumerate(NAMES[:4])]
    full = Path(write_tar(tmp_path / "full.tar", samples)).read_bytes()
    spans, end = _tar_layout(full)
    whole = list(iter_raw_samples(str(tmp_path / "full.tar")))
    assert [s["__key__"] for s in whole] == [s["__key__"] for s in samples]
    # every block boundary (headers included), a few cuts inside blocks, the end marker itself
    cuts = sorted(set(range(512, end + 1, 512)) | {100, 700, spans[1][0] + 3, spans[-1][1] - 1, end})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(full[:cut])
        stats, errors = Counter(), []
        got = list(iter_raw_samples(str(path), stats, lambda u, k, r: errors.append((u, k, r))))
        complete = sum(1 for k in range(len(samples)) if spans[2 * k + 1][1] <= cut)  # png + txt per sample
        kind = "unreadable" if cut < 512 else "truncated"
        assert [(u, k) for u, k, _ in errors] == [(str(path), kind)], cut
        assert stats[f"shards_{kind}"] == 1, cut
        # a prefix of the shard, every sample whole; at most the last complete one is lost at the cut
        assert complete - 1 <= len(got) <= complete, (cut, len(got), complete)
        assert got == [dict(w, __url__=str(path)) for w in whole[: len(got)]], cut
    for cut in (end + 512, len(full)):  # the end-of-archive block is there: a whole shard
        (tmp_path / "ok.tar").write_bytes(full[:cut])
        stats = Counter()
        assert len(list(iter_raw_samples(str(tmp_path / "ok.tar"), stats, None))) == 4 and not stats


def test_inspect_reports_damaged_shards_and_never_crashes(tmp_path, capsys):
    from flamingo_vlm.cli import main

    urls, bad = _damaged_mix(tmp_path)
    Path(bad["gone"]).unlink()  # listed, but not there (it had stopped the whole report)
    summary = inspect_shards(urls)
    status = {f["shard"]: f["status"] for f in summary["files"]}
    assert status == {urls[0]: "ok", urls[2]: "ok", bad["garbage"]: "unreadable", bad["empty"]: "unreadable",
                      bad["truncated"]: "truncated", bad["gone"]: "missing"}
    assert summary["samples"] == 8 + 1 and summary["shard_read_errors"] == 4 and summary["shards"] == 6
    assert next(f for f in summary["files"] if f["shard"] == bad["empty"])["error"].endswith("(ReadError: empty file)")
    assert "shard not found" in next(f for f in summary["files"] if f["shard"] == bad["gone"])["error"]
    assert main(["data", "inspect", *urls]) == 0
    out = capsys.readouterr().out
    assert "damaged or missing shards: 4" in out
    lines = out.splitlines()
    for url, word in [(bad["garbage"], "unreadable"), (bad["empty"], "unreadable"), (bad["truncated"], "truncated"),
                      (urls[0], "ok"), (bad["gone"], "missing")]:
        assert any(line.split()[:2] == [word, f"{url}:"] for line in lines), (url, out)
    # shards that all exist but hold no usable sample: the summary, then exit 1 with one line saying so
    only_bad = [bad["garbage"], bad["empty"]]
    for extra in ([], ["--json"]):
        assert main(["data", "inspect", *only_bad, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err == "flamingo-vlm data inspect: error: no usable sample in 2 shard(s) (2 unreadable, damaged or " \
                      "missing, 0 corrupt sample(s))", err
    # only missing shards: one line, as before
    assert main(["data", "inspect", bad["gone"]]) == 1
    assert capsys.readouterr().err.startswith("flamingo-vlm data inspect: error: shard not found")
    # a pattern that matches nothing: one line, exit 1, no traceback
    assert main(["data", "inspect", str(tmp_path / "nothing-*.tar")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flamingo-vlm data inspect: error: no shards found") and "nothing-*.tar" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_is_exact_with_damaged_shards(tmp_path, processor):
    urls, bad = _damaged_mix(tmp_path)
    samples = [{"__key__": f"c{i}", "png": b"not an image", "txt": "corrupt"} for i in range(2)]
    urls.append(write_tar(tmp_path / "corrupt.tar", samples))
    spec = DatasetSpec("pairs", urls, batch_size=2, shuffle_buffer=3)
    a = ShardDataset(spec, processor, seed=5)
    it = iter(a)
    for _ in range(6):  # into epoch 1
        next(it)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["epoch"] == 1 and len(state["shard_problems"]) == 4 and state["corrupt"] >= 2
    expected = [next(it) for _ in range(5)]
    b = ShardDataset(spec, processor, seed=5)
    b.load_state_dict(state)
    got = take(b, 5)
    for x, y in zip(expected, got):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the counts continue those of the interrupted run
    assert b.problems() == a.problems() and b.state_dict() == a.state_dict()


def test_url_expansion(tmp_path):
    urls = pair_shards(tmp_path, NAMES[:6], per_shard=2)
    assert expand_urls(str(tmp_path / "pairs-{000..002}.tar")) == urls
    assert expand_urls(str(tmp_path / "pairs-*.tar")) == urls
    assert expand_urls(str(tmp_path)) == urls
    assert expand_urls([urls[2], str(tmp_path / "pairs-{000,002}.tar")]) == [urls[2], urls[0]]


def test_no_full_batch_raises(tmp_path, processor):
    urls = pair_shards(tmp_path, NAMES[:3], per_shard=3)
    ds = ShardDataset(DatasetSpec("pairs", urls, batch_size=4), processor)
    with pytest.raises(RuntimeError, match="no full batch"):
        next(iter(ds))


# -- order, resume, ranks -----------------------------------------------------------------------------
def test_determinism_and_epochs(tmp_path, processor):
    urls = pair_shards(tmp_path, NAMES[:14], per_shard=4)  # 4 shards, 14 samples: 3 batches of 4 per epoch
    spec = DatasetSpec("pairs", urls, batch_size=4, shuffle_buffer=5)
    a = take(ShardDataset(spec, processor, seed=3), 7)
    b = take(ShardDataset(spec, processor, seed=3), 7)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    epoch0 = [r for batch in a[:3] for r in rows(batch)]
    epoch1 = [r for batch in a[3:6] for r in rows(batch)]
    assert len(set(epoch0)) == 12 and len(set(epoch1)) == 12  # no repeats within an epoch
    assert epoch0 != epoch1  # reshuffled per epoch
    c = take(ShardDataset(spec, processor, seed=4), 3)
    assert [rows(x) for x in c] != [rows(x) for x in a[:3]]


@pytest.mark.parametrize("with_consumed", [True, False])
def test_resume_is_exact_and_skips_without_decoding(tmp_path, processor, with_consumed):
    names = NAMES[:14]
    samples = [{"__key__": f"{i:04d}", "png": png(n), "txt": f"a {n} square"} for i, n in enumerate(names)]
    samples.insert(5, {"__key__": "bad", "png": b"garbage", "txt": "corrupt"})
    urls = [write_tar(tmp_path / "a.tar", samples[:8]), write_tar(tmp_path / "b.tar", samples[8:])]
    spec = DatasetSpec("pairs", urls, batch_size=3, shuffle_buffer=4)
    a = ShardDataset(spec, processor, seed=1)
    it = iter(a)
    for _ in range(5):  # 4 batches per epoch: this crosses into epoch 1
        next(it)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 1
    processed_before = a.stats["raw_samples"]
    expected = [next(it) for _ in range(4)]

    b = ShardDataset(spec, processor, seed=1)
    if not with_consumed:
        state = {"epoch": state["epoch"], "batches": state["batches"]}
    b.load_state_dict(json.loads(json.dumps(state)))
    got = take(b, 4)
    for x, y in zip(expected, got):
        assert all(torch.equal(x[k], y[k]) for k in x)
    if with_consumed:
        # the samples before the saved position were not processed (nor decoded) again
        assert b.stats["raw_samples"] == a.stats["raw_samples"] - processed_before


def test_rank_split_matches_single_process(tmp_path, processor):
    urls = pair_shards(tmp_path, NAMES[:15], per_shard=4)  # 15 samples, single batch 4: 3 per epoch
    single = build_datasets([DatasetSpec("pairs", urls, batch_size=4, shuffle_buffer=6)], processor, seed=7,
                            rank=0, world_size=1, eos_token_id=None)[0]
    ranks = [
        ShardDataset(DatasetSpec("pairs", urls, batch_size=2, shuffle_buffer=6), processor, seed=7, rank=r, world_size=2)
        for r in range(2)
    ]
    s_batches = take(single, 7)
    r_batches = [take(ds, 7) for ds in ranks]
    for k in range(7):  # 7 batches: past two epoch ends (15 samples -> 3 batches of 4 per epoch)
        union = Counter(rows(r_batches[0][k]) + rows(r_batches[1][k]))
        assert union == Counter(rows(s_batches[k]))
        assert not set(rows(r_batches[0][k])) & set(rows(r_batches[1][k]))
    assert ranks[0].state_dict()["epoch"] == ranks[1].state_dict()["epoch"] == single.state_dict()["epoch"] == 2


def test_hflip_is_off_by_default_and_deterministic(tmp_path, processor):
    buf = io.BytesIO()
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255  # white left half
    Image.fromarray(arr).save(buf, format="PNG")
    samples = [{"__key__": f"{i}", "png": buf.getvalue(), "txt": "left is white"} for i in range(8)]
    url = write_tar(tmp_path / "f.tar", samples)
    batch = next(iter(ShardDataset(DatasetSpec("pairs", [url], batch_size=8), processor)))
    left = batch["vision_x"][:, 0, 0, :, :, :4].mean((1, 2, 3))
    right = batch["vision_x"][:, 0, 0, :, :, 4:].mean((1, 2, 3))
    assert (left > right).all()
    spec = DatasetSpec("pairs", [url], batch_size=8, hflip_prob=0.5)
    x = next(iter(ShardDataset(spec, processor)))["vision_x"]
    flipped = x[:, 0, 0, :, :, :4].mean((1, 2, 3)) < x[:, 0, 0, :, :, 4:].mean((1, 2, 3))
    assert 0 < int(flipped.sum()) < 8
    assert torch.equal(x, next(iter(ShardDataset(spec, processor)))["vision_x"])


# -- custom data and CLI ------------------------------------------------------------------------------
def _custom_source(tmp_path: Path) -> tuple[Path, Path]:
    imgs = tmp_path / "src" / "imgs"
    imgs.mkdir(parents=True)
    for n in ("red", "green", "blue", "yellow"):
        (imgs / f"{n}.png").write_bytes(png(n))
    (imgs / "orange.bmp").write_bytes(png("orange", fmt="BMP"))
    (imgs / "broken.png").write_bytes(b"not an image")
    lines = [
        {"items": [{"text": "Intro."}, {"image": "imgs/red.png"}, {"text": "A red square."},
                   {"image": "imgs/green.png"}, {"text": "A green one."}]},
        {"text": "<image>A blue one. Then <image>yellow.", "images": ["imgs/blue.png", "imgs/yellow.png"]},
        {"items": [{"image": str(imgs / "orange.bmp")}, {"text": "Orange, absolute path."}]},
        {"items": [{"image": "imgs/broken.png"}, {"text": "skipped"}]},
        {"text": "two markers <image><image>", "images": ["imgs/red.png"]},
    ]
    jsonl = tmp_path / "src" / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for n in ("red", "green", "blue"):
        (folder / f"{n}.png").write_bytes(png(n))
        (folder / f"{n}.txt").write_text(f"a {n} square")
    (folder / "sub" / "cyan.jpg").write_bytes(png("cyan", fmt="JPEG"))
    (folder / "sub" / "cyan.txt").write_text("a cyan square")
    (folder / "nocaption.png").write_bytes(png("black"))
    return jsonl, folder


def test_custom_round_trip(tmp_path, processor):
    jsonl, folder = _custom_source(tmp_path)
    stats = Counter()
    paths = write_shards(jsonl, tmp_path / "docs", samples_per_shard=2, stats=stats)
    assert [p.name for p in paths] == ["interleaved-000000.tar", "interleaved-000001.tar"]
    assert stats["written"] == 3 and stats["bad_records"] == 2 and stats["bad_images"] == 1
    assert not list((tmp_path / "docs").glob("*.tmp"))

    summary = inspect_shards([str(p) for p in paths], n=2)
    assert summary["samples"] == 3 and summary["kinds"] == {"interleaved": 3} and summary["corrupt"] == 0
    assert summary["images"] == 5 and summary["images_per_sample"] == {1: 1, 2: 2}
    assert summary["examples"][0]["text"] == "Intro.<image>A red square.<|endofchunk|><image>A green one.<|endofchunk|>"

    ds = ShardDataset(DatasetSpec("interleaved", [str(tmp_path / "docs")], batch_size=3, shuffle_buffer=0), processor)
    batch = next(iter(ds))
    check_consistent(processor, batch)
    eos = processor.tokenizer.eos_token
    got = {t: [colour_name(batch["vision_x"][b, i]) for i in range(batch["vision_x"].shape[1])]
           for b, t in enumerate(texts(processor, batch))}
    assert got == {
        f"Intro.<image>A red square.<|endofchunk|><image>A green one.<|endofchunk|>{eos}": ["red", "green"],
        f"<image>A blue one. Then<|endofchunk|><image>yellow.<|endofchunk|>{eos}": ["blue", "yellow"],
        f"<image>Orange, absolute path.<|endofchunk|>{eos}": ["orange", None],
    }

    stats = Counter()
    paths = write_shards(folder, tmp_path / "pairs", stats=stats)
    assert [p.name for p in paths] == ["pairs-000000.tar"] and stats["missing_caption"] == 1
    summary = inspect_shards(str(tmp_path / "pairs"))
    assert summary["kinds"] == {"pairs": 4}
    ds = ShardDataset(DatasetSpec("pairs", [str(paths[0])], batch_size=4), processor)
    batch = next(iter(ds))
    assert sorted(texts(processor, batch)) == sorted(
        f"<image>a {n} square<|endofchunk|>{eos}" for n in ("red", "green", "blue", "cyan")
    )
    for b, text in enumerate(texts(processor, batch)):
        assert colour_name(batch["vision_x"][b, 0]) in text
    with pytest.raises(FileExistsError):
        write_shards(folder, tmp_path / "pairs")
    with pytest.raises(ValueError, match="not one image followed by a caption"):
        write_shards(jsonl, tmp_path / "forced", kind="pairs")


def test_cli_write_and_inspect(tmp_path, capsys):
    _, folder = _custom_source(tmp_path)
    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    add_data_subcommand(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "shards"
    args = parser.parse_args(["data", "write", str(folder), str(out), "--kind", "interleaved",
                              "--samples-per-shard", "3"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 interleaved sample(s)" in printed and "interleaved-000001.tar" in printed
    args = parser.parse_args(["data", "inspect", str(out / "interleaved-{000000..000001}.tar"), "-n", "1", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 4 and summary["shards"] == 2 and len(summary["examples"]) == 1
    args = parser.parse_args(["data", "inspect", str(out)])
    assert args.func(args) == 0
    assert "4 sample(s)" in capsys.readouterr().out



def test_write_shows_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    """Writing checks every image: minutes for a large folder, which passed in silence."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), "red").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    write_shards(folder, tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "write: 100%" in err and "3/3" in err
    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    add_data_subcommand(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    args = parser.parse_args(["data", "write", str(folder), str(tmp_path / "b")])
    assert args.func(args) == 0
    assert "write: 100%" in capsys.readouterr().err


def test_cli_write_names_skipped_files_and_fails_when_nothing_was_written(tmp_path, capsys, caplog):
    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    add_data_subcommand(parser.add_subparsers(dest="command", required=True))
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "a.txt").write_text("a caption")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())  # no caption file
    args = parser.parse_args(["data", "write", str(folder), str(tmp_path / "out")])
    with caplog.at_level("WARNING"):
        assert args.func(args) == 1
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"{folder / 'a.png'} is not a readable image" in logged and "BytesIO" not in logged
    assert f"skipping {folder / 'b.png'}: no caption file b.txt" in logged
    captured = capsys.readouterr()
    assert "wrote 0 sample(s)" in captured.out and "auto" not in captured.out
    assert captured.err.startswith("flamingo-vlm data write: error: no sample of") and captured.err.count("\n") == 1


def test_cli_write_says_what_it_skipped_in_words_and_names_captions_without_an_image(tmp_path, capsys, caplog):
    """The summary read "skipped {'missing_caption': 1, ...}" (a dict), and a caption whose image had
    another name (or an unsupported format) was left out without a word."""
    from PIL import Image

    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    add_data_subcommand(parser.add_subparsers(dest="command", required=True))
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a", "b", "C"):
        Image.new("RGB", (8, 8), "red").save(folder / f"{name}.png")
    (folder / "C.png").rename(folder / "C.PNG")  # (an upper-case suffix is an image: its caption is not an orphan)
    (folder / "a.txt").write_text("a caption")
    (folder / "C.txt").write_text("another")
    (folder / "photo.txt").write_text("its image is photo.heic")
    (folder / "photo.heic").write_bytes(b"...")
    (folder / "README.txt").write_text("where these photos come from")  # (not a caption: not counted)
    args = parser.parse_args(["data", "write", str(folder), str(tmp_path / "out")])
    with caplog.at_level("WARNING"):
        assert args.func(args) == 0
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"skipping 1 caption file(s) with no image of the same name beside them ({folder / 'photo.txt'};" in logged
    out = capsys.readouterr().out
    assert "wrote 2 pairs sample(s)" in out
    assert "skipped 1 image(s) without a caption file, 1 caption(s) without an image" in out and "{" not in out

def test_plan_chunk_separator_goes_between_chunks_and_is_not_trained(tmp_path, processor):
    sim = np.array([[0.9, 0.1], [0.1, 0.9]])
    plan = plan_interleaved(["s0", "s1"], sim, [True, True], threshold=0.24, max_images=6, separator="\n")
    assert plan.text == "<image>s0<|endofchunk|>\n<image>s1<|endofchunk|>"

    doc = mmc4_doc(["A red one.", "A blue one."], ["red", "blue"], sim)
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    plain = next(iter(interleaved_ds(tmp_path / "a", processor, [doc])))
    sep = next(iter(interleaved_ds(tmp_path / "b", processor, [doc], chunk_separator="\n")))
    check_consistent(processor, sep)
    assert "<|endofchunk|>\n<image>" in texts(processor, sep)[0]
    assert sep["input_ids"].shape[1] > plain["input_ids"].shape[1]
    # the separator is context only: the trained tokens are the same with and without it
    trained = lambda b: b["input_ids"][0][b["labels"][0] != X].tolist()  # noqa: E731
    assert trained(sep) == trained(plain)


def test_loss_after_trains_only_the_answers(tmp_path, processor):
    sim = np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    doc = mmc4_doc(["Question:What is it? Short answer:red", "Output:a blue one", "no marker here"],
                   ["red", "blue", "green"], sim)
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir()
    plain = next(iter(interleaved_ds(tmp_path / "a", processor, [doc], chunk_separator="\n")))
    answers = next(iter(interleaved_ds(tmp_path / "b", processor, [doc], chunk_separator="\n",
                                       loss_after=("Short answer:", "Output:"))))
    assert torch.equal(answers["input_ids"], plain["input_ids"])
    tok = processor.tokenizer
    trained = lambda b: tok.decode(b["input_ids"][0][b["labels"][0] != X].tolist())  # noqa: E731
    assert trained(plain) == ("Question:What is it? Short answer:red<|endofchunk|>Output:a blue one<|endofchunk|>"
                              "no marker here<|endofchunk|>" + tok.eos_token)
    # the questions and markers are prompt; answers, end-of-chunk tokens, a chunk without a marker and eos train
    assert trained(answers) == "red<|endofchunk|>a blue one<|endofchunk|>no marker here<|endofchunk|>" + tok.eos_token
    # answers only: a subset of the plain labels, never a padding or image position
    assert ((answers["labels"] != X) <= (plain["labels"] != X)).all()


def test_loss_after_needs_marker_strings():
    with pytest.raises(ValueError, match="loss_after"):
        DatasetSpec("interleaved", ["x.tar"], loss_after=("",))
    assert DatasetSpec("interleaved", ["x.tar"], loss_after="Output:").loss_after == ("Output:",)


def test_write_from_an_image_or_a_binary_file_names_it_and_says_what_it_takes(tmp_path):
    """`data write a.png out/` said only "'utf-8' codec can't decode byte 0x89 in position 0"."""
    from PIL import Image

    from flamingo_vlm.data.custom import SourceError

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    with pytest.raises(SourceError, match=r"a\.png is an image: give a \.jsonl file"):
        write_shards(tmp_path / "a.png", tmp_path / "out")
    (tmp_path / "b.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(SourceError, match=r"b\.jsonl is not a UTF-8 text file"):
        write_shards(tmp_path / "b.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mmc4_records_with_their_downloaded_images_become_shards_that_train_as_mmc4(tmp_path, processor):
    """A real MMC4 record (text_list, image_info by image_name, similarity_matrix) was refused ("expected
    an 'items' list or 'text'"), though `data write --kind interleaved` was said to be MMC4-style."""
    from flamingo_vlm.data.custom import SourceError

    sim = [[0.31, 0.05, 0.10], [0.02, 0.12, 0.35], [0.40, 0.01, 0.02]]
    doc = mmc4_doc(["A red one.", "Some text.", "The blue one."], ["red", "blue", "green"], sim)
    for info in doc["image_info"]:
        del info["image_base64"]  # (MMC4's release: the images are downloaded separately, by image_name)
    (tmp_path / "red.png").write_bytes(png("red"))
    (tmp_path / "blue.png").write_bytes(png("blue"))  # green.png failed to download
    lines = [json.dumps(doc), json.dumps({"text": "no image here"})]
    (tmp_path / "mmc4.jsonl").write_text("\n".join(lines) + "\n")
    stats = Counter()
    shards = write_shards(tmp_path / "mmc4.jsonl", tmp_path / "out", stats=stats)
    assert stats["written"] == 1 and stats["missing_images"] == 1 and stats["no_image"] == 1
    with tarfile.open(shards[0]) as tar:
        written = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert written["text_list"] == doc["text_list"]
    assert [i["image_name"] for i in written["image_info"]] == ["red.png", "blue.png"]
    assert written["similarity_matrix"] == sim[:2]  # (kept: training matches images by them, as on MMC4's shards)
    assert inspect_shards([str(shards[0])])["corrupt"] == 0
    (tmp_path / "r").mkdir()
    text = texts(processor, next(iter(interleaved_ds(tmp_path / "r", processor, [written]))))[0]
    assert text.count("<image>") == 2 and "The blue one." in text
    with pytest.raises(SourceError, match=r"mmc4\.jsonl:1: 1 of its images are not under"):
        write_shards(tmp_path / "mmc4.jsonl", tmp_path / "out2", strict=True)
    doc["image_info"][0]["matched_sim"] = None  # (float(None): a traceback)
    doc["similarity_matrix"][1] = [0.1]  # (ragged: "bad JSON (inhomogeneous shape)")
    (tmp_path / "bad.jsonl").write_text(json.dumps(doc) + "\n")
    with pytest.raises(SourceError, match=r"image_info\[0\] needs .*a numeric 'matched_sim'|similarity_matrix must be"):
        write_shards(tmp_path / "bad.jsonl", tmp_path / "out3", strict=True)
    doc["image_info"][0]["matched_sim"] = 0.31
    (tmp_path / "bad.jsonl").write_text(json.dumps(doc) + "\n")
    with pytest.raises(SourceError, match=r"similarity_matrix must be rows of numbers"):
        write_shards(tmp_path / "bad.jsonl", tmp_path / "out3", strict=True)


def test_strict_refuses_a_caption_without_an_image(tmp_path):
    """--strict fails on a bad record or image instead of skipping it; a caption whose image is not
    there was still only skipped."""
    from flamingo_vlm.data.custom import SourceError

    (tmp_path / "a.png").write_bytes(png("red"))
    (tmp_path / "a.txt").write_text("a red one")
    (tmp_path / "b.txt").write_text("its image is missing")
    with pytest.raises(SourceError, match=r"b\.txt: a caption with no image of the same name beside it"):
        write_shards(tmp_path, tmp_path / "out", strict=True)
    assert write_shards(tmp_path, tmp_path / "out2")  # (without --strict: skipped, counted)


def test_a_caption_prefix_puts_the_prompt_before_each_caption_and_loss_after_leaves_it_untrained(tmp_path, processor):
    """A folder of captions trained `<image>{caption}`, while the built-in model is asked `<image>Output:`:
    its fine-tunes had to write the prompt into every caption file."""
    url = write_tar(tmp_path / "p.tar", [{"__key__": "0000", "png": png("red"), "txt": "a red square."}])
    spec = lambda **kw: DatasetSpec("pairs", [url], batch_size=1, shuffle_buffer=0, **kw)  # noqa: E731
    batch = next(iter(ShardDataset(spec(caption_prefix="Output:", loss_after=("Output:",)), processor)))
    assert texts(processor, batch)[0].startswith("<image>Output:a red square.<|endofchunk|>")
    tok = processor.tokenizer
    trained = tok.decode(batch["input_ids"][0][batch["labels"][0] != X].tolist())
    assert trained == "a red square.<|endofchunk|>" + tok.eos_token
    from flamingo_vlm.train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"data\[0\]\.caption_prefix applies to pairs; data\[0\] is interleaved"):
        TrainConfig.from_dict({"data": [{"kind": "interleaved", "urls": ["x"], "caption_prefix": "Output:"}]},
                              require_model=False)
