/*
 * The xprec_metrics location: Prometheus text exposition. Usage counters and histograms are the
 * fleet's, read from Redis (every tenant's usage hash, written by finish.lua), plus what this
 * worker has not written yet; engine gauges, adapter residency and Redis client counters are
 * this gateway's, labelled with its node.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"


typedef struct {
    char               *field;
    int64_t             value;
} ngx_xprec_mfield_t;

/* a scrape waiting for Redis; outlives its request if the client goes */
typedef struct {
    ngx_http_request_t *r;
    ngx_http_cleanup_t *cln;        /* the request's cleanup, disarmed once answered */
    ngx_uint_t          waiting;
    ngx_uint_t          n_tenants;
    ngx_xprec_mfield_t **fields;     /* per tenant, malloc'd */
    size_t             *n_fields;
    size_t             *cap_fields;
    ngx_flag_t          redis_ok;
} ngx_xprec_scrape_t;


typedef struct {
    ngx_chain_t        *first, **last;
    ngx_pool_t         *pool;
    ngx_int_t           error;
} ngx_xprec_out_t;


static void
ngx_xprec_outf(ngx_xprec_out_t *o, const char *fmt, ...)
{
    u_char       buf[1024], *p;
    va_list      args;
    ngx_buf_t   *b;
    ngx_chain_t *cl;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    b = ngx_create_temp_buf(o->pool, p - buf);
    cl = ngx_alloc_chain_link(o->pool);
    if (b == NULL || cl == NULL) {
        o->error = 1;
        return;
    }

    b->last = ngx_cpymem(b->last, buf, p - buf);
    cl->buf = b;
    cl->next = NULL;
    *o->last = cl;
    o->last = &cl->next;
}


static void
ngx_xprec_scrape_add(ngx_xprec_scrape_t *s, ngx_uint_t t, const char *field, int64_t v)
{
    ngx_xprec_mfield_t  *f;
    size_t               i;

    for (i = 0; i < s->n_fields[t]; i++) {
        if (ngx_strcmp(s->fields[t][i].field, field) == 0) {
            s->fields[t][i].value += v;
            return;
        }
    }

    if (s->n_fields[t] == s->cap_fields[t]) {
        size_t cap = s->cap_fields[t] ? 2 * s->cap_fields[t] : 32;
        f = realloc(s->fields[t], cap * sizeof(*f));
        if (f == NULL) {
            return;
        }
        s->fields[t] = f;
        s->cap_fields[t] = cap;
    }

    f = &s->fields[t][s->n_fields[t]];
    f->field = strdup(field);
    if (f->field == NULL) {
        return;
    }
    f->value = v;
    s->n_fields[t]++;
}


static void
ngx_xprec_scrape_free(ngx_xprec_scrape_t *s)
{
    ngx_uint_t  t;
    size_t      i;

    for (t = 0; t < s->n_tenants; t++) {
        for (i = 0; i < s->n_fields[t]; i++) {
            free(s->fields[t][i].field);
        }
        free(s->fields[t]);
    }

    free(s->fields);
    free(s->n_fields);
    free(s->cap_fields);
    free(s);
}


/* the part of "kind|model|rest" after the kind: model (and rest) */
static ngx_flag_t
ngx_xprec_field_split(const char *field, const char *kind, ngx_str_t *model, ngx_str_t *rest)
{
    size_t       n = ngx_strlen(kind);
    const char  *p, *bar;

    if (ngx_strncmp(field, kind, n) != 0 || field[n] != '|') {
        return 0;
    }

    p = field + n + 1;
    bar = ngx_strchr(p, '|');
    model->data = (u_char *) p;
    model->len = bar ? (size_t) (bar - p) : ngx_strlen(p);
    rest->data = (u_char *) (bar ? bar + 1 : "");
    rest->len = bar ? ngx_strlen(bar + 1) : 0;

    return 1;
}


