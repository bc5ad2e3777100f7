/* Hugging Face config.json of a Qwen3 dense model, and its quantization_config. */
#ifndef XP_QWEN3_CONFIG_H
#define XP_QWEN3_CONFIG_H

#include <stddef.h>

/* config.json's rope_scaling: none, or YaRN with transformers' parameters (defaults filled in:
 * original_max_position_embeddings = max_position_embeddings, beta_fast 32, beta_slow 1,
 * truncate true, attention_factor from factor and mscale / mscale_all_dim as transformers
 * derives it). */
typedef struct {
    int yarn; /* 0: plain RoPE */
    double factor;
    int original_max_position_embeddings;
    double attention_factor;
    double beta_fast, beta_slow;
    int truncate;
} xp_rope_scaling;

typedef struct {
    int hidden_size;
    int intermediate_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;
    int vocab_size;
    int max_position_embeddings;
    double rms_norm_eps;
    double rope_theta;
    int tie_word_embeddings;
    xp_rope_scaling rope;
} xp_qwen3_config;

typedef enum {
    XP_QUANT_NONE,    /* BF16/F16/F32 weights */
    XP_QUANT_FP8,     /* Qwen/DeepSeek native: quant_method "fp8", weight_scale_inv */
    XP_QUANT_FP8_CT,  /* compressed-tensors float-quantized, strategy "block", weight_scale */
} xp_quant_kind;

#define XP_MAX_IGNORE 64

typedef struct {
    xp_quant_kind kind;
    int block[2]; /* rows, cols of one scale block */
    /* modules left unquantized: names ("lm_head") or "re:" regexes, as compressed-tensors and
     * modules_to_not_convert list them */
    char *ignore[XP_MAX_IGNORE];
    int nignore;
} xp_quant_config;

/* Parses and checks config.json text: every field above present and consistent. */
int xp_qwen3_config_parse(const char *json, xp_qwen3_config *cfg, xp_quant_config *quant);
/* Replaces c->rope with the rope_scaling object in json ("null" for none), checked as the one
 * in config.json is: the engine's override. */
int xp_rope_scaling_parse(const char *json, xp_qwen3_config *c);
/* Positions the model serves: max_position_embeddings, or under YaRN at least factor times the
 * original context. */
int xp_qwen3_positions(const xp_qwen3_config *c);
/* RoPE's inverse frequencies, head_dim / 2 of them: theta^(-2i/d), blended with their YaRN
 * interpolation over transformers' correction range when c->rope.yarn. */
void xp_qwen3_inv_freq(const xp_qwen3_config *c, float *inv_freq);

/* Reads DIR/config.json. */
int xp_qwen3_config_load(const char *dir, xp_qwen3_config *cfg, xp_quant_config *quant);
void xp_quant_config_free(xp_quant_config *q);

/* Is the linear module (e.g. "model.layers.3.mlp.gate_proj") in the ignore list? -1 on a bad
 * regex. */
int xp_quant_ignored(const xp_quant_config *q, const char *module);

/* Config text with quantization_config replaced by q's (removed for XP_QUANT_NONE), every other
 * field kept as it was. Returns a malloc'd string or NULL. */
char *xp_config_with_quant(const char *json, const xp_quant_config *q);

/* A fresh config.json for a synthetic model. */
char *xp_qwen3_config_json(const xp_qwen3_config *cfg);

#endif
