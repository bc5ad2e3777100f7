#define PCRE2_CODE_UNIT_WIDTH 8
#include "format/qwen3_config.h"
#include "util/fsutil.h"
#include "util/json_util.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int xp_cfg_int(const cJSON *root, const char *key, int min, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v) return xp_fail("config.json: \"%s\" is missing", key);
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < min ||
        v->valuedouble > 1e9)
        return xp_fail("config.json: \"%s\" must be an integer >= %d", key, min);
    *out = (int)v->valuedouble;
    return 0;
}

static int xp_cfg_pos(const cJSON *root, const char *key, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v) return xp_fail("config.json: \"%s\" is missing", key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0) || !isfinite(v->valuedouble))
        return xp_fail("config.json: \"%s\" must be a positive number", key);
    *out = v->valuedouble;
    return 0;
}

static int xp_parse_block(const cJSON *arr, const char *what, int block[2])
{
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) != 2)
        return xp_fail("config.json: %s must be a pair [rows, cols]", what);
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetArrayItem(arr, i);
        if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 1 ||
            v->valuedouble > 65536)
            return xp_fail("config.json: %s holds an invalid block size", what);
        block[i] = (int)v->valuedouble;
    }
    return 0;
}

static int xp_parse_ignore(const cJSON *arr, const char *what, xp_quant_config *q)
{
    if (!arr || cJSON_IsNull(arr)) return 0;
    if (!cJSON_IsArray(arr)) return xp_fail("config.json: %s must be a list", what);
    const cJSON *v;
    cJSON_ArrayForEach(v, arr)
    {
        if (!cJSON_IsString(v)) return xp_fail("config.json: %s holds a non-string", what);
        if (q->nignore == XP_MAX_IGNORE)
            return xp_fail("config.json: %s has more than %d entries", what, XP_MAX_IGNORE);
        if (!(q->ignore[q->nignore++] = strdup(v->valuestring)))
            return xp_fail("out of memory");
    }
    return 0;
}

/* compressed-tensors: one config group must quantize Linear weights as 8-bit float blocks. */
static int xp_parse_ct(const cJSON *qc, xp_quant_config *q)
{
    const char *fmt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(qc, "format"));
    if (fmt && strcmp(fmt, "float-quantized") != 0)
        return xp_fail("config.json: compressed-tensors format \"%s\" is not supported (only "
                       "float-quantized FP8 blocks)",
                       fmt);
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(qc, "config_groups");
    if (!cJSON_IsObject(groups) || !groups->child)
        return xp_fail("config.json: compressed-tensors config_groups is missing");
    if (cJSON_GetArraySize(groups) != 1)
        return xp_fail("config.json: compressed-tensors with %d config groups is not supported",
                       cJSON_GetArraySize(groups));
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(groups->child, "weights");
    const char *strategy = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(w, "strategy"));
    const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(w, "type"));
    const cJSON *bits = cJSON_GetObjectItemCaseSensitive(w, "num_bits");
    if (!strategy || strcmp(strategy, "block") != 0)
        return xp_fail("config.json: compressed-tensors weight strategy \"%s\" is not supported "
                       "(only \"block\")",
                       strategy ? strategy : "(missing)");
    if (!type || strcmp(type, "float") != 0 || !cJSON_IsNumber(bits) || bits->valuedouble != 8)
        return xp_fail("config.json: compressed-tensors weights must be 8-bit float");
    if (xp_parse_block(cJSON_GetObjectItemCaseSensitive(w, "block_structure"),
                       "weights.block_structure", q->block) < 0)
        return -1;
    return xp_parse_ignore(cJSON_GetObjectItemCaseSensitive(qc, "ignore"), "ignore", q);
}

