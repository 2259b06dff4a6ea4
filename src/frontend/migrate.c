/* migrate.c — the attempts of one request: where migration lives.
 *
 * An attempt (fe_attempt, fe.h) is one REQUEST frame on one worker and the stream it opens. The
 * request keeps every token id it delivered to the client; when an attempt fails with a
 * migratable error (the connection lost, the worker declared dead, draining or shutting down, an
 * engine failure) the next attempt is a continuation: it carries those ids (and the delivered
 * text, for engines that continue from text) with max_tokens reduced by their number, and the
 * worker continues from prompt + delivered tokens, so the client sees one uninterrupted stream.
 *
 * The budget: --migration-limit + 1 attempts, shared by failures before the first token
 * (new_request migrations) and failures mid-stream (ongoing_request). A REQUEST that crossed a
 * worker's GOAWAY and was refused before it ran is re-routed without being charged, and so is a
 * stream its worker's operator moved (BT_ERR_MOVED, a rebalance). A stopped or
 * killed request never gets another attempt (checked before every one), and a non-migratable
 * error ends the request. The request's state goes ROUTING (first attempt) or MIGRATING (from a
 * failure until the next attempt's first token) to STREAMING; request.c owns the output and the
 * end of the request.
 *
 * --stream-token-timeout (fe_token_sweep_start) ends an attempt whose worker keeps its connection
 * alive but sends nothing for its stream: the worker gets a KILL for it and the request migrates as
 * after any failure of the worker (docs/fault-tolerance.md, "Silent streams").
 *
 * Everything runs on the request's loop; the worker connection code (workers.c) only hands each
 * stream's frames to its attempt. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "frontend/fe.h"
#include "proto/request.h"

/* KV states held by all requests of the process at once (a drain hands back many streams
 * together): past it a state is not kept, and its continuation is prefilled. A state is held
 * whole (from its first piece until its last is relayed): with the per-state cap BT_KV_RELAY_MAX
 * (proto.h) this is the frontend's memory bound for the hand-off (docs/protocol.md, KV hand-off). */
#define FE_KV_TOTAL_MAX ((uint64_t)4 << 30)
static _Atomic uint64_t kv_held; /* bytes of states held, over every loop thread */

/* Moves of one request (BT_ERR_MOVED) charged to no budget. A rebalance moves a stream once; a
 * worker that answers every REQUEST with MOVED (broken, or hostile) would bounce a request between
 * itself and the frontend for ever, at network speed and with a log line each time. Past these
 * many, a move is charged as any migratable failure, so the budget ends it. */
#define FE_MOVES_FREE 8

/* The output a request with no max_tokens is assumed to take, for the worker's pending KV
 * estimate until its next load report (the worker's --default-max-tokens decides the real one). */
#define MAX_TOKENS_GUESS 256u

static void attempt_failed(fe_req *r, bt_status code, const char *msg);

/* The attempt's context changed state: a STOP or KILL frame for its stream goes to its worker,
 * written now rather than at the end of the loop iteration (a KILL frees the engine's KV blocks;
 * there is no reason to wait). */
static void on_attempt_cancel(bt_ctx *c, bt_ctx_state s, void *ud) {
    (void)c;
    fe_attempt *a = ud;
    fe_req *r = a->req;
    fe_worker *w = a->worker;
    bool kill = s == BT_CTX_KILLED;
    if (a->held_req) {
        /* its REQUEST is not written yet (the KV state ahead of it is): a STOP waits for it, a KILL
         * ends the relay and lets the worker drop what arrived of the state */
        if (!kill) {
            a->held_stop = true;
            return;
        }
        fe_worker_relay_drop(a);
    }
    uint64_t t_write = bt_now_us();
    fe_worker_send_cancel(w, a->stream_id, kill);
    if (w->conn) bt_rpc_flush(w->conn);
    uint64_t now = bt_now_us();
    /* monotonic timestamps, for bench/cancel_latency.py */
    BT_DEBUG("request %s: %s written to worker %" PRIx64 " stream %u, %" PRIu64 " us after the cancel (cancel t=%" PRIu64
             " us, write t=%" PRIu64 " us; %u tokens on this attempt, %zu delivered)",
             r->rid, kill ? "KILL" : "STOP", w->id, a->stream_id, r->t_cancel_us ? now - r->t_cancel_us : 0,
             r->t_cancel_us, t_write, a->tokens, r->nids);
}

/* Ends the attempt's life: its stream is forgotten by its worker, its context freed, and the
 * request has no attempt until the next dispatch. */
static void attempt_detach(fe_attempt *a) {
    fe_req *r = a->req;
    fe_attempt_preempt_done(a);
    fe_worker_relay_drop(a);
    fe_kv_free(&a->kv_out);
    fe_worker_stream_done(a->worker, a->stream_id);
    bt_ctx_free(a->ctx);
    if (r->attempt == a) r->attempt = NULL;
    free(a);
}

void fe_attempt_abandon(fe_attempt *a) {
    /* nothing generates for a request that has ended: the attempt's context sends KILL (once:
     * not again when the kill came from the request's own context) */
    if (a->ctx) bt_ctx_kill(a->ctx);
    else fe_worker_send_cancel(a->worker, a->stream_id, true);
    attempt_detach(a);
}

void fe_attempt_release(fe_attempt *a) {
    /* no KILL: the worker keeps generating, and keeps the stream as an orphan for another frontend
     * once this one's connection ends; frames it sends meanwhile are for a stream this frontend no
     * longer knows, which are ignored */
    attempt_detach(a);
}

/* The continuation: the REQUEST payload (src/proto/request.h) of the request's next attempt.
 * carried = every token id delivered to the client; max_tokens = what is left of the client's
 * budget (none when the client set none: the worker's default, less the carried tokens, applies); carried_text = the delivered text, unless it outgrew its cap. *est_tokens estimates the
 * tokens the attempt will hold in KV (4 bytes of body per prompt token). NULL when out of memory. */
