/* etcd.c — the etcd backend of the discovery plane: etcd's v3 JSON gateway (etcd >= 3.4, paths
 * /v3/...) spoken over HTTP/1.1 with libcurl's multi interface driven by the caller's libuv loop
 * (curl_multi_socket_action fed by uv_poll and uv_timer handles), so no call ever blocks the loop.
 *
 * Three independent machines share one handle, one endpoint list and one auth token:
 *  - the writer owns this process's keys: it grants one lease on the first put, writes every key
 *    with it, deletes keys on request, and — when the lease is found gone (a keep-alive answered
 *    TTL 0, a put said "lease not found") — grants a new lease and writes every key again. One
 *    write is in flight at a time, so operations on a key land in call order;
 *  - the keep-alive refreshes the lease every TTL/3 (retrying at once on another member when a
 *    refresh fails) and revokes it on close, so a clean exit removes the keys at once;
 *  - the watcher lists the prefix, then watches from the listed revision + 1. A broken stream is
 *    resumed from the last revision seen + 1 on the next member; a compacted resume revision means
 *    a fresh list, diffed against what the watcher was told. While etcd cannot be reached the
 *    watcher reports nothing, so the caller keeps its last view. A periodic probe on the watch's
 *    member catches a member that stopped answering without closing the stream.
 * A request that fails to connect, times out, or meets a member without a leader moves the shared
 * endpoint cursor to the next member and is retried with a bounded backoff; nothing gives up.
 * User callbacks are made only from the loop, outside libcurl callbacks, and never after close.
 * See docs/discovery.md for the keys, timings and the behaviour under each outage. */
#include "discovery/discovery_internal.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/curl_uv.h"
#include "common/log.h"
#include "common/util.h"

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
#define ETCD_MAX_ENDPOINTS 16
#define ETCD_UNREACHABLE_LOG_MS 10000 /* "still unreachable" reminder period */

/* ---- pure helpers (unit-tested) ----------------------------------------------------------- */

static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Hand-written: libcurl's base64 is internal and jansson has none; it is twenty lines. */
int bt_etcd_b64_encode(const void *in, size_t n, char *out, size_t cap) {
    const unsigned char *p = in;
    size_t need = (n + 2) / 3 * 4;
    if (!out || cap <= need) return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n) v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n) v |= p[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? b64_alphabet[v & 63] : '=';
    }
    out[o] = '\0';
    return (int)o;
}

static int b64_val(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

int bt_etcd_b64_decode(const char *in, size_t n, void *outv, size_t cap) {
    unsigned char *out = outv;
    if (!in || !out) return -1;
    if (n % 4 == 0 && n >= 2 && in[n - 1] == '=') n -= in[n - 2] == '=' ? 2 : 1;
    if (n % 4 == 1) return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_val(in[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= cap) return -1;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) return -1; /* non-canonical trailing bits */
    return (int)o;
}

size_t bt_etcd_prefix_end(const char *prefix, size_t n, char *out) {
    while (n > 0 && (unsigned char)prefix[n - 1] == 0xff) n--;
    if (n == 0) {
        out[0] = '\0';
        return 1;
    }
    memcpy(out, prefix, n);
    out[n - 1] = (char)((unsigned char)out[n - 1] + 1);
    return n;
}

void bt_etcd_endpoints_free(char **eps, size_t n) {
    if (!eps) return;
    for (size_t i = 0; i < n; i++) free(eps[i]);
    free(eps);
}

bt_status bt_etcd_parse_endpoints(const char *list, char ***out, size_t *nout, char *err, size_t errlen) {
    *out = NULL;
    *nout = 0;
    if (!list) list = "";
    char **eps = calloc(ETCD_MAX_ENDPOINTS, sizeof *eps);
    if (!eps) {
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    size_t n = 0;
    const char *p = list;
    while (*p) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        const char *a = p, *b = end;
        while (a < b && (*a == ' ' || *a == '\t')) a++;
        while (b > a && (b[-1] == ' ' || b[-1] == '\t')) b--;
        p = comma ? comma + 1 : end;
        if (a == b) continue;
        const char *sep = NULL;
        for (const char *q = a; q + 2 < b; q++)
            if (q[0] == ':' && q[1] == '/' && q[2] == '/') {
                sep = q;
                break;
            }
        bool has_scheme = sep != NULL;
        while (b > (has_scheme ? sep + 3 : a) && b[-1] == '/') b--;
        size_t len = (size_t)(b - a);
        if (has_scheme && !((sep - a == 4 && strncmp(a, "http", 4) == 0) ||
                            (sep - a == 5 && strncmp(a, "https", 5) == 0))) {
            snprintf(err, errlen, "etcd endpoint '%.*s': only http:// and https:// are supported", (int)len, a);
            goto fail;
        }
        if ((has_scheme ? (size_t)(b - sep) <= 3 : len == 0) || len > 512) { /* nothing but '/'s */
            snprintf(err, errlen, "etcd endpoint '%.*s' is not a URL", (int)(len > 80 ? 80 : len), a);
            goto fail;
        }
        if (n == ETCD_MAX_ENDPOINTS) {
            snprintf(err, errlen, "more than %d etcd endpoints", ETCD_MAX_ENDPOINTS);
            goto fail;
        }
        size_t cap = len + 8;
        char *s = malloc(cap);
        if (!s) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        snprintf(s, cap, "%s%.*s", has_scheme ? "" : "http://", (int)len, a);
        eps[n++] = s;
    }
    if (n == 0) {
        snprintf(err, errlen, "no etcd endpoint given (ETCD_ENDPOINTS / --etcd-endpoints)");
        goto fail;
    }
    *out = eps;
    *nout = n;
    return BT_OK;
fail:
    bt_etcd_endpoints_free(eps, n);
    return BT_ERR_INVALID;
}

/* A JSON string holding base64 of n bytes. */
static json_t *b64_json(const void *p, size_t n) {
    size_t cap = (n + 2) / 3 * 4 + 1;
    char *s = malloc(cap);
    if (!s) return NULL;
    bt_etcd_b64_encode(p, n, s, cap);
    json_t *j = json_string(s);
    free(s);
    return j;
}

static json_t *i64_json(int64_t v) {
    char s[24];
    snprintf(s, sizeof s, "%" PRId64, v);
    return json_string(s);
}

static char *dump_free(json_t *j) {
    if (!j) return NULL;
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s;
}

/* {"key": b64(prefix or "\0"), "range_end": b64(end)}: every key starting with prefix. */
static json_t *prefix_range(const char *prefix) {
    size_t n = strlen(prefix);
    char *end = malloc(n + 1);
    if (!end) return NULL;
    size_t en = bt_etcd_prefix_end(prefix, n, end);
    json_t *j = json_object();
    json_object_set_new(j, "key", n ? b64_json(prefix, n) : b64_json("", 1));
    json_object_set_new(j, "range_end", b64_json(end, en));
    free(end);
    return j;
}

char *bt_etcd_body_put(const char *key, const char *value, size_t vlen, int64_t lease) {
    json_t *j = json_object();
    if (!j) return NULL;
    json_object_set_new(j, "key", b64_json(key, strlen(key)));
    json_object_set_new(j, "value", b64_json(value, vlen));
    if (lease) json_object_set_new(j, "lease", i64_json(lease));
    return dump_free(j);
}

char *bt_etcd_body_delete(const char *key) {
    json_t *j = json_object();
    if (!j) return NULL;
    json_object_set_new(j, "key", b64_json(key, strlen(key)));
    return dump_free(j);
}

char *bt_etcd_body_range(const char *prefix, bool count_only) {
    json_t *j = prefix_range(prefix);
    if (!j) return NULL;
    if (count_only) {
        json_object_set_new(j, "count_only", json_true());
        json_object_set_new(j, "limit", i64_json(1));
    }
    return dump_free(j);
}

char *bt_etcd_body_watch(const char *prefix, int64_t start_revision) {
    json_t *c = prefix_range(prefix);
    if (!c) return NULL;
    if (start_revision > 0) json_object_set_new(c, "start_revision", i64_json(start_revision));
    return dump_free(json_pack("{s:o}", "create_request", c));
}

char *bt_etcd_body_lease(int64_t id) { return dump_free(json_pack("{s:o}", "ID", i64_json(id))); }

/* The gateway writes 64-bit integers as strings; accept numbers too. Missing = 0. */
static bool json_i64(const json_t *v, int64_t *out) {
    *out = 0;
    if (!v) return true;
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return true;
    }
    if (json_is_string(v)) return bt_parse_i64(json_string_value(v), INT64_MIN, INT64_MAX, out);
    return false;
}

