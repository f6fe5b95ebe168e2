"""The FastAPI application: OpenAI-compatible endpoints over an :class:`~.engine.Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (raw interleaved prompt with an
``images`` extension field), ``POST /v1/score`` (rank candidate answers by log-likelihood),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text),
and ``GET /`` (a few-shot prompt builder page). Every error is an OpenAI-style JSON body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Bodies are parsed and prompts prepared (images decoded, text tokenized) in worker threads, never
on the event loop; a prompt whose length in characters already shows it cannot fit the context is
refused before it is tokenized (:meth:`~.engine.Engine.surely_over_context`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..processing import EOC_TOKEN, MEDIA_TOKEN
from .engine import Engine, GenerationJob, Prompt, ScoreJob
from .errors import APIError, bad_request, from_validation_error
from .images import ImageLimits, decode_image, image_bytes
from .prompt import chat_to_prompt
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingParams, ScoreRequest

log = logging.getLogger("flamingo_vlm.serve")
STATIC_DIR = Path(__file__).with_name("static")
FINGERPRINT = f"flamingo-vlm-{__version__}"


@dataclass
class ServeConfig:
    """Server settings (the ``flamingo-vlm serve`` options)."""

    model_name: str = "flamingo"
    image_dir: Path | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    max_images: int = 8
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_request_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 300.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    default_max_tokens: int = 64
    max_score_candidates: int = 64
    extra_model_names: list[str] = field(default_factory=list)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
            image_dir=Path(self.image_dir) if self.image_dir else None,
            allow_remote=self.allow_remote_images, remote_timeout=self.remote_timeout,
        )


# -- request helpers -------------------------------------------------------------------------------
async def read_body(request: Request, config: ServeConfig) -> bytes:
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


def _unsupported(param: str, what: str) -> APIError:
    return bad_request(f"{what} is not supported by this server", param=param, code="unsupported_parameter")


def _check_sampling(body: SamplingParams) -> None:
    if body.presence_penalty:
        raise _unsupported("presence_penalty", "a non-zero presence_penalty")
    if body.frequency_penalty:
        raise _unsupported("frequency_penalty", "a non-zero frequency_penalty")
    if body.logprobs not in (None, False, 0):
        raise _unsupported("logprobs", "logprobs")
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias")
    stops = body.stop_list()
    if len(stops) > 4:
        raise bad_request("at most 4 stop sequences", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", param="stop", code="invalid_value")


class _Channel:
    """Events from the worker thread, delivered into this request's event loop."""

    def __init__(self, deadline: float, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = deadline
        self.timeout = timeout

    def sink(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shut down)
            pass

    async def get(self) -> tuple:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.queue.get(), timeout=remaining)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request did not finish within this server's limit of {self.timeout:g}s "
                           "(--request-timeout)", type="timeout_error", code="timeout") from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _StatusCounter:
    """Counts responses by status (plain ASGI, so streaming responses pass through untouched).
    It wraps the whole middleware stack (see :class:`_App`), so the 500s of Starlette's outermost
    error middleware are counted too, and so is the 500 the server sends when the app fails
    before starting a response."""

    def __init__(self, app, stats):
        self.app, self.stats = app, stats

    def _count(self, status: int) -> None:
        with self.stats.lock:
            self.stats.responses[status] += 1

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._count(message["status"])
            await send(message)

        try:
            return await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self._count(500)  # the server answers 500 for an app that failed before responding
            raise


