#include "format/safetensors.h"
#include "util/fsutil.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct xp_st_file {
    char *path;
    unsigned char *map;
    size_t map_size;
    xp_tensor *tensors; /* by data offset */
    xp_tensor **sorted; /* by name */
    size_t n;
    char **meta; /* key, value, key, value, ... */
    size_t nmeta;
};

int xp_tensor_bytes(xp_dtype t, int ndim, const int64_t *shape, uint64_t *nelem, size_t *nbytes)
{
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return xp_fail("negative dimension %lld", (long long)shape[i]);
        if (shape[i] != 0 && n > UINT64_MAX / (uint64_t)shape[i])
            return xp_fail("shape overflows 64 bits");
        n *= (uint64_t)shape[i];
    }
    uint64_t sz = xp_dtype_size(t);
    if (n > SIZE_MAX / sz) return xp_fail("shape too large for this machine");
    if (nelem) *nelem = n;
    if (nbytes) *nbytes = (size_t)(n * sz);
    return 0;
}

/* A JSON number that is an exact non-negative integer a double holds exactly (below 2^53: far
 * past any file). On failure, an error saying which of those it is not, after what. */
static int xp_json_uint(const cJSON *v, const char *what, uint64_t *out)
{
    if (!cJSON_IsNumber(v)) return xp_fail("%s holds a non-number", what);
    double d = v->valuedouble;
    if (!(d >= 0)) return xp_fail("%s holds a negative value (%g)", what, d);
    if (d > 9007199254740992.0)
        return xp_fail("%s holds %.17g, too large for any tensor (the limit is 2^53)", what, d);
    if (d != floor(d)) return xp_fail("%s holds a non-integer (%g)", what, d);
    *out = (uint64_t)d;
    return 0;
}

void xp_tensor_release(const xp_tensor *t)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t b = ((uintptr_t)t->data + page - 1) & ~(page - 1);
    uintptr_t e = ((uintptr_t)t->data + t->nbytes) & ~(page - 1);
    /* only whole pages inside the tensor: neighbours may still be in use */
    if (e > b) madvise((void *)b, e - b, MADV_DONTNEED);
}

