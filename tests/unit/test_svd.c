/* Truncated SVD and LoRA extraction on planted matrices with known singular values: the exact
 * and randomized paths agree with the construction, the randomized one is deterministic for a
 * seed, energy mode picks the smallest rank, and the sqrt(S) split reproduces the truncation. */
#include "testutil.h"

#include "lora_extract.h"
#include "svd.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>

/* Row-major [m, n] = U diag(s) V^T + noise * G with U, V random orthonormal (r columns) and G
 * Gaussian scaled to ||G|| = 1. */
static float *planted(int64_t m, int64_t n, const double *s, int r, double noise, uint64_t seed)
{
    tu_rng g;
    tu_rng_seed(&g, seed);
    float *u = malloc((size_t)(m * r) * sizeof *u), *v = malloc((size_t)(n * r) * sizeof *v);
    float *a = malloc((size_t)(m * n) * sizeof *a);
    assert_true(u && v && a);
    for (int64_t i = 0; i < m * r; i++) u[i] = (float)tu_rng_normal(&g);
    for (int64_t i = 0; i < n * r; i++) v[i] = (float)tu_rng_normal(&g);
    assert_int_equal(xp_orthonormalize(u, m, r), 0);
    assert_int_equal(xp_orthonormalize(v, n, r), 0);
    for (int i = 0; i < r; i++)
        for (int64_t j = 0; j < n; j++) v[i * n + j] *= (float)s[i];
    /* the row-major A is the column-major A^T = (V S) U^T */
    cblas_sgemm(CblasColMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, r, 1.0f, v, (int)n, u,
                (int)m, 0.0f, a, (int)n);
    if (noise > 0) {
        float *e = malloc((size_t)(m * n) * sizeof *e);
        assert_non_null(e);
        for (int64_t i = 0; i < m * n; i++) e[i] = (float)tu_rng_normal(&g);
        double f = noise / sqrt(xp_frob2(e, (size_t)(m * n)));
        for (int64_t i = 0; i < m * n; i++) a[i] += (float)(f * e[i]);
        free(e);
    }
    free(u);
    free(v);
    return a;
}

/* ||A - U diag(s) Vt|| over the first k triplets. */
static double trunc_residual(const float *a, int64_t m, int64_t n, const xp_svd_result *r, int k)
{
    double acc = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double x = a[i * n + j];
            for (int t = 0; t < k; t++) x -= (double)r->u[i * r->k + t] * r->s[t] * r->vt[t * n + j];
            acc += x * x;
        }
    return sqrt(acc);
}

/* max |Q^T Q - I| over the k columns of u (stride ld) or the k rows of vt. */
static double orth_error(const float *x, int64_t len, int k, int rows_are_vectors, int64_t ld)
{
    double worst = 0;
    for (int p = 0; p < k; p++)
        for (int q = 0; q < k; q++) {
            double d = 0;
            for (int64_t i = 0; i < len; i++)
                d += rows_are_vectors ? (double)x[p * len + i] * x[q * len + i]
                                      : (double)x[i * ld + p] * x[i * ld + q];
            d -= p == q;
            if (fabs(d) > worst) worst = fabs(d);
        }
    return worst;
}

static xp_svd_opts opts(xp_svd_method m, uint64_t seed)
{
    xp_svd_opts o;
    xp_svd_defaults(&o);
    o.method = m;
    o.seed = seed;
    o.stream = "test";
    return o;
}

static void check_planted(xp_svd_method how, int64_t m, int64_t n)
{
    const double s[5] = {10, 7, 5, 3, 1};
    float *a = planted(m, n, s, 5, 0, 1);
    xp_svd_opts o = opts(how, 5);
    xp_svd_result r;
    assert_int_equal(xp_svd_top(a, m, n, 8, &o, &r), 0);
    assert_int_equal(r.k, 8);
    assert_int_equal(r.used, how);
    for (int i = 0; i < 5; i++) assert_true(fabs(r.s[i] - s[i]) < 1e-4 * s[0]);
    for (int i = 5; i < 8; i++) assert_true(r.s[i] < 1e-4 * s[0]);
    assert_true(orth_error(r.u, m, 5, 0, r.k) < 1e-4);
    assert_true(orth_error(r.vt, n, 5, 1, n) < 1e-4);
    assert_true(trunc_residual(a, m, n, &r, 5) < 1e-5 * sqrt(184.0));
    xp_svd_result_free(&r);
    free(a);
}

