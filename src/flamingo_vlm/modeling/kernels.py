"""Which CPU kernels this machine should use, decided by measuring them once (cached).

Defaults that depend on the CPU are not assumed from its name: oneDNN's fp32 GEMM beats torch's
default (MKL) by 2x on some CPUs (AVX-512 AMD, where MKL runs AVX2 code) and loses to it on others
(measured here on an AVX2-only AMD EPYC: slower for training-sized GEMMs, faster for some decode
shapes). So a short probe times both on the shapes that matter and the faster one wins, with a 10%
margin: oneDNN is used only where it measured clearly faster, never where it was slower.

* ``decode``: fp32 linear layers at 1 and 4 rows over ~110 MB of distinct weights (so the product
  runs from memory, as in decoding), oneDNN vs ``F.linear``; ~0.5 s. Used for calls with up to
  ``DECODE_ROWS`` rows that want gradients (those without follow ``fp32_decode``).
* ``gemm``: fp32 linear forward + backward at 512 rows, oneDNN (:func:`onednn_linear`, defined
  here; routed by :mod:`.fast_linear`) vs ``F.linear``; ~1-2 s. Used for calls with more rows
  (prompt prefill, a forward with labels, the training step).
* ``bf16``: a bf16 GEMM vs the fp32 one at 1024 rows, only on CPUs that report native bf16
  (AVX512-BF16/AMX): whether bf16 weights/autocast pay here (emulated bf16 never does); ~0.5 s.
* ``bf16_gemm``: bf16 linear layers with more rows than decoding (or with gradients: a training
  step under bf16 autocast) on torch's bf16 GEMM, or as fp32 GEMMs of the operands' bf16 values
  rounded back to bf16 (:func:`upcast_linear`: the same product up to the summation order). On
  CPUs with native bf16, forward and backward at 512 x 768 x 3072; where bf16 is emulated, the
  forward at 64 rows (its backward takes seconds). Measured on the AVX2-only AMD EPYC, 1024 x 768 x
  3072: torch's bf16 282 ms forward and 6.4 s for the input gradient, the fp32 route 41 / 49 ms.
  ~0.1 s.
* ``fp32_decode`` and ``bf16_decode``: fp32 / bf16 linear layers without gradients over ~113 MB of
  distinct weights, at each row count of ``DECODE_BUCKETS`` (1, 2, 4, 8): torch's ``F.linear``,
  torch's faster kernel for the dtype where this build has it (fp32: oneDNN; bf16: oneDNN on weights
  packed once into its blocked layout, :func:`packed_linear`, a copy the size of the weight, CPUs
  with native bf16 only) and our C kernel on the weight as it is
  (:func:`flamingo_vlm.modeling.native.fp32_linear` / ``bf16_linear``, in its AVX2 and widest SIMD
  paths). Ours, which needs no copy, is taken where it is within the margin of ``F.linear`` and the
  other is not faster than it by the margin; else the other, where within the margin; else
  ``F.linear``. A call takes the route of the first row count >= its rows (:func:`decode_route`).
  Measured on an AMD EPYC Zen 4: bf16 at one row ``F.linear`` 6.8 ms, packed 4.9, ours 3.4
  (AVX512-BF16), at 8 rows packed faster, so 5-8-row bf16 calls take packed copies there; fp32 ours
  at every row count (1 row: 302 MB in 10.4 ms, oneDNN 12.8, ``F.linear`` 22.9). ~1.5 s each.
  (``decode`` still decides decode-sized fp32 calls that want gradients.)
* ``int8_decode``: int8 weight-only linear layers (``quantize="int8"``) at 1 and 4 rows over ~85 MB
  of distinct int8 weights, torch's ``aten._weight_int8pack_mm`` vs our C kernel
  (:func:`flamingo_vlm.modeling.native.int8_linear`) in each SIMD path this CPU has; the path with
  the lowest time ratio to torch's (geometric mean over 1 and 4 rows) wins, if within the margin. Measured on an AMD EPYC Zen 4: torch's 15-17 GB/s, ours 34 GB/s at
  one row in its AVX2 path (the AVX-512 one: 32 GB/s, and slower at more rows). Runs only where the
  C kernel builds (a C compiler; see :mod:`.native`); ~1 s with the build.
* ``int8_gemm``: int8 weight-only layers with more rows (a prompt's prefill, evaluation's batched
  scoring) at 16 and 64 rows: torch's ``aten._weight_int8pack_mm`` against the int8 matrix
  converted at each call to bf16 (native bf16 only) or fp32 and multiplied by ``F.linear``
  (:func:`int8_gemm`); a call of up to 32 rows takes the 16-row winner, a larger one the 64-row one.
  Measured on an AMD EPYC Zen 4: the bf16 conversion, 2.1x faster than torch's kernel at 64 rows and
  1.4x at 16. ~0.3 s.

Each part runs the first time something needs it (an fp32 CPU ``generate``, a CPU training run, a
``dtype="auto"`` load) and is cached in ``$FLAMINGO_VLM_CACHE/kernels/`` (default
``~/.cache/flamingo-vlm/kernels/``), one JSON file per CPU model, torch version and thread count.
Thread counts stay torch's (one per physical core, or ``OMP_NUM_THREADS``); the allocator is the
process's (``LD_PRELOAD``); both are reported with the choice.

Nothing is assumed for CPUs we could not measure (AMX, AVX-512 Intel): there too the decisions
are these timings. A probe taken while other processes load the CPU can be off; the 10% margin
keeps torch's default in close calls, and ``probe`` measures again.

Override with ``FLAMINGO_VLM_CPU_KERNELS``: ``auto`` (default: probe once, then the cache),
``onednn`` (oneDNN for decode and training, packed bf16 decode where bf16 is native), ``default``
(torch's kernels everywhere), ``probe`` (measure again and rewrite the cache); ``onednn`` also
takes our int8 kernel where it builds, in its widest SIMD path, and larger int8 calls to bf16 GEMMs
where bf16 is native. Packed copies of bf16
weights are bounded by ``FLAMINGO_VLM_PACKED_GB`` (default: a quarter of the machine's memory, or of
the container's where a cgroup limits it; past it the remaining layers run on ``F.linear``; ``0``
turns packing off). This module imports only torch, the standard library, :mod:`.native` and
:mod:`flamingo_vlm.allocator` (both torch and standard library only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from ..allocator import preloaded
from ..files import atomic_file, cache_root
from . import native

__all__ = ["DECODE_BUCKETS", "DECODE_ROWS", "ENV", "INT8_GEMM_BUCKETS", "KernelChoice", "bf16_route", "clear_packed",
           "cpu_bf16_autocast", "cpu_model", "decide", "decode_route", "int8_gemm", "int8_gemm_route", "kernel_choice", "onednn_available",
           "onednn_linear", "onednn_route", "packed_bytes", "packed_linear", "set_routes", "summary", "upcast_linear"]

ENV = "FLAMINGO_VLM_CPU_KERNELS"
_MODES = ("auto", "onednn", "default", "probe")
DECODE_ROWS = 8  # a linear call with at most this many rows (tokens x batch) follows the decode choice
MARGIN = 0.9  # oneDNN / bf16 must take <= 90% of the default's time to be chosen
# A whole layer's fused decoding step (fused_decode: a cross-attention block, a LLaMA layer, an MPT block)
# runs its products on our C kernel, so it is taken only where the probe chose that kernel; where the
# probe chose another (bf16 at 5-8 rows on an AMD EPYC Zen 4: oneDNN on packed weights, 4.49 ms against
# ours 6.18 ms over its layers), ours still goes into the fused step where it measured within this factor
# of the chosen kernel: the step saves more than the products lose (the built-in model, bf16, a decoding
# step of 8 rows: 48-50 ms with the layers' modules, 30 ms in the fused steps).
FUSED_SLACK = 1.5
_LOCK = threading.Lock()
_MEMO: dict[str, bool] = {}


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _allocator() -> str:
    return preloaded() or "glibc malloc"


_MODE_SEEN = ["auto", "auto"]  # the last raw value of the variable and its mode (read at every linear call)


def _mode() -> str:
    raw = os.environ.get(ENV, "auto")
    if raw == _MODE_SEEN[0]:
        return _MODE_SEEN[1]
    mode = raw.strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV}={raw!r}: expected one of {', '.join(_MODES)}")
    _MODE_SEEN[:] = [raw, mode]
    return mode


def cache_file() -> Path:
    root = cache_root()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-")[:60] or "cpu"
    version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    return root / "kernels" / f"{slug}-torch{version}-t{torch.get_num_threads()}.json"


# -- the oneDNN GEMM -----------------------------------------------------------------------------------
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as DTensor or quantized tensors
calls = 0  # products that took the oneDNN path (tests)


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    global calls
    calls += 1
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _plain_fp32(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (type(t) in PLAIN_TYPES and t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)


class _OneDNNLinear(torch.autograd.Function):
    """Keeps for backward only what backward reads, as torch's own linear does: the input where the
    weight is trained, the weight where the input needs a gradient. A frozen layer inside a trained
    model (the LM's and the vision encoder's, in Flamingo training) keeps no activation: keeping its
    input had held ~0.23 GB more at the peak of the benchmark's fp32 training step."""

    @staticmethod
    def forward(ctx, x, w, b):
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
        ctx.save_for_backward(x if need_x else None, w if need_w else None)
        ctx.x_shape = x.shape
        ctx.has_bias = b is not None
        return _lp(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # dL/dx = g @ W: W^T as oneDNN's (out, in) weight
            gx = _lp(g2, w.t(), None).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dL/dW = g^T @ x
            gw = _lp(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` on oneDNN (forward and backward) for plain fp32 CPU tensors."""
    if not (_plain_fp32(x, w, b) and x.dim() >= 1 and x.shape[-1] > 0 and x.numel()) or torch.is_autocast_enabled("cpu"):
        return F.linear(x, w, b)  # (under autocast F.linear computes in bf16, as asked)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _OneDNNLinear.apply(x.contiguous(), w, b)
    return _lp(x, w, b)


# -- bf16 products as fp32 GEMMs (CPUs whose bf16 is emulated) ---------------------------------------
_BF16 = torch.bfloat16


def _bf16_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 (autocast's cast; nothing where it is bf16 already), as fp32 values."""
    return t.to(_BF16).float()


class _UpcastLinear(torch.autograd.Function):
    """:func:`upcast_linear` with gradients. Keeps for backward what a bf16 linear keeps (the bf16
    input where the weight trains, the bf16 weight where the input needs a gradient) and computes
    both gradient products as fp32 GEMMs too, each rounded to bf16 as a bf16 GEMM returns it (then
    to the operand's dtype, as autocast's cast back does). Without this the input gradient
    ``g @ W`` was the slowest product of all on the AVX2-only EPYC: 6.4 s in bf16 against 0.05 s in
    fp32 at 1024 x 768 x 3072."""

    @staticmethod
    def forward(ctx, x, w, b):
        xb, wb = x.to(_BF16), w.to(_BF16)
        ctx.save_for_backward(xb if ctx.needs_input_grad[1] else None, wb if ctx.needs_input_grad[0] else None)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        return _upcast_product(xb, wb, b)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).float()
        gx = gw = gb = None
        with torch.autocast("cpu", enabled=False):
            if ctx.needs_input_grad[0]:  # dL/dx = g @ W
                gx = (g @ wb.float()).to(_BF16).to(x_dtype).view(*grad.shape[:-1], wb.shape[1])
            if ctx.needs_input_grad[1]:  # dL/dW = g^T @ x
                gw = (g.t() @ xb.reshape(-1, xb.shape[-1]).float()).to(_BF16).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                gb = g.sum(0).to(_BF16).to(b_dtype)
        return gx, gw, gb


def upcast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in bf16 (of bf16 operands, or of any under bf16 autocast), computed as an fp32 GEMM
    of the operands' bf16 values and rounded to bf16. A bf16 GEMM accumulates in fp32 too, and a
    product of two bf16 numbers is exact in fp32, so the result is a bf16 GEMM's up to the summation
    order; the ``bf16_gemm`` probe takes it where torch's bf16 GEMM is emulated (no AVX512-BF16 or
    AMX), 7x slower than this at 1024 x 768 x 3072 on the AVX2-only EPYC."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return _UpcastLinear.apply(x, w, b)
    return _upcast_product(x, w, b)


def _upcast_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return F.linear(_bf16_fp32(x), _bf16_fp32(w), None if b is None else _bf16_fp32(b)).to(_BF16)


# -- bf16 weights packed for oneDNN (decoding) ------------------------------------------------------
PACKED_ENV = "FLAMINGO_VLM_PACKED_GB"
PACKED_FRACTION = 0.25  # default budget for packed copies: a quarter of the memory (the container's, if limited)
_FINGERPRINT = 64  # elements sampled across a weight to notice writes its version counter misses


@dataclasses.dataclass
class _Packed:
    ref: weakref.ref  # the weight
    ptr: int  # its storage address when packed
    version: int | None  # its version counter then (None: an inference tensor, which has none)
    fingerprint: torch.Tensor  # _FINGERPRINT elements of it then
    packed: torch.Tensor  # the copy in oneDNN's blocked layout
    nbytes: int


_PACKED: dict[int, _Packed] = {}  # id(weight) -> its packed copy
_PACKED_LOCK = threading.RLock()  # re-entrant: a weakref callback may run inside the locked region (GC)
packs = 0  # weights packed so far (tests)


@functools.cache
def packed_supported() -> bool:
    """oneDNN with bf16 linear kernels, native bf16, and torch's weight packing for them."""
    return onednn_available() and _bf16_supported() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def _budget_for(raw: str) -> int:
    if raw:
        try:
            return int(float(raw) * 1e9)
        except ValueError:
            raise ValueError(f"{PACKED_ENV}={raw!r}: expected a number of GB (0 turns packing off)") from None
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 8 * 10**9
    return int(min(memory, _cgroup_limit() or memory) * PACKED_FRACTION)


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def _cgroup_limit() -> int | None:
    """The container's memory limit, where one is set (a container sees the host's memory in sysconf)."""
    for path in _CGROUP_LIMITS:
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:  # "max" / a huge number: no limit
            return int(raw)
    return None


def _packed_budget() -> int:
    return _budget_for(os.environ.get(PACKED_ENV, "").strip())


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _forget(key: int, ref: weakref.ref) -> None:
    """The weight behind ``ref`` was freed: drop its packed copy."""
    with _PACKED_LOCK:
        entry = _PACKED.get(key)
        if entry is not None and entry.ref is ref:
            del _PACKED[key]


def _version(w: torch.Tensor) -> int | None:
    return None if w.is_inference() else w._version


def _sample(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().view(-1)
    return flat[:: max(1, flat.numel() // _FINGERPRINT)][:_FINGERPRINT].clone()


def _valid(entry: _Packed | None, w: torch.Tensor, verify: bool) -> bool:
    """``entry`` is ``w``'s copy and ``w`` has not changed since: same tensor, storage and version
    counter, and (``verify``) the same sampled elements, which catches writes through ``.data`` that
    the version counter does not see (``p.data.mul_()``, PEFT's adapter merge)."""
    return (entry is not None and entry.ref() is w and entry.ptr == w.data_ptr() and entry.version == _version(w)
            and (not verify or torch.equal(entry.fingerprint, _sample(w))))


def _packed_weight(w: torch.Tensor, verify: bool) -> torch.Tensor | None:
    """``w``'s packed copy, made at its first use and kept while ``w`` lives and is unchanged;
    ``None`` where the budget is spent."""
    global packs
    key = id(w)
    entry = _PACKED.get(key)
    if _valid(entry, w, verify):
        return entry.packed
    nbytes = w.numel() * w.element_size()
    budget = _packed_budget()
    with _PACKED_LOCK:  # (another thread may have packed it meanwhile: look again)
        entry = _PACKED.get(key)
        if _valid(entry, w, verify):
            return entry.packed
        _PACKED.pop(key, None)  # stale, if there
        if packed_bytes() + nbytes > budget:
            return None
        version, fingerprint = _version(w), _sample(w)  # (read before packing: a copy of what was packed)
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
            packed = _pack(w.detach())
        _PACKED[key] = _Packed(weakref.ref(w, lambda ref, k=key: _forget(k, ref)), w.data_ptr(), version,
                               fingerprint, packed, nbytes)
        packs += 1
    return packed


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                  verified: set[int] | None = None) -> torch.Tensor:
    """``F.linear`` for bf16 CPU tensors without gradients, on oneDNN with ``w`` packed once into its
    blocked layout: a copy the size of ``w``, kept while ``w`` lives and made again when ``w``
    changes. The copies together stay within a budget (``FLAMINGO_VLM_PACKED_GB``, default a quarter
    of the machine's or the container's memory); past it, and for anything but a plain contiguous
    bf16 CPU weight and input, this is ``F.linear``.

    Whether ``w`` changed: its storage and version counter at every call, and a sample of its
    elements once per ``verified`` set (once per ``generate`` call: the set of the enclosing
    :func:`~.fast_linear.onednn_linears` block), or at every call without one. A write through
    ``.data`` that changes none of the sampled elements goes unnoticed: call :func:`clear_packed`
    after such surgery."""
    if not (type(x) in PLAIN_TYPES and type(w) in PLAIN_TYPES and x.dtype == w.dtype == torch.bfloat16
            and x.device.type == w.device.type == "cpu" and (b is None or b.dtype == torch.bfloat16)
            and x.dim() >= 1 and x.numel() and w.dim() == 2 and w.is_contiguous()):
        return F.linear(x, w, b)
    verify = verified is None or id(w) not in verified
    packed = _packed_weight(w, verify)
    if packed is None:
        return F.linear(x, w, b)
    if verified is not None:
        verified.add(id(w))
    return _packed_product(x, packed, b)


def packed_bytes(module: torch.nn.Module | None = None) -> int:
    """Bytes held by packed copies now: all of them, or those of ``module``'s parameters."""
    ids = None if module is None else {id(p) for p in module.parameters()}
    with _PACKED_LOCK:
        return sum(e.nbytes for k, e in _PACKED.items() if ids is None or (k in ids and e.ref() is not None))


def clear_packed() -> None:
    """Drop every packed copy (they are made again at their next use)."""
    with _PACKED_LOCK:
        _PACKED.clear()


# -- timing -------------------------------------------------------------------------------------------
def _best(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, page faults)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _race(a, b, reps: int = 5, rounds: int = 3) -> tuple[float, float]:
    """Best times of ``a`` and ``b``, interleaved in rounds so drifting load hits both alike."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(_best(a, reps))
        tb.append(_best(b, reps))
    return min(ta), min(tb)


def _fastest(runs: dict, reps: int = 5, rounds: int = 3) -> dict[str, float]:
    """Best time of each run, the runs interleaved in rounds (as :func:`_race`, for more than two)."""
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = min(best[name], _best(fn, reps))
    return best


def _decode_race(dtype: torch.dtype, copies: int, prepare, fast) -> tuple[float, float]:
    """``F.linear`` against ``fast(x, prepare(w))`` at 1 and 4 rows over distinct decode-sized
    weights (so the products run from memory, as in decoding); the best times, summed over both."""
    g = torch.Generator().manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * copies
    weights = [(torch.randn(o, i, generator=g) * 0.02).to(dtype) for i, o in shapes]
    operands = [prepare(w) for w in weights]
    default = other = 0.0
    with torch.no_grad():
        for rows in (1, 4):
            xs = {i: torch.randn(rows, 1, i, generator=g).to(dtype) for i, _ in shapes}
            a, b = _race(lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                         lambda: [fast(xs[w.shape[1]], o) for w, o in zip(weights, operands)])
            default, other = default + a, other + b
    return default, other


def _probe_decode() -> dict:
    default, onednn = _decode_race(torch.float32, 4, lambda w: w, onednn_linear)  # 16 layers, ~113 MB fp32
    return {"onednn_decode": onednn <= MARGIN * default,
            "decode_ms": {"default": round(default * 1e3, 3), "onednn": round(onednn * 1e3, 3)}}


def _forward_backward(f, cases):
    """A step that runs ``f(x, w, b).sum().backward()`` over ``cases`` (for a probe's timing)."""
    def step():
        for x, w, b in cases:
            f(x, w, b).sum().backward()
            x.grad = w.grad = None
            if b is not None:
                b.grad = None
    return step


def _probe_gemm() -> dict:
    g = torch.Generator().manual_seed(0)
    cases = []
    for i, o in ((768, 3072), (3072, 768)):
        x = torch.randn(512, i, generator=g, requires_grad=True)
        w = (torch.randn(o, i, generator=g) * 0.02).requires_grad_(True)
        b = torch.zeros(o, requires_grad=True)
        cases.append((x, w, b))

    default, onednn = _race(_forward_backward(F.linear, cases), _forward_backward(onednn_linear, cases), reps=1,
                            rounds=2)
    return {"onednn_gemm": onednn <= MARGIN * default,
            "gemm_ms": {"default": round(default * 1e3, 3), "onednn": round(onednn * 1e3, 3)}}


def cpu_bf16_autocast() -> bool:
    """Whether bf16 autocast is on for CPU (then a product or attention call is a bf16 one, whatever
    its inputs' dtypes)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _probe_bf16() -> dict:
    if not _bf16_supported():  # emulated bf16: slower than fp32 on every CPU we measured, no need to time it
        return {"bf16_fast": False, "bf16_ms": None}
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(1024, 768, generator=g), torch.randn(3072, 768, generator=g)
    a16, w16 = a.bfloat16(), w.bfloat16()
    with torch.no_grad():
        fp32, bf16 = _race(lambda: F.linear(a, w), lambda: F.linear(a16, w16))
    return {"bf16_fast": bf16 <= MARGIN * fp32, "bf16_ms": {"fp32": round(fp32 * 1e3, 3), "bf16": round(bf16 * 1e3, 3)}}


def _probe_bf16_gemm() -> dict:
    g = torch.Generator().manual_seed(0)
    native_bf16 = _bf16_supported()
    x = torch.randn(512 if native_bf16 else 64, 768, generator=g).bfloat16()
    w = (torch.randn(3072, 768, generator=g) * 0.02).bfloat16()
    if native_bf16:  # forward and backward, as a training step runs them
        cases = [(x.requires_grad_(True), w.requires_grad_(True), None)]
        bf16, upcast = _race(_forward_backward(F.linear, cases), _forward_backward(upcast_linear, cases), reps=1,
                             rounds=2)
    else:  # forward only: emulated bf16's input-gradient product alone takes ~0.4 s at this size
        with torch.no_grad():
            bf16, upcast = _race(lambda: F.linear(x, w), lambda: upcast_linear(x, w), reps=2, rounds=2)
    return {"bf16_gemm_upcast": upcast <= MARGIN * bf16,
            "bf16_gemm_ms": {"bf16": round(bf16 * 1e3, 3), "upcast": round(upcast * 1e3, 3)}}


def _probe_int8_decode() -> dict:
    lib = native.library()
    if lib is None or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return {"native_int8_decode": False, "native_int8_isa": None, "int8_decode_ms": None,
                "int8_decode_note": native.unavailable_reason() or "torch has no _weight_int8pack_mm"}
    g = torch.Generator().manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    base = [torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in shapes]
    weights = [w.clone() for _ in range(12) for w in base]  # 48 layers, ~85 MB: from memory, as in decoding
    scales = [torch.rand(w.shape[0], generator=g).mul_(0.01).bfloat16() for w in weights]
    # AVX2, AVX-512 where the CPU has them (portable C never wins; the AVX512-BF16 path is AVX-512's for int8)
    isas = list(range(1, min(lib.fv_isa(), 2) + 1))
    totals = {"torch": 0.0, **{native.ISA_NAMES[i]: 0.0 for i in isas}}
    ratios = {native.ISA_NAMES[i]: 1.0 for i in isas}  # geometric mean over the row counts of ours / torch's
    with torch.no_grad():
        for rows in (1, 4):
            xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in (768, 3072)}
            runs = {"torch": lambda: [torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s)
                                      for w, s in zip(weights, scales)]}
            for i in isas:
                runs[native.ISA_NAMES[i]] = (lambda i=i: [native.int8_linear(xs[w.shape[1]], w, s, isa=i)
                                                          for w, s in zip(weights, scales)])
            best = _fastest(runs)
            for name, t in best.items():
                totals[name] += t
                if name in ratios:
                    ratios[name] *= (t / best["torch"]) ** 0.5
    # the ratio, not the summed time, decides: summed, the 4-row times (ours ~0.85x of torch's) would
    # outweigh the 1-row ones (~0.5x), and batch-1 decoding is what most calls are
    ours = min(ratios, key=ratios.__getitem__, default=None)
    chosen = ours is not None and ratios[ours] <= MARGIN
    return {"native_int8_decode": chosen,
            "native_int8_isa": next(i for i in isas if native.ISA_NAMES[i] == ours) if chosen else None,
            "int8_decode_ms": {k: round(v * 1e3, 3) for k, v in totals.items()},
            "int8_decode_ratio": {k: round(v, 3) for k, v in ratios.items()}}


def int8_isa() -> int | None:
    """The SIMD path (:mod:`.native`'s ``isa``) of our int8 kernel where :func:`decide` chose it
    (``int8_decode``), else ``None``: torch's kernel."""
    if "int8_decode" in _MEMO and _mode() == "auto":  # every decode-sized int8 call: one env read, no lock
        return _MEMO["int8_isa"] if _MEMO["int8_decode"] else None
    if not decide("int8_decode"):
        return None
    if _mode() == "onednn":
        return min(native.library().fv_isa(), 2)
    return _MEMO.get("int8_isa")


INT8_GEMM_BUCKETS = (16, 64)  # an int8 call of more than DECODE_ROWS rows: <= 32 rows the 16-row route, else the 64's
INT8_GEMM_ROUTES = ("aten", "bf16", "fp32")


def _probe_int8_gemm() -> dict:
    """int8 weight-only layers at 16 and 64 rows (prefill, evaluation's batched scoring, a forward) over
    ~28 MB of distinct int8 weights: torch's ``aten._weight_int8pack_mm`` (bf16 activations) against the
    int8 matrix converted at each call to bf16 (native bf16 only) or fp32 and multiplied by
    ``F.linear``, the row scales applied to the product. The fastest wins where it beats torch's
    kernel by the margin. Measured on an AMD EPYC Zen 4: torch's kernel 2.1x slower than the bf16
    conversion at 64 rows, 1.4x at 16."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    base = [torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in shapes]
    weights = [w.clone() for _ in range(4) for w in base]  # 16 layers, ~28 MB: from memory
    scales = [torch.rand(w.shape[0], generator=g).mul_(0.01).bfloat16() for w in weights]
    kinds = ("aten", "bf16", "fp32") if _bf16_supported() else ("aten", "fp32")
    routes, timings = {}, {}
    with torch.no_grad():
        for rows in INT8_GEMM_BUCKETS:
            xs = {k: torch.randn(rows, k, generator=g) for k in (768, 3072)}
            runs = {kind: (lambda kind=kind: [int8_gemm(xs[w.shape[1]], w, s, None, kind)
                                              for w, s in zip(weights, scales)]) for kind in kinds}
            best = _fastest(runs, reps=2, rounds=2)
            fastest = min(best, key=best.__getitem__)
            routes[str(rows)] = fastest if best[fastest] <= MARGIN * best["aten"] else "aten"
            timings[str(rows)] = {k: round(v * 1e3, 3) for k, v in best.items()}
    return {"int8_gemm_routes": routes, "int8_gemm_ms": timings}


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              route: str) -> torch.Tensor:
    """``(x @ qweight.T) * scales + bias`` for a 2-D ``x`` (fp32/bf16) and an (N, K) int8 ``qweight`` with
    (N,) row ``scales``, in ``x``'s dtype, by ``route``: ``"aten"`` (torch's
    ``_weight_int8pack_mm``, on ``x`` rounded to bf16), ``"bf16"`` / ``"fp32"`` (the int8 matrix
    converted, exactly, to that dtype at this call, multiplied by ``F.linear`` on ``x`` in that dtype,
    the product then scaled in ``x``'s dtype; the converted copy is dropped after the call). Each
    rounds like a linear layer of its compute dtype; ``"bf16"`` rounds the unscaled product to bf16
    once more than ``"aten"``."""
    if route == "aten":
        # (torch's kernel reads strided scales as if contiguous: wrong values, no error; it refuses a strided x)
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), qweight.contiguous(),
                                                 scales.to(torch.bfloat16).contiguous())
        out = out.to(x.dtype)
    else:
        dtype = torch.bfloat16 if route == "bf16" else torch.float32
        with torch.autocast(x.device.type, enabled=False):  # (bf16 autocast would make the fp32 route an emulated bf16 GEMM)
            out = F.linear(x.to(dtype), qweight.to(dtype)).to(x.dtype) * scales.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def _int8_gemm_valid(routes) -> bool:
    return (isinstance(routes, dict) and set(routes) == {str(b) for b in INT8_GEMM_BUCKETS}
            and all(r in INT8_GEMM_ROUTES for r in routes.values()))


def int8_gemm_route(rows: int) -> str:
    """How an int8 weight-only call of ``rows`` (> ``DECODE_ROWS``) rows runs here (:func:`int8_gemm`'s
    ``route``), as the ``int8_gemm`` probe measured; ``FLAMINGO_VLM_CPU_KERNELS=default``: torch's
    kernel (``"aten"``); ``onednn``: the converted matrix on oneDNN's bf16 GEMM where bf16 is native,
    else ``"aten"``."""
    by = _MEMO.get("int8_gemm_by") if _mode() == "auto" else None
    if by is None:
        if not decide("int8_gemm"):
            return "aten"
        by = _MEMO["int8_gemm_by"] if _mode() != "onednn" else ("bf16" if _bf16_supported() else "aten",) * 2
    return by[0] if rows <= 2 * INT8_GEMM_BUCKETS[0] else by[1]


DECODE_BUCKETS = (1, 2, 4, 8)  # a decode-sized call of r rows takes the route measured at the first bucket >= r
_NATIVE_ROUTE = re.compile(r"native:(\d+)")
_OTHER = {"fp32": "onednn", "bf16": "packed"}  # torch's faster kernel each dtype races ours against


def _bf16_decode_available() -> bool:
    return packed_supported() or native.library() is not None


def _fp32_decode_available() -> bool:
    return onednn_available() or native.library() is not None


def _probe_routes(kind: str) -> dict:
    """Per row count in ``DECODE_BUCKETS``, over ~113 MB of distinct decode-sized layers of ``kind``
    (``fp32``/``bf16``) weights: torch's ``F.linear``, torch's faster kernel for that dtype where this
    build has it (fp32: oneDNN; bf16: oneDNN on packed copies, native bf16 only) and our C kernel in
    its AVX2 and widest SIMD paths. Ours is taken where it is within the margin of ``F.linear`` and
    the other is not faster than it by the margin (ours needs no copy); else the other, where within
    the margin; else ``F.linear``."""
    lib = native.library()
    dtype, other = (torch.float32, "onednn") if kind == "fp32" else (torch.bfloat16, "packed")
    g = torch.Generator().manual_seed(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * (4 if kind == "fp32" else 8)
    base = {(i, o): (torch.randn(o, i, generator=g) * 0.02).to(dtype) for i, o in shapes}
    weights = [base[s].clone() for s in shapes]  # distinct copies: from memory, as in decoding
    if kind == "fp32":
        fast = (lambda x, w, _: onednn_linear(x, w)) if onednn_available() else None
        operands = weights
    else:
        fast = (lambda x, _, p: _packed_product(x, p)) if packed_supported() else None
        operands = [_pack(w) for w in weights] if fast else weights
    widest = lib.fv_isa() if lib is not None else 0
    isas = sorted({1, widest if kind == "bf16" else min(widest, 2)}) if widest >= 1 else []  # AVX2 and the widest
    call = native.bf16_linear if kind == "bf16" else native.fp32_linear
    routes, timings = {}, {}
    with torch.no_grad():
        for rows in DECODE_BUCKETS:
            xs = {i: torch.randn(rows, i, generator=g).to(dtype) for i, _ in shapes}
            runs = {"default": lambda: [F.linear(xs[w.shape[1]], w) for w in weights]}
            if fast is not None:
                runs[other] = lambda: [fast(xs[w.shape[1]], w, o) for w, o in zip(weights, operands)]
            for i in isas:
                runs[f"native:{i}"] = lambda i=i: [call(xs[w.shape[1]], w, isa=i, check=False) for w in weights]
            best = _fastest(runs, reps=3, rounds=2)
            ours = min((k for k in best if k.startswith("native:")), key=best.__getitem__, default=None)
            if ours and best[ours] <= MARGIN * best["default"] and not best.get(other, 1e9) <= MARGIN * best[ours]:
                route = ours
            elif fast is not None and best[other] <= MARGIN * best["default"]:
                route = other
            else:
                route = "default"
            routes[str(rows)] = route
            timings[str(rows)] = {k: round(v * 1e3, 3) for k, v in best.items()}
    return {f"{kind}_decode_routes": routes, f"{kind}_decode_ms": timings}


def _routes_valid(routes, kind: str) -> bool:
    return (isinstance(routes, dict) and set(routes) == {str(b) for b in DECODE_BUCKETS}
            and all(isinstance(r, str) and (r in ("default", _OTHER[kind]) or _NATIVE_ROUTE.fullmatch(r))
                    for r in routes.values()))


def onednn_route(kind: str) -> str:
    """The route of ``kind`` calls on oneDNN (fp32: ``"onednn"``; bf16: ``"packed"``), or ``"default"``
    where this process has no such kernel."""
    has = packed_supported() if kind == "bf16" else onednn_available()
    return _OTHER[kind] if has else "default"


def set_routes(kind: str, routes: tuple[str, ...], timings: dict | None = None) -> bool:
    """Take ``routes`` (one per ``DECODE_BUCKETS`` entry) for decode-sized ``kind`` calls in this process,
    each route this process cannot run (no C kernel, no packing, no oneDNN) replaced by ``F.linear``'s;
    returns whether any route is not ``F.linear``'s (benchmarks use this to pin a route). ``timings``:
    the probe's milliseconds per bucket and route, from which the routes of fused steps are taken
    (:func:`fused_route`; without them, the same routes)."""
    lib, other = native.library(), onednn_route(kind)
    usable = tuple(r if r == other or (_NATIVE_ROUTE.fullmatch(r) and lib is not None) else "default" for r in routes)
    fused = []
    for b, r in zip(DECODE_BUCKETS, usable):
        ms = (timings or {}).get(str(b)) or {}
        ours = {k: v for k, v in ms.items() if _NATIVE_ROUTE.fullmatch(k)} if lib is not None else {}
        if ours and not _NATIVE_ROUTE.fullmatch(r) and isinstance(ms.get(r), (int, float)):
            best = min(ours, key=ours.get)
            r = best if ours[best] <= FUSED_SLACK * ms[r] else r
        fused.append(r)

    def by_rows(bucket_routes):
        per_row = [next(r for b, r in zip(DECODE_BUCKETS, bucket_routes) if n <= b) for n in range(1, DECODE_ROWS + 1)]
        return ("default", *(int(r[7:]) if r.startswith("native:") else r for r in per_row))

    _MEMO[f"{kind}_routes"] = usable
    _MEMO[f"{kind}_by_rows"] = by_rows(usable)
    _MEMO[f"{kind}_fused_by_rows"] = by_rows(fused)
    _MEMO[f"{kind}_decode"] = any(r != "default" for r in usable)
    return _MEMO[f"{kind}_decode"]


def decode_route(kind: str, rows: int) -> str | int:
    """How a decode-sized (``0 < rows <= DECODE_ROWS``) call with ``kind`` (``fp32``/``bf16``) weights and
    no gradient runs here: ``"default"`` (``F.linear``), torch's faster kernel (fp32: ``"onednn"``; bf16:
    ``"packed"``, :func:`packed_linear`) or the SIMD path (an ``int``) of our C kernel
    (:func:`flamingo_vlm.modeling.native.fp32_linear` / ``bf16_linear``), as the ``<kind>_decode`` probe
    measured for its row count. Other row counts: ``"default"``."""
    if not 0 < rows <= DECODE_ROWS:
        return "default"
    mode = _mode()
    by_rows = _MEMO.get(f"{kind}_by_rows") if mode == "auto" else None
    if by_rows is None:
        if mode == "default":
            return "default"
        if mode == "onednn":
            return onednn_route(kind)
        if not decide(f"{kind}_decode"):
            return "default"
        by_rows = _MEMO[f"{kind}_by_rows"]
    return by_rows[rows]  # every decode-sized call: one env read, one look-up


def fused_route(kind: str, rows: int) -> str | int:
    """:func:`decode_route` for the products of a whole layer's fused decoding step: our C kernel also
    where the probe measured it within ``FUSED_SLACK`` of the kernel it chose (see there)."""
    if not 0 < rows <= DECODE_ROWS or _mode() != "auto":
        return decode_route(kind, rows)
    by_rows = _MEMO.get(f"{kind}_fused_by_rows")
    if by_rows is None:
        decode_route(kind, rows)  # (decides, filling the table)
        by_rows = _MEMO.get(f"{kind}_fused_by_rows")
    return by_rows[rows] if by_rows is not None else decode_route(kind, rows)


def bf16_route(rows: int) -> str | int:
    """:func:`decode_route` for bf16 weights."""
    return decode_route("bf16", rows)


_PROBES = {"decode": _probe_decode, "gemm": _probe_gemm, "bf16": _probe_bf16, "bf16_gemm": _probe_bf16_gemm,
           "bf16_decode": lambda: _probe_routes("bf16"), "fp32_decode": lambda: _probe_routes("fp32"),
           "int8_decode": _probe_int8_decode, "int8_gemm": _probe_int8_gemm}
_KEYS = {"decode": "onednn_decode", "gemm": "onednn_gemm", "bf16": "bf16_fast", "bf16_gemm": "bf16_gemm_upcast",
         "bf16_decode": "bf16_decode_routes",
         "fp32_decode": "fp32_decode_routes", "int8_decode": "native_int8_decode", "int8_gemm": "int8_gemm_routes"}
# Whether the faster kernel a part decides on exists in this process at all (bf16 GEMMs: torch's own).
_AVAILABLE = {"decode": onednn_available, "gemm": onednn_available, "bf16": lambda: True, "bf16_gemm": lambda: True,
              "bf16_decode": _bf16_decode_available, "fp32_decode": _fp32_decode_available,
              "int8_decode": lambda: native.library() is not None,
              "int8_gemm": lambda: hasattr(torch.ops.aten, "_weight_int8pack_mm")}


# -- the choice ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What this process runs with, and where each decision came from."""

    cpu: str
    torch: str
    threads: int
    allocator: str
    onednn_decode: bool  # fp32 linears with few rows (<= DECODE_ROWS: decoding) on oneDNN
    onednn_gemm: bool  # fp32 linears with more rows (prefill, forward+loss, training, with backward) on oneDNN
    bf16_fast: bool  # bf16 GEMMs beat fp32 here (native bf16 and measured faster)
    # fp32 / bf16 linears with few rows and no gradient, per row count of DECODE_BUCKETS: "torch default",
    # "oneDNN" (fp32), "packed oneDNN" (bf16, packed_linear) or "ours <SIMD path>" (native.fp32/bf16_linear)
    fp32_decode: tuple[str, ...]
    bf16_decode: tuple[str, ...]
    native_int8_decode: bool  # int8 weight-only linears with few rows on our C kernel (native.int8_linear)
    source: str  # "probe", "cache <file>", "env FLAMINGO_VLM_CPU_KERNELS=..."
    timings: dict
    int8_gemm: tuple[str, ...] = ()  # int8 linears with more rows, per INT8_GEMM_BUCKETS: int8_gemm's routes
    bf16_gemm_upcast: bool = False  # bf16 linears with more rows (or gradients) as fp32 GEMMs (upcast_linear)


# A probe that ran while other processes used the CPU timed them as much as the kernels (seen on a
# 2-core AMD EPYC while a test suite ran: every bf16 route at 250 ms, ten times its quiet figure, and
# our int8 kernel refused for the run of the cache). Its choice holds for the process that measured
# it, and the next processes measure again, up to CONTENDED_TRIES probes in all; after that the last
# is kept (a machine that is always this busy is the one the kernels run on).
CONTENDED_CORES = 0.25  # cores other processes used beyond those this process's threads leave free
CONTENDED_TRIES = 3


def _cpu_meter():
    """Start measuring the CPU that other processes use; the function returned gives the cores they
    used since, beyond the machine's cores that this process's threads leave free (0.0 where
    ``/proc/stat`` cannot be read: not Linux)."""

    def machine() -> tuple[float, int]:  # (busy CPU seconds of the whole machine, its CPUs)
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        v = [int(x) for x in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), cpus

    try:
        busy0, cpus = machine()
    except (OSError, ValueError, IndexError, AttributeError):
        return lambda: 0.0
    t0, own0 = time.perf_counter(), time.process_time()

    def stop() -> float:
        try:
            busy1, _ = machine()
        except (OSError, ValueError, IndexError):
            return 0.0
        elapsed = time.perf_counter() - t0
        if elapsed < 0.05:  # nothing was timed (a part that found nothing to measure); /proc/stat counts 10 ms ticks
            return 0.0
        others = (busy1 - busy0 - (time.process_time() - own0)) / elapsed
        return max(0.0, others - max(0, cpus - torch.get_num_threads()))

    return stop


def _contended(data: dict) -> dict:
    entry = data.get("contended")
    return dict(entry) if isinstance(entry, dict) else {}


def _tries(contended: dict, part: str) -> int | None:
    """How many contended probes ``part`` has had (None: its last probe was quiet, or no valid entry)."""
    entry = contended.get(part)
    tries = entry.get("tries") if isinstance(entry, dict) else None
    return tries if isinstance(tries, int) else None


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again (the file is rewritten whole)


def _write_cache(path: Path, data: dict) -> None:
    try:
        with atomic_file(path, fsync=False) as tmp, open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def decide(part: str) -> bool:
    """One decision (``decode``, ``gemm``, ``bf16``, ``bf16_gemm``, ``fp32_decode``, ``bf16_decode``,
    ``int8_decode`` or ``int8_gemm``): from the env override, the memo, the cache file, or by running
    that part's probe (then cached)."""
    mode = _mode()
    if mode == "auto" and part in _MEMO:  # every linear call lands here: no lock, no kernel lookup
        return _MEMO[part]
    if mode in ("onednn", "default") and part != "bf16":  # (bf16_gemm: torch's own bf16 GEMM under both)
        return mode == "onednn" and part != "bf16_gemm" and _AVAILABLE[part]()
    if not _AVAILABLE[part]():  # whatever a cache says: no kernel, no choice
        return False
    key = _KEYS[part]
    with _LOCK:
        if part in _MEMO:  # decided earlier in this process (``probe`` re-measures once per process)
            return _MEMO[part]
        path = cache_file()
        data = _read_cache(path)
        cached = data.get(key)
        routes = part in ("bf16_decode", "fp32_decode")
        valid = (_routes_valid(cached, part[:4]) if routes else _int8_gemm_valid(cached) if part == "int8_gemm"
                 else isinstance(cached, bool))
        contended = _contended(data)
        tries = _tries(contended, part)
        if not valid or mode == "probe" or (tries is not None and tries < CONTENDED_TRIES):
            stop = _cpu_meter()
            # (the first call may come from inside generate's no_grad / inference_mode)
            with torch.inference_mode(False), torch.enable_grad():
                data.update(_PROBES[part]())
            others = stop()
            if others >= CONTENDED_CORES:
                contended[part] = {"others_cores": round(others, 2), "tries": (tries or 0) + 1}
            else:
                contended.pop(part, None)
            data["contended"] = contended
            data.update(cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads())
            _write_cache(path, data)
        if part == "int8_decode":
            _MEMO["int8_isa"] = data.get("native_int8_isa")
        if routes:
            return set_routes(part[:4], tuple(data[key][str(b)] for b in DECODE_BUCKETS),
                              data.get(f"{part[:4]}_decode_ms") if isinstance(data.get(f"{part[:4]}_decode_ms"), dict)
                              else None)
        if part == "int8_gemm":
            _MEMO["int8_gemm_by"] = tuple(data[key][str(b)] for b in INT8_GEMM_BUCKETS)
            _MEMO[part] = any(r != "aten" for r in _MEMO["int8_gemm_by"])
            return _MEMO[part]
        _MEMO[part] = data[key]
        return _MEMO[part]


def kernel_choice(parts: tuple[str, ...] = ("decode", "gemm", "bf16", "bf16_gemm", "fp32_decode", "bf16_decode")
                  ) -> KernelChoice:
    """Every decision (probing what is not cached yet), for reports and benchmarks."""
    decisions = {p: decide(p) for p in parts}
    mode = _mode()
    path = cache_file()
    source = f"env {ENV}={mode}" if mode in ("onednn", "default") else f"probe, cached in {path}"
    data = _read_cache(path)
    return KernelChoice(
        cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(), allocator=_allocator(),
        onednn_decode=decisions.get("decode", False), onednn_gemm=decisions.get("gemm", False),
        bf16_fast=decisions.get("bf16", False),
        fp32_decode=_routes_named("fp32") if "fp32_decode" in parts else (),
        bf16_decode=_routes_named("bf16") if "bf16_decode" in parts else (),
        native_int8_decode=decisions.get("int8_decode", False), source=source,
        int8_gemm=tuple(int8_gemm_route(2 * b) for b in INT8_GEMM_BUCKETS) if "int8_gemm" in parts else (),
        bf16_gemm_upcast=decisions.get("bf16_gemm", False),
        timings={f"{p}_ms": data.get(f"{p}_ms") for p in parts if f"{p}_ms" in data},  # of the parts asked for
    )


def _route_name(route: str | int) -> str:
    if isinstance(route, str) and _NATIVE_ROUTE.fullmatch(route):
        route = int(route[7:])
    return {"default": "torch default", "packed": "packed oneDNN", "onednn": "oneDNN"}.get(
        route, f"ours {native.ISA_NAMES.get(route, route)}")


def _routes_named(kind: str) -> tuple[str, ...]:
    return tuple(_route_name(decode_route(kind, b)) for b in DECODE_BUCKETS)


def _routes_flag(routes: tuple[str, ...], kind: str) -> str:
    """'<route> for decode-sized <kind> linears', the row counts named where the routes differ."""
    routes = routes or ("torch default",)
    if len(set(routes)) == 1:
        return f"{routes[0]} for decode-sized {kind} linears"
    spans, lo = [], 1
    for b, r in zip(DECODE_BUCKETS, routes):
        if spans and spans[-1][1] == r:
            spans[-1][0] = f"{spans[-1][0].split('-')[0]}-{b}"
        else:
            spans.append([f"{lo}" if lo == b else f"{lo}-{b}", r])
        lo = b + 1
    return f"decode-sized {kind} linears: " + ", ".join(
        f"{r} at {rows} row{'' if rows == '1' else 's'}" for rows, r in spans)


def _probe_line(name: str, timings) -> str | None:
    if not (isinstance(timings, dict) and isinstance(timings.get("1"), dict)):
        return None
    return f"{name} at 1 row " + "/".join(f"{_route_name(k)} {v:.1f}" for k, v in timings["1"].items()) + " ms"


def _ms_text(timings) -> str | None:
    """``name v/name v`` of a cached ``{name: ms}`` table, or None where the cache holds something else."""
    if not (isinstance(timings, dict) and timings and all(isinstance(v, (int, float)) for v in timings.values())):
        return None
    return "/".join(f"{k} {v:.1f}" for k, v in timings.items())


def summary(choice: KernelChoice | None = None, allocator: str | None = None) -> str:
    """One line for benchmark headers: the CPU and the choices it ran with (``allocator``: that of
    the processes that ran the timings, where not this one)."""
    c = choice or kernel_choice()
    if allocator:
        c = dataclasses.replace(c, allocator=allocator)
    fp32 = (_routes_flag(c.fp32_decode, "fp32") if c.fp32_decode
            else f"{'oneDNN' if c.onednn_decode else 'torch default'} for decode-sized fp32 linears")
    flags = [fp32, f"{'oneDNN' if c.onednn_gemm else 'torch default'} for larger ones (prefill, forward, training)",
             f"bf16 {'native and faster' if c.bf16_fast else 'not faster than fp32'}",
             _routes_flag(c.bf16_decode, "bf16")]
    if c.bf16_gemm_upcast:
        flags.append("larger bf16 linears as fp32 GEMMs of the bf16 values"
                     + (f" ({ms} ms)" if (ms := _ms_text(c.timings.get("bf16_gemm_ms"))) else ""))
    t = c.timings
    if t.get("decode_ms"):
        flags.append(f"probe decode {t['decode_ms']['default']:.1f}/{t['decode_ms']['onednn']:.1f} ms")
    if t.get("gemm_ms"):
        flags.append(f"GEMM fwd+bwd {t['gemm_ms']['default']:.0f}/{t['gemm_ms']['onednn']:.0f} ms (default/oneDNN)")
    flags += [line for line in (_probe_line("fp32 decode", t.get("fp32_decode_ms")),
                                _probe_line("bf16 decode", t.get("bf16_decode_ms"))) if line]
    if (ms := _ms_text(t.get("int8_decode_ms"))) is not None:
        flags.append(f"{'our C kernel' if c.native_int8_decode else 'torch default'} for decode-sized int8 linears "
                     f"({ms} ms)")
    if c.int8_gemm:
        names = {"aten": "torch default", "bf16": "bf16 GEMM", "fp32": "fp32 GEMM"}
        spans = "/".join(names[r] for r in c.int8_gemm) if len(set(c.int8_gemm)) > 1 else names[c.int8_gemm[0]]
        ms = t.get("int8_gemm_ms")
        ms = _ms_text(ms.get("64") if isinstance(ms, dict) else None)
        flags.append(f"{spans} for larger int8 linears" + (f" (64 rows {ms} ms)" if ms else ""))
    fused_rows = [r for r in range(1, DECODE_ROWS + 1) for k in ("fp32", "bf16")
                  if type(_MEMO.get(f"{k}_fused_by_rows", (None,) * (r + 1))[r]) is int
                  and type(_MEMO.get(f"{k}_by_rows", (None,) * (r + 1))[r]) is not int]
    extra = (f" (whole layers' steps also at {min(fused_rows)}-{max(fused_rows)} rows, where ours measured within "
             f"{FUSED_SLACK:g}x)" if fused_rows else "")
    flags.append("decoding steps of cross-attention blocks, LM decoder layers (LLaMA, MPT) and LM MLPs fused where their "
                 "products run on our C kernels" + extra
                 if native.fused_allowed() else f"decoding module by module ({native.FUSED_ENV}=0)")
    busy = _contended(_read_cache(cache_file()))
    if busy and c.source.startswith("probe"):
        parts = ", ".join(f"{part} ({e.get('others_cores')} cores, probe {e.get('tries')} of {CONTENDED_TRIES})"
                          for part, e in sorted(busy.items()) if isinstance(e, dict))
        flags.append(f"probed while other processes used the CPU: {parts}; measured again by the next processes "
                     f"up to {CONTENDED_TRIES} probes")
    return (f"CPU: {c.cpu}; torch {c.torch}, {c.threads} threads, {c.allocator}; kernels ({c.source}): "
            + ", ".join(flags))
