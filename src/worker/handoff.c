/* handoff.c — the worker's side of the KV hand-off (docs/protocol.md "KV hand-off").
 *
 * Giving a stream back (the drain bound, --graceful-shutdown-timeout 0, an engine failure, the
 * operator's rebalance): instead of killing the sequence, the worker asks the engine to hand it
 * off (bt_engine_handoff: the engine thread exports the sequence's KV state and ends it). When the
 * state arrives on the loop it is sent on the stream to the frontend as KVSTATE pieces of at most
 * BT_KV_PIECE_MAX bytes, followed by the stream's migratable ERROR: the frontend then holds the
 * whole state when it continues the stream elsewhere. Pieces are paced: another piece is written
 * only while less than BT_KV_WATERMARK bytes wait unsent on the connection, so a token frame of
 * any other stream on that connection never waits behind more than that (no head-of-line
 * blocking by a large state); several hand-offs take turns, one piece each.
 *
 * Receiving: KVSTATE pieces arrive on a stream id ahead of its REQUEST (the frontend paces them
 * the same way), up to BT_KV_INFLIGHT states per connection interleaved piece by piece; the
 * REQUEST's kv_state_bytes claims its state (wk_handoff_take), a KILL before it drops it. A state
 * that is incomplete, out of order or too large is dropped: the continuation is prefilled instead
 * (fallback "missing").
 *
 * An exiting worker waits, at most WK_HANDOFF_WAIT_MS, until every hand-off is exported and sent
 * (wk_handoff_when_idle) before it closes its connections. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "proto/proto.h"
#include "worker/worker_internal.h"

#define WK_HANDOFF_WAIT_MS 10000u        /* an exiting worker waits at most this long for its hand-offs */
#define WK_PUMP_MS 1u                    /* pacing tick while pieces wait for room */

struct wk_handoff {
    wk_worker *w;
    wk_peer *p; /* NULL once its connection ended */
    uint32_t id;
    uint16_t code;
    char msg[128];
    char rid[72];
    uint8_t *state; /* set when the engine's export arrived */
    size_t len, off;
    bool exported;
    bool error_sent; /* the last piece and the ERROR are written: it waits for them to leave */
    LIST_ENTRY(wk_handoff) link;
};

struct wk_kv_in {
    uint32_t stream;
    uint8_t *data;
    uint64_t total, have;
    uint64_t touched; /* a counter value: the slot least recently written is reused first */
    bool bad; /* a piece was out of order or the state too large: dropped */
};

static void kvin_free(wk_peer *p, size_t i) {
    if (!p->kvin[i]) return;
    free(p->kvin[i]->data);
    free(p->kvin[i]);
    p->kvin[i] = NULL;
}

/* The slot of stream's state, or -1. */
static int kvin_find(const wk_peer *p, uint32_t stream) {
    for (size_t i = 0; i < BT_KV_INFLIGHT; i++)
        if (p->kvin[i] && p->kvin[i]->stream == stream) return (int)i;
    return -1;
}

static void rec_free(wk_handoff *h) {
    wk_worker *w = h->w;
    LIST_REMOVE(h, link);
    w->nhandoffs--;
    free(h->state);
    free(h);
}

/* Runs the waiting exit (wk_handoff_when_idle) from a timer of its own, never from inside the
 * caller that ended the last hand-off: that may be the drain walking its streams. */
static void run_idle(uv_timer_t *t) {
    wk_worker *w = t->data;
    void (*fn)(wk_worker *) = w->handoff_idle;
    w->handoff_idle = NULL;
    if (fn) fn(w);
}

static void check_idle(wk_worker *w) {
    if (w->nhandoffs == 0 && w->handoff_idle) uv_timer_start(&w->handoff_wait_timer, run_idle, 0, 0);
}

/* Writes one piece if the connection has room, or the ERROR after the last piece. Returns 1 when
 * the hand-off is done (its bytes all taken by the kernel: an exiting worker closes the connection
 * next), 0 when it wrote something, -1 when it waits for room or for its bytes to leave. */
