/* The CPU backend: the reference forward pass of forward.c behind the backend table, and the
 * host memory bandwidth probe bench compares decode's weight traffic against. KV storage is
 * BF16 unless the options (or $XPREC_KV_DTYPE) ask for f32 or fp8. */
#include "backend.h"
#include "cpu/forward.h"
#include "cpu/kv_store.h"
#include "cpu/pool.h"

#include <stdlib.h>
#include <string.h>


static size_t xp_cpu_kv_block_bytes(const xp_model *m, const xp_backend_opts *o)
{
    xp_kv_type t;
    if (xp_kv_type_parse(o ? o->kv_dtype : NULL, &t) < 0) return 0;
    return xp_kv_store_block_bytes(t, m->cfg.num_hidden_layers, m->cfg.num_key_value_heads,
                                   m->cfg.head_dim);
}

static void *xp_cpu_create(const xp_model *m, const xp_backend_opts *o, int *kv_blocks)
{
    return xp_runtime_create(m, o, kv_blocks);
}

static void xp_cpu_destroy(void *ctx)
{
    xp_runtime_destroy(ctx);
}

static int xp_cpu_adapter_load(void *ctx, int slot, uint32_t gen, const xp_lora_weights *w)
{
    return xp_runtime_adapter_load(ctx, slot, gen, w);
}

static int xp_cpu_forward(void *ctx, const xp_batch *b)
{
    return xp_forward(ctx, b);
}

static double xp_cpu_read_bandwidth(void *ctx)
{
    return xp_runtime_read_bandwidth(ctx);
}

const xp_backend xp_backend_cpu = {"cpu",          xp_cpu_kv_block_bytes, xp_cpu_create,
                                   xp_cpu_destroy, xp_cpu_adapter_load,   xp_cpu_forward,
                                   xp_cpu_read_bandwidth};
