/* xprec tokenize: token ids of a text or a chat with a checkpoint's tokenizer, and back. */
#include "cli.h"
#include "commands.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"
#include "util/fsutil.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const xp_tokenizer *tok;
    int decode, stream, allow_special;
    /* ids to decode are below this: the model's rows. Without a config.json nothing says how
     * many rows a model has, and ids without a token decode to nothing, as in generation. */
    long vocab;
} xp_tk_opts;

/* config.json's vocab_size when the directory has one (the model's rows: ids a model can
 * produce, padding rows without a token included); 0 without a config.json. */
static int xp_model_vocab(const char *dir, long *vocab)
{
    *vocab = 0;
    char *path = xp_path_join(dir, "config.json");
    if (!path) return xp_fail("out of memory");
    int rc = 0;
    if (access(path, F_OK) == 0) {
        char *text = xp_read_text_file(path, 1u << 20);
        cJSON *cfg = text ? cJSON_Parse(text) : NULL;
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "vocab_size");
        if (!text) rc = -1;
        else if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > INT32_MAX ||
                 v->valuedouble != (double)(long)v->valuedouble)
            rc = xp_fail("%s: vocab_size is missing or not a positive integer", path);
        else *vocab = (long)v->valuedouble;
        cJSON_Delete(cfg);
        free(text);
    }
    free(path);
    return rc;
}

static void xp_put_json_string(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c == '\r') fputs("\\r", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c < 0x20 || c == 0x7f) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void xp_put_ids(const int32_t *ids, size_t n)
{
    putchar('[');
    for (size_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", ids[i]);
    putchar(']');
}

/* Prints the ids, or with --decode the object with the text (and chunks). */
static int xp_print_result(const xp_tk_opts *o, const int32_t *ids, size_t n)
{
    if (!o->decode) {
        xp_put_ids(ids, n);
        putchar('\n');
        return 0;
    }
    size_t len;
    char *text = xp_tokenizer_decode(o->tok, ids, n, &len);
    if (!text) return -1;
    fputs("{\"ids\":", stdout);
    xp_put_ids(ids, n);
    fputs(",\"text\":", stdout);
    xp_put_json_string(text, len);
    free(text);
    if (o->stream) {
        xp_detok d;
        xp_detok_init(&d, o->tok);
        fputs(",\"chunks\":[", stdout);
        for (size_t i = 0; i <= n; i++) {
            size_t k;
            const char *piece = i < n ? xp_detok_push(&d, ids[i], &k) : xp_detok_flush(&d, &k);
            if (!piece) { /* out of memory: end the broken line */
                putchar('\n');
                xp_detok_free(&d);
                return -1;
            }
            if (i) putchar(',');
            xp_put_json_string(piece, k);
        }
        putchar(']');
        xp_detok_free(&d);
    }
    fputs("}\n", stdout);
    return 0;
}

static int xp_encode_print(const xp_tk_opts *o, const char *text, size_t len)
{
    int32_t *ids;
    size_t n;
    if (xp_tokenizer_encode(o->tok, text, len, o->allow_special, &ids, &n)) return -1;
    int rc = xp_print_result(o, ids, n);
    free(ids);
    return rc;
}

static int xp_chat_print(const xp_tk_opts *o, const char *json)
{
    xp_chat_arg ca;
    int rc = xp_chat_arg_parse(json, 1, 1, &ca);
    char *prompt = rc ? NULL : xp_chat_build(ca.msgs, ca.n, ca.add_generation_prompt,
                                             ca.enable_thinking);
    if (!rc && !prompt) rc = -1;
    if (!rc) rc = xp_encode_print(o, prompt, strlen(prompt));
    free(prompt);
    xp_chat_arg_free(&ca);
    return rc;
}

/* One JSONL line: a string to encode or a list of ids to decode. */
static int xp_jsonl_line(const xp_tk_opts *o, const char *line, size_t len)
{
    cJSON *v = cJSON_ParseWithLength(line, len);
    int rc = 0;
    if (cJSON_IsString(v)) {
        rc = xp_encode_print(o, v->valuestring, strlen(v->valuestring));
    } else if (cJSON_IsArray(v)) {
        size_t n = (size_t)cJSON_GetArraySize(v), i = 0;
        int32_t *ids = malloc((n + 1) * sizeof *ids);
        if (!ids) rc = xp_fail("out of memory");
        for (const cJSON *e = v->child; e && !rc; e = e->next) {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > INT32_MAX ||
                e->valuedouble != (double)e->valueint)
                rc = xp_fail("expected a list of token ids (integers from 0)");
            else if (o->vocab && e->valueint >= o->vocab)
                rc = xp_fail("id %d is outside the vocabulary: the model has ids 0..%ld "
                             "(config.json's vocab_size %ld)",
                             e->valueint, o->vocab - 1, o->vocab);
            else
                ids[i++] = e->valueint;
        }
        if (!rc) rc = xp_print_result(o, ids, n);
        free(ids);
    } else {
        rc = xp_fail("expected a JSON string or a list of ids");
    }
    cJSON_Delete(v);
    return rc;
}

