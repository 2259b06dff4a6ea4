/* outlier.c — outlier ejection (see outlier.h for the contract, docs/load-shedding.md for the
 * flags). A worker is judged when one of its samples arrives, at most every CHECK_MS: against the
 * median of its model's other workers, so that a two-worker fleet can still find its slow one. */
#include "frontend/outlier.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/metrics.h"
#include "frontend/fe.h"

#define CHECK_MS 200
#define STREAK_MAX 4 /* the back-off doubles at most 4 times: 16x */

static const char *const signal_names[2] = {"time to first token", "inter-token latency"};

static bool on(const fe *f) { return fe_admit_outlier_factor(f) > 1.0; }

/* Moves w's ring to the second of now_ms, clearing the seconds skipped. */
static void roll(fe_outlier *o, uint64_t now_ms) {
    uint64_t sec = now_ms / 1000;
    if (!o->sec) o->sec = sec;
    if (sec <= o->sec) return;
    for (uint64_t i = 1; i <= sec - o->sec && i <= FE_OUTLIER_BUCKETS; i++)
        for (int k = 0; k < 2; k++) {
            o->sum[k][(o->sec + i) % FE_OUTLIER_BUCKETS] = 0;
            o->n[k][(o->sec + i) % FE_OUTLIER_BUCKETS] = 0;
        }
    o->sec = sec;
}

