"""oneDNN for linear layers on CPU: fp32 in inference and training alike, bf16 when decoding.

torch's fp32 ``F.linear`` on CPU goes to MKL. oneDNN's linear kernel
(``torch.ops.mkldnn._linear_pointwise``, IEEE fp32, no reduced-precision modes) computes the same
product with another summation order (results differ at fp32 rounding level). Which one is faster
depends on the CPU and the shape (2x either way on the CPUs we measured), so whether it is used is
decided per machine by :mod:`flamingo_vlm.modeling.kernels` (a cached probe), not assumed.

:func:`~.kernels.onednn_linear` is ``F.linear`` on oneDNN with its own backward (the input and weight
gradients are oneDNN GEMMs too; frozen weights get no gradient work). :func:`onednn_linears`
routes the ``nn.Linear`` layers of a module for the length of a ``with`` block and restores them
after, also when the block raises: ``Flamingo.generate/score/forward`` use it without gradients,
the trainer around forward + backward. Each call goes to oneDNN or ``F.linear`` by its size: calls
with few rows (decoding) follow the probe's decode choice, larger ones (prefill, training) its
GEMM choice. Larger bf16 calls (bf16 operands, or any under bf16 autocast, and decode-sized ones
with gradients) are fp32 GEMMs of their bf16 values where this machine's bf16 is emulated
(:func:`~.kernels.upcast_linear`, the ``bf16_gemm`` probe). A call that
is not plain fp32 CPU (another dtype or device, tensor subclasses) falls back to ``F.linear``.
Image encoders' bf16 convolutions without gradients, also those a backbone calls through
``F.conv2d`` itself, take the same fp32 route inside :func:`upcast_convs`.
Decode-sized fp32 and bf16 calls without gradients take the route the machine's ``fp32_decode`` /
``bf16_decode`` probe measured fastest for their row count (:func:`~.kernels.decode_route`): our C
kernel on the weight as it is (:func:`~.native.fp32_linear` / ``bf16_linear``), oneDNN (fp32), or
oneDNN with the weight packed once into its blocked layout (bf16, :func:`~.kernels.packed_linear`, a
copy kept with the weight; ``F.linear`` hands oneDNN the plain matrix, which it re-lays at every
call). On an AMD EPYC Zen 4: ours for fp32 at every row count and for bf16 at 1-4 rows (no copies),
packed copies for bf16 at 5-8 rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .kernels import (DECODE_ROWS, PLAIN_TYPES, cpu_bf16_autocast, decide, decode_route, fused_route, onednn_available, onednn_linear,
                      onednn_route, packed_linear, upcast_linear)

__all__ = ["auto_dtype", "conv", "emulated_fp16_note", "fast_bf16", "linear", "native_decode_isa", "onednn_available", "onednn_linear", "onednn_linears",
           "outside_tracing", "upcast_convs"]

# Set inside an ``onednn_linears`` block (per thread / async context): "force" or "auto" (per call, by
# the call's row count and the machine's choice). Modules that compute their products with
# :func:`linear` instead of being ``nn.Linear`` (the LM head with new-token rows) follow it too.
_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("flamingo_vlm_onednn_linears", default=None)
# The weights whose packed bf16 copies were checked against them in the outermost block (one check
# per weight per generate call, see kernels.packed_linear).
_VERIFIED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("flamingo_vlm_packed_verified", default=None)


def fast_bf16(device: str | None = None) -> bool:
    """Whether bf16 pays here: CUDA with bf16, or a CPU whose native bf16 (AVX512-BF16/AMX)
    measured faster than fp32 (:mod:`.kernels`; emulated bf16 never is)."""
    if device and str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return decide("bf16")


def auto_dtype(device: str | None = None) -> torch.dtype:
    """What ``--dtype auto`` means (``generate``, ``serve``): bf16 where it pays (:func:`fast_bf16`),
    else fp32."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def emulated_fp16_note(dtype: torch.dtype, device: str | None = None,
                       instead: str = "--dtype float32 or bfloat16") -> str | None:
    """A one-line note where ``dtype`` is float16 on a CPU without float16 arithmetic (AVX512-FP16,
    AMX-FP16): torch emulates it, and nothing here routes it to fp32 as bf16 products are (the
    built-in model's demo on the AVX2-only EPYC: 88 s against 15-20 s in float32 or bfloat16).
    ``instead``: the command's own spelling of the faster choices."""
    if dtype is not torch.float16 or (device and not str(device).startswith("cpu")):
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if native:
        return None
    return ("note: this CPU has no float16 arithmetic (torch emulates it, several times slower); "
            f"{instead} runs faster here")


