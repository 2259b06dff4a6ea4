/* workers.c — the frontend's view of the workers: discovery, connections, load and routing.
 *
 * A worker appears when its discovery key appears; the frontend then keeps one request-plane
 * connection to it, reconnecting with backoff while the key exists. A worker is routable when its
 * connection is open, it has not sent GOAWAY, it is not quarantined, its last load report says
 * ready, and it is not busy by the shedding thresholds. A failure quarantines it until it proves
 * itself again (a successful reconnect and handshake: the probe) or discovery re-announces it;
 * there is no time limit, so a worker that keeps failing its probe is never routed to.
 *
 * When the key disappears the worker is draining or dead: nothing new is routed to it, running
 * streams continue, and it is forgotten once the last one ends. Unless its connection is healthy
 * then (open, handshaken, load reports current, no GOAWAY, not quarantined): a key also vanishes
 * when etcd expires the lease of a worker that could not renew it (etcd paused or cut off for
 * longer than the TTL), and a frontend that dropped every such worker at once answered 503 until
 * they had registered again. Such a worker is kept routable for --discovery-grace seconds (its
 * grace); a put of its key keeps it, and the grace's end, a GOAWAY or the connection's end drops it
 * as the deletion would have. A draining worker sends its GOAWAY before it deletes its key
 * (src/worker/drain.c), so it is never kept: routing to it stops at the GOAWAY, as before.
 *
 * A continuation that carries a KV state (docs/protocol.md, "KV hand-off") is written here too:
 * its pieces go out paced by a timer of the frontend's loop (below BT_KV_WATERMARK unsent bytes,
 * BT_KV_INFLIGHT states per connection in turns), its REQUEST held until the last piece is out,
 * so that the frames of other streams never queue behind a whole state. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "frontend/fe.h"

#define LOAD_STALE_MS 3000u     /* a load report older than this says nothing about busy-ness */
#define EVENT_FRESH_MS 2000u    /* workers publish at least every second; past this, LOAD frames count */
#define RELEASE_TAU_S 5.0       /* time constant of the block release rate estimate */
#define RETRY_AFTER_MIN_S 1
#define RETRY_AFTER_MAX_S 30
#define RETRY_AFTER_UNKNOWN_S 5 /* nothing has finished recently: no rate to go by */
#define BACKOFF_MIN_MS 50u
#define BACKOFF_MAX_MS 2000u

static const char *fw_state_names[] = {"connecting", "ready", "down"};

static void set_state(fe_worker *w, fw_state s, const char *why) {
    if (w->state == s) return;
    BT_INFO("worker %" PRIx64 " (%s): %s -> %s (%s)", w->id, w->transport, fw_state_names[w->state],
            fw_state_names[s], why);
    bool was_ready = w->state == FW_READY;
    w->state = s;
    if (was_ready || s == FW_READY) { /* routable only when ready: the ejection cap's count changed */
        char what[160];
        snprintf(what, sizeof what, "is %s (%s)", fw_state_names[s], why);
        fe_outlier_fleet_changed(w->fe, w, what);
    }
}

fe_model *fe_model_get(fe *f, const char *name, bool create) {
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        if (strcmp(m->name, name) == 0) return m;
    if (!create) return NULL;
    fe_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    snprintf(m->name, sizeof m->name, "%s", name);
    m->decode_threshold = f->o.decode_threshold;
    m->prefill_threshold = f->o.prefill_threshold;
    LIST_INSERT_HEAD(&f->models, m, link);
    return m;
}

static fe_worker *find_by_key(fe *f, const char *key) {
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link))
        if (strcmp(w->key, key) == 0) return w;
    return NULL;
}

static fe_worker *find_by_id(fe *f, uint64_t id) { return bt_map_get(&f->workers_by_id, id); }

/* Recomputes what the cards of m's workers allow (fe_model.context_max and the others): once per
 * worker filed or forgotten, not per request. */
static void model_card_bounds(fe_model *m) {
    uint64_t ctx = 0, bytes = 0, tb = 1;
    bool ctx_unbounded = false, bytes_unbounded = false;
    for (size_t i = 0; i < m->nws; i++) {
        const fe_worker *w = m->ws[i];
        ctx_unbounded |= !w->context_length;
        bytes_unbounded |= !w->context_length || !w->max_token_bytes;
        if (w->context_length > ctx) ctx = w->context_length;
        if (w->context_length && w->max_token_bytes) { /* a card's numbers are the worker's: no wrap */
            uint64_t b = w->context_length > UINT64_MAX / w->max_token_bytes ? UINT64_MAX
                                                                             : w->context_length * w->max_token_bytes;
            if (b > bytes) bytes = b;
        }
        if (w->max_token_bytes > tb) tb = w->max_token_bytes;
    }
    m->context_max = ctx_unbounded ? 0 : ctx;
    m->prompt_bytes_max = bytes_unbounded ? 0 : bytes;
    m->token_bytes_max = tb;
}

/* Files w under its model for routing; false when out of memory. */
static bool model_add_worker(fe_model *m, fe_worker *w) {
    if (m->nws == m->capws) {
        size_t cap = m->capws ? m->capws * 2 : 8;
        fe_worker **p = realloc(m->ws, cap * sizeof *p);
        if (!p) return false;
        m->ws = p;
        m->capws = cap;
    }
    m->ws[m->nws++] = w;
    w->mdl = m;
    model_card_bounds(m);
    return true;
}

static void model_remove_worker(fe_worker *w) {
    fe_model *m = w->mdl;
    if (!m) return;
    for (size_t i = 0; i < m->nws; i++)
        if (m->ws[i] == w) {
            m->ws[i] = m->ws[--m->nws]; /* order does not matter */
            break;
        }
    w->mdl = NULL;
    model_card_bounds(m);
}

static void worker_connect(fe_worker *w);

/* A worker reports its load at least once a second (LOAD_REFRESH_MS in worker.c): a report showing
 * sequences running is fresh this long past the bound. */
#define RUNNING_REPORT_SLACK_MS 3000u

