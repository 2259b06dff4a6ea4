/* etcd_lease.c — the etcd backend's writer: the keys this process owns and the lease they are
 * written with. The first put grants a lease (TTL = the discovery TTL) and writes every key with
 * it; one write is in flight at a time, so operations on a key land in call order, and a put
 * supersedes a queued delete. The keep-alive refreshes the lease every TTL/3, retrying at once on
 * another member when a refresh fails. When the lease is found gone (a keep-alive answered TTL 0,
 * a put said "lease not found") a new one is granted and every key written again. On close the
 * lease is revoked (bounded: ETCD_REVOKE_ATTEMPTS members, ETCD_REVOKE_TIMEOUT_MS each), which
 * removes every key at once; a lease that could not be revoked expires after its TTL. The lease's
 * life is etcd_lease_state (etcd_internal.h), changed only in etcd__lease_set_state. */
#include "discovery/etcd_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

static const char *const lease_state_names[] = {"none", "granting", "live", "revoking", "closed"};

void etcd__lease_set_state(etcd_disc *d, etcd_lease_state s, const char *why) {
    ETCD_SET_STATE(d->lease_state, s, lease_state_names, "lease", why);
}

static void writer_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);
static void ka_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);
static void revoke_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);

/* The first key still to be written with the current lease, or NULL. */
static bt_owned_key *first_dirty(const etcd_disc *d) {
    bt_owned_key *o;
    BT_KEYSET_FOREACH(o, &d->owned)
    if (o->flags & ETCD_OWNED_DIRTY) return o;
    return NULL;
}

/* Forgets the queued delete of key, if any (done, or superseded by a put). */
static void drop_del(etcd_disc *d, const char *key) {
    for (pdel *x = TAILQ_FIRST(&d->dels); x; x = TAILQ_NEXT(x, link))
        if (strcmp(x->key, key) == 0) {
            TAILQ_REMOVE(&d->dels, x, link);
            free(x->key);
            free(x);
            return;
        }
}

static void on_w_timer(uv_timer_t *t) { etcd__writer_step(t->data); }

static void w_retry(etcd_disc *d, uint64_t delay) { uv_timer_start(&d->w_timer, on_w_timer, delay, 0); }

/* The lease `id` is gone: every key must be written again under a new one. */
static void lease_lost(etcd_disc *d, int64_t id, const char *why) {
    if (id == 0 || id != d->lease_id) return;
    size_t n = d->owned.n;
    bt_owned_key *o;
    BT_KEYSET_FOREACH(o, &d->owned) o->flags |= ETCD_OWNED_DIRTY;
    double since = d->lease_ok_ms ? (double)(bt_now_ms() - d->lease_ok_ms) / 1000.0 : 0.0;
    BT_WARN("etcd: lease %" PRIx64 " is gone (%s; last refreshed %.1f s ago): granting a new lease and registering "
            "%zu key(s) again",
            (uint64_t)id, why, since, n);
    d->lease_id = 0;
    etcd__lease_set_state(d, ETCD_LEASE_NONE, why);
    d->reregistering = n > 0;
    if (n > 0) d->lease_losses++;
    uv_timer_stop(&d->ka_timer);
    if (d->ka_req) {
        etcd__call_abort(d, d->ka_req);
        d->ka_req = NULL;
    }
}

