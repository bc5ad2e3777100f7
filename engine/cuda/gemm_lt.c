/* cuBLASLt products for prefill: FP8 with block scaling (128x128 weights, 1x128 activations) and
 * BF16, both accumulating in F32. Plans (descriptors, layouts, the chosen algorithm) are cached
 * per shape since the heuristic query costs more than a small product. */
#include "cuda/gemm_lt.h"
#include "format/fp8.h"
#include "util/xp_error.h"
#include "cuda/xpc_kernels.h"

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define XPC_LT_WORKSPACE (32u << 20)
#define XPC_LT_PLANS 64

/* FP8_BF16OUT: the FP8 product written as BF16, for a library that offers block scaling only
 * with a 16-bit output */
enum { XPC_PLAN_FP8, XPC_PLAN_FP8_BF16OUT, XPC_PLAN_BF16 };

typedef struct {
    int used, kind, w_t, x_km;
    int64_t m, n, k;
    int ok; /* 0: cuBLASLt declined the shape; remembered so it is not asked again */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
} xpc_plan;

struct xpc_lt {
    cublasLtHandle_t h;
    void *ws;
    xpc_plan plans[XPC_LT_PLANS];
    int next;
};

static int xpc_lt_err(const char *what, cublasStatus_t st)
{
    return xp_fail("cuBLASLt %s: %s", what, cublasLtGetStatusString(st));
}

xpc_lt *xpc_lt_create(cudaStream_t s)
{
    xpc_lt *lt = calloc(1, sizeof *lt);
    if (!lt) {
        xp_fail("out of memory");
        return NULL;
    }
    cublasStatus_t st = cublasLtCreate(&lt->h);
    if (st != CUBLAS_STATUS_SUCCESS) {
        xpc_lt_err("create", st);
        free(lt);
        return NULL;
    }
    cudaError_t e = cudaMalloc(&lt->ws, XPC_LT_WORKSPACE);
    if (e != cudaSuccess) {
        xp_fail("cuBLASLt workspace: %s", cudaGetErrorString(e));
        cublasLtDestroy(lt->h);
        free(lt);
        return NULL;
    }
    (void)s;
    return lt;
}

static void xpc_plan_free(xpc_plan *p)
{
    if (p->op) cublasLtMatmulDescDestroy(p->op);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->d) cublasLtMatrixLayoutDestroy(p->d);
    memset(p, 0, sizeof *p);
}

void xpc_lt_destroy(xpc_lt *lt)
{
    if (!lt) return;
    for (int i = 0; i < XPC_LT_PLANS; i++) xpc_plan_free(&lt->plans[i]);
    cudaFree(lt->ws);
    cublasLtDestroy(lt->h);
    free(lt);
}

/* Builds the plan for D [m, n] = A^T B with A [k, m] and B [k, n] (column-major); ok = 0 when
 * cuBLASLt has no algorithm for it. */
static int xpc_plan_build(xpc_lt *lt, xpc_plan *p)
{
    cublasStatus_t st;
    int fp8 = p->kind != XPC_PLAN_BF16;
    cudaDataType_t ab = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
    cudaDataType_t dt = p->kind == XPC_PLAN_FP8_BF16OUT ? CUDA_R_16BF : CUDA_R_32F;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    if ((st = cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) != CUBLAS_STATUS_SUCCESS)
        return xpc_lt_err("matmul descriptor", st);
    cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (fp8) {
        int32_t am = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, bm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
        if ((st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am, sizeof am)) != CUBLAS_STATUS_SUCCESS ||
            (st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm, sizeof bm)) != CUBLAS_STATUS_SUCCESS) {
            p->ok = 0; /* this cuBLASLt does not know block scaling: decline, do not fail */
            return 0;
        }
    }
    if ((st = cublasLtMatrixLayoutCreate(&p->a, ab, (uint64_t)p->k, (uint64_t)p->m, p->k)) != CUBLAS_STATUS_SUCCESS ||
        (st = cublasLtMatrixLayoutCreate(&p->b, ab, (uint64_t)p->k, (uint64_t)p->n, p->k)) != CUBLAS_STATUS_SUCCESS ||
        (st = cublasLtMatrixLayoutCreate(&p->d, dt, (uint64_t)p->m, (uint64_t)p->n, p->m)) != CUBLAS_STATUS_SUCCESS)
        return xpc_lt_err("matrix layout", st);
    cublasLtMatmulPreference_t pref;
    if ((st = cublasLtMatmulPreferenceCreate(&pref)) != CUBLAS_STATUS_SUCCESS)
        return xpc_lt_err("preference", st);
    uint64_t wsb = XPC_LT_WORKSPACE;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    st = cublasLtMatmulAlgoGetHeuristic(lt->h, p->op, p->a, p->b, p->d, p->d, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    p->ok = st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS;
    if (p->ok) p->algo = res.algo;
    return 0;
}

