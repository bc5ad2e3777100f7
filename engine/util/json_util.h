/* cJSON helpers shared by every reader and writer of JSON files. */
#ifndef XP_JSON_UTIL_H
#define XP_JSON_UTIL_H

struct cJSON;

/* -1 (error naming `what` and the key) if any object in the tree repeats a key. */
int xp_json_check_unique(const struct cJSON *obj, const char *what);

/* Prints the tree like cJSON_Print (formatted) or cJSON_PrintUnformatted, but with every number
 * written in the shortest form that reads back to the same double. cJSON alone prints 15 digits
 * and accepts them when they are within an epsilon, so a value can move by an ulp per rewrite.
 * Numbers in the tree become raw text. Returns a malloc'd string, or NULL out of memory. */
char *xp_json_print(struct cJSON *root, int formatted);

#endif