static void test_exact_wide(void **st)
{
    (void)st;
    check_planted(XP_SVD_EXACT, 60, 90);
}

static void test_exact_tall(void **st)
{
    (void)st;
    check_planted(XP_SVD_EXACT, 130, 40);
}

static void test_randomized_wide(void **st)
{
    (void)st;
    check_planted(XP_SVD_RANDOMIZED, 120, 300);
}

static void test_randomized_tall(void **st)
{
    (void)st;
    check_planted(XP_SVD_RANDOMIZED, 300, 120);
}

/* With a noise floor the truncation is no longer exact: randomized must match exact's optimal
 * (Eckart-Young) residual and singular values closely. */
static void test_randomized_matches_exact_with_noise(void **st)
{
    (void)st;
    const double s[6] = {20, 15, 11, 8, 6, 4};
    int64_t m = 256, n = 400;
    float *a = planted(m, n, s, 6, 0.5, 2);
    xp_svd_opts oe = opts(XP_SVD_EXACT, 0), orand = opts(XP_SVD_RANDOMIZED, 9);
    xp_svd_result e, r;
    assert_int_equal(xp_svd_top(a, m, n, 6, &oe, &e), 0);
    assert_int_equal(xp_svd_top(a, m, n, 6, &orand, &r), 0);
    for (int i = 0; i < 6; i++) assert_true(fabs(r.s[i] - e.s[i]) < 1e-3 * e.s[i]);
    double re = trunc_residual(a, m, n, &e, 6), rr = trunc_residual(a, m, n, &r, 6);
    assert_true(rr >= re * (1 - 1e-4));
    assert_true(rr <= re * (1 + 1e-3));
    assert_true(r.gemm_flops > 0);
    xp_svd_result_free(&e);
    xp_svd_result_free(&r);
    free(a);
}

static void test_randomized_is_deterministic(void **st)
{
    (void)st;
    const double s[3] = {5, 4, 3};
    int64_t m = 200, n = 150;
    float *a = planted(m, n, s, 3, 0.1, 3);
    xp_svd_opts o = opts(XP_SVD_RANDOMIZED, 42);
    xp_svd_result x, y, z;
    assert_int_equal(xp_svd_top(a, m, n, 3, &o, &x), 0);
    assert_int_equal(xp_svd_top(a, m, n, 3, &o, &y), 0);
    o.seed = 43;
    assert_int_equal(xp_svd_top(a, m, n, 3, &o, &z), 0);
    assert_memory_equal(x.u, y.u, (size_t)(m * 3) * sizeof(float));
    assert_memory_equal(x.vt, y.vt, (size_t)(n * 3) * sizeof(float));
    assert_memory_equal(x.s, y.s, 3 * sizeof(float));
    assert_memory_not_equal(x.vt, z.vt, (size_t)(n * 3) * sizeof(float));
    for (int i = 0; i < 3; i++) assert_true(fabs(x.s[i] - z.s[i]) < 1e-3 * s[0]);
    xp_svd_result_free(&x);
    xp_svd_result_free(&y);
    xp_svd_result_free(&z);
    free(a);
}

static void test_resolve_and_names(void **st)
{
    (void)st;
    xp_svd_opts o = opts(XP_SVD_AUTO, 0);
    assert_int_equal(xp_svd_resolve(5120, 25600, 256, &o), XP_SVD_RANDOMIZED);
    assert_int_equal(xp_svd_resolve(320, 800, 128, &o), XP_SVD_EXACT);
    assert_int_equal(xp_svd_resolve(1024, 3072, 16, &o), XP_SVD_RANDOMIZED);
    o.method = XP_SVD_EXACT;
    assert_int_equal(xp_svd_resolve(5120, 25600, 4, &o), XP_SVD_EXACT);
    xp_svd_method m;
    assert_int_equal(xp_svd_method_parse("randomized", &m), 0);
    assert_int_equal(m, XP_SVD_RANDOMIZED);
    assert_int_equal(xp_svd_method_parse("fast", &m), -1);
}