static xpc_plan *xpc_plan_get(xpc_lt *lt, int kind, const xpc_lt_scales *sl, int64_t m, int64_t n,
                              int64_t k)
{
    int wt = sl ? sl->w_transposed : 0, xk = sl ? sl->x_kmajor : 0;
    for (int i = 0; i < XPC_LT_PLANS; i++) {
        xpc_plan *p = &lt->plans[i];
        if (p->used && p->kind == kind && p->m == m && p->n == n && p->k == k && p->w_t == wt &&
            p->x_km == xk)
            return p;
    }
    xpc_plan *p = &lt->plans[lt->next];
    lt->next = (lt->next + 1) % XPC_LT_PLANS;
    xpc_plan_free(p);
    p->used = 1;
    p->kind = kind;
    p->m = m;
    p->n = n;
    p->k = k;
    p->w_t = wt;
    p->x_km = xk;
    if (xpc_plan_build(lt, p) < 0) {
        xpc_plan_free(p);
        return NULL;
    }
    return p;
}

static int xpc_run(xpc_lt *lt, xpc_plan *p, const void *a, const void *b, void *y, cudaStream_t s)
{
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t st = cublasLtMatmul(lt->h, p->op, &one, a, p->a, b, p->b, &zero, y, p->d, y,
                                       p->d, &p->algo, lt->ws, XPC_LT_WORKSPACE, s);
    /* the library reports a combination it cannot run as either of these: fall back, and do
     * not ask again for this shape */
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
        p->ok = 0;
        return 1;
    }
    return st == CUBLAS_STATUS_SUCCESS ? 0 : xpc_lt_err("matmul", st);
}

int xpc_lt_fp8(xpc_lt *lt, const xpc_lt_scales *sl, const uint8_t *w, const float *ws,
               int64_t rows, int64_t cols, const uint8_t *xq, const float *xs, int n_pad,
               float *y, uint16_t *ybf, cudaStream_t s)
{
    /* FP8 tensor-core products want 16-byte aligned leading dimensions */
    if (cols % 16 || rows % 16 || n_pad % 16) return 1;
    xpc_plan *p = xpc_plan_get(lt, XPC_PLAN_FP8, sl, rows, n_pad, cols);
    if (!p) return -1;
    void *out = y;
    if (!p->ok && ybf) {
        out = ybf;
        if (!(p = xpc_plan_get(lt, XPC_PLAN_FP8_BF16OUT, sl, rows, n_pad, cols))) return -1;
    }
    if (!p->ok) return 1;
    cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof ws);
    cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof xs);
    int r = xpc_run(lt, p, w, xq, out, s);
    if (r == 0 && out == ybf && xpc_bf16_to_f32(ybf, (size_t)n_pad * (size_t)rows, y, s) < 0) return -1;
    return r;
}

int xpc_lt_bf16(xpc_lt *lt, const uint16_t *w, int64_t rows, int64_t cols, const uint16_t *xb,
                int n, float *y, cudaStream_t s)
{
    if (cols % 8) return 1;
    xpc_plan *p = xpc_plan_get(lt, XPC_PLAN_BF16, NULL, rows, n, cols);
    if (!p) return -1;
    if (!p->ok) return 1;
    return xpc_run(lt, p, w, xb, y, s);
}

/* ------------------------------------------------------------------ probe */

/* 4x4 scale blocks: a grid dimension a multiple of 4 like every Qwen3 shape (in case the
 * library pads scale tensors to 16 bytes), and block scales that differ under transposition */
#define XPC_PR 512 /* weight rows */
#define XPC_PC 512 /* columns */
#define XPC_PN 32  /* activation rows */

static uint32_t xpc_lcg(uint32_t *st)
{
    *st = *st * 1664525u + 1013904223u;
    return *st >> 8;
}

