/* The CPU's KV storage: K and V for n blocks of XP_KV_BLOCK positions, as F32, BF16 (the
 * default) or FP8 E4M3 with one F32 scale per position and KV head. Laid out
 * [layer][KV head][block][position in block][head_dim]: one head's rows of one block are a
 * contiguous matrix the matrix kernels read as it lies, and consecutive blocks of a sequence
 * one stream; addressed through a sequence's block table. */
#ifndef XP_CPU_KV_STORE_H
#define XP_CPU_KV_STORE_H

#include "backend.h"

typedef enum { XP_KV_F32, XP_KV_BF16, XP_KV_FP8 } xp_kv_type;

typedef struct {
    xp_kv_type type;
    int n_layers, kv_heads, head_dim;
    int n_blocks;
    size_t esize; /* bytes per element */
    unsigned char *k, *v;
    float *ks, *vs; /* FP8: [layer][KV head][block][position] scales */
} xp_kv_store;

/* "f32", "bf16" or "fp8"; NULL or "" reads $XPREC_KV_DTYPE, and bf16 when that is unset. -1
 * with an error naming the choices for anything else. */
int xp_kv_type_parse(const char *name, xp_kv_type *t);
const char *xp_kv_type_name(xp_kv_type t);

size_t xp_kv_store_block_bytes(xp_kv_type t, int n_layers, int kv_heads, int head_dim);
/* Storage for n_blocks blocks; -1 with an error when it cannot be allocated. */
int xp_kv_store_init(xp_kv_store *c, xp_kv_type t, int n_layers, int kv_heads, int head_dim,
                     int n_blocks);
void xp_kv_store_free(xp_kv_store *c);

/* Stores the K and V rows (kv_heads * head_dim F32 values each) of position pos. */
void xp_kv_store_put(xp_kv_store *c, const int32_t *table, int layer, int pos, const float *k,
                     const float *v);
/* K (v = 0) or V (v = 1) of one head in the blocks with ids block .. block + n - 1: n *
 * XP_KV_BLOCK rows of head_dim, as a weight matrix the kernels take (FP8 with a scale per row). */
void xp_kv_store_rows(const xp_kv_store *c, int block, int n, int layer, int head, int v,
                      xp_linear *out);

#endif
