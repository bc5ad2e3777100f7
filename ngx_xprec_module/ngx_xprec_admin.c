/*
 * The xprec_admin location, for the key of xprec_admin_key_sha256 (and whatever allow/deny
 * the operator puts around it):
 *   GET  .../status                  the engine, its adapters and the tenants' in-flight
 *                                    requests, as JSON
 *   POST .../load_lora_adapter       {"lora_name", "lora_path", "tenants": [...] | "*"}
 *   POST .../unload_lora_adapter     {"lora_name"}
 * with vLLM's bodies and answers. A load is validated and read on the engine's loader thread;
 * the answer comes when it is done. Adapters loaded here are this worker's until the Redis
 * registry shares them.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"


static void ngx_xprec_admin_body(ngx_http_request_t *r);


ngx_xprec_runtime_adapter_t *
ngx_xprec_runtime_find(const char *name, size_t len)
{
    ngx_xprec_runtime_adapter_t  *a;

    for (a = ngx_xprec_worker.runtime; a; a = a->next) {
        if (ngx_strlen(a->name) == len && ngx_strncmp(a->name, name, len) == 0) {
            return a;
        }
    }

    return NULL;
}


void
ngx_xprec_runtime_free(ngx_xprec_runtime_adapter_t *a)
{
    ngx_uint_t  i;

    for (i = 0; i < a->n_tenants; i++) {
        free(a->tenants[i]);
    }

    free(a->tenants);
    free(a->name);
    free(a->dir);
    free(a);
}


static void
ngx_xprec_runtime_unlink(ngx_xprec_runtime_adapter_t *a)
{
    ngx_xprec_runtime_adapter_t  **p;

    for (p = &ngx_xprec_worker.runtime; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            return;
        }
    }
}


ngx_flag_t
ngx_xprec_admin_ticket(xp_event *ev)
{
    ngx_xprec_runtime_adapter_t  *a;

    for (a = ngx_xprec_worker.runtime; a; a = a->next) {
        if (a->loading && a->ticket == ev->id) {
            break;
        }
    }

    if (a == NULL) {
        return 0;
    }

    if (ev->type == XP_EV_DONE) {
        a->loading = 0;
        if (!a->shared) {
            /* loaded here through the admin API: every gateway of the fleet serves it */
            ngx_xprec_fleet_loaded(a);
        }

    } else if (a->shared) {
        /* a registry entry this node cannot load: kept (not served) so it is not retried
         * every few seconds */
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "xprec: registry adapter \"%s\" does not load here: %s", a->name,
                      ev->error);
        a->loading = 0;
        a->broken = 1;

    } else {
        ngx_xprec_runtime_unlink(a);
        ngx_xprec_runtime_free(a);
    }

    return 1;
}


static const char *
ngx_xprec_tier_name(xp_adapter_tier t)
{
    return t == XP_TIER_RESIDENT ? "resident" : t == XP_TIER_LOADING ? "loading" : "disk";
}


/* ------------------------------------------------------------------ the fleet, from Redis */

/* a status waiting for Redis; outlives its request if the client goes */
typedef struct {
    ngx_http_request_t  *r;
    ngx_http_cleanup_t  *cln;
    cJSON               *root;
    cJSON               *fleet;
    ngx_uint_t           waiting;
} ngx_xprec_fleet_status_t;


static void
ngx_xprec_fleet_status_cleanup(void *data)
{
    ngx_xprec_fleet_status_t  *fs = data;

    fs->r = NULL;
}


static void
ngx_xprec_fleet_status_done(ngx_xprec_fleet_status_t *fs)
{
    if (--fs->waiting) {
        return;
    }

    if (fs->r && !ngx_xprec_worker.exiting) {
        fs->cln->handler = NULL;
        ngx_http_finalize_request(fs->r, ngx_xprec_send_json(fs->r, NGX_HTTP_OK, fs->root));
    } else {
        cJSON_Delete(fs->root);
    }

    free(fs);
}


