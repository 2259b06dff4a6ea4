/* test_sse_parse.c — unit tests of the incremental Server-Sent Events parser
 * (src/engine/openai/sse_parse.c).
 *
 * Covers: single and multi-line data, the optional space after the colon, fields without a colon,
 * comments and ignored fields, event names (and that the name of a data-less event does not leak
 * into the next), LF / CR / CRLF line ends including a CRLF split across two inputs, the BOM at the
 * start only, an OpenAI-style stream with [DONE], the lenient end of input, every cap (line, data,
 * event name) with the parser staying failed, and a differential test: thousands of random
 * streams, each fed whole, byte by byte and in random pieces, must give exactly the events of a
 * straightforward reference implementation of the WHATWG rules written here from the spec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/openai/sse_parse.h"

#define MAXEV 4096

typedef struct {
    int n;
    char *ev[MAXEV]; /* "name\x01data" */
    size_t len[MAXEV];
    bt_status st; /* BT_OK, or the failure that ended parsing */
} evlist;

static void ev_add(evlist *l, const char *name, size_t nl, const char *data, size_t dl) {
    assert_true(l->n < MAXEV);
    char *s = malloc(nl + dl + 2);
    assert_non_null(s);
    memcpy(s, name, nl);
    s[nl] = '\x01';
    memcpy(s + nl + 1, data, dl);
    s[nl + 1 + dl] = '\0';
    l->ev[l->n] = s;
    l->len[l->n++] = nl + 1 + dl;
}

static void ev_free(evlist *l) {
    for (int i = 0; i < l->n; i++) free(l->ev[i]);
    memset(l, 0, sizeof *l);
}

static void ev_equal(const evlist *a, const evlist *b) {
    if (a->n != b->n || a->st != b->st) fprintf(stderr, "events %d vs %d, status %d vs %d\n", a->n, b->n, a->st, b->st);
    assert_int_equal(a->st, b->st);
    assert_int_equal(a->n, b->n);
    for (int i = 0; i < a->n; i++) {
        assert_int_equal(a->len[i], b->len[i]);
        assert_memory_equal(a->ev[i], b->ev[i], a->len[i]);
    }
}

/* Parses `in` cut into pieces (sizes from `cuts`, cycling; 0 = whole input) with a fresh parser
 * on heap copies of each piece (so ASan sees any read past a piece), then ends the input. */
static void parse_pieces(const char *in, size_t len, const size_t *cuts, size_t ncuts, size_t max_line,
                         size_t max_data, bool end, evlist *out) {
    memset(out, 0, sizeof *out);
    bt_sse_parser p;
    bt_sse_init(&p, max_line, max_data);
    size_t off = 0, ci = 0;
    while (off < len) {
        size_t piece = ncuts ? cuts[ci++ % ncuts] : len;
        if (piece == 0 || piece > len - off) piece = len - off;
        char *buf = malloc(piece ? piece : 1);
        assert_non_null(buf);
        memcpy(buf, in + off, piece);
        size_t pos = 0;
        for (;;) {
            size_t used = 99999;
            bt_sse_event ev;
            const char *err = NULL;
            bt_status st = bt_sse_next(&p, buf + pos, piece - pos, &used, &ev, &err);
            assert_true(used <= piece - pos);
            pos += used;
            if (st == BT_ERR_AGAIN) {
                assert_int_equal(pos, piece);
                break;
            }
            if (st != BT_OK) {
                assert_non_null(err);
                out->st = st;
                free(buf);
                bt_sse_free(&p);
                return;
            }
            assert_true(ev.data_len <= max_data);
            ev_add(out, ev.event, ev.event_len, ev.data, ev.data_len);
        }
        free(buf);
        off += piece;
    }
    if (end) {
        bt_sse_event ev;
        bt_status st = bt_sse_end(&p, &ev, NULL);
        if (st == BT_OK) ev_add(out, ev.event, ev.event_len, ev.data, ev.data_len);
        else if (st != BT_ERR_AGAIN) out->st = st;
    }
    bt_sse_free(&p);
}

static void parse_whole(const char *in, evlist *out) {
    parse_pieces(in, strlen(in), NULL, 0, 1 << 20, 1 << 20, false, out);
}

