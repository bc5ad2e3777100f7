/* Internals shared by tokenizer_load.c, tokenizer_regex.c, tokenizer_encode.c and
 * tokenizer_decode.c; not part of the public API. */
#ifndef XP_TOKENIZER_IMPL_H
#define XP_TOKENIZER_IMPL_H

#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>

/* Kinds of id, for decoding: BPE tokens are byte strings, added tokens are emitted verbatim. */
enum { XP_TOK_NONE, XP_TOK_BPE, XP_TOK_ADDED, XP_TOK_SPECIAL };

typedef struct {
    const char *text; /* into the tokenizer's arena */
    uint32_t len;
    int32_t id;
    int lstrip, rstrip, special;
} xp_added_token;

/* (left id, right id) -> merge rank and the id of the merged token. */
typedef struct {
    uint64_t key; /* (left << 32 | right) + 1, so 0 marks an empty slot */
    int32_t rank, id;
} xp_merge_slot;

/* Word cache shared by all calls: direct-mapped slots holding a short word and its ids in place
 * (no allocation per word), one lock per stripe of slots. */
#define XP_CACHE_SLOTS 32768
#define XP_CACHE_STRIPES 64
#define XP_CACHE_KEY 46
#define XP_CACHE_IDS 16

typedef struct {
    uint64_t hash;
    uint8_t klen, nids;
    char key[XP_CACHE_KEY];
    int32_t ids[XP_CACHE_IDS];
} xp_cache_slot;

/* A lock alone on its cache line, so threads taking neighbouring stripes do not collide. */
typedef union {
    pthread_mutex_t m;
    char line[64];
} xp_cache_lock;

/* Code points below this have a bit in nfc_stable. */
#define XP_NFC_TABLE 0x20000

struct xp_tokenizer {
    /* id -> bytes: raw bytes for BPE tokens, UTF-8 content for added tokens */
    char *arena;
    size_t arena_len, arena_cap;
    uint32_t *tok_off, *tok_len;
    uint8_t *tok_kind;
    int32_t n_ids;

    /* raw bytes -> BPE id, open addressing over ids (-1 empty) */
    int32_t *vocab_slots;
    uint32_t vocab_mask;
    xp_merge_slot *merges;
    uint32_t merge_mask;
    int32_t byte_id[256];
    int ignore_merges;

    xp_added_token *added;
    size_t n_added;
    uint8_t added_first[256]; /* 1 if some added token starts with this byte */

    int nfc;
    /* bit set: the code point is left alone by NFC whatever surrounds it, so text made only of
     * such code points can skip normalization */
    uint64_t *nfc_stable;
    pcre2_code *split_re; /* NULL: the whole section is one word */

    int32_t *stop;
    size_t n_stop;

    xp_cache_slot *cache;
    xp_cache_lock cache_lock[XP_CACHE_STRIPES];
};

uint64_t xp_tok_hash(const void *p, size_t n);
int32_t xp_tok_vocab_find(const xp_tokenizer *t, const char *s, size_t n);
int xp_tok_merge_find(const xp_tokenizer *t, int32_t left, int32_t right, int32_t *rank,
                      int32_t *id);

/* Compiles a tokenizer.json Split regex so that PCRE2 matches exactly what JavaScript's
 * RegExp(pattern, "u") matches. NULL + error. */
pcre2_code *xp_tok_compile_regex(const char *pattern);

/* JavaScript's white space (String.prototype.trim), which is also what \s means in the regex. */
int xp_js_space(uint32_t c);

/* Byte offset of the first invalid UTF-8 sequence, or len if the text is valid. */
size_t xp_utf8_check(const char *s, size_t len);

#endif
