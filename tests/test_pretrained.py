"""Our format (save_pretrained/from_pretrained), the Hub path, the release registry, `convert`."""

import argparse
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import flamingo_vlm.pretrained as pretrained
from flamingo_vlm import FlamingoProcessor, load_pretrained
from flamingo_vlm.checkpoints import CheckpointError, _state_key, load_openflamingo_checkpoint
from flamingo_vlm.lm_loading import causal_lm_from_config
from flamingo_vlm.cli import main as cli_main
from flamingo_vlm.modeling.flamingo import Flamingo
from flamingo_vlm.modeling.vision import OpenCLIPVisionTransformer
from flamingo_vlm.registry import OPENFLAMINGO_RELEASES, OPENFLAMINGO_TOKENIZER_LEN
from tiny import random_images, tiny_flamingo


def batch_for(model, image_processor, tokenizer):
    processor = FlamingoProcessor(tokenizer, image_processor)
    imgs = random_images(3)
    return processor([("<image>a red car.<|endofchunk|><image>a", imgs[:2]), ("<image>a dog", imgs[2:])])


def logits_of(model, batch):
    with torch.no_grad():
        return model(batch["vision_x"], batch["input_ids"], batch["attention_mask"]).logits


def test_save_and_load_round_trip_embeds_random_backbones(tmp_path):
    model, ip, tok = tiny_flamingo("llama", every=2)
    batch = batch_for(model, ip, tok)
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    config = json.loads((out / "config.json").read_text())
    assert config["lang_encoder"] == {"embedded": True} and config["vision_encoder"]["type"] == "open_clip"
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable  # trainable weights only: no frozen matrix in the adapter file
    loaded, ip2, tok2 = load_pretrained(out)
    assert ip2 == ip and len(tok2) == len(tok)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), atol=1e-5, rtol=0)
    a = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=5)
    b = loaded.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=5)
    assert a.tolist() == b.tolist()


def test_saved_tokenizer_carries_no_truncation_from_its_last_call(tmp_path):
    model, ip, tok = tiny_flamingo("llama", every=2)
    tok("a b c d e f g h", truncation=True, max_length=3, padding="max_length")  # as a data loader does
    if tok.backend_tokenizer.truncation is None:
        pytest.skip("this tokenizers version keeps no state between calls")
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    assert tok.backend_tokenizer.truncation is not None  # the caller's tokenizer is left as it was
    _, _, tok2 = load_pretrained(out)
    assert len(tok2("a b c d e f g h")["input_ids"]) > 3


def test_referenced_lm_is_not_copied(tmp_path):
    model, ip, tok = tiny_flamingo("gpt2")
    from tiny import tiny_tokenizer

    lm_dir = tmp_path / "lm"
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=2, n_head=4))
    base.save_pretrained(lm_dir)
    tok_dir = tmp_path / "tok"
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tok_dir)
    from flamingo_vlm import create_model_and_transforms
    from tiny import randomize_gates, tiny_vision

    model, ip, tok = create_model_and_transforms(tiny_vision(), None, str(lm_dir), str(tok_dir))
    randomize_gates(model)
    model.eval()
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["lang_encoder"] == {"path": str(lm_dir.resolve())}
    assert not (out / "language_model").exists()
    loaded, _, _ = load_pretrained(out)
    batch = batch_for(model, ip, tok)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), atol=1e-5, rtol=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    model, ip, tok = tiny_flamingo()
    target = tmp_path / "m"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target, tokenizer=tok)
    assert not target.exists() and list(tmp_path.iterdir()) == []



