"""The FastAPI application: OpenAI-compatible endpoints over an :class:`~.engine.Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (raw interleaved prompt with an
``images`` extension field), ``POST /v1/score`` (rank candidate answers by log-likelihood),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text),
and ``GET /`` (a few-shot prompt builder page), each group a router in :mod:`.routes`. Every error
is an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

The endpoints share one :class:`~.state.ServerState` (``app.state.server``). Requests are prepared
in worker threads (:mod:`.prepare`), run as jobs by the engine, and answered from the engine's
typed events (:mod:`.jobs`, :mod:`.channel`).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..processing import EOC_TOKEN, MEDIA_TOKEN
from .config import ServeConfig
from .engine import Engine
from .errors import APIError
from .routes import completions, models, ops, page, score
from .state import ServerState

log = logging.getLogger("flamingo_vlm.serve")


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


# -- errors ----------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    err = APIError(exc.status_code, message, code=codes.get(exc.status_code))
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError):
    err = APIError(400, f"invalid request: {exc.errors()[0].get('msg', 'invalid value')}", code="invalid_value")
    return JSONResponse(err.body(), status_code=400)


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


# -- the app ---------------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServeConfig | None = None, *, manage_engine: bool = True) -> FastAPI:
    """The server's ASGI app. With ``manage_engine`` the app starts the engine's worker on startup
    and stops it on shutdown."""
    config = config or ServeConfig()

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
    app.state.server = ServerState(engine, config)
    app.state.engine = engine  # for the response counter (and code that knew only these two)
    app.state.config = config
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    for group in (completions, score, models, ops, page):
        app.include_router(group.router)
    page.mount_static(app)
    return app


__all__ = ["ServeConfig", "create_app", "EOC_TOKEN", "MEDIA_TOKEN"]
