"""MosaicGPT / MPT loaded as MosaicML's code computes them (OpenFlamingo-3B's LM).

A MosaicGPT checkpoint is built here in the Hub layout (``config.json`` with ``model_type:
mosaic_gpt``, weights under MosaicGPT's module names, ``attn.q_ln``/``attn.k_ln`` present) and its
logits are checked against a plain-torch reference written from MosaicGPT's definition below, not
from our module: absolute ALiBi buffer sliced to the key length, key-padding and causal masks,
QK-LayerNorm over the whole width before the head split, clamp, softmax scale, logit scale.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import MptConfig, MptForCausalLM, PreTrainedTokenizerFast
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from flamingo_vlm import FlamingoProcessor, create_model_and_transforms
from flamingo_vlm.checkpoints import _state_key
from flamingo_vlm.lm_loading import (
    MOSAIC_GPT_RULES,
    MPT_ATTN_RULES,
    MPT_RULES,
    UnsupportedLMConfig,
    causal_lm_from_config,
    load_causal_lm,
)
from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM, alibi_slopes
from flamingo_vlm.registry import OPENFLAMINGO_RELEASES, OPENFLAMINGO_TOKENIZER_LEN
from tiny import random_images, randomize_gates, tiny_tokenizer, tiny_vision

VOCAB = 64
# OpenFlamingo-3B's LM in miniature: ALiBi, QK LayerNorm, no biases.
RELEASE_LIKE = dict(d_model=32, n_heads=4, n_layers=2, mlp_ratio=4, max_seq_len=64, alibi=True, alibi_bias_max=8,
                    attn_qk_ln=True, no_bias=True)
# Every setting transformers' MPT gets wrong, and 6 heads (not a power of two).
EXOTIC = dict(d_model=36, n_heads=6, n_layers=2, mlp_ratio=2, max_seq_len=64, alibi=True, alibi_bias_max=4,
              attn_qk_ln=True, attn_clip_qkv=1.5, softmax_scale=0.3, logit_scale=0.7, no_bias=False)


# -- a MosaicGPT checkpoint in the Hub layout -------------------------------------------------------------
def mosaic_gpt_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hidden, bias = cfg["d_model"], cfg["mlp_ratio"] * cfg["d_model"], not cfg["no_bias"]

    def w(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix):  # LayerNorm weights far from 1 so that each one matters
        sd[prefix + ".weight"] = 1 + w(d)
        if bias:
            sd[prefix + ".bias"] = w(d, std=0.1)

    sd = {"transformer.wte.weight": w(cfg["vocab_size"], d, std=1.0)}
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        norm(p + "ln_1")
        for name, shape in [("attn.Wqkv", (3 * d, d)), ("attn.out_proj", (d, d)), ("mlp.mlp_up", (hidden, d)),
                            ("mlp.mlp_down", (d, hidden))]:
            sd[p + name + ".weight"] = w(*shape, std=1 / math.sqrt(shape[1]) * 1.5)
            if bias:
                sd[p + name + ".bias"] = w(shape[0], std=0.1)
        if cfg["attn_qk_ln"]:
            norm(p + "attn.q_ln")
            norm(p + "attn.k_ln")
        norm(p + "ln_2")
    norm("transformer.ln_f")
    return sd


def write_mosaic_gpt(directory, cfg: dict, seed: int = 0, vocab_size: int = VOCAB):
    directory.mkdir(parents=True, exist_ok=True)
    full = {"architectures": ["MosaicGPT"], "model_type": "mosaic_gpt", "vocab_size": vocab_size,
            "attn_impl": "torch", "init_device": "cpu", "low_precision_layernorm": True, "prefix_lm": False,
            "attn_uses_sequence_id": False, "param_init_fn": "kaiming_normal_", "torch_dtype": "float32", **cfg}
    (directory / "config.json").write_text(json.dumps(full))
    sd = mosaic_gpt_state_dict(full, seed)
    torch.save(sd, directory / "pytorch_model.bin")
    return full, sd


# -- MosaicGPT, from its definition (float64) -------------------------------------------------------------
def reference_logits(sd, cfg, ids, attention_mask=None):
    sd = {k: v.double() for k, v in sd.items()}
    d, h, L = cfg["d_model"], cfg["n_heads"], cfg["max_seq_len"]
    hd = d // h
    b, s = ids.shape

    def ln(x, prefix):
        return F.layer_norm(x, (d,), sd[prefix + ".weight"], sd.get(prefix + ".bias"), 1e-5)

    def linear(x, prefix):
        return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    # attn_bias: (1, H, 1, max_seq_len) = arange(1 - L, 1) * 1 / 2^(k * alibi_bias_max / n_heads), k = 1..H,
    # sliced to the last s keys; then key padding and the causal mask filled with the dtype's min.
    m = torch.arange(1, h + 1, dtype=torch.float64) * (cfg["alibi_bias_max"] / h)
    bias = torch.arange(1 - L, 1, dtype=torch.float64).view(1, 1, 1, L) * (1.0 / 2 ** m).view(1, h, 1, 1)
    bias = bias[..., -s:].expand(b, h, s, s).clone()
    minv = torch.finfo(torch.float64).min
    if attention_mask is not None:
        bias = bias.masked_fill(~attention_mask.bool().view(b, 1, 1, s), minv)
    bias = bias.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), minv)
    scale = cfg.get("softmax_scale") or 1 / math.sqrt(hd)
    x = sd["transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        qkv = linear(ln(x, p + "ln_1"), p + "attn.Wqkv")
        if cfg.get("attn_clip_qkv"):
            qkv = qkv.clamp(-cfg["attn_clip_qkv"], cfg["attn_clip_qkv"])
        q, k, v = qkv.chunk(3, dim=-1)
        if cfg["attn_qk_ln"]:
            q, k = ln(q, p + "attn.q_ln"), ln(k, p + "attn.k_ln")
        q, k, v = (t.view(b, s, h, hd).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1)
        x = x + linear((w @ v).transpose(1, 2).reshape(b, s, d), p + "attn.out_proj")
        x = x + linear(F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.mlp_up")), p + "mlp.mlp_down")
    logits = ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T
    scale = cfg.get("logit_scale")
    if scale is not None:
        logits = logits * (1 / math.sqrt(d) if scale == "inv_sqrt_d_model" else scale)
    return logits


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate() uses
    return ids, mask


# -- logits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [RELEASE_LIKE, EXOTIC], ids=["release_like", "exotic"])
def test_logits_match_mosaic_gpt_reference(tmp_path, cfg):
    full, sd = write_mosaic_gpt(tmp_path / "lm", cfg)
    lm = load_causal_lm(str(tmp_path / "lm"))
    assert isinstance(lm, MosaicMptForCausalLM)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = lm(ids, attention_mask=mask).logits
    ref = reference_logits(sd, full, ids, mask).float()
    valid = mask.bool()
    assert ref[valid].std() > 1  # logits that vary, so a match means something
    torch.testing.assert_close(ours[valid], ref[valid], atol=2e-4, rtol=1e-4)
    # Each padded row equals that row alone (ALiBi distances do not see the padding).
    with torch.no_grad():
        alone = lm(ids[1:, 4:]).logits
    torch.testing.assert_close(ours[1, 4:], alone[0], atol=1e-5, rtol=0)


def test_transformers_mpt_would_drop_qk_ln(tmp_path):
    """The bug this fixes: the same weights in transformers' MptForCausalLM (q_ln/k_ln ignored) give other
    logits, so the reference test above could fail."""
    full, sd = write_mosaic_gpt(tmp_path / "lm", RELEASE_LIKE)
    ours = load_causal_lm(str(tmp_path / "lm"))
    plain = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB)).eval()
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert {k.rsplit(".", 2)[-2] for k in unexpected} == {"q_ln", "k_ln"}
    ids, _ = padded_batch()
    with torch.no_grad():
        assert (plain(ids).logits - ours(ids).logits).abs().max() > 0.1


def test_alibi_bias_max_and_logit_scale_are_honoured(tmp_path):
    ids, mask = padded_batch()
    outs = {}
    for name, extra in {"base": {}, "bias_max_4": {"alibi_bias_max": 4}, "scaled": {"logit_scale": 0.25},
                        "inv_sqrt": {"logit_scale": "inv_sqrt_d_model"}}.items():
        full, sd = write_mosaic_gpt(tmp_path / name, {**RELEASE_LIKE, **extra})
        with torch.no_grad():
            outs[name] = load_causal_lm(str(tmp_path / name))(ids, attention_mask=mask).logits
        torch.testing.assert_close(outs[name][mask.bool()], reference_logits(sd, full, ids, mask).float()[mask.bool()],
                                   atol=2e-4, rtol=1e-4)
    assert (outs["bias_max_4"] - outs["base"]).abs().max() > 1e-2
    torch.testing.assert_close(outs["scaled"], outs["base"] * 0.25, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["inv_sqrt"], outs["base"] / math.sqrt(32), atol=1e-5, rtol=1e-5)


def test_logit_scale_applies_to_the_loss(tmp_path):
    write_mosaic_gpt(tmp_path / "lm", {**RELEASE_LIKE, "logit_scale": 0.25})
    lm = load_causal_lm(str(tmp_path / "lm"))
    ids, _ = padded_batch()
    out = lm(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# -- ALiBi slopes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32])
@pytest.mark.parametrize("bias_max", [8, 4, 16])
def test_alibi_slopes(n_heads, bias_max):
    # MPT / llm-foundry gen_slopes: powers of two over the next power of two, odd then even for others.
    n = 2 ** math.ceil(math.log2(n_heads))
    full = [2 ** (-k * bias_max / n) for k in range(1, n + 1)]
    expected = full if n == n_heads else (full[1::2] + full[::2])[:n_heads]
    torch.testing.assert_close(alibi_slopes(n_heads, bias_max, "mpt"), torch.tensor(expected), rtol=1e-6, atol=0)
    # transformers builds the same slopes (its alibi tensor is -slope at distance 1)
    hf = -build_mpt_alibi_tensor(n_heads, 8, alibi_bias_max=bias_max)[:, 0, -2]
    torch.testing.assert_close(alibi_slopes(n_heads, bias_max, "mpt"), hf.float(), rtol=1e-6, atol=0)
    # MosaicGPT (April 2023): k * alibi_bias_max / n_heads for every head count
    mosaic = torch.tensor([2 ** (-k * bias_max / n_heads) for k in range(1, n_heads + 1)])
    torch.testing.assert_close(alibi_slopes(n_heads, bias_max, "mosaic_gpt"), mosaic, rtol=1e-6, atol=0)
    if n == n_heads:
        torch.testing.assert_close(alibi_slopes(n_heads, bias_max, "mosaic_gpt"),
                                   alibi_slopes(n_heads, bias_max, "mpt"))


# -- the KV cache, generation, bf16 -----------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [RELEASE_LIKE, EXOTIC], ids=["release_like", "exotic"])
def test_cached_generation_equals_uncached(tmp_path, cfg):
    write_mosaic_gpt(tmp_path / "lm", cfg)
    lm = load_causal_lm(str(tmp_path / "lm"))
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = lm.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw)
    uncached = lm.generate(ids, use_cache=False, **kw)
    assert cached.sequences.tolist() == uncached.tolist()
    seq = cached.sequences
    full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], dim=1)
    with torch.no_grad():
        full = lm(seq, attention_mask=full_mask).logits
    torch.testing.assert_close(torch.stack(cached.logits, 1), full[:, ids.shape[1] - 1:-1], atol=1e-4, rtol=0)


def test_sequence_longer_than_max_seq_len_is_an_error(tmp_path):
    write_mosaic_gpt(tmp_path / "lm", {**RELEASE_LIKE, "max_seq_len": 16})
    lm = load_causal_lm(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        lm.generate(torch.zeros(1, 12, dtype=torch.long), max_new_tokens=8, min_new_tokens=8, pad_token_id=0)


def test_bf16_decoding_attends_in_fp32_with_the_logits_of_bf16_attention(tmp_path, monkeypatch):
    """bf16 on CPU: decode steps (few queries, no gradient) run SDPA on fp32 copies (torch's bf16 kernel
    is 3-4x slower there); prompts and training keep bf16. The logits stay those of bf16 attention to
    bf16's resolution, and at least as close to the fp32 model's."""
    from flamingo_vlm.modeling import attention

    write_mosaic_gpt(tmp_path / "lm", {**RELEASE_LIKE, "max_seq_len": 2048})
    lm32 = load_causal_lm(str(tmp_path / "lm"))
    lm16 = load_causal_lm(str(tmp_path / "lm"), dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append((q.shape[-2], q.dtype)) or real(q, *a, **k))

    def steps(lm):
        with torch.no_grad():
            out = lm(ids[:, :32], use_cache=True)
            logits, cache = [], out.past_key_values
            for i in range(32, 40):
                out = lm(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1].float())
        return torch.cat(logits)

    ours = steps(lm16)
    assert {d for n, d in seen if n == 32} == {torch.bfloat16} and {d for n, d in seen if n == 1} == {torch.float32}
    monkeypatch.setattr(attention, "FP32_MAX_QUERIES", 0)
    bf16_sdpa = steps(lm16)
    ref = steps(lm32)
    assert (ours - bf16_sdpa).norm() <= 0.02 * ref.norm()
    assert (ours - ref).norm() <= 1.05 * (bf16_sdpa - ref).norm()


def test_bf16_close_to_fp32(tmp_path):
    write_mosaic_gpt(tmp_path / "lm", {**RELEASE_LIKE, "max_seq_len": 2048})
    lm32 = load_causal_lm(str(tmp_path / "lm"))
    lm16 = load_causal_lm(str(tmp_path / "lm"), dtype=torch.bfloat16)
    assert lm16.transformer.blocks[0].attn.q_ln.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = lm32(ids).logits, lm16(ids).logits.float()
    # bf16 rounding only, and as small at the first positions as at the last: the ALiBi bias is built
    # from distances. (An absolute bias like MosaicGPT's, -slope * (key_len - 1 - j) in bf16, is rounded
    # to steps of 2-8 there and makes the first positions' logits errors several times larger.)
    err = (a - b).abs().amax(-1)[0]
    assert err.max() < 0.1 * a.std(), (err.max(), a.std())
    assert err[:50].mean() < 2 * err[-50:].mean(), (err[:50].mean(), err[-50:].mean())
    assert lm16.generate(ids[:, :20], max_new_tokens=4, pad_token_id=0).shape == (1, 24)


# -- Flamingo on top ---------------------------------------------------------------------------------------
def test_flamingo_on_a_mosaic_gpt_checkpoint(tmp_path):
    tokenizer = tiny_tokenizer()
    write_mosaic_gpt(tmp_path / "lm", EXOTIC, vocab_size=len(tokenizer))
    model, image_processor, tokenizer = create_model_and_transforms(
        tiny_vision(), None, str(tmp_path / "lm"), tokenizer, cross_attn_every_n_layers=1)
    randomize_gates(model)
    model.eval()
    sd = model.state_dict()
    assert "lang_encoder.transformer.blocks.1.decoder_layer.attn.q_ln.weight" in sd
    assert "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn_gate" in sd
    processor = FlamingoProcessor(tokenizer, image_processor)
    imgs = random_images(3)
    batch = processor([("<image>a red car.<|endofchunk|><image>a", imgs[:2]), ("<image>a dog", imgs[2:])])
    vx, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(vx, ids, mask)
    assert out.logits.shape == (*ids.shape, len(tokenizer)) and torch.isfinite(out.logits).all()
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    cached = model.generate(vx, ids, mask, use_cache=True, **kw)
    assert cached.tolist() == model.generate(vx, ids, mask, use_cache=False, **kw).tolist()
    # saved with the LM embedded (random backbone) and loaded back: qk_ln etc. survive
    saved = model.save_pretrained(tmp_path / "saved", tokenizer=tokenizer, image_processor=image_processor,
                                  include_backbones=True)
    from flamingo_vlm import load_pretrained

    loaded, _, _ = load_pretrained(saved)
    assert isinstance(loaded.lang_encoder, MosaicMptForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(vx, ids, mask).logits, out.logits, atol=1e-5, rtol=0)
    # bf16 throughout: close to fp32, and generation runs
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits16 = model(vx.to(torch.bfloat16), ids, mask).logits.float()
    valid = mask.bool()
    assert (logits16[valid] - out.logits[valid]).abs().max() < 0.1 * out.logits[valid].std()
    assert model.generate(vx.to(torch.bfloat16), ids, mask, **kw).shape == cached.shape


# -- MPT (model_type "mpt") -------------------------------------------------------------------------------
def test_mpt_checkpoint_with_qk_ln_loads_into_our_class(tmp_path):
    """A `model_type: mpt` checkpoint (config.json with attn_config) with QK-LayerNorm, clip_qkv,
    alibi_bias_max 4 and logit_scale computes what the MosaicGPT definition computes."""
    attn = {"qk_ln": True, "alibi_bias_max": 4, "clip_qkv": 1.5, "softmax_scale": 0.3}
    (tmp_path / "mpt").mkdir()
    (tmp_path / "mpt" / "config.json").write_text(json.dumps({
        "model_type": "mpt", "architectures": ["MPTForCausalLM"], "d_model": 32, "n_heads": 4, "n_layers": 2,
        "expansion_ratio": 4, "max_seq_len": 64, "vocab_size": VOCAB, "no_bias": True, "logit_scale": 0.5,
        "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "init_config": {"name": "kaiming_normal_"},
        "attn_config": {"alibi": True, "attn_impl": "torch", "attn_type": "multihead_attention", **attn}}))
    mosaic = {**RELEASE_LIKE, "vocab_size": VOCAB, "alibi_bias_max": 4, "attn_clip_qkv": 1.5, "softmax_scale": 0.3,
              "logit_scale": 0.5}
    sd = mosaic_gpt_state_dict(mosaic, seed=3)  # MosaicGPT names; the same tensors under MPT's names:
    renames = {"ln_1": "norm_1", "ln_2": "norm_2", "mlp.mlp_up": "ffn.up_proj", "mlp.mlp_down": "ffn.down_proj",
               "transformer.ln_f": "transformer.norm_f"}
    mpt_sd = {}
    for key, value in sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        mpt_sd[key] = value
    from safetensors.torch import save_file

    save_file(mpt_sd, tmp_path / "mpt" / "model.safetensors", metadata={"format": "pt"})
    loaded = load_causal_lm(str(tmp_path / "mpt"))
    assert isinstance(loaded, MosaicMptForCausalLM)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = loaded(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, reference_logits(sd, mosaic, ids, mask).float()[mask.bool()],
                               atol=2e-4, rtol=1e-4)
    # an extra tensor (here learned positions) is refused, not dropped
    mpt_sd["transformer.wpe.weight"] = torch.zeros(64, 32)
    save_file(mpt_sd, tmp_path / "mpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        load_causal_lm(str(tmp_path / "mpt"))


def test_plain_mpt_matches_transformers(tmp_path):
    """Without the settings transformers drops, our MPT is transformers' MPT (same logits, same keys)."""
    config = MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB)
    ref = MptForCausalLM(config).eval()
    ours = MosaicMptForCausalLM(config).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [
    {"expansion_ratio": 2},
    {"no_bias": False, "logit_scale": 0.5, "attn_config": {"qk_ln": True, "alibi_bias_max": 4}},
])
def test_an_mpt_saved_by_transformers_runs_as_transformers_computes(tmp_path, settings):
    """transformers' own MptForCausalLM ignores expansion_ratio (a 4 x d_model MLP), no_bias=False,
    logit_scale, qk_ln and alibi_bias_max, and save_pretrained keeps the config's values: its
    directory (which the original OpenFlamingo loads with that class) loads with the weights it holds
    and computes what transformers computes (it failed to load, or computed MosaicML's meaning)."""
    config = MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB, **settings)
    torch.manual_seed(0)
    ref = MptForCausalLM(config).eval()
    assert ref.transformer.blocks[0].ffn.up_proj.weight.shape == (128, 32)  # 4x whatever the config says
    ref.save_pretrained(tmp_path / "mpt")
    saved = json.loads((tmp_path / "mpt" / "config.json").read_text())
    assert saved["architectures"] == ["MptForCausalLM"]
    assert all(saved[k] == v for k, v in settings.items() if k != "attn_config")  # kept, though ignored
    loaded = load_causal_lm(str(tmp_path / "mpt"))
    assert isinstance(loaded, MosaicMptForCausalLM)
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=0)


