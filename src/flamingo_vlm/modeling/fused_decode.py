"""Decoding steps in native calls: a gated cross-attention block's, an LM decoder layer's, an LM MLP's.

At a decoding step (one token per row, a few rows) the block's four products read ~5.5 M weights,
and the ~40 torch calls around them (two LayerNorms, the head split, SDPA, GELU, gates, sums) cost
as much again in dispatch: on an AMD EPYC Zen 4 (2 threads, benchmark shape, int8 weights) a block
took 289 us, its four products 170 us. :func:`prepare` hands the whole step to
:class:`.native.XattnStep` instead, which computes what the modules compute (the same roundings in
bf16; fp32 within rounding), its products on the C kernels the layers would have used. The LM's
decoder layers get the same in two calls around the KV cache's own update (:func:`fused_lm`):
transformers' LLaMA layers (:class:`.native.LlamaStep`; the built-in model's LM, where a layer took
364 us with int8 weights, its products ~150 us) and MPT blocks, with transformers' attention or our
MosaicGPT's (:class:`.native.MptStep`); and where a layer's step is not taken (another LM, a
LLaMA layer called with a mask outside its model's decoding loop, another cache), its MLP where it is transformers' MPT or LLaMA MLP
(:class:`.native.MlpStep`). With every layer's step taken, what was left was Python around them (two
module calls a layer, their checks, transformers' decorators): a LLaMA model's decoding step
(``LlamaModel``, the built-in model's) runs as one loop over its layers instead
(:func:`_fused_llama_model_forward`), and so does an MPT model's (transformers' ``MptModel`` and our
MosaicGPT's, with its ALiBi row and padding mask made once: :func:`_fused_mpt_model_forward`).

It is prepared once per block per LM call sequence (``injection.Conditioning``, one ``generate`` or
forward call: the weights, routes and gates do not change within it; the LM's layers once per
:func:`fused_lm` block; each step holds its weights for that long, :func:`.native.hold`), and taken only where every
product would have run on our C kernel anyway (``QuantizedLinear`` int8 layers where their probe
chose it; ``nn.Linear`` layers routed by ``onednn_linears`` whose decode probe chose it for this row
count), so a machine where torch's kernels measured faster keeps them; and only for the modules as
they are built here: exact types, exact GELU, no hooks on the block, its modules or globally, the
activations, norms and gates in one dtype, no gradients, not training, not under CPU autocast (where
the modules run parts of a step in bf16), ``torch.compile`` or tracing. Anything else gets ``None`` and the caller runs the modules. ``FLAMINGO_VLM_FUSED=0``
turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as _module
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPastAndCrossAttentions

from . import attention, native
from .cross_attention import GatedCrossAttentionBlock, MaskedCrossAttention
from .fast_linear import native_decode_isa, outside_tracing
from .kernels import DECODE_ROWS, PLAIN_TYPES
from .lm_info import lm_context_limit
from .mpt import AlibiBias, MosaicMptAttention, MosaicMptModel
from .quantize import QuantizedLinear

__all__ = ["ENV", "enabled", "fused_lm", "layer_kind", "mlp_kind", "prepare"]

ENV = native.FUSED_ENV


def enabled() -> bool:
    """``FLAMINGO_VLM_FUSED`` is not ``0`` and our C library loads."""
    return native.fused_allowed() and native.library() is not None


def _plain_call(x: torch.Tensor) -> bool:
    """No gradient, no CPU autocast (under which the modules would run parts of the step in bf16, as
    asked), not traced or compiled."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and outside_tracing(x)


def _decode_input(x: torch.Tensor) -> bool:
    """``x`` a decoding step's hidden states for a layer's step: a plain contiguous CPU (rows, 1, D)
    fp32/bf16 tensor of at most ``DECODE_ROWS`` rows, in a :func:`_plain_call`."""
    return (type(x) in PLAIN_TYPES and x.dtype in native.FLOAT_DTYPES and x.is_cpu and x.dim() == 3
            and x.shape[1] == 1 and 0 < x.shape[0] <= DECODE_ROWS and x.is_contiguous() and _plain_call(x))


def _hooked(modules) -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _product(layer: nn.Module, x: torch.Tensor, whole_layer: bool = True) -> native.Product | None:
    """``layer`` as our kernel would run it on ``x`` here, or ``None`` where it would not
    (``whole_layer``: for a whole layer's step, :func:`.kernels.fused_route`; an MLP's step alone saves
    less around its products, and takes them only where the probe chose our kernel)."""
    kind = type(layer)
    if kind is QuantizedLinear:
        if layer.mode != "int8" or "forward" in vars(layer):
            return None
        isa = layer._native_isa(x)  # (the layer's own decision: its probe, its buffers, no tracing)
        b = layer._buffers
        return None if isa is None else native.Product(b["qweight"], b["scales"], b["bias"], isa)
    if kind is nn.Linear:
        isa = native_decode_isa(layer, x.dtype, x.shape[0], whole_layer=whole_layer)
        return None if isa is None else native.Product(layer.weight, None, layer.bias, isa)
    return None


