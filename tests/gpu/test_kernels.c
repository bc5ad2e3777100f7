/* Every CUDA kernel of engine/cuda/ against its CPU twin, on random and edge-case shapes:
 * ragged FP8 blocks (rows and columns not multiples of 128, columns not multiples of 16),
 * 1..13 input rows, LoRA ranks 1..256 with one and many adapters, empty and base-only groups,
 * paged attention across block boundaries with shuffled block ids.
 *
 * The CPU twins are engine/cpu/linear.c's scalar references and cpu/ops.c's rmsnorm and RoPE;
 * attention over the paged cache and the grouped LoRA shrink/expand, which cpu/forward.c runs
 * as pool tasks, are written out below as plain loops of the same math. */
#include "backend.h"
#include "cpu/ops.h"
#include "cpu/kernels.h"
#include "format/dtype.h"
#include "format/fp8.h"
#include "cuda/gemm_lt.h"
#include "util/rng.h"
#include "util/xp_error.h"
#include "cuda/xpc_kernels.h"

#include "gpu_util.h"

static xp_rng rng;

static float rnd(void)
{
    return xp_rng_normal(&rng);
}

static uint32_t rndu(uint32_t n)
{
    return (uint32_t)(xp_rng_u64(&rng) % n);
}

static float *rnd_vec(size_t n, float s)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = s * rnd();
    return v;
}

/* ------------------------------------------------------------------ weights */

typedef struct {
    xp_linear h;  /* host */
    xpc_linear d; /* device */
    void *dw, *ds;
} tw;

static void tw_make(tw *t, xp_dtype dt, int64_t rows, int64_t cols, int br, int bc)
{
    memset(t, 0, sizeof *t);
    xp_linear *l = &t->h;
    l->dtype = dt;
    l->rows = rows;
    l->cols = cols;
    size_t n = (size_t)(rows * cols), es = xp_dtype_size(dt);
    void *w = malloc(n * es);
    if (dt == XP_F8_E4M3) {
        uint8_t *q = w;
        for (size_t i = 0; i < n; i++) {
            q[i] = xp_f32_to_fp8_e4m3(rnd() * 100.0f);
            if ((q[i] & 0x7f) == 0x7f) q[i] = 0;
        }
        l->br = br;
        l->bc = bc;
        l->nbc = (cols + bc - 1) / bc;
        int64_t nrb = (rows + br - 1) / br;
        l->scale = malloc((size_t)(nrb * l->nbc) * sizeof(float));
        for (int64_t i = 0; i < nrb * l->nbc; i++) l->scale[i] = (0.5f + (float)rndu(100) / 50.0f) / 1000.0f;
    } else {
        for (size_t i = 0; i < n; i++) {
            float v = 0.05f * rnd();
            if (dt == XP_BF16) ((uint16_t *)w)[i] = xp_f32_to_bf16(v);
            if (dt == XP_F16) ((uint16_t *)w)[i] = xp_f32_to_f16(v);
            if (dt == XP_F32) ((float *)w)[i] = v;
        }
    }
    l->w = w;
    t->dw = gpu_up(w, n * es);
    t->d.dtype = dt == XP_F8_E4M3 ? XPC_FP8 : dt == XP_BF16 ? XPC_BF16 : dt == XP_F16 ? XPC_F16 : XPC_F32;
    t->d.w = t->dw;
    t->d.rows = rows;
    t->d.cols = cols;
    if (dt == XP_F8_E4M3) {
        int64_t nrb = (rows + br - 1) / br;
        t->ds = gpu_up(l->scale, (size_t)(nrb * l->nbc) * sizeof(float));
        t->d.scale = t->ds;
        t->d.br = br;
        t->d.bc = bc;
        t->d.nbc = l->nbc;
    }
}

static void tw_free(tw *t)
{
    free((void *)t->h.w);
    free(t->h.scale);
    cudaFree(t->dw);
    cudaFree(t->ds);
}

