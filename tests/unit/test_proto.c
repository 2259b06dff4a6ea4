/* test_proto.c — unit tests of the request-plane frame codec (src/proto/proto.c).
 *
 * Covers: a round trip of every frame type and the exact wire bytes of one; parsing from growing
 * prefixes (BT_ERR_AGAIN until the frame is complete); many frames back to back; every malformed
 * header or payload the codec must reject, with the status it must give; a huge length rejected
 * from the 4-byte prefix alone; the encoders' buffer cap and argument checks; and a deterministic
 * fuzz loop over a few hundred thousand random and mutated buffers, each in an exactly-sized heap
 * block so that AddressSanitizer catches any read past the end. With BT_PROTO_CORPUS_DIR set, the
 * last test also writes the libFuzzer seed frames (fuzz/corpus/proto/) into that directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/proto.h"

#define BIG (64u * 1024 * 1024)

/* ---- helpers ------------------------------------------------------------------------------ */

/* Parses exactly one frame that must fill the whole buffer. */
static bt_frame parse_one(const bt_buf *b) {
    bt_frame f;
    size_t used = 0;
    const char *err = NULL;
    bt_status st = bt_frame_parse((const uint8_t *)b->data, b->len, BT_FRAME_DEFAULT_MAX, &f, &used, &err);
    if (st != BT_OK) fprintf(stderr, "parse failed: %s (%s)\n", bt_status_name(st), err ? err : "-");
    assert_int_equal(st, BT_OK);
    assert_int_equal(used, b->len);
    return f;
}

/* Writes a raw header (fields unchecked) into p; returns p + 12. */
static uint8_t *raw_hdr(uint8_t *p, uint32_t len, uint8_t type, uint8_t flags, uint16_t reserved,
                        uint32_t stream) {
    p[0] = (uint8_t)(len >> 24), p[1] = (uint8_t)(len >> 16), p[2] = (uint8_t)(len >> 8), p[3] = (uint8_t)len;
    p[4] = type;
    p[5] = flags;
    p[6] = (uint8_t)(reserved >> 8), p[7] = (uint8_t)reserved;
    p[8] = (uint8_t)(stream >> 24), p[9] = (uint8_t)(stream >> 16), p[10] = (uint8_t)(stream >> 8),
    p[11] = (uint8_t)stream;
    return p + 12;
}

/* Parses a hand-built frame of header + plen payload bytes (payload zeroed unless given). */
static bt_status parse_raw(uint8_t type, uint16_t reserved, uint32_t stream, const uint8_t *payload,
                           uint32_t plen, const char **err) {
    uint8_t *buf = calloc(1, 12 + plen);
    assert_non_null(buf);
    uint8_t *pl = raw_hdr(buf, plen + 8, type, 0, reserved, stream);
    if (payload && plen) memcpy(pl, payload, plen);
    bt_frame f;
    size_t used = 0;
    *err = NULL;
    bt_status st = bt_frame_parse(buf, 12 + plen, BT_FRAME_DEFAULT_MAX, &f, &used, err);
    free(buf);
    return st;
}

/* Appends one of every frame type (several variants of some) to b. Returns the number added. */
static int put_all_types(bt_buf *b, uint32_t stream) {
    static const uint32_t ids[] = {1, 0xFFFFFFFFu, 424242, 0};
    bt_load_report lr = {1, 16384, 3, 4, 5, 8192, BT_LOAD_READY};
    int n = 0;
    assert_int_equal(bt_frame_put_hello(b, BT_ROLE_WORKER, 0x0123456789abcdefull), BT_OK), n++;
    assert_int_equal(bt_frame_put(b, BT_FRAME_REQUEST, stream, "{\"request_id\":\"r\"}", 18), BT_OK), n++;
    assert_int_equal(bt_frame_put_tokens(b, stream, ids, 4, "héllo", 6), BT_OK), n++;
    assert_int_equal(bt_frame_put_tokens(b, stream, NULL, 0, NULL, 0), BT_OK), n++;
    assert_int_equal(bt_frame_put_finish(b, stream, 1, 17, 99), BT_OK), n++;
    assert_int_equal(bt_frame_put_error(b, stream, BT_ERR_SHUTDOWN, "engine shutting down"), BT_OK), n++;
    assert_int_equal(bt_frame_put_error(b, 0, BT_ERR_PROTOCOL, NULL), BT_OK), n++;
    assert_int_equal(bt_frame_put(b, BT_FRAME_STOP, stream, NULL, 0), BT_OK), n++;
    assert_int_equal(bt_frame_put(b, BT_FRAME_KILL, stream, NULL, 0), BT_OK), n++;
    assert_int_equal(bt_frame_put_ping(b, BT_FRAME_PING, 0xfeedfacecafebeefull), BT_OK), n++;
    assert_int_equal(bt_frame_put_ping(b, BT_FRAME_PONG, 7), BT_OK), n++;
    assert_int_equal(bt_frame_put_load(b, &lr), BT_OK), n++;
    assert_int_equal(bt_frame_put_kvstate(b, stream ? stream : 1, 40, 8, "kv-piece", 8), BT_OK), n++;
    assert_int_equal(bt_frame_put_waiting(b, stream ? stream : 1, BT_WAIT_PREEMPTED), BT_OK), n++;
    assert_int_equal(bt_frame_put_goaway(b, BT_ERR_DRAINING, "draining"), BT_OK), n++;
    return n;
}

/* ---- round trips -------------------------------------------------------------------------- */

/* KVSTATE: a piece round-trips; a piece outside its state, too large, or on stream 0 is refused by
 * the encoder and, written raw, by the parser. */
