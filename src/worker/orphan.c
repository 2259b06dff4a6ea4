/* orphan.c — streams that outlive their frontend's connection, until another frontend adopts them.
 *
 * When a frontend dies (kill -9, a crash, a lost host) its clients reconnect to another frontend
 * and resume their streams from the shared journal (docs/fault-tolerance.md, "Frontend
 * failover"). The worker that ran such a stream need not throw its work away: a streamed request
 * whose REQUEST named a stream_key (the journal's stream id) is kept running for --orphan-grace
 * seconds after its connection ends, with what it produces kept in the stream's history. A
 * resuming frontend sends the continuation with `adopt`: the worker re-attaches the orphan to that
 * connection and sends the batches after the frontend's position — no prefill, no recomputation.
 * If the orphan is gone (expired, preempted, the worker restarted) the same payload runs as an
 * ordinary continuation, so the frontend needs no second round trip.
 *
 * An orphan never holds capacity a live request needs: before a new sequence is submitted, live
 * orphans are killed, oldest first, while the engine would make that sequence wait. Non-streaming
 * requests carry no stream_key and are never orphaned. The history is bounded per stream
 * (WK_ORPHAN_HISTORY_MAX); a stream that outgrows it is no longer adoptable (and an orphan that
 * outgrows it is killed). Everything runs on the worker's loop. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "proto/proto.h"
#include "common/metrics.h"
#include "worker/worker_internal.h"

static const char *const ev_names[WK_ORPHAN_EV_N_] = {"orphaned", "adopted", "expired",    "preempted",
                                                      "overflow", "mismatch", "drained",   "failed",
                                                      "superseded", "reclaimed"};

static void on_orphan_timer(uv_timer_t *t);

void wk_orphan_init(wk_worker *w) {
    TAILQ_INIT(&w->orphans);
    uv_timer_init(w->loop, &w->orphan_timer);
    w->orphan_timer.data = w;
}

void wk_history_free(wk_history *h) {
    free(h->ids);
    free(h->text);
    free(h->fr);
    memset(h, 0, sizeof *h);
}

static bool grow(void **p, uint32_t *cap, uint64_t need, size_t elem) {
    if (need <= *cap) return true;
    uint64_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return false;
    *p = q;
    *cap = (uint32_t)c;
    return true;
}

bool wk_history_add(wk_stream *s, const uint32_t *ids, size_t n, const char *text, size_t len) {
    wk_history *h = &s->hist;
    uint64_t bytes = (uint64_t)(h->nids + n) * 4 + h->text_len + len + (uint64_t)(h->nfr + 1) * sizeof *h->fr;
    if (bytes > WK_ORPHAN_HISTORY_MAX || !grow((void **)&h->ids, &h->cap_ids, (uint64_t)h->nids + n, 4) ||
        !grow((void **)&h->text, &h->cap_text, (uint64_t)h->text_len + len, 1) ||
        !grow((void **)&h->fr, &h->cap_fr, h->nfr + 1u, sizeof *h->fr)) {
        wk_history_free(h);
        s->key[0] = '\0';
        return false;
    }
    if (n) memcpy(h->ids + h->nids, ids, n * sizeof *ids);
    if (len) memcpy(h->text + h->text_len, text, len);
    h->nids += (uint32_t)n;
    h->text_len += (uint32_t)len;
    h->fr[h->nfr].tok = h->nids;
    h->fr[h->nfr].text = h->text_len;
    h->nfr++;
    return true;
}

static void arm_timer(wk_worker *w) {
    wk_stream *o = TAILQ_FIRST(&w->orphans);
    if (!o) {
        uv_timer_stop(&w->orphan_timer);
        return;
    }
    uint64_t now = bt_now_ms();
    uv_timer_start(&w->orphan_timer, on_orphan_timer, o->orphan_deadline_ms > now ? o->orphan_deadline_ms - now : 0, 0);
}

/* Takes s off the orphan list and ends it: a live sequence is killed in the engine. */
static void orphan_end(wk_worker *w, wk_stream *s, wk_orphan_event ev) {
    w->orphan_events[ev]++;
    w->cancel_peer_lost++; /* dropped for its lost frontend after all, only later than without orphans */
    BT_INFO("request %s: orphaned stream ended (%s) after %u new tokens", s->rid, ev_names[ev], s->tokens);
    if (!s->done && s->seq) bt_engine_kill(w->engine, s->seq);
    wk_stream_free(s); /* takes it off the list */
    arm_timer(w);
}

