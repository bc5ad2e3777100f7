/* The pre-tokenizer regex: tokenizer.json patterns are written for Rust's regex crate, and the
 * reference runs them as JavaScript RegExp(pattern, "u"). PCRE2 (UTF + UCP) matches the same
 * language, backtracking the same way, once two differences are rewritten away (a third remains:
 * \p{L} and \p{N} follow each library's Unicode tables, so letters and digits assigned after
 * PCRE2's Unicode version, 14.0 for Debian 12's 10.42, can split differently):
 *   - \s: PCRE2 counts U+0085 and U+180E as space, JavaScript counts U+FEFF instead, so \s and \S
 *     become explicit classes of JavaScript's white space;
 *   - (?i:...): JavaScript has no inline flags, so the reference spells Qwen's case-insensitive
 *     contractions out as [sS] etc.; PCRE2's own caseless mode would also let 's match U+017F
 *     (long s) or 'k match U+212A (Kelvin sign), so ASCII letters in such a group become [xX]. */
#include "tokenizer/tokenizer_impl.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>

/* JavaScript's WhiteSpace and LineTerminator code points, as class content. */
static const char xp_js_space_class[] = "\\t\\n\\x0b\\f\\r\\x20\\xa0\\x{1680}\\x{2000}-\\x{200a}"
                                        "\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}\\x{feff}";

int xp_js_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000 || c == 0xfeff;
}

typedef struct {
    char *p;
    size_t n, cap;
} xp_sbuf;

static int xp_sbuf_put(xp_sbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (!p) return xp_fail("out of memory");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

static int xp_sbuf_puts(xp_sbuf *b, const char *s)
{
    return xp_sbuf_put(b, s, strlen(s));
}

/* Length of the escape starting at s[0] == '\\': \p{..}, \x{..} and \u{..} run to the brace. */
static size_t xp_escape_len(const char *s)
{
    if (!s[1]) return 1;
    if (strchr("pPxu", s[1]) && s[2] == '{') {
        const char *e = strchr(s + 3, '}');
        return e ? (size_t)(e - s) + 1 : strlen(s);
    }
    if ((s[1] == 'p' || s[1] == 'P') && s[2]) return 3; /* \pL */
    return 2;
}

static int xp_rewrite(const char *pat, xp_sbuf *out)
{
    /* depth of each open group, and the depth below which letters are caseless (0: none) */
    int depth = 0, caseless_from = 0, in_class = 0;
    for (const char *s = pat; *s;) {
        int caseless = caseless_from && depth >= caseless_from;
        if (*s == '\\') {
            size_t n = xp_escape_len(s);
            int rc;
            if (s[1] == 's')
                rc = in_class ? xp_sbuf_puts(out, xp_js_space_class)
                              : (xp_sbuf_puts(out, "[") || xp_sbuf_puts(out, xp_js_space_class) ||
                                 xp_sbuf_puts(out, "]"));
            else if (s[1] == 'S' && !in_class)
                rc = xp_sbuf_puts(out, "[^") || xp_sbuf_puts(out, xp_js_space_class) ||
                     xp_sbuf_puts(out, "]");
            else if (s[1] == 'S')
                return xp_fail("\\S inside a character class is not supported");
            else
                rc = xp_sbuf_put(out, s, n);
            if (rc) return -1;
            s += n;
            continue;
        }
        if (in_class) {
            if (*s == ']') in_class = 0;
        } else if (*s == '[') {
            in_class = 1;
            if (xp_sbuf_put(out, s, 1)) return -1;
            s++;
            /* a ']' or '^]' right after '[' is a literal */
            if (*s == '^') {
                if (xp_sbuf_put(out, s++, 1)) return -1;
            }
            if (*s == ']') {
                if (xp_sbuf_put(out, s++, 1)) return -1;
            }
            continue;
        } else if (*s == '(') {
            depth++;
            if (!strncmp(s, "(?i:", 4)) {
                if (!caseless_from) caseless_from = depth;
                if (xp_sbuf_puts(out, "(?:")) return -1;
                s += 4;
                continue;
            }
            if (s[1] == '?' && strchr("imsxnU-^", s[2]))
                return xp_fail("inline flags other than (?i:...) are not supported");
        } else if (*s == ')') {
            if (caseless_from && depth == caseless_from) caseless_from = 0;
            depth--;
        }
        unsigned char c = (unsigned char)*s;
        if (caseless && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
            char both[5] = {'[', (char)(c | 0x20), (char)(c & ~0x20), ']', 0};
            if (in_class ? xp_sbuf_put(out, both + 1, 2) : xp_sbuf_puts(out, both)) return -1;
        } else if (xp_sbuf_put(out, s, 1)) {
            return -1;
        }
        s++;
    }
    return 0;
}

pcre2_code *xp_tok_compile_regex(const char *pattern)
{
    xp_sbuf out = {0};
    if (xp_rewrite(pattern, &out)) {
        free(out.p);
        xp_fail_ctx("pre-tokenizer regex");
        return NULL;
    }
    int err;
    PCRE2_SIZE off;
    pcre2_code *re =
        pcre2_compile((PCRE2_SPTR)out.p, out.n, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        xp_fail("pre-tokenizer regex: %s at offset %zu of \"%s\"", (const char *)msg, (size_t)off,
                out.p);
        free(out.p);
        return NULL;
    }
    free(out.p);
    /* JIT is an optimisation: the interpreter gives the same matches where it is unavailable */
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    return re;
}
