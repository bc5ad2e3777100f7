#include "util/fsutil.h"
#include "util/xp_error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *xp_read_text_file(const char *path, size_t max_bytes)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        xp_fail("%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(max_bytes + 1);
    size_t n = buf ? fread(buf, 1, max_bytes + 1, fp) : 0;
    int err = ferror(fp);
    fclose(fp);
    if (!buf || err || n > max_bytes) {
        free(buf);
        xp_fail("%s: %s", path, !buf ? "out of memory" : err ? "read error" : "file too large");
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

char *xp_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}
