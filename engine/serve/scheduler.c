/* The scheduler: the step thread's loop of continuous batching.
 *
 * Each step takes what the intake thread tokenized, applies cancellations, admits waiting
 * sequences (when a batch slot, their adapter and the KV blocks for their tokens so far are
 * there), gives running sequences the blocks they grow into (preempting the newest when the
 * cache is full), builds one batch of rows — one decode row per generating sequence plus
 * prefill chunks of new prompts up to the row budget — grouped by adapter, runs the backend,
 * samples, and sends events. */
#include "serve/engine_impl.h"
#include "serve/queue.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void xp_sched_end(xp_engine *e, xp_seq *s, xp_finish why, const char *msg)
{
    xp_kv_release(&e->kv, s->blocks, s->n_blocks);
    s->n_blocks = 0;
    pthread_mutex_lock(&e->mu);
    if (s->ad) xp_acache_release(&e->ac, s->ad, s->ad_used);
    e->st.requests_done++;
    xp_engine_wake_locked(e); /* its blocks and adapter may let a waiting request in */
    pthread_mutex_unlock(&e->mu);
    if (msg)
        xp_reply_error(s, msg);
    else
        xp_reply_done(s, why);
    xp_seq_free(s);
}

/* Drops the NULL holes ended sequences leave in the running array, keeping order. */
static void xp_compact(xp_engine *e)
{
    int k = 0;
    for (int i = 0; i < e->n_running; i++)
        if (e->run[i]) e->run[k++] = e->run[i];
    e->n_running = k;
}

/* Moves what intake handed over onto the waiting list's tail and takes the cancellations.
 * mu held. */
