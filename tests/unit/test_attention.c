/* The CPU attention (tiles, online softmax) against an exact two-pass softmax in double over
 * the values the KV store holds, for every KV element type, ragged sequence lengths, several
 * query heads per KV head; and each row's output the same bits alone, inside a prefill tile and
 * next to other sequences' rows. */
#include "testutil.h"

#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "format/fp8.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    int H, KV, d;
} att_shape;

static void reference(const xp_kv_store *kv, const int32_t *table, int layer, int pos, int kvh,
                      const float *q, int d, double *out)
{
    float *k = malloc((size_t)d * 4), *v = malloc((size_t)d * 4);
    double *s = malloc((size_t)(pos + 1) * sizeof *s), mx = -INFINITY, sum = 0;
    xp_linear K, V;
    for (int p = 0; p <= pos; p++) {
        xp_kv_store_rows(kv, table[p / XP_KV_BLOCK], 1, layer, kvh, 0, &K);
        xp_decode_row_ref(&K, p % XP_KV_BLOCK, k);
        double dot = 0;
        for (int x = 0; x < d; x++)
            dot += (double)q[x] * k[x];
        s[p] = dot / sqrt((double)d);
        mx = fmax(mx, s[p]);
    }
    for (int x = 0; x < d; x++)
        out[x] = 0;
    for (int p = 0; p <= pos; p++)
        sum += s[p] = exp(s[p] - mx);
    for (int p = 0; p <= pos; p++) {
        xp_kv_store_rows(kv, table[p / XP_KV_BLOCK], 1, layer, kvh, 1, &V);
        xp_decode_row_ref(&V, p % XP_KV_BLOCK, v);
        for (int x = 0; x < d; x++)
            out[x] += s[p] / sum * v[x];
    }
    free(k);
    free(v);
    free(s);
}

static void check_attention(xp_kv_type type, att_shape sh, int threads)
{
    xp_qwen3_config g = {
        .num_attention_heads = sh.H, .num_key_value_heads = sh.KV, .head_dim = sh.d};
    int H = sh.H, KV = sh.KV, d = sh.d, G = H / KV, L = 2, layer = 1;
    enum { LA = 203, LB = 20, N = LA + LB, NB = 40 };
    int nba = xp_kv_blocks_for(LA), nbb = xp_kv_blocks_for(LB);
    xp_kv_store kv;
    assert_int_equal(xp_kv_store_init(&kv, type, L, KV, d, NB), 0);
    /* A's 13 blocks: ids 3..12 in a row (a run of XP_ATT_RUN and the rest of one), then 30..32;
     * B's from the top down, so no two follow each other */
    int32_t ta[16], tb[8];
    for (int i = 0; i < nba; i++)
        ta[i] = i < 10 ? 3 + i : 20 + i;
    for (int i = 0; i < nbb; i++)
        tb[i] = NB - 1 - i;
    tu_rng r;
    tu_rng_seed(&r, (uint64_t)(type * 100 + d));
    float *k = malloc((size_t)KV * d * 4), *v = malloc((size_t)KV * d * 4);
    float *q = malloc((size_t)N * H * d * 4), *att = malloc((size_t)N * H * d * 4);
    float *one = malloc((size_t)H * d * 4);
    int32_t pos[N];
    const int32_t *tables[N];
    for (int i = 0; i < N; i++) {
        pos[i] = i < LA ? i : i - LA;
        tables[i] = i < LA ? ta : tb;
        for (int x = 0; x < KV * d; x++) {
            k[x] = (float)tu_rng_normal(&r);
            v[x] = (float)tu_rng_normal(&r);
        }
        xp_kv_store_put(&kv, tables[i], layer, pos[i], k, v);
        for (int x = 0; x < H * d; x++)
            q[(size_t)i * H * d + x] = (float)tu_rng_normal(&r);
    }
    xp_pool *pool = xp_pool_create(threads);
    float **scratch = calloc((size_t)threads, sizeof *scratch),
          **lin = calloc((size_t)threads, sizeof *lin);
    for (int t = 0; t < threads; t++) {
        scratch[t] = malloc(xp_attention_scratch_floats(&g) * 4);
        lin[t] = malloc(xp_linear_scratch_floats(d) * 4);
    }
    xp_att_tile tiles[N];
    xp_batch b = {.n = N, .pos = pos, .tables = tables};
    xp_attention(pool, scratch, lin, &kv, &g, &b, layer, q, att, tiles);
    double *want = malloc((size_t)d * sizeof *want);
    for (int i = 0; i < N; i++) {
        for (int h = 0; h < H; h++) {
            const float *got = att + ((size_t)i * H + h) * d;
            reference(&kv, tables[i], layer, pos[i], h / G, q + ((size_t)i * H + h) * d, d, want);
            for (int x = 0; x < d; x++)
                if (!(fabs(got[x] - want[x]) <= 1e-5 * (1 + fabs(want[x]))))
                    fail_msg("%s row %d head %d [%d]: %g vs %g", xp_kv_type_name(type), i, h, x,
                             got[x], want[x]);
        }
        /* the row alone: the same bits */
        xp_batch b1 = {.n = 1, .pos = &pos[i], .tables = &tables[i]};
        xp_attention(pool, scratch, lin, &kv, &g, &b1, layer, q + (size_t)i * H * d, one, tiles);
        assert_memory_equal(one, att + (size_t)i * H * d, (size_t)H * d * 4);
    }
    /* the last rows of A as a prefill chunk of their own, after B's rows */
    int32_t pos2[LB + 9];
    const int32_t *tab2[LB + 9];
    float *q2 = malloc((size_t)(LB + 9) * H * d * 4), *att2 = malloc((size_t)(LB + 9) * H * d * 4);
    for (int i = 0; i < LB + 9; i++) {
        int src = i < LB ? LA + i : LA - 9 + (i - LB);
        pos2[i] = pos[src];
        tab2[i] = tables[src];
        memcpy(q2 + (size_t)i * H * d, q + (size_t)src * H * d, (size_t)H * d * 4);
    }
    xp_batch b2 = {.n = LB + 9, .pos = pos2, .tables = tab2};
    xp_attention(pool, scratch, lin, &kv, &g, &b2, layer, q2, att2, tiles);
    assert_memory_equal(att2, att + (size_t)LA * H * d, (size_t)LB * H * d * 4);
    assert_memory_equal(att2 + (size_t)LB * H * d, att + (size_t)(LA - 9) * H * d,
                        (size_t)9 * H * d * 4);
    for (int t = 0; t < threads; t++) {
        free(scratch[t]);
        free(lin[t]);
    }
    free(scratch);
    free(lin);
    xp_pool_destroy(pool);
    free(q2);
    free(att2);
    free(want);
    free(k);
    free(v);
    free(q);
    free(att);
    free(one);
    xp_kv_store_free(&kv);
}

