/* etcd_watch.c — the etcd backend's watcher: it lists the prefix, then watches from the listed
 * revision + 1. A broken stream (its member died or went quiet, etcd went away, a compacted resume
 * revision, a lost event) is followed by a fresh listing on the next member that answers, diffed
 * against what the watcher was told so that it hears only what changed, and the watch goes on from
 * that listing's revision + 1. Resuming from the last revision seen would be cheaper, but it is
 * exact only on the same store: etcd recreated empty from the same flags has the same cluster id,
 * and once its writers registered again its revisions reach the old ones, so nothing in a watch
 * answer tells that every event below the resume revision was lost. A listing is exact on any store
 * for one range per break. While etcd cannot be reached the watcher reports nothing, so the caller
 * keeps its last view. A periodic probe on the watch's member catches a member that stopped
 * answering without closing the stream. The watcher's life is etcd_watch_state (etcd_internal.h),
 * changed only in etcd__watch_set_state. */
#include "discovery/etcd_internal.h"
#include "discovery/keyset.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

static const char *const watch_state_names[] = {"off", "waiting", "listing", "starting", "streaming", "closed"};

void etcd__watch_set_state(etcd_disc *d, etcd_watch_state s, const char *why) {
    ETCD_SET_STATE(d->watch_state, s, watch_state_names, "watch", why);
}

static void list_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);
static void probe_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why);

static int kv_cmp(const void *a, const void *b) {
    return strcmp(((const bt_etcd_kv *)a)->key, ((const bt_etcd_kv *)b)->key);
}

static kent *known_find(etcd_disc *d, const char *key, size_t *pos) {
    size_t lo = 0, hi = d->nknown;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(d->known[mid].key, key);
        if (c == 0) {
            if (pos) *pos = mid;
            return &d->known[mid];
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    if (pos) *pos = lo;
    return NULL;
}

static void known_remove(etcd_disc *d, size_t pos) {
    free(d->known[pos].key);
    free(d->known[pos].text);
    memmove(&d->known[pos], &d->known[pos + 1], (d->nknown - pos - 1) * sizeof *d->known);
    d->nknown--;
}

/* Takes key and text. */
static bool known_set(etcd_disc *d, char *key, char *text, size_t len) {
    size_t pos;
    kent *k = known_find(d, key, &pos);
    if (k) {
        free(key);
        free(k->text);
        k->text = text;
        k->len = len;
        return true;
    }
    if (d->nknown == d->capknown) {
        size_t nc = d->capknown ? d->capknown * 2 : 16;
        kent *nk = realloc(d->known, nc * sizeof *nk);
        if (!nk) {
            free(key);
            free(text);
            return false;
        }
        d->known = nk;
        d->capknown = nc;
    }
    memmove(&d->known[pos + 1], &d->known[pos], (d->nknown - pos) * sizeof *d->known);
    d->known[pos] = (kent){key, text, len};
    d->nknown++;
    return true;
}

static void known_free(kent *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(v[i].key);
        free(v[i].text);
    }
    free(v);
}

/* Parses a value; NULL (with a warning) if it is not JSON: such a key counts as absent. */
static json_t *parse_value(const char *key, const char *text, size_t len) {
    json_error_t je;
    json_t *v = json_loadb(text, len, JSON_DECODE_ANY, &je);
    if (!v) BT_WARN("etcd: key %s is not valid JSON (%s); ignored", key, je.text);
    return v;
}

/* Applies one put or delete seen on the stream; false if the handle was closed by the callback.
 * A value that is not JSON counts as a delete; a delete of a key the watcher never had is dropped. */
static bool apply_event(etcd_disc *d, bt_etcd_kv *e) {
    size_t pos;
    bool had = known_find(d, e->key, &pos) != NULL;
    json_t *v = e->is_delete ? NULL : parse_value(e->key, e->value, e->vlen);
    if (v) {
        char *key = etcd__strdup(e->key);
        if (key) known_set(d, key, e->value, e->vlen);
        else free(e->value);
        e->value = NULL;
        if (d->w.on_put) d->w.on_put(d->wud, e->key, v);
        json_decref(v);
    } else if (had) {
        known_remove(d, pos);
        if (d->w.on_delete) d->w.on_delete(d->wud, e->key);
    }
    return !d->closing;
}

