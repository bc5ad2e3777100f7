/* xprec bench: prefill and decode throughput of the engine at several batch sizes, base only or
 * with K distinct adapters, and decode's weight traffic against this machine's memory bandwidth
 * measured in the same run. */
#include "cli.h"
#include "commands.h"
#include "format/peft.h"
#include "model/lora.h"
#include "format/qwen3_config.h"
#include "util/rng.h"
#include "util/xp_error.h"
#include "xprec.h"

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int xp_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

/* K random adapters of rank r on all seven modules of every layer, under dir. */
static int xp_bench_adapters(const char *model, const char *dir, int k, int rank)
{
    xp_qwen3_config cfg;
    xp_quant_config q;
    if (xp_qwen3_config_load(model, &cfg, &q) < 0) return -1;
    xp_quant_config_free(&q);
    int n = cfg.num_hidden_layers * XP_MOD_COUNT;
    xp_lora_save *m = calloc((size_t)n, sizeof *m);
    if (!m) return xp_fail("out of memory");
    int rc = 0;
    for (int a = 0; a < k && rc == 0; a++) {
        xp_rng r;
        xp_rng_seed(&r, (uint64_t)a, "bench-adapter");
        for (int i = 0; i < n; i++) {
            int64_t o, in;
            xp_module_shape(&cfg, (xp_module)(i % XP_MOD_COUNT), &o, &in);
            uint16_t *A = malloc((size_t)(rank * in) * 2), *B = malloc((size_t)(o * rank) * 2);
            for (int64_t t = 0; A && t < rank * in; t++) A[t] = xp_f32_to_bf16(0.01f * xp_rng_normal(&r));
            for (int64_t t = 0; B && t < o * rank; t++) B[t] = xp_f32_to_bf16(0.01f * xp_rng_normal(&r));
            m[i] = (xp_lora_save){i / XP_MOD_COUNT, (xp_module)(i % XP_MOD_COUNT), rank, rank, in, o, A, B};
        }
        char sub[4096];
        snprintf(sub, sizeof sub, "%s/a%d", dir, a);
        rc = xp_mkdir(sub) < 0 || xp_peft_save(sub, model, m, (size_t)n, 0) < 0 ? -1 : 0;
        for (int i = 0; i < n; i++) {
            free((void *)m[i].A);
            free((void *)m[i].B);
        }
    }
    free(m);
    return rc;
}

typedef struct {
    double prefill_tps, decode_tps, step_ms, rss_mb;
} xp_bench_result;

/* Resident memory of this process now, in MB (weights, KV cache, adapters, buffers). */
static double xp_rss_mb(void)
{
    FILE *fp = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (fp && fgets(line, sizeof line, fp))
        if (sscanf(line, "VmRSS: %lf kB", &kb) == 1) break;
    if (fp) fclose(fp);
    return kb / 1024;
}

/* One pass: batch prompts of plen tokens (salt varies them) submitted at once, each generating
 * glen tokens; t0 at submission, t_first when every sequence has its first token, t_end when all
 * are done. */
static int xp_bench_pass(xp_engine *e, xp_queue *q, int batch, int k, int plen, int glen, int salt,
                         double *t0, double *t_first, double *t_end)
{
    int rc = -1;
    int32_t *toks = malloc((size_t)plen * sizeof *toks);
    uint64_t *ids = calloc((size_t)batch, sizeof *ids);
    int *seen = calloc((size_t)batch, sizeof *seen);
    if (!toks || !ids || !seen) {
        xp_fail("out of memory");
        goto out;
    }
    char names[64][32];
    *t0 = xp_now();
    *t_first = 0;
    for (int i = 0; i < batch; i++) {
        for (int t = 0; t < plen; t++)
            toks[t] = 1000 + (i * 7919 + t * 104729 + salt * 15485863) % 100000;
        snprintf(names[i % 64], sizeof names[0], "a%d", k ? i % k : 0);
        xp_request r = {.adapter = k ? names[i % 64] : NULL, .tokens = toks, .n_tokens = (size_t)plen,
                        .max_tokens = glen};
        if (!(ids[i] = xp_engine_submit(e, &r, q))) goto out;
    }
    int first = 0, done = 0;
    while (done < batch) {
        xp_event ev;
        if (!xp_queue_wait(q, &ev, 600000)) {
            xp_fail("benchmark stalled");
            goto out;
        }
        int i = (int)(ev.id - ids[0]);
        if (ev.type == XP_EV_TOKEN && i >= 0 && i < batch && !seen[i]++ && ++first == batch)
            *t_first = xp_now();
        if (ev.type == XP_EV_ERROR) {
            xp_fail("%s", ev.error);
            xp_event_clear(&ev);
            goto out;
        }
        done += ev.type == XP_EV_DONE;
        xp_event_clear(&ev);
    }
    *t_end = xp_now();
    rc = 0;
out:
    free(toks);
    free(ids);
    free(seen);
    return rc;
}

