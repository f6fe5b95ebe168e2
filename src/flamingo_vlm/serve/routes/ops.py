"""``GET /health`` (status, queue and the engine's counters as JSON) and ``GET /metrics`` (the same
counters in Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..state import ServerState, get_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(get_state)):
    engine = state.engine
    return {
        "status": "ok" if engine.running else "stopped",
        "model": state.config.model_name,
        "max_context": engine.max_context,
        "max_batch_size": engine.max_batch_size,
        "batch_wait_ms": engine.batch_wait * 1000,
        "queue_depth": engine.queue_depth(),
        "busy": engine.busy,
        **engine.stats.snapshot(),
    }


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)):
    engine = state.engine
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
    metric("prefill_chunks_total", "counter", "chunks of long prompts prefilled between other batches",
           [("", s["prefill_chunks"])])
    metric("decode_slices_total", "counter", "generations paused (for queued requests, or to leave finished rows), then continued",
           [("", s["decode_slices"])])
    metric("busy_seconds_total", "counter", "seconds the model worker was busy", [("", s["busy_s"])])
    metric("queue_depth", "gauge", "requests waiting", [("", engine.queue_depth())])
    metric("http_responses_total", "counter", "HTTP responses by status",
           [(f'{{status="{k}"}}', v) for k, v in s["responses_by_status"].items()])
    pc = s["prefix_cache"]
    if pc is not None:
        metric("prefix_cache_lookups_total", "counter", "prompt rows looked up in the prefix cache", [("", pc["rows"])])
        metric("prefix_cache_hits_total", "counter", "prompt rows that reused a cached prefix", [("", pc["hits"])])
        metric("prefix_cache_reused_tokens_total", "counter", "prompt tokens whose keys/values came from the cache",
               [("", pc["reused_tokens"])])
        metric("prefix_cache_evictions_total", "counter", "prefix cache entries dropped for room", [("", pc["evictions"])])
        metric("prefix_cache_bytes", "gauge", "bytes held by the prefix cache", [("", pc["bytes"])])
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
