/* status.c — the worker's status server on DYN_SYSTEM_PORT (Dynamo's system status server).
 *
 *   GET /health  readiness: 200 {"status":"ready","uptime":{"secs","nanos"},"endpoints":{"generate":"ready"}}
 *                while the worker serves, is not draining and its endpoint passes the canary;
 *                otherwise 503 with "notready". Extra fields: "state", "instance_id". Before the
 *                endpoint is first ready, DYN_SYSTEM_STARTING_HEALTH_STATUS decides instead, unless
 *                DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS names the endpoint (wk_health_ready).
 *   GET /live    liveness: 200 {"status":"live",...} while the process and its engine work (also
 *                while draining or while a canary fails: a restart would not help either), 503
 *                {"status":"dead",...} once the engine has failed and the worker is on its way out.
 *                Dynamo serves /live with the /health handler; baton separates them so that a
 *                Kubernetes liveness probe does not kill a worker that is draining on purpose.
 *   GET /metrics Prometheus text, from a registry (src/common/metrics.h) filled per scrape.
 *   HEAD on each answers as GET does, without the body.
 *
 * The paths follow DYN_SYSTEM_HEALTH_PATH / DYN_SYSTEM_LIVE_PATH. DYN_SYSTEM_PORT -1 turns the
 * server off, 0 picks a free port (logged); a port that cannot be bound is a start-up error. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "http/route.h"
#include "worker/worker_internal.h"

/* ---- metrics ------------------------------------------------------------------------------ */

/* One worker is one registry, never merged: each gauge still declares its rule (the registry's
 * contract): gauges of what the worker holds add up, a state takes the minimum. */

static const double cancel_bounds[] = {1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2, 1e-1};
const bt_hist_buckets wk_cancel_buckets = {cancel_bounds, sizeof cancel_bounds / sizeof cancel_bounds[0]};

/* Fills r from the worker's counters (the model label is any string the operator gave: the
 * registry escapes it). */
