/* libxprec's public interface: one engine holds one base model and many LoRA adapters, and runs
 * requests for any mix of them in continuous batches on its own thread.
 *
 * Nothing here blocks for long: submit copies the request and returns (tokenizing and the chat
 * template run on the engine's intake thread), adapters load from disk on a loader thread, and
 * every outcome arrives as an event on the caller's queue, whose eventfd can sit in any poll
 * loop (nginx's included).
 *
 * Thread safety: every function may be called from any thread, except that one queue should be
 * popped by one thread at a time. */
#ifndef XPREC_H
#define XPREC_H

#include <stddef.h>
#include <stdint.h>

typedef struct xp_engine xp_engine;
typedef struct xp_queue xp_queue;

/* What the last failing call on this thread said (every function returns 0/-1 or NULL). */
const char *xp_last_error(void);

typedef struct {
    int threads;         /* compute threads; 0 = all cores */
    size_t kv_bytes;     /* KV cache capacity; 0 = 256 MiB */
    int max_batch;       /* sequences per step; 0 = 32 */
    int max_adapters;    /* adapters resident at once; 0 = 8 */
    int prefill_chunk;   /* token rows per step; 0 = 256 */
    const char *backend; /* "cpu" (default), "cuda", or "auto" (CUDA when built in and a GPU
                            is present, else CPU); NULL: $XPREC_BACKEND, else "cpu" */
    int device;          /* CUDA device index; 0: $XPREC_CUDA_DEVICE, else the first */
} xp_engine_opts;

#define XP_MAX_TOP_LOGPROBS 20

typedef enum {
    XP_EV_TOKEN,  /* a generated token and the text it completes */
    XP_EV_DONE,   /* the request (or an adapter load) ended well */
    XP_EV_ERROR,  /* it could not run, or failed: error says why */
    XP_EV_PROMPT, /* the prompt is tokenized: prompt_tokens and prompt_ids */
    XP_EV_PROMPT_LOGPROBS, /* with prompt_logprobs, once the prompt has run: prompt_logprobs */
} xp_event_type;
typedef enum { XP_FINISH_STOP = 1, XP_FINISH_LENGTH, XP_FINISH_CANCELLED } xp_finish;

typedef struct {
    int32_t token;
    float logprob;
} xp_token_logprob;

/* The log-probability of one chosen token under the model's raw distribution (before
 * temperature, top-k and top-p), and the n_top most likely tokens there. */
typedef struct {
    xp_token_logprob chosen;
    int n_top;
    xp_token_logprob top[XP_MAX_TOP_LOGPROBS];
} xp_logprobs;

typedef struct {
    uint64_t id; /* the request */
    xp_event_type type;
    int32_t token; /* TOKEN: the generated id */
    char *text;    /* TOKEN and DONE: text completed by this event (never half a UTF-8
                      character; may be empty while a possible stop string is held back) */
    size_t text_len;
    xp_logprobs *logprobs; /* TOKEN, when the request asked for logprobs */
    xp_finish finish;      /* DONE */
    int prompt_tokens, completion_tokens; /* DONE, PROMPT and PROMPT_LOGPROBS */
    int32_t *prompt_ids;          /* PROMPT: the prompt's token ids */
    xp_logprobs *prompt_logprobs; /* PROMPT_LOGPROBS: [prompt_tokens]; the first position has
                                     none (chosen.logprob 0, n_top 0) */
    char *error;                     /* ERROR */
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
    const char *role; /* "system", "user", "assistant" or "tool" */
    const char *content;
} xp_chat_msg;

typedef struct {
    const char *adapter;         /* registered adapter name, or NULL for the base */
    const xp_chat_msg *messages; /* one of: chat messages (Qwen3 ChatML), */
    size_t n_messages;
    int enable_thinking;
    const char *prompt;    /* raw prompt text (special tokens allowed), */
    size_t prompt_len;     /* its length (0: strlen) */
    const int32_t *tokens; /* or token ids */
    size_t n_tokens;
    float temperature;     /* <= 0: greedy */
    float top_p;           /* 0 or >= 1: off */
    int top_k;             /* <= 0: off */
    uint64_t seed;
    int max_tokens;          /* <= 0: up to the context */
    int max_tokens_exact;    /* 1: prompt + max_tokens past the context is an error (as the
                                OpenAI API has it), not a shorter reply */
    const char *const *stop; /* stop strings, not included in the output */
    size_t n_stop;
    const int32_t *stop_ids; /* extra stop token ids (the model's end tokens always stop) */
    size_t n_stop_ids;
    int logprobs;        /* 1: each TOKEN event carries its logprob and top_logprobs others */
    int top_logprobs;    /* 0..XP_MAX_TOP_LOGPROBS */
    int prompt_logprobs; /* 1: a PROMPT_LOGPROBS event, before the first token, carries the
                            prompt's logprobs (and top_logprobs others at each position) */
    int hold;            /* 1: after the PROMPT event the request waits for xp_engine_start
                            (a caller that must admit it knowing its size, e.g. a quota) */
} xp_request;

