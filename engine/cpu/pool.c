#include "pool.h"

#include <pthread.h>
#include <stdlib.h>

struct xp_pool {
    int threads;
    pthread_t *tid;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    void (*fn)(void *, int, int);
    void *ctx;
    int ntasks, next, running;
    unsigned generation;
    int quit;
};

typedef struct {
    xp_pool *p;
    int index;
} xp_worker_arg;

/* Takes tasks until none are left; called with the mutex held, returns with it held. */
static void xp_pool_drain(xp_pool *p, int thread)
{
    while (p->next < p->ntasks) {
        int t = p->next++;
        pthread_mutex_unlock(&p->mu);
        p->fn(p->ctx, t, thread);
        pthread_mutex_lock(&p->mu);
    }
}

static void *xp_worker(void *arg)
{
    xp_worker_arg *a = arg;
    xp_pool *p = a->p;
    int index = a->index;
    free(a);
    unsigned seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen) pthread_cond_wait(&p->work, &p->mu);
        if (p->quit) break;
        seen = p->generation;
        p->running++;
        xp_pool_drain(p, index);
        if (--p->running == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
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
        a->p = p;
        a->index = i;
        if (pthread_create(&p->tid[i], NULL, xp_worker, a) != 0) {
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
    p->quit = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->threads; i++) pthread_join(p->tid[i], NULL);
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
        for (int t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    p->next = 0;
    p->generation++;
    pthread_cond_broadcast(&p->work);
    p->running++;
    xp_pool_drain(p, 0);
    p->running--;
    while (p->running > 0 || p->next < p->ntasks) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
