"""Serving pieces on their own: the message -> prompt mapping, image loading, per-row stopping, the
batcher's grouping, and the command line (``flamingo-vlm serve``) in a subprocess."""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_serve_fixtures import MODEL_NAME, png_bytes, readable_tiny, require, serve_model_dir  # noqa: E402,F401

httpx = require("httpx")

from flamingo_vlm.serve import add_serve_subcommand  # noqa: E402
from flamingo_vlm.serve.engine import Engine, RowTracker, _Row  # noqa: E402
from flamingo_vlm.serve.errors import APIError  # noqa: E402
from flamingo_vlm.serve.images import ImageLimits, load_image  # noqa: E402
from flamingo_vlm.serve.jobs import ChoiceFinished, Failed, GenerationJob, JobDone, Prompt, TokenDelta  # noqa: E402
from flamingo_vlm.serve.prompt import chat_to_prompt  # noqa: E402
from flamingo_vlm.serve.schemas import ChatCompletionRequest  # noqa: E402
from flamingo_vlm.serve.testing import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def messages(*msgs):
    return ChatCompletionRequest.model_validate({"messages": list(msgs)}).messages


def img(url):
    return {"type": "image_url", "image_url": {"url": url}}


# -- message -> prompt ---------------------------------------------------------------------------------
def test_few_shot_mapping():
    text, refs = chat_to_prompt(messages(
        {"role": "system", "content": "Describe the images."},
        {"role": "user", "content": [img("data:a"), {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": " two cats."},
        {"role": "user", "content": [img("data:b"), {"type": "text", "text": "Output:"}]},
    ))
    assert text == "Describe the images.\n<image>Output: two cats.<|endofchunk|><image>Output:"
    assert [r for r, _ in refs] == ["data:a", "data:b"]
    assert [p for _, p in refs] == ["messages[1].content[0].image_url", "messages[3].content[0].image_url"]


def test_trailing_assistant_message_is_a_prefill():
    text, _ = chat_to_prompt(messages(
        {"role": "user", "content": [img("data:a"), {"type": "text", "text": "Question: colour? Answer:"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " It is"}]},
    ))
    assert text == "<image>Question: colour? Answer: It is"


def test_parts_in_order_and_string_image_url():
    text, refs = chat_to_prompt(messages(
        {"role": "user", "content": [{"type": "text", "text": "A:"}, {"type": "image_url", "image_url": "data:x"},
                                     {"type": "text", "text": "B:"}, img("data:y")]},
    ))
    assert text == "A:<image>B:<image>" and [r for r, _ in refs] == ["data:x", "data:y"]


@pytest.mark.parametrize("msgs", [
    [{"role": "user", "content": "see <image> here"}],
    [{"role": "assistant", "content": [img("data:a")]}, {"role": "user", "content": "x"}],
    [{"role": "system", "content": [img("data:a")]}],
    [{"role": "user", "content": ""}],
])
def test_mapping_refusals(msgs):
    with pytest.raises(APIError) as e:
        chat_to_prompt(messages(*msgs))
    assert e.value.status == 400


# -- images --------------------------------------------------------------------------------------------
class _ImageHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.path == "/missing.png":
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    _ImageHandler.body = png_bytes(np.full((12, 16, 3), 77, np.uint8))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_only_when_allowed(image_host):
    url = image_host + "/cat.png"
    with pytest.raises(APIError) as e:
        load_image(url, ImageLimits(), "p")
    assert e.value.code == "remote_images_disabled"
    im = load_image(url, ImageLimits(allow_remote=True), "p")
    assert im.size == (16, 12) and im.mode == "RGB"
    with pytest.raises(APIError) as e:
        load_image(url, ImageLimits(allow_remote=True, max_bytes=50), "p")
    assert e.value.status == 413
    with pytest.raises(APIError) as e:
        load_image(image_host + "/missing.png", ImageLimits(allow_remote=True), "p")
    assert e.value.code == "image_fetch_failed"
    # The error names the URL that failed (a request may hold several).
    assert "/missing.png" in e.value.message


def test_file_url_with_a_host_is_refused_clearly(tmp_path):
    """file://scene.png parses as host 'scene.png' and an empty path: it was answered "image file ''
    not found"; it gets a 400 that names the URL and says how to write one."""
    (tmp_path / "scene.png").write_bytes(png_bytes(np.full((4, 4, 3), 9, np.uint8)))
    limits = ImageLimits(image_dir=tmp_path)
    with pytest.raises(APIError) as e:
        load_image("file://scene.png", limits, "p")
    assert e.value.status == 400 and e.value.code == "invalid_image_url"
    assert "file://scene.png" in e.value.message and "file:///" in e.value.message
    assert load_image(f"file://{tmp_path}/scene.png", limits, "p").size == (4, 4)
    assert load_image(f"file://localhost{tmp_path}/scene.png", limits, "p").size == (4, 4)


def test_image_modes_become_rgb():
    from PIL import Image

    from flamingo_vlm.serve.testing import data_url

    for mode in ("L", "RGBA", "P", "1"):
        im = load_image(data_url(Image.new(mode, (9, 7))), ImageLimits(), "p")
        assert im.mode == "RGB" and im.size == (9, 7)
    assert load_image(data_url(Image.new("RGB", (9, 7)), "JPEG"), ImageLimits(), "p").size == (9, 7)


# -- per-row stopping ----------------------------------------------------------------------------------
def test_row_tracker_per_row_limits_and_stop_holdback():
    events_a, events_b = [], []
    job_a = GenerationJob(prompts=[Prompt([1], [], max_tokens=3)], sink=events_a.append)
    job_b = GenerationJob(prompts=[Prompt([1], [], max_tokens=10)], stop=["cd"], sink=events_b.append)
    rows = [_Row(job_a, 0, 3), _Row(job_b, 0, 10)]
    vocab = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 9: ""}
    tracker = RowTracker(rows, lambda ids: "".join(vocab[i] for i in ids), eos_ids={9})
    seq = torch.ones(2, 1, dtype=torch.long)
    history = []
    for step in ([2, 2], [2, 3], [2, 4]):
        seq = torch.cat([seq, torch.tensor(step)[:, None]], 1)
        history.append(tracker(seq, None).tolist())
    assert history == [[False, False], [False, False], [True, True]]
    assert rows[0].finish == "length" and rows[0].text == "bbb"
    assert events_a[-2:] == [ChoiceFinished(0, "length", 3, "bbb"), JobDone()]  # answered when its row ends
    # Row b wrote "bcd": "c" was held back (it could start "cd"), and the stop string never went out.
    assert rows[1].finish == "stop" and rows[1].text == "b"
    assert [e for e in events_b if isinstance(e, TokenDelta)] == [TokenDelta(0, "b")]
    assert events_b[-2:] == [ChoiceFinished(0, "stop", 3, "b"), JobDone()]


def test_cancelled_rows_stop_without_output():
    events = []
    job = GenerationJob(prompts=[Prompt([1], [], max_tokens=5)], sink=events.append)
    rows = [_Row(job, 0, 5)]
    tracker = RowTracker(rows, lambda ids: "x" * len(ids), eos_ids=set())
    job.cancel()
    assert tracker(torch.ones(1, 2, dtype=torch.long), None).tolist() == [True]
    assert events == [JobDone()]


# -- the batcher ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0).start()
    yield eng
    eng.stop()


def _job(engine, text, **kw):
    done = threading.Event()
    out = []

    def sink(event):
        out.append(event)
        if isinstance(event, (JobDone, Failed)):
            done.set()

    job = GenerationJob(prompts=[Prompt(engine.encode(text), [], max_tokens=3)], sink=sink, **kw)
    return job, done, out


def test_batches_group_compatible_jobs_only(engine):
    engine.pause()
    before = engine.stats.snapshot()
    jobs = [_job(engine, "a red", temperature=0), _job(engine, "a dog", temperature=0.7),
            _job(engine, "a cat", temperature=0, n=2), _job(engine, "the car", temperature=0.7),
            _job(engine, "one", temperature=0, n=2)]
    for job, _, _ in jobs:
        engine.submit(job)
    engine.resume()
    for _, done, out in jobs:
        assert done.wait(60)
        assert out[-1] == JobDone()
    after = engine.stats.snapshot()
    # greedy: 1 + 2 rows together, then the 2-row greedy job (batch of 4 full); sampling at 0.7: 2 rows.
    assert after["batches"] - before["batches"] == 3
    new = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert {k: v for k, v in new.items() if v} == {"3": 1, "2": 2}


def test_engine_matches_model_generate(engine):
    """Batched, left-padded, with images encoded once and cached: the same tokens as a plain
    ``model.generate`` on each prompt alone."""
    from flamingo_vlm import FlamingoProcessor
    from tiny import random_images

    imgs = random_images(3, seed=5)
    samples = [("<image>Output: a cat.<|endofchunk|><image>Output:", imgs[:2]), ("<image>the dog is", imgs[2:]),
               ("a red car", [])]
    processor = FlamingoProcessor(engine.tokenizer, engine.image_processor)
    expected = []
    for sample in samples:
        batch = processor([sample])
        out = engine.model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=5)
        expected.append(engine.decode(out[0, batch["input_ids"].shape[1]:].tolist()))
    engine.pause()
    jobs = []
    for text, images in samples:
        job, done, out = _job(engine, text, temperature=0)
        job.prompts[0].images = [engine.preprocess(im) for im in images]
        job.prompts[0].image_keys = [f"unit-{id(im)}" for im in images]
        job.prompts[0].max_tokens = 5
        engine.submit(job)
        jobs.append((done, out))
    engine.resume()
    got = []
    for done, out in jobs:
        assert done.wait(60)
        got.append(next(e.text for e in out if isinstance(e, ChoiceFinished)))
    assert got == expected


@pytest.mark.parametrize("prefix_cache_mb", [256, 0.01])
def test_a_long_prompt_prefills_in_chunks_while_others_are_served(prefix_cache_mb):
    """A prompt much longer than --prefill-chunk goes through the prefix cache a chunk at a time; a
    short request sent after it is answered first; the long one's answer is plain generate's. A cache
    too small for the prompt's keys/values: one pass, the same answer."""
    from flamingo_vlm import FlamingoProcessor
    from tiny import random_images

    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0, prefill_chunk=16, prefix_cache_mb=prefix_cache_mb)
    imgs = random_images(3, seed=5)
    text = ("<image>Output: a cat.<|endofchunk|>" + " the red car is on the road." * 12
            + "<image>Output: two dogs.<|endofchunk|><image>Output:")
    batch = FlamingoProcessor(tok, ip)([(text, imgs)])
    n = batch["input_ids"].shape[1]
    assert n > 6 * 16
    expected = eng.decode(model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"],
                                         max_new_tokens=5)[0, n:].tolist())
    finished = []
    eng.start()
    try:
        eng.pause()
        long_job, long_done, long_out = _job(eng, text, temperature=0)
        long_job.prompts[0].images = [eng.preprocess(im) for im in imgs]
        long_job.prompts[0].image_keys = [f"chunk-{i}" for i in range(3)]
        long_job.prompts[0].max_tokens = 5
        short_job, short_done, short_out = _job(eng, "a red car", temperature=0)
        for job, name in ((long_job, "long"), (short_job, "short")):
            sink = job.sink
            job.sink = lambda event, sink=sink, name=name: (finished.append(name) if event == JobDone() else None,
                                                           sink(event))
            eng.submit(job)
        eng.resume()
        assert long_done.wait(120) and short_done.wait(120)
    finally:
        eng.stop()
    assert next(e.text for e in long_out if isinstance(e, ChoiceFinished)) == expected
    chunks = eng.stats.snapshot()["prefill_chunks"]
    if prefix_cache_mb == 256:
        assert finished == ["short", "long"] and chunks >= (n - 24) // 16, (finished, chunks)
    else:
        assert not long_job.prefill_in_chunks and chunks < (n - 24) // 16  # the cache lost the prefix: one pass


