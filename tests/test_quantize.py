"""Weight-only int8/int4 quantization (flamingo_vlm.modeling.quantize) on tiny random models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny import random_images, tiny_flamingo

from flamingo_vlm.modeling.quantize import QuantizedLinear, quantization_of, quantize_model, weight_bytes

MODES = ("int8", "int4")
# Relative error (Frobenius) of one layer's output against the unquantized layer, on Gaussian weights:
# int8 per-row ~0.5%, int4 per 32-group ~8%. A wrong scale, zero point or packing gives ~100%.
LAYER_TOL = {"int8": 0.02, "int4": 0.15}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("mode", MODES)
def test_layer_computes_with_its_rounded_weight(mode):
    torch.manual_seed(0)
    layer = nn.Linear(128, 40, bias=True)  # 40 rows: int4 pads to 48
    q = QuantizedLinear(layer, mode)
    x = torch.randn(2, 3, 128)
    out = q(x)
    assert out.shape == (2, 3, 40) and out.dtype == torch.float32
    # what the kernel computes = F.linear with the dequantized weight (bf16 activations: ~0.5%)
    assert rel_err(out, F.linear(x, q.dequantized_weight(), layer.bias)) < 0.01
    # and that weight is close to the original one
    assert rel_err(q.dequantized_weight(), layer.weight) < LAYER_TOL[mode]
    assert rel_err(out, layer(x)) < LAYER_TOL[mode]
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_int4_rounding_is_per_group_not_per_row():
    # one row with a huge outlier in its first group: the other groups keep their own resolution
    w = torch.randn(16, 64) * 0.01
    w[0, 0] = 10.0
    layer = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    deq = QuantizedLinear(layer, "int4").dequantized_weight()
    assert rel_err(deq[0, 32:], w[0, 32:]) < 0.15


@pytest.fixture(scope="module")
def tiny():
    model, ip, tok = tiny_flamingo("llama")
    images = random_images(2, size=32)
    vision_x = torch.stack([ip(im) for im in images]).unsqueeze(0).unsqueeze(2)  # (1, 2 images, 1 frame, C, H, W)
    media = tok.convert_tokens_to_ids("<image>")
    ids = tok("a red car<|endofchunk|> two cats", return_tensors="pt").input_ids
    lang_x = torch.cat([torch.tensor([[media]]), ids[:, :4], torch.tensor([[media]]), ids[:, 4:]], 1)
    return model, ip, tok, vision_x, lang_x


def _logits(model, vision_x, lang_x):
    with torch.inference_mode():
        return model(vision_x, lang_x, attention_mask=torch.ones_like(lang_x)).logits


@pytest.mark.parametrize("mode", MODES)
def test_quantized_model_logits_close_to_unquantized(tiny, mode):
    import copy

    model, _ip, _tok, vision_x, lang_x = tiny
    ref = _logits(model, vision_x, lang_x)
    q = copy.deepcopy(model)
    report = quantize_model(q, mode)
    n = sum(isinstance(m, QuantizedLinear) for m in q.modules())
    assert report["quantized"] == n > 0 and quantization_of(q) == mode
    # LM blocks, cross-attention and perceiver are quantized (and with int8 the head); vision encoder and
    # embeddings are not
    assert any(isinstance(m, QuantizedLinear) for m in q.perceiver.modules())
    assert all(isinstance(m, QuantizedLinear) for m in (b.to_out for b in [x.attn for x in q.gated_cross_attn_layers()]))
    assert not any(isinstance(m, QuantizedLinear) for m in q.vision_encoder.modules())
    head_quantized = type(q.lang_encoder.get_output_embeddings()) is not type(model.lang_encoder.get_output_embeddings())
    assert head_quantized == (mode == "int8")
    assert weight_bytes(q) < weight_bytes(model)
    out = _logits(q, vision_x, lang_x)
    assert out.shape == ref.shape
    err = rel_err(out - out.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True))
    assert err < {"int8": 0.05, "int4": 0.35}[mode], err
    # the images still matter through the quantized cross-attention
    other = _logits(q, vision_x.flip(1), lang_x)
    assert not torch.allclose(other, out)


@pytest.mark.parametrize("mode", MODES)
def test_generate_runs_on_a_quantized_model(tiny, mode):
    import copy

    model, _ip, _tok, vision_x, lang_x = tiny
    q = copy.deepcopy(model)
    quantize_model(q, mode)
    with torch.inference_mode():
        out = q.generate(vision_x, lang_x, torch.ones_like(lang_x), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, num_beams=1)
        first = _logits(q, vision_x, lang_x)[0, -1].argmax()
    assert out.shape == (1, lang_x.shape[1] + 5)
    assert torch.equal(out[0, : lang_x.shape[1]], lang_x[0])
    assert out[0, lang_x.shape[1]] == first  # greedy = the quantized model's own argmax


def test_unsupported_shapes_are_left_in_full_precision():
    net = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 32))  # int4 needs in % group_size == 0
    report = quantize_model(net, "int4")
    assert report == {"quantized": 1, "skipped": 1}
    assert isinstance(net[0], QuantizedLinear) and type(net[2]) is nn.Linear
    assert net(torch.randn(3, 64)).shape == (3, 32)
    # 10 output rows (not a multiple of the kernel's 16): padded with zero rows, sliced off
    x = torch.randn(3, 64)
    assert net[0](x).shape == (3, 10) and net[0].dequantized_weight().shape == (10, 64)
    # int8: torch's kernel needs in_features % 16 == 0 (it crashed or was wrong at 8, 37, 40 inputs)
    net = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8))
    assert quantize_model(net, "int8") == {"quantized": 1, "skipped": 1}
    x = torch.randn(12, 48)  # 12 rows: torch's kernel, also where ours takes decode-sized calls
    assert rel_err(net(x), net[2](F.relu(F.linear(x, net[0].dequantized_weight(), net[0].bias)))) < 0.01


def test_bad_modes_and_devices_are_one_line_errors():
    net = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"quantize='int3' is not supported: use one of 'int8', 'int4'"):
        quantize_model(net, "int3")
    with pytest.raises(ValueError, match="group_size=16"):
        quantize_model(net, "int4", group_size=16)
    assert quantize_model(net, None) == {"quantized": 0, "skipped": 0} and type(net[0]) is nn.Linear
    quantize_model(net, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(net, "int4")
    with pytest.raises(ValueError, match="runs on CPU only"):
        net(torch.randn(2, 32, device="meta"))
    meta = nn.Sequential(nn.Linear(32, 32, device="meta"))
    with pytest.raises(ValueError, match="runs on CPU only.*meta"):
        quantize_model(meta, "int8")


def test_saving_a_quantized_model_is_refused(tiny, tmp_path):
    import copy

    model, ip, tok, _v, _l = tiny
    q = copy.deepcopy(model)
    quantize_model(q, "int8")
    with pytest.raises(ValueError, match="cannot save_pretrained a model quantized to int8") as e:
        q.save_pretrained(tmp_path / "q", tokenizer=tok, image_processor=ip)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()



@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_training_a_quantized_model_is_refused_at_backward(tiny, mode):
    """A training step on a quantized model (through the Python API; `train` has no --quantize) failed
    inside autograd with "derivative for aten::_weight_int8pack_mm is not implemented", or, on a route
    that has a derivative, trained on rounded weights that cannot be saved. One line saying what to do
    now; the forward pass with gradients on (outside no_grad) still runs, and the logits are the same."""
    import copy

    model, ip, tok, vision_x, lang_x = tiny
    q = copy.deepcopy(model)
    quantize_model(q, mode)
    q.train()
    out = q(vision_x, lang_x, labels=lang_x)
    assert out.loss.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(q(vision_x, lang_x).logits, out.logits.detach())
    with pytest.raises(ValueError, match=f"a model quantized to {mode} is for inference and cannot be trained") as e:
        out.loss.backward()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_a_checkpoint_into_a_quantized_model_is_refused(tiny, mode):
    """(The Quickstart's load_state_dict after quantize=: the fp32 weights would match nothing, and the
    model would run on its random adapter.)"""
    import copy

    from flamingo_vlm.checkpoints import CheckpointError

    model, *_ = tiny
    sd = model.state_dict()
    q = copy.deepcopy(model)
    quantize_model(q, mode)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"this model is quantized to {mode}: load the checkpoint into") as e:
        q.load_state_dict(sd, strict=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())

def test_factory_and_from_pretrained_take_quantize(tiny, tmp_path):
    from tiny import tiny_lm, tiny_tokenizer, tiny_vision

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.pretrained import from_pretrained

    tok = tiny_tokenizer()
    model, _ip, _tok = create_model_and_transforms(tiny_vision(), None, tiny_lm("llama", vocab_size=len(tok)), tok,
                                                   quantize="int4")
    assert quantization_of(model) == "int4"
    with pytest.raises(ValueError, match="quantize='fp8'"):
        create_model_and_transforms(tiny_vision(), None, tiny_lm("llama", vocab_size=len(tok)), tok, quantize="fp8")
    base, ip, tok, _v, _l = tiny
    base.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    loaded, _, _ = from_pretrained(tmp_path / "m", quantize="int8")
    assert quantization_of(loaded) == "int8"
    assert any(isinstance(m, QuantizedLinear) for m in loaded.modules())
    with pytest.raises(ValueError, match="quantize='int2'"):
        from_pretrained(tmp_path / "m", quantize="int2")


def test_cli_flag(tiny, tmp_path, capsys):
    import json

    from PIL import Image

    from flamingo_vlm.cli import build_parser, main

    model, ip, tok, _v, _l = tiny
    model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    Image.fromarray(random_images(1, size=32)[0]).save(tmp_path / "im.png")
    code = main(["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "im.png"), "--text", "a",
                 "--max-new-tokens", "3", "--json", "--quantize", "int8"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["outputs"]) == 1
    parser = build_parser()
    for cmd in (["generate"], ["serve"], ["evaluate", "--tasks", "coco"]):
        assert parser.parse_args([*cmd, "--quantize", "int4"]).quantize == "int4"
        assert parser.parse_args(cmd).quantize is None
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*cmd, "--quantize", "int3"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--quantize: invalid choice: 'int3'" in err


def test_the_server_says_its_model_is_quantized(tiny):
    """`serve --quantize int4` logged "serving 'smol-synthetic' (float32, ...)", as for the full model."""
    import copy

    from flamingo_vlm.modeling.quantize import weights_summary

    model, *_ = tiny
    assert weights_summary(model) == "float32"
    q = copy.deepcopy(model)
    quantize_model(q, "int4")
    assert weights_summary(q) == "float32, int4 weights"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tied", [True, False])
def test_head_quantization_keeps_the_added_token_rows(tied, mode):
    import copy

    model, ip, tok = tiny_flamingo("llama", tie_word_embeddings=tied)
    media = tok.convert_tokens_to_ids("<image>")
    lang_x = torch.tensor([[media, *tok("a red car two cats").input_ids]])
    vision_x = torch.stack([ip(im) for im in random_images(1, size=32)]).unsqueeze(0).unsqueeze(2)
    ref = _logits(model, vision_x, lang_x)
    q = copy.deepcopy(model)
    before = quantize_model(copy.deepcopy(model), mode, head=False)["quantized"]
    assert quantize_model(copy.deepcopy(model), mode)["quantized"] == before + (mode == "int8")  # the default
    assert quantize_model(q, mode, head=True)["quantized"] == before + 1
    head = q.lang_encoder.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) or isinstance(head.quantized, QuantizedLinear)
    if tied:  # the embedding keeps its fp weight for look-ups
        assert q.lang_encoder.get_input_embeddings().weight.dtype == torch.float32
    out = _logits(q, vision_x, lang_x)
    assert rel_err(out - out.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)) < {"int8": 0.05, "int4": 0.35}[mode]
    new_ids = [tok.convert_tokens_to_ids(t) for t in ("<image>", "<|endofchunk|>")]
    # the added tokens' logits come from their own rows (the <image> row is -inf-masked or equal in both)
    if mode == "int8":
        assert torch.allclose(out[..., new_ids[1]], ref[..., new_ids[1]], rtol=0.05, atol=0.05)


def test_the_fp32_int8_gemm_route_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast (``evaluate --quantize int8 --precision amp_bf16``) the fp32 route's product
    was cast back to bf16 by autocast: an emulated bf16 GEMM, 5x slower on the AVX2-only EPYC."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flamingo_vlm.modeling.kernels import int8_gemm

    class MmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.dtypes.append(args[-2].dtype if func.overloadpacket is torch.ops.aten.addmm else args[0].dtype)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g)
    q = torch.randint(-127, 128, (24, 32), generator=g, dtype=torch.int8)
    s = torch.rand(24, generator=g) * 0.01
    want = int8_gemm(x, q, s, None, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16), MmDtypes() as seen:
        got = int8_gemm(x, q, s, None, "fp32")
    assert seen.dtypes == [torch.float32]
    torch.testing.assert_close(got, want)