static void
ngx_xprec_render_histogram(ngx_xprec_out_t *o, ngx_xprec_scrape_t *s,
    ngx_xprec_main_conf_t *mcf, const char *name, const char *kind, const char *sum_kind,
    ngx_uint_t which, const char *help)
{
    ngx_xprec_tenant_t  *t = mcf->tenants.elts;
    ngx_uint_t           ti, n, k;
    size_t               i, j;
    const double        *le = ngx_xprec_hist_le(which, &n);
    ngx_str_t            model, rest, m2, r2;
    int64_t              cum, total, sum;
    char                 sumf[192];

    ngx_xprec_outf(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);

    for (ti = 0; ti < s->n_tenants; ti++) {
        for (i = 0; i < s->n_fields[ti]; i++) {
            if (!ngx_xprec_field_split(s->fields[ti][i].field, sum_kind, &model, &rest)) {
                continue;
            }
            /* one series per (tenant, model): found through its sum field */
            total = 0;
            for (j = 0; j < s->n_fields[ti]; j++) {
                if (ngx_xprec_field_split(s->fields[ti][j].field, kind, &m2, &r2)
                    && m2.len == model.len && ngx_strncmp(m2.data, model.data, m2.len) == 0)
                {
                    total += s->fields[ti][j].value;
                }
            }
            cum = 0;
            for (k = 0; k <= n; k++) {
                char  lebuf[32];

                if (k < n) {
                    snprintf(lebuf, sizeof(lebuf), "%g", le[k]);
                } else {
                    ngx_cpystrn((u_char *) lebuf, (u_char *) "+Inf", sizeof(lebuf));
                }
                for (j = 0; j < s->n_fields[ti]; j++) {
                    if (ngx_xprec_field_split(s->fields[ti][j].field, kind, &m2, &r2)
                        && m2.len == model.len
                        && ngx_strncmp(m2.data, model.data, m2.len) == 0
                        && r2.len == ngx_strlen(lebuf)
                        && ngx_strncmp(r2.data, lebuf, r2.len) == 0)
                    {
                        cum += s->fields[ti][j].value;
                    }
                }
                ngx_xprec_outf(o, "%s_bucket{tenant=\"%V\",model=\"%V\",le=\"%s\"} %L\n",
                               name, &t[ti].name, &model, lebuf, k < n ? cum : total);
            }
            ngx_snprintf((u_char *) sumf, sizeof(sumf) - 1, "%s%Z", s->fields[ti][i].field);
            sum = s->fields[ti][i].value;
            ngx_xprec_outf(o, "%s_sum{tenant=\"%V\",model=\"%V\"} %.3f\n", name, &t[ti].name,
                           &model, (double) sum / 1000.0);
            ngx_xprec_outf(o, "%s_count{tenant=\"%V\",model=\"%V\"} %L\n", name, &t[ti].name,
                           &model, total);
        }
    }
}


