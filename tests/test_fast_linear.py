"""oneDNN linear layers for CPU inference: same math, restored after the block, never on gradients."""

import pytest
import torch
from torch import nn

from flamingo_vlm import FlamingoProcessor
from flamingo_vlm.modeling.fast_linear import linear, onednn_available, onednn_linears
from tiny import random_images, tiny_flamingo

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear kernel")


def routed(module: nn.Module) -> int:
    return sum("forward" in vars(m) for m in module.modules() if isinstance(m, nn.Linear))


def test_block_routes_fp32_linears_and_restores_them_even_on_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 8, bias=False), nn.Linear(8, 8).bfloat16())
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        ref = net[:3](x)
        with onednn_linears(net, enabled=True) as n:
            assert n == 3 and routed(net) == 3  # bf16 too (its decode-sized calls may use packed weights)
            got = net[:3](x)
            with onednn_linears(net, enabled=True) as inner:  # nested: nothing left to route, nothing undone early
                assert inner == 0
            assert routed(net) == 3
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert routed(net) == 0
        # modules that are not nn.Linear (the LM head with new-token rows) call linear(), which follows
        # the block: oneDNN inside (same values), F.linear outside
        w, b = net[0].weight, net[0].bias
        with onednn_linears(net, enabled=True):
            inside = linear(x, w, b)
        torch.testing.assert_close(inside, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))
        with pytest.raises(RuntimeError, match="boom"):
            with onednn_linears(net, enabled=True):
                raise RuntimeError("boom")
        assert routed(net) == 0


def test_gradients_inside_the_block_match_torchs_and_skip_frozen_weights():
    """The training route: oneDNN forward and backward, the gradients of F.linear."""
    from flamingo_vlm.modeling import kernels

    torch.manual_seed(0)
    x0 = torch.randn(2, 5, 6)
    grads, kept = {}, {}
    for on in (True, False):
        torch.manual_seed(1)  # the same weights for both runs
        layer, frozen = nn.Linear(6, 4), nn.Linear(4, 3)
        frozen.requires_grad_(False)
        x = x0.clone().requires_grad_(True)
        params = {p.data_ptr() for p in (*layer.parameters(), *frozen.parameters())}
        saved = []  # activations kept for backward (weights aside): what a training step's peak is made of
        before = kernels.calls
        with onednn_linears(nn.Sequential(layer, frozen), enabled=on), torch.autograd.graph.saved_tensors_hooks(
                lambda t: (saved.append(t) if t.data_ptr() not in params else None, t)[1], lambda t: t):
            out = frozen(layer(x)).square()
        kept[on] = sorted(t.numel() for t in saved)
        out.sum().backward()
        # forward 2, backward: layer's input and weight gradients, frozen layer's input gradient only
        assert kernels.calls - before == (5 if on else 0)
        assert frozen.weight.grad is None
        grads[on] = (x.grad, layer.weight.grad, layer.bias.grad)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # as torch's linear: the trained layer keeps its input, the frozen one nothing (not the trained layer's output)
    assert kept[True] == kept[False] == [2 * 5 * 3, 2 * 5 * 6]  # x, and square's input


def test_flamingo_generate_and_score_agree_with_default_kernels():
    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2, seed=1))])
    args = (batch["vision_x"], batch["input_ids"], batch["attention_mask"])
    outs = {}
    for flag in (True, False):
        model.cpu_onednn = flag
        ids = model.generate(*args, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        scores = model.score(args[0], args[1], [[5, 6], [7], [8, 9, 10]], args[2])
        with torch.no_grad():
            logits = model(*args).logits
        outs[flag] = (ids, scores, logits)
        assert routed(model) == 0  # nothing stays patched after a call
    del model.cpu_onednn
    assert torch.equal(outs[True][0], outs[False][0])
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[True][2], outs[False][2], rtol=1e-5, atol=1e-5)


def test_autocast_keeps_its_bf16_linears_inside_the_block():
    layer = nn.Linear(8, 4)
    with onednn_linears(layer, enabled=True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 8)).dtype == torch.bfloat16