def _use_onednn(x: torch.Tensor, rows: int, mode: str) -> bool:
    """An fp32 CPU call of ``rows`` rows inside a routing block (``mode``): on oneDNN?"""
    if x.device.type != "cpu":
        return False  # (no probe for calls that could not take the route anyway)
    if mode == "force":
        return True
    return decide("decode" if rows <= DECODE_ROWS else "gemm")


def _decode_route(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: int, mode: str) -> str | int | None:
    """For a decode-sized fp32 or bf16 CPU call without gradients inside a routing block (``mode``), ``x``
    and ``w`` of one dtype: the route this machine's ``fp32_decode`` / ``bf16_decode`` probe chose for its
    row count (:func:`~.kernels.decode_route`; ``"onednn"``, ``"packed"``, ``"default"`` or our C
    kernel's SIMD path, an ``int``, where it can take these operands); else ``None``."""
    if not 0 < rows <= DECODE_ROWS or w.dtype is not x.dtype or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    kind = "fp32" if x.dtype is torch.float32 else "bf16"
    if mode == "force":
        return onednn_route(kind)
    route = decode_route(kind, rows)
    if isinstance(route, int) and not _native_ok(x, w, b):
        return "onednn" if kind == "fp32" and decide("decode") else "default"
    return route


# functorch's batched/grad tensors have no storage to hand a C kernel (None where torch lacks the check)
_FUNCTORCH_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _bf16_product(x: torch.Tensor, w: torch.Tensor) -> bool:
    """A CPU call that torch would compute as a bf16 GEMM: bf16 operands, or bf16 autocast."""
    if not x.is_cpu:
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") is torch.bfloat16
    return x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16


def _native_ok(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Operands our C kernel takes besides an fp32/bf16 CPU ``x`` (made contiguous here) and a ``w`` of
    its dtype, outside ``torch.compile``, ``torch.jit.trace`` and functorch transforms (they would not
    see a ctypes call, or have no storage to hand it). (Where the kernel cannot load, no route names
    it: :func:`~.kernels.set_routes`.)"""
    return (type(x) in PLAIN_TYPES and x.shape[-1] == w.shape[1] and _weight_ok(w, b)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not (_FUNCTORCH_WRAPPED is not None and _FUNCTORCH_WRAPPED(x)))


def outside_tracing(x: torch.Tensor) -> bool:
    """Whether a C call may take ``x`` here: not under ``torch.compile`` or ``torch.jit.trace`` (they
    would not see the call), not a functorch-wrapped tensor (no storage to hand it)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or (_FUNCTORCH_WRAPPED is not None and _FUNCTORCH_WRAPPED(x)))


def _weight_ok(w: torch.Tensor, b: torch.Tensor | None) -> bool:
    return (type(w) in PLAIN_TYPES and w.is_cpu and w.dim() == 2 and w.is_contiguous()
            and (b is None or (type(b) in PLAIN_TYPES and b.dtype is w.dtype and b.is_cpu and b.dim() == 1
                               and b.shape[0] == w.shape[0] and b.is_contiguous())))


_KINDS = (torch.float32, torch.bfloat16)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN inside an :func:`onednn_linears` block where the block's policy
    picks it for this call (decode-sized calls and larger GEMMs are decided apart; decode-sized
    fp32 and bf16 calls without gradients on our C kernel, oneDNN or packed weights, as measured for
    their row count)."""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the context variable; compiled code routes nothing)
        return F.linear(x, w, b)
    mode = _ACTIVE.get()
    if mode is None or x.dtype not in _KINDS:
        return F.linear(x, w, b)
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    route = _decode_route(x, w, b, rows, mode)
    if route is None:
        if _bf16_product(x, w) and decide("bf16_gemm"):
            return upcast_linear(x, w, b)
        if x.dtype is torch.float32 and _use_onednn(x, rows, mode):
            return onednn_linear(x, w, b)
    elif isinstance(route, int):
        kernel = native.fp32_linear if x.dtype is torch.float32 else native.bf16_linear
        return kernel(x.contiguous(), w, b, isa=route, check=False)  # (it keeps x's leading dimensions)
    elif route == "onednn":
        return onednn_linear(x, w, b)
    elif route == "packed":
        return packed_linear(x, w, b, _VERIFIED.get())
    return F.linear(x, w, b)


def _upcast_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *rest, **kwargs) -> torch.Tensor:
    """``torch.conv2d(x, w, b, ...)`` as torch would compute it in bf16 (bf16 operands, or bf16
    autocast), run in fp32 on the operands' bf16 values and rounded to bf16: the same product up to
    the summation order, at fp32's speed where bf16 is emulated."""
    with torch.autocast("cpu", enabled=False):
        return torch.conv2d(x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float(),
                            None if b is None else b.to(torch.bfloat16).float(), *rest, **kwargs).to(torch.bfloat16)


