"""Would the training loss's vocabulary head be faster as the transposed product? torch's MKL runs
``F.linear(h, W)`` for 256 x 768 x 50283 (a chunk of ``train.fastpath.HeadCrossEntropy``) at ~85
GFLOP/s on the AVX2-only EPYC, against 125-148 for ``(W @ h.T).T``.

    python research/head_orientation_probe.py products   # forward + backward of one chunk, both forms, three vocabularies
    python research/head_orientation_probe.py loss       # the whole chunked loss of bench_train.py's batch, both forms

Run it on a quiet machine: the single products vary by +-20% between runs on a 2-core VM.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from flamingo_vlm.train import fastpath


def transposed(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(w, h.t()).t()


def best(f, reps: int = 3) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def products() -> None:
    g = torch.Generator().manual_seed(0)
    print("| vocabulary | row-major ms | transposed ms | ratio |\n|---:|---:|---:|---:|")
    for vocab in (16384, 32768, 50283):
        h = torch.randn(256, 768, generator=g, requires_grad=True)
        w = torch.randn(vocab, 768, generator=g) * 0.02
        grad = torch.randn(256, vocab, generator=g)
        grad_t = grad.t().contiguous().t()  # the layout the loss writes its gradient in for the transposed form

        def step(f, dy):
            def run():
                f(h, w).backward(dy)
                h.grad = None
            return run
        rows, cols = [], []
        for _ in range(3):  # interleaved rounds
            rows.append(best(step(F.linear, grad)))
            cols.append(best(step(transposed, grad_t)))
        print(f"| {vocab} | {min(rows) * 1e3:.0f} | {min(cols) * 1e3:.0f} | {min(cols) / min(rows):.2f} |")


def loss() -> None:
    torch.manual_seed(0)
    w = torch.randn(50283, 768) * 0.02
    hidden = torch.randn(1024, 768, requires_grad=True)
    labels = torch.randint(0, 50283, (1024,))

    def run(call):
        hidden.grad = None
        out = fastpath.HeadCrossEntropy.apply(hidden, labels, call, fastpath.CHUNK)
        out.backward()
        return out.detach(), hidden.grad.clone()

    (a, ga), (b, gb) = run(lambda h: F.linear(h, w)), run(lambda h: transposed(h, w))
    print(f"loss difference {float((a - b).abs() / a.abs()):.1e}, gradient {float((ga - gb).abs().max() / ga.abs().max()):.1e}")
    for _ in range(5):
        print(f"row-major {best(lambda: run(lambda h: F.linear(h, w))):.3f} s   "
              f"transposed {best(lambda: run(lambda h: transposed(h, w))):.3f} s")


if __name__ == "__main__":
    {"products": products, "loss": loss}[sys.argv[1] if len(sys.argv) > 1 else "products"]()