static int xp_parse_quant(const cJSON *root, xp_quant_config *q)
{
    memset(q, 0, sizeof *q);
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (!qc || cJSON_IsNull(qc)) return 0;
    if (!cJSON_IsObject(qc)) return xp_fail("config.json: quantization_config is not an object");
    const char *m = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(qc, "quant_method"));
    if (!m) return xp_fail("config.json: quantization_config.quant_method is missing");
    if (strcmp(m, "fp8") == 0) {
        q->kind = XP_QUANT_FP8;
        const char *fmt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(qc, "fmt"));
        if (fmt && strcmp(fmt, "e4m3") != 0)
            return xp_fail("config.json: fp8 fmt \"%s\" is not supported (only e4m3)", fmt);
        const cJSON *bs = cJSON_GetObjectItemCaseSensitive(qc, "weight_block_size");
        if (!bs || cJSON_IsNull(bs))
            return xp_fail("config.json: fp8 without weight_block_size (per-tensor FP8) is not "
                           "supported");
        if (xp_parse_block(bs, "weight_block_size", q->block) < 0) return -1;
        return xp_parse_ignore(cJSON_GetObjectItemCaseSensitive(qc, "modules_to_not_convert"),
                               "modules_to_not_convert", q);
    }
    if (strcmp(m, "compressed-tensors") == 0) {
        q->kind = XP_QUANT_FP8_CT;
        return xp_parse_ct(qc, q);
    }
    return xp_fail("config.json: quant_method \"%s\" is not supported (fp8 or compressed-tensors)",
                   m);
}

/* An optional number in a rope_scaling object: absent or null keeps *out. */
static int xp_rope_num(const cJSON *rs, const char *key, double min, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(rs, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || !(v->valuedouble >= min))
        return xp_fail("config.json: rope_scaling.%s must be a number >= %g", key, min);
    *out = v->valuedouble;
    return 0;
}

/* transformers' get_mscale: 0.1 mscale ln(scale) + 1 for scale > 1, else 1 */
static double xp_yarn_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

/* rope_scaling as transformers reads it: the type under "rope_type" (or the older "type");
 * "default" is plain RoPE; "yarn" takes factor (required) and the optional fields below; any
 * other type, or a key YaRN does not have, is refused rather than ignored. */
static int xp_parse_rope(const cJSON *rs, xp_qwen3_config *c)
{
    memset(&c->rope, 0, sizeof c->rope);
    if (!rs || cJSON_IsNull(rs)) return 0;
    if (!cJSON_IsObject(rs)) return xp_fail("config.json: rope_scaling must be an object or null");
    const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rs, "rope_type"));
    const char *old = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(rs, "type"));
    if (!type) type = old;
    if (!type) return xp_fail("config.json: rope_scaling has no rope_type");
    if (old && strcmp(old, type) != 0)
        return xp_fail("config.json: rope_scaling says rope_type \"%s\" and type \"%s\"", type,
                       old);
    if (strcmp(type, "default") == 0) return 0;
    if (strcmp(type, "yarn") != 0)
        return xp_fail("config.json: rope_scaling type \"%s\" is not supported (only yarn; "
                       "serving it as plain RoPE would give wrong results)",
                       type);
    static const char *const known[] = {"rope_type", "type", "factor",
                                        "original_max_position_embeddings", "attention_factor",
                                        "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                                        "truncate"};
    const cJSON *it;
    cJSON_ArrayForEach(it, rs)
    {
        size_t k = 0;
        while (k < sizeof known / sizeof *known && strcmp(it->string, known[k]) != 0)
            k++;
        if (k == sizeof known / sizeof *known)
            return xp_fail("config.json: rope_scaling key \"%s\" is not a YaRN parameter",
                           it->string);
    }
    xp_rope_scaling *r = &c->rope;
    r->yarn = 1;
    r->factor = 0;
    r->original_max_position_embeddings = c->max_position_embeddings;
    r->beta_fast = 32;
    r->beta_slow = 1;
    r->truncate = 1;
    double orig = r->original_max_position_embeddings, mscale = 0, mscale_all = 0, af = 0;
    if (!cJSON_GetObjectItemCaseSensitive(rs, "factor"))
        return xp_fail("config.json: rope_scaling (yarn) has no factor");
    if (xp_rope_num(rs, "factor", 1, &r->factor) < 0 ||
        xp_rope_num(rs, "original_max_position_embeddings", 1, &orig) < 0 ||
        xp_rope_num(rs, "attention_factor", 0, &af) < 0 ||
        xp_rope_num(rs, "mscale", 0, &mscale) < 0 ||
        xp_rope_num(rs, "mscale_all_dim", 0, &mscale_all) < 0 ||
        xp_rope_num(rs, "beta_fast", 0, &r->beta_fast) < 0 ||
        xp_rope_num(rs, "beta_slow", 0, &r->beta_slow) < 0)
        return -1;
    if (orig != floor(orig) || orig > 1e9)
        return xp_fail("config.json: rope_scaling.original_max_position_embeddings must be an "
                       "integer");
    r->original_max_position_embeddings = (int)orig;
    if (r->beta_fast < r->beta_slow)
        return xp_fail("config.json: rope_scaling.beta_fast %g is below beta_slow %g",
                       r->beta_fast, r->beta_slow);
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(rs, "truncate");
    if (tr && !cJSON_IsNull(tr)) {
        if (!cJSON_IsBool(tr))
            return xp_fail("config.json: rope_scaling.truncate must be true or false");
        r->truncate = cJSON_IsTrue(tr);
    }
    if (af > 0)
        r->attention_factor = af;
    else if (mscale > 0 && mscale_all > 0)
        r->attention_factor =
            xp_yarn_mscale(r->factor, mscale) / xp_yarn_mscale(r->factor, mscale_all);
    else
        r->attention_factor = xp_yarn_mscale(r->factor, 1);
    return 0;
}

