/* Linear layers for a few rows (decoding) on CPU, on the weight matrix as torch keeps it.
 *
 *   y[m, n] = s[n] * sum_k x[m, k] * w[n, k] + b[n]     w: (N, K) int8 or bf16, row-major
 *   x: (M, K), y: (M, N); s (int8 only): (N,); b: (N,) or none. x, y, s, b: fp32 or bf16.
 *
 * int8: torch's plain row-major int8 matrix (QuantizedLinear.qweight), unchanged. bf16: the layer's
 * own bf16 weight, so bf16 decoding needs no re-laid copy (oneDNN's packed weights cost the model's
 * size again in memory). Each thread takes a contiguous run of 4-row blocks; a block's 4 rows are
 * contiguous in memory, so a thread reads one forward stream. What made the difference is the
 * software prefetch: while a block is multiplied, the next block is prefetched at the rate it is
 * consumed. Without it the int8 loop streamed 7 GB/s per core on an AMD EPYC Zen 4; with it, 32-34
 * GB/s on two cores, the machine's read bandwidth (torch's aten._weight_int8pack_mm: 15 GB/s).
 *
 * Weights are widened to fp32 (bf16 exactly, by a shift) and multiplied with fp32 FMAs (bf16 x is
 * widened too; bf16 y is rounded to nearest even once, after the bias): at one row this is bound by
 * memory, at more rows by the FMAs, so it is used for few rows. Rows of x are taken in tiles (2 in
 * the AVX2 path, 4 in the AVX-512 one) that share each loaded weight block; the next tile reads the
 * block from cache. On Zen 4 the AVX2 path is the faster one (its 512-bit ops are split in two);
 * which path a machine runs is measured (modeling/kernels.py). Built and loaded by
 * flamingo_vlm/modeling/native.py (cc -O3 -fopenmp); each SIMD path is compiled with a target
 * attribute and picked at run time, so one build runs on any x86-64 CPU.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FV_X86 1
#endif

enum { FV_INT8 = 0, FV_BF16 = 1, FV_FP32 = 2 };  /* weight kinds */

static inline float fv_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float fv_get(const void *p, int bf16, int64_t i) {
    return bf16 ? fv_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void fv_put(void *p, int bf16, int64_t i, float v) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u;  /* NaN stays a (quiet) NaN */
    else u += 0x7fffu + ((u >> 16) & 1u);                  /* round to nearest even */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* Operands: x, y, s and b are fp32, or bf16 where their flag is set; s and b may be NULL. */
typedef struct {
    const void *x;
    const void *w;
    const void *s;
    const void *b;
    void *y;
    int64_t M, N, K;
    int wk, xb, sb, bb, yb;
} fv_args;

static inline float fv_weight(const fv_args *a, int64_t n, int64_t k) {
    if (a->wk == FV_FP32) return ((const float *)a->w)[n * a->K + k];
    return a->wk == FV_BF16 ? fv_bf16(((const uint16_t *)a->w)[n * a->K + k]) : (float)((const int8_t *)a->w)[n * a->K + k];
}

static inline void fv_store(const fv_args *a, int64_t m, int64_t n, float acc) {
    if (a->s) acc *= fv_get(a->s, a->sb, n);
    if (a->b) acc += fv_get(a->b, a->bb, n);
    fv_put(a->y, a->yb, m * a->N + n, acc);
}

/* isa: 0 portable C, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL), 3 AVX-512 with BF16 (for bf16 weights and
 * input; otherwise as 2) */
int fv_isa(void) {
    static int cached = -1;  /* computed once; threads racing on the first call all store the same value */
    int isa = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (isa < 0) {
        isa = 0;
#ifdef FV_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
            isa = __builtin_cpu_supports("avx512bf16") ? 3 : 2;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            isa = 1;
#endif
        __atomic_store_n(&cached, isa, __ATOMIC_RELAXED);
    }
    return isa;
}

/* -- portable -------------------------------------------------------------------------------------- */
static void fv_block_c(const fv_args *a, int64_t n0, int64_t nb) {
    for (int64_t m = 0; m < a->M; m++)
        for (int64_t r = 0; r < nb; r++) {
            float acc = 0.f;
            for (int64_t k = 0; k < a->K; k++) acc += fv_get(a->x, a->xb, m * a->K + k) * fv_weight(a, n0 + r, k);
            fv_store(a, m, n0 + r, acc);
        }
}

#ifdef FV_X86
/* The next 4-row block, prefetched at the rate this one is consumed: `step_bytes` per step of `k_step`
 * columns, into L1 where a block is small (<= FV_NEAR_BYTES), else into L2: a block runs a whole
 * block ahead of the reads, and larger blocks prefetched into L1 (32 KB on Zen 4) pushed out lines
 * before they were read. Measured on an AMD EPYC Zen 4 (2 threads, interleaved, medians of 5): int8
 * at d2048 (8-32 KB blocks) 27.3 -> 30.5 GB/s, bf16 29.1 -> 32.2; at d576-d768 unchanged within
 * noise, while L2 for every block cost int8 there 15-40%. */
#define FV_NEAR_BYTES 4096
static inline __attribute__((always_inline)) void fv_prefetch(const char *next, int64_t k, int64_t step_bytes, int64_t k_step,
                                                              int far) {
    const char *p = next + k / k_step * step_bytes;
    if (far)
        for (int64_t o = 0; o < step_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
    else
        for (int64_t o = 0; o < step_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

/* -- AVX-512: 16 columns per step, up to 4 rows of x per pass (16 accumulators) --------------------- */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512
fv_x512(const fv_args *a, int64_t i, int64_t k, __mmask16 mk) {
    if (a->xb)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)a->x + i * a->K + k)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)a->x + i * a->K + k);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) __m512
fv_w512(const void *row, int64_t k, __mmask16 mk, const int wk) {
    if (wk == FV_FP32) return _mm512_maskz_loadu_ps(mk, (const float *)row + k);
    if (wk == FV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)row + k)), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, (const int8_t *)row + k)));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void