static char *continuation_payload(const fe_req *r, bool adopt, bool kv, size_t *len, uint64_t *est_tokens) {
    int64_t remaining = r->max_tokens - (int64_t)r->nids;
    if (remaining < 0) remaining = 0;
    bool limited = r->max_tokens >= 0; /* else the worker's default, less the carried tokens, bounds it */
    /* A resume ahead of the journal (resume.c): the client holds tokens up to skip_to, which the
     * journal lacks, and a continuation from the journal regenerates them in events of its own
     * making. When one of them straddled the client's position (request.c: the engine batched
     * tokens otherwise), the next attempt only catches up: it stops at the client's position,
     * where its last event ends, and fe_attempt_on_finish continues from there. */
    bool catch_up = r->catch_up && r->skip_to > r->nids;
    if (catch_up && (!limited || (uint64_t)remaining > r->skip_to - r->nids)) {
        limited = true;
        remaining = (int64_t)(r->skip_to - r->nids);
    }
    bt_request rq = {
        .request_id = r->rid,
        .api = r->api,
        .body = r->body,
        .body_json = r->canon, /* serialized once (fe_request_start) */
        .body_json_len = r->canon_len,
        .n_carried = r->nids,
        .has_max_tokens = limited,
        .max_tokens = limited ? remaining : 0,
        .seed = r->seed,
        .priority = fe_admit_priority(r),
        /* a stream another frontend can resume (the journal is shared) may outlive this frontend
         * on its worker, to be re-attached; otherwise nothing would ever adopt it */
        .stream_key = r->stream && r->jrec && atomic_load(&r->fe->grp->journal->shared) && !catch_up
                          ? r->stream_id
                          : NULL, /* a catch-up is never orphaned: its early end would pass for the stream's */
        .adopt = adopt && r->jrec,
        .kv_state_bytes = kv ? r->kv.total : 0,
        /* the carried tokens' numerics: a worker with other ones refuses them (worker.c) */
        .exactness = r->nids ? r->exactness : NULL,
    };
    const char *text;
    size_t text_len;
    fe_request_output(r, &rq.carried, &text, &text_len);
    if (r->nids && text) {
        rq.carried_text = text;
        rq.carried_text_len = text_len;
    }
    char *payload = bt_request_encode(&rq, len);
    if (payload) *est_tokens = (limited ? (uint64_t)remaining : MAX_TOKENS_GUESS) + r->nids + *len / 4;
    return payload;
}

/* ---- continuations waiting for link room ----
 *
 * A continuation goes to a busy worker rather than fail, and may pass the request-plane backlog
 * mark that holds new requests back (BT_RPC_BACKLOG_BUSY), but not BT_RPC_BACKLOG_CONTINUATION:
 * when every worker that could take it holds that much unsent, it waits here until a link has
 * drained (its worker reads) or is gone (a worker that reads nothing is closed after the dead-peer
 * time, and routing then skips it). A migration storm onto workers that read slowly thus waits in
 * this list instead of pushing their connections past their memory cap, which would close them
 * and migrate their streams in turn.
 *
 * Each retry routes over the model's workers, on the loop that must write those links out: the
 * retries go at most LINK_WAIT_MAX_PER_TICK a tick, and only after a link fell below the mark or a
 * worker's connection opened or closed (fe_migrate_link_wake). A tick whose retries sent some keeps
 * going at the next one; one whose retries all waited again stops until the next wake. Anything
 * else that makes a worker routable again (a quarantine or an ejection ending) is found by the
 * oldest waiting continuation, retried alone every LINK_WAIT_IDLE_TICKS ticks. */
#define LINK_WAIT_MS 5
#define LINK_WAIT_MAX_PER_TICK 32 /* retries per tick: bounded work per loop iteration */
#define LINK_WAIT_IDLE_TICKS 20   /* 100 ms */

void fe_migrate_link_wake(fe *f) {
    if (f->nlink_waits) f->link_woken = true;
}

void fe_migrate_unwait(fe_req *r) {
    if (!r->link_waiting) return;
    fe *f = r->fe;
    TAILQ_REMOVE(&f->link_waits, r, link_wait);
    r->link_waiting = false;
    f->nlink_waits--;
}

static void on_link_timer(uv_timer_t *t) {
    fe *f = t->data;
    size_t n = LINK_WAIT_MAX_PER_TICK;
    if (!f->link_woken) {
        if (++f->link_idle_ticks < LINK_WAIT_IDLE_TICKS) return;
        n = 1;
    }
    f->link_woken = false;
    f->link_idle_ticks = 0;
    /* the oldest first; one that must wait again goes back to the end */
    if (n > f->nlink_waits) n = f->nlink_waits;
    size_t left = f->nlink_waits; /* those that stay if every retry waits again */
    for (size_t i = 0; i < n && !TAILQ_EMPTY(&f->link_waits); i++) {
        fe_req *r = TAILQ_FIRST(&f->link_waits);
        fe_migrate_unwait(r);
        r->model->st.link_wait_retries++;
        fe_migrate_dispatch(r); /* may end r */
    }
    if (f->nlink_waits < left) f->link_woken = true; /* some went: the rest may follow */
    if (TAILQ_EMPTY(&f->link_waits)) uv_timer_stop(t);
}

static void link_wait(fe_req *r, const char *whose) {
    fe *f = r->fe;
    if (!r->link_wait_logged) {
        r->link_wait_logged = true;
        BT_WARN("request %s: %s %u MiB or more unsent on its request-plane link; its continuation waits for "
                "one to drain (%zu tokens carried)",
                r->rid, whose, BT_RPC_BACKLOG_CONTINUATION >> 20, r->nids);
    }
    if (!r->link_waiting) {
        TAILQ_INSERT_TAIL(&f->link_waits, r, link_wait);
        r->link_waiting = true;
        f->nlink_waits++;
    }
    if (!uv_is_active((uv_handle_t *)&f->link_timer) && !uv_is_closing((uv_handle_t *)&f->link_timer))
        uv_timer_start(&f->link_timer, on_link_timer, LINK_WAIT_MS, LINK_WAIT_MS);
}

/* Whether m has a routable worker other than `avoid` (whatever its fingerprint). */
static bool others_routable(const fe_model *m, uint64_t avoid) {
    for (size_t i = 0; i < m->nws; i++)
        if (m->ws[i]->id != avoid && fe_worker_routable(m->ws[i])) return true;
    return false;
}

/* Whether a routable, not ejected worker of r's model that has not refused r, with the fingerprint
 * `exact` (NULL = any), is left out by its card's context alone (fe_worker_context_short); *largest
 * is the largest context among those. */
static bool context_short_left(const fe_req *r, uint64_t need, const char *exact, uint64_t *largest) {
    bool any = false;
    for (size_t i = 0; i < r->model->nws; i++) {
        fe_worker *w = r->model->ws[i];
        bool refused = false;
        for (size_t k = 0; k < r->nskip_ids; k++) refused |= r->skip_ids[k] == w->id;
        if (refused || !fe_worker_routable(w) || fe_outlier_ejected(r->fe, w)) continue;
        if ((exact && strcmp(w->exactness, exact) != 0) || !fe_worker_context_short(w, need)) continue;
        any = true;
        if (w->context_length > *largest) *largest = w->context_length;
    }
    return any;
}