bool fe_worker_progressed(const fe_worker *w, uint32_t now, uint32_t limit_ms) {
    if (now - w->tokens_ms < limit_ms) return true;
    /* Its engine says it runs sequences, which may all be another frontend's or another event
     * loop's (each has its own connection and sees only its own streams' tokens; every connection
     * gets the load reports): a stream queued behind them waits for real. An engine that hangs with sequences running keeps saying so until the worker's own
     * monitor fails it (--engine-stuck-timeout) and the connection ends. */
    return w->running_ms && now - w->running_ms < limit_ms + RUNNING_REPORT_SLACK_MS;
}

static void free_worker_cb(uv_handle_t *h) {
    fe_worker *w = h->data;
    bt_map_free(&w->streams);
    free(w);
}

/* Unlinks and frees a worker whose connection is closed (or never existed). */
static void worker_forget(fe_worker *w) {
    fe *f = w->fe;
    LIST_REMOVE(w, link);
    f->nworkers--;
    if (find_by_id(f, w->id) == w) bt_map_del(&f->workers_by_id, w->id);
    model_remove_worker(w);
    if (w->flush_pending) {
        LIST_REMOVE(w, flush_link);
        w->flush_pending = false;
    }
    BT_INFO("worker %" PRIx64 " (%s) forgotten", w->id, w->transport);
    w->freeing = true;
    uv_close((uv_handle_t *)&w->retry_timer, free_worker_cb);
}

/* Fails every stream on the worker (connection lost / worker dead); each may migrate. */
static void fail_streams(fe_worker *w, bt_status code, const char *msg) {
    uint64_t k;
    void *v;
    size_t it = 0;
    while (bt_map_next(&w->streams, &it, &k, &v)) {
        fe_attempt_on_error(v, code, msg); /* detaches it: the map loses k */
        it = 0;
    }
}

/* ---- the discovery grace ---- */

/* Ends w's grace (result: how), logging why. The caller decides what becomes of w. */
static void grace_end(fe_worker *w, fe_grace_result how, const char *why) {
    if (!w->in_grace) return;
    w->in_grace = false;
    TAILQ_REMOVE(&w->fe->grace_workers, w, grace_link);
    w->fe->n_grace--;
    w->fe->grace_counts[how]++;
    double held = (double)(uv_now(w->fe->loop) - w->grace_since_ms) / 1000.0;
    if (how == FE_GRACE_REREGISTERED)
        BT_INFO("worker %" PRIx64 " (%s) registered again after %.1f s in its discovery grace: kept", w->id,
                w->transport, held);
    else if (how == FE_GRACE_EXPIRED)
        BT_WARN("worker %" PRIx64 " (%s) did not register again within the %.1f s discovery grace: dropping it", w->id,
                w->transport, held);
    else
        BT_INFO("worker %" PRIx64 " (%s): discovery grace ended after %.1f s (%s): dropping it", w->id, w->transport,
                held, why);
}

/* Out of discovery for good: nothing new is routed to w; it is forgotten once its last stream ends
 * (now, if it has none). */
static void worker_leave(fe_worker *w, const char *why) {
    if (w->streams.len) return; /* fe_worker_stream_done closes it after the last one */
    if (w->conn) bt_rpc_conn_close(w->conn, BT_OK, why);
    else worker_forget(w);
}

/* Whether w's key may vanish without w being dropped at once: it is routable by its connection
 * (open, handshaken, no GOAWAY, not quarantined, its load says ready) and has sent a load report
 * within the staleness bound, so the worker itself is known to be alive and serving. */
static bool grace_healthy(const fe_worker *w) {
    uint32_t now = (uint32_t)uv_now(w->fe->loop);
    return fe_worker_routable(w) && w->load_frame_ms && now - w->load_frame_ms < LOAD_STALE_MS;
}

static void on_grace_timer(uv_timer_t *t);

/* Arms the grace timer for the earliest end of a grace, or stops it when none is running. */
static void grace_timer_arm(fe *f) {
    if (uv_is_closing((uv_handle_t *)&f->grace_timer)) return;
    const fe_worker *first = TAILQ_FIRST(&f->grace_workers);
    if (!first) {
        uv_timer_stop(&f->grace_timer);
        return;
    }
    uint64_t now = uv_now(f->loop);
    uv_timer_start(&f->grace_timer, on_grace_timer, first->grace_until_ms > now ? first->grace_until_ms - now : 0, 0);
}

static void on_grace_timer(uv_timer_t *t) {
    fe *f = t->data;
    uint64_t now = uv_now(f->loop);
    fe_worker *w;
    while ((w = TAILQ_FIRST(&f->grace_workers)) && w->grace_until_ms <= now) {
        grace_end(w, FE_GRACE_EXPIRED, "expired"); /* unlinks it */
        fe_outlier_fleet_changed(f, w, "left discovery (its grace is over)");
        worker_leave(w, "left discovery, grace over");
    }
    grace_timer_arm(f);
}

size_t fe_workers_in_grace(const fe *f) {
    return f->n_grace;
}

static void on_retry_timer(uv_timer_t *t) {
    fe_worker *w = t->data;
    if (w->in_discovery && !w->conn && !w->fe->shutting_down) worker_connect(w);
}

static void on_conn_open(void *ud, bt_rpc_conn *c) {
    fe_worker *w = ud;
    if (bt_rpc_peer_instance(c) != w->id) {
        BT_WARN("worker at %s answers as instance %" PRIx64 ", expected %" PRIx64 "; closing", w->transport,
                bt_rpc_peer_instance(c), w->id);
        bt_rpc_conn_close(c, BT_ERR_PROTOCOL, "instance id mismatch");
        return;
    }
    /* the back-off is not reset here but at the first load report: a worker that requires a
     * secret this frontend does not prove answers HELLO, then closes, and a reset at every HELLO
     * would reconnect every 50 ms forever (each attempt a WARN on the worker) */
    w->tells_waits = bt_rpc_peer_flags(c) & BT_HELLO_WAITING; /* this connection's worker: it may be another build */
    if (w->quarantined) { /* it proved itself: a fresh handshake */
        w->quarantined = false;
        BT_INFO("worker %" PRIx64 " (%s) out of quarantine: reconnected", w->id, w->transport);
    }
    set_state(w, FW_READY, "connected");
    fe_migrate_link_wake(w->fe); /* room for continuations waiting for a link */
}

