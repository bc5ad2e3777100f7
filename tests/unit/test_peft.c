/* PEFT adapters: what we write reads back, and every kind of adapter a shared base cannot serve
 * is refused with a message that says why. */
#include "testutil.h"

#include "format/peft.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static const xp_qwen3_config cfg = {.hidden_size = 64, .intermediate_size = 96,
                                    .num_hidden_layers = 2, .num_attention_heads = 4,
                                    .num_key_value_heads = 2, .head_dim = 16, .vocab_size = 32,
                                    .max_position_embeddings = 128, .rms_norm_eps = 1e-6,
                                    .rope_theta = 1e6, .tie_word_embeddings = 1};

static uint16_t *bf16_fill(size_t n, float base)
{
    uint16_t *p = malloc(n * 2);
    for (size_t i = 0; i < n; i++) p[i] = xp_f32_to_bf16(base + 0.001f * (float)(i % 97));
    return p;
}

/* Saves q_proj of layer 0 (rank 4) and down_proj of layer 1 (rank 8). */
static void save_two(const char *dir, double alpha_down, int rslora)
{
    int64_t qo, qi, dout, din;
    xp_module_shape(&cfg, XP_MOD_Q, &qo, &qi);
    xp_module_shape(&cfg, XP_MOD_DOWN, &dout, &din);
    xp_lora_save m[2] = {
        {0, XP_MOD_Q, 4, 4, qi, qo, bf16_fill((size_t)(4 * qi), 0.1f), bf16_fill((size_t)(qo * 4), 0.2f)},
        {1, XP_MOD_DOWN, 8, alpha_down, din, dout, bf16_fill((size_t)(8 * din), 0.3f),
         bf16_fill((size_t)(dout * 8), 0.4f)},
    };
    assert_int_equal(xp_peft_save(dir, "base/model", m, 2, rslora), 0);
    for (int i = 0; i < 2; i++) {
        free((void *)m[i].A);
        free((void *)m[i].B);
    }
}

static void test_round_trip(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "rt");
    save_two(dir, 16, 0);
    xp_peft *p;
    assert_int_equal(xp_peft_open(dir, &p), 0);
    assert_int_equal(p->n, 2);
    assert_string_equal(p->base_model, "base/model");
    assert_int_equal(p->target_mask, (1u << XP_MOD_Q) | (1u << XP_MOD_DOWN));
    const xp_lora_module *q = xp_peft_find(p, 0, XP_MOD_Q), *d = xp_peft_find(p, 1, XP_MOD_DOWN);
    assert_non_null(q);
    assert_non_null(d);
    assert_null(xp_peft_find(p, 0, XP_MOD_K));
    assert_int_equal(q->rank, 4);
    assert_int_equal(d->rank, 8);
    /* alpha/r: the config's r is one of the ranks, the other comes from rank_pattern */
    assert_float_equal(q->scale, 1.0, 1e-6);
    assert_float_equal(d->scale, 2.0, 1e-6);
    uint16_t first;
    memcpy(&first, d->B->data, 2);
    assert_int_equal(first, xp_f32_to_bf16(0.4f));
    assert_int_equal(xp_peft_check_base(p, &cfg), 0);
    xp_qwen3_config other = cfg;
    other.intermediate_size = 128;
    assert_int_equal(xp_peft_check_base(p, &other), -1);
    assert_error_contains("down_proj");
    other = cfg;
    other.num_hidden_layers = 1;
    assert_int_equal(xp_peft_check_base(p, &other), -1);
    assert_error_contains("layers");
    xp_peft_close(p);
}

static void test_rslora_scale(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "rs");
    save_two(dir, 16, 1);
    xp_peft *p;
    assert_int_equal(xp_peft_open(dir, &p), 0);
    assert_float_equal(xp_peft_find(p, 1, XP_MOD_DOWN)->scale, 16.0 / sqrt(8.0), 1e-5);
    xp_peft_close(p);
}