void fe_migrate_dispatch(fe_req *r) {
    fe *f = r->fe;
    if (bt_ctx_is_stopped(r->ctx)) { /* a stopped or killed request never gets another attempt */
        fe_request_end_cancelled(r);
        return;
    }
    bool first = !r->attempts && !r->resumed;
    if (first && fe_admit_before_route(r)) return; /* others of its model wait: it queues behind them */
    bool all_busy = false, preempting = false;
    /* a resumed stream goes back to the worker that streamed it when it can: that worker may still
     * run it as an orphan (its frontend died), and re-attaching costs no prefill */
    fe_worker *w = r->adopt_worker ? bt_map_get(&f->workers_by_id, r->adopt_worker) : NULL;
    bool adopt = w && fe_worker_routable(w) && strcmp(w->model, r->model->name) == 0;
    if (adopt && bt_rpc_unsent(w->conn) >= BT_RPC_BACKLOG_CONTINUATION) {
        link_wait(r, "the worker that streamed it holds"); /* adopt_worker kept: it is tried again */
        return;
    }
    r->adopt_worker = 0;
    /* tokens delivered on a worker with an exactness fingerprint continue only on a worker with the
     * same one (docs/engines.md §3.4): another would continue them with other logits */
    const char *exact = r->nids && r->exactness[0] ? r->exactness : NULL;
    uint64_t need = fe_request_context_need(r); /* a worker whose card advertises less would refuse it */
    if (!adopt) {
        w = fe_route(f, r->model, r->failed_worker, r->skip_ids, r->nskip_ids, &all_busy, exact, need);
        if (!w && all_busy && first) {
            /* every worker is busy, but one may preempt a less urgent running sequence for this
             * request: it goes there instead of waiting behind that work (docs/load-shedding.md) */
            w = fe_route_preempt(f, r->model, fe_admit_priority(r), need);
            preempting = w != NULL;
        }
        if ((r->attempts || r->resumed) && ((!w && all_busy) || (w && w->id == r->failed_worker))) {
            /* a continuation (a migration, or a resumed stream whose response has begun) was admitted already: it goes to a busy worker rather than fail, but only
             * when every worker is busy. The busy check above comes first so that the streams of a dead
             * worker (a migration storm) fill the workers under their thresholds before any goes over
             * one: each continuation adds its estimate to its target's pending blocks, so the targets
             * turn busy one by one and the storm spreads by free capacity; past that, each goes to the
             * least used of the busy ones. (fe_route hands back the failed worker only when nothing
             * else is eligible: a busy other one is still better.) */
            fe_worker *busy = fe_route_least_busy(r->model, r->failed_worker, r->skip_ids, r->nskip_ids, exact, need);
            if (busy && busy != w)
                BT_INFO("request %s: every worker is busy; its continuation goes to busy worker %" PRIx64, r->rid,
                        busy->id);
            if (busy) w = busy;
            else if (!w) { /* fe_route_least_busy passes over no routable worker but those with full links */
                link_wait(r, "every worker that could continue it holds");
                return;
            }
        }
    }
    if (!w) {
        uint64_t largest = 0; /* the largest context among the workers left too short for it */
        bool short_left = context_short_left(r, need, exact, &largest);
        if (all_busy && !r->attempts) {
            if (!fe_admit_all_busy(r)) fe_request_reject_busy(r); /* queued, or refused by the queue */
        } else if (short_left || r->fail_code == BT_ERR_CONTEXT_LENGTH) {
            /* workers are left, but none can hold what the stream holds by now: their cards say so, or
             * they refused it (context_refused) */
            char m[640], last[160] = ""; /* a first attempt has no last one */
            if (r->fail_msg[0]) snprintf(last, sizeof last, " (last attempt: %s)", r->fail_msg);
            /* Nothing delivered: the request is larger than every worker left, which is the client's
             * to fix, in OpenAI's words (clients match them), and logged at debug as every client
             * error is (docs/security.md), so that no client fills the log. A stream cut short after
             * tokens went out is the operator's to know of. */
            bool clients = short_left && !r->nids && !r->resumed;
            if (clients)
                snprintf(m, sizeof m,
                         "This model's maximum context length is %" PRIu64 " tokens (the largest among its live "
                         "workers). However, you requested %" PRIu64 " tokens or more (the prompt and the "
                         "completion). Please reduce the length of the %s or completion.",
                         largest, need, r->api == BT_API_CHAT ? "messages" : "prompt");
            else if (short_left)
                snprintf(m, sizeof m,
                         "no worker left can hold this request after %zu tokens: it needs a context of %" PRIu64
                         " tokens or more, and the largest among the workers left is %" PRIu64 " tokens%s",
                         r->nids, need, largest, last);
            else
                snprintf(m, sizeof m,
                         "no worker left can hold this request after %zu tokens: every other worker refused it for "
                         "its context length%s",
                         r->nids, last);
            if (clients) BT_DEBUG("request %s: %s", r->rid, m);
            else BT_WARN("request %s: %s", r->rid, m);
            fe_request_fail(r, BT_ERR_CONTEXT_LENGTH, m);
        } else if (exact && others_routable(r->model, r->failed_worker)) {
            /* workers are left, but none computes what the one that began the stream did */
            char m[512];
            snprintf(m, sizeof m,
                     "no worker can continue this stream exactly after %zu tokens: none left with the exactness "
                     "fingerprint \"%s\" (last attempt: %s)",
                     r->nids, exact, r->fail_msg);
            BT_WARN("request %s: %s", r->rid, m);
            fe_request_fail(r, BT_ERR_NO_WORKER, m);
        } else if (r->attempts) {
            char m[256];
            snprintf(m, sizeof m, "no worker left to continue the request (last attempt: %s)", r->fail_msg);
            fe_request_fail(r, BT_ERR_NO_WORKER, m);
        } else {
            fe_request_fail(r, BT_ERR_NO_WORKER, "no worker available for the model");
        }
        return;
    }
    fe_attempt *a = bt_zalloc(sizeof *a); /* rather than calloc (util.h) */
    if (!a) {
        fe_request_fail(r, BT_ERR_NOMEM, "out of memory");
        return;
    }
    a->req = r;
    a->worker = w;
    a->number = r->attempts + 1;
    r->attempts_left--;
    r->attempts++;
    size_t len = 0;
    uint64_t est = 0;
    /* the state the last worker gave the stream back with goes to this one, once */
    bool kv = r->kv.data && !r->kv.bad && r->kv.have == r->kv.total && !adopt && w->conn &&
              (bt_rpc_peer_flags(w->conn) & BT_HELLO_KVSTATE); /* an older worker would refuse the frame */
    if (r->kv.total && !kv) r->model->st.kv_unrelayed++; /* incomplete, too large, or the worker is older */
    if (kv) {
        r->model->st.kv_relayed++;
        r->model->st.kv_relayed_bytes += r->kv.total;
        BT_INFO("request %s: relaying a KV state of %" PRIu64 " bytes to worker %" PRIx64, r->rid, r->kv.total, w->id);
    }
    char *payload = continuation_payload(r, adopt, kv, &len, &est);
    if (kv) { /* the attempt owns the state now, until its last piece is written */
        a->kv_out = r->kv;
        memset(&r->kv, 0, sizeof r->kv);
    }
    fe_kv_free(&r->kv);
    uint32_t id = payload ? fe_worker_send_request(w, a, payload, len, est) : 0;
    free(payload);
    if (id == 0) { /* the connection is going away under us: that attempt failed at once */
        fe_kv_free(&a->kv_out);
        free(a);
        fe_worker_quarantine(w, "cannot send a request");
        r->failed_worker = w->id;
        attempt_failed(r, BT_ERR_CANNOT_CONNECT, "cannot send the request to the worker");
        return;
    }
    a->stream_id = id;
    bool counted = r->mig_pending;
    r->mig_pending = false; /* the migration counted at the failure is performed */
    if (preempting) {
        uint32_t victims;
        int32_t vp;
        bt_load_get_preempt(&w->load, &victims, &vp);
        fe_attempt_preempt_start(a);
        r->model->st.preempt_routed++;
        BT_DEBUG("request %s: every worker is busy; priority %d goes to worker %" PRIx64
                 ", which preempts for it (victims of priority %d: %u, %u spoken for)",
                 r->rid, fe_admit_priority(r), w->id, vp, victims, w->preempt_pending);
    }
    /* written at the end of this loop iteration's I/O together with the other REQUESTs it
     * produces, or before the frames of a worker's read are handled, whichever comes first: not at
     * the connection's flush in the next iteration, which could come after the fan-out of an engine
     * step to every client (milliseconds at 1,000 streams) and make the REQUEST miss the engine's
     * next step; and not one write per request either, which in a burst of requests read together
     * wakes the worker on the first of them, so that its engine starts a step with a few and the
     * rest wait a whole step more (docs/benchmarks.md, burst TTFT). */
    fe_worker_flush_soon(w);
    a->t_sent_us = bt_now_us();
    a->t_heard_ms = (uint32_t)uv_now(f->loop); /* --stream-token-timeout counts from here */
    /* nothing carried: this attempt's worker is the one whose numerics the stream follows */
    if (!r->nids) bt_copy_str(r->exactness, sizeof r->exactness, w->exactness);
    if (a->number == 1 && !r->resumed) fe_budget_started(f);
    r->attempt = a;
    r->last_worker = w->id;
    if (r->jrec) fe_journal_note_worker(f->grp->journal, r->jrec, w->id, r->exactness);
    if (adopt)
        BT_INFO("request %s: stream %s sent back to worker %" PRIx64 " to re-attach after %zu tokens", r->rid,
                r->stream_id, w->id, r->nids);
    a->ctx = bt_ctx_new(r->rid, on_attempt_cancel, a);
    if (!a->ctx) {
        fe_request_fail(r, BT_ERR_NOMEM, "out of memory"); /* the request's end kills the stream */
        return;
    }
    bt_ctx_link(r->ctx, a->ctx); /* the request is live (checked above): no callback here */
    if (r->state == FE_REQ_ADMITTED) {
        char why[64] = ""; /* the reason is only logged, at debug level: formatted only then */
        if (bt_log_enabled(BT_LOG_DEBUG)) snprintf(why, sizeof why, "sent to worker %" PRIx64, w->id);
        fe_req_set_state(r, FE_REQ_ROUTING, why);
    }
    if (r->attempts > 1 && counted)
        BT_WARN("request %s migrated from worker %" PRIx64 " to worker %" PRIx64
                " with %zu tokens carried (%s after %s: %s; attempt %d of %d)",
                r->rid, r->failed_worker, w->id, r->nids, r->nids ? "ongoing_request" : "new_request",
                bt_status_name(r->fail_code), r->fail_msg, r->attempts, r->attempts + r->attempts_left);
    else if (r->attempts > 1) /* a move or a refusal before the stream ran: not a failure, not counted */
        BT_INFO("request %s migrated from worker %" PRIx64 " to worker %" PRIx64
                " with %zu tokens carried (not a failure: %s: %s; attempt %d of %d)",
                r->rid, r->failed_worker, w->id, r->nids, bt_status_name(r->fail_code), r->fail_msg, r->attempts,
                r->attempts + r->attempts_left);
    /* for bench/migration_recovery.py: CLOCK_MONOTONIC, comparable across local processes */
    if (r->attempts > 1 && r->t_fail_us)
        BT_DEBUG("request %s: failure seen at t=%" PRIu64 " us, re-dispatched at t=%" PRIu64 " us", r->rid,
                 r->t_fail_us, bt_now_us());
}