static int xp_bench_run(const char *model, const char *adir, int batch, int k, int plen, int glen,
                        const xp_engine_opts *base, size_t block_bytes, xp_bench_result *res)
{
    /* a cache with room for every sequence's prompt and reply, so all run at once; the whole
     * prefill in one step unless --prefill-chunk caps it */
    xp_engine_opts o = *base;
    o.max_batch = batch;
    o.max_adapters = k > 0 ? k : 1;
    if (!o.prefill_chunk) o.prefill_chunk = batch * plen > 256 ? batch * plen : 256;
    o.kv_bytes = block_bytes * (size_t)batch * (size_t)((plen + glen + 15) / 16);
    xp_engine *e = xp_engine_create(model, &o);
    if (!e) return -1;
    xp_queue *q = xp_queue_create();
    int rc = -1;
    char name[32], path[4096];
    for (int a = 0; a < k; a++) {
        snprintf(name, sizeof name, "a%d", a);
        snprintf(path, sizeof path, "%s/a%d", adir, a);
        if (xp_engine_add_adapter(e, name, path, 0) < 0) goto out;
    }
    /* a warm-up pass of the same shape (other prompt tokens) first: the first step after start
     * also pays the page faults of the engine's buffers and KV cache, as llama.cpp's tools also
     * leave out of their timings */
    double t0, t_first, t_end;
    if (xp_bench_pass(e, q, batch, k, plen, 2, 1, &t0, &t_first, &t_end) < 0 ||
        xp_bench_pass(e, q, batch, k, plen, glen, 0, &t0, &t_first, &t_end) < 0)
        goto out;
    res->prefill_tps = (double)batch * plen / (t_first - t0);
    res->step_ms = 1e3 * (t_end - t_first) / (glen - 1);
    res->decode_tps = (double)batch * (glen - 1) / (t_end - t_first);
    res->rss_mb = xp_rss_mb();
    rc = 0;
out:
    xp_engine_destroy(e);
    xp_queue_destroy(q);
    return rc;
}