static int xp_jsonl(const xp_tk_opts *o, const char *path)
{
    FILE *fp = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!fp) {
        perror(path);
        return 1;
    }
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t len;
    int status = 0;
    while ((len = getline(&line, &cap, fp)) >= 0) {
        lineno++;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) len--;
        if (xp_jsonl_line(o, line, (size_t)len)) {
            /* one bad input does not stop the batch; it gets an error line in its place */
            fputs("{\"error\":", stdout);
            xp_put_json_string(xp_last_error(), strlen(xp_last_error()));
            fputs("}\n", stdout);
            fprintf(stderr, "xprec tokenize: %s:%zu: %s\n", path, lineno, xp_last_error());
            status = 1;
        }
    }
    free(line);
    if (fp != stdin) fclose(fp);
    return status;
}

static void xp_print_info(const xp_tokenizer *tok)
{
    size_t n;
    const int32_t *stop = xp_tokenizer_stop_ids(tok, &n);
    printf("{\"vocab_size\":%d,\"stop_ids\":", xp_tokenizer_vocab_size(tok));
    xp_put_ids(stop, n);
    fputs("}\n", stdout);
}

int xp_cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *text = NULL, *chat = NULL, *jsonl = NULL;
    xp_tk_opts o = {0};
    int info = 0, no_special = 0;
    xp_opt opts[] = {
        XP_STR_REQ("model", &model, "DIR",
                   "directory with tokenizer.json and tokenizer_config.json"),
        XP_STR("text", &text, "TEXT", "encode TEXT (UTF-8; special tokens written in it are\n"
                                      "matched)"),
        XP_STR("chat", &chat, "JSON",
               "encode a chat in Qwen3 ChatML: a JSON list of\n"
               "{\"role\", \"content\"} messages, or {\"messages\": [...],\n"
               "\"add_generation_prompt\": true, \"enable_thinking\": true}\n"
               "(those are the defaults)"),
        XP_STR("jsonl", &jsonl, "FILE",
               "one input per line (- for stdin): a JSON string is encoded, a\n"
               "JSON list of ids is decoded; one output line per input line,\n"
               "or {\"error\": \"...\"} for a bad one (the exit status is then 1)"),
        XP_FLAG("decode", &o.decode,
                "print {\"ids\": [...], \"text\": \"...\"} with the text decoded back"),
        XP_FLAG("stream", &o.stream,
                "with --decode, add \"chunks\": what the streaming decoder\n"
                "emits for each id in turn and at the end (whole UTF-8\n"
                "characters only)"),
        XP_FLAG("no-special", &no_special,
                "encode special tokens written in the text as plain text (not\n"
                "with --chat)"),
        XP_FLAG("info", &info, "print the vocabulary size and the stop token ids, then exit"),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "tokenize",
        .usage = "usage: xprec tokenize --model DIR (--text TEXT | --chat JSON | --jsonl FILE) [opts]\n"
                 "       xprec tokenize --model DIR --info\n",
        .about = "Prints the token ids as a JSON array, one line per input.\n",
        .opts = opts};
    int st = xp_cmd_parse(&cmd, argc, argv);
    if (st >= 0) return st;
    o.allow_special = !no_special;
    int inputs = (text != NULL) + (chat != NULL) + (jsonl != NULL);
    if (info ? inputs != 0 : inputs != 1)
        return xp_cmd_usage_error(&cmd, info ? "--info takes no --text, --chat or --jsonl"
                                             : "give one of --text, --chat and --jsonl");
    if (o.stream && !o.decode) return xp_cmd_usage_error(&cmd, "--stream goes with --decode");
    /* a chat prompt needs its special tokens */
    if (chat && no_special) return xp_cmd_usage_error(&cmd, "--no-special does not go with --chat");
    xp_tokenizer *tok = xp_tokenizer_load(model);
    if (!tok) {
        fprintf(stderr, "xprec tokenize: %s\n", xp_last_error());
        return 1;
    }
    o.tok = tok;
    if (xp_model_vocab(model, &o.vocab) < 0) {
        fprintf(stderr, "xprec tokenize: %s\n", xp_last_error());
        xp_tokenizer_free(tok);
        return 1;
    }
    int status = 0;
    if (info) xp_print_info(tok);
    else if (jsonl) status = xp_jsonl(&o, jsonl);
    else if ((text ? xp_encode_print(&o, text, strlen(text)) : xp_chat_print(&o, chat))) {
        fprintf(stderr, "xprec tokenize: %s\n", xp_last_error());
        status = 1;
    }
    xp_tokenizer_free(tok);
    return status;
}
