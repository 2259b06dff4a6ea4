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
 *  - a gather asks every other shard for a part (its /metrics text, or whether it holds the
 *    request an operator cancels), and the origin answers its HTTP request once all parts are in;
 *  - the limits on connections and concurrent requests are process-wide atomic counters;
 *  - SIGTERM/SIGINT arrive on shard 0, which tells the others to begin the same shutdown.
 *
 * The /metrics text of the shards is merged by series: counters and histograms add up; gauges
 * that count things held by a shard (in-flight requests, connections, streams on a worker, and
 * disconnected clients, a gauge as in Dynamo) add up; a connection state takes the minimum;
 * gauges every shard reads from the same source (a worker's reported load, the number of known
 * workers) take the maximum. */
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
    bt_buf *parts;           /* G_METRICS: the /metrics text of shard i */
    atomic_bool found;       /* G_CANCEL: some shard held the request */
    char rid[80];
    bool kill;
};

static void gather_free(fe_gather *g) {
    if (g->parts)
        for (int i = 0; i < g->n; i++) bt_buf_free(&g->parts[i]);
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
    if (g->kind == G_METRICS) fe_metrics_render(f, &g->parts[f->shard]);
    else if (fe_request_cancel_by_id(f, g->rid, g->kill)) atomic_store(&g->found, true);
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
        for (int i = 0; i < g->n; i++) bt_buf_init(&g->parts[i], (size_t)16 << 20);
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

/* ---- merging /metrics text ---- */

typedef enum { M_SUM, M_MIN, M_MAX } merge_rule;

typedef struct {
    char *key; /* "name{labels}" */
    double v;
} sample;

typedef struct {
    char *head;    /* its # HELP / # TYPE lines */
    merge_rule rule;
    sample *s;
    size_t n, cap;
} family;

typedef struct {
    family *f;
    size_t n, cap;
} exposition;

static merge_rule rule_for(const char *name, const char *type) {
    if (strcmp(type, "gauge") != 0) return M_SUM; /* counters, histograms */
    static const char *summed[] = {"dynamo_frontend_inflight_requests", "baton_frontend_http_connections",
                                   "baton_frontend_worker_inflight", "dynamo_frontend_disconnected_clients"};
    for (size_t i = 0; i < sizeof summed / sizeof summed[0]; i++)
        if (strcmp(name, summed[i]) == 0) return M_SUM;
    if (strcmp(name, "baton_frontend_event_plane_connected") == 0) return M_MIN;
    return M_MAX;
}

static family *family_get(exposition *e, const char *head, size_t hlen, const char *name, const char *type) {
    for (size_t i = 0; i < e->n; i++)
        if (strlen(e->f[i].head) == hlen && memcmp(e->f[i].head, head, hlen) == 0) return &e->f[i];
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        family *p = realloc(e->f, cap * sizeof *p);
        if (!p) return NULL;
        e->f = p;
        e->cap = cap;
    }
    family *f = &e->f[e->n];
    memset(f, 0, sizeof *f);
    f->head = strndup(head, hlen);
    if (!f->head) return NULL;
    f->rule = rule_for(name, type);
    e->n++;
    return f;
}

static void family_add(family *f, const char *key, size_t klen, double v) {
    for (size_t i = 0; i < f->n; i++)
        if (strlen(f->s[i].key) == klen && memcmp(f->s[i].key, key, klen) == 0) {
            double *x = &f->s[i].v;
            if (f->rule == M_SUM) *x += v;
            else if (f->rule == M_MIN) *x = v < *x ? v : *x;
            else *x = v > *x ? v : *x;
            return;
        }
    if (f->n == f->cap) {
        size_t cap = f->cap ? f->cap * 2 : 16;
        sample *p = realloc(f->s, cap * sizeof *p);
        if (!p) return;
        f->s = p;
        f->cap = cap;
    }
    f->s[f->n].key = strndup(key, klen);
    if (!f->s[f->n].key) return;
    f->s[f->n].v = v;
    f->n++;
}

