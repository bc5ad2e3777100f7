/* AVX2/FMA/F16C kernels (see simd.h): the matrix kernels of linear_body.h at 8 lanes, and the
 * vector dot and axpy of attention and LoRA. */
#include "format/fp8.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

#include <immintrin.h>
#include <math.h>

#define XP_AVX2 __attribute__((target("avx2,fma,f16c")))

XP_AVX2 static inline __m256 xp_bf16x8(const uint16_t *h)
{
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* 8 E4M3 codes to F32 by moving their fields into F32's places (see linear_avx512.c): the float
 * read is the value times 2^-120, so multiplying by S = 2^120 * scale gives the weight, rounded
 * once. NaN codes are refused at load. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 xp_fp8x8(const uint8_t *q, __m256 S)
{
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    v = _mm256_and_si256(_mm256_slli_epi32(v, 20), _mm256_set1_epi32((int)0x87F00000u));
    return _mm256_mul_ps(_mm256_castsi256_ps(v), S);
}

/* 8 E4M3 codes to F32 through F16, for blocks holding subnormal codes (see xp_fp8x16_f16_512 in
 * linear_avx512.c): times S = 2^8 * scale, the same bits as xp_fp8x8. */
XP_AVX2 static inline __m256 xp_fp8x8_f16(const uint8_t *q, __m256 S)
{
    __m128i v = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)q));
    v = _mm_and_si128(_mm_slli_epi16(v, 7), _mm_set1_epi16((short)0xBF80));
    return _mm256_mul_ps(_mm256_cvtph_ps(v), S);
}

__attribute__((target("avx2,fma,f16c"))) static inline void xp_fp8x16(const uint8_t *q, __m256 S,
                                                                      __m256 *lo, __m256 *hi)
{
    *lo = xp_fp8x8(q, S);
    *hi = xp_fp8x8(q + 8, S);
}

__attribute__((target("avx2,fma,f16c"))) void xp_decode_row_avx2(const xp_linear *l, int64_t r,
                                                                 float *dst)
{
    int64_t cols = l->cols, j = 0;
    if (l->dtype == XP_F8_E4M3 && l->fp8_fast) {
        const uint8_t *q = (const uint8_t *)l->w + r * cols;
        const float *s = l->scale + (r / l->br) * l->nbc;
        for (int64_t b = 0; b < l->nbc; b++) {
            int64_t end = (b + 1) * l->bc < cols ? (b + 1) * l->bc : cols;
            if (l->sub && l->sub[r * l->nbc + b]) {
                __m256 S8 = _mm256_set1_ps(s[b] * 0x1p8f);
                for (; j + 8 <= end; j += 8)
                    _mm256_storeu_ps(dst + j, xp_fp8x8_f16(q + j, S8));
            }
            __m256 S = _mm256_set1_ps(s[b] * 0x1p120f), lo, hi;
            for (; j + 16 <= end; j += 16) {
                xp_fp8x16(q + j, S, &lo, &hi);
                _mm256_storeu_ps(dst + j, lo);
                _mm256_storeu_ps(dst + j + 8, hi);
            }
            for (; j + 8 <= end; j += 8)
                _mm256_storeu_ps(dst + j, xp_fp8x8(q + j, S));
            for (; j < end; j++)
                dst[j] = xp_fp8_e4m3_to_f32(q[j]) * s[b];
        }
        return;
    }
    if (l->dtype == XP_BF16) {
        const uint16_t *w = (const uint16_t *)l->w + r * cols;
        for (; j + 8 <= cols; j += 8)
            _mm256_storeu_ps(dst + j, xp_bf16x8(w + j));
        for (; j < cols; j++)
            dst[j] = xp_bf16_to_f32(w[j]);
        return;
    }
    xp_decode_row_ref(l, r, dst);
}

/* 8 values of a vector held as F32 or BF16, as F32; bf16 is a constant per expansion. */
XP_AVX2 __attribute__((always_inline)) static inline __m256 xp_load8(const void *a, int64_t i,
                                                                     const int bf16)
{
    return bf16 ? xp_bf16x8((const uint16_t *)a + i) : _mm256_loadu_ps((const float *)a + i);
}

XP_AVX2 __attribute__((always_inline)) static inline void
xp_axpy256(float a, const void *x, float *y, int64_t n, const int bf16)
{
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, xp_load8(x, i, bf16), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] = fmaf(a, xp_load1(x, i, bf16), y[i]);
}

/* The dot product's one order: two 8-wide accumulators over 16-element chunks, one 8-element
 * chunk, a horizontal sum, the scalar tail. a may be BF16, widened as it is loaded. */
XP_AVX2 __attribute__((always_inline)) static inline float xp_dot256(const void *a, const float *b,
                                                                     int64_t n, const int bf16)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(xp_load8(a, i, bf16), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(xp_load8(a, i + 8, bf16), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(xp_load8(a, i, bf16), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++)
        s += xp_load1(a, i, bf16) * b[i];
    return s;
}

XP_AVX2 void xp_axpy_avx2(float a, const float *x, float *y, int64_t n)
{
    xp_axpy256(a, x, y, n, 0);
}

XP_AVX2 void xp_axpy_bf16_avx2(float a, const uint16_t *x, float *y, int64_t n)
{
    xp_axpy256(a, x, y, n, 1);
}

XP_AVX2 float xp_dot_avx2(const float *a, const float *b, int64_t n)
{
    return xp_dot256(a, b, n, 0);
}

XP_AVX2 float xp_dot_bf16_avx2(const uint16_t *a, const float *b, int64_t n)
{
    return xp_dot256(a, b, n, 1);
}

XP_AVX2 static inline float xp_hsum256(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* e^x for x <= 0 (softmax terms), Cephes' single-precision range reduction and polynomial:
 * within 2 ulp; below -87 the result is 0 or tiny. */
XP_AVX2 static inline __m256 xp_exp256(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define XV __m256
#define XW 8
#define XT XP_AVX2
#define XN(name) xp_##name##_avx2
#define XZERO() _mm256_setzero_ps()
#define XLOAD(p) _mm256_loadu_ps(p)
#define XSTORE(p, v) _mm256_storeu_ps(p, v)
#define XSET1(f) _mm256_set1_ps(f)
#define XFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define XHSUM(v) xp_hsum256(v)
#define XEXP(v) xp_exp256(v)
#define XFP8(q, S) xp_fp8x8(q, S)
#define XFP8S(q, S) xp_fp8x8_f16(q, S)
#define XBF16(h) xp_bf16x8(h)
/* 12 accumulators, 3 weight vectors and one input vector: the 16 registers */
#define XMR 3
#define XNR 4
#define XFUSED_MAX 4
#include "cpu/linear_body.h"