def _norm(norm: nn.Module, dtype: torch.dtype, dim: int) -> native.Norm | None:
    if type(norm) is not nn.LayerNorm or "forward" in vars(norm) or tuple(norm.normalized_shape) != (dim,):
        return None
    w, b = norm.weight, norm.bias
    if any(t is not None and (t.dtype is not dtype or type(t) not in PLAIN_TYPES) for t in (w, b)):
        return None
    return native.Norm(w, b, float(norm.eps))


def prepare(block: GatedCrossAttentionBlock, x: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor]) -> Callable | None:
    """For decoding steps of ``block`` on inputs like ``x`` (rows, 1, D)
    with these tanh ``gates``: ``run(x, keys_values, blind) -> y``, the block's output where its queries
    attend to all of ``keys_values`` (cut to what they see; ``blind``: to nothing), or ``None`` where a
    call's operands do not fit (then, as where this returns ``None``, the caller runs the modules)."""
    attn_gate, ff_gate = gates
    if (block.training or torch.is_grad_enabled() or type(x) not in PLAIN_TYPES or x.dtype not in native.FLOAT_DTYPES
            or not x.is_cpu or x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= DECODE_ROWS
            or attn_gate.dtype is not x.dtype or ff_gate.dtype is not x.dtype or not enabled()
            or not _plain_call(x)):
        return None
    attn, ff = block.attn, block.ff
    if not (type(block) is GatedCrossAttentionBlock and type(attn) is MaskedCrossAttention and type(ff) is nn.Sequential
            and len(ff) == 4 and type(ff[2]) is nn.GELU and ff[2].approximate == "none"
            and not any("forward" in vars(m) for m in (block, attn, ff, ff[2]))):
        return None
    if _hooked((block, attn, attn.norm, attn.to_q, attn.to_out, ff, *ff)):
        return None
    products = [_product(layer, x) for layer in (attn.to_q, attn.to_out, ff[1], ff[3])]
    norms = [_norm(attn.norm, x.dtype, x.shape[-1]), _norm(ff[0], x.dtype, x.shape[-1])]
    if any(p is None for p in products) or any(n is None for n in norms):
        return None
    try:
        step = native.hold(native.XattnStep(tuple(products), tuple(norms), heads=attn.heads, dtype=x.dtype))
    except ValueError:  # shapes or layouts the C code does not take
        return None
    ag, fg = float(attn_gate), float(ff_gate)
    nothing = x.new_empty(1, step.heads, 0, step.dim_head)

    def run(x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], blind: bool) -> torch.Tensor | None:
        k, v = (nothing, nothing) if blind else keys_values
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not step.fits(x, k, v):
            return None
        return step(x, k, v, ag, fg, blind, check=False)

    return run


# -- the LM's MLPs ------------------------------------------------------------------------------------
# transformers' MLP classes whose forward is one of the two MlpStep computes, by (module, class name):
# MPT: down(GELU(up(x))) + residual (forward(hidden_states, residual)); LLaMA: down(act(gate(x)) * up(x)).
_MLPS = {("transformers.models.mpt.modeling_mpt", "MptMLP"): "mpt",
         ("transformers.models.llama.modeling_llama", "LlamaMLP"): "llama"}


def _is_silu(act: nn.Module) -> bool:
    kind = type(act)
    return "forward" not in vars(act) and (kind is nn.SiLU or (
        kind.__module__ == "transformers.activations" and kind.__name__ == "SiLUActivation"
        and kind.forward.__qualname__ == "SiLUActivation.forward"))


def mlp_kind(module: nn.Module) -> str | None:
    """``"mpt"`` / ``"llama"`` for the transformers MLPs :class:`.native.MlpStep` computes (exact GELU;
    SiLU), else ``None``."""
    kind = _MLPS.get((type(module).__module__, type(module).__name__))
    if kind == "mpt":
        act = getattr(module, "act", None)
        ok = type(act) is nn.GELU and act.approximate == "none" and "forward" not in vars(act)
    elif kind == "llama":
        ok = _is_silu(getattr(module, "act_fn", None))
    else:
        return None
    return kind if ok else None


