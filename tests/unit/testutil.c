#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char tu_dir[4096];
static int tu_own_dir; /* made by mkdtemp, so ours to remove */

static int tu_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void tu_rm_tree(const char *dir)
{
    nftw(dir, tu_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void tu_cleanup(void)
{
    if (tu_own_dir) tu_rm_tree(tu_dir);
}

const char *tu_tmpdir(void)
{
    if (tu_dir[0]) return tu_dir;
    const char *env = getenv("XPREC_TEST_TMP");
    if (env && *env) {
        snprintf(tu_dir, sizeof tu_dir, "%s", env);
    } else {
        snprintf(tu_dir, sizeof tu_dir, "/tmp/xprec-unit-XXXXXX");
        if (!mkdtemp(tu_dir)) {
            fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
            abort();
        }
        tu_own_dir = 1;
        atexit(tu_cleanup);
    }
    return tu_dir;
}

char *tu_path(char *buf, const char *name)
{
    snprintf(buf, 4096, "%s/%s", tu_tmpdir(), name);
    return buf;
}

char *tu_join(char *buf, const char *dir, const char *name)
{
    snprintf(buf, 4096, "%s/%s", dir, name);
    return buf;
}

char *tu_fresh_dir(char *buf, const char *name)
{
    tu_path(buf, name);
    tu_rm_tree(buf);
    if (mkdir(buf, 0700) < 0) {
        fprintf(stderr, "mkdir %s: %s\n", buf, strerror(errno));
        abort();
    }
    return buf;
}

int tu_write_file(const char *path, const void *data, size_t n)
{
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    int ok = (n == 0 || fwrite(data, 1, n, fp) == n);
    ok = (fclose(fp) == 0) && ok;
    return ok ? 0 : -1;
}

int tu_file_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

char *tu_read_file(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len, fp)) > 0) {
        len += got;
        if (len == cap) {
            char *b = realloc(buf, 2 * cap + 1);
            if (!b) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = b;
            cap *= 2;
        }
    }
    fclose(fp);
    if (buf) buf[len] = '\0';
    if (n) *n = len;
    return buf;
}

int tu_count_suffix(const char *dir, const char *suffix)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int count = 0;
    size_t ls = strlen(suffix);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l >= ls && strcmp(e->d_name + l - ls, suffix) == 0) count++;
    }
    closedir(d);
    return count;
}

int tu_write_st_raw(const char *path, uint64_t hlen, const void *header, size_t header_bytes,
                    const void *data, size_t ndata)
{
    size_t total = 8 + header_bytes + ndata;
    unsigned char *buf = malloc(total);
    if (!buf) return -1;
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(hlen >> (8 * i));
    if (header_bytes) memcpy(buf + 8, header, header_bytes);
    if (ndata) memcpy(buf + 8 + header_bytes, data, ndata);
    int rc = tu_write_file(path, buf, total);
    free(buf);
    return rc;
}

int tu_write_st(const char *path, const char *header, const void *data, size_t ndata)
{
    size_t hl = strlen(header);
    return tu_write_st_raw(path, hl, header, hl, data, ndata);
}

void tu_rng_seed(tu_rng *r, uint64_t seed)
{
    r->s = seed;
}

uint64_t tu_rng_u64(tu_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double tu_rng_uniform(tu_rng *r)
{
    return (double)(tu_rng_u64(r) >> 11) * 0x1.0p-53;
}

double tu_rng_normal(tu_rng *r)
{
    double u1 = 1.0 - tu_rng_uniform(r); /* (0, 1]: log stays finite */
    double u2 = tu_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}
