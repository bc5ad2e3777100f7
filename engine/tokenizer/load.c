/* Loading tokenizer.json: the BPE vocabulary and merges (kept as raw bytes, so encoding never
 * touches the byte-to-unicode alphabet), added tokens, and the pipeline, of which only what
 * byte-level BPE models use is accepted; anything else is refused rather than ignored, since
 * ignoring it would silently produce different ids. */
#include "tokenizer/tokenizer_impl.h"
#include "util/fsutil.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <utf8proc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XP_TOKENIZER_JSON_MAX (256u << 20)

/* GPT-2's pre-tokenizer regex, which ByteLevel applies when use_regex is true. */
static const char xp_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

uint64_t xp_tok_hash(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint32_t xp_pow2_above(size_t n)
{
    uint32_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
}

/* ---- byte-level alphabet: GPT-2 maps each byte to a printable code point ---- */

/* code point (< 324) -> byte, or -1 */
static void xp_unicode_to_bytes(int16_t u2b[324])
{
    for (int c = 0; c < 324; c++) u2b[c] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        u2b[printable ? b : 256 + extra++] = (int16_t)b;
    }
}

/* Decodes a byte-level token (UTF-8 of alphabet code points) into raw bytes; out has room for
 * strlen(s) bytes. Returns the length, or -1 if a character is outside the alphabet. */
static long xp_bytelevel_to_raw(const int16_t u2b[324], const char *s, char *out)
{
    const unsigned char *p = (const unsigned char *)s;
    long n = 0;
    while (*p) {
        uint32_t c;
        if (p[0] < 0x80) {
            c = *p++;
        } else if ((p[0] & 0xe0) == 0xc0 && (p[1] & 0xc0) == 0x80) {
            c = (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f);
            p += 2;
        } else {
            return -1;
        }
        if (c >= 324 || u2b[c] < 0) return -1;
        out[n++] = (char)u2b[c];
    }
    return n;
}

/* ---- id table and lookups ---- */

static int xp_arena_add(xp_tokenizer *t, const char *s, size_t n, uint32_t *off)
{
    if (t->arena_len + n > UINT32_MAX) return xp_fail("vocabulary too large");
    if (t->arena_len + n > t->arena_cap) {
        size_t cap = (t->arena_len + n) * 2;
        char *p = realloc(t->arena, cap);
        if (!p) return xp_fail("out of memory");
        t->arena = p;
        t->arena_cap = cap;
    }
    memcpy(t->arena + t->arena_len, s, n);
    *off = (uint32_t)t->arena_len;
    t->arena_len += n;
    return 0;
}

int32_t xp_tok_vocab_find(const xp_tokenizer *t, const char *s, size_t n)
{
    for (uint32_t i = (uint32_t)xp_tok_hash(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        int32_t id = t->vocab_slots[i];
        if (id < 0) return -1;
        if (t->tok_len[id] == n && memcmp(t->arena + t->tok_off[id], s, n) == 0) return id;
    }
}

static uint32_t xp_merge_index(uint64_t key, uint32_t mask)
{
    return (uint32_t)((key * 0x9e3779b97f4a7c15ull) >> 32) & mask;
}

int xp_tok_merge_find(const xp_tokenizer *t, int32_t left, int32_t right, int32_t *rank,
                      int32_t *id)
{
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    for (uint32_t i = xp_merge_index(key, t->merge_mask);; i = (i + 1) & t->merge_mask) {
        const xp_merge_slot *m = &t->merges[i];
        if (m->key == 0) return 0;
        if (m->key == key) {
            *rank = m->rank;
            *id = m->id;
            return 1;
        }
    }
}

/* ---- tokenizer.json sections ---- */

static const char *xp_type(const cJSON *obj)
{
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(obj, "type"));
    return s ? s : "(none)";
}

static int xp_flag(const cJSON *obj, const char *key)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(obj, key));
}

/* A string option that must be absent, null or "". */
static int xp_empty_opt(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && !v->valuestring[0])) return 0;
    return xp_fail("model.%s is not supported", key);
}

