"""A gated cross-attention block's decoding step in one native call (modeling/fused_decode.py,
native.XattnStep): what the modules compute, in every SIMD path and weight kind, taken by generate
only where the modules' products would have run on our kernels anyway."""

import copy

import pytest
import torch
from torch import nn

from flamingo_vlm.modeling import fused_decode, kernels, native
from flamingo_vlm.modeling.cross_attention import ATTEND_ALL, GatedCrossAttentionBlock, MediaPlan
from flamingo_vlm.modeling.fast_linear import onednn_linears
from flamingo_vlm.modeling.quantize import QuantizedLinear, quantize_model
from tiny import tiny_flamingo

needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native kernels: {native.unavailable_reason()}")
ISAS = [0, 1, 2, 3][: (native.library().fv_isa() + 1) if native.library() is not None else 1]
LAYERS = ("attn.to_q", "attn.to_out", "ff.1", "ff.3")


def block(dim=40, heads=3, dim_head=12, seed=0) -> GatedCrossAttentionBlock:
    """Odd sizes (no multiple of 8 or 16), open gates, LayerNorms that are not the identity."""
    torch.manual_seed(seed)
    b = GatedCrossAttentionBlock(dim=dim, dim_visual=24, dim_head=dim_head, heads=heads).eval()
    with torch.no_grad():
        b.attn_gate.fill_(0.8)
        b.ff_gate.fill_(-0.6)
        for n in (b.attn.norm, b.ff[0]):
            n.weight.add_(torch.randn_like(n.weight) * 0.2)
            n.bias.add_(torch.randn_like(n.bias) * 0.2)
    return b


def products(module, weights: str, isa: int, names=LAYERS, dtype=torch.float32):
    """The products of ``module`` (its ``names`` layers, by default a block's four) as the C code takes
    them, float biases in ``dtype``, and the float weights they stand for."""
    out, dense = [], []
    for name in names:
        layer = module.get_submodule(name)
        if weights == "int8":
            q = QuantizedLinear(layer, "int8")
            out.append(native.Product(q.qweight, q.scales, q.bias, isa))
            dense.append(q.dequantized_weight())
        else:
            w = layer.weight.detach().to(torch.bfloat16 if weights == "bf16" else torch.float32)
            b = None if layer.bias is None else layer.bias.detach().to(dtype)
            out.append(native.Product(w, None, b, isa))
            dense.append(w.float())
    return tuple(out), dense


def step_for(b, weights, dtype, isa):
    """(the step, the float weights of its products); the step keeps its tensors, which it only refers to."""
    prods, dense = products(b, weights, isa)
    norms = tuple(native.Norm(n.weight.detach().to(dtype), n.bias.detach().to(dtype), n.eps) for n in (b.attn.norm, b.ff[0]))
    step = native.XattnStep(prods, norms, heads=b.attn.heads, dtype=dtype)
    step.tensors = (prods, norms)
    return step, dense


