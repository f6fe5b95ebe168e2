"""The aiming option of training (``aim:`` in the config; stages 12-14 of the built-in model): the
aiming data's targets (:mod:`flamingo_vlm.train.aiming`), the attention loss
(:mod:`flamingo_vlm.train.losses`) and the trainer with it on a tiny model whose perceiver passes a
4x4 grid of feature and colour tokens through."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from flamingo_vlm import FlamingoProcessor, create_model_and_transforms
from flamingo_vlm.modeling.feature_grid import FeatureGridEncoder
from flamingo_vlm.train import ConfigError, TrainConfig, Trainer
from flamingo_vlm.train import aiming, losses
from flamingo_vlm.train.build import aim_dataset
from tiny import tiny_lm, tiny_tokenizer


@pytest.fixture
def aim():
    """The aiming data and loss under one name (they were one script before the `aim:` option)."""
    return types.SimpleNamespace(**vars(aiming), aim_loss=losses.aim_loss)


def aimable_model(seed: int = 0):
    """Tiny model that can be aimed: a 4x4 feature grid at 32 px with colour tokens, passed through."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    encoder = FeatureGridEncoder(nn.Conv2d(3, 16, kernel_size=8, stride=8), hidden_size=16, image_size=32,
                                 position_encoding=True, color_encoding="tokens")
    return create_model_and_transforms(encoder, None, tiny_lm(vocab_size=len(tok)), tok,
                                       perceiver_kwargs={"media_passthrough": True, "depth": 1, "num_latents": 4})


def aim_config(out, weight: float = 1.0, **kw) -> TrainConfig:
    d = {"max_steps": 3, "output_dir": str(out), "log_every": 1, "checkpoint_every": 100,
         "schedule": {"warmup_steps": 0}, "optim": {"lr": 3e-3}, "progress": False, "export": False,
         "tensorboard": False, "plot": False,
         "aim": {"loss_weight": weight, "batch_size": 4, "heads": 2, "questions": ["color", "shape", "position"]}}
    d.update(kw)
    return TrainConfig.from_dict(d, require_model=False)


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


def test_aim_dataset_style_rate_draws_styled_scenes_and_moves_the_cells_with_them(aim):
    import numpy as np

    from flamingo_vlm.synthetic.icl import restyle
    from tiny import tiny_flamingo

    _, ip, tok = tiny_flamingo("llama")
    kinds = list(aim.QUESTION_TYPES.values())
    plain = aim.AimDataset(FlamingoProcessor(tok, ip), batch_size=1, start=0, image_size=32, question_types=kinds)
    styled = aim.AimDataset(FlamingoProcessor(tok, ip), batch_size=1, start=0, image_size=32, question_types=kinds,
                            style_rate=1.0)
    moved = checked = 0
    for index in range(12):
        a, b = plain.sample(index), styled.sample(index)
        if a is None:
            assert b is None
            continue
        assert a["sample"].input_ids == b["sample"].input_ids  # the same question and answer
        assert not torch.equal(a["sample"].images[0], b["sample"].images[0])
        # the target cells are those of the scene as drawn: off the grid, at the style's scale
        rng = np.random.default_rng([styled.gen.seed, 4243, index])
        rng.random()
        scene, style = restyle(styled.gen.scene(index, "pretrain"), rng)
        question = tok.decode(b["sample"].input_ids).split("Question:")[1].split(" Short answer:")[0]
        q = next(q for q in scene.questions() if q["question"] == question)
        cells, _ = aim.question_target(scene, q, 32, scale=style.scale)
        assert b["cells"].nonzero().flatten().tolist() == cells
        moved += not torch.equal(a["cells"], b["cells"])
        checked += 1
    assert checked >= 8 and moved >= 1