fv_tile512(const fv_args *a, const char *blk, int64_t n0, int64_t nb, int64_t m0, const int mb, const int wk) {
    const int64_t K = a->K, esize = wk == FV_FP32 ? 4 : wk == FV_BF16 ? 2 : 1;
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    const char *row[4];
    for (int r = 0; r < 4; r++) row[r] = blk + (r < nb ? r : 0) * K * esize;  /* a short last block repeats row 0 */
    const int far = 4 * K * esize > FV_NEAR_BYTES;
    for (int64_t k = 0; k < K; k += 16) {
        fv_prefetch(blk + 4 * K * esize, k, 64 * esize, 16, far);
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 w[4];
        for (int r = 0; r < 4; r++) w[r] = fv_w512(row[r], k, mk, wk);
        for (int i = 0; i < mb; i++) {
            __m512 xv = fv_x512(a, m0 + i, k, mk);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(xv, w[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < nb; r++) fv_store(a, m0 + i, n0 + r, _mm512_reduce_add_ps(acc[i][r]));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void
fv_rows512(const fv_args *a, const char *blk, int64_t n0, int64_t nb, const int wk) {
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        switch (a->M - m0 < 4 ? a->M - m0 : 4) {  /* a constant row count keeps the accumulators in registers */
        case 1: fv_tile512(a, blk, n0, nb, m0, 1, wk); break;
        case 2: fv_tile512(a, blk, n0, nb, m0, 2, wk); break;
        case 3: fv_tile512(a, blk, n0, nb, m0, 3, wk); break;
        default: fv_tile512(a, blk, n0, nb, m0, 4, wk); break;
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void fv_block512(const fv_args *a, int64_t n0, int64_t nb) {
    if (a->wk == FV_FP32) fv_rows512(a, (const char *)a->w + n0 * a->K * 4, n0, nb, FV_FP32);
    else if (a->wk == FV_BF16) fv_rows512(a, (const char *)a->w + n0 * a->K * 2, n0, nb, FV_BF16);
    else fv_rows512(a, (const char *)a->w + n0 * a->K, n0, nb, FV_INT8);
}

/* -- AVX2: 8 columns per step, up to 2 rows of x per pass (16 registers) ----------------------------- */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) float fv_hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

__attribute__((target("avx2,fma"))) static inline __m256 fv_x256(const fv_args *a, int64_t i, int64_t k) {
    if (a->xb)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)a->x + i * a->K + k))), 16));
    return _mm256_loadu_ps((const float *)a->x + i * a->K + k);
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) __m256
fv_w256(const char *row, int64_t k, const int wk) {
    if (wk == FV_FP32) return _mm256_loadu_ps((const float *)row + k);
    if (wk == FV_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * k))), 16));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k))));
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
fv_tile256(const fv_args *a, const char *blk, int64_t n0, int64_t nb, int64_t m0, const int mb, const int wk) {
    const int64_t K = a->K, esize = wk == FV_FP32 ? 4 : wk == FV_BF16 ? 2 : 1;
    __m256 acc[2][4];
    for (int i = 0; i < 2; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    const char *row[4];
    for (int r = 0; r < 4; r++) row[r] = blk + (r < nb ? r : 0) * K * esize;
    int64_t k = 0;
    const int far = 4 * K * esize > FV_NEAR_BYTES;
    for (; k + 8 <= K; k += 8) {
        fv_prefetch(blk + 4 * K * esize, k, 32 * esize, 8, far);
        __m256 w[4];
        for (int r = 0; r < 4; r++) w[r] = fv_w256(row[r], k, wk);
        for (int i = 0; i < mb; i++) {
            __m256 xv = fv_x256(a, m0 + i, k);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm256_fmadd_ps(xv, w[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < nb; r++) {
            float t = fv_hsum256(acc[i][r]);
            for (int64_t j = k; j < K; j++) t += fv_get(a->x, a->xb, (m0 + i) * K + j) * fv_weight(a, n0 + r, j);
            fv_store(a, m0 + i, n0 + r, t);
        }
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
fv_rows256(const fv_args *a, const char *blk, int64_t n0, int64_t nb, const int wk) {
    for (int64_t m0 = 0; m0 < a->M; m0 += 2) {
        if (a->M - m0 >= 2) fv_tile256(a, blk, n0, nb, m0, 2, wk);
        else fv_tile256(a, blk, n0, nb, m0, 1, wk);
    }
}

__attribute__((target("avx2,fma"))) static void fv_block256(const fv_args *a, int64_t n0, int64_t nb) {
    if (a->wk == FV_FP32) fv_rows256(a, (const char *)a->w + n0 * a->K * 4, n0, nb, FV_FP32);
    else if (a->wk == FV_BF16) fv_rows256(a, (const char *)a->w + n0 * a->K * 2, n0, nb, FV_BF16);
    else fv_rows256(a, (const char *)a->w + n0 * a->K, n0, nb, FV_INT8);
}

/* -- AVX512-BF16, bf16 weights and bf16 x only: the CPU's bf16 dot product (vdpbf16ps) on 256-bit
 * vectors, 16 columns per step, up to 4 rows of x per pass (16 of the 32 registers). No widening:
 * a quarter of the widening paths' instructions, which is what bounds them at 4-8 rows. Products of
 * bf16 pairs are exact in fp32; sums in fp32, rounded to nearest even, denormals flushed to zero
 * (as oneDNN's bf16 kernels on these CPUs). -------------------------------------------------------- */
#define FV_DP_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
FV_DP_TARGET static inline __attribute__((always_inline)) void
fv_tile_dp(const fv_args *a, const char *blk, int64_t n0, int64_t nb, int64_t m0, const int mb) {
    const int64_t K = a->K;
    __m256 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    const uint16_t *row[4];
    for (int r = 0; r < 4; r++) row[r] = (const uint16_t *)blk + (r < nb ? r : 0) * K;
    const uint16_t *x = (const uint16_t *)a->x + m0 * K;
    const int far = 8 * K > FV_NEAR_BYTES;
    for (int64_t k = 0; k < K; k += 16) {
        fv_prefetch(blk + 8 * K, k, 128, 16, far);
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m256i w[4];
        for (int r = 0; r < 4; r++) w[r] = _mm256_maskz_loadu_epi16(mk, row[r] + k);
        for (int i = 0; i < mb; i++) {
            __m256bh xv = (__m256bh)_mm256_maskz_loadu_epi16(mk, x + i * K + k);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm256_dpbf16_ps(acc[i][r], xv, (__m256bh)w[r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < nb; r++) fv_store(a, m0 + i, n0 + r, fv_hsum256(acc[i][r]));
}

FV_DP_TARGET static void fv_block_dp(const fv_args *a, int64_t n0, int64_t nb) {
    const char *blk = (const char *)a->w + n0 * a->K * 2;
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        switch (a->M - m0 < 4 ? a->M - m0 : 4) {
        case 1: fv_tile_dp(a, blk, n0, nb, m0, 1); break;
        case 2: fv_tile_dp(a, blk, n0, nb, m0, 2); break;
        case 3: fv_tile_dp(a, blk, n0, nb, m0, 3); break;
        default: fv_tile_dp(a, blk, n0, nb, m0, 4); break;
        }
    }
}
#endif

static inline void fv_one_block(const fv_args *a, int isa, int64_t blk) {
    int64_t n0 = blk * 4, nb = a->N - n0 < 4 ? a->N - n0 : 4;
#ifdef FV_X86
    if (isa == 3 && a->wk == FV_BF16 && a->xb) { fv_block_dp(a, n0, nb); return; }
    if (isa >= 2) { fv_block512(a, n0, nb); return; }
    if (isa == 1) { fv_block256(a, n0, nb); return; }
#endif
    fv_block_c(a, n0, nb);
}

static void fv_run(const fv_args *a, int isa, int nthreads) {
    int64_t nblocks = (a->N + 3) / 4;
    if (isa > fv_isa()) isa = fv_isa();
    #pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t blk = 0; blk < nblocks; blk++) fv_one_block(a, isa, blk);
}

/* Up to 4 products in one OpenMP loop (the 4-row blocks of all of them split over the threads): one
 * thread team and one join instead of one per product, for products of one input that are
 * independent (q, k and v; up and gate). Each block is computed as fv_run computes it. */
static void fv_run_many(const fv_args *a, const int *isa, int n, int nthreads) {
    int64_t start[5] = {0};
    int lowered[4];
    for (int j = 0; j < n; j++) {
        start[j + 1] = start[j] + (a[j].N + 3) / 4;
        lowered[j] = isa[j] > fv_isa() ? fv_isa() : isa[j];
    }
    #pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t g = 0; g < start[n]; g++) {
        int j = 0;
        while (g >= start[j + 1]) j++;
        fv_one_block(&a[j], lowered[j], g - start[j]);
    }
}

/* y (M, N) = x (M, K) @ q (N, K)^T, row n scaled by s[n], plus b[n] (b may be NULL); x, s, b, y fp32,
 * or bf16 where their flag is set. isa: the path to take (as fv_isa(), lowered to what this CPU has);
 * nthreads: OpenMP threads (torch's). */
void fv_int8_linear(const void *x, int x_bf16, const int8_t *q, const void *s, int s_bf16, const void *b, int b_bf16,
                    void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    const fv_args a = {x, q, s, b, y, M, N, K, FV_INT8, x_bf16, s_bf16, b_bf16, y_bf16};
    fv_run(&a, isa, nthreads);
}

/* y (M, N) = x (M, K) @ w (N, K)^T + b (b may be NULL); w bf16; x, b, y fp32, or bf16 where their flag is set. */
void fv_bf16_linear(const void *x, int x_bf16, const uint16_t *w, const void *b, int b_bf16,
                    void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    const fv_args a = {x, w, NULL, b, y, M, N, K, FV_BF16, x_bf16, 0, b_bf16, y_bf16};
    fv_run(&a, isa, nthreads);
}

/* y (M, N) = x (M, K) @ w (N, K)^T + b (b may be NULL); w fp32; x, b, y fp32, or bf16 where their flag is set. */
void fv_fp32_linear(const void *x, int x_bf16, const float *w, const void *b, int b_bf16,
                    void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    const fv_args a = {x, w, NULL, b, y, M, N, K, FV_FP32, x_bf16, 0, b_bf16, y_bf16};
    fv_run(&a, isa, nthreads);
}


/* -- A gated cross-attention block's decoding step, in one call ---------------------------------------
 *
 *   x1 = x + attn_gate * to_out(attention(to_q(LN1(x)), K, V))      (skipped where `blind`)
 *   y  = x1 + ff_gate * fc2(GELU(fc1(LN2(x1))))
 *
 * for M rows of one token each (flamingo_vlm/modeling/cross_attention.py computes the same with ~40
 * torch calls; at decode sizes their dispatch cost as much as the four products). Activations are fp32,
 * or bf16 where `xb` is set, and are rounded to that dtype wherever the torch modules round them: after
 * each LayerNorm, product, the attention, GELU, each gate's product and each sum. Within those the
 * arithmetic is fp32: LayerNorm's moments in double, attention as torch's SDPA on fp32 copies
 * (bf16 decoding on CPU runs it so, modeling/attention.py), GELU as torch's own erf (Abramowitz and
 * Stegun 7.1.26, what ATen's vectorized erf computes) with a Cephes-style exp. The four products are
 * the kernels above, each on its own weight kind and SIMD path. Row m attends to keys/values row
 * m / (M / kv_rows) (generate() repeats rows with repeat_interleave; their image rows are not copied). */
typedef struct {
    const void *w, *s, *b;  /* (N, K) weight; int8: (N,) scales, else NULL; (N,) bias or NULL */
    int64_t N, K;
    int32_t kind, sb, bb, isa;  /* weight kind; scales, bias bf16; SIMD path */
} fv_layer;

typedef struct {
    fv_layer q, out, fc1, fc2;
    const void *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* (D,) in the activations' dtype, or NULL */
    double eps1, eps2;
    int64_t D, heads, dim_head;
} fv_block;

static void fv_layer_run(const fv_layer *l, const void *x, void *y, int64_t M, int xb, int nthreads) {
    const fv_args a = {x, l->w, l->s, l->b, y, M, l->N, l->K, l->kind, xb, l->sb, l->bb, xb};
    fv_run(&a, l->isa, nthreads);
}

/* n (<= 4) layers on one input x, layer j into y[j], in one thread team (fv_run_many) */
static void fv_layers_run(const fv_layer *const *l, const void *x, void *const *y, int n, int64_t M, int xb,
                          int nthreads) {
    fv_args a[4];
    int isa[4];
    for (int j = 0; j < n; j++) {
        const fv_args one = {x, l[j]->w, l[j]->s, l[j]->b, y[j], M, l[j]->N, l[j]->K, l[j]->kind, xb, l[j]->sb,
                             l[j]->bb, xb};
        a[j] = one;
        isa[j] = l[j]->isa;
    }
    fv_run_many(a, isa, n, nthreads);
}

static void fv_layer_norm(const void *x, void *y, int xb, int64_t M, int64_t D, const void *w, const void *b, double eps) {
    for (int64_t m = 0; m < M; m++) {
        double sum = 0, sq = 0;
        for (int64_t d = 0; d < D; d++) sum += fv_get(x, xb, m * D + d);
        const double mean = sum / (double)D;
        for (int64_t d = 0; d < D; d++) {
            double c = fv_get(x, xb, m * D + d) - mean;
            sq += c * c;
        }
        const float mu = (float)mean, rstd = (float)(1.0 / sqrt(sq / (double)D + eps));
        for (int64_t d = 0; d < D; d++) {
            float v = (fv_get(x, xb, m * D + d) - mu) * rstd;
            if (w) v *= fv_get(w, xb, d);
            if (b) v += fv_get(b, xb, d);
            fv_put(y, xb, m * D + d, v);
        }
    }
}

/* exp for the x <= 0 it is used on here (softmax, GELU): Cephes' range reduction and polynomial,
 * relative error ~1 ulp; 0 under -87.3 (no denormals), +inf over 88; written once for scalars and
 * once for 8 lanes. */
#define FV_EXP_HI 88.0f
#define FV_EXP_LO (-87.3365447505531f)
static inline float fv_expf(float x) {
    if (x != x) return x;
    if (x > FV_EXP_HI) return INFINITY;
    if (x < FV_EXP_LO) return 0.f;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    uint32_t e = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* GELU(v) = v/2 (1 + erf(v / sqrt 2)), erf(z) = sign(z) (1 - t (p1 + t (p2 + t (p3 + t (p4 + t p5)))) exp(-z^2)),
 * t = 1 / (1 + p |z|) */
static inline float fv_gelu1(float v) {
    const float z = v * 0.70710678118654752f, a = fabsf(z);
    const float t = 1.f / (0.3275911f * a + 1.f);
    float r = 1.061405429f * t - 1.453152027f;
    r = r * t + 1.421413741f;
    r = r * t - 0.284496736f;
    r = r * t + 0.254829592f;
    float e = 1.f - r * t * fv_expf(-(z * z));
    return 0.5f * v * (1.f + (z < 0 ? -e : e));
}

/* SiLU(v) = v / (1 + exp(-v)), as ATen computes it */
static inline float fv_silu1(float v) { return v / (1.f + fv_expf(-v)); }

enum { FV_GELU = 0, FV_SILU = 1 };  /* activations (fv_mlp.act) */

static inline float fv_act1(float v, int act) { return act == FV_SILU ? fv_silu1(v) : fv_gelu1(v); }

#ifdef FV_X86
__attribute__((target("avx2,fma"))) static inline __m256 fv_exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(FV_EXP_HI), lo = _mm256_set1_ps(FV_EXP_LO);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), c);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, x, nan);
}

__attribute__((target("avx2,fma"))) static inline __m256 fv_gelu8(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
    const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
    const __m256 a = _mm256_andnot_ps(sign, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
    __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    const __m256 ex = fv_exp8(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));
    const __m256 e = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), ex, one);
    const __m256 erf = _mm256_or_ps(e, _mm256_and_ps(sign, z));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, erf));
}

