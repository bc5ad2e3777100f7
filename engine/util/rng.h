/* Deterministic random numbers for synthetic models and randomized SVD: xoshiro256** seeded by
 * splitmix64, so a (seed, stream name) pair always gives the same numbers on every machine. */
#ifndef XP_RNG_H
#define XP_RNG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t s[4];
    int have_spare;
    float spare;
} xp_rng;

/* Seeds from a number and a stream name (e.g. the tensor's name), so streams are independent
 * of the order they are used in. */
void xp_rng_seed(xp_rng *r, uint64_t seed, const char *stream);
uint64_t xp_rng_u64(xp_rng *r);
/* Uniform in [0, 1). */
double xp_rng_uniform(xp_rng *r);
/* Standard normal. */
float xp_rng_normal(xp_rng *r);
void xp_rng_fill_normal(xp_rng *r, float *dst, size_t n, float mean, float std);

#endif
