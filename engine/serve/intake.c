/* Request intake: xp_engine_submit copies a request and returns at once; the intake thread
 * renders the chat template, tokenizes, checks the prompt against the vocabulary and the
 * context, and hands the sequence to the step thread (or parks it, for a held request, until
 * xp_engine_start). A request that can never run ends here with an ERROR event. */
#include "serve/engine_impl.h"
#include "serve/queue.h"
#include "tokenizer/chat.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void xp_intake_req_free(xp_intake_req *in)
{
    if (!in) return;
    for (size_t i = 0; i < in->n_messages; i++) {
        free((char *)in->messages[i].role);
        free((char *)in->messages[i].content);
    }
    free(in->messages);
    free(in->prompt);
    free(in->tokens);
    free(in);
}

void xp_seq_free(xp_seq *s)
{
    if (!s) return;
    xp_intake_req_free(s->in);
    free(s->tokens);
    free(s->blocks);
    for (size_t i = 0; i < s->n_stop; i++)
        free(s->stop[i]);
    free(s->stop);
    free(s->stop_ids);
    free(s->plp);
    xp_detok_free(&s->detok);
    free(s->text);
    free(s);
}

/* The caller's request, copied: nothing of it is read after submit returns. */
static int xp_intake_copy(const xp_request *r, xp_seq *s)
{
    xp_intake_req *in = s->in = calloc(1, sizeof *in);
    if (!in) return -1;
    in->max_tokens = r->max_tokens;
    in->max_tokens_exact = r->max_tokens_exact;
    in->enable_thinking = r->enable_thinking;
    if (r->messages) {
        if (!(in->messages = calloc(r->n_messages ? r->n_messages : 1, sizeof *in->messages)))
            return -1;
        for (size_t i = 0; i < r->n_messages; i++) {
            const char *role = r->messages[i].role, *content = r->messages[i].content;
            in->messages[i].role = role ? strdup(role) : NULL;
            in->messages[i].content = content ? strdup(content) : NULL;
            in->n_messages = i + 1;
            if ((role && !in->messages[i].role) || (content && !in->messages[i].content))
                return -1;
        }
    } else if (r->prompt) {
        in->prompt_len = r->prompt_len ? r->prompt_len : strlen(r->prompt);
        if (!(in->prompt = xp_memdup0(r->prompt, in->prompt_len))) return -1;
    } else {
        if (!(in->tokens = malloc((r->n_tokens ? r->n_tokens : 1) * sizeof *in->tokens)))
            return -1;
        memcpy(in->tokens, r->tokens, r->n_tokens * sizeof *in->tokens);
        in->n_tokens = r->n_tokens;
    }
    if (r->n_stop) {
        if (!(s->stop = calloc(r->n_stop, sizeof *s->stop))) return -1;
        for (size_t i = 0; i < r->n_stop; i++) {
            if (!(s->stop[s->n_stop++] = strdup(r->stop[i]))) return -1;
            size_t l = strlen(r->stop[i]);
            if (l > s->max_stop_len) s->max_stop_len = l;
        }
    }
    if (r->n_stop_ids) {
        if (!(s->stop_ids = malloc(r->n_stop_ids * sizeof *s->stop_ids))) return -1;
        memcpy(s->stop_ids, r->stop_ids, r->n_stop_ids * sizeof *s->stop_ids);
        s->n_stop_ids = r->n_stop_ids;
    }
    return 0;
}

/* What submit can tell without the tokenizer. */
static int xp_submit_check(const xp_request *r, const xp_queue *q)
{
    if (!q) return xp_fail("no event queue");
    if (!(r->temperature >= 0) || r->temperature > 100 || !(r->top_p >= 0) || r->top_k < 0 ||
        r->top_k > 1000000)
        return xp_fail("sampling parameters out of range");
    if (r->top_logprobs < 0 || r->top_logprobs > XP_MAX_TOP_LOGPROBS)
        return xp_fail("top_logprobs must be between 0 and %d", XP_MAX_TOP_LOGPROBS);
    int given = !!r->messages + !!r->prompt + !!r->tokens;
    if (given > 1) return xp_fail("give one of messages, prompt or tokens");
    if (given == 0) return xp_fail("the request has no messages, prompt or tokens");
    for (size_t i = 0; i < r->n_stop; i++)
        if (!r->stop[i] || !*r->stop[i]) return xp_fail("stop strings must not be empty");
    return 0;
}