int xpc_lt_fp8_probe(xpc_lt *lt, cudaStream_t s, xpc_lt_scales *out)
{
    int nrb = XPC_PR / 128, ncb = XPC_PC / 128, nkb = XPC_PC / 128;
    size_t wn = (size_t)XPC_PR * XPC_PC, xn = (size_t)XPC_PN * XPC_PC;
    uint8_t *wq = malloc(wn), *xq_h = malloc(xn);
    float *wsc = malloc(sizeof(float) * (size_t)(nrb * ncb)), *x = malloc(sizeof(float) * xn);
    float *xs_h = malloc(sizeof(float) * (size_t)(XPC_PN * nkb));
    float *ref = malloc(sizeof(float) * (size_t)(XPC_PN * XPC_PR)), *got = malloc(sizeof(float) * (size_t)(XPC_PN * XPC_PR));
    uint8_t *d_w = NULL, *d_xq = NULL;
    float *d_ws = NULL, *d_wst = NULL, *d_x = NULL, *d_xs = NULL, *d_y = NULL;
    uint16_t *d_ybf = NULL;
    int rc = -1;
    if (!wq || !xq_h || !wsc || !x || !xs_h || !ref || !got) {
        xp_fail("out of memory");
        goto done;
    }
    uint32_t st = 12345;
    for (size_t i = 0; i < wn; i++) {
        uint8_t c = (uint8_t)(xpc_lcg(&st) & 0xff);
        wq[i] = (c & 0x7f) == 0x7f ? 0x38 : c; /* no NaN codes */
    }
    /* block scales far apart, so a misread grid cannot pass */
    for (int i = 0; i < nrb * ncb; i++) wsc[i] = ldexpf(1.0f, (i * 3 + i / ncb) % 7 - 3) / 64.0f;
    for (size_t i = 0; i < xn; i++)
        x[i] = ((float)(xpc_lcg(&st) % 2001) - 1000.0f) / 1000.0f * (float)(1 + (i / 128) % 5);
    cudaError_t e;
    if ((e = cudaMalloc((void **)&d_w, wn)) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_xq, xn)) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_ws, sizeof(float) * (size_t)(nrb * ncb))) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_wst, sizeof(float) * (size_t)(nrb * ncb))) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_x, sizeof(float) * xn)) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_xs, sizeof(float) * (size_t)(XPC_PN * nkb))) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_y, sizeof(float) * (size_t)(XPC_PN * XPC_PR))) != cudaSuccess ||
        (e = cudaMalloc((void **)&d_ybf, 2 * (size_t)(XPC_PN * XPC_PR))) != cudaSuccess ||
        /* on s, so the kernels below are ordered after the copies */
        (e = cudaMemcpyAsync(d_w, wq, wn, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
        (e = cudaMemcpyAsync(d_ws, wsc, sizeof(float) * (size_t)(nrb * ncb), cudaMemcpyHostToDevice, s)) != cudaSuccess ||
        (e = cudaMemcpyAsync(d_x, x, sizeof(float) * xn, cudaMemcpyHostToDevice, s)) != cudaSuccess) {
        xp_fail("CUDA probe buffers: %s", cudaGetErrorString(e));
        goto done;
    }
    if (xpc_transpose_f32(d_ws, nrb, ncb, d_wst, s) < 0) goto done;
    rc = 0;
    for (int v = 0; v < 4 && rc == 0; v++) {
        xpc_lt_scales sl = {v & 1, (v >> 1) ^ 1}; /* k-major activations first */
        if (xpc_quant_act(d_x, XPC_PN, XPC_PN, XPC_PC, d_xq, d_xs, sl.x_kmajor, s) < 0) {
            rc = -1;
            break;
        }
        int r = xpc_lt_fp8(lt, &sl, d_w, sl.w_transposed ? d_wst : d_ws, XPC_PR, XPC_PC, d_xq, d_xs,
                           XPC_PN, d_y, d_ybf, s);
        if (r < 0) {
            /* an error from the library in the probe means "not usable", not a failed engine */
            xp_clear_error();
            break;
        }
        if (r == 1) break; /* declined: the layout does not matter */
        if ((e = cudaMemcpyAsync(got, d_y, sizeof(float) * (size_t)(XPC_PN * XPC_PR), cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
            (e = cudaMemcpyAsync(xq_h, d_xq, xn, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
            (e = cudaMemcpyAsync(xs_h, d_xs, sizeof(float) * (size_t)(XPC_PN * nkb), cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
            (e = cudaStreamSynchronize(s)) != cudaSuccess) {
            rc = xp_fail("CUDA probe: %s", cudaGetErrorString(e));
            break;
        }
        /* the reference: the same FP8 operands, dequantized on the host, in double */
        double amax = 0, err = 0;
        for (int i = 0; i < XPC_PN; i++)
            for (int o = 0; o < XPC_PR; o++) {
                double acc = 0;
                for (int c = 0; c < XPC_PC; c++) {
                    float xsc = sl.x_kmajor ? xs_h[(c / 128) * XPC_PN + i] : xs_h[i * nkb + c / 128];
                    acc += (double)xp_fp8_e4m3_to_f32(xq_h[i * XPC_PC + c]) * xsc *
                           xp_fp8_e4m3_to_f32(wq[o * XPC_PC + c]) * wsc[(o / 128) * ncb + c / 128];
                }
                ref[i * XPC_PR + o] = (float)acc;
                if (fabs(acc) > amax) amax = fabs(acc);
            }
        for (int i = 0; i < XPC_PN * XPC_PR; i++)
            if (fabs((double)got[i] - ref[i]) > err) err = fabs((double)got[i] - ref[i]);
        /* BF16 output (when that is what the library offers) rounds to 2^-9 */
        if (amax > 0 && err <= 5e-3 * amax) {
            *out = sl;
            rc = 1;
        }
    }
done:
    cudaFree(d_w);
    cudaFree(d_xq);
    cudaFree(d_ws);
    cudaFree(d_wst);
    cudaFree(d_x);
    cudaFree(d_xs);
    cudaFree(d_y);
    cudaFree(d_ybf);
    free(wq);
    free(xq_h);
    free(wsc);
    free(x);
    free(xs_h);
    free(ref);
    free(got);
    return rc;
}
