/* Weight-streaming matrix products: y = x W^T with W in FP8 blocks, BF16, F16 or F32.
 *
 * A tile of weight rows is decoded into a cache-sized F32 buffer (the weights stream from memory
 * once per call, whatever the number of input rows) and dotted with the input rows, four at a
 * time. Every output element is one dot product computed in the same order whatever the batch
 * holds, so a request gets bit-identical logits alone and in any batch (batch invariance). */
#include "kernels.h"
#include "fp8.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define XP_TILE_FLOATS (32 * 1024) /* 128 KB of decoded weights per tile */
#define XP_XBLOCK 16 /* input rows kept hot while a tile is applied */

static int xp_avx2_state = -1; /* -1 unknown, 0 scalar, 1 avx2 */
static int xp_forced_scalar;

int xp_cpu_have_avx2(void)
{
    if (xp_avx2_state < 0) {
        __builtin_cpu_init();
        xp_avx2_state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && !getenv("XPREC_NO_AVX2");
    }
    return xp_avx2_state && !xp_forced_scalar;
}

void xp_cpu_force_scalar(int on)
{
    xp_forced_scalar = on;
}

/* ---------------------------------------------------------------- references */

void xp_decode_row_ref(const xp_linear *l, int64_t r, float *dst)
{
    xp_linear_row(l, r, dst);
}

float xp_dot_ref(const float *a, const float *b, int64_t n)
{
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---------------------------------------------------------------- AVX2 */

/* E4M3 -> F16 bit pattern with the same sign, exponent and mantissa fields in F16's places:
 * the F16 value is the E4M3 value times 2^-8 for normal and subnormal codes alike (bias 7 vs
 * 15), so multiplying by 256 * scale gives the weight. NaN codes are refused at load. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 xp_fp8x8(const uint8_t *q,
                                                                         __m256 s256)
{
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)q));
    __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(0x3f80)),
                             _mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16((short)0x8000)));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), s256);
}

/* Sixteen codes at once: one widening and one pass of 16-bit bit-twiddling for both halves. */
__attribute__((target("avx2,fma,f16c"))) static inline void xp_fp8x16(const uint8_t *q, __m256 s256,
                                                                      __m256 *lo, __m256 *hi)
{
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m256i h = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3f80)),
                                _mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16((short)0x8000)));
    *lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), s256);
    *hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), s256);
}

__attribute__((target("avx2,fma,f16c"))) static void xp_decode_row_avx2(const xp_linear *l,
                                                                         int64_t r, float *dst)
{
    int64_t cols = l->cols, j = 0;
    if (l->dtype == XP_F8_E4M3) {
        const uint8_t *q = (const uint8_t *)l->w + r * cols;
        const float *s = l->scale + (r / l->br) * l->nbc;
        for (int64_t b = 0; b < l->nbc; b++) {
            int64_t end = (b + 1) * l->bc < cols ? (b + 1) * l->bc : cols;
            __m256 s256 = _mm256_set1_ps(s[b] * 256.0f), lo, hi;
            for (; j + 16 <= end; j += 16) {
                xp_fp8x16(q + j, s256, &lo, &hi);
                _mm256_storeu_ps(dst + j, lo);
                _mm256_storeu_ps(dst + j + 8, hi);
            }
            for (; j + 8 <= end; j += 8) _mm256_storeu_ps(dst + j, xp_fp8x8(q + j, s256));
            for (; j < end; j++) dst[j] = xp_fp8_e4m3_to_f32(q[j]) * s[b];
        }
        return;
    }
    if (l->dtype == XP_BF16) {
        const uint16_t *w = (const uint16_t *)l->w + r * cols;
        for (; j + 8 <= cols; j += 8) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + j)));
            _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        }
        for (; j < cols; j++) dst[j] = xp_bf16_to_f32(w[j]);
        return;
    }
    xp_decode_row_ref(l, r, dst);
}

