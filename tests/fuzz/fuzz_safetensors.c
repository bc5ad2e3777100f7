/* libFuzzer target: arbitrary bytes as a .safetensors file. Opening must either fail with a
 * message or give tensors whose byte ranges lie inside the file; never crash or leak. */
#include "format/safetensors.h"
#include "util/xp_error.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[64];
    if (!*path) snprintf(path, sizeof path, "/tmp/xprec-fuzz-%d.safetensors", (int)getpid());
    FILE *fp = fopen(path, "wb");
    if (!fp) return 0;
    fwrite(data, 1, size, fp);
    fclose(fp);
    xp_st_file *f;
    if (xp_st_open(path, &f) < 0) {
        if (!*xp_last_error()) abort(); /* every refusal says why */
        return 0;
    }
    size_t total = 0;
    for (size_t i = 0; i < xp_st_count(f); i++) {
        const xp_tensor *t = xp_st_tensor(f, i);
        volatile uint8_t sink = 0;
        /* touch the first and last byte: out-of-range views would fault under ASan */
        if (t->nbytes) sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
        (void)sink;
        total += t->nbytes;
        if (xp_st_find(f, t->name) != t) abort();
    }
    if (total > size) abort();
    xp_st_close(f);
    return 0;
}
