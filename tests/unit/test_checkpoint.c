/* Checkpoint directories: a Qwen3 of a given config is opened and validated in BF16 and in both
 * FP8 layouts, and every structural defect is refused with a message naming the tensor. */
#include "testutil.h"

#include "format/blockquant.h"
#include "format/checkpoint.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static const xp_qwen3_config cfg = {.hidden_size = 80, .intermediate_size = 200,
                                    .num_hidden_layers = 2, .num_attention_heads = 4,
                                    .num_key_value_heads = 2, .head_dim = 16, .vocab_size = 40,
                                    .max_position_embeddings = 128, .rms_norm_eps = 1e-6,
                                    .rope_theta = 1e6, .tie_word_embeddings = 0};

typedef struct {
    xp_quant_kind kind;
    const char *skip;      /* tensor left out */
    const char *reshape;   /* tensor written with one row too many */
    const char *bf16_kept; /* linear left BF16 in an FP8 checkpoint */
    const char *nan_scale; /* weight whose first scale is NaN */
    int extra_lm_head;     /* lm_head written although embeddings are tied */
    const char *ignore;    /* ignore entry in the quantization config */
} xp_defects;

static float value(size_t i)
{
    return 0.02f * sinf((float)i * 0.37f);
}

/* Writes config.json and model.safetensors for cfg with the given defects. Block 32x64. */
static void write_ckpt(const char *dir, xp_qwen3_config c, const xp_defects *d)
{
    xp_quant_config q = {.kind = d->kind, .block = {32, 64}};
    if (d->ignore) q.ignore[q.nignore++] = strdup(d->ignore);
    char *base = xp_qwen3_config_json(&c), *js = xp_config_with_quant(base, &q);
    char path[4096];
    tu_write_file(tu_join(path, dir, "config.json"), js, strlen(js));
    free(base);
    free(js);
    xp_quant_config_free(&q);
    if (d->extra_lm_head) c.tie_word_embeddings = 0;
    size_t n = xp_qwen3_tensor_specs(&c, NULL);
    xp_tensor_spec *specs = calloc(n, sizeof *specs);
    xp_qwen3_tensor_specs(&c, specs);
    const char *suffix = d->kind == XP_QUANT_FP8 ? "weight_scale_inv" : "weight_scale";
    xp_dtype sdt = d->kind == XP_QUANT_FP8 ? XP_F32 : XP_BF16;
    for (int pass = 0; pass < 2; pass++) {
        static xp_st_writer *w;
        if (pass == 0) w = xp_stw_new();
        if (pass == 1) assert_int_equal(xp_stw_open(w, dir, "model", 0), 0);
        for (size_t i = 0; i < n; i++) {
            xp_tensor_spec *s = &specs[i];
            if (d->skip && strcmp(s->name, d->skip) == 0) continue;
            int64_t shape[2] = {s->shape[0], s->shape[1]};
            if (d->reshape && strcmp(s->name, d->reshape) == 0) shape[0]++;
            int fp8 = d->kind != XP_QUANT_NONE && s->role == XP_ROLE_LINEAR &&
                      !(d->bf16_kept && strcmp(s->name, d->bf16_kept) == 0);
            size_t el = (size_t)shape[0] * (size_t)(s->ndim == 2 ? shape[1] : 1);
            char sname[160];
            snprintf(sname, sizeof sname, "%.*s%s", (int)(strlen(s->name) - 6), s->name, suffix);
            int64_t ss[2] = {xp_ceil_div(shape[0], 32), xp_ceil_div(shape[1], 64)};
            int with_scale = fp8 && !(d->skip && strcmp(sname, d->skip) == 0);
            if (pass == 0) {
                assert_int_equal(xp_stw_declare(w, s->name, fp8 ? XP_F8_E4M3 : XP_BF16, s->ndim, shape), 0);
                if (with_scale) assert_int_equal(xp_stw_declare(w, sname, sdt, 2, ss), 0);
                continue;
            }
            float *f = malloc(el * sizeof *f);
            for (size_t k = 0; k < el; k++) f[k] = s->role == XP_ROLE_NORM ? 1.0f : value(k);
            if (!fp8) {
                uint16_t *b = malloc(el * 2);
                for (size_t k = 0; k < el; k++) b[k] = xp_f32_to_bf16(f[k]);
                assert_int_equal(xp_stw_write(w, s->name, b, el * 2), 0);
                free(b);
            } else {
                size_t ns = (size_t)(ss[0] * ss[1]);
                uint8_t *codes = malloc(el);
                float *sc = malloc(ns * sizeof *sc);
                assert_int_equal(xp_block_quantize(f, shape[0], shape[1], 32, 64, sdt, codes, sc), 0);
                if (d->nan_scale && strcmp(s->name, d->nan_scale) == 0) sc[0] = NAN;
                uint16_t *sb = malloc(ns * 2);
                for (size_t k = 0; k < ns; k++) sb[k] = xp_f32_to_bf16(sc[k]);
                assert_int_equal(xp_stw_write(w, s->name, codes, el), 0);
                if (with_scale)
                    assert_int_equal(xp_stw_write(w, sname, sdt == XP_F32 ? (void *)sc : (void *)sb,
                                                  ns * xp_dtype_size(sdt)),
                                     0);
                free(codes);
                free(sc);
                free(sb);
            }
            free(f);
        }
        if (pass == 1) {
            assert_int_equal(xp_stw_finish(w), 0);
            xp_stw_free(w);
        }
    }
    free(specs);
}

