#include "format/dtype.h"
#include "format/fp8.h"

#include <math.h>

static const struct {
    const char *name;
    size_t size;
} xp_dtypes[XP_DTYPE_COUNT] = {
    [XP_BOOL] = {"BOOL", 1},    [XP_U8] = {"U8", 1},   [XP_I8] = {"I8", 1},
    [XP_I16] = {"I16", 2},      [XP_U16] = {"U16", 2}, [XP_I32] = {"I32", 4},
    [XP_U32] = {"U32", 4},      [XP_I64] = {"I64", 8}, [XP_U64] = {"U64", 8},
    [XP_F8_E4M3] = {"F8_E4M3", 1}, [XP_F8_E5M2] = {"F8_E5M2", 1}, [XP_F16] = {"F16", 2},
    [XP_BF16] = {"BF16", 2},    [XP_F32] = {"F32", 4}, [XP_F64] = {"F64", 8},
};

size_t xp_dtype_size(xp_dtype t)
{
    return (unsigned)t < XP_DTYPE_COUNT ? xp_dtypes[t].size : 0;
}

const char *xp_dtype_name(xp_dtype t)
{
    return (unsigned)t < XP_DTYPE_COUNT ? xp_dtypes[t].name : "?";
}

int xp_dtype_parse(const char *s, xp_dtype *out)
{
    for (int i = 0; i < XP_DTYPE_COUNT; i++) {
        if (strcmp(s, xp_dtypes[i].name) == 0) {
            *out = (xp_dtype)i;
            return 0;
        }
    }
    return -1;
}

int xp_dtype_is_float(xp_dtype t)
{
    return t == XP_F8_E4M3 || t == XP_F16 || t == XP_BF16 || t == XP_F32;
}

float xp_f16_to_f32(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v;
    if (exp == 0)
        v = ldexpf((float)man, -24);
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else
        v = ldexpf((float)(man | 0x400), exp - 25);
    return sign ? -v : v;
}

uint16_t xp_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* rounds past 65504: Inf */
    if (a < 0x38800000u) {                       /* below 2^-14: subnormal or zero */
        float m = fabsf(f) * 16777216.0f;        /* in units of 2^-24, exact */
        return sign | (uint16_t)lrintf(m);       /* lrintf rounds to even */
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

int xp_convert_to_f32(xp_dtype t, const void *src, float *dst, size_t n)
{
    const unsigned char *p = src;
    switch (t) {
    case XP_F32:
        memcpy(dst, src, n * 4);
        return 0;
    case XP_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
        return 0;
    case XP_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = xp_bf16_to_f32(h);
        }
        return 0;
    case XP_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = xp_f16_to_f32(h);
        }
        return 0;
    case XP_F8_E4M3:
        for (size_t i = 0; i < n; i++) dst[i] = xp_fp8_e4m3_to_f32(p[i]);
        return 0;
    default:
        return -1;
    }
}