__attribute__((target("avx2,fma,f16c"))) static float xp_dot_avx2(const float *a, const float *b,
                                                                   int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Four dot products against one weight row, each in exactly xp_dot_avx2's order. */
__attribute__((target("avx2,fma,f16c"))) static void xp_dot4_avx2(const float *x, int64_t ldx,
                                                                   const float *w, int64_t n,
                                                                   float *out)
{
    __m256 a0[4], a1[4];
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) a0[k] = a1[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
            a1[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i + 8), w1, a1[k]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 w0 = _mm256_loadu_ps(w + i);
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
        __m256 s0 = _mm256_add_ps(a0[k], a1[k]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
        h = _mm_hadd_ps(h, h);
        h = _mm_hadd_ps(h, h);
        float s = _mm_cvtss_f32(h);
        for (int64_t j = i; j < n; j++) s += x[k * ldx + j] * w[j];
        out[k] = s;
    }
}

/* Up to four dot products of x rows with weight row r, decoding the weights in registers (no
 * buffer): the decode path of few-row steps, where the weights stream from memory once. The
 * arithmetic is xp_dot_avx2's, element for element, so the results are the same bits as the
 * tiled path's. n is a constant in each expansion so the accumulators stay in registers. FP8
 * blocks must be a multiple of 16 columns wide, so no 16-wide chunk straddles two scales. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
xp_fused_n(const xp_linear *l, int64_t r, const float *x, int64_t ldx, float *out, const int n)
{
    int64_t cols = l->cols, i = 0;
    __m256 a0[4], a1[4];
    _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) a0[k] = a1[k] = _mm256_setzero_ps();
    float tail_w[8];
    if (l->dtype == XP_F8_E4M3) {
        const uint8_t *q = (const uint8_t *)l->w + r * cols;
        const float *s = l->scale + (r / l->br) * l->nbc;
        __m256 s256 = _mm256_setzero_ps();
        for (int64_t b = 0; b < l->nbc; b++) {
            int64_t end = (b + 1) * l->bc < cols ? (b + 1) * l->bc : cols;
            s256 = _mm256_set1_ps(s[b] * 256.0f);
            for (; i + 16 <= end; i += 16) {
                __m256 w0, w1;
                xp_fp8x16(q + i, s256, &w0, &w1);
                _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) {
                    a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
                    a1[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i + 8), w1, a1[k]);
                }
            }
        }
        if (i + 8 <= cols) {
            __m256 w0 = xp_fp8x8(q + i, s256);
            _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
            i += 8;
        }
        for (int64_t j = i; j < cols; j++) tail_w[j - i] = xp_fp8_e4m3_to_f32(q[j]) * s[j / l->bc];
    } else {
        const uint16_t *h = (const uint16_t *)l->w + r * cols;
#define XP_BF8(j)                                                                                  \
    _mm256_castsi256_ps(                                                                           \
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + (j)))), 16))
        for (; i + 16 <= cols; i += 16) {
            __m256 w0 = XP_BF8(i), w1 = XP_BF8(i + 8);
            _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) {
                a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
                a1[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i + 8), w1, a1[k]);
            }
        }
        if (i + 8 <= cols) {
            __m256 w0 = XP_BF8(i);
            _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) a0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k * ldx + i), w0, a0[k]);
            i += 8;
        }
#undef XP_BF8
        for (int64_t j = i; j < cols; j++) tail_w[j - i] = xp_bf16_to_f32(h[j]);
    }
    _Pragma("GCC unroll 4") for (int k = 0; k < n; k++) {
        __m256 s0 = _mm256_add_ps(a0[k], a1[k]);
        __m128 hs = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
        hs = _mm_hadd_ps(hs, hs);
        hs = _mm_hadd_ps(hs, hs);
        float acc = _mm_cvtss_f32(hs);
        for (int64_t j = i; j < cols; j++) acc += x[k * ldx + j] * tail_w[j - i];
        out[k] = acc;
    }
}

__attribute__((target("avx2,fma,f16c"))) static void xp_fused_rows_avx2(const xp_linear *l,
                                                                         int64_t r0, int64_t r1,
                                                                         const float *x, int n,
                                                                         float *y)
{
    float o[4];
    int64_t ld = l->cols;
    for (int64_t r = r0; r < r1; r++) {
        switch (n) {
        case 1: xp_fused_n(l, r, x, ld, o, 1); break;
        case 2: xp_fused_n(l, r, x, ld, o, 2); break;
        case 3: xp_fused_n(l, r, x, ld, o, 3); break;
        default: xp_fused_n(l, r, x, ld, o, 4); break;
        }
        for (int i = 0; i < n; i++) y[(size_t)i * l->rows + r] = o[i];
    }
}

/* ---------------------------------------------------------------- dispatch */

void xp_decode_row(const xp_linear *l, int64_t r, float *dst)
{
    if (l->dtype == XP_F32) {
        memcpy(dst, (const float *)l->w + r * l->cols, (size_t)l->cols * sizeof *dst);
        return;
    }
    if (xp_cpu_have_avx2())
        xp_decode_row_avx2(l, r, dst);
    else
        xp_decode_row_ref(l, r, dst);
}

float xp_dot(const float *a, const float *b, int64_t n)
{
    return xp_cpu_have_avx2() ? xp_dot_avx2(a, b, n) : xp_dot_ref(a, b, n);
}

size_t xp_linear_scratch_floats(int64_t max_cols)
{
    return (size_t)max_cols > XP_TILE_FLOATS ? (size_t)max_cols : XP_TILE_FLOATS;
}

typedef struct {
    const xp_linear *l;
    const float *x;
    float *y;
    float **scratch;
    int n;
    int64_t tile; /* weight rows per task */
} xp_linear_job;

/* y[i, r] for rows i of x and weight rows r in [r0, r1), w the decoded rows. */
static void xp_apply_tile(const xp_linear_job *j, const float *w, int64_t r0, int64_t r1)
{
    int64_t cols = j->l->cols, ld = j->l->rows;
    int avx2 = xp_cpu_have_avx2();
    for (int i0 = 0; i0 < j->n; i0 += XP_XBLOCK) {
        int i1 = i0 + XP_XBLOCK < j->n ? i0 + XP_XBLOCK : j->n;
        for (int64_t r = r0; r < r1; r++) {
            const float *wr = w + (r - r0) * cols;
            int i = i0;
            float o[4];
            for (; avx2 && i + 4 <= i1; i += 4) {
                xp_dot4_avx2(j->x + (size_t)i * cols, cols, wr, cols, o);
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) j->y[(size_t)(i + k) * ld + r] = o[k];
            }
            for (; i < i1; i++) j->y[(size_t)i * ld + r] = xp_dot(j->x + (size_t)i * cols, wr, cols);
        }
    }
}

