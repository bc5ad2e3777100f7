/* A Hugging Face Qwen3 checkpoint directory: config.json plus safetensors (single or sharded),
 * with its weights in BF16/F16/F32 or FP8 E4M3 blocks (Qwen native or compressed-tensors). */
#ifndef XP_CHECKPOINT_H
#define XP_CHECKPOINT_H

#include "format/qwen3_config.h"
#include "format/safetensors.h"

/* The seven linear modules of a Qwen3 layer, the ones LoRA may target. */
typedef enum {
    XP_MOD_Q,
    XP_MOD_K,
    XP_MOD_V,
    XP_MOD_O,
    XP_MOD_GATE,
    XP_MOD_UP,
    XP_MOD_DOWN,
    XP_MOD_COUNT
} xp_module;

/* "q_proj", ... */
const char *xp_module_name(xp_module m);
/* "self_attn" or "mlp" */
const char *xp_module_parent(xp_module m);
/* Parses "q_proj" etc.; -1 when not one of the seven. */
int xp_module_parse(const char *name, xp_module *out);
/* Output and input sizes of module m under cfg. */
void xp_module_shape(const xp_qwen3_config *cfg, xp_module m, int64_t *out_dim, int64_t *in_dim);

typedef enum {
    XP_ROLE_LINEAR,  /* a q/k/v/o/gate/up/down weight */
    XP_ROLE_SCALE,   /* its block scales */
    XP_ROLE_NORM,    /* RMSNorm weights, q_norm/k_norm included */
    XP_ROLE_EMBED,   /* model.embed_tokens.weight */
    XP_ROLE_LM_HEAD, /* lm_head.weight */
    XP_ROLE_OTHER,
} xp_role;

/* Role of a checkpoint tensor by name; for linear weights and scales, *layer and *mod are set
 * when not NULL. */
xp_role xp_tensor_role(const char *name, int *layer, xp_module *mod);

/* One linear weight as stored: the matrix and, for FP8, its block scales. */
typedef struct {
    const xp_tensor *w;
    const xp_tensor *scale; /* NULL unless w is F8_E4M3 */
    int block[2];
    int64_t rows, cols;
} xp_weight;

/* Dequantizes (or widens) a weight to rows x cols F32. */
int xp_weight_to_f32(const xp_weight *w, float *dst);

typedef struct {
    char *dir;
    xp_qwen3_config cfg;
    xp_quant_config quant;
    xp_st_set *st;
    const char *scale_suffix; /* "weight_scale_inv" or "weight_scale"; NULL when unquantized */
} xp_ckpt;

/* Opens and validates a checkpoint: every tensor a Qwen3 of this config needs is present with
 * the right shape and a usable dtype, FP8 weights have scales of the right shape that are finite
 * and positive, tied embeddings have no lm_head. */
int xp_ckpt_open(const char *dir, xp_ckpt **out);
void xp_ckpt_close(xp_ckpt *c);

/* Linear weight of a layer and module. */
int xp_ckpt_weight(const xp_ckpt *c, int layer, xp_module m, xp_weight *out);

/* One tensor a Qwen3 checkpoint of some config holds (unquantized). */
typedef struct {
    char name[96];
    xp_role role;
    int layer; /* -1 outside the layers */
    xp_module mod;
    int ndim;
    int64_t shape[2];
} xp_tensor_spec;

/* The tensors of a Qwen3 of this config, in the order Hugging Face saves them (embeddings, layer
 * by layer, final norm, lm_head when untied). Returns the count; fills out when not NULL. */
size_t xp_qwen3_tensor_specs(const xp_qwen3_config *cfg, xp_tensor_spec *out);

/* "model.layers.{layer}.{parent}.{name}" into buf (no ".weight"). */
void xp_module_path(char *buf, size_t size, int layer, xp_module m);

#endif
