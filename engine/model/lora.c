#include "model/lora.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

/* A as stored (BF16) or as F32; Bt = B transposed, in the same type. */
static int xp_lora_fill(xp_lora_mat *m, const xp_tensor *A, const xp_tensor *B)
{
    int64_t o = B->shape[0], r = B->shape[1];
    if (A->dtype == XP_BF16 && B->dtype == XP_BF16) {
        m->dtype = XP_BF16;
        uint16_t *a = malloc(A->nelem * 2), *bt = malloc(B->nelem * 2);
        m->A = a;
        m->Bt = bt;
        if (!a || !bt) return xp_fail("out of memory");
        memcpy(a, A->data, A->nelem * 2);
        const uint16_t *b = B->data;
        for (int64_t row = 0; row < o; row++)
            for (int64_t k = 0; k < r; k++)
                bt[k * o + row] = b[row * r + k];
        return 0;
    }
    m->dtype = XP_F32;
    float *a = malloc(A->nelem * sizeof *a), *bt = malloc(B->nelem * sizeof *bt),
          *b = malloc(B->nelem * sizeof *b);
    m->A = a;
    m->Bt = bt;
    if (!a || !bt || !b) {
        free(b);
        return xp_fail("out of memory");
    }
    xp_convert_to_f32(A->dtype, A->data, a, (size_t)A->nelem);
    xp_convert_to_f32(B->dtype, B->data, b, (size_t)B->nelem);
    for (int64_t row = 0; row < o; row++)
        for (int64_t k = 0; k < r; k++)
            bt[k * o + row] = b[row * r + k];
    free(b);
    return 0;
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
        if (xp_lora_fill(m, lm->A, lm->B) < 0) goto done;
        if (m->rank > out->max_rank) out->max_rank = m->rank;
        out->bytes += (lm->A->nelem + lm->B->nelem) * xp_dtype_size(m->dtype);
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
        free(w->mods[i].Bt);
    }
    free(w->mods);
    memset(w, 0, sizeof *w);
}
