"""The text between one demonstration's ``<|endofchunk|>`` and the next ``<image>`` is the model's
(``FlamingoConfig.demo_separator``, in ``config.json``): OpenFlamingo's checkpoints were trained on
documents with nothing there (its README's prompt ``<image>An image of two cats.<|endofchunk|><image>An
image of``), the built-in model on few-shot prompts with a newline there (its training configs'
``chunk_separator``). Whatever joins demonstrations for a user writes the model's: the server's chat
mapping, the page (through ``/v1/models``), ``flamingo-vlm generate --demo``, and a training run
records the data's in the model it exports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from test_serve_fixtures import MODEL_NAME, readable_tiny, require, running_server
from tiny import tiny_flamingo

from flamingo_vlm.cli import main
from flamingo_vlm.generate import demo_tasks
from flamingo_vlm.pretrained import read_config
from flamingo_vlm.references import model_source
from flamingo_vlm.registry import DEFAULT_MODEL
from flamingo_vlm.serve.prompt import chat_to_prompt
from flamingo_vlm.serve.schemas import ChatCompletionRequest
from flamingo_vlm.train.build import declare_demo_separator
from flamingo_vlm.train.config import DataConfig, TrainConfig

httpx = require("httpx")

REPO = Path(__file__).resolve().parents[1]
EOC = "<|endofchunk|>"


def captioning_chat(separator: str):
    messages = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "An image of"}]},
        {"role": "assistant", "content": " two cats."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:b"}},
                                     {"type": "text", "text": "An image of"}]},
    ]}).messages
    return chat_to_prompt(messages, separator=separator)[0]


def test_chat_mapping_joins_demonstrations_with_the_models_separator():
    # OpenFlamingo's format (its README's few-shot prompt): nothing between the demonstrations
    assert captioning_chat("") == "<image>An image of two cats.<|endofchunk|><image>An image of"
    # a model trained with a newline there (the built-in one) gets its newline
    assert captioning_chat("\n") == "<image>An image of two cats.<|endofchunk|>\n<image>An image of"


def test_openflamingo_models_declare_no_separator():
    model, _, _ = tiny_flamingo("llama")  # built as OpenFlamingo's create_model_and_transforms builds
    assert model.config.demo_separator == ""


def test_the_builtin_model_declares_the_separator_it_was_trained_with():
    """The shipped weights end with stage 14 (its model card); every interleaved dataset of that stage
    put "\\n" after each chunk's <|endofchunk|>."""
    stage = yaml.safe_load((REPO / "configs" / "smol-synthetic-stage14.yaml").read_text())
    trained = {d.get("chunk_separator", "") for d in stage["data"] if d.get("kind", "interleaved") == "interleaved"}
    assert trained == {"\n"}
    assert read_config(model_source(DEFAULT_MODEL).path)[0].demo_separator == "\n"


