/*
 * OpenAI request bodies -> engine requests. The body must be UTF-8 JSON; each field is checked
 * for its type and range, and a bad one is answered 400 with the field named in "param".
 * Fields the engine does not use are ignored, as OpenAI-compatible servers do.
 *
 * Nothing here calls into nginx (its types only), so tests/fuzz/fuzz_openai.c runs it alone.
 */

#include "ngx_xprec.h"

#include <math.h>
#include <stdio.h>


size_t
ngx_xprec_utf8_seq(const u_char *s, size_t avail)
{
    size_t    n, k;
    uint32_t  cp;
    u_char    c = s[0];

    if (c < 0x80) {
        return 1;
    }

    if (c >= 0xc2 && c <= 0xdf) {
        n = 1;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 2;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 3;
        cp = c & 0x07;
    } else {
        return 0;
    }

    if (avail <= n) {
        return 0;
    }

    for (k = 1; k <= n; k++) {
        if ((s[k] & 0xc0) != 0x80) {
            return 0;
        }
        cp = cp << 6 | (s[k] & 0x3f);
    }

    /* no overlong forms, surrogates, or code points past U+10FFFF */
    if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff)))
        || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
    {
        return 0;
    }

    return n + 1;
}


static ngx_flag_t
ngx_xprec_utf8_valid(const u_char *s, size_t len)
{
    size_t  i = 0, n;

    while (i < len) {
        n = ngx_xprec_utf8_seq(s + i, len - i);
        if (n == 0) {
            return 0;
        }
        i += n;
    }

    return 1;
}


cJSON *
ngx_xprec_parse_json(const u_char *data, size_t len, const char **err)
{
    cJSON  *json;

    if (len == 0) {
        *err = "the request body is empty; send a JSON object";
        return NULL;
    }

    if (!ngx_xprec_utf8_valid(data, len)) {
        *err = "the request body is not valid UTF-8";
        return NULL;
    }

    json = cJSON_ParseWithLength((const char *) data, len);
    if (json == NULL) {
        *err = "the request body is not valid JSON";
        return NULL;
    }

    if (!cJSON_IsObject(json)) {
        cJSON_Delete(json);
        *err = "the request body must be a JSON object";
        return NULL;
    }

    return json;
}


#define NGX_XPREC_BAD(p, msg)                                                  \
    do {                                                                       \
        *param = (p);                                                          \
        *err = (msg);                                                          \
        return NGX_DECLINED;                                                   \
    } while (0)


static cJSON *
ngx_xprec_field(cJSON *body, const char *name)
{
    cJSON  *f = cJSON_GetObjectItemCaseSensitive(body, name);

    /* an explicit null is the same as leaving the field out */
    return f && !cJSON_IsNull(f) ? f : NULL;
}


/* An integer field in [min, max]: NGX_OK (value set), NGX_DECLINED absent, NGX_ERROR bad. */
static ngx_int_t
ngx_xprec_int(cJSON *body, const char *name, double min, double max, int64_t *out)
{
    cJSON  *f = ngx_xprec_field(body, name);

    if (f == NULL) {
        return NGX_DECLINED;
    }

    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble)
        || f->valuedouble != floor(f->valuedouble)
        || f->valuedouble < min || f->valuedouble > max)
    {
        return NGX_ERROR;
    }

    *out = (int64_t) f->valuedouble;

    return NGX_OK;
}


static ngx_int_t
ngx_xprec_num(cJSON *body, const char *name, double min, double max, double *out)
{
    cJSON  *f = ngx_xprec_field(body, name);

    if (f == NULL) {
        return NGX_DECLINED;
    }

    if (!cJSON_IsNumber(f) || !isfinite(f->valuedouble) || f->valuedouble < min
        || f->valuedouble > max)
    {
        return NGX_ERROR;
    }

    *out = f->valuedouble;

    return NGX_OK;
}


static ngx_int_t
ngx_xprec_bool(cJSON *body, const char *name, ngx_flag_t *out)
{
    cJSON  *f = ngx_xprec_field(body, name);

    if (f == NULL) {
        return NGX_DECLINED;
    }

    if (!cJSON_IsBool(f)) {
        return NGX_ERROR;
    }

    *out = cJSON_IsTrue(f);

    return NGX_OK;
}