__attribute__((target("avx2,fma"))) static inline __m256 fv_load8(const void *p, int bf16, int64_t i) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

__attribute__((target("avx2,fma"))) static inline __m256 fv_silu8(__m256 v) {
    const __m256 one = _mm256_set1_ps(1.f);
    return _mm256_div_ps(v, _mm256_add_ps(one, fv_exp8(_mm256_xor_ps(_mm256_set1_ps(-0.f), v))));
}

/* h = act(h) in place, 8 lanes at a time (a bf16 h widened, then rounded once) */
__attribute__((target("avx2,fma"))) static void fv_act_avx2(void *h, int xb, int64_t n, int act) {
    float tmp[8];
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = fv_load8(h, xb, i);
        __m256 y = act == FV_SILU ? fv_silu8(v) : fv_gelu8(v);
        if (!xb) _mm256_storeu_ps((float *)h + i, y);
        else {
            _mm256_storeu_ps(tmp, y);
            for (int j = 0; j < 8; j++) fv_put(h, 1, i + j, tmp[j]);
        }
    }
    for (; i < n; i++) fv_put(h, xb, i, fv_act1(fv_get(h, xb, i), act));
}

/* sum_d q[d] k[d] over 8-lane blocks then the tail; q fp32, k in the activations' dtype */
__attribute__((target("avx2,fma"))) static float fv_dot_avx2(const float *q, const void *k, int kb, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), fv_load8(k, kb, d), acc);
    float s = fv_hsum256(acc);
    for (; d < n; d++) s += q[d] * fv_get(k, kb, d);
    return s;
}

