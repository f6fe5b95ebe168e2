"""From engine events to HTTP answers.

A :class:`Channel` carries one job's events (:mod:`.jobs`) from the engine's worker thread into the
request's event loop, under the request's deadline (``--request-timeout``: a 504). Three readers
turn them into an answer: :func:`collect` (a whole completion), :func:`stream` (server-sent events)
and :func:`collect_scores`. Each cancels its job when it stops reading early (an error, a timeout,
the client gone), so the job's rows are freed at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .. import __version__
from .errors import APIError
from .jobs import ChoiceFinished, Event, Failed, GenerationJob, JobDone, Scored, ScoreJob, TokenDelta

FINGERPRINT = f"flamingo-vlm-{__version__}"


class Channel:
    """Events from the worker thread, delivered into this request's event loop."""

    def __init__(self, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout

    def sink(self, event: Event) -> None:
        """The job's sink (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shut down)
            pass

    async def get(self) -> Event:
        """The next event; a 504 once the request's deadline has passed."""
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self.queue.get(), timeout=remaining)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request did not finish within this server's limit of {self.timeout:g}s "
                           "(--request-timeout)", type="timeout_error", code="timeout") from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- a whole answer ------------------------------------------------------------------------------------
async def _watch_disconnect(request: Request, job: GenerationJob) -> None:
    """Cancel ``job`` if the client goes away before its answer (the body was read already, so
    the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def collect(request: Request, channel: Channel, job: GenerationJob,
                  n_choices: int) -> tuple[list[str], list[str], list[int]]:
    """Each choice's text, finish reason and token count, once the job is done."""
    texts, finish, tokens = [""] * n_choices, ["stop"] * n_choices, [0] * n_choices
    watcher = asyncio.ensure_future(_watch_disconnect(request, job))
    try:
        while True:
            event = await channel.get()
            if isinstance(event, ChoiceFinished):
                i = event.choice
                texts[i], finish[i], tokens[i] = event.text, event.reason, event.tokens
            elif isinstance(event, JobDone):
                return texts, finish, tokens
            elif isinstance(event, Failed):
                raise event.error
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()


async def collect_scores(channel: Channel, job: ScoreJob) -> list[float]:
    """The candidates' scores, once the job is done."""
    scores: list[float] | None = None
    try:
        while True:
            event = await channel.get()
            if isinstance(event, Scored):
                scores = event.scores
            elif isinstance(event, JobDone):
                return scores
            elif isinstance(event, Failed):
                raise event.error
    except BaseException:
        job.cancel()
        raise


# -- server-sent events --------------------------------------------------------------------------------
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream(channel: Channel, job: GenerationJob, *, n_choices: int, chat: bool, rid: str, model: str,
                 prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The job's events as OpenAI stream chunks (``chat.completion.chunk`` or ``text_completion``),
    then ``[DONE]``; an error after the headers went out is an error event."""
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
            if isinstance(event, TokenDelta):
                yield chunk([choice(event.choice, event.text, None)])
            elif isinstance(event, ChoiceFinished):
                completion_tokens += event.tokens
                yield chunk([choice(event.choice, None if chat else "", event.reason)])
            elif isinstance(event, JobDone):
                finished = True
                if include_usage:
                    yield chunk([], usage=usage(prompt_tokens, completion_tokens))
                break
            elif isinstance(event, Failed):
                yield _sse(event.error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancel()  # the client went away, or it failed: free its rows


def sse_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
