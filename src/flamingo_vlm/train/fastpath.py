"""Speed and memory for the training step, with the same math.

``matmul_context``: the model's fp32 linear layers on oneDNN for forward and backward, through the
one oneDNN route of :mod:`flamingo_vlm.modeling.fast_linear` (inference uses it too), where this
machine's cached probe (:mod:`flamingo_vlm.modeling.kernels`) measured oneDNN faster than torch's
default GEMM for training shapes (~2x on AVX-512 AMD; slower on the AVX2-only EPYC we have). Same
math up to fp32 rounding (another summation order). Under bf16 precisions on a CPU whose bf16 is
emulated, the same routing computes the bf16 products, forward and backward, as fp32 GEMMs of the
bf16 values (:func:`flamingo_vlm.modeling.kernels.upcast_linear`): the same results up to the
summation order, about fp32's speed instead of emulated bf16's (a tenth of it, or less).

``frozen_matrices_to``: under bf16 autocast, the frozen weights that only ever enter matrix products
(linear and convolution layers of the vision encoder and the LM) are stored in bf16 for the run.
Autocast would cast them to bf16 for every product anyway, with the same rounding, so the results
are bitwise the same; what changes is that the casts are not redone every step, are not kept
alive from forward to backward (~2 bytes per frozen LM weight), and the frozen matrices take half
the memory.

``HeadCrossEntropy``: the causal-LM loss computed from the last hidden states in chunks of trained
positions, without materialising the (tokens x vocabulary) logits, their log-softmax or their
gradient: per chunk the head runs forward and backward inside the loss's forward, and only the
gradient w.r.t. the hidden states (tokens x hidden) is kept for backward. Same FLOPs as the usual
path (no recomputation), ~0.6 GB less memory for 4 x 256 tokens and a 50k vocabulary, and
positions with label -100 never get logits. Per chunk the cross-entropy and its gradient are
computed in place in one fp32 vocabulary-wide tensor (:func:`_cross_entropy_and_grad`; autograd's
``F.cross_entropy`` held four). Chunks of 256 positions: the head's products on 64-row chunks ran
well below the GEMM rate (AMD EPYC Zen 4, the benchmark's 4 x 256 tokens and 50k vocabulary, loss
forward + backward alone: fp32 1.57-1.95 s in chunks of 64, 1.39-1.48 in 128, 1.22-1.32 in 256,
1.07-1.32 for the full logits; under bf16 autocast 0.62-0.70, 0.54-0.58, 0.48-0.52, 0.49-0.53),
for ~0.04 GB (bf16 autocast) to ~0.12 GB (fp32) more at the loss's peak than 64. The LM's own head call is stubbed out
during the forward (``capture_hidden``); whether the model's logits are exactly ``head(hidden)`` (no soft-capping or
scaling after the head) is checked once against the regular path before it is used.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..modeling.fast_linear import linear, onednn_linears
from ..modeling.token_embeddings import ExtendedLMHead


def matmul_context(enabled: bool | None, model: nn.Module | None = None):
    """Around forward *and* backward of a training step: ``model``'s fp32 CPU linear layers on
    oneDNN, forward and backward (:func:`flamingo_vlm.modeling.fast_linear.onednn_linears`, the
    same route inference uses). ``None``: per call, as this machine's measured choices say (the
    trainer passes it where only bf16 products are rerouted)."""
    if model is None or enabled is False:
        return contextlib.nullcontext()
    return onednn_linears(model, enabled=enabled)


# -- chunked loss ----------------------------------------------------------------------------------
class _Capture:
    def __init__(self):
        self.hidden = None

    def __call__(self, hidden, *args, **kwargs):
        self.hidden = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)  # the LM returns empty logits


@contextlib.contextmanager
def capture_hidden(head: nn.Module):
    """While active, ``head`` returns empty logits and records its input (the last hidden states)."""
    capture = _Capture()
    head.forward = capture  # instance attribute: nn.Module.__call__ (and its hooks) stay as they are
    try:
        yield capture
    finally:
        del head.forward


class HeadCrossEntropy(torch.autograd.Function):
    """Token-sum cross-entropy of ``head_call(hidden)`` against ``labels`` (already shifted; -100
    ignored), computed chunk by chunk. ``params``: the head's trainable parameters (their gradients
    are returned too)."""

    @staticmethod
    def forward(ctx, hidden, labels, head_call, chunk_size, *params):
        idx = (labels != IGNORE_INDEX).nonzero().flatten()
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, idx.numel(), chunk_size):
            sel = idx[start : start + chunk_size]
            with torch.enable_grad():
                h = hidden.detach().index_select(0, sel).requires_grad_(True)
                logits = head_call(h)
            loss, grad_logits = _cross_entropy_and_grad(logits, labels.index_select(0, sel))
            grads = torch.autograd.grad(logits, (h, *params), grad_outputs=grad_logits)
            del logits, grad_logits
            grad_hidden.index_copy_(0, sel, grads[0].to(grad_hidden.dtype))
            for acc, g in zip(grad_params, grads[1:]):
                acc.add_(g)
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, *grad_params = ctx.saved_tensors
        return (grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None,
                *[g * grad_out.to(g.dtype) for g in grad_params])


CHUNK = 256  # positions per chunk of the loss (module docstring)


def _cross_entropy_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits`` (rows x vocabulary) and its gradient w.r.t. them, in
    ``logits``' dtype, computed in fp32 in place: one vocabulary-wide fp32 tensor per chunk (the
    logits themselves in fp32, whose storage becomes the gradient: softmax minus the one-hot), where
    ``F.cross_entropy`` and its backward hold four (the logits, their log-softmax, its gradient and
    the logits' gradient). Under autocast the bf16 logits are overwritten with the bf16 gradient
    (they are not needed by the head's backward)."""
    with torch.no_grad():
        z = logits.detach().float()  # fp32 logits (fp32 ones: the same storage), written in place below
        picked = z.gather(1, labels[:, None])
        top = z.amax(-1, keepdim=True)
        total = z.sub_(top).exp_().sum(-1, keepdim=True)  # (no vocabulary-wide temporaries, as logsumexp makes)
        loss = (top + total.log() - picked).sum()
        z.div_(total)
        z.scatter_add_(1, labels[:, None], z.new_full((labels.shape[0], 1), -1.0))
        if z.dtype != logits.dtype:
            z = logits.detach().copy_(z)
    return loss, z


