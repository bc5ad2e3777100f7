/* Output directories that appear whole or not at all. A command writes into a temporary
 * directory beside its target and renames it into place when everything is written, so a reader
 * never sees an earlier run's files mixed with this one's, and a failed run leaves the target as
 * it was. The temporary directory is removed on failure, on SIGINT/SIGTERM/SIGHUP, and, after a
 * SIGKILL, by the next run that writes the same target. */
#include "cli.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define XP_TMP_TAG ".xprec-tmp-"

/* ---------------------------------------------------------------- removal on a signal */

/* The temporary directories being written, for the signal handler; a plain array of fixed
 * paths because the handler may not allocate. */
#define XP_OUTDIR_SLOTS 4
static char xp_live[XP_OUTDIR_SLOTS][4096];
static volatile sig_atomic_t xp_nlive;
static const int xp_signals[] = {SIGINT, SIGTERM, SIGHUP};
static struct sigaction xp_saved[3];

/* Empties and removes a directory with async-signal-safe calls only. Our temporary directories
 * hold plain files; anything else is left for the next run's clean-up. */
static void xp_remove_flat(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return;
    char buf[4096];
    for (int pass = 0; pass < 64; pass++) {
        int removed = 0;
        lseek(fd, 0, SEEK_SET);
        long n;
        while ((n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0) {
            for (long off = 0; off < n;) {
                /* struct linux_dirent64: ino, off, reclen, type, name */
                unsigned short reclen;
                memcpy(&reclen, buf + off + 16, sizeof reclen);
                const char *name = buf + off + 19;
                if (strcmp(name, ".") != 0 && strcmp(name, "..") != 0)
                    removed += unlinkat(fd, name, 0) == 0;
                off += reclen;
            }
        }
        if (!removed) break;
    }
    close(fd);
    rmdir(dir);
}

static void xp_on_signal(int sig)
{
    for (int i = 0; i < xp_nlive; i++)
        if (xp_live[i][0]) xp_remove_flat(xp_live[i]);
    signal(sig, SIG_DFL);
    raise(sig);
}

static int xp_watch(const char *tmp)
{
    if (xp_nlive == XP_OUTDIR_SLOTS) return xp_fail("too many output directories at once");
    if (xp_nlive == 0) {
        struct sigaction sa = {.sa_handler = xp_on_signal};
        sigemptyset(&sa.sa_mask);
        for (int i = 0; i < 3; i++)
            sigaction(xp_signals[i], &sa, &xp_saved[i]);
    }
    snprintf(xp_live[xp_nlive], sizeof xp_live[0], "%s", tmp);
    xp_nlive++;
    return 0;
}

static void xp_unwatch(const char *tmp)
{
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < xp_nlive; i++)
        if (strcmp(xp_live[i], tmp) == 0) {
            memmove(xp_live[i], xp_live[i + 1], (size_t)(xp_nlive - i - 1) * sizeof xp_live[0]);
            xp_nlive--;
            break;
        }
    if (xp_nlive == 0)
        for (int i = 0; i < 3; i++)
            sigaction(xp_signals[i], &xp_saved[i], NULL);
    sigprocmask(SIG_SETMASK, &old, NULL);
}

/* ---------------------------------------------------------------- paths */

static int xp_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path) < 0 && errno != ENOENT ? -1 : 0;
}

/* rm -rf, never following symbolic links. */
static int xp_remove_tree(const char *path)
{
    if (nftw(path, xp_rm_entry, 16, FTW_DEPTH | FTW_PHYS) < 0 && errno != ENOENT)
        return xp_fail("%s: cannot remove: %s", path, strerror(errno));
    return 0;
}

/* Splits "a/b/c/" into parent "a/b" and name "c". */
static int xp_split(const char *target, char *parent, char *name)
{
    char t[4096];
    size_t n = strlen(target);
    if (n == 0 || n >= sizeof t)
        return xp_fail("output path \"%.100s\" is empty or too long", target);
    memcpy(t, target, n + 1);
    while (n > 1 && t[n - 1] == '/')
        t[--n] = '\0';
    char *slash = strrchr(t, '/');
    const char *base = slash ? slash + 1 : t;
    if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return xp_fail("%s: name the output directory itself, not . or .. or /", target);
    if (strlen(base) > 200) return xp_fail("%s: the directory name is too long", target);
    if (!slash)
        strcpy(parent, ".");
    else if (slash == t)
        strcpy(parent, "/");
    else
        snprintf(parent, 4096, "%.*s", (int)(slash - t), t);
    strcpy(name, base);
    return 0;
}

int xp_mkdir_p(const char *dir)
{
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p)
        return xp_fail("%.100s: path too long", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        struct stat st;
        if (stat(p, &st) != 0 && mkdir(p, 0777) != 0 && errno != EEXIST)
            return xp_fail("%s: cannot create %s: %s", dir, p, strerror(errno));
        if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
            return xp_fail("%s: %s is not a directory", dir, p);
        *s = '/';
    }
    return xp_mkdir(p);
}

