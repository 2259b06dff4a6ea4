/* metrics.c — the frontend's metrics: its families (name, help, type, --threads merge rule) and
 * the collect function that fills a registry (src/common/metrics.h) from the counters the
 * request path keeps in fe_stats, fe_worker and fe.
 *
 * The request path only bumps plain fields and fe_hist (a bt_hist); a scrape reads them here.
 * Rendering, label escaping and the merge of the shards' registries (shards.c) are the
 * registry's. Names follow Dynamo (dynamo_frontend_*) where Dynamo has one; baton's own additions
 * are prefixed baton_. docs/operations.md lists them. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "frontend/fe.h"

static const double bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
static const bt_hist_buckets buckets = {bounds, sizeof bounds / sizeof bounds[0]};

void fe_hist_observe(fe_hist *h, double s) { bt_hist_observe(h, &buckets, s, 1); }

void fe_hist_observe_n(fe_hist *h, double s, uint64_t n) { bt_hist_observe(h, &buckets, s, n); }

/* The merge rules each family declares (docs/architecture.md, --threads): counters and histograms
 * add up; gauges that count what a shard holds (in-flight requests, connections, a worker's
 * streams, disconnected clients) add up; the event-plane connection state takes the minimum;
 * gauges every shard reads from the same source (a worker's reported load, the known workers, the
 * migration limit) take the maximum. */

static const char *api_endpoint[2] = {"chat_completions", "completions"};
static const char *req_type[2] = {"unary", "stream"};
static const char *outcome_name[FE_OUT_N_] = {"success", "error", "cancelled", "rejected"};

