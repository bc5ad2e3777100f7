/* The KV block allocator: ids of fixed-size blocks of positions, handed to sequences through
 * block tables, so memory is claimed as sequences grow and returned the moment they finish.
 * Only ids live here; the backend holds the storage behind them. */
#ifndef XP_KV_BLOCKS_H
#define XP_KV_BLOCKS_H

#include "backend.h"

typedef struct {
    int n_blocks;
    int32_t *free_ids; /* stack of free block ids */
    int n_free;
} xp_kv_blocks;

int xp_kv_blocks_init(xp_kv_blocks *c, int n_blocks);
void xp_kv_blocks_free(xp_kv_blocks *c);
/* Takes n blocks into ids; 0, or -1 (nothing taken) when fewer are free. */
int xp_kv_alloc(xp_kv_blocks *c, int n, int32_t *ids);
void xp_kv_release(xp_kv_blocks *c, const int32_t *ids, int n);

#endif