uint64_t xp_engine_submit(xp_engine *e, const xp_request *r, xp_queue *q)
{
    if (xp_submit_check(r, q) < 0) return 0;
    xp_seq *s = calloc(1, sizeof *s);
    if (!s || xp_intake_copy(r, s) < 0) {
        xp_seq_free(s);
        xp_fail("out of memory");
        return 0;
    }
    s->q = q;
    s->hold = r->hold;
    s->samp.temperature = r->temperature;
    s->samp.top_k = r->top_k;
    s->samp.top_p = r->top_p > 0 ? r->top_p : 1.0f;
    s->logprobs = r->logprobs || r->top_logprobs > 0;
    s->top_logprobs = r->top_logprobs;
    s->prompt_logprobs = r->prompt_logprobs;
    xp_detok_init(&s->detok, e->tok);
    pthread_mutex_lock(&e->mu);
    if (r->adapter && *r->adapter) {
        s->ad = xp_acache_find(&e->ac, r->adapter);
        if (!s->ad) {
            pthread_mutex_unlock(&e->mu);
            xp_fail("adapter \"%s\" is not registered", r->adapter);
            xp_seq_free(s);
            return 0;
        }
        xp_acache_hold(s->ad); /* keeps a removed adapter's record until this request ends */
    }
    s->id = ++e->next_id;
    xp_rng_seed(&s->rng, r->seed ? r->seed : s->id * 0x9e3779b97f4a7c15ull, "sample");
    *e->intake_tail = s;
    e->intake_tail = &s->next;
    e->st.intake++;
    pthread_cond_signal(&e->intake_cv);
    uint64_t id = s->id;
    pthread_mutex_unlock(&e->mu);
    return id;
}

