/* The narrow interface between the engine and a compute backend. The engine owns scheduling,
 * the KV block allocator (block ids and tables), adapters on the host and sampling; a backend
 * owns where weights, activations and KV storage live and runs the forward pass over one batch.
 * cpu/ is the reference; cuda/ fills the same table. */
#ifndef XP_BACKEND_H
#define XP_BACKEND_H

#include "cpu/forward.h"

typedef struct xp_backend xp_backend;

struct xp_backend {
    const char *name;
    /* Prepares to run m with n_blocks KV blocks of XP_KV_BLOCK positions, batches of up to
     * max_rows rows and contexts up to max_ctx. The host kv passed to forward has the same
     * block count; a device backend keeps its own storage under the same block ids. */
    void *(*create)(const xp_model *m, xp_kv_cache *kv, int threads, int max_rows, int max_ctx);
    void (*destroy)(void *ctx);
    /* Runs one batch (see xp_batch); logits land in host memory. Adapters are given as host
     * F32 weights; a device backend uploads and caches them (keyed by the xp_lora_weights
     * pointer, which stays valid and unchanged while the adapter is resident). */
    int (*forward)(void *ctx, const xp_batch *b);
    /* The engine evicted an adapter: drop any device copy of it. May be NULL. */
    void (*forget_adapter)(void *ctx, const xp_lora_weights *w);
};

extern const xp_backend xp_backend_cpu;
/* NULL when this build has no CUDA backend. */
const xp_backend *xp_backend_cuda(void);

#endif
