"""Weight-only int8 / int4 quantization of a Flamingo's linear layers, for inference on CPU.

``quantize_model(model, "int8" | "int4")`` replaces, in place, the ``nn.Linear`` layers of the
language model's decoder blocks, the gated cross-attention blocks and the perceiver resampler by
:class:`QuantizedLinear`. The LM head is quantized too with int8 (its added-token rows, trainable
and split off, see :mod:`.token_embeddings`, stay in fp), not with int4 (``head=`` overrides): a
decode step reads the whole head, 113 MB in fp32 for the built-in model's 49k-token vocabulary, a
sixth of an int8 step there (24.3 -> 20.4 ms/token with it quantized, AMD EPYC Zen 4), and int8 per
row keeps the greedy output identical, while int4 changed the built-in model's caption from its
first token. Left in full precision: the vision encoder (it runs once per prompt on many rows, where
these kernels are not faster), the token embeddings (a tied head's quantized copy is separate, the
embedding keeps its fp weight for look-ups), norms, latents and gates, and any layer whose shape the
kernel cannot take (counted in the returned report).

Schemes (what torchao calls int8/int4 weight-only; no torchao needed):

* ``int8``: symmetric, one fp scale per output row: ``w ~ q * s``, ``q`` in [-127, 127];
  product by ``torch.ops.aten._weight_int8pack_mm``, or, where this machine measured it faster:
  for calls of at most ``DECODE_ROWS`` rows (decoding) by our C kernel on the same int8 matrix
  (:func:`.native.int8_linear`, probe part ``int8_decode`` of :mod:`.kernels`; on an AMD EPYC
  Zen 4 it reads the weights at 34 GB/s against torch's 15-17, and accumulates in fp32 from the
  layer's own input dtype, fp32 inputs not rounded to bf16 first), and for larger calls (a prompt's
  prefill, batched scoring) by the int8 matrix converted to bf16 (or fp32) at the call and
  multiplied by ``F.linear`` (:func:`.kernels.int8_gemm`, probe part ``int8_gemm``; on the Zen 4
  2.1x faster than torch's kernel at 64 rows, 1.4x at 16; the copy is dropped after the call).
* ``int4``: asymmetric, per group of ``group_size`` (default 32) input columns of each row:
  ``w ~ q * s + min``, ``q`` in [0, 15], packed two per byte by
  ``aten._convert_weight_to_int4pack_for_cpu``; product by ``aten._weight_int4pack_mm_for_cpu``.
  Needs in_features % group_size == 0; out_features are padded to a multiple of 16 (zero rows).

Kernel choice, by measurement (``benchmarks/bench_quantize.py``) on an AVX2-only AMD EPYC with
torch 2.13: torch's two kernels are fast only with **bf16 activations** (with fp32 activations they
took 8-30x longer than the fp32 ``F.linear`` they replace), so a layer on them converts its input to
bf16, runs the kernel and returns the result in the input's dtype; the rest of the model keeps its
own dtype (fp32 where bf16 is emulated). Measured there on 24 decode-sized layers at batch 1: fp32
11 ms, bf16 13 ms, int8 (torch's kernel) 12 ms, int4 3.3-3.9 ms. A ``torch.compile``'d
dequantize-then-matmul was 20-40x slower than fp32 there and is not used; torchao 0.18's eager int8
was slower than bf16 (issue 27). Our int8 kernel takes the layer's input as it is (fp32 or bf16) and
has not been timed on that CPU (its probe decides there). On an AMD EPYC Zen 4, whole-model batch-1
decode: int8 1.42x / 1.27x bf16 (benchmark shape / built-in model), int4 1.37x / 1.15x, where bf16
decodes on our own bf16 kernel (against bf16 on oneDNN's packed copies, int8 was 1.75x / 1.73x).

Only CPU has these kernels in torch: quantizing a model on another device, or running a quantized
layer on one, raises a one-line ``ValueError``. A quantized model cannot be trained (its weights are
integer buffers; a backward pass through a quantized layer raises a one-line ``ValueError``) or saved with ``save_pretrained`` (it refuses, see :func:`check_not_quantized`):
quantize at load time instead (``from_pretrained(..., quantize="int4")``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..files import byte_span, release_file_pages
from . import native
from .kernels import DECODE_ROWS, int8_gemm, int8_gemm_route, int8_isa

__all__ = ["MODES", "QuantizedLinear", "check_not_quantized", "quantization_of", "quantize_model", "weight_bytes",
           "weights_summary"]

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_COMPUTE = torch.bfloat16  # torch's kernels' activation dtype (see the module docstring)


def check_mode(mode: str | None) -> str | None:
    """``None`` or a valid mode, else a one-line error naming the choices."""
    if mode is None or mode in MODES:
        return mode
    raise ValueError(f"quantize={mode!r} is not supported: use one of {', '.join(map(repr, MODES))} or None")


def _kernels_available(mode: str) -> bool:
    ops = ("_weight_int8pack_mm",) if mode == "int8" else ("_weight_int4pack_mm_for_cpu",
                                                           "_convert_weight_to_int4pack_for_cpu")
    return all(hasattr(torch.ops.aten, op) for op in ops)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` with int8 or int4 weights (buffers); same input/output shapes and dtype."""

    native = True  # int8: our C kernel for decode-sized calls where measured faster; False keeps torch's

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.group_size = mode, group_size
        w = linear.weight.detach().float()
        if mode == "int8":
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q.contiguous())
            self.register_buffer("scales", scale.to(_COMPUTE))
        else:
            pad = -w.shape[0] % 16  # the kernel packs 16 output rows at a time: zero rows, sliced off after
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w
            n, k = w.shape
            g = w.reshape(n, k // group_size, group_size)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
            # the kernel dequantizes as (q - 8) * scale + zero, so zero = min + 8 * scale
            zero = lo + 8 * scale
            sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # (k // group, n, 2)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales", sz.to(_COMPUTE))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @staticmethod
    def supports(linear: nn.Linear, mode: str, group_size: int = 32) -> bool:
        if mode == "int4":
            return linear.in_features % group_size == 0
        # torch 2.13's _weight_int8pack_mm on CPU crashes or returns wrong values where in_features is
        # not a multiple of 16 (e.g. 8, 37, 40; 16, 48, 64 are right): such layers stay in fp
        return linear.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._forward(x)
        if out.requires_grad:  # (an input that wants a gradient: a training step, or a forward outside no_grad)
            out.register_hook(self._refuse_backward)
        return out

    def _refuse_backward(self, grad: torch.Tensor) -> None:
        """A backward pass through a quantized layer: torch's packed kernels have no derivative ("derivative
        for aten::_weight_int8pack_mm is not implemented"), and where another route had one the model
        trained on rounded weights it cannot save. Refused with what to do, whichever route ran."""
        raise ValueError(f"a model quantized to {self.mode} is for inference and cannot be trained (its LM, "
                         "cross-attention and perceiver weights are rounded integer buffers): train the model "
                         "built or loaded without quantize=, then quantize it for inference")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"quantize={self.mode!r} runs on CPU only (torch has no such kernel on {x.device.type}); "
                             "load the model without quantize= to use this device")
        if (self.mode == "int8" and x.shape[-1] == self.in_features > 0
                and 0 < x.numel() // self.in_features <= DECODE_ROWS and (isa := self._native_isa(x)) is not None):
            # operands as int8_linear needs them: checked here (x: (..., in) of a float dtype, made
            # contiguous; qweight, scales, bias: this layer's CPU buffers, (out, in) int8, (out,) float)
            b = self._buffers
            return native.int8_linear(x if x.is_contiguous() else x.contiguous(), b["qweight"], b["scales"], b["bias"],
                                      isa=isa, check=False)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "int8":
            rows = x2.shape[0]
            route = int8_gemm_route(rows) if rows > DECODE_ROWS and x2.dtype in native.FLOAT_DTYPES else "aten"
            return int8_gemm(x2, self.qweight, self.scales, self.bias, route).reshape(*lead, self.out_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(_COMPUTE), self.qweight, self.group_size,
                                                         self.scales.to(_COMPUTE))
        out = out[:, : self.out_features] if out.shape[1] != self.out_features else out
        out = out.to(x.dtype).reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _native_isa(self, x: torch.Tensor) -> int | None:
        """Our C kernel's SIMD path for this call, or ``None`` for torch's kernel. Ours takes
        decode-sized fp32/bf16 calls of a layer whose buffers are on the CPU and contiguous, without a
        gradient wanted, not traced by ``torch.compile`` or ``torch.jit.trace`` (they would not see a
        ctypes call), where it was chosen for this machine (:func:`.kernels.int8_isa`)."""
        if not (self.native and x.dtype in native.FLOAT_DTYPES and not (x.requires_grad and torch.is_grad_enabled())
                and self._buffers_ok() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            return None
        return int8_isa()

    def _buffers_ok(self) -> bool:
        """Whether the buffers are what our C kernel takes (CPU, contiguous, float scales and bias): checked
        once per set of buffer tensors (a decode step makes hundreds of these calls), again after
        ``.to()``, ``load_state_dict(assign=True)``, ``.data = ...`` or anything else that replaces one or
        its storage."""
        bufs = self._buffers
        q, s, b = bufs["qweight"], bufs["scales"], bufs["bias"]
        # identity alone is not enough: ``.data = ...`` and ``.to()`` in place keep the tensor object
        key = tuple((id(t), t.data_ptr(), t.dtype, t.stride()) if t is not None else None for t in (q, s, b))
        seen = self.__dict__.get("_buffers_checked")
        if seen is None or seen[0] != key:
            ok = (s.dtype in native.FLOAT_DTYPES and q.device.type == "cpu" and s.device.type == "cpu"
                  and q.is_contiguous() and s.is_contiguous()
                  and (b is None or (b.dtype in native.FLOAT_DTYPES and b.device.type == "cpu" and b.is_contiguous())))
            seen = (key, ok)
            self.__dict__["_buffers_checked"] = seen  # (not a module attribute: no state, no __setattr__)
        return seen[1]

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with (for tests and error reports)."""
        if self.mode == "int8":
            return self.qweight.float() * self.scales.float()[:, None]
        eye = torch.eye(self.in_features, dtype=_COMPUTE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.qweight, self.group_size, self.scales.to(_COMPUTE)).float().t()[: self.out_features]

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}"


class QuantizedTiedHead(nn.Module):
    """The LM head of a tied-embedding LM (:class:`~.token_embeddings.ExtendedLMHead`) with its product
    quantized: the full vocabulary from a quantized copy of the (tied, fp) weight, then the added
    tokens' logits from their trainable fp rows, as ``ExtendedLMHead.forward`` does. The embedding keeps
    the fp weight for its look-ups, so this adds the quantized copy's bytes and saves reading the fp
    matrix at every decoding step."""

    def __init__(self, head: nn.Module, mode: str, group_size: int = 32):
        super().__init__()
        self.quantized = QuantizedLinear(head, mode, group_size)
        self.head = head  # its new-token rows and ids (the fp weight is the embedding's, shared)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead, head = hidden.shape[:-1], self.head
        h2 = hidden.reshape(-1, hidden.shape[-1])
        logits = self.quantized(h2)
        bias = head.bias[head.new_ids] if head.bias is not None else None
        new_logits = F.linear(h2, head.new_weight.to(h2.dtype), bias).to(logits.dtype)
        logits.index_copy_(-1, head.new_ids, new_logits)
        return logits.view(*lead, logits.shape[-1])


def _quantize_head(model: nn.Module, mode: str, group_size: int) -> int:
    lm = getattr(model, "lang_encoder", model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not QuantizedLinear.supports(head, mode, group_size):
        return 0
    if type(head) is nn.Linear:
        lm.set_output_embeddings(QuantizedLinear(head, mode, group_size))
    elif hasattr(head, "new_ids") and hasattr(head, "new_weight"):
        lm.set_output_embeddings(QuantizedTiedHead(head, mode, group_size))
    else:
        return 0
    return 1


def _targets(model: nn.Module) -> Iterable[nn.Module]:
    """The modules whose ``nn.Linear`` layers are quantized: a Flamingo's decoder layers (each with
    its injected cross-attention block) and its perceiver; any other module (a bare LM): all of it
    but its output head (see :func:`quantize_model`)."""
    if not hasattr(model, "decoder_layers") or not hasattr(model, "perceiver"):
        yield model
        return
    yield from model.decoder_layers()
    yield model.perceiver


def quantize_model(model: nn.Module, mode: str | None, *, group_size: int = 32, head: bool | None = None
                   ) -> dict[str, int]:
    """Quantize ``model``'s linear layers in place (see the module docstring); returns
    ``{"quantized": n, "skipped": m}`` (layers left in full precision because of their shape).
    ``head=True`` also quantizes the LM's output head (a tied one through :class:`QuantizedTiedHead`);
    the default (``None``) does so for int8, not for int4 (see the module docstring).
    ``mode=None`` does nothing. The model should be in eval mode; it is marked so that saving refuses."""
    if check_mode(mode) is None:
        return {"quantized": 0, "skipped": 0}
    head = (mode == "int8") if head is None else head
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size} is not supported: use one of {INT4_GROUP_SIZES}")
    if not _kernels_available(mode):
        raise ValueError(f"quantize={mode!r} needs torch's packed {mode} CPU kernels, which torch {torch.__version__} lacks")
    if quantization_of(model):
        raise ValueError(f"the model is already quantized ({quantization_of(model)}); load it again to change that")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"quantize={mode!r} runs on CPU only (torch has these kernels for CPU); the model is on "
                         f"{', '.join(sorted(devices - {'cpu'}))}: quantize before moving it, or drop quantize=")
    before = [byte_span(t) for t in (*model.parameters(), *model.buffers())]  # (addresses: each layer is freed as replaced)
    done = skipped = 0
    bare_head = getattr(model, "get_output_embeddings", lambda: None)()  # a bare LM's: only through `head`
    seen: set[int] = {id(bare_head)} if bare_head is not None else set()
    with torch.no_grad():
        for root in _targets(model):
            # (each root's replaced pages released as it is done: the load's peak holds one layer's fp32
            # pages, not all of them; the built-in model with int8, 1.35 GB peak before)
            replaced = [byte_span(t) for t in (*root.parameters(), *root.buffers())]
            for parent in list(root.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is not nn.Linear or id(child) in seen:
                        continue
                    seen.add(id(child))
                    if QuantizedLinear.supports(child, mode, group_size):
                        setattr(parent, name, QuantizedLinear(child, mode, group_size))
                        done += 1
                    else:
                        skipped += 1
            release_file_pages(replaced, live=[*model.parameters(), *model.buffers()])
            del replaced
        if head:
            done += _quantize_head(model, mode, group_size)
    # A model loaded from safetensors keeps its file mapped for the weights left in full precision
    # (norms, embeddings); the replaced matrices' pages, read once to quantize them, would stay
    # resident with it: the built-in model's LM, 0.3 GB of fp32 pages next to its int8 weights.
    release_file_pages(before, live=[*model.parameters(), *model.buffers()])
    del before
    model.quantization = mode  # read by quantization_of / check_not_quantized
    return {"quantized": done, "skipped": skipped}


def scheme(mode: str | None) -> str | None:
    """What a mode means now, for cache keys: int8 gained its quantized LM head after int8 results were
    cached (evaluation units cached under plain ``"int8"`` are not reused)."""
    return {"int8": "int8+head"}.get(mode, mode)


def quantization_of(model: nn.Module) -> str | None:
    """``"int8"``/``"int4"`` if ``model`` was quantized by :func:`quantize_model`, else None."""
    return getattr(model, "quantization", None) if isinstance(getattr(model, "quantization", None), str) else None


def weights_summary(model: nn.Module) -> str:
    """How a Flamingo computes, for start-up lines (``serve``, ``generate``): its dtype, and ``int8
    weights`` / ``int4 weights`` where :func:`quantize_model` made it."""
    dtype = str(next(model.perceiver.parameters()).dtype).removeprefix("torch.")
    mode = quantization_of(model)
    return f"{dtype}, {mode} weights" if mode else dtype


def check_not_quantized(model: nn.Module, action: str) -> None:
    """Refuse ``action`` (``"save_pretrained"``, training) on a quantized model, in one line."""
    mode = quantization_of(model)
    if mode:
        raise ValueError(f"cannot {action} a model quantized to {mode}: its weights are rounded integer buffers; "
                         "save or train the unquantized model and quantize when loading (quantize=...)")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (quantized weights, their scales, everything else)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
