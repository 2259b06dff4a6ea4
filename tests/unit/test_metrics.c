/* test_metrics.c — unit tests of the metrics registry (src/common/metrics.c).
 *
 * Covers: the exact text of a counter, a gauge and a histogram family (HELP and TYPE on every
 * family, even one with no sample; samples in the order first added; labels in the order given;
 * integers as integers, fractions with up to nine decimals); label values escaped (quote,
 * backslash, line feed) and a value longer than the stack buffer; histogram buckets: a value on a
 * bound falls in that bound's bucket (le), above the last in +Inf, cumulative counts, batched
 * observations; the merge rules: sum, min and max per series, histograms bucket by bucket, a
 * series or family only one side has is kept; adding a series twice combines it by the family's
 * rule; one name declared with two types or two sets of buckets and a label string over its cap are errors that make the
 * render fail and poison the output buffer instead of emitting a partial text; a family's name
 * and help are copied (declared from a reused buffer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/metrics.h"

static const double le[] = {0.1, 0.5, 1};
static const bt_hist_buckets bk = {le, 3};

static const bt_metric_def ctr = {"t_requests_total", "Requests", BT_METRIC_COUNTER, BT_MERGE_SUM, NULL};
static const bt_metric_def g_sum = {"t_inflight", "In flight", BT_METRIC_GAUGE, BT_MERGE_SUM, NULL};
static const bt_metric_def g_min = {"t_connected", "Connected", BT_METRIC_GAUGE, BT_MERGE_MIN, NULL};
static const bt_metric_def g_max = {"t_blocks", "Blocks", BT_METRIC_GAUGE, BT_MERGE_MAX, NULL};
static const bt_metric_def hist = {"t_latency_seconds", "Latency", BT_METRIC_HISTOGRAM, BT_MERGE_SUM, &bk};
static const bt_metric_def empty = {"t_empty", "Nothing yet", BT_METRIC_GAUGE, BT_MERGE_MAX, NULL};

static char *render(const bt_metrics *r) {
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    assert_int_equal(bt_metrics_render(r, &b), BT_OK);
    char *s = strndup(b.data ? b.data : "", b.len);
    bt_buf_free(&b);
    return s;
}

static void test_render(void **state) {
    (void)state;
    bt_metrics *r = bt_metrics_new();
    bt_metric_family *c = bt_metrics_family(r, &ctr);
    bt_metrics_add(c, 5, "model", "m", "status", "success", NULL);
    bt_metrics_add(c, 0, "model", "m", "status", "error", NULL);
    bt_metrics_add(bt_metrics_family(r, &g_sum), 2.5, NULL);
    bt_metrics_add(bt_metrics_family(r, &g_max), 0.000001234, "w", "a", NULL);
    bt_metrics_family(r, &empty);
    bt_hist h = {0};
    bt_hist_observe(&h, &bk, 0.1, 1); /* on the bound: bucket le=0.1 */
    bt_hist_observe(&h, &bk, 0.3, 2);
    bt_hist_observe(&h, &bk, 7, 1); /* +Inf */
    bt_metrics_add_hist(bt_metrics_family(r, &hist), &h, "model", "m", NULL);
    bt_metrics_add_hist(bt_metrics_family(r, &hist), &(bt_hist){0}, NULL);
    assert_int_equal(bt_metrics_status(r), BT_OK);
    char *t = render(r);
    assert_string_equal(t, "# HELP t_requests_total Requests\n"
                           "# TYPE t_requests_total counter\n"
                           "t_requests_total{model=\"m\",status=\"success\"} 5\n"
                           "t_requests_total{model=\"m\",status=\"error\"} 0\n"
                           "# HELP t_inflight In flight\n"
                           "# TYPE t_inflight gauge\n"
                           "t_inflight 2.5\n"
                           "# HELP t_blocks Blocks\n"
                           "# TYPE t_blocks gauge\n"
                           "t_blocks{w=\"a\"} 0.000001234\n"
                           "# HELP t_empty Nothing yet\n"
                           "# TYPE t_empty gauge\n"
                           "# HELP t_latency_seconds Latency\n"
                           "# TYPE t_latency_seconds histogram\n"
                           "t_latency_seconds_bucket{model=\"m\",le=\"0.1\"} 1\n"
                           "t_latency_seconds_bucket{model=\"m\",le=\"0.5\"} 3\n"
                           "t_latency_seconds_bucket{model=\"m\",le=\"1\"} 3\n"
                           "t_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n"
                           "t_latency_seconds_sum{model=\"m\"} 7.7\n"
                           "t_latency_seconds_count{model=\"m\"} 4\n"
                           "t_latency_seconds_bucket{le=\"0.1\"} 0\n"
                           "t_latency_seconds_bucket{le=\"0.5\"} 0\n"
                           "t_latency_seconds_bucket{le=\"1\"} 0\n"
                           "t_latency_seconds_bucket{le=\"+Inf\"} 0\n"
                           "t_latency_seconds_sum 0\n"
                           "t_latency_seconds_count 0\n");
    free(t);
    bt_metrics_free(r);
}

