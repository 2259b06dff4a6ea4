/* worker.c — `baton worker`: hosts one engine behind the request plane.
 *
 * Lifecycle (one traced state variable, see wk_set_state): registering → ready → draining → gone.
 * Each accepted frontend connection is a peer with its own stream table; a stream is one engine
 * sequence. The worker never keeps generating for nobody: when a peer's connection ends, every
 * sequence of that peer is killed and its KV blocks are freed — except streamed requests that
 * named a stream_key, which are kept for --orphan-grace seconds so that another frontend can
 * re-attach to them (orphan.c), and give way to any request that would otherwise wait.
 *
 * This file holds the process (options, start-up), the peers, the streams and the load reports.
 * The shutdown sequence is in drain.c, the status server in status.c, canaries and the engine
 * monitor in canary.c (see worker_internal.h and docs/operations.md). A worker is ready for new
 * work (BT_LOAD_READY in its load reports, 200 on /health) while it serves, is not draining and
 * its endpoint is healthy by the canary. */
#include "worker/worker.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/jstr.h"
#include "common/log.h"
#include "common/opts.h"
#include "common/proc.h"
#include "common/util.h"
#include "engine/llama/llama_lib.h"
#include "proto/proto.h"
#include "proto/request.h"
#include "worker/worker_internal.h"

static const char *state_names[] = {"registering", "ready", "draining", "gone"};

const char *wk_state_name(wk_state s) { return state_names[s]; }

void wk_set_state(wk_worker *w, wk_state s) {
    if (w->state == s) return;
    BT_INFO("worker %" PRIx64 ": %s -> %s", w->instance_id, state_names[w->state], state_names[s]);
    w->state = s;
    if (wk_ready(w)) w->was_ready = true; /* ends the starting health status (status.c) */
}

bool wk_ready(const wk_worker *w) {
    return w->state == WK_READY && !w->engine_failed && !w->engine_unserving &&
           (!w->o.canary_enabled || w->canary.ready);
}

/* ---- load reports ------------------------------------------------------------------------ */

static void fill_load(wk_worker *w, bt_load_report *r) {
    bt_engine_load l;
    bt_engine_get_load(w->engine, &l);
    r->active_decode_blocks = l.active_decode_blocks;
    r->total_blocks = l.total_blocks;
    r->active_prefill_tokens = l.active_prefill_tokens;
    r->waiting = l.waiting;
    r->running = l.running;
    r->max_num_batched_tokens = l.max_num_batched_tokens;
    r->flags = wk_ready(w) ? BT_LOAD_READY : 0;
    bt_load_set_preempt(r, l.victims, l.victim_priority); /* what an urgent request would find */
}

void wk_send_load(wk_worker *w, wk_peer *only) {
    bt_load_report r;
    if (!w->engine) return;
    fill_load(w, &r);
    if (!only) w->load_sent_ms = bt_now_ms();
    for (wk_peer *p = LIST_FIRST(&w->peers); p; p = LIST_NEXT(p, link)) {
        if (only && p != only) continue;
        bt_buf *b = bt_rpc_wbuf(p->conn);
        if (b) bt_frame_put_load(b, &r);
    }
    if (!only) bt_events_publish_load(w->events, w->instance_id, &r); /* debounced */
}

static void on_engine_load(void *ud) { wk_send_load(ud, NULL); }

/* The engine cannot serve for now (its upstream refuses it), or can again: readiness follows, and
 * the frontends hear of it now rather than at the next periodic report. */
static void on_engine_serving(void *ud, bool serving, const char *why) {
    wk_worker *w = ud;
    if (w->engine_unserving == !serving) return;
    w->engine_unserving = !serving;
    if (wk_ready(w)) w->was_ready = true; /* ends the starting health status (status.c) */
    if (serving) BT_INFO("endpoint %s: the engine serves again", w->o.ep);
    else BT_WARN("endpoint %s: notready, the engine cannot serve (%s); frontends route nothing new here", w->o.ep, why);
    wk_send_load(w, NULL);
}

#define LOAD_REFRESH_MS 1000u /* frontends treat reports older than 3 s as stale */

static void on_load_timer(uv_timer_t *t) {
    wk_worker *w = t->data;
    if (bt_now_ms() - w->load_sent_ms >= LOAD_REFRESH_MS) wk_send_load(w, NULL);
}

/* ---- streams ----------------------------------------------------------------------------- */

static void on_stream_cancel(bt_ctx *c, bt_ctx_state state, void *ud);

void wk_stream_free(wk_stream *s) {
    wk_worker *w = s->w;
    if (s->orphaned) {
        TAILQ_REMOVE(&w->orphans, s, olink);
        w->norphans--;
    } else {
        bt_map_del(&s->p->streams, s->id);
        w->nstreams--;
    }
    bt_ctx_free(s->ctx); /* may be the context whose callback is running: cancel.h allows it */
    wk_history_free(&s->hist);
    free(s);
    if (w->state == WK_DRAINING) wk_drain_stream_ended(w);
}

static void on_seq_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t text_len) {
    wk_stream *s = ud;
    wk_worker *w = s->w;
    s->tokens += (uint32_t)n;
    s->waiting = 0; /* its frontend ends the wait at this TOKENS frame too */
    w->tokens_total += n;
    wk_monitor_progress(w);
    if (s->key[0] && !wk_history_add(s, ids, n, text, text_len)) {
        BT_INFO("request %s: its history outgrew %u bytes; the stream can no longer be re-attached", s->rid,
                WK_ORPHAN_HISTORY_MAX);
        if (s->orphaned) wk_orphan_end_soon(w, s); /* nobody can take it any more */
    }
    if (s->orphaned) return;
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    if (!b || s->ignored_kill) return;
    /* a batch longer than one frame allows is split; text goes with the last piece */
    while (n > BT_TOKENS_MAX) {
        bt_frame_put_tokens(b, s->id, ids, BT_TOKENS_MAX, "", 0);
        ids += BT_TOKENS_MAX;
        n -= BT_TOKENS_MAX;
    }
    bt_frame_put_tokens(b, s->id, ids, n, text, text_len);
}

/* The FINISH reason for a frontend: an upstream's own reason (content_filter, tool_calls,
 * function_call) goes to a frontend that did not announce BT_HELLO_FINISH_REASONS (an older build,
 * which would take it for a protocol error) as stop, as that build always had it. */
uint8_t wk_wire_finish(bt_rpc_conn *c, bt_finish_reason reason) {
    bool knows = bt_rpc_peer_flags(c) & BT_HELLO_FINISH_REASONS;
    return reason > BT_FINISH_CANCELLED && !knows ? (uint8_t)BT_FINISH_STOP : (uint8_t)reason;
}

/* FINISH's flags for the frontend of c: none to an older build, whose codec wants the byte 0. */
uint8_t wk_wire_finish_flags(bt_rpc_conn *c, bool usage_unreported) {
    bool knows = bt_rpc_peer_flags(c) & BT_HELLO_FINISH_REASONS;
    return knows && usage_unreported ? (uint8_t)BT_FINISH_F_USAGE_UNREPORTED : 0;
}

static void on_seq_finish(void *ud, bt_finish_reason reason, const bt_usage *u) {
    wk_stream *s = ud;
    wk_worker *w = s->w;
    if (s->orphaned) {
        wk_monitor_progress(w);
        wk_orphan_finished(s, (uint8_t)reason, u);
        return;
    }
    bt_buf *b = s->ignored_kill ? NULL : bt_rpc_wbuf(s->p->conn);
    if (b)
        bt_frame_put_finish_flags(b, s->id, wk_wire_finish(s->p->conn, reason),
                                  wk_wire_finish_flags(s->p->conn, u->unreported), u->prompt_tokens,
                                  u->completion_tokens);
    w->requests_ok++;
    wk_monitor_progress(w);
    if (reason != BT_FINISH_CANCELLED) wk_canary_activity(w);
    BT_DEBUG("request %s finished (%s) after %u new tokens in %.1f ms", s->rid, bt_finish_reason_name(reason),
             s->tokens, (double)(bt_now_us() - s->t0_us) / 1000.0);
    wk_stream_free(s);
}

/* The code of an ERROR to a frontend: an upstream's busy refusal goes to a frontend that did not
 * announce BT_HELLO_UPSTREAM_BUSY (an older build, which would take the unknown code for a
 * failure not worth another worker) as BT_ERR_CANNOT_CONNECT, which it retries elsewhere. */
