/* worker_internal.h — the worker's internal types, shared by its modules (not a public interface).
 *
 *   worker.c   process: options, start-up, frontend connections, streams, load reports
 *   drain.c    shutdown: signals, unregister → GOAWAY → bounded drain → hand-back → exit;
 *              the engine-failure path (exit 1)
 *   status.c   the status server on DYN_SYSTEM_PORT: /health, /live, /metrics
 *   canary.c   canary health checks (endpoint ready / not ready) and the engine monitor that
 *              declares a stuck engine failed
 *   orphan.c   streams whose frontend's connection ended, kept for --orphan-grace so that a
 *              frontend resuming the request re-attaches to them (no re-prefill)
 *   handoff.c  the KV hand-off: a stream given back travels with its exported KV state, and a
 *              continuation that brings one imports it instead of prefilling
 *
 * Everything runs on the worker's one libuv loop. Symbols shared between these files carry the
 * wk_ prefix; everything else is static. */
#ifndef BATON_WORKER_INTERNAL_H
#define BATON_WORKER_INTERNAL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>
#include <uv.h>

#include "common/cancel.h"
#include "common/map.h"
#include "common/metrics.h"
#include "common/proc.h"
#include "discovery/discovery.h"
#include "engine/engine.h"
#include "engine/mocker/mocker.h"
#include "engine/llama/llama.h"
#include "engine/openai/openai.h"
#include "events/events.h"
#include "http/http.h"
#include "rpc/conn.h"

/* Lifecycle, changed only through wk_set_state (which logs the transition). */
typedef enum { WK_REGISTERING, WK_READY, WK_DRAINING, WK_GONE } wk_state;

typedef struct wk_worker wk_worker;

/* What became of orphans (baton_worker_orphan_events_total{event}). */
typedef enum {
    WK_ORPHAN_EV_ORPHANED, /* a stream's frontend connection ended and the stream was kept */
    WK_ORPHAN_EV_ADOPTED,  /* re-attached by a frontend */
    WK_ORPHAN_EV_EXPIRED,  /* its grace ended with no adopter */
    WK_ORPHAN_EV_PREEMPTED, /* killed to make room for a request that would have queued */
    WK_ORPHAN_EV_OVERFLOW, /* its history outgrew WK_ORPHAN_HISTORY_MAX */
    WK_ORPHAN_EV_MISMATCH, /* an adopter's tokens or position did not match: ran as a continuation */
    WK_ORPHAN_EV_DRAINED,  /* the worker began draining */
    WK_ORPHAN_EV_FAILED,   /* the engine failed the sequence while orphaned */
    WK_ORPHAN_EV_SUPERSEDED, /* taken from a frontend still attached to it by an adopter */
    WK_ORPHAN_EV_RECLAIMED, /* its frontend connected again: that frontend lived, and went on without it */
    WK_ORPHAN_EV_N_
} wk_orphan_event;

#define WK_ORPHAN_HISTORY_MAX (1u << 20) /* bytes of history per adoptable stream */
typedef struct wk_peer wk_peer;
typedef struct wk_handoff wk_handoff; /* handoff.c */
typedef struct wk_kv_in wk_kv_in;     /* handoff.c */

/* What an adoptable stream produced on this worker (orphan.c): every TOKENS batch, so that an
 * adopting frontend can be sent what it lacks from any batch boundary on. Bounded by
 * WK_ORPHAN_HISTORY_MAX bytes; past it the stream stops being adoptable. */
typedef struct {
    uint32_t *ids;
    uint32_t nids, cap_ids;
    char *text;
    uint32_t text_len, cap_text;
    struct wk_hframe {
        uint32_t tok, text; /* the batch ends after this many ids and bytes of text */
    } *fr;
    uint32_t nfr, cap_fr;
} wk_history;

/* One request-plane stream: one engine sequence. An orphan (its frontend's connection ended, it
 * had a stream_key and --orphan-grace is on) has p == NULL and sits on the worker's orphan list
 * until a frontend adopts it, its grace ends or capacity is needed. */
