/* --chat JSON, the one parser for every command that takes a chat (generate, tokenize). */
#include "cli.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

/* An optional boolean member: absent keeps *out, anything but true/false is an error. */
static int xp_chat_flag(const cJSON *obj, const char *key, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return 0;
    if (!cJSON_IsBool(v)) return xp_fail("--chat: \"%s\" must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

int xp_chat_arg_parse(const char *json, int generation_prompt, int thinking, xp_chat_arg *c)
{
    memset(c, 0, sizeof *c);
    c->add_generation_prompt = generation_prompt;
    c->enable_thinking = thinking;
    cJSON *root = cJSON_Parse(json);
    c->root = root;
    if (!root) return xp_fail("--chat is not valid JSON");
    const cJSON *list = root;
    if (cJSON_IsObject(root)) {
        const cJSON *k;
        cJSON_ArrayForEach(k, root) if (strcmp(k->string, "messages") != 0 &&
                                        strcmp(k->string, "add_generation_prompt") != 0 &&
                                        strcmp(k->string, "enable_thinking") !=
                                            0) return xp_fail("--chat: unknown key \"%.100s\" "
                                                              "(messages, add_generation_prompt, "
                                                              "enable_thinking)",
                                                              k->string);
        list = cJSON_GetObjectItemCaseSensitive(root, "messages");
        if (xp_chat_flag(root, "add_generation_prompt", &c->add_generation_prompt) < 0 ||
            xp_chat_flag(root, "enable_thinking", &c->enable_thinking) < 0)
            return -1;
    }
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) == 0)
        return xp_fail("--chat needs a non-empty list of {\"role\", \"content\"} messages, alone "
                       "or as {\"messages\": [...]}");
    c->msgs = calloc((size_t)cJSON_GetArraySize(list), sizeof *c->msgs);
    if (!c->msgs) return xp_fail("out of memory");
    const cJSON *m;
    cJSON_ArrayForEach(m, list)
    {
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        const char *content = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content"));
        if (!role || !content)
            return xp_fail("--chat: message %zu needs string \"role\" and \"content\"", c->n + 1);
        c->msgs[c->n++] = (xp_chat_msg){role, content};
    }
    return 0;
}

void xp_chat_arg_free(xp_chat_arg *c)
{
    free(c->msgs);
    cJSON_Delete(c->root);
    memset(c, 0, sizeof *c);
}
