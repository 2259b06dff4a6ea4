/* etcd_internal.h — what the pieces of the etcd discovery backend share: the handle, its calls
 * and the functions one piece calls in another. Not for use outside src/discovery/etcd*.c.
 *
 *  - etcd_wire.c   the pure codec (bodies and answer parsers; discovery_internal.h);
 *  - etcd_call.c   the call layer: one member list with a cursor and failover, libcurl on the loop,
 *                  authentication, and the completion of each call through its own callback;
 *  - etcd_lease.c  the writer (this process's keys) and its lease: grant, keep-alive, re-grant
 *                  and re-registration when the lease is lost, revoke on close;
 *  - etcd_watch.c  the watcher: list, then watch from the listed revision, resume, re-list;
 *  - etcd.c        the handle: creation, the discovery ops table, close.
 *
 * Each machine's state is an enum changed through one function that logs the change (debug).
 * Names shared across these files carry the etcd__ prefix. */
#ifndef BATON_DISCOVERY_ETCD_INTERNAL_H
#define BATON_DISCOVERY_ETCD_INTERNAL_H

#include <curl/curl.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include "common/closer.h"
#include "common/curl_uv.h"
#include "common/util.h"
#include "discovery/discovery_internal.h"
#include "discovery/keyset.h"

#define ETCD_CONNECT_TIMEOUT_MS 1000  /* a member that does not accept within this is skipped */
#define ETCD_REQUEST_TIMEOUT_MS 2000  /* bound on every unary call */
#define ETCD_PROBE_INTERVAL_MS 3000   /* watch liveness probe period */
#define ETCD_PROBE_TIMEOUT_MS 2000
#define ETCD_REVOKE_TIMEOUT_MS 1000   /* per attempt, on close */
#define ETCD_REVOKE_ATTEMPTS 3        /* at most this many members are tried on close */
#define ETCD_BACKOFF_MIN_MS 50
#define ETCD_BACKOFF_MAX_MS 2000      /* writer, watcher, auth */
#define ETCD_KA_BACKOFF_MAX_MS 1000   /* keep-alive retries sooner: the lease is at stake */
#define ETCD_FAIL_DELAY_MS 5000       /* after a refusal (permission, bad request) */
#define ETCD_MAX_RESPONSE (64u << 20) /* a unary answer (a range of many keys) */
#define ETCD_MAX_STREAM_MSG (16u << 20)
#define ETCD_MAX_VALUE (64 * 1024)    /* as the file backend */
#define ETCD_UNREACHABLE_LOG_MS 10000 /* "still unreachable" reminder period */

/* The lease this process writes its keys with.
 *   NONE -> GRANTING (a grant is in flight) -> LIVE (lease_id set, kept alive)
 *   LIVE -> NONE (etcd says it is gone: every key is written again under a new one)
 *   LIVE -> REVOKING (close) -> CLOSED;  any other -> CLOSED (close) */
typedef enum {
    ETCD_LEASE_NONE,
    ETCD_LEASE_GRANTING,
    ETCD_LEASE_LIVE,
    ETCD_LEASE_REVOKING,
    ETCD_LEASE_CLOSED,
} etcd_lease_state;

/* The watcher.
 *   OFF -> WAITING (watch() called; waiting for the loop, a backoff timer or an auth token)
 *   WAITING -> LISTING (a range call in flight) -> WAITING or STARTING
 *   WAITING -> STARTING (the stream is requested) -> STREAMING (etcd said "created")
 *   LISTING, STARTING, STREAMING -> WAITING (failed or broken: resume after the backoff)
 *   any -> CLOSED (close) */
typedef enum {
    ETCD_WATCH_OFF,
    ETCD_WATCH_WAITING,
    ETCD_WATCH_LISTING,
    ETCD_WATCH_STARTING,
    ETCD_WATCH_STREAMING,
    ETCD_WATCH_CLOSED,
} etcd_watch_state;

