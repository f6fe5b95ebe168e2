"""Per-machine kernel choice: decided by a cached probe, overridable, never oneDNN where it was slower."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flamingo_vlm import FlamingoProcessor
from flamingo_vlm.modeling import kernels
from tiny import random_images, tiny_flamingo

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch has no oneDNN linear kernel")


def fake_race(ratio, log):
    """``_race`` stand-in: oneDNN takes ``ratio`` times the default's time."""
    def race(a, b, reps=5, rounds=3):
        log.append(1)
        return 1.0, ratio
    return race


@pytest.mark.parametrize("ratio, chosen", [(0.5, True), (0.95, False), (1.5, False)])
def test_onednn_is_chosen_only_where_it_measured_clearly_faster(fresh, monkeypatch, ratio, chosen):
    log = []
    monkeypatch.setattr(kernels, "_race", fake_race(ratio, log))
    assert kernels.decide("decode") is chosen and kernels.decide("gemm") is chosen
    assert len(log) == 3  # decode: 1 and 4 rows; gemm


def test_the_probe_runs_once_then_the_cache_answers_and_a_damaged_cache_is_measured_again(fresh, monkeypatch):
    log = []
    monkeypatch.setattr(kernels, "_race", fake_race(0.5, log))
    assert kernels.decide("decode") and kernels.decide("decode")
    path = kernels.cache_file()
    assert path.parent == fresh / "kernels" and f"torch{torch.__version__.split('+')[0]}" in path.name
    data = json.loads(path.read_text())
    assert data["onednn_decode"] is True and data["cpu"] == kernels.cpu_model() and len(log) == 2
    monkeypatch.setattr(kernels, "_MEMO", {})  # a new process: the file answers, no probe
    assert kernels.decide("decode") and len(log) == 2
    path.write_text("{not json")
    monkeypatch.setattr(kernels, "_MEMO", {})
    monkeypatch.setattr(kernels, "_race", fake_race(2.0, log))
    assert kernels.decide("decode") is False and len(log) == 4
    assert json.loads(path.read_text())["onednn_decode"] is False
    monkeypatch.setenv(kernels.ENV, "probe")  # measure again although cached
    monkeypatch.setattr(kernels, "_MEMO", {})
    monkeypatch.setattr(kernels, "_race", fake_race(0.5, log))
    assert kernels.decide("decode") is True and len(log) == 6


def test_a_probe_taken_while_the_cpu_was_busy_is_measured_again_by_the_next_processes(fresh, monkeypatch):
    """A choice timed beside other processes holds for its own process; the next ones probe again,
    up to CONTENDED_TRIES probes, and a quiet probe clears the mark."""
    log = []
    monkeypatch.setattr(kernels, "_race", fake_race(0.5, log))
    busy = [1.5]
    monkeypatch.setattr(kernels, "_cpu_meter", lambda: lambda: busy[0])
    for tries in range(1, kernels.CONTENDED_TRIES + 1):
        monkeypatch.setattr(kernels, "_MEMO", {})  # a new process
        assert kernels.decide("decode") and len(log) == 2 * tries
        assert json.loads(kernels.cache_file().read_text())["contended"]["decode"] == {"others_cores": 1.5,
                                                                                       "tries": tries}
    assert "probed while other processes used the CPU: decode (1.5 cores, probe 3 of 3)" in kernels.summary(
        kernels.kernel_choice(("decode",)))
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert kernels.decide("decode") and len(log) == 2 * kernels.CONTENDED_TRIES  # kept: that busy is this machine
    path = kernels.cache_file()
    data = json.loads(path.read_text())
    data["contended"]["decode"]["tries"] = 1
    path.write_text(json.dumps(data))
    busy[0] = 0.0
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert kernels.decide("decode") and len(log) == 2 * kernels.CONTENDED_TRIES + 2
    assert json.loads(path.read_text())["contended"] == {}
    monkeypatch.setattr(kernels, "_MEMO", {})
    assert kernels.decide("decode") and len(log) == 2 * kernels.CONTENDED_TRIES + 2  # quiet: the cache answers


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc/stat")
def test_the_cpu_meter_sees_another_process_spinning(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: os.cpu_count())  # no core left free for others
    stop = kernels._cpu_meter()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert stop() >= kernels.CONTENDED_CORES


