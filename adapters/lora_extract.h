/* One module's LoRA from a weight difference dW = W_tuned - W_base: the truncated SVD
 * dW ~ U_r S_r V_r^T, split as B = U_r sqrt(S_r) [out, r] and A = sqrt(S_r) V_r^T [r, in], both
 * stored in BF16, so that with lora_alpha = r (scale 1) the adapter applies B A. The rank is
 * fixed or the smallest one that captures a share of ||dW||^2. */
#ifndef XP_LORA_EXTRACT_H
#define XP_LORA_EXTRACT_H

#include "svd.h"

#include <stdint.h>

typedef struct {
    int rank;      /* fixed rank; 0 picks it by energy */
    double energy; /* with rank 0: the share of ||dW||^2 the factors must capture, in (0, 1] */
    int max_rank;  /* with rank 0: never more than this (0: no cap but min(out, in)) */
    xp_svd_opts svd;
} xp_extract_opts;

typedef struct {
    int rank;                    /* 0 when dW is exactly zero: nothing to extract */
    uint16_t *A, *B;             /* BF16 [rank, in] and [out, rank] */
    double delta_norm;           /* ||dW|| */
    double residual_norm;        /* ||dW - B A|| with the stored BF16 factors */
    double energy;               /* sum_{i<rank} s_i^2 / ||dW||^2 */
    double sigma_max, sigma_min; /* largest and smallest kept singular value */
    xp_svd_method used;
    double gemm_flops;           /* BLAS-3 flops: the randomized SVD's products and the residual */
} xp_extract_result;

/* dW is row-major [out, in] and is overwritten with the residual dW - B A. */
int xp_extract_lora(float *dw, int64_t out, int64_t in, const xp_extract_opts *o,
                    xp_extract_result *res);
void xp_extract_result_free(xp_extract_result *r);

/* The factors of a truncated SVD split as sqrt(S): A [k, n] and B [m, k], in F32. */
void xp_svd_split(const xp_svd_result *r, int64_t m, int64_t n, int k, float *A, float *B);

/* How an adapter update L = scale B A sits against the quantization noise
 * N = dequant(W_fp8) - W_bf16 of the same module (the thesis's orthogonality analysis). */
typedef struct {
    int rank;              /* numerical rank of L: the r of the random baseline r / d_out */
    double norm_l, norm_n; /* ||L||, ||N|| */
    double inner;          /* <L, N> */
    double cosine;         /* <L, N> / (||L|| ||N||); NAN when L or N is zero */
    double leakage;        /* ||U_r U_r^T N||^2 / ||N||^2 with U_r spanning L's columns; NAN if N = 0 */
    double leakage_random; /* rank / d_out: what isotropic noise leaks into any r-dim subspace */
} xp_lora_geometry;

/* n is row-major [m, cols], A [r, cols] and B [m, r] are F32; r <= min(m, cols). L is never
 * formed: both products go through B^T N and U_r^T N (2 r m cols flops each). */
int xp_lora_geometry_of(const float *n, int64_t m, int64_t cols, const float *A, const float *B,
                        int r, float scale, xp_lora_geometry *g);

#endif
