/* test_jcanon.c — unit tests of src/common/jcanon.c: bt_jcanon_dump must give exactly the bytes of
 * json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS), because the resume digest of a body (resume.c) is
 * taken over that form and must be the same whichever build of the frontend computed it.
 *
 * Covers: fixed cases whose bytes are spelled out (escapes of every class: \" \\ \b \f \n \r \t,
 * other control characters in upper-case \u00XX, U+0000 inside a string, '/', DEL and UTF-8 as
 * they are; keys that are prefixes of each other, the empty key, a key holding U+0000; integers at
 * the int64 edges; reals through jansson's own formatting; empty containers); then thousands of
 * random nested values (objects of up to 40 members, so the sort's both paths, with random keys
 * and values of every type), each compared with json_dumps byte for byte; bt_jcanon_str against
 * json_dumps of the same string; and what bt_jcanon_dump refuses (a bare scalar, as json_dumps
 * without JSON_ENCODE_ANY does).
 *
 * bt_jcanon_dump_values, the form the resume digest compares: bodies whose numbers are equal as
 * values give the same bytes (1, 1.0, 1e0, 10E-1; -0.0, -0 and 0; 0.1 and 1e-1; 2^53 as an integer
 * and as a real), and bodies whose numbers differ give different bytes (0.5 and 0.25; integers past
 * 2^53 that differ in their last digit; an integer past 2^53 and the real it rounds to; 1e300 and
 * -2^63 as reals stay reals); then random values against the same value with every integral real
 * within 2^53 made an integer, and against bt_jcanon_dump where the value holds no such real. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/jcanon.h"

static void check_same(const json_t *v) {
    char *want = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
    size_t len = 0;
    char *got = bt_jcanon_dump(v, 0, &len);
    assert_non_null(want);
    assert_non_null(got);
    if (strlen(want) != len || memcmp(want, got, len) != 0) {
        fprintf(stderr, "json_dumps:   %s\nbt_jcanon_dump: %.*s\n", want, (int)len, got);
        fail();
    }
    free(want);
    free(got);
}

static void test_fixed(void **state) {
    (void)state;
    json_error_t e;
    json_t *v = json_loads("{\"b\":\"x\\u001f\\n\\b\\f\\r\\t\\\"\\\\/\\u007f\\u00e9\\u2028\\ud83d\\ude00\",\"a\":1,"
                           "\"ab\":[],\"\":{},\"n\":[-9223372036854775808,9223372036854775807,0],"
                           "\"r\":[0.1,1.0,-0.0,1e300,5e-324,2.5],\"t\":[true,false],\"s\":\"\\u0000z\"}",
                           JSON_ALLOW_NUL, &e);
    if (!v) fprintf(stderr, "%s\n", e.text);
    assert_non_null(v);
    /* a key holding U+0000 (the parser refuses one; json_object_setn makes it) */
    json_object_setn_new_nocheck(v, "a\0", 2, json_null());
    size_t len;
    char *got = bt_jcanon_dump(v, 16, &len);
    assert_non_null(got);
    /* sorted as bytes, shorter first; escapes as jansson writes them */
    const char *want_prefix = "{\"\":{},\"a\":1,\"a\\u0000\":null,\"ab\":[],\"b\":\"x\\u001F\\n\\b\\f\\r\\t\\\"\\\\/\x7f"
                              "\xc3\xa9\xe2\x80\xa8\xf0\x9f\x98\x80\",\"n\":[-9223372036854775808,9223372036854775807,0],"
                              "\"r\":[";
    assert_true(len > strlen(want_prefix));
    assert_memory_equal(got, want_prefix, strlen(want_prefix));
    assert_true(strstr(got, "],\"s\":\"\\u0000z\",\"t\":[true,false]}") != NULL);
    free(got);
    check_same(v);
    json_decref(v);

    json_t *arr = json_array();
    check_same(arr);
    json_decref(arr);
    json_t *obj = json_object();
    check_same(obj);
    json_decref(obj);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* A random valid UTF-8 string: ASCII of every class, control characters, NUL, 2-4 byte sequences. */
static size_t rand_str(char *out, size_t cap) {
    size_t n = next() % 12, o = 0;
    for (size_t i = 0; i < n && o + 4 < cap; i++) {
        switch (next() % 6) {
        case 0: out[o++] = (char)(next() % 0x20); break; /* control, NUL included */
        case 1: out[o++] = "\"\\/ab"[next() % 5]; break;
        case 2: out[o++] = (char)(0x20 + next() % 0x60); break; /* printable ASCII and DEL */
        case 3: out[o++] = (char)0xc3, out[o++] = (char)(0x80 + next() % 0x40); break;
        case 4: memcpy(out + o, "\xe2\x82\xac", 3), o += 3; break;
        default: memcpy(out + o, "\xf0\x9f\x98\x80", 4), o += 4; break;
        }
    }
    return o;
}