/* A request finished on w and gave back the KV blocks of its prompt and output. */
static void worker_note_release(fe_worker *w, uint32_t prompt_tokens, uint32_t completion_tokens) {
    uint64_t bs = w->block_size ? w->block_size : 16;
    double blocks = (double)((prompt_tokens + completion_tokens + bs - 1) / bs);
    uint64_t now = bt_now_us();
    if (w->release_us) w->release_rate *= exp(-(double)(now - w->release_us) / 1e6 / RELEASE_TAU_S);
    w->release_rate += blocks / RELEASE_TAU_S;
    w->release_us = now;
}

static double fe_worker_release_rate(const fe_worker *w) {
    if (!w->release_us) return 0.0;
    return w->release_rate * exp(-(double)(bt_now_us() - w->release_us) / 1e6 / RELEASE_TAU_S);
}

/* A worker sends each load report twice when the event plane is on: as a LOAD frame and, a few
 * milliseconds later (debounce, broker hop), over NATS. Applying both would let the later, older
 * copy overwrite the newer one and would reset pending_blocks twice per report. So one source is
 * used per worker: its NATS reports while the frontend's NATS connection is up and the worker was
 * heard from on it recently; otherwise (NATS down, the worker not publishing) its LOAD frames. */
static bool event_plane_is_source(const fe_worker *w) {
    if (!w->event_load_ms || bt_now_ms() - w->event_load_ms > EVENT_FRESH_MS) return false;
    bt_events_stats st;
    bt_events_get_stats(w->fe->events, &st);
    return st.connected;
}

/* The next frames from the worker (bt_rpc on_peek): the attempts their tokens go to are looked up
 * together and what delivering them touches is prefetched (fe_attempts_prefetch). */
static void on_conn_peek(void *ud, bt_rpc_conn *c, const bt_frame *fr, size_t n) {
    (void)c;
    fe_worker *w = ud;
    if (LIST_FIRST(&w->fe->req_flush_list)) fe_workers_flush_requests(w->fe); /* before the fan-out */
    fe_attempt *as[BT_RPC_BATCH];
    for (size_t i = 0; i < n; i++) {
        as[i] = fr[i].type == BT_FRAME_TOKENS ? bt_map_get(&w->streams, fr[i].stream) : NULL;
        if (as[i]) __builtin_prefetch(as[i]);
    }
    fe_attempts_prefetch(as, n);
}

static void on_conn_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    fe_worker *w = ud;
    if (LIST_FIRST(&w->fe->req_flush_list)) fe_workers_flush_requests(w->fe); /* a read of one frame */
    switch (f->type) {
    case BT_FRAME_TOKENS: {
        /* the worker's engine makes progress, whatever stream it is for (a just-killed one too):
         * the streams it keeps waiting wait for a reason (--stream-token-timeout, on_token_sweep) */
        w->tokens_ms = (uint32_t)uv_now(w->fe->loop);
        fe_attempt *a = bt_map_get(&w->streams, f->stream);
        if (!a) return;
        a->t_heard_ms = w->tokens_ms; /* the stream is alive (--stream-token-timeout) */
        a->waiting = false; /* and running again, if its engine had kept it waiting */
        uint32_t ids[BT_TOKENS_MAX];
        size_t n, tl;
        const char *text;
        if (bt_frame_get_tokens(f, ids, BT_TOKENS_MAX, &n, &text, &tl) != BT_OK) return;
        fe_attempt_on_tokens(a, ids, n, text, tl);
        return;
    }
    case BT_FRAME_KVSTATE: {
        fe_attempt *a = bt_map_get(&w->streams, f->stream);
        uint64_t total, off;
        const uint8_t *d;
        size_t n;
        if (a) a->t_heard_ms = (uint32_t)uv_now(w->fe->loop); /* a stream given back piece by piece is alive */
        if (a && bt_frame_get_kvstate(f, &total, &off, &d, &n) == BT_OK) fe_attempt_on_kvstate(a, total, off, d, n);
        return;
    }
    case BT_FRAME_WAITING: {
        /* the engine holds the stream (queued, or preempted to be recomputed): its silence until
         * its next TOKENS is the engine's scheduling, not a lost stream (--stream-token-timeout) */
        fe_attempt *a = bt_map_get(&w->streams, f->stream);
        uint8_t why;
        if (!a || bt_frame_get_waiting(f, &why) != BT_OK) return;
        a->t_heard_ms = (uint32_t)uv_now(w->fe->loop);
        a->waiting = true;
        a->wait_load = w->load_frames; /* a later LOAD showing nothing waiting ends the wait */
        a->req->model->st.stream_waits[why]++; /* the codec admits only the two reasons */
        BT_DEBUG("request %s: worker %" PRIx64 " keeps stream %u waiting (%s)", a->req->rid, w->id, f->stream,
                 why == BT_WAIT_PREEMPTED ? "preempted" : "queued");
        return;
    }
    case BT_FRAME_FINISH: {
        fe_attempt *a = bt_map_get(&w->streams, f->stream);
        if (!a) return;
        uint8_t reason, flags = 0;
        uint32_t pt, ct;
        bt_frame_get_finish(f, &reason, &pt, &ct);
        bt_frame_get_finish_flags(f, &flags);
        worker_note_release(w, pt, ct);
        fe_attempt_on_finish(a, reason, pt, ct, flags & BT_FINISH_F_USAGE_UNREPORTED);
        return;
    }
    case BT_FRAME_ERROR: {
        uint16_t code;
        const char *msg;
        size_t ml;
        if (bt_frame_get_error(f, &code, &msg, &ml) != BT_OK) return;
        char m[256];
        snprintf(m, sizeof m, "%.*s", (int)(ml < 255 ? ml : 255), msg);
        if (f->stream == 0) {
            /* the worker ends the connection (docs/protocol.md §11): so does the frontend, at once.
             * Kept open, a worker that sends nothing else made a WARN line of each (40,000 lines,
             * 12.8 MB of log in a second from one connection); now one per connection, and the
             * reconnects back off */
            BT_WARN("worker %" PRIx64 " reports a connection error: %s (%s); closing the connection", w->id, m,
                    bt_status_name(code));
            char why[300];
            snprintf(why, sizeof why, "the worker reported a connection error: %s", m);
            bt_rpc_conn_close(c, BT_ERR_PROTOCOL, why);
            return;
        }
        fe_attempt *a = bt_map_get(&w->streams, f->stream);
        if (!a) return;
        if (code == BT_ERR_DRAINING || code == BT_ERR_SHUTDOWN) {
            if (!w->goaway) {
                w->goaway = true;
                fe_outlier_fleet_changed(w->fe, w, "is draining");
            }
        }
        /* moved off by its operator (rebalance), or refused by the worker's busy upstream: the
         * worker is fine, only this stream goes elsewhere. Quarantined for a busy upstream, every
         * worker in front of it would stay out until its last stream ended, long after the
         * upstream had recovered. */
        else if (bt_status_migratable(code) && code != BT_ERR_MOVED && !bt_status_upstream_busy(code))
            fe_worker_quarantine(w, m); /* the probe follows below */
        fe_attempt_on_error(a, (bt_status)code, m);
        return;
    }
    case BT_FRAME_LOAD: {
        bt_load_report lr;
        if (bt_frame_get_load(f, &lr) != BT_OK) return;
        /* Whichever source feeds the routing, a LOAD frame is ordered with the stream frames of its
         * connection: one that shows nothing waiting, written after a stream's WAITING, says that
         * the wait is over (the sequence ran again, or the worker lost it), and the sweep judges the
         * stream's silence from here (on_token_sweep). The engines make this sound by counting a
         * sequence in the load's `waiting` before its WAITING can be written: the mocker computes
         * the load on the worker's loop from its live queue, where the sequence stays until a step
         * admits it; llama refreshes the snapshot the loop reads before it posts a wait
         * (llama.c post_wait). */
        w->load_frames++;
        w->load_frame_ms = (uint32_t)uv_now(w->fe->loop);
        w->backoff_ms = 0; /* the connection works (on_conn_open) */
        if (lr.running) w->running_ms = (uint32_t)uv_now(w->fe->loop);
        if (lr.waiting == 0) {
            w->idle_load = w->load_frames;
            w->idle_ms = (uint32_t)uv_now(w->fe->loop);
        }
        if (event_plane_is_source(w)) {
            w->load_reports[2]++;
            return;
        }
        bool was_routable = fe_worker_routable(w);
        w->load = lr;
        w->load_ms = bt_now_ms();
        if (was_routable != fe_worker_routable(w)) fe_outlier_fleet_changed(w->fe, w, "reports its engine's readiness");
        w->pending_blocks = 0; /* the report now covers what was routed before it */
        w->load_reports[0]++;
        return;
    }
    case BT_FRAME_GOAWAY: {
        if (!w->goaway) {
            BT_INFO("worker %" PRIx64 " (%s) is draining: routing nothing new to it", w->id, w->transport);
            w->goaway = true;
            fe_outlier_fleet_changed(w->fe, w, "is draining");
        }
        if (w->in_grace) { /* it is leaving, not registering again */
            grace_end(w, FE_GRACE_DROPPED, "the worker is draining");
            worker_leave(w, "draining after it left discovery");
        }
        return;
    }
    default:
        return;
    }
}

