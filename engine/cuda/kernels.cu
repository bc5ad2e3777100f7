/* CUDA kernels of the Qwen3 forward pass, each the twin of a CPU reference in engine/forward.c
 * or engine/cpu/linear.c (tests/gpu/test_kernels.c holds each pair against the other). All
 * arithmetic is F32; weights are decoded in registers from FP8/BF16/F16/F32. */
#include "cuda/xpc_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math.h>

extern "C" {
#include "util/xp_error.h"
}

#define XPC_KV_BLOCK 16 /* engine/kv_cache.h XP_KV_BLOCK; checked by the backend at create */
#define XPC_N_MODS 7

static int xpc_launched(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return xp_fail("CUDA kernel %s: %s", what, cudaGetErrorString(e));
    return 0;
}

extern "C" const char *xpc_error_string(int err)
{
    return cudaGetErrorString((cudaError_t)err);
}

static inline unsigned xpc_blocks(size_t n, unsigned per)
{
    return (unsigned)((n + per - 1) / per);
}

__device__ __forceinline__ float xpc_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float xpc_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it. */
__device__ float xpc_block_sum(float v)
{
    __shared__ float part[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = xpc_warp_sum(v);
    __syncthreads(); /* part may still be read from a previous call */
    if (lane == 0) part[w] = v;
    __syncthreads();
    float s = lane < nw ? part[lane] : 0.0f;
    return xpc_warp_sum(s);
}

__device__ __forceinline__ float xpc_bf16f(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

__device__ __forceinline__ float xpc_fp8f(uint8_t c)
{
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, __NV_E4M3);
    return __half2float(__half(h));
}

/* One weight element, scale applied: the scalar path every kernel can fall back on. */
__device__ __forceinline__ float xpc_wval(const xpc_linear &l, int64_t r, int64_t c)
{
    int64_t i = r * l.cols + c;
    switch (l.dtype) {
    case XPC_FP8:
        return xpc_fp8f(((const uint8_t *)l.w)[i]) * l.scale[(r / l.br) * l.nbc + c / l.bc];
    case XPC_BF16: return xpc_bf16f(((const uint16_t *)l.w)[i]);
    case XPC_F16: return __half2float(((const __half *)l.w)[i]);
    default: return ((const float *)l.w)[i];
    }
}

/* ------------------------------------------------------------------ small kernels */

__global__ void xpc_embed_k(xpc_linear E, const int32_t *tok, float *x)
{
    int i = blockIdx.x;
    int64_t r = tok[i];
    for (int64_t c = threadIdx.x; c < E.cols; c += blockDim.x) x[i * E.cols + c] = xpc_wval(E, r, c);
}

extern "C" int xpc_embed(const xpc_linear *E, const int32_t *tok, int n, float *x, cudaStream_t s)
{
    if (n <= 0) return 0;
    xpc_embed_k<<<n, 256, 0, s>>>(*E, tok, x);
    return xpc_launched("embed");
}

/* forward.c xp_rmsnorm: y = x / sqrt(mean(x^2) + eps) * w (F32 sums here, double there). */
__global__ void xpc_rmsnorm_k(const float *x, const int32_t *rows, int dim, const float *w,
                              float eps, float *y)
{
    int i = blockIdx.x;
    const float *xi = x + (size_t)(rows ? rows[i] : i) * dim;
    float ss = 0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += xi[c] * xi[c];
    ss = xpc_block_sum(ss);
    float r = rsqrtf(ss / dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) y[(size_t)i * dim + c] = xi[c] * r * w[c];
}

extern "C" int xpc_rmsnorm(const float *x, const int32_t *rows, int n, int dim, const float *w,
                           float eps, float *y, cudaStream_t s)
{
    if (n <= 0) return 0;
    xpc_rmsnorm_k<<<n, 256, 0, s>>>(x, rows, dim, w, eps, y);
    return xpc_launched("rmsnorm");
}

__device__ __forceinline__ size_t xpc_kv_off(const int32_t *table, int n_layers, int layer, int pos,
                                             int kv_dim)
{
    return (((size_t)table[pos / XPC_KV_BLOCK] * n_layers + layer) * XPC_KV_BLOCK +
            (size_t)(pos % XPC_KV_BLOCK)) * (size_t)kv_dim;
}

/* One block per (row, head); heads H.. H+KV-1 are the k heads, which also store k and v. */
__global__ void xpc_qk_rope_k(float *q, float *k, const float *v, int H, int KV, int d,
                              const float *q_norm, const float *k_norm, float eps,
                              const int32_t *pos, const float *inv_freq, const int32_t *tabs,
                              const int32_t *toff, float *kc, float *vc, int n_layers, int layer)
{
    __shared__ float buf[XPC_MAX_HEAD_DIM];
    int i = blockIdx.x, hh = blockIdx.y, is_k = hh >= H;
    float *p = is_k ? k + ((size_t)i * KV + (hh - H)) * d : q + ((size_t)i * H + hh) * d;
    const float *nw = is_k ? k_norm : q_norm;
    float ss = 0;
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += p[c] * p[c];
    ss = xpc_block_sum(ss);
    float r = rsqrtf(ss / d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) buf[c] = p[c] * r * nw[c];
    __syncthreads();
    int half = d / 2, ps = pos[i];
    for (int c = threadIdx.x; c < half; c += blockDim.x) {
        float a = (float)ps * inv_freq[c], sn, cs;
        sincosf(a, &sn, &cs);
        float x1 = buf[c], x2 = buf[c + half];
        p[c] = x1 * cs - x2 * sn;
        p[c + half] = x2 * cs + x1 * sn;
    }
    if (!is_k) return;
    __syncthreads();
    int kvd = KV * d, kh = hh - H;
    size_t off = xpc_kv_off(tabs + toff[i], n_layers, layer, ps, kvd) + (size_t)kh * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        kc[off + c] = p[c];
        vc[off + c] = v[((size_t)i * KV + kh) * d + c];
    }
}