/* Worker id is not routed to again for r (fe_route's skip list), while the list has room. */
static void skip_worker(fe_req *r, uint64_t id) {
    for (size_t i = 0; i < r->nskip_ids; i++)
        if (r->skip_ids[i] == id) return;
    if (r->nskip_ids < FE_SKIP_IDS_MAX) r->skip_ids[r->nskip_ids++] = id;
}

/* A continuation (tokens carried, or an earlier attempt made) was refused by its worker for its
 * context length: the worker's card did not tell it was too small (none, or a stale one), while
 * another worker took the request before. The refusal is that worker's, not the client's: it is
 * not tried again for this request (as a busy upstream) and the refusal goes on as a migratable
 * failure, charged to the budget; when no worker is left, fe_migrate_dispatch ends the request
 * with the reason. False for a first attempt, and for one with nothing delivered after the workers
 * larger than an earlier refusing one were tried (context_declined): the refusal is the client's
 * answer. */
static bool context_refused(fe_req *r, const char *msg) {
    if (!r->nids && !r->resumed && (r->attempts < 2 || r->context_floor)) return false;
    skip_worker(r, r->failed_worker);
    BT_WARN("request %s: worker %" PRIx64 " refused its continuation after %zu tokens for its context length (%s); "
            "trying another worker",
            r->rid, r->failed_worker, r->nids, msg);
    return true;
}

