/* fuzz_sse.c — libFuzzer driver for the Server-Sent Events parser (src/engine/openai/sse_parse.c)
 * and the openai engine's chunk parser (src/engine/openai/openai_wire.c).
 *
 * The first input byte picks the caps and a piece size; the rest is an event stream from an
 * upstream. It is parsed twice, whole and in pieces of that size (each piece an exactly-sized heap
 * copy, so ASan sees any read past it), and both runs must give the same events, the same final
 * status, events within the caps, and `used` never past the input. Every event's data also goes
 * through the chunk parser, whose result must be consistent (ids below 2^31, text inside its JSON,
 * an error with a message). A violated invariant aborts. Seeds are in fuzz/corpus/sse/; build and
 * run with fuzz/build.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/openai/openai_wire.h"
#include "engine/openai/sse_parse.h"

#include "check.h"

typedef struct {
    bt_buf all; /* every event as name, 0x01, data, 0x02 */
    size_t n;
    bt_status st;
} run_out;

static void check_chunk(const char *data, size_t len) {
    bt_oa_chunk c;
    char err[256];
    err[0] = '\0';
    for (int unary = 0; unary < 2; unary++) {
        bt_status st = bt_oa_parse_chunk(data, len, unary, &c, err, sizeof err);
        if (st == BT_OK) {
            CHECK(!c.is_error || c.err_msg != NULL);
            CHECK(c.text == NULL || c.root != NULL);
            CHECK(!c.has_ids || c.ids != NULL);
            for (size_t i = 0; i < c.n_ids; i++) CHECK(!bt_oa_is_text_id(c.ids[i]));
        } else {
            CHECK(st == BT_ERR_PROTOCOL || st == BT_ERR_NOMEM);
            CHECK(err[0] != '\0');
        }
        bt_oa_chunk_free(&c);
    }
}

static void run(const uint8_t *in, size_t len, size_t piece, size_t max_line, size_t max_data, bool chunks,
                run_out *out) {
    bt_buf_init(&out->all, 1u << 30);
    out->n = 0;
    out->st = BT_OK;
    bt_sse_parser p;
    bt_sse_init(&p, max_line, max_data);
    size_t off = 0;
    while (off < len && out->st == BT_OK) {
        size_t k = piece && piece < len - off ? piece : len - off;
        char *buf = malloc(k);
        CHECK(buf != NULL);
        memcpy(buf, in + off, k);
        size_t pos = 0;
        for (;;) {
            size_t used = 0;
            bt_sse_event ev;
            const char *err = NULL;
            bt_status st = bt_sse_next(&p, buf + pos, k - pos, &used, &ev, &err);
            CHECK(used <= k - pos);
            pos += used;
            if (st == BT_ERR_AGAIN) {
                CHECK(pos == k);
                break;
            }
            if (st != BT_OK) {
                CHECK(st == BT_ERR_TOO_LARGE && err != NULL);
                out->st = st;
                break;
            }
            CHECK(ev.data_len <= max_data && ev.event_len <= BT_SSE_EVENT_NAME_MAX && ev.event_len > 0);
            bt_buf_append(&out->all, ev.event, ev.event_len);
            bt_buf_append(&out->all, "\x01", 1);
            bt_buf_append(&out->all, ev.data, ev.data_len);
            bt_buf_append(&out->all, "\x02", 1);
            out->n++;
            if (chunks) check_chunk(ev.data, ev.data_len);
        }
        free(buf);
        off += k;
    }
    if (out->st == BT_OK) {
        bt_sse_event ev;
        bt_status st = bt_sse_end(&p, &ev, NULL);
        CHECK(st == BT_OK || st == BT_ERR_AGAIN || st == BT_ERR_TOO_LARGE);
        if (st == BT_OK) {
            bt_buf_append(&out->all, ev.data, ev.data_len);
            out->n++;
        } else if (st == BT_ERR_TOO_LARGE) {
            out->st = st;
        }
    }
    bt_sse_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t knob = data[0];
    size_t max_line = knob & 0x80 ? 1u << 16 : 16 + (knob & 0x3f);
    size_t max_data = knob & 0x40 ? 1u << 16 : 8 + (knob & 0x1f) * 4;
    size_t piece = 1 + (knob & 0x0f);
    run_out a, b;
    run(data + 1, size - 1, 0, max_line, max_data, true, &a);
    run(data + 1, size - 1, piece, max_line, max_data, false, &b);
    CHECK(a.st == b.st);
    CHECK(a.n == b.n);
    CHECK(a.all.len == b.all.len);
    CHECK(a.all.len == 0 || memcmp(a.all.data, b.all.data, a.all.len) == 0);
    bt_buf_free(&a.all);
    bt_buf_free(&b.all);
    return 0;
}
