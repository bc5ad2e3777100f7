/* xprec analyze: the geometry of a LoRA adapter against the FP8 quantization noise of its base,
 * per layer and module (the thesis's orthogonality analysis): with N = dequant(W_fp8) - W_bf16
 * and L = scale B A, the cosine <L, N> / (||L|| ||N||), the ratio ||N|| / ||L||, and the share of
 * the noise's energy inside L's column space (subspace leakage) against its random baseline
 * r / d_out. A cosine near 0 and leakage near the baseline say the transfer (Method A) leaves the
 * noise alone; a corrective adapter (Method B) points at -N and shows a negative cosine. */
#include "format/checkpoint.h"
#include "cli.h"
#include "commands.h"
#include "lora_extract.h"
#include "format/peft.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const char *base, *quantized, *adapter, *json, *plot;
} xp_analyze_args;

typedef struct {
    int layer;
    xp_module mod;
    int64_t rows;
    xp_lora_geometry g;
} xp_mod_geo;

static int xp_is_num(double x)
{
    return isfinite(x);
}

static void xp_add_num(cJSON *o, const char *key, double x)
{
    if (xp_is_num(x))
        cJSON_AddNumberToObject(o, key, x);
    else
        cJSON_AddNullToObject(o, key);
}

/* Means over the modules of one layer (or all), skipping undefined values. */
typedef struct {
    double cos, abs_cos, max_abs_cos, leak, leak_random, ratio, n_over_l;
    int ncos, nleak, nratio, worst; /* worst: index of the largest |cosine| */
} xp_geo_mean;

static xp_geo_mean xp_mean(const xp_mod_geo *g, size_t n, int layer)
{
    xp_geo_mean s = {.worst = -1};
    for (size_t i = 0; i < n; i++) {
        if (layer >= 0 && g[i].layer != layer) continue;
        const xp_lora_geometry *x = &g[i].g;
        if (xp_is_num(x->cosine)) {
            s.cos += x->cosine;
            s.abs_cos += fabs(x->cosine);
            if (fabs(x->cosine) >= s.max_abs_cos) s.max_abs_cos = fabs(x->cosine), s.worst = (int)i;
            s.ncos++;
        }
        if (xp_is_num(x->leakage)) {
            s.leak += x->leakage;
            s.leak_random += x->leakage_random;
            s.ratio += x->leakage / x->leakage_random;
            s.nleak++;
        }
        if (x->norm_l > 0 && x->norm_n > 0) {
            s.n_over_l += x->norm_n / x->norm_l;
            s.nratio++;
        }
    }
    if (s.ncos) s.cos /= s.ncos, s.abs_cos /= s.ncos;
    if (s.nleak) s.leak /= s.nleak, s.leak_random /= s.nleak, s.ratio /= s.nleak;
    if (s.nratio) s.n_over_l /= s.nratio;
    if (!s.ncos) s.cos = s.abs_cos = s.max_abs_cos = NAN;
    if (!s.nleak) s.leak = s.leak_random = s.ratio = NAN;
    if (!s.nratio) s.n_over_l = NAN;
    return s;
}

static void xp_add_mean(cJSON *o, const xp_geo_mean *s)
{
    xp_add_num(o, "mean_cosine", s->cos);
    xp_add_num(o, "mean_abs_cosine", s->abs_cos);
    xp_add_num(o, "max_abs_cosine", s->max_abs_cos);
    xp_add_num(o, "mean_leakage", s->leak);
    xp_add_num(o, "mean_leakage_random", s->leak_random);
    xp_add_num(o, "mean_leakage_ratio", s->ratio);
    xp_add_num(o, "mean_noise_to_adapter", s->n_over_l);
}

