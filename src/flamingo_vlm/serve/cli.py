"""``flamingo-vlm serve``: an OpenAI-compatible HTTP server for a Flamingo model.

Register it on the main command line with ``add_serve_subcommand(subparsers)``; run it alone with
``python -m flamingo_vlm.serve --model DIR``. FastAPI and uvicorn are imported only when the
server starts, so the rest of the command line works without them.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path

from ..errors import at_least, check_device
from ..generate_cli import dtype_name
from ..hub import check_model_available
from ..registry import DEFAULT_MODEL

DESCRIPTION = """Serve a Flamingo model over HTTP: OpenAI-compatible /v1/chat/completions and
/v1/completions (with images), /v1/score, /v1/models, /health, /metrics, and a few-shot page at /.
Concurrent requests are batched dynamically into shared generate calls."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0-65535 (0 picks a free one)")
    return port


# (a bad limit is a usage error at once, not a server that refuses every request)
POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)
SECONDS = at_least(0, integer=False, strict=True)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound to ``host:port`` and listening before the model loads, so that an
    address in use or a host that does not resolve is a one-line error at once, not a traceback
    after the model loaded. As uvicorn's own ``bind_socket``: IPv6 where ``host`` has a colon, else
    IPv4 (``localhost``: 127.0.0.1; ``""``: every interface), SO_REUSEADDR, inheritable; listening
    right away, so that a second server on the same port is refused here (SO_REUSEADDR lets two
    sockets bind a port that neither listens on yet), and connections made while the model loads
    wait in the backlog."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # (uvicorn's default backlog)
    except socket.gaierror as e:
        sock.close()
        raise SystemExit(f"--host {host}: cannot listen there ({e.strerror or e}); give a local address "
                         "such as 127.0.0.1 or 0.0.0.0") from e
    except OSError as e:
        sock.close()
        hint = "; another process listens there: pick another --port (0 picks a free one)" \
            if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
    sock.set_inheritable(True)
    return sock


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model to serve: a built-in model name, a flamingo-vlm model directory (save_pretrained), a "
                        f"Hub repo in that format, or a released OpenFlamingo repo id (default: {DEFAULT_MODEL}, offline)")
    p.add_argument("--served-model-name",
                   help="the model id clients send (default: the --model directory's name; run/final for a run's export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    g = p.add_argument_group("model")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", type=dtype_name,
                   help="auto (default, as flamingo-vlm generate): bfloat16 where it runs natively (GPUs, CPUs "
                        "with AVX512-BF16 that measured it faster), else float32")
    g.add_argument("--quantize", choices=["int8", "int4"],
                    help="weight-only quantized LM, cross-attention and perceiver linears (CPU only; "
                         "int8 also the LM head; speeds per CPU in the README's Quantized weights)")
    g.add_argument("--threads", type=POSITIVE, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face Hub")
    g.add_argument("--cache-dir", help="Hugging Face cache directory")
    g.add_argument("--max-context", type=POSITIVE, help="context length (default: the LM's position limit)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=POSITIVE, default=8, help="most rows (prompts x n) in one generate call (8)")
    g.add_argument("--batch-wait-ms", type=at_least(0, integer=False), default=5.0,
                   help="how long the oldest queued request waits for others to share its batch (5 ms)")
    g.add_argument("--max-queue", type=POSITIVE, default=256, help="queued requests before answering 503 (256)")
    g.add_argument("--image-cache-size", type=NON_NEGATIVE, default=256,
                   help="images whose encodings are kept for reuse, e.g. few-shot demos (256; 0 disables)")
    g.add_argument("--prefix-cache-mb", type=at_least(0, integer=False), default=256,
                   help="memory for the LM keys/values of prompt prefixes that requests share (few-shot "
                        "demonstrations), least recently used dropped first (256 MiB; 0 disables)")
    g.add_argument("--prefill-chunk", type=NON_NEGATIVE, default=2048,
                   help="a prompt more than 1.5x this many tokens past what the prefix cache holds is prefilled "
                        "this many at a time, the requests that arrive meanwhile served in between (2048; 0: "
                        "one pass; smaller: shorter waits for the others, a slower long prompt)")
    g.add_argument("--decode-slice", type=NON_NEGATIVE, default=32,
                   help="a batch that has generated this many tokens while other requests queue pauses for them "
                        "and continues after, through the prefix cache; finished rows leave their batch the same "
                        "way (32; 0: a batch generates to its end)")
    g = p.add_argument_group("limits")
    g.add_argument("--default-max-tokens", type=POSITIVE, default=64, help="max_tokens when a request gives none (64)")
    g.add_argument("--request-timeout", type=SECONDS, default=300.0,
                   help="seconds a request may take, queueing included, before a 504 (300)")
    g.add_argument("--body-timeout", type=SECONDS, default=30.0,
                   help="seconds to wait for a request's body before a 408 (30)")
    g.add_argument("--header-timeout", type=SECONDS, default=10.0,
                   help="seconds a connection may take to send its request headers before it is closed (10)")
    g.add_argument("--max-request-bytes", type=POSITIVE, default=64 * 1024 * 1024, help="request body limit (64 MiB)")
    g.add_argument("--max-images", type=NON_NEGATIVE, default=8, help="images per request (8)")
    g.add_argument("--max-image-bytes", type=POSITIVE, default=10 * 1024 * 1024, help="bytes per encoded image (10 MiB)")
    g.add_argument("--max-image-pixels", type=POSITIVE, default=25_000_000,
                   help="pixels per image, checked from the header before decoding (25M); also PIL's "
                        "MAX_IMAGE_PIXELS in this process")
    g.add_argument("--max-score-candidates", type=POSITIVE, default=64, help="candidates per /v1/score request (64)")
    g = p.add_argument_group("images")
    g.add_argument("--image-dir", type=Path,
                   help="allow image references that are file paths inside this folder (off by default)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off by default: such requests get a 400)")
    g.add_argument("--remote-timeout", type=SECONDS, default=10.0, help="seconds per remote image fetch (10)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def add_serve_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a command line's subparsers (``flamingo-vlm serve ...``)."""
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=DESCRIPTION)
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def _model_name(model: str) -> str:
    """The id clients send for ``--model``: a Hub id or built-in name as given; a directory's name, with
    its parent's for a run's export (``runs/tiny/final``: ``tiny/final``; every trained model was served
    as ``final``)."""
    path = Path(model)
    if not path.is_dir():
        return model
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name else path.name


def build_server(args: argparse.Namespace):
    """Load the model and build ``(app, engine, config)`` from parsed ``serve`` arguments."""
    import torch
    from PIL import Image

    from ..modeling.fast_linear import auto_dtype
    from ..pretrained import from_pretrained
    from .app import ServeConfig, create_app
    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    # Decompression bombs: PIL itself refuses (DecompressionBombError) past twice this; the server
    # refuses past it from the header, before decoding.
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    # auto as generate's: the same answers from both for the same prompt (a near-tie can differ between dtypes)
    dtype = auto_dtype(args.device) if args.dtype in (None, "auto") else getattr(torch, args.dtype)
    model, image_processor, tokenizer = from_pretrained(
        args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only, dtype=dtype, device=args.device,
        quantize=getattr(args, "quantize", None),
    )
    engine = Engine(model, image_processor, tokenizer, max_batch_size=args.max_batch_size,
                    batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_context=args.max_context,
                    image_cache_size=args.image_cache_size, prefix_cache_mb=args.prefix_cache_mb,
                    prefill_chunk=args.prefill_chunk, decode_slice=args.decode_slice)
    default_name = _model_name(args.model)
    config = ServeConfig(
        model_name=args.served_model_name or default_name,
        image_dir=args.image_dir, allow_remote_images=args.allow_remote_images, remote_timeout=args.remote_timeout,
        max_images=args.max_images, max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout,
        body_timeout=args.body_timeout, header_timeout=args.header_timeout, default_max_tokens=args.default_max_tokens,
        max_score_candidates=args.max_score_candidates,
        # (a run's export was served as "final" before it was "run/final": clients sending that still get it)
        extra_model_names=["final"] if not args.served_model_name and default_name.endswith("/final") else [],
    )
    return create_app(engine, config), engine, config


def run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"serving needs FastAPI and uvicorn ({e}); install them with "
                         "pip install 'flamingo-vlm[serve]'") from e
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise SystemExit(f"--image-dir {args.image_dir} is not a directory")
    check_model_available(args.model, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    check_device(args.device)
    sock = listen_socket(args.host, args.port)  # before the model loads: a bad address fails at once
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app, engine, config = build_server(args)
        from ..modeling.fast_linear import emulated_fp16_note
        from ..modeling.quantize import weights_summary

        port = sock.getsockname()[1]  # (the one picked, for --port 0)
        log = logging.getLogger("flamingo_vlm.serve")
        log.info("serving %r (%s, context %d, batch %d) on http://%s:%d", config.model_name,
                 weights_summary(engine.model), engine.max_context, engine.max_batch_size,
                 f"[{args.host}]" if ":" in args.host else args.host, port)
        param = next(engine.model.perceiver.parameters())
        note = emulated_fp16_note(param.dtype, param.device)
        if note:
            log.warning(note.removeprefix("note: "))
        from .protocol import header_timeout_protocol

        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level,
                                               http=header_timeout_protocol(config.header_timeout)))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flamingo_vlm.serve", description=DESCRIPTION)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
