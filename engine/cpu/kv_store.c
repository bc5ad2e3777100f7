#include "cpu/kv_store.h"
#include "util/xp_error.h"

#include <stdlib.h>

size_t xp_kv_store_block_bytes(int n_layers, int kv_dim)
{
    return 2 * (size_t)n_layers * XP_KV_BLOCK * (size_t)kv_dim * sizeof(float);
}

int xp_kv_store_init(xp_kv_store *c, int n_layers, int kv_dim, int n_blocks)
{
    c->n_layers = n_layers;
    c->kv_dim = kv_dim;
    c->n_blocks = n_blocks;
    size_t half = (size_t)n_blocks * xp_kv_store_block_bytes(n_layers, kv_dim) / 2;
    c->k = malloc(half ? half : 1);
    c->v = malloc(half ? half : 1);
    if (!c->k || !c->v) {
        xp_kv_store_free(c);
        return xp_fail("KV cache: cannot allocate %zu bytes", 2 * half);
    }
    return 0;
}

void xp_kv_store_free(xp_kv_store *c)
{
    free(c->k);
    free(c->v);
    c->k = c->v = NULL;
    c->n_blocks = 0;
}