def head_cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                           chunk_size: int = CHUNK) -> torch.Tensor:
    """``hidden`` (B, L, D) before the head, ``labels`` (B, L) unshifted; returns the token-sum loss."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    params = [p for p in head.parameters() if p.requires_grad]
    return HeadCrossEntropy.apply(hidden.flatten(0, 1), shifted.flatten(), _head_call(head, hidden.device.type),
                                  chunk_size, *params)


def _head_call(head: nn.Module, device_type: str):
    """The head as a function of the hidden states. Under autocast a frozen ``nn.Linear`` head, or
    the frozen base rows of an :class:`ExtendedLMHead` (a tied 50k-row embedding whose added-token
    rows train), is cast to the autocast dtype once per call here, instead of once per chunk by
    autocast (it caches casts only for weights that require grad): the same values (autocast's
    cast), 1 cast of the 50k x 768 head per bench_train.py step instead of 16."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        frozen = not any(p.requires_grad for p in head.parameters())
        if type(head) is nn.Linear and frozen:
            weight = head.weight.to(dtype)
            bias = head.bias.to(dtype) if head.bias is not None else None
            return lambda h: linear(h, weight, bias)
        if type(head) is ExtendedLMHead and not head.weight.requires_grad:
            weight = head.weight.to(dtype)
            return lambda h: ExtendedLMHead.forward(head, h, weight=weight)
    return lambda h: _real_forward(head, h)


