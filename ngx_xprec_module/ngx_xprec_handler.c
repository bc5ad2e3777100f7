/*
 * The xprec_openai location: /v1/models, /v1/models/{id}, /v1/chat/completions and
 * /v1/completions for authenticated tenants.
 *
 * A completion request is read, checked and submitted to the engine (at once, or when the
 * worker's engine has started). Its events then arrive from ngx_xprec_worker.c: a stream
 * answers with SSE chunks as they come (headers go out once the prompt is tokenized, so a
 * prompt the engine refuses still gets a plain 400), otherwise one JSON body is built at the
 * end. A client that goes away cancels its engine request from the cleanup handler, which
 * frees its KV blocks at the engine's next step.
 */

#include "ngx_xprec.h"


static void ngx_xprec_body_handler(ngx_http_request_t *r);
static void ngx_xprec_cleanup(void *data);
static void ngx_xprec_tick(ngx_event_t *ev);
static void ngx_xprec_finish(ngx_xprec_ctx_t *ctx, ngx_int_t rc);
static void ngx_xprec_fail(ngx_xprec_ctx_t *ctx, ngx_uint_t status, const char *type,
    const char *code, const char *msg);


static time_t  ngx_xprec_started_at;


ngx_int_t
ngx_xprec_ctx_init(ngx_http_request_t *r, ngx_xprec_ctx_t **out)
{
    ngx_xprec_ctx_t     *ctx;
    ngx_http_cleanup_t  *cln;
    u_char              *p;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_xprec_ctx_t));
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_xprec_cleanup;
    cln->data = ctx;

    ctx->r = r;
    ctx->created = ngx_time();
    ctx->t_start = ngx_current_msec;
    ctx->tick.handler = ngx_xprec_tick;
    ctx->tick.data = ctx;
    ctx->tick.log = r->connection->log;

    p = ngx_pnalloc(r->pool, 40);
    if (p == NULL) {
        return NGX_ERROR;
    }
    ctx->cmpl_id.data = p;
    ctx->cmpl_id.len = ngx_sprintf(p, "%08xD%08xD%08xD", (uint32_t) ngx_random(),
                                   (uint32_t) ngx_random(), (uint32_t) ngx_random())
                       - p;

    ngx_http_set_ctx(r, ctx, ngx_xprec_module);
    *out = ctx;

    return NGX_OK;
}


static void
ngx_xprec_cleanup(void *data)
{
    ngx_xprec_ctx_t  *ctx = data;

    if (ctx->tick.timer_set) {
        ngx_del_timer(&ctx->tick);
    }

    if (ctx->waiting) {
        ngx_queue_remove(&ctx->wait);
        ctx->waiting = 0;
    }

    if (ctx->qreq) {
        /* Redis has not answered for it yet: that answer settles its reservation */
        ngx_xprec_quota_detach(ctx);
        ctx->counted = 1;
    }

    if (ctx->in_tree) {
        /* the client went away: stop spending compute on it */
        if (!ctx->finished && ngx_xprec_worker.engine) {
            (void) xp_engine_cancel(ngx_xprec_worker.engine, ctx->id);
            /* charged what was generated: the engine's last event for it will tell */
            ngx_xprec_quota_orphan(ctx);
        }
        ngx_xprec_untrack(ctx);
        if (ctx->tenant && ngx_xprec_worker.in_flight[ctx->tenant->index]) {
            ngx_xprec_worker.in_flight[ctx->tenant->index]--;
        }
    }

    if (ctx->kind == NGX_XPREC_CHAT || ctx->kind == NGX_XPREC_COMPLETION) {
        ngx_xprec_quota_end(ctx, ctx->r->headers_out.status ? ctx->r->headers_out.status
                                                            : NGX_HTTP_CLIENT_CLOSED_REQUEST);
    }

    ngx_xprec_request_free(ctx);
    free(ctx->prompt_text);
    free(ctx->text);
    free(ctx->lps);
    free(ctx->lp_tokens);
    free(ctx->echo_ids);
    free(ctx->prompt_lp);
    ctx->prompt_text = NULL;
    ctx->text = NULL;
    ctx->lps = NULL;
    ctx->lp_tokens = NULL;
    ctx->echo_ids = NULL;
    ctx->prompt_lp = NULL;
}


/* ------------------------------------------------------------------ models */

static cJSON *
ngx_xprec_model_card(ngx_xprec_main_conf_t *mcf, const char *id, const char *root,
    ngx_flag_t adapter)
{
    cJSON  *m = cJSON_CreateObject();
    char    base[128];
    int     ctxlen;

    ctxlen = ngx_xprec_worker.engine ? xp_engine_context(ngx_xprec_worker.engine)
                                     : mcf->info.max_position_embeddings;

    if (ngx_xprec_started_at == 0) {
        ngx_xprec_started_at = ngx_time();
    }

    ngx_snprintf((u_char *) base, sizeof(base) - 1, "%V%Z", &mcf->model_name);
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double) ngx_xprec_started_at);
    cJSON_AddStringToObject(m, "owned_by", "xprec");
    cJSON_AddStringToObject(m, "root", root);
    if (adapter) {
        cJSON_AddStringToObject(m, "parent", base);
    } else {
        cJSON_AddNullToObject(m, "parent");
    }
    cJSON_AddNumberToObject(m, "max_model_len", ctxlen);
    cJSON_AddArrayToObject(m, "permission");

    return m;
}


