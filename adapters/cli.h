/* Small helpers shared by the xprec subcommands: number parsing, progress on a terminal. */
#ifndef XP_CLI_H
#define XP_CLI_H

#include <stddef.h>
#include <stdint.h>

/* Parse a whole decimal argument within [min, max]; on failure print "xprec CMD: --OPT ..." to
 * stderr and return -1. */
int xp_arg_long(const char *cmd, const char *opt, const char *s, long min, long max, long *out);
int xp_arg_double(const char *cmd, const char *opt, const char *s, double min, double max,
                  double *out);

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

/* Online processors, the default thread count. */
int xp_cpu_count(void);

/* mkdir -p for one directory level; ok if it exists. */
int xp_mkdir(const char *dir);
/* Copies a small file (config, tokenizer); returns -1 with xp_last_error() set. */
int xp_copy_file(const char *src, const char *dst);

/* Copies every small file of a checkpoint directory (tokenizer, generation config, ...) except
 * the safetensors, their index and config.json, which the caller writes itself. */
int xp_copy_aux_files(const char *src_dir, const char *dst_dir);

/* Writes text to DIR/NAME. */
int xp_write_text(const char *dir, const char *name, const char *text);

#endif
