/* Causal attention over the KV store for one batch of rows (GQA), as one algorithm for decode
 * and prefill: each KV block is read once for a tile of a sequence's consecutive rows and all
 * query heads of its KV head, and folded into a running softmax (online: memory does not grow
 * with the sequence). A row's numbers go through the same operations whatever tile it is in. */
#ifndef XP_CPU_ATTENTION_H
#define XP_CPU_ATTENTION_H

#include "cpu/kv_store.h"
#include "cpu/pool.h"

#define XP_ATT_TILE 16 /* query rows of one sequence per task */
#define XP_ATT_RUN 8   /* consecutive KV blocks scored in one product */

typedef struct {
    int row0, nrows; /* consecutive rows of one sequence at consecutive positions */
} xp_att_tile;

/* Per-thread scratch of xp_attention, in floats. */
size_t xp_attention_scratch_floats(const xp_qwen3_config *g);

/* att[row] = softmax(q k^T / sqrt(d)) v over the row's positions 0..pos, for every query head,
 * q and att [n, heads * head_dim]. scratch[t] holds xp_attention_scratch_floats floats and
 * lin_scratch[t] the linear kernels' scratch for head_dim columns; tiles has room for b->n. */
void xp_attention(xp_pool *pool, float **scratch, float **lin_scratch, const xp_kv_store *kv,
                  const xp_qwen3_config *g, const xp_batch *b, int layer, const float *q,
                  float *att, xp_att_tile *tiles);

#endif
