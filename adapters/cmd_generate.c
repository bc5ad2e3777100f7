/* xprec generate: one request through the engine, its text streamed to stdout as it comes. */
#include "cli.h"
#include "commands.h"
#include "util/xp_error.h"
#include "xprec.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XP_MAX_ADAPTER_ARGS 64
#define XP_MAX_STOP_ARGS 16

/* Parses [{"role": ..., "content": ...}, ...]; the strings stay owned by *root. */
int xp_parse_chat(const char *json, cJSON **root, xp_chat_msg **msgs, size_t *n)
{
    *root = cJSON_Parse(json);
    *msgs = NULL;
    *n = 0;
    if (!cJSON_IsArray(*root) || cJSON_GetArraySize(*root) == 0)
        return xp_fail("--chat needs a non-empty JSON array of {\"role\", \"content\"} objects");
    *msgs = calloc((size_t)cJSON_GetArraySize(*root), sizeof **msgs);
    if (!*msgs) return xp_fail("out of memory");
    const cJSON *m;
    cJSON_ArrayForEach(m, *root)
    {
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        const char *content = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content"));
        if (!role || !content)
            return xp_fail("--chat message %zu lacks a string role or content", *n + 1);
        (*msgs)[(*n)++] = (xp_chat_msg){role, content};
    }
    return 0;
}

static const char *xp_finish_name(xp_finish f)
{
    return f == XP_FINISH_STOP ? "stop" : f == XP_FINISH_LENGTH ? "length" : "cancelled";
}

static void xp_generate_usage(FILE *fp)
{
    fprintf(fp,
            "usage: xprec generate --model DIR [--adapter NAME=DIR ...] [--use NAME]\n"
            "                      (--prompt TEXT | --chat JSON) [--max-tokens N]\n"
            "                      [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
            "                      [--stop STRING ...] [--threads N] [--kv-mb N]\n"
            "                      [--backend cpu|cuda|auto]\n\n"
            "Streams the reply to stdout; usage and the finish reason go to stderr.\n"
            "--chat takes [{\"role\":\"user\",\"content\":\"...\"}] and renders Qwen3 ChatML\n"
            "with thinking off; --prompt is sent as it is.\n");
}

int xp_cmd_generate(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},       {"adapter", required_argument, 0, 'a'},
        {"use", required_argument, 0, 'u'},         {"prompt", required_argument, 0, 'p'},
        {"chat", required_argument, 0, 'c'},        {"max-tokens", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 't'}, {"top-p", required_argument, 0, 'P'},
        {"top-k", required_argument, 0, 'k'},       {"seed", required_argument, 0, 's'},
        {"stop", required_argument, 0, 'S'},        {"threads", required_argument, 0, 'j'},
        {"kv-mb", required_argument, 0, 'K'},       {"help", no_argument, 0, 'h'},
        {"backend", required_argument, 0, 'B'},
        {0, 0, 0, 0}};
    const char *model = NULL, *use = NULL, *prompt = NULL, *chat = NULL, *backend = NULL;
    char *adapters[XP_MAX_ADAPTER_ARGS];
    const char *stops[XP_MAX_STOP_ARGS];
    int nad = 0, nstop = 0, c;
    long max_tokens = 64, top_k = 0, seed = 0, threads = 0, kv_mb = 0;
    double temp = 0, top_p = 1;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'a':
            if (nad == XP_MAX_ADAPTER_ARGS || !strchr(optarg, '=')) {
                fprintf(stderr, "xprec generate: --adapter needs NAME=DIR (at most %d)\n",
                        XP_MAX_ADAPTER_ARGS);
                return 2;
            }
            adapters[nad++] = optarg;
            break;
        case 'u': use = optarg; break;
        case 'p': prompt = optarg; break;
        case 'c': chat = optarg; break;
        case 'n':
            if (xp_arg_long("generate", "--max-tokens", optarg, 1, 1 << 20, &max_tokens) < 0) return 2;
            break;
        case 't':
            if (xp_arg_double("generate", "--temperature", optarg, 0, 100, &temp) < 0) return 2;
            break;
        case 'P':
            if (xp_arg_double("generate", "--top-p", optarg, 0, 1, &top_p) < 0) return 2;
            break;
        case 'k':
            if (xp_arg_long("generate", "--top-k", optarg, 0, 1 << 20, &top_k) < 0) return 2;
            break;
        case 's':
            if (xp_arg_long("generate", "--seed", optarg, 0, 0x7fffffffL, &seed) < 0) return 2;
            break;
        case 'S':
            if (nstop == XP_MAX_STOP_ARGS) {
                fprintf(stderr, "xprec generate: at most %d --stop strings\n", XP_MAX_STOP_ARGS);
                return 2;
            }
            stops[nstop++] = optarg;
            break;
        case 'j':
            if (xp_arg_long("generate", "--threads", optarg, 1, 1024, &threads) < 0) return 2;
            break;
        case 'K':
            if (xp_arg_long("generate", "--kv-mb", optarg, 1, 1 << 20, &kv_mb) < 0) return 2;
            break;
        case 'B': backend = optarg; break;
        case 'h': xp_generate_usage(stdout); return 0;
        default: xp_generate_usage(stderr); return 2;
        }
    }
    if (optind < argc || !model || !prompt == !chat) {
        xp_generate_usage(stderr);
        return 2;
    }
    xp_engine_opts eo = {.threads = (int)threads, .kv_bytes = (size_t)kv_mb << 20, .max_batch = 1,
                         .max_adapters = nad > 0 ? nad : 1, .backend = backend};
    xp_engine *e = NULL;
    xp_queue *q = NULL;
    cJSON *chat_root = NULL;
    xp_chat_msg *msgs = NULL;
    size_t nmsgs = 0;
    int rc = 1;
    if (chat && xp_parse_chat(chat, &chat_root, &msgs, &nmsgs) < 0) goto fail;
    if (!(e = xp_engine_create(model, &eo)) || !(q = xp_queue_create())) goto fail;
    for (int i = 0; i < nad; i++) {
        char *eq = strchr(adapters[i], '=');
        *eq = '\0';
        if (xp_engine_add_adapter(e, adapters[i], eq + 1, 0) < 0) goto fail;
    }
    xp_request r = {.adapter = use, .messages = msgs, .n_messages = nmsgs, .prompt = prompt,
                    .temperature = (float)temp, .top_p = (float)top_p, .top_k = (int)top_k,
                    .seed = (uint64_t)seed, .max_tokens = (int)max_tokens, .stop = stops,
                    .n_stop = (size_t)nstop};
    if (xp_engine_submit(e, &r, q) == 0) goto fail;
    for (;;) {
        xp_event ev;
        xp_queue_wait(q, &ev, -1);
        if (ev.text_len) fwrite(ev.text, 1, ev.text_len, stdout);
        fflush(stdout);
        if (ev.type == XP_EV_ERROR) {
            fprintf(stderr, "\nxprec generate: %s\n", ev.error);
            xp_event_clear(&ev);
            goto out;
        }
        if (ev.type == XP_EV_DONE) {
            fprintf(stderr, "\n[finish: %s, prompt tokens %d, completion tokens %d]\n",
                    xp_finish_name(ev.finish), ev.prompt_tokens, ev.completion_tokens);
            xp_event_clear(&ev);
            break;
        }
        xp_event_clear(&ev);
    }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "xprec generate: %s\n", xp_last_error());
out:
    xp_engine_destroy(e);
    xp_queue_destroy(q);
    free(msgs);
    cJSON_Delete(chat_root);
    return rc;
}