static bool contains(const char *s, const char *needle) { return s && strstr(s, needle) != NULL; }

bt_etcd_result bt_etcd_classify(bool transport_ok, long http, const json_t *body, char *why, size_t whylen) {
    if (!transport_ok) {
        if (whylen) snprintf(why, whylen, "no answer");
        return BT_ETCD_RETRY;
    }
    const json_t *e = json_is_object(body) ? json_object_get(body, "error") : NULL;
    if (e) {
        const char *msg = json_string_value(e);
        if (!msg) msg = json_string_value(json_object_get(e, "message"));
        if (!msg) msg = json_string_value(json_object_get(body, "message"));
        int64_t code = 0;
        if (!json_i64(json_object_get(body, "code"), &code) || code == 0)
            json_i64(json_object_get(e, "grpc_code"), &code);
        snprintf(why, whylen, "%s (code %" PRId64 ", HTTP %ld)", msg ? msg : "error", code, http);
        if (contains(msg, "invalid auth token") || contains(msg, "user name is empty") ||
            contains(msg, "auth: revision in header is old"))
            return BT_ETCD_AUTH;
        if (contains(msg, "requested lease not found")) return BT_ETCD_LEASE_GONE;
        /* Unavailable (no leader, stopping), deadline exceeded (request timed out, leader changed
         * under it), resource exhausted (too many requests), aborted: another member may do. */
        if (code == 14 || code == 4 || code == 8 || code == 10 || contains(msg, "no leader") ||
            contains(msg, "leader changed") || contains(msg, "timed out") || contains(msg, "deadline exceeded") ||
            contains(msg, "not capable"))
            return BT_ETCD_RETRY;
        if (code == 16) return BT_ETCD_AUTH;
        return BT_ETCD_FAIL;
    }
    if (http != 200 || !json_is_object(body)) {
        /* A 4xx is a refusal of the request itself; anything else (5xx from a proxy, a 200 that
         * is not JSON) is a broken exchange that another try may not repeat. */
        snprintf(why, whylen, "HTTP %ld%s", http, json_is_object(body) ? "" : " without a JSON answer");
        return http >= 400 && http < 500 ? BT_ETCD_FAIL : BT_ETCD_RETRY;
    }
    if (whylen) why[0] = '\0';
    return BT_ETCD_OK;
}

void bt_etcd_kvs_free(bt_etcd_kv *kvs, size_t n) {
    if (!kvs) return;
    for (size_t i = 0; i < n; i++) {
        free(kvs[i].key);
        free(kvs[i].value);
    }
    free(kvs);
}

/* Decodes a base64 JSON string into a NUL-terminated malloc'd buffer. */
static char *b64_field(const json_t *v, size_t *len) {
    const char *s = json_string_value(v);
    size_t n = s ? strlen(s) : 0;
    char *out = malloc(n / 4 * 3 + 4);
    if (!out) return NULL;
    int r = n ? bt_etcd_b64_decode(s, n, out, n / 4 * 3 + 3) : 0;
    if (r < 0) {
        free(out);
        return NULL;
    }
    out[r] = '\0';
    *len = (size_t)r;
    return out;
}

/* Fills one kv from a {"key","value","mod_revision"} object; false if it is unusable. */
static bool parse_kv(const json_t *kv, bool is_delete, bt_etcd_kv *out) {
    memset(out, 0, sizeof *out);
    size_t klen = 0;
    out->key = b64_field(json_object_get(kv, "key"), &klen);
    if (!out->key || klen == 0 || strlen(out->key) != klen) goto bad;
    if (is_delete) {
        out->value = calloc(1, 1);
    } else {
        out->value = b64_field(json_object_get(kv, "value"), &out->vlen);
    }
    if (!out->value) goto bad;
    out->is_delete = is_delete;
    if (!json_i64(json_object_get(kv, "mod_revision"), &out->mod_revision)) goto bad;
    return true;
bad:
    free(out->key);
    free(out->value);
    memset(out, 0, sizeof *out);
    return false;
}

bt_status bt_etcd_parse_range(const json_t *body, bt_etcd_kv **kvs, size_t *n, int64_t *revision) {
    *kvs = NULL;
    *n = 0;
    *revision = 0;
    const json_t *hrev = json_object_get(json_object_get(body, "header"), "revision");
    if (!hrev || !json_i64(hrev, revision)) return BT_ERR_PROTOCOL;
    const json_t *arr = json_object_get(body, "kvs");
    if (!arr) return BT_OK;
    if (!json_is_array(arr)) return BT_ERR_PROTOCOL;
    size_t cnt = json_array_size(arr);
    if (cnt == 0) return BT_OK;
    bt_etcd_kv *v = calloc(cnt, sizeof *v);
    if (!v) return BT_ERR_NOMEM;
    size_t k = 0;
    for (size_t i = 0; i < cnt; i++)
        if (parse_kv(json_array_get(arr, i), false, &v[k])) k++;
    *kvs = v;
    *n = k;
    return BT_OK;
}

const char *bt_etcd_cluster_id(const json_t *body) {
    const char *id = json_string_value(json_object_get(json_object_get(body, "header"), "cluster_id"));
    return id && strlen(id) < 24 ? id : "";
}

void bt_etcd_wmsg_free(bt_etcd_wmsg *m) {
    if (!m) return;
    bt_etcd_kvs_free(m->events, m->nevents);
    m->events = NULL;
    m->nevents = 0;
}

bt_status bt_etcd_parse_watch_msg(const char *text, size_t len, bt_etcd_wmsg *out) {
    memset(out, 0, sizeof *out);
    json_error_t je;
    json_t *j = json_loadb(text, len, 0, &je);
    if (!json_is_object(j)) {
        json_decref(j);
        return BT_ERR_PROTOCOL;
    }
    bt_status st = BT_OK;
    json_t *err = json_object_get(j, "error");
    json_t *r = json_object_get(j, "result");
    if (err) {
        out->kind = BT_ETCD_WMSG_ERROR;
        const char *msg = json_string_value(json_object_get(err, "message"));
        if (!msg) msg = json_string_value(err);
        snprintf(out->reason, sizeof out->reason, "%s", msg ? msg : "stream error");
        goto out;
    }
    if (!json_is_object(r)) {
        st = BT_ERR_PROTOCOL;
        goto out;
    }
    snprintf(out->cluster_id, sizeof out->cluster_id, "%s", bt_etcd_cluster_id(r));
    if (!json_i64(json_object_get(json_object_get(r, "header"), "revision"), &out->header_revision) ||
        !json_i64(json_object_get(r, "compact_revision"), &out->compact_revision)) {
        st = BT_ERR_PROTOCOL;
        goto out;
    }
    if (json_is_true(json_object_get(r, "canceled"))) {
        out->kind = BT_ETCD_WMSG_CANCELED;
        const char *why = json_string_value(json_object_get(r, "cancel_reason"));
        if (why) snprintf(out->reason, sizeof out->reason, "%s", why);
        else if (out->compact_revision > 0)
            snprintf(out->reason, sizeof out->reason, "compacted at revision %" PRId64, out->compact_revision);
        else snprintf(out->reason, sizeof out->reason, "canceled by the server");
        goto out;
    }
    if (json_is_true(json_object_get(r, "created"))) {
        out->kind = BT_ETCD_WMSG_CREATED;
        goto out;
    }
    json_t *evs = json_object_get(r, "events");
    if (!evs || (json_is_array(evs) && json_array_size(evs) == 0)) {
        out->kind = BT_ETCD_WMSG_PROGRESS;
        goto out;
    }
    if (!json_is_array(evs)) {
        st = BT_ERR_PROTOCOL;
        goto out;
    }
    out->kind = BT_ETCD_WMSG_EVENTS;
    size_t cnt = json_array_size(evs);
    out->events = calloc(cnt, sizeof *out->events);
    if (!out->events) {
        st = BT_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < cnt; i++) {
        json_t *ev = json_array_get(evs, i);
        const char *type = json_string_value(json_object_get(ev, "type"));
        bool del = type && strcmp(type, "DELETE") == 0;
        if (type && !del && strcmp(type, "PUT") != 0) continue;
        if (parse_kv(json_object_get(ev, "kv"), del, &out->events[out->nevents])) out->nevents++;
    }
out:
    json_decref(j);
    if (st != BT_OK) bt_etcd_wmsg_free(out);
    return st;
}