typedef struct wk_stream {
    wk_worker *w;
    wk_peer *p;
    uint32_t id;
    bt_engine_seq *seq;
    uint32_t tokens; /* tokens sent on this attempt */
    uint32_t carried;
     uint64_t t0_us;
    char rid[72];
    /* Cancellation: a child of its peer's context. Its callback stops or kills the engine
     * sequence (worker.c); a kill also frees the stream. */
    bt_ctx *ctx;
    uint64_t t_kill_us; /* when the KILL frame arrived (0 = none) */
    bool ignored_kill;  /* --fault-ignore-kill: killed for the frontend, left running in the engine */
    /* Its engine told a wait (bt_engine_sink.on_wait) and no token came since: 1 + its BT_WAIT_*
     * reason, 0 when not waiting. An adopting frontend is told too (orphan.c). */
    uint8_t waiting;
    /* orphan.c */
    char key[33];     /* the REQUEST's stream_key: "" = never orphaned */
    wk_history hist;  /* kept while key is set */
    bool orphaned;    /* p == NULL, on w->orphans */
    bool done;        /* the engine finished it while orphaned: fin_* below, seq is gone */
    bool overflow;    /* an orphan whose history outgrew its cap: ended by the orphan timer */
    uint8_t fin_reason;
    uint32_t fin_prompt, fin_completion;
    bool fin_unreported; /* the usage was not the engine's upstream's (bt_usage.unreported) */
    uint64_t orphan_deadline_ms;
    uint64_t origin; /* instance id of the frontend whose connection it outlived */
    TAILQ_ENTRY(wk_stream) olink; /* w->orphans, oldest first */
} wk_stream;

/* Both the worker and a peer serve as a connection's user data (before and after the
 * handshake); the first member tells them apart. */
enum { WK_KIND_WORKER = 1, WK_KIND_PEER = 2 };

/* One connected frontend. */
struct wk_peer {
    int kind;
    wk_worker *w;
    bt_rpc_conn *conn;
     bt_map streams; /* stream id → wk_stream */
    bt_ctx *ctx;    /* parent of its streams' contexts: killed when the connection is lost */
    bool lost;      /* the connection ended: kills count as frontend_lost */
    /* KV states arriving ahead of their REQUESTs (handoff.c), at most BT_KV_INFLIGHT at a time
     * (the frontend relays that many to one connection at once); NULL slots are free */
    wk_kv_in *kvin[BT_KV_INFLIGHT];
    LIST_ENTRY(wk_peer) link; /* wk_worker.peers */
};

typedef struct {
    const char *engine;
    const char *model_name;
    const char *endpoint;
    const char *namespace_name; /* --namespace / DYN_NAMESPACE: the namespace of the default endpoint */
    const char *rpc_host;
    int64_t rpc_port;
    bt_proc_opts p; /* discovery, event plane, request-plane secret */
    int64_t discovery_ttl;
    int64_t graceful_timeout; /* seconds of drain before the rest is handed back */
    int64_t system_port;      /* -1 off, 0 any */
    const char *system_host;
    const char *allowed_hosts; /* --allowed-hosts: the status server's Host names (http.h: bt_http_host_allowed) */
    const char *health_path; /* DYN_SYSTEM_HEALTH_PATH */
    const char *live_path;   /* DYN_SYSTEM_LIVE_PATH */
    const char *starting_health; /* DYN_SYSTEM_STARTING_HEALTH_STATUS: "ready" or "notready" */
    const char *endpoint_health; /* DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS: JSON list of endpoint names */
    int64_t frontend_dead_after;
    double orphan_grace; /* seconds an orphaned stream is kept for re-attachment; 0 = kill at once */
    bool kv_handoff;     /* --kv-handoff: streams given back carry their KV state */
    bool rebalance_endpoint; /* --rebalance-endpoint: POST /rebalance on the status server */
    char *rpc_secret; /* loaded at start-up; NULL = frontends need no secret */
    bool fault_signals;
    bool fault_ignore_kill; /* test hook: a KILL frame does not reach the engine */
    /* canary and engine monitor */
    bool canary_enabled;         /* DYN_HEALTH_CHECK_ENABLED */
    double canary_wait;          /* DYN_CANARY_WAIT_TIME, seconds */
    double canary_timeout;       /* DYN_HEALTH_CHECK_REQUEST_TIMEOUT, seconds */
    const char *canary_payload;  /* DYN_HEALTH_CHECK_PAYLOAD: inline JSON or @file */
    double engine_stuck_timeout; /* seconds without progress while busy → engine failed; 0 = off */
    bt_mocker_config mocker;
    bt_openai_config openai; /* --engine openai: the upstream server */
    bt_llama_config llama;   /* --engine llama: llama.cpp in process */
    /* derived */
    char ns[64], component[64], ep[64];
    bool starting_ready; /* /health is ready until the endpoint is first ready (wk_health_config) */
    bool health_listed;  /* the endpoint list names this worker's endpoint: its readiness rules /health */
} wk_opts;

