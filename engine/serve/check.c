/* Configuration-time checks: a model directory and its adapters looked at the way the engine
 * would load them, without loading any weights (nginx -t runs these in the master process). */
#include "format/checkpoint.h"
#include "format/peft.h"
#include "model/lora.h"
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"
#include "xprec.h"

int xp_model_check(const char *dir, xp_model_info *info)
{
    xp_ckpt *c;
    if (xp_ckpt_open(dir, &c) < 0) return -1;
    if (info) {
        info->max_position_embeddings = c->cfg.max_position_embeddings;
        info->vocab_size = c->cfg.vocab_size;
        info->layers = c->cfg.num_hidden_layers;
        info->hidden_size = c->cfg.hidden_size;
        info->fp8 = c->scale_suffix != NULL;
    }
    xp_ckpt_close(c);
    xp_tokenizer *t = xp_tokenizer_load(dir);
    if (!t) return -1;
    xp_tokenizer_free(t);
    return 0;
}

int xp_adapter_check(const char *model_dir, const char *adapter_dir, int *max_rank)
{
    xp_qwen3_config cfg;
    xp_quant_config q;
    if (xp_qwen3_config_load(model_dir, &cfg, &q) < 0) return -1;
    xp_quant_config_free(&q);
    xp_peft *p;
    if (xp_peft_open(adapter_dir, &p) < 0) return -1;
    int rc = xp_peft_check_base(p, &cfg), top = 0;
    for (size_t i = 0; rc == 0 && i < p->n; i++) {
        const xp_lora_module *m = &p->mods[i];
        if (m->rank > XP_MAX_LORA_RANK)
            rc = xp_fail("adapter %s: %s of layer %d has rank %d (at most %d)", adapter_dir,
                         xp_module_name(m->mod), m->layer, m->rank, XP_MAX_LORA_RANK);
        if (m->rank > top) top = m->rank;
    }
    xp_peft_close(p);
    if (rc == 0 && max_rank) *max_rank = top;
    return rc;
}