static void test_kvstate(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 4u << 20);
    uint8_t *piece = malloc(BT_KV_PIECE_MAX + 1);
    assert_non_null(piece);
    for (size_t i = 0; i <= BT_KV_PIECE_MAX; i++) piece[i] = (uint8_t)(i * 7 + 3);
    assert_int_equal(bt_frame_put_kvstate(&b, 9, 1000000, 4096, piece, BT_KV_PIECE_MAX), BT_OK);
    assert_int_equal(bt_frame_put_kvstate(&b, 9, 10, 10, NULL, 0), BT_OK);
    bt_frame f;
    size_t used;
    const char *err = NULL;
    assert_int_equal(bt_frame_parse((uint8_t *)b.data, b.len, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_OK);
    assert_int_equal(f.type, BT_FRAME_KVSTATE);
    assert_int_equal(f.stream, 9);
    uint64_t total, off;
    const uint8_t *d;
    size_t n;
    assert_int_equal(bt_frame_get_kvstate(&f, &total, &off, &d, &n), BT_OK);
    assert_int_equal(total, 1000000);
    assert_int_equal(off, 4096);
    assert_int_equal(n, BT_KV_PIECE_MAX);
    assert_memory_equal(d, piece, n);
    assert_int_equal(bt_frame_parse((uint8_t *)b.data + used, b.len - used, BT_FRAME_DEFAULT_MAX, &f, &used, &err),
                     BT_OK);
    assert_int_equal(bt_frame_get_kvstate(&f, &total, &off, &d, &n), BT_OK);
    assert_int_equal(n, 0);
    assert_int_equal(off, 10);
    size_t len0 = b.len;
    /* the encoder refuses what the parser would */
    assert_int_equal(bt_frame_put_kvstate(&b, 9, 100, 0, piece, BT_KV_PIECE_MAX + 1), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_kvstate(&b, 9, 100, 90, piece, 11), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_kvstate(&b, 9, 100, 101, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_kvstate(&b, 0, 100, 0, piece, 1), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_kvstate(&b, 9, BT_KV_STATE_MAX + 1, 0, piece, 1), BT_ERR_INVALID);
    assert_int_equal(b.len, len0);
    /* raw frames the parser refuses */
    uint8_t pl[BT_KV_HEADER + 4] = {0};
    pl[7] = 100; /* total 100 */
    pl[15] = 98; /* offset 98: 4 bytes overrun */
    assert_int_equal(parse_raw(BT_FRAME_KVSTATE, 0, 9, pl, sizeof pl, &err), BT_ERR_PROTOCOL);
    pl[15] = 96; /* fits exactly */
    assert_int_equal(parse_raw(BT_FRAME_KVSTATE, 0, 9, pl, sizeof pl, &err), BT_OK);
    assert_int_equal(parse_raw(BT_FRAME_KVSTATE, 0, 0, pl, sizeof pl, &err), BT_ERR_PROTOCOL);
    assert_int_equal(parse_raw(BT_FRAME_KVSTATE, 0, 9, pl, BT_KV_HEADER - 1, &err), BT_ERR_PROTOCOL);
    free(piece);
    bt_buf_free(&b);
}

/* WAITING: both reasons round-trip in 13 bytes; the encoder refuses, and the parser rejects written
 * raw, stream 0, an unknown reason and any other payload size. */
static void test_waiting(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put_waiting(&b, 7, BT_WAIT_QUEUED), BT_OK);
    assert_int_equal(bt_frame_put_waiting(&b, 9, BT_WAIT_PREEMPTED), BT_OK);
    assert_int_equal(b.len, 26);
    static const uint8_t wire[] = {0, 0, 0, 9, 14, 0, 0, 0, 0, 0, 0, 7, 0};
    assert_memory_equal(b.data, wire, sizeof wire);
    bt_frame f;
    size_t used;
    const char *err = NULL;
    uint8_t reason = 99;
    assert_int_equal(bt_frame_parse((uint8_t *)b.data, b.len, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_OK);
    assert_int_equal(used, 13);
    assert_int_equal(f.type, BT_FRAME_WAITING);
    assert_int_equal(f.stream, 7);
    assert_int_equal(bt_frame_get_waiting(&f, &reason), BT_OK);
    assert_int_equal(reason, BT_WAIT_QUEUED);
    assert_int_equal(bt_frame_parse((uint8_t *)b.data + 13, b.len - 13, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_OK);
    assert_int_equal(bt_frame_get_waiting(&f, &reason), BT_OK);
    assert_int_equal(reason, BT_WAIT_PREEMPTED);
    assert_string_equal(bt_frame_type_name(BT_FRAME_WAITING), "WAITING");
    size_t len0 = b.len;
    assert_int_equal(bt_frame_put_waiting(&b, 0, BT_WAIT_QUEUED), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_waiting(&b, 7, 2), BT_ERR_INVALID);
    assert_int_equal(b.len, len0);
    uint8_t pl[2] = {BT_WAIT_PREEMPTED, 0};
    assert_int_equal(parse_raw(BT_FRAME_WAITING, 0, 7, pl, 1, &err), BT_OK);
    assert_int_equal(parse_raw(BT_FRAME_WAITING, 0, 0, pl, 1, &err), BT_ERR_PROTOCOL);
    assert_string_equal(err, "frame must not be on stream 0");
    assert_int_equal(parse_raw(BT_FRAME_WAITING, 0, 7, pl, 2, &err), BT_ERR_PROTOCOL);
    assert_string_equal(err, "bad WAITING payload size");
    assert_int_equal(parse_raw(BT_FRAME_WAITING, 0, 7, pl, 0, &err), BT_ERR_PROTOCOL);
    pl[0] = 2;
    assert_int_equal(parse_raw(BT_FRAME_WAITING, 0, 7, pl, 1, &err), BT_ERR_PROTOCOL);
    assert_string_equal(err, "bad WAITING reason");
    /* a hand-built frame of the wrong size or reason is refused by the decoder too */
    bt_frame h = {.type = BT_FRAME_WAITING, .stream = 7, .payload = pl, .len = 1};
    assert_int_equal(bt_frame_get_waiting(&h, &reason), BT_ERR_PROTOCOL);
    pl[0] = 0;
    h.len = 2;
    assert_int_equal(bt_frame_get_waiting(&h, &reason), BT_ERR_PROTOCOL);
    h.type = BT_FRAME_FINISH;
    assert_int_equal(bt_frame_get_waiting(&h, &reason), BT_ERR_INVALID);
    bt_buf_free(&b);
}

static void test_hello_wire_bytes(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put_hello(&b, BT_ROLE_FRONTEND, 0x0102030405060708ull), BT_OK);
    static const uint8_t want[] = {0, 0, 0, 20, 1, 0, 0, 0, 0, 0, 0, 0, /* header */
                                   0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8};
    assert_int_equal(b.len, sizeof want);
    assert_memory_equal(b.data, want, sizeof want);
    bt_frame f = parse_one(&b);
    uint16_t ver, role;
    uint64_t inst;
    assert_int_equal(f.type, BT_FRAME_HELLO);
    assert_int_equal(f.stream, 0);
    assert_int_equal(bt_frame_get_hello(&f, &ver, &role, &inst), BT_OK);
    assert_int_equal(ver, BT_PROTO_VERSION);
    assert_int_equal(role, BT_ROLE_FRONTEND);
    assert_true(inst == 0x0102030405060708ull);
    bt_buf_free(&b);
}

static void test_roundtrip_request_stop_kill(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    const char *json = "{\"request_id\":\"abc\",\"api\":\"chat\",\"body\":{},\"carried\":[1,2],\"max_tokens\":5}";
    assert_int_equal(bt_frame_put(&b, BT_FRAME_REQUEST, 0xFFFFFFFFu, json, strlen(json)), BT_OK);
    bt_frame f = parse_one(&b);
    assert_int_equal(f.type, BT_FRAME_REQUEST);
    assert_true(f.stream == 0xFFFFFFFFu);
    assert_int_equal(f.len, strlen(json));
    assert_memory_equal(f.payload, json, f.len);

    uint8_t types[] = {BT_FRAME_STOP, BT_FRAME_KILL};
    for (int i = 0; i < 2; i++) {
        bt_buf_reset(&b);
        assert_int_equal(bt_frame_put(&b, types[i], 3, NULL, 0), BT_OK);
        f = parse_one(&b);
        assert_int_equal(f.type, types[i]);
        assert_int_equal(f.stream, 3);
        assert_int_equal(f.len, 0);
        assert_int_equal(b.len, BT_FRAME_HEADER);
    }
    bt_buf_free(&b);
}

static void test_roundtrip_tokens(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1u << 20);
    static uint32_t ids[BT_TOKENS_MAX], got[BT_TOKENS_MAX];
    for (size_t i = 0; i < BT_TOKENS_MAX; i++) ids[i] = (uint32_t)(i * 2654435761u);
    size_t counts[] = {0, 1, 3, BT_TOKENS_MAX};
    for (size_t k = 0; k < sizeof counts / sizeof counts[0]; k++) {
        bt_buf_reset(&b);
        const char *text = k % 2 ? " world\n\"x\"" : "";
        assert_int_equal(bt_frame_put_tokens(&b, 9, ids, counts[k], text, strlen(text)), BT_OK);
        bt_frame f = parse_one(&b);
        assert_int_equal(f.type, BT_FRAME_TOKENS);
        assert_int_equal(f.stream, 9);
        size_t n = 99, tl = 99;
        const char *t = NULL;
        assert_int_equal(bt_frame_get_tokens(&f, got, BT_TOKENS_MAX, &n, &t, &tl), BT_OK);
        assert_int_equal(n, counts[k]);
        if (n) assert_memory_equal(got, ids, n * 4);
        assert_int_equal(tl, strlen(text));
        assert_memory_equal(t, text, tl);
        /* a cap below the count is a protocol error, not a truncation */
        if (n) assert_int_equal(bt_frame_get_tokens(&f, got, n - 1, &n, &t, &tl), BT_ERR_PROTOCOL);
    }
    bt_buf_free(&b);
}