static void test_linear(xp_dtype dt, int64_t rows, int64_t cols, int br, int bc, int n)
{
    tw t;
    tw_make(&t, dt, rows, cols, br, bc);
    float *x = rnd_vec((size_t)n * (size_t)cols, 1.0f);
    float *want = malloc(sizeof(float) * (size_t)(n * rows)), *got = malloc(sizeof(float) * (size_t)(n * rows));
    xp_linear_forward_ref(&t.h, x, n, want);
    float *dx = gpu_up(x, sizeof(float) * (size_t)(n * cols)), *dy = gpu_zeros(sizeof(float) * (size_t)(n * rows));
    char name[160];
    if (xpc_gemv(&t.d, dx, n, dy, 0) < 0) fprintf(stderr, "%s\n", xp_last_error());
    gpu_down(got, dy, sizeof(float) * (size_t)(n * rows));
    snprintf(name, sizeof name, "gemv %s %lldx%lld blk %dx%d n=%d", xp_dtype_name(dt),
             (long long)rows, (long long)cols, br, bc, n);
    gpu_result(name, gpu_rel_err(got, want, (size_t)(n * rows)), 1e-5);
    GPU_CHECK(cudaMemset(dy, 0, sizeof(float) * (size_t)(n * rows)));
    if (xpc_gemm_simt(&t.d, dx, n, dy, 0) < 0) fprintf(stderr, "%s\n", xp_last_error());
    gpu_down(got, dy, sizeof(float) * (size_t)(n * rows));
    snprintf(name, sizeof name, "gemm_simt %s %lldx%lld blk %dx%d n=%d", xp_dtype_name(dt),
             (long long)rows, (long long)cols, br, bc, n);
    gpu_result(name, gpu_rel_err(got, want, (size_t)(n * rows)), 1e-5);
    /* the BF16 dequantization the fallback path uses, row by row against xp_decode_row_ref */
    uint16_t *db = gpu_zeros((size_t)(rows * cols) * 2), *hb = malloc((size_t)(rows * cols) * 2);
    if (xpc_weight_to_bf16(&t.d, db, 0) < 0) fprintf(stderr, "%s\n", xp_last_error());
    gpu_down(hb, db, (size_t)(rows * cols) * 2);
    float *row = malloc(sizeof(float) * (size_t)cols), *gb = malloc(sizeof(float) * (size_t)cols);
    double err = 0;
    for (int64_t r = 0; r < rows; r++) {
        xp_decode_row_ref(&t.h, r, row);
        for (int64_t c = 0; c < cols; c++) gb[c] = xp_bf16_to_f32(hb[r * cols + c]);
        double e = gpu_rel_err(gb, row, (size_t)cols);
        if (e > err) err = e;
    }
    snprintf(name, sizeof name, "weight_to_bf16 %s %lldx%lld", xp_dtype_name(dt), (long long)rows,
             (long long)cols);
    gpu_result(name, err, 1.0 / 256);
    free(row);
    free(gb);
    free(hb);
    cudaFree(db);
    free(x);
    free(want);
    free(got);
    cudaFree(dx);
    cudaFree(dy);
    tw_free(&t);
}

/* ------------------------------------------------------------------ cuBLASLt */

