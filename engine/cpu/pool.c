/* A decode step calls the pool a few hundred times for a few tens of microseconds each, so waking
 * sleeping threads through the kernel on every call cost as much as the work. Workers and the
 * caller therefore spin a little while (XP_POOL_SPIN) before they sleep: within a step they never
 * sleep, between steps and when idle they do.
 *
 * Tasks are claimed from one 64-bit word holding (generation << 32 | next task), so a worker that
 * is late from the previous call can never take a task of the next one with the old job. */
#include "cpu/pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#define XP_POOL_SPIN 20000 /* pause instructions, some 100-300 us */

typedef void (*xp_pool_fn)(void *, int, int);

struct xp_pool {
    int threads;
    pthread_t *tid;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    /* the job of the current generation, written before the generation is published; atomic
     * because a worker late from the previous call may still read them (and then finds nothing
     * left to claim under its generation) */
    _Atomic(xp_pool_fn) fn;
    _Atomic(void *) ctx;
    atomic_int ntasks;
    atomic_uint generation;
    atomic_uint_fast64_t claim; /* generation << 32 | next task */
    atomic_int finished;        /* tasks of this generation completed */
    atomic_int sleepers;        /* workers waiting on `work` */
    atomic_int caller_sleeping;
    atomic_int quit;
};

typedef struct {
    xp_pool *p;
    int index;
} xp_worker_arg;

static inline void xp_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Runs tasks of generation gen until none are left to claim. The job is read once, after the
 * generation: a claim succeeds only while `claim` still names gen, so the job read is gen's. */
static void xp_pool_drain(xp_pool *p, unsigned gen, int thread)
{
    xp_pool_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
    void *ctx = atomic_load_explicit(&p->ctx, memory_order_relaxed);
    int ntasks = atomic_load_explicit(&p->ntasks, memory_order_relaxed);
    for (;;) {
        uint_fast64_t c = atomic_load(&p->claim);
        if ((unsigned)(c >> 32) != gen || (int)(c & 0xffffffffu) >= ntasks) return;
        if (!atomic_compare_exchange_weak(&p->claim, &c, c + 1)) continue;
        fn(ctx, (int)(c & 0xffffffffu), thread);
        if (atomic_fetch_add(&p->finished, 1) + 1 == ntasks && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static void *xp_worker(void *arg)
{
    xp_worker_arg *a = arg;
    xp_pool *p = a->p;
    int index = a->index;
    free(a);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load(&p->generation);
        for (int i = 0; i < XP_POOL_SPIN && g == seen && !atomic_load(&p->quit); i++) {
            xp_pause();
            g = atomic_load(&p->generation);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->quit))
                pthread_cond_wait(&p->work, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->quit)) break;
        seen = g;
        xp_pool_drain(p, g, index);
    }
    return NULL;
}

xp_pool *xp_pool_create(int threads)
{
    xp_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = threads < 1 ? 1 : threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    p->tid = calloc((size_t)p->threads, sizeof *p->tid);
    if (!p->tid) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < p->threads; i++) {
        xp_worker_arg *a = malloc(sizeof *a);
        if (!a || (a->p = p, a->index = i, pthread_create(&p->tid[i], NULL, xp_worker, a) != 0)) {
            free(a);
            p->threads = i; /* run with the threads we got */
            break;
        }
    }
    return p;
}

void xp_pool_destroy(xp_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->quit, 1);
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->threads; i++)
        pthread_join(p->tid[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    free(p->tid);
    free(p);
}

int xp_pool_threads(const xp_pool *p)
{
    return p->threads;
}

void xp_pool_run(xp_pool *p, int ntasks, void (*fn)(void *ctx, int task, int thread), void *ctx)
{
    if (ntasks <= 0) return;
    if (p->threads == 1 || ntasks == 1) {
        for (int t = 0; t < ntasks; t++)
            fn(ctx, t, 0);
        return;
    }
    /* Every task of the previous generation has finished (we waited for it). `claim` moves to
     * the new generation before the job fields change, so a worker late from the previous call
     * that reads a half-written job cannot claim anything with it; workers of the new
     * generation read the job only after seeing `generation`, stored last. */
    unsigned gen = atomic_load(&p->generation) + 1;
    atomic_store(&p->finished, 0);
    atomic_store(&p->claim, (uint_fast64_t)gen << 32);
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&p->ntasks, ntasks, memory_order_relaxed);
    atomic_store(&p->generation, gen);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->work);
        pthread_mutex_unlock(&p->mu);
    }
    xp_pool_drain(p, gen, 0);
    for (int i = 0; i < XP_POOL_SPIN && atomic_load(&p->finished) < ntasks; i++)
        xp_pause();
    if (atomic_load(&p->finished) < ntasks) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_sleeping, 1);
        while (atomic_load(&p->finished) < ntasks)
            pthread_cond_wait(&p->done, &p->mu);
        atomic_store(&p->caller_sleeping, 0);
        pthread_mutex_unlock(&p->mu);
    }
}
