/* Encoding: added tokens cut out first, then each stretch of text between them is normalized
 * (NFC), split into words by the pre-tokenizer regex, and each word merged by BPE rank. Words are
 * raw bytes throughout: the byte-level alphabet only matters for the vocabulary file. */
#include "tokenizer/tokenizer_impl.h"
#include "util/xp_error.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

size_t xp_utf8_check(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        /* lengths and second-byte bounds that exclude overlongs, surrogates and > U+10FFFF */
        size_t n;
        unsigned char lo = 0x80, hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) {
            n = 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            n = 3;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 4;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return i;
        }
        if (len - i < n || p[i + 1] < lo || p[i + 1] > hi) return i;
        for (size_t k = 2; k < n; k++)
            if ((p[i + k] & 0xc0) != 0x80) return i;
        i += n;
    }
    return len;
}

/* Code point at s[*i] of valid UTF-8, advancing *i. */
static uint32_t xp_utf8_next(const unsigned char *s, size_t *i)
{
    uint32_t c = s[*i];
    int n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    if (n > 1) c &= 0x3f >> (n - 1);
    for (int k = 1; k < n; k++) c = c << 6 | (s[*i + k] & 0x3f);
    *i += (size_t)n;
    return c;
}

/* ---- output and scratch ---- */

typedef struct {
    int32_t *p;
    size_t n, cap;
} xp_idvec;

/* Room for n more ids. */
static int xp_ids_reserve(xp_idvec *v, size_t n)
{
    if (v->n + n <= v->cap) return 0;
    size_t cap = v->cap ? v->cap : 64;
    while (cap < v->n + n) cap *= 2;
    int32_t *p = realloc(v->p, cap * sizeof *p);
    if (!p) return xp_fail("out of memory");
    v->p = p;
    v->cap = cap;
    return 0;
}

static int xp_ids_push(xp_idvec *v, const int32_t *ids, size_t n)
{
    if (xp_ids_reserve(v, n)) return -1;
    memcpy(v->p + v->n, ids, n * sizeof *ids);
    v->n += n;
    return 0;
}

/* A symbol of the word being merged: its id and neighbours (-1 at the ends), indexed by the byte
 * offset where it starts. */
typedef struct {
    int32_t id, prev, next;
} xp_sym;

/* A possible merge: ordered by rank, then by position, so equal ranks merge left to right. */
typedef struct {
    uint64_t order; /* rank << 32 | position */
    int32_t left, right, merged;
} xp_cand;

/* This call's own record of the words it has encoded: their ids are already in the output, so a
 * repeated word is copied from there without touching the shared, locked cache. */
typedef struct {
    uint64_t hash;
    uint32_t word, len; /* the word's bytes in memo_bytes */
    uint32_t ids, nids; /* its ids in the output */
} xp_memo_slot;

typedef struct {
    const xp_tokenizer *tok;
    xp_idvec out;
    xp_sym *sym;
    xp_cand *heap;
    size_t cap, heap_n; /* sym holds cap entries, heap 3 * cap */
    pcre2_match_data *md;
    xp_memo_slot *memo; /* open addressing, len 0 marks an empty slot */
    size_t memo_mask, memo_used;
    char *memo_bytes;
    size_t bytes_used, bytes_cap;
} xp_enc;

static int xp_enc_reserve(xp_enc *e, size_t n)
{
    if (n <= e->cap) return 0;
    size_t cap = e->cap ? e->cap : 256;
    while (cap < n) cap *= 2;
    xp_sym *s = realloc(e->sym, cap * sizeof *s);
    if (s) e->sym = s;
    xp_cand *h = s ? realloc(e->heap, 3 * cap * sizeof *h) : NULL;
    if (!h) return xp_fail("out of memory");
    e->heap = h;
    e->cap = cap;
    return 0;
}

/* ---- BPE ---- */

static void xp_heap_push(xp_enc *e, xp_cand c)
{
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (e->heap[parent].order <= c.order) break;
        e->heap[i] = e->heap[parent];
        i = parent;
    }
    e->heap[i] = c;
}

