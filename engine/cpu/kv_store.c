#include "cpu/kv_store.h"
#include "format/fp8.h"
#include "util/xp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Storage on transparent huge pages where the kernel offers them: attention walks one head's
 * 4 KB rows of block after block, and with 4 KB pages nearly every block costs a TLB miss. */
static void *xp_kv_alloc(size_t n)
{
    size_t huge = (size_t)2 << 20, bytes = (n + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, bytes ? bytes : huge);
    if (p) madvise(p, bytes ? bytes : huge, MADV_HUGEPAGE);
    return p;
}

int xp_kv_type_parse(const char *name, xp_kv_type *t)
{
    const char *from = "";
    if (!name || !*name) {
        name = getenv("XPREC_KV_DTYPE");
        from = " (from XPREC_KV_DTYPE)";
    }
    if (!name || !*name || strcmp(name, "bf16") == 0)
        *t = XP_KV_BF16;
    else if (strcmp(name, "f32") == 0)
        *t = XP_KV_F32;
    else if (strcmp(name, "fp8") == 0)
        *t = XP_KV_FP8;
    else
        return xp_fail("KV cache dtype \"%s\"%s is not one of bf16, f32, fp8", name, from);
    return 0;
}

const char *xp_kv_type_name(xp_kv_type t)
{
    return t == XP_KV_F32 ? "f32" : t == XP_KV_BF16 ? "bf16" : "fp8";
}

static size_t xp_kv_esize(xp_kv_type t)
{
    return t == XP_KV_F32 ? 4 : t == XP_KV_BF16 ? 2 : 1;
}

size_t xp_kv_store_block_bytes(xp_kv_type t, int n_layers, int kv_heads, int head_dim)
{
    size_t rows = (size_t)n_layers * (size_t)kv_heads * XP_KV_BLOCK;
    return 2 * rows * ((size_t)head_dim * xp_kv_esize(t) + (t == XP_KV_FP8 ? sizeof(float) : 0));
}

int xp_kv_store_init(xp_kv_store *c, xp_kv_type t, int n_layers, int kv_heads, int head_dim,
                     int n_blocks)
{
    memset(c, 0, sizeof *c);
    c->type = t;
    c->n_layers = n_layers;
    c->kv_heads = kv_heads;
    c->head_dim = head_dim;
    c->n_blocks = n_blocks;
    c->esize = xp_kv_esize(t);
    size_t rows = (size_t)n_blocks * (size_t)n_layers * (size_t)kv_heads * XP_KV_BLOCK;
    size_t half = rows * (size_t)head_dim * c->esize;
    c->k = xp_kv_alloc(half);
    c->v = xp_kv_alloc(half);
    int ok = c->k && c->v;
    if (ok && t == XP_KV_FP8) {
        /* zeroed: a block's view reads all its scales, written or not yet */
        c->ks = calloc(rows ? rows : 1, sizeof(float));
        c->vs = calloc(rows ? rows : 1, sizeof(float));
        ok = c->ks && c->vs;
    }
    if (!ok) {
        xp_kv_store_free(c);
        return xp_fail("KV cache: cannot allocate %zu bytes",
                       (size_t)n_blocks * xp_kv_store_block_bytes(t, n_layers, kv_heads, head_dim));
    }
    return 0;
}

void xp_kv_store_free(xp_kv_store *c)
{
    free(c->k);
    free(c->v);
    free(c->ks);
    free(c->vs);
    c->k = c->v = NULL;
    c->ks = c->vs = NULL;
    c->n_blocks = 0;
}

/* Index of (block, layer, head, position) counted in rows of head_dim: each (layer, head) holds
 * its blocks one after another, so a sequence whose blocks are consecutive reads as one stream. */
static size_t xp_kv_row(const xp_kv_store *c, int block, int layer, int head, int p)
{
    return (((size_t)layer * (size_t)c->kv_heads + (size_t)head) * (size_t)c->n_blocks +
            (size_t)block) *
               XP_KV_BLOCK +
           (size_t)p;
}

static void xp_kv_put_row(const xp_kv_store *c, unsigned char *dst, float *scale, const float *src)
{
    int d = c->head_dim;
    if (c->type == XP_KV_F32) {
        memcpy(dst, src, (size_t)d * sizeof(float));
    } else if (c->type == XP_KV_BF16) {
        uint16_t *h = (uint16_t *)dst;
        for (int i = 0; i < d; i++)
            h[i] = xp_f32_to_bf16(src[i]);
    } else {
        /* the row's largest magnitude onto E4M3's largest code */
        float amax = 0;
        for (int i = 0; i < d; i++)
            amax = fmaxf(amax, fabsf(src[i]));
        float s = amax > 0 && isfinite(amax) ? amax / XP_FP8_E4M3_MAX : 1.0f;
        *scale = s;
        for (int i = 0; i < d; i++)
            dst[i] = xp_f32_to_fp8_e4m3(src[i] / s);
    }
}

void xp_kv_store_put(xp_kv_store *c, const int32_t *table, int layer, int pos, const float *k,
                     const float *v)
{
    int block = table[pos / XP_KV_BLOCK], p = pos % XP_KV_BLOCK, d = c->head_dim;
    for (int h = 0; h < c->kv_heads; h++) {
        size_t row = xp_kv_row(c, block, layer, h, p);
        xp_kv_put_row(c, c->k + row * (size_t)d * c->esize, c->ks ? c->ks + row : NULL,
                      k + (size_t)h * d);
        xp_kv_put_row(c, c->v + row * (size_t)d * c->esize, c->vs ? c->vs + row : NULL,
                      v + (size_t)h * d);
    }
}

void xp_kv_store_rows(const xp_kv_store *c, int block, int n, int layer, int head, int v,
                      xp_linear *out)
{
    size_t row = xp_kv_row(c, block, layer, head, 0);
    memset(out, 0, sizeof *out);
    out->dtype = c->type == XP_KV_F32 ? XP_F32 : c->type == XP_KV_BF16 ? XP_BF16 : XP_F8_E4M3;
    out->w = (v ? c->v : c->k) + row * (size_t)c->head_dim * c->esize;
    out->rows = (int64_t)n * XP_KV_BLOCK;
    out->cols = c->head_dim;
    if (c->type == XP_KV_FP8) {
        out->scale = (v ? c->vs : c->ks) + row;
        out->br = 1;
        out->bc = c->head_dim;
        out->nbc = 1;
        xp_linear_check_scales(out);
    }
}
