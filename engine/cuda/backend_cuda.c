/* The CUDA backend (NVIDIA Hopper, sm_90a): the forward pass of engine/forward.c on the GPU.
 *
 * Weights are uploaded once at create as they lie in the checkpoint (FP8 codes with their F32
 * block scales, BF16 as is). A batch goes up in one copy of a pinned staging area (tokens,
 * positions, block tables, adapter groups), runs as a chain of kernels on one stream and brings
 * the logits it was asked for back to host memory.
 *
 * Linear layers: up to XPREC_CUDA_GEMV_ROWS rows (decode) stream the weights through the GEMV
 * kernel; more rows (prefill) take cuBLASLt — FP8 with 128x128 weight / 1x128 activation block
 * scales, or BF16 after dequantizing the weight — and the tiled F32 kernel when the library
 * declines a shape. XPREC_CUDA_GEMM=fp8|bf16|simt picks the prefill path (default fp8).
 *
 * Adapters live in the engine's numbered slots: adapter_load converts one to BF16 in its device
 * slot, uploaded through pinned chunks on its own stream; the compute stream waits on the
 * slot's event only when a batch needs it. A batch names slots with the generation it expects.
 * Batches of up to XPREC_CUDA_GRAPH_ROWS rows replay a CUDA graph captured per shape. */
#include "backend.h"
#include "format/dtype.h"
#include "cuda/gemm_lt.h"
#include "util/xp_error.h"
#include "cuda/xpc_kernels.h"

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XPC_UP_CHUNK ((size_t)4 << 20) /* floats per adapter upload chunk (16 MB) */
#define XPC_GRAPHS 16
/* Attention splits long contexts into ranges of XPC_ATT_CHUNK positions (a multiple of it past
 * XPC_ATT_SPLITS ranges) for batches of up to XPC_SPLIT_ROWS rows: decode steps, where one row
 * alone would leave most of the GPU idle. */
#define XPC_ATT_CHUNK 512
#define XPC_ATT_SPLITS 32
#define XPC_SPLIT_ROWS 64

_Static_assert(XP_KV_BLOCK == 16, "engine/cuda/kernels.cu assumes 16 positions per KV block");

enum { XPC_MODE_FP8, XPC_MODE_BF16, XPC_MODE_SIMT };

typedef struct {
    xpc_linear lin[XP_MOD_COUNT];
    const float *ws_lt[XP_MOD_COUNT]; /* weight scales in the layout cuBLASLt wants */
    float *attn_norm, *mlp_norm, *q_norm, *k_norm;
} xpc_layer;

typedef struct {
    uint32_t gen;        /* what the engine loaded last; valid while table is set */
    void *mem;           /* BF16 A and B of every module */
    xpc_lora_mat *table; /* device [n_layers * 7] */
    cudaEvent_t ready;
} xpc_slot;

typedef struct {
    int used, n, n_out, n_groups, lora, nsplit, chunk;
    cudaGraphExec_t exec;
} xpc_graph;

typedef struct {
    const xp_model *m;
    int dev; /* the engine calls from its own thread: every entry point selects it first */
    int max_rows, rows_pad, max_ctx, max_bps; /* max_bps: blocks per sequence */
    int n_layers, kv_dim;
    cudaStream_t s, up;
    pthread_mutex_t mu; /* the bandwidth probe may come from another thread than forward */

    void **allocs; /* every device allocation made at create, freed at destroy */
    int n_allocs, cap_allocs;

    xpc_layer *layers;
    xpc_linear embed, lm_head;
    float *final_norm, *inv_freq, *kc, *vc;
    float *x, *h, *q, *k, *v, *att, *gate, *upb, *out, *lora_t, *logits, *att_part;
    uint8_t *xq;
    float *xs;
    uint16_t *wbf, *xbf;

    /* batch staging: the same layout in pinned host memory and on the device */
    unsigned char *stage_h, *stage_d;
    size_t off_tok, off_pos, off_toff, off_out, off_tabs, stage_bytes;
    float *logits_h;
    size_t logits_h_rows;

    xpc_slot *slots; /* [n_slots], the engine's adapter slots */
    int n_slots;
    float *up_pin[2], *up_dev[2];
    cudaEvent_t up_done[2];
    int up_next;

    xpc_lt *lt;
    xpc_lt_scales sl;
    int fp8_lt, mode, gemv_rows, graph_rows, use_graphs;
    xpc_graph graphs[XPC_GRAPHS];
    int next_graph;

    /* the batch being run */
    int any_lora, n_groups, nsplit, chunk;
} xpc_ctx;

static int xpc_cuda_fail(const char *what, cudaError_t e)
{
    return xp_fail("CUDA %s: %s", what, cudaGetErrorString(e));
}

#define XPC_TRY(call, what)                                                                        \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return xpc_cuda_fail(what, e_);                                     \
    } while (0)

static int xpc_env_int(const char *name, int def)
{
    const char *v = getenv(name);
    return v && *v ? atoi(v) : def;
}