def _upcast_conv_applies(x, w, b=None) -> bool:
    """A bf16 CPU convolution without gradients, inside a routing block, on a machine whose bf16
    products run faster as fp32 ones (the ``bf16_gemm`` choice)."""
    return (type(x) in PLAIN_TYPES and type(w) in PLAIN_TYPES and (b is None or type(b) in PLAIN_TYPES)
            and w.is_cpu and _ACTIVE.get() is not None and _bf16_product(x, w)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                  or (b is not None and b.requires_grad)))
            and decide("bf16_gemm"))


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; inside a routing block, a bf16 convolution without gradients where :func:`linear`
    would take :func:`~.kernels.upcast_linear` runs in fp32 on the bf16 values the same way (the
    ViT's patch embedding in bf16 on the AVX2-only EPYC: 1.28 s for 12 images, 26x fp32's time)."""
    if torch.compiler.is_compiling():  # (dynamo cannot trace the context variable)
        return layer(x)
    if _upcast_conv_applies(x, layer.weight, layer.bias):
        with _UpcastConvs():
            return layer(x)
    return layer(x)


class _UpcastConvs(torch.overrides.TorchFunctionMode):
    """Every ``torch.conv2d`` / ``F.conv2d`` call that :func:`_upcast_conv_applies` to, as
    :func:`_upcast_conv`; all other calls as they are. Torch function modes are per thread, so only
    the thread that entered it (one request's image encoding) is affected."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and len(args) >= 2:  # (input and weight given by keyword: left as they are)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _upcast_conv_applies(args[0], args[1], bias):
                rest = {k: v for k, v in kwargs.items() if k != "bias"}
                return _upcast_conv(args[0], args[1], bias, *args[3:], **rest)
        return func(*args, **kwargs)


def upcast_convs(module: nn.Module):
    """Around a call of ``module`` (an image encoder) inside a routing block: its bf16 2-D convolutions
    (``torch.conv2d`` / ``F.conv2d``; not 1-D, 3-D or transposed ones) without gradients as fp32
    ones of the bf16 values where this machine's bf16 is emulated, also those a third-party backbone
    calls through ``F.conv2d`` itself (EfficientNet's "same" padding convolutions). Measured on the
    AVX2-only AMD EPYC, the built-in model's EfficientNet-Lite0 in bf16, three images (its
    ``encode_vision_x`` in a routing block): 765 ms, 85% of it in torch's emulated
    ``_slow_conv2d_forward`` (its 16 depthwise convolutions split per channel: 8993 calls), then
    98 ms; 69 ms in fp32. A no-op (no mode entered) outside a block, under ``torch.compile``, where
    bf16 is native, or where the module holds no ``nn.Conv2d`` with a bf16 weight and no bf16
    autocast is on (or, under autocast, none at all). While the mode is active torch sees a torch
    function override, so fast paths that check for one (``nn.MultiheadAttention``'s fused
    inference path) step aside; it is entered only where bf16 is emulated, where those are slower."""
    if torch.compiler.is_compiling() or _ACTIVE.get() is None or not decide("bf16_gemm"):
        return contextlib.nullcontext()
    autocast = cpu_bf16_autocast()
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            w = m._parameters.get("weight")
            if autocast or (w is not None and w.dtype is torch.bfloat16 and w.is_cpu):
                return _UpcastConvs()
    return contextlib.nullcontext()


def _routed_forward(layer: nn.Linear):
    """``layer``'s forward inside a routing block: :func:`linear`, with the checks of the weight and bias
    that a decode-sized call on our C kernel needs made once for the block instead of at every call
    (a decode step makes hundreds of such calls, and each check costs microseconds). Per call only
    what can change cheaply is compared: the layer still holds the same weight and bias tensors, with
    the same data pointer, dtype, shape and contiguity, and the calling context routes per call
    (``"auto"``). Anything else (a weight replaced or moved, a copy of the layer, a nested
    ``enabled=True`` block, another thread, an input that is not a plain contiguous CPU tensor of
    the weight's dtype) takes :func:`linear` with the layer's current tensors."""
    w = layer._parameters.get("weight")  # (absent where pruning or weight_norm made it a plain attribute)
    b = layer._parameters.get("bias")
    if w is None or w.dim() != 2 or w.shape[1] == 0 or not _native_ok(w.new_empty(1, w.shape[1]), w, b):
        return types.MethodType(lambda self, x: linear(x, self.weight, self.bias), layer)
    kind = "fp32" if w.dtype is torch.float32 else "bf16"
    kernel = native.fp32_linear if kind == "fp32" else native.bf16_linear
    dtype, shape, ptr = w.dtype, w.shape, w.data_ptr()
    k = shape[1]
    bstate = None if b is None else (b.dtype, b.shape, b.data_ptr())

    def same(self) -> bool:
        params = self._parameters
        cw, cb = params.get("weight"), params.get("bias")
        return (cw is w and cb is b and cw.data_ptr() == ptr and cw.dtype is dtype and cw.shape == shape
                and cw.is_contiguous() and (cb is None or ((cb.dtype, cb.shape, cb.data_ptr()) == bstate
                                                            and cb.is_contiguous())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is dtype and type(x) in PLAIN_TYPES and x.is_cpu and x.shape[-1] == k and x.is_contiguous()
                and _ACTIVE.get() == "auto" and same(self)
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                      or (b is not None and b.requires_grad)))):
            rows = x.numel() // k
            if 0 < rows <= DECODE_ROWS:
                route = decode_route(kind, rows)
                if type(route) is int and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not (
                        _FUNCTORCH_WRAPPED is not None and _FUNCTORCH_WRAPPED(x)):
                    return kernel(x, w, b, isa=route, check=False)
        return linear(x, self.weight, self.bias)

    forward.routed = True  # (read by native_decode_isa)
    # a bound method: a deep copy of the layer rebinds it to the copy, whose other tensors then take linear()
    return types.MethodType(forward, layer)


