/* worker.c — `baton worker`: hosts one engine behind the request plane.
 *
 * Lifecycle (one traced state variable, see set_state): registering → ready → draining → gone.
 * Each accepted frontend connection is a peer with its own stream table; a stream is one engine
 * sequence. The worker never keeps generating for nobody: when a peer's connection ends, every
 * sequence of that peer is killed and its KV blocks are freed.
 *
 * Drain (SIGTERM/SIGINT): unregister from discovery first, then GOAWAY to every peer and refuse
 * new requests with the migratable BT_ERR_DRAINING, let running streams finish for up to
 * --graceful-shutdown-timeout seconds, end the rest with the migratable BT_ERR_SHUTDOWN so the
 * frontends continue them elsewhere, then close everything and exit 0. A second signal exits at
 * once. An engine failure takes the same path without the wait and exits 1. */
#include "worker/worker.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/map.h"
#include "common/opts.h"
#include "common/util.h"
#include "discovery/discovery.h"
#include "engine/mocker/mocker.h"
#include "frontend/http.h"
#include "proto/proto.h"
#include "rpc/conn.h"

typedef enum { W_REGISTERING, W_READY, W_DRAINING, W_GONE } wstate;
static const char *wstate_names[] = {"registering", "ready", "draining", "gone"};

typedef struct worker worker;
typedef struct peer peer;

typedef struct {
    peer *p;
    uint32_t id;
    bt_engine_seq *seq;
    uint32_t tokens; /* tokens sent on this attempt */
    uint32_t carried;
    uint64_t t0_us;
    char rid[72];
} wstream;

/* Both the worker and a peer serve as a connection's user data (before and after the
 * handshake); the first member tells them apart. */
enum { KIND_WORKER = 1, KIND_PEER = 2 };

struct peer {
    int kind;
    worker *w;
    bt_rpc_conn *conn;
    bt_map streams;
    peer *prev, *next;
};

typedef struct {
    /* flags */
    const char *engine;
    const char *model_name;
    const char *endpoint;
    const char *rpc_host;
    int64_t rpc_port;
    const char *discovery;
    const char *discovery_dir;
    int64_t discovery_ttl;
    int64_t graceful_timeout;
    int64_t system_port;
    const char *system_host;
    int64_t frontend_dead_after;
    bool fault_signals;
    bt_mocker_config mocker;
    /* derived */
    char ns[64], component[64], ep[64];
} wopts;

struct worker {
    int kind;
    uv_loop_t *loop;
    wopts o;
    bt_engine *engine;
    bt_discovery *disc;
    bt_rpc_listener *listener;
    bt_http_server *status;
    peer *peers;
    size_t npeers;
    size_t nstreams;
    uint64_t instance_id;
    char key[256];
    char transport[96];
    wstate state;
    int exit_code;
    bool finishing;
    int signals_seen;
    uv_signal_t sig_term, sig_int, sig_usr1, sig_usr2;
    uv_timer_t drain_timer;
    uv_timer_t dead_timer;
    uv_timer_t load_timer; /* re-sends LOAD when nothing changed for a while: keeps reports fresh */
    uint64_t load_sent_ms;
    uint64_t started_ms;
    uint64_t drain_started_ms;
    /* counters for /metrics */
    uint64_t requests_total, requests_ok, requests_error, tokens_total;
    uint64_t cancel_kill, cancel_stop, cancel_peer_lost, handed_back;
};

static void worker_finish(worker *w);
static void worker_finish_soon(worker *w);

static void set_state(worker *w, wstate s) {
    if (w->state == s) return;
    BT_INFO("worker %" PRIx64 ": %s -> %s", w->instance_id, wstate_names[w->state], wstate_names[s]);
    w->state = s;
}

/* ---- load reports ------------------------------------------------------------------------ */

static void fill_load(worker *w, bt_load_report *r) {
    bt_engine_load l;
    bt_engine_get_load(w->engine, &l);
    r->active_decode_blocks = l.active_decode_blocks;
    r->total_blocks = l.total_blocks;
    r->active_prefill_tokens = l.active_prefill_tokens;
    r->waiting = l.waiting;
    r->running = l.running;
    r->max_num_batched_tokens = l.max_num_batched_tokens;
    r->flags = w->state == W_READY ? BT_LOAD_READY : 0;
}

