/* One-token requests straight through the engine API, one after another: the latency a caller
 * of libxprec sees (submit -> DONE), p50 and p99, to compare with the same requests through the
 * gateway. usage: engine_latency MODEL_DIR N [PROMPT] */
#include "xprec.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: engine_latency MODEL_DIR N [PROMPT]\n");
        return 2;
    }
    int n = atoi(argv[2]);
    const char *prompt = argc > 3 ? argv[3] : "hi";
    xp_engine_opts o = {.threads = 2, .kv_bytes = 64u << 20};
    xp_engine *e = xp_engine_create(argv[1], &o);
    xp_queue *q = xp_queue_create();
    if (!e || !q || n < 1) {
        fprintf(stderr, "engine_latency: %s\n", xp_last_error());
        return 1;
    }
    double *lat = malloc((size_t)n * sizeof *lat);
    for (int i = -10; i < n; i++) { /* ten to warm up */
        xp_request r = {.prompt = prompt, .max_tokens = 1};
        double t0 = now_ms();
        uint64_t id = xp_engine_submit(e, &r, q);
        for (;;) {
            xp_event ev;
            xp_queue_wait(q, &ev, -1);
            int end = ev.id == id && (ev.type == XP_EV_DONE || ev.type == XP_EV_ERROR);
            xp_event_clear(&ev);
            if (end) break;
        }
        if (i >= 0) lat[i] = now_ms() - t0;
    }
    qsort(lat, (size_t)n, sizeof *lat, cmp);
    printf("engine direct: %d one-token requests, p50 %.3f ms, p99 %.3f ms\n", n, lat[n / 2],
           lat[(int)(n * 0.99)]);
    xp_engine_destroy(e);
    xp_queue_destroy(q);
    free(lat);
    return 0;
}
