/* FP8 E4M3FN, BF16 and F16 scalar conversions, checked against the format definitions. */
#include "testutil.h"

#include "format/dtype.h"
#include "format/fp8.h"

#include <math.h>
#include <stdio.h>

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* E4M3FN from its fields: bias 7, no infinities, S.1111.111 is NaN. */
static double e4m3_ref(unsigned c)
{
    unsigned s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return NAN;
    double v = e == 0 ? ldexp((double)m, -9) : ldexp((double)(8 + m), (int)e - 10);
    return s ? -v : v;
}

/* IEEE binary16 from its fields. */
static double f16_ref(unsigned h)
{
    unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -24);
    else
        v = ldexp((double)(1024 + m), (int)e - 25);
    return s ? -v : v;
}

/* bfloat16 from its fields (8 exponent bits, bias 127, 7 mantissa bits). */
static double bf16_ref(unsigned h)
{
    unsigned s = h >> 15, e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 255)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp((double)m, -133);
    else
        v = ldexp((double)(128 + m), (int)e - 134);
    return s ? -v : v;
}

/* Same value, and the same sign for zeros; NaN only matches NaN. */
static void assert_same(double want, float got, const char *what, unsigned code)
{
    if (isnan(want)) {
        if (!isnan(got)) fail_msg("%s 0x%x: got %g, want NaN", what, code, got);
        return;
    }
    if ((double)got != want || !signbit(got) != !signbit(want))
        fail_msg("%s 0x%x: got %.9g, want %.9g", what, code, got, want);
}

/* ------------------------------------------------------------------ E4M3 */

static void test_e4m3_table_all_codes(void **state)
{
    for (unsigned c = 0; c < 256; c++) {
        assert_same(e4m3_ref(c), xp_fp8_e4m3_table[c], "e4m3 table", c);
        assert_same(e4m3_ref(c), xp_fp8_e4m3_to_f32((uint8_t)c), "e4m3 decode", c);
    }
    /* landmarks of the format, independent of either computation */
    assert_true(xp_fp8_e4m3_table[0x7e] == 448.0f);
    assert_true(xp_fp8_e4m3_table[0xfe] == -448.0f);
    assert_true(xp_fp8_e4m3_table[0x01] == 0x1p-9f);
    assert_true(xp_fp8_e4m3_table[0x07] == 7 * 0x1p-9f);
    assert_true(xp_fp8_e4m3_table[0x08] == 0x1p-6f);
    assert_true(xp_fp8_e4m3_table[0x38] == 1.0f);
    assert_true(xp_fp8_e4m3_table[0x00] == 0.0f && !signbit(xp_fp8_e4m3_table[0x00]));
    assert_true(xp_fp8_e4m3_table[0x80] == 0.0f && signbit(xp_fp8_e4m3_table[0x80]));
    int nans = 0;
    for (unsigned c = 0; c < 256; c++) nans += isnan(xp_fp8_e4m3_table[c]) != 0;
    assert_int_equal(nans, 2);
    assert_true(isnan(xp_fp8_e4m3_table[0x7f]) && isnan(xp_fp8_e4m3_table[0xff]));
    /* positive codes increase strictly with the code */
    for (unsigned c = 1; c < 0x7f; c++)
        assert_true(xp_fp8_e4m3_table[c] > xp_fp8_e4m3_table[c - 1]);
    assert_true(XP_FP8_E4M3_MAX == 448.0f);
}

static void test_e4m3_roundtrip(void **state)
{
    for (unsigned c = 0; c < 256; c++) {
        if ((c & 0x7f) == 0x7f) continue;
        uint8_t got = xp_f32_to_fp8_e4m3(xp_fp8_e4m3_table[c]);
        if (got != c) fail_msg("code 0x%02x (%g) encodes to 0x%02x", c, xp_fp8_e4m3_table[c], got);
    }
}

/* Every midpoint between adjacent codes (subnormal and normal, both signs) rounds to the even
 * code, and the floats just either side of it to the nearer code. */
