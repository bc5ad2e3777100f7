/* xprec quantize / dequantize: BF16 <-> FP8 block-quantized checkpoints, tensor by tensor (peak
 * memory is one tensor's worth, not the model's). quantize is the thesis's Method C. */
#include "format/blockquant.h"
#include "format/checkpoint.h"
#include "cli.h"
#include "commands.h"
#include "util/fsutil.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* config.json of in_dir with q's quantization_config, written to out_dir. */
static int xp_write_config(const char *in_dir, const char *out_dir, const xp_quant_config *q)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", in_dir);
    char *text = xp_read_text_file(path, 1u << 20);
    char *out = text ? xp_config_with_quant(text, q) : NULL;
    free(text);
    int rc = out ? xp_write_text(out_dir, "config.json", out) : -1;
    free(out);
    return rc;
}

static int xp_parse_block_arg(const char *s, int block[2])
{
    char *end;
    long r = strtol(s, &end, 10), c = r;
    if (*end == 'x') c = strtol(end + 1, &end, 10);
    if (*end || r < 1 || c < 1 || r > 65536 || c > 65536) return -1;
    block[0] = (int)r;
    block[1] = (int)c;
    return 0;
}

/* Is this linear module kept unquantized? */
static int xp_keep(const xp_quant_config *q, const char *tensor_name)
{
    char module[160];
    size_t n = strlen(tensor_name) - strlen(".weight");
    snprintf(module, sizeof module, "%.*s", (int)n, tensor_name);
    return xp_quant_ignored(q, module);
}

/* 1 when tensor t becomes FP8, 0 when it is copied, -1 on a bad ignore pattern. */
static int xp_is_quantized(const xp_quant_config *q, const xp_tensor *t)
{
    if (xp_tensor_role(t->name, NULL, NULL) != XP_ROLE_LINEAR) return 0;
    int keep = xp_keep(q, t->name);
    return keep < 0 ? -1 : !keep;
}

static int xp_quantize(const char *in, const char *out, xp_quant_config *q, size_t max_shard)
{
    xp_ckpt *c;
    if (xp_ckpt_open(in, &c) < 0) return -1;
    int rc = -1;
    xp_st_writer *w = xp_stw_new();
    float *buf = NULL, *scales = NULL;
    uint8_t *codes = NULL;
    void *sbuf = NULL;
    xp_dtype sdt = q->kind == XP_QUANT_FP8 ? XP_F32 : XP_BF16;
    const char *suffix = q->kind == XP_QUANT_FP8 ? "weight_scale_inv" : "weight_scale";
    if (!w) goto oom;
    if (c->quant.kind != XP_QUANT_NONE) {
        xp_fail("%s is already FP8-quantized", in);
        goto done;
    }
    /* every --ignore entry must name something: a typo would silently quantize the module */
    for (int i = 0; i < q->nignore; i++) {
        xp_quant_config one = {.kind = q->kind, .nignore = 1, .ignore = {q->ignore[i]}};
        int hit = strcmp(q->ignore[i], "lm_head") == 0;
        for (size_t k = 0; k < xp_st_set_count(c->st) && !hit; k++) {
            const xp_tensor *t = xp_st_set_tensor(c->st, k);
            if (xp_tensor_role(t->name, NULL, NULL) != XP_ROLE_LINEAR) continue;
            if ((hit = xp_keep(&one, t->name)) < 0) goto done;
        }
        if (!hit) {
            xp_fail("--ignore %s matches no linear module", q->ignore[i]);
            goto done;
        }
    }
    size_t n = xp_st_set_count(c->st), maxel = 0;
    uint64_t total = 0;
    char name[192];
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(c->st, i);
        total += t->nbytes;
        int quant = xp_is_quantized(q, t);
        if (quant < 0) goto done;
        if (xp_stw_declare(w, t->name, quant ? XP_F8_E4M3 : t->dtype, t->ndim, t->shape) < 0)
            goto done;
        if (!quant) continue;
        if (t->nelem > maxel) maxel = (size_t)t->nelem;
        int64_t ss[2] = {xp_ceil_div(t->shape[0], q->block[0]), xp_ceil_div(t->shape[1], q->block[1])};
        snprintf(name, sizeof name, "%.*s%s", (int)(strlen(t->name) - 6), t->name, suffix);
        if (xp_stw_declare(w, name, sdt, 2, ss) < 0) goto done;
    }
    size_t maxs = (size_t)xp_ceil_div((int64_t)maxel, (int64_t)q->block[0] * q->block[1]) + 65536;
    buf = malloc((maxel ? maxel : 1) * sizeof *buf);
    codes = malloc(maxel ? maxel : 1);
    scales = malloc(maxs * sizeof *scales);
    sbuf = malloc(maxs * 4);
    if (!buf || !codes || !scales || !sbuf) goto oom;
    if (xp_stw_open(w, out, "model", max_shard) < 0) goto done;
    xp_progress pr;
    xp_progress_begin(&pr, "quantize", n, total);
    uint64_t done_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(c->st, i);
        done_bytes += t->nbytes;
        int quant = xp_is_quantized(q, t);
        if (quant < 0) goto done;
        if (!quant) {
            if (xp_stw_write(w, t->name, t->data, t->nbytes) < 0) goto done;
            xp_tensor_release(t);
            continue;
        }
        int64_t rows = t->shape[0], cols = t->shape[1];
        size_t ns = (size_t)(xp_ceil_div(rows, q->block[0]) * xp_ceil_div(cols, q->block[1]));
        xp_convert_to_f32(t->dtype, t->data, buf, (size_t)t->nelem);
        if (xp_block_quantize(buf, rows, cols, q->block[0], q->block[1], sdt, codes, scales) < 0) {
            xp_fail_ctx("%s", t->name);
            goto done;
        }
        if (sdt == XP_F32)
            memcpy(sbuf, scales, ns * 4);
        else
            for (size_t k = 0; k < ns; k++) ((uint16_t *)sbuf)[k] = xp_f32_to_bf16(scales[k]);
        snprintf(name, sizeof name, "%.*s%s", (int)(strlen(t->name) - 6), t->name, suffix);
        if (xp_stw_write(w, t->name, codes, (size_t)t->nelem) < 0 ||
            xp_stw_write(w, name, sbuf, ns * xp_dtype_size(sdt)) < 0)
            goto done;
        xp_tensor_release(t);
        xp_progress_update(&pr, i + 1, done_bytes, t->name);
    }
    xp_progress_end(&pr);
    if (xp_write_config(in, out, q) < 0 || xp_copy_aux_files(in, out) < 0) goto done;
    rc = xp_stw_finish(w);
    goto done;
