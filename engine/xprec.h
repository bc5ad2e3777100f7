/* libxprec's public interface: one engine holds one base model and many LoRA adapters, and runs
 * requests for any mix of them in continuous batches on its own thread.
 *
 * Thread safety: every function may be called from any thread, except that one queue should be
 * popped by one thread at a time. */
#ifndef XPREC_H
#define XPREC_H

#include "tokenizer/chat.h"

#include <stddef.h>
#include <stdint.h>

typedef struct xp_engine xp_engine;
typedef struct xp_queue xp_queue;

typedef struct {
    int threads;        /* compute threads; 0 = all cores */
    size_t kv_bytes;    /* KV cache capacity; 0 = 256 MiB */
    int max_batch;      /* sequences per step; 0 = 32 */
    int max_adapters;   /* adapters resident at once; 0 = 8 */
    int prefill_chunk;  /* token rows per step; 0 = 256 */
    const char *backend; /* "cpu" (default), "cuda", or "auto" (CUDA when built in and a GPU
                            is present, else CPU) */
} xp_engine_opts;

typedef enum { XP_EV_TOKEN, XP_EV_DONE, XP_EV_ERROR } xp_event_type;
typedef enum { XP_FINISH_STOP = 1, XP_FINISH_LENGTH, XP_FINISH_CANCELLED } xp_finish;

typedef struct {
    uint64_t id;        /* the request */
    xp_event_type type;
    int32_t token;      /* TOKEN: the generated id */
    char *text;         /* TOKEN and DONE: text completed by this event (never half a UTF-8
                           character; may be empty while a possible stop string is held back) */
    size_t text_len;
    xp_finish finish;   /* DONE */
    int prompt_tokens, completion_tokens; /* DONE */
    char *error;        /* ERROR */
} xp_event;

/* A queue of events with an eventfd that is readable while events wait, for poll/epoll/nginx. */
xp_queue *xp_queue_create(void);
void xp_queue_destroy(xp_queue *q);
int xp_queue_fd(const xp_queue *q);
/* 1 and the next event, or 0 when none waits. */
int xp_queue_pop(xp_queue *q, xp_event *ev);
/* Like pop, waiting up to timeout_ms (-1: forever). */
int xp_queue_wait(xp_queue *q, xp_event *ev, int timeout_ms);
void xp_event_clear(xp_event *ev);

typedef struct {
    const char *adapter;          /* registered adapter name, or NULL for the base */
    const xp_chat_msg *messages;  /* one of: chat messages, */
    size_t n_messages;
    int enable_thinking;
    const char *prompt;           /* raw prompt text (special tokens allowed), */
    const int32_t *tokens;        /* or token ids */
    size_t n_tokens;
    float temperature;            /* <= 0: greedy */
    float top_p;                  /* 0 or >= 1: off */
    int top_k;                    /* <= 0: off */
    uint64_t seed;
    int max_tokens;               /* <= 0: up to the context */
    const char *const *stop;      /* stop strings, not included in the output */
    size_t n_stop;
    const int32_t *stop_ids;      /* extra stop token ids (the model's end tokens always stop) */
    size_t n_stop_ids;
} xp_request;

typedef struct {
    uint64_t steps, prompt_tokens, generated_tokens, requests_done;
    uint64_t preemptions; /* running requests sent back to wait for KV blocks, recomputed later */
    int running, waiting;
    int kv_blocks_total, kv_blocks_free;
    int adapters_registered, adapters_resident;
    uint64_t adapter_hits, adapter_misses, adapter_evictions;
    double adapter_load_seconds;
} xp_engine_stats;

/* Loads the model (and its tokenizer) and starts the step thread. NULL + xp_last_error(). */
xp_engine *xp_engine_create(const char *model_dir, const xp_engine_opts *opts);
/* Cancels everything in flight, stops the thread, frees all. */
void xp_engine_destroy(xp_engine *e);

/* Validates an adapter (format, shapes against the base, rank) and registers it; it is loaded
 * into memory now if a slot is free, otherwise on first use. */
int xp_engine_add_adapter(xp_engine *e, const char *name, const char *dir);
/* Unregisters; requests already running keep it until they finish. */
int xp_engine_remove_adapter(xp_engine *e, const char *name);

/* Queues a request; events go to q. Returns its id (> 0), or 0 with xp_last_error() for a request
 * that can never run (unknown adapter, prompt longer than the context, bad parameters). */
uint64_t xp_engine_submit(xp_engine *e, const xp_request *r, xp_queue *q);
/* Finishes the request at the next step boundary with XP_FINISH_CANCELLED; 0, or -1 if unknown. */
int xp_engine_cancel(xp_engine *e, uint64_t id);

void xp_engine_stats_get(xp_engine *e, xp_engine_stats *s);
/* The backend the engine runs on ("cpu" or "cuda"). */
const char *xp_engine_backend(const xp_engine *e);
/* Context length in positions. */
int xp_engine_context(const xp_engine *e);
/* Bytes of weights one decode step streams (for bandwidth figures). */
uint64_t xp_engine_step_bytes(const xp_engine *e);

#endif