static void test_e4m3_midpoints(void **state)
{
    for (unsigned c = 0; c < 0x7e; c++) {
        double lo = e4m3_ref(c), hi = e4m3_ref(c + 1);
        float mid = (float)((lo + hi) / 2); /* exact: 4 significant bits at most */
        assert_true((double)mid == (lo + hi) / 2);
        unsigned even = (c & 1) ? c + 1 : c;
        float above = nextafterf(mid, INFINITY), below = nextafterf(mid, 0.0f);
        for (unsigned s = 0; s <= 0x80; s += 0x80) {
            float sg = s ? -1.0f : 1.0f;
            uint8_t got = xp_f32_to_fp8_e4m3(sg * mid);
            if (got != (s | even))
                fail_msg("midpoint %.9g between 0x%02x and 0x%02x -> 0x%02x, want 0x%02x", sg * mid,
                         s | c, s | (c + 1), got, s | even);
            got = xp_f32_to_fp8_e4m3(sg * above);
            if (got != (s | (c + 1)))
                fail_msg("%.9g (just above a midpoint) -> 0x%02x, want 0x%02x", sg * above, got,
                         s | (c + 1));
            got = xp_f32_to_fp8_e4m3(sg * below);
            if (got != (s | c))
                fail_msg("%.9g (just below a midpoint) -> 0x%02x, want 0x%02x", sg * below, got,
                         s | c);
        }
    }
}

/* Random floats against a brute-force nearest-code search (ties to even). */
static void test_e4m3_random_nearest(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 8);
    for (int i = 0; i < 200000; i++) {
        float x = (float)ldexp(tu_rng_uniform(&r), (int)(tu_rng_u64(&r) % 24) - 14);
        if (x >= 448.0f) continue;
        unsigned best = 0;
        double bd = INFINITY;
        for (unsigned c = 0; c < 0x7f; c++) {
            double d = fabs((double)x - e4m3_ref(c));
            if (d < bd || (d == bd && !(c & 1))) bd = d, best = c;
        }
        uint8_t got = xp_f32_to_fp8_e4m3(x);
        if (got != best) fail_msg("%.9g -> 0x%02x, nearest is 0x%02x", x, got, best);
        assert_int_equal(xp_f32_to_fp8_e4m3(-x), 0x80 | best);
    }
}

static void test_e4m3_saturation(void **state)
{
    const float big[] = {448.0f,  nextafterf(448.0f, INFINITY),
                         450.0f,  463.99f,
                         464.0f,  465.0f,
                         480.0f,  1e6f,
                         3.4e38f, INFINITY};
    for (size_t i = 0; i < sizeof big / sizeof *big; i++) {
        if (xp_f32_to_fp8_e4m3(big[i]) != 0x7e) fail_msg("%g does not saturate to 448", big[i]);
        if (xp_f32_to_fp8_e4m3(-big[i]) != 0xfe) fail_msg("%g does not saturate to -448", -big[i]);
    }
    /* just below 448: still in range, nearest code */
    assert_int_equal(xp_f32_to_fp8_e4m3(447.0f), 0x7e);
    assert_int_equal(xp_f32_to_fp8_e4m3(431.0f), 0x7d);
    assert_int_equal(xp_f32_to_fp8_e4m3(432.0f), 0x7e); /* tie, 0x7e is even */
}

static void test_e4m3_nan(void **state)
{
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7fbfffffu, 0x7fffffffu, 0x7fa00000u};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        assert_int_equal(xp_f32_to_fp8_e4m3(float_of(nans[i])), 0x7f);
        assert_int_equal(xp_f32_to_fp8_e4m3(float_of(nans[i] | 0x80000000u)), 0xff);
    }
    assert_true(isnan(xp_fp8_e4m3_to_f32(xp_f32_to_fp8_e4m3(NAN))));
}