static int xp_cmp_offset(const void *a, const void *b)
{
    const xp_tensor *x = a, *y = b;
    const unsigned char *px = x->data, *py = y->data;
    if (px != py) return px < py ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static int xp_cmp_name_ptr(const void *a, const void *b)
{
    const xp_tensor *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int xp_cmp_name_key(const void *key, const void *elem)
{
    const xp_tensor *const *t = elem;
    return strcmp((const char *)key, (*t)->name);
}

/* Parses one tensor entry; offsets are relative to the data buffer of data_size bytes. */
static int xp_st_parse_entry(const cJSON *e, const unsigned char *data, size_t data_size,
                             xp_tensor *t)
{
    if (!cJSON_IsObject(e)) return xp_fail("entry is not a JSON object");
    const cJSON *dt = NULL, *shape = NULL, *offs = NULL, *k;
    cJSON_ArrayForEach(k, e)
    {
        if (strcmp(k->string, "dtype") == 0 && !dt)
            dt = k;
        else if (strcmp(k->string, "shape") == 0 && !shape)
            shape = k;
        else if (strcmp(k->string, "data_offsets") == 0 && !offs)
            offs = k;
        else
            return xp_fail("unexpected or repeated key \"%s\"", k->string);
    }
    if (!cJSON_IsString(dt)) return xp_fail("missing or non-string \"dtype\"");
    if (xp_dtype_parse(dt->valuestring, &t->dtype) < 0)
        return xp_fail("unknown dtype \"%.40s\"", dt->valuestring);
    if (!cJSON_IsArray(shape)) return xp_fail("missing or non-array \"shape\"");
    int nd = cJSON_GetArraySize(shape);
    if (nd > XP_MAX_DIMS) return xp_fail("%d dimensions (at most %d supported)", nd, XP_MAX_DIMS);
    t->ndim = 0;
    cJSON_ArrayForEach(k, shape)
    {
        uint64_t d;
        if (xp_json_uint(k, "shape", &d) < 0) return -1;
        t->shape[t->ndim++] = (int64_t)d;
    }
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return xp_fail("\"data_offsets\" is not a pair");
    uint64_t b, end;
    if (xp_json_uint(offs->child, "\"data_offsets\"", &b) < 0 ||
        xp_json_uint(offs->child->next, "\"data_offsets\"", &end) < 0)
        return -1;
    if (b > end) return xp_fail("data_offsets [%llu, %llu) run backwards", (unsigned long long)b,
                                (unsigned long long)end);
    if (end > data_size)
        return xp_fail("data_offsets [%llu, %llu) run past the data buffer (%zu bytes)",
                       (unsigned long long)b, (unsigned long long)end, data_size);
    if (xp_tensor_bytes(t->dtype, t->ndim, t->shape, &t->nelem, &t->nbytes) < 0) return -1;
    if (t->nbytes != end - b)
        return xp_fail("shape and dtype %s need %zu bytes but data_offsets give %llu",
                       xp_dtype_name(t->dtype), t->nbytes, (unsigned long long)(end - b));
    t->data = data + b;
    return 0;
}

static int xp_st_parse_header(xp_st_file *f, const char *hdr, size_t hlen)
{
    size_t i = 0;
    while (i < hlen && (hdr[i] == ' ' || hdr[i] == '\n' || hdr[i] == '\t' || hdr[i] == '\r')) i++;
    if (i == hlen || hdr[i] != '{') return xp_fail("header is not a JSON object");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, hlen, &end, 0);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return xp_fail("header is not valid JSON (near byte %zu)",
                       (size_t)((end ? end : cJSON_GetErrorPtr()) - hdr));
    }
    for (const char *p = end; p < hdr + hlen; p++) {
        /* the writer pads with spaces; anything else after the object is garbage */
        if (*p != ' ' && *p != '\0' && *p != '\n') {
            cJSON_Delete(root);
            return xp_fail("trailing bytes after the header's JSON object");
        }
    }
    const unsigned char *data = f->map + 8 + hlen;
    size_t data_size = f->map_size - 8 - hlen;
    size_t cap = (size_t)cJSON_GetArraySize(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) goto oom;
    const cJSON *e;
    int have_meta = 0;
    cJSON_ArrayForEach(e, root)
    {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (have_meta++ || !cJSON_IsObject(e)) {
                cJSON_Delete(root);
                return xp_fail("__metadata__ is repeated or not an object");
            }
            size_t m = (size_t)cJSON_GetArraySize(e);
            f->meta = calloc(2 * m + 1, sizeof *f->meta);
            if (!f->meta) goto oom;
            const cJSON *kv;
            cJSON_ArrayForEach(kv, e)
            {
                if (!cJSON_IsString(kv)) {
                    /* format the message before freeing the tree that holds kv->string */
                    xp_fail("__metadata__ value \"%.60s\" is not a string", kv->string);
                    cJSON_Delete(root);
                    return -1;
                }
                f->meta[2 * f->nmeta] = strdup(kv->string);
                f->meta[2 * f->nmeta + 1] = strdup(kv->valuestring);
                f->nmeta++;
                if (!f->meta[2 * f->nmeta - 2] || !f->meta[2 * f->nmeta - 1]) goto oom;
            }
            continue;
        }
        xp_tensor *t = &f->tensors[f->n];
        if (xp_st_parse_entry(e, data, data_size, t) < 0) {
            xp_fail_ctx("tensor \"%.200s\"", e->string);
            cJSON_Delete(root);
            return -1;
        }
        t->name = strdup(e->string);
        if (!t->name) goto oom;
        t->file = f->path;
        f->n++;
    }
    cJSON_Delete(root);

    /* contiguous and non-overlapping: sorted by offset, each starts where the previous ended */
    qsort(f->tensors, f->n, sizeof *f->tensors, xp_cmp_offset);
    const unsigned char *pos = data;
    for (size_t j = 0; j < f->n; j++) {
        const xp_tensor *t = &f->tensors[j];
        if ((const unsigned char *)t->data != pos)
            return xp_fail("tensor \"%.200s\" at data offset %zu %s", t->name,
                           (size_t)((const unsigned char *)t->data - data),
                           (const unsigned char *)t->data < pos ? "overlaps the tensor before it"
                                                                : "leaves a gap before it");
        pos += t->nbytes;
    }
    if (pos != data + data_size)
        return xp_fail("%zu bytes after the last tensor belong to no tensor",
                       (size_t)(data + data_size - pos));

    f->sorted = malloc((f->n ? f->n : 1) * sizeof *f->sorted);
    if (!f->sorted) return xp_fail("out of memory");
    for (size_t j = 0; j < f->n; j++) f->sorted[j] = &f->tensors[j];
    qsort(f->sorted, f->n, sizeof *f->sorted, xp_cmp_name_ptr);
    for (size_t j = 1; j < f->n; j++)
        if (strcmp(f->sorted[j - 1]->name, f->sorted[j]->name) == 0)
            return xp_fail("tensor \"%.200s\" is listed twice", f->sorted[j]->name);
    return 0;
