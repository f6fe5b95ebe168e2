"""flamingo-vlm: Flamingo-style vision-language models on any Hugging Face causal LM."""

from .factory import create_model_and_transforms
from .modeling.flamingo import Flamingo
from .processing import FlamingoProcessor, add_flamingo_tokens

__all__ = ["Flamingo", "FlamingoProcessor", "add_flamingo_tokens", "create_model_and_transforms"]
__version__ = "0.1.0"