/* An attempt with nothing delivered yet was refused by its worker for its context length: the
 * frontend could not count the prompt (text, and cards without max_token_bytes), so routing could
 * not tell that worker was too small. When the model has a routable worker whose card advertises
 * a larger context, the request now needs more than the refusing card says (context_floor, which
 * rules out that worker and every one no larger) and goes on to it, as a draining worker's refusal
 * does: nothing ran, so nothing is charged. Each such refusal raises the floor, so there are at
 * most as many as the contexts the workers advertise. False when no larger worker is left (or the
 * refusing one advertises no context): the refusal is then the client's answer (context_refused). */
static bool context_declined(fe_req *r, const char *msg) {
    if (r->nids || r->resumed) return false;
    const fe_worker *by = bt_map_get(&r->fe->workers_by_id, r->failed_worker);
    if (!by || !by->context_length || r->context_floor > by->context_length) return false;
    uint64_t floor = by->context_length + 1;
    uint64_t need = fe_request_context_need(r);
    if (need < floor) need = floor;
    const fe_worker *larger = NULL;
    for (size_t i = 0; i < r->model->nws && !larger; i++) {
        fe_worker *w = r->model->ws[i];
        bool skipped = false;
        for (size_t k = 0; k < r->nskip_ids; k++) skipped |= r->skip_ids[k] == w->id;
        if (!skipped && fe_worker_routable(w) && !fe_outlier_ejected(r->fe, w) && !fe_worker_context_short(w, need))
            larger = w;
    }
    if (!larger) return false;
    r->context_floor = floor;
    BT_INFO("request %s: worker %" PRIx64 " (context %" PRIu64 " tokens) refused it for its context length (%s); "
            "trying a worker of a larger context",
            r->rid, by->id, by->context_length, msg);
    return true;
}

/* An attempt was refused by its worker's busy upstream (bt_status_upstream_busy): the worker is
 * not at fault (workers.c does not quarantine it), and another worker's upstream may take the
 * request, so it goes on as any migratable failure (charged to its budget and the retry budget)
 * until it has been refused as many times as its model has workers to route to: then the client
 * gets the refusal, 429 or 503 with the shortest Retry-After the upstreams gave (request.c). True
 * when the request ended here. */
static bool busy_refused(fe_req *r, bt_status code, const char *msg) {
    r->busy_refusals++;
    int ra = bt_status_retry_after(msg, strlen(msg));
    if (ra && (!r->busy_retry_after || ra < r->busy_retry_after)) r->busy_retry_after = ra;
    /* the worker is not tried again for this request: a busy one answers at once and holds no
     * streams, so least-loaded routing would send the retry straight back to it (or to another busy
     * one) while a free worker waits */
    skip_worker(r, r->failed_worker);
    size_t n = 0; /* workers left to try */
    for (size_t i = 0; i < r->model->nws; i++) {
        fe_worker *w = r->model->ws[i];
        bool tried = false;
        for (size_t k = 0; k < r->nskip_ids; k++) tried |= r->skip_ids[k] == w->id;
        n += fe_worker_routable(w) && !fe_outlier_ejected(r->fe, w) && !tried;
    }
    /* past FE_SKIP_IDS_MAX refusals the list no longer grows: the count of refusals bounds them */
    if (n > 0 && (r->nskip_ids < FE_SKIP_IDS_MAX || (size_t)r->busy_refusals < r->model->nws)) return false;
    fe_request_fail(r, code, msg);
    return true;
}

/* ---- a writer superseded while it was away ----
 *
 * A frontend that was stopped (SIGSTOP, a paused VM) while its client resumed the stream on another
 * frontend is superseded: the other one took the stream over, on its worker when it could. When
 * that worker is gone too, nothing tells this frontend, which on waking sees its worker's
 * connection lost and would migrate the stream, generating for a client that left an answer its
 * successor is generating too. So every migration of a stream in a shared journal asks the
 * journal whether the stream has a later writer (fe_journal_check_writer: one JetStream read on
 * the journal's thread). The continuation is not held back meanwhile (not taken over is the
 * common case), and a stream that was taken over is ended when the answer comes, as a superseded
 * request is (killed on its worker, its response closed without [DONE]). Nothing tells whether
 * the loop was away: it wakes in its I/O poll, and handles the lost connection before any timer
 * could see the gap; nor does the stream's silence, since the frames its worker sent before dying
 * are read first. */

typedef struct {
    fe *f;
    char sid[FE_STREAM_ID_LEN + 1];
} writer_check;

/* On the request's loop: the stream has a later writer elsewhere. */
static void writer_taken_job(fe *f, void *arg) {
    writer_check *c = arg;
    for (fe_req *r = LIST_FIRST(&f->reqs); r; r = LIST_NEXT(r, link)) {
        if (!r->jrec || r->state == FE_REQ_DONE || strcmp(r->stream_id, c->sid) != 0) continue;
        BT_WARN("request %s: stream %s was taken over by another frontend (its client resumed it there while this "
                "one was away); ending it here",
                r->rid, r->stream_id);
        fe_request_supersede(r); /* frees r */
        break;
    }
    free(c);
}

/* On the journal's thread (journal.h: check_writer). */
static void on_writer_checked(void *arg, bool taken) {
    writer_check *c = arg;
    if (!taken || !fe_shard_post(c->f, writer_taken_job, c)) free(c);
}

static void check_writer(fe_req *r) {
    fe_journal *j = r->fe->grp->journal;
    if (!r->stream || !r->jrec || !r->nids || !j || !atomic_load(&j->shared)) return;
    writer_check *c = malloc(sizeof *c);
    if (!c) return;
    c->f = r->fe;
    memcpy(c->sid, r->stream_id, sizeof c->sid);
    if (!fe_journal_check_writer(j, r->jrec, on_writer_checked, c)) free(c);
}

/* The failed attempt is detached: a cancellation or a non-migratable error ends the request; a
 * migratable one counts a migration (new_request before the first token reached the client,
 * ongoing_request after) and starts the next attempt while the budget lasts. */