/* Tokens of the request, checked; on the intake thread. */
static int xp_intake_prompt(xp_engine *e, xp_seq *s)
{
    xp_intake_req *in = s->in;
    int32_t *ids = NULL;
    size_t n = 0;
    if (in->tokens) {
        for (size_t i = 0; i < in->n_tokens; i++)
            if (in->tokens[i] < 0 || in->tokens[i] >= e->model->cfg.vocab_size)
                return xp_fail("token id %d is outside the vocabulary", in->tokens[i]);
        ids = in->tokens;
        in->tokens = NULL;
        n = in->n_tokens;
    } else if (in->messages) {
        char *text = xp_chat_build(in->messages, in->n_messages, 1, in->enable_thinking);
        if (!text) return -1;
        int rc = xp_tokenizer_encode(e->tok, text, strlen(text), 1, &ids, &n);
        free(text);
        if (rc < 0) return -1;
    } else if (xp_tokenizer_encode(e->tok, in->prompt, in->prompt_len, 1, &ids, &n) < 0) {
        return -1;
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
    if (in->max_tokens_exact && in->max_tokens > room) {
        free(ids);
        return xp_fail("the prompt has %zu tokens and max_tokens asks for %d more; the context "
                       "holds %d",
                       n, in->max_tokens, e->context);
    }
    s->max_new = in->max_tokens > 0 && in->max_tokens < room ? in->max_tokens : room;
    s->n_prompt = s->n_tokens = (int)n;
    s->tokens = realloc(ids, ((size_t)n + (size_t)s->max_new) * sizeof *ids);
    if (!s->tokens) {
        free(ids);
        return xp_fail("out of memory");
    }
    int need = xp_kv_blocks_for((int64_t)s->n_prompt + s->max_new);
    if (need > e->kv.n_blocks)
        return xp_fail("prompt and max_tokens need %d KV positions; the cache holds %d",
                       s->n_prompt + s->max_new, e->kv.n_blocks * XP_KV_BLOCK);
    if (s->prompt_logprobs && !(s->plp = calloc((size_t)n, sizeof *s->plp)))
        return xp_fail("out of memory");
    return 0;
}

static void xp_send_prompt(xp_seq *s)
{
    xp_event ev = {.id = s->id, .type = XP_EV_PROMPT, .prompt_tokens = s->n_prompt};
    if ((ev.prompt_ids = malloc((size_t)s->n_prompt * sizeof *ev.prompt_ids)))
        memcpy(ev.prompt_ids, s->tokens, (size_t)s->n_prompt * sizeof *ev.prompt_ids);
    xp_queue_push(s->q, &ev);
}

/* Ends a sequence that never reached the step thread. mu held. */
static void xp_intake_end(xp_engine *e, xp_seq *s, const char *msg)
{
    if (msg)
        xp_reply_error(s, msg);
    else
        xp_reply_done(s, XP_FINISH_CANCELLED);
    if (s->ad) xp_acache_release(&e->ac, s->ad, 0);
    e->st.requests_done++;
    xp_seq_free(s);
}

void *xp_intake_main(void *arg)
{
    xp_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->quit && !e->intake)
            pthread_cond_wait(&e->intake_cv, &e->mu);
        if (e->quit) break;
        /* the head stays on the list while it is worked on, so a cancel can still find it */
        xp_seq *s = e->intake;
        pthread_mutex_unlock(&e->mu);
        int rc = xp_intake_prompt(e, s);
        char msg[512];
        if (rc < 0) snprintf(msg, sizeof msg, "%s", xp_last_error());
        pthread_mutex_lock(&e->mu);
        e->intake = s->next;
        if (!e->intake) e->intake_tail = &e->intake;
        e->st.intake--;
        s->next = NULL;
        if (rc < 0 || s->cancelled) {
            xp_intake_end(e, s, rc < 0 ? msg : NULL);
            continue;
        }
        xp_intake_req_free(s->in);
        s->in = NULL;
        xp_send_prompt(s);
        if (s->hold) {
            s->next = e->held;
            e->held = s;
        } else {
            s->next = e->incoming;
            e->incoming = s;
            xp_engine_wake_locked(e);
        }
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

int xp_engine_start(xp_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->mu);
    xp_seq **p = &e->held;
    while (*p && (*p)->id != id)
        p = &(*p)->next;
    xp_seq *s = *p;
    if (s) {
        *p = s->next;
        s->next = e->incoming;
        e->incoming = s;
        xp_engine_wake_locked(e);
    }
    pthread_mutex_unlock(&e->mu);
    return s ? 0 : xp_fail("request %llu is not held", (unsigned long long)id);
}

int xp_engine_cancel(xp_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    xp_seq *found = NULL;
    for (xp_seq *s = e->intake; s && !found; s = s->next)
        if (s->id == id) found = s;
    if (found) {
        found->cancelled = 1; /* the intake thread ends it */
        pthread_mutex_unlock(&e->mu);
        return 0;
    }
    for (xp_seq **p = &e->held; *p; p = &(*p)->next)
        if ((*p)->id == id) {
            xp_seq *s = *p;
            *p = s->next;
            xp_intake_end(e, s, NULL);
            pthread_mutex_unlock(&e->mu);
            return 0;
        }
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
        xp_engine_wake_locked(e);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

/* What the intake thread had not reached when the engine stops (threads joined). */
void xp_intake_drain(xp_engine *e)
{
    while (e->intake) {
        xp_seq *s = e->intake;
        e->intake = s->next;
        xp_intake_end(e, s, NULL);
    }
    e->intake_tail = &e->intake;
    while (e->held) {
        xp_seq *s = e->held;
        e->held = s->next;
        xp_intake_end(e, s, NULL);
    }
}
