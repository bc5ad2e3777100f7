#include "format/checkpoint.h"
#include "format/blockquant.h"
#include "format/fp8.h"
#include "util/xp_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const xp_mod_names[XP_MOD_COUNT] = {"q_proj",    "k_proj",  "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};

const char *xp_module_name(xp_module m)
{
    return xp_mod_names[m];
}

const char *xp_module_parent(xp_module m)
{
    return m <= XP_MOD_O ? "self_attn" : "mlp";
}

int xp_module_parse(const char *name, xp_module *out)
{
    for (int i = 0; i < XP_MOD_COUNT; i++)
        if (strcmp(name, xp_mod_names[i]) == 0) {
            *out = (xp_module)i;
            return 0;
        }
    return -1;
}

void xp_module_shape(const xp_qwen3_config *c, xp_module m, int64_t *out_dim, int64_t *in_dim)
{
    int64_t h = c->hidden_size, q = (int64_t)c->num_attention_heads * c->head_dim,
            kv = (int64_t)c->num_key_value_heads * c->head_dim, i = c->intermediate_size;
    switch (m) {
    case XP_MOD_Q: *out_dim = q, *in_dim = h; break;
    case XP_MOD_K:
    case XP_MOD_V: *out_dim = kv, *in_dim = h; break;
    case XP_MOD_O: *out_dim = h, *in_dim = q; break;
    case XP_MOD_GATE:
    case XP_MOD_UP: *out_dim = i, *in_dim = h; break;
    default: *out_dim = h, *in_dim = i; break;
    }
}

void xp_module_path(char *buf, size_t size, int layer, xp_module m)
{
    snprintf(buf, size, "model.layers.%d.%s.%s", layer, xp_module_parent(m), xp_module_name(m));
}

xp_role xp_tensor_role(const char *name, int *layer, xp_module *mod)
{
    if (strcmp(name, "model.embed_tokens.weight") == 0) return XP_ROLE_EMBED;
    if (strcmp(name, "lm_head.weight") == 0) return XP_ROLE_LM_HEAD;
    if (strcmp(name, "model.norm.weight") == 0) return XP_ROLE_NORM;
    int l, n = 0;
    char parent[16], leaf[32], suffix[32];
    if (sscanf(name, "model.layers.%d.%15[a-z_].%31[a-z_].%31[a-z_]%n", &l, parent, leaf, suffix,
               &n) == 4 &&
        name[n] == '\0' && l >= 0) {
        xp_module m;
        if (xp_module_parse(leaf, &m) == 0 && strcmp(parent, xp_module_parent(m)) == 0) {
            if (layer) *layer = l;
            if (mod) *mod = m;
            if (strcmp(suffix, "weight") == 0) return XP_ROLE_LINEAR;
            if (strcmp(suffix, "weight_scale_inv") == 0 || strcmp(suffix, "weight_scale") == 0)
                return XP_ROLE_SCALE;
            return XP_ROLE_OTHER;
        }
        if (strcmp(parent, "self_attn") == 0 &&
            (strcmp(leaf, "q_norm") == 0 || strcmp(leaf, "k_norm") == 0) &&
            strcmp(suffix, "weight") == 0)
            return XP_ROLE_NORM;
        return XP_ROLE_OTHER;
    }
    n = 0;
    if (sscanf(name, "model.layers.%d.%31[a-z_].%31[a-z_]%n", &l, leaf, suffix, &n) == 3 &&
        name[n] == '\0' && l >= 0 && strcmp(suffix, "weight") == 0 &&
        (strcmp(leaf, "input_layernorm") == 0 || strcmp(leaf, "post_attention_layernorm") == 0))
        return XP_ROLE_NORM;
    return XP_ROLE_OTHER;
}

int xp_weight_to_f32(const xp_weight *w, float *dst)
{
    if (w->w->dtype != XP_F8_E4M3) {
        if (xp_convert_to_f32(w->w->dtype, w->w->data, dst, w->w->nelem) < 0)
            return xp_fail("%s: dtype %s is not a float type", w->w->name,
                           xp_dtype_name(w->w->dtype));
        return 0;
    }
    float *s = malloc(w->scale->nelem * sizeof *s);
    if (!s) return xp_fail("out of memory");
    xp_convert_to_f32(w->scale->dtype, w->scale->data, s, w->scale->nelem);
    /* codes are bytes, so the mapping's alignment does not matter */
    xp_block_dequantize(w->w->data, s, w->rows, w->cols, w->block[0], w->block[1], dst);
    free(s);
    return 0;
}

