/* Error reporting for libxprec: each failing call returns -1 (or NULL) and leaves a message in a
 * thread-local buffer, so callers on any thread can report exactly what went wrong. */
#ifndef XP_ERROR_H
#define XP_ERROR_H

#if defined(__GNUC__)
#define XP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define XP_PRINTF(a, b)
#endif

/* Sets the message and returns -1, so a failure reads `return xp_fail("...", ...);`. */
int xp_fail(const char *fmt, ...) XP_PRINTF(1, 2);

/* Prefixes the current message with context ("model.safetensors: " + message); returns -1. */
int xp_fail_ctx(const char *fmt, ...) XP_PRINTF(1, 2);

/* The last message set on this thread ("" if none). */
const char *xp_last_error(void);

void xp_clear_error(void);

#endif
