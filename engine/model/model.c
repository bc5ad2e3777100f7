#include "model/model.h"
#include "format/blockquant.h"
#include "util/xp_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float *xp_to_f32_copy(const xp_tensor *t)
{
    float *f = malloc((t->nelem ? t->nelem : 1) * sizeof *f);
    if (f) xp_convert_to_f32(t->dtype, t->data, f, (size_t)t->nelem);
    return f;
}

void xp_linear_check_scales(xp_linear *l)
{
    int64_t n = (l->rows + l->br - 1) / l->br * l->nbc;
    l->fp8_fast = l->dtype == XP_F8_E4M3;
    for (int64_t i = 0; i < n; i++)
        if (!(fabsf(l->scale[i]) < 256.0f)) l->fp8_fast = 0;
}

/* One pass over an FP8 weight's codes, block by block: marks the (row, block) runs holding
 * subnormal codes (l->sub, NULL when none) and finds the first NaN code in row-major order.
 * Returns its element index, -1 when there is none, -2 out of memory. */
static int64_t xp_linear_scan_fp8(xp_linear *l)
{
    free(l->sub);
    l->sub = NULL;
    const uint8_t *q = l->w;
    int64_t nan = -1;
    for (int64_t r = 0; r < l->rows; r++)
        for (int64_t b = 0; b < l->nbc; b++) {
            const uint8_t *p = q + r * l->cols + b * l->bc;
            int64_t n = (b + 1) * l->bc < l->cols ? l->bc : l->cols - b * l->bc;
            int sub = 0, bad = 0; /* no early exit: the loop vectorizes */
            for (int64_t j = 0; j < n; j++) {
                sub |= (p[j] & 0x78) == 0 && (p[j] & 0x07) != 0;
                bad |= (p[j] & 0x7f) == 0x7f;
            }
            for (int64_t j = 0; bad && nan < 0; j++)
                if ((p[j] & 0x7f) == 0x7f) nan = r * l->cols + b * l->bc + j;
            if (!sub) continue;
            if (!l->sub && !(l->sub = calloc((size_t)(l->rows * l->nbc), 1))) return -2;
            l->sub[r * l->nbc + b] = 1;
        }
    return nan;
}

int xp_linear_mark_subnormals(xp_linear *l)
{
    if (l->dtype != XP_F8_E4M3 || l->bc <= 0) {
        free(l->sub);
        l->sub = NULL;
        return 0;
    }
    return xp_linear_scan_fp8(l) == -2 ? -1 : 0;
}

static int xp_linear_init(xp_linear *l, const xp_tensor *w, const xp_tensor *scale, int br, int bc)
{
    memset(l, 0, sizeof *l);
    l->dtype = w->dtype;
    l->rows = w->shape[0];
    l->cols = w->shape[1];
    l->w = w->data;
    size_t align = xp_dtype_size(w->dtype);
    if ((uintptr_t)w->data % align) {
        /* foreign files may misalign 2- and 4-byte weights; the kernels load them directly */
        if (!(l->owned = aligned_alloc(64, (w->nbytes + 63) & ~(size_t)63)))
            return xp_fail("out of memory");
        memcpy(l->owned, w->data, w->nbytes);
        l->w = l->owned;
    }
    if (w->dtype == XP_F8_E4M3) {
        l->br = br;
        l->bc = bc;
        l->nbc = (l->cols + bc - 1) / bc;
        /* NaN codes refused and subnormal blocks marked in one read of the codes */
        int64_t nan = xp_linear_scan_fp8(l);
        if (nan == -2) return xp_fail("out of memory");
        if (nan >= 0)
            return xp_fail("%s holds an FP8 NaN code at element %llu", w->name,
                           (unsigned long long)nan);
        if (!(l->scale = xp_to_f32_copy(scale))) return xp_fail("out of memory");
        xp_linear_check_scales(l);
    } else if (w->dtype != XP_BF16 && w->dtype != XP_F16 && w->dtype != XP_F32) {
        return xp_fail("%s has dtype %s, which the engine does not run", w->name,
                       xp_dtype_name(w->dtype));
    }
    return 0;
}

