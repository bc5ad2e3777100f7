/* xprec generate: one request through the engine, its text streamed to stdout as it comes. */
#include "cli.h"
#include "commands.h"
#include "util/xp_error.h"
#include "xprec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *xp_finish_name(xp_finish f)
{
    return f == XP_FINISH_STOP ? "stop" : f == XP_FINISH_LENGTH ? "length" : "cancelled";
}

int xp_cmd_generate(int argc, char **argv)
{
    const char *model = NULL, *use = NULL, *prompt = NULL, *chat = NULL, *backend = NULL;
    xp_opt_list adapters = {0}, stops = {0};
    long max_tokens = 64, top_k = 0, seed = 0, threads = 0, kv_mb = 0;
    double temp = 0, top_p = 1;
    xp_opt opts[] = {
        XP_OPT_MODEL(&model),
        XP_LIST("adapter", &adapters, 64, "NAME=DIR", "register a PEFT adapter (repeatable)"),
        XP_STR("use", &use, "NAME", "the registered adapter this request runs with"),
        XP_STR("prompt", &prompt, "TEXT", "the prompt as it is (special tokens allowed)"),
        XP_STR("chat", &chat, "JSON",
               "a chat in Qwen3 ChatML: [{\"role\", \"content\"}, ...] or\n"
               "{\"messages\": [...], \"enable_thinking\": true}; thinking\n"
               "is off unless enable_thinking is true"),
        XP_INT("max-tokens", &max_tokens, 1, 1 << 20, "N", "longest reply (default 64)"),
        XP_NUM("temperature", &temp, 0, 100, "T", "0 (the default) is greedy"),
        XP_NUM("top-p", &top_p, 0, 1, "P", "nucleus sampling (default 1: off)"),
        XP_INT("top-k", &top_k, 0, 1 << 20, "K", "sample among the K likeliest (default 0: off)"),
        XP_OPT_SEED(&seed, "sampling seed (default 0)"),
        XP_LIST("stop", &stops, 16, "STRING", "end the reply before STRING (repeatable)"),
        XP_OPT_THREADS(&threads),
        XP_INT("kv-mb", &kv_mb, 1, 1 << 20, "N", "KV cache size in MB (default: the engine's)"),
        XP_OPT_BACKEND(&backend),
        XP_OPT_END};
    const xp_cmd cmd = {
        .name = "generate",
        .usage = "usage: xprec generate --model DIR [--adapter NAME=DIR ...] [--use NAME]\n"
                 "                      (--prompt TEXT | --chat JSON) [--max-tokens N]\n"
                 "                      [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
                 "                      [--stop STRING ...] [--threads N] [--kv-mb N]\n"
                 "                      [--backend cpu|cuda|auto]\n",
        .about = "Streams the reply to stdout; usage and the finish reason go to stderr.\n",
        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    if (!prompt && !chat)
        return xp_cmd_usage_error(&cmd, "nothing to answer: give --prompt TEXT or --chat JSON");
    if (prompt && chat) return xp_cmd_usage_error(&cmd, "give --prompt or --chat, not both");
    for (int i = 0; i < adapters.n; i++)
        if (!strchr(adapters.v[i], '=') || adapters.v[i][0] == '=' ||
            strchr(adapters.v[i], '=') - adapters.v[i] > 255)
            return xp_cmd_usage_error(&cmd, "--adapter needs NAME=DIR, got \"%s\"", adapters.v[i]);
    int nad = adapters.n;
    xp_engine_opts eo = {.threads = (int)threads, .kv_bytes = (size_t)kv_mb << 20, .max_batch = 1,
                         .max_adapters = nad > 0 ? nad : 1, .backend = backend};
    xp_engine *e = NULL;
    xp_queue *q = NULL;
    xp_chat_arg ca = {0};
    rc = 1;
    if (chat && xp_chat_arg_parse(chat, 1, 0, &ca) < 0) goto fail;
    if (chat && !ca.add_generation_prompt) {
        xp_fail("--chat: add_generation_prompt false leaves no turn for the reply");
        goto fail;
    }
    if (!(e = xp_engine_create(model, &eo)) || !(q = xp_queue_create())) goto fail;
    for (int i = 0; i < nad; i++) {
        const char *eq = strchr(adapters.v[i], '=');
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(eq - adapters.v[i]), adapters.v[i]);
        if (xp_engine_add_adapter(e, name, eq + 1, 0) < 0) goto fail;
    }
    xp_request r = {.adapter = use, .messages = ca.msgs, .n_messages = ca.n,
                    .enable_thinking = ca.enable_thinking, .prompt = prompt,
                    .temperature = (float)temp, .top_p = (float)top_p, .top_k = (int)top_k,
                    .seed = (uint64_t)seed, .max_tokens = (int)max_tokens, .stop = stops.v,
                    .n_stop = (size_t)stops.n};
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
    xp_chat_arg_free(&ca);
    return rc;
}
