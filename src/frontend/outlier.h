/* outlier.h — outlier ejection on LLM signals: a worker whose time to first token or inter-token
 * latency is far worse than the rest of its model's fleet is taken out of routing for a back-off
 * period, then readmitted on probation (docs/load-shedding.md, "Outlier ejection").
 *
 * Off unless --outlier-factor (or `outlier_factor` set by POST /admission) is above 1; the other
 * limits below are also set at run time there (admit.h). Each worker keeps, over the last --outlier-window
 * seconds, the mean TTFT of the attempts it started and the mean inter-token latency of its
 * streams. A worker with at least --outlier-min-samples of a signal whose mean is more than
 * factor × the median of the other workers' means (those not ejected, with enough samples of their
 * own) is ejected: routing skips it for --outlier-backoff seconds, doubled for each consecutive
 * ejection (at most 16x). Streams already on it go on (ejection only affects new attempts). Never
 * more than --outlier-max-ejected of a model's routable workers are ejected at once (at least one
 * may be, with two or more; none with one): when workers die or leave, ejected ones are readmitted
 * early to keep it so (fe_outlier_fleet_changed). When its back-off ends the worker is readmitted with an empty window:
 * the requests routed to it are the probe, and it is judged again once it has enough samples; a
 * probe that passes resets the back-off. Everything runs on the shard's loop; the worker's window
 * lives in its fe_worker. */
#ifndef BATON_FRONTEND_OUTLIER_H
#define BATON_FRONTEND_OUTLIER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/metrics.h"
#include "common/util.h"

#define FE_OUTLIER_BUCKETS 30 /* one per second: the longest window */

typedef struct fe fe;
typedef struct fe_worker fe_worker;

typedef struct {
    double sum[2][FE_OUTLIER_BUCKETS]; /* [0] TTFT, [1] inter-token latency, seconds */
    uint64_t n[2][FE_OUTLIER_BUCKETS];
    uint64_t sec;              /* the second of the newest bucket (0 = none yet) */
    uint64_t last_check_ms;
    uint64_t ejected_until_ms; /* 0 = in rotation */
    uint32_t streak;           /* consecutive ejections without a passed probe */
    bool probation;            /* readmitted, not yet judged again */
    uint64_t ejections, readmissions;
} fe_outlier;

/* An attempt on w delivered its first token ttft_s after it was sent. */
void fe_outlier_first_token(fe *f, fe_worker *w, double ttft_s);
/* n more tokens arrived on one of w's streams, gap_s after the previous ones. */
void fe_outlier_tokens(fe *f, fe_worker *w, double gap_s, size_t n);
/* Whether routing must skip w now; readmits it when its back-off has ended. */
bool fe_outlier_ejected(fe *f, fe_worker *w);
/* w stopped or started being routable (why: what happened to it, for the log line). Readmits
 * ejected workers of its model, the earliest back-off end first, while more are ejected than the
 * cap allows of the routable ones, or while no routable worker of the model is left in rotation:
 * the cap holds at every moment, not only when a worker is ejected. O(workers of the model). */
void fe_outlier_fleet_changed(fe *f, fe_worker *w, const char *why);
/* Per-worker families for /metrics (metrics.c). */
void fe_outlier_collect(fe *f, bt_metrics *r);

#endif