def test_save_refuses_a_file_or_a_folder_of_other_things_and_keeps_notes_beside_a_model(tmp_path, monkeypatch):
    model, ip, tok = tiny_flamingo()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt is a file, not a directory"):
        model.save_pretrained(a_file, tokenizer=tok)
    assert a_file.read_text() == "mine"
    folder = tmp_path / "models"
    (folder / "other-model").mkdir(parents=True)
    (folder / "readme.md").write_text("mine")
    with pytest.raises(FileExistsError, match="does not hold a saved flamingo-vlm model .other-model, readme.md."):
        model.save_pretrained(folder, tokenizer=tok)
    assert sorted(p.name for p in folder.iterdir()) == ["other-model", "readme.md"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a saved model is replaced; what the save does not write stays
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    (out / "NOTES.md").write_text("trained on ...")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    assert (out / "NOTES.md").read_text() == "trained on ..."
    loaded, _, _ = load_pretrained(out)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(dict(loaded.named_parameters())[name], param)
    # the current directory (or one holding it) is never replaced, nor is '.' an error about names
    monkeypatch.chdir(out)
    with pytest.raises(FileExistsError, match="is the current directory"):
        model.save_pretrained(".", tokenizer=tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    model.save_pretrained("sub", tokenizer=tok)
    assert (empty / "sub" / "config.json").is_file()



def test_save_through_a_link_home_and_hidden_files_and_without_a_tokenizer(tmp_path, monkeypatch):
    model, ip, tok = tiny_flamingo()
    run3 = model.save_pretrained(tmp_path / "run3", tokenizer=tok, image_processor=ip)
    (tmp_path / "latest").symlink_to(run3)
    model.save_pretrained(tmp_path / "latest", tokenizer=tok, image_processor=ip)  # the save goes where it points
    assert (tmp_path / "latest").is_symlink() and (run3 / "tokenizer_config.json").is_file()
    load_pretrained(tmp_path / "latest")
    # saved again without a tokenizer: the old tokenizer's files are not kept as if they were notes
    with pytest.warns(UserWarning, match="saved without a tokenizer: load_pretrained reads one from the folder"):
        model.save_pretrained(run3, image_processor=ip)
    assert not [p.name for p in run3.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    # a folder holding only hidden files counts as empty; '~' is the home directory, in and out
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".DS_Store").write_text("")
    model.save_pretrained(tmp_path / "fresh", tokenizer=tok)
    assert (tmp_path / "fresh" / ".DS_Store").exists() and (tmp_path / "fresh" / "config.json").is_file()
    monkeypatch.setenv("HOME", str(tmp_path))
    out = model.save_pretrained("~/home-model", tokenizer=tok, image_processor=ip)
    assert out == tmp_path / "home-model" and (out / "config.json").is_file()
    load_pretrained("~/home-model")

def test_a_path_that_is_not_there_is_named_as_a_directory(tmp_path):
    for name in (f"{tmp_path}/no-such-dir", "./no-such-dir", "runs/a/final"):
        with pytest.raises(FileNotFoundError, match=f"model directory {name} does not exist"):
            load_pretrained(name)

def test_saved_directory_is_readable_by_others(tmp_path):
    model, ip, tok = tiny_flamingo()
    old = os.umask(0o022)
    try:
        out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}


def test_offline_hub_error_names_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="someone/no-such-flamingo"):
        load_pretrained("someone/no-such-flamingo", cache_dir=tmp_path)


def test_loads_from_a_hub_snapshot_layout(tmp_path):
    model, ip, tok = tiny_flamingo()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny-flamingo"
    model.save_pretrained(repo / "snapshots" / commit, tokenizer=tok, image_processor=ip)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    loaded, _, _ = load_pretrained("org/tiny-flamingo", cache_dir=tmp_path / "cache", local_files_only=True)
    batch = batch_for(model, ip, tok)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, batch), atol=1e-5, rtol=0)


