/* A LoRA adapter ready to run: A and B of every module with its scale. BF16 files stay BF16 in
 * memory (a third of F32 with a transposed copy, and half the bytes each step reads); F32 and
 * F16 files are held as F32 so no value changes. */
#ifndef XP_LORA_H
#define XP_LORA_H

#include "format/peft.h"

#define XP_MAX_LORA_RANK 256

typedef struct {
    xp_dtype dtype; /* XP_BF16 or XP_F32, for both A and Bt */
    void *A;        /* [rank, in] */
    void *Bt;       /* [rank, out]: B transposed, so the expand runs as rank contiguous axpys */
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
