/* xprec inspect: what is in a checkpoint, adapter or safetensors file — the tensor table, the
 * detected format and block size, and per-tensor statistics after dequantization, with warnings
 * for values no trained model has (the thesis's "autopsy", as a command). */
#include "format/blockquant.h"
#include "format/checkpoint.h"
#include "cli.h"
#include "commands.h"
#include "format/fp8.h"
#include "util/fsutil.h"
#include "format/peft.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    double mean, std, min, max;
    uint64_t nan, inf, n;
} xp_stats;

typedef struct {
    uint64_t n;
    double mean, m2, min, max;
    uint64_t nan, inf;
} xp_acc;

/* Welford's update: stable for hundreds of millions of values. */
static void xp_acc_add(xp_acc *a, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        if (isnan(v)) {
            a->nan++;
            continue;
        }
        if (isinf(v)) {
            a->inf++;
            continue;
        }
        a->n++;
        double d = v - a->mean;
        a->mean += d / (double)a->n;
        a->m2 += d * (v - a->mean);
        if (a->n == 1 || v < a->min) a->min = v;
        if (a->n == 1 || v > a->max) a->max = v;
    }
}

/* Statistics of t's values; FP8 codes are multiplied by their block scales when scale is given. */
static void xp_tensor_stats(const xp_tensor *t, const xp_tensor *scale, const int block[2],
                            xp_stats *st)
{
    xp_acc a = {0};
    float buf[4096];
    if (t->dtype == XP_F8_E4M3 && scale && t->ndim == 2) {
        int64_t rows = t->shape[0], cols = t->shape[1], nbc = xp_ceil_div(cols, block[1]);
        float *s = malloc(scale->nelem * sizeof *s);
        float *row = malloc((size_t)(cols ? cols : 1) * sizeof *row);
        if (s && row) {
            xp_convert_to_f32(scale->dtype, scale->data, s, scale->nelem);
            const uint8_t *q = t->data;
            for (int64_t i = 0; i < rows; i++) {
                const float *sr = s + (i / block[0]) * nbc;
                for (int64_t j = 0; j < cols; j++)
                    row[j] = xp_fp8_e4m3_to_f32(q[i * cols + j]) * sr[j / block[1]];
                xp_acc_add(&a, row, (size_t)cols);
            }
        }
        free(s);
        free(row);
    } else if (xp_dtype_is_float(t->dtype) || t->dtype == XP_F64) {
        const unsigned char *p = t->data;
        size_t es = xp_dtype_size(t->dtype);
        for (uint64_t i = 0; i < t->nelem; i += 4096) {
            size_t n = t->nelem - i < 4096 ? (size_t)(t->nelem - i) : 4096;
            xp_convert_to_f32(t->dtype, p + i * es, buf, n);
            xp_acc_add(&a, buf, n);
        }
    }
    st->n = a.n;
    st->mean = a.mean;
    st->std = a.n > 1 ? sqrt(a.m2 / (double)a.n) : 0;
    st->min = a.min;
    st->max = a.max;
    st->nan = a.nan;
    st->inf = a.inf;
}

typedef struct {
    const char *kind; /* "bf16", "fp8", "fp8-compressed-tensors", "peft-lora", "safetensors" */
    int block[2];
    const char *scale_suffix;
} xp_format;

/* The scale tensor of an FP8 weight, found by name. */
static const xp_tensor *xp_scale_of(const xp_st_set *s, const char *name, const char *suffix)
{
    size_t n = strlen(name);
    if (n < 7 || strcmp(name + n - 7, ".weight") != 0 || !suffix) return NULL;
    char buf[256];
    snprintf(buf, sizeof buf, "%.*s.%s", (int)(n - 7), name, suffix);
    return xp_st_set_find(s, buf);
}

static void xp_warn(cJSON *warnings, int json, const char *fmt, ...) XP_PRINTF(3, 4);
static void xp_warn(cJSON *warnings, int json, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cJSON_AddItemToArray(warnings, cJSON_CreateString(msg));
    if (!json) printf("warning: %s\n", msg);
}

