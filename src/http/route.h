/* route.h — the route table of an HTTP server (http.h): which handler answers a method and path.
 *
 * A table is an array of bt_http_route, looked up in order. A route's path is matched exactly,
 * or, when it ends with '/', as a prefix followed by at least one more byte (the rest is passed to
 * the handler as `tail`). HEAD matches every route that takes GET (the server drops the body).
 * Lookup says which of three things happened, so that one table answers 404 (no route has the
 * path) and 405 (a route has the path but not the method) without a second list of paths. No I/O:
 * unit-tested (tests/unit/test_route.c). */
#ifndef BATON_HTTP_ROUTE_H
#define BATON_HTTP_ROUTE_H

#include <stdbool.h>
#include <stddef.h>

#include "http/http.h"

#define BT_ROUTE_GET (1u << BT_HTTP_GET)
#define BT_ROUTE_POST (1u << BT_HTTP_POST)
#define BT_ROUTE_HEAD (1u << BT_HTTP_HEAD) /* in bt_http_route_allowed's answer only */

enum {
    BT_ROUTE_OPEN = 1u,    /* answered without authentication (probes, metrics) */
    BT_ROUTE_NO_HEAD = 2u, /* a GET route whose handler refuses HEAD (not in its Allow) */
};

typedef struct {
    const char *path;  /* "/v1/models" exact, or "/v1/models/" a prefix */
    unsigned methods;  /* BT_ROUTE_GET | BT_ROUTE_POST */
    unsigned flags;    /* BT_ROUTE_OPEN */
    void (*handler)(void *ud, bt_http_req *req, const char *tail); /* tail: "" for an exact route */
} bt_http_route;

typedef enum {
    BT_ROUTE_FOUND,      /* *out is the route, *tail what follows a prefix route's path */
    BT_ROUTE_BAD_METHOD, /* some route has this path, none takes this method: 405 */
    BT_ROUTE_NOT_FOUND,  /* no route has this path: 404 */
} bt_route_result;

bt_route_result bt_http_route_find(const bt_http_route *table, size_t n, bt_http_method method, const char *path,
                                   const bt_http_route **out, const char **tail);
/* The methods of every route that has this path: what a 405's Allow header names (RFC 9110
 * 15.5.6). BT_ROUTE_GET | BT_ROUTE_POST as the routes say, and BT_ROUTE_HEAD with a GET route that
 * is not BT_ROUTE_NO_HEAD. 0 when no route has the path. */
unsigned bt_http_route_allowed(const bt_http_route *table, size_t n, const char *path);

#endif