static ngx_int_t
ngx_xprec_render(ngx_xprec_scrape_t *s, ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t  *mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);
    ngx_xprec_tenant_t     *t = mcf->tenants.elts;
    ngx_xprec_out_t         o;
    ngx_uint_t              ti;
    size_t                  i, len = 0;
    ngx_str_t               model, rest;
    ngx_chain_t            *cl;
    xp_engine_stats         st;
    xp_adapter_info        *info;
    int                     n, k;
    ngx_int_t               rc;
    ngx_str_t              *node = &mcf->node;

    o.first = NULL;
    o.last = &o.first;
    o.pool = r->pool;
    o.error = 0;

    ngx_xprec_outf(&o, "# HELP xprec_requests_total Requests served, by tenant, model and "
                   "HTTP status (the fleet's, from Redis).\n"
                   "# TYPE xprec_requests_total counter\n");
    for (ti = 0; ti < s->n_tenants; ti++) {
        for (i = 0; i < s->n_fields[ti]; i++) {
            if (ngx_xprec_field_split(s->fields[ti][i].field, "requests", &model, &rest)) {
                ngx_xprec_outf(&o, "xprec_requests_total{tenant=\"%V\",model=\"%V\",code=\"%V\"}"
                               " %L\n", &t[ti].name, &model, &rest, s->fields[ti][i].value);
            }
        }
    }

    ngx_xprec_outf(&o, "# HELP xprec_tokens_total Tokens, by tenant, model and type (prompt "
                   "or completion).\n# TYPE xprec_tokens_total counter\n");
    for (ti = 0; ti < s->n_tenants; ti++) {
        for (i = 0; i < s->n_fields[ti]; i++) {
            const char *type = NULL;

            if (ngx_xprec_field_split(s->fields[ti][i].field, "prompt_tokens", &model, &rest)) {
                type = "prompt";
            } else if (ngx_xprec_field_split(s->fields[ti][i].field, "completion_tokens",
                                             &model, &rest))
            {
                type = "completion";
            }
            if (type) {
                ngx_xprec_outf(&o, "xprec_tokens_total{tenant=\"%V\",model=\"%V\",type=\"%s\"}"
                               " %L\n", &t[ti].name, &model, type, s->fields[ti][i].value);
            }
        }
    }

    ngx_xprec_render_histogram(&o, s, mcf, "xprec_time_to_first_token_seconds", "ttft",
                               "ttft_ms", 0, "Time from a request's arrival to its first token.");
    ngx_xprec_render_histogram(&o, s, mcf, "xprec_request_duration_seconds", "duration",
                               "duration_ms", 1, "Time from a request's arrival to its end.");

    /* this gateway */
    ngx_xprec_outf(&o, "# HELP xprec_redis_up 1 while this gateway's Redis connection is up.\n"
                   "# TYPE xprec_redis_up gauge\nxprec_redis_up{node=\"%V\"} %d\n", node,
                   ngx_xprec_redis.state == NGX_XPREC_REDIS_UP && s->redis_ok);
    ngx_xprec_outf(&o, "# HELP xprec_redis_errors_total Redis commands that failed or timed "
                   "out, and connections lost.\n# TYPE xprec_redis_errors_total counter\n"
                   "xprec_redis_errors_total{node=\"%V\"} %ui\n", node, ngx_xprec_redis.errors);
    ngx_xprec_outf(&o, "# HELP xprec_redis_connections_total Connections made to Redis "
                   "(reconnects after the first).\n"
                   "# TYPE xprec_redis_connections_total counter\n"
                   "xprec_redis_connections_total{node=\"%V\"} %ui\n", node,
                   ngx_xprec_redis.reconnects);

    if (ngx_xprec_worker.engine) {
        xp_engine_stats_get(ngx_xprec_worker.engine, &st);
        ngx_xprec_outf(&o, "# HELP xprec_engine_queue_depth Requests waiting to run.\n"
                       "# TYPE xprec_engine_queue_depth gauge\n"
                       "xprec_engine_queue_depth{node=\"%V\"} %d\n", node,
                       st.waiting + st.intake);
        ngx_xprec_outf(&o, "# HELP xprec_engine_running_sequences Sequences in the running "
                       "batch.\n# TYPE xprec_engine_running_sequences gauge\n"
                       "xprec_engine_running_sequences{node=\"%V\"} %d\n", node, st.running);
        ngx_xprec_outf(&o, "# HELP xprec_engine_kv_blocks_used KV cache blocks in use.\n"
                       "# TYPE xprec_engine_kv_blocks_used gauge\n"
                       "xprec_engine_kv_blocks_used{node=\"%V\"} %d\n", node,
                       st.kv_blocks_total - st.kv_blocks_free);
        ngx_xprec_outf(&o, "# HELP xprec_engine_kv_blocks KV cache blocks in all.\n"
                       "# TYPE xprec_engine_kv_blocks gauge\n"
                       "xprec_engine_kv_blocks{node=\"%V\"} %d\n", node, st.kv_blocks_total);
        ngx_xprec_outf(&o, "# HELP xprec_engine_preemptions_total Running sequences sent back "
                       "to wait for KV blocks.\n# TYPE xprec_engine_preemptions_total counter\n"
                       "xprec_engine_preemptions_total{node=\"%V\"} %uL\n", node,
                       st.preemptions);

        n = xp_engine_adapters(ngx_xprec_worker.engine, NULL, 0);
        info = calloc(n ? n : 1, sizeof(*info));
        n = info ? xp_engine_adapters(ngx_xprec_worker.engine, info, n) : 0;
        static const char *tiers[3] = { "disk", "loading", "resident" };
        static const struct {
            const char *name, *help;
        } counters[4] = {
            { "xprec_adapter_hits_total", "Requests that found their adapter resident." },
            { "xprec_adapter_misses_total", "Requests that had to wait for a load." },
            { "xprec_adapter_loads_total", "Adapter loads from disk." },
            { "xprec_adapter_evictions_total", "Adapters evicted to make room." },
        };
        ngx_xprec_outf(&o, "# HELP xprec_adapter_resident 1 for the tier an adapter is in on "
                       "this gateway.\n# TYPE xprec_adapter_resident gauge\n");
        for (k = 0; k < n; k++) {
            for (ngx_uint_t x = 0; x < 3; x++) {
                ngx_xprec_outf(&o, "xprec_adapter_resident{node=\"%V\",adapter=\"%s\","
                               "tier=\"%s\"} %d\n", node, info[k].name, tiers[x],
                               (ngx_uint_t) info[k].tier == x);
            }
        }
        for (ngx_uint_t c = 0; c < 4; c++) {
            ngx_xprec_outf(&o, "# HELP %s %s\n# TYPE %s counter\n", counters[c].name,
                           counters[c].help, counters[c].name);
            for (k = 0; k < n; k++) {
                uint64_t v = c == 0 ? info[k].hits : c == 1 ? info[k].misses
                             : c == 2 ? info[k].loads : info[k].evictions;
                ngx_xprec_outf(&o, "%s{node=\"%V\",adapter=\"%s\"} %uL\n", counters[c].name,
                               node, info[k].name, v);
            }
        }
        free(info);
    }

    if (o.error || o.first == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    for (cl = o.first; cl; cl = cl->next) {
        len += cl->buf->last - cl->buf->pos;
        if (cl->next == NULL) {
            cl->buf->last_buf = 1;
        }
    }

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4; charset=utf-8");
    r->headers_out.content_length_n = len;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, o.first);
}