static int pump_one(wk_handoff *h) {
    if (!h->p) return 1;
    bt_rpc_conn *c = h->p->conn;
    if (h->off < h->len) {
        if (bt_rpc_unsent(c) >= BT_KV_WATERMARK) return -1;
        bt_buf *b = bt_rpc_wbuf(c);
        if (!b) return 1;
        size_t n = h->len - h->off < BT_KV_PIECE_MAX ? h->len - h->off : BT_KV_PIECE_MAX;
        if (bt_frame_put_kvstate(b, h->id, h->len, h->off, h->state + h->off, n) != BT_OK) return 1;
        h->off += n;
        bt_rpc_flush(c);
        return 0;
    }
    if (h->error_sent) /* done once the kernel took every byte: closing drops what libuv still queues */
        return bt_rpc_unsent(c) == 0 ? 1 : -1;
    wk_send_stream_error(h->p, h->id, (bt_status)h->code, h->msg);
    bt_rpc_flush(c);
    h->error_sent = true;
    h->w->kv_sent++;
    BT_INFO("request %s: KV state of %zu bytes sent with the stream", h->rid, h->len);
    return 0;
}

/* Rounds of one piece per hand-off (they take turns) until none can write, or for WK_PUMP_BURST
 * rounds; then again at the next tick, while any waits. The bound matters when the reader keeps
 * up: the kernel then takes every piece at once, the room check never stops the rounds, and
 * unbounded they would write a whole state (hundreds of MB for a large model) in one loop
 * iteration, while the engine's tokens for every other stream wait behind them. */
#define WK_PUMP_BURST 16
static void on_pump_timer(uv_timer_t *t) {
    wk_worker *w = t->data;
    bool progress = true, waiting = false;
    for (int rounds = 0; progress && rounds < WK_PUMP_BURST; rounds++) {
        progress = waiting = false;
        wk_handoff *h = LIST_FIRST(&w->handoffs), *next;
        for (; h; h = next) {
            next = LIST_NEXT(h, link);
            if (!h->exported) continue;
            int r = pump_one(h);
            if (r == 1) rec_free(h), progress = true;
            else if (r == 0) progress = waiting = true;
            else waiting = true;
        }
    }
    if (!waiting) uv_timer_stop(t);
    check_idle(w);
}

static void on_exported(void *ud, uint8_t *state, size_t len) {
    wk_handoff *h = ud;
    wk_worker *w = h->w;
    h->exported = true;
    if (!h->p) {
        free(state);
        rec_free(h);
        check_idle(w);
        return;
    }
    if (!state) { /* nothing to give: the plain give-back */
        wk_send_stream_error(h->p, h->id, (bt_status)h->code, h->msg);
        bt_rpc_flush(h->p->conn);
        rec_free(h);
        check_idle(w);
        return;
    }
    h->state = state;
    h->len = len;
    if (!uv_is_active((uv_handle_t *)&w->handoff_timer))
        uv_timer_start(&w->handoff_timer, on_pump_timer, 0, WK_PUMP_MS);
}

void wk_handoff_give_back(wk_stream *s, bt_status code, const char *msg) {
    wk_worker *w = s->w;
    /* a frontend that does not understand KVSTATE (an older one, mid-upgrade) gets the plain give-back */
    bool kv = w->o.kv_handoff && s->p && (bt_rpc_peer_flags(s->p->conn) & BT_HELLO_KVSTATE);
    wk_handoff *h = kv ? calloc(1, sizeof *h) : NULL;
    if (!h) {
        if (s->p) wk_send_stream_error(s->p, s->id, code, msg);
        bt_engine_kill(w->engine, s->seq);
        return;
    }
    h->w = w;
    h->p = s->p;
    h->id = s->id;
    h->code = (uint16_t)code;
    snprintf(h->msg, sizeof h->msg, "%s", msg);
    snprintf(h->rid, sizeof h->rid, "%s", s->rid);
    LIST_INSERT_HEAD(&w->handoffs, h, link);
    w->nhandoffs++;
    bt_engine_handoff(w->engine, s->seq, on_exported, h); /* may call on_exported now */
}

