/* Tokenizer on a small hand-written tokenizer.json: BPE merge order, the pre-tokenizer split,
 * added tokens, NFC, invalid UTF-8, refused configurations, decoding of invalid byte runs, the
 * streaming decoder, stop ids, ChatML, and encoding from several threads. */
#include "testutil.h"

#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* Qwen2/Qwen3's pre-tokenizer regex. */
static const char qwen_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Ids of the fixture: bytes are 0..255 (id = byte value), then these merges in rank order. */
static const char *merges[][2] = {
    {"b", "c"},      /* 256 bc */
    {"a", "b"},      /* 257 ab */
    {"h", "e"},      /* 258 he */
    {"l", "l"},      /* 259 ll */
    {"he", "ll"},    /* 260 hell */
    {"hell", "o"},   /* 261 hello */
    {"a", "a"},      /* 262 aa */
    {"o", "\xc4\xa0"}, /* 263 "o " (Ġ is the byte-level space): never formed across words */
    {"\xc4\xa0", "w"}, /* 264 " w" */
};
enum { ID_BC = 256, ID_AB, ID_HE, ID_LL, ID_HELL, ID_HELLO, ID_AA, ID_O_SPACE, ID_SPACE_W };
enum { ID_END = 300, ID_THINK, ID_A, ID_AB_ADDED, ID_STRIP };

/* GPT-2's byte -> code point map, as UTF-8. */
static void byte_char(int b, char out[3])
{
    int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    int c = b;
    if (!printable) {
        c = 256;
        for (int k = 0; k < b; k++)
            if (!((k >= '!' && k <= '~') || (k >= 0xa1 && k <= 0xac) || k >= 0xae)) c++;
    }
    if (c < 0x80) {
        out[0] = (char)c;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | c >> 6);
        out[1] = (char)(0x80 | (c & 0x3f));
        out[2] = 0;
    }
}

static cJSON *added(int id, const char *content, int special, int strip)
{
    cJSON *a = cJSON_CreateObject();
    cJSON_AddNumberToObject(a, "id", id);
    cJSON_AddStringToObject(a, "content", content);
    cJSON_AddBoolToObject(a, "single_word", 0);
    cJSON_AddBoolToObject(a, "lstrip", strip);
    cJSON_AddBoolToObject(a, "rstrip", strip);
    cJSON_AddBoolToObject(a, "normalized", 0);
    cJSON_AddBoolToObject(a, "special", special);
    return a;
}

static cJSON *typed(const char *type)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

/* The fixture tokenizer.json, shaped like Qwen3's. */
static cJSON *fixture(void)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *add = cJSON_AddArrayToObject(root, "added_tokens");
    cJSON_AddItemToArray(add, added(ID_END, "<|end|>", 1, 0));
    cJSON_AddItemToArray(add, added(ID_THINK, "<think>", 0, 0));
    cJSON_AddItemToArray(add, added(ID_A, "<a>", 0, 0));
    cJSON_AddItemToArray(add, added(ID_AB_ADDED, "<a>b", 0, 0));
    cJSON_AddItemToArray(add, added(ID_STRIP, "<s>", 1, 1));
    cJSON_AddItemToObject(root, "normalizer", typed("NFC"));

    cJSON *pre = typed("Sequence"), *list = cJSON_AddArrayToObject(pre, "pretokenizers");
    cJSON *split = typed("Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", qwen_regex);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", 0);
    cJSON *bl = typed("ByteLevel");
    cJSON_AddBoolToObject(bl, "add_prefix_space", 0);
    cJSON_AddBoolToObject(bl, "use_regex", 0);
    cJSON_AddItemToArray(list, split);
    cJSON_AddItemToArray(list, bl);
    cJSON_AddItemToObject(root, "pre_tokenizer", pre);
    cJSON_AddItemToObject(root, "post_processor", typed("ByteLevel"));
    cJSON_AddItemToObject(root, "decoder", typed("ByteLevel"));

    cJSON *model = typed("BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddBoolToObject(model, "byte_fallback", 0);
    cJSON_AddBoolToObject(model, "ignore_merges", 0);
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    char ch[3];
    for (int b = 0; b < 256; b++) {
        byte_char(b, ch);
        cJSON_AddNumberToObject(vocab, ch, b);
    }
    cJSON *m = cJSON_AddArrayToObject(model, "merges");
    for (size_t i = 0; i < sizeof merges / sizeof merges[0]; i++) {
        char both[64];
        snprintf(both, sizeof both, "%s%s", merges[i][0], merges[i][1]);
        cJSON_AddNumberToObject(vocab, both, 256 + (double)i);
        const char *pair[2] = {merges[i][0], merges[i][1]};
        cJSON_AddItemToArray(m, cJSON_CreateStringArray(pair, 2));
    }
    cJSON_AddItemToObject(root, "model", model);
    return root;
}

