/*
 * The Redis client the module's fleet features share (ngx_xprec_redis.c): one async
 * connection per worker, commands with timeouts, scripts by EVALSHA.
 */

#ifndef NGX_XPREC_REDIS_H_INCLUDED_
#define NGX_XPREC_REDIS_H_INCLUDED_

#include <hiredis/hiredis.h>


enum {
    NGX_XPREC_SCRIPT_RESERVE = 0,
    NGX_XPREC_SCRIPT_FINISH,
    NGX_XPREC_SCRIPT_TOUCH,
    NGX_XPREC_SCRIPT_RESIDENCY,
    NGX_XPREC_SCRIPTS
};


enum {
    NGX_XPREC_REDIS_DOWN = 0,
    NGX_XPREC_REDIS_CONNECTING,
    NGX_XPREC_REDIS_UP
};


typedef struct {
    ngx_uint_t      state;
    ngx_uint_t      errors;      /* failed or timed-out commands, lost connections */
    ngx_uint_t      reconnects;  /* connections made */
} ngx_xprec_redis_t;

extern ngx_xprec_redis_t  ngx_xprec_redis;


typedef struct ngx_xprec_redis_cmd_s  ngx_xprec_redis_cmd_t;

/* The answer to a command: reply is NULL when there is none (not connected, timed out, the
 * connection dropped, the worker exiting) and may be an error reply. data is the caller's,
 * which the handler owns again. */
typedef void (*ngx_xprec_redis_pt)(void *data, redisReply *reply);

ngx_int_t ngx_xprec_redis_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf);
void ngx_xprec_redis_exit(void);

/* Sends a command (argv copied); handler is called exactly once, possibly before this
 * returns when Redis is down. lens NULL: NUL-terminated strings. script: -1. */
ngx_int_t ngx_xprec_redis_command(int argc, const char **argv, const size_t *lens,
    ngx_int_t script, ngx_xprec_redis_pt handler, void *data);
/* EVALSHA of one of the scripts, EVAL on NOSCRIPT. */
ngx_int_t ngx_xprec_redis_eval(ngx_uint_t script, int nkeys, const char **keys, int nargs,
    const char **args, ngx_xprec_redis_pt handler, void *data);

/* Called by the client once a new connection is up: write back what was kept locally, sync the
 * registry (ngx_xprec_quota.c). */
void ngx_xprec_redis_on_up(void);

/* ngx_xprec_quota.c, for /metrics */
const char *ngx_xprec_tenant_key(ngx_uint_t tenant, ngx_uint_t which);
const double *ngx_xprec_hist_le(ngx_uint_t which, ngx_uint_t *n);
void ngx_xprec_quota_pending(void (*fn)(void *arg, ngx_uint_t tenant, const char *model,
    ngx_uint_t status, int prompt, int completion, ngx_msec_t ttft, ngx_msec_t duration),
    void *arg);
#define NGX_XPREC_KEY_USAGE  5

/* ngx_xprec_fleet.c: the adapter registry and residency, shared by every gateway */
#define NGX_XPREC_REGISTRY   "xprec:{fleet}:adapters"
#define NGX_XPREC_RESIDENCY  "xprec:{fleet}:residency"
#define NGX_XPREC_NODES      "xprec:{fleet}:nodes"
void ngx_xprec_fleet_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf);
void ngx_xprec_fleet_exit(void);
void ngx_xprec_fleet_sync(void);
void ngx_xprec_fleet_loaded(ngx_xprec_runtime_adapter_t *a);
void ngx_xprec_fleet_unloaded(const char *name);
const char *ngx_xprec_fleet_node(void);
void ngx_xprec_quota_flush(void);

#endif /* NGX_XPREC_REDIS_H_INCLUDED_ */