static json_t *rand_value(int depth) {
    char s[64];
    switch (next() % (depth < 4 ? 9 : 7)) {
    case 0: return json_integer((json_int_t)next());
    case 1: return json_integer((json_int_t)(next() % 1000) - 500);
    case 2: return json_real((double)(int64_t)next() / (double)(1 + next() % 100000));
    case 3: return json_stringn(s, rand_str(s, sizeof s));
    case 4: return json_true();
    case 5: return json_false();
    case 6: return json_null();
    case 7: {
        json_t *a = json_array();
        size_t n = next() % 5;
        for (size_t i = 0; i < n; i++) json_array_append_new(a, rand_value(depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        size_t n = next() % (next() % 4 ? 6 : 41); /* sometimes more than the 32 sorted on the stack */
        for (size_t i = 0; i < n; i++) {
            size_t kl = rand_str(s, sizeof s);
            if (next() % 3 == 0) kl = 1 + next() % 3, memset(s, 'k', kl); /* prefixes of each other */
            json_object_setn_new_nocheck(o, s, kl, rand_value(depth + 1));
        }
        return o;
    }
    }
}

static void test_random(void **state) {
    (void)state;
    for (int i = 0; i < 5000; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "v", rand_value(0));
        json_object_set_new(o, "w", rand_value(2));
        check_same(o);
        json_decref(o);
    }
}

static void test_str(void **state) {
    (void)state;
    char s[64];
    for (int i = 0; i < 5000; i++) {
        size_t n = rand_str(s, sizeof s);
        json_t *j = json_stringn(s, n);
        assert_non_null(j);
        char *want = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
        bt_buf b;
        bt_buf_init(&b, 1024);
        bt_buf_append(&b, "x", 1); /* appended after what is there */
        assert_int_equal(bt_jcanon_str(&b, s, n), BT_OK);
        assert_int_equal(b.len, 1 + strlen(want));
        assert_memory_equal(b.data + 1, want, strlen(want));
        bt_buf_free(&b);
        free(want);
        json_decref(j);
    }
    /* the cap holds: a string that does not fit fails, sticky */
    bt_buf b;
    bt_buf_init(&b, 8);
    assert_int_equal(bt_jcanon_str(&b, "0123456789", 10), BT_ERR_TOO_LARGE);
    assert_int_equal(bt_buf_status(&b), BT_ERR_TOO_LARGE);
    bt_buf_free(&b);
}

/* The value form of a JSON text (parsed as the frontend parses a body). */
static char *values_of(const char *text) {
    json_error_t e;
    json_t *v = json_loads(text, JSON_ALLOW_NUL, &e);
    if (!v) fprintf(stderr, "%s: %s\n", text, e.text);
    assert_non_null(v);
    size_t len;
    char *s = bt_jcanon_dump_values(v, 0, &len);
    assert_non_null(s);
    assert_int_equal(strlen(s), len);
    json_decref(v);
    return s;
}

static void same_values(const char *a, const char *b) {
    char *x = values_of(a), *y = values_of(b);
    if (strcmp(x, y) != 0) {
        fprintf(stderr, "%s -> %s\n%s -> %s\nexpected the same\n", a, x, b, y);
        fail();
    }
    free(x);
    free(y);
}

static void different_values(const char *a, const char *b) {
    char *x = values_of(a), *y = values_of(b);
    if (strcmp(x, y) == 0) {
        fprintf(stderr, "%s and %s both -> %s\nexpected different\n", a, b, x);
        fail();
    }
    free(x);
    free(y);
}

static void values_are(const char *text, const char *want) {
    char *x = values_of(text);
    if (strcmp(x, want) != 0) {
        fprintf(stderr, "%s -> %s, want %s\n", text, x, want);
        fail();
    }
    free(x);
}

static void test_values_fixed(void **state) {
    (void)state;
    values_are("{\"temperature\":1.0}", "{\"temperature\":1}");
    values_are("{\"t\":[1e0,10E-1,-0.0,-0,0.0,2.5,-3e2,1e300]}", "{\"t\":[1,1,0,0,0,2.5,-300,1.0000000000000001e300]}");
    same_values("{\"temperature\":1,\"top_p\":0.5}", "{\"top_p\":5e-1,\"temperature\":1.0}");
    same_values("{\"t\":0.1}", "{\"t\":1e-1}");
    same_values("{\"t\":-0.0}", "{\"t\":0}");
    same_values("{\"a\":{\"b\":[{\"c\":2}]}}", "{\"a\":{\"b\":[{\"c\":2.0}]}}"); /* at any depth */
    same_values("{\"seed\":9007199254740992}", "{\"seed\":9007199254740992.0}"); /* 2^53: exact */
    same_values("{\"seed\":-9007199254740992}", "{\"seed\":-9.007199254740992e15}");
    different_values("{\"temperature\":0.5}", "{\"temperature\":0.25}");
    different_values("{\"temperature\":1}", "{\"temperature\":1.5}");
    different_values("{\"t\":1}", "{\"t\":\"1\"}");
    different_values("{\"t\":0}", "{\"t\":false}");
    /* integers are exact at every size; a real past 2^53 is never one of them */
    different_values("{\"seed\":9007199254740993}", "{\"seed\":9007199254740992}");
    different_values("{\"seed\":9223372036854775807}", "{\"seed\":9223372036854775806}");
    different_values("{\"seed\":9007199254740993}", "{\"seed\":9007199254740993.0}");
    different_values("{\"seed\":9007199254740994}", "{\"seed\":9007199254740994.0}");
    values_are("{\"n\":[-9223372036854775808,9223372036854775807]}",
               "{\"n\":[-9223372036854775808,9223372036854775807]}");
    values_are("{\"r\":-9223372036854775808.0}", "{\"r\":-9.2233720368547758e18}");
    /* strings and keys are as bt_jcanon_dump writes them */
    values_are("{\"b\":\"1.0\",\"a\":\"x\\n\"}", "{\"a\":\"x\\n\",\"b\":\"1.0\"}");
}

/* v with every integral real within ±2^53 replaced by the integer it equals (a new reference),
 * counted in `replaced`. */
static int replaced;
static json_t *integral_reals_as_integers(json_t *v) {
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == trunc(d) && fabs(d) <= 9007199254740992.0) {
            replaced++;
            return json_integer((json_int_t)d);
        }
    }
    if (json_is_array(v)) {
        json_t *a = json_array();
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) json_array_append_new(a, integral_reals_as_integers(x));
        return a;
    }
    if (json_is_object(v)) {
        json_t *o = json_object();
        const char *k;
        size_t kl;
        json_t *x;
        json_object_keylen_foreach(v, k, kl, x) json_object_setn_new_nocheck(o, k, kl, integral_reals_as_integers(x));
        return o;
    }
    return json_incref(v);
}