static uint16_t wire_code(bt_rpc_conn *c, bt_status code) {
    bool knows = bt_rpc_peer_flags(c) & BT_HELLO_UPSTREAM_BUSY;
    return bt_status_upstream_busy(code) && !knows ? BT_ERR_CANNOT_CONNECT : (uint16_t)code;
}

static void on_seq_error(void *ud, bt_status code, const char *msg) {
    wk_stream *s = ud;
    wk_worker *w = s->w;
    if (s->orphaned) w->orphan_events[WK_ORPHAN_EV_FAILED]++;
    bt_buf *b = s->ignored_kill || s->orphaned ? NULL : bt_rpc_wbuf(s->p->conn);
    if (b) bt_frame_put_error(b, s->id, wire_code(s->p->conn, code), msg);
    w->requests_error++;
    wk_monitor_progress(w);
    /* a prompt over the context (or ids outside the vocabulary) is the client's 400, which the
     * frontend cannot count for a text prompt: not worth a warning per request (docs/security.md,
     * bad input) */
    bt_log(bt_status_client_input(code) ? BT_LOG_DEBUG : BT_LOG_WARN, "request %s failed after %u tokens: %s", s->rid,
           s->tokens, msg);
    wk_stream_free(s);
}

void wk_send_waiting(wk_stream *s, uint8_t reason) {
    if (s->orphaned || s->ignored_kill || !(bt_rpc_peer_flags(s->p->conn) & BT_HELLO_WAITING)) return;
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    if (b) bt_frame_put_waiting(b, s->id, reason);
}

/* The engine holds the sequence without computing it (queued, or preempted to be recomputed): its
 * frontend does not take the stream's silence for a lost stream (--stream-token-timeout). */
static void on_seq_wait(void *ud, bt_engine_wait why) {
    wk_stream *s = ud;
    uint8_t reason = why == BT_ENGINE_WAIT_PREEMPTED ? BT_WAIT_PREEMPTED : BT_WAIT_QUEUED;
    s->waiting = (uint8_t)(1 + reason);
    wk_send_waiting(s, reason);
}

static const bt_engine_sink seq_sink = {on_seq_tokens, on_seq_finish, on_seq_error, on_seq_wait};

wk_stream *wk_find_stream(wk_worker *w, bool (*match)(const wk_stream *s, const void *ud), const void *ud,
                          wk_peer **peer) {
    for (wk_peer *p = LIST_FIRST(&w->peers); p; p = LIST_NEXT(p, link)) {
        uint64_t k;
        void *v;
        size_t it = 0;
        while (bt_map_next(&p->streams, &it, &k, &v))
            if (!match || match(v, ud)) {
                *peer = p;
                return v;
            }
    }
    return NULL;
}

void wk_send_stream_error(wk_peer *p, uint32_t id, bt_status code, const char *msg) {
    bt_buf *b = bt_rpc_wbuf(p->conn);
    if (b) bt_frame_put_error(b, id, wire_code(p->conn, code), msg);
}

/* Reads the sampling fields of an OpenAI body into the engine request. */
static bt_status sampling_from_body(const json_t *body, bt_engine_request *er, char *err, size_t errlen) {
    json_t *t = json_object_get(body, "temperature");
    er->temperature = json_is_number(t) ? json_number_value(t) : 1.0;
    json_t *seed = json_object_get(body, "seed");
    er->seed = json_is_integer(seed) ? (uint64_t)json_integer_value(seed) : 0;
    json_t *stop = json_object_get(body, "stop");
    er->n_stop = 0;
    if (json_is_string(stop)) {
        er->stop[er->n_stop++] = json_string_value(stop);
    } else if (json_is_array(stop)) {
        size_t i;
        json_t *v;
        json_array_foreach(stop, i, v) {
            if (!json_is_string(v) || er->n_stop >= BT_MAX_STOP) {
                snprintf(err, errlen, "stop must be a string or up to %d strings", BT_MAX_STOP);
                return BT_ERR_INVALID;
            }
            er->stop[er->n_stop++] = json_string_value(v);
        }
    }
    /* the frontend refuses these too; a worker does not rely on it (docs/security.md) */
    for (int i = 0; i < er->n_stop; i++) {
        json_t *v = json_is_string(stop) ? stop : json_array_get(stop, (size_t)i);
        if (json_string_length(v) > BT_MAX_STOP_LEN || bt_jstr_has_nul(v)) {
            snprintf(err, errlen, "a stop string must be at most %d bytes and hold no U+0000", BT_MAX_STOP_LEN);
            return BT_ERR_INVALID;
        }
    }
    return BT_OK;
}

/* The chat fields the engines read as C strings, a message's role and a content part's type: one
 * that holds U+0000 (the payload is parsed with JSON_ALLOW_NUL) would be read as its prefix,
 * "user\u0000x" as the role "user", a speaker the client did not send. The frontend refuses them
 * (fe_check_body); a worker does not rely on it (a client may speak the request plane directly). */
static bt_status chat_strings_check(const json_t *body, char *err, size_t errlen) {
    size_t i, j;
    json_t *m, *part;
    json_array_foreach(json_object_get(body, "messages"), i, m) {
        json_t *role = json_object_get(m, "role");
        if (bt_jstr_has_nul(role)) {
            snprintf(err, errlen, "messages[%zu].role must not contain U+0000", i);
            return BT_ERR_INVALID;
        }
        json_array_foreach(json_object_get(m, "content"), j, part) {
            json_t *type = json_object_get(part, "type");
            if (bt_jstr_has_nul(type)) {
                snprintf(err, errlen, "messages[%zu].content[%zu].type must not contain U+0000", i, j);
                return BT_ERR_INVALID;
            }
        }
    }
    return BT_OK;
}

/* Files adopted orphan s under peer p's stream id: a fresh cancellation context under the peer's.
 * False (out of memory): s is ended. */
static bool attach_adopted(wk_peer *p, uint32_t id, wk_stream *s, const char *rid) {
    wk_worker *w = p->w;
    bt_ctx_free(s->ctx);
    s->ctx = NULL;
    snprintf(s->rid, sizeof s->rid, "%s", rid);
    s->ctx = bt_ctx_new(s->rid, on_stream_cancel, s);
    if (!s->ctx || bt_map_put(&p->streams, id, s) != 0) {
        if (!s->done) bt_engine_kill(w->engine, s->seq);
        bt_ctx_free(s->ctx);
        wk_history_free(&s->hist);
        free(s);
        return false;
    }
    s->p = p;
    s->id = id;
    w->nstreams++;
    bt_ctx_link(p->ctx, s->ctx);
    return true;
}

