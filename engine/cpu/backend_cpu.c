/* The CPU backend: the reference forward pass of forward.c behind the backend table. */
#include "backend.h"

static void *xp_cpu_create(const xp_model *m, xp_kv_cache *kv, int threads, int max_rows,
                           int max_ctx)
{
    return xp_runtime_create(m, kv, threads, max_rows, max_ctx);
}

static void xp_cpu_destroy(void *ctx)
{
    xp_runtime_destroy(ctx);
}

static int xp_cpu_forward(void *ctx, const xp_batch *b)
{
    return xp_forward(ctx, b);
}

const xp_backend xp_backend_cpu = {"cpu", xp_cpu_create, xp_cpu_destroy, xp_cpu_forward, NULL};
