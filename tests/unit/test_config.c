/* config.json of Qwen3 checkpoints: fields, quantization_config variants, ignore lists, the
 * rewrite for quantized output, and tensor-name roles. */
#include "testutil.h"

#include "format/checkpoint.h"
#include "util/json_util.h"
#include "format/qwen3_config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static char *json(const char *sq)
{
    char *s = strdup(sq);
    assert_non_null(s);
    for (char *p = s; *p; p++)
        if (*p == '\'') *p = '"';
    return s;
}

/* Qwen/Qwen3-0.6B's config.json as published. */
static const char qwen3_06b[] =
    "{'architectures':['Qwen3ForCausalLM'],'attention_bias':false,'attention_dropout':0.0,"
    "'bos_token_id':151643,'eos_token_id':151645,'head_dim':128,'hidden_act':'silu',"
    "'hidden_size':1024,'initializer_range':0.02,'intermediate_size':3072,"
    "'max_position_embeddings':40960,'max_window_layers':28,'model_type':'qwen3',"
    "'num_attention_heads':16,'num_hidden_layers':28,'num_key_value_heads':8,"
    "'rms_norm_eps':1e-06,'rope_scaling':null,'rope_theta':1000000,'sliding_window':null,"
    "'tie_word_embeddings':true,'torch_dtype':'bfloat16','transformers_version':'4.51.0',"
    "'use_cache':true,'use_sliding_window':false,'vocab_size':151936}";

/* Qwen/Qwen3-*-FP8 */
static const char quant_native[] =
    "{'activation_scheme':'dynamic','fmt':'e4m3','quant_method':'fp8',"
    "'weight_block_size':[128,128]}";

/* llm-compressor FP8_BLOCK */
static const char quant_ct[] =
    "{'config_groups':{'group_0':{'input_activations':{'actorder':null,'block_structure':null,"
    "'dynamic':true,'group_size':128,'num_bits':8,'observer':null,'observer_kwargs':{},"
    "'strategy':'group','symmetric':true,'type':'float'},'output_activations':null,"
    "'targets':['Linear'],'weights':{'actorder':null,'block_structure':[128,64],'dynamic':false,"
    "'group_size':null,'num_bits':8,'observer':'minmax','observer_kwargs':{},'strategy':'block',"
    "'symmetric':true,'type':'float'}}},'format':'float-quantized','global_compression_ratio':null,"
    "'ignore':['lm_head','re:.*mlp.gate$'],'kv_cache_scheme':null,"
    "'quant_method':'compressed-tensors','quantization_status':'compressed'}";

/* The base config with key set to a (single-quoted) JSON value, or removed when value is NULL;
 * key "a.b" reaches into object a. */
static char *cfg_with(const char *base_sq, const char *key, const char *value_sq)
{
    char *base = json(base_sq);
    cJSON *root = cJSON_Parse(base);
    free(base);
    assert_non_null(root);
    cJSON *obj = root;
    char k[128];
    snprintf(k, sizeof k, "%s", key);
    char *dot;
    char *leaf = k;
    while ((dot = strchr(leaf, '.'))) {
        *dot = '\0';
        obj = cJSON_GetObjectItemCaseSensitive(obj, leaf);
        assert_non_null(obj);
        leaf = dot + 1;
    }
    cJSON_DeleteItemFromObjectCaseSensitive(obj, leaf);
    if (value_sq) {
        char *v = json(value_sq);
        cJSON *item = cJSON_Parse(v);
        free(v);
        assert_non_null(item);
        cJSON_AddItemToObject(obj, leaf, item);
    }
    char *out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    assert_non_null(out);
    return out;
}

/* Base config with quantization_config = q (single-quoted). */
static char *cfg_quant(const char *q_sq)
{
    return cfg_with(qwen3_06b, "quantization_config", q_sq);
}

/* Field by field: struct padding is not part of the value. */
static void assert_cfg_equal(const xp_qwen3_config *a, const xp_qwen3_config *b)
{
    assert_int_equal(a->hidden_size, b->hidden_size);
    assert_int_equal(a->intermediate_size, b->intermediate_size);
    assert_int_equal(a->num_hidden_layers, b->num_hidden_layers);
    assert_int_equal(a->num_attention_heads, b->num_attention_heads);
    assert_int_equal(a->num_key_value_heads, b->num_key_value_heads);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->vocab_size, b->vocab_size);
    assert_int_equal(a->max_position_embeddings, b->max_position_embeddings);
    assert_true(a->rms_norm_eps == b->rms_norm_eps);
    assert_true(a->rope_theta == b->rope_theta);
    assert_int_equal(a->tie_word_embeddings, b->tie_word_embeddings);
}

