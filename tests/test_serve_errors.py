"""Bad input gets a 4xx with an OpenAI-style JSON error, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import socket
import threading
import struct
import time
import zlib
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from test_serve_fixtures import (  # noqa: E402
    require,
    MODEL_NAME,
    image_message,
    image_urls,
    png_bytes,
    running_server,
    serve_model_dir,  # noqa: F401  (fixture)
)

openai = require("openai")
httpx = require("httpx")

LIMITS = dict(max_images=2, max_image_bytes=60_000, max_image_pixels=200_000, request_timeout=1.5,
              body_timeout=0.5, header_timeout=0.5, max_request_bytes=2_000_000)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "cat.png").write_bytes(png_bytes(np.full((20, 30, 3), 200, dtype=np.uint8)))
    (d.parent / "secret.png").write_bytes(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    return d


@pytest.fixture(scope="module")
def server(serve_model_dir, image_dir):  # noqa: F811
    with running_server(serve_model_dir, max_batch_size=4, batch_wait_ms=5, image_dir=image_dir, **LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def still_serving(base):
    """After every error case, a normal request still succeeds."""
    yield
    r = httpx.post(base + "/v1/completions", json={"prompt": "a red", "max_tokens": 2, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text


def png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(url: str, text: str = "Output:") -> dict:
    return {"model": MODEL_NAME, "messages": [image_message(url, text)], "max_tokens": 2, "temperature": 0}


def expect_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def post(base: str, path: str, **kw) -> httpx.Response:
    return httpx.post(base + path, timeout=30, **kw)


# -- malformed requests ----------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_json(base, body):
    expect_error(post(base, "/v1/chat/completions", content=body, headers={"content-type": "application/json"}),
                 400, "invalid_json")


@pytest.mark.parametrize("patch, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"n": 0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url"),
])
def test_wrong_types(base, patch, param):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], **patch}
    expect_error(post(base, "/v1/chat/completions", json=body), 400, param=param)


def test_wrong_types_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, temperature="hot")
    assert e.value.body["param"] == "temperature"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_unknown_endpoint_and_method(base):
    expect_error(httpx.get(base + "/v1/nothing-here"), 404, "not_found")
    expect_error(httpx.get(base + "/v1/chat/completions"), 405, "method_not_allowed")


@pytest.mark.parametrize("patch, param", [
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),  # (was ignored: a plain answer)
    ({"top_logprobs": 3}, "top_logprobs"),  # (was ignored: no log-probabilities in the answer)
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_unsupported_parameters(base, patch, param):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], **patch}
    expect_error(post(base, "/v1/chat/completions", json=body), 400, param=param)


def test_markers_in_chat_text(base):
    body = {"messages": [{"role": "user", "content": "<image>Output:"}]}
    expect_error(post(base, "/v1/chat/completions", json=body), 400, "invalid_content")


def test_marker_count_mismatch(base):
    body = {"prompt": "<image><image>Output:", "images": image_urls(1)}
    expect_error(post(base, "/v1/completions", json=body), 400, "image_count_mismatch")


def test_too_many_choices(base):
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 5, "max_tokens": 2}
    expect_error(post(base, "/v1/chat/completions", json=body), 400, "too_many_choices")


def test_request_body_too_large(base):
    expect_error(post(base, "/v1/completions", content=b"x" * 2_000_001), 413, "request_too_large")


@pytest.mark.parametrize("patch, param", [
    ({"seed": 2**70}, "seed"),  # more than torch.manual_seed takes
    ({"seed": -(2**70)}, "seed"),
])
def test_out_of_range_numbers(base, patch, param):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    expect_error(post(base, "/v1/chat/completions", json=body), 400, param=param)


def test_the_largest_seed_works(base):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 2**64 - 1}
    assert post(base, "/v1/chat/completions", json=body).status_code == 200


def test_json_nested_too_deeply(base):
    for depth in (200_000, 900):  # past Python's json recursion limit, and past pydantic's
        body = b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * depth + b"]" * depth + b"}"
        expect_error(post(base, "/v1/chat/completions", content=body), 400, "invalid_json")


def test_model_may_be_omitted(base):
    """This server serves one model: a request without ``model`` gets it (documented choice)."""
    r = post(base, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL_NAME


def test_unhandled_errors_are_answered_and_counted(server, monkeypatch):
    """A bug (an exception no handler expects) is a JSON 500, and /health and /metrics count it."""
    base, engine = server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    def count_500s() -> tuple[int, str]:
        h = httpx.get(base + "/health").json()["responses_by_status"].get("500", 0)
        m = [line for line in httpx.get(base + "/metrics").text.splitlines()
             if line.startswith('flamingo_http_responses_total{status="500"}')]
        return h, m[0].split()[-1] if m else "0"

    before = count_500s()
    monkeypatch.setattr(engine, "encode", broken)
    err = expect_error(post(base, "/v1/completions", json={"prompt": "a red", "max_tokens": 2}), 500, "internal_error")
    assert "RuntimeError" in err["message"]
    monkeypatch.undo()
    after = count_500s()
    assert after[0] == before[0] + 1
    assert float(after[1]) == float(before[1]) + 1


# -- images --------------------------------------------------------------------------------------------
def test_too_many_images(client):
    urls = image_urls(3)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]}])
    assert e.value.body["code"] == "too_many_images"


def test_image_over_the_byte_limit(base):
    noise = np.random.default_rng(0).integers(0, 256, (180, 180, 3), dtype=np.uint8)  # ~97 kB of PNG
    data = png_bytes(noise)
    assert len(data) > LIMITS["max_image_bytes"]
    err = expect_error(post(base, "/v1/chat/completions", json=chat(png_url(data))), 413, "image_too_large")
    assert err["param"] == "messages[0].content[0].image_url"


def test_image_over_the_pixel_limit(base):
    data = png_bytes(Image.new("RGB", (1000, 1000), (10, 200, 30)))  # 1M pixels in a few kB
    assert len(data) < LIMITS["max_image_bytes"]
    expect_error(post(base, "/v1/chat/completions", json=chat(png_url(data))), 400, "image_too_many_pixels")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb_is_refused_from_its_header(base):
    """A 100000 x 100000 PNG header over a tiny body: refused before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) \
        + _png_chunk(b"IEND", b"")
    t0 = time.perf_counter()
    err = expect_error(post(base, "/v1/chat/completions", json=chat(png_url(bomb))), 400)
    assert err["code"] in ("image_too_many_pixels",)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), "invalid_image"),
    ("data:image/png;base64,!!!not-base64!!!", "invalid_image"),
    ("data:image/png;base64," + base64.b64encode(png_bytes(np.zeros((64, 64, 3), np.uint8))[:60]).decode(),
     "invalid_image"),
    ("data:nonsense", "invalid_image_url"),
    ("ftp://example.com/cat.png", "invalid_image_url"),
])
def test_undecodable_images(base, url, code):
    expect_error(post(base, "/v1/chat/completions", json=chat(url)), 400, code)