def test_a_hub_revision_pins_the_snapshot(tmp_path, monkeypatch):
    """`revision=` (a commit, branch or tag, as transformers takes it) was not accepted: from_pretrained
    had no such argument (a TypeError), so a pinned version of a Hub model could not be loaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "cache" / "models--org--tiny-flamingo"
    models = {}
    for seed, commit in ((1, "1" * 40), (2, "2" * 40)):
        model, ip, tok = tiny_flamingo(seed=seed)
        model.save_pretrained(repo / "snapshots" / commit, tokenizer=tok, image_processor=ip)
        models[commit] = model
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("2" * 40)
    (repo / "refs" / "v1").write_text("1" * 40)
    batch = batch_for(model, ip, tok)
    for revision, commit in ((None, "2" * 40), ("1" * 40, "1" * 40), ("v1", "1" * 40)):
        loaded = Flamingo.from_pretrained("org/tiny-flamingo", cache_dir=tmp_path / "cache", revision=revision)
        torch.testing.assert_close(logits_of(loaded, batch), logits_of(models[commit], batch), atol=1e-5, rtol=0)
    with pytest.raises(OSError, match=r"'org/tiny-flamingo' at revision 'v2'"):
        load_pretrained("org/tiny-flamingo", cache_dir=tmp_path / "cache", revision="v2")
    with pytest.raises(ValueError, match="is a local directory: drop revision="):
        load_pretrained(repo / "snapshots" / ("1" * 40), revision="v1")


def test_a_backbone_or_tokenizer_that_does_not_load_is_named(tmp_path):
    """A saved model whose referenced LM is not in the cache (offline) failed with transformers' "We
    couldn't connect to 'https://huggingface.co' to load the files ...", naming neither the LM nor the
    model that references it; a snapshot without its tokenizer.json with "Couldn't instantiate the
    backend tokenizer ...", naming no folder."""
    model, ip, tok = tiny_flamingo()
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, lang_encoder={"path": "org/not-cached-lm"})))
    with pytest.raises(OSError, match=r"(?s)language model 'org/not-cached-lm'.*\(the language model "
                       + re.escape(str(out / "config.json")) + " names\\)"):
        load_pretrained(out, cache_dir=tmp_path / "cache", local_files_only=True)  # (offline)
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").unlink()
    with pytest.raises(OSError, match=re.escape(str(out)) + ": could not load the saved model's tokenizer"):
        load_pretrained(out)


# -- OpenFlamingo checkpoints ------------------------------------------------------------------------
def released_format(model) -> dict:
    """What OpenFlamingo's training script saved: trainable params and every '*embed*' key."""
    sd = model.state_dict()
    keep = {k for k in sd if "embed" in k}
    keep |= {_state_key(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: sd[k].clone() for k in keep if not k.startswith("vision_encoder")}


def test_openflamingo_checkpoint_shapes_load_and_validate():
    src, _, _ = tiny_flamingo("mpt", seed=1)
    dst, _, _ = tiny_flamingo("mpt", seed=2)
    ckpt = released_format(src)
    # DDP prefix + training-script wrapper.
    report = load_openflamingo_checkpoint(dst, {"model_state_dict": {"module." + k: v for k, v in ckpt.items()}})
    assert not report.missing_trainable and not report.unexpected
    for name, p in src.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(dst.named_parameters())[name], p)

    # a compiled model's checkpoint (torch.compile's _orig_mod., also under or over DDP's module.) and an
    # FSDP1 one: they read as "trained on another language model"
    for wrap in ("_orig_mod.{}", "module._orig_mod.{}", "_orig_mod.module.{}"):
        other, _, _ = tiny_flamingo("mpt", seed=3)
        other.load_state_dict({wrap.format(k): v for k, v in ckpt.items()}, strict=False)
        assert all(torch.equal(dict(other.named_parameters())[n], p) for n, p in src.named_parameters() if p.requires_grad)
    fsdp1 = {k.replace("lang_encoder.", "lang_encoder._fsdp_wrapped_module.", 1): v for k, v in ckpt.items()}
    assert load_openflamingo_checkpoint(tiny_flamingo("mpt", seed=3)[0], fsdp1).unexpected == []

    broken = dict(ckpt)
    key = next(k for k in broken if k.endswith("attn_gate"))
    del broken[key]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        dst.load_state_dict(broken, strict=False)

    wrong = dict(ckpt)
    wrong["perceiver.latents"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="perceiver.latents"):
        load_openflamingo_checkpoint(dst, wrong)

    extra = dict(ckpt, **{"lang_encoder.not_a_param": torch.zeros(1)})
    assert load_openflamingo_checkpoint(dst, extra).unexpected == ["lang_encoder.not_a_param"]


