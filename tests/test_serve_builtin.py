"""``flamingo-vlm serve`` on the built-in model (``smol-synthetic``, what it serves by default), through
the official ``openai`` client, with images: chat (plain and streaming), completions, score, and
batches that mix rows with and without images.

The built-in model's perceiver passes its input cells through after the latents
(``media_passthrough``): an image is more tokens than ``perceiver.latents``, which the server must
not assume. The prompts and the expected answers are the bundled demo's (``flamingo-vlm generate
--demo``), whose answers come from the scene generator's ground truth.
"""

from __future__ import annotations

import threading

import pytest

from test_serve_fixtures import builtin_model, file_data_url, require, running_builtin_server

openai = require("openai")

from flamingo_vlm.generate import demo_tasks, example_image, generate_text  # noqa: E402
from flamingo_vlm.processing import EOC_TOKEN, MEDIA_TOKEN  # noqa: E402
from flamingo_vlm.registry import DEFAULT_MODEL  # noqa: E402

VQA, BINDING = demo_tasks()[1], demo_tasks()[2]


@pytest.fixture(scope="module")
def server():
    with running_builtin_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def demo_items(task) -> list:
    """The demo task's items as `flamingo-vlm generate --demo` joins them: with the built-in model's
    demonstration separator ("\n") after each <|endofchunk|>."""
    return task.joined(builtin_model()[0].config.demo_separator)


def raw_prompt(task) -> tuple[str, list[str]]:
    """The demo task as a /v1/completions prompt: text with <image> markers, and the images."""
    text = "".join(MEDIA_TOKEN if kind == "image" else value for kind, value in demo_items(task))
    images = [file_data_url(example_image(value)) for kind, value in task.items if kind == "image"]
    return text, images


