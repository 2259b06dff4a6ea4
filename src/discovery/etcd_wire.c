/* etcd_wire.c — the etcd backend's wire codec: the JSON bodies of etcd's v3 gateway calls
 * (put, delete, range, watch, lease, authenticate), the parsers of its answers (ranges, watch
 * stream messages, cluster ids) and the classification of an answer into what the caller should
 * do next (bt_etcd_result). Pure functions: no I/O, no loop, no allocation that outlives the call
 * except what a function returns. Unit-tested (tests/unit/test_discovery_etcd.c) and fuzzed
 * (fuzz/fuzz_discovery.c). The machines that use it are in etcd_call.c, etcd_lease.c and
 * etcd_watch.c. */
#include "discovery/discovery_internal.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

#define ETCD_MAX_ENDPOINTS 16

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
    const char *a;
    size_t alen;
    for (const char *pos = list; bt_list_next(&pos, &a, &alen);) {
        const char *b = a + alen;
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

char *bt_etcd_body_grant(int64_t ttl_s) { return dump_free(json_pack("{s:o}", "TTL", i64_json(ttl_s))); }

char *bt_etcd_body_auth(const char *user, const char *password) {
    return dump_free(json_pack("{s:s, s:s}", "name", user, "password", password ? password : ""));
}

bool bt_etcd_json_i64(const json_t *v, int64_t *out) {
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

bool bt_etcd_reason_is_auth(const char *reason) {
    return contains(reason, "auth") || contains(reason, "user name is empty") || contains(reason, "permission denied");
}

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
        if (!bt_etcd_json_i64(json_object_get(body, "code"), &code) || code == 0)
            bt_etcd_json_i64(json_object_get(e, "grpc_code"), &code);
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
    if (!bt_etcd_json_i64(json_object_get(kv, "mod_revision"), &out->mod_revision)) goto bad;
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
    if (!hrev || !bt_etcd_json_i64(hrev, revision)) return BT_ERR_PROTOCOL;
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
    if (!bt_etcd_json_i64(json_object_get(json_object_get(r, "header"), "revision"), &out->header_revision) ||
        !bt_etcd_json_i64(json_object_get(r, "compact_revision"), &out->compact_revision)) {
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
