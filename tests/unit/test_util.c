/* test_util.c — unit tests of the JSON string escaper of src/common/util.c
 * (bt_buf_append_json_str), which every streamed token's text goes through in the frontend.
 *
 * Covers: the exact escape of each class of byte (quote, backslash, \n \r \t, other control
 * characters, DEL, valid UTF-8 of 2-4 bytes, invalid UTF-8 replaced with U+FFFD: lone
 * continuation bytes, truncated sequences, overlong forms, surrogates, code points above
 * U+10FFFF); agreement, byte for byte, with a plain byte-at-a-time reference escaper on many
 * random strings, at every length and offset around the 8-byte fast path and across the 4 KiB
 * pieces the output is reserved in (a UTF-8 sequence straddling a piece boundary included); the
 * checked slow path near the buffer's cap giving the same bytes; and the cap itself (an append
 * that does not fit fails with BT_ERR_TOO_LARGE). The self-check feeds the comparison a wrong
 * reference and expects it to notice.
 *
 * Also the random values (bt_random64, bt_random_bytes, bt_uuid4), drawn through a per-thread pool of kernel random
 * bytes: UUIDs well formed and never repeated over more draws than several pool refills, two
 * threads never handed the same bytes, and a forked child never handed the bytes its parent hands
 * out next (the pool is emptied in the child).
 *
 * bt_buf_append_i64 writes exactly what printf's "%" PRId64 writes, at the edges (0, ±1, powers
 * of ten and their neighbours, INT64_MIN/MAX) and for many random values; bt_copy_str leaves
 * exactly what snprintf(dst, cap, "%s", src) leaves (and returns the same length) for every source
 * length around the capacity.
 *
 * And the object pool of src/common/pool.c: an object given back is the one handed out next, and
 * handed out zeroed whatever was written into it; no more than `cap` objects are kept (the rest
 * are freed at once); drain frees what is kept and the pool goes on working; under
 * AddressSanitizer a kept object is poisoned until it is handed out again.
 *
 * bt_open_regular opens a regular file (back in blocking mode) and refuses, at once and with what
 * it is, a FIFO without a writer (which a plain open would wait on for ever), /dev/zero, a
 * directory and a missing path; bt_load_secret reads a secret file through it (the blanks and line
 * ends that end it removed, and not counted against its 4096 bytes) and refuses the same, an empty
 * file, one of blanks and newlines only, and one whose secret is over 4096 bytes. bt_read_text_file
 * reads a file of at most `max` bytes whole (an empty one too), and one of `max` bytes of text
 * followed by blanks and line ends (handed over with them), and refuses, with a reason that quotes
 * nothing of the content, one of max + 1 bytes of text (blanks and line ends after them or not),
 * one whose text is followed by over BT_TEXT_TAIL_MAX bytes of them, one holding a NUL (in its
 * trailing blank lines too), a directory, a FIFO (at once) and a device. bt_text_trim_end drops
 * exactly the spaces, tabs, CRs and LFs that end a string; bt_bearer_token_ok takes visible ASCII
 * only, and not the empty key. */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/pool.h"
#include "common/log.h"
#include "common/util.h"

/* ---- the reference: one byte at a time, as JSON (RFC 8259) and the replacement rule say ---- */

static size_t ref_utf8_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

/* Appends the escaped form of s[0..n) to out (sized by the caller: 6 n + 1). */
static size_t ref_escape(const char *s, size_t n, char *out, int flavour) {
    const unsigned char *p = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\') {
            out[o++] = '\\', out[o++] = (char)c, i++;
        } else if (c == '\n') {
            out[o++] = '\\', out[o++] = 'n', i++;
        } else if (c == '\r') {
            out[o++] = '\\', out[o++] = 'r', i++;
        } else if (c == '\t') {
            out[o++] = '\\', out[o++] = 't', i++;
        } else if (c < 0x20) {
            o += (size_t)snprintf(out + o, 7, "\\u%04x", c);
            i++;
        } else if (c < 0x80) {
            out[o++] = (char)c, i++;
        } else {
            size_t l = ref_utf8_len(p + i, n - i);
            if (l == 0) {
                memcpy(out + o, "\xEF\xBF\xBD", 3), o += 3, i++;
            } else {
                memcpy(out + o, p + i, l), o += l, i += l;
            }
        }
        if (flavour == 1 && c == 'x') out[o - 1] = 'y'; /* a deliberately wrong reference */
    }
    out[o] = '\0';
    return o;
}

static uint64_t rng = 0x1234567;
static uint32_t rnd(void) { return (uint32_t)((rng = bt_mix64(rng)) >> 32); }

/* A random string drawn mostly from plain text with the odd special byte, so that runs of every
 * length occur between escapes, plus valid and broken UTF-8. */