def _prepare_mlp(mlp: nn.Module, kind: str, x: torch.Tensor) -> native.MlpStep | None:
    if mlp.training or _hooked((mlp, *mlp.children())):
        return None
    names = ("up_proj", "down_proj", "gate_proj") if kind == "llama" else ("up_proj", "down_proj")
    products = [_product(getattr(mlp, n), x, whole_layer=False) for n in names]
    if any(p is None for p in products):
        return None
    try:
        return native.hold(native.MlpStep(*products, act="silu" if kind == "llama" else "gelu", dtype=x.dtype))
    except ValueError:
        return None


def _fused_mlp_forward(mlp: nn.Module, kind: str):
    stock = type(mlp).forward
    steps: dict = {}  # (module, dtype, rows) -> MlpStep or None, for the length of the block

    def forward(self, x: torch.Tensor, *args, **kwargs):
        # MPT's forward(hidden_states, residual), LLaMA's forward(x): anything else runs the module's own
        residual = (args[0] if args else kwargs.get("residual")) if kind == "mpt" else None
        expected = (len(args) == 1 and not kwargs) or (not args and list(kwargs) == ["residual"]) if kind == "mpt" \
            else not (args or kwargs)
        if (expected and (kind != "mpt" or type(residual) in PLAIN_TYPES) and type(x) in PLAIN_TYPES
                and x.dtype in native.FLOAT_DTYPES and x.is_cpu and x.is_contiguous() and x.dim() >= 2
                and 0 < x.numel() // max(x.shape[-1], 1) <= DECODE_ROWS and _plain_call(x)):
            rows = x.numel() // x.shape[-1]
            key = (id(self), x.dtype, rows)  # (a deep copy of the module inside the block is bound to itself)
            if key not in steps:
                steps[key] = _prepare_mlp(self, kind, x.reshape(rows, 1, -1))
            step = steps[key]
            if step is not None and step.fits(x, residual):
                return step(x, residual, check=False)
        return stock(self, x, *args, **kwargs)

    return forward


# -- LLaMA decoder layers -----------------------------------------------------------------------------
# transformers' LlamaDecoderLayer (LLaMA, SmolLM2 and their kin: the built-in model's LM) at a decoding
# step, as native.LlamaStep: its ~60 torch calls around seven products (RMSNorm, head split, rotary
# embedding, SDPA, residuals) cost more than the products: on the built-in model, int8, a layer took
# 364 us, its products and MLP ~150 us (AMD EPYC Zen 4, 2 threads).
_LLAMA = "transformers.models.llama.modeling_llama"
_LAYER_KWARGS = frozenset({"attention_mask", "position_ids", "use_cache", "cache_position", "position_embeddings",
                           "cache", "past_key_values"})  # what LlamaModel passes its layers (5.0: past_key_values)


def _is(module: object, name: str, where: str = _LLAMA) -> bool:
    return type(module).__module__ == where and type(module).__name__ == name and "forward" not in vars(module)


def layer_kind(layer: nn.Module) -> str | None:
    """``"llama"`` for a transformers ``LlamaDecoderLayer`` as built (its attention, SiLU-gated MLP and
    RMSNorms of their own classes, our ``flamingo_sdpa`` attention, which the C step computes as it does
    (bf16 decoding attends in fp32, rounded once), or transformers' SDPA (the same in fp32; in bf16 its
    CPU kernel rounds the probabilities to bf16, the C step does not), at the usual scale), else ``None``."""
    if not _is(layer, "LlamaDecoderLayer"):
        return _mpt_kind(layer)
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    ok = (_is(attn, "LlamaAttention") and mlp_kind(mlp) == "llama" and all(_is(n, "LlamaRMSNorm") for n in norms)
          and getattr(attn.config, "_attn_implementation", None) in ("sdpa", attention.NAME)
          and abs(attn.scaling - attn.head_dim ** -0.5) <= 1e-12 * attn.scaling)
    return "llama" if ok else None


def _prepare_llama(layer: nn.Module, x: torch.Tensor) -> native.LlamaStep | None:
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    modules = (layer, attn, mlp, *norms, *attn.children(), *mlp.children())
    if layer.training or attn.training or _hooked(modules):  # (attn: its dropout)
        return None
    products = [_product(getattr(attn, n), x) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    products += [_product(getattr(mlp, n), x) for n in ("up_proj", "down_proj", "gate_proj")]
    if any(p is None for p in products) or any(type(n.weight) not in PLAIN_TYPES for n in norms):
        return None
    try:
        return native.hold(native.LlamaStep(
            tuple(products), tuple((n.weight, float(n.variance_epsilon)) for n in norms),
            heads=attn.config.num_attention_heads, kv_heads=attn.config.num_key_value_heads, dtype=x.dtype))
    except ValueError:
        return None


def _dynamic_cache(cache) -> bool:
    """``cache`` is transformers' ``DynamicCache`` (not offloading), whose layers' update is a
    ``torch.cat`` of keys/values (:func:`_cache_layer`)."""
    return (_is(cache, "DynamicCache", "transformers.cache_utils") and not getattr(cache, "offloading", False)
            and isinstance(getattr(cache, "layers", None), list))


def _cached(layers: list, index: int, x: torch.Tensor, kv_heads: int):
    """:func:`_cache_layer` for the ``layers`` of a cache :func:`_dynamic_cache` took."""
    if not 0 <= index < len(layers):
        return None
    layer = layers[index]
    keys = getattr(layer, "keys", None)
    if not (_is(layer, "DynamicLayer", "transformers.cache_utils") and getattr(layer, "is_initialized", False)
            and type(keys) in PLAIN_TYPES and type(layer.values) in PLAIN_TYPES):
        return None
    if not all(t.dim() == 4 and t.dtype is x.dtype and t.shape[0] == x.shape[0] and t.shape[1] == kv_heads
               and t.shape[2] > 0 and t.is_cpu for t in (keys, layer.values)):
        return None
    return layer


# -- appending a step's key and value without copying the cache -----------------------------------------
# transformers' DynamicLayer.update appends with torch.cat: each step copies the layer's whole cache, so
# a step read and wrote its keys/values once more than its attention reads them. The benchmark shape in
# int8 at 300 new tokens spent 9% of its time in those cats (the AVX2-only AMD EPYC, py-spy). Here the
# layer's keys/values become the leading part of buffers with room to spare, and a step writes its one
# position into the room.
_ROOM = 64  # positions added beyond a quarter of the length, at each regrowth


def _append(layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``layer.update(k, v)`` returns and leaves (a ``DynamicLayer`` that :func:`_cached` took;
    ``k``/``v``: (rows, heads, 1, head size)), the cached positions left where they are: ``layer.keys``/
    ``.values`` become (rows, heads, S + 1, head size) views of buffers of ~1.25 S + 64 positions,
    regrown (copied) when full. Position S of a buffer is written only while the layer's keys/values are
    the views this function set, which no earlier view reaches: a cache cropped, reordered or rebuilt
    from stored tensors (the prefix cache, assisted decoding) holds tensors of its own, and gets new
    buffers. Memory: at most a quarter of the cache, plus 64 positions, more."""
    keys, values = layer.keys, layer.values
    s = keys.shape[2]
    kept = vars(layer).get("_fv_room")
    if (kept is not None and kept[0] is keys and kept[1] is values and s < kept[2].shape[2]
            and (torch.is_inference_mode_enabled() or not kept[2].is_inference())):
        kb, vb = kept[2], kept[3]
    else:  # (a new buffer: the first step, a full one, or tensors this function did not set)
        cap = s + 1 + s // 4 + _ROOM
        kb = keys.new_empty(keys.shape[0], keys.shape[1], cap, keys.shape[3])
        vb = values.new_empty(values.shape[0], values.shape[1], cap, values.shape[3])
        kb[:, :, :s].copy_(keys)
        vb[:, :, :s].copy_(values)
    kb[:, :, s : s + 1].copy_(k)
    vb[:, :, s : s + 1].copy_(v)
    layer.keys, layer.values = keys, values = kb[:, :, : s + 1], vb[:, :, : s + 1]
    layer._fv_room = (keys, values, kb, vb)
    return keys, values


def _cache_layer(cache, index: int, x: torch.Tensor, kv_heads: int):
    """``cache``'s layer ``index`` where appending to it is a ``torch.cat`` of keys/values we can read:
    a transformers ``DynamicCache`` (not offloading) whose ``DynamicLayer`` holds (rows of ``x``,
    kv_heads, S, head size) tensors in ``x``'s dtype; else ``None`` (static, sliding-window, quantized
    caches: the module runs)."""
    return _cached(cache.layers, index, x, kv_heads) if _dynamic_cache(cache) else None


def _fused_layer_forward(layer: nn.Module):
    stock = type(layer).forward
    steps: dict = {}  # (module, dtype, rows) -> LlamaStep or None, for the length of the block

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states
        if (not args and kwargs.keys() <= _LAYER_KWARGS and kwargs.get("attention_mask") is None
                and not self.training and _decode_input(x)):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            pe = kwargs.get("position_embeddings")
            index = self.self_attn.layer_idx
            if (type(pe) is tuple and len(pe) == 2 and all(type(t) in PLAIN_TYPES for t in pe)
                    and _cache_layer(cache, index, x, self.self_attn.config.num_key_value_heads) is not None):
                key = (id(self), x.dtype, x.shape[0])  # (a deep copy of the layer inside the block is bound to itself)
                if key not in steps:
                    steps[key] = _prepare_llama(self, x)
                step = steps[key]
                if step is not None and step.fits(x, *pe):
                    q, k, v = step.pre(x, *pe, check=False)
                    keys, values = _append(cache.layers[index], k, v)  # (its keys/values were checked above)
                    return step.post(x, q, keys, values, check=False)
        return stock(self, hidden_states, *args, **kwargs)

    return forward


# -- a LLaMA model's whole decoding step ----------------------------------------------------------------
# With every layer's step taken, what was left of a step was Python: per layer two module calls (the
# Flamingo wrapper's and the decoder layer's), their argument checks and transformers' decorators, ~50 us
# a layer (the built-in model, int8: 10.3 ms a step, 1.5-2 ms of it this). LlamaModel's forward at a
# decoding step runs the same parts in one loop instead: embedding, rotary table, then per layer the
# wrapper's cross-attention (``cross_attend``) and the layer's step, then the final norm.
_MODEL_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                           "use_cache", "cache_position", "return_dict", "output_attentions", "output_hidden_states"})
_MODEL_ONLY = frozenset({"input_ids", "attention_mask", "inputs_embeds", "return_dict", "position_ids"})  # not a layer's
_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"  # (5.0: past_key_values)


def _unwrap(layer: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(the wrapper, the decoder layer) for a layer that wraps one (``decoder_layer`` and a
    ``cross_attend(hidden_states)`` that its forward runs first: ``injection.FlamingoLayer``), else
    (``None``, the layer)."""
    inner = layer._modules.get("decoder_layer")
    if inner is not None and callable(getattr(type(layer), "cross_attend", None)) and "forward" not in vars(layer):
        return layer, inner
    return None, layer


def _stack(layers) -> list | None:
    """:func:`_unwrap` of each of ``layers`` for a decoding step's loop, or ``None`` where one of them may not
    be bypassed: a hook on it, or a wrapper whose forward was replaced (the loop would skip what it does)."""
    stack = [_unwrap(m) for m in layers]
    if any(w is None and "decoder_layer" in m._modules for w, m in stack):
        return None
    return None if _hooked([m for pair in stack for m in pair if m is not None]) else stack


def _enter_layer(steps: dict, prepare: Callable, wrapper: nn.Module | None, layer: nn.Module, x: torch.Tensor):
    """``x`` after the wrapper's cross-attention (if any), and ``layer``'s step for it: ``prepare(layer,
    x)``, made once per layer, dtype and row count in ``steps`` (the block's), ``None`` where not taken."""
    if wrapper is not None:
        x = wrapper.cross_attend(x)
    key = (id(layer), x.dtype, x.shape[0])
    if key not in steps:
        steps[key] = prepare(layer, x) if _decode_input(x) else None
    return x, steps[key]


def llama_model_kind(model: nn.Module) -> str | None:
    """``"llama"`` for a transformers ``LlamaModel`` whose decoder layers (or the layers that
    :func:`_unwrap` finds inside them) are all ones :func:`layer_kind` takes, else ``None``."""
    if not (_is(model, "LlamaModel") and isinstance(getattr(model, "layers", None), nn.ModuleList)
            and all(hasattr(model, n) for n in ("embed_tokens", "rotary_emb", "norm"))):
        return None
    layers = model.layers[: model.config.num_hidden_layers]
    ok = len(layers) > 0 and all(layer_kind(_unwrap(m)[1]) == "llama" for m in layers)
    return "llama" if ok else None


def _model_decode_call(model: nn.Module, kw: dict, return_dict_default):
    """``(input_ids, cache, past length, padding)`` where an LM model's call with keywords ``kw`` is a
    plain decoding step its fused forward runs as the stock one would: one token per row (at most
    ``DECODE_ROWS`` rows) from ``input_ids``, nothing asked beyond the last hidden state and the cache
    (``return_dict_default``: what the stock forward takes for a ``return_dict`` of ``None``),
    transformers' ``DynamicCache`` holding positions; ``padding`` the (rows, 1, 1, positions) bool mask
    of the keys a row does not see (True), ``None`` where there is no padding (no mask, or one of all
    ones); else ``None``."""
    config, ids = model.config, kw.get("input_ids")
    use_cache, return_dict = kw.get("use_cache"), kw.get("return_dict")
    if (kw.get("inputs_embeds") is not None or type(ids) not in PLAIN_TYPES or ids.dim() != 2 or ids.shape[1] != 1
            or not 0 < ids.shape[0] <= DECODE_ROWS or model.training
            or kw.get("output_attentions") or kw.get("output_hidden_states")
            or getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False)
            or not (return_dict if return_dict is not None else return_dict_default)
            or not (use_cache if use_cache is not None else getattr(config, "use_cache", False))
            or getattr(config, "is_causal", True) is not True or not _plain_call(ids)):
        return None
    cache = kw.get("cache", kw.get("past_key_values"))
    if not _dynamic_cache(cache):
        return None
    first = cache.layers[0] if cache.layers else None
    if not (_is(first, "DynamicLayer", "transformers.cache_utils") and getattr(first, "is_initialized", False)
            and type(first.keys) in PLAIN_TYPES and first.keys.dim() == 4):
        return None
    past = first.keys.shape[2]
    mask = kw.get("attention_mask")
    if mask is None:
        return ids, cache, past, None
    if not (type(mask) in PLAIN_TYPES and mask.dim() == 2 and tuple(mask.shape) == (ids.shape[0], past + 1)
            and mask.is_cpu and mask.dtype in (torch.bool, torch.int64, torch.int32)):
        return None
    unseen = mask == 0
    return ids, cache, past, (unseen.view(ids.shape[0], 1, 1, past + 1) if bool(unseen.any()) else None)


def _fused_llama_model_forward(model: nn.Module):
    stock = type(model).forward
    steps: dict = {}  # (layer, dtype, rows) -> LlamaStep or None, for the length of the block

    def forward(self, *args, **kwargs):
        call = None
        if not args and kwargs.keys() <= _MODEL_KWARGS and (kwargs.get("position_ids") is not None
                                                            or kwargs.get("cache_position") is None):
            # (cache_position without position_ids: transformers 5.0 made the positions from it)
            call = _model_decode_call(self, kwargs, getattr(self.config, "return_dict", True))
        stack = None if call is None else _stack(self.layers[: self.config.num_hidden_layers])
        if stack is None:  # (a hook a module call must run)
            return stock(self, *args, **kwargs)
        ids, cache, past, padding = call
        x = self.embed_tokens(ids)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # (as the stock forward makes them)
            position_ids = (torch.arange(x.shape[1], device=x.device) + past).unsqueeze(0)
        cos, sin = position_embeddings = self.rotary_emb(x, position_ids=position_ids)
        rope = {}  # whether cos/sin fit the steps of a dtype (checked once per step)
        for wrapper, layer in stack:
            x, step = _enter_layer(steps, _prepare_llama, wrapper, layer, x)
            index = layer.self_attn.layer_idx
            if step is not None and step.dtype not in rope:
                rope[step.dtype] = step.rope_fits(x, cos, sin)
            if (step is not None and rope[step.dtype] and step.input_fits(x) and step.alive()
                    and (kept := _cached(cache.layers, index, x, step.kv_heads)) is not None):
                q, k, v = step.pre(x, cos, sin, check=False)
                keys, values = _append(kept, k, v)  # (in place of what cache.update calls: a cat)
                x = step.post(x, q, keys, values, padding, check=False)
            else:  # the layer as the stock forward calls it (its mask for the one query: what the row sees)
                rest = {k: v for k, v in kwargs.items() if k not in _MODEL_ONLY}
                x = layer(x, attention_mask=None if padding is None else ~padding,
                          position_embeddings=position_embeddings, position_ids=position_ids, **rest)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})

    return forward