static void test_roundtrip_finish_error_goaway(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    for (uint8_t r = 0; r <= BT_FRAME_FINISH_MAX; r++) {
        bt_buf_reset(&b);
        assert_int_equal(bt_frame_put_finish(&b, 5, r, 0xFFFFFFFFu, 123), BT_OK);
        bt_frame f = parse_one(&b);
        uint8_t reason;
        uint32_t pt, ct;
        assert_int_equal(f.type, BT_FRAME_FINISH);
        assert_int_equal(bt_frame_get_finish(&f, &reason, &pt, &ct), BT_OK);
        assert_int_equal(reason, r);
        assert_true(pt == 0xFFFFFFFFu);
        assert_int_equal(ct, 123);
    }
    for (uint8_t fl = 0; fl <= BT_FINISH_F_USAGE_UNREPORTED; fl++) {
        bt_buf_reset(&b);
        assert_int_equal(bt_frame_put_finish_flags(&b, 5, 0, fl, 0, 2), BT_OK);
        bt_frame f = parse_one(&b);
        uint8_t got = 0xFF;
        assert_int_equal(bt_frame_get_finish_flags(&f, &got), BT_OK);
        assert_int_equal(got, fl);
    }
    uint32_t streams[] = {0, 1, 77};
    for (int i = 0; i < 3; i++) {
        bt_buf_reset(&b);
        assert_int_equal(bt_frame_put_error(&b, streams[i], BT_ERR_ENGINE, "engine error: boom"), BT_OK);
        bt_frame f = parse_one(&b);
        uint16_t code;
        const char *msg;
        size_t ml;
        assert_int_equal(f.type, BT_FRAME_ERROR);
        assert_int_equal(f.stream, streams[i]);
        assert_int_equal(bt_frame_get_error(&f, &code, &msg, &ml), BT_OK);
        assert_int_equal(code, BT_ERR_ENGINE);
        assert_int_equal(ml, strlen("engine error: boom"));
        assert_memory_equal(msg, "engine error: boom", ml);
    }
    bt_buf_reset(&b);
    assert_int_equal(bt_frame_put_error(&b, 3, BT_ERR_CANCELLED, ""), BT_OK);
    bt_frame f = parse_one(&b);
    size_t ml = 9;
    assert_int_equal(bt_frame_get_error(&f, NULL, NULL, &ml), BT_OK);
    assert_int_equal(ml, 0);

    bt_buf_reset(&b);
    assert_int_equal(bt_frame_put_goaway(&b, BT_ERR_DRAINING, "sigterm"), BT_OK);
    f = parse_one(&b);
    uint16_t code;
    const char *msg;
    assert_int_equal(f.type, BT_FRAME_GOAWAY);
    assert_int_equal(f.stream, 0);
    assert_int_equal(bt_frame_get_error(&f, &code, &msg, &ml), BT_OK);
    assert_int_equal(code, BT_ERR_DRAINING);
    assert_int_equal(ml, 7);
    assert_memory_equal(msg, "sigterm", 7);
    bt_buf_free(&b);
}

