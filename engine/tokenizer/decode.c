/* Decoding: BPE ids give raw bytes, which are turned into text by the WHATWG UTF-8 decoder (the
 * reference's TextDecoder): each maximal invalid byte run becomes one U+FFFD, a truncated
 * character at the end becomes one U+FFFD. Added tokens are emitted verbatim and end any
 * truncated character before them, as the reference decodes the text between them separately.
 * Whole-sequence decoding runs the streaming decoder, so the two agree by construction. */
#include "tokenizer/tokenizer_impl.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

static const char xp_replacement[] = "\xef\xbf\xbd"; /* U+FFFD */

static void xp_detok_reset(xp_detok *d)
{
    d->cp = 0;
    d->need = 0;
    d->lower = 0x80;
    d->upper = 0xbf;
}

void xp_detok_init(xp_detok *d, const xp_tokenizer *t)
{
    memset(d, 0, sizeof *d);
    d->tok = t;
    xp_detok_reset(d);
}

void xp_detok_free(xp_detok *d)
{
    free(d->buf);
    d->buf = NULL;
    d->cap = 0;
}

static int xp_detok_reserve(xp_detok *d, size_t n)
{
    if (n <= d->cap) return 0;
    size_t cap = d->cap ? d->cap : 64;
    while (cap < n) cap *= 2;
    char *p = realloc(d->buf, cap);
    if (!p) return xp_fail("out of memory");
    d->buf = p;
    d->cap = cap;
    return 0;
}

static size_t xp_put_cp(char *o, uint32_t c)
{
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        o[0] = (char)(0xc0 | c >> 6);
        o[1] = (char)(0x80 | (c & 0x3f));
        return 2;
    }
    if (c < 0x10000) {
        o[0] = (char)(0xe0 | c >> 12);
        o[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        o[2] = (char)(0x80 | (c & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | c >> 18);
    o[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3f));
    o[3] = (char)(0x80 | (c & 0x3f));
    return 4;
}

/* One byte through the WHATWG UTF-8 decoder; writes at most 6 bytes to o, returns how many. */
static size_t xp_decode_byte(xp_detok *d, uint8_t b, char *o)
{
    size_t n = 0;
    if (d->need) {
        if (b >= d->lower && b <= d->upper) {
            d->lower = 0x80;
            d->upper = 0xbf;
            d->cp = d->cp << 6 | (b & 0x3f);
            if (--d->need == 0) {
                n = xp_put_cp(o, d->cp);
                d->cp = 0;
            }
            return n;
        }
        /* the character so far is invalid; the byte itself is looked at afresh */
        xp_detok_reset(d);
        memcpy(o, xp_replacement, 3);
        n = 3;
    }
    if (b < 0x80) {
        o[n++] = (char)b;
    } else if (b >= 0xc2 && b <= 0xdf) {
        d->need = 1;
        d->cp = b & 0x1f;
    } else if (b >= 0xe0 && b <= 0xef) {
        if (b == 0xe0) d->lower = 0xa0;
        if (b == 0xed) d->upper = 0x9f;
        d->need = 2;
        d->cp = b & 0x0f;
    } else if (b >= 0xf0 && b <= 0xf4) {
        if (b == 0xf0) d->lower = 0x90;
        if (b == 0xf4) d->upper = 0x8f;
        d->need = 3;
        d->cp = b & 0x07;
    } else {
        memcpy(o + n, xp_replacement, 3);
        n += 3;
    }
    return n;
}

/* Ends a pending, truncated character with U+FFFD; writes at most 3 bytes. */
static size_t xp_end_char(xp_detok *d, char *o)
{
    if (!d->need) return 0;
    xp_detok_reset(d);
    memcpy(o, xp_replacement, 3);
    return 3;
}

const char *xp_detok_push(xp_detok *d, int32_t id, size_t *len)
{
    const xp_tokenizer *t = d->tok;
    *len = 0;
    /* an id without a token (say, one of a model's padding rows) is text-less, as in the
     * reference: it does not even end a pending character */
    int known = id >= 0 && id < t->n_ids && t->tok_kind[id] != XP_TOK_NONE;
    size_t n = known ? t->tok_len[id] : 0, o = 0;
    if (xp_detok_reserve(d, 6 * n + 8)) return NULL;
    const char *s = known ? t->arena + t->tok_off[id] : "";
    if (known && t->tok_kind[id] == XP_TOK_BPE) {
        for (size_t i = 0; i < n; i++) o += xp_decode_byte(d, (uint8_t)s[i], d->buf + o);
    } else if (known) {
        o = xp_end_char(d, d->buf);
        memcpy(d->buf + o, s, n);
        o += n;
    }
    d->buf[o] = '\0';
    *len = o;
    return d->buf;
}

const char *xp_tokenizer_token_bytes(const xp_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_ids || t->tok_kind[id] == XP_TOK_NONE) return NULL;
    *len = t->tok_len[id];
    return t->arena + t->tok_off[id];
}

const char *xp_detok_flush(xp_detok *d, size_t *len)
{
    *len = 0;
    if (xp_detok_reserve(d, 4)) return NULL;
    *len = xp_end_char(d, d->buf);
    d->buf[*len] = '\0';
    return d->buf;
}

char *xp_tokenizer_decode(const xp_tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
    xp_detok d;
    xp_detok_init(&d, t);
    size_t cap = 64, used = 0;
    char *out = malloc(cap);
    int ok = out != NULL;
    for (size_t i = 0; ok && i <= n; i++) {
        size_t k;
        const char *piece = i < n ? xp_detok_push(&d, ids[i], &k) : xp_detok_flush(&d, &k);
        if (!piece) {
            ok = 0;
            break;
        }
        if (used + k + 1 > cap) {
            while (used + k + 1 > cap) cap *= 2;
            char *p = realloc(out, cap);
            if (!p) {
                xp_fail("out of memory");
                ok = 0;
                break;
            }
            out = p;
        }
        memcpy(out + used, piece, k);
        used += k;
    }
    xp_detok_free(&d);
    if (!ok) {
        if (!out) xp_fail("out of memory");
        free(out);
        return NULL;
    }
    out[used] = '\0';
    if (len) *len = used;
    return out;
}
