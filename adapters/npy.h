/* NumPy .npy files (format 1.0) of float32 matrices, written row block by row block. */
#ifndef XP_NPY_H
#define XP_NPY_H

#include <stdint.h>
#include <stdio.h>

/* Opens path and writes the header of a C-order float32 array [rows, cols]. */
FILE *xp_npy_create(const char *path, int64_t rows, int64_t cols);
/* Appends n floats; closes with fclose (check its result). */
int xp_npy_append(FILE *fp, const float *data, size_t n);

#endif
