/* fuzz_discovery.c — libFuzzer driver for what baton parses from its control plane: the
 * frontend's parser of a discovery instance value (fe_parse_instance, src/frontend/workers.c), the
 * file backend's key ↔ file-name encoding (src/discovery/file.c), the etcd backend's parsers of
 * gateway answers, base64 and endpoint lists (src/discovery/etcd.c), and the event plane's load
 * report payload (src/events/events.c).
 *
 * The first input byte picks the target; the rest is its input. Each target is checked against
 * its contract, not only run: an accepted instance has a port in 1..65535 and NUL-terminated
 * fields that are prefixes of the value's strings, and nothing else of the worker is touched;
 * encode/decode, base64 and load reports round-trip; the range end of a prefix is the smallest
 * key above every key with that prefix; parsed gateway answers hold well-formed key-values.
 * A violated invariant aborts, so libFuzzer reports it like a crash. Seeds are in
 * fuzz/corpus/discovery/; build and run with fuzz/build.sh. */
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "discovery/discovery_internal.h"
#include "events/events.h"
#include "frontend/fe.h"

#include "check.h"

/* s is a NUL-terminated string inside a char array of `cap` bytes */
#define TERMINATED(arr) (memchr((arr), 0, sizeof(arr)) != NULL)

/* a copy of p[0..n) with a NUL after it (embedded NULs cut the string short for C-string APIs) */
static char *cstr(const uint8_t *p, size_t n) {
    char *s = malloc(n + 1);
    CHECK(s != NULL);
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/* field holds a (possibly cut) copy of the JSON string v */
static void check_prefix_of(const char *field, size_t cap, const json_t *v) {
    CHECK(memchr(field, 0, cap) != NULL);
    size_t l = strlen(field);
    CHECK(l < cap);
    const char *s = json_string_value(v);
    CHECK(s != NULL && strncmp(field, s, l) == 0);
    CHECK(l == strlen(s) || l == cap - 1);
}

static void fuzz_instance(const uint8_t *p, size_t n) {
    json_error_t je;
    json_t *v = json_loadb((const char *)p, n, JSON_DECODE_ANY, &je); /* as the file backend reads it */
    if (!v) return;
    fe_worker *w = calloc(1, sizeof *w);
    CHECK(w != NULL);
    char err[192];
    err[0] = 'x';
    if (!fe_parse_instance(v, w, err, sizeof err)) {
        CHECK(memchr(err, 0, sizeof err) && err[0] != '\0');
    } else {
        const json_t *jid = json_object_get(v, "instance_id");
        const json_t *jmodel = json_object_get(v, "model");
        CHECK(json_is_integer(jid) && w->id == (uint64_t)json_integer_value(jid));
        check_prefix_of(w->transport, sizeof w->transport, json_object_get(json_object_get(v, "transport"), "tcp"));
        check_prefix_of(w->model, sizeof w->model, json_object_get(jmodel, "name"));
        if (json_is_string(json_object_get(v, "namespace")))
            check_prefix_of(w->ns, sizeof w->ns, json_object_get(v, "namespace"));
        else CHECK(w->ns[0] == '\0');
        CHECK(TERMINATED(w->component) && TERMINATED(w->endpoint) && TERMINATED(w->host));
        CHECK(w->port >= 1 && w->port <= 65535);
        /* host and port are what the transport says: host before the last ':' (brackets of
         * "[v6]" dropped), port the number after it, up to an optional '/' */
        const char *colon = strrchr(w->transport, ':');
        CHECK(colon != NULL && colon != w->transport);
        size_t hl = (size_t)(colon - w->transport);
        if (w->transport[0] == '[' && hl > 2 && w->transport[hl - 1] == ']')
            CHECK(strlen(w->host) == hl - 2 && memcmp(w->host, w->transport + 1, hl - 2) == 0);
        else CHECK(strlen(w->host) == hl && memcmp(w->host, w->transport, hl) == 0);
        char *pend;
        long port = strtol(colon + 1, &pend, 10);
        CHECK(port == w->port && (*pend == '\0' || *pend == '/'));
        if (w->block_size) CHECK(json_integer_value(json_object_get(jmodel, "block_size")) > 0);
        if (json_is_string(json_object_get(jmodel, "exactness")))
            check_prefix_of(w->exactness, sizeof w->exactness, json_object_get(jmodel, "exactness"));
        else CHECK(w->exactness[0] == '\0');
        /* nothing but the identity fields */
        CHECK(w->fe == NULL && w->conn == NULL && w->key[0] == '\0' && w->streams.len == 0 &&
              LIST_NEXT(w, link) == NULL);
        CHECK(!w->in_discovery && !w->quarantined && w->state == 0 && w->load_ms == 0);
    }
    free(w);
    json_decref(v);
}

static void fuzz_file_key(const uint8_t *p, size_t n) {
    char *key = cstr(p, n);
    char name[BT_DISCOVERY_FILE_NAME_MAX + 1], back[BT_DISCOVERY_FILE_NAME_MAX * 3 + 1];
    int e = bt_discovery_file_encode_key(key, name, sizeof name);
    if (e >= 0) {
        CHECK(key[0] != '\0');
        CHECK((size_t)e == strlen(name) && e <= BT_DISCOVERY_FILE_NAME_MAX);
        CHECK(strchr(name, '/') == NULL && name[0] != '.' && name[0] != '\0');
        int d = bt_discovery_file_decode_name(name, back, sizeof back);
        CHECK(d >= 0 && (size_t)d == strlen(key) && strcmp(back, key) == 0);
    } else {
        /* only an empty key or one whose name is too long is refused */
        size_t need = 0;
        for (const char *q = key; *q; q++) need += (*q == '/' || *q == '%' || (*q == '.' && q == key)) ? 3 : 1;
        CHECK(key[0] == '\0' || need > BT_DISCOVERY_FILE_NAME_MAX);
    }
    /* the input as a file name found in the directory */
    int d = bt_discovery_file_decode_name(key, back, sizeof back);
    if (d >= 0) {
        CHECK(d > 0 && (size_t)d == strlen(back));
        char name2[BT_DISCOVERY_FILE_NAME_MAX + 1], back2[sizeof back];
        if (bt_discovery_file_encode_key(back, name2, sizeof name2) >= 0) {
            int d2 = bt_discovery_file_decode_name(name2, back2, sizeof back2);
            CHECK(d2 == d && strcmp(back2, back) == 0);
        }
    }
    free(key);
}

static void check_kv(const bt_etcd_kv *kv) {
    CHECK(kv->key != NULL && kv->key[0] != '\0' && kv->value != NULL);
    CHECK(kv->value[kv->vlen] == '\0');
    if (kv->is_delete) CHECK(kv->vlen == 0);
}

static void fuzz_etcd_answer(const uint8_t *p, size_t n) {
    bt_etcd_wmsg m;
    bt_status st = bt_etcd_parse_watch_msg((const char *)p, n, &m);
    if (st == BT_OK) {
        CHECK(m.kind >= BT_ETCD_WMSG_CREATED && m.kind <= BT_ETCD_WMSG_ERROR);
        CHECK(TERMINATED(m.reason) && TERMINATED(m.cluster_id));
        CHECK((m.nevents == 0) || (m.kind == BT_ETCD_WMSG_EVENTS && m.events != NULL));
        for (size_t i = 0; i < m.nevents; i++) check_kv(&m.events[i]);
        bt_etcd_wmsg_free(&m);
    } else {
        CHECK(m.events == NULL && m.nevents == 0);
    }
    json_t *j = json_loadb((const char *)p, n, JSON_DECODE_ANY, NULL);
    bt_etcd_kv *kvs;
    size_t nkv;
    int64_t rev;
    if (bt_etcd_parse_range(j, &kvs, &nkv, &rev) == BT_OK) {
        for (size_t i = 0; i < nkv; i++) check_kv(&kvs[i]);
        bt_etcd_kvs_free(kvs, nkv);
    } else {
        CHECK(kvs == NULL && nkv == 0);
    }
    const char *cid = bt_etcd_cluster_id(j);
    CHECK(cid != NULL && strlen(cid) < 24);
    char why[128];
    long http = n ? (long)p[0] * 3 : 200;
    for (int t = 0; t < 2; t++) {
        why[0] = 'x';
        bt_etcd_result r = bt_etcd_classify(t == 1, http, j, why, sizeof why);
        CHECK(r >= BT_ETCD_OK && r <= BT_ETCD_FAIL);
        CHECK(memchr(why, 0, sizeof why) != NULL);
        if (t == 0) CHECK(r == BT_ETCD_RETRY);
        if (r == BT_ETCD_OK) CHECK(http == 200 && json_is_object(j));
    }
    json_decref(j);
}

static void fuzz_etcd_pieces(const uint8_t *p, size_t n) {
    /* base64: bytes → text → bytes; text → bytes → canonical text → the same bytes */
    size_t cap = (n + 2) / 3 * 4 + 1;
    char *enc = malloc(cap);
    uint8_t *dec = malloc(n + 1);
    CHECK(enc && dec);
    CHECK(bt_etcd_b64_encode(p, n, enc, cap) == (int)(cap - 1));
    CHECK(bt_etcd_b64_encode(p, n, enc, cap - 1) == -1);
    CHECK(bt_etcd_b64_decode(enc, cap - 1, dec, n + 1) == (int)n && memcmp(dec, p, n) == 0);
    int d = bt_etcd_b64_decode((const char *)p, n, dec, n + 1);
    if (d >= 0) {
        CHECK((size_t)d <= n);
        char *enc2 = malloc(((size_t)d + 2) / 3 * 4 + 1);
        uint8_t *dec2 = malloc((size_t)d + 1);
        CHECK(enc2 && dec2);
        int e2 = bt_etcd_b64_encode(dec, (size_t)d, enc2, ((size_t)d + 2) / 3 * 4 + 1);
        CHECK(e2 >= 0);
        CHECK(bt_etcd_b64_decode(enc2, (size_t)e2, dec2, (size_t)d + 1) == d && memcmp(dec2, dec, (size_t)d) == 0);
        free(enc2);
        free(dec2);
    }
    free(enc);
    free(dec);

    /* range end: keys with the prefix sort below it, the prefix itself is below it */
    char *end = malloc(n + 1);
    CHECK(end != NULL);
    size_t el = bt_etcd_prefix_end((const char *)p, n, end);
    size_t keep = n;
    while (keep > 0 && p[keep - 1] == 0xff) keep--;
    if (keep == 0) {
        CHECK(el == 1 && end[0] == '\0');
    } else {
        CHECK(el == keep && memcmp(end, p, keep - 1) == 0 && (uint8_t)end[keep - 1] == p[keep - 1] + 1);
    }
    free(end);

    /* endpoint lists */
    char *list = cstr(p, n);
    char **eps;
    size_t nep;
    char err[256];
    err[0] = 'x';
    if (bt_etcd_parse_endpoints(list, &eps, &nep, err, sizeof err) == BT_OK) {
        for (size_t i = 0; i < nep; i++) {
            CHECK(eps[i] != NULL);
            CHECK(strncmp(eps[i], "http://", 7) == 0 || strncmp(eps[i], "https://", 8) == 0);
            CHECK(strchr(eps[i], ',') == NULL);
            /* something after the scheme, not ending in '/' (blanks inside an item are kept) */
            const char *rest = strstr(eps[i], "://") + 3;
            size_t l = strlen(rest);
            CHECK(l > 0 && rest[l - 1] != '/');
        }
        bt_etcd_endpoints_free(eps, nep);
    } else {
        CHECK(eps == NULL && nep == 0 && memchr(err, 0, sizeof err) && err[0] != '\0');
    }
    free(list);
}

static void fuzz_load(const uint8_t *p, size_t n) {
    uint64_t id;
    bt_load_report r;
    char err[160];
    err[0] = 'x';
    if (bt_events_decode_load((const char *)p, n, &id, &r, err, sizeof err) != BT_OK) {
        CHECK(memchr(err, 0, sizeof err) && err[0] != '\0');
        return;
    }
    CHECK((r.flags & ~BT_LOAD_READY) == 0 || bt_load_get_preempt(&r, NULL, NULL)); /* READY, or the preemption fields */
    char buf[1024];
    size_t len = bt_events_encode_load(buf, sizeof buf, id, &r);
    CHECK(len > 0 && len < sizeof buf);
    uint64_t id2;
    bt_load_report r2;
    CHECK(bt_events_decode_load(buf, len, &id2, &r2, err, sizeof err) == BT_OK);
    CHECK(id2 == id && memcmp(&r, &r2, sizeof r) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static bool inited;
    if (!inited) {
        setenv("DYN_LOG", "error", 1);
        bt_log_init("fuzz");
        inited = true;
    }
    if (size < 1) return 0;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    switch (data[0] % 5) {
    case 0: fuzz_instance(p, n); break;
    case 1: fuzz_file_key(p, n); break;
    case 2: fuzz_etcd_answer(p, n); break;
    case 3: fuzz_etcd_pieces(p, n); break;
    default: fuzz_load(p, n); break;
    }
    return 0;
}
