#include "serve/kv_blocks.h"
#include "util/xp_error.h"

#include <stdlib.h>

int xp_kv_blocks_init(xp_kv_blocks *c, int n_blocks)
{
    c->n_blocks = n_blocks;
    if (!(c->free_ids = malloc((size_t)(n_blocks > 0 ? n_blocks : 1) * sizeof *c->free_ids)))
        return xp_fail("out of memory");
    for (int i = 0; i < n_blocks; i++) c->free_ids[i] = n_blocks - 1 - i;
    c->n_free = n_blocks;
    return 0;
}

void xp_kv_blocks_free(xp_kv_blocks *c)
{
    free(c->free_ids);
    c->free_ids = NULL;
    c->n_free = c->n_blocks = 0;
}

int xp_kv_alloc(xp_kv_blocks *c, int n, int32_t *ids)
{
    if (n > c->n_free) return -1;
    for (int i = 0; i < n; i++) ids[i] = c->free_ids[--c->n_free];
    return 0;
}

void xp_kv_release(xp_kv_blocks *c, const int32_t *ids, int n)
{
    for (int i = 0; i < n; i++) c->free_ids[c->n_free++] = ids[i];
}
