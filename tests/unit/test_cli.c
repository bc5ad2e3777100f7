/* The command line's one option parser and its --chat argument: every kind of option, the limits
 * and their messages, --help and usage errors with their exit statuses, and both chat forms. */
#include "testutil.h"

#include "cli.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    const char *model, *out;
    long threads, seed;
    double top_p;
    int force, fmt, npos;
    xp_opt_list stops;
    xp_opt_ints ranks;
    const char *pos[2];
} args;

/* Parses the NULL-ended words with a table of every kind; stderr goes to a file read back into
 * err (so the messages can be checked). */
static int parse(args *a, char *err, size_t cap, ...)
{
    memset(a, 0, sizeof *a);
    a->ranks = (xp_opt_ints){.v = {16, 64}, .n = 2};
    xp_opt opts[] = {XP_OPT_MODEL(&a->model),
                     XP_STR("out", &a->out, "DIR", "where"),
                     XP_OPT_THREADS(&a->threads),
                     XP_OPT_SEED(&a->seed, "seed"),
                     XP_NUM("top-p", &a->top_p, 0, 1, "P", "nucleus"),
                     XP_OPT_FORCE(&a->force),
                     XP_CHOICE("format", &a->fmt, "qwen|compressed-tensors", "layout"),
                     XP_LIST("stop", &a->stops, 2, "S", "stop strings"),
                     XP_INTS("ranks", &a->ranks, 1, 256, 3, "R,R", "ranks"),
                     XP_OPT_END};
    const xp_cmd cmd = {.name = "t",
                        .usage = "usage: xprec t --model DIR\n",
                        .opts = opts,
                        .pos = a->pos,
                        .max_pos = 2,
                        .npos = &a->npos};
    char *argv[32] = {"t"};
    int argc = 1;
    va_list ap;
    va_start(ap, cap);
    for (const char *w; (w = va_arg(ap, const char *));)
        argv[argc++] = (char *)w;
    va_end(ap);
    char path[4096];
    tu_path(path, "stderr.txt");
    fflush(stderr);
    FILE *saved = stderr;
    stderr = fopen(path, "w+");
    assert_non_null(stderr);
    int rc = xp_cmd_parse(&cmd, argc, argv);
    fflush(stderr);
    rewind(stderr);
    size_t n = fread(err, 1, cap - 1, stderr);
    err[n] = '\0';
    fclose(stderr);
    stderr = saved;
    return rc;
}

static void test_kinds(void **state)
{
    args a;
    char err[4096];
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "--threads=8", "--seed", "7",
                           "--top-p", "0.5", "--force", "--format", "compressed-tensors", "--stop",
                           "a", "--stop", "b", "--ranks", "4,8,256", "x", "--", "--y", NULL),
                     -1);
    assert_string_equal(a.model, "m");
    assert_int_equal(a.threads, 8);
    assert_int_equal(a.seed, 7);
    assert_true(a.top_p == 0.5);
    assert_int_equal(a.force, 1);
    assert_int_equal(a.fmt, 1);
    assert_int_equal(a.stops.n, 2);
    assert_string_equal(a.stops.v[1], "b");
    assert_int_equal(a.ranks.n, 3);
    assert_int_equal(a.ranks.v[2], 256);
    /* arguments without dashes, and everything after "--", are positional */
    assert_int_equal(a.npos, 2);
    assert_string_equal(a.pos[0], "x");
    assert_string_equal(a.pos[1], "--y");
    assert_string_equal(err, "");
    /* defaults stay when an option is not given; a unique prefix names its option */
    assert_int_equal(parse(&a, err, sizeof err, "--mod", "m", "--th", "2", NULL), -1);
    assert_string_equal(a.model, "m");
    assert_int_equal(a.threads, 2);
    assert_int_equal(a.ranks.n, 2);
    assert_int_equal(a.ranks.v[1], 64);
}

