/*
 * The worker's Redis connection: async hiredis (0.14) driven by nginx's event loop.
 *
 * hiredis's event hooks add and delete level-triggered read/write events on an nginx
 * connection wrapped around its socket. hiredis 0.14 has no timeouts of its own: every command
 * carries an nginx timer, and one that runs out drops the connection (a silent Redis cannot be
 * told from a slow one), which answers every pending command with a NULL reply. So does any
 * disconnect, and hiredis frees the context after; each command's private data is malloc'd and
 * lives until its callback, whatever became of the request that asked. A dropped connection is
 * made again with backoff; AUTH and SELECT go first on every new one. Scripts run by EVALSHA of
 * their SHA-1; a NOSCRIPT answer (a restarted Redis, SCRIPT FLUSH) sends the script itself.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"

#include <hiredis/async.h>
#include <openssl/evp.h>


extern const char ngx_xprec_lua_reserve[];
extern const char ngx_xprec_lua_finish[];
extern const char ngx_xprec_lua_touch[];
extern const char ngx_xprec_lua_residency[];

static const char *ngx_xprec_scripts[NGX_XPREC_SCRIPTS];
static char ngx_xprec_script_sha[NGX_XPREC_SCRIPTS][41];


struct ngx_xprec_redis_cmd_s {
    ngx_event_t             timer;
    ngx_xprec_redis_pt      handler;
    void                   *data;
    ngx_int_t               script;     /* for a NOSCRIPT retry; -1: a plain command */
    int                     argc;
    char                  **argv;       /* copies, for the retry */
    size_t                 *lens;
};


ngx_xprec_redis_t  ngx_xprec_redis;

static redisAsyncContext       *ngx_xprec_ac;
static ngx_connection_t        *ngx_xprec_rconn;
static ngx_event_t              ngx_xprec_reconnect_ev;
static ngx_event_t              ngx_xprec_connect_timer;
static ngx_msec_t               ngx_xprec_backoff;
static ngx_xprec_main_conf_t   *ngx_xprec_rmcf;
static ngx_log_t               *ngx_xprec_rlog;


static void ngx_xprec_redis_connect(void);
static void ngx_xprec_redis_drop(const char *why);


/* ------------------------------------------------------------------ event hooks */

static void
ngx_xprec_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    if (c->close || ngx_xprec_ac == NULL) {
        return;
    }

    redisAsyncHandleRead(ngx_xprec_ac);
}


static void
ngx_xprec_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;

    if (c->close || ngx_xprec_ac == NULL) {
        return;
    }

    redisAsyncHandleWrite(ngx_xprec_ac);
}


