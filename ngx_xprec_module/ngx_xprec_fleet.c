/*
 * The fleet's shared view, in Redis (see redis/README.md):
 *   - the adapter registry: adapters loaded through the admin API are recorded (name, path,
 *     tenants), so every gateway serves them and they survive restarts; each gateway reads it
 *     every few seconds and loads or drops what changed (nginx.conf's adapters stay
 *     authoritative on their node);
 *   - residency: each gateway publishes, under its node id with a heartbeat, which adapters it
 *     holds in which tier (redis/residency.lua); a dead gateway's entries expire.
 * The engine knows nothing of Redis: this publishes from its stats.
 */

#include "ngx_xprec.h"
#include "ngx_xprec_redis.h"


#define NGX_XPREC_FLEET_PERIOD  2000   /* ms between registry reads and heartbeats */
#define NGX_XPREC_NODE_TTL      10000  /* a node missing this long is gone */


static ngx_event_t              ngx_xprec_fleet_ev;
static ngx_xprec_main_conf_t   *ngx_xprec_fmcf;
static char                     ngx_xprec_node_id[160];
static ngx_flag_t               ngx_xprec_syncing;


const char *
ngx_xprec_fleet_node(void)
{
    return ngx_xprec_node_id;
}


static ngx_flag_t
ngx_xprec_conf_adapter(const char *name)
{
    ngx_xprec_adapter_conf_t  *a = ngx_xprec_fmcf->adapters.elts;
    ngx_uint_t                 i;
    size_t                     n = ngx_strlen(name);

    for (i = 0; i < ngx_xprec_fmcf->adapters.nelts; i++) {
        if (a[i].name.len == n && ngx_strncmp(a[i].name.data, name, n) == 0) {
            return 1;
        }
    }

    return n == ngx_xprec_fmcf->model_name.len
           && ngx_strncmp(ngx_xprec_fmcf->model_name.data, name, n) == 0;
}


static void
ngx_xprec_fleet_ignore(void *data, redisReply *r)
{
}


/* ------------------------------------------------------------------ registry */

/* Recorded in the registry: from now on the registry decides whether it stays. Until then (or
 * when Redis was unreachable) it is this node's alone, and a sync does not drop it. */
static void
ngx_xprec_fleet_recorded(void *data, redisReply *r)
{
    char                         *name = data;
    ngx_xprec_runtime_adapter_t  *a;

    if (name && r && r->type == REDIS_REPLY_INTEGER && !ngx_xprec_worker.exiting) {
        a = ngx_xprec_runtime_find(name, ngx_strlen(name));
        if (a) {
            a->shared = 1;
        }
    } else if (name && !ngx_xprec_worker.exiting) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "xprec: adapter \"%s\" is served by this node only: the registry "
                      "(Redis) did not record it", name);
    }

    free(name);
}

void
ngx_xprec_fleet_loaded(ngx_xprec_runtime_adapter_t *a)
{
    cJSON       *o, *t;
    char        *json;
    const char  *argv[4];
    ngx_uint_t   i;

    if (!ngx_xprec_fmcf->redis) {
        return;
    }

    o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "path", a->dir);
    if (a->all_tenants) {
        cJSON_AddStringToObject(o, "tenants", "*");
    } else if (a->n_tenants) {
        t = cJSON_AddArrayToObject(o, "tenants");
        for (i = 0; i < a->n_tenants; i++) {
            cJSON_AddItemToArray(t, cJSON_CreateString(a->tenants[i]));
        }
    } else {
        cJSON_AddNullToObject(o, "tenants");
    }
    cJSON_AddStringToObject(o, "node", ngx_xprec_node_id);

    json = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (json == NULL) {
        return;
    }

    argv[0] = "HSET";
    argv[1] = NGX_XPREC_REGISTRY;
    argv[2] = a->name;
    argv[3] = json;
    (void) ngx_xprec_redis_command(4, argv, NULL, -1, ngx_xprec_fleet_recorded,
                                   strdup(a->name));
    free(json);
}


void
ngx_xprec_fleet_unloaded(const char *name)
{
    const char  *argv[3];

    if (!ngx_xprec_fmcf->redis) {
        return;
    }

    argv[0] = "HDEL";
    argv[1] = NGX_XPREC_REGISTRY;
    argv[2] = name;
    (void) ngx_xprec_redis_command(3, argv, NULL, -1, ngx_xprec_fleet_ignore, NULL);
}