static void status_collect(wk_worker *w, bt_metrics *r) {
    bt_engine_load l = {0};
    if (w->engine) bt_engine_get_load(w->engine, &l);
    const char *m = w->o.model_name;
    const wk_canary *c = &w->canary;
    bt_metrics_add(bt_metrics_counter(r, "dynamo_component_requests_total", "Requests received from frontends"),
                   (double)w->requests_total, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "dynamo_component_errors_total", "Requests that ended with an error"),
                   (double)w->requests_error, "model", m, NULL);
    bt_metrics_add(
        bt_metrics_gauge(r, "dynamo_component_inflight_requests", BT_MERGE_SUM, "Streams running on this worker"),
        (double)w->nstreams, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "dynamo_component_tokens_total", "Tokens generated"), (double)w->tokens_total,
                   "model", m, NULL);
    bt_metric_family *f = bt_metrics_counter(
        r, "dynamo_component_cancellation_total",
        "Streams cancelled: by a KILL or STOP frame, or because their frontend's connection was lost");
    bt_metrics_add(f, (double)w->cancel_kill, "model", m, "kind", "kill", NULL);
    bt_metrics_add(f, (double)w->cancel_stop, "model", m, "kind", "stop", NULL);
    bt_metrics_add(f, (double)w->cancel_peer_lost, "model", m, "kind", "frontend_lost", NULL);
    bt_metrics_add_hist(bt_metrics_histogram(r, "baton_worker_cancel_latency_seconds", &wk_cancel_buckets,
                                             "KILL frame arrival to the engine dropping the sequence"),
                        &w->cancel_lat, NULL);
    wk_orphan_collect(w, r);
    wk_handoff_collect(w, r);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_handed_back_total",
                                      "Streams handed back to their frontend when a drain ran out of time"),
                   (double)w->drain.handed_back, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_refused_draining_total",
                                      "Requests refused because the worker was draining"),
                   (double)w->drain.refused, "model", m, NULL);
    bt_metrics_add(
        bt_metrics_gauge(r, "baton_worker_ready", BT_MERGE_MIN, "1 while the endpoint serves and passes its canary"),
        wk_ready(w) ? 1 : 0, NULL);
    bt_metrics_gauge_value(r, "baton_worker_draining", BT_MERGE_MAX, "1 while the worker drains",
                           w->state == WK_DRAINING ? 1 : 0);
    bt_discovery_stats ds;
    bt_discovery_get_stats(w->disc, &ds);
    bt_metrics_gauge_value(r, "baton_worker_discovery_registered", BT_MERGE_MIN,
                           "1 while the worker's discovery key is in the store (etcd: written under its live lease)",
                           ds.registered ? 1 : 0);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_discovery_reregistrations_total",
                                      "Times the worker found its discovery key gone (etcd: its lease expired) and "
                                      "registered again"),
                   (double)ds.reregistrations, NULL);
    bt_metrics_gauge_value(r, "baton_worker_uptime_seconds", BT_MERGE_MAX, "Seconds since the worker started",
                           (double)(bt_now_ms() - w->started_ms) / 1000.0);
    f = bt_metrics_counter(r, "baton_worker_canary_total", "Canary requests, by result");
    bt_metrics_add(f, (double)c->n_success, "result", "success", NULL);
    bt_metrics_add(f, (double)c->n_late, "result", "late_success", NULL);
    bt_metrics_add(f, (double)c->n_timeout, "result", "timeout", NULL);
    bt_metrics_add(f, (double)c->n_error, "result", "error", NULL);
    bt_metrics_add(f, (double)c->n_empty, "result", "no_response", NULL);
    bt_metrics_gauge_value(r, "baton_worker_canary_last_latency_seconds", BT_MERGE_MAX,
                           "Latency of the last canary request", c->last_latency_ms / 1000.0);
    bt_metrics_gauge_value(r, "baton_worker_active_sequences", BT_MERGE_SUM,
                           "Sequences in the engine, running or waiting", (double)(l.running + l.waiting));
    bt_metrics_gauge_value(r, "baton_worker_kv_active_blocks", BT_MERGE_SUM, "KV blocks in use",
                           (double)l.active_decode_blocks);
    bt_metrics_gauge_value(r, "baton_worker_kv_total_blocks", BT_MERGE_SUM, "KV blocks of the engine",
                           (double)l.total_blocks);
    bt_metrics_gauge_value(r, "baton_worker_waiting_requests", BT_MERGE_SUM,
                           "Sequences waiting in the engine: queued, or admitted but left out of its steps", (double)l.waiting);
    bt_metrics_gauge_value(r, "baton_worker_frontend_connections", BT_MERGE_SUM,
                           "Frontends connected on the request plane", (double)w->npeers);
    bt_events_stats es;
    bt_events_get_stats(w->events, &es);
    bt_events_collect(w->events, &es, r, "baton_worker");
    f = bt_metrics_counter(r, "baton_worker_event_plane_load_reports_total",
                           "Load reports for the event plane, published or dropped");
    bt_metrics_add(f, (double)es.published, "result", "published", NULL);
    bt_metrics_add(f, (double)es.dropped, "result", "dropped", NULL);
}

/* ---- health settings ---------------------------------------------------------------------- */

bool wk_health_config(wk_opts *o, char *err, size_t errlen) {
    if (strcmp(o->starting_health, "ready") == 0) {
        o->starting_ready = true;
    } else if (strcmp(o->starting_health, "notready") == 0) {
        o->starting_ready = false;
    } else {
        snprintf(err, errlen,
                 "invalid DYN_SYSTEM_STARTING_HEALTH_STATUS (--system-starting-health-status) '%.64s': expected "
                 "ready or notready",
                 o->starting_health);
        return false;
    }
    o->health_listed = false;
    json_t *list = json_loads(o->endpoint_health, 0, NULL);
    bool ok = json_is_array(list);
    size_t i;
    json_t *v;
    json_array_foreach(list, i, v) ok = ok && json_is_string(v);
    if (!ok) {
        json_decref(list);
        snprintf(err, errlen,
                 "invalid DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS (--system-use-endpoint-health-status) '%.64s': "
                 "expected a JSON list of endpoint names, such as [\"%s\"]",
                 o->endpoint_health, o->ep);
        return false;
    }
    /* baton serves one endpoint per worker: a name that is not it could never be ready */
    json_array_foreach(list, i, v) {
        if (strcmp(json_string_value(v), o->ep) != 0) {
            snprintf(err, errlen,
                     "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS names endpoint '%.64s', which this worker does not "
                     "serve: it serves '%s' (--endpoint %.100s)",
                     json_string_value(v), o->ep, o->endpoint);
            json_decref(list);
            return false;
        }
        o->health_listed = true;
    }
    json_decref(list);
    return true;
}