static void on_watch_timer(uv_timer_t *t) { etcd__watch_step(t->data); }

/* The stream (or list) failed: try again, resuming, after the backoff. */
static void watch_retry(etcd_disc *d, uint64_t delay) {
    if (d->closing) return;
    etcd__watch_set_state(d, ETCD_WATCH_WAITING, delay ? "retrying after a backoff" : "starting");
    uv_timer_start(&d->watch_timer, on_watch_timer, delay, 0);
}

/* Ends the current stream and schedules its resumption. */
static void watch_broke(etcd_disc *d, bool member_failed, const char *why) {
    ereq *r = d->watch_req;
    size_t ep = r ? r->ep : d->cur;
    if (r) {
        etcd__call_abort(d, r);
        d->watch_req = NULL;
    }
    if (d->probe_req) {
        etcd__call_abort(d, d->probe_req);
        d->probe_req = NULL;
    }
    if (d->watch_state == ETCD_WATCH_STREAMING) {
        d->watch_was_up = true;
        d->watch_broken_ms = bt_now_ms();
        BT_WARN("etcd: watch on %s via %s broke (%s); listing it again when etcd answers", d->prefix, d->eps[ep], why);
    }
    /* Whatever the store went through meanwhile (events missed, compacted, recreated empty,
     * restored from a backup), only a listing tells what it holds now: see the top of the file. */
    d->need_list = true;
    d->watch_fails++;
    if (member_failed) etcd__ep_failed(d, ep, RQ_WATCH, why);
    watch_retry(d, etcd__backoff_ms(d, d->watch_fails, ETCD_BACKOFF_MAX_MS));
}

