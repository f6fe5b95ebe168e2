"""Shared helpers for the serving tests (no tests here): a tiny model whose greedy output is legible,
saved as a model directory, a context manager that serves it on a free loopback port, and the
built-in model (loaded once per test session) with its own server."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image



def require(module: str):
    """Import ``module``; outside CI a missing one skips the tests, in CI (``CI=true``) it fails them."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'flamingo-vlm[serve,test]')")


require("fastapi")
require("uvicorn")

from flamingo_vlm import load_pretrained  # noqa: E402
from flamingo_vlm.serve.app import ServeConfig, create_app  # noqa: E402
from flamingo_vlm.serve.engine import Engine  # noqa: E402
from flamingo_vlm.serve.testing import data_url, serve_in_thread  # noqa: E402
from tiny import random_images, tiny_flamingo  # noqa: E402

MODEL_NAME = "tiny-flamingo"


def readable_tiny(seed: int = 0):
    """tiny_flamingo() with its output head restricted to whole-word tokens (' cat', ' red', ...),
    '.', and <|endofchunk|>, scaled up: random weights, but the text it writes is readable."""
    model, image_processor, tokenizer = tiny_flamingo("llama", every=1, seed=seed)
    vocab = tokenizer.get_vocab()
    keep = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, i in vocab.items():
        if token.startswith("Ġ") and len(token) > 2 and token[1:].isalpha():
            keep[i] = True
    keep[tokenizer.convert_tokens_to_ids(".")] = True
    keep[tokenizer.convert_tokens_to_ids("<|endofchunk|>")] = True
    head = model.lang_encoder.get_output_embeddings()
    with torch.no_grad():
        head.weight[~keep] = 0
        head.weight[keep] *= 60
    return model, image_processor, tokenizer


def save_readable_tiny(directory: Path) -> Path:
    model, image_processor, tokenizer = readable_tiny()
    return model.save_pretrained(directory, tokenizer=tokenizer, image_processor=image_processor)


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory) -> Path:
    return save_readable_tiny(tmp_path_factory.mktemp("serve") / MODEL_NAME)


@contextlib.contextmanager
def running_server(model_dir: Path, *, max_batch_size: int = 8, batch_wait_ms: float = 30.0, **config):
    """Load ``model_dir`` and serve it; yields ``(base_url, engine)``."""
    model, image_processor, tokenizer = load_pretrained(model_dir)
    engine = Engine(model, image_processor, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    app = create_app(engine, ServeConfig(model_name=MODEL_NAME, **config))
    with serve_in_thread(app) as base_url:
        yield base_url, engine


@functools.lru_cache(maxsize=1)
def builtin_model():
    """``(model, image_processor, tokenizer)`` of the built-in model, loaded once for all the modules
    that serve it (their servers run one after another and share it)."""
    from flamingo_vlm.registry import DEFAULT_MODEL

    return load_pretrained(DEFAULT_MODEL)


@contextlib.contextmanager
def running_builtin_server(*, max_batch_size: int = 4, batch_wait_ms: float = 30.0, **config):
    """Serve the built-in model as ``flamingo-vlm serve`` does by default; yields ``(base_url, engine)``."""
    from flamingo_vlm.registry import DEFAULT_MODEL

    model, image_processor, tokenizer = builtin_model()
    engine = Engine(model, image_processor, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    app = create_app(engine, ServeConfig(model_name=DEFAULT_MODEL, **config))
    with serve_in_thread(app) as base_url:
        yield base_url, engine


def file_data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_urls(n: int, seed: int = 0, size: int = 40) -> list[str]:
    return [data_url(a) for a in random_images(n, seed=seed, size=size)]


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    import io

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def image_message(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
