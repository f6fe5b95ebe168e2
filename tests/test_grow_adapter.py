"""flamingo_vlm.train.grow (``flamingo-vlm grow-adapter``): a saved model with more perceiver latents
keeps its trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flamingo_vlm import FlamingoProcessor, load_pretrained
from tiny import random_images, tiny_flamingo


@pytest.fixture(scope="module")
def grow():
    from flamingo_vlm.train import grow as module

    return module


@pytest.fixture
def saved(tmp_path):
    model, ip, tok = tiny_flamingo("llama", every=2)
    return model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip), model


def test_grown_model_repeats_each_latent_and_keeps_every_other_weight(grow, saved, tmp_path):
    source, model = saved
    n = model.perceiver.latents.shape[0]
    assert grow.main([str(source), str(tmp_path / "g"), "--num-latents", str(3 * n), "--noise", "0.1"]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "g" / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        if key != grow.LATENTS:
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    grown = after[grow.LATENTS]
    assert grown.shape == (3 * n, before[grow.LATENTS].shape[1])
    torch.testing.assert_close(grown[::3], before[grow.LATENTS], rtol=0, atol=0)  # first copy of each exact
    copies = grown.view(n, 3, -1)
    drift = (copies[:, 1:] - copies[:, :1]).pow(2).mean().sqrt() / before[grow.LATENTS].pow(2).mean().sqrt()
    assert 0.05 < drift < 0.2  # the other copies are nudged apart by about --noise
    assert json.loads((tmp_path / "g" / "config.json").read_text())["perceiver_kwargs"]["num_latents"] == 3 * n

    loaded, ip, tok = load_pretrained(tmp_path / "g")
    assert loaded.perceiver.latents.shape[0] == 3 * n
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2))])
    with torch.no_grad():
        logits = loaded(batch["vision_x"], batch["input_ids"], batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()


def test_exact_copies_give_identical_latent_outputs(grow, saved, tmp_path):
    source, model = saved
    n = model.perceiver.latents.shape[0]
    grow.main([str(source), str(tmp_path / "g"), "--num-latents", str(2 * n), "--noise", "0"])
    loaded, ip, _ = load_pretrained(tmp_path / "g")
    x = torch.stack([ip(im) for im in random_images(1)])[:, None, None]  # (b, T, F, C, H, W)
    with torch.no_grad():
        latents = loaded.perceiver(loaded.vision_encoder(x.flatten(0, 2)).view(1, 1, 1, -1, loaded.perceiver.latents.shape[1]))
    torch.testing.assert_close(latents[..., ::2, :], latents[..., 1::2, :])



def test_media_passthrough_adds_an_identity_norm_and_keeps_the_latents(grow, saved, tmp_path):
    source, model = saved
    assert grow.main([str(source), str(tmp_path / "g"), "--media-passthrough"]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "g" / "model.safetensors")
    added = set(after) - set(before)
    assert added == {f"{grow.PASSTHROUGH_NORM}.weight", f"{grow.PASSTHROUGH_NORM}.bias"}
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["perceiver_kwargs"]["media_passthrough"] is True

    loaded, ip, _ = load_pretrained(tmp_path / "g")
    x = torch.stack([ip(im) for im in random_images(1)])[:, None, None]  # (b, T, F, C, H, W)
    with torch.no_grad():
        tokens = loaded.vision_encoder(x.flatten(0, 2))
        media, latents = loaded.encode_vision_x(x), model.encode_vision_x(x)
    n = latents.shape[2]
    assert media.shape[2] == n + tokens.shape[1]
    torch.testing.assert_close(media[:, :, :n], latents)
    torch.testing.assert_close(media[0, 0, n:], torch.nn.functional.layer_norm(tokens[0], tokens.shape[-1:]))

def test_bad_requests_say_what_to_do_and_write_nothing(grow, saved, tmp_path, capsys):
    source, model = saved
    n = model.perceiver.latents.shape[0]
    with pytest.raises(ValueError, match="not a multiple"):
        grow.main([str(source), str(tmp_path / "g"), "--num-latents", str(n + 1)])
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))
    with pytest.raises(SystemExit):
        grow.main([str(source), str(tmp_path / "g"), "--color-encoding", "both"])  # an open_clip encoder has no codes
    assert "built-in feature-grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grow.main([str(tmp_path), str(tmp_path / "g"), "--num-latents", str(2 * n)])
    assert "not a saved model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grow.main([str(source), str(source), "--num-latents", str(2 * n)])
    assert "exists" in capsys.readouterr().err
    # no option, or only what the model has already: it wrote a plain copy
    with pytest.raises(SystemExit):
        grow.main([str(source), str(tmp_path / "g")])
    assert "nothing to grow: give --num-latents, --color-encoding or --media-passthrough" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grow.main([str(source), str(tmp_path / "g"), "--num-latents", str(n)])
    assert f"has that already ({n} latents" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_weights_name_is_the_saved_models(grow):
    """grow keeps its own copy of the weights file's name (importing ..pretrained would pull
    transformers into every command's parser): it must be the one save_pretrained writes."""
    from flamingo_vlm import pretrained

    assert grow.WEIGHTS_NAME == pretrained.WEIGHTS_NAME


def test_a_built_in_model_is_grown_by_its_name(grow, tmp_path):
    """`grow-adapter smol-synthetic DIR` said "smol-synthetic is not a saved model", where every other
    command takes the name."""
    out = grow.grow_adapter("smol-synthetic", tmp_path / "grown", num_latents=64)
    assert json.loads((out / "config.json").read_text())["perceiver_kwargs"]["num_latents"] == 64