static void handle_request(wk_peer *p, uint32_t id, const bt_frame *f) {
    wk_worker *w = p->w;
    char err[768] = ""; /* room for two exactness fingerprints */
    uint32_t *carried = NULL;
    uint8_t *kv = NULL; /* a KV state that came with the REQUEST (handoff.c) */
    size_t er_kv_len = 0;
    bt_request_msg msg = {0};
    wk_stream *s = NULL;
    bt_status st;

    w->requests_total++;
    if (bt_map_get(&p->streams, id)) {
        wk_send_stream_error(p, id, BT_ERR_PROTOCOL, "stream id already in use");
        return;
    }
    if (w->state != WK_READY) {
        /* it crossed the GOAWAY in flight; the frontend retries it elsewhere */
        wk_drain_note_refused(w);
        wk_send_stream_error(p, id, BT_ERR_DRAINING, "worker is draining");
        return;
    }
    st = bt_request_decode(f->payload, f->len, &msg, err, sizeof err);
    if (st != BT_OK) goto fail;
    if (msg.rq.kv_state_bytes) {
        kv = wk_handoff_take(p, id, msg.rq.kv_state_bytes);
        er_kv_len = kv ? (size_t)msg.rq.kv_state_bytes : 0;
    }
    json_t *body = (json_t *)msg.rq.body;
    bt_engine_request er = {0};
    er.kv_state = kv;
    er.kv_state_len = er_kv_len;
    er.request_id = msg.rq.request_id;
    er.api = msg.rq.api;
    er.body = body;
    er.priority = msg.rq.priority;
    /* A client (an openai-engine worker in front of this frontend, continuing a stream) may name
     * tokens already generated in the body: they come before those of this frontend's attempts. */
    json_t *jbcar = json_object_get(body, "carried_token_ids");
    if (jbcar && !json_is_array(jbcar)) {
        st = BT_ERR_INVALID;
        snprintf(err, sizeof err, "carried_token_ids must be an array of token ids");
        goto fail;
    }
    size_t nbcar = jbcar ? json_array_size(jbcar) : 0;
    size_t ncar = nbcar + msg.rq.n_carried;
    if (ncar) {
        carried = malloc(ncar * sizeof *carried);
        if (!carried) {
            st = BT_ERR_NOMEM;
            snprintf(err, sizeof err, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < nbcar; i++) {
            json_t *v = json_array_get(jbcar, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX) {
                st = BT_ERR_INVALID;
                snprintf(err, sizeof err, "carried token %zu is not a token id", i);
                goto fail;
            }
            carried[i] = (uint32_t)json_integer_value(v);
        }
        if (msg.rq.n_carried) memcpy(carried + nbcar, msg.rq.carried, msg.rq.n_carried * sizeof *carried);
    }
    if (msg.rq.adopt) {
        uint32_t from = 0;
        wk_stream *o = wk_orphan_take(w, msg.rq.stream_key, msg.rq.request_id, carried, ncar, &from);
        if (o && attach_adopted(p, id, o, msg.rq.request_id)) {
            wk_orphan_replay(o, from); /* may free o */
            free(kv);
            free(carried);
            bt_request_msg_free(&msg);
            return;
        }
    }
    /* Defence in depth behind the frontend's routing: tokens computed with other numerics are not
     * continued here, where the next ones would come out of other logits (not migratable: every
     * worker it might try next is one the frontend did not mean either) */
    if (msg.rq.n_carried && msg.rq.exactness && strcmp(msg.rq.exactness, w->exactness) != 0) {
        st = BT_ERR_NO_WORKER;
        snprintf(err, sizeof err,
                 "no worker can continue this stream exactly after %zu tokens: refusing to continue tokens computed "
                 "with exactness fingerprint \"%s\" on this worker (\"%s\")",
                 msg.rq.n_carried, msg.rq.exactness, w->exactness);
        goto fail;
    }
    er.carried = carried;
    er.n_carried = (uint32_t)ncar;
    if (msg.rq.carried_text && !jbcar) { /* body-carried ids come with no text of theirs */
        er.carried_text = msg.rq.carried_text;
        er.carried_text_len = msg.rq.carried_text_len;
    }
    /* No max_tokens from the frontend (its client set none): this worker's default is the
     * request's whole budget, so the tokens already carried count against it. */
    int64_t max_tokens =
        msg.rq.has_max_tokens ? msg.rq.max_tokens : w->o.mocker.default_max_tokens - (int64_t)ncar;
    if (max_tokens < 0) max_tokens = 0;
    er.max_tokens = max_tokens > UINT32_MAX ? UINT32_MAX : (uint32_t)max_tokens;
    st = sampling_from_body(body, &er, err, sizeof err);
    if (st == BT_OK && er.api == BT_API_CHAT) st = chat_strings_check(body, err, sizeof err);
    if (st != BT_OK) goto fail;
    er.attempt_seed = msg.rq.seed; /* chosen by the frontend when the body has none (0: none) */

    s = calloc(1, sizeof *s);
    if (!s) {
        st = BT_ERR_NOMEM;
        snprintf(err, sizeof err, "out of memory");
        goto fail;
    }
    s->w = w;
    s->p = p;
    s->id = id;
    s->carried = (uint32_t)ncar;
    /* only a stream can be resumed, so only a stream may outlive its connection */
    if (msg.rq.stream_key && w->o.orphan_grace > 0 && json_is_true(json_object_get(body, "stream")))
        snprintf(s->key, sizeof s->key, "%s", msg.rq.stream_key);
    s->t0_us = bt_now_us();
    snprintf(s->rid, sizeof s->rid, "%s", er.request_id);
    s->ctx = bt_ctx_new(s->rid, on_stream_cancel, s);
    if (!s->ctx) {
        st = BT_ERR_NOMEM;
        snprintf(err, sizeof err, "out of memory");
        goto fail;
    }
    bt_ctx_link(p->ctx, s->ctx); /* the peer's context is live while frames arrive */
    wk_monitor_busy(w);
    wk_orphan_make_room(w); /* an orphan never makes a live request wait */
    st = bt_engine_submit(w->engine, &er, &seq_sink, s, &s->seq, err, sizeof err);
    if (st != BT_OK) goto fail;
    w->engine_submits++;
    if (bt_map_put(&p->streams, id, s) != 0) {
        bt_engine_kill(w->engine, s->seq);
        st = BT_ERR_NOMEM;
        snprintf(err, sizeof err, "out of memory");
        goto fail;
    }
    w->nstreams++;
    BT_DEBUG("request %s accepted on stream %u (%zu carried tokens, max_tokens %u)", s->rid, id, ncar,
             er.max_tokens);
    free(kv);
    free(carried);
    bt_request_msg_free(&msg);
    return;

fail:
    w->requests_error++;
    bt_log(bt_status_client_input(st) ? BT_LOG_DEBUG : BT_LOG_WARN, "request on stream %u rejected: %s", id,
           err[0] ? err : bt_status_msg(st));
    wk_send_stream_error(p, id, st, err[0] ? err : bt_status_msg(st));
    if (s) bt_ctx_free(s->ctx);
    free(s);
    free(kv);
    free(carried);
    bt_request_msg_free(&msg);
}

static void kill_stream(wk_worker *w, wk_stream *s, const char *why) {
    BT_INFO("request %s killed (%s) after %u new tokens (%u carried)", s->rid, why, s->tokens, s->carried);
    bt_engine_kill(w->engine, s->seq);
    wk_stream_free(s);
}

/* A stream's context changed state (a STOP or KILL frame, or its frontend's connection lost).
 * Stop: the engine ends the sequence soon with FINISH(cancelled) and what it generated. Kill: the
 * engine drops the sequence now (waiting queue or running batch) and its KV blocks return to the
 * free pool; the stream is freed here. With --fault-ignore-kill a KILL frame is counted and
 * acknowledged but the sequence is left to run out (tests use it to prove that their baseline
 * check sees a leak). */
static void on_stream_cancel(bt_ctx *c, bt_ctx_state state, void *ud) {
    (void)c;
    wk_stream *s = ud;
    wk_worker *w = s->w;
    if (state == BT_CTX_STOPPED) {
        w->cancel_stop++;
        BT_INFO("request %s stopped by the frontend after %u new tokens (%u carried)", s->rid, s->tokens, s->carried);
        bt_engine_stop(w->engine, s->seq);
        return;
    }
    bool lost = s->p->lost;
    if (lost) w->cancel_peer_lost++;
    else w->cancel_kill++;
    if (w->o.fault_ignore_kill && !lost) {
        BT_WARN("request %s: KILL ignored on purpose (--fault-ignore-kill) after %u new tokens", s->rid, s->tokens);
        s->ignored_kill = true;
        return;
    }
    uint64_t t0 = s->t_kill_us;
    bt_engine_kill(w->engine, s->seq);
    uint64_t now = bt_now_us();
    if (t0) {
        bt_hist_observe(&w->cancel_lat, &wk_cancel_buckets, (double)(now - t0) / 1e6, 1);
        BT_DEBUG("request %s: engine dropped the sequence %" PRIu64 " us after the KILL arrived (t=%" PRIu64 " us)",
                 s->rid, now - t0, now);
    }
    BT_INFO("request %s killed (%s) after %u new tokens (%u carried)", s->rid,
            lost ? "frontend connection lost" : "kill from the frontend", s->tokens, s->carried);
    wk_stream_free(s);
}

static void on_peer_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    (void)c;
    wk_peer *p = ud;
    switch (f->type) {
    case BT_FRAME_REQUEST:
        handle_request(p, f->stream, f);
        break;
    case BT_FRAME_STOP: {
        wk_stream *s = bt_map_get(&p->streams, f->stream);
        if (s) bt_ctx_stop(s->ctx); /* a repeated STOP, or a STOP after a KILL, does nothing */
        break;
    }
    case BT_FRAME_KVSTATE: /* the state of the continuation whose REQUEST follows */
        wk_handoff_piece(p, f);
        break;
    case BT_FRAME_KILL: {
        wk_stream *s = bt_map_get(&p->streams, f->stream);
        if (s && !bt_ctx_is_killed(s->ctx)) {
            s->t_kill_us = bt_now_us();
            bt_ctx_kill(s->ctx); /* frees s */
        } else if (!s) {
            wk_handoff_forget(p, f->stream);
        }
        break;
    }
    default:
        BT_DEBUG("ignoring %s frame from %s", bt_frame_type_name(f->type), bt_rpc_peer_name(p->conn));
    }
}

