/*
 * Exact per-tenant quotas and fleet-wide usage, kept in Redis (see redis/README.md).
 *
 * A limited tenant's request is submitted to the engine held: once it is tokenized, its token
 * bound (prompt + max_tokens) is reserved by redis/reserve.lua, which admits it only if every
 * limit still holds after it, atomically, whatever the concurrency. Then the engine starts it.
 * At its end redis/finish.lua replaces the reservation with what it used and adds its usage to
 * the tenant's counters; a client that went away is charged what was generated (its engine
 * request's last event tells). Running requests renew their reservation's expiry; a dead
 * gateway's reservations expire and are given back.
 *
 * Redis unreachable: on_error=allow admits, and keeps each request's usage in this worker
 * until Redis confirms it (finish.lua is idempotent, so an answer lost on the way counts once);
 * on_error=deny answers 503. No request waits longer than the Redis timeout.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"

#include <math.h>


#define NGX_XPREC_RESV_TTL    60000    /* ms a reservation lives unless renewed */
#define NGX_XPREC_RESV_RENEW  20000

enum { K_RPM, K_TPM, K_DAYS, K_INFLIGHT, K_RESV, K_USAGE, K_DONE, K_COUNT };


/* a reservation on its way to Redis; outlives its request when the client goes first */
struct ngx_xprec_qreq_s {
    ngx_xprec_ctx_t    *ctx;            /* NULL once the request is gone */
    ngx_uint_t          tenant;
    char                id[96];
    char                model[128];
    ngx_msec_t          t_start;
    int                 prompt_tokens;
    int                 bound;
};


/* what a request that ended used, for finish.lua (kept until Redis confirms it) */
typedef struct ngx_xprec_usage_s {
    ngx_uint_t          tenant;
    char                id[96];
    char                model[128];
    ngx_uint_t          status;
    int                 prompt_tokens;
    int                 completion_tokens;
    ngx_msec_t          ttft;           /* 0: no token came */
    ngx_msec_t          duration;
    ngx_flag_t          reserved;
    ngx_flag_t          unreserved;     /* admitted without Redis: count it into the window */
    time_t              started;        /* wall clock, for the window and the day */
    struct ngx_xprec_usage_s *next;     /* in the pending list */
} ngx_xprec_usage_t;


/* an engine request still running for a client that left */
typedef struct {
    ngx_rbtree_node_t   node;
    ngx_xprec_usage_t   u;
} ngx_xprec_orphan_t;


#define NGX_XPREC_PENDING_MAX  200000

static ngx_xprec_main_conf_t  *ngx_xprec_qmcf;
static char                  **ngx_xprec_keys;      /* per tenant: K_COUNT key names */
static ngx_xprec_usage_t      *ngx_xprec_pending;   /* usage Redis has not confirmed */
static ngx_xprec_usage_t     **ngx_xprec_pending_tail = &ngx_xprec_pending;
static ngx_uint_t              ngx_xprec_npending;
static ngx_rbtree_t            ngx_xprec_orphans;
static ngx_rbtree_node_t       ngx_xprec_orphan_sentinel;
static char                    ngx_xprec_id_prefix[64];

static void ngx_xprec_quota_record(ngx_xprec_usage_t *in);
void ngx_xprec_quota_flush(void);

static const char *ngx_xprec_key_names[K_COUNT] = {
    "rpm", "tpm", "days", "inflight", "resv", "usage", "done"
};


/* ------------------------------------------------------------------ buckets */

static const double ngx_xprec_ttft_le[] = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30
};
static const double ngx_xprec_dur_le[] = {
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300
};

const double *ngx_xprec_hist_le(ngx_uint_t which, ngx_uint_t *n);


const double *
ngx_xprec_hist_le(ngx_uint_t which, ngx_uint_t *n)
{
    if (which == 0) {
        *n = sizeof(ngx_xprec_ttft_le) / sizeof(double);
        return ngx_xprec_ttft_le;
    }

    *n = sizeof(ngx_xprec_dur_le) / sizeof(double);
    return ngx_xprec_dur_le;
}


/* the bucket label of a value in ms: the smallest bound it fits under, or +Inf */
static void
ngx_xprec_bucket(ngx_uint_t which, ngx_msec_t ms, char *out, size_t size)
{
    ngx_uint_t     i, n;
    const double  *le = ngx_xprec_hist_le(which, &n);

    for (i = 0; i < n; i++) {
        if ((double) ms / 1000.0 <= le[i]) {
            snprintf(out, size, "%g", le[i]);
            return;
        }
    }

    ngx_cpystrn((u_char *) out, (u_char *) "+Inf", size);
}


