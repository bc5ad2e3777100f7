/* FP8 E4M3FN (the "fn" variant: no infinities, one NaN pattern per sign, max 448), as used by
 * Qwen, DeepSeek and compressed-tensors checkpoints. */
#ifndef XP_FP8_H
#define XP_FP8_H

#include <stdint.h>
#include <string.h>

#define XP_FP8_E4M3_MAX 448.0f

/* Exact values of all 256 codes; 0x7f and 0xff are NaN. */
extern const float xp_fp8_e4m3_table[256];

static inline float xp_fp8_e4m3_to_f32(uint8_t c)
{
    return xp_fp8_e4m3_table[c];
}

/* Round to nearest even after clamping to [-448, 448] (as transformers and DeepSeek do: values
 * past the largest code saturate instead of becoming NaN). NaN stays NaN. */
static inline uint8_t xp_f32_to_fp8_e4m3(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7f;
    if (a >= 0x43e00000u) return sign | 0x7e; /* |f| >= 448, Inf included */
    if (a < 0x3c800000u) {                    /* |f| < 2^-6: subnormal steps of 2^-9 */
        float m;
        uint32_t b = a;
        memcpy(&m, &b, 4);
        /* m * 512 is exact; adding 2^23 and subtracting rounds to an integer, ties to even */
        float r = (m * 512.0f + 8388608.0f) - 8388608.0f;
        return sign | (uint8_t)r;
    }
    uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u); /* round 23 mantissa bits to 3 */
    return sign | (uint8_t)((r >> 20) - (120u << 3));
}

#endif
