"""flamingo-vlm: Flamingo-style vision-language models on any Hugging Face causal LM."""

from __future__ import annotations

from .lazy import lazy_names

__all__ = [
    "Flamingo",
    "FlamingoProcessor",
    "add_flamingo_tokens",
    "create_model_and_transforms",
    "load_pretrained",
]
__version__ = "0.1.0"

# Imported on first use (PEP 562), so that `import flamingo_vlm.allocator` or the command line's
# start does not load torch: the command re-executes itself with its allocator before it does.
_LAZY = {
    "create_model_and_transforms": (".factory", "create_model_and_transforms"),
    "Flamingo": (".modeling.flamingo", "Flamingo"),
    "load_pretrained": (".pretrained", "from_pretrained"),
    "FlamingoProcessor": (".processing", "FlamingoProcessor"),
    "add_flamingo_tokens": (".processing", "add_flamingo_tokens"),
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