static void
ngx_xprec_fleet_nodes(void *data, redisReply *r)
{
    ngx_xprec_fleet_status_t  *fs = data;
    cJSON                     *nodes;
    size_t                     i;

    nodes = cJSON_AddArrayToObject(fs->fleet, "nodes");
    for (i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        if (r->element[i]->type == REDIS_REPLY_STRING) {
            cJSON_AddItemToArray(nodes, cJSON_CreateString(r->element[i]->str));
        }
    }
    if (r == NULL) {
        cJSON_AddStringToObject(fs->fleet, "error", "Redis did not answer");
    }

    ngx_xprec_fleet_status_done(fs);
}


static void
ngx_xprec_fleet_residency(void *data, redisReply *r)
{
    ngx_xprec_fleet_status_t  *fs = data;
    cJSON                     *list, *e;
    size_t                     i;
    char                       node[160], val[128], *bar, *f[7];
    int                        k;

    list = cJSON_AddArrayToObject(fs->fleet, "residency");
    for (i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        if (r->element[i]->type != REDIS_REPLY_STRING
            || r->element[i + 1]->type != REDIS_REPLY_STRING)
        {
            continue;
        }
        ngx_cpystrn((u_char *) node, (u_char *) r->element[i]->str, sizeof(node));
        bar = strrchr(node, '|');
        if (bar == NULL) {
            continue;
        }
        *bar = '\0';
        ngx_cpystrn((u_char *) val, (u_char *) r->element[i + 1]->str, sizeof(val));
        f[0] = val;
        for (k = 1; k < 7; k++) {
            f[k] = f[k - 1] ? strchr(f[k - 1], '|') : NULL;
            if (f[k]) {
                *f[k]++ = '\0';
            }
        }
        e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "node", node);
        cJSON_AddStringToObject(e, "adapter", bar + 1);
        cJSON_AddStringToObject(e, "tier", f[0]);
        cJSON_AddBoolToObject(e, "pinned", f[1] && f[1][0] == '1');
        cJSON_AddNumberToObject(e, "loads", f[2] ? atof(f[2]) : 0);
        cJSON_AddNumberToObject(e, "hits", f[3] ? atof(f[3]) : 0);
        cJSON_AddNumberToObject(e, "misses", f[4] ? atof(f[4]) : 0);
        cJSON_AddNumberToObject(e, "load_seconds", f[5] ? atof(f[5]) / 1000 : 0);
        cJSON_AddNumberToObject(e, "idle_seconds", f[6] ? atof(f[6]) : 0);
        cJSON_AddItemToArray(list, e);
    }

    ngx_xprec_fleet_status_done(fs);
}


/* The status with the fleet's residency: which node holds which adapter in which tier. */
static ngx_int_t
ngx_xprec_admin_fleet(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf, cJSON *root)
{
    ngx_xprec_fleet_status_t  *fs;
    const char                *argv[4];
    char                       now[32];
    ngx_time_t                *tp = ngx_timeofday();

    if (!mcf->redis) {
        return ngx_xprec_send_json(r, NGX_HTTP_OK, root);
    }

    fs = calloc(1, sizeof(*fs));
    if (fs == NULL || (fs->cln = ngx_http_cleanup_add(r, 0)) == NULL) {
        free(fs);
        return ngx_xprec_send_json(r, NGX_HTTP_OK, root);
    }

    fs->r = r;
    fs->root = root;
    fs->fleet = cJSON_AddObjectToObject(root, "fleet");
    cJSON_AddStringToObject(fs->fleet, "node", ngx_xprec_fleet_node());
    fs->cln->handler = ngx_xprec_fleet_status_cleanup;
    fs->cln->data = fs;
    fs->waiting = 3;
    r->main->count++;
    r->read_event_handler = ngx_http_test_reading;

    ngx_snprintf((u_char *) now, sizeof(now) - 1, "%L%Z", (int64_t) tp->sec * 1000 + tp->msec);
    argv[0] = "ZRANGEBYSCORE";
    argv[1] = NGX_XPREC_NODES;
    argv[2] = now;
    argv[3] = "+inf";
    (void) ngx_xprec_redis_command(4, argv, NULL, -1, ngx_xprec_fleet_nodes, fs);
    argv[0] = "HGETALL";
    argv[1] = NGX_XPREC_RESIDENCY;
    (void) ngx_xprec_redis_command(2, argv, NULL, -1, ngx_xprec_fleet_residency, fs);

    ngx_xprec_fleet_status_done(fs);

    return NGX_DONE;
}