@pytest.mark.parametrize("every", [1, 4])
def test_a_checkpoint_of_another_cross_attention_interval_is_refused(every):
    """A checkpoint with cross-attention every 2nd layer loaded into a model built with every 4th (say
    `convert --cross-attn-every-n-layers 4`) dropped the checkpoint's other trained layers with an
    "unexpected keys" warning and saved a model without them; every 1st named 20 missing parameters
    without saying why. Both name the layers and the interval now."""
    src, _, _ = tiny_flamingo("llama", every=2, seed=1, num_hidden_layers=4)
    dst, _, _ = tiny_flamingo("llama", every=every, seed=2, num_hidden_layers=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"before decoder layers \[1, 3\] \(cross_attn_every_n_layers=2\), "
                       rf"the model's before .* \(cross_attn_every_n_layers={every}\).*--cross-attn-every-n-layers 2"):
        load_openflamingo_checkpoint(dst, released_format(src))
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("lm_type", ["llama", "mpt"])
def test_our_own_weights_files_load_the_openflamingo_way(tmp_path, lm_type):
    """save_pretrained's model.safetensors (and a training checkpoint's trainable.safetensors, the same
    names) hold the added-token rows as `...new_weight`: `load_state_dict(sd, strict=False)` takes
    them (it refused the file: 'does not fill ... embed_tokens.weight')."""
    from safetensors.torch import load_file

    src, ip, tok = tiny_flamingo(lm_type, seed=1)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # trained: differs from a fresh model everywhere
    out = src.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    sd = load_file(out / "model.safetensors")
    assert any(k.endswith(".new_weight") for k in sd)
    dst, _, _ = tiny_flamingo(lm_type, seed=1)
    batch = batch_for(src, ip, tok)
    assert not torch.equal(logits_of(dst, batch), logits_of(src, batch))
    dst.load_state_dict(sd, strict=False)
    trained = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
    torch.testing.assert_close(logits_of(dst, batch), logits_of(src, batch), atol=0, rtol=0)


def test_checkpoint_without_an_untied_output_head_warns_that_the_added_rows_are_random(caplog):
    """OpenFlamingo's checkpoints hold no separate lm_head (frozen, no "embed" in its name): its rows of
    the added tokens, <|endofchunk|>'s included, stay as initialised. Said, not silent; tied heads
    (MPT, OPT, ...) and a checkpoint that has the head say nothing."""
    src, _, _ = tiny_flamingo("llama", seed=1, tie_word_embeddings=False)
    dst, _, _ = tiny_flamingo("llama", seed=2, tie_word_embeddings=False)
    ckpt = released_format(src)
    assert "lang_encoder.lm_head.weight" not in ckpt
    with caplog.at_level(logging.WARNING, logger="flamingo_vlm.checkpoints"):
        load_openflamingo_checkpoint(dst, ckpt)
    assert "lang_encoder.lm_head.weight" in caplog.text and "<|endofchunk|>" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo_vlm.checkpoints"):
        head = src.state_dict()["lang_encoder.lm_head.weight"]
        load_openflamingo_checkpoint(dst, dict(ckpt, **{"lang_encoder.lm_head.weight": head}))
        tied, _, _ = tiny_flamingo("mpt", seed=2)
        load_openflamingo_checkpoint(tied, released_format(tiny_flamingo("mpt", seed=1)[0]))
    assert "lm_head" not in caplog.text


