/* etcd_call.c — the etcd backend's call layer: every HTTP exchange with etcd's v3 gateway goes
 * through here. One member list with a shared cursor: a call that fails to connect, times out or
 * meets a member without a leader moves the cursor to the next member (etcd__ep_failed), and the
 * machine that made it retries with etcd__backoff_ms. libcurl's multi interface runs on the
 * caller's libuv loop (common/curl_uv.h), so no call blocks. Each call carries its own completion
 * callback; callbacks run only from the loop, outside libcurl, and never after close (the revoke
 * and its authentication excepted). Authentication (user and password for a token) lives here too:
 * every call carries the current token, and the machines wait for one through etcd__ensure_auth. */
#include "discovery/etcd_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

static const char *const rq_names[] = {"authenticate", "lease grant", "lease keep-alive", "put", "delete",
                                       "lease revoke", "list",        "watch",            "probe"};

const char *etcd__rq_name(rq_kind kind) { return rq_names[kind]; }

char *etcd__strdup(const char *s) {
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

uint64_t etcd__backoff_ms(etcd_disc *d, unsigned fails, uint64_t cap) {
    /* The first failures move to members not tried yet: retry at once. */
    if (fails < d->neps) return 0;
    unsigned k = fails - (unsigned)d->neps;
    uint64_t ms = (uint64_t)ETCD_BACKOFF_MIN_MS << (k > 10 ? 10 : k);
    return ms > cap ? cap : ms;
}

/* ---- endpoints and contact ---------------------------------------------------------------- */

void etcd__ep_ok(etcd_disc *d, size_t ep) {
    if (!d->contact) {
        BT_INFO("etcd: reachable again via %s after %.1f s", d->eps[ep], (double)(bt_now_ms() - d->lost_ms) / 1000.0);
        d->contact = true;
    }
    /* A member that answered is as good as any: keep using it. */
    d->cur = ep;
}

/* A request to member `ep` got no usable answer: move the cursor on (once per failing member,
 * not once per request that was in flight to it). */
void etcd__ep_failed(etcd_disc *d, size_t ep, rq_kind kind, const char *why) {
    uint64_t now = bt_now_ms();
    snprintf(d->last_err, sizeof d->last_err, "%s: %s", d->eps[ep], why);
    if (ep == d->cur && d->neps > 1) d->cur = (d->cur + 1) % d->neps;
    if (d->contact) {
        d->contact = false;
        d->lost_ms = d->lost_logged_ms = now;
        BT_WARN("etcd: %s via %s failed (%s); %s", etcd__rq_name(kind), d->eps[ep], why,
                d->neps > 1 ? "trying the next member" : "retrying");
        if (d->neps > 1) BT_INFO("etcd: now using %s", d->eps[d->cur]);
    } else if (now - d->lost_logged_ms >= ETCD_UNREACHABLE_LOG_MS) {
        d->lost_logged_ms = now;
        BT_WARN("etcd: still unreachable after %.0f s (last: %s)", (double)(now - d->lost_ms) / 1000.0, d->last_err);
    } else {
        BT_DEBUG("etcd: %s via %s failed: %s", etcd__rq_name(kind), d->eps[ep], why);
    }
}

/* ---- libcurl on the loop ------------------------------------------------------------------ */

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
    ereq *r = ud;
    size_t n = size * nmemb;
    if (bt_buf_append(&r->resp, ptr, n) != BT_OK) {
        r->overflow = true;
        return 0; /* aborts the transfer */
    }
    return n;
}

static void req_free(ereq *r) {
    if (!r) return;
    if (r->easy) curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    bt_buf_free(&r->resp);
    free(r->body);
    free(r->token);
    free(r->key);
    free(r);
}

static void req_unlink(etcd_disc *d, ereq *r) {
    (void)d;
    LIST_REMOVE(r, link);
}

void etcd__call_abort(etcd_disc *d, ereq *r) {
    if (!r) return;
    bt_curl_uv_remove(d->cu, r->easy);
    req_unlink(d, r);
    req_free(r);
}