/* Tracks every accepted connection so that exiting closes those still in their handshake too. */
static void on_peer_accept(void *ud, bt_rpc_conn *c) {
    wk_worker *w = ud;
    if (w->finishing) {
        bt_rpc_conn_close(c, BT_OK, "worker exiting");
        return;
    }
    bt_map_put(&w->conns, (uint64_t)(uintptr_t)c, c);
}

static void on_peer_open(void *ud, bt_rpc_conn *c) {
    wk_worker *w = ud;
    wk_peer *p = calloc(1, sizeof *p);
    if (!p) {
        bt_rpc_conn_close(c, BT_ERR_NOMEM, "out of memory");
        return;
    }
    p->kind = WK_KIND_PEER;
    p->w = w;
    p->conn = c;
    p->ctx = bt_ctx_new(bt_rpc_peer_name(c), NULL, NULL);
    if (!p->ctx) {
        free(p);
        bt_rpc_conn_close(c, BT_ERR_NOMEM, "out of memory");
        return;
    }
    bt_map_init(&p->streams);
    LIST_INSERT_HEAD(&w->peers, p, link);
    w->npeers++;
    bt_rpc_set_ud(c, p);
    BT_INFO("frontend %s connected", bt_rpc_peer_name(c));
    wk_orphan_reclaim(w, bt_rpc_peer_instance(c));
    wk_send_load(w, p);
    if (w->state == WK_DRAINING) {
        bt_buf *b = bt_rpc_wbuf(c);
        if (b) bt_frame_put_goaway(b, BT_ERR_DRAINING, "worker is draining");
    }
}

static void on_peer_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)why;
    if (*(int *)ud != WK_KIND_PEER) { /* closed before its handshake: no peer was made */
        bt_map_del(&((wk_worker *)ud)->conns, (uint64_t)(uintptr_t)c);
        return;
    }
    wk_peer *p = ud;
    wk_worker *w = p->w;
    bt_map_del(&w->conns, (uint64_t)(uintptr_t)c);
    /* what becomes of its streams is said after it happens: each stream's own line (kept as an
     * orphan, or killed), then the count of each */
    size_t running = p->streams.len;
    if (running)
        BT_INFO("frontend %s disconnected (%s) with %zu stream%s running", bt_rpc_peer_name(c), reason, running,
                running == 1 ? "" : "s");
    else BT_INFO("frontend %s disconnected (%s)", bt_rpc_peer_name(c), reason);
    uint64_t k;
    void *v;
    size_t it = 0;
    /* unlink first: a stream ending here may finish the drain, which walks the peer list */
    LIST_REMOVE(p, link);
    w->npeers--;
    /* streams another frontend may resume are kept a while (orphan.c); keeping one takes it off
     * the table, so the walk starts again */
    size_t kept = 0;
    while (bt_map_next(&p->streams, &it, &k, &v)) {
        if (wk_orphan_keep(w, v)) {
            kept++;
            it = 0;
        }
    }
    it = 0;
    size_t killed = p->streams.len;
    /* nothing generates for nobody: the peer's context kills every stream's context, in the
     * order the streams arrived; streams whose KILL was ignored on purpose go too */
    p->lost = true;
    bt_ctx_kill(p->ctx);
    while (bt_map_next(&p->streams, &it, &k, &v)) {
        kill_stream(w, v, "frontend connection lost");
        it = 0;
    }
    if (running)
        BT_INFO("frontend %s: of its %zu stream%s, %zu kept as orphan%s, %zu killed", bt_rpc_peer_name(c), running,
                running == 1 ? "" : "s", kept, kept == 1 ? "" : "s", killed);
    bt_map_free(&p->streams);
    bt_ctx_free(p->ctx);
    wk_handoff_peer_gone(p);
    free(p);
}

static const bt_rpc_handlers peer_handlers = {on_peer_open, on_peer_frame, on_peer_close, on_peer_accept, NULL, NULL};

/* ---- start-up ---------------------------------------------------------------------------- */

static bool parse_endpoint(wk_opts *o, char *err, size_t errlen) {
    const char *e = o->endpoint;
    if (strncmp(e, "dyn://", 6) == 0) e += 6;
    char tmp[192];
    snprintf(tmp, sizeof tmp, "%s", e);
    char *a = tmp, *b = strchr(a, '.'), *c = b ? strchr(b + 1, '.') : NULL;
    if (!b || !c || strchr(c + 1, '.') || b == a || c == b + 1 || !c[1]) {
        snprintf(err, errlen, "invalid --endpoint '%s' (expected dyn://namespace.component.endpoint)", o->endpoint);
        return false;
    }
    *b = *c = '\0';
    if (strlen(a) >= sizeof o->ns || strlen(b + 1) >= sizeof o->component || strlen(c + 1) >= sizeof o->ep) {
        snprintf(err, errlen, "--endpoint '%s' has a part longer than 63 characters", o->endpoint);
        return false;
    }
    memcpy(o->ns, a, strlen(a) + 1);
    memcpy(o->component, b + 1, strlen(b + 1) + 1);
    memcpy(o->ep, c + 1, strlen(c + 1) + 1);
    return true;
}

/* How an option was given, for a message: the flag, or the environment variable standing for it. */
static const char *given_as(const char *origin, const char *flag) {
    return strcmp(origin, "argument") == 0 ? flag : origin;
}

/* Settings that one engine reads and the other ignores. Given with the other engine they would be
 * dropped in silence (an --upstream without --engine openai used to run the mocker), so they are
 * a configuration error instead. */
static const char *const openai_only[] = {"--upstream", "--upstream-model", "--upstream-kind", "--upstream-api-key",
                                          "--upstream-total-blocks", "--upstream-health-interval",
                                          "--upstream-health-failures", "--upstream-startup-timeout",
                                          "--upstream-first-byte-timeout", "--upstream-raw-completions", NULL};
static const char *const mocker_only[] = {"--num-gpu-blocks-override", "--block-size", "--max-num-seqs",
                                          "--max-num-batched-tokens", "--watermark", "--speedup-ratio",
                                          "--fault-die-after-tokens", "--fault-stall-after-tokens",
                                          "--fault-error-after-tokens", "--fault-signals", "--fault-slow-factor",
                                          "--mocker-kv-bytes-per-token", "--batch-gather-us", NULL};
/* read by the llama engine alone: given to another engine (`baton run --model x.gguf` without
 * --engine llama) the worker would serve the mocker's mock-model instead of the model named */
static const char *const llama_only[] = {"--model", "--llama-lib-dir", "--ctx-size", "--llama-threads",
                                         "--llama-ubatch", "--flash-attn", "--kv-unified", "--fault-hang-after-tokens",
                                         "--fault-nan-after-tokens", "--fault-kv-corrupt", "--fault-prompt-delay-ms",
                                         NULL};

static bool engine_settings_check(const wk_opts *o, const bt_opt *opts, int nopts, int argc, char **argv, char *err,
                                  size_t errlen) {
    bool openai = strcmp(o->engine, "openai") == 0, llama = strcmp(o->engine, "llama") == 0;
    if (!openai && !llama && strcmp(o->engine, "mocker") != 0) {
        const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, "--engine");
        snprintf(err, errlen, "unknown %s '%s' (mocker, openai or llama)",
                 origin ? given_as(origin, "--engine") : "--engine", o->engine);
        return false;
    }
    /* the llama engine reads the scheduler flags it shares with the mocker, none of the openai ones */
    const char *const *foreign = openai ? mocker_only : openai_only;
    for (int i = 0; foreign[i]; i++) {
        const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, foreign[i]);
        if (!origin) continue;
        if (openai)
            snprintf(err, errlen, "%s is a setting of the mocker engine, which this worker does not run (--engine "
                                  "openai): remove it", given_as(origin, foreign[i]));
        else
            snprintf(err, errlen, "%s is a setting of the openai engine, but this worker runs the %s: add "
                                  "--engine openai (or DYN_ENGINE=openai) to serve through an upstream",
                     given_as(origin, foreign[i]), llama ? "llama engine (--engine llama)" : "mocker");
        return false;
    }
    for (int i = 0; !llama && llama_only[i]; i++) {
        const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, llama_only[i]);
        if (!origin) continue;
        snprintf(err, errlen, "%s is a setting of the llama engine, but this worker runs the %s: add --engine llama "
                              "(or DYN_ENGINE=llama) to serve a GGUF model with llama.cpp",
                 given_as(origin, llama_only[i]), openai ? "openai engine (--engine openai)" : "mocker");
        return false;
    }
    return true;
}

/* The name a llama worker serves without --model-name: its GGUF file's name without the
 * directory and a ".gguf" ending ("stories260K" for the bundled model), so that clients ask
 * for the model that is loaded, not the mocker's "mock-model". */
