/*
 * ngx_xprec_module: an OpenAI-compatible API for authenticated tenants, served by the xprec
 * engine (engine/xprec.h) running inside the nginx worker.
 *
 * Files, by concern:
 *   ngx_xprec_module.c   the module, its directives and their checks at nginx -t
 *   ngx_xprec_worker.c   the engine's life in a worker: start on a thread, the event queue
 *                        wrapped as a connection, events dispatched to requests by id, exit
 *   ngx_xprec_auth.c     API keys: Bearer token -> SHA-256 -> tenant, and model permissions
 *   ngx_xprec_openai.c   OpenAI request bodies -> engine requests, with their validation
 *   ngx_xprec_reply.c    JSON bodies, SSE chunks, OpenAI error objects, buffered output
 *   ngx_xprec_handler.c  the xprec_openai location: routing, body, submit, events, cleanup
 *   ngx_xprec_admin.c    the xprec_admin location: status, load/unload adapters
 *   ngx_xprec_vars.c     $xprec_* variables for log_format
 *
 * A request's path: auth -> model permission -> body parsed -> [quota: a later async step
 * slots in here, before submit] -> xp_engine_submit -> events on the worker's queue -> SSE
 * chunks or one JSON body.
 */

#ifndef NGX_XPREC_H_INCLUDED_
#define NGX_XPREC_H_INCLUDED_

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <cjson/cJSON.h>

#include "xprec.h"


#define NGX_XPREC_KEY_LEN        32        /* SHA-256 */
#define NGX_XPREC_MAX_STOP       4
#define NGX_XPREC_OUT_LIMIT      (4 * 1024 * 1024) /* unsent stream bytes: a stalled client */
#define NGX_XPREC_TICK           1000      /* ms between in-flight requests' checks */


/* the characters of model, adapter and tenant names */
static ngx_inline ngx_flag_t
ngx_xprec_name_char(u_char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || c == '.' || c == '_' || c == '-' || c == ':' || c == '/';
}


typedef struct {
    ngx_str_t                   name;
    ngx_str_t                   dir;            /* NUL-terminated */
    ngx_flag_t                  pinned;
    ngx_int_t                   rank;
} ngx_xprec_adapter_conf_t;


typedef struct {
    ngx_str_t                   name;
    ngx_array_t                 keys;           /* u_char[NGX_XPREC_KEY_LEN] */
    ngx_flag_t                  all_models;
    ngx_array_t                 models;         /* ngx_str_t */
    /* quotas, parsed and kept for the Redis step; 0: none */
    ngx_uint_t                  rpm;
    ngx_uint_t                  tpm;
    ngx_uint_t                  tokens_per_day;
    ngx_uint_t                  max_concurrent;
    ngx_uint_t                  index;
} ngx_xprec_tenant_t;


typedef struct {
    ngx_flag_t                  enabled;
    ngx_str_t                   model_dir;      /* NUL-terminated */
    ngx_str_t                   model_name;     /* the base's id in the API */
    ngx_str_t                   backend;        /* NUL-terminated */
    ngx_int_t                   threads;
    ngx_int_t                   max_batch;
    ngx_int_t                   max_adapters;
    ngx_int_t                   prefill_chunk;
    ngx_int_t                   device;
    size_t                      kv_cache;
    ngx_flag_t                  per_worker;
    ngx_flag_t                  exclusive;
    ngx_str_t                   lock_file;      /* NUL-terminated */
    ngx_msec_t                  start_wait;
    xp_model_info               info;

    ngx_array_t                 adapters;       /* ngx_xprec_adapter_conf_t */
    ngx_array_t                 tenants;        /* ngx_xprec_tenant_t */
    u_char                      admin_key[NGX_XPREC_KEY_LEN];
    ngx_flag_t                  has_admin_key;

    u_char                     *engine_file;    /* where xprec_engine was, for later errors */
    ngx_uint_t                  engine_line;

    /* xprec_redis */
    ngx_flag_t                  redis;
    u_char                     *redis_host;     /* an IP, NUL-terminated; NULL for a socket */
    ngx_int_t                   redis_port;
    u_char                     *redis_unix;
    ngx_str_t                   redis_password;
    ngx_int_t                   redis_db;
    ngx_msec_t                  redis_timeout;
    ngx_flag_t                  redis_deny;     /* on_error=deny */
    ngx_str_t                   node;           /* this gateway's name in the fleet */
} ngx_xprec_main_conf_t;


