"""Training: config, loss/accumulation/clipping, precisions, LoRA, DDP/FSDP2 equivalence, non-finite
skips in sync, exact resume after SIGKILL, CLI errors. Tiny models, 2 CPU processes at most."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import flamingo_vlm
from flamingo_vlm.train import Callback, ConfigError, TrainConfig, Trainer, train
from flamingo_vlm.modeling import kernels
from flamingo_vlm.train import trainer as trainer_mod
from flamingo_vlm.train.checkpoint import list_checkpoints
from flamingo_vlm.train.metrics import read_metrics
from flamingo_vlm.train.optim import lr_factor, param_groups
from tiny import tiny_flamingo

SRC = str(Path(flamingo_vlm.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Flamingo (LLaMA LM, cross-attention every layer) in the from_pretrained format."""
    model, ip, tok = tiny_flamingo("llama", every=1, seed=0)
    out = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(out, tokenizer=tok, image_processor=ip)
    return out


@pytest.fixture(scope="module")
def media_id(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["media_token_id"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Interleaved and pair shards written with the data pipeline's write_shards."""
    from PIL import Image

    from flamingo_vlm.data.custom import write_shards

    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    words = "a red car . two cats on the big green dog image photo of small blue square".split()
    for i in range(10):
        arr = torch.randint(0, 256, (36, 40, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"im{i}.png")

    def sentence(k):
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        return " ".join(words[j] for j in idx)

    with open(root / "docs.jsonl", "w") as f:
        for i in range(12):
            items = []
            for j in range(1 + i % 3):
                items += [{"image": f"im{(i + j) % 10}.png"}, {"text": sentence(5 + j)}]
            f.write(json.dumps({"items": items}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"items": [{"image": f"im{i % 10}.png"}, {"text": sentence(4)}]}) + "\n")
    write_shards(root / "docs.jsonl", root / "interleaved", kind="interleaved", samples_per_shard=5)
    write_shards(root / "pairs.jsonl", root / "pairs", kind="pairs", samples_per_shard=5)
    return {"interleaved": root / "interleaved", "pairs": root / "pairs"}


class FakeData:
    """The ShardDataset interface on random token data. Each step has one *global* batch of
    ``global_batch`` rows; with ``world`` ranks, rank r yields rows [r*b, (r+1)*b)."""

    def __init__(self, seed: int, media: int, rank: int = 0, world: int = 1, global_batch: int = 4, length: int = 24):
        self.seed, self.media, self.rank, self.world = seed, media, rank, world
        self.global_batch, self.length, self.k = global_batch, length, 0

    def state_dict(self):
        return {"epoch": 0, "batches": self.k}

    def load_state_dict(self, state):
        self.k = state["batches"]

    def global_batch_at(self, k: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 10_000 + k)
        B, L = self.global_batch, self.length
        ids = torch.randint(0, 280, (B, L), generator=g)
        ids[:, 0] = self.media
        ids[:, L // 2] = self.media
        mask = torch.ones_like(ids)
        for r in range(B):  # ragged right padding
            pad = int(torch.randint(0, L // 3, (1,), generator=g))
            if pad:
                mask[r, -pad:] = 0
        labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == self.media, -100)
        vision_x = torch.randn(B, 2, 1, 3, 32, 32, generator=g)
        return {"vision_x": vision_x, "input_ids": ids, "attention_mask": mask, "labels": labels}

    def __iter__(self):
        while True:
            batch = self.global_batch_at(self.k)
            self.k += 1
            per = self.global_batch // self.world
            rows = slice(self.rank * per, (self.rank + 1) * per)
            yield {k: v[rows] for k, v in batch.items()}


def make_config(model_dir, out, **kw) -> TrainConfig:
    d = {
        "model": {"from_pretrained": str(model_dir)},
        "max_steps": 3, "checkpoint_every": 100, "output_dir": str(out), "log_every": 1,
        "schedule": {"warmup_steps": 0}, "optim": {"lr": 1e-3}, "progress": False, "export": False,
        "tensorboard": False, "plot": False,
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return TrainConfig.from_dict(d)


def fake_mixture(media: int, rank: int = 0, world: int = 1, global_batch: int = 4):
    return dict(
        datasets=[FakeData(1, media, rank, world, global_batch), FakeData(2, media, rank, world, global_batch)],
        dataset_names=["pairs", "interleaved"],
        loss_weights=[0.2, 1.0],
    )


def trainable_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if p.requires_grad])


# -- config ------------------------------------------------------------------------------------------
def test_config_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: {from_pretrained: some/dir}\n"
        "data:\n  - {kind: pairs, urls: a.tar}\n  - {kind: interleaved, urls: [b.tar], batch_size: 4}\n"
        "optim: {lr: 1e-4}\nprecision: amp_bf16\n"
    )
    cfg = TrainConfig.from_yaml(path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.1
    assert [d.effective_loss_weight() for d in cfg.data] == [0.2, 1.0]  # the paper's defaults
    # a run's only dataset: 1 (a lone pairs dataset's loss was shown at a fifth of the per-token loss)
    assert cfg.data[0].effective_loss_weight(alone=True) == 1.0
    assert cfg.override(["data.0.loss_weight=0.3"]).data[0].effective_loss_weight(alone=True) == 0.3
    assert cfg.data[0].urls == ["a.tar"]
    cfg2 = cfg.override(["optim.lr=3e-4", "schedule.kind=cosine", "data.1.loss_weight=0.5"])
    assert cfg2.optim.lr == 3e-4 and cfg2.schedule.kind == "cosine" and cfg2.data[1].effective_loss_weight() == 0.5
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        TrainConfig.from_dict({"model": {"from_pretrained": "x"}, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="did you mean 'lr'"):  # (other frameworks' name: too far for difflib)
        TrainConfig.from_dict({"model": {"from_pretrained": "x"}, "optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig.from_dict({"model": {"from_pretrained": "x"}, "precision": "fp16"})
    with pytest.raises(ConfigError, match="remove model.lm"):
        TrainConfig.from_dict({"model": {"from_pretrained": "x", "lm": "y"}})
    with pytest.raises(ConfigError, match="model needs"):
        TrainConfig.from_dict({})
    answers = {"model": {"from_pretrained": "x"}, "data": [{"urls": ["a.tar"], "loss_after": ["Short answer:"]}]}
    assert TrainConfig.from_dict(answers).data[0].loss_after == ["Short answer:"]
    with pytest.raises(ConfigError, match="loss_after must be list"):
        TrainConfig.from_dict({**answers, "data": [{"urls": ["a.tar"], "loss_after": "Short answer:"}]})
    with pytest.raises(ConfigError, match="loss_after must be a list of non-empty marker strings"):
        TrainConfig.from_dict({"model": {"from_pretrained": "x"}, "data": [{"urls": ["a.tar"], "loss_after": [3]}]})


def test_override_of_a_list_entry_that_is_not_there_is_named():
    """--set data.5.batch_size=2 with one dataset raised a bare IndexError (a traceback)."""
    cfg = TrainConfig.from_dict({"model": {"from_pretrained": "x"}, "data": [{"kind": "pairs", "urls": ["a.tar"]}]})
    assert cfg.override(["data.0.batch_size=2"]).data[0].batch_size == 2
    for bad in ("data.5.batch_size=2", "data.x.batch_size=2", "data.1=3"):
        with pytest.raises(ConfigError, match=rf"override '{re.escape(bad)}': data has 1 entry; give an index 0..0"):
            cfg.override([bad])


def test_a_broken_yaml_file_is_one_line_naming_the_file_and_place(tmp_path):
    """PyYAML's message spans lines and names '<unicode string>'; a binary file raised a bare decode error."""
    bad = tmp_path / "train.yaml"
    bad.write_text("model:\n  from_pretrained: x\n max_steps: 3\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_yaml(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and "line 3, column 2" in str(e.value)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ConfigError, match=f"{bad}.*UTF-8"):
        TrainConfig.from_yaml(bad)


def test_schedules():
    from flamingo_vlm.train.config import ScheduleConfig

    warm = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_factor(s, warm, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = ScheduleConfig(kind="linear", warmup_steps=0)
    assert lr_factor(0, lin, 10) == 1.0 and lr_factor(5, lin, 10) == 0.5 and lr_factor(10, lin, 10) == 0.0
    cos = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(2, cos, 12) == pytest.approx(1.0) and lr_factor(12, cos, 12) == pytest.approx(0.1)
    assert lr_factor(7, cos, 12) == pytest.approx(0.55)


def test_weight_decay_on_cross_attention_only():
    from flamingo_vlm.train.config import OptimConfig

    model, _, _ = tiny_flamingo("llama", every=1)
    groups = param_groups(model, OptimConfig())
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and all("gated_cross_attn_layer" in n for n in decay["names"])
    assert no_decay["weight_decay"] == 0.0
    assert any(n.startswith("perceiver.") for n in no_decay["names"])
    assert any(n.endswith("new_weight") for n in no_decay["names"])
    assert not any("gated_cross_attn_layer" in n for n in no_decay["names"])


def test_gate_lr_scale_gives_gates_their_own_undecayed_group():
    from flamingo_vlm.train.config import OptimConfig, ScheduleConfig
    from flamingo_vlm.train.optim import build_optimizer, build_scheduler

    model, _, _ = tiny_flamingo("llama", every=1)
    cfg = OptimConfig(lr=1e-3, gate_lr_scale=20.0)
    groups = param_groups(model, cfg)
    gates = groups[-1]
    assert gates["lr"] == pytest.approx(2e-2) and gates["weight_decay"] == 0.0
    assert sorted({n.rsplit(".", 1)[1] for n in gates["names"]}) == ["attn_gate", "ff_gate"]
    assert not any(n.endswith("_gate") for g in groups[:-1] for n in g["names"])
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, ScheduleConfig(kind="constant", warmup_steps=2), 10)
    assert [g["lr"] for g in opt.param_groups][-1] == pytest.approx(1e-2)  # warmup scales every group
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    del sched
    assert len(param_groups(model, OptimConfig())) == 2  # scale 1.0: OpenFlamingo's grouping


def test_gate_init_opens_every_gate():
    from flamingo_vlm.train.config import ConfigError
    from flamingo_vlm.train.build import set_gates

    model, _, _ = tiny_flamingo("llama", every=1)
    set_gates(model, 0.25)
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]
    assert len(gates) == 2 * len(model.lang_encoder.model.layers)
    assert all(torch.tanh(p).item() == pytest.approx(0.25) for p in gates)
    with pytest.raises(ConfigError, match="must be in"):
        set_gates(model, 1.0)


# -- the step ----------------------------------------------------------------------------------------
def test_accumulation_is_exact_and_clips_once_per_step(model_dir, media_id, tmp_path, monkeypatch):
    """grad_accum=2 with batch 2 == grad_accum=1 with batch 4 (token-count normalisation over the
    whole step), and the gradient is clipped once per optimizer step (not per micro-batch)."""
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: calls.append(m) or real(p, m))

    def run(accum, batch, out):
        cfg = make_config(model_dir, tmp_path / out, grad_accum=accum, optim={"max_grad_norm": 0.05})
        mix = fake_mixture(media_id, global_batch=4)
        if accum > 1:  # micro-batches 2k, 2k+1 of the accumulating run = rows of global batch k
            mix["datasets"] = [_Halves(d) for d in mix["datasets"]]
        t = Trainer(cfg, **mix)
        try:
            res = t.fit()
        finally:
            t.close()
        return res.history, trainable_vector(t.flamingo)

    h1, w1 = run(1, 4, "a")
    assert len(calls) == 3
    h2, w2 = run(2, 2, "b")
    assert len(calls) == 6  # 3 steps x 1 clip, with 2 micro-batches x 2 datasets per step
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["grad_norm"] > 0.05  # so clipping really scaled the update
    # Adam amplifies float-order noise of near-zero gradients: allow 1% of one lr-sized step.
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-4)


class _Halves:
    """Splits each batch of ``inner`` into two micro-batches (top rows, then bottom rows)."""

    def __init__(self, inner):
        self.inner = inner

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)

    def __iter__(self):
        for batch in self.inner:
            half = batch["input_ids"].shape[0] // 2
            yield {k: v[:half] for k, v in batch.items()}
            yield {k: v[half:] for k, v in batch.items()}


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16"])
def test_bf16_precisions_train_and_keep_token_ids_int64(model_dir, media_id, tmp_path, precision):
    seen = []
    t = Trainer(make_config(model_dir, tmp_path, precision=precision, max_steps=2), **fake_mixture(media_id))
    try:
        emb = t.flamingo.lang_encoder.get_input_embeddings()
        emb.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        before = trainable_vector(t.flamingo)
        res = t.fit()
    finally:
        t.close()
    assert seen and all(d == torch.int64 for d in seen)
    assert all(math.isfinite(h["loss"]) and not h["skipped"] for h in res.history)
    want = torch.bfloat16 if precision == "bf16" else torch.float32  # amp_bf16: back to fp32 at close()
    assert {p.dtype for p in t.flamingo.parameters() if p.is_floating_point()} == {want}
    assert not torch.equal(before, trainable_vector(t.flamingo))


@pytest.mark.parametrize("has_bf16, upcast", [(False, False), (False, True), (True, False)])
def test_bf16_on_a_cpu_without_fast_bf16_warns_and_says_how_it_runs(model_dir, media_id, tmp_path, monkeypatch, caplog,
                                                                    has_bf16, upcast):
    monkeypatch.setattr(trainer_mod, "fast_bf16", lambda device=None: has_bf16)
    monkeypatch.setattr(trainer_mod, "decide", lambda part: upcast if part == "bf16_gemm" else False)
    for precision in ("amp_bf16", "fp32"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="flamingo_vlm.train"):
            t = Trainer(make_config(model_dir, tmp_path / precision, precision=precision, max_steps=1),
                        **fake_mixture(media_id))
            t.close()
        msgs = [r.getMessage() for r in caplog.records if "bf16 is not faster than fp32" in r.getMessage()]
        assert bool(msgs) == (precision == "amp_bf16" and not has_bf16)
        if msgs:
            assert ("as fp32 GEMMs" in msgs[0]) is upcast and ("consider --precision fp32" in msgs[0]) is not upcast
        # the linears are routed per call (None) where only the bf16 products change route
        assert t.onednn is (None if upcast and precision == "amp_bf16" else False)


def test_gradient_checkpointing_recomputes_and_gives_the_same_losses(model_dir, media_id, tmp_path):
    losses = {}
    for gc in (False, True, "lm"):
        cfg = make_config(model_dir, tmp_path / str(gc), model={"gradient_checkpointing": gc}, max_steps=2)
        t = Trainer(cfg, **fake_mixture(media_id))
        calls = {"lm": 0, "xattn": 0}
        layer = t.flamingo.decoder_layers()[0]
        # transformers checkpoints the layer's forward, not __call__: count a submodule's calls.
        layer.decoder_layer.self_attn.register_forward_pre_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1))
        layer.gated_cross_attn_layer.register_forward_pre_hook(lambda *a: calls.__setitem__("xattn", calls["xattn"] + 1))
        try:
            losses[gc] = [h["loss"] for h in t.fit().history]
        finally:
            t.close()
        # 2 steps x 2 datasets, +2 forwards for the one-off chunked-loss check; recomputation doubles the
        # rest (pre-hooks: checkpoint recomputation stops early, before forward hooks would run).
        per = {False: (1, 1), True: (2, 2), "lm": (2, 1)}[gc]
        assert calls == {"lm": 2 + 4 * per[0], "xattn": 2 + 4 * per[1]}, (gc, calls)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert losses["lm"] == pytest.approx(losses[False], rel=1e-6)


def test_frozen_bf16_under_autocast_trains_bitwise_the_same_and_exports_exact_backbones(
        model_dir, media_id, tmp_path):
    """amp_bf16 with the frozen linear/convolution weights stored in bf16 (the default for a model the
    trainer builds) computes what autocast computes from fp32 weights, bit for bit; the export still
    writes the backbones' original fp32 weights; close() hands the model back in fp32."""
    from flamingo_vlm.pretrained import from_pretrained

    runs = {}
    for frozen in (False, None):
        cfg = make_config(model_dir, tmp_path / str(frozen), precision="amp_bf16", frozen_bf16=frozen, export=True)
        t = Trainer(cfg, **fake_mixture(media_id))
        try:
            lm = t.flamingo.lang_encoder
            dtypes = {n: p.dtype for n, p in t.flamingo.named_parameters()}
            res = t.fit()
            # right after fit() the model generates outside autocast (its frozen weights are fp32 again)
            assert {p.dtype for p in t.flamingo.parameters()} == {torch.float32}
            ids = torch.tensor([[media_id, 5, 6]])
            t.flamingo.eval().generate(torch.zeros(1, 1, 1, 3, 32, 32), ids, torch.ones_like(ids), max_new_tokens=2)
        finally:
            t.close()
        runs[frozen] = (res, trainable_vector(t.flamingo), dtypes)
        assert {p.dtype for p in t.flamingo.parameters()} == {torch.float32}
    (ref, ref_w, ref_dt), (got, got_w, got_dt) = runs[False], runs[None]
    assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]
    assert [h["grad_norm"] for h in got.history] == [h["grad_norm"] for h in ref.history]
    assert torch.equal(ref_w, got_w)
    assert set(ref_dt.values()) == {torch.float32}
    cast = {n for n, d in got_dt.items() if d == torch.bfloat16}
    frozen_names = {n for n, p in t.flamingo.named_parameters() if not p.requires_grad}
    assert cast and cast <= frozen_names
    assert any(n.startswith("vision_encoder.") for n in cast) and any(n.startswith("lang_encoder.") for n in cast)
    assert not any("norm" in n or "embed" in n for n in cast)  # LayerNorms and embeddings stay fp32
    assert lm.get_output_embeddings().weight.dtype == torch.float32
    source, exported = from_pretrained(model_dir)[0], from_pretrained(got.export_dir)[0]
    want = {n: p for n, p in source.named_parameters() if not p.requires_grad}
    for n, p in exported.named_parameters():
        # (the input/output embeddings hold the trained new-token rows)
        backbone = n.split(".")[0] in ("vision_encoder", "lang_encoder")
        if n in want and backbone and "embed" not in n and "head" not in n:
            assert p.dtype == torch.float32 and torch.equal(p, want[n]), n