void etcd__watch_step(etcd_disc *d) {
    if (d->closing || d->watch_state == ETCD_WATCH_OFF || d->list_req || d->watch_req || uv_is_active((uv_handle_t *)&d->watch_timer))
        return;
    if (!etcd__ensure_auth(d)) return;
    if (d->need_list) {
        d->list_req = etcd__call_start(d, RQ_LIST, d->cur, "/v3/kv/range", bt_etcd_body_range(d->prefix, false),
                                       ETCD_REQUEST_TIMEOUT_MS, list_done);
        if (d->list_req) etcd__watch_set_state(d, ETCD_WATCH_LISTING, "a listing is needed");
        else watch_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    d->start_rev = d->last_rev + 1;
    d->watch_req = etcd__call_start(d, RQ_WATCH, d->cur, "/v3/watch", bt_etcd_body_watch(d->prefix, d->start_rev),
                                    0, NULL);
    if (d->watch_req) etcd__watch_set_state(d, ETCD_WATCH_STARTING, "stream requested");
    else watch_retry(d, ETCD_FAIL_DELAY_MS);
}

/* One key of the watcher's last view (o) and/or a fresh listing (n), in key order: a key gone is
 * deleted, a new or changed one put (vals holds the listing's parsed values, parallel to nv). */
struct list_diff {
    etcd_disc *d;
    kent *nv;
    json_t **vals;
    size_t puts, deletes;
};

static bool list_visit(void *ud, void *old_entry, void *new_entry) {
    struct list_diff *ld = ud;
    etcd_disc *d = ld->d;
    kent *o = old_entry, *n = new_entry;
    if (!n) {
        ld->deletes++;
        if (d->w.on_delete) d->w.on_delete(d->wud, o->key);
    } else if (!o || o->len != n->len || memcmp(o->text, n->text, n->len) != 0) {
        ld->puts++;
        if (d->w.on_put) d->w.on_put(d->wud, n->key, ld->vals[n - ld->nv]);
    }
    return !d->closing; /* a callback may close the handle: stop telling */
}

/* A fresh listing: tell the watcher what changed since its last view, in key order. */
static void list_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    d->list_req = NULL;
    etcd__watch_set_state(d, ETCD_WATCH_WAITING, "listing answered");
    bt_etcd_kv *kvs = NULL;
    size_t n = 0;
    int64_t rev = 0;
    if (res == BT_ETCD_OK && bt_etcd_parse_range(body, &kvs, &n, &rev) != BT_OK) {
        res = BT_ETCD_FAIL;
        why = "malformed range answer";
    }
    if (res != BT_ETCD_OK) {
        d->watch_fails++;
        if (res == BT_ETCD_AUTH) etcd__token_rejected(d, r, why);
        else if (res == BT_ETCD_RETRY) etcd__ep_failed(d, r->ep, RQ_LIST, why);
        else BT_WARN("etcd: listing %s failed: %s", d->prefix, why);
        watch_retry(d, res == BT_ETCD_FAIL ? ETCD_FAIL_DELAY_MS : etcd__backoff_ms(d, d->watch_fails, ETCD_BACKOFF_MAX_MS));
        return;
    }
    /* The new view: valid JSON values only, sorted by key. */
    kent *nv = calloc(n ? n : 1, sizeof *nv);
    json_t **vals = calloc(n ? n : 1, sizeof *vals);
    size_t nn = 0;
    if (!nv || !vals) {
        free(nv);
        free(vals);
        bt_etcd_kvs_free(kvs, n);
        watch_retry(d, ETCD_FAIL_DELAY_MS);
        return;
    }
    if (n) qsort(kvs, n, sizeof *kvs, kv_cmp);
    for (size_t i = 0; i < n; i++) {
        json_t *v = parse_value(kvs[i].key, kvs[i].value, kvs[i].vlen);
        if (!v) continue;
        vals[nn] = v;
        nv[nn++] = (kent){kvs[i].key, kvs[i].value, kvs[i].vlen};
        kvs[i].key = kvs[i].value = NULL;
    }
    bt_etcd_kvs_free(kvs, n);
    kent *ov = d->known;
    size_t on = d->nknown;
    d->known = nv;
    d->nknown = d->capknown = nn;
    /* Another store (recreated, restored from a backup, another cluster) is said so in the log;
     * the listing corrects the view either way, so this is evidence for the reader only. Each
     * sign can miss: a store recreated from the same flags keeps its cluster id, and its
     * revision and raft term can reach the old ones. */
    const char *cid = bt_etcd_cluster_id(body);
    int64_t term = 0;
    bt_etcd_json_i64(json_object_get(json_object_get(body, "header"), "raft_term"), &term);
    const char *other = NULL;
    if (d->listed && cid[0] && d->cluster_id[0] && strcmp(cid, d->cluster_id) != 0) other = "a new cluster id";
    else if (d->listed && rev < d->last_rev) other = "its revision went back";
    else if (d->listed && term > 0 && term < d->raft_term) other = "its raft term went back";
    if (other)
        BT_WARN("etcd: %s is another store (cluster %s at revision %" PRId64 "; we had cluster %s at revision %" PRId64
                "; raft term %" PRId64 ", we had %" PRId64 "): %s",
                d->eps[r->ep], cid[0] ? cid : "?", rev, d->cluster_id[0] ? d->cluster_id : "?", d->last_rev, term,
                d->raft_term, other);
    bool again = d->listed;
    int64_t prev_rev = d->last_rev;
    size_t ep = r->ep;
    d->listed = true;
    d->last_rev = rev;
    d->raft_term = term;
    d->need_list = false;
    snprintf(d->cluster_id, sizeof d->cluster_id, "%s", cid);
    BT_DEBUG("etcd: listed %zu key(s) under %s at revision %" PRId64 " via %s", nn, d->prefix, rev, d->eps[r->ep]);
    etcd__ep_ok(d, r->ep);
    struct list_diff ld = {d, nv, vals, 0, 0};
    bt_view_diff(ov, on, nv, nn, sizeof *nv, list_visit, &ld);
    if (again && !d->closing)
        BT_INFO("etcd: listed %s again via %s: %zu key(s) at revision %" PRId64 " (we had revision %" PRId64
                "); %zu new or changed, %zu gone",
                d->prefix, d->eps[ep], nn, rev, prev_rev, ld.puts, ld.deletes);
    for (size_t k = 0; k < nn; k++) json_decref(vals[k]);
    free(vals);
    known_free(ov, on);
    etcd__watch_step(d);
}

