"""The benchmark scripts still run, and a partial run never takes the full table's file name."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_decode_run_writes_a_partial_table(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave the other tests' threads alone
    rc = bench.main(["--quick", "--only", "decode", "--dtypes", "fp32", "--repeats", "1", "--retries", "0",
                     "--no-backward", "--out-dir", str(tmp_path)])
    assert rc == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["inference-cpu-quick-only-decode-fp32.json", "inference-cpu-quick-only-decode-fp32.md"]
    result = json.loads((tmp_path / written[0]).read_text())
    assert result["rows"] and all(r["key"].startswith("decode") for r in result["rows"])
    assert all(r["flamingo"]["median_s"] > 0 and r["baseline"]["median_s"] > 0 for r in result["rows"])
    # greedy ids under the oneDNN inference path agree with torch's default kernels
    assert result["onednn_linear_accuracy"]["top1_agreement"] == 1.0
    md = (tmp_path / written[1]).read_text()
    assert "| decode" in md and "Decode floor" in md
    floor = result["decode_floor"]  # cross-attention adds weights to every decoding step
    assert floor["xattn_step_m"] > 0 and floor["ratio"] == pytest.approx(1 + floor["xattn_step_m"] / floor["lm_step_m"])


@pytest.mark.parametrize(
    ("argv", "stem"),
    [([], "inference-cpu"),
     (["--only", "decode"], "inference-cpu-only-decode"),
     (["--dtypes", "fp32,fp32-mkl"], "inference-cpu-fp32-fp32-mkl"),
     (["--only", "decode", "--dtypes", "fp32+onednn", "--lm", "llama"], "inference-cpu-llama-only-decode-fp32onednn"),
     (["--only", "decode", "--tag", "x", "--cross-attn-every", "4"], "inference-cpu-xattn4-x")],
)
def test_results_file_names(bench, argv, stem):
    assert bench.results_stem(bench.parse_args(argv), "cpu") == stem


def test_quantize_large_quick_run_times_both_variants_in_their_own_processes(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_quantize_large", BENCH.parent / "bench_quantize_large.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stem = tmp_path / "large"
    assert module.main(["--quick", "--rounds", "1", "--repeats", "1", "--tokens", "2", "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert set(result["rows"]) == {"bf16", "int8"} and len(result["ratios"]) == 1
    # (a difference of two timings of a tiny model: finite, its sign left to the machine)
    assert all(abs(r["ms_per_token"]) < 1e6 and r["first_token_ms"] > 0 for v in result["rows"].values() for r in v)
    assert result["median"]["int8"]["weights_gb"] < result["median"]["bf16"]["weights_gb"] * 1.5
    assert "| int8 |" in stem.with_suffix(".md").read_text().replace("(quick) ", "")


def test_bench_train_sets_a_config_field_for_every_case(tmp_path):
    """`bench_train.py --set lean_backward=false` reaches the case's own process (a field it does not
    know fails the case there), is named in the header and in the table's file name, and a malformed
    one is a usage error."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    env = {**__import__("os").environ, "PYTHONPATH": str(script.parents[1] / "src")}
    run = lambda *a: subprocess.run([sys.executable, str(script), "--quick", "--cases", "fp32", "--steps", "1",  # noqa: E731
                                     "--allocator", "glibc", "--out-dir", str(tmp_path), *a],
                                    capture_output=True, text=True, env=env, cwd=tmp_path)
    ok = run("--set", "lean_backward=false")
    assert ok.returncode == 0 and "set for every case: lean_backward=false." in ok.stdout, ok.stderr[-2000:]
    # (written where asked, under a name of its own: not over the default table)
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-cpu-glibc-quick-set.json",
                                                                "train-cpu-glibc-quick-set.md"]
    unknown = run("--set", "no_such_field=1")
    assert unknown.returncode != 0 and "no_such_field" in unknown.stderr
    assert run("--set", "oops").returncode == 2
