/* test_jstr.c — unit tests of src/common/jstr.c, the two questions every check of a field read as
 * a C string asks of a jansson string that may hold U+0000 (bodies and request-plane payloads are
 * parsed with JSON_ALLOW_NUL).
 *
 * Covers: bt_jstr_has_nul finds U+0000 at the start, in the middle and at the end of a string,
 * and answers false for a string without one (the empty string included), for NULL and for every
 * other JSON type; bt_jstr_is matches a string of exactly the literal's bytes and refuses one that
 * holds the literal followed by U+0000 and more (which strcmp would pass), a prefix of it, one
 * longer, one of the same length that differs, the empty string against a non-empty literal (and
 * matches it against ""), and NULL or another type. Strings are made both by json_stringn and by
 * parsing JSON text with JSON_ALLOW_NUL, as the request paths make them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "common/jstr.h"

/* The string of a one-element JSON array, parsed with JSON_ALLOW_NUL as a body is. */
static json_t *parsed(const char *text) {
    json_error_t jerr;
    json_t *a = json_loads(text, JSON_ALLOW_NUL, &jerr);
    assert_non_null(a);
    json_t *s = json_incref(json_array_get(a, 0));
    json_decref(a);
    assert_true(json_is_string(s));
    return s;
}

static void test_has_nul(void **state) {
    (void)state;
    static const struct {
        const char *bytes;
        size_t len;
        bool nul;
    } cases[] = {
        {"", 0, false},       {"user", 4, false},      {"\0", 1, true},         {"\0user", 5, true},
        {"us\0er", 5, true},  {"user\0", 5, true},     {"user\0x", 6, true},    {"\0\0", 2, true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *s = json_stringn(cases[i].bytes, cases[i].len);
        assert_non_null(s);
        assert_int_equal(json_string_length(s), cases[i].len);
        assert_int_equal(bt_jstr_has_nul(s), cases[i].nul);
        json_decref(s);
    }
    json_t *s = parsed("[\"user\\u0000x\"]");
    assert_true(bt_jstr_has_nul(s));
    json_decref(s);
    s = parsed("[\"caf\\u00e9\"]"); /* multi-byte UTF-8, no NUL */
    assert_false(bt_jstr_has_nul(s));
    json_decref(s);
}

static void test_has_nul_not_string(void **state) {
    (void)state;
    assert_false(bt_jstr_has_nul(NULL));
    json_t *others[] = {json_null(), json_true(), json_false(), json_integer(0), json_real(0.5), json_object(),
                        json_array()};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        assert_non_null(others[i]);
        assert_false(bt_jstr_has_nul(others[i]));
        json_decref(others[i]);
    }
}

static void test_is(void **state) {
    (void)state;
    static const struct {
        const char *bytes;
        size_t len;
        const char *lit;
        bool same;
    } cases[] = {
        {"user", 4, "user", true},       {"user\0x", 6, "user", false}, {"user\0", 5, "user", false},
        {"use", 3, "user", false},       {"users", 5, "user", false},   {"usex", 4, "user", false},
        {"User", 4, "user", false},      {"", 0, "user", false},        {"", 0, "", true},
        {"\0", 1, "", false},            {"x", 1, "", false},           {"completion", 10, "completion", true},
        {"chat\0completion", 15, "chat", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *s = json_stringn(cases[i].bytes, cases[i].len);
        assert_non_null(s);
        assert_int_equal(bt_jstr_is(s, cases[i].lit), cases[i].same);
        json_decref(s);
    }
    json_t *s = parsed("[\"text\\u0000image_url\"]");
    assert_false(bt_jstr_is(s, "text"));
    assert_false(bt_jstr_is(s, "text image_url"));
    json_decref(s);
    s = parsed("[\"text\"]");
    assert_true(bt_jstr_is(s, "text"));
    json_decref(s);
}

static void test_is_not_string(void **state) {
    (void)state;
    assert_false(bt_jstr_is(NULL, "user"));
    assert_false(bt_jstr_is(NULL, ""));
    json_t *others[] = {json_null(), json_true(), json_integer(4), json_object(), json_array()};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        assert_non_null(others[i]);
        assert_false(bt_jstr_is(others[i], "null"));
        assert_false(bt_jstr_is(others[i], ""));
        json_decref(others[i]);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_has_nul),
        cmocka_unit_test(test_has_nul_not_string),
        cmocka_unit_test(test_is),
        cmocka_unit_test(test_is_not_string),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
