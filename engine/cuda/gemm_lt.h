/* cuBLASLt matrix products for prefill (many rows): y[n, rows] = x[n, cols] W^T in F32.
 *
 * In cuBLASLt's column-major terms this is D [rows, n] = op(A) B with A = W (stored [cols,
 * rows], transposed: the "TN" layout FP8 needs) and B = x (stored [cols, n]). */
#ifndef XP_CUDA_GEMM_LT_H
#define XP_CUDA_GEMM_LT_H

#include <cuda_runtime_api.h>
#include <stdint.h>

typedef struct xpc_lt xpc_lt;

/* NULL with xp_fail() set when cuBLASLt cannot start. */
xpc_lt *xpc_lt_create(cudaStream_t s);
void xpc_lt_destroy(xpc_lt *lt);

/* Layout of the scale tensors the FP8 block-scaled product reads. w_transposed: the weight
 * grid is passed as [ceil(cols/128), ceil(rows/128)] instead of checkpoint order; x_kmajor:
 * activation scales xs[kb * n_pad + row] instead of xs[row * nkb + kb]. */
typedef struct {
    int w_transposed, x_kmajor;
} xpc_lt_scales;

/* Block-scaled FP8 product: W E4M3 [rows, cols] with 128x128 block scales ws, x E4M3
 * [n_pad, cols] with 1x128 scales xs (n_pad a multiple of 16), y [n_pad, rows]. When the
 * library has no F32-output algorithm and ybf (room for n_pad * rows BF16) is given, the product
 * is written as BF16 there and widened into y. 0 on success, 1 when cuBLASLt has no algorithm
 * for this shape (the caller falls back), -1 on error. */
int xpc_lt_fp8(xpc_lt *lt, const xpc_lt_scales *sl, const uint8_t *w, const float *ws,
               int64_t rows, int64_t cols, const uint8_t *xq, const float *xs, int n_pad,
               float *y, uint16_t *ybf, cudaStream_t s);

/* BF16 product with F32 accumulation and output: W [rows, cols], x [n, cols], y [n, rows].
 * Same return values. */
int xpc_lt_bf16(xpc_lt *lt, const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *xb,
                int n, float *y, cudaStream_t s);

/* Finds which scale layout this cuBLASLt expects by running a small product with distinct
 * block scales against a host reference. 1 and *out when one matches, 0 when FP8 block
 * scaling is unavailable or none matches (prefill then uses the BF16 path), -1 on error. */
int xpc_lt_fp8_probe(xpc_lt *lt, cudaStream_t s, xpc_lt_scales *out);

#endif
