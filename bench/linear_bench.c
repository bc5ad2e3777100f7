/* The CPU backend's matrix products alone: y = x W^T for Qwen3-0.6B's layer shapes (FP8 block
 * 128, quantized from random values) and its BF16 lm_head, at several row counts, timed over repeated calls on
 * the engine's pool. Prints GFLOP/s and the weight stream in GB/s per shape and row count.
 * usage: linear_bench [threads] [rows,rows,...]   (built by bench/linear.sh) */
#include "cpu/kernels.h"
#include "cpu/pool.h"
#include "format/blockquant.h"
#include "format/fp8.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static xp_linear make(xp_dtype dt, int64_t rows, int64_t cols)
{
    xp_linear l = {.dtype = dt, .rows = rows, .cols = cols};
    size_t n = (size_t)(rows * cols);
    if (dt == XP_F8_E4M3) {
        /* values as a checkpoint holds them (about normal, sum of four uniforms), quantized as
         * `xprec quantize` does: codes spread as a real model's, subnormals included */
        float *f = malloc(n * sizeof *f);
        uint8_t *q = malloc(n);
        for (size_t i = 0; i < n; i++) {
            double u = 0;
            for (int t = 0; t < 4; t++)
                u += (double)(next() >> 11) * 0x1p-53;
            f[i] = (float)((u - 2.0) * 0.05);
        }
        l.w = q;
        l.br = l.bc = 128;
        l.nbc = (cols + 127) / 128;
        size_t ns = (size_t)((rows + 127) / 128 * l.nbc);
        l.scale = malloc(ns * sizeof(float));
        if (xp_block_quantize(f, rows, cols, 128, 128, XP_F32, q, l.scale) < 0) exit(1);
        free(f);
        xp_linear_check_scales(&l);
        /* as the loader does */
        if (xp_linear_mark_subnormals(&l) < 0) exit(1);
    } else {
        uint16_t *h = malloc(n * 2);
        for (size_t i = 0; i < n; i++)
            h[i] = xp_f32_to_bf16((float)((int)(next() % 2001) - 1000) * 1e-4f);
        l.w = h;
    }
    return l;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    const char *rows_arg = argc > 2 ? argv[2] : "1,8,32,128";
    struct {
        const char *name;
        xp_dtype dt;
        int64_t rows, cols;
    } shapes[] = {{"q_proj", XP_F8_E4M3, 2048, 1024},  {"k_proj", XP_F8_E4M3, 1024, 1024},
                  {"o_proj", XP_F8_E4M3, 1024, 2048},  {"gate_proj", XP_F8_E4M3, 3072, 1024},
                  {"down_proj", XP_F8_E4M3, 1024, 3072}, {"lm_head", XP_BF16, 151936, 1024}};
    int nshape = sizeof shapes / sizeof *shapes;
    xp_pool *pool = xp_pool_create(threads);
    float **scratch = calloc((size_t)threads, sizeof *scratch);
    for (int t = 0; t < threads; t++)
        scratch[t] = aligned_alloc(64, xp_linear_scratch_floats(3072) * sizeof(float));
    printf("%-10s %6s %10s %10s %10s\n", "weight", "rows", "ms/call", "GFLOP/s", "W GB/s");
    char buf[256];
    snprintf(buf, sizeof buf, "%s", rows_arg);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int n = atoi(tok);
        for (int s = 0; s < nshape; s++) {
            xp_linear l = make(shapes[s].dt, shapes[s].rows, shapes[s].cols);
            float *x = aligned_alloc(64, ((size_t)(n * l.cols) * sizeof *x + 63) & ~(size_t)63);
            float *y = malloc((size_t)(n * l.rows) * sizeof *y);
            for (int64_t i = 0; i < n * l.cols; i++)
                x[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;
            double flop = 2.0 * (double)n * (double)l.rows * (double)l.cols;
            double bytes = (double)(l.rows * l.cols) * (l.dtype == XP_BF16 ? 2 : 1);
            /* about half a second of calls, after a warm-up */
            xp_linear_forward(pool, scratch, &l, x, n, y, NULL);
            double t0 = now();
            xp_linear_forward(pool, scratch, &l, x, n, y, NULL);
            double one = now() - t0;
            int reps = one > 0 ? (int)(0.5 / one) + 1 : 1;
            double best = 1e30;
            for (int r = 0; r < reps; r++) {
                t0 = now();
                xp_linear_forward(pool, scratch, &l, x, n, y, NULL);
                double dt = now() - t0;
                if (dt < best) best = dt;
            }
            printf("%-10s %6d %10.3f %10.1f %10.2f\n", shapes[s].name, n, 1e3 * best,
                   flop / best / 1e9, bytes / best / 1e9);
            fflush(stdout);
            free(x);
            free(y);
            free((void *)l.w);
            free(l.scale);
            free(l.sub);
        }
    }
    for (int t = 0; t < threads; t++)
        free(scratch[t]);
    free(scratch);
    xp_pool_destroy(pool);
    return 0;
}