int xp_cmd_bench(int argc, char **argv)
{
    const char *model = NULL, *backend = NULL, *kv_dtype = NULL;
    xp_opt_ints batches = {.v = {1, 8, 32}, .n = 3};
    long k = 0, rank = 16, plen = 64, glen = 32, threads = 0, chunk = 0;
    int lm_head = 0;
    xp_opt opts[] = {
        XP_OPT_MODEL(&model),
        XP_INTS("batch", &batches, 1, 1024, 16, "B,B,...", "batch sizes to run (default 1,8,32)"),
        XP_INT("adapters", &k, 0, 64, "K", "also run each batch with K distinct adapters"),
        XP_INT("rank", &rank, 1, XP_MAX_LORA_RANK, "R", "rank of those adapters (default 16)"),
        XP_INT("prompt-len", &plen, 1, 32768, "P", "prompt tokens per sequence (default 64)"),
        XP_INT("gen-len", &glen, 2, 32768, "G", "generated tokens per sequence (default 32)"),
        XP_INT("prefill-chunk", &chunk, 1, 1 << 20, "N",
               "token rows per step (default: every prompt in one step)"),
        XP_OPT_KV_DTYPE(&kv_dtype),
        XP_OPT_LM_HEAD(&lm_head),
        XP_OPT_THREADS(&threads),
        XP_OPT_BACKEND(&backend),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "bench",
        .usage = "usage: xprec bench --model DIR [--batch 1,8,32] [--adapters K --rank R]\n"
                 "                   [--prompt-len P] [--gen-len G] [--prefill-chunk N]\n"
                 "                   [--kv-dtype bf16|f32|fp8] [--lm-head stored|fp8]\n"
                 "                   [--threads N] [--backend cpu|cuda|auto]\n",
        .about = "Prefill and decode tokens/s, per-step time and decode's weight traffic as a\n"
                 "share of the memory read bandwidth measured in the same run; with --adapters,\n"
                 "every batch also runs with K distinct random rank-R adapters.\n",
        .opts = opts};
    int st = xp_cmd_parse(&cmd, argc, argv);
    if (st >= 0) return st;
    int nt = threads ? (int)threads : xp_cpu_count();
    /* a small engine on the same backend: what a step streams, a KV block's size, and the read
     * bandwidth of the memory the weights live in (host or device); made first, so that a bad
     * --model is reported as what it is */
    xp_engine_opts eo = {.threads = nt, .backend = backend, .kv_dtype = kv_dtype,
                         .lm_head_fp8 = lm_head, .prefill_chunk = (int)chunk};
    xp_engine_opts probe = eo;
    probe.kv_bytes = 64u << 20;
    probe.max_batch = 1;
    probe.prefill_chunk = 0;
    xp_engine *pe = xp_engine_create(model, &probe);
    if (!pe) {
        fprintf(stderr, "xprec bench: %s\n", xp_last_error());
        return 1;
    }
    uint64_t step_bytes = xp_engine_step_bytes(pe);
    size_t block_bytes = xp_engine_kv_block_bytes(pe);
    char be_name[16];
    snprintf(be_name, sizeof be_name, "%s", xp_engine_backend(pe));
    double bw = xp_engine_read_bandwidth(pe);
    xp_engine_destroy(pe);
    char adir[] = "/tmp/xprec-bench-XXXXXX";
    if (k > 0 && !mkdtemp(adir)) {
        fprintf(stderr, "xprec bench: cannot create a scratch directory: %s\n", strerror(errno));
        return 1;
    }
    if (k > 0 && xp_bench_adapters(model, adir, (int)k, (int)rank) < 0) {
        fprintf(stderr, "xprec bench: making the %ld random adapters: %s\n", k, xp_last_error());
        nftw(adir, xp_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        return 1;
    }
    printf("model %s, backend %s, %d threads, prompt %ld, generate %ld tokens\n", model, be_name,
           nt, plen, glen);
    printf("memory read bandwidth (%s, measured): %.2f GB/s; weights streamed per decode step: %.1f MB\n", be_name,
           bw / 1e9, (double)step_bytes / 1e6);
    printf("%-6s %-16s %14s %14s %12s %16s %10s %9s\n", "batch", "adapters", "prefill tok/s",
           "decode tok/s", "step ms", "weights GB/s", "of peak", "RSS MB");
    int rc = 0;
    for (int bi = 0; bi < batches.n && rc == 0; bi++) {
        int b = (int)batches.v[bi];
        for (int with = 0; with <= (k > 0) && rc == 0; with++) {
            xp_bench_result r;
            if (xp_bench_run(model, adir, b, with ? (int)k : 0, (int)plen, (int)glen, &eo,
                             block_bytes, &r) < 0) {
                fprintf(stderr, "xprec bench: %s\n", xp_last_error());
                rc = 1;
                break;
            }
            char label[32];
            snprintf(label, sizeof label, with ? "%ld x rank %ld" : "base only", k, rank);
            double gbs = (double)step_bytes / (r.step_ms / 1e3) / 1e9;
            printf("%-6d %-16s %14.1f %14.1f %12.2f %16.2f %9.0f%% %9.0f\n", b, label,
                   r.prefill_tps, r.decode_tps, r.step_ms, gbs, 100 * gbs * 1e9 / bw, r.rss_mb);
            fflush(stdout);
        }
    }
    if (k > 0) nftw(adir, xp_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}
