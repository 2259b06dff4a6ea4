/* budget.h — the retry budget: retries are capped as a share of recent traffic, so that a
 * fleet-wide fault does not multiply the load by the migration limit (a retry storm).
 *
 * Off unless --retry-budget is above 0 (both flags are also set at run time: POST /admission). A retry is a re-route before the request's first token
 * (its attempt failed before any token reached the client) or a repeat migration (a request that
 * has already moved once moves again). A stream moved by a rebalance (BT_ERR_MOVED) is never a
 * retry, and that move does not make its next one a repeat. A request's first migration mid-stream is not a retry: it
 * is what keeps a stream alive when its worker dies, and is never refused here. Over the last 10
 * seconds, retries may number at most max(--retry-budget-min, --retry-budget × requests started);
 * past that the request fails with its last error and the budget named in the message. One budget
 * per frontend thread; everything on the thread's loop. */
#ifndef BATON_FRONTEND_BUDGET_H
#define BATON_FRONTEND_BUDGET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/metrics.h"
#include "common/util.h"

#define FE_BUDGET_BUCKETS 10 /* seconds */

typedef struct fe fe;
typedef struct fe_req fe_req;

typedef struct {
    uint64_t started[FE_BUDGET_BUCKETS], retries[FE_BUDGET_BUCKETS];
    uint64_t sec;
    uint64_t count[2][2]; /* [new_request, repeat_migration][allowed, refused] */
} fe_budget;

/* A request's first attempt was sent. */
void fe_budget_started(fe *f);
/* r's attempt failed and r would be tried again: true if that is allowed (counted as a retry, or
 * not a retry at all); false with the reason in why (the request must fail). */
bool fe_budget_allow(fe_req *r, char *why, size_t whylen);
void fe_budget_collect(fe *f, bt_metrics *r);

#endif