def test_a_long_prompt_whose_client_went_away_stops_at_the_next_chunk():
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, batch_wait_ms=0, prefill_chunk=16)
    job, _, out = _job(eng, " the red car is on the road." * 12)
    assert eng._prefill_in_chunks([job]) == [] and list(eng._pending) == [job]  # one chunk, then queued again
    assert eng.stats.snapshot()["prefill_chunks"] == 1
    eng._pending.clear()
    job.cancel()
    assert eng._prefill_in_chunks([job]) == [] and not eng._pending  # no more chunks, no generate
    snap = eng.stats.snapshot()
    assert snap["prefill_chunks"] == 1 and snap["cancelled_requests"] == 1 and not out


def test_a_request_is_answered_when_its_rows_end_not_when_its_batch_does():
    """A short request batched with a long one got its answer only when the long one ended; and a
    failure after it was answered must not send it a second, contradictory end."""
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0, decode_slice=0)
    long, long_done, long_out = _job(eng, "one two", temperature=0)
    long.prompts[0].max_tokens = 24
    short, short_done, short_out = _job(eng, "a red", temperature=0)
    events = []
    for job, name in ((long, "long"), (short, "short")):
        sink = job.sink
        job.sink = lambda event, sink=sink, name=name: (events.append((name, type(event).__name__)), sink(event))
    decode = eng.decode

    def failing_decode(ids):  # the long row fails after its 8th token
        if len(ids) > 8:
            raise RuntimeError("decoder broke")
        return decode(ids)

    eng.decode = failing_decode
    eng.start()
    try:
        eng.pause()
        eng.submit(long)
        eng.submit(short)
        eng.resume()
        assert long_done.wait(60) and short_done.wait(60)
    finally:
        eng.stop()
    assert [e for e in events if e[0] == "short"][-2:] == [("short", "ChoiceFinished"), ("short", "JobDone")]
    assert [e for e in events if e[0] == "long"] [-1:] == [("long", "Failed")]
    assert events.index(("short", "JobDone")) < events.index(("long", "Failed"))
    assert eng.stats.snapshot()["batch_size_histogram"] == {"2": 1}  # (one batch: both rows together)