class _App(FastAPI):
    """FastAPI with the response counter outside everything else (``add_middleware`` would put it
    inside Starlette's ServerErrorMiddleware, which answers unhandled exceptions)."""

    def build_middleware_stack(self):
        return _StatusCounter(super().build_middleware_stack(), self.state.engine.stats)


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServeConfig | None = None, *, manage_engine: bool = True) -> FastAPI:
    """The server's ASGI app. With ``manage_engine`` the app starts the engine's worker on startup
    and stops it on shutdown."""
    config = config or ServeConfig()
    limits = config.image_limits()
    names = [config.model_name, *config.extra_model_names]
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = _App(title="flamingo-vlm", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible serving of Flamingo vision-language models")
    app.state.engine = engine
    app.state.config = config


    # -- errors --------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        err = APIError(exc.status_code, message, code=codes.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = APIError(400, f"invalid request: {exc.errors()[0].get('msg', 'invalid value')}", code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    # -- helpers that need the engine ----------------------------------------------------------------
    def check_model(name: str | None) -> str:
        if name is None or name in names:
            return config.model_name if name is None else name
        shown = name if len(name) <= 100 else name[:100] + f"... ({len(name)} characters)"
        raise APIError(404, f"the model '{shown}' does not exist; this server serves {', '.join(map(repr, names))}",
                       param="model", code="model_not_found")

    def count_images(total: int) -> None:
        if total > config.max_images:
            raise bad_request(f"{total} images in this request, over this server's limit of {config.max_images} "
                              "(--max-images)", param="images", code="too_many_images")

    def build_prompt(text: str, refs: list[tuple[str, str]], max_tokens: int | None, param: str,
                     reserve: int = 0) -> Prompt:
        """Runs in a worker thread: fetch/decode/preprocess images, tokenize, check the context.
        A text too long for the context by its length alone is refused before anything else."""
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

    def make_job(prompts: list[Prompt], body: SamplingParams, channel: _Channel) -> GenerationJob:
        return GenerationJob(prompts=prompts, n=body.n, stop=body.stop_list(), temperature=body.temperature,
                             top_p=body.top_p, seed=body.seed, sink=channel.sink)

    def new_channel() -> _Channel:
        return _Channel(time.monotonic() + config.request_timeout, config.request_timeout)

    async def watch_disconnect(request: Request, job) -> None:
        """Cancel ``job`` if the client goes away before its answer (the body was read already, so
        the next ASGI message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def collect(request: Request, channel: _Channel, job, n_choices: int):
        texts, finish, tokens = [""] * n_choices, ["stop"] * n_choices, [0] * n_choices
        watcher = asyncio.ensure_future(watch_disconnect(request, job))
        try:
            while True:
                event = await channel.get()
                kind = event[0]
                if kind == "finish":
                    _, i, reason, n_tok, text = event
                    texts[i], finish[i], tokens[i] = text, reason, n_tok
                elif kind == "done":
                    return texts, finish, tokens
                elif kind == "error":
                    raise event[1]
        except BaseException:
            job.cancel()
            raise
        finally:
            watcher.cancel()

    async def stream(channel: _Channel, job, *, n_choices: int, chat: bool, rid: str, model: str,
                     prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        now = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({"id": rid, "object": obj, "created": now, "model": model,
                         "system_fingerprint": FINGERPRINT, "choices": choices, **extra})

        def choice(i: int, text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

        completion_tokens = 0
        finished = False
        try:
            if chat:
                for i in range(n_choices):
                    yield chunk([choice(i, "", None, role=True)])
            while True:
                try:
                    event = await channel.get()
                except APIError as e:
                    job.cancel()  # at once, not when the client has read the error
                    yield _sse(e.body())
                    break
                kind = event[0]
                if kind == "delta":
                    yield chunk([choice(event[1], event[2], None)])
                elif kind == "finish":
                    completion_tokens += event[3]
                    yield chunk([choice(event[1], None if chat else "", event[2])])
                elif kind == "done":
                    finished = True
                    if include_usage:
                        yield chunk([], usage=_usage(prompt_tokens, completion_tokens))
                    break
                elif kind == "error":
                    err = event[1] if isinstance(event[1], APIError) else APIError(500, str(event[1]), type="server_error")
                    yield _sse(err.body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                job.cancel()  # the client went away, or it failed: free its rows

    def sse_response(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- endpoints -----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await read_json(request, config, ChatCompletionRequest)
        model = check_model(body.model)
        _check_sampling(body)
        if body.tools:
            raise _unsupported("tools", "tool calling")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise _unsupported("response_format", "a response_format other than text")
        engine.check_rows(body.n)
        text, refs = chat_to_prompt(body.messages)
        count_images(len(refs))
        max_tokens = body.max_completion_tokens or body.max_tokens
        with engine.incoming():
            prompt = await run_in_threadpool(build_prompt, text, refs, max_tokens, "messages")
            channel = new_channel()
            job = make_job([prompt], body, channel)
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
            "usage": _usage(len(prompt.ids), sum(tokens)),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await read_json(request, config, CompletionRequest)
        model = check_model(body.model)
        _check_sampling(body)
        if body.echo:
            raise _unsupported("echo", "echo")
        if body.suffix:
            raise _unsupported("suffix", "suffix")
        if body.best_of not in (None, body.n):
            raise _unsupported("best_of", "best_of other than n")
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not texts:
            raise bad_request("prompt must not be an empty list", param="prompt", code="empty_prompt")
        images = body.images or []
        if isinstance(body.prompt, str):
            if images and not isinstance(images[0], str):
                raise bad_request("with a single prompt, images is a list of image URLs", param="images",
                                  code="invalid_value")
            per_prompt = [list(images)]
        else:
            if images and not all(isinstance(x, list) for x in images):
                raise bad_request("with a list of prompts, images is a list of lists (one per prompt)",
                                  param="images", code="invalid_value")
            per_prompt = [list(x) for x in images] if images else [[] for _ in texts]
            if len(per_prompt) != len(texts):
                raise bad_request(f"{len(texts)} prompts but {len(per_prompt)} image lists", param="images",
                                  code="image_count_mismatch")
        engine.check_rows(len(texts) * body.n)  # before any prompt is prepared
        count_images(sum(len(x) for x in per_prompt))
        prompts = []
        with engine.incoming():
            for p, (text, refs) in enumerate(zip(texts, per_prompt)):
                where = "images" if isinstance(body.prompt, str) else f"images[{p}]"
                tagged = [(ref, f"{where}[{k}]") for k, ref in enumerate(refs)]
                param = "prompt" if isinstance(body.prompt, str) else f"prompt[{p}]"
                prompts.append(await run_in_threadpool(build_prompt, text, tagged, body.max_tokens, param))
            channel = new_channel()
            job = make_job(prompts, body, channel)
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
            "usage": _usage(prompt_tokens, sum(tokens)),
        }

    @app.post("/v1/score")
    async def score(request: Request):
        body: ScoreRequest = await read_json(request, config, ScoreRequest)
        model = check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt (with images) or messages", param="prompt",
                              code="invalid_value")
        if len(body.candidates) > config.max_score_candidates:
            raise bad_request(f"{len(body.candidates)} candidates, over this server's limit of "
                              f"{config.max_score_candidates}", param="candidates", code="too_many_candidates")
        if body.messages is not None:
            if body.images:
                raise bad_request("with messages, put images in the messages, not in images", param="images",
                                  code="invalid_value")
            text, refs = chat_to_prompt(body.messages)
        else:
            text, refs = body.prompt, [(ref, f"images[{k}]") for k, ref in enumerate(body.images or [])]
        count_images(len(refs))
        for i, cand in enumerate(body.candidates):
            if MEDIA_TOKEN in cand:
                raise bad_request(f"candidates must not contain {MEDIA_TOKEN}", param=f"candidates[{i}]",
                                  code="invalid_value")
            if engine.surely_over_context(cand):
                raise bad_request(f"candidate {i} ({len(cand)} characters) is longer than this model's context of "
                                  f"{engine.max_context} tokens", param=f"candidates[{i}]",
                                  code="context_length_exceeded")

        def encode_candidates() -> list[list[int]]:
            out = []
            for i, cand in enumerate(body.candidates):
                ids = engine.encode(cand, special=False)
                if not ids:
                    raise bad_request("a candidate must not be empty", param=f"candidates[{i}]", code="invalid_value")
                out.append(ids)
            return out

        candidates = await run_in_threadpool(encode_candidates)
        longest = max(len(c) for c in candidates)
        prompt = await run_in_threadpool(build_prompt, text, refs, longest, "messages" if body.messages else "prompt")
        channel = new_channel()
        job = ScoreJob(prompt=prompt, candidates=candidates, normalize=body.normalize, sink=channel.sink)
        engine.submit(job)
        scores: list[float] | None = None
        try:
            while True:
                event = await channel.get()
                if event[0] == "scores":
                    scores = event[1]
                elif event[0] == "done":
                    break
                elif event[0] == "error":
                    raise event[1]
        except BaseException:
            job.cancel()
            raise
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        rank = {i: r + 1 for r, i in enumerate(order)}
        return {
            "object": "list", "model": model, "normalize": body.normalize,
            "data": [{"object": "score", "index": i, "candidate": body.candidates[i], "logprob": scores[i],
                      "tokens": len(candidates[i]), "rank": rank[i]} for i in range(len(scores))],
            "ranking": order,
            "best": body.candidates[order[0]],
            "usage": {"prompt_tokens": len(prompt.ids), "candidate_tokens": sum(map(len, candidates)),
                      "total_tokens": len(prompt.ids) + sum(map(len, candidates))},
        }

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "flamingo-vlm",
                "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return model_card(check_model(model_id))

    @app.get("/health")
    async def health():
        return {
            "status": "ok" if engine.running else "stopped",
            "model": config.model_name,
            "max_context": engine.max_context,
            "max_batch_size": engine.max_batch_size,
            "batch_wait_ms": engine.batch_wait * 1000,
            "queue_depth": engine.queue_depth(),
            "busy": engine.busy,
            **engine.stats.snapshot(),
        }

    @app.get("/metrics")
    async def metrics():
        s = engine.stats.snapshot()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
            lines.append(f"# HELP flamingo_{name} {help_}")
            lines.append(f"# TYPE flamingo_{name} {kind}")
            lines.extend(f"flamingo_{name}{labels} {value}" for labels, value in samples)

        metric("batches_total", "counter", "generate calls", [("", s["batches"])])
        metric("batch_size", "counter", "generate calls by rows in the batch",
               [(f'{{rows="{k}"}}', v) for k, v in s["batch_size_histogram"].items()])
        metric("requests_per_batch", "counter", "generate calls by requests in the batch",
               [(f'{{requests="{k}"}}', v) for k, v in s["requests_per_batch_histogram"].items()])
        metric("generation_requests_total", "counter", "generation requests run", [("", s["generation_requests"])])
        metric("score_requests_total", "counter", "scoring requests run", [("", s["score_requests"])])
        metric("prompt_tokens_total", "counter", "prompt tokens processed", [("", s["prompt_tokens"])])
        metric("generated_tokens_total", "counter", "tokens generated", [("", s["generated_tokens"])])
        metric("cancelled_requests_total", "counter", "requests dropped from the queue", [("", s["cancelled_requests"])])
        metric("busy_seconds_total", "counter", "seconds the model worker was busy", [("", s["busy_s"])])
        metric("queue_depth", "gauge", "requests waiting", [("", engine.queue_depth())])
        metric("http_responses_total", "counter", "HTTP responses by status",
               [(f'{{status="{k}"}}', v) for k, v in s["responses_by_status"].items()])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # -- the page ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


__all__ = ["ServeConfig", "create_app", "EOC_TOKEN", "MEDIA_TOKEN"]
