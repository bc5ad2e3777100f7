/* The Qwen3 forward pass on the CPU, the reference every other backend is checked against:
 *   x = embed[token]
 *   per layer: h = rmsnorm(x); q,k,v = h W^T (+ LoRA); per-head rmsnorm of q and k; RoPE;
 *              store k,v; attention (GQA, causal); x += o_proj(att)
 *              h = rmsnorm(x); x += down(silu(gate(h)) * up(h))
 *   logits = rmsnorm(x) lm_head^T, for the rows asked for. */
#include "cpu/forward.h"
#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "cpu/kv_store.h"
#include "cpu/ops.h"
#include "cpu/pool.h"
#include "util/xp_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define XP_LORA_SHRINK_K 4   /* ranks per shrink task */
#define XP_LORA_EXPAND_O 512 /* outputs per expand task */

struct xp_runtime {
    const xp_model *m;
    xp_kv_store kv;
    xp_pool *pool;
    int n_slots;
    const xp_lora_weights **slots; /* [n_slots]: what each adapter slot holds */
    uint32_t *slot_gen;
    int threads, max_rows, max_ctx;
    float **scratch;     /* per thread, for the linear kernels */
    float **att_scratch; /* per thread, attention's tile */
    xp_att_tile *tiles;  /* [max_rows] */
    float *lora_t;       /* [3][max_rows][XP_MAX_LORA_RANK]: each row's shrunk input, for up to
                            three modules at once */
    float *rope; /* [max_rows][head_dim]: each row's RoPE table */
    float *x, *h, *q, *k, *v, *att, *gate, *up, *out;
};

/* On 64-byte lines: the kernels load whole 512-bit vectors along every row, and malloc's 16-byte
 * alignment split each such load across two lines (measured: the many-row product of a
 * 1024-column layer at 32 rows, 96 -> 123 GFLOP/s on one core of an AVX-512 Xeon). */
static float *xp_falloc(size_t n)
{
    size_t bytes = ((n ? n : 1) * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes);
}

xp_runtime *xp_runtime_create(const xp_model *m, const xp_backend_opts *o, int *kv_blocks)
{
    const xp_qwen3_config *g = &m->cfg;
    int max_rows = o->max_rows, max_ctx = o->max_ctx;
    xp_kv_type kt;
    if (xp_kv_type_parse(o->kv_dtype, &kt) < 0) return NULL;
    size_t per = xp_kv_store_block_bytes(kt, g->num_hidden_layers, g->num_key_value_heads,
                                         g->head_dim);
    int nb;
    if (xp_backend_kv_blocks(o, per, &nb) < 0) return NULL;
    xp_runtime *rt = calloc(1, sizeof *rt);
    if (!rt) goto oom;
    rt->m = m;
    rt->max_rows = max_rows;
    rt->max_ctx = max_ctx;
    if (xp_kv_store_init(&rt->kv, kt, g->num_hidden_layers, g->num_key_value_heads, g->head_dim,
                         nb) < 0) {
        xp_runtime_destroy(rt);
        return NULL;
    }
    rt->n_slots = o->adapter_slots > 0 ? o->adapter_slots : 1;
    rt->slots = calloc((size_t)rt->n_slots, sizeof *rt->slots);
    rt->slot_gen = calloc((size_t)rt->n_slots, sizeof *rt->slot_gen);
    if (!rt->slots || !rt->slot_gen) goto oom;
    int threads = o->threads;
    if (threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        threads = c < 1 ? 1 : (int)c;
    }
    if (!(rt->pool = xp_pool_create(threads))) goto oom;
    rt->threads = xp_pool_threads(rt->pool);
    int64_t maxc = g->hidden_size;
    if (g->intermediate_size > maxc) maxc = g->intermediate_size;
    if ((int64_t)g->num_attention_heads * g->head_dim > maxc)
        maxc = (int64_t)g->num_attention_heads * g->head_dim;
    rt->scratch = calloc((size_t)rt->threads, sizeof *rt->scratch);
    rt->att_scratch = calloc((size_t)rt->threads, sizeof *rt->att_scratch);
    if (!rt->scratch || !rt->att_scratch) goto oom;
    for (int t = 0; t < rt->threads; t++) {
        rt->scratch[t] = xp_falloc(xp_linear_scratch_floats(maxc));
        rt->att_scratch[t] = xp_falloc(xp_attention_scratch_floats(g));
        if (!rt->scratch[t] || !rt->att_scratch[t]) goto oom;
    }
    size_t n = (size_t)max_rows, qd = (size_t)g->num_attention_heads * (size_t)g->head_dim,
           kvd = (size_t)g->num_key_value_heads * (size_t)g->head_dim;
    rt->lora_t = xp_falloc(3 * n * XP_MAX_LORA_RANK);
    rt->tiles = malloc(n * sizeof *rt->tiles);
    rt->rope = xp_falloc(n * (size_t)g->head_dim);
    rt->x = xp_falloc(n * (size_t)g->hidden_size);
    rt->h = xp_falloc(n * (size_t)g->hidden_size);
    rt->q = xp_falloc(n * qd);
    rt->k = xp_falloc(n * kvd);
    rt->v = xp_falloc(n * kvd);
    rt->att = xp_falloc(n * qd);
    rt->gate = xp_falloc(n * (size_t)g->intermediate_size);
    rt->up = xp_falloc(n * (size_t)g->intermediate_size);

    rt->out = xp_falloc(n * (size_t)(g->hidden_size > g->intermediate_size ? g->hidden_size
                                                                           : g->intermediate_size));
    if (!rt->lora_t || !rt->tiles || !rt->rope || !rt->x || !rt->h || !rt->q || !rt->k ||
        !rt->v || !rt->att || !rt->gate || !rt->up || !rt->out)
        goto oom;
    *kv_blocks = rt->kv.n_blocks;
    return rt;
oom:
    xp_fail("out of memory for the engine's working buffers");
    xp_runtime_destroy(rt);
    return NULL;
}