/* The fields chat and completions share: sampling, stop, n, stream, user. */
static ngx_int_t
ngx_xprec_parse_common(ngx_xprec_ctx_t *ctx, cJSON *body, ngx_int_t max_tokens,
    int default_max, const char **err, const char **param)
{
    xp_request  *q = &ctx->req;
    int64_t      i;
    double       d;
    ngx_flag_t   b;
    ngx_int_t    rc;
    cJSON       *f, *s;
    size_t       n = 0;

    /* max_completion_tokens is the newer name; either caps the reply */
    rc = ngx_xprec_int(body, "max_completion_tokens", 1, 1 << 30, &i);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("max_completion_tokens",
                      "max_completion_tokens must be an integer >= 1");
    }
    if (rc == NGX_DECLINED) {
        rc = ngx_xprec_int(body, "max_tokens", 1, 1 << 30, &i);
        if (rc == NGX_ERROR) {
            NGX_XPREC_BAD("max_tokens", "max_tokens must be an integer >= 1");
        }
    }
    q->max_tokens = rc == NGX_OK ? (int) i : max_tokens ? (int) max_tokens : default_max;
    /* what the client asked for must fit; a default is only a bound */
    q->max_tokens_exact = rc == NGX_OK;
    if (max_tokens && q->max_tokens > max_tokens) {
        q->max_tokens = (int) max_tokens;
    }

    rc = ngx_xprec_num(body, "temperature", 0, 2, &d);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("temperature", "temperature must be a number between 0 and 2");
    }
    q->temperature = rc == NGX_OK ? (float) d : 1.0f;

    rc = ngx_xprec_num(body, "top_p", 0, 1, &d);
    if (rc == NGX_ERROR || (rc == NGX_OK && d <= 0)) {
        NGX_XPREC_BAD("top_p", "top_p must be a number in (0, 1]");
    }
    q->top_p = rc == NGX_OK ? (float) d : 1.0f;

    rc = ngx_xprec_int(body, "top_k", -1, 1000000, &i);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("top_k", "top_k must be an integer: -1 or 0 (off), or >= 1");
    }
    q->top_k = rc == NGX_OK && i > 0 ? (int) i : 0;

    rc = ngx_xprec_int(body, "seed", -9.2e18, 9.2e18, &i);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("seed", "seed must be an integer");
    }
    q->seed = rc == NGX_OK ? (uint64_t) i : 0;

    rc = ngx_xprec_int(body, "n", 1, 1, &i);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("n", "n must be 1: one choice per request");
    }

    f = ngx_xprec_field(body, "stop");
    if (f != NULL) {
        if (cJSON_IsString(f)) {
            if (f->valuestring[0] == '\0') {
                NGX_XPREC_BAD("stop", "stop strings must not be empty");
            }
            ctx->stops[n++] = f->valuestring;

        } else if (cJSON_IsArray(f)) {
            if (cJSON_GetArraySize(f) > NGX_XPREC_MAX_STOP) {
                NGX_XPREC_BAD("stop", "stop takes at most 4 strings");
            }
            cJSON_ArrayForEach(s, f) {
                if (!cJSON_IsString(s) || s->valuestring[0] == '\0') {
                    NGX_XPREC_BAD("stop", "stop must be a string or a list of "
                                          "non-empty strings");
                }
                ctx->stops[n++] = s->valuestring;
            }

        } else {
            NGX_XPREC_BAD("stop", "stop must be a string or a list of strings");
        }
    }
    q->stop = ctx->stops;
    q->n_stop = n;

    rc = ngx_xprec_bool(body, "stream", &b);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("stream", "stream must be true or false");
    }
    ctx->stream = rc == NGX_OK && b;

    f = ngx_xprec_field(body, "stream_options");
    if (f != NULL) {
        if (!cJSON_IsObject(f)) {
            NGX_XPREC_BAD("stream_options", "stream_options must be an object");
        }
        rc = ngx_xprec_bool(f, "include_usage", &b);
        if (rc == NGX_ERROR) {
            NGX_XPREC_BAD("stream_options.include_usage",
                          "include_usage must be true or false");
        }
        ctx->include_usage = ctx->stream && rc == NGX_OK && b;
    }

    /* vLLM's extension: logprobs name tokens as "token_id:N", so clients can tell ids apart
     * whatever bytes they decode to */
    rc = ngx_xprec_bool(body, "return_tokens_as_token_ids", &b);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("return_tokens_as_token_ids",
                      "return_tokens_as_token_ids must be true or false");
    }
    ctx->token_ids = rc == NGX_OK && b;

    f = ngx_xprec_field(body, "user");
    if (f != NULL && !cJSON_IsString(f)) {
        NGX_XPREC_BAD("user", "user must be a string");
    }

    return NGX_OK;
}


