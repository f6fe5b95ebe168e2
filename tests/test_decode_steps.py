"""Decoding steps: the per-call attention plan (no mask when every query sees one image), the
image index of each position derived from the KV cache's length, and speculative decoding
(prompt lookup) giving plain greedy's output."""

import pytest
import torch

from flamingo_vlm import FlamingoProcessor
from flamingo_vlm.modeling import cross_attention, native, token_embeddings
from flamingo_vlm.modeling.injection import Conditioning
from tiny import random_images, tiny_flamingo


@pytest.fixture(scope="module", params=["llama", "mpt"])
def model_and_batch(request):
    model, ip, tok = tiny_flamingo(request.param, every=1, seed=3)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>two small", random_images(2, seed=5))])
    return model, tok, batch


def _greedy(model, batch, **kw):
    out = model.generate(
        batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=8, min_new_tokens=8,
        do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True, **kw,
    )
    return out.sequences, torch.stack(out.logits, 1)


def test_decode_steps_build_no_mask_and_match_the_masked_path(model_and_batch, monkeypatch):
    """The mask is built once per LM call (not per layer) and only for the prompt; the decoding
    steps attend over their image's keys alone. Same tokens and logits as masking every step."""
    model, _, batch = model_and_batch
    calls = []
    real_mask = cross_attention.media_attention_mask
    monkeypatch.setattr(cross_attention, "media_attention_mask", lambda *a: calls.append(1) or real_mask(*a))
    fast_ids, fast_logits = _greedy(model, batch)
    assert len(calls) == 1  # the prompt's call; 2 layers and 7 decoding calls build none
    monkeypatch.setattr(cross_attention, "UNIFORM_CHECK_MAX", 0)  # always plan with a mask
    monkeypatch.setattr(token_embeddings, "_HOST_CHECK_MAX", 0)  # always merge the added-token rows
    masked_ids, masked_logits = _greedy(model, batch)
    assert len(calls) == 1 + 8
    assert fast_ids.tolist() == masked_ids.tolist()
    torch.testing.assert_close(fast_logits, masked_logits, atol=1e-5, rtol=0)


def test_a_cropped_cache_rewinds_the_image_index():
    """Each chunk starts from the image index at the cache's length, whatever later chunks saw."""
    media_id = 9
    cond = Conditioning(media=torch.zeros(1, 3, 2, 4), media_token_id=media_id)
    cond.observe(torch.tensor([[media_id, 1, 2]]), past_length=0)
    assert cond.text_media.tolist() == [[1, 1, 1]]
    cond.observe(torch.tensor([[3, media_id, 4]]), past_length=3)  # candidates holding an <image>
    assert cond.text_media.tolist() == [[1, 2, 2]]
    cond.observe(torch.tensor([[5]]), past_length=4)  # all but the first candidate rejected: cropped
    assert cond.text_media.tolist() == [[1]]
    assert cond.history.tolist() == [[1, 1, 1, 1, 1]]
    cond.observe(torch.tensor([[media_id]]), past_length=5)
    assert cond.text_media.tolist() == [[2]]


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_prompt_lookup_gives_plain_greedy_output_with_image_candidates(family, monkeypatch):
    """The prompt repeats an n-gram followed by ``<image>``, so prompt lookup proposes candidates
    holding an ``<image>`` (allowed here, as for OpenFlamingo reproduction), which the model
    rejects; the cache is cropped and later steps must still see the prompt's last image, not the
    third image slot the rejected candidate pointed to."""
    model, ip, tok = tiny_flamingo(family, every=1, seed=1)
    media_id = model.media_token_id
    imgs = random_images(3, seed=2)
    proc = FlamingoProcessor(tok, ip)
    vision_x = proc([("<image>a<image>b<image>c", imgs)])["vision_x"]
    media = model.encode_vision_x(vision_x)  # three real images ...
    text = "<image>a red car<image>the dog a red car<image>the dog a red car"
    ids = tok(text, return_tensors="pt").input_ids
    ids = ids[:, : [i for i, t in enumerate(ids[0].tolist()) if t == media_id][2]]  # ... the prompt uses two
    ids = torch.cat([ids, ids[:, -8:]], 1)  # end on an n-gram that an <image> followed earlier
    assert (ids == media_id).sum() == 2
    calls = []
    real_observe = Conditioning.observe

    def spy(self, input_ids, past_length):
        calls.append((input_ids.tolist()[0], past_length))
        return real_observe(self, input_ids, past_length)

    monkeypatch.setattr(Conditioning, "observe", spy)
    kw = dict(media=media, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
              allow_image_tokens=True)
    plain = model.generate(None, ids, **kw)
    assert all(len(chunk) == 1 for chunk, _ in calls[1:])
    calls.clear()
    looked_up = model.generate(None, ids, prompt_lookup_num_tokens=4, **kw)
    assert looked_up.tolist() == plain.tolist()
    # The scenario happened: a verified chunk held an <image> and the next call started before it.
    ends = [(past + len(chunk), media_id in chunk[1:]) for chunk, past in calls]
    rewound = [i for i in range(1, len(calls)) if ends[i - 1][1] and calls[i][1] < ends[i - 1][0]]
    assert rewound, calls