/* A registry entry this node does not serve yet: load it like an admin load would. */
static void
ngx_xprec_fleet_adopt(const char *name, const char *json)
{
    ngx_xprec_runtime_adapter_t  *a;
    cJSON                        *o, *path, *tenants, *t;

    o = cJSON_Parse(json);
    path = cJSON_GetObjectItemCaseSensitive(o, "path");
    tenants = cJSON_GetObjectItemCaseSensitive(o, "tenants");
    if (!cJSON_IsString(path)) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "xprec: registry entry \"%s\" has no path: %s", name, json);
        cJSON_Delete(o);
        return;
    }

    a = calloc(1, sizeof(*a));
    if (a == NULL || (a->name = strdup(name)) == NULL
        || (a->dir = strdup(path->valuestring)) == NULL)
    {
        goto fail;
    }

    if (cJSON_IsString(tenants) && ngx_strcmp(tenants->valuestring, "*") == 0) {
        a->all_tenants = 1;
    } else if (cJSON_IsArray(tenants)) {
        a->tenants = calloc(cJSON_GetArraySize(tenants) + 1, sizeof(char *));
        if (a->tenants == NULL) {
            goto fail;
        }
        cJSON_ArrayForEach(t, tenants) {
            if (cJSON_IsString(t) && (a->tenants[a->n_tenants] = strdup(t->valuestring))) {
                a->n_tenants++;
            }
        }
    }

    a->ticket = xp_engine_add_adapter_async(ngx_xprec_worker.engine, name, a->dir, 0,
                                            ngx_xprec_worker.queue);
    if (a->ticket == 0) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "xprec: registry adapter \"%s\": %s", name, xp_last_error());
        goto fail;
    }

    ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                  "xprec: loading \"%s\" from the registry (%s)", name, a->dir);
    a->loading = 1;
    a->shared = 1;
    a->next = ngx_xprec_worker.runtime;
    ngx_xprec_worker.runtime = a;
    cJSON_Delete(o);
    return;

fail:

    if (a) {
        ngx_xprec_runtime_free(a);
    }
    cJSON_Delete(o);
}


static void
ngx_xprec_fleet_registry(void *data, redisReply *r)
{
    ngx_xprec_runtime_adapter_t  *a, **p;
    size_t                        i;
    ngx_flag_t                    listed;

    ngx_xprec_syncing = 0;

    if (r == NULL || r->type != REDIS_REPLY_ARRAY || ngx_xprec_worker.exiting
        || ngx_xprec_worker.engine == NULL)
    {
        return;
    }

    /* new entries */
    for (i = 0; i + 1 < r->elements; i += 2) {
        const char *name = r->element[i]->str;

        if (r->element[i]->type != REDIS_REPLY_STRING
            || r->element[i + 1]->type != REDIS_REPLY_STRING || ngx_xprec_conf_adapter(name)
            || ngx_xprec_runtime_find(name, ngx_strlen(name)))
        {
            continue;
        }

        ngx_xprec_fleet_adopt(name, r->element[i + 1]->str);
    }

    /* entries unloaded elsewhere: a shared adapter no longer listed goes here too */
    for (p = &ngx_xprec_worker.runtime; *p; /* void */) {
        a = *p;
        listed = 0;
        for (i = 0; i + 1 < r->elements && !listed; i += 2) {
            listed = r->element[i]->type == REDIS_REPLY_STRING
                     && ngx_strcmp(r->element[i]->str, a->name) == 0;
        }

        if (listed || !a->shared || a->loading) {
            p = &a->next;
            continue;
        }

        ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                      "xprec: \"%s\" left the registry: unloaded", a->name);
        (void) xp_engine_remove_adapter(ngx_xprec_worker.engine, a->name);
        *p = a->next;
        ngx_xprec_runtime_free(a);
    }
}


/* ------------------------------------------------------------------ residency */

