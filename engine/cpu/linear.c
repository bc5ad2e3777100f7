/* Weight-streaming matrix products: y = x W^T with W in FP8 blocks, BF16, F16 or F32.
 *
 * Few input rows (decode): the weights are decoded in registers as they stream from memory.
 * More rows: a tile of weight rows is decoded once into a cache-sized F32 buffer (the weights
 * still stream from memory once per call) and register-blocked kernels meet it with every input
 * row. Every output element is one dot product summed in the level's one order whatever the
 * batch holds, so a request gets bit-identical logits alone and in any batch (batch
 * invariance). */
#include "cpu/kernels.h"
#include "cpu/simd.h"

#include <cpuid.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define XP_TILE_FLOATS (96 * 1024) /* 384 KB of decoded weights per scratch-full */
#define XP_TILE_MIN_ROWS 12        /* whole tiles of every level's kernel (3 or 6 rows) */

static int xp_simd_level = -1; /* -1 unknown, 0 scalar, 1 AVX2, 2 AVX-512 */
static int xp_forced_scalar;

static const xp_simd xp_simd_avx2 = {.dot = xp_dot_avx2,
                                     .tile_rows = xp_tile_rows_avx2,
                                     .fused_rows = xp_fused_rows_avx2,
                                     .decode_row = xp_decode_row_avx2,
                                     .axpy = xp_axpy_avx2,
                                     .lora_expand = xp_lora_expand_avx2,
                                     .exp_sum = xp_exp_sum_avx2,
                                     .dot_bf16 = xp_dot_bf16_avx2,
                                     .axpy_bf16 = xp_axpy_bf16_avx2,
                                     .fp8_chunk = 8,
                                     .fused_max = 4};
static const xp_simd xp_simd_avx512 = {.dot = xp_dot_avx512,
                                       .tile_rows = xp_tile_rows_avx512,
                                       .fused_rows = xp_fused_rows_avx512,
                                       .decode_row = xp_decode_row_avx512,
                                       .axpy = xp_axpy_avx512,
                                       .lora_expand = xp_lora_expand_avx512,
                                       .exp_sum = xp_exp_sum_avx512,
                                       .dot_bf16 = xp_dot_bf16_avx512,
                                       .axpy_bf16 = xp_axpy_bf16_avx512,
                                       .fp8_chunk = 16,
                                       .fused_max = 8};

/* The widest kernels this processor runs; XPREC_SIMD=avx2|scalar caps them (tests, A/B). */
static int xp_cpu_level(void)
{
    if (xp_simd_level < 0) {
        __builtin_cpu_init();
        /* F16C by CPUID (leaf 1, ECX bit 29): not every compiler's builtin knows the name */
        unsigned a, b, c = 0, d;
        int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
        int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                     __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
        const char *cap = getenv("XPREC_SIMD");
        xp_simd_level = avx512 ? 2 : avx2;
        if (cap && strcmp(cap, "scalar") == 0) xp_simd_level = 0;
        if (cap && strcmp(cap, "avx2") == 0 && xp_simd_level > 1) xp_simd_level = 1;
    }
    return xp_forced_scalar ? 0 : xp_simd_level;
}

static const xp_simd *xp_simd_get(void)
{
    int lv = xp_cpu_level();
    return lv == 2 ? &xp_simd_avx512 : lv == 1 ? &xp_simd_avx2 : NULL;
}

int xp_cpu_have_avx2(void)
{
    return xp_cpu_level() >= 1;
}

void xp_cpu_force_scalar(int on)
{
    xp_forced_scalar = on;
}

/* ---------------------------------------------------------------- references */

void xp_decode_row_ref(const xp_linear *l, int64_t r, float *dst)
{
    xp_linear_row(l, r, dst);
}