static int xp_load_vocab(xp_tokenizer *t, const cJSON *model, const cJSON *added,
                         const int16_t u2b[324])
{
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab)) return xp_fail("model.vocab must be an object");
    int32_t max_id = -1;
    size_t n_vocab = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, vocab)
    {
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > INT32_MAX - 1 ||
            v->valuedouble != (double)(int32_t)v->valuedouble)
            return xp_fail("model.vocab[\"%s\"] is not a valid id", v->string);
        if (v->valueint > max_id) max_id = v->valueint;
        n_vocab++;
    }
    cJSON_ArrayForEach(v, added)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(v, "id");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > INT32_MAX - 1)
            return xp_fail("added_tokens: an entry has no valid id");
        if (id->valueint > max_id) max_id = id->valueint;
    }
    t->n_ids = max_id + 1;
    t->tok_off = calloc((size_t)t->n_ids, sizeof *t->tok_off);
    t->tok_len = calloc((size_t)t->n_ids, sizeof *t->tok_len);
    t->tok_kind = calloc((size_t)t->n_ids, 1);
    t->vocab_mask = xp_pow2_above(n_vocab) - 1;
    t->vocab_slots = malloc(((size_t)t->vocab_mask + 1) * sizeof *t->vocab_slots);
    if (!t->tok_off || !t->tok_len || !t->tok_kind || !t->vocab_slots)
        return xp_fail("out of memory");
    memset(t->vocab_slots, 0xff, ((size_t)t->vocab_mask + 1) * sizeof *t->vocab_slots);
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;

    char *raw = NULL;
    size_t raw_cap = 0;
    int rc = 0;
    cJSON_ArrayForEach(v, vocab)
    {
        size_t len = strlen(v->string);
        if (len + 1 > raw_cap) {
            raw_cap = 2 * len + 64;
            free(raw);
            if (!(raw = malloc(raw_cap))) {
                rc = xp_fail("out of memory");
                break;
            }
        }
        long n = xp_bytelevel_to_raw(u2b, v->string, raw);
        int32_t id = v->valueint;
        if (n < 0) {
            rc = xp_fail("model.vocab: \"%s\" is not a byte-level token", v->string);
            break;
        }
        if (t->tok_kind[id]) {
            rc = xp_fail("model.vocab: id %d is used twice", id);
            break;
        }
        if (xp_tok_vocab_find(t, raw, (size_t)n) >= 0) {
            rc = xp_fail("model.vocab: \"%s\" appears twice", v->string);
            break;
        }
        if ((rc = xp_arena_add(t, raw, (size_t)n, &t->tok_off[id]))) break;
        t->tok_len[id] = (uint32_t)n;
        t->tok_kind[id] = XP_TOK_BPE;
        uint32_t i = (uint32_t)xp_tok_hash(raw, (size_t)n) & t->vocab_mask;
        while (t->vocab_slots[i] >= 0) i = (i + 1) & t->vocab_mask;
        t->vocab_slots[i] = id;
        if (n == 1) t->byte_id[(unsigned char)raw[0]] = id;
    }
    free(raw);
    if (rc) return rc;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) return xp_fail("model.vocab has no token for byte 0x%02x", b);
    return 0;
}

/* One merge, "left right" (older files) or ["left", "right"], as raw bytes in raw[0, *ln) and
 * raw[*ln, *ln + *rn); raw has room for XP_MERGE_MAX bytes. */
#define XP_MERGE_MAX 1024

static int xp_merge_parts(const cJSON *m, const int16_t u2b[324], char *raw, long *ln, long *rn)
{
    char both[XP_MERGE_MAX];
    const char *l, *r;
    if (cJSON_IsString(m)) {
        /* the alphabet has no plain space, so the first space separates the two */
        if (strlen(m->valuestring) >= sizeof both) return -1;
        strcpy(both, m->valuestring);
        char *space = strchr(both, ' ');
        if (!space) return -1;
        *space = '\0';
        l = both;
        r = space + 1;
    } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
               cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
               cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
        l = cJSON_GetArrayItem(m, 0)->valuestring;
        r = cJSON_GetArrayItem(m, 1)->valuestring;
        if (strlen(l) + strlen(r) >= XP_MERGE_MAX) return -1;
    } else {
        return -1;
    }
    *ln = xp_bytelevel_to_raw(u2b, l, raw);
    *rn = *ln < 0 ? -1 : xp_bytelevel_to_raw(u2b, r, raw + *ln);
    return *ln < 0 || *rn < 0 ? -1 : 0;
}

