#define PCRE2_CODE_UNIT_WIDTH 8
#include "format/peft.h"
#include "util/fsutil.h"
#include "util/json_util.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define XP_PEFT_PREFIX "base_model.model."

/* 1 match, 0 no, -1 bad pattern. full: PEFT's rule for a string target_modules, re.fullmatch
 * of the pattern against the module path. Otherwise its rule for rank_pattern/alpha_pattern
 * keys: the key matches the module path itself or a dotted suffix of it. */
static int xp_peft_pattern_match(const char *key, const char *module, int full)
{
    char pat[1024];
    snprintf(pat, sizeof pat, full ? "%s" : "(?:.*\\.)?(?:%s)", key);
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                   PCRE2_ANCHORED | PCRE2_ENDANCHORED, &err, &off, NULL);
    if (!re) return xp_fail("adapter_config.json: pattern \"%.200s\" is not a valid regex", key);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    int m = md ? pcre2_match(re, (PCRE2_SPTR)module, strlen(module), 0, 0, md, NULL) : -1;
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    return m >= 0;
}

/* The value a pattern object gives this module, or dflt. */
static int xp_peft_pattern_value(const cJSON *pattern, const char *module, double dflt,
                                 double *out)
{
    *out = dflt;
    const cJSON *kv;
    cJSON_ArrayForEach(kv, pattern)
    {
        int m = xp_peft_pattern_match(kv->string, module, 0);
        if (m < 0) return -1;
        if (m) {
            *out = kv->valuedouble;
            return 0;
        }
    }
    return 0;
}

static int xp_peft_check_pattern(const cJSON *p, const char *what)
{
    if (!p || cJSON_IsNull(p)) return 0;
    if (!cJSON_IsObject(p)) return xp_fail("adapter_config.json: %s is not an object", what);
    const cJSON *kv;
    cJSON_ArrayForEach(kv, p) if (!cJSON_IsNumber(kv) || !(kv->valuedouble > 0))
        return xp_fail("adapter_config.json: %s[\"%.100s\"] is not a positive number", what,
                       kv->string);
    return 0;
}

static int xp_cmp_mod(const void *a, const void *b)
{
    const xp_lora_module *x = a, *y = b;
    if (x->layer != y->layer) return x->layer < y->layer ? -1 : 1;
    return (int)x->mod - (int)y->mod;
}

/* Config fields; target_modules is checked per tensor later. */
static int xp_peft_parse_config(xp_peft *p, const cJSON *root, const cJSON **targets,
                                const cJSON **rank_pat, const cJSON **alpha_pat)
{
    const char *pt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "peft_type"));
    if (!pt || strcmp(pt, "LORA") != 0)
        return xp_fail("adapter_config.json: peft_type is \"%s\", only LORA is supported",
                       pt ? pt : "(missing)");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(root, "r");
    if (!cJSON_IsNumber(r) || r->valuedouble < 1 || r->valuedouble != floor(r->valuedouble) ||
        r->valuedouble > 65536)
        return xp_fail("adapter_config.json: r is missing or not a positive integer");
    p->r = (int)r->valuedouble;
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
    if (!cJSON_IsNumber(a) || !(a->valuedouble > 0) || !isfinite(a->valuedouble))
        return xp_fail("adapter_config.json: lora_alpha is missing or not a positive number");
    p->alpha = a->valuedouble;
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "use_rslora");
    if (rs && !cJSON_IsBool(rs) && !cJSON_IsNull(rs))
        return xp_fail("adapter_config.json: use_rslora is not true or false");
    p->use_rslora = cJSON_IsTrue(rs);
    const cJSON *dora = cJSON_GetObjectItemCaseSensitive(root, "use_dora");
    if (cJSON_IsTrue(dora)) return xp_fail("adapter_config.json: DoRA adapters are not supported");
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "fan_in_fan_out")))
        return xp_fail("adapter_config.json: fan_in_fan_out is true (Conv1D layout), not Qwen3's");
    const char *bias = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "bias"));
    if (bias && strcmp(bias, "none") != 0)
        return xp_fail("adapter_config.json: bias \"%s\": trained biases are not supported", bias);
    const cJSON *mts = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save");
    if (mts && !cJSON_IsNull(mts) && !(cJSON_IsArray(mts) && cJSON_GetArraySize(mts) == 0)) {
        const char *first = cJSON_IsArray(mts) ? cJSON_GetStringValue(mts->child) : NULL;
        return xp_fail("adapter_config.json: modules_to_save (%s) replaces whole modules, which a "
                       "shared base cannot serve",
                       first ? first : "...");
    }
    *targets = cJSON_GetObjectItemCaseSensitive(root, "target_modules");
    if (!cJSON_IsArray(*targets) && !cJSON_IsString(*targets))
        return xp_fail("adapter_config.json: target_modules is missing");
    if (cJSON_IsArray(*targets)) {
        const cJSON *t;
        cJSON_ArrayForEach(t, *targets) if (!cJSON_IsString(t)) return xp_fail(
            "adapter_config.json: target_modules holds a non-string");
    }
    *rank_pat = cJSON_GetObjectItemCaseSensitive(root, "rank_pattern");
    *alpha_pat = cJSON_GetObjectItemCaseSensitive(root, "alpha_pattern");
    if (xp_peft_check_pattern(*rank_pat, "rank_pattern") < 0 ||
        xp_peft_check_pattern(*alpha_pat, "alpha_pattern") < 0)
        return -1;
    const char *bm =
        cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "base_model_name_or_path"));
    if (!(p->base_model = strdup(bm ? bm : ""))) return xp_fail("out of memory");
    return 0;
}