extern "C" int xpc_qk_rope_store(float *q, float *k, const float *v, int n, int H, int KV, int d,
                                 const float *q_norm, const float *k_norm, float eps,
                                 const int32_t *pos, const float *inv_freq, const int32_t *tabs,
                                 const int32_t *toff, float *kc, float *vc, int n_layers, int layer,
                                 cudaStream_t s)
{
    if (n <= 0) return 0;
    if (d > XPC_MAX_HEAD_DIM || d % 2) return xp_fail("head_dim %d is not supported on CUDA", d);
    dim3 grid((unsigned)n, (unsigned)(H + KV));
    xpc_qk_rope_k<<<grid, 64, 0, s>>>(q, k, v, H, KV, d, q_norm, k_norm, eps, pos, inv_freq, tabs,
                                      toff, kc, vc, n_layers, layer);
    return xpc_launched("qk_rope_store");
}

/* Paged attention, one block of XPC_ATT_WARPS warps per (row, query head, split). Each warp
 * walks every XPC_ATT_WARPS-th position of its split's range with an online softmax (running
 * max m, sum l, weighted values acc per lane: element c = lane + 32 j); the warps' partial
 * results are merged at the end. With one split the block writes the output; with several
 * (long contexts, so more of the GPU works on one row) each writes (max, sum, unnormalized
 * values) to part and xpc_attention_combine_k merges them the same way. */
#define XPC_ATT_WARPS 8
#define XPC_ATT_J (XPC_MAX_HEAD_DIM / 32)