# -- MPT blocks ----------------------------------------------------------------------------------------
# transformers' MptBlock at a decoding step, as native.MptStep: with transformers' MptAttention (the
# benchmark shape's LM) or our MosaicMptAttention (every MPT and MosaicGPT checkpoint we load, so
# OpenFlamingo-3B/4B/9B's LMs; modeling/mpt.py).
_MPT = "transformers.models.mpt.modeling_mpt"
_MPT_ARGS = ("position_bias", "attention_mask", "layer_past", "use_cache", "output_attentions", "cache_position")
_MPT_KWARGS = frozenset(_MPT_ARGS)


def _mpt_kind(block: nn.Module) -> str | None:
    if not _is(block, "MptBlock", _MPT):
        return None
    attn, ffn = getattr(block, "attn", None), getattr(block, "ffn", None)
    norms = (getattr(block, "norm_1", None), getattr(block, "norm_2", None))
    mosaic = type(attn) is MosaicMptAttention and "forward" not in vars(attn)
    if mosaic and attn.qk_ln:
        norms += (getattr(attn, "q_ln", None), getattr(attn, "k_ln", None))
    ok = ((mosaic or _is(attn, "MptAttention", _MPT)) and mlp_kind(ffn) == "mpt"
          and all(type(n) is nn.LayerNorm for n in norms)
          and type(getattr(block, "resid_attn_dropout", None)) is nn.Dropout and isinstance(attn.layer_idx, int)
          and not any("forward" in vars(n) for n in norms))
    return "mpt" if ok else None