/* PEFT's target_modules: a list names modules by their path or a dotted suffix of it ("q_proj",
 * "self_attn.q_proj"); a string is a regex matched against the whole path, except "all-linear"
 * (any case), which is every linear layer but the output layer: here every q/k/v/o/gate/up/down
 * projection. 1 targeted, 0 not, -1 bad pattern. */
static int xp_peft_targeted(const cJSON *targets, const char *path)
{
    if (cJSON_IsString(targets)) {
        if (strcasecmp(targets->valuestring, "all-linear") == 0) return 1;
        return xp_peft_pattern_match(targets->valuestring, path, 1);
    }
    const cJSON *t;
    cJSON_ArrayForEach(t, targets)
    {
        const char *s = t->valuestring;
        size_t lp = strlen(path), ls = strlen(s);
        if (strcmp(s, path) == 0 ||
            (lp > ls && path[lp - ls - 1] == '.' && strcmp(path + lp - ls, s) == 0))
            return 1;
    }
    return 0;
}

static int xp_all_finite(const xp_tensor *t)
{
    float buf[4096];
    const unsigned char *p = t->data;
    size_t es = xp_dtype_size(t->dtype);
    for (uint64_t i = 0; i < t->nelem; i += 4096) {
        size_t n = t->nelem - i < 4096 ? (size_t)(t->nelem - i) : 4096;
        xp_convert_to_f32(t->dtype, p + i * es, buf, n);
        for (size_t k = 0; k < n; k++)
            if (!isfinite(buf[k]))
                return xp_fail("%s holds a non-finite value (%g) at element %llu", t->name, buf[k],
                               (unsigned long long)(i + k));
    }
    return 0;
}