static ngx_int_t
ngx_xprec_admin_status(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf)
{
    cJSON                        *root, *eng, *ads, *a, *ts, *t;
    xp_engine_stats               st;
    xp_adapter_info              *info = NULL;
    ngx_xprec_tenant_t           *tenant;
    ngx_xprec_runtime_adapter_t  *ra;
    ngx_uint_t                    i, k;
    int                           n = 0;
    char                          name[128];
    xp_engine                    *e = ngx_xprec_worker.engine;

    root = cJSON_CreateObject();
    eng = cJSON_AddObjectToObject(root, "engine");
    cJSON_AddStringToObject(eng, "state", e ? "ready"
                                        : ngx_xprec_worker.failed ? "failed" : "starting");
    ngx_snprintf((u_char *) name, sizeof(name) - 1, "%V%Z", &mcf->model_name);
    cJSON_AddStringToObject(eng, "model", name);
    cJSON_AddStringToObject(eng, "model_dir", (char *) mcf->model_dir.data);
    cJSON_AddNumberToObject(eng, "pid", (double) ngx_pid);

    if (ngx_xprec_worker.failed) {
        cJSON_AddStringToObject(eng, "error", ngx_xprec_worker.error);
    }

    if (e) {
        xp_engine_stats_get(e, &st);
        cJSON_AddStringToObject(eng, "backend", xp_engine_backend(e));
        cJSON_AddNumberToObject(eng, "context", xp_engine_context(e));
        cJSON_AddNumberToObject(eng, "running", st.running);
        cJSON_AddNumberToObject(eng, "waiting", st.waiting);
        cJSON_AddNumberToObject(eng, "intake", st.intake);
        cJSON_AddNumberToObject(eng, "kv_blocks_total", st.kv_blocks_total);
        cJSON_AddNumberToObject(eng, "kv_blocks_free", st.kv_blocks_free);
        cJSON_AddNumberToObject(eng, "preemptions", (double) st.preemptions);
        cJSON_AddNumberToObject(eng, "steps", (double) st.steps);
        cJSON_AddNumberToObject(eng, "prompt_tokens", (double) st.prompt_tokens);
        cJSON_AddNumberToObject(eng, "generated_tokens", (double) st.generated_tokens);
        cJSON_AddNumberToObject(eng, "requests_done", (double) st.requests_done);

        n = xp_engine_adapters(e, NULL, 0);
        info = calloc(n ? n : 1, sizeof(xp_adapter_info));
        if (info) {
            n = xp_engine_adapters(e, info, n);
        } else {
            n = 0;
        }
    }

    ads = cJSON_AddArrayToObject(root, "adapters");
    for (k = 0; k < (ngx_uint_t) n; k++) {
        a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "name", info[k].name);
        ra = ngx_xprec_runtime_find(info[k].name, ngx_strlen(info[k].name));
        cJSON_AddStringToObject(a, "source", ra ? "admin" : "nginx.conf");
        cJSON_AddStringToObject(a, "tier", ngx_xprec_tier_name(info[k].tier));
        cJSON_AddBoolToObject(a, "pinned", info[k].pinned);
        cJSON_AddNumberToObject(a, "running", info[k].running);
        cJSON_AddNumberToObject(a, "rank", info[k].rank);
        cJSON_AddNumberToObject(a, "hits", (double) info[k].hits);
        cJSON_AddNumberToObject(a, "misses", (double) info[k].misses);
        cJSON_AddNumberToObject(a, "loads", (double) info[k].loads);
        cJSON_AddNumberToObject(a, "evictions", (double) info[k].evictions);
        cJSON_AddNumberToObject(a, "load_seconds", info[k].load_seconds);
        cJSON_AddNumberToObject(a, "idle_seconds", info[k].idle_seconds);
        cJSON_AddItemToArray(ads, a);
    }
    free(info);

    ts = cJSON_AddArrayToObject(root, "tenants");
    tenant = mcf->tenants.elts;
    for (i = 0; i < mcf->tenants.nelts; i++) {
        t = cJSON_CreateObject();
        ngx_snprintf((u_char *) name, sizeof(name) - 1, "%V%Z", &tenant[i].name);
        cJSON_AddStringToObject(t, "name", name);
        cJSON_AddNumberToObject(t, "in_flight", (double) ngx_xprec_worker.in_flight[i]);
        cJSON_AddItemToArray(ts, t);
    }

    return ngx_xprec_admin_fleet(r, mcf, root);
}