def test_remote_urls_are_refused_by_default(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[image_message(
            "http://127.0.0.1:9/cat.png", "Output:")])
    assert e.value.body["code"] == "remote_images_disabled"
    assert "--allow-remote-images" in e.value.body["message"]


@pytest.mark.parametrize("ref, code", [
    ("cat\u0000.png", "invalid_image_url"),           # no file name holds a NUL
    ("c" * 5000 + ".png", "invalid_image_url"),         # over the file system's name limit
    ("d/" * 3000 + "cat.png", "invalid_image_url"),     # over its path limit
])
def test_impossible_file_names(base, ref, code):
    err = expect_error(post(base, "/v1/chat/completions", json=chat(ref)), 400, code)
    assert len(err["message"]) < 400  # the name is shortened in the message


def test_local_files_from_the_image_dir(base, image_dir):
    r = post(base, "/v1/chat/completions", json=chat("cat.png"))
    assert r.status_code == 200, r.text
    assert post(base, "/v1/chat/completions", json=chat((image_dir / "cat.png").as_uri())).status_code == 200
    expect_error(post(base, "/v1/chat/completions", json=chat("../secret.png")), 403, "image_path_forbidden")
    expect_error(post(base, "/v1/chat/completions", json=chat(str(image_dir.parent / "secret.png"))), 403)
    expect_error(post(base, "/v1/chat/completions", json=chat("missing.png")), 404, "image_not_found")


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_base64_without_the_data_prefix(base, image_dir, fmt, mime):
    """A client that sends an image's bare base64 (no ``data:...;base64,``) is told so, not that no file
    of that name is in the image directory (or that local files are disabled)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 120, dtype=np.uint8)).save(buf, format=fmt)
    err = expect_error(post(base, "/v1/chat/completions", json=chat(base64.b64encode(buf.getvalue()).decode())),
                       400, "invalid_image_url")
    assert "without the data: URL prefix" in err["message"] and f"data:{mime};base64," in err["message"]


# -- context and time limits -----------------------------------------------------------------------------
def test_prompt_over_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                       messages=[{"role": "user", "content": " a red car" * 100}])
    assert e.value.body["code"] == "context_length_exceeded"
    assert "128" in e.value.body["message"]
    # The prompt fits, but not with max_tokens.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=120,
                                       messages=[{"role": "user", "content": " a red car" * 5}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_request_timeout(server, client):
    base, engine = server
    engine.pause()  # the model is busy elsewhere: the request waits in the queue past its limit
    try:
        t0 = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                           messages=[{"role": "user", "content": "a red"}])
        assert e.value.status_code == 504
        assert e.value.body["code"] == "timeout"
        assert 1.0 < time.perf_counter() - t0 < 10
        # Streaming: the headers have gone out, so the timeout arrives as an error event.
        with pytest.raises(openai.APIError) as e:
            for _ in client.chat.completions.create(model=MODEL_NAME, max_tokens=2, stream=True,
                                                    messages=[{"role": "user", "content": "a red"}]):
                pass
        assert "did not finish" in str(e.value)
    finally:
        engine.resume()
    deadline = time.monotonic() + 10
    while engine.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.queue_depth() == 0  # the timed-out requests were dropped, not run
    assert httpx.get(base + "/health").json()["cancelled_requests"] >= 2


def test_client_that_goes_away_frees_its_request(server):
    base, engine = server
    before = httpx.get(base + "/health").json()
    engine.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={"prompt": "a red", "max_tokens": 2}, timeout=0.5)
        time.sleep(0.2)
    finally:
        engine.resume()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = httpx.get(base + "/health").json()
        if after["cancelled_requests"] > before["cancelled_requests"]:
            break
        time.sleep(0.05)
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["generation_requests"] == before["generation_requests"]  # it never ran


def test_slow_request_body(base):
    """A client that stops sending its body gets a 408 after --body-timeout."""
    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": ")
        t0 = time.perf_counter()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data
    assert time.perf_counter() - t0 < 5


def test_unfinished_headers_are_timed_out(base):
    """A connection that never finishes its request headers is closed after --header-timeout."""
    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        assert s.recv(65536) == b""  # closed by the server (a hang would raise socket.timeout)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:  # nothing sent at all
        assert s.recv(65536) == b""
    # A kept-alive connection whose next request stalls in its headers is closed too.
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break


def test_a_huge_prompt_is_refused_before_tokenizing_and_stalls_no_one(serve_model_dir, monkeypatch):  # noqa: F811
    """A body of ~20 MB of text is refused by its length (the context cannot hold it: see
    max_chars_per_token) without being tokenized, and while it is still arriving, a small request
    is answered."""
    with running_server(serve_model_dir, max_request_bytes=32 * 1024 * 1024) as (base, engine):
        assert engine.max_prompt_chars is not None
        tokenized: list[int] = []
        real_encode = engine.encode

        def spy(text, **kw):
            tokenized.append(len(text))
            return real_encode(text, **kw)

        monkeypatch.setattr(engine, "encode", spy)
        text = "a red car " * 2_000_000
        body = ('{"messages": [{"role": "user", "content": "' + text + '"}], "max_tokens": 2}').encode()
        half = len(body) // 2
        release = threading.Event()
        big: dict = {}

        def upload():
            yield body[:half]
            release.wait(60)
            yield body[half:]

        def send_big():
            big["response"] = httpx.post(base + "/v1/chat/completions", content=upload(), timeout=120,
                                         headers={"content-type": "application/json"})

        sender = threading.Thread(target=send_big)
        sender.start()
        try:
            small = httpx.post(base + "/v1/completions", json={"prompt": "a red", "max_tokens": 2}, timeout=60)
            assert small.status_code == 200, small.text
            assert "response" not in big  # answered while the big one was still on its way
        finally:
            release.set()
            sender.join(120)
        err = expect_error(big["response"], 400, "context_length_exceeded")
        assert "characters" in err["message"]
        assert max(tokenized) < len(text)  # only the small prompt was tokenized
        assert max(tokenized) <= engine.max_prompt_chars


def test_errors_are_counted(base):
    statuses = httpx.get(base + "/health").json()["responses_by_status"]
    assert int(statuses.get("400", 0)) > 10
