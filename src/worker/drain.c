/* drain.c — the worker's shutdown sequence and its engine-failure path.
 *
 * SIGTERM/SIGINT/SIGHUP: (1) send GOAWAY on every frontend connection and a LOAD without
 * BT_LOAD_READY, so that connected frontends route nothing new at once (discovery watches may lag;
 * the request plane does not); a REQUEST that crossed the GOAWAY is refused with the migratable
 * BT_ERR_DRAINING and retried elsewhere; (2) delete the instance's discovery key, so that no
 * frontend discovers or picks this worker from now on. The GOAWAY goes first, written to the
 * sockets before the delete is even queued: a frontend keeps a worker whose key vanished while its
 * connection is healthy for a grace (a lease lost to an etcd pause looks the same as a delete), and
 * it is the GOAWAY that tells it this one is leaving; (3) let running streams finish for up to
 * --graceful-shutdown-timeout seconds; (4) end the streams still running with the migratable
 * BT_ERR_SHUTDOWN ("engine shutting down") so that the frontends continue them on other workers
 * with their tokens carried; (5) no sooner than 200 ms after the GOAWAY (so that requests still
 * on the wire are refused, not lost), close the engine, the connections, the status server and
 * discovery, and exit 0. A second signal exits at once.
 *
 * Engine failure (the engine's on_dead hook, or the engine monitor in canary.c finding it stuck)
 * takes the same path without the wait: every stream is handed back at once and the process exits
 * 1, so that a supervisor (systemd, Kubernetes, `baton run`) restarts it.
 *
 * One summary line at the end records what the drain saw, including how long after the signal
 * the last request arrived (how quickly the frontends stopped routing here). */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/proc.h"
#include "common/util.h"
#include "proto/proto.h"
#include "worker/worker_internal.h"

static void worker_finish(wk_worker *w);

/* ---- closing ----------------------------------------------------------------------------- */

static void on_planes_closed(void *ud) { wk_set_state(ud, WK_GONE); }

/* then every remaining handle (signals, timers) closes; the loop ends */
static void on_status_closed(void *ud) {
    wk_worker *w = ud;
    bt_proc_close_planes(&w->closer, w->loop, &w->disc, &w->events, on_planes_closed, w);
}

static void log_summary(wk_worker *w) {
    wk_drain_stats *d = &w->drain;
    uint64_t now = bt_now_us();
    double last = d->last_request_us ? (double)(d->last_request_us - d->started_us) / 1000.0 : -1.0;
    BT_INFO("drain summary: streams_at_start=%zu finished=%" PRIu64 " handed_back=%" PRIu64 " refused=%" PRIu64
            " last_request_after_ms=%.3f duration_ms=%.1f exit_code=%d handback_after_ms=%.3f",
            d->streams_at_start, w->requests_ok - d->ok_at_start, d->handed_back, d->refused, last,
            (double)(now - d->started_us) / 1000.0, w->exit_code,
            d->handback_us ? (double)(d->handback_us - d->started_us) / 1000.0 : -1.0);
}

/* Everything in flight is over (finished or handed back): close and let the loop end. */
static void worker_finish(wk_worker *w) {
    if (w->finishing) return;
    /* streams handed back with their KV state: their states go out first (handoff.c) */
    if (wk_handoff_when_idle(w, worker_finish)) return;
    w->finishing = true;
    uv_timer_stop(&w->drain_timer);
    log_summary(w);
    BT_INFO("worker %" PRIx64 ": drained in %.1f ms; closing (exit code %d)", w->instance_id,
            (double)(bt_now_us() - w->drain.started_us) / 1000.0, w->exit_code);
    wk_canary_stop(w);
    if (w->listener) bt_rpc_listener_close(w->listener);
    w->listener = NULL;
    /* every connection, including those still in their handshake */
    uint64_t k;
    void *v;
    size_t it = 0;
    while (bt_map_next(&w->conns, &it, &k, &v)) {
        bt_rpc_flush(v);
        bt_rpc_conn_close(v, BT_OK, "worker exiting");
    }
    bt_engine_destroy(w->engine);
    w->engine = NULL;
    wk_status_close(w, on_status_closed);
}

static void on_finish_timer(uv_timer_t *t) { worker_finish(t->data); }

/* A REQUEST that a frontend sent before it read the GOAWAY may still be on the wire. The
 * connections stay open at least this long after the GOAWAY, so that such a request is refused
 * with BT_ERR_DRAINING and re-routed by its frontend instead of being lost with the connection
 * (which, with migration off, the client would see). Frontends read the GOAWAY within a few
 * milliseconds (docs/benchmarks.md, "Graceful shutdown"). */
