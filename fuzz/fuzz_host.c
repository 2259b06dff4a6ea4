/* fuzz_host.c — libFuzzer driver for the Host rule against DNS rebinding (bt_http_host_allowed,
 * bt_http_hosts_valid, src/http/http.c), which reads the client's Host header and the operator's
 * --allowed-hosts.
 *
 * The input is "list\nhost" (no newline: no list, the default rule); each part an exactly-sized
 * heap copy, so that ASan sees a read past it. A list bt_http_hosts_valid refuses is not used
 * further. The invariants, each a property of the rule as docs/security.md states it:
 *   - no Host (empty), a list holding "*", and no list on a server not on loopback: served;
 *   - with a list, whether the server is on loopback changes nothing;
 *   - ASCII case changes nothing;
 *   - a port changes nothing: a Host without one is served exactly when it is with ":8080";
 *   - a Host that is an IPv4 or bracketed IPv6 literal, localhost or a name under it (not in
 *     brackets, which only an IPv6 literal may be), is served wherever a check applies;
 *   - a name is served once the list holds it, and a name under it once the list holds ".name";
 *   - the default rule on loopback serves nothing that is not an address or under localhost.
 * A violated invariant aborts. Seeds are in fuzz/corpus/host/; build and run with fuzz/build.sh. */
#include <arpa/inet.h>
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/http.h"

#include "check.h"

static char *copy(const uint8_t *p, size_t n) {
    char *s = malloc(n + 1);
    if (!s) abort();
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/* What may follow a host: nothing, or ':' and digits (none too, as the rule reads it). */
static bool port_ok(const char *p) {
    if (!*p) return true;
    if (*p++ != ':') return false;
    for (; *p; p++)
        if (*p < '0' || *p > '9') return false;
    return true;
}

/* The Host is an IPv4 or bracketed IPv6 literal with an optional port. */
static bool is_address(const char *host) {
    char buf[64];
    size_t n;
    if (host[0] == '[') {
        const char *close = strchr(host, ']');
        n = close ? (size_t)(close - host - 1) : 0;
        if (!close || n == 0 || n >= sizeof buf) return false;
        memcpy(buf, host + 1, n);
        buf[n] = '\0';
        struct in6_addr a6;
        return inet_pton(AF_INET6, buf, &a6) == 1 && port_ok(close + 1);
    }
    n = strcspn(host, ":");
    if (n >= sizeof buf) return false;
    memcpy(buf, host, n);
    buf[n] = '\0';
    struct in_addr a4;
    return inet_pton(AF_INET, buf, &a4) == 1 && port_ok(host + n);
}

/* A plain host name (letters, digits, '-', '.', not starting with '.'): one that can be listed. */
static bool plain_name(const char *s) {
    if (!*s || *s == '.' || strlen(s) > 200) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '-' && *s != '.') return false;
    return true;
}

static void check_host(const char *list, const char *host) {
    bool lo = bt_http_host_allowed(list, true, host);
    bool other = bt_http_host_allowed(list, false, host);
    if (!*host) CHECK(lo && other);
    if (!list) CHECK(other);
    else CHECK(lo == other);
    /* ASCII case */
    char *up = strdup(host);
    for (char *p = up; *p; p++) *p = (char)toupper((unsigned char)*p);
    CHECK(bt_http_host_allowed(list, true, up) == lo);
    free(up);
    /* a port */
    if (*host && !strchr(host, ':') && host[0] != '[') {
        size_t n = strlen(host);
        char *with = malloc(n + 6);
        memcpy(with, host, n);
        memcpy(with + n, ":8080", 6);
        CHECK(bt_http_host_allowed(list, true, with) == lo);
        free(with);
    }
    if (is_address(host)) CHECK(lo);
    if (host[0] != '[' && !strchr(host, ':') && (strcasecmp(host, "localhost") == 0 ||
                               (strlen(host) > 10 && strcasecmp(host + strlen(host) - 10, ".localhost") == 0)))
        CHECK(lo);
    if (!list && lo && *host) {
        /* the default on loopback: an address, or localhost and the names under it, only */
        size_t n = strcspn(host, ":");
        char *name = copy((const uint8_t *)host, n);
        if (n > 1 && name[n - 1] == '.') name[--n] = '\0';
        CHECK(is_address(host) || strcasecmp(name, "localhost") == 0 ||
              (n > 10 && strcasecmp(name + n - 10, ".localhost") == 0));
        free(name);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (memchr(data, 0, size)) return 0; /* a header value and an argument hold no NUL */
    const uint8_t *nl = memchr(data, '\n', size);
    char *list = nl ? copy(data, (size_t)(nl - data)) : NULL;
    char *host = nl ? copy(nl + 1, size - (size_t)(nl - data) - 1) : copy(data, size);
    char err[256];
    if (list && !bt_http_hosts_valid("--allowed-hosts", list, err, sizeof err)) goto out;
    if (strchr(host, '\n')) goto out; /* a header holds one line */
    check_host(list, host);
    if (plain_name(host)) {
        /* listed: served; listed with a leading dot: its subdomains too */
        size_t ln = list ? strlen(list) : 0, hn = strlen(host);
        char *more = malloc(ln + hn + 3);
        snprintf(more, ln + hn + 3, "%s%s%s", list ? list : "", list ? "," : "", host);
        if (bt_http_hosts_valid("--allowed-hosts", more, err, sizeof err)) {
            CHECK(bt_http_host_allowed(more, true, host));
            char *sub = malloc(hn + 8);
            snprintf(sub, hn + 8, "www.%s", host);
            snprintf(more, ln + hn + 3, "%s%s.%s", list ? list : "", list ? "," : "", host);
            if (host[hn - 1] != '.' && bt_http_hosts_valid("--allowed-hosts", more, err, sizeof err))
                CHECK(bt_http_host_allowed(more, true, sub));
            free(sub);
        }
        free(more);
    }
out:
    free(list);
    free(host);
    return 0;
}
