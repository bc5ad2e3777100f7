/* xprec synth: random Qwen3-shaped BF16 checkpoints for tests and benchmarks, and planted
 * "fine-tunes" of them (base + a known rank-K update + optional dense noise) that stand in for a
 * real fine-tune when testing extraction and fidelity. */
#include "format/checkpoint.h"
#include "tokenizer/tokenizer.h"
#include "cli.h"
#include "commands.h"
#include "util/rng.h"
#include "util/xp_error.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XP_WEIGHT_STD 0.02f

typedef struct {
    const char *out, *tokenizer, *tuned_from;
    uint64_t seed;
    xp_qwen3_config cfg;
    long delta_rank;
    double delta_scale, noise, norm_delta, embed_delta;
    size_t max_shard;
} xp_synth_opts;

/* in the order of --preset's choices */
static const xp_qwen3_config xp_presets[] = {
    /* tiny, for tests: the real vocabulary, GQA, hidden and intermediate not multiples of 128 */
    {320, 800, 2, 4, 2, 64, 151936, 40960, 1e-6, 1e6, 0},
    /* small, for benchmarks: exactly Qwen3-0.6B's shape */
    {1024, 3072, 28, 16, 8, 128, 151936, 40960, 1e-6, 1e6, 1},
    /* qwen3-32b, for GPU benchmarks: Qwen3-32B's shape */
    {5120, 25600, 64, 64, 8, 128, 151936, 40960, 1e-6, 1e6, 0},
};

static const char xp_generation_config[] =
    "{\n  \"bos_token_id\": 151643,\n  \"do_sample\": true,\n  \"eos_token_id\": [151645, "
    "151643],\n  \"pad_token_id\": 151643,\n  \"temperature\": 0.6,\n  \"top_k\": 20,\n  "
    "\"top_p\": 0.95,\n  \"transformers_version\": \"4.51.0\"\n}";

static void xp_to_bf16(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] = xp_f32_to_bf16(src[i]);
}

static double xp_norm(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return sqrt(s);
}

static int xp_synth_base(const xp_synth_opts *o)
{
    size_t n = xp_qwen3_tensor_specs(&o->cfg, NULL);
    xp_tensor_spec *specs = calloc(n, sizeof *specs);
    xp_st_writer *w = xp_stw_new();
    float *buf = NULL;
    uint16_t *out = NULL;
    int rc = -1;
    if (!specs || !w) {
        xp_fail("out of memory");
        goto done;
    }
    xp_qwen3_tensor_specs(&o->cfg, specs);
    size_t maxel = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t el = (size_t)specs[i].shape[0] * (size_t)(specs[i].ndim == 2 ? specs[i].shape[1] : 1);
        if (el > maxel) maxel = el;
        total += 2 * el;
        if (xp_stw_declare(w, specs[i].name, XP_BF16, specs[i].ndim, specs[i].shape) < 0)
            goto done;
    }
    buf = malloc(maxel * sizeof *buf);
    out = malloc(maxel * sizeof *out);
    if (!buf || !out) {
        xp_fail("out of memory");
        goto done;
    }
    if (xp_stw_open(w, o->out, "model", o->max_shard) < 0) goto done;
    xp_progress pr;
    xp_progress_begin(&pr, "synth", n, total);
    uint64_t done_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor_spec *s = &specs[i];
        size_t el = (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
        xp_rng r;
        xp_rng_seed(&r, o->seed, s->name);
        if (s->role == XP_ROLE_NORM)
            xp_rng_fill_normal(&r, buf, el, 1.0f, XP_WEIGHT_STD);
        else
            xp_rng_fill_normal(&r, buf, el, 0.0f, XP_WEIGHT_STD);
        xp_to_bf16(buf, out, el);
        if (xp_stw_write(w, s->name, out, el * 2) < 0) goto done;
        done_bytes += el * 2;
        xp_progress_update(&pr, i + 1, done_bytes, s->name);
    }
    xp_progress_end(&pr);
    rc = xp_stw_finish(w);
done:
    xp_stw_free(w);
    free(specs);
    free(buf);
    free(out);
    return rc;
}

