/* Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json (Qwen2/Qwen3, GPT-2 family).
 *
 * Encode: added tokens are cut out first (longest match), the text between them is NFC-normalized,
 * split by the pre-tokenizer's regex, mapped byte by byte, and merged by rank. Decode maps ids back
 * to bytes and turns them into UTF-8 text the way the WHATWG TextDecoder does (each invalid byte
 * run becomes U+FFFD), which is what the reference implementation does.
 *
 * A loaded tokenizer is read-only apart from an internal, locked word cache, so one tokenizer can
 * encode and decode on several threads at once. */
#ifndef XP_TOKENIZER_H
#define XP_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

typedef struct xp_tokenizer xp_tokenizer;

/* Loads DIR/tokenizer.json, DIR/tokenizer_config.json and, when present,
 * DIR/generation_config.json. Unsupported normalizers, pre-tokenizers, models or decoders are
 * refused. NULL + xp_last_error(). */
xp_tokenizer *xp_tokenizer_load(const char *dir);
void xp_tokenizer_free(xp_tokenizer *t);

/* Number of ids (largest id + 1); ids below it may still be unassigned. */
int32_t xp_tokenizer_vocab_size(const xp_tokenizer *t);
/* The id of a token given as text (an added token's content, or a vocabulary entry as its raw
 * bytes); -1 if there is none. */
int32_t xp_tokenizer_token_id(const xp_tokenizer *t, const char *token);
/* Ids that end generation: generation_config.json's eos_token_id, tokenizer_config.json's
 * eos_token, and <|im_end|> / <|endoftext|> when the tokenizer has them. */
const int32_t *xp_tokenizer_stop_ids(const xp_tokenizer *t, size_t *n);
int xp_tokenizer_is_stop(const xp_tokenizer *t, int32_t id);

/* Encodes len bytes of UTF-8 text into a malloc'd array. With allow_special == 0, special added
 * tokens (<|im_start|>, ...) in the text are encoded as plain text, so user input cannot forge
 * them; non-special added tokens (<think>, <tool_call>, ...) are always matched. Invalid UTF-8 is
 * refused. Returns 0, or -1 with xp_last_error(). */
int xp_tokenizer_encode(const xp_tokenizer *t, const char *text, size_t len, int allow_special,
                        int32_t **ids, size_t *n);

/* The bytes of one id as the model sees them: raw bytes for a BPE token (possibly part of a
 * UTF-8 character), the content of an added token; NULL for an id without a token. */
const char *xp_tokenizer_token_bytes(const xp_tokenizer *t, int32_t id, size_t *len);

/* Decodes ids into a malloc'd NUL-terminated string (its byte length in *len if len != NULL).
 * Ids without a token (a model's padding rows, negative ids) decode to nothing, as in the
 * reference. NULL only when out of memory. */
char *xp_tokenizer_decode(const xp_tokenizer *t, const int32_t *ids, size_t n, size_t *len);

/* Streaming decoder: feed ids one at a time and get back only whole UTF-8 characters, so text
 * sent on as it is generated never carries half a character. The concatenation of every push and
 * the final flush equals xp_tokenizer_decode() of the whole sequence. */
typedef struct {
    const xp_tokenizer *tok;
    /* WHATWG UTF-8 decoder state: code point so far, bytes still needed, bounds of the next
     * continuation byte. */
    uint32_t cp;
    int need;
    uint8_t lower, upper;
    char *buf;
    size_t cap;
} xp_detok;

void xp_detok_init(xp_detok *d, const xp_tokenizer *t);
/* Text completed by this id (len may be 0); valid until the next call. NULL only when out of
 * memory. */
const char *xp_detok_push(xp_detok *d, int32_t id, size_t *len);
/* Text left at the end of the sequence (U+FFFD for a truncated character); resets the state. */
const char *xp_detok_flush(xp_detok *d, size_t *len);
void xp_detok_free(xp_detok *d);

#endif