void xp_runtime_destroy(xp_runtime *rt)
{
    if (!rt) return;
    for (int t = 0; t < rt->threads; t++) {
        if (rt->scratch) free(rt->scratch[t]);
        if (rt->att_scratch) free(rt->att_scratch[t]);
    }
    free(rt->scratch);
    free(rt->att_scratch);
    free(rt->lora_t);
    free(rt->tiles);
    free(rt->rope);
    free(rt->x);
    free(rt->h);
    free(rt->q);
    free(rt->k);
    free(rt->v);
    free(rt->att);
    free(rt->gate);
    free(rt->up);
    free(rt->out);
    free(rt->slots);
    free(rt->slot_gen);
    xp_kv_store_free(&rt->kv);
    xp_pool_destroy(rt->pool);
    free(rt);
}

int xp_runtime_adapter_load(xp_runtime *rt, int slot, uint32_t gen, const xp_lora_weights *w)
{
    if (slot < 0 || slot >= rt->n_slots)
        return xp_fail("adapter slot %d is outside 0..%d", slot, rt->n_slots - 1);
    if (w->n_layers != rt->m->cfg.num_hidden_layers)
        return xp_fail("adapter has %d layers, the model %d", w->n_layers,
                       rt->m->cfg.num_hidden_layers);
    rt->slots[slot] = w; /* the host weights are used where they lie */
    rt->slot_gen[slot] = gen;
    return 0;
}


typedef struct {
    xp_runtime *rt;
    const xp_batch *b;
    int layer;
    xp_module mod;
    const float *h;
    float *out;
    float *t; /* [rows][XP_MAX_LORA_RANK]: each row's shrunk input for this module */
    int in, od;
    int shrink_tasks, expand_tasks; /* per row group */
} xp_lora_job;

/* The LoRA work of several modules in one pool call: task i is job k's task i - first[k]. */
typedef struct {
    const xp_lora_job *jobs;
    int n;
    int first[XP_MAX_PRODUCTS + 1];
    void (*fn)(void *ctx, int task, int thread);
} xp_lora_many;

static void xp_lora_many_task(void *ctx, int task, int thread)
{
    const xp_lora_many *m = ctx;
    int k = 0;
    while (task >= m->first[k + 1])
        k++;
    m->fn((void *)&m->jobs[k], task - m->first[k], thread);
}

static const xp_lora_mat *xp_lora_group(const xp_lora_job *j, int gi)
{
    const xp_row_group *g = &j->b->groups[gi];
    return g->slot >= 0 && g->nrows ? xp_lora_get(j->rt->slots[g->slot], j->layer, j->mod) : NULL;
}

/* t[row, k] = scale A_k . h_row for a few k and every row of one group: A is the weight of a
 * small matrix product, so the rows share each load of it. */