def as_modules(b, dense, dtype):
    """The block with the weights the products stand for, in ``dtype``: the modules' own computation."""
    ref = copy.deepcopy(b)
    with torch.no_grad():
        for name, w in zip(LAYERS, dense):
            ref.get_submodule(name).weight.copy_(w)
    return ref.to(dtype)


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("weights, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            ("int8", torch.float32), ("int8", torch.bfloat16)])
@pytest.mark.parametrize("rows, kv_rows, keys", [(1, 1, 64), (3, 1, 5), (4, 2, 70)])
def test_one_call_computes_what_the_modules_compute(isa, weights, dtype, rows, kv_rows, keys):
    """fp32: within fp32 rounding of the modules in float64. bf16: rounded at the places the modules
    round, so within a few bf16 steps of the modules' own bf16 computation and as close to float64
    as it (a product summed in another order may round the other way, and that carries on). Rows
    beyond the keys' rows attend to row m // (rows // kv_rows), as generate's repeated rows do;
    keys/values may be strided views (a span cut out of all the images)."""
    b = block()
    step, dense = step_for(b, weights, dtype, isa)
    g = torch.Generator().manual_seed(rows * 100 + keys)
    x = torch.randn(rows, 1, 40, generator=g).to(dtype)
    media = torch.randn(kv_rows, 1, keys + 7, 24, generator=g)
    ref = as_modules(b, dense, torch.float64)
    with torch.no_grad():
        k, v = ref.attn.image_keys_values(media.double())
        k, v = k[:, :, 7:], v[:, :, 7:]  # strided: a span of the keys
        gates = ref.gates()
        want = ref(x.double(), (k, v), ATTEND_ALL, None, gates)
        got = step(x, k.to(dtype), v.to(dtype), float(gates[0]), float(gates[1]))
        assert got.dtype == dtype and got.shape == x.shape
        if dtype == torch.float32:
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        else:
            mods = as_modules(b, dense, dtype)
            stock = mods(x, (k.to(dtype), v.to(dtype)), ATTEND_ALL, None, mods.gates())
            assert (got.double() - stock.double()).abs().max() <= 2 ** -6 * stock.double().abs().max()
            assert (got.double() - want).abs().max() <= 3 * (stock.double() - want).abs().max() + 1e-6
        # with no image to see, only the feed-forward half
        blind = ref(x.double(), (k, v), MediaPlan(blind=True), None, gates)
        nothing = torch.empty(1, 3, 0, 12, dtype=dtype)
        got = step(x, nothing, nothing, float(gates[0]), float(gates[1]), blind=True)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -6
        assert (got.double() - blind).abs().max() <= tol * blind.abs().max()


@needs_native
def test_it_refuses_operands_it_cannot_take_and_weights_that_are_gone():
    b = block()
    step, _ = step_for(b, "fp32", torch.float32, ISAS[-1])
    x = torch.randn(2, 1, 40)
    k = torch.randn(2, 3, 5, 12)
    step(x, k, k, 0.5, 0.5)
    for bad in [(x.double(), k, k), (x, k.bfloat16(), k.bfloat16()), (torch.randn(2, 1, 80)[..., ::2], k, k),
                (x, k[:, :2], k[:, :2]), (x, k.transpose(-1, -2), k.transpose(-1, -2)), (torch.randn(3, 1, 40), k, k),
                (x, k, k[:, :, :4])]:
        with pytest.raises(ValueError, match="XattnStep"):
            step(*bad, 0.5, 0.5)
    no_norms = (native.Norm(None, None, 1e-5),) * 2
    with pytest.raises(ValueError, match="XattnStep"):  # products that do not chain
        native.XattnStep(products(block(dim=48), "fp32", 1)[0][:2] + products(b, "fp32", 1)[0][2:], no_norms,
                         heads=3, dtype=torch.float32)
    prods, dense = products(b, "fp32", 1)
    own = native.XattnStep(prods, no_norms, heads=3, dtype=torch.float32)
    own(x, k, k, 0.5, 0.5)
    del prods, dense  # the only references to these weights: a step must not read freed memory
    with pytest.raises(ValueError, match="still there"):
        own(x, k, k, 0.5, 0.5)


@needs_native
def test_long_key_spans_split_over_threads_give_the_one_thread_result():
    """Enough attention work (rows x heads x keys x dim >= 65536) runs the heads on torch's threads,
    each (row, head) on one thread, in the same order: the same bits as one thread."""
    b = block(dim=64, heads=4, dim_head=16)
    step, _ = step_for(b, "fp32", torch.float32, ISAS[-1])
    g = torch.Generator().manual_seed(3)
    x, k, v = torch.randn(4, 1, 64, generator=g), torch.randn(2, 4, 600, 16, generator=g), torch.randn(2, 4, 600, 16, generator=g)
    gates = tuple(gt.detach() for gt in b.gates())
    ag, fg = float(gates[0]), float(gates[1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = step(x, k, v, ag, fg)
        torch.set_num_threads(2)
        assert torch.equal(step(x, k, v, ag, fg), one)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ref = b.double()(x.double(), (k.double(), v.double()), ATTEND_ALL, None, tuple(gt.double() for gt in gates))
    assert (one.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def native_routes(monkeypatch):
    """This process decides that decode-sized fp32, bf16 and int8 products run on our kernel."""
    kernels.set_routes("fp32", ("native:1",) * len(kernels.DECODE_BUCKETS))
    kernels.set_routes("bf16", ("native:1",) * len(kernels.DECODE_BUCKETS))
    monkeypatch.setitem(kernels._MEMO, "int8_decode", True)
    monkeypatch.setitem(kernels._MEMO, "int8_isa", ISAS[-1])


def count_steps(monkeypatch, cls=native.XattnStep, name: str = "__call__") -> list:
    """The rows of each call of ``cls.name`` (a native step) from here on."""
    calls = []
    real = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, x, *a, **k: calls.append(x.shape[0]) or real(self, x, *a, **k))
    return calls


def fused_like_module(module, run, calls: list) -> bool:
    """``run()`` (the outputs of ``module`` on fixed inputs) inside ``fused_lm`` as outside it, under the
    same routes (under autocast they differ from F.linear's); whether a native step ran (``calls`` grew)."""
    n = len(calls)
    with onednn_linears(module):
        want = run()
    with onednn_linears(module), fused_decode.fused_lm(module) as patched:
        assert patched == 2  # the layer and its MLP
        got = run()
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()
    return len(calls) > n


def generate(model, monkeypatch, fused: bool, **kwargs):
    monkeypatch.setenv(fused_decode.ENV, "1" if fused else "0")
    media = model.media_token_id
    g = torch.Generator().manual_seed(0)
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=g).to(next(model.parameters()).dtype)
    lang_x = torch.tensor([[media, 5, 6, media, 7, 8], [media, 9, 6, media, 7, 5]])
    with torch.inference_mode():
        out = model.generate(vision_x, lang_x, torch.ones_like(lang_x), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores)


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16"])
def test_generate_takes_one_call_per_block_and_step_with_the_modules_answers(fresh, monkeypatch, kind):
    native_routes(monkeypatch)
    model, _ip, _tok = tiny_flamingo()
    if kind == "int8":
        quantize_model(model, "int8")
    elif kind == "bf16":
        model.to(torch.bfloat16)
    calls = count_steps(monkeypatch)
    tokens, scores = generate(model, monkeypatch, fused=True)
    blocks = sum(isinstance(m, GatedCrossAttentionBlock) for m in model.modules())
    assert len(calls) == blocks * 5 and set(calls) == {2}  # 5 decoding steps of 2 rows after the prompt
    del calls[:]
    ref_tokens, ref_scores = generate(model, monkeypatch, fused=False)
    assert not calls
    if kind != "bf16":  # (bf16: rounding differences may pick another of two near-equal tokens)
        assert torch.equal(tokens, ref_tokens)
        finite = ref_scores.isfinite()  # (suppressed tokens score -inf)
        assert torch.equal(scores.isfinite(), finite)
        assert (scores - ref_scores)[finite].abs().max() <= 1e-4 * ref_scores[finite].abs().max()
    # beams: rows repeated per image row, two rows of keys/values for 4 query rows
    del calls[:]
    beams, _ = generate(model, monkeypatch, fused=True, num_beams=2)
    assert calls and set(calls) == {4}
    ref_beams, _ = generate(model, monkeypatch, fused=False, num_beams=2)
    if kind != "bf16":
        assert torch.equal(beams, ref_beams)


@needs_native
def test_not_taken_where_the_modules_would_not_run_on_our_kernels(fresh, monkeypatch):
    model, _ip, _tok = tiny_flamingo()
    calls = count_steps(monkeypatch)
    kernels.set_routes("fp32", ("default",) * len(kernels.DECODE_BUCKETS))  # torch's F.linear measured faster
    generate(model, monkeypatch, fused=True)
    assert not calls
    native_routes(monkeypatch)
    generate(model, monkeypatch, fused=True)
    assert calls
    blk = next(m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock))
    x = torch.randn(1, 1, blk.attn.norm.normalized_shape[0])
    with torch.no_grad(), onednn_linears(model):
        assert fused_decode.prepare(blk, x, blk.gates()) is not None
        handle = blk.ff[1].register_forward_hook(lambda *a: None)  # a hook must see its module's call
        assert fused_decode.prepare(blk, x, blk.gates()) is None
        handle.remove()
        blk.train()
        assert fused_decode.prepare(blk, x, blk.gates()) is None
        blk.eval()
        lora_like = type("Wrapped", (nn.Linear,), {})(*blk.ff[3].weight.shape[::-1], bias=False)
        original, blk.ff[3] = blk.ff[3], lora_like
        assert fused_decode.prepare(blk, x, blk.gates()) is None
        blk.ff[3] = original
        assert fused_decode.prepare(blk, x.bfloat16(), blk.gates()) is None  # activations and weights of two dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the modules would run parts of the step in bf16
            assert fused_decode.prepare(blk, x, blk.gates()) is None
        monkeypatch.setenv(fused_decode.ENV, "0")
        assert fused_decode.prepare(blk, x, blk.gates()) is None
    with onednn_linears(model):  # gradients wanted
        assert fused_decode.prepare(blk, x, blk.gates()) is None
    with torch.no_grad():  # outside a routing block: the float layers run F.linear
        assert fused_decode.prepare(blk, x, blk.gates()) is None


@needs_native
def test_whole_layer_steps_take_our_kernel_where_it_measured_within_the_slack(fresh, monkeypatch):
    """Where the probe chose another kernel for bare products but measured ours within FUSED_SLACK of it,
    a whole layer's step still runs (it saves more than its products lose); an MLP's step alone does not,
    and neither does a bare product."""
    model, _ip, _tok = tiny_flamingo()
    ms = {"1": {"default": 1.0, "native:1": 1.6}, "2": {"default": 1.0, "native:1": 1.4},
          "4": {"default": 1.0, "native:1": 2.0}, "8": {"default": 1.0}}
    kernels.set_routes("fp32", ("default",) * len(kernels.DECODE_BUCKETS), ms)
    assert [kernels.fused_route("fp32", r) for r in (1, 2, 3, 8)] == ["default", 1, "default", "default"]
    assert kernels.decode_route("fp32", 2) == "default"
    calls = count_steps(monkeypatch)
    generate(model, monkeypatch, fused=True)  # 2 rows
    assert calls and set(calls) == {2}
    blk = next(m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock))
    x = torch.randn(2, 1, blk.attn.norm.normalized_shape[0])
    with torch.no_grad(), onednn_linears(model):
        assert fused_decode._product(blk.ff[1], x) is not None
        assert fused_decode._product(blk.ff[1], x, whole_layer=False) is None
    kernels.set_routes("fp32", ("default",) * len(kernels.DECODE_BUCKETS))  # no timings: the routes themselves
    assert kernels.fused_route("fp32", 1) == "default"