static void test_lt(xpc_lt *lt, const xpc_lt_scales *sl, int have_fp8, int64_t rows, int64_t cols, int n)
{
    char name[160];
    int n_pad = (n + 15) & ~15, nkb = (int)((cols + 127) / 128);
    float *x = rnd_vec((size_t)n * (size_t)cols, 1.0f);
    float *dx = gpu_up(x, sizeof(float) * (size_t)(n * cols));
    float *dy = gpu_zeros(sizeof(float) * (size_t)(n_pad * rows));
    float *got = malloc(sizeof(float) * (size_t)(n_pad * rows)), *want = malloc(sizeof(float) * (size_t)(n * rows));
    if (have_fp8) {
        tw t;
        tw_make(&t, XP_F8_E4M3, rows, cols, 128, 128);
        uint8_t *dq = gpu_zeros((size_t)(n_pad * cols)), *hq = malloc((size_t)(n_pad * cols));
        float *ds = gpu_zeros(sizeof(float) * (size_t)(n_pad * nkb)), *hs = malloc(sizeof(float) * (size_t)(n_pad * nkb));
        float *wst = gpu_zeros(sizeof(float) * (size_t)((rows / 128) * nkb));
        xpc_quant_act(dx, n, n_pad, (int)cols, dq, ds, sl->x_kmajor, 0);
        xpc_transpose_f32(t.ds, (int)(rows / 128), nkb, wst, 0);
        uint16_t *ybf = gpu_zeros((size_t)(n_pad * rows) * 2);
        int r = xpc_lt_fp8(lt, sl, t.dw, sl->w_transposed ? wst : t.ds, rows, cols, dq, ds, n_pad, dy, ybf, 0);
        cudaDeviceSynchronize();
        cudaFree(ybf);
        gpu_down(got, dy, sizeof(float) * (size_t)(n * rows));
        gpu_down(hq, dq, (size_t)(n_pad * cols));
        gpu_down(hs, ds, sizeof(float) * (size_t)(n_pad * nkb));
        /* the activations as quantized (so only accumulation order differs), and their
         * quantization error against x on its own */
        float *xd = malloc(sizeof(float) * (size_t)(n * cols));
        for (int i = 0; i < n; i++)
            for (int64_t c = 0; c < cols; c++) {
                float s = sl->x_kmajor ? hs[(c / 128) * n_pad + i] : hs[i * nkb + c / 128];
                xd[i * cols + c] = xp_fp8_e4m3_to_f32(hq[i * cols + c]) * s;
            }
        snprintf(name, sizeof name, "quant_act 1x128 %dx%lld", n, (long long)cols);
        gpu_result(name, gpu_rel_err(xd, x, (size_t)(n * cols)), 1.0 / 16);
        xp_linear_forward_ref(&t.h, xd, n, want);
        snprintf(name, sizeof name, "cuBLASLt fp8 blk128 %lldx%lld n=%d", (long long)rows, (long long)cols, n);
        if (r == 0) /* 5e-3: the library may only write BF16 */
            gpu_result(name, gpu_rel_err(got, want, (size_t)(n * rows)), 5e-3);
        else
            gpu_check_true(name, 0, r == 1 ? "declined by cuBLASLt" : xp_last_error());
        free(xd);
        free(hq);
        free(hs);
        cudaFree(dq);
        cudaFree(ds);
        cudaFree(wst);
        tw_free(&t);
    }
    tw b;
    tw_make(&b, XP_BF16, rows, cols, 0, 0);
    uint16_t *xb = gpu_zeros((size_t)(n * cols) * 2);
    xpc_f32_to_bf16(dx, (size_t)(n * cols), xb, 0);
    int r = xpc_lt_bf16(lt, b.dw, rows, cols, xb, n, dy, 0);
    gpu_down(got, dy, sizeof(float) * (size_t)(n * rows));
    float *xr = malloc(sizeof(float) * (size_t)(n * cols));
    for (int64_t i = 0; i < n * cols; i++) xr[i] = xp_bf16_to_f32(xp_f32_to_bf16(x[i]));
    xp_linear_forward_ref(&b.h, xr, n, want);
    snprintf(name, sizeof name, "cuBLASLt bf16 %lldx%lld n=%d", (long long)rows, (long long)cols, n);
    if (r == 0)
        gpu_result(name, gpu_rel_err(got, want, (size_t)(n * rows)), 1e-4);
    else
        gpu_check_true(name, 0, r == 1 ? "declined by cuBLASLt" : xp_last_error());
    free(xr);
    cudaFree(xb);
    tw_free(&b);
    free(x);
    free(got);
    free(want);
    cudaFree(dx);
    cudaFree(dy);
}

/* ------------------------------------------------------------------ norms, RoPE, attention */