enum {
    NGX_XPREC_LOC_NONE = 0,
    NGX_XPREC_LOC_OPENAI,
    NGX_XPREC_LOC_ADMIN,
    NGX_XPREC_LOC_ERROR,
    NGX_XPREC_LOC_METRICS
};


typedef struct {
    ngx_uint_t                  handler;
    ngx_int_t                   max_tokens;
} ngx_xprec_loc_conf_t;


/* An adapter loaded through the admin API: known to this worker only. */
typedef struct ngx_xprec_runtime_adapter_s  ngx_xprec_runtime_adapter_t;

struct ngx_xprec_runtime_adapter_s {
    ngx_xprec_runtime_adapter_t  *next;
    char                         *name;
    char                         *dir;
    ngx_flag_t                    all_tenants;
    ngx_uint_t                    n_tenants;
    char                        **tenants;
    ngx_flag_t                    loading;      /* registration still in flight */
    uint64_t                      ticket;       /* its engine ticket while loading */
    ngx_flag_t                    shared;       /* in the Redis registry (else this node's) */
    ngx_flag_t                    broken;       /* from the registry, but it would not load */
};


enum {
    NGX_XPREC_CHAT = 1,
    NGX_XPREC_COMPLETION,
    NGX_XPREC_ADMIN_LOAD
};


/* One generated token's logprobs, kept for a response built at the end. */
typedef struct {
    xp_logprobs                 lp;
} ngx_xprec_lp_t;


typedef struct ngx_xprec_ctx_s  ngx_xprec_ctx_t;
typedef struct ngx_xprec_qreq_s  ngx_xprec_qreq_t;

struct ngx_xprec_ctx_s {
    ngx_rbtree_node_t           node;           /* key: the engine's request id */
    ngx_http_request_t         *r;
    ngx_queue_t                 wait;           /* waiting for the engine to start */
    ngx_event_t                 tick;           /* keeps the worker up; shutdown, start wait */

    ngx_xprec_tenant_t         *tenant;
    ngx_str_t                   model;          /* as the client named it */
    ngx_uint_t                  kind;
    uint64_t                    id;

    /* the request as parsed: its strings live in json until submit copies them */
    cJSON                      *json;
    xp_request                  req;
    xp_chat_msg                *msgs;
    const char                 *stops[NGX_XPREC_MAX_STOP];
    int32_t                    *prompt_ids;     /* a token-id prompt, malloc'd */
    char                       *prompt_text;    /* text parts joined, malloc'd */
    char                      **contents;       /* joined message contents, malloc'd */
    size_t                      n_contents;

    unsigned                    stream:1;
    unsigned                    include_usage:1;
    unsigned                    logprobs:1;
    unsigned                    echo:1;
    unsigned                    in_tree:1;
    unsigned                    waiting:1;
    unsigned                    headers_sent:1;
    unsigned                    prompted:1;     /* the engine tokenized it */
    unsigned                    finished:1;
    unsigned                    token_ids:1;    /* vLLM's return_tokens_as_token_ids */
    ngx_int_t                   top_logprobs;

    ngx_str_t                   cmpl_id;
    time_t                      created;
    ngx_msec_t                  t_start;
    ngx_msec_t                  t_first;

    /* what the engine said */
    int                         prompt_tokens;
    int                         completion_tokens;
    xp_finish                   finish;
    int32_t                    *echo_ids;       /* PROMPT: the prompt's ids (echo) */
    int                         n_echo_ids;
    xp_logprobs                *prompt_lp;      /* PROMPT_LOGPROBS */

    /* a response built at the end: text and logprobs so far (malloc'd) */
    u_char                     *text;
    size_t                      text_len;
    size_t                      text_cap;
    xp_logprobs                *lps;
    int32_t                    *lp_tokens;
    size_t                      n_lps;
    size_t                      cap_lps;