/* The merge as JSON, for error messages. */
static const char *xp_merge_text(const cJSON *m, char *buf, int cap)
{
    return cJSON_PrintPreallocated((cJSON *)m, buf, cap, 0) ? buf : "(too long)";
}

static int xp_load_merges(xp_tokenizer *t, const cJSON *model, const int16_t u2b[324])
{
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsArray(merges)) return xp_fail("model.merges must be a list");
    size_t n = (size_t)cJSON_GetArraySize(merges);
    /* at most 2/3 full: probes stay short and the table small enough to stay in cache, which
     * measurably beats a sparser one */
    t->merge_mask = xp_pow2_above(n * 3 / 4) - 1;
    t->merges = calloc((size_t)t->merge_mask + 1, sizeof *t->merges);
    if (!t->merges) return xp_fail("out of memory");
    char raw[XP_MERGE_MAX], buf[256];
    int32_t rank = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges)
    {
        long ln, rn;
        if (xp_merge_parts(m, u2b, raw, &ln, &rn))
            return xp_fail("model.merges[%d] %s is not a pair of byte-level tokens", rank,
                           xp_merge_text(m, buf, sizeof buf));
        int32_t left = xp_tok_vocab_find(t, raw, (size_t)ln);
        int32_t right = xp_tok_vocab_find(t, raw + ln, (size_t)rn);
        int32_t merged = xp_tok_vocab_find(t, raw, (size_t)(ln + rn));
        if (left < 0 || right < 0 || merged < 0)
            return xp_fail("model.merges[%d] %s: the %s is not in the vocabulary", rank,
                           xp_merge_text(m, buf, sizeof buf),
                           left < 0 ? "left part" : right < 0 ? "right part" : "result");
        uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
        uint32_t i = xp_merge_index(key, t->merge_mask);
        while (t->merges[i].key && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
        /* a repeated pair takes its later rank, as the reference's Map does */
        t->merges[i] = (xp_merge_slot){key, rank, merged};
        rank++;
    }
    return 0;
}

static int xp_load_model(xp_tokenizer *t, const cJSON *model, const cJSON *added)
{
    if (strcmp(xp_type(model), "BPE") != 0)
        return xp_fail("model type \"%s\" is not supported (only BPE)", xp_type(model));
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout)) return xp_fail("model.dropout is not supported");
    if (xp_flag(model, "byte_fallback")) return xp_fail("model.byte_fallback is not supported");
    if (xp_empty_opt(model, "continuing_subword_prefix") ||
        xp_empty_opt(model, "end_of_word_suffix"))
        return -1;
    t->ignore_merges = xp_flag(model, "ignore_merges");
    int16_t u2b[324];
    xp_unicode_to_bytes(u2b);
    if (xp_load_vocab(t, model, added, u2b)) return -1;
    return xp_load_merges(t, model, u2b);
}

