"""Reading weights files: the one place, below every other layer, so each error names its file.

Used by the model layer (vision-encoder weights), the loaders (``from_pretrained``, OpenFlamingo
checkpoints, MosaicGPT weights) and training checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class WeightsFileError(ValueError):
    """A weights file that exists but cannot be read (truncated, corrupt, not that format)."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(message)
        self.path = Path(path)


def load_weights_file(path: str | Path) -> Any:
    """Read a ``.safetensors`` file (a dict of CPU tensors) or a torch file (``torch.load`` with
    ``weights_only=True``, on CPU). Every failure names the file: :class:`FileNotFoundError`,
    :class:`IsADirectoryError`, :class:`PermissionError`, or :class:`WeightsFileError` for a file
    that is truncated, corrupt or of another format."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a weights file")
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    safetensors = path.suffix == ".safetensors"
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise PermissionError(f"cannot read weights file {path}: permission denied") from e
    except MemoryError:
        raise
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError/UnpicklingError/EOFError, ...
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        if "Unsupported global" in str(e):  # a real pickle of classes torch will not run on load
            why = "it holds objects other than tensors, which torch.load(weights_only=True) refuses"
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), detail)[:300]
        else:
            why = "it is truncated or corrupt; download or save it again"
        kind = "safetensors" if safetensors else "torch"
        raise WeightsFileError(path, f"cannot read {kind} file {path}: {why} ({type(e).__name__}: {detail})") from e