int xp_rope_scaling_parse(const char *json, xp_qwen3_config *c)
{
    cJSON *rs = cJSON_Parse(json);
    if (!rs) return xp_fail("rope scaling override: not JSON: %.80s", json);
    int rc = xp_parse_rope(rs, c);
    cJSON_Delete(rs);
    if (rc < 0) xp_fail_ctx("rope scaling override");
    return rc;
}

int xp_qwen3_positions(const xp_qwen3_config *c)
{
    double n = c->rope.yarn ? c->rope.factor * c->rope.original_max_position_embeddings : 0;
    if (n > 1 << 30) n = 1 << 30;
    return n > c->max_position_embeddings ? (int)n : c->max_position_embeddings;
}

/* The dimension whose frequency turns num_rotations times over max_pos positions. */
static double xp_yarn_dim(double num_rotations, int dim, double base, double max_pos)
{
    return dim * log(max_pos / (num_rotations * 2 * M_PI)) / (2 * log(base));
}

void xp_qwen3_inv_freq(const xp_qwen3_config *c, float *inv_freq)
{
    int dim = c->head_dim, half = dim / 2;
    const xp_rope_scaling *r = &c->rope;
    double low = 0, high = 0;
    if (r->yarn) {
        low = xp_yarn_dim(r->beta_fast, dim, c->rope_theta, r->original_max_position_embeddings);
        high = xp_yarn_dim(r->beta_slow, dim, c->rope_theta, r->original_max_position_embeddings);
        if (r->truncate) {
            low = floor(low);
            high = ceil(high);
        }
        if (low < 0) low = 0;
        if (high > dim - 1) high = dim - 1;
        if (low == high) high += 0.001; /* transformers' guard against a zero-width ramp */
    }
    for (int i = 0; i < half; i++) {
        double extrap = pow(c->rope_theta, -2.0 * i / dim);
        if (!r->yarn) {
            inv_freq[i] = (float)extrap;
            continue;
        }
        /* 1 keeps the original frequency (fast dimensions), 0 takes the interpolated one */
        double ramp = (i - low) / (high - low);
        double keep = 1 - (ramp < 0 ? 0 : ramp > 1 ? 1 : ramp);
        inv_freq[i] = (float)(extrap / r->factor * (1 - keep) + extrap * keep);
    }
}

