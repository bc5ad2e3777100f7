#include "util/xp_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define XP_ERROR_MAX 1024

static _Thread_local char xp_error_buf[XP_ERROR_MAX];

int xp_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(xp_error_buf, sizeof xp_error_buf, fmt, ap);
    va_end(ap);
    return -1;
}

int xp_fail_ctx(const char *fmt, ...)
{
    char prefix[XP_ERROR_MAX], old[XP_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, xp_error_buf, sizeof old);
    /* truncation is fine: the message just ends early */
    size_t n = strlen(prefix);
    if (n > sizeof xp_error_buf - 3) n = sizeof xp_error_buf - 3;
    memcpy(xp_error_buf, prefix, n);
    memcpy(xp_error_buf + n, ": ", 2);
    size_t m = strlen(old), room = sizeof xp_error_buf - n - 3;
    if (m > room) m = room;
    memcpy(xp_error_buf + n + 2, old, m);
    xp_error_buf[n + 2 + m] = '\0';
    return -1;
}

const char *xp_last_error(void)
{
    return xp_error_buf;
}

void xp_clear_error(void)
{
    xp_error_buf[0] = '\0';
}