static void test_roundtrip_ping_pong_load(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    uint8_t types[] = {BT_FRAME_PING, BT_FRAME_PONG};
    for (int i = 0; i < 2; i++) {
        bt_buf_reset(&b);
        assert_int_equal(bt_frame_put_ping(&b, types[i], 0x8000000000000001ull), BT_OK);
        bt_frame f = parse_one(&b);
        uint64_t v = 0;
        assert_int_equal(f.type, types[i]);
        assert_int_equal(bt_frame_get_ping(&f, &v), BT_OK);
        assert_true(v == 0x8000000000000001ull);
    }
    bt_load_report in = {0xFFFFFFFFFFFFFFFFull, 16384, 77, 5, 256, 8192, BT_LOAD_READY | 0x80000000u}, out;
    memset(&out, 0, sizeof out);
    bt_buf_reset(&b);
    assert_int_equal(bt_frame_put_load(&b, &in), BT_OK);
    assert_int_equal(b.len, BT_FRAME_HEADER + 52);
    bt_frame f = parse_one(&b);
    assert_int_equal(f.type, BT_FRAME_LOAD);
    assert_int_equal(bt_frame_get_load(&f, &out), BT_OK);
    assert_true(out.active_decode_blocks == in.active_decode_blocks);
    assert_true(out.total_blocks == in.total_blocks);
    assert_true(out.active_prefill_tokens == in.active_prefill_tokens);
    assert_true(out.waiting == in.waiting);
    assert_true(out.running == in.running);
    assert_true(out.max_num_batched_tokens == in.max_num_batched_tokens);
    assert_true(out.flags == in.flags);
    bt_buf_free(&b);
}

/* The priority-preemption fields packed into a LOAD's flags (BT_LOAD_PREEMPT): they survive the
 * wire, keep BT_LOAD_READY, saturate and clamp, and clear. */
static void test_load_preempt(void **state) {
    (void)state;
    static const struct {
        uint64_t victims;
        int64_t prio;
        uint32_t want_n;
        int32_t want_p;
    } cases[] = {
        {1, 10, 1, 10},
        {3, -1000000, 3, -1000000},
        {63, 1000000, 63, 1000000},
        {64, 0, 63, 0},
        {1000, -1, 63, -1},
        {2, (int64_t)1 << 40, 2, BT_LOAD_VICTIM_PRIO_MAX},
        {2, -((int64_t)1 << 40), 2, -BT_LOAD_VICTIM_PRIO_MAX},
    };
    bt_buf b;
    bt_buf_init(&b, 1024);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int ready = 0; ready < 2; ready++) {
            bt_load_report in = {5, 64, 0, 1, 2, 8192, ready ? BT_LOAD_READY : 0}, out;
            bt_load_set_preempt(&in, cases[i].victims, cases[i].prio);
            bt_buf_reset(&b);
            assert_int_equal(bt_frame_put_load(&b, &in), BT_OK);
            assert_int_equal(b.len, BT_FRAME_HEADER + 52); /* the frame did not grow */
            bt_frame f = parse_one(&b);
            assert_int_equal(bt_frame_get_load(&f, &out), BT_OK);
            uint32_t n = 0;
            int32_t p = 0;
            assert_true(bt_load_get_preempt(&out, &n, &p));
            if (n != cases[i].want_n || p != cases[i].want_p)
                fail_msg("case %zu: %u victims of priority %d, want %u of %d", i, n, p, cases[i].want_n,
                         cases[i].want_p);
            assert_int_equal(out.flags & BT_LOAD_READY, ready ? BT_LOAD_READY : 0);
            /* cleared: READY stays, nothing else */
            bt_load_set_preempt(&out, 0, 7);
            assert_false(bt_load_get_preempt(&out, &n, &p));
            assert_true(n == 0 && p == 0);
            assert_int_equal(out.flags, ready ? BT_LOAD_READY : 0);
        }
    }
    /* an older worker's report (only READY) offers nothing; the bit without a count neither */
    bt_load_report old = {0, 64, 0, 0, 0, 0, BT_LOAD_READY};
    assert_false(bt_load_get_preempt(&old, NULL, NULL));
    old.flags |= BT_LOAD_PREEMPT | (10u << 8);
    assert_false(bt_load_get_preempt(&old, NULL, NULL));
    bt_buf_free(&b);
}

static void test_flags_are_carried(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_STOP, 1, NULL, 0), BT_OK);
    b.data[5] = (char)0xA5; /* no flags are defined yet; receivers must ignore them */
    bt_frame f = parse_one(&b);
    assert_int_equal(f.flags, 0xA5);
    bt_buf_free(&b);
}

/* ---- incremental and batched parsing ------------------------------------------------------- */

static void test_byte_by_byte(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1u << 20);
    int nframes = put_all_types(&b, 1);
    static uint32_t many[BT_TOKENS_MAX];
    assert_int_equal(bt_frame_put_tokens(&b, 3, many, BT_TOKENS_MAX, "t", 1), BT_OK), nframes++;

    size_t off = 0;
    int seen = 0;
    while (off < b.len) {
        size_t have = 0;
        bt_frame f;
        size_t used = 0;
        bt_status st;
        for (;;) {
            /* an exactly-sized copy, so ASan flags any read past `have` */
            uint8_t *p = malloc(have ? have : 1);
            assert_non_null(p);
            memcpy(p, b.data + off, have);
            st = bt_frame_parse(p, have, BT_FRAME_DEFAULT_MAX, &f, &used, NULL);
            free(p);
            if (st != BT_ERR_AGAIN) break;
            have++;
            assert_true(off + have <= b.len);
        }
        assert_int_equal(st, BT_OK);
        assert_int_equal(used, have);
        off += used;
        seen++;
    }
    assert_int_equal(seen, nframes);
    assert_int_equal(off, b.len);
    bt_buf_free(&b);
}