int xp_qwen3_config_parse(const char *json, xp_qwen3_config *c, xp_quant_config *q)
{
    memset(c, 0, sizeof *c);
    if (q) memset(q, 0, sizeof *q);
    cJSON *root = cJSON_Parse(json);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return xp_fail("config.json: not a JSON object");
    }
    int rc = -1;
    if (xp_json_check_unique(root, "config.json") < 0) goto out;
    const char *mt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "model_type"));
    if (mt && strcmp(mt, "qwen3") != 0) {
        xp_fail("config.json: model_type \"%s\" is not qwen3", mt);
        goto out;
    }
    if (xp_cfg_int(root, "hidden_size", 1, &c->hidden_size) < 0 ||
        xp_cfg_int(root, "intermediate_size", 1, &c->intermediate_size) < 0 ||
        xp_cfg_int(root, "num_hidden_layers", 1, &c->num_hidden_layers) < 0 ||
        xp_cfg_int(root, "num_attention_heads", 1, &c->num_attention_heads) < 0 ||
        xp_cfg_int(root, "num_key_value_heads", 1, &c->num_key_value_heads) < 0 ||
        xp_cfg_int(root, "head_dim", 1, &c->head_dim) < 0 ||
        xp_cfg_int(root, "vocab_size", 1, &c->vocab_size) < 0 ||
        xp_cfg_int(root, "max_position_embeddings", 1, &c->max_position_embeddings) < 0 ||
        xp_cfg_pos(root, "rms_norm_eps", &c->rms_norm_eps) < 0 ||
        xp_cfg_pos(root, "rope_theta", &c->rope_theta) < 0)
        goto out;
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    if (!cJSON_IsBool(tie)) {
        xp_fail("config.json: \"tie_word_embeddings\" is %s",
                tie ? "not true or false" : "missing");
        goto out;
    }
    c->tie_word_embeddings = cJSON_IsTrue(tie);
    if (c->num_attention_heads % c->num_key_value_heads) {
        xp_fail("config.json: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                c->num_attention_heads, c->num_key_value_heads);
        goto out;
    }
    if (c->head_dim % 2) {
        xp_fail("config.json: head_dim %d is odd (rotary embedding needs pairs)", c->head_dim);
        goto out;
    }
    if (c->rms_norm_eps >= 1) {
        xp_fail("config.json: rms_norm_eps %g is implausibly large", c->rms_norm_eps);
        goto out;
    }
    const cJSON *nl = cJSON_GetObjectItemCaseSensitive(root, "layer_types");
    if (cJSON_IsArray(nl) && cJSON_GetArraySize(nl) != c->num_hidden_layers) {
        xp_fail("config.json: layer_types lists %d layers but num_hidden_layers is %d",
                cJSON_GetArraySize(nl), c->num_hidden_layers);
        goto out;
    }
    if (xp_parse_rope(cJSON_GetObjectItemCaseSensitive(root, "rope_scaling"), c) < 0) goto out;
    if (q) {
        rc = xp_parse_quant(root, q);
        if (rc < 0) xp_quant_config_free(q);
    } else {
        rc = 0;
    }
out:
    cJSON_Delete(root);
    return rc;
}

int xp_qwen3_config_load(const char *dir, xp_qwen3_config *cfg, xp_quant_config *quant)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = xp_read_text_file(path, 1u << 20);
    if (!text) return -1;
    int rc = xp_qwen3_config_parse(text, cfg, quant);
    free(text);
    if (rc < 0) xp_fail_ctx("%s", dir);
    return rc;
}

void xp_quant_config_free(xp_quant_config *q)
{
    for (int i = 0; i < q->nignore; i++) free(q->ignore[i]);
    q->nignore = 0;
}

int xp_quant_ignored(const xp_quant_config *q, const char *module)
{
    for (int i = 0; i < q->nignore; i++) {
        const char *pat = q->ignore[i];
        if (strncmp(pat, "re:", 3) != 0) {
            /* a plain name matches the module itself or any module it ends */
            size_t lm = strlen(module), lp = strlen(pat);
            if (strcmp(module, pat) == 0 ||
                (lm > lp && module[lm - lp - 1] == '.' && strcmp(module + lm - lp, pat) == 0))
                return 1;
            continue;
        }
        int err;
        PCRE2_SIZE off;
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)(pat + 3), PCRE2_ZERO_TERMINATED, 0, &err,
                                       &off, NULL);
        if (!re) return xp_fail("ignore pattern \"%s\" is not a valid regex", pat);
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
        /* Python's re.match: anchored at the start only */
        int m = md ? pcre2_match(re, (PCRE2_SPTR)module, strlen(module), 0, PCRE2_ANCHORED, md,
                                 NULL)
                   : -1;
        pcre2_match_data_free(md);
        pcre2_code_free(re);
        if (m >= 0) return 1;
    }
    return 0;
}