static int xp_write_json(const xp_analyze_args *a, const xp_mod_geo *g, size_t n, int layers)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "base", a->base);
    cJSON_AddStringToObject(r, "quantized", a->quantized);
    cJSON_AddStringToObject(r, "adapter", a->adapter);
    cJSON *arr = cJSON_AddArrayToObject(r, "modules");
    for (size_t i = 0; i < n; i++) {
        const xp_lora_geometry *x = &g[i].g;
        char path[128];
        xp_module_path(path, sizeof path, g[i].layer, g[i].mod);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", path);
        cJSON_AddNumberToObject(o, "layer", g[i].layer);
        cJSON_AddStringToObject(o, "module", xp_module_name(g[i].mod));
        cJSON_AddNumberToObject(o, "rank", x->rank);
        cJSON_AddNumberToObject(o, "d_out", (double)g[i].rows);
        xp_add_num(o, "cosine", x->cosine);
        xp_add_num(o, "noise_to_adapter", x->norm_l > 0 ? x->norm_n / x->norm_l : NAN);
        xp_add_num(o, "leakage", x->leakage);
        xp_add_num(o, "leakage_random", x->leakage_random);
        xp_add_num(o, "norm_adapter", x->norm_l);
        xp_add_num(o, "norm_noise", x->norm_n);
        cJSON_AddItemToArray(arr, o);
    }
    cJSON *la = cJSON_AddArrayToObject(r, "layers");
    for (int l = 0; l < layers; l++) {
        xp_geo_mean s = xp_mean(g, n, l);
        if (!s.ncos && !s.nleak && !s.nratio) continue;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "layer", l);
        xp_add_mean(o, &s);
        cJSON_AddItemToArray(la, o);
    }
    xp_geo_mean s = xp_mean(g, n, -1);
    cJSON *so = cJSON_AddObjectToObject(r, "summary");
    cJSON_AddNumberToObject(so, "modules", (double)n);
    xp_add_mean(so, &s);
    if (s.worst >= 0) {
        char path[128];
        xp_module_path(path, sizeof path, g[s.worst].layer, g[s.worst].mod);
        cJSON_AddStringToObject(so, "max_abs_cosine_module", path);
    }
    char *text = cJSON_Print(r);
    cJSON_Delete(r);
    FILE *fp = text ? fopen(a->json, "wb") : NULL;
    int ok = fp && fputs(text, fp) >= 0 && fputc('\n', fp) != EOF;
    ok = fp && fclose(fp) == 0 && ok;
    free(text);
    if (!ok) return xp_fail("%s: cannot write", a->json);
    return 0;
}

/* Three panels over the layers, one line per module kind: cosine, leakage / baseline, and
 * ||N|| / ||L||. The data go to a scratch directory that is removed afterwards. */
static int xp_plot(const xp_analyze_args *a, const xp_mod_geo *g, size_t n, int layers)
{
    char dir[] = "/tmp/xprec-plot-XXXXXX", data[64], script[64];
    if (!mkdtemp(dir)) return xp_fail("cannot create a scratch directory: %s", strerror(errno));
    snprintf(data, sizeof data, "%s/geo.dat", dir);
    snprintf(script, sizeof script, "%s/geo.gp", dir);
    FILE *fd = fopen(data, "w"), *fs = fopen(script, "w");
    int rc = -1, blocks = 0;
    char names[256] = "";
    if (!fd || !fs) {
        xp_fail("%s: cannot write", dir);
        goto done;
    }
    /* one gnuplot data block (separated by two blank lines) per module kind present */
    for (int m = 0; m < XP_MOD_COUNT; m++) {
        int any = 0;
        for (size_t i = 0; i < n; i++) {
            if (g[i].mod != (xp_module)m) continue;
            const xp_lora_geometry *x = &g[i].g;
            if (!any && blocks) fprintf(fd, "\n\n");
            any = 1;
            fprintf(fd, "%d %.9g %.9g %.9g\n", g[i].layer, xp_is_num(x->cosine) ? x->cosine : NAN,
                    xp_is_num(x->leakage) ? x->leakage / x->leakage_random : NAN,
                    x->norm_l > 0 && x->norm_n > 0 ? x->norm_n / x->norm_l : NAN);
        }
        if (any) {
            size_t len = strlen(names);
            snprintf(names + len, sizeof names - len, "%s%s", blocks ? " " : "",
                     xp_module_name((xp_module)m));
            blocks++;
        }
    }
    fprintf(fs,
            "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
            "  set terminal pngcairo size 1000,1200 font ',10'\n"
            "} else {\n"
            "  set terminal png size 1000,1200\n"
            "}\n"
            "set output '%s'\n"
            "set datafile missing 'nan'\n"
            "names = '%s'\n"
            "set multiplot layout 3,1 title 'adapter vs FP8 quantization noise: %s' noenhanced\n"
            "set xrange [-0.5:%d.5]\n"
            "set xtics %d format '%%.0f'\n"
            "set key outside right noenhanced\n"
            "set grid\n"
            "set xlabel 'layer'\n"
            "set ylabel 'cos(L, N)'\n"
            "plot for [i=0:%d] '%s' index i using 1:2 with linespoints title word(names, i+1), "
            "0 with lines lc 'black' dt 2 notitle\n"
            "set ylabel 'leakage / (r/d_{out})'\n"
            "plot for [i=0:%d] '%s' index i using 1:3 with linespoints title word(names, i+1), "
            "1 with lines lc 'black' dt 2 title 'random'\n"
            "set ylabel '||N|| / ||L||'\n"
            "set logscale y\n"
            "plot for [i=0:%d] '%s' index i using 1:4 with linespoints title word(names, i+1)\n"
            "unset multiplot\n",
            a->plot, names, a->adapter, layers - 1, layers <= 16 ? 1 : (layers + 15) / 16, blocks - 1, data, blocks - 1, data,
            blocks - 1, data);
    int ok = fclose(fd) == 0;
    ok = fclose(fs) == 0 && ok;
    fd = fs = NULL;
    if (!ok || blocks == 0) {
        xp_fail(blocks ? "%s: cannot write" : "nothing to plot", dir);
        goto done;
    }
    if (xp_run_gnuplot(script, a->plot) < 0) goto done;
    rc = 0;
done:
    if (fd) fclose(fd);
    if (fs) fclose(fs);
    unlink(data);
    unlink(script);
    rmdir(dir);
    return rc;
}

