#include "util/json_util.h"
#include "util/xp_error.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* JSON allows a key twice; Python's json keeps the last, cJSON finds the first. Rather than
 * read a different model than transformers would, refuse it. Recurses into objects. */
int xp_json_check_unique(const cJSON *obj, const char *what)
{
    for (const cJSON *a = obj ? obj->child : NULL; a; a = a->next) {
        if (a->string)
            for (const cJSON *b = a->next; b; b = b->next)
                if (b->string && strcmp(a->string, b->string) == 0)
                    return xp_fail("%s: key \"%.100s\" appears twice", what, a->string);
        if ((cJSON_IsObject(a) || cJSON_IsArray(a)) && xp_json_check_unique(a, what) < 0) return -1;
    }
    return 0;
}

/* Shortest of %.15g..%.17g that strtod reads back exactly; 17 digits always do. JSON has no
 * NaN or infinity: they become null, as cJSON writes them. */
static void xp_json_number_text(double d, char buf[32])
{
    if (!isfinite(d)) {
        strcpy(buf, "null");
        return;
    }
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(buf, 32, "%.*g", digits, d);
        if (strtod(buf, NULL) == d) return;
    }
}

static int xp_json_exact_numbers(cJSON *node)
{
    for (cJSON *it = node->child, *next; it; it = next) {
        next = it->next;
        if (cJSON_IsObject(it) || cJSON_IsArray(it)) {
            if (xp_json_exact_numbers(it) < 0) return -1;
        } else if (cJSON_IsNumber(it)) {
            char buf[32];
            xp_json_number_text(it->valuedouble, buf);
            cJSON *raw = cJSON_CreateRaw(buf);
            if (!raw) return -1;
            /* the key moves to the replacement, which the parent then owns */
            raw->string = it->string;
            raw->type |= it->type & cJSON_StringIsConst;
            it->string = NULL;
            cJSON_ReplaceItemViaPointer(node, it, raw);
        }
    }
    return 0;
}

char *xp_json_print(cJSON *root, int formatted)
{
    if (!root || xp_json_exact_numbers(root) < 0) return NULL;
    return formatted ? cJSON_Print(root) : cJSON_PrintUnformatted(root);
}