/* Writes tokenizer.json (consumed), tokenizer_config.json and optionally generation_config.json
 * into a fresh directory named name. */
static const char *write_dir(char *buf, const char *name, cJSON *tok, const char *gen_config)
{
    char path[4096];
    tu_fresh_dir(buf, name);
    char *text = cJSON_PrintUnformatted(tok);
    assert_int_equal(tu_write_file(tu_join(path, buf, "tokenizer.json"), text, strlen(text)), 0);
    free(text);
    cJSON_Delete(tok);
    const char *cfg = "{\"eos_token\": \"<|end|>\", \"clean_up_tokenization_spaces\": false}";
    assert_int_equal(tu_write_file(tu_join(path, buf, "tokenizer_config.json"), cfg, strlen(cfg)),
                     0);
    if (gen_config)
        assert_int_equal(tu_write_file(tu_join(path, buf, "generation_config.json"), gen_config,
                                       strlen(gen_config)),
                         0);
    return buf;
}

static xp_tokenizer *load_fixture(void)
{
    char dir[4096];
    xp_tokenizer *t = xp_tokenizer_load(write_dir(dir, "tok", fixture(), NULL));
    if (!t) fail_msg("load: %s", xp_last_error());
    return t;
}

/* Encodes s and compares with the expected ids (terminated by -1). */
static void check_encode(const xp_tokenizer *t, const char *s, int allow_special,
                         const int32_t *want)
{
    int32_t *ids;
    size_t n, k = 0;
    if (xp_tokenizer_encode(t, s, strlen(s), allow_special, &ids, &n))
        fail_msg("encode \"%s\": %s", s, xp_last_error());
    while (want[k] >= 0) k++;
    for (size_t i = 0; i < n && i < k; i++)
        if (ids[i] != want[i]) fail_msg("\"%s\": id %zu is %d, want %d", s, i, ids[i], want[i]);
    if (n != k) fail_msg("\"%s\": %zu ids, want %zu", s, n, k);
    free(ids);
}

#define ENC(t, s, special, ...) check_encode(t, s, special, (const int32_t[]){__VA_ARGS__, -1})

static void test_bpe_merge_order(void **state)
{
    xp_tokenizer *t = load_fixture();
    ENC(t, "hello", 1, ID_HELLO);
    /* "b c" outranks "a b" */
    ENC(t, "abc", 1, 'a', ID_BC);
    ENC(t, "ab", 1, ID_AB);
    /* equal ranks merge left to right */
    ENC(t, "aaa", 1, ID_AA, 'a');
    ENC(t, "aaaa", 1, ID_AA, ID_AA);
    ENC(t, "x", 1, 'x');
    int32_t *ids;
    size_t n;
    assert_int_equal(xp_tokenizer_encode(t, "", 0, 1, &ids, &n), 0);
    assert_int_equal(n, 0);
    free(ids);
    assert_int_equal(xp_tokenizer_vocab_size(t), ID_STRIP + 1);
    assert_int_equal(xp_tokenizer_token_id(t, "hello"), ID_HELLO);
    assert_int_equal(xp_tokenizer_token_id(t, "<think>"), ID_THINK);
    assert_int_equal(xp_tokenizer_token_id(t, "nope"), -1);
    xp_tokenizer_free(t);
}

