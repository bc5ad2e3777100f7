#include "lora.h"
#include "xp_error.h"

#include <stdlib.h>
#include <string.h>

static float *xp_lora_f32(const xp_tensor *t)
{
    float *f = malloc(t->nelem * sizeof *f);
    if (f) xp_convert_to_f32(t->dtype, t->data, f, (size_t)t->nelem);
    return f;
}

int xp_lora_load(const char *dir, const xp_qwen3_config *cfg, xp_lora_weights *out)
{
    memset(out, 0, sizeof *out);
    xp_peft *p;
    if (xp_peft_open(dir, &p) < 0) return -1;
    int rc = -1;
    if (xp_peft_check_base(p, cfg) < 0) goto done;
    out->n_layers = cfg->num_hidden_layers;
    out->mods = calloc((size_t)out->n_layers * XP_MOD_COUNT, sizeof *out->mods);
    if (!out->mods) {
        xp_fail("out of memory");
        goto done;
    }
    for (size_t i = 0; i < p->n; i++) {
        const xp_lora_module *lm = &p->mods[i];
        if (lm->rank > XP_MAX_LORA_RANK) {
            xp_fail("adapter %s: %s of layer %d has rank %d (at most %d)", dir,
                    xp_module_name(lm->mod), lm->layer, lm->rank, XP_MAX_LORA_RANK);
            goto done;
        }
        xp_lora_mat *m = &out->mods[lm->layer * XP_MOD_COUNT + lm->mod];
        m->rank = lm->rank;
        m->scale = lm->scale;
        m->A = xp_lora_f32(lm->A);
        m->B = xp_lora_f32(lm->B);
        int64_t o = lm->B->shape[0];
        m->Bt = malloc((size_t)(o * lm->rank) * sizeof *m->Bt);
        if (!m->A || !m->B || !m->Bt) {
            xp_fail("out of memory");
            goto done;
        }
        for (int64_t row = 0; row < o; row++)
            for (int k = 0; k < lm->rank; k++)
                m->Bt[(size_t)k * (size_t)o + (size_t)row] = m->B[(size_t)row * (size_t)lm->rank + (size_t)k];
        if (m->rank > out->max_rank) out->max_rank = m->rank;
        out->bytes += (lm->A->nelem + 2 * lm->B->nelem) * sizeof(float);
    }
    rc = 0;
done:
    xp_peft_close(p);
    if (rc < 0) xp_lora_free(out);
    return rc;
}

void xp_lora_free(xp_lora_weights *w)
{
    for (int i = 0; w->mods && i < w->n_layers * XP_MOD_COUNT; i++) {
        free(w->mods[i].A);
        free(w->mods[i].B);
        free(w->mods[i].Bt);
    }
    free(w->mods);
    memset(w, 0, sizeof *w);
}
