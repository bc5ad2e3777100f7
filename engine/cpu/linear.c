/* Weight-streaming matrix products: y = x W^T with W in FP8 blocks, BF16, F16 or F32.
 *
 * Few rows (decode): each weight row is decoded once and dotted with every input row while it is
 * in L1, so the weights stream from memory once per step. Many rows (prefill): a tile of weight
 * rows is decoded into a cache-sized F32 buffer and multiplied with OpenBLAS's sgemm. */
#include "kernels.h"
#include "fp8.h"

#include <cblas.h>
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define XP_TILE_FLOATS (32 * 1024) /* 128 KB of decoded weights per tile */
#define XP_GEMM_MIN_ROWS 4

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

__attribute__((target("avx2,fma,f16c"))) static void xp_decode_row_avx2(const xp_linear *l,
                                                                         int64_t r, float *dst)
{
    int64_t cols = l->cols, j = 0;
    if (l->dtype == XP_F8_E4M3) {
        const uint8_t *q = (const uint8_t *)l->w + r * cols;
        const float *s = l->scale + (r / l->br) * l->nbc;
        for (int64_t b = 0; b < l->nbc; b++) {
            int64_t end = (b + 1) * l->bc < cols ? (b + 1) * l->bc : cols;
            __m256 s256 = _mm256_set1_ps(s[b] * 256.0f);
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

static void xp_linear_task(void *ctx, int task, int thread)
{
    const xp_linear_job *j = ctx;
    const xp_linear *l = j->l;
    int64_t r0 = (int64_t)task * j->tile, r1 = r0 + j->tile < l->rows ? r0 + j->tile : l->rows;
    float *buf = j->scratch[thread];
    if (j->n < XP_GEMM_MIN_ROWS) {
        for (int64_t r = r0; r < r1; r++) {
            const float *row = buf;
            if (l->dtype == XP_F32)
                row = (const float *)l->w + r * l->cols;
            else
                xp_decode_row(l, r, buf);
            for (int i = 0; i < j->n; i++) j->y[i * l->rows + r] = xp_dot(j->x + i * l->cols, row, l->cols);
        }
        return;
    }
    const float *wt = buf;
    if (l->dtype == XP_F32)
        wt = (const float *)l->w + r0 * l->cols;
    else
        for (int64_t r = r0; r < r1; r++) xp_decode_row(l, r, buf + (r - r0) * l->cols);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, (int)(r1 - r0), (int)l->cols, 1.0f,
                j->x, (int)l->cols, wt, (int)l->cols, 0.0f, j->y + r0, (int)l->rows);
}

void xp_linear_forward(xp_pool *pool, float **scratch, const xp_linear *l, const float *x, int n,
                       float *y)
{
    int threads = xp_pool_threads(pool);
    int64_t tile = n < XP_GEMM_MIN_ROWS ? 16 : XP_TILE_FLOATS / l->cols;
    if (tile < 1) tile = 1;
    /* enough tasks to balance the threads, but tiles no smaller than needed */
    int64_t per_thread = (l->rows + threads - 1) / threads;
    if (n < XP_GEMM_MIN_ROWS && tile > per_thread) tile = per_thread;
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