static void test_back_to_back(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1u << 24);
    const int rounds = 500;
    int per = 0;
    for (int i = 0; i < rounds; i++) per = put_all_types(&b, (uint32_t)(2 * i + 1));

    size_t off = 0;
    int count = 0;
    uint32_t ids[8];
    while (off < b.len) {
        bt_frame f;
        size_t used;
        const char *err = NULL;
        assert_int_equal(bt_frame_parse((const uint8_t *)b.data + off, b.len - off, BT_FRAME_DEFAULT_MAX, &f, &used, &err),
                         BT_OK);
        int round = count / per, idx = count % per;
        if (idx == 0) assert_int_equal(f.type, BT_FRAME_HELLO);
        if (idx == 1) {
            assert_int_equal(f.type, BT_FRAME_REQUEST);
            assert_int_equal(f.stream, (uint32_t)(2 * round + 1));
        }
        if (idx == 2) {
            size_t n, tl;
            const char *t;
            assert_int_equal(bt_frame_get_tokens(&f, ids, 8, &n, &t, &tl), BT_OK);
            assert_int_equal(n, 4);
            assert_true(ids[1] == 0xFFFFFFFFu);
            assert_int_equal(tl, 6);
        }
        if (idx == per - 1) assert_int_equal(f.type, BT_FRAME_GOAWAY);
        off += used;
        count++;
    }
    assert_int_equal(count, rounds * per);
    /* a trailing partial frame is AGAIN, not an error */
    bt_frame f;
    size_t used = 12345;
    assert_int_equal(bt_frame_parse((const uint8_t *)b.data, 11, BT_FRAME_DEFAULT_MAX, &f, &used, NULL), BT_ERR_AGAIN);
    assert_int_equal(used, 12345);
    assert_int_equal(bt_frame_parse(NULL, 0, BT_FRAME_DEFAULT_MAX, &f, &used, NULL), BT_ERR_AGAIN);
    bt_buf_free(&b);
}

/* ---- malformed frames ---------------------------------------------------------------------- */

typedef struct {
    const char *what;
    uint8_t type;
    uint16_t reserved;
    uint32_t stream;
    uint32_t plen;
    uint8_t p0, p1, p2, p3; /* first payload bytes (if plen allows) */
    bt_status want;
} bad_case;