static void attempt_failed(fe_req *r, bt_status code, const char *msg) {
    if (!r->http || bt_ctx_is_stopped(r->ctx)) { /* cancelled: never migrated */
        fe_request_end_cancelled(r);
        return;
    }
    if (code == BT_ERR_CONTEXT_LENGTH && context_declined(r, msg)) {
        r->attempts_left++; /* not a failure: charged to no budget, counted as no migration */
        r->declined++;
        r->fail_code = code;
        snprintf(r->fail_msg, sizeof r->fail_msg, "%s", msg);
        fe_migrate_dispatch(r);
        return;
    }
    if (!bt_status_migratable(code) && !(code == BT_ERR_CONTEXT_LENGTH && context_refused(r, msg))) {
        fe_request_fail(r, code, msg);
        return;
    }
    if (bt_status_upstream_busy(code) && busy_refused(r, code, msg)) return;
    r->fail_code = code;
    snprintf(r->fail_msg, sizeof r->fail_msg, "%s", msg);
    if (code == BT_ERR_DRAINING && r->state != FE_REQ_STREAMING) {
        /* refused before it ran: the REQUEST crossed the worker's GOAWAY (docs/protocol.md §10).
         * Not a migration and not charged to the budget, so it holds with migration off too; the
         * worker is marked draining, so the retry goes elsewhere and cannot repeat there. */
        r->attempts_left++;
        r->declined++;
        BT_INFO("request %s refused by draining worker %" PRIx64 " before it started; routing it elsewhere", r->rid,
                r->failed_worker);
        fe_migrate_dispatch(r);
        return;
    }
    if (code == BT_ERR_MOVED && r->moves < FE_MOVES_FREE) {
        /* moved by its operator (POST /rebalance), not failed: neither --migration-limit nor the
         * retry budget is charged, so a request with migration off survives a rebalance, and one
         * rebalanced before a real failure still has its whole budget for it (FE_MOVES_FREE times).
         * Nor is it counted as a migration, which counts failures (docs/fault-tolerance.md): the
         * worker counts its moves (baton_worker_rebalanced_total) */
        r->attempts_left++;
        r->moves++;
        if (r->state != FE_REQ_MIGRATING) r->t_fail_us = bt_now_us();
        fe_req_set_state(r, FE_REQ_MIGRATING, msg);
        if (fe_admit_migration_hold(r)) return;
        fe_migrate_dispatch(r);
        return;
    }
    /* counted whether or not budget is left, as Dynamo does: the counters show how many
     * requests a failure touched; the exhausted counter shows how many of them it cost */
    if (r->nids > 0) r->model->st.migrations_ongoing++;
    else r->model->st.migrations_new++;
    /* performed once a continuation is sent; a request that ends before (no worker left, the
     * retry budget) counts in migrations_unserved at its end, so that total − exhausted − unserved
     * is the migrations performed */
    r->mig_pending = true;
    r->mig_stall = true;
    if (code == BT_ERR_MOVED) /* past FE_MOVES_FREE: at most once per charged attempt */
        BT_WARN("request %s: moved %d times by its workers already; this move is charged to its migration budget",
                r->rid, r->moves);
    if (r->attempts_left <= 0) {
        r->mig_pending = false; /* no budget: counted as exhausted (or migration is off), not unserved */
        if (r->fe->o.migration_limit > 0) r->model->st.migrations_exhausted++;
        char m[256];
        if (r->fe->o.migration_limit > 0)
            snprintf(m, sizeof m, "%s (migration limit of %lld exhausted)", msg, (long long)r->fe->o.migration_limit);
        else snprintf(m, sizeof m, "%s (migration is disabled)", msg);
        fe_request_fail(r, code, m);
        return;
    }
    char why[200];
    if (!fe_budget_allow(r, why, sizeof why)) { /* a retry storm is not let through (budget.h) */
        char m[400];
        snprintf(m, sizeof m, "%s (%s)", msg, why);
        fe_request_fail(r, code, m);
        return;
    }
    if (r->state != FE_REQ_MIGRATING) r->t_fail_us = bt_now_us(); /* kept across back-to-back failures */
    fe_req_set_state(r, FE_REQ_MIGRATING, msg);
    check_writer(r);
    if (fe_admit_migration_hold(r)) return; /* past --migration-concurrency: it waits (admit.h) */
    fe_migrate_dispatch(r);
}

/* Whether a worker of r's model other than w could take r's continuation: one routable and not
 * ejected, with the exactness fingerprint of the tokens delivered and a context that holds them
 * (busy ones count: a continuation goes to a busy worker rather than fail). */
static bool others_can_continue(const fe_req *r, const fe_worker *w) {
    const char *exact = r->nids && r->exactness[0] ? r->exactness : NULL;
    uint64_t need = fe_request_context_need(r);
    const fe_model *m = r->model;
    for (size_t i = 0; i < m->nws; i++) {
        fe_worker *o = m->ws[i];
        if (o == w || !fe_worker_routable(o) || fe_outlier_ejected(r->fe, o)) continue;
        if (fe_worker_context_short(o, need)) continue;
        if (!exact || strcmp(o->exactness, exact) == 0) return true;
    }
    return false;
}

/* The frontend ends attempt a on a worker that is alive but broke its stream (a frame across
 * max_tokens, --stream-token-timeout): the worker gets a KILL for the stream (its engine frees the
 * sequence; a frame that still comes for it is for a stream this frontend no longer knows, and
 * ignored) and is quarantined until a fresh handshake, as after a migratable ERROR, and the request
 * migrates as after that worker's failure: charged to its budget, `code` and `msg` in its log.
 * keep: no other worker could take the continuation (others_can_continue, decided by the caller),
 * so the worker is not quarantined and the continuation goes back to it (routing hands back the
 * worker that failed last when it is the only one left), still charged: quarantined, the model's
 * only worker would fail the request at once with budget left, and every new request with it until
 * its probe. */
static void attempt_give_up(fe_attempt *a, const char *quarantine_why, bt_status code, const char *msg, bool keep) {
    fe_req *r = a->req;
    fe_worker *w = a->worker;
    fe_worker_send_cancel(w, a->stream_id, true);
    if (w->conn) bt_rpc_flush(w->conn);
    if (keep)
        BT_INFO("request %s: no other worker can take its continuation: worker %" PRIx64
                " (%s) is not quarantined, and the continuation may go back to it (%s)",
                r->rid, w->id, w->transport, quarantine_why);
    else fe_worker_quarantine(w, quarantine_why);
    r->failed_worker = w->id;
    attempt_detach(a);
    if (r->state == FE_REQ_DONE) return;
    attempt_failed(r, code, msg);
}

