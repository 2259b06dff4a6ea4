/* etcd.c — the etcd backend of the discovery plane: etcd's v3 JSON gateway (etcd >= 3.4, paths
 * /v3/...) spoken over HTTP/1.1 with libcurl's multi interface driven by the caller's libuv loop,
 * so no call ever blocks the loop. This file is the handle: creation (endpoints, auth, TLS files
 * checked at start-up), the discovery ops table and close. Its machines share one handle, one
 * member list and one auth token, and live in their own files (etcd_internal.h lists them): the
 * call layer (etcd_call.c), the writer and its lease (etcd_lease.c), the watcher (etcd_watch.c),
 * over the pure wire codec (etcd_wire.c). A call that fails to connect, times out, or meets a
 * member without a leader moves the shared member cursor to the next member and is retried with a
 * bounded backoff; nothing gives up. User callbacks are made only from the loop, outside libcurl
 * callbacks, and never after close. See docs/discovery.md for the keys, timings and the behaviour
 * under each outage. */
#include "discovery/etcd_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"

static void free_disc(etcd_disc *d) {
    etcd__lease_free(d);
    etcd__watch_free(d);
    bt_etcd_endpoints_free(d->eps, d->neps);
    free(d->prefix);
    free(d->user);
    free(d->pass);
    free(d->token);
    free(d->ca);
    free(d->cert);
    free(d->key);
    free(d);
}

/* The closer's done: every handle has closed. */
static void on_all_closed(void *ud) {
    etcd_disc *d = ud;
    void (*done)(void *) = d->done;
    void *done_ud = d->done_ud;
    free_disc(d);
    if (done) done(done_ud);
}

/* Tears everything down: transfers, libcurl, timers and polls; frees the handle and calls done
 * once the last libuv handle has closed. Later calls do nothing. */
void etcd__finish_close(etcd_disc *d) {
    if (d->finishing) return;
    d->finishing = true;
    while (!LIST_EMPTY(&d->reqs)) etcd__call_abort(d, LIST_FIRST(&d->reqs));
    d->auth_req = d->w_req = d->ka_req = d->list_req = d->watch_req = d->probe_req = d->revoke_req = NULL;
    bt_closer_init(&d->closer, on_all_closed, d);
    /* Closes cached connections, libcurl's timer and its sockets' polls. */
    bt_closer_hold(&d->closer);
    bt_curl_uv_close(d->cu, bt_closer_release, &d->closer);
    d->cu = NULL;
    uv_timer_t *timers[] = {&d->auth_timer, &d->w_timer, &d->ka_timer, &d->watch_timer, &d->probe_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) bt_closer_close(&d->closer, (uv_handle_t *)timers[i]);
    bt_closer_seal(&d->closer);
}

/* Stops the machines and every transfer, then revokes the lease, which removes every key written
 * with it at once. Safe inside a watcher callback: the code that made the callback checks
 * `closing` before touching anything again, and the handle itself is freed only from the close
 * callbacks of its libuv handles, on a later loop turn. */
static void etcd_close(bt_discovery *base, void (*done)(void *ud), void *ud) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return;
    d->closing = true;
    if (d->watch_state != ETCD_WATCH_OFF) etcd__watch_set_state(d, ETCD_WATCH_CLOSED, "closing");
    d->done = done;
    d->done_ud = ud;
    uv_timer_stop(&d->w_timer);
    uv_timer_stop(&d->ka_timer);
    uv_timer_stop(&d->watch_timer);
    uv_timer_stop(&d->probe_timer);
    uv_timer_stop(&d->auth_timer);
    while (!LIST_EMPTY(&d->reqs)) etcd__call_abort(d, LIST_FIRST(&d->reqs));
    d->auth_req = d->w_req = d->ka_req = d->list_req = d->watch_req = d->probe_req = NULL;
    if (d->lease_state == ETCD_LEASE_LIVE) {
        etcd__start_revoke(d);
    } else {
        etcd__lease_set_state(d, ETCD_LEASE_CLOSED, "closing without a lease");
        etcd__finish_close(d);
    }
}

static void etcd_stats(const bt_discovery *base, bt_discovery_stats *out) {
    const etcd_disc *d = (const etcd_disc *)base;
    /* a stream that stops answering stays "streaming" until the probe moves it (etcd_watch.c),
     * at most ETCD_PROBE_INTERVAL_MS + ETCD_PROBE_TIMEOUT_MS after etcd went quiet */
    out->watching = d->watch_state == ETCD_WATCH_STREAMING;
    out->registered = etcd__lease_registered(d);
    out->reregistrations = d->lease_losses;
}

static const bt_discovery_ops etcd_ops = {
    .name = "etcd",
    .put = etcd__put,
    .del = etcd__del,
    .watch = etcd__watch,
    .close = etcd_close,
    .stats = etcd_stats,
};

/* A TLS file must be a readable regular file at start-up: a wrong path is reported now, not as
 * TLS failures retried for ever (nor a FIFO waited on for ever: bt_open_regular). Start-up only
 * (before the loop runs): the read blocks. */
static bool tls_file_ok(const char *what, const char *path, char *err, size_t errlen) {
    char why[128];
    int fd = bt_open_regular(path, why, sizeof why);
    if (fd >= 0) {
        char c;
        ssize_t n = bt_read_full(fd, &c, 1);
        snprintf(why, sizeof why, "%s", n < 0 ? strerror(errno) : "the file is empty");
        close(fd);
        if (n == 1) return true;
    }
    snprintf(err, errlen, "%s '%s' cannot be read: %s", what, path, why);
    return false;
}

