/* route.c — route lookup for the HTTP servers (see route.h). A linear scan: the tables hold a
 * dozen routes, and the order of the table is the order of precedence. */
#include "http/route.h"

#include <string.h>

static bool path_matches(const bt_http_route *r, const char *path, const char **tail) {
    size_t n = strlen(r->path);
    if (n > 0 && r->path[n - 1] == '/') { /* a prefix route needs something after the prefix */
        if (strncmp(path, r->path, n) != 0 || path[n] == '\0') return false;
        *tail = path + n;
        return true;
    }
    if (strcmp(path, r->path) != 0) return false;
    *tail = "";
    return true;
}

bt_route_result bt_http_route_find(const bt_http_route *table, size_t n, bt_http_method method, const char *path,
                                   const bt_http_route **out, const char **tail) {
    unsigned want = 1u << (method == BT_HTTP_HEAD ? BT_HTTP_GET : method);
    bool path_known = false;
    *out = NULL;
    *tail = "";
    for (size_t i = 0; i < n; i++) {
        const char *t;
        if (!path_matches(&table[i], path, &t)) continue;
        path_known = true;
        if (table[i].methods & want) {
            *out = &table[i];
            *tail = t;
            return BT_ROUTE_FOUND;
        }
    }
    return path_known ? BT_ROUTE_BAD_METHOD : BT_ROUTE_NOT_FOUND;
}

unsigned bt_http_route_allowed(const bt_http_route *table, size_t n, const char *path) {
    unsigned methods = 0;
    for (size_t i = 0; i < n; i++) {
        const char *t;
        if (!path_matches(&table[i], path, &t)) continue;
        methods |= table[i].methods;
        if ((table[i].methods & BT_ROUTE_GET) && !(table[i].flags & BT_ROUTE_NO_HEAD)) methods |= BT_ROUTE_HEAD;
    }
    return methods;
}
