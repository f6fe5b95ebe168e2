"""``POST /v1/score``: rank candidate continuations of a context by log-likelihood (one
:class:`~..jobs.ScoreJob`; the context is a ``prompt`` with ``images``, or chat ``messages``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ...processing import MEDIA_TOKEN
from ..channel import Channel, collect_scores
from ..errors import bad_request
from ..jobs import ScoreJob
from ..prepare import build_prompt, read_json
from ..prompt import chat_to_prompt
from ..schemas import ScoreRequest
from ..state import ServerState, get_state

router = APIRouter()


def _encode_candidates(state: ServerState, candidates: list[str]) -> list[list[int]]:
    """The candidates' token ids, without special tokens (runs in a worker thread)."""
    out = []
    for i, cand in enumerate(candidates):
        ids = state.engine.encode(cand, special=False)
        if not ids:
            raise bad_request("a candidate must not be empty", param=f"candidates[{i}]", code="invalid_value")
        out.append(ids)
    return out


@router.post("/v1/score")
async def score(request: Request, state: ServerState = Depends(get_state)):
    engine = state.engine
    body: ScoreRequest = await read_json(request, state.config, ScoreRequest)
    model = state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt (with images) or messages", param="prompt",
                          code="invalid_value")
    if len(body.candidates) > state.config.max_score_candidates:
        raise bad_request(f"{len(body.candidates)} candidates, over this server's limit of "
                          f"{state.config.max_score_candidates}", param="candidates", code="too_many_candidates")
    if body.messages is not None:
        if body.images:
            raise bad_request("with messages, put images in the messages, not in images", param="images",
                              code="invalid_value")
        text, refs = chat_to_prompt(body.messages, separator=engine.demo_separator)
    else:
        text, refs = body.prompt, [(ref, f"images[{k}]") for k, ref in enumerate(body.images or [])]
    state.count_images(len(refs), "messages" if body.messages is not None else "images")
    for i, cand in enumerate(body.candidates):
        if MEDIA_TOKEN in cand:
            raise bad_request(f"candidates must not contain {MEDIA_TOKEN}", param=f"candidates[{i}]",
                              code="invalid_value")
        if engine.surely_over_context(cand):
            raise bad_request(f"candidate {i} ({len(cand)} characters) is longer than this model's context of "
                              f"{engine.max_context} tokens", param=f"candidates[{i}]",
                              code="context_length_exceeded")
    candidates = await run_in_threadpool(_encode_candidates, state, body.candidates)
    longest = max(len(c) for c in candidates)
    prompt = await run_in_threadpool(build_prompt, state, text, refs, longest,
                                     "messages" if body.messages else "prompt")
    channel = Channel(state.config.request_timeout)
    job = ScoreJob(prompt=prompt, candidates=candidates, normalize=body.normalize, sink=channel.sink)
    engine.submit(job)
    scores = await collect_scores(channel, job)
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