static void llama_model_name(wk_opts *o, const bt_opt *opts, int nopts, int argc, char **argv) {
    static char name[256];
    if (strcmp(o->engine, "llama") != 0 || bt_opts_origin(opts, nopts, argc, argv, 1, "--model-name")) return;
    const char *path = o->llama.model_path && o->llama.model_path[0] ? o->llama.model_path : bt_llama_default_model();
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 5 && strcasecmp(base + n - 5, ".gguf") == 0) n -= 5;
    if (n == 0 || n >= sizeof name) return; /* nothing usable: the default stays */
    memcpy(name, base, n);
    name[n] = '\0';
    o->model_name = name;
}

/* The endpoint from --endpoint, else dyn://{--namespace}.backend.generate. A namespace given with
 * an endpoint in another namespace is refused: the worker would serve where the frontends of that
 * namespace never look. */
static bool endpoint_from_opts(wk_opts *o, const bt_opt *opts, int nopts, int argc, char **argv, char *err,
                               size_t errlen) {
    const char *ns = o->namespace_name;
    const char *ns_origin = bt_opts_origin(opts, nopts, argc, argv, 1, "--namespace");
    const char *ep_origin = bt_opts_origin(opts, nopts, argc, argv, 1, "--endpoint");
    if (!*ns || strchr(ns, '.') || strlen(ns) >= sizeof o->ns) {
        snprintf(err, errlen, "invalid %s '%s' (a non-empty name of at most %zu characters without '.')",
                 ns_origin ? given_as(ns_origin, "--namespace") : "--namespace", ns, sizeof o->ns - 1);
        return false;
    }
    static char ep_default[sizeof o->ns + 32];
    if (!ep_origin) {
        snprintf(ep_default, sizeof ep_default, "dyn://%s.backend.generate", ns);
        o->endpoint = ep_default;
    }
    if (!parse_endpoint(o, err, errlen)) return false;
    if (ns_origin && ep_origin && strcmp(o->ns, ns) != 0) {
        snprintf(err, errlen, "%s '%s' and %s '%s' name different namespaces: give one of them, or the same "
                              "namespace in both", given_as(ns_origin, "--namespace"), ns,
                 given_as(ep_origin, "--endpoint"), o->endpoint);
        return false;
    }
    return true;
}

/* The model file of a llama worker exists, is readable and starts with the GGUF magic. `given`
 * names where the path came from (the flag or its twin), NULL for the bundled default. Checked
 * at parse time too, so that `baton run --engine llama --model typo.gguf` starts nothing. */
static bool llama_model_check(const bt_llama_config *c, const char *given, char *err, size_t errlen) {
    const char *path = c->model_path && c->model_path[0] ? c->model_path : bt_llama_default_model();
    char from[96];
    if (given) snprintf(from, sizeof from, " (%s)", given);
    else snprintf(from, sizeof from, " (the bundled model; --model names another)");
    char why[128];
    int fd = bt_open_regular(path, why, sizeof why); /* not a FIFO or a device: it would block, or never end */
    if (fd < 0) return snprintf(err, errlen, "model file %s%s: %s", path, from, why), false;
    char magic[4];
    ssize_t n = bt_read_full(fd, magic, sizeof magic);
    close(fd);
    if (n != (ssize_t)sizeof magic || memcmp(magic, "GGUF", sizeof magic) != 0)
        return snprintf(err, errlen, "model file %s%s is not a GGUF file", path, from), false;
    return true;
}

/* What no restart can fix before a llama engine starts: its flags, a model file that is missing,
 * unreadable or not GGUF, the llama.cpp libraries not installed. These are configuration errors
 * (exit code 2), so that a supervisor does not restart the worker forever (docs/operations.md). */
static bool llama_preflight(const bt_llama_config *c, char *err, size_t errlen) {
    if (bt_llama_config_check(c, err, errlen) != BT_OK) return false;
    if (!llama_model_check(c, c->model_path && c->model_path[0] ? "--model" : NULL, err, errlen)) return false;
#ifdef BATON_HAVE_LLAMA
    return bt_llama_lib_open(c->lib_dir, err, errlen) != NULL;
#else
    /* built without llama.cpp's headers: no restart gives it an engine either. The engine's own
     * create, in such a build, only says what to run (scripts/setup, then rebuild). */
    return bt_llama_create(NULL, c, NULL, NULL, err, errlen) != NULL;
#endif
}

/* Completes and checks the engine's configuration: the llama engine takes the scheduler flags it
 * shares with the mocker; each engine's own check. Run with the arguments' checks, so that `baton
 * run` refuses (say) --engine openai without --upstream before it starts anything. */
static bool engine_configs_check(wk_worker *w, char *err, size_t errlen) {
    wk_opts *o = &w->o;
    char why[256];
    if (strcmp(o->engine, "llama") == 0) {
        /* the scheduler flags the mocker shares, with the llama engine's own defaults */
        if (o->mocker.max_num_seqs != w->mocker_defaults.max_num_seqs) o->llama.max_num_seqs = o->mocker.max_num_seqs;
        if (o->mocker.max_num_batched_tokens != w->mocker_defaults.max_num_batched_tokens)
            o->llama.max_num_batched_tokens = o->mocker.max_num_batched_tokens;
        o->llama.default_max_tokens = o->mocker.default_max_tokens;
        o->llama.fault_die_after_tokens = o->mocker.fault_die_after_tokens;
        o->llama.fault_error_after_tokens = o->mocker.fault_error_after_tokens;
        o->llama.batch_gather_us = o->mocker.batch_gather_us;
        if (bt_llama_config_check(&o->llama, why, sizeof why) != BT_OK)
            return snprintf(err, errlen, "invalid llama engine configuration: %s", why), false;
    }
    if (bt_mocker_config_check(&o->mocker, why, sizeof why) != BT_OK)
        return snprintf(err, errlen, "invalid mocker configuration: %s", why), false;
    o->openai.served_model = o->model_name;
    o->openai.stall_timeout = o->engine_stuck_timeout;
    /* an empty upstream key is not "no key", as an empty --api-key is not (the upstream's refusal
     * would come only at the first request, and name a key the operator thought was set) */
    if (strcmp(o->engine, "openai") == 0 &&
        !bt_proc_given_nonempty("--upstream-api-key", "DYN_UPSTREAM_API_KEY", o->openai.api_key, "an upstream key",
                                err, errlen))
        return false;
    if (strcmp(o->engine, "openai") == 0 && bt_openai_config_check(&o->openai, why, sizeof why) != BT_OK)
        return snprintf(err, errlen, "invalid openai engine configuration: %s", why), false;
    return true;
}