def test_env_override_needs_no_probe_and_a_bad_value_is_named(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "_race", lambda *a, **k: pytest.fail("probed despite the override"))
    monkeypatch.setenv(kernels.ENV, "default")
    assert not kernels.decide("decode") and not kernels.decide("gemm")
    monkeypatch.setenv(kernels.ENV, "onednn")
    assert kernels.decide("decode") and kernels.decide("gemm")
    assert "FLAMINGO_VLM_CPU_KERNELS=onednn" in kernels.summary(kernels.kernel_choice(("decode", "gemm")))
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="FLAMINGO_VLM_CPU_KERNELS='fast'.*auto, onednn, default, probe"):
        kernels.decide("decode")


def test_generate_follows_the_machine_choice_unless_the_model_forces_it(fresh, monkeypatch):
    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2, seed=1))])
    args = (batch["vision_x"], batch["input_ids"], batch["attention_mask"])
    used = {}
    for mode, flag in (("default", None), ("onednn", None), ("onednn", False), ("default", True)):
        monkeypatch.setenv(kernels.ENV, mode)
        model.cpu_onednn = flag
        before = kernels.calls
        ids = model.generate(*args, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        used[(mode, flag)] = (kernels.calls > before, ids)
    assert {k: v[0] for k, v in used.items()} == {
        ("default", None): False, ("onednn", None): True, ("onednn", False): False, ("default", True): True}
    assert all(torch.equal(v[1], used[("default", None)][1]) for v in used.values())


def test_the_real_probe_decides_and_reports(fresh):
    with torch.inference_mode():  # as from inside generate: the GEMM probe still gets its backward
        assert isinstance(kernels.decide("gemm"), bool)
    choice = kernels.kernel_choice()
    assert isinstance(choice.onednn_decode, bool) and isinstance(choice.onednn_gemm, bool)
    assert choice.timings["decode_ms"]["default"] > 0 and choice.timings["gemm_ms"]["onednn"] > 0
    assert choice.cpu in kernels.summary(choice) and kernels.cache_file().is_file()


def test_each_call_follows_the_choice_for_its_size(fresh, monkeypatch):
    """Decode-sized calls (few rows) and larger GEMMs are decided apart (oneDNN can win one, lose the other)."""
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    monkeypatch.setattr(kernels, "_MEMO", {"decode": True, "gemm": False})
    kernels.set_routes("fp32", ("onednn",) * len(kernels.DECODE_BUCKETS))
    layer = torch.nn.Linear(8, 4)
    used = {}
    with torch.no_grad(), onednn_linears(layer):
        for rows in (1, kernels.DECODE_ROWS, kernels.DECODE_ROWS + 1, 64):
            before = kernels.calls
            layer(torch.randn(rows, 8))
            used[rows] = kernels.calls > before
    assert used == {1: True, kernels.DECODE_ROWS: True, kernels.DECODE_ROWS + 1: False, 64: False}
    with onednn_linears(layer):  # a decode-sized call that wants gradients: the "decode" choice (oneDNN here)
        before = kernels.calls
        layer(torch.randn(2, 8, requires_grad=True)).sum().backward()
        assert kernels.calls > before


def test_fp32_decode_calls_take_our_kernel_where_it_was_chosen(fresh, monkeypatch):
    from flamingo_vlm.modeling import native
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    if native.library() is None:
        pytest.skip(f"no native kernels: {native.unavailable_reason()}")
    monkeypatch.setattr(kernels, "_MEMO", {"decode": False, "gemm": False})
    kernels.set_routes("fp32", ("native:1", "native:1", "default", "default"))
    calls = []
    real = native.fp32_linear
    monkeypatch.setattr(native, "fp32_linear", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    layer = torch.nn.Linear(40, 24)
    with torch.no_grad(), onednn_linears(layer):
        for shape in [(1, 40), (2, 1, 40), (3, 40), (9, 40)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert calls == [1, 2]  # 3 rows: the 4-row bucket's route (F.linear); 9: not decode-sized


def test_a_routed_layer_follows_what_changes_inside_the_block(fresh, monkeypatch):
    """The weight and bias checks our kernel needs are made once per block: a weight replaced inside
    the block, a non-contiguous input or a gradient wanted still get the right product (torch's)."""
    from flamingo_vlm.modeling import native
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    if native.library() is None:
        pytest.skip(f"no native kernels: {native.unavailable_reason()}")
    monkeypatch.setattr(kernels, "_MEMO", {"decode": False, "gemm": False})
    kernels.set_routes("fp32", ("native:1",) * len(kernels.DECODE_BUCKETS))
    calls = []
    real = native.fp32_linear
    monkeypatch.setattr(native, "fp32_linear", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    layer = torch.nn.Linear(40, 24)
    x = torch.randn(2, 1, 40)
    with onednn_linears(layer):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            assert calls == [(2, 1, 40)]  # leading dimensions kept, no copy
            strided = torch.randn(40, 3).t()  # (3, 40), not contiguous
            torch.testing.assert_close(layer(strided), torch.nn.functional.linear(strided, layer.weight, layer.bias))
            layer.weight = torch.nn.Parameter(torch.randn(24, 40).t().contiguous().t())  # replaced, not contiguous
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            # the strided input went to our kernel as a contiguous copy; the replaced (strided) weight did not
            assert calls == [(2, 1, 40), (3, 40)]
        y = layer(x.requires_grad_())
        y.sum().backward()  # a gradient wanted: autograd's ops
        assert x.grad is not None and len(calls) == 2


def test_a_routed_layer_is_right_after_in_place_changes_copies_pruning_and_nesting(fresh, monkeypatch):
    """What keeps the Parameter object but changes its tensor (``.to()``, ``.data =``), a deep copy of
    the layer taken inside the block, a pruned layer (its weight a plain attribute) and a nested
    ``enabled=True`` block all get the product of the layer's current weights."""
    import copy

    from torch.nn.utils import prune

    from flamingo_vlm.modeling import native
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    if native.library() is None:
        pytest.skip(f"no native kernels: {native.unavailable_reason()}")
    monkeypatch.setattr(kernels, "_MEMO", {"decode": False, "gemm": False})
    kernels.set_routes("fp32", ("native:1",) * len(kernels.DECODE_BUCKETS))
    kernels.set_routes("bf16", ("native:1",) * len(kernels.DECODE_BUCKETS))
    torch.manual_seed(0)

    def check(layer, x):
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))

    layer = torch.nn.Linear(40, 32)
    x = torch.randn(1, 40)
    with torch.no_grad(), onednn_linears(layer):
        check(layer, x)
        layer.to(torch.bfloat16)  # the same Parameter objects, bf16 tensors
        check(layer, x.bfloat16())
        layer.float()
        layer.weight.data = torch.randn(40, 32).t()  # strided, same object
        check(layer, x)
        layer.weight.data = torch.randn(32, 40)
        clone = copy.deepcopy(layer)
        clone.weight.zero_()
        clone.bias.zero_()
        assert clone(x).abs().max() == 0
        with onednn_linears(layer, enabled=True):  # forced: oneDNN, not our kernel
            before = kernels.calls
            check(layer, x)
            assert kernels.calls > before
    assert clone(x).abs().max() == 0  # after the block too
    pruned = torch.nn.Linear(40, 32)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    with torch.no_grad(), onednn_linears(pruned) as n:
        assert n == 1
        check(pruned, x)


# -- bf16 weights packed for oneDNN (decode) -------------------------------------------------------
def _packing_works() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(16, 8).bfloat16(), 1)
        return True
    except (AttributeError, RuntimeError):
        return False


needs_packing = pytest.mark.skipif(not _packing_works(), reason="this torch cannot pack bf16 weights for oneDNN")


@pytest.fixture
def no_packed(monkeypatch):
    kernels.clear_packed()
    monkeypatch.delenv(kernels.PACKED_ENV, raising=False)
    yield
    kernels.clear_packed()


@needs_packing
def test_packed_bf16_linear_matches_f_linear_and_lives_as_long_as_its_weight_unchanged(no_packed, monkeypatch):
    import gc

    import torch.nn.functional as F

    torch.manual_seed(0)
    w, b = torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    with torch.inference_mode():  # as inside generate
        for rows in (1, 4):
            x = torch.randn(rows, 1, 64).bfloat16()
            torch.testing.assert_close(kernels.packed_linear(x, w, b), F.linear(x, w, b))
    packs = kernels.packs
    assert kernels.packed_bytes() == w.numel() * 2  # packed once, for both row counts
    w.mul_(2)  # updated in place (e.g. load_state_dict): packed again, the new values used
    x = torch.randn(1, 64).bfloat16()
    torch.testing.assert_close(kernels.packed_linear(x, w), F.linear(x, w))
    assert kernels.packs == packs + 1 and kernels.packed_bytes() == w.numel() * 2
    w.data = torch.randn(48, 64).bfloat16()  # new storage (as module.to() gives): packed again
    torch.testing.assert_close(kernels.packed_linear(x, w), F.linear(x, w))
    assert kernels.packs == packs + 2
    w.data.mul_(-3)  # through .data: the version counter does not move, the sampled elements do
    torch.testing.assert_close(kernels.packed_linear(x, w), F.linear(x, w))
    assert kernels.packs == packs + 3
    verified: set[int] = set()  # inside a block the sample is compared once per block
    kernels.packed_linear(x, w, verified=verified)
    w.data.copy_(torch.randn(48, 64).bfloat16())
    stale = kernels.packed_linear(x, w, verified=verified)  # same block: the copy is trusted
    torch.testing.assert_close(kernels.packed_linear(x, w, verified=set()), F.linear(x, w))  # the next block
    assert not torch.allclose(stale.float(), F.linear(x, w).float()) and kernels.packs == packs + 4
    del w
    gc.collect()
    assert kernels.packed_bytes() == 0  # the copy went with its weight
    monkeypatch.setenv(kernels.PACKED_ENV, "0")  # no budget: F.linear, nothing kept
    w2 = torch.randn(48, 64).bfloat16()
    torch.testing.assert_close(kernels.packed_linear(x, w2), F.linear(x, w2))
    assert kernels.packs == packs + 4 and kernels.packed_bytes() == 0
    monkeypatch.setenv(kernels.PACKED_ENV, "lots")
    with pytest.raises(ValueError, match="FLAMINGO_VLM_PACKED_GB='lots'.*number of GB"):
        kernels.packed_linear(x, w2)
    # not plain bf16 CPU tensors: F.linear
    x32, w32 = torch.randn(1, 64), torch.randn(48, 64)
    assert torch.equal(kernels.packed_linear(x32, w32), F.linear(x32, w32))


@needs_packing
@pytest.mark.skipif(not kernels.packed_supported(), reason="no native bf16: packed bf16 decoding is never chosen")
def test_bf16_generate_on_packed_weights_gives_the_tokens_of_torchs_kernels(fresh, no_packed, monkeypatch):
    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    model = model.to(torch.bfloat16)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2, seed=1))])
    args = (batch["vision_x"].bfloat16(), batch["input_ids"], batch["attention_mask"])
    out = {}
    for mode in ("default", "onednn"):
        monkeypatch.setenv(kernels.ENV, mode)
        before = kernels.packs
        out[mode] = model.generate(*args, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert (kernels.packs > before) == (mode == "onednn")
    assert torch.equal(out["default"], out["onednn"])
    assert 0 < kernels.packed_bytes(model) == kernels.packed_bytes() <= sum(
        p.numel() * 2 for p in model.parameters())
    with torch.enable_grad():  # a forward that wants gradients never takes the packed route
        before = kernels.packs
        kernels.clear_packed()
        model(*args[:2], attention_mask=args[2])
        assert kernels.packs == before


@pytest.mark.parametrize("kind", ["bf16", "fp32"])
@pytest.mark.parametrize("ours, other, route", [
    (0.5, 0.6, "ours"),  # ours fastest
    (0.6, 0.55, "ours"),  # the other faster, but not by the margin: ours (for bf16, no packed copy)
    (0.8, 0.5, "other"),  # the other faster by more than the margin
    (0.95, 0.95, "default"),  # neither clearly faster than F.linear
])
def test_decode_route_is_the_measured_one(fresh, monkeypatch, kind, ours, other, route):
    from flamingo_vlm.modeling import native

    name = {"bf16": "packed", "fp32": "onednn"}[kind]

    def fastest(runs, reps=5, rounds=3):
        log.append(sorted(runs))
        return {k: {"default": 1.0, name: other}.get(k, ours + 0.01 * (k != "native:1")) for k in runs}

    log = []
    monkeypatch.setattr(kernels, "_fastest", fastest)
    has_other = kernels.packed_supported() if kind == "bf16" else kernels.onednn_available()
    has_native = native.library() is not None and native.library().fv_isa() > 0
    expected = {"ours": 1 if has_native else (name if has_other and other <= 0.9 else "default"),
                "other": name if has_other else (1 if has_native and ours <= 0.9 else "default"),
                "default": "default"}[route]
    assert kernels.decide(f"{kind}_decode") is (expected != "default")
    assert len(log) == (len(kernels.DECODE_BUCKETS) if has_other or has_native else 0)  # one race per row bucket
    assert all((name in names) == has_other for names in log)
    rows = range(1, kernels.DECODE_ROWS + 1)
    assert [kernels.decode_route(kind, r) for r in rows] == [expected] * kernels.DECODE_ROWS
    assert kernels.decode_route(kind, 0) == kernels.decode_route(kind, kernels.DECODE_ROWS + 1) == "default"
    line = kernels.summary(kernels.kernel_choice((f"{kind}_decode",)))
    label = {"default": "torch default", "packed": "packed oneDNN", "onednn": "oneDNN", 1: "ours AVX2"}[expected]
    assert f"{label} for decode-sized {kind} linears" in line
    monkeypatch.setenv(kernels.ENV, "default")
    assert kernels.decode_route(kind, 1) == "default"


def test_decode_routes_per_row_count_are_named_in_the_summary(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "packed_supported", lambda: True)
    kernels.set_routes("bf16", ("native:3", "native:1", "native:1", "packed"))
    assert [kernels.bf16_route(r) for r in range(1, 9)] == [3, 1, 1, 1, "packed", "packed", "packed", "packed"]
    c = kernels.KernelChoice(cpu="x", torch="t", threads=2, allocator="a", onednn_decode=False, onednn_gemm=False,
                             bf16_fast=True, fp32_decode=(), bf16_decode=kernels._routes_named("bf16"),
                             native_int8_decode=False, source="s", timings={})
    assert ("decode-sized bf16 linears: ours AVX512-BF16 at 1 row, ours AVX2 at 2-4 rows, packed oneDNN at 5-8 rows"
            in kernels.summary(c))


def test_routes_this_process_cannot_run_and_damaged_cached_routes_are_not_taken(fresh, monkeypatch):
    """A cache written where our kernel built, read where it does not (FLAMINGO_VLM_NATIVE=0, no
    compiler): F.linear, not a crash; a damaged route in the cache: measured again."""
    from flamingo_vlm.modeling import native

    path = kernels.cache_file()
    path.parent.mkdir(parents=True)
    routes = {"1": "native:1", "2": "native:1", "4": "native:2", "8": "default"}
    path.write_text(json.dumps({"bf16_decode_routes": routes, "fp32_decode_routes": routes}))
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(kernels, "packed_supported", lambda: True)
    monkeypatch.setattr(kernels, "_pack", lambda w: w)  # (oneDNN cannot pack bf16 on a CPU without bf16 instructions)
    for kind in ("bf16", "fp32"):
        assert [kernels.decode_route(kind, r) for r in (1, 4, 8)] == ["default"] * 3
    monkeypatch.setattr(kernels, "_MEMO", {})
    path.write_text(json.dumps({"bf16_decode_routes": {**routes, "1": "native:"}}))
    log = []
    monkeypatch.setattr(kernels, "_fastest", lambda runs, **k: log.append(1) or {n: 1.0 for n in runs})
    assert kernels.decode_route("bf16", 1) == "default" and len(log) == len(kernels.DECODE_BUCKETS)


@needs_packing
@pytest.mark.skipif(not kernels.packed_supported(), reason="no native bf16: no packed copies")
def test_bf16_decode_on_our_kernel_makes_no_packed_copies_and_gives_the_tokens_of_torchs_kernels(fresh, no_packed,
                                                                                                monkeypatch):
    from flamingo_vlm.modeling import native

    if native.library() is None:
        pytest.skip(f"no native kernels: {native.unavailable_reason()}")
    model, ip, tok = tiny_flamingo("llama", every=1, seed=3)
    model = model.to(torch.bfloat16)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2, seed=1))])
    args = (batch["vision_x"].bfloat16(), batch["input_ids"], batch["attention_mask"])
    calls = []
    real = native.bf16_linear
    monkeypatch.setattr(native, "bf16_linear", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    monkeypatch.setenv(kernels.ENV, "default")
    reference = model.generate(*args, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(kernels, "_MEMO", {})
    kernels.set_routes("bf16", (f"native:{native.library().fv_isa()}",) * len(kernels.DECODE_BUCKETS))
    before = kernels.packs
    out = model.generate(*args, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference)
    assert 1 in calls and kernels.packs == before and kernels.packed_bytes() == 0  # decode steps: 1 row


@needs_packing
def test_packed_weights_made_in_inference_mode_and_from_two_threads(no_packed):
    """Inference tensors have no version counter; two threads packing the same weights keep one copy
    each and an exact byte count."""
    import gc
    import threading

    import torch.nn.functional as F

    with torch.inference_mode():
        w = torch.randn(32, 16).bfloat16()
        x = torch.randn(1, 16).bfloat16()
        torch.testing.assert_close(kernels.packed_linear(x, w), F.linear(x, w))
    del w
    weights = [torch.randn(32, 16).bfloat16() for _ in range(60)]
    x = torch.randn(1, 16).bfloat16()
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for w in weights:
            kernels.packed_linear(x, w)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kernels.packed_bytes() == len(weights) * 32 * 16 * 2
    del weights, work
    gc.collect()
    assert kernels.packed_bytes() == 0


def test_a_trainable_bias_keeps_its_gradient_in_a_decode_sized_bf16_call(no_packed):
    from flamingo_vlm.modeling.fast_linear import onednn_linears

    lin = torch.nn.Linear(16, 8).bfloat16()
    lin.weight.requires_grad_(False)
    with onednn_linears(lin, enabled=True):
        lin(torch.randn(1, 16).bfloat16()).sum().backward()
    assert lin.bias.grad is not None and kernels.packed_bytes() == 0


def test_the_packing_budget_is_a_quarter_of_the_containers_memory_where_it_is_limited(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(kernels, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limit)))
    kernels._budget_for.cache_clear()
    try:
        limit.write_text("max\n")  # no limit: the machine's memory
        host = kernels._budget_for("")
        assert host > 0
        kernels._budget_for.cache_clear()
        limit.write_text(f"{4 * 10**9}\n")
        assert kernels._budget_for("") == min(host, 10**9)
        assert kernels._budget_for("0.5") == 5 * 10**8  # FLAMINGO_VLM_PACKED_GB wins
    finally:
        kernels._budget_for.cache_clear()