static void expect_open_error(const char *name, xp_qwen3_config c, const xp_defects *d,
                              const char *want)
{
    char dir[4096];
    tu_fresh_dir(dir, name);
    write_ckpt(dir, c, d);
    xp_ckpt *ck = (xp_ckpt *)1;
    if (xp_ckpt_open(dir, &ck) == 0) fail_msg("%s: checkpoint accepted", name);
    assert_null(ck);
    assert_error_contains(want);
}

static void test_bf16_opens(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "bf16");
    write_ckpt(dir, cfg, &(xp_defects){0});
    xp_ckpt *c;
    assert_int_equal(xp_ckpt_open(dir, &c), 0);
    assert_int_equal(c->quant.kind, XP_QUANT_NONE);
    xp_weight w;
    assert_int_equal(xp_ckpt_weight(c, 1, XP_MOD_DOWN, &w), 0);
    assert_int_equal(w.rows, 80);
    assert_int_equal(w.cols, 200);
    assert_null(w.scale);
    float *f = malloc(80 * 200 * sizeof *f);
    assert_int_equal(xp_weight_to_f32(&w, f), 0);
    for (int k = 0; k < 80 * 200; k += 37)
        assert_true(f[k] == xp_bf16_to_f32(xp_f32_to_bf16(value((size_t)k))));
    free(f);
    xp_ckpt_close(c);
}

static void check_fp8(xp_quant_kind kind, const char *name)
{
    char dir[4096];
    tu_fresh_dir(dir, name);
    write_ckpt(dir, cfg, &(xp_defects){.kind = kind});
    xp_ckpt *c;
    assert_int_equal(xp_ckpt_open(dir, &c), 0);
    assert_int_equal(c->quant.kind, kind);
    assert_int_equal(c->quant.block[0], 32);
    assert_int_equal(c->quant.block[1], 64);
    xp_weight w;
    assert_int_equal(xp_ckpt_weight(c, 0, XP_MOD_GATE, &w), 0);
    assert_non_null(w.scale);
    assert_int_equal(w.scale->shape[0], 7); /* ceil(200/32): a ragged last block row */
    assert_int_equal(w.scale->shape[1], 2); /* ceil(80/64) */
    float *f = malloc(200 * 80 * sizeof *f);
    assert_int_equal(xp_weight_to_f32(&w, f), 0);
    /* dequantized values stay within an FP8 step of the originals */
    for (int k = 0; k < 200 * 80; k++) assert_true(fabsf(f[k] - value((size_t)k)) <= 0.0013f);
    free(f);
    xp_ckpt_close(c);
}

static void test_fp8_qwen_opens(void **state)
{
    check_fp8(XP_QUANT_FP8, "fp8");
}

static void test_fp8_compressed_tensors_opens(void **state)
{
    check_fp8(XP_QUANT_FP8_CT, "ct");
}

