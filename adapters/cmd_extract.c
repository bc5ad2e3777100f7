/* xprec extract: a BF16 LoRA adapter from the difference between a BF16 fine-tune and its base,
 * module by module (truncated SVD, sqrt(S) split, lora_alpha = r). Against the BF16 base this is
 * the thesis's Method A (naive transfer); against the FP8 base, the difference to the dequantized
 * weights, Method B (corrective extraction). Everything a LoRA cannot carry (norms, embeddings,
 * lm_head, biases, untargeted modules) is measured and listed, so the operator sees what the
 * sanitization drops. */
#include "format/checkpoint.h"
#include "cli.h"
#include "commands.h"
#include "lora_extract.h"
#include "format/peft.h"
#include "model/lora.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    const char *base, *tuned, *out, *report;
    int force;
    unsigned targets; /* bit m: module m gets a LoRA */
    xp_extract_opts ex;
} xp_extract_args;

/* One extracted module, kept for the adapter and the report. */
typedef struct {
    int layer;
    xp_module mod;
    int64_t rows, cols;
    double base_norm, seconds;
    xp_extract_result r; /* r.A, r.B moved to the spill file once written there */
    uint64_t off_a, off_b;
} xp_mod_done;

/* The BF16 factors go to an unlinked scratch file in the output directory as each module is
 * done and come back as one read-only mapping for the writer, so the adapter of a large model
 * (4.3 GB for Qwen3-32B at rank 256) never has to sit in anonymous memory. */
typedef struct {
    FILE *fp;
    uint64_t size;
    void *map;
} xp_spill;

static int xp_spill_open(xp_spill *sp, const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/.xprec-extract-XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0) return xp_fail("%s: %s", path, strerror(errno));
    unlink(path);
    sp->fp = fdopen(fd, "w+b");
    if (!sp->fp) {
        close(fd);
        return xp_fail("%s: %s", path, strerror(errno));
    }
    return 0;
}

static int xp_spill_put(xp_spill *sp, const uint16_t *x, size_t n, uint64_t *off)
{
    *off = sp->size;
    if (fwrite(x, 2, n, sp->fp) != n) return xp_fail("writing the scratch file failed");
    sp->size += (uint64_t)n * 2;
    return 0;
}

static int xp_spill_map(xp_spill *sp)
{
    if (fflush(sp->fp) != 0) return xp_fail("writing the scratch file failed");
    sp->map = mmap(NULL, sp->size, PROT_READ, MAP_SHARED, fileno(sp->fp), 0);
    if (sp->map == MAP_FAILED) {
        sp->map = NULL;
        return xp_fail("mapping the scratch file: %s", strerror(errno));
    }
    return 0;
}

static void xp_spill_close(xp_spill *sp)
{
    if (sp->map) munmap(sp->map, sp->size);
    if (sp->fp) fclose(sp->fp);
}

/* A tensor the adapter cannot carry that the fine-tune changed. */
typedef struct {
    char name[160];
    const char *kind;
    double rel; /* ||T - T_base|| / ||T_base||; NAN when the base lacks it */
} xp_dropped;

