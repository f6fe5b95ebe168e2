"""Vision encoders and image preprocessing against the OpenFlamingo golden fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_vlm.image_processing import IMAGENET_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from flamingo_vlm.modeling.feature_grid import FeatureGridEncoder
from flamingo_vlm.modeling.vision import (
    OPEN_CLIP_VISION_CONFIGS,
    HFVisionEncoder,
    OpenCLIPVisionTransformer,
    load_open_clip_state_dict,
    resolve_open_clip_pretrained,
)

FAMILIES = ("gpt_neox", "llama", "mpt", "opt")


@pytest.fixture(scope="module")
def inputs(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "inputs.pt")


@pytest.fixture(scope="module")
def ref_state_dict(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "llama" / "state_dict.pt")


def _vision_keys(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k.startswith("vision_encoder.")}


def _fixture_encoder(reference_dir: Path, state_dict: dict, tokens_ln_post: bool) -> OpenCLIPVisionTransformer:
    model = OpenCLIPVisionTransformer.from_open_clip_config(
        reference_dir / "open_clip_config.json", tokens_ln_post=tokens_ln_post
    )
    load_open_clip_state_dict(model, state_dict)
    return model.eval()


# ------------------------------------------------------------------------------------------ preprocessing


def test_preprocessing_matches_open_clip(inputs):
    proc = ImageProcessor(64)
    got = proc.preprocess_batch([im.numpy() for im in inputs["images_uint8"]])
    want = inputs["vision_x"].reshape(6, 3, 64, 64)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_preprocessing_inputs_and_modes(inputs, tmp_path):
    arr = inputs["images_uint8"][0].numpy()  # 72 x 88
    proc = ImageProcessor(64)
    ref = proc(arr)
    png = tmp_path / "im.png"
    Image.fromarray(arr).save(png)
    torch.testing.assert_close(proc(png), ref)  # path
    torch.testing.assert_close(proc(str(png)), ref)
    torch.testing.assert_close(proc(Image.fromarray(arr).convert("RGBA")), ref)  # non-RGB mode converted
    gray = proc(arr[..., 0])  # 2-D uint8 = grayscale: all channels equal before normalisation
    un = gray * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    torch.testing.assert_close(un[0], un[1], atol=1e-6, rtol=0)
    # squash mode keeps the whole image (no crop): differs from shortest+crop on a non-square image
    squash = ImageProcessor(64, resize_mode="squash")(arr)
    assert squash.shape == (3, 64, 64) and not torch.allclose(squash, ref, atol=1e-2)
    assert ImageProcessor.from_dict(json.loads(json.dumps(proc.to_dict()))) == proc


def test_extreme_aspect_ratio_resamples_only_the_crop(monkeypatch):
    """A 1 x 20,000 image (a few hundred bytes of PNG) was first resized whole to 224 x 4,480,000
    pixels (3.7 GB, 11 s; 1 x 25M, within the server's pixel limit: terabytes). Past 64:1 only the
    centre crop is resampled; ordinary images keep open_clip's resize-then-crop (test above)."""
    asked = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: asked.append(size) or resize(self, size, *a, **k))
    proc = ImageProcessor(224)
    # A vertical stripe: left half red, right half blue; the crop is its centre, as the whole resize gives.
    arr = np.zeros((20_000, 2, 3), np.uint8)
    arr[:, 0, 0] = 255
    arr[:, 1, 2] = 255
    x = proc(arr) * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    assert x.shape == (3, 224, 224) and asked == [(224, 224)]
    assert x[0, :, :40].min() > 0.9 and x[2, :, :40].max() < 0.1 and x[2, :, -40:].min() > 0.9
    asked.clear()
    proc(np.zeros((300, 200, 3), np.uint8))
    assert asked == [(224, 336)]  # an ordinary image: the whole resize, as open_clip


