"""bf16 products as fp32 GEMMs where bf16 is emulated (``kernels.upcast_linear``, ``fast_linear.conv``,
``attention.sdpa``): torch's bf16 results up to rounding, forward and backward, the same tensors kept
for backward, and taken only where this machine's ``bf16_gemm`` choice says so."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flamingo_vlm.modeling import attention, fast_linear, kernels
from flamingo_vlm.modeling.kernels import upcast_linear

BF16 = torch.bfloat16


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-2):
    """Equal up to bf16 rounding, relative to the largest magnitude (sums of bf16-rounded terms)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.detach(), want.detach()
    scale = want.float().abs().max().clamp_min(1e-6)
    assert float((got.float() - want.float()).abs().max() / scale) <= rel


@pytest.fixture
def chosen(fresh):
    """The ``bf16_gemm`` choice, set by the test (no probe)."""
    kernels._MEMO["gemm"] = False  # (fp32 calls in a routing block: torch's GEMM, no probe)

    def choose(value: bool):
        kernels._MEMO["bf16_gemm"] = value
    return choose


def saved(fn):
    """What autograd keeps for backward while ``fn()`` runs: [(dtype, shape)]."""
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sorted(kept, key=str)


@pytest.mark.parametrize("trained", [True, False])
def test_upcast_linear_is_torchs_bf16_linear_under_autocast_forward_and_backward(trained):
    x = torch.randn(3, 20, 48)
    w, b = torch.randn(72, 48) * 0.1, torch.randn(72)
    results = []
    for f in (F.linear, upcast_linear):
        xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(trained), b.clone().requires_grad_(trained)
        with torch.autocast("cpu", dtype=BF16):
            y, kept = saved(lambda: f(xs, ws, bs))
        (y.float().square()).sum().backward()
        results.append((y, xs.grad, ws.grad, bs.grad, kept))
    (y0, gx0, gw0, gb0, kept0), (y1, gx1, gw1, gb1, kept1) = results
    assert y1.dtype == BF16
    assert_close(y1, y0)
    assert gx1.dtype == torch.float32
    assert_close(gx1, gx0)
    if trained:
        assert_close(gw1, gw0)
        assert_close(gb1, gb0)
    else:
        assert gw1 is None and gb1 is None
    # the same bf16 tensors kept as torch's bf16 linear keeps: no fp32 copies
    assert {d for d, _ in kept1} == {BF16}
    assert sum(torch.Size(s).numel() for _, s in kept1) <= sum(torch.Size(s).numel() for _, s in kept0)


def test_upcast_linear_on_bf16_operands_without_gradients():
    x, w, b = torch.randn(40, 64).to(BF16), (torch.randn(96, 64) * 0.1).to(BF16), torch.randn(96).to(BF16)
    with torch.no_grad():
        assert_close(upcast_linear(x, w, b), F.linear(x, w, b))
        assert_close(upcast_linear(x.unsqueeze(0), w), F.linear(x.unsqueeze(0), w))


def test_routed_linears_take_the_fp32_route_only_where_chosen(chosen, monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    calls = []
    real = fast_linear.upcast_linear
    monkeypatch.setattr(fast_linear, "upcast_linear", lambda *a: calls.append(1) or real(*a))
    layer = nn.Linear(32, 48)
    x = torch.randn(4, 16, 32)  # 64 rows: more than a decode step
    want = layer.to(BF16)(x.to(BF16))
    for choice, expect in ((True, 1), (False, 0)):
        calls.clear()
        chosen(choice)
        with torch.no_grad(), fast_linear.onednn_linears(layer):
            got = layer(x.to(BF16))
        assert len(calls) == expect
        assert_close(got, want)
    chosen(True)
    calls.clear()
    with torch.no_grad():
        layer(x.to(BF16))  # outside a routing block: torch's own
    layer.float()
    with fast_linear.onednn_linears(layer):
        layer(x)  # fp32 outside autocast: not a bf16 product
        assert not calls
        with torch.autocast("cpu", dtype=BF16):
            y = layer(x.requires_grad_())
        y.float().sum().backward()
    assert len(calls) == 1 and y.dtype == BF16 and x.grad is not None


def test_bf16_convolution_runs_on_fp32_values_where_chosen(chosen, monkeypatch):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    conv = nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=False).to(BF16)
    x = torch.randn(2, 3, 32, 32).to(BF16)
    want = conv(x)
    chosen(True)
    with torch.no_grad(), fast_linear.onednn_linears(conv):
        got = fast_linear.conv(conv, x)
    assert got.dtype == BF16
    assert_close(got, want)
    conv.weight.requires_grad_(True)
    calls = []
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, t: calls.append(1) or F.conv2d(t, self.weight, stride=8))
    with fast_linear.onednn_linears(conv):
        fast_linear.conv(conv, x)  # a trained weight: torch's own convolution (with its backward)
    assert calls == [1]