__global__ void xpc_attention_k(const float *q, int H, int KV, int d, const int32_t *pos,
                                const int32_t *tabs, const int32_t *toff, const float *kc,
                                const float *vc, int n_layers, int layer, float *att,
                                int chunk, float *part)
{
    __shared__ float sm[XPC_ATT_WARPS], sl[XPC_ATT_WARPS];
    __shared__ float sacc[XPC_ATT_WARPS][XPC_MAX_HEAD_DIM];
    int i = blockIdx.x, h = blockIdx.y, z = blockIdx.z, nsplit = gridDim.z;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvh = h / (H / KV), kvd = KV * d, ps = pos[i];
    int p0 = z * chunk, p1 = nsplit > 1 && p0 + chunk - 1 < ps ? p0 + chunk - 1 : ps;
    const int32_t *table = tabs + toff[i];
    const float *qi = q + ((size_t)i * H + h) * d;
    float scale = rsqrtf((float)d);
    float qr[XPC_ATT_J], acc[XPC_ATT_J];
#pragma unroll
    for (int j = 0; j < XPC_ATT_J; j++) {
        int c = lane + 32 * j;
        qr[j] = c < d ? qi[c] * scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int p = p0 + w; p <= p1; p += XPC_ATT_WARPS) {
        size_t off = xpc_kv_off(table, n_layers, layer, p, kvd) + (size_t)kvh * d;
        float sc = 0;
#pragma unroll
        for (int j = 0; j < XPC_ATT_J; j++) {
            int c = lane + 32 * j;
            if (c < d) sc += qr[j] * kc[off + c];
        }
        sc = xpc_warp_sum(sc);
        float mn = fmaxf(m, sc), corr = __expf(m - mn), e = __expf(sc - mn);
        l = l * corr + e;
#pragma unroll
        for (int j = 0; j < XPC_ATT_J; j++) {
            int c = lane + 32 * j;
            acc[j] = acc[j] * corr + (c < d ? e * vc[off + c] : 0.0f);
        }
        m = mn;
    }
    if (lane == 0) {
        sm[w] = m;
        sl[w] = l;
    }
#pragma unroll
    for (int j = 0; j < XPC_ATT_J; j++) {
        int c = lane + 32 * j;
        if (c < d) sacc[w][c] = acc[j];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int k = 0; k < XPC_ATT_WARPS; k++) M = fmaxf(M, sm[k]);
    float L = 0;
    for (int k = 0; k < XPC_ATT_WARPS; k++)
        if (sl[k] > 0) L += sl[k] * __expf(sm[k] - M);
    float *o = att + ((size_t)i * H + h) * d;
    if (nsplit > 1) { /* [max, sum, values...] per (row, head, split) */
        float *pp = part + (((size_t)i * H + h) * nsplit + z) * (size_t)(d + 2);
        if (threadIdx.x == 0) {
            pp[0] = M;
            pp[1] = L;
        }
        o = pp + 2;
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0;
        for (int k = 0; k < XPC_ATT_WARPS; k++)
            if (sl[k] > 0) s += sacc[k][c] * __expf(sm[k] - M);
        o[c] = nsplit > 1 ? s : s / L;
    }
}

/* Merges the splits of each (row, head): out = sum_z acc_z e^(M_z - M) / sum_z L_z e^(M_z - M). */
__global__ void xpc_attention_combine_k(const float *part, int H, int d, int nsplit, float *att)
{
    int i = blockIdx.x, h = blockIdx.y;
    const float *pp = part + ((size_t)i * H + h) * nsplit * (size_t)(d + 2);
    float M = -INFINITY, L = 0;
    for (int z = 0; z < nsplit; z++)
        if (pp[z * (d + 2) + 1] > 0) M = fmaxf(M, pp[z * (d + 2)]);
    for (int z = 0; z < nsplit; z++) {
        const float *pz = pp + z * (d + 2);
        if (pz[1] > 0) L += pz[1] * __expf(pz[0] - M);
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float s = 0;
        for (int z = 0; z < nsplit; z++) {
            const float *pz = pp + z * (d + 2);
            if (pz[1] > 0) s += pz[2 + c] * __expf(pz[0] - M);
        }
        att[((size_t)i * H + h) * d + c] = s / L;
    }
}

extern "C" int xpc_attention(const float *q, int n, int H, int KV, int d, const int32_t *pos,
                             const int32_t *tabs, const int32_t *toff, const float *kc,
                             const float *vc, int n_layers, int layer, float *att, int nsplit,
                             int chunk, float *part, cudaStream_t s)
{
    if (n <= 0) return 0;
    if (d > XPC_MAX_HEAD_DIM) return xp_fail("head_dim %d is not supported on CUDA", d);
    if (nsplit < 1 || !part) nsplit = 1;
    dim3 grid((unsigned)n, (unsigned)H, (unsigned)nsplit);
    xpc_attention_k<<<grid, 32 * XPC_ATT_WARPS, 0, s>>>(q, H, KV, d, pos, tabs, toff, kc, vc,
                                                        n_layers, layer, att, chunk, part);
    if (nsplit > 1) {
        dim3 g2((unsigned)n, (unsigned)H);
        xpc_attention_combine_k<<<g2, 128, 0, s>>>(part, H, d, nsplit, att);
    }
    return xpc_launched("attention");
}

