/* Each CPU kernel against its scalar reference, on ragged shapes, and the batch invariance the
 * engine relies on: a row's output does not depend on the other rows. */
#include "testutil.h"

#include "cpu/kernels.h"
#include "format/fp8.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    xp_linear l;
    void *w;
} tk_weight;

/* A random weight of the given dtype; FP8 with block br x bc and random positive scales. */
static tk_weight make_weight(xp_dtype dt, int64_t rows, int64_t cols, int br, int bc, uint64_t seed)
{
    tu_rng r;
    tu_rng_seed(&r, seed);
    tk_weight k = {0};
    k.l.dtype = dt;
    k.l.rows = rows;
    k.l.cols = cols;
    size_t n = (size_t)(rows * cols);
    k.w = malloc(n * xp_dtype_size(dt));
    for (size_t i = 0; i < n; i++) {
        float v = (float)tu_rng_normal(&r);
        if (dt == XP_F8_E4M3) {
            uint8_t c;
            do
                c = (uint8_t)tu_rng_u64(&r);
            while ((c & 0x7f) == 0x7f); /* NaN codes are refused at load */
            ((uint8_t *)k.w)[i] = c;
        } else if (dt == XP_BF16) {
            ((uint16_t *)k.w)[i] = xp_f32_to_bf16(v);
        } else if (dt == XP_F16) {
            ((uint16_t *)k.w)[i] = xp_f32_to_f16(v);
        } else {
            ((float *)k.w)[i] = v;
        }
    }
    k.l.w = k.w;
    if (dt == XP_F8_E4M3) {
        k.l.br = br;
        k.l.bc = bc;
        k.l.nbc = (cols + bc - 1) / bc;
        size_t ns = (size_t)((rows + br - 1) / br * k.l.nbc);
        k.l.scale = malloc(ns * sizeof(float));
        for (size_t i = 0; i < ns; i++)
            k.l.scale[i] = (float)(1e-3 * (1 + tu_rng_uniform(&r)));
        xp_linear_check_scales(&k.l);
    }
    return k;
}

static void free_weight(tk_weight *k)
{
    free(k->w);
    free(k->l.scale);
    free(k->l.sub);
}

static int is_subnormal_code(uint8_t c)
{
    return (c & 0x78) == 0 && (c & 0x07) != 0;
}

static void test_decode_row_matches_reference(void **state)
{
    if (!xp_cpu_have_avx2()) skip();
    xp_dtype types[] = {XP_F8_E4M3, XP_BF16};
    int64_t shapes[][2] = {{3, 7}, {5, 130}, {130, 257}, {2, 1024}};
    for (int t = 0; t < 2; t++)
        for (int s = 0; s < 4; s++) {
            tk_weight k =
                make_weight(types[t], shapes[s][0], shapes[s][1], 128, 64, (uint64_t)(t * 10 + s));
            float *a = malloc((size_t)k.l.cols * 4), *b = malloc((size_t)k.l.cols * 4);
            for (int64_t r = 0; r < k.l.rows; r++) {
                xp_decode_row(&k.l, r, a);
                xp_decode_row_ref(&k.l, r, b);
                /* exact: the F16 route scales by a power of two */
                assert_memory_equal(a, b, (size_t)k.l.cols * 4);
            }
            free(a);
            free(b);
            free_weight(&k);
        }
}

/* The SIMD decode folds 2^120 into the block scale. Tiny (subnormal) and negative scales must
 * still decode exactly, and scales of 256 or more, where that product would overflow, must take
 * the reference path rather than turn weights into infinities. */