/* Canary state (canary.c). */
typedef struct {
    json_t *body;        /* the request body sent to the engine (owned) */
    bt_api api;
    bool ready;          /* the endpoint's health: true when the last canary succeeded */
    bool in_flight;      /* a canary sequence is in the engine */
    bool answered;       /* ... and has produced its first token */
    bool timed_out;      /* ... and missed its deadline (a late token still counts as success) */
    bt_engine_seq *seq;
    uint64_t sent_us;
    uint64_t seq_no;
    uv_timer_t idle_timer;    /* fires after canary_wait seconds without a completed request */
    uv_timer_t timeout_timer; /* fires when the canary's first token is late */
    uv_timer_t monitor_timer; /* the engine monitor's periodic check */
    bool timers_inited;
    uint64_t n_success, n_timeout, n_error, n_empty, n_late;
    double last_latency_ms;
} wk_canary;

/* What the drain saw (drain.c), logged in one summary line and exported in /metrics. */
typedef struct {
    uint64_t started_us;      /* when the drain began (0 = not draining) */
    uint64_t last_request_us; /* arrival of the last REQUEST after the drain began (0 = none) */
    uint64_t refused;         /* REQUESTs refused with BT_ERR_DRAINING */
    size_t streams_at_start;
    uint64_t ok_at_start; /* requests_ok when the drain began */
    uint64_t handed_back;
    uint64_t handback_us; /* when the streams were handed back (0 = none were) */
} wk_drain_stats;

struct wk_worker {
    int kind;
    uv_loop_t *loop;
    wk_opts o;
    bt_engine *engine;
    /* The engine's exactness fingerprint from its model card ("" = none): a continuation whose
     * carried tokens name another is refused (docs/engines.md §3.4). */
    char exactness[256];
    bt_mocker_config mocker_defaults; /* to tell which shared scheduler flags were given */
    bt_discovery *disc;
    bt_rpc_listener *listener;
    bt_http_server *status;
    bt_events *events; /* the NATS event plane (load reports), NULL for direct */
    LIST_HEAD(, wk_peer) peers;
    size_t npeers; /* peers whose handshake is done */
    bt_map conns; /* every accepted connection (key: pointer), handshake done or not */
    size_t nstreams;
    uint64_t instance_id;
    char key[256];
    char transport[96];
    wk_state state;
    int exit_code;
    bool was_ready; /* wk_ready has held once: the starting health status no longer applies */
    bool finishing;
    bool engine_failed;
    bool engine_unserving; /* the engine said it cannot serve for now (bt_engine_hooks.on_serving) */
    char engine_failure[160];
    int signals_seen;
    bool stalled; /* fault signal SIGUSR2 toggles */
    bool slowed;  /* fault signal SIGWINCH toggles (the mocker's slow fault) */
    bt_proc_signals sigs;  /* stop and user signals (bt_proc_signals_start) */
    uv_signal_t sig_winch; /* the mocker's slow fault, with --fault-signals */
    bt_proc_closer closer; /* closes discovery and the event plane at the end */
    uv_timer_t drain_timer;
    uv_timer_t dead_timer;
    uv_timer_t load_timer; /* re-sends LOAD when nothing changed for a while: keeps reports fresh */
    uint64_t load_sent_ms;
    uint64_t started_ms;
    uint64_t progress_ms; /* last time the engine showed progress, or went from idle to busy */
    wk_canary canary;
    wk_drain_stats drain;
    /* orphan.c */
    TAILQ_HEAD(, wk_stream) orphans; /* oldest first */
    size_t norphans;
    uv_timer_t orphan_timer; /* fires at the oldest orphan's deadline */
    uint64_t orphan_events[WK_ORPHAN_EV_N_];
    uint64_t engine_submits; /* sequences submitted to the engine: each one prefills */
    /* counters for /metrics */
    uint64_t requests_total, requests_ok, requests_error, tokens_total;
    uint64_t cancel_kill, cancel_stop, cancel_peer_lost;
    /* KILL frame arrival → engine drop, seconds, over wk_cancel_buckets (status.c collects it) */
    bt_hist cancel_lat;
    /* handoff.c */
    LIST_HEAD(, wk_handoff) handoffs;
    size_t nhandoffs;
    uv_timer_t handoff_timer;      /* paces KVSTATE pieces */
    uv_timer_t handoff_wait_timer; /* bounds an exiting worker's wait for its hand-offs */
    void (*handoff_idle)(wk_worker *w);
    uint64_t kv_sent;    /* states sent to a frontend with their stream */
    uint64_t kv_missing; /* announced states that did not arrive whole (fallback "missing") */
    uint64_t rebalanced; /* streams moved off by the operator's rebalance */
};

