/* test_shards.c — unit tests of /metrics under --threads N: two shards (fake frontends holding
 * models, workers and counters, no loop) each fill a registry with the frontend's own collect
 * function (fe_metrics_collect), and fe_metrics_merge merges them by the rules the frontend's
 * families declare and renders the text (src/frontend/shards.c, src/frontend/metrics.c).
 *
 * Covers: request counters and histogram buckets add up series by series; the gauges that count
 * what a shard holds (in-flight requests, a worker's streams, disconnected clients) add up; the
 * gauges every shard reads from the same source (a worker's reported load, the number of known
 * workers, the migration limit) take the maximum, not the sum; a model or a worker only one shard
 * knows is kept, inside its family; baton_frontend_thread_requests_total keeps one series per
 * shard; every family has one HELP and one TYPE line and its samples follow them; a model name
 * with a quote, a backslash and a line feed is escaped; one shard alone renders its own values;
 * a part that could not be collected (NULL) makes the whole answer an error, never a partial text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "frontend/fe.h"

static fe *shard_new(int index) {
    fe *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->shard = index;
    f->o.migration_limit = 3;
    return f;
}

static fe_worker *worker_add(fe *f, uint64_t id, const char *model) {
    fe_worker *w = calloc(1, sizeof *w);
    assert_non_null(w);
    w->fe = f;
    w->id = id;
    snprintf(w->model, sizeof w->model, "%s", model);
    bt_map_init(&w->streams);
    LIST_INSERT_HEAD(&f->workers, w, link);
    f->nworkers++;
    return w;
}

static void shard_free(fe *f) {
    while (!LIST_EMPTY(&f->workers)) {
        fe_worker *w = LIST_FIRST(&f->workers);
        LIST_REMOVE(w, link);
        bt_map_free(&w->streams);
        free(w);
    }
    while (!LIST_EMPTY(&f->models)) {
        fe_model *m = LIST_FIRST(&f->models);
        LIST_REMOVE(m, link);
        free(m->ws);
        free(m);
    }
    free(f);
}

static char *merge(fe **shards, int n) {
    bt_metrics *parts[4];
    for (int i = 0; i < n; i++) {
        parts[i] = bt_metrics_new();
        assert_non_null(parts[i]);
        fe_metrics_collect(shards[i], parts[i]);
    }
    bt_buf out;
    bt_buf_init(&out, 1 << 20);
    assert_int_equal(fe_metrics_merge(parts, n, &out), BT_OK);
    for (int i = 0; i < n; i++) bt_metrics_free(parts[i]);
    char *s = strndup(out.data ? out.data : "", out.len);
    bt_buf_free(&out);
    return s;
}

static void has_line(const char *text, const char *line) {
    char want[512];
    snprintf(want, sizeof want, "\n%s\n", line);
    char *padded = malloc(strlen(text) + 3);
    snprintf(padded, strlen(text) + 3, "\n%s", text);
    if (!strstr(padded, want)) fail_msg("missing line '%s' in:\n%s", line, text);
    free(padded);
}

/* Two shards: model m on both, model "other" only on shard 1; worker a on both (the same
 * reported load, read twice), worker b only on shard 0. */