# -- the LM's MLPs ------------------------------------------------------------------------------------
def lm_mlp(kind: str, seed: int = 0) -> nn.Module:
    """transformers' MPT or LLaMA MLP at odd sizes (hidden 40, intermediate 120 / 72; LLaMA with biases)."""
    from transformers import LlamaConfig, MptConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mpt.modeling_mpt import MptMLP

    torch.manual_seed(seed)
    if kind == "mpt":
        return MptMLP(MptConfig(d_model=40, n_heads=4, expansion_ratio=3)).eval()
    return LlamaMLP(LlamaConfig(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
                                hidden_act="silu", mlp_bias=True)).eval()


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("weights, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            ("int8", torch.float32), ("int8", torch.bfloat16)])
@pytest.mark.parametrize("kind", ["mpt", "llama"])
def test_one_mlp_call_computes_what_the_module_computes(isa, weights, dtype, kind):
    mlp = lm_mlp(kind)
    names = ("up_proj", "down_proj", "gate_proj") if kind == "llama" else ("up_proj", "down_proj")
    prods, dense = products(mlp, weights, isa, names, dtype)
    step = native.MlpStep(*prods, act="silu" if kind == "llama" else "gelu", dtype=dtype)
    ref = copy.deepcopy(mlp)
    with torch.no_grad():
        for name, w in zip(names, dense):
            getattr(ref, name).weight.copy_(w)
    g = torch.Generator().manual_seed(len(names))
    for rows in (1, 3, 8):
        x = torch.randn(rows, 1, 40, generator=g).to(dtype) * 2
        residual = torch.randn(rows, 1, 40, generator=g).to(dtype) if kind == "mpt" else None
        args = (residual,) if kind == "mpt" else ()
        with torch.no_grad():
            want = ref.double()(x.double(), *(a.double() for a in args))
            got = step(x, residual)
            assert got.dtype == dtype and got.shape == x.shape
            if dtype == torch.float32:
                assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
            else:
                mods = ref.to(dtype)
                stock = mods(x, *args)
                assert (got.double() - stock.double()).abs().max() <= 2 ** -6 * stock.double().abs().max()
                assert (got.double() - want).abs().max() <= 3 * (stock.double() - want).abs().max() + 1e-6
    with pytest.raises(ValueError, match="MlpStep"):
        step(torch.randn(2, 41).to(dtype))
    with pytest.raises(ValueError, match="MlpStep"):
        native.MlpStep(prods[0], prods[0], act="gelu", dtype=dtype)  # products that do not chain


@needs_native
@pytest.mark.parametrize("lm", ["llama", "mpt"])
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16"])
def test_generate_runs_each_lm_layer_or_mlp_in_native_calls_with_the_modules_answers(fresh, monkeypatch, lm, kind):
    """Each decoder layer's step in LlamaStep / MptStep, its MLP inside."""
    native_routes(monkeypatch)
    model, _ip, _tok = tiny_flamingo(lm)
    if kind == "int8":
        quantize_model(model, "int8")
    elif kind == "bf16":
        model.to(torch.bfloat16)
    calls, kinds = [], []  # rows per native call; which step took it
    for cls, name in ((native.LlamaStep, "post"), (native.MptStep, "post"), (native.MlpStep, "__call__")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, x, *a, _real=real, _cls=cls, **k:
                            calls.append(x.shape[0]) or kinds.append(_cls) or _real(self, x, *a, **k))
    tokens, scores = generate(model, monkeypatch, fused=True)
    mlps = sum(fused_decode.mlp_kind(m) is not None for m in model.modules())
    layers = sum(fused_decode.layer_kind(m) is not None for m in model.modules())
    assert mlps == 2 and layers == 2
    assert set(kinds) == {native.LlamaStep if lm == "llama" else native.MptStep}  # (a layer's step computes its MLP)
    assert len(calls) == mlps * 5 and set(calls) == {2}  # 2 layers, 5 decoding steps of 2 rows
    assert not any("forward" in vars(m) for m in model.modules())  # restored after the call
    del calls[:]
    ref_tokens, ref_scores = generate(model, monkeypatch, fused=False)
    assert not calls
    if kind != "bf16":
        assert torch.equal(tokens, ref_tokens)
        finite = ref_scores.isfinite()
        assert (scores - ref_scores)[finite].abs().max() <= 1e-4 * ref_scores[finite].abs().max()
    del calls[:]  # beams: 4 rows, the cache reordered between steps
    beams, _ = generate(model, monkeypatch, fused=True, num_beams=2)
    assert calls and set(calls) == {4}
    ref_beams, _ = generate(model, monkeypatch, fused=False, num_beams=2)
    if kind != "bf16":
        assert torch.equal(beams, ref_beams)
    del calls[:]
    monkeypatch.setenv(fused_decode.ENV, "1")
    mlp = next(m for m in model.modules() if fused_decode.mlp_kind(m))
    handle = mlp.down_proj.register_forward_hook(lambda *a: None)  # a hook must see its module's call
    generate(model, monkeypatch, fused=True)
    assert len(calls) == 5  # the other layer's step only
    handle.remove()
    with fused_decode.fused_lm(model) as patched:  # gradients enabled at entry: nothing changes
        assert patched == 0


def test_mlp_kinds_are_recognised_by_their_class_and_activation():
    assert fused_decode.mlp_kind(lm_mlp("mpt")) == "mpt" and fused_decode.mlp_kind(lm_mlp("llama")) == "llama"
    mlp = lm_mlp("mpt")
    mlp.act = nn.GELU(approximate="tanh")
    assert fused_decode.mlp_kind(mlp) is None
    mlp = lm_mlp("llama")
    mlp.act_fn = nn.GELU()
    assert fused_decode.mlp_kind(mlp) is None
    assert fused_decode.mlp_kind(type("MptMLP", (nn.Module,), {})()) is None  # another module of that name


def test_benchmark_headers_say_whether_decoding_steps_were_fused(monkeypatch):
    c = kernels.KernelChoice(cpu="x", torch="t", threads=2, allocator="a", onednn_decode=False, onednn_gemm=False,
                             bf16_fast=True, fp32_decode=(), bf16_decode=(), native_int8_decode=False, source="s",
                             timings={})
    monkeypatch.delenv(fused_decode.ENV, raising=False)
    assert "LM decoder layers (LLaMA, MPT) and LM MLPs fused where their products run on our C kernels" in kernels.summary(c)
    monkeypatch.setenv(fused_decode.ENV, "0")
    assert "decoding module by module (FLAMINGO_VLM_FUSED=0)" in kernels.summary(c)
    assert not fused_decode.enabled()


@needs_native
def test_a_patched_mlp_takes_its_module_s_arguments_and_leaves_others_to_the_module(fresh, monkeypatch):
    native_routes(monkeypatch)
    mlp = lm_mlp("mpt")
    calls = []
    real = native.MlpStep.__call__
    monkeypatch.setattr(native.MlpStep, "__call__", lambda self, x, *a, **k: calls.append(1) or real(self, x, *a, **k))
    x, r = torch.randn(2, 1, 40), torch.randn(2, 1, 40)
    with torch.no_grad():
        want = mlp(x, r)
        with onednn_linears(mlp), fused_decode.fused_lm(mlp) as patched:
            assert patched == 1
            for got in (mlp(x, r), mlp(x, residual=r)):
                assert (got - want).abs().max() <= 1e-5 * want.abs().max()
            assert len(calls) == 2
            with pytest.raises(TypeError):  # what the module itself does with no residual
                mlp(x, None)
            assert len(calls) == 2
        assert "forward" not in vars(mlp)


# -- LLaMA decoder layers ------------------------------------------------------------------------------
LLAMA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                "mlp.down_proj", "mlp.gate_proj")


