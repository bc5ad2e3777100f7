/*
 * The module and its directives. Everything an operator writes is checked here, at nginx -t,
 * with the directive's file and line: the base checkpoint and each adapter are validated
 * against each other (headers and configs only; no weights are loaded in the master), tenant
 * keys are parsed, and model names are resolved.
 */

#include "ngx_xprec.h"


static void *ngx_xprec_create_main_conf(ngx_conf_t *cf);
static char *ngx_xprec_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_xprec_create_loc_conf(ngx_conf_t *cf);
static char *ngx_xprec_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child);
static ngx_int_t ngx_xprec_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_xprec_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_xprec_init_process(ngx_cycle_t *cycle);
static void ngx_xprec_exit_process(ngx_cycle_t *cycle);

static char *ngx_xprec_engine(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_xprec_adapter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_xprec_tenant(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_xprec_admin_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_xprec_location(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_xprec_redis_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);


static ngx_command_t  ngx_xprec_commands[] = {

    { ngx_string("xprec_engine"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_xprec_engine,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("xprec_adapter"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE23,
      ngx_xprec_adapter,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("xprec_tenant"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_xprec_tenant,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("xprec_admin_key_sha256"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_xprec_admin_key,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("xprec_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_xprec_redis_conf,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("xprec_openai"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_xprec_location,
      NGX_HTTP_LOC_CONF_OFFSET,
      NGX_XPREC_LOC_OPENAI,
      NULL },

    { ngx_string("xprec_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_xprec_location,
      NGX_HTTP_LOC_CONF_OFFSET,
      NGX_XPREC_LOC_ADMIN,
      NULL },

    { ngx_string("xprec_error"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_xprec_location,
      NGX_HTTP_LOC_CONF_OFFSET,
      NGX_XPREC_LOC_ERROR,
      NULL },

    { ngx_string("xprec_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_xprec_location,
      NGX_HTTP_LOC_CONF_OFFSET,
      NGX_XPREC_LOC_METRICS,
      NULL },

    { ngx_string("xprec_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_xprec_loc_conf_t, max_tokens),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_xprec_module_ctx = {
    ngx_xprec_preconfiguration,            /* preconfiguration */
    NULL,                                  /* postconfiguration */

    ngx_xprec_create_main_conf,            /* create main configuration */
    ngx_xprec_init_main_conf,              /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_xprec_create_loc_conf,             /* create location configuration */
    ngx_xprec_merge_loc_conf               /* merge location configuration */
};


ngx_module_t  ngx_xprec_module = {
    NGX_MODULE_V1,
    &ngx_xprec_module_ctx,                 /* module context */
    ngx_xprec_commands,                    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_xprec_init_module,                 /* init module */
    ngx_xprec_init_process,                /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_xprec_exit_process,                /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static void *
ngx_xprec_create_main_conf(ngx_conf_t *cf)
{
    ngx_xprec_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_xprec_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&mcf->adapters, cf->pool, 4,
                       sizeof(ngx_xprec_adapter_conf_t))
        != NGX_OK
        || ngx_array_init(&mcf->tenants, cf->pool, 4,
                          sizeof(ngx_xprec_tenant_t))
           != NGX_OK)
    {
        return NULL;
    }

    return mcf;
}


/* a NUL-terminated copy from the configuration pool */
static u_char *
ngx_xprec_cstr(ngx_conf_t *cf, u_char *data, size_t len)
{
    u_char  *p;

    p = ngx_pnalloc(cf->pool, len + 1);
    if (p == NULL) {
        return NULL;
    }

    ngx_memcpy(p, data, len);
    p[len] = '\0';

    return p;
}


/* names the API shows: letters, digits and . _ - : / */
static ngx_int_t
ngx_xprec_name_ok(ngx_str_t *s)
{
    size_t  i;

    if (s->len == 0 || s->len > 120) {
        return NGX_ERROR;
    }

    for (i = 0; i < s->len; i++) {
        u_char c = s->data[i];

        if (!ngx_xprec_name_char(c))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_xprec_onoff(ngx_str_t *v, ngx_flag_t *out)
{
    if (v->len == 2 && ngx_strncmp(v->data, "on", 2) == 0) {
        *out = 1;
        return NGX_OK;
    }

    if (v->len == 3 && ngx_strncmp(v->data, "off", 3) == 0) {
        *out = 0;
        return NGX_OK;
    }

    return NGX_ERROR;
}


/* "key=value": *val gets what follows '=' when the argument starts with key= */
static ngx_flag_t
ngx_xprec_opt(ngx_str_t *arg, const char *key, ngx_str_t *val)
{
    size_t  n = ngx_strlen(key);

    if (arg->len <= n || ngx_strncmp(arg->data, key, n) != 0
        || arg->data[n] != '=')
    {
        return 0;
    }

    val->data = arg->data + n + 1;
    val->len = arg->len - n - 1;

    return 1;
}


static char *
ngx_xprec_engine(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_str_t   *value, v, dir;
    ngx_uint_t   i;
    ngx_int_t    n;
    u_char      *p;

    if (mcf->enabled) {
        return "is duplicate";
    }

    value = cf->args->elts;
    mcf->enabled = 1;
    mcf->engine_file = cf->conf_file->file.name.data;
    mcf->engine_line = cf->conf_file->line;
    mcf->threads = 0;
    mcf->max_batch = 0;
    mcf->max_adapters = 0;
    mcf->prefill_chunk = 0;
    mcf->device = 0;
    mcf->kv_cache = 0;
    mcf->per_worker = 0;
    mcf->exclusive = NGX_CONF_UNSET;
    mcf->start_wait = 30000;
    ngx_str_set(&mcf->backend, "cpu");
    ngx_str_null(&mcf->model_name);
    ngx_str_null(&mcf->lock_file);

    dir = value[1];
    if (ngx_conf_full_name(cf->cycle, &dir, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_xprec_opt(&value[i], "backend", &v)) {
            if (!(v.len == 3 && ngx_strncmp(v.data, "cpu", 3) == 0)
                && !(v.len == 4 && ngx_strncmp(v.data, "cuda", 4) == 0)
                && !(v.len == 4 && ngx_strncmp(v.data, "auto", 4) == 0))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "backend=\"%V\": expected cpu, cuda or auto",
                                   &v);
                return NGX_CONF_ERROR;
            }
            mcf->backend = v;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "name", &v)) {
            if (ngx_xprec_name_ok(&v) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "name=\"%V\": 1 to 120 letters, digits or "
                                   "._-:/", &v);
                return NGX_CONF_ERROR;
            }
            mcf->model_name = v;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "kv_cache", &v)) {
            ssize_t sz = ngx_parse_size(&v);
            if (sz <= 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "kv_cache=\"%V\": expected a size such as "
                                   "256m or 4g", &v);
                return NGX_CONF_ERROR;
            }
            mcf->kv_cache = (size_t) sz;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "start_wait", &v)) {
            ngx_msec_t t = ngx_parse_time(&v, 0);
            if (t == (ngx_msec_t) NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "start_wait=\"%V\": expected a time such as "
                                   "30s", &v);
                return NGX_CONF_ERROR;
            }
            mcf->start_wait = t;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "per_worker", &v)
            || ngx_xprec_opt(&value[i], "exclusive", &v))
        {
            ngx_flag_t  f;

            if (ngx_xprec_onoff(&v, &f) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"%V\": expected on or off", &value[i]);
                return NGX_CONF_ERROR;
            }
            if (value[i].data[0] == 'p') {
                mcf->per_worker = f;
            } else {
                mcf->exclusive = f;
            }
            continue;
        }

        if (ngx_xprec_opt(&value[i], "lock_file", &v)) {
            if (ngx_conf_full_name(cf->cycle, &v, 0) != NGX_OK) {
                return NGX_CONF_ERROR;
            }
            mcf->lock_file.data = ngx_xprec_cstr(cf, v.data, v.len);
            mcf->lock_file.len = v.len;
            if (mcf->lock_file.data == NULL) {
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if (ngx_xprec_opt(&value[i], "devices", &v)) {
            /* one engine drives one device: a list of one index */
            n = ngx_atoi(v.data, v.len);
            if (n == NGX_ERROR || n > 255) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "devices=\"%V\": one device index (0..255); "
                                   "an engine drives a single GPU", &v);
                return NGX_CONF_ERROR;
            }
            mcf->device = n;
            continue;
        }

        {
            static const struct {
                const char  *key;
                ngx_int_t    min, max;
                size_t       off;
            } nums[] = {
                { "threads", 1, 1024, offsetof(ngx_xprec_main_conf_t, threads) },
                { "max_batch", 1, 4096,
                  offsetof(ngx_xprec_main_conf_t, max_batch) },
                { "max_adapters", 1, 1024,
                  offsetof(ngx_xprec_main_conf_t, max_adapters) },
                { "prefill_chunk", 1, 65536,
                  offsetof(ngx_xprec_main_conf_t, prefill_chunk) },
            };
            ngx_uint_t  k;

            for (k = 0; k < sizeof(nums) / sizeof(nums[0]); k++) {
                if (ngx_xprec_opt(&value[i], nums[k].key, &v)) {
                    break;
                }
            }

            if (k == sizeof(nums) / sizeof(nums[0])) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "unknown parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            n = ngx_atoi(v.data, v.len);
            if (n == NGX_ERROR || n < nums[k].min || n > nums[k].max) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "%s=\"%V\": expected an integer in [%i, %i]",
                                   nums[k].key, &v, nums[k].min, nums[k].max);
                return NGX_CONF_ERROR;
            }
            *(ngx_int_t *) ((u_char *) mcf + nums[k].off) = n;
        }
    }

    mcf->backend.data = ngx_xprec_cstr(cf, mcf->backend.data, mcf->backend.len);
    mcf->model_dir.data = ngx_xprec_cstr(cf, dir.data, dir.len);
    mcf->model_dir.len = dir.len;
    if (mcf->backend.data == NULL || mcf->model_dir.data == NULL) {
        return NGX_CONF_ERROR;
    }

    if (mcf->model_name.len == 0) {
        /* the directory's last component */
        p = dir.data + dir.len;
        while (p > dir.data && p[-1] == '/') {
            p--;
        }
        v.len = 0;
        while (p > dir.data && p[-1] != '/') {
            p--;
            v.len++;
        }
        v.data = p;
        if (ngx_xprec_name_ok(&v) != NGX_OK) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "the directory name \"%V\" cannot be a model id; "
                               "give name=", &v);
            return NGX_CONF_ERROR;
        }
        mcf->model_name = v;
    }

    if (mcf->exclusive == NGX_CONF_UNSET) {
        /* a GPU holds one base at a time: a reload waits for the old engine */
        mcf->exclusive = ngx_strcmp(mcf->backend.data, "cpu") != 0;
    }

    if (mcf->lock_file.len == 0) {
        u_char  buf[64];

        p = ngx_snprintf(buf, sizeof(buf), "/tmp/xprec-engine-%s-%i.lock",
                         mcf->backend.data, mcf->device);
        mcf->lock_file.len = p - buf;
        mcf->lock_file.data = ngx_xprec_cstr(cf, buf, p - buf);
        if (mcf->lock_file.data == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (xp_model_check((const char *) mcf->model_dir.data, &mcf->info) < 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "model \"%V\": %s", &dir,
                           xp_last_error());
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_xprec_adapter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_str_t                 *value, dir;
    ngx_uint_t                 i;
    ngx_xprec_adapter_conf_t  *a;
    int                        rank;

    value = cf->args->elts;

    if (!mcf->enabled) {
        return "needs xprec_engine before it (adapters are checked against the base)";
    }

    if (ngx_xprec_name_ok(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "adapter name \"%V\": 1 to 120 letters, digits or "
                           "._-:/", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (value[1].len == mcf->model_name.len
        && ngx_strncmp(value[1].data, mcf->model_name.data, value[1].len) == 0)
    {
        return "names the base model";
    }

    a = mcf->adapters.elts;
    for (i = 0; i < mcf->adapters.nelts; i++) {
        if (a[i].name.len == value[1].len
            && ngx_strncmp(a[i].name.data, value[1].data, value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "adapter \"%V\" is already defined", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    a = ngx_array_push(&mcf->adapters);
    if (a == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(a, sizeof(ngx_xprec_adapter_conf_t));
    a->name = value[1];

    if (cf->args->nelts == 4) {
        if (!(value[3].len == 6 && ngx_strncmp(value[3].data, "pinned", 6) == 0)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unknown parameter \"%V\" (only \"pinned\")",
                               &value[3]);
            return NGX_CONF_ERROR;
        }
        a->pinned = 1;
    }

    dir = value[2];
    if (ngx_conf_full_name(cf->cycle, &dir, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    a->dir.data = ngx_xprec_cstr(cf, dir.data, dir.len);
    a->dir.len = dir.len;
    if (a->dir.data == NULL) {
        return NGX_CONF_ERROR;
    }

    if (xp_adapter_check((const char *) mcf->model_dir.data,
                         (const char *) a->dir.data, &rank)
        < 0)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "adapter \"%V\": %s",
                           &value[1], xp_last_error());
        return NGX_CONF_ERROR;
    }

    a->rank = rank;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_xprec_parse_hex_key(ngx_str_t *hex, u_char *out)
{
    ngx_uint_t  i;
    ngx_int_t   hi, lo;

    if (hex->len != 2 * NGX_XPREC_KEY_LEN) {
        return NGX_ERROR;
    }

    for (i = 0; i < NGX_XPREC_KEY_LEN; i++) {
        hi = ngx_hextoi(&hex->data[2 * i], 1);
        lo = ngx_hextoi(&hex->data[2 * i + 1], 1);
        if (hi == NGX_ERROR || lo == NGX_ERROR) {
            return NGX_ERROR;
        }
        out[i] = (u_char) (hi << 4 | lo);
    }

    return NGX_OK;
}


static char *
ngx_xprec_tenant(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_str_t           *value, v, *m;
    ngx_uint_t           i, j, models_given = 0;
    ngx_xprec_tenant_t  *t, *all;
    u_char              *key, *p, *q, *end;

    value = cf->args->elts;

    if (ngx_xprec_name_ok(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "tenant name \"%V\": 1 to 120 letters, digits or "
                           "._-:/", &value[1]);
        return NGX_CONF_ERROR;
    }

    all = mcf->tenants.elts;
    for (i = 0; i < mcf->tenants.nelts; i++) {
        if (all[i].name.len == value[1].len
            && ngx_strncmp(all[i].name.data, value[1].data, value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "tenant \"%V\" is already defined", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    t = ngx_array_push(&mcf->tenants);
    if (t == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(t, sizeof(ngx_xprec_tenant_t));
    t->name = value[1];
    t->index = mcf->tenants.nelts - 1;

    if (ngx_array_init(&t->keys, cf->pool, 2, NGX_XPREC_KEY_LEN) != NGX_OK
        || ngx_array_init(&t->models, cf->pool, 4, sizeof(ngx_str_t)) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_xprec_opt(&value[i], "key_sha256", &v)) {
            key = ngx_array_push(&t->keys);
            if (key == NULL) {
                return NGX_CONF_ERROR;
            }
            if (ngx_xprec_parse_hex_key(&v, key) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "key_sha256 must be 64 hexadecimal digits "
                                   "(the SHA-256 of the key: xprec keyhash)");
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if (ngx_xprec_opt(&value[i], "models", &v)) {
            models_given = 1;
            if (v.len == 1 && v.data[0] == '*') {
                t->all_models = 1;
                continue;
            }
            p = v.data;
            end = v.data + v.len;
            while (p <= end) {
                q = ngx_strlchr(p, end, ',');
                if (q == NULL) {
                    q = end;
                }
                m = ngx_array_push(&t->models);
                if (m == NULL) {
                    return NGX_CONF_ERROR;
                }
                m->data = p;
                m->len = q - p;
                if (ngx_xprec_name_ok(m) != NGX_OK) {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "models=\"%V\": a comma-separated list of "
                                       "model names, or *", &v);
                    return NGX_CONF_ERROR;
                }
                p = q + 1;
            }
            continue;
        }

        {
            static const struct {
                const char  *key;
                size_t       off;
            } quotas[] = {
                { "rpm", offsetof(ngx_xprec_tenant_t, rpm) },
                { "tpm", offsetof(ngx_xprec_tenant_t, tpm) },
                { "tokens_per_day", offsetof(ngx_xprec_tenant_t, tokens_per_day) },
                { "max_concurrent", offsetof(ngx_xprec_tenant_t, max_concurrent) },
            };
            ngx_uint_t  k;
            ngx_int_t   n;

            for (k = 0; k < sizeof(quotas) / sizeof(quotas[0]); k++) {
                if (ngx_xprec_opt(&value[i], quotas[k].key, &v)) {
                    break;
                }
            }

            if (k == sizeof(quotas) / sizeof(quotas[0])) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "unknown parameter \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            n = ngx_atoi(v.data, v.len);
            if (n == NGX_ERROR || n < 1 || n > 1000000000000LL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "%s=\"%V\": expected a positive integer",
                                   quotas[k].key, &v);
                return NGX_CONF_ERROR;
            }
            *(ngx_uint_t *) ((u_char *) t + quotas[k].off) = (ngx_uint_t) n;
        }
    }

    if (t->keys.nelts == 0) {
        return "needs at least one key_sha256=";
    }

    if (!models_given) {
        return "needs models= (a list of model names, or *)";
    }

    /* a key names one tenant */
    all = mcf->tenants.elts;
    for (i = 0; i < t->keys.nelts; i++) {
        u_char *k = (u_char *) t->keys.elts + i * NGX_XPREC_KEY_LEN;

        for (j = 0; j + 1 < mcf->tenants.nelts; j++) {
            ngx_uint_t  x;

            for (x = 0; x < all[j].keys.nelts; x++) {
                if (ngx_memcmp(k, (u_char *) all[j].keys.elts
                                  + x * NGX_XPREC_KEY_LEN,
                               NGX_XPREC_KEY_LEN)
                    == 0)
                {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "a key of tenant \"%V\" is also tenant "
                                       "\"%V\"'s", &t->name, &all[j].name);
                    return NGX_CONF_ERROR;
                }
            }
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_xprec_admin_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_str_t  *value = cf->args->elts;

    if (mcf->has_admin_key) {
        return "is duplicate";
    }

    if (ngx_xprec_parse_hex_key(&value[1], mcf->admin_key) != NGX_OK) {
        return "needs 64 hexadecimal digits (the SHA-256 of the key: xprec keyhash)";
    }

    mcf->has_admin_key = 1;

    return NGX_CONF_OK;
}


/* xprec_redis ADDR:PORT|unix:PATH [password=...] [db=N] [timeout=MS] [on_error=allow|deny]
 * [node=NAME]: an address by IP (hiredis would resolve a name with a blocking call). */
static char *
ngx_xprec_redis_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_str_t   *value, v, host;
    ngx_uint_t   i;
    ngx_int_t    n;
    u_char      *colon, buf[NGX_SOCKADDR_STRLEN];
    struct in6_addr  a6;

    if (mcf->redis) {
        return "is duplicate";
    }

    value = cf->args->elts;
    mcf->redis = 1;
    mcf->redis_timeout = 1000;
    mcf->redis_db = 0;
    mcf->redis_deny = 0;

    if (value[1].len > 5 && ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        mcf->redis_unix = ngx_xprec_cstr(cf, value[1].data + 5, value[1].len - 5);
        if (mcf->redis_unix == NULL) {
            return NGX_CONF_ERROR;
        }

    } else {
        colon = ngx_strlchr(value[1].data, value[1].data + value[1].len, ']');
        colon = ngx_strlchr(colon ? colon : value[1].data, value[1].data + value[1].len, ':');
        while (colon && ngx_strlchr(colon + 1, value[1].data + value[1].len, ':')) {
            colon = ngx_strlchr(colon + 1, value[1].data + value[1].len, ':');
        }
        if (colon == NULL) {
            return "needs ADDR:PORT or unix:PATH";
        }

        host.data = value[1].data;
        host.len = colon - value[1].data;
        if (host.len > 2 && host.data[0] == '[' && host.data[host.len - 1] == ']') {
            host.data++;
            host.len -= 2;
        }

        n = ngx_atoi(colon + 1, value[1].data + value[1].len - colon - 1);
        if (n < 1 || n > 65535) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": bad port", &value[1]);
            return NGX_CONF_ERROR;
        }
        mcf->redis_port = n;

        if (host.len >= sizeof(buf)
            || (ngx_inet_addr(host.data, host.len) == INADDR_NONE
                && ngx_inet6_addr(host.data, host.len, a6.s6_addr) != NGX_OK))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"%V\": an IP address is needed (a name would be resolved "
                               "with a blocking call)", &host);
            return NGX_CONF_ERROR;
        }

        mcf->redis_host = ngx_xprec_cstr(cf, host.data, host.len);
        if (mcf->redis_host == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_xprec_opt(&value[i], "password", &v)) {
            mcf->redis_password.data = ngx_xprec_cstr(cf, v.data, v.len);
            mcf->redis_password.len = v.len;
            if (mcf->redis_password.data == NULL) {
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if (ngx_xprec_opt(&value[i], "db", &v)) {
            n = ngx_atoi(v.data, v.len);
            if (n == NGX_ERROR || n > 1000000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "db=\"%V\": a database number", &v);
                return NGX_CONF_ERROR;
            }
            mcf->redis_db = n;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "timeout", &v)) {
            n = ngx_atoi(v.data, v.len);
            if (n < 1 || n > 60000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "timeout=\"%V\": milliseconds, 1 to 60000", &v);
                return NGX_CONF_ERROR;
            }
            mcf->redis_timeout = (ngx_msec_t) n;
            continue;
        }

        if (ngx_xprec_opt(&value[i], "on_error", &v)) {
            if (v.len == 5 && ngx_strncmp(v.data, "allow", 5) == 0) {
                mcf->redis_deny = 0;
            } else if (v.len == 4 && ngx_strncmp(v.data, "deny", 4) == 0) {
                mcf->redis_deny = 1;
            } else {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "on_error=\"%V\": expected allow or deny", &v);
                return NGX_CONF_ERROR;
            }
            continue;
        }

        if (ngx_xprec_opt(&value[i], "node", &v)) {
            if (ngx_xprec_name_ok(&v) != NGX_OK) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "node=\"%V\": 1 to 120 letters, digits or ._-:/", &v);
                return NGX_CONF_ERROR;
            }
            mcf->node = v;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "unknown parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_xprec_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_xprec_main_conf_t  *mcf = conf;

    ngx_uint_t                 i, j, k, found;
    ngx_xprec_tenant_t        *t;
    ngx_xprec_adapter_conf_t  *a;
    ngx_str_t                 *m;

    /* tenants may come before the adapters they name: resolve names now */
    t = mcf->tenants.elts;
    a = mcf->adapters.elts;

    for (i = 0; i < mcf->tenants.nelts; i++) {
        m = t[i].models.elts;

        for (j = 0; j < t[i].models.nelts; j++) {
            found = mcf->enabled && m[j].len == mcf->model_name.len
                    && ngx_strncmp(m[j].data, mcf->model_name.data, m[j].len) == 0;

            for (k = 0; !found && k < mcf->adapters.nelts; k++) {
                found = a[k].name.len == m[j].len
                        && ngx_strncmp(a[k].name.data, m[j].data, m[j].len) == 0;
            }

            if (!found) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "xprec_tenant \"%V\": model \"%V\" is neither the "
                              "base (\"%V\") nor an xprec_adapter",
                              &t[i].name, &m[j], &mcf->model_name);
                return NGX_CONF_ERROR;
            }
        }
    }

    if (mcf->tenants.nelts && !mcf->enabled) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "xprec_tenant needs an xprec_engine");
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < mcf->tenants.nelts && !mcf->redis; i++) {
        if (ngx_xprec_tenant_limited(&t[i])) {
            ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                          "xprec_tenant \"%V\" has limits, which are enforced only with "
                          "xprec_redis", &t[i].name);
        }
    }

    if (mcf->node.len == 0) {
        /* this gateway's name in the fleet: the host's */
        mcf->node.data = (u_char *) cf->cycle->hostname.data;
        mcf->node.len = cf->cycle->hostname.len;
    }

    return NGX_CONF_OK;
}


