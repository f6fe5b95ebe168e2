"""Our C kernels (flamingo_vlm.modeling.native): built on first use, exact against a float64
reference in every SIMD path this CPU has, chosen per machine, and used by int8 layers."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flamingo_vlm.modeling import kernels, native
from flamingo_vlm.modeling.quantize import QuantizedLinear, quantize_model
from tiny import tiny_flamingo

needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native kernels: {native.unavailable_reason()}")
ISAS = [0, 1, 2, 3][: (native.library().fv_isa() + 1) if native.library() is not None else 1]
INT8_ISAS = [i for i in ISAS if i <= 2]  # (the AVX512-BF16 path is the AVX-512 one for int8 weights)


def reference(x, q, s):
    return x.double() @ (q.double() * s.double()[:, None]).t()


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("n, k", [(40, 128), (10, 37), (1, 1), (7, 8), (9, 16), (6, 3072)])
def test_kernel_matches_float64_in_every_simd_path(isa, n, k):
    """Shapes cover the tails: rows not a multiple of 4, columns not a multiple of 16 (AVX-512) or 8 (AVX2)."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    for m in (1, 2, 3, 5, 9):
        x = torch.randn(m, k, generator=g)
        for sdt in (torch.float32, torch.bfloat16):
            s = (torch.rand(n, generator=g) + 0.5).to(sdt)
            y = native.int8_linear(x, q, s, isa=isa)
            ref = reference(x, q, s)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
            # bf16 input and output: the fp32 result of the widened input, rounded to nearest even, as torch rounds
            yb = native.int8_linear(x.bfloat16(), q, s, isa=isa)
            assert yb.dtype == torch.bfloat16
            assert torch.equal(yb, native.int8_linear(x.bfloat16().float(), q, s, isa=isa).bfloat16())
            # a bias, added in fp32 before the one rounding
            b = torch.randn(n, generator=g)
            yb = native.int8_linear(x, q, s, b.to(sdt), isa=isa)
            ref = reference(x, q, s) + b.to(sdt).double()
            assert (yb.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


@needs_native
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("n, k", [(40, 128), (10, 37), (1, 1), (7, 8), (9, 16), (6, 3072), (5, 17)])
def test_bf16_kernel_matches_float64_in_every_simd_path(isa, n, k):
    """bf16 weights as they are: products exact in fp32 and summed in fp32, so within fp32 rounding
    of the float64 product of the same bf16 values; a bf16 result is that, rounded once."""
    g = torch.Generator().manual_seed(n * 1000 + k + 7)
    w = torch.randn(n, k, generator=g).bfloat16()
    for m in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(m, k, generator=g)
        for b in (None, torch.randn(n, generator=g), torch.randn(n, generator=g).bfloat16()):
            for xdt in (torch.float32, torch.bfloat16):
                xs = x.to(xdt)
                y = native.bf16_linear(xs, w, b, isa=isa)
                ref = xs.double() @ w.double().t() + (0 if b is None else b.double())
                assert y.shape == (m, n) and y.dtype == xdt
                scale = (xs.double().abs() @ w.double().abs().t()).max() + (0 if b is None else b.double().abs().max())
                tol = 1e-5 * scale + 1e-6 if xdt == torch.float32 else 2 ** -8 * ref.abs().max() + 1e-5 * scale
                assert (y.double() - ref).abs().max() <= tol, (m, xdt, b is None)
                if xdt == torch.bfloat16 and isa < 3:  # the widening paths: the fp32 result, rounded to nearest even
                    assert torch.equal(y, native.bf16_linear(xs.float(), w, None if b is None else b.float(),
                                                             isa=isa).bfloat16())


@needs_native
@pytest.mark.parametrize("isa", INT8_ISAS, ids=lambda i: native.ISA_NAMES[i])
@pytest.mark.parametrize("n, k", [(40, 128), (10, 37), (1, 1), (9, 16), (6, 3072), (5, 17)])
def test_fp32_kernel_matches_float64_in_every_simd_path(isa, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k + 11)
    w = torch.randn(n, k, generator=g)
    for m in (1, 2, 3, 5, 8, 9):
        x = torch.randn(m, k, generator=g)
        for b in (None, torch.randn(n, generator=g)):
            y = native.fp32_linear(x, w, b, isa=isa)
            ref = x.double() @ w.double().t() + (0 if b is None else b.double())
            scale = (x.double().abs() @ w.double().abs().t()).max() + (0 if b is None else b.double().abs().max())
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert (y.double() - ref).abs().max() <= 1e-6 * scale + 1e-7
    with pytest.raises(ValueError, match="fp32 weight"):
        native.fp32_linear(torch.randn(1, 8), torch.zeros(4, 8).bfloat16())


@needs_native
def test_bf16_kernel_rejects_what_it_cannot_take():
    w = torch.zeros(4, 8).bfloat16()
    with pytest.raises(ValueError, match="bf16 weight"):
        native.bf16_linear(torch.randn(1, 8), w.float())
    with pytest.raises(ValueError, match=r"input \(1, 9\)"):
        native.bf16_linear(torch.randn(1, 9), w)
    with pytest.raises(ValueError, match=r"bias \(3,\)"):
        native.bf16_linear(torch.randn(1, 8), w, torch.zeros(3))
    with pytest.raises(ValueError, match="contiguous"):
        native.bf16_linear(torch.randn(1, 8), torch.zeros(8, 4).bfloat16().t())


@needs_native
def test_kernel_rejects_what_it_cannot_take():
    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="int8 weight"):
        native.int8_linear(torch.randn(1, 9), q, s)  # wrong width
    with pytest.raises(ValueError, match="float16"):
        native.int8_linear(torch.randn(1, 8).half(), q, s)
    with pytest.raises(ValueError, match="contiguous"):
        native.int8_linear(torch.randn(8, 2).t(), q, s)
    with pytest.raises(ValueError, match=r"scales \(2,\)"):  # would have read past the scales' end
        native.int8_linear(torch.randn(1, 8), q, torch.ones(2))
    with pytest.raises(ValueError, match=r"input \(8,\)"):
        native.int8_linear(torch.randn(8), q, s)
    with pytest.raises(ValueError, match="meta"):  # a pointer C cannot read
        native.int8_linear(torch.randn(1, 8), q.to("meta"), s)
    layer = QuantizedLinear(nn.Linear(64, 8), "int8").to("meta")  # a layer moved off the CPU: torch's error
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        layer(torch.randn(1, 64))