/* ---- types -------------------------------------------------------------------------------- */

typedef enum { RQ_AUTH, RQ_GRANT, RQ_KEEPALIVE, RQ_PUT, RQ_DEL, RQ_REVOKE, RQ_LIST, RQ_WATCH, RQ_PROBE } rq_kind;

static const char *const rq_names[] = {"authenticate", "lease grant", "lease keep-alive", "put", "delete",
                                       "lease revoke", "list",        "watch",            "probe"};

typedef struct etcd_disc etcd_disc;

/* One HTTP exchange with one member. */
typedef struct ereq {
    struct ereq *prev, *next; /* the handle's list of transfers in flight */
    etcd_disc *d;
    rq_kind kind;
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
} ereq;

/* A key this process put. dirty = not yet written with the current lease. */
typedef struct owned {
    struct owned *next;
    char *key;
    char *text;
    size_t len;
    uint64_t seq;
    bool dirty;
    bool registered_once;
} owned;

typedef struct pdel {
    struct pdel *next;
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

    ereq *reqs; /* every transfer in flight */
    int64_t ttl_s;

    /* writer */
    owned *owned;
    pdel *dels;
    ereq *w_req;
    uv_timer_t w_timer;
    unsigned w_fails;
    int64_t lease_id;
    int64_t lease_ttl_s;
    unsigned leases_granted;
    bool reregistering;
    uint64_t lease_ok_ms;

    /* keep-alive */
    ereq *ka_req;
    uv_timer_t ka_timer;
    unsigned ka_fails;
    uint64_t ka_interval_ms;

    /* watcher */
    bool watching;
    char *prefix;
    bt_discovery_watcher w;
    void *wud;
    ereq *list_req, *watch_req, *probe_req;
    uv_timer_t watch_timer, probe_timer;
    unsigned watch_fails;
    bool need_list;
    bool watch_created;   /* the current stream said "created" */
    bool watch_was_up;    /* a stream was up before the current break */
    uint64_t watch_broken_ms;
    int64_t last_rev;     /* every event up to here was delivered */
    int64_t start_rev;    /* the current stream's start revision */
    char cluster_id[24];  /* of the store last listed */
    kent *known;
    size_t nknown, capknown;

    /* closing */
    bool closing, finishing;
    ereq *revoke_req;
    unsigned revoke_attempts;
    int handles_open;
    void (*done)(void *ud);
    void *done_ud;
};

static void writer_step(etcd_disc *d);
static void watch_step(etcd_disc *d);
static void ka_schedule(etcd_disc *d, uint64_t delay_ms);
static void finish_close(etcd_disc *d);

static char *xstrdup(const char *s) {
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

static uint64_t backoff_ms(etcd_disc *d, unsigned fails, uint64_t cap) {
    /* The first failures move to members not tried yet: retry at once. */
    if (fails < d->neps) return 0;
    unsigned k = fails - (unsigned)d->neps;
    uint64_t ms = (uint64_t)ETCD_BACKOFF_MIN_MS << (k > 10 ? 10 : k);
    return ms > cap ? cap : ms;
}

/* ---- endpoints and contact ---------------------------------------------------------------- */

static void ep_ok(etcd_disc *d, size_t ep) {
    if (!d->contact) {
        BT_INFO("etcd: reachable again via %s after %.1f s", d->eps[ep], (double)(bt_now_ms() - d->lost_ms) / 1000.0);
        d->contact = true;
    }
    /* A member that answered is as good as any: keep using it. */
    d->cur = ep;
}

/* A request to member `ep` got no usable answer: move the cursor on (once per failing member,
 * not once per request that was in flight to it). */
static void ep_failed(etcd_disc *d, size_t ep, rq_kind kind, const char *why) {
    uint64_t now = bt_now_ms();
    snprintf(d->last_err, sizeof d->last_err, "%s: %s", d->eps[ep], why);
    if (ep == d->cur && d->neps > 1) d->cur = (d->cur + 1) % d->neps;
    if (d->contact) {
        d->contact = false;
        d->lost_ms = d->lost_logged_ms = now;
        BT_WARN("etcd: %s via %s failed (%s); %s", rq_names[kind], d->eps[ep], why,
                d->neps > 1 ? "trying the next member" : "retrying");
        if (d->neps > 1) BT_INFO("etcd: now using %s", d->eps[d->cur]);
    } else if (now - d->lost_logged_ms >= ETCD_UNREACHABLE_LOG_MS) {
        d->lost_logged_ms = now;
        BT_WARN("etcd: still unreachable after %.0f s (last: %s)", (double)(now - d->lost_ms) / 1000.0, d->last_err);
    } else {
        BT_DEBUG("etcd: %s via %s failed: %s", rq_names[kind], d->eps[ep], why);
    }
}

/* ---- libcurl on the loop ------------------------------------------------------------------ */

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
    ereq *r = ud;
    size_t n = size * nmemb;
    if (bt_buf_append(&r->resp, ptr, n) != BT_OK) {
        r->overflow = true;
        return 0; /* aborts the transfer */
    }
    return n;
}

static void req_free(ereq *r) {
    if (!r) return;
    if (r->easy) curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    bt_buf_free(&r->resp);
    free(r->body);
    free(r->token);
    free(r->key);
    free(r);
}

static void req_unlink(etcd_disc *d, ereq *r) {
    if (r->prev) r->prev->next = r->next;
    else d->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    r->prev = r->next = NULL;
}

/* Stops a transfer in flight and frees it. Never called from inside a libcurl callback. */
static void req_abort(etcd_disc *d, ereq *r) {
    if (!r) return;
    bt_curl_uv_remove(d->cu, r->easy);
    req_unlink(d, r);
    req_free(r);
}

/* Starts POST <endpoint ep><path> with `body` (taken over). timeout_ms 0 = a stream without a
 * total bound. Returns NULL (body freed) only when out of memory or libcurl refuses. */
static ereq *req_start(etcd_disc *d, rq_kind kind, size_t ep, const char *path, char *body, long timeout_ms) {
    ereq *r = calloc(1, sizeof *r);
    if (!r || !body) goto fail;
    r->d = d;
    r->kind = kind;
    r->ep = ep;
    r->body = body;
    body = NULL;
    bt_buf_init(&r->resp, kind == RQ_WATCH ? ETCD_MAX_STREAM_MSG : ETCD_MAX_RESPONSE);
    r->easy = curl_easy_init();
    if (!r->easy) goto fail;
    char url[600];
    snprintf(url, sizeof url, "%s%s", d->eps[ep], path);
    r->hdrs = curl_slist_append(r->hdrs, "Content-Type: application/json");
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    /* etcd's "require leader" metadata: a member that has lost its leader refuses a call at once
     * (and ends a watch stream) instead of holding it, so the call moves to another member. */
    r->hdrs = curl_slist_append(r->hdrs, "Grpc-Metadata-hasleader: true");
    if (d->token && kind != RQ_AUTH) {
        char h[600];
        snprintf(h, sizeof h, "Authorization: %s", d->token);
        r->hdrs = curl_slist_append(r->hdrs, h);
        r->token = xstrdup(d->token);
    }
    if (!r->hdrs) goto fail;
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    if (strncmp(d->eps[ep], "https://", 8) == 0) {
        if (d->ca) curl_easy_setopt(e, CURLOPT_CAINFO, d->ca);
        if (d->cert) curl_easy_setopt(e, CURLOPT_SSLCERT, d->cert);
        if (d->key) curl_easy_setopt(e, CURLOPT_SSLKEY, d->key);
    }
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, ""); /* etcd is reached directly, whatever *_proxy says */
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)ETCD_CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 5L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 2L);
    if (bt_curl_uv_add(d->cu, e) != BT_OK) goto fail;
    r->next = d->reqs;
    if (d->reqs) d->reqs->prev = r;
    d->reqs = r;
    BT_TRACE("etcd: %s → %s%s", rq_names[kind], d->eps[ep], path);
    return r;
fail:
    free(body);
    req_free(r);
    BT_ERROR("etcd: cannot start a %s request (out of memory)", rq_names[kind]);
    return NULL;
}

/* ---- auth --------------------------------------------------------------------------------- */

static void kick_all(etcd_disc *d) {
    writer_step(d);
    watch_step(d);
    if (d->lease_id && !d->ka_req && !uv_is_active((uv_handle_t *)&d->ka_timer)) ka_schedule(d, 0);
}