typedef enum { RQ_AUTH, RQ_GRANT, RQ_KEEPALIVE, RQ_PUT, RQ_DEL, RQ_REVOKE, RQ_LIST, RQ_WATCH, RQ_PROBE } rq_kind;

/* The name of a call kind, for logs. */
const char *etcd__rq_name(rq_kind kind);

typedef struct etcd_disc etcd_disc;

typedef struct ereq ereq;

/* What a finished call reports to the machine that made it: res and why as classified by
 * bt_etcd_classify, body the parsed answer (NULL if none). r is freed after the callback. */
typedef void (*etcd_call_done)(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);

/* One HTTP exchange with one member. */
struct ereq {
    LIST_ENTRY(ereq) link; /* the handle's list of transfers in flight */
    etcd_disc *d;
    rq_kind kind;
    etcd_call_done done; /* NULL for the watch stream, whose end goes to etcd__watch_ended */
    CURL *easy;
    struct curl_slist *hdrs;
    size_t ep;
    char *body;
    bt_buf resp;
    size_t parsed; /* watch: bytes of resp already consumed */
    bool overflow; /* the answer went past its cap */
    char errbuf[CURL_ERROR_SIZE];
    char *token; /* the auth token it carried, to tell whether a rejection concerns the current one */
    char *key;   /* put / delete */
    uint64_t seq; /* put: the value's version */
    int64_t lease;
};

/* The flags of a key this process put (bt_owned_key, keyset.h). */
enum {
    ETCD_OWNED_DIRTY = 1u,      /* not yet written with the current lease */
    ETCD_OWNED_REGISTERED = 2u, /* written at least once (the first write is logged at info) */
};

typedef struct pdel {
    TAILQ_ENTRY(pdel) link; /* etcd_disc.dels */
    char *key;
} pdel;

/* What the watcher was told: sorted by key. */
typedef struct {
    char *key;
    char *text;
    size_t len;
} kent;

struct etcd_disc {
    bt_discovery base;
    bt_curl_uv *cu; /* libcurl on the loop; NULL once closed */

    char **eps;
    size_t neps;
    size_t cur;             /* the member requests go to */
    bool contact;           /* the last exchange with etcd succeeded */
    uint64_t lost_ms;       /* when contact was lost */
    uint64_t lost_logged_ms;
    char last_err[256];

    char *user, *pass, *token;
    char *ca, *cert, *key; /* TLS files for https:// members (NULL: libcurl's defaults, no client cert) */
    ereq *auth_req;
    uv_timer_t auth_timer;
    unsigned auth_fails;

    LIST_HEAD(, ereq) reqs; /* every transfer in flight */
    int64_t ttl_s;

    /* writer and lease (etcd_lease.c) */
    etcd_lease_state lease_state;
    bt_keyset owned; /* the keys this process put (keyset.h) */
    TAILQ_HEAD(, pdel) dels; /* deletes not yet done, in call order */
    ereq *w_req;
    uv_timer_t w_timer;
    unsigned w_fails;
    int64_t lease_id;
    int64_t lease_ttl_s;
    unsigned leases_granted;
    bool reregistering;
    uint64_t lease_losses; /* leases found gone while they held keys: each means a registration again */
    uint64_t lease_ok_ms;

    /* keep-alive */
    ereq *ka_req;
    uv_timer_t ka_timer;
    unsigned ka_fails;
    uint64_t ka_interval_ms;

    /* watcher (etcd_watch.c) */
    etcd_watch_state watch_state;
    char *prefix;
    bt_discovery_watcher w;
    void *wud;
    ereq *list_req, *watch_req, *probe_req;
    uv_timer_t watch_timer, probe_timer;
    unsigned watch_fails;
    bool need_list;
    bool listed;          /* a listing answered once: any later one follows a break */
    bool watch_was_up;    /* a stream was up before the current break */
    uint64_t watch_broken_ms;
    int64_t last_rev;     /* every event up to here was delivered */
    int64_t start_rev;    /* the current stream's start revision */
    char cluster_id[24];  /* of the store last listed */
    int64_t raft_term;    /* of the store last listed (0: not told); a store's term never decreases */
    kent *known;
    size_t nknown, capknown;

