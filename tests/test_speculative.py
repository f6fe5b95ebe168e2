"""Speculative decoding with images (prompt lookup, assisted generation by a Flamingo or a bare LM)
gives plain greedy's tokens, batch 1 and a left-padded batch of 2, and does accept candidates."""

import copy
import logging

import pytest
import torch

from flamingo_vlm import FlamingoProcessor
from tiny import random_images, tiny_flamingo, tiny_lm


@pytest.fixture(scope="module")
def setup():
    model, ip, tok = tiny_flamingo("llama", every=1, seed=4)
    proc = FlamingoProcessor(tok, ip)
    imgs = random_images(4, seed=9)
    samples = [
        ("<image>a red car.<|endofchunk|><image>two small dogs.<|endofchunk|><image>a red car. <image>two", imgs),
        ("<image>the cat<|endofchunk|><image>the cat is a", imgs[:2]),
    ]
    return model, tok, proc, samples


class _Calls:
    """Counts the main LM's calls and how many tokens each one took."""

    def __init__(self, lm):
        self.chunks = []
        self.handle = lm.register_forward_pre_hook(
            lambda m, a, kw: self.chunks.append(kw["input_ids"].shape[1]), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _greedy(model, batch, **kw):
    return model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=16,
                          min_new_tokens=16, do_sample=False, **kw)


def _plain_and(model, batch, **kw):
    with _Calls(model.lang_encoder) as plain_calls:
        plain = _greedy(model, batch)
    with _Calls(model.lang_encoder) as calls:
        fast = _greedy(model, batch, **kw)
    return plain, fast, plain_calls.chunks, calls.chunks


def test_prompt_lookup_with_images_batch_1_accepts_tokens_and_matches_greedy(setup):
    model, tok, proc, samples = setup
    batch = proc(samples[:1])
    assert int((batch["input_ids"] == model.media_token_id).sum()) == 4
    plain, fast, plain_calls, calls = _plain_and(model, batch, prompt_lookup_num_tokens=4)
    assert fast.tolist() == plain.tolist()
    assert len(plain_calls) == 16
    # Some verified chunk held candidates and fewer LM calls were made: tokens were accepted.
    assert max(calls[1:]) > 1 and len(calls) < len(plain_calls), calls


def test_prompt_lookup_batch_of_two_left_padded_rows_matches_batched_greedy(setup):
    model, tok, proc, samples = setup
    batch = proc(samples)
    assert (batch["attention_mask"] == 0).any()  # the second row is left-padded
    plain, fast, _, calls = _plain_and(model, batch, prompt_lookup_num_tokens=4)
    assert fast.shape == plain.shape
    assert fast.tolist() == plain.tolist()


def test_assisted_generation_by_the_same_flamingo_in_bf16_accepts_its_drafts(setup):
    model, tok, proc, samples = setup
    assistant = copy.deepcopy(model).to(torch.bfloat16)
    batch = proc(samples[:1])
    plain, fast, plain_calls, calls = _plain_and(model, batch, assistant_model=assistant)
    assert fast.tolist() == plain.tolist()
    assert len(calls) < len(plain_calls), calls  # drafts accepted: fewer calls of the main model


def test_assisted_generation_by_a_smaller_flamingo_batch_of_two(setup):
    model, tok, proc, samples = setup
    small, _, small_tok = tiny_flamingo("llama", every=2, seed=11, num_hidden_layers=1)
    assert small_tok.get_vocab() == tok.get_vocab()
    batch = proc(samples)
    plain, fast, _, _ = _plain_and(model, batch, assistant_model=small)
    assert fast.tolist() == plain.tolist()


def test_assisted_generation_by_a_bare_lm_and_with_precomputed_media(setup):
    model, tok, proc, samples = setup
    batch = proc(samples[:1])
    media = model.encode_vision_x(batch["vision_x"])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    plain = model.generate(None, batch["input_ids"], media=media, **kw)
    bare = tiny_lm("llama", vocab_size=model.lang_encoder.config.vocab_size).eval()
    assert model.generate(None, batch["input_ids"], media=media, assistant_model=bare, **kw).tolist() == plain.tolist()
    assistant = copy.deepcopy(model).to(torch.bfloat16)  # given media only: the main model's latents, cast
    assert model.generate(None, batch["input_ids"], media=media, assistant_model=assistant, **kw).tolist() == plain.tolist()


def test_a_bare_lm_without_the_flamingo_tokens_is_refused_with_what_to_do(setup):
    """The LM a Flamingo was built on, as its own draft model, lacks the added tokens: transformers
    refused it with "different tokenizers ... provide `tokenizer` and `assistant_tokenizer`", which is
    not the fix. Said so now; resized to the Flamingo's vocabulary, it drafts and greedy is unchanged."""
    model, tok, proc, samples = setup
    batch = proc(samples[:1])
    vocab = model.lang_encoder.config.vocab_size
    bare = tiny_lm("llama", vocab_size=vocab - 3).eval()
    with pytest.raises(ValueError, match=rf"assistant_model has {vocab - 3} tokens, the model {vocab} .*"
                       rf"assistant_model\.resize_token_embeddings\({vocab}\)"):
        _greedy(model, batch, assistant_model=bare)
    bare.resize_token_embeddings(vocab)
    assert _greedy(model, batch, assistant_model=bare).tolist() == _greedy(model, batch).tolist()


def test_the_model_as_its_own_assistant_is_refused(setup):
    model, tok, proc, samples = setup
    batch = proc(samples[:1])
    with pytest.raises(ValueError, match="assistant_model is the model itself"):
        _greedy(model, batch, assistant_model=model)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_assisted_generation_does_not_pass_on_transformers_deprecation_of_its_own_call(setup):
    # transformers' candidate generator calls the assistant's generate with a generation_config and
    # min/max_new_tokens together, then warns (once per process) that this "is deprecated"
    model, tok, proc, samples = setup
    batch = proc(samples[:1])
    logger = logging.getLogger("transformers.generation.utils")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.WARNING)  # (whatever verbosity another test left transformers at)
    try:
        logging.Logger.warning_once.cache_clear()  # transformers' warning_once: once per message per process
        _greedy(model, batch, assistant_model=copy.deepcopy(model).to(torch.bfloat16))
        logger.warning("Passing `generation_config` together with generation-related arguments: outside a call")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert not [m for m in records.messages if "deprecated" in m], records.messages
    assert records.messages[-1].endswith("outside a call")  # the filter is gone after the call