static void xp_lora_shrink_task(void *ctx, int task, int thread)
{
    const xp_lora_job *j = ctx;
    int gi = task / j->shrink_tasks, k0 = task % j->shrink_tasks * XP_LORA_SHRINK_K;
    const xp_lora_mat *lm = xp_lora_group(j, gi);
    if (!lm || k0 >= lm->rank) return;
    const xp_row_group *g = &j->b->groups[gi];
    int k1 = k0 + XP_LORA_SHRINK_K < lm->rank ? k0 + XP_LORA_SHRINK_K : lm->rank;
    xp_linear A = {.dtype = lm->dtype, .w = lm->A, .rows = lm->rank, .cols = j->in};
    float *t = j->t + (size_t)g->row0 * XP_MAX_LORA_RANK;
    xp_linear_rows(&A, k0, k1, j->h + (size_t)g->row0 * j->in, g->nrows, t, XP_MAX_LORA_RANK,
                   j->rt->scratch[thread]);
    for (int i = 0; i < g->nrows; i++)
        for (int k = k0; k < k1; k++)
            t[(size_t)i * XP_MAX_LORA_RANK + k] *= lm->scale;
}

/* out[row, o] += sum_k t[row, k] Bt[k, o] for a run of outputs and every row of one group. */
static void xp_lora_expand_task(void *ctx, int task, int thread)
{
    const xp_lora_job *j = ctx;
    int gi = task / j->expand_tasks, o0 = task % j->expand_tasks * XP_LORA_EXPAND_O;
    const xp_lora_mat *lm = xp_lora_group(j, gi);
    if (!lm) return;
    const xp_row_group *g = &j->b->groups[gi];
    int len = j->od - o0 < XP_LORA_EXPAND_O ? j->od - o0 : XP_LORA_EXPAND_O;
    xp_lora_expand(lm->Bt, lm->dtype == XP_BF16, j->od, lm->rank,
                   j->t + (size_t)g->row0 * XP_MAX_LORA_RANK, XP_MAX_LORA_RANK, g->nrows,
                   j->out + (size_t)g->row0 * j->od, j->od, o0, len);
}

/* outs[k][n, out_dim_k] = h W_k^T for the modules mods[0..nm) of one layer (all reading h),
 * plus each adapter's scale * (h A^T) B^T on its rows: one pool call for the products and the
 * shrinks (which need only h), one for the expands. */
static void xp_linear_lora(xp_runtime *rt, const xp_batch *b, int layer, const xp_module *mods,
                           int nm, const float *h, float *const *outs)
{
    xp_product p[XP_MAX_PRODUCTS];
    xp_lora_job jobs[XP_MAX_PRODUCTS];
    xp_lora_many shrink = {jobs, nm, {0}, xp_lora_shrink_task},
                 expand = {jobs, nm, {0}, xp_lora_expand_task};
    for (int k = 0; k < nm; k++) {
        const xp_linear *l = &rt->m->layers[layer].lin[mods[k]];
        p[k] = (xp_product){l, outs[k]};
        int max_rank = 0;
        for (int gi = 0; gi < b->n_groups; gi++) {
            const xp_row_group *g = &b->groups[gi];
            const xp_lora_mat *lm =
                g->slot >= 0 && g->nrows ? xp_lora_get(rt->slots[g->slot], layer, mods[k]) : NULL;
            if (lm && lm->rank > max_rank) max_rank = lm->rank;
        }
        /* shrink and expand, each split finely enough that one row keeps every thread busy */
        jobs[k] = (xp_lora_job){rt,
                                b,
                                layer,
                                mods[k],
                                h,
                                outs[k],
                                rt->lora_t + (size_t)k * (size_t)rt->max_rows * XP_MAX_LORA_RANK,
                                (int)l->cols,
                                (int)l->rows,
                                (max_rank + XP_LORA_SHRINK_K - 1) / XP_LORA_SHRINK_K,
                                max_rank ? ((int)l->rows + XP_LORA_EXPAND_O - 1) / XP_LORA_EXPAND_O
                                         : 0};
        shrink.first[k + 1] = shrink.first[k] + b->n_groups * jobs[k].shrink_tasks;
        expand.first[k + 1] = expand.first[k] + b->n_groups * jobs[k].expand_tasks;
    }
    xp_pool_extra also = {shrink.first[nm], xp_lora_many_task, &shrink};
    xp_linear_forward_many(rt->pool, rt->scratch, p, nm, h, b->n, also.n ? &also : NULL);
    if (expand.first[nm]) xp_pool_run(rt->pool, expand.first[nm], xp_lora_many_task, &expand);
}

/* The row-wise steps between the matrix products (norms, RoPE, the KV store, SiLU, residuals),
 * split by rows over the pool once a step holds enough rows to pay for the hand-off: in a long
 * prefill they were a seventh of the time on one thread while the others waited. Each row is
 * computed by the same code whichever thread takes it, so the bits do not change. */