static void two_shards(fe *s[2]) {
    s[0] = shard_new(0);
    s[1] = shard_new(1);
    fe_model *m0 = fe_model_get(s[0], "m", true), *m1 = fe_model_get(s[1], "m", true);
    fe_model *o1 = fe_model_get(s[1], "other", true);
    m0->st.requests[0][1][FE_OUT_SUCCESS] = 5;
    m1->st.requests[0][1][FE_OUT_SUCCESS] = 7;
    m0->st.requests[0][1][FE_OUT_ERROR] = 1;
    o1->st.requests[1][0][FE_OUT_SUCCESS] = 4;
    m0->st.inflight = 3;
    m1->st.inflight = 1;
    m0->st.tokens_out = 100;
    m1->st.tokens_out = 50;
    fe_hist_observe_n(&m0->st.itl, 0.008, 10); /* le 0.01 */
    fe_hist_observe_n(&m0->st.itl, 0.02, 2);   /* le 0.025 */
    fe_hist_observe_n(&m1->st.itl, 0.009, 1);
    fe_hist_observe_n(&m1->st.itl, 100, 3); /* +Inf */
    m0->st.migrations_ongoing = 2;
    m1->st.migrations_ongoing = 1;
    s[0]->disconnected_clients = 2;
    s[1]->disconnected_clients = 5;
    s[0]->requests_seen = 12;
    s[1]->requests_seen = 20;
    s[0]->grace_counts[FE_GRACE_KEPT] = 2; /* each loop keeps the workers it sees go */
    s[0]->grace_counts[FE_GRACE_REREGISTERED] = 1;
    s[1]->grace_counts[FE_GRACE_KEPT] = 2;
    s[1]->grace_counts[FE_GRACE_REREGISTERED] = 1;
    fe_worker *a0 = worker_add(s[0], 0xa, "m"), *a1 = worker_add(s[1], 0xa, "m");
    worker_add(s[0], 0xb, "m");
    a0->load.active_decode_blocks = 40;
    a1->load.active_decode_blocks = 41; /* a fresher report on shard 1 */
    a0->routed_total = 6;
    a1->routed_total = 4;
    assert_int_equal(bt_map_put(&a0->streams, 1, a0), 0);
    assert_int_equal(bt_map_put(&a0->streams, 2, a0), 0);
    assert_int_equal(bt_map_put(&a1->streams, 7, a1), 0);
}

static void test_rules(void **state) {
    (void)state;
    fe *s[2];
    two_shards(s);
    char *m = merge(s, 2);
    /* counters add up */
    has_line(m, "dynamo_frontend_requests_total{model=\"m\",endpoint=\"chat_completions\",request_type=\"stream\","
                "status=\"success\"} 12");
    has_line(m, "dynamo_frontend_requests_total{model=\"m\",endpoint=\"chat_completions\",request_type=\"stream\","
                "status=\"error\"} 1");
    has_line(m, "dynamo_frontend_requests_total{model=\"other\",endpoint=\"completions\",request_type=\"unary\","
                "status=\"success\"} 4");
    has_line(m, "dynamo_frontend_output_tokens_total{model=\"m\"} 150");
    has_line(m, "dynamo_frontend_model_migration_total{model=\"m\",migration_type=\"ongoing_request\"} 3");
    has_line(m, "baton_frontend_worker_routed_total{model=\"m\",worker_id=\"a\"} 10");
    /* histograms add up bucket by bucket, cumulative */
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.005\"} 0");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.01\"} 11");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.025\"} 13");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"60\"} 13");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 16");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_sum{model=\"m\"} 300.129");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_count{model=\"m\"} 16");
    /* gauges of what a shard holds add up */
    has_line(m, "dynamo_frontend_inflight_requests{model=\"m\"} 4");
    has_line(m, "dynamo_frontend_disconnected_clients 7");
    has_line(m, "baton_frontend_worker_inflight{model=\"m\",worker_id=\"a\"} 3");
    /* gauges read from one source take the maximum */
    has_line(m, "dynamo_frontend_model_migration_limit{model=\"m\"} 3");
    has_line(m, "baton_frontend_workers{state=\"known\"} 2");
    has_line(m, "baton_frontend_worker_active_decode_blocks{model=\"m\",worker_id=\"a\"} 41");
    /* the event-plane state: both shards are "direct" here (0 connected) */
    has_line(m, "baton_frontend_event_plane_connected{plane=\"direct\"} 0");
    /* kept from the one shard that has it */
    has_line(m, "baton_frontend_worker_inflight{model=\"m\",worker_id=\"b\"} 0");
    has_line(m, "dynamo_frontend_inflight_requests{model=\"other\"} 0");
    /* one series per shard */
    has_line(m, "baton_frontend_thread_requests_total{thread=\"0\"} 12");
    has_line(m, "baton_frontend_thread_requests_total{thread=\"1\"} 20");
    /* the discovery grace's counts are the first loop's (each loop keeps its own view of the same
     * workers: summed, one lost key would count once per loop); no discovery: its watch is down */
    has_line(m, "baton_frontend_discovery_grace_total{result=\"kept\"} 2");
    has_line(m, "baton_frontend_discovery_grace_total{result=\"reregistered\"} 1");
    has_line(m, "baton_frontend_discovery_grace_workers 0");
    has_line(m, "baton_frontend_discovery_up 0");
    free(m);
    shard_free(s[0]);
    shard_free(s[1]);
}