static int xp_load_added(xp_tokenizer *t, const cJSON *added)
{
    if (!added || cJSON_IsNull(added)) return 0;
    if (!cJSON_IsArray(added)) return xp_fail("added_tokens must be a list");
    t->added = calloc((size_t)cJSON_GetArraySize(added) + 1, sizeof *t->added);
    if (!t->added) return xp_fail("out of memory");
    const cJSON *a;
    cJSON_ArrayForEach(a, added)
    {
        const char *content = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "content"));
        if (!content || !content[0]) return xp_fail("added_tokens: an entry has no content");
        if (xp_utf8_check(content, strlen(content)) != strlen(content))
            return xp_fail("added_tokens: \"%s\" is not valid UTF-8", content);
        int32_t id = cJSON_GetObjectItemCaseSensitive(a, "id")->valueint;
        xp_added_token *at = &t->added[t->n_added++];
        at->id = id;
        at->len = (uint32_t)strlen(content);
        at->lstrip = xp_flag(a, "lstrip");
        at->rstrip = xp_flag(a, "rstrip");
        at->special = xp_flag(a, "special");
        /* The reference matches every added token on the raw text, whatever its `normalized`
         * flag, and so do we. */
        uint32_t off;
        if (xp_arena_add(t, content, at->len, &off)) return -1;
        t->tok_off[id] = off;
        t->tok_len[id] = at->len;
        t->tok_kind[id] = at->special ? XP_TOK_SPECIAL : XP_TOK_ADDED;
        t->added_first[(unsigned char)content[0]] = 1;
    }
    /* the arena may have moved while growing */
    for (size_t i = 0; i < t->n_added; i++)
        t->added[i].text = t->arena + t->tok_off[t->added[i].id];
    return 0;
}

/* A code point is NFC-stable in any context if it is its own NFC, has combining class 0 (nothing
 * reorders around it) and cannot be the second half of a composition (nothing merges into the
 * character before it). */
static int xp_nfc_stable(uint32_t c)
{
    if (c >= 0x1161 && c <= 0x11c2) return 0; /* Hangul vowels and trailing consonants compose */
    const utf8proc_property_t *p = utf8proc_get_property((utf8proc_int32_t)c);
    if (p->category == UTF8PROC_CATEGORY_CN || p->category == UTF8PROC_CATEGORY_CS ||
        p->combining_class != 0 || (p->comb_index != UINT16_MAX && p->comb_index >= 0x8000))
        return 0;
    utf8proc_int32_t out[4];
    int lbc = 0;
    /* the options of utf8proc_NFC */
    utf8proc_option_t nfc = UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)c, out, 4, nfc, &lbc);
    if (n == 1) return out[0] == (utf8proc_int32_t)c;
    /* a precomposed character is stable if composing its decomposition gives it back */
    if (n < 2 || n > 4) return 0;
    return utf8proc_normalize_utf32(out, n, nfc) == 1 && out[0] == (utf8proc_int32_t)c;
}

static int xp_load_normalizer(xp_tokenizer *t, const cJSON *norm)
{
    if (!norm || cJSON_IsNull(norm)) return 0;
    if (strcmp(xp_type(norm), "NFC") != 0)
        return xp_fail("normalizer type \"%s\" is not supported (only NFC or none)",
                       xp_type(norm));
    t->nfc = 1;
    if (!(t->nfc_stable = calloc(XP_NFC_TABLE / 64, sizeof *t->nfc_stable)))
        return xp_fail("out of memory");
    for (uint32_t c = 0; c < XP_NFC_TABLE; c++)
        if (xp_nfc_stable(c)) t->nfc_stable[c / 64] |= 1ull << (c % 64);
    return 0;
}

/* The ByteLevel step: returns 1 if it splits with GPT-2's regex itself. */
static int xp_bytelevel_regex(const cJSON *p)
{
    if (xp_flag(p, "add_prefix_space"))
        return xp_fail("pre_tokenizer ByteLevel.add_prefix_space=true is not supported");
    const cJSON *use = cJSON_GetObjectItemCaseSensitive(p, "use_regex");
    return !use || cJSON_IsTrue(use);
}

static int xp_load_split(xp_tokenizer *t, const cJSON *p)
{
    const char *behavior = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "behavior"));
    const char *regex = cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(p, "pattern"), "Regex"));
    if (!regex) return xp_fail("pre_tokenizer Split: only a Regex pattern is supported");
    if (!behavior || strcmp(behavior, "Isolated") != 0)
        return xp_fail("pre_tokenizer Split: behavior \"%s\" is not supported (only Isolated)",
                       behavior ? behavior : "(none)");
    if (xp_flag(p, "invert")) return xp_fail("pre_tokenizer Split: invert=true is not supported");
    t->split_re = xp_tok_compile_regex(regex);
    return t->split_re ? 0 : -1;
}

