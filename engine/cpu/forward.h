/* One forward pass of Qwen3 over a batch of token rows from any number of sequences, each row
 * with its position and its sequence's KV block table, rows grouped by LoRA adapter. */
#ifndef XP_FORWARD_H
#define XP_FORWARD_H

#include "cpu/pool.h"
#include "serve/kv_cache.h"
#include "model/lora.h"
#include "model/model.h"

/* Consecutive rows served by one adapter (NULL: the base alone). */
typedef struct {
    int row0, nrows;
    const xp_lora_weights *lora;
} xp_row_group;

typedef struct {
    int n;                 /* token rows */
    const int32_t *tokens; /* [n] */
    const int32_t *pos;    /* [n] position of each row in its sequence */
    const int32_t *const *tables; /* [n] KV block table of each row's sequence */
    int n_groups;
    const xp_row_group *groups; /* cover rows 0..n-1 in order */
    int n_out;
    const int32_t *out_rows; /* rows whose logits are wanted */
    float *logits;           /* [n_out, vocab] */
} xp_batch;

typedef struct xp_runtime xp_runtime;

/* Working memory for batches of up to max_rows rows and contexts up to max_ctx positions. */
xp_runtime *xp_runtime_create(const xp_model *m, xp_kv_cache *kv, int threads, int max_rows,
                              int max_ctx);
void xp_runtime_destroy(xp_runtime *rt);
xp_pool *xp_runtime_pool(xp_runtime *rt);

/* Runs the batch: writes K/V of every row into the cache, then attends causally over each
 * row's sequence up to its position. */
int xp_forward(xp_runtime *rt, const xp_batch *b);

#endif
