"""Running the server inside this process (tests, benchmarks, notebooks).

``with serve_in_thread(app) as base_url: ...`` starts uvicorn on a free loopback port in a daemon
thread, waits until it accepts requests, and stops it on leaving the block. It uses the server's
HTTP protocol (:mod:`.protocol`, the app's ``header_timeout``), as ``flamingo-vlm serve`` does.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from typing import Iterator


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", *, log_level: str = "warning",
                    startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on ``host`` at a free port; yields the base URL (``http://127.0.0.1:PORT``)."""
    import uvicorn

    from .protocol import header_timeout_protocol

    header_timeout = getattr(getattr(app.state, "config", None), "header_timeout", 10.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            http=header_timeout_protocol(header_timeout))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {startup_timeout}s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def data_url(image, fmt: str = "PNG") -> str:
    """A PIL image or uint8 numpy array (H, W[, C]) as a ``data:`` URL."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt)
    mime = {"JPEG": "jpeg", "JPG": "jpeg"}.get(fmt.upper(), fmt.lower())
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()
