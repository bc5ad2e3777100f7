/*
 * What goes back to the client: whole JSON bodies, OpenAI's error object, and server-sent
 * events. Every SSE event is flushed as it is made; its buffers are recycled once sent, and a
 * client that stops reading is cut off when NGX_XPREC_OUT_LIMIT bytes wait for it, so a slow
 * reader costs bounded memory and never blocks the worker.
 */

#include "ngx_xprec.h"


static ngx_int_t ngx_xprec_arm_writer(ngx_http_request_t *r);


static ngx_int_t
ngx_xprec_send_bytes(ngx_http_request_t *r, ngx_uint_t status, const char *type,
    u_char *data, size_t len)
{
    ngx_buf_t    *b;
    ngx_chain_t   out;
    ngx_int_t     rc;

    r->headers_out.status = status;
    r->headers_out.content_type.len = ngx_strlen(type);
    r->headers_out.content_type.data = (u_char *) type;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = len;

    if (r->method == NGX_HTTP_HEAD) {
        r->header_only = 1;
    }

    b = ngx_create_temp_buf(r->pool, len ? len : 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->last, data, len);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    if (ngx_xprec_quota_headers(r) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_xprec_send_json(ngx_http_request_t *r, ngx_uint_t status, cJSON *body)
{
    char       *s;
    ngx_int_t   rc;

    s = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);

    if (s == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_xprec_send_bytes(r, status, "application/json", (u_char *) s,
                              ngx_strlen(s));
    free(s);

    return rc;
}


cJSON *
ngx_xprec_error_object(const char *type, const char *code, const char *param,
    const char *message)
{
    cJSON  *root, *e;

    root = cJSON_CreateObject();
    e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "message", message);
    cJSON_AddStringToObject(e, "type", type);
    if (param) {
        cJSON_AddStringToObject(e, "param", param);
    } else {
        cJSON_AddNullToObject(e, "param");
    }
    if (code) {
        cJSON_AddStringToObject(e, "code", code);
    } else {
        cJSON_AddNullToObject(e, "code");
    }

    return root;
}


ngx_int_t
ngx_xprec_send_error(ngx_http_request_t *r, ngx_uint_t status, const char *type,
    const char *code, const char *param, const char *fmt, ...)
{
    va_list     args;
    u_char      msg[1024], *p;
    ngx_uint_t  level;

    va_start(args, fmt);
    p = ngx_vslprintf(msg, msg + sizeof(msg) - 1, fmt, args);
    va_end(args);
    *p = '\0';

    /* one line per refused request, for the operator */
    level = status >= 500 ? NGX_LOG_ERR : NGX_LOG_INFO;
    ngx_log_error(level, r->connection->log, 0, "xprec: %ui %s: %s", status,
                  code ? code : type, msg);

    return ngx_xprec_send_json(r, status,
                               ngx_xprec_error_object(type, code, param, (char *) msg));
}


ngx_int_t
ngx_xprec_stream_start(ngx_xprec_ctx_t *ctx)
{
    ngx_http_request_t  *r = ctx->r;
    ngx_table_elt_t     *h;
    ngx_int_t            rc;

    r->headers_out.status = NGX_HTTP_OK;
    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = -1;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-cache");

    /* a proxy in front must pass events on as they come */
    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }
    h->hash = 1;
    ngx_str_set(&h->key, "X-Accel-Buffering");
    ngx_str_set(&h->value, "no");

    if (ngx_xprec_quota_headers(r) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_send_header(r);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        return NGX_ERROR;
    }

    ctx->headers_sent = 1;
    r->write_event_handler = ngx_xprec_stream_writer;

    return NGX_OK;
}


/* The sum of what waits in the busy buffers. */
static size_t
ngx_xprec_unsent(ngx_xprec_ctx_t *ctx)
{
    ngx_chain_t  *cl;
    size_t        n = 0;

    for (cl = ctx->busy; cl; cl = cl->next) {
        n += ngx_buf_size(cl->buf);
    }

    return n;
}


