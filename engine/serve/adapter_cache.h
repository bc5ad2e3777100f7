/* Adapter residency: which registered adapters hold one of the engine's adapter slots, and the
 * loader thread that brings them in from disk.
 *
 * A slot holds one adapter's host weights (and, through the backend, its device copy). An
 * adapter is on disk, loading (a slot reserved, the loader thread reading it), or resident.
 * Admitted sequences use their adapter (users), so it is never evicted under them; pinned
 * adapters are never evicted at all; among the rest the least recently used idle one makes room.
 * Loads never run on the step thread, so a cold adapter delays only the requests that need it.
 *
 * Every function here is called with the engine's mutex held (the loader thread takes it
 * itself), except init and free. */
#ifndef XP_ADAPTER_CACHE_H
#define XP_ADAPTER_CACHE_H

#include "model/lora.h"
#include "xprec.h"

#include <pthread.h>

typedef struct xp_adapter {
    char *name, *dir;
    unsigned flags; /* XP_ADAPTER_PINNED */
    xp_adapter_tier tier;
    int slot;           /* LOADING and RESIDENT: the slot it has */
    xp_lora_weights w;  /* RESIDENT */
    char *error;        /* the last load failed: why (requests waiting for it fail with it) */
    int removed;
    int holds; /* requests naming it, from submit to their end: keep the record */
    int users; /* admitted sequences: keep the weights */
    uint64_t last_used; /* cache tick of last use, for LRU */
    double last_time;   /* when it was last used or registered */
    uint64_t hits, misses, loads, evictions;
    double load_seconds;
    struct xp_adapter *next;
} xp_adapter;

typedef struct xp_load_job xp_load_job;

typedef struct {
    const xp_qwen3_config *cfg;
    pthread_mutex_t *mu; /* the engine's */
    void (*wake)(void *arg);
    void *wake_arg; /* wake(wake_arg) with mu held: a load ended, admission may go on */
    int n_slots;
    xp_adapter **slot_of; /* [n_slots]: the adapter in each slot, NULL when free */
    uint32_t *slot_gen;   /* [n_slots]: bumped whenever a slot's weights change */
    xp_adapter *list;
    int registered;
    uint64_t tick;
    uint64_t hits, misses, evictions, loads;
    double load_seconds;
    /* the loader thread and its jobs */
    pthread_t loader;
    pthread_cond_t loader_cv;
    int started, quit;
    xp_load_job *jobs, **jobs_tail;
} xp_adapter_cache;

int xp_acache_init(xp_adapter_cache *c, const xp_qwen3_config *cfg, int n_slots,
                   pthread_mutex_t *mu, void (*wake)(void *), void *wake_arg);
/* Stops the loader (called without mu) and frees every adapter. */
void xp_acache_free(xp_adapter_cache *c);

xp_adapter *xp_acache_find(xp_adapter_cache *c, const char *name);
/* Registers an adapter whose weights w were just loaded and checked in secs seconds (taken
 * over: kept in a slot when one is free or, for a pinned one, can be made free; freed
 * otherwise). */
int xp_acache_register(xp_adapter_cache *c, const char *name, const char *dir, unsigned flags,
                       xp_lora_weights *w, double secs);
/* Queues a registration for the loader thread, which pushes DONE or ERROR with id to q. */
int xp_acache_register_async(xp_adapter_cache *c, const char *name, const char *dir,
                             unsigned flags, xp_queue *q, uint64_t id);
int xp_acache_remove(xp_adapter_cache *c, const char *name);

/* A request names ad: keep its record until xp_acache_release. */
void xp_acache_hold(xp_adapter *ad);
/* Makes ad usable for a sequence about to be admitted. 1: resident, and now used by one more
 * sequence; 0: not yet (a load is running or no slot can be freed now; the engine is woken
 * when that changes); -1: its load failed (error set). *counted: whether this request's hit
 * or miss was counted already (set here). */
int xp_acache_acquire(xp_adapter_cache *c, xp_adapter *ad, int *counted);
/* A request naming ad ends: drops its hold, and its use when it was admitted. */
void xp_acache_release(xp_adapter_cache *c, xp_adapter *ad, int used);
/* After an admission pass: failed loads may be tried again by later requests. */
void xp_acache_end_pass(xp_adapter_cache *c);
int xp_acache_resident(const xp_adapter_cache *c);
int xp_acache_info(xp_adapter_cache *c, xp_adapter_info *out, int max);

#endif
