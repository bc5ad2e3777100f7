/*
 * API keys and model permissions. Only SHA-256 hashes of keys are stored; a request's key is
 * hashed and compared with every configured hash in constant time (OpenSSL's CRYPTO_memcmp,
 * and no early exit), so neither the timing nor the order of tenants tells anything.
 */

#include "ngx_xprec.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>


void
ngx_xprec_sha256(const u_char *data, size_t len, u_char *out)
{
    unsigned int  n = NGX_XPREC_KEY_LEN;

    EVP_Digest(data, len, out, &n, EVP_sha256(), NULL);
}


/* The key of "Authorization: Bearer KEY"; NGX_DECLINED when there is none. */
static ngx_int_t
ngx_xprec_bearer(ngx_http_request_t *r, ngx_str_t *key)
{
    ngx_table_elt_t  *h = r->headers_in.authorization;
    u_char           *p, *end;

    if (h == NULL) {
        return NGX_DECLINED;
    }

    p = h->value.data;
    end = p + h->value.len;

    if (end - p < 7 || ngx_strncasecmp(p, (u_char *) "Bearer ", 7) != 0) {
        return NGX_DECLINED;
    }

    p += 7;
    while (p < end && *p == ' ') {
        p++;
    }
    while (end > p && end[-1] == ' ') {
        end--;
    }

    if (p == end) {
        return NGX_DECLINED;
    }

    key->data = p;
    key->len = end - p;

    return NGX_OK;
}


ngx_xprec_tenant_t *
ngx_xprec_auth(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf)
{
    ngx_str_t            key;
    u_char               hash[NGX_XPREC_KEY_LEN];
    ngx_uint_t           i, k;
    ngx_xprec_tenant_t  *t, *found = NULL;

    if (ngx_xprec_bearer(r, &key) != NGX_OK) {
        return NULL;
    }

    ngx_xprec_sha256(key.data, key.len, hash);

    t = mcf->tenants.elts;
    for (i = 0; i < mcf->tenants.nelts; i++) {
        for (k = 0; k < t[i].keys.nelts; k++) {
            if (CRYPTO_memcmp(hash, (u_char *) t[i].keys.elts + k * NGX_XPREC_KEY_LEN,
                              NGX_XPREC_KEY_LEN)
                == 0)
            {
                found = &t[i];
            }
        }
    }

    return found;
}


ngx_int_t
ngx_xprec_auth_admin(ngx_http_request_t *r, ngx_xprec_main_conf_t *mcf)
{
    ngx_str_t  key;
    u_char     hash[NGX_XPREC_KEY_LEN];

    if (!mcf->has_admin_key || ngx_xprec_bearer(r, &key) != NGX_OK) {
        return NGX_DECLINED;
    }

    ngx_xprec_sha256(key.data, key.len, hash);

    return CRYPTO_memcmp(hash, mcf->admin_key, NGX_XPREC_KEY_LEN) == 0 ? NGX_OK
                                                                    : NGX_DECLINED;
}


static ngx_flag_t
ngx_xprec_str_eq(ngx_str_t *a, const u_char *b, size_t blen)
{
    return a->len == blen && ngx_strncmp(a->data, b, blen) == 0;
}


static ngx_flag_t
ngx_xprec_tenant_lists(ngx_xprec_tenant_t *t, ngx_str_t *model)
{
    ngx_str_t   *m = t->models.elts;
    ngx_uint_t   i;

    if (t->all_models) {
        return 1;
    }

    for (i = 0; i < t->models.nelts; i++) {
        if (ngx_xprec_str_eq(model, m[i].data, m[i].len)) {
            return 1;
        }
    }

    return 0;
}


ngx_int_t
ngx_xprec_model_allowed(ngx_xprec_main_conf_t *mcf, ngx_xprec_tenant_t *t,
    ngx_str_t *model, const char **adapter)
{
    ngx_xprec_adapter_conf_t     *a;
    ngx_xprec_runtime_adapter_t  *ra;
    ngx_uint_t                    i;

    *adapter = NULL;

    if (ngx_xprec_str_eq(model, mcf->model_name.data, mcf->model_name.len)) {
        return ngx_xprec_tenant_lists(t, model);
    }

    a = mcf->adapters.elts;
    for (i = 0; i < mcf->adapters.nelts; i++) {
        if (ngx_xprec_str_eq(model, a[i].name.data, a[i].name.len)) {
            /* the engine knows it by the same name; the caller's model string is
             * NUL-terminated */
            *adapter = (const char *) model->data;
            return ngx_xprec_tenant_lists(t, model);
        }
    }

    ra = ngx_xprec_runtime_find((const char *) model->data, model->len);
    if (ra == NULL || ra->loading || ra->broken) {
        return 0;
    }

    *adapter = ra->name;

    /* loaded without a tenant list: for the tenants that may use every model */
    if (ra->all_tenants || (ra->n_tenants == 0 && t->all_models)) {
        return 1;
    }

    for (i = 0; i < ra->n_tenants; i++) {
        if (ngx_xprec_str_eq(&t->name, (u_char *) ra->tenants[i],
                             ngx_strlen(ra->tenants[i])))
        {
            return 1;
        }
    }

    return 0;
}
