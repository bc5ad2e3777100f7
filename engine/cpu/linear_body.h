/* The register-blocked matrix kernels, one body for every vector level: linear_avx2.c and
 * linear_avx512.c include it after defining
 *   XV            the F32 vector type, XW its lanes
 *   XT            the target attribute
 *   XN(name)      the level's name for a function
 *   XZERO(), XLOAD(p), XSET1(f), XFMA(a, b, c) = a * b + c fused, XHSUM(v) -> float
 *   XFP8(q, S)    XW FP8 codes at q as F32, times S (= 2^120 * block scale)
 *   XFP8S(q, S)   the same through F16, times S (= 2^8 * block scale): for subnormal codes
 *   XBF16(h)      XW BF16 values at h as F32
 *   XMR, XNR      the weight rows and input rows of the tile kernel
 *   XFUSED_MAX    the most input rows the few-row path takes (4, or 8 with 32 registers)
 *
 * Every output element is one dot product summed in the level's one order: a single XW-lane
 * accumulator over the full XW-element chunks in column order, XHSUM, then the remaining columns
 * one by one. The order does not depend on which tile, which position in it, or which path (a
 * decoded tile or weights decoded in registers) computes the element, so a row's outputs are the
 * same bits alone and in any batch. */

#include "format/fp8.h"

#define XSRC_F32 0
#define XSRC_BF16 1
#define XSRC_FP8 2

/* Column j of weight row w as F32, as the reference decodes it (the tail columns). */
static inline float XN(wcol)(const void *w, const float *s, int64_t bc, int64_t j, const int src)
{
    if (src == XSRC_FP8) return xp_fp8_e4m3_to_f32(((const uint8_t *)w)[j]) * s[j / bc];
    return src == XSRC_BF16 ? xp_bf16_to_f32(((const uint16_t *)w)[j]) : ((const float *)w)[j];
}

#define XACC_R (XMR > 4 ? XMR : 4)
#define XACC_C (XNR > XFUSED_MAX ? XNR : XFUSED_MAX)

/* The chunks [c0, c1) of one scale block of the tile below into its accumulators. slow: FP8
 * codes through XFP8S, for blocks holding subnormal codes (S then holds 2^8 * scale). */
XT __attribute__((always_inline)) static inline void
XN(chunks)(const void *const *wr, const float *const *xr, XV (*acc)[XACC_C], const XV *S,
           int64_t c0, int64_t c1, const int mr, const int nr, const int src, const int slow,
           int64_t pf, const char *pq, int64_t pstep)
{
    const int es = src == XSRC_FP8 ? 1 : src == XSRC_BF16 ? 2 : 4;
    for (int64_t c = c0; c < c1; c += XW) {
        XV w[XACC_R];
        if (pq) __builtin_prefetch(pq + c / XW * pstep, 0, 2);
        if (pf > 0 && ((c * es) & 63) == 0)
            _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++)
                __builtin_prefetch((const char *)wr[a] + pf + c * es, 0, 3);
        _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++)
        {
            if (src == XSRC_FP8)
                w[a] = slow ? XFP8S((const uint8_t *)wr[a] + c, S[a])
                            : XFP8((const uint8_t *)wr[a] + c, S[a]);
            else if (src == XSRC_BF16)
                w[a] = XBF16((const uint16_t *)wr[a] + c);
            else
                w[a] = XLOAD((const float *)wr[a] + c);
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < nr; i++)
        {
            XV xv = XLOAD(xr[i] + c);
            _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++) acc[a][i] =
                XFMA(xv, w[a], acc[a][i]);
        }
    }
}

/* out[a * nr + i] = W_a . x_i for mr weight rows wr[] (F32, BF16 or FP8 codes with scale rows
 * sr[] of blocks bc wide, bc a multiple of XW) and nr input rows xr[], k columns. mr, nr and src
 * are constants in each expansion, so the accumulators stay in registers. ur: FP8 rows' marks of
 * blocks holding subnormal codes (xp_linear.sub), or NULL; a block marked in any of the rows is
 * decoded the slow way for all of them, to the same bits. pf > 0: each weight row's cache line
 * pf bytes ahead is prefetched as the row is read (the few-row path streams mr short rows side
 * by side, a pattern the hardware prefetchers follow poorly). pq != NULL: one cache line at
 * pq + i * pstep is prefetched at the i-th chunk (memory the caller reads next, fetched while
 * this tile computes). */