/* Every bucket edge: just below, on and just above each bound. */
static void test_buckets(void **state) {
    (void)state;
    static const double many[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,   0.5,   1,      2.5,   5,    10,    30,   60};
    const bt_hist_buckets b = {many, 16};
    for (size_t i = 0; i < 16; i++) {
        bt_hist h = {0};
        bt_hist_observe(&h, &b, many[i] * 0.999, 1);
        bt_hist_observe(&h, &b, many[i], 1);
        bt_hist_observe(&h, &b, many[i] * 1.001, 1);
        assert_int_equal(h.counts[i], 2);
        assert_int_equal(h.counts[i + 1], 1);
        assert_int_equal(h.n, 3);
    }
    bt_hist h = {0};
    bt_hist_observe(&h, &b, 0, 1);
    bt_hist_observe(&h, &b, -1, 1);
    bt_hist_observe(&h, &b, 1e9, 5);
    assert_int_equal(h.counts[0], 2);
    assert_int_equal(h.counts[16], 5);
    assert_true(h.sum == 5e9 - 1);
}

static void test_escape(void **state) {
    (void)state;
    bt_metrics *r = bt_metrics_new();
    bt_metric_family *c = bt_metrics_family(r, &ctr);
    bt_metrics_add(c, 1, "model", "a\"b\\c\nd", NULL);
    char longname[600];
    memset(longname, 'x', sizeof longname - 2);
    longname[sizeof longname - 2] = '"';
    longname[sizeof longname - 1] = '\0';
    bt_metrics_add(c, 2, "model", longname, NULL);
    char *t = render(r);
    assert_non_null(strstr(t, "\nt_requests_total{model=\"a\\\"b\\\\c\\nd\"} 1\n"));
    char want[700];
    snprintf(want, sizeof want, "\nt_requests_total{model=\"%.*s\\\"\"} 2\n", (int)sizeof longname - 2, longname);
    assert_non_null(strstr(t, want));
    free(t);
    bt_metrics_free(r);
}