static void xp_print_table(const xp_mod_geo *g, size_t n, int layers)
{
    printf("layer  mean cos   max |cos|  leakage  random r/d  leak/random  ||N||/||L||\n");
    for (int l = 0; l < layers; l++) {
        xp_geo_mean s = xp_mean(g, n, l);
        if (!s.ncos && !s.nleak && !s.nratio) continue;
        printf("%5d  %+9.5f  %9.5f  %7.4f  %10.4f  %11.3f  %11.4g\n", l, s.cos, s.max_abs_cos,
               s.leak, s.leak_random, s.ratio, s.n_over_l);
    }
    xp_geo_mean s = xp_mean(g, n, -1);
    char path[128] = "-";
    if (s.worst >= 0) xp_module_path(path, sizeof path, g[s.worst].layer, g[s.worst].mod);
    printf("all    %+9.5f  %9.5f  %7.4f  %10.4f  %11.3f  %11.4g\n", s.cos, s.max_abs_cos, s.leak,
           s.leak_random, s.ratio, s.n_over_l);
    printf("summary: %zu modules; mean |cos| %.5f, largest %.5f (%s); noise leaks %.3fx its "
           "random share into the adapter's subspace\n",
           n, s.abs_cos, s.max_abs_cos, path, s.ratio);
    size_t unq = 0;
    for (size_t i = 0; i < n; i++) unq += g[i].g.norm_n == 0;
    if (unq) printf("  %zu modules are not quantized in --quantized (N = 0): no angle\n", unq);
}

static int xp_factor_f32(const xp_tensor *t, float **out)
{
    *out = malloc((size_t)t->nelem * sizeof **out);
    if (!*out) return xp_fail("out of memory");
    if (xp_convert_to_f32(t->dtype, t->data, *out, (size_t)t->nelem) < 0)
        return xp_fail("%s: dtype %s is not a float type", t->name, xp_dtype_name(t->dtype));
    return 0;
}