cJSON *
ngx_xprec_models_json(ngx_xprec_main_conf_t *mcf, ngx_xprec_tenant_t *t, ngx_str_t *only)
{
    cJSON                        *root = NULL, *data = NULL, *card;
    ngx_xprec_adapter_conf_t     *a;
    ngx_xprec_runtime_adapter_t  *ra;
    ngx_uint_t                    i;
    const char                   *ad;
    char                          id[128];
    ngx_str_t                     name;

    if (only == NULL) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "object", "list");
        data = cJSON_AddArrayToObject(root, "data");
    }

    /* the base, the nginx.conf adapters and those loaded at run time, in that order */
    for (i = 0; i < 1 + mcf->adapters.nelts; i++) {
        a = i ? (ngx_xprec_adapter_conf_t *) mcf->adapters.elts + i - 1 : NULL;
        ngx_snprintf((u_char *) id, sizeof(id) - 1, "%V%Z",
                     a ? &a->name : &mcf->model_name);
        name.data = (u_char *) id;
        name.len = ngx_strlen(id);

        if ((only && (only->len != name.len
                      || ngx_strncmp(only->data, name.data, name.len) != 0))
            || !ngx_xprec_model_allowed(mcf, t, &name, &ad))
        {
            continue;
        }

        card = ngx_xprec_model_card(mcf, id, a ? (char *) a->dir.data
                                               : (char *) mcf->model_dir.data, a != NULL);
        if (only) {
            return card;
        }
        cJSON_AddItemToArray(data, card);
    }

    for (ra = ngx_xprec_worker.runtime; ra; ra = ra->next) {
        if (ra->loading || ra->broken) {
            continue;
        }
        name.data = (u_char *) ra->name;
        name.len = ngx_strlen(ra->name);

        if ((only && (only->len != name.len
                      || ngx_strncmp(only->data, name.data, name.len) != 0))
            || !ngx_xprec_model_allowed(mcf, t, &name, &ad))
        {
            continue;
        }

        card = ngx_xprec_model_card(mcf, ra->name, ra->dir, 1);
        if (only) {
            return card;
        }
        cJSON_AddItemToArray(data, card);
    }

    return root;
}


/* ------------------------------------------------------------------ routing */

static ngx_flag_t
ngx_xprec_ends_with(ngx_str_t *uri, const char *suffix)
{
    size_t  n = ngx_strlen(suffix);

    return uri->len >= n && ngx_strncmp(uri->data + uri->len - n, suffix, n) == 0;
}


static ngx_int_t
ngx_xprec_not_allowed(ngx_http_request_t *r, const char *allow)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    h->hash = 1;
    ngx_str_set(&h->key, "Allow");
    h->value.data = (u_char *) allow;
    h->value.len = ngx_strlen(allow);

    return ngx_xprec_send_error(r, NGX_HTTP_NOT_ALLOWED, "invalid_request_error",
                                "method_not_allowed", NULL, "%V is not allowed here; use %s",
                                &r->method_name, allow);
}


ngx_int_t
ngx_xprec_openai_handler(ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t  *mcf;
    ngx_xprec_tenant_t     *tenant;
    ngx_xprec_ctx_t        *ctx;
    ngx_str_t               uri, id;
    ngx_int_t               rc;
    u_char                 *p;
    ngx_uint_t              kind = 0;
    cJSON                  *card;

    mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);

    uri = r->uri;
    while (uri.len > 1 && uri.data[uri.len - 1] == '/') {
        uri.len--;
    }

    tenant = ngx_xprec_auth(r, mcf);
    if (tenant == NULL) {
        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_xprec_send_error(r, NGX_HTTP_UNAUTHORIZED, "invalid_request_error",
                                    "invalid_api_key", NULL,
                                    r->headers_in.authorization
                                        ? "Incorrect API key provided."
                                        : "You didn't provide an API key. Send it as "
                                          "\"Authorization: Bearer KEY\".");
    }

    if (ngx_xprec_ends_with(&uri, "/chat/completions")) {
        kind = NGX_XPREC_CHAT;
    } else if (ngx_xprec_ends_with(&uri, "/completions")) {
        kind = NGX_XPREC_COMPLETION;
    }

    if (kind) {
        if (r->method != NGX_HTTP_POST) {
            if (ngx_http_discard_request_body(r) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
            return ngx_xprec_not_allowed(r, "POST");
        }

        if (ngx_xprec_ctx_init(r, &ctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->kind = kind;
        ctx->tenant = tenant;

        rc = ngx_http_read_client_request_body(r, ngx_xprec_body_handler);
        if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
            return rc;
        }

        return NGX_DONE;
    }

    /* the models */
    p = ngx_strlcasestrn(uri.data, uri.data + uri.len, (u_char *) "/models", 7 - 1);
    if (p != NULL && (p + 7 == uri.data + uri.len || p[7] == '/')) {
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
            if (ngx_http_discard_request_body(r) != NGX_OK) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
            return ngx_xprec_not_allowed(r, "GET");
        }

        if (ngx_http_discard_request_body(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (p + 7 == uri.data + uri.len) {
            return ngx_xprec_send_json(r, NGX_HTTP_OK,
                                       ngx_xprec_models_json(mcf, tenant, NULL));
        }

        id.data = p + 8;
        id.len = uri.data + uri.len - id.data;
        card = ngx_xprec_models_json(mcf, tenant, &id);
        if (card == NULL) {
            return ngx_xprec_send_error(r, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                                        "model_not_found", "model",
                                        "The model '%V' does not exist or you do not "
                                        "have access to it.", &id);
        }
        return ngx_xprec_send_json(r, NGX_HTTP_OK, card);
    }

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_xprec_send_error(r, NGX_HTTP_NOT_FOUND, "invalid_request_error",
                                "unknown_url", NULL, "Invalid URL (%V %V)",
                                &r->method_name, &r->uri);
}


/* ------------------------------------------------------------------ submit */

/* The request body, whole (nginx may have kept part of it in its temp file), as JSON. */
cJSON *
ngx_xprec_parse_body(ngx_http_request_t *r, const char **err)
{
    ngx_chain_t  *cl;
    size_t        len = 0;
    u_char       *data, *p;
    ssize_t       n;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        *err = "the request has no body; send a JSON object";
        return NULL;
    }

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    data = ngx_pnalloc(r->pool, len ? len : 1);
    if (data == NULL) {
        *err = "out of memory";
        return NULL;
    }

    p = data;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        if (ngx_buf_size(cl->buf) == 0) {
            continue; /* an empty body's only buffer is neither in memory nor in a file */
        }

        if (ngx_buf_in_memory(cl->buf) || !cl->buf->in_file || cl->buf->file == NULL) {
            p = ngx_cpymem(p, cl->buf->pos, cl->buf->last - cl->buf->pos);
            continue;
        }

        n = ngx_read_file(cl->buf->file, p, cl->buf->file_last - cl->buf->file_pos,
                          cl->buf->file_pos);
        if (n != cl->buf->file_last - cl->buf->file_pos) {
            *err = "the request body could not be read back";
            return NULL;
        }
        p += n;
    }

    return ngx_xprec_parse_json(data, len, err);
}