__global__ void xpc_silu_mul_k(float *g, const float *u, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = g[i];
        g[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

extern "C" int xpc_silu_mul(float *g, const float *u, size_t n, cudaStream_t s)
{
    if (!n) return 0;
    unsigned b = xpc_blocks(n, 256);
    xpc_silu_mul_k<<<b < 65535 ? b : 65535, 256, 0, s>>>(g, u, n);
    return xpc_launched("silu_mul");
}

__global__ void xpc_add_k(float *x, const float *d, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += d[i];
}

extern "C" int xpc_add(float *x, const float *d, size_t n, cudaStream_t s)
{
    if (!n) return 0;
    unsigned b = xpc_blocks(n, 256);
    xpc_add_k<<<b < 65535 ? b : 65535, 256, 0, s>>>(x, d, n);
    return xpc_launched("add");
}

/* ------------------------------------------------------------------ weight-streaming GEMV */

/* One warp per weight row, NR input rows at once: the row's weights are read once from HBM
 * (16-byte loads, decoded in registers) and applied to all NR rows, whose x values come from
 * L1/L2. VEC: FP8 with cols and bc multiples of 16, or BF16 with cols a multiple of 8; other
 * shapes take the element-wise loop. */
#define XPC_GEMV_WARPS 8
#define XPC_GEMV_MAX_NR 8

template <int NR>
__global__ void xpc_gemv_k(xpc_linear l, const float *x, int ldx, float *y, int vec)
{
    int lane = threadIdx.x & 31;
    int64_t r = (int64_t)blockIdx.x * XPC_GEMV_WARPS + (threadIdx.x >> 5);
    if (r >= l.rows) return;
    int64_t cols = l.cols;
    float acc[NR];
#pragma unroll
    for (int k = 0; k < NR; k++) acc[k] = 0.0f;
    if (vec && l.dtype == XPC_FP8) {
        const uint8_t *wr = (const uint8_t *)l.w + r * cols;
        const float *sr = l.scale + (r / l.br) * l.nbc;
        for (int64_t c = (int64_t)lane * 16; c < cols; c += 32 * 16) {
            uint4 raw = __ldg((const uint4 *)(wr + c));
            float s = sr[c / l.bc];
            const __nv_fp8x2_storage_t *pr = (const __nv_fp8x2_storage_t *)&raw;
            float wv[16];
#pragma unroll
            for (int t = 0; t < 8; t++) {
                __half2_raw h2 = __nv_cvt_fp8x2_to_halfraw2(pr[t], __NV_E4M3);
                float2 f = __half22float2(__half2(h2));
                wv[2 * t] = f.x * s;
                wv[2 * t + 1] = f.y * s;
            }
#pragma unroll
            for (int k = 0; k < NR; k++) {
                const float4 *xv = (const float4 *)(x + (size_t)k * ldx + c);
                float a = acc[k];
#pragma unroll
                for (int t = 0; t < 4; t++) {
                    float4 xx = xv[t];
                    a += xx.x * wv[4 * t] + xx.y * wv[4 * t + 1] + xx.z * wv[4 * t + 2] + xx.w * wv[4 * t + 3];
                }
                acc[k] = a;
            }
        }
    } else if (vec && l.dtype == XPC_BF16) {
        const uint16_t *wr = (const uint16_t *)l.w + r * cols;
        for (int64_t c = (int64_t)lane * 8; c < cols; c += 32 * 8) {
            uint4 raw = __ldg((const uint4 *)(wr + c));
            const uint32_t *pr = (const uint32_t *)&raw;
            float wv[8];
#pragma unroll
            for (int t = 0; t < 4; t++) {
                wv[2 * t] = __uint_as_float(pr[t] << 16);
                wv[2 * t + 1] = __uint_as_float(pr[t] & 0xffff0000u);
            }
#pragma unroll
            for (int k = 0; k < NR; k++) {
                const float4 *xv = (const float4 *)(x + (size_t)k * ldx + c);
                float4 a0 = xv[0], a1 = xv[1];
                acc[k] += a0.x * wv[0] + a0.y * wv[1] + a0.z * wv[2] + a0.w * wv[3] + a1.x * wv[4] +
                          a1.y * wv[5] + a1.z * wv[6] + a1.w * wv[7];
            }
        }
    } else {
        for (int64_t c = lane; c < cols; c += 32) {
            float wv = xpc_wval(l, r, c);
#pragma unroll
            for (int k = 0; k < NR; k++) acc[k] += x[(size_t)k * ldx + c] * wv;
        }
    }
#pragma unroll
    for (int k = 0; k < NR; k++) {
        float v = xpc_warp_sum(acc[k]);
        if (lane == 0) y[(size_t)k * l.rows + r] = v;
    }
}

extern "C" int xpc_gemv(const xpc_linear *W, const float *x, int n, float *y, cudaStream_t s)
{
    const xpc_linear l = *W;
    /* float4 loads of x need 16-byte rows: cols a multiple of 4 (cudaMalloc bases are aligned) */
    int vec = (l.dtype == XPC_FP8 && l.cols % 16 == 0 && l.bc % 16 == 0) ||
              (l.dtype == XPC_BF16 && l.cols % 8 == 0);
    unsigned grid = xpc_blocks((size_t)l.rows, XPC_GEMV_WARPS);
    for (int i = 0; i < n; i += XPC_GEMV_MAX_NR) {
        int nr = n - i < XPC_GEMV_MAX_NR ? n - i : XPC_GEMV_MAX_NR;
        const float *xi = x + (size_t)i * l.cols;
        float *yi = y + (size_t)i * l.rows;
        switch (nr) {
#define XPC_CASE(N)                                                                                \
    case N: xpc_gemv_k<N><<<grid, 32 * XPC_GEMV_WARPS, 0, s>>>(l, xi, (int)l.cols, yi, vec); break;
            XPC_CASE(1) XPC_CASE(2) XPC_CASE(3) XPC_CASE(4) XPC_CASE(5) XPC_CASE(6) XPC_CASE(7)
            XPC_CASE(8)
#undef XPC_CASE
        }
    }
    return xpc_launched("gemv");
}

/* ------------------------------------------------------------------ tiled F32 GEMM */

/* y[n, rows] = x W^T in 64x64 output tiles, 16 columns of K at a time through shared memory;
 * each of the 256 threads computes a 4x4 patch. */
#define XPC_TM 64
#define XPC_TN 64
#define XPC_TK 16

__global__ void xpc_gemm_simt_k(xpc_linear l, const float *x, int n, float *y)
{
    __shared__ float xs[XPC_TK][XPC_TM + 4];
    __shared__ float ws[XPC_TK][XPC_TN + 4];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int i0 = blockIdx.y * XPC_TM;
    int64_t r0 = (int64_t)blockIdx.x * XPC_TN;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < l.cols; k0 += XPC_TK) {
        for (int e = threadIdx.x; e < XPC_TK * XPC_TM; e += blockDim.x) {
            int kk = e % XPC_TK, ii = e / XPC_TK;
            int64_t c = k0 + kk;
            xs[kk][ii] = (i0 + ii < n && c < l.cols) ? x[(size_t)(i0 + ii) * l.cols + c] : 0.0f;
            ws[kk][ii] = (r0 + ii < l.rows && c < l.cols) ? xpc_wval(l, r0 + ii, c) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < XPC_TK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int t = 0; t < 4; t++) {
                a[t] = xs[kk][ty * 4 + t];
                b[t] = ws[kk][tx * 4 + t];
            }
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int t = 0; t < 4; t++) acc[u][t] += a[u] * b[t];
        }
        __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
        int i = i0 + ty * 4 + u;
        if (i >= n) continue;
#pragma unroll
        for (int t = 0; t < 4; t++) {
            int64_t r = r0 + tx * 4 + t;
            if (r < l.rows) y[(size_t)i * l.rows + r] = acc[u][t];
        }
    }
}

