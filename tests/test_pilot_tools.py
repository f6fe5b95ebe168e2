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


# -- scripts/aim_supervised.py: the attention loss on the named object's cells ---------------------
@pytest.fixture
def aim():
    with script_module("aim_supervised") as module:
        yield module


def test_object_cells_cover_the_object_and_its_centre(aim):
    from flamingo_vlm.synthetic import SceneObject

    small = SceneObject("circle", "red", "small", "center", (0.0, 0.0))
    assert aim.object_cells(small) == [24]  # the middle of the 7x7 grid
    large = SceneObject("square", "blue", "large", "top", (0.005, -0.018))
    # centre (0.505, 0.182), radius 0.13: cell centres of column 3 (0.50) and rows 0-1 (0.07, 0.21)
    # are within it; those of columns 2 and 4 (0.36, 0.64) are not
    assert aim.object_cells(large) == [3, 10]


def test_named_objects_finds_the_objects_a_question_names(aim):
    from flamingo_vlm.synthetic import SceneGenerator

    gen = SceneGenerator(seed=0)
    seen = set()
    for i in range(40):
        scene = gen.scene(i, "pretrain")
        for q in scene.questions():
            kind = q["question_type"]
            if kind in aim.TEXT_TYPES:
                continue
            if kind not in aim.QUESTION_TYPES.values():
                with pytest.raises(ValueError, match="no named object"):
                    aim.named_objects(scene, q)
                continue
            objs, word = aim.named_objects(scene, q)
            seen.add(kind)
            if kind == "how many":
                assert len(objs) == int(q["answer"]) and word in q["question"]
                assert all(o.shape == word[:-1] for o in objs) or objs == list(scene.objects)
                continue
            (obj,) = objs
            if kind == "what color is the":
                assert (obj.shape, obj.color) == (word, q["answer"])
            elif kind == "what shape is the":
                assert (obj.color, obj.shape) == (word, q["answer"])
            else:
                assert (obj.shape, obj.position) == (word, q["answer"]) and obj.color in q["question"]
    assert seen == set(aim.QUESTION_TYPES.values()) - set(aim.TEXT_TYPES)


def test_text_cells_cover_the_written_word(aim):
    import numpy as np

    from flamingo_vlm.synthetic import SceneGenerator

    gen = SceneGenerator(seed=0)
    scenes = [s for s in (gen.scene(i, "pretrain") for i in range(120)) if s.text][:24]
    assert {s.text_corner for s in scenes} == {"top left", "top right", "bottom left", "bottom right"}
    for scene in scenes:
        pixels = np.asarray(scene.render(224)).max(-1) < 60  # the word is black; no shape colour is that dark
        ink = np.zeros((7, 7))
        for row, col in np.argwhere(pixels):
            ink[row // 32, col // 32] += 1
        cells = aim.text_cells(scene, 224)
        # the covered cells hold most of the ink, and every cell with much ink is covered
        assert ink.flatten()[cells].sum() >= 0.8 * ink.sum()
        assert set(np.flatnonzero(ink.flatten() >= 0.25 * ink.max())) <= set(cells)
        assert len({c // 7 for c in cells}) == 1 and 1 <= len(cells) <= 3
        q = next(q for q in scene.questions() if q["question_type"] in aim.TEXT_TYPES)
        assert aim.question_target(scene, q, 224) == (cells, "number" if scene.text.isdigit() else "word")


def test_aim_loss_is_minus_log_attention_mass_and_its_gradient_aims(aim):
    torch.manual_seed(0)
    B, H, P, d, latents, C = 2, 3, 2, 8, 5, 49
    q = torch.randn(B, H, P, d, requires_grad=True)
    k = torch.randn(B, H, latents + 2 * C, d)
    cells = torch.zeros(B, C, dtype=torch.bool)
    cells[0, [3, 10]] = True
    cells[1, 24] = True
    loss = aim.aim_loss(q, k, cells)
    attn = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)
    mass = torch.stack([attn[b][..., latents + cells[b].nonzero().flatten()].sum(-1)
                        + attn[b][..., latents + C + cells[b].nonzero().flatten()].sum(-1) for b in range(B)])
    torch.testing.assert_close(loss, -mass.log().mean())
    loss.backward()
    with torch.no_grad():
        assert aim.aim_loss(q - 0.5 * q.grad, k, cells) < loss


def test_aim_dataset_rows_mark_the_named_word_the_answer_position_and_the_cells(aim):
    from tiny import tiny_flamingo

    _, ip, tok = tiny_flamingo("llama")
    ds = aim.AimDataset(FlamingoProcessor(tok, ip), batch_size=6, start=100, image_size=32,
                        question_types=list(aim.QUESTION_TYPES.values()))
    batch = next(iter(ds))
    assert batch["vision_x"].shape[:3] == (6, 1, 1) and batch["aim_cells"].shape == (6, 49)
    index = 100
    for r in range(6):
        while ds.sample(index) is None:
            index += 1
        scene = ds.gen.scene(index, "pretrain")
        index += 1
        ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        text = tok.decode(ids)
        question = text.split("Question:")[1].split(" Short answer:")[0]
        q = next(q for q in scene.questions() if q["question"] == question)
        cells, word = aim.question_target(scene, q, 32)
        word_pos, answer_pos = batch["aim_positions"][r].tolist()
        assert tok.decode(ids[: word_pos + 1]).endswith(word)
        assert tok.decode(ids[: answer_pos + 1]).endswith("Short answer:")
        trained = [t for t in batch["labels"][r].tolist() if t != -100]
        assert tok.decode(trained).startswith(q["answer"]) and "Question" not in tok.decode(trained)
        assert batch["aim_cells"][r].nonzero().flatten().tolist() == cells
    # resuming from its position continues with the same batch
    state = ds.state_dict()
    after = next(iter(ds))
    again = aim.AimDataset(FlamingoProcessor(tok, ip), batch_size=6, start=0, image_size=32,
                           question_types=list(aim.QUESTION_TYPES.values()))
    again.load_state_dict(state)
    torch.testing.assert_close(next(iter(again))["input_ids"], after["input_ids"])
