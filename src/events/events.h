/* events.h — the event plane: worker load reports carried to every frontend.
 *
 * Two planes exist. `direct` (the default) needs nothing here: workers push LOAD frames on each
 * request-plane connection. `nats` publishes the same report as Dynamo's `ActiveLoad` JSON on the
 * subject `namespace.{ns}.kv_metrics` through a NATS server, so that a frontend learns the load of
 * every worker from one subscription. A worker publishes (bt_events_publish_load), a frontend
 * subscribes (bt_events_subscribe_load); the request-plane LOAD frames keep flowing in both modes,
 * which is what shedding falls back to while NATS is unreachable.
 *
 * Resilience contract of the nats plane: creating it never waits for the server and never fails
 * because the server is down; the client connects, and reconnects after any loss, in the
 * background, forever, with backoff. While disconnected, publishes are dropped (a load report is
 * only worth its latest value; the next change or the periodic refresh sends a fresh one) and
 * counted. Nothing here blocks the loop: NATS socket I/O runs on the caller's libuv loop, the
 * connect and close handshakes run on the libuv thread pool, and received messages reach the
 * loop through a bounded queue and uv_async_send.
 *
 * Ownership: bt_events_create() gives the caller an object (or NULL for the direct plane); every
 * function accepts NULL and then does nothing. bt_events_close() ends it asynchronously and calls
 * `done` on the loop once every handle is closed; the object must not be used after the call. */
#ifndef BATON_EVENTS_H
#define BATON_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/metrics.h"
#include "common/status.h"
#include "proto/proto.h"

typedef struct bt_events bt_events;

typedef struct {
    const char *plane;       /* "direct" or "nats" (DYN_EVENT_PLANE) */
    const char *nats_server; /* NATS_SERVER: one or more comma-separated nats:// (or tls://) URLs */
    const char *ns;          /* namespace: the subject is namespace.{ns}.kv_metrics */
    const char *name;        /* client name shown by the server (e.g. "baton-worker-1a2b") */
    /* Authentication, in Dynamo's priority order; NULL or "" = not set. Filled from
     * NATS_AUTH_USERNAME / NATS_AUTH_PASSWORD, NATS_AUTH_TOKEN, NATS_AUTH_NKEY (a user nkey
     * seed, "SU…"), NATS_AUTH_CREDENTIALS_FILE by bt_events_config_default(). */
    const char *user, *password, *token, *nkey, *creds_file;
    /* TLS, NULL = not set: a PEM CA bundle to trust instead of OpenSSL's default store
     * (--nats-tls-ca), and a client certificate with its key for a server that verifies clients
     * (--nats-tls-cert / --nats-tls-key, both or neither). Either makes the connection TLS even
     * at a nats:// URL. */
    const char *tls_ca, *tls_cert, *tls_key;
    uint32_t debounce_ms;        /* publisher: at most one message per this many ms (1–5) */
    uint32_t reconnect_min_ms;   /* first reconnect delay; doubles per failed round */
    uint32_t reconnect_max_ms;   /* cap of the reconnect delay */
    uint32_t connect_timeout_ms; /* per attempt (runs off the loop) */
    uint32_t ping_interval_ms;   /* a silent server is declared lost after 2 unanswered pings */
    size_t max_pending_bytes;    /* publisher: unsent bytes above this drop new reports */
    size_t max_queued_msgs;      /* subscriber: received reports waiting for the loop */
} bt_events_config;

/* Defaults: plane "direct", nats://localhost:4222, namespace "dynamo", debounce 2 ms, reconnect
 * 100 ms doubling to 2 s, connect timeout 2 s, ping 5 s, 256 KiB pending, 4096 queued; the auth
 * fields from the environment. */
void bt_events_config_default(bt_events_config *c);

/* True when every comma-separated element of `s` (NATS_SERVER, --nats-server) is a nats:// or
 * tls:// URL with something after the scheme (Dynamo requires nats://; tls:// is what nats.c takes
 * for a TLS server); else false with the reason in err. bt_events_create checks it too. */
bool bt_events_urls_ok(const char *s, char *err, size_t errlen);

/* Validates the configuration and, for the nats plane, starts connecting in the background.
 * *out is NULL for the direct plane. Errors (unknown plane, a URL that is not nats://, a
 * malformed nkey seed when it is the credential in use) go to err. */
bt_status bt_events_create(uv_loop_t *loop, const bt_events_config *c, bt_events **out, char *err, size_t errlen);

/* Publisher: the latest load of worker `worker_id`. Sent after the debounce interval; a newer
 * report given meanwhile replaces the pending one. */
void bt_events_publish_load(bt_events *e, uint64_t worker_id, const bt_load_report *r);

/* Subscriber: called on the loop for every valid report received. */
typedef void (*bt_events_load_cb)(void *ud, uint64_t worker_id, const bt_load_report *r);
/* Subscribes to namespace.{ns}.kv_metrics. Call once, right after bt_events_create(). */
bt_status bt_events_subscribe_load(bt_events *e, bt_events_load_cb cb, void *ud);

typedef struct {
    bool connected;      /* a NATS connection is up right now */
    uint64_t connects;   /* successful connects, the first one included */
    uint64_t disconnects;
    uint64_t published;  /* messages handed to the connection */
    uint64_t dropped;    /* reports not sent: disconnected, or the pending cap was hit */
    uint64_t received;   /* valid reports delivered to the callback */
    uint64_t invalid;    /* messages on the subject that were not a valid ActiveLoad */
    uint64_t overflow;   /* messages dropped because the loop's queue was full */
} bt_events_stats;

/* Zeroes *s for NULL. */
void bt_events_get_stats(const bt_events *e, bt_events_stats *s);
/* "direct" for NULL, else the plane's name. */
const char *bt_events_plane(const bt_events *e);
/* Adds <prefix>_event_plane_connected{plane} (a gauge; merged by minimum: connected only if every
 * part is) and <prefix>_event_plane_connects_total from s (bt_events_get_stats of e) to r. */
void bt_events_collect(const bt_events *e, const bt_events_stats *s, bt_metrics *r, const char *prefix);

/* Ends the connection (a pending debounced report is sent first when connected) and calls
 * done(ud) on the loop when everything is released. done may be NULL. */
void bt_events_close(bt_events *e, void (*done)(void *ud), void *ud);

/* ---- the ActiveLoad payload (pure functions, unit-tested) ---- */

/* Writes the JSON payload for a report into buf (NUL-terminated). Returns its length, or 0 if
 * cap is too small. Fields: worker_id, dp_rank (0), active_decode_blocks, active_prefill_tokens,
 * then baton's total_blocks, waiting, running, max_num_batched_tokens, ready. */
size_t bt_events_encode_load(char *buf, size_t cap, uint64_t worker_id, const bt_load_report *r);
/* Parses a payload. worker_id must be a non-negative integer; every other field is optional
 * (null or missing counts as 0, `ready` defaults to true, as a Dynamo publisher sends neither).
 * BT_ERR_INVALID with a reason in err for anything else. */
bt_status bt_events_decode_load(const char *p, size_t n, uint64_t *worker_id, bt_load_report *r, char *err,
                                size_t errlen);

#endif
