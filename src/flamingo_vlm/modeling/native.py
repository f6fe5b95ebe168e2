"""C kernels torch lacks, compiled on first use with this machine's C compiler and cached.

From ``csrc/decode_linear.c``, the linear layer for a few rows (decoding) on the weight matrix as
torch keeps it (no gradients):

* :func:`int8_linear`, weight-only int8. torch's ``aten._weight_int8pack_mm`` streams the int8
  weights at ~15 GB/s on an AMD EPYC Zen 4 (2 threads; the machine reads 33-35 GB/s); this one at
  ~34 GB/s in its AVX2 path (32 GB/s in the AVX-512 one, which Zen 4 runs as two 256-bit halves; the
  C file says why).
* :func:`bf16_linear`, bf16 weights. torch's ``F.linear`` reads them at 14-18 GB/s there, oneDNN on
  a re-laid copy of every weight (:func:`~.kernels.packed_linear`, the model's size again in
  memory) at 25-28 GB/s; this one at 30-39 GB/s with no copy, at one and two rows. With bf16 input
  on a CPU with AVX512-BF16 it multiplies with the CPU's bf16 dot product; elsewhere it widens the
  weights to fp32 (exactly), so it also runs where bf16 is emulated.
* :func:`fp32_linear`, fp32 weights: 33 GB/s at one row there, against oneDNN's 26 and ``F.linear``'s
  15 on the same 302 MB of layers.

and :class:`XattnStep`, a gated cross-attention block's whole decoding step (two LayerNorms, the
four products on the kernels above, the attention over the image keys/values, exact GELU, the tanh
gates) in one call, where ``fused_decode`` finds the block's products would run on them anyway;
:class:`MlpStep`, an LM's MLP in one call; :class:`LlamaStep` and :class:`MptStep`, an LM decoder
layer's decoding step in two calls around the KV cache's update.

Each is used where :func:`flamingo_vlm.modeling.kernels.decide` measured it faster (probe parts
``int8_decode``, ``bf16_decode`` and ``fp32_decode``), so a machine where it is not keeps torch's kernels.

Build: ``$CC`` (else ``cc``, ``gcc``, ``clang``) ``-O3 -shared -fPIC -fopenmp ... -lm``, into
``$FLAMINGO_VLM_CACHE/native/`` (default ``~/.cache/flamingo-vlm/native/``; the temporary directory
where that cannot be written), named by a hash of the source, compiler, flags and architecture; it
is written to a temporary file and renamed, so a concurrent or interrupted build leaves nothing
half-written. ~0.5 s, once per machine. fp16 inputs, scales and biases stay on torch's kernels. No
compiler, a failed build, or ``FLAMINGO_VLM_NATIVE=0``: :func:`library` returns ``None``, :func:`unavailable_reason`
says why, and callers keep torch's kernels. The SIMD path (AVX-512 with BF16, AVX-512, AVX2, portable
C) is chosen at run time, so one build serves any x86-64 CPU.

Threads: the library links ``libgomp.so.1``, the soname torch's wheel loads, so it runs in torch's
OpenMP thread pool with torch's thread count. Where that is not so (a second OpenMP runtime in the
process, whose idle threads would spin against torch's), it is not used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import NamedTuple

import torch

from ..files import atomic_file, cache_root

__all__ = ["ENV", "FLOAT_DTYPES", "FUSED_ENV", "ISA_NAMES", "LlamaStep", "MlpStep", "MptStep", "Norm", "Product", "XattnStep", "bf16_linear", "fp32_linear", "int8_linear",
           "fused_allowed", "library", "unavailable_reason"]

ENV = "FLAMINGO_VLM_NATIVE"
FUSED_ENV = "FLAMINGO_VLM_FUSED"  # 0: decoding runs block by block in torch (modeling/fused_decode.py)
_OFF = ("0", "false", "no", "off")
_SOURCE = Path(__file__).with_name("csrc") / "decode_linear.c"
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11")
_LIBS = ("-lm",)  # after the source, where linkers that drop unneeded libraries look for them
ISA_NAMES = {0: "portable C", 1: "AVX2", 2: "AVX-512", 3: "AVX512-BF16"}
_reason: str | None = None


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (which may carry flags), else the first of cc, gcc, clang."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc and shutil.which(cc[0]):
        return [shutil.which(cc[0]), *cc[1:]]
    found = next((shutil.which(n) for n in ("cc", "gcc", "clang") if shutil.which(n)), None)
    return [found] if found else None


def _cache_dirs() -> list[Path]:
    home = cache_root() / "native"
    return [home, Path(tempfile.gettempdir()) / f"flamingo-vlm-native-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _compile_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no message")


def _build(cc: list[str]) -> Path:
    """The shared library for this source, compiler and flags: from the cache, else compiled there
    (or, where the cache cannot be written, in the temporary directory)."""
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc[0], "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join([*cc[1:], *_FLAGS, *_LIBS]).encode(),
                                     sys.platform.encode(), platform.machine().encode()])).hexdigest()[:16]
    name = f"{_SOURCE.stem}-{key}.so"
    *first, last = _cache_dirs()
    for d in first:
        try:
            return d / name if (d / name).exists() else _compile_into(cc, d / name)
        except OSError:  # this directory cannot be written: the next one
            pass
    return last / name if (last / name).exists() else _compile_into(cc, last / name)


def _compile_into(cc: list[str], out: Path) -> Path:
    with atomic_file(out, fsync=False, mode=0o777) as tmp:  # (0o777 less the umask, as cc gives)
        done = subprocess.run([*cc, *_FLAGS, str(_SOURCE), "-o", str(tmp), *_LIBS], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc[0]} could not compile {_SOURCE}: {_compile_error(done.stderr)}")
    return out


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux; empty where /proc is not readable)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {os.path.realpath(line.split()[-1]) for line in maps.splitlines()
            if any(n in line for n in ("libgomp", "libiomp", "libomp."))}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (see :func:`unavailable_reason`)."""
    global _reason
    if os.environ.get(ENV, "1").strip().lower() in _OFF:
        _reason = f"{ENV}={os.environ[ENV]}"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC, or install gcc or clang)"
        return None
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"build failed: {e}"
        return None
    if before and len(_openmp_runtimes()) > len(before):
        _reason = "it would load a second OpenMP runtime beside torch's"
        return None
    lib.fv_isa.restype = ctypes.c_int
    ptr, flag, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.fv_int8_linear.restype = lib.fv_bf16_linear.restype = None
    # (x, x_bf16, q, s, s_bf16, b, b_bf16, y, y_bf16, M, N, K, isa, nthreads)
    lib.fv_int8_linear.argtypes = [ptr, flag, ptr, ptr, flag, ptr, flag, ptr, flag, size, size, size, flag, flag]
    # (x, x_bf16, w, b, b_bf16, y, y_bf16, M, N, K, isa, nthreads)
    lib.fv_bf16_linear.argtypes = lib.fv_fp32_linear.argtypes = [ptr, flag, ptr, ptr, flag, ptr, flag, size, size, size,
                                                                 flag, flag]
    lib.fv_fp32_linear.restype = None
    lib.fv_xattn_step.restype = lib.fv_mlp_step.restype = lib.fv_llama_pre.restype = lib.fv_llama_post.restype = ctypes.c_int
    # (mlp, x, residual, y, x_bf16, M, nthreads)
    lib.fv_mlp_step.argtypes = [ctypes.POINTER(_Mlp), ptr, ptr, ptr, flag, size, flag]
    # (block, x, y, x_bf16, M, k, v, S, kv_rows, strides, attn_gate, ff_gate, blind, nthreads)
    lib.fv_xattn_step.argtypes = [ctypes.POINTER(_Block), ptr, ptr, flag, size, ptr, ptr, size, size,
                                  ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.c_float, flag, flag]
    # (layer, x, cos, sin, cos_sin_row_stride, q, k, v, x_bf16, M, nthreads)
    lib.fv_llama_pre.argtypes = [ctypes.POINTER(_Llama), ptr, ptr, ptr, size, ptr, ptr, ptr, flag, size, flag]
    # (layer, x, q, k, v, S, strides, mask, mask_row_stride, y, x_bf16, M, nthreads)
    lib.fv_llama_post.argtypes = [ctypes.POINTER(_Llama), ptr, ptr, ptr, ptr, size, ctypes.POINTER(ctypes.c_int64),
                                  ptr, size, ptr, flag, size, flag]
    lib.fv_mpt_pre.restype = lib.fv_mpt_post.restype = ctypes.c_int
    # (block, x, qkv, x_bf16, M, nthreads)
    lib.fv_mpt_pre.argtypes = [ctypes.POINTER(_Mpt), ptr, ptr, flag, size, flag]
    # (block, x, qkv, k, v, S, strides, bias, bias_head_stride, bias_offset, mask, mask_row_stride, y, x_bf16, M, nthreads)
    lib.fv_mpt_post.argtypes = [ctypes.POINTER(_Mpt), ptr, ptr, ptr, ptr, size, ctypes.POINTER(ctypes.c_int64), ptr,
                                size, size, ptr, size, ptr, flag, size, flag]
    return lib


