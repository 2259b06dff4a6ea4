/* test_events.c — unit tests of the event plane's pure parts (src/events/events.c).
 *
 * Covers: the exact ActiveLoad JSON a worker publishes; encode/decode round trips; what a Dynamo
 * publisher sends (nulls, missing baton fields) decoding to "free and ready"; every malformed
 * payload the decoder must reject; the encoder's buffer bound; plane and URL validation; the
 * direct plane giving a NULL object on which every call is a harmless no-op; and a deterministic
 * fuzz loop feeding mutated payloads to the decoder in exactly-sized heap blocks; the -ERR line a
 * read from a NATS server ends with (why it closed), and the escaping of such text for the log. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/util.h"
#include "events/events.h"
#include "events/events_internal.h"

static bt_load_report sample(void) {
    bt_load_report r = {0};
    r.active_decode_blocks = 12;
    r.total_blocks = 16384;
    r.active_prefill_tokens = 345;
    r.waiting = 2;
    r.running = 7;
    r.max_num_batched_tokens = 8192;
    r.flags = BT_LOAD_READY;
    return r;
}

static bt_status decode_str(const char *s, uint64_t *id, bt_load_report *r) {
    char err[128];
    return bt_events_decode_load(s, strlen(s), id, r, err, sizeof err);
}

static void test_encode_exact(void **state) {
    (void)state;
    bt_load_report r = sample();
    char buf[512];
    size_t n = bt_events_encode_load(buf, sizeof buf, 0x7fffffffffffffffull, &r);
    const char *want = "{\"worker_id\":9223372036854775807,\"dp_rank\":0,\"active_decode_blocks\":12,"
                       "\"active_prefill_tokens\":345,\"total_blocks\":16384,\"waiting\":2,\"running\":7,"
                       "\"max_num_batched_tokens\":8192,\"ready\":true}";
    assert_string_equal(buf, want);
    assert_int_equal(n, strlen(want));
    r.flags = 0;
    bt_events_encode_load(buf, sizeof buf, 1, &r);
    assert_non_null(strstr(buf, "\"ready\":false}"));
}

static void test_round_trip(void **state) {
    (void)state;
    uint64_t ids[] = {0, 1, 0xdeadbeefull, 0x7fffffffffffffffull};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        for (int ready = 0; ready < 2; ready++) {
            bt_load_report r = sample(), back;
            r.active_decode_blocks += i;
            r.flags = ready ? BT_LOAD_READY : 0;
            char buf[512];
            size_t n = bt_events_encode_load(buf, sizeof buf, ids[i], &r);
            assert_true(n > 0);
            uint64_t id = 42;
            char err[128];
            assert_int_equal(bt_events_decode_load(buf, n, &id, &back, err, sizeof err), BT_OK);
            assert_int_equal(id, ids[i]);
            /* field by field: the struct has padding, which sample()'s copy leaves undefined */
            assert_int_equal(back.active_decode_blocks, r.active_decode_blocks);
            assert_int_equal(back.active_prefill_tokens, r.active_prefill_tokens);
            assert_int_equal(back.total_blocks, r.total_blocks);
            assert_int_equal(back.waiting, r.waiting);
            assert_int_equal(back.running, r.running);
            assert_int_equal(back.max_num_batched_tokens, r.max_num_batched_tokens);
            assert_int_equal(back.flags, r.flags);
        }
    }
}

/* The priority-preemption fields (BT_LOAD_PREEMPT) on the event plane: written only when the
 * worker has victims, read back exactly; a count without a valid priority is refused. */