static void *xpc_alloc(xpc_ctx *c, size_t bytes, const char *what)
{
    if (c->n_allocs == c->cap_allocs) {
        int cap = c->cap_allocs ? 2 * c->cap_allocs : 64;
        void **a = realloc(c->allocs, (size_t)cap * sizeof *a);
        if (!a) {
            xp_fail("out of memory");
            return NULL;
        }
        c->allocs = a;
        c->cap_allocs = cap;
    }
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        xp_fail("CUDA out of device memory for %s (%zu MB): %s", what, bytes >> 20,
                cudaGetErrorString(e));
        return NULL;
    }
    c->allocs[c->n_allocs++] = p;
    return p;
}

static void *xpc_upload(xpc_ctx *c, const void *src, size_t bytes, const char *what)
{
    void *d = xpc_alloc(c, bytes, what);
    if (!d) return NULL;
    /* on the compute stream, so kernels queued there later (the scale transposes) see it */
    cudaError_t e = cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, c->s);
    if (e != cudaSuccess) {
        xpc_cuda_fail(what, e);
        return NULL;
    }
    return d;
}

static int xpc_dtype(xp_dtype t)
{
    switch (t) {
    case XP_F8_E4M3:
        return XPC_FP8;
    case XP_BF16:
        return XPC_BF16;
    case XP_F16:
        return XPC_F16;
    case XP_F32:
        return XPC_F32;
    default:
        return -1;
    }
}

/* Copies one weight to the device as it is; *ws_lt gets the scale grid cuBLASLt reads. */
static int xpc_linear_upload(xpc_ctx *c, const xp_linear *l, xpc_linear *d, const float **ws_lt)
{
    memset(d, 0, sizeof *d);
    if ((d->dtype = xpc_dtype(l->dtype)) < 0)
        return xp_fail("dtype %s is not supported by the CUDA backend", xp_dtype_name(l->dtype));
    d->rows = l->rows;
    d->cols = l->cols;
    size_t bytes = (size_t)l->rows * (size_t)l->cols * xp_dtype_size(l->dtype);
    if (!(d->w = xpc_upload(c, l->w, bytes, "weights"))) return -1;
    if (l->dtype != XP_F8_E4M3) return 0;
    d->br = l->br;
    d->bc = l->bc;
    d->nbc = l->nbc;
    int64_t nrb = (l->rows + l->br - 1) / l->br;
    float *s = xpc_upload(c, l->scale, (size_t)(nrb * l->nbc) * sizeof(float), "weight scales");
    if (!s) return -1;
    d->scale = s;
    if (ws_lt) *ws_lt = s;
    if (ws_lt && c->fp8_lt && c->sl.w_transposed) {
        float *t = xpc_alloc(c, (size_t)(nrb * l->nbc) * sizeof(float), "weight scales");
        if (!t || xpc_transpose_f32(s, (int)nrb, (int)l->nbc, t, c->s) < 0) return -1;
        *ws_lt = t;
    }
    return 0;
}

static void xpc_destroy(void *ctx);

static size_t xpc_align(size_t v)
{
    return (v + 255) & ~(size_t)255;
}

/* K and V in F32 only: a KV dtype option asking for anything else is refused at create. */
static size_t xpc_kv_block_bytes(const xp_model *m, const xp_backend_opts *o)
{
    if (o && o->kv_dtype && *o->kv_dtype && strcmp(o->kv_dtype, "f32") != 0) return 0;
    return 2 * (size_t)m->cfg.num_hidden_layers * XP_KV_BLOCK *
           (size_t)(m->cfg.num_key_value_heads * m->cfg.head_dim) * sizeof(float);
}

