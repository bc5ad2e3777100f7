#include "serve/adapter_cache.h"
#include "serve/queue.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A job for the loader thread: bring a registered adapter into its reserved slot, or (ad NULL)
 * validate, load and register a new one for xp_engine_add_adapter_async. */
struct xp_load_job {
    xp_adapter *ad;
    char *name, *dir;
    unsigned flags;
    xp_queue *q;
    uint64_t id;
    struct xp_load_job *next;
};

static double xp_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void xp_job_free(xp_load_job *j)
{
    free(j->name);
    free(j->dir);
    free(j);
}

static void xp_acache_push_job(xp_adapter_cache *c, xp_load_job *j)
{
    j->next = NULL;
    *c->jobs_tail = j;
    c->jobs_tail = &j->next;
    pthread_cond_signal(&c->loader_cv);
}

xp_adapter *xp_acache_find(xp_adapter_cache *c, const char *name)
{
    for (xp_adapter *a = c->list; a; a = a->next)
        if (!a->removed && strcmp(a->name, name) == 0) return a;
    return NULL;
}

int xp_acache_resident(const xp_adapter_cache *c)
{
    int n = 0;
    for (int i = 0; i < c->n_slots; i++)
        n += c->slot_of[i] && c->slot_of[i]->tier == XP_TIER_RESIDENT;
    return n;
}

/* Gives ad's slot back (its weights are freed; the backend's copy is simply overwritten by the
 * slot's next occupant, which comes with a new generation). */
static void xp_acache_unslot(xp_adapter_cache *c, xp_adapter *ad)
{
    if (ad->tier == XP_TIER_DISK) return;
    c->slot_of[ad->slot] = NULL;
    c->slot_gen[ad->slot]++;
    xp_lora_free(&ad->w);
    ad->tier = XP_TIER_DISK;
    ad->slot = -1;
}

/* A free slot, or one taken from the least recently used idle adapter that is not pinned
 * (preferring one no request is waiting for); -1 when every slot is busy or pinned. */
static int xp_acache_take_slot(xp_adapter_cache *c)
{
    xp_adapter *lru = NULL;
    for (int i = 0; i < c->n_slots; i++) {
        xp_adapter *a = c->slot_of[i];
        if (!a) return i;
        if (a->tier != XP_TIER_RESIDENT || a->users || (a->flags & XP_ADAPTER_PINNED)) continue;
        if (!lru || (a->holds > 0) < (lru->holds > 0) ||
            ((a->holds > 0) == (lru->holds > 0) && a->last_used < lru->last_used))
            lru = a;
    }
    if (!lru) return -1;
    int slot = lru->slot;
    xp_acache_unslot(c, lru);
    lru->evictions++;
    c->evictions++;
    return slot;
}

static void xp_adapter_destroy(xp_adapter_cache *c, xp_adapter *a)
{
    xp_acache_unslot(c, a);
    free(a->name);
    free(a->dir);
    free(a->error);
    free(a);
}

/* Frees removed adapters nobody uses any more (a loading one is freed when its load ends). */
static void xp_acache_collect(xp_adapter_cache *c)
{
    for (xp_adapter **p = &c->list; *p;) {
        xp_adapter *a = *p;
        if (a->removed && a->holds == 0 && a->tier != XP_TIER_LOADING) {
            *p = a->next;
            xp_adapter_destroy(c, a);
        } else {
            p = &a->next;
        }
    }
}

int xp_acache_register(xp_adapter_cache *c, const char *name, const char *dir, unsigned flags,
                       xp_lora_weights *w, double secs)
{
    if (xp_acache_find(c, name)) {
        xp_lora_free(w);
        return xp_fail("adapter \"%s\" is already registered", name);
    }
    xp_adapter *a = calloc(1, sizeof *a);
    if (!a || !(a->name = strdup(name)) || !(a->dir = strdup(dir))) {
        if (a) free(a->name);
        free(a);
        xp_lora_free(w);
        return xp_fail("out of memory");
    }
    a->flags = flags;
    a->slot = -1;
    a->load_seconds = secs;
    c->load_seconds += secs;
    a->last_time = xp_mono();
    a->last_used = c->tick;
    /* a free slot takes it now; a pinned one may also evict an idle adapter */
    int slot = -1;
    for (int i = 0; i < c->n_slots && slot < 0; i++)
        if (!c->slot_of[i]) slot = i;
    if (slot < 0 && (flags & XP_ADAPTER_PINNED)) slot = xp_acache_take_slot(c);
    if (slot < 0 && (flags & XP_ADAPTER_PINNED)) {
        free(a->name);
        free(a->dir);
        free(a);
        xp_lora_free(w);
        return xp_fail("adapter \"%s\" cannot be pinned: all %d adapter slots are pinned or in "
                       "use (raise max_adapters)",
                       name, c->n_slots);
    }
    if (slot >= 0) {
        a->w = *w;
        a->tier = XP_TIER_RESIDENT;
        a->slot = slot;
        a->loads = 1;
        c->loads++;
        c->slot_of[slot] = a;
        c->slot_gen[slot]++;
    } else {
        xp_lora_free(w);
    }
    memset(w, 0, sizeof *w);
    a->next = c->list;
    c->list = a;
    c->registered++;
    return 0;
}