static void
ngx_xprec_pending_usage(void *arg, ngx_uint_t tenant, const char *model, ngx_uint_t status,
    int prompt, int completion, ngx_msec_t ttft, ngx_msec_t duration)
{
    ngx_xprec_scrape_t  *s = arg;
    char                 f[192], b[32];
    ngx_uint_t           i, n;
    const double        *le;

    if (tenant >= s->n_tenants) {
        return;
    }

    ngx_snprintf((u_char *) f, sizeof(f) - 1, "requests|%s|%ui%Z", model, status);
    ngx_xprec_scrape_add(s, tenant, f, 1);
    ngx_snprintf((u_char *) f, sizeof(f) - 1, "prompt_tokens|%s%Z", model);
    ngx_xprec_scrape_add(s, tenant, f, prompt);
    ngx_snprintf((u_char *) f, sizeof(f) - 1, "completion_tokens|%s%Z", model);
    ngx_xprec_scrape_add(s, tenant, f, completion);

    for (ngx_uint_t which = 0; which < 2; which++) {
        ngx_msec_t  v = which ? duration : ttft;

        if (which == 0 && ttft == 0) {
            continue;
        }
        le = ngx_xprec_hist_le(which, &n);
        for (i = 0; i < n && (double) v / 1000.0 > le[i]; i++) { /* void */ }
        if (i < n) {
            snprintf(b, sizeof(b), "%g", le[i]);
        } else {
            ngx_cpystrn((u_char *) b, (u_char *) "+Inf", sizeof(b));
        }
        ngx_snprintf((u_char *) f, sizeof(f) - 1, "%s|%s|%s%Z", which ? "duration" : "ttft",
                     model, b);
        ngx_xprec_scrape_add(s, tenant, f, 1);
        ngx_snprintf((u_char *) f, sizeof(f) - 1, "%s|%s%Z",
                     which ? "duration_ms" : "ttft_ms", model);
        ngx_xprec_scrape_add(s, tenant, f, (int64_t) v);
    }
}


