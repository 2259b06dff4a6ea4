/* metrics.c — the metrics registry (metrics.h): families and their samples, the merge rules, and
 * the one Prometheus text renderer of the frontend and the worker.
 *
 * A family's samples are kept in the order they were added and found by a hash of their label
 * string (bt_map, with a chain for the rare hash collision), so that adding or merging N samples
 * costs O(N), which matters for the per-worker families of a frontend that knows a thousand
 * workers. Label strings are built escaped, once, when a sample is first added. Nothing here is
 * called on a token's path. */
#include "common/metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "common/map.h"

/* A label string ('k="v",k2="v2"', escaped) longer than this is an error, not a truncation: a
 * cut label would merge two series into one. */
#define METRICS_LABELS_CAP 4096

typedef struct sample {
    char *labels; /* escaped, without braces; "" for none */
    uint64_t hash;
    double v;           /* counters and gauges */
    bt_hist *h;         /* histograms */
    struct sample *dup; /* the next sample whose labels hash the same */
    STAILQ_ENTRY(sample) link;
} sample;

struct bt_metric_family {
    bt_metrics *r;
    bt_metric_def def; /* a copy; name and help are owned copies, the buckets are static */
    bt_map by_hash;    /* hash of the label string -> first sample with that hash */
    STAILQ_HEAD(, sample) samples;
    STAILQ_ENTRY(bt_metric_family) link;
};

struct bt_metrics {
    STAILQ_HEAD(, bt_metric_family) families;
    bt_status err;
};

bt_metrics *bt_metrics_new(void) {
    bt_metrics *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    STAILQ_INIT(&r->families);
    return r;
}

void bt_metrics_free(bt_metrics *r) {
    if (!r) return;
    bt_metric_family *f;
    while ((f = STAILQ_FIRST(&r->families)) != NULL) {
        STAILQ_REMOVE_HEAD(&r->families, link);
        sample *s;
        while ((s = STAILQ_FIRST(&f->samples)) != NULL) {
            STAILQ_REMOVE_HEAD(&f->samples, link);
            free(s->labels);
            free(s->h);
            free(s);
        }
        bt_map_free(&f->by_hash);
        free((char *)f->def.name);
        free((char *)f->def.help);
        free(f);
    }
    free(r);
}

bt_status bt_metrics_status(const bt_metrics *r) { return r ? r->err : BT_ERR_NOMEM; }

static void fail(bt_metrics *r, bt_status st) {
    if (r->err == BT_OK) r->err = st;
}

bt_metric_family *bt_metrics_family(bt_metrics *r, const bt_metric_def *def) {
    if (!r) return NULL;
    bt_metric_family *f;
    STAILQ_FOREACH(f, &r->families, link)
    if (strcmp(f->def.name, def->name) == 0) {
        if (f->def.type == def->type && f->def.buckets == def->buckets) return f;
        fail(r, BT_ERR_INVALID);
        return NULL;
    }
    if (def->type == BT_METRIC_HISTOGRAM && (!def->buckets || def->buckets->n > BT_HIST_MAX_BUCKETS)) {
        fail(r, BT_ERR_INVALID);
        return NULL;
    }
    f = calloc(1, sizeof *f);
    if (!f) {
        fail(r, BT_ERR_NOMEM);
        return NULL;
    }
    f->r = r;
    f->def = *def;
    f->def.name = strdup(def->name);
    f->def.help = strdup(def->help);
    if (!f->def.name || !f->def.help) {
        free((char *)f->def.name);
        free((char *)f->def.help);
        free(f);
        fail(r, BT_ERR_NOMEM);
        return NULL;
    }
    bt_map_init(&f->by_hash);
    STAILQ_INIT(&f->samples);
    STAILQ_INSERT_TAIL(&r->families, f, link);
    return f;
}

/* FNV-1a, never 0 (bt_map's empty key). */
static uint64_t labels_hash(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h ? h : 1;
}

static void combine(bt_metric_merge rule, double *x, double v) {
    if (rule == BT_MERGE_SUM) *x += v;
    else if (rule == BT_MERGE_MIN) *x = v < *x ? v : *x;
    else *x = v > *x ? v : *x;
}