void wk_handoff_peer_gone(wk_peer *p) {
    wk_worker *w = p->w;
    wk_handoff *h = LIST_FIRST(&w->handoffs), *next;
    for (; h; h = next) {
        next = LIST_NEXT(h, link);
        if (h->p != p) continue;
        h->p = NULL;
        if (h->exported) rec_free(h); /* else its export frees it */
    }
    for (size_t i = 0; i < BT_KV_INFLIGHT; i++) kvin_free(p, i);
    check_idle(w);
}

static void on_wait_timeout(uv_timer_t *t) {
    wk_worker *w = t->data;
    BT_WARN("%zu KV hand-offs not sent within %u ms; exiting without them", w->nhandoffs, WK_HANDOFF_WAIT_MS);
    /* the engine is destroyed next: no export callback comes after that */
    while (LIST_FIRST(&w->handoffs)) rec_free(LIST_FIRST(&w->handoffs));
    run_idle(t);
}

bool wk_handoff_when_idle(wk_worker *w, void (*fn)(wk_worker *)) {
    if (w->nhandoffs == 0) return false;
    if (w->handoff_idle) return true; /* already waiting, within its bound */
    w->handoff_idle = fn;
    uv_timer_start(&w->handoff_wait_timer, on_wait_timeout, WK_HANDOFF_WAIT_MS, 0);
    BT_INFO("waiting for %zu KV hand-offs to be sent before closing", w->nhandoffs);
    return true;
}

void wk_handoff_piece(wk_peer *p, const bt_frame *f) {
    static uint64_t kv_clock; /* orders the slots' writes (loop thread only) */
    uint64_t total, off;
    const uint8_t *d;
    size_t n;
    if (bt_frame_get_kvstate(f, &total, &off, &d, &n) != BT_OK) return;
    int slot = kvin_find(p, f->stream);
    if (slot >= 0 && off == 0) kvin_free(p, (size_t)slot); /* a new state for the stream: the old one is stale */
    wk_kv_in *in = slot >= 0 ? p->kvin[slot] : NULL;
    if (!in) {
        /* a free slot, else the one written least recently (a frontend relays at most
         * BT_KV_INFLIGHT at a time, so that one was abandoned) */
        size_t use = 0;
        for (size_t i = 0; i < BT_KV_INFLIGHT; i++) {
            if (!p->kvin[i]) {
                use = i;
                break;
            }
            if (p->kvin[i]->touched < p->kvin[use]->touched) use = i;
        }
        kvin_free(p, use);
        in = p->kvin[use] = calloc(1, sizeof *in);
        if (!in) return;
        in->stream = f->stream;
        in->total = total;
        in->bad = off != 0 || total > BT_KV_RELAY_MAX || total == 0;
        if (!in->bad && !(in->data = malloc(total))) in->bad = true;
    }
    in->touched = ++kv_clock;
    if (in->bad) return;
    if (total != in->total || off != in->have) {
        in->bad = true;
        free(in->data);
        in->data = NULL;
        return;
    }
    memcpy(in->data + in->have, d, n);
    in->have += n;
}

uint8_t *wk_handoff_take(wk_peer *p, uint32_t stream, uint64_t bytes) {
    wk_worker *w = p->w;
    int slot = kvin_find(p, stream);
    wk_kv_in *in = slot >= 0 ? p->kvin[slot] : NULL;
    uint8_t *data = NULL;
    if (in && !in->bad && in->total == bytes && in->have == bytes) {
        data = in->data;
        in->data = NULL;
    } else {
        w->kv_missing++;
        BT_WARN("stream %u: the KV state it announced (%" PRIu64 " bytes) did not arrive whole; prefilling instead",
                stream, bytes);
    }
    if (slot >= 0) kvin_free(p, (size_t)slot);
    return data;
}

void wk_handoff_forget(wk_peer *p, uint32_t stream) {
    int slot = kvin_find(p, stream);
    if (slot >= 0) kvin_free(p, (size_t)slot);
}

void wk_handoff_init(wk_worker *w) {
    LIST_INIT(&w->handoffs);
    uv_timer_init(w->loop, &w->handoff_timer);
    w->handoff_timer.data = w;
    uv_timer_init(w->loop, &w->handoff_wait_timer);
    w->handoff_wait_timer.data = w;
}