/* A message's content: a string, or a list of text parts joined (malloc'd into ctx). */
static ngx_int_t
ngx_xprec_content(ngx_xprec_ctx_t *ctx, cJSON *content, const char **out,
    const char **err)
{
    cJSON   *part, *type, *text;
    size_t   len = 0;
    char    *joined, *p;

    if (content == NULL || cJSON_IsNull(content)) {
        *out = "";
        return NGX_OK;
    }

    if (cJSON_IsString(content)) {
        *out = content->valuestring;
        return NGX_OK;
    }

    if (!cJSON_IsArray(content)) {
        *err = "content must be a string or a list of text parts";
        return NGX_DECLINED;
    }

    cJSON_ArrayForEach(part, content) {
        type = cJSON_GetObjectItemCaseSensitive(part, "type");
        text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || ngx_strcmp(type->valuestring, "text") != 0) {
            *err = "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                   "are supported";
            return NGX_DECLINED;
        }
        if (!cJSON_IsString(text)) {
            *err = "a text content part needs a string \"text\"";
            return NGX_DECLINED;
        }
        len += ngx_strlen(text->valuestring);
    }

    joined = malloc(len + 1);
    if (joined == NULL) {
        *err = "out of memory";
        return NGX_DECLINED;
    }

    p = joined;
    cJSON_ArrayForEach(part, content) {
        text = cJSON_GetObjectItemCaseSensitive(part, "text");
        p = (char *) ngx_cpymem(p, text->valuestring, ngx_strlen(text->valuestring));
    }
    *p = '\0';

    ctx->contents[ctx->n_contents++] = joined;
    *out = joined;

    return NGX_OK;
}


ngx_int_t
ngx_xprec_parse_chat(ngx_xprec_ctx_t *ctx, cJSON *body, ngx_int_t max_tokens,
    const char **err, const char **param)
{
    cJSON        *msgs, *m, *role, *f, *content;
    ngx_uint_t    n, i = 0;
    int64_t       k;
    ngx_flag_t    b;
    ngx_int_t     rc;
    const char   *r;
    static char   param_buf[64];

    msgs = ngx_xprec_field(body, "messages");
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0) {
        NGX_XPREC_BAD("messages", "messages must be a non-empty list of messages");
    }

    n = cJSON_GetArraySize(msgs);
    ctx->msgs = calloc(n, sizeof(xp_chat_msg));
    ctx->contents = calloc(n, sizeof(char *));
    if (ctx->msgs == NULL || ctx->contents == NULL) {
        NGX_XPREC_BAD(NULL, "out of memory");
    }

    cJSON_ArrayForEach(m, msgs) {
        snprintf(param_buf, sizeof(param_buf), "messages[%u]", (unsigned) i);

        if (!cJSON_IsObject(m)) {
            NGX_XPREC_BAD(param_buf, "each message must be an object with a role and a "
                                     "content");
        }

        role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role)) {
            NGX_XPREC_BAD(param_buf, "a message needs a string role");
        }

        r = role->valuestring;
        if (ngx_strcmp(r, "developer") == 0) {
            r = "system"; /* OpenAI's newer name for the system role */
        }

        if (ngx_strcmp(r, "system") != 0 && ngx_strcmp(r, "user") != 0
            && ngx_strcmp(r, "assistant") != 0 && ngx_strcmp(r, "tool") != 0)
        {
            NGX_XPREC_BAD(param_buf, "role must be one of system, developer, user, "
                                     "assistant or tool");
        }

        content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if ((content == NULL || cJSON_IsNull(content)) && ngx_strcmp(r, "assistant") != 0) {
            NGX_XPREC_BAD(param_buf, "a message needs a content (only an assistant's may be "
                                     "null)");
        }

        if (ngx_xprec_content(ctx, content, &ctx->msgs[i].content, err) != NGX_OK)
        {
            *param = param_buf;
            return NGX_DECLINED;
        }

        ctx->msgs[i].role = r;
        i++;
    }

    ctx->req.messages = ctx->msgs;
    ctx->req.n_messages = n;
    ctx->req.enable_thinking = 1; /* Qwen3's template default */

    f = ngx_xprec_field(body, "chat_template_kwargs");
    if (f != NULL) {
        if (!cJSON_IsObject(f)) {
            NGX_XPREC_BAD("chat_template_kwargs", "chat_template_kwargs must be an "
                                                  "object");
        }
        rc = ngx_xprec_bool(f, "enable_thinking", &b);
        if (rc == NGX_ERROR) {
            NGX_XPREC_BAD("chat_template_kwargs.enable_thinking",
                          "enable_thinking must be true or false");
        }
        if (rc == NGX_OK) {
            ctx->req.enable_thinking = (int) b;
        }
    }

    rc = ngx_xprec_bool(body, "logprobs", &b);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("logprobs", "logprobs must be true or false");
    }
    ctx->logprobs = rc == NGX_OK && b;

    rc = ngx_xprec_int(body, "top_logprobs", 0, XP_MAX_TOP_LOGPROBS, &k);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("top_logprobs", "top_logprobs must be an integer between 0 "
                                      "and 20");
    }
    if (rc == NGX_OK && !ctx->logprobs) {
        NGX_XPREC_BAD("top_logprobs", "top_logprobs needs logprobs: true");
    }
    ctx->top_logprobs = rc == NGX_OK ? k : 0;
    ctx->req.logprobs = ctx->logprobs;
    ctx->req.top_logprobs = (int) ctx->top_logprobs;

    return ngx_xprec_parse_common(ctx, body, max_tokens, 0, err, param);
}