extern "C" int xpc_gemm_simt(const xpc_linear *W, const float *x, int n, float *y, cudaStream_t s)
{
    if (n <= 0) return 0;
    dim3 grid(xpc_blocks((size_t)W->rows, XPC_TN), xpc_blocks((size_t)n, XPC_TM));
    xpc_gemm_simt_k<<<grid, 256, 0, s>>>(*W, x, n, y);
    return xpc_launched("gemm_simt");
}

/* ------------------------------------------------------------------ conversions */

/* One warp per (row, 128-column group). */
__global__ void xpc_quant_act_k(const float *x, int n, int n_pad, int cols, uint8_t *xq, float *xs,
                                int kmajor)
{
    int nkb = (cols + 127) / 128, lane = threadIdx.x & 31;
    int64_t wid = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (wid >= (int64_t)n_pad * nkb) return;
    int row = (int)(wid / nkb), kb = (int)(wid % nkb), c0 = kb * 128;
    int c1 = c0 + 128 < cols ? c0 + 128 : cols;
    float amax = 0;
    if (row < n)
        for (int c = c0 + lane; c < c1; c += 32) amax = fmaxf(amax, fabsf(x[(size_t)row * cols + c]));
    amax = xpc_warp_max(amax);
    float sc = amax > 0 ? amax / 448.0f : 1.0f, inv = 1.0f / sc;
    for (int c = c0 + lane; c < c1; c += 32) {
        float v = row < n ? x[(size_t)row * cols + c] * inv : 0.0f;
        xq[(size_t)row * cols + c] = (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    }
    if (lane == 0) xs[kmajor ? (size_t)kb * n_pad + row : (size_t)row * nkb + kb] = sc;
}

extern "C" int xpc_quant_act(const float *x, int n, int n_pad, int cols, uint8_t *xq, float *xs,
                             int kmajor, cudaStream_t s)
{
    size_t warps = (size_t)n_pad * (size_t)((cols + 127) / 128);
    if (!warps) return 0;
    xpc_quant_act_k<<<xpc_blocks(warps, 8), 256, 0, s>>>(x, n, n_pad, cols, xq, xs, kmajor);
    return xpc_launched("quant_act");
}

__global__ void xpc_weight_to_bf16_k(xpc_linear l, uint16_t *dst)
{
    size_t total = (size_t)l.rows * (size_t)l.cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        float v = xpc_wval(l, (int64_t)(i / l.cols), (int64_t)(i % l.cols));
        __nv_bfloat16 b = __float2bfloat16_rn(v);
        dst[i] = *(uint16_t *)&b;
    }
}