ngx_int_t
ngx_xprec_admin_handler(ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t  *mcf;
    ngx_xprec_ctx_t        *ctx;
    ngx_str_t               uri = r->uri;
    ngx_int_t               rc;
    static const char      *paths[] = { "/status", "/load_lora_adapter",
                                        "/unload_lora_adapter" };
    ngx_uint_t              i;
    size_t                  n;

    mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);

    while (uri.len > 1 && uri.data[uri.len - 1] == '/') {
        uri.len--;
    }

    if (ngx_xprec_auth_admin(r, mcf) != NGX_OK) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_xprec_send_error(r, NGX_HTTP_UNAUTHORIZED, "invalid_request_error",
                                    "invalid_api_key", NULL,
                                    mcf->has_admin_key ? "Incorrect admin key provided."
                                                       : "No xprec_admin_key_sha256 is "
                                                         "configured.");
    }

    for (i = 0; i < 3; i++) {
        n = ngx_strlen(paths[i]);
        if (uri.len >= n && ngx_strncmp(uri.data + uri.len - n, paths[i], n) == 0) {
            break;
        }
    }

    if (i == 3) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_xprec_send_error(r, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                                    "unknown_url", NULL, "Invalid URL (%V %V)",
                                    &r->method_name, &r->uri);
    }

    if ((i == 0) != (r->method == NGX_HTTP_GET || r->method == NGX_HTTP_HEAD)
        || (i > 0 && r->method != NGX_HTTP_POST))
    {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_xprec_send_error(r, NGX_HTTP_NOT_ALLOWED, "invalid_request_error",
                                    "method_not_allowed", NULL, "use %s",
                                    i == 0 ? "GET" : "POST");
    }

    if (i == 0) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_xprec_admin_status(r, mcf);
    }

    if (ngx_xprec_ctx_init(r, &ctx) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->kind = i == 1 ? NGX_XPREC_ADMIN_LOAD : 0;

    rc = ngx_http_read_client_request_body(r, ngx_xprec_admin_body);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/* A string field of the body, or NULL. */
static const char *
ngx_xprec_admin_str(cJSON *body, const char *name)
{
    cJSON  *f = cJSON_GetObjectItemCaseSensitive(body, name);

    return cJSON_IsString(f) && f->valuestring[0] ? f->valuestring : NULL;
}


static ngx_int_t
ngx_xprec_admin_plain(ngx_http_request_t *r, const char *fmt, const char *name)
{
    u_char  buf[512], *p;
    ngx_buf_t    *b;
    ngx_chain_t   out;
    ngx_int_t     rc;

    p = ngx_snprintf(buf, sizeof(buf), fmt, name);

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/plain");
    r->headers_out.content_length_n = p - buf;

    b = ngx_create_temp_buf(r->pool, p - buf);
    if (b == NULL) {
        return NGX_ERROR;
    }
    b->last = ngx_cpymem(b->last, buf, p - buf);
    b->last_buf = 1;

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static ngx_int_t
ngx_xprec_admin_load(ngx_xprec_ctx_t *ctx, ngx_xprec_main_conf_t *mcf, cJSON *body)
{
    ngx_http_request_t           *r = ctx->r;
    const char                   *name, *path;
    ngx_str_t                     s;
    ngx_xprec_runtime_adapter_t  *a;
    ngx_xprec_adapter_conf_t     *ca;
    cJSON                        *tenants, *t;
    ngx_uint_t                    i;
    const char                   *adapter;

    name = ngx_xprec_admin_str(body, "lora_name");
    path = ngx_xprec_admin_str(body, "lora_path");
    if (name == NULL || path == NULL) {
        return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL, NULL,
                                    "Both 'lora_name' and 'lora_path' must be provided.");
    }

    s.data = (u_char *) name;
    s.len = ngx_strlen(name);

    /* a taken name: the base, nginx.conf's adapters, or one loaded here */
    (void) adapter;
    ca = mcf->adapters.elts;
    for (i = 0; i < mcf->adapters.nelts; i++) {
        if (ca[i].name.len == s.len && ngx_strncmp(ca[i].name.data, name, s.len) == 0) {
            break;
        }
    }

    if (i < mcf->adapters.nelts || ngx_xprec_runtime_find(name, s.len)
        || (s.len == mcf->model_name.len
            && ngx_strncmp(name, mcf->model_name.data, s.len) == 0))
    {
        return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL, NULL,
                                    "The lora adapter '%s' has already been loaded.",
                                    name);
    }

    for (i = 0; i < s.len; i++) {
        u_char c = s.data[i];
        if (!ngx_xprec_name_char(c) || s.len > 120)
        {
            return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL,
                                        "lora_name", "lora_name: 1 to 120 letters, "
                                        "digits or ._-:/");
        }
    }

    a = calloc(1, sizeof(*a));
    if (a == NULL || (a->name = strdup(name)) == NULL || (a->dir = strdup(path)) == NULL) {
        if (a) {
            ngx_xprec_runtime_free(a);
        }
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* xprec's extension: who may use it */
    tenants = cJSON_GetObjectItemCaseSensitive(body, "tenants");
    if (cJSON_IsString(tenants) && ngx_strcmp(tenants->valuestring, "*") == 0) {
        a->all_tenants = 1;

    } else if (cJSON_IsArray(tenants)) {
        a->tenants = calloc(cJSON_GetArraySize(tenants) + 1, sizeof(char *));
        if (a->tenants == NULL) {
            ngx_xprec_runtime_free(a);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        cJSON_ArrayForEach(t, tenants) {
            if (!cJSON_IsString(t)) {
                ngx_xprec_runtime_free(a);
                return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError",
                                            NULL, "tenants",
                                            "tenants must be \"*\" or a list of tenant "
                                            "names");
            }
            a->tenants[a->n_tenants] = strdup(t->valuestring);
            if (a->tenants[a->n_tenants++] == NULL) {
                ngx_xprec_runtime_free(a);
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
        }

    } else if (tenants && !cJSON_IsNull(tenants)) {
        ngx_xprec_runtime_free(a);
        return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL,
                                    "tenants", "tenants must be \"*\" or a list of tenant "
                                    "names");
    }

    ctx->id = xp_engine_add_adapter_async(ngx_xprec_worker.engine, name, path, 0,
                                          ngx_xprec_worker.queue);
    if (ctx->id == 0) {
        ngx_xprec_runtime_free(a);
        return ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL, NULL,
                                    "%s", xp_last_error());
    }

    /* not served until the loader is done */
    a->loading = 1;
    a->ticket = ctx->id;
    a->next = ngx_xprec_worker.runtime;
    ngx_xprec_worker.runtime = a;

    ctx->loading = a;
    ngx_xprec_track(ctx);
    ctx->finished = 1; /* nothing to cancel */

    return NGX_DONE;
}