def test_lean_backward_under_autocast_trains_like_the_stock_graph(model_dir, media_id, tmp_path):
    """lean_backward under bf16 autocast (train.lean; tests/test_lean.py checks its gradients): the
    first step's forward is bitwise the stock one and its gradients agree to bf16 rounding; later
    steps start from weights that differ by rounding, so they agree loosely."""
    runs = {}
    for lean in (False, True):
        cfg = make_config(model_dir, tmp_path / str(lean), precision="amp_bf16", lean_backward=lean)
        t = Trainer(cfg, **fake_mixture(media_id))
        try:
            runs[lean] = (t.fit().history, trainable_vector(t.flamingo))
        finally:
            t.close()
    (ref, ref_w), (got, got_w) = runs[False], runs[True]
    assert got[0]["loss"] == ref[0]["loss"]
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-2)
    for a, b in zip(ref[1:], got[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    assert torch.allclose(ref_w, got_w, rtol=0, atol=3 * 1e-3 * len(ref))  # (AdamW moves a weight <= ~lr per step)


@pytest.mark.skipif(not kernels.onednn_available(), reason="this torch has no oneDNN linear kernel (no routing)")
def test_amp_bf16_with_its_products_as_fp32_gemms_trains_like_torchs_bf16(model_dir, media_id, tmp_path, fresh,
                                                                          monkeypatch):
    """Where bf16 is emulated (the ``bf16_gemm`` choice), amp_bf16's linear products, forward and
    backward, and its attention backward run in fp32 on the bf16 values: the losses and gradient norms
    are torch's bf16 ones up to rounding, and the route is taken (tests/test_bf16_upcast.py checks
    the kernels themselves)."""
    from flamingo_vlm.modeling import attention, fast_linear

    kernels._MEMO["gemm"] = False
    calls = {"linear": 0, "attention": 0}
    real_linear, real_apply = fast_linear.upcast_linear, attention._Fp32Backward.apply

    def counted_linear(*a):
        calls["linear"] += 1
        return real_linear(*a)

    def counted_apply(*a):
        calls["attention"] += 1
        return real_apply(*a)

    monkeypatch.setattr(fast_linear, "upcast_linear", counted_linear)
    monkeypatch.setattr(attention._Fp32Backward, "apply", counted_apply)
    runs = {}
    for upcast in (False, True):
        kernels._MEMO["bf16_gemm"] = upcast
        cfg = make_config(model_dir, tmp_path / str(upcast), precision="amp_bf16")
        t = Trainer(cfg, **fake_mixture(media_id))
        try:
            runs[upcast] = t.fit().history
        finally:
            t.close()
        assert (calls["linear"] > 0 and calls["attention"] > 0) is upcast
    ref, got = runs[False], runs[True]
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-2)
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=3e-2)
    for a, b in zip(ref[1:], got[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


def test_frozen_matrices_leave_no_tensor_reading_a_mapped_weights_file(tmp_path):
    """transformers maps an fp32 checkpoint and makes its tensors views of the file; once the frozen
    matrices are bf16 copies, what stays (a LayerNorm) is copied too, so the mapping can go."""
    from flamingo_vlm.train.fastpath import _file_ranges, frozen_matrices_to

    if not _file_ranges():
        pytest.skip("no /proc/self/maps here")
    path = tmp_path / "weights.bin"
    src = torch.randn(8 * 8 + 8 + 8)
    path.write_bytes(src.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=True, size=src.numel(), dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.LayerNorm(8))
    with torch.no_grad():
        model[0].weight.data = mapped[:64].view(8, 8)
        model[1].weight.data, model[1].bias.data = mapped[64:72], mapped[72:80]
    for p in model.parameters():
        p.requires_grad_(False)

    def in_file(t):
        return any(a <= t.untyped_storage().data_ptr() < b for a, b in _file_ranges())

    assert all(in_file(p) for p in model.parameters())
    cast = frozen_matrices_to(model, torch.bfloat16)
    assert [(type(m).__name__, n) for m, n in cast] == [("Linear", "weight")]
    assert not any(in_file(p) for p in model.parameters())
    assert torch.equal(model[0].weight, src[:64].view(8, 8).bfloat16())
    assert model[1].weight.dtype == torch.float32 and torch.equal(model[1].weight, src[64:72])


def test_glibc_reuse_sets_glibcs_thresholds_only_without_a_preloaded_allocator(monkeypatch):
    import ctypes

    from flamingo_vlm.train import fastpath

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert not fastpath.glibc_reuse_freed_memory() and calls == []
    monkeypatch.delenv("LD_PRELOAD")
    assert fastpath.glibc_reuse_freed_memory()
    assert dict(calls) == {-3: 32 << 20, -1: 8 << 30, -2: 256 << 20}  # mmap threshold, trim threshold, top pad



def test_a_config_built_in_code_is_checked_by_the_trainer(model_dir, media_id, tmp_path):
    from flamingo_vlm.train.config import ConfigError

    for bad, message in (({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
                         ({"precision": "fp16"}, "precision"), ({"max_steps": 0}, "max_steps must be >= 1")):
        cfg = make_config(model_dir, tmp_path / "ok")
        for key, value in bad.items():
            setattr(cfg, key, value)  # (from_dict/from_yaml would have refused it)
        with pytest.raises(ConfigError, match=message):
            Trainer(cfg, **fake_mixture(media_id))
        assert not (tmp_path / "ok" / "checkpoints").exists()

def test_frozen_bf16_refuses_combinations_it_cannot_serve(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs precision: amp_bf16"):
        make_config(model_dir, tmp_path, frozen_bf16=True)
    with pytest.raises(ConfigError, match="LoRA"):
        make_config(model_dir, tmp_path, precision="amp_bf16", frozen_bf16=True, lora={"enabled": True})


def test_fast_paths_compute_the_same_training(model_dir, media_id, tmp_path, monkeypatch):
    """oneDNN GEMMs (forced on: forward and backward), the chunked loss and the GELU recomputation
    give the losses and gradients of the plain implementation."""
    from flamingo_vlm.modeling import kernels

    plain = make_config(model_dir, tmp_path / "plain", chunked_loss=False, cpu_matmul="default", lean_backward=False)
    before = kernels.calls
    ref = train(plain, **fake_mixture(media_id)).history
    assert kernels.calls == before  # "default": torch's kernels only
    fast = make_config(model_dir, tmp_path / "fast", chunked_loss=True, cpu_matmul="onednn", lean_backward=True)
    t = Trainer(fast, **fake_mixture(media_id))
    try:
        got = t.fit().history
        assert t.chunked_loss and kernels.calls > before
    finally:
        t.close()
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_chunked_loss_falls_back_when_logits_are_transformed_after_the_head(model_dir, media_id, tmp_path):
    t = Trainer(make_config(model_dir, tmp_path, max_steps=1), **fake_mixture(media_id))
    try:
        def scale(module, args, out):  # e.g. a logit soft-cap or scale applied after lm_head
            out["logits"] = out.logits * 2.0
            return out

        t.flamingo.lang_encoder.register_forward_hook(scale)
        t.fit()
        assert t.chunked_loss is False
    finally:
        t.close()


def test_the_chunked_loss_check_runs_once_on_the_row_with_the_most_trained_tokens(model_dir, media_id, tmp_path):
    t = Trainer(make_config(model_dir, tmp_path, max_steps=2), **fake_mixture(media_id))
    try:
        batch = t.next_batches()[0][0]
        labels = batch["labels"].clone()
        labels[:, 1:] = -100
        labels[2, 1:4] = 5  # row 2: the only trained tokens
        check = trainer_mod._check_row({**batch, "labels": labels, "aim_cells": torch.ones(len(labels), 3)})
        assert set(check) == {"vision_x", "input_ids", "attention_mask", "labels"}
        assert torch.equal(check["input_ids"], batch["input_ids"][2:3])
        assert torch.equal(check["vision_x"], batch["vision_x"][2:3])
        rows = []
        t.flamingo.register_forward_pre_hook(lambda m, args: rows.append((args[1].shape[0], torch.is_grad_enabled())))
        t.fit()
        assert t.chunked_loss is True
        # two forwards of one row without gradients, once; then the steps' forwards of whole batches
        assert rows[:2] == [(1, False), (1, False)]
        assert all(n > 1 and grad for n, grad in rows[2:]) and len(rows) == 2 + 2 * 2
    finally:
        t.close()


def test_a_second_trainer_on_the_same_output_dir_is_refused(model_dir, media_id, tmp_path):
    """A second run resuming a directory that a live run writes would interleave their checkpoints
    and metrics: it is refused before it writes anything, and allowed once the first has finished."""
    from flamingo_vlm.locking import DirectoryBusy

    first = Trainer(make_config(model_dir, tmp_path, max_steps=1), **fake_mixture(media_id))
    try:
        config_text = (tmp_path / "config.yaml").read_text()
        with pytest.raises(DirectoryBusy, match=rf"pid {os.getpid()}\b"):
            Trainer(make_config(model_dir, tmp_path, max_steps=3, resume="auto"), **fake_mixture(media_id))
        assert (tmp_path / "config.yaml").read_text() == config_text
        first.fit()
    finally:
        first.close()
    second = Trainer(make_config(model_dir, tmp_path, max_steps=2, resume="auto"), **fake_mixture(media_id))
    try:
        assert second.fit().step == 2
    finally:
        second.close()


def test_lora_adds_trainable_adapters_trains_and_exports(model_dir, media_id, tmp_path):
    cfg = make_config(model_dir, tmp_path / "run", max_steps=2, export=True,
                      lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]})
    t = Trainer(cfg, **fake_mixture(media_id))
    try:
        lora = {n: p.detach().clone() for n, p in t.flamingo.named_parameters() if "lora_" in n}
        assert lora and all(t.flamingo.get_parameter(n).requires_grad for n in lora)
        assert all(".decoder_layer." in n and ("q_proj" in n or "v_proj" in n) for n in lora)
        assert any("gated_cross_attn_layer" in n for n in t.trainable_names)  # still trains
        res = t.fit()
    finally:
        t.close()
    # lora_B starts at zero; after two steps the adapters have moved.
    assert any(not torch.equal(v, t.flamingo.get_parameter(n)) for n, v in lora.items() if "lora_B" in n)
    loaded, _, _ = flamingo_vlm.load_pretrained(res.export_dir)  # merged into an embedded LM
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    with pytest.raises(ConfigError, match="match no linear layer"):
        Trainer(make_config(model_dir, tmp_path / "bad", lora={"enabled": True, "target_modules": ["nope"]}),
                **fake_mixture(media_id))


# -- distributed ---------------------------------------------------------------------------------------
class NaNOn(Callback):
    """Makes the loss NaN at ``step`` on ``rank`` (every rank when None)."""

    def __init__(self, step: int, rank: int | None = None):
        self.step, self.rank = step, rank

    def on_loss(self, trainer, step, micro, dataset, loss):
        if step == self.step and (self.rank is None or trainer.info.rank == self.rank) and micro == 0:
            return loss * float("nan")
        return loss


def _worker(rank, world, port, model_dir, out, mode, media, kwargs, nan_rank, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = make_config(model_dir, out, distributed=mode, **kwargs)
    callbacks = [NaNOn(3, nan_rank)] if nan_rank is not None else []
    t = Trainer(cfg, callbacks=callbacks, **fake_mixture(media, rank, world, global_batch=4))
    try:
        res = t.fit()
        from flamingo_vlm.train.checkpoint import gather_trainable

        weights = torch.cat([v.float().flatten() for v in gather_trainable(t.flamingo).values()])
    finally:
        t.close()
    # DDP's C++ reducer owned the process group and freed it holding the GIL when the trainer was
    # dropped after close(): a deadlock with gloo's worker threads (see distributed.release)
    owns_group = getattr(t.model, "reducer", None) is not None
    torch.save({"history": res.history, "weights": weights, "owns_group": owns_group},
               Path(result_dir) / f"rank{rank}.pt")


def _spawn(mode, model_dir, tmp_path, media, kwargs, nan_rank=None):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"run-{mode}"
    mp.spawn(_worker, args=(2, port, str(model_dir), str(out), mode, media, kwargs, nan_rank, str(tmp_path)),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single(model_dir, media, out, kwargs, nan=False):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = Trainer(make_config(model_dir, out, **kwargs), callbacks=[NaNOn(3)] if nan else [],
                    **fake_mixture(media, global_batch=4))
        try:
            res = t.fit()
        finally:
            t.close()
    finally:
        torch.set_num_threads(threads)
    return res.history, trainable_vector(t.flamingo)


def _same_losses(a, b, rtol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["skipped"] == y["skipped"]
        if math.isnan(x["loss"]):
            assert math.isnan(y["loss"])
        else:
            assert x["loss"] == pytest.approx(y["loss"], rel=rtol), (a, b)


def test_ddp_two_processes_equal_one_process_and_skip_nonfinite_together(model_dir, media_id, tmp_path):
    """2 ranks x batch 2 under DDP (with accumulation) == 1 process x batch 4; a NaN on rank 1 only at
    step 3 makes both ranks skip that update and stay identical."""
    kwargs = {"max_steps": 4, "grad_accum": 2}
    ranks = _spawn("ddp", model_dir, tmp_path, media_id, kwargs, nan_rank=1)
    single, w_single = _single(model_dir, media_id, tmp_path / "single", kwargs, nan=True)
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert [h["skipped"] for h in h0] == [0, 0, 1, 0] == [h["skipped"] for h in h1]
    assert not ranks[0]["owns_group"] and not ranks[1]["owns_group"]  # close() freed the reducer
    _same_losses(h0, h1, rtol=0)  # every logged value is global
    _same_losses(h0, single, rtol=1e-5)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    torch.testing.assert_close(ranks[0]["weights"], w_single, rtol=1e-4, atol=1e-4)


def test_fsdp2_matches_ddp(model_dir, media_id, tmp_path):
    """FSDP2 (2 ranks) == one process == DDP (previous test); the export gathers the shards."""
    kwargs = {"max_steps": 3, "export": True}
    ranks = _spawn("fsdp", model_dir, tmp_path, media_id, kwargs)
    single, w_single = _single(model_dir, media_id, tmp_path / "single", {"max_steps": 3})
    _same_losses(ranks[0]["history"], single, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["weights"], w_single, rtol=1e-4, atol=1e-4)
    exported, _, _ = flamingo_vlm.load_pretrained(tmp_path / "run-fsdp" / "final")
    got = torch.cat([p.detach().flatten() for p in exported.parameters() if p.requires_grad])
    assert torch.equal(got, ranks[0]["weights"])


# -- resume ------------------------------------------------------------------------------------------
def _write_yaml(path: Path, model_dir, shards, out, **extra) -> Path:
    import yaml

    cfg = {
        "model": {"from_pretrained": str(model_dir)},
        "data": [
            {"kind": "pairs", "urls": [str(shards["pairs"])], "batch_size": 2},
            {"kind": "interleaved", "urls": [str(shards["interleaved"] / "interleaved-{000000..000002}.tar")],
             "batch_size": 2, "max_tokens": 48},
        ],
        "optim": {"lr": 1e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "max_steps": 8, "checkpoint_every": 2, "keep_last": 2, "log_every": 1, "output_dir": str(out),
        "progress": False,
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# Runs the training CLI and SIGKILLs the process right after optimizer step KILL_AT is logged (before
# that step's checkpoint would be written): a crash at the worst moment, patched in from outside.
_KILL_AT_STEP = """
import os, signal, sys
from flamingo_vlm.train import metrics
from flamingo_vlm.train.cli import main
kill_at, progress = int(sys.argv[1]), metrics.Sinks.progress
def killing_progress(self, step, record):
    progress(self, step, record)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
metrics.Sinks.progress = killing_progress
sys.exit(main(sys.argv[2:]))
"""


def _cli(args, env_extra=None, check=True, kill_at_step=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = ["-m", "flamingo_vlm.train"] if kill_at_step is None else ["-c", _KILL_AT_STEP, str(kill_at_step)]
    proc = subprocess.run([sys.executable, *command, *args], env=env, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_sigkill_and_resume_is_bitwise_identical_on_real_shards(model_dir, shards, tmp_path, capsys):
    """End to end on shards written by write_shards: a run SIGKILLed after step 5 (last checkpoint:
    step 4) and resumed with --resume logs exactly the losses of an uninterrupted run."""
    full = _write_yaml(tmp_path / "full.yaml", model_dir, shards, tmp_path / "full")
    _cli(["--config", str(full)])
    killed = _write_yaml(tmp_path / "killed.yaml", model_dir, shards, tmp_path / "killed")
    proc = _cli(["--config", str(killed)], kill_at_step=5, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [2, 4]
    assert max(r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.csv")) == 5
    # A stale temporary directory from an interrupted write is ignored (and cleaned up).
    (tmp_path / "killed" / "checkpoints" / ".step_00000006.tmp-123").mkdir()
    _cli(["--config", str(killed), "--resume"])

    a = read_metrics(tmp_path / "full" / "metrics.csv")
    b = read_metrics(tmp_path / "killed" / "metrics.csv")
    assert [r["step"] for r in a] == list(range(1, 9)) == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/pairs0", "loss/interleaved1", "lr", "grad_norm", "trained_tokens"):
            assert ra[key] == rb[key], (key, ra, rb)  # bitwise: floats are logged with repr
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [6, 8]  # keep_last: 2
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))
    assert (tmp_path / "full" / "loss.png").is_file() and (tmp_path / "full" / "tensorboard").is_dir()

    # The exported model loads with from_pretrained and carries the trained weights.
    from safetensors.torch import load_file

    # Resuming with a different trainable set (LoRA added) is refused with a clear message.
    from flamingo_vlm.train.cli import main

    capsys.readouterr()
    assert main(["--config", str(killed), "--resume", "--lora", "--max-steps", "9"]) == 2
    # (it listed the LoRA keys the model lacks)
    assert "trained without LoRA and this run is with LoRA: resume with --no-lora" in capsys.readouterr().err
    # Any checkpoint exports to the from_pretrained format.
    step6 = tmp_path / "killed" / "checkpoints" / "step_00000006"
    assert main(["--config", str(killed), "--export-checkpoint", str(step6), "--export-to", str(tmp_path / "e6")]) == 0
    assert (tmp_path / "e6" / "model.safetensors").is_file()
    # without --config: the run's own config.yaml, beside its checkpoints
    assert main(["--export-checkpoint", str(step6), "--export-to", str(tmp_path / "e6b")]) == 0
    assert load_file(tmp_path / "e6b" / "model.safetensors").keys() == load_file(tmp_path / "e6" / "model.safetensors").keys()

    model, _, _ = flamingo_vlm.load_pretrained(tmp_path / "killed" / "final")
    trained = load_file(tmp_path / "killed" / "checkpoints" / "step_00000008" / "trainable.safetensors")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), trained[name]), name


def test_export_checkpoint_copied_elsewhere_or_a_run_directory(model_dir, shards, tmp_path, capsys):
    """Without --config, --export-checkpoint took the config.yaml two levels up: a checkpoint copied
    elsewhere, or a run directory, got 'model needs from_pretrained'; a wrong path was named --resume."""
    import shutil

    from safetensors.torch import load_file

    from flamingo_vlm.train.cli import main

    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "run", max_steps=2, export=False)
    assert main(["--config", str(cfg)]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    shutil.copytree(step, tmp_path / "copy" / "step_00000002")
    assert main(["--export-checkpoint", str(tmp_path / "copy" / "step_00000002"), "--export-to", str(tmp_path / "a")]) == 0
    assert main(["--export-checkpoint", str(tmp_path / "run"), "--export-to", str(tmp_path / "b")]) == 0
    trained = load_file(step / "trainable.safetensors")
    for out in ("a", "b"):
        saved = load_file(tmp_path / out / "model.safetensors")
        assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    capsys.readouterr()
    assert main(["--export-checkpoint", str(tmp_path / "nowhere")]) == 2
    assert f"--export-checkpoint {tmp_path / 'nowhere'}: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--export-checkpoint", str(tmp_path / "empty")]) == 2
    assert f"--export-checkpoint {tmp_path / 'empty'}: not a complete checkpoint" in capsys.readouterr().err



def test_the_exported_model_declares_its_training_datas_demo_separator(model_dir, shards, tmp_path):
    """A run on interleaved data whose chunks are joined with "\n" exports a model whose config.json says
    so (demo_separator: what the server's chat mapping and `generate --demo` join demonstrations with);
    the model it started from declared "" (OpenFlamingo's layout)."""
    import yaml

    from flamingo_vlm.train.cli import main

    assert json.loads((model_dir / "config.json").read_text())["demo_separator"] == ""
    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "run", max_steps=2, export=True)
    data = yaml.safe_load(cfg.read_text())
    data["data"][1]["chunk_separator"] = "\n"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["--config", str(cfg)]) == 0
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["demo_separator"] == "\n"
    assert main(["--export-checkpoint", str(tmp_path / "run"), "--export-to", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["demo_separator"] == "\n"


# -- errors ------------------------------------------------------------------------------------------
def test_ctrl_c_under_torchrun_is_one_line(monkeypatch, capsys):
    """torchrun passes Ctrl-C on to every rank's `python -m flamingo_vlm.train`, which printed a
    KeyboardInterrupt traceback; `flamingo-vlm train` said one line."""
    from flamingo_vlm.train import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["--config", "x.yaml"]) == 130
    assert capsys.readouterr().err == "flamingo-vlm train: interrupted\n"


def test_ctrl_c_during_training_names_the_checkpoint_to_resume_from(monkeypatch, capsys, tmp_path):
    from flamingo_vlm.train import cli, trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "config_from_args", lambda args: TrainConfig(output_dir=str(tmp_path / "run")))
    assert cli.main(["--config", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("flamingo-vlm train: interrupted; no checkpoint was written in ") and err.count("\n") == 1
    (tmp_path / "run" / "checkpoints" / "step_00000020").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000020" / "COMPLETE").write_text("")
    assert cli.main(["--config", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert "the latest checkpoint is " in err and "step_00000020" in err and "--resume" in err, err


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.distributed.is_available(),
                    reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_kill_9_of_torchrun_ends_its_workers(model_dir, shards, tmp_path):
    """torchrun starts its workers in sessions of their own: a SIGKILLed torchrun left both gloo
    ranks training on. Now each rank asks for SIGKILL when its parent dies."""
    import time

    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "out", max_steps=100000,
                      checkpoint_every=100000, tensorboard=False, plot=False, export=False, distributed="ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "flamingo_vlm.train", "--config", str(cfg)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "out" / "metrics.csv"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 2):  # both ranks train
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the 2-process run did not start training"
            time.sleep(0.5)
        workers = _children(launcher.pid)
        assert len(workers) == 2 and all(map(_running, workers)), workers
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_running, workers)), f"workers {workers} outlived their SIGKILLed torchrun"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.stderr.close()


def test_the_launcher_death_signal_is_asked_for_only_under_torchrun(monkeypatch):
    from flamingo_vlm import lifetime

    calls = []

    class Libc:
        def prctl(self, *args):
            calls.append(args)
            return 0

    monkeypatch.setattr("ctypes.CDLL", lambda *a, **k: Libc())
    assert not lifetime.die_with_launcher({})
    assert calls == []
    if sys.platform.startswith("linux"):
        assert lifetime.die_with_launcher({"TORCHELASTIC_RUN_ID": "x"})
        assert calls == [(lifetime.PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)]


def test_python_m_train_words_bad_input_as_flamingo_vlm_train_does(model_dir, shards, tmp_path, capsys):
    """A model directory whose config.json is not ours raised ValueError: one line from `flamingo-vlm
    train`, a traceback from `python -m flamingo_vlm.train` (what torchrun runs)."""
    from flamingo_vlm.train.cli import main

    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"x": 1}')
    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "out")
    assert main(["--config", str(cfg), "--set", f"model.from_pretrained={bad}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flamingo-vlm train: error: ") and str(bad / "config.json") in err and err.count("\n") == 1


def test_clear_errors(model_dir, shards, tmp_path, capsys):
    from flamingo_vlm.train.cli import main

    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "out")
    assert main(["--config", str(cfg), "--data", f"pairs={tmp_path / 'nowhere'}/*.tar"]) == 2
    assert "no training data found for data[0]" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pairs-000000.tar").write_bytes(b"this is not a tar file")
    assert main(["--config", str(cfg), "--data", f"pairs={bad}", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "could not read dataset pairs0" in err and "pairs-000000.tar" in err

    assert main(["--config", str(cfg), "--set", "model.cross_attn_every_n_layers=2"]) == 2
    assert "does not match the model" in capsys.readouterr().err

    assert main(["--config", str(cfg), "--set", "optim.lrr=1"]) == 2
    assert "did you mean" in capsys.readouterr().err

    # an output_dir/final the export could not replace is refused at the start, not after training
    (tmp_path / "out2" / "final").mkdir(parents=True)
    (tmp_path / "out2" / "final" / "notes.txt").write_text("mine")
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "cannot export the trained model at the end" in err and "notes.txt" in err
    assert not list((tmp_path / "out2").glob("checkpoints/*")) and not (tmp_path / "out2" / "metrics.csv").exists()


def test_data_flag_keeps_the_settings_of_the_configs_dataset_of_that_kind(model_dir, shards, tmp_path, capsys):
    """`--data KIND=URLS` replaces the config's datasets; one of a kind the config has keeps that entry's
    batch size and token limit (a user's `--data interleaved=mine/` trains as the config says)."""
    import yaml

    from flamingo_vlm.train.cli import main

    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "out")
    assert main(["--config", str(cfg), "--data", "interleaved=mine/", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert [(d["kind"], d["urls"]) for d in data] == [("interleaved", ["mine/"])]
    assert (data[0]["batch_size"], data[0]["max_tokens"]) == (2, 48)  # the config's interleaved entry, not 8 / 256
    named = yaml.safe_load(cfg.read_text())
    named["data"] = [{**named["data"][1], "name": "mine"}, {**named["data"][1], "batch_size": 5}]
    cfg.write_text(yaml.safe_dump(named))
    assert main(["--config", str(cfg), "--data", "interleaved=a/", "--data", "interleaved=b/", "--data",
                 "interleaved=c/", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert [d["batch_size"] for d in data] == [2, 5, 5]  # the i-th of the config's (its last past them)
    assert all(d.get("name") != "mine" for d in data)  # a config's dataset name does not name other data
    other = _write_yaml(tmp_path / "p.yaml", model_dir, {**shards, "interleaved": tmp_path}, tmp_path / "out")
    text = yaml.safe_load(other.read_text())
    text["data"] = text["data"][:1]  # pairs only
    other.write_text(yaml.safe_dump(text))
    assert main(["--config", str(other), "--data", "interleaved=mine/", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"][0]["batch_size"] != 2  # a kind it lacks: the defaults
    assert main(["--config", str(cfg), "--data", "interleaved=mine/", "--batch-size", "3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"][0]["batch_size"] == 3  # the flag still wins


# -- damaged data, failed writes, damaged checkpoints --------------------------------------------------
def test_damaged_shards_are_skipped_counted_and_named(model_dir, shards, tmp_path, capsys, caplog):
    """A non-tar, an empty and a truncated shard among good ones: the run goes on, and the damaged
    shards are counted in metrics.csv and named in the log and the end-of-run summary."""
    from flamingo_vlm.train.cli import main

    data = tmp_path / "pairs"
    data.mkdir()
    for p in sorted(shards["pairs"].glob("*.tar")):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "pairs-garbage.tar").write_bytes(b"<html>502 Bad Gateway</html>" * 30)
    (data / "pairs-empty.tar").write_bytes(b"")
    good = (data / "pairs-000001.tar").read_bytes()
    (data / "pairs-cut.tar").write_bytes(good[: len(good) // 2 // 512 * 512])  # cut at a block boundary
    cfg = _write_yaml(tmp_path / "d.yaml", model_dir, shards, tmp_path / "out", max_steps=3, checkpoint_every=100)
    with caplog.at_level("WARNING"):
        assert main(["--config", str(cfg), "--data", f"pairs={data}", "--max-steps", "3", "--no-export"]) == 0
    out = capsys.readouterr().out
    rows = read_metrics(tmp_path / "out" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["unreadable_shards"] == 2 and rows[-1]["truncated_shards"] == 1
    summary = next(line for line in out.splitlines() if line.startswith("damaged data:"))
    assert "2 unreadable shard(s)" in summary and "1 truncated shard(s)" in summary
    for name in ("pairs-garbage.tar", "pairs-empty.tar", "pairs-cut.tar"):
        assert str(data / name) in summary
        assert any(str(data / name) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def _fake_run(model_dir, media_id, out, **kw):
    t = Trainer(make_config(model_dir, out, **kw), **fake_mixture(media_id))
    try:
        return t.fit()
    finally:
        t.close()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failure", ["torch_save_full_disk", "enospc", "read_only"])
def test_a_failed_checkpoint_write_says_why_and_leaves_the_previous_one(model_dir, media_id, tmp_path, monkeypatch,
                                                                         failure):
    import errno

    from flamingo_vlm import files
    from flamingo_vlm.train import checkpoint as ckpt

    out = tmp_path / "run"
    _fake_run(model_dir, media_id, out, max_steps=2, checkpoint_every=2)
    before = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002")

    if failure == "torch_save_full_disk":  # what torch.save raises when the disk fills up under it
        def save(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3990")
        monkeypatch.setattr(ckpt.torch, "save", save)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil_usage(free=1000))
        why = "no space left on device (1000 B free there, about"
    elif failure == "enospc":
        def save_file(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ckpt, "save_file", save_file)
        why = "no space left on device"
    else:
        def mkdtemp(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp)
        why = "read-only file system"
    with pytest.raises(ckpt.WriteError) as e:
        _fake_run(model_dir, media_id, out, max_steps=4, checkpoint_every=2, resume="latest")
    message = str(e.value)
    assert "\n" not in message and why in message, message
    assert str(out / "checkpoints") in message  # where
    assert [s for s, _ in list_checkpoints(out)] == [2] and _leftovers(out) == []
    monkeypatch.undo()
    after = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002")
    assert after.state["step"] == 2 and after.trainable.keys() == before.trainable.keys()
    assert all(torch.equal(after.trainable[k], before.trainable[k]) for k in before.trainable)


def shutil_usage(free: int):
    import collections

    return collections.namedtuple("usage", "total used free")(10**9, 10**9 - free, free)


def test_a_failed_rewrite_of_the_same_step_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from flamingo_vlm.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    ckpt._write_atomic(root, 5, {"w": torch.ones(3)}, {"state": {}}, {"step": 5})
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(ckpt.WriteError, match="no space left on device"):
        ckpt._write_atomic(root, 5, {"w": torch.zeros(3)}, {"state": {}}, {"step": 5})
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005"]
    monkeypatch.undo()
    from safetensors.torch import load_file

    assert torch.equal(load_file(root / "step_00000005" / "trainable.safetensors")["w"], torch.ones(3))


def test_an_unwritable_output_dir_is_one_line(model_dir, shards, tmp_path, capsys, monkeypatch):
    import errno

    from flamingo_vlm.train.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, blocker / "out")
    assert main(["--config", str(cfg), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write output_dir {blocker / 'out'}: a parent of it is a file" in err

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(trainer_mod.tempfile, "TemporaryFile", read_only)
    cfg = _write_yaml(tmp_path / "c2.yaml", model_dir, shards, tmp_path / "ro")
    assert main(["--config", str(cfg), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write output_dir {tmp_path / 'ro'}: read-only file system" in err


def test_a_run_extended_on_resume_takes_the_new_schedules_lr(model_dir, media_id, tmp_path):
    """Saved at the end of a 2-step decay to 0, resumed with max_steps 4: the first resumed step uses
    the 4-step schedule's lr for step 2, not the 0 the 2-step run had saved."""
    from flamingo_vlm.train.optim import lr_factor

    out = tmp_path / "run"
    sched = {"warmup_steps": 0, "kind": "linear", "min_lr_ratio": 0.0}
    _fake_run(model_dir, media_id, out, max_steps=2, checkpoint_every=2, schedule=sched)
    cfg = make_config(model_dir, out, max_steps=4, checkpoint_every=2, resume="latest", schedule=sched)
    t = Trainer(cfg, **fake_mixture(media_id))
    try:
        assert lr_factor(2, cfg.schedule, 4) > 0
        assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(2, cfg.schedule, 4))
        resumed = t.fit()
    finally:
        t.close()
    assert [h["lr"] for h in resumed.history] == pytest.approx([1e-3 * lr_factor(k, cfg.schedule, 4) for k in (2, 3)])



def test_a_resume_with_another_lr_trains_with_it_and_says_so(model_dir, media_id, tmp_path, caplog):
    """--resume --lr 5e-5 trained on at the checkpoint's lr (its parameter groups and the scheduler's
    base rates were loaded over the new ones), while config.yaml recorded the new one."""
    from flamingo_vlm.train.optim import lr_factor

    out = tmp_path / "run"
    sched = {"warmup_steps": 0, "kind": "linear", "min_lr_ratio": 0.0}
    _fake_run(model_dir, media_id, out, max_steps=2, checkpoint_every=2, schedule=sched)
    cfg = make_config(model_dir, out, max_steps=4, checkpoint_every=2, resume="latest", schedule=sched,
                      optim={"lr": 5e-4, "weight_decay": 0.05})
    with caplog.at_level("WARNING", logger="flamingo_vlm.train"):
        t = Trainer(cfg, **fake_mixture(media_id))
    try:
        resumed = t.fit()
        decay = [g["weight_decay"] for g in t.optimizer.param_groups]
    finally:
        t.close()
    assert [h["lr"] for h in resumed.history] == pytest.approx([5e-4 * lr_factor(k, cfg.schedule, 4) for k in (2, 3)])
    assert 0.05 in decay
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "with this run's lr 0.001 -> 0.0005" in said and "weight_decay 0.1 -> 0.05" in said

def _event_steps(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar in the event files, files in TensorBoard's order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for path in sorted(log_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    out.append((event.step, float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor")
                                else v.simple_value))
    return out


def test_resume_drops_the_lost_tail_from_tensorboard_and_metrics_csv(model_dir, media_id, tmp_path):
    """A run that logged step 4 but died before its checkpoint, resumed from step 2: steps 3 and 4 are
    in the event files and in metrics.csv once, with the resumed run's values. (SummaryWriter's
    purge_step alone left both copies in the files, and TensorBoard's Python loader showed both.)"""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import plugin_event_accumulator

    out = tmp_path / "run"
    kw = dict(max_steps=4, checkpoint_every=2, keep_last=3, tensorboard=True)
    _fake_run(model_dir, media_id, out, **kw)
    tb = out / "tensorboard"
    first = sorted(tb.glob("*tfevents*"))
    assert [s for s, _ in _event_steps(tb, "train/loss")] == [1, 2, 3, 4]
    with open(first[0], "ab") as f:
        f.write(b"\x07\x00\x00")  # a torn last record, as a killed writer leaves
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    resumed = _fake_run(model_dir, media_id, out, resume="latest", **kw)
    assert [h["step"] for h in resumed.history] == [3, 4]

    loss = {h["step"]: h["loss"] for h in resumed.history}
    got = _event_steps(tb, "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4], got
    assert [v for s, v in got if s > 2] == pytest.approx([loss[3], loss[4]])
    assert len(list(tb.glob("*tfevents*"))) == 2 and not list(tb.glob(".*"))
    acc = plugin_event_accumulator.EventAccumulator(str(tb))
    acc.Reload()
    assert [e.step for e in acc.Tensors("train/loss")] == [1, 2, 3, 4]
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows[2:]] == [loss[3], loss[4]]

    # A fresh run in the directory of one that never checkpointed starts both logs over.
    shutil.rmtree(out / "checkpoints")
    _fake_run(model_dir, media_id, out, **{**kw, "max_steps": 1})
    assert [s for s, _ in _event_steps(tb, "train/loss")] == [1]
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1]


def test_resume_falls_back_past_a_damaged_checkpoint(model_dir, media_id, tmp_path, caplog):
    """The newest checkpoint's trainable.safetensors is cut short: --resume warns naming it, continues
    from the previous one, and computes what the uninterrupted run computed."""
    from flamingo_vlm.train import checkpoint as ckpt

    out = tmp_path / "run"
    full = _fake_run(model_dir, media_id, out, max_steps=4, checkpoint_every=2, keep_last=3)
    bad = out / "checkpoints" / "step_00000004" / ckpt.TRAINABLE
    bad.write_bytes(bad.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        t = Trainer(make_config(model_dir, out, max_steps=4, checkpoint_every=2, keep_last=3, resume="latest"),
                    **fake_mixture(media_id))
    try:
        assert t.resume_from == out / "checkpoints" / "step_00000002" and t.step == 2
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(str(bad) in m and "resuming from an earlier one" in m for m in warned), warned
        resumed = t.fit()
    finally:
        t.close()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    # the rewritten step 4 replaced the damaged one
    assert ckpt.load_checkpoint(out / "checkpoints" / "step_00000004").state["step"] == 4

    # naming the damaged checkpoint itself is an error naming the file; so is having no intact one
    bad.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"--resume {out / 'checkpoints' / 'step_00000004'}: .*{bad.name}"):
        Trainer(make_config(model_dir, out, max_steps=4, resume=str(bad.parent)), **fake_mixture(media_id))
    for step in (2,):
        (out / "checkpoints" / f"step_0000000{step}" / ckpt.OPTIMIZER).write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"no intact checkpoint .*step_00000004: .*trainable.safetensors.*"
                                          r"step_00000002: .*optimizer.pt"):
        Trainer(make_config(model_dir, out, max_steps=4, resume="latest"), **fake_mixture(media_id))


def _tied_head(vocab: int, dim: int):
    """An ExtendedLMHead as Flamingo installs it on a tied LM (the last two rows train)."""
    from flamingo_vlm.modeling.token_embeddings import ExtendedEmbedding, ExtendedLMHead

    emb = torch.nn.Embedding(vocab, dim)
    out = torch.nn.Linear(dim, vocab, bias=False)
    out.weight = emb.weight
    return ExtendedLMHead(out, ExtendedEmbedding(emb, [vocab - 2, vocab - 1]))


@pytest.mark.parametrize("kind", ["frozen", "trainable", "tied-new-rows"])
def test_chunked_loss_under_autocast_equals_the_per_chunk_cast(kind):
    """A frozen Linear head, or the frozen base rows of a tied head with trainable added rows, is
    cast to bf16 once per call (fastpath._head_call), not per chunk: the loss and the gradients are
    those of autocast casting it for every chunk."""
    from flamingo_vlm.train import fastpath

    torch.manual_seed(0)
    if kind == "tied-new-rows":
        head = _tied_head(50, 16)
        weight, trained = head.weight, head.new_weight
    else:
        head = torch.nn.Linear(16, 50, bias=False).requires_grad_(kind == "trainable")
        weight = head.weight
        trained = head.weight if kind == "trainable" else None
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    labels[1, 4] = 49  # an added token's logit is trained
    results = []
    for once in (True, False):
        hidden.grad = None
        if trained is not None:
            trained.grad = None
        call = fastpath._head_call
        if not once:
            fastpath._head_call = lambda h, d: (lambda x: fastpath._real_forward(h, x))
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fastpath.head_cross_entropy_sum(hidden, labels, head, chunk_size=4)
        finally:
            fastpath._head_call = call
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), None if trained is None else trained.grad.clone()))
    (l1, g1, w1), (l2, g2, w2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert (w1 is None) == (trained is None) and (w1 is None or (w1.abs().sum() > 0 and torch.equal(w1, w2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the frozen weight's cast is made once, up front
        cells = [c.cell_contents for c in fastpath._head_call(head, "cpu").__closure__ or ()]
    assert any(isinstance(c, torch.Tensor) and c.dtype == torch.bfloat16 for c in cells) == (kind != "trainable")
    full = head.merged_weight() if kind == "tied-new-rows" else weight.detach()
    reference = torch.nn.functional.cross_entropy(  # and it is the causal-LM loss (bf16 logits)
        (hidden[:, :-1].detach().bfloat16() @ full.bfloat16().t()).float().flatten(0, 1),
        labels[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(l1, reference, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_cross_entropy_and_gradient_equal_autograds(dtype):
    """fastpath._cross_entropy_and_grad (the chunked loss's per-chunk loss, computed in place in the
    logits' fp32 storage) gives F.cross_entropy's summed loss and its gradient, in the logits' dtype."""
    from flamingo_vlm.train.fastpath import _cross_entropy_and_grad

    torch.manual_seed(0)
    logits = (torch.randn(7, 300) * 8).to(dtype)  # large logits: the max-shift matters
    labels = torch.randint(0, 300, (7,))
    ref_in = logits.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_in, labels, reduction="sum")
    ref.backward()
    loss, grad = _cross_entropy_and_grad(logits.clone(), labels)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad.float(), ref_in.grad.to(dtype).float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3)
    assert torch.allclose(grad.float().sum(-1), torch.zeros(7), atol=1e-2)  # softmax minus one-hot


def test_resuming_a_run_past_max_steps_is_refused_and_leaves_it_as_it_was(model_dir, media_id, tmp_path):
    out = tmp_path / "run"
    _fake_run(model_dir, media_id, out, max_steps=3, export=True)
    final = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "final").rglob("*"))
    with pytest.raises(ConfigError, match=r"step_0+3 is at step 3, past max_steps 2: raise max_steps"):
        _fake_run(model_dir, media_id, out, max_steps=2, resume="latest", export=True)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "final").rglob("*")) == final
    assert _fake_run(model_dir, media_id, out, max_steps=3, resume="latest").step == 3  # at max_steps: nothing to do


def test_a_run_that_fails_before_writing_leaves_no_output_directory(model_dir, shards, tmp_path, capsys):
    """A model or data not found, or `--resume` with no checkpoint, left `runs/x` holding only `.lock`;
    an output directory that was there before is left as it was."""
    from flamingo_vlm.train.cli import main

    out = tmp_path / "runs" / "x"
    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, out)
    assert main(["--config", str(cfg), "--data", f"pairs={tmp_path / 'nowhere'}/*.tar"]) == 2
    assert main(["--config", str(cfg), "--resume"]) != 0
    assert main(["--config", str(cfg), "--set", f"model.from_pretrained={tmp_path / 'no-model'}"]) != 0
    assert not (tmp_path / "runs").exists()
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["--config", str(cfg), "--data", f"pairs={tmp_path / 'nowhere'}/*.tar"]) == 2
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    capsys.readouterr()


def test_data_too_small_for_a_batch_says_so_and_what_to_do(model_dir, shards, tmp_path, capsys):
    """It read "could not read dataset pairs0: RuntimeError: ... gave no full batch of 4 ...; stats: {...}"
    for data that was read fine and was only too small."""
    import yaml

    from flamingo_vlm.train.cli import main

    cfg = _write_yaml(tmp_path / "c.yaml", model_dir, shards, tmp_path / "out")
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] = raw["data"][:1]
    raw["data"][0]["batch_size"] = 64
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(cfg), "--max-steps", "1"]) != 0
    err = capsys.readouterr().err
    assert "gave no full batch of 64 in epoch 0 (rank 0/1: " in err and "give it at least 64 usable samples" in err
    assert "could not read" not in err and "RuntimeError" not in err and "{" not in err and err.count("\n") == 1


def test_a_warmup_as_long_as_the_run_is_warned(model_dir, media_id, tmp_path, caplog):
    """The defaults (warmup 1875 steps, max_steps 1000) trained at ~0 lr without a word."""
    with caplog.at_level("WARNING", logger="flamingo_vlm.train"):
        t = Trainer(make_config(model_dir, tmp_path / "run", max_steps=3, schedule={"warmup_steps": 5}),
                    **fake_mixture(media_id))
        t.close()
    assert "schedule.warmup_steps 5 >= max_steps 3: the lr never reaches optim.lr" in caplog.text


def test_the_training_bar_in_a_log_file_draws_its_first_and_last_states_only(model_dir, media_id, tmp_path, capsys):
    """The trainer refreshed its bar at every step, past the once-a-minute redraw of a log file."""
    t = Trainer(make_config(model_dir, tmp_path / "run", max_steps=3, progress=True), **fake_mixture(media_id))
    try:
        t.fit()
    finally:
        t.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "2/3" not in err, err
