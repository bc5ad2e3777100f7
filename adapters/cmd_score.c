/* xprec score: logits of every position of one sequence as a float32 .npy [positions, vocab],
 * the hook for parity checks against other implementations. */
#include "cli.h"
#include "commands.h"
#include "npy.h"
#include "runner.h"
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XP_SCORE_CHUNK 128

static int xp_parse_ids(const char *s, int32_t **ids, size_t *n)
{
    size_t cap = 16;
    *ids = malloc(cap * sizeof **ids);
    *n = 0;
    const char *p = s;
    while (*ids && *p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 0x7fffffff || (*end && *end != ',')) {
            free(*ids);
            *ids = NULL;
            return xp_fail("--tokens needs comma-separated ids, got \"%s\"", s);
        }
        if (*n == cap) {
            int32_t *m = realloc(*ids, (cap *= 2) * sizeof **ids);
            if (!m) break;
            *ids = m;
        }
        (*ids)[(*n)++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!*ids) return xp_fail("out of memory");
    if (*n == 0) return xp_fail("--tokens is empty");
    return 0;
}

static int xp_score(const char *model_dir, const char *adapter, const int32_t *ids, size_t n,
                    const char *out, int threads, const char *backend)
{
    xp_model *m = NULL;
    xp_lora_weights lw = {0};
    xp_runner *r = NULL;
    float *logits = NULL;
    FILE *fp = NULL;
    int rc = -1;
    if (xp_model_load(model_dir, &m) < 0) goto done;
    if ((int64_t)n > m->cfg.max_position_embeddings) {
        xp_fail("%zu tokens exceed the context of %d", n, m->cfg.max_position_embeddings);
        goto done;
    }
    if (adapter && xp_lora_load(adapter, &m->cfg, &lw) < 0) goto done;
    int chunk = n < XP_SCORE_CHUNK ? (int)n : XP_SCORE_CHUNK;
    if (!(r = xp_runner_create(m, backend, threads, (int)n, chunk)) ||
        xp_runner_set_adapter(r, adapter ? &lw : NULL) < 0)
        goto done;
    if (!(logits = malloc((size_t)chunk * (size_t)m->cfg.vocab_size * sizeof *logits))) {
        xp_fail("out of memory");
        goto done;
    }
    if (!(fp = xp_npy_create(out, (int64_t)n, m->cfg.vocab_size))) goto done;
    for (size_t start = 0; start < n; start += (size_t)chunk) {
        size_t end = n - start < (size_t)chunk ? n : start + (size_t)chunk;
        if (xp_runner_run(r, ids, (int)start, (int)end, (int)start, logits) < 0 ||
            xp_npy_append(fp, logits, (end - start) * (size_t)m->cfg.vocab_size) < 0)
            goto done;
    }
    rc = 0;
done:
    if (fp && fclose(fp) != 0 && rc == 0) rc = xp_fail("%s: write failed", out);
    free(logits);
    xp_runner_destroy(r);
    xp_lora_free(&lw);
    xp_model_free(m);
    return rc;
}

int xp_cmd_score(int argc, char **argv)
{
    const char *model = NULL, *adapter = NULL, *text = NULL, *tokens = NULL, *out = NULL;
    const char *backend = NULL;
    long threads = 0;
    xp_opt opts[] = {XP_OPT_MODEL(&model),
                     XP_STR("adapter", &adapter, "DIR", "a PEFT LoRA adapter to apply"),
                     XP_STR("text", &text, "TEXT", "the sequence as text (needs the tokenizer)"),
                     XP_STR("tokens", &tokens, "1,2,3", "the sequence as token ids"),
                     XP_STR_REQ("out", &out, "FILE.npy", "where the logits go"),
                     XP_OPT_THREADS(&threads), XP_OPT_BACKEND(&backend), XP_OPT_END};
    const xp_cmd cmd = {
        .name = "score",
        .usage = "usage: xprec score --model DIR [--adapter DIR] (--text TEXT | --tokens 1,2,3)\n"
                 "                   --out FILE.npy [--threads N] [--backend cpu|cuda|auto]\n",
        .about = "Writes the logits of every position as a float32 .npy [positions, vocab].\n",
        .opts = opts};
    int st = xp_cmd_parse(&cmd, argc, argv);
    if (st >= 0) return st;
    if (!text == !tokens) return xp_cmd_usage_error(&cmd, "give one of --text and --tokens");
    int32_t *ids = NULL;
    size_t n = 0;
    int rc;
    if (tokens) {
        rc = xp_parse_ids(tokens, &ids, &n);
    } else {
        xp_tokenizer *tk = xp_tokenizer_load(model);
        rc = tk ? xp_tokenizer_encode(tk, text, strlen(text), 1, &ids, &n) : -1;
        xp_tokenizer_free(tk);
        if (rc == 0 && n == 0) rc = xp_fail("--text encodes to no tokens");
    }
    if (rc == 0)
        rc = xp_score(model, adapter, ids, n, out, threads ? (int)threads : xp_cpu_count(), backend);
    free(ids);
    if (rc < 0) {
        fprintf(stderr, "xprec score: %s\n", xp_last_error());
        return 1;
    }
    return 0;
}
