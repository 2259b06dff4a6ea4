/* test_discovery_etcd.c — unit tests of the etcd discovery backend without an etcd server.
 *
 * The pure pieces: base64, prefix range ends, endpoint lists, request bodies (decoded back and
 * compared), the classification of gateway answers, and the parsing of range answers and watch
 * stream messages — the latter fed with messages captured from etcd 3.4's gateway. Then the
 * handle on a loop with no server behind its endpoints: it must report nothing, keep retrying,
 * and close within its bound. Real-server behaviour is tested in tests/integration/test_etcd*.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/util.h"
#include "discovery/discovery.h"
#include "discovery/discovery_internal.h"

/* ---- base64 -------------------------------------------------------------------------------- */

static void test_b64_vectors(void **state) {
    (void)state;
    /* RFC 4648 §10 */
    static const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    static const char *enc[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    char out[64], back[64];
    for (size_t i = 0; i < 7; i++) {
        int n = bt_etcd_b64_encode(plain[i], strlen(plain[i]), out, sizeof out);
        assert_int_equal(n, (int)strlen(enc[i]));
        assert_string_equal(out, enc[i]);
        int m = bt_etcd_b64_decode(enc[i], strlen(enc[i]), back, sizeof back);
        assert_int_equal(m, (int)strlen(plain[i]));
        assert_memory_equal(back, plain[i], (size_t)m);
    }
    /* unpadded input is accepted too */
    assert_int_equal(bt_etcd_b64_decode("Zm9vYg", 6, back, sizeof back), 4);
    assert_memory_equal(back, "foob", 4);
    /* the key etcd showed for v1/instances/a */
    assert_int_equal(bt_etcd_b64_decode("djEvaW5zdGFuY2VzL2E=", 20, back, sizeof back), 14);
    assert_memory_equal(back, "v1/instances/a", 14);
    /* invalid: bad characters, impossible length, non-canonical bits, too small output */
    assert_int_equal(bt_etcd_b64_decode("Zm9v!A==", 8, back, sizeof back), -1);
    assert_int_equal(bt_etcd_b64_decode("Zm9vY", 5, back, sizeof back), -1);
    assert_int_equal(bt_etcd_b64_decode("Zh==", 4, back, sizeof back), -1);
    assert_int_equal(bt_etcd_b64_decode("Zm9vYmFy", 8, back, 5), -1);
    assert_int_equal(bt_etcd_b64_encode("foobar", 6, out, 8), -1); /* needs 9 with the NUL */
    assert_int_equal(bt_etcd_b64_encode("foobar", 6, out, 9), 8);
}

static void test_b64_roundtrip(void **state) {
    (void)state;
    unsigned char in[300] = {0}, back[300];
    char enc[512];
    uint64_t x = 42;
    for (size_t len = 0; len < sizeof in; len += 7) {
        for (size_t i = 0; i < len; i++) in[i] = (unsigned char)((x = bt_mix64(x)) & 0xff);
        int n = bt_etcd_b64_encode(in, len, enc, sizeof enc);
        assert_true(n >= 0 && (size_t)n == (len + 2) / 3 * 4);
        int m = bt_etcd_b64_decode(enc, (size_t)n, back, sizeof back);
        assert_int_equal(m, (int)len);
        if (len) assert_memory_equal(in, back, len);
    }
}

/* ---- prefix range, endpoints ------------------------------------------------------------- */

static void test_prefix_end(void **state) {
    (void)state;
    char out[16];
    assert_int_equal(bt_etcd_prefix_end("v1/", 3, out), 3);
    assert_memory_equal(out, "v10", 3);
    assert_int_equal(bt_etcd_prefix_end("a\xff", 2, out), 1);
    assert_memory_equal(out, "b", 1);
    assert_int_equal(bt_etcd_prefix_end("\xff\xff", 2, out), 1);
    assert_int_equal(out[0], 0);
    assert_int_equal(bt_etcd_prefix_end("", 0, out), 1);
    assert_int_equal(out[0], 0);
}

static void test_endpoints(void **state) {
    (void)state;
    char **eps;
    size_t n;
    char err[200];
    const char *list = " 127.0.0.1:2379, http://h2:2379/ ,,https://h3 ";
    assert_int_equal(bt_etcd_parse_endpoints(list, &eps, &n, err, sizeof err), BT_OK);
    assert_int_equal(n, 3);
    assert_string_equal(eps[0], "http://127.0.0.1:2379");
    assert_string_equal(eps[1], "http://h2:2379");
    assert_string_equal(eps[2], "https://h3");
    bt_etcd_endpoints_free(eps, n);

    assert_int_equal(bt_etcd_parse_endpoints("", &eps, &n, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "no etcd endpoint"));
    assert_null(eps);
    assert_int_equal(bt_etcd_parse_endpoints(" , ", &eps, &n, err, sizeof err), BT_ERR_INVALID);
    assert_int_equal(bt_etcd_parse_endpoints("h1:1,unix://x", &eps, &n, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "only http"));
    assert_int_equal(bt_etcd_parse_endpoints("http://", &eps, &n, err, sizeof err), BT_ERR_INVALID);
    char many[400] = "";
    for (int i = 0; i < 17; i++) {
        size_t l = strlen(many);
        snprintf(many + l, sizeof many - l, "%sh%d:1", i ? "," : "", i);
    }
    assert_int_equal(bt_etcd_parse_endpoints(many, &eps, &n, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "more than 16"));
}

/* ---- request bodies ----------------------------------------------------------------------- */

/* Checks that the string field `name` of obj is the base64 of want. */
static void expect_b64_field(const json_t *obj, const char *name, const char *want) {
    char out[256];
    const char *s = json_string_value(json_object_get(obj, name));
    assert_non_null(s);
    int n = bt_etcd_b64_decode(s, strlen(s), out, sizeof out - 1);
    assert_true(n >= 0);
    out[n] = '\0';
    assert_string_equal(out, want);
}

/* Parses a request body (which it frees); the body must be JSON. */
static json_t *body_json(char *body) {
    assert_non_null(body);
    json_t *j = json_loads(body, 0, NULL);
    free(body);
    assert_non_null(j);
    return j;
}

static void test_bodies(void **state) {
    (void)state;
    json_t *j = body_json(bt_etcd_body_put("v1/instances/ns/c/e/1f", "{\"a\":1}", 7, 7587869302440558853LL));
    expect_b64_field(j, "key", "v1/instances/ns/c/e/1f");
    expect_b64_field(j, "value", "{\"a\":1}");
    assert_string_equal(json_string_value(json_object_get(j, "lease")), "7587869302440558853");
    json_decref(j);

    j = body_json(bt_etcd_body_put("k", "", 0, 0)); /* no lease: no lease field; empty value */
    assert_null(json_object_get(j, "lease"));
    assert_string_equal(json_string_value(json_object_get(j, "value")), "");
    json_decref(j);

    j = body_json(bt_etcd_body_watch("v1/instances/dynamo/", 42));
    json_t *c = json_object_get(j, "create_request");
    assert_non_null(c);
    expect_b64_field(c, "key", "v1/instances/dynamo/");
    expect_b64_field(c, "range_end", "v1/instances/dynamo0");
    assert_string_equal(json_string_value(json_object_get(c, "start_revision")), "42");
    json_decref(j);

    j = body_json(bt_etcd_body_watch("", 0)); /* whole keyspace, from now */
    c = json_object_get(j, "create_request");
    assert_string_equal(json_string_value(json_object_get(c, "key")), "AA==");
    assert_string_equal(json_string_value(json_object_get(c, "range_end")), "AA==");
    assert_null(json_object_get(c, "start_revision"));
    json_decref(j);

    j = body_json(bt_etcd_body_range("v1/", true));
    assert_true(json_is_true(json_object_get(j, "count_only")));
    expect_b64_field(j, "range_end", "v10");
    json_decref(j);

    char *s = bt_etcd_body_lease(-1); /* any int64, as a string */
    assert_string_equal(s, "{\"ID\":\"-1\"}");
    free(s);
    s = bt_etcd_body_delete("a/b");
    assert_string_equal(s, "{\"key\":\"YS9i\"}");
    free(s);
}

/* ---- answers ------------------------------------------------------------------------------ */

static bt_etcd_result classify_text(bool ok, long http, const char *text) {
    json_t *j = text ? json_loads(text, 0, NULL) : NULL;
    char why[300];
    bt_etcd_result r = bt_etcd_classify(ok, http, j, why, sizeof why);
    assert_true(r == BT_ETCD_OK || why[0] != '\0'); /* every failure says why */
    json_decref(j);
    return r;
}

static void test_classify(void **state) {
    (void)state;
    assert_int_equal(classify_text(false, 0, NULL), BT_ETCD_RETRY);
    assert_int_equal(classify_text(true, 200, "{\"header\":{\"revision\":\"2\"}}"), BT_ETCD_OK);
    assert_int_equal(classify_text(true, 404,
                                   "{\"error\":\"etcdserver: requested lease not found\",\"message\":\"etcdserver: "
                                   "requested lease not found\",\"code\":5}"),
                     BT_ETCD_LEASE_GONE);
    assert_int_equal(classify_text(true, 401,
                                   "{\"error\":\"etcdserver: invalid auth token\",\"message\":\"etcdserver: invalid "
                                   "auth token\",\"code\":16}"),
                     BT_ETCD_AUTH);
    assert_int_equal(classify_text(true, 400,
                                   "{\"error\":\"etcdserver: user name is empty\",\"message\":\"etcdserver: user name "
                                   "is empty\",\"code\":3}"),
                     BT_ETCD_AUTH);
    assert_int_equal(classify_text(true, 400,
                                   "{\"error\":\"etcdserver: authentication failed, invalid user ID or password\","
                                   "\"code\":3}"),
                     BT_ETCD_FAIL);
    assert_int_equal(classify_text(true, 403, "{\"error\":\"etcdserver: permission denied\",\"code\":7}"),
                     BT_ETCD_FAIL);
    assert_int_equal(classify_text(true, 503, "{\"error\":\"etcdserver: no leader\",\"code\":14}"), BT_ETCD_RETRY);
    assert_int_equal(classify_text(true, 504, "{\"error\":\"etcdserver: request timed out\",\"code\":4}"),
                     BT_ETCD_RETRY);
    assert_int_equal(classify_text(true, 503, "{\"error\":\"etcdserver: too many requests\",\"code\":8}"),
                     BT_ETCD_RETRY);
    /* a member without a leader, seen on etcd 3.4.23: a unary call without the require-leader
     * metadata, and a streamed call (keep-alive) with it */
    assert_int_equal(classify_text(true, 500, "{\"error\":\"context deadline exceeded\",\"code\":2}"),
                     BT_ETCD_RETRY);
    assert_int_equal(classify_text(true, 503,
                                   "{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"etcdserver: no "
                                   "leader\",\"http_status\":\"Service Unavailable\"}}"),
                     BT_ETCD_RETRY);
    assert_int_equal(classify_text(true, 502, NULL), BT_ETCD_RETRY); /* a proxy's HTML error page */
    assert_int_equal(classify_text(true, 404, "{}"), BT_ETCD_FAIL);     /* wrong path: retrying will not help */
    assert_int_equal(classify_text(true, 200, NULL), BT_ETCD_RETRY);    /* 200 but not JSON: a broken answer */
}

static void test_parse_range(void **state) {
    (void)state;
    const char *text =
        "{\"header\":{\"cluster_id\":\"15118495548433857066\",\"member_id\":\"13668033151171901709\",\"revision\":"
        "\"7\",\"raft_term\":\"2\"},\"kvs\":[{\"key\":\"djEvaW5zdGFuY2VzL2E=\",\"create_revision\":\"2\","
        "\"mod_revision\":\"5\",\"version\":\"1\",\"value\":\"e30=\",\"lease\":\"4111120269024436743\"},"
        "{\"key\":\"djEveA==\",\"mod_revision\":\"6\"},{\"key\":\"!!\",\"mod_revision\":\"6\"}],\"count\":\"3\"}";
    json_t *j = json_loads(text, 0, NULL);
    bt_etcd_kv *kvs;
    size_t n;
    int64_t rev;
    assert_int_equal(bt_etcd_parse_range(j, &kvs, &n, &rev), BT_OK);
    assert_int_equal(rev, 7);
    assert_int_equal(n, 2); /* the undecodable key is skipped */
    assert_string_equal(kvs[0].key, "v1/instances/a");
    assert_string_equal(kvs[0].value, "{}");
    assert_int_equal(kvs[0].vlen, 2);
    assert_int_equal(kvs[0].mod_revision, 5);
    assert_false(kvs[0].is_delete);
    assert_string_equal(kvs[1].key, "v1/x");
    assert_int_equal(kvs[1].vlen, 0); /* an empty value is omitted by the gateway */
    bt_etcd_kvs_free(kvs, n);
    json_decref(j);

    j = json_loads("{\"header\":{\"revision\":\"9\"},\"count\":\"0\"}", 0, NULL);
    assert_int_equal(bt_etcd_parse_range(j, &kvs, &n, &rev), BT_OK);
    assert_int_equal(n, 0);
    assert_int_equal(rev, 9);
    json_decref(j);
    j = json_loads("{\"kvs\":[]}", 0, NULL); /* no header: not an etcd answer */
    assert_int_equal(bt_etcd_parse_range(j, &kvs, &n, &rev), BT_ERR_PROTOCOL);
    json_decref(j);
}

static bt_etcd_wmsg parse_msg(const char *text, bt_status want) {
    bt_etcd_wmsg m;
    assert_int_equal(bt_etcd_parse_watch_msg(text, strlen(text), &m), want);
    return m;
}

static void test_watch_messages(void **state) {
    (void)state;
    /* captured from etcd 3.4.23's gateway */
    bt_etcd_wmsg m = parse_msg("{\"result\":{\"header\":{\"cluster_id\":\"15118495548433857066\",\"member_id\":"
                               "\"13668033151171901709\",\"revision\":\"2\",\"raft_term\":\"2\"},\"created\":true}}",
                               BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_CREATED);
    assert_int_equal(m.header_revision, 2);
    assert_string_equal(m.cluster_id, "15118495548433857066"); /* above INT64_MAX: kept as text */
    bt_etcd_wmsg_free(&m);

    m = parse_msg("{\"result\":{\"header\":{\"revision\":\"3\"},\"events\":[{\"kv\":{\"key\":\"djEveA==\","
                  "\"create_revision\":\"3\",\"mod_revision\":\"3\",\"version\":\"1\",\"value\":\"aGVsbG8=\"}}]}}",
                  BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_EVENTS);
    assert_int_equal(m.nevents, 1);
    assert_false(m.events[0].is_delete);
    assert_string_equal(m.events[0].key, "v1/x");
    assert_string_equal(m.events[0].value, "hello");
    assert_int_equal(m.events[0].mod_revision, 3);
    bt_etcd_wmsg_free(&m);

    m = parse_msg("{\"result\":{\"header\":{\"revision\":\"5\"},\"events\":[{\"type\":\"DELETE\",\"kv\":{\"key\":"
                  "\"djEvaW5zdGFuY2VzL2E=\",\"mod_revision\":\"5\"}},{\"type\":\"PUT\",\"kv\":{\"key\":\"djEveA==\","
                  "\"mod_revision\":\"5\",\"value\":\"e30=\"}}]}}",
                  BT_OK);
    assert_int_equal(m.nevents, 2);
    assert_true(m.events[0].is_delete);
    assert_string_equal(m.events[0].key, "v1/instances/a");
    assert_false(m.events[1].is_delete);
    assert_string_equal(m.events[1].value, "{}");
    bt_etcd_wmsg_free(&m);

    m = parse_msg("{\"result\":{\"header\":{\"cluster_id\":\"1\",\"raft_term\":\"2\"},\"canceled\":true,"
                  "\"compact_revision\":\"3\"}}",
                  BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_CANCELED);
    assert_int_equal(m.compact_revision, 3);
    assert_non_null(strstr(m.reason, "compacted"));
    bt_etcd_wmsg_free(&m);

    /* a watch refused for auth comes back created and canceled at once */
    m = parse_msg("{\"result\":{\"header\":{\"revision\":\"5\"},\"watch_id\":\"-1\",\"created\":true,\"canceled\":true,"
                  "\"cancel_reason\":\"rpc error: code = InvalidArgument desc = etcdserver: user name is empty\"}}",
                  BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_CANCELED);
    assert_int_equal(m.compact_revision, 0);
    assert_non_null(strstr(m.reason, "user name is empty"));
    bt_etcd_wmsg_free(&m);

    m = parse_msg("{\"error\":{\"grpc_code\":14,\"http_code\":503,\"message\":\"transport is closing\","
                  "\"http_status\":\"Service Unavailable\"}}",
                  BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_ERROR);
    assert_string_equal(m.reason, "transport is closing");
    bt_etcd_wmsg_free(&m);

    m = parse_msg("{\"result\":{\"header\":{\"revision\":\"12\"}}}", BT_OK);
    assert_int_equal(m.kind, BT_ETCD_WMSG_PROGRESS);
    assert_int_equal(m.header_revision, 12);
    assert_string_equal(m.cluster_id, "");
    bt_etcd_wmsg_free(&m);

    parse_msg("{\"result\":{\"header\":{\"revision\":\"x1\"}}}", BT_ERR_PROTOCOL);
    parse_msg("{\"result\":{\"header\":{\"revision\":\"1\"},\"events\":{}}}", BT_ERR_PROTOCOL);
    parse_msg("{\"result\":", BT_ERR_PROTOCOL);
    parse_msg("[1,2]", BT_ERR_PROTOCOL);
    parse_msg("{}", BT_ERR_PROTOCOL);
}

/* ---- the handle on a loop, no server ------------------------------------------------------ */

static int calls;
static void w_put(void *ud, const char *key, const json_t *v) {
    (void)ud, (void)key, (void)v;
    calls++;
}
static void w_del(void *ud, const char *key) {
    (void)ud, (void)key;
    calls++;
}
static void done_cb(void *ud) { *(bool *)ud = true; }

/* A loopback port with nothing listening (bound, then closed). */
static int dead_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    close(fd);
    return ntohs(a.sin_port);
}