/* Checks the TLS settings; true when they can be used. */
static bool tls_config_ok(const bt_discovery_config *cfg, char *err, size_t errlen) {
    bool has_cert = cfg->etcd_client_cert && *cfg->etcd_client_cert;
    bool has_key = cfg->etcd_client_key && *cfg->etcd_client_key;
    if (has_cert != has_key) {
        snprintf(err, errlen, "etcd client TLS needs both a certificate and its key: ETCD_AUTH_%s "
                              "(--etcd-client-%s) is not set", has_cert ? "CLIENT_KEY" : "CLIENT_CERT",
                 has_cert ? "key" : "cert");
        return false;
    }
    if (cfg->etcd_ca && *cfg->etcd_ca && !tls_file_ok("ETCD_AUTH_CA (--etcd-ca)", cfg->etcd_ca, err, errlen))
        return false;
    if (has_cert && !tls_file_ok("ETCD_AUTH_CLIENT_CERT (--etcd-client-cert)", cfg->etcd_client_cert, err, errlen))
        return false;
    if (has_key && !tls_file_ok("ETCD_AUTH_CLIENT_KEY (--etcd-client-key)", cfg->etcd_client_key, err, errlen))
        return false;
    return true;
}

static bool opt_dup(const char *s, char **out) {
    *out = NULL;
    if (!s || !*s) return true;
    *out = etcd__strdup(s);
    return *out != NULL;
}

bt_status bt_discovery_etcd_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                                   size_t errlen) {
    if (cfg->ttl_s < 1 || cfg->ttl_s > 86400) {
        snprintf(err, errlen, "discovery ttl must be between 1 and 86400 seconds, got %lld", (long long)cfg->ttl_s);
        return BT_ERR_INVALID;
    }
    bt_discovery_config def;
    bt_discovery_config_default(&def);
    const char *list = (cfg->etcd_endpoints && *cfg->etcd_endpoints) ? cfg->etcd_endpoints : def.etcd_endpoints;
    char **eps = NULL;
    size_t neps = 0;
    bt_status st = bt_etcd_parse_endpoints(list, &eps, &neps, err, errlen);
    if (st != BT_OK) return st;
    if (!tls_config_ok(cfg, err, errlen)) {
        bt_etcd_endpoints_free(eps, neps);
        return BT_ERR_INVALID;
    }
    if (!bt_curl_uv_global_init()) {
        bt_etcd_endpoints_free(eps, neps);
        snprintf(err, errlen, "libcurl initialisation failed");
        return BT_ERR_INTERNAL;
    }
    etcd_disc *d = calloc(1, sizeof *d);
    if (d) bt_keyset_init(&d->owned);
    if (!d) goto nomem;
    LIST_INIT(&d->reqs);
    TAILQ_INIT(&d->dels);
    d->eps = eps;
    d->neps = neps;
    eps = NULL;
    if (cfg->etcd_username && *cfg->etcd_username) {
        d->user = etcd__strdup(cfg->etcd_username);
        d->pass = etcd__strdup(cfg->etcd_password ? cfg->etcd_password : "");
        if (!d->user || !d->pass) goto nomem;
    }
    if (!opt_dup(cfg->etcd_ca, &d->ca) || !opt_dup(cfg->etcd_client_cert, &d->cert) ||
        !opt_dup(cfg->etcd_client_key, &d->key))
        goto nomem;
    d->cu = bt_curl_uv_create(loop, &etcd__curl_hooks, d);
    if (!d->cu) goto nomem;
    d->base.ops = &etcd_ops;
    d->ttl_s = cfg->ttl_s;
    d->contact = true;
    uv_timer_t *timers[] = {&d->auth_timer, &d->w_timer, &d->ka_timer, &d->watch_timer, &d->probe_timer};
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++) {
        uv_timer_init(loop, timers[i]);
        timers[i]->data = d;
    }
    char eplist[512] = "";
    size_t off = 0;
    for (size_t i = 0; i < d->neps && off < sizeof eplist; i++)
        off += (size_t)snprintf(eplist + off, sizeof eplist - off, "%s%s", i ? "," : "", d->eps[i]);
    bool https = false;
    for (size_t i = 0; i < d->neps; i++) https = https || strncmp(d->eps[i], "https://", 8) == 0;
    /* no lease TTL here: only a process that registers keys (a worker) holds a lease, and it says
     * its TTL when the lease is granted (etcd_lease.c); a frontend only reads */
    BT_INFO("discovery(etcd): endpoints %s%s%s%s%s", eplist, d->user ? ", auth as " : "", d->user ? d->user : "",
            https && d->ca ? ", CA " : "", https && d->ca ? d->ca : "");
    if (https && d->cert) BT_INFO("discovery(etcd): TLS client certificate %s", d->cert);
    if (!https && (d->ca || d->cert))
        BT_WARN("discovery(etcd): ETCD_AUTH_CA / ETCD_AUTH_CLIENT_CERT are set but no endpoint is https://: "
                "they are not used");
    *out = &d->base;
    return BT_OK;
nomem:
    bt_etcd_endpoints_free(eps, neps);
    if (d) {
        bt_etcd_endpoints_free(d->eps, d->neps);
        free(d->user);
        free(d->pass);
        free(d->ca);
        free(d->cert);
        free(d->key);
        free(d);
    }
    snprintf(err, errlen, "out of memory");
    return BT_ERR_NOMEM;
}
