/* A sequence's reply: generated tokens become text (never half a UTF-8 character), stop
 * strings end it where they begin, text that could still be the start of a stop string is held
 * back, and every step's result goes to the caller as an event. */
#include "serve/engine_impl.h"
#include "serve/queue.h"
#include "util/xp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void xp_emit_text(xp_seq *s, int32_t token, size_t upto, xp_logprobs *lp)
{
    xp_event ev = {.id = s->id, .type = XP_EV_TOKEN, .token = token, .logprobs = lp};
    ev.text_len = upto > s->sent ? upto - s->sent : 0;
    ev.text = xp_memdup0(s->text + s->sent, ev.text_len);
    s->sent += ev.text_len;
    xp_queue_push(s->q, &ev);
}

void xp_reply_done(xp_seq *s, xp_finish why)
{
    /* an end token leaves the held-back text to be sent here; otherwise all was sent */
    size_t upto = why == XP_FINISH_STOP && s->flush ? s->text_len : s->sent;
    xp_event ev = {.id = s->id, .type = XP_EV_DONE, .finish = why};
    ev.text_len = upto > s->sent ? upto - s->sent : 0;
    ev.text = xp_memdup0(s->text ? s->text + s->sent : "", ev.text_len);
    ev.prompt_tokens = s->n_prompt;
    ev.completion_tokens = s->n_tokens - s->n_prompt;
    xp_queue_push(s->q, &ev);
}

void xp_reply_error(xp_seq *s, const char *msg)
{
    xp_event ev = {.id = s->id, .type = XP_EV_ERROR, .error = strdup(msg)};
    ev.prompt_tokens = s->n_prompt;
    ev.completion_tokens = s->n_tokens > s->n_prompt ? s->n_tokens - s->n_prompt : 0;
    xp_queue_push(s->q, &ev);
}

static int xp_is_stop_id(const xp_tokenizer *tok, const xp_seq *s, int32_t id)
{
    if (xp_tokenizer_is_stop(tok, id)) return 1;
    for (size_t i = 0; i < s->n_stop_ids; i++)
        if (s->stop_ids[i] == id) return 1;
    return 0;
}

static int xp_text_append(xp_seq *s, const char *p, size_t n)
{
    if (s->text_len + n + 1 > s->text_cap) {
        size_t cap = (s->text_len + n + 1) * 2 + 64;
        char *t = realloc(s->text, cap);
        if (!t) return xp_fail("out of memory");
        s->text = t;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, p, n);
    s->text_len += n;
    s->text[s->text_len] = '\0';
    return 0;
}

int xp_reply_token(const xp_tokenizer *tok, xp_seq *s, int32_t token, xp_logprobs *lp,
                   xp_finish *why)
{
    s->tokens[s->n_tokens++] = token;
    if (xp_is_stop_id(tok, s, token)) {
        /* an end token closes the text where it stands; it is counted but not shown */
        free(lp);
        s->flush = 1;
        *why = XP_FINISH_STOP;
        return 1;
    }
    size_t len;
    const char *piece = xp_detok_push(&s->detok, token, &len);
    if (!piece || xp_text_append(s, piece, len) < 0) goto fail;
    int last = s->n_tokens - s->n_prompt >= s->max_new;
    if (last) {
        /* whatever the decoder still holds (a cut-off character) is part of the answer */
        piece = xp_detok_flush(&s->detok, &len);
        if (xp_text_append(s, piece, len) < 0) goto fail;
    }
    /* a stop string may start anywhere in the text not yet sent: the text ends before it */
    for (size_t i = 0; i < s->n_stop; i++) {
        char *hit =
            memmem(s->text + s->sent, s->text_len - s->sent, s->stop[i], strlen(s->stop[i]));
        if (hit) {
            xp_emit_text(s, token, (size_t)(hit - s->text), lp);
            *why = XP_FINISH_STOP;
            return 1;
        }
    }
    if (last) {
        xp_emit_text(s, token, s->text_len, lp);
        *why = XP_FINISH_LENGTH;
        return 1;
    }
    /* hold back what could still turn out to be the start of a stop string */
    size_t safe = s->text_len;
    if (s->max_stop_len > 1) safe = safe > s->max_stop_len - 1 ? safe - (s->max_stop_len - 1) : 0;
    if (safe < s->sent) safe = s->sent;
    /* the held-back bytes are counted in bytes: never cut a character in two */
    while (safe > s->sent && ((unsigned char)s->text[safe] & 0xc0) == 0x80)
        safe--;
    xp_emit_text(s, token, safe, lp);
    return 0;
fail:
    free(lp);
    return -1;
}

void xp_logprobs_fill(const float *logits, int vocab, int32_t chosen, int k, xp_logprobs *out)
{
    float mx = logits[0];
    for (int i = 1; i < vocab; i++)
        mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int i = 0; i < vocab; i++)
        sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    out->chosen = (xp_token_logprob){chosen, (float)((double)logits[chosen] - lse)};
    /* the k largest by insertion into a sorted head; ties keep the lower id first */
    if (k > XP_MAX_TOP_LOGPROBS) k = XP_MAX_TOP_LOGPROBS;
    if (k > vocab) k = vocab;
    int n = 0;
    for (int i = 0; i < vocab && k > 0; i++) {
        float v = logits[i];
        if (n == k && v <= out->top[n - 1].logprob) continue;
        int at = n < k ? n++ : n - 1;
        while (at > 0 && out->top[at - 1].logprob < v) {
            out->top[at] = out->top[at - 1];
            at--;
        }
        out->top[at] = (xp_token_logprob){i, v};
    }
    out->n_top = n;
    for (int i = 0; i < n; i++)
        out->top[i].logprob = (float)((double)out->top[i].logprob - lse);
}