static void on_conn_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)c;
    fe_worker *w = ud;
    w->conn = NULL;
    fe_migrate_link_wake(w->fe); /* a continuation waiting for this link goes elsewhere, or ends */
    bool was_ready = w->state == FW_READY;
    set_state(w, FW_DOWN, reason);
    grace_end(w, FE_GRACE_DROPPED, "its connection ended"); /* forgotten below: its key is gone */
    if (why != BT_OK && !w->goaway) fe_worker_quarantine(w, reason);
    if (w->streams.len) {
        BT_WARN("worker %" PRIx64 " lost with %zu streams in flight: %s", w->id, w->streams.len, reason);
        fail_streams(w, why == BT_ERR_TIMEOUT ? BT_ERR_TIMEOUT : BT_ERR_DISCONNECTED, reason);
    }
    if (!w->in_discovery || w->fe->shutting_down) {
        worker_forget(w);
        return;
    }
    /* still announced: try again, backing off */
    w->backoff_ms = w->backoff_ms ? w->backoff_ms * 2 : (was_ready ? BACKOFF_MIN_MS : BACKOFF_MIN_MS * 2);
    if (w->backoff_ms > BACKOFF_MAX_MS) w->backoff_ms = BACKOFF_MAX_MS;
    uv_timer_start(&w->retry_timer, on_retry_timer, w->backoff_ms, 0);
}

/* The worker's link fell below BT_RPC_BACKLOG_CONTINUATION (bt_rpc on_drain). */
static void on_conn_drain(void *ud, bt_rpc_conn *c) {
    (void)c;
    fe_worker *w = ud;
    fe_migrate_link_wake(w->fe);
}

static const bt_rpc_handlers conn_handlers = {on_conn_open, on_conn_frame, on_conn_close, NULL, on_conn_peek,
                                              on_conn_drain};

static void worker_connect(fe_worker *w) {
    bt_rpc_config rc;
    bt_rpc_config_default(&rc, BT_ROLE_FRONTEND, w->fe->instance_id);
    /* --stream-stall-timeout bounds the silence a stream sees before it is re-dispatched. The
     * connection checks for a dead peer once per heartbeat tick (= the ping interval here), so it
     * declares the peer dead after stall - tick of silence: detection then lands within
     * [stall - tick, stall). Pings are cheap: at least every 500 ms, and a worker drops a
     * frontend it has not heard from for a few seconds. */
    uint32_t stall = (uint32_t)(w->fe->o.stall_timeout * 1000.0);
    if (stall < 100) stall = 100;
    uint32_t tick = stall / 10 < 10 ? 10 : stall / 10 > 500 ? 500 : stall / 10;
    rc.ping_interval_ms = tick;
    rc.dead_after_ms = stall - tick;
    rc.connect_timeout_ms = stall;
    rc.secret = w->fe->rpc_secret;
    set_state(w, FW_CONNECTING, "dialing");
    w->conn = bt_rpc_dial(w->fe->loop, w->host, w->port, &rc, &conn_handlers, w);
}

/* ---- discovery ---- */

