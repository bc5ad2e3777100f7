/* Next-token sampling: greedy, temperature, top-k and top-p draw from the distributions they
 * promise, checked by counting draws against probabilities computed here, and the nucleus on a
 * Qwen-sized vocabulary against a brute-force sort. */
#include "testutil.h"

#include "serve/sampler.h"

#include <math.h>
#include <stdlib.h>

#define DRAWS 40000

/* Draw counts for logits (copied afresh each draw: xp_sample works in place). */
static void count_draws(const float *logits, int vocab, xp_sampling s, int *counts)
{
    float *work = malloc((size_t)vocab * sizeof *work);
    int32_t *idx = malloc((size_t)vocab * sizeof *idx);
    xp_rng r;
    xp_rng_seed(&r, 11, "test-sampler");
    memset(counts, 0, (size_t)vocab * sizeof *counts);
    for (int d = 0; d < DRAWS; d++) {
        memcpy(work, logits, (size_t)vocab * sizeof *work);
        int32_t t = xp_sample(work, vocab, &s, &r, idx);
        assert_true(t >= 0 && t < vocab);
        counts[t]++;
    }
    free(work);
    free(idx);
}

/* Each observed share within 4.5 standard errors of the expected one. */
static void assert_shares(const int *counts, const double *want, int vocab)
{
    for (int i = 0; i < vocab; i++) {
        double got = (double)counts[i] / DRAWS, se = sqrt(want[i] * (1 - want[i]) / DRAWS);
        if (want[i] == 0) {
            assert_int_equal(counts[i], 0);
        } else if (fabs(got - want[i]) > 4.5 * se + 1e-9) {
            fail_msg("token %d drawn %.4f of the time, expected %.4f", i, got, want[i]);
        }
    }
}

static void test_greedy(void **state)
{
    float l[] = {0.5f, 2.0f, -1.0f, 2.0f};
    int32_t idx[4];
    xp_rng r;
    xp_rng_seed(&r, 1, "g");
    xp_sampling s = {0, 0, 1};
    assert_int_equal(xp_sample(l, 4, &s, &r, idx), 1); /* ties keep the lowest id */
    assert_int_equal(xp_argmax(l, 4), 1);
}

static void test_temperature_matches_softmax(void **state)
{
    const float p[] = {0.4f, 0.3f, 0.2f, 0.08f, 0.02f};
    float l[5];
    for (int i = 0; i < 5; i++)
        l[i] = logf(p[i]);
    int counts[5];
    /* T = 1: the probabilities themselves */
    count_draws(l, 5, (xp_sampling){1.0f, 0, 1}, counts);
    double want[5];
    for (int i = 0; i < 5; i++)
        want[i] = p[i];
    assert_shares(counts, want, 5);
    /* T = 0.5: p^2, renormalized */
    count_draws(l, 5, (xp_sampling){0.5f, 0, 1}, counts);
    double z = 0;
    for (int i = 0; i < 5; i++)
        z += (double)p[i] * p[i];
    for (int i = 0; i < 5; i++)
        want[i] = (double)p[i] * p[i] / z;
    assert_shares(counts, want, 5);
}

static void test_top_k_and_top_p(void **state)
{
    const float p[] = {0.15f, 0.5f, 0.05f, 0.3f};
    float l[4];
    for (int i = 0; i < 4; i++)
        l[i] = logf(p[i]);
    int counts[4];
    /* top-k 2: tokens 1 and 3 only, 0.5 : 0.3 */
    count_draws(l, 4, (xp_sampling){1.0f, 2, 1}, counts);
    assert_shares(counts, (double[]){0, 0.625, 0, 0.375}, 4);
    /* top-p 0.75: 0.5 is short of it, 0.5 + 0.3 reaches it */
    count_draws(l, 4, (xp_sampling){1.0f, 0, 0.75f}, counts);
    assert_shares(counts, (double[]){0, 0.625, 0, 0.375}, 4);
    /* top-p 0.5: the first token alone holds it */
    count_draws(l, 4, (xp_sampling){1.0f, 0, 0.5f}, counts);
    assert_shares(counts, (double[]){0, 1, 0, 0}, 4);
    /* both: top-k 3 then 0.9 of that mass (0.5 + 0.3 of 0.95 = 0.84 < 0.9) */
    count_draws(l, 4, (xp_sampling){1.0f, 3, 0.9f}, counts);
    assert_shares(counts, (double[]){0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95}, 4);
}

