/* Row-wise operations of the forward pass: the CPU versions are the references the CUDA kernels
 * are tested against (tests/gpu/). */
#include "cpu/ops.h"

#include <math.h>

/* y = x / sqrt(mean(x^2) + eps) * w, accumulated in double like a careful F32 reference. */
void xp_rmsnorm(const float *x, const float *w, int dim, float eps, float *y)
{
    double ss = 0;
    for (int i = 0; i < dim; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / dim + eps));
    for (int i = 0; i < dim; i++)
        y[i] = x[i] * r * w[i];
}

/* One position's RoPE table: cs[i] = cos(pos * inv_freq[i]) and cs[d/2 + i] the sine, for
 * i < d/2 (shared by every head and layer of the row). */
void xp_rope_table(int pos, const float *inv_freq, int d, float *cs)
{
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float a = (float)pos * inv_freq[i];
        cs[i] = cosf(a);
        cs[half + i] = sinf(a);
    }
}

/* Rotate-half RoPE on one head: pairs (i, i + d/2) turn by the table's angle i. */
void xp_rope(float *v, int d, const float *cs)
{
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float c = cs[i], s = cs[half + i], x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
    }
}
