/* Event queues: a locked list plus an eventfd that stays readable while the list is non-empty. */
#include "serve/queue.h"
#include "util/xp_error.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct xp_qnode {
    xp_event ev;
    struct xp_qnode *next;
} xp_qnode;

struct xp_queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    xp_qnode *head, *tail;
    int fd;
};

xp_queue *xp_queue_create(void)
{
    xp_queue *q = calloc(1, sizeof *q);
    if (!q) {
        xp_fail("out of memory");
        return NULL;
    }
    q->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->fd < 0) {
        xp_fail("eventfd: %s", strerror(errno));
        free(q);
        return NULL;
    }
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    return q;
}

void xp_queue_destroy(xp_queue *q)
{
    if (!q) return;
    for (xp_qnode *n = q->head, *next; n; n = next) {
        next = n->next;
        xp_event_clear(&n->ev);
        free(n);
    }
    close(q->fd);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    free(q);
}

int xp_queue_fd(const xp_queue *q)
{
    return q->fd;
}

int xp_queue_push(xp_queue *q, xp_event *ev)
{
    xp_qnode *n = malloc(sizeof *n);
    if (!n) {
        xp_event_clear(ev);
        return -1;
    }
    n->ev = *ev;
    n->next = NULL;
    pthread_mutex_lock(&q->mu);
    if (q->tail)
        q->tail->next = n;
    else
        q->head = n;
    q->tail = n;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    uint64_t one = 1;
    /* fails only when the counter would overflow, and then it is readable anyway */
    if (write(q->fd, &one, sizeof one) < 0) { /* nothing to do */
    }
    return 0;
}

static int xp_queue_take(xp_queue *q, xp_event *ev)
{
    xp_qnode *n = q->head;
    if (!n) return 0;
    q->head = n->next;
    if (!q->head) {
        q->tail = NULL;
        uint64_t v;
        /* drained: reset the counter so pollers sleep until the next push */
        if (read(q->fd, &v, sizeof v) < 0) { /* EAGAIN: already zero */
        }
    }
    *ev = n->ev;
    free(n);
    return 1;
}

int xp_queue_pop(xp_queue *q, xp_event *ev)
{
    pthread_mutex_lock(&q->mu);
    int got = xp_queue_take(q, ev);
    pthread_mutex_unlock(&q->mu);
    return got;
}

int xp_queue_wait(xp_queue *q, xp_event *ev, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    if (timeout_ms > 0) {
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&q->mu);
    while (!q->head && timeout_ms != 0) {
        if (timeout_ms < 0)
            pthread_cond_wait(&q->cv, &q->mu);
        else if (pthread_cond_timedwait(&q->cv, &q->mu, &until) == ETIMEDOUT)
            break;
    }
    int got = xp_queue_take(q, ev);
    pthread_mutex_unlock(&q->mu);
    return got;
}

void xp_event_clear(xp_event *ev)
{
    free(ev->text);
    free(ev->error);
    free(ev->logprobs);
    free(ev->prompt_ids);
    free(ev->prompt_logprobs);
    memset(ev, 0, sizeof *ev);
}
