/* What the xprec subcommands share: one table-driven option parser with one set of limits, the
 * --chat argument, number parsing, progress on a terminal, small file helpers. */
#ifndef XP_CLI_H
#define XP_CLI_H

#include "util/xp_error.h" /* XP_PRINTF */
#include "xprec.h"          /* xp_chat_msg */

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- options */

typedef enum {
    XP_OPT_STR,    /* const char **dest */
    XP_OPT_INT,    /* long *dest, within [lo, hi] */
    XP_OPT_NUM,    /* double *dest, within [lo, hi] */
    XP_OPT_FLAG,   /* int *dest, set to 1 */
    XP_OPT_LIST,   /* xp_opt_list *dest: every occurrence in order, at most `most` */
    XP_OPT_INTS,   /* xp_opt_ints *dest: comma-separated integers within [lo, hi], at most `most`;
                      the list given replaces the default the caller put there */
    XP_OPT_CHOICE, /* int *dest: the index of the value among arg's "a|b|c" */
} xp_opt_kind;

#define XP_OPT_LIST_CAP 64

typedef struct {
    const char *v[XP_OPT_LIST_CAP];
    int n;
} xp_opt_list;

typedef struct {
    long v[XP_OPT_LIST_CAP];
    int n;
} xp_opt_ints;

typedef struct {
    const char *name; /* without the dashes; NULL ends a table */
    xp_opt_kind kind;
    void *dest;
    double lo, hi;
    int most;
    int required;
    const char *arg;  /* the value's name in the help ("DIR"); the choices of XP_OPT_CHOICE */
    const char *help; /* may hold '\n' to continue on the next line */
} xp_opt;

#define XP_STR(n, d, a, h) {.name = n, .kind = XP_OPT_STR, .dest = d, .arg = a, .help = h}
#define XP_STR_REQ(n, d, a, h) \
    {.name = n, .kind = XP_OPT_STR, .dest = d, .required = 1, .arg = a, .help = h}
#define XP_INT(n, d, l, u, a, h) \
    {.name = n, .kind = XP_OPT_INT, .dest = d, .lo = l, .hi = u, .arg = a, .help = h}
#define XP_NUM(n, d, l, u, a, h) \
    {.name = n, .kind = XP_OPT_NUM, .dest = d, .lo = l, .hi = u, .arg = a, .help = h}
#define XP_FLAG(n, d, h) {.name = n, .kind = XP_OPT_FLAG, .dest = d, .help = h}
#define XP_LIST(n, d, m, a, h) \
    {.name = n, .kind = XP_OPT_LIST, .dest = d, .most = m, .arg = a, .help = h}
#define XP_INTS(n, d, l, u, m, a, h) \
    {.name = n, .kind = XP_OPT_INTS, .dest = d, .lo = l, .hi = u, .most = m, .arg = a, .help = h}
#define XP_CHOICE(n, d, choices, h) \
    {.name = n, .kind = XP_OPT_CHOICE, .dest = d, .arg = choices, .help = h}
#define XP_OPT_END {.name = NULL}

/* The options several commands take, defined once so that their limits agree everywhere. */
#define XP_MAX_THREADS 256
#define XP_MAX_SEED 0x7fffffffL
#define XP_MAX_SHARD_MB (1L << 20)
#define XP_DEFAULT_SHARD_MB 4096L
#define XP_OPT_THREADS(d) \
    XP_INT("threads", d, 1, XP_MAX_THREADS, "N", "worker threads (default: one per online CPU)")
#define XP_OPT_BACKEND(d) \
    XP_STR("backend", d, "cpu|cuda|auto", "where the model runs (default auto: CUDA when built in\n" \
                                          "and a GPU is there, else the CPU)")
#define XP_OPT_MODEL(d) XP_STR_REQ("model", d, "DIR", "checkpoint directory (BF16 or FP8)")
#define XP_OPT_SEED(d, h) XP_INT("seed", d, 0, XP_MAX_SEED, "N", h)
#define XP_OPT_MAX_SHARD(d)                                                               \
    XP_INT("max-shard-mb", d, 1, XP_MAX_SHARD_MB, "N",                                    \
           "split the weights into files of at most N MB\n"            \
           "(default 4096)")
#define XP_OPT_FORCE(d) \
    XP_FLAG("force", d, "replace --out whole if it exists and is not empty (refused otherwise)")