static int xp_check_shape(const xp_tensor *t, int64_t d0, int64_t d1)
{
    int nd = d1 < 0 ? 1 : 2;
    if (t->ndim != nd || t->shape[0] != d0 || (nd == 2 && t->shape[1] != d1)) {
        char have[64] = "", want[64];
        for (int i = 0; i < t->ndim; i++) {
            size_t l = strlen(have);
            snprintf(have + l, sizeof have - l, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        }
        if (nd == 1)
            snprintf(want, sizeof want, "%lld", (long long)d0);
        else
            snprintf(want, sizeof want, "%lld, %lld", (long long)d0, (long long)d1);
        return xp_fail("%s has shape [%s], config.json implies [%s]", t->name, have, want);
    }
    return 0;
}

static const xp_tensor *xp_need(const xp_ckpt *c, const char *name)
{
    const xp_tensor *t = xp_st_set_find(c->st, name);
    if (!t) xp_fail("tensor %s is missing", name);
    return t;
}

/* A non-linear BF16/F16/F32 tensor of shape [d0] or [d0, d1]. */
static int xp_check_plain(const xp_ckpt *c, const char *name, int64_t d0, int64_t d1)
{
    const xp_tensor *t = xp_need(c, name);
    if (!t || xp_check_shape(t, d0, d1) < 0) return -1;
    if (t->dtype != XP_BF16 && t->dtype != XP_F16 && t->dtype != XP_F32)
        return xp_fail("%s has dtype %s (expected BF16, F16 or F32)", name,
                       xp_dtype_name(t->dtype));
    return 0;
}

int xp_ckpt_weight(const xp_ckpt *c, int layer, xp_module m, xp_weight *out)
{
    char path[128], name[160];
    xp_module_path(path, sizeof path, layer, m);
    memset(out, 0, sizeof *out);
    xp_module_shape(&c->cfg, m, &out->rows, &out->cols);
    snprintf(name, sizeof name, "%s.weight", path);
    if (!(out->w = xp_need(c, name)) || xp_check_shape(out->w, out->rows, out->cols) < 0) return -1;
    if (out->w->dtype != XP_F8_E4M3) {
        if (!xp_dtype_is_float(out->w->dtype))
            return xp_fail("%s has dtype %s", name, xp_dtype_name(out->w->dtype));
        return 0;
    }
    if (c->quant.kind == XP_QUANT_NONE)
        return xp_fail("%s is F8_E4M3 but config.json has no quantization_config", name);
    out->block[0] = c->quant.block[0];
    out->block[1] = c->quant.block[1];
    snprintf(name, sizeof name, "%s.%s", path, c->scale_suffix);
    if (!(out->scale = xp_need(c, name))) return -1;
    if (xp_check_shape(out->scale, xp_ceil_div(out->rows, out->block[0]),
                       xp_ceil_div(out->cols, out->block[1])) < 0)
        return -1;
    if (out->scale->dtype != XP_F32 && out->scale->dtype != XP_BF16 &&
        out->scale->dtype != XP_F16)
        return xp_fail("%s has dtype %s (expected F32, BF16 or F16)", name,
                       xp_dtype_name(out->scale->dtype));
    return 0;
}

/* Scales must be finite and non-negative, or every weight of their block is garbage. */
static int xp_check_scales(const xp_weight *w)
{
    float *s = malloc(w->scale->nelem * sizeof *s);
    if (!s) return xp_fail("out of memory");
    xp_convert_to_f32(w->scale->dtype, w->scale->data, s, w->scale->nelem);
    int rc = 0;
    for (uint64_t i = 0; i < w->scale->nelem && rc == 0; i++)
        if (!isfinite(s[i]) || s[i] < 0)
            rc = xp_fail("%s holds scale %g at block %llu (must be finite and >= 0)",
                         w->scale->name, s[i], (unsigned long long)i);
    free(s);
    return rc;
}

static int xp_ckpt_validate(xp_ckpt *c)
{
    const xp_qwen3_config *g = &c->cfg;
    char name[160];
    if (xp_check_plain(c, "model.embed_tokens.weight", g->vocab_size, g->hidden_size) < 0 ||
        xp_check_plain(c, "model.norm.weight", g->hidden_size, -1) < 0)
        return -1;
    const xp_tensor *head = xp_st_set_find(c->st, "lm_head.weight");
    if (g->tie_word_embeddings && head)
        return xp_fail("config.json ties the embeddings but the checkpoint has lm_head.weight");
    if (!g->tie_word_embeddings &&
        xp_check_plain(c, "lm_head.weight", g->vocab_size, g->hidden_size) < 0)
        return -1;
    for (int l = 0; l < g->num_hidden_layers; l++) {
        static const char *const norms[] = {"input_layernorm", "post_attention_layernorm",
                                            "self_attn.q_norm", "self_attn.k_norm"};
        for (int k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, norms[k]);
            if (xp_check_plain(c, name, k < 2 ? g->hidden_size : g->head_dim, -1) < 0) return -1;
        }
        for (int m = 0; m < XP_MOD_COUNT; m++) {
            xp_weight w;
            if (xp_ckpt_weight(c, l, (xp_module)m, &w) < 0) return -1;
            if (w.scale && xp_check_scales(&w) < 0) return -1;
            if (!w.scale && c->quant.kind != XP_QUANT_NONE) {
                char path[128];
                xp_module_path(path, sizeof path, l, (xp_module)m);
                int ign = xp_quant_ignored(&c->quant, path);
                if (ign < 0) return -1;
                if (!ign)
                    return xp_fail("%s is %s in an FP8 checkpoint and not in its ignore list",
                                   w.w->name, xp_dtype_name(w.w->dtype));
            }
        }
    }
    return 0;
}

