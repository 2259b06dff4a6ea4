/* fuzz_proto.c — libFuzzer driver for the request-plane frame codec (src/proto/proto.c).
 *
 * Treats the input as a byte stream from a peer and parses it frame by frame, as a connection
 * would, until the codec asks for more bytes or rejects a frame. Every accepted frame goes through
 * the typed payload decoder for its type and is checked against invariants: it lies inside the
 * input, every prefix of it parses as "need more bytes", it re-encodes to the same bytes, and a
 * decoded payload re-encodes with the typed encoder to the same payload. A violated invariant
 * aborts, so libFuzzer reports it like a crash. Seeds are in fuzz/corpus/proto/; build and run
 * with fuzz/build.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/proto.h"

#include "check.h"

static uint32_t ids[BT_TOKENS_MAX];

/* Decodes f with its typed decoder and re-encodes it with the matching typed encoder into out. */
static void typed_roundtrip(const bt_frame *f, bt_buf *out) {
    uint16_t a, b;
    uint64_t v;
    uint8_t r, fl;
    uint32_t x, y;
    size_t n, tl;
    const char *t;
    bt_load_report lr;
    switch (f->type) {
    case BT_FRAME_HELLO:
        CHECK(bt_frame_get_hello(f, &a, &b, &v) == BT_OK);
        if (a == BT_PROTO_VERSION) CHECK(bt_frame_put_hello(out, b, v) == BT_OK);
        break;
    case BT_FRAME_TOKENS:
        CHECK(bt_frame_get_tokens(f, ids, BT_TOKENS_MAX, &n, &t, &tl) == BT_OK);
        CHECK(2 + 4 * n + tl == f->len);
        CHECK(bt_frame_put_tokens(out, f->stream, ids, n, t, tl) == BT_OK);
        break;
    case BT_FRAME_FINISH:
        CHECK(bt_frame_get_finish(f, &r, &x, &y) == BT_OK);
        CHECK(bt_frame_get_finish_flags(f, &fl) == BT_OK); /* the usage-unreported flag, kept */
        CHECK(bt_frame_put_finish_flags(out, f->stream, r, fl, x, y) == BT_OK);
        break;
    case BT_FRAME_ERROR:
    case BT_FRAME_GOAWAY:
        CHECK(bt_frame_get_error(f, &a, &t, &tl) == BT_OK);
        CHECK(tl + 2 == f->len);
        if (!memchr(t, 0, tl)) { /* the string encoders take NUL-terminated text */
            char *msg = malloc(tl + 1);
            CHECK(msg != NULL);
            memcpy(msg, t, tl);
            msg[tl] = '\0';
            if (f->type == BT_FRAME_ERROR) CHECK(bt_frame_put_error(out, f->stream, a, msg) == BT_OK);
            else CHECK(bt_frame_put_goaway(out, a, msg) == BT_OK);
            free(msg);
        }
        break;
    case BT_FRAME_PING:
    case BT_FRAME_PONG:
        CHECK(bt_frame_get_ping(f, &v) == BT_OK);
        CHECK(bt_frame_put_ping(out, f->type, v) == BT_OK);
        break;
    case BT_FRAME_LOAD:
        CHECK(bt_frame_get_load(f, &lr) == BT_OK);
        CHECK(bt_frame_put_load(out, &lr) == BT_OK);
        break;
    case BT_FRAME_WAITING:
        CHECK(bt_frame_get_waiting(f, &r) == BT_OK);
        CHECK(bt_frame_put_waiting(out, f->stream, r) == BT_OK);
        break;
    case BT_FRAME_KVSTATE: {
        uint64_t total, off;
        const uint8_t *d;
        CHECK(bt_frame_get_kvstate(f, &total, &off, &d, &n) == BT_OK);
        CHECK(n + BT_KV_HEADER == f->len && off + n <= total && total <= BT_KV_STATE_MAX);
        CHECK(bt_frame_put_kvstate(out, f->stream, total, off, d, n) == BT_OK);
        break;
    }
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    bt_buf out;
    bt_buf_init(&out, 64u * 1024 * 1024);
    size_t off = 0;
    for (;;) {
        bt_frame f;
        size_t used = 0;
        const char *err = NULL;
        bt_status st = bt_frame_parse(data + off, size - off, BT_FRAME_DEFAULT_MAX, &f, &used, &err);
        if (st == BT_ERR_AGAIN) break;
        if (st != BT_OK) {
            CHECK(st == BT_ERR_PROTOCOL || st == BT_ERR_TOO_LARGE);
            CHECK(err != NULL);
            break;
        }
        CHECK(used >= BT_FRAME_HEADER && used <= size - off);
        CHECK(f.payload == data + off + BT_FRAME_HEADER && f.len == used - BT_FRAME_HEADER);
        CHECK(f.type >= 1 && f.type <= BT_FRAME_TYPE_MAX_);
        CHECK(strcmp(bt_frame_type_name(f.type), "UNKNOWN") != 0);

        /* any strict prefix of an accepted frame is "need more bytes" */
        bt_frame g;
        size_t gu;
        CHECK(bt_frame_parse(data + off, used - 1, BT_FRAME_DEFAULT_MAX, &g, &gu, NULL) == BT_ERR_AGAIN);

        /* the generic encoder reproduces the frame (flags aside) */
        bt_buf_reset(&out);
        CHECK(bt_frame_put(&out, f.type, f.stream, f.payload, f.len) == BT_OK);
        CHECK(out.len == used);
        out.data[5] = (char)f.flags;
        CHECK(memcmp(out.data, data + off, used) == 0);

        /* the typed decoder/encoder pair reproduces the payload */
        bt_buf_reset(&out);
        typed_roundtrip(&f, &out);
        if (out.len) {
            CHECK(out.len == used);
            CHECK(memcmp(out.data + BT_FRAME_HEADER, f.payload, f.len) == 0);
        }
        off += used;
    }
    bt_buf_free(&out);
    return 0;
}