/* Matches every tensor to a module pair and checks shapes, ranks and values. */
static int xp_peft_collect(xp_peft *p, const cJSON *targets, const cJSON *rank_pat,
                           const cJSON *alpha_pat)
{
    size_t nt = xp_st_set_count(p->st);
    p->mods = calloc(nt ? nt : 1, sizeof *p->mods);
    if (!p->mods) return xp_fail("out of memory");
    for (size_t i = 0; i < nt; i++) {
        const xp_tensor *t = xp_st_set_tensor(p->st, i);
        const char *name = t->name;
        char parent[16], leaf[32], ab = 0;
        int layer, n = 0;
        xp_module m;
        if (strncmp(name, XP_PEFT_PREFIX, strlen(XP_PEFT_PREFIX)) != 0 ||
            sscanf(name + strlen(XP_PEFT_PREFIX), "model.layers.%d.%15[a-z_].%31[a-z_].lora_%c.weight%n",
                   &layer, parent, leaf, &ab, &n) != 4 ||
            name[strlen(XP_PEFT_PREFIX) + (size_t)n] != '\0' || (ab != 'A' && ab != 'B') ||
            layer < 0 || xp_module_parse(leaf, &m) < 0 || strcmp(parent, xp_module_parent(m)) != 0)
            return xp_fail("tensor %s is not a LoRA weight of q/k/v/o/gate/up/down_proj "
                           "(embeddings, lm_head, biases and other modules are not supported)",
                           name);
        if (t->dtype != XP_BF16 && t->dtype != XP_F16 && t->dtype != XP_F32)
            return xp_fail("%s has dtype %s (expected BF16, F16 or F32)", name,
                           xp_dtype_name(t->dtype));
        if (t->ndim != 2 || t->shape[0] < 1 || t->shape[1] < 1)
            return xp_fail("%s is not a non-empty matrix", name);
        xp_lora_module *lm = NULL;
        for (size_t k = 0; k < p->n && !lm; k++)
            if (p->mods[k].layer == layer && p->mods[k].mod == m) lm = &p->mods[k];
        if (!lm) {
            lm = &p->mods[p->n++];
            lm->layer = layer;
            lm->mod = m;
        }
        if (ab == 'A') lm->A = t;
        else lm->B = t;
    }
    qsort(p->mods, p->n, sizeof *p->mods, xp_cmp_mod);
    for (size_t k = 0; k < p->n; k++) {
        xp_lora_module *lm = &p->mods[k];
        char path[128];
        xp_module_path(path, sizeof path, lm->layer, lm->mod);
        if (!lm->A || !lm->B)
            return xp_fail("%s has lora_%s but no lora_%s", path, lm->A ? "A" : "B",
                           lm->A ? "B" : "A");
        int tg = xp_peft_targeted(targets, path);
        if (tg < 0) return -1;
        if (!tg && cJSON_IsString(targets))
            return xp_fail("%s has LoRA weights but target_modules \"%.200s\" does not match it "
                           "(a string is a regex for the whole module path, as in PEFT)",
                           path, targets->valuestring);
        if (!tg) return xp_fail("%s has LoRA weights but target_modules does not name it", path);
        double r, alpha;
        if (xp_peft_pattern_value(rank_pat, path, p->r, &r) < 0 ||
            xp_peft_pattern_value(alpha_pat, path, p->alpha, &alpha) < 0)
            return -1;
        lm->rank = (int)lm->A->shape[0];
        if (lm->B->shape[1] != lm->rank)
            return xp_fail("%s: lora_A has rank %d but lora_B has %lld", path, lm->rank,
                           (long long)lm->B->shape[1]);
        if (lm->rank != (int)r)
            return xp_fail("%s: tensors have rank %d but the config says %d", path, lm->rank,
                           (int)r);
        lm->alpha = alpha;
        lm->scale = (float)(p->use_rslora ? alpha / sqrt(r) : alpha / r);
        p->target_mask |= 1u << lm->mod;
        if (xp_all_finite(lm->A) < 0 || xp_all_finite(lm->B) < 0) return -1;
    }
    return 0;
}