static void
ngx_xprec_body_handler(ngx_http_request_t *r)
{
    ngx_xprec_main_conf_t  *mcf;
    ngx_xprec_loc_conf_t   *lcf;
    ngx_xprec_ctx_t        *ctx;
    const char             *err = NULL, *param = NULL, *adapter;
    cJSON                  *model;
    ngx_int_t               rc;

    mcf = ngx_http_get_module_main_conf(r, ngx_xprec_module);
    lcf = ngx_http_get_module_loc_conf(r, ngx_xprec_module);
    ctx = ngx_http_get_module_ctx(r, ngx_xprec_module);

    ctx->json = ngx_xprec_parse_body(r, &err);
    if (ctx->json == NULL) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                  "invalid_request_error", NULL, NULL, "%s", err));
        return;
    }

    model = cJSON_GetObjectItemCaseSensitive(ctx->json, "model");
    if (!cJSON_IsString(model) || model->valuestring[0] == '\0') {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                  "invalid_request_error", NULL, "model",
                                  "model is required: the base's name or an adapter's"));
        return;
    }

    /* kept in the pool: the parsed body goes once the engine has the request, and the log
     * phase ($xprec_model) comes after the cleanup */
    ctx->model.len = ngx_strlen(model->valuestring);
    ctx->model.data = ngx_pnalloc(r->pool, ctx->model.len + 1);
    if (ctx->model.data == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }
    ngx_memcpy(ctx->model.data, model->valuestring, ctx->model.len + 1);

    /* the same answer whether another tenant has it or nobody does */
    if (!ngx_xprec_model_allowed(mcf, ctx->tenant, &ctx->model, &adapter)) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_NOT_FOUND,
                                  "invalid_request_error", "model_not_found", "model",
                                  "The model '%V' does not exist or you do not have "
                                  "access to it.", &ctx->model));
        return;
    }

    ctx->req.adapter = adapter;
    ctx->model_ok = 1;
    /* a limited tenant's request waits, tokenized, for its reservation */
    ctx->limited = mcf->redis && ngx_xprec_tenant_limited(ctx->tenant);
    ctx->req.hold = ctx->limited;

    rc = ctx->kind == NGX_XPREC_CHAT
             ? ngx_xprec_parse_chat(ctx, ctx->json, lcf->max_tokens, &err, &param)
             : ngx_xprec_parse_completion(ctx, ctx->json, lcf->max_tokens, &err, &param);

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, ngx_xprec_send_error(r, NGX_HTTP_BAD_REQUEST,
                                  "invalid_request_error", NULL, param, "%s", err));
        return;
    }

    if (ctx->echo && ctx->req.prompt) {
        ctx->prompt_text = strdup(ctx->req.prompt);
        if (ctx->prompt_text == NULL) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
    }

    /* client gone while we wait: find out, and let the cleanup cancel */
    r->read_event_handler = ngx_http_test_reading;

    /* every in-flight request keeps a timer the graceful shutdown waits for */
    ngx_add_timer(&ctx->tick, NGX_XPREC_TICK);

    if (ngx_xprec_engine_ready()) {
        ngx_xprec_submit(ctx);
        return;
    }

    if (ngx_xprec_worker.failed) {
        ngx_xprec_start_failed(ctx);
        return;
    }

    /* the engine is still starting (or waiting for the previous worker's to go) */
    ngx_queue_insert_tail(&ngx_xprec_worker.waiting, &ctx->wait);
    ctx->waiting = 1;
}