# -- the audit: every refused field is refused --------------------------------------------------------------
def _refused_cases():
    for table, rules in [("mosaic_gpt", MOSAIC_GPT_RULES), ("mpt", MPT_RULES), ("mpt_attn", MPT_ATTN_RULES)]:
        for key, rule in rules.items():
            if rule.refuse is not None:
                yield pytest.param(table, key, rule.bad, id=f"{table}.{key}")


@pytest.mark.parametrize("table,key,bad", list(_refused_cases()))
def test_refused_settings_are_refused(tmp_path, table, key, bad):
    if table == "mosaic_gpt":
        cfg = {"model_type": "mosaic_gpt", "vocab_size": VOCAB, **RELEASE_LIKE, key: bad}
    else:
        cfg = {"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
               "vocab_size": VOCAB, "attn_config": {"alibi": True}}
        if table == "mpt":
            cfg[key] = bad
        else:
            cfg["attn_config"][key] = bad
    with pytest.raises(UnsupportedLMConfig, match=re.escape(f"{key}={bad!r}")):
        with torch.device("meta"):
            causal_lm_from_config(cfg)
    # ... also on the load path, with the file named
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedLMConfig, match="config.json"):
        load_causal_lm(str(tmp_path))


def test_audit_covers_every_mosaic_gpt_config_key():
    # MosaicGPTConfig.__init__'s parameters (MosaicML examples, April 2023): each has a verdict.
    keys = ("d_model n_heads n_layers mlp_ratio max_seq_len vocab_size attn_pdrop resid_pdrop emb_pdrop attn_impl "
            "attn_qk_ln attn_clip_qkv softmax_scale prefix_lm attn_uses_sequence_id alibi alibi_bias_max "
            "init_device logit_scale no_bias verbose param_init_fn init_div_is_residual init_std emb_init_std "
            "emb_init_uniform_lim init_gain fan_mode init_nonlinearity embedding_fraction low_precision_layernorm "
            "use_cache").split()
    assert set(keys) <= set(MOSAIC_GPT_RULES)
    assert {r.verdict for r in MOSAIC_GPT_RULES.values()} == {"honoured", "irrelevant", "refused"}


