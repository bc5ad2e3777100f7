/* Encode throughput of the C tokenizer on one text file: the first pass (cold word cache), the
 * best of the next passes, the text as many requests of about 2 KB (cut at blank lines, as a
 * gateway sees prompts), and the text cut into equal parts on several threads at once.
 * Single-thread figures are given per wall-clock second and per CPU second of the encoding
 * thread; the second holds steady on a machine that other work is sharing.
 * Prints the id count and a checksum so the ids can be compared with the npm package's.
 * usage: tokenizer_bench MODEL_DIR TEXT_FILE [PASSES] [THREADS]  (built by bench/tokenizer.sh) */
#include "tokenizer/tokenizer.h"
#include "util/xp_error.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const xp_tokenizer *tok;
    const char *text;
    size_t len, n;
    uint64_t sum;
    double cpu; /* seconds of this thread's CPU time spent encoding */
} part;

static void *encode_part(void *arg)
{
    part *p = arg;
    int32_t *ids;
    double c0 = cpu_now();
    if (xp_tokenizer_encode(p->tok, p->text, p->len, 1, &ids, &p->n)) {
        fprintf(stderr, "encode: %s\n", xp_last_error());
        exit(1);
    }
    p->cpu = cpu_now() - c0;
    /* order-sensitive checksum, the same formula as tokenizer_bench.mjs */
    p->sum = 0;
    for (size_t i = 0; i < p->n; i++) p->sum = (p->sum * 31 + (uint64_t)ids[i]) % 1000000007u;
    free(ids);
    return NULL;
}

/* Seconds to encode text cut into nt parts (at line ends) on nt threads; *cpu gets the CPU
 * seconds of all the threads together. */
static double run_threads(const xp_tokenizer *tok, const char *text, size_t len, int nt,
                          double *cpu)
{
    part parts[64];
    pthread_t th[64];
    size_t start = 0;
    for (int i = 0; i < nt; i++) {
        size_t end = i + 1 == nt ? len : len * (size_t)(i + 1) / (size_t)nt;
        while (end < len && text[end - 1] != '\n') end++;
        parts[i] = (part){tok, text + start, end - start, 0, 0, 0};
        start = end;
    }
    double t0 = now();
    for (int i = 0; i < nt; i++) pthread_create(&th[i], NULL, encode_part, &parts[i]);
    for (int i = 0; i < nt; i++) pthread_join(th[i], NULL);
    double wall = now() - t0;
    *cpu = 0;
    for (int i = 0; i < nt; i++) *cpu += parts[i].cpu;
    return wall;
}

/* Seconds to encode the text as requests of at least 2 KB each, cut after a blank line; *cpu
 * gets the CPU seconds and *count the number of requests. */
static double run_requests(const xp_tokenizer *tok, const char *text, size_t len, double *cpu,
                           size_t *count)
{
    double t0 = now();
    *cpu = 0;
    *count = 0;
    for (size_t start = 0; start < len;) {
        size_t end = start + 2048 < len ? start + 2048 : len;
        const char *blank = end < len ? strstr(text + end, "\n\n") : NULL;
        end = blank ? (size_t)(blank - text) + 2 : len;
        part p = {tok, text + start, end - start, 0, 0, 0};
        encode_part(&p);
        *cpu += p.cpu;
        ++*count;
        start = end;
    }
    return now() - t0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR TEXT_FILE [PASSES] [THREADS]\n", argv[0]);
        return 2;
    }
    int passes = argc > 3 ? atoi(argv[3]) : 5, threads = argc > 4 ? atoi(argv[4]) : 2;
    if (threads < 1 || threads > 64 || passes < 2) return 2;
    FILE *fp = fopen(argv[2], "rb");
    if (!fp) {
        perror(argv[2]);
        return 1;
    }
    fseek(fp, 0, SEEK_END);
    size_t len = (size_t)ftell(fp);
    rewind(fp);
    char *text = malloc(len + 1);
    if (!text || fread(text, 1, len, fp) != len) return 1;
    fclose(fp);
    double t0 = now();
    xp_tokenizer *tok = xp_tokenizer_load(argv[1]);
    if (!tok) {
        fprintf(stderr, "load: %s\n", xp_last_error());
        return 1;
    }
    printf("load: %.2f s\n", now() - t0);
    part whole = {tok, text, len, 0, 0, 0};
    t0 = now();
    encode_part(&whole);
    double cold = now() - t0, cold_cpu = whole.cpu, best = 1e9, best_cpu = 1e9;
    for (int i = 1; i < passes; i++) {
        t0 = now();
        encode_part(&whole);
        double t = now() - t0;
        if (t < best) best = t;
        if (whole.cpu < best_cpu) best_cpu = whole.cpu;
    }
    double rq = 1e9, rq_cpu = 1e9;
    size_t nreq = 0;
    for (int i = 1; i < passes; i++) {
        double cpu, t = run_requests(tok, text, len, &cpu, &nreq);
        if (t < rq) rq = t;
        if (cpu < rq_cpu) rq_cpu = cpu;
    }
    double mt = 1e9, mt_cpu = 1e9;
    for (int i = 1; i < passes; i++) {
        double cpu, t = run_threads(tok, text, len, threads, &cpu);
        if (t < mt) mt = t;
        if (cpu < mt_cpu) mt_cpu = cpu;
    }
    printf("text: %.2f MB, %zu ids, checksum %llu\n", (double)len / 1e6, whole.n,
           (unsigned long long)whole.sum);
    double mb = (double)len / 1e6;
    printf("C encode, 1 thread, first pass: %.1f MB/s wall, %.1f MB/s per CPU second\n",
           mb / cold, mb / cold_cpu);
    printf("C encode, 1 thread, best of %d: %.1f MB/s wall, %.1f MB/s per CPU second\n",
           passes - 1, mb / best, mb / best_cpu);
    printf("C encode, %zu requests of ~%.1f KB, best of %d: %.1f MB/s wall, %.1f MB/s per CPU "
           "second, %.0f us per request\n",
           nreq, (double)len / (double)nreq / 1e3, passes - 1, mb / rq, mb / rq_cpu,
           rq / (double)nreq * 1e6);
    printf("C encode, %d threads, best of %d: %.1f MB/s wall, %.1f MB/s per CPU second of all "
           "threads\n",
           threads, passes - 1, mb / mt, mb / mt_cpu);
    xp_tokenizer_free(tok);
    free(text);
    return 0;
}