static void test_fp8_scale_edges(void **state)
{
    static const struct {
        float scale;
        int fast;
    } cases[] = {{1e-40f, 1}, {0x1p-126f, 1}, {-3.0f, 1},  {255.9f, 1},
                 {256.0f, 0}, {1e30f, 0},     {-300.0f, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        tk_weight k = make_weight(XP_F8_E4M3, 6, 256, 4, 64, 40 + c);
        /* one block of each row keeps an ordinary scale, so rows mix both kinds */
        for (int64_t i = 0; i < 2 * k.l.nbc; i++)
            k.l.scale[i] = i % 3 ? cases[c].scale : 0.01f;
        xp_linear_check_scales(&k.l);
        assert_int_equal(k.l.fp8_fast, cases[c].fast);
        float a[256], b[256], x[4 * 256], y[4 * 6], ref[4 * 6];
        for (int64_t r = 0; r < k.l.rows; r++) {
            xp_decode_row(&k.l, r, a);
            xp_decode_row_ref(&k.l, r, b);
            assert_memory_equal(a, b, sizeof a);
        }
        for (int i = 0; i < 4 * 256; i++)
            x[i] = (float)((i * 7919) % 13) * 0.125f - 0.75f;
        xp_pool *pool = xp_pool_create(1);
        float *scratch = malloc(xp_linear_scratch_floats(256) * 4);
        xp_linear_forward(pool, &scratch, &k.l, x, 4, y, NULL);
        xp_linear_forward_ref(&k.l, x, 4, ref);
        for (int i = 0; i < 4; i++)
            for (int64_t r = 0; r < k.l.rows; r++) {
                /* summation order differs: bound by the sum of the terms' magnitudes */
                double mag = 0;
                xp_decode_row_ref(&k.l, r, b);
                for (int j = 0; j < 256; j++)
                    mag += fabs((double)x[i * 256 + j] * b[j]);
                float got = y[i * 6 + r], want = ref[i * 6 + r];
                assert_true(isfinite(got) && isfinite(want));
                assert_true(fabs((double)got - want) <= 1e-6 * mag);
            }
        free(scratch);
        xp_pool_destroy(pool);
        free_weight(&k);
    }
}

static void test_dot_matches_reference(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 5);
    for (int n = 0; n < 300; n += 7) {
        float a[300], b[300];
        double exact = 0;
        for (int i = 0; i < n; i++) {
            a[i] = (float)tu_rng_normal(&r);
            b[i] = (float)tu_rng_normal(&r);
            exact += (double)a[i] * b[i];
        }
        assert_true(fabs(xp_dot(a, b, n) - exact) <= 1e-5 * (1 + fabs(exact)) * sqrt(n + 1.0));
        assert_true(fabs(xp_dot_ref(a, b, n) - exact) <= 1e-5 * (1 + fabs(exact)) * sqrt(n + 1.0));
    }
}

static void test_axpy_matches_reference(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 9);
    for (int n = 0; n < 300; n += 13) {
        float x[300], y[300], want[300], a = (float)tu_rng_normal(&r);
        for (int i = 0; i < n; i++) {
            x[i] = (float)tu_rng_normal(&r);
            y[i] = want[i] = (float)tu_rng_normal(&r);
        }
        xp_axpy(a, x, y, n);
        xp_axpy_ref(a, x, want, n);
        /* fused or not, one rounding apart */
        for (int i = 0; i < n; i++)
            assert_true(fabsf(y[i] - want[i]) <= 1e-6f * (fabsf(want[i]) + fabsf(a * x[i])));
    }
}

/* The BF16 LoRA kernels decode and then do exactly what the F32 ones do, at every level. */
static void test_bf16_lora_kernels_match_f32(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 12);
    for (int scalar = 0; scalar < 2; scalar++) {
        xp_cpu_force_scalar(scalar);
        for (int n = 0; n < 300; n += 11) {
            uint16_t h[300];
            float wide[300], x[300], y1[300], y2[300];
            for (int i = 0; i < n; i++) {
                h[i] = xp_f32_to_bf16((float)tu_rng_normal(&r));
                wide[i] = xp_bf16_to_f32(h[i]);
                x[i] = (float)tu_rng_normal(&r);
                y1[i] = y2[i] = (float)tu_rng_normal(&r);
            }
            float d1 = xp_dot_bf16(h, x, n), d2 = xp_dot(wide, x, n);
            assert_memory_equal(&d1, &d2, sizeof d1);
            xp_axpy_bf16(0.37f, h, y1, n);
            xp_axpy(0.37f, wide, y2, n);
            assert_memory_equal(y1, y2, (size_t)n * sizeof *y1);
        }
    }
    xp_cpu_force_scalar(0);
}