/* A TOKENS frame whose ids cross max_tokens (some of them within it, the rest past it): its one
 * text belongs to all its ids and cannot be cut at the limit, so none of it can be written. baton's
 * engines send one id per frame and stop at max_tokens themselves; such a frame comes only from a
 * broken or hostile worker, which has broken the protocol for this stream. The frame is dropped
 * whole and the attempt fails as after a migratable ERROR from the worker: its stream is killed,
 * the worker quarantined until a fresh handshake, and the request migrates with the ids delivered
 * before the frame (the next worker produces exactly the rest), charged to its budget. */
static void attempt_overran(fe_attempt *a, size_t n) {
    fe_req *r = a->req;
    BT_WARN("request %s: worker %" PRIx64 " sent one frame of %zu tokens across max_tokens %" PRId64
            " (%zu delivered before it); dropping the frame and failing the attempt",
            r->rid, a->worker->id, n, r->max_tokens, r->nids);
    attempt_give_up(a, "a frame of tokens across a request's max_tokens", BT_ERR_PROTOCOL,
                    "the worker sent a frame of tokens across max_tokens", false);
}

void fe_attempt_on_tokens(fe_attempt *a, const uint32_t *ids, size_t n, const char *text, size_t len) {
    fe_req *r = a->req;
    if (r->state == FE_REQ_DONE || !r->http || n == 0) return;
    uint64_t t = bt_now_us(); /* the worker's latency signals, for outlier ejection */
    if (a->tokens == 0) {
        fe_outlier_first_token(r->fe, a->worker, (double)(t - a->t_sent_us) / 1e6);
        fe_attempt_preempt_done(a); /* it was admitted: its worker's next LOAD shows what it took */
    } else {
        fe_outlier_tokens(r->fe, a->worker, (double)(t - a->t_last_us) / 1e6, n);
    }
    a->t_last_us = t;
    a->tokens += (uint32_t)n;
    if (r->state == FE_REQ_MIGRATING) {
        /* the stall the client saw: from the last token before the failure (or the request's
         * start, if none had come) to this one; it includes the detection time. A stall that no
         * counted failure caused (a rebalance's move) is not a migration's. */
        uint64_t now = bt_now_us();
        if (r->mig_stall)
            fe_hist_observe(&r->model->st.migration_stall,
                            (double)(now - (r->nids ? r->t_last_us : r->t_start_us)) / 1e6);
        r->mig_stall = false;
        BT_DEBUG("request %s: first token after the migration at t=%" PRIu64 " us", r->rid, now);
        r->t_fail_us = 0;
        fe_admit_migration_done(r); /* its --migration-concurrency slot frees */
    }
    if (r->state != FE_REQ_STREAMING) {
        char why[64] = ""; /* only logged, at debug level (above) */
        if (bt_log_enabled(BT_LOG_DEBUG)) snprintf(why, sizeof why, "first token from worker %" PRIx64, a->worker->id);
        fe_req_set_state(r, FE_REQ_STREAMING, why);
    }
    if (r->max_tokens >= 0 && r->nids < (size_t)r->max_tokens && r->nids + n > (size_t)r->max_tokens) {
        attempt_overran(a, n); /* checked after the state changes above, as an ERROR after tokens is */
        return;
    }
    fe_request_deliver(r, ids, n, text, len, t); /* may end the request (and free a) */
}

void fe_kv_free(fe_kv *k) {
    if (k->data) atomic_fetch_sub(&kv_held, k->total);
    free(k->data);
    memset(k, 0, sizeof *k);
}

void fe_attempt_on_kvstate(fe_attempt *a, uint64_t total, uint64_t offset, const uint8_t *data, size_t len) {
    fe_kv *k = &a->req->kv;
    if (offset == 0) { /* a new state: any older one is stale */
        fe_kv_free(k);
        k->total = total;
        bool counted = total && total <= BT_KV_RELAY_MAX;
        k->bad = !counted || atomic_fetch_add(&kv_held, total) + total > FE_KV_TOTAL_MAX;
        if (!k->bad && !(k->data = malloc(total))) k->bad = true;
        if (k->bad && total) {
            if (counted) atomic_fetch_sub(&kv_held, total);
            /* once per request: a worker that sends state after state (20,000 in one read) must not
             * make a log line of each */
            if (!a->req->kv_refused_logged)
                BT_INFO("request %s: KV state of %" PRIu64 " bytes not relayed (cap %" PRIu64 " per state, %" PRIu64
                        " for all)", a->req->rid, total, BT_KV_RELAY_MAX, FE_KV_TOTAL_MAX);
            a->req->kv_refused_logged = true;
        }
    }
    if (k->bad || !k->data) return;
    if (total != k->total || offset != k->have) { /* out of order: useless */
        fe_kv_free(k);
        k->bad = true;
        return;
    }
    memcpy(k->data + k->have, data, len);
    k->have += len;
}

void fe_attempt_on_finish(fe_attempt *a, uint8_t reason, uint32_t prompt_tokens, uint32_t completion_tokens,
                          bool usage_unreported) {
    fe_req *r = a->req;
    attempt_detach(a);
    if (r->state == FE_REQ_DONE) return;
    if (reason == BT_FINISH_LENGTH && r->catch_up && r->skip_to && r->nids == r->skip_to &&
        !(r->max_tokens >= 0 && r->nids >= (size_t)r->max_tokens)) {
        /* a catch-up (continuation_payload) reached the client's position: the rest follows from
         * there, in a continuation whose first event begins where the client's last one ended */
        BT_INFO("request %s: stream %s caught up with its client at position %zu; continuing it from there", r->rid,
                r->stream_id, r->nids);
        r->skip_to = 0;
        r->catch_up = false;
        fe_migrate_dispatch(r);
        return;
    }
    fe_request_finish(r, reason, prompt_tokens, completion_tokens, usage_unreported);
}

void fe_attempt_on_error(fe_attempt *a, bt_status code, const char *msg) {
    fe_req *r = a->req;
    r->failed_worker = a->worker->id;
    attempt_detach(a);
    if (r->state == FE_REQ_DONE) return;
    attempt_failed(r, code, msg);
}

/* ---- --stream-token-timeout ---- */

/* Expiries handled per sweep: each one starts the scan again (it may end or start requests other
 * than its own), so a sweep's work stays bounded; the rest wait for the next sweep. */
#define TOKEN_SWEEP_MAX_EXPIRED 64

/* The sweep's period for a timeout: a quarter of it (an attempt is given up between timeout and
 * timeout + period after its last frame), within [10 ms, 1 s]. */
