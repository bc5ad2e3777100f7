#include "serve/sampler.h"

#include <math.h>
#include <stdlib.h>

int32_t xp_argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i; /* ties keep the lowest id */
    return best;
}

static int xp_cmp_desc(const void *a, const void *b, void *keys)
{
    const float *k = keys;
    float x = k[*(const int32_t *)a], y = k[*(const int32_t *)b];
    if (x != y) return x > y ? -1 : 1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* Moves the k largest entries to idx[0..k) (unordered) by quickselect. */
static void xp_select_top(const float *x, int32_t *idx, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = x[idx[(lo + hi) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (x[idx[i]] > pivot)
                i++;
            while (x[idx[j]] < pivot)
                j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i++] = idx[j];
                idx[j--] = t;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

/* Descending by p, ties by id, the first n of idx. */
static void xp_sort_desc(float *p, int32_t *idx, int n)
{
    qsort_r(idx, (size_t)n, sizeof *idx, xp_cmp_desc, p);
}

/* Draws from idx[0..n) with weights p[idx[i]], scanning in idx order. */
static int32_t xp_draw(const float *p, const int32_t *idx, int n, xp_rng *rng)
{
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += p[idx[i]];
    double u = xp_rng_uniform(rng) * sum, c = 0;
    for (int i = 0; i < n; i++) {
        c += p[idx[i]];
        if (u < c) return idx[i];
    }
    return idx[n - 1];
}

/* Why no full sort: with Qwen's 151936 tokens a sort costs some 10 ms a token, as much as a
 * decode step. Plain temperature sampling draws in id order; top-k sorts only its k; top-p sorts
 * a growing head until it holds the nucleus (usually a few hundred tokens). */
int32_t xp_sample(float *logits, int vocab, const xp_sampling *s, xp_rng *rng, int32_t *idx)
{
    if (s->temperature <= 0) return xp_argmax(logits, vocab);
    int n = vocab;
    for (int i = 0; i < vocab; i++)
        idx[i] = i;
    if (s->top_k > 0 && s->top_k < n) {
        xp_select_top(logits, idx, n, s->top_k);
        n = s->top_k;
    }
    /* weights exp((l - max) / T), in place */
    float mx = logits[xp_argmax(logits, vocab)];
    double total = 0;
    for (int i = 0; i < n; i++) {
        float p = expf((logits[idx[i]] - mx) / s->temperature);
        logits[idx[i]] = p;
        total += p;
    }
    int top_p = s->top_p > 0 && s->top_p < 1;
    if (!top_p) {
        if (n < vocab) xp_sort_desc(logits, idx, n); /* top-k: a fixed order for the seed */
        return xp_draw(logits, idx, n, rng);
    }
    /* the nucleus: the shortest run of the most likely tokens holding top_p of the mass */
    double want = s->top_p * total;
    for (int head = n < 256 ? n : 256;; head = head * 4 < n ? head * 4 : n) {
        if (head < n) xp_select_top(logits, idx, n, head);
        xp_sort_desc(logits, idx, head);
        double c = 0;
        for (int i = 0; i < head; i++) {
            c += logits[idx[i]];
            if (c >= want) return xp_draw(logits, idx, i + 1, rng);
        }
        if (head == n) return xp_draw(logits, idx, n, rng);
    }
}
