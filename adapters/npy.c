#include "npy.h"
#include "util/xp_error.h"

#include <errno.h>
#include <string.h>

FILE *xp_npy_create(const char *path, int64_t rows, int64_t cols)
{
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        xp_fail("%s: %s", path, strerror(errno));
        return NULL;
    }
    char dict[128];
    int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                     (long long)rows, (long long)cols);
    /* magic(6) + version(2) + length(2) + dict + padding + '\n' is a multiple of 64 */
    int total = 10 + n + 1, pad = (64 - total % 64) % 64;
    unsigned hlen = (unsigned)(n + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    int ok = fwrite(pre, 1, 10, fp) == 10 && fwrite(dict, 1, (size_t)n, fp) == (size_t)n;
    for (int i = 0; ok && i < pad; i++) ok = fputc(' ', fp) != EOF;
    ok = ok && fputc('\n', fp) != EOF;
    if (!ok) {
        fclose(fp);
        xp_fail("%s: write failed", path);
        return NULL;
    }
    return fp;
}

int xp_npy_append(FILE *fp, const float *data, size_t n)
{
    /* x86 is little-endian, as '<f4' says */
    if (fwrite(data, sizeof *data, n, fp) != n) return xp_fail("write failed: %s", strerror(errno));
    return 0;
}
