/* libFuzzer: the gateway's OpenAI request parsing (ngx_xprec_module/ngx_xprec_openai.c) on any
 * body: UTF-8 and JSON checks, then every field of a chat and of a completions request, as the
 * module reads them before they reach the engine. Built against nginx's headers (the module's
 * configured tree), it needs no running nginx. */
#include "ngx_xprec.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *err = NULL, *param = NULL;
    cJSON *json = ngx_xprec_parse_json(data, size, &err);
    if (!json) {
        if (!err || !*err) abort(); /* every refusal says why */
        return 0;
    }
    for (int kind = 0; kind < 2; kind++) {
        ngx_xprec_ctx_t *ctx = calloc(1, sizeof *ctx);
        if (!ctx) break;
        ctx->json = kind ? cJSON_Duplicate(json, 1) : NULL;
        cJSON *body = kind ? ctx->json : json;
        ngx_int_t rc = kind ? ngx_xprec_parse_completion(ctx, body, 64, &err, &param)
                            : ngx_xprec_parse_chat(ctx, body, 0, &err, &param);
        if (rc != NGX_OK && (!err || !*err)) abort();
        if (rc == NGX_OK) {
            /* what the engine will get is well formed (max_tokens 0: up to the context) */
            const xp_request *q = &ctx->req;
            int given = !!q->messages + !!q->prompt + !!q->tokens;
            if (given != 1 || q->n_stop > NGX_XPREC_MAX_STOP || q->top_logprobs < 0 ||
                q->top_logprobs > XP_MAX_TOP_LOGPROBS || !(q->temperature >= 0) ||
                !(q->top_p > 0 && q->top_p <= 1) || q->max_tokens < 0)
                abort();
            for (size_t i = 0; i < q->n_messages; i++)
                if (!q->messages[i].role || !q->messages[i].content) abort();
        }
        ngx_xprec_request_free(ctx); /* frees ctx->json */
        free(ctx);
    }
    cJSON_Delete(json);
    return 0;
}
