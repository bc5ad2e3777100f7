/* The whole forward pass on the CUDA backend against the CPU backend, on one model directory
 * (run.sh passes the tiny and small presets, BF16 and FP8):
 *   - a prefill of several sequences in one batch (block boundaries crossed), logits of every row;
 *   - greedy decoding, one row per sequence, the tokens each backend would pick must agree;
 *   - a mixed batch: decode rows and a prefill chunk, base rows and three random adapters of
 *     ranks 1, 64 and 256 plus an empty group, then again after reloading the slots under new
 *     generations (re-upload);
 *   - the same decode batch twice (the second replays a captured CUDA graph): identical logits.
 * Logits must agree within XP_GPU_TOL (default 1e-2) of the largest |logit| of the batch.
 * usage: test_forward MODEL_DIR [LABEL] */
#include "backend.h"
#include "util/rng.h"
#include "util/xp_error.h"

#include "gpu_util.h"

static double tol = 1e-2;
static const char *label = "";

typedef struct {
    const xp_backend *be;
    void *rt;
} side;

static int side_open(side *s, const xp_backend *be, const xp_model *m, int max_rows, int max_ctx,
                     int n_blocks)
{
    xp_backend_opts o = {.max_rows = max_rows, .max_ctx = max_ctx, .adapter_slots = 3,
                         .kv_blocks = n_blocks};
    int got = 0;
    s->be = be;
    s->rt = be->create(m, &o, &got);
    return s->rt ? 0 : -1;
}

static void side_close(side *s)
{
    if (s->rt) s->be->destroy(s->rt);
}

/* Both backends get the three adapters in slots 0..2 under generation gen. */
static int load_adapters(side *cpu, side *gpu, const xp_lora_weights *ad, uint32_t gen)
{
    for (int a = 0; a < 3; a++)
        if (cpu->be->adapter_load(cpu->rt, a, gen, &ad[a]) < 0 ||
            gpu->be->adapter_load(gpu->rt, a, gen, &ad[a]) < 0) {
            gpu_check_true("adapter load", 0, xp_last_error());
            return -1;
        }
    return 0;
}

