"""From an HTTP request to engine input: the body read under the server's limits and parsed in a
worker thread, the sampling fields checked, prompts built (images decoded, text tokenized).

Everything that may take long (parsing a large body, decoding images, tokenizing) runs in a worker
thread, never on the event loop; a prompt whose length in characters already shows it cannot fit
the context is refused before it is tokenized (:meth:`~.engine.Engine.surely_over_context`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from ..processing import MEDIA_TOKEN
from .config import ServeConfig
from .errors import APIError, bad_request, from_validation_error
from .images import decode_image, image_bytes
from .jobs import GenerationJob, Prompt, Sink
from .schemas import SamplingParams
from .state import ServerState


# -- the body ------------------------------------------------------------------------------------------
async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The request body: a 413 over ``--max-request-bytes``, a 408 past ``--body-timeout``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_request_bytes:
        raise APIError(413, f"request body of {declared} bytes is over this server's limit of "
                       f"{config.max_request_bytes} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0

    async def _read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_request_bytes:
                raise APIError(413, f"request body is over this server's limit of {config.max_request_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(_read(), timeout=config.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"timed out after {config.body_timeout:g}s waiting for the request body",
                       type="timeout_error", code="request_timeout") from None
    return b"".join(chunks)


def parse_json(raw: bytes, schema: type[BaseModel]):
    """The request body as ``schema`` (runs in a worker thread: a large body never blocks the loop)."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to be a request", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    del obj
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first.get("type") == "json_invalid":  # what json.loads took but pydantic's parser did not
            detail = first.get("ctx", {}).get("error", first.get("msg", ""))
            raise bad_request(f"the request body is not valid JSON for a request: {detail}", code="invalid_json") from None
        raise from_validation_error(e) from None


async def read_json(request: Request, config: ServeConfig, schema: type[BaseModel]):
    raw = await read_body(request, config)
    return await run_in_threadpool(parse_json, raw, schema)


# -- the fields ----------------------------------------------------------------------------------------
def unsupported(param: str, what: str) -> APIError:
    return bad_request(f"{what} is not supported by this server", param=param, code="unsupported_parameter")


def check_sampling(body: SamplingParams) -> None:
    """A 400 for the sampling fields this server does not support, and for bad stop strings."""
    if body.presence_penalty:
        raise unsupported("presence_penalty", "a non-zero presence_penalty")
    if body.frequency_penalty:
        raise unsupported("frequency_penalty", "a non-zero frequency_penalty")
    if body.logprobs not in (None, False, 0):
        raise unsupported("logprobs", "logprobs")
    if body.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    stops = body.stop_list()
    if len(stops) > 4:
        raise bad_request("at most 4 stop sequences", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", param="stop", code="invalid_value")


# -- prompts and jobs ----------------------------------------------------------------------------------
def build_prompt(state: ServerState, text: str, refs: list[tuple[str, str]], max_tokens: int | None,
                 param: str, reserve: int = 0) -> Prompt:
    """Runs in a worker thread: fetch/decode/preprocess images, tokenize, check the context.
    ``refs`` are ``(image reference, where it was given)``. A text too long for the context by its
    length alone is refused before anything else."""
    engine, config, limits = state.engine, state.config, state.limits
    if engine.surely_over_context(text):
        raise bad_request(f"this model's maximum context length is {engine.max_context} tokens, and the prompt "
                          f"({len(text)} characters) is longer than that; shorten it", param=param,
                          code="context_length_exceeded")
    markers = text.count(MEDIA_TOKEN)
    if markers != len(refs):
        raise bad_request(f"the prompt has {markers} {MEDIA_TOKEN} marker(s) but {len(refs)} image(s) were "
                          f"given; put one {MEDIA_TOKEN} where each image goes", param=param,
                          code="image_count_mismatch")
    images, keys = [], []
    for ref, where in refs:
        data = image_bytes(ref, limits, where)
        images.append(engine.preprocess(decode_image(data, limits, where)))
        keys.append(hashlib.sha256(data).hexdigest())
    ids = engine.encode(text)
    if not ids:
        raise bad_request("the prompt is empty", param=param, code="empty_prompt")
    if sum(1 for t in ids if t == engine.media_token_id) != len(images):
        raise bad_request("the prompt's text tokenizes to a different number of images than given",
                          param=param, code="image_count_mismatch")
    ctx = engine.max_context
    if max_tokens is None:
        max_tokens = min(config.default_max_tokens, ctx - len(ids) - reserve)
        if max_tokens < 1:
            raise bad_request(f"this model's maximum context length is {ctx} tokens, and the prompt alone has "
                              f"{len(ids)} tokens; shorten it", param=param, code="context_length_exceeded")
    elif len(ids) + max_tokens + reserve > ctx:
        raise bad_request(
            f"this model's maximum context length is {ctx} tokens; this request needs {len(ids) + max_tokens} "
            f"({len(ids)} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
            param=param, code="context_length_exceeded")
    return Prompt(ids=ids, images=images, max_tokens=max_tokens, image_keys=keys)


def generation_job(prompts: list[Prompt], body: SamplingParams, sink: Sink) -> GenerationJob:
    return GenerationJob(prompts=prompts, n=body.n, stop=body.stop_list(), temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, sink=sink)