static bool parse_transport(const char *t, char *host, size_t hcap, int *port) {
    const char *colon = strrchr(t, ':');
    if (!colon || colon == t) return false;
    int64_t p;
    char ps[16];
    const char *end = strchr(colon + 1, '/');
    size_t pl = end ? (size_t)(end - colon - 1) : strlen(colon + 1);
    if (pl == 0 || pl >= sizeof ps) return false;
    memcpy(ps, colon + 1, pl);
    ps[pl] = '\0';
    if (!bt_parse_i64(ps, 1, 65535, &p)) return false;
    size_t hl = (size_t)(colon - t);
    if (hl >= hcap) return false;
    memcpy(host, t, hl);
    host[hl] = '\0';
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') { /* [v6]:port */
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    *port = (int)p;
    return true;
}

bool fe_parse_instance(const json_t *v, fe_worker *w, char *err, size_t errlen) {
    json_t *jid = json_object_get(v, "instance_id");
    json_t *jtr = json_object_get(json_object_get(v, "transport"), "tcp");
    json_t *jmodel = json_object_get(v, "model");
    json_t *jname = json_object_get(jmodel, "name");
    if (!json_is_integer(jid) || !json_is_string(jtr) || !json_is_string(jname)) {
        snprintf(err, errlen, "no usable instance (need instance_id, transport.tcp, model.name)");
        return false;
    }
    /* a name cut to fit would be served to clients asking for its prefix; a reserved one would
     * share the series of refused requests */
    if (!bt_discovery_model_name_ok(json_string_value(jname), json_string_length(jname), err, errlen)) return false;
    w->id = (uint64_t)json_integer_value(jid);
    snprintf(w->transport, sizeof w->transport, "%s", json_string_value(jtr));
    memcpy(w->model, json_string_value(jname), json_string_length(jname) + 1);
    const char *s;
    if ((s = json_string_value(json_object_get(v, "namespace")))) snprintf(w->ns, sizeof w->ns, "%s", s);
    if ((s = json_string_value(json_object_get(v, "component")))) snprintf(w->component, sizeof w->component, "%s", s);
    if ((s = json_string_value(json_object_get(v, "endpoint")))) snprintf(w->endpoint, sizeof w->endpoint, "%s", s);
    json_t *tb = json_object_get(jmodel, "total_kv_blocks");
    if (json_is_integer(tb)) w->total_blocks_card = (uint64_t)json_integer_value(tb);
    json_t *bsz = json_object_get(jmodel, "block_size");
    if (json_is_integer(bsz) && json_integer_value(bsz) > 0) w->block_size = (uint64_t)json_integer_value(bsz);
    json_t *ctx = json_object_get(jmodel, "context_length");
    if (json_is_integer(ctx) && json_integer_value(ctx) > 0) w->context_length = (uint64_t)json_integer_value(ctx);
    json_t *mtb = json_object_get(jmodel, "max_token_bytes");
    if (json_is_integer(mtb) && json_integer_value(mtb) > 0) w->max_token_bytes = (uint64_t)json_integer_value(mtb);
    if ((s = json_string_value(json_object_get(jmodel, "exactness"))))
        snprintf(w->exactness, sizeof w->exactness, "%s", s);
    if (!parse_transport(w->transport, w->host, sizeof w->host, &w->port)) {
        snprintf(err, errlen, "cannot parse transport '%s'", w->transport);
        return false;
    }
    return true;
}

static void on_disc_put(void *ud, const char *key, const json_t *v) {
    fe *f = ud;
    char why[192];
    fe_worker *w = calloc(1, sizeof *w);
    if (!w) return;
    if (!fe_parse_instance(v, w, why, sizeof why)) {
        BT_WARN("discovery key %s: %s", key, why);
        free(w);
        return;
    }
    fe_worker *known = find_by_key(f, key);
    if (known) {
        free(w);
        /* re-announced (e.g. it re-registered): it proves itself again */
        if (known->in_grace) {
            grace_end(known, FE_GRACE_REREGISTERED, "registered again");
            grace_timer_arm(f);
        }
        known->in_discovery = true;
        if (known->quarantined) {
            known->quarantined = false;
            BT_INFO("worker %" PRIx64 " (%s) out of quarantine: re-announced by discovery", known->id,
                    known->transport);
            fe_outlier_fleet_changed(f, known, "was re-announced");
        }
        return;
    }
    if (f->shutting_down) {
        free(w);
        return;
    }
    w->fe = f;
    snprintf(w->key, sizeof w->key, "%s", key);
    if (find_by_id(f, w->id)) {
        BT_WARN("discovery key %s repeats instance %" PRIx64 "; ignored", key, w->id);
        free(w);
        return;
    }
    fe_model *m = fe_model_get(f, w->model, true);
    if (!m || bt_map_put(&f->workers_by_id, w->id, w) != 0) {
        BT_ERROR("worker %" PRIx64 " at %s: out of memory; ignored", w->id, w->transport);
        free(w);
        return;
    }
    if (!model_add_worker(m, w)) {
        bt_map_del(&f->workers_by_id, w->id);
        BT_ERROR("worker %" PRIx64 " at %s: out of memory; ignored", w->id, w->transport);
        free(w);
        return;
    }
    bt_map_init(&w->streams);
    w->in_discovery = true;
    w->next_stream = 1;
    uv_timer_init(f->loop, &w->retry_timer);
    w->retry_timer.data = w;
    LIST_INSERT_HEAD(&f->workers, w, link);
    f->nworkers++;
    BT_INFO("discovered worker %" PRIx64 " at %s serving '%s'", w->id, w->transport, w->model);
    worker_connect(w);
}

static void on_disc_delete(void *ud, const char *key) {
    fe *f = ud;
    fe_worker *w = find_by_key(f, key);
    if (!w || !w->in_discovery) return;
    if (f->o.discovery_grace > 0 && !f->shutting_down && grace_healthy(w)) {
        w->in_discovery = false;
        w->in_grace = true;
        w->grace_since_ms = uv_now(f->loop);
        w->grace_until_ms = w->grace_since_ms + (uint64_t)(f->o.discovery_grace * 1000.0);
        TAILQ_INSERT_TAIL(&f->grace_workers, w, grace_link); /* ends last: see fe.grace_workers */
        f->n_grace++;
        f->grace_counts[FE_GRACE_KEPT]++;
        BT_INFO("worker %" PRIx64 " (%s) left discovery with a healthy connection: kept routable for up to %.1f s "
                "while it registers again (--discovery-grace)",
                w->id, w->transport, f->o.discovery_grace);
        grace_timer_arm(f);
        return;
    }
    w->in_discovery = false;
    BT_INFO("worker %" PRIx64 " (%s) left discovery with %zu streams in flight", w->id, w->transport,
            w->streams.len);
    fe_outlier_fleet_changed(f, w, "left discovery");
    worker_leave(w, "left discovery");
}