/* ------------------------------------------------------------------ time */

static void
ngx_xprec_day(time_t t, char *out)
{
    ngx_tm_t  tm;

    ngx_gmtime(t, &tm);
    ngx_snprintf((u_char *) out, 16, "%4d%02d%02d%Z", tm.ngx_tm_year, tm.ngx_tm_mon,
                 tm.ngx_tm_mday);
}


static int64_t
ngx_xprec_now_ms(void)
{
    ngx_time_t  *tp = ngx_timeofday();

    return (int64_t) tp->sec * 1000 + tp->msec;
}


/* ------------------------------------------------------------------ set-up */

ngx_flag_t
ngx_xprec_tenant_limited(ngx_xprec_tenant_t *t)
{
    return t->rpm || t->tpm || t->tokens_per_day || t->max_concurrent;
}


ngx_int_t
ngx_xprec_quota_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf)
{
    ngx_xprec_tenant_t  *t = mcf->tenants.elts;
    ngx_uint_t           i, k;
    u_char              *p;

    ngx_xprec_qmcf = mcf;
    ngx_rbtree_init(&ngx_xprec_orphans, &ngx_xprec_orphan_sentinel, ngx_rbtree_insert_value);

    ngx_xprec_keys = ngx_pcalloc(cycle->pool, (mcf->tenants.nelts + 1) * K_COUNT
                                              * sizeof(char *));
    if (ngx_xprec_keys == NULL) {
        return NGX_ERROR;
    }

    /* one tenant's keys share a hash tag: the scripts run on a cluster too */
    for (i = 0; i < mcf->tenants.nelts; i++) {
        for (k = 0; k < K_COUNT; k++) {
            p = ngx_pnalloc(cycle->pool, t[i].name.len + 32);
            if (p == NULL) {
                return NGX_ERROR;
            }
            ngx_snprintf(p, t[i].name.len + 32, "xprec:{t:%V}:%s%Z", &t[i].name,
                         ngx_xprec_key_names[k]);
            ngx_xprec_keys[i * K_COUNT + k] = (char *) p;
        }
    }

    ngx_snprintf((u_char *) ngx_xprec_id_prefix, sizeof(ngx_xprec_id_prefix) - 1,
                 "%V:%P:%T%Z", &mcf->node, ngx_pid, ngx_time());

    return NGX_OK;
}


const char *
ngx_xprec_tenant_key(ngx_uint_t tenant, ngx_uint_t which)
{
    return ngx_xprec_keys[tenant * K_COUNT + which];
}


/* ------------------------------------------------------------------ admission */

