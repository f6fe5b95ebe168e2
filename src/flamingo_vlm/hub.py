"""Whether the Hugging Face Hub can be reached at all.

Offline, huggingface_hub retries a file it does not have cached five times with backoff (~25 s per
file) before it gives up, so an offline ``load_pretrained("openflamingo/...")`` or ``convert
--release`` took ~30 s to say it cannot download. Where the Hub's host name does not resolve and no
proxy is configured (a proxy resolves names itself), no request can succeed: the loaders then use
the local cache only (``local_files_only``), which answers at once, from the cache if the files are
there and with the usual "download it" error if not. The answer is asked again after a minute, so
a long-lived process (a notebook, a server) sees the network come back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_KEEP_ANSWER_S = 60.0
_answer: tuple[float, bool] | None = None  # (when asked, unreachable)


def may_download(name) -> bool:
    """Whether loading ``name`` may contact the Hub: a name that is not a built-in backbone
    (``builtin:...``) or an existing local path."""
    from .references import is_builtin

    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return False
    return not is_builtin(str(name)) and not Path(name).expanduser().exists()


def hub_unreachable() -> bool:
    """True where the Hub's host name does not resolve and no proxy is set (logged when it starts
    to be so; the answer is kept for a minute)."""
    global _answer
    now = time.monotonic()
    if _answer is not None and now - _answer[0] < _KEEP_ANSWER_S:
        return _answer[1]
    unreachable, reason = _ask()
    if unreachable and not (_answer is not None and _answer[1]):
        logger.warning("%s: using the local Hugging Face cache only", reason)
    _answer = (now, unreachable)
    return unreachable


def forget() -> None:
    """Ask again at the next load (tests; a network that came back)."""
    global _answer
    _answer = None


def _ask() -> tuple[bool, str]:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in _PROXY_VARIABLES):
        return False, ""  # (offline mode already answers from the cache; a proxy resolves names itself)
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return False, ""
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return True, f"{host} does not resolve from here ({e.strerror or e})"
    except OSError:
        return False, ""
    return False, ""


def local_files_only(asked: bool, *names) -> bool:
    """``local_files_only`` for a load of ``names`` (model ids, backbone names or paths): as asked, or
    True where one of them may need the Hub (:func:`may_download`) and the Hub cannot be reached.
    Without names: True wherever the Hub cannot be reached."""
    if asked:
        return True
    if names and not any(may_download(n) for n in names):
        return False  # (built-in or local only: no lookup)
    return hub_unreachable()