static void check_linear(xp_dtype dt, int64_t rows, int64_t cols, int threads)
{
    tk_weight k = make_weight(dt, rows, cols, 32, 64, (uint64_t)(rows * 31 + cols));
    int n = 9;
    float *x = malloc((size_t)(n * cols) * 4), *y = malloc((size_t)(n * rows) * 4),
          *ref = malloc((size_t)(n * rows) * 4), *one = malloc((size_t)rows * 4);
    tu_rng r;
    tu_rng_seed(&r, 3);
    for (int64_t i = 0; i < n * cols; i++)
        x[i] = (float)tu_rng_normal(&r);
    xp_pool *pool = xp_pool_create(threads);
    float **scratch = calloc((size_t)threads, sizeof *scratch);
    for (int t = 0; t < threads; t++)
        scratch[t] = malloc(xp_linear_scratch_floats(cols) * 4);
    xp_linear_forward(pool, scratch, &k.l, x, n, y, NULL);
    xp_linear_forward_ref(&k.l, x, n, ref);
    float mx = 0;
    for (int64_t i = 0; i < n * rows; i++)
        mx = fmaxf(mx, fabsf(ref[i]));
    for (int64_t i = 0; i < n * rows; i++)
        assert_true(fabsf(y[i] - ref[i]) <= 1e-5f * mx);
    /* batch invariance: every row alone gives the same bits as inside the batch of 9 */
    for (int i = 0; i < n; i++) {
        xp_linear_forward(pool, scratch, &k.l, x + i * cols, 1, one, NULL);
        assert_memory_equal(one, y + i * rows, (size_t)rows * 4);
    }
    for (int t = 0; t < threads; t++)
        free(scratch[t]);
    free(scratch);
    xp_pool_destroy(pool);
    free(x);
    free(y);
    free(ref);
    free(one);
    free_weight(&k);
}

static void test_linear_matches_reference_and_is_batch_invariant(void **state)
{
    xp_dtype types[] = {XP_F8_E4M3, XP_BF16, XP_F32};
    for (int t = 0; t < 3; t++) {
        check_linear(types[t], 1, 5, 1);
        check_linear(types[t], 67, 130, 2);
        check_linear(types[t], 200, 320, 3);
    }
}

static void test_scalar_fallback(void **state)
{
    xp_cpu_force_scalar(1);
    assert_false(xp_cpu_have_avx2());
    check_linear(XP_F8_E4M3, 67, 130, 2);
    check_linear(XP_BF16, 33, 77, 1);
    xp_cpu_force_scalar(0);
}

/* y = x W^T through the pool against the scalar reference, with the reference's own bound: the
 * summation order differs, so each element may move by a few ulps of the sum of |terms|. */
static void check_against_reference(const xp_linear *l, const float *x, int n, const float *y)
{
    float *row = malloc((size_t)l->cols * 4), *ref = malloc((size_t)(n * l->rows) * 4);
    xp_linear_forward_ref(l, x, n, ref);
    for (int64_t r = 0; r < l->rows; r++) {
        xp_decode_row_ref(l, r, row);
        for (int i = 0; i < n; i++) {
            double mag = 0;
            for (int64_t j = 0; j < l->cols; j++)
                mag += fabs((double)x[i * l->cols + j] * row[j]);
            double got = y[(size_t)i * l->rows + r], want = ref[(size_t)i * l->rows + r];
            if (!(fabs(got - want) <= 2e-6 * mag + 1e-30))
                fail_msg("row %d out %lld: %g vs reference %g (|terms| %g), %lldx%lld", i,
                         (long long)r, got, want, mag, (long long)l->rows, (long long)l->cols);
        }
    }
    free(row);
    free(ref);
}