/* Accepted: ByteLevel alone, or Sequence [Split(Regex, Isolated), ByteLevel(use_regex=false)]. */
static int xp_load_pretok(xp_tokenizer *t, const cJSON *pre)
{
    if (!pre || cJSON_IsNull(pre)) return xp_fail("a ByteLevel pre_tokenizer is required");
    const char *type = xp_type(pre);
    if (!strcmp(type, "ByteLevel")) {
        int r = xp_bytelevel_regex(pre);
        if (r < 0) return -1;
        if (r && !(t->split_re = xp_tok_compile_regex(xp_gpt2_pattern))) return -1;
        return 0;
    }
    if (strcmp(type, "Sequence") != 0)
        return xp_fail("pre_tokenizer type \"%s\" is not supported", type);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
    int n = cJSON_GetArraySize(list);
    for (int i = 0; i < n; i++) {
        const char *pt = xp_type(cJSON_GetArrayItem(list, i));
        if (strcmp(pt, "Split") != 0 && strcmp(pt, "ByteLevel") != 0)
            return xp_fail("pre_tokenizer type \"%s\" (in a Sequence) is not supported", pt);
    }
    const cJSON *last = cJSON_GetArrayItem(list, n - 1);
    if (!cJSON_IsArray(list) || n < 1 || n > 2 || strcmp(xp_type(last), "ByteLevel") != 0 ||
        (n == 2 && strcmp(xp_type(cJSON_GetArrayItem(list, 0)), "Split") != 0))
        return xp_fail("pre_tokenizer Sequence: only [Split, ByteLevel] or [ByteLevel] is "
                       "supported");
    int r = xp_bytelevel_regex(last);
    if (r < 0) return -1;
    if (n == 1) return r && !(t->split_re = xp_tok_compile_regex(xp_gpt2_pattern)) ? -1 : 0;
    if (r)
        return xp_fail("pre_tokenizer: ByteLevel with use_regex=true after Split is not "
                       "supported");
    return xp_load_split(t, cJSON_GetArrayItem(list, 0));
}

static int xp_load_rest(const cJSON *root)
{
    const cJSON *post = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    if (post && !cJSON_IsNull(post) && strcmp(xp_type(post), "ByteLevel") != 0)
        return xp_fail("post_processor type \"%s\" is not supported", xp_type(post));
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (strcmp(xp_type(dec), "ByteLevel") != 0)
        return xp_fail("decoder type \"%s\" is not supported (only ByteLevel)", xp_type(dec));
    return 0;
}

/* tokenizer_config.json's added_tokens_decoder ({"151643": {"content": ..., "special": ...}})
 * as a list shaped like tokenizer.json's added_tokens; NULL when it has none. */
static cJSON *xp_added_from_config(const cJSON *cfg)
{
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(cfg, "added_tokens_decoder");
    if (!cJSON_IsObject(dec) || !dec->child) return NULL;
    cJSON *list = cJSON_CreateArray();
    const cJSON *e;
    cJSON_ArrayForEach(e, dec)
    {
        char *end;
        long id = strtol(e->string, &end, 10);
        cJSON *a = cJSON_Duplicate(e, 1);
        /* a key that is not an id stays without one, and the loader refuses the entry */
        if (a && *e->string && !*end) cJSON_AddNumberToObject(a, "id", (double)id);
        cJSON_AddItemToArray(list, a);
    }
    return list;
}

/* Where both files list the added tokens they must agree: a token that means one thing to the
 * encoder and another to the chat template is a broken checkpoint, not one to guess about. */