static void send_load(worker *w, peer *only) {
    bt_load_report r;
    if (!w->engine) return;
    fill_load(w, &r);
    if (!only) w->load_sent_ms = bt_now_ms();
    for (peer *p = w->peers; p; p = p->next) {
        if (only && p != only) continue;
        bt_buf *b = bt_rpc_wbuf(p->conn);
        if (b) bt_frame_put_load(b, &r);
    }
}

static void on_engine_load(void *ud) { send_load(ud, NULL); }

#define LOAD_REFRESH_MS 1000u /* frontends treat reports older than 3 s as stale */

static void on_load_timer(uv_timer_t *t) {
    worker *w = t->data;
    if (bt_now_ms() - w->load_sent_ms >= LOAD_REFRESH_MS) send_load(w, NULL);
}

/* ---- streams ----------------------------------------------------------------------------- */

static void stream_free(wstream *s) {
    peer *p = s->p;
    bt_map_del(&p->streams, s->id);
    p->w->nstreams--;
    free(s);
    if (p->w->state == W_DRAINING && p->w->nstreams == 0) worker_finish_soon(p->w);
}

static void on_seq_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t text_len) {
    wstream *s = ud;
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    s->tokens += (uint32_t)n;
    s->p->w->tokens_total += n;
    if (!b) return;
    /* a batch longer than one frame allows is split; text goes with the last piece */
    while (n > BT_TOKENS_MAX) {
        bt_frame_put_tokens(b, s->id, ids, BT_TOKENS_MAX, "", 0);
        ids += BT_TOKENS_MAX;
        n -= BT_TOKENS_MAX;
    }
    bt_frame_put_tokens(b, s->id, ids, n, text, text_len);
}

static void on_seq_finish(void *ud, bt_finish_reason reason, const bt_usage *u) {
    wstream *s = ud;
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    if (b) bt_frame_put_finish(b, s->id, (uint8_t)reason, u->prompt_tokens, u->completion_tokens);
    s->p->w->requests_ok++;
    BT_DEBUG("request %s finished (%s) after %u new tokens in %.1f ms", s->rid, bt_finish_reason_name(reason),
             s->tokens, (double)(bt_now_us() - s->t0_us) / 1000.0);
    stream_free(s);
}

static void on_seq_error(void *ud, bt_status code, const char *msg) {
    wstream *s = ud;
    bt_buf *b = bt_rpc_wbuf(s->p->conn);
    if (b) bt_frame_put_error(b, s->id, (uint16_t)code, msg);
    s->p->w->requests_error++;
    BT_WARN("request %s failed after %u tokens: %s", s->rid, s->tokens, msg);
    stream_free(s);
}

static const bt_engine_sink seq_sink = {on_seq_tokens, on_seq_finish, on_seq_error};

static void send_stream_error(peer *p, uint32_t id, bt_status code, const char *msg) {
    bt_buf *b = bt_rpc_wbuf(p->conn);
    if (b) bt_frame_put_error(b, id, (uint16_t)code, msg);
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
    return BT_OK;
}

