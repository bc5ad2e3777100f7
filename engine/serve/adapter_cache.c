/* Adapter residency: at most max_adapters adapters hold their weights in memory; those in use
 * by a running sequence are pinned, and the least recently used unpinned one makes room when another is needed. Evicted adapters reload from disk on demand. */
#include "serve/engine_impl.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static double xp_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

xp_adapter *xp_adapter_find(xp_engine *e, const char *name)
{
    for (xp_adapter *a = e->adapters; a; a = a->next)
        if (!a->removed && strcmp(a->name, name) == 0) return a;
    return NULL;
}

static int xp_resident_count(const xp_engine *e)
{
    int n = 0;
    for (const xp_adapter *a = e->adapters; a; a = a->next) n += a->resident;
    return n;
}

int xp_engine_add_adapter(xp_engine *e, const char *name, const char *dir)
{
    if (!name || !*name || strlen(name) > 256) return xp_fail("adapter name is empty or too long");
    xp_adapter *a = calloc(1, sizeof *a);
    if (!a || !(a->name = strdup(name)) || !(a->dir = strdup(dir))) {
        if (a) free(a->name);
        free(a);
        return xp_fail("out of memory");
    }
    double t0 = xp_mono();
    /* validate fully now, so a bad adapter is refused at registration, not on first use */
    if (xp_lora_load(dir, &e->model->cfg, &a->w) < 0) {
        free(a->name);
        free(a->dir);
        free(a);
        return -1;
    }
    double dt = xp_mono() - t0;
    pthread_mutex_lock(&e->mu);
    if (xp_adapter_find(e, name)) {
        pthread_mutex_unlock(&e->mu);
        xp_lora_free(&a->w);
        free(a->name);
        free(a->dir);
        free(a);
        return xp_fail("adapter \"%s\" is already registered", name);
    }
    if (xp_resident_count(e) < e->o.max_adapters) {
        a->resident = 1;
        e->st.adapter_load_seconds += dt;
    } else {
        xp_lora_free(&a->w);
    }
    a->next = e->adapters;
    e->adapters = a;
    e->st.adapters_registered++;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

static void xp_adapter_destroy(xp_engine *e, xp_adapter *a)
{
    /* a device backend may hold a copy keyed by this address */
    if (a->resident && e->rt && e->be->forget_adapter) e->be->forget_adapter(e->rt, &a->w);
    xp_lora_free(&a->w);
    free(a->name);
    free(a->dir);
    free(a);
}

/* Frees removed adapters nobody uses any more. Called with mu held. */
static void xp_adapters_collect(xp_engine *e)
{
    for (xp_adapter **p = &e->adapters; *p;) {
        xp_adapter *a = *p;
        if (a->removed && a->holds == 0) {
            *p = a->next;
            xp_adapter_destroy(e, a);
        } else {
            p = &a->next;
        }
    }
}

int xp_engine_remove_adapter(xp_engine *e, const char *name)
{
    pthread_mutex_lock(&e->mu);
    xp_adapter *a = xp_adapter_find(e, name);
    if (a) {
        a->removed = 1;
        e->st.adapters_registered--;
        xp_adapters_collect(e);
    }
    pthread_mutex_unlock(&e->mu);
    return a ? 0 : xp_fail("adapter \"%s\" is not registered", name);
}

int xp_adapter_acquire(xp_engine *e, xp_adapter *ad)
{
    pthread_mutex_lock(&e->mu);
    if (ad->resident) {
        ad->pins++;
        ad->last_used = e->st.steps;
        e->st.adapter_hits++;
        pthread_mutex_unlock(&e->mu);
        return 1;
    }
    if (xp_resident_count(e) >= e->o.max_adapters) {
        xp_adapter *lru = NULL;
        for (xp_adapter *a = e->adapters; a; a = a->next)
            if (a->resident && a->pins == 0 && (!lru || a->last_used < lru->last_used)) lru = a;
        if (!lru) {
            pthread_mutex_unlock(&e->mu);
            return 0;
        }
        if (e->be->forget_adapter) e->be->forget_adapter(e->rt, &lru->w);
        xp_lora_free(&lru->w);
        lru->resident = 0;
        e->st.adapter_evictions++;
    }
    /* claim the slot and the adapter before loading outside the lock */
    ad->resident = 1;
    ad->pins++;
    e->st.adapter_misses++;
    pthread_mutex_unlock(&e->mu);
    double t0 = xp_mono();
    xp_lora_weights w;
    int rc = xp_lora_load(ad->dir, &e->model->cfg, &w);
    pthread_mutex_lock(&e->mu);
    e->st.adapter_load_seconds += xp_mono() - t0;
    if (rc < 0) {
        ad->resident = 0;
        ad->pins--;
    } else {
        ad->w = w;
        ad->last_used = e->st.steps;
    }
    pthread_mutex_unlock(&e->mu);
    return rc < 0 ? -1 : 1;
}

void xp_adapter_release(xp_engine *e, xp_adapter *ad, int pinned)
{
    pthread_mutex_lock(&e->mu);
    ad->pins -= pinned;
    ad->holds--;
    ad->last_used = e->st.steps;
    xp_adapters_collect(e);
    pthread_mutex_unlock(&e->mu);
}

void xp_adapters_free(xp_engine *e)
{
    for (xp_adapter *a = e->adapters, *next; a; a = next) {
        next = a->next;
        xp_adapter_destroy(e, a);
    }
    e->adapters = NULL;
}