static void test_rmsnorm(int n, int dim)
{
    float *x = rnd_vec((size_t)(n * dim), 3.0f), *w = rnd_vec((size_t)dim, 1.0f);
    float *want = malloc(sizeof(float) * (size_t)(n * dim)), *got = malloc(sizeof(float) * (size_t)(n * dim));
    int32_t rows[4] = {n - 1, 0, n / 2, n - 1};
    for (int i = 0; i < n; i++) xp_rmsnorm(x + i * dim, w, dim, 1e-6f, want + i * dim);
    float *dx = gpu_up(x, sizeof(float) * (size_t)(n * dim)), *dw = gpu_up(w, sizeof(float) * (size_t)dim);
    float *dy = gpu_zeros(sizeof(float) * (size_t)(n * dim));
    int32_t *dr = gpu_up(rows, sizeof rows);
    xpc_rmsnorm(dx, NULL, n, dim, dw, 1e-6f, dy, 0);
    gpu_down(got, dy, sizeof(float) * (size_t)(n * dim));
    char name[96];
    snprintf(name, sizeof name, "rmsnorm %dx%d", n, dim);
    gpu_result(name, gpu_rel_err(got, want, (size_t)(n * dim)), 1e-5);
    /* the gathered form (final norm over the rows whose logits are wanted) */
    xpc_rmsnorm(dx, dr, 4, dim, dw, 1e-6f, dy, 0);
    gpu_down(got, dy, sizeof(float) * (size_t)(4 * dim));
    float *w4 = malloc(sizeof(float) * (size_t)(4 * dim));
    for (int i = 0; i < 4; i++) memcpy(w4 + i * dim, want + rows[i] * dim, sizeof(float) * (size_t)dim);
    snprintf(name, sizeof name, "rmsnorm gathered rows %dx%d", n, dim);
    gpu_result(name, gpu_rel_err(got, w4, (size_t)(4 * dim)), 1e-5);
    free(w4);
    free(x);
    free(w);
    free(want);
    free(got);
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
    cudaFree(dr);
}

/* The CUDA backend's F32 cache layout, [block][layer][position in block][kv_dim]: the row of
 * one position. */
static float *gpu_kv_row(float *cache, const int32_t *table, int n_layers, int layer, int pos,
                         int kvd)
{
    return cache + (((size_t)table[pos / XP_KV_BLOCK] * (size_t)n_layers + (size_t)layer) *
                        XP_KV_BLOCK + (size_t)(pos % XP_KV_BLOCK)) * (size_t)kvd;
}

/* One sequence of `len` positions (block ids shuffled) plus a second one of len2, filled by the
 * kernels as a prefill would, then attention for every row; all against a plain CPU version of
 * the same math (norm, RoPE, exact softmax). */
