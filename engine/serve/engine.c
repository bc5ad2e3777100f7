/* The engine: requests in, token events out, one step thread running continuous batches.
 *
 * Each step admits waiting requests (when their adapter can be resident and KV blocks for the
 * whole request are free, so nothing fails half-way), builds one batch of rows — one decode row
 * per generating sequence plus prefill chunks of new prompts up to the row budget — grouped by
 * adapter, runs the forward pass, samples, and pushes events. */
#include "serve/engine_impl.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XP_DEFAULT_KV (256u << 20)

/* ---------------------------------------------------------------- requests */

static void xp_seq_free(xp_seq *s)
{
    if (!s) return;
    free(s->tokens);
    free(s->blocks);
    for (size_t i = 0; i < s->n_stop; i++)
        free(s->stop[i]);
    free(s->stop);
    free(s->stop_ids);
    xp_detok_free(&s->detok);
    free(s->text);
    free(s);
}

static int xp_seq_prompt(xp_engine *e, const xp_request *r, xp_seq *s)
{
    int32_t *ids = NULL;
    size_t n = 0;
    if (r->tokens) {
        if (r->prompt || r->messages) return xp_fail("give one of messages, prompt or tokens");
        for (size_t i = 0; i < r->n_tokens; i++)
            if (r->tokens[i] < 0 || r->tokens[i] >= e->model->cfg.vocab_size)
                return xp_fail("token id %d is outside the vocabulary", r->tokens[i]);
        if (!(ids = malloc((r->n_tokens ? r->n_tokens : 1) * sizeof *ids)))
            return xp_fail("out of memory");
        memcpy(ids, r->tokens, r->n_tokens * sizeof *ids);
        n = r->n_tokens;
    } else if (r->messages) {
        if (r->prompt) return xp_fail("give one of messages, prompt or tokens");
        char *text = xp_chat_build(r->messages, r->n_messages, 1, r->enable_thinking);
        if (!text) return -1;
        int rc = xp_tokenizer_encode(e->tok, text, strlen(text), 1, &ids, &n);
        free(text);
        if (rc < 0) return -1;
    } else if (r->prompt) {
        if (xp_tokenizer_encode(e->tok, r->prompt, strlen(r->prompt), 1, &ids, &n) < 0) return -1;
    } else {
        return xp_fail("the request has no messages, prompt or tokens");
    }
    if (n == 0) {
        free(ids);
        return xp_fail("the prompt is empty");
    }
    if ((int64_t)n >= e->context) {
        free(ids);
        return xp_fail("the prompt has %zu tokens; the context holds %d, including the reply", n,
                       e->context);
    }
    int room = e->context - (int)n;
    s->max_new = r->max_tokens > 0 && r->max_tokens < room ? r->max_tokens : room;
    s->n_prompt = s->n_tokens = (int)n;
    s->tokens = realloc(ids, ((size_t)n + (size_t)s->max_new) * sizeof *ids);
    if (!s->tokens) {
        free(ids);
        return xp_fail("out of memory");
    }
    return 0;
}