static void test_pretokenizer_split(void **state)
{
    xp_tokenizer *t = load_fixture();
    /* "o " never merges: the regex puts the space in front of the next word */
    ENC(t, "hello world", 1, ID_HELLO, ID_SPACE_W, 'o', 'r', 'l', 'd');
    /* digits are split one by one, contractions apart from their word */
    ENC(t, "a12", 1, 'a', '1', '2');
    ENC(t, "he'll", 1, ID_HE, '\'', ID_LL);
    /* trailing spaces before a word stay apart from it: "  w" -> " ", " w" */
    ENC(t, "  w", 1, ' ', ID_SPACE_W);
    ENC(t, "a\r\n\r\nb", 1, 'a', '\r', '\n', '\r', '\n', 'b');
    xp_tokenizer_free(t);
}

static void test_added_tokens(void **state)
{
    xp_tokenizer *t = load_fixture();
    ENC(t, "ab<|end|>ab", 1, ID_AB, ID_END, ID_AB);
    /* special tokens can be refused; the others are always matched */
    ENC(t, "<|end|>", 0, '<', '|', 'e', 'n', 'd', '|', '>');
    ENC(t, "<think>ab", 0, ID_THINK, ID_AB);
    /* longest match: "<a>b" beats "<a>" */
    ENC(t, "<a>bc", 1, ID_AB_ADDED, 'c');
    ENC(t, "<a>c", 1, ID_A, 'c');
    ENC(t, "<a", 1, '<', 'a');
    /* lstrip/rstrip swallow the white space around "<s>", including U+3000 */
    ENC(t, "ab \t<s>\xe3\x80\x80 ab", 1, ID_AB, ID_STRIP, ID_AB);
    ENC(t, "<s>  ", 1, ID_STRIP);
    xp_tokenizer_free(t);
}

/* a and b must encode to the same ids. */
static void check_same(const xp_tokenizer *t, const char *a, const char *b)
{
    int32_t *ia, *ib;
    size_t na, nb;
    assert_int_equal(xp_tokenizer_encode(t, a, strlen(a), 1, &ia, &na), 0);
    assert_int_equal(xp_tokenizer_encode(t, b, strlen(b), 1, &ib, &nb), 0);
    if (na != nb || memcmp(ia, ib, na * sizeof *ia)) fail_msg("\"%s\" and \"%s\" differ", a, b);
    free(ia);
    free(ib);
}

static void test_nfc(void **state)
{
    xp_tokenizer *t = load_fixture();
    /* only the stretches around unstable code points are normalized: marks reordered and
     * composed inside longer text, at its ends, Hangul jamo, singletons, exclusions kept apart */
    check_same(t, "ab e\xcc\x81 cd o\xcc\xa3\xcc\x82 x", "ab \xc3\xa9 cd \xe1\xbb\x99 x");
    check_same(t, "\xcc\x81" "abc", "\xcc\x81" "abc");
    check_same(t, "abce\xcc\x81", "abc\xc3\xa9");
    check_same(t, "\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8!", "\xea\xb0\x81!");
    check_same(t, "\xea\xb0\x80\xe1\x86\xa8", "\xea\xb0\x81");
    check_same(t, "x\xe2\x84\xa6y", "x\xce\xa9y");
    check_same(t, "\xe0\xa5\x98", "\xe0\xa4\x95\xe0\xa4\xbc");
    /* e + combining acute becomes U+00E9, bytes C3 A9 */
    ENC(t, "e\xcc\x81", 1, 0xc3, 0xa9);
    ENC(t, "\xc3\xa9", 1, 0xc3, 0xa9);
    /* U+212B ANGSTROM SIGN -> U+00C5 */
    ENC(t, "\xe2\x84\xab", 1, 0xc3, 0x85);
    xp_tokenizer_free(t);
}

