/* Element types as safetensors names them, and the scalar conversions between the float ones. */
#ifndef XP_DTYPE_H
#define XP_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
    XP_BOOL,
    XP_U8,
    XP_I8,
    XP_I16,
    XP_U16,
    XP_I32,
    XP_U32,
    XP_I64,
    XP_U64,
    XP_F8_E4M3,
    XP_F8_E5M2,
    XP_F16,
    XP_BF16,
    XP_F32,
    XP_F64,
    XP_DTYPE_COUNT
} xp_dtype;

/* Size of one element in bytes. */
size_t xp_dtype_size(xp_dtype t);
/* The safetensors spelling ("BF16", "F8_E4M3", ...). */
const char *xp_dtype_name(xp_dtype t);
/* Parses a safetensors dtype string; returns -1 for an unknown one. */
int xp_dtype_parse(const char *s, xp_dtype *out);
/* True for the types a weight matrix may have (F8_E4M3, F16, BF16, F32). */
int xp_dtype_is_float(xp_dtype t);

static inline float xp_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t xp_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float xp_f16_to_f32(uint16_t h);
uint16_t xp_f32_to_f16(float f);

/* Converts n elements of a float type (F16, BF16, F32, F64, F8_E4M3) to F32. */
int xp_convert_to_f32(xp_dtype t, const void *src, float *dst, size_t n);

#endif