static void
ngx_xprec_redis_add_read(void *privdata)
{
    ngx_connection_t  *c = privdata;

    if (!c->read->active) {
        (void) ngx_add_event(c->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_xprec_redis_del_read(void *privdata)
{
    ngx_connection_t  *c = privdata;

    if (c->read->active) {
        (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }
}


static void
ngx_xprec_redis_add_write(void *privdata)
{
    ngx_connection_t  *c = privdata;

    if (!c->write->active) {
        (void) ngx_add_event(c->write, NGX_WRITE_EVENT, 0);
    }
}


static void
ngx_xprec_redis_del_write(void *privdata)
{
    ngx_connection_t  *c = privdata;

    if (c->write->active) {
        (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }
}


/* hiredis is freeing the context and will close the socket itself */
static void
ngx_xprec_redis_cleanup(void *privdata)
{
    ngx_connection_t  *c = privdata;

    ngx_xprec_fd_release(c);

    if (ngx_xprec_rconn == c) {
        ngx_xprec_rconn = NULL;
    }
}


/* ------------------------------------------------------------------ commands */

static void
ngx_xprec_cmd_free(ngx_xprec_redis_cmd_t *cmd)
{
    int  i;

    if (cmd->timer.timer_set) {
        ngx_del_timer(&cmd->timer);
    }

    for (i = 0; i < cmd->argc; i++) {
        free(cmd->argv[i]);
    }

    free(cmd->argv);
    free(cmd->lens);
    free(cmd);
}


static void ngx_xprec_redis_reply(redisAsyncContext *ac, void *r, void *privdata);


static ngx_int_t
ngx_xprec_cmd_send(ngx_xprec_redis_cmd_t *cmd)
{
    if (redisAsyncCommandArgv(ngx_xprec_ac, ngx_xprec_redis_reply, cmd, cmd->argc,
                              (const char **) cmd->argv, cmd->lens)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    ngx_add_timer(&cmd->timer, ngx_xprec_rmcf->redis_timeout);

    return NGX_OK;
}


static void
ngx_xprec_redis_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    ngx_xprec_redis_cmd_t  *cmd = privdata;
    redisReply             *reply = r;
    char                   *body;

    if (cmd->timer.timer_set) {
        ngx_del_timer(&cmd->timer);
    }

    if (reply == NULL) {
        ngx_xprec_redis.errors++;

    } else if (reply->type == REDIS_REPLY_ERROR && cmd->script >= 0
               && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0 && ngx_xprec_ac)
    {
        /* the server lost its script cache: send the script itself once */
        body = strdup(ngx_xprec_scripts[cmd->script]);
        if (body) {
            free(cmd->argv[0]);
            free(cmd->argv[1]);
            cmd->argv[0] = strdup("EVAL");
            cmd->lens[0] = 4;
            cmd->argv[1] = body;
            cmd->lens[1] = ngx_strlen(body);
            cmd->script = -1;
            if (cmd->argv[0] && ngx_xprec_cmd_send(cmd) == NGX_OK) {
                return;
            }
        }
        ngx_xprec_redis.errors++;
        reply = NULL;

    } else if (reply->type == REDIS_REPLY_ERROR) {
        ngx_xprec_redis.errors++;
        ngx_log_error(NGX_LOG_ERR, ngx_xprec_rlog, 0, "xprec: redis: %*s",
                      (size_t) reply->len, reply->str);
    }

    cmd->handler(cmd->data, reply);
    ngx_xprec_cmd_free(cmd);
}


/* A command that ran out of time: the connection cannot be trusted any more. */
static void
ngx_xprec_cmd_timeout(ngx_event_t *ev)
{
    ngx_log_error(NGX_LOG_ERR, ev->log, 0, "xprec: redis: no answer within %M ms",
                  ngx_xprec_rmcf->redis_timeout);

    ngx_xprec_redis_drop("timeout");
}


ngx_int_t
ngx_xprec_redis_command(int argc, const char **argv, const size_t *lens,
    ngx_int_t script, ngx_xprec_redis_pt handler, void *data)
{
    ngx_xprec_redis_cmd_t  *cmd;
    int                     i;

    if (ngx_xprec_ac == NULL || ngx_xprec_redis.state == NGX_XPREC_REDIS_DOWN) {
        ngx_xprec_redis.errors++;
        handler(data, NULL);
        return NGX_DECLINED;
    }

    cmd = calloc(1, sizeof(*cmd));
    if (cmd) {
        cmd->argv = calloc(argc, sizeof(char *));
        cmd->lens = calloc(argc, sizeof(size_t));
    }
    if (cmd == NULL || cmd->argv == NULL || cmd->lens == NULL) {
        if (cmd) {
            free(cmd->argv);
            free(cmd->lens);
            free(cmd);
        }
        handler(data, NULL);
        return NGX_ERROR;
    }

    cmd->argc = argc;
    for (i = 0; i < argc; i++) {
        cmd->lens[i] = lens ? lens[i] : ngx_strlen(argv[i]);
        cmd->argv[i] = malloc(cmd->lens[i] + 1);
        if (cmd->argv[i] == NULL) {
            cmd->argc = i;
            ngx_xprec_cmd_free(cmd);
            handler(data, NULL);
            return NGX_ERROR;
        }
        ngx_memcpy(cmd->argv[i], argv[i], cmd->lens[i]);
        cmd->argv[i][cmd->lens[i]] = '\0';
    }

    cmd->handler = handler;
    cmd->data = data;
    cmd->script = script;
    cmd->timer.handler = ngx_xprec_cmd_timeout;
    cmd->timer.data = cmd;
    cmd->timer.log = ngx_xprec_rlog;
    /* a Redis wait must not hold a graceful shutdown */
    cmd->timer.cancelable = 1;

    if (ngx_xprec_cmd_send(cmd) != NGX_OK) {
        ngx_xprec_cmd_free(cmd);
        handler(data, NULL);
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_xprec_redis_eval(ngx_uint_t script, int nkeys, const char **keys, int nargs,
    const char **args, ngx_xprec_redis_pt handler, void *data)
{
    const char  *argv[64];
    char         nk[16];
    int          argc = 0, i;

    if (3 + nkeys + nargs > 64) {
        handler(data, NULL);
        return NGX_ERROR;
    }

    ngx_snprintf((u_char *) nk, sizeof(nk) - 1, "%d%Z", nkeys);
    argv[argc++] = "EVALSHA";
    argv[argc++] = ngx_xprec_script_sha[script];
    argv[argc++] = nk;
    for (i = 0; i < nkeys; i++) {
        argv[argc++] = keys[i];
    }
    for (i = 0; i < nargs; i++) {
        argv[argc++] = args[i];
    }

    return ngx_xprec_redis_command(argc, argv, NULL, script, handler, data);
}


/* ------------------------------------------------------------------ connection */

static void
ngx_xprec_redis_schedule(void)
{
    if (ngx_xprec_worker.exiting || ngx_xprec_reconnect_ev.timer_set) {
        return;
    }

    ngx_xprec_backoff = ngx_xprec_backoff ? ngx_min(2 * ngx_xprec_backoff, 5000) : 100;
    ngx_add_timer(&ngx_xprec_reconnect_ev, ngx_xprec_backoff);
}


/* Drops the connection now: every pending command is answered with NULL. */
static void
ngx_xprec_redis_drop(const char *why)
{
    redisAsyncContext  *ac = ngx_xprec_ac;

    if (ngx_xprec_connect_timer.timer_set) {
        ngx_del_timer(&ngx_xprec_connect_timer);
    }

    if (ac == NULL) {
        return;
    }

    ngx_xprec_ac = NULL;
    ngx_xprec_redis.state = NGX_XPREC_REDIS_DOWN;
    /* hiredis answers the pending callbacks with NULL, calls our cleanup and closes */
    redisAsyncFree(ac);
    ngx_xprec_redis_schedule();
}


static void
ngx_xprec_redis_auth_done(void *data, redisReply *r)
{
    const char  *what = data;

    /* a connection that failed is reported by itself; a refused AUTH or SELECT is news */
    if (r && r->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_xprec_rlog, 0, "xprec: redis %s failed: %*s", what,
                      (size_t) r->len, r->str);
    }
}


static void
ngx_xprec_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_uint_t  level;

    if (ngx_xprec_connect_timer.timer_set) {
        ngx_del_timer(&ngx_xprec_connect_timer);
    }

    if (status != REDIS_OK) {
        /* hiredis frees the context after this */
        /* the first failure is an error; the retries of an outage say so quietly */
        level = ngx_xprec_redis.errors ? NGX_LOG_INFO : NGX_LOG_ERR;
        ngx_log_error(level, ngx_xprec_rlog, 0, "xprec: redis: cannot connect: %s",
                      ac->errstr);
        ngx_xprec_ac = NULL;
        ngx_xprec_redis.state = NGX_XPREC_REDIS_DOWN;
        ngx_xprec_redis.errors++;
        ngx_xprec_redis_schedule();
        return;
    }

    ngx_log_error(NGX_LOG_INFO, ngx_xprec_rlog, 0, "xprec: redis connected");
    ngx_xprec_redis.state = NGX_XPREC_REDIS_UP;
    ngx_xprec_backoff = 0;
    ngx_xprec_redis_on_up();
}


static void
ngx_xprec_redis_on_disconnect(const redisAsyncContext *ac, int status)
{
    if (ngx_xprec_ac == ac) {
        ngx_xprec_ac = NULL;
    }

    if (!ngx_xprec_worker.exiting) {
        ngx_log_error(NGX_LOG_ERR, ngx_xprec_rlog, 0, "xprec: redis disconnected%s%s",
                      ac->errstr[0] ? ": " : "", ac->errstr);
    }

    ngx_xprec_redis.state = NGX_XPREC_REDIS_DOWN;
    ngx_xprec_redis_schedule();
}


static void
ngx_xprec_connect_timeout(ngx_event_t *ev)
{
    ngx_log_error(NGX_LOG_ERR, ev->log, 0, "xprec: redis: not connected within %M ms",
                  ngx_xprec_rmcf->redis_timeout);
    ngx_xprec_redis_drop("connect timeout");
}


static void
ngx_xprec_redis_connect(void)
{
    ngx_xprec_main_conf_t  *mcf = ngx_xprec_rmcf;
    redisAsyncContext      *ac;
    ngx_connection_t       *c;
    char                    db[32];
    const char             *argv[2];

    ac = mcf->redis_host ? redisAsyncConnect((char *) mcf->redis_host, (int) mcf->redis_port)
                         : redisAsyncConnectUnix((char *) mcf->redis_unix);
    if (ac == NULL || ac->err) {
        ngx_log_error(NGX_LOG_ERR, ngx_xprec_rlog, 0, "xprec: redis: %s",
                      ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }
        ngx_xprec_redis_schedule();
        return;
    }

    c = ngx_get_connection(ac->c.fd, ngx_xprec_rlog);
    if (c == NULL) {
        redisAsyncFree(ac);
        ngx_xprec_redis_schedule();
        return;
    }

    c->data = ac;
    c->read->handler = ngx_xprec_redis_read_handler;
    c->write->handler = ngx_xprec_redis_write_handler;
    c->read->log = ngx_xprec_rlog;
    c->write->log = ngx_xprec_rlog;

    ac->ev.data = c;
    ac->ev.addRead = ngx_xprec_redis_add_read;
    ac->ev.delRead = ngx_xprec_redis_del_read;
    ac->ev.addWrite = ngx_xprec_redis_add_write;
    ac->ev.delWrite = ngx_xprec_redis_del_write;
    ac->ev.cleanup = ngx_xprec_redis_cleanup;

    redisAsyncSetConnectCallback(ac, ngx_xprec_redis_on_connect);
    redisAsyncSetDisconnectCallback(ac, ngx_xprec_redis_on_disconnect);

    ngx_xprec_ac = ac;
    ngx_xprec_rconn = c;
    ngx_xprec_redis.state = NGX_XPREC_REDIS_CONNECTING;
    /* the non-blocking connect completes on the first write event, with or without commands */
    ngx_xprec_redis_add_write(c);
    ngx_xprec_redis.reconnects++;
    ngx_add_timer(&ngx_xprec_connect_timer, mcf->redis_timeout);

    /* before anything else on this connection */
    if (mcf->redis_password.len) {
        argv[0] = "AUTH";
        argv[1] = (char *) mcf->redis_password.data;
        (void) ngx_xprec_redis_command(2, argv, NULL, -1, ngx_xprec_redis_auth_done,
                                       (void *) "AUTH");
    }

    if (mcf->redis_db) {
        ngx_snprintf((u_char *) db, sizeof(db) - 1, "%i%Z", mcf->redis_db);
        argv[0] = "SELECT";
        argv[1] = db;
        (void) ngx_xprec_redis_command(2, argv, NULL, -1, ngx_xprec_redis_auth_done,
                                       (void *) "SELECT");
    }
}


static void
ngx_xprec_reconnect_handler(ngx_event_t *ev)
{
    if (!ngx_xprec_worker.exiting && ngx_xprec_ac == NULL) {
        ngx_xprec_redis_connect();
    }
}


ngx_int_t
ngx_xprec_redis_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf)
{
    const char     *src[NGX_XPREC_SCRIPTS] = { ngx_xprec_lua_reserve, ngx_xprec_lua_finish,
                                               ngx_xprec_lua_touch,
                                               ngx_xprec_lua_residency };
    u_char          md[EVP_MAX_MD_SIZE];
    unsigned int    n, i, k;

    ngx_xprec_rmcf = mcf;
    ngx_xprec_rlog = cycle->log;
    ngx_memzero(&ngx_xprec_redis, sizeof(ngx_xprec_redis));

    for (i = 0; i < NGX_XPREC_SCRIPTS; i++) {
        ngx_xprec_scripts[i] = src[i];
        EVP_Digest(src[i], ngx_strlen(src[i]), md, &n, EVP_sha1(), NULL);
        for (k = 0; k < n && k < 20; k++) {
            ngx_snprintf((u_char *) &ngx_xprec_script_sha[i][2 * k], 3, "%02xd", md[k]);
        }
        ngx_xprec_script_sha[i][40] = '\0';
    }

    ngx_xprec_reconnect_ev.handler = ngx_xprec_reconnect_handler;
    ngx_xprec_reconnect_ev.log = cycle->log;
    ngx_xprec_reconnect_ev.data = &ngx_xprec_reconnect_ev;
    ngx_xprec_reconnect_ev.cancelable = 1;
    ngx_xprec_connect_timer.handler = ngx_xprec_connect_timeout;
    ngx_xprec_connect_timer.log = cycle->log;
    ngx_xprec_connect_timer.data = &ngx_xprec_connect_timer;
    ngx_xprec_connect_timer.cancelable = 1;

    if (mcf->redis) {
        /* the cached clock may be the master's from before it read the configuration: the
         * first command's timer must not start in the past */
        ngx_time_update();
        ngx_xprec_redis_connect();
    }

    return NGX_OK;
}


void
ngx_xprec_redis_exit(void)
{
    if (ngx_xprec_reconnect_ev.timer_set) {
        ngx_del_timer(&ngx_xprec_reconnect_ev);
    }

    if (ngx_xprec_connect_timer.timer_set) {
        ngx_del_timer(&ngx_xprec_connect_timer);
    }

    if (ngx_xprec_ac) {
        redisAsyncContext *ac = ngx_xprec_ac;

        ngx_xprec_ac = NULL;
        redisAsyncFree(ac);
    }
}