static void on_orphan_timer(uv_timer_t *t) {
    wk_worker *w = t->data;
    uint64_t now = bt_now_ms();
    wk_stream *o;
    while ((o = TAILQ_FIRST(&w->orphans)) && o->orphan_deadline_ms <= now)
        orphan_end(w, o, o->overflow ? WK_ORPHAN_EV_OVERFLOW : WK_ORPHAN_EV_EXPIRED);
    arm_timer(w);
}

void wk_orphan_end_soon(wk_worker *w, wk_stream *s) {
    s->overflow = true;
    s->orphan_deadline_ms = 0;
    TAILQ_REMOVE(&w->orphans, s, olink);
    TAILQ_INSERT_HEAD(&w->orphans, s, olink);
    arm_timer(w);
}

bool wk_orphan_keep(wk_worker *w, wk_stream *s) {
    if (!s->key[0] || w->o.orphan_grace <= 0 || w->state != WK_READY || w->engine_failed || s->ignored_kill ||
        bt_ctx_is_stopped(s->ctx))
        return false;
    wk_peer *p = s->p;
    s->origin = bt_rpc_peer_instance(p->conn);
    bt_map_del(&p->streams, s->id);
    w->nstreams--;
    bt_ctx_unlink(s->ctx); /* the peer's context is about to be killed: not this stream */
    s->p = NULL;
    s->orphaned = true;
    s->orphan_deadline_ms = bt_now_ms() + (uint64_t)(w->o.orphan_grace * 1000.0);
    TAILQ_INSERT_TAIL(&w->orphans, s, olink);
    w->norphans++;
    w->orphan_events[WK_ORPHAN_EV_ORPHANED]++;
    BT_INFO("request %s: frontend connection lost after %u new tokens; kept as an orphan for %gs (stream %s)",
            s->rid, s->tokens, w->o.orphan_grace, s->key);
    if (TAILQ_FIRST(&w->orphans) == s) arm_timer(w);
    return true;
}

void wk_orphan_finished(wk_stream *s, uint8_t reason, const bt_usage *u) {
    s->done = true;
    s->seq = NULL;
    s->fin_reason = reason;
    s->fin_prompt = u->prompt_tokens;
    s->fin_completion = u->completion_tokens;
    s->fin_unreported = u->unreported;
    BT_INFO("request %s: orphaned stream finished (%s) after %u new tokens; kept for its adopter", s->rid,
            bt_finish_reason_name((bt_finish_reason)reason), s->tokens);
}

static wk_stream *find(wk_worker *w, const char *key) {
    wk_stream *o;
    TAILQ_FOREACH(o, &w->orphans, olink)
        if (strcmp(o->key, key) == 0) return o;
    return NULL;
}

void wk_orphan_replay(wk_stream *s, uint32_t k) {
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    wk_history *h = &s->hist;
    /* split as on_seq_tokens splits a long batch: the text goes with the last piece */
    for (; b && k < h->nfr; k++) {
        uint32_t t0 = k ? h->fr[k - 1].tok : 0, x0 = k ? h->fr[k - 1].text : 0;
        const uint32_t *ids = h->ids + t0;
        size_t n = h->fr[k].tok - t0;
        while (n > BT_TOKENS_MAX) {
            bt_frame_put_tokens(b, s->id, ids, BT_TOKENS_MAX, "", 0);
            ids += BT_TOKENS_MAX;
            n -= BT_TOKENS_MAX;
        }
        bt_frame_put_tokens(b, s->id, ids, n, h->text + x0, h->fr[k].text - x0);
    }
    if (!s->done && s->waiting) wk_send_waiting(s, (uint8_t)(s->waiting - 1)); /* still waiting in the engine */
    if (s->done) {
        if (b) bt_frame_put_finish_flags(b, s->id, wk_wire_finish(s->p->conn, (bt_finish_reason)s->fin_reason),
                                         wk_wire_finish_flags(s->p->conn, s->fin_unreported), s->fin_prompt,
                                         s->fin_completion);
        s->p->w->requests_ok++;
        wk_stream_free(s);
    }
}

