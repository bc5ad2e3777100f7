/*
 * Variables for log_format: $xprec_tenant, $xprec_model, $xprec_prompt_tokens,
 * $xprec_completion_tokens and $xprec_ttft_ms (time to the first token). Empty ("not found")
 * for requests the module did not serve.
 */

#include "ngx_xprec.h"


enum {
    NGX_XPREC_VAR_TENANT,
    NGX_XPREC_VAR_MODEL,
    NGX_XPREC_VAR_PROMPT,
    NGX_XPREC_VAR_COMPLETION,
    NGX_XPREC_VAR_TTFT
};


static ngx_int_t
ngx_xprec_variable(ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_xprec_ctx_t  *ctx;
    u_char           *p;
    ngx_int_t         n;

    ctx = ngx_http_get_module_ctx(r, ngx_xprec_module);
    if (ctx == NULL || (data == NGX_XPREC_VAR_TENANT && ctx->tenant == NULL)
        || (data == NGX_XPREC_VAR_MODEL && ctx->model.len == 0)
        || (data == NGX_XPREC_VAR_TTFT && ctx->t_first == 0))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    if (data == NGX_XPREC_VAR_TENANT) {
        v->data = ctx->tenant->name.data;
        v->len = ctx->tenant->name.len;
        return NGX_OK;
    }

    if (data == NGX_XPREC_VAR_MODEL) {
        v->data = ctx->model.data;
        v->len = ctx->model.len;
        return NGX_OK;
    }

    n = data == NGX_XPREC_VAR_PROMPT ? ctx->prompt_tokens
        : data == NGX_XPREC_VAR_COMPLETION ? ctx->completion_tokens
        : (ngx_int_t) (ctx->t_first - ctx->t_start);

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->data = p;
    v->len = ngx_sprintf(p, "%i", n) - p;

    return NGX_OK;
}


ngx_int_t
ngx_xprec_add_variables(ngx_conf_t *cf)
{
    static ngx_str_t  names[] = {
        ngx_string("xprec_tenant"),
        ngx_string("xprec_model"),
        ngx_string("xprec_prompt_tokens"),
        ngx_string("xprec_completion_tokens"),
        ngx_string("xprec_ttft_ms"),
    };

    ngx_http_variable_t  *var;
    ngx_uint_t            i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        var = ngx_http_add_variable(cf, &names[i], NGX_HTTP_VAR_NOCACHEABLE);
        if (var == NULL) {
            return NGX_ERROR;
        }
        var->get_handler = ngx_xprec_variable;
        var->data = i;
    }

    return NGX_OK;
}