def test_unavailable_where_turned_off_or_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAMINGO_VLM_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        monkeypatch.setenv(native.ENV, "0")
        assert native.library() is None and native.ENV in native.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            native.int8_linear(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))
        native.library.cache_clear()
        monkeypatch.delenv(native.ENV)
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("PATH", str(tmp_path))  # and no cc, gcc or clang on the PATH
        assert native.library() is None and "no C compiler" in native.unavailable_reason()
        assert not (tmp_path / "native").exists()
    finally:
        native.library.cache_clear()


@needs_native
def test_build_is_cached_whole_and_a_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAMINGO_VLM_CACHE", str(tmp_path))
    cc = native._compiler()
    out = native._build(cc)
    assert out.parent == tmp_path / "native" and out.is_file()
    assert native._build(cc) == out  # cached: same file, not rebuilt
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "_SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"broken\.c: .*error") as e:  # the compiler's own error line
        native._build(cc)
    assert "\n" not in str(e.value)
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert out.stat().st_mode & 0o755 == 0o755  # loadable by the other users of a shared cache


@needs_native
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FLAMINGO_VLM_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be made
    out = native._build(native._compiler())
    assert out.parent == native._cache_dirs()[-1] and out.is_file()


def test_cc_may_carry_flags(monkeypatch, tmp_path):
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", f"{cc[0]} -O2")
    assert native._compiler() == [cc[0], "-O2"]
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))  # not there: the usual names
    assert native._compiler() is not None and native._compiler()[0] != str(tmp_path / "missing-cc")


@needs_native
@pytest.mark.parametrize("ours, chosen", [(0.5, True), (0.95, False)])
def test_our_int8_kernel_is_chosen_only_where_it_measured_faster(fresh, monkeypatch, ours, chosen):
    def fastest(runs, reps=5, rounds=3):
        return {name: 1.0 if name == "torch" else ours + 0.1 * (name == "AVX-512") for name in runs}

    monkeypatch.setattr(kernels, "_fastest", fastest)
    chosen = chosen and len(ISAS) > 1  # no SIMD path (not x86-64): torch's kernel, whatever the timings
    assert kernels.decide("int8_decode") is chosen
    data = json.loads(kernels.cache_file().read_text())
    assert set(data["int8_decode_ms"]) == {"torch", *(native.ISA_NAMES[i] for i in INT8_ISAS[1:])}
    assert kernels.int8_isa() == (1 if chosen else None)  # the faster of the SIMD paths (AVX2 in these timings)
    line = kernels.summary(kernels.kernel_choice(("int8_decode",)))
    assert ("our C kernel for decode-sized int8" in line) == chosen
    assert "int8 linears" not in kernels.summary(kernels.kernel_choice(("bf16",)))  # only the parts asked for
    monkeypatch.setenv(kernels.ENV, "default")
    assert kernels.int8_isa() is None
    with monkeypatch.context() as mp:  # a cached choice of our kernel, but the kernel no longer builds here
        mp.setenv(kernels.ENV, "auto")
        mp.setattr(kernels, "_MEMO", {})
        mp.setattr(native, "library", lambda: None)
        assert kernels.int8_isa() is None
    monkeypatch.setenv(kernels.ENV, "onednn")
    assert kernels.int8_isa() == INT8_ISAS[-1]