static void handle_request(peer *p, uint32_t id, const bt_frame *f) {
    worker *w = p->w;
    char err[256] = "";
    json_error_t jerr;
    uint32_t *carried = NULL;
    json_t *root = NULL;
    wstream *s = NULL;
    bt_status st;

    w->requests_total++;
    if (bt_map_get(&p->streams, id)) {
        send_stream_error(p, id, BT_ERR_PROTOCOL, "stream id already in use");
        return;
    }
    if (w->state != W_READY) {
        send_stream_error(p, id, BT_ERR_DRAINING, "worker is draining");
        return;
    }
    root = json_loadb((const char *)f->payload, f->len, 0, &jerr);
    json_t *body = root ? json_object_get(root, "body") : NULL;
    json_t *jrid = root ? json_object_get(root, "request_id") : NULL;
    json_t *japi = root ? json_object_get(root, "api") : NULL;
    json_t *jcar = root ? json_object_get(root, "carried") : NULL;
    json_t *jmax = root ? json_object_get(root, "max_tokens") : NULL;
    if (!json_is_object(body) || !json_is_string(jrid) || !json_is_string(japi) ||
        (jcar && !json_is_array(jcar)) || (jmax && !json_is_integer(jmax))) {
        snprintf(err, sizeof err, "malformed request payload%s%s", root ? "" : ": ", root ? "" : jerr.text);
        st = BT_ERR_INVALID;
        goto fail;
    }
    bt_engine_request er = {0};
    er.request_id = json_string_value(jrid);
    er.api = strcmp(json_string_value(japi), "chat") == 0 ? BT_API_CHAT : BT_API_COMPLETION;
    er.body = body;
    size_t ncar = jcar ? json_array_size(jcar) : 0;
    if (ncar) {
        carried = malloc(ncar * sizeof *carried);
        if (!carried) {
            st = BT_ERR_NOMEM;
            snprintf(err, sizeof err, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < ncar; i++) {
            json_t *v = json_array_get(jcar, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX) {
                st = BT_ERR_INVALID;
                snprintf(err, sizeof err, "carried token %zu is not a token id", i);
                goto fail;
            }
            carried[i] = (uint32_t)json_integer_value(v);
        }
    }
    er.carried = carried;
    er.n_carried = (uint32_t)ncar;
    int64_t max_tokens = jmax ? json_integer_value(jmax) : w->o.mocker.default_max_tokens;
    if (max_tokens < 0) max_tokens = 0;
    er.max_tokens = max_tokens > UINT32_MAX ? UINT32_MAX : (uint32_t)max_tokens;
    st = sampling_from_body(body, &er, err, sizeof err);
    if (st != BT_OK) goto fail;

    s = calloc(1, sizeof *s);
    if (!s) {
        st = BT_ERR_NOMEM;
        snprintf(err, sizeof err, "out of memory");
        goto fail;
    }
    s->p = p;
    s->id = id;
    s->carried = (uint32_t)ncar;
    s->t0_us = bt_now_us();
    snprintf(s->rid, sizeof s->rid, "%s", er.request_id);
    st = bt_engine_submit(w->engine, &er, &seq_sink, s, &s->seq, err, sizeof err);
    if (st != BT_OK) goto fail;
    if (bt_map_put(&p->streams, id, s) != 0) {
        bt_engine_kill(w->engine, s->seq);
        st = BT_ERR_NOMEM;
        snprintf(err, sizeof err, "out of memory");
        goto fail;
    }
    w->nstreams++;
    BT_DEBUG("request %s accepted on stream %u (%zu carried tokens, max_tokens %u)", s->rid, id, ncar,
             er.max_tokens);
    free(carried);
    json_decref(root);
    return;

fail:
    w->requests_error++;
    BT_WARN("request on stream %u rejected: %s", id, err[0] ? err : bt_status_msg(st));
    send_stream_error(p, id, st, err[0] ? err : bt_status_msg(st));
    free(s);
    free(carried);
    json_decref(root);
}

static void kill_stream(worker *w, wstream *s, const char *why) {
    BT_INFO("request %s killed (%s) after %u new tokens (%u carried)", s->rid, why, s->tokens, s->carried);
    bt_engine_kill(w->engine, s->seq);
    stream_free(s);
}

static void on_peer_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    (void)c;
    peer *p = ud;
    worker *w = p->w;
    switch (f->type) {
    case BT_FRAME_REQUEST:
        handle_request(p, f->stream, f);
        break;
    case BT_FRAME_STOP: {
        wstream *s = bt_map_get(&p->streams, f->stream);
        if (s) {
            w->cancel_stop++;
            BT_INFO("request %s stopped by the frontend after %u new tokens", s->rid, s->tokens);
            bt_engine_stop(w->engine, s->seq);
        }
        break;
    }
    case BT_FRAME_KILL: {
        wstream *s = bt_map_get(&p->streams, f->stream);
        if (s) {
            w->cancel_kill++;
            kill_stream(w, s, "kill from the frontend");
        }
        break;
    }
    default:
        BT_DEBUG("ignoring %s frame from %s", bt_frame_type_name(f->type), bt_rpc_peer_name(p->conn));
    }
}

static void on_peer_open(void *ud, bt_rpc_conn *c) {
    worker *w = ud;
    peer *p = calloc(1, sizeof *p);
    if (!p) {
        bt_rpc_conn_close(c, BT_ERR_NOMEM, "out of memory");
        return;
    }
    p->kind = KIND_PEER;
    p->w = w;
    p->conn = c;
    bt_map_init(&p->streams);
    p->next = w->peers;
    if (w->peers) w->peers->prev = p;
    w->peers = p;
    w->npeers++;
    bt_rpc_set_ud(c, p);
    BT_INFO("frontend %s connected", bt_rpc_peer_name(c));
    send_load(w, p);
    if (w->state == W_DRAINING) {
        bt_buf *b = bt_rpc_wbuf(c);
        if (b) bt_frame_put_goaway(b, BT_ERR_DRAINING, "worker is draining");
    }
}