void etcd__writer_step(etcd_disc *d) {
    if (d->closing || d->w_req || uv_is_active((uv_handle_t *)&d->w_timer)) return;
    if (TAILQ_EMPTY(&d->dels) && !first_dirty(d)) return;
    if (!etcd__ensure_auth(d)) return;
    ereq *r = NULL;
    if (!TAILQ_EMPTY(&d->dels)) {
        const char *key = TAILQ_FIRST(&d->dels)->key;
        r = etcd__call_start(d, RQ_DEL, d->cur, "/v3/kv/deleterange", bt_etcd_body_delete(key), ETCD_REQUEST_TIMEOUT_MS,
                             writer_done);
        if (r) r->key = etcd__strdup(key);
    } else if (d->lease_state != ETCD_LEASE_LIVE) {
        r = etcd__call_start(d, RQ_GRANT, d->cur, "/v3/lease/grant", bt_etcd_body_grant(d->ttl_s),
                             ETCD_REQUEST_TIMEOUT_MS, writer_done);
        if (r) etcd__lease_set_state(d, ETCD_LEASE_GRANTING, "a key to write");
    } else {
        bt_owned_key *o = first_dirty(d);
        r = etcd__call_start(d, RQ_PUT, d->cur, "/v3/kv/put", bt_etcd_body_put(o->key, o->text, o->len, d->lease_id),
                             ETCD_REQUEST_TIMEOUT_MS, writer_done);
        if (r) {
            r->key = etcd__strdup(o->key);
            r->seq = o->seq;
            r->lease = d->lease_id;
        }
    }
    if (!r) {
        w_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    d->w_req = r;
}

static void writer_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->w_req = NULL;
    if (r->kind == RQ_GRANT && res != BT_ETCD_OK) etcd__lease_set_state(d, ETCD_LEASE_NONE, why);
    if (res == BT_ETCD_OK) {
        d->w_fails = 0;
        switch (r->kind) {
        case RQ_GRANT: {
            int64_t id = 0, ttl = 0;
            bt_etcd_json_i64(json_object_get(body, "ID"), &id);
            bt_etcd_json_i64(json_object_get(body, "TTL"), &ttl);
            if (id == 0 || ttl <= 0) {
                etcd__lease_set_state(d, ETCD_LEASE_NONE, "grant answered without a lease");
                BT_WARN("etcd: lease grant answered without a lease; retrying");
                w_retry(d, ETCD_FAIL_DELAY_MS);
                return;
            }
            d->lease_id = id;
            etcd__lease_set_state(d, ETCD_LEASE_LIVE, "granted");
            d->lease_ttl_s = ttl;
            d->leases_granted++;
            d->lease_ok_ms = bt_now_ms();
            d->ka_interval_ms = (uint64_t)ttl * 1000 / 3;
            if (d->ka_interval_ms < 200) d->ka_interval_ms = 200;
            d->ka_fails = 0;
            BT_INFO("etcd: lease %" PRIx64 " granted via %s (TTL %" PRId64 " s, refreshed every %" PRIu64 " ms)",
                    (uint64_t)id, d->eps[r->ep], ttl, d->ka_interval_ms);
            etcd__ka_schedule(d, d->ka_interval_ms);
            break;
        }
        case RQ_PUT: {
            bt_owned_key *o = bt_keyset_find(&d->owned, r->key);
            if (o && o->seq == r->seq && r->lease == d->lease_id) {
                o->flags &= ~(unsigned)ETCD_OWNED_DIRTY;
                if (!(o->flags & ETCD_OWNED_REGISTERED))
                    BT_INFO("etcd: registered %s (lease %" PRIx64 ")", o->key, (uint64_t)r->lease);
                else BT_DEBUG("etcd: wrote %s (lease %" PRIx64 ")", o->key, (uint64_t)r->lease);
                o->flags |= ETCD_OWNED_REGISTERED;
            }
            if (d->reregistering) {
                if (!first_dirty(d)) {
                    BT_INFO("etcd: registered again: %zu key(s) under lease %" PRIx64, d->owned.n,
                            (uint64_t)d->lease_id);
                    d->reregistering = false;
                }
            }
            break;
        }
        case RQ_DEL: {
            drop_del(d, r->key);
            BT_INFO("etcd: deleted %s", r->key);
            break;
        }
        default:
            break;
        }
        etcd__writer_step(d);
        return;
    }
    d->w_fails++;
    switch (res) {
    case BT_ETCD_LEASE_GONE:
        lease_lost(d, r->lease, "etcd says the lease was not found");
        etcd__writer_step(d);
        return;
    case BT_ETCD_AUTH:
        etcd__token_rejected(d, r, why);
        etcd__writer_step(d);
        return;
    case BT_ETCD_RETRY:
        etcd__ep_failed(d, r->ep, r->kind, why);
        w_retry(d, etcd__backoff_ms(d, d->w_fails, ETCD_BACKOFF_MAX_MS));
        return;
    default:
        BT_ERROR("etcd: %s%s%s refused: %s; retrying in %d s", etcd__rq_name(r->kind), r->key ? " of " : "",
                 r->key ? r->key : "", why, ETCD_FAIL_DELAY_MS / 1000);
        w_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
}

bt_status etcd__put(bt_discovery *base, const char *key, const json_t *value) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    char *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text) return BT_ERR_NOMEM;
    size_t len = strlen(text);
    if (len > ETCD_MAX_VALUE) {
        free(text);
        return BT_ERR_TOO_LARGE;
    }
    bt_owned_key *o = bt_keyset_put(&d->owned, key, text, len, NULL);
    if (!o) return BT_ERR_NOMEM; /* text was freed */
    o->flags |= ETCD_OWNED_DIRTY;
    drop_del(d, key); /* a put supersedes a queued delete */
    etcd__writer_step(d);
    return BT_OK;
}

bt_status etcd__del(bt_discovery *base, const char *key) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    bt_keyset_del(&d->owned, key);
    pdel *x = TAILQ_FIRST(&d->dels);
    while (x && strcmp(x->key, key) != 0) x = TAILQ_NEXT(x, link);
    if (!x) {
        x = calloc(1, sizeof *x);
        if (!x || !(x->key = etcd__strdup(key))) {
            free(x);
            return BT_ERR_NOMEM;
        }
        TAILQ_INSERT_TAIL(&d->dels, x, link); /* deletes go out in call order */
    }
    etcd__writer_step(d);
    return BT_OK;
}

/* ---- keep-alive --------------------------------------------------------------------------- */