static const bt_discovery_watcher disc_watcher = {on_disc_put, on_disc_delete};

void fe_workers_start(fe *f) {
    char prefix[160];
    snprintf(prefix, sizeof prefix, "v1/instances/%s/", f->o.ns);
    bt_discovery_watch(f->disc, prefix, &disc_watcher, f);
}

void fe_workers_stop(fe *f) {
    uv_timer_stop(&f->grace_timer); /* every connection closes: no grace is left to end */
    for (fe_worker *w = LIST_FIRST(&f->workers), *next; w; w = next) {
        next = LIST_NEXT(w, link);
        uv_timer_stop(&w->retry_timer);
        if (w->conn) bt_rpc_conn_close(w->conn, BT_OK, "frontend exiting");
        else worker_forget(w);
    }
}

bool fe_workers_apply_load(fe *f, uint64_t id, const bt_load_report *r) {
    fe_worker *w = find_by_id(f, id);
    if (!w) return false;
    bool was_routable = fe_worker_routable(w);
    w->load = *r;
    w->load_ms = w->event_load_ms = bt_now_ms();
    w->pending_blocks = 0; /* as for a LOAD frame: the report covers what was routed before it */
    w->load_reports[1]++;
    if (was_routable != fe_worker_routable(w)) fe_outlier_fleet_changed(f, w, "reports its engine's readiness");
    return true;
}

/* ---- routing ---- */

/* Busy when a fresh load report, plus what was routed since it, exceeds a threshold; or, whatever
 * the thresholds, while its connection holds BT_RPC_BACKLOG_BUSY unsent bytes: a burst of large
 * bodies then waits for the worker to take what it was sent (or is queued or refused with 503 as
 * for any other busy verdict) instead of piling up towards the connection's memory cap. */
bool fe_worker_busy(const fe_worker *w, const fe_model *m) {
    if (w->conn && bt_rpc_unsent(w->conn) >= BT_RPC_BACKLOG_BUSY) return true;
    if (isnan(m->decode_threshold) && isnan(m->prefill_threshold)) return false;
    if (!w->load_ms || bt_now_ms() - w->load_ms > LOAD_STALE_MS) return false;
    const bt_load_report *l = &w->load;
    uint64_t total = l->total_blocks ? l->total_blocks : w->total_blocks_card;
    if (!isnan(m->decode_threshold) && total > 0 &&
        (double)(l->active_decode_blocks + w->pending_blocks) > m->decode_threshold * (double)total)
        return true;
    if (!isnan(m->prefill_threshold) && (double)l->active_prefill_tokens > m->prefill_threshold) return true;
    return false;
}

int fe_retry_after_s(fe *f, const fe_model *m) {
    double best = -1;
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
        if (strcmp(w->model, m->name) != 0 || !fe_worker_routable(w)) continue;
        const bt_load_report *l = &w->load;
        uint64_t total = l->total_blocks ? l->total_blocks : w->total_blocks_card;
        double excess = 0;
        if (!isnan(m->decode_threshold) && total > 0)
            excess = (double)(l->active_decode_blocks + w->pending_blocks) - m->decode_threshold * (double)total;
        if (excess < 1) excess = 1;
        double rate = fe_worker_release_rate(w);
        if (rate <= 0) continue;
        double t = excess / rate;
        if (best < 0 || t < best) best = t;
    }
    if (best < 0) return RETRY_AFTER_UNKNOWN_S;
    int s = (int)ceil(best);
    return s < RETRY_AFTER_MIN_S ? RETRY_AFTER_MIN_S : s > RETRY_AFTER_MAX_S ? RETRY_AFTER_MAX_S : s;
}

bool fe_worker_routable(const fe_worker *w) {
    if (w->state != FW_READY || !(w->in_discovery || w->in_grace) || w->goaway || !bt_rpc_is_open(w->conn))
        return false;
    if (w->quarantined) return false;
    if (w->load_ms && !(w->load.flags & BT_LOAD_READY)) return false;
    return true;
}

size_t fe_worker_inflight(const fe_worker *w) { return w->streams.len; }

/* Whether w may take a new attempt; counts the busy ones it skips. `avoid` is returned through
 * *avoided instead (the worker that just failed, used only when nothing else is left). */
static bool exact_match(const fe_worker *w, const char *exact) {
    return !exact || !exact[0] || strcmp(w->exactness, exact) == 0;
}

static bool skipped(const fe_worker *w, const uint64_t *skip, size_t nskip) {
    for (size_t i = 0; i < nskip; i++)
        if (skip[i] == w->id) return true;
    return false;
}

bool fe_worker_context_short(const fe_worker *w, uint64_t need) {
    return need && w->context_length && w->context_length < need;
}

static bool eligible(fe_worker *w, fe_model *m, uint64_t avoid, const uint64_t *skip, size_t nskip, bool *all_busy,
                     size_t *nbusy, fe_worker **avoided, const char *exact, uint64_t need) {
    if (!fe_worker_routable(w) || fe_outlier_ejected(w->fe, w)) return false; /* ejected: outlier.h */
    if (skipped(w, skip, nskip)) return false; /* it refused this request, busy or short (migrate.c) */
    if (!exact_match(w, exact)) return false; /* it would not continue the stream bit for bit */
    /* it would refuse the attempt (context_length_exceeded): workers of one model may advertise
     * different contexts (a rolling upgrade), and a continuation carries more than its first attempt */
    if (fe_worker_context_short(w, need)) return false;
    if (all_busy && fe_worker_busy(w, m)) {
        (*nbusy)++;
        return false;
    }
    if (avoid && w->id == avoid) {
        *avoided = w;
        return false;
    }
    return true;
}

/* Looks only at m's own workers (m->ws), however many there are. Round-robin and random take the
 * first eligible worker from a rotating (or random) start, so a request usually costs one look;
 * least-loaded scans them all. */