class SamePadConv(nn.Conv2d):
    """Like EfficientNet-PyTorch's "same" padding convolutions: its own forward calls ``F.conv2d``."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.ReLU(), SamePadConv(8, 8, 3, groups=8),  # depthwise
                         nn.Conv2d(8, 16, 1))


class OpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtype of the first input of every call of ``op`` that reaches torch's kernels."""

    def __init__(self, op):
        super().__init__()
        self.op, self.dtypes = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is self.op:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def conv_dtypes(fn):
    with OpDtypes(torch.ops.aten.convolution) as seen:
        out = fn()
    return out, seen.dtypes


def test_a_backbones_own_conv2d_calls_run_on_fp32_values_where_chosen(chosen):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    net = backbone().to(BF16)
    x = torch.randn(2, 3, 16, 16).to(BF16)

    def run():
        with torch.no_grad(), fast_linear.onednn_linears(net), fast_linear.upcast_convs(net):
            return net(x)

    with torch.no_grad():
        want, dtypes = conv_dtypes(lambda: net(x))
    assert dtypes == [BF16] * 3  # torch's own: bf16 convolutions
    chosen(True)
    got, dtypes = conv_dtypes(run)
    assert dtypes == [torch.float32] * 3 and got.dtype == BF16  # every one, the depthwise one included
    assert_close(got, want)
    chosen(False)  # where bf16 is native (or measured faster): torch's bf16 convolutions
    assert conv_dtypes(run)[1] == [BF16] * 3
    chosen(True)
    with torch.no_grad(), fast_linear.upcast_convs(net):  # outside a routing block: nothing changes
        assert conv_dtypes(lambda: net(x))[1] == [BF16] * 3
    net.float()  # fp32 weights, fp32 input: no bf16 product, no mode
    with torch.no_grad(), fast_linear.onednn_linears(net):
        assert isinstance(fast_linear.upcast_convs(net), type(fast_linear.contextlib.nullcontext()))
        with torch.autocast("cpu", dtype=BF16), fast_linear.upcast_convs(net):  # a frozen backbone in a bf16 autocast step
            y, dtypes = conv_dtypes(lambda: net(x.float()))
        assert dtypes == [torch.float32] * 3 and y.dtype == BF16
        with torch.autocast("cpu", dtype=BF16):
            assert_close(y, net(x.float()))


@pytest.mark.parametrize("form", ["two arguments", "bias by keyword", "padding by keyword", "all positional"])
def test_every_conv2d_call_form_is_taken_as_torch_takes_it(chosen, form):
    """``F.conv2d(x, w)``, ``F.conv2d(x, w, bias=b, padding="same")``, ...: a blur filter or a
    backbone's own call, with or without a bias, arguments by position or keyword."""
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    x = torch.randn(2, 4, 10, 10).to(BF16)
    w, b = (torch.randn(4, 1, 3, 3) * 0.3).to(BF16), torch.randn(4).to(BF16)
    call = {"two arguments": lambda: F.conv2d(x, w.expand(4, 4, 3, 3).contiguous()),
            "bias by keyword": lambda: F.conv2d(x, w, bias=b, stride=2, groups=4),
            "padding by keyword": lambda: F.conv2d(x, w, None, padding="same", groups=4),
            "all positional": lambda: F.conv2d(x, w, b, 1, "same", 1, 4)}[form]
    holder = nn.Conv2d(4, 4, 1).to(BF16)  # (upcast_convs enters its mode for modules with a bf16 conv)
    with torch.no_grad():
        want = call()
        chosen(True)
        with fast_linear.onednn_linears(holder), fast_linear.upcast_convs(holder):
            got, dtypes = conv_dtypes(call)
    assert dtypes == [torch.float32]
    assert_close(got, want)


