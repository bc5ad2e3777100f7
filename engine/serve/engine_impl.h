/* Engine internals shared by engine.c (requests, the step loop) and adapters.c (residency). */
#ifndef XP_ENGINE_IMPL_H
#define XP_ENGINE_IMPL_H

#include "backend.h"
#include "cpu/forward.h"
#include "util/rng.h"
#include "serve/sampler.h"
#include "tokenizer/tokenizer.h"
#include "xprec.h"

#include <pthread.h>

typedef struct xp_adapter {
    char *name, *dir;
    xp_lora_weights w;
    int resident, removed;
    int holds;          /* requests naming it, waiting or running: keep the record */
    int pins;           /* running sequences: keep the weights resident */
    uint64_t last_used; /* step of last use, for LRU */
    struct xp_adapter *next;
} xp_adapter;

typedef struct xp_seq {
    uint64_t id;
    xp_queue *q;
    xp_adapter *ad;
    int32_t *tokens; /* prompt, then generated */
    int n_prompt, n_tokens, n_cached, max_new;
    int32_t *blocks; /* block table, room for prompt + max_new positions */
    int n_blocks;    /* blocks held: enough for the tokens so far, taken as they grow */
    xp_sampling samp;
    xp_rng rng;
    char **stop;
    size_t n_stop, max_stop_len;
    int32_t *stop_ids;
    size_t n_stop_ids;
    xp_detok detok;
    char *text;      /* generated text so far */
    size_t text_len, text_cap, sent; /* bytes of text already sent */
    int pinned;      /* holds a pin on its adapter (from first admission to the end) */
    int take;        /* rows in the current step */
    struct xp_seq *next; /* incoming and waiting lists */
} xp_seq;

struct xp_engine {
    xp_model *model;
    xp_tokenizer *tok;
    xp_kv_cache kv;
    const xp_backend *be;
    void *rt; /* the backend's context */
    xp_engine_opts o;
    int context;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int quit;
    uint64_t next_id;
    xp_seq *incoming;  /* submitted, not yet seen by the step thread (under mu) */
    uint64_t *cancels; /* ids to cancel (under mu) */
    size_t n_cancels, cap_cancels;
    xp_adapter *adapters; /* under mu */
    /* step thread only */
    xp_seq *waiting;
    xp_seq **run; /* admitted sequences, at most max_batch */
    int n_running;
    int started;
    float *logits;       /* [max_batch, vocab] */
    int32_t *sample_idx; /* [vocab] */
    /* the batch being built, sized for max_batch sequences and prefill_chunk rows */
    xp_seq **batch_seqs, **b_out_seq;
    int32_t *b_out_rows, *b_tokens, *b_pos;
    int32_t **b_tables;
    xp_row_group *b_groups;
    xp_engine_stats st; /* under mu */
};

/* adapters.c: called with e->mu held. */
xp_adapter *xp_adapter_find(xp_engine *e, const char *name);
/* Pins ad resident, evicting the least recently used unpinned adapter if all slots are taken.
 * 1 done, 0 no slot free now (all pinned), -1 load failed (error set). Called without mu. */
int xp_adapter_acquire(xp_engine *e, xp_adapter *ad);
/* A request naming ad ends: drops its hold, and its pin when it was admitted. */
void xp_adapter_release(xp_engine *e, xp_adapter *ad, int pinned);
void xp_adapters_free(xp_engine *e);

int xp_queue_push(xp_queue *q, xp_event *ev);

#endif
