/* The engine through its public API: batch invariance across mixed adapters, cancellation,
 * waiting for KV blocks, refusals, adapter residency. */
#include "testmodel.h"
#include "testutil.h"

#include "xprec.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NAD 7
static char model_dir[4096], adapter_dirs[NAD][4096];
static int have_model;

static int setup(void **state)
{
    xp_qwen3_config cfg = tm_small_config();
    tu_fresh_dir(model_dir, "model");
    if (tm_write_model(model_dir, &cfg, 1, 11) < 0) return 0; /* tests skip */
    for (int i = 0; i < NAD; i++) {
        char name[32];
        snprintf(name, sizeof name, "adapter%d", i);
        tu_fresh_dir(adapter_dirs[i], name);
        tm_write_adapter(adapter_dirs[i], &cfg, 4 + 4 * (i % 3), 100 + (uint64_t)i);
    }
    have_model = 1;
    return 0;
}

typedef struct {
    int32_t tokens[256];
    int n;
    char text[4096];
    size_t text_len;
    xp_finish finish;
    int completion_tokens, error;
} xp_result;

/* Collects events until every id in ids[0..n) is done. */
static void collect(xp_queue *q, const uint64_t *ids, int n, xp_result *res)
{
    int done = 0;
    while (done < n) {
        xp_event ev;
        if (!xp_queue_wait(q, &ev, 20000)) fail_msg("no event within 20 s");
        int k = 0;
        while (k < n && ids[k] != ev.id)
            k++;
        assert_true(k < n);
        xp_result *r = &res[k];
        if (ev.type == XP_EV_TOKEN) r->tokens[r->n++] = ev.token;
        if (ev.text_len && r->text_len + ev.text_len < sizeof r->text) {
            memcpy(r->text + r->text_len, ev.text, ev.text_len);
            r->text_len += ev.text_len;
        }
        if (ev.type == XP_EV_DONE) {
            r->finish = ev.finish;
            r->completion_tokens = ev.completion_tokens;
            done++;
        }
        if (ev.type == XP_EV_ERROR) {
            r->error = 1;
            done++;
        }
        xp_event_clear(&ev);
    }
}

/* A request that can never run: submit takes it, and an ERROR event says why. */
static void expect_error_event(xp_engine *e, xp_queue *q, const xp_request *r, const char *what)
{
    uint64_t id = xp_engine_submit(e, r, q);
    assert_true(id > 0);
    for (;;) {
        xp_event ev;
        if (!xp_queue_wait(q, &ev, 20000)) fail_msg("no event within 20 s");
        assert_true(ev.id == id);
        assert_true(ev.type == XP_EV_ERROR || ev.type == XP_EV_PROMPT);
        int err = ev.type == XP_EV_ERROR;
        if (err && !strstr(ev.error, what)) fail_msg("error \"%s\" lacks \"%s\"", ev.error, what);
        xp_event_clear(&ev);
        if (err) return;
    }
}

static xp_engine *start(int max_batch, int max_adapters, size_t kv_bytes, int chunk)
{
    xp_engine_opts o = {.threads = 2,
                        .kv_bytes = kv_bytes,
                        .max_batch = max_batch,
                        .max_adapters = max_adapters,
                        .prefill_chunk = chunk};
    xp_engine *e = xp_engine_create(model_dir, &o);
    if (!e) fail_msg("engine: %s", xp_last_error());
    for (int i = 0; i < NAD; i++) {
        char name[32];
        snprintf(name, sizeof name, "a%d", i);
        if (xp_engine_add_adapter(e, name, adapter_dirs[i], 0) < 0) fail_msg("%s", xp_last_error());
    }
    return e;
}

/* Bytes of one KV block in the engine's default storage. */
static size_t kv_block_bytes(void)
{
    xp_engine_opts o = {.threads = 1, .kv_bytes = 1u << 20, .max_batch = 1};
    xp_engine *e = xp_engine_create(model_dir, &o);
    if (!e) fail_msg("engine: %s", xp_last_error());
    size_t b = xp_engine_kv_block_bytes(e);
    xp_engine_destroy(e);
    return b;
}