/* The register-blocked kernels on ragged shapes (rows and columns not multiples of the tiles,
 * of 16 or of 128; FP8 blocks of 128, 64 and 48 columns, the last not a multiple of the
 * AVX-512 chunk), every batch size from the register-decoding path (1-4 rows, 1-8 at AVX-512) to
 * the tile path, every thread count: each against the reference, and each row's outputs the
 * same bits alone, in the batch, and at another position in a reversed batch. */
static void check_blocked(xp_dtype dt, int64_t rows, int64_t cols, int br, int bc)
{
    tk_weight k = make_weight(dt, rows, cols, br, bc, (uint64_t)(rows * 131 + cols + bc));
    enum { N = 37 };
    float *x = malloc((size_t)(N * cols) * 4), *rev = malloc((size_t)(N * cols) * 4);
    float *y = malloc((size_t)(N * rows) * 4), *yr = malloc((size_t)(N * rows) * 4);
    float *one = malloc((size_t)rows * 4);
    tu_rng r;
    tu_rng_seed(&r, (uint64_t)cols);
    for (int64_t i = 0; i < N * cols; i++)
        x[i] = (float)tu_rng_normal(&r);
    static const int ns[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, N};
    for (int threads = 1; threads <= 3; threads += 2) {
        xp_pool *pool = xp_pool_create(threads);
        float **scratch = calloc((size_t)threads, sizeof *scratch);
        for (int t = 0; t < threads; t++)
            scratch[t] = malloc(xp_linear_scratch_floats(cols) * 4);
        /* every row alone first: the bits the batches must reproduce */
        float *alone = malloc((size_t)(N * rows) * 4);
        for (int i = 0; i < N; i++)
            xp_linear_forward(pool, scratch, &k.l, x + i * cols, 1, alone + i * rows, NULL);
        check_against_reference(&k.l, x, N, alone);
        xp_linear_forward(pool, scratch, &k.l, x, 0, NULL, NULL); /* a step that wants no logits */
        for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
            int n = ns[c];
            xp_linear_forward(pool, scratch, &k.l, x, n, y, NULL);
            assert_memory_equal(y, alone, (size_t)(n * rows) * 4);
            for (int i = 0; i < n; i++)
                memcpy(rev + (size_t)i * cols, x + (size_t)(n - 1 - i) * cols, (size_t)cols * 4);
            xp_linear_forward(pool, scratch, &k.l, rev, n, yr, NULL);
            for (int i = 0; i < n; i++)
                assert_memory_equal(yr + (size_t)i * rows, alone + (size_t)(n - 1 - i) * rows,
                                    (size_t)rows * 4);
        }
        free(alone);
        for (int t = 0; t < threads; t++)
            free(scratch[t]);
        free(scratch);
        xp_pool_destroy(pool);
    }
    free(x);
    free(rev);
    free(y);
    free(yr);
    free(one);
    free_weight(&k);
}

static void blocked_shapes(void)
{
    static const int64_t shapes[][2] = {{1, 5}, {13, 130}, {37, 257}, {130, 272}, {7, 1024}};
    for (int s = 0; s < 5; s++) {
        int64_t rows = shapes[s][0], cols = shapes[s][1];
        check_blocked(XP_F8_E4M3, rows, cols, 128, 128);
        check_blocked(XP_F8_E4M3, rows, cols, 32, 64);
        check_blocked(XP_F8_E4M3, rows, cols, 5, 48);
        check_blocked(XP_BF16, rows, cols, 0, 0);
        check_blocked(XP_F16, rows, cols, 0, 0);
        check_blocked(XP_F32, rows, cols, 0, 0);
    }
    /* wide enough that the tile path takes its 37 input rows in two blocks and its 50 weight
     * rows in two scratch-fulls, the second ragged: the loop edges and the prefetch of the next
     * block and of the next weights */
    check_blocked(XP_F8_E4M3, 50, 2100, 128, 128);
    check_blocked(XP_BF16, 50, 2100, 0, 0);
}

static void test_blocked_kernels_match_reference_and_are_batch_invariant(void **state)
{
    blocked_shapes();
}

