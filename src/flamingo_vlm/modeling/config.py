"""What a Flamingo is made of, as typed data: :class:`FlamingoConfig` and its parts.

- :class:`PerceiverConfig` and :class:`CrossAttentionConfig`: the trainable adapter's shape (the
  ``perceiver_kwargs`` / ``cross_attn_kwargs`` of OpenFlamingo's factory, which are still accepted as
  plain dicts and turned into these with :meth:`~PerceiverConfig.coerce`);
- :class:`TokenConfig`: the ids of the tokens Flamingo adds and the vocabulary size before them;
- :class:`FlamingoConfig` also carries the one prompt fact that is the model's and not the
  tokenizer's: ``demo_separator``, the text its training put between a demonstration's
  ``<|endofchunk|>`` and the next ``<image>`` (``""`` for OpenFlamingo's checkpoints, whose
  pretraining documents have nothing there), so that whatever joins demonstrations for a user
  (the server's chat mapping and page, ``flamingo-vlm generate --demo``) writes the model's format;
- :class:`BackboneRef`: where a pretrained backbone comes from, so that a saved model names it instead
  of copying it. Only :mod:`flamingo_vlm.references` makes these (it parses every name scheme); this
  module just holds the data.

:class:`~.flamingo.Flamingo` keeps its config as ``model.config``; ``save_pretrained`` writes it into
``config.json`` and ``from_pretrained`` reads it back (:mod:`flamingo_vlm.pretrained` owns that file
layout). Nothing here imports torch or anything above :mod:`flamingo_vlm.modeling`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")


def _coerce(cls: type[_T], value: Any, what: str) -> _T:
    """``value`` as a ``cls``: an instance, None (the defaults) or a mapping of its fields."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict of options or a {cls.__name__}, got {type(value).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    return cls(**value)


@dataclass(frozen=True)
class PerceiverConfig:
    """The Perceiver Resampler (:class:`~.perceiver.PerceiverResampler`); defaults are OpenFlamingo's."""

    depth: int = 6
    dim_head: int = 64
    heads: int = 8
    num_latents: int = 64
    max_num_media: int | None = None  # per-slot media-time embeddings (off in OpenFlamingo v2)
    max_num_frames: int | None = None  # frame embeddings, for video
    ff_mult: int = 4
    media_passthrough: bool = False  # not in OpenFlamingo: the vision tokens follow the latents

    @classmethod
    def coerce(cls, value: PerceiverConfig | Mapping | None) -> PerceiverConfig:
        return _coerce(cls, value, "perceiver")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CrossAttentionConfig:
    """The gated cross-attention blocks (:func:`~.injection.inject_cross_attention`); OpenFlamingo's defaults."""

    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    only_attend_immediate_media: bool = True

    @classmethod
    def coerce(cls, value: CrossAttentionConfig | Mapping | None) -> CrossAttentionConfig:
        return _coerce(cls, value, "cross-attention")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TokenConfig:
    """The tokens Flamingo adds to the LM's vocabulary; ``base_vocab_size`` rows come from the LM."""

    eoc_token_id: int
    media_token_id: int
    pad_token_id: int | None
    base_vocab_size: int


@dataclass(frozen=True)
class BackboneRef:
    """Where a pretrained backbone comes from: enough to load the same weights again.

    ``kind`` is one of :data:`VISION_KINDS` or :data:`LM_KINDS`; ``name`` the built-in name, Hub id,
    absolute local path, open_clip model name or open_clip config file; ``pretrained`` the open_clip
    weights (tag, ``hf-hub:`` id or file); ``options`` the built-in encoder's settings.
    """

    kind: str
    name: str
    pretrained: str | None = None
    tokens_ln_post: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


#: builtin: a packaged encoder; open_clip: a model name plus weights; open_clip_config: an open_clip
#: model-config JSON plus weights; hf: a transformers CLIP/SigLIP Hub id or directory.
VISION_KINDS = ("builtin", "open_clip", "open_clip_config", "hf")
#: builtin: a packaged LM; hub: a Hub repo id; local: a directory (absolute path).
LM_KINDS = ("builtin", "hub", "local")
#: Where the built-in vision encoder (:class:`~.feature_grid.FeatureGridEncoder`) puts its colour code:
#: summed into each cell's token, tokens of its own after the grid's, or both.
COLOR_MODES = ("add", "tokens", "both")


@dataclass(frozen=True)
class FlamingoConfig:
    """How a Flamingo is put together: backbone references (None: not referenceable, so a saved model
    embeds that backbone), the adapter's shape, where cross-attention goes, and the added tokens."""

    vision: BackboneRef | None = None
    lm: BackboneRef | None = None
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    tokens: TokenConfig | None = None  # None until the tokenizer is known (the factory fills it in)
    cross_attn_every_n_layers: int = 1
    decoder_layers_attr_name: str | None = None  # None: found by the injection code
    freeze_lm_embeddings: bool = False
    # Not in OpenFlamingo (whose chunks are joined with nothing): the text between one demonstration's
    # <|endofchunk|> and the next <image> in the prompts this model was trained on (the training data's
    # chunk_separator; the built-in model's is "\n"). Written to config.json; absent there: "".
    demo_separator: str = ""

    def replace(self, **changes: Any) -> FlamingoConfig:
        return dataclasses.replace(self, **changes)

    def architecture_dict(self) -> dict[str, Any]:
        """The architecture under the keys ``config.json`` has always used (format 1), every option
        written out: ``cross_attn_every_n_layers``, ``decoder_layers_attr_name``,
        ``freeze_lm_embeddings``, ``perceiver_kwargs``, ``cross_attn_kwargs``, the token ids and the
        prompt's ``demo_separator``."""
        out: dict[str, Any] = {
            "cross_attn_every_n_layers": self.cross_attn_every_n_layers,
            "decoder_layers_attr_name": self.decoder_layers_attr_name,
            "freeze_lm_embeddings": self.freeze_lm_embeddings,
            "perceiver_kwargs": self.perceiver.to_dict(),
            "cross_attn_kwargs": self.cross_attention.to_dict(),
            "demo_separator": self.demo_separator,
        }
        if self.tokens is not None:
            out.update(dataclasses.asdict(self.tokens))
        return out

    @classmethod
    def from_architecture_dict(cls, d: Mapping[str, Any], **refs: Any) -> FlamingoConfig:
        """Inverse of :meth:`architecture_dict`; options a config written earlier leaves out (an empty
        ``perceiver_kwargs``, say) take the defaults, which is what they meant when it was written."""
        tokens = None
        if "eoc_token_id" in d and "media_token_id" in d:
            tokens = TokenConfig(
                eoc_token_id=d["eoc_token_id"], media_token_id=d["media_token_id"],
                pad_token_id=d.get("pad_token_id"),
                base_vocab_size=d.get("base_vocab_size", min(d["eoc_token_id"], d["media_token_id"])),
            )
        return cls(
            perceiver=PerceiverConfig.coerce(d.get("perceiver_kwargs")),
            cross_attention=CrossAttentionConfig.coerce(d.get("cross_attn_kwargs")),
            tokens=tokens,
            cross_attn_every_n_layers=d.get("cross_attn_every_n_layers", 1),
            decoder_layers_attr_name=d.get("decoder_layers_attr_name"),
            freeze_lm_embeddings=d.get("freeze_lm_embeddings", False),
            demo_separator=_separator(d.get("demo_separator", "")),
            **refs,
        )


def _separator(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"demo_separator must be a string (e.g. \"\\n\", or \"\" for none), got {value!r}")
    return value