def _run_alone(eng, job):
    """``job``'s choices on an engine with nothing else queued (so no pause): {choice: (reason, text)}."""
    out = []
    fresh = GenerationJob(prompts=job.prompts, n=job.n, stop=job.stop, temperature=job.temperature,
                          top_p=job.top_p, seed=job.seed, sink=out.append)
    eng._generate([fresh])
    assert out[-1] == JobDone()
    return {e.choice: (e.reason, e.text) for e in out if isinstance(e, ChoiceFinished)}


def test_a_long_generation_pauses_for_requests_queued_meanwhile():
    """A batch that has generated --decode-slice tokens while others queue pauses; the queued requests
    run (a compatible one in the same batch as the paused rows), then the paused rows continue from the
    prefix cache with the output they would have had alone: greedy with images, seeded sampling with two
    choices and a stop string (its random state kept across the pause)."""
    from tiny import random_images

    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0, decode_slice=4)
    imgs = random_images(2, seed=5)
    greedy, greedy_done, greedy_out = _job(eng, "<image>Output: a cat.<|endofchunk|><image>Output:", temperature=0)
    greedy.prompts[0].images = [eng.preprocess(im) for im in imgs]
    greedy.prompts[0].image_keys = ["slice-0", "slice-1"]
    greedy.prompts[0].max_tokens = 14
    seeded, seeded_done, seeded_out = _job(eng, "one two", temperature=0.9, seed=3, n=2, stop=[". do an"])
    seeded.prompts[0].max_tokens = 30
    short, short_done, short_out = _job(eng, "a dog", temperature=0)
    alone = Engine(model, ip, tok, batch_wait_ms=0)
    expected = {name: _run_alone(alone, job) for name, job in (("greedy", greedy), ("seeded", seeded), ("short", short))}
    assert any(reason == "stop" for reason, _ in expected["seeded"].values())  # (the stop string cuts a choice)
    finished = []
    for job, name in ((seeded, "seeded"), (greedy, "greedy"), (short, "short")):
        sink = job.sink
        job.sink = lambda event, sink=sink, name=name: (finished.append(name) if event == JobDone() else None,
                                                       sink(event))
    eng.start()
    try:
        eng.pause()
        for job in (seeded, greedy, short):
            eng.submit(job)
        eng.resume()
        assert seeded_done.wait(120) and greedy_done.wait(120) and short_done.wait(120)
    finally:
        eng.stop()
    got = {name: {e.choice: (e.reason, e.text) for e in out if isinstance(e, ChoiceFinished)}
           for name, out in (("greedy", greedy_out), ("seeded", seeded_out), ("short", short_out))}
    assert got == expected
    assert finished.index("short") < finished.index("seeded") and finished.index("short") < finished.index("greedy")
    for out in (greedy_out, seeded_out):  # the streamed pieces add up to each choice's text
        for choice, (_, text) in expected["seeded" if out is seeded_out else "greedy"].items():
            assert "".join(e.text for e in out if isinstance(e, TokenDelta) and e.choice == choice) == text
    snap = eng.stats.snapshot()
    assert snap["decode_slices"] >= 2 and snap["generation_requests"] == 3 and snap["generated_rows"] == 4
    assert snap["generated_tokens"] == sum(e.tokens for out in (greedy_out, seeded_out, short_out)
                                           for e in out if isinstance(e, ChoiceFinished))
    assert any(int(k) > 1 for k in snap["requests_per_batch_histogram"])  # the short one joined the paused rows