static void test_blocked_kernels_scalar(void **state)
{
    xp_cpu_force_scalar(1);
    blocked_shapes();
    xp_cpu_force_scalar(0);
}

/* The blocked LoRA expand gives, row by row, the bits of the per-row form it replaced (an F32
 * run summed with xp_axpy / xp_axpy_bf16 over k, then added once), at every level, for ragged
 * row counts, ranks, output runs and offsets. */
static void test_lora_expand_matches_axpy_form(void **state)
{
    tu_rng r;
    tu_rng_seed(&r, 77);
    enum { OD = 300, ROWS = 9, RANK = 17 };
    static float t[ROWS * 20], bt[RANK * OD], out[ROWS * OD], want[ROWS * OD], acc[OD];
    static uint16_t bth[RANK * OD];
    for (int i = 0; i < RANK * OD; i++) {
        bth[i] = xp_f32_to_bf16((float)tu_rng_normal(&r));
        bt[i] = (float)tu_rng_normal(&r);
    }
    for (int i = 0; i < ROWS * 20; i++)
        t[i] = (float)tu_rng_normal(&r);
    for (int scalar = 0; scalar < 2; scalar++) {
        xp_cpu_force_scalar(scalar);
        for (int bf16 = 0; bf16 < 2; bf16++)
            for (int n = 1; n <= ROWS; n += 2)
                for (int rank = 1; rank <= RANK; rank += 4)
                    for (int o0 = 0; o0 < 40; o0 += 13)
                        for (int len = 1; o0 + len <= OD; len += 37) {
                            for (int i = 0; i < ROWS * OD; i++)
                                out[i] = want[i] = (float)(i % 7) - 3.0f;
                            xp_lora_expand(bf16 ? (const void *)bth : bt, bf16, OD, rank, t, 20,
                                           n, out, OD, o0, len);
                            for (int i = 0; i < n; i++) {
                                memset(acc, 0, sizeof acc);
                                for (int k = 0; k < rank; k++) {
                                    if (bf16)
                                        xp_axpy_bf16(t[i * 20 + k], bth + k * OD + o0, acc, len);
                                    else
                                        xp_axpy(t[i * 20 + k], bt + k * OD + o0, acc, len);
                                }
                                for (int o = 0; o < len; o++)
                                    want[i * OD + o0 + o] += acc[o];
                            }
                            assert_memory_equal(out, want, sizeof out);
                        }
    }
    xp_cpu_force_scalar(0);
}

/* FP8 blocks holding subnormal codes are marked at load and decoded through F16 (no F32
 * denormals, which cost a microcode assist on some cores). The marks must be right, and marked
 * weights must give the bits unmarked ones give, in the register-decoding path (1-4 rows), the
 * tile path, and decode_row, with marked and unmarked blocks side by side in one tile. */