void
ngx_xprec_start_failed(ngx_xprec_ctx_t *ctx)
{
    ngx_xprec_fail(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "server_error", "engine_unavailable",
                   ngx_xprec_worker.failed ? ngx_xprec_worker.error
                                           : "the engine is still starting; retry");
}


void
ngx_xprec_submit(ngx_xprec_ctx_t *ctx)
{
    ctx->id = xp_engine_submit(ngx_xprec_worker.engine, &ctx->req, ngx_xprec_worker.queue);

    if (ctx->id == 0) {
        ngx_xprec_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_request_error", NULL,
                       xp_last_error());
        return;
    }

    /* the engine has its own copy now */
    ngx_xprec_request_free(ctx);
    ngx_xprec_track(ctx);
    ngx_xprec_worker.in_flight[ctx->tenant->index]++;
}


/* ------------------------------------------------------------------ responses */

static const char *
ngx_xprec_finish_name(xp_finish f)
{
    return f == XP_FINISH_LENGTH ? "length" : "stop";
}


static cJSON *
ngx_xprec_usage(ngx_xprec_ctx_t *ctx)
{
    cJSON  *u = cJSON_CreateObject();

    cJSON_AddNumberToObject(u, "prompt_tokens", ctx->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", ctx->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", ctx->prompt_tokens + ctx->completion_tokens);

    return u;
}


/* The envelope every chunk and body shares. */
static cJSON *
ngx_xprec_envelope(ngx_xprec_ctx_t *ctx, const char *object, cJSON **choice)
{
    cJSON  *root, *choices;
    char    id[64], model[160];

    root = cJSON_CreateObject();
    ngx_snprintf((u_char *) id, sizeof(id) - 1, "%s%V%Z",
                 ctx->kind == NGX_XPREC_CHAT ? "chatcmpl-" : "cmpl-", &ctx->cmpl_id);
    ngx_snprintf((u_char *) model, sizeof(model) - 1, "%V%Z", &ctx->model);
    cJSON_AddStringToObject(root, "id", id);
    cJSON_AddStringToObject(root, "object", object);
    cJSON_AddNumberToObject(root, "created", (double) ctx->created);
    cJSON_AddStringToObject(root, "model", model);
    choices = cJSON_AddArrayToObject(root, "choices");

    if (choice) {
        *choice = cJSON_CreateObject();
        cJSON_AddNumberToObject(*choice, "index", 0);
        cJSON_AddItemToArray(choices, *choice);
    }

    return root;
}


/* A token as logprobs name it: its text (bad UTF-8 replaced), or "token_id:N". malloc'd. */
static char *
ngx_xprec_token_text(ngx_xprec_ctx_t *ctx, int32_t id, const char **bytes, size_t *len)
{
    char  *s;

    *len = 0;
    *bytes = xp_engine_token_bytes(ngx_xprec_worker.engine, id, len);

    if (ctx->token_ids) {
        s = malloc(NGX_INT32_LEN + 10);
        if (s) {
            *ngx_sprintf((u_char *) s, "token_id:%D", id) = '\0';
        }
        return s;
    }

    return ngx_xprec_utf8_fix(*bytes ? *bytes : "", *bytes ? *len : 0);
}


/* {"token", "bytes", "logprob"} of one token */
static cJSON *
ngx_xprec_chat_token(ngx_xprec_ctx_t *ctx, const xp_token_logprob *t)
{
    cJSON       *o, *arr;
    const char  *bytes;
    size_t       len, i;
    char        *text;

    text = ngx_xprec_token_text(ctx, t->token, &bytes, &len);
    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "token", text ? text : "");
    free(text);
    cJSON_AddNumberToObject(o, "logprob", t->logprob);
    arr = cJSON_AddArrayToObject(o, "bytes");
    for (i = 0; bytes && i < len; i++) {
        cJSON_AddItemToArray(arr, cJSON_CreateNumber((u_char) bytes[i]));
    }

    return o;
}


/* Chat's logprobs entry of one token: token, logprob, bytes, top_logprobs. */
static cJSON *
ngx_xprec_chat_lp(ngx_xprec_ctx_t *ctx, const xp_logprobs *lp)
{
    cJSON  *o, *tops;
    int     k;

    o = ngx_xprec_chat_token(ctx, &lp->chosen);
    tops = cJSON_AddArrayToObject(o, "top_logprobs");

    for (k = 0; k < lp->n_top && k < ctx->top_logprobs; k++) {
        cJSON_AddItemToArray(tops, ngx_xprec_chat_token(ctx, &lp->top[k]));
    }

    return o;
}


/* Completions' logprobs over n tokens: tokens, token_logprobs, top_logprobs, text_offset.
 * first_null: the first entry is the prompt's first token, which has no logprob. */
