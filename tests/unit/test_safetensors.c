/* safetensors: our writer read back, hand-built files (single and sharded), and a corpus of
 * malformed files that must each be refused with an error naming the problem. */
#include "testutil.h"

#include "format/safetensors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* JSON written with single quotes (readable in C), turned into real JSON. */
static char *json(const char *sq)
{
    char *s = strdup(sq);
    assert_non_null(s);
    for (char *p = s; *p; p++)
        if (*p == '\'') *p = '"';
    return s;
}

/* Writes a hand-built file scratch/name from a single-quoted header and data. */
static char *hand_file(char *path, const char *name, const char *sq_header, const void *data,
                       size_t n)
{
    char *h = json(sq_header);
    tu_path(path, name);
    assert_int_equal(tu_write_st(path, h, data, n), 0);
    free(h);
    return path;
}

static int dummy_object;
#define NOT_NULL_FILE ((xp_st_file *)(void *)&dummy_object)
#define NOT_NULL_SET ((xp_st_set *)(void *)&dummy_object)

/* Opening path must fail, leave *out NULL and name each of want (NULL-terminated). */
static void expect_open_fails(const char *path, const char *want1, const char *want2)
{
    xp_st_file *f = NOT_NULL_FILE;
    xp_clear_error();
    int rc = xp_st_open(path, &f);
    if (rc == 0) {
        xp_st_close(f);
        fail_msg("%s opened, expected an error mentioning \"%s\"", path, want1);
    }
    assert_int_equal(rc, -1);
    assert_null(f);
    if (want1) assert_error_contains(want1);
    if (want2) assert_error_contains(want2);
    /* the set API over the same file fails the same way */
    xp_st_set *s = NOT_NULL_SET;
    assert_int_equal(xp_st_set_open_file(path, &s), -1);
    assert_null(s);
    if (want1) assert_error_contains(want1);
}

static void expect_set_fails(const char *dir, const char *stem, const char *want1,
                             const char *want2)
{
    xp_st_set *s = NOT_NULL_SET;
    xp_clear_error();
    int rc = xp_st_set_open(dir, stem, &s);
    if (rc == 0) {
        xp_st_set_close(s);
        fail_msg("%s opened, expected an error mentioning \"%s\"", dir, want1);
    }
    assert_int_equal(rc, -1);
    assert_null(s);
    if (want1) assert_error_contains(want1);
    if (want2) assert_error_contains(want2);
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 131 + i * 29 + (i >> 8));
}

/* ------------------------------------------------------------------ writer round trip */

typedef struct {
    const char *name;
    xp_dtype dt;
    int ndim;
    int64_t shape[XP_MAX_DIMS];
} decl;

static const decl round_trip_decls[] = {
    {"model.embed_tokens.weight", XP_BF16, 2, {37, 16}},
    {"model.layers.0.mlp.down_proj.weight", XP_F8_E4M3, 2, {33, 40}},
    {"model.layers.0.mlp.down_proj.weight_scale_inv", XP_F32, 2, {1, 1}},
    {"scalar", XP_F32, 0, {0}},
    {"empty_rows", XP_F32, 2, {0, 4}},
    {"empty_cols", XP_F16, 2, {4, 0}},
    {"half", XP_F16, 3, {2, 3, 5}},
    {"double", XP_F64, 1, {9}},
    {"ids", XP_I64, 1, {11}},
    {"mask", XP_BOOL, 1, {13}},
    {"bytes", XP_U8, 1, {3}},
    {"ints", XP_I32, 8, {1, 2, 1, 2, 1, 2, 1, 3}},
    {"e5m2", XP_F8_E5M2, 1, {7}},
    {"a.last", XP_F32, 2, {8, 8}},
};
#define NDECL (sizeof round_trip_decls / sizeof *round_trip_decls)

static unsigned char *decl_data(size_t i, size_t *n)
{
    const decl *d = &round_trip_decls[i];
    assert_int_equal(xp_tensor_bytes(d->dt, d->ndim, d->shape, NULL, n), 0);
    unsigned char *p = malloc(*n ? *n : 1);
    assert_non_null(p);
    fill(p, *n, (unsigned)i + 1);
    return p;
}

static void write_round_trip(const char *dir, size_t max_shard)
{
    xp_st_writer *w = xp_stw_new();
    assert_non_null(w);
    for (size_t i = 0; i < NDECL; i++) {
        const decl *d = &round_trip_decls[i];
        if (xp_stw_declare(w, d->name, d->dt, d->ndim, d->shape) < 0)
            fail_msg("%s", xp_last_error());
    }
    assert_int_equal(xp_stw_metadata(w, "producer", "xprec unit test"), 0);
    assert_int_equal(xp_stw_metadata(w, "format", "pt"), 0); /* replaces, not duplicates */
    assert_int_equal(xp_stw_open(w, dir, "model", max_shard), 0);
    for (size_t i = 0; i < NDECL; i++) {
        size_t n;
        unsigned char *p = decl_data(i, &n);
        if (xp_stw_write(w, round_trip_decls[i].name, p, n) < 0) fail_msg("%s", xp_last_error());
        free(p);
    }
    if (xp_stw_finish(w) < 0) fail_msg("%s", xp_last_error());
    xp_stw_free(w);
    assert_int_equal(tu_count_suffix(dir, ".tmp"), 0);
}