/* Each family once, HELP then TYPE, and every sample line after its own family's TYPE line. */
static void test_grouping(void **state) {
    (void)state;
    fe *s[2];
    two_shards(s);
    char *m = merge(s, 2);
    char family[160] = "", seen[64][160];
    int helps = 0, types = 0;
    for (char *line = strtok(m, "\n"); line; line = strtok(NULL, "\n")) {
        char name[160];
        if (sscanf(line, "# HELP %159s", name) == 1) {
            helps++;
            continue;
        }
        if (sscanf(line, "# TYPE %159s", family) == 1) {
            for (int i = 0; i < types; i++)
                if (strcmp(seen[i], family) == 0) fail_msg("family %s twice", family);
            assert_true(types < 64);
            snprintf(seen[types++], sizeof seen[0], "%s", family);
            continue;
        }
        assert_true(family[0] != '\0');
        if (strncmp(line, family, strlen(family)) != 0) fail_msg("'%s' is outside its family (%s)", line, family);
    }
    assert_int_equal(helps, types);
    /* every family of the frontend (docs/operations.md); these fake shards have no stream journal
     * and no admission queue, so of their families only baton_frontend_stream_resumes_total is
     * there, with baton_frontend_streams_handed_off_total; the outlier (3), retry-budget (1), KV
     * hand-off relay (3), preempt-routed (1, docs/load-shedding.md), queued output bytes (1,
     * --max-output-bytes-total), stream token timeout (1, --stream-token-timeout), stream
     * waits (1, WAITING frames), unserved migrations (1), link-wait retries (1) and discovery (3:
     * up, grace workers, grace outcomes) families always are */
    assert_int_equal(types, 47);
    free(m);
    shard_free(s[0]);
    shard_free(s[1]);
}

/* One shard: its own values, nothing summed or dropped; model names are escaped. */
static void test_one_shard(void **state) {
    (void)state;
    fe *f = shard_new(0);
    fe_model *m = fe_model_get(f, "q\"b\\n\nx", true);
    m->st.inflight = 2;
    m->st.cancellations[1] = 9;
    worker_add(f, 0xff, "m")->load.total_blocks = 64;
    char *t = merge(&f, 1);
    has_line(t, "dynamo_frontend_inflight_requests{model=\"q\\\"b\\\\n\\nx\"} 2");
    has_line(t, "dynamo_frontend_model_cancellation_total{model=\"q\\\"b\\\\n\\nx\",request_type=\"stream\"} 9");
    has_line(t, "baton_frontend_worker_total_blocks{model=\"m\",worker_id=\"ff\"} 64");
    has_line(t, "baton_frontend_workers{state=\"known\"} 1");
    has_line(t, "baton_frontend_workers{state=\"routable\"} 0");
    has_line(t, "baton_frontend_thread_requests_total{thread=\"0\"} 0");
    free(t);
    shard_free(f);
}

/* A shard whose registry could not be made: an error for the whole scrape. */
static void test_missing_part(void **state) {
    (void)state;
    fe *f = shard_new(0);
    bt_metrics *parts[2] = {bt_metrics_new(), NULL};
    fe_metrics_collect(f, parts[0]);
    bt_buf out;
    bt_buf_init(&out, 1 << 20);
    assert_int_equal(fe_metrics_merge(parts, 2, &out), BT_ERR_NOMEM);
    assert_int_equal(bt_buf_status(&out), BT_ERR_NOMEM);
    assert_int_equal(out.len, 0);
    bt_buf_free(&out);
    bt_metrics_free(parts[0]);
    shard_free(f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rules),
        cmocka_unit_test(test_grouping),
        cmocka_unit_test(test_one_shard),
        cmocka_unit_test(test_missing_part),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