static void *xpc_create(const xp_model *m, const xp_backend_opts *o, int *kv_blocks)
{
    int max_rows = o->max_rows, max_ctx = o->max_ctx;
    size_t per = xpc_kv_block_bytes(m, o);
    if (!per) {
        xp_fail("the CUDA backend keeps its KV cache in f32; KV dtype \"%s\" is not supported",
                o->kv_dtype);
        return NULL;
    }
    int n_blocks;
    if (xp_backend_kv_blocks(o, per, &n_blocks) < 0) return NULL;
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        xp_fail("no CUDA device: %s", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return NULL;
    }
    int dev = o->device > 0 ? o->device : xpc_env_int("XPREC_CUDA_DEVICE", 0);
    struct cudaDeviceProp prop;
    if (dev < 0 || dev >= ndev || (e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess) {
        xp_fail("CUDA device %d: %s", dev,
                e != cudaSuccess ? cudaGetErrorString(e) : "no such device");
        return NULL;
    }
    if (prop.major != 9) {
        xp_fail("CUDA device %s is sm_%d%d; this build targets sm_90a (H100/H200)", prop.name,
                prop.major, prop.minor);
        return NULL;
    }
    const xp_qwen3_config *g = &m->cfg;
    if (g->head_dim > XPC_MAX_HEAD_DIM || g->head_dim % 2 ||
        g->num_attention_heads % g->num_key_value_heads) {
        xp_fail("the CUDA backend needs an even head_dim up to %d and heads a multiple of kv heads",
                XPC_MAX_HEAD_DIM);
        return NULL;
    }
    xpc_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        xp_fail("out of memory");
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    c->n_slots = o->adapter_slots > 0 ? o->adapter_slots : 1;
    if (!(c->slots = calloc((size_t)c->n_slots, sizeof *c->slots))) {
        free(c);
        xp_fail("out of memory");
        return NULL;
    }
    c->dev = dev;
    c->m = m;
    c->max_rows = max_rows;
    c->rows_pad = (max_rows + 15) & ~15;
    c->max_ctx = max_ctx;
    c->max_bps = xp_kv_blocks_for(max_ctx);
    c->n_layers = g->num_hidden_layers;
    c->kv_dim = g->num_key_value_heads * g->head_dim;
    const char *mode = getenv("XPREC_CUDA_GEMM");
    c->mode = mode && !strcmp(mode, "simt")   ? XPC_MODE_SIMT
              : mode && !strcmp(mode, "bf16") ? XPC_MODE_BF16
                                              : XPC_MODE_FP8;
    c->gemv_rows = xpc_env_int("XPREC_CUDA_GEMV_ROWS", 16);
    c->graph_rows = xpc_env_int("XPREC_CUDA_GRAPH_ROWS", 64);
    c->use_graphs = xpc_env_int("XPREC_CUDA_GRAPHS", 1);
    if ((e = cudaStreamCreateWithFlags(&c->s, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->up, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&c->up_done[0], cudaEventDisableTiming)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&c->up_done[1], cudaEventDisableTiming)) != cudaSuccess) {
        xpc_cuda_fail("streams", e);
        goto fail;
    }
    if (c->mode != XPC_MODE_SIMT) {
        if (!(c->lt = xpc_lt_create(c->s))) goto fail;
        if (c->mode == XPC_MODE_FP8) {
            int r = xpc_lt_fp8_probe(c->lt, c->s, &c->sl);
            if (r < 0) goto fail;
            c->fp8_lt = r;
            if (!r && getenv("XPREC_CUDA_VERBOSE"))
                fprintf(stderr,
                        "xprec cuda: cuBLASLt FP8 block scaling unavailable; prefill uses BF16\n");
        }
    }

    /* weights */
    if (!(c->layers = calloc((size_t)g->num_hidden_layers, sizeof *c->layers))) {
        xp_fail("out of memory");
        goto fail;
    }
    size_t hid = (size_t)g->hidden_size, hd = (size_t)g->head_dim, wbf = 0;
    for (int l = 0; l < g->num_hidden_layers; l++) {
        const xp_layer *L = &m->layers[l];
        xpc_layer *D = &c->layers[l];
        if (!(D->attn_norm = xpc_upload(c, L->attn_norm, hid * 4, "norms")) ||
            !(D->mlp_norm = xpc_upload(c, L->mlp_norm, hid * 4, "norms")) ||
            !(D->q_norm = xpc_upload(c, L->q_norm, hd * 4, "norms")) ||
            !(D->k_norm = xpc_upload(c, L->k_norm, hd * 4, "norms")))
            goto fail;
        for (int k = 0; k < XP_MOD_COUNT; k++) {
            if (xpc_linear_upload(c, &L->lin[k], &D->lin[k], &D->ws_lt[k]) < 0) goto fail;
            size_t el = (size_t)(L->lin[k].rows * L->lin[k].cols);
            if (L->lin[k].dtype != XP_BF16 && el > wbf) wbf = el;
        }
    }
    if (xpc_linear_upload(c, &m->embed, &c->embed, NULL) < 0) goto fail;
    if (m->lm_head.w == m->embed.w) {
        c->lm_head = c->embed; /* tied */
    } else if (xpc_linear_upload(c, &m->lm_head, &c->lm_head, NULL) < 0) {
        goto fail;
    }
    if (m->lm_head.dtype != XP_BF16 && (size_t)(m->lm_head.rows * m->lm_head.cols) > wbf)
        wbf = (size_t)(m->lm_head.rows * m->lm_head.cols);
    if (!(c->final_norm = xpc_upload(c, m->final_norm, hid * 4, "norms")) ||
        !(c->inv_freq = xpc_upload(c, m->inv_freq, hd / 2 * 4, "rope")))
        goto fail;

    /* KV storage under the engine's block ids */
    size_t kvb = (size_t)n_blocks * per / 2;
    if (!(c->kc = xpc_alloc(c, kvb, "the KV cache")) ||
        !(c->vc = xpc_alloc(c, kvb, "the KV cache")))
        goto fail;
    if ((e = cudaMemsetAsync(c->kc, 0, kvb, c->s)) != cudaSuccess ||
        (e = cudaMemsetAsync(c->vc, 0, kvb, c->s)) != cudaSuccess) {
        xpc_cuda_fail("KV cache", e);
        goto fail;
    }

    /* activations, rows padded to 16 for the FP8 product */
    size_t R = (size_t)c->rows_pad, qd = (size_t)g->num_attention_heads * hd;
    size_t inter = (size_t)g->intermediate_size, maxc = hid > inter ? hid : inter;
    if (qd > maxc) maxc = qd;
    size_t maxo = maxc > (size_t)g->vocab_size ? maxc : (size_t)g->vocab_size;
    if (!(c->x = xpc_alloc(c, R * hid * 4, "activations")) ||
        !(c->h = xpc_alloc(c, R * maxc * 4, "activations")) ||
        !(c->q = xpc_alloc(c, R * qd * 4, "activations")) ||
        !(c->k = xpc_alloc(c, R * (size_t)c->kv_dim * 4, "activations")) ||
        !(c->v = xpc_alloc(c, R * (size_t)c->kv_dim * 4, "activations")) ||
        !(c->att = xpc_alloc(c, R * qd * 4, "activations")) ||
        !(c->gate = xpc_alloc(c, R * inter * 4, "activations")) ||
        !(c->upb = xpc_alloc(c, R * inter * 4, "activations")) ||
        !(c->out = xpc_alloc(c, R * maxc * 4, "activations")) ||
        !(c->lora_t = xpc_alloc(c, R * XPC_LORA_T * 4, "activations")) ||
        !(c->att_part =
              xpc_alloc(c,
                        (size_t)(max_rows < XPC_SPLIT_ROWS ? max_rows : XPC_SPLIT_ROWS) *
                            (size_t)g->num_attention_heads * XPC_ATT_SPLITS * (hd + 2) * 4,
                        "attention splits")) ||
        !(c->logits = xpc_alloc(c, R * (size_t)g->vocab_size * 4, "logits")))
        goto fail;
    if (c->mode != XPC_MODE_SIMT) {
        if (!(c->xq = xpc_alloc(c, R * maxc, "FP8 activations")) ||
            !(c->xs = xpc_alloc(c, R * (maxc / 128 + 1) * 4, "activation scales")) ||
            !(c->xbf = xpc_alloc(c, R * maxc * 2, "BF16 activations")) ||
            (wbf && !(c->wbf = xpc_alloc(c, wbf * 2, "BF16 weights"))))
            goto fail;
    }
    (void)maxo;

    /* staging */
    c->off_tok = xpc_align((size_t)max_rows * sizeof(xpc_lora_group));
    c->off_pos = c->off_tok + xpc_align((size_t)max_rows * 4);
    c->off_toff = c->off_pos + xpc_align((size_t)max_rows * 4);
    c->off_out = c->off_toff + xpc_align((size_t)max_rows * 4);
    c->off_tabs = c->off_out + xpc_align((size_t)max_rows * 4);
    c->stage_bytes = c->off_tabs + (size_t)max_rows * (size_t)c->max_bps * 4;
    if ((e = cudaMallocHost((void **)&c->stage_h, c->stage_bytes)) != cudaSuccess) {
        xpc_cuda_fail("pinned staging", e);
        goto fail;
    }
    if (!(c->stage_d = xpc_alloc(c, c->stage_bytes, "batch staging"))) goto fail;
    for (int i = 0; i < 2; i++) {
        if ((e = cudaMallocHost((void **)&c->up_pin[i], XPC_UP_CHUNK * 4)) != cudaSuccess) {
            xpc_cuda_fail("pinned adapter staging", e);
            goto fail;
        }
        if (!(c->up_dev[i] = xpc_alloc(c, XPC_UP_CHUNK * 4, "adapter staging"))) goto fail;
    }
    if ((e = cudaStreamSynchronize(c->s)) != cudaSuccess) {
        xpc_cuda_fail("upload", e);
        goto fail;
    }
    if (getenv("XPREC_CUDA_VERBOSE"))
        fprintf(stderr, "xprec cuda: %s, prefill %s%s, gemv up to %d rows, graphs %s\n", prop.name,
                c->mode == XPC_MODE_SIMT   ? "simt"
                : c->mode == XPC_MODE_BF16 ? "bf16"
                                           : "fp8",
                c->mode == XPC_MODE_FP8 && !c->fp8_lt ? " (unavailable: bf16)" : "", c->gemv_rows,
                c->use_graphs ? "on" : "off");
    *kv_blocks = n_blocks;
    return c;
fail:
    xpc_destroy(c);
    return NULL;
}

