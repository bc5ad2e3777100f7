/* A LoRA adapter ready to run: A and B of every module in F32, with its scale. */
#ifndef XP_LORA_H
#define XP_LORA_H

#include "peft.h"

#define XP_MAX_LORA_RANK 256

typedef struct {
    float *A;  /* [rank, in] */
    float *B;  /* [out, rank], as stored */
    float *Bt; /* [rank, out]: the expand runs as rank contiguous axpys over the outputs */
    int rank;
    float scale;
} xp_lora_mat;

typedef struct {
    int n_layers;
    xp_lora_mat *mods; /* [n_layers * XP_MOD_COUNT]; rank 0 where the adapter has no module */
    int max_rank;
    size_t bytes;
} xp_lora_weights;

/* Loads and checks an adapter against a base config (shapes, rank <= 256). */
int xp_lora_load(const char *dir, const xp_qwen3_config *cfg, xp_lora_weights *out);
void xp_lora_free(xp_lora_weights *w);

static inline const xp_lora_mat *xp_lora_get(const xp_lora_weights *w, int layer, int mod)
{
    const xp_lora_mat *m = &w->mods[layer * XP_MOD_COUNT + mod];
    return m->rank ? m : NULL;
}

#endif
