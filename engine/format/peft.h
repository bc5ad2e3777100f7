/* PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors, as Hugging Face PEFT
 * saves them and vLLM loads them. Module tensors are named
 * base_model.model.model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,B}.weight
 * with A [r, in] and B [out, r]; the update is scale * B A, scale = alpha / r (or alpha / sqrt(r)
 * with use_rslora). target_modules is read as PEFT reads it: a list of module names or dotted
 * path suffixes, a regex string matched against the whole module path, or "all-linear". */
#ifndef XP_PEFT_H
#define XP_PEFT_H

#include "format/checkpoint.h"

typedef struct {
    int layer;
    xp_module mod;
    int rank;
    double alpha;
    float scale;
    const xp_tensor *A, *B;
} xp_lora_module;

typedef struct {
    char *dir;
    char *base_model; /* base_model_name_or_path, may be "" */
    int r;
    double alpha;
    int use_rslora;
    unsigned target_mask; /* bit m set: module m is targeted */
    xp_lora_module *mods; /* sorted by layer, then module */
    size_t n;
    xp_st_set *st;
} xp_peft;

/* Reads and validates an adapter directory: config fields and types, every tensor a known LoRA
 * pair with matching rank, no embeddings, lm_head, biases or modules_to_save, finite values. */
int xp_peft_open(const char *dir, xp_peft **out);
void xp_peft_close(xp_peft *p);
/* Checks the adapter against a base model: layers exist, shapes match the modules. */
int xp_peft_check_base(const xp_peft *p, const xp_qwen3_config *cfg);
/* The module (layer, m) or NULL. */
const xp_lora_module *xp_peft_find(const xp_peft *p, int layer, xp_module m);

/* One module to save: BF16 A [rank, in] and B [out, rank]. */
typedef struct {
    int layer;
    xp_module mod;
    int rank;
    double alpha;
    int64_t in, out;
    const uint16_t *A, *B;
} xp_lora_save;

/* Writes DIR/adapter_config.json and DIR/adapter_model.safetensors. r and lora_alpha are the most
 * common rank and alpha; modules that differ go to rank_pattern / alpha_pattern. */
int xp_peft_save(const char *dir, const char *base_model, const xp_lora_save *mods, size_t n,
                 int use_rslora);

#endif
