"""oneDNN for fp32 linear layers during CPU inference.

torch's fp32 ``F.linear`` on CPU goes to MKL, which runs AVX2 code on non-Intel CPUs and is slow
for the thin products of decoding (one token per row: a matrix-vector product that should run
at memory bandwidth). oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``, IEEE fp32,
no reduced-precision modes) does the same product 2-3x faster there; the results differ from
MKL's at fp32 rounding level (another summation order).

:func:`onednn_linears` routes the ``nn.Linear`` layers of a module to that kernel for the length
of a ``with`` block (generation, scoring, forward without gradients) and restores them after,
also when the block raises. A layer falls back to ``F.linear`` whenever its call is not plain
fp32 CPU inference (gradients wanted, another dtype or device), so the math never changes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fast_bf16", "linear", "onednn_available", "onednn_linears"]

# Set inside an ``onednn_linears`` block (per thread / async context): modules that compute their
# products with :func:`linear` instead of being ``nn.Linear`` (the LM head with new-token rows) follow it.
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("flamingo_vlm_onednn_linears", default=False)


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fast_bf16(device: str | None = None) -> bool:
    """Whether bf16 runs natively here (CUDA, or a CPU with AVX512-BF16/AMX), not emulated."""
    if device and str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _onednn(x, layer.weight, layer.bias)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN inside an :func:`onednn_linears` block (same rules as its layers)."""
    return _onednn(x, w, b) if _ACTIVE.get() else F.linear(x, w, b)


def _eligible(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.Linear  # subclasses (quantized, LoRA-wrapped, ...) keep their own forward
        and "forward" not in vars(layer)  # already routed by an enclosing block, or patched by someone else
        and layer.weight.device.type == "cpu"
        and layer.weight.dtype == torch.float32
    )


@contextlib.contextmanager
def onednn_linears(module: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``module``'s fp32 CPU ``nn.Linear`` layers run on oneDNN; yields how many.

    Nesting is fine (an inner block leaves already routed layers alone). With ``enabled=False``,
    or where this torch has no oneDNN linear kernel, nothing changes.
    """
    on = enabled and onednn_available()
    layers = [m for m in module.modules() if _eligible(m)] if on else []
    token = _ACTIVE.set(True) if on else None
    try:
        for layer in layers:
            layer.forward = _forward.__get__(layer)
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
        if token is not None:
            _ACTIVE.reset(token)
