/* test_keyset.c — unit tests of the discovery backends' shared owned-key set and sorted-view diff
 * (src/discovery/keyset.c).
 *
 * Covers: put creates then replaces (seq bumped, the old text freed, flags kept), find, del, free;
 * the diff visits each key once in key order as old-only / new-only / both, with empty sides, and
 * stops when the visitor says so. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "discovery/keyset.h"

static char *dup(const char *s) {
    char *p = malloc(strlen(s) + 1);
    memcpy(p, s, strlen(s) + 1);
    return p;
}

static void test_keyset(void **state) {
    (void)state;
    bt_keyset s;
    bt_keyset_init(&s);
    bool created = false;
    bt_owned_key *a = bt_keyset_put(&s, "k/a", dup("1"), 1, &created);
    assert_non_null(a);
    assert_true(created);
    assert_int_equal(a->seq, 1);
    a->flags = 5;
    bt_owned_key *a2 = bt_keyset_put(&s, "k/a", dup("22"), 2, &created);
    assert_ptr_equal(a, a2);
    assert_false(created);
    assert_int_equal(a->seq, 2);
    assert_int_equal(a->flags, 5);
    assert_string_equal(a->text, "22");
    assert_non_null(bt_keyset_put(&s, "k/b", dup("3"), 1, NULL));
    assert_int_equal(s.n, 2);
    assert_ptr_equal(bt_keyset_find(&s, "k/a"), a);
    assert_null(bt_keyset_find(&s, "k/c"));
    size_t seen = 0;
    bt_owned_key *k;
    BT_KEYSET_FOREACH(k, &s) seen++;
    assert_int_equal(seen, 2);
    assert_true(bt_keyset_del(&s, "k/a"));
    assert_false(bt_keyset_del(&s, "k/a"));
    assert_int_equal(s.n, 1);
    bt_keyset_free(&s);
    assert_int_equal(s.n, 0);
    assert_null(bt_keyset_find(&s, "k/b"));
}

typedef struct {
    char *key;
    int v;
} ent;

static char trace[256];
static int stop_after;

static bool visit(void *ud, void *o, void *n) {
    (void)ud;
    ent *a = o, *b = n;
    char one[32];
    snprintf(one, sizeof one, "%s%s:%s;", a ? "o" : "", b ? "n" : "", (a ? a : b)->key);
    size_t tl = strlen(trace);
    snprintf(trace + tl, sizeof trace - tl, "%s", one);
    return --stop_after != 0;
}

static void test_diff(void **state) {
    (void)state;
    ent ov[] = {{"a", 1}, {"c", 1}, {"d", 1}};
    ent nv[] = {{"b", 2}, {"c", 2}, {"e", 2}};
    trace[0] = '\0';
    stop_after = -1;
    bt_view_diff(ov, 3, nv, 3, sizeof(ent), visit, NULL);
    assert_string_equal(trace, "o:a;n:b;on:c;o:d;n:e;");
    trace[0] = '\0';
    bt_view_diff(NULL, 0, nv, 2, sizeof(ent), visit, NULL);
    assert_string_equal(trace, "n:b;n:c;");
    trace[0] = '\0';
    bt_view_diff(ov, 1, NULL, 0, sizeof(ent), visit, NULL);
    assert_string_equal(trace, "o:a;");
    trace[0] = '\0';
    stop_after = 2;
    bt_view_diff(ov, 3, nv, 3, sizeof(ent), visit, NULL);
    assert_string_equal(trace, "o:a;n:b;");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyset),
        cmocka_unit_test(test_diff),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