def fused_allowed() -> bool:
    """Whether ``FLAMINGO_VLM_FUSED`` leaves the fused decoding steps on (:class:`XattnStep`, :class:`MlpStep`)."""
    return os.environ.get(FUSED_ENV, "1").strip().lower() not in _OFF


def unavailable_reason() -> str | None:
    """Why :func:`library` is ``None`` (after it was called), else ``None``."""
    return _reason


FLOAT_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels take for inputs, scales and biases


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are unavailable: {unavailable_reason()}")
    return lib


def _operands_ok(x: torch.Tensor, w: torch.Tensor, wdtype: torch.dtype, *vectors: torch.Tensor | None) -> bool:
    return (x.dim() == 2 and w.dim() == 2 and w.dtype == wdtype and w.shape[1] == x.shape[1]
            and x.dtype in FLOAT_DTYPES and x.is_contiguous() and w.is_contiguous()
            and all(v is None or (tuple(v.shape) == (w.shape[0],) and v.dtype in FLOAT_DTYPES and v.is_contiguous())
                    for v in vectors)
            and {t.device.type for t in (x, w, *vectors) if t is not None} == {"cpu"})


def _describe(**tensors: torch.Tensor | None) -> str:
    return ", ".join(f"{k} {tuple(t.shape)} {t.dtype} {t.device}" for k, t in tensors.items() if t is not None)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                isa: int = 2, check: bool = True) -> torch.Tensor:
    """``(x @ qweight.T) * scales + bias`` in ``x``'s dtype: ``x`` (M, K) fp32 or bf16, ``qweight``
    (N, K) int8, ``scales`` and ``bias`` (N,) fp32 or bf16 (``bias`` optional), all contiguous on
    CPU; accumulated in fp32. No autograd. ``isa`` (0 C, 1 AVX2, 2 AVX-512, 3 AVX-512 with BF16, which
    is 2 but for bf16 weights and input; lowered to what the CPU has) picks the SIMD path. Call only where :func:`library` is not ``None``. ``check=False`` skips
    the checks of the operands (~3 us, a tenth of a decode-sized call), for callers that guarantee
    them (``QuantizedLinear``); a wrong operand then reads memory it should not."""
    lib = _lib()
    if check and not _operands_ok(x, qweight, torch.int8, scales, bias):
        raise ValueError("int8_linear: needs a contiguous CPU (M, K) fp32/bf16 input, (N, K) int8 weight, (N,) "
                         "fp32/bf16 scales and optional (N,) bias, got "
                         + _describe(input=x, weight=qweight, scales=scales, bias=bias))
    n, k = qweight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (check=False also takes a contiguous (..., K) x)
    bf16 = x.dtype == torch.bfloat16
    m = y.numel() // n if n else 0
    lib.fv_int8_linear(x.data_ptr(), bf16, qweight.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16,
                       _ptr(bias), bias is not None and bias.dtype == torch.bfloat16,
                       y.data_ptr(), bf16, m, n, k, isa, torch.get_num_threads())
    return y


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, isa: int = 2,
                check: bool = True) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``x``'s dtype, on the bf16 ``weight`` as it is (no re-laid copy):
    ``x`` (M, K) fp32 or bf16, ``weight`` (N, K) bf16, ``bias`` (N,) fp32 or bf16 or ``None``, all
    contiguous on CPU; products and sums in fp32, a bf16 result rounded once. No autograd. ``isa``
    and ``check`` as :func:`int8_linear`."""
    return _float_linear(x, weight, bias, torch.bfloat16, "fv_bf16_linear", isa, check)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, isa: int = 2,
                check: bool = True) -> torch.Tensor:
    """:func:`bf16_linear` for an fp32 ``weight``: fp32 FMAs, the same summation for every row count."""
    return _float_linear(x, weight, bias, torch.float32, "fv_fp32_linear", isa, check)


def _float_linear(x, weight, bias, wdtype, symbol, isa, check) -> torch.Tensor:
    lib = _lib()
    if check and not _operands_ok(x, weight, wdtype, bias):
        name = "bf16" if wdtype == torch.bfloat16 else "fp32"
        raise ValueError(f"{name}_linear: needs a contiguous CPU (M, K) fp32/bf16 input, (N, K) {name} weight and "
                         "optional (N,) fp32/bf16 bias, got " + _describe(input=x, weight=weight, bias=bias))
    n, k = weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (check=False also takes a contiguous (..., K) x)
    bf16 = x.dtype == torch.bfloat16
    m = y.numel() // n if n else 0
    getattr(lib, symbol)(x.data_ptr(), bf16, weight.data_ptr(), _ptr(bias), bias is not None and bias.dtype == torch.bfloat16,
                         y.data_ptr(), bf16, m, n, k, isa, torch.get_num_threads())
    return y


# -- a gated cross-attention block's decoding step ------------------------------------------------------
_KIND = {torch.int8: 0, torch.bfloat16: 1, torch.float32: 2}  # fv_layer.kind (FV_INT8, FV_BF16, FV_FP32)


class _Layer(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("b", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("kind", ctypes.c_int32), ("sb", ctypes.c_int32), ("bb", ctypes.c_int32),
                ("isa", ctypes.c_int32)]


class _Block(ctypes.Structure):
    _fields_ = [("q", _Layer), ("out", _Layer), ("fc1", _Layer), ("fc2", _Layer),
                ("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("eps1", ctypes.c_double), ("eps2", ctypes.c_double),
                ("D", ctypes.c_int64), ("heads", ctypes.c_int64), ("dim_head", ctypes.c_int64)]


class Product(NamedTuple):
    """One product of a block as the kernels take it: ``weight`` (N, K) int8, bf16 or fp32; for int8
    its (N,) ``scales``; an optional (N,) ``bias``; ``isa`` the SIMD path (as :func:`int8_linear`)."""

    weight: torch.Tensor
    scales: torch.Tensor | None
    bias: torch.Tensor | None
    isa: int


class Norm(NamedTuple):
    """A LayerNorm over the last dimension: (D,) ``weight`` and ``bias`` (either may be ``None``), ``eps``."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _layer(p: Product) -> _Layer:
    bf16 = torch.bfloat16
    return _Layer(p.weight.data_ptr(), _ptr(p.scales), _ptr(p.bias), p.weight.shape[0], p.weight.shape[1],
                  _KIND[p.weight.dtype], p.scales is not None and p.scales.dtype == bf16,
                  p.bias is not None and p.bias.dtype == bf16, p.isa)