static void test_e4m3_tiny(void **state)
{
    /* below 2^-10 (half the smallest subnormal): zero, keeping the sign */
    const float tiny[] = {0.0f, 1e-45f, 1e-30f, 0x1p-11f, nextafterf(0x1p-10f, 0.0f)};
    for (size_t i = 0; i < sizeof tiny / sizeof *tiny; i++) {
        assert_int_equal(xp_f32_to_fp8_e4m3(tiny[i]), 0x00);
        assert_int_equal(xp_f32_to_fp8_e4m3(-tiny[i]), 0x80);
    }
    assert_int_equal(xp_f32_to_fp8_e4m3(0x1p-10f), 0x00); /* tie: 0 is even */
    assert_int_equal(xp_f32_to_fp8_e4m3(-0x1p-10f), 0x80);
    assert_int_equal(xp_f32_to_fp8_e4m3(nextafterf(0x1p-10f, 1.0f)), 0x01);
    assert_int_equal(xp_f32_to_fp8_e4m3(-nextafterf(0x1p-10f, 1.0f)), 0x81);
    assert_int_equal(xp_f32_to_fp8_e4m3(3 * 0x1p-10f), 0x02); /* tie between 1 and 2 */
    assert_int_equal(xp_f32_to_fp8_e4m3(0x1p-9f), 0x01);
}

/* ------------------------------------------------------------------ BF16 */

static void test_bf16_decode_all(void **state)
{
    for (unsigned h = 0; h < 65536; h++)
        assert_same(bf16_ref(h), xp_bf16_to_f32((uint16_t)h), "bf16 decode", h);
}

static void test_bf16_roundtrip_and_midpoints(void **state)
{
    for (unsigned h = 0; h < 65536; h++) {
        if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue; /* NaN */
        uint16_t got = xp_f32_to_bf16(xp_bf16_to_f32((uint16_t)h));
        if (got != h) fail_msg("bf16 0x%04x round-trips to 0x%04x", h, got);
    }
    /* midpoints between h and h+1 for every finite h, Inf as the neighbour of the largest */
    for (unsigned h = 0; h < 0x7f80; h++) {
        for (unsigned s = 0; s <= 0x8000; s += 0x8000) {
            uint32_t lo = (uint32_t)(s | h) << 16;
            unsigned even = (h & 1) ? h + 1 : h;
            uint16_t got = xp_f32_to_bf16(float_of(lo | 0x8000u));
            if (got != (s | even)) fail_msg("bf16 midpoint above 0x%04x -> 0x%04x", s | h, got);
            assert_int_equal(xp_f32_to_bf16(float_of(lo | 0x8001u)), s | (h + 1));
            assert_int_equal(xp_f32_to_bf16(float_of(lo | 0x7fffu)), s | h);
        }
    }
}

static void test_bf16_special(void **state)
{
    assert_int_equal(xp_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(xp_f32_to_bf16(-INFINITY), 0xff80);
    assert_int_equal(xp_f32_to_bf16(0.0f), 0x0000);
    assert_int_equal(xp_f32_to_bf16(-0.0f), 0x8000);
    assert_int_equal(xp_f32_to_bf16(3.4028235e38f), 0x7f80); /* FLT_MAX rounds past the top */
    assert_int_equal(xp_f32_to_bf16(1e-45f), 0x0000);        /* smallest float subnormal */
    assert_int_equal(xp_f32_to_bf16(1.0f), 0x3f80);
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7f80ffffu, 0x7fffffffu, 0xff800001u};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        uint16_t b = xp_f32_to_bf16(float_of(nans[i]));
        if (!isnan(xp_bf16_to_f32(b))) fail_msg("NaN 0x%08x -> bf16 0x%04x", nans[i], b);
        assert_int_equal(b >> 15, nans[i] >> 31);
    }
}

/* ------------------------------------------------------------------ F16 */

static void test_f16_decode_all(void **state)
{
    for (unsigned h = 0; h < 65536; h++)
        assert_same(f16_ref(h), xp_f16_to_f32((uint16_t)h), "f16 decode", h);
}

