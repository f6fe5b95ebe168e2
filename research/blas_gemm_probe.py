"""Would another BLAS make the fp32 training step faster? torch's fp32 GEMMs (MKL, statically linked)
against numpy's BLAS (OpenBLAS in numpy's wheels) on the shapes of bench_train.py's step, then whole
steps with every fp32 product of the step on numpy's BLAS.

    python research/blas_gemm_probe.py gemm                  # products alone: ms and GFLOP/s each
    python research/blas_gemm_probe.py step torch 4          # steps of the benchmark's model, torch's GEMMs
    python research/blas_gemm_probe.py step blas 4           # the same, products on numpy's BLAS
    OPENBLAS_THREAD_TIMEOUT=4 OMP_WAIT_POLICY=PASSIVE python research/blas_gemm_probe.py step blas 4

The ``blas`` steps put numpy's BLAS under the trainer's oneDNN route (``cpu_matmul: onednn``, whose
forward and both gradient products go through ``kernels._lp``), so no library code changes. Run it
on a quiet machine (the step prints the cores other processes used).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def best(f, reps=8) -> float:
    f()
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def np_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def gemm() -> None:
    # (name, m, k, n, layout): N = row-major operand, T = a transposed view (as linear's backward passes them)
    shapes = [("forward x W^T", 1024, 768, 3072, "NT"), ("forward", 1024, 3072, 768, "NT"), ("forward", 1024, 768, 768, "NT"),
              ("forward", 1024, 768, 2304, "NT"), ("forward", 600, 768, 3072, "NT"), ("input grad g W", 1024, 3072, 768, "NN"),
              ("input grad", 1024, 768, 3072, "NN"), ("weight grad g^T x", 3072, 1024, 768, "TN"),
              ("weight grad", 768, 1024, 3072, "TN"), ("LM head", 1024, 768, 50283, "NT"), ("LM head input grad", 1024, 50283, 768, "NN")]
    total = [0.0, 0.0]
    print("| product | m x k x n | torch ms | GFLOP/s | numpy's BLAS ms | GFLOP/s | ratio |\n|---|---|---:|---:|---:|---:|---:|")
    for name, m, k, n, layout in shapes:
        a = torch.randn(m, k) if layout[0] == "N" else torch.randn(k, m).t()
        b = torch.randn(n, k).t() if layout[1] == "T" else torch.randn(k, n)
        gflop = 2 * m * k * n / 1e9
        t_torch, t_blas = best(lambda: torch.mm(a, b)), best(lambda: np_mm(a, b))
        total[0] += t_torch
        total[1] += t_blas
        print(f"| {name} | {m}x{k}x{n} {layout} | {t_torch * 1e3:.1f} | {gflop / t_torch:.0f} | {t_blas * 1e3:.1f} | "
              f"{gflop / t_blas:.0f} | {t_torch / t_blas:.2f}x |")
    print(f"\nsum: torch {total[0] * 1e3:.0f} ms, numpy's BLAS {total[1] * 1e3:.0f} ms; load average {os.getloadavg()}")


def step(kind: str, steps: int) -> None:
    from bench_train import OthersLoad, RandomBatches, Shape, build_flamingo

    from flamingo_vlm.modeling import kernels
    from flamingo_vlm.train import Trainer, TrainConfig

    if kind == "blas":
        def product(x, w, b):  # x @ w.T (+ b), w in either layout
            x2 = x.detach().reshape(-1, x.shape[-1])
            out = torch.empty(*x.shape[:-1], w.shape[0])
            np.matmul(x2.numpy(), w.detach().numpy().T, out=out.view(-1, w.shape[0]).numpy())
            return out.add_(b.detach()) if b is not None else out
        kernels._lp = product
    torch.manual_seed(0)
    s = Shape()
    model = build_flamingo(s)
    cfg = TrainConfig.from_dict({"precision": "fp32", "max_steps": 100, "checkpoint_every": 10_000,
                                 "output_dir": tempfile.mkdtemp(), "schedule": {"warmup_steps": 0}, "progress": False,
                                 "export": False, "tensorboard": False, "plot": False,
                                 "cpu_matmul": "onednn" if kind == "blas" else "default"}, require_model=False)
    trainer = Trainer(cfg, model=model, datasets=[RandomBatches(s)], loss_weights=[1.0])
    try:
        for i in range(steps):
            load = OthersLoad()
            t0 = time.perf_counter()
            record = trainer.train_step(trainer.next_batches())
            print(f"{kind} step {i}: {time.perf_counter() - t0:.2f} s, loss {record['loss']:.4f}, "
                  f"others {load.cores():.2f} cores", flush=True)
    finally:
        trainer.close()


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "gemm":
        gemm()
    else:
        step(sys.argv[2], int(sys.argv[3]))
