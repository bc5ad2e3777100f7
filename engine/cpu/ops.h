/* Row-wise operations of the Qwen3 forward pass. */
#ifndef XP_OPS_H
#define XP_OPS_H

/* y = x / sqrt(mean(x^2) + eps) * w over dim values (y may be x). */
void xp_rmsnorm(const float *x, const float *w, int dim, float eps, float *y);
/* A position's RoPE table, d floats: cos then sin of pos * inv_freq[i] for i < d/2. */
void xp_rope_table(int pos, const float *inv_freq, int d, float *cs);
/* Rotate-half RoPE on one head of d values, by its row's table. */
void xp_rope(float *v, int d, const float *cs);

#endif
