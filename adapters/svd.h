/* Truncated SVD of a row-major F32 matrix on LAPACK/BLAS: exact (sgesdd, all triplets computed,
 * the top k kept) or randomized (Halko, Martinsson & Tropp: a Gaussian test matrix with
 * oversampling, power iterations re-orthonormalized by QR, then the SVD of the small projection).
 * Both use every core through OpenBLAS; the randomized path is deterministic for a seed and an
 * RNG stream name. */
#ifndef XP_SVD_H
#define XP_SVD_H

#include <stddef.h>
#include <stdint.h>

typedef enum { XP_SVD_AUTO, XP_SVD_EXACT, XP_SVD_RANDOMIZED } xp_svd_method;

typedef struct {
    xp_svd_method method;
    int oversample;     /* randomized: extra test vectors beyond k (default 10) */
    int power_iters;    /* randomized: subspace iterations (default 2) */
    uint64_t seed;
    const char *stream; /* names the test matrix's RNG stream (a module path); may be NULL */
} xp_svd_opts;

typedef struct {
    int k;              /* triplets held */
    float *u;           /* [m, k] row-major, orthonormal columns */
    float *s;           /* [k], descending */
    float *vt;          /* [k, n] row-major, orthonormal rows */
    xp_svd_method used; /* EXACT or RANDOMIZED */
    double gemm_flops;  /* floating-point operations of the BLAS-3 products (0 for exact) */
} xp_svd_result;

void xp_svd_defaults(xp_svd_opts *o);
/* "auto", "exact", "randomized" */
const char *xp_svd_method_name(xp_svd_method m);
int xp_svd_method_parse(const char *s, xp_svd_method *out);

/* What AUTO becomes for a rank-k SVD of an m x n matrix: randomized when k + oversample is at
 * most a quarter of min(m, n), where it is both faster and accurate; exact otherwise. */
xp_svd_method xp_svd_resolve(int64_t m, int64_t n, int k, const xp_svd_opts *o);

/* The top min(k, m, n) singular triplets of a [m, n]; a is left unchanged. */
int xp_svd_top(const float *a, int64_t m, int64_t n, int k, const xp_svd_opts *o,
               xp_svd_result *out);
void xp_svd_result_free(xp_svd_result *r);

/* Squared Frobenius norm, accumulated in double. */
double xp_frob2(const float *a, size_t n);

/* Smallest k with s[0]^2 + ... + s[k-1]^2 >= frac * total (s descending); 0 when frac * total
 * is 0; -1 when the count values do not reach it. */
int xp_energy_rank(const float *s, int count, double total, double frac);

/* Orthonormalizes the columns of the column-major rows x cols matrix y in place (QR, Q kept). */
int xp_orthonormalize(float *y, int64_t rows, int cols);

#endif
