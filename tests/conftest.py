import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _reference_root() -> Path:
    env = os.environ.get("FLAMINGO_VLM_REFERENCE")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "reference" / "openflamingo-tf4.33"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The OpenFlamingo golden outputs. In CI their absence is a failure, elsewhere a skip."""
    root = _reference_root()
    if not (root / "manifest.json").exists():
        msg = f"OpenFlamingo reference fixtures not found at {root} (set FLAMINGO_VLM_REFERENCE)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread, and it keeps CI runs from fighting over cores.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Kernel choices: no decision memoised in this process, an empty cache dir, the default mode."""
    from flamingo_vlm.modeling import kernels

    monkeypatch.setattr(kernels, "_MEMO", {})
    monkeypatch.setattr(kernels, "_cpu_meter", lambda: lambda: 0.0)  # a quiet machine (tests run beside others)
    monkeypatch.setenv("FLAMINGO_VLM_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    return tmp_path


class ModelLoaded(Exception):
    """Raised by the model loader under :func:`no_model_load`: the code got as far as loading the model."""


@pytest.fixture
def no_model_load(monkeypatch):
    """``flamingo_vlm.pretrained.from_pretrained`` raises :class:`ModelLoaded` (what was checked before the
    model loads shows as another error), and every model name passes ``hub.check_model_available``;
    returns that class."""
    from flamingo_vlm import hub, pretrained

    def load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(pretrained, "from_pretrained", load)
    monkeypatch.setattr(hub, "check_model_available", lambda *args, **kwargs: None)
    return ModelLoaded
