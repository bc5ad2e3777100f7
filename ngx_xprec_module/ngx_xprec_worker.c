/*
 * The engine in a worker process.
 *
 * init_process starts a thread that (for an exclusive engine: once it holds the lock file the
 * previous worker's engine releases when destroyed, so a reload never has two bases on one
 * GPU) creates the engine and registers nginx.conf's adapters, then says so through an
 * eventfd wrapped as a connection. Requests that arrive meanwhile wait (xprec_engine's
 * start_wait). The engine's events come back through its queue's eventfd, also wrapped as a
 * connection, and go to their request by id through a red-black tree. exit_process destroys
 * the engine and closes both connections.
 *
 * The engine's threads must never take the worker's signals (nginx notices a signal when its
 * epoll_wait is interrupted), so they are started with every signal blocked.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/file.h>


ngx_xprec_worker_t  ngx_xprec_worker;

static ngx_connection_t  *ngx_xprec_qconn;     /* the engine's event queue */
static ngx_connection_t  *ngx_xprec_sconn;     /* the starter thread's "done" */
static pthread_t          ngx_xprec_starter;
static ngx_uint_t         ngx_xprec_starter_running;
static volatile int       ngx_xprec_starter_quit;
static int                ngx_xprec_start_fd = -1;
static int                ngx_xprec_lock_fd = -1;
static xp_engine         *ngx_xprec_started;   /* the starter's result */
static ngx_xprec_main_conf_t  *ngx_xprec_mcf;


static void ngx_xprec_queue_handler(ngx_event_t *ev);
static void ngx_xprec_started_handler(ngx_event_t *ev);
static void ngx_xprec_dummy_handler(ngx_event_t *ev);


