/* metrics.c — the frontend's Prometheus text (/metrics).
 *
 * Hand-written: the exposition format is a few lines of text, and no Debian C library for it is
 * worth a dependency. Names follow Dynamo (dynamo_frontend_*) where Dynamo has one; baton's own
 * additions are prefixed baton_. */
#include <inttypes.h>
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

static void hist(bt_buf *b, const char *name, const char *model, const fe_hist *h) {
    uint64_t cum = 0;
    for (size_t i = 0; i < FE_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        bt_buf_appendf(b, "%s_bucket{model=\"%s\",le=\"%g\"} %" PRIu64 "\n", name, model, bounds[i], cum);
    }
    cum += h->counts[FE_HIST_BUCKETS];
    bt_buf_appendf(b, "%s_bucket{model=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name, model, cum);
    bt_buf_appendf(b, "%s_sum{model=\"%s\"} %.6f\n%s_count{model=\"%s\"} %" PRIu64 "\n", name, model, h->sum, name,
                   model, h->n);
}

static const char *api_endpoint[2] = {"chat_completions", "completions"};
static const char *req_type[2] = {"unary", "stream"};
static const char *outcome_name[FE_OUT_N_] = {"success", "error", "cancelled", "rejected"};

void fe_metrics_render(fe *f, bt_buf *b) {
    bt_buf_append_str(b, "# HELP dynamo_frontend_requests_total Requests by model, endpoint, type and outcome\n"
                         "# TYPE dynamo_frontend_requests_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        for (int a = 0; a < 2; a++)
            for (int s = 0; s < 2; s++)
                for (int o = 0; o < FE_OUT_N_; o++)
                    bt_buf_appendf(b,
                                   "dynamo_frontend_requests_total{model=\"%s\",endpoint=\"%s\",request_type=\"%s\","
                                   "status=\"%s\"} %" PRIu64 "\n",
                                   m->name, api_endpoint[a], req_type[s], outcome_name[o], m->st.requests[a][s][o]);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_inflight_requests gauge\n");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_inflight_requests{model=\"%s\"} %" PRId64 "\n", m->name, m->st.inflight);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_output_tokens_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_output_tokens_total{model=\"%s\"} %" PRIu64 "\n", m->name, m->st.tokens_out);
    struct {
        const char *name;
        size_t off;
    } hs[] = {{"dynamo_frontend_time_to_first_token_seconds", offsetof(fe_stats, ttft)},
              {"dynamo_frontend_inter_token_latency_seconds", offsetof(fe_stats, itl)},
              {"dynamo_frontend_request_duration_seconds", offsetof(fe_stats, duration)},
              {"dynamo_frontend_model_migration_stall_seconds", offsetof(fe_stats, migration_stall)}};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
        bt_buf_appendf(b, "# TYPE %s histogram\n", hs[i].name);
        for (fe_model *m = f->models; m; m = m->next)
            hist(b, hs[i].name, m->name, (const fe_hist *)((const char *)&m->st + hs[i].off));
    }
    bt_buf_append_str(b, "# TYPE dynamo_frontend_model_migration_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b,
                       "dynamo_frontend_model_migration_total{model=\"%s\",migration_type=\"new_request\"} %" PRIu64
                       "\n"
                       "dynamo_frontend_model_migration_total{model=\"%s\",migration_type=\"ongoing_request\"} "
                       "%" PRIu64 "\n",
                       m->name, m->st.migrations_new, m->name, m->st.migrations_ongoing);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_model_migration_limit gauge\n");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_model_migration_limit{model=\"%s\"} %" PRId64 "\n", m->name,
                       f->o.migration_limit);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_model_migration_exhausted_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        bt_buf_appendf(b, "dynamo_frontend_model_migration_exhausted_total{model=\"%s\"} %" PRIu64 "\n", m->name,
                       m->st.migrations_exhausted);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_model_cancellation_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        for (int s = 0; s < 2; s++)
            bt_buf_appendf(b, "dynamo_frontend_model_cancellation_total{model=\"%s\",request_type=\"%s\"} %" PRIu64 "\n",
                           m->name, req_type[s], m->st.cancellations[s]);
    bt_buf_append_str(b, "# TYPE dynamo_frontend_model_rejection_total counter\n");
    for (fe_model *m = f->models; m; m = m->next)
        for (int a = 0; a < 2; a++)
            bt_buf_appendf(b, "dynamo_frontend_model_rejection_total{model=\"%s\",endpoint=\"%s\"} %" PRIu64 "\n",
                           m->name, api_endpoint[a], m->st.rejections[a]);
    bt_buf_appendf(b, "# TYPE dynamo_frontend_disconnected_clients counter\ndynamo_frontend_disconnected_clients %" PRIu64
                      "\n", f->disconnected_clients);
    bt_http_stats hstat;
    bt_http_server_stats(f->http, &hstat);
    bt_buf_appendf(b,
                   "# TYPE baton_frontend_http_rejections_total counter\n"
                   "baton_frontend_http_rejections_total{reason=\"max_connections\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"bad_request\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"body_too_large\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"header_too_large\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"header_timeout\"} %" PRIu64 "\n"
                   "baton_frontend_http_rejections_total{reason=\"slow_reader\"} %" PRIu64 "\n",
                   hstat.max_connections, hstat.bad_request, hstat.body_too_large, hstat.header_too_large,
                   hstat.header_timeout,
                   hstat.slow_reader);
    bt_buf_appendf(b, "# TYPE baton_frontend_limit_rejections_total counter\nbaton_frontend_limit_rejections_total %" PRIu64
                      "\n", f->limit_rejections);
    /* per event loop (--threads): how the kernel spread the load; the merge keeps one series each */
    bt_buf_appendf(b, "# TYPE baton_frontend_thread_requests_total counter\n"
                      "baton_frontend_thread_requests_total{thread=\"%d\"} %" PRIu64 "\n",
                   f->shard, f->requests_seen);
    size_t routable = 0;
    for (fe_worker *w = f->workers; w; w = w->next) routable += fe_worker_routable(w);
    bt_buf_appendf(b, "# TYPE baton_frontend_workers gauge\nbaton_frontend_workers{state=\"known\"} %zu\n"
                      "baton_frontend_workers{state=\"routable\"} %zu\n", f->nworkers, routable);
    bt_buf_appendf(b, "# TYPE baton_frontend_http_connections gauge\nbaton_frontend_http_connections %zu\n",
                   f->http ? bt_http_server_connections(f->http) : 0);
    bt_buf_append_str(b, "# TYPE baton_frontend_worker_routed_total counter\n");
    for (fe_worker *w = f->workers; w; w = w->next)
        bt_buf_appendf(b, "baton_frontend_worker_routed_total{model=\"%s\",worker_id=\"%" PRIx64 "\"} %" PRIu64 "\n",
                       w->model, w->id, w->routed_total);
    bt_buf_append_str(b, "# TYPE baton_frontend_worker_load_reports_total counter\n");
    for (fe_worker *w = f->workers; w; w = w->next)
        for (int src = 0; src < 3; src++)
            bt_buf_appendf(b,
                           "baton_frontend_worker_load_reports_total{model=\"%s\",worker_id=\"%" PRIx64
                           "\",source=\"%s\"} %" PRIu64 "\n",
                           w->model, w->id, (const char *[]){"request_plane", "event_plane", "request_plane_unused"}[src],
                           w->load_reports[src]);
    bt_events_stats es;
    bt_events_get_stats(f->events, &es);
    bt_buf_appendf(b,
                   "# TYPE baton_frontend_event_plane_connected gauge\n"
                   "baton_frontend_event_plane_connected{plane=\"%s\"} %d\n"
                   "# TYPE baton_frontend_event_plane_connects_total counter\n"
                   "baton_frontend_event_plane_connects_total %" PRIu64 "\n"
                   "# TYPE baton_frontend_event_plane_messages_total counter\n"
                   "baton_frontend_event_plane_messages_total{result=\"applied\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"unknown_worker\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"invalid\"} %" PRIu64 "\n"
                   "baton_frontend_event_plane_messages_total{result=\"overflow\"} %" PRIu64 "\n",
                   bt_events_plane(f->events), es.connected ? 1 : 0, es.connects,
                   es.received - (es.received < f->events_unknown ? es.received : f->events_unknown),
                   f->events_unknown, es.invalid, es.overflow);
    fe_resume_metrics(f, b); /* resumable streams and their journal */
    static const char *wg[] = {"active_decode_blocks", "total_blocks", "active_prefill_tokens", "waiting_requests",
                               "busy", "inflight"};
    for (size_t g = 0; g < sizeof wg / sizeof wg[0]; g++) {
        bt_buf_appendf(b, "# TYPE baton_frontend_worker_%s gauge\n", wg[g]);
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
            bt_buf_appendf(b, "baton_frontend_worker_%s{model=\"%s\",worker_id=\"%" PRIx64 "\"} %" PRIu64 "\n", wg[g],
                           w->model, w->id, v);
        }
    }
}
