/* Chat prompts in Qwen3's ChatML, as its chat template renders them:
 *   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
 * Earlier assistant turns lose their <think>...</think> reasoning, the assistant turn after the
 * last user query keeps it, and enable_thinking = 0 opens the reply with an empty think block. */
#ifndef XP_CHAT_H
#define XP_CHAT_H

#include "xprec.h" /* xp_chat_msg */

#include <stddef.h>

/* The prompt as a malloc'd string, to encode with special tokens allowed; NULL + error for an
 * unknown role (the template would silently drop the message). */
char *xp_chat_build(const xp_chat_msg *msgs, size_t n, int add_generation_prompt,
                    int enable_thinking);

#endif