int xp_acache_register_async(xp_adapter_cache *c, const char *name, const char *dir,
                             unsigned flags, xp_queue *q, uint64_t id)
{
    if (xp_acache_find(c, name)) return xp_fail("adapter \"%s\" is already registered", name);
    xp_load_job *j = calloc(1, sizeof *j);
    if (!j || !(j->name = strdup(name)) || !(j->dir = strdup(dir))) {
        if (j) xp_job_free(j);
        return xp_fail("out of memory");
    }
    j->flags = flags;
    j->q = q;
    j->id = id;
    xp_acache_push_job(c, j);
    return 0;
}

int xp_acache_remove(xp_adapter_cache *c, const char *name)
{
    xp_adapter *a = xp_acache_find(c, name);
    if (!a) return xp_fail("adapter \"%s\" is not registered", name);
    a->removed = 1;
    c->registered--;
    xp_acache_collect(c);
    return 0;
}

void xp_acache_hold(xp_adapter *ad)
{
    ad->holds++;
}

int xp_acache_acquire(xp_adapter_cache *c, xp_adapter *ad, int *counted)
{
    if (ad->error) return xp_fail("%s", ad->error);
    if (ad->tier == XP_TIER_RESIDENT) {
        if (!*counted) ad->hits++, c->hits++;
        *counted = 1;
        ad->users++;
        ad->last_used = ++c->tick;
        return 1;
    }
    if (!*counted) ad->misses++, c->misses++;
    *counted = 1;
    if (ad->tier == XP_TIER_LOADING) return 0;
    int slot = xp_acache_take_slot(c);
    if (slot < 0) {
        int pinned = 0;
        for (int i = 0; i < c->n_slots; i++)
            pinned += c->slot_of[i] && (c->slot_of[i]->flags & XP_ADAPTER_PINNED);
        if (pinned == c->n_slots)
            return xp_fail("adapter \"%s\" cannot load: all %d adapter slots hold pinned adapters "
                           "(raise max_adapters)",
                           ad->name, c->n_slots);
        return 0; /* every slot is in use: a release wakes the engine */
    }
    xp_load_job *j = calloc(1, sizeof *j);
    if (!j) return xp_fail("out of memory");
    ad->tier = XP_TIER_LOADING;
    ad->slot = slot;
    c->slot_of[slot] = ad;
    ad->holds++; /* the job keeps the record alive */
    j->ad = ad;
    xp_acache_push_job(c, j);
    return 0;
}

void xp_acache_release(xp_adapter_cache *c, xp_adapter *ad, int used)
{
    ad->users -= used;
    ad->holds--;
    ad->last_used = ++c->tick;
    ad->last_time = xp_mono();
    xp_acache_collect(c);
}

void xp_acache_end_pass(xp_adapter_cache *c)
{
    for (xp_adapter *a = c->list; a; a = a->next) {
        free(a->error);
        a->error = NULL;
    }
}

int xp_acache_info(xp_adapter_cache *c, xp_adapter_info *out, int max)
{
    int n = 0;
    double now = xp_mono();
    for (xp_adapter *a = c->list; a; a = a->next) {
        if (a->removed) continue;
        if (n < max) {
            xp_adapter_info *i = &out[n];
            memset(i, 0, sizeof *i);
            snprintf(i->name, sizeof i->name, "%s", a->name);
            i->tier = a->tier;
            i->pinned = !!(a->flags & XP_ADAPTER_PINNED);
            i->running = a->users;
            i->rank = a->tier == XP_TIER_RESIDENT ? a->w.max_rank : 0;
            i->hits = a->hits;
            i->misses = a->misses;
            i->loads = a->loads;
            i->evictions = a->evictions;
            i->load_seconds = a->load_seconds;
            i->idle_seconds = a->users ? 0 : now - a->last_time;
        }
        n++;
    }
    return n;
}

/* ---------------------------------------------------------------- the loader thread */

/* A load for a registered adapter ended (mu held): its weights go into the slot it reserved,
 * or, when it was removed meanwhile or the load failed, the slot is given back. */