static void check_round_trip(const xp_st_set *s)
{
    assert_int_equal(xp_st_set_count(s), NDECL);
    for (size_t i = 0; i < NDECL; i++) {
        const decl *d = &round_trip_decls[i];
        const xp_tensor *t = xp_st_set_find(s, d->name);
        if (!t) fail_msg("%s missing", d->name);
        assert_string_equal(t->name, d->name);
        assert_int_equal(t->dtype, d->dt);
        assert_int_equal(t->ndim, d->ndim);
        for (int k = 0; k < d->ndim; k++) assert_int_equal(t->shape[k], d->shape[k]);
        size_t n;
        unsigned char *p = decl_data(i, &n);
        assert_int_equal(t->nbytes, n);
        uint64_t ne = 1;
        for (int k = 0; k < d->ndim; k++) ne *= (uint64_t)d->shape[k];
        assert_int_equal(t->nelem, ne);
        if (n && memcmp(t->data, p, n) != 0) fail_msg("%s: data differs", d->name);
        free(p);
        assert_non_null(t->file);
    }
    /* sorted by name */
    for (size_t i = 1; i < xp_st_set_count(s); i++)
        assert_true(strcmp(xp_st_set_tensor(s, i - 1)->name, xp_st_set_tensor(s, i)->name) < 0);
    assert_null(xp_st_set_tensor(s, NDECL));
    assert_null(xp_st_set_find(s, "nope"));
    for (size_t f = 0; f < xp_st_set_nfiles(s); f++) {
        const xp_st_file *file = xp_st_set_file(s, f);
        assert_string_equal(xp_st_metadata(file, "producer"), "xprec unit test");
        assert_string_equal(xp_st_metadata(file, "format"), "pt");
        assert_null(xp_st_metadata(file, "absent"));
        /* the data buffer starts 8-byte aligned, and the length field says where */
        size_t len;
        unsigned char *raw = (unsigned char *)tu_read_file(xp_st_path(file), &len);
        assert_non_null(raw);
        uint64_t hlen = 0;
        for (int k = 7; k >= 0; k--) hlen = hlen << 8 | raw[k];
        assert_int_equal(hlen % 8, 0);
        /* tensors of a file come in offset order, each after the previous */
        size_t off = 8 + (size_t)hlen;
        for (size_t j = 0; j < xp_st_count(file); j++) {
            const xp_tensor *t = xp_st_tensor(file, j);
            assert_string_equal(t->file, xp_st_path(file));
            assert_int_equal(memcmp(raw + off, t->data, t->nbytes), 0);
            off += t->nbytes;
            assert_ptr_equal(xp_st_find(file, t->name), t);
        }
        assert_int_equal(off, len);
        free(raw);
    }
}

static void test_writer_round_trip_single(void **state)
{
    char dir[4096], p[4096];
    tu_fresh_dir(dir, "rt_single");
    write_round_trip(dir, 0);
    tu_join(p, dir, "model.safetensors");
    assert_true(tu_file_exists(p));
    tu_join(p, dir, "model.safetensors.index.json");
    assert_false(tu_file_exists(p));
    xp_st_set *s = NULL;
    if (xp_st_set_open(dir, "model", &s) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(xp_st_set_nfiles(s), 1);
    check_round_trip(s);
    xp_st_set_close(s);

    /* the one file opened on its own */
    xp_st_file *f = NULL;
    tu_join(p, dir, "model.safetensors");
    assert_int_equal(xp_st_open(p, &f), 0);
    assert_int_equal(xp_st_count(f), NDECL);
    assert_string_equal(xp_st_path(f), p);
    xp_st_close(f);
}

static void test_writer_round_trip_sharded(void **state)
{
    char dir[4096], p[4096];
    tu_fresh_dir(dir, "rt_sharded");
    write_round_trip(dir, 600);
    tu_join(p, dir, "model.safetensors");
    assert_false(tu_file_exists(p));
    int nshards = tu_count_suffix(dir, ".safetensors");
    assert_true(nshards >= 3);
    xp_st_set *s = NULL;
    if (xp_st_set_open(dir, "model", &s) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(xp_st_set_nfiles(s), nshards);
    check_round_trip(s);
    /* shard names follow the Hugging Face pattern and each holds at most 600 data bytes unless
     * one tensor alone is larger */
    for (size_t i = 0; i < xp_st_set_nfiles(s); i++) {
        const xp_st_file *f = xp_st_set_file(s, i);
        assert_non_null(strstr(xp_st_path(f), "-of-0000"));
        size_t total = 0;
        for (size_t j = 0; j < xp_st_count(f); j++) total += xp_st_tensor(f, j)->nbytes;
        assert_true(total <= 600 || xp_st_count(f) == 1 ||
                    (total - xp_st_tensor(f, 0)->nbytes == 0));
    }
    xp_st_set_close(s);

    /* the index is ordinary JSON with total_size and every tensor */
    tu_join(p, dir, "model.safetensors.index.json");
    char *text = tu_read_file(p, NULL);
    assert_non_null(text);
    cJSON *root = cJSON_Parse(text);
    free(text);
    assert_non_null(root);
    const cJSON *ts = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "metadata"), "total_size");
    size_t total = 0;
    for (size_t i = 0; i < NDECL; i++) {
        size_t n;
        xp_tensor_bytes(round_trip_decls[i].dt, round_trip_decls[i].ndim, round_trip_decls[i].shape,
                        NULL, &n);
        total += n;
    }
    assert_true(cJSON_IsNumber(ts) && ts->valuedouble == (double)total);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(root, "weight_map")), NDECL);
    cJSON_Delete(root);

    /* writing the same checkpoint unsharded removes the stale index */
    write_round_trip(dir, 0);
    assert_false(tu_file_exists(p));
    assert_int_equal(xp_st_set_open(dir, "model", &s), 0);
    assert_int_equal(xp_st_set_nfiles(s), 1);
    check_round_trip(s);
    xp_st_set_close(s);
}

/* A tensor larger than the shard limit gets a shard of its own; zero-size tensors after it
 * still land in a valid shard. */