ereq *etcd__call_start(etcd_disc *d, rq_kind kind, size_t ep, const char *path, char *body, long timeout_ms,
                       etcd_call_done done) {
    ereq *r = calloc(1, sizeof *r);
    if (!r || !body) goto fail;
    r->d = d;
    r->kind = kind;
    r->done = done;
    r->ep = ep;
    r->body = body;
    body = NULL;
    bt_buf_init(&r->resp, kind == RQ_WATCH ? ETCD_MAX_STREAM_MSG : ETCD_MAX_RESPONSE);
    r->easy = curl_easy_init();
    if (!r->easy) goto fail;
    char url[600];
    snprintf(url, sizeof url, "%s%s", d->eps[ep], path);
    r->hdrs = curl_slist_append(r->hdrs, "Content-Type: application/json");
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    /* etcd's "require leader" metadata: a member that has lost its leader refuses a call at once
     * (and ends a watch stream) instead of holding it, so the call moves to another member. */
    r->hdrs = curl_slist_append(r->hdrs, "Grpc-Metadata-hasleader: true");
    if (d->token && kind != RQ_AUTH) {
        char h[600];
        snprintf(h, sizeof h, "Authorization: %s", d->token);
        r->hdrs = curl_slist_append(r->hdrs, h);
        r->token = etcd__strdup(d->token);
    }
    if (!r->hdrs) goto fail;
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, url);
    if (strncmp(d->eps[ep], "https://", 8) == 0) {
        if (d->ca) curl_easy_setopt(e, CURLOPT_CAINFO, d->ca);
        if (d->cert) curl_easy_setopt(e, CURLOPT_SSLCERT, d->cert);
        if (d->key) curl_easy_setopt(e, CURLOPT_SSLKEY, d->key);
    }
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, ""); /* etcd is reached directly, whatever *_proxy says */
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)ETCD_CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 5L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 2L);
    if (bt_curl_uv_add(d->cu, e) != BT_OK) goto fail;
    LIST_INSERT_HEAD(&d->reqs, r, link);
    BT_TRACE("etcd: %s → %s%s", etcd__rq_name(kind), d->eps[ep], path);
    return r;
fail:
    free(body);
    req_free(r);
    BT_ERROR("etcd: cannot start a %s request (out of memory)", etcd__rq_name(kind));
    return NULL;
}

/* ---- auth --------------------------------------------------------------------------------- */

static void kick_all(etcd_disc *d) {
    etcd__writer_step(d);
    etcd__watch_step(d);
    if (d->lease_state == ETCD_LEASE_LIVE && !d->ka_req && !uv_is_active((uv_handle_t *)&d->ka_timer))
        etcd__ka_schedule(d, 0);
}

static void on_auth_timer(uv_timer_t *t);
static void auth_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);

bool etcd__ensure_auth(etcd_disc *d) {
    if (!d->user || d->token) return true;
    if (d->auth_req || uv_is_active((uv_handle_t *)&d->auth_timer) || d->closing) return false;
    d->auth_req = etcd__call_start(d, RQ_AUTH, d->cur, "/v3/auth/authenticate", bt_etcd_body_auth(d->user, d->pass),
                                   ETCD_REQUEST_TIMEOUT_MS, auth_done);
    if (!d->auth_req) uv_timer_start(&d->auth_timer, on_auth_timer, ETCD_FAIL_DELAY_MS, 0);
    return false;
}

bool etcd__reauth_for_revoke(etcd_disc *d) {
    free(d->token);
    d->token = NULL;
    d->auth_req = etcd__call_start(d, RQ_AUTH, d->cur, "/v3/auth/authenticate", bt_etcd_body_auth(d->user, d->pass),
                                   ETCD_REVOKE_TIMEOUT_MS, auth_done);
    return d->auth_req != NULL;
}

static void on_auth_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (etcd__ensure_auth(d)) kick_all(d);
}

