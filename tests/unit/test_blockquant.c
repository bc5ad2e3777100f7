/* Block quantization: the error bound, the scales, zero blocks, ragged edges, bad input. */
#include "testutil.h"

#include "format/blockquant.h"
#include "format/fp8.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Spacing of E4M3 codes around code c, from the format: normal codes with exponent field E have
 * spacing 2^(E-7-3); subnormals (and zero) 2^-9. The max code 448 uses the spacing below it,
 * which is the same binade's. */
static double e4m3_step(uint8_t c)
{
    int e = (c >> 3) & 15;
    return e == 0 ? 0x1p-9 : ldexp(1.0, e - 10);
}

/* Smallest value of a 16-bit float format >= s, searched over its positive codes (which are
 * ordered like their values). */
static float round_up_16(float s, xp_dtype t)
{
    unsigned lo = 1, hi = t == XP_BF16 ? 0x7f7f : 0x7bff; /* largest finite */
    float (*dec)(uint16_t) = t == XP_BF16 ? xp_bf16_to_f32 : xp_f16_to_f32;
    if (dec((uint16_t)hi) < s) return INFINITY;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (dec((uint16_t)mid) >= s)
            hi = mid;
        else
            lo = mid + 1;
    }
    return dec((uint16_t)lo);
}

/* Random matrix: normal draws times a per-block magnitude 10^U(-6, 3), with an all-zero block
 * now and then. */
static float *random_matrix(tu_rng *r, int64_t rows, int64_t cols, int br, int bc)
{
    float *w = malloc((size_t)(rows * cols) * sizeof *w);
    assert_non_null(w);
    int64_t nbr = xp_ceil_div(rows, br), nbc = xp_ceil_div(cols, bc);
    double *mag = malloc((size_t)(nbr * nbc) * sizeof *mag);
    assert_non_null(mag);
    for (int64_t b = 0; b < nbr * nbc; b++)
        mag[b] = tu_rng_uniform(r) < 0.05 ? 0.0 : pow(10.0, -6.0 + 9.0 * tu_rng_uniform(r));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            w[i * cols + j] = (float)(tu_rng_normal(r) * mag[(i / br) * nbc + j / bc]);
    free(mag);
    return w;
}

/* Quantizes and dequantizes w and checks every property the format promises. */
static void check_quantize(const float *w, int64_t rows, int64_t cols, int br, int bc, xp_dtype sdt)
{
    int64_t nbr = xp_ceil_div(rows, br), nbc = xp_ceil_div(cols, bc);
    uint8_t *q = malloc((size_t)(rows * cols));
    float *s = malloc((size_t)(nbr * nbc) * sizeof *s);
    float *d = malloc((size_t)(rows * cols) * sizeof *d);
    assert_true(q && s && d);
    if (xp_block_quantize(w, rows, cols, br, bc, sdt, q, s) < 0)
        fail_msg("%lldx%lld [%d,%d] %s: %s", (long long)rows, (long long)cols, br, bc,
                 xp_dtype_name(sdt), xp_last_error());
    xp_block_dequantize(q, s, rows, cols, br, bc, d);

    for (int64_t bi = 0; bi < nbr; bi++)
        for (int64_t bj = 0; bj < nbc; bj++) {
            /* the block's own extent: edge blocks are smaller and use their own amax */
            int64_t r0 = bi * br, r1 = r0 + br < rows ? r0 + br : rows;
            int64_t c0 = bj * bc, c1 = c0 + bc < cols ? c0 + bc : cols;
            float amax = 0;
            int64_t ai = r0, aj = c0;
            for (int64_t i = r0; i < r1; i++)
                for (int64_t j = c0; j < c1; j++)
                    if (fabsf(w[i * cols + j]) > amax)
                        amax = fabsf(w[i * cols + j]), ai = i, aj = j;
            float sc = s[bi * nbc + bj];
            if (!isfinite(sc) || !(sc > 0))
                fail_msg("block [%lld,%lld]: scale %g", (long long)bi, (long long)bj, sc);
            float want = amax / 448.0f; /* the F32 scale, correctly rounded */
            if (want > 0) {
                if (sdt != XP_F32) want = round_up_16(want, sdt);
                if (sc != want)
                    fail_msg("block [%lld,%lld] (%s): scale %.9g, want %.9g (amax %.9g)",
                             (long long)bi, (long long)bj, xp_dtype_name(sdt), sc, want, amax);
                if (sdt == XP_F32 && (q[ai * cols + aj] & 0x7f) != 0x7e)
                    fail_msg("block [%lld,%lld]: amax %.9g got code 0x%02x, not +-448",
                             (long long)bi, (long long)bj, amax, q[ai * cols + aj]);
            }
            for (int64_t i = r0; i < r1; i++)
                for (int64_t j = c0; j < c1; j++) {
                    double x = w[i * cols + j], y = d[i * cols + j];
                    uint8_t c = q[i * cols + j];
                    if ((c & 0x7f) == 0x7f || !isfinite(y))
                        fail_msg("[%lld,%lld]: code 0x%02x, value %g", (long long)i, (long long)j,
                                 c, y);
                    if ((float)y != (float)(xp_fp8_e4m3_table[c] * sc))
                        fail_msg("[%lld,%lld]: dequantized %.9g != code * scale", (long long)i,
                                 (long long)j, y);
                    /* half a step, plus float rounding of w/s and q*s (2^-24 relative each) */
                    double bound = 0.5 * sc * e4m3_step(c) + 0x1p-22 * (fabs(x) + fabs(y));
                    if (fabs(x - y) > bound)
                        fail_msg("%lldx%lld [%d,%d] %s at [%lld,%lld]: w %.9g deq %.9g err %.3g "
                                 "> %.3g (scale %g, code 0x%02x)",
                                 (long long)rows, (long long)cols, br, bc, xp_dtype_name(sdt),
                                 (long long)i, (long long)j, x, y, fabs(x - y), bound, sc, c);
                }
        }
    free(q);
    free(s);
    free(d);
}

