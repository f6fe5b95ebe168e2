"""Turning image references from requests into PIL images, safely.

A reference is one of:

* a ``data:`` URL (``data:image/png;base64,...``): always accepted;
* a local file: a path relative to ``--image-dir`` (or ``file://`` URL / absolute path inside it),
  only when the server was started with ``--image-dir``; paths that resolve outside it (``..``,
  symlinks) are refused;
* an ``http(s)://`` URL: refused unless the server was started with ``--allow-remote-images``.

Limits, each a 4xx with an OpenAI-style error: the encoded size (checked before base64 decoding
and while downloading), the pixel count (read from the image header before any pixel is
decoded, so a decompression bomb is never inflated), and undecodable bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .errors import APIError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    image_dir: Path | None = None
    allow_remote: bool = False
    remote_timeout: float = 10.0


def _too_large(param: str, size: int | str, limit: int) -> APIError:
    return APIError(
        413, f"image is {size} bytes, over this server's limit of {limit} bytes (--max-image-bytes)",
        param=param, code="image_too_large",
    )


def _data_url_bytes(ref: str, limits: ImageLimits, param: str) -> bytes:
    m = _DATA_URL.match(ref)
    if not m:
        raise APIError(400, "malformed data: URL; expected data:image/<type>;base64,<data>", param=param,
                       code="invalid_image_url")
    payload = m.group("data")
    if m.group("b64"):
        payload = re.sub(r"\s+", "", payload)
        # Size check before decoding: base64 is 4 characters per 3 bytes.
        approx = len(payload) * 3 // 4
        if approx > limits.max_bytes + 3:
            raise _too_large(param, f"about {approx}", limits.max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"the data: URL is not valid base64 ({e})", param=param, code="invalid_image") from e
    else:
        data = unquote(payload).encode("latin-1", errors="replace")
    if len(data) > limits.max_bytes:
        raise _too_large(param, len(data), limits.max_bytes)
    return data


def _local_bytes(ref: str, limits: ImageLimits, param: str) -> bytes:
    if limits.image_dir is None:
        raise APIError(
            400, "local image files are disabled on this server (start it with --image-dir DIR to serve files "
            "from DIR); send the image inline as a data: URL instead", param=param, code="local_images_disabled",
        )
    raw = ref
    if ref.startswith("file://"):
        # file://HOST/PATH: a host there is most often the first folder of a relative path
        # (file://scene1.png), which the path alone would silently drop (looking for '').
        parsed = urlparse(ref)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(
                400, f"file URL {_short(ref)} names a host ({parsed.netloc!r}); write file:///ABSOLUTE/PATH inside "
                "the server's image directory, or the path relative to it without file://", param=param,
                code="invalid_image_url",
            )
        raw = unquote(parsed.path)
    shown = _short(raw)
    if "\0" in raw:
        raise APIError(400, f"image path {shown} contains a NUL character; no file name can", param=param,
                       code="invalid_image_url")
    root = limits.image_dir.resolve()
    try:
        path = Path(raw)
        path = (path if path.is_absolute() else root / path).resolve()
        if path != root and root not in path.parents:
            raise APIError(403, f"image path {shown} is outside the server's image directory", param=param,
                           code="image_path_forbidden")
        if not path.is_file():
            raise APIError(404, f"image file {shown} not found in the server's image directory", param=param,
                           code="image_not_found")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise _too_large(param, size, limits.max_bytes)
        return path.read_bytes()
    except (OSError, ValueError) as e:  # a name too long for the file system, a file that vanished, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise APIError(400, f"cannot read image file {shown}: {reason}", param=param, code="invalid_image_url") from e


def _short(text: str, limit: int = 120) -> str:
    """``text`` for an error message: repr, with the middle of a long one left out."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit // 2]) + f" ... ({len(text)} characters) ... " + repr(text[-limit // 4 :])


def _remote_bytes(ref: str, limits: ImageLimits, param: str) -> bytes:
    if not limits.allow_remote:
        raise APIError(
            400, "fetching remote image URLs is disabled on this server (start it with --allow-remote-images); "
            "send the image inline as a data: URL instead", param=param, code="remote_images_disabled",
        )
    import httpx

    try:
        with httpx.Client(timeout=limits.remote_timeout, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", ref) as resp:
                if resp.status_code != 200:
                    raise APIError(400, f"fetching the image {_short(ref)} failed: HTTP {resp.status_code}",
                                   param=param, code="image_fetch_failed")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _too_large(param, int(declared), limits.max_bytes)
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_bytes:
                        raise _too_large(param, f"more than {limits.max_bytes}", limits.max_bytes)
                return bytes(buf)
    except httpx.HTTPError as e:
        raise APIError(400, f"fetching the image {_short(ref)} failed ({type(e).__name__}: {e})", param=param,
                       code="image_fetch_failed") from e


# The first bytes of the image formats a bare base64 string is recognised by (see _bare_base64_mime).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))
_BASE64_HEAD = re.compile(r"^[A-Za-z0-9+/]{64}")


def _bare_base64_mime(ref: str) -> str | None:
    """The image type of ``ref`` when it is an image's base64 without the ``data:`` prefix (a common
    client mistake: it would otherwise be taken for a file name), else None."""
    if not _BASE64_HEAD.match(ref):
        return None
    head = base64.b64decode(ref[:64])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if head.startswith(magic)), None)


def image_bytes(ref: str, limits: ImageLimits, param: str) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise APIError(400, "an image reference must be a non-empty string", param=param, code="invalid_image_url")
    mime = _bare_base64_mime(ref)
    if mime is not None:
        raise APIError(
            400, f"the image is base64 data without the data: URL prefix; send it as data:{mime};base64,<data>",
            param=param, code="invalid_image_url",
        )
    scheme = ref.split(":", 1)[0].lower() if ":" in ref[:10] else ""
    if scheme == "data":
        return _data_url_bytes(ref, limits, param)
    if scheme in ("http", "https"):
        return _remote_bytes(ref, limits, param)
    if scheme in ("", "file") or re.match(r"^[a-zA-Z]:[\\/]", ref):
        return _local_bytes(ref, limits, param)
    raise APIError(400, f"unsupported image URL scheme {scheme!r}: use a data: URL", param=param,
                   code="invalid_image_url")


def decode_image(data: bytes, limits: ImageLimits, param: str) -> Image.Image:
    """Bytes -> RGB image. The pixel count is checked from the header before decoding."""
    try:
        im = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(param, str(e), limits) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise APIError(400, f"cannot decode the image: not a supported image format ({type(e).__name__})",
                       param=param, code="invalid_image") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        raise APIError(400, "the image has no pixels", param=param, code="invalid_image")
    if w * h > limits.max_pixels:
        raise _too_many_pixels(param, f"{w}x{h} = {w * h} pixels", limits)
    try:
        im.load()
        return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _too_many_pixels(param, str(e), limits) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise APIError(400, f"cannot decode the image: the data is corrupt or truncated ({e})", param=param,
                       code="invalid_image") from e
    except Exception as e:  # PIL plugins raise assorted errors on hostile input
        raise APIError(400, f"cannot decode the image ({type(e).__name__}: {e})", param=param,
                       code="invalid_image") from e
    finally:
        im.close()


def _too_many_pixels(param: str, what: str, limits: ImageLimits) -> APIError:
    return APIError(
        400, f"image is too large: {what}, over this server's limit of {limits.max_pixels} pixels "
        "(--max-image-pixels)", param=param, code="image_too_many_pixels",
    )


def load_image(ref: str, limits: ImageLimits, param: str) -> Image.Image:
    return decode_image(image_bytes(ref, limits, param), limits, param)