/* Adds one shard's text. A family is the run of lines from a "# TYPE" line (and the "# HELP"
 * before it) to the next comment line; every sample line is "key value". */
static void exposition_add(exposition *e, const char *text, size_t len) {
    family *cur = NULL;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if (*p == '#') {
            const char *head = p, *t = p;
            if (le - p > 7 && memcmp(p, "# HELP ", 7) == 0 && nl) t = nl + 1; /* HELP then TYPE */
            const char *tl = memchr(t, '\n', (size_t)(end - t));
            if (!tl) tl = end;
            char name[160] = "", type[32] = "";
            if (sscanf(t, "# TYPE %159s %31s", name, type) == 2) cur = family_get(e, head, (size_t)(tl - head), name, type);
            else cur = NULL;
            p = tl < end ? tl + 1 : end;
            continue;
        }
        const char *sp = le;
        while (sp > p && sp[-1] != ' ') sp--;
        if (cur && sp > p + 1) family_add(cur, p, (size_t)(sp - 1 - p), strtod(sp, NULL));
        p = le < end ? le + 1 : end;
    }
}

static void exposition_render(exposition *e, bt_buf *out) {
    for (size_t i = 0; i < e->n; i++) {
        family *f = &e->f[i];
        bt_buf_append_str(out, f->head);
        bt_buf_append_str(out, "\n");
        for (size_t k = 0; k < f->n; k++) {
            double v = f->s[k].v;
            if (v > -9e15 && v < 9e15 && v == (double)(long long)v)
                bt_buf_appendf(out, "%s %lld\n", f->s[k].key, (long long)v);
            else bt_buf_appendf(out, "%s %.6f\n", f->s[k].key, v);
        }
    }
}

static void exposition_free(exposition *e) {
    for (size_t i = 0; i < e->n; i++) {
        for (size_t k = 0; k < e->f[i].n; k++) free(e->f[i].s[k].key);
        free(e->f[i].s);
        free(e->f[i].head);
    }
    free(e->f);
}

void fe_metrics_merge(const bt_buf *parts, int n, bt_buf *out) {
    exposition e = {0};
    for (int i = 0; i < n; i++)
        if (parts[i].data) exposition_add(&e, parts[i].data, parts[i].len);
    exposition_render(&e, out);
    exposition_free(&e);
}

static void gather_finish(fe *f, void *arg) {
    fe_gather *g = arg;
    (void)f;
    if (g->http) {
        LIST_REMOVE(g, link);
        if (g->kind == G_METRICS) {
            bt_buf b;
            bt_buf_init(&b, (size_t)64 << 20);
            fe_metrics_merge(g->parts, g->n, &b);
            bt_http_respond_buf(g->http, 200, "text/plain; version=0.0.4", NULL, &b);
            bt_buf_free(&b);
        } else {
            fe_cancel_respond(g->http, g->rid, g->kill, atomic_load(&g->found));
        }
    }
    gather_free(g);
}

void fe_shards_metrics(fe *f, bt_http_req *http) {
    fe_gather *g = f->grp->n > 1 ? gather_new(f, G_METRICS, http) : NULL;
    if (!g) {
        bt_buf b;
        bt_buf_init(&b, (size_t)16 << 20);
        fe_metrics_render(f, &b);
        bt_http_respond_buf(http, 200, "text/plain; version=0.0.4", NULL, &b);
        bt_buf_free(&b);
        return;
    }
    gather_start(f, g);
}

void fe_shards_cancel(fe *f, bt_http_req *http, const char *rid, bool kill) {
    fe_gather *g = f->grp->n > 1 ? gather_new(f, G_CANCEL, http) : NULL;
    if (!g) {
        fe_cancel_respond(http, rid, kill, fe_request_cancel_by_id(f, rid, kill));
        return;
    }
    snprintf(g->rid, sizeof g->rid, "%s", rid);
    g->kill = kill;
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