/* status.c: the buckets of baton_worker_cancel_latency_seconds (wk_worker.cancel_lat) */
extern const bt_hist_buckets wk_cancel_buckets;

/* worker.c */
void wk_set_state(wk_worker *w, wk_state s);
const char *wk_state_name(wk_state s);
/* Sends a LOAD snapshot to every peer (only == NULL) or to one. */
void wk_send_load(wk_worker *w, wk_peer *only);
void wk_send_stream_error(wk_peer *p, uint32_t id, bt_status code, const char *msg);
/* Tells s's frontend that its engine keeps it waiting (a WAITING frame), when that frontend's HELLO
 * announced BT_HELLO_WAITING (an older one would reject the frame type). */
void wk_send_waiting(wk_stream *s, uint8_t reason);
/* Removes a stream from its peer and frees it (the engine sequence must be over or killed). */
void wk_stream_free(wk_stream *s);
/* The first stream attached to a frontend that match accepts (any, with match NULL), and its peer
 * in *peer; NULL when there is none. A caller that ends or detaches streams in a loop calls it again
 * after each one: a peer's table cannot change under its iterator. */
wk_stream *wk_find_stream(wk_worker *w, bool (*match)(const wk_stream *s, const void *ud), const void *ud,
                          wk_peer **peer);
/* True when new work may be routed here: serving, not draining, endpoint healthy. The endpoint's
 * readiness, as /health reports it under "endpoints". */
bool wk_ready(const wk_worker *w);

/* handoff.c */
void wk_handoff_init(wk_worker *w);
/* Gives stream s back to its frontend with the migratable `code`: its KV state first (when
 * --kv-handoff and the engine exports one), then the ERROR. The engine sequence ends here (the
 * caller frees s without killing it). */
void wk_handoff_give_back(wk_stream *s, bt_status code, const char *msg);
/* A KVSTATE frame from peer p. */
void wk_handoff_piece(wk_peer *p, const bt_frame *f);
/* The whole state of `bytes` bytes received for `stream` (malloc'd, the caller frees it), or NULL
 * (counted as the fallback "missing"). */
uint8_t *wk_handoff_take(wk_peer *p, uint32_t stream, uint64_t bytes);
/* A KILL for a stream that is not open: a state arriving for it is dropped (its frontend gave up
 * on the continuation before writing the REQUEST). */
void wk_handoff_forget(wk_peer *p, uint32_t stream);
/* p's connection ended: its hand-offs are dropped. */
void wk_handoff_peer_gone(wk_peer *p);
/* When hand-offs are still being exported or sent: fn runs when they are done (or after a bound)
 * and true is returned; otherwise false and fn is not called. */
bool wk_handoff_when_idle(wk_worker *w, void (*fn)(wk_worker *w));
/* Moves up to n running streams off this worker (the operator's rebalance): each is given back
 * with BT_ERR_MOVED and its KV state, and its frontend continues it on another worker. Returns how
 * many were moved (none while not ready: a draining worker gives back everything anyway). */
size_t wk_handoff_rebalance(wk_worker *w, size_t n);
/* The hand-off and prefill counters, for /metrics. */
void wk_handoff_collect(wk_worker *w, bt_metrics *r);

/* orphan.c */
void wk_orphan_init(wk_worker *w);
/* Records a batch into an adoptable stream's history; false when it outgrew its cap (the history
 * is dropped and the stream is no longer adoptable). */
bool wk_history_add(wk_stream *s, const uint32_t *ids, size_t n, const char *text, size_t len);
void wk_history_free(wk_history *h);
/* The stream's connection ended: true if s became an orphan (it is off its peer), false if the
 * caller must kill it. */