static void test_ignored_module_may_stay_bf16(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "ignored");
    xp_defects d = {.kind = XP_QUANT_FP8_CT, .bf16_kept = "model.layers.1.mlp.up_proj.weight",
                    .ignore = "re:.*layers\\.1\\.mlp\\.up_proj$"};
    write_ckpt(dir, cfg, &d);
    xp_ckpt *c;
    assert_int_equal(xp_ckpt_open(dir, &c), 0);
    xp_weight w;
    assert_int_equal(xp_ckpt_weight(c, 1, XP_MOD_UP, &w), 0);
    assert_int_equal(w.w->dtype, XP_BF16);
    assert_null(w.scale);
    xp_ckpt_close(c);
}

static void test_defects(void **state)
{
    expect_open_error("missing", cfg, &(xp_defects){.skip = "model.layers.1.mlp.up_proj.weight"},
                      "tensor model.layers.1.mlp.up_proj.weight is missing");
    expect_open_error("norm", cfg, &(xp_defects){.skip = "model.layers.0.self_attn.k_norm.weight"},
                      "k_norm.weight is missing");
    expect_open_error("shape", cfg, &(xp_defects){.reshape = "model.layers.0.self_attn.k_proj.weight"},
                      "k_proj.weight has shape [33, 80], config.json implies [32, 80]");
    xp_qwen3_config tied = cfg;
    tied.tie_word_embeddings = 1;
    expect_open_error("tied", tied, &(xp_defects){.extra_lm_head = 1}, "ties the embeddings");
    expect_open_error("head", cfg, &(xp_defects){.skip = "lm_head.weight"}, "lm_head.weight is missing");
    expect_open_error("nan_scale", cfg,
                      &(xp_defects){.kind = XP_QUANT_FP8, .nan_scale = "model.layers.1.self_attn.o_proj.weight"},
                      "o_proj.weight_scale_inv holds scale nan");
    expect_open_error("kept", cfg,
                      &(xp_defects){.kind = XP_QUANT_FP8, .bf16_kept = "model.layers.0.mlp.down_proj.weight"},
                      "down_proj.weight is BF16 in an FP8 checkpoint");
    expect_open_error("noscale", cfg,
                      &(xp_defects){.kind = XP_QUANT_FP8, .skip = "model.layers.0.mlp.up_proj.weight_scale_inv"},
                      "up_proj.weight_scale_inv is missing");
}

static void test_fp8_without_quant_config(void **state)
{
    char dir[4096], path[4096];
    tu_fresh_dir(dir, "noconfig");
    write_ckpt(dir, cfg, &(xp_defects){.kind = XP_QUANT_FP8});
    char *js = xp_qwen3_config_json(&cfg);
    tu_write_file(tu_join(path, dir, "config.json"), js, strlen(js));
    free(js);
    xp_ckpt *c;
    assert_int_equal(xp_ckpt_open(dir, &c), -1);
    assert_error_contains("no quantization_config");
}

static void test_tensor_specs_and_roles(void **state)
{
    size_t n = xp_qwen3_tensor_specs(&cfg, NULL);
    assert_int_equal(n, 1 + 2 * 11 + 1 + 1);
    xp_tensor_spec *s = calloc(n, sizeof *s);
    xp_qwen3_tensor_specs(&cfg, s);
    for (size_t i = 0; i < n; i++) {
        int layer = -1;
        xp_module m;
        assert_int_equal(xp_tensor_role(s[i].name, &layer, &m), s[i].role);
        if (s[i].role == XP_ROLE_LINEAR) {
            assert_int_equal(layer, s[i].layer);
            assert_int_equal(m, s[i].mod);
        }
    }
    free(s);
    assert_int_equal(xp_tensor_role("model.layers.3.mlp.up_proj.weight_scale_inv", NULL, NULL), XP_ROLE_SCALE);
    assert_int_equal(xp_tensor_role("model.layers.3.mlp.q_proj.weight", NULL, NULL), XP_ROLE_OTHER);
    assert_int_equal(xp_tensor_role("model.layers.3.self_attn.q_proj.bias", NULL, NULL), XP_ROLE_OTHER);
    assert_int_equal(xp_tensor_role("model.layers.3.mlp.up_proj.weightx", NULL, NULL), XP_ROLE_OTHER);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_opens),
        cmocka_unit_test(test_fp8_qwen_opens),
        cmocka_unit_test(test_fp8_compressed_tensors_opens),
        cmocka_unit_test(test_ignored_module_may_stay_bf16),
        cmocka_unit_test(test_defects),
        cmocka_unit_test(test_fp8_without_quant_config),
        cmocka_unit_test(test_tensor_specs_and_roles),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