static void test_merge(void **state) {
    (void)state;
    bt_metrics *a = bt_metrics_new(), *b = bt_metrics_new(), *all = bt_metrics_new();
    bt_metrics_add(bt_metrics_family(a, &ctr), 5, "k", "x", NULL);
    bt_metrics_add(bt_metrics_family(b, &ctr), 7, "k", "x", NULL);
    bt_metrics_add(bt_metrics_family(b, &ctr), 4, "k", "only_b", NULL);
    bt_metrics_add(bt_metrics_family(a, &g_sum), 3, NULL);
    bt_metrics_add(bt_metrics_family(b, &g_sum), 1, NULL);
    bt_metrics_add(bt_metrics_family(a, &g_min), 1, "plane", "nats", NULL);
    bt_metrics_add(bt_metrics_family(b, &g_min), 0, "plane", "nats", NULL);
    bt_metrics_add(bt_metrics_family(a, &g_max), 40, NULL);
    bt_metrics_add(bt_metrics_family(b, &g_max), 41, NULL);
    bt_metrics_add(bt_metrics_family(b, &empty), 9, NULL); /* a family only b has */
    bt_hist ha = {0}, hb = {0};
    bt_hist_observe(&ha, &bk, 0.05, 10);
    bt_hist_observe(&hb, &bk, 0.05, 1);
    bt_hist_observe(&hb, &bk, 0.75, 3);
    bt_metrics_add_hist(bt_metrics_family(a, &hist), &ha, NULL);
    bt_metrics_add_hist(bt_metrics_family(b, &hist), &hb, NULL);
    bt_metrics_merge(all, a);
    bt_metrics_merge(all, b);
    char *t = render(all);
    assert_string_equal(t, "# HELP t_requests_total Requests\n"
                           "# TYPE t_requests_total counter\n"
                           "t_requests_total{k=\"x\"} 12\n"
                           "t_requests_total{k=\"only_b\"} 4\n"
                           "# HELP t_inflight In flight\n"
                           "# TYPE t_inflight gauge\n"
                           "t_inflight 4\n"
                           "# HELP t_connected Connected\n"
                           "# TYPE t_connected gauge\n"
                           "t_connected{plane=\"nats\"} 0\n"
                           "# HELP t_blocks Blocks\n"
                           "# TYPE t_blocks gauge\n"
                           "t_blocks 41\n"
                           "# HELP t_latency_seconds Latency\n"
                           "# TYPE t_latency_seconds histogram\n"
                           "t_latency_seconds_bucket{le=\"0.1\"} 11\n"
                           "t_latency_seconds_bucket{le=\"0.5\"} 11\n"
                           "t_latency_seconds_bucket{le=\"1\"} 14\n"
                           "t_latency_seconds_bucket{le=\"+Inf\"} 14\n"
                           "t_latency_seconds_sum 2.8\n"
                           "t_latency_seconds_count 14\n"
                           "# HELP t_empty Nothing yet\n"
                           "# TYPE t_empty gauge\n"
                           "t_empty 9\n");
    free(t);
    /* the same rules when one registry gets a series twice; and merge order does not matter
     * for min and max */
    bt_metrics *r = bt_metrics_new();
    bt_metric_family *mn = bt_metrics_family(r, &g_min), *mx = bt_metrics_family(r, &g_max);
    bt_metrics_add(mn, 0, NULL);
    bt_metrics_add(mn, 1, NULL);
    bt_metrics_add(mx, 41, NULL);
    bt_metrics_add(mx, 40, NULL);
    t = render(r);
    assert_non_null(strstr(t, "\nt_connected 0\n"));
    assert_non_null(strstr(t, "\nt_blocks 41\n"));
    free(t);
    bt_metrics_free(r);
    bt_metrics_free(a);
    bt_metrics_free(b);
    bt_metrics_free(all);
}

/* Many series: each one found again by its labels (the hash lookup), none merged with another. */
static void test_many_series(void **state) {
    (void)state;
    bt_metrics *a = bt_metrics_new(), *all = bt_metrics_new();
    bt_metric_family *f = bt_metrics_family(a, &ctr);
    char id[16];
    for (int i = 0; i < 3000; i++) {
        snprintf(id, sizeof id, "%x", i);
        bt_metrics_add(f, i, "worker_id", id, NULL);
    }
    bt_metrics_merge(all, a);
    bt_metrics_merge(all, a);
    char *t = render(all);
    for (int i = 0; i < 3000; i += 7) {
        char want[64];
        snprintf(want, sizeof want, "\nt_requests_total{worker_id=\"%x\"} %d\n", i, 2 * i);
        if (!strstr(t, want)) fail_msg("missing %s", want);
    }
    size_t lines = 0;
    for (const char *p = t; *p; p++) lines += *p == '\n';
    assert_int_equal(lines, 3000 + 2);
    free(t);
    bt_metrics_free(a);
    bt_metrics_free(all);
}