static int xp_analyze(const xp_analyze_args *a)
{
    xp_ckpt *base = NULL, *q = NULL;
    xp_peft *p = NULL;
    xp_mod_geo *geo = NULL;
    float *wb = NULL, *wq = NULL, *A = NULL, *B = NULL;
    int rc = -1;
    if (xp_ckpt_open(a->base, &base) < 0 || xp_ckpt_open(a->quantized, &q) < 0 ||
        xp_peft_open(a->adapter, &p) < 0)
        goto done;
    if (base->quant.kind != XP_QUANT_NONE) {
        xp_fail("--base %s is quantized; give the BF16 model", a->base);
        goto done;
    }
    if (q->quant.kind == XP_QUANT_NONE) {
        xp_fail("--quantized %s has no quantization_config; give the FP8 model", a->quantized);
        goto done;
    }
    const xp_qwen3_config *c = &base->cfg, *d = &q->cfg;
    if (c->hidden_size != d->hidden_size || c->intermediate_size != d->intermediate_size ||
        c->num_hidden_layers != d->num_hidden_layers || c->head_dim != d->head_dim ||
        c->num_attention_heads != d->num_attention_heads ||
        c->num_key_value_heads != d->num_key_value_heads) {
        xp_fail("%s and %s are not the same architecture", a->base, a->quantized);
        goto done;
    }
    if (xp_peft_check_base(p, c) < 0) goto done;
    size_t maxel = 0;
    for (int m = 0; m < XP_MOD_COUNT; m++) {
        int64_t o, i;
        xp_module_shape(c, (xp_module)m, &o, &i);
        if ((size_t)(o * i) > maxel) maxel = (size_t)(o * i);
    }
    geo = calloc(p->n, sizeof *geo);
    wb = malloc(maxel * sizeof *wb);
    wq = malloc(maxel * sizeof *wq);
    if (!geo || !wb || !wq) {
        xp_fail("out of memory");
        goto done;
    }
    xp_progress pr;
    uint64_t bytes = 0, done_bytes = 0;
    for (size_t k = 0; k < p->n; k++) {
        int64_t o, i;
        xp_module_shape(c, p->mods[k].mod, &o, &i);
        bytes += (uint64_t)(o * i) * 3; /* a BF16 and an FP8 weight per module */
    }
    xp_progress_begin(&pr, "analyze", p->n, bytes);
    for (size_t k = 0; k < p->n; k++) {
        const xp_lora_module *lm = &p->mods[k];
        char path[128];
        xp_module_path(path, sizeof path, lm->layer, lm->mod);
        xp_weight wbw, wqw;
        if (xp_ckpt_weight(base, lm->layer, lm->mod, &wbw) < 0 ||
            xp_ckpt_weight(q, lm->layer, lm->mod, &wqw) < 0 || xp_weight_to_f32(&wbw, wb) < 0 ||
            xp_weight_to_f32(&wqw, wq) < 0 || xp_factor_f32(lm->A, &A) < 0 ||
            xp_factor_f32(lm->B, &B) < 0)
            goto done;
        xp_tensor_release(wbw.w);
        xp_tensor_release(wqw.w);
        if (wqw.scale) xp_tensor_release(wqw.scale);
        size_t el = (size_t)(wbw.rows * wbw.cols);
        for (size_t i = 0; i < el; i++) wq[i] -= wb[i];
        geo[k].layer = lm->layer;
        geo[k].mod = lm->mod;
        geo[k].rows = wbw.rows;
        if (xp_lora_geometry_of(wq, wbw.rows, wbw.cols, A, B, lm->rank, lm->scale, &geo[k].g) < 0) {
            xp_fail_ctx("%s", path);
            goto done;
        }
        free(A);
        free(B);
        A = B = NULL;
        done_bytes += (uint64_t)el * 3;
        xp_progress_update(&pr, k + 1, done_bytes, path);
    }
    xp_progress_end(&pr);
    xp_print_table(geo, p->n, c->num_hidden_layers);
    if (a->json && xp_write_json(a, geo, p->n, c->num_hidden_layers) < 0) goto done;
    if (a->plot && xp_plot(a, geo, p->n, c->num_hidden_layers) < 0) goto done;
    rc = 0;
done:
    free(geo);
    free(wb);
    free(wq);
    free(A);
    free(B);
    xp_peft_close(p);
    xp_ckpt_close(base);
    xp_ckpt_close(q);
    return rc;
}

int xp_cmd_analyze(int argc, char **argv)
{
    xp_analyze_args a = {0};
    xp_opt opts[] = {
        XP_STR_REQ("base", &a.base, "DIR", "the BF16 base"),
        XP_STR_REQ("quantized", &a.quantized, "DIR", "the FP8 quantization of --base"),
        XP_STR_REQ("adapter", &a.adapter, "DIR", "a PEFT LoRA adapter for that base"),
        XP_STR("json", &a.json, "FILE", "write every number as JSON"),
        XP_STR("plot", &a.plot, "FILE.png", "draw the numbers per layer (needs gnuplot)"),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "analyze",
        .usage = "usage: xprec analyze --base DIR --quantized DIR --adapter DIR [--json FILE]\n"
                 "                     [--plot FILE.png]\n",
        .about = "For every module of the adapter, with N = dequant(W_fp8) - W_bf16 (--quantized\n"
                 "against --base) and L = scale B A: cosine <L,N>/(||L|| ||N||), ||N||/||L||, and\n"
                 "the leakage ||U_r U_r^T N||^2/||N||^2 of the noise into L's column space next to\n"
                 "its random baseline r/d_out. Prints a per-layer table and a summary.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    /* fail before the work, not after it */
    if (a.plot && (rc = xp_plot_check("analyze", a.plot)) != 0) return rc;
    if (xp_analyze(&a) < 0) {
        fprintf(stderr, "xprec analyze: %s\n", xp_last_error());
        return 1;
    }
    return 0;
}