static void expect_parse_fails(const char *text, const char *want1, const char *want2)
{
    xp_qwen3_config c;
    xp_quant_config q;
    xp_clear_error();
    if (xp_qwen3_config_parse(text, &c, &q) == 0) {
        xp_quant_config_free(&q);
        fail_msg("parsed, expected an error mentioning \"%s\": %.300s", want1, text);
    }
    assert_int_equal(q.nignore, 0); /* nothing left to free */
    if (want1) assert_error_contains(want1);
    if (want2) assert_error_contains(want2);
}

static void test_parse_qwen3_06b(void **state)
{
    char *text = json(qwen3_06b);
    xp_qwen3_config c;
    xp_quant_config q;
    if (xp_qwen3_config_parse(text, &c, &q) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(c.hidden_size, 1024);
    assert_int_equal(c.intermediate_size, 3072);
    assert_int_equal(c.num_hidden_layers, 28);
    assert_int_equal(c.num_attention_heads, 16);
    assert_int_equal(c.num_key_value_heads, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.vocab_size, 151936);
    assert_int_equal(c.max_position_embeddings, 40960);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_true(c.rope_theta == 1e6);
    assert_int_equal(c.tie_word_embeddings, 1);
    assert_int_equal(q.kind, XP_QUANT_NONE);
    assert_int_equal(q.nignore, 0);
    xp_quant_config_free(&q);
    /* quant may be NULL when the caller does not care */
    assert_int_equal(xp_qwen3_config_parse(text, &c, NULL), 0);
    free(text);

    /* quantization_config null, untied embeddings, no model_type, layer_types that agree */
    char *t2 = cfg_with(qwen3_06b, "quantization_config", "null");
    assert_int_equal(xp_qwen3_config_parse(t2, &c, &q), 0);
    assert_int_equal(q.kind, XP_QUANT_NONE);
    free(t2);
    t2 = cfg_with(qwen3_06b, "tie_word_embeddings", "false");
    assert_int_equal(xp_qwen3_config_parse(t2, &c, &q), 0);
    assert_int_equal(c.tie_word_embeddings, 0);
    free(t2);
    t2 = cfg_with(qwen3_06b, "model_type", NULL);
    assert_int_equal(xp_qwen3_config_parse(t2, &c, &q), 0);
    free(t2);
    t2 = cfg_with(qwen3_06b, "num_hidden_layers", "2");
    char *t3 = cfg_with(strchr(t2, '{'), "layer_types", "['full_attention','full_attention']");
    assert_int_equal(xp_qwen3_config_parse(t3, &c, &q), 0);
    assert_int_equal(c.num_hidden_layers, 2);
    free(t2);
    free(t3);
}

static void test_parse_quant_native(void **state)
{
    xp_qwen3_config c;
    xp_quant_config q;
    char *t = cfg_quant(quant_native);
    if (xp_qwen3_config_parse(t, &c, &q) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(q.kind, XP_QUANT_FP8);
    assert_int_equal(q.block[0], 128);
    assert_int_equal(q.block[1], 128);
    assert_int_equal(q.nignore, 0);
    assert_int_equal(c.hidden_size, 1024);
    xp_quant_config_free(&q);
    free(t);

    /* modules_to_not_convert, as some FP8 exports list them; null is an empty list */
    t = cfg_quant("{'activation_scheme':'dynamic','fmt':'e4m3','quant_method':'fp8',"
                  "'weight_block_size':[64,32],'modules_to_not_convert':['lm_head','re:.*norm']}");
    assert_int_equal(xp_qwen3_config_parse(t, &c, &q), 0);
    assert_int_equal(q.block[0], 64);
    assert_int_equal(q.block[1], 32);
    assert_int_equal(q.nignore, 2);
    assert_string_equal(q.ignore[0], "lm_head");
    assert_string_equal(q.ignore[1], "re:.*norm");
    xp_quant_config_free(&q);
    free(t);
    t = cfg_quant("{'quant_method':'fp8','weight_block_size':[128,128],"
                  "'modules_to_not_convert':null}");
    assert_int_equal(xp_qwen3_config_parse(t, &c, &q), 0);
    assert_int_equal(q.nignore, 0);
    free(t);
}

static void test_parse_quant_ct(void **state)
{
    xp_qwen3_config c;
    xp_quant_config q;
    char *t = cfg_quant(quant_ct);
    if (xp_qwen3_config_parse(t, &c, &q) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(q.kind, XP_QUANT_FP8_CT);
    assert_int_equal(q.block[0], 128);
    assert_int_equal(q.block[1], 64);
    assert_int_equal(q.nignore, 2);
    assert_string_equal(q.ignore[0], "lm_head");
    assert_string_equal(q.ignore[1], "re:.*mlp.gate$");
    xp_quant_config_free(&q);
    assert_int_equal(q.nignore, 0);
    free(t);
}

static const char *const required[] = {
    "hidden_size",         "intermediate_size", "num_hidden_layers",   "num_attention_heads",
    "num_key_value_heads", "head_dim",          "vocab_size",          "max_position_embeddings",
    "rms_norm_eps",        "rope_theta",        "tie_word_embeddings",
};

static void test_missing_fields(void **state)
{
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        char *t = cfg_with(qwen3_06b, required[i], NULL);
        expect_parse_fails(t, required[i], "missing");
        free(t);
        /* present but of the wrong type */
        t = cfg_with(qwen3_06b, required[i], "'12'");
        expect_parse_fails(t, required[i], NULL);
        free(t);
    }
}

static void test_bad_values(void **state)
{
    static const struct {
        const char *key, *value, *want1, *want2;
    } cases[] = {
        {"num_key_value_heads", "6", "num_attention_heads 16", "num_key_value_heads 6"},
        {"num_attention_heads", "12", "not a multiple", NULL},
        {"head_dim", "127", "head_dim", "odd"},
        {"model_type", "'llama'", "llama", "qwen3"},
        {"model_type", "'qwen3_moe'", "qwen3_moe", NULL},
        {"tie_word_embeddings", "'true'", "tie_word_embeddings", NULL},
        {"tie_word_embeddings", "1", "tie_word_embeddings", NULL},
        {"tie_word_embeddings", "null", "tie_word_embeddings", NULL},
        {"hidden_size", "1024.5", "hidden_size", NULL},
        {"hidden_size", "0", "hidden_size", NULL},
        {"hidden_size", "-1024", "hidden_size", NULL},
        {"hidden_size", "1e12", "hidden_size", NULL},
        {"num_key_value_heads", "0", "num_key_value_heads", NULL},
        {"vocab_size", "true", "vocab_size", NULL},
        {"rms_norm_eps", "0", "rms_norm_eps", NULL},
        {"rms_norm_eps", "-1e-6", "rms_norm_eps", NULL},
        {"rms_norm_eps", "2", "rms_norm_eps", NULL},
        {"rope_theta", "0", "rope_theta", NULL},
        {"rope_theta", "'1e6'", "rope_theta", NULL},
        {"layer_types", "['full_attention']", "layer_types", "28"},
        {"quantization_config", "'fp8'", "quantization_config", NULL},
        {"quantization_config", "[]", "quantization_config", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *t = cfg_with(qwen3_06b, cases[i].key, cases[i].value);
        expect_parse_fails(t, cases[i].want1, cases[i].want2);
        free(t);
    }
    expect_parse_fails("", "not a JSON object", NULL);
    expect_parse_fails("[1]", "not a JSON object", NULL);
    expect_parse_fails("{\"hidden_size\": ", "not a JSON object", NULL);
}

static void test_bad_quant(void **state)
{
    static const struct {
        const char *qc, *want1, *want2;
    } cases[] = {
        {"{'quant_method':'gptq','bits':4}", "gptq", "not supported"},
        {"{'quant_method':'awq'}", "awq", NULL},
        {"{'fmt':'e4m3','weight_block_size':[128,128]}", "quant_method", "missing"},
        {"{'quant_method':5}", "quant_method", NULL},
        {"{'quant_method':'fp8','fmt':'e5m2','weight_block_size':[128,128]}", "e5m2", NULL},
        {"{'quant_method':'fp8','fmt':'e4m3'}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':null}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128]}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128,128,1]}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[0,128]}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128,12.5]}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128,'128']}", "weight_block_size", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128,128],'modules_to_not_convert':'lm_head'}",
         "modules_to_not_convert", NULL},
        {"{'quant_method':'fp8','weight_block_size':[128,128],'modules_to_not_convert':['a',1]}",
         "modules_to_not_convert", NULL},
        {"{'quant_method':'compressed-tensors','format':'pack-quantized','config_groups':{}}",
         "pack-quantized", NULL},
        {"{'quant_method':'compressed-tensors'}", "config_groups", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{}}", "config_groups", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'tensor','type':'float','num_bits':8}}}}",
         "strategy", "tensor"},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'channel','type':'float','num_bits':8}}}}",
         "channel", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{}}}", "strategy", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'block','type':'int','num_bits':8,'block_structure':[128,128]}}}}",
         "8-bit float", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'block','type':'float','num_bits':4,'block_structure':[128,128]}}}}",
         "8-bit float", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'block','type':'float','num_bits':8}}}}",
         "block_structure", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'block','type':'float','num_bits':8,'block_structure':[128,128]}},'h':{}}}",
         "2 config groups", NULL},
        {"{'quant_method':'compressed-tensors','config_groups':{'g':{'weights':{'strategy':"
         "'block','type':'float','num_bits':8,'block_structure':[128,128]}}},'ignore':['a',"
         "false]}",
         "ignore", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *t = cfg_quant(cases[i].qc);
        expect_parse_fails(t, cases[i].want1, cases[i].want2);
        free(t);
    }
    /* more ignore entries than fit: refused, and the ones already copied are freed */
    char big[8192] =
        "{'quant_method':'fp8','weight_block_size':[128,128],'modules_to_not_convert':[";
    for (int i = 0; i <= XP_MAX_IGNORE; i++) {
        char one[32];
        snprintf(one, sizeof one, "%s'm%d'", i ? "," : "", i);
        strcat(big, one);
    }
    strcat(big, "]}");
    char *t = cfg_quant(big);
    expect_parse_fails(t, "modules_to_not_convert", "more than");
    free(t);
}