static void on_ka_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (d->closing || d->lease_state != ETCD_LEASE_LIVE || d->ka_req) return;
    long timeout = (long)d->ka_interval_ms;
    if (timeout > ETCD_REQUEST_TIMEOUT_MS) timeout = ETCD_REQUEST_TIMEOUT_MS;
    if (timeout < 500) timeout = 500;
    d->ka_req = etcd__call_start(d, RQ_KEEPALIVE, d->cur, "/v3/lease/keepalive", bt_etcd_body_lease(d->lease_id),
                                 timeout, ka_done);
    if (d->ka_req) d->ka_req->lease = d->lease_id;
    else etcd__ka_schedule(d, ETCD_KA_BACKOFF_MAX_MS);
}

void etcd__ka_schedule(etcd_disc *d, uint64_t delay_ms) {
    if (d->closing) return;
    uv_timer_start(&d->ka_timer, on_ka_timer, delay_ms, 0);
}

static void ka_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->ka_req = NULL;
    if (r->lease != d->lease_id) return; /* a lease we already gave up */
    if (res == BT_ETCD_OK) {
        /* The gateway wraps streamed answers: {"result": {...}}. */
        const json_t *rs = json_object_get(body, "result");
        if (!rs) rs = body;
        int64_t ttl = 0;
        bt_etcd_json_i64(json_object_get(rs, "TTL"), &ttl);
        if (ttl <= 0) {
            lease_lost(d, r->lease, "a keep-alive answered TTL 0");
            etcd__writer_step(d);
            return;
        }
        d->ka_fails = 0;
        d->lease_ok_ms = bt_now_ms();
        BT_TRACE("etcd: lease %" PRIx64 " refreshed (TTL %" PRId64 " s)", (uint64_t)r->lease, ttl);
        etcd__ka_schedule(d, d->ka_interval_ms);
        return;
    }
    d->ka_fails++;
    if (res == BT_ETCD_LEASE_GONE) {
        lease_lost(d, r->lease, "etcd says the lease was not found");
        etcd__writer_step(d);
        return;
    }
    if (res == BT_ETCD_AUTH) etcd__token_rejected(d, r, why);
    else if (res == BT_ETCD_RETRY) etcd__ep_failed(d, r->ep, RQ_KEEPALIVE, why);
    else BT_WARN("etcd: lease keep-alive refused: %s", why);
    etcd__ka_schedule(d, etcd__backoff_ms(d, d->ka_fails, ETCD_KA_BACKOFF_MAX_MS));
}

/* ---- revoke on close ------------------------------------------------------------------------ */

void etcd__start_revoke(etcd_disc *d) {
    etcd__lease_set_state(d, ETCD_LEASE_REVOKING, "closing");
    d->revoke_attempts++;
    d->revoke_req = etcd__call_start(d, RQ_REVOKE, d->cur, "/v3/lease/revoke", bt_etcd_body_lease(d->lease_id),
                                     ETCD_REVOKE_TIMEOUT_MS, revoke_done);
    if (!d->revoke_req) etcd__finish_close(d);
}

/* Revoking is bounded: each attempt ETCD_REVOKE_TIMEOUT_MS, at most ETCD_REVOKE_ATTEMPTS members.
 * A lease that could not be revoked expires by itself after its TTL. */
static void revoke_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    (void)body;
    d->revoke_req = NULL;
    if (res == BT_ETCD_OK || res == BT_ETCD_LEASE_GONE) {
        BT_INFO("etcd: lease %" PRIx64 " revoked: every key written with it is gone", (uint64_t)d->lease_id);
    } else if (res == BT_ETCD_AUTH && d->user && d->revoke_attempts < ETCD_REVOKE_ATTEMPTS) {
        /* The token expired: one fresh one, within the same bound. */
        d->revoke_attempts++;
        if (etcd__reauth_for_revoke(d)) return;
        etcd__finish_close(d);
        return;
    } else if (res == BT_ETCD_RETRY && d->revoke_attempts < ETCD_REVOKE_ATTEMPTS && d->revoke_attempts < d->neps) {
        etcd__ep_failed(d, r->ep, RQ_REVOKE, why);
        etcd__start_revoke(d);
        return;
    } else {
        BT_WARN("etcd: cannot revoke lease %" PRIx64 " (%s); its keys expire within %" PRId64 " s",
                (uint64_t)d->lease_id, why, d->lease_ttl_s);
    }
    d->lease_id = 0;
    etcd__lease_set_state(d, ETCD_LEASE_CLOSED, "revoked or given up");
    etcd__finish_close(d);
}

bool etcd__lease_registered(const etcd_disc *d) {
    if (d->owned.n == 0) return true;
    return d->lease_state == ETCD_LEASE_LIVE && !first_dirty(d);
}

void etcd__lease_free(etcd_disc *d) {
    bt_keyset_free(&d->owned);
    pdel *x;
    while ((x = TAILQ_FIRST(&d->dels)) != NULL) {
        TAILQ_REMOVE(&d->dels, x, link);
        free(x->key);
        free(x);
    }
}