def test_a_paused_generation_whose_client_went_away_is_dropped():
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, batch_wait_ms=0, decode_slice=2)
    long, _, long_out = _job(eng, "one two", temperature=0)
    long.prompts[0].max_tokens = 20
    other, other_done, other_out = _job(eng, "a dog", temperature=0.5)
    eng._pending.append(other)  # (queued while the long one generates)
    eng._generate([long])
    assert list(eng._pending) == [other, long] and len(long.resume) == 1 and len(long.resume[0].tokens) == 2
    assert not any(isinstance(e, (ChoiceFinished, JobDone)) for e in long_out)
    long.cancel()
    eng.start()
    try:
        assert other_done.wait(60) and other_out[-1] == JobDone()
        deadline = time.monotonic() + 30
        while eng.queue_depth() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.stop()
    snap = eng.stats.snapshot()
    assert snap["cancelled_requests"] == 1 and snap["decode_slices"] == 1
    assert not any(isinstance(e, (ChoiceFinished, JobDone)) for e in long_out)


def test_a_batch_whose_rows_are_half_done_continues_without_them():
    """generate goes on computing finished rows (a long answer batched with short ones decoded as a
    batch to its end): once half the rows are done the rest pause and continue in a batch of their own,
    with the output they would have had."""
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0)
    long, _, long_out = _job(eng, "one two", temperature=0)
    long.prompts[0].max_tokens = 20
    short, _, short_out = _job(eng, "a red", temperature=0)
    alone = Engine(model, ip, tok, batch_wait_ms=0)
    expected = [_run_alone(alone, job) for job in (long, short)]
    other, _, _ = _job(eng, "a dog", temperature=0.5)
    eng._pending.append(other)  # (queued meanwhile: the paused rows go before it, not having paused for it)
    eng._generate([long, short])
    assert short_out[-1] == JobDone() and list(eng._pending) == [long, other] and len(long.resume[0].tokens) == 3
    eng._pending.clear()
    eng._generate([long])
    assert long_out[-1] == JobDone() and long.resume is None
    got = [{e.choice: (e.reason, e.text) for e in out if isinstance(e, ChoiceFinished)} for out in (long_out, short_out)]
    assert got == expected and eng.stats.snapshot()["decode_slices"] == 1