static void
ngx_xprec_fleet_publish(void)
{
    xp_adapter_info  *info;
    int               n, k, argc;
    const char      **args;
    char            (*vals)[96];
    char              now[32], ttl[32];
    const char       *keys[2] = { NGX_XPREC_RESIDENCY, NGX_XPREC_NODES };
    ngx_time_t       *tp = ngx_timeofday();
    static const char *tiers[3] = { "disk", "loading", "resident" };

    n = xp_engine_adapters(ngx_xprec_worker.engine, NULL, 0);
    if (n > 28) {
        n = 28; /* one EVAL's arguments; the rest of the slots are not news */
    }

    info = calloc(n ? n : 1, sizeof(*info));
    args = calloc(3 + 2 * n, sizeof(char *));
    vals = calloc(n ? n : 1, sizeof(*vals));
    if (info == NULL || args == NULL || vals == NULL) {
        goto done;
    }

    n = xp_engine_adapters(ngx_xprec_worker.engine, info, n);
    if (n > 28) {
        n = 28;
    }

    ngx_snprintf((u_char *) now, sizeof(now) - 1, "%L%Z",
                 (int64_t) tp->sec * 1000 + tp->msec);
    ngx_snprintf((u_char *) ttl, sizeof(ttl) - 1, "%d%Z", NGX_XPREC_NODE_TTL);
    argc = 0;
    args[argc++] = now;
    args[argc++] = ttl;
    args[argc++] = ngx_xprec_node_id;
    for (k = 0; k < n; k++) {
        ngx_snprintf((u_char *) vals[k], sizeof(vals[k]) - 1, "%s|%d|%uL|%uL|%uL|%.0f|%.0f%Z",
                     tiers[info[k].tier], info[k].pinned, info[k].loads, info[k].hits,
                     info[k].misses, info[k].load_seconds * 1000, info[k].idle_seconds);
        args[argc++] = info[k].name;
        args[argc++] = vals[k];
    }

    (void) ngx_xprec_redis_eval(NGX_XPREC_SCRIPT_RESIDENCY, 2, keys, argc, args,
                                ngx_xprec_fleet_ignore, NULL);

done:

    free(info);
    free(args);
    free(vals);
}


void
ngx_xprec_fleet_sync(void)
{
    const char  *argv[2];

    if (ngx_xprec_fmcf == NULL || !ngx_xprec_fmcf->redis || ngx_xprec_worker.engine == NULL
        || ngx_xprec_redis.state != NGX_XPREC_REDIS_UP || ngx_xprec_worker.exiting)
    {
        return;
    }

    ngx_xprec_fleet_publish();

    if (!ngx_xprec_syncing) {
        ngx_xprec_syncing = 1;
        argv[0] = "HGETALL";
        argv[1] = NGX_XPREC_REGISTRY;
        (void) ngx_xprec_redis_command(2, argv, NULL, -1, ngx_xprec_fleet_registry, NULL);
    }
}


static void
ngx_xprec_fleet_tick(ngx_event_t *ev)
{
    /* usage Redis refused to take (it may have been loading its data): again */
    ngx_xprec_quota_flush();
    ngx_xprec_fleet_sync();

    if (!ngx_xprec_worker.exiting && !ngx_exiting) {
        ngx_add_timer(ev, NGX_XPREC_FLEET_PERIOD);
    }
}


void
ngx_xprec_fleet_init(ngx_cycle_t *cycle, ngx_xprec_main_conf_t *mcf)
{
    ngx_xprec_fmcf = mcf;
    ngx_xprec_syncing = 0;

    /* one id per worker: with per_worker engines each holds its own adapters */
    if (mcf->per_worker) {
        ngx_snprintf((u_char *) ngx_xprec_node_id, sizeof(ngx_xprec_node_id) - 1, "%V/%ui%Z",
                     &mcf->node, ngx_worker);
    } else {
        ngx_snprintf((u_char *) ngx_xprec_node_id, sizeof(ngx_xprec_node_id) - 1, "%V%Z",
                     &mcf->node);
    }

    if (!mcf->redis) {
        return;
    }

    ngx_xprec_fleet_ev.handler = ngx_xprec_fleet_tick;
    ngx_xprec_fleet_ev.log = cycle->log;
    ngx_xprec_fleet_ev.data = &ngx_xprec_fleet_ev;
    ngx_xprec_fleet_ev.cancelable = 1;
    ngx_add_timer(&ngx_xprec_fleet_ev, NGX_XPREC_FLEET_PERIOD);
}


void
ngx_xprec_fleet_exit(void)
{
    if (ngx_xprec_fleet_ev.timer_set) {
        ngx_del_timer(&ngx_xprec_fleet_ev);
    }
}