oom:
    xp_fail("out of memory");
done:
    xp_stw_free(w);
    xp_ckpt_close(c);
    free(buf);
    free(codes);
    free(scales);
    free(sbuf);
    return rc;
}

int xp_cmd_quantize(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *block = NULL, *ignore = NULL;
    int format = 0, force = 0;
    long shard_mb = XP_DEFAULT_SHARD_MB;
    xp_opt opts[] = {
        XP_STR_REQ("in", &in, "DIR", "the BF16 checkpoint"),
        XP_STR_REQ("out", &out, "DIR", "the FP8 checkpoint to write"),
        XP_STR("block", &block, "N|RxC", "block size (default 128x128)"),
        XP_CHOICE("format", &format, "qwen|compressed-tensors",
                  "qwen: weight_scale_inv (F32), quant_method fp8 (the default);\n"
                  "compressed-tensors: weight_scale (BF16) and a block config group"),
        XP_STR("ignore", &ignore, "MODULE,re:REGEX,...",
               "linear modules kept as they are\n"
               "(e.g. model.layers.0.mlp.down_proj or re:.*down_proj)"),
        XP_OPT_MAX_SHARD(&shard_mb),
        XP_OPT_FORCE(&force),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "quantize",
        .usage = "usage: xprec quantize --in DIR --out DIR [--block N|RxC] [--format "
                 "qwen|compressed-tensors]\n"
                 "                      [--ignore MODULE,re:REGEX,...] [--max-shard-mb N] [--force]\n",
        .about = "BF16 -> FP8 E4M3 with one scale per block (default 128x128): s = amax/448,\n"
                 "q = sat(W/s). Norms, embeddings and lm_head stay as they are, as do the\n"
                 "linear modules --ignore names.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    xp_quant_config q = {.kind = format ? XP_QUANT_FP8_CT : XP_QUANT_FP8, .block = {128, 128}};
    size_t max_shard = (size_t)shard_mb << 20;
    if (block && xp_parse_block_arg(block, q.block) < 0) {
        fprintf(stderr, "xprec quantize: --block needs N or RxC, got \"%s\"\n", block);
        return 2;
    }
    rc = 1;
    if (q.kind == XP_QUANT_FP8_CT) q.ignore[q.nignore++] = strdup("lm_head");
    char *list = ignore ? strdup(ignore) : NULL, *save = NULL;
    for (char *tok = list ? strtok_r(list, ",", &save) : NULL; tok;
         tok = strtok_r(NULL, ",", &save)) {
        if (q.nignore == XP_MAX_IGNORE) {
            fprintf(stderr, "xprec quantize: at most %d --ignore entries\n", XP_MAX_IGNORE);
            free(list);
            rc = 2;
            goto out;
        }
        q.ignore[q.nignore++] = strdup(tok);
    }
    free(list);
    if (xp_same_path(in, out)) {
        fprintf(stderr, "xprec quantize: --out must differ from --in\n");
        rc = 2;
        goto out;
    }
    xp_outdir od;
    if (xp_outdir_begin(&od, out, force) < 0 || xp_quantize(in, od.tmp, &q, max_shard) < 0 ||
        xp_outdir_commit(&od) < 0) {
        fprintf(stderr, "xprec quantize: %s\n", xp_last_error());
        xp_outdir_abort(&od);
        goto out;
    }
    rc = 0;
out:
    xp_quant_config_free(&q);
    return rc;
}

/* ---------------------------------------------------------------- dequantize */

static int xp_dequantize(const char *in, const char *out, xp_dtype odt, size_t max_shard)
{
    xp_ckpt *c;
    if (xp_ckpt_open(in, &c) < 0) return -1;
    int rc = -1;
    xp_st_writer *w = xp_stw_new();
    float *buf = NULL;
    void *obuf = NULL;
    if (!w) goto oom;
    if (c->quant.kind == XP_QUANT_NONE) {
        xp_fail("%s is not FP8-quantized", in);
        goto done;
    }
    size_t n = xp_st_set_count(c->st), maxel = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(c->st, i);
        xp_role role = xp_tensor_role(t->name, NULL, NULL);
        total += t->nbytes;
        if (role == XP_ROLE_SCALE) continue;
        int deq = role == XP_ROLE_LINEAR && t->dtype == XP_F8_E4M3;
        if (deq && t->nelem > maxel) maxel = (size_t)t->nelem;
        if (xp_stw_declare(w, t->name, deq ? odt : t->dtype, t->ndim, t->shape) < 0) goto done;
    }
    buf = malloc((maxel ? maxel : 1) * sizeof *buf);
    obuf = malloc((maxel ? maxel : 1) * xp_dtype_size(odt));
    if (!buf || !obuf) goto oom;
    if (xp_stw_open(w, out, "model", max_shard) < 0) goto done;
    xp_progress pr;
    xp_progress_begin(&pr, "dequantize", n, total);
    uint64_t done_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(c->st, i);
        int layer;
        xp_module m;
        xp_role role = xp_tensor_role(t->name, &layer, &m);
        done_bytes += t->nbytes;
        if (role == XP_ROLE_SCALE) continue;
        if (role != XP_ROLE_LINEAR || t->dtype != XP_F8_E4M3) {
            if (xp_stw_write(w, t->name, t->data, t->nbytes) < 0) goto done;
            xp_tensor_release(t);
            continue;
        }
        xp_weight wt;
        if (xp_ckpt_weight(c, layer, m, &wt) < 0 || xp_weight_to_f32(&wt, buf) < 0) goto done;
        if (odt == XP_F32)
            memcpy(obuf, buf, (size_t)t->nelem * 4);
        else
            for (uint64_t k = 0; k < t->nelem; k++) ((uint16_t *)obuf)[k] = xp_f32_to_bf16(buf[k]);
        if (xp_stw_write(w, t->name, obuf, (size_t)t->nelem * xp_dtype_size(odt)) < 0) goto done;
        xp_tensor_release(t);
        xp_progress_update(&pr, i + 1, done_bytes, t->name);
    }
    xp_progress_end(&pr);
    xp_quant_config none = {.kind = XP_QUANT_NONE};
    if (xp_write_config(in, out, &none) < 0 || xp_copy_aux_files(in, out) < 0) goto done;
    rc = xp_stw_finish(w);
    goto done;