static void test_malformed(void **state) {
    (void)state;
    static const bad_case cases[] = {
        {"type 0", 0, 0, 0, 8, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"type 12", 12, 0, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"type 15", 15, 0, 1, 1, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"type 255", 255, 0, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"reserved lo", BT_FRAME_STOP, 0x0001, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"reserved hi", BT_FRAME_STOP, 0x8000, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"HELLO stream 1", BT_FRAME_HELLO, 0, 1, 12, 0, 1, 0, 1, BT_ERR_PROTOCOL},
        {"PING stream 1", BT_FRAME_PING, 0, 1, 8, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"PONG stream 2", BT_FRAME_PONG, 0, 2, 8, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"LOAD stream 3", BT_FRAME_LOAD, 0, 3, 52, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"GOAWAY stream 1", BT_FRAME_GOAWAY, 0, 1, 2, 0, 15, 0, 0, BT_ERR_PROTOCOL},
        {"REQUEST stream 0", BT_FRAME_REQUEST, 0, 0, 2, '{', '}', 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS stream 0", BT_FRAME_TOKENS, 0, 0, 2, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"FINISH stream 0", BT_FRAME_FINISH, 0, 0, 12, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"STOP stream 0", BT_FRAME_STOP, 0, 0, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"KILL stream 0", BT_FRAME_KILL, 0, 0, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"HELLO 11", BT_FRAME_HELLO, 0, 0, 11, 0, 1, 0, 1, BT_ERR_PROTOCOL},
        {"HELLO 13", BT_FRAME_HELLO, 0, 0, 13, 0, 1, 0, 1, BT_ERR_PROTOCOL},
        {"FINISH 11", BT_FRAME_FINISH, 0, 1, 11, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"FINISH 13", BT_FRAME_FINISH, 0, 1, 13, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"PING 7", BT_FRAME_PING, 0, 0, 7, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"PING 9", BT_FRAME_PING, 0, 0, 9, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"PONG 0", BT_FRAME_PONG, 0, 0, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"LOAD 51", BT_FRAME_LOAD, 0, 0, 51, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"LOAD 53", BT_FRAME_LOAD, 0, 0, 53, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"STOP 1", BT_FRAME_STOP, 0, 1, 1, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"KILL 4", BT_FRAME_KILL, 0, 1, 4, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS 0", BT_FRAME_TOKENS, 0, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS 1", BT_FRAME_TOKENS, 0, 1, 1, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS n=4097", BT_FRAME_TOKENS, 0, 1, 2 + 4 * 4097, 0x10, 0x01, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS n=65535", BT_FRAME_TOKENS, 0, 1, 2 + 4 * 4097, 0xFF, 0xFF, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS n=3 in 13", BT_FRAME_TOKENS, 0, 1, 13, 0, 3, 0, 0, BT_ERR_PROTOCOL},
        {"TOKENS n=1 in 5", BT_FRAME_TOKENS, 0, 1, 5, 0, 1, 0, 0, BT_ERR_PROTOCOL},
        {"FINISH reason 6", BT_FRAME_FINISH, 0, 1, 12, 6, 0, 0, 0, BT_ERR_PROTOCOL},
        {"FINISH reason 255", BT_FRAME_FINISH, 0, 1, 12, 255, 0, 0, 0, BT_ERR_PROTOCOL},
        {"FINISH pad", BT_FRAME_FINISH, 0, 1, 12, 0, 0, 1, 0, BT_ERR_PROTOCOL},
        {"FINISH flag 0x2", BT_FRAME_FINISH, 0, 1, 12, 0, 2, 0, 0, BT_ERR_PROTOCOL},
        {"ERROR 0", BT_FRAME_ERROR, 0, 1, 0, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"ERROR 1 on 0", BT_FRAME_ERROR, 0, 0, 1, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        {"GOAWAY 1", BT_FRAME_GOAWAY, 0, 0, 1, 0, 0, 0, 0, BT_ERR_PROTOCOL},
        /* and the boundaries that are fine */
        {"ERROR 2 on 0", BT_FRAME_ERROR, 0, 0, 2, 0, 4, 0, 0, BT_OK},
        {"ERROR 2 on 5", BT_FRAME_ERROR, 0, 5, 2, 0, 4, 0, 0, BT_OK},
        {"GOAWAY 2", BT_FRAME_GOAWAY, 0, 0, 2, 0, 15, 0, 0, BT_OK},
        {"TOKENS n=1 in 6", BT_FRAME_TOKENS, 0, 1, 6, 0, 1, 0, 0, BT_OK},
        {"TOKENS n=0 text", BT_FRAME_TOKENS, 0, 1, 9, 0, 0, 'a', 'b', BT_OK},
        {"TOKENS n=4096", BT_FRAME_TOKENS, 0, 1, 2 + 4 * 4096, 0x10, 0x00, 0, 0, BT_OK},
        {"FINISH reason 2", BT_FRAME_FINISH, 0, 1, 12, 2, 0, 0, 0, BT_OK},
        {"REQUEST empty", BT_FRAME_REQUEST, 0, 1, 0, 0, 0, 0, 0, BT_OK},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        uint8_t head[4] = {c->p0, c->p1, c->p2, c->p3};
        uint8_t *pl = calloc(1, c->plen + 4);
        assert_non_null(pl);
        memcpy(pl, head, c->plen < 4 ? c->plen : 4);
        const char *err = NULL;
        bt_status st = parse_raw(c->type, c->reserved, c->stream, pl, c->plen, &err);
        free(pl);
        if (st != c->want) fprintf(stderr, "case '%s': got %s\n", c->what, bt_status_name(st));
        assert_int_equal(st, c->want);
        if (c->want != BT_OK) {
            assert_non_null(err);
            assert_true(strlen(err) > 0);
        }
    }
}

static void test_short_length(void **state) {
    (void)state;
    for (uint32_t len = 0; len < 8; len++) {
        uint8_t buf[12];
        raw_hdr(buf, len, BT_FRAME_STOP, 0, 0, 1);
        bt_frame f;
        size_t used;
        const char *err = NULL;
        /* rejected as soon as the length is known, even with only 4 bytes */
        assert_int_equal(bt_frame_parse(buf, 4, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_ERR_PROTOCOL);
        assert_non_null(err);
        assert_int_equal(bt_frame_parse(buf, sizeof buf, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_ERR_PROTOCOL);
    }
}

static void test_oversized_prefix(void **state) {
    (void)state;
    bt_frame f;
    size_t used;
    const char *err = NULL;
    uint8_t *p = malloc(4); /* only the length prefix exists */
    assert_non_null(p);
    uint32_t lens[] = {BT_FRAME_DEFAULT_MAX + 1, 0x7FFFFFFFu, 0xFFFFFFFFu};
    for (int i = 0; i < 3; i++) {
        p[0] = (uint8_t)(lens[i] >> 24), p[1] = (uint8_t)(lens[i] >> 16), p[2] = (uint8_t)(lens[i] >> 8),
        p[3] = (uint8_t)lens[i];
        err = NULL;
        assert_int_equal(bt_frame_parse(p, 4, BT_FRAME_DEFAULT_MAX, &f, &used, &err), BT_ERR_TOO_LARGE);
        assert_non_null(err);
    }
    /* exactly at the cap is fine: more bytes are needed */
    p[0] = 1, p[1] = 0, p[2] = 0, p[3] = 0;
    assert_int_equal(bt_frame_parse(p, 4, BT_FRAME_DEFAULT_MAX, &f, &used, NULL), BT_ERR_AGAIN);
    /* a small cap applies too, and the largest length with UINT32_MAX as cap does not overflow */
    assert_int_equal(bt_frame_parse(p, 4, 100, &f, &used, NULL), BT_ERR_TOO_LARGE);
    p[0] = 0xFF, p[1] = 0xFF, p[2] = 0xFF, p[3] = 0xFF;
    assert_int_equal(bt_frame_parse(p, 4, UINT32_MAX, &f, &used, NULL), BT_ERR_AGAIN);
    free(p);

    uint8_t big[20];
    raw_hdr(big, 0xFFFFFFFFu, BT_FRAME_REQUEST, 0, 0, 1);
    assert_int_equal(bt_frame_parse(big, sizeof big, UINT32_MAX, &f, &used, NULL), BT_ERR_AGAIN);

    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put_error(&b, 1, 1, "0123456789"), BT_OK); /* length 20 */
    assert_int_equal(bt_frame_parse((const uint8_t *)b.data, b.len, 19, &f, &used, NULL), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_frame_parse((const uint8_t *)b.data, b.len, 20, &f, &used, NULL), BT_OK);
    bt_buf_free(&b);
}

/* ---- encoders ------------------------------------------------------------------------------ */

static void test_encoder_cap(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 20);
    assert_int_equal(bt_frame_put_hello(&b, BT_ROLE_WORKER, 1), BT_ERR_TOO_LARGE); /* 24 bytes */
    assert_int_equal(b.len, 0);
    /* the buffer's error is sticky (common/util.h): nothing more goes in until it is reset */
    assert_int_equal(bt_frame_put_ping(&b, BT_FRAME_PING, 1), BT_ERR_TOO_LARGE);
    assert_int_equal(b.len, 0);
    bt_buf_reset(&b);
    assert_int_equal(bt_frame_put_ping(&b, BT_FRAME_PING, 1), BT_OK); /* 20 bytes: exactly the cap */
    assert_int_equal(b.len, 20);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_STOP, 1, NULL, 0), BT_ERR_TOO_LARGE);
    assert_int_equal(b.len, 20);
    bt_frame f = parse_one(&b);
    assert_int_equal(f.type, BT_FRAME_PING);

    bt_buf_reset(&b);
    static uint32_t ids[BT_TOKENS_MAX];
    assert_int_equal(bt_frame_put_tokens(&b, 1, ids, 2, NULL, 0), BT_ERR_TOO_LARGE); /* 12 + 10 = 22 */
    assert_int_equal(bt_frame_put_load(&b, &(bt_load_report){0}), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_frame_put_goaway(&b, 12, "a long reason that does not fit"), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_frame_put_error(&b, 1, 12, "a long message that does not fit"), BT_ERR_TOO_LARGE);
    assert_int_equal(b.len, 0);
    bt_buf_free(&b);
}

static void test_encoder_rejects_invalid(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 1u << 20);
    static uint32_t ids[BT_TOKENS_MAX + 1];
    assert_int_equal(bt_frame_put_tokens(&b, 1, ids, BT_TOKENS_MAX + 1, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_tokens(&b, 0, ids, 1, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_tokens(&b, 1, NULL, 1, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_finish(&b, 1, 6, 0, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_finish_flags(&b, 1, 0, 0x2, 0, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_finish(&b, 0, 0, 0, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_ping(&b, BT_FRAME_HELLO, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, 0, 1, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_TYPE_MAX_ + 1, 1, NULL, 0), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_REQUEST, 0, "{}", 2), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_STOP, 1, "x", 1), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_HELLO, 0, "short", 5), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_REQUEST, 1, NULL, 3), BT_ERR_INVALID);
    uint8_t bad_finish[12] = {7};
    assert_int_equal(bt_frame_put(&b, BT_FRAME_FINISH, 1, bad_finish, 12), BT_ERR_INVALID);
    assert_int_equal(bt_frame_put_load(&b, NULL), BT_ERR_INVALID);
    assert_int_equal(b.len, 0);
    bt_buf_free(&b);
}

static void test_decoders_defensive(void **state) {
    (void)state;
    uint8_t pl[64] = {0};
    bt_frame f = {BT_FRAME_PING, 0, 0, pl, 8};
    uint16_t v16;
    uint64_t v64;
    uint8_t r;
    uint32_t ids[4];
    size_t n;
    bt_load_report lr;
    assert_int_equal(bt_frame_get_hello(&f, &v16, &v16, &v64), BT_ERR_INVALID);
    assert_int_equal(bt_frame_get_finish(&f, &r, NULL, NULL), BT_ERR_INVALID);
    assert_int_equal(bt_frame_get_tokens(&f, ids, 4, &n, NULL, NULL), BT_ERR_INVALID);
    assert_int_equal(bt_frame_get_error(&f, &v16, NULL, NULL), BT_ERR_INVALID);
    assert_int_equal(bt_frame_get_load(&f, &lr), BT_ERR_INVALID);
    assert_int_equal(bt_frame_get_ping(&f, &v64), BT_OK);
    assert_int_equal(bt_frame_get_ping(NULL, &v64), BT_ERR_INVALID);
    /* hand-built frames with sizes the parser would never produce */
    f = (bt_frame){BT_FRAME_HELLO, 0, 0, pl, 4};
    assert_int_equal(bt_frame_get_hello(&f, &v16, &v16, &v64), BT_ERR_PROTOCOL);
    f = (bt_frame){BT_FRAME_LOAD, 0, 0, pl, 60};
    assert_int_equal(bt_frame_get_load(&f, &lr), BT_ERR_PROTOCOL);
    f = (bt_frame){BT_FRAME_TOKENS, 0, 1, pl, 1};
    assert_int_equal(bt_frame_get_tokens(&f, ids, 4, &n, NULL, NULL), BT_ERR_PROTOCOL);
    pl[1] = 5; /* n = 5 but only 10 bytes */
    f = (bt_frame){BT_FRAME_TOKENS, 0, 1, pl, 10};
    assert_int_equal(bt_frame_get_tokens(&f, ids, 4, &n, NULL, NULL), BT_ERR_PROTOCOL);
    f = (bt_frame){BT_FRAME_ERROR, 0, 1, pl, 1};
    assert_int_equal(bt_frame_get_error(&f, &v16, NULL, NULL), BT_ERR_PROTOCOL);
    pl[0] = 9;
    f = (bt_frame){BT_FRAME_FINISH, 0, 1, pl, 12};
    assert_int_equal(bt_frame_get_finish(&f, &r, NULL, NULL), BT_ERR_PROTOCOL);

    for (int t = 0; t <= 255; t++) assert_non_null(bt_frame_type_name((uint8_t)t));
    assert_string_equal(bt_frame_type_name(BT_FRAME_TOKENS), "TOKENS");
    assert_string_equal(bt_frame_type_name(BT_FRAME_GOAWAY), "GOAWAY");
    assert_string_equal(bt_frame_type_name(0), "UNKNOWN");
}

/* ---- fuzz loop ----------------------------------------------------------------------------- */

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* Runs every decoder that applies to f, and checks the frame re-encodes to the same bytes. */
static void exercise(const bt_frame *f, const uint8_t *raw, size_t used) {
    static uint32_t ids[BT_TOKENS_MAX];
    uint16_t a, b;
    uint64_t c;
    uint8_t r;
    uint32_t x, y;
    size_t n, tl;
    const char *t;
    bt_load_report lr;
    switch (f->type) {
    case BT_FRAME_HELLO: assert_int_equal(bt_frame_get_hello(f, &a, &b, &c), BT_OK); break;
    case BT_FRAME_TOKENS:
        assert_int_equal(bt_frame_get_tokens(f, ids, BT_TOKENS_MAX, &n, &t, &tl), BT_OK);
        assert_true(2 + 4 * n + tl == f->len);
        break;
    case BT_FRAME_FINISH: assert_int_equal(bt_frame_get_finish(f, &r, &x, &y), BT_OK); break;
    case BT_FRAME_ERROR:
    case BT_FRAME_GOAWAY:
        assert_int_equal(bt_frame_get_error(f, &a, &t, &tl), BT_OK);
        assert_true(tl + 2 == f->len);
        break;
    case BT_FRAME_PING:
    case BT_FRAME_PONG: assert_int_equal(bt_frame_get_ping(f, &c), BT_OK); break;
    case BT_FRAME_LOAD: assert_int_equal(bt_frame_get_load(f, &lr), BT_OK); break;
    default: break;
    }
    bt_buf re;
    bt_buf_init(&re, BIG);
    assert_int_equal(bt_frame_put(&re, f->type, f->stream, f->payload, f->len), BT_OK);
    assert_int_equal(re.len, used);
    re.data[5] = (char)f->flags;
    assert_memory_equal(re.data, raw, used);
    bt_buf_free(&re);
}

static void test_fuzz_loop(void **state) {
    (void)state;
    bt_buf seeds;
    bt_buf_init(&seeds, 1u << 20);
    put_all_types(&seeds, 1);
    put_all_types(&seeds, 0x7FFFFFFFu);
    /* frame boundaries in the seeds, so that most windows start on a frame */
    size_t bounds[64], nb = 0;
    for (size_t off = 0; off < seeds.len && nb < 64;) {
        bt_frame f;
        size_t used;
        assert_int_equal(bt_frame_parse((const uint8_t *)seeds.data + off, seeds.len - off, BT_FRAME_DEFAULT_MAX, &f,
                                        &used, NULL),
                         BT_OK);
        bounds[nb++] = off;
        off += used;
    }
    const int iters = 300000;
    long ok_frames = 0, rejected = 0;
    for (int it = 0; it < iters; it++) {
        size_t n;
        uint8_t *p;
        uint64_t mode = rnd() % 4;
        if (mode == 0) { /* pure noise, biased towards small lengths so that frames complete */
            n = rnd() % 80;
            p = malloc(n ? n : 1);
            assert_non_null(p);
            for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd();
            if (n >= 4 && rnd() % 2) p[0] = p[1] = 0, p[2] = (uint8_t)(rnd() % 2), p[3] = (uint8_t)rnd();
            if (n >= 8 && rnd() % 2) p[4] = (uint8_t)(1 + rnd() % 12), p[6] = p[7] = 0;
        } else { /* a window of valid frames, mutated */
            size_t start = rnd() % 4 ? bounds[rnd() % nb] : rnd() % seeds.len;
            size_t len = rnd() % (seeds.len - start + 1);
            n = len;
            p = malloc(n ? n : 1);
            assert_non_null(p);
            memcpy(p, seeds.data + start, n);
            int flips = (int)(rnd() % 4);
            for (int k = 0; k < flips && n; k++) {
                size_t at = rnd() % n;
                switch (rnd() % 3) {
                case 0: p[at] ^= (uint8_t)(1u << (rnd() % 8)); break;
                case 1: p[at] = (uint8_t)rnd(); break;
                default: p[at] = (uint8_t)(rnd() % 2 ? 0 : 0xFF); break;
                }
            }
        }
        uint32_t caps[] = {BT_FRAME_DEFAULT_MAX, 64, 8, UINT32_MAX};
        uint32_t cap = caps[rnd() % 4];
        size_t off = 0;
        while (off <= n) {
            bt_frame f;
            size_t used = (size_t)-1;
            const char *err = NULL;
            bt_status st = bt_frame_parse(p + off, n - off, cap, &f, &used, &err);
            if (st != BT_OK) {
                assert_true(st == BT_ERR_AGAIN || st == BT_ERR_PROTOCOL || st == BT_ERR_TOO_LARGE);
                if (st != BT_ERR_AGAIN) assert_non_null(err), rejected++;
                break;
            }
            assert_true(used >= BT_FRAME_HEADER);
            assert_true(used <= n - off);
            assert_true(f.len == used - BT_FRAME_HEADER);
            assert_true(f.payload == p + off + BT_FRAME_HEADER);
            exercise(&f, p + off, used);
            ok_frames++;
            off += used;
        }
        free(p);
    }
    bt_buf_free(&seeds);
    fprintf(stderr, "fuzz loop: %d buffers, %ld frames parsed, %ld rejected\n", iters, ok_frames, rejected);
    assert_true(ok_frames > 1000);
    assert_true(rejected > 1000);
}

/* ---- seed corpus for fuzz/fuzz_proto.c ----------------------------------------------------- */

static void write_seed(const char *dir, const char *name, const bt_buf *b) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(b->data, 1, b->len, fp), b->len);
    fclose(fp);
}