static void on_peer_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)c;
    if (*(int *)ud != KIND_PEER) return; /* closed before its handshake: nothing was created */
    peer *p = ud;
    worker *w = p->w;
    BT_INFO("frontend %s disconnected (%s): %zu of its streams stop", bt_rpc_peer_name(c), reason,
            p->streams.len);
    (void)why;
    uint64_t k;
    void *v;
    size_t it = 0;
    while (bt_map_next(&p->streams, &it, &k, &v)) {
        w->cancel_peer_lost++;
        kill_stream(w, v, "frontend connection lost");
        it = 0;
    }
    bt_map_free(&p->streams);
    if (p->prev) p->prev->next = p->next;
    else w->peers = p->next;
    if (p->next) p->next->prev = p->prev;
    w->npeers--;
    free(p);
}

static const bt_rpc_handlers peer_handlers = {on_peer_open, on_peer_frame, on_peer_close};

/* ---- drain and exit ---------------------------------------------------------------------- */

static void close_all(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void on_discovery_closed(void *ud) {
    worker *w = ud;
    set_state(w, W_GONE);
    /* every remaining handle (signals, timers, status server pieces) closes; the loop ends */
    uv_walk(w->loop, close_all, NULL);
}

static void on_status_closed(void *ud) {
    worker *w = ud;
    w->status = NULL;
    bt_discovery_close(w->disc, on_discovery_closed, w);
    w->disc = NULL;
}

/* Everything in flight is over (finished or handed back): close and let the loop end. */
static void worker_finish(worker *w) {
    if (w->finishing) return;
    w->finishing = true;
    uv_timer_stop(&w->drain_timer);
    BT_INFO("worker %" PRIx64 ": drained in %llu ms; closing (exit code %d)", w->instance_id,
            (unsigned long long)(bt_now_ms() - w->drain_started_ms), w->exit_code);
    if (w->listener) bt_rpc_listener_close(w->listener);
    w->listener = NULL;
    for (peer *p = w->peers; p; p = p->next) {
        bt_rpc_flush(p->conn);
        bt_rpc_conn_close(p->conn, BT_OK, "worker exiting");
    }
    bt_engine_destroy(w->engine);
    w->engine = NULL;
    if (w->status) bt_http_server_close(w->status, on_status_closed, w);
    else on_status_closed(w);
}

/* Ends every running stream with a migratable error so that frontends continue it elsewhere. */
static void hand_back_all(worker *w, const char *why) {
    for (peer *p = w->peers; p; p = p->next) {
        uint64_t k;
        void *v;
        size_t it = 0;
        while (bt_map_next(&p->streams, &it, &k, &v)) {
            wstream *s = v;
            BT_INFO("request %s handed back for migration after %u new tokens (%s)", s->rid, s->tokens, why);
            send_stream_error(p, s->id, BT_ERR_SHUTDOWN, "engine shutting down");
            bt_engine_kill(w->engine, s->seq);
            w->handed_back++;
            bt_map_del(&p->streams, k);
            w->nstreams--;
            free(s);
            it = 0;
        }
        bt_rpc_flush(p->conn);
    }
}

static void on_finish_timer(uv_timer_t *t) { worker_finish(t->data); }

/* Finishing destroys the engine, which must not happen inside one of its callbacks. */
static void worker_finish_soon(worker *w) {
    if (!w->finishing) uv_timer_start(&w->drain_timer, on_finish_timer, 0, 0);
}

static void on_drain_timeout(uv_timer_t *t) {
    worker *w = t->data;
    BT_WARN("graceful shutdown timeout (%llds) reached with %zu streams running; handing them back",
            (long long)w->o.graceful_timeout, w->nstreams);
    hand_back_all(w, "drain bound reached");
    worker_finish(w);
}

static void begin_drain(worker *w, const char *why, bool immediate) {
    if (w->state == W_DRAINING || w->state == W_GONE) return;
    w->drain_started_ms = bt_now_ms();
    BT_INFO("worker %" PRIx64 ": %s; unregistering from discovery, draining %zu streams", w->instance_id, why,
            w->nstreams);
    /* 1. out of discovery first, so no frontend picks this worker from now on */
    if (w->disc && w->key[0]) bt_discovery_delete(w->disc, w->key);
    set_state(w, W_DRAINING);
    /* 2. tell every connected frontend at once */
    for (peer *p = w->peers; p; p = p->next) {
        bt_buf *b = bt_rpc_wbuf(p->conn);
        if (b) bt_frame_put_goaway(b, BT_ERR_DRAINING, why);
    }
    send_load(w, NULL);
    for (peer *p = w->peers; p; p = p->next) bt_rpc_flush(p->conn);
    /* 3. let running streams finish, within the bound */
    if (immediate) hand_back_all(w, why);
    if (w->nstreams == 0) {
        worker_finish_soon(w);
        return;
    }
    uv_timer_start(&w->drain_timer, on_drain_timeout, (uint64_t)w->o.graceful_timeout * 1000, 0);
}

static void on_signal(uv_signal_t *h, int signum) {
    worker *w = h->data;
    if (signum == SIGUSR1 || signum == SIGUSR2) {
        if (!w->o.fault_signals || !w->engine || strcmp(w->o.engine, "mocker") != 0) return;
        BT_WARN("fault signal %s: %s", signum == SIGUSR1 ? "SIGUSR1" : "SIGUSR2",
                signum == SIGUSR1 ? "engine death" : "engine stall toggle");
        static bool stalled = false;
        if (signum == SIGUSR1) bt_mocker_inject(w->engine, BT_MOCKER_FAULT_DIE);
        else {
            stalled = !stalled;
            bt_mocker_inject(w->engine, stalled ? BT_MOCKER_FAULT_STALL : BT_MOCKER_FAULT_RESUME);
        }
        return;
    }
    if (++w->signals_seen > 1) {
        BT_WARN("second signal (%s): exiting at once", signum == SIGINT ? "SIGINT" : "SIGTERM");
        _exit(w->exit_code);
    }
    begin_drain(w, signum == SIGINT ? "SIGINT received" : "SIGTERM received", false);
}

static void on_engine_dead_timer(uv_timer_t *t) { begin_drain(t->data, "engine failed", true); }

/* Called by the engine from its own callback: the drain (which kills sequences) runs later. */
static void on_engine_dead(void *ud, const char *why) {
    worker *w = ud;
    BT_ERROR("engine failed: %s; shutting down (exit code 1)", why);
    w->exit_code = 1;
    uv_timer_start(&w->dead_timer, on_engine_dead_timer, 0, 0);
}

/* ---- status server (DYN_SYSTEM_PORT) ----------------------------------------------------- */

static void status_metrics(worker *w, bt_buf *b) {
    bt_engine_load l = {0};
    if (w->engine) bt_engine_get_load(w->engine, &l);
    const char *m = w->o.model_name;
    bt_buf_appendf(b, "# TYPE dynamo_component_requests_total counter\n"
                      "dynamo_component_requests_total{model=\"%s\"} %" PRIu64 "\n", m, w->requests_total);
    bt_buf_appendf(b, "# TYPE dynamo_component_errors_total counter\n"
                      "dynamo_component_errors_total{model=\"%s\"} %" PRIu64 "\n", m, w->requests_error);
    bt_buf_appendf(b, "# TYPE dynamo_component_inflight_requests gauge\n"
                      "dynamo_component_inflight_requests{model=\"%s\"} %zu\n", m, w->nstreams);
    bt_buf_appendf(b, "# TYPE dynamo_component_tokens_total counter\n"
                      "dynamo_component_tokens_total{model=\"%s\"} %" PRIu64 "\n", m, w->tokens_total);
    bt_buf_appendf(b, "# TYPE dynamo_component_cancellation_total counter\n"
                      "dynamo_component_cancellation_total{model=\"%s\",kind=\"kill\"} %" PRIu64 "\n"
                      "dynamo_component_cancellation_total{model=\"%s\",kind=\"stop\"} %" PRIu64 "\n"
                      "dynamo_component_cancellation_total{model=\"%s\",kind=\"frontend_lost\"} %" PRIu64 "\n",
                   m, w->cancel_kill, m, w->cancel_stop, m, w->cancel_peer_lost);
    bt_buf_appendf(b, "# TYPE baton_worker_handed_back_total counter\n"
                      "baton_worker_handed_back_total{model=\"%s\"} %" PRIu64 "\n", m, w->handed_back);
    bt_buf_appendf(b, "# TYPE baton_worker_active_sequences gauge\nbaton_worker_active_sequences %" PRIu64 "\n",
                   l.running + l.waiting);
    bt_buf_appendf(b, "# TYPE baton_worker_kv_active_blocks gauge\nbaton_worker_kv_active_blocks %" PRIu64 "\n",
                   l.active_decode_blocks);
    bt_buf_appendf(b, "# TYPE baton_worker_kv_total_blocks gauge\nbaton_worker_kv_total_blocks %" PRIu64 "\n",
                   l.total_blocks);
    bt_buf_appendf(b, "# TYPE baton_worker_waiting_requests gauge\nbaton_worker_waiting_requests %" PRIu64 "\n",
                   l.waiting);
    bt_buf_appendf(b, "# TYPE baton_worker_frontend_connections gauge\nbaton_worker_frontend_connections %zu\n",
                   w->npeers);
}

static void on_status_request(void *ud, bt_http_req *req) {
    worker *w = ud;
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    if (strcmp(req->path, "/metrics") == 0) {
        status_metrics(w, &b);
        bt_http_respond(req, 200, "text/plain; version=0.0.4", NULL, b.data ? b.data : "", b.len);
    } else if (strcmp(req->path, "/health") == 0 || strcmp(req->path, "/live") == 0) {
        bool ready = w->state == W_READY;
        uint64_t up = bt_now_ms() - w->started_ms;
        bt_buf_appendf(&b,
                       "{\"status\":\"%s\",\"uptime\":{\"secs\":%" PRIu64 ",\"nanos\":%" PRIu64
                       "},\"endpoints\":{\"%s\":\"%s\"},\"state\":\"%s\",\"instance_id\":%" PRIu64 "}",
                       ready ? "ready" : "notready", up / 1000, (up % 1000) * 1000000, w->o.ep,
                       ready ? "ready" : "notready", wstate_names[w->state], w->instance_id);
        bt_http_respond(req, ready ? 200 : 503, "application/json", NULL, b.data, b.len);
    } else {
        bt_http_respond(req, 404, "text/plain", NULL, "Route not found", 15);
    }
    bt_buf_free(&b);
}

static void on_status_abort(void *ud, bt_http_req *req) {
    (void)ud;
    (void)req;
}

/* ---- start-up ---------------------------------------------------------------------------- */

static bool parse_endpoint(wopts *o, char *err, size_t errlen) {
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

static int worker_run(worker *w) {
    char err[256];
    uv_loop_t *loop = w->loop;
    wopts *o = &w->o;
    w->started_ms = bt_now_ms();
    w->instance_id = bt_random64() & 0x7fffffffffffffffull;
    if (!w->instance_id) w->instance_id = 1;

    if (strcmp(o->engine, "mocker") != 0) {
        BT_ERROR("unknown engine '%s' (this build supports: mocker)", o->engine);
        return 2;
    }
    if (bt_mocker_config_check(&o->mocker, err, sizeof err) != BT_OK) {
        BT_ERROR("invalid mocker configuration: %s", err);
        return 2;
    }
    uv_timer_init(loop, &w->drain_timer);
    uv_timer_init(loop, &w->dead_timer);
    uv_timer_init(loop, &w->load_timer);
    w->drain_timer.data = w->dead_timer.data = w->load_timer.data = w;
    uv_timer_start(&w->load_timer, on_load_timer, LOAD_REFRESH_MS, LOAD_REFRESH_MS / 2);
    bt_engine_hooks hooks = {on_engine_load, on_engine_dead};
    w->engine = bt_mocker_create(loop, &o->mocker, &hooks, w);
    if (!w->engine) {
        BT_ERROR("cannot create the engine");
        return 1;
    }

    bt_rpc_config rc;
    bt_rpc_config_default(&rc, BT_ROLE_WORKER, w->instance_id);
    rc.dead_after_ms = (uint32_t)o->frontend_dead_after * 1000;
    if (bt_rpc_listen(loop, o->rpc_host, (int)o->rpc_port, &rc, &peer_handlers, w, &w->listener, err, sizeof err) !=
        BT_OK) {
        BT_ERROR("%s", err);
        return 1;
    }
    snprintf(w->transport, sizeof w->transport, "%s:%d", o->rpc_host, bt_rpc_listener_port(w->listener));

    if (o->system_port >= 0) {
        bt_http_config hc;
        bt_http_config_default(&hc);
        hc.host = o->system_host;
        hc.port = (int)o->system_port;
        bt_http_handlers hh = {on_status_request, on_status_abort, NULL};
        if (bt_http_server_start(loop, &hc, &hh, w, &w->status, err, sizeof err) != BT_OK) {
            BT_ERROR("status server (DYN_SYSTEM_PORT): %s", err);
            return 1;
        }
        BT_INFO("status server listening on %s:%d (/health, /live, /metrics)", o->system_host,
                bt_http_server_port(w->status));
    }

    bt_discovery_config dc;
    bt_discovery_config_default(&dc);
    dc.backend = o->discovery;
    if (o->discovery_dir) dc.dir = o->discovery_dir;
    dc.ttl_s = o->discovery_ttl;
    if (bt_discovery_create(loop, &dc, &w->disc, err, sizeof err) != BT_OK) {
        BT_ERROR("discovery: %s", err);
        return 1;
    }
    bt_discovery_instance_key(w->key, sizeof w->key, o->ns, o->component, o->ep, w->instance_id);
    json_t *card = json_object();
    json_object_set_new(card, "name", json_string(o->model_name));
    bt_engine_card(w->engine, card);
    json_t *val = json_pack("{s:s, s:s, s:s, s:s, s:I, s:{s:s}, s:o, s:i}", "type", "Endpoint", "namespace", o->ns,
                            "component", o->component, "endpoint", o->ep, "instance_id", (json_int_t)w->instance_id,
                            "transport", "tcp", w->transport, "model", card, "pid", (int)getpid());
    bt_status st = bt_discovery_put(w->disc, w->key, val);
    json_decref(val);
    if (st != BT_OK) {
        BT_ERROR("cannot register in discovery: %s", bt_status_msg(st));
        return 1;
    }

    uv_signal_init(loop, &w->sig_term);
    uv_signal_init(loop, &w->sig_int);
    uv_signal_init(loop, &w->sig_usr1);
    uv_signal_init(loop, &w->sig_usr2);
    w->sig_term.data = w->sig_int.data = w->sig_usr1.data = w->sig_usr2.data = w;
    uv_signal_start(&w->sig_term, on_signal, SIGTERM);
    uv_signal_start(&w->sig_int, on_signal, SIGINT);
    uv_signal_start(&w->sig_usr1, on_signal, SIGUSR1);
    uv_signal_start(&w->sig_usr2, on_signal, SIGUSR2);

    set_state(w, W_READY);
    BT_INFO("worker %" PRIx64 " serving model '%s' on %s (endpoint dyn://%s.%s.%s, discovery %s)", w->instance_id,
            o->model_name, w->transport, o->ns, o->component, o->ep, o->discovery);
    uv_run(loop, UV_RUN_DEFAULT);
    return w->exit_code;
}

int bt_worker_main(int argc, char **argv) {
    bt_log_init("worker");
    worker *w = calloc(1, sizeof *w);
    if (!w) return 1;
    w->kind = KIND_WORKER;
    wopts *o = &w->o;
    o->engine = "mocker";
    o->model_name = "mock-model";
    o->endpoint = "dyn://dynamo.backend.generate";
    o->rpc_host = "127.0.0.1";
    o->rpc_port = 0;
    o->discovery = "file";
    o->discovery_dir = NULL;
    o->discovery_ttl = 10;
    o->graceful_timeout = 30;
    o->system_port = 9090;
    o->system_host = "0.0.0.0";
    o->frontend_dead_after = 5;
    bt_mocker_config_default(&o->mocker);
    const char *ns_env = getenv("DYN_NAMESPACE");
    static char ep_default[160];
    if (ns_env && *ns_env) {
        snprintf(ep_default, sizeof ep_default, "dyn://%s.backend.generate", ns_env);
        o->endpoint = ep_default;
    }

    const bt_opt opts[] = {
        {"--engine", "DYN_ENGINE", BT_OPT_STR, &o->engine, 0, 0, "mocker"},
        {"--model-name", "DYN_MODEL_NAME", BT_OPT_STR, &o->model_name, 0, 0, "model name served"},
        {"--endpoint", "DYN_ENDPOINT", BT_OPT_STR, &o->endpoint, 0, 0, "dyn://namespace.component.endpoint"},
        {"--rpc-host", "DYN_TCP_RPC_HOST", BT_OPT_STR, &o->rpc_host, 0, 0, "request-plane listen address"},
        {"--rpc-port", "DYN_TCP_RPC_PORT", BT_OPT_INT, &o->rpc_port, 0, 65535, "request-plane port (0 = any)"},
        {"--discovery", "DYN_DISCOVERY_BACKEND", BT_OPT_STR, &o->discovery, 0, 0, "file"},
        {"--discovery-dir", "DYN_FILE_KV", BT_OPT_STR, &o->discovery_dir, 0, 0, "file discovery directory"},
        {"--discovery-ttl", "DYN_DISCOVERY_TTL", BT_OPT_INT, &o->discovery_ttl, 1, 3600, "seconds"},
        {"--graceful-shutdown-timeout", "DYN_GRACEFUL_SHUTDOWN_TIMEOUT", BT_OPT_INT, &o->graceful_timeout, 0, 86400,
         "seconds of drain before streams are handed back"},
        {"--system-port", "DYN_SYSTEM_PORT", BT_OPT_INT, &o->system_port, -1, 65535,
         "status server port (-1 off, 0 any)"},
        {"--system-host", "DYN_SYSTEM_HOST", BT_OPT_STR, &o->system_host, 0, 0, "status server address"},
        {"--frontend-dead-after", "DYN_FRONTEND_DEAD_AFTER", BT_OPT_INT, &o->frontend_dead_after, 1, 3600,
         "seconds of silence before a frontend connection is dropped"},
        {"--fault-signals", "DYN_FAULT_SIGNALS", BT_OPT_BOOL, &o->fault_signals, 0, 0,
         "SIGUSR1 kills the engine, SIGUSR2 toggles a stall (tests)"},
        {"--num-gpu-blocks-override", NULL, BT_OPT_INT, &o->mocker.num_gpu_blocks, 1, 1e9, "mocker KV blocks"},
        {"--block-size", NULL, BT_OPT_INT, &o->mocker.block_size, 2, 1e6, "mocker tokens per block"},
        {"--max-num-seqs", NULL, BT_OPT_INT, &o->mocker.max_num_seqs, 1, 1e7, "mocker max sequences"},
        {"--max-num-batched-tokens", NULL, BT_OPT_INT, &o->mocker.max_num_batched_tokens, 1, 1e9,
         "mocker tokens per step"},
        {"--watermark", NULL, BT_OPT_DOUBLE, &o->mocker.watermark, 0, 0.99, "mocker KV watermark"},
        {"--speedup-ratio", "DYN_SPEEDUP_RATIO", BT_OPT_DOUBLE, &o->mocker.speedup_ratio, 1e-6, 1e9,
         "mocker time scale"},
        {"--default-max-tokens", NULL, BT_OPT_INT, &o->mocker.default_max_tokens, 0, 1e7,
         "max_tokens when a request sets none"},
        {"--fault-die-after-tokens", NULL, BT_OPT_INT, &o->mocker.fault_die_after_tokens, 0, 1e15, "test hook"},
        {"--fault-stall-after-tokens", NULL, BT_OPT_INT, &o->mocker.fault_stall_after_tokens, 0, 1e15, "test hook"},
        {"--fault-error-after-tokens", NULL, BT_OPT_INT, &o->mocker.fault_error_after_tokens, 0, 1e15, "test hook"},
    };
    int nopts = (int)(sizeof opts / sizeof opts[0]);
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            bt_opts_usage("worker", opts, nopts);
            free(w);
            return 0;
        }
    char err[256];
    if (!bt_opts_parse(opts, nopts, argc, argv, 1, NULL, 0, NULL, err, sizeof err) ||
        !parse_endpoint(o, err, sizeof err)) {
        fprintf(stderr, "baton worker: %s\n", err);
        free(w);
        return 2;
    }
    if (strcmp(o->discovery, "file") != 0 && strcmp(o->discovery, "etcd") != 0) {
        fprintf(stderr, "baton worker: unknown --discovery '%s' (file or etcd)\n", o->discovery);
        free(w);
        return 2;
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    w->loop = &loop;
    int rc = worker_run(w);
    if (rc != 0 && w->state != W_GONE) {
        /* start-up failed: release what was made and let the loop wind down */
        if (w->disc) bt_discovery_close(w->disc, NULL, NULL);
        w->disc = NULL;
        bt_engine_destroy(w->engine);
        w->engine = NULL;
        uv_walk(&loop, close_all, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
    }
    uv_loop_close(&loop);
    free(w);
    return rc;
}