static void
ngx_xprec_reserve_done(void *data, redisReply *r)
{
    ngx_xprec_qreq_t   *q = data;
    ngx_xprec_ctx_t    *ctx = q->ctx;
    ngx_xprec_tenant_t *t;
    ngx_xprec_usage_t   u;
    int64_t             v[9];
    size_t              i;
    char                msg[512];
    const char         *what;
    ngx_uint_t          status;

    for (i = 0; r && r->type == REDIS_REPLY_ARRAY && i < 9 && i < r->elements; i++) {
        v[i] = r->element[i]->type == REDIS_REPLY_INTEGER ? r->element[i]->integer : 0;
    }

    if (ctx == NULL) {
        /* the client left while Redis answered: give back a reservation made for nobody */
        if (r && r->type == REDIS_REPLY_ARRAY && r->elements >= 9 && v[0] == 0
            && !ngx_xprec_worker.exiting)
        {
            ngx_memzero(&u, sizeof(u));
            u.tenant = q->tenant;
            ngx_cpystrn((u_char *) u.id, (u_char *) q->id, sizeof(u.id));
            ngx_cpystrn((u_char *) u.model, (u_char *) q->model, sizeof(u.model));
            u.status = NGX_HTTP_CLIENT_CLOSED_REQUEST;
            u.duration = ngx_current_msec - q->t_start;
            u.reserved = 1;
            u.started = ngx_time();
            ngx_xprec_quota_record(&u);
        }
        free(q);
        return;
    }

    ctx->qreq = NULL;
    t = ctx->tenant;

    if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements < 9) {
        free(q);
        if (ngx_xprec_qmcf->redis_deny) {
            ngx_xprec_refuse(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "server_error",
                             "quota_unavailable",
                             "the quota store (Redis) cannot be reached; retry later", 1000);
            return;
        }
        /* on_error=allow: served, and counted here until Redis is back */
        ctx->unreserved = 1;
        ngx_xprec_prompt_ready(ctx);
        return;
    }

    free(q);

    ctx->rl[0] = (int64_t) t->rpm;
    ctx->rl[1] = v[1];
    ctx->rl[2] = v[2];
    ctx->rl[3] = (int64_t) t->tpm;
    ctx->rl[4] = v[3];
    ctx->rl[5] = v[4];
    ctx->rl_valid = 1;

    if (v[0] == 0) {
        ctx->reserved = 1;
        ctx->touched = ngx_current_msec;
        ngx_xprec_prompt_ready(ctx);
        return;
    }

    status = NGX_HTTP_TOO_MANY_REQUESTS;
    what = "requests";
    switch (v[0]) {
    case 1:
        ngx_snprintf((u_char *) msg, sizeof(msg) - 1, "Rate limit reached for requests per "
                     "minute (rpm) of tenant %V: limit %L, used %L. Please try again in "
                     "%.1fs.%Z", &t->name, v[8], v[7], (double) v[6] / 1000);
        break;
    case 2:
        what = "tokens";
        ngx_snprintf((u_char *) msg, sizeof(msg) - 1, "Rate limit reached for tokens per "
                     "minute (tpm) of tenant %V: limit %L, used %L, requested %d (prompt + "
                     "max_tokens). Please try again in %.1fs.%Z", &t->name, v[8], v[7],
                     ctx->bound, (double) v[6] / 1000);
        break;
    case 3:
        ngx_snprintf((u_char *) msg, sizeof(msg) - 1, "Tenant %V has used its daily token "
                     "budget (tokens_per_day): limit %L, used %L, requested %d. It renews at "
                     "00:00 UTC, in %.0fs.%Z", &t->name, v[8], v[7], ctx->bound,
                     (double) v[6] / 1000);
        ngx_xprec_refuse(ctx, status, "insufficient_quota", "insufficient_quota", msg, v[6]);
        return;
    case 4:
        ngx_snprintf((u_char *) msg, sizeof(msg) - 1, "Tenant %V has %L requests in flight, "
                     "its limit (max_concurrent). Please try again when one has ended.%Z",
                     &t->name, v[7]);
        break;
    default:
        what = "tokens";
        ngx_snprintf((u_char *) msg, sizeof(msg) - 1, "Request too large for tenant %V: it "
                     "may need %L tokens (prompt + max_tokens), more than its limit of %L; "
                     "lower max_tokens.%Z", &t->name, v[7], v[8]);
        v[6] = 0;
        break;
    }

    ngx_xprec_refuse(ctx, status, what, "rate_limit_exceeded", msg, v[6]);
}


ngx_int_t
ngx_xprec_quota_admit(ngx_xprec_ctx_t *ctx)
{
    ngx_xprec_tenant_t  *t = ctx->tenant;
    ngx_xprec_qreq_t    *q;
    const char          *keys[5], *args[11];
    char                 a[11][32];
    int64_t              now = ngx_xprec_now_ms();
    int                  room, k;
    time_t               sec = (time_t) (now / 1000);

    if (!ctx->limited || !ngx_xprec_qmcf->redis) {
        return NGX_OK;
    }

    room = xp_engine_context(ngx_xprec_worker.engine) - ctx->prompt_tokens;
    ctx->bound = ctx->prompt_tokens
                 + (ctx->req.max_tokens > 0 && ctx->req.max_tokens < room ? ctx->req.max_tokens
                                                                         : room);

    q = calloc(1, sizeof(*q));
    if (q == NULL) {
        return NGX_ERROR;
    }

    q->ctx = ctx;
    q->tenant = t->index;
    q->t_start = ctx->t_start;
    q->prompt_tokens = ctx->prompt_tokens;
    q->bound = ctx->bound;
    ngx_snprintf((u_char *) q->id, sizeof(q->id) - 1, "%s:%uL%Z", ngx_xprec_id_prefix,
                 ctx->id);
    ngx_snprintf((u_char *) q->model, sizeof(q->model) - 1, "%V%Z", &ctx->model);
    ctx->qreq = q;

    for (k = 0; k < 5; k++) {
        keys[k] = ngx_xprec_tenant_key(t->index, k);
    }

    ngx_snprintf((u_char *) a[0], 31, "%L%Z", now);
    ngx_snprintf((u_char *) a[1], 31, "%d%Z", ctx->bound);
    ngx_snprintf((u_char *) a[2], 31, "%ui%Z", t->rpm);
    ngx_snprintf((u_char *) a[3], 31, "%ui%Z", t->tpm);
    ngx_snprintf((u_char *) a[4], 31, "%ui%Z", t->tokens_per_day);
    ngx_snprintf((u_char *) a[5], 31, "%ui%Z", t->max_concurrent);
    ngx_snprintf((u_char *) a[6], 31, "%d%Z", NGX_XPREC_RESV_TTL);
    ngx_xprec_day(sec, a[7]);
    ngx_snprintf((u_char *) a[8], 31, "%L%Z", (int64_t) (86400 - sec % 86400) * 1000);
    ngx_xprec_day(sec - 86400, a[9]);

    args[0] = a[0];
    args[1] = q->id;
    for (k = 1; k < 10; k++) {
        args[k + 1] = a[k];
    }

    (void) ngx_xprec_redis_eval(NGX_XPREC_SCRIPT_RESERVE, 5, keys, 11, args,
                                ngx_xprec_reserve_done, q);

    return NGX_AGAIN;
}