static void test_preempt_fields(void **state) {
    (void)state;
    bt_load_report r = sample(), back;
    char buf[512];
    bt_load_set_preempt(&r, 3, -7);
    size_t n = bt_events_encode_load(buf, sizeof buf, 5, &r);
    assert_non_null(strstr(buf, "\"ready\":true,\"preempt_victims\":3,\"preempt_priority\":-7}"));
    uint64_t id;
    char err[160];
    assert_int_equal(bt_events_decode_load(buf, n, &id, &back, err, sizeof err), BT_OK);
    assert_int_equal(back.flags, r.flags);
    uint32_t v;
    int32_t p;
    assert_true(bt_load_get_preempt(&back, &v, &p));
    assert_true(v == 3 && p == -7);
    bt_load_set_preempt(&r, 0, 0);
    bt_events_encode_load(buf, sizeof buf, 5, &r);
    assert_null(strstr(buf, "preempt")); /* none: the fields are left out */
    assert_int_equal(decode_str("{\"worker_id\":1,\"preempt_victims\":0}", &id, &back), BT_OK);
    assert_false(bt_load_get_preempt(&back, NULL, NULL));
    assert_int_equal(decode_str("{\"worker_id\":1,\"preempt_victims\":2}", &id, &back), BT_ERR_INVALID);
    assert_int_equal(decode_str("{\"worker_id\":1,\"preempt_victims\":2,\"preempt_priority\":\"x\"}", &id, &back),
                     BT_ERR_INVALID);
    assert_int_equal(decode_str("{\"worker_id\":1,\"preempt_victims\":2,\"preempt_priority\":9000000}", &id, &back),
                     BT_ERR_INVALID);
    assert_int_equal(decode_str("{\"worker_id\":1,\"preempt_victims\":-1,\"preempt_priority\":1}", &id, &back),
                     BT_ERR_INVALID);
}

static void test_dynamo_publisher(void **state) {
    (void)state;
    uint64_t id;
    bt_load_report r;
    /* Dynamo's worker-side publisher: prefill tokens null, none of baton's fields */
    assert_int_equal(decode_str("{\"worker_id\":7,\"dp_rank\":0,\"active_decode_blocks\":30,"
                                "\"active_prefill_tokens\":null}",
                                &id, &r),
                     BT_OK);
    assert_int_equal(id, 7);
    assert_int_equal(r.active_decode_blocks, 30);
    assert_int_equal(r.active_prefill_tokens, 0);
    assert_int_equal(r.total_blocks, 0);
    assert_int_equal(r.flags, BT_LOAD_READY);
    /* HEAD's extra field is ignored; unknown fields are fine */
    assert_int_equal(decode_str("{\"worker_id\":8,\"active_decode_blocks\":null,\"kv_used_blocks\":3,\"x\":[1]}",
                                &id, &r),
                     BT_OK);
    assert_int_equal(id, 8);
    assert_int_equal(r.active_decode_blocks, 0);
}

static void test_rejects(void **state) {
    (void)state;
    const char *bad[] = {
        "",
        "null",
        "[]",
        "{}",
        "{\"worker_id\":-1}",
        "{\"worker_id\":\"7\"}",
        "{\"worker_id\":1.5}",
        "{\"worker_id\":1,\"active_decode_blocks\":-3}",
        "{\"worker_id\":1,\"active_decode_blocks\":2.5}",
        "{\"worker_id\":1,\"active_prefill_tokens\":\"9\"}",
        "{\"worker_id\":1,\"total_blocks\":true}",
        "{\"worker_id\":1,\"waiting\":{}}",
        "{\"worker_id\":1,\"ready\":1}",
        "{\"worker_id\":1,\"dp_rank\":-2}",
        "{\"worker_id\":1,\"worker_id\":2}",
        "{\"worker_id\":1",
        "{\"worker_id\":99999999999999999999999}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t id;
        bt_load_report r;
        char err[128] = "";
        bt_status st = bt_events_decode_load(bad[i], strlen(bad[i]), &id, &r, err, sizeof err);
        if (st != BT_ERR_INVALID) fprintf(stderr, "accepted: %s\n", bad[i]);
        assert_int_equal(st, BT_ERR_INVALID);
        assert_true(err[0] != '\0');
    }
}

