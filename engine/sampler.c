#include "sampler.h"

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
            while (x[idx[i]] > pivot) i++;
            while (x[idx[j]] < pivot) j--;
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

int32_t xp_sample(float *logits, int vocab, const xp_sampling *s, xp_rng *rng, int32_t *idx)
{
    if (s->temperature <= 0) return xp_argmax(logits, vocab);
    int n = vocab;
    for (int i = 0; i < vocab; i++) idx[i] = i;
    if (s->top_k > 0 && s->top_k < n) {
        xp_select_top(logits, idx, n, s->top_k);
        n = s->top_k;
    }
    /* candidates largest first, ties by id, so a seed always picks the same token */
    qsort_r(idx, (size_t)n, sizeof *idx, xp_cmp_desc, logits);
    float mx = logits[idx[0]];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        float p = expf((logits[idx[i]] - mx) / s->temperature);
        logits[idx[i]] = p;
        sum += p;
    }
    if (s->top_p > 0 && s->top_p < 1) {
        double c = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            c += logits[idx[i]] / sum;
            if (c >= s->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        sum = 0;
        for (int i = 0; i < n; i++) sum += logits[idx[i]];
    }
    double u = xp_rng_uniform(rng) * sum, c = 0;
    for (int i = 0; i < n; i++) {
        c += logits[idx[i]];
        if (u < c) return idx[i];
    }
    return idx[n - 1];
}
