/* Attention in tiles with an online softmax (see attention.h). For one tile of rows and one KV
 * head, block by block of the sequence:
 *   scores S = Q K_b^T / sqrt(d) for the tile's query heads (a small matrix product);
 *   per query row and head, over the positions it may see: m' = max(m, max S), rescale the
 *   running sum l and output acc by e^(m - m') when the maximum moved, add e^(S - m') to l;
 *   acc += e^(S - m') V_b (the LoRA expand kernel: positions are its rank);
 * and at the end att = acc / l. Every step is per row and head and in block order, so a row
 * alone, in a prefill tile or recomputed after preemption gets the same bits. */
#include "cpu/attention.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

size_t xp_attention_scratch_floats(const xp_qwen3_config *g)
{
    size_t rows = (size_t)XP_ATT_TILE * (size_t)(g->num_attention_heads / g->num_key_value_heads);
    size_t d = (size_t)g->head_dim;
    /* Q and acc [rows][d], S [rows][a run of blocks], m and l [rows], a decoded V block */
    return rows * (2 * d + XP_ATT_RUN * XP_KV_BLOCK + 2) + XP_KV_BLOCK * d;
}

typedef struct {
    const xp_kv_store *kv;
    const xp_qwen3_config *g;
    const xp_batch *b;
    int layer;
    const float *q;
    float *att;
    const xp_att_tile *tiles;
    float **scratch, **lin_scratch;
} xp_att_job;

/* Folds one block's scores s[0..np) of one query row and head into its running maximum m and
 * sum l, rescaling its output acc[d] when the maximum moves; leaves e^(s - m) in s. */
static void xp_att_fold(float *s, int np, float scale, float *m, float *l, float *acc, int d)
{
    float mx = *m;
    for (int p = 0; p < np; p++) {
        s[p] *= scale;
        if (s[p] > mx) mx = s[p];
    }
    if (mx > *m) {
        if (*m > -INFINITY) { /* nothing to rescale before the first block */
            float corr = expf(*m - mx);
            *l *= corr;
            for (int x = 0; x < d; x++)
                acc[x] *= corr;
        }
        *m = mx;
    }
    *l += xp_exp_sum(s, np, mx);
}