/* The mean of signal k over the window and its sample count (after roll). */
static double mean(const fe *f, const fe_outlier *o, int k, uint64_t *n) {
    int window = (int)fe_admit_outlier_window(f); /* changed at run time by POST /admission */
    if (window > FE_OUTLIER_BUCKETS) window = FE_OUTLIER_BUCKETS;
    double s = 0;
    uint64_t c = 0;
    for (int i = 0; i < window; i++) {
        size_t b = (size_t)((o->sec + FE_OUTLIER_BUCKETS - (uint64_t)i) % FE_OUTLIER_BUCKETS);
        s += o->sum[k][b];
        c += o->n[k][b];
    }
    *n = c;
    return c ? s / (double)c : 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* How many of m's workers may be ejected at once with `routable` of them routable: the share
 * --outlier-max-ejected of those, at least one with two or more, none with fewer. Counted over the
 * routable ones, not every worker filed: a dead worker serves nobody, so it cannot stand in for
 * the ones taken out of rotation. */
static size_t cap_of(const fe *f, size_t routable) {
    if (routable < 2) return 0;
    size_t cap = (size_t)floor(fe_admit_outlier_max_ejected(f) * (double)routable + 1e-9);
    return cap < 1 ? 1 : cap;
}

/* Of m's workers, how many are routable and how many of those are ejected. */
static void count(const fe_model *m, size_t *routable, size_t *ejected) {
    *routable = *ejected = 0;
    for (size_t i = 0; i < m->nws; i++) {
        const fe_worker *x = m->ws[i];
        if (!fe_worker_routable(x)) continue;
        (*routable)++;
        *ejected += x->outlier.ejected_until_ms != 0;
    }
}

/* Puts w back in rotation with an empty window: the requests routed to it are its probe. */
static void readmit(fe_worker *w) {
    fe_outlier *o = &w->outlier;
    o->ejected_until_ms = 0;
    o->readmissions++;
    o->probation = true;
    memset(o->sum, 0, sizeof o->sum);
    memset(o->n, 0, sizeof o->n);
}

static void judge(fe *f, fe_worker *w, uint64_t now) {
    fe_model *m = w->mdl;
    if (!m || w->outlier.ejected_until_ms) return;
    size_t routable, nejected;
    count(m, &routable, &nejected);
    if (routable < 2) return; /* the only worker left is never ejected, however slow */
    uint64_t min = (uint64_t)fe_admit_outlier_min_samples(f);
    double factor = fe_admit_outlier_factor(f); /* changed at run time by POST /admission */
    for (int k = 0; k < 2; k++) {
        uint64_t n;
        roll(&w->outlier, now);
        double mine = mean(f, &w->outlier, k, &n);
        if (n < min) continue;
        double others[64];
        size_t no = 0;
        for (size_t i = 0; i < m->nws && no < 64; i++) {
            fe_worker *x = m->ws[i];
            if (x == w || x->outlier.ejected_until_ms || !fe_worker_routable(x)) continue;
            uint64_t xn;
            roll(&x->outlier, now);
            double xm = mean(f, &x->outlier, k, &xn);
            if (xn >= min) others[no++] = xm;
        }
        if (no == 0) continue;
        qsort(others, no, sizeof *others, cmp_double);
        double med = no % 2 ? others[no / 2] : (others[no / 2 - 1] + others[no / 2]) / 2;
        if (!(mine > factor * med && mine - med > 0.001)) continue; /* 1 ms: below is noise */
        size_t cap = cap_of(f, routable);
        if (nejected + 1 > cap) {
            BT_WARN("worker %" PRIx64 ": %s %.1f ms is %.1fx the fleet's median %.1f ms, but %zu of %zu routable "
                    "workers are ejected already (cap %zu): it stays in rotation",
                    w->id, signal_names[k], mine * 1e3, mine / med, med * 1e3, nejected, routable, cap);
            return;
        }
        uint32_t streak = w->outlier.streak < STREAK_MAX ? w->outlier.streak : STREAK_MAX;
        uint64_t backoff = (uint64_t)(fe_admit_outlier_backoff(f) * 1000.0) << streak;
        w->outlier.ejected_until_ms = now + backoff;
        w->outlier.streak++;
        w->outlier.probation = false;
        w->outlier.ejections++;
        BT_WARN("worker %" PRIx64 " (%s) ejected from routing for %.1f s: %s %.1f ms over %" PRIu64
                " samples is %.1fx the median %.1f ms of %zu other workers (ejection %u in a row)",
                w->id, w->transport, (double)backoff / 1000.0, signal_names[k], mine * 1e3, n, mine / med, med * 1e3,
                no, w->outlier.streak);
        return;
    }
    if (w->outlier.probation) { /* judged on fresh samples and not an outlier: the probe passed */
        uint64_t n0, n1;
        mean(f, &w->outlier, 0, &n0);
        mean(f, &w->outlier, 1, &n1);
        if (n0 >= min || n1 >= min) {
            w->outlier.probation = false;
            w->outlier.streak = 0;
            BT_INFO("worker %" PRIx64 ": passed its probe after readmission; back-off reset", w->id);
        }
    }
}

static void observe(fe *f, fe_worker *w, int k, double v, size_t n) {
    if (!on(f) || !(v >= 0)) return;
    uint64_t now = bt_now_ms();
    fe_outlier *o = &w->outlier;
    roll(o, now);
    o->sum[k][o->sec % FE_OUTLIER_BUCKETS] += v * (double)n;
    o->n[k][o->sec % FE_OUTLIER_BUCKETS] += n;
    if (now - o->last_check_ms < CHECK_MS) return;
    o->last_check_ms = now;
    judge(f, w, now);
}

void fe_outlier_first_token(fe *f, fe_worker *w, double ttft_s) { observe(f, w, 0, ttft_s, 1); }

void fe_outlier_tokens(fe *f, fe_worker *w, double gap_s, size_t n) {
    if (n) observe(f, w, 1, gap_s / (double)n, n);
}

bool fe_outlier_ejected(fe *f, fe_worker *w) {
    fe_outlier *o = &w->outlier;
    if (!o->ejected_until_ms) return false;
    if (!on(f) || bt_now_ms() >= o->ejected_until_ms) { /* back in rotation, judged afresh */
        readmit(w);
        BT_INFO("worker %" PRIx64 " (%s) readmitted to routing after its back-off; on probation", w->id, w->transport);
        return false;
    }
    return true;
}

void fe_outlier_fleet_changed(fe *f, fe_worker *w, const char *why) {
    fe_model *m = w->mdl;
    if (!m || f->shutting_down) return; /* every connection closes then: nothing is routed again */
    size_t routable, nejected;
    count(m, &routable, &nejected);
    if (!nejected) return;
    size_t cap = cap_of(f, routable);
    /* the ejected may be all that is left routable (a cap of 1.0, or the last one standing): one
     * of them serves rather than none */
    size_t keep = nejected >= routable ? routable - 1 : nejected;
    if (keep > cap) keep = cap;
    while (nejected > keep) { /* the one whose back-off ends first was due back soonest */
        fe_worker *first = NULL;
        for (size_t i = 0; i < m->nws; i++) {
            fe_worker *x = m->ws[i];
            if (!x->outlier.ejected_until_ms || !fe_worker_routable(x)) continue;
            if (!first || x->outlier.ejected_until_ms < first->outlier.ejected_until_ms) first = x;
        }
        if (!first) break;
        uint64_t now = bt_now_ms();
        double left = first->outlier.ejected_until_ms > now ? (double)(first->outlier.ejected_until_ms - now) / 1e3 : 0;
        readmit(first);
        nejected--;
        BT_WARN("worker %" PRIx64 " (%s) readmitted to routing %.1f s before the end of its back-off: worker %" PRIx64
                " of '%s' %s, leaving %zu routable, of which %zu may be ejected and %zu were; on probation",
                first->id, first->transport, left, w->id, m->name, why, routable, cap, nejected + 1);
    }
}

void fe_outlier_collect(fe *f, bt_metrics *r) {
    char id[24];
    bt_metric_family *ej = bt_metrics_gauge(r, "baton_frontend_worker_ejected", BT_MERGE_MAX,
                                            "1 while the worker is ejected as a latency outlier");
    bt_metric_family *ejt =
        bt_metrics_counter(r, "baton_frontend_worker_ejections_total", "Ejections of the worker as a latency outlier");
    bt_metric_family *rd = bt_metrics_counter(r, "baton_frontend_worker_readmissions_total",
                                              "Readmissions after an ejection's back-off");
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
        snprintf(id, sizeof id, "%" PRIx64, w->id);
        bt_metrics_add(ej, w->outlier.ejected_until_ms ? 1.0 : 0.0, "model", w->model, "worker_id", id, NULL);
        bt_metrics_add(ejt, (double)w->outlier.ejections, "model", w->model, "worker_id", id, NULL);
        bt_metrics_add(rd, (double)w->outlier.readmissions, "model", w->model, "worker_id", id, NULL);
    }
}