/* "q_proj,mlp,..." into a module bit mask; -1 on an unknown name. */
static int xp_parse_targets(const char *list, unsigned *mask)
{
    static const char *const shorts[XP_MOD_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
    char *copy = strdup(list), *save = NULL;
    if (!copy) return -1;
    *mask = 0;
    int rc = 0;
    for (char *t = strtok_r(copy, ",", &save); t && rc == 0; t = strtok_r(NULL, ",", &save)) {
        xp_module m;
        if (strcmp(t, "all") == 0) {
            *mask |= (1u << XP_MOD_COUNT) - 1;
        } else if (strcmp(t, "attn") == 0) {
            *mask |= 0xfu;
        } else if (strcmp(t, "mlp") == 0) {
            *mask |= 0x70u;
        } else if (xp_module_parse(t, &m) == 0) {
            *mask |= 1u << m;
        } else {
            rc = -1;
            for (int i = 0; i < XP_MOD_COUNT; i++)
                if (strcmp(t, shorts[i]) == 0) *mask |= 1u << i, rc = 0;
        }
    }
    free(copy);
    return rc == 0 && *mask ? 0 : -1;
}

/* The pass is done with a weight's mapped pages: keeps the resident set at a few modules. */
static void xp_release_weight(const xp_weight *w)
{
    xp_tensor_release(w->w);
    if (w->scale) xp_tensor_release(w->scale);
}

static int xp_same_shape(const xp_qwen3_config *a, const xp_qwen3_config *b)
{
    return a->hidden_size == b->hidden_size && a->intermediate_size == b->intermediate_size &&
           a->num_hidden_layers == b->num_hidden_layers &&
           a->num_attention_heads == b->num_attention_heads &&
           a->num_key_value_heads == b->num_key_value_heads && a->head_dim == b->head_dim &&
           a->vocab_size == b->vocab_size;
}

static const char *xp_kind_name(const char *name, xp_role role)
{
    size_t n = strlen(name);
    switch (role) {
    case XP_ROLE_NORM: return "norm";
    case XP_ROLE_EMBED: return "embedding";
    case XP_ROLE_LM_HEAD: return "lm_head";
    case XP_ROLE_LINEAR: return "untargeted module";
    default: return n > 5 && strcmp(name + n - 5, ".bias") == 0 ? "bias" : "other";
    }
}

/* ||t - b||^2 and ||b||^2 over two same-shape float tensors, in chunks so that a 150k x 5k
 * embedding never needs two F32 copies. */
static int xp_tensor_diff(const xp_tensor *t, const xp_tensor *b, double *diff2, double *base2)
{
    enum { CHUNK = 1 << 20 };
    float *x = malloc(CHUNK * sizeof *x), *y = malloc(CHUNK * sizeof *y);
    if (!x || !y) {
        free(x);
        free(y);
        return xp_fail("out of memory");
    }
    size_t st = xp_dtype_size(t->dtype), sb = xp_dtype_size(b->dtype);
    *diff2 = *base2 = 0;
    int rc = 0;
    for (uint64_t off = 0; off < t->nelem && rc == 0; off += CHUNK) {
        size_t n = t->nelem - off < CHUNK ? (size_t)(t->nelem - off) : CHUNK;
        if (xp_convert_to_f32(t->dtype, (const char *)t->data + off * st, x, n) < 0 ||
            xp_convert_to_f32(b->dtype, (const char *)b->data + off * sb, y, n) < 0) {
            rc = xp_fail("%s: dtype %s or %s is not a float type", t->name,
                         xp_dtype_name(t->dtype), xp_dtype_name(b->dtype));
            break;
        }
        for (size_t i = 0; i < n; i++) {
            double d = (double)x[i] - y[i];
            *diff2 += d * d;
            *base2 += (double)y[i] * y[i];
        }
    }
    free(x);
    free(y);
    return rc;
}

static int xp_cmp_dropped(const void *a, const void *b)
{
    const xp_dropped *x = a, *y = b;
    double rx = isnan(x->rel) ? INFINITY : x->rel, ry = isnan(y->rel) ? INFINITY : y->rel;
    return rx < ry ? 1 : rx > ry ? -1 : strcmp(x->name, y->name);
}

/* Every tensor of the fine-tune that differs from the base and is not in the adapter. */
static int xp_find_dropped(const xp_ckpt *base, const xp_ckpt *tuned, unsigned targets,
                           float *wb, float *wt, xp_dropped **out, size_t *nout)
{
    size_t n = xp_st_set_count(tuned->st), cnt = 0;
    xp_dropped *d = calloc(n ? n : 1, sizeof *d);
    if (!d) return xp_fail("out of memory");
    for (size_t i = 0; i < n; i++) {
        const xp_tensor *t = xp_st_set_tensor(tuned->st, i);
        int layer;
        xp_module m;
        xp_role role = xp_tensor_role(t->name, &layer, &m);
        if (role == XP_ROLE_SCALE || (role == XP_ROLE_LINEAR && (targets & (1u << m)))) continue;
        double diff2 = 0, base2 = 0;
        if (role == XP_ROLE_LINEAR) {
            /* untargeted module: compared with the base as the adapter will meet it */
            xp_weight a, b;
            if (xp_ckpt_weight(base, layer, m, &b) < 0 || xp_ckpt_weight(tuned, layer, m, &a) < 0 ||
                xp_weight_to_f32(&b, wb) < 0 || xp_weight_to_f32(&a, wt) < 0)
                goto fail;
            xp_release_weight(&a);
            xp_release_weight(&b);
            size_t el = (size_t)(a.rows * a.cols);
            diff2 = base2 = 0;
            for (size_t k = 0; k < el; k++) {
                double x = (double)wt[k] - wb[k];
                diff2 += x * x;
                base2 += (double)wb[k] * wb[k];
            }
        } else {
            const xp_tensor *b = xp_st_set_find(base->st, t->name);
            if (b && b->dtype == t->dtype && b->nbytes == t->nbytes &&
                memcmp(b->data, t->data, t->nbytes) == 0)
                continue;
            if (!b || b->nelem != t->nelem) {
                diff2 = base2 = NAN;
            } else if (xp_tensor_diff(t, b, &diff2, &base2) < 0) {
                goto fail;
            }
            xp_tensor_release(t);
            if (b) xp_tensor_release(b);
        }
        if (diff2 == 0) continue;
        snprintf(d[cnt].name, sizeof d[cnt].name, "%s", t->name);
        d[cnt].kind = xp_kind_name(t->name, role);
        d[cnt].rel = isnan(diff2) ? NAN : base2 > 0 ? sqrt(diff2 / base2) : INFINITY;
        cnt++;
    }
    qsort(d, cnt, sizeof *d, xp_cmp_dropped);
    *out = d;
    *nout = cnt;
    return 0;
fail:
    free(d);
    return -1;
}

static int xp_write_report(const xp_extract_args *a, char method, const xp_mod_done *mods,
                           size_t n, const xp_dropped *drop, size_t ndrop, double seconds)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "method", method == 'A' ? "A" : "B");
    cJSON_AddStringToObject(r, "base", a->base);
    cJSON_AddStringToObject(r, "tuned", a->tuned);
    cJSON_AddStringToObject(r, "adapter", a->out);
    cJSON *req = cJSON_AddObjectToObject(r, "request");
    if (a->ex.rank > 0)
        cJSON_AddNumberToObject(req, "rank", a->ex.rank);
    else {
        cJSON_AddNumberToObject(req, "energy", a->ex.energy);
        if (a->ex.max_rank > 0) cJSON_AddNumberToObject(req, "max_rank", a->ex.max_rank);
    }
    cJSON_AddStringToObject(req, "svd", xp_svd_method_name(a->ex.svd.method));
    cJSON_AddNumberToObject(req, "oversample", a->ex.svd.oversample);
    cJSON_AddNumberToObject(req, "power_iters", a->ex.svd.power_iters);
    cJSON_AddNumberToObject(req, "seed", (double)a->ex.svd.seed);
    cJSON *arr = cJSON_AddArrayToObject(r, "modules");
    cJSON *same = cJSON_AddArrayToObject(r, "unchanged_modules");
    double worst = 0, sum = 0, flops = 0, svd_s = 0;
    size_t nx = 0;
    long params = 0;
    for (size_t i = 0; i < n; i++) {
        const xp_mod_done *m = &mods[i];
        char path[128];
        xp_module_path(path, sizeof path, m->layer, m->mod);
        if (m->r.rank == 0) {
            cJSON_AddItemToArray(same, cJSON_CreateString(path));
            continue;
        }
        double rel = m->r.residual_norm / m->r.delta_norm;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", path);
        cJSON_AddNumberToObject(o, "layer", m->layer);
        cJSON_AddStringToObject(o, "module", xp_module_name(m->mod));
        cJSON *shape = cJSON_AddArrayToObject(o, "shape");
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)m->rows));
        cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)m->cols));
        cJSON_AddNumberToObject(o, "rank", m->r.rank);
        cJSON_AddStringToObject(o, "svd", xp_svd_method_name(m->r.used));
        cJSON_AddNumberToObject(o, "delta_norm", m->r.delta_norm);
        cJSON_AddNumberToObject(o, "relative_delta",
                                m->base_norm > 0 ? m->r.delta_norm / m->base_norm : 0);
        cJSON_AddNumberToObject(o, "energy", m->r.energy);
        cJSON_AddNumberToObject(o, "relative_residual", rel);
        cJSON_AddNumberToObject(o, "sigma_max", m->r.sigma_max);
        cJSON_AddNumberToObject(o, "sigma_min", m->r.sigma_min);
        cJSON_AddNumberToObject(o, "seconds", m->seconds);
        /* a rate only where the flops are known: LAPACK's SVD does not count its own */
        if (m->r.used == XP_SVD_RANDOMIZED && m->seconds > 0)
            cJSON_AddNumberToObject(o, "gemm_gflops", m->r.gemm_flops / m->seconds / 1e9);
        cJSON_AddItemToArray(arr, o);
        worst = rel > worst ? rel : worst;
        sum += rel;
        nx++;
        params += (long)m->r.rank * (long)(m->rows + m->cols);
        if (m->r.used == XP_SVD_RANDOMIZED) flops += m->r.gemm_flops, svd_s += m->seconds;
    }
    cJSON *dr = cJSON_AddArrayToObject(r, "not_in_adapter");
    for (size_t i = 0; i < ndrop; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", drop[i].name);
        cJSON_AddStringToObject(o, "kind", drop[i].kind);
        if (isnan(drop[i].rel))
            cJSON_AddNullToObject(o, "relative_change"); /* missing from the base */
        else
            cJSON_AddNumberToObject(o, "relative_change", isinf(drop[i].rel) ? 1e308 : drop[i].rel);
        cJSON_AddItemToArray(dr, o);
    }
    cJSON *s = cJSON_AddObjectToObject(r, "summary");
    cJSON_AddNumberToObject(s, "modules", (double)nx);
    cJSON_AddNumberToObject(s, "unchanged_modules", (double)(n - nx));
    cJSON_AddNumberToObject(s, "adapter_parameters", (double)params);
    cJSON_AddNumberToObject(s, "mean_relative_residual", nx ? sum / (double)nx : 0);
    cJSON_AddNumberToObject(s, "max_relative_residual", worst);
    cJSON_AddNumberToObject(s, "not_in_adapter", (double)ndrop);
    cJSON_AddNumberToObject(s, "seconds", seconds);
    if (svd_s > 0) cJSON_AddNumberToObject(s, "randomized_gemm_gflops", flops / svd_s / 1e9);
    char *text = cJSON_Print(r);
    cJSON_Delete(r);
    FILE *fp = text ? fopen(a->report, "wb") : NULL;
    int ok = fp && fputs(text, fp) >= 0 && fputc('\n', fp) != EOF;
    ok = fp && fclose(fp) == 0 && ok;
    free(text);
    if (!ok) return xp_fail("%s: cannot write the report", a->report);
    return 0;
}