fe_worker *fe_route(fe *f, fe_model *m, uint64_t avoid, const uint64_t *skip, size_t nskip, bool *all_busy,
                    const char *exact, uint64_t need) {
    size_t n = m->nws, nbusy = 0;
    fe_worker *avoided = NULL;
    if (all_busy) *all_busy = false;
    if (n == 0) return NULL;
    if (f->mode == ROUTE_LEAST_LOADED) {
        fe_worker *best = NULL;
        double best_score = 0;
        for (size_t i = 0; i < n; i++) {
            fe_worker *w = m->ws[i];
            if (!eligible(w, m, avoid, skip, nskip, all_busy, &nbusy, &avoided, exact, need)) continue;
            double blocks = w->load_ms && w->load.total_blocks
                                ? (double)w->load.active_decode_blocks / (double)w->load.total_blocks
                                : 0.0;
            double score = (double)w->streams.len + (w->load_ms ? (double)w->load.waiting : 0.0) + blocks;
            if (!best || score < best_score) best = w, best_score = score;
        }
        if (best) return best;
    } else {
        size_t start = f->mode == ROUTE_RANDOM ? (size_t)(bt_random64() % n) : (size_t)(f->rr % n);
        for (size_t i = 0; i < n; i++) {
            fe_worker *w = m->ws[(start + i) % n];
            if (!eligible(w, m, avoid, skip, nskip, all_busy, &nbusy, &avoided, exact, need)) continue;
            /* the rotation resumes after the worker taken, not after the start: a skipped (busy,
             * dead) worker's turns are shared by all the others instead of all going to the one
             * that follows it (a migration storm would pile onto the dead worker's neighbour) */
            if (f->mode == ROUTE_ROUND_ROBIN) f->rr = start + i + 1;
            return w;
        }
        if (f->mode == ROUTE_ROUND_ROBIN) f->rr++;
    }
    if (all_busy) *all_busy = !avoided && nbusy > 0;
    return avoided; /* only the failed one is left: better than nothing (or NULL) */
}

fe_worker *fe_route_least_busy(fe_model *m, uint64_t avoid, const uint64_t *skip, size_t nskip, const char *exact,
                               uint64_t need) {
    fe_worker *best = NULL, *avoided = NULL;
    double best_use = 0;
    bool best_backlogged = false;
    for (size_t i = 0; i < m->nws; i++) {
        fe_worker *w = m->ws[i];
        if (!fe_worker_routable(w) || !exact_match(w, exact)) continue;
        if (skipped(w, skip, nskip) || fe_worker_context_short(w, need)) continue;
        size_t unsent = bt_rpc_unsent(w->conn);
        if (unsent >= BT_RPC_BACKLOG_CONTINUATION) continue; /* the continuation waits (migrate.c) */
        if (avoid && w->id == avoid) {
            avoided = w;
            continue;
        }
        /* a backlogged link would hold the continuation behind megabytes that its worker has yet
         * to take (and nears the memory cap): any other worker first, then the least backlogged */
        bool backlogged = unsent >= BT_RPC_BACKLOG_BUSY;
        double use = (double)unsent;
        if (!backlogged) {
            /* what fe_worker_busy compares with the threshold, as a share of the worker's blocks */
            uint64_t total = w->load.total_blocks ? w->load.total_blocks : w->total_blocks_card;
            double used = (double)(w->load_ms ? w->load.active_decode_blocks : 0) + (double)w->pending_blocks;
            use = total ? used / (double)total : used;
        }
        if (!best || (best_backlogged && !backlogged) || (best_backlogged == backlogged && use < best_use))
            best = w, best_use = use, best_backlogged = backlogged;
    }
    return best ? best : avoided;
}

fe_worker *fe_route_preempt(fe *f, fe_model *m, int32_t prio, uint64_t need) {
    fe_worker *best = NULL;
    int32_t best_vp = 0;
    uint32_t best_left = 0;
    uint64_t now = bt_now_ms();
    for (size_t i = 0; i < m->nws; i++) {
        fe_worker *w = m->ws[i];
        if (!fe_worker_routable(w) || fe_outlier_ejected(f, w)) continue;
        if (fe_worker_context_short(w, need)) continue;                /* a preemption makes no context larger */
        if (bt_rpc_unsent(w->conn) >= BT_RPC_BACKLOG_BUSY) continue;   /* preempting frees KV, not the link */
        if (!w->load_ms || now - w->load_ms > LOAD_STALE_MS) continue; /* says nothing (and is not busy) */
        uint32_t victims;
        int32_t vp;
        if (!bt_load_get_preempt(&w->load, &victims, &vp) || vp <= prio) continue; /* equals never preempt */
        if (w->preempt_pending >= victims) continue; /* its victims are spoken for */
        uint32_t left = victims - w->preempt_pending;
        if (!best || vp > best_vp || (vp == best_vp && left > best_left)) best = w, best_vp = vp, best_left = left;
    }
    return best;
}

void fe_attempt_preempt_start(fe_attempt *a) {
    a->preempting = true;
    a->worker->preempt_pending++;
}

void fe_attempt_preempt_done(fe_attempt *a) {
    if (!a->preempting) return;
    a->preempting = false;
    if (a->worker->preempt_pending) a->worker->preempt_pending--;
}

void fe_worker_quarantine(fe_worker *w, const char *why) {
    if (w->quarantined) return;
    w->quarantined = true;
    BT_INFO("worker %" PRIx64 " (%s) quarantined until it reconnects or is re-announced: %s", w->id, w->transport, why);
    fe_outlier_fleet_changed(w->fe, w, "was quarantined");
}

/* One step of a's relay: a piece if its connection has room (and a turn is free), or, after the
 * last one, the held REQUEST. Returns 1 when the relay is done, 0 when it wrote a piece, -1 when it
 * waits (for room, a turn, or the end of a connection that is going away, whose streams fail). */
