/* Helpers shared by the cmocka unit tests: scratch paths, files, a seeded RNG, error checks. */
#ifndef XP_TESTUTIL_H
#define XP_TESTUTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <string.h>

#include "util/xp_error.h"

/* Scratch directory: $XPREC_TEST_TMP, else a mkdtemp directory under /tmp removed at exit. */
const char *tu_tmpdir(void);
/* "scratch/name" into buf (which holds at least 4096 bytes). */
char *tu_path(char *buf, const char *name);
/* "dir/name" into buf (at least 4096 bytes). */
char *tu_join(char *buf, const char *dir, const char *name);
/* A fresh empty directory scratch/name, path into buf. */
char *tu_fresh_dir(char *buf, const char *name);

int tu_write_file(const char *path, const void *data, size_t n);
int tu_file_exists(const char *path);
/* Reads a whole file (malloc'd, NUL-terminated); *n gets its size. */
char *tu_read_file(const char *path, size_t *n);
/* Number of entries in dir whose names end with suffix. */
int tu_count_suffix(const char *dir, const char *suffix);

/* A hand-built safetensors file: 8-byte little-endian hlen, then header_bytes bytes of header,
 * then the data. hlen need not match header_bytes, so broken length fields can be written. */
int tu_write_st_raw(const char *path, uint64_t hlen, const void *header, size_t header_bytes,
                    const void *data, size_t ndata);
/* The ordinary case: hlen = strlen(header). */
int tu_write_st(const char *path, const char *header, const void *data, size_t ndata);

/* splitmix64: small, seeded, the same on every machine. */
typedef struct {
    uint64_t s;
} tu_rng;
void tu_rng_seed(tu_rng *r, uint64_t seed);
uint64_t tu_rng_u64(tu_rng *r);
/* Uniform in [0, 1). */
double tu_rng_uniform(tu_rng *r);
/* Standard normal (Box-Muller). */
double tu_rng_normal(tu_rng *r);

/* Fails the test unless xp_last_error() contains sub. */
#define assert_error_contains(sub)                                                                 \
    do {                                                                                           \
        const char *e_ = xp_last_error();                                                          \
        if (!strstr(e_, (sub))) fail_msg("error \"%s\" does not mention \"%s\"", e_, (sub));       \
    } while (0)

#endif