static void test_values_random(void **state) {
    (void)state;
    int with_reals = 0;
    for (int i = 0; i < 3000; i++) {
        json_t *o = json_object();
        json_object_set_new(o, "v", rand_value(0));
        json_object_set_new(o, "w", rand_value(2));
        json_object_set_new(o, "x", json_real((double)((int64_t)(next() % 2000) - 1000))); /* integral */
        if (i % 2) json_object_del(o, "x");
        replaced = 0;
        json_t *ints = integral_reals_as_integers(o);
        size_t la, lb, lc;
        char *a = bt_jcanon_dump_values(o, 0, &la), *b = bt_jcanon_dump_values(ints, 0, &lb);
        char *c = bt_jcanon_dump(o, 0, &lc);
        assert_non_null(a);
        assert_non_null(b);
        assert_non_null(c);
        assert_int_equal(la, lb);
        assert_memory_equal(a, b, la);
        if (replaced) {
            with_reals++;
            assert_true(la != lc || memcmp(a, c, la) != 0);
        } else { /* no integral real: the value form is json_dumps' form */
            assert_int_equal(la, lc);
            assert_memory_equal(a, c, la);
        }
        free(a);
        free(b);
        free(c);
        json_decref(ints);
        json_decref(o);
    }
    assert_true(with_reals >= 1500); /* the "x" member at least */
}

static void test_refused(void **state) {
    (void)state;
    json_t *i = json_integer(1);
    size_t len;
    assert_null(bt_jcanon_dump(i, 0, &len));
    assert_null(bt_jcanon_dump_values(i, 0, &len));
    assert_null(json_dumps(i, JSON_COMPACT | JSON_SORT_KEYS)); /* as jansson without JSON_ENCODE_ANY */
    json_decref(i);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixed),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_str),
        cmocka_unit_test(test_values_fixed),
        cmocka_unit_test(test_values_random),
        cmocka_unit_test(test_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
