/* Row-wise operations of the Qwen3 forward pass. */
#ifndef XP_OPS_H
#define XP_OPS_H

/* y = x / sqrt(mean(x^2) + eps) * w over dim values (y may be x). */
void xp_rmsnorm(const float *x, const float *w, int dim, float eps, float *y);
/* Rotate-half RoPE on one head of d values at position pos. */
void xp_rope(float *v, int d, int pos, const float *inv_freq);

#endif