static void test_attention(int H, int KV, int d, int len, int len2, int nsplit)
{
    int L = 2, layer = 1, n = len + len2, kvd = KV * d;
    int nb1 = xp_kv_blocks_for(len), nb2 = xp_kv_blocks_for(len2), nall = nb1 + nb2 + 3;
    size_t cache = (size_t)nall * L * XP_KV_BLOCK * kvd * sizeof(float);
    float *kc = calloc(1, cache), *vc = calloc(1, cache);
    /* block ids from the top down, two skipped, so neither sequence has 0.. in order */
    int32_t t1[256], t2[256];
    for (int i = 0; i < nb2; i++)
        t2[i] = nall - 3 - i;
    for (int i = 0; i < nb1; i++)
        t1[i] = nall - 3 - nb2 - i;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)n), *toff = malloc(sizeof(int32_t) * (size_t)n);
    int32_t tabs[512];
    memcpy(tabs, t1, sizeof(int32_t) * (size_t)nb1);
    memcpy(tabs + nb1, t2, sizeof(int32_t) * (size_t)nb2);
    for (int i = 0; i < n; i++) {
        pos[i] = i < len ? i : i - len;
        toff[i] = i < len ? 0 : nb1;
    }
    float *q = rnd_vec((size_t)n * H * d, 1.0f), *k = rnd_vec((size_t)n * kvd, 1.0f), *v = rnd_vec((size_t)n * kvd, 1.0f);
    float *qn = rnd_vec((size_t)d, 1.0f), *kn = rnd_vec((size_t)d, 1.0f), *inv = malloc(sizeof(float) * (size_t)(d / 2));
    for (int i = 0; i < d / 2; i++) inv[i] = (float)pow(1e6, -2.0 * i / d);
    /* CPU */
    float *rq = malloc(sizeof(float) * (size_t)n * H * d), *rk = malloc(sizeof(float) * (size_t)n * kvd);
    memcpy(rq, q, sizeof(float) * (size_t)n * H * d);
    memcpy(rk, k, sizeof(float) * (size_t)n * kvd);
    float *cs = malloc(sizeof(float) * (size_t)d);
    for (int i = 0; i < n; i++) {
        const int32_t *tab = i < len ? t1 : t2;
        xp_rope_table(pos[i], inv, d, cs);
        for (int h = 0; h < H; h++) {
            xp_rmsnorm(rq + ((size_t)i * H + h) * d, qn, d, 1e-6f, rq + ((size_t)i * H + h) * d);
            xp_rope(rq + ((size_t)i * H + h) * d, d, cs);
        }
        for (int h = 0; h < KV; h++) {
            xp_rmsnorm(rk + ((size_t)i * KV + h) * d, kn, d, 1e-6f, rk + ((size_t)i * KV + h) * d);
            xp_rope(rk + ((size_t)i * KV + h) * d, d, cs);
        }
        memcpy(gpu_kv_row(kc, tab, L, layer, pos[i], kvd), rk + (size_t)i * kvd, sizeof(float) * (size_t)kvd);
        memcpy(gpu_kv_row(vc, tab, L, layer, pos[i], kvd), v + (size_t)i * kvd, sizeof(float) * (size_t)kvd);
    }
    float *ratt = calloc((size_t)n * H * d, sizeof(float)), *sc = malloc(sizeof(float) * (size_t)(len + len2));
    int group = H / KV;
    for (int i = 0; i < n; i++) {
        const int32_t *tab = i < len ? t1 : t2;
        for (int h = 0; h < H; h++) {
            const float *qq = rq + ((size_t)i * H + h) * d;
            float mx = -INFINITY, scale = 1.0f / sqrtf((float)d);
            for (int p = 0; p <= pos[i]; p++) {
                sc[p] = xp_dot_ref(qq, gpu_kv_row(kc, tab, L, layer, p, kvd) + (h / group) * d, d) * scale;
                if (sc[p] > mx) mx = sc[p];
            }
            double sum = 0;
            for (int p = 0; p <= pos[i]; p++) sum += sc[p] = expf(sc[p] - mx);
            float *o = ratt + ((size_t)i * H + h) * d;
            for (int p = 0; p <= pos[i]; p++) {
                const float *vv = gpu_kv_row(vc, tab, L, layer, p, kvd) + (h / group) * d;
                for (int c = 0; c < d; c++) o[c] += (float)(sc[p] / sum) * vv[c];
            }
        }
    }
    /* GPU */
    float *dq = gpu_up(q, sizeof(float) * (size_t)n * H * d), *dk = gpu_up(k, sizeof(float) * (size_t)n * kvd);
    float *dv = gpu_up(v, sizeof(float) * (size_t)n * kvd), *dqn = gpu_up(qn, sizeof(float) * (size_t)d);
    float *dkn = gpu_up(kn, sizeof(float) * (size_t)d), *dinv = gpu_up(inv, sizeof(float) * (size_t)(d / 2));
    int32_t *dpos = gpu_up(pos, sizeof(int32_t) * (size_t)n), *dtoff = gpu_up(toff, sizeof(int32_t) * (size_t)n);
    int32_t *dtabs = gpu_up(tabs, sizeof(int32_t) * (size_t)(nb1 + nb2));
    float *dkc = gpu_zeros(cache), *dvc = gpu_zeros(cache), *datt = gpu_zeros(sizeof(float) * (size_t)n * H * d);
    xpc_qk_rope_store(dq, dk, dv, n, H, KV, d, dqn, dkn, 1e-6f, dpos, dinv, dtabs, dtoff, dkc, dvc, L, layer, 0);
    int maxp = (len > len2 ? len : len2) - 1, chunk = (maxp + nsplit) / nsplit;
    float *dpart = gpu_zeros(sizeof(float) * (size_t)n * H * nsplit * (d + 2));
    xpc_attention(dq, n, H, KV, d, dpos, dtabs, dtoff, dkc, dvc, L, layer, datt, nsplit, chunk, dpart, 0);
    float *gq = malloc(sizeof(float) * (size_t)n * H * d), *gatt = malloc(sizeof(float) * (size_t)n * H * d);
    float *gk = malloc(cache), *gv = malloc(cache);
    gpu_down(gq, dq, sizeof(float) * (size_t)n * H * d);
    gpu_down(gatt, datt, sizeof(float) * (size_t)n * H * d);
    gpu_down(gk, dkc, cache);
    gpu_down(gv, dvc, cache);
    char name[128];
    snprintf(name, sizeof name, "q norm+rope H=%d d=%d rows=%d", H, d, n);
    gpu_result(name, gpu_rel_err(gq, rq, (size_t)n * H * d), 1e-4);
    snprintf(name, sizeof name, "paged K store (norm+rope) KV=%d blocks=%d+%d", KV, nb1, nb2);
    gpu_result(name, gpu_rel_err(gk, kc, cache / sizeof(float)), 1e-4);
    snprintf(name, sizeof name, "paged V store KV=%d", KV);
    gpu_result(name, gpu_rel_err(gv, vc, cache / sizeof(float)), 0);
    snprintf(name, sizeof name, "paged attention GQA %d/%d d=%d len=%d,%d splits=%d", H, KV, d, len, len2, nsplit);
    gpu_result(name, gpu_rel_err(gatt, ratt, (size_t)n * H * d), 1e-4);
    free(gq);
    free(gatt);
    free(gk);
    free(gv);
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dqn);
    cudaFree(dkn);
    cudaFree(dinv);
    cudaFree(dpos);
    cudaFree(dtoff);
    cudaFree(dtabs);
    cudaFree(dkc);
    cudaFree(dvc);
    cudaFree(datt);
    cudaFree(dpart);
    free(q);
    free(k);
    free(v);
    free(qn);
    free(kn);
    free(inv);
    free(rq);
    free(rk);
    free(ratt);
    free(sc);
    free(pos);
    free(toff);
    free(kc);
    free(vc);
    free(cs);
}