@needs_native
def test_int8_layer_uses_our_kernel_for_few_rows_only(fresh, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "_MEMO", {"int8_decode": True, "int8_isa": ISAS[-1]})
    layer = nn.Linear(96, 40)
    q = QuantizedLinear(layer, "int8")
    calls = []
    real = native.int8_linear
    monkeypatch.setattr(native, "int8_linear", lambda *a, **k: calls.append(a[0].numel() // 96) or real(*a, **k))
    w = q.dequantized_weight()
    for shape in [(1, 96), (2, 1, 96), (8, 96), (9, 96), (3, 5, 96)]:
        x = torch.randn(*shape)
        out = q(x)
        assert out.shape == (*shape[:-1], 40)
        # ours computes from the fp32 input, torch's kernel from the input rounded to bf16
        tol = 1e-5 if x[..., 0].numel() <= kernels.DECODE_ROWS else 1e-2
        ref = F.linear(x, w, layer.bias)
        assert (out - ref).norm() <= tol * ref.norm()
    assert calls == [1, 2, 8]  # rows
    q(torch.randn(1, 96, requires_grad=True))  # a gradient wanted: torch's op, which autograd knows
    q.native = False
    q(torch.randn(1, 96))
    assert len(calls) == 3
    assert q(torch.randn(1, 96).bfloat16()).dtype == torch.bfloat16
    # the buffers are checked once per set of tensors: a replaced one (here strided) is checked again
    q.native = True
    del calls[:]
    x = torch.randn(1, 96)
    before = q(x)
    q.scales = torch.stack([q.scales, q.scales], 1)[:, 0]
    assert not q.scales.is_contiguous()
    assert (q(x) - before).norm() <= 1e-2 * before.norm()  # torch's kernel: x rounded to bf16
    assert calls == [1]
    q.scales = q.scales.contiguous()
    q(x)
    assert calls == [1, 1]
    q.bias.data = q.bias.data.double()  # the same tensor object, another dtype: checked again
    ref = F.linear(x, q.dequantized_weight(), layer.bias)
    assert (q(x) - ref).norm() <= 1e-2 * ref.norm()
    assert calls == [1, 1]


def test_a_damaged_timing_table_in_the_cache_does_not_break_the_summary(fresh):
    kernels.cache_file().parent.mkdir(parents=True, exist_ok=True)
    kernels.cache_file().write_text(json.dumps({"int8_gemm_routes": {"16": "aten", "64": "aten"},
                                                "int8_gemm_ms": {"64": 3.0}, "native_int8_decode": False,
                                                "int8_decode_ms": {"torch": "x"}}))
    line = kernels.summary(kernels.kernel_choice(("int8_gemm", "int8_decode")))
    assert "torch default for larger int8 linears" in line and "64 rows" not in line


@needs_native
def test_generate_through_our_kernel_equals_generate_through_a_float64_reference(fresh, monkeypatch):
    """The whole decode path with our kernel in every decode-sized int8 call, against the same model
    with that kernel swapped for a float64 product: the same greedy tokens, logits to fp32 rounding."""
    import copy

    monkeypatch.setattr(kernels, "_MEMO", {"int8_decode": True, "int8_isa": ISAS[-1]})
    model, _ip, _tok = tiny_flamingo()
    q = copy.deepcopy(model)
    quantize_model(q, "int8")
    g = torch.Generator().manual_seed(0)
    vision_x = torch.randn(1, 2, 1, 3, 32, 32, generator=g)
    media = q.media_token_id if hasattr(q, "media_token_id") else _tok.convert_tokens_to_ids("<image>")
    lang_x = torch.tensor([[media, 5, 6, media, 7, 8]])  # 6 rows: every LM call is decode-sized
    calls = []
    real = native.int8_linear

    def ours(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def float64(x, w, s, b=None, **_):
        return (reference(x, w, s) + (0 if b is None else b.double())).to(x.dtype)

    def run(kernel):
        monkeypatch.setattr(native, "int8_linear", kernel)
        with torch.inference_mode():
            tokens = q.generate(vision_x, lang_x, torch.ones_like(lang_x), max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, num_beams=1)
            logits = q(vision_x, lang_x, attention_mask=torch.ones_like(lang_x)).logits
        return tokens, logits

    tokens, logits = run(ours)
    assert calls, "no call reached our kernel"
    ref_tokens, ref_logits = run(float64)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


ROUTES8 = ["aten", "fp32"] + (["bf16"] if kernels._bf16_supported() else [])


@pytest.mark.parametrize("route", ROUTES8)
def test_int8_gemm_routes_compute_the_scaled_product(route):
    """Every route of larger int8 calls is (x @ q.T) * s + b in x's dtype: fp32 to fp32 rounding, the
    bf16 ones (torch's kernel rounds x to bf16; ours rounds the product once more) to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (48, 96), generator=g, dtype=torch.int8)
    s = (torch.rand(48, generator=g) + 0.5).bfloat16()
    b = torch.randn(48, generator=g)
    x = torch.randn(40, 96, generator=g)
    ref = reference(x, q, s) + b.double()
    out = kernels.int8_gemm(x, q, s, b, route)
    assert out.shape == (40, 48) and out.dtype == torch.float32
    tol = 1e-6 if route == "fp32" else 1e-2
    assert (out.double() - ref).norm() <= tol * ref.norm()
    assert kernels.int8_gemm(x.bfloat16(), q, s, None, route).dtype == torch.bfloat16


@pytest.mark.parametrize("winner, ratio", [("bf16", 0.5), ("fp32", 0.5), ("bf16", 0.95)])
def test_larger_int8_calls_take_the_route_that_measured_faster(fresh, monkeypatch, winner, ratio):
    if winner == "bf16" and not kernels._bf16_supported():
        pytest.skip("bf16 is not native here: the probe does not time it")

    def fastest(runs, reps=5, rounds=3):
        return {name: ratio if name == winner else 1.0 + 0.1 * (name != "aten") for name in runs}

    monkeypatch.setattr(kernels, "_fastest", fastest)
    chosen = ratio <= kernels.MARGIN
    assert kernels.decide("int8_gemm") is chosen
    data = json.loads(kernels.cache_file().read_text())
    assert set(data["int8_gemm_routes"]) == {"16", "64"}
    expected = winner if chosen else "aten"
    assert [kernels.int8_gemm_route(r) for r in (9, 32, 33, 500)] == [expected] * 4
    line = kernels.summary(kernels.kernel_choice(("int8_gemm",)))
    assert {"aten": "torch default", "bf16": "bf16 GEMM", "fp32": "fp32 GEMM"}[expected] + " for larger int8" in line
    # per bucket: a cached table with two routes, read by a new process
    data["int8_gemm_routes"] = {"16": "aten", "64": "fp32"}
    kernels.cache_file().write_text(json.dumps(data))
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert [kernels.int8_gemm_route(r) for r in (9, 32, 33)] == ["aten", "aten", "fp32"]
    # a damaged cached table is measured again, not trusted
    data["int8_gemm_routes"] = {"16": "mkl", "64": "fp32"}
    kernels.cache_file().write_text(json.dumps(data))
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert kernels.int8_gemm_route(100) == expected
    monkeypatch.setenv(kernels.ENV, "default")
    assert kernels.int8_gemm_route(100) == "aten"
    monkeypatch.setenv(kernels.ENV, "onednn")
    assert kernels.int8_gemm_route(100) == ("bf16" if kernels._bf16_supported() else "aten")


def test_int8_layer_takes_the_larger_calls_route(fresh, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "_MEMO", {"int8_decode": False, "int8_isa": None,
                                           "int8_gemm": True, "int8_gemm_by": ("fp32", "aten")})
    layer = nn.Linear(96, 40)
    q = QuantizedLinear(layer, "int8")
    routes = []
    real = kernels.int8_gemm
    monkeypatch.setattr("flamingo_vlm.modeling.quantize.int8_gemm", lambda *a: routes.append(a[-1]) or real(*a))
    ref_w = q.dequantized_weight()
    for shape in [(1, 96), (9, 96), (4, 8, 96), (2, 40, 96)]:
        x = torch.randn(*shape)
        out = q(x)
        assert out.shape == (*shape[:-1], 40)
        ref = F.linear(x, ref_w, layer.bias)
        tol = 1e-5 if routes[-1] == "fp32" else 1e-2
        assert (out - ref).norm() <= tol * ref.norm()
    assert routes == ["aten", "fp32", "fp32", "aten"]  # 1 row: torch's (ours not chosen); 9 and 32: fp32; 80: aten
