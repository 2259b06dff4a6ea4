/* canary.c — canary health checks and the engine monitor.
 *
 * Canary (Dynamo's health check, DYN_HEALTH_CHECK_ENABLED): when no request has completed
 * normally for DYN_CANARY_WAIT_TIME seconds, the worker submits a one-token request straight to
 * its engine (in-process, as Dynamo HEAD does). A first token within
 * DYN_HEALTH_CHECK_REQUEST_TIMEOUT seconds marks the endpoint ready; an error, an empty answer or
 * the timeout marks it not ready: /health answers 503 and the LOAD reports lose BT_LOAD_READY, so
 * frontends route nothing new here (running streams continue). A later success restores it. Two
 * choices go past Dynamo: the first canary runs at start-up and the endpoint is ready only once
 * the engine has produced a token; and a canary that timed out stays in the engine, so that the
 * moment a stalled engine moves again its late token restores readiness. At most one canary is
 * in the engine at a time; one still unanswered at the next check is replaced.
 *
 * Engine monitor: while the engine holds sequences (streams or a canary), some sequence must make
 * progress (a token, a finish or an error) at least every --engine-stuck-timeout seconds.
 * Otherwise the engine counts as failed: the worker hands its streams back for migration and
 * exits 1 (drain.c), so that a supervisor restarts it. An idle engine is never "stuck"; with
 * canaries on, an idle engine that hangs is found by the canary that never answers. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "worker/worker_internal.h"

#define MONITOR_TICK_MS 250u

static void arm_idle(wk_worker *w);

static void set_ready(wk_worker *w, bool ready, const char *why) {
    wk_canary *c = &w->canary;
    if (c->ready == ready) return;
    c->ready = ready;
    if (wk_ready(w)) w->was_ready = true; /* ends the starting health status (status.c) */
    if (ready) BT_INFO("endpoint %s: notready -> ready (%s)", w->o.ep, why);
    else BT_WARN("endpoint %s: ready -> notready (%s); frontends route nothing new here", w->o.ep, why);
    wk_send_load(w, NULL); /* tell the frontends now, not at the next periodic report */
}

/* ---- the canary sequence ------------------------------------------------------------------ */

static void canary_over(wk_worker *w) {
    wk_canary *c = &w->canary;
    c->in_flight = false;
    c->seq = NULL;
    uv_timer_stop(&c->timeout_timer);
    arm_idle(w);
}

static void on_canary_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t len) {
    (void)ids;
    (void)text;
    (void)len;
    wk_worker *w = ud;
    wk_canary *c = &w->canary;
    wk_monitor_progress(w);
    if (c->answered || n == 0) return;
    c->answered = true;
    uv_timer_stop(&c->timeout_timer);
    c->last_latency_ms = (double)(bt_now_us() - c->sent_us) / 1000.0;
    if (c->timed_out) {
        c->n_late++;
        BT_INFO("Health check for %s answered late (%.1f ms): the engine moves again", w->o.ep, c->last_latency_ms);
        set_ready(w, true, "late canary answer");
    } else {
        c->n_success++;
        BT_DEBUG("Health check successful for %s (%.1f ms)", w->o.ep, c->last_latency_ms);
        set_ready(w, true, "canary answered");
    }
}

static void on_canary_finish(void *ud, bt_finish_reason reason, const bt_usage *u) {
    (void)reason;
    (void)u;
    wk_worker *w = ud;
    wk_canary *c = &w->canary;
    wk_monitor_progress(w);
    if (!c->answered) {
        c->n_empty++;
        BT_WARN("Health check got no response from %s", w->o.ep);
        set_ready(w, false, "canary ended without a token");
    }
    canary_over(w);
}

static void on_canary_error(void *ud, bt_status code, const char *msg) {
    wk_worker *w = ud;
    wk_canary *c = &w->canary;
    wk_monitor_progress(w);
    if (!c->answered) {
        c->n_error++;
        BT_WARN("Health check error response from %s: %s (%s)", w->o.ep, msg, bt_status_name(code));
        set_ready(w, false, "canary error");
    }
    canary_over(w);
}

static const bt_engine_sink canary_sink = {on_canary_tokens, on_canary_finish, on_canary_error, NULL};

static void on_canary_timeout(uv_timer_t *t) {
    wk_worker *w = t->data;
    wk_canary *c = &w->canary;
    if (!c->in_flight || c->answered) return;
    c->timed_out = true;
    c->n_timeout++;
    BT_WARN("Health check timeout for %s (no first token within %.3gs)", w->o.ep, w->o.canary_timeout);
    set_ready(w, false, "canary timeout");
    arm_idle(w); /* the next check replaces this canary if it is still unanswered by then */
}