def test_generate_uses_the_kv_cache_even_when_the_lm_config_says_not(model_and_batch):
    """MptConfig defaults to use_cache=False: generate must still decode one new token per step (and
    give what a cache-less run gives), not re-run the whole prefix."""
    model, _, batch = model_and_batch
    lm = model.lang_encoder
    lengths = []
    hook = lm.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
    args = (batch["vision_x"], batch["input_ids"], batch["attention_mask"])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    old = lm.config.use_cache, lm.generation_config.use_cache
    lm.config.use_cache = lm.generation_config.use_cache = False
    try:
        cached = model.generate(*args, **kw)
        steps = lengths[1:]
        uncached = model.generate(*args, use_cache=False, **kw)
    finally:
        hook.remove()
        lm.config.use_cache, lm.generation_config.use_cache = old
    assert steps and set(steps) == {1}, steps
    assert torch.equal(cached, uncached)


def test_bf16_decode_steps_of_a_transformers_lm_attend_in_fp32(monkeypatch):
    """The LM's "sdpa" is switched to ours: a bf16 decode step's attention runs on fp32 copies (torch's
    CPU SDPA is 3-4x slower on one bf16 query), the prompt's in bf16; the logits match bf16 SDPA's to
    bf16's resolution and greedy tokens are the same."""
    from transformers.integrations import sdpa_attention

    from flamingo_vlm.modeling import attention

    monkeypatch.setenv(native.FUSED_ENV, "0")  # (fused, a decoder layer's step attends in C, also in fp32)
    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    assert model.lang_encoder.config._attn_implementation == attention.NAME
    model = model.to(torch.bfloat16)
    text = "<image>a red car on a long grey road next to a tall green tree.<|endofchunk|><image>a"
    batch = FlamingoProcessor(tok, ip)([(text, random_images(2, seed=1))])
    assert batch["input_ids"].shape[1] > attention.FP32_MAX_QUERIES
    args = (batch["vision_x"].bfloat16(), batch["input_ids"], batch["attention_mask"])
    seen = []
    real = sdpa_attention.sdpa_attention_forward  # the LM's attention (transformers' SDPA call)
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda m, q, *a, **k: seen.append((q.shape[-2], q.dtype)) or real(m, q, *a, **k))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours = model.generate(*args, **kw)
    prompt = batch["input_ids"].shape[1]
    assert {d for n, d in seen if n == prompt} == {torch.bfloat16} and {d for n, d in seen if n == 1} == {torch.float32}
    monkeypatch.setattr(attention, "FP32_MAX_QUERIES", 0)
    theirs = model.generate(*args, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    a, b = torch.stack(ours.logits).float(), torch.stack(theirs.logits).float()
    assert (a - b).norm() <= 0.02 * b.norm()