static void
ngx_xprec_completion_lp(ngx_xprec_ctx_t *ctx, cJSON *obj, const int32_t *ids,
    const xp_logprobs *lps, size_t n, ngx_flag_t first_null, size_t *offset)
{
    cJSON       *tokens, *lpv, *tops, *off, *top;
    const char  *bytes;
    char        *text;
    size_t       i, len;
    int          k;

    tokens = cJSON_GetObjectItemCaseSensitive(obj, "tokens");
    lpv = cJSON_GetObjectItemCaseSensitive(obj, "token_logprobs");
    tops = cJSON_GetObjectItemCaseSensitive(obj, "top_logprobs");
    off = cJSON_GetObjectItemCaseSensitive(obj, "text_offset");

    for (i = 0; i < n; i++) {
        text = ngx_xprec_token_text(ctx, ids[i], &bytes, &len);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(text ? text : ""));
        free(text);
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double) *offset));
        *offset += len;

        if (i == 0 && first_null) {
            cJSON_AddItemToArray(lpv, cJSON_CreateNull());
            cJSON_AddItemToArray(tops, cJSON_CreateNull());
            continue;
        }

        cJSON_AddItemToArray(lpv, cJSON_CreateNumber(lps[i].chosen.logprob));
        top = cJSON_CreateObject();
        for (k = 0; k < lps[i].n_top && k < ctx->top_logprobs; k++) {
            text = ngx_xprec_token_text(ctx, lps[i].top[k].token, &bytes, &len);
            /* a repeated token string keeps the first (most likely) entry */
            if (text && !cJSON_GetObjectItemCaseSensitive(top, text)) {
                cJSON_AddNumberToObject(top, text, lps[i].top[k].logprob);
            }
            free(text);
        }
        cJSON_AddItemToArray(tops, top);
    }
}


static cJSON *
ngx_xprec_completion_lp_object(void)
{
    cJSON  *o = cJSON_CreateObject();

    cJSON_AddArrayToObject(o, "tokens");
    cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON_AddArrayToObject(o, "text_offset");

    return o;
}


/* The prompt's text for echo: as sent, or decoded from the ids sent. */
static char *
ngx_xprec_echo_text(ngx_xprec_ctx_t *ctx, size_t *len)
{
    char  *s;

    if (ctx->prompt_text) {
        *len = ngx_strlen(ctx->prompt_text);
        s = malloc(*len + 1);
        if (s) {
            ngx_memcpy(s, ctx->prompt_text, *len + 1);
        }
        return s;
    }

    return xp_engine_decode(ngx_xprec_worker.engine, ctx->echo_ids,
                            (size_t) ctx->n_echo_ids, len);
}