def image_part(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": file_data_url(example_image(name))}}


def vqa_chat() -> list[dict]:
    """The VQA demo as chat turns (the serve README's mapping gives back the same prompt, the model's
    separator written after each answer's <|endofchunk|>)."""
    q = "Question:What color is the {}? Short answer:"
    return [
        {"role": "user", "content": [image_part("scene4.png"), {"type": "text", "text": q.format("diamond")}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [image_part("scene5.png"), {"type": "text", "text": q.format("square")}]},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": [image_part("scene6.png"), {"type": "text", "text": q.format("triangle")}]},
    ]


def test_serves_the_builtin_model_by_its_name(client, server):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    assert server[1].max_context > 0


def test_chat_with_images_answers_like_the_library(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=vqa_chat(), max_tokens=VQA.max_new_tokens,
                                       temperature=0)
    answer = r.choices[0].message.content
    assert answer.strip() == VQA.expected  # the scene generator's ground truth
    # The library's own generation on the same few-shot prompt (pixels through vision_x, not the
    # server's per-image encodings) says the same.
    model, image_processor, tokenizer = builtin_model()
    sample = [example_image(v) if kind == "image" else v for kind, v in demo_items(VQA)]
    texts, _ = generate_text(model, image_processor, tokenizer, sample, max_new_tokens=VQA.max_new_tokens,
                             do_sample=False)
    assert answer.strip() == texts[0].strip()
    assert r.usage.prompt_tokens > 3 * 2  # three images and their questions


def test_chat_streaming_with_images(client):
    full = client.chat.completions.create(model=DEFAULT_MODEL, messages=vqa_chat(), max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=vqa_chat(), max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_with_images_match_chat(client):
    text, images = raw_prompt(VQA)
    raw = client.completions.create(model=DEFAULT_MODEL, prompt=text, max_tokens=VQA.max_new_tokens, temperature=0,
                                    extra_body={"images": images})
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=vqa_chat(), max_tokens=VQA.max_new_tokens,
                                          temperature=0)
    assert raw.usage.prompt_tokens == chat.usage.prompt_tokens  # the documented chat -> prompt mapping
    assert raw.choices[0].text == chat.choices[0].message.content
    streamed = client.completions.create(model=DEFAULT_MODEL, prompt=text, max_tokens=VQA.max_new_tokens,
                                         temperature=0, stream=True, extra_body={"images": images})
    assert "".join(c.text for chunk in streamed for c in chunk.choices) == raw.choices[0].text


def demo_chat(task) -> list[dict]:
    """A demo task as alternating chat turns: each demonstration a user turn (image, text up to its
    answer) and an assistant turn (the answer); the query a last user turn. No separators by hand."""
    query = task.items[-1][1]
    messages, parts = [], []
    for kind, value in task.items:
        if kind == "image":
            parts.append(image_part(value))
        elif not value.endswith(EOC_TOKEN):
            messages.append({"role": "user", "content": parts + [{"type": "text", "text": value}]})
        else:
            text = value[: -len(EOC_TOKEN)]
            cut = len(query) if text.startswith(query) else text.rindex(":") + 1
            messages += [{"role": "user", "content": parts + [{"type": "text", "text": text[:cut]}]},
                         {"role": "assistant", "content": text[cut:]}]
            parts = []
    return messages


@pytest.mark.parametrize("task", demo_tasks(), ids=lambda t: t.title.split(",")[0].split(" (")[0])
def test_every_demo_as_a_chat_is_the_demo_prompt(client, task):
    """`flamingo-vlm generate --demo`'s prompts sent as plain alternating turns come out as the same
    prompt (the server writes the model's separator; the counting demo answered otherwise without it)."""
    text, images = raw_prompt(task)
    raw = client.completions.create(model=DEFAULT_MODEL, prompt=text, max_tokens=task.max_new_tokens, temperature=0,
                                    extra_body={"images": images})
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=demo_chat(task),
                                          max_tokens=task.max_new_tokens, temperature=0)
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens
    assert chat.choices[0].message.content == raw.choices[0].text


def test_score_with_images_ranks_the_true_answer_first(client):
    text, images = raw_prompt(BINDING)
    out = client.post("/score", cast_to=object, body={
        "model": DEFAULT_MODEL, "prompt": text, "images": images,
        "candidates": [" " + c for c in BINDING.candidates]})
    assert out["best"] == " " + BINDING.expected  # the name the demonstrations bound to this object
    assert sorted(d["rank"] for d in out["data"]) == [1, 2]
    by_chat = client.post("/score", cast_to=object, body={
        "model": DEFAULT_MODEL, "messages": vqa_chat(), "candidates": ["red", "blue", VQA.expected]})
    assert by_chat["best"] == VQA.expected


def test_batches_mixing_images_and_text_only_rows(client, server):
    """Concurrent requests with 3, 1 and no images share batches (padding slots of the encoded-image
    shape) and answer as each does alone."""
    one = [{"role": "user", "content": [image_part("object1.png"), {"type": "text", "text": "Output:"}]}]
    text_only = [{"role": "user", "content": "Question:What is two plus two? Short answer:"}]
    requests = [vqa_chat(), one, text_only]
    alone = [client.chat.completions.create(model=DEFAULT_MODEL, messages=m, max_tokens=4, temperature=0)
             .choices[0].message.content for m in requests]
    engine = server[1]
    before = engine.stats.snapshot()
    results, errors = {}, []
    barrier = threading.Barrier(len(requests))

    def ask(i):
        try:
            barrier.wait()
            results[i] = client.chat.completions.create(model=DEFAULT_MODEL, messages=requests[i], max_tokens=4,
                                                        temperature=0).choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    engine.pause()  # all three queue up, then run together
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    try:
        while engine.queue_depth() < len(requests) and not errors and any(t.is_alive() for t in threads):
            threading.Event().wait(0.02)
    finally:
        engine.resume()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(len(requests))] == alone
    after = engine.stats.snapshot()
    shared = after["requests_per_batch_histogram"].get("3", 0) - before["requests_per_batch_histogram"].get("3", 0)
    assert shared == 1  # (rows left over once the others ended continue in batches of their own)
    assert after["responses_by_status"].get("500", 0) == 0