static void test_invalid_utf8(void **state)
{
    xp_tokenizer *t = load_fixture();
    static const char *bad[] = {
        "ab\xff",            /* never valid */
        "\xc3(",             /* missing continuation */
        "\xc0\xaf",          /* overlong */
        "\xed\xa0\x80",      /* surrogate */
        "\xf4\x90\x80\x80",  /* above U+10FFFF */
        "\xe4\xbd",          /* truncated */
        "\x80",              /* lone continuation */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int32_t *ids = (int32_t *)1;
        size_t n;
        assert_int_equal(xp_tokenizer_encode(t, bad[i], strlen(bad[i]), 1, &ids, &n), -1);
        assert_null(ids);
        assert_error_contains("not valid UTF-8");
    }
    xp_tokenizer_free(t);
}

/* Loading a fixture changed by edit must fail with an error mentioning want. */
static void check_refused(const char *name, void (*edit)(cJSON *), const char *want)
{
    char dir[4096];
    cJSON *tok = fixture();
    edit(tok);
    xp_clear_error();
    assert_null(xp_tokenizer_load(write_dir(dir, name, tok, NULL)));
    assert_error_contains(want);
}

static void nfkc(cJSON *t)
{
    cJSON_ReplaceItemInObject(t, "normalizer", typed("NFKC"));
}
static void whitespace(cJSON *t)
{
    cJSON_ReplaceItemInObject(t, "pre_tokenizer", typed("Whitespace"));
}
static void in_sequence(cJSON *t)
{
    cJSON *list = cJSON_GetObjectItem(cJSON_GetObjectItem(t, "pre_tokenizer"), "pretokenizers");
    cJSON_InsertItemInArray(list, 0, typed("Digits"));
}
static void wordpiece(cJSON *t)
{
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(t, "model"), "type",
                              cJSON_CreateString("WordPiece"));
}
static void metaspace(cJSON *t)
{
    cJSON_ReplaceItemInObject(t, "decoder", typed("Metaspace"));
}
static void template_post(cJSON *t)
{
    cJSON_ReplaceItemInObject(t, "post_processor", typed("TemplateProcessing"));
}
static void bad_merge(cJSON *t)
{
    const char *pair[2] = {"x", "y"};
    cJSON_AddItemToArray(cJSON_GetObjectItem(cJSON_GetObjectItem(t, "model"), "merges"),
                         cJSON_CreateStringArray(pair, 2));
}
static void removed_split(cJSON *t)
{
    cJSON *list = cJSON_GetObjectItem(cJSON_GetObjectItem(t, "pre_tokenizer"), "pretokenizers");
    cJSON_ReplaceItemInObject(cJSON_GetArrayItem(list, 0), "behavior",
                              cJSON_CreateString("Removed"));
}
static void bad_regex(cJSON *t)
{
    cJSON *list = cJSON_GetObjectItem(cJSON_GetObjectItem(t, "pre_tokenizer"), "pretokenizers");
    cJSON_ReplaceItemInObject(cJSON_GetObjectItem(cJSON_GetArrayItem(list, 0), "pattern"), "Regex",
                              cJSON_CreateString("(unclosed"));
}
static void no_byte(cJSON *t)
{
    cJSON_DeleteItemFromObjectCaseSensitive(
        cJSON_GetObjectItem(cJSON_GetObjectItem(t, "model"), "vocab"), "z");
}

static void test_refused_configs(void **state)
{
    check_refused("nfkc", nfkc, "normalizer type \"NFKC\" is not supported");
    check_refused("ws", whitespace, "pre_tokenizer type \"Whitespace\" is not supported");
    check_refused("seq", in_sequence, "\"Digits\"");
    check_refused("wp", wordpiece, "model type \"WordPiece\" is not supported");
    check_refused("ms", metaspace, "decoder type \"Metaspace\" is not supported");
    check_refused("tp", template_post, "post_processor type \"TemplateProcessing\"");
    check_refused("merge", bad_merge, "is not in the vocabulary");
    check_refused("removed", removed_split, "behavior \"Removed\" is not supported");
    check_refused("regex", bad_regex, "pre-tokenizer regex");
    check_refused("byte", no_byte, "no token for byte 0x7a");
    xp_clear_error();
    assert_null(xp_tokenizer_load(tu_path((char[4096]){0}, "no-such-dir")));
    assert_error_contains("tokenizer.json");
}

