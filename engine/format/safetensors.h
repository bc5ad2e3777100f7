/* safetensors: mmap reader with full validation, sharded directories, and a streaming writer.
 *
 * Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Every tensor
 * entry names a dtype, a shape and [begin, end) offsets into the data buffer. */
#ifndef XP_SAFETENSORS_H
#define XP_SAFETENSORS_H

#include "format/dtype.h"

#include <stddef.h>
#include <stdint.h>

#define XP_MAX_DIMS 8
/* A header larger than this is refused before anything is allocated for it. */
#define XP_ST_MAX_HEADER (100u << 20)

typedef struct {
    const char *name;
    xp_dtype dtype;
    int ndim;
    int64_t shape[XP_MAX_DIMS];
    uint64_t nelem;
    /* Points into the read-only mapping; foreign files need not align it, so read through
     * memcpy or the xp_convert_* helpers. */
    const void *data;
    size_t nbytes;
    const char *file; /* path of the file holding the tensor */
} xp_tensor;

/* ---- one file ---- */
typedef struct xp_st_file xp_st_file;

int xp_st_open(const char *path, xp_st_file **out);
void xp_st_close(xp_st_file *f);
const char *xp_st_path(const xp_st_file *f);
size_t xp_st_count(const xp_st_file *f);
/* Tensors in data-offset order. */
const xp_tensor *xp_st_tensor(const xp_st_file *f, size_t i);
const xp_tensor *xp_st_find(const xp_st_file *f, const char *name);
/* A string from __metadata__, or NULL. */
const char *xp_st_metadata(const xp_st_file *f, const char *key);

/* ---- a directory: NAME.safetensors or NAME.safetensors.index.json with its shards ---- */
typedef struct xp_st_set xp_st_set;

/* stem is "model" for checkpoints, "adapter_model" for PEFT adapters. */
int xp_st_set_open(const char *dir, const char *stem, xp_st_set **out);
/* A single .safetensors file as a set of one. */
int xp_st_set_open_file(const char *path, xp_st_set **out);
void xp_st_set_close(xp_st_set *s);
size_t xp_st_set_count(const xp_st_set *s);
/* Tensors sorted by name. */
const xp_tensor *xp_st_set_tensor(const xp_st_set *s, size_t i);
const xp_tensor *xp_st_set_find(const xp_st_set *s, const char *name);
size_t xp_st_set_nfiles(const xp_st_set *s);
const xp_st_file *xp_st_set_file(const xp_st_set *s, size_t i);

/* Tells the kernel a streaming pass is done with t's pages, so reading a whole model tensor by
 * tensor keeps the resident set at a few tensors. Later reads fault the pages back in. */
void xp_tensor_release(const xp_tensor *t);

/* Bytes of a tensor of this dtype and shape; -1 (and an error) on overflow or a negative dim. */
int xp_tensor_bytes(xp_dtype t, int ndim, const int64_t *shape, uint64_t *nelem, size_t *nbytes);

/* ---- writer ----
 * Declare every tensor first (the header comes before the data), then open, then write the
 * tensors in declaration order, then finish. Files are written under a temporary name and renamed
 * by finish, so an interrupted run never leaves a half file under the real name. */
typedef struct xp_st_writer xp_st_writer;

xp_st_writer *xp_stw_new(void);
int xp_stw_declare(xp_st_writer *w, const char *name, xp_dtype dtype, int ndim,
                   const int64_t *shape);
int xp_stw_metadata(xp_st_writer *w, const char *key, const char *value);
/* max_shard_bytes 0: one file DIR/STEM.safetensors; otherwise shards of at most that many data
 * bytes (a larger tensor gets a shard of its own) and DIR/STEM.safetensors.index.json. */
int xp_stw_open(xp_st_writer *w, const char *dir, const char *stem, size_t max_shard_bytes);
/* The next declared tensor; nbytes must be its full size. */
int xp_stw_write(xp_st_writer *w, const char *name, const void *data, size_t nbytes);
int xp_stw_finish(xp_st_writer *w);
/* Frees; removes temporary files if finish was not reached. */
void xp_stw_free(xp_st_writer *w);

#endif
