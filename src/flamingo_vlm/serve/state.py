"""What every endpoint shares: one :class:`ServerState` per app (``app.state.server``), handed to
the endpoints by the :func:`get_state` dependency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from .config import ServeConfig
from .engine import Engine
from .errors import APIError, bad_request
from .images import ImageLimits


@dataclass
class ServerState:
    """The engine, the settings, and what follows from them."""

    engine: Engine
    config: ServeConfig
    limits: ImageLimits = field(init=False)
    names: list[str] = field(init=False)  # the served model ids; the first is the default
    created: int = field(default_factory=lambda: int(time.time()))  # the models' ``created``

    def __post_init__(self) -> None:
        self.limits = self.config.image_limits()
        self.names = [self.config.model_name, *self.config.extra_model_names]

    def check_model(self, name: str | None) -> str:
        """The served model id a request's ``model`` names (the default when left out), else a 404."""
        if name is None or name in self.names:
            return self.config.model_name if name is None else name
        shown = name if len(name) <= 100 else name[:100] + f"... ({len(name)} characters)"
        served = ", ".join(map(repr, self.names))
        raise APIError(404, f"the model '{shown}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def count_images(self, total: int, param: str = "images") -> None:
        """A 400 for a request of more images than ``--max-images`` (``param``: the request field
        that holds them)."""
        if total > self.config.max_images:
            raise bad_request(f"{total} images in this request, over this server's limit of {self.config.max_images} "
                              "(--max-images)", param=param, code="too_many_images")


async def get_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a dependency; ``async`` so it runs on the event loop)."""
    return request.app.state.server
