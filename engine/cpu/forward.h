/* The CPU backend's runtime: working memory, the KV storage, adapter slots and the thread pool
 * behind the reference forward pass (forward.c). Internal to cpu/: callers go through
 * backend.h. */
#ifndef XP_CPU_FORWARD_H
#define XP_CPU_FORWARD_H

#include "backend.h"

typedef struct xp_runtime xp_runtime;

xp_runtime *xp_runtime_create(const xp_model *m, const xp_backend_opts *o, int *kv_blocks);
void xp_runtime_destroy(xp_runtime *rt);
int xp_runtime_adapter_load(xp_runtime *rt, int slot, uint32_t gen, const xp_lora_weights *w);
int xp_forward(xp_runtime *rt, const xp_batch *b);
/* Read bandwidth of host memory, bytes/s, summed over the runtime's threads. */
double xp_runtime_read_bandwidth(xp_runtime *rt);

#endif