oom:
    cJSON_Delete(root);
    return xp_fail("out of memory");
}

int xp_st_open(const char *path, xp_st_file **out)
{
    *out = NULL;
    xp_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return xp_fail("%s: out of memory", path);
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        xp_fail("%s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        xp_fail("%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size < 8) {
        close(fd);
        xp_fail("%s: %lld bytes is too short for a safetensors header", path,
                (long long)st.st_size);
        goto fail;
    }
    f->map_size = (size_t)st.st_size;
    f->map = mmap(NULL, f->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        xp_fail("%s: mmap: %s", path, strerror(errno));
        goto fail;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | f->map[i];
    if (hlen > XP_ST_MAX_HEADER) {
        xp_fail("%s: header length %llu exceeds the %u-byte limit (not a safetensors file?)", path,
                (unsigned long long)hlen, XP_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > f->map_size - 8) {
        xp_fail("%s: header length %llu runs past the end of the %zu-byte file (truncated?)",
                path, (unsigned long long)hlen, f->map_size);
        goto fail;
    }
    if (xp_st_parse_header(f, (const char *)f->map + 8, (size_t)hlen) < 0) {
        xp_fail_ctx("%s", path);
        goto fail;
    }
    *out = f;
    return 0;
fail:
    xp_st_close(f);
    return -1;
}

void xp_st_close(xp_st_file *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->map_size);
    for (size_t i = 0; i < f->n; i++) free((char *)f->tensors[i].name);
    for (size_t i = 0; i < 2 * f->nmeta; i++) free(f->meta[i]);
    free(f->meta);
    free(f->tensors);
    free(f->sorted);
    free(f->path);
    free(f);
}

const char *xp_st_path(const xp_st_file *f)
{
    return f->path;
}

size_t xp_st_count(const xp_st_file *f)
{
    return f->n;
}

const xp_tensor *xp_st_tensor(const xp_st_file *f, size_t i)
{
    return i < f->n ? &f->tensors[i] : NULL;
}

const xp_tensor *xp_st_find(const xp_st_file *f, const char *name)
{
    xp_tensor **t = bsearch(name, f->sorted, f->n, sizeof *f->sorted, xp_cmp_name_key);
    return t ? *t : NULL;
}

const char *xp_st_metadata(const xp_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
    return NULL;
}

/* ---------------------------------------------------------------- sets */

struct xp_st_set {
    xp_st_file **files;
    size_t nfiles;
    const xp_tensor **sorted;
    size_t n;
};

static int xp_st_set_index(xp_st_set *s)
{
    s->sorted = malloc((s->n ? s->n : 1) * sizeof *s->sorted);
    if (!s->sorted) return xp_fail("out of memory");
    size_t k = 0;
    for (size_t i = 0; i < s->nfiles; i++)
        for (size_t j = 0; j < xp_st_count(s->files[i]); j++)
            s->sorted[k++] = xp_st_tensor(s->files[i], j);
    qsort(s->sorted, s->n, sizeof *s->sorted, xp_cmp_name_ptr);
    for (size_t i = 1; i < s->n; i++)
        if (strcmp(s->sorted[i - 1]->name, s->sorted[i]->name) == 0)
            return xp_fail("tensor \"%.200s\" appears in both %s and %s", s->sorted[i]->name,
                           s->sorted[i - 1]->file, s->sorted[i]->file);
    return 0;
}

int xp_st_set_open_file(const char *path, xp_st_set **out)
{
    *out = NULL;
    xp_st_set *s = calloc(1, sizeof *s);
    if (!s || !(s->files = calloc(1, sizeof *s->files))) {
        free(s);
        return xp_fail("out of memory");
    }
    if (xp_st_open(path, &s->files[0]) < 0) {
        xp_st_set_close(s);
        return -1;
    }
    s->nfiles = 1;
    s->n = xp_st_count(s->files[0]);
    if (xp_st_set_index(s) < 0) {
        xp_st_set_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

/* Opens the shards an index.json names, checking that index and shards agree. */
static int xp_st_set_open_index(xp_st_set *s, const char *dir, const char *ipath)
{
    char *text = xp_read_text_file(ipath, 64u << 20);
    if (!text) return -1;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(root);
        return xp_fail("%s: not JSON with a \"weight_map\" object", ipath);
    }
    size_t cap = (size_t)cJSON_GetArraySize(wm);
    s->files = calloc(cap ? cap : 1, sizeof *s->files);
    if (!s->files) goto oom;
    size_t listed = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, wm)
    {
        const char *fn = cJSON_GetStringValue(e);
        if (!fn || !*fn || strchr(fn, '/') || strcmp(fn, "..") == 0 || strcmp(fn, ".") == 0) {
            xp_fail("%s: tensor \"%.200s\" maps to an invalid file name", ipath, e->string);
            goto fail;
        }
        xp_st_file *f = NULL;
        for (size_t i = 0; i < s->nfiles && !f; i++) {
            const char *p = strrchr(xp_st_path(s->files[i]), '/');
            if (strcmp(p + 1, fn) == 0) f = s->files[i];
        }
        if (!f) {
            char *path = xp_path_join(dir, fn);
            if (!path) goto oom;
            int rc = xp_st_open(path, &f);
            free(path);
            if (rc < 0) goto fail;
            s->files[s->nfiles++] = f;
        }
        if (!xp_st_find(f, e->string)) {
            xp_fail("%s lists tensor \"%.200s\" in %s, which does not hold it", ipath, e->string,
                    fn);
            goto fail;
        }
        listed++;
    }
    for (size_t i = 0; i < s->nfiles; i++) s->n += xp_st_count(s->files[i]);
    if (s->n != listed) {
        /* the index is the truth a loader follows; an unlisted tensor would be silently lost */
        for (size_t i = 0; i < s->nfiles; i++)
            for (size_t j = 0; j < xp_st_count(s->files[i]); j++) {
                const xp_tensor *t = xp_st_tensor(s->files[i], j);
                const cJSON *m = cJSON_GetObjectItemCaseSensitive(wm, t->name);
                const char *p = strrchr(t->file, '/') + 1;
                if (!m || strcmp(cJSON_GetStringValue(m), p) != 0) {
                    xp_fail("%s holds tensor \"%.200s\" that %s does not list for it", t->file,
                            t->name, ipath);
                    goto fail;
                }
            }
        xp_fail("%s: the index lists %zu tensors but the shards hold %zu", ipath, listed, s->n);
        goto fail;
    }
    cJSON_Delete(root);
    return 0;
oom:
    xp_fail("out of memory");
fail:
    cJSON_Delete(root);
    return -1;
}

int xp_st_set_open(const char *dir, const char *stem, xp_st_set **out)
{
    *out = NULL;
    char name[256];
    snprintf(name, sizeof name, "%s.safetensors", stem);
    char *single = xp_path_join(dir, name);
    if (!single) return xp_fail("out of memory");
    if (access(single, F_OK) == 0) {
        int rc = xp_st_set_open_file(single, out);
        free(single);
        return rc;
    }
    free(single);
    snprintf(name, sizeof name, "%s.safetensors.index.json", stem);
    char *ipath = xp_path_join(dir, name);
    if (!ipath) return xp_fail("out of memory");
    if (access(ipath, F_OK) != 0) {
        xp_fail("%s: neither %s.safetensors nor %s found", dir, stem, name);
        free(ipath);
        return -1;
    }
    xp_st_set *s = calloc(1, sizeof *s);
    if (!s) {
        free(ipath);
        return xp_fail("out of memory");
    }
    int rc = xp_st_set_open_index(s, dir, ipath);
    free(ipath);
    if (rc < 0 || xp_st_set_index(s) < 0) {
        xp_st_set_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

void xp_st_set_close(xp_st_set *s)
{
    if (!s) return;
    for (size_t i = 0; i < s->nfiles; i++) xp_st_close(s->files[i]);
    free(s->files);
    free(s->sorted);
    free(s);
}

size_t xp_st_set_count(const xp_st_set *s)
{
    return s->n;
}

const xp_tensor *xp_st_set_tensor(const xp_st_set *s, size_t i)
{
    return i < s->n ? s->sorted[i] : NULL;
}

const xp_tensor *xp_st_set_find(const xp_st_set *s, const char *name)
{
    const xp_tensor **t = bsearch(name, s->sorted, s->n, sizeof *s->sorted, xp_cmp_name_key);
    return t ? *t : NULL;
}

size_t xp_st_set_nfiles(const xp_st_set *s)
{
    return s->nfiles;
}

const xp_st_file *xp_st_set_file(const xp_st_set *s, size_t i)
{
    return i < s->nfiles ? s->files[i] : NULL;
}