static void test_error_bound_shapes(void **state)
{
    static const struct {
        int64_t rows, cols;
        int br, bc;
    } cases[] = {
        {1, 1, 128, 128},   {127, 129, 128, 128}, {300, 257, 128, 128}, {256, 256, 128, 128},
        {256, 256, 64, 64}, {300, 257, 64, 64},   {127, 129, 32, 64},   {200, 100, 32, 64},
        {65, 300, 64, 32},  {1, 1000, 128, 128},  {1000, 1, 128, 128},  {129, 129, 1, 128},
        {17, 23, 5, 7},     {64, 64, 64, 64},
    };
    const xp_dtype sdts[] = {XP_F32, XP_BF16, XP_F16};
    tu_rng r;
    tu_rng_seed(&r, 20240601);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++)
        for (size_t t = 0; t < 3; t++) {
            float *w = random_matrix(&r, cases[k].rows, cases[k].cols, cases[k].br, cases[k].bc);
            check_quantize(w, cases[k].rows, cases[k].cols, cases[k].br, cases[k].bc, sdts[t]);
            free(w);
        }
}

/* Values at every code of the grid (times the scale) and at midpoints between codes. */
static void test_error_bound_grid(void **state)
{
    const int n = 4 * 126;
    float *w = malloc((size_t)n * sizeof *w);
    assert_non_null(w);
    for (int c = 0; c < 126; c++) {
        float a = xp_fp8_e4m3_table[c], b = xp_fp8_e4m3_table[c + 1];
        w[4 * c] = a * 0.75f;
        w[4 * c + 1] = -(a + b) / 2 * 0.75f;
        w[4 * c + 2] = b * 0.75f;
        w[4 * c + 3] = nextafterf((a + b) / 2, 0.0f) * 0.75f;
    }
    for (int bc = 1; bc <= n; bc *= 3) check_quantize(w, 1, n, 1, bc, XP_F32);
    check_quantize(w, 1, n, 1, n, XP_BF16);
    check_quantize(w, 1, n, 1, n, XP_F16);
    free(w);
}

static void test_zero_blocks(void **state)
{
    const xp_dtype sdts[] = {XP_F32, XP_BF16, XP_F16};
    float w[6 * 5];
    memset(w, 0, sizeof w);
    w[0] = -0.0f;
    w[29] = 3.0f; /* only the last (ragged) block is non-zero */
    for (size_t t = 0; t < 3; t++) {
        uint8_t q[30];
        float s[4], d[30];
        assert_int_equal(xp_block_quantize(w, 6, 5, 4, 4, sdts[t], q, s), 0);
        xp_block_dequantize(q, s, 6, 5, 4, 4, d);
        for (int b = 0; b < 3; b++) assert_true(isfinite(s[b]) && s[b] > 0);
        for (int i = 0; i < 29; i++) {
            assert_true(d[i] == 0.0f);
            assert_int_equal(q[i] & 0x7f, 0);
        }
        assert_true(fabsf(d[29] - 3.0f) <= 0.5f * s[3] * 32);
    }
    /* a block so small its amax/448 underflows to zero must not divide by zero either */
    float tiny[4] = {1e-45f, -1e-45f, 0.0f, 2e-45f};
    uint8_t q[4];
    float s[1], d[4];
    assert_int_equal(xp_block_quantize(tiny, 2, 2, 2, 2, XP_F32, q, s), 0);
    xp_block_dequantize(q, s, 2, 2, 2, 2, d);
    assert_true(isfinite(s[0]) && s[0] > 0);
    for (int i = 0; i < 4; i++) assert_true(isfinite(d[i]) && fabsf(d[i] - tiny[i]) < 1e-30f);
    check_quantize(tiny, 2, 2, 2, 2, XP_F16);
}