static int xp_check_added_agree(const cJSON *added, const cJSON *from_cfg)
{
    const cJSON *c, *a;
    cJSON_ArrayForEach(c, from_cfg)
    {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(c, "id");
        const char *cc = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "content"));
        int found = 0;
        cJSON_ArrayForEach(a, added)
        {
            const cJSON *aid = cJSON_GetObjectItemCaseSensitive(a, "id");
            if (!cJSON_IsNumber(id) || !cJSON_IsNumber(aid) || aid->valuedouble != id->valuedouble)
                continue;
            const char *ac = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(a, "content"));
            found = 1;
            if (!cc || !ac || strcmp(cc, ac) != 0 || xp_flag(a, "special") != xp_flag(c, "special"))
                return xp_fail("tokenizer.json's added_tokens and tokenizer_config.json's "
                               "added_tokens_decoder disagree about id %.0f (\"%.60s\" / \"%.60s\")",
                               id->valuedouble, ac ? ac : "?", cc ? cc : "?");
        }
        if (!found)
            return xp_fail("tokenizer_config.json's added_tokens_decoder has \"%.60s\" (id %.0f), "
                           "which tokenizer.json's added_tokens lacks",
                           cc ? cc : "?", cJSON_IsNumber(id) ? id->valuedouble : -1.0);
    }
    return 0;
}

static int xp_load_tokenizer_json(xp_tokenizer *t, const char *dir)
{
    char *path = xp_path_join(dir, "tokenizer.json");
    char *cpath = xp_path_join(dir, "tokenizer_config.json");
    if (!path || !cpath) {
        free(path);
        free(cpath);
        return xp_fail("out of memory");
    }
    char *text = xp_read_text_file(path, XP_TOKENIZER_JSON_MAX);
    cJSON *root = text ? cJSON_Parse(text) : NULL, *cfg = NULL, *from_cfg = NULL;
    int rc = 0;
    if (!text) rc = -1;
    else if (!root) rc = xp_fail("%s: not valid JSON", path);
    free(text);
    if (!rc) {
        /* the config's own problems are reported when its stop token is read */
        char *ctext = access(cpath, F_OK) == 0 ? xp_read_text_file(cpath, 16u << 20) : NULL;
        cfg = ctext ? cJSON_Parse(ctext) : NULL;
        free(ctext);
        from_cfg = xp_added_from_config(cfg);
        const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
        int none = !added || cJSON_IsNull(added) || (cJSON_IsArray(added) && !added->child);
        if (none && !from_cfg)
            rc = xp_fail("no added_tokens, and tokenizer_config.json has no added_tokens_decoder: "
                         "the special tokens (<|im_start|>, <|im_end|>, ...) are unknown and "
                         "would be encoded as plain text");
        else if (none)
            added = from_cfg; /* where Qwen's files list them too */
        else if (from_cfg && cJSON_IsArray(added))
            rc = xp_check_added_agree(added, from_cfg);
        if (!rc) rc = xp_load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), added);
        if (!rc) rc = xp_load_added(t, added);
        if (!rc) rc = xp_load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"));
        if (!rc) rc = xp_load_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"));
        if (!rc) rc = xp_load_rest(root);
        if (rc) xp_fail_ctx("%s", path);
    }
    cJSON_Delete(root);
    cJSON_Delete(cfg);
    cJSON_Delete(from_cfg);
    free(path);
    free(cpath);
    return rc;
}

/* ---- stop tokens ---- */

#define XP_MAX_STOP 64

static void xp_add_stop(xp_tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_ids || !t->tok_kind[id] || t->n_stop == XP_MAX_STOP) return;
    for (size_t i = 0; i < t->n_stop; i++)
        if (t->stop[i] == id) return;
    t->stop[t->n_stop++] = id;
}

static int xp_load_config(xp_tokenizer *t, const char *dir)
{
    char *path = xp_path_join(dir, "tokenizer_config.json");
    char *text = path ? xp_read_text_file(path, 16u << 20) : NULL;
    cJSON *cfg = text ? cJSON_Parse(text) : NULL;
    int rc = 0;
    if (!cfg) {
        rc = text ? xp_fail("%s: not valid JSON", path) : -1;
        goto out;
    }
    if (xp_flag(cfg, "clean_up_tokenization_spaces")) {
        rc = xp_fail("%s: clean_up_tokenization_spaces=true is not supported", path);
        goto out;
    }
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(cfg, "eos_token");
    if (cJSON_IsObject(eos)) eos = cJSON_GetObjectItemCaseSensitive(eos, "content");
    if (cJSON_IsString(eos)) xp_add_stop(t, xp_tokenizer_token_id(t, eos->valuestring));
out:
    cJSON_Delete(cfg);
    free(text);
    free(path);
    return rc;
}