static void xp_att_task(void *ctx, int task, int thread)
{
    const xp_att_job *j = ctx;
    const xp_qwen3_config *g = j->g;
    int KV = g->num_key_value_heads, H = g->num_attention_heads, d = g->head_dim, G = H / KV;
    const xp_att_tile *t = &j->tiles[task / KV];
    int kvh = task % KV, T = t->nrows, R = T * G, ld = XP_ATT_RUN * XP_KV_BLOCK;
    const int32_t *pos = j->b->pos + t->row0, *table = j->b->tables[t->row0];
    float *Q = j->scratch[thread], *acc = Q + (size_t)R * d, *S = acc + (size_t)R * d;
    float *m = S + (size_t)R * ld, *l = m + R, *vbuf = l + R;
    for (int i = 0; i < T; i++)
        memcpy(Q + (size_t)i * G * d, j->q + ((size_t)(t->row0 + i) * H + (size_t)kvh * G) * d,
               (size_t)G * d * sizeof *Q);
    memset(acc, 0, (size_t)R * d * sizeof *acc);
    for (int r = 0; r < R; r++) {
        m[r] = -INFINITY;
        l[r] = 0;
    }
    float scale = 1.0f / sqrtf((float)d);
    int last = pos[T - 1], nblk = last / XP_KV_BLOCK + 1;
    for (int blk = 0; blk < nblk;) {
        /* scores for a run of blocks whose ids follow each other (their rows lie in one piece),
         * in one product; then block by block, the fold and e^S V */
        int run = 1;
        while (run < XP_ATT_RUN && blk + run < nblk && table[blk + run] == table[blk] + run)
            run++;
        int b0 = blk * XP_KV_BLOCK, np = last - b0 + 1 < run * XP_KV_BLOCK ? last - b0 + 1
                                                                            : run * XP_KV_BLOCK;
        int i0 = b0 > pos[0] ? b0 - pos[0] : 0; /* the first row that sees this run */
        xp_linear K;
        xp_kv_store_rows(j->kv, table[blk], run, j->layer, kvh, 0, &K);
        if (blk + run < nblk) {
            /* the next run's rows: hardware prefetchers stop at page ends and wait for misses */
            xp_linear K1, V1;
            xp_kv_store_rows(j->kv, table[blk + run], 1, j->layer, kvh, 0, &K1);
            xp_kv_store_rows(j->kv, table[blk + run], 1, j->layer, kvh, 1, &V1);
            size_t bytes = (size_t)XP_KV_BLOCK * (size_t)d * j->kv->esize;
            for (size_t off = 0; off < bytes; off += 64) {
                __builtin_prefetch((const char *)K1.w + off);
                __builtin_prefetch((const char *)V1.w + off);
            }
        }
        xp_linear_rows(&K, 0, np, Q + (size_t)i0 * G * d, (T - i0) * G, S + (size_t)i0 * G * ld,
                       ld, j->lin_scratch[thread]);
        for (int k = 0; k < run; k++) {
            int c0 = b0 + k * XP_KV_BLOCK, c = k * XP_KV_BLOCK;
            int nb = last - c0 + 1 < XP_KV_BLOCK ? last - c0 + 1 : XP_KV_BLOCK;
            xp_linear V;
            xp_kv_store_rows(j->kv, table[blk + k], 1, j->layer, kvh, 1, &V);
            const void *vw = V.w;
            if (V.dtype == XP_F8_E4M3) {
                for (int p = 0; p < nb; p++)
                    xp_decode_row(&V, p, vbuf + (size_t)p * d);
                vw = vbuf;
            }
            for (int i = c0 > pos[0] ? c0 - pos[0] : 0; i < T;) {
                /* the rows that see the whole block share one expand; the rows of a partial
                 * block each see their own number of positions */
                int npi = pos[i] - c0 + 1 < XP_KV_BLOCK ? pos[i] - c0 + 1 : XP_KV_BLOCK;
                int i1 = i + 1;
                if (npi == XP_KV_BLOCK)
                    while (i1 < T && pos[i1] - c0 + 1 >= XP_KV_BLOCK)
                        i1++;
                for (int r = i * G; r < i1 * G; r++)
                    xp_att_fold(S + (size_t)r * ld + c, npi, scale, &m[r], &l[r],
                                acc + (size_t)r * d, d);
                xp_lora_expand(vw, V.dtype == XP_BF16, d, npi, S + (size_t)i * G * ld + c, ld,
                               (i1 - i) * G, acc + (size_t)i * G * d, d, 0, d);
                i = i1;
            }
        }
        blk += run;
    }
    for (int i = 0; i < T; i++)
        for (int h = 0; h < G; h++) {
            int r = i * G + h;
            float inv = 1.0f / l[r];
            float *o = j->att + ((size_t)(t->row0 + i) * H + (size_t)kvh * G + h) * d;
            for (int x = 0; x < d; x++)
                o[x] = acc[(size_t)r * d + x] * inv;
        }
}

void xp_attention(xp_pool *pool, float **scratch, float **lin_scratch, const xp_kv_store *kv,
                  const xp_qwen3_config *g, const xp_batch *b, int layer, const float *q,
                  float *att, xp_att_tile *tiles)
{
    int nt = 0;
    for (int i = 0; i < b->n; i++) {
        xp_att_tile *t = nt ? &tiles[nt - 1] : NULL;
        if (t && t->nrows < XP_ATT_TILE && b->tables[i] == b->tables[t->row0] &&
            b->pos[i] == b->pos[i - 1] + 1 && i == t->row0 + t->nrows)
            t->nrows++;
        else
            tiles[nt++] = (xp_att_tile){i, 1};
    }
    xp_att_job j = {kv, g, b, layer, q, att, tiles, scratch, lin_scratch};
    xp_pool_run(pool, nt * g->num_key_value_heads, xp_att_task, &j);
}