def _prepare_mpt(block: nn.Module, x: torch.Tensor) -> native.MptStep | None:
    attn, ffn = block.attn, block.ffn
    modules = (block, attn, ffn, block.norm_1, block.norm_2, block.resid_attn_dropout, *attn.children(), *ffn.children())
    if (any(m.training for m in (block, attn, ffn, block.resid_attn_dropout)) or _hooked(modules)  # (their dropouts)
            or (attn.clip_qkv is not None and not attn.clip_qkv >= 0)):
        return None  # (a negative clip_qkv: the module clamps every value to it)
    products = [_product(attn.Wqkv, x), _product(attn.out_proj, x), _product(ffn.up_proj, x), _product(ffn.down_proj, x)]
    norms = [_norm(block.norm_1, x.dtype, x.shape[-1]), _norm(block.norm_2, x.dtype, x.shape[-1])]
    mosaic = type(attn) is MosaicMptAttention
    qk = [_norm(attn.q_ln, x.dtype, x.shape[-1]), _norm(attn.k_ln, x.dtype, x.shape[-1])] if mosaic and attn.qk_ln else []
    if any(p is None for p in products) or any(n is None for n in norms + qk):
        return None
    try:  # (our MosaicGPT's decoding steps attend in fp32: mpt.py)
        return native.hold(native.MptStep(tuple(products), tuple(norms), heads=attn.n_heads, clip=attn.clip_qkv,
                                          scale=float(attn.softmax_scale), dtype=x.dtype, qk_norms=tuple(qk) or None,
                                          fp32_scores=mosaic))
    except ValueError:
        return None


