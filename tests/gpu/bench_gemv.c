/* Weight bandwidth of the decode GEMV on Qwen3-32B's FP8 layer shapes (and the BF16 lm_head),
 * 1 and 8 input rows: the figure to hold against the HBM roofline (H100 SXM ~3350 GB/s, H200
 * ~4800 GB/s). Also times the prefill paths on a 512-row batch. Prints a table; the last line
 * is the pass/fail tally run.sh counts (a run that completes passes: these are measurements). */
#include "cuda/gemm_lt.h"
#include "util/xp_error.h"
#include "cuda/xpc_kernels.h"

#include "gpu_util.h"

#include <cuda_runtime.h>

static double time_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    return ms;
}

int main(void)
{
    if (!gpu_present()) {
        printf("bench_gemv: no CUDA device, skipped\n");
        return 77;
    }
    struct cudaDeviceProp prop;
    GPU_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.0f GB\n", prop.name, prop.multiProcessorCount,
           (double)prop.totalGlobalMem / 1e9);
    static const struct {
        const char *name;
        int rows, cols, fp8;
    } sh[] = {
        {"q_proj 8192x5120", 8192, 5120, 1},  {"k_proj 1024x5120", 1024, 5120, 1},
        {"o_proj 5120x8192", 5120, 8192, 1},  {"gate 25600x5120", 25600, 5120, 1},
        {"down 5120x25600", 5120, 25600, 1},  {"lm_head 151936x5120 bf16", 151936, 5120, 0},
    };
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    int maxn = 512;
    size_t maxc = 25600, maxr = 151936;
    float *x = gpu_zeros(sizeof(float) * (size_t)maxn * maxc), *y = gpu_zeros(sizeof(float) * (size_t)maxn * maxr);
    uint8_t *xq = gpu_zeros((size_t)maxn * maxc);
    float *xs = gpu_zeros(sizeof(float) * (size_t)maxn * (maxc / 128));
    uint16_t *xb = gpu_zeros(2 * (size_t)maxn * maxc), *wb = gpu_zeros(2 * (size_t)25600 * 5120);
    {
        float *h = malloc(sizeof(float) * (size_t)maxn * maxc);
        for (size_t i = 0; i < (size_t)maxn * maxc; i++) h[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
        GPU_CHECK(cudaMemcpy(x, h, sizeof(float) * (size_t)maxn * maxc, cudaMemcpyHostToDevice));
        free(h);
    }
    xpc_lt *lt = xpc_lt_create(0);
    xpc_lt_scales sl = {0, 1};
    int fp8 = lt ? xpc_lt_fp8_probe(lt, 0, &sl) : 0;
    printf("%-28s %8s %10s %10s %10s\n", "weight", "rows in", "path", "us", "GB/s");
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        size_t n = (size_t)sh[s].rows * (size_t)sh[s].cols;
        void *w = gpu_zeros(n * (sh[s].fp8 ? 1 : 2));
        GPU_CHECK(cudaMemset(w, 0x31, n * (sh[s].fp8 ? 1 : 2)));
        int nrb = (sh[s].rows + 127) / 128, ncb = (sh[s].cols + 127) / 128;
        float *sc = NULL;
        if (sh[s].fp8) {
            float *h = malloc(sizeof(float) * (size_t)(nrb * ncb));
            for (int i = 0; i < nrb * ncb; i++) h[i] = 1e-3f;
            sc = gpu_up(h, sizeof(float) * (size_t)(nrb * ncb));
            free(h);
        }
        xpc_linear l = {sh[s].fp8 ? XPC_FP8 : XPC_BF16, w, sc, sh[s].rows, sh[s].cols, 128, 128, ncb};
        size_t bytes = n * (sh[s].fp8 ? 1 : 2) + (sh[s].fp8 ? (size_t)(nrb * ncb) * 4 : 0);
        static const int rows_in[] = {1, 8, 16};
        for (size_t k = 0; k < 3; k++) {
            int nr = rows_in[k], reps = 20;
            xpc_gemv(&l, x, nr, y, 0); /* warm */
            cudaEventRecord(e0, 0);
            for (int r = 0; r < reps; r++) xpc_gemv(&l, x, nr, y, 0);
            cudaEventRecord(e1, 0);
            GPU_CHECK(cudaEventSynchronize(e1));
            double us = 1e3 * time_ms(e0, e1) / reps;
            printf("%-28s %8d %10s %10.1f %10.0f\n", sh[s].name, nr, "gemv", us, bytes / us / 1e3);
        }
        /* prefill-sized: 512 rows */
        if (lt && sh[s].rows <= 25600) {
            int reps = 5;
            const char *path = "bf16";
            cudaEventRecord(e0, 0);
            for (int r = 0; r < reps; r++) {
                if (sh[s].fp8 && fp8 == 1) {
                    path = "fp8-lt";
                    xpc_quant_act(x, maxn, maxn, sh[s].cols, xq, xs, sl.x_kmajor, 0);
                    if (xpc_lt_fp8(lt, &sl, w, sc, sh[s].rows, sh[s].cols, xq, xs, maxn, y, xb, 0) != 0) path = "fp8-declined";
                } else {
                    if (sh[s].fp8) xpc_weight_to_bf16(&l, wb, 0);
                    xpc_f32_to_bf16(x, (size_t)maxn * sh[s].cols, xb, 0);
                    if (xpc_lt_bf16(lt, sh[s].fp8 ? wb : w, sh[s].rows, sh[s].cols, xb, maxn, y, 0) != 0) path = "bf16-declined";
                }
            }
            cudaEventRecord(e1, 0);
            GPU_CHECK(cudaEventSynchronize(e1));
            double us = 1e3 * time_ms(e0, e1) / reps;
            printf("%-28s %8d %10s %10.1f %10.0f  (%.1f TFLOP/s)\n", sh[s].name, maxn, path, us,
                   bytes / us / 1e3, 2.0 * (double)n * maxn / us / 1e6);
        }
        cudaFree(w);
        cudaFree(sc);
    }
    cudaError_t e = cudaDeviceSynchronize();
    gpu_check_true("bench_gemv completed", e == cudaSuccess, e == cudaSuccess ? "" : cudaGetErrorString(e));
    xpc_lt_destroy(lt);
    return gpu_summary("bench_gemv");
}
