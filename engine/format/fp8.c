#include "format/fp8.h"

#include <math.h>

/* value = (-1)^s * (e == 0 ? m/8 * 2^-6 : (1 + m/8) * 2^(e-7)), e = bits 6..3, m = bits 2..0 */
#define XP_E4M3_MAG(c)                                                                             \
    ((((c) >> 3) & 15) == 0 ? (float)((c) & 7) / 512.0f                                           \
                            : (float)(8 + ((c) & 7)) * (float)(1u << (((c) >> 3) & 15)) / 1024.0f)
#define XP_E4M3(c) (((c) & 0x7f) == 0x7f ? NAN : ((c) & 0x80 ? -XP_E4M3_MAG(c) : XP_E4M3_MAG(c)))
#define XP_E4M3_4(c) XP_E4M3(c), XP_E4M3(c + 1), XP_E4M3(c + 2), XP_E4M3(c + 3)
#define XP_E4M3_16(c) XP_E4M3_4(c), XP_E4M3_4(c + 4), XP_E4M3_4(c + 8), XP_E4M3_4(c + 12)
#define XP_E4M3_64(c) XP_E4M3_16(c), XP_E4M3_16(c + 16), XP_E4M3_16(c + 32), XP_E4M3_16(c + 48)

const float xp_fp8_e4m3_table[256] = {XP_E4M3_64(0), XP_E4M3_64(64), XP_E4M3_64(128),
                                      XP_E4M3_64(192)};
