/* Loading a model with options: the FP8 lm_head quantized at load (a tied embedding kept as
 * stored for the lookup), the rope_scaling override and its attention factor in the q/k norms. */
#include "testmodel.h"
#include "testutil.h"

#include "format/blockquant.h"
#include "model/model.h"

#include <cjson/cJSON.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char model_dir[4096];
static int have_model;

static int setup(void **state)
{
    xp_qwen3_config cfg = tm_small_config(); /* tied embeddings */
    tu_fresh_dir(model_dir, "model");
    have_model = tm_write_model(model_dir, &cfg, 1, 5) == 0;
    return 0;
}

static void test_fp8_lm_head(void **state)
{
    if (!have_model) skip();
    xp_model *plain, *m;
    assert_int_equal(xp_model_load(model_dir, NULL, &plain), 0);
    xp_model_opts o = {.lm_head_fp8 = 1};
    assert_int_equal(xp_model_load(model_dir, &o, &m), 0);
    assert_int_equal(plain->lm_head.dtype, XP_BF16);
    assert_int_equal(m->lm_head.dtype, XP_F8_E4M3);
    assert_int_equal(m->embed.dtype, XP_BF16); /* the lookup reads the embedding as stored */
    assert_true(m->lm_head.w != m->embed.w);
    assert_true(m->lm_head.fp8_fast);
    int64_t rows = m->lm_head.rows, cols = m->lm_head.cols;
    assert_int_equal(rows, 151936);
    /* the codes and scales xp_block_quantize gives the stored rows, band by band */
    float *w = malloc((size_t)(128 * cols) * 4), s[8];
    uint8_t *q = malloc((size_t)(128 * cols));
    for (int64_t r0 = 0; r0 < rows; r0 += 128 * 97) {
        int64_t nr = rows - r0 < 128 ? rows - r0 : 128;
        for (int64_t r = 0; r < nr; r++)
            xp_linear_row(&plain->embed, r0 + r, w + r * cols);
        assert_int_equal(xp_block_quantize(w, nr, cols, 128, 128, XP_F32, q, s), 0);
        assert_memory_equal(q, (const uint8_t *)m->lm_head.w + r0 * cols, (size_t)(nr * cols));
        assert_memory_equal(s, m->lm_head.scale + (r0 / 128) * m->lm_head.nbc,
                            (size_t)m->lm_head.nbc * 4);
    }
    /* the last, partial band too */
    int64_t r0 = rows / 128 * 128, nr = rows - r0;
    if (nr) {
        for (int64_t r = 0; r < nr; r++)
            xp_linear_row(&plain->embed, r0 + r, w + r * cols);
        assert_int_equal(xp_block_quantize(w, nr, cols, 128, 128, XP_F32, q, s), 0);
        assert_memory_equal(q, (const uint8_t *)m->lm_head.w + r0 * cols, (size_t)(nr * cols));
    }
    /* a step streams the FP8 head: half the BF16 one's bytes, plus its scales */
    uint64_t head_bf16 = (uint64_t)(rows * cols) * 2,
             head_fp8 = (uint64_t)(rows * cols) + (uint64_t)((rows + 127) / 128) * 4;
    assert_true(xp_model_step_bytes(plain) - xp_model_step_bytes(m) == head_bf16 - head_fp8);
    free(w);
    free(q);
    xp_model_free(plain);
    xp_model_free(m);
}

static void test_rope_override(void **state)
{
    if (!have_model) skip();
    xp_model *plain, *m;
    assert_int_equal(xp_model_load(model_dir, NULL, &plain), 0);
    xp_model_opts o = {.rope_scaling = "{\"rope_type\":\"yarn\",\"factor\":3,"
                                       "\"original_max_position_embeddings\":512}"};
    assert_int_equal(xp_model_load(model_dir, &o, &m), 0);
    assert_int_equal(m->cfg.rope.yarn, 1);
    assert_int_equal(xp_qwen3_positions(&m->cfg), 4096);
    float af = (float)(0.1 * log(3.0) + 1);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int i = 0; i < m->cfg.head_dim; i++) {
            float want_q = plain->layers[l].q_norm[i] * af,
                  want_k = plain->layers[l].k_norm[i] * af;
            assert_memory_equal(&m->layers[l].q_norm[i], &want_q, 4);
            assert_memory_equal(&m->layers[l].k_norm[i], &want_k, 4);
            /* the MLP's norm is not RoPE's */
            assert_memory_equal(&m->layers[l].mlp_norm[i], &plain->layers[l].mlp_norm[i], 4);
        }
    assert_true(m->inv_freq[m->cfg.head_dim / 2 - 1] < plain->inv_freq[m->cfg.head_dim / 2 - 1]);
    assert_true(m->inv_freq[0] == plain->inv_freq[0]);
    xp_model_free(m);
    o.rope_scaling = "{\"rope_type\":\"longrope\",\"factor\":3}";
    assert_int_equal(xp_model_load(model_dir, &o, &m), -1);
    assert_error_contains("\"longrope\" is not supported");
    assert_null(m);
    xp_model_free(plain);
}

/* An FP8 weight holding NaN codes is refused at load, naming the weight and the first such
 * element in row-major order (found in the same read of the codes that marks subnormal blocks);
 * without them the same file loads, with its subnormal blocks marked. */
static void test_fp8_nan_code_refused(void **state)
{
    char dir[4096], path[4200];
    xp_qwen3_config cfg = tm_small_config();
    tu_fresh_dir(dir, "nanmodel");
    if (tm_write_model(dir, &cfg, 1, 9) != 0) skip();
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    size_t len;
    unsigned char *raw = (unsigned char *)tu_read_file(path, &len);
    assert_non_null(raw);
    uint64_t hlen = 0;
    for (int k = 7; k >= 0; k--)
        hlen = hlen << 8 | raw[k];
    char *js = malloc(hlen + 1);
    memcpy(js, raw + 8, hlen);
    js[hlen] = 0;
    cJSON *h = cJSON_Parse(js), *t = cJSON_GetObjectItem(h, "model.layers.0.mlp.up_proj.weight");
    assert_non_null(t);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(t, "dtype")), "F8_E4M3");
    size_t off = 8 + hlen + (size_t)cJSON_GetArrayItem(cJSON_GetObjectItem(t, "data_offsets"), 0)->valuedouble;
    int64_t cols = (int64_t)cJSON_GetArrayItem(cJSON_GetObjectItem(t, "shape"), 1)->valuedouble;
    cJSON_Delete(h);
    free(js);
    xp_model *m;
    assert_int_equal(xp_model_load(dir, NULL, &m), 0);
    xp_model_free(m);
    /* two NaN codes, the later one in the first column of the next row: the row-major first is
     * named */
    int64_t first = 2 * cols + cols - 1, later = 3 * cols;
    raw[off + first] = 0xff;
    raw[off + later] = 0x7f;
    assert_int_equal(tu_write_file(path, raw, len), 0);
    assert_int_equal(xp_model_load(dir, NULL, &m), -1);
    assert_null(m);
    char want[160];
    snprintf(want, sizeof want, "model.layers.0.mlp.up_proj.weight holds an FP8 NaN code at element %lld",
             (long long)first);
    assert_error_contains(want);
    free(raw);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp8_lm_head),
        cmocka_unit_test(test_rope_override),
        cmocka_unit_test(test_fp8_nan_code_refused),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
