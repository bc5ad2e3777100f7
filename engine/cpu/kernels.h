/* CPU kernels. Each has a plain scalar reference; the AVX2/FMA/F16C and AVX-512 versions are
 * chosen at run time when the processor has them, and tests/unit/test_cpu_kernels.c compares
 * them. */
#ifndef XP_CPU_KERNELS_H
#define XP_CPU_KERNELS_H

#include "model/model.h"
#include "cpu/pool.h"

#include <stddef.h>

/* 1 when the AVX2 (or wider) kernels are in use: processor support, and XPREC_SIMD not set to
 * scalar. */
int xp_cpu_have_avx2(void);
/* Forces the scalar kernels (tests) or restores automatic choice. */
void xp_cpu_force_scalar(int on);

/* Row r of W as F32, cols values. */
void xp_decode_row(const xp_linear *l, int64_t r, float *dst);
void xp_decode_row_ref(const xp_linear *l, int64_t r, float *dst);

float xp_dot(const float *a, const float *b, int64_t n);
float xp_dot_ref(const float *a, const float *b, int64_t n);

/* y += a x, element by element (the LoRA expand); the vector versions fuse the multiply-add. */
void xp_axpy(float a, const float *x, float *y, int64_t n);
void xp_axpy_ref(float a, const float *x, float *y, int64_t n);

/* The LoRA kernels for factors held as BF16: a is decoded to F32 on the fly. */
float xp_dot_bf16(const uint16_t *a, const float *b, int64_t n);
float xp_dot_bf16_ref(const uint16_t *a, const float *b, int64_t n);
void xp_axpy_bf16(float a, const uint16_t *x, float *y, int64_t n);
void xp_axpy_bf16_ref(float a, const uint16_t *x, float *y, int64_t n);

/* Scratch one thread of xp_linear_forward needs, in floats, for weights up to max_cols wide. */
size_t xp_linear_scratch_floats(int64_t max_cols);

/* y[i * ldy + r] = x_i . W_r for weight rows [r0, r1) and n rows of x (stride cols), on the
 * calling thread, with scratch of xp_linear_scratch_floats(l->cols) floats: the same bits
 * xp_linear_forward gives for those elements. */
void xp_linear_rows(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n, float *y,
                    int64_t ldy, float *scratch);

/* The LoRA expand for n rows: out[i * ldo + o] += sum over k < rank of t[i * ldt + k] *
 * Bt[k * ldb + o] for o in [o0, o0 + len), Bt BF16 or F32. Each element is summed in k order
 * from zero and added once (the vector levels fuse each multiply-add, as xp_axpy does), so a
 * row's outputs do not depend on the other rows. */
void xp_lora_expand(const void *bt, int bf16, int64_t ldb, int rank, const float *t, int64_t ldt,
                    int n, float *out, int64_t ldo, int64_t o0, int64_t len);
void xp_lora_expand_ref(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len);

/* s[p] = e^(s[p] - m) for p < n, m >= every s[p]; returns their sum, in p order. */
float xp_exp_sum(float *s, int n, float m);
float xp_exp_sum_ref(float *s, int n, float m);

/* Other work for the same pool call as a matrix product: n tasks of fn, claimed after the
 * product's own (one hand-off to the threads instead of two). */
typedef struct {
    int n;
    void (*fn)(void *ctx, int task, int thread);
    void *ctx;
} xp_pool_extra;

/* y[n, rows] = x[n, cols] W^T, split over the pool by output rows, and `also` (may be NULL).
 * scratch[t] is thread t's buffer of xp_linear_scratch_floats(cols) floats. FP8 and BF16
 * weights are decoded in registers (few rows) or a cache-sized tile at a time (more), never
 * materialized whole. Each y element is summed in the level's one order (linear_body.h), so
 * results do not depend on n or on the other rows. */
void xp_linear_forward(xp_pool *pool, float **scratch, const xp_linear *l, const float *x, int n,
                       float *y, const xp_pool_extra *also);

#define XP_MAX_PRODUCTS 4

/* Up to XP_MAX_PRODUCTS products of the same x in one pool call (q, k and v; gate and up):
 * y_k[n, rows_k] = x W_k^T, the same bits as one xp_linear_forward each. */
typedef struct {
    const xp_linear *l;
    float *y;
} xp_product;
void xp_linear_forward_many(xp_pool *pool, float **scratch, const xp_product *p, int np,
                            const float *x, int n, const xp_pool_extra *also);
/* The same, one row at a time through the scalar references. */
void xp_linear_forward_ref(const xp_linear *l, const float *x, int n, float *y);

#endif
