/* A Qwen3 model in memory: weights mapped from the checkpoint (FP8 codes and BF16 matrices are
 * used where they lie; only small tensors — norms, scales — are converted to F32). */
#ifndef XP_MODEL_H
#define XP_MODEL_H

#include "format/checkpoint.h"

/* A weight matrix W [rows, cols] as the kernels read it: y = x W^T. */
typedef struct {
    xp_dtype dtype; /* XP_F8_E4M3, XP_BF16, XP_F16 or XP_F32 */
    const void *w;  /* rows x cols elements, row-major */
    float *scale;   /* FP8: block scales [ceil(rows/br), ceil(cols/bc)], F32 */
    int64_t rows, cols;
    int br, bc;
    int64_t nbc;  /* scale blocks per row */
    int fp8_fast; /* FP8 with every |scale| < 256: the SIMD decode may fold 2^120 into it
                     (xp_linear_check_scales); 0 sends the weight through the reference */
    void *owned;  /* an aligned copy when the mapping could not be used as it is */
    uint8_t *sub; /* FP8: 1 per (row, column block) holding a subnormal code, [rows, nbc]
                     (xp_linear_mark_subnormals); NULL: none marked */
} xp_linear;

typedef struct {
    float *attn_norm, *mlp_norm, *q_norm, *k_norm;
    xp_linear lin[XP_MOD_COUNT];
} xp_layer;

typedef struct {
    xp_qwen3_config cfg;
    xp_ckpt *ckpt;
    xp_layer *layers;
    float *final_norm;
    xp_linear embed;   /* [vocab, hidden] */
    xp_linear lm_head; /* the embeddings again when tied */
    float *inv_freq;   /* RoPE: theta^(-2i/head_dim), or its YaRN blend; head_dim/2 entries */
} xp_model;

/* How to load: what may differ from the checkpoint's own description. */
typedef struct {
    /* a rope_scaling object (JSON) to use instead of config.json's; "null" for plain RoPE;
     * NULL keeps the file's */
    const char *rope_scaling;
    /* hold lm_head as FP8 E4M3 in 128x128 blocks, quantized at load (a tied embedding stays as
     * stored for the lookup): a smaller step for a little fidelity */
    int lm_head_fp8;
} xp_model_opts;

/* Sets l->fp8_fast from the block scales. */
void xp_linear_check_scales(xp_linear *l);

/* Sets l->sub for an FP8 weight: which (row, column block) runs hold a nonzero code with a zero
 * exponent. The fast SIMD decode makes those F32 denormals, whose multiply costs a microcode
 * assist on some cores (100 times slower); the kernels decode marked blocks through F16 instead,
 * to the same bits. Leaves l->sub NULL when there are none. The caller frees l->sub. -1: out of
 * memory. */
int xp_linear_mark_subnormals(xp_linear *l);

/* Loads the checkpoint in dir as its files describe it, or with o's changes (o may be NULL).
 * Under YaRN the attention factor is folded into the q and k norm weights: RoPE is linear, so
 * scaling the normed q and k is transformers' scaling of cos and sin, and every backend gets it
 * with the weights. */
int xp_model_load(const char *dir, const xp_model_opts *o, xp_model **out);
void xp_model_free(xp_model *m);

/* Bytes of weights one decode step streams (every linear weight and its scales, plus lm_head). */
uint64_t xp_model_step_bytes(const xp_model *m);

/* Row r of a weight as F32 (for the embedding lookup and the reference kernels). */
void xp_linear_row(const xp_linear *l, int64_t r, float *dst);

#endif
