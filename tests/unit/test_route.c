/* test_route.c — unit tests of the HTTP route table lookup (src/http/route.c).
 *
 * Covers: exact and prefix routes with their tail; a prefix route needs at least one byte after
 * its prefix; HEAD matches a GET route and nothing else; a path with a route for other methods
 * gives BAD_METHOD (405), an unknown path NOT_FOUND (404); the first matching route wins; a
 * route taking several methods; an empty table; the methods a path takes (a 405's Allow). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "http/route.h"

static void h1(void *ud, bt_http_req *r, const char *t) { (void)ud, (void)r, (void)t; }
static void h2(void *ud, bt_http_req *r, const char *t) { (void)ud, (void)r, (void)t; }
static void h3(void *ud, bt_http_req *r, const char *t) { (void)ud, (void)r, (void)t; }

static const bt_http_route table[] = {
    {"/live", BT_ROUTE_GET, BT_ROUTE_OPEN, h1},
    {"/v1/models", BT_ROUTE_GET, 0, h2},
    {"/v1/models/", BT_ROUTE_GET, 0, h3},
    {"/both", BT_ROUTE_GET | BT_ROUTE_POST, 0, h1},
    {"/v1/chat/completions", BT_ROUTE_POST, 0, h2},
    {"/v1/chat/completions", BT_ROUTE_GET, 0, h3}, /* shadowed for POST, found for GET */
    {"/nohead", BT_ROUTE_GET, BT_ROUTE_NO_HEAD, h1},
};
#define N (sizeof table / sizeof table[0])

static bt_route_result find(bt_http_method m, const char *path, const bt_http_route **r, const char **tail) {
    return bt_http_route_find(table, N, m, path, r, tail);
}

static void test_exact_and_prefix(void **state) {
    (void)state;
    const bt_http_route *r;
    const char *tail;
    assert_int_equal(find(BT_HTTP_GET, "/live", &r, &tail), BT_ROUTE_FOUND);
    assert_ptr_equal(r, &table[0]);
    assert_string_equal(tail, "");
    assert_int_equal(find(BT_HTTP_GET, "/v1/models", &r, &tail), BT_ROUTE_FOUND);
    assert_ptr_equal(r, &table[1]);
    assert_int_equal(find(BT_HTTP_GET, "/v1/models/org/name", &r, &tail), BT_ROUTE_FOUND);
    assert_ptr_equal(r, &table[2]);
    assert_string_equal(tail, "org/name");
    /* a prefix route is not the bare prefix, and an exact route is not a prefix */
    assert_int_equal(find(BT_HTTP_GET, "/v1/models/", &r, &tail), BT_ROUTE_NOT_FOUND);
    assert_null(r);
    assert_int_equal(find(BT_HTTP_GET, "/live/x", &r, &tail), BT_ROUTE_NOT_FOUND);
    assert_int_equal(find(BT_HTTP_GET, "/liv", &r, &tail), BT_ROUTE_NOT_FOUND);
}

static void test_methods(void **state) {
    (void)state;
    const bt_http_route *r;
    const char *tail;
    assert_int_equal(find(BT_HTTP_HEAD, "/live", &r, &tail), BT_ROUTE_FOUND);
    assert_int_equal(find(BT_HTTP_POST, "/live", &r, &tail), BT_ROUTE_BAD_METHOD);
    assert_null(r);
    assert_int_equal(find(BT_HTTP_OTHER, "/v1/models/x", &r, &tail), BT_ROUTE_BAD_METHOD);
    assert_int_equal(find(BT_HTTP_POST, "/both", &r, &tail), BT_ROUTE_FOUND);
    assert_int_equal(find(BT_HTTP_GET, "/both", &r, &tail), BT_ROUTE_FOUND);
    assert_int_equal(find(BT_HTTP_HEAD, "/v1/chat/completions", &r, &tail), BT_ROUTE_FOUND);
    assert_ptr_equal(r, &table[5]);
    assert_int_equal(find(BT_HTTP_POST, "/v1/chat/completions", &r, &tail), BT_ROUTE_FOUND);
    assert_ptr_equal(r, &table[4]);
    assert_int_equal(find(BT_HTTP_POST, "/nowhere", &r, &tail), BT_ROUTE_NOT_FOUND);
    assert_int_equal(bt_http_route_find(table, 0, BT_HTTP_GET, "/live", &r, &tail), BT_ROUTE_NOT_FOUND);
}

static void test_allowed(void **state) {
    (void)state;
    const unsigned get = BT_ROUTE_GET | BT_ROUTE_HEAD;
    assert_int_equal(bt_http_route_allowed(table, N, "/live"), get);
    assert_int_equal(bt_http_route_allowed(table, N, "/both"), get | BT_ROUTE_POST);
    /* two routes of one path: the union */
    assert_int_equal(bt_http_route_allowed(table, N, "/v1/chat/completions"), get | BT_ROUTE_POST);
    assert_int_equal(bt_http_route_allowed(table, N, "/v1/models/x"), get);
    /* a GET route that refuses HEAD */
    assert_int_equal(bt_http_route_allowed(table, N, "/nohead"), BT_ROUTE_GET);
    assert_int_equal(bt_http_route_allowed(table, N, "/v1/models/"), 0);
    assert_int_equal(bt_http_route_allowed(table, N, "/nowhere"), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_and_prefix),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_allowed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
