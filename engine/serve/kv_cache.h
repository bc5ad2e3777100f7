/* Paged KV cache: fixed-size blocks of positions, handed to sequences through block tables, so
 * memory is claimed as sequences grow and returned the moment they finish. */
#ifndef XP_KV_CACHE_H
#define XP_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#define XP_KV_BLOCK 16 /* positions per block */

typedef struct {
    int n_layers, kv_dim; /* kv_dim = num_key_value_heads * head_dim */
    int n_blocks;
    float *k, *v;         /* [n_blocks][n_layers][XP_KV_BLOCK][kv_dim] */
    int32_t *free_ids;    /* stack of free block ids */
    int n_free;
} xp_kv_cache;

/* A cache of at most `bytes` bytes (K and V in F32); -1 if not even one block fits. */
int xp_kv_init(xp_kv_cache *c, int n_layers, int kv_dim, size_t bytes);
void xp_kv_free(xp_kv_cache *c);
size_t xp_kv_bytes_per_block(int n_layers, int kv_dim);
/* Blocks needed for n positions. */
static inline int xp_kv_blocks_for(int64_t n)
{
    return (int)((n + XP_KV_BLOCK - 1) / XP_KV_BLOCK);
}
/* Takes n blocks into ids; 0, or -1 (nothing taken) when fewer are free. */
int xp_kv_alloc(xp_kv_cache *c, int n, int32_t *ids);
void xp_kv_release(xp_kv_cache *c, const int32_t *ids, int n);

/* K and V rows of a position in a layer. */
static inline float *xp_kv_k(const xp_kv_cache *c, const int32_t *table, int layer, int pos)
{
    return c->k + (((size_t)table[pos / XP_KV_BLOCK] * (size_t)c->n_layers + (size_t)layer) * XP_KV_BLOCK +
                   (size_t)(pos % XP_KV_BLOCK)) * (size_t)c->kv_dim;
}
static inline float *xp_kv_v(const xp_kv_cache *c, const int32_t *table, int layer, int pos)
{
    return c->v + (((size_t)table[pos / XP_KV_BLOCK] * (size_t)c->n_layers + (size_t)layer) * XP_KV_BLOCK +
                   (size_t)(pos % XP_KV_BLOCK)) * (size_t)c->kv_dim;
}

#endif
