/* The one option parser of the xprec commands: each command describes its options in a table
 * (name, kind, destination, limits, help) and this file parses, checks and documents them, so
 * every command reports a bad value the same way and --help lists what the table holds. */
#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void xp_print_usage(const xp_cmd *c, FILE *fp)
{
    fputs(c->usage, fp);
}

static void xp_print_help(const xp_cmd *c)
{
    xp_print_usage(c, stdout);
    if (c->about) printf("\n%s", c->about);
    printf("\noptions:\n");
    for (const xp_opt *o = c->opts; o->name; o++) {
        char head[64];
        int n = snprintf(head, sizeof head, "  --%s%s%s", o->name, o->arg ? " " : "",
                         o->arg ? o->arg : "");
        printf("%s", head);
        /* the help in a column of its own, its continuation lines under it */
        const char *h = o->help ? o->help : "";
        printf("%*s", n < 28 ? 28 - n : 1, "");
        for (; *h; h++) {
            putchar(*h);
            if (*h == '\n') printf("%28s", "");
        }
        if (o->kind == XP_OPT_INT || o->kind == XP_OPT_INTS)
            printf(" [%ld, %ld]", (long)o->lo, (long)o->hi);
        else if (o->kind == XP_OPT_NUM)
            printf(" [%g, %g]", o->lo, o->hi);
        putchar('\n');
    }
    printf("  --help                    this text\n");
}

int xp_cmd_usage_error(const xp_cmd *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "xprec %s: ", c->name);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n\n", stderr);
    xp_print_usage(c, stderr);
    fprintf(stderr, "(xprec %s --help lists every option)\n", c->name);
    return 2;
}

/* A value's error: the message alone, as it names the option and what it needs. */
static int xp_value_error(const xp_cmd *c, const char *fmt, ...) XP_PRINTF(2, 3);
static int xp_value_error(const xp_cmd *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "xprec %s: ", c->name);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 2;
}

static int xp_parse_long(const char *s, double lo, double hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || (double)v < lo || (double)v > hi) return -1;
    *out = v;
    return 0;
}

/* Comma-separated integers, each within [lo, hi]; at most `most`. */
static int xp_parse_ints(const xp_cmd *c, const xp_opt *o, const char *s)
{
    xp_opt_ints *d = o->dest;
    int most = o->most > 0 && o->most < XP_OPT_LIST_CAP ? o->most : XP_OPT_LIST_CAP;
    char buf[32];
    int n = 0;
    for (const char *p = s;; p++) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (n == most)
            return xp_value_error(c, "--%s takes at most %d values, got \"%s\"", o->name, most, s);
        if (len >= sizeof buf) len = sizeof buf - 1; /* too long to be in range anyway */
        memcpy(buf, p, len);
        buf[len] = '\0';
        if (xp_parse_long(buf, o->lo, o->hi, &d->v[n]) < 0)
            return xp_value_error(c,
                                  "--%s needs comma-separated integers in [%ld, %ld], got \"%s\"",
                                  o->name, (long)o->lo, (long)o->hi, s);
        n++;
        if (!comma) break;
        p = comma;
    }
    d->n = n;
    return -1;
}

/* The index of s among "a|b|c", or -1. */
static int xp_choice_index(const char *choices, const char *s)
{
    size_t len = strlen(s);
    int i = 0;
    for (const char *p = choices;; i++) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && strncmp(p, s, n) == 0) return i;
        if (!bar) return -1;
        p = bar + 1;
    }
}

/* Stores one option's value; -1 when it is good, else the exit status. */
static int xp_store(const xp_cmd *c, const xp_opt *o, const char *v)
{
    switch (o->kind) {
    case XP_OPT_STR:
        *(const char **)o->dest = v;
        return -1;
    case XP_OPT_FLAG:
        *(int *)o->dest = 1;
        return -1;
    case XP_OPT_INT:
        if (xp_parse_long(v, o->lo, o->hi, o->dest) < 0)
            return xp_value_error(c, "--%s needs an integer in [%ld, %ld], got \"%s\"", o->name,
                                  (long)o->lo, (long)o->hi, v);
        return -1;
    case XP_OPT_NUM: {
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        if (errno || end == v || *end || !(x >= o->lo && x <= o->hi))
            return xp_value_error(c, "--%s needs a number in [%g, %g], got \"%s\"", o->name, o->lo,
                                  o->hi, v);
        *(double *)o->dest = x;
        return -1;
    }
    case XP_OPT_LIST: {
        xp_opt_list *l = o->dest;
        int most = o->most > 0 && o->most < XP_OPT_LIST_CAP ? o->most : XP_OPT_LIST_CAP;
        if (l->n == most) return xp_value_error(c, "at most %d --%s", most, o->name);
        l->v[l->n++] = v;
        return -1;
    }
    case XP_OPT_INTS:
        return xp_parse_ints(c, o, v);
    case XP_OPT_CHOICE: {
        int i = xp_choice_index(o->arg, v);
        if (i < 0) return xp_value_error(c, "--%s is one of %s, got \"%s\"", o->name, o->arg, v);
        *(int *)o->dest = i;
        return -1;
    }
    }
    return xp_value_error(c, "--%s: unknown option kind", o->name);
}

/* The option named by "--NAME" (NAME of length len): an exact name, else a unique prefix. */
static const xp_opt *xp_find(const xp_cmd *c, const char *name, size_t len, int *ambiguous)
{
    const xp_opt *hit = NULL;
    int nhit = 0;
    for (const xp_opt *o = c->opts; o->name; o++) {
        if (strncmp(o->name, name, len) != 0) continue;
        if (o->name[len] == '\0') return o;
        hit = o;
        nhit++;
    }
    *ambiguous = nhit > 1;
    return nhit == 1 ? hit : NULL;
}

int xp_cmd_parse(const xp_cmd *c, int argc, char **argv)
{
    unsigned char seen[128] = {0};
    int npos = 0, rc, only_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_pos || a[0] != '-' || a[1] == '\0') {
            if (npos == c->max_pos) return xp_cmd_usage_error(c, "unexpected argument \"%s\"", a);
            c->pos[npos++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            xp_print_help(c);
            return 0;
        }
        if (a[1] != '-') return xp_cmd_usage_error(c, "unknown option %s", a);
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        int ambiguous = 0;
        const xp_opt *o = xp_find(c, name, len, &ambiguous);
        if (!o)
            return xp_cmd_usage_error(c, "%s option --%.*s", ambiguous ? "ambiguous" : "unknown",
                                      (int)len, name);
        const char *v = NULL;
        if (o->kind == XP_OPT_FLAG) {
            if (eq) return xp_value_error(c, "--%s takes no value", o->name);
        } else if (eq) {
            v = eq + 1;
        } else if (i + 1 < argc) {
            v = argv[++i];
        } else {
            return xp_value_error(c, "--%s needs a value (%s)", o->name, o->arg ? o->arg : "");
        }
        if ((rc = xp_store(c, o, v)) >= 0) return rc;
        size_t k = (size_t)(o - c->opts);
        if (k < sizeof seen) seen[k] = 1;
    }
    for (const xp_opt *o = c->opts; o->name; o++) {
        size_t k = (size_t)(o - c->opts);
        if (o->required && k < sizeof seen && !seen[k])
            return xp_cmd_usage_error(c, "--%s %s is missing", o->name, o->arg ? o->arg : "");
    }
    if (c->npos) *c->npos = npos;
    return -1;
}