static void test_quant_ignored(void **state)
{
    xp_quant_config q;
    memset(&q, 0, sizeof q);
    char *pats[] = {"lm_head", "re:.*mlp.gate$", "model.layers.0.self_attn.q_proj",
                    "re:model\\.layers\\.1\\..*"};
    for (int i = 0; i < 4; i++)
        q.ignore[q.nignore++] = pats[i];
    static const struct {
        const char *name;
        int want;
    } cases[] = {
        {"lm_head", 1},
        {"model.lm_head", 1}, /* a plain name also matches a module it ends */
        {"xlm_head", 0},      /* ... only at a '.' boundary */
        {"lm_head.weight", 0},
        {"model.layers.3.mlp.gate", 1}, /* re: with an end anchor */
        {"model.layers.3.mlp.gate_proj", 0},
        {"model.layers.3.mlp.up_proj", 0},
        {"model.layers.0.self_attn.q_proj", 1},
        {"model.layers.10.self_attn.q_proj", 0},
        {"model.layers.1.mlp.down_proj", 1},
        {"model.layers.11.mlp.down_proj", 0},
        {"x.model.layers.1.mlp.down_proj", 0}, /* re: is anchored at the start, like re.match */
        {"", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        if (xp_quant_ignored(&q, cases[i].name) != cases[i].want)
            fail_msg("xp_quant_ignored(\"%s\") != %d", cases[i].name, cases[i].want);
    /* an empty list ignores nothing; a bad regex is an error naming it */
    xp_quant_config none;
    memset(&none, 0, sizeof none);
    assert_int_equal(xp_quant_ignored(&none, "lm_head"), 0);
    char bad[] = "re:(unclosed";
    none.ignore[none.nignore++] = bad;
    xp_clear_error();
    assert_int_equal(xp_quant_ignored(&none, "lm_head"), -1);
    assert_error_contains("(unclosed");

    /* the lists as parsed from a compressed-tensors config */
    char *t = cfg_quant(quant_ct);
    xp_qwen3_config c;
    assert_int_equal(xp_qwen3_config_parse(t, &c, &q), 0);
    assert_int_equal(xp_quant_ignored(&q, "lm_head"), 1);
    assert_int_equal(xp_quant_ignored(&q, "model.layers.0.mlp.gate"), 1);
    assert_int_equal(xp_quant_ignored(&q, "model.layers.0.mlp.gate_proj"), 0);
    xp_quant_config_free(&q);
    free(t);
}

/* Every key other than quantization_config survives the rewrite with its value. */
static void assert_same_except_quant(const char *a, const char *b)
{
    cJSON *x = cJSON_Parse(a), *y = cJSON_Parse(b);
    assert_non_null(x);
    assert_non_null(y);
    cJSON_DeleteItemFromObjectCaseSensitive(x, "quantization_config");
    cJSON_DeleteItemFromObjectCaseSensitive(y, "quantization_config");
    if (!cJSON_Compare(x, y, 1)) fail_msg("fields changed:\n%s\n%s", a, b);
    cJSON_Delete(x);
    cJSON_Delete(y);
}

static void round_trip_quant(const char *base, const xp_quant_config *want)
{
    char *out = xp_config_with_quant(base, want);
    assert_non_null(out);
    assert_same_except_quant(base, out);
    xp_qwen3_config c0, c1;
    xp_quant_config q;
    assert_int_equal(xp_qwen3_config_parse(base, &c0, NULL), 0);
    if (xp_qwen3_config_parse(out, &c1, &q) < 0) fail_msg("%s\n%s", xp_last_error(), out);
    assert_cfg_equal(&c0, &c1);
    assert_int_equal(q.kind, want->kind);
    if (want->kind != XP_QUANT_NONE) {
        assert_int_equal(q.block[0], want->block[0]);
        assert_int_equal(q.block[1], want->block[1]);
    }
    assert_int_equal(q.nignore, want->nignore);
    for (int i = 0; i < q.nignore; i++)
        assert_string_equal(q.ignore[i], want->ignore[i]);
    xp_quant_config_free(&q);
    /* the rewrite of a rewrite is stable */
    char *again = xp_config_with_quant(out, want);
    assert_non_null(again);
    assert_string_equal(again, out);
    free(again);
    free(out);
}

static void test_config_with_quant(void **state)
{
    char *plain = json(qwen3_06b);
    char *native = cfg_quant(quant_native);
    char *ct = cfg_quant(quant_ct);
    const char *bases[] = {plain, native, ct};
    char lm[] = "lm_head", re[] = "re:.*mlp.gate$";
    for (int b = 0; b < 3; b++) {
        xp_quant_config q;
        memset(&q, 0, sizeof q);
        round_trip_quant(bases[b], &q); /* NONE: quantization_config removed */
        char *out = xp_config_with_quant(bases[b], &q);
        assert_null(strstr(out, "quantization_config"));
        free(out);
        for (int kind = XP_QUANT_FP8; kind <= XP_QUANT_FP8_CT; kind++) {
            q.kind = (xp_quant_kind)kind;
            q.block[0] = 128;
            q.block[1] = 64;
            q.nignore = 0;
            round_trip_quant(bases[b], &q);
            q.ignore[q.nignore++] = lm;
            q.ignore[q.nignore++] = re;
            round_trip_quant(bases[b], &q);
        }
    }
    assert_null(xp_config_with_quant("[]", &(xp_quant_config){0}));
    free(plain);
    free(native);
    free(ct);
}

static void test_config_json_and_load(void **state)
{
    xp_qwen3_config c = {.hidden_size = 64,
                         .intermediate_size = 160,
                         .num_hidden_layers = 2,
                         .num_attention_heads = 4,
                         .num_key_value_heads = 2,
                         .head_dim = 16,
                         .vocab_size = 300,
                         .max_position_embeddings = 512,
                         .rms_norm_eps = 1e-6,
                         .rope_theta = 10000,
                         .tie_word_embeddings = 1};
    char *text = xp_qwen3_config_json(&c);
    assert_non_null(text);
    xp_qwen3_config back;
    xp_quant_config q;
    assert_int_equal(xp_qwen3_config_parse(text, &back, &q), 0);
    assert_cfg_equal(&c, &back);
    assert_int_equal(q.kind, XP_QUANT_NONE);

    char dir[4096], path[4096];
    tu_fresh_dir(dir, "cfg");
    tu_join(path, dir, "config.json");
    assert_int_equal(tu_write_file(path, text, strlen(text)), 0);
    free(text);
    memset(&back, 0, sizeof back);
    assert_int_equal(xp_qwen3_config_load(dir, &back, &q), 0);
    assert_cfg_equal(&c, &back);

    /* a missing file and a bad one: the error names the place */
    tu_fresh_dir(dir, "cfg_missing");
    xp_clear_error();
    assert_int_equal(xp_qwen3_config_load(dir, &back, &q), -1);
    assert_error_contains("cfg_missing/config.json");
    tu_join(path, dir, "config.json");
    assert_int_equal(tu_write_file(path, "{\"hidden_size\": 8}", 18), 0);
    assert_int_equal(xp_qwen3_config_load(dir, &back, &q), -1);
    assert_error_contains("cfg_missing");
    assert_error_contains("intermediate_size");
}

static void test_tensor_role(void **state)
{
    static const struct {
        const char *name;
        xp_role role;
        int layer;
        xp_module mod;
    } cases[] = {
        {"model.embed_tokens.weight", XP_ROLE_EMBED, -1, 0},
        {"lm_head.weight", XP_ROLE_LM_HEAD, -1, 0},
        {"model.norm.weight", XP_ROLE_NORM, -1, 0},
        {"model.layers.0.self_attn.q_proj.weight", XP_ROLE_LINEAR, 0, XP_MOD_Q},
        {"model.layers.27.self_attn.k_proj.weight", XP_ROLE_LINEAR, 27, XP_MOD_K},
        {"model.layers.3.self_attn.v_proj.weight", XP_ROLE_LINEAR, 3, XP_MOD_V},
        {"model.layers.3.self_attn.o_proj.weight", XP_ROLE_LINEAR, 3, XP_MOD_O},
        {"model.layers.12.mlp.gate_proj.weight", XP_ROLE_LINEAR, 12, XP_MOD_GATE},
        {"model.layers.12.mlp.up_proj.weight", XP_ROLE_LINEAR, 12, XP_MOD_UP},
        {"model.layers.12.mlp.down_proj.weight", XP_ROLE_LINEAR, 12, XP_MOD_DOWN},
        {"model.layers.5.mlp.down_proj.weight_scale_inv", XP_ROLE_SCALE, 5, XP_MOD_DOWN},
        {"model.layers.5.self_attn.q_proj.weight_scale", XP_ROLE_SCALE, 5, XP_MOD_Q},
        {"model.layers.0.self_attn.q_norm.weight", XP_ROLE_NORM, -1, 0},
        {"model.layers.0.self_attn.k_norm.weight", XP_ROLE_NORM, -1, 0},
        {"model.layers.0.input_layernorm.weight", XP_ROLE_NORM, -1, 0},
        {"model.layers.0.post_attention_layernorm.weight", XP_ROLE_NORM, -1, 0},
        {"model.layers.0.mlp.q_proj.weight", XP_ROLE_OTHER, -1, 0}, /* wrong parent */
        {"model.layers.0.self_attn.gate_proj.weight", XP_ROLE_OTHER, -1, 0},
        {"model.layers.0.mlp.gate_proj.bias", XP_ROLE_OTHER, 0, XP_MOD_GATE},
        {"model.layers.0.mlp.gate_proj.weight.x", XP_ROLE_OTHER, -1, 0},
        {"model.layers.0.mlp.gate.weight", XP_ROLE_OTHER, -1, 0},
        {"model.layers.x.mlp.gate_proj.weight", XP_ROLE_OTHER, -1, 0},
        {"model.layers.0.input_layernorm.bias", XP_ROLE_OTHER, -1, 0},
        {"model.layers.0.mlp.q_norm.weight", XP_ROLE_OTHER, -1, 0},
        {"model.embed_tokens.weight_scale_inv", XP_ROLE_OTHER, -1, 0},
        {"model.rotary_emb.inv_freq", XP_ROLE_OTHER, -1, 0},
        {"", XP_ROLE_OTHER, -1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int layer = -7;
        xp_module m = XP_MOD_COUNT;
        xp_role r = xp_tensor_role(cases[i].name, &layer, &m);
        if (r != cases[i].role) fail_msg("%s: role %d, want %d", cases[i].name, r, cases[i].role);
        if (cases[i].layer >= 0) {
            assert_int_equal(layer, cases[i].layer);
            assert_int_equal(m, cases[i].mod);
        }
        assert_int_equal(xp_tensor_role(cases[i].name, NULL, NULL), cases[i].role);
    }
}

static void test_module_names_and_shapes(void **state)
{
    char *text = json(qwen3_06b);
    xp_qwen3_config c;
    assert_int_equal(xp_qwen3_config_parse(text, &c, NULL), 0);
    free(text);
    /* Qwen3-0.6B: q is 16 heads x 128 = 2048 wide, k/v 8 x 128 = 1024, hidden 1024, mlp 3072 */
    static const struct {
        xp_module m;
        const char *name, *parent;
        int64_t out, in;
    } want[] = {
        {XP_MOD_Q, "q_proj", "self_attn", 2048, 1024},
        {XP_MOD_K, "k_proj", "self_attn", 1024, 1024},
        {XP_MOD_V, "v_proj", "self_attn", 1024, 1024},
        {XP_MOD_O, "o_proj", "self_attn", 1024, 2048},
        {XP_MOD_GATE, "gate_proj", "mlp", 3072, 1024},
        {XP_MOD_UP, "up_proj", "mlp", 3072, 1024},
        {XP_MOD_DOWN, "down_proj", "mlp", 1024, 3072},
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        int64_t o = 0, in = 0;
        xp_module_shape(&c, want[i].m, &o, &in);
        assert_int_equal(o, want[i].out);
        assert_int_equal(in, want[i].in);
        assert_string_equal(xp_module_name(want[i].m), want[i].name);
        assert_string_equal(xp_module_parent(want[i].m), want[i].parent);
        xp_module back;
        assert_int_equal(xp_module_parse(want[i].name, &back), 0);
        assert_int_equal(back, want[i].m);
        char path[128], full[160];
        xp_module_path(path, sizeof path, 7, want[i].m);
        snprintf(full, sizeof full, "model.layers.7.%s.%s", want[i].parent, want[i].name);
        assert_string_equal(path, full);
        /* the path plus ".weight" reads back as that linear weight */
        snprintf(full, sizeof full, "%s.weight", path);
        int layer;
        xp_module m;
        assert_int_equal(xp_tensor_role(full, &layer, &m), XP_ROLE_LINEAR);
        assert_int_equal(layer, 7);
        assert_int_equal(m, want[i].m);
    }
    xp_module m;
    assert_int_equal(xp_module_parse("lm_head", &m), -1);
    assert_int_equal(xp_module_parse("q_proj.weight", &m), -1);
}

/* transformers keeps the last of a repeated key and cJSON the first: refused, not guessed */
static void test_repeated_key_refused(void **state)
{
    char *base = json(qwen3_06b);
    size_t n = strlen(base);
    char *twice = malloc(n + 32);
    snprintf(twice, n + 32, "%.*s,\"vocab_size\":1000}", (int)(n - 1), base);
    xp_qwen3_config c;
    xp_quant_config q;
    assert_int_equal(xp_qwen3_config_parse(twice, &c, &q), -1);
    assert_error_contains("\"vocab_size\" appears twice");
    free(twice);
    char *nested = json("{'a':{'b':1,'b':2}}");
    assert_int_equal(xp_json_check_unique(NULL, "x"), 0);
    cJSON *root = cJSON_Parse(nested);
    assert_int_equal(xp_json_check_unique(root, "x.json"), -1);
    assert_error_contains("x.json: key \"b\" appears twice");
    cJSON_Delete(root);
    free(nested);
    free(base);
}

/* Numbers that 15 digits do not pin down survive a rewrite bit for bit (cJSON alone moved
 * 1.0000000000000002e-06 to its neighbour, which the fuzzer found). */
static void test_rewrite_keeps_numbers_exact(void **state)
{
    static const struct {
        const char *was, *now;
    } edits[] = {
        {"1e-06", "1.0000000000000002e-06"}, {"1e-06", "9.9999999999999995e-07"},
        {"1e-06", "0.010000000000000002"},   {"1e-06", "4.9406564584124654e-324"},
        {"1000000,", "1000000.0000000002,"}, {"1000000,", "1.0000000000000002e15,"},
        {"1000000,", "123456789012345678,"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof *edits; i++) {
        /* spliced as text: a cJSON round trip here would round the value before the test */
        char *base = json(qwen3_06b), text[2048];
        char *at = strstr(base, edits[i].was);
        assert_non_null(at);
        snprintf(text, sizeof text, "%.*s%s%s", (int)(at - base), base, edits[i].now,
                 at + strlen(edits[i].was));
        free(base);
        xp_qwen3_config c0, c1;
        xp_quant_config q, q1;
        if (xp_qwen3_config_parse(text, &c0, &q) < 0)
            fail_msg("%s: %s", edits[i].now, xp_last_error());
        char *out = xp_config_with_quant(text, &q);
        assert_non_null(out);
        assert_int_equal(xp_qwen3_config_parse(out, &c1, &q1), 0);
        if (c0.rms_norm_eps != c1.rms_norm_eps || c0.rope_theta != c1.rope_theta)
            fail_msg("%s became %.17g / %.17g", edits[i].now, c1.rms_norm_eps, c1.rope_theta);
        char *fresh = xp_qwen3_config_json(&c0);
        assert_int_equal(xp_qwen3_config_parse(fresh, &c1, &q1), 0);
        assert_cfg_equal(&c0, &c1);
        free(fresh);
        free(out);
    }
    /* short numbers stay short, and what JSON cannot hold becomes null */
    cJSON *r = cJSON_CreateObject();
    cJSON_AddNumberToObject(r, "a", 0.02);
    cJSON_AddNumberToObject(r, "b", 151936);
    cJSON_AddNumberToObject(r, "c", NAN);
    cJSON *arr = cJSON_AddArrayToObject(r, "d");
    cJSON_AddItemToArray(arr, cJSON_CreateNumber(-1.5));
    char *s = xp_json_print(r, 0);
    assert_string_equal(s, "{\"a\":0.02,\"b\":151936,\"c\":null,\"d\":[-1.5]}");
    free(s);
    cJSON_Delete(r);
}

/* rope_scaling: YaRN with transformers' defaults and derived attention factor; plain RoPE for
 * null and "default"; anything else refused with what was wrong. */
static void test_rope_scaling(void **state)
{
    xp_qwen3_config c;
    char *t = cfg_with(qwen3_06b, "rope_scaling",
                       "{'rope_type':'yarn','factor':4.0,'original_max_position_embeddings':32768}");
    if (xp_qwen3_config_parse(t, &c, NULL) < 0) fail_msg("%s", xp_last_error());
    free(t);
    assert_int_equal(c.rope.yarn, 1);
    assert_true(c.rope.factor == 4.0);
    assert_int_equal(c.rope.original_max_position_embeddings, 32768);
    assert_true(c.rope.beta_fast == 32 && c.rope.beta_slow == 1 && c.rope.truncate == 1);
    assert_true(fabs(c.rope.attention_factor - (0.1 * log(4.0) + 1)) < 1e-15);
    assert_int_equal(c.max_position_embeddings, 40960); /* as written */
    assert_int_equal(xp_qwen3_positions(&c), 131072);   /* what the model serves */
    /* the inverse frequencies: the fast dimensions kept, the slow ones divided by the factor,
     * a ramp between (transformers' correction range: dims 23..40 of 64 here) */
    float inv[64], plain[64];
    xp_qwen3_inv_freq(&c, inv);
    xp_rope_scaling y = c.rope;
    c.rope.yarn = 0;
    xp_qwen3_inv_freq(&c, plain);
    c.rope = y;
    for (int i = 0; i < 64; i++) {
        assert_true(plain[i] == (float)pow(1e6, -2.0 * i / 128));
        if (i <= 23) assert_true(inv[i] == plain[i]);
        if (i >= 40) assert_true(inv[i] == (float)(pow(1e6, -2.0 * i / 128) / 4));
        if (i > 23 && i < 40) assert_true(inv[i] < plain[i] && inv[i] > plain[i] / 4);
    }
    /* mscale / mscale_all_dim, an explicit attention_factor, the older "type" key */
    t = cfg_with(qwen3_06b, "rope_scaling",
                 "{'type':'yarn','factor':2,'mscale':1.0,'mscale_all_dim':0.5}");
    assert_int_equal(xp_qwen3_config_parse(t, &c, NULL), 0);
    free(t);
    assert_true(fabs(c.rope.attention_factor - (0.1 * log(2.0) + 1) / (0.05 * log(2.0) + 1)) <
                1e-15);
    assert_int_equal(c.rope.original_max_position_embeddings, 40960);
    t = cfg_with(qwen3_06b, "rope_scaling", "{'rope_type':'yarn','factor':2,'attention_factor':1.5}");
    assert_int_equal(xp_qwen3_config_parse(t, &c, NULL), 0);
    free(t);
    assert_true(c.rope.attention_factor == 1.5);
    /* plain RoPE */
    t = cfg_with(qwen3_06b, "rope_scaling", "{'rope_type':'default'}");
    assert_int_equal(xp_qwen3_config_parse(t, &c, NULL), 0);
    assert_int_equal(c.rope.yarn, 0);
    free(t);
    /* the override replaces the file's, and is checked the same way */
    t = json(qwen3_06b);
    assert_int_equal(xp_qwen3_config_parse(t, &c, NULL), 0);
    free(t);
    assert_int_equal(xp_rope_scaling_parse("{\"rope_type\":\"yarn\",\"factor\":2}", &c), 0);
    assert_int_equal(c.rope.yarn, 1);
    assert_int_equal(xp_qwen3_positions(&c), 81920);
    assert_int_equal(xp_rope_scaling_parse("null", &c), 0);
    assert_int_equal(c.rope.yarn, 0);
    assert_int_equal(xp_rope_scaling_parse("{\"rope_type\":\"linear\",\"factor\":2}", &c), -1);
    assert_error_contains("rope scaling override");
    assert_error_contains("\"linear\" is not supported");
    assert_int_equal(xp_rope_scaling_parse("{yarn", &c), -1);
    assert_error_contains("not JSON");
    /* refusals */
    static const struct {
        const char *rs, *want;
    } bad[] = {{"{'rope_type':'linear','factor':2}", "\"linear\" is not supported"},
               {"{'rope_type':'dynamic','factor':2}", "\"dynamic\" is not supported"},
               {"{'rope_type':'longrope','factor':2}", "\"longrope\" is not supported"},
               {"{'rope_type':'yarn'}", "has no factor"},
               {"{'rope_type':'yarn','factor':0.5}", "factor must be a number >= 1"},
               {"{'rope_type':'yarn','factor':'2'}", "factor must be a number"},
               {"{'rope_type':'yarn','factor':2,'original_max_position_embeddings':10.5}",
                "must be an integer"},
               {"{'rope_type':'yarn','factor':2,'beta_fast':1,'beta_slow':32}",
                "beta_fast 1 is below beta_slow 32"},
               {"{'rope_type':'yarn','factor':2,'truncate':1}", "truncate must be true or false"},
               {"{'rope_type':'yarn','factor':2,'short_factor':[1]}",
                "\"short_factor\" is not a YaRN parameter"},
               {"{'rope_type':'yarn','type':'linear','factor':2}", "says rope_type"},
               {"{'factor':2}", "no rope_type"},
               {"[1]", "must be an object or null"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        t = cfg_with(qwen3_06b, "rope_scaling", bad[i].rs);
        expect_parse_fails(t, "rope_scaling", bad[i].want);
        free(t);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_qwen3_06b),
        cmocka_unit_test(test_repeated_key_refused),
        cmocka_unit_test(test_parse_quant_native),
        cmocka_unit_test(test_parse_quant_ct),
        cmocka_unit_test(test_missing_fields),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_bad_quant),
        cmocka_unit_test(test_quant_ignored),
        cmocka_unit_test(test_config_with_quant),
        cmocka_unit_test(test_rewrite_keeps_numbers_exact),
        cmocka_unit_test(test_config_json_and_load),
        cmocka_unit_test(test_tensor_role),
        cmocka_unit_test(test_module_names_and_shapes),
        cmocka_unit_test(test_rope_scaling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
