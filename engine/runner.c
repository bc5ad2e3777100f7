#include "runner.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

struct xp_runner {
    const xp_model *m;
    const xp_backend *be;
    void *ctx;
    int max_ctx, chunk, vocab;
    int32_t *table, *pos, *rows;
    const int32_t **tables;
    float *logits;
    uint32_t gen;
    int adapter; /* slot 0 holds one: 1 while set */
};

xp_runner *xp_runner_create(const xp_model *m, const char *backend, int threads, int max_ctx,
                            int chunk)
{
    xp_runner *r = calloc(1, sizeof *r);
    if (!r) {
        xp_fail("out of memory");
        return NULL;
    }
    r->m = m;
    r->max_ctx = max_ctx;
    r->chunk = chunk;
    r->vocab = m->cfg.vocab_size;
    int nb = xp_kv_blocks_for(max_ctx), got = 0;
    xp_backend_opts o = {.threads = threads, .max_rows = chunk, .max_ctx = max_ctx,
                         .adapter_slots = 1, .kv_blocks = nb};
    if (xp_backend_open(backend, m, &o, &r->be, &r->ctx, &got) < 0) goto fail;
    r->table = malloc((size_t)nb * sizeof *r->table);
    r->pos = malloc((size_t)chunk * sizeof *r->pos);
    r->rows = malloc((size_t)chunk * sizeof *r->rows);
    r->tables = malloc((size_t)chunk * sizeof *r->tables);
    r->logits = malloc((size_t)chunk * (size_t)r->vocab * sizeof *r->logits);
    if (!r->table || !r->pos || !r->rows || !r->tables || !r->logits) {
        xp_fail("out of memory");
        goto fail;
    }
    for (int i = 0; i < nb; i++)
        r->table[i] = i;
    return r;
fail:
    xp_runner_destroy(r);
    return NULL;
}

void xp_runner_destroy(xp_runner *r)
{
    if (!r) return;
    if (r->ctx) r->be->destroy(r->ctx);
    free(r->table);
    free(r->pos);
    free(r->rows);
    free(r->tables);
    free(r->logits);
    free(r);
}

const char *xp_runner_backend(const xp_runner *r)
{
    return r->be->name;
}

int xp_runner_set_adapter(xp_runner *r, const xp_lora_weights *w)
{
    r->adapter = 0;
    if (!w) return 0;
    if (r->be->adapter_load(r->ctx, 0, ++r->gen, w) < 0) return -1;
    r->adapter = 1;
    return 0;
}

int xp_runner_run(xp_runner *r, const int32_t *toks, int start, int n, int first_out, float *out)
{
    if (start < 0 || n > r->max_ctx || start > n)
        return xp_fail("positions %d..%d are outside the runner's context of %d", start, n - 1,
                       r->max_ctx);
    for (int c0 = start; c0 < n; c0 += r->chunk) {
        int c = n - c0 < r->chunk ? n - c0 : r->chunk, nout = 0;
        for (int i = 0; i < c; i++) {
            r->pos[i] = c0 + i;
            r->tables[i] = r->table;
            if (c0 + i >= first_out) r->rows[nout++] = i;
        }
        xp_row_group g = {0, c, r->adapter ? 0 : -1, r->gen};
        xp_batch b = {c, toks + c0, r->pos, r->tables, 1, &g, nout, r->rows, r->logits};
        if (r->be->forward(r->ctx, &b) < 0) return -1;
        if (nout) {
            memcpy(out, r->logits, (size_t)nout * (size_t)r->vocab * sizeof *out);
            out += (size_t)nout * (size_t)r->vocab;
        }
    }
    return 0;
}