# -- the training option ------------------------------------------------------------------------------
def test_aim_section_reads_from_yaml_and_rejects_bad_values(tmp_path):
    path = tmp_path / "aim.yaml"
    path.write_text("model: {from_pretrained: some/model}\ndata: []\n"
                    "aim:\n  loss_weight: 0.5\n  heads: 2\n  batch_size: 8\n  start: 1300000\n"
                    "  questions: [color, count, word]\n  question_weights: {word: 4}\n")
    a = TrainConfig.from_yaml(path).aim
    assert (a.loss_weight, a.heads, a.batch_size, a.start, a.questions, a.question_weights) == (
        0.5, 2, 8, 1300000, ["color", "count", "word"], {"word": 4})
    assert a.enabled and not TrainConfig.from_dict({"model": {"from_pretrained": "m"}}).aim.enabled  # off by default
    for bad, match in [({"questions": ["colour"]}, "aim.questions"), ({"loss_weight": -1}, "aim.loss_weight"),
                       ({"question_weights": {"word": 2}}, "aim.question_weights"), ({"heads": 0}, "aim.heads"), ({"style_rate": 1.5}, "aim.style_rate"),
                       ({"episode_rate": 2}, "aim.episode_rate"), ({"episode_shots": 0}, "aim.episode_shots"),
                       ({"episode_rate": 0.5, "max_tokens": 64}, "aim.max_tokens"),
                       ({"episode_rate": 0.5, "max_tokens": 200, "questions": ["number"]}, "aim.episode_rate"),
                       ({"weight": 1}, "did you mean")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict({"model": {"from_pretrained": "m"}, "aim": bad})


def test_aim_loss_is_finite_and_reaches_the_trainable_parameters(tmp_path):
    model, ip, tok = aimable_model()
    t = Trainer(aim_config(tmp_path / "run"), model=(model, ip, tok))
    try:
        assert t.dataset_names == ["aim"] and t.datasets[0].grid == 4
        batch = t.next_batches()[0][0]
        with t.aim.capture(batch) as captured:
            t.model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"])
        assert len(captured) == len(model.gated_cross_attn_layers())
        attention = torch.stack(captured).mean()
        assert torch.isfinite(attention) and attention > 0
        attention.backward()
        moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert moved <= {n for n, p in model.named_parameters() if p.requires_grad}
        for part in (".to_q.", ".to_kv.", "perceiver.passthrough_norm.", "perceiver.layers."):
            assert any(part in n for n in moved), part
    finally:
        t.close()


def test_zero_weight_is_off_and_the_weight_adds_the_attention_loss(tmp_path):
    """weight 0: no aiming data added and the aiming batches train on their answers only; weight 1:
    the same first step's loss plus exactly the attention loss."""
    on = Trainer(aim_config(tmp_path / "on", 1.0), model=aimable_model())
    off_cfg = aim_config(tmp_path / "off", 0.0)
    model, ip, tok = aimable_model()
    data = aim_dataset(on.cfg, model, tok, ip)  # the same questions, given as an ordinary dataset
    off = Trainer(off_cfg, model=(model, ip, tok), datasets=[data], dataset_names=["aim"], loss_weights=[1.0])
    try:
        assert off.aim is None and off.dataset_names == ["aim"]
        with pytest.raises(ConfigError, match="no training data"):
            Trainer(aim_config(tmp_path / "none", 0.0), model=aimable_model())
        a, b = on.train_step(on.next_batches()), off.train_step(off.next_batches())
        assert "aim_attention" not in b and a["aim_attention"] > 0
        assert a["loss"] == pytest.approx(b["loss"] + a["aim_attention"], rel=1e-5)
    finally:
        on.close()
        off.close()


def test_a_few_steps_reduce_the_attention_loss(tmp_path):
    t = Trainer(aim_config(tmp_path / "run", 1.0), model=aimable_model())
    try:
        batches = t.next_batches()
        attention = [t.train_step(batches)["aim_attention"] for _ in range(6)]
    finally:
        t.close()
    assert all(map(torch.isfinite, torch.tensor(attention)))
    assert attention[-1] < 0.95 * attention[0], attention


def test_aim_refuses_a_model_it_cannot_aim(tmp_path):
    from tiny import tiny_flamingo

    with pytest.raises(ConfigError, match="grow-adapter .*--media-passthrough"):
        Trainer(aim_config(tmp_path / "run"), model=tiny_flamingo("llama"))


def test_episode_rows_aim_at_the_query_image_in_any_wording(aim):
    """episode_rate 1: every row is an in-context episode; the cells are the query's named object
    (as its scene says, whatever the phrasing), the positions its naming word and the end of its
    prompt, only the query's answer is trained and ``aim_media`` is the query's image."""
    from flamingo_vlm.synthetic.icl import icl_episode
    from tiny import tiny_flamingo

    _, ip, tok = tiny_flamingo("llama")
    kinds = ["color", "shape", "position", "count", "word"]
    ds = aim.AimDataset(FlamingoProcessor(tok, ip), batch_size=6, start=0, image_size=32, max_tokens=400,
                        episode_rate=1.0, episode_shots=3, episode_types=kinds)
    seen = set()
    for index in range(15):
        row = ds.sample(index)
        ids, images = row["sample"].input_ids, row["sample"].images
        assert row["media"] == len(images) - 1 and 2 <= len(images) <= 4
        text = tok.decode(ids)
        assert text.count("<image>") == len(images)
        query = text.split("<image>")[-1]
        word_pos, prompt_pos = row["positions"]
        named = tok.decode(ids[: word_pos + 1])
        assert "<image>" in named and named.rsplit("<image>", 1)[1] in query  # the word is in the query's chunk
        trained = tok.decode([t for t, keep in zip(ids, row["sample"].trainable) if keep])
        prompt = tok.decode(ids[: prompt_pos + 1]).rsplit("<image>", 1)[1]
        assert query.startswith(prompt) and trained.strip().startswith(query[len(prompt):].strip()[:3])
        # the target: recomputed from the episode's own scene with the objects' attributes
        rng = __import__("numpy").random.default_rng([ds.gen.seed, 4245, index])
        shots = int(rng.integers(1, 4))
        qtype = kinds[int(rng.integers(len(kinds)))]
        ep = icl_episode(index, split="train", shots=shots, qtype=qtype, generator=ds.gen)
        scene, question, _ = ep.query
        assert question in query and len(images) == shots + 1
        if qtype in ("color", "shape", "position"):
            obj = next(o for o in scene.objects if (o.color if qtype == "color" else o.shape if qtype == "shape"
                                                    else o.position) == ep.value
                       and (qtype != "position" or (o.color in question and o.shape in question)))
            cells = aim.object_cells(obj, 7, ep.style.scale)
            assert set(cells) <= set(row["cells"].nonzero().flatten().tolist())
            assert named.rstrip().lower().endswith(obj.shape if qtype != "shape" else obj.color)
        seen.add(qtype)
    assert seen >= {"color", "shape", "count"}
    batch = next(iter(ds))
    assert batch["aim_media"].tolist() == [int(n) for n in (batch["vision_x"].abs().flatten(2).sum(-1) > 0).sum(1) - 1]


def test_the_attention_loss_reads_the_query_image_of_an_episode_row(tmp_path):
    """With ``aim_media`` the loss sees only that image's keys: cells marked in another image do not count."""
    t = Trainer(aim_config(tmp_path / "run", 1.0, aim={"loss_weight": 1.0, "batch_size": 2, "heads": 2,
                                                       "questions": ["color", "shape"], "episode_rate": 1.0,
                                                       "episode_shots": 2, "max_tokens": 400}),
                model=aimable_model())
    try:
        batch = t.next_batches()[0][0]
        assert batch["vision_x"].shape[1] >= 2 and (batch["aim_media"] >= 1).all()
        with t.aim.capture(batch) as on_query:
            t.model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"])
        moved = dict(batch, vision_x=batch["vision_x"].clone())
        first = moved["vision_x"][:, 0].clone()
        moved["vision_x"][:, 0] = torch.rand_like(first)  # another image changes; the query's loss does not
        with t.aim.capture(moved) as after:
            t.model(moved["vision_x"], moved["input_ids"], attention_mask=moved["attention_mask"])
        torch.testing.assert_close(torch.stack(on_query), torch.stack(after))
        step = t.train_step(t.next_batches())
        assert torch.isfinite(torch.tensor(step["aim_attention"]))
    finally:
        t.close()