def _real_forward(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The head's class forward (bypasses a ``capture_hidden`` stub)."""
    return type(head).forward(head, h)


# -- frozen matrices under autocast ------------------------------------------------------------------
def _matrix_params(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own parameters that are used only as operands of a matrix product that
    autocast runs in its dtype (``F.linear`` / ``F.conv*d``)."""
    if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return ("weight", "bias")
    return tuple(getattr(type(module), "AUTOCAST_MATRIX_PARAMS", ()))  # e.g. the ViT's fused in-projection


def frozen_matrices_to(model: nn.Module, dtype: torch.dtype, skip: tuple[nn.Module | None, ...] = ()
                       ) -> list[tuple[nn.Module, str]]:
    """Store the frozen fp32 parameters of ``model``'s linear/convolution layers in ``dtype`` (the
    autocast dtype), in place. Skipped: trainable ones, the modules in ``skip`` (the trainer passes
    the LM's output head: its added-token rows are saved with the model, and the chunked loss casts
    it once per step anyway), and any parameter that another module also holds (a head tied to the
    input embeddings: the lookup must stay fp32). Returns ``[(module, name)]`` of what was cast, for
    :func:`restore_frozen_matrices`."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    cast = []
    for m in model.modules():
        if any(m is k for k in skip):
            continue
        for name in _matrix_params(m):
            p = m._parameters.get(name)
            if p is None or p.requires_grad or p.dtype != torch.float32 or owners[id(p)] > 1:
                continue
            p.data = p.data.to(dtype)
            cast.append((m, name))
    if cast:
        _detach_from_files(model)
    return cast


def _file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux; empty elsewhere)."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, _, stop = parts[0].partition("-")
            ranges.append((int(start, 16), int(stop, 16)))
    return ranges


def _detach_from_files(model: nn.Module) -> None:
    """Copy into memory the tensors of ``model`` that still read from a memory-mapped weights file.
    transformers loads an fp32 checkpoint as views of the mapped safetensors file; after the frozen
    matrices moved to bf16, the LayerNorm weights and biases left there would keep the whole mapping,
    and the pages of the old fp32 matrices that the cast read, resident (0.48 GB of the 0.65 GB file
    for the benchmark's MPT-125M). Copying the small remainder releases the mapping."""
    ranges = _file_ranges()
    if not ranges:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if t.device.type == "cpu" and any(a <= ptr < b for a, b in ranges):
                t.data = t.data.clone()


def restore_frozen_matrices(cast: list[tuple[nn.Module, str]]) -> None:
    """Back to fp32 (their values now the ``dtype``-rounded ones)."""
    for m, name in cast:
        p = m._parameters[name]
        p.data = p.data.float()


# -- allocator -------------------------------------------------------------------------------------
def set_malloc_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve allocations of ``nbytes`` or more with mmap, and return them to the OS when
    freed. glibc's default threshold grows with the freed blocks (up to 32 MB), after which freed
    activations stay in the heap and the peak resident memory of a training step grows by ~0.7 GB
    (ViT-B/32 + 125M LM). Fixing it keeps the peak at what is live. Returns False if not glibc."""
    return _mallopt({-3: int(nbytes)})  # M_MMAP_THRESHOLD


def _mallopt(settings: dict[int, int]) -> bool:
    """glibc's ``mallopt(param, value)`` for each item; False if not glibc or one was refused."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) for param, value in settings.items())
    except (OSError, AttributeError):
        return False


GLIBC_REUSE = {-3: 32 << 20, -1: 8 << 30, -2: 256 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD


def glibc_reuse_freed_memory() -> bool:
    """glibc without another allocator preloaded: serve blocks of up to 32 MB (glibc's maximum
    threshold) from the heap and never give the heap's top back to the OS while a run goes on, so the
    tensors a step frees are reused by the next instead of returned and faulted in again (zeroed
    pages). ``bench_train.py --allocator glibc``, AMD EPYC Zen 4, two interleaved pairs: amp_bf16
    5.47 / 5.02 -> 5.18 / 4.31 s/step, fp32 unchanged within noise (9.03 / 8.58 vs 8.76 / 9.07), the
    same peak RSS (tcmalloc, which the ``flamingo-vlm`` command preloads, needs none of this: 4.0-4.4
    s). Process-wide, for the rest of the process. Returns False where it does not apply (another
    allocator preloaded, not glibc)."""
    from ..allocator import preloaded

    return preloaded() is None and _mallopt(GLIBC_REUSE)
