"""Flamingo on every supported decoder-only LM family, from tiny random configs.

For each family: finite logits/loss, images condition only the tokens from the first ``<image>``
on, cached decoding equals uncached decoding, a left-padded batch equals each row alone (logits,
greedy and beam search), sampling expands rows correctly, and ``<image>`` is never generated.
The decoder-layer list is always found automatically.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoConfig, AutoModelForCausalLM, MptConfig, PreTrainedTokenizerFast

from flamingo_vlm import create_model_and_transforms
from flamingo_vlm.modeling.flamingo import Flamingo
from flamingo_vlm.modeling.injection import FlamingoLayer
from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM
from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer
from flamingo_vlm.processing import FlamingoProcessor

ATOL = 1e-4
IMAGE_SIZE = 32
INIT_STD = 0.2
N_WORDS = 61  # + <unk>, <s>, </s> = 64 tokens before Flamingo adds its own

# (id, model_type, config kwargs, cross_attn_every_n_layers). Vocabulary and special-token ids
# come from the tokenizer below.
FAMILIES = [
    ("llama", "llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2), 1),
    ("smollm", "llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True), 2),
    ("mistral", "mistral", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, sliding_window=8), 1),
    ("qwen2", "qwen2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2), 2),
    ("qwen3", "qwen3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16), 1),
    ("gemma", "gemma", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=8), 2),
    ("gemma2", "gemma2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              query_pre_attn_scalar=8, sliding_window=8), 1),
    ("phi3", "phi3", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2), 2),
    ("gpt_neox", "gpt_neox", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4), 1),
    ("opt", "opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32), 2),
    ("gptj", "gptj", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, rotary_dim=4), 1),
    ("gpt_neo", "gpt_neo", dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                attention_types=[[["global", "local"], 1]], window_size=8), 2),
    ("gpt2", "gpt2", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4), 1),
    ("mpt", "mpt", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=128), 2),
    # Our MPT (flamingo_vlm.modeling.mpt, what MosaicGPT/MPT checkpoints load into): QK-LayerNorm, clip_qkv,
    # softmax_scale, alibi_bias_max, logit_scale, biases, a 2x MLP and 6 heads (not a power of two).
    ("mosaic_mpt", "mosaic_mpt", dict(d_model=36, n_heads=6, n_layers=2, expansion_ratio=2, max_seq_len=128,
                                      no_bias=False, logit_scale=0.5,
                                      attn_config=dict(qk_ln=True, alibi_bias_max=4, clip_qkv=2.0,
                                                       softmax_scale=0.3)), 1),
    ("falcon", "falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              new_decoder_architecture=False, alibi=False), 1),
    ("falcon_new_arch", "falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_kv_heads=2, new_decoder_architecture=True), 1),
    ("falcon_alibi", "falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, alibi=True), 2),
]
CASES = [pytest.param(f, id=f[0]) for f in FAMILIES]

# Row 0 has text before its first image and two images; row 1 is shorter with one image.
PROMPTS = [
    "w1 w2 w3 w4 <image> w5 w6 w7 <|endofchunk|> <image> w8 w9",
    "w10 <image> w11 w12",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(N_WORDS)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_vision_encoder() -> OpenCLIPVisionTransformer:
    return OpenCLIPVisionTransformer(image_size=IMAGE_SIZE, patch_size=16, width=32, layers=1, heads=2)


def make_lm(model_type: str, kwargs: dict, vocab_size: int):
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if model_type == "mosaic_mpt":
        config = MptConfig(vocab_size=vocab_size, initializer_range=INIT_STD, **ids, **kwargs)
        return MosaicMptForCausalLM(config)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **ids, **kwargs)
    # A wider init than the default 0.02 gives peaked, varied logits: fewer near-ties in greedy
    # and beam search, and outputs that actually depend on the prompt and images.
    for name in ("initializer_range", "init_std"):
        if hasattr(config, name):
            setattr(config, name, INIT_STD)
    return AutoModelForCausalLM.from_config(config)


def build_flamingo(model_type: str, kwargs: dict, every_n: int, **flamingo_kwargs):
    tokenizer = make_tokenizer()
    lm = make_lm(model_type, kwargs, len(tokenizer))
    model, image_processor, tokenizer = create_model_and_transforms(
        make_vision_encoder(),
        None,
        lm,
        tokenizer,
        cross_attn_every_n_layers=every_n,
        perceiver_kwargs=dict(depth=1, dim_head=16, heads=2, num_latents=4),
        cross_attn_kwargs=dict(dim_head=16, heads=2, ff_mult=2),
        **flamingo_kwargs,
    )
    return model, image_processor, tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: a second intra-op thread only adds synchronisation, and on a
    loaded 2-core machine spinning OpenMP threads slow this file down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict[str, tuple[Flamingo, FlamingoProcessor]] = {}


def family(case: tuple) -> tuple[Flamingo, FlamingoProcessor]:
    """The family's model (nonzero gates, eval mode) and processor, built once per module."""
    name, model_type, kwargs, every_n = case
    if name not in _MODELS:
        _MODELS[name] = _build_family(model_type, kwargs, every_n)
    return _MODELS[name]