int xp_peft_open(const char *dir, xp_peft **out)
{
    *out = NULL;
    xp_peft *p = calloc(1, sizeof *p);
    if (!p || !(p->dir = strdup(dir))) {
        free(p);
        return xp_fail("out of memory");
    }
    char *path = xp_path_join(dir, "adapter_config.json");
    char *text = path ? xp_read_text_file(path, 1u << 20) : NULL;
    free(path);
    int text_ok = text != NULL;
    cJSON *root = text ? cJSON_Parse(text) : NULL;
    free(text);
    const cJSON *targets = NULL, *rank_pat = NULL, *alpha_pat = NULL;
    if (!root) {
        if (text_ok) xp_fail("adapter_config.json is not valid JSON");
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        xp_fail("adapter_config.json is not a JSON object");
        goto fail;
    }
    if (xp_json_check_unique(root, "adapter_config.json") < 0) goto fail;
    if (xp_peft_parse_config(p, root, &targets, &rank_pat, &alpha_pat) < 0 ||
        xp_st_set_open(dir, "adapter_model", &p->st) < 0 ||
        xp_peft_collect(p, targets, rank_pat, alpha_pat) < 0)
        goto fail;
    if (p->n == 0) {
        xp_fail("adapter_model.safetensors holds no LoRA weights");
        goto fail;
    }
    cJSON_Delete(root);
    *out = p;
    return 0;
fail:
    xp_fail_ctx("adapter %s", dir);
    cJSON_Delete(root);
    xp_peft_close(p);
    return -1;
}

void xp_peft_close(xp_peft *p)
{
    if (!p) return;
    xp_st_set_close(p->st);
    free(p->mods);
    free(p->base_model);
    free(p->dir);
    free(p);
}

int xp_peft_check_base(const xp_peft *p, const xp_qwen3_config *cfg)
{
    for (size_t k = 0; k < p->n; k++) {
        const xp_lora_module *lm = &p->mods[k];
        char path[128];
        xp_module_path(path, sizeof path, lm->layer, lm->mod);
        if (lm->layer >= cfg->num_hidden_layers)
            return xp_fail("adapter %s: %s but the base has %d layers", p->dir, path,
                           cfg->num_hidden_layers);
        int64_t o, i;
        xp_module_shape(cfg, lm->mod, &o, &i);
        if (lm->A->shape[1] != i || lm->B->shape[0] != o)
            return xp_fail("adapter %s: %s is %lldx%lld (B A) but the base module is %lldx%lld",
                           p->dir, path, (long long)lm->B->shape[0], (long long)lm->A->shape[1],
                           (long long)o, (long long)i);
    }
    return 0;
}

const xp_lora_module *xp_peft_find(const xp_peft *p, int layer, xp_module m)
{
    for (size_t k = 0; k < p->n; k++)
        if (p->mods[k].layer == layer && p->mods[k].mod == m) return &p->mods[k];
    return NULL;
}

/* ---------------------------------------------------------------- writing */