int xp_ckpt_open(const char *dir, xp_ckpt **out)
{
    *out = NULL;
    xp_ckpt *c = calloc(1, sizeof *c);
    if (!c || !(c->dir = strdup(dir))) {
        free(c);
        return xp_fail("out of memory");
    }
    if (xp_qwen3_config_load(dir, &c->cfg, &c->quant) < 0) goto fail;
    c->scale_suffix = c->quant.kind == XP_QUANT_FP8      ? "weight_scale_inv"
                      : c->quant.kind == XP_QUANT_FP8_CT ? "weight_scale"
                                                         : NULL;
    if (xp_st_set_open(dir, "model", &c->st) < 0) goto fail;
    if (xp_ckpt_validate(c) < 0) {
        xp_fail_ctx("%s", dir);
        goto fail;
    }
    *out = c;
    return 0;
fail:
    xp_ckpt_close(c);
    return -1;
}

void xp_ckpt_close(xp_ckpt *c)
{
    if (!c) return;
    xp_st_set_close(c->st);
    xp_quant_config_free(&c->quant);
    free(c->dir);
    free(c);
}

static void xp_spec(xp_tensor_spec *out, size_t *n, const char *name, xp_role role, int layer,
                    xp_module m, int64_t d0, int64_t d1)
{
    if (out) {
        xp_tensor_spec *s = &out[*n];
        snprintf(s->name, sizeof s->name, "%s", name);
        s->role = role;
        s->layer = layer;
        s->mod = m;
        s->ndim = d1 < 0 ? 1 : 2;
        s->shape[0] = d0;
        s->shape[1] = d1 < 0 ? 0 : d1;
    }
    (*n)++;
}

size_t xp_qwen3_tensor_specs(const xp_qwen3_config *g, xp_tensor_spec *out)
{
    size_t n = 0;
    char name[96], path[80];
    xp_spec(out, &n, "model.embed_tokens.weight", XP_ROLE_EMBED, -1, 0, g->vocab_size,
            g->hidden_size);
    for (int l = 0; l < g->num_hidden_layers; l++) {
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        xp_spec(out, &n, name, XP_ROLE_NORM, l, 0, g->hidden_size, -1);
        for (int m = 0; m < XP_MOD_COUNT; m++) {
            int64_t o, i;
            xp_module_shape(g, (xp_module)m, &o, &i);
            xp_module_path(path, sizeof path, l, (xp_module)m);
            snprintf(name, sizeof name, "%s.weight", path);
            xp_spec(out, &n, name, XP_ROLE_LINEAR, l, (xp_module)m, o, i);
            if (m == XP_MOD_O) {
                snprintf(name, sizeof name, "model.layers.%d.self_attn.q_norm.weight", l);
                xp_spec(out, &n, name, XP_ROLE_NORM, l, 0, g->head_dim, -1);
                snprintf(name, sizeof name, "model.layers.%d.self_attn.k_norm.weight", l);
                xp_spec(out, &n, name, XP_ROLE_NORM, l, 0, g->head_dim, -1);
                snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
                xp_spec(out, &n, name, XP_ROLE_NORM, l, 0, g->hidden_size, -1);
            }
        }
    }
    xp_spec(out, &n, "model.norm.weight", XP_ROLE_NORM, -1, 0, g->hidden_size, -1);
    if (!g->tie_word_embeddings)
        xp_spec(out, &n, "lm_head.weight", XP_ROLE_LM_HEAD, -1, 0, g->vocab_size, g->hidden_size);
    return n;
}
