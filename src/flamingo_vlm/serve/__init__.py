"""OpenAI-compatible HTTP serving for Flamingo models (``flamingo-vlm serve``).

Needs the ``serve`` extra (FastAPI, uvicorn). Submodules, model side (no web dependencies):
:mod:`.engine` (the model worker and dynamic batching), :mod:`.jobs` (the jobs it runs and the
typed events it answers with), :mod:`.tokens` (context length bounds). Web side: :mod:`.app` (the
FastAPI app), :mod:`.routes` (its endpoints), :mod:`.state` (what they share), :mod:`.prepare`
(request -> job), :mod:`.channel` (events -> response), :mod:`.prompt` (chat messages -> Flamingo
prompt), :mod:`.images` (safe image loading), :mod:`.cli`.
"""

from .cli import add_serve_subcommand

__all__ = ["add_serve_subcommand", "create_app", "Engine", "ServeConfig"]


def __getattr__(name):
    if name in ("create_app", "ServeConfig"):
        from . import app

        return getattr(app, name)
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
