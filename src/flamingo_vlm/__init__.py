"""flamingo-vlm: Flamingo-style vision-language models on any Hugging Face causal LM."""

from .factory import create_model_and_transforms
from .modeling.flamingo import Flamingo
from .pretrained import from_pretrained as load_pretrained
from .processing import FlamingoProcessor, add_flamingo_tokens

__all__ = [
    "Flamingo",
    "FlamingoProcessor",
    "add_flamingo_tokens",
    "create_model_and_transforms",
    "load_pretrained",
]
__version__ = "0.1.0"