static void test_elementwise(size_t n)
{
    float *g = rnd_vec(n, 2.0f), *u = rnd_vec(n, 1.0f), *want = malloc(sizeof(float) * n), *got = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) want[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    float *dg = gpu_up(g, sizeof(float) * n), *du = gpu_up(u, sizeof(float) * n);
    xpc_silu_mul(dg, du, n, 0);
    gpu_down(got, dg, sizeof(float) * n);
    gpu_result("silu_mul", gpu_rel_err(got, want, n), 1e-6);
    for (size_t i = 0; i < n; i++) want[i] += u[i];
    xpc_add(dg, du, n, 0);
    gpu_down(got, dg, sizeof(float) * n);
    gpu_result("residual add", gpu_rel_err(got, want, n), 1e-6);
    free(g);
    free(u);
    free(want);
    free(got);
    cudaFree(dg);
    cudaFree(du);
}

static void test_embed_argmax(void)
{
    tw e;
    tw_make(&e, XP_BF16, 1000, 320, 0, 0);
    int32_t tok[5] = {0, 999, 17, 17, 500};
    float *want = malloc(sizeof(float) * 5 * 320), *got = malloc(sizeof(float) * 5 * 320);
    for (int i = 0; i < 5; i++) xp_linear_row(&e.h, tok[i], want + i * 320);
    int32_t *dt = gpu_up(tok, sizeof tok);
    float *dx = gpu_zeros(sizeof(float) * 5 * 320);
    xpc_embed(&e.d, dt, 5, dx, 0);
    gpu_down(got, dx, sizeof(float) * 5 * 320);
    gpu_result("embed bf16", gpu_rel_err(got, want, 5 * 320), 0);
    /* argmax over a vocabulary-sized row, ties resolved to the first */
    int V = 151936, rows = 3;
    float *lg = rnd_vec((size_t)V * rows, 1.0f);
    lg[5] = 50.0f;
    lg[V + 100] = 60.0f;
    lg[V + 90000] = 60.0f;
    lg[2 * V + V - 1] = 70.0f;
    float *dl = gpu_up(lg, sizeof(float) * (size_t)V * rows);
    int32_t *di = gpu_zeros(sizeof(int32_t) * 3), hi[3];
    xpc_argmax(dl, rows, V, di, 0);
    gpu_down(hi, di, sizeof hi);
    char detail[96];
    snprintf(detail, sizeof detail, "got %d %d %d, want 5 100 %d", hi[0], hi[1], hi[2], V - 1);
    gpu_check_true("argmax (greedy sampling on device)", hi[0] == 5 && hi[1] == 100 && hi[2] == V - 1, detail);
    free(lg);
    cudaFree(dl);
    cudaFree(di);
    free(want);
    free(got);
    cudaFree(dt);
    cudaFree(dx);
    tw_free(&e);
}

/* ------------------------------------------------------------------ LoRA */

typedef struct {
    int rank; /* 0: the adapter lacks the module */
    float *A, *B; /* host F32, already BF16-exact */
    float scale;
} ref_mat;