static void on_auth_timer(uv_timer_t *t);

/* True when requests may go out: no auth configured, or a token is at hand. Otherwise starts
 * authenticating (once) and returns false; every machine is kicked when the token arrives. */
static bool ensure_auth(etcd_disc *d) {
    if (!d->user || d->token) return true;
    if (d->auth_req || uv_is_active((uv_handle_t *)&d->auth_timer) || d->closing) return false;
    json_t *j = json_pack("{s:s, s:s}", "name", d->user, "password", d->pass ? d->pass : "");
    d->auth_req = req_start(d, RQ_AUTH, d->cur, "/v3/auth/authenticate", dump_free(j), ETCD_REQUEST_TIMEOUT_MS);
    if (!d->auth_req) uv_timer_start(&d->auth_timer, on_auth_timer, ETCD_FAIL_DELAY_MS, 0);
    return false;
}

static void on_auth_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (ensure_auth(d)) kick_all(d);
}

static void start_revoke(etcd_disc *d);

static void auth_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->auth_req = NULL;
    if (res == BT_ETCD_OK) {
        const char *tok = json_string_value(json_object_get(body, "token"));
        if (tok && *tok && strlen(tok) < 500) {
            free(d->token);
            d->token = xstrdup(tok);
            d->auth_fails = 0;
            BT_DEBUG("etcd: authenticated as %s", d->user);
            if (d->closing) start_revoke(d); /* the revoke that was refused for its token */
            else kick_all(d);
            return;
        }
        res = BT_ETCD_FAIL;
        why = "no token in the answer";
    }
    if (d->closing) {
        BT_WARN("etcd: cannot authenticate to revoke lease %" PRIx64 " (%s); its keys expire within %" PRId64 " s",
                (uint64_t)d->lease_id, why, d->lease_ttl_s);
        finish_close(d);
        return;
    }
    d->auth_fails++;
    uint64_t delay;
    if (res == BT_ETCD_RETRY) {
        ep_failed(d, r->ep, RQ_AUTH, why);
        delay = backoff_ms(d, d->auth_fails, ETCD_BACKOFF_MAX_MS);
    } else {
        BT_ERROR("etcd: cannot authenticate as '%s': %s; retrying in %d s", d->user, why, ETCD_FAIL_DELAY_MS / 1000);
        delay = ETCD_FAIL_DELAY_MS;
    }
    uv_timer_start(&d->auth_timer, on_auth_timer, delay, 0);
}

/* A request was refused for its token: forget the token if it is still the current one. */
static void token_rejected(etcd_disc *d, ereq *r, const char *why) {
    if (d->token && (!r->token || strcmp(r->token, d->token) == 0)) {
        BT_INFO("etcd: auth token refused (%s); authenticating again", why);
        free(d->token);
        d->token = NULL;
    }
}

/* ---- writer: lease and keys --------------------------------------------------------------- */

static owned *find_owned(etcd_disc *d, const char *key, owned ***link) {
    owned **pp = &d->owned;
    for (; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->key, key) == 0) break;
    if (link) *link = pp;
    return *pp;
}

static void free_owned(owned *o) {
    free(o->key);
    free(o->text);
    free(o);
}

static size_t count_owned(etcd_disc *d) {
    size_t n = 0;
    for (owned *o = d->owned; o; o = o->next) n++;
    return n;
}

static void on_w_timer(uv_timer_t *t) { writer_step(t->data); }

static void w_retry(etcd_disc *d, uint64_t delay) { uv_timer_start(&d->w_timer, on_w_timer, delay, 0); }

/* The lease `id` is gone: every key must be written again under a new one. */
static void lease_lost(etcd_disc *d, int64_t id, const char *why) {
    if (id == 0 || id != d->lease_id) return;
    size_t n = 0;
    for (owned *o = d->owned; o; o = o->next, n++) o->dirty = true;
    double since = d->lease_ok_ms ? (double)(bt_now_ms() - d->lease_ok_ms) / 1000.0 : 0.0;
    BT_WARN("etcd: lease %" PRIx64 " is gone (%s; last refreshed %.1f s ago): granting a new lease and registering "
            "%zu key(s) again",
            (uint64_t)id, why, since, n);
    d->lease_id = 0;
    d->reregistering = n > 0;
    uv_timer_stop(&d->ka_timer);
    if (d->ka_req) {
        req_abort(d, d->ka_req);
        d->ka_req = NULL;
    }
}

static void writer_step(etcd_disc *d) {
    if (d->closing || d->w_req || uv_is_active((uv_handle_t *)&d->w_timer)) return;
    if (!d->dels) {
        owned *o = d->owned;
        while (o && !o->dirty) o = o->next;
        if (!o) return;
    }
    if (!ensure_auth(d)) return;
    ereq *r = NULL;
    if (d->dels) {
        r = req_start(d, RQ_DEL, d->cur, "/v3/kv/deleterange", bt_etcd_body_delete(d->dels->key),
                      ETCD_REQUEST_TIMEOUT_MS);
        if (r) r->key = xstrdup(d->dels->key);
    } else if (!d->lease_id) {
        char body[64];
        snprintf(body, sizeof body, "{\"TTL\":\"%" PRId64 "\"}", d->ttl_s);
        r = req_start(d, RQ_GRANT, d->cur, "/v3/lease/grant", xstrdup(body), ETCD_REQUEST_TIMEOUT_MS);
    } else {
        owned *o = d->owned;
        while (!o->dirty) o = o->next;
        r = req_start(d, RQ_PUT, d->cur, "/v3/kv/put", bt_etcd_body_put(o->key, o->text, o->len, d->lease_id),
                      ETCD_REQUEST_TIMEOUT_MS);
        if (r) {
            r->key = xstrdup(o->key);
            r->seq = o->seq;
            r->lease = d->lease_id;
        }
    }
    if (!r) {
        w_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    d->w_req = r;
}

static void writer_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->w_req = NULL;
    if (res == BT_ETCD_OK) {
        d->w_fails = 0;
        switch (r->kind) {
        case RQ_GRANT: {
            int64_t id = 0, ttl = 0;
            json_i64(json_object_get(body, "ID"), &id);
            json_i64(json_object_get(body, "TTL"), &ttl);
            if (id == 0 || ttl <= 0) {
                BT_WARN("etcd: lease grant answered without a lease; retrying");
                w_retry(d, ETCD_FAIL_DELAY_MS);
                return;
            }
            d->lease_id = id;
            d->lease_ttl_s = ttl;
            d->leases_granted++;
            d->lease_ok_ms = bt_now_ms();
            d->ka_interval_ms = (uint64_t)ttl * 1000 / 3;
            if (d->ka_interval_ms < 200) d->ka_interval_ms = 200;
            d->ka_fails = 0;
            BT_INFO("etcd: lease %" PRIx64 " granted via %s (TTL %" PRId64 " s, refreshed every %" PRIu64 " ms)",
                    (uint64_t)id, d->eps[r->ep], ttl, d->ka_interval_ms);
            ka_schedule(d, d->ka_interval_ms);
            break;
        }
        case RQ_PUT: {
            owned *o = find_owned(d, r->key, NULL);
            if (o && o->seq == r->seq && r->lease == d->lease_id) {
                o->dirty = false;
                if (!o->registered_once) BT_INFO("etcd: registered %s (lease %" PRIx64 ")", o->key, (uint64_t)r->lease);
                else BT_DEBUG("etcd: wrote %s (lease %" PRIx64 ")", o->key, (uint64_t)r->lease);
                o->registered_once = true;
            }
            if (d->reregistering) {
                bool all = true;
                for (owned *p = d->owned; p; p = p->next) all = all && !p->dirty;
                if (all) {
                    BT_INFO("etcd: registered again: %zu key(s) under lease %" PRIx64, count_owned(d),
                            (uint64_t)d->lease_id);
                    d->reregistering = false;
                }
            }
            break;
        }
        case RQ_DEL: {
            for (pdel **pp = &d->dels; *pp; pp = &(*pp)->next)
                if (strcmp((*pp)->key, r->key) == 0) {
                    pdel *x = *pp;
                    *pp = x->next;
                    free(x->key);
                    free(x);
                    break;
                }
            BT_INFO("etcd: deleted %s", r->key);
            break;
        }
        default:
            break;
        }
        writer_step(d);
        return;
    }
    d->w_fails++;
    switch (res) {
    case BT_ETCD_LEASE_GONE:
        lease_lost(d, r->lease, "etcd says the lease was not found");
        writer_step(d);
        return;
    case BT_ETCD_AUTH:
        token_rejected(d, r, why);
        writer_step(d);
        return;
    case BT_ETCD_RETRY:
        ep_failed(d, r->ep, r->kind, why);
        w_retry(d, backoff_ms(d, d->w_fails, ETCD_BACKOFF_MAX_MS));
        return;
    default:
        BT_ERROR("etcd: %s%s%s refused: %s; retrying in %d s", rq_names[r->kind], r->key ? " of " : "",
                 r->key ? r->key : "", why, ETCD_FAIL_DELAY_MS / 1000);
        w_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
}

static bt_status etcd_put(bt_discovery *base, const char *key, const json_t *value) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    char *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text) return BT_ERR_NOMEM;
    size_t len = strlen(text);
    if (len > ETCD_MAX_VALUE) {
        free(text);
        return BT_ERR_TOO_LARGE;
    }
    owned *o = find_owned(d, key, NULL);
    if (!o) {
        o = calloc(1, sizeof *o);
        if (!o || !(o->key = xstrdup(key))) {
            free(o);
            free(text);
            return BT_ERR_NOMEM;
        }
        o->next = d->owned;
        d->owned = o;
    }
    free(o->text);
    o->text = text;
    o->len = len;
    o->seq++;
    o->dirty = true;
    for (pdel **pp = &d->dels; *pp; pp = &(*pp)->next) /* a put supersedes a queued delete */
        if (strcmp((*pp)->key, key) == 0) {
            pdel *x = *pp;
            *pp = x->next;
            free(x->key);
            free(x);
            break;
        }
    writer_step(d);
    return BT_OK;
}

