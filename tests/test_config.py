"""The typed FlamingoConfig and backbone references: recorded when a model is built, written to
config.json by save_pretrained, read back by from_pretrained; directories written before the typed
config (partial option dicts, older reference entries) still load; the training config's typed
fields accept OpenFlamingo's ``*_kwargs`` names."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import flamingo_vlm
from flamingo_vlm import Flamingo, create_model_and_transforms
from flamingo_vlm.modeling.config import BackboneRef, CrossAttentionConfig, PerceiverConfig
from flamingo_vlm.pretrained import config_from_json, read_config
from flamingo_vlm.references import lm_ref, lm_ref_of, model_source, reloadable, vision_ref
from flamingo_vlm.registry import DEFAULT_MODEL, OPENFLAMINGO_RELEASES
from flamingo_vlm.train.config import ConfigError, ModelConfig, TrainConfig
from tiny import randomize_gates, random_images, tiny_tokenizer, tiny_vision

PERCEIVER = {"depth": 1, "num_latents": 4, "heads": 2, "dim_head": 16}
XATTN = {"heads": 2, "dim_head": 16}


@pytest.fixture(scope="module")
def referenced(tmp_path_factory):
    """A model whose LM is a local directory (referenced, not copied), saved; and its inputs."""
    root = tmp_path_factory.mktemp("ref")
    lm_dir, tok_dir = root / "lm", root / "tok"
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(lm_dir)
    tiny_tokenizer().save_pretrained(tok_dir)
    model, ip, tok = create_model_and_transforms(tiny_vision(), None, str(lm_dir), str(tok_dir), cross_attn_every_n_layers=2,
                                                 perceiver_kwargs=PERCEIVER, cross_attn_kwargs=XATTN)
    randomize_gates(model)
    model.eval()
    out = model.save_pretrained(root / "m", tokenizer=tok, image_processor=ip)
    batch = flamingo_vlm.FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2))])
    return model, out, lm_dir, batch


def logits(model, batch):
    with torch.no_grad():
        return model(batch["vision_x"], batch["input_ids"], batch["attention_mask"]).logits


def test_the_factory_records_a_typed_config(referenced):
    model, _, lm_dir, _ = referenced
    c = model.config
    assert c.lm == BackboneRef("local", str(lm_dir.resolve()))
    assert c.vision is None  # a random encoder cannot be referenced: a saved model embeds it
    assert c.perceiver == PerceiverConfig(**PERCEIVER) and model.perceiver.latents.shape[0] == 4
    assert c.cross_attention == CrossAttentionConfig(**XATTN) and c.cross_attn_every_n_layers == 2
    assert c.tokens.media_token_id == model.media_token_id and c.tokens.eoc_token_id == model.eoc_token_id
    assert c.decoder_layers_attr_name == model.decoder_layers_attr_name


def test_save_writes_the_config_and_from_pretrained_reads_it(referenced):
    model, out, _, batch = referenced
    data = json.loads((out / "config.json").read_text())
    assert data["perceiver_kwargs"] == PerceiverConfig(**PERCEIVER).to_dict()  # every option written out
    assert read_config(out)[0] == model.config
    loaded = Flamingo.from_pretrained(out)
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_a_directory_written_the_old_way_loads(referenced, tmp_path):
    """Before FlamingoConfig, config.json kept the option dicts as they were passed (defaults left
    out) and no tokens_ln_post in references; the model must come back the same."""
    model, out, lm_dir, batch = referenced
    old = tmp_path / "old"
    shutil.copytree(out, old)
    data = json.loads((out / "config.json").read_text())
    data.update(perceiver_kwargs=dict(PERCEIVER), cross_attn_kwargs=dict(XATTN), lang_encoder={"path": str(lm_dir)})
    (old / "config.json").write_text(json.dumps(data))
    loaded, _, _ = flamingo_vlm.load_pretrained(old)
    assert loaded.config.perceiver == model.config.perceiver and loaded.config.lm == model.config.lm
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_old_reference_entries_resolve_to_typed_references():
    old = {"format": "flamingo-vlm", "format_version": 1, "cross_attn_every_n_layers": 5,
           "perceiver_kwargs": {"num_latents": 32}, "cross_attn_kwargs": {},
           "eoc_token_id": 10, "media_token_id": 11, "pad_token_id": 2,
           "vision_encoder": {"type": "reference", "path": "builtin:efficientnet-lite0", "pretrained": None,
                              "position_encoding": True},
           "lang_encoder": {"path": "builtin:smollm2-135m-instruct"}}
    c = config_from_json(old)
    assert c.vision == BackboneRef("builtin", "builtin:efficientnet-lite0", options={"position_encoding": True})
    assert c.lm == BackboneRef("builtin", "builtin:smollm2-135m-instruct")
    assert c.perceiver == PerceiverConfig(num_latents=32) and c.cross_attention == CrossAttentionConfig()
    assert c.tokens.base_vocab_size == 10  # absent in the oldest files: the first added token
    hf = config_from_json({**old, "vision_encoder": {"type": "reference", "path": "org/clip", "pretrained": None}})
    assert hf.vision == BackboneRef("hf", "org/clip")
    assert config_from_json({**old, "vision_encoder": {"type": "open_clip", "config": {}}}).vision is None


def test_the_shipped_model_config_reads(tmp_path):
    c, _ = read_config(model_source(DEFAULT_MODEL).path)
    assert c.vision.kind == "builtin" and c.lm.kind == "builtin" and c.perceiver.media_passthrough
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        read_config(tmp_path)


def test_every_name_scheme_resolves_to_a_reference(tmp_path):
    assert vision_ref("builtin:efficientnet-lite0").kind == "builtin"
    assert vision_ref("ViT-L-14", "openai", tokens_ln_post=True) == BackboneRef(
        "open_clip", "ViT-L-14", pretrained="openai", tokens_ln_post=True)
    assert not reloadable(vision_ref("ViT-L-14"))  # random weights: embedded when saved
    (tmp_path / "vit.json").write_text("{}")
    (tmp_path / "w.bin").write_bytes(b"")
    rel = vision_ref(str(tmp_path / "vit.json"), str(tmp_path / "w.bin"))
    assert rel.kind == "open_clip_config" and Path(rel.name).is_absolute() and reloadable(rel)
    assert vision_ref("openai/clip-vit-base-patch32") == BackboneRef("hf", "openai/clip-vit-base-patch32")
    assert lm_ref("builtin:smollm2-135m-instruct").kind == "builtin"
    assert lm_ref("org/lm") == BackboneRef("hub", "org/lm")
    assert lm_ref(tmp_path) == BackboneRef("local", str(tmp_path.resolve()))

    class _LM:  # what lm_ref_of reads: the config's public name_or_path
        def __init__(self, name):
            self.config = AutoConfig.for_model("gpt2", name_or_path=name)

    assert lm_ref_of(_LM("")) is None and lm_ref_of(_LM("gpt2")) is None  # nothing reloadable named
    assert lm_ref_of(_LM("org/lm")) == BackboneRef("hub", "org/lm")

    release = next(iter(OPENFLAMINGO_RELEASES))
    assert model_source(release).kind == "release" and model_source(release).release.repo_id == release
    assert model_source(DEFAULT_MODEL).kind == "builtin"
    assert model_source(tmp_path).kind == "directory" and model_source("org/flamingo").kind == "hub"


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match=r"unknown perceiver option\(s\) 'dept'; valid: depth"):
        PerceiverConfig.coerce({"dept": 1})
    with pytest.raises(ValueError, match="'head'"):
        create_model_and_transforms(tiny_vision(), None, AutoModelForCausalLM.from_config(
            AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=4)), tiny_tokenizer(),
            cross_attn_kwargs={"head": 2})


def test_train_config_typed_fields_take_the_old_keys(tmp_path, referenced):
    old = TrainConfig.from_dict({"model": {"vision": "v", "lm": "l", "perceiver_kwargs": {"depth": 1},
                                           "cross_attn_kwargs": {"heads": 2}}})
    assert old.model.perceiver == PerceiverConfig(depth=1) and old.model.cross_attention == CrossAttentionConfig(heads=2)
    assert TrainConfig.from_dict(old.to_dict()).model == old.model
    assert old.override(["model.perceiver_kwargs.depth=3"]).model.perceiver.depth == 3
    with pytest.raises(ConfigError, match="model.perceiver_kwargs and model.perceiver"):
        TrainConfig.from_dict({"model": {"vision": "v", "lm": "l", "perceiver_kwargs": {}, "perceiver": {}}})
    with pytest.raises(ConfigError, match="model.perceiver: unknown perceiver option"):
        TrainConfig.from_dict({"model": {"vision": "v", "lm": "l", "perceiver_kwargs": {"dept": 1}}})
    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "smol-synthetic.yaml")
    assert cfg.model.perceiver.num_latents == 32 and cfg.model.cross_attention.ff_mult == 2

    from flamingo_vlm.train.trainer import build_model

    _, out, _, _ = referenced
    model, _, _ = build_model(ModelConfig(from_pretrained=str(out), perceiver=PerceiverConfig(**PERCEIVER)))
    assert model.config.perceiver.num_latents == 4
    with pytest.raises(ConfigError, match="model.perceiver=.* does not match the model"):
        build_model(ModelConfig(from_pretrained=str(out), perceiver=PerceiverConfig(depth=2)))