/* Decodes ids whole and streamed one at a time; both must give want, every chunk whole UTF-8. */
static void check_decode(const xp_tokenizer *t, const int32_t *ids, size_t n, const char *want)
{
    size_t len;
    char *whole = xp_tokenizer_decode(t, ids, n, &len);
    assert_non_null(whole);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(whole, want, len);
    free(whole);

    xp_detok d;
    xp_detok_init(&d, t);
    char streamed[256] = "";
    size_t used = 0;
    for (size_t i = 0; i <= n; i++) {
        size_t k;
        const char *piece = i < n ? xp_detok_push(&d, ids[i], &k) : xp_detok_flush(&d, &k);
        assert_non_null(piece);
        /* a chunk never starts with a continuation byte nor ends inside a character */
        if (k) {
            assert_true(((unsigned char)piece[0] & 0xc0) != 0x80);
            int32_t *check;
            size_t nc;
            assert_int_equal(xp_tokenizer_encode(t, piece, k, 1, &check, &nc), 0);
            free(check);
        }
        assert_true(used + k < sizeof streamed);
        memcpy(streamed + used, piece, k);
        used += k;
    }
    xp_detok_free(&d);
    assert_int_equal(used, strlen(want));
    assert_memory_equal(streamed, want, used);
}

#define DEC(t, want, ...)                                                                          \
    do {                                                                                           \
        const int32_t ids_[] = {__VA_ARGS__};                                                      \
        check_decode(t, ids_, sizeof ids_ / sizeof ids_[0], want);                                 \
    } while (0)

static void test_decode_and_stream(void **state)
{
    xp_tokenizer *t = load_fixture();
    DEC(t, "hello world", ID_HELLO, ID_SPACE_W, 'o', 'r', 'l', 'd');
    DEC(t, "\xc3\xa9", 0xc3, 0xa9);
    DEC(t, "\xf0\x9f\x98\x80", 0xf0, 0x9f, 0x98, 0x80);
    DEC(t, "ab<|end|><think>", ID_AB, ID_END, ID_THINK);
    /* invalid runs become U+FFFD the way the WHATWG decoder does it */
    DEC(t, "\xef\xbf\xbd", 0xff);
    DEC(t, "\xef\xbf\xbd", 0xc3);
    DEC(t, "\xef\xbf\xbd" "a", 0xc3, 'a');
    DEC(t, "\xef\xbf\xbd\xef\xbf\xbd", 0xe0, 0x80);
    DEC(t, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 0xed, 0xa0, 0x80);
    DEC(t, "\xef\xbf\xbd\xef\xbf\xbd", 0xc0, 0xaf);
    DEC(t, "\xef\xbf\xbd" "a", 0xf0, 0x9f, 0x98, 'a');
    DEC(t, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 0xf4, 0x90, 0x80, 0x80);
    /* an added token ends a truncated character */
    DEC(t, "\xef\xbf\xbd<|end|>\xef\xbf\xbd\xef\xbf\xbd", 0xe4, ID_END, 0xbd, 0xa0);
    /* ids without a token decode to nothing, even inside a character */
    DEC(t, "a\xc3\xa9", 'a', 290, 0xc3, -1, 99999, 0xa9, 290);
    xp_tokenizer_free(t);
}

static void test_stop_ids(void **state)
{
    char dir[4096];
    const char *gen = "{\"eos_token_id\": [301, 300, 99999]}";
    xp_tokenizer *t = xp_tokenizer_load(write_dir(dir, "gen", fixture(), gen));
    assert_non_null(t);
    size_t n;
    const int32_t *stop = xp_tokenizer_stop_ids(t, &n);
    /* generation_config first, then eos_token from tokenizer_config; unknown ids dropped */
    assert_int_equal(n, 2);
    assert_int_equal(stop[0], ID_THINK);
    assert_int_equal(stop[1], ID_END);
    assert_true(xp_tokenizer_is_stop(t, ID_END));
    assert_false(xp_tokenizer_is_stop(t, 'a'));
    xp_tokenizer_free(t);
}

