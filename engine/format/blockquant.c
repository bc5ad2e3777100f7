#include "format/blockquant.h"
#include "format/fp8.h"
#include "util/xp_error.h"

#include <math.h>

float xp_scale_round_up(float s, xp_dtype scale_dtype)
{
    switch (scale_dtype) {
    case XP_BF16: {
        /* positive values: the next code up is the next larger value */
        uint16_t h = xp_f32_to_bf16(s);
        return xp_bf16_to_f32(h) < s ? xp_bf16_to_f32((uint16_t)(h + 1)) : xp_bf16_to_f32(h);
    }
    case XP_F16: {
        uint16_t h = xp_f32_to_f16(s);
        return xp_f16_to_f32(h) < s ? xp_f16_to_f32((uint16_t)(h + 1)) : xp_f16_to_f32(h);
    }
    default:
        return s;
    }
}

int xp_block_quantize(const float *w, int64_t rows, int64_t cols, int br, int bc,
                      xp_dtype scale_dtype, uint8_t *q, float *scales)
{
    if (br < 1 || bc < 1) return xp_fail("block size %dx%d", br, bc);
    int64_t nbr = xp_ceil_div(rows, br), nbc = xp_ceil_div(cols, bc);
    for (int64_t bi = 0; bi < nbr; bi++) {
        int64_t r0 = bi * br, r1 = r0 + br < rows ? r0 + br : rows;
        for (int64_t bj = 0; bj < nbc; bj++) {
            int64_t c0 = bj * bc, c1 = c0 + bc < cols ? c0 + bc : cols;
            float amax = 0;
            for (int64_t i = r0; i < r1; i++)
                for (int64_t j = c0; j < c1; j++) {
                    float a = fabsf(w[i * cols + j]);
                    if (!isfinite(a))
                        return xp_fail("non-finite value %g at [%lld, %lld]", w[i * cols + j],
                                       (long long)i, (long long)j);
                    if (a > amax) amax = a;
                }
            float s = amax / XP_FP8_E4M3_MAX;
            /* zero (or so tiny the division underflows) block: any scale reproduces it */
            if (!(s > 0)) s = 1.0f;
            s = xp_scale_round_up(s, scale_dtype);
            if (!isfinite(s) || !(s > 0))
                return xp_fail("block [%lld, %lld] has amax %g, which %s scales cannot hold",
                               (long long)bi, (long long)bj, amax, xp_dtype_name(scale_dtype));
            scales[bi * nbc + bj] = s;
            for (int64_t i = r0; i < r1; i++)
                for (int64_t j = c0; j < c1; j++)
                    q[i * cols + j] = xp_f32_to_fp8_e4m3(w[i * cols + j] / s);
        }
    }
    return 0;
}

void xp_block_dequantize(const uint8_t *q, const float *scales, int64_t rows, int64_t cols, int br,
                         int bc, float *w)
{
    int64_t nbc = xp_ceil_div(cols, bc);
    for (int64_t i = 0; i < rows; i++) {
        const float *srow = scales + (i / br) * nbc;
        for (int64_t j = 0; j < cols; j++)
            w[i * cols + j] = xp_fp8_e4m3_to_f32(q[i * cols + j]) * srow[j / bc];
    }
}
