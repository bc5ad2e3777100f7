/* A fixed set of worker threads that run numbered tasks; the calling thread works too. */
#ifndef XP_POOL_H
#define XP_POOL_H

typedef struct xp_pool xp_pool;

/* threads: total threads including the caller (1 = no workers). */
xp_pool *xp_pool_create(int threads);
void xp_pool_destroy(xp_pool *p);
int xp_pool_threads(const xp_pool *p);
/* Runs fn(ctx, task, thread) for task = 0..ntasks-1 across the threads and returns when all are
 * done. thread is in [0, threads): an index for per-thread scratch. */
void xp_pool_run(xp_pool *p, int ntasks, void (*fn)(void *ctx, int task, int thread), void *ctx);

#endif