oom:
    xp_fail("out of memory");
done:
    xp_stw_free(w);
    xp_ckpt_close(c);
    free(buf);
    free(obuf);
    return rc;
}

int xp_cmd_dequantize(int argc, char **argv)
{
    const char *in = NULL, *out = NULL;
    int dtype = 0, force = 0;
    long shard_mb = XP_DEFAULT_SHARD_MB;
    xp_opt opts[] = {
        XP_STR_REQ("in", &in, "DIR", "the FP8 checkpoint"),
        XP_STR_REQ("out", &out, "DIR", "the checkpoint to write"),
        XP_CHOICE("dtype", &dtype, "bf16|f32", "dtype of the dequantized weights (default bf16)"),
        XP_OPT_MAX_SHARD(&shard_mb),
        XP_OPT_FORCE(&force),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "dequantize",
        .usage = "usage: xprec dequantize --in DIR --out DIR [--dtype bf16|f32] [--max-shard-mb N]\n"
                 "                        [--force]\n",
        .about = "FP8 block checkpoint -> BF16 (the \"bridge model\"), or F32 to keep dequantized\n"
                 "values exact; scale tensors and quantization_config are dropped.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    xp_dtype odt = dtype ? XP_F32 : XP_BF16;
    size_t max_shard = (size_t)shard_mb << 20;
    if (xp_same_path(in, out)) {
        fprintf(stderr, "xprec dequantize: --out must differ from --in\n");
        return 2;
    }
    xp_outdir od;
    if (xp_outdir_begin(&od, out, force) < 0 || xp_dequantize(in, od.tmp, odt, max_shard) < 0 ||
        xp_outdir_commit(&od) < 0) {
        fprintf(stderr, "xprec dequantize: %s\n", xp_last_error());
        xp_outdir_abort(&od);
        return 1;
    }
    return 0;
}
