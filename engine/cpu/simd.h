/* The vector kernels behind kernels.h, one set per instruction-set level. Within a level every
 * output element of a matrix product is summed in one fixed order (linear_body.h), so the
 * few-row (register decoding) and many-row (tile) paths give the same bits for the same row. */
#ifndef XP_SIMD_H
#define XP_SIMD_H

#include "model/model.h"

#include <stdint.h>

/* Element i of a vector held as F32 or BF16 (the scalar tails of the vector kernels). */
static inline float xp_load1(const void *a, int64_t i, const int bf16)
{
    return bf16 ? xp_bf16_to_f32(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

typedef struct {
    float (*dot)(const float *a, const float *b, int64_t n);
    /* y[i, r0 + a] = w_a . x_i for nw decoded F32 weight rows w and n input rows x (both with
     * row stride k), y with row stride ldy; prefetching pf_bytes at pf meanwhile */
    void (*tile_rows)(const float *w, int64_t nw, const float *x, int n, int64_t k, float *y,
                      int64_t ldy, int64_t r0, const void *pf, int64_t pf_bytes);
    /* y[i * ldy + r] for weight rows [r0, r1) and n <= fused_max x rows, decoding W in
     * registers */
    void (*fused_rows)(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n, float *y,
                       int64_t ldy);
    /* xp_lora_expand (kernels.h) */
    void (*lora_expand)(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len);
    void (*decode_row)(const xp_linear *l, int64_t r, float *dst);
    void (*axpy)(float a, const float *x, float *y, int64_t n);
    /* the same two with BF16 weights (LoRA factors as stored) */
    float (*dot_bf16)(const uint16_t *a, const float *b, int64_t n);
    void (*axpy_bf16)(float a, const uint16_t *x, float *y, int64_t n);
    /* xp_exp_sum (kernels.h) */
    float (*exp_sum)(float *s, int n, float m);
    int fp8_chunk; /* lanes: FP8 block widths must be a multiple for fused_rows */
    int fused_max; /* the most input rows fused_rows takes */
} xp_simd;

float xp_dot_avx2(const float *a, const float *b, int64_t n);
void xp_tile_rows_avx2(const float *w, int64_t nw, const float *x, int n, int64_t k, float *y,
                       int64_t ldy, int64_t r0, const void *pf, int64_t pf_bytes);
void xp_fused_rows_avx2(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n,
                        float *y, int64_t ldy);
void xp_lora_expand_avx2(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len);
float xp_exp_sum_avx2(float *s, int n, float m);
void xp_decode_row_avx2(const xp_linear *l, int64_t r, float *dst);
void xp_axpy_avx2(float a, const float *x, float *y, int64_t n);
float xp_dot_bf16_avx2(const uint16_t *a, const float *b, int64_t n);
void xp_axpy_bf16_avx2(float a, const uint16_t *x, float *y, int64_t n);

float xp_dot_avx512(const float *a, const float *b, int64_t n);
void xp_tile_rows_avx512(const float *w, int64_t nw, const float *x, int n, int64_t k, float *y,
                         int64_t ldy, int64_t r0, const void *pf, int64_t pf_bytes);
void xp_fused_rows_avx512(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n,
                        float *y, int64_t ldy);
void xp_lora_expand_avx512(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len);
float xp_exp_sum_avx512(float *s, int n, float m);
void xp_decode_row_avx512(const xp_linear *l, int64_t r, float *dst);
void xp_axpy_avx512(float a, const float *x, float *y, int64_t n);
float xp_dot_bf16_avx512(const uint16_t *a, const float *b, int64_t n);
void xp_axpy_bf16_avx512(float a, const uint16_t *x, float *y, int64_t n);

#endif