XT __attribute__((always_inline)) static inline void
XN(tile)(const void *const *wr, const float *const *sr, const uint8_t *const *ur, int64_t bc,
         const float *const *xr, int64_t k, float *out, const int mr, const int nr, const int src,
         int64_t pf, const char *pq, int64_t pstep)
{
    XV acc[XACC_R][XACC_C], S[XACC_R];
    _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++)
    {
        S[a] = XZERO();
        _Pragma("GCC unroll 8") for (int i = 0; i < nr; i++) acc[a][i] = XZERO();
    }
    int64_t kv = k / XW * XW, blk = src == XSRC_FP8 ? bc : kv;
    for (int64_t b0 = 0; b0 < kv; b0 += blk) {
        int64_t b1 = b0 + blk < kv ? b0 + blk : kv;
        int slow = 0;
        if (src == XSRC_FP8) {
            if (ur) _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++) slow |= ur[a][b0 / bc];
            _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++) S[a] =
                XSET1(sr[a][b0 / bc] * (slow ? 0x1p8f : 0x1p120f));
        }
        if (src == XSRC_FP8 && slow)
            XN(chunks)(wr, xr, acc, S, b0, b1, mr, nr, src, 1, pf, pq, pstep);
        else
            XN(chunks)(wr, xr, acc, S, b0, b1, mr, nr, src, 0, pf, pq, pstep);
    }
    _Pragma("GCC unroll 8") for (int a = 0; a < mr; a++)
        _Pragma("GCC unroll 8") for (int i = 0; i < nr; i++)
    {
        float s = XHSUM(acc[a][i]);
        for (int64_t j = kv; j < k; j++)
            s += xr[i][j] * XN(wcol)(wr[a], src == XSRC_FP8 ? sr[a] : NULL, bc, j, src);
        out[a * nr + i] = s;
    }
}

/* What the tiles of one x block prefetch, a slice per tile: up to two regions in turn. */
typedef struct {
    const char *p[2];
    int64_t left[2];
    int cur;
} XN(pfq);

/* The next tile's slice of q (NULL when q is spent), and q moved past it. */
static inline const char *XN(pfq_take)(XN(pfq) *q, int64_t slice)
{
    while (q->cur < 2 && q->left[q->cur] <= 0)
        q->cur++;
    if (q->cur == 2) return NULL;
    const char *p = q->p[q->cur];
    int64_t n = q->left[q->cur] < slice ? q->left[q->cur] : slice;
    q->p[q->cur] += n;
    q->left[q->cur] -= n;
    return p;
}

/* y[i, r0 + a] for the decoded F32 rows w[0 .. nw) (row stride k) and n input rows x (stride k),
 * y with row stride ldy: XMR x XNR tiles; at the ragged edges the missing rows repeat the last
 * real one and their results are dropped. The x rows are taken a block at a time so that block
 * stays in cache while every tile of weight rows meets it. While one x block computes, its tiles
 * prefetch the next one a slice each: the first tile to meet an x row otherwise waits on the
 * outer cache line by line (measured 1.2x on 1024 rows). During the last block they prefetch the
 * pf_bytes at pf (the weights the caller decodes next; pf may be NULL) and then the first x block,
 * which the next scratch-full meets first. */
XT void XN(tile_rows)(const float *w, int64_t nw, const float *x, int n, int64_t k, float *y,
                      int64_t ldy, int64_t r0, const void *pf, int64_t pf_bytes)
{
    int xblock = (int)((64 * 1024) / (k > 0 ? k : 1));
    xblock = xblock < XNR ? XNR : xblock / XNR * XNR;
    int64_t chunks = k / XW, xbytes = k * (int64_t)sizeof(float);
    for (int i0 = 0; i0 < n; i0 += xblock) {
        int i1 = i0 + xblock < n ? i0 + xblock : n;
        XN(pfq) q = {{NULL, NULL}, {0, 0}, 0};
        if (i1 < n) {
            int i2 = i1 + xblock < n ? i1 + xblock : n;
            q.p[0] = (const char *)(x + (size_t)i1 * (size_t)k);
            q.left[0] = (i2 - i1) * xbytes;
        } else {
            q.p[0] = pf;
            q.left[0] = pf ? pf_bytes : 0;
            if (i0 > 0) {
                q.p[1] = (const char *)x;
                q.left[1] = xblock * xbytes;
            }
        }
        int64_t tiles = (nw + XMR - 1) / XMR * ((i1 - i0 + XNR - 1) / XNR);
        int64_t total = q.left[0] + q.left[1], slice = 0, pstep = 0;
        if (total > 0 && chunks > 0) {
            slice = (total + tiles - 1) / tiles;
            pstep = (slice + chunks - 1) / chunks;
        }
        for (int64_t a0 = 0; a0 < nw; a0 += XMR) {
            const void *wr[XMR];
            for (int a = 0; a < XMR; a++)
                wr[a] = w + (a0 + a < nw ? a0 + a : nw - 1) * k;
            for (int i = i0; i < i1; i += XNR) {
                const float *xr[XNR];
                float out[XMR * XNR];
                for (int c = 0; c < XNR; c++)
                    xr[c] = x + (size_t)(i + c < i1 ? i + c : i1 - 1) * (size_t)k;
                const char *pq = slice ? XN(pfq_take)(&q, slice) : NULL;
                XN(tile)(wr, NULL, NULL, 0, xr, k, out, XMR, XNR, XSRC_F32, 0, pq, pstep);
                for (int a = 0; a < XMR && a0 + a < nw; a++)
                    for (int c = 0; c < XNR && i + c < i1; c++)
                        y[(size_t)(i + c) * (size_t)ldy + (size_t)(r0 + a0 + a)] = out[a * XNR + c];
            }
        }
    }
}