static ngx_int_t
ngx_xprec_send_whole(ngx_xprec_ctx_t *ctx)
{
    cJSON   *root, *choice, *msg, *lp, *content;
    char    *echo = NULL, *text;
    size_t   elen = 0, i, offset = 0;

    if (ctx->kind == NGX_XPREC_CHAT) {
        root = ngx_xprec_envelope(ctx, "chat.completion", &choice);
        msg = cJSON_AddObjectToObject(choice, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        text = malloc(ctx->text_len + 1);
        if (text == NULL) {
            cJSON_Delete(root);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        ngx_memcpy(text, ctx->text ? (char *) ctx->text : "", ctx->text_len);
        text[ctx->text_len] = '\0';
        cJSON_AddStringToObject(msg, "content", text);
        free(text);

        if (ctx->logprobs) {
            lp = cJSON_AddObjectToObject(choice, "logprobs");
            content = cJSON_AddArrayToObject(lp, "content");
            for (i = 0; i < ctx->n_lps; i++) {
                cJSON_AddItemToArray(content, ngx_xprec_chat_lp(ctx, &ctx->lps[i]));
            }
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }

    } else {
        root = ngx_xprec_envelope(ctx, "text_completion", &choice);
        if (ctx->echo) {
            echo = ngx_xprec_echo_text(ctx, &elen);
        }
        text = malloc(elen + ctx->text_len + 1);
        if (text == NULL) {
            free(echo);
            cJSON_Delete(root);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        if (echo) {
            ngx_memcpy(text, echo, elen);
        }
        ngx_memcpy(text + elen, ctx->text ? (char *) ctx->text : "", ctx->text_len);
        text[elen + ctx->text_len] = '\0';
        cJSON_AddStringToObject(choice, "text", text);
        free(text);
        free(echo);

        if (ctx->logprobs) {
            lp = ngx_xprec_completion_lp_object();
            if (ctx->echo && ctx->prompt_lp) {
                ngx_xprec_completion_lp(ctx, lp, ctx->echo_ids, ctx->prompt_lp,
                                        (size_t) ctx->n_echo_ids, 1, &offset);
            }
            ngx_xprec_completion_lp(ctx, lp, ctx->lp_tokens, ctx->lps, ctx->n_lps, 0,
                                    &offset);
            cJSON_AddItemToObject(choice, "logprobs", lp);
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }
    }

    cJSON_AddStringToObject(choice, "finish_reason", ngx_xprec_finish_name(ctx->finish));
    cJSON_AddItemToObject(root, "usage", ngx_xprec_usage(ctx));

    return ngx_xprec_send_json(ctx->r, NGX_HTTP_OK, root);
}


/* One stream chunk: text (may be NULL) with this token's logprobs (may be NULL), or the
 * finish reason. */
static ngx_int_t
ngx_xprec_send_chunk(ngx_xprec_ctx_t *ctx, const char *text, size_t len,
    const xp_logprobs *lp, const char *finish, ngx_flag_t role)
{
    cJSON   *root, *choice, *delta, *lpo, *content;
    char    *s;
    int32_t  tok;
    size_t   off = 0;

    root = ngx_xprec_envelope(ctx, ctx->kind == NGX_XPREC_CHAT ? "chat.completion.chunk"
                                                                : "text_completion",
                              &choice);

    s = malloc(len + 1);
    if (s == NULL) {
        cJSON_Delete(root);
        return NGX_ERROR;
    }
    ngx_memcpy(s, text ? text : "", len);
    s[len] = '\0';

    if (ctx->kind == NGX_XPREC_CHAT) {
        delta = cJSON_AddObjectToObject(choice, "delta");
        if (role) {
            cJSON_AddStringToObject(delta, "role", "assistant");
        }
        if (text || role) {
            cJSON_AddStringToObject(delta, "content", s);
        }
        if (lp) {
            lpo = cJSON_AddObjectToObject(choice, "logprobs");
            content = cJSON_AddArrayToObject(lpo, "content");
            cJSON_AddItemToArray(content, ngx_xprec_chat_lp(ctx, lp));
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }

    } else {
        cJSON_AddStringToObject(choice, "text", s);
        if (lp) {
            lpo = ngx_xprec_completion_lp_object();
            tok = lp->chosen.token;
            ngx_xprec_completion_lp(ctx, lpo, &tok, lp, 1, 0, &off);
            cJSON_AddItemToObject(choice, "logprobs", lpo);
        } else {
            cJSON_AddNullToObject(choice, "logprobs");
        }
    }

    free(s);

    if (finish) {
        cJSON_AddStringToObject(choice, "finish_reason", finish);
    } else {
        cJSON_AddNullToObject(choice, "finish_reason");
    }

    if (ctx->include_usage) {
        cJSON_AddNullToObject(root, "usage");
    }

    return ngx_xprec_stream_send(ctx, root);
}


/* The end of a stream: the finish reason, usage when asked for, [DONE]. */
static ngx_int_t
ngx_xprec_stream_end(ngx_xprec_ctx_t *ctx)
{
    cJSON  *root;

    if (ngx_xprec_send_chunk(ctx, NULL, 0, NULL, ngx_xprec_finish_name(ctx->finish), 0)
        != NGX_OK
        && ctx->r->connection->error)
    {
        return NGX_ERROR;
    }

    if (ctx->include_usage) {
        root = ngx_xprec_envelope(ctx, ctx->kind == NGX_XPREC_CHAT ? "chat.completion.chunk"
                                                                    : "text_completion",
                                  NULL);
        cJSON_AddItemToObject(root, "usage", ngx_xprec_usage(ctx));
        if (ngx_xprec_stream_send(ctx, root) == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    return ngx_xprec_stream_raw(ctx, "data: [DONE]\n\n", 14, 1);
}


/* Ends the request: nothing more happens to ctx after this. */
static void
ngx_xprec_finish(ngx_xprec_ctx_t *ctx, ngx_int_t rc)
{
    ngx_http_request_t  *r = ctx->r;

    ctx->finished = 1;

    if (ctx->tick.timer_set) {
        ngx_del_timer(&ctx->tick);
    }

    ngx_http_finalize_request(r, rc);
}


/* A failure: a plain error response, or an SSE error event once the stream has begun. */
static void
ngx_xprec_fail(ngx_xprec_ctx_t *ctx, ngx_uint_t status, const char *type, const char *code,
    const char *msg)
{
    ngx_int_t  rc;

    if (!ctx->headers_sent) {
        ngx_xprec_finish(ctx, ngx_xprec_send_error(ctx->r, status, type, code, NULL, "%s",
                                                   msg));
        return;
    }

    ngx_log_error(NGX_LOG_INFO, ctx->r->connection->log, 0,
                  "xprec: stream ended by an error: %s", msg);

    rc = ngx_xprec_stream_send(ctx, ngx_xprec_error_object(type, code, NULL, msg));
    if (rc != NGX_ERROR) {
        rc = ngx_xprec_stream_raw(ctx, "data: [DONE]\n\n", 14, 1);
    }

    ngx_xprec_finish(ctx, rc == NGX_ERROR ? NGX_ERROR : NGX_OK);
}


static ngx_int_t
ngx_xprec_append(ngx_xprec_ctx_t *ctx, const char *text, size_t len)
{
    u_char  *t;
    size_t   cap;

    if (ctx->text_len + len > ctx->text_cap) {
        cap = (ctx->text_len + len) * 2 + 256;
        t = realloc(ctx->text, cap);
        if (t == NULL) {
            return NGX_ERROR;
        }
        ctx->text = t;
        ctx->text_cap = cap;
    }

    ngx_memcpy(ctx->text + ctx->text_len, text, len);
    ctx->text_len += len;

    return NGX_OK;
}


static ngx_int_t
ngx_xprec_keep_lp(ngx_xprec_ctx_t *ctx, const xp_logprobs *lp)
{
    xp_logprobs  *l;
    int32_t      *t;
    size_t        cap;

    if (ctx->n_lps == ctx->cap_lps) {
        cap = ctx->cap_lps ? 2 * ctx->cap_lps : 16;
        l = realloc(ctx->lps, cap * sizeof(xp_logprobs));
        if (l == NULL) {
            return NGX_ERROR;
        }
        ctx->lps = l;
        t = realloc(ctx->lp_tokens, cap * sizeof(int32_t));
        if (t == NULL) {
            return NGX_ERROR;
        }
        ctx->lp_tokens = t;
        ctx->cap_lps = cap;
    }

    ctx->lps[ctx->n_lps] = *lp;
    ctx->lp_tokens[ctx->n_lps++] = lp->chosen.token;

    return NGX_OK;
}


/* The echo of a streamed completion: the prompt first, with its logprobs when asked for. */
static ngx_int_t
ngx_xprec_stream_echo(ngx_xprec_ctx_t *ctx)
{
    cJSON   *root, *choice, *lpo;
    char    *echo;
    size_t   len = 0, off = 0;

    echo = ngx_xprec_echo_text(ctx, &len);
    if (echo == NULL) {
        return NGX_ERROR;
    }

    root = ngx_xprec_envelope(ctx, "text_completion", &choice);
    cJSON_AddStringToObject(choice, "text", echo);
    free(echo);

    if (ctx->logprobs && ctx->prompt_lp) {
        lpo = ngx_xprec_completion_lp_object();
        ngx_xprec_completion_lp(ctx, lpo, ctx->echo_ids, ctx->prompt_lp,
                                (size_t) ctx->n_echo_ids, 1, &off);
        cJSON_AddItemToObject(choice, "logprobs", lpo);
    } else {
        cJSON_AddNullToObject(choice, "logprobs");
    }

    cJSON_AddNullToObject(choice, "finish_reason");

    return ngx_xprec_stream_send(ctx, root);
}


/* The request is admitted: a held one starts, a stream sends its headers and first chunk. */
void
ngx_xprec_prompt_ready(ngx_xprec_ctx_t *ctx)
{
    ngx_int_t  rc = NGX_OK;

    if (ctx->req.hold && xp_engine_start(ngx_xprec_worker.engine, ctx->id) != NGX_OK) {
        ngx_xprec_fail(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                       xp_last_error());
        return;
    }

    if (!ctx->stream) {
        return;
    }

    if (ngx_xprec_stream_start(ctx) != NGX_OK) {
        ngx_xprec_finish(ctx, NGX_ERROR);
        return;
    }

    if (ctx->kind == NGX_XPREC_CHAT) {
        rc = ngx_xprec_send_chunk(ctx, "", 0, NULL, NULL, 1);
    } else if (ctx->echo && !ctx->req.prompt_logprobs) {
        rc = ngx_xprec_stream_echo(ctx);
    }

    if (rc == NGX_ERROR) {
        ngx_xprec_finish(ctx, NGX_ERROR);
    }
}


/* Not admitted (a quota, or the quota store unreachable): the held engine request goes, and
 * the client is told why and when to come back. */
void
ngx_xprec_refuse(ngx_xprec_ctx_t *ctx, ngx_uint_t status, const char *type, const char *code,
    const char *msg, ngx_msec_t retry_ms)
{
    ngx_table_elt_t  *h;
    u_char           *p;

    (void) xp_engine_cancel(ngx_xprec_worker.engine, ctx->id);
    ngx_xprec_untrack(ctx);
    if (ngx_xprec_worker.in_flight[ctx->tenant->index]) {
        ngx_xprec_worker.in_flight[ctx->tenant->index]--;
    }
    /* it used nothing: its usage is a refusal with no tokens */
    ctx->prompt_tokens = 0;
    ctx->completion_tokens = 0;

    if (retry_ms) {
        h = ngx_list_push(&ctx->r->headers_out.headers);
        p = ngx_pnalloc(ctx->r->pool, NGX_INT_T_LEN);
        if (h && p) {
            h->hash = 1;
            ngx_str_set(&h->key, "Retry-After");
            h->value.data = p;
            h->value.len = ngx_sprintf(p, "%M", (retry_ms + 999) / 1000) - p;
        }
    }

    ngx_xprec_fail(ctx, status, type, code, msg);
}


void
ngx_xprec_on_event(ngx_xprec_ctx_t *ctx, xp_event *ev)
{
    ngx_int_t  rc = NGX_OK;

    switch (ev->type) {

    case XP_EV_PROMPT:
        ctx->prompted = 1;
        ctx->prompt_tokens = ev->prompt_tokens;

        if (ctx->echo) {
            ctx->echo_ids = ev->prompt_ids;
            ctx->n_echo_ids = ev->prompt_tokens;
            ev->prompt_ids = NULL;
        }

        /* its size is known now: the quota step admits it, or refuses it, or answers later */
        rc = ngx_xprec_quota_admit(ctx);
        if (rc == NGX_OK) {
            ngx_xprec_prompt_ready(ctx);
        } else if (rc == NGX_ERROR) {
            ngx_xprec_fail(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                           "out of memory");
        }
        return;

    case XP_EV_PROMPT_LOGPROBS:
        free(ctx->prompt_lp);
        ctx->prompt_lp = ev->prompt_logprobs;
        ev->prompt_logprobs = NULL;

        if (ctx->stream && ctx->echo) {
            rc = ngx_xprec_stream_echo(ctx);
        }
        break;

    case XP_EV_TOKEN:
        if (ctx->t_first == 0) {
            ctx->t_first = ngx_current_msec ? ngx_current_msec : 1;
        }

        if (ctx->stream) {
            rc = ngx_xprec_send_chunk(ctx, ev->text_len ? ev->text : NULL, ev->text_len,
                                      ev->logprobs, NULL, 0);
            break;
        }

        if ((ev->text_len && ngx_xprec_append(ctx, ev->text, ev->text_len) != NGX_OK)
            || (ev->logprobs && ngx_xprec_keep_lp(ctx, ev->logprobs) != NGX_OK))
        {
            rc = NGX_ERROR;
        }
        break;

    case XP_EV_DONE:
        ctx->prompt_tokens = ev->prompt_tokens;
        ctx->completion_tokens = ev->completion_tokens;
        ctx->finish = ev->finish;

        if (ev->finish == XP_FINISH_CANCELLED) {
            /* not by this request's client (its cleanup would have untracked it) */
            ngx_xprec_fail(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "server_error",
                           "server_shutting_down", "the engine stopped this request");
            return;
        }

        if (ctx->stream) {
            if (ev->text_len) {
                rc = ngx_xprec_send_chunk(ctx, ev->text, ev->text_len, NULL, NULL, 0);
            }
            if (rc != NGX_ERROR) {
                rc = ngx_xprec_stream_end(ctx);
            }
            ngx_xprec_finish(ctx, rc == NGX_ERROR ? NGX_ERROR : NGX_OK);
            return;
        }

        if (ev->text_len && ngx_xprec_append(ctx, ev->text, ev->text_len) != NGX_OK) {
            ngx_xprec_finish(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }

        ngx_xprec_finish(ctx, ngx_xprec_send_whole(ctx));
        return;

    case XP_EV_ERROR:
        ctx->finished = 1; /* nothing to cancel */
        if (!ctx->prompted) {
            /* refused before it ran: the request itself cannot be served */
            ngx_xprec_fail(ctx, NGX_HTTP_BAD_REQUEST, "invalid_request_error",
                           ngx_strstr(ev->error, "context") ? "context_length_exceeded"
                                                            : NULL,
                           ev->error);
        } else {
            ngx_xprec_fail(ctx, NGX_HTTP_INTERNAL_SERVER_ERROR, "server_error", NULL,
                           ev->error);
        }
        return;
    }

    if (rc == NGX_ERROR) {
        /* the client cannot be written to any more */
        ngx_xprec_finish(ctx, NGX_ERROR);
    }
}


static void
ngx_xprec_tick(ngx_event_t *ev)
{
    ngx_xprec_ctx_t        *ctx = ev->data;
    ngx_xprec_main_conf_t  *mcf;
    ngx_table_elt_t        *h;

    if (ngx_xprec_shutdown_due((ngx_cycle_t *) ngx_cycle)) {
        ngx_xprec_fail(ctx, NGX_HTTP_SERVICE_UNAVAILABLE, "server_error",
                       "server_shutting_down",
                       "the server is shutting down (worker_shutdown_timeout)");
        return;
    }

    ngx_xprec_quota_tick(ctx);

    if (ctx->waiting) {
        mcf = ngx_http_get_module_main_conf(ctx->r, ngx_xprec_module);

        if (ngx_current_msec - ctx->t_start >= mcf->start_wait) {
            ngx_queue_remove(&ctx->wait);
            ctx->waiting = 0;

            h = ngx_list_push(&ctx->r->headers_out.headers);
            if (h != NULL) {
                h->hash = 1;
                ngx_str_set(&h->key, "Retry-After");
                ngx_str_set(&h->value, "5");
            }

            ngx_xprec_start_failed(ctx);
            return;
        }
    }

    ngx_add_timer(ev, NGX_XPREC_TICK);
}


/* ------------------------------------------------------------------ errors nginx makes */

/* error_page ... = @xprec_error: nginx's own refusals (an oversize body, a URI too long)
 * answered in OpenAI's format too. */
ngx_int_t
ngx_xprec_error_handler(ngx_http_request_t *r)
{
    ngx_uint_t   status = r->err_status ? r->err_status : r->headers_out.status;
    const char  *msg, *type = "invalid_request_error";

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    switch (status) {
    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        msg = "the request body is larger than this endpoint accepts";
        break;
    case NGX_HTTP_REQUEST_URI_TOO_LARGE:
        msg = "the request URI is too long";
        break;
    case NGX_HTTP_REQUEST_HEADER_TOO_LARGE:
        /* nginx's own code; on the wire it is a 400 */
        status = NGX_HTTP_BAD_REQUEST;
        msg = "the request headers are too large";
        break;
    case NGX_HTTP_LENGTH_REQUIRED:
        msg = "a request body needs Content-Length or chunked transfer encoding";
        break;
    case NGX_HTTP_REQUEST_TIME_OUT:
        msg = "the request was not received in time";
        break;
    case NGX_HTTP_NOT_FOUND:
        msg = "not found";
        break;
    case NGX_HTTP_NOT_ALLOWED:
        msg = "method not allowed";
        break;
    case NGX_HTTP_FORBIDDEN:
        msg = "forbidden";
        break;
    case NGX_HTTP_BAD_REQUEST:
        msg = "the request could not be parsed";
        break;
    default:
        if (status < 400) {
            status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        msg = status >= 500 ? "the server could not handle the request"
                            : "the request was refused";
        type = status >= 500 ? "server_error" : type;
        break;
    }

    return ngx_xprec_send_error(r, status, type, NULL, NULL, "%s", msg);
}