static void random_text(char *s, size_t n) {
    static const char *const pieces[] = {"\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xC3", "\xE2\x82", "\x80",
                                         "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xC0\xAF", "\xFF"};
    size_t i = 0;
    while (i < n) {
        uint32_t r = rnd() % 100;
        if (r < 80) {
            s[i++] = (char)(' ' + rnd() % 95);
        } else if (r < 90) {
            static const char sp[] = "\"\\\n\r\t\x01\x1f\x7f";
            s[i++] = sp[rnd() % (sizeof sp - 1)];
        } else {
            const char *p = pieces[rnd() % (sizeof pieces / sizeof *pieces)];
            size_t l = strlen(p);
            if (i + l > n) l = n - i;
            memcpy(s + i, p, l);
            i += l;
        }
    }
}

static void expect_escape(const char *in, size_t n, const char *want) {
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    assert_int_equal(bt_buf_append_json_str(&b, in, n), BT_OK);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    assert_int_equal(b.data[b.len], '\0');
    bt_buf_free(&b);
}

static void test_each_class(void **state) {
    (void)state;
    expect_escape("plain text", 10, "plain text");
    expect_escape("a\"b\\c", 5, "a\\\"b\\\\c");
    expect_escape("\n\r\t", 3, "\\n\\r\\t");
    expect_escape("\x01\x1f\x7f", 3, "\\u0001\\u001f\x7f");
    expect_escape("\0x", 2, "\\u0000x");
    expect_escape("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14, "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
    expect_escape("\x80", 1, "\xEF\xBF\xBD");
    expect_escape("\xC3", 1, "\xEF\xBF\xBD");                           /* truncated */
    expect_escape("\xE2\x82x", 3, "\xEF\xBF\xBD\xEF\xBF\xBDx");         /* truncated, then text */
    expect_escape("\xC0\xAF", 2, "\xEF\xBF\xBD\xEF\xBF\xBD");           /* overlong */
    expect_escape("\xED\xA0\x80", 3, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"); /* surrogate */
    expect_escape("\xF4\x90\x80\x80", 4, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"); /* > U+10FFFF */
    expect_escape("", 0, "");
    /* every special byte at every offset of an 8-byte word, and just past one */
    for (int special = 0; special < 256; special++) {
        for (size_t at = 0; at < 17; at++) {
            char in[17], want[17 * 6 + 1];
            memset(in, 'a', sizeof in);
            in[at] = (char)special;
            ref_escape(in, sizeof in, want, 0);
            expect_escape(in, sizeof in, want);
        }
    }
}

/* The comparison used by the tests below; returns 0 when equal. */
static int compare_with_ref(const char *in, size_t n, size_t cap, size_t prefill, int flavour) {
    char *want = malloc(6 * n + 1);
    size_t wl = ref_escape(in, n, want, flavour);
    bt_buf b;
    bt_buf_init(&b, cap);
    for (size_t i = 0; i < prefill; i++) bt_buf_append(&b, "-", 1);
    bt_status st = bt_buf_append_json_str(&b, in, n);
    int bad = st != BT_OK || b.len != prefill + wl || memcmp(b.data + prefill, want, wl) != 0 || b.data[b.len] != '\0';
    bt_buf_free(&b);
    free(want);
    return bad;
}

static void test_random_against_reference(void **state) {
    (void)state;
    char *s = malloc(20000);
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = iter < 200 ? (size_t)iter : rnd() % (iter % 10 == 0 ? 20000 : 300);
        random_text(s, n);
        /* and at every alignment of the output, so the 8-byte copies land everywhere */
        if (compare_with_ref(s, n, 1 << 26, rnd() % 9, 0)) fail_msg("differs at iteration %d (n=%zu)", iter, n);
    }
    free(s);
}

/* A 4-byte UTF-8 sequence starting 0..3 bytes before a 4 KiB piece boundary, and a special byte
 * right at it. */
static void test_piece_boundaries(void **state) {
    (void)state;
    size_t n = 3 * 4096 + 50;
    char *s = malloc(n);
    for (size_t back = 0; back <= 8; back++) {
        for (size_t piece = 1; piece <= 2; piece++) {
            memset(s, 'w', n);
            size_t at = piece * 4096 - back;
            memcpy(s + at, "\xF0\x9F\x98\x80", 4);
            assert_int_equal(compare_with_ref(s, n, 1 << 26, 0, 0), 0);
            memset(s, 'w', n);
            s[at] = '"';
            assert_int_equal(compare_with_ref(s, n, 1 << 26, 0, 0), 0);
        }
    }
    free(s);
}

/* Near the cap the worst-case reservation fails; the checked path must give the same bytes,
 * and fail cleanly when the output really does not fit. */
static void test_near_cap(void **state) {
    (void)state;
    char s[600];
    for (int iter = 0; iter < 500; iter++) {
        size_t n = rnd() % sizeof s;
        random_text(s, n);
        char want[6 * sizeof s + 1];
        size_t wl = ref_escape(s, n, want, 0);
        /* a cap that leaves exactly room for the output: fits, via the slow path when wl < 6 n */
        assert_int_equal(compare_with_ref(s, n, wl + 3, 3, 0), 0);
        if (wl == 0) continue;
        bt_buf b;
        bt_buf_init(&b, wl - 1);
        assert_int_equal(bt_buf_append_json_str(&b, s, n), BT_ERR_TOO_LARGE);
        assert_int_equal(b.len, 0); /* all or nothing: no half-escaped string is left behind */
        assert_int_equal(bt_buf_status(&b), BT_ERR_TOO_LARGE);
        bt_buf_free(&b);
    }
}

/* Sticky errors: the first failed append is kept, every later one fails at once (even one that
 * would fit), reset clears it, truncate takes a message back to a mark. */
static void test_sticky_errors(void **state) {
    (void)state;
    bt_buf b;
    bt_buf_init(&b, 10);
    assert_int_equal(bt_buf_append_str(&b, "head:"), BT_OK);
    size_t mark = b.len;
    assert_int_equal(bt_buf_append_str(&b, "0123456789"), BT_ERR_TOO_LARGE);
    assert_int_equal(b.len, 5); /* the failed append added nothing */
    assert_int_equal(bt_buf_append_str(&b, "x"), BT_ERR_TOO_LARGE); /* would fit, still refused */
    assert_int_equal(bt_buf_appendf(&b, "%d", 1), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_buf_append_json_str(&b, "y", 1), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_buf_reserve(&b, 0), BT_ERR_TOO_LARGE);
    assert_int_equal(b.len, 5);
    assert_int_equal(bt_buf_status(&b), BT_ERR_TOO_LARGE);
    bt_buf_truncate(&b, mark); /* the message is dropped, what came before stays */
    assert_int_equal(bt_buf_status(&b), BT_OK);
    assert_string_equal(b.data, "head:");
    assert_int_equal(bt_buf_append_str(&b, "ok"), BT_OK);
    assert_string_equal(b.data, "head:ok");
    assert_int_equal(bt_buf_append_str(&b, "too long!"), BT_ERR_TOO_LARGE);
    bt_buf_reset(&b);
    assert_int_equal(bt_buf_status(&b), BT_OK);
    assert_int_equal(bt_buf_append_str(&b, "again"), BT_OK);
    assert_string_equal(b.data, "again");
    bt_buf_free(&b);
    assert_int_equal(bt_buf_status(&b), BT_OK);
}

/* Self-check: the comparison notices a wrong reference. */
static void test_self_check(void **state) {
    (void)state;
    const char *s = "text with an x in it";
    assert_int_equal(compare_with_ref(s, strlen(s), 1 << 20, 0, 0), 0);
    assert_int_not_equal(compare_with_ref(s, strlen(s), 1 << 20, 0, 1), 0);
}

/* bt_prom_escape: the three escapes of the Prometheus text format, and a cut that never splits one. */
static void test_prom_escape(void **state) {
    (void)state;
    char out[64];
    assert_string_equal(bt_prom_escape("plain-model/1", out, sizeof out), "plain-model/1");
    assert_string_equal(bt_prom_escape("a\"b\\c\nd", out, sizeof out), "a\\\"b\\\\c\\nd");
    assert_string_equal(bt_prom_escape("", out, sizeof out), "");
    /* room for 3 bytes + NUL: "ab" fits, the escaped quote (2 bytes) would not: cut before it */
    assert_string_equal(bt_prom_escape("ab\"c", out, 4), "ab");
    assert_string_equal(bt_prom_escape("abc", out, 1), "");
    /* 2 * strlen + 1 always suffices */
    const char *worst = "\"\"\"\\\n";
    char exact[2 * 5 + 1];
    assert_string_equal(bt_prom_escape(worst, exact, sizeof exact), "\\\"\\\"\\\"\\\\\\n");
}

/* UUIDs: version 4 / variant 1 format; 4,000 of them (more than 200 pool refills) all distinct. */
static int cmp_str37(const void *a, const void *b) { return memcmp(a, b, 37); }

static void test_uuid4(void **state) {
    (void)state;
    enum { N = 4000 };
    char(*ids)[37] = malloc(sizeof(char[37]) * N);
    assert_non_null(ids);
    for (int i = 0; i < N; i++) {
        bt_uuid4(ids[i]);
        assert_int_equal(strlen(ids[i]), 36);
        for (int k = 0; k < 36; k++) {
            if (k == 8 || k == 13 || k == 18 || k == 23) assert_int_equal(ids[i][k], '-');
            else assert_non_null(strchr("0123456789abcdef", ids[i][k]));
        }
        assert_int_equal(ids[i][14], '4');
        assert_non_null(strchr("89ab", ids[i][19]));
    }
    qsort(ids, N, 37, cmp_str37);
    for (int i = 1; i < N; i++) assert_int_not_equal(memcmp(ids[i - 1], ids[i], 37), 0);
    free(ids);
}

/* bt_random_bytes (16-byte stream ids): over more draws than several pool refills, none repeats
 * and none is all zeros (each byte is zeroed in the pool once handed out: a reuse would show). */
static int cmp16(const void *a, const void *b) { return memcmp(a, b, 16); }
static void test_random_bytes(void **state) {
    (void)state;
    enum { N = 2000 };
    static uint8_t v[N][16];
    static const uint8_t zero[16];
    for (int i = 0; i < N; i++) {
        assert_true(bt_random_bytes(v[i], sizeof v[i]));
        assert_int_not_equal(memcmp(v[i], zero, 16), 0);
    }
    qsort(v, N, 16, cmp16);
    for (int i = 1; i < N; i++) assert_int_not_equal(memcmp(v[i - 1], v[i], 16), 0);
}

/* Two threads draw from their own pools: none of their values coincide. */
enum { TDRAWS = 512 };
static void *draw_many(void *out) {
    uint64_t *v = out;
    for (int i = 0; i < TDRAWS; i++) v[i] = bt_random64();
    return NULL;
}

static void test_random_threads(void **state) {
    (void)state;
    static uint64_t a[TDRAWS], b[TDRAWS];
    pthread_t t1, t2;
    assert_int_equal(pthread_create(&t1, NULL, draw_many, a), 0);
    assert_int_equal(pthread_create(&t2, NULL, draw_many, b), 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    for (int i = 0; i < TDRAWS; i++)
        for (int k = 0; k < TDRAWS; k++) {
            assert_int_not_equal(a[i], b[k]);
            if (k != i) assert_int_not_equal(a[i], a[k]);
        }
}

/* A forked child does not repeat its parent's next values: the pool it inherited is emptied.
 * The parent fills its pool first, so without the reset both would draw the same bytes. */
static void test_random_fork(void **state) {
    (void)state;
    (void)bt_random64(); /* the pool is now full, less 8 bytes */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uint64_t v[4];
        for (int i = 0; i < 4; i++) v[i] = bt_random64();
        _exit(write(fds[1], v, sizeof v) == (ssize_t)sizeof v ? 0 : 1);
    }
    uint64_t mine[4], theirs[4];
    for (int i = 0; i < 4; i++) mine[i] = bt_random64();
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    assert_int_equal(read(fds[0], theirs, sizeof theirs), (ssize_t)sizeof theirs);
    close(fds[0]);
    close(fds[1]);
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) assert_int_not_equal(mine[i], theirs[k]);
}

static void check_i64(int64_t v) {
    char want[32];
    snprintf(want, sizeof want, "%" PRId64, v);
    bt_buf b;
    bt_buf_init(&b, 64);
    bt_buf_append_str(&b, "x");
    assert_int_equal(bt_buf_append_i64(&b, v), BT_OK);
    assert_int_equal(b.len, 1 + strlen(want));
    assert_memory_equal(b.data + 1, want, strlen(want));
    bt_buf_free(&b);
}

static void test_append_i64(void **state) {
    (void)state;
    check_i64(0);
    check_i64(1);
    check_i64(-1);
    check_i64(INT64_MAX);
    check_i64(INT64_MIN);
    check_i64(INT64_MIN + 1);
    int64_t p = 1; /* 10^0 .. 10^18 */
    for (int k = 0; k < 19; k++) {
        check_i64(p);
        check_i64(p - 1);
        check_i64(p + 1);
        check_i64(-p);
        check_i64(-p + 1);
        if (k < 18) p *= 10;
    }
    for (int i = 0; i < 20000; i++) {
        int64_t v = (int64_t)bt_random64();
        check_i64(v);
        check_i64(v >> (i % 63));
    }
    bt_buf small; /* over the buffer's cap: the error, as for any append */
    bt_buf_init(&small, 3);
    assert_int_not_equal(bt_buf_append_i64(&small, 12345), BT_OK);
    bt_buf_free(&small);
}

/* bt_log_limit_take: `burst` lines a second, the next allowed one told how many were held back */
static void test_log_limit(void **state) {
    (void)state;
    bt_log_limit l = {0};
    unsigned unsaid = 99;
    assert_true(bt_log_limit_take(&l, 5000, 2, &unsaid));
    assert_int_equal(unsaid, 0);
    assert_true(bt_log_limit_take(&l, 5100, 2, &unsaid));
    assert_false(bt_log_limit_take(&l, 5200, 2, &unsaid));
    assert_false(bt_log_limit_take(&l, 5999, 2, &unsaid));
    assert_true(bt_log_limit_take(&l, 6000, 2, &unsaid)); /* a new second */
    assert_int_equal(unsaid, 2);
    assert_true(bt_log_limit_take(&l, 6001, 2, &unsaid));
    assert_int_equal(unsaid, 0);
    bt_log_limit z = {0};
    assert_true(bt_log_limit_take(&z, 10, 1, &unsaid)); /* a clock that starts near 0 */
    assert_false(bt_log_limit_take(&z, 20, 1, &unsaid));
}

static void test_copy_str(void **state) {
    (void)state;
    char src[40];
    for (size_t len = 0; len < sizeof src; len++) {
        memset(src, 'a', len);
        for (size_t k = 0; k < len; k++) src[k] = (char)('a' + k % 26);
        src[len] = '\0';
        for (size_t cap = 1; cap <= 24; cap++) {
            char want[32], got[32];
            memset(want, 'x', sizeof want);
            memset(got, 'x', sizeof got);
            int n = snprintf(want, cap, "%s", src);
            assert_int_equal(bt_copy_str(got, cap, src), (size_t)n);
            assert_memory_equal(got, want, sizeof want); /* the bytes past the terminator untouched too */
        }
    }
}

typedef struct {
    char bytes[1100]; /* over glibc's small-chunk sizes, like the frontend's connections */
} pooled;

static void test_pool(void **state) {
    (void)state;
    bt_pool p;
    bt_pool_init(&p, sizeof(pooled), 2);
    pooled *a = bt_pool_get(&p), *b = bt_pool_get(&p), *c = bt_pool_get(&p);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_int_equal(p.n, 0);
    memset(a, 0xa5, sizeof *a);
    memset(b, 0x5a, sizeof *b);
    bt_pool_put(&p, a);
    bt_pool_put(&p, b);
    bt_pool_put(&p, c); /* over the cap of 2: freed, not kept */
    assert_int_equal(p.n, 2);
    bt_pool_put(&p, NULL);
    assert_int_equal(p.n, 2);
    pooled *d = bt_pool_get(&p); /* the last kept first */
    assert_ptr_equal(d, b);
    pooled *e = bt_pool_get(&p);
    assert_ptr_equal(e, a);
    assert_int_equal(p.n, 0);
    static const pooled zero;
    assert_memory_equal(d, &zero, sizeof zero); /* zeroed, like calloc, whatever was written */
    assert_memory_equal(e, &zero, sizeof zero);
    bt_pool_put(&p, d);
    bt_pool_put(&p, e);
    assert_int_equal(bt_pool_drain(&p), 2);
    assert_int_equal(p.n, 0);
    assert_int_equal(bt_pool_drain(&p), 0);
    pooled *f = bt_pool_get(&p); /* usable after a drain */
    assert_non_null(f);
    assert_memory_equal(f, &zero, sizeof zero);
    bt_pool_put(&p, f);
    bt_pool_destroy(&p);
    assert_int_equal(p.n, 0);
    assert_null(p.head);
    bt_pool_destroy(NULL);
    bt_pool tiny; /* objects smaller than the link are rounded up to hold it */
    bt_pool_init(&tiny, 1, 4);
    char *t1 = bt_pool_get(&tiny), *t2 = bt_pool_get(&tiny);
    bt_pool_put(&tiny, t1);
    bt_pool_put(&tiny, t2);
    assert_ptr_equal(bt_pool_get(&tiny), t2);
    assert_ptr_equal(bt_pool_get(&tiny), t1);
    free(t1);
    free(t2);
    bt_pool_destroy(&tiny);
}

/* bt_pool_get_head zeroes the object's first bytes only: the rest is what its last user left
 * (zeros for a new one), and a count past the size zeroes the whole object. */
static void test_pool_get_head(void **state) {
    (void)state;
    bt_pool p;
    bt_pool_init(&p, sizeof(pooled), 2);
    pooled *a = bt_pool_get_head(&p, 16); /* none kept: a new, zeroed object */
    assert_non_null(a);
    static const pooled zero;
    assert_memory_equal(a, &zero, sizeof zero);
    memset(a, 0xa5, sizeof *a);
    bt_pool_put(&p, a);
    pooled *b = bt_pool_get_head(&p, 16);
    assert_ptr_equal(b, a);
    for (size_t i = 0; i < sizeof b->bytes; i++) assert_int_equal((unsigned char)b->bytes[i], i < 16 ? 0 : 0xa5);
    memset(b, 0x5a, sizeof *b);
    bt_pool_put(&p, b);
    pooled *c = bt_pool_get_head(&p, sizeof *c + 100); /* more than the size: all of it, no further */
    assert_ptr_equal(c, a);
    assert_memory_equal(c, &zero, sizeof zero);
    memset(c, 0x5a, sizeof *c);
    bt_pool_put(&p, c);
    pooled *d = bt_pool_get(&p); /* bt_pool_get still zeroes the whole object */
    assert_memory_equal(d, &zero, sizeof zero);
    bt_pool_put(&p, d);
    bt_pool_destroy(&p);
}

/* Under AddressSanitizer a kept object is poisoned, whole, from its put to its next get: a use of
 * a connection or request after it went back to its pool is reported as a use after free would
 * be (the pool keeps the memory allocated, so the sanitizer would otherwise see nothing). */
#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#ifdef TEST_ASAN
#include <sanitizer/asan_interface.h>
#endif

static void test_pool_poisoned(void **state) {
    (void)state;
#ifdef TEST_ASAN
    bt_pool p;
    bt_pool_init(&p, sizeof(pooled), 4);
    pooled *a = bt_pool_get(&p), *b = bt_pool_get(&p);
    assert_non_null(a);
    assert_non_null(b);
    assert_null(__asan_region_is_poisoned(a, sizeof *a)); /* handed out: all usable */
    bt_pool_put(&p, a);
    /* kept: every byte poisoned, the link in its first bytes included */
    assert_ptr_equal(__asan_region_is_poisoned(a, sizeof *a), a);
    assert_true(__asan_address_is_poisoned(a->bytes + sizeof a->bytes - 1));
    bt_pool_put(&p, b);
    assert_ptr_equal(__asan_region_is_poisoned(b, sizeof *b), b);
    assert_ptr_equal(__asan_region_is_poisoned(a, sizeof *a), a); /* the pool read a's link, left it poisoned */
    pooled *c = bt_pool_get(&p);
    assert_ptr_equal(c, b);
    assert_null(__asan_region_is_poisoned(c, sizeof *c)); /* handed out again: usable, zeroed */
    assert_ptr_equal(__asan_region_is_poisoned(a, sizeof *a), a); /* still kept */
    bt_pool_put(&p, c);
    assert_int_equal(bt_pool_drain(&p), 2); /* frees poisoned objects without a report */
    bt_pool_destroy(&p);
#else
    skip(); /* nothing to check without the sanitizer */
#endif
}

/* bt_buf_append's inline path (room already there) and its grow path give the same outcome at
 * every edge: exactly the allocation's last byte (the terminator's room), exactly the cap, one
 * byte over the cap (refused, sticky, nothing added), appends after a reset, and an empty append. */
static void test_buf_append_edges(void **state) {
    (void)state;
    for (size_t cap = 1; cap < 600; cap += 7) {
        bt_buf b;
        bt_buf_init(&b, cap);
        char ref[700];
        size_t rl = 0;
        uint64_t x = cap * 2654435761u;
        for (int i = 0; i < 200; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            size_t n = (size_t)(x >> 33) % 40;
            char piece[40];
            for (size_t k = 0; k < n; k++) piece[k] = (char)('a' + (k + (size_t)i) % 26);
            bt_status st = bt_buf_append(&b, piece, n);
            if (rl + n <= cap) {
                assert_int_equal(st, BT_OK);
                memcpy(ref + rl, piece, n);
                rl += n;
            } else {
                assert_int_equal(st, BT_ERR_TOO_LARGE);
                assert_int_equal(bt_buf_append(&b, "", 0), BT_ERR_TOO_LARGE); /* sticky */
                bt_buf_reset(&b);
                rl = 0;
            }
            assert_int_equal(b.len, rl);
            if (b.data) {
                assert_memory_equal(b.data, ref, rl);
                if (st == BT_OK) assert_int_equal(b.data[rl], '\0'); /* (a reset leaves the old bytes) */
                assert_true(b.len < b.alloc);
            }
        }
        bt_buf_free(&b);
    }
}

/* ---- bt_open_regular and bt_load_secret ---- */

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void test_open_regular(void **state) {
    (void)state;
    char dir[] = "/tmp/baton-test-util-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char file[128], fifo[128], missing[128], empty[128];
    snprintf(file, sizeof file, "%s/secret", dir);
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    snprintf(missing, sizeof missing, "%s/missing", dir);
    snprintf(empty, sizeof empty, "%s/empty", dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fputs("s3cret\n\n", f);
    fclose(f);
    f = fopen(empty, "w");
    assert_non_null(f);
    fclose(f);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    char why[128];
    int fd = bt_open_regular(file, why, sizeof why);
    assert_true(fd >= 0);
    assert_int_equal(fcntl(fd, F_GETFL) & O_NONBLOCK, 0); /* handed back blocking */
    assert_true(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    close(fd);
    const struct {
        const char *path, *why;
    } refused[] = {{fifo, "a FIFO, not a regular file"},
                   {"/dev/zero", "a character device, not a regular file"},
                   {dir, "Is a directory"},
                   {missing, "No such file or directory"}};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        why[0] = '\0';
        assert_int_equal(bt_open_regular(refused[i].path, why, sizeof why), -1);
        assert_string_equal(why, refused[i].why);
        assert_false(bt_check_regular(refused[i].path, why, sizeof why));
    }
    assert_true(bt_check_regular(file, why, sizeof why));
    char *secret = NULL, err[256];
    assert_int_equal(bt_load_secret(file, "ignored", &secret, err, sizeof err), BT_OK);
    assert_string_equal(secret, "s3cret");
    free(secret);
    assert_int_equal(bt_load_secret(NULL, "from-env", &secret, err, sizeof err), BT_OK);
    assert_string_equal(secret, "from-env");
    free(secret);
    assert_int_not_equal(bt_load_secret(fifo, NULL, &secret, err, sizeof err), BT_OK);
    assert_null(secret);
    assert_non_null(strstr(err, "a FIFO, not a regular file"));
    assert_int_not_equal(bt_load_secret("/dev/zero", NULL, &secret, err, sizeof err), BT_OK);
    assert_non_null(strstr(err, "/dev/zero (DYN_RPC_SECRET_FILE, --rpc-secret-file): a character device"));
    assert_int_not_equal(bt_load_secret(empty, NULL, &secret, err, sizeof err), BT_OK);
    assert_non_null(strstr(err, "is empty"));
    /* the blanks and line ends that end the file are not part of the secret nor counted against its
     * 4096 bytes; what is before them is, and is refused over 4096 */
    static char big[BT_SECRET_FILE_MAX + 64];
    memset(big, 'm', BT_SECRET_FILE_MAX);
    memcpy(big + BT_SECRET_FILE_MAX, "\n\n \t\r\n\n", 7);
    write_file(file, big, BT_SECRET_FILE_MAX + 7);
    assert_int_equal(bt_load_secret(file, NULL, &secret, err, sizeof err), BT_OK);
    assert_int_equal(strlen(secret), BT_SECRET_FILE_MAX);
    assert_int_equal(strspn(secret, "m"), BT_SECRET_FILE_MAX);
    free(secret);
    memset(big, 'm', BT_SECRET_FILE_MAX + 1);
    memcpy(big + BT_SECRET_FILE_MAX + 1, "\n\n", 2);
    write_file(file, big, BT_SECRET_FILE_MAX + 3);
    assert_int_equal(bt_load_secret(file, NULL, &secret, err, sizeof err), BT_ERR_TOO_LARGE);
    assert_null(secret);
    assert_non_null(strstr(err, "is over 4096 bytes"));
    assert_null(strstr(err, "mmmm"));
    write_file(file, "s3cret \t\r\n", 10);
    assert_int_equal(bt_load_secret(file, NULL, &secret, err, sizeof err), BT_OK);
    assert_string_equal(secret, "s3cret");
    free(secret);
    write_file(file, " \r\n\n\t", 5);
    assert_int_equal(bt_load_secret(file, NULL, &secret, err, sizeof err), BT_ERR_INVALID);
    assert_null(secret);
    assert_non_null(strstr(err, "is empty"));
    unlink(file);
    unlink(fifo);
    unlink(empty);
    rmdir(dir);
}

/* ---- bt_read_text_file ---- */

static void test_read_text_file(void **state) {
    (void)state;
    char dir[] = "/tmp/baton-test-text-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char ok[128], full[128], over[128], nul[128], empty[128], fifo[128], full_tail[128], over_tail[128],
        nul_tail[128], tail_max[128], tail_over[128];
    snprintf(full_tail, sizeof full_tail, "%s/full-tail", dir);
    snprintf(over_tail, sizeof over_tail, "%s/over-tail", dir);
    snprintf(nul_tail, sizeof nul_tail, "%s/nul-tail", dir);
    snprintf(tail_max, sizeof tail_max, "%s/tail-max", dir);
    snprintf(tail_over, sizeof tail_over, "%s/tail-over", dir);
    snprintf(ok, sizeof ok, "%s/ok", dir);
    snprintf(full, sizeof full, "%s/full", dir);
    snprintf(over, sizeof over, "%s/over", dir);
    snprintf(nul, sizeof nul, "%s/nul", dir);
    snprintf(empty, sizeof empty, "%s/empty", dir);
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    write_file(ok, "k=1\r\nk2=2\n", 10);
    write_file(full, "0123456789abcdef", 16);  /* exactly max */
    write_file(over, "0123456789abcdefg", 17); /* max + 1 */
    write_file(nul, "sk-\0secret\n", 11);      /* a NUL inside a line */
    write_file(empty, "", 0);
    write_file(full_tail, "0123456789abcdef\r\n\n \t\n", 22);
    write_file(over_tail, "0123456789abcdefg\n\n", 19);
    write_file(nul_tail, "secret\n\n\0\n", 10);
    /* one byte of text, then blanks and line ends up to max + BT_TEXT_TAIL_MAX bytes in all, and one more */
    static char tail[16 + BT_TEXT_TAIL_MAX + 1];
    for (size_t i = 0; i < sizeof tail; i++) tail[i] = " \t\r\n"[i % 4];
    tail[0] = 'k';
    write_file(tail_max, tail, sizeof tail - 1);
    write_file(tail_over, tail, sizeof tail);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    /* a FIFO without a writer that the read waited on would stop the test here, not fail it */
    alarm(20);

    char *out = (char *)1, why[128];
    size_t len = 99;
    assert_int_equal(bt_read_text_file(ok, 16, &out, &len, why, sizeof why), BT_OK);
    assert_int_equal(len, 10);
    assert_memory_equal(out, "k=1\r\nk2=2\n", 11); /* with its terminating NUL */
    free(out);
    assert_int_equal(bt_read_text_file(full, 16, &out, &len, why, sizeof why), BT_OK);
    assert_int_equal(len, 16);
    assert_string_equal(out, "0123456789abcdef");
    free(out);
    assert_int_equal(bt_read_text_file(empty, 16, &out, &len, why, sizeof why), BT_OK);
    assert_int_equal(len, 0);
    assert_string_equal(out, "");
    free(out);
    /* max bytes of text, then blanks and line ends: not counted, handed over with the rest */
    assert_int_equal(bt_read_text_file(full_tail, 16, &out, &len, why, sizeof why), BT_OK);
    assert_int_equal(len, 22);
    assert_string_equal(out, "0123456789abcdef\r\n\n \t\n");
    free(out);
    /* the most blanks and line ends after the text that are taken */
    assert_int_equal(bt_read_text_file(tail_max, 16, &out, &len, why, sizeof why), BT_OK);
    assert_int_equal(len, 16 + BT_TEXT_TAIL_MAX);
    assert_int_equal(bt_text_trim_end(out, len), 1);
    free(out);

    const struct {
        const char *path;
        bt_status st;
        const char *why;
    } refused[] = {{over, BT_ERR_TOO_LARGE, "is over 16 bytes"},
                   {over_tail, BT_ERR_TOO_LARGE, "is over 16 bytes"},
                   {tail_over, BT_ERR_TOO_LARGE, "is over 16 bytes, or ends in over 4096 bytes of blanks and line ends"},
                   {nul_tail, BT_ERR_INVALID, "holds a NUL byte"},
                   {nul, BT_ERR_INVALID, "holds a NUL byte"},
                   {dir, BT_ERR_IO, "Is a directory"},
                   {fifo, BT_ERR_IO, "a FIFO, not a regular file"},
                   {"/dev/zero", BT_ERR_IO, "a character device, not a regular file"}};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        out = (char *)1;
        len = 99;
        why[0] = '\0';
        assert_int_equal(bt_read_text_file(refused[i].path, 16, &out, &len, why, sizeof why), refused[i].st);
        assert_null(out);
        assert_int_equal(len, 0);
        assert_string_equal(why, refused[i].why);
        assert_null(strstr(why, "secret")); /* never the content */
    }
    alarm(0);
    unlink(ok);
    unlink(full);
    unlink(over);
    unlink(nul);
    unlink(empty);
    unlink(fifo);
    unlink(full_tail);
    unlink(over_tail);
    unlink(nul_tail);
    unlink(tail_max);
    unlink(tail_over);
    rmdir(dir);
}

static void test_text_trim_end(void **state) {
    (void)state;
    static const struct {
        const char *s;
        size_t n, want;
    } cases[] = {{"", 0, 0},           {"k", 1, 1},         {"k\n", 2, 1},        {"k\r\n", 3, 1},
                 {"k \t\r\n\n", 6, 1}, {" \t\r\n", 4, 0},    {"a b\n", 4, 3},      {"a\nb\n", 4, 3},
                 {"k\v", 2, 2},        {"k\f\n", 3, 2},      {"k\0\n", 3, 2},      {"\n\nk", 3, 3}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_int_equal(bt_text_trim_end(cases[i].s, cases[i].n), cases[i].want);
}

static void test_bearer_token_ok(void **state) {
    (void)state;
    assert_true(bt_bearer_token_ok("sk-1", 4));
    assert_true(bt_bearer_token_ok("!~", 2)); /* the ends of visible ASCII */
    assert_false(bt_bearer_token_ok("", 0));
    static const char *const bad[] = {" sk", "sk ", "s k", "sk\t", "sk\r\nX: 1", "sk\x7f", "sk\xc3\xa9", "\x01"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) assert_false(bt_bearer_token_ok(bad[i], strlen(bad[i])));
    assert_false(bt_bearer_token_ok("sk\0x", 4)); /* the length is what is checked, not the C string */
}

/* The one comma splitter: every element, blanks around it dropped, empty ones given (a caller
 * refuses them), none after a trailing comma. */
static void list_items(const char *list, char out[][16], int *n) {
    const char *e;
    size_t len;
    *n = 0;
    for (const char *pos = list; bt_list_next(&pos, &e, &len); (*n)++) {
        assert_true(*n < 8 && len < 16);
        memcpy(out[*n], e, len);
        out[*n][len] = '\0';
    }
}

static void test_list_next(void **state) {
    (void)state;
    char it[8][16];
    int n;
    list_items(NULL, it, &n);
    assert_int_equal(n, 0);
    list_items("", it, &n);
    assert_int_equal(n, 0);
    list_items("a", it, &n);
    assert_int_equal(n, 1);
    assert_string_equal(it[0], "a");
    list_items(" a b ,\tc\t,d,", it, &n);
    assert_int_equal(n, 3);
    assert_string_equal(it[0], "a b");
    assert_string_equal(it[1], "c");
    assert_string_equal(it[2], "d");
    list_items("a,, ,b", it, &n);
    assert_int_equal(n, 4);
    assert_string_equal(it[1], "");
    assert_string_equal(it[2], "");
    assert_string_equal(it[3], "b");
    list_items(",", it, &n); /* an empty element, then the trailing comma's end */
    assert_int_equal(n, 1);
    assert_string_equal(it[0], "");
    list_items("a, ", it, &n); /* blanks after the last comma are an element, empty */
    assert_int_equal(n, 2);
    assert_string_equal(it[1], "");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_regular),
        cmocka_unit_test(test_read_text_file),
        cmocka_unit_test(test_text_trim_end),
        cmocka_unit_test(test_list_next),
        cmocka_unit_test(test_bearer_token_ok),
        cmocka_unit_test(test_each_class),
        cmocka_unit_test(test_random_against_reference),
        cmocka_unit_test(test_piece_boundaries),
        cmocka_unit_test(test_near_cap),
        cmocka_unit_test(test_self_check),
        cmocka_unit_test(test_sticky_errors),
        cmocka_unit_test(test_prom_escape),
        cmocka_unit_test(test_uuid4),
        cmocka_unit_test(test_random_bytes),
        cmocka_unit_test(test_random_threads),
        cmocka_unit_test(test_random_fork),
        cmocka_unit_test(test_pool),
        cmocka_unit_test(test_pool_get_head),
        cmocka_unit_test(test_pool_poisoned),
        cmocka_unit_test(test_append_i64),
        cmocka_unit_test(test_copy_str),
        cmocka_unit_test(test_log_limit),
        cmocka_unit_test(test_buf_append_edges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
