/* The narrow interface between the engine and a compute backend, and the batch it runs.
 *
 * The engine owns scheduling, KV block ids and tables, adapters on the host and sampling. A
 * backend owns where weights, activations, adapter copies and KV storage live, and runs the
 * forward pass over one batch of token rows from any number of sequences. cpu/ is the
 * reference; cuda/ fills the same table. Nothing here depends on either. */
#ifndef XP_BACKEND_H
#define XP_BACKEND_H

#include "model/lora.h"
#include "model/model.h"

#include <stddef.h>
#include <stdint.h>

#define XP_KV_BLOCK 16 /* positions per KV block */

/* Blocks needed for n positions. */
static inline int xp_kv_blocks_for(int64_t n)
{
    return (int)((n + XP_KV_BLOCK - 1) / XP_KV_BLOCK);
}

/* Consecutive rows served by one adapter. The adapter is named by its slot and the generation
 * the engine last loaded into that slot (adapter_load), never by a host pointer: a slot is
 * reused for other adapters, and the generation tells them apart. */
typedef struct {
    int row0, nrows;
    int slot;     /* adapter slot, or -1 for the base alone */
    uint32_t gen; /* the slot's generation this batch expects */
} xp_row_group;

typedef struct {
    int n;                        /* token rows */
    const int32_t *tokens;        /* [n] */
    const int32_t *pos;           /* [n] position of each row in its sequence */
    const int32_t *const *tables; /* [n] KV block table of each row's sequence */
    int n_groups;
    const xp_row_group *groups; /* cover rows 0..n-1 in order */
    int n_out;
    const int32_t *out_rows; /* rows whose logits are wanted */
    float *logits;           /* [n_out, vocab], host memory */
} xp_batch;

typedef struct {
    int threads;       /* host threads for the CPU's kernels (0: all cores) */
    int max_rows;      /* token rows per batch */
    int max_ctx;       /* positions per sequence */
    int adapter_slots; /* adapters that can be loaded at once */
    size_t kv_bytes;   /* KV storage budget, */
    int kv_blocks;     /* or an exact block count when > 0 */
    int device;        /* a device backend's device index; 0: its default */
} xp_backend_opts;

typedef struct xp_backend xp_backend;

struct xp_backend {
    const char *name;
    /* Bytes one KV block of m takes in this backend's storage. */
    size_t (*kv_block_bytes)(const xp_model *m);
    /* Prepares to run m: weights where the backend wants them, KV storage for *kv_blocks blocks
     * (set from o->kv_blocks, or as many as o->kv_bytes holds), working memory for o->max_rows
     * rows and o->max_ctx positions. NULL + xp_last_error(). */
    void *(*create)(const xp_model *m, const xp_backend_opts *o, int *kv_blocks);
    void (*destroy)(void *ctx);
    /* Makes slot hold w under generation gen (w stays valid until the slot is loaded again or
     * the backend destroyed). A device backend copies it, possibly asynchronously: forward
     * orders itself after the copy. */
    int (*adapter_load)(void *ctx, int slot, uint32_t gen, const xp_lora_weights *w);
    /* Writes K/V of every row into its sequence's blocks, attends causally over each row's
     * sequence up to its position, and leaves the logits of out_rows in b->logits. */
    int (*forward)(void *ctx, const xp_batch *b);
    /* Read bandwidth, bytes/s, of the memory the weights live in (measured now; for bench). */
    double (*read_bandwidth)(void *ctx);
};

/* For a backend's create: the KV blocks o asks for (o->kv_blocks, or as many blocks of
 * block_bytes as o->kv_bytes holds, at most 2^24); -1 with an error if not even one. */
int xp_backend_kv_blocks(const xp_backend_opts *o, size_t block_bytes, int *blocks);

/* The one place a backend is chosen. name: "cpu", "cuda", "auto" (CUDA when built in and a GPU
 * starts, else the CPU), or NULL/"" for $XPREC_BACKEND, else "cpu". Creates it for m. */
int xp_backend_open(const char *name, const xp_model *m, const xp_backend_opts *o,
                    const xp_backend **be, void **ctx, int *kv_blocks);

extern const xp_backend xp_backend_cpu;
/* NULL when this build has no CUDA backend. */
const xp_backend *xp_backend_cuda(void);

#endif
