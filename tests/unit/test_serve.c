/* The serving core's threads and residency through the public API: submit never tokenizes on
 * the caller's thread, a cold adapter load never stalls running streams, pinned adapters stay,
 * adapters registered asynchronously, held requests, cancellation in intake, and logprobs
 * against the backend run directly. */
#include "testmodel.h"
#include "testutil.h"

#include "model/model.h"
#include "runner.h"
#include "xprec.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NAD 5
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
        tm_write_adapter(adapter_dirs[i], &cfg, 4 + 4 * (i % 3), 200 + (uint64_t)i);
    }
    have_model = 1;
    return 0;
}

static xp_engine *engine(int max_batch, int max_adapters)
{
    xp_engine_opts o = {.threads = 2, .kv_bytes = 8u << 20, .max_batch = max_batch,
                        .max_adapters = max_adapters, .prefill_chunk = 64};
    xp_engine *e = xp_engine_create(model_dir, &o);
    if (!e) fail_msg("engine: %s", xp_last_error());
    return e;
}

/* Next event for id, skipping PROMPT events; fails after 20 s. */
static void next_event(xp_queue *q, uint64_t id, xp_event *ev)
{
    for (;;) {
        if (!xp_queue_wait(q, ev, 20000)) fail_msg("no event within 20 s");
        if (ev->id != id) fail_msg("event for request %llu, expected %llu",
                                   (unsigned long long)ev->id, (unsigned long long)id);
        if (ev->type != XP_EV_PROMPT) return;
        xp_event_clear(ev);
    }
}

/* Tokens of one request to its end; returns the count, finish in *why (-1 on ERROR). */
static int run_to_end(xp_queue *q, uint64_t id, int32_t *toks, int max, int *why)
{
    int n = 0;
    for (;;) {
        xp_event ev;
        next_event(q, id, &ev);
        if (ev.type == XP_EV_TOKEN && n < max) toks[n++] = ev.token;
        int end = ev.type == XP_EV_DONE || ev.type == XP_EV_ERROR;
        if (end) *why = ev.type == XP_EV_DONE ? (int)ev.finish : -1;
        xp_event_clear(&ev);
        if (end) return n;
    }
}

static const xp_adapter_info *find_info(const xp_adapter_info *info, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(info[i].name, name) == 0) return &info[i];
    fail_msg("adapter %s not listed", name);
    return NULL;
}

