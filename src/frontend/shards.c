/* shards.c — a frontend on several cores: N event loops ("shards") in one process.
 *
 * `--threads N` runs N complete frontends side by side, one per thread, each with its own libuv
 * loop, its own listening socket on the same port (SO_REUSEPORT: the kernel spreads new
 * connections over them), its own discovery watch, its own connections to every worker and its
 * own event-plane subscription. A request lives its whole life on the shard that accepted its
 * connection: routing, migration, cancellation and the token path never cross threads, so the
 * hot path has no locks and the single-loop code is unchanged.
 *
 * What must be one answer for the whole process crosses threads here, by message passing:
 *  - each shard has a mailbox (a mutex-protected queue and a uv_async_t); fe_shard_post runs a
 *    function on another shard's loop;
 *  - a gather asks every other shard for a part (its metrics registry, or whether it holds the
 *    request an operator cancels), and the origin answers its HTTP request once all parts are in;
 *  - the limits on connections and concurrent requests are process-wide atomic counters;
 *  - SIGTERM/SIGINT/SIGHUP arrive on shard 0, which tells the others to begin the same shutdown.
 *
 * /metrics: each shard fills a registry snapshot (fe_metrics_collect) on its own loop; the origin
 * merges them series by series by each family's declared rule (src/frontend/metrics.c: counters
 * and histograms add up, so do gauges of what a shard holds; a connection state takes the
 * minimum; gauges every shard reads from the same source take the maximum) and renders once. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "frontend/fe.h"

struct fe_job {
    void (*fn)(fe *f, void *arg);
    void *arg;
    STAILQ_ENTRY(fe_job) link;
};

static void on_mail(uv_async_t *h) {
    fe *f = h->data;
    STAILQ_HEAD(, fe_job) jobs = STAILQ_HEAD_INITIALIZER(jobs);
    uv_mutex_lock(&f->mail_mu);
    STAILQ_CONCAT(&jobs, &f->mail_jobs);
    uv_mutex_unlock(&f->mail_mu);
    fe_job *j;
    while ((j = STAILQ_FIRST(&jobs)) != NULL) {
        STAILQ_REMOVE_HEAD(&jobs, link);
        j->fn(f, j->arg);
        free(j);
    }
}

void fe_mail_init(fe *f) {
    STAILQ_INIT(&f->mail_jobs);
    uv_mutex_init(&f->mail_mu);
    uv_async_init(f->loop, &f->mail, on_mail);
    f->mail.data = f;
    f->mail_inited = true;
}

bool fe_shard_post(fe *to, void (*fn)(fe *f, void *arg), void *arg) {
    fe_job *j = malloc(sizeof *j);
    if (!j) return false;
    j->fn = fn;
    j->arg = arg;
    uv_mutex_lock(&to->mail_mu);
    bool open = to->mail_inited && !to->mail_closed;
    if (open) {
        STAILQ_INSERT_TAIL(&to->mail_jobs, j, link);
        uv_async_send(&to->mail); /* under the lock: fe_mail_close cannot close the handle meanwhile */
    }
    uv_mutex_unlock(&to->mail_mu);
    if (!open) free(j);
    return open;
}

/* Last thing a shard does before closing its handles: no job is accepted afterwards, and the
 * ones already queued still run (each gather part must be answered, or its origin would wait). */
void fe_mail_close(fe *f) {
    if (!f->mail_inited) return;
    uv_mutex_lock(&f->mail_mu);
    f->mail_closed = true;
    uv_mutex_unlock(&f->mail_mu);
    on_mail(&f->mail);
    if (!uv_is_closing((uv_handle_t *)&f->mail)) uv_close((uv_handle_t *)&f->mail, NULL);
}

void fe_mail_destroy(fe *f) {
    if (f->mail_inited) uv_mutex_destroy(&f->mail_mu);
}

/* ---- gathers ---- */

typedef enum { G_METRICS, G_CANCEL } gather_kind;