#define DRAIN_LINGER_MS 200u

/* Finishing destroys the engine, which must not happen inside one of its callbacks. */
static void worker_finish_soon(wk_worker *w) {
    if (w->finishing) return;
    uint64_t delay = 0;
    if (w->npeers > 0 && w->drain.started_us) {
        uint64_t el_ms = (bt_now_us() - w->drain.started_us) / 1000u;
        if (el_ms < DRAIN_LINGER_MS) delay = DRAIN_LINGER_MS - el_ms;
    }
    uv_timer_start(&w->drain_timer, on_finish_timer, delay, 0);
}

/* ---- draining ---------------------------------------------------------------------------- */

/* Ends every running stream with a migratable error so that frontends continue it elsewhere. */
static void hand_back_all(wk_worker *w, const char *why) {
    if (w->nstreams) w->drain.handback_us = bt_now_us();
    wk_peer *p;
    wk_stream *s;
    while ((s = wk_find_stream(w, NULL, NULL, &p)) != NULL) {
        BT_INFO("request %s handed back for migration after %u new tokens (%s)", s->rid, s->tokens, why);
        if (w->engine_failed) {
            /* a failed engine's KV state is not to be trusted (NaN logits came from it), and a hung
             * one would never export it: a plain, migratable error; the next worker re-prefills */
            if (s->p) wk_send_stream_error(s->p, s->id, BT_ERR_SHUTDOWN, "engine failed");
            bt_engine_kill(w->engine, s->seq);
        } else {
            wk_handoff_give_back(s, BT_ERR_SHUTDOWN, "engine shutting down"); /* with its KV state */
        }
        w->drain.handed_back++;
        bt_map_del(&p->streams, s->id);
        w->nstreams--;
        bt_ctx_free(s->ctx);
        free(s);
    }
    for (p = LIST_FIRST(&w->peers); p; p = LIST_NEXT(p, link)) bt_rpc_flush(p->conn);
}

static void on_drain_timeout(uv_timer_t *t) {
    wk_worker *w = t->data;
    BT_WARN("graceful shutdown timeout (%llds) reached with %zu streams running; handing them back",
            (long long)w->o.graceful_timeout, w->nstreams);
    hand_back_all(w, "drain bound reached");
    worker_finish(w);
}

void wk_drain_note_refused(wk_worker *w) {
    w->drain.refused++;
    w->drain.last_request_us = bt_now_us();
}

void wk_drain_stream_ended(wk_worker *w) {
    if (w->state == WK_DRAINING && w->nstreams == 0) worker_finish_soon(w);
}

void wk_drain_begin(wk_worker *w, const char *why, bool immediate) {
    if (w->state == WK_GONE || w->finishing) return;
    if (w->state == WK_DRAINING) {
        /* already draining (a signal came first): an engine failure ends the wait now */
        if (immediate) {
            BT_WARN("%s while draining: handing back %zu streams now", why, w->nstreams);
            uv_timer_stop(&w->drain_timer);
            hand_back_all(w, why);
            worker_finish_soon(w);
        }
        return;
    }
    wk_drain_stats *d = &w->drain;
    d->started_us = bt_now_us();
    d->streams_at_start = w->nstreams;
    d->ok_at_start = w->requests_ok;
    BT_INFO("Received shutdown signal (%s); unregistering endpoints from discovery, then draining %zu streams "
            "(bound %llds)",
            why, w->nstreams, immediate ? 0LL : (long long)w->o.graceful_timeout);
    wk_set_state(w, WK_DRAINING);
    wk_canary_stop(w);
    wk_orphan_kill_all(w, WK_ORPHAN_EV_DRAINED); /* no frontend can adopt them from a draining worker */
    /* 1. tell every connected frontend at once, and flush now rather than at the end of the
     * loop iteration: this is what makes routing stop within milliseconds, and it reaches each
     * frontend before the deletion below can (see the top of this file) */
    for (wk_peer *p = LIST_FIRST(&w->peers); p; p = LIST_NEXT(p, link)) {
        bt_buf *b = bt_rpc_wbuf(p->conn);
        if (b) bt_frame_put_goaway(b, BT_ERR_DRAINING, why);
    }
    wk_send_load(w, NULL);
    for (wk_peer *p = LIST_FIRST(&w->peers); p; p = LIST_NEXT(p, link)) bt_rpc_flush(p->conn);
    /* 2. out of discovery, so no frontend discovers or picks this worker from now on */
    if (w->disc && w->key[0]) {
        bt_status st = bt_discovery_delete(w->disc, w->key);
        if (st == BT_OK)
            BT_INFO("Successfully unregistered endpoint instance from discovery - worker removed from routing pool");
        else BT_WARN("cannot unregister %s from discovery (%s); GOAWAY still stops routing", w->key, bt_status_msg(st));
    }
    /* 3. let running streams finish, within the bound */
    if (immediate || w->o.graceful_timeout == 0) hand_back_all(w, immediate ? why : "drain bound is 0");
    if (w->nstreams == 0) {
        worker_finish_soon(w);
        return;
    }
    uv_timer_start(&w->drain_timer, on_drain_timeout, (uint64_t)w->o.graceful_timeout * 1000, 0);
}

