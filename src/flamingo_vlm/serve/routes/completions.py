"""``POST /v1/chat/completions`` and ``POST /v1/completions`` (a raw interleaved prompt with an
``images`` extension field): each request is checked, its prompts prepared in worker threads, and
one :class:`~..jobs.GenerationJob` submitted; the answer is collected or streamed."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..channel import FINGERPRINT, Channel, collect, sse_response, stream, usage
from ..errors import bad_request
from ..prepare import build_prompt, check_sampling, generation_job, read_json, unsupported
from ..prompt import chat_to_prompt
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..state import ServerState, get_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: ServerState = Depends(get_state)):
    engine = state.engine
    body: ChatCompletionRequest = await read_json(request, state.config, ChatCompletionRequest)
    model = state.check_model(body.model)
    check_sampling(body)
    if body.tools:
        raise unsupported("tools", "tool calling")
    # Fields the schema does not name (so they would be ignored) that ask for what this server cannot
    # give: the deprecated form of tools, and log-probabilities asked without logprobs.
    extra = body.model_extra or {}
    if extra.get("functions"):
        raise unsupported("functions", "function calling")
    if extra.get("top_logprobs"):
        raise unsupported("top_logprobs", "top_logprobs")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise unsupported("response_format", "a response_format other than text")
    engine.check_rows(body.n)
    text, refs = chat_to_prompt(body.messages, separator=engine.demo_separator)
    state.count_images(len(refs), "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    with engine.incoming():
        prompt = await run_in_threadpool(build_prompt, state, text, refs, max_tokens, "messages")
        channel = Channel(state.config.request_timeout)
        job = generation_job([prompt], body, channel.sink)
        engine.submit(job)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(stream(channel, job, n_choices=body.n, chat=True, rid=rid, model=model,
                                   prompt_tokens=len(prompt.ids), include_usage=include_usage))
    texts, finish, tokens = await collect(request, channel, job, body.n)
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                     "logprobs": None, "finish_reason": finish[i]} for i in range(body.n)],
        "usage": usage(len(prompt.ids), sum(tokens)),
    }


def _images_per_prompt(body: CompletionRequest, n_prompts: int) -> list[list[str]]:
    """``images`` as one list per prompt (a 400 when its shape does not match ``prompt``'s)."""
    images = body.images or []
    if isinstance(body.prompt, str):
        if images and not isinstance(images[0], str):
            raise bad_request("with a single prompt, images is a list of image URLs", param="images",
                              code="invalid_value")
        return [list(images)]
    if images and not all(isinstance(x, list) for x in images):
        raise bad_request("with a list of prompts, images is a list of lists (one per prompt)",
                          param="images", code="invalid_value")
    per_prompt = [list(x) for x in images] if images else [[] for _ in range(n_prompts)]
    if len(per_prompt) != n_prompts:
        raise bad_request(f"{n_prompts} prompts but {len(per_prompt)} image lists", param="images",
                          code="image_count_mismatch")
    return per_prompt


@router.post("/v1/completions")
async def completions(request: Request, state: ServerState = Depends(get_state)):
    engine = state.engine
    body: CompletionRequest = await read_json(request, state.config, CompletionRequest)
    model = state.check_model(body.model)
    check_sampling(body)
    if body.echo:
        raise unsupported("echo", "echo")
    if body.suffix:
        raise unsupported("suffix", "suffix")
    if body.best_of not in (None, body.n):
        raise unsupported("best_of", "best_of other than n")
    texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not texts:
        raise bad_request("prompt must not be an empty list", param="prompt", code="empty_prompt")
    per_prompt = _images_per_prompt(body, len(texts))
    engine.check_rows(len(texts) * body.n)  # before any prompt is prepared
    state.count_images(sum(len(x) for x in per_prompt))
    prompts = []
    with engine.incoming():
        for p, (text, refs) in enumerate(zip(texts, per_prompt)):
            where = "images" if isinstance(body.prompt, str) else f"images[{p}]"
            tagged = [(ref, f"{where}[{k}]") for k, ref in enumerate(refs)]
            param = "prompt" if isinstance(body.prompt, str) else f"prompt[{p}]"
            prompts.append(await run_in_threadpool(build_prompt, state, text, tagged, body.max_tokens, param))
        channel = Channel(state.config.request_timeout)
        job = generation_job(prompts, body, channel.sink)
        engine.submit(job)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    prompt_tokens = sum(len(p.ids) for p in prompts)
    n_choices = len(prompts) * body.n
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(stream(channel, job, n_choices=n_choices, chat=False, rid=rid, model=model,
                                   prompt_tokens=prompt_tokens, include_usage=include_usage))
    out, finish, tokens = await collect(request, channel, job, n_choices)
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": i, "text": out[i], "logprobs": None, "finish_reason": finish[i]}
                    for i in range(n_choices)],
        "usage": usage(prompt_tokens, sum(tokens)),
    }