/* A list of token ids, malloc'd into ctx. */
static ngx_int_t
ngx_xprec_token_list(ngx_xprec_ctx_t *ctx, cJSON *list)
{
    cJSON   *t;
    size_t   n = 0;

    ctx->prompt_ids = malloc((cJSON_GetArraySize(list) + 1) * sizeof(int32_t));
    if (ctx->prompt_ids == NULL) {
        return NGX_ERROR;
    }

    cJSON_ArrayForEach(t, list) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble)
            || t->valuedouble < 0 || t->valuedouble > 2147483647.0)
        {
            return NGX_ERROR;
        }
        ctx->prompt_ids[n++] = (int32_t) t->valuedouble;
    }

    ctx->req.tokens = ctx->prompt_ids;
    ctx->req.n_tokens = n;

    return NGX_OK;
}


ngx_int_t
ngx_xprec_parse_completion(ngx_xprec_ctx_t *ctx, cJSON *body, ngx_int_t max_tokens,
    const char **err, const char **param)
{
    cJSON       *p, *first;
    int64_t      k;
    ngx_flag_t   b;
    ngx_int_t    rc;

    p = ngx_xprec_field(body, "prompt");
    if (p == NULL) {
        NGX_XPREC_BAD("prompt", "prompt is required: a string or a list of token ids");
    }

    /* one prompt: a string, a list of ids, or either wrapped in a list of one */
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1
        && (cJSON_IsString(p->child) || cJSON_IsArray(p->child)))
    {
        p = p->child;
    }

    if (cJSON_IsString(p)) {
        ctx->req.prompt = p->valuestring;
        ctx->req.prompt_len = ngx_strlen(p->valuestring);

    } else if (cJSON_IsArray(p)) {
        first = p->child;
        if (first == NULL) {
            NGX_XPREC_BAD("prompt", "prompt must not be empty");
        }
        if (!cJSON_IsNumber(first)) {
            NGX_XPREC_BAD("prompt", "one prompt per request: a string or a list of token "
                                    "ids");
        }
        if (ngx_xprec_token_list(ctx, p) != NGX_OK) {
            NGX_XPREC_BAD("prompt", "token ids must be integers between 0 and "
                                    "2147483647");
        }

    } else {
        NGX_XPREC_BAD("prompt", "prompt must be a string or a list of token ids");
    }

    rc = ngx_xprec_bool(body, "echo", &b);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("echo", "echo must be true or false");
    }
    ctx->echo = rc == NGX_OK && b;

    /* completions' logprobs is the count of alternatives to report, 0..20 */
    rc = ngx_xprec_int(body, "logprobs", 0, XP_MAX_TOP_LOGPROBS, &k);
    if (rc == NGX_ERROR) {
        NGX_XPREC_BAD("logprobs", "logprobs must be an integer between 0 and 20");
    }
    ctx->logprobs = rc == NGX_OK;
    ctx->top_logprobs = rc == NGX_OK ? k : 0;
    ctx->req.logprobs = ctx->logprobs;
    ctx->req.top_logprobs = (int) ctx->top_logprobs;
    ctx->req.prompt_logprobs = ctx->logprobs && ctx->echo;

    /* OpenAI's default for completions is 16 tokens */
    return ngx_xprec_parse_common(ctx, body, max_tokens, 16, err, param);
}


void
ngx_xprec_request_free(ngx_xprec_ctx_t *ctx)
{
    size_t  i;

    for (i = 0; i < ctx->n_contents; i++) {
        free(ctx->contents[i]);
    }

    /* prompt_text (echo's copy of a text prompt) stays until the request ends */
    free(ctx->contents);
    free(ctx->msgs);
    free(ctx->prompt_ids);
    ctx->contents = NULL;
    ctx->msgs = NULL;
    ctx->prompt_ids = NULL;
    ctx->n_contents = 0;

    if (ctx->json) {
        cJSON_Delete(ctx->json);
        ctx->json = NULL;
    }
}