static void test_energy_rank(void **st)
{
    (void)st;
    const float s[4] = {3, 2, 1, 0.5f}; /* energies 9, 4, 1, 0.25 of 14.25 */
    assert_int_equal(xp_energy_rank(s, 4, 14.25, 9 / 14.25), 1);
    assert_int_equal(xp_energy_rank(s, 4, 14.25, 9.01 / 14.25), 2);
    assert_int_equal(xp_energy_rank(s, 4, 14.25, 0.98), 3);
    assert_int_equal(xp_energy_rank(s, 4, 14.25, 1.0), 4);
    assert_int_equal(xp_energy_rank(s, 2, 14.25, 0.98), -1);
    assert_int_equal(xp_energy_rank(s, 4, 0, 0.5), 0);
}

/* Energies 64, 16, 4, 1, 0.25 of 85.25: 0.9 needs 2 values (80), 0.95 needs 3 (84). */
static void check_energy_extract(xp_svd_method how, double frac, int want)
{
    const double s[5] = {8, 4, 2, 1, 0.5};
    int64_t m = 300, n = 280;
    float *a = planted(m, n, s, 5, 0, 4);
    xp_extract_opts o = {.energy = frac};
    o.svd = opts(how, 1);
    xp_extract_result r;
    assert_int_equal(xp_extract_lora(a, m, n, &o, &r), 0);
    assert_int_equal(r.rank, want);
    if (how != XP_SVD_AUTO) assert_int_equal(r.used, how);
    double kept = 0;
    for (int i = 0; i < want; i++) kept += s[i] * s[i];
    assert_true(fabs(r.energy - kept / 85.25) < 1e-4);
    xp_extract_result_free(&r);
    free(a);
}

static void test_energy_picks_smallest_rank(void **st)
{
    (void)st;
    check_energy_extract(XP_SVD_EXACT, 0.9, 2);
    check_energy_extract(XP_SVD_EXACT, 0.95, 3);
    check_energy_extract(XP_SVD_RANDOMIZED, 0.9, 2);
    check_energy_extract(XP_SVD_RANDOMIZED, 0.95, 3);
    check_energy_extract(XP_SVD_AUTO, 0.999, 5);
}

/* Energy mode past the first randomized round: 100 equal values need rank > 64. */
static void test_energy_grows_the_rank(void **st)
{
    (void)st;
    int64_t m = 600, n = 700;
    double s[100];
    for (int i = 0; i < 100; i++) s[i] = 1.0;
    float *a = planted(m, n, s, 100, 0, 5);
    xp_extract_opts o = {.energy = 0.995};
    o.svd = opts(XP_SVD_RANDOMIZED, 1);
    xp_extract_result r;
    assert_int_equal(xp_extract_lora(a, m, n, &o, &r), 0);
    assert_true(r.rank >= 100 && r.rank <= 101);
    assert_true(r.residual_norm < 0.01 * r.delta_norm);
    xp_extract_result_free(&r);
    o.max_rank = 40;
    float *b = planted(m, n, s, 100, 0, 5);
    assert_int_equal(xp_extract_lora(b, m, n, &o, &r), 0);
    assert_int_equal(r.rank, 40);
    assert_true(fabs(r.energy - 0.4) < 1e-3);
    xp_extract_result_free(&r);
    free(a);
    free(b);
}

/* B A with B = U sqrt(S), A = sqrt(S) Vt equals U S Vt; each factor carries sqrt(s_i); the
 * stored BF16 factors leave the optimal residual plus BF16 rounding only. */