__attribute__((target("avx2,fma"))) static void fv_axpy_avx2(float *o, float p, const void *v, int vb, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, fv_load8(v, vb, d), _mm256_loadu_ps(o + d)));
    for (; d < n; d++) o[d] += p * fv_get(v, vb, d);
}
#endif

static void fv_activate(void *h, int xb, int64_t n, int act, int simd) {
#ifdef FV_X86
    if (simd) { fv_act_avx2(h, xb, n, act); return; }
#endif
    (void)simd;
    for (int64_t i = 0; i < n; i++) fv_put(h, xb, i, fv_act1(fv_get(h, xb, i), act));
}

static float fv_dot(const float *q, const void *k, int kb, int64_t n, int simd) {
#ifdef FV_X86
    if (simd) return fv_dot_avx2(q, k, kb, n);
#endif
    (void)simd;
    float s = 0.f;
    for (int64_t d = 0; d < n; d++) s += q[d] * fv_get(k, kb, d);
    return s;
}

static void fv_axpy(float *o, float p, const void *v, int vb, int64_t n, int simd) {
#ifdef FV_X86
    if (simd) { fv_axpy_avx2(o, p, v, vb, n); return; }
#endif
    (void)simd;
    for (int64_t d = 0; d < n; d++) o[d] += p * fv_get(v, vb, d);
}

