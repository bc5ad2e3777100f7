/* The CPU's KV storage: K and V in F32 for n blocks of XP_KV_BLOCK positions, laid out
 * [block][layer][position in block][kv_dim], addressed through a sequence's block table. */
#ifndef XP_CPU_KV_STORE_H
#define XP_CPU_KV_STORE_H

#include "backend.h"

typedef struct {
    int n_layers, kv_dim; /* kv_dim = num_key_value_heads * head_dim */
    int n_blocks;
    float *k, *v;
} xp_kv_store;

size_t xp_kv_store_block_bytes(int n_layers, int kv_dim);
/* Storage for n_blocks blocks; -1 with an error when it cannot be allocated. */
int xp_kv_store_init(xp_kv_store *c, int n_layers, int kv_dim, int n_blocks);
void xp_kv_store_free(xp_kv_store *c);

/* K and V rows of a position in a layer. */
static inline size_t xp_kv_store_at(const xp_kv_store *c, const int32_t *table, int layer, int pos)
{
    return (((size_t)table[pos / XP_KV_BLOCK] * (size_t)c->n_layers + (size_t)layer) * XP_KV_BLOCK +
            (size_t)(pos % XP_KV_BLOCK)) *
           (size_t)c->kv_dim;
}
static inline float *xp_kv_k(const xp_kv_store *c, const int32_t *table, int layer, int pos)
{
    return c->k + xp_kv_store_at(c, table, layer, pos);
}
static inline float *xp_kv_v(const xp_kv_store *c, const int32_t *table, int layer, int pos)
{
    return c->v + xp_kv_store_at(c, table, layer, pos);
}

#endif