ngx_int_t
ngx_xprec_stream_raw(ngx_xprec_ctx_t *ctx, const char *data, size_t len,
    ngx_flag_t last)
{
    ngx_http_request_t  *r = ctx->r;
    ngx_chain_t         *cl;
    ngx_buf_t           *b;
    ngx_int_t            rc;
    size_t               size;

    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;
    if (b->start == NULL || (size_t) (b->end - b->start) < len) {
        size = len > 1024 ? len : 1024;
        b->start = ngx_palloc(r->pool, size);
        if (b->start == NULL) {
            return NGX_ERROR;
        }
        b->end = b->start + size;
    }

    b->pos = b->start;
    b->last = ngx_cpymem(b->start, data, len);
    b->temporary = 1;
    b->flush = 1;
    b->last_buf = last;
    b->last_in_chain = 1;
    b->tag = (ngx_buf_tag_t) &ngx_xprec_module;

    rc = ngx_http_output_filter(r, cl);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &cl,
                            (ngx_buf_tag_t) &ngx_xprec_module);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    ctx->unsent = ngx_xprec_unsent(ctx);
    if (ctx->unsent > NGX_XPREC_OUT_LIMIT) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "xprec: client is not reading: %uz bytes wait for it",
                      ctx->unsent);
        return NGX_ERROR;
    }

    return ngx_xprec_arm_writer(r);
}


ngx_int_t
ngx_xprec_stream_send(ngx_xprec_ctx_t *ctx, cJSON *chunk)
{
    char       *s;
    size_t      n;
    ngx_int_t   rc;
    u_char     *line;

    s = cJSON_PrintUnformatted(chunk);
    cJSON_Delete(chunk);
    if (s == NULL) {
        return NGX_ERROR;
    }

    n = ngx_strlen(s);
    line = malloc(n + 8);
    if (line == NULL) {
        free(s);
        return NGX_ERROR;
    }

    ngx_memcpy(line, "data: ", 6);
    ngx_memcpy(line + 6, s, n);
    line[n + 6] = '\n';
    line[n + 7] = '\n';
    free(s);

    rc = ngx_xprec_stream_raw(ctx, (char *) line, n + 8, 0);
    free(line);

    return rc;
}


/* After a write that could not finish: wake when the socket takes more, within send_timeout. */
static ngx_int_t
ngx_xprec_arm_writer(ngx_http_request_t *r)
{
    ngx_connection_t          *c = r->connection;
    ngx_event_t               *wev = c->write;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r->main, ngx_http_core_module);

    if (c->buffered) {
        if (!wev->delayed) {
            ngx_add_timer(wev, clcf->send_timeout);
        }
        if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
            return NGX_ERROR;
        }
        return NGX_AGAIN;
    }

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    return NGX_OK;
}


void
ngx_xprec_stream_writer(ngx_http_request_t *r)
{
    ngx_xprec_ctx_t   *ctx;
    ngx_connection_t  *c = r->connection;
    ngx_int_t          rc;

    ctx = ngx_http_get_module_ctx(r, ngx_xprec_module);

    if (c->write->timedout) {
        c->timedout = 1;
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT, "xprec: client timed out");
        ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    rc = ngx_http_output_filter(r, NULL);
    if (ctx) {
        ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, NULL,
                                (ngx_buf_tag_t) &ngx_xprec_module);
        ctx->unsent = ngx_xprec_unsent(ctx);
    }

    if (rc == NGX_ERROR || ngx_xprec_arm_writer(r) == NGX_ERROR) {
        ngx_http_finalize_request(r, NGX_ERROR);
    }
}


char *
ngx_xprec_utf8_fix(const char *s, size_t len)
{
    /* each bad byte becomes U+FFFD (3 bytes) */
    char    *out = malloc(3 * len + 1), *o;
    size_t   i = 0, n;

    if (out == NULL) {
        return NULL;
    }

    o = out;
    while (i < len) {
        n = ngx_xprec_utf8_seq((const u_char *) s + i, len - i);
        if (n) {
            ngx_memcpy(o, s + i, n);
            o += n;
            i += n;
            continue;
        }

        ngx_memcpy(o, "\xef\xbf\xbd", 3);
        o += 3;
        i++;
    }

    *o = '\0';

    return out;
}