static void expect(const evlist *l, int i, const char *name, const char *data) {
    assert_true(i < l->n);
    char want[512];
    int n = snprintf(want, sizeof want, "%s\x01%s", name, data);
    if ((size_t)n != l->len[i] || memcmp(want, l->ev[i], (size_t)n) != 0)
        fprintf(stderr, "event %d: got %.*s, want %s\n", i, (int)l->len[i], l->ev[i], want);
    assert_int_equal((size_t)n, l->len[i]);
    assert_memory_equal(want, l->ev[i], (size_t)n);
}

/* ---- reference implementation (whole input, straight from the spec) ------------------------ */

static void reference(const char *in, size_t len, size_t max_line, size_t max_data, bool end, evlist *out) {
    memset(out, 0, sizeof *out);
    char *data = malloc(len + 2);
    char name[BT_SSE_EVENT_NAME_MAX + 1];
    size_t dl = 0, nl = 0;
    bool have = false;
    assert_non_null(data);
    size_t i = 0;
    bool first = true;
    while (i < len) {
        size_t j = i;
        while (j < len && in[j] != '\n' && in[j] != '\r') j++;
        bool complete = j < len;
        if (!complete && !end) {
            if (j - i > max_line) out->st = BT_ERR_TOO_LARGE;
            break;
        }
        const char *s = in + i;
        size_t n = j - i;
        if (complete) {
            i = j + 1;
            if (in[j] == '\r' && i < len && in[i] == '\n') i++;
        } else {
            i = len;
        }
        if (n > max_line) {
            out->st = BT_ERR_TOO_LARGE;
            break;
        }
        if (first) {
            first = false;
            if (n >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0) s += 3, n -= 3;
        }
        if (n == 0) {
            if (have) ev_add(out, nl ? name : "message", nl ? nl : 7, data, dl ? dl - 1 : 0);
            dl = nl = 0;
            have = false;
            continue;
        }
        if (s[0] == ':') continue;
        const char *c = memchr(s, ':', n);
        size_t fl = c ? (size_t)(c - s) : n;
        const char *v = c ? c + 1 : s + n;
        size_t vl = c ? n - fl - 1 : 0;
        if (vl && v[0] == ' ') v++, vl--;
        if (fl == 4 && memcmp(s, "data", 4) == 0) {
            if (dl + vl + 1 > max_data + 1) {
                out->st = BT_ERR_TOO_LARGE;
                break;
            }
            memcpy(data + dl, v, vl);
            dl += vl;
            data[dl++] = '\n';
            have = true;
        } else if (fl == 5 && memcmp(s, "event", 5) == 0) {
            if (vl > BT_SSE_EVENT_NAME_MAX) {
                out->st = BT_ERR_TOO_LARGE;
                break;
            }
            memcpy(name, v, vl);
            nl = vl;
        }
    }
    if (end && !out->st && have) ev_add(out, nl ? name : "message", nl ? nl : 7, data, dl ? dl - 1 : 0);
    free(data);
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_basic(void **state) {
    (void)state;
    evlist l;
    parse_whole("data: hello\n\ndata:world\n\n", &l);
    assert_int_equal(l.n, 2);
    expect(&l, 0, "message", "hello");
    expect(&l, 1, "message", "world");
    ev_free(&l);
    /* only one space is removed; a field without a colon is a field with an empty value */
    parse_whole("data:  two spaces\ndata\ndata: x\n\n", &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", " two spaces\n\nx");
    ev_free(&l);
    parse_whole("data:\n\n", &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", "");
    ev_free(&l);
    /* colons inside the value stay */
    parse_whole("data: {\"a\":\"b:c\"}\n\n", &l);
    expect(&l, 0, "message", "{\"a\":\"b:c\"}");
    ev_free(&l);
}

static void test_comments_fields_names(void **state) {
    (void)state;
    evlist l;
    parse_whole(": keep-alive\nid: 7\nretry: 100\nfoo: bar\nevent: delta\ndata: 1\n\n"
                "event: lonely\n\n"
                "data: 2\n\n",
                &l);
    assert_int_equal(l.n, 2);
    expect(&l, 0, "delta", "1");
    expect(&l, 1, "message", "2"); /* the data-less event's name did not carry over */
    ev_free(&l);
    parse_whole("\n\n\n: only comments\n\n", &l);
    assert_int_equal(l.n, 0);
    ev_free(&l);
}

static void test_line_ends(void **state) {
    (void)state;
    evlist l;
    parse_whole("data: a\r\rdata: b\r\n\r\ndata: c\n\ndata: d\r\ndata: e\n\r", &l);
    assert_int_equal(l.n, 4);
    expect(&l, 0, "message", "a");
    expect(&l, 1, "message", "b");
    expect(&l, 2, "message", "c");
    expect(&l, 3, "message", "d\ne");
    ev_free(&l);
    /* CRLF split between inputs: still one line end, not a blank line */
    const char *s = "data: x\r\ndata: y\r\n\r\n";
    size_t cut[] = {8, 1, 100};
    parse_pieces(s, strlen(s), cut, 3, 1024, 1024, false, &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", "x\ny");
    ev_free(&l);
}

static void test_bom(void **state) {
    (void)state;
    evlist l;
    parse_whole("\xEF\xBB\xBF" "data: a\n\n", &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", "a");
    ev_free(&l);
    /* only at the very start: later it is part of a field name, so the line is ignored */
    parse_whole("data: a\n\n\xEF\xBB\xBF" "data: b\n\n", &l);
    assert_int_equal(l.n, 1);
    ev_free(&l);
    /* a BOM split over inputs is skipped all the same */
    const char *s = "\xEF\xBB\xBF" "data: z\n\n";
    size_t cut[] = {1};
    parse_pieces(s, strlen(s), cut, 1, 1024, 1024, false, &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", "z");
    ev_free(&l);
}

static void test_openai_stream(void **state) {
    (void)state;
    const char *s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" hi\"},\"token_ids\":[5]}]}\n\n"
                    ": ping\n\n"
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n"
                    "data: [DONE]\n\n";
    for (size_t piece = 1; piece <= strlen(s); piece++) {
        evlist l;
        size_t cut[] = {piece};
        parse_pieces(s, strlen(s), cut, 1, 4096, 4096, false, &l);
        assert_int_equal(l.n, 3);
        expect(&l, 0, "message", "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" hi\"},\"token_ids\":[5]}]}");
        expect(&l, 2, "message", "[DONE]");
        ev_free(&l);
    }
}

static void test_end_of_input(void **state) {
    (void)state;
    evlist l;
    const char *s = "data: a\n\ndata: last";
    parse_pieces(s, strlen(s), NULL, 0, 1024, 1024, false, &l);
    assert_int_equal(l.n, 1);
    ev_free(&l);
    parse_pieces(s, strlen(s), NULL, 0, 1024, 1024, true, &l);
    assert_int_equal(l.n, 2);
    expect(&l, 1, "message", "last");
    ev_free(&l);
    s = "data: b\n";
    parse_pieces(s, strlen(s), NULL, 0, 1024, 1024, true, &l);
    assert_int_equal(l.n, 1);
    expect(&l, 0, "message", "b");
    ev_free(&l);
    s = "event: x\n: c\n";
    parse_pieces(s, strlen(s), NULL, 0, 1024, 1024, true, &l);
    assert_int_equal(l.n, 0);
    ev_free(&l);
}

static void test_caps(void **state) {
    (void)state;
    evlist l;
    /* a line of exactly max_line bytes passes, one more fails, in one piece or many */
    char line[64];
    memset(line, 'x', sizeof line);
    memcpy(line, "data: ", 6);
    char in[200];
    size_t n = 0;
    memcpy(in, line, 32);
    n = 32;
    memcpy(in + n, "\n\n", 2);
    n += 2;
    for (size_t piece = 0; piece <= 5; piece++) {
        size_t cut[] = {piece};
        parse_pieces(in, n, cut, piece ? 1 : 0, 32, 1024, false, &l);
        assert_int_equal(l.st, BT_OK);
        assert_int_equal(l.n, 1);
        ev_free(&l);
        parse_pieces(in, n, cut, piece ? 1 : 0, 31, 1024, false, &l);
        assert_int_equal(l.st, BT_ERR_TOO_LARGE);
        assert_int_equal(l.n, 0);
        ev_free(&l);
    }
    /* an incomplete line over the cap fails before its end arrives */
    memset(in, 'y', 100);
    parse_pieces(in, 100, NULL, 0, 50, 1024, false, &l);
    assert_int_equal(l.st, BT_ERR_TOO_LARGE);
    ev_free(&l);
    /* data: 3 lines of 4 bytes = 14 bytes of data with the joins */
    const char *d = "data: aaaa\ndata: bbbb\ndata: cccc\n\n";
    parse_pieces(d, strlen(d), NULL, 0, 1024, 14, false, &l);
    assert_int_equal(l.n, 1);
    ev_free(&l);
    parse_pieces(d, strlen(d), NULL, 0, 1024, 13, false, &l);
    assert_int_equal(l.st, BT_ERR_TOO_LARGE);
    ev_free(&l);
    /* event name */
    char ev[200];
    snprintf(ev, sizeof ev, "event: %0*d\ndata: 1\n\n", BT_SSE_EVENT_NAME_MAX + 1, 0);
    parse_whole(ev, &l);
    assert_int_equal(l.st, BT_ERR_TOO_LARGE);
    ev_free(&l);
    /* a failed parser stays failed */
    bt_sse_parser p;
    bt_sse_init(&p, 8, 8);
    size_t used;
    bt_sse_event e;
    const char *err = NULL;
    assert_int_equal(bt_sse_next(&p, "data: 123456789\n", 16, &used, &e, &err), BT_ERR_TOO_LARGE);
    assert_non_null(err);
    assert_int_equal(bt_sse_next(&p, "data: 1\n\n", 9, &used, &e, &err), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_sse_end(&p, &e, &err), BT_ERR_TOO_LARGE);
    bt_sse_free(&p);
}

/* Random streams built from SSE-looking pieces and raw noise; each must parse identically whole,
 * byte by byte and in random pieces, and match the reference. */
static void test_differential(void **state) {
    (void)state;
    static const char *atoms[] = {"data", "data:", "data: ", "event", "event:", "event: ", ":", " ", "id: 1",
                                  "retry: 9", "x", "{\"a\":1}", "[DONE]", "\n", "\r", "\r\n", "\n\n", "\xEF\xBB\xBF",
                                  "\xff", "\0", "delta", "message", "dat", "a:",
                                  "data: x\n", "data: yz\n\n", "\n\n", "data:{}\r\n\r\n"};
    uint64_t seed = 0x5eedULL;
    int iters = 4000, events = 0, capped = 0;
    char in[600];
    for (int it = 0; it < iters; it++) {
        size_t n = 0;
        int parts = 1 + (int)((seed = bt_mix64(seed)) % 40);
        for (int k = 0; k < parts; k++) {
            seed = bt_mix64(seed);
            const char *a = atoms[seed % (sizeof atoms / sizeof atoms[0])];
            size_t al = a[0] ? strlen(a) : 1;
            if (n + al > sizeof in) break;
            memcpy(in + n, a, al);
            n += al;
        }
        /* caps small enough to be hit often, large enough to let most streams through */
        size_t max_line = 4 + (size_t)((seed >> 20) % 120), max_data = 2 + (size_t)((seed >> 30) % 120);
        bool end = (seed >> 40) & 1;
        evlist ref, whole, bytes, random;
        reference(in, n, max_line, max_data, end, &ref);
        parse_pieces(in, n, NULL, 0, max_line, max_data, end, &whole);
        size_t one[] = {1};
        parse_pieces(in, n, one, 1, max_line, max_data, end, &bytes);
        size_t cuts[5];
        for (int c = 0; c < 5; c++) cuts[c] = 1 + (size_t)((seed = bt_mix64(seed)) % 17);
        parse_pieces(in, n, cuts, 5, max_line, max_data, end, &random);
        ev_equal(&ref, &whole);
        ev_equal(&ref, &bytes);
        ev_equal(&ref, &random);
        events += ref.n;
        capped += ref.st == BT_ERR_TOO_LARGE;
        ev_free(&ref);
        ev_free(&whole);
        ev_free(&bytes);
        ev_free(&random);
    }
    fprintf(stderr, "differential: %d streams, %d events, %d ended by a cap\n", iters, events, capped);
    assert_true(events > iters / 2); /* the generator really makes events */
    assert_true(capped > iters / 20); /* ... and really hits the caps */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic),         cmocka_unit_test(test_comments_fields_names),
        cmocka_unit_test(test_line_ends),     cmocka_unit_test(test_bom),
        cmocka_unit_test(test_openai_stream), cmocka_unit_test(test_end_of_input),
        cmocka_unit_test(test_caps),          cmocka_unit_test(test_differential),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