static bool live_with_key(const wk_stream *s, const void *key) {
    return strcmp(s->key, key) == 0 && !s->ignored_kill && !bt_ctx_is_stopped(s->ctx);
}

/* A stream with this key still attached to a frontend: the frontend that handed it off at its
 * shutdown bound (which no longer reads it), or one whose client vanished without its noticing.
 * The resume supersedes it, as a resume on one frontend supersedes a request there
 * (docs/fault-tolerance.md): the old frontend is told, with a non-migratable error, and the stream
 * becomes an orphan to be taken at once. */
static wk_stream *take_live(wk_worker *w, const char *key) {
    wk_peer *p;
    wk_stream *s = wk_find_stream(w, live_with_key, key, &p);
    if (!s) return NULL;
    wk_send_stream_error(p, s->id, BT_ERR_CANCELLED, "the stream was resumed through another frontend");
    bt_map_del(&p->streams, s->id);
    w->nstreams--;
    bt_ctx_unlink(s->ctx);
    s->p = NULL;
    s->orphaned = true;
    s->orphan_deadline_ms = bt_now_ms();
    TAILQ_INSERT_HEAD(&w->orphans, s, olink);
    w->norphans++;
    w->orphan_events[WK_ORPHAN_EV_SUPERSEDED]++;
    BT_INFO("request %s: stream %s taken from frontend %s by a resume through another frontend", s->rid, key,
            bt_rpc_peer_name(p->conn));
    return s;
}

wk_stream *wk_orphan_take(wk_worker *w, const char *key, const char *rid, const uint32_t *carried, size_t ncarried,
                          uint32_t *from_batch) {
    wk_stream *s = find(w, key);
    if (!s) s = take_live(w, key);
    if (!s) {
        BT_INFO("request %s: no orphaned stream %s to re-attach to; continuing it from %zu carried tokens", rid, key,
                ncarried);
        return NULL;
    }
    /* The adopter has ncarried tokens: they must be the orphan's carried ones plus a prefix of
     * its history ending at a batch boundary, or what follows would not continue its stream. */
    const char *why = NULL;
    uint32_t k = 0;
    if (ncarried < s->carried || ncarried > (size_t)s->carried + s->hist.nids) {
        why = "position outside what the orphan produced";
    } else {
        uint32_t have = (uint32_t)(ncarried - s->carried);
        if (have && memcmp(carried + s->carried, s->hist.ids, have * sizeof *carried) != 0)
            why = "carried tokens differ from the orphan's";
        while (!why && k < s->hist.nfr && s->hist.fr[k].tok < have) k++;
        if (!why && have && (k == s->hist.nfr || s->hist.fr[k].tok != have)) why = "position inside a batch";
        if (!why && have) k++; /* the batches after the one ending at the position */
    }
    if (why) {
        BT_WARN("request %s: cannot re-attach to orphaned stream %s (%s); continuing it from %zu carried tokens",
                rid, key, why, ncarried);
        orphan_end(w, s, WK_ORPHAN_EV_MISMATCH);
        return NULL;
    }
    TAILQ_REMOVE(&w->orphans, s, olink);
    w->norphans--;
    s->orphaned = false;
    arm_timer(w);
    w->orphan_events[WK_ORPHAN_EV_ADOPTED]++;
    BT_INFO("request %s: re-attached to orphaned stream %s at position %zu; sending the %u tokens produced after it%s "
            "(no prefill)",
            rid, key, ncarried, s->hist.nids - (uint32_t)(ncarried - s->carried), s->done ? ", then its finish" : "");
    *from_batch = k;
    return s;
}