static void xp_print_summary(const xp_extract_args *a, char method, const xp_mod_done *mods,
                             size_t n, const xp_dropped *drop, size_t ndrop, double seconds)
{
    size_t nx = 0, iw = 0;
    double worst = -1, sum = 0;
    int rmin = 1 << 30, rmax = 0;
    for (size_t i = 0; i < n; i++) {
        if (mods[i].r.rank == 0) continue;
        double rel = mods[i].r.residual_norm / mods[i].r.delta_norm;
        if (rel > worst) worst = rel, iw = i;
        sum += rel;
        nx++;
        rmin = mods[i].r.rank < rmin ? mods[i].r.rank : rmin;
        rmax = mods[i].r.rank > rmax ? mods[i].r.rank : rmax;
    }
    char path[128];
    xp_module_path(path, sizeof path, mods[iw].layer, mods[iw].mod);
    printf("extract: Method %c (%s base), %zu modules, rank %d", method,
           method == 'A' ? "BF16" : "FP8", nx, rmin);
    if (rmax != rmin) printf("..%d", rmax);
    printf(", %.1f s -> %s\n", seconds, a->out);
    printf("  relative residual ||dW - BA||/||dW||: mean %.4g, max %.4g (%s)\n", sum / (double)nx,
           worst, path);
    if (n > nx) printf("  %zu targeted modules unchanged by the fine-tune (left out)\n", n - nx);
    if (a->ex.rank == 0) {
        size_t capped = 0;
        for (size_t i = 0; i < n; i++)
            capped += mods[i].r.rank == a->ex.max_rank && mods[i].r.energy < a->ex.energy;
        if (capped)
            printf("  %zu modules stop at rank %d (--max-rank%s) below the energy share %g; the "
                   "report gives each one's share\n",
                   capped, a->ex.max_rank,
                   a->ex.max_rank == XP_MAX_LORA_RANK ? ", the most the engine serves" : "",
                   a->ex.energy);
    }
    if (ndrop == 0) {
        /* a statement about where the fine-tune changed things, not about the residual above */
        printf("  nothing outside the targeted modules changed: norms, embeddings, lm_head and\n"
               "  untargeted modules equal the base\n");
        return;
    }
    printf("  changed but not in the adapter: %zu tensors (relative change)\n", ndrop);
    for (size_t i = 0; i < ndrop && i < 8; i++) {
        if (isnan(drop[i].rel))
            printf("    %-56s %-17s missing from the base\n", drop[i].name, drop[i].kind);
        else
            printf("    %-56s %-17s %.4g\n", drop[i].name, drop[i].kind, drop[i].rel);
    }
    if (ndrop > 8) printf("    ... %zu more%s\n", ndrop - 8, a->report ? " (see the report)" : "");
}