#define XP_ROWS_PARALLEL 8 /* fewest rows that go to the pool */

typedef enum { XP_ROWS_NORM, XP_ROWS_QK, XP_ROWS_SILU } xp_rows_op;

typedef struct {
    xp_runtime *rt;
    const xp_batch *b;
    int layer, tasks;
    xp_rows_op op;
    const float *w; /* XP_ROWS_NORM: the norm's weight */
    int add;        /* XP_ROWS_NORM: first x += out */
} xp_rows_job;

static void xp_rows_range(const xp_rows_job *j, int i0, int i1)
{
    xp_runtime *rt = j->rt;
    const xp_qwen3_config *g = &rt->m->cfg;
    int hid = g->hidden_size, H = g->num_attention_heads, KV = g->num_key_value_heads;
    int d = g->head_dim, inter = g->intermediate_size;
    float eps = (float)g->rms_norm_eps;
    for (int i = i0; i < i1; i++) {
        if (j->op == XP_ROWS_NORM) {
            float *x = rt->x + (size_t)i * hid;
            if (j->add)
                for (int c = 0; c < hid; c++)
                    x[c] += rt->out[(size_t)i * hid + c];
            xp_rmsnorm(x, j->w, hid, eps, rt->h + (size_t)i * hid);
        } else if (j->op == XP_ROWS_QK) {
            const xp_layer *L = &rt->m->layers[j->layer];
            for (int hh = 0; hh < H; hh++) {
                float *q = rt->q + ((size_t)i * H + hh) * d;
                xp_rmsnorm(q, L->q_norm, d, eps, q);
                xp_rope(q, d, rt->rope + (size_t)i * d);
            }
            for (int hh = 0; hh < KV; hh++) {
                float *k = rt->k + ((size_t)i * KV + hh) * d;
                xp_rmsnorm(k, L->k_norm, d, eps, k);
                xp_rope(k, d, rt->rope + (size_t)i * d);
            }
            xp_kv_store_put(&rt->kv, j->b->tables[i], j->layer, j->b->pos[i],
                            rt->k + (size_t)i * KV * d, rt->v + (size_t)i * KV * d);
        } else {
            float *gt = rt->gate + (size_t)i * inter;
            const float *up = rt->up + (size_t)i * inter;
            for (int c = 0; c < inter; c++) {
                float a = gt[c];
                gt[c] = a / (1.0f + expf(-a)) * up[c]; /* SiLU(gate) * up */
            }
        }
    }
}

static void xp_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const xp_rows_job *j = ctx;
    int n = j->b->n;
    xp_rows_range(j, (int)((int64_t)n * task / j->tasks), (int)((int64_t)n * (task + 1) / j->tasks));
}

static void xp_rows(xp_runtime *rt, const xp_batch *b, int layer, xp_rows_op op, const float *w,
                    int add)
{
    xp_rows_job j = {rt, b, layer, 1, op, w, add};
    if (b->n < XP_ROWS_PARALLEL || rt->threads < 2) {
        xp_rows_range(&j, 0, b->n);
        return;
    }
    j.tasks = rt->threads;
    xp_pool_run(rt->pool, j.tasks, xp_rows_task, &j);
}

/* x arrives with the previous block's output still in out when add is set (every block but the
 * first): the residual is added row by row just before that row's norm. */
static void xp_attention_block(xp_runtime *rt, const xp_batch *b, int layer, int add)
{
    const xp_layer *L = &rt->m->layers[layer];
    xp_rows(rt, b, layer, XP_ROWS_NORM, L->attn_norm, add);
    static const xp_module qkv[] = {XP_MOD_Q, XP_MOD_K, XP_MOD_V};
    xp_linear_lora(rt, b, layer, qkv, 3, rt->h, (float *const[]){rt->q, rt->k, rt->v});
    xp_rows(rt, b, layer, XP_ROWS_QK, NULL, 0);
    xp_attention(rt->pool, rt->att_scratch, rt->scratch, &rt->kv, &rt->m->cfg, b, layer, rt->q,
                 rt->att, rt->tiles);
    xp_linear_lora(rt, b, layer, &(xp_module){XP_MOD_O}, 1, rt->att, &rt->out);
}