/* n_groups groups over n rows; ranks[g] < 0 marks a base group, nrows[g] may be 0. */
static void test_lora(const char *label, int in, int out, int n_groups, const int *nrows, const int *ranks)
{
    int n = 0;
    for (int g = 0; g < n_groups; g++) n += nrows[g];
    float *h = rnd_vec((size_t)n * in, 1.0f), *base = rnd_vec((size_t)n * out, 1.0f);
    float *want = malloc(sizeof(float) * (size_t)n * out), *got = malloc(sizeof(float) * (size_t)n * out);
    memcpy(want, base, sizeof(float) * (size_t)n * out);
    xpc_lora_group *groups = calloc((size_t)n_groups, sizeof *groups);
    void **frees = calloc((size_t)n_groups * 4, sizeof *frees);
    int nf = 0, row0 = 0, idx = 3; /* module slot 3 of a 1-layer table: the others are empty */
    for (int g = 0; g < n_groups; g++) {
        groups[g].row0 = row0;
        groups[g].nrows = nrows[g];
        if (ranks[g] >= 0) {
            int r = ranks[g];
            xpc_lora_mat tbl[7];
            memset(tbl, 0, sizeof tbl);
            float *A = rnd_vec((size_t)r * in, 0.05f), *B = rnd_vec((size_t)out * r, 0.05f);
            uint16_t *Ab = malloc((size_t)r * in * 2 + 2), *Bb = malloc((size_t)out * r * 2 + 2);
            for (size_t i = 0; i < (size_t)r * in; i++) A[i] = xp_bf16_to_f32(Ab[i] = xp_f32_to_bf16(A[i]));
            for (size_t i = 0; i < (size_t)out * r; i++) B[i] = xp_bf16_to_f32(Bb[i] = xp_f32_to_bf16(B[i]));
            float scale = 2.0f / (float)(r ? r : 1);
            if (r > 0) {
                tbl[idx] = (xpc_lora_mat){gpu_up(Ab, (size_t)r * in * 2), gpu_up(Bb, (size_t)out * r * 2), r, scale};
                frees[nf++] = (void *)tbl[idx].A;
                frees[nf++] = (void *)tbl[idx].B;
                float t[256];
                for (int i = row0; i < row0 + nrows[g]; i++) {
                    for (int k = 0; k < r; k++) t[k] = xp_dot_ref(A + (size_t)k * in, h + (size_t)i * in, in);
                    for (int o = 0; o < out; o++)
                        want[(size_t)i * out + o] += scale * xp_dot_ref(B + (size_t)o * r, t, r);
                }
            }
            groups[g].mats = gpu_up(tbl, sizeof tbl);
            frees[nf++] = (void *)groups[g].mats;
            free(A);
            free(B);
            free(Ab);
            free(Bb);
        }
        row0 += nrows[g];
    }
    float *dh = gpu_up(h, sizeof(float) * (size_t)n * in), *dout = gpu_up(base, sizeof(float) * (size_t)n * out);
    float *dt = gpu_zeros(sizeof(float) * (size_t)(n ? n : 1) * XPC_LORA_T);
    xpc_lora_group *dg = gpu_up(groups, sizeof *groups * (size_t)n_groups);
    xpc_lora_shrink(dg, n_groups, idx, dh, in, dt, 0);
    xpc_lora_expand(dg, n_groups, idx, dt, out, dout, 0);
    gpu_down(got, dout, sizeof(float) * (size_t)n * out);
    char name[160];
    snprintf(name, sizeof name, "lora %s in=%d out=%d groups=%d", label, in, out, n_groups);
    gpu_result(name, gpu_rel_err(got, want, (size_t)n * out), 1e-5);
    for (int i = 0; i < nf; i++) cudaFree(frees[i]);
    free(frees);
    free(groups);
    cudaFree(dg);
    cudaFree(dh);
    cudaFree(dout);
    cudaFree(dt);
    free(h);
    free(base);
    free(want);
    free(got);
}