def test_image_encoding_compiles_as_one_graph():
    """``upcast_convs`` looks at the routing block's context variable only outside ``torch.compile``
    (dynamo cannot trace it)."""
    from tiny import tiny_flamingo

    model, _, _ = tiny_flamingo()
    compiled = torch.compile(model.encode_vision_x, fullgraph=True, backend="eager")
    x = torch.randn(1, 2, 1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.encode_vision_x(x))


def test_the_conv_mode_is_the_entering_threads_alone(chosen):
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    import threading

    chosen(True)
    net = backbone().to(BF16)
    x = torch.randn(1, 3, 16, 16).to(BF16)
    entered, done, other = threading.Event(), threading.Event(), []

    def elsewhere():  # another request's thread, in a routing block of its own but not encoding images
        if entered.wait(30):
            with torch.no_grad(), fast_linear.onednn_linears(net):
                other.extend(conv_dtypes(lambda: net(x))[1])
        done.set()

    thread = threading.Thread(target=elsewhere, daemon=True)
    thread.start()
    try:
        with torch.no_grad(), fast_linear.onednn_linears(net), fast_linear.upcast_convs(net):
            entered.set()
            done.wait(30)
            mine = conv_dtypes(lambda: net(x))[1]
    finally:
        entered.set()
        thread.join(30)
    assert other == [BF16] * 3 and mine == [torch.float32] * 3


def test_a_bf16_flamingo_encodes_images_with_fp32_convolutions_where_chosen(chosen):
    """In generate, and in encode_images called on its own (the server, the prefix cache)."""
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    from tiny import tiny_lm, tiny_tokenizer

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling.feature_grid import FeatureGridEncoder

    tokenizer = tiny_tokenizer()
    encoder = FeatureGridEncoder(backbone(), hidden_size=16, image_size=16)
    model, _, tokenizer = create_model_and_transforms(encoder, None, tiny_lm(vocab_size=len(tokenizer)), tokenizer)
    model = model.eval().to(BF16)
    vision_x = torch.randn(1, 2, 1, 3, 16, 16).to(BF16)
    ids = tokenizer("<image>a cat<|endofchunk|><image>a", return_tensors="pt")
    chosen(True)
    with torch.no_grad():
        _, dtypes = conv_dtypes(lambda: model.generate(vision_x, ids.input_ids, ids.attention_mask, max_new_tokens=2))
    assert dtypes == [torch.float32] * 3  # the two images in one batch through three convolutions
    with torch.no_grad():  # the server and the prefix cache encode images on their own, outside generate
        _, dtypes = conv_dtypes(lambda: model.encode_images(vision_x[0]))
    assert dtypes == [torch.float32] * 3
    chosen(False)
    with torch.no_grad():
        _, dtypes = conv_dtypes(lambda: model.generate(vision_x, ids.input_ids, ids.attention_mask, max_new_tokens=2))
    assert dtypes == [BF16] * 3