static int relay_step(fe_attempt *a) {
    fe_worker *w = a->worker;
    bt_rpc_conn *c = w->conn;
    if (!c || !bt_rpc_is_open(c)) return -1; /* the connection's end fails the attempt, which drops it */
    if (bt_rpc_unsent(c) >= BT_KV_WATERMARK) return -1;
    if (a->kv_off == 0 && w->kv_relaying >= BT_KV_INFLIGHT) return -1; /* the worker keeps that many at once */
    bt_buf *b = bt_rpc_wbuf(c);
    if (!b) return -1;
    size_t len = (size_t)a->kv_out.total;
    if (a->kv_off < len) {
        size_t n = len - a->kv_off < BT_KV_PIECE_MAX ? len - a->kv_off : BT_KV_PIECE_MAX;
        if (bt_frame_put_kvstate(b, a->stream_id, len, a->kv_off, a->kv_out.data + a->kv_off, n) != BT_OK) return -1;
        if (a->kv_off == 0) w->kv_relaying++;
        a->kv_off += n;
        bt_rpc_flush(c);
        /* the worker reads what is relayed to it: --stream-token-timeout counts from the last piece */
        a->t_heard_ms = (uint32_t)uv_now(w->fe->loop);
        return 0;
    }
    if (bt_frame_put(b, BT_FRAME_REQUEST, a->stream_id, a->held_req, a->held_len) != BT_OK) return -1;
    if (a->held_stop) bt_frame_put(b, BT_FRAME_STOP, a->stream_id, NULL, 0);
    bt_rpc_flush(c);
    BT_INFO("request %s: KV state of %zu bytes written to worker %" PRIx64 ", then its REQUEST", a->req->rid, len,
            w->id);
    a->t_sent_us = bt_now_us();
    a->t_heard_ms = (uint32_t)uv_now(w->fe->loop); /* the first token is awaited from now */
    fe_worker_relay_drop(a);
    return 1;
}

/* Rounds of one step per relay (they take turns) until none can write, or for RELAY_BURST rounds
 * (bounded work per loop iteration: the kernel may take a fast reader's bytes as fast as they
 * come); then again at the next tick while any waits. */
#define RELAY_BURST 16
static void on_relay_timer(uv_timer_t *t) {
    fe *f = t->data;
    bool progress = true, waiting = false;
    for (int steps = 0; progress && steps < RELAY_BURST; steps++) {
        progress = waiting = false;
        for (fe_attempt *a = LIST_FIRST(&f->relays), *next; a; a = next) {
            next = LIST_NEXT(a, relay_link); /* a finished relay leaves the list */
            int r = relay_step(a);
            if (r == 1) progress = true;
            else if (r == 0) progress = waiting = true;
            else waiting = true;
        }
    }
    if (!waiting && !LIST_FIRST(&f->relays)) uv_timer_stop(t);
}

void fe_worker_relay_drop(fe_attempt *a) {
    if (!a->held_req) return;
    if (a->kv_off > 0 && a->worker->kv_relaying > 0) a->worker->kv_relaying--;
    LIST_REMOVE(a, relay_link);
    free(a->held_req);
    a->held_req = NULL;
    fe_kv_free(&a->kv_out);
}

uint32_t fe_worker_send_request(fe_worker *w, fe_attempt *a, const char *payload, size_t len, uint64_t est_tokens) {
    bt_buf *b = w->conn ? bt_rpc_wbuf(w->conn) : NULL;
    if (!b) return 0;
    uint32_t id = w->next_stream;
    if (a->kv_out.data) {
        /* the state goes ahead of the REQUEST on the same stream id, paced (docs/protocol.md) */
        fe *f = w->fe;
        if (!(a->held_req = malloc(len ? len : 1))) return 0;
        memcpy(a->held_req, payload, len);
        a->held_len = len;
        if (bt_map_put(&w->streams, id, a) != 0) {
            free(a->held_req);
            a->held_req = NULL;
            return 0;
        }
        a->stream_id = id;
        a->kv_off = 0;
        LIST_INSERT_HEAD(&f->relays, a, relay_link);
        if (!uv_is_active((uv_handle_t *)&f->relay_timer) && !uv_is_closing((uv_handle_t *)&f->relay_timer))
            uv_timer_start(&f->relay_timer, on_relay_timer, 0, 1);
    } else if (bt_frame_put(b, BT_FRAME_REQUEST, id, payload, len) != BT_OK || bt_map_put(&w->streams, id, a) != 0) {
        return 0;
    }
    w->next_stream += 2;
    if (w->next_stream > 0x7fffffffu) w->next_stream = 1;
    w->routed_total++;
    /* until the next LOAD shows it, assume the request holds blocks for its prompt and output */
    uint64_t bs = w->block_size ? w->block_size : 16;
    w->pending_blocks += (est_tokens + bs - 1) / bs;
    return id;
}

static void on_req_flush(uv_check_t *h) { fe_workers_flush_requests(h->data); }

void fe_worker_flush_soon(fe_worker *w) {
    fe *f = w->fe;
    if (w->flush_pending || !w->conn) return;
    if (uv_is_closing((uv_handle_t *)&f->req_flush)) { /* the loop is closing: no later flush */
        bt_rpc_flush(w->conn);
        return;
    }
    w->flush_pending = true;
    LIST_INSERT_HEAD(&f->req_flush_list, w, flush_link);
    if (!uv_is_active((uv_handle_t *)&f->req_flush)) uv_check_start(&f->req_flush, on_req_flush);
}

void fe_workers_flush_requests(fe *f) {
    fe_worker *w;
    while ((w = LIST_FIRST(&f->req_flush_list)) != NULL) {
        LIST_REMOVE(w, flush_link);
        w->flush_pending = false;
        if (w->conn) bt_rpc_flush(w->conn); /* a failed write closes the connection later, not here */
    }
    uv_check_stop(&f->req_flush);
}

void fe_worker_send_cancel(fe_worker *w, uint32_t stream, bool kill) {
    bt_buf *b = w->conn ? bt_rpc_wbuf(w->conn) : NULL;
    if (b) bt_frame_put(b, kill ? BT_FRAME_KILL : BT_FRAME_STOP, stream, NULL, 0);
}

void fe_worker_stream_done(fe_worker *w, uint32_t stream) {
    bt_map_del(&w->streams, stream);
    if (w->streams.len || w->freeing || !w->conn) return;
    if (!w->in_discovery && !w->in_grace) {
        bt_rpc_conn_close(w->conn, BT_OK, "left discovery, last stream ended");
    } else if (w->quarantined && !w->goaway) {
        /* quarantined on an open connection (a stream failed but the connection lives on): once
         * its streams are over, reconnect; a completed handshake is the probe that lifts it */
        bt_rpc_conn_close(w->conn, BT_OK, "quarantined: reconnecting to probe it");
    }
}