static void xp_shape_str(const xp_tensor *t, char *buf, size_t size)
{
    size_t l = 0;
    buf[l++] = '[';
    buf[l] = '\0';
    for (int i = 0; i < t->ndim && l + 24 < size; i++)
        l += (size_t)snprintf(buf + l, size - l, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    snprintf(buf + l, size - l, "]");
}

/* Detects the format: from config.json or adapter_config.json when the directory has one,
 * otherwise from the tensors' names and dtypes. */
static int xp_detect(const char *path, int is_dir, const xp_st_set *s, xp_format *f, cJSON *info,
                     cJSON *warnings, int json)
{
    f->kind = "safetensors";
    f->block[0] = f->block[1] = 128;
    if (is_dir) {
        char *cp = xp_path_join(path, "adapter_config.json");
        struct stat st;
        int is_adapter = cp && stat(cp, &st) == 0;
        free(cp);
        if (is_adapter) {
            xp_peft *p;
            f->kind = "peft-lora";
            if (xp_peft_open(path, &p) < 0) {
                xp_warn(warnings, json, "%s", xp_last_error());
                return 0;
            }
            cJSON_AddNumberToObject(info, "r", p->r);
            cJSON_AddNumberToObject(info, "lora_alpha", p->alpha);
            cJSON_AddBoolToObject(info, "use_rslora", p->use_rslora);
            cJSON_AddNumberToObject(info, "modules", (double)p->n);
            xp_peft_close(p);
            return 0;
        }
        xp_qwen3_config cfg;
        xp_quant_config q;
        if (xp_qwen3_config_load(path, &cfg, &q) < 0) {
            xp_warn(warnings, json, "%s", xp_last_error());
        } else {
            f->kind = q.kind == XP_QUANT_FP8      ? "fp8"
                      : q.kind == XP_QUANT_FP8_CT ? "fp8-compressed-tensors"
                                                  : "unquantized";
            if (q.kind != XP_QUANT_NONE) {
                f->block[0] = q.block[0];
                f->block[1] = q.block[1];
                f->scale_suffix = q.kind == XP_QUANT_FP8 ? "weight_scale_inv" : "weight_scale";
            }
            cJSON_AddNumberToObject(info, "hidden_size", cfg.hidden_size);
            cJSON_AddNumberToObject(info, "intermediate_size", cfg.intermediate_size);
            cJSON_AddNumberToObject(info, "num_hidden_layers", cfg.num_hidden_layers);
            cJSON_AddNumberToObject(info, "num_attention_heads", cfg.num_attention_heads);
            cJSON_AddNumberToObject(info, "num_key_value_heads", cfg.num_key_value_heads);
            cJSON_AddNumberToObject(info, "head_dim", cfg.head_dim);
            cJSON_AddNumberToObject(info, "vocab_size", cfg.vocab_size);
            cJSON_AddBoolToObject(info, "tie_word_embeddings", cfg.tie_word_embeddings);
            xp_quant_config_free(&q);
            /* the full structural check every loader applies */
            xp_ckpt *c;
            if (xp_ckpt_open(path, &c) < 0)
                xp_warn(warnings, json, "not loadable as a Qwen3 checkpoint: %s", xp_last_error());
            else
                xp_ckpt_close(c);
            return 0;
        }
    }
    for (size_t i = 0; i < xp_st_set_count(s); i++) {
        const char *n = xp_st_set_tensor(s, i)->name;
        size_t l = strlen(n);
        if (l > 17 && strcmp(n + l - 17, ".weight_scale_inv") == 0) {
            f->kind = "fp8";
            f->scale_suffix = "weight_scale_inv";
        } else if (l > 13 && strcmp(n + l - 13, ".weight_scale") == 0) {
            f->kind = "fp8-compressed-tensors";
            f->scale_suffix = "weight_scale";
        }
    }
    if (f->scale_suffix) {
        /* no config to say the block size: infer it from the first weight/scale pair */
        for (size_t i = 0; i < xp_st_set_count(s); i++) {
            const xp_tensor *t = xp_st_set_tensor(s, i), *sc = xp_scale_of(s, t->name, f->scale_suffix);
            if (!sc || t->ndim != 2 || sc->ndim != 2 || !sc->shape[0] || !sc->shape[1]) continue;
            for (int d = 0; d < 2; d++) {
                int b = 1;
                while (xp_ceil_div(t->shape[d], b) > sc->shape[d]) b *= 2;
                f->block[d] = b;
            }
            break;
        }
    }
    return 0;
}

int xp_cmd_inspect(int argc, char **argv)
{
    int json = 0, no_stats = 0, npos = 0;
    const char *pos[1];
    xp_opt opts[] = {XP_FLAG("json", &json, "print everything as one JSON object"),
                     XP_FLAG("no-stats", &no_stats, "skip the per-tensor statistics"),
                     XP_OPT_END};
    const xp_cmd cmd = {
        .name = "inspect",
        .usage = "usage: xprec inspect PATH [--json] [--no-stats]\n",
        .about = "PATH is a checkpoint or adapter directory, or one .safetensors file. Prints the\n"
                 "tensor table, the detected format and block size, and per-tensor statistics\n"
                 "(after dequantization for FP8 weights), with warnings for implausible values.\n",
        .opts = opts, .pos = pos, .max_pos = 1, .npos = &npos};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    if (npos != 1) return xp_cmd_usage_error(&cmd, "give the PATH to inspect");
    int stats = !no_stats;
    const char *path = pos[0];
    struct stat st;
    if (stat(path, &st) < 0) {
        fprintf(stderr, "xprec inspect: %s: no such file or directory\n", path);
        return 1;
    }
    int is_dir = S_ISDIR(st.st_mode);
    xp_st_set *s = NULL;
    if (!is_dir) {
        rc = xp_st_set_open_file(path, &s);
    } else {
        char *ap = xp_path_join(path, "adapter_config.json");
        rc = xp_st_set_open(path, ap && stat(ap, &st) == 0 ? "adapter_model" : "model", &s);
        free(ap);
    }
    if (rc < 0) {
        fprintf(stderr, "xprec inspect: %s\n", xp_last_error());
        return 1;
    }
    cJSON *root = cJSON_CreateObject(), *warnings = cJSON_CreateArray();
    cJSON *info = cJSON_CreateObject(), *tensors = cJSON_CreateArray();
    xp_format f = {0};
    cJSON_AddStringToObject(root, "path", path);
    xp_detect(path, is_dir, s, &f, info, warnings, json);
    cJSON_AddStringToObject(root, "format", f.kind);
    if (f.scale_suffix) {
        cJSON_AddItemToObject(root, "block_size", cJSON_CreateIntArray(f.block, 2));
        cJSON_AddStringToObject(root, "scale_name", f.scale_suffix);
    }
    cJSON_AddItemToObject(root, "config", info);
    if (!json) {
        printf("%s: %s", path, f.kind);
        if (f.scale_suffix) printf(", block %dx%d, scales in *.%s", f.block[0], f.block[1], f.scale_suffix);
        printf(", %zu tensors in %zu file(s)\n", xp_st_set_count(s), xp_st_set_nfiles(s));
        if (info->child) {
            printf("config:");
            for (const cJSON *e = info->child; e; e = e->next) {
                if (cJSON_IsBool(e))
                    printf(" %s=%s", e->string, cJSON_IsTrue(e) ? "true" : "false");
                else
                    printf(" %s=%g", e->string, e->valuedouble);
            }
            printf("\n");
        }
        printf("%-56s %-8s %-16s %12s", "tensor", "dtype", "shape", "bytes");
        if (stats) printf(" %11s %10s %11s %11s", "mean", "std", "min", "max");
        printf("\n");
    }
    uint64_t total = 0, by_dtype[XP_DTYPE_COUNT] = {0};
    for (size_t i = 0; i < xp_st_set_count(s); i++) {
        const xp_tensor *t = xp_st_set_tensor(s, i);
        total += t->nbytes;
        by_dtype[t->dtype] += t->nbytes;
        char shape[96];
        xp_shape_str(t, shape, sizeof shape);
        cJSON *jt = cJSON_CreateObject();
        cJSON_AddStringToObject(jt, "name", t->name);
        cJSON_AddStringToObject(jt, "dtype", xp_dtype_name(t->dtype));
        cJSON *js = cJSON_AddArrayToObject(jt, "shape");
        for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(js, cJSON_CreateNumber((double)t->shape[d]));
        cJSON_AddNumberToObject(jt, "bytes", (double)t->nbytes);
        cJSON_AddItemToArray(tensors, jt);
        if (!json) printf("%-56s %-8s %-16s %12zu", t->name, xp_dtype_name(t->dtype), shape, t->nbytes);
        const xp_tensor *sc = t->dtype == XP_F8_E4M3 ? xp_scale_of(s, t->name, f.scale_suffix) : NULL;
        if (t->dtype == XP_F8_E4M3 && !sc)
            xp_warn(warnings, json, "%s is F8_E4M3 without a scale tensor: statistics are of raw codes", t->name);
        if (!stats || t->nelem == 0) {
            if (!json) printf("\n");
            continue;
        }
        if (sc && (sc->ndim != 2 || t->ndim != 2 || sc->shape[0] != xp_ceil_div(t->shape[0], f.block[0]) ||
                   sc->shape[1] != xp_ceil_div(t->shape[1], f.block[1]))) {
            xp_warn(warnings, json, "%s: scale tensor %s does not fit block %dx%d", t->name, sc->name,
                    f.block[0], f.block[1]);
            sc = NULL;
        }
        xp_stats a;
        xp_tensor_stats(t, sc, f.block, &a);
        cJSON *jst = cJSON_AddObjectToObject(jt, "stats");
        cJSON_AddNumberToObject(jst, "mean", a.mean);
        cJSON_AddNumberToObject(jst, "std", a.std);
        cJSON_AddNumberToObject(jst, "min", a.min);
        cJSON_AddNumberToObject(jst, "max", a.max);
        cJSON_AddNumberToObject(jst, "nan", (double)a.nan);
        cJSON_AddNumberToObject(jst, "inf", (double)a.inf);
        if (!json) printf(" %11.4g %10.4g %11.4g %11.4g\n", a.mean, a.std, a.min, a.max);
        if (a.nan || a.inf)
            xp_warn(warnings, json, "%s holds %llu NaN and %llu Inf values", t->name,
                    (unsigned long long)a.nan, (unsigned long long)a.inf);
        xp_role role = xp_tensor_role(t->name, NULL, NULL);
        int is_scale = role == XP_ROLE_SCALE;
        if (a.n > 1 && a.std == 0 && !is_scale)
            xp_warn(warnings, json, "%s: all %llu values equal %g (untrained or zeroed?)", t->name,
                    (unsigned long long)a.n, a.mean);
        if (!is_scale && a.n && fmax(fabs(a.min), fabs(a.max)) > 1e3)
            xp_warn(warnings, json, "%s: values up to %g are implausible for a trained weight", t->name,
                    fmax(fabs(a.min), fabs(a.max)));
        if (is_scale && a.n && a.min <= 0)
            xp_warn(warnings, json, "%s: scale %g is not positive", t->name, a.min);
        if (role == XP_ROLE_NORM && a.n && fabs(a.mean) < 1e-3)
            xp_warn(warnings, json, "%s: norm weights average %g; RMSNorm would silence this layer",
                    t->name, a.mean);
    }
    cJSON_AddItemToObject(root, "tensors", tensors);
    cJSON_AddNumberToObject(root, "total_bytes", (double)total);
    cJSON_AddItemToObject(root, "warnings", warnings);
    if (json) {
        char *out = cJSON_Print(root);
        puts(out ? out : "{}");
        free(out);
    } else {
        printf("total: %.3f MB", (double)total / 1e6);
        for (int d = 0; d < XP_DTYPE_COUNT; d++)
            if (by_dtype[d]) printf(", %s %.3f MB", xp_dtype_name((xp_dtype)d), (double)by_dtype[d] / 1e6);
        printf("; %d warning(s)\n", cJSON_GetArraySize(warnings));
    }
    cJSON_Delete(root);
    xp_st_set_close(s);
    return 0;
}