static void test_errors(void **state) {
    (void)state;
    /* one name, two types */
    bt_metrics *r = bt_metrics_new();
    bt_metrics_add(bt_metrics_family(r, &ctr), 1, NULL);
    static const bt_metric_def clash = {"t_requests_total", "x", BT_METRIC_GAUGE, BT_MERGE_MAX, NULL};
    assert_null(bt_metrics_family(r, &clash));
    assert_int_equal(bt_metrics_status(r), BT_ERR_INVALID);
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    bt_buf_append_str(&b, "kept ");
    assert_int_equal(bt_metrics_render(r, &b), BT_ERR_INVALID);
    assert_int_equal(bt_buf_status(&b), BT_ERR_INVALID);
    assert_int_equal(b.len, 5); /* nothing rendered */
    bt_buf_free(&b);
    bt_metrics_free(r);
    /* one histogram name over two sets of buckets: its counts could not add up */
    r = bt_metrics_new();
    static const double other_le[] = {0.2, 0.4, 1};
    static const bt_hist_buckets other = {other_le, 3};
    assert_non_null(bt_metrics_histogram(r, "t_latency_seconds", &bk, "Latency"));
    assert_null(bt_metrics_histogram(r, "t_latency_seconds", &other, "Latency"));
    assert_int_equal(bt_metrics_status(r), BT_ERR_INVALID);
    bt_metrics_free(r);
    /* a label string over its cap is an error, never a cut label */
    r = bt_metrics_new();
    char *huge = malloc(5000);
    memset(huge, 'y', 4999);
    huge[4999] = '\0';
    bt_metrics_add(bt_metrics_family(r, &ctr), 1, "model", huge, NULL);
    free(huge);
    assert_int_equal(bt_metrics_status(r), BT_ERR_TOO_LARGE);
    bt_buf_init(&b, 1 << 20);
    assert_int_not_equal(bt_metrics_render(r, &b), BT_OK);
    bt_buf_free(&b);
    bt_metrics_free(r);
    /* a NULL registry (bt_metrics_new failed) */
    bt_buf_init(&b, 1 << 20);
    assert_int_equal(bt_metrics_render(NULL, &b), BT_ERR_NOMEM);
    bt_buf_free(&b);
    /* the output buffer's own cap */
    r = bt_metrics_new();
    bt_metrics_add(bt_metrics_family(r, &ctr), 1, NULL);
    bt_buf_init(&b, 16);
    assert_int_equal(bt_metrics_render(r, &b), BT_ERR_TOO_LARGE);
    bt_buf_free(&b);
    bt_metrics_free(r);
    bt_metrics_free(NULL);
}

/* The registry copies a family's name and help: a name built in a buffer the caller then reuses
 * (bt_events_collect builds "<prefix>_event_plane_...") stays right. */
static void test_declared_in_place(void **state) {
    (void)state;
    bt_metrics *r = bt_metrics_new();
    char name[64], help[64];
    snprintf(name, sizeof name, "%s_connects_total", "a");
    snprintf(help, sizeof help, "first");
    bt_metrics_add(bt_metrics_counter(r, name, help), 2, NULL);
    snprintf(name, sizeof name, "%s_connected", "b");
    snprintf(help, sizeof help, "second");
    bt_metrics_add(bt_metrics_gauge(r, name, BT_MERGE_MIN, help), 1, NULL);
    bt_metrics_add(bt_metrics_gauge(r, name, BT_MERGE_MIN, help), 0, NULL); /* found again by name */
    memset(name, 'z', sizeof name - 1);
    memset(help, 'z', sizeof help - 1);
    char *t = render(r);
    assert_string_equal(t, "# HELP a_connects_total first\n# TYPE a_connects_total counter\na_connects_total 2\n"
                           "# HELP b_connected second\n# TYPE b_connected gauge\nb_connected 0\n");
    free(t);
    bt_metrics_free(r);
}

/* The one-call forms declare the family and add one unlabelled sample, merged by the family's rule
 * when called again (a gauge by min here, a counter by sum). */
static void test_value_forms(void **state) {
    (void)state;
    bt_metrics *r = bt_metrics_new();
    bt_metrics_counter_value(r, "c_total", "Counted", 2);
    bt_metrics_counter_value(r, "c_total", "Counted", 3);
    bt_metrics_gauge_value(r, "g", BT_MERGE_MIN, "Gauged", 7);
    bt_metrics_gauge_value(r, "g", BT_MERGE_MIN, "Gauged", 4);
    char *t = render(r);
    assert_string_equal(t, "# HELP c_total Counted\n# TYPE c_total counter\nc_total 5\n"
                           "# HELP g Gauged\n# TYPE g gauge\ng 4\n");
    free(t);
    bt_metrics_free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render),
        cmocka_unit_test(test_buckets),
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_many_series),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_declared_in_place),
        cmocka_unit_test(test_value_forms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