static void canary_send(wk_worker *w) {
    wk_canary *c = &w->canary;
    if (w->state != WK_READY || !w->engine || w->engine_failed) return;
    if (c->in_flight) {
        /* still unanswered since the last check: replace it with a fresh one */
        bt_engine_kill(w->engine, c->seq);
        c->in_flight = false;
        c->seq = NULL;
    }
    char rid[48];
    snprintf(rid, sizeof rid, "health-check-%" PRIu64, ++c->seq_no);
    bt_engine_request er = {0};
    er.request_id = rid;
    er.api = c->api;
    er.body = c->body;
    er.max_tokens = 1;
    json_t *t = json_object_get(c->body, "temperature");
    er.temperature = json_is_number(t) ? json_number_value(t) : 0.0;
    char err[256] = "";
    wk_monitor_busy(w);
    c->answered = c->timed_out = false;
    c->sent_us = bt_now_us();
    bt_status st = bt_engine_submit(w->engine, &er, &canary_sink, w, &c->seq, err, sizeof err);
    if (st != BT_OK) {
        c->n_error++;
        BT_ERROR("Health check request failed for %s: %s", w->o.ep, err[0] ? err : bt_status_msg(st));
        set_ready(w, false, "canary could not be submitted");
        arm_idle(w);
        return;
    }
    c->in_flight = true;
    uv_timer_start(&c->timeout_timer, on_canary_timeout, (uint64_t)(w->o.canary_timeout * 1000.0 + 0.5), 0);
}

static void on_idle_timer(uv_timer_t *t) { canary_send(t->data); }

static void arm_idle(wk_worker *w) {
    if (!w->o.canary_enabled || w->state != WK_READY || w->engine_failed) return;
    uv_timer_start(&w->canary.idle_timer, on_idle_timer, (uint64_t)(w->o.canary_wait * 1000.0 + 0.5), 0);
}

void wk_canary_activity(wk_worker *w) {
    wk_canary *c = &w->canary;
    /* only a healthy endpoint postpones its next check; an unhealthy one keeps checking */
    if (w->o.canary_enabled && c->ready && !c->in_flight) arm_idle(w);
}

/* ---- engine monitor ------------------------------------------------------------------------ */

void wk_monitor_progress(wk_worker *w) { w->progress_ms = bt_now_ms(); }

void wk_monitor_busy(wk_worker *w) {
    if (w->nstreams == 0 && !w->canary.in_flight) w->progress_ms = bt_now_ms();
}

static void on_monitor_tick(uv_timer_t *t) {
    wk_worker *w = t->data;
    if (!w->engine || w->engine_failed || w->finishing) return;
    uint64_t now = bt_now_ms();
    size_t seqs = w->nstreams + (w->canary.in_flight ? 1 : 0);
    if (seqs == 0) {
        w->progress_ms = now;
        return;
    }
    double idle_s = (double)(now - w->progress_ms) / 1000.0;
    if (w->o.engine_stuck_timeout > 0 && idle_s >= w->o.engine_stuck_timeout) {
        char why[160];
        snprintf(why, sizeof why, "no progress for %.1fs with %zu sequences in the engine (stuck scheduler)", idle_s,
                 seqs);
        wk_engine_failed(w, why);
    }
}

/* ---- set-up -------------------------------------------------------------------------------- */

/* Reads DYN_HEALTH_CHECK_PAYLOAD: inline JSON or @path (read once, at start-up, before the loop
 * runs). Accepts an OpenAI body ("messages" or "prompt") or Dynamo's token form ("token_ids",
 * optional "sampling_options.temperature"). */
