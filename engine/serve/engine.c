/* The engine's lifetime and its public accessors: load the model and tokenizer, open the
 * backend, start the intake, step and loader threads; stop and free them. Requests come in
 * through intake.c, run in scheduler.c and answer through reply.c; adapters live in
 * adapter_cache.c. */
#include "serve/engine_impl.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XP_DEFAULT_KV (256u << 20)

void xp_engine_wake_locked(void *arg)
{
    xp_engine *e = arg;
    e->wake++;
    pthread_cond_signal(&e->cv);
}

static int xp_engine_alloc_batch(xp_engine *e)
{
    int rows = e->o.prefill_chunk, mb = e->o.max_batch;
    size_t vocab = (size_t)e->model->cfg.vocab_size;
    e->max_out = mb + XP_PLP_ROWS;
    e->logits = malloc((size_t)e->max_out * vocab * sizeof *e->logits);
    e->lp_row = malloc(vocab * sizeof *e->lp_row);
    e->sample_idx = malloc(vocab * sizeof *e->sample_idx);
    e->run = calloc((size_t)mb, sizeof *e->run);
    e->batch_seqs = calloc((size_t)mb, sizeof *e->batch_seqs);
    e->b_out_rows = calloc((size_t)e->max_out, sizeof *e->b_out_rows);
    e->b_groups = calloc((size_t)mb, sizeof *e->b_groups);
    e->b_tokens = calloc((size_t)rows, sizeof *e->b_tokens);
    e->b_pos = calloc((size_t)rows, sizeof *e->b_pos);
    e->b_tables = calloc((size_t)rows, sizeof *e->b_tables);
    e->backend_gen = calloc((size_t)e->o.max_adapters, sizeof *e->backend_gen);
    if (!e->logits || !e->lp_row || !e->sample_idx || !e->run || !e->batch_seqs ||
        !e->b_out_rows || !e->b_groups || !e->b_tokens || !e->b_pos || !e->b_tables ||
        !e->backend_gen)
        return xp_fail("out of memory");
    return 0;
}

xp_engine *xp_engine_create(const char *model_dir, const xp_engine_opts *opts)
{
    xp_engine *e = calloc(1, sizeof *e);
    if (!e) {
        xp_fail("out of memory");
        return NULL;
    }
    if (opts) e->o = *opts;
    if (!e->o.kv_bytes) e->o.kv_bytes = XP_DEFAULT_KV;
    if (e->o.max_batch <= 0) e->o.max_batch = 32;
    if (e->o.max_adapters <= 0) e->o.max_adapters = 8;
    if (e->o.prefill_chunk <= 0) e->o.prefill_chunk = 256;
    if (e->o.prefill_chunk < e->o.max_batch) e->o.prefill_chunk = e->o.max_batch;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    pthread_cond_init(&e->intake_cv, NULL);
    e->intake_tail = &e->intake;
    if (xp_model_load(model_dir, &e->model) < 0) goto fail;
    if (!(e->tok = xp_tokenizer_load(model_dir))) goto fail;
    const xp_qwen3_config *g = &e->model->cfg;
    xp_backend_opts bo = {.threads = e->o.threads,
                          .max_rows = e->o.prefill_chunk,
                          .max_ctx = g->max_position_embeddings,
                          .adapter_slots = e->o.max_adapters,
                          .kv_bytes = e->o.kv_bytes,
                          .device = e->o.device};
    int blocks = 0;
    if (xp_backend_open(e->o.backend, e->model, &bo, &e->be, &e->rt, &blocks) < 0) goto fail;
    if (xp_kv_blocks_init(&e->kv, blocks) < 0) goto fail;
    /* the context is what the cache holds, so a sequence alone always fits */
    e->context = g->max_position_embeddings;
    if (e->context > blocks * XP_KV_BLOCK) e->context = blocks * XP_KV_BLOCK;
    if (xp_engine_alloc_batch(e) < 0) goto fail;
    e->st.kv_blocks_total = e->st.kv_blocks_free = blocks;
    if (xp_acache_init(&e->ac, g, e->o.max_adapters, &e->mu, xp_engine_wake_locked, e) < 0)
        goto fail;
    if (pthread_create(&e->intake_thread, NULL, xp_intake_main, e) != 0) {
        xp_fail("cannot start the engine's intake thread");
        goto fail;
    }
    e->intake_started = 1;
    if (pthread_create(&e->thread, NULL, xp_step_main, e) != 0) {
        xp_fail("cannot start the engine thread");
        goto fail;
    }
    e->started = 1;
    return e;
fail:
    xp_engine_destroy(e);
    return NULL;
}

