/* xprec tokenize: token ids of a text or a chat with a checkpoint's tokenizer, and back. */
#include "tokenizer/chat.h"
#include "commands.h"
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void xp_tokenize_usage(FILE *fp)
{
    fputs("usage: xprec tokenize --model DIR (--text TEXT | --chat JSON | --jsonl FILE) [opts]\n"
          "\n"
          "Prints the token ids as a JSON array, one line per input.\n"
          "\n"
          "  --model DIR   checkpoint directory with tokenizer.json and tokenizer_config.json\n"
          "  --text TEXT   encode TEXT (UTF-8; special tokens written in it are matched)\n"
          "  --chat JSON   encode a chat in Qwen3 ChatML: a JSON list of {\"role\", \"content\"}\n"
          "                messages, or {\"messages\": [...], \"add_generation_prompt\": true,\n"
          "                \"enable_thinking\": true} (those are the defaults)\n"
          "  --jsonl FILE  one input per line (- for stdin): a JSON string is encoded, a JSON\n"
          "                list of ids is decoded; one output line per input line, or\n"
          "                {\"error\": \"...\"} for a bad one (the exit status is then 1)\n"
          "  --decode      print {\"ids\": [...], \"text\": \"...\"} with the text decoded back\n"
          "  --stream      with --decode, add \"chunks\": what the streaming decoder emits for\n"
          "                each id in turn and at the end (whole UTF-8 characters only)\n"
          "  --no-special  encode special tokens written in the text as plain text (not with\n"
          "                --chat)\n"
          "  --info        print the vocabulary size and the stop token ids, then exit\n",
          fp);
}

typedef struct {
    const xp_tokenizer *tok;
    int decode, stream, allow_special;
} xp_tk_opts;

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
    cJSON *root = cJSON_Parse(json);
    const cJSON *list = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "messages")
                                             : root;
    int gen = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(root, "add_generation_prompt"));
    int think = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(root, "enable_thinking"));
    size_t n = (size_t)cJSON_GetArraySize(list);
    xp_chat_msg *msgs = calloc(n + 1, sizeof *msgs);
    int rc = 0;
    if (!cJSON_IsArray(list)) rc = xp_fail("--chat: expected a list of messages");
    else if (!msgs) rc = xp_fail("out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        const cJSON *m = cJSON_GetArrayItem(list, (int)i);
        msgs[i].role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        msgs[i].content = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content"));
        if (!msgs[i].role || !msgs[i].content)
            rc = xp_fail("--chat: message %zu needs string \"role\" and \"content\"", i);
    }
    char *prompt = rc ? NULL : xp_chat_build(msgs, n, gen, think);
    if (!rc && !prompt) rc = -1;
    if (!rc) rc = xp_encode_print(o, prompt, strlen(prompt));
    free(prompt);
    free(msgs);
    cJSON_Delete(root);
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
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},  {"text", required_argument, 0, 't'},
        {"chat", required_argument, 0, 'c'},   {"jsonl", required_argument, 0, 'j'},
        {"decode", no_argument, 0, 'd'},       {"stream", no_argument, 0, 's'},
        {"no-special", no_argument, 0, 'n'},   {"info", no_argument, 0, 'i'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0},
    };
    const char *model = NULL, *text = NULL, *chat = NULL, *jsonl = NULL;
    xp_tk_opts o = {.allow_special = 1};
    int info = 0, c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 't': text = optarg; break;
        case 'c': chat = optarg; break;
        case 'j': jsonl = optarg; break;
        case 'd': o.decode = 1; break;
        case 's': o.stream = 1; break;
        case 'n': o.allow_special = 0; break;
        case 'i': info = 1; break;
        case 'h': xp_tokenize_usage(stdout); return 0;
        default: xp_tokenize_usage(stderr); return 2;
        }
    }
    int inputs = (text != NULL) + (chat != NULL) + (jsonl != NULL);
    /* a chat prompt needs its special tokens */
    if (!model || optind != argc || (info ? inputs != 0 : inputs != 1) || (o.stream && !o.decode) ||
        (chat && !o.allow_special)) {
        xp_tokenize_usage(stderr);
        return 2;
    }
    xp_tokenizer *tok = xp_tokenizer_load(model);
    if (!tok) {
        fprintf(stderr, "xprec tokenize: %s\n", xp_last_error());
        return 1;
    }
    o.tok = tok;
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