static void test_writer_big_tensor_and_empty(void **state)
{
    char dir[4096];
    tu_fresh_dir(dir, "rt_big");
    const int64_t big[1] = {16}, none[1] = {0}, zero[2] = {0, 3};
    xp_st_writer *w = xp_stw_new();
    assert_int_equal(xp_stw_declare(w, "big", XP_U8, 1, big), 0);
    assert_int_equal(xp_stw_declare(w, "z", XP_F32, 2, zero), 0);
    assert_int_equal(xp_stw_declare(w, "s", XP_I8, 0, none), 0);
    assert_int_equal(xp_stw_open(w, dir, "model", 8), 0);
    unsigned char data[16];
    fill(data, 16, 3);
    assert_int_equal(xp_stw_write(w, "big", data, 16), 0);
    assert_int_equal(xp_stw_write(w, "z", NULL, 0), 0);
    assert_int_equal(xp_stw_write(w, "s", "\x7f", 1), 0);
    assert_int_equal(xp_stw_finish(w), 0);
    xp_stw_free(w);
    xp_st_set *s = NULL;
    if (xp_st_set_open(dir, "model", &s) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(xp_st_set_nfiles(s), 2);
    assert_int_equal(memcmp(xp_st_set_find(s, "big")->data, data, 16), 0);
    assert_int_equal(xp_st_set_find(s, "z")->nbytes, 0);
    assert_int_equal(xp_st_set_find(s, "s")->ndim, 0);
    assert_int_equal(*(const unsigned char *)xp_st_set_find(s, "s")->data, 0x7f);
    xp_st_set_close(s);

    /* names JSON must escape, and a scalar declared without a shape array */
    tu_fresh_dir(dir, "rt_names");
    static const char *const odd[] = {"quote\"d", "back\\slash", "\xc3\xbcml/\xe2\x82\xac",
                                      "tab\tnl\n", "x"};
    w = xp_stw_new();
    for (int i = 0; i < 4; i++) assert_int_equal(xp_stw_declare(w, odd[i], XP_U8, 1, big), 0);
    assert_int_equal(xp_stw_declare(w, odd[4], XP_F32, 0, NULL), 0);
    assert_int_equal(xp_stw_open(w, dir, "model", 0), 0);
    for (int i = 0; i < 4; i++) assert_int_equal(xp_stw_write(w, odd[i], data, 16), 0);
    assert_int_equal(xp_stw_write(w, odd[4], data, 4), 0);
    assert_int_equal(xp_stw_finish(w), 0);
    xp_stw_free(w);
    assert_int_equal(xp_st_set_open(dir, "model", &s), 0);
    assert_int_equal(xp_st_set_count(s), 5);
    for (int i = 0; i < 5; i++) {
        const xp_tensor *t = xp_st_set_find(s, odd[i]);
        if (!t) fail_msg("tensor \"%s\" lost", odd[i]);
        assert_int_equal(memcmp(t->data, data, t->nbytes), 0);
    }
    xp_st_set_close(s);

    /* no tensors at all: still a valid file */
    tu_fresh_dir(dir, "rt_empty");
    w = xp_stw_new();
    assert_int_equal(xp_stw_open(w, dir, "adapter_model", 0), 0);
    assert_int_equal(xp_stw_finish(w), 0);
    xp_stw_free(w);
    assert_int_equal(xp_st_set_open(dir, "adapter_model", &s), 0);
    assert_int_equal(xp_st_set_count(s), 0);
    assert_string_equal(xp_st_metadata(xp_st_set_file(s, 0), "format"), "pt");
    xp_st_set_close(s);
}

static void test_writer_errors(void **state)
{
    char dir[4096], p[4096];
    tu_fresh_dir(dir, "w_err");
    const int64_t shp[2] = {2, 2}, neg[1] = {-3}, nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    float a[4] = {1, 2, 3, 4};

    xp_st_writer *w = xp_stw_new();
    assert_int_equal(xp_stw_declare(w, "a", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_declare(w, "b", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_declare(w, "a", XP_F32, 2, shp), -1);
    assert_error_contains("declared twice");
    assert_int_equal(xp_stw_declare(w, "c", XP_F32, 1, neg), -1);
    assert_error_contains("negative");
    assert_error_contains("c");
    assert_int_equal(xp_stw_declare(w, "d", XP_F32, 9, nine), -1);
    assert_error_contains("9 dimensions");
    assert_int_equal(xp_stw_declare(w, "__metadata__", XP_F32, 2, shp), -1);
    assert_int_equal(xp_stw_declare(w, "", XP_F32, 2, shp), -1);
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), -1); /* not open yet */
    assert_int_equal(xp_stw_finish(w), -1);
    assert_int_equal(xp_stw_open(w, dir, "model", 0), 0);
    assert_int_equal(xp_stw_open(w, dir, "model", 0), -1);
    assert_int_equal(xp_stw_declare(w, "late", XP_F32, 2, shp), -1);
    assert_error_contains("after");
    assert_int_equal(xp_stw_metadata(w, "k", "v"), -1);

    assert_int_equal(xp_stw_write(w, "b", a, sizeof a), -1);
    assert_error_contains("out of order");
    assert_error_contains("expected a");
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a - 1), -1);
    assert_error_contains("15 bytes");
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), 0);
    /* finishing with "b" unwritten fails and publishes nothing */
    assert_int_equal(xp_stw_finish(w), -1);
    assert_error_contains("1 of 2");
    tu_join(p, dir, "model.safetensors");
    assert_false(tu_file_exists(p));
    xp_stw_free(w);
    assert_false(tu_file_exists(p));
    assert_int_equal(tu_count_suffix(dir, ".tmp"), 0);
    assert_int_equal(tu_count_suffix(dir, ".safetensors"), 0);

    /* more writes than declarations */
    w = xp_stw_new();
    assert_int_equal(xp_stw_declare(w, "a", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_open(w, dir, "model", 0), 0);
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), 0);
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), -1);
    assert_error_contains("more tensors");
    xp_stw_free(w); /* freed without finish: no file, no temporary */
    assert_false(tu_file_exists(p));
    assert_int_equal(tu_count_suffix(dir, ".tmp"), 0);

    /* abandoned sharded write removes every temporary */
    w = xp_stw_new();
    assert_int_equal(xp_stw_declare(w, "a", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_declare(w, "b", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_declare(w, "c", XP_F32, 2, shp), 0);
    assert_int_equal(xp_stw_open(w, dir, "model", 16), 0);
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), 0);
    assert_int_equal(xp_stw_write(w, "b", a, sizeof a), 0);
    assert_true(tu_count_suffix(dir, ".tmp") >= 1);
    xp_stw_free(w);
    assert_int_equal(tu_count_suffix(dir, ".tmp"), 0);
    assert_int_equal(tu_count_suffix(dir, ".safetensors"), 0);
    assert_int_equal(tu_count_suffix(dir, ".json"), 0);

    /* a directory that does not exist: the error names the path */
    w = xp_stw_new();
    assert_int_equal(xp_stw_declare(w, "a", XP_F32, 2, shp), 0);
    tu_join(p, dir, "no/such/dir");
    assert_int_equal(xp_stw_open(w, p, "model", 0), 0);
    assert_int_equal(xp_stw_write(w, "a", a, sizeof a), -1);
    assert_error_contains("no/such/dir");
    xp_stw_free(w);
    xp_stw_free(NULL);
}

