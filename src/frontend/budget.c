/* budget.c — the retry budget (see budget.h). Two rings of per-second counts over the last
 * FE_BUDGET_BUCKETS seconds: requests started and retries allowed. */
#include "frontend/budget.h"

#include <inttypes.h>
#include <stdio.h>

#include "common/log.h"
#include "common/metrics.h"
#include "frontend/fe.h"

static const char *const kind_names[2] = {"new_request", "repeat_migration"};

static void roll(fe_budget *b, uint64_t now_ms) {
    uint64_t sec = now_ms / 1000;
    if (!b->sec) b->sec = sec;
    if (sec <= b->sec) return;
    for (uint64_t i = 1; i <= sec - b->sec && i <= FE_BUDGET_BUCKETS; i++) {
        b->started[(b->sec + i) % FE_BUDGET_BUCKETS] = 0;
        b->retries[(b->sec + i) % FE_BUDGET_BUCKETS] = 0;
    }
    b->sec = sec;
}

void fe_budget_started(fe *f) {
    roll(&f->budget, bt_now_ms());
    f->budget.started[f->budget.sec % FE_BUDGET_BUCKETS]++;
}

bool fe_budget_allow(fe_req *r, char *why, size_t whylen) {
    fe *f = r->fe;
    bool reroute = r->nids == 0;          /* nothing reached the client yet */
    /* it has moved mid-stream before, other than by a rebalance or a draining worker's refusal
     * before it ran (neither is a failure) */
    bool repeat = !reroute && r->attempts - r->moves - r->declined >= 2;
    double share = fe_admit_retry_budget(f); /* changed at run time by POST /admission */
    int64_t floor_n = fe_admit_retry_budget_min(f);
    if (share <= 0 || (!reroute && !repeat)) return true;
    fe_budget *b = &f->budget;
    roll(b, bt_now_ms());
    uint64_t started = 0, retries = 0;
    for (int i = 0; i < FE_BUDGET_BUCKETS; i++) started += b->started[i], retries += b->retries[i];
    double cap = share * (double)started;
    if (cap < (double)floor_n) cap = (double)floor_n;
    int kind = reroute ? 0 : 1;
    if ((double)(retries + 1) > cap) {
        b->count[kind][1]++;
        snprintf(why, whylen, "retry budget exhausted: %" PRIu64 " retries for %" PRIu64 " requests in the last %d s "
                 "(budget %g of requests, at least %lld)",
                 retries, started, FE_BUDGET_BUCKETS, share, (long long)floor_n);
        /* a retry storm is many requests at once: a few lines a second, each saying how many were
         * not written (baton_frontend_retry_budget_total counts every refusal) */
        static _Thread_local bt_log_limit lim[2];
        unsigned unsaid = 0;
        if (bt_log_limit_take(&lim[kind], bt_now_ms(), 5, &unsaid)) {
            if (unsaid)
                BT_WARN("request %s: %s retry refused: %s (%u more refused since the last such line, not logged)",
                        r->rid, kind_names[kind], why, unsaid);
            else BT_WARN("request %s: %s retry refused: %s", r->rid, kind_names[kind], why);
        }
        return false;
    }
    b->count[kind][0]++;
    b->retries[b->sec % FE_BUDGET_BUCKETS]++;
    return true;
}

void fe_budget_collect(fe *f, bt_metrics *r) {
    bt_metric_family *fam =
        bt_metrics_counter(r, "baton_frontend_retry_budget_total", "Retries the retry budget allowed or refused");
    for (int k = 0; k < 2; k++)
        for (int d = 0; d < 2; d++)
            bt_metrics_add(fam, (double)f->budget.count[k][d], "kind", kind_names[k], "decision",
                           d ? "refused" : "allowed", NULL);
}