float xp_dot_ref(const float *a, const float *b, int64_t n)
{
    float s = 0;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* ---------------------------------------------------------------- dispatch */

void xp_decode_row(const xp_linear *l, int64_t r, float *dst)
{
    if (l->dtype == XP_F32) {
        memcpy(dst, (const float *)l->w + r * l->cols, (size_t)l->cols * sizeof *dst);
        return;
    }
    const xp_simd *k = xp_simd_get();
    if (k)
        k->decode_row(l, r, dst);
    else
        xp_decode_row_ref(l, r, dst);
}

void xp_axpy_ref(float a, const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

void xp_axpy(float a, const float *x, float *y, int64_t n)
{
    const xp_simd *k = xp_simd_get();
    if (k)
        k->axpy(a, x, y, n);
    else
        xp_axpy_ref(a, x, y, n);
}

float xp_dot_bf16_ref(const uint16_t *a, const float *b, int64_t n)
{
    float s = 0;
    for (int64_t i = 0; i < n; i++)
        s += xp_bf16_to_f32(a[i]) * b[i];
    return s;
}

float xp_dot_bf16(const uint16_t *a, const float *b, int64_t n)
{
    const xp_simd *k = xp_simd_get();
    return k ? k->dot_bf16(a, b, n) : xp_dot_bf16_ref(a, b, n);
}

void xp_axpy_bf16_ref(float a, const uint16_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] += a * xp_bf16_to_f32(x[i]);
}

void xp_axpy_bf16(float a, const uint16_t *x, float *y, int64_t n)
{
    const xp_simd *k = xp_simd_get();
    if (k)
        k->axpy_bf16(a, x, y, n);
    else
        xp_axpy_bf16_ref(a, x, y, n);
}

float xp_dot(const float *a, const float *b, int64_t n)
{
    const xp_simd *k = xp_simd_get();
    return k ? k->dot(a, b, n) : xp_dot_ref(a, b, n);
}

size_t xp_linear_scratch_floats(int64_t max_cols)
{
    size_t rows = (size_t)XP_TILE_MIN_ROWS * (size_t)max_cols;
    return rows > XP_TILE_FLOATS ? rows : XP_TILE_FLOATS;
}

/* The scalar level's tiles: each element the reference dot product. */
static void xp_tile_rows_ref(const float *w, int64_t nw, const float *x, int n, int64_t k,
                             float *y, int64_t ldy, int64_t r0, const void *pf, int64_t pf_bytes)
{
    (void)pf;
    (void)pf_bytes;
    for (int i = 0; i < n; i++)
        for (int64_t a = 0; a < nw; a++)
            y[(size_t)i * (size_t)ldy + (size_t)(r0 + a)] =
                xp_dot_ref(x + (size_t)i * (size_t)k, w + a * k, k);
}

typedef struct {
    const xp_product *p;
    int np;
    const float *x;
    float **scratch;
    int n;
    int first[XP_MAX_PRODUCTS + 1]; /* product k's tasks are [first[k], first[k + 1]) */
    int64_t tile[XP_MAX_PRODUCTS];  /* weight rows per task */
    const xp_pool_extra *also;
} xp_linear_job;

/* The register-decoding kernel for n input rows, when it applies: few enough rows for the
 * level's registers, FP8 blocks holding whole SIMD chunks with scales the fast decode can take. */
static const xp_simd *xp_fused_kernel(const xp_linear *l, int n)
{
    const xp_simd *k = xp_simd_get();
    if (!k || n > k->fused_max || !(l->dtype == XP_BF16 ||
                (l->dtype == XP_F8_E4M3 && l->fp8_fast && l->bc % k->fp8_chunk == 0)))
        return NULL;
    return k;
}

void xp_linear_rows(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n, float *y,
                    int64_t ldy, float *scratch)
{
    const xp_simd *k = xp_fused_kernel(l, n);
    if (k) {
        k->fused_rows(l, r0, r1, x, n, y, ldy);
        return;
    }
    k = xp_simd_get();
    void (*tiles)(const float *, int64_t, const float *, int, int64_t, float *, int64_t, int64_t,
                  const void *, int64_t) = k ? k->tile_rows : xp_tile_rows_ref;
    if (l->dtype == XP_F32) {
        tiles((const float *)l->w + r0 * l->cols, r1 - r0, x, n, l->cols, y, ldy, r0, NULL, 0);
        return;
    }
    /* decoded a scratch-full at a time: each element's sum is the same however the rows split.
     * The next scratch-full's weights are prefetched while this one's tiles compute. */
    int64_t per = (int64_t)xp_linear_scratch_floats(l->cols) / (l->cols > 0 ? l->cols : 1);
    per = per / XP_TILE_MIN_ROWS * XP_TILE_MIN_ROWS; /* whole tiles: no rows computed twice */
    size_t es = xp_dtype_size(l->dtype);
    for (int64_t a = r0; a < r1; a += per) {
        int64_t b = a + per < r1 ? a + per : r1, c = b + per < r1 ? b + per : r1;
        for (int64_t r = a; r < b; r++)
            xp_decode_row(l, r, scratch + (r - a) * l->cols);
        tiles(scratch, b - a, x, n, l->cols, y, ldy, a,
              (const unsigned char *)l->w + (size_t)b * (size_t)l->cols * es,
              (int64_t)((size_t)(c - b) * (size_t)l->cols * es));
    }
}

static void xp_linear_task(void *ctx, int task, int thread)
{
    const xp_linear_job *j = ctx;
    if (task >= j->first[j->np]) {
        j->also->fn(j->also->ctx, task - j->first[j->np], thread);
        return;
    }
    int k = 0;
    while (task >= j->first[k + 1])
        k++;
    const xp_linear *l = j->p[k].l;
    int64_t r0 = (int64_t)(task - j->first[k]) * j->tile[k];
    int64_t r1 = r0 + j->tile[k] < l->rows ? r0 + j->tile[k] : l->rows;
    xp_linear_rows(l, r0, r1, j->x, j->n, j->p[k].y, l->rows, j->scratch[thread]);
}

float xp_exp_sum_ref(float *s, int n, float m)
{
    float sum = 0;
    for (int p = 0; p < n; p++)
        sum += s[p] = expf(s[p] - m);
    return sum;
}

float xp_exp_sum(float *s, int n, float m)
{
    const xp_simd *k = xp_simd_get();
    return k ? k->exp_sum(s, n, m) : xp_exp_sum_ref(s, n, m);
}

void xp_lora_expand_ref(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len)
{
    for (int i = 0; i < n; i++)
        for (int64_t o = o0; o < o0 + len; o++) {
            float acc = 0;
            for (int k = 0; k < rank; k++)
                acc += t[i * ldt + k] * xp_load1(bt, k * ldb + o, bf16);
            out[i * ldo + o] += acc;
        }
}

void xp_lora_expand(const void *bt, int bf16, int64_t ldb, int rank, const float *t, int64_t ldt,
                    int n, float *out, int64_t ldo, int64_t o0, int64_t len)
{
    const xp_simd *k = xp_simd_get();
    (k ? k->lora_expand : xp_lora_expand_ref)(bt, bf16, ldb, rank, t, ldt, n, out, ldo, o0, len);
}

/* Weight rows per task of l for n input rows on `threads` threads. */
static int64_t xp_linear_tile(const xp_linear *l, int n, int threads)
{
    if (xp_fused_kernel(l, n))
        /* no scratch to fit: one long run of rows per thread. Small tasks (tens of KB) halved
         * decode's bandwidth: each restart costs the prefetchers their run-up and the threads
         * share cache lines of y at every boundary (one run against two: batch-1 steps 38.6-39.8
         * against 39.3-40.6 ms, three alternated pairs). */
        return (l->rows + threads - 1) / threads;
    /* a few tasks per thread so the threads finish together; each task runs its rows a
     * scratch-full at a time, prefetching the next (xp_linear_rows) */
    int64_t tile = (l->rows + 4 * threads - 1) / (4 * threads);
    tile = tile / XP_TILE_MIN_ROWS * XP_TILE_MIN_ROWS;
    return tile < XP_TILE_MIN_ROWS ? XP_TILE_MIN_ROWS : tile;
}

void xp_linear_forward_many(xp_pool *pool, float **scratch, const xp_product *p, int np,
                            const float *x, int n, const xp_pool_extra *also)
{
    int extra = also ? also->n : 0;
    if (n < 1) { /* a step may want no logits */
        if (extra) xp_pool_run(pool, extra, also->fn, also->ctx);
        return;
    }
    xp_linear_job j = {.p = p, .np = np, .x = x, .scratch = scratch, .n = n, .also = also};
    for (int k = 0; k < np; k++) {
        j.tile[k] = xp_linear_tile(p[k].l, n, xp_pool_threads(pool));
        j.first[k + 1] = j.first[k] + (int)((p[k].l->rows + j.tile[k] - 1) / j.tile[k]);
    }
    xp_pool_run(pool, j.first[np] + extra, xp_linear_task, &j);
}

void xp_linear_forward(xp_pool *pool, float **scratch, const xp_linear *l, const float *x, int n,
                       float *y, const xp_pool_extra *also)
{
    xp_product p = {l, y};
    xp_linear_forward_many(pool, scratch, &p, 1, x, n, also);
}

void xp_linear_forward_ref(const xp_linear *l, const float *x, int n, float *y)
{
    float *row = malloc((size_t)l->cols * sizeof *row);
    if (!row) return;
    for (int64_t r = 0; r < l->rows; r++) {
        xp_decode_row_ref(l, r, row);
        for (int i = 0; i < n; i++)
            y[i * l->rows + r] = xp_dot_ref(x + i * l->cols, row, l->cols);
    }
    free(row);
}
