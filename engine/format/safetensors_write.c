#include "format/safetensors.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    char *name;
    xp_dtype dtype;
    int ndim;
    int64_t shape[XP_MAX_DIMS];
    size_t nbytes;
    int shard;
} xp_stw_decl;

struct xp_st_writer {
    xp_stw_decl *d;
    size_t n, cap;
    cJSON *meta;
    int nshards;
    char **tmp, **final; /* per shard, plus the index as the last entry when sharded */
    char *index_tmp, *index_final;
    FILE *fp;
    int cur;     /* shard open in fp, -1 before the first */
    size_t next; /* next declaration to write */
    int opened, finished;
};

xp_st_writer *xp_stw_new(void)
{
    xp_st_writer *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->meta = cJSON_CreateObject();
    w->cur = -1;
    if (!w->meta || !cJSON_AddStringToObject(w->meta, "format", "pt")) {
        cJSON_Delete(w->meta);
        free(w);
        return NULL;
    }
    return w;
}

int xp_stw_declare(xp_st_writer *w, const char *name, xp_dtype dtype, int ndim,
                   const int64_t *shape)
{
    if (w->opened) return xp_fail("%s: declared after the writer was opened", name);
    if (ndim < 0 || ndim > XP_MAX_DIMS) return xp_fail("%s: %d dimensions", name, ndim);
    if (strcmp(name, "__metadata__") == 0 || !*name) return xp_fail("invalid tensor name");
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->d[i].name, name) == 0) return xp_fail("%s: declared twice", name);
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        xp_stw_decl *d = realloc(w->d, cap * sizeof *d);
        if (!d) return xp_fail("out of memory");
        w->d = d;
        w->cap = cap;
    }
    xp_stw_decl *e = &w->d[w->n];
    memset(e, 0, sizeof *e);
    e->dtype = dtype;
    e->ndim = ndim;
    /* a 0-d tensor may come with a NULL shape, and memcpy from NULL is undefined even for 0 */
    if (ndim > 0) memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    if (xp_tensor_bytes(dtype, ndim, shape, NULL, &e->nbytes) < 0)
        return xp_fail_ctx("%s", name);
    if (!(e->name = strdup(name))) return xp_fail("out of memory");
    w->n++;
    return 0;
}

int xp_stw_metadata(xp_st_writer *w, const char *key, const char *value)
{
    if (w->opened) return xp_fail("metadata set after the writer was opened");
    cJSON_DeleteItemFromObjectCaseSensitive(w->meta, key);
    if (!cJSON_AddStringToObject(w->meta, key, value)) return xp_fail("out of memory");
    return 0;
}

static char *xp_stw_path(const char *dir, const char *file, const char *suffix)
{
    size_t len = strlen(dir) + strlen(file) + strlen(suffix) + 2;
    char *p = malloc(len);
    if (p) snprintf(p, len, "%s/%s%s", dir, file, suffix);
    return p;
}

int xp_stw_open(xp_st_writer *w, const char *dir, const char *stem, size_t max_shard_bytes)
{
    if (w->opened) return xp_fail("writer opened twice");
    w->opened = 1;
    size_t used = 0;
    w->nshards = 1;
    for (size_t i = 0; i < w->n; i++) {
        if (max_shard_bytes && used > 0 && used + w->d[i].nbytes > max_shard_bytes) {
            w->nshards++;
            used = 0;
        }
        w->d[i].shard = w->nshards - 1;
        used += w->d[i].nbytes;
    }
    w->tmp = calloc((size_t)w->nshards, sizeof *w->tmp);
    w->final = calloc((size_t)w->nshards, sizeof *w->final);
    if (!w->tmp || !w->final) return xp_fail("out of memory");
    char file[512];
    for (int s = 0; s < w->nshards; s++) {
        if (w->nshards == 1)
            snprintf(file, sizeof file, "%s.safetensors", stem);
        else
            snprintf(file, sizeof file, "%s-%05d-of-%05d.safetensors", stem, s + 1, w->nshards);
        w->final[s] = xp_stw_path(dir, file, "");
        w->tmp[s] = xp_stw_path(dir, file, ".tmp");
        if (!w->final[s] || !w->tmp[s]) return xp_fail("out of memory");
    }
    snprintf(file, sizeof file, "%s.safetensors.index.json", stem);
    w->index_final = xp_stw_path(dir, file, "");
    w->index_tmp = xp_stw_path(dir, file, ".tmp");
    if (!w->index_final || !w->index_tmp) return xp_fail("out of memory");
    return 0;
}

/* Writes shard s's header: entries in declaration order, padded with spaces so the data buffer
 * starts 8-byte aligned. */