static void collect_models(fe *f, bt_metrics *r) {
    bt_metric_family *fam =
        bt_metrics_counter(r, "dynamo_frontend_requests_total", "Requests by model, endpoint, type and outcome");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        for (int a = 0; a < 2; a++)
            for (int s = 0; s < 2; s++)
                for (int o = 0; o < FE_OUT_N_; o++)
                    bt_metrics_add(fam, (double)m->st.requests[a][s][o], "model", m->name, "endpoint", api_endpoint[a],
                                   "request_type", req_type[s], "status", outcome_name[o], NULL);
    for (int a = 0; a < 2; a++) /* refused before routing, model not served: a fixed label (fe.h) */
        for (int s = 0; s < 2; s++)
            if (f->refused_unknown[a][s])
                bt_metrics_add(fam, (double)f->refused_unknown[a][s], "model", FE_MODEL_UNKNOWN, "endpoint",
                               api_endpoint[a], "request_type", req_type[s], "status", outcome_name[FE_OUT_ERROR], NULL);
    fam = bt_metrics_gauge(r, "dynamo_frontend_inflight_requests", BT_MERGE_SUM, "Requests in flight");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.inflight, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "dynamo_frontend_output_tokens_total", "Tokens delivered to clients");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.tokens_out, "model", m->name, NULL);
    const size_t hist_off[] = {offsetof(fe_stats, ttft), offsetof(fe_stats, itl), offsetof(fe_stats, duration),
                               offsetof(fe_stats, migration_stall)};
    static const char *hist_name[] = {
        "dynamo_frontend_time_to_first_token_seconds", "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_frontend_request_duration_seconds", "dynamo_frontend_model_migration_stall_seconds"};
    static const char *hist_help[] = {
        "Time from a request's arrival to its first token", "Time between consecutive tokens of a response",
        "Time from a request's arrival to its end",
        "Gap the client saw across a migration: last token before the failure to the first after it"};
    for (size_t i = 0; i < sizeof hist_name / sizeof hist_name[0]; i++) {
        fam = bt_metrics_histogram(r, hist_name[i], &buckets, hist_help[i]);
        for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
            bt_metrics_add_hist(fam, (const fe_hist *)((const char *)&m->st + hist_off[i]), "model", m->name, NULL);
    }
    fam = bt_metrics_counter(r, "dynamo_frontend_model_migration_total",
                             "Requests moved to another worker after a failure, before (new_request) or after "
                             "(ongoing_request) their first token");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link)) {
        bt_metrics_add(fam, (double)m->st.migrations_new, "model", m->name, "migration_type", "new_request", NULL);
        bt_metrics_add(fam, (double)m->st.migrations_ongoing, "model", m->name, "migration_type", "ongoing_request",
                       NULL);
    }
    fam = bt_metrics_counter(r, "baton_frontend_kv_handoff_relayed_total",
                             "Continuations sent with the KV state their last worker gave the stream back with");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link)) bt_metrics_add(fam, (double)m->st.kv_relayed, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_kv_handoff_relayed_bytes_total", "Bytes of those KV states");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.kv_relayed_bytes, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_kv_handoff_unrelayed_total",
                             "Continuations whose stream came back with a KV state that was not relayed (incomplete, "
                             "over the frontend's caps, or a worker without KVSTATE): re-prefilled");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.kv_unrelayed, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_stream_token_timeouts_total",
                             "Attempts given up because their worker sent nothing for their stream for "
                             "--stream-token-timeout (each then counts as a migration)");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.token_timeouts, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_stream_waits_total",
                             "Streams whose worker's engine reported them waiting (WAITING frames): queued for a "
                             "slot, or preempted to be recomputed; --stream-token-timeout does not judge them meanwhile");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link)) {
        bt_metrics_add(fam, (double)m->st.stream_waits[BT_WAIT_QUEUED], "model", m->name, "reason", "queued", NULL);
        bt_metrics_add(fam, (double)m->st.stream_waits[BT_WAIT_PREEMPTED], "model", m->name, "reason", "preempted",
                       NULL);
    }
    fam = bt_metrics_counter(r, "baton_frontend_link_wait_retries_total",
                             "Dispatches of continuations waiting for request-plane link room (each routes over the "
                             "model's workers): at most 32 a tick, after a link drained or a worker came or went");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.link_wait_retries, "model", m->name, NULL);
    fam = bt_metrics_gauge(r, "dynamo_frontend_model_migration_limit", BT_MERGE_MAX,
                           "Extra attempts a request may get (--migration-limit)");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)f->o.migration_limit, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "dynamo_frontend_model_migration_exhausted_total",
                             "Requests that failed because their migration budget was spent");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.migrations_exhausted, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_model_migration_unserved_total",
                             "Failures counted in dynamo_frontend_model_migration_total, with budget left, whose "
                             "continuation was never sent (no worker could take it, the retry budget refused it, or "
                             "the request ended first)");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.migrations_unserved, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "dynamo_frontend_model_cancellation_total",
                             "Requests cancelled by their client or by the operator");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        for (int s = 0; s < 2; s++)
            bt_metrics_add(fam, (double)m->st.cancellations[s], "model", m->name, "request_type", req_type[s], NULL);
    fam = bt_metrics_counter(r, "baton_frontend_preempt_routed_total",
                             "New requests routed past the busy verdict (every worker busy) to a worker that "
                             "preempts a less urgent running sequence for them");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        bt_metrics_add(fam, (double)m->st.preempt_routed, "model", m->name, NULL);
    fam = bt_metrics_counter(r, "dynamo_frontend_model_rejection_total",
                             "Requests refused because every worker was busy");
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        for (int a = 0; a < 2; a++)
            bt_metrics_add(fam, (double)m->st.rejections[a], "model", m->name, "endpoint", api_endpoint[a], NULL);
}

static void collect_workers(fe *f, bt_metrics *r) {
    char id[24];
    bt_metric_family *fam =
        bt_metrics_counter(r, "baton_frontend_worker_routed_total", "Attempts routed to each worker");
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
        snprintf(id, sizeof id, "%" PRIx64, w->id);
        bt_metrics_add(fam, (double)w->routed_total, "model", w->model, "worker_id", id, NULL);
    }
    static const char *source[3] = {"request_plane", "event_plane", "request_plane_unused"};
    fam = bt_metrics_counter(
        r, "baton_frontend_worker_load_reports_total",
        "Load reports received from each worker, by the plane they came on and whether they were used");
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
        snprintf(id, sizeof id, "%" PRIx64, w->id);
        for (int src = 0; src < 3; src++)
            bt_metrics_add(fam, (double)w->load_reports[src], "model", w->model, "worker_id", id, "source", source[src],
                           NULL);
    }
}

