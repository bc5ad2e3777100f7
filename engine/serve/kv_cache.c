#include "serve/kv_cache.h"
#include "util/xp_error.h"

#include <stdlib.h>

size_t xp_kv_bytes_per_block(int n_layers, int kv_dim)
{
    return 2 * (size_t)n_layers * XP_KV_BLOCK * (size_t)kv_dim * sizeof(float);
}

int xp_kv_init(xp_kv_cache *c, int n_layers, int kv_dim, size_t bytes)
{
    c->n_layers = n_layers;
    c->kv_dim = kv_dim;
    size_t per = xp_kv_bytes_per_block(n_layers, kv_dim);
    c->n_blocks = (int)(bytes / per > 1 << 24 ? 1 << 24 : bytes / per);
    if (c->n_blocks < 1)
        return xp_fail("KV cache of %zu bytes holds no block (one block of %d positions needs %zu)",
                       bytes, XP_KV_BLOCK, per);
    size_t half = (size_t)c->n_blocks * per / 2;
    c->k = malloc(half);
    c->v = malloc(half);
    c->free_ids = malloc((size_t)c->n_blocks * sizeof *c->free_ids);
    if (!c->k || !c->v || !c->free_ids) {
        xp_kv_free(c);
        return xp_fail("KV cache: cannot allocate %zu bytes", 2 * half);
    }
    for (int i = 0; i < c->n_blocks; i++) c->free_ids[i] = c->n_blocks - 1 - i;
    c->n_free = c->n_blocks;
    return 0;
}

void xp_kv_free(xp_kv_cache *c)
{
    free(c->k);
    free(c->v);
    free(c->free_ids);
    c->k = c->v = NULL;
    c->free_ids = NULL;
    c->n_free = c->n_blocks = 0;
}

int xp_kv_alloc(xp_kv_cache *c, int n, int32_t *ids)
{
    if (n > c->n_free) return -1;
    for (int i = 0; i < n; i++) ids[i] = c->free_ids[--c->n_free];
    return 0;
}

void xp_kv_release(xp_kv_cache *c, const int32_t *ids, int n)
{
    for (int i = 0; i < n; i++) c->free_ids[c->n_free++] = ids[i];
}