static void test_fp8_subnormal_blocks_same_bits(void **state)
{
    static const int64_t shapes[][2] = {{13, 130}, {37, 257}, {7, 1024}, {130, 272}};
    static const int blocks[][2] = {{128, 128}, {32, 64}, {5, 48}};
    static const int ns[] = {1, 2, 3, 4, 5, 8, 13, 24};
    for (int s = 0; s < 4; s++)
        for (int bl = 0; bl < 3; bl++) {
            int64_t rows = shapes[s][0], cols = shapes[s][1];
            tk_weight k = make_weight(XP_F8_E4M3, rows, cols, blocks[bl][0], blocks[bl][1],
                                      (uint64_t)(s * 3 + bl + 90));
            uint8_t *q = k.w;
            /* a third of the (row, block) runs keep their subnormal codes (1 in 16 of random
             * codes); the rest get exponent 1 instead */
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < cols; j++)
                    if ((r * 7 + j / k.l.bc) % 3 != 0 && is_subnormal_code(q[r * cols + j]))
                        q[r * cols + j] |= 0x08;
            assert_int_equal(xp_linear_mark_subnormals(&k.l), 0);
            assert_non_null(k.l.sub);
            int64_t marked = 0;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t b = 0; b < k.l.nbc; b++) {
                    int want = 0;
                    for (int64_t j = b * k.l.bc; j < cols && j < (b + 1) * k.l.bc; j++)
                        want |= is_subnormal_code(q[r * cols + j]);
                    assert_int_equal(k.l.sub[r * k.l.nbc + b], want);
                    marked += want;
                }
            assert_true(marked > 0 && marked < rows * k.l.nbc);
            uint8_t *sub = k.l.sub;
            float *a = malloc((size_t)cols * 4), *b = malloc((size_t)cols * 4);
            for (int64_t r = 0; r < rows; r++) {
                xp_decode_row(&k.l, r, a);
                xp_decode_row_ref(&k.l, r, b);
                assert_memory_equal(a, b, (size_t)cols * 4);
            }
            enum { N = 24 };
            float *x = malloc((size_t)(N * cols) * 4);
            float *y0 = malloc((size_t)(N * rows) * 4), *y1 = malloc((size_t)(N * rows) * 4);
            tu_rng r;
            tu_rng_seed(&r, 8);
            for (int64_t i = 0; i < N * cols; i++)
                x[i] = (float)tu_rng_normal(&r);
            xp_pool *pool = xp_pool_create(2);
            float *scratch[2] = {malloc(xp_linear_scratch_floats(cols) * 4),
                                 malloc(xp_linear_scratch_floats(cols) * 4)};
            for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                k.l.sub = NULL;
                xp_linear_forward(pool, scratch, &k.l, x, ns[c], y0, NULL);
                k.l.sub = sub;
                xp_linear_forward(pool, scratch, &k.l, x, ns[c], y1, NULL);
                assert_memory_equal(y0, y1, (size_t)(ns[c] * rows) * 4);
            }
            check_against_reference(&k.l, x, N, y1);
            free(scratch[0]);
            free(scratch[1]);
            xp_pool_destroy(pool);
            free(x);
            free(y0);
            free(y1);
            free(a);
            free(b);
            /* without a subnormal code nothing is marked */
            for (int64_t i = 0; i < rows * cols; i++)
                if (is_subnormal_code(q[i])) q[i] |= 0x08;
            assert_int_equal(xp_linear_mark_subnormals(&k.l), 0);
            assert_null(k.l.sub);
            free_weight(&k);
        }
}

static void inc(void *ctx, int task, int thread);

/* Extra tasks in a product's pool call each run once, and leave the product as it was; with no
 * rows wanted they still run. */
static void test_linear_carries_extra_tasks(void **state)
{
    tk_weight k = make_weight(XP_F8_E4M3, 37, 256, 128, 128, 3);
    float x[3 * 256], y[3 * 37], want[3 * 37];
    for (int i = 0; i < 3 * 256; i++)
        x[i] = (float)(i % 17) - 8.0f;
    for (int threads = 1; threads <= 3; threads++) {
        xp_pool *pool = xp_pool_create(threads);
        float **scratch = calloc((size_t)threads, sizeof *scratch);
        for (int t = 0; t < threads; t++)
            scratch[t] = malloc(xp_linear_scratch_floats(256) * 4);
        for (int n = 0; n <= 3; n += 3) {
            int hits[23] = {0};
            xp_pool_extra also = {23, inc, hits};
            if (n) xp_linear_forward(pool, scratch, &k.l, x, n, want, NULL);
            xp_linear_forward(pool, scratch, &k.l, x, n, y, &also);
            for (int i = 0; i < 23; i++)
                assert_int_equal(hits[i], 1);
            if (n) assert_memory_equal(y, want, sizeof y);
        }
        for (int t = 0; t < threads; t++)
            free(scratch[t]);
        free(scratch);
        xp_pool_destroy(pool);
    }
    free_weight(&k);
}