    /* closing */
    bool closing, finishing;
    ereq *revoke_req;
    unsigned revoke_attempts;
    bt_closer closer; /* libcurl and the timers, from finish_close on */
    void (*done)(void *ud);
    void *done_ud;
};

/* The one shape of a state change of the lease and the watch: logged at debug level as
 * "etcd: <machine> <from> -> <to> (<why>)", then made. */
#define ETCD_SET_STATE(field, to, names, machine, why)                                                                  \
    do {                                                                                                                \
        if ((field) != (to)) {                                                                                          \
            BT_DEBUG("etcd: %s %s -> %s (%s)", machine, names[field], names[to], why);                                  \
            (field) = (to);                                                                                             \
        }                                                                                                               \
    } while (0)

/* ---- etcd_call.c ---- */
char *etcd__strdup(const char *s);
/* Delay before retry number `fails`: at once while members not yet tried remain, then
 * exponential from ETCD_BACKOFF_MIN_MS up to cap. */
uint64_t etcd__backoff_ms(etcd_disc *d, unsigned fails, uint64_t cap);
void etcd__ep_ok(etcd_disc *d, size_t ep);
void etcd__ep_failed(etcd_disc *d, size_t ep, rq_kind kind, const char *why);
/* Starts POST <member ep><path> with `body` (taken over); `done` gets the outcome. timeout_ms 0 =
 * a stream without a total bound. NULL (body freed) only when out of memory or libcurl refuses. */
ereq *etcd__call_start(etcd_disc *d, rq_kind kind, size_t ep, const char *path, char *body, long timeout_ms,
                       etcd_call_done done);
/* Stops a call in flight and frees it; its callback is not made. Never from a libcurl callback. */
void etcd__call_abort(etcd_disc *d, ereq *r);
/* True when calls may go out: no auth configured, or a token at hand. Otherwise starts
 * authenticating (once) and returns false; every machine is kicked when the token arrives. */
bool etcd__ensure_auth(etcd_disc *d);
/* Authenticates again on close, for the revoke (bounded by the caller). False if it cannot start. */
bool etcd__reauth_for_revoke(etcd_disc *d);
/* A call was refused for its token: forget the token if it is still the current one. */
void etcd__token_rejected(etcd_disc *d, ereq *r, const char *why);
extern const bt_curl_uv_hooks etcd__curl_hooks;

/* ---- etcd_lease.c ---- */
void etcd__lease_set_state(etcd_disc *d, etcd_lease_state s, const char *why);
void etcd__writer_step(etcd_disc *d);
void etcd__ka_schedule(etcd_disc *d, uint64_t delay_ms);
void etcd__start_revoke(etcd_disc *d);
bt_status etcd__put(bt_discovery *base, const char *key, const json_t *value);
bt_status etcd__del(bt_discovery *base, const char *key);
void etcd__lease_free(etcd_disc *d); /* the owned keys and queued deletes */
/* Every key this process put is written under the live lease (true when it put none). */
bool etcd__lease_registered(const etcd_disc *d);

/* ---- etcd_watch.c ---- */
void etcd__watch_set_state(etcd_disc *d, etcd_watch_state s, const char *why);
void etcd__watch_step(etcd_disc *d);
bt_status etcd__watch(bt_discovery *base, const char *prefix, const bt_discovery_watcher *w, void *ud);
/* Delivers every complete message buffered on the watch stream. */
void etcd__watch_drain(etcd_disc *d);
/* The watch transfer r (still d->watch_req) finished: deliver what it left, then resume. */
void etcd__watch_ended(etcd_disc *d, ereq *r, CURLcode cc);
void etcd__watch_free(etcd_disc *d); /* what the watcher was told */

/* ---- etcd.c ---- */
/* Tears everything down; frees the handle once its last libuv handle has closed. */
void etcd__finish_close(etcd_disc *d);

#endif
