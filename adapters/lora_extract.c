#include "lora_extract.h"
#include "format/dtype.h"
#include "util/xp_error.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void xp_svd_split(const xp_svd_result *r, int64_t m, int64_t n, int k, float *A, float *B)
{
    for (int i = 0; i < k; i++) {
        float f = sqrtf(r->s[i]);
        for (int64_t j = 0; j < n; j++) A[i * n + j] = f * r->vt[i * n + j];
    }
    for (int64_t row = 0; row < m; row++)
        for (int i = 0; i < k; i++) B[row * k + i] = r->u[row * r->k + i] * sqrtf(r->s[i]);
}

void xp_extract_result_free(xp_extract_result *r)
{
    free(r->A);
    free(r->B);
    memset(r, 0, sizeof *r);
}

/* Energy mode: grow the computed rank (x4 from 64) until the singular values found capture the
 * share. Randomized estimates never exceed the true values, so the rank picked is never below
 * the smallest one that truly reaches it. */
static int xp_svd_by_energy(const float *dw, int64_t m, int64_t n, double total,
                            const xp_extract_opts *o, xp_svd_result *r, int *rank)
{
    int64_t mn = m < n ? m : n;
    int cap = (int)(o->max_rank > 0 && o->max_rank < mn ? o->max_rank : mn);
    int k = cap < 64 ? cap : 64;
    for (;;) {
        xp_svd_opts so = o->svd;
        so.method = xp_svd_resolve(m, n, k, &o->svd);
        if (so.method == XP_SVD_EXACT) k = cap; /* it computes every triplet anyway */
        if (xp_svd_top(dw, m, n, k, &so, r) < 0) return -1;
        int want = xp_energy_rank(r->s, r->k, total, o->energy);
        if (want > 0 || r->k >= cap) {
            *rank = want > 0 ? want : r->k;
            return 0;
        }
        xp_svd_result_free(r);
        k = 4 * k > cap ? cap : 4 * k;
    }
}

int xp_extract_lora(float *dw, int64_t m, int64_t n, const xp_extract_opts *o,
                    xp_extract_result *res)
{
    memset(res, 0, sizeof *res);
    size_t el = (size_t)(m * n);
    double total = xp_frob2(dw, el);
    res->delta_norm = sqrt(total);
    if (!isfinite(total)) return xp_fail("the weight difference is not finite");
    if (total == 0) return 0;
    xp_svd_result r;
    int rank;
    if (o->rank > 0) {
        if (xp_svd_top(dw, m, n, o->rank, &o->svd, &r) < 0) return -1;
        rank = r.k;
    } else if (xp_svd_by_energy(dw, m, n, total, o, &r, &rank) < 0) {
        return -1;
    }
    /* exact zeros at the tail (a matrix of lower rank than asked) would only add dead weight */
    while (rank > 1 && r.s[rank - 1] == 0) rank--;
    float *A = malloc((size_t)rank * (size_t)n * sizeof *A);
    float *B = malloc((size_t)m * (size_t)rank * sizeof *B);
    res->A = malloc((size_t)rank * (size_t)n * sizeof *res->A);
    res->B = malloc((size_t)m * (size_t)rank * sizeof *res->B);
    if (!A || !B || !res->A || !res->B) {
        free(A);
        free(B);
        xp_svd_result_free(&r);
        xp_extract_result_free(res);
        return xp_fail("out of memory");
    }
    xp_svd_split(&r, m, n, rank, A, B);
    /* store in BF16, and measure the residual with what was stored */
    for (size_t i = 0; i < (size_t)rank * (size_t)n; i++) {
        res->A[i] = xp_f32_to_bf16(A[i]);
        A[i] = xp_bf16_to_f32(res->A[i]);
    }
    for (size_t i = 0; i < (size_t)m * (size_t)rank; i++) {
        res->B[i] = xp_f32_to_bf16(B[i]);
        B[i] = xp_bf16_to_f32(res->B[i]);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, rank, -1.0f, B, rank,
                A, (int)n, 1.0f, dw, (int)n);
    double kept = 0;
    for (int i = 0; i < rank; i++) kept += (double)r.s[i] * r.s[i];
    res->rank = rank;
    res->residual_norm = sqrt(xp_frob2(dw, el));
    res->energy = kept / total;
    res->sigma_max = r.s[0];
    res->sigma_min = r.s[rank - 1];
    res->used = r.used;
    res->gemm_flops = r.gemm_flops + 2.0 * (double)m * (double)n * rank;
    free(A);
    free(B);
    xp_svd_result_free(&r);
    return 0;
}

