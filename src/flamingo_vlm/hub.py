"""Whether the Hugging Face Hub can be reached at all, and model names resolved to directories.

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

from .errors import missing_local_path, why_not_fetched

logger = logging.getLogger(__name__)

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_KEEP_ANSWER_S = 60.0
_answer: tuple[float, bool] | None = None  # (when asked, unreachable)


def may_download(name) -> bool:
    """Whether loading ``name`` may contact the Hub: a name that is not a built-in backbone
    (``builtin:...``) or an existing local path."""
    from .registry import is_builtin

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


# -- resolving -------------------------------------------------------------------------------------------
def _is_repo_id(name) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


def resolve_directory(name_or_path: str | os.PathLike, *, cache_dir=None, local_files_only=False, revision=None) -> Path:
    """A local directory, or a Hub repo id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; expected a model directory or a Hub repo id")
    from huggingface_hub import snapshot_download

    if not _is_repo_id(name_or_path):  # ("./my_model", "/models/x", "runs/a/final"): meant as a directory
        raise FileNotFoundError(f"model directory {name_or_path} does not exist (nor is it a Hub repo id); "
                                "check the path")

    try:
        return Path(
            snapshot_download(
                str(name_or_path), cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
            )
        )
    except Exception as e:  # offline, unknown repo, unknown revision, auth: one clear message
        at = f" at revision {revision!r}" if revision else ""
        local = missing_local_path(str(name_or_path))
        if local:  # (a local path with a typo reads as a Hub id: say that first)
            raise FileNotFoundError(f"model directory {name_or_path}: {local}; as a Hub repo id it could not be "
                                    f"fetched either ({why_not_fetched(e, local_files_only, cache_dir)})") from e
        raise OSError(
            f"could not get model '{name_or_path}'{at} from the Hugging Face Hub ({why_not_fetched(e, local_files_only, cache_dir)}). "
            "It is not a local directory either. Download it where the Hub is reachable "
            "(`hf download " + str(name_or_path) + " --local-dir DIR`) and give that directory instead, or set "
            "HF_HOME to a Hugging Face cache that holds it"
        ) from e


def hub_file(repo_id: str, filename: str, *, cache_dir=None, local_files_only=False, revision=None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=local_files_only,
                                    revision=revision))
    except Exception as e:
        at = f" at revision {revision!r}" if revision else ""
        raise OSError(
            f"could not get '{filename}' of '{repo_id}'{at} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "download it where the Hub is reachable and pass a local path or cache_dir"
        ) from e


def check_model_available(name_or_path: str | os.PathLike, *, cache_dir=None, local_files_only=False,
                          revision=None) -> None:
    """Raise now what loading ``name_or_path`` would raise after seconds of imports, where that is
    known without them: a model directory that is not there, or a Hub repo that is neither cached nor
    reachable (``generate``, ``serve`` and ``evaluate`` call it before importing the loading layer:
    transformers and the model code; a typo'd ``--model`` took ~5 s to be refused). Built-in models,
    releases and reachable Hub repos are left to the load."""
    from .registry import model_source

    if model_source(name_or_path).kind != "hub":
        return
    from huggingface_hub import constants

    # (a path that is no repo id, "./runs/x", is refused without asking the network)
    if (local_files_only or constants.HF_HUB_OFFLINE or not _is_repo_id(name_or_path) or not may_download(name_or_path)
            or hub_unreachable()):
        resolve_directory(name_or_path, cache_dir=cache_dir, local_files_only=True, revision=revision)