bool wk_orphan_keep(wk_worker *w, wk_stream *s);
/* Ends orphan s from the orphan timer, outside the engine callback that found it useless. */
void wk_orphan_end_soon(wk_worker *w, wk_stream *s);
/* An orphan's engine sequence finished or failed (from the engine sink). */
void wk_orphan_finished(wk_stream *s, uint8_t reason, const bt_usage *u);
/* A REQUEST with adopt: the orphan of key, taken off the orphan list, when it continues exactly
 * after the carried tokens; *from_batch is the first batch of its history the adopter lacks. The
 * caller files it under its new peer and stream, then calls wk_orphan_replay. NULL: there was no
 * usable orphan (an unusable one is killed); the payload runs as an ordinary continuation. */
wk_stream *wk_orphan_take(wk_worker *w, const char *key, const char *rid, const uint32_t *carried, size_t ncarried,
                          uint32_t *from_batch);
/* Sends an adopted stream's batches from from_batch on, then its FINISH if it had finished (the
 * stream is then freed). */
void wk_orphan_replay(wk_stream *s, uint32_t from_batch);
/* A new sequence is about to be submitted: kills live orphans, oldest first, while the engine
 * would make it wait. */
void wk_orphan_make_room(wk_worker *w);
/* A frontend connected: orphans its earlier connections left are ended. That frontend is alive
 * (it dropped the connection itself, e.g. declaring this worker dead while it was stopped, and
 * continued those streams elsewhere), so nobody will adopt them. */
void wk_orphan_reclaim(wk_worker *w, uint64_t frontend_instance);
/* Kills every orphan (drain, exit), counting them under ev. */
void wk_orphan_kill_all(wk_worker *w, wk_orphan_event ev);
/* Appends the orphan metrics to a /metrics body. */
void wk_orphan_collect(const wk_worker *w, bt_metrics *r); /* status.c collects it */

/* drain.c */
void wk_drain_init(wk_worker *w);
/* Starts the shutdown sequence. immediate: hand every stream back at once (engine failure). */
void wk_drain_begin(wk_worker *w, const char *why, bool immediate);
/* A REQUEST arrived while draining (it is refused). */
void wk_drain_note_refused(wk_worker *w);
/* A stream ended while draining: finishes the drain when it was the last. */
void wk_drain_stream_ended(wk_worker *w);
/* The engine failed (engine hook, engine monitor): shutdown with hand-back, exit code 1. Safe to
 * call from inside an engine callback. */
void wk_engine_failed(wk_worker *w, const char *why);
void wk_engine_dead_hook(void *ud, const char *why);

/* status.c */
/* Checks DYN_SYSTEM_STARTING_HEALTH_STATUS and DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS (after the
 * endpoint is parsed) and sets starting_ready and health_listed; false with a message naming the
 * variable on a bad value. */
bool wk_health_config(wk_opts *o, char *err, size_t errlen);
/* What /health answers: true for 200 "ready" (docs/operations.md, "Worker status server"). */
bool wk_health_ready(const wk_worker *w);
bt_status wk_status_start(wk_worker *w, char *err, size_t errlen);
/* Closes the status server (if any) and then calls done(w). */
void wk_status_close(wk_worker *w, void (*done)(void *ud));

/* canary.c */
/* Builds the canary's payload when canaries are on or a payload is given (once: a later call
 * keeps it); false with a message on error. Called with the arguments' checks, before anything
 * starts; free it with wk_canary_free. */
bool wk_canary_load(wk_worker *w, char *err, size_t errlen);
/* Validates the canary options and builds its payload; false with a message on error. */
bool wk_canary_init(wk_worker *w, char *err, size_t errlen);
/* The FINISH reason to put on the wire to the frontend of c (worker.c): what it understands. */
uint8_t wk_wire_finish(bt_rpc_conn *c, bt_finish_reason reason);
uint8_t wk_wire_finish_flags(bt_rpc_conn *c, bool usage_unreported);

/* Starts canaries (the first one at once) and the engine monitor; call when the worker is ready. */
void wk_canary_start(wk_worker *w);
/* Stops canaries and the monitor and drops an in-flight canary (drain, exit). */
void wk_canary_stop(wk_worker *w);
void wk_canary_free(wk_worker *w);
/* A request completed normally: the engine works, the idle wait restarts. */
void wk_canary_activity(wk_worker *w);
/* The engine produced output for some sequence (the monitor's notion of progress). */
void wk_monitor_progress(wk_worker *w);
/* A sequence is about to be submitted: an idle engine becomes busy now. */
void wk_monitor_busy(wk_worker *w);

#endif