/* One subcommand's command line. */
typedef struct {
    const char *name;  /* "quantize" */
    const char *usage; /* "usage: xprec quantize ...\n" lines */
    const char *about; /* what it does, printed by --help between the usage and the options */
    xp_opt *opts;      /* ended by XP_OPT_END */
    const char **pos;  /* room for positional arguments (NULL: the command takes none) */
    int max_pos;
    int *npos;
} xp_cmd;

/* Parses argv[1..argc) by c's table: --name VALUE or --name=VALUE (a unique prefix of a name
 * will do), arguments without dashes into c->pos, "--" ends the options. Returns -1 when the
 * command should go on; otherwise the status to exit with at once: 0 after --help (usage on
 * stdout), 2 after a usage error (what was wrong on stderr). */
int xp_cmd_parse(const xp_cmd *c, int argc, char **argv);
/* Reports a usage error the table cannot see ("give one of --rank and --energy"): the message
 * and the usage lines on stderr. Returns 2, the exit status. */
int xp_cmd_usage_error(const xp_cmd *c, const char *fmt, ...) XP_PRINTF(2, 3);

/* ---------------------------------------------------------------- --chat */

/* A chat given on the command line: a JSON list of {"role", "content"} messages, or
 * {"messages": [...], "add_generation_prompt": bool, "enable_thinking": bool}. */
typedef struct {
    void *root; /* the parsed JSON; the messages' strings live in it */
    xp_chat_msg *msgs;
    size_t n;
    int add_generation_prompt, enable_thinking;
} xp_chat_arg;

/* The flags take the given defaults when the JSON does not set them. -1 + xp_last_error(). */
int xp_chat_arg_parse(const char *json, int generation_prompt, int thinking, xp_chat_arg *c);
void xp_chat_arg_free(xp_chat_arg *c);

/* ---------------------------------------------------------------- progress */

/* One status line rewritten in place on stderr when it is a terminal, silent otherwise. */
typedef struct {
    int tty;
    const char *label;
    size_t items;
    uint64_t bytes;
    double t0, last;
} xp_progress;

/* bytes 0: count items only (no rate). */
void xp_progress_begin(xp_progress *p, const char *label, size_t items, uint64_t bytes);
/* done_items finished, done_bytes processed so far; current is the item's name. */
void xp_progress_update(xp_progress *p, size_t done_items, uint64_t done_bytes,
                        const char *current);
void xp_progress_end(xp_progress *p);

double xp_now(void);

/* Online processors, the default thread count (at most XP_MAX_THREADS). */
int xp_cpu_count(void);

/* ---------------------------------------------------------------- files */

/* mkdir for one directory level; ok if it exists. */
int xp_mkdir(const char *dir);
/* mkdir -p: every missing directory on the path. */
int xp_mkdir_p(const char *dir);

/* An output directory (a checkpoint, an adapter) that appears whole or not at all. begin refuses
 * a target that exists and is not an empty directory unless force is set, creates missing
 * parents, and makes a temporary directory tmp beside the target, where the caller writes.
 * commit renames it into place, replacing whatever the target held; abort removes it and leaves
 * the target as it was. A temporary directory is also removed on SIGINT, SIGTERM and SIGHUP,
 * and, after a SIGKILL, by the next begin on the same target. */
typedef struct {
    char target[4096];
    char tmp[4096];
    int force;
} xp_outdir;

int xp_outdir_begin(xp_outdir *o, const char *target, int force);
int xp_outdir_commit(xp_outdir *o);
/* Harmless after commit or a failed begin. */
void xp_outdir_abort(xp_outdir *o);

/* Do two paths name the same existing file or directory? */
int xp_same_path(const char *a, const char *b);
/* Copies a small file (config, tokenizer); returns -1 with xp_last_error() set. */
int xp_copy_file(const char *src, const char *dst);

/* Copies every small file of a checkpoint directory (tokenizer, generation config, ...) except
 * the safetensors, their index and config.json, which the caller writes itself. */
int xp_copy_aux_files(const char *src_dir, const char *dst_dir);

/* Writes text to DIR/NAME. */
int xp_write_text(const char *dir, const char *name, const char *text);

/* --plot FILE for a gnuplot chart: a name gnuplot's script can quote, and gnuplot on PATH,
 * checked before any work. Returns 0, or the exit status after printing why (2 for the name, 1
 * for a missing gnuplot). */
int xp_plot_check(const char *cmd, const char *png);
/* Runs gnuplot on a script file that draws png; -1 + error when it fails or draws nothing. */
int xp_run_gnuplot(const char *script, const char *png);

#endif