/* ---- engine failure ---------------------------------------------------------------------- */

static void on_engine_dead_timer(uv_timer_t *t) {
    wk_worker *w = t->data;
    wk_drain_begin(w, w->engine_failure, true);
}

void wk_engine_failed(wk_worker *w, const char *why) {
    if (w->engine_failed || w->finishing) return;
    w->engine_failed = true;
    w->exit_code = 1;
    snprintf(w->engine_failure, sizeof w->engine_failure, "engine failed: %s", why);
    BT_ERROR("Engine health check failed: %s", why);
    BT_ERROR("Initiating worker shutdown: in-flight streams are handed back for migration (exit code 1)");
    /* the drain kills sequences, which must not happen inside an engine callback */
    uv_timer_start(&w->dead_timer, on_engine_dead_timer, 0, 0);
}

void wk_engine_dead_hook(void *ud, const char *why) { wk_engine_failed(ud, why); }

/* ---- signals ----------------------------------------------------------------------------- */

/* The slow fault: off if on, else on at --fault-slow-factor (3 if unset). */
static void on_sigwinch(uv_signal_t *h, int signum) {
    (void)signum;
    wk_worker *w = h->data;
    if (!w->o.fault_signals || !w->engine || strcmp(w->o.engine, "mocker") != 0) return;
    double f = w->o.mocker.fault_slow_factor > 1.0 ? w->o.mocker.fault_slow_factor : 3.0;
    w->slowed = !w->slowed;
    BT_WARN("fault signal SIGWINCH: slow fault %s", w->slowed ? "on" : "off");
    bt_mocker_set_slow(w->engine, w->slowed ? f : 1.0);
}

/* SIGUSR1/SIGUSR2 with --fault-signals on the mocker or llama engine; false (the signal is
 * ignored, bt_proc_signals_start) otherwise. */
static bool on_user_signal(void *data, int signum) {
    wk_worker *w = data;
    bool llama = strcmp(w->o.engine, "llama") == 0;
    if (!w->o.fault_signals || !w->engine || (strcmp(w->o.engine, "mocker") != 0 && !llama)) return false;
    BT_WARN("fault signal %s: %s", bt_proc_signal_name(signum),
            signum == SIGUSR1 ? "engine death" : "engine stall toggle");
    if (signum == SIGUSR2) w->stalled = !w->stalled;
    bt_mocker_fault f = signum == SIGUSR1 ? BT_MOCKER_FAULT_DIE
                        : w->stalled      ? BT_MOCKER_FAULT_STALL
                                          : BT_MOCKER_FAULT_RESUME;
    if (llama) bt_llama_inject(w->engine, (int)f);
    else bt_mocker_inject(w->engine, f);
    return true;
}

static void on_stop_signal(void *data, int signum) {
    wk_worker *w = data;
    const char *name = bt_proc_signal_name(signum);
    if (++w->signals_seen > 1) {
        if (bt_proc_supervised) return; /* the same stop reaching the whole group: `baton run` escalates */
        /* forced: a failure already decided keeps its status, else 128 + the signal, which a
         * script must be able to tell from a drain (as `baton run` does) */
        int code = w->exit_code ? w->exit_code : 128 + signum;
        BT_WARN("second signal (%s): exiting at once (status %d)", name, code);
        _exit(code);
    }
    char why[32];
    snprintf(why, sizeof why, "%s received", name);
    wk_drain_begin(w, why, false);
}

void wk_drain_init(wk_worker *w) {
    w->slowed = w->o.mocker.fault_slow_factor > 1.0; /* started slow: the first SIGWINCH heals it */
    bt_proc_signals_start(w->loop, &w->sigs, on_stop_signal, on_user_signal, w);
    uv_signal_init(w->loop, &w->sig_winch);
    w->sig_winch.data = w;
    uv_signal_start(&w->sig_winch, on_sigwinch, SIGWINCH);
}