/* The sample of f with these labels, added (zero) if f has none yet; NULL on failure (recorded). */
static sample *sample_get(bt_metric_family *f, const char *labels, bool *fresh) {
    uint64_t hash = labels_hash(labels);
    sample *first = bt_map_get(&f->by_hash, hash);
    for (sample *s = first; s; s = s->dup)
        if (strcmp(s->labels, labels) == 0) {
            *fresh = false;
            return s;
        }
    sample *s = calloc(1, sizeof *s);
    if (!s) goto fail;
    s->labels = strdup(labels);
    if (!s->labels) goto fail;
    if (f->def.type == BT_METRIC_HISTOGRAM && !(s->h = calloc(1, sizeof *s->h))) goto fail;
    s->hash = hash;
    if (!first && bt_map_put(&f->by_hash, hash, s) != 0) goto fail;
    if (first) { /* behind the first, which the map keeps pointing at */
        s->dup = first->dup;
        first->dup = s;
    }
    STAILQ_INSERT_TAIL(&f->samples, s, link);
    *fresh = true;
    return s;
fail:
    if (s) {
        free(s->labels);
        free(s->h);
        free(s);
    }
    fail(f->r, BT_ERR_NOMEM);
    return NULL;
}

/* Builds 'k="v",...' from the (name, value) pairs; false (recorded) if it would exceed the cap. */
static bool labels_build(bt_metric_family *f, va_list ap, bt_buf *b) {
    const char *k;
    char esc[2 * 256 + 1];
    while ((k = va_arg(ap, const char *)) != NULL) {
        const char *v = va_arg(ap, const char *);
        size_t vlen = strlen(v);
        char *e = vlen < 256 ? esc : malloc(2 * vlen + 1);
        if (!e) {
            fail(f->r, BT_ERR_NOMEM);
            return false;
        }
        bt_prom_escape(v, e, vlen < 256 ? sizeof esc : 2 * vlen + 1);
        bt_buf_appendf(b, "%s%s=\"%s\"", b->len ? "," : "", k, e);
        if (e != esc) free(e);
    }
    if (bt_buf_status(b) != BT_OK) {
        fail(f->r, bt_buf_status(b));
        return false;
    }
    bt_buf_append(b, "", 1); /* NUL-terminated, for sample_get */
    return bt_buf_status(b) == BT_OK;
}

static void add_value(bt_metric_family *f, const char *labels, double v) {
    bool fresh;
    sample *s = sample_get(f, labels, &fresh);
    if (!s) return;
    if (fresh) s->v = v;
    else combine(f->def.merge, &s->v, v);
}

/* Histograms always add up: bucket counts, sum and count. */
static void add_hist(bt_metric_family *f, const char *labels, const bt_hist *h) {
    bool fresh;
    sample *s = sample_get(f, labels, &fresh);
    if (!s) return;
    for (size_t i = 0; i <= f->def.buckets->n; i++) s->h->counts[i] += h->counts[i];
    s->h->sum += h->sum;
    s->h->n += h->n;
}

/* One sample of f (h for a histogram, else v), its labels from the (name, value) pairs in ap. */
static void add_sample(bt_metric_family *f, double v, const bt_hist *h, va_list ap) {
    if (!f || (f->def.type == BT_METRIC_HISTOGRAM) != (h != NULL)) return;
    bt_buf b;
    bt_buf_init(&b, METRICS_LABELS_CAP);
    if (labels_build(f, ap, &b)) {
        if (h) add_hist(f, b.data, h);
        else add_value(f, b.data, v);
    }
    bt_buf_free(&b);
}

void bt_metrics_add(bt_metric_family *f, double v, ...) {
    va_list ap;
    va_start(ap, v);
    add_sample(f, v, NULL, ap);
    va_end(ap);
}

void bt_metrics_add_hist(bt_metric_family *f, const bt_hist *h, ...) {
    va_list ap;
    va_start(ap, h);
    add_sample(f, 0, h, ap);
    va_end(ap);
}