static void test_sqrt_split(void **st)
{
    (void)st;
    const double s[6] = {9, 6, 4, 2, 1, 0.5};
    int64_t m = 70, n = 110;
    float *a = planted(m, n, s, 6, 0, 6);
    xp_svd_opts so = opts(XP_SVD_EXACT, 0);
    xp_svd_result r;
    assert_int_equal(xp_svd_top(a, m, n, 4, &so, &r), 0);
    float *A = malloc((size_t)(4 * n) * sizeof *A), *B = malloc((size_t)(m * 4) * sizeof *B);
    assert_true(A && B);
    xp_svd_split(&r, m, n, 4, A, B);
    double worst = 0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double ba = 0, usv = 0;
            for (int t = 0; t < 4; t++) {
                ba += (double)B[i * 4 + t] * A[t * n + j];
                usv += (double)r.u[i * r.k + t] * r.s[t] * r.vt[t * n + j];
            }
            if (fabs(ba - usv) > worst) worst = fabs(ba - usv);
        }
    assert_true(worst < 1e-5);
    for (int t = 0; t < 4; t++) {
        double na = 0, nb = 0;
        for (int64_t j = 0; j < n; j++) na += (double)A[t * n + j] * A[t * n + j];
        for (int64_t i = 0; i < m; i++) nb += (double)B[i * 4 + t] * B[i * 4 + t];
        assert_true(fabs(na - s[t]) < 1e-4 * s[t] && fabs(nb - s[t]) < 1e-4 * s[t]);
    }
    xp_svd_result_free(&r);
    free(A);
    free(B);

    xp_extract_opts o = {.rank = 4};
    o.svd = opts(XP_SVD_EXACT, 0);
    xp_extract_result x;
    assert_int_equal(xp_extract_lora(a, m, n, &o, &x), 0);
    double optimal = sqrt(1 + 0.25), total = sqrt(81 + 36 + 16 + 4 + 1 + 0.25);
    assert_true(fabs(x.delta_norm - total) < 1e-4 * total);
    assert_true(x.residual_norm >= optimal * (1 - 1e-4));
    assert_true(x.residual_norm <= optimal + 0x1p-8 * total);
    assert_non_null(x.A);
    assert_non_null(x.B);
    xp_extract_result_free(&x);
    free(a);
}

static void test_zero_and_rank_cap(void **st)
{
    (void)st;
    float *z = calloc(40 * 30, sizeof *z);
    assert_non_null(z);
    xp_extract_opts o = {.rank = 8};
    o.svd = opts(XP_SVD_AUTO, 0);
    xp_extract_result r;
    assert_int_equal(xp_extract_lora(z, 40, 30, &o, &r), 0);
    assert_int_equal(r.rank, 0);
    assert_null(r.A);
    free(z);

    const double s[3] = {3, 2, 1};
    float *a = planted(12, 9, s, 3, 0.01, 7);
    o.rank = 50; /* more than min(m, n) = 9 */
    assert_int_equal(xp_extract_lora(a, 12, 9, &o, &r), 0);
    assert_int_equal(r.rank, 9);
    assert_true(r.residual_norm < 0x1p-7 * r.delta_norm);
    xp_extract_result_free(&r);
    free(a);

    xp_svd_result sr;
    xp_svd_opts so = opts(XP_SVD_AUTO, 0);
    float one = 1;
    assert_int_equal(xp_svd_top(&one, 1, 1, 0, &so, &sr), -1);
    assert_error_contains("rank 0");
}

/* Geometry of a known pair: L = the top-r part of N itself has cosine sqrt(share) and leakage
 * share (share = captured energy); with scale -1 the cosine flips sign. */
