/* The engine's side of event queues (xprec.h has the caller's). */
#ifndef XP_QUEUE_H
#define XP_QUEUE_H

#include "xprec.h"

/* Appends ev, taking ownership of what it points to; -1 (ev freed) out of memory. */
int xp_queue_push(xp_queue *q, xp_event *ev);

#endif