static void test_value_errors(void **state)
{
    args a;
    char err[4096];
    static const struct {
        const char *opt, *value, *want;
    } cases[] = {
        {"--threads", "0", "xprec t: --threads needs an integer in [1, 256], got \"0\""},
        {"--threads", "300", "--threads needs an integer in [1, 256]"},
        {"--threads", "4x", "got \"4x\""},
        {"--seed", "-1", "--seed needs an integer in [0, 2147483647]"},
        {"--top-p", "1.5", "--top-p needs a number in [0, 1], got \"1.5\""},
        {"--top-p", "nan", "--top-p needs a number"},
        {"--format", "gguf", "--format is one of qwen|compressed-tensors, got \"gguf\""},
        {"--ranks", "4,,8", "--ranks needs comma-separated integers in [1, 256]"},
        {"--ranks", "4,512", "--ranks needs comma-separated integers in [1, 256]"},
        {"--ranks", "1,2,3,4", "--ranks takes at most 3 values"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(
            parse(&a, err, sizeof err, "--model", "m", cases[i].opt, cases[i].value, NULL), 2);
        if (!strstr(err, cases[i].want))
            fail_msg("%s %s: \"%s\"", cases[i].opt, cases[i].value, err);
    }
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "--stop", "a", "--stop", "b",
                           "--stop", "c", NULL),
                     2);
    assert_non_null(strstr(err, "at most 2 --stop"));
}

static void test_usage_errors(void **state)
{
    args a;
    char err[4096];
    assert_int_equal(parse(&a, err, sizeof err, NULL), 2);
    assert_non_null(strstr(err, "xprec t: --model DIR is missing"));
    assert_non_null(strstr(err, "usage: xprec t")); /* the usage follows the message */
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "--bogus", NULL), 2);
    assert_non_null(strstr(err, "unknown option --bogus"));
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "-x", NULL), 2);
    assert_non_null(strstr(err, "unknown option -x"));
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "--s", "1", NULL), 2);
    assert_non_null(strstr(err, "ambiguous option --s")); /* --seed or --stop */
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "--force=yes", NULL), 2);
    assert_non_null(strstr(err, "--force takes no value"));
    assert_int_equal(parse(&a, err, sizeof err, "--model", NULL), 2);
    assert_non_null(strstr(err, "--model needs a value"));
    assert_int_equal(parse(&a, err, sizeof err, "--model", "m", "a", "b", "c", NULL), 2);
    assert_non_null(strstr(err, "unexpected argument \"c\""));
}

static void test_help(void **state)
{
    args a;
    char err[4096], path[4096];
    tu_path(path, "stdout.txt");
    fflush(stdout);
    FILE *saved = stdout;
    stdout = fopen(path, "w");
    assert_non_null(stdout);
    /* --help wins over what is missing and exits 0 */
    int rc = parse(&a, err, sizeof err, "--help", NULL);
    fclose(stdout);
    stdout = saved;
    assert_int_equal(rc, 0);
    size_t n;
    char *out = tu_read_file(path, &n);
    assert_non_null(out);
    assert_true(strncmp(out, "usage: xprec t --model DIR\n", 27) == 0);
    /* each option with its value, its help and, for numbers, its limits */
    assert_non_null(strstr(out, "  --threads N"));
    assert_non_null(strstr(out, "[1, 256]"));
    assert_non_null(strstr(out, "  --format qwen|compressed-tensors"));
    assert_non_null(strstr(out, "  --help"));
    free(out);
}

static void test_chat_forms(void **state)
{
    xp_chat_arg c;
    assert_int_equal(xp_chat_arg_parse("[{\"role\":\"user\",\"content\":\"hi\"}]", 1, 0, &c), 0);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.msgs[0].role, "user");
    assert_string_equal(c.msgs[0].content, "hi");
    /* the caller's defaults hold where the JSON says nothing */
    assert_int_equal(c.add_generation_prompt, 1);
    assert_int_equal(c.enable_thinking, 0);
    xp_chat_arg_free(&c);
    assert_int_equal(xp_chat_arg_parse("{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
                                       "{\"role\":\"user\",\"content\":\"u\"}],"
                                       "\"enable_thinking\":true,\"add_generation_prompt\":false}",
                                       1, 0, &c),
                     0);
    assert_int_equal(c.n, 2);
    assert_string_equal(c.msgs[1].content, "u");
    assert_int_equal(c.add_generation_prompt, 0);
    assert_int_equal(c.enable_thinking, 1);
    xp_chat_arg_free(&c);
}