static void test_encode_bound(void **state) {
    (void)state;
    bt_load_report r = sample();
    char buf[512];
    size_t full = bt_events_encode_load(buf, sizeof buf, 5, &r);
    assert_true(full > 0);
    char small[512];
    memset(small, 'x', sizeof small);
    assert_int_equal(bt_events_encode_load(small, full, 5, &r), 0); /* no room for the NUL */
    assert_int_equal(small[0], '\0');
    assert_int_equal(bt_events_encode_load(small, full + 1, 5, &r), full);
}

static void test_config(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_events_config c;
    bt_events_config_default(&c);
    assert_string_equal(c.plane, "direct");
    assert_string_equal(c.nats_server, "nats://localhost:4222");
    assert_true(c.debounce_ms >= 1 && c.debounce_ms <= 5);
    bt_events *e = (bt_events *)0x1;
    char err[256];
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_OK);
    assert_null(e);
    /* the direct plane: every call is a no-op on NULL */
    bt_load_report r = sample();
    bt_events_publish_load(NULL, 1, &r);
    assert_int_equal(bt_events_subscribe_load(NULL, NULL, NULL), BT_OK);
    bt_events_stats st;
    memset(&st, 0xff, sizeof st);
    bt_events_get_stats(NULL, &st);
    assert_false(st.connected);
    assert_int_equal(st.published + st.received + st.dropped, 0);
    assert_string_equal(bt_events_plane(NULL), "direct");
    bt_events_close(NULL, NULL, NULL);

    c.plane = "zmq";
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "zmq"));
    c.plane = "nats";
    const char *bad_urls[] = {"", "localhost:4222", "http://x:4222", "nats://", "nats://a:1,redis://b:2"};
    for (size_t i = 0; i < sizeof bad_urls / sizeof bad_urls[0]; i++) {
        c.nats_server = bad_urls[i];
        err[0] = '\0';
        assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_ERR_INVALID);
        assert_null(e);
        assert_true(err[0] != '\0');
    }
    c.nats_server = "nats://127.0.0.1:4222";
    c.ns = "a.b";
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_ERR_INVALID);
    assert_null(e);
    uv_loop_close(&loop);
}

/* The nats plane against a port where nothing listens: creating it succeeds at once, the loop
 * keeps running, publishes are dropped and counted, and closing releases every handle (the loop
 * ends). The only traffic is a refused loopback connect. */
typedef struct {
    bt_events *e;
    uv_timer_t tick, stop;
    int closed;
    uint64_t ticks;
} unreach_ctx;

static void on_closed(void *ud) { ((unreach_ctx *)ud)->closed++; }

static void on_tick(uv_timer_t *t) {
    unreach_ctx *x = t->data;
    bt_load_report r = sample();
    bt_events_publish_load(x->e, 77, &r);
    x->ticks++;
}

static void on_stop(uv_timer_t *t) {
    unreach_ctx *x = t->data;
    bt_events_stats st;
    bt_events_get_stats(x->e, &st);
    assert_false(st.connected);
    assert_int_equal(st.published, 0);
    assert_int_equal(st.connects, 0);
    assert_true(st.dropped >= 1);
    uv_close((uv_handle_t *)&x->tick, NULL);
    uv_close((uv_handle_t *)&x->stop, NULL);
    bt_events_close(x->e, on_closed, x);
}