/* W += S ||W|| U V / ||U V|| (U [out, K], V [K, in] Gaussian) + E ||W|| N / ||N||. */
static int xp_plant_delta(const xp_synth_opts *o, const char *name, float *wt, int64_t rows,
                          int64_t cols, float *tmp)
{
    size_t el = (size_t)(rows * cols);
    double wn = xp_norm(wt, el);
    xp_rng r;
    char stream[160];
    if (o->delta_rank > 0 && o->delta_scale > 0) {
        int64_t k = o->delta_rank < rows && o->delta_rank < cols ? o->delta_rank
                                                                 : (rows < cols ? rows : cols);
        float *u = malloc((size_t)(rows * k) * sizeof *u), *v = malloc((size_t)(k * cols) * sizeof *v);
        if (!u || !v) {
            free(u);
            free(v);
            return xp_fail("out of memory");
        }
        snprintf(stream, sizeof stream, "delta:%s", name);
        xp_rng_seed(&r, o->seed, stream);
        xp_rng_fill_normal(&r, u, (size_t)(rows * k), 0, 1);
        xp_rng_fill_normal(&r, v, (size_t)(k * cols), 0, 1);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)cols, (int)k, 1.0f,
                    u, (int)k, v, (int)cols, 0.0f, tmp, (int)cols);
        free(u);
        free(v);
        double dn = xp_norm(tmp, el);
        float f = dn > 0 ? (float)(o->delta_scale * wn / dn) : 0;
        for (size_t i = 0; i < el; i++) wt[i] += f * tmp[i];
    }
    if (o->noise > 0) {
        snprintf(stream, sizeof stream, "noise:%s", name);
        xp_rng_seed(&r, o->seed, stream);
        xp_rng_fill_normal(&r, tmp, el, 0, 1);
        double nn = xp_norm(tmp, el);
        float f = (float)(o->noise * wn / nn);
        for (size_t i = 0; i < el; i++) wt[i] += f * tmp[i];
    }
    return 0;
}

static int xp_synth_tuned(xp_synth_opts *o)
{
    xp_ckpt *base;
    if (xp_ckpt_open(o->tuned_from, &base) < 0) return -1;
    int rc = -1;
    xp_st_writer *w = xp_stw_new();
    float *buf = NULL, *tmp = NULL;
    uint16_t *out = NULL;
    if (!w) goto oom;
    if (base->quant.kind != XP_QUANT_NONE) {
        xp_fail("%s is FP8-quantized; a fine-tune is made from a BF16 base", o->tuned_from);
        goto done;
    }
    size_t n = xp_st_set_count(base->st), maxel = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(base->st, i);
        if (t->nelem > maxel) maxel = (size_t)t->nelem;
        total += t->nbytes;
        xp_role role = xp_tensor_role(t->name, NULL, NULL);
        /* changed tensors are written as BF16; untouched ones keep their dtype */
        int changed = role == XP_ROLE_LINEAR || role == XP_ROLE_NORM || role == XP_ROLE_EMBED ||
                      role == XP_ROLE_LM_HEAD;
        if (xp_stw_declare(w, t->name, changed ? XP_BF16 : t->dtype, t->ndim, t->shape) < 0)
            goto done;
    }
    buf = malloc(maxel * sizeof *buf);
    tmp = malloc(maxel * sizeof *tmp);
    out = malloc(maxel * sizeof *out);
    if (!buf || !tmp || !out) goto oom;
    if (xp_stw_open(w, o->out, "model", o->max_shard) < 0) goto done;
    xp_progress pr;
    xp_progress_begin(&pr, "synth", n, total);
    uint64_t done_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(base->st, i);
        size_t el = (size_t)t->nelem;
        xp_role role = xp_tensor_role(t->name, NULL, NULL);
        if (role != XP_ROLE_LINEAR && role != XP_ROLE_NORM && role != XP_ROLE_EMBED &&
            role != XP_ROLE_LM_HEAD) {
            if (xp_stw_write(w, t->name, t->data, t->nbytes) < 0) goto done;
            xp_tensor_release(t);
            continue;
        }
        xp_convert_to_f32(t->dtype, t->data, buf, el);
        xp_rng r;
        char stream[160];
        snprintf(stream, sizeof stream, "tune:%s", t->name);
        xp_rng_seed(&r, o->seed, stream);
        if (role == XP_ROLE_LINEAR) {
            if (xp_plant_delta(o, t->name, buf, t->shape[0], t->shape[1], tmp) < 0) goto done;
        } else if (role == XP_ROLE_NORM && o->norm_delta > 0) {
            for (size_t k = 0; k < el; k++)
                buf[k] *= 1.0f + (float)o->norm_delta * xp_rng_normal(&r);
        } else if (role != XP_ROLE_NORM && o->embed_delta > 0) {
            float f = (float)(o->embed_delta * xp_norm(buf, el) / sqrt((double)el));
            for (size_t k = 0; k < el; k++) buf[k] += f * xp_rng_normal(&r);
        }
        xp_to_bf16(buf, out, el);
        if (xp_stw_write(w, t->name, out, el * 2) < 0) goto done;
        done_bytes += t->nbytes;
        xp_tensor_release(t);
        xp_progress_update(&pr, i + 1, done_bytes, t->name);
    }
    xp_progress_end(&pr);
    if (xp_copy_aux_files(o->tuned_from, o->out) < 0) goto done;
    char src[4096], dst[4096];
    snprintf(src, sizeof src, "%s/config.json", o->tuned_from);
    snprintf(dst, sizeof dst, "%s/config.json", o->out);
    if (xp_copy_file(src, dst) < 0) goto done;
    rc = xp_stw_finish(w);
    goto done;