static int xp_extract(const xp_extract_args *a)
{
    xp_ckpt *base = NULL, *tuned = NULL;
    xp_mod_done *mods = NULL;
    xp_dropped *drop = NULL;
    xp_lora_save *save = NULL;
    float *wb = NULL, *wt = NULL;
    size_t n = 0, ndrop = 0;
    xp_spill sp = {0};
    xp_outdir od = {0};
    int rc = -1;
    double t0 = xp_now();
    if (xp_ckpt_open(a->base, &base) < 0 || xp_ckpt_open(a->tuned, &tuned) < 0) goto done;
    if (tuned->quant.kind != XP_QUANT_NONE) {
        xp_fail("%s is FP8-quantized; the fine-tune must be the BF16 model", a->tuned);
        goto done;
    }
    if (!xp_same_shape(&base->cfg, &tuned->cfg)) {
        xp_fail("%s and %s are not the same architecture (config.json dimensions differ)",
                a->base, a->tuned);
        goto done;
    }
    char method = base->quant.kind == XP_QUANT_NONE ? 'A' : 'B';
    const xp_qwen3_config *cfg = &base->cfg;
    size_t maxel = 0, total = (size_t)cfg->num_hidden_layers * XP_MOD_COUNT;
    uint64_t bytes = 0;
    for (int m = 0; m < XP_MOD_COUNT; m++) {
        int64_t o, i;
        xp_module_shape(cfg, (xp_module)m, &o, &i);
        if ((size_t)(o * i) > maxel) maxel = (size_t)(o * i);
        if (a->targets & (1u << m)) bytes += (uint64_t)(o * i) * 2 * cfg->num_hidden_layers;
    }
    /* the scratch file lives in the new directory: on the target's file system, gone with it */
    if (xp_outdir_begin(&od, a->out, a->force) < 0 || xp_spill_open(&sp, od.tmp) < 0) goto done;
    mods = calloc(total, sizeof *mods);
    wb = malloc(maxel * sizeof *wb);
    wt = malloc(maxel * sizeof *wt);
    if (!mods || !wb || !wt) {
        xp_fail("out of memory");
        goto done;
    }
    xp_progress pr;
    xp_progress_begin(&pr, "extract", (size_t)__builtin_popcount(a->targets) *
                                          (size_t)cfg->num_hidden_layers, bytes);
    uint64_t done_bytes = 0;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int m = 0; m < XP_MOD_COUNT; m++) {
            if (!(a->targets & (1u << m))) continue;
            xp_mod_done *d = &mods[n];
            xp_weight b, t;
            char path[128];
            xp_module_path(path, sizeof path, l, (xp_module)m);
            if (xp_ckpt_weight(base, l, (xp_module)m, &b) < 0 ||
                xp_ckpt_weight(tuned, l, (xp_module)m, &t) < 0 || xp_weight_to_f32(&b, wb) < 0 ||
                xp_weight_to_f32(&t, wt) < 0)
                goto done;
            xp_release_weight(&b);
            xp_release_weight(&t);
            size_t el = (size_t)(b.rows * b.cols);
            for (size_t k = 0; k < el; k++) wt[k] -= wb[k];
            d->layer = l;
            d->mod = (xp_module)m;
            d->rows = b.rows;
            d->cols = b.cols;
            d->base_norm = sqrt(xp_frob2(wb, el));
            xp_extract_opts eo = a->ex;
            eo.svd.stream = path; /* the test matrix depends on the module, not the order */
            double ts = xp_now();
            if (xp_extract_lora(wt, b.rows, b.cols, &eo, &d->r) < 0) {
                xp_fail_ctx("%s", path);
                goto done;
            }
            d->seconds = xp_now() - ts;
            n++;
            int64_t rk = d->r.rank;
            if (rk && (xp_spill_put(&sp, d->r.A, (size_t)(rk * b.cols), &d->off_a) < 0 ||
                       xp_spill_put(&sp, d->r.B, (size_t)(b.rows * rk), &d->off_b) < 0))
                goto done;
            free(d->r.A);
            free(d->r.B);
            d->r.A = d->r.B = NULL;
            done_bytes += (uint64_t)el * 2;
            xp_progress_update(&pr, n, done_bytes, path);
        }
    xp_progress_end(&pr);
    if (xp_find_dropped(base, tuned, a->targets, wb, wt, &drop, &ndrop) < 0) goto done;
    free(wb);
    free(wt);
    wb = wt = NULL;
    save = calloc(n, sizeof *save);
    if (!save) {
        xp_fail("out of memory");
        goto done;
    }
    size_t ns = 0;
    if (sp.size && xp_spill_map(&sp) < 0) goto done;
    const char *fac = sp.map;
    for (size_t i = 0; i < n; i++) {
        if (mods[i].r.rank == 0) continue;
        save[ns++] = (xp_lora_save){.layer = mods[i].layer, .mod = mods[i].mod,
                                    .rank = mods[i].r.rank, .alpha = mods[i].r.rank,
                                    .in = mods[i].cols, .out = mods[i].rows,
                                    .A = (const uint16_t *)(fac + mods[i].off_a),
                                    .B = (const uint16_t *)(fac + mods[i].off_b)};
    }
    if (ns == 0) {
        xp_fail("the fine-tune equals the base in every targeted module: nothing to extract");
        goto done;
    }
    if (xp_peft_save(od.tmp, a->base, save, ns, 0) < 0) goto done;
    double seconds = xp_now() - t0;
    if (a->report && xp_write_report(a, method, mods, n, drop, ndrop, seconds) < 0) goto done;
    if (xp_outdir_commit(&od) < 0) goto done;
    xp_print_summary(a, method, mods, n, drop, ndrop, seconds);
    rc = 0;
