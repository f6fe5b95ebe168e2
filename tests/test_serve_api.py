"""The OpenAI-compatible API, through the official ``openai`` client, against a live local server;
dynamic batching under 16 concurrent clients."""

from __future__ import annotations

import threading

import pytest

from test_serve_fixtures import (  # noqa: E402
    require,
    MODEL_NAME,
    image_message,
    image_urls,
    running_server,
    serve_model_dir,  # noqa: F401  (fixture)
)

openai = require("openai")
httpx = require("httpx")


@pytest.fixture(scope="module")
def server(serve_model_dir):  # noqa: F811
    with running_server(serve_model_dir, max_batch_size=8, batch_wait_ms=30) as (base_url, engine):
        yield base_url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def images():
    return image_urls(4, seed=1)


def few_shot(images):
    """OpenFlamingo's captioning prompt as chat turns: two demonstrations, then the query."""
    return [
        image_message(images[0], "Output:"),
        {"role": "assistant", "content": " two cats."},
        image_message(images[1], "Output:"),
        {"role": "assistant", "content": " a red car."},
        image_message(images[2], "Output:"),
    ]


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_completion(client, images):
    r = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content.strip(), "the readable tiny model writes words"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 3 and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy is deterministic.
    again = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_chat_matches_completions_with_the_documented_mapping(client, images):
    chat = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=8, temperature=0)
    raw = client.completions.create(
        model=MODEL_NAME,
        prompt="<image>Output: two cats.<|endofchunk|><image>Output: a red car.<|endofchunk|><image>Output:",
        max_tokens=8, temperature=0, extra_body={"images": images[:3]},
    )
    assert raw.object == "text_completion"
    assert raw.choices[0].text == chat.choices[0].message.content
    assert raw.usage.prompt_tokens == chat.usage.prompt_tokens


def test_chat_streaming(client, images):
    full = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert roles == ["assistant"]
    assert len(pieces) > 1, "text arrives in several chunks"
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_stream_is_server_sent_events(server, images):
    body = {"model": MODEL_NAME, "messages": few_shot(images), "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_n_choices(client, images):
    r = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=6, temperature=1.0,
                                       n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert r.usage.completion_tokens >= 2
    # Streaming with n=2: every choice streams and finishes.
    stream = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=6,
                                            temperature=0, n=2, stream=True)
    finished = {c.index for chunk in stream for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1}


def test_stop(client, images):
    full = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]  # the third word
    cut = text.index(stop)
    r = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=12, temperature=0,
                                       stop=[stop, "never-there"])
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    # Streaming never shows the stop string, even the part of it that came before it was complete.
    stream = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=12,
                                            temperature=0, stop=stop, stream=True)
    assert "".join(c.delta.content or "" for chunk in stream for c in chunk.choices) == text[:cut]


def test_max_tokens_and_length(client, images):
    r = client.chat.completions.create(model=MODEL_NAME, messages=few_shot(images), max_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    if r.usage.completion_tokens == 2:
        assert r.choices[0].finish_reason == "length"


def test_completions_endpoint(client, images):
    r = client.completions.create(model=MODEL_NAME, prompt="<image>Output: a cat.<|endofchunk|><image>Output:",
                                  max_tokens=6, temperature=0, extra_body={"images": images[:2]})
    assert r.choices[0].text.strip()
    stream = client.completions.create(model=MODEL_NAME, prompt="<image>Output: a cat.<|endofchunk|><image>Output:",
                                       max_tokens=6, temperature=0, stream=True, extra_body={"images": images[:2]})
    assert "".join(c.text for chunk in stream for c in chunk.choices) == r.choices[0].text
    # A list of prompts, one image list each, n=2: choices are prompt-major.
    many = client.completions.create(model=MODEL_NAME, prompt=["<image>Output:", "the dog is"], n=2, max_tokens=4,
                                     temperature=0, extra_body={"images": [images[:1], []]})
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: the same answer twice


def test_text_only_prompt(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "a red car and"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_score_ranks_candidates(server, images):
    body = {"model": MODEL_NAME, "prompt": "<image>Output:", "images": images[:1],
            "candidates": [" a cat", " a dog", " red car"]}
    r = httpx.post(server[0] + "/v1/score", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    logprobs = [d["logprob"] for d in out["data"]]
    assert all(lp < 0 for lp in logprobs)
    assert out["ranking"] == sorted(range(3), key=lambda i: -logprobs[i])
    assert sorted(d["rank"] for d in out["data"]) == [1, 2, 3]
    assert out["best"] == body["candidates"][out["ranking"][0]]
    # The same context as chat messages gives the same scores; normalize divides by the token count.
    chat = httpx.post(server[0] + "/v1/score", json={
        "messages": [image_message(images[0], "Output:")], "candidates": body["candidates"], "normalize": True,
    }, timeout=60).json()
    for d, n in zip(chat["data"], out["data"]):
        assert d["logprob"] == pytest.approx(n["logprob"] / n["tokens"], rel=1e-4, abs=1e-5)


def test_repeated_images_are_encoded_once(server, client):
    base, _ = server
    fresh = image_urls(3, seed=99)
    before = httpx.get(base + "/health").json()
    for query in fresh[1:]:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, temperature=0, messages=[
            image_message(fresh[0], "Output:"), {"role": "assistant", "content": " a cat."},
            image_message(query, "Output:")])
    after = httpx.get(base + "/health").json()
    assert after["images_encoded"] - before["images_encoded"] == 3  # the demo once, each query once
    assert after["image_cache_hits"] - before["image_cache_hits"] == 1


def test_health_and_metrics(server):
    base, _ = server
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL_NAME and h["max_context"] == 128
    m = httpx.get(base + "/metrics")
    assert m.status_code == 200 and "flamingo_batches_total" in m.text


def test_sixteen_concurrent_clients_are_batched(server, client, images):
    base, engine = server
    prompts = [
        [image_message(images[i % 4], "Output:")] if i % 2 else few_shot([images[i % 4], images[(i + 1) % 4], images[(i + 2) % 4]])
        for i in range(16)
    ]
    # Each prompt alone first (sequential: no batching possible).
    before = httpx.get(base + "/health").json()
    alone = [client.chat.completions.create(model=MODEL_NAME, messages=p, max_tokens=6, temperature=0)
             .choices[0].message.content for p in prompts]
    mid = httpx.get(base + "/health").json()
    assert mid["batches"] - before["batches"] == 16

    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        try:
            own = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            barrier.wait()
            for round_ in range(2):
                if (i + round_) % 3 == 0:  # some stream, some don't: they share batches
                    stream = own.chat.completions.create(model=MODEL_NAME, messages=prompts[i], max_tokens=6,
                                                         temperature=0, stream=True)
                    text = "".join(c.delta.content or "" for chunk in stream for c in chunk.choices)
                else:
                    text = own.chat.completions.create(model=MODEL_NAME, messages=prompts[i], max_tokens=6,
                                                       temperature=0).choices[0].message.content
                assert text == alone[i], (i, text, alone[i])
                results[i] = text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert len(results) == 16

    after = httpx.get(base + "/health").json()
    served = after["generation_requests"] - mid["generation_requests"]
    batches = after["batches"] - mid["batches"]
    assert served == 32
    assert batches < served, "concurrent requests must share generate calls"
    hist = {int(k): v - mid["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    assert max(k for k, v in hist.items() if v > 0) > 1, hist
    assert after["responses_by_status"].get("500", 0) == 0