def native_decode_isa(layer: nn.Module, dtype: torch.dtype, rows: int, *, whole_layer: bool = False) -> int | None:
    """The SIMD path of our C kernel that ``layer``, an ``nn.Linear`` routed by the enclosing
    :func:`onednn_linears` block, takes for a call of ``rows`` (decode-sized) rows of ``dtype`` without
    gradients, as this machine's ``fp32_decode`` / ``bf16_decode`` probe chose for that row count;
    ``None`` where it would take another kernel. For callers that run the product themselves (a fused
    block) and have checked their input (a plain contiguous CPU tensor, not traced or compiled).
    ``whole_layer``: for a whole layer's fused step (:func:`.kernels.fused_route`)."""
    forward = vars(layer).get("forward")
    if _ACTIVE.get() != "auto" or not getattr(forward, "routed", False) or dtype not in _KINDS:
        return None
    w, b = layer._parameters.get("weight"), layer._parameters.get("bias")
    if w is None or w.dtype is not dtype or not 0 < rows <= DECODE_ROWS or not _weight_ok(w, b):
        return None
    kind = "fp32" if dtype is torch.float32 else "bf16"
    route = fused_route(kind, rows) if whole_layer else decode_route(kind, rows)
    return route if type(route) is int else None


def _eligible(layer: nn.Module) -> bool:
    return (
        type(layer) is nn.Linear  # subclasses (quantized, LoRA-wrapped, ...) keep their own forward
        and "forward" not in vars(layer)  # already routed by an enclosing block, or patched by someone else
        and type(layer.weight) in PLAIN_TYPES
        and layer.weight.device.type == "cpu"
        and layer.weight.dtype in (torch.float32, torch.bfloat16)
    )


@contextlib.contextmanager
def onednn_linears(module: nn.Module, enabled: bool | None = None) -> Iterator[int]:
    """Inside the block, ``module``'s fp32 and bf16 CPU ``nn.Linear`` layers are routed; yields how many.

    ``enabled=None``: each call runs on oneDNN where this machine's measured choice says so for its
    size (up to ``DECODE_ROWS`` rows: the decode choice; more: the GEMM choice, which also covers
    its backward); the probe runs at the first call that needs it. ``True``: always oneDNN;
    ``False``: nothing changes. Nesting is fine (an inner block leaves routed layers alone).
    Where this torch has no oneDNN linear kernel, nothing changes.
    """
    on = enabled is not False and onednn_available()
    layers = [m for m in module.modules() if _eligible(m)] if on else []
    token = _ACTIVE.set("force" if enabled else "auto") if on else None
    verified = _VERIFIED.set(set()) if on and _VERIFIED.get() is None else None
    try:
        for layer in layers:
            layer.forward = _routed_forward(layer)
        yield len(layers)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
        if verified is not None:
            _VERIFIED.reset(verified)
        if token is not None:
            _ACTIVE.reset(token)
