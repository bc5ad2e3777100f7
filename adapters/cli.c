#include "cli.h"
#include "util/xp_error.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

double xp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void xp_progress_begin(xp_progress *p, const char *label, size_t items, uint64_t bytes)
{
    p->tty = isatty(STDERR_FILENO);
    p->label = label;
    p->items = items;
    p->bytes = bytes;
    p->t0 = p->last = xp_now();
}

void xp_progress_update(xp_progress *p, size_t done_items, uint64_t done_bytes,
                        const char *current)
{
    if (!p->tty) return;
    double now = xp_now();
    if (now - p->last < 0.2 && done_items < p->items) return;
    p->last = now;
    double el = now - p->t0, mbs = el > 0 ? (double)done_bytes / el / 1e6 : 0;
    if (!p->bytes) { /* counting steps, not bytes */
        double left = done_items ? el * (double)(p->items - done_items) / (double)done_items : 0;
        fprintf(stderr, "\r\033[K%s: %zu/%zu, %.0f s left  %.60s", p->label, done_items, p->items,
                left, current ? current : "");
        fflush(stderr);
        return;
    }
    double left = done_bytes && p->bytes > done_bytes
                      ? el * (double)(p->bytes - done_bytes) / (double)done_bytes
                      : 0;
    fprintf(stderr, "\r\033[K%s: tensor %zu/%zu, %.0f MB/s, %.0f s left  %.60s", p->label,
            done_items, p->items, mbs, left, current ? current : "");
    fflush(stderr);
}

void xp_progress_end(xp_progress *p)
{
    if (!p->tty) return;
    double el = xp_now() - p->t0;
    if (!p->bytes) {
        fprintf(stderr, "\r\033[K%s: %zu done in %.1f s\n", p->label, p->items, el);
        return;
    }
    fprintf(stderr, "\r\033[K%s: %zu tensors, %.1f MB in %.1f s (%.0f MB/s)\n", p->label, p->items,
            (double)p->bytes / 1e6, el, el > 0 ? (double)p->bytes / el / 1e6 : 0);
}

int xp_mkdir(const char *dir)
{
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) {
        struct stat st;
        if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
        return xp_fail("%s exists and is not a directory", dir);
    }
    return xp_fail("%s: %s", dir, strerror(errno));
}

int xp_copy_file(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb");
    if (!in) return xp_fail("%s: %s", src, strerror(errno));
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fclose(in);
        return xp_fail("%s: %s", dst, strerror(errno));
    }
    char buf[1 << 16];
    size_t n;
    int ok = 1;
    while (ok && (n = fread(buf, 1, sizeof buf, in)) > 0) ok = fwrite(buf, 1, n, out) == n;
    ok = ok && !ferror(in);
    fclose(in);
    ok = (fclose(out) == 0) && ok;
    if (!ok) return xp_fail("copying %s to %s failed", src, dst);
    return 0;
}

static int xp_is_aux(const char *name)
{
    size_t n = strlen(name);
    if (strcmp(name, "config.json") == 0 || name[0] == '.') return 0;
    if (n > 12 && strcmp(name + n - 12, ".safetensors") == 0) return 0;
    if (n > 23 && strcmp(name + n - 23, ".safetensors.index.json") == 0) return 0;
    return 1;
}

int xp_copy_aux_files(const char *src_dir, const char *dst_dir)
{
    DIR *d = opendir(src_dir);
    if (!d) return xp_fail("%s: %s", src_dir, strerror(errno));
    struct dirent *e;
    int rc = 0;
    char src[4096], dst[4096];
    while (rc == 0 && (e = readdir(d))) {
        if (!xp_is_aux(e->d_name)) continue;
        snprintf(src, sizeof src, "%s/%s", src_dir, e->d_name);
        snprintf(dst, sizeof dst, "%s/%s", dst_dir, e->d_name);
        struct stat st;
        if (stat(src, &st) < 0 || !S_ISREG(st.st_mode)) continue;
        rc = xp_copy_file(src, dst);
    }
    closedir(d);
    return rc;
}

int xp_write_text(const char *dir, const char *name, const char *text)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    if (!fp) return xp_fail("%s: %s", path, strerror(errno));
    int ok = fputs(text, fp) >= 0 && fputc('\n', fp) != EOF;
    ok = (fclose(fp) == 0) && ok;
    if (!ok) return xp_fail("%s: write failed", path);
    return 0;
}

int xp_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > XP_MAX_THREADS ? XP_MAX_THREADS : (int)n;
}

/* Is there an executable gnuplot on PATH? */
static int xp_have_gnuplot(void)
{
    const char *path = getenv("PATH");
    if (!path) return 0;
    char *copy = strdup(path), *save = NULL;
    int found = 0;
    for (char *d = copy ? strtok_r(copy, ":", &save) : NULL; d && !found;
         d = strtok_r(NULL, ":", &save)) {
        char exe[4096];
        snprintf(exe, sizeof exe, "%s/gnuplot", *d ? d : ".");
        found = access(exe, X_OK) == 0;
    }
    free(copy);
    return found;
}

int xp_plot_check(const char *cmd, const char *png)
{
    if (strchr(png, '\'') || strchr(png, '"') || strchr(png, '\n')) {
        fprintf(stderr, "xprec %s: --plot: the file name may not contain quotes or newlines\n", cmd);
        return 2;
    }
    if (!xp_have_gnuplot()) {
        fprintf(stderr, "xprec %s: --plot needs gnuplot on PATH (Debian: apt-get install "
                        "gnuplot-nox); nothing was computed\n", cmd);
        return 1;
    }
    return 0;
}

int xp_same_path(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

int xp_run_gnuplot(const char *script, const char *png)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        execlp("gnuplot", "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0)
        return xp_fail("cannot run gnuplot: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return xp_fail("gnuplot failed (exit %d) drawing %s",
                       WIFEXITED(status) ? WEXITSTATUS(status) : -1, png);
    if (access(png, R_OK) != 0) return xp_fail("gnuplot wrote no %s", png);
    return 0;
}