/* Temporary directories of earlier runs on this target whose process is gone (a SIGKILL). */
static void xp_remove_stale(const char *parent, const char *name)
{
    char prefix[300];
    snprintf(prefix, sizeof prefix, ".%s" XP_TMP_TAG, name);
    DIR *d = opendir(parent);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t lp = strlen(prefix);
        if (strncmp(e->d_name, prefix, lp) != 0) continue;
        long pid = strtol(e->d_name + lp, NULL, 10);
        if (pid <= 0 || pid == (long)getpid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue; /* a run that is still going, or not one of ours */
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", parent, e->d_name);
        xp_remove_tree(path);
    }
    closedir(d);
}

/* ---------------------------------------------------------------- the output directory */

int xp_outdir_begin(xp_outdir *o, const char *target, int force)
{
    memset(o, 0, sizeof *o);
    char parent[4096], name[256];
    if (xp_split(target, parent, name) < 0) return -1;
    snprintf(o->target, sizeof o->target, "%s", target);
    o->force = force;
    struct stat st;
    if (lstat(target, &st) == 0) {
        if (S_ISLNK(st.st_mode))
            return xp_fail("%s is a symbolic link: give the directory it points to", target);
        if (!S_ISDIR(st.st_mode)) return xp_fail("%s exists and is not a directory", target);
        DIR *d = opendir(target);
        if (!d) return xp_fail("%s: %s", target, strerror(errno));
        struct dirent *e;
        int empty = 1;
        while (empty && (e = readdir(d)))
            empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
        closedir(d);
        if (!empty && !force)
            return xp_fail("%s exists and is not empty: give --force to replace it whole, or "
                           "another directory",
                           target);
    } else if (errno != ENOENT && errno != ENOTDIR) { /* ENOTDIR: the parent check says more */
        return xp_fail("%s: %s", target, strerror(errno));
    }
    if (xp_mkdir_p(parent) < 0) return -1;
    xp_remove_stale(parent, name);
    if (snprintf(o->tmp, sizeof o->tmp, "%s/.%s" XP_TMP_TAG "%ld-XXXXXX", parent, name,
                 (long)getpid()) >= (int)sizeof o->tmp)
        return xp_fail("%s: path too long", target);
    if (!mkdtemp(o->tmp)) {
        int err = errno;
        o->tmp[0] = '\0';
        return xp_fail("%s: cannot create a temporary directory beside it: %s", target,
                       strerror(err));
    }
    /* mkdtemp makes it private; the result gets the permissions mkdir would give it */
    mode_t mask = umask(0);
    umask(mask);
    chmod(o->tmp, 0777 & ~mask);
    if (xp_watch(o->tmp) < 0) {
        rmdir(o->tmp);
        o->tmp[0] = '\0';
        return -1;
    }
    return 0;
}

int xp_outdir_commit(xp_outdir *o)
{
    /* an empty or missing target is replaced in one step; a full one (--force) is swapped with
     * the new directory in one step, then deleted from where the new one was */
    if (rename(o->tmp, o->target) == 0) {
        xp_unwatch(o->tmp);
        o->tmp[0] = '\0';
        return 0;
    }
    if (errno != ENOTEMPTY && errno != EEXIST)
        return xp_fail("%s: cannot move the new directory into place: %s", o->target,
                       strerror(errno));
    if (!o->force) return xp_fail("%s was filled by someone else while this ran", o->target);
    if (renameat2(AT_FDCWD, o->tmp, AT_FDCWD, o->target, RENAME_EXCHANGE) != 0) {
        if (errno != EINVAL && errno != ENOSYS)
            return xp_fail("%s: cannot replace it: %s", o->target, strerror(errno));
        /* a file system without the exchange: move the old one aside first */
        char old[4200];
        snprintf(old, sizeof old, "%s.old", o->tmp);
        if (rename(o->target, old) != 0)
            return xp_fail("%s: cannot move it aside: %s", o->target, strerror(errno));
        if (rename(o->tmp, o->target) != 0) {
            int err = errno;
            rename(old, o->target);
            return xp_fail("%s: cannot move the new directory into place: %s", o->target,
                           strerror(err));
        }
        rename(old, o->tmp);
    }
    /* o->tmp now holds the old content: the next run removes it if this one is killed here */
    xp_unwatch(o->tmp);
    int rc = xp_remove_tree(o->tmp);
    o->tmp[0] = '\0';
    return rc;
}

void xp_outdir_abort(xp_outdir *o)
{
    if (!o->tmp[0]) return;
    xp_remove_tree(o->tmp);
    xp_unwatch(o->tmp);
    o->tmp[0] = '\0';
}
