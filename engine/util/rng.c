#include "util/rng.h"

#include <math.h>

static uint64_t xp_splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void xp_rng_seed(xp_rng *r, uint64_t seed, const char *stream)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a of the stream name */
    for (const unsigned char *p = (const unsigned char *)(stream ? stream : ""); *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    uint64_t x = seed ^ h;
    for (int i = 0; i < 4; i++) r->s[i] = xp_splitmix64(&x);
    r->have_spare = 0;
}

static inline uint64_t xp_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t xp_rng_u64(xp_rng *r)
{
    uint64_t *s = r->s, out = xp_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = xp_rotl(s[3], 45);
    return out;
}

double xp_rng_uniform(xp_rng *r)
{
    return (double)(xp_rng_u64(r) >> 11) * 0x1.0p-53;
}

float xp_rng_normal(xp_rng *r)
{
    if (r->have_spare) {
        r->have_spare = 0;
        return r->spare;
    }
    /* Box-Muller on (0, 1] x [0, 1): never log(0) */
    double u = 1.0 - xp_rng_uniform(r), v = xp_rng_uniform(r);
    double m = sqrt(-2.0 * log(u)), a = 6.283185307179586 * v;
    r->spare = (float)(m * sin(a));
    r->have_spare = 1;
    return (float)(m * cos(a));
}

void xp_rng_fill_normal(xp_rng *r, float *dst, size_t n, float mean, float std)
{
    for (size_t i = 0; i < n; i++) dst[i] = mean + std * xp_rng_normal(r);
}
