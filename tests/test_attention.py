"""The LM attention registered as ``flamingo_sdpa``: a chunk of queries after a past, under the plain
causal mask, is computed in two parts (over the past without a mask, over itself causally) merged by
their log-sum-exp; anything else is transformers' SDPA call."""

import pytest
import torch
import torch.nn.functional as F

from flamingo_vlm.modeling import attention


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_past_then_causal_is_the_lower_right_causal_attention(dtype, tol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 4, 50, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(20, 50, dtype=torch.bool).tril(30)  # the 20 queries are the last of 50 positions
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3)
    got = attention.past_then_causal(q, k, v, 0.3)
    assert got.dtype == dtype and (got.double() - want).abs().max() <= tol * want.abs().max()


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert attention.use_for(lm)
    return lm


def test_a_chunk_after_its_past_takes_the_split_with_one_pass_logits(monkeypatch):
    """Logits of a 12-token chunk after a 20-token past equal one pass over the 32 tokens; the split is
    taken there, not for a batch whose rows are padded (their mask is not the plain one), nor for a
    decoding step."""
    from transformers import DynamicCache

    lm = _tiny_llama()
    calls = []
    real = attention.past_then_causal
    monkeypatch.setattr(attention, "past_then_causal", lambda q, *a: calls.append(q.shape[-2]) or real(q, *a))
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = lm(ids).logits
        cache = DynamicCache(config=lm.config)
        lm(ids[:, :20], cache=cache)
        chunk = lm(ids[:, 20:], cache=cache).logits
        assert calls == [12, 12]  # each layer
        torch.testing.assert_close(chunk, whole[:, 20:], atol=1e-5, rtol=1e-5)
        lm(ids[:, :1], cache=cache)  # a decoding step: transformers' call
        assert calls == [12, 12]
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[1, :3] = 0  # a left-padded row
        whole = lm(ids, attention_mask=mask).logits
        cache = DynamicCache(config=lm.config)
        lm(ids[:, :20], attention_mask=mask[:, :20], cache=cache)
        chunk = lm(ids[:, 20:], attention_mask=mask, cache=cache).logits
        assert calls == [12, 12]  # padding: the masked call
        torch.testing.assert_close(chunk, whole[:, 20:], atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # gradients wanted: the masked call
        cache = DynamicCache(config=lm.config)
        lm(ids[:, :20], cache=cache)
        lm(ids[:, 20:], cache=cache).logits.sum().backward()
        assert calls == [12, 12]