static bool load_payload(wk_worker *w, char *err, size_t errlen) {
    wk_canary *c = &w->canary;
    const char *src = w->o.canary_payload;
    json_error_t jerr;
    json_t *j;
    if (!src || !*src) {
        c->body = json_pack("{s:s, s:i, s:f}", "prompt", "Test", "max_tokens", 1, "temperature", 0.0);
        c->api = BT_API_COMPLETION;
        return c->body != NULL;
    }
    if (src[0] == '@') {
        char why[128];
        int fd = bt_open_regular(src + 1, why, sizeof why); /* a FIFO here would block the start-up */
        if (fd < 0) {
            snprintf(err, errlen, "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) file %s: %s", src + 1, why);
            return false;
        }
        j = json_loadfd(fd, 0, &jerr);
        close(fd);
        if (!j) {
            snprintf(err, errlen, "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) file %s: %s", src + 1, jerr.text);
            return false;
        }
    } else {
        j = json_loads(src, 0, &jerr);
        if (!j) {
            snprintf(err, errlen, "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) is not JSON: %s", jerr.text);
            return false;
        }
    }
    if (!json_is_object(j)) {
        json_decref(j);
        snprintf(err, errlen, "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) must be a JSON object");
        return false;
    }
    json_t *ids = json_object_get(j, "token_ids");
    if (json_object_get(j, "messages")) {
        c->api = BT_API_CHAT;
    } else if (json_object_get(j, "prompt")) {
        c->api = BT_API_COMPLETION;
    } else if (json_is_array(ids) && json_array_size(ids) > 0) {
        /* Dynamo's token form: the ids become the prompt */
        json_object_set(j, "prompt", ids);
        json_t *t = json_object_get(json_object_get(j, "sampling_options"), "temperature");
        if (json_is_number(t)) json_object_set(j, "temperature", t);
        c->api = BT_API_COMPLETION;
    } else {
        json_decref(j);
        snprintf(err, errlen, "DYN_HEALTH_CHECK_PAYLOAD (--health-check-payload) needs \"messages\", \"prompt\" or "
                              "\"token_ids\"");
        return false;
    }
    json_object_set_new(j, "max_tokens", json_integer(1)); /* a canary asks for one token */
    c->body = j;
    return true;
}

/* A payload that is given is checked even with health checks off: the operator learns of a
 * mistake in it now, not on the day the checks are turned on. Without checks and without a
 * payload there is nothing to load. */
bool wk_canary_load(wk_worker *w, char *err, size_t errlen) {
    bool given = w->o.canary_payload && *w->o.canary_payload;
    return (!w->o.canary_enabled && !given) || w->canary.body || load_payload(w, err, errlen);
}

bool wk_canary_init(wk_worker *w, char *err, size_t errlen) {
    wk_canary *c = &w->canary;
    if (!wk_canary_load(w, err, errlen)) return false;
    uv_timer_init(w->loop, &c->idle_timer);
    uv_timer_init(w->loop, &c->timeout_timer);
    uv_timer_init(w->loop, &c->monitor_timer);
    c->idle_timer.data = c->timeout_timer.data = c->monitor_timer.data = w;
    c->timers_inited = true;
    c->ready = !w->o.canary_enabled; /* with canaries on, ready only after the first answer */
    return true;
}

void wk_canary_start(wk_worker *w) {
    wk_canary *c = &w->canary;
    if (w->o.engine_stuck_timeout > 0 && bt_engine_times_own_streams(w->engine)) {
        /* the engine fails a stalled sequence alone (the openai engine, given
         * --engine-stuck-timeout as its per-request stall timeout): one stalled upstream request
         * is no reason to take the worker's other streams down */
        BT_INFO("engine monitor off: the engine fails a sequence without progress for %.3gs by itself",
                w->o.engine_stuck_timeout);
    } else if (w->o.engine_stuck_timeout > 0) {
        uint64_t tick = (uint64_t)(w->o.engine_stuck_timeout * 1000.0 / 4.0);
        if (tick > MONITOR_TICK_MS) tick = MONITOR_TICK_MS;
        if (tick < 10) tick = 10;
        uv_timer_start(&c->monitor_timer, on_monitor_tick, tick, tick);
        BT_INFO("engine monitor on: an engine busy without progress for %.3gs counts as failed (exit code 1)",
                w->o.engine_stuck_timeout);
    }
    if (!w->o.canary_enabled) return;
    BT_INFO("Health check manager started (canary_wait_time: %.3gs, request_timeout: %.3gs)", w->o.canary_wait,
            w->o.canary_timeout);
    BT_INFO("Spawned health check task for endpoint: %s (start-up check now; ready once it answers)", w->o.ep);
    canary_send(w);
}

void wk_canary_stop(wk_worker *w) {
    wk_canary *c = &w->canary;
    if (!c->timers_inited) return;
    uv_timer_stop(&c->idle_timer);
    uv_timer_stop(&c->timeout_timer);
    /* the monitor keeps watching a draining engine; it is closed with every other handle */
    if (c->in_flight && w->engine) bt_engine_kill(w->engine, c->seq);
    c->in_flight = false;
    c->seq = NULL;
}

void wk_canary_free(wk_worker *w) {
    json_decref(w->canary.body);
    w->canary.body = NULL;
}