def _fused_mpt_forward(block: nn.Module):
    stock = type(block).forward
    steps: dict = {}  # (module, dtype, rows) -> MptStep or None, for the length of the block

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states
        call = dict(zip(_MPT_ARGS, args))
        if (len(args) <= len(_MPT_ARGS) and not call.keys() & kwargs.keys() and kwargs.keys() <= _MPT_KWARGS
                and not (call := {**call, **kwargs}).get("output_attentions")
                and not self.training and _decode_input(x)):
            cache, bias, mask = call.get("layer_past"), call.get("position_bias"), call.get("attention_mask")
            index, heads = self.attn.layer_idx, self.attn.n_heads
            kept = _cache_layer(cache, index, x, heads)
            s = kept.keys.shape[2] + 1 if kept is not None else 0
            if type(self.attn) is MosaicMptAttention:  # (it takes only an AlibiBias: anything else, its error)
                bias = bias.last_row(s) if isinstance(bias, AlibiBias) else None  # (None past its length too)
            if (kept is not None and type(bias) in PLAIN_TYPES and bias.dtype is torch.float32 and bias.dim() == 3
                    and bias.shape[:2] == (heads, 1) and bias.shape[2] >= s and bias.stride(2) == 1 and bias.is_cpu
                    and (mask is None or (type(mask) in PLAIN_TYPES and mask.dtype is torch.bool and mask.dim() == 4
                                          and mask.shape[0] in (1, x.shape[0]) and tuple(mask.shape[1:]) == (1, 1, s)
                                          and mask.stride(3) == 1 and mask.is_cpu))):
                key = (id(self), x.dtype, x.shape[0])  # (as for LLaMA layers)
                if key not in steps:
                    steps[key] = _prepare_mpt(self, x)
                step = steps[key]
                if step is not None and step.fits(x):
                    qkv, k, v = step.pre(x, check=False)
                    keys, values = _append(kept, k, v)  # (its keys/values were checked above)
                    return step.post(x, qkv, keys, values, bias, mask, check=False), None
        return stock(self, hidden_states, *args, **kwargs)

    return forward