static void test_submit_returns_before_tokenizing(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(2, 2);
    xp_queue *q = xp_queue_create();
    /* 100k characters of varied words: tens of milliseconds of tokenizing, and more tokens
     * than the context holds */
    size_t n = 100000;
    char *big = malloc(n + 1);
    tu_rng r;
    tu_rng_seed(&r, 5);
    for (size_t i = 0; i < n; i++)
        big[i] = tu_rng_u64(&r) % 7 == 0 ? ' ' : (char)('a' + tu_rng_u64(&r) % 26);
    big[n] = '\0';
    xp_request req = {.prompt = big, .max_tokens = 4};
    uint64_t id = xp_engine_submit(e, &req, q);
    /* it came back with an id although the prompt cannot run: nothing was tokenized yet */
    assert_true(id > 0);
    xp_event ev;
    assert_int_equal(xp_queue_pop(q, &ev), 0);
    memset(big, 'x', n); /* the engine works on its own copy */
    free(big);
    if (!xp_queue_wait(q, &ev, 20000)) fail_msg("no event");
    assert_int_equal(ev.type, XP_EV_ERROR);
    assert_non_null(strstr(ev.error, "the context holds"));
    xp_event_clear(&ev);
    /* and the engine serves the next request */
    xp_request ok = {.prompt = "hello", .max_tokens = 3};
    int32_t toks[8];
    int why;
    id = xp_engine_submit(e, &ok, q);
    assert_int_equal(run_to_end(q, id, toks, 8, &why), 3);
    assert_int_equal(why, XP_FINISH_LENGTH);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void copy_file(const char *from, const char *to)
{
    size_t n;
    char *d = tu_read_file(from, &n);
    assert_non_null(d);
    assert_int_equal(tu_write_file(to, d, n), 0);
    free(d);
}

/* A cold adapter's disk read is held up on purpose (its adapter_config.json is a FIFO nobody
 * writes yet): a running stream keeps producing tokens meanwhile, then the load completes and
 * the request that needed it gives what the same adapter gives from plain files. */
static void test_cold_load_does_not_stall(void **state)
{
    if (!have_model) skip();
    char cold[4096], src[4096], p[4096], real[4096];
    tu_fresh_dir(cold, "cold");
    copy_file(tu_join(src, adapter_dirs[2], "adapter_config.json"),
              tu_join(real, cold, "cfg.real"));
    copy_file(tu_join(src, adapter_dirs[2], "adapter_model.safetensors"),
              tu_join(p, cold, "adapter_model.safetensors"));
    copy_file(real, tu_join(p, cold, "adapter_config.json"));
    xp_engine *e = engine(4, 2);
    assert_int_equal(xp_engine_add_adapter(e, "a0", adapter_dirs[0], 0), 0);
    assert_int_equal(xp_engine_add_adapter(e, "a1", adapter_dirs[1], 0), 0);
    /* both slots taken: "cold" is registered on disk only */
    assert_int_equal(xp_engine_add_adapter(e, "cold", cold, 0), 0);
    assert_int_equal(unlink(p), 0);
    assert_int_equal(mkfifo(p, 0600), 0);
    xp_queue *q = xp_queue_create();
    xp_request stream = {.prompt = "The quick brown fox", .max_tokens = 300};
    uint64_t sid = xp_engine_submit(e, &stream, q);
    xp_event ev;
    next_event(q, sid, &ev);
    assert_int_equal(ev.type, XP_EV_TOKEN);
    xp_event_clear(&ev);
    xp_queue *cq = xp_queue_create();
    xp_request need = {.adapter = "cold", .prompt = "Hello", .max_tokens = 5};
    uint64_t cid = xp_engine_submit(e, &need, cq);
    assert_true(cid > 0);
    /* wait for the loader to be on it */
    xp_adapter_info info[4];
    for (int t = 0;; t++) {
        int n = xp_engine_adapters(e, info, 4);
        if (find_info(info, n, "cold")->tier == XP_TIER_LOADING) break;
        if (t > 20000) fail_msg("the cold adapter never started loading");
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    /* the stream goes on while the disk read is stuck */
    int during = 0;
    while (during < 10) {
        next_event(q, sid, &ev);
        assert_int_equal(ev.type, XP_EV_TOKEN);
        during++;
        xp_event_clear(&ev);
    }
    int n = xp_engine_adapters(e, info, 4);
    assert_int_equal(find_info(info, n, "cold")->tier, XP_TIER_LOADING);
    /* the request that needs it has no token yet (its PROMPT event may be there) */
    while (xp_queue_pop(cq, &ev)) {
        assert_int_equal(ev.type, XP_EV_PROMPT);
        xp_event_clear(&ev);
    }
    /* let the read through */
    size_t len;
    char *cfg = tu_read_file(real, &len);
    int fd = open(p, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, cfg, len), (ssize_t)len);
    close(fd);
    free(cfg);
    int32_t got[8], want[8];
    int why;
    assert_int_equal(run_to_end(cq, cid, got, 8, &why), 5);
    assert_true(xp_engine_cancel(e, sid) == 0);
    int32_t rest[400];
    run_to_end(q, sid, rest, 400, &why);
    n = xp_engine_adapters(e, info, 4);
    const xp_adapter_info *c = find_info(info, n, "cold");
    assert_int_equal(c->tier, XP_TIER_RESIDENT);
    assert_int_equal(c->loads, 1);
    assert_true(c->load_seconds > 0);
    /* the same adapter from plain files, in another engine */
    xp_engine *ref = engine(1, 1);
    assert_int_equal(xp_engine_add_adapter(ref, "x", adapter_dirs[2], 0), 0);
    need.adapter = "x";
    uint64_t rid = xp_engine_submit(ref, &need, cq);
    assert_int_equal(run_to_end(cq, rid, want, 8, &why), 5);
    assert_memory_equal(got, want, 5 * sizeof(int32_t));
    xp_engine_destroy(ref);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
    xp_queue_destroy(cq);
}

static void test_pinning(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(2, 2);
    xp_queue *q = xp_queue_create();
    assert_int_equal(xp_engine_add_adapter(e, "p", adapter_dirs[0], XP_ADAPTER_PINNED), 0);
    for (int i = 1; i < 4; i++) {
        char name[16];
        snprintf(name, sizeof name, "a%d", i);
        assert_int_equal(xp_engine_add_adapter(e, name, adapter_dirs[i], 0), 0);
    }
    /* one slot for three unpinned adapters: they take turns, p stays */
    const char *order[] = {"a1", "a2", "a3", "a1", "p", "a2"};
    for (int k = 0; k < 6; k++) {
        xp_request r = {.adapter = order[k], .prompt = "Hi", .max_tokens = 2};
        int32_t t[4];
        int why;
        uint64_t id = xp_engine_submit(e, &r, q);
        assert_int_equal(run_to_end(q, id, t, 4, &why), 2);
    }
    xp_adapter_info info[8];
    int n = xp_engine_adapters(e, info, 8);
    assert_int_equal(n, 4);
    const xp_adapter_info *p = find_info(info, n, "p");
    assert_int_equal(p->pinned, 1);
    assert_int_equal(p->tier, XP_TIER_RESIDENT);
    assert_int_equal(p->evictions, 0);
    assert_int_equal(p->hits, 1);
    assert_true(find_info(info, n, "a1")->evictions >= 1);
    /* a second pinned adapter takes the other slot from an idle one; a third has no room */
    assert_int_equal(xp_engine_add_adapter(e, "q", adapter_dirs[4], XP_ADAPTER_PINNED), 0);
    assert_int_equal(xp_engine_add_adapter(e, "r", adapter_dirs[1], XP_ADAPTER_PINNED), -1);
    assert_error_contains("cannot be pinned");
    /* with every slot pinned an unpinned adapter can never load: refused, not left waiting */
    xp_request r = {.adapter = "a2", .prompt = "Hi", .max_tokens = 2};
    uint64_t id = xp_engine_submit(e, &r, q);
    xp_event ev;
    next_event(q, id, &ev);
    assert_int_equal(ev.type, XP_EV_ERROR);
    assert_non_null(strstr(ev.error, "pinned"));
    xp_event_clear(&ev);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void test_add_adapter_async(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(2, 2);
    xp_queue *q = xp_queue_create();
    uint64_t t = xp_engine_add_adapter_async(e, "late", adapter_dirs[1], 0, q);
    assert_true(t > 0);
    xp_event ev;
    next_event(q, t, &ev);
    assert_int_equal(ev.type, XP_EV_DONE);
    xp_event_clear(&ev);
    assert_int_equal(xp_engine_add_adapter_async(e, "late", adapter_dirs[2], 0, q), 0);
    assert_error_contains("already registered");
    t = xp_engine_add_adapter_async(e, "bad", "/nonexistent", 0, q);
    assert_true(t > 0);
    next_event(q, t, &ev);
    assert_int_equal(ev.type, XP_EV_ERROR);
    assert_non_null(strstr(ev.error, "adapter_config.json"));
    xp_event_clear(&ev);
    /* the late one serves like the same files registered the plain way */
    assert_int_equal(xp_engine_add_adapter(e, "same", adapter_dirs[1], 0), 0);
    int32_t a[8], b[8];
    int why;
    xp_request r = {.adapter = "late", .prompt = "Hello there", .max_tokens = 6};
    uint64_t id = xp_engine_submit(e, &r, q);
    assert_int_equal(run_to_end(q, id, a, 8, &why), 6);
    r.adapter = "same";
    id = xp_engine_submit(e, &r, q);
    assert_int_equal(run_to_end(q, id, b, 8, &why), 6);
    assert_memory_equal(a, b, 6 * sizeof(int32_t));
    /* removing it frees it once idle; a request naming it is then refused */
    assert_int_equal(xp_engine_remove_adapter(e, "late"), 0);
    xp_adapter_info info[4];
    assert_int_equal(xp_engine_adapters(e, info, 4), 1);
    assert_int_equal(xp_engine_submit(e, &(xp_request){.adapter = "late", .prompt = "x"}, q), 0);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

static void test_hold_and_cancel(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(2, 2);
    xp_queue *q = xp_queue_create();
    xp_request r = {.prompt = "Hello world", .max_tokens = 4, .hold = 1};
    uint64_t id = xp_engine_submit(e, &r, q);
    xp_event ev;
    assert_true(xp_queue_wait(q, &ev, 20000));
    assert_int_equal(ev.type, XP_EV_PROMPT);
    assert_true(ev.prompt_tokens > 0);
    assert_non_null(ev.prompt_ids);
    xp_event_clear(&ev);
    /* held: nothing runs until it is started */
    assert_int_equal(xp_queue_wait(q, &ev, 200), 0);
    xp_engine_stats st;
    xp_engine_stats_get(e, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(xp_engine_start(e, id), 0);
    assert_int_equal(xp_engine_start(e, id), -1);
    int32_t t[8];
    int why;
    assert_int_equal(run_to_end(q, id, t, 8, &why), 4);
    /* a held request cancelled: DONE, cancelled, nothing generated */
    id = xp_engine_submit(e, &r, q);
    assert_true(xp_queue_wait(q, &ev, 20000));
    assert_int_equal(ev.type, XP_EV_PROMPT);
    xp_event_clear(&ev);
    assert_int_equal(xp_engine_cancel(e, id), 0);
    next_event(q, id, &ev);
    assert_int_equal(ev.type, XP_EV_DONE);
    assert_int_equal(ev.finish, XP_FINISH_CANCELLED);
    assert_int_equal(ev.completion_tokens, 0);
    xp_event_clear(&ev);
    /* cancelled while in intake, behind a long prompt: ends cancelled too */
    char *big = malloc(60001);
    for (int i = 0; i < 60000; i++)
        big[i] = (char)('a' + i * 7 % 26);
    big[60000] = '\0';
    xp_request slow = {.prompt = big, .max_tokens = 1};
    uint64_t a = xp_engine_submit(e, &slow, q);
    xp_request quick = {.prompt = "hi", .max_tokens = 3};
    uint64_t b = xp_engine_submit(e, &quick, q);
    free(big);
    assert_int_equal(xp_engine_cancel(e, b), 0);
    int done_b = 0, seen_a = 0;
    while (!done_b || !seen_a) {
        assert_true(xp_queue_wait(q, &ev, 20000));
        if (ev.id == a && (ev.type == XP_EV_ERROR || ev.type == XP_EV_DONE)) seen_a = 1;
        if (ev.id == b) {
            assert_true(ev.type != XP_EV_TOKEN);
            if (ev.type == XP_EV_DONE) {
                assert_int_equal(ev.finish, XP_FINISH_CANCELLED);
                done_b = 1;
            }
        }
        xp_event_clear(&ev);
    }
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

/* 1 when s[0..n) is whole UTF-8 characters */
static int utf8_whole(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
        if (k == 0 || i + k > n) return 0;
        for (size_t j = 1; j < k; j++)
            if (((unsigned char)s[i + j] & 0xc0) != 0x80) return 0;
        i += k;
    }
    return 1;
}

/* Text held back for a possible stop string is counted in bytes; what is sent must still be
 * whole characters, event by event. */
static void test_stop_holdback_keeps_characters(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(2, 2);
    xp_queue *q = xp_queue_create();
    const char *stop[] = {"\x01\x02\x03\x04\x05\x06\x07"}; /* never generated */
    int multibyte = 0;
    for (uint64_t seed = 1; seed <= 6; seed++) {
        xp_request r = {.prompt = "日本語のテキスト", .max_tokens = 40, .temperature = 1.0f,
                        .seed = seed, .stop = stop, .n_stop = 1};
        uint64_t id = xp_engine_submit(e, &r, q);
        for (;;) {
            xp_event ev;
            next_event(q, id, &ev);
            if (ev.text_len) {
                if (!utf8_whole(ev.text, ev.text_len)) fail_msg("event text splits a character");
                for (size_t i = 0; i < ev.text_len; i++)
                    multibyte += (unsigned char)ev.text[i] >= 0x80;
            }
            int end = ev.type == XP_EV_DONE || ev.type == XP_EV_ERROR;
            assert_true(ev.type != XP_EV_ERROR);
            xp_event_clear(&ev);
            if (end) break;
        }
    }
    assert_true(multibyte > 0); /* the case was exercised */
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

/* log-softmax of one logits row, in double */
static void log_softmax(const float *x, int n, double *out)
{
    double mx = x[0], s = 0;
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++)
        s += exp((double)x[i] - mx);
    for (int i = 0; i < n; i++)
        out[i] = (double)x[i] - mx - log(s);
}

static void test_logprobs_match_backend(void **state)
{
    if (!have_model) skip();
    xp_engine *e = engine(4, 2);
    xp_queue *q = xp_queue_create();
    int32_t prompt[6] = {9707, 11, 1879, 0, 220, 17};
    enum { GEN = 5, TOP = 5 };
    xp_request r = {.tokens = prompt, .n_tokens = 6, .max_tokens = GEN, .logprobs = 1,
                    .top_logprobs = TOP, .prompt_logprobs = 1};
    uint64_t id = xp_engine_submit(e, &r, q);
    xp_logprobs plp[6], glp[GEN];
    int32_t gen[GEN];
    int ng = 0, got_plp = 0;
    for (;;) {
        xp_event ev;
        assert_true(xp_queue_wait(q, &ev, 20000));
        assert_true(ev.id == id);
        if (ev.type == XP_EV_PROMPT_LOGPROBS) {
            assert_int_equal(ng, 0); /* before the first token */
            assert_int_equal(ev.prompt_tokens, 6);
            memcpy(plp, ev.prompt_logprobs, sizeof plp);
            got_plp = 1;
        }
        if (ev.type == XP_EV_TOKEN) {
            assert_non_null(ev.logprobs);
            assert_int_equal(ev.logprobs->chosen.token, ev.token);
            glp[ng] = *ev.logprobs;
            gen[ng++] = ev.token;
        }
        int end = ev.type == XP_EV_DONE || ev.type == XP_EV_ERROR;
        assert_true(ev.type != XP_EV_ERROR);
        xp_event_clear(&ev);
        if (end) break;
    }
    assert_true(got_plp);
    assert_int_equal(ng, GEN);
    /* the same tokens through the backend directly */
    xp_model *m;
    assert_int_equal(xp_model_load(model_dir, &m), 0);
    int V = m->cfg.vocab_size, n = 6 + GEN;
    int32_t all[6 + GEN];
    memcpy(all, prompt, sizeof prompt);
    memcpy(all + 6, gen, sizeof gen);
    xp_runner *run = xp_runner_create(m, "cpu", 2, 64, 16);
    assert_non_null(run);
    float *logits = malloc(sizeof(float) * (size_t)n * V);
    double *ls = malloc(sizeof(double) * V);
    assert_int_equal(xp_runner_run(run, all, 0, n, 0, logits), 0);
    assert_int_equal(plp[0].n_top, 0);
    for (int p = 1; p < n; p++) {
        log_softmax(logits + (size_t)(p - 1) * V, V, ls);
        const xp_logprobs *lp = p < 6 ? &plp[p] : &glp[p - 6];
        assert_int_equal(lp->chosen.token, all[p]);
        assert_true(fabs(lp->chosen.logprob - ls[all[p]]) < 1e-4);
        assert_int_equal(lp->n_top, TOP);
        for (int k = 0; k < TOP; k++) {
            assert_true(fabs(lp->top[k].logprob - ls[lp->top[k].token]) < 1e-4);
            if (k) assert_true(lp->top[k].logprob <= lp->top[k - 1].logprob);
        }
        /* nothing outside the top is more likely than its last */
        for (int i = 0; i < V; i++)
            assert_true(ls[i] <= lp->top[TOP - 1].logprob + 1e-5 ||
                        (lp->top[0].token == i || lp->top[1].token == i || lp->top[2].token == i ||
                         lp->top[3].token == i || lp->top[4].token == i));
        /* greedy: the chosen token is the most likely */
        if (p >= 6) assert_int_equal(lp->top[0].token, all[p]);
    }
    free(logits);
    free(ls);
    xp_runner_destroy(run);
    xp_model_free(m);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_submit_returns_before_tokenizing),
        cmocka_unit_test(test_cold_load_does_not_stall),
        cmocka_unit_test(test_pinning),
        cmocka_unit_test(test_add_adapter_async),
        cmocka_unit_test(test_hold_and_cancel),
        cmocka_unit_test(test_logprobs_match_backend),
        cmocka_unit_test(test_stop_holdback_keeps_characters),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
