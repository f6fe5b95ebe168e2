"""Pilot: could a bf16 GEMV of our own beat oneDNN on packed weights for bf16 decoding?

Question: bf16 decoding routes decode-sized bf16 linear calls to oneDNN on weights packed into its
blocked layout (flamingo_vlm.modeling.kernels.packed_linear), at the cost of a second copy of the
weights (+292-303 MB). The int8 kernel (src/flamingo_vlm/modeling/csrc/decode_linear.c, then int8_linear.c) reaches the
machine's read bandwidth on the plain matrix with a software prefetch of the next 4-row block. Does
the same loop on bf16 weights beat the packed copies, without them?

Run: python research/bf16_gemv_pilot.py (compiles a C file into a temporary directory with cc).
Prints ms and GB/s over the benchmark shape's 96 decode-sized layers (302 MB of bf16) at 1 and 4
rows: F.linear, oneDNN packed, and two loops of ours (AVX2 FMAs on widened weights; AVX512-BF16
dot products).
"""

import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flamingo_vlm.modeling import kernels

C_SOURCE = r"""#include <stdint.h>
#include <string.h>
#include <immintrin.h>
/* y[m,n] = sum_k x[m,k] w[n,k]; x bf16 (M,K), w bf16 (N,K), y fp32 */
__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h)); h = _mm_add_ss(h, _mm_movehdup_ps(h)); return _mm_cvtss_f32(h);
}
__attribute__((target("avx2,fma"))) static inline __m256 ld(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
__attribute__((target("avx2,fma"))) static void blk256(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t nb) {
    const uint16_t *b = w + n0 * K;
    for (int64_t m = 0; m < M; m++) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t k = 0; k + 8 <= K; k += 8) {
            _mm_prefetch((const char *)(b + 4 * K + k * 4), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * K + k * 4 + 16), _MM_HINT_T0);
            __m256 xv = ld(x + m * K + k);
            for (int r = 0; r < 4; r++) acc[r] = _mm256_fmadd_ps(xv, ld(b + (r < nb ? r : 0) * K + k), acc[r]);
        }
        for (int r = 0; r < nb; r++) y[m * N + n0 + r] = hsum(acc[r]);
    }
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void blkbf16(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t nb) {
    const uint16_t *b = w + n0 * K;
    for (int64_t m = 0; m < M; m++) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = 0; k + 32 <= K; k += 32) {
            _mm_prefetch((const char *)(b + 4 * K + k * 4), _MM_HINT_T0);
            _mm_prefetch((const char *)(b + 4 * K + k * 4 + 32), _MM_HINT_T0);
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < 4; r++) acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(b + (r < nb ? r : 0) * K + k));
        }
        for (int r = 0; r < nb; r++) y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r]);
    }
}
void bf_linear(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int path, int nt) {
    int64_t nblocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t bk = 0; bk < nblocks; bk++) {
        int64_t n0 = bk * 4, nb = N - n0 < 4 ? N - n0 : 4;
        if (path == 2) blkbf16(x, w, y, M, N, K, n0, nb); else blk256(x, w, y, M, N, K, n0, nb);
    }
}
"""


def build() -> ctypes.CDLL:
    d = Path(tempfile.mkdtemp())
    (d / "bf.c").write_text(C_SOURCE)
    subprocess.run(["cc", "-O3", "-fPIC", "-shared", "-fopenmp", str(d / "bf.c"), "-o", str(d / "bf.so")], check=True)
    lib = ctypes.CDLL(str(d / "bf.so"))
    lib.bf_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    return lib


def best(fn, reps=7):
    fn()
    b = 1e9
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - s)
    return b


def main() -> int:
    f = build().bf_linear
    nt = torch.get_num_threads()
    shapes = []
    for _ in range(12):
        shapes += [(2304, 768), (768, 768), (3072, 768), (768, 3072), (768, 768), (768, 768), (3072, 768), (768, 3072)]
    ws = [(torch.randn(s) * 0.02).bfloat16() for s in shapes]
    total = sum(w.numel() * 2 for w in ws)
    packed = [kernels._pack(w) for w in ws]
    print(kernels.cpu_model(), f"{nt} threads, torch {torch.__version__}")
    with torch.inference_mode():
        for m in (1, 4):
            xs = [torch.randn(m, s[1]).bfloat16() for s in shapes]
            ys = [torch.empty(m, s[0]) for s in shapes]
            runs = {
                "F.linear": lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)],
                "oneDNN packed": lambda: [kernels._packed_product(x, p) for x, p in zip(xs, packed)],
                "ours AVX2": lambda: [f(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, w.shape[0], w.shape[1], 1, nt)
                                      for x, w, y in zip(xs, ws, ys)],
                "ours AVX512-BF16": lambda: [f(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, w.shape[0], w.shape[1], 2, nt)
                                             for x, w, y in zip(xs, ws, ys)],
            }
            times = {}
            for _ in range(2):  # interleaved rounds
                for name, fn in runs.items():
                    times[name] = min(times.get(name, 1e9), best(fn))
            print(f"rows {m}: " + ", ".join(f"{k} {v * 1e3:.2f} ms ({total / v / 1e9:.1f} GB/s)" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