def test_a_prefix_cache_too_small_for_a_paused_row_stops_the_pausing():
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, batch_wait_ms=0, decode_slice=2, prefix_cache_mb=0.01)
    long, _, long_out = _job(eng, " the red car is on the road." * 12, temperature=0)
    long.prompts[0].max_tokens = 20
    other, _, _ = _job(eng, "a dog", temperature=0.5)
    eng._pending.append(other)
    eng._generate([long])
    assert not long.pausable and list(eng._pending) == [other, long]
    eng._generate([long])  # (other still queued: it would pause again)
    assert long_out[-1] == JobDone() and eng.stats.snapshot()["decode_slices"] == 1
    alone = Engine(model, ip, tok, batch_wait_ms=0)
    assert {e.choice: (e.reason, e.text) for e in long_out if isinstance(e, ChoiceFinished)} == _run_alone(alone, long)


def test_decode_slice_zero_or_no_prefix_cache_never_pauses():
    model, ip, tok = readable_tiny()
    for kw in ({"decode_slice": 0}, {"prefix_cache_mb": 0}):
        eng = Engine(model, ip, tok, batch_wait_ms=0, **kw)
        long, _, long_out = _job(eng, "one two", temperature=0)
        long.prompts[0].max_tokens = 20
        other, _, _ = _job(eng, "a dog", temperature=0.5)
        eng._pending.append(other)
        eng._generate([long])
        assert list(eng._pending) == [other] and long.resume is None and long_out[-1] == JobDone()
    with pytest.raises(ValueError, match="decode_slice"):
        Engine(model, ip, tok, decode_slice=-1)