static void test_chat_errors(void **state)
{
    static const struct {
        const char *json, *want;
    } cases[] = {
        {"not json", "not valid JSON"},
        {"[]", "non-empty list"},
        {"{\"messages\": []}", "non-empty list"},
        {"{\"msgs\": []}", "unknown key \"msgs\""},
        {"\"hello\"", "non-empty list"},
        {"[{\"role\":\"user\"}]", "message 1 needs string \"role\" and \"content\""},
        {"[{\"role\":\"user\",\"content\":\"a\"},{\"role\":1,\"content\":\"b\"}]", "message 2"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"enable_thinking\":\"yes\"}",
         "\"enable_thinking\" must be true or false"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        xp_chat_arg c;
        assert_int_equal(xp_chat_arg_parse(cases[i].json, 1, 1, &c), -1);
        assert_error_contains(cases[i].want);
        xp_chat_arg_free(&c);
    }
}

/* One file in DIR/NAME with the text. */
static void put(const char *dir, const char *name, const char *text)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    assert_int_equal(tu_write_file(path, text, strlen(text)), 0);
}

static void test_outdir(void **state)
{
    char target[4096], path[4096];
    tu_join(target, tu_tmpdir(), "deep/er/out");
    xp_outdir o;
    /* a new target: parents made, nothing visible until commit */
    assert_int_equal(xp_outdir_begin(&o, target, 0), 0);
    put(o.tmp, "a.txt", "one");
    assert_false(tu_file_exists(target));
    assert_int_equal(xp_outdir_commit(&o), 0);
    assert_true(tu_file_exists(tu_join(path, target, "a.txt")));
    assert_false(tu_file_exists(o.tmp));
    /* a used target: refused without force; abort leaves it as it was */
    assert_int_equal(xp_outdir_begin(&o, target, 0), -1);
    assert_error_contains("exists and is not empty");
    assert_int_equal(xp_outdir_begin(&o, target, 1), 0);
    put(o.tmp, "b.txt", "two");
    xp_outdir_abort(&o);
    assert_true(tu_file_exists(tu_join(path, target, "a.txt")));
    assert_false(tu_file_exists(tu_join(path, target, "b.txt")));
    /* with force the new directory replaces the old one whole */
    assert_int_equal(xp_outdir_begin(&o, target, 1), 0);
    put(o.tmp, "b.txt", "two");
    assert_int_equal(xp_outdir_commit(&o), 0);
    assert_false(tu_file_exists(tu_join(path, target, "a.txt")));
    assert_true(tu_file_exists(tu_join(path, target, "b.txt")));
    xp_outdir_abort(&o); /* harmless after commit */
    /* no temporary directory is left beside it: ".", ".." and out */
    assert_int_equal(tu_count_suffix(tu_join(path, tu_tmpdir(), "deep/er"), ""), 3);
    /* names that are not a directory of their own */
    assert_int_equal(xp_outdir_begin(&o, "..", 1), -1);
    assert_error_contains("name the output directory itself");
    assert_int_equal(xp_outdir_begin(&o, tu_join(path, target, "b.txt"), 1), -1);
    assert_error_contains("is not a directory");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kinds),        cmocka_unit_test(test_value_errors),
        cmocka_unit_test(test_usage_errors), cmocka_unit_test(test_help),
        cmocka_unit_test(test_chat_forms),   cmocka_unit_test(test_chat_errors),
        cmocka_unit_test(test_outdir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