static bt_status etcd_del(bt_discovery *base, const char *key) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    owned **link;
    owned *o = find_owned(d, key, &link);
    if (o) {
        *link = o->next;
        free_owned(o);
    }
    pdel **pp = &d->dels;
    for (; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->key, key) == 0) break;
    if (!*pp) {
        pdel *x = calloc(1, sizeof *x);
        if (!x || !(x->key = xstrdup(key))) {
            free(x);
            return BT_ERR_NOMEM;
        }
        *pp = x; /* appended: deletes go out in call order */
    }
    writer_step(d);
    return BT_OK;
}

/* ---- keep-alive --------------------------------------------------------------------------- */

static void on_ka_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (d->closing || !d->lease_id || d->ka_req) return;
    long timeout = (long)d->ka_interval_ms;
    if (timeout > ETCD_REQUEST_TIMEOUT_MS) timeout = ETCD_REQUEST_TIMEOUT_MS;
    if (timeout < 500) timeout = 500;
    d->ka_req = req_start(d, RQ_KEEPALIVE, d->cur, "/v3/lease/keepalive", bt_etcd_body_lease(d->lease_id), timeout);
    if (d->ka_req) d->ka_req->lease = d->lease_id;
    else ka_schedule(d, ETCD_KA_BACKOFF_MAX_MS);
}

static void ka_schedule(etcd_disc *d, uint64_t delay_ms) {
    if (d->closing) return;
    uv_timer_start(&d->ka_timer, on_ka_timer, delay_ms, 0);
}

static void ka_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->ka_req = NULL;
    if (r->lease != d->lease_id) return; /* a lease we already gave up */
    if (res == BT_ETCD_OK) {
        /* The gateway wraps streamed answers: {"result": {...}}. */
        const json_t *rs = json_object_get(body, "result");
        if (!rs) rs = body;
        int64_t ttl = 0;
        json_i64(json_object_get(rs, "TTL"), &ttl);
        if (ttl <= 0) {
            lease_lost(d, r->lease, "a keep-alive answered TTL 0");
            writer_step(d);
            return;
        }
        d->ka_fails = 0;
        d->lease_ok_ms = bt_now_ms();
        BT_TRACE("etcd: lease %" PRIx64 " refreshed (TTL %" PRId64 " s)", (uint64_t)r->lease, ttl);
        ka_schedule(d, d->ka_interval_ms);
        return;
    }
    d->ka_fails++;
    if (res == BT_ETCD_LEASE_GONE) {
        lease_lost(d, r->lease, "etcd says the lease was not found");
        writer_step(d);
        return;
    }
    if (res == BT_ETCD_AUTH) token_rejected(d, r, why);
    else if (res == BT_ETCD_RETRY) ep_failed(d, r->ep, RQ_KEEPALIVE, why);
    else BT_WARN("etcd: lease keep-alive refused: %s", why);
    ka_schedule(d, backoff_ms(d, d->ka_fails, ETCD_KA_BACKOFF_MAX_MS));
}

/* ---- watcher ------------------------------------------------------------------------------ */

static int kv_cmp(const void *a, const void *b) {
    return strcmp(((const bt_etcd_kv *)a)->key, ((const bt_etcd_kv *)b)->key);
}

static kent *known_find(etcd_disc *d, const char *key, size_t *pos) {
    size_t lo = 0, hi = d->nknown;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(d->known[mid].key, key);
        if (c == 0) {
            if (pos) *pos = mid;
            return &d->known[mid];
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    if (pos) *pos = lo;
    return NULL;
}

static void known_remove(etcd_disc *d, size_t pos) {
    free(d->known[pos].key);
    free(d->known[pos].text);
    memmove(&d->known[pos], &d->known[pos + 1], (d->nknown - pos - 1) * sizeof *d->known);
    d->nknown--;
}

/* Takes key and text. */
static bool known_set(etcd_disc *d, char *key, char *text, size_t len) {
    size_t pos;
    kent *k = known_find(d, key, &pos);
    if (k) {
        free(key);
        free(k->text);
        k->text = text;
        k->len = len;
        return true;
    }
    if (d->nknown == d->capknown) {
        size_t nc = d->capknown ? d->capknown * 2 : 16;
        kent *nk = realloc(d->known, nc * sizeof *nk);
        if (!nk) {
            free(key);
            free(text);
            return false;
        }
        d->known = nk;
        d->capknown = nc;
    }
    memmove(&d->known[pos + 1], &d->known[pos], (d->nknown - pos) * sizeof *d->known);
    d->known[pos] = (kent){key, text, len};
    d->nknown++;
    return true;
}

static void known_free(kent *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(v[i].key);
        free(v[i].text);
    }
    free(v);
}

/* Parses a value; NULL (with a warning) if it is not JSON: such a key counts as absent. */
static json_t *parse_value(const char *key, const char *text, size_t len) {
    json_error_t je;
    json_t *v = json_loadb(text, len, JSON_DECODE_ANY, &je);
    if (!v) BT_WARN("etcd: key %s is not valid JSON (%s); ignored", key, je.text);
    return v;
}

/* Applies one put or delete seen on the stream; false if the handle was closed by the callback.
 * A value that is not JSON counts as a delete; a delete of a key the watcher never had is dropped. */
static bool apply_event(etcd_disc *d, bt_etcd_kv *e) {
    size_t pos;
    bool had = known_find(d, e->key, &pos) != NULL;
    json_t *v = e->is_delete ? NULL : parse_value(e->key, e->value, e->vlen);
    if (v) {
        char *key = xstrdup(e->key);
        if (key) known_set(d, key, e->value, e->vlen);
        else free(e->value);
        e->value = NULL;
        if (d->w.on_put) d->w.on_put(d->wud, e->key, v);
        json_decref(v);
    } else if (had) {
        known_remove(d, pos);
        if (d->w.on_delete) d->w.on_delete(d->wud, e->key);
    }
    return !d->closing;
}

static void on_watch_timer(uv_timer_t *t) { watch_step(t->data); }

/* The stream (or list) failed: try again, resuming, after the backoff. */
static void watch_retry(etcd_disc *d, uint64_t delay) {
    if (d->closing) return;
    uv_timer_start(&d->watch_timer, on_watch_timer, delay, 0);
}

/* Ends the current stream and schedules its resumption. */
static void watch_broke(etcd_disc *d, bool member_failed, const char *why) {
    ereq *r = d->watch_req;
    size_t ep = r ? r->ep : d->cur;
    if (r) {
        req_abort(d, r);
        d->watch_req = NULL;
    }
    if (d->probe_req) {
        req_abort(d, d->probe_req);
        d->probe_req = NULL;
    }
    if (d->watch_created) {
        d->watch_was_up = true;
        d->watch_broken_ms = bt_now_ms();
        BT_WARN("etcd: watch on %s via %s broke (%s); resuming from revision %" PRId64, d->prefix, d->eps[ep], why,
                d->last_rev + 1);
    }
    d->watch_created = false;
    d->watch_fails++;
    if (member_failed) ep_failed(d, ep, RQ_WATCH, why);
    watch_retry(d, backoff_ms(d, d->watch_fails, ETCD_BACKOFF_MAX_MS));
}

