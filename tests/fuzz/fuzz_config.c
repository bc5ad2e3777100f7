/* libFuzzer target: arbitrary text as config.json and as adapter ignore patterns. */
#include "format/qwen3_config.h"
#include "util/xp_error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    xp_qwen3_config c;
    xp_quant_config q;
    if (xp_qwen3_config_parse(text, &c, &q) == 0) {
        if (c.num_attention_heads % c.num_key_value_heads) abort();
        xp_quant_ignored(&q, "model.layers.0.mlp.down_proj");
        char *again = xp_config_with_quant(text, &q);
        xp_qwen3_config c2;
        xp_quant_config q2;
        /* what we write back must parse to the same model */
        if (!again || xp_qwen3_config_parse(again, &c2, &q2) < 0 || memcmp(&c, &c2, sizeof c))
            abort();
        xp_quant_config_free(&q2);
        free(again);
        xp_quant_config_free(&q);
    } else if (!*xp_last_error()) {
        abort();
    }
    free(text);
    return 0;
}