/* ------------------------------------------------------------------ hand-built files */

static void test_hand_built_single(void **state)
{
    char path[4096];
    unsigned char data[4 + 8 + 2];
    fill(data, sizeof data, 7);
    /* not sorted, keys inside entries shuffled, metadata first and last, space padding, a 0-d
     * tensor and a zero-size one at the end */
    hand_file(path, "hand.safetensors",
              "{'__metadata__':{'format':'pt','b':'x y'},"
              " 'w':{'data_offsets':[4,12],'shape':[2,1],'dtype':'F32'},"
              " 'v':{'shape':[2],'dtype':'BF16','data_offsets':[0,4]},"
              " 'z':{'dtype':'I64','shape':[0,5],'data_offsets':[14,14]},"
              " 's':{'dtype':'F16','shape':[],'data_offsets':[12,14]}}        ",
              data, sizeof data);
    xp_st_file *f = NULL;
    if (xp_st_open(path, &f) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(xp_st_count(f), 4);
    assert_string_equal(xp_st_metadata(f, "format"), "pt");
    assert_string_equal(xp_st_metadata(f, "b"), "x y");
    /* offset order */
    assert_string_equal(xp_st_tensor(f, 0)->name, "v");
    assert_string_equal(xp_st_tensor(f, 1)->name, "w");
    assert_string_equal(xp_st_tensor(f, 2)->name, "s");
    assert_string_equal(xp_st_tensor(f, 3)->name, "z");
    assert_null(xp_st_tensor(f, 4));
    const xp_tensor *w = xp_st_find(f, "w");
    assert_non_null(w);
    assert_int_equal(w->dtype, XP_F32);
    assert_int_equal(w->ndim, 2);
    assert_int_equal(w->shape[0], 2);
    assert_int_equal(w->shape[1], 1);
    assert_int_equal(w->nelem, 2);
    assert_int_equal(w->nbytes, 8);
    assert_int_equal(memcmp(w->data, data + 4, 8), 0);
    const xp_tensor *s = xp_st_find(f, "s");
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->nelem, 1);
    assert_int_equal(memcmp(s->data, data + 12, 2), 0);
    const xp_tensor *z = xp_st_find(f, "z");
    assert_int_equal(z->nelem, 0);
    assert_int_equal(z->nbytes, 0);
    assert_null(xp_st_find(f, "__metadata__"));
    xp_st_close(f);

    /* empty object, no data; and NUL/newline padding */
    hand_file(path, "empty.safetensors", "{}", NULL, 0);
    assert_int_equal(xp_st_open(path, &f), 0);
    assert_int_equal(xp_st_count(f), 0);
    assert_null(xp_st_metadata(f, "format"));
    xp_st_close(f);
    tu_path(path, "nulpad.safetensors");
    assert_int_equal(tu_write_st_raw(path, 8, "{}\n\0\0\0\0 ", 8, NULL, 0), 0);
    assert_int_equal(xp_st_open(path, &f), 0);
    xp_st_close(f);
    /* leading whitespace before the object, as JSON allows */
    hand_file(path, "lead.safetensors", " \n{'a':{'dtype':'U8','shape':[1],'data_offsets':[0,1]}}",
              "\x05", 1);
    assert_int_equal(xp_st_open(path, &f), 0);
    assert_int_equal(*(const unsigned char *)xp_st_find(f, "a")->data, 5);
    xp_st_close(f);
    xp_st_close(NULL);
}

/* Data from a foreign writer need not be aligned: offsets that leave tensors odd-aligned. */
static void test_hand_built_unaligned(void **state)
{
    char path[4096];
    unsigned char data[1 + 8];
    data[0] = 0x38;
    float v[2] = {1.5f, -2.0f};
    memcpy(data + 1, v, 8);
    hand_file(path, "odd.safetensors",
              "{'c':{'dtype':'F8_E4M3','shape':[1],'data_offsets':[0,1]},"
              "'f':{'dtype':'F32','shape':[2],'data_offsets':[1,9]}}",
              data, sizeof data);
    xp_st_set *s = NULL;
    assert_int_equal(xp_st_set_open_file(path, &s), 0);
    float out[2];
    const xp_tensor *t = xp_st_set_find(s, "f");
    assert_int_equal(xp_convert_to_f32(t->dtype, t->data, out, 2), 0);
    assert_true(out[0] == 1.5f && out[1] == -2.0f);
    xp_st_set_close(s);
}

static void write_shard(const char *dir, const char *name, const char *sq_header, const void *data,
                        size_t n)
{
    char path[4096], *h = json(sq_header);
    tu_join(path, dir, name);
    assert_int_equal(tu_write_st(path, h, data, n), 0);
    free(h);
}

static void write_index(const char *dir, const char *stem, const char *sq)
{
    char path[4096], *h = json(sq);
    char fn[256];
    snprintf(fn, sizeof fn, "%s.safetensors.index.json", stem);
    tu_join(path, dir, fn);
    assert_int_equal(tu_write_file(path, h, strlen(h)), 0);
    free(h);
}

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