typedef struct {
    uint64_t steps, prompt_tokens, generated_tokens, requests_done;
    uint64_t preemptions; /* running requests sent back to wait for KV blocks, recomputed later */
    int running, waiting, intake; /* intake: submitted, not yet tokenized */
    int kv_blocks_total, kv_blocks_free;
    int adapters_registered, adapters_resident;
    uint64_t adapter_hits, adapter_misses, adapter_evictions, adapter_loads;
    double adapter_load_seconds;
} xp_engine_stats;

/* Where an adapter's weights are. */
typedef enum { XP_TIER_DISK, XP_TIER_LOADING, XP_TIER_RESIDENT } xp_adapter_tier;

typedef struct {
    char name[128];
    xp_adapter_tier tier;
    int pinned;  /* never evicted */
    int running; /* sequences using it now */
    int rank;    /* largest rank of its modules */
    uint64_t hits, misses, loads, evictions;
    double load_seconds;
    double idle_seconds; /* since it was last used (or registered) */
} xp_adapter_info;

/* What a model directory holds, as xp_model_check finds it. */
typedef struct {
    int max_position_embeddings, vocab_size, layers, hidden_size;
    int fp8; /* linear weights are FP8 block-quantized */
} xp_model_info;

/* Checks a model directory the way xp_engine_create would, without loading weights:
 * config.json, every tensor's presence, shape and dtype (from the safetensors headers and the
 * FP8 scales), and the tokenizer. For configuration checks (nginx -t); -1 + xp_last_error(). */
int xp_model_check(const char *dir, xp_model_info *info);
/* Checks a PEFT adapter against a model directory: format, targets, shapes and rank, without
 * loading its weights. *max_rank (may be NULL) gets its largest rank. */
int xp_adapter_check(const char *model_dir, const char *adapter_dir, int *max_rank);

/* Loads the model (and its tokenizer) and starts the engine's threads. NULL + xp_last_error(). */
xp_engine *xp_engine_create(const char *model_dir, const xp_engine_opts *opts);
/* Cancels everything in flight, stops the threads, frees all. */
void xp_engine_destroy(xp_engine *e);

#define XP_ADAPTER_PINNED 1u /* loaded now and never evicted */

/* Validates an adapter (format, shapes against the base, rank) on the calling thread and
 * registers it; it is loaded into memory now if a slot is free (a pinned one always: it may
 * evict an idle unpinned adapter), otherwise on first use. */
int xp_engine_add_adapter(xp_engine *e, const char *name, const char *dir, unsigned flags);
/* The same on the loader thread: returns a ticket id (> 0) at once, and later a DONE or an
 * ERROR event with that id on q. 0 + xp_last_error() for a name that is taken. */
uint64_t xp_engine_add_adapter_async(xp_engine *e, const char *name, const char *dir,
                                     unsigned flags, xp_queue *q);
/* Unregisters; requests already running keep it until they finish, then its memory is freed. */
int xp_engine_remove_adapter(xp_engine *e, const char *name);
/* Up to max adapters' info into out; returns how many are registered. */
int xp_engine_adapters(xp_engine *e, xp_adapter_info *out, int max);

/* Queues a request and returns its id (> 0) at once; events go to q. 0 with xp_last_error()
 * only for what can be told without tokenizing: no queue, an unknown adapter, sampling
 * parameters out of range, more or less than one of messages/prompt/tokens, an empty stop
 * string. Anything else that keeps it from running (an empty prompt or one longer than the
 * context, an id outside the vocabulary) comes back as an ERROR event. */
uint64_t xp_engine_submit(xp_engine *e, const xp_request *r, xp_queue *q);
/* Lets a request submitted with hold run; 0, or -1 if it is not held. */
int xp_engine_start(xp_engine *e, uint64_t id);
/* Finishes the request at the next step boundary with XP_FINISH_CANCELLED; 0, or -1 if unknown. */
int xp_engine_cancel(xp_engine *e, uint64_t id);

void xp_engine_stats_get(xp_engine *e, xp_engine_stats *s);
/* The backend the engine runs on ("cpu" or "cuda"). */
const char *xp_engine_backend(const xp_engine *e);
/* Context length in positions. */
int xp_engine_context(const xp_engine *e);
/* Bytes one KV block (of 16 positions) takes in the backend's storage. */
size_t xp_engine_kv_block_bytes(const xp_engine *e);
/* Bytes of weights one decode step streams (for bandwidth figures). */
uint64_t xp_engine_step_bytes(const xp_engine *e);
/* Read bandwidth, bytes/s, of the memory the backend keeps the weights in (measured now). */
double xp_engine_read_bandwidth(xp_engine *e);
/* A token's raw bytes (a piece of UTF-8, possibly partial), valid while e lives; NULL for an id
 * without a token. */
const char *xp_engine_token_bytes(const xp_engine *e, int32_t id, size_t *len);
/* Text of token ids, malloc'd (*len its length); NULL when out of memory. */
char *xp_engine_decode(const xp_engine *e, const int32_t *ids, size_t n, size_t *len);

#endif