static xp_cand xp_heap_pop(xp_enc *e)
{
    xp_cand top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && e->heap[c + 1].order < e->heap[c].order) c++;
        if (last.order <= e->heap[c].order) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    e->heap[i] = last;
    return top;
}

static void xp_consider(xp_enc *e, int32_t pos)
{
    int32_t next = e->sym[pos].next, rank, merged;
    if (next < 0) return;
    int32_t l = e->sym[pos].id, r = e->sym[next].id;
    if (xp_tok_merge_find(e->tok, l, r, &rank, &merged))
        xp_heap_push(e, (xp_cand){(uint64_t)rank << 32 | (uint32_t)pos, l, r, merged});
}

/* Merges the word's bytes by rank; appends the resulting ids to e->out. Each merge pushes at most
 * two candidates, and there are fewer merges than bytes, so the heap never exceeds 3n. */
static int xp_bpe(xp_enc *e, const unsigned char *w, size_t n)
{
    if (n > INT32_MAX) return xp_fail("a word of %zu bytes is too long to encode", n);
    if (xp_enc_reserve(e, n)) return -1;
    xp_sym *sym = e->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] = (xp_sym){e->tok->byte_id[w[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    e->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++) xp_consider(e, (int32_t)i);
    while (e->heap_n) {
        xp_cand c = xp_heap_pop(e);
        int32_t pos = (int32_t)(uint32_t)c.order, next = sym[pos].next;
        /* stale: one side has merged with something else since this was queued */
        if (sym[pos].id != c.left || next < 0 || sym[next].id != c.right) continue;
        sym[pos].id = c.merged;
        sym[pos].next = sym[next].next;
        if (sym[next].next >= 0) sym[sym[next].next].prev = pos;
        sym[next].id = -1;
        if (sym[pos].prev >= 0) xp_consider(e, sym[pos].prev);
        xp_consider(e, pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (xp_ids_push(&e->out, &sym[i].id, 1)) return -1;
    return 0;
}

/* ---- word cache ---- */

/* The cache is the one mutable part of a tokenizer; its locks make that safe across threads.
 * They are only ever tried: a busy stripe counts as a miss (or a skipped store), which costs a
 * little work but never makes a thread wait. */
static pthread_mutex_t *xp_cache_lock_of(const xp_tokenizer *t, size_t slot)
{
    return (pthread_mutex_t *)&t->cache_lock[slot % XP_CACHE_STRIPES].m;
}

/* Appends the cached ids of word w; 1 if found, 0 if not, -1 on error. */
static int xp_cache_get(const xp_tokenizer *t, uint64_t h, const void *w, size_t n, xp_idvec *out)
{
    if (n > XP_CACHE_KEY) return 0;
    if (xp_ids_reserve(out, XP_CACHE_IDS)) return -1; /* before taking the lock */
    size_t slot = h & (XP_CACHE_SLOTS - 1);
    pthread_mutex_t *lock = xp_cache_lock_of(t, slot);
    if (pthread_mutex_trylock(lock)) return 0;
    const xp_cache_slot *c = &t->cache[slot];
    int hit = c->hash == h && c->klen == n && memcmp(c->key, w, n) == 0;
    if (hit) {
        memcpy(out->p + out->n, c->ids, c->nids * sizeof *c->ids);
        out->n += c->nids;
    }
    pthread_mutex_unlock(lock);
    return hit;
}

/* Stores word w and its ids, replacing whatever word held the slot. */
static void xp_cache_put(const xp_tokenizer *t, uint64_t h, const void *w, size_t n,
                         const int32_t *ids, size_t nids)
{
    if (n > XP_CACHE_KEY || nids > XP_CACHE_IDS) return;
    size_t slot = h & (XP_CACHE_SLOTS - 1);
    pthread_mutex_t *lock = xp_cache_lock_of(t, slot);
    if (pthread_mutex_trylock(lock)) return;
    xp_cache_slot *c = (xp_cache_slot *)&t->cache[slot];
    c->hash = h;
    c->klen = (uint8_t)n;
    c->nids = (uint8_t)nids;
    memcpy(c->key, w, n);
    memcpy(c->ids, ids, nids * sizeof *ids);
    pthread_mutex_unlock(lock);
}

/* ---- the call's memo ---- */

/* The memo starts small and doubles when half full, up to XP_MEMO_MAX slots; it remembers words
 * of up to XP_MEMO_WORD bytes. */
#define XP_MEMO_MAX (1u << 18)
#define XP_MEMO_WORD 256

static int xp_memo_grow(xp_enc *e)
{
    size_t slots = e->memo ? 2 * (e->memo_mask + 1) : 256;
    xp_memo_slot *m = calloc(slots, sizeof *m);
    if (!m) return -1;
    for (size_t i = 0; e->memo && i <= e->memo_mask; i++) {
        if (!e->memo[i].len) continue;
        size_t j = e->memo[i].hash & (slots - 1);
        while (m[j].len) j = (j + 1) & (slots - 1);
        m[j] = e->memo[i];
    }
    free(e->memo);
    e->memo = m;
    e->memo_mask = slots - 1;
    return 0;
}

/* The slot of word w: its entry, or the empty slot where it would go; NULL without a memo. */
static xp_memo_slot *xp_memo_find(xp_enc *e, uint64_t h, const void *w, size_t n)
{
    if (!e->memo && xp_memo_grow(e)) return NULL;
    for (size_t i = h & e->memo_mask;; i = (i + 1) & e->memo_mask) {
        xp_memo_slot *m = &e->memo[i];
        if (!m->len) return m;
        if (m->hash == h && m->len == n && !memcmp(e->memo_bytes + m->word, w, n)) return m;
    }
}

/* Records that word w (not in the memo) was encoded as the ids out[start, out.n). The memo is an
 * optimisation: when it cannot grow, the word is simply left out. */
static void xp_memo_add(xp_enc *e, uint64_t h, const void *w, size_t n, size_t start)
{
    if (2 * (e->memo_used + 1) > e->memo_mask + 1 &&
        (e->memo_mask + 1 >= XP_MEMO_MAX || xp_memo_grow(e)))
        return;
    if (e->bytes_used + n > e->bytes_cap) {
        size_t cap = e->bytes_cap ? 2 * e->bytes_cap : 4096;
        while (cap < e->bytes_used + n) cap *= 2;
        char *p = realloc(e->memo_bytes, cap);
        if (!p) return;
        e->memo_bytes = p;
        e->bytes_cap = cap;
    }
    xp_memo_slot *m = xp_memo_find(e, h, w, n);
    memcpy(e->memo_bytes + e->bytes_used, w, n);
    *m = (xp_memo_slot){h, (uint32_t)e->bytes_used, (uint32_t)n, (uint32_t)start,
                        (uint32_t)(e->out.n - start)};
    e->bytes_used += n;
    e->memo_used++;
}

static int xp_encode_word(xp_enc *e, const unsigned char *w, size_t n)
{
    const xp_tokenizer *t = e->tok;
    if (n == 1) return xp_ids_push(&e->out, &t->byte_id[w[0]], 1);
    if (t->ignore_merges) {
        int32_t id = xp_tok_vocab_find(t, (const char *)w, n);
        if (id >= 0) return xp_ids_push(&e->out, &id, 1);
    }
    if (n > XP_MEMO_WORD || e->out.n > UINT32_MAX / 2) return xp_bpe(e, w, n);
    uint64_t h = xp_tok_hash(w, n);
    xp_memo_slot *m = xp_memo_find(e, h, w, n);
    if (m && m->len) {
        /* reserve first: the ids are copied from the same array */
        if (xp_ids_reserve(&e->out, m->nids)) return -1;
        memcpy(e->out.p + e->out.n, e->out.p + m->ids, m->nids * sizeof *e->out.p);
        e->out.n += m->nids;
        return 0;
    }
    size_t start = e->out.n;
    int rc = xp_cache_get(t, h, w, n, &e->out);
    if (rc < 0) return -1;
    if (!rc) {
        if (xp_bpe(e, w, n)) return -1;
        xp_cache_put(t, h, w, n, e->out.p + start, e->out.n - start);
    }
    if (m) xp_memo_add(e, h, w, n, start);
    return 0;
}

/* ---- pre-tokenizer and normalizer ---- */

static int xp_split_words(xp_enc *e, const unsigned char *s, size_t n)
{
    const pcre2_code *re = e->tok->split_re;
    if (!re) return xp_encode_word(e, s, n);
    size_t prev = 0, at = 0;
    while (at < n) {
        int rc = pcre2_match(re, s, n, at, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return xp_fail("pre-tokenizer regex: %s", (const char *)msg);
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        /* Isolated: the text between matches is a word too */
        if (ms > prev && xp_encode_word(e, s + prev, ms - prev)) return -1;
        if (me > ms && xp_encode_word(e, s + ms, me - ms)) return -1;
        prev = me;
        at = me;
        if (me == ms) xp_utf8_next(s, &at); /* an empty match: move on one character */
    }
    return prev < n ? xp_encode_word(e, s + prev, n - prev) : 0;
}

/* Whether the code point at s[i] is NFC-stable in any context; *next is the one after it. */
static int xp_nfc_stable_at(const xp_tokenizer *t, const unsigned char *s, size_t i, size_t *next)
{
    *next = i;
    if (s[i] < 0x80) {
        (*next)++;
        return 1;
    }
    uint32_t c = xp_utf8_next(s, next);
    return c < XP_NFC_TABLE && (t->nfc_stable[c / 64] >> (c % 64) & 1);
}

static int xp_grow(char **buf, size_t *cap, size_t need)
{
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    char *p = realloc(*buf, c);
    if (!p) return xp_fail("out of memory");
    *buf = p;
    *cap = c;
    return 0;
}

/* NFC of s into a malloc'd *out, or *out = NULL when s is already NFC. A code point that is
 * NFC-stable in any context starts a segment that normalizes on its own, so only the segments
 * holding other code points go through utf8proc; most text has none and is not copied at all. */
static int xp_nfc(const xp_tokenizer *t, const char *text, size_t n, char **out, size_t *len)
{
    const unsigned char *s = (const unsigned char *)text;
    char *buf = NULL;
    size_t cap = 0, used = 0, copied = 0, seg = 0, i = 0;
    *out = NULL;
    while (i < n) {
        size_t next;
        if (xp_nfc_stable_at(t, s, i, &next)) {
            seg = i;
            i = next;
            continue;
        }
        /* the segment runs from the last stable code point to the next one */
        size_t end = next;
        while (end < n && !xp_nfc_stable_at(t, s, end, &next)) end = next;
        utf8proc_uint8_t *norm;
        utf8proc_ssize_t m = utf8proc_map(s + seg, (utf8proc_ssize_t)(end - seg), &norm,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (m < 0) {
            free(buf);
            return xp_fail("NFC normalization: %s", utf8proc_errmsg(m));
        }
        int rc = xp_grow(&buf, &cap, used + (seg - copied) + (size_t)m + (n - end));
        if (!rc) {
            memcpy(buf + used, text + copied, seg - copied);
            used += seg - copied;
            memcpy(buf + used, norm, (size_t)m);
            used += (size_t)m;
        }
        free(norm);
        if (rc) {
            free(buf);
            return -1;
        }
        copied = seg = i = end;
    }
    if (buf) {
        memcpy(buf + used, text + copied, n - copied);
        *out = buf;
        *len = used + n - copied;
    }
    return 0;
}

static int xp_encode_text(xp_enc *e, const char *s, size_t n)
{
    char *norm = NULL;
    size_t m = n;
    if (e->tok->nfc && xp_nfc(e->tok, s, n, &norm, &m)) return -1;
    int rc = m ? xp_split_words(e, (const unsigned char *)(norm ? norm : s), m) : 0;
    free(norm);
    return rc;
}

/* ---- added tokens ---- */

typedef struct {
    size_t start, len;
    const xp_added_token *added; /* NULL for text */
} xp_section;

/* The longest added token at s[0..n), or NULL. */
static const xp_added_token *xp_match_added(const xp_tokenizer *t, const char *s, size_t n,
                                            int allow_special)
{
    const xp_added_token *best = NULL;
    for (size_t i = 0; i < t->n_added; i++) {
        const xp_added_token *a = &t->added[i];
        if ((a->special && !allow_special) || a->len > n || (best && a->len <= best->len))
            continue;
        if (memcmp(a->text, s, a->len) == 0) best = a;
    }
    return best;
}

static int xp_cut_sections(const xp_tokenizer *t, const char *s, size_t n, int allow_special,
                           xp_section **out, size_t *count)
{
    size_t cap = 16, k = 0, text_start = 0;
    xp_section *sec = malloc(cap * sizeof *sec);
    if (!sec) return xp_fail("out of memory");
    for (size_t i = 0; i <= n; i++) {
        const xp_added_token *a = NULL;
        if (i < n && t->added_first[(unsigned char)s[i]])
            a = xp_match_added(t, s + i, n - i, allow_special);
        if (!a && i < n) continue;
        if (k + 2 > cap) {
            xp_section *p = realloc(sec, (cap *= 2) * sizeof *sec);
            if (!p) {
                free(sec);
                return xp_fail("out of memory");
            }
            sec = p;
        }
        if (i > text_start) sec[k++] = (xp_section){text_start, i - text_start, NULL};
        if (!a) break;
        sec[k++] = (xp_section){i, a->len, a};
        i += a->len - 1;
        text_start = i + 1;
    }
    *out = sec;
    *count = k;
    return 0;
}

/* lstrip / rstrip: an added token swallows the white space beside it. */
static void xp_strip_sections(const char *s, xp_section *sec, size_t k)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < k; i++) {
        if (!sec[i].added) continue;
        if (sec[i].added->lstrip && i > 0 && !sec[i - 1].added) {
            xp_section *p = &sec[i - 1];
            while (p->len) {
                size_t back = p->len - 1;
                while (back && (u[p->start + back] & 0xc0) == 0x80) back--;
                size_t at = p->start + back;
                if (!xp_js_space(xp_utf8_next(u, &at))) break;
                p->len = back;
            }
        }
        if (sec[i].added->rstrip && i + 1 < k && !sec[i + 1].added) {
            xp_section *p = &sec[i + 1];
            while (p->len) {
                size_t at = p->start;
                if (!xp_js_space(xp_utf8_next(u, &at))) break;
                p->len -= at - p->start;
                p->start = at;
            }
        }
    }
}

int xp_tokenizer_encode(const xp_tokenizer *t, const char *text, size_t len, int allow_special,
                        int32_t **ids, size_t *n)
{
    *ids = NULL;
    *n = 0;
    size_t bad = xp_utf8_check(text, len);
    if (bad != len)
        return xp_fail("text is not valid UTF-8 (byte 0x%02x at offset %zu)",
                       (unsigned char)text[bad], bad);
    xp_section *sec = NULL;
    size_t k = 0;
    if (xp_cut_sections(t, text, len, allow_special, &sec, &k)) return -1;
    xp_strip_sections(text, sec, k);
    xp_enc e = {.tok = t};
    int rc = 0;
    if (t->split_re && !(e.md = pcre2_match_data_create_from_pattern(t->split_re, NULL)))
        rc = xp_fail("out of memory");
    /* allocated up front, so an empty text still gives a freeable array; text runs to about
     * 4 bytes a token, so this rarely has to grow (and copy) */
    e.out.cap = len / 3 + 64;
    if (!rc && !(e.out.p = malloc(e.out.cap * sizeof *e.out.p))) rc = xp_fail("out of memory");
    for (size_t i = 0; i < k && !rc; i++)
        rc = sec[i].added ? xp_ids_push(&e.out, &sec[i].added->id, 1)
                          : xp_encode_text(&e, text + sec[i].start, sec[i].len);
    free(sec);
    free(e.sym);
    free(e.heap);
    free(e.memo);
    free(e.memo_bytes);
    pcre2_match_data_free(e.md);
    if (rc) {
        free(e.out.p);
        return -1;
    }
    *ids = e.out.p;
    *n = e.out.n;
    return 0;
}
