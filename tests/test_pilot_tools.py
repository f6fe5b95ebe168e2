"""research/cells_only.py: the pilot wrapper that drops the perceiver's latents and scales the
cross-attention's query/key-value learning rate."""

from __future__ import annotations

import pytest
import torch

from flamingo_vlm import FlamingoProcessor, create_model_and_transforms
from flamingo_vlm.modeling import perceiver
from flamingo_vlm.train import optim
from flamingo_vlm.train.config import OptimConfig
from tiny import random_images, script_module, tiny_lm, tiny_tokenizer, tiny_vision


@pytest.fixture
def cells_only(monkeypatch):
    # the script patches module attributes; monkeypatch puts them back after the test
    monkeypatch.setattr(perceiver.PerceiverResampler, "forward", perceiver.PerceiverResampler.forward)
    monkeypatch.setattr(optim, "param_groups", optim.param_groups)
    with script_module("cells_only", "research") as module:
        yield module


def passthrough_model():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model, ip, tok = create_model_and_transforms(tiny_vision(), None, tiny_lm(vocab_size=len(tok)), tok,
                                                 perceiver_kwargs={"media_passthrough": True})
    return model.eval(), ip, tok


def test_drop_latents_leaves_only_the_passed_through_tokens(cells_only):
    model, ip, tok = passthrough_model()
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|>", random_images(1))])
    n = model.perceiver.latents.shape[0]
    with torch.no_grad():
        full = model.encode_vision_x(batch["vision_x"])
        cells_only.drop_latents()
        cells = model.encode_vision_x(batch["vision_x"])
        logits = model(batch["vision_x"], batch["input_ids"]).logits
    assert cells.shape[2] == full.shape[2] - n
    torch.testing.assert_close(cells, full[:, :, n:])
    assert torch.isfinite(logits).all()


def test_drop_latents_refuses_a_perceiver_without_passthrough(cells_only):
    from tiny import tiny_flamingo

    model, ip, tok = tiny_flamingo("llama")
    batch = FlamingoProcessor(tok, ip)([("<image>a", random_images(1))])
    cells_only.drop_latents()
    with pytest.raises(RuntimeError, match="media_passthrough"):
        model.encode_vision_x(batch["vision_x"])


def test_qk_lr_scale_splits_only_the_query_and_key_value_projections(cells_only):
    model, _, _ = passthrough_model()
    cfg = OptimConfig(lr=1e-3, gate_lr_scale=2.0)
    plain = optim.param_groups(model, cfg)
    cells_only.scale_qk_lr(10.0)
    groups = optim.build_optimizer(model, cfg).param_groups
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    assert sorted(lr_of) == sorted(n for g in plain for n in g["names"])  # every parameter, once
    fast = {n for n in lr_of if ".attn.to_q" in n or ".attn.to_kv" in n}
    assert fast
    for name, lr in lr_of.items():
        if name in fast:
            assert lr == pytest.approx(1e-2)
        elif name.endswith(("attn_gate", "ff_gate")):
            assert lr == pytest.approx(2e-3)
        else:
            assert lr == pytest.approx(1e-3)
