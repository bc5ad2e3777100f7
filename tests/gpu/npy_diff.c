/* npy_diff A.npy B.npy [TOL]: max |a - b| / max |a| of two float32 .npy files of the same size
 * (xprec score on the CPU and on CUDA); exit 0 within TOL (default 1e-2), 1 otherwise. Small,
 * so the GPU machine needs no Python. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float *npy_read(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    unsigned char h[12];
    if (!f || fread(h, 1, 10, f) != 10 || memcmp(h, "\x93NUMPY", 6) != 0) {
        fprintf(stderr, "npy_diff: %s is not a .npy file\n", path);
        if (f) fclose(f);
        return NULL;
    }
    long hl = h[8] | h[9] << 8, start = 10 + hl;
    if (h[6] >= 2) { /* version 2+: 4-byte header length */
        if (fread(h + 10, 1, 2, f) != 2) hl = -1;
        else hl = (long)h[8] | (long)h[9] << 8 | (long)h[10] << 16 | (long)h[11] << 24;
        start = 12 + hl;
    }
    fseek(f, 0, SEEK_END);
    long end = ftell(f);
    if (hl < 0 || end < start) {
        fclose(f);
        return NULL;
    }
    *n = (size_t)(end - start) / sizeof(float);
    float *v = malloc(*n * sizeof *v + 1);
    fseek(f, start, SEEK_SET);
    if (!v || fread(v, sizeof *v, *n, f) != *n) {
        free(v);
        v = NULL;
    }
    fclose(f);
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: npy_diff A.npy B.npy [TOL]\n");
        return 2;
    }
    double tol = argc > 3 ? atof(argv[3]) : 1e-2;
    size_t na = 0, nb = 0;
    float *a = npy_read(argv[1], &na), *b = npy_read(argv[2], &nb);
    if (!a || !b || na != nb) {
        fprintf(stderr, "npy_diff: unreadable or different sizes\n");
        return 2;
    }
    double amax = 0, err = 0;
    for (size_t i = 0; i < na; i++) {
        if (fabs(a[i]) > amax) amax = fabs(a[i]);
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= err)) err = d;
    }
    double rel = amax > 0 ? err / amax : err;
    printf("npy_diff: %zu values, rel err %.3g (tolerance %.g)\n", na, rel, tol);
    free(a);
    free(b);
    return rel <= tol ? 0 : 1;
}