struct fe_gather {
    gather_kind kind;
    fe *origin;
    bt_http_req *http;       /* origin thread only; NULL once the client is gone */
    LIST_ENTRY(fe_gather) link; /* origin->gathers while http is set, origin thread only */
    atomic_int pending;      /* parts not yet in, plus one held by the origin until it has posted all */
    int n;
    bt_metrics **parts;      /* G_METRICS: the registry shard i filled, on its own loop */
    atomic_bool found;       /* G_CANCEL: some shard held the request */
    char rid[80];
    bool kill;
    bool any_caller;               /* G_CANCEL: the operator's (caller ignored) */
    uint8_t caller[FE_CALLER_LEN]; /* G_CANCEL: only this caller's requests (fe_caller_tag) */
};

static void gather_free(fe_gather *g) {
    if (g->parts)
        for (int i = 0; i < g->n; i++) bt_metrics_free(g->parts[i]);
    free(g->parts);
    free(g);
}

static void gather_finish(fe *f, void *arg);

/* A part is in; the last one hands the gather back to its origin. If the origin has closed its
 * mailbox it is exiting and has no client left to answer: the gather is dropped. */
static void gather_part_done(fe_gather *g) {
    if (atomic_fetch_sub(&g->pending, 1) != 1) return;
    if (!fe_shard_post(g->origin, gather_finish, g)) gather_free(g);
}

static void gather_part(fe *f, void *arg) {
    fe_gather *g = arg;
    if (g->kind == G_METRICS) fe_metrics_collect(f, g->parts[f->shard]);
    else if (fe_request_cancel_by_id(f, g->rid, g->kill, g->any_caller ? NULL : g->caller))
        atomic_store(&g->found, true);
    gather_part_done(g);
}

static fe_gather *gather_new(fe *f, gather_kind kind, bt_http_req *http) {
    fe_gather *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->kind = kind;
    g->origin = f;
    g->http = http;
    g->n = f->grp->n;
    if (kind == G_METRICS) {
        g->parts = calloc((size_t)g->n, sizeof *g->parts);
        if (!g->parts) {
            free(g);
            return NULL;
        }
        for (int i = 0; i < g->n; i++)
            if (!(g->parts[i] = bt_metrics_new())) {
                gather_free(g);
                return NULL;
            }
    }
    return g;
}

/* Runs the origin's own part at once, posts the others, and answers when all are in. */
static void gather_start(fe *f, fe_gather *g) {
    LIST_INSERT_HEAD(&f->gathers, g, link);
    atomic_store(&g->pending, g->n); /* n - 1 other shards, plus the origin's hold */
    for (int i = 0; i < g->n; i++) {
        if (i == f->shard) continue;
        /* that shard has exited: its part will never come. Never the last part, since the
         * origin's hold is still in, so the gather stays alive for the rest of this loop. */
        if (!fe_shard_post(f->grp->shard[i], gather_part, g)) atomic_fetch_sub(&g->pending, 1);
    }
    gather_part(f, g); /* the origin's own part, and the release of its hold */
}

bool fe_gather_abort(fe *f, bt_http_req *http) {
    fe_gather *g;
    LIST_FOREACH(g, &f->gathers, link)
        if (g->http == http) {
            g->http = NULL;
            LIST_REMOVE(g, link);
            return true;
        }
    return false;
}

/* ---- merging the shards' registries ---- */

bt_status fe_metrics_merge(bt_metrics *const *parts, int n, bt_buf *out) {
    bt_metrics *all = bt_metrics_new();
    for (int i = 0; i < n; i++) {
        if (!parts[i]) bt_buf_fail(out, BT_ERR_NOMEM); /* its bt_metrics_new failed */
        bt_metrics_merge(all, parts[i]);
    }
    bt_status st = bt_metrics_render(all, out);
    bt_metrics_free(all);
    return st;
}

/* 200 with the text, or 500 if a registry could not be filled or the text did not fit
 * (bt_http_respond_buf checks the buffer once): never a partial exposition. */