static void xpc_slot_free(xpc_slot *s)
{
    cudaFree(s->mem);
    cudaFree(s->table);
    if (s->ready) cudaEventDestroy(s->ready);
}

static void xpc_graphs_clear(xpc_ctx *c)
{
    for (int i = 0; i < XPC_GRAPHS; i++)
        if (c->graphs[i].used) cudaGraphExecDestroy(c->graphs[i].exec);
    memset(c->graphs, 0, sizeof c->graphs);
}

static void xpc_destroy(void *ctx)
{
    xpc_ctx *c = ctx;
    if (!c) return;
    cudaSetDevice(c->dev);
    if (c->s) cudaStreamSynchronize(c->s);
    if (c->up) cudaStreamSynchronize(c->up);
    xpc_graphs_clear(c);
    for (int i = 0; i < c->n_slots; i++)
        xpc_slot_free(&c->slots[i]);
    free(c->slots);
    for (int i = 0; i < c->n_allocs; i++)
        cudaFree(c->allocs[i]);
    free(c->allocs);
    free(c->layers);
    cudaFreeHost(c->stage_h);
    cudaFreeHost(c->logits_h);
    for (int i = 0; i < 2; i++) {
        cudaFreeHost(c->up_pin[i]);
        if (c->up_done[i]) cudaEventDestroy(c->up_done[i]);
    }
    xpc_lt_destroy(c->lt);
    if (c->s) cudaStreamDestroy(c->s);
    if (c->up) cudaStreamDestroy(c->up);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* ------------------------------------------------------------------ adapters */

/* A host LoRA factor as the engine holds it: rows x cols in BF16 or F32; read transposed, it
 * yields B [out, rank] from the engine's Bt [rank, out]. */
typedef struct {
    xp_dtype dtype;
    const void *p;
    size_t rows, cols;
    int transposed;
} xpc_src;

static float xpc_src_at(const xpc_src *s, size_t i)
{
    size_t at = s->transposed ? (i % s->rows) * s->cols + i / s->rows : i;
    return s->dtype == XP_BF16 ? xp_bf16_to_f32(((const uint16_t *)s->p)[at])
                               : ((const float *)s->p)[at];
}

/* n values of src to BF16 at dst on the upload stream, through the two pinned chunks in turn
 * (widened to F32 on the host, exact for BF16, and narrowed on the device). */
static int xpc_up_array(xpc_ctx *c, const xpc_src *src, size_t n, uint16_t *dst)
{
    for (size_t off = 0; off < n; off += XPC_UP_CHUNK) {
        size_t cnt = n - off < XPC_UP_CHUNK ? n - off : XPC_UP_CHUNK;
        int b = c->up_next;
        c->up_next ^= 1;
        XPC_TRY(cudaEventSynchronize(c->up_done[b]), "adapter upload");
        for (size_t j = 0; j < cnt; j++)
            c->up_pin[b][j] = xpc_src_at(src, off + j);
        XPC_TRY(cudaMemcpyAsync(c->up_dev[b], c->up_pin[b], cnt * 4, cudaMemcpyHostToDevice, c->up),
                "adapter upload");
        if (xpc_f32_to_bf16(c->up_dev[b], cnt, dst + off, c->up) < 0) return -1;
        XPC_TRY(cudaEventRecord(c->up_done[b], c->up), "adapter upload");
    }
    return 0;
}

static int xpc_slot_upload(xpc_ctx *c, const xp_lora_weights *w, xpc_slot *s)
{
    const xp_qwen3_config *g = &c->m->cfg;
    int nm = w->n_layers * XP_MOD_COUNT;
    size_t total = 0;
    for (int i = 0; i < nm; i++) {
        const xp_lora_mat *lm = &w->mods[i];
        if (!lm->rank) continue;
        int64_t od, in;
        xp_module_shape(g, (xp_module)(i % XP_MOD_COUNT), &od, &in);
        total += ((size_t)lm->rank * (size_t)in + 7) / 8 * 8 +
                 ((size_t)od * (size_t)lm->rank + 7) / 8 * 8;
    }
    xpc_lora_mat *tbl = calloc((size_t)nm, sizeof *tbl);
    if (!tbl) return xp_fail("out of memory");
    cudaError_t e;
    int rc = -1;
    if ((e = cudaMalloc(&s->mem, total * 2 + 16)) != cudaSuccess ||
        (e = cudaMalloc((void **)&s->table, (size_t)nm * sizeof *tbl)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&s->ready, cudaEventDisableTiming)) != cudaSuccess) {
        xp_fail("CUDA adapter slot (%zu MB): %s", total * 2 >> 20, cudaGetErrorString(e));
        goto done;
    }
    uint16_t *p = s->mem;
    for (int i = 0; i < nm; i++) {
        const xp_lora_mat *lm = &w->mods[i];
        if (!lm->rank) continue;
        int64_t od, in;
        xp_module_shape(g, (xp_module)(i % XP_MOD_COUNT), &od, &in);
        size_t na = (size_t)lm->rank * (size_t)in, nb = (size_t)od * (size_t)lm->rank;
        tbl[i] = (xpc_lora_mat){p, p + (na + 7) / 8 * 8, lm->rank, lm->scale};
        xpc_src A = {lm->dtype, lm->A, (size_t)lm->rank, (size_t)in, 0};
        xpc_src B = {lm->dtype, lm->Bt, (size_t)lm->rank, (size_t)od, 1};
        if (xpc_up_array(c, &A, na, p) < 0 || xpc_up_array(c, &B, nb, p + (na + 7) / 8 * 8) < 0)
            goto done;
        p += (na + 7) / 8 * 8 + (nb + 7) / 8 * 8;
    }
    /* the table is small: a pageable copy on the upload stream, ordered before `ready` */
    if ((e = cudaMemcpyAsync(s->table, tbl, (size_t)nm * sizeof *tbl, cudaMemcpyHostToDevice,
                             c->up)) != cudaSuccess ||
        (e = cudaEventRecord(s->ready, c->up)) != cudaSuccess) {
        xpc_cuda_fail("adapter upload", e);
        goto done;
    }
    rc = 0;
done:
    free(tbl);
    return rc;
}