size_t wk_handoff_rebalance(wk_worker *w, size_t n) {
    size_t moved = 0;
    if (w->state != WK_READY) return 0;
    for (wk_peer *p = LIST_FIRST(&w->peers); p && moved < n; p = LIST_NEXT(p, link)) {
        uint64_t k;
        void *v;
        size_t it = 0;
        while (moved < n && bt_map_next(&p->streams, &it, &k, &v)) {
            wk_stream *s = v;
            if (s->ignored_kill) continue; /* the frontend already forgot it */
            BT_INFO("request %s moved off this worker by the operator after %u new tokens", s->rid, s->tokens);
            /* BT_ERR_MOVED is new with BT_HELLO_KVSTATE: an older frontend would not migrate it, so it
             * gets a code it knows (which makes it quarantine this worker for a while) */
            bool knows = bt_rpc_peer_flags(p->conn) & BT_HELLO_KVSTATE;
            wk_handoff_give_back(s, knows ? BT_ERR_MOVED : BT_ERR_DISCONNECTED,
                                 "moved to another worker by the operator (rebalance)");
            wk_stream_free(s); /* its sequence ended with the hand-off */
            moved++;
            it = 0;
        }
        bt_rpc_flush(p->conn);
    }
    w->rebalanced += moved;
    return moved;
}

void wk_handoff_collect(wk_worker *w, bt_metrics *r) {
    bt_engine_kv_stats k;
    bt_engine_kv_stats_get(w->engine, &k);
    const char *m = w->o.model_name;
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_kv_handoff_exports_total",
                                      "KV states the engine exported for streams given back"),
                   (double)k.exports, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_kv_handoff_export_bytes_total", "Bytes of those KV states"),
                   (double)k.export_bytes, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_kv_handoff_sent_total",
                                      "KV states sent to a frontend ahead of their stream's give-back"),
                   (double)w->kv_sent, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_kv_handoff_imports_total",
                                      "Continuations that imported a KV state instead of prefilling"),
                   (double)k.imports, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_kv_handoff_imported_tokens_total",
                                      "Tokens covered by imported KV states (not computed here)"),
                   (double)k.imported_tokens, "model", m, NULL);
    bt_metric_family *f = bt_metrics_counter(r, "baton_worker_kv_handoff_fallbacks_total",
                                             "KV states offered with a continuation and not used: it was prefilled");
    for (int i = 0; i < BT_KV_FB_N_; i++)
        bt_metrics_add(f, (double)(k.fallbacks[i] + (i == BT_KV_FB_MISSING ? w->kv_missing : 0)), "model", m, "reason",
                       bt_kv_fallback_name((bt_kv_fallback)i), NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_engine_prefill_tokens_total",
                                      "Tokens the engine computed that were not a sequence's newest token (prompt, "
                                      "carried and recomputed tokens)"),
                   (double)k.prefill_tokens, "model", m, NULL);
    f = bt_metrics_counter(r, "baton_worker_preemptions_total",
                           "Running sequences preempted and recomputed later: reason kv (the KV cache was full) or "
                           "priority (for a more urgent waiting sequence)");
    bt_metrics_add(f, (double)k.preempted_kv, "model", m, "reason", "kv", NULL);
    bt_metrics_add(f, (double)k.preempted_priority, "model", m, "reason", "priority", NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_engine_steps_total",
                                      "Scheduler steps of the engine that computed something (a prefill chunk or a "
                                      "decoded token)"),
                   (double)k.steps, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_engine_batch_gathers_total",
                                      "First steps of an idle engine that waited for more requests "
                                      "(--batch-gather-us)"),
                   (double)k.gathers, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_engine_batch_gathered_sequences_total",
                                      "Sequences waiting when those first steps began"),
                   (double)k.gathered_seqs, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_engine_batch_gather_seconds_total",
                                      "Time those first steps waited, from the first arrival"),
                   (double)k.gather_ns / 1e9, "model", m, NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_worker_rebalanced_total",
                                      "Streams moved off this worker by the operator (POST /rebalance)"),
                   (double)w->rebalanced, "model", m, NULL);
}
