/* Small helpers shared by the GPU test programs: checked CUDA calls, uploads, and a pass/fail
 * tally printed as "NAME: N passed, N failed" (tests/gpu/run.sh adds the lines up). */
#ifndef XP_GPU_UTIL_H
#define XP_GPU_UTIL_H

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int gpu_passed, gpu_failed;

#define GPU_CHECK(call)                                                                            \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                               \
        }                                                                                          \
    } while (0)

static inline void *gpu_up(const void *h, size_t bytes)
{
    void *d = NULL;
    GPU_CHECK(cudaMalloc(&d, bytes ? bytes : 16));
    if (bytes) GPU_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}

static inline void *gpu_zeros(size_t bytes)
{
    void *d = NULL;
    GPU_CHECK(cudaMalloc(&d, bytes ? bytes : 16));
    GPU_CHECK(cudaMemset(d, 0, bytes ? bytes : 16));
    return d;
}

static inline void gpu_down(void *h, const void *d, size_t bytes)
{
    GPU_CHECK(cudaDeviceSynchronize());
    GPU_CHECK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

/* max |got - want| / max |want| (absolute when want is all zero). */
static inline double gpu_rel_err(const float *got, const float *want, size_t n)
{
    double amax = 0, err = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(want[i]) > amax) amax = fabs(want[i]);
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= err)) err = d; /* NaN counts as the largest error */
    }
    return amax > 0 ? err / amax : err;
}

static inline void gpu_result(const char *name, double err, double tol)
{
    int ok = err <= tol;
    printf("%s %-56s rel err %.3g (tolerance %.g)\n", ok ? "PASS" : "FAIL", name, err, tol);
    fflush(stdout);
    if (ok)
        gpu_passed++;
    else
        gpu_failed++;
}

static inline void gpu_check_true(const char *name, int ok, const char *detail)
{
    printf("%s %-56s %s\n", ok ? "PASS" : "FAIL", name, detail);
    fflush(stdout);
    if (ok)
        gpu_passed++;
    else
        gpu_failed++;
}

static inline int gpu_summary(const char *prog)
{
    printf("%s: %d passed, %d failed\n", prog, gpu_passed, gpu_failed);
    return gpu_failed ? 1 : 0;
}

/* 1 when a CUDA device is present; the programs skip (exit 77) otherwise. */
static inline int gpu_present(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#endif