def _prompt_tokens(base: str, **body) -> int:
    r = httpx.post(base + body.pop("path"), json={"max_tokens": 1, "temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("separator", ["\n", ""])
def test_a_saved_models_separator_reaches_the_served_chat(tmp_path, separator):
    model, image_processor, tokenizer = readable_tiny()
    model.config = model.config.replace(demo_separator=separator)
    out = model.save_pretrained(tmp_path / MODEL_NAME, tokenizer=tokenizer, image_processor=image_processor)
    assert json.loads((out / "config.json").read_text())["demo_separator"] == separator
    chat = [{"role": "user", "content": "Question: colour? Short answer:"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Question: shape? Short answer:"}]
    with running_server(out) as (base, engine):
        card = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]
        assert card["demo_separator"] == separator  # what the page joins its steps with
        by_chat = _prompt_tokens(base, path="/v1/chat/completions", messages=chat)
        by_hand = _prompt_tokens(base, path="/v1/completions", prompt=(
            f"Question: colour? Short answer:red{EOC}{separator}Question: shape? Short answer:"))
        assert by_chat == by_hand


def test_a_config_written_before_the_separator_existed_reads_as_openflamingos(tmp_path):
    model, image_processor, tokenizer = readable_tiny()
    out = model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, image_processor=image_processor)
    data = json.loads((out / "config.json").read_text())
    del data["demo_separator"]
    (out / "config.json").write_text(json.dumps(data))
    assert read_config(out)[0].demo_separator == ""
    data["demo_separator"] = 1
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json does not describe a model .*demo_separator must be a string"):
        read_config(out)


def test_demo_prompts_carry_no_separator_of_their_own():
    for task in demo_tasks():
        texts = [v for k, v in task.items if k == "text"]
        assert all(not t.startswith(("\n", " ")) for t in texts)  # nothing baked in before an image
        joined = [v for k, v in task.joined("\n") if k == "text"]
        assert [t for t in joined if t.endswith(EOC + "\n")] == [t + "\n" for t in texts if t.endswith(EOC)]
        assert task.joined("") == task.items


@pytest.mark.parametrize("separator", ["\n", ""])
def test_generate_demo_joins_with_the_models_separator(tmp_path, capsys, separator):
    model, image_processor, tokenizer = tiny_flamingo("llama", max_position_embeddings=512)
    model.config = model.config.replace(demo_separator=separator)
    out = model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, image_processor=image_processor)
    assert main(["generate", "--demo", "--model", str(out), "--max-new-tokens", "1", "--json"]) == 0
    prompts = [r["prompt"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert all(f"{EOC}[" not in p for p in prompts) if separator else all(f"{EOC}\n" not in p for p in prompts)
    assert all(f"{EOC}{separator}[" in p for p in prompts)


def _train_config(*data: DataConfig) -> TrainConfig:
    return TrainConfig(data=list(data))


def test_a_training_run_records_its_datas_separator(caplog):
    model, _, _ = tiny_flamingo("llama")
    declare_demo_separator(model, _train_config(DataConfig(kind="pairs"), DataConfig(chunk_separator="\n")))
    assert model.config.demo_separator == "\n"  # pairs have one chunk: no say
    declare_demo_separator(model, _train_config(DataConfig(kind="pairs")))
    assert model.config.demo_separator == "\n"  # no interleaved data: kept
    with caplog.at_level(logging.WARNING, logger="flamingo_vlm.train"):
        declare_demo_separator(model, _train_config(DataConfig(chunk_separator=" "), DataConfig(chunk_separator="")))
    assert model.config.demo_separator == "\n" and "join their chunks differently" in caplog.text
    # unset: the data joins its chunks with the model's own, which stays (a fine-tune of the built-in
    # model on interleaved data changed its "\n" to "", silently)
    declare_demo_separator(model, _train_config(DataConfig(), DataConfig(chunk_separator=None)))
    assert model.config.demo_separator == "\n"
    declare_demo_separator(model, _train_config(DataConfig(chunk_separator="")))
    assert model.config.demo_separator == ""  # OpenFlamingo's interleaved format, asked for


def test_generate_image_text_lists_join_with_the_models_separator(tmp_path, capsys):
    """--image/--text demonstrations get the model's separator after their <|endofchunk|>, as a chat
    does; --prompt is taken as written."""
    from PIL import Image
    from tiny import random_images

    model, image_processor, tokenizer = tiny_flamingo("llama")
    model.config = model.config.replace(demo_separator="\n")
    out = model.save_pretrained(tmp_path / "m", tokenizer=tokenizer, image_processor=image_processor)
    images = []
    for i, im in enumerate(random_images(2, size=32)):
        Image.fromarray(im).save(tmp_path / f"im{i}.png")
        images.append(str(tmp_path / f"im{i}.png"))
    common = ["generate", "--model", str(out), "--max-new-tokens", "4", "--json"]
    assert main([*common, "--image", images[0], "--text", f"Output:a b{EOC}", "--image", images[1],
                 "--text", "Output:"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["prompt"] == f"<image>Output:a b{EOC}\n<image>Output:"
    assert main([*common, "--prompt", f"<image>Output:a b{EOC}\n<image>Output:", "--images", *images]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == listed["outputs"]
    assert main([*common, "--prompt", f"<image>Output:a b{EOC}<image>Output:", "--images", *images]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == f"<image>Output:a b{EOC}<image>Output:"  # as written