/* The few-row path: weights decoded in registers as they stream from memory (no buffer), a
 * fixed shape per input-row count (the weight rows give the independent accumulators when the
 * input rows are few). */
#define XN_FUSED(mr, nr, src, name)                                                                \
    XT static void XN(name)(const void *const *wr, const float *const *sr,                         \
                            const uint8_t *const *ur, int64_t bc, const float *const *xr,          \
                            int64_t k, float *out, int64_t pf)                                     \
    {                                                                                              \
        XN(tile)(wr, sr, ur, bc, xr, k, out, mr, nr, src, pf, NULL, 0);                            \
    }
/* each shape for FP8 and BF16 weights */
#define XN_FUSED2(mr, nr)                                                                          \
    XN_FUSED(mr, nr, XSRC_FP8, fp8_##mr##x##nr)                                                    \
    XN_FUSED(mr, nr, XSRC_BF16, bf16_##mr##x##nr)
XN_FUSED2(4, 1)
XN_FUSED2(4, 2)
XN_FUSED2(2, 3)
XN_FUSED2(2, 4)
#if XFUSED_MAX >= 8
XN_FUSED2(2, 5)
XN_FUSED2(2, 6)
XN_FUSED2(2, 7)
XN_FUSED2(2, 8)
#endif
#undef XN_FUSED2
#undef XN_FUSED

typedef void (*XN(fused_fn))(const void *const *, const float *const *, const uint8_t *const *,
                             int64_t, const float *const *, int64_t, float *, int64_t);

/* y[i * ldy + r] for weight rows [r0, r1) of l and n <= XFUSED_MAX input rows x (stride
 * l->cols). FP8 blocks must be a multiple of XW columns wide with fast scales, so no chunk
 * straddles two scales. */
XT void XN(fused_rows)(const xp_linear *l, int64_t r0, int64_t r1, const float *x, int n, float *y,
                       int64_t ldy)
{
    int fp8 = l->dtype == XP_F8_E4M3;
    int mr = n <= 2 ? 4 : 2, nr = n;
    static const XN(fused_fn) fns[2][XFUSED_MAX] = {
        {XN(bf16_4x1), XN(bf16_4x2), XN(bf16_2x3), XN(bf16_2x4),
#if XFUSED_MAX >= 8
         XN(bf16_2x5), XN(bf16_2x6), XN(bf16_2x7), XN(bf16_2x8)
#endif
        },
        {XN(fp8_4x1), XN(fp8_4x2), XN(fp8_2x3), XN(fp8_2x4),
#if XFUSED_MAX >= 8
         XN(fp8_2x5), XN(fp8_2x6), XN(fp8_2x7), XN(fp8_2x8)
#endif
        }};
    XN(fused_fn) f = fns[fp8][n - 1];
    int64_t k = l->cols;
    size_t es = fp8 ? 1 : 2;
    const float *xr[XFUSED_MAX];
    for (int q = 0; q < n; q++)
        xr[q] = x + (size_t)q * (size_t)k;
    for (int64_t r = r0; r < r1; r += mr) {
        const void *wr[4];
        const float *sr[4] = {NULL, NULL, NULL, NULL};
        const uint8_t *ur[4] = {NULL, NULL, NULL, NULL};
        float out[2 * XFUSED_MAX];
        for (int a = 0; a < mr; a++) {
            int64_t ra = r + a < r1 ? r + a : r1 - 1;
            wr[a] = (const unsigned char *)l->w + (size_t)ra * (size_t)k * es;
            if (fp8) sr[a] = l->scale + (ra / l->br) * l->nbc;
            if (fp8 && l->sub) ur[a] = l->sub + ra * l->nbc;
        }
        /* four groups ahead, at the same column: about 16 rows of reading in flight (measured
         * best of 1, 2, 4, 8 for batch-1 decode on the small preset) */
        int64_t pf = r + 5 * mr <= r1 ? (int64_t)(4 * (size_t)mr * (size_t)k * es) : 0;
        f(wr, sr, fp8 && l->sub ? ur : NULL, l->bc, xr, k, out, pf);
        for (int a = 0; a < mr && r + a < r1; a++)
            for (int q = 0; q < n; q++)
                y[(size_t)q * (size_t)ldy + (size_t)(r + a)] = out[a * nr + q];
    }
}

/* out[i * ldo + o] += sum over k < rank of t[i * ldt + k] * Bt[k * ldb + o], o in [o0, o0 + len),
 * for nr rows (the LoRA expand, and attention's e^S V): each element summed in k order with
 * fused multiply-adds from zero, then added once, as xp_axpy would. ch chunks of outputs by nr
 * rows (8 accumulators) share each load and keep the multiply-adds independent. */
XT __attribute__((always_inline)) static inline void
XN(expand_rows)(const void *bt, const int bf16, int64_t ldb, int rank, const float *t, int64_t ldt,
                float *out, int64_t ldo, int64_t o0, int64_t len, const int nr, const int ch)
{
    int64_t o = o0, end = o0 + len;
    for (; o + ch * XW <= end; o += ch * XW) {
        XV acc[8][4];
        _Pragma("GCC unroll 8") for (int c = 0; c < ch; c++)
            _Pragma("GCC unroll 4") for (int i = 0; i < nr; i++) acc[c][i] = XZERO();
        for (int k = 0; k < rank; k++) {
            XV b[8];
            _Pragma("GCC unroll 8") for (int c = 0; c < ch; c++) b[c] =
                bf16 ? XBF16((const uint16_t *)bt + k * ldb + o + c * XW)
                     : XLOAD((const float *)bt + k * ldb + o + c * XW);
            _Pragma("GCC unroll 4") for (int i = 0; i < nr; i++)
            {
                XV tk = XSET1(t[i * ldt + k]);
                _Pragma("GCC unroll 8") for (int c = 0; c < ch; c++) acc[c][i] =
                    XFMA(tk, b[c], acc[c][i]);
            }
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < nr; i++)
            _Pragma("GCC unroll 8") for (int c = 0; c < ch; c++)
        {
            float *oi = out + i * ldo + o + c * XW;
            XSTORE(oi, XLOAD(oi) + acc[c][i]);
        }
    }
    for (; o < end; o++)
        for (int i = 0; i < nr; i++) {
            float acc = 0;
            for (int k = 0; k < rank; k++)
                acc = fmaf(t[i * ldt + k], XN(wcol)(bt, NULL, 0, k * ldb + o, bf16), acc);
            out[i * ldo + o] += acc;
        }
}

/* Four rows at a time, then two, then one: no row computed twice. */
XT __attribute__((always_inline)) static inline void
XN(expand_n)(const void *bt, const int bf16, int64_t ldb, int rank, const float *t, int64_t ldt,
             int n, float *out, int64_t ldo, int64_t o0, int64_t len)
{
    int i = 0;
    for (; i + 4 <= n; i += 4)
        XN(expand_rows)(bt, bf16, ldb, rank, t + i * ldt, ldt, out + i * ldo, ldo, o0, len, 4, 2);
    for (; i + 2 <= n; i += 2)
        XN(expand_rows)(bt, bf16, ldb, rank, t + i * ldt, ldt, out + i * ldo, ldo, o0, len, 2, 4);
    for (; i < n; i++)
        XN(expand_rows)(bt, bf16, ldb, rank, t + i * ldt, ldt, out + i * ldo, ldo, o0, len, 1, 8);
}

XT void XN(lora_expand)(const void *bt, int bf16, int64_t ldb, int rank, const float *t,
                        int64_t ldt, int n, float *out, int64_t ldo, int64_t o0, int64_t len)
{
    if (bf16)
        XN(expand_n)(bt, 1, ldb, rank, t, ldt, n, out, ldo, o0, len);
    else
        XN(expand_n)(bt, 0, ldb, rank, t, ldt, n, out, ldo, o0, len);
}

/* s[p] = e^(s[p] - m) for p < n, and their sum: lane by lane over the full chunks, XHSUM,
 * then the rest in p order (a softmax block's terms). */
XT float XN(exp_sum)(float *s, int n, float m)
{
    XV acc = XZERO(), vm = XSET1(m);
    int p = 0;
    for (; p + XW <= n; p += XW) {
        XV e = XEXP(XLOAD(s + p) - vm);
        XSTORE(s + p, e);
        acc = acc + e;
    }
    float sum = XHSUM(acc);
    if (p < n) {
        float buf[XW];
        for (int q = 0; q < XW; q++)
            buf[q] = p + q < n ? s[p + q] : m;
        XSTORE(buf, XEXP(XLOAD(buf) - vm));
        for (int q = 0; p + q < n; q++)
            sum += s[p + q] = buf[q];
    }
    return sum;
}