    /* stream output buffers, recycled as they are sent */
    ngx_chain_t                *free;
    ngx_chain_t                *busy;
    size_t                      unsent;

    /* admin: the adapter being loaded */
    ngx_xprec_runtime_adapter_t *loading;

    /* quotas (ngx_xprec_quota.c) */
    unsigned                    limited:1;      /* the tenant has limits: admit through Redis */
    unsigned                    reserved:1;     /* Redis holds a reservation for it */
    unsigned                    unreserved:1;   /* admitted while Redis was unreachable */
    unsigned                    counted:1;      /* its usage has been recorded */
    unsigned                    model_ok:1;     /* a model the tenant may use: its usage counts
                                                   (a name a client made up is no label) */
    unsigned                    rl_valid:1;     /* the x-ratelimit-* values below are set */
    ngx_xprec_qreq_t           *qreq;           /* a reservation on its way */
    ngx_msec_t                  touched;        /* when the reservation was last renewed */
    int64_t                     rl[6];          /* limit/remaining/reset of requests, tokens */
    int                         bound;          /* tokens reserved: prompt + max_tokens */
};


/* the worker's engine */
typedef struct {
    xp_engine                  *engine;
    xp_queue                   *queue;
    ngx_uint_t                  starting;
    ngx_uint_t                  failed;
    char                        error[512];
    ngx_rbtree_t                requests;
    ngx_rbtree_node_t           sentinel;
    ngx_queue_t                 waiting;
    ngx_uint_t                 *in_flight;      /* per tenant */
    ngx_xprec_runtime_adapter_t *runtime;
    ngx_msec_t                  exit_start;     /* when graceful shutdown began */
    ngx_flag_t                  exiting;        /* exit_process has begun */
} ngx_xprec_worker_t;


extern ngx_module_t  ngx_xprec_module;
extern ngx_xprec_worker_t  ngx_xprec_worker;


/* ngx_xprec_worker.c */
ngx_int_t ngx_xprec_init_worker(ngx_cycle_t *cycle);
void ngx_xprec_exit_worker(ngx_cycle_t *cycle);
void ngx_xprec_track(ngx_xprec_ctx_t *ctx);
void ngx_xprec_untrack(ngx_xprec_ctx_t *ctx);
ngx_int_t ngx_xprec_engine_ready(void);
ngx_flag_t ngx_xprec_shutdown_due(ngx_cycle_t *cycle);
void ngx_xprec_fd_release(ngx_connection_t *c);

/* ngx_xprec_auth.c */
void ngx_xprec_sha256(const u_char *data, size_t len, u_char *out);
ngx_xprec_tenant_t *ngx_xprec_auth(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf);
ngx_int_t ngx_xprec_auth_admin(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf);
/* 1 when the tenant may use the model; *adapter gets the engine's adapter name (NULL: base) */
ngx_int_t ngx_xprec_model_allowed(ngx_xprec_main_conf_t *mcf, ngx_xprec_tenant_t *t,
    ngx_str_t *model, const char **adapter);

/* ngx_xprec_openai.c: NGX_OK, or NGX_DECLINED with *err / *param set (a 400) */
ngx_int_t ngx_xprec_parse_chat(ngx_xprec_ctx_t *ctx, cJSON *body, ngx_int_t max_tokens,
    const char **err, const char **param);
ngx_int_t ngx_xprec_parse_completion(ngx_xprec_ctx_t *ctx, cJSON *body,
    ngx_int_t max_tokens, const char **err, const char **param);
cJSON *ngx_xprec_parse_json(const u_char *data, size_t len, const char **err);
void ngx_xprec_request_free(ngx_xprec_ctx_t *ctx);

/* ngx_xprec_reply.c */
ngx_int_t ngx_xprec_send_json(ngx_http_request_t *r, ngx_uint_t status, cJSON *body);
ngx_int_t ngx_xprec_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, const char *param, const char *fmt, ...);
cJSON *ngx_xprec_error_object(const char *type, const char *code, const char *param,
    const char *message);