def test_too_many_rows_and_full_queue(engine):
    job, _, _ = _job(engine, "a", n=5)
    with pytest.raises(APIError) as e:
        engine.submit(job)
    assert e.value.status == 400


def test_cancelled_jobs_hold_no_place_in_a_full_queue():
    """Requests whose clients went away stayed in the queue, counted against --max-queue, until the
    worker's next batch: the server answered 503 to live requests while the queue held only dead ones."""
    model, ip, tok = readable_tiny()
    eng = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0, max_queue=2).start()
    try:
        eng.pause()  # (as a worker busy with a long batch)
        gone = [_job(eng, "a red", temperature=0) for _ in range(2)]
        for job, _, _ in gone:
            eng.submit(job)
        with pytest.raises(APIError) as e:
            eng.submit(_job(eng, "a dog", temperature=0)[0])
        assert e.value.status == 503
        for job, _, _ in gone:
            job.cancel()
        assert eng.queue_depth() == 0 and eng.stats.snapshot()["cancelled_requests"] == 2
        live, done, out = _job(eng, "a dog", temperature=0)
        eng.submit(live)
        eng.resume()
        assert done.wait(60) and out[-1] == JobDone()
        assert all(not o for _, _, o in gone)
    finally:
        eng.stop()


# -- command line --------------------------------------------------------------------------------------
def test_add_serve_subcommand():
    parser = argparse.ArgumentParser(prog="flamingo-vlm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_subcommand(sub)
    args = parser.parse_args(["serve", "--model", "m", "--port", "9000", "--image-dir", "/tmp",
                              "--allow-remote-images", "--max-batch-size", "4"])
    assert args.command == "serve" and args.model == "m" and args.port == 9000 and args.host == "127.0.0.1"
    assert args.allow_remote_images and args.max_batch_size == 4 and args.image_dir == Path("/tmp")
    assert callable(args.func)
    assert parser.parse_args(["serve"]).model == "smol-synthetic"  # the built-in model by default



@pytest.mark.parametrize("native_bf16", [True, False])
def test_serve_and_generate_load_the_model_in_the_same_dtype_by_default(native_bf16, monkeypatch):
    # the same prompt must get the same greedy answer from both: a near-tie can differ between dtypes
    import flamingo_vlm.pretrained as pretrained
    from flamingo_vlm import cli, generate
    from flamingo_vlm.modeling import fast_linear
    from flamingo_vlm.serve import cli as serve_cli

    class Loaded(Exception):
        pass

    asked = []

    def from_pretrained(name, *, dtype=None, **kw):
        asked.append(dtype)
        raise Loaded

    monkeypatch.setattr(fast_linear, "fast_bf16", lambda device=None: native_bf16)
    monkeypatch.setattr(pretrained, "from_pretrained", from_pretrained)
    monkeypatch.setattr(serve_cli, "listen_socket", lambda host, port: socket.socket())
    for call in (lambda: cli.main(["serve"]), lambda: generate._load("smol-synthetic", "auto", None)):
        with pytest.raises(Loaded):
            call()
    assert asked == [torch.bfloat16 if native_bf16 else torch.float32] * 2
    args = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(args)
    assert args.parse_args(["--dtype", "float32"]).dtype == "float32"


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "0", "give a whole number >= 1"), ("--threads", "-3", "give a whole number >= 1"),
    ("--default-max-tokens", "0", ">= 1"), ("--max-batch-size", "0", ">= 1"), ("--max-queue", "0", ">= 1"),
    ("--max-context", "0", ">= 1"), ("--image-cache-size", "-1", ">= 0"), ("--prefix-cache-mb", "-1", ">= 0"),
    ("--prefill-chunk", "-1", ">= 0"),
    ("--batch-wait-ms", "-5", "give a number >= 0"), ("--request-timeout", "0", "give a number > 0"),
    ("--header-timeout", "-1", "> 0"), ("--remote-timeout", "nan", "> 0"), ("--max-request-bytes", "0", ">= 1"),
    ("--max-images", "-1", ">= 0"), ("--max-image-pixels", "0", ">= 1"), ("--max-score-candidates", "x", ">= 1"),
    ("--remote-timeout", "inf", "> 0"), ("--batch-wait-ms", "1e400", ">= 0"), ("--prefix-cache-mb", "inf", ">= 0"),
])
def test_serve_limits_out_of_range_are_usage_errors_before_the_model_loads(flag, value, message, monkeypatch, capsys):
    from flamingo_vlm import cli
    from flamingo_vlm.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "build_server", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", flag, value])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert e.value.code == 2 and f"argument {flag}: '{value}': give " in last and message in last, err


