/* One sequence straight through a backend, for tools that score or evaluate a model (xprec
 * score, xprec fidelity, parity tests): no scheduler, no tokenizer, the whole KV cache for this
 * one sequence. Works on any backend xp_backend_open can choose. */
#ifndef XP_RUNNER_H
#define XP_RUNNER_H

#include "backend.h"

typedef struct xp_runner xp_runner;

/* A runner for m (not owned) on backend (see xp_backend_open) with room for max_ctx positions,
 * running chunk rows per forward pass. NULL + xp_last_error(). */
xp_runner *xp_runner_create(const xp_model *m, const char *backend, int threads, int max_ctx,
                            int chunk);
void xp_runner_destroy(xp_runner *r);
const char *xp_runner_backend(const xp_runner *r);
/* The adapter later runs apply (NULL: the base alone); w stays the caller's and must outlive its
 * use. */
int xp_runner_set_adapter(xp_runner *r, const xp_lora_weights *w);
/* Runs toks[start..n) at positions start..n-1 (the cache holds positions 0..start-1 from earlier
 * runs of the same sequence) and writes the logits of every position >= first_out to out, one
 * vocab-sized row after another. */
int xp_runner_run(xp_runner *r, const int32_t *toks, int start, int n, int first_out, float *out);

#endif