def _check_product(p: Product, n: int, k: int, dtype: torch.dtype, what: str) -> None:
    w = p.weight
    if not (_operands_ok(w.new_empty(0, k, dtype=dtype), w, w.dtype, p.scales, p.bias)
            and w.shape == (n, k) and w.dtype in _KIND and (p.scales is not None) == (w.dtype == torch.int8)):
        raise ValueError(f"{what}: a product needs a contiguous CPU ({n}, {k}) int8 (with scales), bf16 or fp32 "
                         "weight and optional (n,) bias, got " + _describe(weight=w, scales=p.scales, bias=p.bias))


def _weak_refs(*groups: tuple) -> list:
    """(weak reference, data pointer) of every tensor in ``groups`` (Products, Norms)."""
    return [(weakref.ref(t), t.data_ptr()) for g in groups for t in g if isinstance(t, torch.Tensor)]


def _alive(kept: list) -> bool:
    return all((t := ref()) is not None and t.data_ptr() == ptr for ref, ptr in kept)


def hold(step):
    """``step`` (an :class:`XattnStep`, :class:`MlpStep`, :class:`LlamaStep` or :class:`MptStep`), made to
    keep its tensors alive for as long as it lives, in place of checking at every call that they are
    still there (returns it; ``ValueError`` where one is gone already). For steps made for one block of
    calls in which the weights do not change (:mod:`.fused_decode`'s, one ``generate``): no weight's
    memory can be freed under such a step, and one replaced meanwhile is seen from the next block on.
    The checks had cost ~11 us a call where the C kernels had just streamed the weights through the
    caches (the built-in model, 36 calls a decoding step: 0.4 ms of a 9 ms int8 step)."""
    tensors = [ref() for ref, _ in step._kept]
    if any(t is None or t.data_ptr() != ptr for t, (_, ptr) in zip(tensors, step._kept)):
        raise ValueError(f"{type(step).__name__}: a tensor it was built from is gone")
    # (aliases: they pin the storage itself, also where a parameter's .data is replaced meanwhile)
    step._held, step._kept = [t.detach() for t in tensors], []
    return step