/* QR of the column-major rows x r matrix x: x becomes Q, r_out (r x r, column-major) gets R. */
static int xp_qr_keep_r(float *x, int64_t rows, int r, float *r_out)
{
    float *tau = malloc((size_t)r * sizeof *tau);
    if (!tau) return xp_fail("out of memory");
    lapack_int info = LAPACKE_sgeqrf(LAPACK_COL_MAJOR, (lapack_int)rows, r, x, (lapack_int)rows,
                                     tau);
    for (int j = 0; j < r; j++)
        for (int i = 0; i < r; i++) r_out[i + j * r] = i <= j ? x[i + j * rows] : 0.0f;
    if (info == 0)
        info = LAPACKE_sorgqr(LAPACK_COL_MAJOR, (lapack_int)rows, r, r, x, (lapack_int)rows, tau);
    free(tau);
    if (info != 0) return xp_fail("QR of a LoRA factor failed (LAPACK info %d)", (int)info);
    return 0;
}

int xp_lora_geometry_of(const float *n, int64_t m, int64_t cols, const float *A, const float *B,
                        int r, float scale, xp_lora_geometry *g)
{
    memset(g, 0, sizeof *g);
    if (r < 1 || r > m || r > cols)
        return xp_fail("LoRA rank %d does not fit a %lldx%lld module", r, (long long)m,
                       (long long)cols);
    size_t rr = (size_t)r * (size_t)r;
    float *qb = malloc((size_t)m * (size_t)r * sizeof *qb), *qa = malloc((size_t)cols * r * sizeof *qa);
    float *rb = malloc(rr * sizeof *rb), *ra = malloc(rr * sizeof *ra), *mm = malloc(rr * sizeof *mm);
    float *um = malloc(rr * sizeof *um), *vtm = malloc(rr * sizeof *vtm), *s = malloc((size_t)r * sizeof *s);
    float *ur = malloc((size_t)m * (size_t)r * sizeof *ur);
    float *p = malloc((size_t)r * (size_t)cols * sizeof *p);
    int rc = -1;
    if (!qb || !qa || !rb || !ra || !mm || !um || !vtm || !s || !ur || !p) {
        xp_fail("out of memory");
        goto done;
    }
    /* L = scale B A = scale Qb (Rb Ra^T) Qa^T: the r x r core's SVD gives L's singular values
     * and, through Qb, its left singular vectors */
    for (int64_t i = 0; i < m; i++)
        for (int j = 0; j < r; j++) qb[i + j * m] = B[i * r + j];
    memcpy(qa, A, (size_t)r * (size_t)cols * sizeof *qa); /* row-major A is column-major A^T */
    if (xp_qr_keep_r(qb, m, r, rb) < 0 || xp_qr_keep_r(qa, cols, r, ra) < 0) goto done;
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, r, r, r, 1.0f, rb, r, ra, r, 0.0f, mm, r);
    lapack_int info = LAPACKE_sgesdd(LAPACK_COL_MAJOR, 'A', r, r, mm, r, s, um, r, vtm, r);
    if (info != 0) {
        xp_fail("SVD of the LoRA core failed (LAPACK info %d)", (int)info);
        goto done;
    }
    double l2 = 0;
    for (int i = 0; i < r; i++) l2 += (double)s[i] * s[i];
    g->norm_l = fabs(scale) * sqrt(l2);
    int k = 0;
    while (k < r && s[k] > 1e-5f * s[0]) k++;
    g->rank = k;
    double n2 = xp_frob2(n, (size_t)(m * cols));
    g->norm_n = sqrt(n2);
    /* <L, N> = scale sum (B^T N) o A */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, (int)cols, (int)m, 1.0f, B, r, n,
                (int)cols, 0.0f, p, (int)cols);
    double dot = 0;
    for (size_t i = 0; i < (size_t)r * (size_t)cols; i++) dot += (double)p[i] * A[i];
    g->inner = scale * dot;
    g->cosine = g->norm_l > 0 && n2 > 0 ? g->inner / (g->norm_l * g->norm_n) : NAN;
    g->leakage_random = (double)k / (double)m;
    g->leakage = NAN;
    if (k > 0 && n2 > 0) {
        /* U_r = Qb Um[:, :k], column-major m x k, which is the row-major [k, m] U_r^T */
        cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)m, k, r, 1.0f, qb, (int)m, um,
                    r, 0.0f, ur, (int)m);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, (int)cols, (int)m, 1.0f, ur,
                    (int)m, n, (int)cols, 0.0f, p, (int)cols);
        g->leakage = xp_frob2(p, (size_t)k * (size_t)cols) / n2;
    }
    rc = 0;
done:
    free(qb);
    free(qa);
    free(rb);
    free(ra);
    free(mm);
    free(um);
    free(vtm);
    free(s);
    free(ur);
    free(p);
    return rc;
}
