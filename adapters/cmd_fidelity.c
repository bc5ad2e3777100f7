/* xprec fidelity: how much of a fine-tune survives on the FP8 base, method by method.
 *
 * The BF16 fine-tune is the gold reference. For each prompt it writes a greedy continuation of
 * N tokens; every method is then teacher-forced on prompt + continuation and compared position
 * by position (KL of the next-token distribution from gold's, top-1 agreement), and asked for
 * its own greedy continuation (does it equal gold's?). Methods: A (adapter extracted against
 * the BF16 base, served on FP8), B (extracted against the dequantized FP8 base, served on FP8),
 * C (the fine-tune quantized directly), and controls: A's adapter on the BF16 base, the FP8
 * base alone, the BF16 base alone. Adapters and the quantized fine-tune are built into a cache
 * directory, each with a record of what it was made from, and reused only for the same.
 *
 * With held-out text (--heldout: the fine-tune's domain; --heldout-general: what it should not
 * forget) every method is also scored on real text: each document alone after <|endoftext|>,
 * the mean next-token loss over its tokens. Retention is the background's share of the
 * fine-tune's gain that survives, (loss_base - loss_method) / (loss_base - loss_tuned) on the
 * domain text; forgetting is loss_method - loss_base on the general text. */
#include "tokenizer/chat.h"
#include "cli.h"
#include "commands.h"
#include "fidelity_prompts.h"
#include "runner.h"
#include "svd.h"
#include "serve/sampler.h"
#include "util/fsutil.h"
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define XP_FID_CHUNK 64
#define XP_FID_MAX_RANKS 16

/* ---------------------------------------------------------------- a model to evaluate */

typedef struct {
    xp_model *m;
    xp_runner *r;
    int vocab;
} xp_fid_model;

static int xp_fid_open(xp_fid_model *f, const char *dir, int ctx, int threads, const char *backend)
{
    memset(f, 0, sizeof *f);
    if (xp_model_load(dir, NULL, &f->m) < 0) return -1;
    f->vocab = f->m->cfg.vocab_size;
    if (!(f->r = xp_runner_create(f->m, backend, threads, ctx, XP_FID_CHUNK))) return -1;
    return 0;
}

static void xp_fid_close(xp_fid_model *f)
{
    xp_runner_destroy(f->r);
    xp_model_free(f->m);
    memset(f, 0, sizeof *f);
}

/* Runs toks[0..n) from position start (the cache holds 0..start-1) and copies the logits of
 * positions >= first_out into out ((n - max(first_out, start)) x vocab). */
static int xp_fid_run(xp_fid_model *f, const int32_t *toks, int start, int n, int first_out,
                      float *out)
{
    return xp_runner_run(f->r, toks, start, n, first_out, out);
}

/* N greedy tokens after the prompt into cont (cont needs room for them). */
static int xp_fid_greedy(xp_fid_model *f, int32_t *toks, int np, int N,
                         float *scratch)
{
    if (xp_fid_run(f, toks, 0, np, np - 1, scratch) < 0) return -1;
    for (int k = 0; k < N; k++) {
        toks[np + k] = xp_argmax(scratch, f->vocab);
        if (k + 1 < N && xp_fid_run(f, toks, np + k, np + k + 1, np + k, scratch) < 0) return -1;
    }
    return 0;
}