/* Puts w into slot under generation gen, replacing what the slot held. */
static int xpc_adapter_load(void *ctx, int slot, uint32_t gen, const xp_lora_weights *w)
{
    xpc_ctx *c = ctx;
    if (slot < 0 || slot >= c->n_slots)
        return xp_fail("adapter slot %d is outside 0..%d", slot, c->n_slots - 1);
    if (w->n_layers != c->n_layers)
        return xp_fail("adapter has %d layers, the model %d", w->n_layers, c->n_layers);
    pthread_mutex_lock(&c->mu);
    int rc = -1;
    cudaError_t e = cudaSetDevice(c->dev);
    if (e != cudaSuccess) {
        xpc_cuda_fail("set device", e);
        goto done;
    }
    xpc_slot *s = &c->slots[slot];
    /* nothing of a finished forward is in flight; the slot's last upload may be */
    cudaStreamSynchronize(c->up);
    cudaStreamSynchronize(c->s);
    xpc_slot_free(s);
    memset(s, 0, sizeof *s);
    if (xpc_slot_upload(c, w, s) < 0) {
        cudaStreamSynchronize(c->up);
        xpc_slot_free(s);
        memset(s, 0, sizeof *s);
        goto done;
    }
    s->gen = gen;
    rc = 0;
done:
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* ------------------------------------------------------------------ forward */

/* y[n, rows] = x W^T by the path that suits n and the weight. */
static int xpc_matmul(xpc_ctx *c, const xpc_linear *l, const float *ws_lt, const float *x, int n,
                      float *y)
{
    if (n <= c->gemv_rows) return xpc_gemv(l, x, n, y, c->s);
    if (c->mode == XPC_MODE_SIMT || !c->lt) return xpc_gemm_simt(l, x, n, y, c->s);
    int r = 1;
    /* whole 128x128 blocks only: the probe checked the scale layout on those */
    if (c->mode == XPC_MODE_FP8 && c->fp8_lt && l->dtype == XPC_FP8 && l->br == 128 &&
        l->bc == 128 && l->rows % 128 == 0 && l->cols % 128 == 0 && ws_lt) {
        int n_pad = (n + 15) & ~15;
        if (xpc_quant_act(x, n, n_pad, (int)l->cols, c->xq, c->xs, c->sl.x_kmajor, c->s) < 0)
            return -1;
        /* xbf is free in this path: it takes the product if the library only writes BF16 */
        r = xpc_lt_fp8(c->lt, &c->sl, l->w, ws_lt, l->rows, l->cols, c->xq, c->xs, n_pad, y, c->xbf,
                       c->s);
        if (r <= 0) return r;
    }
    const uint16_t *wb = l->w;
    if (l->dtype != XPC_BF16) {
        if (!c->wbf) return xpc_gemm_simt(l, x, n, y, c->s);
        if (xpc_weight_to_bf16(l, c->wbf, c->s) < 0) return -1;
        wb = c->wbf;
    }
    if (xpc_f32_to_bf16(x, (size_t)n * (size_t)l->cols, c->xbf, c->s) < 0) return -1;
    r = xpc_lt_bf16(c->lt, wb, l->rows, l->cols, c->xbf, n, y, c->s);
    if (r <= 0) return r;
    return xpc_gemm_simt(l, x, n, y, c->s);
}

static int xpc_linear_lora(xpc_ctx *c, int layer, xp_module mod, const float *in, int n, float *out)
{
    const xpc_layer *L = &c->layers[layer];
    const xpc_linear *l = &L->lin[mod];
    if (xpc_matmul(c, l, L->ws_lt[mod], in, n, out) < 0) return -1;
    if (!c->any_lora) return 0;
    const xpc_lora_group *g = (const xpc_lora_group *)c->stage_d;
    int idx = layer * XP_MOD_COUNT + (int)mod;
    if (xpc_lora_shrink(g, c->n_groups, idx, in, (int)l->cols, c->lora_t, c->s) < 0 ||
        xpc_lora_expand(g, c->n_groups, idx, c->lora_t, (int)l->rows, out, c->s) < 0)
        return -1;
    return 0;
}

/* Every kernel of one forward pass, on stream s (captured into a graph or run directly). */
static int xpc_run(xpc_ctx *c, int n, int n_out)
{
    const xp_qwen3_config *g = &c->m->cfg;
    int H = g->num_attention_heads, KV = g->num_key_value_heads, d = g->head_dim;
    size_t hid = (size_t)g->hidden_size, inter = (size_t)g->intermediate_size;
    float eps = (float)g->rms_norm_eps;
    const int32_t *tok = (const int32_t *)(c->stage_d + c->off_tok);
    const int32_t *pos = (const int32_t *)(c->stage_d + c->off_pos);
    const int32_t *toff = (const int32_t *)(c->stage_d + c->off_toff);
    const int32_t *orows = (const int32_t *)(c->stage_d + c->off_out);
    const int32_t *tabs = (const int32_t *)(c->stage_d + c->off_tabs);
    if (xpc_embed(&c->embed, tok, n, c->x, c->s) < 0) return -1;
    for (int l = 0; l < c->n_layers; l++) {
        const xpc_layer *L = &c->layers[l];
        if (xpc_rmsnorm(c->x, NULL, n, (int)hid, L->attn_norm, eps, c->h, c->s) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_Q, c->h, n, c->q) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_K, c->h, n, c->k) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_V, c->h, n, c->v) < 0 ||
            xpc_qk_rope_store(c->q, c->k, c->v, n, H, KV, d, L->q_norm, L->k_norm, eps, pos,
                              c->inv_freq, tabs, toff, c->kc, c->vc, c->n_layers, l, c->s) < 0 ||
            xpc_attention(c->q, n, H, KV, d, pos, tabs, toff, c->kc, c->vc, c->n_layers, l, c->att,
                          c->nsplit, c->chunk, c->att_part, c->s) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_O, c->att, n, c->out) < 0 ||
            xpc_add(c->x, c->out, (size_t)n * hid, c->s) < 0 ||
            xpc_rmsnorm(c->x, NULL, n, (int)hid, L->mlp_norm, eps, c->h, c->s) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_GATE, c->h, n, c->gate) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_UP, c->h, n, c->upb) < 0 ||
            xpc_silu_mul(c->gate, c->upb, (size_t)n * inter, c->s) < 0 ||
            xpc_linear_lora(c, l, XP_MOD_DOWN, c->gate, n, c->out) < 0 ||
            xpc_add(c->x, c->out, (size_t)n * hid, c->s) < 0)
            return -1;
    }
    if (xpc_rmsnorm(c->x, orows, n_out, (int)hid, c->final_norm, eps, c->h, c->s) < 0) return -1;
    return xpc_matmul(c, &c->lm_head, NULL, c->h, n_out, c->logits);
}