static void collect_worker_gauges(fe *f, bt_metrics *r) {
    char id[24];
    enum { WG_DECODE, WG_TOTAL, WG_PREFILL, WG_WAITING, WG_BUSY, WG_INFLIGHT, WG_N_ };
    static const struct {
        const char *name;
        bt_metric_merge merge;
        const char *help;
    } wg[WG_N_] = {
        {"baton_frontend_worker_active_decode_blocks", BT_MERGE_MAX, "KV blocks in use, as the worker last reported"},
        {"baton_frontend_worker_total_blocks", BT_MERGE_MAX, "KV blocks the worker has, as it last reported"},
        {"baton_frontend_worker_active_prefill_tokens", BT_MERGE_MAX,
         "Prompt tokens admitted and not yet prefilled, as the worker last reported"},
        {"baton_frontend_worker_waiting_requests", BT_MERGE_MAX,
         "Requests queued in the worker's engine, as it last reported"},
        {"baton_frontend_worker_busy", BT_MERGE_MAX, "1 while the worker is over a busy threshold"},
        {"baton_frontend_worker_inflight", BT_MERGE_SUM, "Streams of this frontend running on the worker"}};
    for (int g = 0; g < WG_N_; g++) {
        bt_metric_family *fam = bt_metrics_gauge(r, wg[g].name, wg[g].merge, wg[g].help);
        for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
            fe_model *m = fe_model_get(f, w->model, false);
            uint64_t v = 0;
            switch (g) {
            case WG_DECODE: v = w->load.active_decode_blocks; break;
            case WG_TOTAL: v = w->load.total_blocks; break;
            case WG_PREFILL: v = w->load.active_prefill_tokens; break;
            case WG_WAITING: v = w->load.waiting; break;
            case WG_BUSY: v = m ? fe_worker_busy(w, m) : 0; break;
            default: v = w->streams.len; break;
            }
            snprintf(id, sizeof id, "%" PRIx64, w->id);
            bt_metrics_add(fam, (double)v, "model", w->model, "worker_id", id, NULL);
        }
    }
}