void
ngx_xprec_quota_detach(ngx_xprec_ctx_t *ctx)
{
    if (ctx->qreq) {
        ctx->qreq->ctx = NULL;
        ctx->qreq = NULL;
    }
}


static void
ngx_xprec_ignore_reply(void *data, redisReply *r)
{
}


void
ngx_xprec_quota_tick(ngx_xprec_ctx_t *ctx)
{
    const char  *keys[1], *args[2];
    char         id[96], exp[32];

    if (!ctx->reserved || ngx_current_msec - ctx->touched < NGX_XPREC_RESV_RENEW) {
        return;
    }

    ctx->touched = ngx_current_msec;
    ngx_snprintf((u_char *) id, sizeof(id) - 1, "%s:%uL%Z", ngx_xprec_id_prefix, ctx->id);
    ngx_snprintf((u_char *) exp, sizeof(exp) - 1, "%L%Z",
                 ngx_xprec_now_ms() + NGX_XPREC_RESV_TTL);
    keys[0] = ngx_xprec_tenant_key(ctx->tenant->index, K_INFLIGHT);
    args[0] = id;
    args[1] = exp;
    (void) ngx_xprec_redis_eval(NGX_XPREC_SCRIPT_TOUCH, 1, keys, 2, args,
                                ngx_xprec_ignore_reply, NULL);
}


/* ------------------------------------------------------------------ headers */

static u_char *
ngx_xprec_duration(u_char *p, int64_t ms)
{
    if (ms < 0) {
        ms = 0;
    }

    if (ms < 1000) {
        return ngx_sprintf(p, "%Lms", ms);
    }

    if (ms < 60000) {
        return ngx_sprintf(p, "%.3fs", (double) ms / 1000);
    }

    return ngx_sprintf(p, "%Lm%Ls", ms / 60000, (ms % 60000) / 1000);
}


static ngx_int_t
ngx_xprec_add_header(ngx_http_request_t *r, const char *name, u_char *value, size_t len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value.data = ngx_pnalloc(r->pool, len);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }
    ngx_memcpy(h->value.data, value, len);
    h->value.len = len;

    return NGX_OK;
}


