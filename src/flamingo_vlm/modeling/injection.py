"""Insert gated cross-attention into any Hugging Face decoder-only LM.

The decoder-layer list is found from the model itself (the ``nn.ModuleList`` with
``num_hidden_layers`` identical blocks), not from a class-name table; an explicit attribute path
(``decoder_layers_attr_name``) overrides the search. Every layer is wrapped in a
:class:`FlamingoLayer`, so state-dict keys match OpenFlamingo:
``<path>.{i}.decoder_layer.*`` and ``<path>.{i}.gated_cross_attn_layer.*``.

Conditioning (image keys/values and which image each token sees) is never stored on the layers.
It lives in a :class:`ConditioningSlot`, a context variable owned by one model: set for the
duration of one call and reset in ``finally``, private to the thread/task that set it.

Per LM call, the image index of each token and the attention plan derived from it (mask, or the
slice of the image keys that every query sees) are made once, before the decoder layers run, and
shared by all of them. The image index of a position is read from a per-position history indexed
by the KV cache's length, never from a running counter: when speculative decoding (prompt lookup,
assisted generation) rejects candidate tokens and crops the cache, the next call starts from the
cropped length, so a rejected ``<image>`` candidate leaves no trace.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from . import fused_decode
from .cross_attention import ATTEND_ALL, GatedCrossAttentionBlock, MediaPlan, cut_keys_values


@dataclass
class Conditioning:
    """Everything the cross-attention layers need for one call.

    ``media``: perceiver latents (B, T_img, n_latents, D). ``text_media``: per token of the
    chunk the LM is processing now, the 1-based image index it sees (0: no image yet).
    ``history``: the same for every position so far (rows, positions), what the cache holds plus
    the current chunk: a chunk that continues a cache of length ``p`` starts from
    ``history[:, p - 1]``, so a decoding step sees its row's last image.
    """

    media: torch.Tensor
    media_token_id: int
    text_media: torch.Tensor | None = None
    history: torch.Tensor | None = None
    _kv: dict = field(default_factory=dict)
    _plans: dict = field(default_factory=dict)
    _steps: dict = field(default_factory=dict)

    @property
    def num_media(self) -> int:
        return self.media.shape[1]

    def observe(self, input_ids: torch.Tensor, past_length: int) -> None:
        """Record the image index of every token in the chunk about to run through the LM, which
        continues a KV cache of ``past_length`` positions (0: a fresh sequence)."""
        counts = (input_ids == self.media_token_id).cumsum(-1)
        history = None
        if past_length > 0:
            if self.history is None or self.history.shape[1] < past_length:
                # A cached continuation without history: assume all images came before.
                counts = counts + self.num_media
            else:
                history = self._expand(self.history, input_ids.shape[0])
                counts = counts + history[:, past_length - 1 : past_length]
        # An <image> token with no image behind it (only if generation was allowed to emit one)
        # keeps seeing the last real image, as in OpenFlamingo's cached decoding.
        counts = counts.clamp(max=self.num_media)
        if history is not None:
            if history.shape[1] > past_length:  # the cache was cropped (rejected speculative tokens)
                history = history[:, :past_length]
            counts_so_far = torch.cat([history, counts], dim=1)
        else:
            counts_so_far = counts
        self.text_media = counts
        self.history = counts_so_far
        self._plans.clear()

    def block_inputs(
        self, block: GatedCrossAttentionBlock
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], MediaPlan, tuple[torch.Tensor, torch.Tensor]]:
        """(keys/values, plan, tanh gates) of ``block`` for the current chunk; the plan is made once
        per chunk for all layers, the keys/values (cut to the plan's image) and gates once per call."""
        immediate = block.attn.only_attend_immediate_media
        plan = self._plans.get(immediate)
        if plan is None:
            plan = block.attn.plan(self.text_media, self.num_media, self.media.shape[2])
            self._plans[immediate] = plan
        key = (id(block), plan.span)
        cached = self._kv.get(key)
        if cached is None:
            gates = self._kv_gates(block)
            n = self.media.shape[2]
            if plan.span is not None and id(block) not in self._kv and plan.span[0] % n == 0 == plan.span[1] % n:
                # Only the images the span covers (a chunk that continues a reused prefix sees one of
                # many): the same keys/values as cutting all of them, for a fraction of the work.
                kv = block.attn.image_keys_values(self.media[:, plan.span[0] // n : plan.span[1] // n])
            else:
                kv = cut_keys_values(self.keys_values(block), plan)[0]
            cached = self._kv[key] = (kv, gates)
        kv, gates = cached
        return kv, (plan if plan.span is None else ATTEND_ALL), gates

    def decode_step(self, block: GatedCrossAttentionBlock, x: torch.Tensor, gates: tuple[torch.Tensor, torch.Tensor]):
        """``block``'s decoding step on inputs like ``x`` as one native call (:func:`.fused_decode.prepare`),
        prepared once per call for each block, dtype and row count; ``None`` where it is not taken."""
        key = (id(block), x.dtype, x.shape[0])
        if key not in self._steps:
            self._steps[key] = fused_decode.prepare(block, x, gates)
        return self._steps[key]

    def keys_values(self, block: GatedCrossAttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys/values of ``block`` (one row per image row), computed once per call. Rows that
        generate() or scoring repeat (beams, candidates) share them: see :class:`MaskedCrossAttention`."""
        key = id(block)
        if key not in self._kv:
            self._kv[key] = block.attn.image_keys_values(self.media)
        return self._kv[key]

    def _kv_gates(self, block: GatedCrossAttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("gates", id(block))
        if key not in self._kv:
            self._kv[key] = block.gates()
        return self._kv[key]

    def _expand(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        # generate() expands rows with repeat_interleave (beams / return sequences per row).
        rows = t.shape[0]
        if batch == rows:
            return t
        if batch % rows:
            raise RuntimeError(f"batch of {batch} rows cannot be matched to {rows} image rows")
        return t.repeat_interleave(batch // rows, dim=0)


class ConditioningSlot:
    """A per-model context variable; copies of a model get a fresh slot."""

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[Conditioning | None] = contextvars.ContextVar(
            "flamingo_conditioning", default=None
        )

    def get(self) -> Conditioning | None:
        return self._var.get()

    @contextlib.contextmanager
    def use(self, conditioning: Conditioning) -> Iterator[Conditioning]:
        token = self._var.set(conditioning)
        try:
            yield conditioning
        finally:
            self._var.reset(token)

    def __deepcopy__(self, memo) -> "ConditioningSlot":
        return ConditioningSlot()

    def __reduce__(self):
        return (ConditioningSlot, ())


class FlamingoLayer(nn.Module):
    """Runs gated cross-attention (if any) before the wrapped decoder layer."""

    def __init__(
        self,
        gated_cross_attn_layer: GatedCrossAttentionBlock | None,
        decoder_layer: nn.Module,
        slot: ConditioningSlot,
    ):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self._slot = slot
        self.gradient_checkpointing = False

    def __getattr__(self, name: str):
        # LMs read attributes such as ``attention_type`` off their layers.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._modules["decoder_layer"](self.cross_attend(hidden_states), *args, **kwargs)

    def cross_attend(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The hidden states after this layer's gated cross-attention (as they are without a block or
        outside a conditioned call): what :meth:`forward` hands the decoder layer. The LM's fused
        decoding step (:func:`.fused_decode.fused_lm`) calls it, then the decoder layer's step."""
        cond = self._slot.get()
        block = self._modules.get("gated_cross_attn_layer")  # absent (a plain None attribute) without cross-attention
        if block is None or cond is None:
            return hidden_states
        text_media = cond.text_media
        if text_media is None or text_media.shape != hidden_states.shape[:2]:
            raise RuntimeError(
                "cross-attention got hidden states of shape "
                f"{tuple(hidden_states.shape[:2])} but media positions for "
                f"{None if text_media is None else tuple(text_media.shape)}; the LM must be "
                "called with input_ids (not inputs_embeds) while images are conditioned"
            )
        kv, plan, gates = cond.block_inputs(block)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, hidden_states, kv, plan, None, gates, use_reentrant=False)
        if hidden_states.shape[1] == 1 and plan.mask is None and not torch.is_grad_enabled():
            step = cond.decode_step(block, hidden_states, gates)  # a decoding step: one native call
            y = None if step is None else step(hidden_states, kv, plan.blind)
            if y is not None:
                return y
        return block(hidden_states, kv, plan, None, gates)


def get_attr_path(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_attr_path(obj, path: str, value) -> None:
    parent, _, last = path.rpartition(".")
    setattr(get_attr_path(obj, parent) if parent else obj, last, value)


def num_decoder_layers(lm: nn.Module) -> int | None:
    config = getattr(lm, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(lm: nn.Module, attr_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, ModuleList) of the LM's decoder blocks."""
    if attr_path:
        try:
            layers = get_attr_path(lm, attr_path)
        except (AttributeError, IndexError) as e:
            raise ValueError(f"decoder_layers_attr_name={attr_path!r} not found on {type(lm).__name__}") from e
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{attr_path!r} on {type(lm).__name__} is a {type(layers).__name__}, not a ModuleList")
        return attr_path, layers
    expected = num_decoder_layers(lm)
    candidates = []
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"could not find the decoder layers of {type(lm).__name__} (looked for a ModuleList of "
            f"{expected} identical blocks); pass decoder_layers_attr_name, e.g. 'model.layers'"
        )
    # Prefer the outermost list: nested lists inside blocks (e.g. experts) come later and deeper.
    name, layers = min(candidates, key=lambda c: c[0].count("."))
    if isinstance(layers[0], FlamingoLayer):
        raise ValueError(f"{type(lm).__name__} already has Flamingo cross-attention layers")
    return name, layers


def inject_cross_attention(
    lm: nn.Module,
    *,
    slot: ConditioningSlot,
    lang_dim: int,
    vis_dim: int,
    every_n_layers: int = 1,
    dim_head: int = 64,
    heads: int = 8,
    ff_mult: int = 4,
    only_attend_immediate_media: bool = True,
    decoder_layers_attr_name: str | None = None,
) -> str:
    """Wrap every decoder layer; layer i gets cross-attention when (i+1) % every_n_layers == 0."""
    if every_n_layers < 1:
        raise ValueError(f"cross_attn_every_n_layers must be >= 1, got {every_n_layers}")
    path, layers = find_decoder_layers(lm, decoder_layers_attr_name)
    wrapped = nn.ModuleList()
    for i, layer in enumerate(layers):
        block = None
        if (i + 1) % every_n_layers == 0:
            block = GatedCrossAttentionBlock(
                dim=lang_dim,
                dim_visual=vis_dim,
                dim_head=dim_head,
                heads=heads,
                ff_mult=ff_mult,
                only_attend_immediate_media=only_attend_immediate_media,
            )
        wrapped.append(FlamingoLayer(block, layer, slot))
    set_attr_path(lm, path, wrapped)
    return path