def test_preprocessing_errors(tmp_path):
    proc = ImageProcessor(32)
    with pytest.raises(TypeError, match="uint8"):
        proc(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        proc(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image type"):
        proc(torch.zeros(3, 8, 8))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        proc(bad)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        proc(tmp_path / "missing.jpg")
    for size in ((0, 0), (0, 5)):  # (a ZeroDivisionError)
        with pytest.raises(ValueError, match=rf"an image of {size[0]} x {size[1]} pixels has nothing to show"):
            proc(Image.new("RGB", size))
    with pytest.raises(ValueError, match="resize_mode"):
        ImageProcessor(32, resize_mode="crop")
    with pytest.raises(ValueError, match="unknown"):
        ImageProcessor.from_dict({"image_size": 32, "colour": "red"})


# ------------------------------------------------------------------------------------------ open_clip ViT


@pytest.mark.parametrize("family", FAMILIES)
def test_open_clip_vit_matches_fixture(reference_dir, inputs, family):
    folder = reference_dir / family
    if not (folder / "outputs.pt").exists():
        pytest.skip(f"no fixture folder for {family}")
    model = _fixture_encoder(reference_dir, torch.load(folder / "state_dict.pt"), tokens_ln_post=True)
    with torch.no_grad():
        tokens = model(inputs["vision_x"].reshape(6, 3, 64, 64))
    want = torch.load(folder / "outputs.pt")["vision_tokens"]
    assert tokens.shape == want.shape == (6, model.num_tokens, model.hidden_size)
    torch.testing.assert_close(tokens, want, atol=1e-4, rtol=0)


def test_open_clip_vit_tokens_without_ln_post(reference_dir, inputs, ref_state_dict):
    want = torch.load(reference_dir / "llama" / "outputs.pt")["vision_tokens"]
    model = _fixture_encoder(reference_dir, ref_state_dict, tokens_ln_post=False)
    with torch.no_grad():
        pre_ln = model(inputs["vision_x"].reshape(6, 3, 64, 64))
        assert (pre_ln - want).abs().max() > 1e-2  # the two open_clip behaviours really differ
        torch.testing.assert_close(model.ln_post(pre_ln), want, atol=1e-4, rtol=0)


def test_param_names_match_openflamingo(ref_state_dict):
    model = OpenCLIPVisionTransformer.from_open_clip_config(
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        }
    )
    ref = {k.removeprefix("vision_encoder."): tuple(v.shape) for k, v in _vision_keys(ref_state_dict).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ref


def test_load_open_clip_dict_with_visual_prefix_and_text_keys(ref_state_dict):
    vision = {k.removeprefix("vision_encoder."): v for k, v in _vision_keys(ref_state_dict).items()}
    ckpt = {f"module.visual.{k}": v for k, v in vision.items()}
    ckpt.update({"module.token_embedding.weight": torch.zeros(64, 32), "module.logit_scale": torch.tensor(1.0)})
    model = OpenCLIPVisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=2, embed_dim=32)
    result = load_open_clip_state_dict(model, {"state_dict": ckpt})
    assert result.missing_keys == [] and result.unexpected_keys == []
    c_fc = vision["transformer.resblocks.1.mlp.c_fc.weight"]
    torch.testing.assert_close(model.transformer.resblocks[1].mlp.c_fc.weight, c_fc)

    del ckpt["module.visual.ln_post.bias"]
    fresh = OpenCLIPVisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=2, embed_dim=32)
    with pytest.raises(RuntimeError, match=r"missing keys: \['ln_post.bias'\]"):
        load_open_clip_state_dict(fresh, ckpt)
    result = load_open_clip_state_dict(fresh, ckpt, strict=False)
    assert result.missing_keys == ["ln_post.bias"]
    wrong = OpenCLIPVisionTransformer(image_size=64, patch_size=16, width=64, layers=2, heads=2, embed_dim=16)
    with pytest.raises(RuntimeError, match=r"proj: checkpoint \(64, 32\) vs model \(64, 16\)"):
        load_open_clip_state_dict(wrong, ckpt, strict=False)


def test_load_from_file_safetensors(tmp_path, reference_dir, inputs, ref_state_dict):
    from safetensors.torch import save_file

    vision = {
        "visual." + k.removeprefix("vision_encoder."): v.contiguous() for k, v in _vision_keys(ref_state_dict).items()
    }
    save_file(vision, tmp_path / "open_clip_model.safetensors")
    model = OpenCLIPVisionTransformer.from_open_clip_config(reference_dir / "open_clip_config.json")
    load_open_clip_state_dict(model, tmp_path / "open_clip_model.safetensors")
    torch.testing.assert_close(model.positional_embedding, ref_state_dict["vision_encoder.positional_embedding"])



@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_damaged_open_clip_weights_name_the_file(tmp_path, name):
    from flamingo_vlm.files import WeightsFileError

    path = tmp_path / name
    path.write_bytes(b"\x00not weights" * 10)
    model = OpenCLIPVisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=2, embed_dim=16)
    with pytest.raises(WeightsFileError, match="truncated or corrupt") as e:
        load_open_clip_state_dict(model, path)
    assert str(path) in str(e.value) and e.value.path == path

def test_standard_configs_and_quick_gelu():
    cfg = OPEN_CLIP_VISION_CONFIGS["ViT-H-14"]["vision_cfg"]
    assert (cfg["width"], cfg["layers"], cfg["head_width"]) == (1280, 32, 80)
    vit = OpenCLIPVisionTransformer.from_open_clip_name("ViT-B-32-quickgelu")
    assert vit.act == "quick_gelu" and vit.hidden_size == 768 and vit.num_tokens == 49
    assert vit.transformer.resblocks[0].attn.heads == 12 and vit.proj.shape == (768, 512)
    assert vit.default_image_processor() == ImageProcessor(224)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPVisionTransformer.from_open_clip_name("ViT-X-99")


