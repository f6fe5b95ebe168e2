"""Bad input gets a 4xx with an OpenAI-style JSON error, and the server keeps serving."""

from __future__ import annotations

import base64
import socket
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
              body_timeout=0.5, max_request_bytes=2_000_000)


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


def test_local_files_from_the_image_dir(base, image_dir):
    r = post(base, "/v1/chat/completions", json=chat("cat.png"))
    assert r.status_code == 200, r.text
    assert post(base, "/v1/chat/completions", json=chat((image_dir / "cat.png").as_uri())).status_code == 200
    expect_error(post(base, "/v1/chat/completions", json=chat("../secret.png")), 403, "image_path_forbidden")
    expect_error(post(base, "/v1/chat/completions", json=chat(str(image_dir.parent / "secret.png"))), 403)
    expect_error(post(base, "/v1/chat/completions", json=chat("missing.png")), 404, "image_not_found")


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


def test_errors_are_counted(base):
    statuses = httpx.get(base + "/health").json()["responses_by_status"]
    assert int(statuses.get("400", 0)) > 10