static void test_geometry_known_pair(void **st)
{
    (void)st;
    const double s[4] = {6, 4, 3, 2};
    int64_t m = 90, n = 120;
    float *noise = planted(m, n, s, 4, 2.0, 8);
    double n2 = xp_frob2(noise, (size_t)(m * n));
    xp_svd_opts so = opts(XP_SVD_EXACT, 0);
    xp_svd_result r;
    assert_int_equal(xp_svd_top(noise, m, n, 3, &so, &r), 0);
    float *A = malloc((size_t)(3 * n) * sizeof *A), *B = malloc((size_t)(m * 3) * sizeof *B);
    assert_true(A && B);
    xp_svd_split(&r, m, n, 3, A, B);
    double share = 0;
    for (int i = 0; i < 3; i++) share += (double)r.s[i] * r.s[i];
    share /= n2;
    xp_lora_geometry g;
    assert_int_equal(xp_lora_geometry_of(noise, m, n, A, B, 3, 1.0f, &g), 0);
    assert_int_equal(g.rank, 3);
    assert_true(fabs(g.cosine - sqrt(share)) < 1e-4);
    assert_true(fabs(g.leakage - share) < 1e-4);
    assert_true(fabs(g.norm_n - sqrt(n2)) < 1e-5 * sqrt(n2));
    assert_true(fabs(g.norm_l - sqrt(share * n2)) < 1e-4 * g.norm_l);
    assert_true(fabs(g.leakage_random - 3.0 / 90) < 1e-12);
    assert_int_equal(xp_lora_geometry_of(noise, m, n, A, B, 3, -2.0f, &g), 0);
    assert_true(fabs(g.cosine + sqrt(share)) < 1e-4);
    assert_true(fabs(g.norm_l - 2 * sqrt(share * n2)) < 1e-4 * g.norm_l);
    xp_svd_result_free(&r);
    free(A);
    free(B);
    free(noise);
}

/* Gaussian noise against an unrelated random rank-r adapter: cosine ~ 0, leakage ~ r / d_out. */
static void test_geometry_random_noise(void **st)
{
    (void)st;
    int64_t m = 400, n = 500;
    int rk = 20;
    tu_rng g0;
    tu_rng_seed(&g0, 99);
    float *noise = malloc((size_t)(m * n) * sizeof *noise);
    float *A = malloc((size_t)(rk * n) * sizeof *A), *B = malloc((size_t)(m * rk) * sizeof *B);
    assert_true(noise && A && B);
    for (int64_t i = 0; i < m * n; i++) noise[i] = (float)tu_rng_normal(&g0);
    for (int64_t i = 0; i < rk * n; i++) A[i] = (float)tu_rng_normal(&g0);
    for (int64_t i = 0; i < m * rk; i++) B[i] = (float)tu_rng_normal(&g0);
    xp_lora_geometry g;
    assert_int_equal(xp_lora_geometry_of(noise, m, n, A, B, rk, 0.5f, &g), 0);
    assert_int_equal(g.rank, rk);
    /* cosine of independent Gaussian matrices: std about 1/sqrt(m n) */
    assert_true(fabs(g.cosine) < 5.0 / sqrt((double)(m * n)));
    /* leakage: a chi^2 with rk n degrees of freedom over one with m n, relative std ~ 1/sqrt(rk n) */
    assert_true(fabs(g.leakage / g.leakage_random - 1) < 5.0 / sqrt((double)(rk * n)));
    assert_int_equal(xp_lora_geometry_of(noise, m, n, A, B, 600, 1.0f, &g), -1);
    assert_error_contains("does not fit");
    memset(noise, 0, (size_t)(m * n) * sizeof *noise);
    assert_int_equal(xp_lora_geometry_of(noise, m, n, A, B, rk, 1.0f, &g), 0);
    assert_true(isnan(g.cosine) && isnan(g.leakage) && g.norm_n == 0);
    free(noise);
    free(A);
    free(B);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_wide),
        cmocka_unit_test(test_exact_tall),
        cmocka_unit_test(test_randomized_wide),
        cmocka_unit_test(test_randomized_tall),
        cmocka_unit_test(test_randomized_matches_exact_with_noise),
        cmocka_unit_test(test_randomized_is_deterministic),
        cmocka_unit_test(test_resolve_and_names),
        cmocka_unit_test(test_energy_rank),
        cmocka_unit_test(test_energy_picks_smallest_rank),
        cmocka_unit_test(test_energy_grows_the_rank),
        cmocka_unit_test(test_sqrt_split),
        cmocka_unit_test(test_zero_and_rank_cap),
        cmocka_unit_test(test_geometry_known_pair),
        cmocka_unit_test(test_geometry_random_noise),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