def _build_family(model_type: str, kwargs: dict, every_n: int) -> tuple[Flamingo, FlamingoProcessor]:
    torch.manual_seed(0)
    model, image_processor, tokenizer = build_flamingo(model_type, kwargs, every_n)
    gates = []
    for block in model.gated_cross_attn_layers():
        for gate in (block.attn_gate, block.ff_gate):
            # |gate| in [0.5, 1]: tanh(gate) is far from zero, so images visibly matter.
            sign = 1.0 if torch.rand(()) < 0.5 else -1.0
            gate.data.fill_(sign * (0.5 + 0.5 * torch.rand(()).item()))
            gates.append(gate)
    assert len(gates) == 2 * (num_layers(model) // every_n)
    return model.eval(), FlamingoProcessor(tokenizer, image_processor)


def num_layers(model: Flamingo) -> int:
    return len(model.decoder_layers())


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(n)]


def samples(seed: int = 0) -> list[tuple[str, list[torch.Tensor]]]:
    imgs = images(3, seed)
    return [(PROMPTS[0], imgs[:2]), (PROMPTS[1], imgs[2:])]


def new_tokens(out: torch.Tensor, prompt_len: int, pad_id: int) -> list[list[int]]:
    """Generated tokens per row, trailing padding removed (finished rows are padded)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        while row and row[-1] == pad_id:
            row.pop()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_finds_decoder_layers_and_forward(case):
    model, proc = family(case)
    lm = model.lang_encoder
    layers = model.decoder_layers()
    assert all(isinstance(layer, FlamingoLayer) for layer in layers)
    # Found automatically, and it is the LM's own block class (the one accelerate must not split).
    assert {type(layer.decoder_layer).__name__ for layer in layers} <= set(lm._no_split_modules)
    assert num_layers(model) == lm.config.num_hidden_layers
    assert len(model.gated_cross_attn_layers()) == num_layers(model) // case[3]
    batch = proc(samples(), return_labels=True)
    with torch.no_grad():
        out = model(batch["vision_x"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    b, length = batch["input_ids"].shape
    assert out.logits.shape == (b, length, len(proc.tokenizer))
    assert torch.isfinite(out.logits).all()
    assert out.loss is not None and torch.isfinite(out.loss)


@pytest.mark.parametrize("case", CASES)
def test_images_condition_only_tokens_after_first_image(case):
    model, proc = family(case)
    batch_a, batch_b = proc(samples(0)), proc(samples(1))
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    ids, mask = batch_a["input_ids"], batch_a["attention_mask"]
    with torch.no_grad():
        logits_a = model(batch_a["vision_x"], ids, mask).logits
        logits_b = model(batch_b["vision_x"], ids, mask).logits
    for row in range(ids.shape[0]):
        first = int((ids[row] == model.media_token_id).nonzero()[0])
        valid_start = int((mask[row] == 0).sum())
        before = slice(valid_start, first)
        torch.testing.assert_close(logits_a[row, before], logits_b[row, before], atol=1e-6, rtol=0)
        diff = (logits_a[row, first:] - logits_b[row, first:]).abs().amax(-1)
        assert (diff > 1e-3).all(), (row, diff)


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_matches_no_cache(case):
    model, proc = family(case)
    batch = proc(samples())  # left padded: row 1 is shorter
    vx, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = model.generate(
        vx, ids, mask, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw
    )
    uncached = model.generate(vx, ids, mask, use_cache=False, **kw)
    assert cached.sequences.tolist() == uncached.tolist()
    seq = cached.sequences
    assert seq.shape[1] == ids.shape[1] + 6
    full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1] :])], dim=1)
    with torch.no_grad():
        full = model(vx, seq, full_mask).logits
    # Raw logits of each cached step (prefill, then 5 one-token steps) vs one uncached forward.
    step_logits = torch.stack(cached.logits, dim=1)  # (B, 6, V): step t predicts token L+t
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 : -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_matches_single_rows(case):
    model, proc = family(case)
    rows = samples()
    batch = proc(rows)
    assert (batch["attention_mask"][1] == 0).any(), "row 1 should be left padded"
    vx, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(vx, ids, mask).logits
    greedy = new_tokens(model.generate(vx, ids, mask, max_new_tokens=6), ids.shape[1], pad)
    for i, sample in enumerate(rows):
        single = proc([sample])
        assert single["attention_mask"].all()
        with torch.no_grad():
            single_logits = model(single["vision_x"], single["input_ids"]).logits[0]
        torch.testing.assert_close(logits[i, mask[i].bool()], single_logits, atol=ATOL, rtol=0)
        out = model.generate(single["vision_x"], single["input_ids"], single["attention_mask"], max_new_tokens=6)
        assert new_tokens(out, single["input_ids"].shape[1], pad)[0] == greedy[i]


@pytest.mark.parametrize("case", CASES)
def test_beam_search_and_sampling(case):
    model, proc = family(case)
    rows = samples()
    batch = proc(rows)
    vx, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    pad = proc.tokenizer.pad_token_id
    beams = new_tokens(model.generate(vx, ids, mask, num_beams=3, max_new_tokens=6), ids.shape[1], pad)
    greedy = new_tokens(model.generate(vx, ids, mask, max_new_tokens=6), ids.shape[1], pad)
    for i, sample in enumerate(rows):
        single = proc([sample])
        out = model.generate(
            single["vision_x"], single["input_ids"], single["attention_mask"], num_beams=3, max_new_tokens=6
        )
        assert new_tokens(out, single["input_ids"].shape[1], pad)[0] == beams[i]

    torch.manual_seed(0)
    sampled = model.generate(vx, ids, mask, do_sample=True, num_return_sequences=2, max_new_tokens=6)
    assert sampled.shape[0] == 4
    assert torch.equal(sampled[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))
    # top_k=1 sampling is greedy: each returned sequence must see its own row's images.
    top1 = model.generate(vx, ids, mask, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=6)
    assert new_tokens(top1, ids.shape[1], pad) == [greedy[0], greedy[0], greedy[1], greedy[1]]


@pytest.mark.parametrize("case", CASES)
def test_never_generates_image_token(case):
    model, proc = family(case)
    batch = proc(samples())
    media = model.media_token_id

    def favour_image(module, args, output):
        output = output.clone()
        output[..., media] += 100.0
        return output

    vx, ids, mask = batch["vision_x"], batch["input_ids"], batch["attention_mask"]
    handle = model.lang_encoder.get_output_embeddings().register_forward_hook(favour_image)
    try:
        forced = model.generate(vx, ids, mask, allow_image_tokens=True, max_new_tokens=4)
        assert (forced[:, ids.shape[1] :] == media).all()  # the bias works: <image> is the argmax
        outputs = [
            model.generate(vx, ids, mask, max_new_tokens=4),
            model.generate(vx, ids, mask, num_beams=3, max_new_tokens=4),
        ]
        for seed in range(3):
            torch.manual_seed(seed)
            outputs.append(model.generate(vx, ids, mask, do_sample=True, max_new_tokens=4))
        for out in outputs:
            assert not (out[:, ids.shape[1] :] == media).any()
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------


def test_explicit_decoder_layers_attr_name():
    torch.manual_seed(0)
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model, _, _ = build_flamingo("llama", kwargs, 1, decoder_layers_attr_name="model.layers")
    assert model.decoder_layers_attr_name == "model.layers"
    assert all(isinstance(layer, FlamingoLayer) for layer in model.lang_encoder.model.layers)
    for block in model.gated_cross_attn_layers():
        block.attn_gate.data.fill_(1.0)
    ids = torch.tensor([[5, 6, model.media_token_id, 7, 8]])
    with torch.no_grad():
        a = model(torch.randn(1, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE), ids).logits
        b = model(torch.randn(1, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE), ids).logits
    torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-6, rtol=0)
    assert (a[:, 2:] - b[:, 2:]).abs().amax() > 1e-3

    with pytest.raises(ValueError, match="model.nope"):
        build_flamingo("llama", kwargs, 1, decoder_layers_attr_name="model.nope")
    with pytest.raises(ValueError, match="not a ModuleList"):
        build_flamingo("llama", kwargs, 1, decoder_layers_attr_name="model.embed_tokens")