def test_layer_scale_names():
    vit = OpenCLIPVisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=2, ls_init_value=0.1)
    keys = set(vit.state_dict())
    assert {"transformer.resblocks.0.ls_1.gamma", "transformer.resblocks.0.ls_2.gamma"} <= keys
    assert "proj" not in keys
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32)


# ------------------------------------------------------------------------------------------ Hub resolution


def test_resolve_pretrained_from_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    got = resolve_open_clip_pretrained("ViT-B-32", "openai", cache_dir=tmp_path)
    assert got.resolve() == (snap / "open_clip_pytorch_model.bin").resolve()
    assert resolve_open_clip_pretrained("ViT-B/32-quickgelu", "openai", cache_dir=tmp_path).read_bytes() == b"weights"

    with pytest.raises(OSError, match="timm/vit_large_patch14_clip_224.openai") as err:
        resolve_open_clip_pretrained("ViT-L-14", "openai", cache_dir=tmp_path)
    assert "open_clip_pytorch_model.bin" in str(err.value) and "local" in str(err.value)
    with pytest.raises(ValueError, match="known tags"):
        resolve_open_clip_pretrained("ViT-L-14", "no-such-tag", cache_dir=tmp_path)
    local = tmp_path / "my.pt"
    local.write_bytes(b"x")
    assert resolve_open_clip_pretrained("ViT-L-14", local) == local


# ------------------------------------------------------------------------------------------ transformers


def test_hf_clip_encoder():
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    enc = HFVisionEncoder.from_config(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        full = enc.model(pixel_values=x).last_hidden_state
    assert tokens.shape == (3, 16, 32) and enc.hidden_size == 32 and enc.image_size == 32
    torch.testing.assert_close(tokens, full[:, 1:])
    enc.apply_post_layernorm = True
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.model.post_layernorm(full[:, 1:]))
    proc = enc.default_image_processor()
    assert proc.image_size == 32 and proc.mean == OPENAI_CLIP_MEAN and proc.resize_mode == "shortest"


def test_hf_siglip_encoder():
    from transformers import SiglipVisionConfig

    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    enc = HFVisionEncoder.from_config(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        torch.testing.assert_close(tokens, enc.model(pixel_values=x).last_hidden_state)
    assert tokens.shape == (2, 16, 32)
    assert enc.default_image_processor().mean == (0.5, 0.5, 0.5)


def test_hf_from_pretrained_local(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"shortest_edge": 32}, "resample": 2}
        )
    )
    enc = HFVisionEncoder.from_pretrained(tmp_path)
    proc = enc.default_image_processor()
    assert (proc.mean, proc.std, proc.interpolation) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


# ------------------------------------------------------------------------------------------ any backbone


def test_feature_grid_encoder():
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    enc = FeatureGridEncoder(conv, hidden_size=8, image_size=16)
    x = torch.randn(2, 3, 16, 16)
    grid = conv(x)  # (2, 8, 4, 4)
    torch.testing.assert_close(enc(x), grid.permute(0, 2, 3, 1).reshape(2, 16, 8))
    assert enc.default_image_processor().mean == IMAGENET_MEAN

    class Backbone(torch.nn.Module):
        def extract_features(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(2).transpose(1, 2)  # already tokens (N, H*W, C)

    tok = FeatureGridEncoder(Backbone(), hidden_size=3, image_size=16, method="extract_features")
    torch.testing.assert_close(tok(x), x.flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="hidden"):
        FeatureGridEncoder(conv, hidden_size=8, image_size=16, method="hidden")
    with pytest.raises(ValueError, match="neither"):
        FeatureGridEncoder(Backbone(), hidden_size=5, image_size=16, method="extract_features")(x)


def test_the_vit_compiles_as_one_graph():
    """Its in-projection goes through fast_linear.linear (routed like nn.Linear in a routing block),
    which must not break a compiled graph outside one."""
    vit = OpenCLIPVisionTransformer(image_size=32, patch_size=16, width=32, layers=2, heads=2, embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(vit, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), vit(x))


def test_an_open_clip_config_without_a_head_gets_an_error_naming_the_file_and_heads_are_honoured(tmp_path):
    from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer

    vcfg = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16}
    path = tmp_path / "vis.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vcfg}))  # head_width defaults to 64 > width
    with pytest.raises(ValueError, match=r"vis\.json: vision width 32 is smaller than head_width 64"):
        OpenCLIPVisionTransformer.from_open_clip_config(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"vis\.json: "):
        OpenCLIPVisionTransformer.from_open_clip_config(path)
    with pytest.raises(ValueError, match="vision head_width must be >= 1, got 0"):
        OpenCLIPVisionTransformer.from_open_clip_config({"vision_cfg": {**vcfg, "head_width": 0}})
    assert OpenCLIPVisionTransformer.from_open_clip_config({"vision_cfg": {**vcfg, "heads": 4}}).config["heads"] == 4
    assert OpenCLIPVisionTransformer.from_open_clip_config({"vision_cfg": {**vcfg, "head_width": 16}}).config["heads"] == 2