void xp_engine_destroy(xp_engine *e)
{
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->quit = 1;
    pthread_cond_signal(&e->cv);
    pthread_cond_signal(&e->intake_cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started) pthread_join(e->thread, NULL);
    if (e->intake_started) pthread_join(e->intake_thread, NULL);
    /* everything still in flight ends as cancelled, so no caller waits forever */
    pthread_mutex_lock(&e->mu);
    xp_intake_drain(e);
    pthread_mutex_unlock(&e->mu);
    if (e->started) xp_sched_drain(e);
    xp_acache_free(&e->ac);
    if (e->rt) e->be->destroy(e->rt);
    xp_kv_blocks_free(&e->kv);
    xp_tokenizer_free(e->tok);
    xp_model_free(e->model);
    free(e->logits);
    free(e->lp_row);
    free(e->sample_idx);
    free(e->run);
    free(e->batch_seqs);
    free(e->b_out_rows);
    free(e->b_groups);
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_tables);
    free(e->backend_gen);
    free(e->cancels);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_cond_destroy(&e->intake_cv);
    free(e);
}

static double xp_engine_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int xp_adapter_name_ok(const char *name)
{
    if (!name || !*name || strlen(name) > 120)
        return xp_fail("adapter name is empty or longer than 120 bytes");
    return 0;
}

int xp_engine_add_adapter(xp_engine *e, const char *name, const char *dir, unsigned flags)
{
    if (xp_adapter_name_ok(name) < 0) return -1;
    xp_lora_weights w;
    /* validate fully now, so a bad adapter is refused at registration, not on first use */
    double t0 = xp_engine_now();
    if (xp_lora_load(dir, &e->model->cfg, &w) < 0) return -1;
    double secs = xp_engine_now() - t0;
    pthread_mutex_lock(&e->mu);
    int rc = xp_acache_register(&e->ac, name, dir, flags, &w, secs);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

uint64_t xp_engine_add_adapter_async(xp_engine *e, const char *name, const char *dir,
                                     unsigned flags, xp_queue *q)
{
    if (!q) {
        xp_fail("no event queue");
        return 0;
    }
    if (xp_adapter_name_ok(name) < 0) return 0;
    pthread_mutex_lock(&e->mu);
    uint64_t id = ++e->next_id;
    int rc = xp_acache_register_async(&e->ac, name, dir, flags, q, id);
    pthread_mutex_unlock(&e->mu);
    return rc < 0 ? 0 : id;
}

int xp_engine_remove_adapter(xp_engine *e, const char *name)
{
    pthread_mutex_lock(&e->mu);
    int rc = xp_acache_remove(&e->ac, name);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int xp_engine_adapters(xp_engine *e, xp_adapter_info *out, int max)
{
    pthread_mutex_lock(&e->mu);
    int n = xp_acache_info(&e->ac, out, max);
    pthread_mutex_unlock(&e->mu);
    return n;
}

void xp_engine_stats_get(xp_engine *e, xp_engine_stats *s)
{
    pthread_mutex_lock(&e->mu);
    *s = e->st;
    s->adapters_registered = e->ac.registered;
    s->adapters_resident = xp_acache_resident(&e->ac);
    s->adapter_hits = e->ac.hits;
    s->adapter_misses = e->ac.misses;
    s->adapter_evictions = e->ac.evictions;
    s->adapter_loads = e->ac.loads;
    s->adapter_load_seconds = e->ac.load_seconds;
    pthread_mutex_unlock(&e->mu);
}

const char *xp_engine_backend(const xp_engine *e)
{
    return e->be->name;
}

int xp_engine_context(const xp_engine *e)
{
    return e->context;
}

size_t xp_engine_kv_block_bytes(const xp_engine *e)
{
    return e->be->kv_block_bytes(e->model);
}

uint64_t xp_engine_step_bytes(const xp_engine *e)
{
    return xp_model_step_bytes(e->model);
}

const char *xp_engine_token_bytes(const xp_engine *e, int32_t id, size_t *len)
{
    return xp_tokenizer_token_bytes(e->tok, id, len);
}

char *xp_engine_decode(const xp_engine *e, const int32_t *ids, size_t n, size_t *len)
{
    return xp_tokenizer_decode(e->tok, ids, n, len);
}

double xp_engine_read_bandwidth(xp_engine *e)
{
    return e->be->read_bandwidth ? e->be->read_bandwidth(e->rt) : 0;
}
