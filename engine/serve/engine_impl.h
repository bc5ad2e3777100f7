/* The serving core's shared state: a request's life as a sequence, and the engine that runs
 * them. Three threads share it under one mutex:
 *   intake (intake.c)    turns submitted requests into token sequences (chat template,
 *                        tokenizer, checks) and hands them to the step thread;
 *   step (scheduler.c)   admits sequences, builds batches, runs the backend, samples, and
 *                        sends token events (reply.c);
 *   loader (adapter_cache.c) reads adapters from disk into slots.
 * engine.c holds the public API's lifetime and accessors. */
#ifndef XP_ENGINE_IMPL_H
#define XP_ENGINE_IMPL_H

#include "backend.h"
#include "serve/adapter_cache.h"
#include "serve/kv_blocks.h"
#include "serve/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/rng.h"
#include "xprec.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A request as submitted, copied, until the intake thread has tokenized it. */
typedef struct {
    xp_chat_msg *messages; /* strings owned */
    size_t n_messages;
    int enable_thinking;
    char *prompt;
    size_t prompt_len;
    int32_t *tokens;
    size_t n_tokens;
    int max_tokens, max_tokens_exact;
} xp_intake_req;

typedef struct xp_seq {
    uint64_t id;
    xp_queue *q;
    xp_adapter *ad;
    int ad_used;    /* counts among ad's users (from first admission to the end) */
    int ad_counted; /* its hit or miss is counted */
    xp_intake_req *in; /* until tokenized */
    int cancelled;     /* cancelled while in intake or held */
    int hold;          /* wait for xp_engine_start after the PROMPT event */
    int32_t *tokens;   /* prompt, then generated */
    int n_prompt, n_tokens, n_cached, max_new;
    int32_t *blocks; /* block table, room for prompt + max_new positions */
    int n_blocks;    /* blocks held: enough for the tokens so far, taken as they grow */
    xp_sampling samp;
    xp_rng rng;
    int logprobs, top_logprobs, prompt_logprobs;
    xp_logprobs *plp; /* prompt logprobs being gathered during prefill */
    int plp_sent;
    char **stop;
    size_t n_stop, max_stop_len;
    int32_t *stop_ids;
    size_t n_stop_ids;
    xp_detok detok;
    char *text; /* generated text so far */
    size_t text_len, text_cap, sent; /* bytes of text already sent */
    int flush;  /* ended by an end token: DONE carries the held-back text */
    int take;          /* rows in the current step, */
    int out0, outs;    /* of which logits rows out0.. (prompt logprobs, and the last) */
    int samples;       /* the step reaches its last token: it samples the next */
    struct xp_seq *next; /* intake, held, incoming and waiting lists */
} xp_seq;

struct xp_engine {
    xp_model *model;
    xp_tokenizer *tok;
    xp_kv_blocks kv;
    const xp_backend *be;
    void *rt; /* the backend's context */
    xp_engine_opts o;
    int context;
    pthread_mutex_t mu;
    pthread_cond_t cv;        /* the step thread waits here */
    pthread_cond_t intake_cv; /* the intake thread waits here */
    pthread_t thread, intake_thread;
    int started, intake_started, quit;
    uint64_t wake; /* bumped by whatever may let the step thread make progress */
    uint64_t next_id;
    xp_adapter_cache ac; /* under mu */
    /* under mu */
    xp_seq *intake, **intake_tail; /* submitted, not yet tokenized (FIFO) */
    xp_seq *held;                  /* tokenized, waiting for xp_engine_start */
    xp_seq *incoming;              /* tokenized, not yet seen by the step thread (LIFO) */
    uint64_t *cancels;             /* ids to cancel */
    size_t n_cancels, cap_cancels;
    xp_engine_stats st;
    /* step thread only */
    xp_seq *waiting;
    xp_seq **run; /* admitted sequences, at most max_batch */
    int n_running;
    uint32_t *backend_gen; /* [max_adapters]: the generation each slot has in the backend */
    int max_out;           /* logits rows per step */
    float *logits;         /* [max_out, vocab] */
    float *lp_row;         /* [vocab]: raw logits kept for logprobs while the sampler runs */
    int32_t *sample_idx;   /* [vocab] */
    /* the batch being built, sized for max_batch sequences and prefill_chunk rows */
    xp_seq **batch_seqs;
    int32_t *b_out_rows, *b_tokens, *b_pos;
    int32_t **b_tables;
    xp_row_group *b_groups;
};

/* n bytes of p and a NUL, malloc'd; NULL when out of memory. */
static inline char *xp_memdup0(const char *p, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, p, n);
        d[n] = '\0';
    }
    return d;
}

/* Prompt-logprob rows per step, all sequences together: what bounds the logits buffer. */
#define XP_PLP_ROWS 32

/* engine.c */
void xp_engine_wake_locked(void *e); /* bumps wake and signals the step thread; mu held */

/* intake.c */
void *xp_intake_main(void *arg);
void xp_intake_drain(xp_engine *e); /* ends what intake holds (threads joined) */
void xp_seq_free(xp_seq *s);

/* reply.c: a sequence's text, stop strings and events. */
/* Appends a sampled token and sends what is final of its text. 0 goes on; 1 finished (*why);
 * -1 failed (error set). lp: its logprobs, or NULL. */
int xp_reply_token(const xp_tokenizer *tok, xp_seq *s, int32_t token, xp_logprobs *lp,
                   xp_finish *why);
/* The DONE event: the rest of the text up to what was sent, the reason and the usage. */
void xp_reply_done(xp_seq *s, xp_finish why);
void xp_reply_error(xp_seq *s, const char *msg);
/* The chosen token's raw log-probability and the k most likely, from raw logits. */
void xp_logprobs_fill(const float *logits, int vocab, int32_t chosen, int k, xp_logprobs *out);

/* scheduler.c */
void *xp_step_main(void *arg);
/* Ends s (already out of every list): its blocks and adapter go back, DONE or ERROR is sent,
 * and it is freed. msg NULL: DONE with why. */
void xp_sched_end(xp_engine *e, xp_seq *s, xp_finish why, const char *msg);
/* Ends what is still in flight when the engine stops (threads joined). */
void xp_sched_drain(xp_engine *e);

#endif