static uint32_t token_sweep_period_ms(const fe *f) {
    double p = f->o.token_timeout * 1000.0 / 4.0;
    return p < 10.0 ? 10u : p > 1000.0 ? 1000u : (uint32_t)p;
}

/* Attempt a heard nothing of its stream for silent_ms: given up (attempt_give_up: KILL,
 * quarantine, migration charged to its budget and the retry budget, the same migration counters,
 * the same error once the budget is spent), and the silence counts as one latency sample of at
 * least silent_ms for outlier ejection, which would otherwise never see a worker that sends
 * nothing; except when the worker is kept for the continuation: routing skips an ejected worker,
 * so that sample could eject the one worker the continuation may go to and fail the request with
 * budget left (the budget still ends a worker that loses every stream). */
static void attempt_timed_out(fe_attempt *a, uint32_t silent_ms) {
    fe_req *r = a->req;
    fe *f = r->fe;
    fe_worker *w = a->worker;
    double silent_s = (double)silent_ms / 1e3;
    BT_WARN("request %s: no frame from worker %" PRIx64 " on stream %u for %.3f s (--stream-token-timeout %g s; %u "
            "tokens on this attempt, %zu delivered); dropping the stream",
            r->rid, w->id, a->stream_id, silent_s, f->o.token_timeout, a->tokens, r->nids);
    r->model->st.token_timeouts++;
    /* a worker that answers pings and lost a stream may still serve the continuation: when nothing
     * else can, it goes back there (charged, so a worker that loses every stream ends the request) */
    bool keep = !others_can_continue(r, w);
    if (!keep) { /* kept: no sample (above) */
        if (a->tokens == 0) fe_outlier_first_token(f, w, silent_s);
        else fe_outlier_tokens(f, w, silent_s, 1);
    }
    char msg[128];
    snprintf(msg, sizeof msg, "no token from the worker for %g s (--stream-token-timeout)", f->o.token_timeout);
    attempt_give_up(a, "a stream timed out (--stream-token-timeout)", BT_ERR_TIMEOUT, msg, keep);
}

/* Each period: every running attempt of the loop whose stream has been silent for the timeout is
 * given up. The loop's clock counts only time this process ran, as the request plane's heartbeat
 * does (rpc/conn.c): a sweep that comes more than two periods after the last one means the process
 * did not run in between (SIGSTOP, a blocked loop) and could read nothing, so the time past two
 * periods is not the workers' silence and every attempt's last-heard time moves forward by it. */
static void on_token_sweep(uv_timer_t *t) {
    fe *f = t->data;
    uint32_t now = (uint32_t)uv_now(f->loop);
    uint32_t period = token_sweep_period_ms(f);
    uint32_t gap = now - f->token_sweep_ms;
    uint32_t skip = gap > 2 * period ? gap - 2 * period : 0;
    uint32_t limit = (uint32_t)(f->o.token_timeout * 1000.0);
    if (limit == 0) limit = 1; /* under a millisecond: the clock's resolution */
    f->token_sweep_ms = now;
    if (skip) {
        BT_DEBUG("this loop did not run for %u ms; not counted as the silence of its streams", skip);
        for (fe_req *r = LIST_FIRST(&f->reqs); r; r = LIST_NEXT(r, link)) {
            fe_attempt *a = r->attempt;
            if (a) a->t_heard_ms = now - a->t_heard_ms > skip ? a->t_heard_ms + skip : now;
        }
        for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) { /* the same for their progress */
            w->tokens_ms = now - w->tokens_ms > skip ? w->tokens_ms + skip : now;
            w->idle_ms = now - w->idle_ms > skip ? w->idle_ms + skip : now;
            if (w->running_ms) w->running_ms = now - w->running_ms > skip ? w->running_ms + skip : now;
        }
    }
    int expired = 0;
again:
    for (fe_req *r = LIST_FIRST(&f->reqs); r; r = LIST_NEXT(r, link)) {
        fe_attempt *a = r->attempt;
        /* an attempt whose KV state waits its turn to be relayed (held_req) has sent the worker
         * nothing it could answer yet: the wait is this frontend's pacing, not the worker's
         * silence (relay_step starts its clock when the REQUEST is written) */
        if (!a || a->held_req || now - a->t_heard_ms < limit) continue;
        /* its worker's engine keeps it waiting (queued, or preempted by a more urgent sequence and
         * waiting to be recomputed: a WAITING frame for it, no TOKENS since): its engine's scheduling,
         * not a lost stream, for as long as the engine visibly runs others (a victim waits as long as
         * the urgent sequence runs): while the worker has sent TOKENS, for any stream, within the
         * bound. Two things end the exemption: a LOAD after the WAITING that shows nothing waiting
         * there (the wait is over: the stream, lost or readmitted, is judged from that LOAD, as a
         * fresh prefill would be), and a worker that sends no tokens at all for the bound (a hung
         * engine: it runs nothing, so its waiting streams wait for nothing). Its next TOKENS starts
         * its clock again. */
        if (a->waiting) {
            fe_worker *w = a->worker;
            if ((int32_t)(w->idle_load - a->wait_load) > 0) { /* serial numbers: wrap-safe */
                a->waiting = false;
                a->t_heard_ms = w->idle_ms;
                if (now - a->t_heard_ms < limit) continue;
            } else if (fe_worker_progressed(w, now, limit)) {
                continue;
            }
        }
        /* A worker that does not tell its streams' waits (no BT_HELLO_WAITING: an older build, or an
         * engine that cannot see them) may be keeping this one waiting whenever its last load report
         * shows sequences waiting: its silence then counts only from when nothing waits there. A
         * worker that always has something waiting hides a lost stream from this rule; one that
         * tells its waits has every other silent stream judged. */
        if (!a->worker->tells_waits && a->worker->load_ms && a->worker->load.waiting) {
            a->t_heard_ms = now;
            continue;
        }
        attempt_timed_out(a, now - a->t_heard_ms); /* may end r, or others: the scan starts again */
        if (++expired < TOKEN_SWEEP_MAX_EXPIRED) goto again;
        return;
    }
}

void fe_token_sweep_start(fe *f) {
    if (!(f->o.token_timeout > 0)) return;
    uint32_t period = token_sweep_period_ms(f);
    f->token_sweep.data = f;
    f->token_sweep_ms = (uint32_t)uv_now(f->loop);
    uv_timer_start(&f->token_sweep, on_token_sweep, period, period);
    uv_unref((uv_handle_t *)&f->token_sweep); /* never what keeps the loop running */
}