/* a (M, heads * dim_head) = softmax(q k^T / sqrt(dim_head)) v per row and head, over S keys. k, v:
 * element (r, h, s, d) at r * st[0] + h * st[1] + s * st[2] + d (st[3..5] for v); query head h reads
 * key/value head h / groups (grouped-query attention; 1: one each). scratch: S + 2 *
 * dim_head floats for each of `team` threads (fv_attend_team), allocated by the caller: a thread of an
 * OpenMP team must not fail alone (the others would wait for it at the loop's barrier). */
static int fv_attend_team(int64_t M, int64_t heads, int64_t dh, int64_t S, int nthreads) {
    return M * heads * S * dh >= 65536 && nthreads > 1 ? nthreads : 1;
}

static void fv_attend(const void *q, void *a, int xb, int64_t M, int64_t heads, int64_t dh, const void *k,
                      const void *v, int64_t S, int64_t kv_rows, int64_t groups, const int64_t *st,
                      const uint8_t *mask, int64_t mask_m, int simd, int team, float *scratch) {
    const int64_t r = M / kv_rows, esize = xb ? 2 : 4;
    const float scale = 1.f / sqrtf((float)dh);
    #pragma omp parallel num_threads(team)
    {
        float *p = scratch + (int64_t)omp_get_thread_num() * (S + 2 * dh), *qh = p + S, *o = p + S + dh;
        #pragma omp for schedule(static)
        for (int64_t mh = 0; mh < M * heads; mh++) {
            const int64_t m = mh / heads, h = mh % heads, row = m / r;
            const uint8_t *unseen = mask ? mask + m * mask_m : NULL;  /* row m's keys it does not see: skipped */
            for (int64_t d = 0; d < dh; d++) qh[d] = fv_get(q, xb, m * heads * dh + h * dh + d) * scale;
            const char *kh = (const char *)k + (row * st[0] + h / groups * st[1]) * esize;
            const char *vh = (const char *)v + (row * st[3] + h / groups * st[4]) * esize;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t s = 0; s < S; s++) {
                if (unseen && unseen[s]) continue;
                p[s] = fv_dot(qh, kh + s * st[2] * esize, xb, dh, simd);
                if (p[s] > mx) mx = p[s];
            }
            for (int64_t s = 0; s < S; s++) sum += (p[s] = unseen && unseen[s] ? 0.f : fv_expf(p[s] - mx));
            for (int64_t d = 0; d < dh; d++) o[d] = 0.f;
            for (int64_t s = 0; s < S; s++)
                if (!(unseen && unseen[s])) fv_axpy(o, p[s], vh + s * st[5] * esize, xb, dh, simd);
            for (int64_t d = 0; d < dh; d++)  /* (no key seen: zeros) */
                fv_put(a, xb, m * heads * dh + h * dh + d, sum > 0.f ? o[d] / sum : 0.f);
        }
    }
}

/* y = x + g * t (each product and the sum rounded to the activations' dtype, as torch's `t * g + x`) */
static void fv_gated_add(const void *x, const void *t, float g, void *y, int xb, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float gt = fv_get(t, xb, i) * g;
        if (xb) {
            fv_put(y, 1, i, gt);
            gt = fv_get(y, 1, i);
        }
        fv_put(y, xb, i, gt + fv_get(x, xb, i));
    }
}

/* One decoding step of a gated cross-attention block (above). x, y: (M, D); k, v and st as fv_attend;
 * returns 0, or -1 where scratch memory could not be had (y is then not written). */