ngx_int_t ngx_xprec_stream_start(ngx_xprec_ctx_t *ctx);
ngx_int_t ngx_xprec_stream_send(ngx_xprec_ctx_t *ctx, cJSON *chunk);
ngx_int_t ngx_xprec_stream_raw(ngx_xprec_ctx_t *ctx, const char *data, size_t len,
    ngx_flag_t last);
void ngx_xprec_stream_writer(ngx_http_request_t *r);
char *ngx_xprec_utf8_fix(const char *s, size_t len);
/* length of the well-formed UTF-8 sequence at s (avail bytes there), 0 if it is not one */
size_t ngx_xprec_utf8_seq(const u_char *s, size_t avail);

/* ngx_xprec_handler.c */
cJSON *ngx_xprec_parse_body(ngx_http_request_t *r, const char **err);
ngx_int_t ngx_xprec_openai_handler(ngx_http_request_t *r);
ngx_int_t ngx_xprec_error_handler(ngx_http_request_t *r);
void ngx_xprec_on_event(ngx_xprec_ctx_t *ctx, xp_event *ev);
void ngx_xprec_submit(ngx_xprec_ctx_t *ctx);
void ngx_xprec_start_failed(ngx_xprec_ctx_t *ctx);
ngx_int_t ngx_xprec_ctx_init(ngx_http_request_t *r, ngx_xprec_ctx_t **out);
cJSON *ngx_xprec_models_json(ngx_xprec_main_conf_t *mcf, ngx_xprec_tenant_t *t,
    ngx_str_t *only);

/* ngx_xprec_admin.c */
ngx_int_t ngx_xprec_admin_handler(ngx_http_request_t *r);
void ngx_xprec_admin_on_event(ngx_xprec_ctx_t *ctx, xp_event *ev);
ngx_xprec_runtime_adapter_t *ngx_xprec_runtime_find(const char *name, size_t len);
void ngx_xprec_runtime_free(ngx_xprec_runtime_adapter_t *a);
/* an adapter registration ended: its record is kept or dropped; 1 if ev was one */
ngx_flag_t ngx_xprec_admin_ticket(xp_event *ev);

/* ngx_xprec_quota.c: admission through Redis and usage accounting */
ngx_int_t ngx_xprec_quota_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf);
void ngx_xprec_quota_exit(void);
/* the prompt is tokenized: admit it (NGX_OK, ready now), or NGX_AGAIN (an answer will call
 * ngx_xprec_prompt_ready or end the request) */
ngx_int_t ngx_xprec_quota_admit(ngx_xprec_ctx_t *ctx);
/* the request ends: record its usage (in Redis, or kept until Redis is back) */
void ngx_xprec_quota_end(ngx_xprec_ctx_t *ctx, ngx_uint_t status);
void ngx_xprec_quota_detach(ngx_xprec_ctx_t *ctx);
void ngx_xprec_quota_tick(ngx_xprec_ctx_t *ctx);
ngx_int_t ngx_xprec_quota_headers(ngx_http_request_t *r);
/* an engine request whose client went away ended: its usage, with the engine's counts */
ngx_flag_t ngx_xprec_quota_orphan_event(xp_event *ev);
void ngx_xprec_quota_orphan(ngx_xprec_ctx_t *ctx);
ngx_flag_t ngx_xprec_tenant_limited(ngx_xprec_tenant_t *t);

/* ngx_xprec_handler.c, for the quota step */
void ngx_xprec_prompt_ready(ngx_xprec_ctx_t *ctx);
void ngx_xprec_refuse(ngx_xprec_ctx_t *ctx, ngx_uint_t status, const char *type,
    const char *code, const char *msg, ngx_msec_t retry_ms);

/* ngx_xprec_metrics.c */
ngx_int_t ngx_xprec_metrics_handler(ngx_http_request_t *r);

/* ngx_xprec_vars.c */
ngx_int_t ngx_xprec_add_variables(ngx_conf_t *cf);

#endif /* NGX_XPREC_H_INCLUDED_ */