/* Handles one stream message; false when the stream is over (or the handle closed). */
static bool watch_msg(etcd_disc *d, const char *text, size_t len) {
    ereq *r = d->watch_req;
    bt_etcd_wmsg m;
    if (bt_etcd_parse_watch_msg(text, len, &m) != BT_OK) {
        BT_WARN("etcd: unreadable watch message (%.*s…); restarting the watch", (int)(len > 80 ? 80 : len), text);
        watch_broke(d, false, "unreadable message");
        return false;
    }
    bool go_on = true;
    switch (m.kind) {
    case BT_ETCD_WMSG_CREATED:
        etcd__ep_ok(d, r->ep);
        if ((m.cluster_id[0] && d->cluster_id[0] && strcmp(m.cluster_id, d->cluster_id) != 0) ||
            m.header_revision + 1 < d->start_rev) {
            /* Another store (a new cluster, or one restored from a backup): revisions from the old
             * one mean nothing there. Only a fresh listing is exact. */
            BT_WARN("etcd: %s is another store (cluster %s at revision %" PRId64 "; we had cluster %s at revision "
                    "%" PRId64 "); listing again",
                    d->eps[r->ep], m.cluster_id[0] ? m.cluster_id : "?", m.header_revision,
                    d->cluster_id[0] ? d->cluster_id : "?", d->start_rev - 1);
            d->need_list = true;
            d->watch_fails = 0;
            watch_broke(d, false, "the store was replaced");
            go_on = false;
            break;
        }
        etcd__watch_set_state(d, ETCD_WATCH_STREAMING, "created");
        d->watch_fails = 0;
        if (d->watch_was_up)
            BT_INFO("etcd: watch on %s resumed from revision %" PRId64 " via %s after %.1f s", d->prefix, d->start_rev,
                    d->eps[r->ep], (double)(bt_now_ms() - d->watch_broken_ms) / 1000.0);
        else BT_INFO("etcd: watching %s from revision %" PRId64 " via %s", d->prefix, d->start_rev, d->eps[r->ep]);
        break;
    case BT_ETCD_WMSG_EVENTS:
        for (size_t i = 0; i < m.nevents && go_on; i++) {
            if (m.events[i].mod_revision > d->last_rev) d->last_rev = m.events[i].mod_revision;
            go_on = apply_event(d, &m.events[i]);
        }
        break;
    case BT_ETCD_WMSG_PROGRESS:
        break;
    case BT_ETCD_WMSG_CANCELED:
        if (m.compact_revision > 0) {
            BT_WARN("etcd: revision %" PRId64 " of %s was compacted (compact revision %" PRId64 "); listing again",
                    d->start_rev, d->prefix, m.compact_revision);
            d->need_list = true;
            d->watch_fails = 0;
            watch_broke(d, false, "compacted");
        } else if (bt_etcd_reason_is_auth(m.reason)) {
            etcd__token_rejected(d, r, m.reason);
            watch_broke(d, false, m.reason);
        } else {
            watch_broke(d, true, m.reason);
        }
        go_on = false;
        break;
    case BT_ETCD_WMSG_ERROR:
        watch_broke(d, true, m.reason);
        go_on = false;
        break;
    }
    bt_etcd_wmsg_free(&m);
    return go_on && !d->closing;
}