static void xp_mlp_block(xp_runtime *rt, const xp_batch *b, int layer)
{
    xp_rows(rt, b, layer, XP_ROWS_NORM, rt->m->layers[layer].mlp_norm, 1);
    static const xp_module gate_up[] = {XP_MOD_GATE, XP_MOD_UP};
    xp_linear_lora(rt, b, layer, gate_up, 2, rt->h, (float *const[]){rt->gate, rt->up});
    xp_rows(rt, b, layer, XP_ROWS_SILU, NULL, 0);
    xp_linear_lora(rt, b, layer, &(xp_module){XP_MOD_DOWN}, 1, rt->gate, &rt->out);
}

int xp_forward(xp_runtime *rt, const xp_batch *b)
{
    const xp_qwen3_config *g = &rt->m->cfg;
    int hid = g->hidden_size;
    if (b->n < 1 || b->n > rt->max_rows)
        return xp_fail("batch of %d rows (1..%d supported)", b->n, rt->max_rows);
    for (int i = 0; i < b->n_groups; i++) {
        const xp_row_group *rg = &b->groups[i];
        if (rg->slot >= rt->n_slots || (rg->slot >= 0 && (!rt->slots[rg->slot] ||
                                                          rt->slot_gen[rg->slot] != rg->gen)))
            return xp_fail("adapter slot %d generation %u is not loaded", rg->slot, rg->gen);
    }
    for (int i = 0; i < b->n; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= g->vocab_size)
            return xp_fail("token id %d is outside the vocabulary (%d)", b->tokens[i],
                           g->vocab_size);
        if (b->pos[i] < 0 || b->pos[i] >= rt->max_ctx)
            return xp_fail("position %d is outside the context (%d)", b->pos[i], rt->max_ctx);
        xp_linear_row(&rt->m->embed, b->tokens[i], rt->x + (size_t)i * hid);
        xp_rope_table(b->pos[i], rt->m->inv_freq, g->head_dim,
                      rt->rope + (size_t)i * g->head_dim);
    }
    for (int l = 0; l < g->num_hidden_layers; l++) {
        xp_attention_block(rt, b, l, l > 0);
        xp_mlp_block(rt, b, l);
    }
    for (size_t i = 0; i < (size_t)b->n * hid; i++) /* the last block's residual */
        rt->x[i] += rt->out[i];
    for (int i = 0; i < b->n_out; i++)
        xp_rmsnorm(rt->x + (size_t)b->out_rows[i] * hid, rt->m->final_norm, hid,
                   (float)g->rms_norm_eps, rt->h + (size_t)i * hid);
    xp_linear_forward(rt->pool, rt->scratch, &rt->m->lm_head, rt->h, b->n_out, b->logits, NULL);
    return 0;
}

/* ---------------------------------------------------------------- memory bandwidth */

typedef struct {
    const uint64_t *buf;
    size_t n, per;
    uint64_t sums[256];
} xp_bw_job;

/* 16-byte integer vectors in four independent sums: cheap enough that memory, not the adds, is
 * the limit (a chain of scalar float adds measured a third less than the kernels reach). */
typedef uint64_t xp_bw_vec __attribute__((vector_size(16)));

static void xp_bw_task(void *ctx, int task, int thread)
{
    xp_bw_job *j = ctx;
    size_t b = (size_t)task * j->per, e = b + j->per < j->n ? b + j->per : j->n;
    xp_bw_vec s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, v[4];
    for (size_t i = b; i + 8 <= e; i += 8) {
        memcpy(v, j->buf + i, sizeof v);
        s0 += v[0];
        s1 += v[1];
        s2 += v[2];
        s3 += v[3];
    }
    xp_bw_vec s = s0 + s1 + s2 + s3;
    j->sums[task] = s[0] + s[1];
}

static double xp_mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* As many threads as the runtime's summing a buffer far larger than the caches, best of five;
 * on a pool of its own, so it may run while the engine's thread uses the runtime's. */
double xp_runtime_read_bandwidth(xp_runtime *rt)
{
    size_t n = ((size_t)1 << 30) / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof *buf);
    xp_pool *pool = buf ? xp_pool_create(rt->threads) : NULL;
    if (!pool) {
        free(buf);
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        buf[i] = i;
    int tasks = rt->threads * 2 < 256 ? rt->threads * 2 : 256;
    xp_bw_job j = {buf, n, (n + (size_t)tasks - 1) / (size_t)tasks, {0}};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = xp_mono_now();
        xp_pool_run(pool, tasks, xp_bw_task, &j);
        double dt = xp_mono_now() - t0;
        if ((double)n * sizeof *buf / dt > best) best = (double)n * sizeof *buf / dt;
    }
    xp_pool_destroy(pool);
    free(buf);
    return best;
}