done:
    for (size_t i = 0; i < n; i++) xp_extract_result_free(&mods[i].r);
    free(mods);
    free(save);
    xp_spill_close(&sp);
    free(drop);
    free(wb);
    free(wt);
    xp_ckpt_close(base);
    xp_ckpt_close(tuned);
    xp_outdir_abort(&od);
    return rc;
}

int xp_cmd_extract(int argc, char **argv)
{
    xp_extract_args a = {.targets = (1u << XP_MOD_COUNT) - 1};
    xp_svd_defaults(&a.ex.svd);
    const char *targets = NULL;
    long rank = 0, max_rank = 0, oversample = a.ex.svd.oversample, power = a.ex.svd.power_iters;
    long seed = (long)a.ex.svd.seed;
    double energy = 0;
    const char *svd = NULL;
    xp_opt opts[] = {
        XP_STR_REQ("base", &a.base, "DIR", "the base: BF16 gives Method A, FP8 Method B"),
        XP_STR_REQ("tuned", &a.tuned, "DIR", "the BF16 fine-tune"),
        XP_STR_REQ("out", &a.out, "DIR", "the adapter directory to write"),
        XP_INT("rank", &rank, 1, XP_MAX_LORA_RANK, "R",
               "the rank of every module (at most 256, the most the engine\n"
               "serves)"),
        XP_NUM("energy", &energy, 1e-9, 1, "F",
               "per module the smallest rank whose singular values capture the\n"
               "share F of ||dW||^2"),
        XP_INT("max-rank", &max_rank, 1, XP_MAX_LORA_RANK, "R",
               "with --energy: never more than R (default 256, the most the\n"
               "engine serves)"),
        XP_STR("targets", &targets, "LIST",
               "comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,\n"
               "down_proj (or q,k,...; attn; mlp; all, the default)"),
        XP_STR("report", &a.report, "FILE.json", "per module rank and residual, and every\n"
                                                 "changed tensor the adapter cannot carry"),
        XP_STR("svd", &svd, "auto|exact|randomized",
                  "auto (the default) takes the randomized SVD when R + P <=\n"
                  "min(out, in)/4"),
        XP_INT("oversample", &oversample, 0, 4096, "P", "randomized SVD oversampling (default 10)"),
        XP_INT("power-iters", &power, 0, 64, "Q", "randomized SVD power iterations (default 2)"),
        XP_OPT_SEED(&seed, "seeds the randomized SVD's test matrix (default 0)"),
        XP_OPT_FORCE(&a.force),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "extract",
        .usage = "usage: xprec extract --base DIR --tuned DIR --out DIR (--rank R | --energy F)\n"
                 "                     [--max-rank R] [--targets LIST] [--report FILE.json]\n"
                 "                     [--svd auto|exact|randomized] [--oversample P]\n"
                 "                     [--power-iters Q] [--seed N] [--force]\n",
        .about = "A BF16 PEFT LoRA adapter from dW = W_tuned - W_base for every targeted linear\n"
                 "module: truncated SVD dW ~ U S V^T, B = U sqrt(S), A = sqrt(S) V^T, lora_alpha = r.\n"
                 "A BF16 base gives Method A; an FP8 base gives Method B (dW against the dequantized\n"
                 "weights). The report (JSON) gives per module the rank and relative residual\n"
                 "||dW - BA|| / ||dW||, and every changed tensor the adapter cannot carry (norms,\n"
                 "embeddings, lm_head, biases, untargeted modules) with its relative change.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    if (targets && xp_parse_targets(targets, &a.targets) < 0) {
        fprintf(stderr, "xprec extract: --targets \"%s\": use q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj, attn, mlp or all\n",
                targets);
        return 2;
    }
    if (xp_same_path(a.out, a.base) || xp_same_path(a.out, a.tuned))
        return xp_cmd_usage_error(&cmd, "--out must differ from --base and --tuned");
    if (svd && xp_svd_method_parse(svd, &a.ex.svd.method) < 0) {
        fprintf(stderr, "xprec extract: --svd is auto, exact or randomized, got \"%s\"\n", svd);
        return 2;
    }
    if ((rank > 0) == (energy > 0))
        return xp_cmd_usage_error(&cmd, "give exactly one of --rank and --energy");
    if (max_rank && energy == 0)
        return xp_cmd_usage_error(&cmd, "--max-rank goes with --energy");
    a.ex.rank = (int)rank;
    a.ex.energy = energy;
    /* what serving would refuse is never written */
    a.ex.max_rank = energy > 0 && max_rank == 0 ? XP_MAX_LORA_RANK : (int)max_rank;
    a.ex.svd.oversample = (int)oversample;
    a.ex.svd.power_iters = (int)power;
    a.ex.svd.seed = (uint64_t)seed;
    if (xp_extract(&a) < 0) {
        fprintf(stderr, "xprec extract: %s\n", xp_last_error());
        return 1;
    }
    return 0;
}
