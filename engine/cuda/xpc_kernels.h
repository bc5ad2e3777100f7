/* The CUDA backend's kernels, behind plain C entry points so the backend (C11) and the GPU tests
 * can call them. Every pointer argument is device memory unless its name ends in _h. Each
 * launcher queues work on stream s and returns 0, or -1 with xp_fail() set to the CUDA error
 * string when the launch itself fails (errors of the running kernel surface at the next sync). */
#ifndef XP_CUDA_KERNELS_H
#define XP_CUDA_KERNELS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Weight element types the kernels read. */
enum { XPC_FP8 = 0, XPC_BF16 = 1, XPC_F16 = 2, XPC_F32 = 3 };

/* A weight W [rows, cols] in device memory: y = x W^T. FP8 weights carry block scales
 * [ceil(rows/br), ceil(cols/bc)] in checkpoint order. */
typedef struct {
    int dtype;
    const void *w;
    const float *scale;
    int64_t rows, cols;
    int br, bc;
    int64_t nbc; /* scale blocks per row of blocks */
} xpc_linear;

/* One adapter module on the device: BF16 A [rank, in] and B [out, rank]. */
typedef struct {
    const uint16_t *A, *B;
    int rank;
    float scale;
} xpc_lora_mat;

/* Consecutive batch rows served by one adapter; mats is the adapter's device table of
 * n_layers * 7 modules (rank 0: no module), NULL for the base. */
typedef struct {
    int row0, nrows;
    const xpc_lora_mat *mats;
} xpc_lora_group;

/* The largest head_dim the attention kernels take. */
#define XPC_MAX_HEAD_DIM 256
/* Rank stride of the shrink output t [n, XPC_LORA_T]. */
#define XPC_LORA_T 256

const char *xpc_error_string(int err);

/* x[i] = E[tok[i]] as F32 (BF16, F16 or F32 embeddings). */
int xpc_embed(const xpc_linear *E, const int32_t *tok, int n, float *x, cudaStream_t s);
/* y[i] = rmsnorm(x[rows ? rows[i] : i]) * w over dim values, for i < n. */
int xpc_rmsnorm(const float *x, const int32_t *rows, int n, int dim, const float *w, float eps,
                float *y, cudaStream_t s);
/* Per-head q/k RMSNorm, rotate-half RoPE at pos[i], then k and v of each row stored in the
 * paged cache kc/vc [n_blocks][n_layers][XP_KV_BLOCK][KV*d] through row i's block table
 * tabs + toff[i]. q [n, H*d], k and v [n, KV*d]. */
int xpc_qk_rope_store(float *q, float *k, const float *v, int n, int H, int KV, int d,
                      const float *q_norm, const float *k_norm, float eps, const int32_t *pos,
                      const float *inv_freq, const int32_t *tabs, const int32_t *toff, float *kc,
                      float *vc, int n_layers, int layer, cudaStream_t s);
/* att[i, h] = softmax(q k^T / sqrt(d)) v over positions 0..pos[i] of row i's sequence (GQA:
 * query head h reads kv head h / (H / KV)). nsplit > 1 splits the positions into ranges of
 * `chunk` (nsplit * chunk must cover the largest position + 1), worked on by separate blocks
 * and merged after; part holds n * H * nsplit * (d + 2) floats. nsplit 1: part unused. */
int xpc_attention(const float *q, int n, int H, int KV, int d, const int32_t *pos,
                  const int32_t *tabs, const int32_t *toff, const float *kc, const float *vc,
                  int n_layers, int layer, float *att, int nsplit, int chunk, float *part,
                  cudaStream_t s);
/* g[i] = silu(g[i]) * u[i]. */
int xpc_silu_mul(float *g, const float *u, size_t n, cudaStream_t s);
/* x[i] += d[i]. */
int xpc_add(float *x, const float *d, size_t n, cudaStream_t s);

/* y[n, rows] = x[n, cols] W^T streaming W once per 8 rows of x, decoding in registers (decode
 * steps: few rows, bound by weight bandwidth). */
int xpc_gemv(const xpc_linear *W, const float *x, int n, float *y, cudaStream_t s);
/* The same with a shared-memory tiled F32 kernel (any n; exact F32 arithmetic, no tensor
 * cores): the fallback when cuBLASLt declines and the reference path for parity runs. */
int xpc_gemm_simt(const xpc_linear *W, const float *x, int n, float *y, cudaStream_t s);

/* FP8 activations for the block-scaled GEMM: per row and 128-column group, scale = amax / 448
 * and q = e4m3(x / scale). Rows n..n_pad-1 are zero. Scales go to xs[kb * n_pad + row] when
 * kmajor, else xs[row * ceil(cols/128) + kb]. */
int xpc_quant_act(const float *x, int n, int n_pad, int cols, uint8_t *xq, float *xs, int kmajor,
                  cudaStream_t s);
/* W as BF16 [rows, cols] (FP8 dequantized with its scales). */
int xpc_weight_to_bf16(const xpc_linear *W, uint16_t *dst, cudaStream_t s);
int xpc_f32_to_bf16(const float *src, size_t n, uint16_t *dst, cudaStream_t s);
int xpc_bf16_to_f32(const uint16_t *src, size_t n, float *dst, cudaStream_t s);
/* A [rows_a, cols_a] -> its transpose (for the weight scale grid when cuBLASLt wants it the
 * other way round). */
int xpc_transpose_f32(const float *a, int rows_a, int cols_a, float *t, cudaStream_t s);

/* LoRA over a batch of row groups for module `mod` of layer `layer` (index layer * 7 + mod in
 * each group's table): t[row, k] = A[k] . h[row]; out[row, o] += scale * B[o] . t[row].
 * Groups without the module are skipped; launch shapes depend only on n_groups and the
 * dimensions, so a captured graph replays for any adapters. */
int xpc_lora_shrink(const xpc_lora_group *g, int n_groups, int idx, const float *h, int in,
                    float *t, cudaStream_t s);
int xpc_lora_expand(const xpc_lora_group *g, int n_groups, int idx, const float *t, int out_dim,
                    float *out, cudaStream_t s);

/* Greedy sampling on the device: idx[i] = argmax of logits row i (first on ties). */
int xpc_argmax(const float *logits, int n, int vocab, int32_t *idx, cudaStream_t s);

#ifdef __cplusplus
}
#endif

#endif