int fv_xattn_step(const fv_block *p, const void *x, void *y, int xb, int64_t M, const void *k, const void *v,
                  int64_t S, int64_t kv_rows, const int64_t *st, float attn_gate, float ff_gate, int blind,
                  int nthreads) {
    const int64_t D = p->D, inner = p->heads * p->dim_head, F = p->fc1.N, esize = xb ? 2 : 4;
    const int simd = p->q.isa >= 1 && fv_isa() >= 1;
    if (M <= 0 || kv_rows <= 0 || M % kv_rows) return -1;
    const int team = fv_attend_team(M, p->heads, p->dim_head, S, nthreads);
    const int64_t acts = M * (3 * D + 2 * inner + F) * esize, attn = team * (S + 2 * p->dim_head) * 4;
    char *mem = malloc((size_t)(acts + 4 + attn));
    if (!mem) return -1;
    void *h = mem, *x1 = mem + M * D * esize, *t = mem + 2 * M * D * esize;
    void *qb = mem + 3 * M * D * esize, *ab = (char *)qb + M * inner * esize, *f = (char *)ab + M * inner * esize;
    float *scratch = (float *)(mem + (acts + 3) / 4 * 4);  /* (acts is a multiple of 2; aligned to 4 here) */
    if (blind || S == 0) memcpy(x1, x, (size_t)(M * D * esize));
    else {
        fv_layer_norm(x, h, xb, M, D, p->ln1_w, p->ln1_b, p->eps1);
        fv_layer_run(&p->q, h, qb, M, xb, nthreads);
        fv_attend(qb, ab, xb, M, p->heads, p->dim_head, k, v, S, kv_rows, 1, st, NULL, 0, simd, team, scratch);
        fv_layer_run(&p->out, ab, t, M, xb, nthreads);
        fv_gated_add(x, t, attn_gate, x1, xb, M * D);
    }
    fv_layer_norm(x1, h, xb, M, D, p->ln2_w, p->ln2_b, p->eps2);
    fv_layer_run(&p->fc1, h, f, M, xb, nthreads);
    fv_activate(f, xb, M * F, FV_GELU, simd);
    fv_layer_run(&p->fc2, f, t, M, xb, nthreads);
    fv_gated_add(x1, t, ff_gate, y, xb, M * D);
    free(mem);
    return 0;
}

/* -- An LM's MLP for a few rows, in one call ---------------------------------------------------------
 *
 *   y = down(act(up(x)))                 act: exact GELU (MPT)
 *   y = down(act(gate(x)) * up(x))       act: SiLU (LLaMA and its kin), when `gate` is given
 *   y += residual                        where `residual` is given (MPT's MLP adds it)
 *
 * rounded to the activations' dtype where the torch modules round: each product, the activation, the
 * gated product and the sum. */
typedef struct {
    fv_layer up, gate, down;
    int32_t gated, act;  /* act: FV_GELU (exact) or FV_SILU */
} fv_mlp;

/* x (M, D) -> y (M, D); residual (M, D) or NULL. Returns 0, or -1 where scratch memory could not be had. */
int fv_mlp_step(const fv_mlp *p, const void *x, const void *residual, void *y, int xb, int64_t M, int nthreads) {
    const int64_t F = p->up.N, esize = xb ? 2 : 4;
    const int simd = p->up.isa >= 1 && fv_isa() >= 1;
    if (M <= 0) return -1;
    char *mem = malloc((size_t)(M * F * (p->gated ? 2 : 1)) * (size_t)esize);
    if (!mem) return -1;
    void *h = mem, *g = mem + M * F * esize;
    if (p->gated) {
        const fv_layer *l[2] = {&p->up, &p->gate};
        void *const out[2] = {h, g};
        fv_layers_run(l, x, out, 2, M, xb, nthreads);
        fv_activate(g, xb, M * F, p->act, simd);
        for (int64_t i = 0; i < M * F; i++) fv_put(h, xb, i, fv_get(g, xb, i) * fv_get(h, xb, i));
    } else {
        fv_layer_run(&p->up, x, h, M, xb, nthreads);
        fv_activate(h, xb, M * F, p->act, simd);
    }
    fv_layer_run(&p->down, h, y, M, xb, nthreads);
    if (residual) fv_gated_add(residual, y, 1.f, y, xb, M * p->down.N);
    free(mem);
    return 0;
}

/* -- A LLaMA decoder layer's decoding step, in two calls around the KV cache's update --------------
 *
 *   pre:   h = RMSNorm1(x);  q, k = rotary(q(h)), rotary(k(h));  v = v(h)
 *   (the caller appends k, v to its cache and passes all keys/values to post)
 *   post:  x1 = x + o(attention(q, K, V));  y = x1 + down(SiLU(gate(h2)) * up(h2)),  h2 = RMSNorm2(x1)
 *
 * for M rows of one token each, as transformers' LlamaDecoderLayer computes them (LLaMA, SmolLM2 and
 * their kin): grouped-query attention, and a padding mask where rows are left-padded (the keys a row does
 * not see are skipped, as SDPA's -inf scores give them no weight). Rounded to the activations' dtype where the modules round: RMSNorm's normalised
 * value before its weight and after, each product, each of the rotary embedding's two products and
 * their sum, the attention's output, each sum; RMSNorm's mean square in double (torch: fp32), the
 * attention as fv_attend (fp32 throughout; torch's bf16 SDPA on CPU rounds the probabilities to bf16
 * before multiplying them with V, so bf16 outputs may differ by a rounding step). */
typedef struct {
    fv_layer q, k, v, o;
    fv_mlp mlp;
    const void *norm1_w, *norm2_w;  /* (D,) in the activations' dtype */
    double eps1, eps2;
    int64_t D, heads, kv_heads, dim_head;
} fv_llama;

/* torch's RMSNorm: w * (x * rsqrt(mean(x^2) + eps)).to(dtype) */
static void fv_rms_norm(const void *x, void *y, int xb, int64_t M, int64_t D, const void *w, double eps) {
    for (int64_t m = 0; m < M; m++) {
        double sq = 0;
        for (int64_t d = 0; d < D; d++) {
            const double v = fv_get(x, xb, m * D + d);
            sq += v * v;
        }
        const float r = (float)(1.0 / sqrt((double)(float)(sq / (double)D) + eps));
        for (int64_t d = 0; d < D; d++) {
            fv_put(y, xb, m * D + d, fv_get(x, xb, m * D + d) * r);
            if (w) fv_put(y, xb, m * D + d, fv_get(w, xb, d) * fv_get(y, xb, m * D + d));
        }
    }
}