static void all_shapes(void)
{
    static const att_shape shapes[] = {{4, 2, 16}, {8, 1, 128}, {6, 3, 40}};
    for (int t = XP_KV_F32; t <= XP_KV_FP8; t++)
        for (int s = 0; s < 3; s++)
            check_attention((xp_kv_type)t, shapes[s], 1 + s % 2 * 2);
}

static void test_attention_matches_exact_softmax(void **state)
{
    all_shapes();
}

static void test_attention_scalar(void **state)
{
    xp_cpu_force_scalar(1);
    all_shapes();
    xp_cpu_force_scalar(0);
}

/* Storing rounds as documented: BF16 to nearest even, FP8 to E4M3 of value / (amax / 448). */
static void test_kv_store_rounding(void **state)
{
    float k[32], v[32], back[32];
    for (int i = 0; i < 32; i++) {
        k[i] = (float)(i - 16) * 0.37f + 1e-3f;
        v[i] = (float)((i * 7) % 11) - 5.5f;
    }
    int32_t table[1] = {0};
    for (int t = XP_KV_F32; t <= XP_KV_FP8; t++) {
        xp_kv_store kv;
        assert_int_equal(xp_kv_store_init(&kv, (xp_kv_type)t, 1, 2, 16, 1), 0);
        xp_kv_store_put(&kv, table, 0, 3, k, v);
        for (int h = 0; h < 2; h++) {
            xp_linear K;
            xp_kv_store_rows(&kv, 0, 1, 0, h, 0, &K);
            xp_decode_row_ref(&K, 3, back);
            float amax = 0;
            for (int i = 0; i < 16; i++)
                amax = fmaxf(amax, fabsf(k[h * 16 + i]));
            for (int i = 0; i < 16; i++) {
                float x = k[h * 16 + i],
                      want = t == XP_KV_F32 ? x
                             : t == XP_KV_BF16
                                 ? xp_bf16_to_f32(xp_f32_to_bf16(x))
                                 : xp_fp8_e4m3_to_f32(xp_f32_to_fp8_e4m3(x / (amax / 448))) *
                                       (amax / 448);
                assert_memory_equal(&back[i], &want, 4);
            }
        }
        xp_kv_store_free(&kv);
    }
    xp_kv_type kt;
    assert_int_equal(xp_kv_type_parse("int8", &kt), -1);
    assert_error_contains("bf16, f32, fp8");
    assert_int_equal(xp_kv_type_parse("fp8", &kt), 0);
    assert_int_equal(kt, XP_KV_FP8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attention_matches_exact_softmax),
        cmocka_unit_test(test_attention_scalar),
        cmocka_unit_test(test_kv_store_rounding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