static int xp_stw_begin_shard(xp_st_writer *w, int s)
{
    cJSON *h = cJSON_CreateObject();
    if (!h || !cJSON_AddItemReferenceToObject(h, "__metadata__", w->meta)) goto oom;
    size_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (w->d[i].shard != s) continue;
        cJSON *e = cJSON_AddObjectToObject(h, w->d[i].name);
        if (!e || !cJSON_AddStringToObject(e, "dtype", xp_dtype_name(w->d[i].dtype))) goto oom;
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        if (!sh || !of) goto oom;
        for (int k = 0; k < w->d[i].ndim; k++)
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)w->d[i].shape[k]));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        off += w->d[i].nbytes;
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
    }
    char *js = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!js) return xp_fail("out of memory");
    size_t len = strlen(js), padded = (len + 7) & ~(size_t)7;
    w->fp = fopen(w->tmp[s], "wb");
    if (!w->fp) {
        free(js);
        return xp_fail("%s: %s", w->tmp[s], strerror(errno));
    }
    setvbuf(w->fp, NULL, _IOFBF, 1 << 20);
    unsigned char lenb[8];
    for (int k = 0; k < 8; k++) lenb[k] = (unsigned char)((uint64_t)padded >> (8 * k));
    int ok = fwrite(lenb, 1, 8, w->fp) == 8 && fwrite(js, 1, len, w->fp) == len;
    for (size_t k = len; ok && k < padded; k++) ok = fputc(' ', w->fp) != EOF;
    free(js);
    w->cur = s;
    if (!ok) return xp_fail("%s: write failed: %s", w->tmp[s], strerror(errno));
    return 0;
oom:
    cJSON_Delete(h);
    return xp_fail("out of memory");
}

static int xp_stw_close_shard(xp_st_writer *w)
{
    if (!w->fp) return 0;
    int ok = fflush(w->fp) == 0 && fsync(fileno(w->fp)) == 0;
    ok = (fclose(w->fp) == 0) && ok;
    w->fp = NULL;
    if (!ok) return xp_fail("%s: write failed: %s", w->tmp[w->cur], strerror(errno));
    return 0;
}

int xp_stw_write(xp_st_writer *w, const char *name, const void *data, size_t nbytes)
{
    if (!w->opened || w->finished) return xp_fail("%s: writer is not open", name);
    if (w->next >= w->n) return xp_fail("%s: more tensors written than declared", name);
    const xp_stw_decl *d = &w->d[w->next];
    if (strcmp(d->name, name) != 0)
        return xp_fail("%s: written out of order (expected %s)", name, d->name);
    if (nbytes != d->nbytes)
        return xp_fail("%s: %zu bytes written, %zu declared", name, nbytes, d->nbytes);
    if (d->shard != w->cur) {
        if (xp_stw_close_shard(w) < 0 || xp_stw_begin_shard(w, d->shard) < 0) return -1;
    }
    if (nbytes && fwrite(data, 1, nbytes, w->fp) != nbytes)
        return xp_fail("%s: write failed: %s", w->tmp[w->cur], strerror(errno));
    w->next++;
    return 0;
}

static int xp_stw_write_index(xp_st_writer *w)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON *wm = cJSON_AddObjectToObject(root, "weight_map");
    if (!meta || !wm) goto oom;
    size_t total = 0;
    for (size_t i = 0; i < w->n; i++) {
        total += w->d[i].nbytes;
        const char *base = strrchr(w->final[w->d[i].shard], '/') + 1;
        if (!cJSON_AddStringToObject(wm, w->d[i].name, base)) goto oom;
    }
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    char *js = cJSON_Print(root);
    cJSON_Delete(root);
    if (!js) return xp_fail("out of memory");
    FILE *fp = fopen(w->index_tmp, "wb");
    int ok = fp && fputs(js, fp) >= 0 && fputc('\n', fp) != EOF;
    ok = fp && fclose(fp) == 0 && ok;
    free(js);
    if (!ok) return xp_fail("%s: write failed: %s", w->index_tmp, strerror(errno));
    return 0;
oom:
    cJSON_Delete(root);
    return xp_fail("out of memory");
}

int xp_stw_finish(xp_st_writer *w)
{
    if (!w->opened || w->finished) return xp_fail("writer is not open");
    if (w->next != w->n)
        return xp_fail("only %zu of %zu declared tensors were written (next: %s)", w->next, w->n,
                       w->d[w->next].name);
    if (w->n == 0 && xp_stw_begin_shard(w, 0) < 0) return -1; /* an empty but valid file */
    for (int s = w->cur + 1; s < w->nshards; s++) {
        /* shards of zero-size tensors only */
        if (xp_stw_close_shard(w) < 0 || xp_stw_begin_shard(w, s) < 0) return -1;
    }
    if (xp_stw_close_shard(w) < 0) return -1;
    if (w->nshards > 1 && xp_stw_write_index(w) < 0) return -1;
    for (int s = 0; s < w->nshards; s++)
        if (rename(w->tmp[s], w->final[s]) < 0)
            return xp_fail("%s: rename: %s", w->final[s], strerror(errno));
    if (w->nshards > 1) {
        if (rename(w->index_tmp, w->index_final) < 0)
            return xp_fail("%s: rename: %s", w->index_final, strerror(errno));
    } else {
        /* a stale index from an earlier sharded write would shadow nothing but confuse readers */
        unlink(w->index_final);
    }
    w->finished = 1;
    return 0;
}

void xp_stw_free(xp_st_writer *w)
{
    if (!w) return;
    if (w->fp) fclose(w->fp);
    for (int s = 0; s < w->nshards; s++) {
        if (!w->finished && w->tmp && w->tmp[s]) unlink(w->tmp[s]);
        if (w->tmp) free(w->tmp[s]);
        if (w->final) free(w->final[s]);
    }
    if (!w->finished && w->index_tmp) unlink(w->index_tmp);
    free(w->tmp);
    free(w->final);
    free(w->index_tmp);
    free(w->index_final);
    for (size_t i = 0; i < w->n; i++) free(w->d[i].name);
    free(w->d);
    cJSON_Delete(w->meta);
    free(w);
}