/* t (M, heads * dh) in place: t * cos + rotate_half(t) * sin, rotate_half(t) = (-t[dh/2:], t[:dh/2]);
 * cos, sin: row m at m * cs_stride (dh values) */
static void fv_rotary(void *t, const void *cos, const void *sin, int64_t cs_stride, int xb, int64_t M,
                      int64_t heads, int64_t dh) {
    float tmp[512];
    const int64_t half = dh / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t base = (m * heads + h) * dh;
            for (int64_t d = 0; d < dh; d++) tmp[d] = fv_get(t, xb, base + d);
            for (int64_t d = 0; d < dh; d++) {
                const float rot = d < half ? -tmp[d + half] : tmp[d - half];
                float a = tmp[d] * fv_get(cos, xb, m * cs_stride + d), b = rot * fv_get(sin, xb, m * cs_stride + d);
                if (xb) {
                    fv_put(&a, 1, 0, a); a = fv_get(&a, 1, 0);
                    fv_put(&b, 1, 0, b); b = fv_get(&b, 1, 0);
                }
                fv_put(t, xb, base + d, a + b);
            }
        }
}

/* x (M, D) -> q (M, heads * dh), k and v (M, kv_heads * dh). Returns 0, or -1 (bad sizes, no memory). */
int fv_llama_pre(const fv_llama *p, const void *x, const void *cos, const void *sin, int64_t cs_stride, void *q,
                 void *k, void *v, int xb, int64_t M, int nthreads) {
    const int64_t esize = xb ? 2 : 4;
    if (M <= 0 || p->dim_head > 512 || p->dim_head % 2) return -1;
    void *h = malloc((size_t)(M * p->D * esize));
    if (!h) return -1;
    fv_rms_norm(x, h, xb, M, p->D, p->norm1_w, p->eps1);
    const fv_layer *l[3] = {&p->q, &p->k, &p->v};
    void *const out[3] = {q, k, v};
    fv_layers_run(l, h, out, 3, M, xb, nthreads);
    fv_rotary(q, cos, sin, cs_stride, xb, M, p->heads, p->dim_head);
    fv_rotary(k, cos, sin, cs_stride, xb, M, p->kv_heads, p->dim_head);
    free(h);
    return 0;
}

/* x, y (M, D); q from pre; k, v: (M, kv_heads, S, dh) with strides st (as fv_attend), the new position
 * included; mask: NULL or bytes, row m's key s not seen where mask[m * mask_m + s] != 0 (left padding).
 * Returns 0, or -1 (bad sizes, no memory; y is then not written). */
int fv_llama_post(const fv_llama *p, const void *x, const void *q, const void *k, const void *v, int64_t S,
                  const int64_t *st, const uint8_t *mask, int64_t mask_m, void *y, int xb, int64_t M, int nthreads) {
    const int64_t D = p->D, inner = p->heads * p->dim_head, esize = xb ? 2 : 4;
    const int simd = p->o.isa >= 1 && fv_isa() >= 1;
    if (M <= 0 || S <= 0 || p->kv_heads <= 0 || p->heads % p->kv_heads) return -1;
    const int team = fv_attend_team(M, p->heads, p->dim_head, S, nthreads);
    const int64_t acts = M * (inner + 3 * D) * esize, attn = team * (S + 2 * p->dim_head) * 4;
    char *mem = malloc((size_t)(acts + 4 + attn));
    if (!mem) return -1;
    void *a = mem, *t = mem + M * inner * esize, *x1 = (char *)t + M * D * esize, *h = (char *)x1 + M * D * esize;
    float *scratch = (float *)(mem + (acts + 3) / 4 * 4);
    fv_attend(q, a, xb, M, p->heads, p->dim_head, k, v, S, M, p->heads / p->kv_heads, st, mask, mask_m, simd, team,
              scratch);
    fv_layer_run(&p->o, a, t, M, xb, nthreads);
    fv_gated_add(x, t, 1.f, x1, xb, M * D);
    fv_rms_norm(x1, h, xb, M, D, p->norm2_w, p->eps2);
    const int rc = fv_mlp_step(&p->mlp, h, x1, y, xb, M, nthreads);
    free(mem);
    return rc;
}

/* -- An MPT block's decoding step, in two calls around the KV cache's update ------------------------
 *
 *   pre:   qkv = Wqkv(LN1(x))  (clamped to +-clip where clip > 0)
 *   (the caller appends k, v (qkv's second and third thirds) to its cache and passes all of them)
 *   post:  x1 = x + out(attention(q, K, V) with ALiBi and mask);  y = x1 + down(GELU(up(LN2(x1))))
 *
 * as transformers' MptBlock computes them: scores = (q k^T) * scale + bias, masked positions set to
 * the dtype's lowest value, softmax in fp32, the probabilities in the activations' dtype times V. In
 * bf16 rounded where it rounds: q k^T, its scaling, the probabilities, their product with V (the
 * bias is fp32 there, so the sum with it is fp32), and as fv_mlp_step / the LayerNorms.
 * With `fp32_scores` (our MosaicGPT, modeling/mpt.py, whose bf16 decoding attends on fp32 copies)
 * the attention is fp32 throughout and its output rounded once; with `qk_ln` (OpenFlamingo-3B's
 * MosaicGPT) q and k each get a LayerNorm over all of D after the clamp, before the head split. */
typedef struct {
    fv_layer qkv, out;
    fv_mlp mlp;
    const void *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* (D,) in the activations' dtype, or NULL */
    const void *lnq_w, *lnq_b, *lnk_w, *lnk_b;  /* qk_ln's, as those */
    double eps1, eps2, eps_q, eps_k;
    float clip, scale;  /* clip <= 0: none */
    int32_t qk_ln, fp32_scores;
    int64_t D, heads, dim_head;
} fv_mpt;