static void *
ngx_xprec_create_loc_conf(ngx_conf_t *cf)
{
    ngx_xprec_loc_conf_t  *lcf;

    lcf = ngx_pcalloc(cf->pool, sizeof(ngx_xprec_loc_conf_t));
    if (lcf == NULL) {
        return NULL;
    }

    lcf->max_tokens = NGX_CONF_UNSET;

    return lcf;
}


static char *
ngx_xprec_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_xprec_loc_conf_t  *prev = parent;
    ngx_xprec_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->max_tokens, prev->max_tokens, 0);

    if (conf->max_tokens < 0 || conf->max_tokens > 1 << 24) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "xprec_max_tokens must be between 1 and 16777216");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_xprec_location(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_xprec_loc_conf_t  *lcf = conf;

    ngx_http_core_loc_conf_t  *clcf;
    ngx_xprec_main_conf_t     *mcf;

    if (lcf->handler != NGX_XPREC_LOC_NONE) {
        return "is duplicate (one xprec handler per location)";
    }

    mcf = ngx_http_conf_get_module_main_conf(cf, ngx_xprec_module);

    if (cmd->offset != NGX_XPREC_LOC_ERROR && !mcf->enabled) {
        return "needs xprec_engine in the http block before it";
    }

    lcf->handler = cmd->offset;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = cmd->offset == NGX_XPREC_LOC_ADMIN ? ngx_xprec_admin_handler
                    : cmd->offset == NGX_XPREC_LOC_ERROR ? ngx_xprec_error_handler
                    : cmd->offset == NGX_XPREC_LOC_METRICS ? ngx_xprec_metrics_handler
                    : ngx_xprec_openai_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_xprec_preconfiguration(ngx_conf_t *cf)
{
    return ngx_xprec_add_variables(cf);
}


/* Each worker with a GPU engine would load its own base: refuse more than one, and on the
 * CPU ask the operator to say that one engine per worker is meant. */
static ngx_int_t
ngx_xprec_init_module(ngx_cycle_t *cycle)
{
    ngx_xprec_main_conf_t  *mcf;
    ngx_core_conf_t        *ccf;

    mcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_xprec_module);
    if (mcf == NULL || !mcf->enabled) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (ccf->master && ccf->worker_processes > 1) {
        if (ngx_strcmp(mcf->backend.data, "cpu") != 0) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                          "xprec_engine in %s:%ui: backend=%s needs "
                          "\"worker_processes 1;\" (each of the %i workers "
                          "would load its own copy of the base onto the GPU)",
                          mcf->engine_file, mcf->engine_line,
                          mcf->backend.data, ccf->worker_processes);
            return NGX_ERROR;
        }

        if (!mcf->per_worker) {
            ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                          "xprec_engine in %s:%ui: %i worker processes would "
                          "each run an engine; set \"worker_processes 1;\", or "
                          "per_worker=on to run one per worker over the shared "
                          "weights", mcf->engine_file, mcf->engine_line,
                          ccf->worker_processes);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_xprec_init_process(ngx_cycle_t *cycle)
{
    /* workers only: not the cache manager and loader, which share this hook */
    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return NGX_OK;
    }

    return ngx_xprec_init_worker(cycle);
}


static void
ngx_xprec_exit_process(ngx_cycle_t *cycle)
{
    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE) {
        return;
    }

    ngx_xprec_exit_worker(cycle);
}