static void *
ngx_xprec_start_engine(void *arg)
{
    ngx_xprec_main_conf_t  *mcf = arg;

    ngx_xprec_adapter_conf_t  *a;
    xp_engine_opts             o;
    xp_engine                 *e = NULL;
    ngx_uint_t                 i;
    uint64_t                   one = 1;
    char                      *err = ngx_xprec_worker.error;
    size_t                     errlen = sizeof(ngx_xprec_worker.error);

    if (mcf->exclusive) {
        ngx_xprec_lock_fd = open((char *) mcf->lock_file.data,
                                 O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (ngx_xprec_lock_fd < 0) {
            snprintf(err, errlen, "lock file %s: %s", mcf->lock_file.data,
                     strerror(errno));
            goto done;
        }

        /* the old worker's engine holds it until it is destroyed */
        while (flock(ngx_xprec_lock_fd, LOCK_EX | LOCK_NB) != 0) {
            if (ngx_xprec_starter_quit) {
                snprintf(err, errlen, "stopped while waiting for %s",
                         mcf->lock_file.data);
                goto done;
            }
            usleep(20000);
        }
    }

    ngx_memzero(&o, sizeof(o));
    o.threads = (int) mcf->threads;
    o.kv_bytes = mcf->kv_cache;
    o.max_batch = (int) mcf->max_batch;
    o.max_adapters = (int) mcf->max_adapters;
    o.prefill_chunk = (int) mcf->prefill_chunk;
    o.backend = (const char *) mcf->backend.data;
    o.device = (int) mcf->device;

    e = xp_engine_create((const char *) mcf->model_dir.data, &o);
    if (e == NULL) {
        snprintf(err, errlen, "engine on %s: %s", mcf->model_dir.data,
                 xp_last_error());
        goto done;
    }

    /* pinned ones first, so they find their slots */
    a = mcf->adapters.elts;
    for (i = 0; i < 2 * mcf->adapters.nelts; i++) {
        ngx_xprec_adapter_conf_t *ad = &a[i % mcf->adapters.nelts];
        char                      name[128];

        if ((i < mcf->adapters.nelts) != (ad->pinned != 0)) {
            continue;
        }

        snprintf(name, sizeof(name), "%.*s", (int) ad->name.len, ad->name.data);
        if (xp_engine_add_adapter(e, name, (const char *) ad->dir.data,
                                  ad->pinned ? XP_ADAPTER_PINNED : 0)
            < 0)
        {
            snprintf(err, errlen, "adapter \"%s\": %s", name, xp_last_error());
            xp_engine_destroy(e);
            e = NULL;
            goto done;
        }
    }

done:

    ngx_xprec_started = e;
    if (write(ngx_xprec_start_fd, &one, sizeof(one)) < 0) {
        /* the counter cannot overflow from one write */
    }

    return NULL;
}


/* Wraps an eventfd as a connection whose read events call handler. */
static ngx_connection_t *
ngx_xprec_fd_connection(ngx_cycle_t *cycle, int fd, ngx_event_handler_pt handler)
{
    ngx_connection_t  *c;

    c = ngx_get_connection(fd, cycle->log);
    if (c == NULL) {
        return NULL;
    }

    c->read->handler = handler;
    c->read->log = cycle->log;
    c->write->handler = ngx_xprec_dummy_handler;
    c->write->log = cycle->log;
    c->data = NULL;

    /* level-triggered: the eventfd stays readable while events wait */
    if (ngx_add_event(c->read, NGX_READ_EVENT, 0) != NGX_OK) {
        ngx_free_connection(c);
        return NULL;
    }

    return c;
}


/* Takes a connection wrapped around someone else's fd out of the event loop and gives it back
 * without closing the fd (its owner closes it): the engine's eventfds, hiredis's socket. */
void
ngx_xprec_fd_release(ngx_connection_t *c)
{
    if (c->read->active) {
        ngx_del_event(c->read, NGX_READ_EVENT, 0);
    }

    if (c->write->active) {
        ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;
}


ngx_int_t
ngx_xprec_init_worker(ngx_cycle_t *cycle)
{
    ngx_xprec_main_conf_t  *mcf;
    sigset_t                all, old;
    int                     rc;

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_xprec_module);
    if (mcf == NULL || !mcf->enabled) {
        return NGX_OK;
    }

    ngx_xprec_mcf = mcf;
    ngx_memzero(&ngx_xprec_worker, sizeof(ngx_xprec_worker));
    ngx_rbtree_init(&ngx_xprec_worker.requests, &ngx_xprec_worker.sentinel,
                    ngx_rbtree_insert_value);
    ngx_queue_init(&ngx_xprec_worker.waiting);

    ngx_xprec_worker.in_flight = ngx_pcalloc(cycle->pool,
                                             (mcf->tenants.nelts + 1)
                                             * sizeof(ngx_uint_t));
    if (ngx_xprec_worker.in_flight == NULL) {
        return NGX_ERROR;
    }

    ngx_xprec_worker.queue = xp_queue_create();
    if (ngx_xprec_worker.queue == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0, "xprec: %s", xp_last_error());
        return NGX_ERROR;
    }

    ngx_xprec_qconn = ngx_xprec_fd_connection(cycle,
                                              xp_queue_fd(ngx_xprec_worker.queue),
                                              ngx_xprec_queue_handler);

    ngx_xprec_start_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ngx_xprec_qconn == NULL || ngx_xprec_start_fd < 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "xprec: cannot set up the engine's event connections");
        return NGX_ERROR;
    }

    ngx_xprec_sconn = ngx_xprec_fd_connection(cycle, ngx_xprec_start_fd,
                                              ngx_xprec_started_handler);
    if (ngx_xprec_sconn == NULL) {
        return NGX_ERROR;
    }

    /* the engine's threads inherit this mask: no signal ever lands on them */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&ngx_xprec_starter, NULL, ngx_xprec_start_engine, mcf);
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (rc != 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, rc,
                      "xprec: cannot start the engine's starter thread");
        return NGX_ERROR;
    }

    ngx_xprec_starter_running = 1;
    ngx_xprec_worker.starting = 1;

    ngx_xprec_fleet_init(cycle, mcf);

    if (ngx_xprec_quota_init(cycle, mcf) != NGX_OK
        || ngx_xprec_redis_init(cycle, mcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_xprec_started_handler(ngx_event_t *ev)
{
    ngx_queue_t      *q;
    ngx_xprec_ctx_t  *ctx;
    uint64_t          v;

    if (read(ngx_xprec_start_fd, &v, sizeof(v)) != sizeof(v)) {
        return;
    }

    pthread_join(ngx_xprec_starter, NULL);
    ngx_xprec_starter_running = 0;
    ngx_xprec_worker.starting = 0;
    ngx_xprec_worker.engine = ngx_xprec_started;

    if (ngx_xprec_worker.engine == NULL) {
        ngx_xprec_worker.failed = 1;
        ngx_log_error(NGX_LOG_ERR, ev->log, 0, "xprec: %s", ngx_xprec_worker.error);

    } else {
        ngx_log_error(NGX_LOG_INFO, ev->log, 0,
                      "xprec: engine ready on %s, %s backend, context %d",
                      ngx_xprec_mcf->model_dir.data,
                      xp_engine_backend(ngx_xprec_worker.engine),
                      xp_engine_context(ngx_xprec_worker.engine));
        /* the fleet's runtime adapters, from the registry */
        ngx_xprec_fleet_sync();
    }

    /* the requests that waited */
    while (!ngx_queue_empty(&ngx_xprec_worker.waiting)) {
        q = ngx_queue_head(&ngx_xprec_worker.waiting);
        ngx_queue_remove(q);
        ctx = ngx_queue_data(q, ngx_xprec_ctx_t, wait);
        ctx->waiting = 0;

        if (ngx_xprec_worker.engine) {
            ngx_xprec_submit(ctx);
        } else {
            ngx_xprec_start_failed(ctx);
        }
    }
}


ngx_int_t
ngx_xprec_engine_ready(void)
{
    return ngx_xprec_worker.engine != NULL;
}


void
ngx_xprec_track(ngx_xprec_ctx_t *ctx)
{
    ctx->node.key = (ngx_rbtree_key_t) ctx->id;
    ngx_rbtree_insert(&ngx_xprec_worker.requests, &ctx->node);
    ctx->in_tree = 1;
}


void
ngx_xprec_untrack(ngx_xprec_ctx_t *ctx)
{
    if (ctx->in_tree) {
        ngx_rbtree_delete(&ngx_xprec_worker.requests, &ctx->node);
        ctx->in_tree = 0;
    }
}


static ngx_xprec_ctx_t *
ngx_xprec_lookup(uint64_t id)
{
    ngx_rbtree_node_t  *node, *sentinel;

    node = ngx_xprec_worker.requests.root;
    sentinel = ngx_xprec_worker.requests.sentinel;

    while (node != sentinel) {
        if ((ngx_rbtree_key_t) id < node->key) {
            node = node->left;
        } else if ((ngx_rbtree_key_t) id > node->key) {
            node = node->right;
        } else {
            return (ngx_xprec_ctx_t *) node;
        }
    }

    return NULL;
}


static void
ngx_xprec_queue_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c = ev->data;
    ngx_xprec_ctx_t   *ctx;
    xp_event           e;
    ngx_uint_t         n;

    if (c->close) {
        /* worker_shutdown_timeout closing everything: exit_process handles us */
        return;
    }

    /* a bounded batch per wakeup keeps other connections served; what is left keeps the fd
     * readable, so the loop comes back */
    for (n = 0; n < 4096 && xp_queue_pop(ngx_xprec_worker.queue, &e); n++) {
        ctx = ngx_xprec_lookup(e.id);

        /* a runtime adapter's registration ends whether or not its client waits */
        (void) ngx_xprec_admin_ticket(&e);

        if (ctx == NULL) {
            /* a request whose client left: its usage, now that the engine counted it */
            (void) ngx_xprec_quota_orphan_event(&e);
        } else {
            if (ctx->kind == NGX_XPREC_ADMIN_LOAD) {
                ngx_xprec_admin_on_event(ctx, &e);
            } else {
                ngx_xprec_on_event(ctx, &e);
            }
        }

        xp_event_clear(&e);
    }
}


static void
ngx_xprec_dummy_handler(ngx_event_t *ev)
{
}


/* Past worker_shutdown_timeout nginx closes every connection: in-flight requests end a little
 * before that, each with an error a client can read (an SSE error event in a stream). */
ngx_flag_t
ngx_xprec_shutdown_due(ngx_cycle_t *cycle)
{
    ngx_core_conf_t  *ccf;
    ngx_msec_t        margin;

    if (!ngx_exiting && !ngx_terminate) {
        return 0;
    }

    if (ngx_terminate) {
        return 1;
    }

    if (ngx_xprec_worker.exit_start == 0) {
        ngx_xprec_worker.exit_start = ngx_current_msec ? ngx_current_msec : 1;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);
    if (ccf->shutdown_timeout == 0 || ccf->shutdown_timeout == NGX_CONF_UNSET_MSEC) {
        return 0;
    }

    margin = ccf->shutdown_timeout > 2 * NGX_XPREC_TICK ? 2 * NGX_XPREC_TICK
                                                      : ccf->shutdown_timeout / 2;

    return ngx_current_msec - ngx_xprec_worker.exit_start
           >= ccf->shutdown_timeout - margin;
}


void
ngx_xprec_exit_worker(ngx_cycle_t *cycle)
{
    ngx_xprec_runtime_adapter_t  *a, *next;

    if (ngx_xprec_mcf == NULL) {
        return;
    }

    ngx_xprec_worker.exiting = 1;
    ngx_xprec_fleet_exit();
    /* pending commands are answered NULL; their handlers only free what they own now */
    ngx_xprec_redis_exit();
    ngx_xprec_quota_exit();

    if (ngx_xprec_starter_running) {
        ngx_xprec_starter_quit = 1;
        pthread_join(ngx_xprec_starter, NULL);
        ngx_xprec_starter_running = 0;
        if (ngx_xprec_worker.engine == NULL) {
            ngx_xprec_worker.engine = ngx_xprec_started;
        }
    }

    /* cancels what is still in flight; the lock goes only once the base is gone */
    xp_engine_destroy(ngx_xprec_worker.engine);
    ngx_xprec_worker.engine = NULL;

    if (ngx_xprec_lock_fd >= 0) {
        close(ngx_xprec_lock_fd);
        ngx_xprec_lock_fd = -1;
    }

    if (ngx_xprec_qconn) {
        ngx_xprec_fd_release(ngx_xprec_qconn);
        ngx_xprec_qconn = NULL;
    }

    if (ngx_xprec_sconn) {
        ngx_xprec_fd_release(ngx_xprec_sconn);
        ngx_xprec_sconn = NULL;
    }

    if (ngx_xprec_start_fd >= 0) {
        close(ngx_xprec_start_fd);
        ngx_xprec_start_fd = -1;
    }

    xp_queue_destroy(ngx_xprec_worker.queue);
    ngx_xprec_worker.queue = NULL;

    for (a = ngx_xprec_worker.runtime; a; a = next) {
        next = a->next;
        ngx_xprec_runtime_free(a);
    }
    ngx_xprec_worker.runtime = NULL;
}
