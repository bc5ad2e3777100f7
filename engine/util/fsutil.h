/* Small file-system helpers shared by the format readers. */
#ifndef XP_FSUTIL_H
#define XP_FSUTIL_H

#include <stddef.h>

/* Reads a whole small file (config, index, tokenizer): malloc'd and NUL-terminated; NULL with an
 * error naming the file when missing, unreadable or over max_bytes. */
char *xp_read_text_file(const char *path, size_t max_bytes);

/* "dir/name", malloc'd. */
char *xp_path_join(const char *dir, const char *name);

#endif