static void watch_step(etcd_disc *d) {
    if (d->closing || !d->watching || d->list_req || d->watch_req || uv_is_active((uv_handle_t *)&d->watch_timer))
        return;
    if (!ensure_auth(d)) return;
    if (d->need_list) {
        d->list_req = req_start(d, RQ_LIST, d->cur, "/v3/kv/range", bt_etcd_body_range(d->prefix, false),
                                ETCD_REQUEST_TIMEOUT_MS);
        if (!d->list_req) watch_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    d->start_rev = d->last_rev + 1;
    d->watch_created = false;
    d->watch_req = req_start(d, RQ_WATCH, d->cur, "/v3/watch", bt_etcd_body_watch(d->prefix, d->start_rev), 0);
    if (!d->watch_req) watch_retry(d, ETCD_FAIL_DELAY_MS);
}

/* A fresh listing: tell the watcher what changed since its last view, in key order. */
static void list_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->list_req = NULL;
    bt_etcd_kv *kvs = NULL;
    size_t n = 0;
    int64_t rev = 0;
    if (res == BT_ETCD_OK && bt_etcd_parse_range(body, &kvs, &n, &rev) != BT_OK) {
        res = BT_ETCD_FAIL;
        why = "malformed range answer";
    }
    if (res != BT_ETCD_OK) {
        d->watch_fails++;
        if (res == BT_ETCD_AUTH) token_rejected(d, r, why);
        else if (res == BT_ETCD_RETRY) ep_failed(d, r->ep, RQ_LIST, why);
        else BT_WARN("etcd: listing %s failed: %s", d->prefix, why);
        watch_retry(d, res == BT_ETCD_FAIL ? ETCD_FAIL_DELAY_MS : backoff_ms(d, d->watch_fails, ETCD_BACKOFF_MAX_MS));
        return;
    }
    /* The new view: valid JSON values only, sorted by key. */
    kent *nv = calloc(n ? n : 1, sizeof *nv);
    json_t **vals = calloc(n ? n : 1, sizeof *vals);
    size_t nn = 0;
    if (!nv || !vals) {
        free(nv);
        free(vals);
        bt_etcd_kvs_free(kvs, n);
        watch_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    if (n) qsort(kvs, n, sizeof *kvs, kv_cmp);
    for (size_t i = 0; i < n; i++) {
        json_t *v = parse_value(kvs[i].key, kvs[i].value, kvs[i].vlen);
        if (!v) continue;
        vals[nn] = v;
        nv[nn++] = (kent){kvs[i].key, kvs[i].value, kvs[i].vlen};
        kvs[i].key = kvs[i].value = NULL;
    }
    bt_etcd_kvs_free(kvs, n);
    kent *ov = d->known;
    size_t on = d->nknown;
    d->known = nv;
    d->nknown = d->capknown = nn;
    d->last_rev = rev;
    d->need_list = false;
    snprintf(d->cluster_id, sizeof d->cluster_id, "%s", bt_etcd_cluster_id(body));
    BT_DEBUG("etcd: listed %zu key(s) under %s at revision %" PRId64 " via %s", nn, d->prefix, rev, d->eps[r->ep]);
    ep_ok(d, r->ep);
    size_t i = 0, j = 0;
    while ((i < on || j < nn) && !d->closing) {
        int c = i >= on ? 1 : j >= nn ? -1 : strcmp(ov[i].key, nv[j].key);
        if (c < 0) {
            if (d->w.on_delete) d->w.on_delete(d->wud, ov[i].key);
            i++;
        } else if (c > 0 || ov[i].len != nv[j].len || memcmp(ov[i].text, nv[j].text, nv[j].len) != 0) {
            if (d->w.on_put) d->w.on_put(d->wud, nv[j].key, vals[j]);
            if (c == 0) i++;
            j++;
        } else {
            i++, j++;
        }
    }
    for (size_t k = 0; k < nn; k++) json_decref(vals[k]);
    free(vals);
    known_free(ov, on);
    watch_step(d);
}

/* Handles one stream message; false when the stream is over (or the handle closed). */
static bool watch_msg(etcd_disc *d, const char *text, size_t len) {
    ereq *r = d->watch_req;
    bt_etcd_wmsg m;
    if (bt_etcd_parse_watch_msg(text, len, &m) != BT_OK) {
        BT_WARN("etcd: unreadable watch message (%.*s…); restarting the watch", (int)(len > 80 ? 80 : len), text);
        watch_broke(d, false, "unreadable message");
        return false;
    }
    bool go_on = true;
    switch (m.kind) {
    case BT_ETCD_WMSG_CREATED:
        ep_ok(d, r->ep);
        if ((m.cluster_id[0] && d->cluster_id[0] && strcmp(m.cluster_id, d->cluster_id) != 0) ||
            m.header_revision + 1 < d->start_rev) {
            /* Another store (a new cluster, or one restored from a backup): revisions from the old
             * one mean nothing there. Only a fresh listing is exact. */
            BT_WARN("etcd: %s is another store (cluster %s at revision %" PRId64 "; we had cluster %s at revision "
                    "%" PRId64 "); listing again",
                    d->eps[r->ep], m.cluster_id[0] ? m.cluster_id : "?", m.header_revision,
                    d->cluster_id[0] ? d->cluster_id : "?", d->start_rev - 1);
            d->need_list = true;
            d->watch_fails = 0;
            watch_broke(d, false, "the store was replaced");
            go_on = false;
            break;
        }
        d->watch_created = true;
        d->watch_fails = 0;
        if (d->watch_was_up)
            BT_INFO("etcd: watch on %s resumed from revision %" PRId64 " via %s after %.1f s", d->prefix, d->start_rev,
                    d->eps[r->ep], (double)(bt_now_ms() - d->watch_broken_ms) / 1000.0);
        else BT_INFO("etcd: watching %s from revision %" PRId64 " via %s", d->prefix, d->start_rev, d->eps[r->ep]);
        break;
    case BT_ETCD_WMSG_EVENTS:
        for (size_t i = 0; i < m.nevents && go_on; i++) {
            if (m.events[i].mod_revision > d->last_rev) d->last_rev = m.events[i].mod_revision;
            go_on = apply_event(d, &m.events[i]);
        }
        break;
    case BT_ETCD_WMSG_PROGRESS:
        break;
    case BT_ETCD_WMSG_CANCELED:
        if (m.compact_revision > 0) {
            BT_WARN("etcd: revision %" PRId64 " of %s was compacted (compact revision %" PRId64 "); listing again",
                    d->start_rev, d->prefix, m.compact_revision);
            d->need_list = true;
            d->watch_fails = 0;
            watch_broke(d, false, "compacted");
        } else if (contains(m.reason, "auth") || contains(m.reason, "user name is empty") ||
                   contains(m.reason, "permission denied")) {
            token_rejected(d, r, m.reason);
            watch_broke(d, false, m.reason);
        } else {
            watch_broke(d, true, m.reason);
        }
        go_on = false;
        break;
    case BT_ETCD_WMSG_ERROR:
        watch_broke(d, true, m.reason);
        go_on = false;
        break;
    }
    bt_etcd_wmsg_free(&m);
    return go_on && !d->closing;
}

/* Delivers every complete message buffered on the watch stream. */
static void watch_drain(etcd_disc *d) {
    ereq *r = d->watch_req;
    while (r && r == d->watch_req && !d->closing) {
        char *start = r->resp.data + r->parsed;
        size_t avail = r->resp.len - r->parsed;
        char *nl = avail ? memchr(start, '\n', avail) : NULL;
        if (!nl) break;
        size_t len = (size_t)(nl - start);
        r->parsed += len + 1;
        if (len == 0 || (len == 1 && start[0] == '\r')) continue;
        if (!watch_msg(d, start, len)) return;
    }
    if (r && r == d->watch_req && r->parsed > 0 && r->parsed == r->resp.len) {
        bt_buf_reset(&r->resp);
        r->parsed = 0;
    } else if (r && r == d->watch_req && r->parsed > (1u << 16)) {
        bt_buf_consume(&r->resp, r->parsed);
        r->parsed = 0;
    }
}

/* The watch transfer `r` (still d->watch_req) finished: deliver what it left, then resume. */
static void watch_ended(etcd_disc *d, ereq *r, CURLcode cc) {
    long http = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    bool overflow = r->overflow;
    char why[300];
    if (overflow) snprintf(why, sizeof why, "a message over %u bytes", ETCD_MAX_STREAM_MSG);
    else if (cc != CURLE_OK) snprintf(why, sizeof why, "%s", r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
    else snprintf(why, sizeof why, "stream closed by the server (HTTP %ld)", http);
    watch_drain(d);
    /* Whatever followed the last newline may be a final message (an error without newline). */
    if (r == d->watch_req && r->resp.len > r->parsed && !d->closing) {
        size_t len = r->resp.len - r->parsed;
        char *start = r->resp.data + r->parsed;
        r->parsed = r->resp.len;
        if (!watch_msg(d, start, len)) return; /* it ended the stream itself; r is gone */
    }
    if (r != d->watch_req || d->closing) return;
    if (overflow) d->need_list = true; /* events were lost: only a listing is exact again */
    watch_broke(d, !overflow, why);
}

static void on_probe_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (d->closing || !d->watch_req || d->probe_req) return;
    d->probe_req = req_start(d, RQ_PROBE, d->watch_req->ep, "/v3/kv/range", bt_etcd_body_range(d->prefix, true),
                             ETCD_PROBE_TIMEOUT_MS);
}

static void probe_done(etcd_disc *d, ereq *r, bt_etcd_result res, const char *why) {
    d->probe_req = NULL;
    if (!d->watch_req || d->watch_req->ep != r->ep) return;
    if (res == BT_ETCD_AUTH) {
        token_rejected(d, r, why);
        ensure_auth(d);
        return;
    }
    if (res != BT_ETCD_RETRY) return;
    /* The member holding our stream does not answer (stopped, cut off, or without a leader): the
     * stream may be silent rather than closed. Move it. */
    char msg[300];
    snprintf(msg, sizeof msg, "member does not answer: %.250s", why);
    watch_broke(d, true, msg);
}

static bt_status etcd_watch(bt_discovery *base, const char *prefix, const bt_discovery_watcher *w, void *ud) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing || d->watching) return BT_ERR_INVALID;
    d->prefix = xstrdup(prefix);
    if (!d->prefix) return BT_ERR_NOMEM;
    d->w = *w;
    d->wud = ud;
    d->watching = true;
    d->need_list = true;
    uv_timer_start(&d->probe_timer, on_probe_timer, ETCD_PROBE_INTERVAL_MS, ETCD_PROBE_INTERVAL_MS);
    /* Started from the loop, so that no callback can run inside this call. */
    watch_retry(d, 0);
    return BT_OK;
}

