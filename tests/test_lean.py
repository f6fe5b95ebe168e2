"""train.lean: the trained layers keep less for backward, with the stock forward and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flamingo_vlm.modeling.cross_attention import GatedCrossAttentionBlock, plan_media_attention
from flamingo_vlm.modeling.perceiver import PerceiverResampler
from flamingo_vlm.train.lean import make_lean

TEXT_MEDIA = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 2, 2]])  # rows without an image too


def block(seed: int = 0) -> GatedCrossAttentionBlock:
    torch.manual_seed(seed)
    b = GatedCrossAttentionBlock(dim=64, dim_visual=48, dim_head=16, heads=4)
    with torch.no_grad():
        b.attn_gate.fill_(0.3)
        b.ff_gate.fill_(-0.2)
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorm weights and biases away from 1 and 0
    return b


def run_block(m, x, media, amp: bool, dtype=torch.float32):
    """Forward + backward of a weighted sum; returns (output, [dL/dx, dL/dparams...], saved bytes)."""
    saved = {}
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = x.to(dtype).clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            kv = m.attn.image_keys_values(media.to(dtype))
            y = m(x, kv, plan_media_attention(TEXT_MEDIA, 2, 5, True))
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in m.parameters()], sum(saved.values())


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 10, 64, generator=g), torch.randn(2, 2, 5, 48, generator=g)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def stock_and_lean(amp: bool):
    """A block and its lean copy run on the same inputs: (patch counts, stock block, x, media,
    run_block's results for the stock block, for the lean one)."""
    stock = block()
    lean = copy.deepcopy(stock)
    counts = make_lean(lean, autocast=amp)
    x, media = inputs()
    return counts, stock, x, media, run_block(stock, x, media, amp=amp), run_block(lean, x, media, amp=amp)


def test_fp32_block_same_forward_same_gradients_less_kept():
    counts, stock, x, media, (y0, g0, kept0), (y1, g1, kept1) = stock_and_lean(amp=False)
    assert counts == {"feed_forward": 1, "cross_attention": 1, "gated_mlp": 0, "linear": 0}
    assert torch.equal(y0, y1)
    names = ["x"] + [n for n, _ in stock.named_parameters()]
    for n, a, b in zip(names, g0, g1):
        assert rel(b, a) < 1e-5, n
    # not kept any more: both LayerNorm outputs and both gated outputs (tokens x dim, fp32 each)
    assert kept0 - kept1 >= 4 * x.numel() * 4


def test_autocast_block_bitwise_forward_and_gradients_as_accurate_as_stock():
    counts, stock, x, media, (y0, g0, kept0), (y1, g1, kept1) = stock_and_lean(amp=True)
    assert counts == {"feed_forward": 1, "cross_attention": 1, "gated_mlp": 0, "linear": 5}
    assert torch.equal(y0, y1)  # the same casts and products in the same order
    exact = copy.deepcopy(stock).double()
    _, g64, _ = run_block(exact, x, media, amp=False, dtype=torch.float64)
    names = ["x"] + [n for n, _ in stock.named_parameters()]
    for n, a, b, want in zip(names, g0, g1, g64):
        assert b.dtype == a.dtype, n
        # bf16 rounding, placed elsewhere for the gated products (a wrong formula is off by O(1))
        assert rel(b, want) <= max(2 * rel(a, want), 2e-2), n
    # the bf16 copies of the trained weights are not kept (the fp32 parameters are, anyway)
    weights = sum(p.numel() for n, p in stock.named_parameters() if p.dim() == 2)
    assert kept0 - kept1 >= 2 * weights


def test_perceiver_under_autocast_same_forward_and_gradients():
    torch.manual_seed(0)
    stock = PerceiverResampler(dim=64, depth=2, dim_head=16, heads=4, num_latents=8)
    lean = copy.deepcopy(stock)
    counts = make_lean(lean, autocast=True)
    assert counts["feed_forward"] == 2 and counts["linear"] == 2 * 3 + 2 * 2
    x = torch.randn(2, 3, 1, 7, 64)
    outs = []
    for m in (stock, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append((y.detach(), [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)  # no gates here: the same products from the same bf16 operands


def test_lean_forwards_fall_back_without_gradients_and_leave_wrapped_layers_alone():
    stock = block()
    lean = copy.deepcopy(stock)
    make_lean(lean, autocast=True)
    x, media = inputs()
    with torch.no_grad():
        plan = plan_media_attention(TEXT_MEDIA, 2, 5, True)
        assert torch.equal(stock(x, stock.attn.image_keys_values(media), plan),
                           lean(x, lean.attn.image_keys_values(media), plan))

    class Wrapped(nn.Linear):  # e.g. a LoRA or quantized layer: keeps its own forward
        pass

    other = block()
    other.attn.to_q = Wrapped(64, 64, bias=False)
    counts = make_lean(other, autocast=True)
    assert counts["cross_attention"] == 0 and "forward" not in vars(other.attn.to_q)
    assert "forward" in vars(other.ff)  # its feed-forward is still lean
    seen = []  # a hook on a module whose call the lean path would replace (the aiming loss's): the stock path runs
    handle = lean.attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    y0, g0, _ = run_block(stock, x, media, amp=True)
    y1, g1, _ = run_block(lean, x, media, amp=True)
    handle.remove()
    assert seen == [x.shape] and torch.equal(y0, y1)
    again = make_lean(lean, autocast=True)  # patching twice changes nothing
    assert again == {"feed_forward": 0, "cross_attention": 0, "gated_mlp": 0, "linear": 0}


@pytest.mark.parametrize("amp", [False, True])
def test_gradient_checkpointing_of_a_lean_block(amp):
    from torch.utils.checkpoint import checkpoint

    stock = block()
    lean = copy.deepcopy(stock)
    make_lean(lean, autocast=amp)
    x, media = inputs()
    grads = []
    for m in (stock, lean):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            kv = m.attn.image_keys_values(media)
            y = checkpoint(m, xx, kv, plan_media_attention(TEXT_MEDIA, 2, 5, True), use_reentrant=False)
        y.float().sum().backward()
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert rel(b, a) < (2e-2 if amp else 1e-5)


def test_lean_backward_config_key_and_its_old_name():
    from flamingo_vlm.train import TrainConfig
    from flamingo_vlm.train.config import ConfigError

    base = {"model": {"from_pretrained": "m"}}
    assert TrainConfig.from_dict(base).lean_backward is True
    assert TrainConfig.from_dict({**base, "recompute_gelu": False}).lean_backward is False  # the earlier name
    with pytest.raises(ConfigError, match="same setting"):
        TrainConfig.from_dict({**base, "recompute_gelu": False, "lean_backward": True})


def llama_mlp(trained: bool):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    m = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu"))
    return m.requires_grad_(trained)


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_gated_mlp_keeps_two_hidden_tensors_with_the_stock_forward_and_gradients(trained, amp):
    """LLaMA's MLP (frozen in a Flamingo's LM, or trained): silu(gate(x)) is not kept, the rest is as
    autograd computes it, bit for bit."""
    lean = llama_mlp(trained)
    assert make_lean(lean, autocast=amp)["gated_mlp"] == 1
    stock = copy.deepcopy(lean)  # the same otherwise (trained linear layers under autocast are lean too)
    del stock.forward
    x0 = torch.randn(2, 5, 32)
    results = []
    for m in (stock, lean):
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        kept = {}
        x = x0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: (kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                           if t.untyped_storage().data_ptr() not in params else None, t)[1], lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = m(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), [x.grad] + [p.grad for p in m.parameters()], sum(kept.values())))
    (y0, g0, kept0), (y1, g1, kept1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.equal(a, b)
    hidden = 2 * 5 * 48 * (2 if amp else 4)
    assert kept0 - kept1 == hidden  # silu(gate(x)), one hidden-sized tensor


def test_gated_mlp_runs_the_stock_forward_without_gradients_or_with_a_hooked_activation():
    stock, lean = llama_mlp(False), llama_mlp(False)
    make_lean(lean, autocast=False)
    x = torch.randn(3, 32, requires_grad=True)
    calls = []
    lean.act_fn.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(stock(x), lean(x)) and calls == [1]  # the hooked activation is called
    with torch.no_grad():
        assert torch.equal(stock(x), lean(x))


def test_gated_mlp_under_double_backward_torch_func_and_a_decoding_block():
    from flamingo_vlm.modeling import fused_decode
    from flamingo_vlm.train.lean import SiluMul

    g, u = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(SiluMul.apply, (g, u))  # a differentiable backward with create_graph
    lean = llama_mlp(False)
    make_lean(lean, autocast=False)
    x, stock = torch.randn(2, 32), llama_mlp(False)
    torch.testing.assert_close(torch.func.grad(lambda t: lean(t).sum())(x),
                               torch.func.grad(lambda t: stock(t).sum())(x))  # (the stock path there)
    # decoding replaces the forward for its block only, and gives the lean one back
    with torch.no_grad(), fused_decode.fused_lm(lean) as patched:
        assert patched == 1 and vars(lean)["forward"].__func__ is not type(lean).forward
    assert vars(lean)["forward"].__func__.__name__ == "_gated_mlp"


def test_perceiver_attention_keeps_no_attention_weights_and_matches_per_image_attention():
    """Its (b, T) images go to SDPA as one batch dimension: torch's CPU flash kernel takes only 4-D
    inputs, and a 5-D call runs the math path, which keeps the (latents x tokens) weights."""
    torch.manual_seed(0)
    m = PerceiverResampler(dim=64, depth=1, dim_head=16, heads=4, num_latents=8)
    x = torch.randn(2, 3, 1, 7, 64)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = m(x)
    assert not [s for s in shapes if s[-2:] == (8, 7 + 8)], shapes  # latents x (tokens + latents)
    one = torch.stack([m(x[:, i: i + 1])[:, 0] for i in range(3)], 1)  # each image alone
    torch.testing.assert_close(y, one, rtol=1e-5, atol=1e-6)