static inline float fv_round(float v, int xb) {
    if (!xb) return v;
    fv_put(&v, 1, 0, v);
    return fv_get(&v, 1, 0);
}

/* a (M, heads * dh) from q (row m at m * q_stride), k, v as fv_attend (kv row m for query row m);
 * bias: fp32, head h's value for key s at bias[h * bias_h + bias_off + s]; mask: NULL or bytes,
 * row m's key s masked where mask[m * mask_m + s] != 0. */
static void fv_attend_alibi(const void *q, int64_t q_stride, void *a, int xb, int64_t M, int64_t heads, int64_t dh,
                            const void *k, const void *v, int64_t S, const int64_t *st, float scale, const float *bias,
                            int64_t bias_h, int64_t bias_off, const uint8_t *mask, int64_t mask_m, int fp32_scores,
                            int simd, int team, float *scratch) {
    const int64_t esize = xb ? 2 : 4;
    const int rb = xb && !fp32_scores;  /* scores and probabilities rounded to bf16 */
    const float lowest = rb ? -3.38953139e38f : -FLT_MAX;
    #pragma omp parallel num_threads(team)
    {
        float *p = scratch + (int64_t)omp_get_thread_num() * (S + 2 * dh), *qh = p + S, *o = p + S + dh;
        #pragma omp for schedule(static)
        for (int64_t mh = 0; mh < M * heads; mh++) {
            const int64_t m = mh / heads, h = mh % heads;
            for (int64_t d = 0; d < dh; d++) qh[d] = fv_get(q, xb, m * q_stride + h * dh + d);
            const char *kh = (const char *)k + (m * st[0] + h * st[1]) * esize;
            const char *vh = (const char *)v + (m * st[3] + h * st[4]) * esize;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t s = 0; s < S; s++) {
                float sc = fv_round(fv_round(fv_dot(qh, kh + s * st[2] * esize, xb, dh, simd), rb) * scale, rb);
                if (bias) sc += bias[h * bias_h + bias_off + s];
                if (mask && mask[m * mask_m + s]) sc = lowest;
                p[s] = sc;
                if (sc > mx) mx = sc;
            }
            for (int64_t s = 0; s < S; s++) sum += (p[s] = fv_expf(p[s] - mx));
            for (int64_t d = 0; d < dh; d++) o[d] = 0.f;
            for (int64_t s = 0; s < S; s++) fv_axpy(o, fv_round(p[s] / sum, rb), vh + s * st[5] * esize, xb, dh, simd);
            for (int64_t d = 0; d < dh; d++) fv_put(a, xb, m * heads * dh + h * dh + d, o[d]);
        }
    }
}

/* x (M, D) -> qkv (M, 3 D). Returns 0, or -1 (bad sizes, no memory). */
int fv_mpt_pre(const fv_mpt *p, const void *x, void *qkv, int xb, int64_t M, int nthreads) {
    const int64_t esize = xb ? 2 : 4, n = M * 3 * p->D;
    if (M <= 0) return -1;
    void *h = malloc((size_t)(M * p->D * esize));
    if (!h) return -1;
    fv_layer_norm(x, h, xb, M, p->D, p->ln1_w, p->ln1_b, p->eps1);
    fv_layer_run(&p->qkv, h, qkv, M, xb, nthreads);
    if (p->clip > 0)
        for (int64_t i = 0; i < n; i++) {
            const float v = fv_get(qkv, xb, i);
            if (v > p->clip || v < -p->clip) fv_put(qkv, xb, i, v > 0 ? p->clip : -p->clip);
        }
    if (p->qk_ln)
        for (int64_t m = 0; m < M; m++) {  /* (in place: each element is read before it is written) */
            char *row = (char *)qkv + m * 3 * p->D * esize;
            fv_layer_norm(row, row, xb, 1, p->D, p->lnq_w, p->lnq_b, p->eps_q);
            fv_layer_norm(row + p->D * esize, row + p->D * esize, xb, 1, p->D, p->lnk_w, p->lnk_b, p->eps_k);
        }
    free(h);
    return 0;
}

/* x, y (M, D); qkv from pre; k, v: (M, heads, S, dh) with strides st, the new position included; bias
 * and mask as fv_attend_alibi. Returns 0, or -1 (bad sizes, no memory; y is then not written). */
int fv_mpt_post(const fv_mpt *p, const void *x, const void *qkv, const void *k, const void *v, int64_t S,
                const int64_t *st, const float *bias, int64_t bias_h, int64_t bias_off, const uint8_t *mask,
                int64_t mask_m, void *y, int xb, int64_t M, int nthreads) {
    const int64_t D = p->D, esize = xb ? 2 : 4;
    const int simd = p->out.isa >= 1 && fv_isa() >= 1;
    if (M <= 0 || S <= 0) return -1;
    const int team = fv_attend_team(M, p->heads, p->dim_head, S, nthreads);
    const int64_t acts = M * 4 * D * esize, attn = team * (S + 2 * p->dim_head) * 4;
    char *mem = malloc((size_t)(acts + 4 + attn));
    if (!mem) return -1;
    void *a = mem, *t = mem + M * D * esize, *x1 = (char *)t + M * D * esize, *h = (char *)x1 + M * D * esize;
    float *scratch = (float *)(mem + (acts + 3) / 4 * 4);
    fv_attend_alibi(qkv, 3 * D, a, xb, M, p->heads, p->dim_head, k, v, S, st, p->scale, bias, bias_h, bias_off, mask,
                    mask_m, p->fp32_scores, simd, team, scratch);
    fv_layer_run(&p->out, a, t, M, xb, nthreads);
    fv_gated_add(x, t, 1.f, x1, xb, M * D);
    fv_layer_norm(x1, h, xb, M, D, p->ln2_w, p->ln2_b, p->eps2);
    const int rc = fv_mlp_step(&p->mlp, h, x1, y, xb, M, nthreads);
    free(mem);
    return rc;
}