static void test_nats_unreachable(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_events_config c;
    bt_events_config_default(&c);
    c.plane = "nats";
    c.nats_server = "nats://127.0.0.1:1"; /* refused at once */
    unreach_ctx x = {0};
    char err[256];
    uint64_t t0 = bt_now_ms();
    assert_int_equal(bt_events_create(&loop, &c, &x.e, err, sizeof err), BT_OK);
    assert_true(bt_now_ms() - t0 < 500); /* never waits for the server */
    assert_non_null(x.e);
    assert_string_equal(bt_events_plane(x.e), "nats");
    uv_timer_init(&loop, &x.tick);
    uv_timer_init(&loop, &x.stop);
    x.tick.data = x.stop.data = &x;
    uv_timer_start(&x.tick, on_tick, 20, 20);
    uv_timer_start(&x.stop, on_stop, 400, 0);
    uv_run(&loop, UV_RUN_DEFAULT); /* ends only when every handle, the plane's included, is closed */
    assert_int_equal(x.closed, 1);
    assert_true(x.ticks >= 5);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* Deterministic fuzz: random mutations of valid payloads, each in an exactly-sized block. */
static void test_fuzz(void **state) {
    (void)state;
    uint64_t seed = 12345;
    bt_load_report r = sample();
    char base[512];
    size_t bl = bt_events_encode_load(base, sizeof base, 99, &r);
    const char alphabet[] = "{}[]\":,-0123456789eE.truefalsnul \\x";
    for (int iter = 0; iter < 20000; iter++) {
        seed = bt_mix64(seed);
        size_t n = bl;
        char *p = malloc(n ? n : 1);
        memcpy(p, base, n);
        int muts = 1 + (int)(seed % 4);
        for (int m = 0; m < muts; m++) {
            seed = bt_mix64(seed);
            size_t at = seed % n;
            p[at] = alphabet[(seed >> 16) % (sizeof alphabet - 1)];
        }
        seed = bt_mix64(seed);
        size_t len = (seed & 1) ? n : seed % (n + 1);
        uint64_t id;
        bt_load_report out;
        char err[128];
        bt_status st = bt_events_decode_load(p, len, &id, &out, err, sizeof err);
        assert_true(st == BT_OK || st == BT_ERR_INVALID);
        free(p);
    }
}

static void test_parting_err(void **state) {
    (void)state;
    char out[64];
    const char *reads[][2] = {
        {"-ERR 'Stale Connection'\r\n", "'Stale Connection'"},
        {"PING\r\nPING\r\n-ERR 'Stale Connection'\r\n", "'Stale Connection'"},
        {"MSG a 1 2\r\n{}\r\n-ERR  'Authorization Violation' \r\n", "'Authorization Violation'"},
        {"-ERR 'a\\b\x01\xff'\r\n", "'a\\\\b\\x01\\xff'"},
    };
    for (size_t i = 0; i < sizeof reads / sizeof reads[0]; i++) {
        assert_true(bt__events_parting_err(reads[i][0], strlen(reads[i][0]), out, sizeof out));
        assert_string_equal(out, reads[i][1]);
    }
    /* not the last line, not a whole line, not an -ERR, nothing */
    const char *none[] = {"-ERR 'Stale Connection'\r\nPING\r\n", "-ERR 'Stale Connection'", "+OK\r\n",
                          "PING\r\n", "", "\r\n", "MSG a 1 9\r\nxx-ERR 'x'\r\n"};
    for (size_t i = 0; i < sizeof none / sizeof none[0]; i++) {
        strcpy(out, "left over");
        assert_false(bt__events_parting_err(none[i], strlen(none[i]), out, sizeof out));
        assert_string_equal(out, "");
    }
    /* a long line is cut, marked, and never overruns: every cap from the smallest */
    char line[600];
    memcpy(line, "-ERR '", 6);
    memset(line + 6, 'x', 500);
    memcpy(line + 506, "'\r\n", 3);
    for (size_t cap = 4; cap <= 520; cap++) {
        char *o = malloc(cap);
        assert_non_null(o);
        assert_true(bt__events_parting_err(line, 509, o, cap));
        size_t n = strlen(o);
        assert_true(n < cap);
        if (cap > 502) assert_int_equal(n, 502); /* the whole quoted text */
        else assert_string_equal(o + n - 3, "...");
        free(o);
    }
    /* escapes are cut whole */
    char esc[8];
    bt__events_log_text("\x01\x02\x03", 3, esc, sizeof esc);
    assert_string_equal(esc, "\\x01...");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_encode_exact),   cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_dynamo_publisher), cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_preempt_fields),
        cmocka_unit_test(test_encode_bound),   cmocka_unit_test(test_config),
        cmocka_unit_test(test_nats_unreachable), cmocka_unit_test(test_fuzz),
        cmocka_unit_test(test_parting_err),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