/* The engine's cap on sequences admitted at once (--max-num-seqs), or 0 for an engine without
 * one (openai: the upstream queues, which its load's `waiting` shows). */
static uint64_t max_seqs(const wk_worker *w) {
    if (strcmp(w->o.engine, "mocker") == 0) return (uint64_t)w->o.mocker.max_num_seqs;
    if (strcmp(w->o.engine, "llama") == 0) return (uint64_t)w->o.llama.max_num_seqs;
    return 0;
}

static uint64_t minus(uint64_t a, uint64_t b) { return a > b ? a - b : 0; }

/* Before a new sequence is submitted: kills live orphans, oldest first, while the new sequence
 * would wait — something already waits, every sequence slot is taken, or the KV cache is full.
 * An engine whose load is a snapshot made on its own thread (llama) shows a kill only later.
 * Nothing enters the engine meanwhile (submits are made on this loop), so each kill made here is
 * counted off the first load read: one slot, or one waiting sequence admitted in its place; the
 * KV condition is trusted again only once the load has moved. (Reading the load alone, a llama
 * worker at --max-num-seqs made the new request wait for the orphans to end, and would have
 * killed every orphan for one request once it saw the engine full.) */
void wk_orphan_make_room(wk_worker *w) {
    uint64_t cap = max_seqs(w), killed = 0, busy0 = 0, waiting0 = 0;
    bt_engine_load last;
    while (w->norphans) {
        bt_engine_load l;
        bt_engine_get_load(w->engine, &l);
        /* sequences still preparing (llama: prompts being tokenized) will take slots, counted in
         * busy; but they do not wait for one, and a kill would not let them in sooner */
        uint64_t ready = minus(l.waiting, l.preparing);
        if (!killed) {
            busy0 = l.running + l.waiting;
            waiting0 = ready;
        }
        uint64_t busy = l.running + l.waiting, waiting = ready;
        if (busy > minus(busy0, killed)) busy = minus(busy0, killed);
        if (waiting > minus(waiting0, killed)) waiting = minus(waiting0, killed);
        bool kv = l.active_decode_blocks >= l.total_blocks && (!killed || memcmp(&l, &last, sizeof l) != 0);
        if (!(waiting > 0 || (cap && busy >= cap) || kv)) return;
        wk_stream *o;
        TAILQ_FOREACH(o, &w->orphans, olink)
            if (!o->done) break; /* a finished orphan holds no engine capacity */
        if (!o) return;
        orphan_end(w, o, WK_ORPHAN_EV_PREEMPTED);
        killed++;
        last = l;
    }
}

void wk_orphan_reclaim(wk_worker *w, uint64_t frontend_instance) {
    wk_stream *o = TAILQ_FIRST(&w->orphans), *next;
    for (; o; o = next) {
        next = TAILQ_NEXT(o, olink); /* orphan_end frees o, and only o */
        if (o->origin == frontend_instance) orphan_end(w, o, WK_ORPHAN_EV_RECLAIMED);
    }
}

void wk_orphan_kill_all(wk_worker *w, wk_orphan_event ev) {
    wk_stream *o;
    while ((o = TAILQ_FIRST(&w->orphans))) orphan_end(w, o, ev);
    uv_timer_stop(&w->orphan_timer);
}

void wk_orphan_collect(const wk_worker *w, bt_metrics *r) {
    bt_metrics_gauge_value(r, "baton_worker_orphans", BT_MERGE_SUM,
                           "Streams kept running after their frontend's connection ended", (double)w->norphans);
    bt_metric_family *fam =
        bt_metrics_counter(r, "baton_worker_orphan_events_total", "What became of orphaned streams");
    for (int i = 0; i < WK_ORPHAN_EV_N_; i++) bt_metrics_add(fam, (double)w->orphan_events[i], "event", ev_names[i], NULL);
    bt_metrics_counter_value(r, "baton_worker_engine_submits_total",
                             "Sequences submitted to the engine (each one prefills its prompt and carried tokens)",
                             (double)w->engine_submits);
}