/* Runs the batch through a graph captured for its shape, capturing on a miss; 1 when graphs
 * cannot be used here (the caller runs the kernels directly). */
static int xpc_run_graph(xpc_ctx *c, int n, int n_out)
{
    xpc_graph *gr = NULL;
    for (int i = 0; i < XPC_GRAPHS; i++) {
        xpc_graph *t = &c->graphs[i];
        if (t->used && t->n == n && t->n_out == n_out && t->n_groups == c->n_groups &&
            t->lora == c->any_lora && t->nsplit == c->nsplit && t->chunk == c->chunk)
            gr = t;
    }
    if (!gr) {
        cudaGraph_t graph = NULL;
        cudaGraphExec_t exec = NULL;
        if (cudaStreamBeginCapture(c->s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
            cudaGetLastError();
            return 1;
        }
        int rc = xpc_run(c, n, n_out);
        cudaError_t e = cudaStreamEndCapture(c->s, &graph);
        if (rc < 0 || e != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
            /* something in the pass cannot be captured here: run without graphs from now on */
            if (graph) cudaGraphDestroy(graph);
            cudaGetLastError();
            xp_clear_error();
            c->use_graphs = 0;
            if (getenv("XPREC_CUDA_VERBOSE"))
                fprintf(stderr, "xprec cuda: graph capture failed; graphs off\n");
            return 1;
        }
        cudaGraphDestroy(graph);
        gr = &c->graphs[c->next_graph];
        c->next_graph = (c->next_graph + 1) % XPC_GRAPHS;
        if (gr->used) cudaGraphExecDestroy(gr->exec);
        *gr = (xpc_graph){1, n, n_out, c->n_groups, c->any_lora, c->nsplit, c->chunk, exec};
    }
    XPC_TRY(cudaGraphLaunch(gr->exec, c->s), "graph launch");
    return 0;
}

/* Fills the staging area: groups with device adapter tables, tokens, positions, the block
 * tables (once per run of rows sharing one) and the rows whose logits are wanted. */
static int xpc_stage(xpc_ctx *c, const xp_batch *b)
{
    xpc_lora_group *g = (xpc_lora_group *)c->stage_h;
    int32_t *tok = (int32_t *)(c->stage_h + c->off_tok),
            *pos = (int32_t *)(c->stage_h + c->off_pos);
    int32_t *toff = (int32_t *)(c->stage_h + c->off_toff),
            *orows = (int32_t *)(c->stage_h + c->off_out);
    int32_t *tabs = (int32_t *)(c->stage_h + c->off_tabs);
    c->any_lora = 0;
    c->n_groups = b->n_groups;
    for (int i = 0; i < b->n_groups; i++) {
        const xp_row_group *rg = &b->groups[i];
        g[i] = (xpc_lora_group){rg->row0, rg->nrows, NULL};
        if (rg->slot < 0 || rg->nrows == 0) continue;
        xpc_slot *s = rg->slot < c->n_slots ? &c->slots[rg->slot] : NULL;
        if (!s || !s->table || s->gen != rg->gen)
            return xp_fail("adapter slot %d generation %u is not loaded", rg->slot, rg->gen);
        XPC_TRY(cudaStreamWaitEvent(c->s, s->ready, 0), "adapter wait");
        g[i].mats = s->table;
        c->any_lora = 1;
    }
    memcpy(tok, b->tokens, (size_t)b->n * 4);
    memcpy(pos, b->pos, (size_t)b->n * 4);
    memcpy(orows, b->out_rows, (size_t)b->n_out * 4);
    size_t used = 0;
    for (int i = 0; i < b->n;) {
        /* rows of one sequence share its table; copy it once, long enough for the furthest */
        int j = i, maxp = b->pos[i];
        while (j + 1 < b->n && b->tables[j + 1] == b->tables[i]) {
            j++;
            if (b->pos[j] > maxp) maxp = b->pos[j];
        }
        size_t nb = (size_t)(maxp / XP_KV_BLOCK + 1);
        memcpy(tabs + used, b->tables[i], nb * 4);
        for (int r = i; r <= j; r++)
            toff[r] = (int32_t)used;
        used += nb;
        i = j + 1;
    }
    XPC_TRY(cudaMemcpyAsync(c->stage_d, c->stage_h, c->off_tabs + used * 4, cudaMemcpyHostToDevice,
                            c->s),
            "batch upload");
    return 0;
}

static int xpc_forward_locked(xpc_ctx *c, const xp_batch *b)
{
    const xp_qwen3_config *g = &c->m->cfg;
    if (b->n < 1 || b->n > c->max_rows)
        return xp_fail("batch of %d rows (1..%d supported)", b->n, c->max_rows);
    if (b->n_out < 0 || b->n_out > b->n || b->n_groups < 0 || b->n_groups > b->n)
        return xp_fail("batch asks for %d logits rows over %d groups of %d rows", b->n_out,
                       b->n_groups, b->n);
    for (int i = 0; i < b->n; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= g->vocab_size)
            return xp_fail("token id %d is outside the vocabulary (%d)", b->tokens[i],
                           g->vocab_size);
        if (b->pos[i] < 0 || b->pos[i] >= c->max_ctx)
            return xp_fail("position %d is outside the context (%d)", b->pos[i], c->max_ctx);
    }
    for (int i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->n)
            return xp_fail("logits row %d is outside the batch", b->out_rows[i]);
    if (xpc_stage(c, b) < 0) return -1;
    /* attention splits for long contexts in small batches */
    int maxp = 0;
    for (int i = 0; i < b->n; i++)
        if (b->pos[i] > maxp) maxp = b->pos[i];
    c->nsplit = 1;
    c->chunk = 0;
    if (b->n <= XPC_SPLIT_ROWS && maxp + 1 > 2 * XPC_ATT_CHUNK) {
        int chunk = XPC_ATT_CHUNK;
        while ((maxp + chunk) / chunk > XPC_ATT_SPLITS)
            chunk += XPC_ATT_CHUNK;
        c->chunk = chunk;
        c->nsplit = (maxp + chunk) / chunk;
    }
    int r = 1;
    if (c->use_graphs && b->n <= c->graph_rows) r = xpc_run_graph(c, b->n, b->n_out);
    if (r < 0) return -1;
    if (r == 1 && xpc_run(c, b->n, b->n_out) < 0) return -1;
    if (b->n_out == 0) {
        XPC_TRY(cudaStreamSynchronize(c->s), "forward");
        return 0;
    }
    size_t vocab = (size_t)g->vocab_size;
    if ((size_t)b->n_out > c->logits_h_rows) {
        cudaFreeHost(c->logits_h);
        c->logits_h = NULL;
        c->logits_h_rows = 0;
        XPC_TRY(cudaMallocHost((void **)&c->logits_h, (size_t)b->n_out * vocab * 4),
                "pinned logits");
        c->logits_h_rows = (size_t)b->n_out;
    }
    XPC_TRY(cudaMemcpyAsync(c->logits_h, c->logits, (size_t)b->n_out * vocab * 4,
                            cudaMemcpyDeviceToHost, c->s),
            "logits download");
    XPC_TRY(cudaStreamSynchronize(c->s), "forward");
    memcpy(b->logits, c->logits_h, (size_t)b->n_out * vocab * 4);
    return 0;
}