def llama_layer(seed: int = 0):
    """transformers' LlamaDecoderLayer at odd sizes (hidden 44, 4 heads of 12 over 2 key/value heads,
    intermediate 52, biases, RMSNorm weights that are not ones), and its rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=44, num_attention_heads=4, num_key_value_heads=2, head_dim=12, intermediate_size=52,
                      attention_bias=True, mlp_bias=True, hidden_act="silu", rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            n.weight.add_(torch.randn_like(n.weight) * 0.3)
    return layer, LlamaRotaryEmbedding(cfg)


def llama_inputs(rows: int, dtype: torch.dtype, rope, past: int = 7, seed: int = 1):
    """x (rows, 1, 44), the cached keys/values of ``past`` positions, and (cos, sin) for the next position."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 1, 44, generator=g) * 2).to(dtype)
    keys, values = (torch.randn(rows, 2, past, 12, generator=g).to(dtype) for _ in range(2))
    position_ids = torch.full((rows, 1), past)
    return x, keys, values, position_ids, rope(x, position_ids)


def run_layer(layer, x, keys, values, position_ids, pe, **kwargs):
    """The layer's output on x after the cached keys/values, and the cache's keys/values after it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(keys.clone(), values.clone(), 0)
    kwargs = {"attention_mask": None, "position_ids": position_ids, "cache": cache, "use_cache": True,
              "position_embeddings": pe, **kwargs}
    out = layer(x, **kwargs)
    return out, cache.layers[0].keys, cache.layers[0].values


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("weights, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            ("int8", torch.float32), ("int8", torch.bfloat16)])
def test_a_llama_layer_step_computes_what_the_layer_computes(isa, weights, dtype):
    layer, rope = llama_layer()
    prods, dense = products(layer, weights, isa, LLAMA_LAYERS, dtype)
    norms = tuple((n.weight.detach().to(dtype), n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm))
    step = native.LlamaStep(prods, norms, heads=4, kv_heads=2, dtype=dtype)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        for name, w in zip(LLAMA_LAYERS, dense):
            ref.get_submodule(name).weight.copy_(w)
    for rows in (1, 3):
        x, keys, values, pids, (cos, sin) = llama_inputs(rows, dtype, rope)
        with torch.no_grad():
            want, want_k, want_v = run_layer(ref.double(), x.double(), keys.double(), values.double(), pids,
                                             (cos.double(), sin.double()))
            q, k, v = step.pre(x, cos, sin)
            assert k.shape == v.shape == (rows, 2, 1, 12) and q.shape == (rows, 1, 48)
            got = step.post(x, q, torch.cat([keys, k], 2), torch.cat([values, v], 2))
            assert got.dtype == dtype and got.shape == x.shape
            if dtype == torch.float32:
                for a, b in ((got, want), (k, want_k[:, :, -1:]), (v, want_v[:, :, -1:])):
                    assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
            else:  # against the modules' own bf16, and no further from float64 than they are
                stock, stock_k, _ = run_layer(copy.deepcopy(ref).to(dtype), x, keys, values, pids, (cos, sin))
                assert (got.double() - stock.double()).abs().max() <= 2 ** -6 * stock.double().abs().max()
                assert (got.double() - want).abs().max() <= 3 * (stock.double() - want).abs().max() + 1e-6
                assert (k.double() - stock_k[:, :, -1:].double()).abs().max() <= 2 ** -7 * stock_k.double().abs().max()
    # a left-padded batch: the keys a row does not see (True in the mask) get no weight, as in the layer's SDPA
    x, keys, values, pids, (cos, sin) = llama_inputs(3, dtype, rope)
    unseen = torch.zeros(3, 1, 1, keys.shape[2] + 1, dtype=torch.bool)
    unseen[1, ..., :3] = True
    unseen[2, ..., :1] = True
    with torch.no_grad():
        want, _, _ = run_layer(ref.double(), x.double(), keys.double(), values.double(), pids,
                               (cos.double(), sin.double()), attention_mask=~unseen)
        q, k, v = step.pre(x, cos, sin)
        got = step.post(x, q, torch.cat([keys, k], 2), torch.cat([values, v], 2), unseen)
        unmasked = step.post(x, q, torch.cat([keys, k], 2), torch.cat([values, v], 2))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    err = (got.double() - want).abs().max()
    assert (got[0] == unmasked[0]).all() and (got[1].double() - unmasked[1].double()).abs().max() > 2 * err
    with pytest.raises(ValueError, match="LlamaStep"):
        step.post(x, q, torch.cat([keys, k], 2), torch.cat([values, v], 2), unseen[:, :, :, 1:])  # a mask too short
    with pytest.raises(ValueError, match="LlamaStep"):
        step.pre(torch.randn(2, 1, 45).to(dtype), cos, sin)
    with pytest.raises(ValueError, match="LlamaStep"):
        native.LlamaStep(prods, norms, heads=3, kv_heads=2, dtype=dtype)  # heads that do not group


@needs_native
def test_a_patched_llama_layer_runs_the_module_wherever_the_step_does_not_fit(fresh, monkeypatch):
    native_routes(monkeypatch)
    layer, rope = llama_layer()
    calls = count_steps(monkeypatch, native.LlamaStep, "post")
    x, keys, values, pids, pe = llama_inputs(2, torch.float32, rope)

    def same(**kwargs) -> bool:
        """the patched layer's output and cache as the module's; whether the step ran"""
        return fused_like_module(layer, lambda: run_layer(layer, x, keys, values, pids, pe, **kwargs), calls)

    with torch.no_grad():
        assert same()
        with onednn_linears(layer), fused_decode.fused_lm(layer):  # a copy made inside the block: its own weights
            run_layer(layer, x, keys, values, pids, pe)
            twin = copy.deepcopy(layer)
            twin.self_attn.o_proj.weight.mul_(2)
            got = run_layer(twin, x, keys, values, pids, pe)[0]
        del twin.forward, twin.mlp.forward  # (the copy took the patched forwards along)
        with onednn_linears(twin):
            want = run_layer(twin, x, keys, values, pids, pe)[0]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        assert not same(attention_mask=torch.zeros(2, 1, 1, 8))  # a mask (padding): the module's attention
        assert not same(output_attentions=False)  # arguments the step does not know
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the modules would run SDPA and o_proj in bf16
            assert not same()
        handle = layer.self_attn.k_proj.register_forward_hook(lambda *a: None)
        assert not same()
        handle.remove()
        layer.self_attn.config._attn_implementation = "flex_attention"
        assert fused_decode.layer_kind(layer) is None
        layer.self_attn.config._attn_implementation = "sdpa"
        assert fused_decode.layer_kind(layer) == "llama"
    from transformers import StaticCache

    cache = StaticCache(config=layer.self_attn.config, max_cache_len=16)
    assert fused_decode._cache_layer(cache, 0, x, 2) is None  # only a DynamicCache's cat is what the step expects
    with onednn_linears(layer), fused_decode.fused_lm(layer) as patched:  # gradients wanted
        assert patched == 0
    assert "forward" not in vars(layer) and "forward" not in vars(layer.mlp)


# -- a LLaMA model's whole decoding step ----------------------------------------------------------------
def count_wrapper_calls(monkeypatch) -> list:
    """An entry per call of a Flamingo wrapper's forward (what a model's decoding-step loop bypasses) from here on."""
    from flamingo_vlm.modeling.injection import FlamingoLayer

    calls = []
    real = FlamingoLayer.forward
    monkeypatch.setattr(FlamingoLayer, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def loop_like_stock(model, run, wrapped: list, calls: list) -> bool:
    """``run()`` (an LM model's output and its cache's tensors) inside ``fused_lm`` as outside it, under the same
    routes; whether the patched forward ran no wrapper module (``wrapped`` stayed empty)."""
    with onednn_linears(model):
        want, want_cache = run()
    del wrapped[:], calls[:]
    with onednn_linears(model), fused_decode.fused_lm(model):
        got, got_cache = run()
    assert type(got) is type(want)
    for a, b in zip(got if isinstance(got, tuple) else got.to_tuple(),
                    want if isinstance(want, tuple) else want.to_tuple()):
        for t, u in (zip(a, b) if isinstance(a, tuple) else [(a, b)]):
            if isinstance(t, torch.Tensor):
                assert (t - u).abs().max() <= 1e-5 * u.abs().max()
    assert got_cache.shape == want_cache.shape and (got_cache - want_cache).abs().max() <= 1e-5 * want_cache.abs().max()
    return not wrapped


def run_llama_model(lm, ids, keys, values, **kwargs):
    """``lm`` (a LlamaModel) on ``ids`` after a DynamicCache of ``keys``/``values`` in every layer: its
    output and the cache's keys."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    for i in range(lm.config.num_hidden_layers):
        cache.update(keys.clone(), values.clone(), i)
    name = kwargs.pop("cache_name", "cache")  # (past_key_values: the name transformers 5.0 used)
    out = lm(input_ids=ids, use_cache=True, **{name: cache}, **kwargs)
    n = lm.config.num_hidden_layers
    return out, torch.stack([cache.layers[i].keys for i in range(n)] + [cache.layers[i].values for i in range(n)])