static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y;
}

/* On a 151936-token vocabulary with a wide nucleus (thousands of tokens, more than the first
 * head the sampler sorts), every draw falls inside the nucleus a full sort gives. */
static void test_nucleus_on_a_large_vocabulary(void **state)
{
    const int vocab = 151936;
    float *l = malloc(vocab * sizeof *l), *work = malloc(vocab * sizeof *work);
    int32_t *idx = malloc(vocab * sizeof *idx);
    double *p = malloc(vocab * sizeof *p), *sorted = malloc(vocab * sizeof *sorted);
    tu_rng g;
    tu_rng_seed(&g, 3);
    for (int i = 0; i < vocab; i++)
        l[i] = (float)(2.0 * tu_rng_normal(&g));
    for (int pass = 0; pass < 2; pass++) {
        float top_p = pass ? 0.3f : 0.95f;
        double mx = -INFINITY, z = 0;
        for (int i = 0; i < vocab; i++)
            mx = fmax(mx, l[i]);
        for (int i = 0; i < vocab; i++)
            z += p[i] = exp(l[i] - mx);
        memcpy(sorted, p, vocab * sizeof *p);
        qsort(sorted, vocab, sizeof *sorted, cmp_desc);
        double c = 0, cut = 0;
        int size = 0;
        while (c < top_p * z)
            c += cut = sorted[size++];
        assert_true(size > 256); /* the sampler must grow its head past the first guess */
        /* the share of the nucleus's mass beyond its 256 most likely tokens: draws must land
         * there as often, or the sampler cut the nucleus short */
        double beyond = 0;
        for (int i = 256; i < size; i++)
            beyond += sorted[i];
        beyond /= c;
        xp_rng r;
        xp_rng_seed(&r, 5, "nucleus");
        xp_sampling s = {1.0f, 0, top_p};
        int n = 200, out = 0;
        for (int d = 0; d < n; d++) {
            memcpy(work, l, vocab * sizeof *work);
            int32_t t = xp_sample(work, vocab, &s, &r, idx);
            assert_true(t >= 0 && t < vocab);
            /* inside: at least as likely as the nucleus's least likely member (with slack for
             * float against double) */
            assert_true(p[t] >= cut * (1 - 1e-5));
            out += p[t] < sorted[255];
        }
        double se = sqrt(beyond * (1 - beyond) / n);
        if (fabs((double)out / n - beyond) > 4.5 * se)
            fail_msg("%d of %d draws beyond the top 256, expected a share of %.3f", out, n, beyond);
    }
    free(l);
    free(work);
    free(idx);
    free(p);
    free(sorted);
}

static void test_same_seed_same_tokens(void **state)
{
    const int vocab = 1000;
    float l[1000], work[1000];
    int32_t idx[1000], a[50], b[50];
    for (int i = 0; i < vocab; i++)
        l[i] = sinf((float)i) * 3;
    xp_sampling modes[] = {{0.8f, 0, 1}, {0.8f, 40, 1}, {0.8f, 0, 0.9f}, {1.2f, 100, 0.8f}};
    for (int m = 0; m < 4; m++) {
        for (int run = 0; run < 2; run++) {
            xp_rng r;
            xp_rng_seed(&r, 42, "same");
            for (int d = 0; d < 50; d++) {
                memcpy(work, l, sizeof l);
                (run ? b : a)[d] = xp_sample(work, vocab, &modes[m], &r, idx);
            }
        }
        assert_memory_equal(a, b, sizeof a);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_temperature_matches_softmax),
        cmocka_unit_test(test_top_k_and_top_p),
        cmocka_unit_test(test_nucleus_on_a_large_vocabulary),
        cmocka_unit_test(test_same_seed_same_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