static void xp_acache_load_done(xp_adapter_cache *c, xp_adapter *ad, int rc,
                                xp_lora_weights *w, double secs)
{
    ad->load_seconds += secs;
    c->load_seconds += secs;
    ad->holds--;
    if (rc == 0 && !ad->removed) {
        ad->w = *w;
        ad->tier = XP_TIER_RESIDENT;
        ad->loads++;
        c->loads++;
        c->slot_gen[ad->slot]++;
    } else {
        if (rc == 0) xp_lora_free(w);
        c->slot_of[ad->slot] = NULL;
        c->slot_gen[ad->slot]++;
        ad->tier = XP_TIER_DISK;
        ad->slot = -1;
        if (rc < 0 && !ad->removed) {
            free(ad->error);
            ad->error = strdup(xp_last_error());
        }
    }
    xp_acache_collect(c);
}

static void *xp_loader_main(void *arg)
{
    xp_adapter_cache *c = arg;
    pthread_mutex_lock(c->mu);
    for (;;) {
        while (!c->quit && !c->jobs)
            pthread_cond_wait(&c->loader_cv, c->mu);
        if (c->quit) break;
        xp_load_job *j = c->jobs;
        c->jobs = j->next;
        if (!c->jobs) c->jobs_tail = &c->jobs;
        const char *dir = j->ad ? j->ad->dir : j->dir;
        char *path = strdup(dir);
        pthread_mutex_unlock(c->mu);
        /* the disk read and the checks, outside the lock */
        xp_lora_weights w;
        double t0 = xp_mono();
        int rc = path ? xp_lora_load(path, c->cfg, &w) : xp_fail("out of memory");
        double secs = xp_mono() - t0;
        free(path);
        pthread_mutex_lock(c->mu);
        if (j->ad) {
            xp_acache_load_done(c, j->ad, rc, &w, secs);
        } else {
            xp_event ev = {.id = j->id, .type = XP_EV_DONE};
            if (rc == 0) rc = xp_acache_register(c, j->name, j->dir, j->flags, &w, secs);
            if (rc < 0) {
                ev.type = XP_EV_ERROR;
                ev.error = strdup(xp_last_error());
            }
            xp_queue_push(j->q, &ev);
        }
        xp_job_free(j);
        c->wake(c->wake_arg);
    }
    pthread_mutex_unlock(c->mu);
    return NULL;
}

int xp_acache_init(xp_adapter_cache *c, const xp_qwen3_config *cfg, int n_slots,
                   pthread_mutex_t *mu, void (*wake)(void *), void *wake_arg)
{
    memset(c, 0, sizeof *c);
    c->cfg = cfg;
    c->mu = mu;
    c->wake = wake;
    c->wake_arg = wake_arg;
    c->n_slots = n_slots;
    c->jobs_tail = &c->jobs;
    c->slot_of = calloc((size_t)n_slots, sizeof *c->slot_of);
    c->slot_gen = calloc((size_t)n_slots, sizeof *c->slot_gen);
    if (!c->slot_of || !c->slot_gen) return xp_fail("out of memory");
    pthread_cond_init(&c->loader_cv, NULL);
    if (pthread_create(&c->loader, NULL, xp_loader_main, c) != 0) {
        pthread_cond_destroy(&c->loader_cv);
        return xp_fail("cannot start the adapter loader thread");
    }
    c->started = 1;
    return 0;
}

void xp_acache_free(xp_adapter_cache *c)
{
    if (c->started) {
        pthread_mutex_lock(c->mu);
        c->quit = 1;
        pthread_cond_signal(&c->loader_cv);
        pthread_mutex_unlock(c->mu);
        pthread_join(c->loader, NULL);
        pthread_cond_destroy(&c->loader_cv);
        c->started = 0;
    }
    /* jobs never run: registrations are answered, loads are simply dropped */
    for (xp_load_job *j = c->jobs, *next; j; j = next) {
        next = j->next;
        if (!j->ad) {
            xp_event ev = {.id = j->id, .type = XP_EV_ERROR, .error = strdup("the engine stopped")};
            xp_queue_push(j->q, &ev);
        }
        xp_job_free(j);
    }
    c->jobs = NULL;
    for (xp_adapter *a = c->list, *next; a; a = next) {
        next = a->next;
        if (a->tier == XP_TIER_LOADING) a->tier = XP_TIER_DISK; /* its job was dropped above */
        xp_adapter_destroy(c, a);
    }
    c->list = NULL;
    free(c->slot_of);
    free(c->slot_gen);
    c->slot_of = NULL;
    c->slot_gen = NULL;
}