extern "C" int xpc_weight_to_bf16(const xpc_linear *W, uint16_t *dst, cudaStream_t s)
{
    size_t total = (size_t)W->rows * (size_t)W->cols;
    if (!total) return 0;
    unsigned b = xpc_blocks(total, 256);
    xpc_weight_to_bf16_k<<<b < 65535 ? b : 65535, 256, 0, s>>>(*W, dst);
    return xpc_launched("weight_to_bf16");
}

__global__ void xpc_f32_to_bf16_k(const float *src, size_t n, uint16_t *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        __nv_bfloat16 b = __float2bfloat16_rn(src[i]);
        dst[i] = *(uint16_t *)&b;
    }
}

extern "C" int xpc_f32_to_bf16(const float *src, size_t n, uint16_t *dst, cudaStream_t s)
{
    if (!n) return 0;
    unsigned b = xpc_blocks(n, 256);
    xpc_f32_to_bf16_k<<<b < 65535 ? b : 65535, 256, 0, s>>>(src, n, dst);
    return xpc_launched("f32_to_bf16");
}

__global__ void xpc_bf16_to_f32_k(const uint16_t *src, size_t n, float *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = xpc_bf16f(src[i]);
}

extern "C" int xpc_bf16_to_f32(const uint16_t *src, size_t n, float *dst, cudaStream_t s)
{
    if (!n) return 0;
    unsigned b = xpc_blocks(n, 256);
    xpc_bf16_to_f32_k<<<b < 65535 ? b : 65535, 256, 0, s>>>(src, n, dst);
    return xpc_launched("bf16_to_f32");
}

__global__ void xpc_transpose_k(const float *a, int ra, int ca, float *t)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < ra * ca) t[(size_t)(i % ca) * ra + i / ca] = a[i];
}

extern "C" int xpc_transpose_f32(const float *a, int rows_a, int cols_a, float *t, cudaStream_t s)
{
    size_t n = (size_t)rows_a * (size_t)cols_a;
    if (!n) return 0;
    xpc_transpose_k<<<xpc_blocks(n, 256), 256, 0, s>>>(a, rows_a, cols_a, t);
    return xpc_launched("transpose");
}

/* ------------------------------------------------------------------ grouped LoRA */

/* Grid (group, rank slice of 8, row slice): each warp owns one rank index k of one group and
 * dots A[k] with every XPC_SHRINK_Z-th row of the group from its slice (prefill groups are
 * long; rank alone gives too few warps). */