/* Two shards as transformers writes them; the tensors of shard 1 are "a" and "c", of 2 "b". */
static void hand_shards(char *dir, const char *name)
{
    unsigned char d1[12], d2[8];
    fill(d1, sizeof d1, 1);
    fill(d2, sizeof d2, 2);
    tu_fresh_dir(dir, name);
    write_shard(dir, SHARD1,
                "{'__metadata__':{'format':'pt'},'c':{'dtype':'F32','shape':[2],'data_offsets':[4,"
                "12]},'a':{'dtype':'BF16','shape':[1,2],'data_offsets':[0,4]}}",
                d1, sizeof d1);
    write_shard(dir, SHARD2, "{'b':{'dtype':'I64','shape':[1],'data_offsets':[0,8]}}  ", d2,
                sizeof d2);
}

static void test_hand_built_sharded(void **state)
{
    char dir[4096];
    hand_shards(dir, "hand_sharded");
    write_index(dir, "model",
                "{'metadata':{'total_size':20},'weight_map':{'c':'" SHARD1 "','b':'" SHARD2
                "','a':'" SHARD1 "'}}");
    xp_st_set *s = NULL;
    if (xp_st_set_open(dir, "model", &s) < 0) fail_msg("%s", xp_last_error());
    assert_int_equal(xp_st_set_count(s), 3);
    assert_int_equal(xp_st_set_nfiles(s), 2);
    assert_string_equal(xp_st_set_tensor(s, 0)->name, "a");
    assert_string_equal(xp_st_set_tensor(s, 1)->name, "b");
    assert_string_equal(xp_st_set_tensor(s, 2)->name, "c");
    unsigned char d1[12], d2[8];
    fill(d1, sizeof d1, 1);
    fill(d2, sizeof d2, 2);
    const xp_tensor *b = xp_st_set_find(s, "b");
    assert_non_null(strstr(b->file, SHARD2));
    assert_int_equal(memcmp(b->data, d2, 8), 0);
    assert_int_equal(memcmp(xp_st_set_find(s, "c")->data, d1 + 4, 8), 0);
    assert_non_null(strstr(xp_st_set_find(s, "a")->file, SHARD1));
    xp_st_set_close(s);

    /* a single file under the same stem wins over the index */
    unsigned char one[4] = {1, 2, 3, 4};
    write_shard(dir, "model.safetensors",
                "{'only':{'dtype':'U8','shape':[4],'data_offsets':[0,4]}}", one, 4);
    assert_int_equal(xp_st_set_open(dir, "model", &s), 0);
    assert_int_equal(xp_st_set_count(s), 1);
    assert_non_null(xp_st_set_find(s, "only"));
    xp_st_set_close(s);
}

static void test_index_errors(void **state)
{
    char dir[4096];
    const char *ok_map = "'a':'" SHARD1 "','b':'" SHARD2 "','c':'" SHARD1 "'";
    char idx[1024];

    hand_shards(dir, "idx_none");
    expect_set_fails(dir, "model", "neither", NULL);

    hand_shards(dir, "idx_nowm");
    write_index(dir, "model", "{'metadata':{'total_size':20}}");
    expect_set_fails(dir, "model", "weight_map", NULL);

    hand_shards(dir, "idx_notjson");
    write_index(dir, "model", "{'weight_map':{'a':");
    expect_set_fails(dir, "model", "weight_map", NULL);

    hand_shards(dir, "idx_wm_array");
    write_index(dir, "model", "{'weight_map':['a']}");
    expect_set_fails(dir, "model", "weight_map", NULL);

    static const char *const bad_names[] = {"sub/" SHARD1, "../" SHARD1, "..",
                                            ".",           "",           "/etc/passwd"};
    for (size_t i = 0; i < sizeof bad_names / sizeof *bad_names; i++) {
        hand_shards(dir, "idx_badname");
        snprintf(idx, sizeof idx, "{'weight_map':{'a':'%s','b':'" SHARD2 "','c':'" SHARD1 "'}}",
                 bad_names[i]);
        write_index(dir, "model", idx);
        expect_set_fails(dir, "model", "invalid file name", "\"a\"");
    }
    hand_shards(dir, "idx_nonstring");
    write_index(dir, "model", "{'weight_map':{'a':1,'b':'" SHARD2 "','c':'" SHARD1 "'}}");
    expect_set_fails(dir, "model", "invalid file name", "\"a\"");

    /* the index names a tensor the shard lacks */
    hand_shards(dir, "idx_lacks");
    snprintf(idx, sizeof idx, "{'weight_map':{%s,'ghost':'" SHARD2 "'}}", ok_map);
    write_index(dir, "model", idx);
    expect_set_fails(dir, "model", "ghost", "does not hold");

    /* a tensor listed under the wrong shard */
    hand_shards(dir, "idx_wrong");
    write_index(dir, "model",
                "{'weight_map':{'a':'" SHARD2 "','b':'" SHARD2 "','c':'" SHARD1 "'}}");
    expect_set_fails(dir, "model", "\"a\"", "does not hold");

    /* a shard holds a tensor the index does not list */
    hand_shards(dir, "idx_unlisted");
    write_index(dir, "model", "{'weight_map':{'a':'" SHARD1 "','b':'" SHARD2 "'}}");
    expect_set_fails(dir, "model", "\"c\"", "does not list");

    /* the same tensor in two shards, the index listing it once */
    hand_shards(dir, "idx_dup1");
    unsigned char d2[12];
    fill(d2, sizeof d2, 2);
    write_shard(dir, SHARD2,
                "{'b':{'dtype':'I64','shape':[1],'data_offsets':[0,8]},"
                "'a':{'dtype':'BF16','shape':[1,2],'data_offsets':[8,12]}}",
                d2, sizeof d2);
    snprintf(idx, sizeof idx, "{'weight_map':{%s}}", ok_map);
    write_index(dir, "model", idx);
    expect_set_fails(dir, "model", "\"a\"", SHARD2);

    /* ... and the index listing it twice (a repeated JSON key) */
    snprintf(idx, sizeof idx, "{'weight_map':{%s,'a':'" SHARD2 "'}}", ok_map);
    write_index(dir, "model", idx);
    expect_set_fails(dir, "model", "\"a\"", "both");

    /* a shard that is missing, and one that is malformed */
    hand_shards(dir, "idx_missing");
    write_index(dir, "model", "{'weight_map':{'a':'model-00009-of-00009.safetensors'}}");
    expect_set_fails(dir, "model", "model-00009-of-00009.safetensors", "No such file");
    hand_shards(dir, "idx_badshard");
    write_shard(dir, SHARD2, "{'b':{'dtype':'I64','shape':[1],'data_offsets':[0,9]}}", d2, 8);
    snprintf(idx, sizeof idx, "{'weight_map':{%s}}", ok_map);
    write_index(dir, "model", idx);
    expect_set_fails(dir, "model", SHARD2, "\"b\"");
}