def convert_inputs(tmp_path, src, tok) -> list[str]:
    """Backbone files for `convert` (an LM directory, a tokenizer, an open_clip config and weights) and
    src's checkpoint as OpenFlamingo saves it: the command line without --out."""
    lm_dir, tok_dir = tmp_path / "lm", tmp_path / "tok"
    # A backbone directory: the LM's own weights at the tokenizer's vocabulary.
    lm = src.lang_encoder
    plain = pretrained.plain_lm_state_dict(src)
    lm.config.save_pretrained(lm_dir)
    from safetensors.torch import save_file

    save_file(plain, str(lm_dir / "model.safetensors"))
    tok.save_pretrained(tok_dir)
    vis_cfg = tmp_path / "vit.json"
    c = src.vision_encoder.config
    vis_cfg.write_text(json.dumps({"embed_dim": c["embed_dim"], "vision_cfg": {
        "image_size": c["image_size"], "layers": c["layers"], "width": c["width"], "patch_size": c["patch_size"],
        "head_width": c["width"] // c["heads"]}}))
    vis_weights = tmp_path / "vit.pt"
    torch.save({"visual." + k: v for k, v in src.vision_encoder.state_dict().items()}, vis_weights)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(released_format(src), ckpt)
    return ["convert", str(ckpt), "--vision", str(vis_cfg), "--vision-pretrained", str(vis_weights),
            "--lm", str(lm_dir), "--tokenizer", str(tok_dir)]


def test_convert_cli_round_trip(tmp_path):
    src, ip, tok = tiny_flamingo("llama", seed=3)
    out = tmp_path / "converted"
    assert cli_main(convert_inputs(tmp_path, src, tok) + ["--out", str(out)]) == 0
    loaded, ip2, tok2 = load_pretrained(out)
    batch = batch_for(src, ip2, tok2)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(src, batch), atol=1e-5, rtol=0)


def test_convert_takes_the_cross_attention_interval_from_the_checkpoint(tmp_path, capsys):
    """`convert` without --release built cross-attention before every decoder layer unless told
    --cross-attn-every-n-layers, and then refused the 4B's or 9B's checkpoint (every 2nd / 4th layer)
    with an error naming the flag: the checkpoint says where its cross-attention sits, so that is the
    default now. A flag given is still obeyed; 0 or less is a usage error before anything loads."""
    src, _, tok = tiny_flamingo("llama", every=2, seed=3, num_hidden_layers=4)
    args = convert_inputs(tmp_path, src, tok)
    out = tmp_path / "converted"
    assert cli_main(args + ["--out", str(out)]) == 0
    assert "cross-attention every 2 decoder layer(s), as in the checkpoint" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["cross_attn_every_n_layers"] == 2
    loaded, ip2, tok2 = load_pretrained(out)
    batch = batch_for(src, ip2, tok2)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(src, batch), atol=1e-5, rtol=0)
    assert cli_main(args + ["--out", str(tmp_path / "o4"), "--cross-attn-every-n-layers", "4"]) == 1
    assert "--cross-attn-every-n-layers 2" in capsys.readouterr().err
    assert cli_main(args + ["--out", str(tmp_path / "o0"), "--cross-attn-every-n-layers", "0"]) == 2
    assert "--cross-attn-every-n-layers must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["another LM", "a part", "another width", "an LM's weights", "empty"])
def test_checkpoint_errors_name_the_file_and_what_to_do(tmp_path, capsys, case):
    """A checkpoint that does not fit the model said so without naming the file (`convert` reads it
    first, then loads a dict) and, for a checkpoint of another LM family, listed every cross-attention
    parameter as "not filled" without saying the LM was the wrong one. One line now, through the API
    and the command line: the file, what is wrong, what to pass instead."""
    src, _, tok = tiny_flamingo("llama", seed=3)
    args = convert_inputs(tmp_path, src, tok)
    ckpt = Path(args[1])
    if case == "another LM":
        dst = tiny_flamingo("gpt2", seed=1)[0]
        expected = r"trained on another language model: its cross-attention sits in lang_encoder\.model\.layers.*--lm"
        # the command line, with the GPT-2 backbone as --lm
        other_lm = tmp_path / "gpt2"
        dst.lang_encoder.config.save_pretrained(other_lm)
        from safetensors.torch import save_file

        save_file(pretrained.plain_lm_state_dict(dst), str(other_lm / "model.safetensors"))
        args[args.index("--lm") + 1] = str(other_lm)
    elif case == "a part":
        torch.save({k: v for k, v in torch.load(ckpt).items() if k.startswith("perceiver.")}, ckpt)
        dst = tiny_flamingo("llama", seed=1)[0]
        expected = (r"does not fill \d+ of the model's \d+ trainable parameters: .*pass the whole checkpoint.*a part on "
                    r"purpose: flamingo_vlm\.checkpoints\.load_openflamingo_checkpoint\(model, state_dict, "
                    r"require_trainable=False\)")
        part = load_openflamingo_checkpoint(tiny_flamingo("llama", seed=1)[0], ckpt, require_trainable=False)
        assert part.loaded and all(k.startswith("perceiver.") for k in part.loaded) and part.missing_trainable
    elif case == "another width":
        dst = tiny_flamingo("llama", seed=1, hidden_size=48)[0]
        expected = r"\d+ tensor\(s\) of the checkpoint do not fit the model: [^;]*checkpoint \([^)]*32[^)]*\) vs model \([^)]*48.*trained with"
    else:  # the LM's own weights file given for the checkpoint; a file with nothing in it
        torch.save(pretrained.plain_lm_state_dict(src) if case == "an LM's weights" else {}, ckpt)
        dst = tiny_flamingo("llama", seed=1)[0]
        expected = (r"holds no Flamingo weights \(no perceiver\.\* or \*\.gated_cross_attn_layer\.\* keys; it has "
                    + (r"lm_head\.weight, model\.embed_tokens\.weight, .* \.\.\.\)" if case == "an LM's weights"
                       else r"no tensors at all\)") + ": pass OpenFlamingo's checkpoint.pt")
    with pytest.raises(CheckpointError, match=rf"^{str(ckpt)}: .*{expected}"):
        load_openflamingo_checkpoint(dst, ckpt)
    with pytest.raises(CheckpointError, match=rf"^{str(ckpt)}: "):  # a dict read from the file, named
        load_openflamingo_checkpoint(dst, torch.load(ckpt), name=ckpt)
    if case != "another width":
        code = cli_main(args + ["--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.splitlines()[-1]  # (after transformers' progress bar)
        assert code == 1 and err.startswith(f"flamingo-vlm convert: error: {ckpt}: ") and re.search(expected, err), err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["no tokenizer in the LM folder", "vision weights of another ViT",
                                  "vision weights file without any"])
def test_convert_backbone_errors_are_one_line_naming_the_file(tmp_path, capsys, case):
    """`convert` without --tokenizer (default: --lm) on an LM folder without tokenizer files failed
    with transformers' "Couldn't instantiate the backend tokenizer ...", naming nothing; vision weights
    of another architecture raised a RuntimeError (a traceback, as for a bug) listing every key over
    several lines; a --vision-pretrained file without vision weights did not name the file."""
    src, _, tok = tiny_flamingo("llama", seed=3)
    args = convert_inputs(tmp_path, src, tok)
    if case == "no tokenizer in the LM folder":
        i = args.index("--tokenizer")
        del args[i : i + 2]
        expected = f"could not load the tokenizer '{args[args.index('--lm') + 1]}' .*pass a tokenizer's directory"
    elif case == "vision weights of another ViT":
        vis_cfg = Path(args[args.index("--vision") + 1])
        cfg = json.loads(vis_cfg.read_text())
        cfg["vision_cfg"]["width"] *= 2
        vis_cfg.write_text(json.dumps(cfg))
        weights = args[args.index("--vision-pretrained") + 1]
        expected = (re.escape(weights) + r": could not load open_clip vision weights .*shape mismatches: "
                    r"\[.*\] \.\.\. \(\d+ in all\)")
    else:
        weights = args[1]  # the checkpoint itself: no vision tower in it
        args[args.index("--vision-pretrained") + 1] = weights
        expected = re.escape(weights) + ": no vision-tower weights found"
    code = cli_main(args + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 1 and err.startswith("flamingo-vlm convert: error: ") and re.search(expected, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("moved", ["--lm", "--vision-pretrained"])
def test_a_model_whose_local_backbone_moved_says_so(tmp_path, moved):
    """A converted (or saved) model names local backbones by their absolute paths; with one moved or
    deleted, loading it said "Repo id must be in the form 'repo_name' or 'namespace/repo_name':
    '/.../lm'" (the path taken for a Hub id), or called the weights file an unknown pretrained tag,
    naming neither the model's config.json nor the fix."""
    src, _, tok = tiny_flamingo("llama", seed=3)
    args = convert_inputs(tmp_path, src, tok)
    out = tmp_path / "converted"
    assert cli_main(args + ["--out", str(out)]) == 0
    backbone = Path(args[args.index(moved) + 1])
    backbone.rename(backbone.with_name(backbone.name + ".moved"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(out / "config.json")) + r" names its "
                       rf"(language model|vision encoder) by the local path {re.escape(str(backbone))}, which does not "
                       r"exist .*include_backbones=True"):
        load_pretrained(out)


def test_convert_refuses_a_random_image_encoder(tmp_path, capsys):
    """`convert --vision ViT-L-14` (or a config JSON) without `--vision-pretrained` built a random image
    encoder, and OpenFlamingo's checkpoints do not hold one: the converted model saw noise, without a
    word. Refused now, before any backbone loads; a full state dict that holds the encoder is fine."""
    ckpt = tmp_path / "checkpoint.pt"
    vis_cfg = tmp_path / "vit.json"
    vis_cfg.write_text("{}")
    for vision, held in (("ViT-L-14", {}), (str(vis_cfg), {}),
                         # what OpenFlamingo's script kept of the encoder: its "*embed*" keys, not its weights
                         ("ViT-L-14", {"vision_encoder.class_embedding": torch.zeros(4),
                                       "vision_encoder.positional_embedding": torch.zeros(2, 4)})):
        torch.save({"perceiver.latents": torch.zeros(2, 4), **held}, ckpt)
        code = cli_main(["convert", str(ckpt), "--out", str(tmp_path / "o"), "--vision", vision, "--lm", "some/lm"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("flamingo-vlm convert: error: ") and "--vision-pretrained" in err and str(ckpt) in err
    assert not (tmp_path / "o").exists()
    # A checkpoint with the encoder's weights passes the check (and fails later, on the made-up LM).
    torch.save({"vision_encoder.conv1.weight": torch.zeros(1), "perceiver.latents": torch.zeros(2, 4)}, ckpt)
    assert cli_main(["convert", str(ckpt), "--out", str(tmp_path / "o"), "--vision", str(vis_cfg), "--lm",
                     str(tmp_path / "nolm")]) == 1
    assert "--vision-pretrained" not in capsys.readouterr().err


# -- the released architectures, on the meta device -------------------------------------------------
@pytest.mark.parametrize("repo_id", sorted(OPENFLAMINGO_RELEASES))
def test_released_architectures_key_names_and_shapes(repo_id):
    release = OPENFLAMINGO_RELEASES[repo_id]
    spec = dict(release.lm_config)
    with torch.device("meta"):
        lm = causal_lm_from_config(spec)  # as load_causal_lm builds it (MosaicGPT for the 3B models)
        lm.resize_token_embeddings(OPENFLAMINGO_TOKENIZER_LEN + 3, mean_resizing=False)
        vision = OpenCLIPVisionTransformer.from_open_clip_name(release.vision)
        n = OPENFLAMINGO_TOKENIZER_LEN
        model = Flamingo(vision, lm, eoc_token_id=n, media_token_id=n + 1, vis_dim=vision.hidden_size,
                         cross_attn_every_n_layers=release.cross_attn_every_n_layers, pad_token_id=n + 2)
    sd = model.state_dict()
    assert sd["perceiver.latents"].shape == (64, 1024)
    assert sd["perceiver.layers.5.0.to_kv.weight"].shape == (1024, 1024)
    assert sd["perceiver.layers.0.1.1.weight"].shape == (4096, 1024)
    every = release.cross_attn_every_n_layers
    n_layers = spec.get("n_layers") or spec.get("num_hidden_layers")
    d = spec.get("d_model") or spec.get("hidden_size")
    path = "transformer.blocks" if release.lm_config["model_type"] in ("mpt", "mosaic_gpt") else "gpt_neox.layers"
    with_xattn = [i for i in range(n_layers) if f"lang_encoder.{path}.{i}.gated_cross_attn_layer.attn_gate" in sd]
    assert with_xattn == [i for i in range(n_layers) if (i + 1) % every == 0]
    k = with_xattn[-1]
    prefix = f"lang_encoder.{path}.{k}.gated_cross_attn_layer."
    assert sd[prefix + "attn_gate"].shape == (1,)
    assert sd[prefix + "attn.to_q.weight"].shape == (512, d)
    assert sd[prefix + "attn.to_kv.weight"].shape == (1024, 1024)
    assert sd[prefix + "attn.to_out.weight"].shape == (d, 512)
    assert sd[prefix + "ff.1.weight"].shape == (4 * d, d)
    embed = "lang_encoder.transformer.wte.weight" if path.startswith("transformer") else "lang_encoder.gpt_neox.embed_in.weight"
    assert sd[embed].shape == (50280, d)
    if "gpt_neox" in path:  # released as embed_out, transformers 5 calls it lm_head
        assert sd["lang_encoder.lm_head.weight"].shape == (50280, d)
    assert f"lang_encoder.{path}.0.decoder_layer.attn.Wqkv.weight" in sd or f"lang_encoder.{path}.0.decoder_layer.attention.query_key_value.weight" in sd


def test_mosaic_gpt_checkpoint_maps_onto_transformers_mpt(tmp_path):
    """OpenFlamingo-3B's LM is a remote-code MosaicGPT; its weights load into MptForCausalLM."""
    from flamingo_vlm.lm_loading import load_causal_lm
    from tiny import tiny_lm

    mpt = tiny_lm("mpt", vocab_size=64)
    renames = {".norm_1.": ".ln_1.", ".norm_2.": ".ln_2.", ".ffn.up_proj.": ".mlp.mlp_up.",
               ".ffn.down_proj.": ".mlp.mlp_down.", "transformer.norm_f.": "transformer.ln_f."}
    sd = {}
    for key, value in mpt.state_dict().items():
        if key == "lm_head.weight":
            continue
        for new, old in renames.items():
            key = key.replace(new, old)
        sd[key] = value
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mosaic_gpt", "d_model": 32, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 128,
        "vocab_size": 64, "alibi": True, "alibi_bias_max": 8, "no_bias": True}))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_causal_lm(str(tmp_path))
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, mpt.eval()(ids).logits)
    del sd["transformer.blocks.0.ln_1.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="norm_1"):
        load_causal_lm(str(tmp_path))


# -- damaged files are named ---------------------------------------------------------------------------
def test_damaged_weights_files_are_named(tmp_path, capsys):
    from flamingo_vlm.checkpoints import WeightsFileError, load_weights_file

    model, ip, tok = tiny_flamingo("llama", every=2)
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # an interrupted download
    with pytest.raises(WeightsFileError, match="truncated or corrupt") as e:
        load_pretrained(out)
    assert str(weights) in str(e.value) and e.value.path == weights

    junk = tmp_path / "checkpoint.pt"
    junk.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    with pytest.raises(WeightsFileError, match=rf"cannot read torch file {junk}"):
        load_weights_file(junk)
    pickled = tmp_path / "objects.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)  # a training script's whole state, not weights
    with pytest.raises(WeightsFileError, match="holds objects other than tensors.*argparse.Namespace"):
        load_weights_file(pickled)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        load_weights_file(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match=rf"{out} is a directory"):
        load_weights_file(out)

    # `convert` reads the checkpoint before it builds the backbones: one line naming the file, exit 1
    capsys.readouterr()
    for bad in (junk, weights):
        code = cli_main(["convert", str(bad), "--out", str(tmp_path / "converted"), "--vision", "ViT-L-14",
                         "--lm", "some/lm"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith("flamingo-vlm convert: error: cannot read ") and str(bad) in err
    assert not (tmp_path / "converted").exists()


def test_a_run_or_a_checkpoint_given_as_a_model_says_what_to_load(tmp_path):
    """A training run's directory names its exported model; a training checkpoint (which said "has no
    config.json; is it a flamingo-vlm model directory?") says how to export it."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"its exported model is {run / 'final'}"):
        load_pretrained(run)
    ckpt = run / "checkpoints" / "step_00000030"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"training checkpoint, not a model: export it with "
                       f"`flamingo-vlm train --export-checkpoint {ckpt} --export-to DIR`"):
        load_pretrained(ckpt)
    with pytest.raises(FileNotFoundError, match="has no config.json; is it a flamingo-vlm model directory"):
        load_pretrained(run / "checkpoints")


def test_load_pretrained_takes_the_dtype_names_the_command_line_takes():
    """dtype="auto" or "bfloat16" reached model.to and failed as torch's TypeError."""
    from flamingo_vlm.modeling.fast_linear import auto_dtype

    model, _, _ = load_pretrained("smol-synthetic", dtype="bf16")
    assert next(model.perceiver.parameters()).dtype == torch.bfloat16
    model, _, _ = load_pretrained("smol-synthetic", dtype="auto")
    assert next(model.perceiver.parameters()).dtype == auto_dtype(None)
    with pytest.raises(ValueError, match=r"dtype='bfloat': give a torch dtype, 'auto' or one of bf16, bfloat16"):
        load_pretrained("smol-synthetic", dtype="bfloat")


def test_a_referenced_built_in_encoder_writes_no_weights_that_go_unread(tmp_path):
    """include_backbones=True (a LoRA run's export) wrote the built-in encoder's weights, 14 MB, while
    config.json referenced it as builtin: and the loader never read them."""
    model, ip, tok = load_pretrained("smol-synthetic")
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip, include_backbones=True)
    assert json.loads((out / "config.json").read_text())["vision_encoder"]["type"] == "reference"
    assert not (out / "vision_encoder").exists() and (out / "language_model").is_dir()
    assert load_pretrained(out)[0] is not None