uint64_t xp_engine_submit(xp_engine *e, const xp_request *r, xp_queue *q)
{
    if (!q) {
        xp_fail("no event queue");
        return 0;
    }
    if (!(r->temperature >= 0) || r->temperature > 100 || r->top_p < 0 || r->top_k < 0 ||
        r->top_k > 1000000) {
        xp_fail("sampling parameters out of range");
        return 0;
    }
    xp_seq *s = calloc(1, sizeof *s);
    if (!s) {
        xp_fail("out of memory");
        return 0;
    }
    s->q = q;
    s->samp.temperature = r->temperature;
    s->samp.top_k = r->top_k;
    s->samp.top_p = r->top_p > 0 ? r->top_p : 1.0f;
    xp_detok_init(&s->detok, e->tok);
    if (xp_seq_prompt(e, r, s) < 0) goto fail;
    int need = xp_kv_blocks_for((int64_t)s->n_prompt + s->max_new);
    if (need > e->kv.n_blocks) {
        xp_fail("prompt and max_tokens need %d KV positions; the cache holds %d",
                s->n_prompt + s->max_new, e->kv.n_blocks * XP_KV_BLOCK);
        goto fail;
    }
    if (r->n_stop) {
        if (!(s->stop = calloc(r->n_stop, sizeof *s->stop))) goto oom;
        for (size_t i = 0; i < r->n_stop; i++) {
            if (!r->stop[i] || !*r->stop[i]) {
                xp_fail("stop strings must not be empty");
                goto fail;
            }
            if (!(s->stop[s->n_stop++] = strdup(r->stop[i]))) goto oom;
            size_t l = strlen(r->stop[i]);
            if (l > s->max_stop_len) s->max_stop_len = l;
        }
    }
    if (r->n_stop_ids) {
        if (!(s->stop_ids = malloc(r->n_stop_ids * sizeof *s->stop_ids))) goto oom;
        memcpy(s->stop_ids, r->stop_ids, r->n_stop_ids * sizeof *s->stop_ids);
        s->n_stop_ids = r->n_stop_ids;
    }
    pthread_mutex_lock(&e->mu);
    if (r->adapter && *r->adapter) {
        s->ad = xp_adapter_find(e, r->adapter);
        if (!s->ad) {
            pthread_mutex_unlock(&e->mu);
            xp_fail("adapter \"%s\" is not registered", r->adapter);
            goto fail;
        }
        s->ad->holds++; /* keeps a removed adapter's record alive until this request ends */
    }
    s->id = ++e->next_id;
    xp_rng_seed(&s->rng, r->seed ? r->seed : s->id * 0x9e3779b97f4a7c15ull, "sample");
    s->next = e->incoming;
    e->incoming = s;
    pthread_cond_signal(&e->cv);
    uint64_t id = s->id;
    pthread_mutex_unlock(&e->mu);
    return id;
oom:
    xp_fail("out of memory");
fail:
    xp_seq_free(s);
    return 0;
}

