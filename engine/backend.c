/* Choosing a backend: the one function every caller (engine, score, fidelity, bench) goes
 * through. The CUDA backend exists only when engine/cuda/ is compiled in (make CUDA=1 defines
 * XP_HAVE_CUDA and links it). */
#include "backend.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

#ifdef XP_HAVE_CUDA
const xp_backend *xp_backend_cuda_impl(void);

const xp_backend *xp_backend_cuda(void)
{
    return xp_backend_cuda_impl();
}
#else
const xp_backend *xp_backend_cuda(void)
{
    return NULL;
}
#endif

int xp_backend_kv_blocks(const xp_backend_opts *o, size_t block_bytes, int *blocks)
{
    int64_t nb = o->kv_blocks > 0 ? o->kv_blocks : (int64_t)(o->kv_bytes / block_bytes);
    if (nb > 1 << 24) nb = 1 << 24;
    if (nb < 1)
        return xp_fail("KV cache of %zu bytes holds no block (one block of %d positions needs %zu)",
                       o->kv_bytes, XP_KV_BLOCK, block_bytes);
    *blocks = (int)nb;
    return 0;
}

int xp_backend_open(const char *name, const xp_model *m, const xp_backend_opts *o,
                    const xp_backend **be, void **ctx, int *kv_blocks)
{
    *be = NULL;
    *ctx = NULL;
    if (!name || !*name) name = getenv("XPREC_BACKEND");
    if (!name || !*name) name = "cpu";
    int autosel = strcmp(name, "auto") == 0;
    const xp_backend *want;
    if (strcmp(name, "cpu") == 0) {
        want = &xp_backend_cpu;
    } else if (strcmp(name, "cuda") == 0 || autosel) {
        want = xp_backend_cuda();
        if (!want && !autosel) return xp_fail("this build has no CUDA backend (build with make CUDA=1)");
        if (!want) want = &xp_backend_cpu;
    } else {
        return xp_fail("unknown backend \"%s\" (cpu, cuda or auto)", name);
    }
    void *c = want->create(m, o, kv_blocks);
    if (!c && autosel && want != &xp_backend_cpu) {
        want = &xp_backend_cpu; /* auto: no usable GPU, run on the CPU */
        c = want->create(m, o, kv_blocks);
    }
    if (!c) return -1;
    *be = want;
    *ctx = c;
    return 0;
}
