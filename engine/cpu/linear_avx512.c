/* AVX-512 (F, BW, VL) + F16C kernels (see simd.h): the matrix kernels of linear_body.h at 16
 * lanes, and the vector dot and axpy of attention and LoRA (two 16-wide accumulators over
 * 32-element chunks, one 16-element chunk, a reduction, the scalar tail). */
#include "format/fp8.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

#include <immintrin.h>
#include <math.h>

#define XP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

/* 16 E4M3 codes to F32 by moving their fields into F32's places: sign-extend the code, shift the
 * exponent and mantissa to bits 20..26, keep the sign in bit 31. The float read is the E4M3 value
 * times 2^-120 (bias 7 against 127), subnormal codes included, so one multiply by S = 2^120 * scale
 * gives value * scale rounded once, as the reference does. Integer ops only: on these cores the
 * F16 conversion it replaces could not keep up with memory. */
XP_AVX512 static inline __m512 xp_fp8x16_512(const uint8_t *q, __m512 S)
{
    __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q));
    v = _mm512_and_si512(_mm512_slli_epi32(v, 20), _mm512_set1_epi32((int)0x87F00000u));
    return _mm512_mul_ps(_mm512_castsi512_ps(v), S);
}

/* 16 E4M3 codes to F32 through F16, for blocks holding subnormal codes: the fields move to F16's
 * places (the sign-extended code shifted by 7, bit 14 cleared), which is the value times 2^-8 with
 * subnormal codes as F16 subnormals, and vcvtph2ps widens those without the F32 denormal the
 * decode above would multiply (a microcode assist on some cores). Times S = 2^8 * scale: the same
 * exact product rounded once, so the same bits as xp_fp8x16_512. */
XP_AVX512 static inline __m512 xp_fp8x16_f16_512(const uint8_t *q, __m512 S)
{
    __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
    v = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBF80));
    return _mm512_mul_ps(_mm512_cvtph_ps(v), S);
}

XP_AVX512 static inline void xp_fp8x32(const uint8_t *q, __m512 S, __m512 *lo, __m512 *hi)
{
    *lo = xp_fp8x16_512(q, S);
    *hi = xp_fp8x16_512(q + 16, S);
}

XP_AVX512 static inline __m512 xp_bf16x16(const uint16_t *h)
{
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

XP_AVX512 void xp_decode_row_avx512(const xp_linear *l, int64_t r, float *dst)
{
    int64_t cols = l->cols, j = 0;
    if (l->dtype == XP_F8_E4M3 && l->fp8_fast) {
        const uint8_t *q = (const uint8_t *)l->w + r * cols;
        const float *s = l->scale + (r / l->br) * l->nbc;
        for (int64_t b = 0; b < l->nbc; b++) {
            int64_t end = (b + 1) * l->bc < cols ? (b + 1) * l->bc : cols;
            if (l->sub && l->sub[r * l->nbc + b]) {
                __m512 S8 = _mm512_set1_ps(s[b] * 0x1p8f);
                for (; j + 16 <= end; j += 16)
                    _mm512_storeu_ps(dst + j, xp_fp8x16_f16_512(q + j, S8));
            }
            __m512 S = _mm512_set1_ps(s[b] * 0x1p120f), lo, hi;
            for (; j + 32 <= end; j += 32) {
                xp_fp8x32(q + j, S, &lo, &hi);
                _mm512_storeu_ps(dst + j, lo);
                _mm512_storeu_ps(dst + j + 16, hi);
            }
            for (; j + 16 <= end; j += 16)
                _mm512_storeu_ps(dst + j, xp_fp8x16_512(q + j, S));
            for (; j < end; j++)
                dst[j] = xp_fp8_e4m3_to_f32(q[j]) * s[b];
        }
        return;
    }
    if (l->dtype == XP_BF16) {
        const uint16_t *w = (const uint16_t *)l->w + r * cols;
        for (; j + 16 <= cols; j += 16)
            _mm512_storeu_ps(dst + j, xp_bf16x16(w + j));
        for (; j < cols; j++)
            dst[j] = xp_bf16_to_f32(w[j]);
        return;
    }
    xp_decode_row_ref(l, r, dst);
}

/* 16 values of a vector held as F32 or BF16, as F32; bf16 is a constant per expansion. */
XP_AVX512 __attribute__((always_inline)) static inline __m512 xp_load16(const void *a, int64_t i,
                                                                        const int bf16)
{
    return bf16 ? xp_bf16x16((const uint16_t *)a + i) : _mm512_loadu_ps((const float *)a + i);
}

XP_AVX512 __attribute__((always_inline)) static inline void
xp_axpy512(float a, const void *x, float *y, int64_t n, const int bf16)
{
    __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, xp_load16(x, i, bf16), _mm512_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] = fmaf(a, xp_load1(x, i, bf16), y[i]);
}

/* The dot product's one order: two accumulators over 32-element chunks, one 16-element chunk, a
 * reduction, the scalar tail. a may be BF16 (LoRA factors as stored), widened as it is loaded. */
XP_AVX512 __attribute__((always_inline)) static inline float
xp_dot512(const void *a, const float *b, int64_t n, const int bf16)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(xp_load16(a, i, bf16), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(xp_load16(a, i + 16, bf16), _mm512_loadu_ps(b + i + 16), s1);
    }
    if (i + 16 <= n) {
        s0 = _mm512_fmadd_ps(xp_load16(a, i, bf16), _mm512_loadu_ps(b + i), s0);
        i += 16;
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; i++)
        s += xp_load1(a, i, bf16) * b[i];
    return s;
}

XP_AVX512 void xp_axpy_avx512(float a, const float *x, float *y, int64_t n)
{
    xp_axpy512(a, x, y, n, 0);
}

XP_AVX512 void xp_axpy_bf16_avx512(float a, const uint16_t *x, float *y, int64_t n)
{
    xp_axpy512(a, x, y, n, 1);
}

XP_AVX512 float xp_dot_avx512(const float *a, const float *b, int64_t n)
{
    return xp_dot512(a, b, n, 0);
}

XP_AVX512 float xp_dot_bf16_avx512(const uint16_t *a, const float *b, int64_t n)
{
    return xp_dot512(a, b, n, 1);
}

/* The matrix kernels' reduction: the two halves added, then the AVX2 tree. */
XP_AVX512 static inline float xp_hsum512(__m512 v)
{
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 u = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* e^x for x <= 0, as xp_exp256 (linear_avx2.c) computes it. */
XP_AVX512 static inline __m512 xp_exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

#define XV __m512
#define XW 16
#define XT XP_AVX512
#define XN(name) xp_##name##_avx512
#define XZERO() _mm512_setzero_ps()
#define XLOAD(p) _mm512_loadu_ps(p)
#define XSTORE(p, v) _mm512_storeu_ps(p, v)
#define XSET1(f) _mm512_set1_ps(f)
#define XFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define XHSUM(v) xp_hsum512(v)
#define XEXP(v) xp_exp512(v)
#define XFP8(q, S) xp_fp8x16_512(q, S)
#define XFP8S(q, S) xp_fp8x16_f16_512(q, S)
#define XBF16(h) xp_bf16x16(h)
/* 24 accumulators, 6 weight vectors and one input vector of the 32 registers */
#define XMR 6
#define XNR 4
#define XFUSED_MAX 8
#include "cpu/linear_body.h"