static cJSON *xp_quant_json(const xp_quant_config *q)
{
    cJSON *qc = cJSON_CreateObject(), *ign = cJSON_CreateArray();
    for (int i = 0; i < q->nignore; i++) cJSON_AddItemToArray(ign, cJSON_CreateString(q->ignore[i]));
    int blk[2] = {q->block[0], q->block[1]};
    if (q->kind == XP_QUANT_FP8) {
        cJSON_AddStringToObject(qc, "activation_scheme", "dynamic");
        cJSON_AddStringToObject(qc, "fmt", "e4m3");
        cJSON_AddStringToObject(qc, "quant_method", "fp8");
        cJSON_AddItemToObject(qc, "weight_block_size", cJSON_CreateIntArray(blk, 2));
        if (q->nignore)
            cJSON_AddItemToObject(qc, "modules_to_not_convert", ign);
        else
            cJSON_Delete(ign);
        return qc;
    }
    /* compressed-tensors as llm-compressor writes FP8_BLOCK */
    cJSON *groups = cJSON_AddObjectToObject(qc, "config_groups");
    cJSON *g = cJSON_AddObjectToObject(groups, "group_0");
    cJSON *in = cJSON_AddObjectToObject(g, "input_activations");
    cJSON_AddBoolToObject(in, "dynamic", 1);
    cJSON_AddNumberToObject(in, "group_size", blk[1]);
    cJSON_AddNumberToObject(in, "num_bits", 8);
    cJSON_AddStringToObject(in, "strategy", "group");
    cJSON_AddBoolToObject(in, "symmetric", 1);
    cJSON_AddStringToObject(in, "type", "float");
    cJSON_AddNullToObject(g, "output_activations");
    cJSON *tg = cJSON_AddArrayToObject(g, "targets");
    cJSON_AddItemToArray(tg, cJSON_CreateString("Linear"));
    cJSON *w = cJSON_AddObjectToObject(g, "weights");
    cJSON_AddItemToObject(w, "block_structure", cJSON_CreateIntArray(blk, 2));
    cJSON_AddBoolToObject(w, "dynamic", 0);
    cJSON_AddNumberToObject(w, "num_bits", 8);
    cJSON_AddStringToObject(w, "observer", "minmax");
    cJSON_AddStringToObject(w, "strategy", "block");
    cJSON_AddBoolToObject(w, "symmetric", 1);
    cJSON_AddStringToObject(w, "type", "float");
    cJSON_AddStringToObject(qc, "format", "float-quantized");
    cJSON_AddItemToObject(qc, "ignore", ign);
    cJSON_AddStringToObject(qc, "quant_method", "compressed-tensors");
    cJSON_AddStringToObject(qc, "quantization_status", "compressed");
    return qc;
}

char *xp_config_with_quant(const char *json, const xp_quant_config *q)
{
    cJSON *root = cJSON_Parse(json);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        xp_fail("config.json: not a JSON object");
        return NULL;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    if (q->kind != XP_QUANT_NONE) cJSON_AddItemToObject(root, "quantization_config", xp_quant_json(q));
    char *out = xp_json_print(root, 1);
    cJSON_Delete(root);
    if (!out) xp_fail("out of memory");
    return out;
}

char *xp_qwen3_config_json(const xp_qwen3_config *c)
{
    cJSON *r = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(r, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("Qwen3ForCausalLM"));
    cJSON_AddBoolToObject(r, "attention_bias", 0);
    cJSON_AddNumberToObject(r, "attention_dropout", 0.0);
    cJSON_AddNumberToObject(r, "bos_token_id", 151643);
    cJSON_AddNumberToObject(r, "eos_token_id", 151645);
    cJSON_AddNumberToObject(r, "head_dim", c->head_dim);
    cJSON_AddStringToObject(r, "hidden_act", "silu");
    cJSON_AddNumberToObject(r, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(r, "initializer_range", 0.02);
    cJSON_AddNumberToObject(r, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(r, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(r, "max_window_layers", c->num_hidden_layers);
    cJSON_AddStringToObject(r, "model_type", "qwen3");
    cJSON_AddNumberToObject(r, "num_attention_heads", c->num_attention_heads);
    cJSON_AddNumberToObject(r, "num_hidden_layers", c->num_hidden_layers);
    cJSON_AddNumberToObject(r, "num_key_value_heads", c->num_key_value_heads);
    cJSON_AddNumberToObject(r, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddNullToObject(r, "rope_scaling");
    cJSON_AddNumberToObject(r, "rope_theta", c->rope_theta);
    cJSON_AddNullToObject(r, "sliding_window");
    cJSON_AddBoolToObject(r, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddStringToObject(r, "torch_dtype", "bfloat16");
    cJSON_AddStringToObject(r, "transformers_version", "4.51.0");
    cJSON_AddBoolToObject(r, "use_cache", 1);
    cJSON_AddBoolToObject(r, "use_sliding_window", 0);
    cJSON_AddNumberToObject(r, "vocab_size", c->vocab_size);
    char *out = xp_json_print(r, 1);
    cJSON_Delete(r);
    return out;
}