@needs_native
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_a_llama_models_decoding_step_runs_its_layers_in_one_loop_with_the_stock_answers(fresh, monkeypatch):
    """At a decoding step LlamaModel's patched forward calls no layer module (neither the Flamingo wrapper
    nor the decoder layer): each layer's cross-attention and step, as the stock forward computes them;
    a left-padded batch's mask goes to the steps; anything it does not take (asked outputs, hooks,
    another cache) runs the stock forward."""
    from flamingo_vlm.modeling.injection import FlamingoLayer

    native_routes(monkeypatch)
    model, _ip, _tok = tiny_flamingo("llama", every=2, num_hidden_layers=4)
    lm = model.lang_encoder.model
    assert fused_decode.llama_model_kind(lm) == "llama"
    wrapped = count_wrapper_calls(monkeypatch)
    calls = count_steps(monkeypatch, native.LlamaStep, "post")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 40, (2, 1), generator=g)
    keys, values = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(2))

    def same(**kwargs):
        """(the patched forward's output and cache as the stock one's, whether it ran no layer module)"""
        return loop_like_stock(model, lambda: run_llama_model(lm, ids, keys, values, **kwargs), wrapped, calls)

    with torch.no_grad():
        assert same() and len(calls) == 4  # every layer's step, no module call
        assert same(attention_mask=torch.ones(2, 6, dtype=torch.long))  # a mask without padding
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, 0] = 0
        assert same(attention_mask=mask) and len(calls) == 4  # padding: the steps take its mask
        assert not same(return_dict=False)
        handle = lm.layers[1].register_forward_pre_hook(lambda *a: None)  # a hook must see its module's call
        assert not same()
        handle.remove()
        handle = lm.layers[2].decoder_layer.self_attn.o_proj.register_forward_hook(lambda *a: None)
        assert same() and len(calls) == 3  # that layer as the stock forward calls it, the others' steps
        handle.remove()
        assert same(position_ids=torch.tensor([[9], [9]]))  # positions given
        assert same(cache_name="past_key_values")
        assert not same(cache_position=torch.tensor([5]))  # (5.0 made the positions from it)
        lm.config.return_dict = False  # the stock forward's default for return_dict: a tuple
        assert not same()
        lm.config.return_dict = True
        lm.layers[3].forward = lambda *a, **k: FlamingoLayer.forward(lm.layers[3], *a, **k)  # a replaced forward
        assert not same()
        del lm.layers[3].forward
        # asked outputs: the stock forward collects them (with hooks on the layers that transformers leaves
        # there, so the stock forward runs from then on)
        assert not same(output_hidden_states=True)
    with fused_decode.fused_lm(model) as patched:  # gradients wanted: nothing patched
        assert patched == 0
    with torch.no_grad(), fused_decode.fused_lm(model):
        model.train()  # training mode: the stock forward
        del wrapped[:]
        run_llama_model(lm, ids, keys, values)
        assert wrapped
    model.eval()