/* log(sum(exp(x))) in double */
static double xp_logsumexp(const float *x, int n)
{
    float mx = x[0];
    for (int i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0;
    for (int i = 0; i < n; i++) s += exp((double)x[i] - mx);
    return log(s) + mx;
}

/* log-softmax in double, written back as float */
static void xp_log_softmax(float *x, int n)
{
    double ls = xp_logsumexp(x, n);
    for (int i = 0; i < n; i++) x[i] = (float)((double)x[i] - ls);
}

/* KL(p || q) for log-probabilities lp, lq */
static double xp_kl(const float *lp, const float *lq, int n)
{
    double kl = 0;
    for (int i = 0; i < n; i++) {
        double p = exp((double)lp[i]);
        if (p > 0) kl += p * ((double)lp[i] - (double)lq[i]);
    }
    return kl > 0 ? kl : 0;
}

/* ---------------------------------------------------------------- artifacts in the cache */

/* Runs another xprec command in-process with its output on stderr, so stdout keeps the table. */
static int xp_run_cmd(int (*cmd)(int, char **), int argc, char **argv)
{
    fflush(stdout);
    int saved = dup(1);
    dup2(2, 1);
    int rc = cmd(argc, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    return rc == 0 ? 0 : xp_fail("%s failed (see above)", argv[0]);
}

typedef struct {
    const char *base, *quant, *tuned, *cache, *svd, *backend;
    int ranks[XP_FID_MAX_RANKS], nranks, tokens, threads;
    double energies[XP_FID_MAX_RANKS]; /* adapters by energy share, after the ranks */
    int nenergies;
} xp_fid_args;

/* Adapter i of A and B: the ranks first, then the energy shares. */
static void xp_variant_name(const xp_fid_args *a, int i, char *s, size_t n)
{
    if (i < a->nranks)
        snprintf(s, n, "r%d", a->ranks[i]);
    else
        snprintf(s, n, "e%g", a->energies[i - a->nranks]);
}

/* Each artifact in the cache carries this file: what it was made from. It is reused only when
 * this run would make it from the same inputs with the same options. */
#define XP_FID_STAMP "xprec-made-from.json"

/* An input directory as the cache sees it: its real path and every file's name, size and
 * modification time, so that any rewrite of the checkpoint makes it another input. */
static cJSON *xp_dir_identity(const char *dir)
{
    char real[PATH_MAX];
    if (!realpath(dir, real)) {
        xp_fail("%s: %s", dir, strerror(errno));
        return NULL;
    }
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) {
        xp_fail("%s: %s", dir, strerror(errno));
        return NULL;
    }
    cJSON *id = cJSON_CreateObject(), *files = cJSON_AddArrayToObject(id, "files");
    cJSON_AddStringToObject(id, "path", real);
    for (int i = 0; i < n; i++) {
        char *p = xp_path_join(dir, names[i]->d_name);
        struct stat st;
        if (p && stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
            cJSON *f = cJSON_CreateArray();
            cJSON_AddItemToArray(f, cJSON_CreateString(names[i]->d_name));
            cJSON_AddItemToArray(f, cJSON_CreateNumber((double)st.st_size));
            char mt[48];
            snprintf(mt, sizeof mt, "%lld.%09ld", (long long)st.st_mtim.tv_sec,
                     st.st_mtim.tv_nsec);
            cJSON_AddItemToArray(f, cJSON_CreateString(mt));
            cJSON_AddItemToArray(files, f);
        }
        free(p);
        free(names[i]);
    }
    free(names);
    return id;
}

/* Does dir hold an artifact made from exactly this? */
static int xp_stamp_matches(const char *dir, const char *made_from)
{
    char *p = xp_path_join(dir, XP_FID_STAMP);
    struct stat st;
    char *text = p && stat(p, &st) == 0 ? xp_read_text_file(p, 1u << 20) : NULL;
    int same = text && strcmp(text, made_from) == 0;
    free(text);
    free(p);
    return same;
}

static int xp_stamp_write(const char *dir, const char *made_from)
{
    char *p = xp_path_join(dir, XP_FID_STAMP), *tmp = xp_path_join(dir, "." XP_FID_STAMP);
    FILE *fp = p && tmp ? fopen(tmp, "wb") : NULL;
    int ok = fp && fputs(made_from, fp) >= 0;
    ok = fp && fclose(fp) == 0 && ok && rename(tmp, p) == 0;
    if (!ok) xp_fail("%s: cannot write %s", dir, XP_FID_STAMP);
    free(p);
    free(tmp);
    return ok ? 0 : -1;
}

/* Builds dir with the command argv (which ends in "--out", dir, "--force") unless the cache
 * already holds it made from made_from. */
static int xp_cached(const char *what, const char *dir, const char *made_from,
                     int (*cmd)(int, char **), int argc, char **argv)
{
    if (xp_stamp_matches(dir, made_from)) return 0;
    struct stat st;
    fprintf(stderr, "fidelity: %s -> %s%s\n", what, dir,
            stat(dir, &st) == 0 ? " (the cached one was made from other inputs)" : "");
    if (xp_run_cmd(cmd, argc, argv) < 0) return -1;
    return xp_stamp_write(dir, made_from);
}

/* The inputs must be what the rows say they are: a BF16 base, its FP8 quantization and a BF16
 * fine-tune of the same shape. */
static int xp_fid_check_inputs(const xp_fid_args *a)
{
    const char *dirs[3] = {a->base, a->quant, a->tuned};
    xp_qwen3_config cfg[3];
    int fp8[3];
    for (int i = 0; i < 3; i++) {
        xp_quant_config q;
        if (xp_qwen3_config_load(dirs[i], &cfg[i], &q) < 0) return -1;
        fp8[i] = q.kind != XP_QUANT_NONE;
        xp_quant_config_free(&q);
    }
    if (fp8[0]) return xp_fail("--base %s is quantized; give the BF16 model", a->base);
    if (!fp8[1])
        return xp_fail("--quantized %s has no quantization_config: it is a BF16 checkpoint, and "
                       "Methods A and B would be measured on it as if it were FP8; give the FP8 "
                       "model",
                       a->quant);
    if (fp8[2]) return xp_fail("--tuned %s is quantized; give the BF16 fine-tune", a->tuned);
    for (int i = 1; i < 3; i++)
        if (cfg[i].hidden_size != cfg[0].hidden_size ||
            cfg[i].intermediate_size != cfg[0].intermediate_size ||
            cfg[i].num_hidden_layers != cfg[0].num_hidden_layers ||
            cfg[i].num_attention_heads != cfg[0].num_attention_heads ||
            cfg[i].num_key_value_heads != cfg[0].num_key_value_heads ||
            cfg[i].head_dim != cfg[0].head_dim || cfg[i].vocab_size != cfg[0].vocab_size)
            return xp_fail("%s and %s are not the same architecture (config.json dimensions "
                           "differ)",
                           a->base, dirs[i]);
    return 0;
}

static int xp_build_artifacts(const xp_fid_args *a, char (*adir)[2][4096], char *tuned_fp8)
{
    if (strlen(a->cache) > 3000) return xp_fail("--cache path is too long");
    if (xp_mkdir_p(a->cache) < 0) return -1;
    cJSON *ids[3] = {xp_dir_identity(a->base), xp_dir_identity(a->quant),
                     xp_dir_identity(a->tuned)};
    int rc = -1;
    char *made = NULL;
    if (!ids[0] || !ids[1] || !ids[2]) goto done;
    snprintf(tuned_fp8, 4096, "%.3000s/C-tuned-fp8", a->cache);
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "artifact", "C: the fine-tune quantized");
    cJSON_AddStringToObject(c, "command", "quantize");
    cJSON_AddItemReferenceToObject(c, "tuned", ids[2]);
    made = cJSON_Print(c);
    cJSON_Delete(c);
    char *qargv[] = {"quantize", "--in", (char *)a->tuned, "--out", tuned_fp8, "--force", NULL};
    if (!made || xp_cached("Method C: quantizing the fine-tune", tuned_fp8, made, xp_cmd_quantize,
                           6, qargv) < 0)
        goto done;
    for (int i = 0; i < a->nranks + a->nenergies; i++) {
        char name[32], value[32];
        xp_variant_name(a, i, name, sizeof name);
        snprintf(value, sizeof value, "%s", name + 1);
        int by_rank = i < a->nranks;
        for (int m = 0; m < 2; m++) {
            snprintf(adir[i][m], 4096, "%.3000s/%c-%s", a->cache, m ? 'B' : 'A', name);
            const char *base = m ? a->quant : a->base;
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "artifact", m ? "B: adapter against the FP8 base"
                                                     : "A: adapter against the BF16 base");
            cJSON_AddStringToObject(o, "command", "extract");
            if (by_rank)
                cJSON_AddNumberToObject(o, "rank", a->ranks[i]);
            else
                cJSON_AddNumberToObject(o, "energy", a->energies[i - a->nranks]);
            cJSON_AddStringToObject(o, "svd", a->svd);
            cJSON_AddItemReferenceToObject(o, "base", ids[m ? 1 : 0]);
            cJSON_AddItemReferenceToObject(o, "tuned", ids[2]);
            free(made);
            made = cJSON_Print(o);
            cJSON_Delete(o);
            char what[64];
            snprintf(what, sizeof what, "Method %c, %s %s", m ? 'B' : 'A',
                     by_rank ? "rank" : "energy", value);
            char *argv[] = {"extract", "--base", (char *)base, "--tuned", (char *)a->tuned,
                            by_rank ? "--rank" : "--energy", value, "--svd", (char *)a->svd,
                            "--out", adir[i][m], "--force", NULL};
            if (!made || xp_cached(what, adir[i][m], made, xp_cmd_extract, 12, argv) < 0)
                goto done;
        }
    }
    rc = 0;