/* ------------------------------------------------------------------ malformed files */

static void test_short_and_length_field(void **state)
{
    char path[4096];
    unsigned char bytes[8] = {2, 0, 0, 0, 0, 0, 0, 0};
    tu_path(path, "short.safetensors");
    for (size_t n = 0; n < 8; n++) {
        assert_int_equal(tu_write_file(path, bytes, n), 0);
        expect_open_fails(path, "too short", "short.safetensors");
    }
    /* length past the end of the file */
    tu_path(path, "pasteof.safetensors");
    assert_int_equal(tu_write_st_raw(path, 1000, "{}", 2, NULL, 0), 0);
    expect_open_fails(path, "truncated", "1000");
    assert_int_equal(tu_write_st_raw(path, 3, "{}", 2, NULL, 0), 0);
    expect_open_fails(path, "truncated", "pasteof.safetensors");
    /* huge lengths in a tiny file: refused before anything is allocated for them */
    const uint64_t huge[] = {(uint64_t)XP_ST_MAX_HEADER + 1, 1ull << 40, UINT64_MAX,
                             0x8000000000000000ull};
    tu_path(path, "huge.safetensors");
    for (size_t i = 0; i < sizeof huge / sizeof *huge; i++) {
        assert_int_equal(tu_write_st_raw(path, huge[i], "{}      ", 8, NULL, 0), 0);
        expect_open_fails(path, "exceeds", NULL);
    }
    /* exactly the limit but a small file: just truncated */
    assert_int_equal(tu_write_st_raw(path, XP_ST_MAX_HEADER, "{}      ", 8, NULL, 0), 0);
    expect_open_fails(path, "truncated", NULL);

    tu_path(path, "does-not-exist.safetensors");
    expect_open_fails(path, "No such file", "does-not-exist.safetensors");
    expect_open_fails(tu_tmpdir(), "not a regular file", NULL);
}

/* Every proper prefix of a valid file is refused: cut in the header or in the data. */
static void test_every_truncation(void **state)
{
    char path[4096], cut[4096];
    unsigned char data[4 + 8 + 4];
    fill(data, sizeof data, 5);
    hand_file(
        path, "full.safetensors",
        "{'__metadata__':{'format':'pt'},'a':{'dtype':'BF16','shape':[2],'data_offsets':[0,4]},"
        "'b':{'dtype':'F64','shape':[1],'data_offsets':[4,12]},"
        "'e':{'dtype':'F32','shape':[0],'data_offsets':[12,12]},"
        "'c':{'dtype':'I32','shape':[],'data_offsets':[12,16]}}  ",
        data, sizeof data);
    size_t n;
    char *raw = tu_read_file(path, &n);
    assert_non_null(raw);
    xp_st_file *f = NULL;
    assert_int_equal(xp_st_open(path, &f), 0);
    xp_st_close(f);
    tu_path(cut, "cut.safetensors");
    for (size_t k = 0; k < n; k++) {
        assert_int_equal(tu_write_file(cut, raw, k), 0);
        const char *want = k < 8                 ? "too short"
                           : k < n - sizeof data ? "truncated"
                                                 : "past the data";
        expect_open_fails(cut, want, NULL);
    }
    free(raw);
}

typedef struct {
    const char *header; /* single-quoted JSON */
    size_t ndata;
    const char *want1, *want2;
} bad_case;

#define E(dt, shp, offs) "{'dtype':" dt ",'shape':" shp ",'data_offsets':" offs "}"

