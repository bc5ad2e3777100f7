/* FP8 E4M3 block quantization (the thesis's Method C, as in Qwen/DeepSeek FP8 checkpoints):
 * a [rows, cols] matrix is cut into br x bc blocks (edge blocks may be smaller), each with one scale
 * s = amax(block) / 448, codes q = sat(W / s), and W ~ q * s. */
#ifndef XP_BLOCKQUANT_H
#define XP_BLOCKQUANT_H

#include "format/dtype.h"

#include <stdint.h>

static inline int64_t xp_ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* Quantizes w. scales gets ceil(rows/br) x ceil(cols/bc) values, each exactly representable in
 * scale_dtype (F32, BF16 or F16) and rounded up when stored narrower, so no value saturates
 * because of the scale's own rounding. An all-zero block gets scale 1 (codes 0): no NaN or Inf.
 * Non-finite input is refused (-1, message names the element). */
int xp_block_quantize(const float *w, int64_t rows, int64_t cols, int br, int bc,
                      xp_dtype scale_dtype, uint8_t *q, float *scales);

/* w = q * s, block by block. */
void xp_block_dequantize(const uint8_t *q, const float *scales, int64_t rows, int64_t cols, int br,
                         int bc, float *w);

/* Rounds a positive scale up to the nearest value scale_dtype can hold. */
float xp_scale_round_up(float s, xp_dtype scale_dtype);

#endif