/* Each ragged edge block gets its own scale from its own elements. */
static void test_ragged_own_amax(void **state)
{
    /* 5x7 in 4x4 blocks: [0,0] 4x4, [0,1] 4x3, [1,0] 1x4, [1,1] 1x3 */
    float w[35];
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 7; j++) w[i * 7 + j] = (float)((i < 4 ? 1 : 100) * (j < 4 ? 1 : 10));
    w[3 * 7 + 3] = -2.0f;
    uint8_t q[35];
    float s[4];
    assert_int_equal(xp_block_quantize(w, 5, 7, 4, 4, XP_F32, q, s), 0);
    assert_true(s[0] == 2.0f / 448.0f);
    assert_true(s[1] == 10.0f / 448.0f);
    assert_true(s[2] == 100.0f / 448.0f);
    assert_true(s[3] == 1000.0f / 448.0f);
    assert_int_equal(q[3 * 7 + 3], 0xfe);
    assert_int_equal(q[4 * 7 + 6], 0x7e);
    check_quantize(w, 5, 7, 4, 4, XP_F32);
    check_quantize(w, 5, 7, 4, 4, XP_BF16);
}

static void test_nonfinite_refused(void **state)
{
    const float bad[] = {NAN, INFINITY, -INFINITY};
    float w[10 * 12];
    uint8_t q[120];
    float s[9];
    for (int i = 0; i < 120; i++) w[i] = (float)i - 60;
    for (size_t k = 0; k < 3; k++) {
        w[7 * 12 + 9] = bad[k];
        xp_clear_error();
        assert_int_equal(xp_block_quantize(w, 10, 12, 4, 4, XP_F32, q, s), -1);
        assert_error_contains("[7, 9]");
        assert_error_contains(isnan(bad[k]) ? "nan" : "inf");
    }
    /* F16 scales cannot hold 1e30 / 448: refused rather than stored as Inf */
    float big[4] = {1e30f, 1, 2, 3};
    xp_clear_error();
    assert_int_equal(xp_block_quantize(big, 2, 2, 2, 2, XP_F16, q, s), -1);
    assert_error_contains("F16");
    assert_int_equal(xp_block_quantize(big, 2, 2, 2, 2, XP_BF16, q, s), 0);
    assert_true(isfinite(s[0]));
}

static void test_scale_round_up(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 99);
    for (int i = 0; i < 20000; i++) {
        float x = (float)pow(10.0, -9.0 + 13.0 * tu_rng_uniform(&r));
        assert_true(xp_scale_round_up(x, XP_F32) == x);
        float b = xp_scale_round_up(x, XP_BF16), h = xp_scale_round_up(x, XP_F16);
        if (b != round_up_16(x, XP_BF16)) fail_msg("bf16 round up of %.9g: %.9g", x, b);
        if (h != round_up_16(x, XP_F16)) fail_msg("f16 round up of %.9g: %.9g", x, h);
    }
    /* exactly representable values stay as they are */
    assert_true(xp_scale_round_up(1.0f, XP_BF16) == 1.0f);
    assert_true(xp_scale_round_up(0x1p-24f, XP_F16) == 0x1p-24f);
    assert_true(xp_scale_round_up(1e-9f, XP_F16) == 0x1p-24f); /* below the smallest f16 */
    assert_true(xp_scale_round_up(65504.0f, XP_F16) == 65504.0f);
    assert_true(isinf(xp_scale_round_up(65504.5f, XP_F16)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_bound_shapes), cmocka_unit_test(test_error_bound_grid),
        cmocka_unit_test(test_zero_blocks),        cmocka_unit_test(test_ragged_own_amax),
        cmocka_unit_test(test_nonfinite_refused),  cmocka_unit_test(test_scale_round_up),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