# -- an MPT model's whole decoding step ----------------------------------------------------------------
# As for LLaMA: transformers' MptModel (the benchmark shape's LM) and our MosaicGPT (OpenFlamingo-3B/4B/9B's)
# at a decoding step run their blocks in one loop; the ALiBi row and the padding mask are made once.
_MPT_MODEL_KWARGS = frozenset({"input_ids", "cache", "past_key_values", "attention_mask", "inputs_embeds", "use_cache",
                               "output_attentions", "output_hidden_states", "return_dict"})


def mpt_model_kind(model: nn.Module) -> str | None:
    """``"mpt"`` for transformers' ``MptModel`` or our MosaicGPT's (:class:`.mpt.MosaicMptModel`) whose
    blocks (or the blocks that :func:`_unwrap` finds inside them) are all ones :func:`layer_kind` takes,
    else ``None``."""
    if not ((_is(model, "MptModel", _MPT) or (type(model) is MosaicMptModel and "forward" not in vars(model)))
            and isinstance(getattr(model, "blocks", None), nn.ModuleList) and hasattr(model, "wte")
            and hasattr(model, "norm_f")):
        return None
    ok = len(model.blocks) > 0 and all(_mpt_kind(_unwrap(m)[1]) == "mpt" for m in model.blocks)
    return "mpt" if ok else None