oom:
    xp_fail("out of memory");
done:
    xp_stw_free(w);
    xp_ckpt_close(base);
    free(buf);
    free(tmp);
    free(out);
    return rc;
}

/* A new random checkpoint in o->out: config, generation config, weights, tokenizer. */
static int xp_synth_new(const xp_synth_opts *o)
{
    /* check the shape by the same rules every reader applies */
    char *cfg = xp_qwen3_config_json(&o->cfg);
    xp_qwen3_config check;
    int bad = !cfg || xp_qwen3_config_parse(cfg, &check, NULL) < 0 ||
              xp_write_text(o->out, "config.json", cfg) < 0;
    free(cfg);
    if (bad || xp_write_text(o->out, "generation_config.json", xp_generation_config) < 0 ||
        xp_synth_base(o) < 0)
        return -1;
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; o->tokenizer && i < 2; i++) {
        char src[4096], dst[4096];
        snprintf(src, sizeof src, "%s/%s", o->tokenizer, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", o->out, files[i]);
        if (xp_copy_file(src, dst) < 0) return -1;
    }
    return 0;
}

int xp_cmd_synth(int argc, char **argv)
{
    xp_synth_opts o = {0};
    int preset = -1, tied = 0, untied = 0, force = 0;
    long seed = 0, shard_mb = XP_DEFAULT_SHARD_MB;
    long dims[7] = {-1, -1, -1, -1, -1, -1, -1};
    xp_opt opts[] = {
        XP_CHOICE("preset", &preset, "tiny|small|qwen3-32b",
                  "tiny (tests), small (Qwen3-0.6B's shape), qwen3-32b (its shape)"),
        XP_STR_REQ("out", &o.out, "DIR", "the checkpoint directory to write"),
        XP_OPT_SEED(&seed, "the weights are a function of the seed (default 0)"),
        XP_STR("tokenizer", &o.tokenizer, "DIR",
               "copy tokenizer.json and tokenizer_config.json from DIR"),
        XP_INT("hidden", &dims[0], 1, 1 << 20, "N", "override the preset's hidden_size"),
        XP_INT("intermediate", &dims[1], 1, 1 << 20, "N", "... intermediate_size"),
        XP_INT("layers", &dims[2], 1, 1 << 20, "N", "... num_hidden_layers"),
        XP_INT("heads", &dims[3], 1, 1 << 20, "N", "... num_attention_heads"),
        XP_INT("kv-heads", &dims[4], 1, 1 << 20, "N", "... num_key_value_heads"),
        XP_INT("head-dim", &dims[5], 1, 1 << 20, "N", "... head_dim"),
        XP_INT("vocab", &dims[6], 1, 1 << 20, "N", "... vocab_size"),
        XP_FLAG("tied", &tied, "lm_head shares the embeddings"),
        XP_FLAG("untied", &untied, "lm_head is a tensor of its own"),
        XP_STR("tuned-from", &o.tuned_from, "BASE", "write a planted fine-tune of BASE instead"),
        XP_INT("delta-rank", &o.delta_rank, 0, 1 << 16, "K", "rank of the planted update"),
        XP_NUM("delta-scale", &o.delta_scale, 0, 100, "S", "||dW|| = S ||W||"),
        XP_NUM("noise", &o.noise, 0, 100, "E", "dense noise with ||N|| = E ||W||"),
        XP_NUM("norm-delta", &o.norm_delta, 0, 10, "F", "norms scaled by (1 + F x N(0,1))"),
        XP_NUM("embed-delta", &o.embed_delta, 0, 10, "F",
               "embeddings and lm_head moved by a relative F"),
        XP_OPT_MAX_SHARD(&shard_mb),
        XP_OPT_FORCE(&force),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "synth",
        .usage =
            "usage: xprec synth --preset tiny|small|qwen3-32b --out DIR [--seed N] [--tokenizer DIR]\n"
            "                   [--hidden N] [--intermediate N] [--layers N] [--heads N]\n"
            "                   [--kv-heads N] [--head-dim N] [--vocab N] [--tied|--untied]\n"
            "       xprec synth --tuned-from BASE --delta-rank K --delta-scale S [--noise E]\n"
            "                   [--norm-delta F] [--embed-delta F] --out DIR [--seed N]\n"
            "       either with [--max-shard-mb N] [--force]\n",
        .about = "A random BF16 Qwen3 checkpoint (weights ~N(0, 0.02), norms ~1), deterministic for a\n"
                 "seed; or a fine-tune of BASE: every linear weight W plus a planted rank-K update\n"
                 "with ||dW|| = S ||W|| and dense noise with ||N|| = E ||W||; norms scaled by\n"
                 "(1 + F x N(0,1)), embeddings and lm_head moved by a relative F.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    if ((preset < 0) == !o.tuned_from)
        return xp_cmd_usage_error(&cmd, "give exactly one of --preset or --tuned-from");
    if (tied && untied) return xp_cmd_usage_error(&cmd, "give --tied or --untied, not both");
    o.seed = (uint64_t)seed;
    o.max_shard = (size_t)shard_mb << 20;
    if (o.tuned_from) {
        if (o.delta_rank == 0 && o.noise == 0 && o.norm_delta == 0 && o.embed_delta == 0) {
            return xp_cmd_usage_error(&cmd, "--tuned-from needs --delta-rank and --delta-scale "
                                            "(or --noise): the fine-tune would equal its base");
        }
        if ((o.delta_rank > 0) != (o.delta_scale > 0))
            return xp_cmd_usage_error(&cmd, "--delta-rank and --delta-scale go together");
    } else {
        o.cfg = xp_presets[preset];
        int *f[7] = {&o.cfg.hidden_size, &o.cfg.intermediate_size, &o.cfg.num_hidden_layers,
                     &o.cfg.num_attention_heads, &o.cfg.num_key_value_heads, &o.cfg.head_dim,
                     &o.cfg.vocab_size};
        for (int i = 0; i < 7; i++)
            if (dims[i] > 0) *f[i] = (int)dims[i];
        if (tied || untied) o.cfg.tie_word_embeddings = tied;
    }
    if (o.tuned_from && xp_same_path(o.tuned_from, o.out))
        return xp_cmd_usage_error(&cmd, "--out must differ from --tuned-from");
    xp_outdir od;
    /* a tokenizer that would not load fails now, not after the weights are written */
    if (o.tokenizer) {
        xp_tokenizer *tk = xp_tokenizer_load(o.tokenizer);
        if (!tk) goto fail;
        xp_tokenizer_free(tk);
    }
    if (xp_outdir_begin(&od, o.out, force) < 0) goto fail;
    o.out = od.tmp;
    if ((o.tuned_from ? xp_synth_tuned(&o) : xp_synth_new(&o)) < 0 || xp_outdir_commit(&od) < 0) {
        xp_outdir_abort(&od);
        goto fail;
    }
    return 0;
fail:
    fprintf(stderr, "xprec synth: %s\n", xp_last_error());
    return 1;
}