static void test_f16_roundtrip_exhaustive(void **state)
{
    for (unsigned h = 0; h < 65536; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue; /* NaN */
        uint16_t got = xp_f32_to_f16(xp_f16_to_f32((uint16_t)h));
        if (got != h) fail_msg("f16 0x%04x round-trips to 0x%04x", h, got);
    }
}

static void test_f16_midpoints(void **state)
{
    /* h = 0x7bff (65504) has Inf above it: the midpoint 65520 is a tie that goes to Inf (even) */
    for (unsigned h = 0; h < 0x7c00; h++) {
        double lo = f16_ref(h), hi = f16_ref(h + 1);
        float mid = (float)((lo + hi) / 2);
        if (h == 0x7bff)
            mid = 65520.0f;
        else
            assert_true((double)mid == (lo + hi) / 2);
        unsigned even = (h & 1) ? h + 1 : h;
        for (unsigned s = 0; s <= 0x8000; s += 0x8000) {
            float sg = s ? -1.0f : 1.0f;
            uint16_t got = xp_f32_to_f16(sg * mid);
            if (got != (s | even))
                fail_msg("f16 midpoint %.9g above 0x%04x -> 0x%04x", sg * mid, s | h, got);
            got = xp_f32_to_f16(sg * nextafterf(mid, INFINITY));
            if (got != (s | (h + 1))) fail_msg("just above midpoint over 0x%04x -> 0x%04x", h, got);
            got = xp_f32_to_f16(sg * nextafterf(mid, 0.0f));
            if (got != (s | h)) fail_msg("just below midpoint over 0x%04x -> 0x%04x", h, got);
        }
    }
}

static void test_f16_special(void **state)
{
    assert_int_equal(xp_f32_to_f16(INFINITY), 0x7c00);
    assert_int_equal(xp_f32_to_f16(-INFINITY), 0xfc00);
    assert_int_equal(xp_f32_to_f16(1e6f), 0x7c00);
    assert_int_equal(xp_f32_to_f16(-1e6f), 0xfc00);
    assert_int_equal(xp_f32_to_f16(65504.0f), 0x7bff);
    assert_int_equal(xp_f32_to_f16(65519.99f), 0x7bff);
    assert_int_equal(xp_f32_to_f16(-0.0f), 0x8000);
    /* below half the smallest subnormal (2^-25): zero; 2^-25 itself ties to zero */
    assert_int_equal(xp_f32_to_f16(1e-45f), 0x0000);
    assert_int_equal(xp_f32_to_f16(0x1p-26f), 0x0000);
    assert_int_equal(xp_f32_to_f16(0x1p-25f), 0x0000);
    assert_int_equal(xp_f32_to_f16(nextafterf(0x1p-25f, 1.0f)), 0x0001);
    assert_int_equal(xp_f32_to_f16(-0x1p-24f), 0x8001);
    assert_int_equal(xp_f32_to_f16(0x1p-14f), 0x0400); /* smallest normal */
    assert_int_equal(xp_f32_to_f16(nextafterf(0x1p-14f, 0.0f)), 0x0400);
    const uint32_t nans[] = {0x7fc00000u, 0x7f800001u, 0x7f801fffu, 0x7fffffffu, 0xff800001u};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        uint16_t h = xp_f32_to_f16(float_of(nans[i]));
        if ((h & 0x7c00) != 0x7c00 || !(h & 0x3ff))
            fail_msg("NaN 0x%08x -> f16 0x%04x", nans[i], h);
        assert_int_equal(h >> 15, nans[i] >> 31);
    }
}

