/* metrics.h — a Prometheus metrics registry: families (counters, gauges, histograms) declared
 * with their help text and their merge rule, samples added by label, one text exposition.
 *
 * A registry is a snapshot: a program fills one from its own counters when it is scraped (its
 * collect function reads the structs where the hot path counts), renders it, and frees it. The
 * hot path never touches a registry; what it touches is a plain counter or a bt_hist.
 *
 * Several registries merge into one (a frontend with --threads N: one registry per event loop)
 * by each family's declared rule, sample by sample: adding a sample that a registry already
 * holds (same family, same labels) combines the two values by that rule. So the merge of N
 * snapshots and the collection of one are the same operation.
 *
 * Output (bt_metrics_render) is the text exposition format 0.0.4: every family has its # HELP
 * and # TYPE lines, even with no sample; samples follow their family's TYPE line in the order
 * they were first added; label values are escaped with bt_prom_escape. */
#ifndef BATON_METRICS_H
#define BATON_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/util.h"

typedef enum { BT_METRIC_COUNTER, BT_METRIC_GAUGE, BT_METRIC_HISTOGRAM } bt_metric_type;

/* How two values of one series combine (the --threads merge): SUM for counters, histograms and
 * gauges of a quantity each part holds (in-flight requests, connections); MIN or MAX for gauges
 * every part reads from the same source or that state a condition (connected = the minimum). */
typedef enum { BT_MERGE_SUM, BT_MERGE_MIN, BT_MERGE_MAX } bt_metric_merge;

/* A histogram's buckets: `n` ascending upper bounds; +Inf is implicit. */
#define BT_HIST_MAX_BUCKETS 24
typedef struct {
    const double *le;
    size_t n; /* at most BT_HIST_MAX_BUCKETS */
} bt_hist_buckets;

/* A histogram's counts, kept by the hot path: counts[i] observations in bucket i (not
 * cumulative), counts[buckets->n] above the last bound. Zero-initialised is empty. */
typedef struct {
    uint64_t counts[BT_HIST_MAX_BUCKETS + 1];
    double sum;
    uint64_t n;
} bt_hist;

/* Records `n` observations of value v: a binary search over the bounds, O(log buckets), no
 * allocation, inline in the caller (the frontend calls it once per batch of tokens). */
static inline void bt_hist_observe(bt_hist *h, const bt_hist_buckets *b, double v, uint64_t n) {
    size_t i = 0, hi = b->n; /* the first bound >= v (le: "less or equal"), or b->n for +Inf */
    while (i < hi) {
        size_t mid = (i + hi) / 2;
        if (v > b->le[mid]) i = mid + 1;
        else hi = mid;
    }
    h->counts[i] += n;
    h->sum += v * (double)n;
    h->n += n;
}

/* A family's declaration. The registry copies it, name and help included; the buckets must
 * outlive the registry (a static table). Names are the exposition's (a histogram's without
 * _bucket/_sum/_count). */
typedef struct {
    const char *name;
    const char *help;
    bt_metric_type type;
    bt_metric_merge merge;          /* counters and histograms: BT_MERGE_SUM */
    const bt_hist_buckets *buckets; /* histograms only */
} bt_metric_def;

typedef struct bt_metrics bt_metrics;
typedef struct bt_metric_family bt_metric_family;

/* NULL when out of memory. bt_metrics_free(NULL) is a no-op. */
bt_metrics *bt_metrics_new(void);
void bt_metrics_free(bt_metrics *r);

/* The family `def` declares (found by name), added at the end if the registry does not have it yet;
 * the first declaration's help and merge rule stay. NULL if out of memory (recorded:
 * bt_metrics_status), or if the registry already holds a family of that name with another type
 * or other buckets (BT_ERR_INVALID: a program bug, never two meanings for a name).
 * Adding a sample to a NULL family does nothing. */
bt_metric_family *bt_metrics_family(bt_metrics *r, const bt_metric_def *def);

/* The same, declared in place: a counter (merged by sum), a gauge with its merge rule, a histogram
 * over static buckets. */
static inline bt_metric_family *bt_metrics_counter(bt_metrics *r, const char *name, const char *help) {
    return bt_metrics_family(r, &(bt_metric_def){name, help, BT_METRIC_COUNTER, BT_MERGE_SUM, NULL});
}
static inline bt_metric_family *bt_metrics_gauge(bt_metrics *r, const char *name, bt_metric_merge merge,
                                                 const char *help) {
    return bt_metrics_family(r, &(bt_metric_def){name, help, BT_METRIC_GAUGE, merge, NULL});
}
static inline bt_metric_family *bt_metrics_histogram(bt_metrics *r, const char *name, const bt_hist_buckets *b,
                                                     const char *help) {
    return bt_metrics_family(r, &(bt_metric_def){name, help, BT_METRIC_HISTOGRAM, BT_MERGE_SUM, b});
}

/* Adds one sample of a counter or gauge (a double: counts are exact up to 2^53); the labels follow as (name, value) string pairs ended by
 * NULL, values unescaped. A sample whose labels the family already holds is combined with it by
 * the family's merge rule. */
void bt_metrics_add(bt_metric_family *f, double v, ...) __attribute__((sentinel));
/* The same for a histogram family: h's counts, sum and number of observations (over the
 * family's buckets) are added to the sample's. */
void bt_metrics_add_hist(bt_metric_family *f, const bt_hist *h, ...) __attribute__((sentinel));
/* A family of one unlabelled sample, declared and added to in one call: a counter, a gauge. */
void bt_metrics_counter_value(bt_metrics *r, const char *name, const char *help, double v);
void bt_metrics_gauge_value(bt_metrics *r, const char *name, bt_metric_merge merge, const char *help, double v);

/* Adds every family and sample of src to dst, sample by sample, by each family's rule. */
void bt_metrics_merge(bt_metrics *dst, const bt_metrics *src);

/* BT_OK, or the first failure (out of memory, a label string over its cap, a family declared
 * twice with two types) since the registry was made. */
bt_status bt_metrics_status(const bt_metrics *r);

/* Appends the text exposition of r to out; returns out's status. A registry whose status is not
 * BT_OK (or NULL) renders nothing and poisons out with that status (bt_buf_fail): a partial
 * exposition would read as counters that went down, so the caller's one check of out (such as
 * bt_http_respond_buf's) answers an error instead. */
bt_status bt_metrics_render(const bt_metrics *r, bt_buf *out);

#endif
