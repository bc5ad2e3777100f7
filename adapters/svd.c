#include "svd.h"
#include "util/rng.h"
#include "util/xp_error.h"

#include <cblas.h>
#include <lapacke.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* A row-major [m, n] matrix is, in memory, the column-major [n, m] matrix A^T: every LAPACK and
 * BLAS call below works on that view, so the (possibly 500 MB) input is never transposed. */

void xp_svd_defaults(xp_svd_opts *o)
{
    memset(o, 0, sizeof *o);
    o->method = XP_SVD_AUTO;
    o->oversample = 10;
    o->power_iters = 2;
}

const char *xp_svd_method_name(xp_svd_method m)
{
    return m == XP_SVD_EXACT ? "exact" : m == XP_SVD_RANDOMIZED ? "randomized" : "auto";
}

int xp_svd_method_parse(const char *s, xp_svd_method *out)
{
    for (int m = XP_SVD_AUTO; m <= XP_SVD_RANDOMIZED; m++)
        if (strcmp(s, xp_svd_method_name((xp_svd_method)m)) == 0) {
            *out = (xp_svd_method)m;
            return 0;
        }
    return -1;
}

xp_svd_method xp_svd_resolve(int64_t m, int64_t n, int k, const xp_svd_opts *o)
{
    if (o->method != XP_SVD_AUTO) return o->method;
    int64_t mn = m < n ? m : n;
    return 4 * ((int64_t)k + o->oversample) <= mn ? XP_SVD_RANDOMIZED : XP_SVD_EXACT;
}

double xp_frob2(const float *a, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * a[i];
    return s;
}

int xp_energy_rank(const float *s, int count, double total, double frac)
{
    double want = frac * total, acc = 0;
    if (!(want > 0)) return 0;
    for (int i = 0; i < count; i++) {
        acc += (double)s[i] * s[i];
        if (acc >= want) return i + 1;
    }
    return -1;
}

void xp_svd_result_free(xp_svd_result *r)
{
    free(r->u);
    free(r->s);
    free(r->vt);
    memset(r, 0, sizeof *r);
}

int xp_orthonormalize(float *y, int64_t rows, int cols)
{
    float *tau = malloc((size_t)cols * sizeof *tau);
    if (!tau) return xp_fail("out of memory");
    lapack_int info = LAPACKE_sgeqrf(LAPACK_COL_MAJOR, (lapack_int)rows, cols, y,
                                     (lapack_int)rows, tau);
    if (info == 0)
        info = LAPACKE_sorgqr(LAPACK_COL_MAJOR, (lapack_int)rows, cols, cols, y, (lapack_int)rows,
                              tau);
    free(tau);
    if (info != 0) return xp_fail("QR of a %lldx%d matrix failed (LAPACK info %d)",
                                  (long long)rows, cols, (int)info);
    return 0;
}

/* Thin SVD of the column-major rows x cols matrix x (destroyed): u [rows, mn] and vt [mn, cols]
 * column-major. sgesdd first; the slower but more robust sgesvd if it does not converge, on x
 * restored from orig (the caller's own copy of x, so a 500 MB input is not copied twice). */
static int xp_thin_svd(float *x, const float *orig, int64_t rows, int64_t cols, float *s, float *u,
                       float *vt)
{
    int64_t mn = rows < cols ? rows : cols;
    lapack_int info = LAPACKE_sgesdd(LAPACK_COL_MAJOR, 'S', (lapack_int)rows, (lapack_int)cols, x,
                                     (lapack_int)rows, s, u, (lapack_int)rows, vt, (lapack_int)mn);
    if (info > 0) {
        float *superb = malloc((size_t)mn * sizeof *superb);
        memcpy(x, orig, (size_t)(rows * cols) * sizeof *x);
        info = superb ? LAPACKE_sgesvd(LAPACK_COL_MAJOR, 'S', 'S', (lapack_int)rows,
                                       (lapack_int)cols, x, (lapack_int)rows, s, u,
                                       (lapack_int)rows, vt, (lapack_int)mn, superb)
                      : -1000;
        free(superb);
    }
    if (info != 0)
        return xp_fail("SVD of a %lldx%lld matrix failed (LAPACK info %d)", (long long)rows,
                       (long long)cols, (int)info);
    return 0;
}

static int xp_svd_exact(const float *a, int64_t m, int64_t n, int k, xp_svd_result *r)
{
    int64_t mn = m < n ? m : n;
    /* the column-major view A^T [n, m] = X; svd(X) = Ux S VTx, so U_A = VTx^T and Vt_A = Ux^T:
     * in memory VTx (mn x m, ld mn) is U_A row-major [m, mn] and Ux (n x mn) is Vt_A [mn, n] */
    float *x = malloc((size_t)(m * n) * sizeof *x), *s = malloc((size_t)mn * sizeof *s);
    float *ux = malloc((size_t)(n * mn) * sizeof *ux), *vtx = malloc((size_t)(mn * m) * sizeof *vtx);
    int rc = -1;
    if (!x || !s || !ux || !vtx) {
        xp_fail("out of memory");
        goto done;
    }
    memcpy(x, a, (size_t)(m * n) * sizeof *x);
    if (xp_thin_svd(x, a, n, m, s, ux, vtx) < 0) goto done;
    r->u = malloc((size_t)(m * k) * sizeof *r->u);
    if (!r->u) {
        xp_fail("out of memory");
        goto done;
    }
    for (int64_t i = 0; i < m; i++) memcpy(r->u + i * k, vtx + i * mn, (size_t)k * sizeof *r->u);
    r->vt = ux; /* its first k rows are the ones kept */
    ux = NULL;
    float *shrunk = realloc(r->vt, (size_t)(k * n) * sizeof *shrunk);
    if (shrunk) r->vt = shrunk;
    r->s = s;
    s = NULL;
    r->k = k;
    r->used = XP_SVD_EXACT;
    rc = 0;
done:
    free(x);
    free(s);
    free(ux);
    free(vtx);
    return rc;
}