static const char *const prompts[8] = {"The quick brown fox",
                                       "Hello",
                                       "FP8 block quantization keeps one scale per block",
                                       "1 2 3 4 5 6 7 8 9 10 11 12",
                                       "Bonjour tout le monde",
                                       "日本語のテキスト",
                                       "a",
                                       "LoRA adapters"};

static xp_request req(int i)
{
    static char names[8][8];
    snprintf(names[i], sizeof names[i], "a%d", i - 1);
    return (xp_request){.adapter = i ? names[i] : NULL, .prompt = prompts[i], .max_tokens = 12};
}

static void test_batch_invariance(void **state)
{
    if (!have_model) skip();
    /* a small prefill budget makes long prompts arrive in chunks next to decode rows */
    xp_engine *e = start(8, 8, 8u << 20, 12);
    xp_queue *q = xp_queue_create();
    xp_result alone[8] = {0}, together[8] = {0};
    for (int i = 0; i < 8; i++) {
        xp_request r = req(i);
        uint64_t id = xp_engine_submit(e, &r, q);
        assert_true(id > 0);
        collect(q, &id, 1, &alone[i]);
        assert_int_equal(alone[i].finish, XP_FINISH_LENGTH);
        assert_int_equal(alone[i].n, 12);
    }
    uint64_t ids[8];
    for (int i = 0; i < 8; i++) {
        xp_request r = req(i);
        ids[i] = xp_engine_submit(e, &r, q);
    }
    collect(q, ids, 8, together);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(together[i].n, alone[i].n);
        assert_memory_equal(together[i].tokens, alone[i].tokens, sizeof(int32_t) * 12);
        assert_int_equal(together[i].text_len, alone[i].text_len);
    }
    /* the adapter changes what the model says */
    xp_request base = {.prompt = prompts[1], .max_tokens = 12};
    xp_result b = {0};
    uint64_t id = xp_engine_submit(e, &base, q);
    collect(q, &id, 1, &b);
    assert_memory_not_equal(b.tokens, alone[1].tokens, sizeof(int32_t) * 12);
    xp_engine_stats st;
    xp_engine_stats_get(e, &st);
    assert_int_equal(st.requests_done, 17);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void wait_blocks_free(xp_engine *e)
{
    xp_engine_stats st;
    for (int t = 0; t < 2000; t++) {
        xp_engine_stats_get(e, &st);
        if (st.kv_blocks_free == st.kv_blocks_total && st.running == 0) return;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    fail_msg("KV blocks not returned: %d of %d free", st.kv_blocks_free, st.kv_blocks_total);
}

static void test_cancel_frees_blocks(void **state)
{
    if (!have_model) skip();
    xp_engine *e = start(4, 2, 8u << 20, 64);
    xp_queue *q = xp_queue_create();
    xp_request r = {.adapter = "a1", .prompt = prompts[2], .max_tokens = 1000};
    uint64_t id = xp_engine_submit(e, &r, q);
    xp_event ev;
    assert_true(xp_queue_wait(q, &ev, 20000));
    assert_int_equal(ev.type, XP_EV_PROMPT); /* tokenized */
    xp_event_clear(&ev);
    assert_true(xp_queue_wait(q, &ev, 20000));
    assert_int_equal(ev.type, XP_EV_TOKEN);
    xp_event_clear(&ev);
    xp_engine_stats st;
    xp_engine_stats_get(e, &st);
    assert_true(st.kv_blocks_free < st.kv_blocks_total);
    assert_int_equal(xp_engine_cancel(e, id), 0);
    for (;;) {
        assert_true(xp_queue_wait(q, &ev, 20000));
        int done = ev.type == XP_EV_DONE;
        if (done) {
            assert_int_equal(ev.finish, XP_FINISH_CANCELLED);
            assert_true(ev.completion_tokens < 1000);
        }
        xp_event_clear(&ev);
        if (done) break;
    }
    wait_blocks_free(e);
    assert_int_equal(xp_engine_cancel(e, 9999), -1);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void test_waits_for_blocks(void **state)
{
    if (!have_model) skip();
    /* room for 64 positions: two requests of 40 cannot run together. Both start (each takes
     * blocks as it grows); when the cache runs out the newer one is sent back and recomputed */
    xp_engine *e = start(4, 2, 4 * kv_block_bytes(), 64);
    xp_queue *q = xp_queue_create();
    int32_t toks[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    xp_request r = {.tokens = toks, .n_tokens = 8, .max_tokens = 32};
    uint64_t ids[2] = {xp_engine_submit(e, &r, q), xp_engine_submit(e, &r, q)};
    assert_true(ids[0] && ids[1]);
    xp_result res[2] = {0};
    collect(q, ids, 2, res);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(res[i].error, 0);
        assert_int_equal(res[i].completion_tokens, 32);
    }
    assert_memory_equal(res[0].tokens, res[1].tokens, 32 * sizeof(int32_t));
    xp_engine_stats st;
    xp_engine_stats_get(e, &st);
    assert_true(st.preemptions >= 1);
    /* the context is what the cache holds: a longer prompt is refused at once */
    static int32_t big[64];
    xp_request longp = {.tokens = big, .n_tokens = 64};
    expect_error_event(e, q, &longp, "the context holds 64");
    wait_blocks_free(e);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

/* Requests whose replies together outgrow the cache all start, and the ones preempted to make
 * room recompute their cache and go on exactly as if they had run alone: greedy and seeded
 * sampling, with and without adapters. */
static void test_preemption_recomputes_exactly(void **state)
{
    if (!have_model) skip();
    size_t block = 2 * 2 * 16 * 32 * sizeof(float);
    xp_engine *e = start(8, 8, 7 * block, 16);
    xp_queue *q = xp_queue_create();
    enum { N = 5, GEN = 60 };
    xp_request rs[N];
    for (int i = 0; i < N; i++) {
        rs[i] = req(i);
        rs[i].max_tokens = GEN;
        rs[i].temperature = i % 2 ? 0.9f : 0;
        rs[i].seed = 100 + (uint64_t)i;
    }
    xp_result alone[N] = {0}, together[N] = {0};
    for (int i = 0; i < N; i++) {
        uint64_t id = xp_engine_submit(e, &rs[i], q);
        assert_true(id > 0);
        collect(q, &id, 1, &alone[i]);
        assert_int_equal(alone[i].error, 0);
    }
    xp_engine_stats before, after;
    xp_engine_stats_get(e, &before);
    uint64_t ids[N];
    for (int i = 0; i < N; i++)
        ids[i] = xp_engine_submit(e, &rs[i], q);
    collect(q, ids, N, together);
    xp_engine_stats_get(e, &after);
    /* 7 blocks hold 112 positions; five replies of up to 60 tokens need far more */
    assert_true(after.preemptions > before.preemptions);
    for (int i = 0; i < N; i++) {
        assert_int_equal(together[i].error, 0);
        assert_int_equal(together[i].finish, alone[i].finish);
        assert_int_equal(together[i].n, alone[i].n);
        assert_memory_equal(together[i].tokens, alone[i].tokens, sizeof(int32_t) * alone[i].n);
        assert_int_equal(together[i].text_len, alone[i].text_len);
        assert_memory_equal(together[i].text, alone[i].text, alone[i].text_len);
    }
    wait_blocks_free(e);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void test_refusals(void **state)
{
    if (!have_model) skip();
    xp_engine *e = start(2, 2, 128 * kv_block_bytes(), 64); /* 2048 positions */
    xp_queue *q = xp_queue_create();
    xp_request r = {.adapter = "nope", .prompt = "hi"};
    assert_int_equal(xp_engine_submit(e, &r, q), 0);
    assert_error_contains("\"nope\" is not registered");
    xp_request empty = {.prompt = ""};
    expect_error_event(e, q, &empty, "empty");
    int32_t bad = 200000;
    xp_request badtok = {.tokens = &bad, .n_tokens = 1};
    expect_error_event(e, q, &badtok, "outside the vocabulary");
    static int32_t many[3000];
    xp_request longp = {.tokens = many, .n_tokens = 3000};
    expect_error_event(e, q, &longp, "the context holds");
    assert_int_equal(xp_engine_add_adapter(e, "a0", adapter_dirs[0], 0), -1);
    assert_error_contains("already registered");
    assert_int_equal(xp_engine_add_adapter(e, "x", "/nonexistent", 0), -1);
    assert_error_contains("adapter_config.json");
    assert_int_equal(xp_engine_remove_adapter(e, "a3"), 0);
    xp_request gone = {.adapter = "a3", .prompt = "hi"};
    assert_int_equal(xp_engine_submit(e, &gone, q), 0);
    xp_request ok = {.prompt = "hi", .max_tokens = 2};
    uint64_t id = xp_engine_submit(e, &ok, q);
    xp_result res = {0};
    collect(q, &id, 1, &res);
    assert_int_equal(res.completion_tokens, 2);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void test_residency_lru(void **state)
{
    if (!have_model) skip();
    xp_engine *all = start(2, 8, 8u << 20, 64), *few = start(2, 2, 8u << 20, 64);
    xp_queue *q = xp_queue_create();
    const char *order[] = {"a4", "a0", "a5", "a4", "a0", "a6"};
    for (int k = 0; k < 6; k++) {
        xp_request r = {.adapter = order[k], .prompt = prompts[0], .max_tokens = 6};
        xp_result x = {0}, y = {0};
        uint64_t id = xp_engine_submit(all, &r, q);
        collect(q, &id, 1, &x);
        id = xp_engine_submit(few, &r, q);
        collect(q, &id, 1, &y);
        /* an adapter evicted and reloaded from disk computes the same thing */
        assert_memory_equal(x.tokens, y.tokens, 6 * sizeof(int32_t));
    }
    xp_engine_stats st;
    xp_engine_stats_get(few, &st);
    assert_int_equal(st.adapters_registered, NAD);
    assert_int_equal(st.adapters_resident, 2);
    /* a6 and a5 were loaded at registration into the 2 slots; every request above but the
     * second a4 and a0 misses */
    assert_int_equal(st.adapter_misses + st.adapter_hits, 6);
    assert_true(st.adapter_misses >= 4);
    assert_true(st.adapter_evictions >= 4);
    assert_true(st.adapter_load_seconds > 0);
    xp_engine_stats_get(all, &st);
    assert_int_equal(st.adapter_misses, 0);
    assert_int_equal(st.adapter_hits, 6);
    xp_engine_destroy(all);
    xp_engine_destroy(few);
    xp_queue_destroy(q);
}

static void test_stop_id_and_string(void **state)
{
    if (!have_model) skip();
    xp_engine *e = start(2, 2, 8u << 20, 64);
    xp_queue *q = xp_queue_create();
    xp_request r = {.prompt = prompts[3], .max_tokens = 8};
    xp_result full = {0}, cut = {0};
    uint64_t id = xp_engine_submit(e, &r, q);
    collect(q, &id, 1, &full);
    /* the third token as a stop id: two tokens of text, then stop */
    r.stop_ids = &full.tokens[2];
    r.n_stop_ids = 1;
    id = xp_engine_submit(e, &r, q);
    collect(q, &id, 1, &cut);
    assert_int_equal(cut.finish, XP_FINISH_STOP);
    assert_int_equal(cut.completion_tokens, 3);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_invariance), cmocka_unit_test(test_cancel_frees_blocks),
        cmocka_unit_test(test_waits_for_blocks), cmocka_unit_test(test_preemption_recomputes_exactly),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_residency_lru),    cmocka_unit_test(test_stop_id_and_string),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