static int worker_run(wk_worker *w) {
    char err[256];
    uv_loop_t *loop = w->loop;
    wk_opts *o = &w->o;
    w->started_ms = bt_now_ms();
    w->progress_ms = w->started_ms;
    w->instance_id = bt_random64() & 0x7fffffffffffffffull;
    if (!w->instance_id) w->instance_id = 1;

    /* the engines' configurations were checked (engine_configs_check) with the arguments */
    bool openai = strcmp(o->engine, "openai") == 0;
    bool llama = strcmp(o->engine, "llama") == 0;
    if (!wk_canary_init(w, err, sizeof err)) {
        BT_ERROR("health check: %s", err);
        return 2;
    }
    uv_timer_init(loop, &w->drain_timer);
    uv_timer_init(loop, &w->dead_timer);
    uv_timer_init(loop, &w->load_timer);
    w->drain_timer.data = w->dead_timer.data = w->load_timer.data = w;
    uv_timer_start(&w->load_timer, on_load_timer, LOAD_REFRESH_MS, LOAD_REFRESH_MS / 2);
    bt_engine_hooks hooks = {on_engine_load, wk_engine_dead_hook, on_engine_serving};
    if (llama) {
        char lerr[1024];
        if (!llama_preflight(&o->llama, lerr, sizeof lerr)) {
            BT_ERROR("llama engine: %s", lerr);
            return 2;
        }
        w->engine = bt_llama_create(loop, &o->llama, &hooks, w, lerr, sizeof lerr);
        if (!w->engine) {
            BT_ERROR("llama engine: %s", lerr);
            return 1;
        }
    } else {
        w->engine = openai ? bt_openai_create(loop, &o->openai, &hooks, w) : bt_mocker_create(loop, &o->mocker, &hooks, w);
    }
    if (!w->engine) {
        BT_ERROR("cannot create the engine");
        return 1;
    }

    /* The status server first: a port already taken is a start-up error, before the worker is
     * announced anywhere. */
    if (wk_status_start(w, err, sizeof err) != BT_OK) {
        BT_ERROR("%s", err);
        return 1;
    }

    bt_rpc_config rc;
    bt_rpc_config_default(&rc, BT_ROLE_WORKER, w->instance_id);
    rc.dead_after_ms = (uint32_t)o->frontend_dead_after * 1000;
    /* announced only when the engine tells every wait: a frontend then judges every silent stream
     * that was not told (an OpenAI upstream's queue is invisible here: its LOAD's waiting count
     * keeps the frontend's older, whole-worker rule) */
    if (!bt_engine_tells_waits(w->engine)) rc.hello_flags &= (uint8_t)~BT_HELLO_WAITING;
    if (bt_proc_load_secret(&o->p, &o->rpc_secret, err, sizeof err) != BT_OK) {
        BT_ERROR("%s", err);
        return 2;
    }
    rc.secret = o->rpc_secret;
    if (o->rpc_secret) BT_INFO("request plane: frontends must prove the shared secret");
    if (bt_rpc_listen(loop, o->rpc_host, (int)o->rpc_port, &rc, &peer_handlers, w, &w->listener, err, sizeof err) !=
        BT_OK) {
        /* the flag that fixes it: an address this machine does not have is not the port's fault */
        if (strstr(err, uv_strerror(UV_EADDRNOTAVAIL)))
            BT_ERROR("%s; this machine has no such address: choose another --rpc-host (DYN_TCP_RPC_HOST)", err);
        else BT_ERROR("%s; choose another --rpc-port (DYN_TCP_RPC_PORT), or 0 for a free one", err);
        return 1;
    }
    snprintf(w->transport, sizeof w->transport, "%s:%d", o->rpc_host, bt_rpc_listener_port(w->listener));

    bt_status dst = bt_proc_discovery_create(loop, &o->p, o->discovery_ttl, &w->disc, err, sizeof err);
    if (dst != BT_OK) {
        BT_ERROR("discovery: %s", err);
        return dst == BT_ERR_INVALID ? 2 : 1; /* a setting to fix (bad TLS file, endpoint, TTL), not to retry */
    }
    bt_discovery_instance_key(w->key, sizeof w->key, o->ns, o->component, o->ep, w->instance_id);
    json_t *card = json_object();
    json_object_set_new(card, "name", json_string(o->model_name));
    bt_engine_card(w->engine, card);
    const char *exact = json_string_value(json_object_get(card, "exactness"));
    snprintf(w->exactness, sizeof w->exactness, "%s", exact ? exact : "");
    json_t *val = json_pack("{s:s, s:s, s:s, s:s, s:I, s:{s:s}, s:o, s:i}", "type", "Endpoint", "namespace", o->ns,
                            "component", o->component, "endpoint", o->ep, "instance_id", (json_int_t)w->instance_id,
                            "transport", "tcp", w->transport, "model", card, "pid", (int)getpid());
    bt_status st = bt_discovery_put(w->disc, w->key, val);
    json_decref(val);
    if (st != BT_OK) {
        BT_ERROR("cannot register in discovery: %s", bt_status_msg(st));
        return 1;
    }

    if (bt_proc_events_create(loop, &o->p, o->ns, "worker", w->instance_id, &w->events, err, sizeof err) != BT_OK) {
        BT_ERROR("event plane: %s", err);
        return 2;
    }

    wk_drain_init(w);
    wk_orphan_init(w);
    wk_handoff_init(w);
    wk_set_state(w, WK_READY);
    wk_canary_start(w);
    BT_INFO("worker %" PRIx64 " serving model '%s' on %s (endpoint dyn://%s.%s.%s, discovery %s, drain bound %llds)",
            w->instance_id, o->model_name, w->transport, o->ns, o->component, o->ep, o->p.discovery,
            (long long)o->graceful_timeout);
    uv_run(loop, UV_RUN_DEFAULT);
    return w->exit_code;
}

int64_t bt_worker_checked_llama_threads;