#define XPC_SHRINK_Z 8
__global__ void xpc_lora_shrink_k(const xpc_lora_group *groups, int idx, const float *h, int in,
                                  float *t)
{
    xpc_lora_group g = groups[blockIdx.x];
    if (!g.mats) return;
    xpc_lora_mat m = g.mats[idx];
    int k = blockIdx.y * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (k >= m.rank) return;
    const uint16_t *a = m.A + (size_t)k * in;
    for (int i = g.row0 + blockIdx.z; i < g.row0 + g.nrows; i += XPC_SHRINK_Z) {
        const float *hi = h + (size_t)i * in;
        float s = 0;
        for (int c = lane; c < in; c += 32) s += xpc_bf16f(a[c]) * hi[c];
        s = xpc_warp_sum(s);
        if (lane == 0) t[(size_t)i * XPC_LORA_T + k] = s;
    }
}

extern "C" int xpc_lora_shrink(const xpc_lora_group *g, int n_groups, int idx, const float *h,
                               int in, float *t, cudaStream_t s)
{
    if (n_groups <= 0) return 0;
    dim3 grid((unsigned)n_groups, XPC_LORA_T / 8, XPC_SHRINK_Z);
    xpc_lora_shrink_k<<<grid, 256, 0, s>>>(g, idx, h, in, t);
    return xpc_launched("lora_shrink");
}

/* Grid (group, output slice of 8): each warp owns one output o, holds B[o, :rank] in registers
 * (lane + 32 j) and adds scale * B[o] . t[row] to every row of the group. */
__global__ void xpc_lora_expand_k(const xpc_lora_group *groups, int idx, const float *t,
                                  int out_dim, float *out)
{
    xpc_lora_group g = groups[blockIdx.x];
    if (!g.mats) return;
    xpc_lora_mat m = g.mats[idx];
    int o = blockIdx.y * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (m.rank == 0 || o >= out_dim) return;
    float b[XPC_LORA_T / 32];
#pragma unroll
    for (int j = 0; j < XPC_LORA_T / 32; j++) {
        int k = lane + 32 * j;
        b[j] = k < m.rank ? xpc_bf16f(m.B[(size_t)o * m.rank + k]) : 0.0f;
    }
    for (int i = g.row0; i < g.row0 + g.nrows; i++) {
        const float *ti = t + (size_t)i * XPC_LORA_T;
        float s = 0;
#pragma unroll
        for (int j = 0; j < XPC_LORA_T / 32; j++) {
            int k = lane + 32 * j;
            if (k < m.rank) s += b[j] * ti[k];
        }
        s = xpc_warp_sum(s);
        if (lane == 0) out[(size_t)i * out_dim + o] += m.scale * s;
    }
}

extern "C" int xpc_lora_expand(const xpc_lora_group *g, int n_groups, int idx, const float *t,
                               int out_dim, float *out, cudaStream_t s)
{
    if (n_groups <= 0 || out_dim <= 0) return 0;
    dim3 grid((unsigned)n_groups, xpc_blocks((size_t)out_dim, 8));
    xpc_lora_expand_k<<<grid, 256, 0, s>>>(g, idx, t, out_dim, out);
    return xpc_launched("lora_expand");
}

/* ------------------------------------------------------------------ sampling */

__global__ void xpc_argmax_k(const float *logits, int vocab, int32_t *idx)
{
    __shared__ float bv[32];
    __shared__ int bi[32];
    const float *l = logits + (size_t)blockIdx.x * vocab;
    float best = -INFINITY;
    int bidx = 0x7fffffff;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x)
        if (l[c] > best) best = l[c], bidx = c;
    /* reduce (value, index), lower index first on ties */
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bidx, o);
        if (ov > best || (ov == best && oi < bidx)) best = ov, bidx = oi;
    }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) bv[w] = best, bi[w] = bidx;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); k++)
            if (bv[k] > best || (bv[k] == best && bi[k] < bidx)) best = bv[k], bidx = bi[k];
        idx[blockIdx.x] = bidx == 0x7fffffff ? 0 : bidx;
    }
}

extern "C" int xpc_argmax(const float *logits, int n, int vocab, int32_t *idx, cudaStream_t s)
{
    if (n <= 0) return 0;
    xpc_argmax_k<<<n, 256, 0, s>>>(logits, vocab, idx);
    return xpc_launched("argmax");
}