# -- MPT blocks ----------------------------------------------------------------------------------------
MPT_LAYERS = ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")


def mpt_block(clip=None, seed: int = 0):
    """transformers' MptBlock at odd sizes (d 44, 4 heads of 11), LayerNorms that are not the identity,
    and its model's ALiBi bias (max_seq_len 16)."""
    from transformers import MptConfig
    from transformers.models.mpt.modeling_mpt import MptBlock, build_mpt_alibi_tensor

    torch.manual_seed(seed)
    cfg = MptConfig(d_model=44, n_heads=4, expansion_ratio=3, max_seq_len=16, attn_config={"clip_qkv": clip})
    block = MptBlock(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for n in (block.norm_1, block.norm_2):
            n.weight.add_(torch.randn_like(n.weight) * 0.3)
    return block, build_mpt_alibi_tensor(4, 16)


def run_mpt(block, x, keys, values, bias, mask=None, **kwargs):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(keys.clone(), values.clone(), 0)
    out = block(x, position_bias=bias, attention_mask=mask, layer_past=cache, use_cache=True, **kwargs)
    return out[0], cache.layers[0].keys, cache.layers[0].values


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("weights, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            ("int8", torch.float32), ("int8", torch.bfloat16)])
def test_an_mpt_block_step_computes_what_the_block_computes(isa, weights, dtype):
    block, bias = mpt_block(clip=1.5)
    prods, dense = products(block, weights, isa, MPT_LAYERS, dtype)
    norms = tuple(native.Norm(n.weight.detach().to(dtype), None, n.eps) for n in (block.norm_1, block.norm_2))
    step = native.MptStep(prods, norms, heads=4, clip=1.5, scale=block.attn.softmax_scale, dtype=dtype)
    ref = copy.deepcopy(block)
    with torch.no_grad():
        for name, w in zip(MPT_LAYERS, dense):
            ref.get_submodule(name).weight.copy_(w)
    g = torch.Generator().manual_seed(2)
    for rows, masked in ((1, False), (3, True)):
        x = (torch.randn(rows, 1, 44, generator=g) * 2).to(dtype)
        keys, values = (torch.randn(rows, 4, 6, 11, generator=g).to(dtype) for _ in range(2))
        mask = torch.zeros(rows, 1, 1, 7, dtype=torch.bool)
        if masked:
            mask[1, ..., :3] = True  # a left-padded row
        with torch.no_grad():
            want, want_k, _ = run_mpt(ref.double(), x.double(), keys.double(), values.double(), bias.double(), mask)
            qkv, k, v = step.pre(x)
            got = step.post(x, qkv, torch.cat([keys, k], 2), torch.cat([values, v], 2), bias, mask)
            assert got.dtype == dtype and got.shape == x.shape
            if dtype == torch.float32:
                for a, b in ((got, want), (k, want_k[:, :, -1:])):
                    assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()
            else:
                stock, stock_k, _ = run_mpt(copy.deepcopy(ref).to(dtype), x, keys, values, bias, mask)
                assert (got.double() - stock.double()).abs().max() <= 2 ** -6 * stock.double().abs().max()
                assert (got.double() - want).abs().max() <= 3 * (stock.double() - want).abs().max() + 1e-6
                assert (k.double() - stock_k[:, :, -1:].double()).abs().max() <= 2 ** -7 * stock_k.double().abs().max()
    with pytest.raises(ValueError, match="MptStep"):
        step.post(x, qkv, keys, values, bias[:, :, :3], mask)  # a bias shorter than the keys


@needs_native
def test_a_patched_mpt_block_runs_the_module_wherever_the_step_does_not_fit(fresh, monkeypatch):
    native_routes(monkeypatch)
    block, bias = mpt_block()
    calls = count_steps(monkeypatch, native.MptStep, "post")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 44, generator=g)
    keys, values = (torch.randn(2, 4, 6, 11, generator=g) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.bool)

    def same(bias=bias, mask=mask, **kwargs) -> bool:
        return fused_like_module(block, lambda: run_mpt(block, x, keys, values, bias, mask, **kwargs), calls)

    with torch.no_grad():
        assert same() and same(mask=None)
        assert not same(output_attentions=True)  # the module's attention weights are wanted
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not same()
        assert not same(bias=bias.to(torch.float64))
        handle = block.attn.Wqkv.register_forward_hook(lambda *a: None)
        assert not same()
        handle.remove()
        block.attn.train()  # a submodule left in training mode (its dropout would apply)
        assert not same()
        block.attn.eval()
        block.ffn.act = nn.GELU(approximate="tanh")
        assert fused_decode.layer_kind(block) is None


def tiny_mosaic_flamingo(**attn):
    """A Flamingo on our MosaicGPT (modeling/mpt.py): biases, qk_ln, clip_qkv, the MosaicGPT slopes."""
    from transformers import MptConfig

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling.mpt import MosaicMptForCausalLM
    from tiny import randomize_gates, tiny_tokenizer, tiny_vision

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = MptConfig(d_model=44, n_layers=2, n_heads=4, expansion_ratio=3, max_seq_len=64, vocab_size=len(tok),
                    no_bias=False, attn_config={"qk_ln": True, "clip_qkv": 2.0, "alibi": True, **attn})
    cfg.alibi_slopes = "mosaic_gpt"
    lm = MosaicMptForCausalLM(cfg).eval()
    with torch.no_grad():
        for n in lm.modules():
            if isinstance(n, nn.LayerNorm):
                n.weight.add_(torch.randn_like(n.weight) * 0.3)
                n.bias.add_(torch.randn_like(n.bias) * 0.3)
    model, _ip, tok = create_model_and_transforms(tiny_vision(), None, lm, tok, cross_attn_every_n_layers=1)
    randomize_gates(model)
    return model.eval()


@needs_native
@pytest.mark.parametrize("lm", ["mpt", "mosaic"])
def test_an_mpt_models_decoding_step_runs_its_blocks_in_one_loop_with_the_stock_answers(fresh, monkeypatch, lm):
    """MptModel's (and our MosaicGPT's) patched forward at a decoding step: no block module called, each
    block's cross-attention and step with the ALiBi row and the padding mask made once, the stock answers;
    the stock forward where it does not take the call."""
    from transformers import DynamicCache

    native_routes(monkeypatch)
    model = tiny_mosaic_flamingo() if lm == "mosaic" else tiny_flamingo("mpt", every=2, n_layers=4)[0]
    body = model.lang_encoder.transformer
    layers = len(body.blocks)
    assert fused_decode.mpt_model_kind(body) == "mpt"
    wrapped = count_wrapper_calls(monkeypatch)
    calls = count_steps(monkeypatch, native.MptStep, "post")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 40, (2, 1), generator=g)
    heads, dh = body.num_heads, body.config.d_model // body.num_heads
    keys, values = (torch.randn(2, heads, 5, dh, generator=g) for _ in range(2))

    def run(*args, **kwargs):
        cache = DynamicCache(config=body.config)
        for i in range(layers):
            cache.update(keys.clone(), values.clone(), i)
        out = body(*args, cache=cache, use_cache=True, **kwargs)
        return out, torch.stack([cache.layers[i].keys for i in range(layers)])

    def same(*args, **kwargs):
        """(the patched forward's output and cache as the stock one's, whether it ran no block module)"""
        args = args or (() if "input_ids" in kwargs else (ids,))
        return loop_like_stock(model, lambda: run(*args, **kwargs), wrapped, calls)

    with torch.no_grad():
        assert same() and len(calls) == layers  # every block's step, no module call
        assert same(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[0, :2] = 0  # a left-padded row: the steps take its mask
        assert same(attention_mask=mask) and len(calls) == layers
        assert not same(return_dict=False)
        handle = body.blocks[1].register_forward_pre_hook(lambda *a: None)
        assert not same()
        handle.remove()
        handle = body.blocks[0].decoder_layer.attn.out_proj.register_forward_hook(lambda *a: None)
        assert same(attention_mask=mask) and len(calls) == layers - 1  # that block as the stock forward calls it
        handle.remove()
        assert not same(output_attentions=True)
        if lm == "mosaic":  # past max_seq_len: the stock forward's error
            long = torch.randn(2, heads, body.config.max_seq_len, dh, generator=g)
            keys, values = long, long.clone()
            with onednn_linears(model), fused_decode.fused_lm(model), pytest.raises(ValueError, match="max_seq_len"):
                run(ids)
    model.train()  # training mode: the stock forward
    with torch.no_grad(), onednn_linears(model), fused_decode.fused_lm(model):
        del wrapped[:]
        keys, values = keys[:, :, :5], values[:, :, :5]
        run(ids)
        assert wrapped
    model.eval()


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "int8", "bf16"])
def test_generate_on_our_mosaic_gpt_runs_each_block_in_native_calls_with_the_modules_answers(fresh, monkeypatch, kind):
    native_routes(monkeypatch)
    model = tiny_mosaic_flamingo()
    if kind == "int8":
        quantize_model(model, "int8")
    elif kind == "bf16":
        model.to(torch.bfloat16)
    assert sum(fused_decode.layer_kind(m) == "mpt" for m in model.modules()) == 2
    calls = count_steps(monkeypatch, native.MptStep, "post")
    tokens, scores = generate(model, monkeypatch, fused=True)
    assert len(calls) == 2 * 5 and set(calls) == {2}
    ref_tokens, ref_scores = generate(model, monkeypatch, fused=False)
    assert len(calls) == 10
    finite = ref_scores.isfinite()
    if kind != "bf16":
        assert torch.equal(tokens, ref_tokens)
        assert (scores - ref_scores)[finite].abs().max() <= 1e-4 * ref_scores[finite].abs().max()
    else:  # (the attention in fp32 as the module's; products summed in another order)
        assert (scores - ref_scores)[finite].float().norm() <= 0.02 * ref_scores[finite].float().norm()
    # a left-padded row: the mask reaches the step
    media = model.media_token_id
    lang_x = torch.tensor([[media, 5, 6, media, 7, 8], [0, 0, 0, media, 7, 5]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    vision_x = torch.randn(2, 2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(next(model.parameters()).dtype)
    outs = []
    for fused in ("1", "0"):
        monkeypatch.setenv(fused_decode.ENV, fused)
        with torch.inference_mode():
            outs.append(model.generate(vision_x, lang_x, mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True))
    assert len(calls) == 10 + 2 * 3  # 3 decoding steps after the first token
    a, b = torch.stack(outs[0].scores).float(), torch.stack(outs[1].scores).float()
    finite = b.isfinite()
    assert (a - b)[finite].norm() <= (1e-4 if kind != "bf16" else 0.02) * b[finite].norm()


def test_a_step_appends_its_key_and_value_into_room_and_never_into_a_view_held_elsewhere():
    from transformers import DynamicCache

    torch.manual_seed(0)
    cache = DynamicCache()
    ref_k, ref_v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(ref_k, ref_v, 0)  # (the prompt: the stock cat)
    layer, buffers = cache.layers[0], set()
    for _ in range(90):  # (past the first buffer's room: 5 + 1 + 1 + 64 positions)
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        held, snapshot = layer.keys, layer.keys.clone()
        keys, values = fused_decode._append(layer, k, v)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert layer.keys is keys and layer.values is values and cache.get_seq_length(0) == ref_k.shape[2]
        assert torch.equal(held, snapshot)  # (the step's position lies past every earlier view)
        buffers.add(keys.untyped_storage().data_ptr())
    assert len(buffers) == 2  # one buffer, regrown once when full: no copy of the cache per step

    # cropped (assisted decoding): the next step writes where the cut positions were, so it gets a new
    # buffer, and a view of the longer past is left as it was
    held, snapshot = layer.keys, layer.keys.clone()
    layer.crop(-3)
    keys, _ = fused_decode._append(layer, k, v)
    assert torch.equal(held, snapshot) and torch.equal(keys, torch.cat([ref_k[:, :, :-3], k], 2))
    assert keys.untyped_storage().data_ptr() not in buffers

    # a cache rebuilt from views of this one (as from stored tensors) appends into buffers of its own
    other = DynamicCache()
    other.update(ref_k[:, :, :1], ref_v[:, :, :1], 0)
    other.layers[0].keys, other.layers[0].values = layer.keys[:, :, :10], layer.values[:, :, :10]
    snapshot = layer.keys.clone()
    fused_decode._append(other.layers[0], torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    assert torch.equal(layer.keys, snapshot)

    # buffers made under inference mode, a step outside it (in-place writes there would raise): new buffers
    with torch.inference_mode():
        fused_decode._append(layer, k, v)
    keys, _ = fused_decode._append(layer, k, v)
    assert not keys.is_inference() and torch.equal(keys[:, :, -2:], torch.cat([k, k], 2))


@needs_native
def test_a_held_step_keeps_its_weights_and_checks_nothing_per_call():
    """fused_decode's steps live for one block (a generate) and hold their tensors (native.hold): no
    per-call check (11 us a call after the kernels streamed the weights through the caches), and no
    freed memory read where the caller's references go."""
    b = block()
    x, k = torch.randn(2, 1, 40), torch.randn(2, 3, 5, 12)
    no_norms = (native.Norm(None, None, 1e-5),) * 2
    prods, dense = products(b, "fp32", 1)
    want = native.XattnStep(prods, no_norms, heads=3, dtype=torch.float32)(x, k, k, 0.5, 0.5)
    held = native.hold(native.XattnStep(prods, no_norms, heads=3, dtype=torch.float32))
    assert held._kept == [] and len(held._held) >= 4
    del prods, dense
    assert torch.equal(held(x, k, k, 0.5, 0.5), want)
    prods, dense = products(b, "fp32", 1)
    step = native.XattnStep(prods, no_norms, heads=3, dtype=torch.float32)
    del prods, dense
    with pytest.raises(ValueError, match="XattnStep: a tensor it was built from is gone"):
        native.hold(step)