#define XP_LM_HEAD_BLOCK 128

/* l (BF16, F16 or F32) as FP8 blocks of XP_LM_HEAD_BLOCK, in memory of its own: the engine's
 * own quantization (xp_block_quantize, F32 scales), a band of block rows at a time. */
static int xp_linear_to_fp8(xp_linear *l)
{
    if (l->dtype == XP_F8_E4M3) return 0;
    int64_t rows = l->rows, cols = l->cols, bands = xp_ceil_div(rows, XP_LM_HEAD_BLOCK);
    int64_t nbc = xp_ceil_div(cols, XP_LM_HEAD_BLOCK);
    size_t n = (size_t)rows * (size_t)cols;
    uint8_t *codes = malloc(n ? n : 1);
    float *scale = malloc((size_t)(bands * nbc) * sizeof *scale);
    float *band = malloc((size_t)(XP_LM_HEAD_BLOCK * cols) * sizeof *band);
    if (!codes || !scale || !band) {
        free(codes);
        free(scale);
        free(band);
        return xp_fail("out of memory for an FP8 lm_head");
    }
    int rc = 0;
    for (int64_t b = 0; b < bands && rc == 0; b++) {
        int64_t r0 = b * XP_LM_HEAD_BLOCK;
        int64_t nr = rows - r0 < XP_LM_HEAD_BLOCK ? rows - r0 : XP_LM_HEAD_BLOCK;
        for (int64_t r = 0; r < nr; r++)
            xp_linear_row(l, r0 + r, band + r * cols);
        rc = xp_block_quantize(band, nr, cols, XP_LM_HEAD_BLOCK, XP_LM_HEAD_BLOCK, XP_F32,
                               codes + r0 * cols, scale + b * nbc);
    }
    free(band);
    if (rc < 0) {
        free(codes);
        free(scale);
        return xp_fail_ctx("lm_head to FP8");
    }
    free(l->owned);
    *l = (xp_linear){.dtype = XP_F8_E4M3, .w = codes, .scale = scale, .rows = rows, .cols = cols,
                     .br = XP_LM_HEAD_BLOCK, .bc = XP_LM_HEAD_BLOCK, .nbc = nbc, .owned = codes};
    xp_linear_check_scales(l);
    if (xp_linear_mark_subnormals(l) < 0) return xp_fail("out of memory for an FP8 lm_head");
    return 0;
}

static void xp_linear_free(xp_linear *l)
{
    free(l->sub);
    free(l->scale);
    free(l->owned);
}

static float *xp_load_norm(const xp_ckpt *c, const char *name)
{
    const xp_tensor *t = xp_st_set_find(c->st, name);
    float *f = t ? xp_to_f32_copy(t) : NULL;
    if (!f) xp_fail("%s: %s", name, t ? "out of memory" : "missing");
    return f;
}