/* ---- completion dispatch ------------------------------------------------------------------ */

static void revoke_done(etcd_disc *d, ereq *r, bt_etcd_result res, const char *why);

static void req_done(etcd_disc *d, ereq *r, CURLcode cc) {
    long http = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    json_t *body = NULL;
    if (cc == CURLE_OK && r->resp.len) body = json_loadb(r->resp.data, r->resp.len, 0, NULL);
    /* A streamed call (keep-alive) answers several lines; the first is the one we asked for. */
    if (!body && cc == CURLE_OK && r->resp.len) {
        char *nl = memchr(r->resp.data, '\n', r->resp.len);
        if (nl) body = json_loadb(r->resp.data, (size_t)(nl - r->resp.data), 0, NULL);
    }
    char why[400];
    bt_etcd_result res = bt_etcd_classify(cc == CURLE_OK, http, body, why, sizeof why);
    if (cc != CURLE_OK) snprintf(why, sizeof why, "%s", r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
    if (r->overflow) {
        snprintf(why, sizeof why, "answer larger than %u bytes", ETCD_MAX_RESPONSE);
        res = BT_ETCD_FAIL;
    }
    if (res == BT_ETCD_OK) ep_ok(d, r->ep);
    switch (r->kind) {
    case RQ_AUTH:
        auth_done(d, r, res, body, why);
        break;
    case RQ_GRANT:
    case RQ_PUT:
    case RQ_DEL:
        writer_done(d, r, res, body, why);
        break;
    case RQ_KEEPALIVE:
        ka_done(d, r, res, body, why);
        break;
    case RQ_REVOKE:
        revoke_done(d, r, res, why);
        break;
    case RQ_LIST:
        list_done(d, r, res, body, why);
        break;
    case RQ_PROBE:
        probe_done(d, r, res, why);
        break;
    case RQ_WATCH: /* handled by watch_ended */
        break;
    }
    json_decref(body);
}

/* Clears whichever machine pointer refers to r. */
static void forget_req(etcd_disc *d, ereq *r) {
    ereq **slots[] = {&d->auth_req, &d->w_req, &d->ka_req, &d->list_req, &d->watch_req, &d->probe_req,
                      &d->revoke_req};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        if (*slots[i] == r) *slots[i] = NULL;
}

/* Run after every libcurl step (common/curl_uv.h): stream data first (so that events that came
 * just before a stream's end are delivered), then finished transfers. User callbacks run only from
 * here, never from inside libcurl. */
static bool on_curl_step(void *ud) {
    etcd_disc *d = ud;
    if (d->finishing) return false;
    if (d->watch_req && d->watch_req->resp.len > d->watch_req->parsed) watch_drain(d);
    return !d->finishing;
}

static bool on_curl_done(void *ud, CURL *e, CURLcode cc) {
    etcd_disc *d = ud;
    ereq *r = NULL;
    curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&r);
    bt_curl_uv_remove(d->cu, e);
    if (r->kind == RQ_WATCH && r == d->watch_req && !d->closing) {
        watch_ended(d, r, cc); /* ends with r freed through watch_broke */
        return !d->finishing;
    }
    req_unlink(d, r);
    forget_req(d, r);
    if (!d->closing || r->kind == RQ_REVOKE || r->kind == RQ_AUTH) req_done(d, r, cc);
    req_free(r);
    return !d->finishing;
}

static const bt_curl_uv_hooks curl_hooks = {on_curl_step, on_curl_done, NULL};

/* ---- close -------------------------------------------------------------------------------- */

static void start_revoke(etcd_disc *d) {
    d->revoke_attempts++;
    d->revoke_req = req_start(d, RQ_REVOKE, d->cur, "/v3/lease/revoke", bt_etcd_body_lease(d->lease_id),
                              ETCD_REVOKE_TIMEOUT_MS);
    if (!d->revoke_req) finish_close(d);
}

/* Revoking is bounded: each attempt ETCD_REVOKE_TIMEOUT_MS, at most ETCD_REVOKE_ATTEMPTS members.
 * A lease that could not be revoked expires by itself after its TTL. */
static void revoke_done(etcd_disc *d, ereq *r, bt_etcd_result res, const char *why) {
    d->revoke_req = NULL;
    if (res == BT_ETCD_OK || res == BT_ETCD_LEASE_GONE) {
        BT_INFO("etcd: lease %" PRIx64 " revoked: every key written with it is gone", (uint64_t)d->lease_id);
    } else if (res == BT_ETCD_AUTH && d->user && d->revoke_attempts < ETCD_REVOKE_ATTEMPTS) {
        /* The token expired: one fresh one, within the same bound. */
        free(d->token);
        d->token = NULL;
        d->revoke_attempts++;
        json_t *j = json_pack("{s:s, s:s}", "name", d->user, "password", d->pass ? d->pass : "");
        d->auth_req = req_start(d, RQ_AUTH, d->cur, "/v3/auth/authenticate", dump_free(j), ETCD_REVOKE_TIMEOUT_MS);
        if (d->auth_req) return;
        finish_close(d);
        return;
    } else if (res == BT_ETCD_RETRY && d->revoke_attempts < ETCD_REVOKE_ATTEMPTS && d->revoke_attempts < d->neps) {
        ep_failed(d, r->ep, RQ_REVOKE, why);
        start_revoke(d);
        return;
    } else {
        BT_WARN("etcd: cannot revoke lease %" PRIx64 " (%s); its keys expire within %" PRId64 " s",
                (uint64_t)d->lease_id, why, d->lease_ttl_s);
    }
    d->lease_id = 0;
    finish_close(d);
}