int bt_worker_main(int argc, char **argv) {
    bt_log_init("worker");
    wk_worker *w = calloc(1, sizeof *w);
    if (!w) return 1;
    LIST_INIT(&w->peers);
    w->kind = WK_KIND_WORKER;
    wk_opts *o = &w->o;
    o->engine = "mocker";
    o->model_name = "mock-model";
    o->endpoint = "dyn://dynamo.backend.generate";
    o->rpc_host = "127.0.0.1";
    o->rpc_port = 0;
    bt_proc_opts_default(&o->p);
    o->discovery_ttl = 10;
    o->graceful_timeout = 30;
    o->system_port = 9090;
    o->system_host = "0.0.0.0";
    o->health_path = "/health";
    o->live_path = "/live";
    o->starting_health = "notready";
    o->endpoint_health = "[]";
    o->frontend_dead_after = 5;
    o->orphan_grace = 30;
    o->kv_handoff = true;
    o->canary_enabled = false;
    o->canary_wait = 10;
    o->canary_timeout = 3;
    o->canary_payload = NULL;
    o->engine_stuck_timeout = 30;
    bt_mocker_config_default(&o->mocker);
    bt_openai_config_default(&o->openai);
    o->namespace_name = "dynamo";
    bt_llama_config_default(&o->llama);
    w->mocker_defaults = o->mocker;

    const bt_opt opts[] = {
        {"--engine", "DYN_ENGINE", BT_OPT_STR, &o->engine, 0, 0,
         "mocker, openai (an OpenAI-compatible server) or llama (llama.cpp in process)"},
        {"--model", "DYN_MODEL_PATH", BT_OPT_STR, &o->llama.model_path, 0, 0,
         "llama engine: GGUF model file (none: the bundled models/stories260K.gguf)"},
        {"--llama-lib-dir", "BATON_LLAMA_LIB_DIR", BT_OPT_STR, &o->llama.lib_dir, 0, 0,
         "llama engine: directory of libllama/libggml (none: ~/.cache/baton/llama.cpp-0.4.0/lib, from scripts/setup)"},
        {"--ctx-size", "DYN_CTX_SIZE", BT_OPT_INT, &o->llama.ctx_size, 0, 16777216,
         "llama engine: KV cells in all, each sequence a stream of a multiple of 256 unless --kv-unified (0: the "
         "model's context per sequence, at most 65536 in all)"},
        {"--llama-threads", "DYN_LLAMA_THREADS", BT_OPT_INT, &o->llama.threads, 1, 256,
         "llama engine: CPU threads per decode"},
        {"--llama-ubatch", "DYN_LLAMA_UBATCH", BT_OPT_INT, &o->llama.ubatch, 1, 1e6,
         "llama engine: tokens per physical batch; 1 keeps output independent of batching (exact migration)"},
        {"--flash-attn", "DYN_FLASH_ATTN", BT_OPT_BOOL, &o->llama.flash_attn, 0, 0,
         "llama engine: use llama.cpp's flash attention (slower on CPU for small models)"},
        {"--kv-unified", "DYN_KV_UNIFIED", BT_OPT_BOOL, &o->llama.kv_unified, 0, 0,
         "llama engine: one KV pool shared by all sequences (attention then scans every sequence's cells)"},
        {"--upstream", "DYN_UPSTREAM_URL", BT_OPT_STR, &o->openai.upstream, 0, 0,
         "openai engine: base URL of the engine server"},
        {"--upstream-model", "DYN_UPSTREAM_MODEL", BT_OPT_STR, &o->openai.model, 0, 0,
         "openai engine: model name upstream (none: the first of its /v1/models)"},
        {"--upstream-kind", "DYN_UPSTREAM_KIND", BT_OPT_STR, &o->openai.kind, 0, 0,
         "openai engine: auto, baton, vllm, sglang, llamacpp or openai"},
        {"--upstream-api-key", "DYN_UPSTREAM_API_KEY", BT_OPT_STR, &o->openai.api_key, 0, 0,
         "openai engine: bearer token for the upstream (visible ASCII); an empty value, flag or twin, is refused: "
         "leave both out to send none"},
        {"--upstream-raw-completions", "DYN_UPSTREAM_RAW_COMPLETIONS", BT_OPT_BOOL, &o->openai.raw_completions, 0, 0,
         "openai engine: the upstream's /v1/completions continues a text prompt as it is (migrated text-only "
         "completions continue there; otherwise they end with an error)"},
        {"--upstream-total-blocks", "DYN_UPSTREAM_TOTAL_BLOCKS", BT_OPT_INT, &o->openai.total_blocks, 1, 1e12,
         "openai engine: KV blocks reported (usage x this)"},
        {"--upstream-health-interval", "DYN_UPSTREAM_HEALTH_INTERVAL", BT_OPT_DOUBLE, &o->openai.health_interval,
         0.01, 3600, "openai engine: seconds between health polls"},
        {"--upstream-health-failures", "DYN_UPSTREAM_HEALTH_FAILURES", BT_OPT_INT, &o->openai.health_failures, 1,
         1000, "openai engine: failed polls in a row that make the upstream dead"},
        {"--upstream-startup-timeout", "DYN_UPSTREAM_STARTUP_TIMEOUT", BT_OPT_DOUBLE, &o->openai.startup_timeout,
         0.01, 86400, "openai engine: seconds the upstream may take to answer at first"},
        {"--upstream-first-byte-timeout", "DYN_UPSTREAM_FIRST_BYTE_TIMEOUT", BT_OPT_DOUBLE,
         &o->openai.first_byte_timeout, 0, 86400,
         "openai engine: seconds the upstream may take to begin a stream's answer (its queue, its prefill) before "
         "that request alone fails with a 504, not migrated (0 = never)"},
        {"--model-name", "DYN_MODEL_NAME", BT_OPT_STR, &o->model_name, 0, 0,
         "model name served, 1 to 127 bytes, not 'unknown' (llama engine: the model file's name without .gguf, e.g. "
         "stories260K)"},
        {"--namespace", "DYN_NAMESPACE", BT_OPT_STR, &o->namespace_name, 0, 0,
         "namespace; without --endpoint the worker serves dyn://NAMESPACE.backend.generate"},
        {"--endpoint", "DYN_ENDPOINT", BT_OPT_STR, &o->endpoint, 0, 0, "dyn://namespace.component.endpoint"},
        {"--rpc-host", "DYN_TCP_RPC_HOST", BT_OPT_STR, &o->rpc_host, 0, 0, "request-plane listen address"},
        {"--rpc-port", "DYN_TCP_RPC_PORT", BT_OPT_INT, &o->rpc_port, 0, 65535, "request-plane port (0 = any)"},
        BT_PROC_OPT_DISCOVERY(&o->p, "file or etcd"),
        BT_PROC_OPT_DISCOVERY_DIR(&o->p),
        {"--discovery-ttl", "DYN_DISCOVERY_TTL", BT_OPT_INT, &o->discovery_ttl, 1, 3600, "seconds"},
        BT_PROC_OPT_ETCD_ENDPOINTS(&o->p),
        BT_PROC_OPT_ETCD_CA(&o->p),
        BT_PROC_OPT_ETCD_CLIENT_CERT(&o->p),
        BT_PROC_OPT_ETCD_CLIENT_KEY(&o->p),
        {"--graceful-shutdown-timeout", "DYN_GRACEFUL_SHUTDOWN_TIMEOUT", BT_OPT_INT, &o->graceful_timeout, 0, 86400,
         "seconds of drain before streams are handed back"},
        {"--system-port", "DYN_SYSTEM_PORT", BT_OPT_INT, &o->system_port, -1, 65535,
         "status server port (-1 off, 0 any)"},
        {"--system-host", "DYN_SYSTEM_HOST", BT_OPT_STR, &o->system_host, 0, 0, "status server address"},
        {"--allowed-hosts", "BATON_ALLOWED_HOSTS", BT_OPT_STR, &o->allowed_hosts, 0, 0,
         "Host header names the status server serves besides IP addresses and localhost (comma-separated, ASCII case "
         "and port ignored; .example.com for it and every name under it; * for any); another gets 403 "
         "host_not_allowed, against DNS rebinding. Not given: on a loopback --system-host only IP addresses, "
         "localhost and *.localhost are served, on any other address every name"},
        {"--system-health-path", "DYN_SYSTEM_HEALTH_PATH", BT_OPT_STR, &o->health_path, 0, 0,
         "readiness probe path"},
        {"--system-live-path", "DYN_SYSTEM_LIVE_PATH", BT_OPT_STR, &o->live_path, 0, 0, "liveness probe path"},
        {"--system-starting-health-status", "DYN_SYSTEM_STARTING_HEALTH_STATUS", BT_OPT_STR, &o->starting_health, 0,
         0, "ready or notready: /health until the endpoint is first ready"},
        {"--system-use-endpoint-health-status", "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS", BT_OPT_STR,
         &o->endpoint_health, 0, 0, "JSON list of endpoints that alone decide /health, e.g. [\"generate\"]"},
        {"--health-check-enabled", "DYN_HEALTH_CHECK_ENABLED", BT_OPT_BOOL, &o->canary_enabled, 0, 0,
         "send canary requests when idle"},
        {"--canary-wait-time", "DYN_CANARY_WAIT_TIME", BT_OPT_DOUBLE, &o->canary_wait, 0.01, 86400,
         "seconds without a completed request before a canary"},
        {"--health-check-request-timeout", "DYN_HEALTH_CHECK_REQUEST_TIMEOUT", BT_OPT_DOUBLE, &o->canary_timeout, 0.01,
         3600, "seconds a canary has for its first token"},
        {"--health-check-payload", "DYN_HEALTH_CHECK_PAYLOAD", BT_OPT_STR, &o->canary_payload, 0, 0,
         "canary request body: JSON object or @file"},
        {"--engine-stuck-timeout", "DYN_ENGINE_STUCK_TIMEOUT", BT_OPT_DOUBLE, &o->engine_stuck_timeout, 0, 86400,
         "seconds without engine progress while busy before the engine counts as failed; the openai engine "
         "fails a stream whose upstream answer, once begun, sent nothing for that long instead (0 = off)"},
        BT_PROC_OPT_RPC_SECRET_FILE(&o->p),
        {"--frontend-dead-after", "DYN_FRONTEND_DEAD_AFTER", BT_OPT_INT, &o->frontend_dead_after, 1, 3600,
         "seconds of silence before a frontend connection is dropped"},
        {"--kv-handoff", "DYN_KV_HANDOFF", BT_OPT_BOOL, &o->kv_handoff, 0, 0,
         "a stream given back (drain bound, rebalance) carries its exported KV state, so that the next worker "
         "continues it without prefill (llama engine; false: the next worker re-prefills)"},
        {"--rebalance-endpoint", "DYN_REBALANCE_ENDPOINT", BT_OPT_BOOL, &o->rebalance_endpoint, 0, 0,
         "serve POST /rebalance?streams=N on the status server: moves N running streams to other workers "
         "(with their KV state) without stopping this one. Off by default: the status server has no "
         "authentication"},
        {"--fault-kv-corrupt", "BATON_FAULT_KV_CORRUPT", BT_OPT_BOOL, &o->llama.fault_kv_corrupt, 0, 0,
         "llama engine test hook: every exported KV state has one byte flipped (the receiver must fall back to "
         "prefill)"},
        {"--fault-hang-after-tokens", "BATON_FAULT_HANG_AFTER_TOKENS", BT_OPT_INT, &o->llama.fault_hang_after_tokens, 0,
         1e15,
         "llama engine test hook: once N tokens were emitted, the engine thread blocks for good, as in a decode that "
         "never returns (the engine monitor, --engine-stuck-timeout, must fail the worker; 0 = off)"},
        {"--fault-nan-after-tokens", "BATON_FAULT_NAN_AFTER_TOKENS", BT_OPT_INT, &o->llama.fault_nan_after_tokens, 0,
         1e15,
         "llama engine test hook: once N tokens were emitted, a NaN in the logits row the sampler reads (the engine "
         "must fail: its streams migrate, the worker exits 1; 0 = off)"},
        {"--fault-prompt-delay-ms", "BATON_FAULT_PROMPT_DELAY_MS", BT_OPT_INT, &o->llama.fault_prompt_delay_ms, 0,
         60000,
         "llama engine test hook: every prompt takes N ms longer to tokenize, as a long prompt does on a large model "
         "(prompts queue for the prompt thread; 0 = off)"},
        {"--orphan-grace", "DYN_ORPHAN_GRACE", BT_OPT_DOUBLE, &o->orphan_grace, 0, 3600,
         "seconds a resumable stream keeps running after its frontend's connection ends, for another frontend to "
         "re-attach to (0 = kill it at once)"},
        BT_PROC_OPT_EVENT_PLANE(&o->p),
        BT_PROC_OPT_NATS_SERVER(&o->p),
        BT_PROC_OPT_NATS_TLS_CA(&o->p),
        BT_PROC_OPT_NATS_TLS_CERT(&o->p),
        BT_PROC_OPT_NATS_TLS_KEY(&o->p),
        {"--fault-signals", "DYN_FAULT_SIGNALS", BT_OPT_BOOL, &o->fault_signals, 0, 0,
         "mocker: SIGUSR1 kills the engine, SIGUSR2 toggles a stall, SIGWINCH the slow fault (tests)"},
        {"--num-gpu-blocks-override", "DYN_NUM_GPU_BLOCKS_OVERRIDE", BT_OPT_INT, &o->mocker.num_gpu_blocks, 1, 1e9,
         "mocker KV blocks"},
        {"--block-size", "DYN_BLOCK_SIZE", BT_OPT_INT, &o->mocker.block_size, 2, 1e6, "mocker tokens per block"},
        {"--max-num-seqs", "DYN_MAX_NUM_SEQS", BT_OPT_INT, &o->mocker.max_num_seqs, 1, 1e7,
         "max sequences running at once (llama engine: default 16, at most 256)"},
        {"--max-num-batched-tokens", "DYN_MAX_NUM_BATCHED_TOKENS", BT_OPT_INT, &o->mocker.max_num_batched_tokens, 1,
         1e9, "tokens per step (llama engine: default 512)"},
        {"--watermark", "DYN_WATERMARK", BT_OPT_DOUBLE, &o->mocker.watermark, 0, 0.99, "mocker KV watermark"},
        {"--context-length", "DYN_CONTEXT_LENGTH", BT_OPT_INT, &o->mocker.context_length, 0, 1e15,
         "mocker prompt + max_tokens limit in tokens, advertised to frontends (0 = what the KV cache holds)"},
        {"--speedup-ratio", "DYN_SPEEDUP_RATIO", BT_OPT_DOUBLE, &o->mocker.speedup_ratio, 1e-6, 1e9,
         "mocker time scale"},
        {"--batch-gather-us", "BATON_BATCH_GATHER_US", BT_OPT_INT, &o->mocker.batch_gather_us, 0, BT_GATHER_MAX_US,
         "mocker and llama engines: the first step of an idle engine waits until no request has arrived for this "
         "many microseconds (at most 8 times as long after the first), so that a burst that arrives spread over a "
         "fraction of a millisecond is prefilled in one step (0 = off: a step starts as soon as a request waits)"},
        {"--default-max-tokens", "DYN_DEFAULT_MAX_TOKENS", BT_OPT_INT, &o->mocker.default_max_tokens, 1, 1e7,
         "max_tokens when a request sets none"},
        {"--fault-die-after-tokens", "BATON_FAULT_DIE_AFTER_TOKENS", BT_OPT_INT, &o->mocker.fault_die_after_tokens,
         0, 1e15, "mocker test hook"},
        {"--fault-stall-after-tokens", "BATON_FAULT_STALL_AFTER_TOKENS", BT_OPT_INT,
         &o->mocker.fault_stall_after_tokens, 0, 1e15, "mocker test hook"},
        {"--fault-error-after-tokens", "BATON_FAULT_ERROR_AFTER_TOKENS", BT_OPT_INT,
         &o->mocker.fault_error_after_tokens, 0, 1e15, "mocker test hook"},
        {"--mocker-kv-bytes-per-token", "BATON_MOCKER_KV_BYTES_PER_TOKEN", BT_OPT_INT, &o->mocker.kv_bytes_per_token,
         0, 1e8,
         "mocker: KV state bytes per token a handed-off sequence exports (models --kv-handoff; 0 = none; "
         "stories260K: about 650, a 7B fp16 model: 524288)"},
        {"--fault-slow-factor", "BATON_FAULT_SLOW_FACTOR", BT_OPT_DOUBLE, &o->mocker.fault_slow_factor, 1, 1000,
         "mocker test hook: every step takes this many times longer (1 = off); with --fault-signals, SIGWINCH "
         "switches it off and on"},
        {"--fault-ignore-kill", "BATON_FAULT_IGNORE_KILL", BT_OPT_BOOL, &o->fault_ignore_kill, 0, 0,
         "test hook: KILL frames do not reach the engine (the sequence runs out)"},
    };
    int nopts = (int)(sizeof opts / sizeof opts[0]);
    if (bt_proc_help("worker", opts, nopts, argc, argv)) {
        free(w);
        return 0;
    }
    char err[512];
    if (!bt_proc_parse("worker", opts, nopts, argc, argv)) goto bad_usage;
    if (!engine_settings_check(o, opts, nopts, argc, argv, err, sizeof err) ||
        !endpoint_from_opts(o, opts, nopts, argc, argv, err, sizeof err)) {
        bt_proc_error("worker", "%s", err);
        goto bad_usage;
    }
    /* the engine monitor counts a gather's wait as no progress: it must outlast the longest one */
    if (o->engine_stuck_timeout > 0 &&
        o->engine_stuck_timeout * 1e6 <= (double)BT_GATHER_BOUND * (double)o->mocker.batch_gather_us) {
        bt_proc_error("worker",
                      "--engine-stuck-timeout %gs is not longer than the longest batch gather (%d x --batch-gather-us "
                      "= %gs): the engine monitor would fail a worker that only waits for a burst",
                      o->engine_stuck_timeout, BT_GATHER_BOUND,
                      (double)BT_GATHER_BOUND * (double)o->mocker.batch_gather_us / 1e6);
        goto bad_usage;
    }
    /* the status server's address matters only when it listens: with DYN_SYSTEM_PORT -1 (off) a
     * DYN_SYSTEM_HOST left over from another deployment, or empty, is not a reason to refuse */
    if (!bt_proc_check_planes("worker", &o->p, opts, nopts, argc, argv) ||
        !bt_proc_check_host("worker", opts, nopts, argc, argv, "--rpc-host", o->rpc_host) ||
        (o->system_port >= 0 &&
         !bt_proc_check_host("worker", opts, nopts, argc, argv, "--system-host", o->system_host)))
        goto bad_usage;
    if (o->system_port >= 0 &&
        !bt_http_hosts_valid("--allowed-hosts (BATON_ALLOWED_HOSTS)", o->allowed_hosts, err, sizeof err)) {
        bt_proc_error("worker", "%s", err);
        goto bad_usage;
    }
    if (o->health_path[0] != '/' || o->live_path[0] != '/') {
        bt_proc_error("worker", "DYN_SYSTEM_HEALTH_PATH and DYN_SYSTEM_LIVE_PATH must start with '/'");
        goto bad_usage;
    }
    if (!wk_health_config(o, err, sizeof err)) {
        bt_proc_error("worker", "%s", err);
        goto bad_usage;
    }
    if (strcmp(o->engine, "llama") == 0) {
        const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, "--model");
        if (!llama_model_check(&o->llama, origin ? given_as(origin, "--model") : NULL, err, sizeof err) ||
            !bt_llama_model_loads(&o->llama, err, sizeof err)) {
            bt_proc_error("worker", "llama engine: %s", err);
            goto bad_usage;
        }
    }
    if (!engine_configs_check(w, err, sizeof err)) {
        bt_proc_error("worker", "%s", err);
        goto bad_usage;
    }
    if (!wk_canary_load(w, err, sizeof err)) {
        bt_proc_error("worker", "health check: %s", err);
        goto bad_usage;
    }
    llama_model_name(o, opts, nopts, argc, argv);
    if (!bt_discovery_model_name_ok(o->model_name, strlen(o->model_name), err, sizeof err)) {
        const char *origin = bt_opts_origin(opts, nopts, argc, argv, 1, "--model-name");
        bt_proc_error("worker", "%s: %s", origin ? given_as(origin, "--model-name") : "--model (its file name)", err);
        wk_canary_free(w);
        goto bad_usage;
    }
    if (bt_proc_check_for) { /* `baton run` checks its workers' arguments before it starts them */
        bt_worker_checked_llama_threads = strcmp(o->engine, "llama") == 0 ? o->llama.threads : 0;
        wk_canary_free(w);
        free(w);
        return 0;
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    w->loop = &loop;
    int rc = worker_run(w);
    if (rc != 0 && w->state != WK_GONE) {
        /* start-up failed: release what was made and let the loop wind down */
        wk_canary_stop(w);
        if (w->status) bt_http_server_close(w->status, NULL, NULL);
        w->status = NULL;
        if (w->listener) bt_rpc_listener_close(w->listener);
        w->listener = NULL;
        bt_engine_destroy(w->engine);
        w->engine = NULL;
        bt_proc_unwind(&loop, &w->disc, &w->events);
    }
    wk_canary_free(w);
    uv_loop_close(&loop);
    bt_map_free(&w->conns);
    free(o->rpc_secret);
    free(w);
    return rc;

bad_usage:
    free(w);
    return 2;
}