static void
ngx_xprec_scrape_finish(ngx_xprec_scrape_t *s)
{
    ngx_http_request_t  *r = s->r;

    if (r == NULL || ngx_xprec_worker.exiting) {
        ngx_xprec_scrape_free(s);
        return;
    }

    s->cln->handler = NULL;
    ngx_xprec_quota_pending(ngx_xprec_pending_usage, s);
    ngx_http_finalize_request(r, ngx_xprec_render(s, r));
    ngx_xprec_scrape_free(s);
}


typedef struct {
    ngx_xprec_scrape_t  *s;
    ngx_uint_t           tenant;
} ngx_xprec_scrape_part_t;


static void
ngx_xprec_scrape_reply(void *data, redisReply *r)
{
    ngx_xprec_scrape_part_t  *part = data;
    ngx_xprec_scrape_t       *s = part->s;
    size_t                    i;

    if (r && r->type == REDIS_REPLY_ARRAY) {
        for (i = 0; i + 1 < r->elements; i += 2) {
            if (r->element[i]->type == REDIS_REPLY_STRING
                && r->element[i + 1]->type == REDIS_REPLY_STRING)
            {
                ngx_xprec_scrape_add(s, part->tenant, r->element[i]->str,
                                     ngx_atoof((u_char *) r->element[i + 1]->str,
                                               r->element[i + 1]->len));
            }
        }
    } else {
        s->redis_ok = 0;
    }

    free(part);

    if (--s->waiting == 0) {
        ngx_xprec_scrape_finish(s);
    }
}


static void
ngx_xprec_scrape_cleanup(void *data)
{
    ngx_xprec_scrape_t  *s = data;

    /* the client left before Redis answered: the answers free the scrape */
    s->r = NULL;
}


ngx_int_t
ngx_xprec_metrics_handler(ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t    *mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);
    ngx_xprec_scrape_t       *s;
    ngx_xprec_scrape_part_t  *part;
    ngx_http_cleanup_t       *cln;
    ngx_uint_t                t, n = mcf->tenants.nelts;
    const char               *argv[2];

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    s = calloc(1, sizeof(*s));
    if (s) {
        s->fields = calloc(n + 1, sizeof(*s->fields));
        s->n_fields = calloc(n + 1, sizeof(size_t));
        s->cap_fields = calloc(n + 1, sizeof(size_t));
    }
    cln = ngx_http_cleanup_add(r, 0);
    if (s == NULL || s->fields == NULL || s->n_fields == NULL || s->cap_fields == NULL
        || cln == NULL)
    {
        if (s) {
            ngx_xprec_scrape_free(s);
        }
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    s->r = r;
    s->cln = cln;
    s->n_tenants = n;
    s->redis_ok = mcf->redis;
    cln->handler = ngx_xprec_scrape_cleanup;
    cln->data = s;

    if (!mcf->redis || n == 0) {
        ngx_int_t rc = ngx_xprec_render(s, r);

        cln->handler = NULL;
        ngx_xprec_scrape_free(s);
        return rc;
    }

    /* every tenant's usage hash; the last answer renders */
    r->main->count++;
    r->read_event_handler = ngx_http_test_reading;
    s->waiting = n + 1; /* one held until every command is sent */
    for (t = 0; t < n; t++) {
        part = malloc(sizeof(*part));
        if (part == NULL) {
            s->redis_ok = 0;
            s->waiting--;
            continue;
        }
        part->s = s;
        part->tenant = t;
        argv[0] = "HGETALL";
        argv[1] = ngx_xprec_tenant_key(t, NGX_XPREC_KEY_USAGE);
        (void) ngx_xprec_redis_command(2, argv, NULL, -1, ngx_xprec_scrape_reply, part);
    }

    if (--s->waiting == 0) {
        ngx_xprec_scrape_finish(s);
    }

    return NGX_DONE;
}