static char *xp_peft_config_json(const char *base_model, const xp_lora_save *mods, size_t n,
                                 int use_rslora)
{
    /* the most common rank and alpha become r and lora_alpha */
    int best_r = mods[0].rank, best_c = 0;
    double best_a = mods[0].alpha;
    int ac = 0;
    for (size_t i = 0; i < n; i++) {
        int c = 0, ca = 0;
        for (size_t j = 0; j < n; j++) {
            c += mods[j].rank == mods[i].rank;
            ca += mods[j].alpha == mods[i].alpha;
        }
        if (c > best_c) best_c = c, best_r = mods[i].rank;
        if (ca > ac) ac = ca, best_a = mods[i].alpha;
    }
    cJSON *r = cJSON_CreateObject();
    cJSON *ap = cJSON_AddObjectToObject(r, "alpha_pattern");
    cJSON_AddNullToObject(r, "auto_mapping");
    cJSON_AddStringToObject(r, "base_model_name_or_path", base_model ? base_model : "");
    cJSON_AddStringToObject(r, "bias", "none");
    cJSON_AddBoolToObject(r, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(r, "inference_mode", 1);
    cJSON_AddBoolToObject(r, "init_lora_weights", 1);
    cJSON_AddNullToObject(r, "layers_pattern");
    cJSON_AddNullToObject(r, "layers_to_transform");
    cJSON_AddNumberToObject(r, "lora_alpha", best_a);
    cJSON_AddNumberToObject(r, "lora_dropout", 0.0);
    cJSON_AddNullToObject(r, "modules_to_save");
    cJSON_AddStringToObject(r, "peft_type", "LORA");
    cJSON_AddNumberToObject(r, "r", best_r);
    cJSON *rp = cJSON_AddObjectToObject(r, "rank_pattern");
    cJSON_AddNullToObject(r, "revision");
    cJSON *tm = cJSON_AddArrayToObject(r, "target_modules");
    cJSON_AddStringToObject(r, "task_type", "CAUSAL_LM");
    cJSON_AddBoolToObject(r, "use_dora", 0);
    cJSON_AddBoolToObject(r, "use_rslora", use_rslora);
    unsigned seen = 0;
    for (size_t i = 0; i < n; i++) {
        char path[128];
        xp_module_path(path, sizeof path, mods[i].layer, mods[i].mod);
        if (mods[i].rank != best_r) cJSON_AddNumberToObject(rp, path, mods[i].rank);
        if (mods[i].alpha != best_a) cJSON_AddNumberToObject(ap, path, mods[i].alpha);
        seen |= 1u << mods[i].mod;
    }
    for (int m = 0; m < XP_MOD_COUNT; m++)
        if (seen & (1u << m)) cJSON_AddItemToArray(tm, cJSON_CreateString(xp_module_name(m)));
    char *out = xp_json_print(r, 1);
    cJSON_Delete(r);
    return out;
}

int xp_peft_save(const char *dir, const char *base_model, const xp_lora_save *mods, size_t n,
                 int use_rslora)
{
    if (n == 0) return xp_fail("an adapter needs at least one module");
    for (size_t i = 0; i < n; i++)
        if (mods[i].rank < 1 || !(mods[i].alpha > 0))
            return xp_fail("module %zu: rank %d, alpha %g", i, mods[i].rank, mods[i].alpha);
    xp_st_writer *w = xp_stw_new();
    if (!w) return xp_fail("out of memory");
    char name[192], path[128];
    for (size_t i = 0; i < n; i++) {
        xp_module_path(path, sizeof path, mods[i].layer, mods[i].mod);
        int64_t sa[2] = {mods[i].rank, mods[i].in}, sb[2] = {mods[i].out, mods[i].rank};
        snprintf(name, sizeof name, XP_PEFT_PREFIX "%s.lora_A.weight", path);
        if (xp_stw_declare(w, name, XP_BF16, 2, sa) < 0) goto fail;
        snprintf(name, sizeof name, XP_PEFT_PREFIX "%s.lora_B.weight", path);
        if (xp_stw_declare(w, name, XP_BF16, 2, sb) < 0) goto fail;
    }
    if (xp_stw_open(w, dir, "adapter_model", 0) < 0) goto fail;
    for (size_t i = 0; i < n; i++) {
        xp_module_path(path, sizeof path, mods[i].layer, mods[i].mod);
        snprintf(name, sizeof name, XP_PEFT_PREFIX "%s.lora_A.weight", path);
        if (xp_stw_write(w, name, mods[i].A, (size_t)(mods[i].rank * mods[i].in) * 2) < 0)
            goto fail;
        snprintf(name, sizeof name, XP_PEFT_PREFIX "%s.lora_B.weight", path);
        if (xp_stw_write(w, name, mods[i].B, (size_t)(mods[i].rank * mods[i].out) * 2) < 0)
            goto fail;
    }
    char *js = xp_peft_config_json(base_model, mods, n, use_rslora);
    char *cpath = xp_path_join(dir, "adapter_config.json");
    FILE *fp = js && cpath ? fopen(cpath, "wb") : NULL;
    int ok = fp && fputs(js, fp) >= 0 && fputc('\n', fp) != EOF;
    ok = fp && fclose(fp) == 0 && ok;
    free(js);
    if (!ok) {
        xp_fail("%s: cannot write", cpath ? cpath : "adapter_config.json");
        free(cpath);
        goto fail;
    }
    free(cpath);
    if (xp_stw_finish(w) < 0) goto fail;
    xp_stw_free(w);
    return 0;
fail:
    xp_stw_free(w);
    return -1;
}