static void xp_take_incoming(xp_engine *e, uint64_t **cancels, size_t *n_cancels)
{
    /* incoming is newest-first: reverse it to keep FIFO order */
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

static void xp_apply_cancels(xp_engine *e, const uint64_t *ids, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        for (xp_seq **p = &e->waiting; *p; p = &(*p)->next)
            if ((*p)->id == ids[k]) {
                xp_seq *s = *p;
                *p = s->next;
                xp_sched_end(e, s, XP_FINISH_CANCELLED, NULL);
                break;
            }
        for (int i = 0; i < e->n_running; i++)
            if (e->run[i] && e->run[i]->id == ids[k]) {
                /* what the client has seen is all it gets; the blocks go back now */
                xp_sched_end(e, e->run[i], XP_FINISH_CANCELLED, NULL);
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
    pthread_mutex_lock(&e->mu);
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
            pthread_mutex_unlock(&e->mu);
            xp_sched_end(e, s, 0, "out of memory");
            pthread_mutex_lock(&e->mu);
            continue;
        }
        if (s->ad && !s->ad_used) {
            int rc = xp_acache_acquire(&e->ac, s->ad, &s->ad_counted);
            if (rc == 0) { /* loading, or every slot holds an adapter in use: wait */
                p = &s->next;
                continue;
            }
            if (rc < 0) {
                char msg[512];
                snprintf(msg, sizeof msg, "%s", xp_last_error());
                *p = s->next;
                pthread_mutex_unlock(&e->mu);
                xp_sched_end(e, s, 0, msg);
                pthread_mutex_lock(&e->mu);
                continue;
            }
            s->ad_used = 1;
        }
        xp_kv_alloc(&e->kv, need, s->blocks);
        s->n_blocks = need;
        *p = s->next;
        s->next = NULL;
        e->run[e->n_running++] = s;
    }
    xp_acache_end_pass(&e->ac);
    pthread_mutex_unlock(&e->mu);
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
    int ax = x->ad ? x->ad->slot : -1, ay = y->ad ? y->ad->slot : -1;
    if (ax != ay) return ax < ay ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The backend gets an adapter slot's weights when its generation moved on since it last did. */
static int xp_sync_adapter(xp_engine *e, const xp_adapter *ad, uint32_t *gen)
{
    pthread_mutex_lock(&e->mu);
    *gen = e->ac.slot_gen[ad->slot];
    pthread_mutex_unlock(&e->mu);
    if (e->backend_gen[ad->slot] == *gen) return 0;
    /* ad is in use by this batch, so its weights stay put while the backend takes them */
    if (e->be->adapter_load(e->rt, ad->slot, *gen, &ad->w) < 0) return -1;
    e->backend_gen[ad->slot] = *gen;
    return 0;
}

/* Rows this step: one decode row per generating sequence, then prefill chunks from a start
 * that moves round the running set each step, so one long prompt cannot hold back the
 * others' first tokens. A sequence gathering prompt logprobs takes only as many rows as the
 * logits buffer has room for. */
static int xp_plan(xp_engine *e)
{
    int n = e->n_running, budget = e->o.prefill_chunk, lp_budget = XP_PLP_ROWS, ns = 0;
    for (int i = 0; i < n; i++) {
        xp_seq *s = e->run[i];
        s->take = s->n_tokens - s->n_cached == 1;
        budget -= s->take;
    }
    int off = n ? (int)(e->st.steps % (uint64_t)n) : 0;
    for (int k = 0; k < n; k++) {
        xp_seq *s = e->run[(off + k) % n];
        int left = s->n_tokens - s->n_cached;
        if (left <= 1 || budget <= 0) continue;
        int take = left < budget ? left : budget;
        /* prompt rows whose logits are wanted: positions 0..n_prompt-2 still to compute */
        if (s->plp && !s->plp_sent) {
            int want = s->n_prompt - 1 - s->n_cached;
            if (want > 0 && take > want) take = want;
            if (want > 0 && take > lp_budget) take = lp_budget;
            if (want > 0 && take == 0) continue;
            if (want > 0) lp_budget -= take;
        }
        s->take = take;
        budget -= take;
    }
    for (int i = 0; i < n; i++)
        if (e->run[i]->take) e->batch_seqs[ns++] = e->run[i];
    return ns;
}

/* Prompt logprobs from the logits of rows out0.. (positions n_cached.. of s, before this step's
 * rows are counted): position p+1's token under position p's distribution. */
static void xp_gather_prompt_logprobs(xp_engine *e, xp_seq *s, int out0, int nrows)
{
    int vocab = e->model->cfg.vocab_size;
    for (int k = 0; k < nrows; k++) {
        int p = s->n_cached + k;
        if (p + 1 >= s->n_prompt) break;
        xp_logprobs_fill(e->logits + (size_t)(out0 + k) * vocab, vocab, s->tokens[p + 1],
                         s->top_logprobs, &s->plp[p + 1]);
    }
}

static void xp_send_prompt_logprobs(xp_seq *s)
{
    xp_event ev = {.id = s->id, .type = XP_EV_PROMPT_LOGPROBS, .prompt_tokens = s->n_prompt,
                   .prompt_logprobs = s->plp};
    s->plp = NULL;
    s->plp_sent = 1;
    xp_queue_push(s->q, &ev);
}

/* Samples s's next token from its logits row and sends it; 1 when s ended (and is freed). */
static int xp_next_token(xp_engine *e, xp_seq *s, float *lg)
{
    int vocab = e->model->cfg.vocab_size;
    xp_logprobs *lp = NULL;
    if (s->logprobs && (lp = malloc(sizeof *lp)))
        memcpy(e->lp_row, lg, (size_t)vocab * sizeof *lg); /* the sampler reshapes lg in place */
    int32_t t = xp_sample(lg, vocab, &s->samp, &s->rng, e->sample_idx);
    if (lp) xp_logprobs_fill(e->lp_row, vocab, t, s->top_logprobs, lp);
    xp_finish why;
    int rc = xp_reply_token(e->tok, s, t, lp, &why);
    if (rc == 0) return 0;
    char msg[512];
    if (rc < 0) snprintf(msg, sizeof msg, "%s", xp_last_error());
    for (int i = 0; i < e->n_running; i++)
        if (e->run[i] == s) e->run[i] = NULL;
    xp_sched_end(e, s, why, rc < 0 ? msg : NULL);
    return 1;
}

/* One forward pass over the running set. */
static void xp_step(xp_engine *e)
{
    xp_grow(e);
    int ns = xp_plan(e);
    if (ns == 0) return;
    xp_seq **seqs = e->batch_seqs;
    /* rows of one adapter together: one shrink and one expand per adapter and module */
    qsort(seqs, (size_t)ns, sizeof *seqs, xp_cmp_seq_adapter);
    int ng = 0, r = 0, nout = 0, gen_rows = 0;
    const char *fail = NULL;
    char msg[512];
    for (int i = 0; i < ns; i++) {
        xp_seq *s = seqs[i];
        int slot = s->ad ? s->ad->slot : -1;
        if (ng == 0 || e->b_groups[ng - 1].slot != slot) {
            uint32_t gen = 0;
            if (s->ad && xp_sync_adapter(e, s->ad, &gen) < 0 && !fail) {
                snprintf(msg, sizeof msg, "%s", xp_last_error());
                fail = msg;
            }
            e->b_groups[ng++] = (xp_row_group){r, 0, slot, gen};
        }
        /* logits wanted: every row while gathering prompt logprobs, else the last one */
        int plp_rows = s->plp && !s->plp_sent && s->n_cached < s->n_prompt - 1;
        s->out0 = nout;
        s->outs = 0;
        for (int k = 0; k < s->take; k++, r++) {
            e->b_tokens[r] = s->tokens[s->n_cached + k];
            e->b_pos[r] = s->n_cached + k;
            e->b_tables[r] = s->blocks;
            if (plp_rows || s->n_cached + k + 1 == s->n_tokens) {
                e->b_out_rows[nout++] = r;
                s->outs++;
            }
        }
        s->samples = s->n_cached + s->take == s->n_tokens;
        gen_rows += s->samples;
        e->b_groups[ng - 1].nrows += s->take;
    }
    xp_batch b = {r, e->b_tokens, e->b_pos, (const int32_t *const *)e->b_tables, ng, e->b_groups,
                  nout, e->b_out_rows, e->logits};
    if (!fail && e->be->forward(e->rt, &b) < 0) {
        snprintf(msg, sizeof msg, "%s", xp_last_error());
        fail = msg;
    }
    if (fail) {
        /* a bug or a resource failure: end the sequences of this batch with the reason */
        for (int i = 0; i < e->n_running; i++)
            if (e->run[i]->take) {
                xp_sched_end(e, e->run[i], 0, fail);
                e->run[i] = NULL;
            }
        xp_compact(e);
        return;
    }
    pthread_mutex_lock(&e->mu);
    e->st.steps++;
    e->st.prompt_tokens += (uint64_t)(r - gen_rows);
    e->st.generated_tokens += (uint64_t)gen_rows;
    pthread_mutex_unlock(&e->mu);
    size_t vocab = (size_t)e->model->cfg.vocab_size;
    for (int i = 0; i < ns; i++) {
        xp_seq *s = seqs[i];
        if (s->plp && !s->plp_sent && !s->samples)
            xp_gather_prompt_logprobs(e, s, s->out0, s->outs);
        s->n_cached += s->take;
        s->take = 0;
        if (s->plp && !s->plp_sent && s->n_cached >= s->n_prompt - 1) xp_send_prompt_logprobs(s);
    }
    /* the sequences that reached their last token sample the next; some end here */
    for (int i = 0; i < ns; i++)
        if (seqs[i]->samples)
            xp_next_token(e, seqs[i], e->logits + (size_t)(seqs[i]->out0 + seqs[i]->outs - 1) * vocab);
    xp_compact(e);
}

/* Counters readers may poll; under mu. */
static void xp_publish_locked(xp_engine *e)
{
    e->st.running = e->n_running;
    int w = 0;
    for (xp_seq *s = e->waiting; s; s = s->next)
        w++;
    for (xp_seq *s = e->incoming; s; s = s->next)
        w++;
    e->st.waiting = w;
    e->st.kv_blocks_free = e->kv.n_free;
}

void *xp_step_main(void *arg)
{
    xp_engine *e = arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t *cancels;
        size_t nc;
        pthread_mutex_lock(&e->mu);
        /* sleep while nothing runs and nothing changed that could let a waiting request in:
         * with nothing running every block is free, so only an adapter can hold one back */
        while (!e->quit && e->n_running == 0 && e->wake == seen)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->quit) {
            pthread_mutex_unlock(&e->mu);
            break;
        }
        seen = e->wake;
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

void xp_sched_drain(xp_engine *e)
{
    uint64_t *cancels;
    size_t nc;
    xp_take_incoming(e, &cancels, &nc);
    free(cancels);
    while (e->waiting) {
        xp_seq *s = e->waiting;
        e->waiting = s->next;
        xp_sched_end(e, s, XP_FINISH_CANCELLED, NULL);
    }
    for (int i = 0; i < e->n_running; i++)
        xp_sched_end(e, e->run[i], XP_FINISH_CANCELLED, NULL);
    e->n_running = 0;
}