int xp_engine_cancel(xp_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    if (id == 0 || id > e->next_id) {
        rc = xp_fail("request %llu is unknown", (unsigned long long)id);
    } else if (e->n_cancels == e->cap_cancels) {
        size_t cap = e->cap_cancels ? 2 * e->cap_cancels : 16;
        uint64_t *c = realloc(e->cancels, cap * sizeof *c);
        if (!c)
            rc = xp_fail("out of memory");
        else
            e->cancels = c, e->cap_cancels = cap;
    }
    if (rc == 0) {
        e->cancels[e->n_cancels++] = id;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* ---------------------------------------------------------------- events */

static char *xp_strndup0(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static void xp_emit_text(xp_seq *s, int32_t token, size_t upto)
{
    xp_event ev = {.id = s->id, .type = XP_EV_TOKEN, .token = token};
    ev.text_len = upto > s->sent ? upto - s->sent : 0;
    ev.text = xp_strndup0(s->text + s->sent, ev.text_len);
    s->sent += ev.text_len;
    xp_queue_push(s->q, &ev);
}

/* Ends a sequence: the rest of its text (up to `upto`), the reason, usage; frees its blocks. */
static void xp_finish_seq(xp_engine *e, xp_seq *s, xp_finish why, size_t upto)
{
    xp_event ev = {.id = s->id, .type = XP_EV_DONE, .finish = why};
    ev.text_len = upto > s->sent ? upto - s->sent : 0;
    ev.text = xp_strndup0(s->text ? s->text + s->sent : "", ev.text_len);
    ev.prompt_tokens = s->n_prompt;
    ev.completion_tokens = s->n_tokens - s->n_prompt;
    xp_kv_release(&e->kv, s->blocks, s->n_blocks);
    if (s->ad) xp_adapter_release(e, s->ad, s->pinned);
    pthread_mutex_lock(&e->mu);
    e->st.requests_done++;
    pthread_mutex_unlock(&e->mu);
    xp_queue_push(s->q, &ev);
    xp_seq_free(s);
}

static void xp_fail_seq(xp_engine *e, xp_seq *s, const char *msg)
{
    xp_event ev = {.id = s->id, .type = XP_EV_ERROR, .error = strdup(msg)};
    xp_kv_release(&e->kv, s->blocks, s->n_blocks);
    if (s->ad) xp_adapter_release(e, s->ad, s->pinned);
    xp_queue_push(s->q, &ev);
    xp_seq_free(s);
}

static int xp_is_stop_id(const xp_engine *e, const xp_seq *s, int32_t id)
{
    if (xp_tokenizer_is_stop(e->tok, id)) return 1;
    for (size_t i = 0; i < s->n_stop_ids; i++)
        if (s->stop_ids[i] == id) return 1;
    return 0;
}

static int xp_text_append(xp_seq *s, const char *p, size_t n)
{
    if (s->text_len + n + 1 > s->text_cap) {
        size_t cap = (s->text_len + n + 1) * 2 + 64;
        char *t = realloc(s->text, cap);
        if (!t) return -1;
        s->text = t;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, p, n);
    s->text_len += n;
    s->text[s->text_len] = '\0';
    return 0;
}

/* Appends a sampled token and sends what is final of its text. Returns 1 when the sequence
 * has finished (its DONE event is sent and it is freed). */
static int xp_accept_token(xp_engine *e, xp_seq *s, int32_t tok)
{
    s->tokens[s->n_tokens++] = tok;
    if (xp_is_stop_id(e, s, tok)) {
        /* an end token closes the text where it stands; it is counted but not shown */
        xp_finish_seq(e, s, XP_FINISH_STOP, s->text_len);
        return 1;
    }
    size_t len;
    const char *piece = xp_detok_push(&s->detok, tok, &len);
    if (!piece) {
        xp_fail_seq(e, s, xp_last_error());
        return 1;
    }
    if (xp_text_append(s, piece, len) < 0) goto oom;
    int last = s->n_tokens - s->n_prompt >= s->max_new;
    if (last) {
        /* whatever the decoder still holds (a cut-off character) is part of the answer */
        piece = xp_detok_flush(&s->detok, &len);
        if (xp_text_append(s, piece, len) < 0) goto oom;
    }
    /* a stop string may start anywhere in the text not yet sent: the text ends before it */
    for (size_t i = 0; i < s->n_stop; i++) {
        char *hit =
            memmem(s->text + s->sent, s->text_len - s->sent, s->stop[i], strlen(s->stop[i]));
        if (hit) {
            xp_emit_text(s, tok, (size_t)(hit - s->text));
            xp_finish_seq(e, s, XP_FINISH_STOP, s->sent);
            return 1;
        }
    }
    if (last) {
        xp_emit_text(s, tok, s->text_len);
        xp_finish_seq(e, s, XP_FINISH_LENGTH, s->sent);
        return 1;
    }
    /* hold back what could still turn out to be the start of a stop string */
    size_t safe = s->text_len;
    if (s->max_stop_len > 1) safe = safe > s->max_stop_len - 1 ? safe - (s->max_stop_len - 1) : 0;
    if (safe < s->sent) safe = s->sent;
    xp_emit_text(s, tok, safe);
    return 0;
oom:
    xp_fail_seq(e, s, "out of memory");
    return 1;
}

/* ---------------------------------------------------------------- the step loop */

static void xp_take_incoming(xp_engine *e, uint64_t **cancels, size_t *n_cancels)
{
    /* incoming is newest-first: reverse onto the waiting list's tail to keep FIFO order */
    xp_seq *in = e->incoming, *rev = NULL;
    e->incoming = NULL;
    while (in) {
        xp_seq *n = in->next;
        in->next = rev;
        rev = in;
        in = n;
    }
    xp_seq **tail = &e->waiting;
    while (*tail)
        tail = &(*tail)->next;
    *tail = rev;
    *cancels = e->cancels;
    *n_cancels = e->n_cancels;
    e->cancels = NULL;
    e->n_cancels = e->cap_cancels = 0;
}

/* Drops the NULL holes finished sequences leave in the running array, keeping order. */
static void xp_compact(xp_engine *e)
{
    int k = 0;
    for (int i = 0; i < e->n_running; i++)
        if (e->run[i]) e->run[k++] = e->run[i];
    e->n_running = k;
}

static void xp_apply_cancels(xp_engine *e, const uint64_t *ids, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        for (xp_seq **p = &e->waiting; *p; p = &(*p)->next)
            if ((*p)->id == ids[k]) {
                xp_seq *s = *p;
                *p = s->next;
                xp_finish_seq(e, s, XP_FINISH_CANCELLED, s->sent);
                break;
            }
        for (int i = 0; i < e->n_running; i++)
            if (e->run[i] && e->run[i]->id == ids[k]) {
                /* what the client has seen is all it gets; the blocks go back now */
                xp_finish_seq(e, e->run[i], XP_FINISH_CANCELLED, e->run[i]->sent);
                e->run[i] = NULL;
            }
    }
    xp_compact(e);
}

/* Moves waiting requests into the running set while slots, adapters and blocks allow, in
 * order (requests sent back by preemption first); one that must wait does not hold back later
 * ones that fit. A request takes blocks for the tokens it has, not for all it may generate: it
 * grows block by block (xp_grow), so requests that leave max_tokens open do not each claim the
 * whole context. One free block per running request stays in hand for that growth. */
static void xp_admit(xp_engine *e)
{
    for (xp_seq **p = &e->waiting; *p && e->n_running < e->o.max_batch;) {
        xp_seq *s = *p;
        int need = xp_kv_blocks_for(s->n_tokens);
        if (need > e->kv.n_free - e->n_running) {
            p = &s->next;
            continue;
        }
        if (!s->blocks &&
            !(s->blocks = malloc((size_t)xp_kv_blocks_for((int64_t)s->n_prompt + s->max_new) *
                                 sizeof *s->blocks))) {
            *p = s->next;
            xp_fail_seq(e, s, "out of memory");
            continue;
        }
        if (s->ad && !s->pinned) {
            int rc = xp_adapter_acquire(e, s->ad);
            if (rc == 0) { /* every slot holds an adapter in use: wait for one to go idle */
                p = &s->next;
                continue;
            }
            if (rc < 0) {
                *p = s->next;
                xp_fail_seq(e, s, xp_last_error());
                continue;
            }
            s->pinned = 1;
        }
        xp_kv_alloc(&e->kv, need, s->blocks);
        s->n_blocks = need;
        *p = s->next;
        s->next = NULL;
        e->run[e->n_running++] = s;
    }
}

/* Sends run[i] back to the front of the waiting list: its blocks go back now, and when it is
 * admitted again it recomputes its KV from its tokens (prompt and generated so far). The
 * forward pass gives the same bits for a row whatever the batch, so the recomputed cache, and
 * everything generated after it, is what it would have been. */
static void xp_preempt(xp_engine *e, int i)
{
    xp_seq *s = e->run[i];
    xp_kv_release(&e->kv, s->blocks, s->n_blocks);
    s->n_blocks = 0;
    s->n_cached = 0;
    s->next = e->waiting;
    e->waiting = s;
    e->run[i] = NULL;
    pthread_mutex_lock(&e->mu);
    e->st.preemptions++;
    pthread_mutex_unlock(&e->mu);
}

/* Gives every running sequence the blocks its tokens need, oldest first. When none are free the
 * newest running sequence makes room (possibly the one growing): the oldest keep going, and a
 * sequence alone always fits because the context is capped at the cache's size. */
static void xp_grow(xp_engine *e)
{
    for (int i = 0; i < e->n_running; i++) {
        xp_seq *s = e->run[i];
        if (!s) continue;
        int need = xp_kv_blocks_for(s->n_tokens) - s->n_blocks;
        while (need > e->kv.n_free) {
            int victim = e->n_running - 1;
            while (!e->run[victim])
                victim--;
            xp_preempt(e, victim);
            if (victim == i) break;
        }
        if (e->run[i] && need > 0) {
            xp_kv_alloc(&e->kv, need, s->blocks + s->n_blocks);
            s->n_blocks += need;
        }
    }
    xp_compact(e);
}

static int xp_cmp_seq_adapter(const void *a, const void *b)
{
    const xp_seq *x = *(xp_seq *const *)a, *y = *(xp_seq *const *)b;
    uintptr_t ax = (uintptr_t)x->ad, ay = (uintptr_t)y->ad;
    if (ax != ay) return ax < ay ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* One forward pass over the running set. */
static void xp_step(xp_engine *e)
{
    xp_grow(e);
    int n = e->n_running, budget = e->o.prefill_chunk, rows = 0, ns = 0;
    xp_seq **seqs = e->batch_seqs;
    /* decode rows first, one per generating sequence, then prefill chunks with the rows left */
    for (int i = 0; i < n; i++) {
        xp_seq *s = e->run[i];
        s->take = s->n_tokens - s->n_cached == 1;
        budget -= s->take;
    }
    /* prefill rows go round the running set from a different start each step, so one long
     * prompt cannot hold back the others' first tokens */
    int off = n ? (int)(e->st.steps % (uint64_t)n) : 0;
    for (int k = 0; k < n; k++) {
        xp_seq *s = e->run[(off + k) % n];
        int left = s->n_tokens - s->n_cached;
        if (left > 1 && budget > 0) {
            s->take = left < budget ? left : budget;
            budget -= s->take;
        }
    }
    for (int i = 0; i < n; i++)
        if (e->run[i]->take) seqs[ns++] = e->run[i], rows += e->run[i]->take;
    if (ns == 0) return;
    /* rows of one adapter together: one shrink and one expand per adapter and module */
    qsort(seqs, (size_t)ns, sizeof *seqs, xp_cmp_seq_adapter);
    int ng = 0, r = 0, nout = 0;
    for (int i = 0; i < ns; i++) {
        xp_seq *s = seqs[i];
        const xp_lora_weights *lw = s->ad ? &s->ad->w : NULL;
        if (ng == 0 || e->b_groups[ng - 1].lora != lw) e->b_groups[ng++] = (xp_row_group){r, 0, lw};
        for (int k = 0; k < s->take; k++, r++) {
            e->b_tokens[r] = s->tokens[s->n_cached + k];
            e->b_pos[r] = s->n_cached + k;
            e->b_tables[r] = s->blocks;
        }
        e->b_groups[ng - 1].nrows += s->take;
        if (s->n_cached + s->take == s->n_tokens) {
            e->b_out_seq[nout] = seqs[i];
            e->b_out_rows[nout++] = r - 1;
        }
    }
    xp_batch b = {rows,     e->b_tokens, e->b_pos, (const int32_t *const *)e->b_tables,
                  ng,       e->b_groups, nout,     e->b_out_rows,
                  e->logits};
    if (e->be->forward(e->rt, &b) < 0) {
        /* a bug or a resource failure: end the sequences of this batch with the reason */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", xp_last_error());
        for (int i = 0; i < e->n_running; i++)
            if (e->run[i]->take) {
                xp_fail_seq(e, e->run[i], msg);
                e->run[i] = NULL;
            }
        xp_compact(e);
        return;
    }
    for (int i = 0; i < ns; i++)
        seqs[i]->n_cached += seqs[i]->take;
    pthread_mutex_lock(&e->mu);
    e->st.steps++;
    e->st.prompt_tokens += (uint64_t)(rows - nout);
    e->st.generated_tokens += (uint64_t)nout;
    pthread_mutex_unlock(&e->mu);
    int vocab = e->model->cfg.vocab_size;
    for (int k = 0; k < nout; k++) {
        xp_seq *s = e->b_out_seq[k];
        int32_t t =
            xp_sample(e->logits + (size_t)k * vocab, vocab, &s->samp, &s->rng, e->sample_idx);
        if (xp_accept_token(e, s, t))
            for (int i = 0; i < e->n_running; i++)
                if (e->run[i] == s) e->run[i] = NULL;
    }
    xp_compact(e);
}

/* Counters readers may poll; under mu. */
static void xp_publish_locked(xp_engine *e)
{
    e->st.running = e->n_running;
    int w = 0;
    for (xp_seq *s = e->waiting; s; s = s->next)
        w++;
    e->st.waiting = w;
    e->st.kv_blocks_free = e->kv.n_free;
}

static void *xp_engine_main(void *arg)
{
    xp_engine *e = arg;
    for (;;) {
        uint64_t *cancels;
        size_t nc;
        pthread_mutex_lock(&e->mu);
        /* with nothing running, every waiting request fits: admission cannot stall */
        while (!e->quit && !e->incoming && !e->n_cancels && e->n_running == 0 && !e->waiting)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->quit) {
            pthread_mutex_unlock(&e->mu);
            break;
        }
        xp_take_incoming(e, &cancels, &nc);
        pthread_mutex_unlock(&e->mu);
        xp_apply_cancels(e, cancels, nc);
        free(cancels);
        xp_admit(e);
        pthread_mutex_lock(&e->mu);
        xp_publish_locked(e);
        pthread_mutex_unlock(&e->mu);
        xp_step(e);
        pthread_mutex_lock(&e->mu);
        xp_publish_locked(e);
        pthread_mutex_unlock(&e->mu);
    }
    return NULL;
}

/* ---------------------------------------------------------------- lifetime */

xp_engine *xp_engine_create(const char *model_dir, const xp_engine_opts *opts)
{
    xp_engine *e = calloc(1, sizeof *e);
    if (!e) {
        xp_fail("out of memory");
        return NULL;
    }
    if (opts) e->o = *opts;
    if (e->o.threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        e->o.threads = c < 1 ? 1 : (int)c;
    }
    if (!e->o.kv_bytes) e->o.kv_bytes = XP_DEFAULT_KV;
    if (e->o.max_batch <= 0) e->o.max_batch = 32;
    if (e->o.max_adapters <= 0) e->o.max_adapters = 8;
    if (e->o.prefill_chunk <= 0) e->o.prefill_chunk = 256;
    if (e->o.prefill_chunk < e->o.max_batch) e->o.prefill_chunk = e->o.max_batch;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (xp_model_load(model_dir, &e->model) < 0) goto fail;
    if (!(e->tok = xp_tokenizer_load(model_dir))) goto fail;
    const xp_qwen3_config *g = &e->model->cfg;
    if (xp_kv_init(&e->kv, g->num_hidden_layers, g->num_key_value_heads * g->head_dim,
                   e->o.kv_bytes) < 0)
        goto fail;
    e->context = g->max_position_embeddings;
    if (e->context > e->kv.n_blocks * XP_KV_BLOCK) e->context = e->kv.n_blocks * XP_KV_BLOCK;
    int rows = e->o.prefill_chunk, mb = e->o.max_batch;
    /* XPREC_BACKEND picks the backend for callers that do not (tests, tools) */
    const char *want = e->o.backend ? e->o.backend : getenv("XPREC_BACKEND");
    if (!want || !*want) want = "cpu";
    if (strcmp(want, "cpu") == 0) {
        e->be = &xp_backend_cpu;
    } else if (strcmp(want, "cuda") == 0 || strcmp(want, "auto") == 0) {
        e->be = xp_backend_cuda();
        if (!e->be && strcmp(want, "cuda") == 0) {
            xp_fail("this build has no CUDA backend (build with make CUDA=1)");
            goto fail;
        }
        if (!e->be) e->be = &xp_backend_cpu;
    } else {
        xp_fail("unknown backend \"%s\" (cpu, cuda or auto)", want);
        goto fail;
    }
    if (!(e->rt = e->be->create(e->model, &e->kv, e->o.threads, rows, e->context))) {
        if (strcmp(want, "auto") != 0 || e->be == &xp_backend_cpu) goto fail;
        e->be = &xp_backend_cpu; /* auto: no usable GPU, run on the CPU */
        if (!(e->rt = e->be->create(e->model, &e->kv, e->o.threads, rows, e->context))) goto fail;
    }
    e->logits = malloc((size_t)mb * (size_t)g->vocab_size * sizeof *e->logits);
    e->sample_idx = malloc((size_t)g->vocab_size * sizeof *e->sample_idx);
    e->run = calloc((size_t)mb, sizeof *e->run);
    e->batch_seqs = calloc((size_t)mb, sizeof *e->batch_seqs);
    e->b_out_seq = calloc((size_t)mb, sizeof *e->b_out_seq);
    e->b_out_rows = calloc((size_t)mb, sizeof *e->b_out_rows);
    e->b_groups = calloc((size_t)mb, sizeof *e->b_groups);
    e->b_tokens = calloc((size_t)rows, sizeof *e->b_tokens);
    e->b_pos = calloc((size_t)rows, sizeof *e->b_pos);
    e->b_tables = calloc((size_t)rows, sizeof *e->b_tables);
    if (!e->logits || !e->sample_idx || !e->run || !e->batch_seqs || !e->b_out_seq ||
        !e->b_out_rows || !e->b_groups || !e->b_tokens || !e->b_pos || !e->b_tables) {
        xp_fail("out of memory");
        goto fail;
    }
    e->st.kv_blocks_total = e->st.kv_blocks_free = e->kv.n_blocks;
    if (pthread_create(&e->thread, NULL, xp_engine_main, e) != 0) {
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
    if (e->started) {
        pthread_mutex_lock(&e->mu);
        e->quit = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    /* everything still in flight ends as cancelled, so no caller waits forever */
    uint64_t *cancels;
    size_t nc;
    xp_take_incoming(e, &cancels, &nc);
    free(cancels);
    while (e->waiting) {
        xp_seq *s = e->waiting;
        e->waiting = s->next;
        xp_finish_seq(e, s, XP_FINISH_CANCELLED, s->sent);
    }
    for (int i = 0; i < e->n_running; i++)
        xp_finish_seq(e, e->run[i], XP_FINISH_CANCELLED, e->run[i]->sent);
    e->n_running = 0;
    xp_adapters_free(e);
    if (e->rt) e->be->destroy(e->rt);
    xp_kv_free(&e->kv);
    xp_tokenizer_free(e->tok);
    xp_model_free(e->model);
    free(e->logits);
    free(e->sample_idx);
    free(e->run);
    free(e->batch_seqs);
    free(e->b_out_seq);
    free(e->b_out_rows);
    free(e->b_groups);
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_tables);
    free(e->cancels);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

void xp_engine_stats_get(xp_engine *e, xp_engine_stats *s)
{
    pthread_mutex_lock(&e->mu);
    *s = e->st;
    int r = 0;
    for (xp_adapter *a = e->adapters; a; a = a->next)
        r += a->resident;
    s->adapters_resident = r;
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

uint64_t xp_engine_step_bytes(const xp_engine *e)
{
    return xp_model_step_bytes(e->model);
}
