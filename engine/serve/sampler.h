/* Next-token sampling: greedy, temperature, top-k, top-p, from a seeded generator. */
#ifndef XP_SAMPLER_H
#define XP_SAMPLER_H

#include "util/rng.h"

#include <stdint.h>

typedef struct {
    float temperature; /* <= 0: greedy */
    int top_k;         /* <= 0: off */
    float top_p;       /* >= 1: off */
} xp_sampling;

/* Index of the largest logit; ties keep the lowest id (greedy decoding). */
int32_t xp_argmax(const float *x, int n);

/* Picks a token from logits [vocab] (modified in place). idx is scratch of vocab ints. */
int32_t xp_sample(float *logits, int vocab, const xp_sampling *s, xp_rng *rng, int32_t *idx);

#endif