bool wk_health_ready(const wk_worker *w) {
    if (wk_ready(w)) return true;
    /* the endpoint's readiness alone, once it has been ready or when the list names it; never
     * ready while draining, after an engine failure or while the engine cannot serve */
    if (w->o.health_listed || w->was_ready || w->engine_failed || w->engine_unserving || w->state == WK_DRAINING ||
        w->state == WK_GONE)
        return false;
    return w->o.starting_ready; /* registering, or waiting for the first canary */
}

/* ---- the server ---------------------------------------------------------------------------- */

static void health_body(wk_worker *w, bt_buf *b, bool ready) {
    uint64_t up = bt_now_ms() - w->started_ms;
    bool ep_ready = wk_ready(w);
    bt_buf_appendf(b,
                   "{\"status\":\"%s\",\"uptime\":{\"secs\":%" PRIu64 ",\"nanos\":%" PRIu64
                   "},\"endpoints\":{\"%s\":\"%s\"},\"state\":\"%s\",\"instance_id\":%" PRIu64 "}",
                   ready ? "ready" : "notready", up / 1000, (up % 1000) * 1000000, w->o.ep,
                   ep_ready ? "ready" : "notready", wk_state_name(w->state), w->instance_id);
}

static void route_metrics(void *ud, bt_http_req *req, const char *tail) {
    (void)tail;
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    bt_metrics *r = bt_metrics_new();
    if (r) status_collect(ud, r);
    bt_metrics_render(r, &b);                                             /* a failed registry poisons b */
    bt_http_respond_buf(req, 200, "text/plain; version=0.0.4", NULL, &b); /* or 500, b's error */
    bt_metrics_free(r);
    bt_buf_free(&b);
}

static void route_health(void *ud, bt_http_req *req, const char *tail) {
    (void)tail;
    wk_worker *w = ud;
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    bool ready = wk_health_ready(w);
    health_body(w, &b, ready);
    bt_http_respond(req, ready ? 200 : 503, "application/json", NULL, b.data, b.len);
    bt_buf_free(&b);
}

static void route_live(void *ud, bt_http_req *req, const char *tail) {
    (void)tail;
    wk_worker *w = ud;
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    uint64_t up = bt_now_ms() - w->started_ms;
    bool live = !w->engine_failed;
    bt_buf_appendf(&b, "{\"status\":\"%s\",\"message\":\"%s\",\"uptime\":{\"secs\":%" PRIu64 ",\"nanos\":%" PRIu64
                       "},\"state\":\"%s\"}",
                   live ? "live" : "dead", live ? "Worker is live" : "Engine failed; worker is shutting down",
                   up / 1000, (up % 1000) * 1000000, wk_state_name(w->state));
    bt_http_respond(req, live ? 200 : 503, "application/json", NULL, b.data, b.len);
    bt_buf_free(&b);
}

/* POST /rebalance?streams=N (default 1; --rebalance-endpoint): moves up to N running streams to
 * other workers through the KV hand-off; answers {"moved": k, "running": streams left}. 409 while
 * the worker is not ready (draining: it gives back everything anyway). */
static void route_rebalance(void *ud, bt_http_req *req, const char *tail) {
    (void)tail;
    wk_worker *w = ud;
    long long n = 1;
    const char *q = strstr(req->query, "streams=");
    if (q) {
        char *end;
        n = strtoll(q + 8, &end, 10);
        if (end == q + 8 || (*end && *end != '&') || n < 0 || n > 1000000) {
            const char *m = "{\"error\":\"streams must be an integer from 0 to 1000000\"}";
            bt_http_respond(req, 400, "application/json", NULL, m, strlen(m));
            return;
        }
    }
    if (w->state != WK_READY) {
        const char *m = "{\"error\":\"the worker is not ready (draining or starting)\"}";
        bt_http_respond(req, 409, "application/json", NULL, m, strlen(m));
        return;
    }
    size_t moved = wk_handoff_rebalance(w, (size_t)n);
    char b[128];
    int len = snprintf(b, sizeof b, "{\"moved\":%zu,\"running\":%zu}", moved, w->nstreams);
    bt_http_respond(req, 200, "application/json", NULL, b, (size_t)len);
}

