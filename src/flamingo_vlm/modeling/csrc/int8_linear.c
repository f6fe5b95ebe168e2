/* Weight-only int8 linear for a few rows (decoding), on CPU.
 *
 *   y[m, n] = s[n] * sum_k x[m, k] * q[n, k]      q: (N, K) int8; x: (M, K), y: (M, N), s: (N,) fp32 or bf16
 *
 * The weight is torch's plain row-major int8 matrix (QuantizedLinear.qweight), unchanged. Each
 * thread takes a contiguous run of 4-row blocks; a block's 4 rows are contiguous in memory, so a
 * thread reads one forward stream. What made the difference is the software prefetch: while a block
 * is multiplied, the next block is prefetched at the rate it is consumed (64 bytes per 16 columns).
 * Without it the same loop streamed 7 GB/s per core on an AMD EPYC Zen 4; with it, 32 GB/s on two
 * cores, the machine's read bandwidth (torch's aten._weight_int8pack_mm: 15 GB/s).
 *
 * Weights are widened to fp32 and multiplied with fp32 FMAs (bf16 x is widened too, exactly; bf16 y
 * is rounded to nearest even): at one row this is bound by memory, at more rows by the FMAs, so
 * flamingo_vlm.modeling.quantize uses it for few rows. On Zen 4 the AVX2 path is the faster one
 * (its 512-bit ops are split in two); which path a machine runs is measured (modeling/kernels.py).
 * Built and loaded by flamingo_vlm/modeling/native.py (cc -O3 -fopenmp); each SIMD path is compiled
 * with a target attribute and picked at run time, so one build runs on any x86-64 CPU.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FV_X86 1
#endif

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

/* Operands: x, y and s are fp32, or bf16 where their flag is set. */
typedef struct {
    const void *x;
    const int8_t *q;
    const void *s;
    void *y;
    int64_t M, N, K;
    int xb, sb, yb;
} fv_args;

/* isa: 0 portable C, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL) */
int fv_isa(void) {
    static int cached = -1;  /* computed once; threads racing on the first call all store the same value */
    int isa = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (isa < 0) {
        isa = 0;
#ifdef FV_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
            isa = 2;
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
            const int8_t *row = a->q + (n0 + r) * a->K;
            float acc = 0.f;
            for (int64_t k = 0; k < a->K; k++) acc += fv_get(a->x, a->xb, m * a->K + k) * (float)row[k];
            fv_put(a->y, a->yb, m * a->N + n0 + r, fv_get(a->s, a->sb, n0 + r) * acc);
        }
}

#ifdef FV_X86
/* -- AVX-512: 16 columns per step, up to 4 rows of x per pass (16 accumulators) --------------------- */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512
fv_x512(const fv_args *a, int64_t i, int64_t k, __mmask16 mk) {
    if (a->xb)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)a->x + i * a->K + k)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)a->x + i * a->K + k);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void
fv_tile512(const fv_args *a, const int8_t *blk, int64_t n0, int64_t nb, int64_t m0, const int mb) {
    const int64_t K = a->K;
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm512_setzero_ps();
    const int8_t *row[4];
    for (int r = 0; r < 4; r++) row[r] = blk + (r < nb ? r : 0) * K;  /* a short last block repeats row 0 */
    for (int64_t k = 0; k < K; k += 16) {
        _mm_prefetch((const char *)(blk + 4 * K + k * 4), _MM_HINT_T0);  /* the next block, 64 bytes per step */
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 w[4];
        for (int r = 0; r < 4; r++)
            w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, row[r] + k)));
        for (int i = 0; i < mb; i++) {
            __m512 xv = fv_x512(a, m0 + i, k, mk);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm512_fmadd_ps(xv, w[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < nb; r++)
            fv_put(a->y, a->yb, (m0 + i) * a->N + n0 + r, fv_get(a->s, a->sb, n0 + r) * _mm512_reduce_add_ps(acc[i][r]));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void fv_block512(const fv_args *a, int64_t n0, int64_t nb) {
    const int8_t *blk = a->q + n0 * a->K;
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        switch (a->M - m0 < 4 ? a->M - m0 : 4) {  /* a constant row count keeps the accumulators in registers */
        case 1: fv_tile512(a, blk, n0, nb, m0, 1); break;
        case 2: fv_tile512(a, blk, n0, nb, m0, 2); break;
        case 3: fv_tile512(a, blk, n0, nb, m0, 3); break;
        default: fv_tile512(a, blk, n0, nb, m0, 4); break;
        }
    }
}

/* -- AVX2: 8 columns per step, up to 2 rows of x per pass (16 registers) ----------------------------- */
__attribute__((target("avx2,fma"))) static inline float fv_hsum256(__m256 v) {
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

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
fv_tile256(const fv_args *a, const int8_t *blk, int64_t n0, int64_t nb, int64_t m0, const int mb) {
    const int64_t K = a->K;
    __m256 acc[2][4];
    for (int i = 0; i < 2; i++)
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();
    const int8_t *row[4];
    for (int r = 0; r < 4; r++) row[r] = blk + (r < nb ? r : 0) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(blk + 4 * K + k * 4), _MM_HINT_T0);
        __m256 w[4];
        for (int r = 0; r < 4; r++)
            w[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row[r] + k))));
        for (int i = 0; i < mb; i++) {
            __m256 xv = fv_x256(a, m0 + i, k);
            for (int r = 0; r < 4; r++) acc[i][r] = _mm256_fmadd_ps(xv, w[r], acc[i][r]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int r = 0; r < nb; r++) {
            float t = fv_hsum256(acc[i][r]);
            for (int64_t j = k; j < K; j++) t += fv_get(a->x, a->xb, (m0 + i) * K + j) * (float)row[r][j];
            fv_put(a->y, a->yb, (m0 + i) * a->N + n0 + r, fv_get(a->s, a->sb, n0 + r) * t);
        }
}

__attribute__((target("avx2,fma"))) static void fv_block256(const fv_args *a, int64_t n0, int64_t nb) {
    const int8_t *blk = a->q + n0 * a->K;
    for (int64_t m0 = 0; m0 < a->M; m0 += 2) {
        if (a->M - m0 >= 2) fv_tile256(a, blk, n0, nb, m0, 2);
        else fv_tile256(a, blk, n0, nb, m0, 1);
    }
}
#endif

/* y (M, N) = x (M, K) @ q (N, K)^T, row n scaled by s[n]; x, s, y fp32, or bf16 where their flag is set.
 * isa: the path to take (as fv_isa(), lowered to what this CPU has); nthreads: OpenMP threads (torch's). */
void fv_int8_linear(const void *x, int x_bf16, const int8_t *q, const void *s, int s_bf16, void *y, int y_bf16,
                    int64_t M, int64_t N, int64_t K, int isa, int nthreads) {
    const fv_args a = {x, q, s, y, M, N, K, x_bf16, s_bf16, y_bf16};
    int64_t nblocks = (N + 3) / 4;
    if (isa > fv_isa()) isa = fv_isa();
    #pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * 4, nb = N - n0 < 4 ? N - n0 : 4;
#ifdef FV_X86
        if (isa == 2) { fv_block512(&a, n0, nb); continue; }
        if (isa == 1) { fv_block256(&a, n0, nb); continue; }
#endif
        fv_block_c(&a, n0, nb);
    }
}