void bt_metrics_counter_value(bt_metrics *r, const char *name, const char *help, double v) {
    bt_metrics_add(bt_metrics_counter(r, name, help), v, NULL);
}

void bt_metrics_gauge_value(bt_metrics *r, const char *name, bt_metric_merge merge, const char *help, double v) {
    bt_metrics_add(bt_metrics_gauge(r, name, merge, help), v, NULL);
}

void bt_metrics_merge(bt_metrics *dst, const bt_metrics *src) {
    if (!dst || !src) return;
    if (src->err != BT_OK) fail(dst, src->err);
    const bt_metric_family *sf;
    STAILQ_FOREACH(sf, &src->families, link) {
        bt_metric_family *df = bt_metrics_family(dst, &sf->def);
        if (!df) continue;
        const sample *s;
        STAILQ_FOREACH(s, &sf->samples, link) {
            if (s->h) add_hist(df, s->labels, s->h);
            else add_value(df, s->labels, s->v);
        }
    }
}

/* Integers as integers; other values with up to nine decimals (latencies of a microsecond and
 * less), trailing zeros dropped. */
static void value(bt_buf *b, double v) {
    if (v > -9e15 && v < 9e15 && v == (double)(long long)v) {
        bt_buf_appendf(b, "%lld", (long long)v);
        return;
    }
    char s[64];
    int n = snprintf(s, sizeof s, v > -9e15 && v < 9e15 ? "%.9f" : "%.17g", v);
    if (n > 0 && (size_t)n < sizeof s && strchr(s, '.') && !strchr(s, 'e')) {
        while (n > 1 && s[n - 1] == '0') s[--n] = '\0';
        if (s[n - 1] == '.') s[--n] = '\0';
    }
    bt_buf_append_str(b, s);
}

/* name{labels} or name{labels,extra} or name{extra} or name */
static void series(bt_buf *b, const char *name, const char *suffix, const char *labels, const char *extra) {
    bool any = labels[0] || extra;
    bt_buf_appendf(b, "%s%s%s%s%s%s%s ", name, suffix, any ? "{" : "", labels, labels[0] && extra ? "," : "",
                   extra ? extra : "", any ? "}" : "");
}

static void render_hist(bt_buf *b, const bt_metric_family *f, const sample *s) {
    const char *name = f->def.name;
    const bt_hist_buckets *bk = f->def.buckets;
    uint64_t cum = 0;
    char le[48];
    for (size_t i = 0; i <= bk->n; i++) {
        cum += s->h->counts[i];
        if (i < bk->n) snprintf(le, sizeof le, "le=\"%g\"", bk->le[i]);
        else snprintf(le, sizeof le, "le=\"+Inf\"");
        series(b, name, "_bucket", s->labels, le);
        bt_buf_appendf(b, "%" PRIu64 "\n", cum);
    }
    series(b, name, "_sum", s->labels, NULL);
    value(b, s->h->sum);
    bt_buf_append_str(b, "\n");
    series(b, name, "_count", s->labels, NULL);
    bt_buf_appendf(b, "%" PRIu64 "\n", s->h->n);
}

bt_status bt_metrics_render(const bt_metrics *r, bt_buf *out) {
    static const char *type_name[] = {"counter", "gauge", "histogram"};
    if (bt_metrics_status(r) != BT_OK) {
        bt_buf_fail(out, bt_metrics_status(r));
        return bt_buf_status(out);
    }
    const bt_metric_family *f;
    STAILQ_FOREACH(f, &r->families, link) {
        const char *name = f->def.name;
        bt_buf_appendf(out, "# HELP %s %s\n# TYPE %s %s\n", name, f->def.help, name, type_name[f->def.type]);
        const sample *s;
        STAILQ_FOREACH(s, &f->samples, link) {
            if (s->h) {
                render_hist(out, f, s);
                continue;
            }
            series(out, name, "", s->labels, NULL);
            value(out, s->v);
            bt_buf_append_str(out, "\n");
        }
    }
    return bt_buf_status(out);
}
