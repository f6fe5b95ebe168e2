"""``GET /v1/models`` and ``GET /v1/models/{id}``: the served model ids, with two fields OpenAI's
model object does not have: ``max_model_len`` (the context, as vLLM names it) and
``demo_separator`` (what goes between a demonstration's ``<|endofchunk|>`` and the next ``<image>``
for this model; the page joins its steps with it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..state import ServerState, get_state

router = APIRouter()


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "flamingo-vlm",
            "max_model_len": state.engine.max_context, "demo_separator": state.engine.demo_separator}


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(get_state)):
    # the served model once: its other names (a run's export still answers to "final") are aliases that
    # requests may send, not models a client should offer twice
    return {"object": "list", "data": [_model_card(state, state.config.model_name)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: ServerState = Depends(get_state)):
    return _model_card(state, state.check_model(model_id))