def test_audit_doc_lists_every_key():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "lm-config-audit.md").read_text()
    for rules in (MOSAIC_GPT_RULES, MPT_RULES, MPT_ATTN_RULES):
        missing = [key for key in rules if f"`{key}`" not in doc]
        assert not missing, f"docs/lm-config-audit.md does not list {missing}"


# -- the release architecture, on the meta device ------------------------------------------------------------
def test_openflamingo_3b_release_architecture(tmp_path, monkeypatch):
    """OpenFlamingo-3B-vitl-mpt1b as `convert`/`from_pretrained` build it: its MosaicGPT config.json goes
    through load_causal_lm (weights replaced by meta tensors under MosaicGPT's names)."""
    import flamingo_vlm.lm_loading as lm_loading

    release = OPENFLAMINGO_RELEASES["openflamingo/OpenFlamingo-3B-vitl-mpt1b"]
    cfg = release.lm_config
    assert (cfg["model_type"], cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["vocab_size"],
            cfg["max_seq_len"], cfg["alibi"], cfg["attn_qk_ln"], cfg["no_bias"]) == (
        "mosaic_gpt", 2048, 16, 24, 50432, 2048, True, True, True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d, n = 2048, 24
    hub_keys = {"transformer.wte.weight": (50432, d), "transformer.ln_f.weight": (d,)}
    for i in range(n):
        for name, shape in [("ln_1", (d,)), ("attn.Wqkv", (3 * d, d)), ("attn.q_ln", (d,)), ("attn.k_ln", (d,)),
                            ("attn.out_proj", (d, d)), ("ln_2", (d,)), ("mlp.mlp_up", (4 * d, d)),
                            ("mlp.mlp_down", (d, 4 * d))]:
            hub_keys[f"transformer.blocks.{i}.{name}.weight"] = shape
    monkeypatch.setattr(lm_loading, "_mosaic_weights",
                        lambda *a: {k: torch.empty(s, device="meta") for k, s in hub_keys.items()})
    # GPT-NeoX's tokenizer has 50277 tokens and no pad token: OpenFlamingo adds eoc, image and <PAD>
    words = ["<|endoftext|>"] + [f"w{i}" for i in range(OPENFLAMINGO_TOKENIZER_LEN - 1)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>")),
        eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    with torch.device("meta"):  # what load_openflamingo_release (from_pretrained, convert) calls, minus weights
        model, _, tokenizer = create_model_and_transforms(
            release.vision, None, str(tmp_path), tokenizer,
            cross_attn_every_n_layers=release.cross_attn_every_n_layers,
            vision_tokens_ln_post=release.vision_tokens_ln_post)
    assert len(tokenizer) == 50280 and isinstance(model.lang_encoder, MosaicMptForCausalLM)
    assert all(p.device.type == "meta" for p in model.parameters())
    sd = model.state_dict()
    # The LM: MosaicGPT's modules under MPT names, q_ln/k_ln in every block, no biases anywhere.
    lm_keys = {k.removeprefix("lang_encoder.").replace(".decoder_layer.", ".") for k in sd
               if k.startswith("lang_encoder.") and ".gated_cross_attn_layer." not in k}
    renamed = {k.replace("ln_1", "norm_1").replace("ln_2", "norm_2").replace("mlp.mlp_up", "ffn.up_proj")
               .replace("mlp.mlp_down", "ffn.down_proj").replace("transformer.ln_f", "transformer.norm_f")
               for k in hub_keys}
    assert lm_keys - {"lm_head.weight"} == renamed
    assert not any(k.endswith(".bias") for k in lm_keys)
    # The trainable part: exactly the release checkpoint's key set (anchors, section 1), shapes included.
    expected = {"perceiver.latents": (64, 1024), "perceiver.norm.weight": (1024,), "perceiver.norm.bias": (1024,),
                "lang_encoder.transformer.wte.weight": (50280, d)}
    for i in range(6):
        p = f"perceiver.layers.{i}."
        for ln in ("norm_media", "norm_latents"):
            expected.update({p + f"0.{ln}.weight": (1024,), p + f"0.{ln}.bias": (1024,)})
        expected.update({p + "0.to_q.weight": (512, 1024), p + "0.to_kv.weight": (1024, 1024),
                         p + "0.to_out.weight": (1024, 512), p + "1.0.weight": (1024,), p + "1.0.bias": (1024,),
                         p + "1.1.weight": (4096, 1024), p + "1.3.weight": (1024, 4096)})
    for k in range(n):  # cross-attention before every block (every 1 layer)
        p = f"lang_encoder.transformer.blocks.{k}.gated_cross_attn_layer."
        expected.update({p + "attn_gate": (1,), p + "ff_gate": (1,), p + "attn.norm.weight": (d,),
                         p + "attn.norm.bias": (d,), p + "attn.to_q.weight": (512, d),
                         p + "attn.to_kv.weight": (1024, 1024), p + "attn.to_out.weight": (d, 512),
                         p + "ff.0.weight": (d,), p + "ff.0.bias": (d,), p + "ff.1.weight": (4 * d, d),
                         p + "ff.3.weight": (d, 4 * d)})
    trainable = {_state_key(name) for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(expected)
    assert {k: tuple(sd[k].shape) for k in expected} == expected