static int xp_load_generation_config(xp_tokenizer *t, const char *dir)
{
    char *path = xp_path_join(dir, "generation_config.json");
    if (!path) return -1;
    int rc = 0;
    if (access(path, F_OK) == 0) {
        char *text = xp_read_text_file(path, 1u << 20);
        cJSON *cfg = text ? cJSON_Parse(text) : NULL;
        if (!cfg) {
            rc = text ? xp_fail("%s: not valid JSON", path) : -1;
        } else {
            const cJSON *eos = cJSON_GetObjectItemCaseSensitive(cfg, "eos_token_id");
            if (cJSON_IsNumber(eos)) xp_add_stop(t, eos->valueint);
            for (int i = 0; i < cJSON_GetArraySize(eos); i++)
                if (cJSON_IsNumber(cJSON_GetArrayItem(eos, i)))
                    xp_add_stop(t, cJSON_GetArrayItem(eos, i)->valueint);
        }
        free(text);
        cJSON_Delete(cfg);
    }
    free(path);
    return rc;
}

static int xp_load_stops(xp_tokenizer *t, const char *dir)
{
    if (!(t->stop = calloc(XP_MAX_STOP, sizeof *t->stop))) return xp_fail("out of memory");
    if (xp_load_generation_config(t, dir) || xp_load_config(t, dir)) return -1;
    /* ChatML models end a turn with <|im_end|> and a document with <|endoftext|> */
    xp_add_stop(t, xp_tokenizer_token_id(t, "<|im_end|>"));
    xp_add_stop(t, xp_tokenizer_token_id(t, "<|endoftext|>"));
    return 0;
}

xp_tokenizer *xp_tokenizer_load(const char *dir)
{
    xp_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        xp_fail("out of memory");
        return NULL;
    }
    for (int i = 0; i < XP_CACHE_STRIPES; i++) pthread_mutex_init(&t->cache_lock[i].m, NULL);
    int rc = xp_load_tokenizer_json(t, dir);
    if (!rc) rc = xp_load_stops(t, dir);
    if (!rc && !(t->cache = calloc(XP_CACHE_SLOTS, sizeof *t->cache)))
        rc = xp_fail("out of memory");
    if (rc) {
        xp_tokenizer_free(t);
        return NULL;
    }
    return t;
}

void xp_tokenizer_free(xp_tokenizer *t)
{
    if (!t) return;
    for (int i = 0; i < XP_CACHE_STRIPES; i++) pthread_mutex_destroy(&t->cache_lock[i].m);
    if (t->split_re) pcre2_code_free(t->split_re);
    free(t->arena);
    free(t->tok_off);
    free(t->tok_len);
    free(t->tok_kind);
    free(t->vocab_slots);
    free(t->merges);
    free(t->added);
    free(t->stop);
    free(t->cache);
    free(t->nfc_stable);
    free(t);
}

int32_t xp_tokenizer_vocab_size(const xp_tokenizer *t)
{
    return t->n_ids;
}

int32_t xp_tokenizer_token_id(const xp_tokenizer *t, const char *token)
{
    size_t n = strlen(token);
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && !memcmp(t->added[i].text, token, n)) return t->added[i].id;
    return xp_tok_vocab_find(t, token, n);
}

const int32_t *xp_tokenizer_stop_ids(const xp_tokenizer *t, size_t *n)
{
    *n = t->n_stop;
    return t->stop;
}

int xp_tokenizer_is_stop(const xp_tokenizer *t, int32_t id)
{
    for (size_t i = 0; i < t->n_stop; i++)
        if (t->stop[i] == id) return 1;
    return 0;
}