static void check_chat(const xp_chat_msg *m, size_t n, int gen, int think, const char *want)
{
    char *got = xp_chat_build(m, n, gen, think);
    if (!got) fail_msg("chat: %s", xp_last_error());
    if (strcmp(got, want)) fail_msg("chat:\n%s\nwant:\n%s", got, want);
    free(got);
}

static void test_chatml(void **state)
{
    const xp_chat_msg sys_user[] = {{"system", "Be brief."}, {"user", "Hi"}};
    check_chat(sys_user, 2, 1, 1,
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\n");
    check_chat(sys_user + 1, 1, 1, 0,
               "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    check_chat(sys_user + 1, 1, 0, 0, "<|im_start|>user\nHi<|im_end|>\n");
    /* earlier assistant turns lose their reasoning */
    const xp_chat_msg history[] = {
        {"user", "1+1?"}, {"assistant", "<think>\nadd\n</think>\n\n2"}, {"user", "2+2?"}};
    check_chat(history, 3, 1, 1,
               "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
               "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n");
    /* the last assistant turn after the query keeps it (and gets an empty one if it has none) */
    check_chat(history, 2, 0, 1,
               "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n"
               "2<|im_end|>\n");
    const xp_chat_msg plain[] = {{"user", "q"}, {"assistant", "a"}};
    check_chat(plain, 2, 0, 1,
               "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na"
               "<|im_end|>\n");
    /* consecutive tool results share one user turn */
    const xp_chat_msg tools[] = {{"user", "q"}, {"assistant", "calling"}, {"tool", "r1"},
                                 {"tool", "r2"}};
    check_chat(tools, 4, 1, 1,
               "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\ncalling<|im_end|>\n"
               "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n"
               "</tool_response><|im_end|>\n<|im_start|>assistant\n");
    const xp_chat_msg bad[] = {{"robot", "x"}};
    assert_null(xp_chat_build(bad, 1, 1, 1));
    assert_error_contains("unknown role \"robot\"");
}

typedef struct {
    const xp_tokenizer *t;
    const char *text;
    int32_t *ids;
    size_t n;
    int rc;
} job;

static void *encode_many(void *arg)
{
    job *j = arg;
    for (int i = 0; i < 200 && !j->rc; i++) {
        free(j->ids);
        j->rc = xp_tokenizer_encode(j->t, j->text, strlen(j->text), 1, &j->ids, &j->n);
    }
    return NULL;
}

static void test_threads(void **state)
{
    xp_tokenizer *t = load_fixture();
    const char *text = "hello world, aaa abc <think> he'll \xc3\xa9t\xc3\xa9 12345 hello hello";
    int32_t *want;
    size_t nwant;
    assert_int_equal(xp_tokenizer_encode(t, text, strlen(text), 1, &want, &nwant), 0);
    job jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        jobs[i] = (job){t, text, NULL, 0, 0};
        assert_int_equal(pthread_create(&th[i], NULL, encode_many, &jobs[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(jobs[i].rc, 0);
        assert_int_equal(jobs[i].n, nwant);
        assert_memory_equal(jobs[i].ids, want, nwant * sizeof *want);
        free(jobs[i].ids);
    }
    free(want);
    xp_tokenizer_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bpe_merge_order),  cmocka_unit_test(test_pretokenizer_split),
        cmocka_unit_test(test_added_tokens),     cmocka_unit_test(test_nfc),
        cmocka_unit_test(test_invalid_utf8),     cmocka_unit_test(test_refused_configs),
        cmocka_unit_test(test_decode_and_stream), cmocka_unit_test(test_stop_ids),
        cmocka_unit_test(test_chatml),           cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