static void free_disc(etcd_disc *d) {
    while (d->owned) {
        owned *o = d->owned;
        d->owned = o->next;
        free_owned(o);
    }
    while (d->dels) {
        pdel *x = d->dels;
        d->dels = x->next;
        free(x->key);
        free(x);
    }
    known_free(d->known, d->nknown);
    bt_etcd_endpoints_free(d->eps, d->neps);
    free(d->prefix);
    free(d->user);
    free(d->pass);
    free(d->token);
    free(d->ca);
    free(d->cert);
    free(d->key);
    free(d);
}

static void handle_closed(uv_handle_t *h) {
    etcd_disc *d = h->data;
    if (--d->handles_open == 0) finish_close(d);
}

static void on_cu_closed(void *ud) {
    etcd_disc *d = ud;
    if (--d->handles_open == 0) finish_close(d);
}

/* Tears everything down: transfers, libcurl, timers and polls; frees the handle and calls done
 * once the last libuv handle has closed. Called again from each close callback until then. */
static void finish_close(etcd_disc *d) {
    if (!d->finishing) {
        d->finishing = true;
        while (d->reqs) req_abort(d, d->reqs);
        d->auth_req = d->w_req = d->ka_req = d->list_req = d->watch_req = d->probe_req = d->revoke_req = NULL;
        /* Closes cached connections, libcurl's timer and its sockets' polls. */
        d->handles_open++;
        bt_curl_uv_close(d->cu, on_cu_closed, d);
        d->cu = NULL;
        uv_timer_t *timers[] = {&d->auth_timer, &d->w_timer, &d->ka_timer, &d->watch_timer, &d->probe_timer};
        for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
            d->handles_open++;
            uv_close((uv_handle_t *)timers[i], handle_closed);
        }
        return;
    }
    if (d->handles_open > 0) return;
    void (*done)(void *) = d->done;
    void *ud = d->done_ud;
    free_disc(d);
    if (done) done(ud);
}

/* Stops the machines and every transfer, then revokes the lease, which removes every key written
 * with it at once. Safe inside a watcher callback: the code that made the callback checks
 * `closing` before touching anything again, and the handle itself is freed only from the close
 * callbacks of its libuv handles, on a later loop turn. */
static void etcd_close(bt_discovery *base, void (*done)(void *ud), void *ud) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return;
    d->closing = true;
    d->done = done;
    d->done_ud = ud;
    uv_timer_stop(&d->w_timer);
    uv_timer_stop(&d->ka_timer);
    uv_timer_stop(&d->watch_timer);
    uv_timer_stop(&d->probe_timer);
    uv_timer_stop(&d->auth_timer);
    while (d->reqs) req_abort(d, d->reqs);
    d->auth_req = d->w_req = d->ka_req = d->list_req = d->watch_req = d->probe_req = NULL;
    if (d->lease_id) start_revoke(d);
    else finish_close(d);
}

static const bt_discovery_ops etcd_ops = {
    .name = "etcd",
    .put = etcd_put,
    .del = etcd_del,
    .watch = etcd_watch,
    .close = etcd_close,
};

/* A TLS file must be readable at start-up: a wrong path is reported now, not as TLS failures
 * retried for ever. Start-up only (before the loop runs): the read blocks. */
static bool tls_file_ok(const char *what, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    int en = errno;
    if (f) {
        char c;
        size_t n = fread(&c, 1, 1, f);
        en = ferror(f) ? errno : 0;
        fclose(f);
        if (n == 1) return true;
    }
    snprintf(err, errlen, "%s '%s' cannot be read: %s", what, path, en ? strerror(en) : "the file is empty");
    return false;
}

/* Checks the TLS settings; true when they can be used. */
static bool tls_config_ok(const bt_discovery_config *cfg, char *err, size_t errlen) {
    bool has_cert = cfg->etcd_client_cert && *cfg->etcd_client_cert;
    bool has_key = cfg->etcd_client_key && *cfg->etcd_client_key;
    if (has_cert != has_key) {
        snprintf(err, errlen, "etcd client TLS needs both a certificate and its key: ETCD_AUTH_%s "
                              "(--etcd-client-%s) is not set", has_cert ? "CLIENT_KEY" : "CLIENT_CERT",
                 has_cert ? "key" : "cert");
        return false;
    }
    if (cfg->etcd_ca && *cfg->etcd_ca && !tls_file_ok("ETCD_AUTH_CA (--etcd-ca)", cfg->etcd_ca, err, errlen))
        return false;
    if (has_cert && !tls_file_ok("ETCD_AUTH_CLIENT_CERT (--etcd-client-cert)", cfg->etcd_client_cert, err, errlen))
        return false;
    if (has_key && !tls_file_ok("ETCD_AUTH_CLIENT_KEY (--etcd-client-key)", cfg->etcd_client_key, err, errlen))
        return false;
    return true;
}

static bool opt_dup(const char *s, char **out) {
    *out = NULL;
    if (!s || !*s) return true;
    *out = xstrdup(s);
    return *out != NULL;
}

bt_status bt_discovery_etcd_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                                   size_t errlen) {
    if (cfg->ttl_s < 1 || cfg->ttl_s > 86400) {
        snprintf(err, errlen, "discovery ttl must be between 1 and 86400 seconds, got %lld", (long long)cfg->ttl_s);
        return BT_ERR_INVALID;
    }
    bt_discovery_config def;
    bt_discovery_config_default(&def);
    const char *list = (cfg->etcd_endpoints && *cfg->etcd_endpoints) ? cfg->etcd_endpoints : def.etcd_endpoints;
    char **eps = NULL;
    size_t neps = 0;
    bt_status st = bt_etcd_parse_endpoints(list, &eps, &neps, err, errlen);
    if (st != BT_OK) return st;
    if (!tls_config_ok(cfg, err, errlen)) {
        bt_etcd_endpoints_free(eps, neps);
        return BT_ERR_INVALID;
    }
    if (!bt_curl_uv_global_init()) {
        bt_etcd_endpoints_free(eps, neps);
        snprintf(err, errlen, "libcurl initialisation failed");
        return BT_ERR_INTERNAL;
    }
    etcd_disc *d = calloc(1, sizeof *d);
    if (!d) goto nomem;
    d->eps = eps;
    d->neps = neps;
    eps = NULL;
    if (cfg->etcd_username && *cfg->etcd_username) {
        d->user = xstrdup(cfg->etcd_username);
        d->pass = xstrdup(cfg->etcd_password ? cfg->etcd_password : "");
        if (!d->user || !d->pass) goto nomem;
    }
    if (!opt_dup(cfg->etcd_ca, &d->ca) || !opt_dup(cfg->etcd_client_cert, &d->cert) ||
        !opt_dup(cfg->etcd_client_key, &d->key))
        goto nomem;
    d->cu = bt_curl_uv_create(loop, &curl_hooks, d);
    if (!d->cu) goto nomem;
    d->base.ops = &etcd_ops;
    d->ttl_s = cfg->ttl_s;
    d->contact = true;
    uv_timer_t *timers[] = {&d->auth_timer, &d->w_timer, &d->ka_timer, &d->watch_timer, &d->probe_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = d;
    }
    char eplist[512] = "";
    size_t off = 0;
    for (size_t i = 0; i < d->neps && off < sizeof eplist; i++)
        off += (size_t)snprintf(eplist + off, sizeof eplist - off, "%s%s", i ? "," : "", d->eps[i]);
    bool https = false;
    for (size_t i = 0; i < d->neps; i++) https = https || strncmp(d->eps[i], "https://", 8) == 0;
    BT_INFO("discovery(etcd): endpoints %s, lease TTL %lld s%s%s%s%s", eplist, (long long)d->ttl_s,
            d->user ? ", auth as " : "", d->user ? d->user : "", https && d->ca ? ", CA " : "",
            https && d->ca ? d->ca : "");
    if (https && d->cert) BT_INFO("discovery(etcd): TLS client certificate %s", d->cert);
    if (!https && (d->ca || d->cert))
        BT_WARN("discovery(etcd): ETCD_AUTH_CA / ETCD_AUTH_CLIENT_CERT are set but no endpoint is https://: "
                "they are not used");
    *out = &d->base;
    return BT_OK;
nomem:
    bt_etcd_endpoints_free(eps, neps);
    if (d) {
        bt_etcd_endpoints_free(d->eps, d->neps);
        free(d->user);
        free(d->pass);
        free(d->ca);
        free(d->cert);
        free(d->key);
        free(d);
    }
    snprintf(err, errlen, "out of memory");
    return BT_ERR_NOMEM;
}
