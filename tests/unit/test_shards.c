/* test_shards.c — unit tests of the merge of the shards' /metrics texts (fe_metrics_merge in
 * src/frontend/shards.c), which a frontend with --threads N answers /metrics with.
 *
 * Covers: counters and histogram lines add up series by series; the gauges that count what a
 * shard holds (in-flight requests, connections, a worker's streams) add up; the event-plane
 * connection state takes the minimum; gauges every shard reads from the same source (a worker's
 * reported load, the number of known workers, the migration limit) take the maximum, not the
 * sum; a series or a whole family only one shard has is kept, inside its family (Prometheus
 * wants a family's lines together after its TYPE line); HELP lines stay with their family;
 * fractional values keep six decimals; one part alone comes out unchanged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "frontend/fe.h"

static char *merge(const char **texts, int n) {
    bt_buf parts[4];
    for (int i = 0; i < n; i++) {
        bt_buf_init(&parts[i], 1 << 20);
        bt_buf_append_str(&parts[i], texts[i]);
    }
    bt_buf out;
    bt_buf_init(&out, 1 << 20);
    fe_metrics_merge(parts, n, &out);
    for (int i = 0; i < n; i++) bt_buf_free(&parts[i]);
    char *s = strndup(out.data ? out.data : "", out.len);
    bt_buf_free(&out);
    return s;
}

static const char *shard0 =
    "# HELP dynamo_frontend_requests_total Requests\n"
    "# TYPE dynamo_frontend_requests_total counter\n"
    "dynamo_frontend_requests_total{model=\"m\",status=\"success\"} 5\n"
    "dynamo_frontend_requests_total{model=\"m\",status=\"error\"} 1\n"
    "# TYPE dynamo_frontend_inflight_requests gauge\n"
    "dynamo_frontend_inflight_requests{model=\"m\"} 3\n"
    "# TYPE dynamo_frontend_inter_token_latency_seconds histogram\n"
    "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.01\"} 10\n"
    "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 12\n"
    "dynamo_frontend_inter_token_latency_seconds_sum{model=\"m\"} 0.250000\n"
    "dynamo_frontend_inter_token_latency_seconds_count{model=\"m\"} 12\n"
    "# TYPE dynamo_frontend_model_migration_limit gauge\n"
    "dynamo_frontend_model_migration_limit{model=\"m\"} 3\n"
    "# TYPE baton_frontend_workers gauge\n"
    "baton_frontend_workers{state=\"known\"} 2\n"
    "# TYPE baton_frontend_http_connections gauge\n"
    "baton_frontend_http_connections 7\n"
    "# TYPE baton_frontend_event_plane_connected gauge\n"
    "baton_frontend_event_plane_connected{plane=\"nats\"} 1\n"
    "# TYPE baton_frontend_worker_active_decode_blocks gauge\n"
    "baton_frontend_worker_active_decode_blocks{model=\"m\",worker_id=\"a\"} 40\n"
    "# TYPE baton_frontend_worker_inflight gauge\n"
    "baton_frontend_worker_inflight{model=\"m\",worker_id=\"a\"} 2\n";

static const char *shard1 =
    "# HELP dynamo_frontend_requests_total Requests\n"
    "# TYPE dynamo_frontend_requests_total counter\n"
    "dynamo_frontend_requests_total{model=\"m\",status=\"success\"} 7\n"
    "dynamo_frontend_requests_total{model=\"m\",status=\"error\"} 0\n"
    "dynamo_frontend_requests_total{model=\"other\",status=\"success\"} 4\n"
    "# TYPE dynamo_frontend_inflight_requests gauge\n"
    "dynamo_frontend_inflight_requests{model=\"m\"} 1\n"
    "# TYPE dynamo_frontend_inter_token_latency_seconds histogram\n"
    "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.01\"} 1\n"
    "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 4\n"
    "dynamo_frontend_inter_token_latency_seconds_sum{model=\"m\"} 0.125500\n"
    "dynamo_frontend_inter_token_latency_seconds_count{model=\"m\"} 4\n"
    "# TYPE dynamo_frontend_model_migration_limit gauge\n"
    "dynamo_frontend_model_migration_limit{model=\"m\"} 3\n"
    "# TYPE baton_frontend_workers gauge\n"
    "baton_frontend_workers{state=\"known\"} 2\n"
    "# TYPE baton_frontend_http_connections gauge\n"
    "baton_frontend_http_connections 5\n"
    "# TYPE baton_frontend_event_plane_connected gauge\n"
    "baton_frontend_event_plane_connected{plane=\"nats\"} 0\n"
    "# TYPE baton_frontend_worker_active_decode_blocks gauge\n"
    "baton_frontend_worker_active_decode_blocks{model=\"m\",worker_id=\"a\"} 41\n"
    "# TYPE baton_frontend_worker_inflight gauge\n"
    "baton_frontend_worker_inflight{model=\"m\",worker_id=\"a\"} 3\n"
    "# TYPE baton_frontend_only_here_total counter\n"
    "baton_frontend_only_here_total 9\n";

static void has_line(const char *text, const char *line) {
    char want[512];
    snprintf(want, sizeof want, "\n%s\n", line);
    char *padded = malloc(strlen(text) + 3);
    sprintf(padded, "\n%s", text);
    if (!strstr(padded, want)) fail_msg("missing line '%s' in:\n%s", line, text);
    free(padded);
}

static void test_rules(void **state) {
    (void)state;
    const char *t[] = {shard0, shard1};
    char *m = merge(t, 2);
    has_line(m, "dynamo_frontend_requests_total{model=\"m\",status=\"success\"} 12");
    has_line(m, "dynamo_frontend_requests_total{model=\"m\",status=\"error\"} 1");
    has_line(m, "dynamo_frontend_requests_total{model=\"other\",status=\"success\"} 4");
    has_line(m, "dynamo_frontend_inflight_requests{model=\"m\"} 4");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"0.01\"} 11");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 16");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_sum{model=\"m\"} 0.375500");
    has_line(m, "dynamo_frontend_inter_token_latency_seconds_count{model=\"m\"} 16");
    has_line(m, "dynamo_frontend_model_migration_limit{model=\"m\"} 3");
    has_line(m, "baton_frontend_workers{state=\"known\"} 2");
    has_line(m, "baton_frontend_http_connections 12");
    has_line(m, "baton_frontend_event_plane_connected{plane=\"nats\"} 0");
    has_line(m, "baton_frontend_worker_active_decode_blocks{model=\"m\",worker_id=\"a\"} 41");
    has_line(m, "baton_frontend_worker_inflight{model=\"m\",worker_id=\"a\"} 5");
    has_line(m, "baton_frontend_only_here_total 9");
    free(m);
}

/* Every sample line must come after its own family's TYPE line and before the next family's. */
static void test_grouping(void **state) {
    (void)state;
    const char *t[] = {shard0, shard1};
    char *m = merge(t, 2);
    char family[160] = "";
    int helps = 0, types = 0;
    for (char *line = strtok(m, "\n"); line; line = strtok(NULL, "\n")) {
        if (strncmp(line, "# HELP ", 7) == 0) {
            helps++;
            continue;
        }
        if (sscanf(line, "# TYPE %159s", family) == 1) {
            types++;
            continue;
        }
        assert_true(family[0] != '\0');
        if (strncmp(line, family, strlen(family)) != 0) fail_msg("'%s' is outside its family (%s)", line, family);
    }
    assert_int_equal(helps, 1);
    assert_int_equal(types, 10);
    free(m);
}

static void test_one_part_unchanged(void **state) {
    (void)state;
    const char *t[] = {shard0};
    char *m = merge(t, 1);
    assert_string_equal(m, shard0);
    free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rules),
        cmocka_unit_test(test_grouping),
        cmocka_unit_test(test_one_part_unchanged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