/* OpenAI's x-ratelimit-* headers, on every response of a limited tenant's request */
ngx_int_t
ngx_xprec_quota_headers(ngx_http_request_t *r)
{
    ngx_xprec_ctx_t  *ctx = ngx_http_get_module_ctx(r, ngx_xprec_module);
    u_char            buf[64], *p;
    ngx_uint_t        i;
    static const char *names[6] = {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"
    };

    if (ctx == NULL || !ctx->rl_valid) {
        return NGX_OK;
    }

    for (i = 0; i < 6; i++) {
        /* a limit the tenant does not have gets no headers */
        if (ctx->rl[i / 3 * 3] == 0) {
            continue;
        }
        p = i % 3 == 2 ? ngx_xprec_duration(buf, ctx->rl[i])
                       : ngx_sprintf(buf, "%L", ctx->rl[i] < 0 ? 0 : ctx->rl[i]);
        if (ngx_xprec_add_header(r, names[i], buf, p - buf) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    ctx->rl_valid = 0; /* once per response */

    return NGX_OK;
}


/* ------------------------------------------------------------------ usage */

static void ngx_xprec_finish_send(ngx_xprec_usage_t *u);


static void
ngx_xprec_pending_add(ngx_xprec_usage_t *u)
{
    ngx_xprec_usage_t  *old;

    if (ngx_xprec_npending >= NGX_XPREC_PENDING_MAX) {
        old = ngx_xprec_pending;
        ngx_xprec_pending = old->next;
        if (ngx_xprec_pending == NULL) {
            ngx_xprec_pending_tail = &ngx_xprec_pending;
        }
        ngx_xprec_npending--;
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "xprec: redis unreachable for long: %ui requests' usage kept, the "
                      "oldest is dropped", (ngx_uint_t) NGX_XPREC_PENDING_MAX);
        free(old);
    }

    u->next = NULL;
    *ngx_xprec_pending_tail = u;
    ngx_xprec_pending_tail = &u->next;
    ngx_xprec_npending++;
}


static void
ngx_xprec_finish_done(void *data, redisReply *r)
{
    ngx_xprec_usage_t  *u = data;

    if ((r == NULL || r->type == REDIS_REPLY_ERROR) && !ngx_xprec_worker.exiting) {
        /* kept until Redis confirms it; finish.lua counts a repeat once */
        ngx_xprec_pending_add(u);
        return;
    }

    free(u);
}


static void
ngx_xprec_finish_send(ngx_xprec_usage_t *u)
{
    const char  *keys[K_COUNT], *args[14];
    char         a[13][48];
    ngx_uint_t   k;
    int          used = u->prompt_tokens + u->completion_tokens;

    for (k = 0; k < K_COUNT; k++) {
        keys[k] = ngx_xprec_tenant_key(u->tenant, k);
    }

    ngx_snprintf((u_char *) a[0], 47, "%d%Z", used);
    ngx_snprintf((u_char *) a[1], 47, "%ui%Z", u->status);
    ngx_snprintf((u_char *) a[2], 47, "%d%Z", u->prompt_tokens);
    ngx_snprintf((u_char *) a[3], 47, "%d%Z", u->completion_tokens);
    if (u->ttft) {
        ngx_xprec_bucket(0, u->ttft, a[4], 48);
    } else {
        a[4][0] = '\0';
    }
    ngx_snprintf((u_char *) a[5], 47, "%M%Z", u->ttft);
    ngx_xprec_bucket(1, u->duration, a[6], 48);
    ngx_snprintf((u_char *) a[7], 47, "%M%Z", u->duration);
    ngx_snprintf((u_char *) a[8], 47, "%L%Z", ngx_xprec_now_ms());
    ngx_snprintf((u_char *) a[9], 47, "%T%Z", u->started);
    ngx_xprec_day(u->started, a[10]);

    args[0] = u->id;
    args[1] = a[0];
    args[2] = u->model;
    args[3] = a[1];
    args[4] = a[2];
    args[5] = a[3];
    args[6] = a[4];
    args[7] = a[5];
    args[8] = a[6];
    args[9] = a[7];
    /* a refused request (429, 503) is in no window: only what was served counts */
    args[10] = u->reserved ? "r" : u->unreserved ? "w" : "-";
    args[11] = a[8];
    args[12] = a[9];
    args[13] = a[10];

    (void) ngx_xprec_redis_eval(NGX_XPREC_SCRIPT_FINISH, K_COUNT, keys, 14, args,
                                ngx_xprec_finish_done, u);
}


static void
ngx_xprec_quota_record(ngx_xprec_usage_t *in)
{
    ngx_xprec_usage_t  *u;

    if (!ngx_xprec_qmcf->redis) {
        return;
    }

    u = malloc(sizeof(*u));
    if (u == NULL) {
        return;
    }

    *u = *in;
    u->next = NULL;
    ngx_xprec_finish_send(u);
}


static void
ngx_xprec_usage_from(ngx_xprec_ctx_t *ctx, ngx_uint_t status, ngx_xprec_usage_t *u)
{
    ngx_memzero(u, sizeof(*u));
    u->tenant = ctx->tenant->index;
    ngx_snprintf((u_char *) u->id, sizeof(u->id) - 1, "%s:%uL%Z", ngx_xprec_id_prefix, ctx->id);
    ngx_snprintf((u_char *) u->model, sizeof(u->model) - 1, "%V%Z", &ctx->model);
    u->status = status;
    u->prompt_tokens = ctx->prompt_tokens;
    u->completion_tokens = ctx->completion_tokens;
    u->ttft = ctx->t_first ? ngx_max(ctx->t_first - ctx->t_start, 1) : 0;
    u->duration = ngx_current_msec - ctx->t_start;
    u->reserved = ctx->reserved;
    u->unreserved = ctx->unreserved;
    u->started = ctx->created;
}


void
ngx_xprec_quota_end(ngx_xprec_ctx_t *ctx, ngx_uint_t status)
{
    ngx_xprec_usage_t  u;

    if (ctx->counted || ctx->tenant == NULL || !ctx->model_ok) {
        return;
    }

    ctx->counted = 1;
    ngx_xprec_usage_from(ctx, status, &u);
    ngx_xprec_quota_record(&u);
    ctx->reserved = 0;
}


/* The client left while the engine runs its request: the last event brings the counts. */
void
ngx_xprec_quota_orphan(ngx_xprec_ctx_t *ctx)
{
    ngx_xprec_orphan_t  *o;

    if (ctx->counted || ctx->tenant == NULL || !ctx->model_ok || !ngx_xprec_qmcf->redis) {
        return;
    }

    ctx->counted = 1;
    o = malloc(sizeof(*o));
    if (o == NULL) {
        return;
    }

    ngx_xprec_usage_from(ctx, NGX_HTTP_CLIENT_CLOSED_REQUEST, &o->u);
    o->node.key = (ngx_rbtree_key_t) ctx->id;
    ngx_rbtree_insert(&ngx_xprec_orphans, &o->node);
}


ngx_flag_t
ngx_xprec_quota_orphan_event(xp_event *ev)
{
    ngx_rbtree_node_t   *node = ngx_xprec_orphans.root, *sentinel = ngx_xprec_orphans.sentinel;
    ngx_xprec_orphan_t  *o;

    if (ev->type != XP_EV_DONE && ev->type != XP_EV_ERROR) {
        return 0;
    }

    while (node != sentinel && node->key != (ngx_rbtree_key_t) ev->id) {
        node = (ngx_rbtree_key_t) ev->id < node->key ? node->left : node->right;
    }

    if (node == sentinel) {
        return 0;
    }

    o = (ngx_xprec_orphan_t *) node;
    ngx_rbtree_delete(&ngx_xprec_orphans, node);
    o->u.completion_tokens = ev->completion_tokens;
    if (ev->prompt_tokens) {
        o->u.prompt_tokens = ev->prompt_tokens;
    }
    ngx_xprec_quota_record(&o->u);
    free(o);

    return 1;
}


/* ------------------------------------------------------------------ back online */

void
ngx_xprec_redis_on_up(void)
{
    ngx_xprec_quota_flush();
    ngx_xprec_fleet_sync();
}


/* Redis is back: send what it has not confirmed, in order. */
void
ngx_xprec_quota_flush(void)
{
    ngx_xprec_usage_t  *u, *next;

    u = ngx_xprec_pending;
    ngx_xprec_pending = NULL;
    ngx_xprec_pending_tail = &ngx_xprec_pending;
    ngx_xprec_npending = 0;

    for (/* void */; u; u = next) {
        next = u->next;
        u->next = NULL;
        ngx_xprec_finish_send(u); /* a failure puts it back on the list */
    }
}


/* Calls fn for every kept usage record (for /metrics: the fleet's counters plus what this
 * worker has not written yet). */
void
ngx_xprec_quota_pending(void (*fn)(void *arg, ngx_uint_t tenant, const char *model,
    ngx_uint_t status, int prompt, int completion, ngx_msec_t ttft, ngx_msec_t duration),
    void *arg)
{
    ngx_xprec_usage_t  *u;

    for (u = ngx_xprec_pending; u; u = u->next) {
        fn(arg, u->tenant, u->model, u->status, u->prompt_tokens, u->completion_tokens,
           u->ttft, u->duration);
    }
}


void
ngx_xprec_quota_exit(void)
{
    ngx_rbtree_node_t  *node;
    ngx_xprec_usage_t  *u, *next;

    for (u = ngx_xprec_pending; u; u = next) {
        next = u->next;
        free(u);
    }
    ngx_xprec_pending = NULL;
    ngx_xprec_pending_tail = &ngx_xprec_pending;

    while (ngx_xprec_orphans.root && ngx_xprec_orphans.root != ngx_xprec_orphans.sentinel) {
        node = ngx_xprec_orphans.root;
        ngx_rbtree_delete(&ngx_xprec_orphans, node);
        free(node);
    }
}