class XattnStep:
    """One decoding step of a gated cross-attention block (:class:`~.cross_attention.GatedCrossAttentionBlock`)
    in one call of the C library: LayerNorm, query product, attention over the image keys/values,
    output product, tanh-gated residual; LayerNorm, feed-forward with exact GELU, gated residual.
    Activations in ``dtype`` (fp32 or bf16), rounded where the torch modules round them (see
    ``fv_xattn_step`` in the C file). No autograd. ``products``: query, output, feed-forward in and out.

    Built once from a block's tensors and called at every step. It keeps weak references to them (a
    cached step must not keep a replaced weight's memory alive): a call after one of them was freed
    or its storage moved raises ``ValueError``."""

    def __init__(self, products: tuple[Product, Product, Product, Product], norms: tuple[Norm, Norm], *,
                 heads: int, dtype: torch.dtype):
        q, out, fc1, fc2 = products
        d = q.weight.shape[1]
        inner = q.weight.shape[0]
        if dtype not in FLOAT_DTYPES or heads <= 0 or inner % heads:
            raise ValueError(f"XattnStep: dtype {dtype} and {heads} heads for a query of {inner} features")
        shapes = [(q, inner, d), (out, d, inner), (fc1, fc1.weight.shape[0], d), (fc2, d, fc1.weight.shape[0])]
        for p, n, k in shapes:
            _check_product(p, n, k, dtype, "XattnStep")
        for n in norms:
            if not all(t is None or (t.shape == (d,) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu")
                       for t in (n.weight, n.bias)):
                raise ValueError(f"XattnStep: LayerNorm parameters must be contiguous CPU ({d},) {dtype}, got "
                                 + _describe(weight=n.weight, bias=n.bias))
        self.dtype, self.dim, self.heads, self.dim_head = dtype, d, heads, inner // heads
        self._kept = _weak_refs(*products, *norms)  # the tensors whose memory the C struct points into
        (n1, n2) = norms
        self._block = _Block(_layer(q), _layer(out), _layer(fc1), _layer(fc2), _ptr(n1.weight), _ptr(n1.bias),
                             _ptr(n2.weight), _ptr(n2.bias), n1.eps, n2.eps, d, heads, inner // heads)

    def fits(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether a call takes these operands: ``x`` (..., D) contiguous on CPU in ``dtype``; ``keys`` and
        ``values`` (kv_rows, heads, S, dim_head) of one shape, in ``dtype`` on CPU with a contiguous last
        dimension, ``x``'s rows a multiple of kv_rows; and every tensor it was built from still there."""
        m = x.numel() // self.dim if self.dim else 0
        return (x.dtype == self.dtype and x.is_contiguous() and x.device.type == "cpu" and x.shape[-1] == self.dim
                and m > 0 and keys.shape == values.shape and keys.dim() == 4 and keys.shape[0] > 0
                and m % keys.shape[0] == 0 and keys.shape[1] == self.heads and keys.shape[3] == self.dim_head
                and all(t.dtype == self.dtype and t.stride(3) == 1 and t.device.type == "cpu" for t in (keys, values))
                and _alive(self._kept))

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_gate: float, ff_gate: float,
                 blind: bool = False, *, check: bool = True) -> torch.Tensor:
        """y (as ``x``) for M rows of one token ``x``, row ``m`` attending to row ``m // (M // kv_rows)``
        of ``keys``/``values`` (:meth:`fits`; ``check=False`` skips that for callers that did it);
        ``blind``: no image to see (the attention branch adds zero; ``keys`` may have no positions)."""
        if check and not self.fits(x, keys, values):
            raise ValueError(f"XattnStep: needs a contiguous CPU (..., {self.dim}) {self.dtype} input and CPU "
                             f"(rows, {self.heads}, S, {self.dim_head}) {self.dtype} keys/values whose rows divide the "
                             "input's, built from tensors that are all still there; got "
                             + _describe(input=x, keys=keys, values=values))
        y = torch.empty_like(x)
        strides = (ctypes.c_int64 * 6)(*keys.stride()[:3], *values.stride()[:3])
        if _lib().fv_xattn_step(ctypes.byref(self._block), x.data_ptr(), y.data_ptr(), self.dtype == torch.bfloat16,
                                x.numel() // self.dim, keys.data_ptr(), values.data_ptr(), keys.shape[2], keys.shape[0],
                                strides, attn_gate, ff_gate, bool(blind), torch.get_num_threads()):
            raise MemoryError("XattnStep: the C library could not allocate its scratch memory")
        return y


class _Mlp(ctypes.Structure):
    _fields_ = [("up", _Layer), ("gate", _Layer), ("down", _Layer), ("gated", ctypes.c_int32), ("act", ctypes.c_int32)]


class MlpStep:
    """An LM's MLP for a few rows in one call of the C library: ``down(act(up(x)))`` (``gate`` None;
    MPT: exact GELU) or ``down(act(gate(x)) * up(x))`` (LLaMA and its kin: SiLU), plus an optional
    residual; activations in ``dtype`` (fp32 or bf16), rounded where the torch modules round. Keeps
    weak references to its tensors, as :class:`XattnStep`."""

    ACTS = ("gelu", "silu")

    def __init__(self, up: Product, down: Product, gate: Product | None = None, *, act: str, dtype: torch.dtype):
        if dtype not in FLOAT_DTYPES or act not in self.ACTS:
            raise ValueError(f"MlpStep: dtype {dtype} and act {act!r} (use one of {self.ACTS})")
        d, f = up.weight.shape[1], up.weight.shape[0]
        for p, n, k in [(up, f, d), (down, d, f), *([(gate, f, d)] if gate is not None else [])]:
            _check_product(p, n, k, dtype, "MlpStep")
        self.dtype, self.dim = dtype, d
        self._kept = _weak_refs(up, down, *([gate] if gate is not None else []))
        self._mlp = _Mlp(_layer(up), _layer(gate if gate is not None else up), _layer(down), gate is not None,
                         self.ACTS.index(act))

    def fits(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
        """``x`` (..., D) and ``residual`` (as ``x``) contiguous on CPU in ``dtype``; its tensors still there."""
        return (x.dtype == self.dtype and x.is_contiguous() and x.device.type == "cpu" and x.shape[-1] == self.dim
                and x.numel() > 0 and (residual is None or (residual.shape == x.shape and residual.dtype == self.dtype
                                                            and residual.is_contiguous() and residual.device.type == "cpu"))
                and _alive(self._kept))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        if check and not self.fits(x, residual):
            raise ValueError(f"MlpStep: needs a contiguous CPU (..., {self.dim}) {self.dtype} input (and residual of "
                             "its shape), built from tensors that are all still there; got "
                             + _describe(input=x, residual=residual))
        y = torch.empty_like(x)
        if _lib().fv_mlp_step(ctypes.byref(self._mlp), x.data_ptr(), _ptr(residual), y.data_ptr(),
                              self.dtype == torch.bfloat16, x.numel() // self.dim, torch.get_num_threads()):
            raise MemoryError("MlpStep: the C library could not allocate its scratch memory")
        return y


class _Llama(ctypes.Structure):
    _fields_ = [("q", _Layer), ("k", _Layer), ("v", _Layer), ("o", _Layer), ("mlp", _Mlp),
                ("norm1_w", ctypes.c_void_p), ("norm2_w", ctypes.c_void_p), ("eps1", ctypes.c_double),
                ("eps2", ctypes.c_double), ("D", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("dim_head", ctypes.c_int64)]


class LlamaStep:
    """A LLaMA decoder layer's decoding step (transformers' ``LlamaDecoderLayer``: RMSNorm, grouped-query
    attention with rotary embeddings, RMSNorm, SiLU-gated MLP, two residuals) in two calls of the C
    library around the KV cache's update: :meth:`pre` gives the step's query, key and value (rotary
    applied), the caller appends key and value to its cache, :meth:`post` attends over all of them (but
    the padding a mask names) and finishes the layer. Activations in ``dtype`` (fp32 or
    bf16), rounded where the modules round (``fv_llama_pre`` in the C file). ``products``: q, k, v, o,
    up, down, gate; ``norms``: the two RMSNorm weights (D,) and their eps. Keeps weak references to its
    tensors, as :class:`XattnStep`."""

    def __init__(self, products: tuple[Product, ...], norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]],
                 *, heads: int, kv_heads: int, dtype: torch.dtype):
        q, k, v, o, up, down, gate = products
        d, inner = q.weight.shape[1], q.weight.shape[0]
        if (dtype not in FLOAT_DTYPES or heads <= 0 or kv_heads <= 0 or heads % kv_heads or inner % heads
                or (inner // heads) % 2 or inner // heads > 512):
            raise ValueError(f"LlamaStep: dtype {dtype}, {heads} heads over {kv_heads} key/value heads for a query "
                             f"of {inner} features (an even head size up to 512)")
        dh = inner // heads
        f = up.weight.shape[0]
        for p, n, kk in [(q, inner, d), (k, kv_heads * dh, d), (v, kv_heads * dh, d), (o, d, inner),
                         (up, f, d), (down, d, f), (gate, f, d)]:
            _check_product(p, n, kk, dtype, "LlamaStep")
        for w, _eps in norms:
            if not (w.shape == (d,) and w.dtype == dtype and w.is_contiguous() and w.device.type == "cpu"):
                raise ValueError(f"LlamaStep: RMSNorm weights must be contiguous CPU ({d},) {dtype}, got "
                                 + _describe(weight=w))
        self.dtype, self.dim, self.heads, self.kv_heads, self.dim_head = dtype, d, heads, kv_heads, dh
        self._kept = _weak_refs(*products, *norms)
        (n1, e1), (n2, e2) = norms
        mlp = _Mlp(_layer(up), _layer(gate), _layer(down), True, MlpStep.ACTS.index("silu"))
        self._layer = _Llama(_layer(q), _layer(k), _layer(v), _layer(o), mlp, n1.data_ptr(), n2.data_ptr(), e1, e2,
                             d, heads, kv_heads, dh)

    def fits(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """``x`` (rows, 1, D) contiguous on CPU in ``dtype``; ``cos``/``sin`` (rows or 1, 1, head size) in
        ``dtype`` with contiguous rows; every tensor it was built from still there."""
        return self.input_fits(x) and self.rope_fits(x, cos, sin) and self.alive()

    def input_fits(self, x: torch.Tensor) -> bool:
        """:meth:`fits` for ``x`` alone."""
        return (x.dtype == self.dtype and x.dim() == 3 and x.shape[1] == 1 and x.shape[2] == self.dim
                and x.shape[0] > 0 and x.is_contiguous() and x.device.type == "cpu")

    def rope_fits(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """:meth:`fits` for ``cos``/``sin`` (the same for every layer of a model at a step)."""
        dh = self.dim_head
        return (all(t.dtype == self.dtype and t.dim() == 3 and t.shape[0] in (1, x.shape[0]) and t.shape[1:] == (1, dh)
                    and t.stride(2) == 1 and t.device.type == "cpu" for t in (cos, sin))
                and cos.stride(0) == sin.stride(0))

    def alive(self) -> bool:
        """Every tensor it was built from still there."""
        return _alive(self._kept)

    def pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, check: bool = True):
        """The step's query (rows, 1, heads * head size) and key and value (rows, kv_heads, 1, head size),
        rotary embedding applied to query and key."""
        if check and not self.fits(x, cos, sin):
            raise ValueError(f"LlamaStep: needs a contiguous CPU (rows, 1, {self.dim}) {self.dtype} input, cos and sin "
                             f"(rows or 1, 1, {self.dim_head}) {self.dtype}, built from tensors that are all still "
                             "there; got " + _describe(input=x, cos=cos, sin=sin))
        m = x.shape[0]
        q = torch.empty(m, 1, self.heads * self.dim_head, dtype=x.dtype)
        # (rows, kv_heads, 1, head size): for one position, the memory of the (rows, 1, kv_heads, head size) the C
        # code writes
        k = torch.empty(m, self.kv_heads, 1, self.dim_head, dtype=x.dtype)
        v = torch.empty_like(k)
        stride = cos.stride(0) if cos.shape[0] > 1 else 0
        if _lib().fv_llama_pre(ctypes.byref(self._layer), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), stride,
                               q.data_ptr(), k.data_ptr(), v.data_ptr(), self.dtype == torch.bfloat16, m,
                               torch.get_num_threads()):
            raise MemoryError("LlamaStep: the C library could not allocate its scratch memory")
        return q, k, v

    def post_fits(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: torch.Tensor | None = None) -> bool:
        """``keys``/``values`` (rows of ``x``, kv_heads, S >= 1, head size) in ``dtype`` on CPU with a
        contiguous last dimension; ``mask`` ``None`` or bool (rows or 1, 1, 1, S) with a contiguous last
        dimension (True: a key the row does not see)."""
        s = keys.shape[2] if keys.dim() == 4 else -1
        return (keys.shape == values.shape and keys.dim() == 4 and keys.shape[0] == x.shape[0]
                and keys.shape[1] == self.kv_heads and keys.shape[2] > 0 and keys.shape[3] == self.dim_head
                and all(t.dtype == self.dtype and t.stride(3) == 1 and t.device.type == "cpu" for t in (keys, values))
                and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, x.shape[0])
                                      and mask.shape[1:] == (1, 1, s) and mask.stride(3) == 1
                                      and mask.device.type == "cpu")))

    def post(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             mask: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """The layer's output (as ``x``) from its input ``x``, :meth:`pre`'s query and all keys/values,
        less those ``mask`` names (True: not seen; a left-padded batch's padding)."""
        if check and not (self.input_fits(x) and self.alive()
                          and self.post_fits(x, keys, values, mask)
                          and q.shape == (x.shape[0], 1, self.heads * self.dim_head)
                          and q.dtype == self.dtype and q.is_contiguous()):
            raise ValueError(f"LlamaStep: needs the input, its query from pre(), CPU (rows, {self.kv_heads}, S, "
                             f"{self.dim_head}) {self.dtype} keys/values and a bool (rows or 1, 1, 1, S) mask or None; "
                             "got " + _describe(input=x, query=q, keys=keys, values=values, mask=mask))
        y = torch.empty_like(x)
        strides = (ctypes.c_int64 * 6)(*keys.stride()[:3], *values.stride()[:3])
        mask_rows = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
        if _lib().fv_llama_post(ctypes.byref(self._layer), x.data_ptr(), q.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                keys.shape[2], strides, _ptr(mask), mask_rows, y.data_ptr(),
                                self.dtype == torch.bfloat16, x.shape[0], torch.get_num_threads()):
            raise MemoryError("LlamaStep: the C library could not allocate its scratch memory")
        return y


class _Mpt(ctypes.Structure):
    _fields_ = [("qkv", _Layer), ("out", _Layer), ("mlp", _Mlp), ("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p),
                ("ln2_w", ctypes.c_void_p), ("ln2_b", ctypes.c_void_p), ("lnq_w", ctypes.c_void_p),
                ("lnq_b", ctypes.c_void_p), ("lnk_w", ctypes.c_void_p), ("lnk_b", ctypes.c_void_p),
                ("eps1", ctypes.c_double), ("eps2", ctypes.c_double), ("eps_q", ctypes.c_double),
                ("eps_k", ctypes.c_double), ("clip", ctypes.c_float), ("scale", ctypes.c_float),
                ("qk_ln", ctypes.c_int32), ("fp32_scores", ctypes.c_int32), ("D", ctypes.c_int64),
                ("heads", ctypes.c_int64), ("dim_head", ctypes.c_int64)]


class MptStep:
    """An MPT block's decoding step (transformers' ``MptBlock``: LayerNorm, fused qkv product, attention
    with an ALiBi bias and a mask, output product, residual; LayerNorm, GELU MLP, residual) in two
    calls of the C library around the KV cache's update: :meth:`pre` gives the step's ``qkv`` (its
    key and value thirds go to the cache), :meth:`post` attends over all keys/values and finishes the
    block. Activations in ``dtype`` (fp32 or bf16), rounded where the modules round (``fv_mpt`` in the
    C file). ``products``: Wqkv, out, up, down; ``norms``: the two LayerNorms; ``clip``: the qkv clamp
    (``None``: none); ``scale``: the softmax scale; ``qk_norms``: MosaicGPT's LayerNorms of q and k
    (``qk_ln``), or ``None``; ``fp32_scores``: the attention in fp32 throughout (our MosaicGPT's bf16
    decoding) instead of rounded as transformers' ``MptAttention`` rounds. Keeps weak references to
    its tensors, as :class:`XattnStep`."""

    def __init__(self, products: tuple[Product, Product, Product, Product], norms: tuple[Norm, Norm], *, heads: int,
                 clip: float | None, scale: float, dtype: torch.dtype, qk_norms: tuple[Norm, Norm] | None = None,
                 fp32_scores: bool = False):
        qkv, out, up, down = products
        d = out.weight.shape[0]
        if dtype not in FLOAT_DTYPES or heads <= 0 or d % heads:
            raise ValueError(f"MptStep: dtype {dtype} and {heads} heads for {d} features")
        f = up.weight.shape[0]
        for p, n, k in [(qkv, 3 * d, d), (out, d, d), (up, f, d), (down, d, f)]:
            _check_product(p, n, k, dtype, "MptStep")
        for n in (*norms, *(qk_norms or ())):
            if not all(t is None or (t.shape == (d,) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu")
                       for t in (n.weight, n.bias)):
                raise ValueError(f"MptStep: LayerNorm parameters must be contiguous CPU ({d},) {dtype}, got "
                                 + _describe(weight=n.weight, bias=n.bias))
        self.dtype, self.dim, self.heads, self.dim_head = dtype, d, heads, d // heads
        self._kept = _weak_refs(*products, *norms, *(qk_norms or ()))
        n1, n2 = norms
        nq, nk = qk_norms or (Norm(None, None, 0.0), Norm(None, None, 0.0))
        mlp = _Mlp(_layer(up), _layer(up), _layer(down), False, MlpStep.ACTS.index("gelu"))
        self._block = _Mpt(_layer(qkv), _layer(out), mlp, _ptr(n1.weight), _ptr(n1.bias), _ptr(n2.weight), _ptr(n2.bias),
                           _ptr(nq.weight), _ptr(nq.bias), _ptr(nk.weight), _ptr(nk.bias), n1.eps, n2.eps, nq.eps, nk.eps,
                           float(clip or 0.0), float(scale), qk_norms is not None, bool(fp32_scores), d, heads, d // heads)

    def fits(self, x: torch.Tensor) -> bool:
        """``x`` (rows, 1, D) contiguous on CPU in ``dtype``; every tensor it was built from still there."""
        return (x.dtype == self.dtype and x.dim() == 3 and x.shape[1] == 1 and x.shape[2] == self.dim and x.shape[0] > 0
                and x.is_contiguous() and x.device.type == "cpu" and _alive(self._kept))

    def pre(self, x: torch.Tensor, *, check: bool = True):
        """``(qkv, key, value)``: the step's (rows, 1, 3 D) qkv and its key and value thirds as (rows,
        heads, 1, head size) views."""
        if check and not self.fits(x):
            raise ValueError(f"MptStep: needs a contiguous CPU (rows, 1, {self.dim}) {self.dtype} input, built from "
                             "tensors that are all still there; got " + _describe(input=x))
        m, d = x.shape[0], self.dim
        qkv = torch.empty(m, 1, 3 * d, dtype=x.dtype)
        if _lib().fv_mpt_pre(ctypes.byref(self._block), x.data_ptr(), qkv.data_ptr(), self.dtype == torch.bfloat16, m,
                             torch.get_num_threads()):
            raise MemoryError("MptStep: the C library could not allocate its scratch memory")
        heads = qkv.view(m, 1, 3, self.heads, self.dim_head)
        return qkv, heads[:, :, 1].transpose(1, 2), heads[:, :, 2].transpose(1, 2)

    def post_fits(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                  mask: torch.Tensor | None) -> bool:
        """``keys``/``values`` (rows of ``x``, heads, S >= 1, head size) in ``dtype`` on CPU with a
        contiguous last dimension; ``bias`` fp32 (heads, 1, >= S) with a contiguous last dimension;
        ``mask`` ``None`` or bool (rows or 1, 1, 1, S) with a contiguous last dimension."""
        rows, s = x.shape[0], keys.shape[2] if keys.dim() == 4 else 0
        return (keys.shape == values.shape and keys.dim() == 4 and keys.shape[0] == rows and keys.shape[1] == self.heads
                and s > 0 and keys.shape[3] == self.dim_head
                and all(t.dtype == self.dtype and t.stride(3) == 1 and t.device.type == "cpu" for t in (keys, values))
                and bias.dtype == torch.float32 and bias.dim() == 3 and bias.shape[:2] == (self.heads, 1)
                and bias.shape[2] >= s and bias.stride(2) == 1 and bias.device.type == "cpu"
                and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, rows)
                                      and mask.shape[1:] == (1, 1, s) and mask.stride(3) == 1
                                      and mask.device.type == "cpu")))

    def post(self, x: torch.Tensor, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
             mask: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
        """The block's output (as ``x``) from its input, :meth:`pre`'s ``qkv``, all keys/values, the ALiBi
        ``bias`` (its last S positions are used, as the module does) and the ``mask`` (True: not seen)."""
        if check and not (self.fits(x) and self.post_fits(x, keys, values, bias, mask)
                          and qkv.shape == (x.shape[0], 1, 3 * self.dim) and qkv.dtype == self.dtype
                          and qkv.is_contiguous()):
            raise ValueError(f"MptStep: needs the input, its qkv from pre(), CPU (rows, {self.heads}, S, {self.dim_head}) "
                             f"{self.dtype} keys/values, an fp32 ({self.heads}, 1, >= S) bias and a bool (rows, 1, 1, S) "
                             "mask or None; got " + _describe(input=x, qkv=qkv, keys=keys, values=values, bias=bias,
                                                              mask=mask))
        y = torch.empty_like(x)
        s = keys.shape[2]
        strides = (ctypes.c_int64 * 6)(*keys.stride()[:3], *values.stride()[:3])
        mask_rows = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
        if _lib().fv_mpt_post(ctypes.byref(self._block), x.data_ptr(), qkv.data_ptr(), keys.data_ptr(), values.data_ptr(),
                              s, strides, bias.data_ptr(), bias.stride(0), bias.shape[2] - s, _ptr(mask), mask_rows,
                              y.data_ptr(), self.dtype == torch.bfloat16, x.shape[0], torch.get_num_threads()):
            raise MemoryError("MptStep: the C library could not allocate its scratch memory")
        return y