def _alibi_row(alibi, heads: int, s: int) -> torch.Tensor | None:
    """The fp32 (heads, 1, >= s) bias whose last ``s`` positions the steps add, from what the model
    built: our :class:`.mpt.AlibiBias` (its last row) or transformers' (heads, 1, max_seq_len) tensor."""
    bias = alibi.last_row(s) if isinstance(alibi, AlibiBias) else alibi
    if (type(bias) in PLAIN_TYPES and bias.dtype is torch.float32 and bias.dim() == 3 and bias.shape[:2] == (heads, 1)
            and bias.shape[2] >= s and bias.stride(2) == 1 and bias.is_cpu):
        return bias
    return None


def _fused_mpt_model_forward(model: nn.Module):
    stock = type(model).forward
    steps: dict = {}  # (block, dtype, rows) -> MptStep or None, for the length of the block
    length = lm_context_limit(model)[0]  # (the config's max_seq_len, which the stock forward builds ALiBi for)

    def forward(self, *args, **kwargs):
        call = None
        if len(args) <= 1 and not (args and "input_ids" in kwargs) and kwargs.keys() <= _MPT_MODEL_KWARGS:
            kw = {"input_ids": args[0], **kwargs} if args else kwargs  # (MptForCausalLM passes input_ids first)
            call = _model_decode_call(self, kw, getattr(self.config, "return_dict", True))
        stack = None if call is None or length is None else _stack(self.blocks)
        if stack is None:
            return stock(self, *args, **kwargs)
        ids, cache, past, mask = call
        heads, s = self.num_heads, past + 1
        alibi = self.build_mpt_alibi_tensor(heads, length, device=ids.device)  # (as the stock does)
        bias = _alibi_row(alibi, heads, s)
        if bias is None:  # (past max_seq_len: the stock forward's error)
            return stock(self, *args, **kwargs)
        x = self.wte(ids)
        for wrapper, block in stack:
            x, step = _enter_layer(steps, _prepare_mpt, wrapper, block, x)
            if (step is not None and step.fits(x)
                    and (kept := _cached(cache.layers, block.attn.layer_idx, x, heads)) is not None
                    and kept.keys.shape[2] == past):
                qkv, k, v = step.pre(x, check=False)
                keys, values = _append(kept, k, v)  # (in place of what cache.update calls: a cat)
                x = step.post(x, qkv, keys, values, bias, mask, check=False)
            else:  # the block as the stock forward calls it (its mask for the one query: the padding)
                x = block(x, layer_past=cache, attention_mask=mask, use_cache=True, output_attentions=False,
                          position_bias=alibi)[0]
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.norm_f(x), **{_CACHE_FIELD: cache})

    return forward


@contextlib.contextmanager
def fused_lm(module: nn.Module) -> Iterator[int]:
    """Inside the block, the LM layers of ``module`` that :func:`layer_kind` knows and the LM MLPs that
    :func:`mlp_kind` knows run their decode-sized calls without gradients (one token per row, at most
    ``DECODE_ROWS`` rows) as native calls (:class:`.native.LlamaStep`, :class:`.native.MlpStep`), where
    each of their products would have run on our C kernel (as for the cross-attention steps: module
    docstring), and a layer's KV cache is transformers' ``DynamicCache`` with no attention mask (no
    padding); yields how many modules it patched. Nothing changes where gradients are enabled at entry
    or ``FLAMINGO_VLM_FUSED=0``. Restored on exit, also when the block raises."""
    on = enabled() and not torch.is_grad_enabled()
    patched = []
    if on:
        for m in module.modules():
            own = vars(m).get("forward")
            if own is not None and not getattr(own, "stock_without_grad", False):
                continue  # (a forward of its own; those marked are the stock one where no gradient is taken)
            if kind := mlp_kind(m):
                patched.append((m, _fused_mlp_forward(m, kind)))
            elif layer_kind(m) == "llama":
                patched.append((m, _fused_layer_forward(m)))
            elif llama_model_kind(m) == "llama":
                patched.append((m, _fused_llama_model_forward(m)))
            elif mpt_model_kind(m) == "mpt":
                patched.append((m, _fused_mpt_model_forward(m)))
            elif layer_kind(m) == "mpt":
                patched.append((m, _fused_mpt_forward(m)))
    before = [vars(m).get("forward") for m, _ in patched]
    try:
        for m, forward in patched:
            m.forward = forward.__get__(m)
        yield len(patched)
    finally:
        for (m, _), own in zip(patched, before):
            if own is None:
                vars(m).pop("forward", None)
            else:
                m.forward = own