static void
ngx_xprec_admin_body(ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t        *mcf;
    ngx_xprec_ctx_t              *ctx;
    const char                   *err = NULL, *name;
    ngx_xprec_runtime_adapter_t  *a;
    ngx_xprec_adapter_conf_t     *ca;
    ngx_uint_t                    i;
    ngx_int_t                     rc;
    size_t                        len;

    mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);
    ctx = ngx_http_get_module_ctx(r, ngx_xprec_module);

    ctx->json = ngx_xprec_parse_body(r, &err);
    if (ctx->json == NULL) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                  "BadRequestError", NULL, NULL, "%s", err));
        return;
    }

    if (!ngx_xprec_engine_ready()) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r,
                                  NGX_HTTP_SERVICE_UNAVAILABLE, "server_error",
                                  "engine_unavailable", NULL, "the engine is %s",
                                  ngx_xprec_worker.failed ? ngx_xprec_worker.error
                                                          : "still starting"));
        return;
    }

    if (ctx->kind == NGX_XPREC_ADMIN_LOAD) {
        rc = ngx_xprec_admin_load(ctx, mcf, ctx->json);
        if (rc != NGX_DONE) {
            ngx_http_finalize_request(r, rc);
        }
        return;
    }

    /* unload */
    name = ngx_xprec_admin_str(ctx->json, "lora_name");
    if (name == NULL) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                  "BadRequestError", NULL, "lora_name",
                                  "'lora_name' must be provided."));
        return;
    }

    len = ngx_strlen(name);
    ca = mcf->adapters.elts;
    for (i = 0; i < mcf->adapters.nelts; i++) {
        if (ca[i].name.len == len && ngx_strncmp(ca[i].name.data, name, len) == 0) {
            ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                      "BadRequestError", NULL, "lora_name",
                                      "The lora adapter '%s' is defined in nginx.conf; "
                                      "remove it there and reload.", name));
            return;
        }
    }

    a = ngx_xprec_runtime_find(name, len);
    if (a == NULL || a->loading || a->broken) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_NOT_FOUND,
                                  "NotFoundError", NULL, "lora_name",
                                  "The lora adapter '%s' cannot be found.", name));
        return;
    }

    /* requests already running keep it; the engine frees it when they end */
    (void) xp_engine_remove_adapter(ngx_xprec_worker.engine, name);
    ngx_xprec_fleet_unloaded(name);
    ngx_xprec_runtime_unlink(a);

    rc = ngx_xprec_admin_plain(r, "Success: LoRA adapter '%s' removed successfully.",
                               name);
    ngx_xprec_runtime_free(a);
    ngx_http_finalize_request(r, rc);
}


void
ngx_xprec_admin_on_event(ngx_xprec_ctx_t *ctx, xp_event *ev)
{
    ngx_http_request_t  *r = ctx->r;
    ngx_int_t            rc;
    char                 name[128];

    if (ev->type != XP_EV_DONE && ev->type != XP_EV_ERROR) {
        return;
    }

    ngx_xprec_untrack(ctx);
    ngx_cpystrn((u_char *) name, (u_char *) cJSON_GetObjectItemCaseSensitive(ctx->json,
                "lora_name")->valuestring, sizeof(name));

    if (ev->type == XP_EV_DONE) {
        rc = ngx_xprec_admin_plain(r, "Success: LoRA adapter '%s' added successfully.",
                                   name);
    } else {
        /* a path that is not a valid adapter is refused, not "loaded" */
        rc = ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST, "BadRequestError", NULL,
                                  "lora_path", "%s", ev->error);
    }

    ngx_http_finalize_request(r, rc);
}
