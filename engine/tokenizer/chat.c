/* Qwen3's chat template (tokenizer_config.json "chat_template"), without tools, written out in C:
 * the template needs a Jinja engine, and its output for these cases is all a server needs. */
#include "tokenizer/chat.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    size_t n, cap;
    int failed;
} xp_text;

static void xp_add(xp_text *t, const char *s, size_t n)
{
    if (t->failed) return;
    if (t->n + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->n + n + 1) cap *= 2;
        char *p = realloc(t->p, cap);
        if (!p) {
            t->failed = 1;
            return;
        }
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->n, s, n);
    t->n += n;
    t->p[t->n] = '\0';
}

static void xp_adds(xp_text *t, const char *s)
{
    xp_add(t, s, strlen(s));
}

static int xp_starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int xp_ends(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Last occurrence of needle in s[0, n), or NULL. */
static const char *xp_last(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = n >= k ? n - k + 1 : 0; i-- > 0;)
        if (memcmp(s + i, needle, k) == 0) return s + i;
    return NULL;
}

/* Index of the last user message that is a real query (not a bundle of tool responses). */
static size_t xp_last_query(const xp_chat_msg *m, size_t n)
{
    for (size_t i = n; i-- > 0;)
        if (!strcmp(m[i].role, "user") && !(xp_starts(m[i].content, "<tool_response>") &&
                                             xp_ends(m[i].content, "</tool_response>")))
            return i;
    return n - 1;
}

/* An assistant turn: reasoning written inline as <think>...</think> is split off the content. */
static void xp_assistant(xp_text *t, const char *content, int keep_reasoning_if_any, int last)
{
    const char *body = content, *reason = "";
    size_t body_n = strlen(content), reason_n = 0;
    const char *close = strstr(content, "</think>");
    if (close) {
        /* content: after the last </think>; reasoning: before the first, after the last <think> */
        const char *after = xp_last(content, body_n, "</think>") + strlen("</think>");
        body_n -= (size_t)(after - content);
        body = after;
        while (*body == '\n') body++, body_n--;
        reason_n = (size_t)(close - content);
        while (reason_n && content[reason_n - 1] == '\n') reason_n--;
        const char *open = xp_last(content, reason_n, "<think>");
        reason = open ? open + strlen("<think>") : content;
        reason_n -= (size_t)(reason - content);
        while (reason_n && *reason == '\n') reason++, reason_n--;
    }
    xp_adds(t, "<|im_start|>assistant\n");
    if (keep_reasoning_if_any && (last || reason_n)) {
        /* strip('\n') on the reasoning, lstrip('\n') on the content */
        while (reason_n && reason[reason_n - 1] == '\n') reason_n--;
        while (body_n && *body == '\n') body++, body_n--;
        xp_adds(t, "<think>\n");
        xp_add(t, reason, reason_n);
        xp_adds(t, "\n</think>\n\n");
    }
    xp_add(t, body, body_n);
    xp_adds(t, "<|im_end|>\n");
}

char *xp_chat_build(const xp_chat_msg *msgs, size_t n, int add_generation_prompt,
                    int enable_thinking)
{
    xp_text t = {0};
    xp_add(&t, "", 0);
    size_t last_query = n ? xp_last_query(msgs, n) : 0;
    for (size_t i = 0; i < n; i++) {
        const char *role = msgs[i].role, *content = msgs[i].content;
        if (!strcmp(role, "system") || !strcmp(role, "user")) {
            xp_adds(&t, "<|im_start|>");
            xp_adds(&t, role);
            xp_adds(&t, "\n");
            xp_adds(&t, content);
            xp_adds(&t, "<|im_end|>\n");
        } else if (!strcmp(role, "assistant")) {
            xp_assistant(&t, content, i > last_query, i + 1 == n);
        } else if (!strcmp(role, "tool")) {
            /* consecutive tool results share one user turn */
            if (i == 0 || strcmp(msgs[i - 1].role, "tool") != 0) xp_adds(&t, "<|im_start|>user");
            xp_adds(&t, "\n<tool_response>\n");
            xp_adds(&t, content);
            xp_adds(&t, "\n</tool_response>");
            if (i + 1 == n || strcmp(msgs[i + 1].role, "tool") != 0) xp_adds(&t, "<|im_end|>\n");
        } else {
            free(t.p);
            xp_fail("chat message %zu: unknown role \"%s\"", i, role);
            return NULL;
        }
    }
    if (add_generation_prompt) {
        xp_adds(&t, "<|im_start|>assistant\n");
        if (!enable_thinking) xp_adds(&t, "<think>\n\n</think>\n\n");
    }
    if (t.failed) {
        free(t.p);
        xp_fail("out of memory");
        return NULL;
    }
    return t.p;
}