static const bad_case bad_cases[] = {
    /* not JSON / not an object */
    {"{'w':{'dtype':'F32',", 0, "not valid JSON", NULL},
    {"{not json}", 0, "not valid JSON", NULL},
    {"{'w':" E("'F32'", "[1]", "[0,4]") ",}", 4, "not valid JSON", NULL},
    {"", 0, "not a JSON object", NULL},
    {"        ", 0, "not a JSON object", NULL},
    {"[1,2]", 0, "not a JSON object", NULL},
    {"'w'", 0, "not a JSON object", NULL},
    {"null", 0, "not a JSON object", NULL},
    {"{}x", 0, "trailing", NULL},
    {"{}{}", 0, "trailing", NULL},
    {"{} \t", 0, "trailing", NULL},
    {"{'w':5}", 0, "\"w\"", "not a JSON object"},
    /* dtype */
    {"{'w':" E("'F7'", "[1]", "[0,4]") "}", 4, "\"w\"", "unknown dtype \"F7\""},
    {"{'w':" E("'f32'", "[1]", "[0,4]") "}", 4, "\"w\"", "unknown dtype"},
    {"{'w':" E("'F8_E4M3FN'", "[1]", "[0,1]") "}", 1, "\"w\"", "unknown dtype"},
    {"{'w':" E("32", "[1]", "[0,4]") "}", 4, "\"w\"", "dtype"},
    {"{'w':{'shape':[1],'data_offsets':[0,4]}}", 4, "\"w\"", "dtype"},
    /* missing and extra keys */
    {"{'w':{'dtype':'F32','data_offsets':[0,4]}}", 4, "\"w\"", "shape"},
    {"{'w':{'dtype':'F32','shape':[1]}}", 4, "\"w\"", "data_offsets"},
    {"{'w':{'dtype':'F32','shape':[1],'data_offsets':[0,4],'foo':1}}", 4, "\"w\"", "\"foo\""},
    {"{'w':{'dtype':'F32','dtype':'F32','shape':[1],'data_offsets':[0,4]}}", 4, "\"w\"",
     "\"dtype\""},
    /* shape values */
    {"{'w':" E("'F32'", "[-1]", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "[1.5]", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "[1e30]", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "[18446744073709551616]", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "['1']", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "[null]", "[0,4]") "}", 4, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "4", "[0,16]") "}", 16, "\"w\"", "shape"},
    {"{'w':" E("'F32'", "[1,1,1,1,1,1,1,1,1]", "[0,4]") "}", 4, "\"w\"", "9 dimensions"},
    {"{'w':" E("'U8'", "[4294967296,4294967296,4]", "[0,0]") "}", 0, "\"w\"", "overflows"},
    {"{'w':" E("'U8'", "[4294967296,4294967296,4294967296]", "[0,0]") "}", 0, "\"w\"", "overflows"},
    {"{'w':" E("'U64'", "[2147483648,2147483648]", "[0,0]") "}", 0, "\"w\"", "too large"},
    /* size against offsets */
    {"{'w':" E("'F32'", "[2]", "[0,4]") "}", 4, "\"w\"", "need 8 bytes"},
    {"{'w':" E("'BF16'", "[2,2]", "[0,4]") "}", 4, "\"w\"", "need 8 bytes"},
    {"{'w':" E("'F32'", "[0]", "[0,4]") "}", 4, "\"w\"", "need 0 bytes"},
    {"{'w':" E("'F32'", "[]", "[0,0]") "}", 0, "\"w\"", "need 4 bytes"},
    /* offsets */
    {"{'w':" E("'F32'", "[1]", "[8,4]") "}", 8, "\"w\"", "backwards"},
    {"{'w':" E("'F32'", "[1]", "[0,400]") "}", 64, "\"w\"", "past the data buffer"},
    {"{'w':" E("'F32'", "[1]", "[18446744073709551612,18446744073709551616]") "}", 4, "\"w\"",
     "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "[9007199254740988,9007199254740992]") "}", 4, "\"w\"",
     "past the data buffer"},
    {"{'w':" E("'F32'", "[1]", "[0]") "}", 4, "\"w\"", "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "[0,4,8]") "}", 4, "\"w\"", "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "[-4,0]") "}", 4, "\"w\"", "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "[0,4.5]") "}", 4, "\"w\"", "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "['0','4']") "}", 4, "\"w\"", "data_offsets"},
    {"{'w':" E("'F32'", "[1]", "{}") "}", 4, "\"w\"", "data_offsets"},
    /* sizes past 2^53 are called too large, not "negative" or "non-integer" */
    {"{'w':" E("'F32'", "[4611686018427387904]", "[0,4]") "}", 4, "\"w\"", "too large"},
    {"{'w':" E("'F32'", "[1]", "[0,18446744073709551615]") "}", 4, "\"w\"", "too large"},
    {"{'w':" E("'F32'", "[-2]", "[0,4]") "}", 4, "\"w\"", "negative"},
    {"{'w':" E("'F32'", "[1.5]", "[0,4]") "}", 4, "\"w\"", "non-integer"},
    /* layout of the data buffer */
    {"{'a':" E("'F32'", "[2]", "[0,8]") ",'b':" E("'F32'", "[2]", "[4,12]") "}", 12, "\"b\"",
     "overlaps"},
    {"{'a':" E("'F32'", "[2]", "[0,8]") ",'b':" E("'F32'", "[2]", "[0,8]") "}", 8, "\"",
     "overlaps"},
    {"{'a':" E("'F32'", "[2]", "[0,8]") ",'z':" E("'F32'", "[0]", "[4,4]") "}", 8, "\"z\"",
     "overlaps"},
    {"{'a':" E("'F32'", "[1]", "[0,4]") ",'b':" E("'F32'", "[1]", "[8,12]") "}", 12, "\"b\"",
     "gap"},
    {"{'b':" E("'F32'", "[1]", "[4,8]") "}", 8, "\"b\"", "gap"},
    {"{'a':" E("'F32'", "[1]", "[0,4]") "}", 8, "4 bytes after the last tensor", NULL},
    {"{}", 3, "3 bytes after the last tensor", NULL},
    {"{'a':" E("'F32'", "[1]", "[0,4]") ",'a':" E("'F32'", "[1]", "[4,8]") "}", 8, "\"a\"",
     "twice"},
    /* metadata */
    {"{'__metadata__':{'format':'pt','n':1}}", 0, "__metadata__", "\"n\""},
    {"{'__metadata__':{'k':null}}", 0, "__metadata__", "\"k\""},
    {"{'__metadata__':{'k':{'x':'y'}}}", 0, "__metadata__", "\"k\""},
    {"{'__metadata__':'pt'}", 0, "__metadata__", NULL},
    {"{'__metadata__':{},'__metadata__':{}}", 0, "__metadata__", "repeated"},
};

static void test_malformed_corpus(void **state)
{
    char path[4096];
    unsigned char data[64];
    fill(data, sizeof data, 9);
    for (size_t i = 0; i < sizeof bad_cases / sizeof *bad_cases; i++) {
        char name[64];
        snprintf(name, sizeof name, "bad%02zu.safetensors", i);
        hand_file(path, name, bad_cases[i].header, data, bad_cases[i].ndata);
        xp_st_file *f = NOT_NULL_FILE;
        xp_clear_error();
        if (xp_st_open(path, &f) == 0) {
            xp_st_close(f);
            fail_msg("case %zu (%s) opened", i, bad_cases[i].header);
        }
        assert_null(f);
        const char *e = xp_last_error();
        if (!strstr(e, bad_cases[i].want1) ||
            (bad_cases[i].want2 && !strstr(e, bad_cases[i].want2)))
            fail_msg("case %zu (%s): error \"%s\" lacks \"%s\"/\"%s\"", i, bad_cases[i].header, e,
                     bad_cases[i].want1, bad_cases[i].want2 ? bad_cases[i].want2 : "");
        /* and names the file */
        if (!strstr(e, name)) fail_msg("case %zu: error \"%s\" does not name the file", i, e);
    }
}