static int xpc_forward(void *ctx, const xp_batch *b)
{
    xpc_ctx *c = ctx;
    pthread_mutex_lock(&c->mu);
    cudaError_t e = cudaSetDevice(c->dev);
    int rc = e != cudaSuccess ? xpc_cuda_fail("set device", e) : xpc_forward_locked(c, b);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Device-to-device copies of 1 GiB, best of five: bytes read and written per second, the
 * traffic a weight-streaming kernel competes with. */
static double xpc_read_bandwidth(void *ctx)
{
    xpc_ctx *c = ctx;
    size_t n = (size_t)1 << 30;
    void *a = NULL, *b = NULL;
    cudaEvent_t t0 = NULL, t1 = NULL;
    double best = 0;
    pthread_mutex_lock(&c->mu);
    if (cudaSetDevice(c->dev) == cudaSuccess && cudaMalloc(&a, n) == cudaSuccess &&
        cudaMalloc(&b, n) == cudaSuccess && cudaEventCreate(&t0) == cudaSuccess &&
        cudaEventCreate(&t1) == cudaSuccess) {
        cudaMemsetAsync(a, 1, n, c->s);
        for (int rep = 0; rep < 5; rep++) {
            float ms = 0;
            cudaEventRecord(t0, c->s);
            cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, c->s);
            cudaEventRecord(t1, c->s);
            if (cudaEventSynchronize(t1) == cudaSuccess &&
                cudaEventElapsedTime(&ms, t0, t1) == cudaSuccess && ms > 0 &&
                2.0 * (double)n / (ms / 1e3) > best)
                best = 2.0 * (double)n / (ms / 1e3);
        }
    }
    cudaGetLastError();
    if (t0) cudaEventDestroy(t0);
    if (t1) cudaEventDestroy(t1);
    cudaFree(a);
    cudaFree(b);
    pthread_mutex_unlock(&c->mu);
    return best;
}

static const xp_backend xpc_backend = {"cuda",      xpc_kv_block_bytes, xpc_create,
                                       xpc_destroy, xpc_adapter_load,   xpc_forward,
                                       xpc_read_bandwidth};

const xp_backend *xp_backend_cuda_impl(void);

const xp_backend *xp_backend_cuda_impl(void)
{
    return &xpc_backend;
}