/* Y [m, l] = A Z (Z [n, l]), and Z = A^T Y, both column-major, with A seen as A^T [n, m]. */
static void xp_mul_a(const float *a, int64_t m, int64_t n, int l, const float *z, float *y)
{
    cblas_sgemm(CblasColMajor, CblasTrans, CblasNoTrans, (int)m, l, (int)n, 1.0f, a, (int)n, z,
                (int)n, 0.0f, y, (int)m);
}

static void xp_mul_at(const float *a, int64_t m, int64_t n, int l, const float *y, float *z)
{
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)n, l, (int)m, 1.0f, a, (int)n, y,
                (int)m, 0.0f, z, (int)n);
}

static int xp_svd_randomized(const float *a, int64_t m, int64_t n, int k, const xp_svd_opts *o,
                             xp_svd_result *r)
{
    int64_t mn = m < n ? m : n;
    int l = (int)((int64_t)k + o->oversample < mn ? k + o->oversample : mn);
    float *y = malloc((size_t)(m * l) * sizeof *y), *z = malloc((size_t)(n * l) * sizeof *z);
    float *uz = malloc((size_t)(n * l) * sizeof *uz), *vtz = malloc((size_t)l * l * sizeof *vtz);
    float *s = malloc((size_t)l * sizeof *s), *zc = malloc((size_t)(n * l) * sizeof *zc);
    int rc = -1;
    if (!y || !z || !uz || !vtz || !s || !zc) {
        xp_fail("out of memory");
        goto done;
    }
    xp_rng g;
    xp_rng_seed(&g, o->seed, o->stream);
    xp_rng_fill_normal(&g, z, (size_t)(n * l), 0.0f, 1.0f); /* the test matrix Omega [n, l] */
    xp_mul_a(a, m, n, l, z, y);
    if (xp_orthonormalize(y, m, l) < 0) goto done;
    /* each iteration multiplies the spectrum's decay by (s_i/s_j)^2; the QR between products
     * keeps the small directions from drowning in float rounding */
    for (int it = 0; it < o->power_iters; it++) {
        xp_mul_at(a, m, n, l, y, z);
        if (xp_orthonormalize(z, n, l) < 0) goto done;
        xp_mul_a(a, m, n, l, z, y);
        if (xp_orthonormalize(y, m, l) < 0) goto done;
    }
    /* A ~ Q Q^T A and (Q^T A)^T = A^T Q = Z = Uz S Vz^T, so A ~ (Q Vz) S Uz^T */
    xp_mul_at(a, m, n, l, y, z);
    memcpy(zc, z, (size_t)(n * l) * sizeof *zc);
    if (xp_thin_svd(z, zc, n, l, s, uz, vtz) < 0) goto done;
    r->u = malloc((size_t)(m * k) * sizeof *r->u);
    if (!r->u) {
        xp_fail("out of memory");
        goto done;
    }
    /* U_A [m, k] row-major is the column-major [k, m] matrix VTz[:k, :] Q^T */
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, k, (int)m, l, 1.0f, vtz, l, y, (int)m,
                0.0f, r->u, k);
    /* Vt_A [k, n] row-major is Uz's first k columns, already in place */
    float *shrunk = realloc(uz, (size_t)(k * n) * sizeof *shrunk);
    r->vt = shrunk ? shrunk : uz;
    uz = NULL;
    r->s = s;
    s = NULL;
    r->k = k;
    r->used = XP_SVD_RANDOMIZED;
    r->gemm_flops = 2.0 * (double)m * (double)n * l * (2.0 * o->power_iters + 2.0) +
                    2.0 * (double)m * l * k;
    rc = 0;
done:
    free(y);
    free(z);
    free(uz);
    free(vtz);
    free(s);
    free(zc);
    return rc;
}

int xp_svd_top(const float *a, int64_t m, int64_t n, int k, const xp_svd_opts *o,
               xp_svd_result *out)
{
    memset(out, 0, sizeof *out);
    int64_t mn = m < n ? m : n;
    if (m < 1 || n < 1 || k < 1) return xp_fail("SVD of a %lldx%lld matrix at rank %d",
                                                (long long)m, (long long)n, k);
    /* LAPACK and CBLAS take int dimensions and leading dimensions */
    if (m > INT_MAX || n > INT_MAX || m * n > (int64_t)INT_MAX)
        return xp_fail("a %lldx%lld matrix is too large for the LAPACK interface",
                       (long long)m, (long long)n);
    if (k > mn) k = (int)mn;
    xp_svd_method how = xp_svd_resolve(m, n, k, o);
    int rc = how == XP_SVD_EXACT ? xp_svd_exact(a, m, n, k, out)
                                 : xp_svd_randomized(a, m, n, k, o, out);
    if (rc < 0) xp_svd_result_free(out);
    return rc;
}