/* A valid adapter, then its config rewritten with one field replaced. */
static void expect_config_error(const char *name, const char *from, const char *to,
                                const char *want)
{
    char dir[4096], path[4096];
    tu_fresh_dir(dir, name);
    save_two(dir, 16, 0);
    tu_join(path, dir, "adapter_config.json");
    size_t n;
    char *text = tu_read_file(path, &n);
    char *at = strstr(text, from);
    if (!at) fail_msg("%s not in the written config", from);
    char *edited = malloc(n + strlen(to) + 1);
    sprintf(edited, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    tu_write_file(path, edited, strlen(edited));
    free(text);
    free(edited);
    xp_peft *p = (xp_peft *)1;
    assert_int_equal(xp_peft_open(dir, &p), -1);
    assert_null(p);
    assert_error_contains(want);
    assert_error_contains(dir);
}

static void test_bad_configs(void **state)
{
    expect_config_error("type", "\"LORA\"", "\"IA3\"", "only LORA");
    expect_config_error("save", "\"modules_to_save\":\tnull", "\"modules_to_save\": [\"lm_head\"]",
                        "modules_to_save (lm_head)");
    expect_config_error("bias", "\"bias\":\t\"none\"", "\"bias\": \"all\"", "biases");
    expect_config_error("dora", "\"use_dora\":\tfalse", "\"use_dora\": true", "DoRA");
    expect_config_error("targets", "\"q_proj\", \"down_proj\"", "\"q_proj\"",
                        "target_modules does not name it");
    expect_config_error("rank", "\"r\":\t4", "\"r\": 6", "rank 4 but the config says 6");
    expect_config_error("alpha", "\"lora_alpha\":\t4", "\"lora_alpha\": -1", "lora_alpha");
    expect_config_error("json", "{", "{{", "not valid JSON");
}

/* Writes an adapter from raw tensors: names, shapes, dtype, values. */
static void write_adapter(const char *dir, const char *config, int n, const char *const *names,
                          const int64_t (*shapes)[2], xp_dtype dt, float fill)
{
    char path[4096];
    tu_join(path, dir, "adapter_config.json");
    tu_write_file(path, config, strlen(config));
    xp_st_writer *w = xp_stw_new();
    for (int i = 0; i < n; i++) assert_int_equal(xp_stw_declare(w, names[i], dt, 2, shapes[i]), 0);
    assert_int_equal(xp_stw_open(w, dir, "adapter_model", 0), 0);
    for (int i = 0; i < n; i++) {
        size_t el = (size_t)(shapes[i][0] * shapes[i][1]), sz = el * xp_dtype_size(dt);
        unsigned char *buf = calloc(1, sz);
        for (size_t k = 0; k < el && dt == XP_F32; k++) ((float *)buf)[k] = fill;
        assert_int_equal(xp_stw_write(w, names[i], buf, sz), 0);
        free(buf);
    }
    assert_int_equal(xp_stw_finish(w), 0);
    xp_stw_free(w);
}

#define CFG(targets)                                                                               \
    "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": " targets       \
    ", \"rank_pattern\": {\"model.layers.1.mlp.up_proj\": 3}}"
#define PFX "base_model.model.model.layers."

static void expect_tensor_error(const char *name, const char *config, int n,
                                const char *const *names, const int64_t (*shapes)[2], xp_dtype dt,
                                float fill, const char *want)
{
    char dir[4096];
    tu_fresh_dir(dir, name);
    write_adapter(dir, config, n, names, shapes, dt, fill);
    xp_peft *p = (xp_peft *)1;
    int rc = xp_peft_open(dir, &p);
    if (rc == 0) fail_msg("%s: adapter accepted", name);
    assert_null(p);
    assert_error_contains(want);
}

static void test_bad_tensors(void **state)
{
    const char *ok[] = {PFX "0.self_attn.v_proj.lora_A.weight", PFX "0.self_attn.v_proj.lora_B.weight",
                        PFX "1.mlp.up_proj.lora_A.weight", PFX "1.mlp.up_proj.lora_B.weight"};
    const int64_t okshape[4][2] = {{2, 64}, {32, 2}, {3, 64}, {96, 3}};
    char dir[4096];
    tu_fresh_dir(dir, "foreign_ok");
    /* rank_pattern as a suffix key, F32 tensors, a target list with full names: all accepted */
    write_adapter(dir, CFG("[\"v_proj\", \"up_proj\"]"), 4, ok, okshape, XP_F32, 0.5f);
    xp_peft *p;
    assert_int_equal(xp_peft_open(dir, &p), 0);
    assert_int_equal(xp_peft_find(p, 1, XP_MOD_UP)->rank, 3);
    assert_float_equal(xp_peft_find(p, 1, XP_MOD_UP)->scale, 4.0 / 3.0, 1e-6);
    assert_int_equal(xp_peft_check_base(p, &cfg), 0);
    xp_peft_close(p);
    tu_fresh_dir(dir, "regex_targets");
    write_adapter(dir, CFG("\".*\\\\.(v_proj|up_proj)\""), 4, ok, okshape, XP_F32, 0.5f);
    assert_int_equal(xp_peft_open(dir, &p), 0);
    xp_peft_close(p);

    const char *head[] = {ok[0], ok[1], "base_model.model.lm_head.lora_A.weight"};
    const int64_t headshape[3][2] = {{2, 64}, {32, 2}, {2, 64}};
    expect_tensor_error("lm_head", CFG("[\"v_proj\"]"), 3, head, headshape, XP_F32, 0.5f,
                        "lm_head.lora_A.weight is not a LoRA weight");
    const char *emb[] = {"base_model.model.model.embed_tokens.weight"};
    const int64_t embshape[1][2] = {{32, 64}};
    expect_tensor_error("embed", CFG("[\"v_proj\"]"), 1, emb, embshape, XP_F32, 0.5f,
                        "embed_tokens");
    expect_tensor_error("half", CFG("[\"v_proj\"]"), 1, ok, okshape, XP_F32, 0.5f,
                        "has lora_A but no lora_B");
    const int64_t mismatch[2][2] = {{2, 64}, {32, 3}};
    expect_tensor_error("ab_rank", CFG("[\"v_proj\"]"), 2, ok, mismatch, XP_F32, 0.5f,
                        "lora_B has 3");
    expect_tensor_error("nan", CFG("[\"v_proj\"]"), 2, ok, okshape, XP_F32, NAN, "non-finite");
    expect_tensor_error("dtype", CFG("[\"v_proj\"]"), 2, ok, okshape, XP_I32, 0, "dtype I32");
    expect_tensor_error("pattern_rank", CFG("[\"v_proj\", \"up_proj\"]"), 4, ok,
                        (const int64_t[4][2]){{2, 64}, {32, 2}, {2, 64}, {96, 2}}, XP_F32, 0.5f,
                        "rank 2 but the config says 3");
    const char *bias[] = {PFX "0.self_attn.v_proj.bias"};
    expect_tensor_error("bias", CFG("[\"v_proj\"]"), 1, bias, embshape, XP_F32, 0.5f,
                        "v_proj.bias");
}

static void test_missing_files(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "empty");
    xp_peft *p;
    assert_int_equal(xp_peft_open(dir, &p), -1);
    assert_error_contains("adapter_config.json");
    tu_fresh_dir(dir, "noweights");
    char path[4096];
    const char *c = CFG("[\"v_proj\"]");
    tu_write_file(tu_join(path, dir, "adapter_config.json"), c, strlen(c));
    assert_int_equal(xp_peft_open(dir, &p), -1);
    assert_error_contains("adapter_model");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),   cmocka_unit_test(test_rslora_scale),
        cmocka_unit_test(test_bad_configs),  cmocka_unit_test(test_bad_tensors),
        cmocka_unit_test(test_missing_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