static void test_write_corpus(void **state) {
    (void)state;
    const char *dir = getenv("BT_PROTO_CORPUS_DIR");
    if (!dir || !*dir) skip();
    bt_buf b;
    bt_buf_init(&b, 1u << 20);
    static const uint32_t ids[] = {9906, 374, 264, 1296};
    bt_load_report lr = {120, 16384, 512, 2, 14, 8192, BT_LOAD_READY};
    const char *req = "{\"request_id\":\"r-1\",\"api\":\"chat\",\"body\":{\"model\":\"m\",\"messages\":[{\"role\":"
                      "\"user\",\"content\":\"hi\"}],\"stream\":true},\"carried\":[9906,374],\"max_tokens\":16}";
#define SEED(name, call)                                                                                      \
    do {                                                                                                      \
        bt_buf_reset(&b);                                                                                     \
        assert_int_equal(call, BT_OK);                                                                        \
        write_seed(dir, name, &b);                                                                            \
    } while (0)
    SEED("hello", bt_frame_put_hello(&b, BT_ROLE_WORKER, 0x1d2c3b4a59687786ull));
    SEED("request", bt_frame_put(&b, BT_FRAME_REQUEST, 1, req, strlen(req)));
    SEED("tokens", bt_frame_put_tokens(&b, 1, ids, 4, "Hello, world", 12));
    SEED("finish", bt_frame_put_finish(&b, 1, 1, 12, 16));
    SEED("error", bt_frame_put_error(&b, 3, BT_ERR_SHUTDOWN, "engine shutting down"));
    SEED("stop", bt_frame_put(&b, BT_FRAME_STOP, 5, NULL, 0));
    SEED("kill", bt_frame_put(&b, BT_FRAME_KILL, 7, NULL, 0));
    SEED("ping", bt_frame_put_ping(&b, BT_FRAME_PING, 1234567));
    SEED("pong", bt_frame_put_ping(&b, BT_FRAME_PONG, 1234567));
    SEED("load", bt_frame_put_load(&b, &lr));
    SEED("goaway", bt_frame_put_goaway(&b, BT_ERR_DRAINING, "worker is draining"));
    SEED("waiting", bt_frame_put_waiting(&b, 9, BT_WAIT_PREEMPTED));
#undef SEED
    bt_buf_reset(&b);
    assert_int_equal(bt_frame_put_hello(&b, BT_ROLE_FRONTEND, 0), BT_OK);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_REQUEST, 1, req, strlen(req)), BT_OK);
    assert_int_equal(bt_frame_put_tokens(&b, 1, ids, 2, "Hello", 5), BT_OK);
    assert_int_equal(bt_frame_put_load(&b, &lr), BT_OK);
    assert_int_equal(bt_frame_put_tokens(&b, 1, ids + 2, 2, ", world", 7), BT_OK);
    assert_int_equal(bt_frame_put_finish(&b, 1, 0, 12, 4), BT_OK);
    assert_int_equal(bt_frame_put(&b, BT_FRAME_STOP, 3, NULL, 0), BT_OK);
    assert_int_equal(bt_frame_put_ping(&b, BT_FRAME_PONG, 99), BT_OK);
    write_seed(dir, "session", &b);
    bt_buf_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hello_wire_bytes),
        cmocka_unit_test(test_roundtrip_request_stop_kill),
        cmocka_unit_test(test_roundtrip_tokens),
        cmocka_unit_test(test_roundtrip_finish_error_goaway),
        cmocka_unit_test(test_roundtrip_ping_pong_load),
        cmocka_unit_test(test_load_preempt),
        cmocka_unit_test(test_flags_are_carried),
        cmocka_unit_test(test_byte_by_byte),
        cmocka_unit_test(test_back_to_back),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_short_length),
        cmocka_unit_test(test_oversized_prefix),
        cmocka_unit_test(test_encoder_cap),
        cmocka_unit_test(test_kvstate),
        cmocka_unit_test(test_waiting),
        cmocka_unit_test(test_encoder_rejects_invalid),
        cmocka_unit_test(test_decoders_defensive),
        cmocka_unit_test(test_fuzz_loop),
        cmocka_unit_test(test_write_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