int xp_model_load(const char *dir, const xp_model_opts *o, xp_model **out)
{
    *out = NULL;
    xp_model *m = calloc(1, sizeof *m);
    if (!m) return xp_fail("out of memory");
    if (xp_ckpt_open(dir, &m->ckpt) < 0) {
        free(m);
        return -1;
    }
    const xp_qwen3_config *g = &m->cfg;
    m->cfg = m->ckpt->cfg;
    if (o && o->rope_scaling && xp_rope_scaling_parse(o->rope_scaling, &m->cfg) < 0) goto fail;
    m->layers = calloc((size_t)g->num_hidden_layers, sizeof *m->layers);
    m->inv_freq = malloc((size_t)(g->head_dim / 2) * sizeof *m->inv_freq);
    if (!m->layers || !m->inv_freq) goto oom;
    xp_qwen3_inv_freq(g, m->inv_freq);
    float af = g->rope.yarn ? (float)g->rope.attention_factor : 1.0f;
    char name[160];
    for (int l = 0; l < g->num_hidden_layers; l++) {
        xp_layer *L = &m->layers[l];
        static const char *const norms[] = {"input_layernorm", "post_attention_layernorm",
                                            "self_attn.q_norm", "self_attn.k_norm"};
        float **dst[] = {&L->attn_norm, &L->mlp_norm, &L->q_norm, &L->k_norm};
        for (int k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, norms[k]);
            if (!(*dst[k] = xp_load_norm(m->ckpt, name))) goto fail;
        }
        for (int i = 0; af != 1.0f && i < g->head_dim; i++) {
            L->q_norm[i] *= af;
            L->k_norm[i] *= af;
        }
        for (int k = 0; k < XP_MOD_COUNT; k++) {
            xp_weight w;
            if (xp_ckpt_weight(m->ckpt, l, (xp_module)k, &w) < 0 ||
                xp_linear_init(&L->lin[k], w.w, w.scale, w.block[0], w.block[1]) < 0)
                goto fail;
        }
    }
    if (!(m->final_norm = xp_load_norm(m->ckpt, "model.norm.weight"))) goto fail;
    const xp_tensor *e = xp_st_set_find(m->ckpt->st, "model.embed_tokens.weight");
    if (xp_linear_init(&m->embed, e, NULL, 0, 0) < 0) goto fail;
    if (g->tie_word_embeddings) {
        m->lm_head = m->embed;
        m->lm_head.owned = NULL; /* freed once, through embed */
    } else {
        const xp_tensor *h = xp_st_set_find(m->ckpt->st, "lm_head.weight");
        if (xp_linear_init(&m->lm_head, h, NULL, 0, 0) < 0) goto fail;
    }
    if (o && o->lm_head_fp8 && xp_linear_to_fp8(&m->lm_head) < 0) goto fail;
    *out = m;
    return 0;
oom:
    xp_fail("out of memory");
fail:
    xp_fail_ctx("%s", dir);
    xp_model_free(m);
    return -1;
}

void xp_model_free(xp_model *m)
{
    if (!m) return;
    for (int l = 0; m->layers && l < m->cfg.num_hidden_layers; l++) {
        xp_layer *L = &m->layers[l];
        free(L->attn_norm);
        free(L->mlp_norm);
        free(L->q_norm);
        free(L->k_norm);
        for (int k = 0; k < XP_MOD_COUNT; k++)
            xp_linear_free(&L->lin[k]);
    }
    free(m->layers);
    free(m->final_norm);
    free(m->inv_freq);
    xp_linear_free(&m->embed);
    xp_linear_free(&m->lm_head); /* tied and as stored: nothing of its own (NULL) */
    xp_ckpt_close(m->ckpt);
    free(m);
}

static uint64_t xp_linear_bytes(const xp_linear *l)
{
    uint64_t b = (uint64_t)(l->rows * l->cols) * xp_dtype_size(l->dtype);
    if (l->scale) b += (uint64_t)((l->rows + l->br - 1) / l->br * l->nbc) * 4;
    return b;
}

uint64_t xp_model_step_bytes(const xp_model *m)
{
    uint64_t b = xp_linear_bytes(&m->lm_head);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int k = 0; k < XP_MOD_COUNT; k++)
            b += xp_linear_bytes(&m->layers[l].lin[k]);
    return b;
}

void xp_linear_row(const xp_linear *l, int64_t r, float *dst)
{
    const unsigned char *base = l->w;
    size_t es = xp_dtype_size(l->dtype);
    xp_convert_to_f32(l->dtype, base + (size_t)(r * l->cols) * es, dst, (size_t)l->cols);
    if (l->dtype == XP_F8_E4M3) {
        const float *s = l->scale + (r / l->br) * l->nbc;
        for (int64_t j = 0; j < l->cols; j++)
            dst[j] *= s[j / l->bc];
    }
}