int main(void)
{
    if (!gpu_present()) {
        printf("test_kernels: no CUDA device, skipped\n");
        return 77;
    }
    xp_rng_seed(&rng, 7, "gpu-kernels");
    /* linear: FP8 ragged blocks, narrow blocks, odd columns (scalar path); BF16/F16/F32 */
    static const struct {
        xp_dtype dt;
        int rows, cols, br, bc;
    } shapes[] = {
        {XP_F8_E4M3, 256, 512, 128, 128}, {XP_F8_E4M3, 320, 800, 128, 128},
        {XP_F8_E4M3, 200, 336, 128, 128}, {XP_F8_E4M3, 130, 96, 64, 32},
        {XP_F8_E4M3, 77, 101, 128, 128},  {XP_F8_E4M3, 64, 200, 16, 8},
        {XP_BF16, 300, 320, 0, 0},        {XP_BF16, 129, 77, 0, 0},
        {XP_F16, 100, 320, 0, 0},         {XP_F32, 65, 130, 0, 0},
    };
    static const int ns[] = {1, 3, 8, 13};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++)
            test_linear(shapes[s].dt, shapes[s].rows, shapes[s].cols, shapes[s].br, shapes[s].bc, ns[k]);
    test_linear(XP_F8_E4M3, 1024, 3072, 128, 128, 70); /* prefill-sized, simt */

    /* cuBLASLt: probe the FP8 scale layout, then real shapes */
    xpc_lt *lt = xpc_lt_create(0);
    if (!lt) {
        gpu_check_true("cuBLASLt create", 0, xp_last_error());
    } else {
        xpc_lt_scales sl = {0, 1};
        int p = xpc_lt_fp8_probe(lt, 0, &sl);
        char detail[128];
        snprintf(detail, sizeof detail, "%s (weight grid %s, activation scales %s)",
                 p == 1 ? "FP8 block scaling available" : p == 0 ? "FP8 block scaling unavailable: BF16 fallback" : xp_last_error(),
                 sl.w_transposed ? "transposed" : "as stored", sl.x_kmajor ? "k-major" : "row-major");
        /* reported, not failed, when unavailable: the backend falls back to BF16 then */
        gpu_check_true("cuBLASLt FP8 block-scale probe", p >= 0, detail);
        static const int lts[][3] = {{1024, 1024, 16}, {2048, 1024, 100}, {1024, 3072, 256}, {128, 256, 1}};
        for (size_t i = 0; i < sizeof lts / sizeof lts[0]; i++)
            test_lt(lt, &sl, p == 1, lts[i][0], lts[i][1], lts[i][2]);
        xpc_lt_destroy(lt);
    }

    test_rmsnorm(5, 320);
    test_rmsnorm(33, 5120);
    test_attention(4, 2, 64, 37, 16, 1);   /* tiny preset heads, blocks 3 + 1 */
    test_attention(16, 8, 128, 1, 70, 1);  /* single position; a ragged 5th block */
    test_attention(8, 1, 128, 200, 2, 1);  /* MQA-like group of 8, 13 blocks */
    test_attention(4, 4, 256, 18, 17, 1);  /* largest head_dim */
    test_attention(8, 1, 128, 200, 2, 3);  /* split contexts, the short rows' later splits empty */
    test_attention(4, 1, 64, 2100, 5, 5);  /* long context in 5 splits of 420 */
    test_elementwise(100003);
    test_embed_argmax();

    /* LoRA: ranks 1 and 256, one adapter, many, empty groups, base-only groups */
    int one_rows[] = {5}, one_r1[] = {1}, one_r256[] = {256};
    test_lora("rank 1, one adapter", 320, 800, 1, one_rows, one_r1);
    test_lora("rank 256, one adapter", 1024, 2048, 1, one_rows, one_r256);
    int many_rows[] = {3, 0, 1, 7, 2, 0, 4, 1}, many_r[] = {64, 8, -1, 256, 1, 16, 0, 32};
    test_lora("8 groups: mixed ranks, empty, base, missing module", 320, 128, 8, many_rows, many_r);
    int base_rows[] = {4, 4}, base_r[] = {-1, -1};
    test_lora("base only", 320, 320, 2, base_rows, base_r);
    int dec_rows[32], dec_r[32];
    for (int i = 0; i < 32; i++) dec_rows[i] = 1, dec_r[i] = 64;
    test_lora("32 adapters x 1 row, rank 64", 1024, 3072, 32, dec_rows, dec_r);
    int pre_rows[] = {256}, pre_r[] = {64};
    test_lora("prefill 256 rows, rank 64", 1024, 1024, 1, pre_rows, pre_r);
    return gpu_summary("test_kernels");
}