static void respond_metrics(bt_http_req *http, bt_metrics *const *parts, int n) {
    bt_buf b;
    bt_buf_init(&b, (size_t)64 << 20);
    fe_metrics_merge(parts, n, &b);
    bt_http_respond_buf(http, 200, "text/plain; version=0.0.4", NULL, &b);
    bt_buf_free(&b);
}

static void gather_finish(fe *f, void *arg) {
    fe_gather *g = arg;
    (void)f;
    if (g->http) {
        LIST_REMOVE(g, link);
        if (g->kind == G_METRICS) {
            respond_metrics(g->http, g->parts, g->n);
        } else {
            fe_cancel_respond(g->http, g->rid, g->kill, atomic_load(&g->found));
        }
    }
    gather_free(g);
}

void fe_shards_metrics(fe *f, bt_http_req *http) {
    fe_gather *g = f->grp->n > 1 ? gather_new(f, G_METRICS, http) : NULL;
    if (!g) {
        bt_metrics *r = bt_metrics_new();
        if (r) fe_metrics_collect(f, r);
        respond_metrics(http, &r, 1);
        bt_metrics_free(r);
        return;
    }
    gather_start(f, g);
}

void fe_shards_cancel(fe *f, bt_http_req *http, const char *rid, bool kill, const uint8_t *caller) {
    fe_gather *g = f->grp->n > 1 ? gather_new(f, G_CANCEL, http) : NULL;
    if (!g) {
        fe_cancel_respond(http, rid, kill, fe_request_cancel_by_id(f, rid, kill, caller));
        return;
    }
    snprintf(g->rid, sizeof g->rid, "%s", rid);
    g->kill = kill;
    g->any_caller = caller == NULL;
    if (caller) memcpy(g->caller, caller, FE_CALLER_LEN);
    gather_start(f, g);
}

/* ---- broadcasts ---- */

typedef struct {
    char model[128];
    bool set_decode, set_prefill;
    double decode, prefill;
} threshold_msg;

static void apply_threshold(fe *f, void *arg) {
    threshold_msg *t = arg;
    fe_model *m = fe_model_get(f, t->model, true);
    if (m) {
        if (t->set_decode) m->decode_threshold = t->decode;
        if (t->set_prefill) m->prefill_threshold = t->prefill;
    }
    free(t);
}

void fe_shards_set_threshold(fe *f, const fe_model *m, bool set_decode, bool set_prefill) {
    for (int i = 0; i < f->grp->n; i++) {
        if (i == f->shard) continue;
        threshold_msg *t = calloc(1, sizeof *t);
        if (!t) continue;
        snprintf(t->model, sizeof t->model, "%s", m->name);
        t->set_decode = set_decode;
        t->set_prefill = set_prefill;
        t->decode = m->decode_threshold;
        t->prefill = m->prefill_threshold;
        if (!fe_shard_post(f->grp->shard[i], apply_threshold, t)) free(t);
    }
}

static void begin_shutdown(fe *f, void *arg) {
    uint64_t *started = arg;
    fe_shutdown_begin(f, *started);
    free(started);
}

void fe_shards_shutdown(fe *f) {
    for (int i = 0; i < f->grp->n; i++) {
        if (i == f->shard) continue;
        uint64_t *started = malloc(sizeof *started);
        if (!started) continue;
        *started = f->shutdown_started_ms;
        if (!fe_shard_post(f->grp->shard[i], begin_shutdown, started)) free(started);
    }
}

/* ---- the process-wide request limit ---- */

bool fe_reqs_reserve(fe *f) {
    size_t max = (size_t)f->o.max_requests;
    if (atomic_fetch_add(&f->grp->nreqs, 1) >= max) {
        atomic_fetch_sub(&f->grp->nreqs, 1);
        return false;
    }
    atomic_fetch_add(&f->grp->admitted, 1);
    return true;
}

void fe_reqs_release(fe *f) { atomic_fetch_sub(&f->grp->nreqs, 1); }