static int xp_can_fuse(const xp_linear *l)
{
    return xp_cpu_have_avx2() &&
           (l->dtype == XP_BF16 || (l->dtype == XP_F8_E4M3 && l->bc % 16 == 0));
}

static void xp_linear_task(void *ctx, int task, int thread)
{
    const xp_linear_job *j = ctx;
    const xp_linear *l = j->l;
    int64_t r0 = (int64_t)task * j->tile, r1 = r0 + j->tile < l->rows ? r0 + j->tile : l->rows;
    if (j->n <= 4 && xp_can_fuse(l)) {
        xp_fused_rows_avx2(l, r0, r1, j->x, j->n, j->y);
        return;
    }
    if (l->dtype == XP_F32) {
        xp_apply_tile(j, (const float *)l->w + r0 * l->cols, r0, r1);
        return;
    }
    float *buf = j->scratch[thread];
    for (int64_t r = r0; r < r1; r++) xp_decode_row(l, r, buf + (r - r0) * l->cols);
    xp_apply_tile(j, buf, r0, r1);
}

void xp_linear_forward(xp_pool *pool, float **scratch, const xp_linear *l, const float *x, int n,
                       float *y)
{
    int threads = xp_pool_threads(pool);
    int64_t tile = XP_TILE_FLOATS / l->cols;
    if (tile < 1) tile = 1;
    /* at least a few tasks per thread so the threads finish together */
    int64_t per = (l->rows + 4 * threads - 1) / (4 * threads);
    if (tile > per) tile = per < 1 ? 1 : per;
    xp_linear_job j = {l, x, y, scratch, n, tile};
    xp_pool_run(pool, (int)((l->rows + tile - 1) / tile), xp_linear_task, &j);
}

void xp_linear_forward_ref(const xp_linear *l, const float *x, int n, float *y)
{
    float *row = malloc((size_t)l->cols * sizeof *row);
    if (!row) return;
    for (int64_t r = 0; r < l->rows; r++) {
        xp_decode_row_ref(l, r, row);
        for (int i = 0; i < n; i++) y[i * l->rows + r] = xp_dot_ref(x + i * l->cols, row, l->cols);
    }
    free(row);
}