void etcd__watch_drain(etcd_disc *d) {
    ereq *r = d->watch_req;
    while (r && r == d->watch_req && !d->closing) {
        char *start = r->resp.data + r->parsed;
        size_t avail = r->resp.len - r->parsed;
        char *nl = avail ? memchr(start, '\n', avail) : NULL;
        if (!nl) break;
        size_t len = (size_t)(nl - start);
        r->parsed += len + 1;
        if (len == 0 || (len == 1 && start[0] == '\r')) continue;
        if (!watch_msg(d, start, len)) return;
    }
    if (r && r == d->watch_req && r->parsed > 0 && r->parsed == r->resp.len) {
        bt_buf_reset(&r->resp);
        r->parsed = 0;
    } else if (r && r == d->watch_req && r->parsed > (1u << 16)) {
        bt_buf_consume(&r->resp, r->parsed);
        r->parsed = 0;
    }
}

void etcd__watch_ended(etcd_disc *d, ereq *r, CURLcode cc) {
    long http = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &http);
    bool overflow = r->overflow;
    char why[300];
    if (overflow) snprintf(why, sizeof why, "a message over %u bytes", ETCD_MAX_STREAM_MSG);
    else if (cc != CURLE_OK) snprintf(why, sizeof why, "%s", r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
    else snprintf(why, sizeof why, "stream closed by the server (HTTP %ld)", http);
    etcd__watch_drain(d);
    /* Whatever followed the last newline may be a final message (an error without newline). */
    if (r == d->watch_req && r->resp.len > r->parsed && !d->closing) {
        size_t len = r->resp.len - r->parsed;
        char *start = r->resp.data + r->parsed;
        r->parsed = r->resp.len;
        if (!watch_msg(d, start, len)) return; /* it ended the stream itself; r is gone */
    }
    if (r != d->watch_req || d->closing) return;
    if (overflow) d->need_list = true; /* events were lost: only a listing is exact again */
    watch_broke(d, !overflow, why);
}

static void on_probe_timer(uv_timer_t *t) {
    etcd_disc *d = t->data;
    if (d->closing || !d->watch_req || d->probe_req) return;
    d->probe_req = etcd__call_start(d, RQ_PROBE, d->watch_req->ep, "/v3/kv/range",
                                    bt_etcd_body_range(d->prefix, true), ETCD_PROBE_TIMEOUT_MS, probe_done);
}

static void probe_done(etcd_disc *d, ereq *r, bt_etcd_result res, const json_t *body, const char *why) {
    (void)body;
    d->probe_req = NULL;
    if (!d->watch_req || d->watch_req->ep != r->ep) return;
    if (res == BT_ETCD_AUTH) {
        etcd__token_rejected(d, r, why);
        etcd__ensure_auth(d);
        return;
    }
    if (res != BT_ETCD_RETRY) return;
    /* The member holding our stream does not answer (stopped, cut off, or without a leader): the
     * stream may be silent rather than closed. Move it. */
    char msg[300];
    snprintf(msg, sizeof msg, "member does not answer: %.250s", why);
    watch_broke(d, true, msg);
}

bt_status etcd__watch(bt_discovery *base, const char *prefix, const bt_discovery_watcher *w, void *ud) {
    etcd_disc *d = (etcd_disc *)base;
    if (d->closing || d->watch_state != ETCD_WATCH_OFF) return BT_ERR_INVALID;
    d->prefix = etcd__strdup(prefix);
    if (!d->prefix) return BT_ERR_NOMEM;
    d->w = *w;
    d->wud = ud;
    d->need_list = true;
    uv_timer_start(&d->probe_timer, on_probe_timer, ETCD_PROBE_INTERVAL_MS, ETCD_PROBE_INTERVAL_MS);
    /* Started from the loop, so that no callback can run inside this call. */
    watch_retry(d, 0);
    return BT_OK;
}

void etcd__watch_free(etcd_disc *d) {
    known_free(d->known, d->nknown);
    d->known = NULL;
    d->nknown = d->capknown = 0;
}