done:
    free(made);
    for (int i = 0; i < 3; i++) cJSON_Delete(ids[i]);
    return rc;
}

/* Bytes of every tensor of a checkpoint or adapter directory. */
static uint64_t xp_dir_tensor_bytes(const char *dir, const char *stem)
{
    xp_st_set *s;
    if (xp_st_set_open(dir, stem, &s) < 0) return 0;
    uint64_t b = 0;
    for (size_t i = 0; i < xp_st_set_count(s); i++) b += xp_st_set_tensor(s, i)->nbytes;
    xp_st_set_close(s);
    return b;
}

/* ---------------------------------------------------------------- evaluation */

typedef struct {
    const char *method, *what;
    int rank;      /* 0: no adapter, or one by energy */
    double energy; /* > 0: the adapter keeps this share of each module's ||dW||^2 */
    const char *model, *adapter;
    double mean_kl, p95_kl, top1, greedy_match;
    double loss, top1_text, loss_general, retention, forgetting; /* on held-out text */
    uint64_t bytes;
} xp_fid_row;

/* ---------------------------------------------------------------- held-out text */

typedef struct {
    const char *path;
    int n;          /* documents */
    int32_t **toks; /* <|endoftext|> and the document's ids */
    int *len;       /* ids in toks[i], the separator included */
    long scored;    /* tokens predicted: the sum of len - 1 */
    int32_t **gold; /* the fine-tune's argmax at each position (domain text) */
    double loss_tuned, loss_base;
} xp_fid_text;

/* Documents of a UTF-8 text file, separated by blank lines (lines of only whitespace); a
 * document's lines are kept with their newlines between them. Each becomes <|endoftext|> + its
 * ids, Qwen's separator between pretraining documents. */
