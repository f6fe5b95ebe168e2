"""The Flamingo model: a frozen vision encoder and a frozen causal LM joined by a trainable
Perceiver Resampler and gated cross-attention layers.

Data flows one way: pixels -> vision tokens -> perceiver latents -> per-layer image keys/values
-> cross-attention inside the LM -> logits. Nothing about the images is stored on the modules
between calls (see :mod:`.injection`). How the model is put together is ``model.config``, a
:class:`~.config.FlamingoConfig`.

Saving and loading (``save_pretrained``, ``from_pretrained``, OpenFlamingo checkpoints through
``load_state_dict(strict=False)``) live in the loading layer above (:mod:`flamingo_vlm.pretrained`,
:mod:`flamingo_vlm.checkpoints`), which builds models with this class; this module imports nothing
above :mod:`flamingo_vlm.modeling`. The loading layer installs those functions here when it is
imported (:func:`install_persistence`). ``import flamingo_vlm`` loads its names on first use (so that
the command line starts without torch, see :mod:`flamingo_vlm.allocator`), so a model built from this
layer alone may call a method before the loading layer was imported: the method then imports it by
name (:data:`LOADING_LAYER`), at call time; nothing here imports it when this module loads.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from .attention import use_for as use_fp32_decode_attention
from .config import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, TokenConfig
from .fast_linear import onednn_linears, upcast_convs
from .kernels import decide
from .fused_decode import fused_lm
from .injection import Conditioning, ConditioningSlot, inject_cross_attention
from .lm_info import lm_hidden_size
from .perceiver import PerceiverResampler
from .speculative import assistant_conditioning, generate_rows, is_speculative
from .token_embeddings import ExtendedEmbedding, ExtendedLMHead


class _ObserveMedia:
    """Forward pre-hook on the LM: before each LM call, record which image every token sees."""

    def __init__(self, slot: ConditioningSlot):
        self.slot = slot

    def __call__(self, module, args, kwargs):
        cond = self.slot.get()
        if cond is None:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a conditioned Flamingo LM call needs input_ids (inputs_embeds cannot carry <image> positions)")
        past = _cache_in(kwargs)
        # The cache's length, not a running count, says where this chunk starts: it is right also
        # after speculative decoding crops rejected candidates off the cache.
        cond.observe(input_ids, _cache_length(past) if past is not None else 0)
        return None


def _contiguous_input(module, args):
    # A strided 3-D input (transformers passes hidden[:, -1:]) against a frozen head makes torch run
    # bmm over a per-row expanded weight, which bf16 CPU kernels materialise (a vocab-sized copy per row).
    if args and args[0].dim() == 3 and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


# transformers 5.24 renamed the KV cache ``past_key_values`` -> ``cache`` (argument and output);
# earlier 5.x releases know only ``past_key_values``. Read both, pass the LM's own name.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_in(kwargs: dict):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _output_cache(output):
    for name in _CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(output).__name__} carries no KV cache (was use_cache=True passed?)")


def _cache_length(past) -> int:
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)):
        return int(past[0][0].shape[-2]) if len(past) and past[0] is not None else 0
    return 0


def _onednn_inference(method):
    """Run ``method`` with the model's fp32 CPU linear layers on oneDNN when no gradients are
    wanted and ``cpu_onednn`` allows it (see :mod:`flamingo_vlm.modeling.fast_linear`), and the LM's
    decoder layers' (or MLPs') decoding steps in native calls where their products run on our kernels
    (:func:`~.fused_decode.fused_lm`). With gradients (a training loop of the user's own) only bf16
    products are routed, where this machine's bf16 is emulated (:func:`_emulated_bf16_products`)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with onednn_linears(self, enabled=_routing(self)), fused_lm(self):
            return method(self, *args, **kwargs)

    return wrapped


def _routing(model: "Flamingo") -> bool | None:
    """``onednn_linears``' ``enabled`` for a call of ``model`` (see :func:`_onednn_inference`)."""
    if not torch.is_grad_enabled():
        return model.cpu_onednn
    return None if (model.cpu_onednn is not False and not torch.compiler.is_compiling()
                    and _emulated_bf16_products(model)) else False


def _emulated_bf16_products(model: nn.Module) -> bool:
    """The model's products are bf16 ones on CPU (bf16 autocast, or a bf16 LM) and this machine runs
    them faster as fp32 GEMMs of the bf16 values (the ``bf16_gemm`` choice of :mod:`.kernels`: bf16
    emulated, where torch's bf16 backward of a linear layer takes over 100x fp32's time)."""
    p = next(model.lang_encoder.parameters(), None)
    if p is None or p.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    return (autocast or p.dtype is torch.bfloat16) and decide("bf16_gemm")


# -- persistence, installed by the loading layer ---------------------------------------------------
_PERSISTENCE: dict[str, Callable[..., Any]] = {}


def install_persistence(
    *, save_pretrained: Callable[..., Any], from_pretrained: Callable[..., Any],
    load_openflamingo_state_dict: Callable[..., Any],
) -> None:
    """Called by :mod:`flamingo_vlm.pretrained` on import: the functions behind
    :meth:`Flamingo.save_pretrained`, :meth:`Flamingo.from_pretrained` and
    ``Flamingo.load_state_dict(..., strict=False)``. Dependency inversion instead of an upward
    import: the loading layer depends on the model, never the other way round."""
    _PERSISTENCE.update(save_pretrained=save_pretrained, from_pretrained=from_pretrained,
                        load_openflamingo_state_dict=load_openflamingo_state_dict)


LOADING_LAYER = "flamingo_vlm.pretrained"  # installs the functions below when imported


def _persistence(name: str) -> Callable[..., Any]:
    if name not in _PERSISTENCE:  # a model built from this layer before anything imported the loading layer
        importlib.import_module(LOADING_LAYER)
    try:
        return _PERSISTENCE[name]
    except KeyError:
        raise RuntimeError(f"Flamingo.{name}: {LOADING_LAYER} did not install it") from None


class SuppressTokens(LogitsProcessor):
    """transformers' ``SuppressTokensLogitsProcessor`` (the given token ids get score -inf) without its
    per-step ``isin`` over the whole vocabulary (~0.15 ms per step at a 50k vocabulary on CPU)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = [int(i) for i in token_ids]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, _ids_in(self.token_ids, scores), -float("inf"))


@functools.lru_cache(maxsize=64)
def _vocab_ids(token_ids: tuple[int, ...], vocab: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i in token_ids if 0 <= i < vocab], dtype=torch.long, device=device)


def _ids_in(token_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
    """The ids of ``token_ids`` within ``scores``' vocabulary, as a tensor on its device (made once: ~10 us a
    step to filter and move them at every step)."""
    return _vocab_ids(tuple(token_ids), scores.shape[-1], scores.device)


class MinLength(LogitsProcessor):
    """transformers' ``MinLengthLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor`` (the eos ids
    get score -inf while a sequence is shorter than ``min_length`` tokens, prompt included) without their
    per-step ``arange``/``isin`` over the whole vocabulary and copy of the scores: ~0.25 ms a step each at
    a 49k vocabulary on an AMD EPYC Zen 4, and ``min_new_tokens`` runs both."""

    def __init__(self, min_length: int, eos_token_ids: list[int]):
        self.min_length = min_length
        self.token_ids = [int(i) for i in eos_token_ids]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores
        return scores.index_fill(-1, _ids_in(self.token_ids, scores), -float("inf"))


# what makes transformers' min-length processors act otherwise than MinLength: processors it runs after
# them (a forced eos on the last step, a length penalty on eos, -inf replaced), a length from a generation
# config the keywords would override, an assistant that drops them from its own list
_MIN_LENGTH_OWN = ("forced_eos_token_id", "exponential_decay_length_penalty", "remove_invalid_values",
                   "assistant_model", "assistant_tokenizer", "prompt_lookup_num_tokens", "generation_config")


def _min_length(generate_kwargs: dict, prompt_length: int, config) -> int:
    """The length (prompt included) below which eos is barred, as transformers reads ``min_new_tokens``
    (which wins) and ``min_length`` from ``generate``'s keywords, popped from them; 0 with the keywords
    left to transformers' own processors where they would act otherwise than :class:`MinLength`
    (``_MIN_LENGTH_OWN`` in the keywords or the LM's generation ``config``, or a minimum set there)."""
    min_new, min_length = generate_kwargs.get("min_new_tokens"), generate_kwargs.get("min_length")
    if (min_new or 0) <= 0 and (min_length or 0) <= 0:
        return 0
    if (any(generate_kwargs.get(k) for k in _MIN_LENGTH_OWN)
            or any(getattr(config, k, None) for k in (*_MIN_LENGTH_OWN[:3], "min_new_tokens", "min_length"))):
        return 0
    del generate_kwargs["min_new_tokens" if min_new is not None else "min_length"]
    generate_kwargs.pop("min_length", None)
    return prompt_length + min_new if min_new is not None else min_length


class Flamingo(nn.Module):
    """A frozen vision encoder and a frozen causal LM joined by a trainable Perceiver Resampler and
    gated cross-attention; OpenFlamingo's constructor, ``forward``, ``generate`` and state-dict names."""

    #: Inference without gradients (generate, score, no-grad forward) runs fp32 CPU linear layers on
    #: oneDNN (:mod:`flamingo_vlm.modeling.fast_linear`) where this machine's cached probe measured it
    #: faster than torch's default (:mod:`.kernels`; up to 2x faster decoding, same math up to fp32
    #: rounding). ``None``: that measured choice; ``True``/``False`` on an instance force it.
    #: Where bf16 is emulated, bf16 products (also with gradients) run as fp32 GEMMs of the bf16
    #: values (:func:`.kernels.upcast_linear`); ``False`` keeps torch's kernels there too.
    cpu_onednn: bool | None = None

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_encoder: nn.Module,
        eoc_token_id: int,
        media_token_id: int,
        vis_dim: int,
        cross_attn_every_n_layers: int = 1,
        gradient_checkpointing: bool = False,
        *,
        decoder_layers_attr_name: str | None = None,
        new_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        freeze_lm_embeddings: bool = False,
        perceiver_kwargs: Mapping[str, Any] | PerceiverConfig | None = None,
        cross_attn_kwargs: Mapping[str, Any] | CrossAttentionConfig | None = None,
        base_vocab_size: int | None = None,
    ):
        super().__init__()
        perceiver_config = PerceiverConfig.coerce(perceiver_kwargs)
        xattn_config = CrossAttentionConfig.coerce(cross_attn_kwargs)
        self.eoc_token_id = eoc_token_id
        self.media_token_id = media_token_id
        self.pad_token_id = pad_token_id
        self.vis_dim = vis_dim
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        self.lang_dim = lm_hidden_size(lang_encoder)
        self._slot = ConditioningSlot()

        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(dim=vis_dim, **perceiver_config.to_dict())
        self.lang_encoder = lang_encoder
        use_fp32_decode_attention(lang_encoder)  # bf16 decode steps' attention in fp32 on CPU (.attention)
        self.decoder_layers_attr_name = inject_cross_attention(
            lang_encoder,
            slot=self._slot,
            lang_dim=self.lang_dim,
            vis_dim=vis_dim,
            every_n_layers=cross_attn_every_n_layers,
            decoder_layers_attr_name=decoder_layers_attr_name,
            **xattn_config.to_dict(),
        )
        lang_encoder.register_forward_pre_hook(_ObserveMedia(self._slot), with_kwargs=True)
        lm_params = inspect.signature(lang_encoder.forward).parameters
        self._lm_takes_position_ids = "position_ids" in lm_params
        self._cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"

        # Freeze the backbones; the perceiver, cross-attention and new-token rows train.
        self.vision_encoder.requires_grad_(False)
        self.lang_encoder.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        for layer in self.decoder_layers():
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.requires_grad_(True)
        # Only <|endofchunk|> and <image> train, as in OpenFlamingo (the <PAD> row never does).
        self._install_new_token_rows(new_token_ids or [eoc_token_id, media_token_id], freeze_lm_embeddings)
        # How this model was put together, as data: saved with it so it can be rebuilt. The backbone
        # references are filled in by whoever loaded the backbones (the factory, from_pretrained).
        self.config = FlamingoConfig(
            perceiver=perceiver_config,
            cross_attention=xattn_config,
            tokens=TokenConfig(
                eoc_token_id=eoc_token_id, media_token_id=media_token_id, pad_token_id=pad_token_id,
                base_vocab_size=base_vocab_size if base_vocab_size is not None else min(eoc_token_id, media_token_id),
            ),
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            decoder_layers_attr_name=self.decoder_layers_attr_name,
            freeze_lm_embeddings=freeze_lm_embeddings,
        )

        ref = next(lang_encoder.parameters())
        self.perceiver.to(device=ref.device, dtype=ref.dtype)
        for layer in self.decoder_layers():
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.to(device=ref.device, dtype=ref.dtype)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_config(cls, vision_encoder: nn.Module, lang_encoder: nn.Module, config: FlamingoConfig, *,
                    gradient_checkpointing: bool = False) -> "Flamingo":
        """A model of these backbones as ``config`` says (its ``tokens`` are required; the backbone
        references are kept as given)."""
        if config.tokens is None:
            raise ValueError("FlamingoConfig.tokens is required to build a model (the factory fills it in from the tokenizer)")
        t = config.tokens
        model = cls(
            vision_encoder, lang_encoder, eoc_token_id=t.eoc_token_id, media_token_id=t.media_token_id,
            vis_dim=vision_encoder.hidden_size, cross_attn_every_n_layers=config.cross_attn_every_n_layers,
            gradient_checkpointing=gradient_checkpointing, decoder_layers_attr_name=config.decoder_layers_attr_name,
            pad_token_id=t.pad_token_id, freeze_lm_embeddings=config.freeze_lm_embeddings,
            perceiver_kwargs=config.perceiver, cross_attn_kwargs=config.cross_attention,
            base_vocab_size=t.base_vocab_size,
        )
        model.config = model.config.replace(vision=config.vision, lm=config.lm, demo_separator=config.demo_separator)
        return model

    @property
    def build_config(self) -> dict[str, Any]:
        """The architecture as the plain dict ``config.json`` stores (:meth:`FlamingoConfig.architecture_dict`)."""
        return self.config.architecture_dict()

    # -- structure -------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        from .injection import get_attr_path

        return get_attr_path(self.lang_encoder, self.decoder_layers_attr_name)

    def gated_cross_attn_layers(self) -> list[nn.Module]:
        return [l.gated_cross_attn_layer for l in self.decoder_layers() if l.gated_cross_attn_layer is not None]

    def _install_new_token_rows(self, new_ids: list[int], freeze: bool) -> None:
        lm = self.lang_encoder
        emb = lm.get_input_embeddings()
        out = lm.get_output_embeddings()
        tied = out is not None and getattr(out, "weight", None) is emb.weight
        ext = ExtendedEmbedding(emb, new_ids)
        ext.new_weight.requires_grad_(not freeze)
        lm.set_input_embeddings(ext)
        if tied:
            lm.set_output_embeddings(ExtendedLMHead(out, ext))
        elif out is not None:
            out.register_forward_pre_hook(_contiguous_input)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward: the LM's layers and our cross-attention blocks."""
        lm = self.lang_encoder
        if getattr(lm, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
                if enabled:
                    lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    lm.activation_checkpointing_disable()
            elif enabled:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_disable()
        # Last: transformers sets `gradient_checkpointing` on every module that has the attribute,
        # our wrapper layers included.
        for layer in self.decoder_layers():
            layer.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return next(self.lang_encoder.parameters()).device

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False, _validated: bool = False):
        """``strict=False`` (OpenFlamingo's README) loads OpenFlamingo checkpoints through the
        validated loader: renamed keys are mapped and a missing trainable parameter is an error."""
        if strict or _validated:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        # flamingo_vlm.checkpoints.load_openflamingo_checkpoint, installed by the loading layer
        report = _persistence("load_openflamingo_state_dict")(self, state_dict)
        return torch.nn.modules.module._IncompatibleKeys(report.missing_frozen, report.unexpected)

    def save_pretrained(self, save_directory, *, tokenizer=None, image_processor=None, include_backbones=None, dtype=None):
        """Save in flamingo-vlm's format (see :mod:`flamingo_vlm.pretrained`)."""
        return _persistence("save_pretrained")(
            self, save_directory, tokenizer=tokenizer, image_processor=image_processor,
            include_backbones=include_backbones, dtype=dtype,
        )

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "Flamingo":
        """A model from a directory or Hub repo in our format, or a released OpenFlamingo repo id.
        :func:`flamingo_vlm.load_pretrained` also returns the image processor and tokenizer."""
        return _persistence("from_pretrained")(name_or_path, **kwargs)[0]

    # -- images ------------------------------------------------------------------------------
    def encode_vision_x(self, vision_x: torch.Tensor, num_media: torch.Tensor | None = None) -> torch.Tensor:
        """vision_x (B, T_img, F, C, H, W) -> perceiver latents (B, T_img, n_latents, D); with
        ``perceiver_kwargs={"media_passthrough": True}`` the vision tokens follow the latents.

        ``num_media`` (B,): how many images each row's text uses (its ``<image>`` count). Slots past
        it are batch padding that no token attends to, so the vision encoder skips them (their
        tokens are zeros)."""
        if vision_x.ndim != 6:
            raise ValueError(
                f"vision_x must have shape (batch, images, frames, channels, height, width), got {tuple(vision_x.shape)}"
            )
        b, t, f = vision_x.shape[:3]
        enc_param = next(self.vision_encoder.parameters(), None)
        dtype = enc_param.dtype if enc_param is not None else vision_x.dtype
        trainable = enc_param is not None and any(p.requires_grad for p in self.vision_encoder.parameters())
        used = None
        if num_media is not None:
            used = torch.arange(t, device=vision_x.device)[None, :] < num_media.to(vision_x.device)[:, None]
            if bool(used.all()) or not bool(used.any()):
                used = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable), upcast_convs(self.vision_encoder):
            if used is None:
                tokens = self.vision_encoder(vision_x.flatten(0, 2).to(dtype))
                tokens = tokens.reshape(b, t, f, *tokens.shape[1:])
            else:
                real = self.vision_encoder(vision_x[used].flatten(0, 1).to(dtype))
                tokens = real.new_zeros(b, t, f, *real.shape[1:])
                tokens[used] = real.reshape(-1, f, *real.shape[1:])
        return self.perceiver(tokens.to(self.perceiver.latents.dtype))

    @property
    def images_encode_independently(self) -> bool:
        """Whether an image's encoding depends on that image alone (not on its slot among the row's
        images): then :meth:`encode_images` results can be cached and placed in any ``media`` slot.
        False when the perceiver adds per-slot embeddings (``max_num_media``)."""
        return self.perceiver.media_time_embs is None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images one by one: (N, F, C, H, W) pixels -> (N, M, D), what the cross-attention
        reads for each image. Stack them (zero slots for padding) into ``media`` (B, T_img, M, D) for
        :meth:`forward` / :meth:`generate` / :meth:`score`. M is whatever the perceiver gives (its
        latents, plus the vision tokens with ``media_passthrough``); D is ``vis_dim``. Only valid as
        ``media`` when :attr:`images_encode_independently` (otherwise pass ``vision_x``)."""
        if images.ndim != 5:
            raise ValueError(f"images must have shape (N, frames, channels, height, width), got {tuple(images.shape)}")
        # Routed as inside generate (the server and the prefix cache call this on its own): the image
        # side's layers only, since walking the whole model's costs milliseconds (the built-in model in
        # bf16 on the AVX2-only EPYC, 3 images through this method: 808 -> 72-88 ms, its convolutions
        # on the fp32 route; 57-67 ms in fp32).
        with onednn_linears(nn.ModuleList([self.vision_encoder, self.perceiver]), enabled=_routing(self)):
            return self.encode_vision_x(images.unsqueeze(1))[:, 0]

    def _conditioning(self, vision_x: torch.Tensor | None, media: torch.Tensor | None,
                      lang_x: torch.Tensor | None = None) -> Conditioning:
        if media is None:
            if vision_x is None:
                raise ValueError("pass vision_x (pixels) or media (precomputed perceiver latents)")
            num_media = None
            if lang_x is not None and lang_x.ndim == 2 and lang_x.shape[0] == vision_x.shape[0]:
                num_media = (lang_x == self.media_token_id).sum(1)
            media = self.encode_vision_x(vision_x, num_media)
        return Conditioning(media=media, media_token_id=self.media_token_id)

    def _check_rows(self, lang_x: torch.Tensor, media: torch.Tensor) -> None:
        if lang_x.shape[0] != media.shape[0]:
            raise ValueError(f"lang_x has {lang_x.shape[0]} rows but vision_x has {media.shape[0]}")

    def _check_markers(self, lang_x: torch.Tensor, vision_x: torch.Tensor | None, media: torch.Tensor | None) -> None:
        """No row with more ``<image>`` markers than images (generate and score, before the images are
        encoded): the extra markers' text silently saw the row's last image, as OpenFlamingo's did."""
        images = media if media is not None else vision_x
        if images is None or images.ndim < 2 or lang_x.ndim != 2 or lang_x.numel() == 0:
            return  # (said by the checks that follow)
        counts = (lang_x == self.media_token_id).sum(1)
        most = int(counts.max())
        if most > images.shape[1]:
            raise ValueError(f"row {int(counts.argmax())} of lang_x has {most} <image> markers but vision_x holds "
                             f"{images.shape[1]} image(s) per row: give one image per <image> (zero images pad the "
                             "rows that have fewer)")

    # -- forward -------------------------------------------------------------------------------
    def cache_media(self, input_ids=None, vision_x=None):
        """OpenFlamingo's stateful conditioning (later ``forward(None, ...)`` calls attended to these
        images) is not kept: an error saying what to do instead, rather than an AttributeError."""
        raise NotImplementedError(
            "cache_media: flamingo-vlm keeps no image state between calls; pass vision_x (or media=) to each "
            "forward call, with past_key_values= to continue a KV cache (tokens after the context's last "
            "<image> attend to it, as after OpenFlamingo's cache_media), or use model.score(...)")

    def uncache_media(self):
        """OpenFlamingo's counterpart of :meth:`cache_media`: nothing is cached, nothing to clear."""

    @_onednn_inference
    def forward(
        self,
        vision_x: torch.Tensor | None,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        clear_conditioned_layers: bool = True,  # accepted for OpenFlamingo compatibility; no state is kept
        past_key_values=None,
        use_cache: bool = False,
        *,
        media: torch.Tensor | None = None,
        **lm_kwargs,
    ):
        """Returns the LM's output (``.loss`` when labels are given, ``.logits``, and the KV cache under
        the LM's name for it: ``.cache`` from transformers 5.24, ``.past_key_values`` before). The cache goes
        in as ``past_key_values=`` (OpenFlamingo's name) or ``cache=``."""
        cache = lm_kwargs.pop("cache", None)
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            lm_kwargs[self._cache_kwarg] = cache
        # A chunk that continues a cache may see images its own <image> count does not cover.
        continuing = cache is not None and _cache_length(cache) > 0
        cond = self._conditioning(vision_x, media, None if continuing else lang_x)
        self._check_rows(lang_x, cond.media)
        if attention_mask is not None and self._lm_takes_position_ids and "position_ids" not in lm_kwargs:
            # Explicit positions keep absolute-position LMs (GPT-2, GPT-Neo) right under left padding.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            lm_kwargs["position_ids"] = positions[:, -lang_x.shape[1] :]
        with self._slot.use(cond):
            return self.lang_encoder(
                input_ids=lang_x,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=use_cache,
                **lm_kwargs,
            )

    # -- generation ------------------------------------------------------------------------------
    def _inferred_mask(self, lang_x: torch.Tensor) -> torch.Tensor:
        """The attention mask of a left-padded batch given without one (generate, score): every token
        but each row's leading run of the pad token. A batch generated without its mask attended to its padding
        (transformers infers a mask only where pad and eos differ, and here the pad token is often
        the LM's eos, as SmolLM2's ``<|im_end|>``); a prompt does not begin with the pad token."""
        mask = torch.ones_like(lang_x)
        starts = lang_x[:, 0] == self.pad_token_id if self.pad_token_id is not None else None
        # only where some rows start with it and some do not: the longest row of a left-padded batch is
        # unpadded, and a pad token every row starts with is the tokenizer's own (a bos used as pad)
        if starts is not None and bool(starts.any()) and not bool(starts.all()):
            mask = (lang_x != self.pad_token_id).long().cummax(dim=1).values
            mask[mask.sum(dim=1) == 0] = 1  # (a row of nothing but the pad token: left as it was)
        return mask

    @torch.no_grad()
    @_onednn_inference
    def generate(
        self,
        vision_x: torch.Tensor | None,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        media: torch.Tensor | None = None,
        allow_image_tokens: bool = False,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with the LM's own ``generate`` (greedy, beam, sampling, streamers, ...).

        Image keys/values are computed once per call; each decoding step sees its row's last
        image. Returns prompt + new tokens. ``<|endofchunk|>`` is the default eos and
        ``<image>`` is never generated (``allow_image_tokens=True`` lifts that, as OpenFlamingo
        did, to reproduce its outputs). Speculative decoding (``prompt_lookup_num_tokens``,
        ``assistant_model``: a Flamingo or a bare LM) gives plain greedy's output (:mod:`.speculative`).
        A KV cache passed in (``cache=``) that holds the first positions of ``lang_x`` is continued
        (a reused prompt prefix, :mod:`flamingo_vlm.prefix_cache`). Without ``attention_mask``, each
        row's leading pad tokens are masked (left padding).
        """
        if lang_x.ndim != 2 or lang_x.shape[1] == 0:  # (an empty prompt failed inside transformers: "cannot reshape")
            raise ValueError(f"lang_x must be (batch, tokens) with at least one token, got shape {tuple(lang_x.shape)}: "
                             "the prompt is empty")
        self._check_markers(lang_x, vision_x, media)
        cond = self._conditioning(vision_x, media, lang_x)
        self._check_rows(lang_x, cond.media)
        generate_kwargs.setdefault("eos_token_id", self.eoc_token_id)
        # The KV cache is on unless asked off: some LM configs say use_cache=false (MptConfig's
        # default), which made every step re-run the whole prefix through LM and cross-attention.
        generate_kwargs.setdefault("use_cache", True)
        if self.pad_token_id is not None:
            generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        suppress = set(generate_kwargs.pop("suppress_tokens", None) or [])
        if not allow_image_tokens:
            suppress.add(self.media_token_id)
            eos = generate_kwargs["eos_token_id"]
            eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
            if self.pad_token_id is not None and self.pad_token_id not in eos:
                suppress.add(self.pad_token_id)  # padding is never a sensible next token
        if suppress:
            # first among the caller's processors: where transformers' own suppress_tokens step would run
            # (after its default processors, before sampling's warpers), at a few microseconds per step
            generate_kwargs["logits_processor"] = LogitsProcessorList(
                [SuppressTokens(sorted(suppress)), *(generate_kwargs.get("logits_processor") or [])])
        if attention_mask is None:
            attention_mask = self._inferred_mask(lang_x)
        if is_speculative(generate_kwargs) and lang_x.shape[0] > 1:  # transformers' assisted decoding is batch-1
            return generate_rows(self, vision_x, cond.media, lang_x, attention_mask, allow_image_tokens, **generate_kwargs)
        config = getattr(self.lang_encoder, "generation_config", None)
        if least := _min_length(generate_kwargs, lang_x.shape[1], config):  # (after the rows split: their own lengths)
            eos = generate_kwargs["eos_token_id"]
            eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            if eos and all(isinstance(e, int) for e in eos):
                generate_kwargs["logits_processor"] = LogitsProcessorList(
                    [MinLength(least, eos), *(generate_kwargs.get("logits_processor") or [])])
            else:  # (an eos transformers resolves itself: a tensor, None) its own processors
                generate_kwargs["min_length"] = least
        given = _cache_in(generate_kwargs)
        if given is not None and _cache_length(given) > 0:
            # Continuing a given KV cache (a reused prefix, flamingo_vlm.prefix_cache): lang_x is the whole
            # sequence (transformers' convention), so the cached positions' image indices come from it.
            cond.observe(lang_x[:, : _cache_length(given)], 0)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._slot.use(cond))
            assistant_conditioning(self, generate_kwargs, vision_x, cond.media, lang_x, stack)
            return self.lang_encoder.generate(
                input_ids=lang_x, attention_mask=attention_mask, **generate_kwargs
            )

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    @_onednn_inference
    def score(
        self,
        vision_x: torch.Tensor | None,
        lang_x: torch.Tensor,
        candidates: list[list[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        media: torch.Tensor | None = None,
        normalize: bool = False,
        chunk_size: int = 64,
        cache=None,
    ) -> torch.Tensor:
        """Log-likelihood of each candidate continuation after each (left-padded) context row.

        Returns (B, len(candidates)): the summed log-probability of the candidate's tokens, or
        their mean with ``normalize=True`` (OpenFlamingo's length-normalised class score). The
        context runs once; each chunk of candidates continues from a private copy of its cache,
        so no candidate's score depends on another's (OpenFlamingo reused a mutated cache).
        ``cache``: a KV cache holding the context's first positions (a reused prefix,
        :mod:`flamingo_vlm.prefix_cache`); only the rest of ``lang_x`` runs, and the cache is
        extended in place to the whole context.
        """
        if isinstance(candidates, str) or any(isinstance(c, str) for c in candidates):
            raise TypeError("candidates are token ids, one list per candidate (tokenizer(text, add_special_tokens="
                            "False).input_ids), not text")
        if not candidates or any(len(c) == 0 for c in candidates):
            raise ValueError("every candidate continuation needs at least one token")
        self._check_markers(lang_x, vision_x, media)
        cond = self._conditioning(vision_x, media, lang_x)
        self._check_rows(lang_x, cond.media)
        if attention_mask is None:
            attention_mask = self._inferred_mask(lang_x)
        rows, device = lang_x.shape[0], lang_x.device
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs = {"position_ids": positions} if self._lm_takes_position_ids else {}
        scores = torch.empty(rows, len(candidates), device=device)
        past = _cache_length(cache) if cache is not None else 0
        if past:
            cond.observe(lang_x[:, :past], 0)  # the cached positions' image indices
            kwargs = {k: v[:, past:] for k, v in kwargs.items()}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        with self._slot.use(cond):
            prefix = self.lang_encoder(input_ids=lang_x[:, past:], attention_mask=attention_mask, use_cache=True, **kwargs)
            first_logprobs = prefix.logits[:, -1].float().log_softmax(-1)  # (B, V)
            context_history = cond.history
            for start in range(0, len(candidates), chunk_size):
                chunk = candidates[start : start + chunk_size]
                n, longest = len(chunk), max(len(c) for c in chunk)
                ids = torch.full((n, longest), self.pad_token_id or 0, dtype=torch.long, device=device)
                cand_mask = torch.zeros(n, longest, dtype=torch.long, device=device)
                for i, c in enumerate(chunk):
                    ids[i, : len(c)] = torch.as_tensor(c, device=device)
                    cand_mask[i, : len(c)] = 1
                # Rows are (context row, candidate) pairs, context-major.
                ids_rc = ids.repeat(rows, 1)
                mask_rc = cand_mask.repeat(rows, 1)
                cache = copy.deepcopy(_output_cache(prefix))
                cache.batch_repeat_interleave(n)
                full_mask = torch.cat([attention_mask.repeat_interleave(n, 0), mask_rc], dim=1)
                step_kwargs = {}
                if self._lm_takes_position_ids:
                    step_kwargs["position_ids"] = positions[:, -1:].repeat_interleave(n, 0) + 1 + torch.arange(longest, device=device)
                cond.history = context_history
                out = self.lang_encoder(
                    input_ids=ids_rc, attention_mask=full_mask, use_cache=True, **{self._cache_kwarg: cache}, **step_kwargs
                )
                logprobs = out.logits.float().log_softmax(-1)  # (B*n, L, V): position j predicts token j+1
                first = first_logprobs.repeat_interleave(n, 0).gather(1, ids_rc[:, :1])
                rest = logprobs[:, :-1].gather(2, ids_rc[:, 1:].unsqueeze(-1)).squeeze(-1)
                token_lp = torch.cat([first, rest], dim=1) * mask_rc
                total = token_lp.sum(1)
                if normalize:
                    total = total / mask_rc.sum(1)
                scores[:, start : start + n] = total.view(rows, n)
        return scores
