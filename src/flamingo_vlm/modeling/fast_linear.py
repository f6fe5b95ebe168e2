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
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["onednn_available", "onednn_linears"]


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, b = layer.weight, layer.bias
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


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
    layers = [m for m in module.modules() if _eligible(m)] if enabled and onednn_available() else []
    try:
        for layer in layers:
            layer.forward = _forward.__get__(layer)
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