static void auth_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->auth_req = NULL;
    if (res == BT_ETCD_OK) {
        const char *tok = json_string_value(json_object_get(body, "token"));
        if (tok && *tok && strlen(tok) < 500) {
            free(d->token);
            d->token = etcd__strdup(tok);
            d->auth_fails = 0;
            BT_DEBUG("etcd: authenticated as %s", d->user);
            if (d->closing) etcd__start_revoke(d); /* the revoke that was refused for its token */
            else kick_all(d);
            return;
        }
        res = BT_ETCD_FAIL;
        why = "no token in the answer";
    }
    if (d->closing) {
        BT_WARN("etcd: cannot authenticate to revoke lease %" PRIx64 " (%s); its keys expire within %" PRId64 " s",
                (uint64_t)d->lease_id, why, d->lease_ttl_s);
        etcd__finish_close(d);
        return;
    }
    d->auth_fails++;
    uint64_t delay;
    if (res == BT_ETCD_RETRY) {
        etcd__ep_failed(d, r->ep, RQ_AUTH, why);
        delay = etcd__backoff_ms(d, d->auth_fails, ETCD_BACKOFF_MAX_MS);
    } else {
        BT_ERROR("etcd: cannot authenticate as '%s': %s; retrying in %d s", d->user, why, ETCD_FAIL_DELAY_MS / 1000);
        delay = ETCD_FAIL_DELAY_MS;
    }
    uv_timer_start(&d->auth_timer, on_auth_timer, delay, 0);
}

void etcd__token_rejected(etcd_disc *d, ereq *r, const char *why) {
    if (d->token && (!r->token || strcmp(r->token, d->token) == 0)) {
        BT_INFO("etcd: auth token refused (%s); authenticating again", why);
        free(d->token);
        d->token = NULL;
    }
}

/* ---- completion ---------------------------------------------------------------------------- */

static void req_done(etcd_disc *d, ereq *r, CURLcode cc) {
    long http = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    json_t *body = NULL;
    if (cc == CURLE_OK && r->resp.len) body = json_loadb(r->resp.data, r->resp.len, 0, NULL);
    /* A streamed call (keep-alive) answers several lines; the first is the one we asked for. */
    if (!body && cc == CURLE_OK && r->resp.len) {
        char *nl = memchr(r->resp.data, '\n', r->resp.len);
        if (nl) body = json_loadb(r->resp.data, (size_t)(nl - r->resp.data), 0, NULL);
    }
    char why[400];
    bt_etcd_result res = bt_etcd_classify(cc == CURLE_OK, http, body, why, sizeof why);
    if (cc != CURLE_OK) snprintf(why, sizeof why, "%s", r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
    if (r->overflow) {
        snprintf(why, sizeof why, "answer larger than %u bytes", ETCD_MAX_RESPONSE);
        res = BT_ETCD_FAIL;
    }
    if (res == BT_ETCD_OK) etcd__ep_ok(d, r->ep);
    if (r->done) r->done(d, r, res, body, why);
    json_decref(body);
}

/* Clears whichever machine pointer refers to r. */
static void forget_req(etcd_disc *d, ereq *r) {
    ereq **slots[] = {&d->auth_req, &d->w_req, &d->ka_req, &d->list_req, &d->watch_req, &d->probe_req,
                      &d->revoke_req};
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        if (*slots[i] == r) *slots[i] = NULL;
}

/* Run after every libcurl step (common/curl_uv.h): stream data first (so that events that came
 * just before a stream's end are delivered), then finished transfers. User callbacks run only from
 * here, never from inside libcurl. */
static bool on_curl_step(void *ud) {
    etcd_disc *d = ud;
    if (d->finishing) return false;
    if (d->watch_req && d->watch_req->resp.len > d->watch_req->parsed) etcd__watch_drain(d);
    return !d->finishing;
}

static bool on_curl_done(void *ud, CURL *e, CURLcode cc) {
    etcd_disc *d = ud;
    ereq *r = NULL;
    curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&r);
    bt_curl_uv_remove(d->cu, e);
    if (r->kind == RQ_WATCH && r == d->watch_req && !d->closing) {
        etcd__watch_ended(d, r, cc); /* ends with r freed through watch_broke */
        return !d->finishing;
    }
    req_unlink(d, r);
    forget_req(d, r);
    if (!d->closing || r->kind == RQ_REVOKE || r->kind == RQ_AUTH) req_done(d, r, cc);
    req_free(r);
    return !d->finishing;
}

const bt_curl_uv_hooks etcd__curl_hooks = {on_curl_step, on_curl_done, NULL};

