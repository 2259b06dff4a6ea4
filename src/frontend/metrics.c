/* metrics.c — the frontend's Prometheus text (/metrics).
 *
 * Hand-written: the exposition format is a few lines of text, and no Debian C library for it is
 * worth a dependency. Names follow Dynamo (dynamo_frontend_*) where Dynamo has one; baton's own
 * additions are prefixed baton_. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "frontend/fe.h"

static const double bounds[FE_HIST_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                               0.25,   0.5,   1,      2.5,   5,    10,    30,    60};

void fe_hist_observe(fe_hist *h, double s) { fe_hist_observe_n(h, s, 1); }

void fe_hist_observe_n(fe_hist *h, double s, uint64_t n) {
    size_t i = 0;
    while (i < FE_HIST_BUCKETS && s > bounds[i]) i++;
    h->counts[i] += n;
    h->sum += s * (double)n;
    h->n += n;
}

/* Room for a model name (at most 127 bytes in fe_model and fe_worker) escaped as a label value. */
#define LABEL_CAP (2 * 128 + 1)

/* The # HELP and # TYPE lines of one family: every family has both (promtool's lint). */
static void family(bt_buf *b, const char *name, const char *type, const char *help) {
    bt_buf_appendf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void hist(bt_buf *b, const char *name, const char *mq, const fe_hist *h) {
    uint64_t cum = 0;
    for (size_t i = 0; i < FE_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        bt_buf_appendf(b, "%s_bucket{model=\"%s\",le=\"%g\"} %" PRIu64 "\n", name, mq, bounds[i], cum);
    }
    cum += h->counts[FE_HIST_BUCKETS];
    bt_buf_appendf(b, "%s_bucket{model=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name, mq, cum);
    bt_buf_appendf(b, "%s_sum{model=\"%s\"} %.6f\n%s_count{model=\"%s\"} %" PRIu64 "\n", name, mq, h->sum, name, mq,
                   h->n);
}

static const char *api_endpoint[2] = {"chat_completions", "completions"};
static const char *req_type[2] = {"unary", "stream"};
static const char *outcome_name[FE_OUT_N_] = {"success", "error", "cancelled", "rejected"};

/* Model names come from discovery (any string a worker was started with): every label value is
 * escaped (bt_prom_escape), or a name holding a quote, a backslash or a line feed would break the
 * whole text for the scraper. */
void fe_metrics_render(fe *f, bt_buf *b) {
    char mq[LABEL_CAP];
    family(b, "dynamo_frontend_requests_total", "counter", "Requests by model, endpoint, type and outcome");
    for (fe_model *m = f->models; m; m = m->next) {
        bt_prom_escape(m->name, mq, sizeof mq);
        for (int a = 0; a < 2; a++)
            for (int s = 0; s < 2; s++)
                for (int o = 0; o < FE_OUT_N_; o++)
                    bt_buf_appendf(b,
                                   "dynamo_frontend_requests_total{model=\"%s\",endpoint=\"%s\",request_type=\"%s\","
                                   "status=\"%s\"} %" PRIu64 "\n",
                                   mq, api_endpoint[a], req_type[s], outcome_name[o], m->st.requests[a][s][o]);
    }
    family(b, "dynamo_frontend_inflight_requests", "gauge", "Requests in flight");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_inflight_requests{model=\"%s\"} %" PRId64 "\n",
                       bt_prom_escape(m->name, mq, sizeof mq), m->st.inflight);
    family(b, "dynamo_frontend_output_tokens_total", "counter", "Tokens delivered to clients");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_output_tokens_total{model=\"%s\"} %" PRIu64 "\n",
                       bt_prom_escape(m->name, mq, sizeof mq), m->st.tokens_out);
    struct {
        const char *name, *help;
        size_t off;
    } hs[] = {{"dynamo_frontend_time_to_first_token_seconds", "Time from a request's arrival to its first token",
               offsetof(fe_stats, ttft)},
              {"dynamo_frontend_inter_token_latency_seconds", "Time between consecutive tokens of a response",
               offsetof(fe_stats, itl)},
              {"dynamo_frontend_request_duration_seconds", "Time from a request's arrival to its end",
               offsetof(fe_stats, duration)},
              {"dynamo_frontend_model_migration_stall_seconds",
               "Gap the client saw across a migration: last token before the failure to the first after it",
               offsetof(fe_stats, migration_stall)}};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
        family(b, hs[i].name, "histogram", hs[i].help);
        for (fe_model *m = f->models; m; m = m->next)
            hist(b, hs[i].name, bt_prom_escape(m->name, mq, sizeof mq),
                 (const fe_hist *)((const char *)&m->st + hs[i].off));
    }
    family(b, "dynamo_frontend_model_migration_total", "counter",
           "Requests moved to another worker after a failure, before (new_request) or after (ongoing_request) "
           "their first token");
    for (fe_model *m = f->models; m; m = m->next) {
        bt_prom_escape(m->name, mq, sizeof mq);
        bt_buf_appendf(b,
                       "dynamo_frontend_model_migration_total{model=\"%s\",migration_type=\"new_request\"} %" PRIu64
                       "\n"
                       "dynamo_frontend_model_migration_total{model=\"%s\",migration_type=\"ongoing_request\"} "
                       "%" PRIu64 "\n",
                       mq, m->st.migrations_new, mq, m->st.migrations_ongoing);
    }
    family(b, "dynamo_frontend_model_migration_limit", "gauge", "Extra attempts a request may get (--migration-limit)");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_model_migration_limit{model=\"%s\"} %" PRId64 "\n",
                       bt_prom_escape(m->name, mq, sizeof mq), f->o.migration_limit);
    family(b, "dynamo_frontend_model_migration_exhausted_total", "counter",
           "Requests that failed because their migration budget was spent");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_model_migration_exhausted_total{model=\"%s\"} %" PRIu64 "\n",
                       bt_prom_escape(m->name, mq, sizeof mq), m->st.migrations_exhausted);
    family(b, "dynamo_frontend_model_cancellation_total", "counter",
           "Requests cancelled by their client or by the operator");
    for (fe_model *m = f->models; m; m = m->next) {
        bt_prom_escape(m->name, mq, sizeof mq);
        for (int s = 0; s < 2; s++)
            bt_buf_appendf(b, "dynamo_frontend_model_cancellation_total{model=\"%s\",request_type=\"%s\"} %" PRIu64 "\n",
                           mq, req_type[s], m->st.cancellations[s]);
    }
    family(b, "dynamo_frontend_model_rejection_total", "counter", "Requests refused because every worker was busy");
    for (fe_model *m = f->models; m; m = m->next) {
        bt_prom_escape(m->name, mq, sizeof mq);
        for (int a = 0; a < 2; a++)
            bt_buf_appendf(b, "dynamo_frontend_model_rejection_total{model=\"%s\",endpoint=\"%s\"} %" PRIu64 "\n", mq,
                           api_endpoint[a], m->st.rejections[a]);
    }
    /* a gauge, as in Dynamo (it only ever grows here, but the type is Dynamo's) */
    family(b, "dynamo_frontend_disconnected_clients", "gauge", "Clients that went away before their response ended");
    bt_buf_appendf(b, "dynamo_frontend_disconnected_clients %" PRIu64 "\n", f->disconnected_clients);
    bt_http_stats hstat;
    bt_http_server_stats(f->http, &hstat);
    family(b, "baton_frontend_http_rejections_total", "counter",
           "Connections or requests the HTTP server refused on its own, by limit");
    bt_buf_appendf(b,
                   "baton_frontend_http_rejections_total{reason=\"max_connections\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"bad_request\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"body_too_large\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"header_too_large\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"header_timeout\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"slow_reader\"} %" PRIu64 "\n",
                   hstat.max_connections, hstat.bad_request, hstat.body_too_large, hstat.header_too_large,
                   hstat.header_timeout, hstat.slow_reader);
    family(b, "baton_frontend_limit_rejections_total", "counter",
           "Requests refused by --max-concurrent-requests");
    bt_buf_appendf(b, "baton_frontend_limit_rejections_total %" PRIu64 "\n", f->limit_rejections);
    fe_admit_metrics(f, b);
    fe_outlier_metrics(f, b);
    fe_budget_metrics(f, b);
    /* per event loop (--threads): how the kernel spread the load; the merge keeps one series each */
    family(b, "baton_frontend_thread_requests_total", "counter", "Requests received, by event loop (--threads)");
    bt_buf_appendf(b, "baton_frontend_thread_requests_total{thread=\"%d\"} %" PRIu64 "\n", f->shard, f->requests_seen);
    size_t routable = 0;
    for (fe_worker *w = f->workers; w; w = w->next) routable += fe_worker_routable(w);
    family(b, "baton_frontend_workers", "gauge", "Workers known from discovery, and those new requests can go to");
    bt_buf_appendf(b, "baton_frontend_workers{state=\"known\"} %zu\nbaton_frontend_workers{state=\"routable\"} %zu\n",
                   f->nworkers, routable);
    family(b, "baton_frontend_http_connections", "gauge", "Open client connections");
    bt_buf_appendf(b, "baton_frontend_http_connections %zu\n", f->http ? bt_http_server_connections(f->http) : 0);
    family(b, "baton_frontend_worker_routed_total", "counter", "Attempts routed to each worker");
    for (fe_worker *w = f->workers; w; w = w->next)
        bt_buf_appendf(b, "baton_frontend_worker_routed_total{model=\"%s\",worker_id=\"%" PRIx64 "\"} %" PRIu64 "\n",
                       bt_prom_escape(w->model, mq, sizeof mq), w->id, w->routed_total);
    family(b, "baton_frontend_worker_load_reports_total", "counter",
           "Load reports received from each worker, by the plane they came on and whether they were used");
    for (fe_worker *w = f->workers; w; w = w->next) {
        bt_prom_escape(w->model, mq, sizeof mq);
        for (int src = 0; src < 3; src++)
            bt_buf_appendf(b,
                           "baton_frontend_worker_load_reports_total{model=\"%s\",worker_id=\"%" PRIx64
                           "\",source=\"%s\"} %" PRIu64 "\n",
                           mq, w->id, (const char *[]){"request_plane", "event_plane", "request_plane_unused"}[src],
                           w->load_reports[src]);
    }
    bt_events_stats es;
    bt_events_get_stats(f->events, &es);
    family(b, "baton_frontend_event_plane_connected", "gauge", "1 while the event plane is connected");
    bt_buf_appendf(b, "baton_frontend_event_plane_connected{plane=\"%s\"} %d\n", bt_events_plane(f->events),
                   es.connected ? 1 : 0);
    family(b, "baton_frontend_event_plane_connects_total", "counter", "Connections made to the event plane");
    bt_buf_appendf(b, "baton_frontend_event_plane_connects_total %" PRIu64 "\n", es.connects);
    family(b, "baton_frontend_event_plane_messages_total", "counter", "Event-plane load reports, by what became of them");
    bt_buf_appendf(b,
                   "baton_frontend_event_plane_messages_total{result=\"applied\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"unknown_worker\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"invalid\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"overflow\"} %" PRIu64 "\n",
                   es.received - (es.received < f->events_unknown ? es.received : f->events_unknown),
                   f->events_unknown, es.invalid, es.overflow);
    fe_resume_metrics(f, b); /* resumable streams and their journal */
    static const char *wg[] = {"active_decode_blocks", "total_blocks", "active_prefill_tokens", "waiting_requests",
                               "busy", "inflight"};
    static const char *wg_help[] = {"KV blocks in use, as the worker last reported",
                                    "KV blocks the worker has, as it last reported",
                                    "Prompt tokens admitted and not yet prefilled, as the worker last reported",
                                    "Requests queued in the worker's engine, as it last reported",
                                    "1 while the worker is over a busy threshold",
                                    "Streams of this frontend running on the worker"};
    for (size_t g = 0; g < sizeof wg / sizeof wg[0]; g++) {
        char name[64];
        snprintf(name, sizeof name, "baton_frontend_worker_%s", wg[g]);
        family(b, name, "gauge", wg_help[g]);
        for (fe_worker *w = f->workers; w; w = w->next) {
            fe_model *m = fe_model_get(f, w->model, false);
            uint64_t v = 0;
            switch (g) {
            case 0: v = w->load.active_decode_blocks; break;
            case 1: v = w->load.total_blocks; break;
            case 2: v = w->load.active_prefill_tokens; break;
            case 3: v = w->load.waiting; break;
            case 4: v = m ? fe_worker_busy(w, m) : 0; break;
            default: v = w->streams.len; break;
            }
            bt_buf_appendf(b, "%s{model=\"%s\",worker_id=\"%" PRIx64 "\"} %" PRIu64 "\n", name,
                           bt_prom_escape(w->model, mq, sizeof mq), w->id, v);
        }
    }
}