/* GET (and HEAD: the same answer without its body), and POST /rebalance when enabled; the health
 * and live paths are the operator's (DYN_SYSTEM_HEALTH_PATH, DYN_SYSTEM_LIVE_PATH), so the table
 * is built per worker. */
static void on_status_request(void *ud, bt_http_req *req) {
    wk_worker *w = ud;
    const bt_http_route routes[] = {
        {"/metrics", BT_ROUTE_GET, BT_ROUTE_OPEN, route_metrics},
        {w->o.health_path, BT_ROUTE_GET, BT_ROUTE_OPEN, route_health},
        {w->o.live_path, BT_ROUTE_GET, BT_ROUTE_OPEN, route_live},
        {"/rebalance", BT_ROUTE_POST, BT_ROUTE_OPEN, route_rebalance},
    };
    /* A browser page may POST here as to any address (no preflight for a simple request): only
     * the operator's scripts have business with /rebalance, and they send no Origin. GETs change
     * nothing and their answers stay hidden from other origins (no CORS headers), so probes that
     * carry an Origin are still served (docs/security.md). */
    if (req->origin && req->method != BT_HTTP_GET && req->method != BT_HTTP_HEAD) {
        const char *m = "{\"error\":\"cross-origin browser requests are refused by the status server\"}";
        bt_http_respond(req, 403, "application/json", NULL, m, strlen(m));
        return;
    }
    const bt_http_route *r;
    const char *tail;
    size_t nroutes = sizeof routes / sizeof routes[0] - (w->o.rebalance_endpoint ? 0 : 1);
    if (bt_http_route_find(routes, nroutes, req->method, req->path, &r, &tail) ==
        BT_ROUTE_FOUND)
        r->handler(w, req, tail);
    else bt_http_respond(req, 404, "text/plain", NULL, "Route not found", 15);
}

static void on_status_abort(void *ud, bt_http_req *req) {
    (void)ud;
    (void)req;
}

bt_status wk_status_start(wk_worker *w, char *err, size_t errlen) {
    wk_opts *o = &w->o;
    if (o->system_port < 0) {
        BT_INFO("status server off (DYN_SYSTEM_PORT=-1)");
        return BT_OK;
    }
    bt_http_config hc;
    bt_http_config_default(&hc);
    hc.host = o->system_host;
    hc.port = (int)o->system_port;
    hc.max_body_bytes = 64 << 10;
    hc.allowed_hosts = o->allowed_hosts;
    bt_http_handlers hh = {on_status_request, on_status_abort, NULL, NULL};
    char why[200];
    bt_status st = bt_http_server_start(w->loop, &hc, &hh, w, &w->status, why, sizeof why);
    if (st != BT_OK) {
        /* the setting that fixes it: an address this machine does not have is not the port's fault */
        if (strstr(why, uv_strerror(UV_EADDRNOTAVAIL)))
            snprintf(err, errlen,
                     "cannot start the status server (DYN_SYSTEM_HOST=%s): %s; this machine has no such address: "
                     "choose another DYN_SYSTEM_HOST (--system-host), or -1 as DYN_SYSTEM_PORT to turn the status "
                     "server off",
                     o->system_host, why);
        else
            snprintf(err, errlen,
                     "cannot start the status server (DYN_SYSTEM_PORT=%lld): %s; choose another port, 0 for a free "
                     "one, or -1 to turn the status server off",
                     (long long)o->system_port, why);
        return st;
    }
    BT_INFO("status server listening on %s:%d (%s, %s, /metrics)", o->system_host, bt_http_server_port(w->status),
            o->health_path, o->live_path);
    if (o->health_listed)
        BT_INFO("%s follows endpoint %s from the start (DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS)", o->health_path,
                o->ep);
    else if (o->starting_ready)
        BT_INFO("%s reports ready until endpoint %s is first ready, then follows it "
                "(DYN_SYSTEM_STARTING_HEALTH_STATUS=ready)",
                o->health_path, o->ep);
    return BT_OK;
}

void wk_status_close(wk_worker *w, void (*done)(void *ud)) {
    bt_http_server *s = w->status;
    w->status = NULL;
    if (s) bt_http_server_close(s, done, w);
    else done(w);
}