static int xp_text_load(xp_fid_text *t, const char *path, const xp_tokenizer *tok, int32_t eot)
{
    memset(t, 0, sizeof *t);
    t->path = path;
    char *text = xp_read_text_file(path, 256u << 20);
    if (!text) return -1;
    int cap = 0, rc = 0;
    char *doc = NULL, *line = text;
    while (line && rc == 0) {
        char *nl = strchr(line, '\n');
        char *end = nl ? nl : line + strlen(line);
        int blank = 1;
        for (char *c = line; c < end; c++) blank &= *c == ' ' || *c == '\t' || *c == '\r';
        if (!blank && !doc) doc = line;
        if ((blank || !nl) && doc) {
            char *stop = blank ? line - 1 : end; /* the newline before a blank line ends it */
            if (t->n == cap) {
                cap = cap ? 2 * cap : 64;
                int32_t **nt = realloc(t->toks, (size_t)cap * sizeof *nt);
                if (nt) t->toks = nt;
                int *nlen = nt ? realloc(t->len, (size_t)cap * sizeof *nlen) : NULL;
                if (nlen) t->len = nlen;
                if (!nt || !nlen) {
                    rc = xp_fail("out of memory");
                    break;
                }
            }
            int32_t *ids;
            size_t n;
            if (xp_tokenizer_encode(tok, doc, (size_t)(stop - doc), 1, &ids, &n) < 0) {
                rc = -1;
                break;
            }
            int32_t *all = malloc((n + 1) * sizeof *all);
            if (!all) {
                free(ids);
                rc = xp_fail("out of memory");
                break;
            }
            all[0] = eot;
            memcpy(all + 1, ids, n * sizeof *ids);
            free(ids);
            t->toks[t->n] = all;
            t->len[t->n++] = (int)n + 1;
            t->scored += (long)n;
            doc = NULL;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    if (rc == 0 && t->scored == 0)
        rc = xp_fail("%s holds no text (documents are separated by blank lines)", path);
    return rc;
}

static void xp_text_free(xp_fid_text *t)
{
    for (int i = 0; i < t->n; i++) {
        free(t->toks[i]);
        if (t->gold) free(t->gold[i]);
    }
    free(t->toks);
    free(t->len);
    free(t->gold);
    memset(t, 0, sizeof *t);
}

static int xp_text_longest(const xp_fid_text *t)
{
    int m = 0;
    for (int i = 0; i < t->n; i++) m = t->len[i] > m ? t->len[i] : m;
    return m;
}

/* Mean next-token loss (nats per token) over every document of t; with keep, stores the argmax
 * at each position into t->gold (the fine-tune's pass), else with t->gold counts the positions
 * whose argmax agrees with it into *top1 (a share). */
static int xp_text_score(xp_fid_model *f, xp_fid_text *t, int keep, double *loss, double *top1,
                         float *scratch)
{
    int V = f->vocab;
    double nll = 0;
    long agree = 0;
    if (keep && !(t->gold = calloc((size_t)t->n, sizeof *t->gold))) return xp_fail("out of memory");
    for (int d = 0; d < t->n; d++) {
        int n = t->len[d];
        const int32_t *x = t->toks[d];
        if (keep && !(t->gold[d] = malloc((size_t)n * sizeof *t->gold[d])))
            return xp_fail("out of memory");
        for (int s = 0; s < n - 1; s += XP_FID_CHUNK) {
            int e = s + XP_FID_CHUNK < n - 1 ? s + XP_FID_CHUNK : n - 1;
            if (xp_fid_run(f, x, s, e, s, scratch) < 0) return -1;
            for (int p = s; p < e; p++) {
                const float *z = scratch + (size_t)(p - s) * V;
                nll += xp_logsumexp(z, V) - (double)z[x[p + 1]];
                int32_t am = xp_argmax(z, V);
                if (keep)
                    t->gold[d][p] = am;
                else if (t->gold)
                    agree += am == t->gold[d][p];
            }
        }
    }
    *loss = nll / (double)t->scored;
    if (top1) *top1 = (double)agree / (double)t->scored;
    return 0;
}

typedef struct {
    int n;          /* prompts */
    int32_t **toks; /* prompt + gold continuation */
    int *np;
    float **gold;   /* [N, vocab] gold log-probs per prompt */
} xp_fid_gold;

static int xp_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int xp_fid_eval(const xp_fid_args *a, xp_fid_model *f, const xp_lora_weights *lw,
                       const xp_fid_gold *g, xp_fid_text *dom, xp_fid_text *gen_text,
                       xp_fid_row *row, float *scratch)
{
    int N = a->tokens, V = f->vocab, total = g->n * N, top1 = 0, match = 0;
    if (xp_runner_set_adapter(f->r, lw) < 0) return -1;
    double *kls = malloc((size_t)total * sizeof *kls), sum = 0;
    int32_t *gen = malloc(((size_t)g->np[0] + 4096) * sizeof *gen);
    if (!kls || !gen) {
        free(kls);
        free(gen);
        return xp_fail("out of memory");
    }
    int rc = 0;
    for (int p = 0; p < g->n && rc == 0; p++) {
        int np = g->np[p];
        if (xp_fid_run(f, g->toks[p], 0, np + N - 1, np - 1, scratch) < 0) {
            rc = -1;
            break;
        }
        for (int k = 0; k < N; k++) {
            float *q = scratch + (size_t)k * V;
            if (xp_argmax(q, V) == g->toks[p][np + k]) top1++;
            xp_log_softmax(q, V);
            kls[p * N + k] = xp_kl(g->gold[p] + (size_t)k * V, q, V);
            sum += kls[p * N + k];
        }
        int32_t *t = realloc(gen, ((size_t)np + (size_t)N) * sizeof *gen);
        if (!t) {
            rc = xp_fail("out of memory");
            break;
        }
        gen = t;
        memcpy(gen, g->toks[p], (size_t)np * sizeof *gen);
        if (xp_fid_greedy(f, gen, np, N, scratch) < 0) {
            rc = -1;
            break;
        }
        match += memcmp(gen + np, g->toks[p] + np, (size_t)N * sizeof *gen) == 0;
    }
    if (rc == 0) {
        qsort(kls, (size_t)total, sizeof *kls, xp_cmp_double);
        row->mean_kl = sum / total;
        row->p95_kl = kls[(int)ceil(0.95 * total) - 1];
        row->top1 = (double)top1 / total;
        row->greedy_match = (double)match / g->n;
    }
    free(kls);
    free(gen);
    if (rc == 0 && dom) rc = xp_text_score(f, dom, 0, &row->loss, &row->top1_text, scratch);
    if (rc == 0 && gen_text) rc = xp_text_score(f, gen_text, 0, &row->loss_general, NULL, scratch);
    return rc;
}

static int xp_read_prompts(const char *path, char ***out, int *n)
{
    *out = NULL;
    *n = 0;
    if (!path) {
        int k = (int)(sizeof xp_fidelity_default_prompts / sizeof *xp_fidelity_default_prompts);
        *out = malloc((size_t)k * sizeof **out);
        if (!*out) return xp_fail("out of memory");
        for (int i = 0; i < k; i++) (*out)[i] = strdup(xp_fidelity_default_prompts[i]);
        *n = k;
        return 0;
    }
    char *text = xp_read_text_file(path, 16u << 20);
    if (!text) return -1;
    int cap = 16;
    *out = malloc((size_t)cap * sizeof **out);
    for (char *line = strtok(text, "\n"); line && *out; line = strtok(NULL, "\n")) {
        if (!*line || *line == '#') continue;
        if (*n == cap) {
            char **m = realloc(*out, (size_t)(cap *= 2) * sizeof **out);
            if (!m) break;
            *out = m;
        }
        (*out)[(*n)++] = strdup(line);
    }
    free(text);
    if (!*out) return xp_fail("out of memory");
    if (*n == 0) return xp_fail("%s holds no prompts (one per line; # starts a comment)", path);
    return 0;
}

static int xp_fid_plot(const char *png, const xp_fid_row *rows, int nrows)
{
    char dir[] = "/tmp/xprec-fid-XXXXXX", data[64], script[64];
    if (!mkdtemp(dir)) return xp_fail("cannot create a scratch directory: %s", strerror(errno));
    snprintf(data, sizeof data, "%s/kl.dat", dir);
    snprintf(script, sizeof script, "%s/kl.gp", dir);
    FILE *fd = fopen(data, "w"), *fs = fopen(script, "w");
    int ok = fd && fs;
    for (int i = 0; ok && i < nrows; i++) {
        char label[64];
        snprintf(label, sizeof label, rows[i].rank ? "%s r%d" : "%s", rows[i].method, rows[i].rank);
        fprintf(fd, "%d \"%s\" %.6g\n", i, label, rows[i].mean_kl > 0 ? rows[i].mean_kl : 1e-12);
    }
    if (ok)
        fprintf(fs,
                "set terminal png size 1100,600\n"
                "set output '%s'\n"
                "set style fill solid\n"
                "set boxwidth 0.7\n"
                "set logscale y\n"
                "set format y '%%.0e'\n"
                "set ylabel 'mean KL(gold || method)'\n"
                "set xtics rotate by -35\n"
                "set title 'xprec fidelity'\n"
                "plot '%s' using 1:3:xtic(2) with boxes notitle\n",
                png, data);
    ok = fd && fclose(fd) == 0 && ok;
    ok = fs && fclose(fs) == 0 && ok;
    int rc = ok ? xp_run_gnuplot(script, png) : xp_fail("%s: cannot write", dir);
    unlink(data);
    unlink(script);
    rmdir(dir);
    return rc;
}

int xp_cmd_fidelity(int argc, char **argv)
{
    xp_fid_args a = {.cache = "fidelity-cache", .tokens = 16};
    const char *prompts = NULL, *out = NULL, *plot = NULL, *svd = "auto";
    const char *heldout = NULL, *heldout_general = NULL;
    xp_opt_ints ranks = {.v = {16, 64, 256}, .n = 3};
    xp_opt_list energies = {0};
    long tokens = a.tokens, threads = 0;
    int text_prompts = 0;
    xp_opt opts[] = {
        XP_STR_REQ("base", &a.base, "DIR", "the BF16 base"),
        XP_STR_REQ("quantized", &a.quant, "DIR", "its FP8 quantization"),
        XP_STR_REQ("tuned", &a.tuned, "DIR", "the BF16 fine-tune of --base (the gold reference)"),
        XP_STR("prompts", &prompts, "FILE", "one prompt per line, # starts a comment (default:\n"
                                            "a set that ships with xprec)"),
        XP_CHOICE("prompt-format", &text_prompts, "chat|text",
                  "chat: each prompt as a user turn in ChatML, thinking off\n"
                  "(the default); text: as the start of a document, after\n"
                  "<|endoftext|> (for base models)"),
        XP_INTS("ranks", &ranks, 1, XP_MAX_LORA_RANK, XP_FID_MAX_RANKS, "R,R,...",
                "adapter ranks for Methods A and B (default 16,64,256)"),
        XP_LIST("energy", &energies, XP_FID_MAX_RANKS, "F",
                "also A and B adapters that keep the share F of each\n"
                "module's ||dW||^2 (extract --energy; repeatable)"),
        XP_STR("heldout", &heldout, "FILE",
               "held-out text of the fine-tune's domain (documents\n"
               "separated by blank lines): loss per method and retention\n"
               "(loss_base - loss) / (loss_base - loss_tuned)"),
        XP_STR("heldout-general", &heldout_general, "FILE",
               "held-out general text, the same format: loss per method\n"
               "and forgetting, loss - loss_base"),
        XP_INT("tokens", &tokens, 1, 4096, "N", "gold's greedy continuation length (default 16)"),
        XP_STR("out", &out, "report.json", "write every figure as JSON"),
        XP_STR("plot", &plot, "FILE.png", "draw mean KL per method (needs gnuplot)"),
        XP_STR("cache", &a.cache, "DIR", "where the adapters and the quantized fine-tune are\n"
                                         "kept for later runs (default ./fidelity-cache)"),
        XP_STR("svd", &svd, "auto|exact|randomized", "passed to extract (default auto)"),
        XP_OPT_THREADS(&threads),
        XP_OPT_BACKEND(&a.backend),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "fidelity",
        .usage = "usage: xprec fidelity --base DIR --quantized DIR --tuned DIR [--prompts FILE]\n"
                 "                      [--prompt-format chat|text] [--ranks 16,64,256]\n"
                 "                      [--energy F]... [--heldout FILE] [--heldout-general FILE]\n"
                 "                      [--tokens N] [--out report.json]\n"
                 "                      [--plot FILE.png] [--cache DIR] [--svd auto|exact|randomized]\n"
                 "                      [--threads N] [--backend cpu|cuda|auto]\n",
        .about = "Compares each way of serving the BF16 fine-tune --tuned on the FP8 base against\n"
                 "the fine-tune itself: Method A (adapter from tuned - base, on FP8), B (adapter\n"
                 "from tuned - dequant(FP8), on FP8), C (tuned quantized to FP8), and controls.\n"
                 "Per method: mean and p95 KL of the next-token distribution from gold's\n"
                 "(teacher-forced on gold's greedy continuation of N tokens), top-1 agreement,\n"
                 "the share of prompts whose greedy continuation equals gold's, and resident\n"
                 "weight bytes. With --heldout, also each method's loss on held-out domain\n"
                 "text, the retention of the fine-tune's gain, and top-1 agreement with the\n"
                 "fine-tune along that text; with --heldout-general, loss and forgetting on\n"
                 "general text. Each document is scored alone after <|endoftext|>. The\n"
                 "adapters and the quantized fine-tune are kept in --cache, each with\n"
                 "xprec-made-from.json (the inputs' paths, file sizes and times, and the\n"
                 "options): one is reused only when this run would make it from the same.\n",
        .opts = opts};
    int st = xp_cmd_parse(&cmd, argc, argv);
    if (st >= 0) return st;
    xp_svd_method sm;
    if (xp_svd_method_parse(svd, &sm) < 0) {
        fprintf(stderr, "xprec fidelity: --svd is auto, exact or randomized, got \"%s\"\n", svd);
        return 2;
    }
    /* fail before the work, not after it */
    if (plot && (st = xp_plot_check("fidelity", plot)) != 0) return st;
    a.svd = svd;
    a.tokens = (int)tokens;
    a.threads = threads ? (int)threads : xp_cpu_count();
    a.nranks = ranks.n;
    for (int i = 0; i < ranks.n; i++) a.ranks[i] = (int)ranks.v[i];
    a.nenergies = energies.n;
    for (int i = 0; i < energies.n; i++) {
        char *end;
        a.energies[i] = strtod(energies.v[i], &end);
        if (end == energies.v[i] || *end || !(a.energies[i] > 0 && a.energies[i] <= 1))
            return xp_cmd_usage_error(&cmd, "--energy %s: not a share in (0, 1]", energies.v[i]);
    }
    int nvar = a.nranks + a.nenergies;
    char (*adir)[2][4096] = calloc((size_t)nvar, sizeof *adir), tuned_fp8[4096];
    char **texts = NULL;
    int ntexts = 0, rc = 1, nrows = 0;
    xp_fid_gold g = {0};
    xp_fid_text dom = {0}, gen = {0};
    xp_fid_row *rows = calloc((size_t)(3 * nvar + 3), sizeof *rows);
    float *scratch = NULL;
    xp_tokenizer *tok = NULL;
    xp_fid_model f = {0};
    cJSON *report = NULL;
    if (!adir || !rows) goto oom;
    if (xp_fid_check_inputs(&a) < 0 || xp_read_prompts(prompts, &texts, &ntexts) < 0) goto fail;
    if (xp_build_artifacts(&a, adir, tuned_fp8) < 0) goto fail;
    if (!(tok = xp_tokenizer_load(a.tuned))) goto fail;
    int32_t eot = xp_tokenizer_token_id(tok, "<|endoftext|>");
    if ((text_prompts || heldout || heldout_general) && eot < 0) {
        xp_fail("%s: the tokenizer has no <|endoftext|> to start documents with", a.tuned);
        goto fail;
    }
    if (heldout && xp_text_load(&dom, heldout, tok, eot) < 0) goto fail;
    if (heldout_general && xp_text_load(&gen, heldout_general, tok, eot) < 0) goto fail;
    g.n = ntexts;
    g.toks = calloc((size_t)ntexts, sizeof *g.toks);
    g.np = calloc((size_t)ntexts, sizeof *g.np);
    g.gold = calloc((size_t)ntexts, sizeof *g.gold);
    if (!g.toks || !g.np || !g.gold) goto oom;
    int maxlen = 0;
    for (int p = 0; p < ntexts; p++) {
        /* chat: in ChatML, thinking off, as a chat client would send it; text: a document's
         * start, for a base model */
        xp_chat_msg msg = {"user", texts[p]};
        char *chat = text_prompts ? NULL : xp_chat_build(&msg, 1, 1, 0);
        const char *in = text_prompts ? texts[p] : chat;
        size_t n;
        int32_t *ids;
        int bad = !in || xp_tokenizer_encode(tok, in, strlen(in), 1, &ids, &n) < 0;
        free(chat);
        if (bad) goto fail;
        if (text_prompts) {
            int32_t *t = realloc(ids, (n + 1) * sizeof *ids);
            if (!t) {
                free(ids);
                goto oom;
            }
            ids = t;
            memmove(ids + 1, ids, n * sizeof *ids);
            ids[0] = eot;
            n++;
        }
        g.np[p] = (int)n;
        if (!(g.toks[p] = realloc(ids, (n + (size_t)a.tokens) * sizeof *ids))) goto oom;
        if ((int)n + a.tokens > maxlen) maxlen = (int)n + a.tokens;
    }
    if (xp_text_longest(&dom) > maxlen) maxlen = xp_text_longest(&dom);
    if (xp_text_longest(&gen) > maxlen) maxlen = xp_text_longest(&gen);
    /* gold: the fine-tune's greedy continuation and its log-probs along it */
    fprintf(stderr, "fidelity: gold continuations from %s\n", a.tuned);
    if (xp_fid_open(&f, a.tuned, maxlen, a.threads, a.backend) < 0) goto fail;
    int V = f.vocab;
    if (!(scratch = malloc((size_t)(a.tokens > XP_FID_CHUNK ? a.tokens : XP_FID_CHUNK) * (size_t)V * sizeof *scratch)))
        goto oom;
    for (int p = 0; p < ntexts; p++) {
        int np = g.np[p];
        if (xp_fid_greedy(&f, g.toks[p], np, a.tokens, scratch) < 0 ||
            xp_fid_run(&f, g.toks[p], 0, np + a.tokens - 1, np - 1, scratch) < 0)
            goto fail;
        if (!(g.gold[p] = malloc((size_t)a.tokens * (size_t)V * sizeof(float)))) goto oom;
        for (int k = 0; k < a.tokens; k++) xp_log_softmax(scratch + (size_t)k * V, V);
        memcpy(g.gold[p], scratch, (size_t)a.tokens * (size_t)V * sizeof(float));
    }
    if (heldout) {
        fprintf(stderr, "fidelity: the fine-tune on %s (%d documents, %ld tokens)\n", heldout,
                dom.n, dom.scored);
        if (xp_text_score(&f, &dom, 1, &dom.loss_tuned, NULL, scratch) < 0) goto fail;
    }
    if (heldout_general) {
        fprintf(stderr, "fidelity: the fine-tune on %s (%d documents, %ld tokens)\n",
                heldout_general, gen.n, gen.scored);
        if (xp_text_score(&f, &gen, 0, &gen.loss_tuned, NULL, scratch) < 0) goto fail;
    }
    xp_fid_close(&f);
    /* every method and control, one model load per checkpoint */
    for (int i = 0; i < nvar; i++) {
        int rank = i < a.nranks ? a.ranks[i] : 0;
        double en = i < a.nranks ? 0 : a.energies[i - a.nranks];
        rows[nrows++] = (xp_fid_row){.method = "A", .what = "BF16-base adapter on the FP8 base", .rank = rank, .energy = en, .model = a.quant, .adapter = adir[i][0]};
        rows[nrows++] = (xp_fid_row){.method = "B", .what = "FP8-base adapter on the FP8 base", .rank = rank, .energy = en, .model = a.quant, .adapter = adir[i][1]};
        rows[nrows++] = (xp_fid_row){.method = "ctrl A/BF16", .what = "A's adapter on the BF16 base", .rank = rank, .energy = en, .model = a.base, .adapter = adir[i][0]};
    }
    rows[nrows++] = (xp_fid_row){.method = "C", .what = "fine-tune quantized to FP8", .rank = 0, .model = tuned_fp8, .adapter = NULL};
    rows[nrows++] = (xp_fid_row){.method = "ctrl FP8", .what = "FP8 base, no adapter", .rank = 0, .model = a.quant, .adapter = NULL};
    rows[nrows++] = (xp_fid_row){.method = "ctrl BF16", .what = "BF16 base, no adapter", .rank = 0, .model = a.base, .adapter = NULL};
    const char *models[4] = {a.quant, a.base, tuned_fp8, NULL};
    xp_progress pr;
    xp_progress_begin(&pr, "fidelity", (size_t)nrows, 0);
    int done = 0;
    for (int mi = 0; models[mi]; mi++) {
        if (xp_fid_open(&f, models[mi], maxlen, a.threads, a.backend) < 0) goto fail;
        uint64_t mbytes = xp_dir_tensor_bytes(models[mi], "model");
        for (int r = 0; r < nrows; r++) {
            if (rows[r].model != models[mi]) continue;
            xp_lora_weights lw = {0};
            if (rows[r].adapter && xp_lora_load(rows[r].adapter, &f.m->cfg, &lw) < 0) goto fail;
            int e = xp_fid_eval(&a, &f, rows[r].adapter ? &lw : NULL, &g, heldout ? &dom : NULL,
                                heldout_general ? &gen : NULL, &rows[r], scratch);
            rows[r].bytes = mbytes + (rows[r].adapter ? xp_dir_tensor_bytes(rows[r].adapter, "adapter_model") : 0);
            xp_lora_free(&lw);
            if (e < 0) goto fail;
            done++;
            xp_progress_update(&pr, (size_t)done, 0, rows[r].what);
        }
        xp_fid_close(&f);
    }
    xp_progress_end(&pr);
    /* the BF16 base (the last row) is where the fine-tune's gain is measured from */
    dom.loss_base = rows[nrows - 1].loss;
    gen.loss_base = rows[nrows - 1].loss_general;
    double gain = dom.loss_base - dom.loss_tuned;
    for (int r = 0; r < nrows; r++) {
        rows[r].retention = gain != 0 ? (dom.loss_base - rows[r].loss) / gain : NAN;
        rows[r].forgetting = rows[r].loss_general - gen.loss_base;
    }
    printf("fidelity of %s served on %s (gold: the BF16 fine-tune), %d prompts x %d tokens\n",
           a.tuned, a.quant, ntexts, a.tokens);
    if (heldout)
        printf("held-out domain text %s: %d documents, %ld tokens; loss (nats/token) of the base "
               "%.4f, of the fine-tune %.4f\n",
               heldout, dom.n, dom.scored, dom.loss_base, dom.loss_tuned);
    if (heldout_general)
        printf("held-out general text %s: %d documents, %ld tokens; loss of the base %.4f, of "
               "the fine-tune %.4f\n",
               heldout_general, gen.n, gen.scored, gen.loss_base, gen.loss_tuned);
    printf("%-12s %-36s %5s %11s %11s %7s %8s %12s", "method", "what", "rank", "mean KL",
           "p95 KL", "top-1", "greedy=", "weights MB");
    if (heldout) printf(" %9s %9s %7s", "loss", "retained", "top-1 t");
    if (heldout_general) printf(" %9s %9s", "gen loss", "forgot");
    printf("\n");
    report = cJSON_CreateObject();
    cJSON_AddStringToObject(report, "base", a.base);
    cJSON_AddStringToObject(report, "quantized", a.quant);
    cJSON_AddStringToObject(report, "tuned", a.tuned);
    cJSON_AddNumberToObject(report, "prompts", ntexts);
    cJSON_AddNumberToObject(report, "tokens", a.tokens);
    for (int k = 0; k < 2; k++) {
        const xp_fid_text *t = k ? &gen : &dom;
        if (!t->path) continue;
        cJSON *o = cJSON_AddObjectToObject(report, k ? "heldout_general" : "heldout");
        cJSON_AddStringToObject(o, "file", t->path);
        cJSON_AddNumberToObject(o, "documents", t->n);
        cJSON_AddNumberToObject(o, "tokens", (double)t->scored);
        cJSON_AddNumberToObject(o, "loss_base", t->loss_base);
        cJSON_AddNumberToObject(o, "loss_tuned", t->loss_tuned);
    }
    cJSON *jr = cJSON_AddArrayToObject(report, "methods");
    for (int r = 0; r < nrows; r++) {
        xp_fid_row *x = &rows[r];
        char rk[16] = "-";
        if (x->rank) snprintf(rk, sizeof rk, "%d", x->rank);
        if (x->energy > 0) snprintf(rk, sizeof rk, "e%g", x->energy);
        printf("%-12s %-36s %5s %11.4g %11.4g %6.1f%% %7.1f%% %12.1f", x->method, x->what, rk,
               x->mean_kl, x->p95_kl, 100 * x->top1, 100 * x->greedy_match, (double)x->bytes / 1e6);
        if (heldout)
            printf(" %9.4f %8.1f%% %6.1f%%", x->loss, 100 * x->retention, 100 * x->top1_text);
        if (heldout_general) printf(" %9.4f %+9.4f", x->loss_general, x->forgetting);
        printf("\n");
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "method", x->method);
        cJSON_AddStringToObject(o, "what", x->what);
        cJSON_AddNumberToObject(o, "rank", x->rank);
        cJSON_AddStringToObject(o, "model", x->model);
        if (x->adapter) cJSON_AddStringToObject(o, "adapter", x->adapter);
        cJSON_AddNumberToObject(o, "mean_kl", x->mean_kl);
        cJSON_AddNumberToObject(o, "p95_kl", x->p95_kl);
        cJSON_AddNumberToObject(o, "top1_agreement", x->top1);
        cJSON_AddNumberToObject(o, "greedy_match", x->greedy_match);
        cJSON_AddNumberToObject(o, "weight_bytes", (double)x->bytes);
        if (x->energy > 0) cJSON_AddNumberToObject(o, "energy", x->energy);
        if (heldout) {
            cJSON_AddNumberToObject(o, "heldout_loss", x->loss);
            if (isfinite(x->retention))
                cJSON_AddNumberToObject(o, "retention", x->retention);
            else
                cJSON_AddNullToObject(o, "retention");
            cJSON_AddNumberToObject(o, "heldout_top1", x->top1_text);
        }
        if (heldout_general) {
            cJSON_AddNumberToObject(o, "general_loss", x->loss_general);
            cJSON_AddNumberToObject(o, "forgetting", x->forgetting);
        }
        cJSON_AddItemToArray(jr, o);
    }
    if (out) {
        char *js = cJSON_Print(report);
        FILE *fp = js ? fopen(out, "w") : NULL;
        int ok = fp && fputs(js, fp) >= 0;
        ok = fp && fclose(fp) == 0 && ok;
        free(js);
        if (!ok) {
            xp_fail("%s: cannot write the report", out);
            goto fail;
        }
    }
    if (plot && xp_fid_plot(plot, rows, nrows) < 0) goto fail;
    rc = 0;
    goto done;
oom:
    xp_fail("out of memory");
fail:
    fprintf(stderr, "xprec fidelity: %s\n", xp_last_error());
done:
    xp_fid_close(&f);
    xp_tokenizer_free(tok);
    for (int p = 0; p < g.n; p++) {
        free(g.toks[p]);
        free(g.gold[p]);
    }
    free(g.toks);
    free(g.np);
    free(g.gold);
    xp_text_free(&dom);
    xp_text_free(&gen);
    for (int p = 0; p < ntexts; p++) free(texts[p]);
    free(texts);
    free(rows);
    free(adir);
    free(scratch);
    cJSON_Delete(report);
    return rc;
}