static int argmax(const float *v, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

/* Runs b on both sides; compares logits. */
static int both(side *cpu, side *gpu, xp_batch *b, float *lc, float *lg, int vocab,
                const char *what)
{
    b->logits = lc;
    if (cpu->be->forward(cpu->rt, b) < 0) {
        gpu_check_true(what, 0, xp_last_error());
        return -1;
    }
    b->logits = lg;
    if (gpu->be->forward(gpu->rt, b) < 0) {
        gpu_check_true(what, 0, xp_last_error());
        return -1;
    }
    char name[200];
    snprintf(name, sizeof name, "%s%s", label, what);
    gpu_result(name, gpu_rel_err(lg, lc, (size_t)b->n_out * vocab), tol);
    return 0;
}

/* A random adapter of rank r on every module of every layer, in the engine's F32 form (A and
 * the transposed B the CPU expand reads). */
static void make_adapter(const xp_qwen3_config *cfg, int r, uint64_t seed, xp_lora_weights *w)
{
    xp_rng rng;
    xp_rng_seed(&rng, seed, "gpu-forward-adapter");
    w->n_layers = cfg->num_hidden_layers;
    w->mods = calloc((size_t)w->n_layers * XP_MOD_COUNT, sizeof *w->mods);
    w->max_rank = r;
    w->bytes = 0;
    for (int i = 0; i < w->n_layers * XP_MOD_COUNT; i++) {
        int64_t o, in;
        xp_module_shape(cfg, (xp_module)(i % XP_MOD_COUNT), &o, &in);
        xp_lora_mat *m = &w->mods[i];
        m->rank = r;
        m->scale = 16.0f / (float)r;
        m->dtype = XP_F32;
        m->A = malloc(sizeof(float) * (size_t)(r * in));
        m->Bt = malloc(sizeof(float) * (size_t)(o * r));
        xp_rng_fill_normal(&rng, m->A, (size_t)(r * in), 0, 1.0f / sqrtf((float)in));
        xp_rng_fill_normal(&rng, m->Bt, (size_t)(o * r), 0, 0.02f);
        w->bytes += sizeof(float) * (size_t)(r * (in + o));
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_forward MODEL_DIR [LABEL]\n");
        return 2;
    }
    if (!gpu_present()) {
        printf("test_forward: no CUDA device, skipped\n");
        return 77;
    }
    if (argc > 2) label = argv[2];
    if (getenv("XP_GPU_TOL")) tol = atof(getenv("XP_GPU_TOL"));
    const xp_backend *cuda = xp_backend_cuda();
    if (!cuda) {
        fprintf(stderr, "test_forward: this build has no CUDA backend\n");
        return 2;
    }
    xp_model *m = NULL;
    if (xp_model_load(argv[1], NULL, &m) < 0) {
        fprintf(stderr, "test_forward: %s\n", xp_last_error());
        return 2;
    }
    /* XP_GPU_LONG=1 adds a context past 1024 positions (split attention); slow on the CPU side
     * for big models, so run.sh sets it for tiny only */
    int longctx = getenv("XP_GPU_LONG") && atoi(getenv("XP_GPU_LONG")) > 0;
    int vocab = m->cfg.vocab_size, max_rows = 96, max_ctx = longctx ? 1536 : 512;
    int n_blocks = 4 * xp_kv_blocks_for(max_ctx);
    side cpu = {0}, gpu = {0};
    if (side_open(&cpu, &xp_backend_cpu, m, max_rows, max_ctx, n_blocks) < 0 ||
        side_open(&gpu, cuda, m, max_rows, max_ctx, n_blocks) < 0) {
        fprintf(stderr, "test_forward: %s\n", xp_last_error());
        return 2;
    }
    enum { S = 4 }; /* sequences */
    int32_t tables[S][96];
    int bps = xp_kv_blocks_for(max_ctx);
    for (int s = 0; s < S; s++) /* interleaved ids, so no sequence owns a contiguous range */
        for (int i = 0; i < bps; i++)
            tables[s][i] = i * S + (S - 1 - s);
    int len[S] = {0};
    float *lc = malloc(sizeof(float) * (size_t)max_rows * vocab),
          *lg = malloc(sizeof(float) * (size_t)max_rows * vocab);
    int32_t tok[96], pos[96], outr[96];
    const int32_t *tabs[96];
    xp_rng rng;
    xp_rng_seed(&rng, 3, "gpu-forward");

    /* 1. prefill: sequences 0..2 with 17, 33 and 40 tokens in one batch of 90 rows */
    int plen[3] = {17, 33, 40}, n = 0;
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < plen[s]; i++, n++) {
            tok[n] = (int32_t)(xp_rng_u64(&rng) % (uint64_t)vocab);
            pos[n] = i;
            tabs[n] = tables[s];
            outr[n] = n;
        }
    for (int s = 0; s < 3; s++)
        len[s] = plen[s];
    xp_row_group g0 = {0, n, -1, 0};
    xp_batch b = {n, tok, pos, tabs, 1, &g0, n, outr, NULL};
    both(&cpu, &gpu, &b, lc, lg, vocab, "prefill 3 sequences, 90 rows, all logits");

    /* 2. greedy decode, 3 rows per step: both continue with the CPU's tokens; the GPU's own
     * choice must match */
    int agree = 0, steps = 12;
    int32_t next[3];
    /* from the last prefill row of each sequence */
    int last[3] = {plen[0] - 1, plen[0] + plen[1] - 1, plen[0] + plen[1] + plen[2] - 1};
    for (int s = 0; s < 3; s++) {
        next[s] = argmax(lc + (size_t)last[s] * vocab, vocab);
        agree += argmax(lg + (size_t)last[s] * vocab, vocab) == next[s];
    }
    for (int st = 0; st < steps; st++) {
        for (int s = 0; s < 3; s++) {
            tok[s] = next[s];
            pos[s] = len[s]++;
            tabs[s] = tables[s];
            outr[s] = s;
        }
        xp_row_group gd = {0, 3, -1, 0};
        xp_batch db = {3, tok, pos, tabs, 1, &gd, 3, outr, NULL};
        char what[64];
        snprintf(what, sizeof what, "decode step %d (3 rows, GEMV)", st);
        if (both(&cpu, &gpu, &db, lc, lg, vocab, what) < 0) break;
        for (int s = 0; s < 3; s++) {
            int a = argmax(lc + (size_t)s * vocab, vocab),
                c = argmax(lg + (size_t)s * vocab, vocab);
            agree += a == c;
            next[s] = a;
        }
    }
    char detail[96];
    snprintf(detail, sizeof detail, "%d of %d greedy tokens equal", agree, 3 * (steps + 1));
    char name[160];
    snprintf(name, sizeof name, "%sgreedy tokens equal", label);
    gpu_check_true(name, agree == 3 * (steps + 1), detail);

    /* 3. mixed batch with adapters: [seq0 decode, base] [empty adapter group] [seq1 decode,
     * rank 1] [seq2 decode, rank 64] [seq3 prefill 20 rows, rank 256] */
    xp_lora_weights ad[3];
    make_adapter(&m->cfg, 1, 1, &ad[0]);
    make_adapter(&m->cfg, 64, 2, &ad[1]);
    make_adapter(&m->cfg, 256, 3, &ad[2]);
    for (int round = 0; round < 2; round++) {
        uint32_t gen = (uint32_t)round + 1;
        if (load_adapters(&cpu, &gpu, ad, gen) < 0) break;
        n = 0;
        for (int s = 0; s < 3; s++, n++) {
            tok[n] = (int32_t)(xp_rng_u64(&rng) % (uint64_t)vocab);
            pos[n] = len[s]++;
            tabs[n] = tables[s];
        }
        for (int i = 0; i < 20; i++, n++) {
            tok[n] = (int32_t)(xp_rng_u64(&rng) % (uint64_t)vocab);
            pos[n] = len[3]++;
            tabs[n] = tables[3];
        }
        xp_row_group gs[5] = {
            {0, 1, -1, 0}, {1, 0, 0, gen}, {1, 1, 0, gen}, {2, 1, 1, gen}, {3, 20, 2, gen}};
        int32_t orows[4] = {0, 1, 2, 22};
        xp_batch mb = {n, tok, pos, tabs, 5, gs, 4, orows, NULL};
        both(&cpu, &gpu, &mb, lc, lg, vocab,
             round ? "mixed batch, adapters re-uploaded under a new generation"
                   : "mixed batch: base + ranks 1/64/256 + empty group");
    }

    /* 4. graph replay: the same 3-row decode batch (positions rewritten, same shape) twice */
    float *l1 = malloc(sizeof(float) * 3 * (size_t)vocab);
    for (int rep = 0; rep < 2; rep++) {
        for (int s = 0; s < 3; s++) {
            tok[s] = 1000 + s;
            pos[s] = len[s];
            tabs[s] = tables[s];
            outr[s] = s;
        }
        xp_row_group gd = {0, 3, -1, 0};
        xp_batch db = {3, tok, pos, tabs, 1, &gd, 3, outr, lg};
        if (gpu.be->forward(gpu.rt, &db) < 0) {
            gpu_check_true("graph replay", 0, xp_last_error());
            break;
        }
        if (rep == 0) memcpy(l1, lg, sizeof(float) * 3 * (size_t)vocab);
    }
    snprintf(name, sizeof name, "%srepeat decode batch bit-identical (graph replay)", label);
    gpu_result(name, gpu_rel_err(lg, l1, 3 * (size_t)vocab), 0);
    free(l1);

    /* 5. a long context: sequence 3 grows past 1024 positions in 96-row chunks, then decodes
     * alone (the GPU splits its attention over the context) */
    if (longctx) {
        while (len[3] < 1100) {
            int c = 1100 - len[3] < max_rows ? 1100 - len[3] : max_rows;
            for (int i = 0; i < c; i++) {
                tok[i] = (int32_t)(xp_rng_u64(&rng) % (uint64_t)vocab);
                pos[i] = len[3]++;
                tabs[i] = tables[3];
            }
            xp_row_group gl = {0, c, -1, 0};
            int32_t last_row = c - 1;
            xp_batch lb = {c, tok, pos, tabs, 1, &gl, 1, &last_row, NULL};
            if (both(&cpu, &gpu, &lb, lc, lg, vocab, "long context prefill chunk") < 0) break;
        }
        for (int st = 0; st < 4; st++) {
            tok[0] = (int32_t)argmax(lc, vocab);
            pos[0] = len[3]++;
            tabs[0] = tables[3];
            outr[0] = 0;
            xp_row_group gl = {0, 1, -1, 0};
            xp_batch lb = {1, tok, pos, tabs, 1, &gl, 1, outr, NULL};
            char what[64];
            snprintf(what, sizeof what, "long context decode at position %d", pos[0]);
            if (both(&cpu, &gpu, &lb, lc, lg, vocab, what) < 0) break;
        }
    }
    for (int a = 0; a < 3; a++)
        xp_lora_free(&ad[a]);
    side_close(&gpu);
    side_close(&cpu);
    free(lc);
    free(lg);
    xp_model_free(m);
    return gpu_summary("test_forward");
}