/* The header parser must stop at the length field: JSON completed only by the first data byte
 * is not a header. */
static void test_header_ends_at_length(void **state)
{
    char path[4096];
    char *h = json("{'a':{'dtype':'U8','shape':[1],'data_offsets':[0,1]}");
    tu_path(path, "openhdr.safetensors");
    assert_int_equal(tu_write_st_raw(path, strlen(h), h, strlen(h), "}", 1), 0);
    free(h);
    expect_open_fails(path, "not valid JSON", NULL);
    /* a string cut by the length field */
    h = json("{'__metadata__':{'k':'abc");
    assert_int_equal(tu_write_st_raw(path, strlen(h), h, strlen(h), "'}}", 3), 0);
    free(h);
    expect_open_fails(path, "not valid JSON", NULL);
}

/* Random byte edits of a valid file: each open either succeeds or fails cleanly, with no
 * sanitizer report and no leak, and a success describes a consistent file. */
static void test_random_mutations(void **state)
{
    char path[4096], mpath[4096];
    unsigned char data[4 + 8 + 6];
    fill(data, sizeof data, 11);
    hand_file(path, "base.safetensors",
              "{'__metadata__':{'format':'pt'},'a':{'dtype':'BF16','shape':[2],'data_offsets':[0,"
              "4]},'b':{'dtype':'F64','shape':[1],'data_offsets':[4,12]},'c':{'dtype':'I16',"
              "'shape':[3],'data_offsets':[12,18]}}",
              data, sizeof data);
    size_t n;
    unsigned char *raw = (unsigned char *)tu_read_file(path, &n);
    assert_non_null(raw);
    unsigned char *m = malloc(n);
    assert_non_null(m);
    tu_path(mpath, "mutant.safetensors");
    static const char interesting[] = "{}[],:\"0123456789-.e ";
    tu_rng r;
    tu_rng_seed(&r, 4242);
    int opened = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(m, raw, n);
        int edits = 1 + (int)(tu_rng_u64(&r) % 3);
        for (int k = 0; k < edits; k++) {
            size_t at = (size_t)(tu_rng_u64(&r) % n);
            uint64_t how = tu_rng_u64(&r) % 3;
            if (how == 0)
                m[at] = (unsigned char)tu_rng_u64(&r);
            else if (how == 1)
                m[at] = (unsigned char)interesting[tu_rng_u64(&r) % (sizeof interesting - 1)];
            else
                m[at] ^= (unsigned char)(1u << (tu_rng_u64(&r) % 8));
        }
        size_t len = tu_rng_u64(&r) % 8 ? n : (size_t)(tu_rng_u64(&r) % (n + 1));
        assert_int_equal(tu_write_file(mpath, m, len), 0);
        xp_st_file *f = NOT_NULL_FILE;
        if (xp_st_open(mpath, &f) < 0) {
            assert_null(f);
            assert_true(xp_last_error()[0] != '\0');
            continue;
        }
        opened++;
        /* whatever was accepted tiles the data buffer exactly */
        size_t total = 0;
        for (size_t i = 0; i < xp_st_count(f); i++) {
            const xp_tensor *t = xp_st_tensor(f, i);
            size_t nb;
            assert_int_equal(xp_tensor_bytes(t->dtype, t->ndim, t->shape, NULL, &nb), 0);
            assert_int_equal(nb, t->nbytes);
            total += t->nbytes;
            assert_ptr_equal(xp_st_find(f, t->name), t);
        }
        uint64_t hlen = 0;
        for (int k = 7; k >= 0; k--) hlen = hlen << 8 | m[k];
        assert_int_equal(8 + hlen + total, len);
        xp_st_close(f);
    }
    assert_true(opened > 0); /* some edits (inside data) leave a valid file */
    free(m);
    free(raw);
}

static void test_tensor_bytes(void **state)
{
    uint64_t ne;
    size_t nb;
    const int64_t s1[3] = {2, 3, 4};
    assert_int_equal(xp_tensor_bytes(XP_BF16, 3, s1, &ne, &nb), 0);
    assert_int_equal(ne, 24);
    assert_int_equal(nb, 48);
    assert_int_equal(xp_tensor_bytes(XP_F32, 0, s1, &ne, &nb), 0);
    assert_int_equal(ne, 1);
    assert_int_equal(nb, 4);
    const int64_t s0[2] = {0, INT64_MAX};
    assert_int_equal(xp_tensor_bytes(XP_F64, 2, s0, &ne, &nb), 0);
    assert_int_equal(nb, 0);
    const int64_t neg[2] = {4, -1};
    assert_int_equal(xp_tensor_bytes(XP_F32, 2, neg, &ne, &nb), -1);
    assert_error_contains("negative");
    const int64_t ovf[3] = {1ll << 32, 1ll << 32, 2};
    assert_int_equal(xp_tensor_bytes(XP_U8, 3, ovf, &ne, &nb), -1);
    assert_error_contains("overflow");
    const int64_t big[1] = {INT64_MAX};
    assert_int_equal(xp_tensor_bytes(XP_F32, 1, big, &ne, &nb), -1);
    assert_int_equal(xp_tensor_bytes(XP_U8, 1, big, NULL, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_writer_round_trip_single),
        cmocka_unit_test(test_writer_round_trip_sharded),
        cmocka_unit_test(test_writer_big_tensor_and_empty),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_hand_built_single),
        cmocka_unit_test(test_hand_built_unaligned),
        cmocka_unit_test(test_hand_built_sharded),
        cmocka_unit_test(test_index_errors),
        cmocka_unit_test(test_short_and_length_field),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_malformed_corpus),
        cmocka_unit_test(test_header_ends_at_length),
        cmocka_unit_test(test_random_mutations),
        cmocka_unit_test(test_tensor_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