def test_a_transformers_lms_attention_backward_under_bf16_autocast_runs_in_fp32_where_chosen(chosen):
    """A LLaMA's rotary embedding makes its query and key fp32 under bf16 autocast (the value stays
    bf16); autocast still runs the call in bf16, so the check on the query's dtype alone missed it and
    the backward took torch's emulated bf16 kernel. The whole LM's attention backward in fp32 where
    chosen, with the loss and gradients of torch's bf16 call up to rounding."""
    from tiny import tiny_flamingo

    model, _, tokenizer = tiny_flamingo("llama")
    model.train()
    ids = tokenizer(["<image>a red car<|endofchunk|>"] * 2, return_tensors="pt").input_ids
    vision_x = torch.randn(2, 1, 1, 3, 32, 32)
    results = {}
    for value in (False, True):
        chosen(value)
        model.zero_grad()
        with OpDtypes(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward) as seen:
            with torch.autocast("cpu", dtype=BF16):
                loss = model(vision_x, ids, labels=ids).loss
            loss.backward()
        grad = model.perceiver.latents.grad.clone()
        results[value] = (loss.detach(), grad, seen.dtypes)
    (ref_loss, ref_grad, ref_dtypes), (loss, grad, dtypes) = results[False], results[True]
    layers = model.lang_encoder.config.num_hidden_layers
    assert ref_dtypes.count(BF16) >= layers  # torch's bf16 backward for every LM layer (and ours)
    assert dtypes == [torch.float32] * len(ref_dtypes)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-2)
    assert_close(grad, ref_grad, rel=5e-2)


class QueryDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """(dtype, queries) of every call of torch's CPU flash attention forward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            self.calls.append((args[0].dtype, args[0].shape[-2]))
        return func(*args, **(kwargs or {}))


def tiny_mosaic():
    from transformers import MptConfig

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM
    from tiny import randomize_gates, tiny_tokenizer, tiny_vision

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = MptConfig(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, vocab_size=len(tok))
    model, _, tok = create_model_and_transforms(tiny_vision(), None, MosaicMptForCausalLM(cfg).eval(), tok)
    randomize_gates(model)
    return model.eval(), None, tok


@pytest.mark.parametrize("lm", ["llama", "mosaic"])
def test_decoding_steps_under_bf16_autocast_run_their_attention_in_fp32(chosen, lm):
    """Under bf16 autocast (evaluation's ``amp_bf16``) a decoding step's attention is a bf16 call
    whatever its inputs' dtypes, 2-3x slower than on fp32 copies: each step's LM and cross-attention
    calls in fp32 (on any CPU, as for a bf16 model). Before, the fp32 copies our cross-attention and
    MPT made went back to bf16 through autocast, and the LM's fp32 query (rotary) was not noticed."""
    from tiny import tiny_flamingo

    chosen(False)  # (no bearing on decoding: fp32 decode steps pay on CPUs with native bf16 too)
    model, _, tokenizer = tiny_flamingo("llama") if lm == "llama" else tiny_mosaic()
    model.cpu_onednn = False  # (no fused native decoding step: every attention call goes through SDPA)
    ids = tokenizer(["<image>a red car<|endofchunk|><image>a"], return_tensors="pt")
    vision_x = torch.randn(1, 2, 1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16), QueryDtypes() as seen:
        out = model.generate(vision_x, ids.input_ids, ids.attention_mask, max_new_tokens=3)
    steps = [dtype for dtype, queries in seen.calls if queries == 1]
    assert len(steps) >= 2 * 2 * 2  # 2 decoding steps (3 tokens) x 2 layers x (LM + cross-attention)
    assert steps == [torch.float32] * len(steps)
    assert out.shape[1] == ids.input_ids.shape[1] + 3


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_sdpa_keeps_the_bf16_forward_and_takes_the_backward_in_fp32(chosen, mask):
    chosen(True)
    q, k, v = (torch.randn(2, 3, 17, 16).to(BF16) for _ in range(3))
    m = {"none": None, "bool": torch.rand(2, 1, 17, 17) > 0.3, "float": torch.randn(2, 3, 17, 17).to(BF16)}[mask]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # every query sees a key
    results = []
    for f in (F.scaled_dot_product_attention, attention.sdpa):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out = f(qs, ks, vs, attn_mask=m, scale=0.3)
        out.float().square().sum().backward()
        results.append((out, qs.grad, ks.grad, vs.grad))
    (o0, *g0), (o1, *g1) = results
    assert torch.equal(o0, o1)  # the same forward kernel
    for a, b in zip(g1, g0):
        assert a.dtype == BF16
        assert_close(a, b)


def test_sdpa_is_torchs_where_not_chosen_or_without_gradients(chosen):
    q = torch.randn(1, 2, 5, 8).to(BF16).requires_grad_()
    chosen(False)
    assert "Fp32Backward" not in type(attention.sdpa(q, q, q).grad_fn).__name__
    chosen(True)
    assert "Fp32Backward" in type(attention.sdpa(q, q, q).grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(attention.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    assert "Fp32Backward" not in type(attention.sdpa(q.float(), q.float(), q.float()).grad_fn).__name__


@pytest.mark.parametrize("ratio, chosen_", [(0.2, True), (0.95, False)])
def test_the_bf16_gemm_choice_is_measured_cached_and_reported(fresh, monkeypatch, ratio, chosen_):
    log = []

    def race(a, b, reps=5, rounds=3):
        log.append(1)
        return 1.0, ratio  # the fp32 route takes `ratio` times torch's bf16 time

    monkeypatch.setattr(kernels, "_race", race)
    assert kernels.decide("bf16_gemm") is chosen_ and log == [1]
    data = json.loads(kernels.cache_file().read_text())
    assert data["bf16_gemm_upcast"] is chosen_ and set(data["bf16_gemm_ms"]) == {"bf16", "upcast"}
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert kernels.decide("bf16_gemm") is chosen_ and log == [1]  # the cache answers
    choice = kernels.kernel_choice(("bf16_gemm",))
    assert choice.bf16_gemm_upcast is chosen_
    assert ("as fp32 GEMMs of the bf16 values" in kernels.summary(choice)) is chosen_


@pytest.mark.parametrize("mode", ["default", "onednn"])
def test_the_kernel_override_keeps_torchs_bf16_gemm(fresh, monkeypatch, mode):
    monkeypatch.setenv(kernels.ENV, mode)
    monkeypatch.setattr(kernels, "_race", lambda *a, **k: pytest.fail("probed under an override"))
    assert kernels.decide("bf16_gemm") is False


@pytest.mark.parametrize("setting", ["chosen", "not chosen", "cpu_onednn off"])
def test_a_training_loop_of_ones_own_gets_the_fp32_route_under_bf16_autocast(chosen, monkeypatch, setting):
    """``model(...)`` with gradients under bf16 autocast (an OpenFlamingo-style loop, no Trainer)."""
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    from tiny import random_images, tiny_flamingo

    from flamingo_vlm import FlamingoProcessor

    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    model.train()
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a blue bird", random_images(2, seed=1))])
    calls = []
    real = fast_linear.upcast_linear
    monkeypatch.setattr(fast_linear, "upcast_linear", lambda *a: calls.append(1) or real(*a))
    chosen(setting != "not chosen")
    if setting == "cpu_onednn off":
        model.cpu_onednn = False
    with torch.autocast("cpu", dtype=BF16):
        out = model(batch["vision_x"], batch["input_ids"], batch["attention_mask"], labels=batch["input_ids"])
    out.loss.backward()
    assert bool(calls) is (setting == "chosen")
    assert all(p.grad is not None for p in model.perceiver.parameters() if p.requires_grad)


def test_trained_layers_patched_for_the_lean_backward_take_the_route_without_gradients(chosen, monkeypatch):
    """The trainer's once-per-run loss check (and evaluation during training) runs the model without
    gradients under bf16 autocast: the trained linear layers that ``lean.make_lean`` gave a forward of
    their own (a routing block leaves those alone) must route their bf16 products too."""
    if not kernels.onednn_available():
        pytest.skip("this torch has no oneDNN linear kernel (no routing blocks)")
    from flamingo_vlm.train import lean

    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    frozen = nn.Linear(32, 32).requires_grad_(False)
    net = nn.Sequential(frozen, model)
    lean.make_lean(net, autocast=True)
    assert "forward" in vars(model[1])  # the trained layers have their own forward now
    calls = []
    real = fast_linear.upcast_linear
    monkeypatch.setattr(fast_linear, "upcast_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 16, 32)
    chosen(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        want = net(x)  # outside a routing block: torch's own bf16 GEMMs
        assert not calls
        with fast_linear.onednn_linears(net):
            got = net(x)
    assert len(calls) == 3  # the frozen layer, and the two trained ones through their own forward
    assert_close(got, want)