static void tick(uv_timer_t *t) { (void)t; }

static void run_ms(uv_loop_t *loop, uint64_t ms, bool *stop) {
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, tick, 5, 5);
    uint64_t end = bt_now_ms() + ms;
    while (bt_now_ms() < end && !(stop && *stop)) uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* An etcd handle on loop for the endpoints; ttl_s 0 keeps the default lease TTL. */
static bt_discovery *etcd_handle(uv_loop_t *loop, const char *endpoints, int64_t ttl_s) {
    bt_discovery_config c;
    bt_discovery_config_default(&c);
    c.backend = "etcd";
    c.etcd_endpoints = endpoints;
    if (ttl_s) c.ttl_s = ttl_s;
    bt_discovery *d = NULL;
    char err[256];
    assert_int_equal(bt_discovery_create(loop, &c, &d, err, sizeof err), BT_OK);
    assert_non_null(d);
    return d;
}

static void test_unreachable(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    char eps[128];
    snprintf(eps, sizeof eps, "http://127.0.0.1:%d,127.0.0.1:%d", dead_port(), dead_port());
    bt_discovery *d = etcd_handle(&loop, eps, 3);
    static const bt_discovery_watcher w = {w_put, w_del};
    calls = 0;
    json_t *v = json_pack("{s:s}", "type", "Endpoint");
    assert_int_equal(bt_discovery_put(d, "v1/instances/t/c/e/1", v), BT_OK); /* queued, not failed */
    assert_int_equal(bt_discovery_watch(d, "v1/instances/t/", &w, NULL), BT_OK);
    assert_int_equal(bt_discovery_watch(d, "v1/", &w, NULL), BT_ERR_INVALID);
    assert_int_equal(calls, 0); /* never from inside the call */
    run_ms(&loop, 1500, NULL);  /* many refused attempts across both endpoints */
    assert_int_equal(calls, 0); /* an unreachable store reports nothing: no deletes, no puts */
    assert_int_equal(bt_discovery_delete(d, "v1/instances/t/c/e/1"), BT_OK);
    /* a value over the cap is refused at once */
    char *big = malloc(70000);
    memset(big, 'x', 69999);
    big[69999] = '\0';
    json_t *bv = json_string(big);
    assert_int_equal(bt_discovery_put(d, "v1/instances/t/c/e/2", bv), BT_ERR_TOO_LARGE);
    json_decref(bv);
    free(big);

    bool done = false;
    uint64_t t0 = bt_now_ms();
    bt_discovery_close(d, done_cb, &done);
    assert_false(done);
    run_ms(&loop, 3000, &done);
    assert_true(done);
    assert_true(bt_now_ms() - t0 < 1000); /* no lease was granted: nothing to revoke */
    assert_int_equal(uv_run(&loop, UV_RUN_NOWAIT), 0); /* every handle closed */
    assert_int_equal(uv_loop_close(&loop), 0);
    json_decref(v);
}

/* close() right after create, before the loop ever ran, and twice. */
static void test_close_at_once(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_discovery *d = etcd_handle(&loop, "127.0.0.1:1", 0);
    bool done = false;
    bt_discovery_close(d, done_cb, &done);
    assert_false(done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(done);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64_vectors),    cmocka_unit_test(test_b64_roundtrip),
        cmocka_unit_test(test_prefix_end),     cmocka_unit_test(test_endpoints),
        cmocka_unit_test(test_bodies),         cmocka_unit_test(test_classify),
        cmocka_unit_test(test_parse_range),    cmocka_unit_test(test_watch_messages),
        cmocka_unit_test(test_unreachable),    cmocka_unit_test(test_close_at_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
