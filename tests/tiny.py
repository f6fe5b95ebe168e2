"""Tiny random models and tokenizers built in code (no downloads, no fixtures)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from flamingo_vlm import create_model_and_transforms
from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer

WORDS = (
    "a an the of and is in on to with image photo picture cat cats dog dogs car red blue green small big "
    "two three one sink bathroom output question answer short yes no what colour shape circle square left right"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (like GPT-2's) trained in code on a tiny corpus: ~300 tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), "An image of two cats. A red car. A dog. Output: Question: what colour? Short answer: red"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_vision(image_size: int = 32) -> OpenCLIPVisionTransformer:
    return OpenCLIPVisionTransformer(image_size=image_size, patch_size=16, width=32, layers=1, heads=2, embed_dim=16)


def tiny_lm(model_type: str = "llama", vocab_size: int = 128, **overrides):
    defaults = {
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "mpt": dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=128, expansion_ratio=2),
    }[model_type]
    defaults.update(overrides)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **defaults)
    return AutoModelForCausalLM.from_config(config)


def randomize_gates(model) -> None:
    with torch.no_grad():
        for block in model.gated_cross_attn_layers():
            block.attn_gate.uniform_(-1, 1)
            block.ff_gate.uniform_(-1, 1)


def tiny_flamingo(model_type: str = "llama", every: int = 1, seed: int = 0, **lm_overrides):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    lm = tiny_lm(model_type, vocab_size=len(tokenizer), **lm_overrides)
    model, image_processor, tokenizer = create_model_and_transforms(
        tiny_vision(), None, lm, tokenizer, cross_attn_every_n_layers=every
    )
    randomize_gates(model)
    return model.eval(), image_processor, tokenizer


def random_images(n: int, seed: int = 0, size: int = 40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, size + 8, 3), generator=g, dtype=torch.uint8).numpy() for _ in range(n)]


@contextlib.contextmanager
def script_module(name: str, folder: str = "scripts"):
    """``<folder>/<name>.py`` (``scripts/`` or ``research/``) imported as a module for the length of the block."""
    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