/* Several products of the same rows in one pool call give each one's bits. */
static void test_linear_forward_many(void **state)
{
    tk_weight w[3] = {make_weight(XP_F8_E4M3, 70, 130, 128, 64, 1),
                      make_weight(XP_BF16, 13, 130, 0, 0, 2),
                      make_weight(XP_F8_E4M3, 260, 130, 32, 32, 3)};
    float x[9 * 130], *y[3], *want = malloc(9 * 260 * 4);
    for (int i = 0; i < 9 * 130; i++)
        x[i] = (float)((i * 37) % 19) * 0.1f - 0.9f;
    xp_pool *pool = xp_pool_create(3);
    float *scratch[3];
    for (int t = 0; t < 3; t++)
        scratch[t] = malloc(xp_linear_scratch_floats(130) * 4);
    for (int n = 1; n <= 9; n += 4) {
        xp_product p[3];
        for (int k = 0; k < 3; k++)
            p[k] = (xp_product){&w[k].l, y[k] = malloc((size_t)(9 * w[k].l.rows) * 4)};
        xp_linear_forward_many(pool, scratch, p, 3, x, n, NULL);
        for (int k = 0; k < 3; k++) {
            xp_linear_forward(pool, scratch, &w[k].l, x, n, want, NULL);
            assert_memory_equal(y[k], want, (size_t)(n * w[k].l.rows) * 4);
            free(y[k]);
        }
    }
    for (int t = 0; t < 3; t++)
        free(scratch[t]);
    xp_pool_destroy(pool);
    for (int k = 0; k < 3; k++)
        free_weight(&w[k]);
    free(want);
}

static void inc(void *ctx, int task, int thread)
{
    int *hits = ctx;
    __atomic_fetch_add(&hits[task], 1, __ATOMIC_RELAXED);
}

static void test_pool_runs_every_task_once(void **state)
{
    xp_pool *p = xp_pool_create(3);
    for (int round = 0; round < 50; round++) {
        int hits[37] = {0};
        xp_pool_run(p, 37, inc, hits);
        for (int i = 0; i < 37; i++)
            assert_int_equal(hits[i], 1);
    }
    xp_pool_destroy(p);
}

typedef struct {
    int hits[64];
    int ntasks;
} pool_round;

static void count_round(void *ctx, int task, int thread)
{
    pool_round *r = ctx;
    if (task >= r->ntasks) abort(); /* a task of another call's size: a stale job */
    __atomic_fetch_add(&r->hits[task], 1, __ATOMIC_RELAXED);
}

/* Back-to-back calls with different jobs, as a decode step makes them: a worker late from one
 * call must never run a task of the next with the old job, nor miss or repeat one. */
static void test_pool_back_to_back_calls(void **state)
{
    for (int threads = 2; threads <= 4; threads++) {
        xp_pool *p = xp_pool_create(threads);
        pool_round rounds[2];
        for (int i = 0; i < 20000; i++) {
            pool_round *r = &rounds[i % 2];
            memset(r, 0, sizeof *r);
            r->ntasks = 2 + (i * 7) % 63;
            xp_pool_run(p, r->ntasks, count_round, r);
            for (int t = 0; t < 64; t++)
                assert_int_equal(r->hits[t], t < r->ntasks);
        }
        xp_pool_destroy(p);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_row_matches_reference),
        cmocka_unit_test(test_fp8_scale_edges),
        cmocka_unit_test(test_dot_matches_reference),
        cmocka_unit_test(test_axpy_matches_reference),
        cmocka_unit_test(test_bf16_lora_kernels_match_f32),
        cmocka_unit_test(test_linear_matches_reference_and_is_batch_invariant),
        cmocka_unit_test(test_scalar_fallback),
        cmocka_unit_test(test_blocked_kernels_match_reference_and_are_batch_invariant),
        cmocka_unit_test(test_blocked_kernels_scalar),
        cmocka_unit_test(test_fp8_subnormal_blocks_same_bits),
        cmocka_unit_test(test_lora_expand_matches_axpy_form),
        cmocka_unit_test(test_linear_carries_extra_tasks),
        cmocka_unit_test(test_linear_forward_many),
        cmocka_unit_test(test_pool_runs_every_task_once),
        cmocka_unit_test(test_pool_back_to_back_calls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