void fe_metrics_collect(fe *f, bt_metrics *r) {
    collect_models(f, r);
    /* a gauge, as in Dynamo (it only ever grows here, but the type is Dynamo's) */
    bt_metrics_gauge_value(r, "dynamo_frontend_disconnected_clients", BT_MERGE_SUM,
                           "Clients that went away before their response ended", (double)f->disconnected_clients);
    bt_http_stats hs;
    bt_http_server_stats(f->http, &hs);
    bt_metric_family *fam = bt_metrics_counter(r, "baton_frontend_http_rejections_total",
                                               "Connections or requests the HTTP server refused on its own, by limit");
    bt_metrics_add(fam, (double)hs.max_connections, "reason", "max_connections", NULL);
    bt_metrics_add(fam, (double)hs.bad_request, "reason", "bad_request", NULL);
    bt_metrics_add(fam, (double)hs.body_too_large, "reason", "body_too_large", NULL);
    bt_metrics_add(fam, (double)hs.header_too_large, "reason", "header_too_large", NULL);
    bt_metrics_add(fam, (double)hs.header_timeout, "reason", "header_timeout", NULL);
    bt_metrics_add(fam, (double)hs.slow_reader, "reason", "slow_reader", NULL);
    bt_metrics_add(fam, (double)hs.body_budget, "reason", "body_budget", NULL);
    bt_metrics_add(fam, (double)hs.output_budget, "reason", "output_budget", NULL);
    bt_metrics_add(fam, (double)hs.host_not_allowed, "reason", "host_not_allowed", NULL);
    bt_metrics_add(fam, (double)hs.no_descriptors, "reason", "no_descriptors", NULL);
    bt_metrics_add(
        bt_metrics_counter(r, "baton_frontend_limit_rejections_total", "Requests refused by --max-concurrent-requests"),
        (double)f->limit_rejections, NULL);
    if (f->shard == 0 && fe_access_on()) { /* one log for the process: its counts once, not per thread */
        fam = bt_metrics_counter(r, "baton_frontend_access_log_lines_total",
                                 "Lines of the --access-log written, and dropped (the writer fell behind, or a write "
                                 "failed)");
        bt_metrics_add(fam, (double)fe_access_written(), "result", "written", NULL);
        bt_metrics_add(fam, (double)fe_access_dropped(), "result", "dropped", NULL);
    }
    char thread[16];
    snprintf(thread, sizeof thread, "%d", f->shard);
    /* per event loop (--threads): how the kernel spread the load; the merge keeps one series each */
    bt_metrics_add(
        bt_metrics_counter(r, "baton_frontend_thread_requests_total", "Requests received, by event loop (--threads)"),
        (double)f->requests_seen, "thread", thread, NULL);
    size_t routable = 0;
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) routable += fe_worker_routable(w);
    fam = bt_metrics_gauge(r, "baton_frontend_workers", BT_MERGE_MAX,
                           "Workers known from discovery, and those new requests can go to");
    bt_metrics_add(fam, (double)f->nworkers, "state", "known", NULL);
    bt_metrics_add(fam, (double)routable, "state", "routable", NULL);
    bt_discovery_stats ds;
    bt_discovery_get_stats(f->disc, &ds);
    bt_metrics_gauge_value(r, "baton_frontend_discovery_up", BT_MERGE_MIN,
                           "1 while the discovery watch is established and its store answers (etcd: the watch stream "
                           "is up and its member answers; file: the directory can be listed)",
                           ds.watching ? 1.0 : 0.0);
    bt_metrics_gauge_value(r, "baton_frontend_discovery_grace_workers", BT_MERGE_MAX,
                           "Workers whose discovery key vanished, kept routable while they register again "
                           "(--discovery-grace)",
                           (double)fe_workers_in_grace(f));
    /* every event loop keeps its own view of every worker, and its own grace of each: the first
     * loop's count is the process's (summed over the loops, one key lost would count N times) */
    if (f->shard == 0) {
        static const char *grace_result[FE_GRACE_N_] = {"kept", "reregistered", "expired", "dropped"};
        fam = bt_metrics_counter(r, "baton_frontend_discovery_grace_total",
                                 "Workers kept routable after their discovery key vanished (kept), and how each grace "
                                 "ended: registered again, expired, or dropped (connection ended, or draining)");
        for (int i = 0; i < FE_GRACE_N_; i++)
            bt_metrics_add(fam, (double)f->grace_counts[i], "result", grace_result[i], NULL);
    }
    bt_metrics_gauge_value(r, "baton_frontend_http_connections", BT_MERGE_SUM, "Open client connections",
                           (double)bt_http_server_connections(f->http));
    /* one counter shared by the shards: each reports the same value, the merge keeps it once */
    bt_metrics_gauge_value(r, "baton_frontend_http_output_queued_bytes", BT_MERGE_MAX,
                           "Response bytes queued for clients, not yet taken by the kernel (counted when "
                           "--max-output-bytes-total is on)",
                           (double)bt_http_server_output_queued(f->http));
    collect_workers(f, r);
    bt_events_stats es;
    bt_events_get_stats(f->events, &es);
    bt_events_collect(f->events, &es, r, "baton_frontend");
    fam = bt_metrics_counter(r, "baton_frontend_event_plane_messages_total",
                             "Event-plane load reports, by what became of them");
    bt_metrics_add(fam, (double)(es.received - (es.received < f->events_unknown ? es.received : f->events_unknown)),
                   "result", "applied", NULL);
    bt_metrics_add(fam, (double)f->events_unknown, "result", "unknown_worker", NULL);
    bt_metrics_add(fam, (double)es.invalid, "result", "invalid", NULL);
    bt_metrics_add(fam, (double)es.overflow, "result", "overflow", NULL);
    fe_resume_collect(f, r);
    fe_admit_collect(f, r);
    fe_outlier_collect(f, r);
    fe_budget_collect(f, r);
    collect_worker_gauges(f, r);
}