/* Random floats across the whole f16 range against a nearest search in double. */
static void test_f16_random_nearest(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 16);
    for (int i = 0; i < 200000; i++) {
        float x = float_of((uint32_t)(tu_rng_u64(&r) % 0x477ff000u)); /* positive, below 65520 */
        uint16_t got = xp_f32_to_f16(x);
        double v = f16_ref(got), d = fabs((double)x - v);
        /* neighbours must not be nearer (nor as near with an even code) */
        for (int k = -1; k <= 1; k += 2) {
            int nb = (int)got + k;
            if (nb < 0 || nb >= 0x7c00) continue;
            double dn = fabs((double)x - f16_ref((unsigned)nb));
            if (dn < d || (dn == d && (got & 1)))
                fail_msg("%.9g -> f16 0x%04x, but 0x%04x is nearer", x, got, nb);
        }
    }
    (void)bits_of;
}

/* ------------------------------------------------------------------ dtype table + convert */

static void test_dtype_names(void **state)
{
    for (int t = 0; t < XP_DTYPE_COUNT; t++) {
        xp_dtype back;
        assert_int_equal(xp_dtype_parse(xp_dtype_name((xp_dtype)t), &back), 0);
        assert_int_equal(back, t);
        assert_true(xp_dtype_size((xp_dtype)t) >= 1 && xp_dtype_size((xp_dtype)t) <= 8);
    }
    xp_dtype d;
    assert_int_equal(xp_dtype_parse("F8_E4M3", &d), 0);
    assert_int_equal(d, XP_F8_E4M3);
    assert_int_equal(xp_dtype_size(XP_BF16), 2);
    assert_int_equal(xp_dtype_size(XP_F64), 8);
    assert_int_equal(xp_dtype_parse("bf16", &d), -1);
    assert_int_equal(xp_dtype_parse("F8_E4M3FN", &d), -1);
    assert_int_equal(xp_dtype_parse("", &d), -1);
}

static void test_convert_to_f32(void **state)
{
    const uint16_t b16[3] = {0x3f80, 0xc000, 0x7f80};
    const uint16_t h16[3] = {0x3c00, 0xc000, 0x0001};
    const uint8_t f8[3] = {0x38, 0xfe, 0x01};
    const double f64[3] = {1.5, -2.0, 1e300};
    float out[3];
    assert_int_equal(xp_convert_to_f32(XP_BF16, b16, out, 3), 0);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && isinf(out[2]));
    assert_int_equal(xp_convert_to_f32(XP_F16, h16, out, 3), 0);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0x1p-24f);
    assert_int_equal(xp_convert_to_f32(XP_F8_E4M3, f8, out, 3), 0);
    assert_true(out[0] == 1.0f && out[1] == -448.0f && out[2] == 0x1p-9f);
    assert_int_equal(xp_convert_to_f32(XP_F64, f64, out, 3), 0);
    assert_true(out[0] == 1.5f && out[1] == -2.0f && isinf(out[2]));
    /* unaligned source: the mapping of a foreign file need not align tensors */
    unsigned char raw[7] = {0};
    memcpy(raw + 1, b16, 6);
    assert_int_equal(xp_convert_to_f32(XP_BF16, raw + 1, out, 3), 0);
    assert_true(out[0] == 1.0f && out[1] == -2.0f);
    assert_int_equal(xp_convert_to_f32(XP_I32, raw, out, 1), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_table_all_codes),
        cmocka_unit_test(test_e4m3_roundtrip),
        cmocka_unit_test(test_e4m3_midpoints),
        cmocka_unit_test(test_e4m3_random_nearest),
        cmocka_unit_test(test_e4m3_saturation),
        cmocka_unit_test(test_e4m3_nan),
        cmocka_unit_test(test_e4m3_tiny),
        cmocka_unit_test(test_bf16_decode_all),
        cmocka_unit_test(test_bf16_roundtrip_and_midpoints),
        cmocka_unit_test(test_bf16_special),
        cmocka_unit_test(test_f16_decode_all),
        cmocka_unit_test(test_f16_roundtrip_exhaustive),
        cmocka_unit_test(test_f16_midpoints),
        cmocka_unit_test(test_f16_special),
        cmocka_unit_test(test_f16_random_nearest),
        cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_convert_to_f32),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