def test_a_context_past_the_lms_positions_is_refused(engine):
    limit = engine.max_context
    with pytest.raises(ValueError, match=f"--max-context. {limit + 1} is more than this model's context of {limit}"):
        Engine(engine.model, engine.image_processor, engine.tokenizer, max_context=limit + 1)

def test_a_bad_address_is_a_one_line_error_before_the_model_loads(monkeypatch, capsys):
    import socket

    from flamingo_vlm import cli
    from flamingo_vlm.serve import cli as serve_cli

    monkeypatch.setattr(serve_cli, "build_server", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--port", "99999"])
    assert e.value.code == 2 and "'99999' is not a port" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 1
        err = capsys.readouterr().err
        assert err.startswith("flamingo-vlm serve: error: cannot listen on 127.0.0.1:") and "--port" in err
    finally:
        taken.close()
    assert cli.main(["serve", "--host", "no-such-host.invalid"]) == 1
    assert "--host no-such-host.invalid: cannot listen there" in capsys.readouterr().err
    first = serve_cli.listen_socket("127.0.0.1", 0)  # a second server on the port of one still loading its model
    try:
        assert cli.main(["serve", "--port", str(first.getsockname()[1])]) == 1
        assert "Address already in use" in capsys.readouterr().err
    finally:
        first.close()
    assert serve_cli.listen_socket("localhost", 0).getsockname()[0] == "127.0.0.1"  # as uvicorn binds names


def test_serve_command_in_a_subprocess(serve_model_dir):  # noqa: F811
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flamingo_vlm.serve", "--model", str(serve_model_dir), "--port", str(port),
         "--threads", "1", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == MODEL_NAME
        r = httpx.post(base + "/v1/completions", json={"prompt": "a red", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(base + "/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the bound on prompt length in characters ------------------------------------------------------
def _tokenizer_from(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_chars_per_token_bound_holds_on_hostile_text():
    """(len(text) - silent characters) / k tokens at least, for the built-in tokenizer: the longest
    token repeated, bytes it has no symbol for, and characters of every UTF-8 length."""
    from transformers import AutoTokenizer

    from flamingo_vlm.registry import DEFAULT_MODEL, builtin_model_dir
    from flamingo_vlm.serve.tokens import max_chars_per_token

    tok = AutoTokenizer.from_pretrained(builtin_model_dir(DEFAULT_MODEL))
    k, silent = max_chars_per_token(tok)
    vocab = tok.get_vocab()
    longest = max(vocab, key=len)
    texts = [
        tok.convert_tokens_to_string([longest]) * 50,
        "<|endofchunk|><image>" * 40,
        silent * 100 + "a",
        "a" * 5000, " " * 5000, "\n" * 5000,
        "é字😀\U00040000" * 300,  # 2-, 3- and 4-byte characters (the last one's lead byte has no symbol)
    ]
    for text in texts:
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n * k >= len(text) - sum(text.count(c) for c in silent), (text[:40], n, k)
    assert k >= len(longest)


def test_chars_per_token_bound_only_where_it_holds():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from flamingo_vlm.serve.tokens import max_chars_per_token

    # WordPiece: one [UNK] stands for a whole word of any length; whitespace disappears.
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_chars_per_token(_tokenizer_from(wordpiece)) is None
    # BPE whose normalizer strips text, or whose pre-tokenizer drops it.
    bpe = Tokenizer(models.BPE({"[UNK]": 0, "a": 1, "b": 2}, [], unk_token="[UNK]"))
    bpe.normalizer = normalizers.Strip()
    assert max_chars_per_token(_tokenizer_from(bpe)) is None
    bpe.normalizer = None
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert max_chars_per_token(_tokenizer_from(bpe)) is None
    # NFC composes up to 4 characters into one: the bound allows for it.
    bpe.pre_tokenizer = None
    bpe.normalizer = normalizers.NFC()
    k, silent = max_chars_per_token(_tokenizer_from(bpe))
    assert k == 4 * len("[UNK]") and silent == ""


def test_model_encodes_images_one_by_one():
    """Flamingo.encode_images is what encode_vision_x gives each image (the engine's only view of
    the perceiver), with media_passthrough too."""
    from tiny import random_images, tiny_lm, tiny_tokenizer, tiny_vision

    from flamingo_vlm import create_model_and_transforms

    tokenizer = tiny_tokenizer()
    model, image_processor, tokenizer = create_model_and_transforms(
        tiny_vision(), None, tiny_lm("llama", vocab_size=len(tokenizer)), tokenizer,
        perceiver_kwargs={"media_passthrough": True, "num_latents": 4})
    pixels = torch.stack([image_processor(im) for im in random_images(3)]).unsqueeze(1)  # (3, F=1, C, H, W)
    with torch.no_grad():
        each = model.encode_images(pixels)
        together = model.encode_vision_x(pixels.unsqueeze(0))[0]
    assert model.images_encode_independently
    assert each.shape[0] == 3 and each.shape[1] > 4  # the latents and the passed-through cells
    torch.testing.assert_close(each, together)


def test_the_served_id_of_a_runs_export_names_the_run(tmp_path, monkeypatch):
    """Every trained model was served as `final` (the name of the directory `train` exports to)."""
    from flamingo_vlm.serve.cli import _model_name

    for rel in ("runs/tiny/final", "models/my-model"):
        (tmp_path / rel).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _model_name("runs/tiny/final") == "tiny/final"
    assert _model_name("models/my-model") == "my-model"
    assert _model_name("smol-synthetic") == "smol-synthetic" and _model_name("org/repo") == "org/repo"


def test_a_runs_export_is_also_answered_by_its_old_id(tmp_path):
    """Clients written when a run's export was served as `final` still get it beside `run/final`."""
    from tiny import tiny_flamingo

    from flamingo_vlm.cli import build_parser
    from flamingo_vlm.serve.cli import build_server

    model, ip, tok = tiny_flamingo("llama")
    model.save_pretrained(tmp_path / "runs" / "t" / "final", tokenizer=tok, image_processor=ip)
    parser = build_parser()
    for extra, name, others in (([], "t/final", ["final"]), (["--served-model-name", "mine"], "mine", [])):
        args = parser.parse_args(["serve", "--model", str(tmp_path / "runs" / "t" / "final"), "--dtype", "float32",
                                  *extra])
        app, engine, config = build_server(args)
        assert config.model_name == name and config.extra_model_names == others
        from fastapi.testclient import TestClient

        with TestClient(app) as client:  # (listed once: /v1/models showed "t/final" and "final")
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [name]
            for alias in others:
                assert client.get(f"/v1/models/{alias}").json()["id"] == alias
