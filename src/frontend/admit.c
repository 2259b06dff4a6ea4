/* admit.c — priorities, tenants and the bounded admission queue (see admit.h for the contract and
 * docs/load-shedding.md for the whole admission path).
 *
 * The queue is one list per shard kept sorted by (priority, tag, arrival), where tag is a
 * weighted-fair-queueing finish tag over tenants: a request's tag is max(virtual time, its
 * tenant's last tag) + its estimated tokens, and the virtual time is the tag of the last request
 * that left the queue. So among requests of one priority, tenants get equal tokens while they all
 * have requests waiting, whatever their request counts. Leaving is driven by the pump: at once
 * when a request is queued, and every PUMP_MS while the queue is not empty (worker load reports
 * and finished requests change what is busy; the timer is what notices). The pump routes the
 * head of each model's entries while a worker of that model that holds it is not busy, and past a
 * head that waits for a worker of a larger context, the entries a free smaller worker holds. */
#include "frontend/admit.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <unistd.h>

#include "common/log.h"
#include "common/metrics.h"
#include "common/util.h"
#include "frontend/fe.h"
#include "proto/request.h"

#define PUMP_MS 10
#define PUMP_MAX_PER_TICK 256   /* dispatches per pump run: bounded work per loop iteration */
#define TENANTS_MAX 256         /* tenants with their own counters; more share "other" */
#define TENANT_NAME_MAX 40
#define LABEL_RANDOM_BYTES 32   /* the per-process label secret without --tenant-label-secret-file */
#define MAX_TOKENS_GUESS 256u   /* a request with no max_tokens (as migrate.c assumes) */
#define DRAIN_BUCKETS 10        /* seconds of drain history for Retry-After */
#define RETRY_MIN_S 1
#define RETRY_MAX_S 60
#define REFUSE_LOG_BURST 5      /* refusal lines per second and decision (bt_log_limit) */
#define BLOCKED_MAX 32          /* models with entries that could not leave within one pump run */

typedef enum { D_QUEUED, D_ADMITTED, D_OVER_SHARE, D_QUEUE_FULL, D_TIMEOUT, D_CLIENT_GONE, D_N_ } decision;
static const char *const decision_names[D_N_] = {"queued",         "admitted", "rejected_over_share",
                                                 "rejected_queue_full", "rejected_timeout", "dropped_client_gone"};

typedef struct {
    char *key;
    int32_t ceiling;
    int at; /* its entry's number (--priority-ceiling) or line (--priority-ceiling-file) */
} ceiling_entry;

/* A tenant as the whole frontend sees it, for the in-flight shares: every thread's requests of the
 * tenant count (a thread's own table would let each thread see only its part of the traffic). */
typedef struct {
    char name[TENANT_NAME_MAX];
    atomic_uint_least64_t inflight_n, inflight_tokens, queued_n;
} shared_tenant;

struct fe_admit_policy {
    ceiling_entry *ceil;
    size_t nceil;
    bool has_default;
    int32_t default_ceiling;
    int default_at; /* as ceiling_entry.at, for the '*' entry */
    bool trust_tenant_header;
    /* HMAC-SHA256 keyed with the tenant-label secret, set once before any shard starts and then
     * only read: each label is computed on a duplicate (fe_admit_policy_label_key) */
    EVP_MAC_CTX *label_mac;
    atomic_int_least64_t max_requests; /* 0 = the queue is off */
    atomic_int_least64_t max_tokens;   /* 0 = no bound on tokens */
    atomic_int_least64_t timeout_ms;
    atomic_int_least64_t migration_concurrency; /* 0 = no cap */
    _Atomic double retry_budget;               /* budget.h */
    atomic_int_least64_t retry_budget_min;
    _Atomic double outlier_factor;             /* outlier.h */
    _Atomic double outlier_window, outlier_backoff, outlier_max_ejected;
    atomic_int_least64_t outlier_min_samples;
    /* estimated tokens in flight on every thread of the frontend: what hold() compares with the
     * workers' capacity (each thread's own total would let N threads send N times it) */
    atomic_uint_least64_t inflight_tokens;
    /* the tenants of every thread; slot 0 is "other" (past TENANTS_MAX). Names are added under
     * tmu and published by nshared (release); the counters are atomics. */
    shared_tenant shared[TENANTS_MAX];
    atomic_int nshared;
    uv_mutex_t tmu;
    bool tmu_ok;
};

typedef struct {
    char name[TENANT_NAME_MAX];
    double last_tag;
    uint64_t queued_n, queued_tokens;
    uint64_t inflight_n, inflight_tokens; /* requests routed (first attempt on) and not ended */
    uint64_t count[D_N_];
    int g; /* its slot in the policy's shared table */
} tenant;

struct fe_ticket {
    fe_req *req;
    int32_t priority;
    int tenant;      /* index in the shard's table */
    uint64_t cost;   /* estimated tokens */
    double tag;
    uint64_t seq;
    uint64_t t_enq_ms, deadline_ms;
    bool queued;
    bool left;       /* it left the queue for routing: never queued again as new */
    bool mig_slot;   /* holds one of the --migration-concurrency slots */
    bool mig_waiting; /* in the migration wait list */
    bool inflight;    /* counted in its tenant's in-flight tokens */
    bool held;        /* was held for its tenant's share (counted once) */
    TAILQ_ENTRY(fe_ticket) link; /* fe_admit.queue or .mwait (never both) */
};
TAILQ_HEAD(ticket_q, fe_ticket);

struct fe_admit {
    fe *f;
    fe_admit_policy *pol;
    uv_timer_t timer;
    struct ticket_q queue; /* by priority, then fair tag, then arrival */
    uint64_t n, tokens, seq;
    uint64_t inflight_tokens; /* of every tenant */
    uint64_t held_total;      /* requests queued because their tenant was over its in-flight share */
    double vtime;
    bool pumping;
    tenant tenants[TENANTS_MAX];
    int ntenants;
    uint64_t drain[DRAIN_BUCKETS];   /* requests that left the queue for a worker, by second (ring) */
    uint64_t busy_ms[DRAIN_BUCKETS]; /* of each second, the milliseconds with requests queued */
    uint64_t drain_sec;              /* the second of the newest bucket (0 = none yet) */
    uint64_t busy_since_ms;          /* when the busy time was last accounted */
    /* Migrations past --migration-concurrency wait here (FIFO) for a slot; they are never failed
     * for it. mig_inflight counts the slots taken: migrations sent, not yet at their first token. */
    struct ticket_q mwait;
    uint64_t mwaiting, mig_inflight, mig_waited_total;
    bt_log_limit refuse_log[D_N_]; /* the lines of refusals, by decision (refuse) */
};

/* ---- policy ---- */

void fe_admit_policy_free(fe_admit_policy *p) {
    if (!p) return;
    if (p->tmu_ok) uv_mutex_destroy(&p->tmu);
    EVP_MAC_CTX_free(p->label_mac);
    for (size_t i = 0; i < p->nceil; i++) free(p->ceil[i].key);
    free(p->ceil);
    free(p);
}

static bool parse_prio(const char *s, size_t len, int32_t *out) {
    char buf[24];
    if (len == 0 || len >= sizeof buf) return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    char *end;
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (errno || *end || end == buf || v < -BT_PRIORITY_LIMIT || v > BT_PRIORITY_LIMIT) return false;
    *out = (int32_t)v;
    return true;
}

static bool is_blank(char c) { return c == ' ' || c == '\t'; }

/* One KEY=N entry (len bytes at s, split at its last '=') into p's ceilings; `at` is its number as
 * `unit` counts ("entry", "line"). Blanks around the key and the number are not part of them (an
 * operator lines up "batch-key = 10"); whatever else the key holds must be a Bearer token
 * (bt_bearer_token_ok), and a key (or '*') may be given once: an entry the lookup could never
 * match, or a second one it would never read, would leave that caller silently at the '*' ceiling
 * or at none. False with the reason in err, which names the entry as `where` says (never by its
 * key: a key is a secret), or on out of memory. */
static bool add_ceiling(fe_admit_policy *p, const char *s, size_t len, const char *where, int at, const char *unit,
                        char *err, size_t errlen) {
    while (len && is_blank(*s)) s++, len--;
    while (len && is_blank(s[len - 1])) len--;
    const char *eq = NULL;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '=') eq = s + i;
    size_t kl = eq ? (size_t)(eq - s) : 0;
    while (kl && is_blank(s[kl - 1])) kl--;
    if (kl == 0) {
        snprintf(err, errlen, "%s is not KEY=N (no key, or no '=')", where);
        return false;
    }
    const char *num = eq + 1;
    size_t nl = len - (size_t)(num - s);
    while (nl && is_blank(*num)) num++, nl--;
    int32_t v; /* strtoll would skip any other white space too (a '\r' inside a flag's entry) */
    if (!parse_prio(num, nl, &v) || !(*num == '-' || *num == '+' || (*num >= '0' && *num <= '9'))) {
        snprintf(err, errlen, "%s: '%.*s' is not an integer from %d to %d", where, (int)nl, num, -BT_PRIORITY_LIMIT,
                 BT_PRIORITY_LIMIT);
        return false;
    }
    if (!bt_bearer_token_ok(s, kl)) {
        snprintf(err, errlen,
                 "%s: the key holds a blank, a control character or a byte outside ASCII, which no Bearer token "
                 "carries",
                 where);
        return false;
    }
    int prev = 0;
    if (kl == 1 && s[0] == '*') prev = p->has_default ? p->default_at : 0;
    for (size_t i = 0; i < p->nceil && !prev; i++)
        if (strlen(p->ceil[i].key) == kl && memcmp(p->ceil[i].key, s, kl) == 0) prev = p->ceil[i].at;
    if (prev) {
        snprintf(err, errlen, "%s repeats the key of %s %d: give each key once", where, unit, prev);
        return false;
    }
    if (kl == 1 && s[0] == '*') {
        p->has_default = true;
        p->default_ceiling = v;
        p->default_at = at;
        return true;
    }
    ceiling_entry *c = realloc(p->ceil, (p->nceil + 1) * sizeof *c);
    if (!c) goto nomem;
    p->ceil = c;
    char *k = malloc(kl + 1);
    if (!k) goto nomem;
    memcpy(k, s, kl);
    k[kl] = '\0';
    p->ceil[p->nceil++] = (ceiling_entry){.key = k, .ceiling = v, .at = at};
    return true;
nomem:
    snprintf(err, errlen, "out of memory");
    return false;
}

fe_admit_policy *fe_admit_policy_new(const char *spec, int64_t max_requests, int64_t max_tokens, double timeout_s,
                                     int64_t migration_concurrency, bool trust_tenant_header, char *err,
                                     size_t errlen) {
    fe_admit_policy *p = calloc(1, sizeof *p);
    if (!p) goto nomem;
    atomic_init(&p->migration_concurrency, migration_concurrency);
    p->trust_tenant_header = trust_tenant_header;
    atomic_init(&p->max_requests, max_requests);
    atomic_init(&p->max_tokens, max_tokens);
    atomic_init(&p->timeout_ms, (int64_t)(timeout_s * 1000.0 + 0.5));
    atomic_init(&p->inflight_tokens, 0);
    snprintf(p->shared[0].name, TENANT_NAME_MAX, "other");
    atomic_init(&p->nshared, 1);
    if (uv_mutex_init(&p->tmu) != 0) goto nomem;
    p->tmu_ok = true;
    const char *s;
    size_t len;
    int nentry = 0;
    for (const char *pos = spec; bt_list_next(&pos, &s, &len);) {
        char where[48];
        snprintf(where, sizeof where, "--priority-ceiling: entry %d", ++nentry);
        if (!add_ceiling(p, s, len, where, nentry, "entry", err, errlen)) {
            fe_admit_policy_free(p);
            return NULL;
        }
    }
    return p;
nomem:
    snprintf(err, errlen, "out of memory");
    fe_admit_policy_free(p);
    return NULL;
}

bool fe_admit_policy_keys_check(const fe_admit_policy *p, const char *api_key, const char *where, char *err,
                                size_t errlen, size_t *claimable) {
    *claimable = 0;
    for (size_t i = 0; i < p->nceil; i++) {
        const ceiling_entry *c = &p->ceil[i];
        if (api_key && strcmp(c->key, api_key) != 0) {
            snprintf(err, errlen,
                     "%s %d names a key other than the --api-key: only the --api-key opens the API, so no "
                     "request could carry it",
                     where, c->at);
            return false;
        }
        if (!api_key && p->has_default && c->ceiling < p->default_ceiling) (*claimable)++; /* others get '*' */
    }
    return true;
}

bool fe_admit_policy_ceiling_file(fe_admit_policy *p, const char *path, char *err, size_t errlen) {
    if (!path) return true;
    const char *flag = "--priority-ceiling-file (BATON_PRIORITY_CEILING_FILE)";
    bool ok = false;
    char why[128], *buf;
    size_t got;
    bt_status st = bt_read_text_file(path, FE_CEILING_FILE_MAX, &buf, &got, why, sizeof why);
    if (st == BT_ERR_TOO_LARGE || st == BT_ERR_INVALID) {
        snprintf(err, errlen, "%s: %s %s", flag, path, why);
        return false;
    }
    if (st != BT_OK) {
        snprintf(err, errlen, "%s: cannot read %s: %s", flag, path, why);
        return false;
    }
    int line = 0;
    /* a UTF-8 byte order mark, which some editors write first, is not part of the first key */
    size_t start = got >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0 ? 3 : 0;
    for (size_t at = start; at < got;) {
        const char *s = buf + at, *nl = memchr(s, '\n', got - at);
        size_t len = nl ? (size_t)(nl - s) : got - at;
        at += len + (nl ? 1 : 0);
        line++;
        /* a line's surrounding blanks (and the '\r' of a CRLF file) are not part of its entry: no
         * Bearer token holds them */
        while (len && is_blank(*s)) s++, len--;
        while (len && (is_blank(s[len - 1]) || s[len - 1] == '\r')) len--;
        if (len == 0 || *s == '#') continue;
        char where[PATH_MAX + 128];
        snprintf(where, sizeof where, "%s: %s line %d", flag, path, line);
        if (!add_ceiling(p, s, len, where, line, "line", err, errlen)) goto cleanup;
    }
    ok = true;
cleanup:
    OPENSSL_cleanse(buf, got); /* it held keys */
    free(buf);
    return ok;
}

bool fe_admit_policy_label_key(fe_admit_policy *p, const char *secret, char *err, size_t errlen) {
    unsigned char rnd[LABEL_RANDOM_BYTES];
    const unsigned char *key = (const unsigned char *)secret;
    size_t klen = secret ? strlen(secret) : 0;
    bool ok = false;
    EVP_MAC *mac = NULL;
    EVP_MAC_CTX *ctx = NULL;
    if (!secret) {
        if (RAND_bytes(rnd, sizeof rnd) != 1) {
            snprintf(err, errlen, "cannot draw a random tenant-label secret");
            goto cleanup;
        }
        key = rnd;
        klen = sizeof rnd;
    }
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
    if (!ctx || EVP_MAC_init(ctx, key, klen, params) != 1) {
        snprintf(err, errlen, "cannot key HMAC-SHA256 for the tenant labels");
        goto cleanup;
    }
    EVP_MAC_CTX_free(p->label_mac);
    p->label_mac = ctx;
    ctx = NULL;
    ok = true;
cleanup:
    OPENSSL_cleanse(rnd, sizeof rnd);
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
    return ok;
}

/* ---- per shard ---- */

static void timer_closed(uv_handle_t *h) {
    fe_admit *a = h->data;
    if (a->f->admit_closing == a) a->f->admit_closing = NULL;
    free(a);
}

bt_status fe_admit_start(fe *f) {
    fe_admit *a = calloc(1, sizeof *a);
    if (!a) return BT_ERR_NOMEM;
    a->f = f;
    a->pol = f->admit_policy;
    TAILQ_INIT(&a->queue);
    TAILQ_INIT(&a->mwait);
    snprintf(a->tenants[0].name, TENANT_NAME_MAX, "other"); /* slot 0: past TENANTS_MAX */
    a->ntenants = 1;
    uv_timer_init(f->loop, &a->timer);
    a->timer.data = a;
    f->admit = a;
    return BT_OK;
}

void fe_admit_stop(fe *f) {
    fe_admit *a = f->admit;
    if (!a) return;
    f->admit = NULL;
    f->admit_closing = a; /* if the loop ends before the close callback, the teardown frees it */
    uv_timer_stop(&a->timer);
    uv_close((uv_handle_t *)&a->timer, timer_closed);
}

/* ---- tickets ---- */

const char *fe_bearer_key(const bt_http_req *http, size_t *len) {
    const char *a = http->authorization;
    if (!a || strncasecmp(a, "Bearer ", 7) != 0) return NULL;
    a += 7;
    while (*a == ' ') a++;
    *len = strlen(a);
    return *len ? a : NULL;
}

/* The tenant's name as metrics and logs show it: a trusted header's value (only [A-Za-z0-9._-],
 * others become '_'), or "key-" and the first 16 hex digits of HMAC-SHA256(secret, key), or
 * "anonymous". /metrics is open by default: an unkeyed hash there (as FNV-1a was) would let
 * whoever scrapes it test guessed keys offline, one cheap hash per guess; without the secret the
 * label says nothing of the key. The secret's context is duplicated per label, never changed, so
 * every shard's loop may use it at once. */
static bool tenant_name(const fe_admit_policy *pol, const bt_http_req *http, char *out, size_t cap) {
    if (pol->trust_tenant_header && http->tenant && *http->tenant) {
        size_t i = 0;
        for (const char *s = http->tenant; *s && i + 1 < cap; s++, i++) {
            char c = *s;
            bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-';
            out[i] = ok ? c : '_';
        }
        out[i] = '\0';
        return true;
    }
    size_t kl;
    const char *k = fe_bearer_key(http, &kl);
    if (!k) {
        snprintf(out, cap, "anonymous");
        return true;
    }
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t ml = 0;
    EVP_MAC_CTX *c = pol->label_mac ? EVP_MAC_CTX_dup(pol->label_mac) : NULL;
    bool ok = c && EVP_MAC_update(c, (const unsigned char *)k, kl) == 1 &&
              EVP_MAC_final(c, mac, &ml, sizeof mac) == 1 && ml >= 8;
    EVP_MAC_CTX_free(c);
    if (!ok) return false; /* out of memory: counted with the tenants past TENANTS_MAX ("other") */
    snprintf(out, cap, "key-%02x%02x%02x%02x%02x%02x%02x%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], mac[6],
             mac[7]);
    return true;
}

/* The slot of `name` in the shared table, added if new (0, "other", when full). Only when a thread
 * meets a tenant for the first time. */
static int shared_index(fe_admit_policy *p, const char *name) {
    uv_mutex_lock(&p->tmu);
    int n = atomic_load(&p->nshared), g = 0;
    for (int i = 1; i < n && !g; i++)
        if (strcmp(p->shared[i].name, name) == 0) g = i;
    if (!g && n < TENANTS_MAX) {
        snprintf(p->shared[n].name, TENANT_NAME_MAX, "%s", name);
        g = n;
        atomic_store_explicit(&p->nshared, n + 1, memory_order_release);
    }
    uv_mutex_unlock(&p->tmu);
    return g;
}

static int tenant_index(fe_admit *a, const char *name) {
    for (int i = 1; i < a->ntenants; i++)
        if (strcmp(a->tenants[i].name, name) == 0) return i;
    if (a->ntenants >= TENANTS_MAX) return 0;
    snprintf(a->tenants[a->ntenants].name, TENANT_NAME_MAX, "%s", name);
    a->tenants[a->ntenants].g = shared_index(a->pol, a->tenants[a->ntenants].name);
    return a->ntenants++;
}

fe_ticket *fe_admit_ticket(fe *f, const bt_http_req *http, const json_t *body, char *err, size_t errlen,
                           const char **param, bool *nomem) {
    fe_admit *a = f->admit;
    const fe_admit_policy *pol = f->admit_policy;
    *nomem = false;
    *param = NULL;
    int32_t prio = 0;
    const json_t *jp = json_object_get(body, "priority");
    if (jp && !json_is_null(jp)) {
        if (!json_is_integer(jp) || json_integer_value(jp) < -BT_PRIORITY_LIMIT ||
            json_integer_value(jp) > BT_PRIORITY_LIMIT) {
            snprintf(err, errlen, "'priority' must be an integer from %d to %d", -BT_PRIORITY_LIMIT,
                     BT_PRIORITY_LIMIT);
            *param = "priority";
            return NULL;
        }
        prio = (int32_t)json_integer_value(jp);
    } else if (http->priority) {
        if (!parse_prio(http->priority, strlen(http->priority), &prio)) {
            snprintf(err, errlen, "X-Priority must be an integer from %d to %d", -BT_PRIORITY_LIMIT,
                     BT_PRIORITY_LIMIT);
            return NULL;
        }
    }
    /* the key's ceiling: the most urgent priority it may ask for */
    size_t kl;
    const char *k = fe_bearer_key(http, &kl);
    bool found = false;
    for (size_t i = 0; k && i < pol->nceil && !found; i++) {
        if (strlen(pol->ceil[i].key) == kl && memcmp(pol->ceil[i].key, k, kl) == 0) {
            found = true;
            if (prio < pol->ceil[i].ceiling) prio = pol->ceil[i].ceiling;
        }
    }
    if (!found && pol->has_default && prio < pol->default_ceiling) prio = pol->default_ceiling;

    fe_ticket *t = bt_zalloc(sizeof *t); /* rather than calloc (util.h) */
    if (!t) {
        *nomem = true;
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->priority = prio;
    char name[TENANT_NAME_MAX];
    t->tenant = a && tenant_name(pol, http, name, sizeof name) ? tenant_index(a, name) : 0;
    const json_t *mt = json_object_get(body, "max_completion_tokens");
    if (!json_is_integer(mt)) mt = json_object_get(body, "max_tokens");
    t->cost = http->body_len / 4 + (json_is_integer(mt) ? (uint64_t)json_integer_value(mt) : MAX_TOKENS_GUESS);
    if (t->cost == 0) t->cost = 1;
    return t;
}

void fe_admit_attach(fe_req *r, fe_ticket *t) {
    r->ticket = t;
    if (t) t->req = r;
}

int32_t fe_admit_priority(const fe_req *r) { return r->ticket ? r->ticket->priority : 0; }

const char *fe_admit_tenant(const fe_req *r) {
    const fe_admit *a = r->fe->admit;
    if (!r->ticket || !a || r->ticket->tenant < 0 || r->ticket->tenant >= a->ntenants) return NULL;
    return a->tenants[r->ticket->tenant].name;
}

bool fe_admit_resume(fe_req *r, int32_t priority) {
    fe_ticket *t = r->ticket;
    if (!t) {
        t = calloc(1, sizeof *t); /* tenant 0, no cost: it is never in the queue's accounting */
        if (!t) return false;
        fe_admit_attach(r, t);
    }
    t->priority = priority;
    t->left = true;
    return true;
}

/* ---- in-flight shares ----
 *
 * The queue's order makes tenants fair only among requests that wait in it. A request that finds a
 * worker not busy goes straight through, and a worker admits more than its busy threshold shows (a
 * sequence's KV blocks grow after admission) and runs or queues them all: there a tenant with ten
 * times the requests in flight gets ten times the tokens. So once the estimated tokens in flight
 * reach what the model's workers take before they are busy (decode threshold x KV blocks x block
 * size), a request whose tenant holds more than its share of them (the total, its own included,
 * over the tenants with requests in flight or queued) waits in the queue even when a worker is
 * not busy, and the pump lets it out only within its share. Below that capacity nothing is held
 * (work-conserving), nor is a lone tenant, nor a tenant's only request (a request larger than any
 * share is not starved). Everything here is the whole frontend's, over all its models: the
 * tokens in flight and each tenant's in-flight and queued counts are atomics in the shared policy,
 * which every thread updates (a thread's own counts would let N threads send N times the
 * capacity, and show each thread only its part of a tenant's traffic). */

static void flight(fe_admit *a, fe_ticket *t, bool on) {
    if (!a || t->inflight == on) return;
    tenant *tn = &a->tenants[t->tenant];
    t->inflight = on;
    if (on) {
        tn->inflight_n++;
        tn->inflight_tokens += t->cost;
        a->inflight_tokens += t->cost;
        atomic_fetch_add(&a->pol->inflight_tokens, t->cost);
        atomic_fetch_add(&a->pol->shared[tn->g].inflight_n, 1);
        atomic_fetch_add(&a->pol->shared[tn->g].inflight_tokens, t->cost);
    } else {
        tn->inflight_n--;
        tn->inflight_tokens -= t->cost;
        a->inflight_tokens -= t->cost;
        atomic_fetch_sub(&a->pol->inflight_tokens, t->cost);
        atomic_fetch_sub(&a->pol->shared[tn->g].inflight_n, 1);
        atomic_fetch_sub(&a->pol->shared[tn->g].inflight_tokens, t->cost);
    }
}

/* t's tenant would hold more than its share of the in-flight tokens if t started now, counting
 * the requests of every thread of the frontend. */
static bool over_share(const fe_admit *a, const fe_ticket *t) {
    fe_admit_policy *p = a->pol;
    int g = a->tenants[t->tenant].g;
    const shared_tenant *tn = &p->shared[g];
    if (!atomic_load(&tn->inflight_n)) return false;
    uint64_t active = 0;
    int n = atomic_load_explicit(&p->nshared, memory_order_acquire);
    for (int i = 0; i < n; i++)
        active += i == g || atomic_load(&p->shared[i].inflight_n) > 0 || atomic_load(&p->shared[i].queued_n) > 0;
    if (active < 2) return false;
    double share = (double)(atomic_load(&p->inflight_tokens) + t->cost) / (double)active;
    return (double)(atomic_load(&tn->inflight_tokens) + t->cost) > share;
}

/* What m's workers take before they count as busy, in tokens: the decode threshold's share of
 * each routable worker's KV blocks. INFINITY when unknown (no decode threshold, or no worker
 * reported its blocks): nothing is held then, since nothing measures a saturation to share. */
static double capacity(fe *f, fe_model *m) {
    if (isnan(m->decode_threshold)) return INFINITY;
    double c = 0;
    bool known = false;
    for (size_t i = 0; i < m->nws; i++) {
        fe_worker *w = m->ws[i];
        if (!fe_worker_routable(w) || fe_outlier_ejected(f, w)) continue;
        uint64_t total = w->load.total_blocks ? w->load.total_blocks : w->total_blocks_card;
        if (!total || !w->block_size) continue;
        c += m->decode_threshold * (double)total * (double)w->block_size;
        known = true;
    }
    return known ? c : INFINITY;
}

/* t must wait for its tenant's share: it is over it and the tokens in flight on the frontend (all
 * its threads), t's included, would pass what its model's workers take before they are busy. */
static bool hold(fe_admit *a, const fe_ticket *t) {
    if (!over_share(a, t)) return false;
    return (double)(atomic_load(&a->pol->inflight_tokens) + t->cost) > capacity(a->f, t->req->model);
}

/* ---- the queue ---- */

static bool before(const fe_ticket *x, const fe_ticket *y) {
    if (x->priority != y->priority) return x->priority < y->priority;
    if (x->tag != y->tag) return x->tag < y->tag;
    return x->seq < y->seq;
}

static void drain_roll(fe_admit *a, uint64_t now_ms);

static void q_insert(fe_admit *a, fe_ticket *t) {
    drain_roll(a, bt_now_ms());
    fe_ticket *at = TAILQ_LAST(&a->queue, ticket_q); /* from the tail: a new tag is usually the largest */
    while (at && before(t, at)) at = TAILQ_PREV(at, ticket_q, link);
    if (at) TAILQ_INSERT_AFTER(&a->queue, at, t, link);
    else TAILQ_INSERT_HEAD(&a->queue, t, link);
    t->queued = true;
    a->n++;
    a->tokens += t->cost;
    a->tenants[t->tenant].queued_n++;
    a->tenants[t->tenant].queued_tokens += t->cost;
    atomic_fetch_add(&a->pol->shared[a->tenants[t->tenant].g].queued_n, 1);
}

static void q_remove(fe_admit *a, fe_ticket *t) {
    if (!t->queued) return;
    drain_roll(a, bt_now_ms());
    TAILQ_REMOVE(&a->queue, t, link);
    t->queued = false;
    a->n--;
    a->tokens -= t->cost;
    a->tenants[t->tenant].queued_n--;
    a->tenants[t->tenant].queued_tokens -= t->cost;
    atomic_fetch_sub(&a->pol->shared[a->tenants[t->tenant].g].queued_n, 1);
}

/* Moves the ring to the second of now_ms, clearing the seconds skipped; then accounts the time
 * since the last call as busy when requests were queued all along (the queue length only changes
 * through q_insert / q_remove, which call this first). */
static void drain_roll(fe_admit *a, uint64_t now_ms) {
    uint64_t sec = now_ms / 1000;
    if (!a->drain_sec) a->drain_sec = sec;
    if (sec > a->drain_sec) {
        uint64_t gap = sec - a->drain_sec;
        for (uint64_t i = 1; i <= gap && i <= DRAIN_BUCKETS; i++) {
            a->drain[(a->drain_sec + i) % DRAIN_BUCKETS] = 0;
            a->busy_ms[(a->drain_sec + i) % DRAIN_BUCKETS] = 0;
        }
        a->drain_sec = sec;
    }
    if (a->n && a->busy_since_ms && now_ms > a->busy_since_ms)
        a->busy_ms[sec % DRAIN_BUCKETS] += now_ms - a->busy_since_ms;
    a->busy_since_ms = now_ms;
}

/* Requests per second that left the queue for a worker, over the time of the last DRAIN_BUCKETS
 * seconds during which requests were waiting: idle time does not dilute it (a rate averaged over
 * idle seconds made Retry-After several times too long when load came in bursts). 0 when under
 * half a second of such time is on record. */
static double drain_rate(fe_admit *a, uint64_t now_ms) {
    drain_roll(a, now_ms);
    uint64_t sum = 0, busy = 0;
    for (int i = 0; i < DRAIN_BUCKETS; i++) sum += a->drain[i], busy += a->busy_ms[i];
    if (busy < 500 || sum == 0) return 0;
    return (double)sum * 1000.0 / (double)busy;
}

/* Retry-After for a request of priority p refused now: the time for the queued requests that
 * would be served before it (those of its priority or a more urgent one) to leave at the observed
 * drain rate; without one, the worker-side estimate (fe_retry_after_s). */
static int retry_after(fe_admit *a, const fe_req *r, int32_t p) {
    double rate = drain_rate(a, bt_now_ms());
    int s;
    if (rate <= 0) {
        s = fe_retry_after_s(a->f, r->model);
    } else {
        uint64_t ahead = 0;
        for (fe_ticket *t = TAILQ_FIRST(&a->queue); t && t->priority <= p; t = TAILQ_NEXT(t, link))
            if (t->req->model == r->model) ahead++;
        s = (int)ceil((double)(ahead + 1) / rate);
    }
    return s < RETRY_MIN_S ? RETRY_MIN_S : s > RETRY_MAX_S ? RETRY_MAX_S : s;
}

static void count(fe_admit *a, const fe_ticket *t, decision d) { a->tenants[t->tenant].count[d]++; }

/* Ends r with a refusal; r is freed on return. */
static void refuse(fe_admit *a, fe_req *r, decision d) {
    fe_ticket *t = r->ticket;
    int ra = retry_after(a, r, t->priority);
    count(a, t, d);
    const tenant *tn = &a->tenants[t->tenant];
    char msg[256];
    int status = 503;
    const char *code = "overloaded";
    switch (d) {
    case D_OVER_SHARE:
        status = 429;
        code = "rate_limit_exceeded";
        snprintf(msg, sizeof msg,
                 "Rate limit reached: the admission queue is full and tenant %s holds more than its share of it "
                 "(%" PRIu64 " requests queued); please retry later",
                 tn->name, tn->queued_n);
        break;
    case D_QUEUE_FULL:
        code = "queue_full";
        snprintf(msg, sizeof msg,
                 "Service temporarily unavailable: the admission queue is full (%" PRIu64 " requests, %" PRIu64
                 " tokens), please retry later",
                 a->n, a->tokens);
        break;
    default:
        code = "queue_timeout";
        snprintf(msg, sizeof msg,
                 "Service temporarily unavailable: no worker was free within the queue timeout (%.1f s), please "
                 "retry later",
                 (double)atomic_load(&a->pol->timeout_ms) / 1000.0);
        break;
    }
    /* a full queue lasts while its clients send at their own rate: a few lines a second per
     * decision, each saying how many were not written (baton_frontend_admission_total counts all) */
    unsigned unsaid = 0;
    if (bt_log_enabled(BT_LOG_INFO) && bt_log_limit_take(&a->refuse_log[d], bt_now_ms(), REFUSE_LOG_BURST, &unsaid)) {
        if (unsaid)
            BT_INFO("request %s: %s (tenant %s, priority %d); Retry-After %d s (%u more %s since the last such line, "
                    "not logged)",
                    r->rid, decision_names[d], tn->name, t->priority, ra, unsaid, decision_names[d]);
        else
            BT_INFO("request %s: %s (tenant %s, priority %d); Retry-After %d s", r->rid, decision_names[d], tn->name,
                    t->priority, ra);
    }
    fe_request_refuse(r, status, code, ra, msg);
}

static void pump(fe_admit *a);
static void tick(uv_timer_t *h) { pump(h->data); }

static void arm(fe_admit *a) {
    if ((a->n || a->mwaiting) && !uv_is_active((uv_handle_t *)&a->timer))
        uv_timer_start(&a->timer, tick, PUMP_MS, PUMP_MS);
}

static bool mig_room(const fe_admit *a) {
    int64_t cap = atomic_load(&a->pol->migration_concurrency);
    return cap <= 0 || a->mig_inflight < (uint64_t)cap;
}

static void mig_unlink(fe_admit *a, fe_ticket *t) {
    if (!t->mig_waiting) return;
    TAILQ_REMOVE(&a->mwait, t, link);
    t->mig_waiting = false;
    a->mwaiting--;
}

static void mig_release(fe_admit *a, fe_ticket *t) {
    if (!t->mig_slot) return;
    t->mig_slot = false;
    a->mig_inflight--;
    if (a->mwaiting) arm(a);
}

/* Routes the queue's heads while their models have a worker that is not busy; refuses the
 * requests past their deadline. Runs on the loop (never re-entered). */
static void pump(fe_admit *a) {
    if (a->pumping) return;
    a->pumping = true;
    uint64_t now = bt_now_ms();
    for (fe_ticket *t = TAILQ_FIRST(&a->queue), *nx; t; t = nx) {
        nx = TAILQ_NEXT(t, link);
        if (t->deadline_ms && now >= t->deadline_ms) {
            q_remove(a, t);
            refuse(a, t->req, D_TIMEOUT); /* frees t's request and t */
        }
    }
    int sent = 0;
    /* waiting migrations first: their streams are running already */
    while (!TAILQ_EMPTY(&a->mwait) && mig_room(a) && sent < PUMP_MAX_PER_TICK) {
        fe_ticket *t = TAILQ_FIRST(&a->mwait);
        mig_unlink(a, t);
        t->mig_slot = true;
        a->mig_inflight++;
        sent++;
        BT_INFO("request %s: migration leaves the wait (%" PRIu64 " migrations in flight, %" PRIu64 " waiting)",
                t->req->rid, a->mig_inflight, a->mwaiting);
        fe_migrate_dispatch(t->req); /* may end the request (and free t) */
    }
    /* Each model whose entries could not leave in this run, with the smallest context any of them
     * needs: every worker that holds that much is busy (and would preempt nothing for them, a test
     * monotone in priority, and the queue is in priority order). An entry behind that needs as much
     * or more cannot leave either. One that needs less may still leave for a worker too small for
     * all of them: none of them could have used it, so taking it passes no one it could starve,
     * while waiting behind them would leave that worker idle until the larger ones free (a model's
     * workers may advertise different contexts). */
    struct {
        fe_model *m;
        uint64_t need;
    } blocked[BLOCKED_MAX];
    int nblocked = 0;
    bool held = false;
    int32_t held_prio = 0;
    for (fe_ticket *t = TAILQ_FIRST(&a->queue); t && sent < PUMP_MAX_PER_TICK;) {
        fe_req *r = t->req;
        /* a request held for its tenant's share lets others of its priority pass, never less
         * urgent ones: priority comes before fairness */
        if (held && t->priority > held_prio) break;
        /* the context it needs is asked as fe_migrate_dispatch asks it: a free worker too small for
         * it would let it leave only to be queued again at the head, over and over, each tick */
        uint64_t need = fe_request_context_need(r);
        int b = -1;
        for (int i = 0; i < nblocked && b < 0; i++)
            if (blocked[i].m == r->model) b = i;
        bool skip = b >= 0 && need >= blocked[b].need;
        if (!skip && hold(a, t)) {
            if (!t->held) a->held_total++;
            t->held = true;
            if (!held) held_prio = t->priority;
            held = true;
            skip = true;
        }
        if (skip) {
            t = TAILQ_NEXT(t, link);
            continue;
        }
        bool all_busy = false;
        /* every worker busy: it still leaves when one would preempt less urgent work for it
         * (fe_route_preempt; fe_migrate_dispatch then picks that worker) */
        fe_worker *w = fe_route(a->f, r->model, 0, NULL, 0, &all_busy, NULL, need);
        if (!w && all_busy) w = fe_route_preempt(a->f, r->model, t->priority, need);
        /* Past entries of its model that could not leave, the worker it takes must be one they
         * could not use. It always is while nothing changes within the run (any worker that holds
         * them was found busy); should a report turn stale meanwhile, the entry waits for the next
         * run, where those before it are asked first. */
        bool passes = !w || b < 0 || fe_worker_context_short(w, blocked[b].need);
        if ((!w && all_busy) || !passes) {
            if (b < 0) {
                if (nblocked == BLOCKED_MAX) break;
                b = nblocked++;
                blocked[b].m = r->model;
                blocked[b].need = need;
            } else if (need < blocked[b].need) {
                blocked[b].need = need;
            }
            t = TAILQ_NEXT(t, link);
            continue;
        }
        if (b >= 0 && w)
            BT_DEBUG("request %s: leaves the admission queue ahead of requests of its model that need a context of "
                     "%" PRIu64 " tokens or more: it needs %" PRIu64 ", and the worker free for it holds %" PRIu64,
                     r->rid, blocked[b].need, need, w->context_length);
        q_remove(a, t);
        t->left = true;
        if (t->tag > a->vtime) a->vtime = t->tag;
        a->drain[(now / 1000) % DRAIN_BUCKETS]++; /* q_remove rolled the ring to now */
        count(a, t, D_ADMITTED);
        flight(a, t, true);
        BT_DEBUG("request %s: leaves the admission queue after %" PRIu64 " ms (priority %d, tenant %s)", r->rid,
                 now - t->t_enq_ms, t->priority, a->tenants[t->tenant].name);
        sent++;
        fe_migrate_dispatch(r); /* routes it (or fails it: no worker at all); may free r */
        t = TAILQ_FIRST(&a->queue); /* the list may have changed under the dispatch */
        held = false;
    }
    if (!a->n && !a->mwaiting) uv_timer_stop(&a->timer);
    a->pumping = false;
}

/* Over its share: the tenant's queued requests (or tokens, with a token bound) plus `extra` exceed
 * the capacity divided among the tenants that have requests queued (`active`). */
static double share_use(const fe_admit *a, const tenant *tn, uint64_t extra_n, uint64_t extra_tok, uint64_t active) {
    int64_t mr = atomic_load(&a->pol->max_requests), mt = atomic_load(&a->pol->max_tokens);
    double u = (double)(tn->queued_n + extra_n) * (double)active / (double)mr;
    if (mt > 0) {
        double ut = (double)(tn->queued_tokens + extra_tok) * (double)active / (double)mt;
        if (ut > u) u = ut;
    }
    return u;
}

static bool full(const fe_admit *a, uint64_t cost) {
    int64_t mr = atomic_load(&a->pol->max_requests), mt = atomic_load(&a->pol->max_tokens);
    return a->n + 1 > (uint64_t)mr || (mt > 0 && a->tokens + cost > (uint64_t)mt);
}

/* Queues r (or refuses it, or another request to make room). */
static void enqueue(fe_admit *a, fe_req *r) {
    fe_ticket *t = r->ticket;
    const tenant *tn = &a->tenants[t->tenant];
    uint64_t active = 0;
    for (int i = 0; i < a->ntenants; i++) active += a->tenants[i].queued_n > 0;
    if (!t->left) { /* a request back from routing keeps its place */
        if (!tn->queued_n) active++;
        while (full(a, t->cost)) {
            /* alone in the queue, a tenant is not over a share: the service is (503 below) */
            if (active > 1 && share_use(a, tn, 1, t->cost, active) > 1.0) {
                refuse(a, r, D_OVER_SHARE);
                return;
            }
            /* the arrival is within its share: the newest request of the tenant furthest over its
             * share makes room */
            int victim = -1;
            double worst = 1.0;
            if (active < 2) worst = INFINITY; /* nobody to compare with: no victim */
            for (int i = 0; i < a->ntenants; i++) {
                if (!a->tenants[i].queued_n) continue;
                double u = share_use(a, &a->tenants[i], 0, 0, active);
                if (u > worst) worst = u, victim = i;
            }
            if (victim < 0) {
                refuse(a, r, D_QUEUE_FULL);
                return;
            }
            fe_ticket *v = TAILQ_LAST(&a->queue, ticket_q);
            fe_ticket *newest = NULL;
            for (; v; v = TAILQ_PREV(v, ticket_q, link))
                if (v->tenant == victim && (!newest || v->seq > newest->seq)) newest = v;
            q_remove(a, newest);
            if (!a->tenants[victim].queued_n) active--;
            refuse(a, newest->req, D_OVER_SHARE);
        }
        tenant *tm = &a->tenants[t->tenant];
        t->tag = (tm->last_tag > a->vtime ? tm->last_tag : a->vtime) + (double)t->cost;
        tm->last_tag = t->tag;
        t->seq = ++a->seq;
        t->t_enq_ms = bt_now_ms();
        int64_t to = atomic_load(&a->pol->timeout_ms);
        t->deadline_ms = to > 0 ? t->t_enq_ms + (uint64_t)to : 0;
        count(a, t, D_QUEUED);
    }
    t->left = false;
    q_insert(a, t);
    BT_DEBUG("request %s: queued (priority %d, tenant %s, ~%" PRIu64 " tokens; %" PRIu64 " queued)", r->rid,
             t->priority, a->tenants[t->tenant].name, t->cost, a->n);
    arm(a);
    pump(a);
}

static bool queue_on(const fe_admit *a) { return a && atomic_load(&a->pol->max_requests) > 0; }

bool fe_admit_before_route(fe_req *r) {
    fe_admit *a = r->fe->admit;
    fe_ticket *t = r->ticket;
    if (!queue_on(a) || !t || t->left || t->queued) return false;
    bool waiting = false;
    for (fe_ticket *q = TAILQ_FIRST(&a->queue); q && !waiting; q = TAILQ_NEXT(q, link))
        waiting = q->req->model == r->model;
    bool held = !waiting && hold(a, t);
    if (!waiting && !held) {
        flight(a, t, true); /* it goes straight to a worker */
        return false;
    }
    if (held) {
        t->held = true;
        a->held_total++;
        BT_DEBUG("request %s: tenant %s is over its share of the tokens in flight (%" PRIu64 " of %" PRIu64
                 "): it waits in the queue",
                 r->rid, a->tenants[t->tenant].name, a->tenants[t->tenant].inflight_tokens, a->inflight_tokens);
    }
    enqueue(a, r);
    return true;
}

bool fe_admit_all_busy(fe_req *r) {
    fe_admit *a = r->fe->admit;
    if (!queue_on(a) || !r->ticket || r->ticket->queued || r->resumed) return false;
    flight(a, r->ticket, false); /* back from routing: not in flight while it waits */
    enqueue(a, r);
    return true;
}

void fe_admit_forget(fe_req *r) {
    fe_ticket *t = r->ticket;
    if (!t) return;
    fe_admit *a = r->fe->admit;
    if (t->queued && a) {
        q_remove(a, t);
        count(a, t, D_CLIENT_GONE);
        BT_INFO("request %s: dropped from the admission queue (client gone or request cancelled)", r->rid);
    }
    if (a) {
        mig_unlink(a, t);
        mig_release(a, t);
        flight(a, t, false);
    }
    r->ticket = NULL;
    free(t);
}

bool fe_admit_migration_hold(fe_req *r) {
    fe_admit *a = r->fe->admit;
    if (!a || atomic_load(&a->pol->migration_concurrency) <= 0) return false;
    fe_ticket *t = r->ticket;
    if (!t) { /* a resumed stream has no ticket: a bare one, for the slot and the list */
        t = calloc(1, sizeof *t);
        if (!t) return false; /* out of memory: migrate now rather than fail */
        fe_admit_attach(r, t);
    }
    if (t->mig_slot) return false; /* a migration that failed again keeps its slot */
    if (mig_room(a) && TAILQ_EMPTY(&a->mwait)) {
        t->mig_slot = true;
        a->mig_inflight++;
        return false;
    }
    TAILQ_INSERT_TAIL(&a->mwait, t, link);
    t->mig_waiting = true;
    a->mwaiting++;
    a->mig_waited_total++;
    BT_INFO("request %s: migration waits for a slot (%" PRIu64 " in flight, cap %lld; %" PRIu64 " waiting)", r->rid,
            a->mig_inflight, (long long)atomic_load(&a->pol->migration_concurrency), a->mwaiting);
    arm(a);
    return true;
}

void fe_admit_migration_done(fe_req *r) {
    fe_admit *a = r->fe->admit;
    if (a && r->ticket) mig_release(a, r->ticket);
}

/* ---- control and metrics ---- */

static void respond(bt_http_req *http, int status, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (s) bt_http_respond(http, status, "application/json", NULL, s, strlen(s));
    else bt_http_respond(http, 500, "application/json", NULL, "{\"error\":\"out of memory\"}", 25);
    free(s);
    json_decref(j);
}

static json_t *limits_json(fe *f) {
    fe_admit_policy *p = f->admit_policy;
    fe_admit *a = f->admit;
    json_t *j = json_pack("{s:I,s:I,s:I,s:f,s:f,s:I,s:I,s:I,s:f,s:I,s:I}", "migration_concurrency",
                          (json_int_t)atomic_load(&p->migration_concurrency), "migrations_in_flight",
                          (json_int_t)(a ? a->mig_inflight : 0), "migrations_waiting",
                          (json_int_t)(a ? a->mwaiting : 0), "outlier_factor", atomic_load(&p->outlier_factor),
                          "retry_budget", atomic_load(&p->retry_budget), "retry_budget_min",
                          (json_int_t)atomic_load(&p->retry_budget_min), "queue_max_requests",
                          (json_int_t)atomic_load(&p->max_requests), "queue_max_tokens",
                          (json_int_t)atomic_load(&p->max_tokens), "queue_timeout",
                          (double)atomic_load(&p->timeout_ms) / 1000.0, "queued_requests",
                          (json_int_t)(a ? a->n : 0), "queued_tokens", (json_int_t)(a ? a->tokens : 0));
    /* the outlier detector's other limits (outlier.h) */
    json_t *o = json_pack("{s:f,s:I,s:f,s:f}", "outlier_window", atomic_load(&p->outlier_window),
                          "outlier_min_samples", (json_int_t)atomic_load(&p->outlier_min_samples),
                          "outlier_backoff", atomic_load(&p->outlier_backoff), "outlier_max_ejected",
                          atomic_load(&p->outlier_max_ejected));
    if (!j || !o || json_object_update(j, o) != 0) {
        json_decref(j);
        j = NULL;
    }
    json_decref(o);
    return j;
}

/* The limits POST /admission may set, with the ranges of their flags. */
enum {
    F_QREQ,
    F_QTOK,
    F_QTIMEOUT,
    F_MIGCONC,
    F_BUDGET,
    F_BUDGET_MIN,
    F_OUTLIER,
    F_OWINDOW,
    F_OMIN,
    F_OBACKOFF,
    F_OMAXEJ,
    F_N
};
static const struct {
    const char *name;
    double min, max;
    bool integer;
} fields[F_N] = {
    [F_QREQ] = {"queue_max_requests", 0, 1e7, true},
    [F_QTOK] = {"queue_max_tokens", 0, 1e12, true},
    [F_QTIMEOUT] = {"queue_timeout", 0, 3600, false},
    [F_MIGCONC] = {"migration_concurrency", 0, 1e7, true},
    [F_BUDGET] = {"retry_budget", 0, 100, false},
    [F_BUDGET_MIN] = {"retry_budget_min", 0, 1e9, true},
    [F_OUTLIER] = {"outlier_factor", 0, 1000, false},
    [F_OWINDOW] = {"outlier_window", 1, FE_OUTLIER_BUCKETS, false},
    [F_OMIN] = {"outlier_min_samples", 1, 1e9, true},
    [F_OBACKOFF] = {"outlier_backoff", 0.1, 3600, false},
    [F_OMAXEJ] = {"outlier_max_ejected", 0, 1, false},
};

void fe_admit_handle(fe *f, bt_http_req *http) {
    if (http->method != BT_HTTP_POST) {
        respond(http, 200, limits_json(f));
        return;
    }
    json_error_t jerr;
    /* a field given twice is refused as a typo is: which of the two took would be a guess */
    json_t *b = json_loadb(http->body, http->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(b)) {
        respond(http, 422, json_pack("{s:s}", "error", b ? "the body must be a JSON object" : jerr.text));
        json_decref(b);
        return;
    }
    /* A field this endpoint does not know (a typo: "queue_max_request") is refused, not skipped: a
     * 200 that changed nothing would tell the operator the setting took. 422 as for a field of the
     * wrong type: the body's shape is wrong, not a value's range (400). */
    const char *key;
    json_t *val;
    json_object_foreach(b, key, val) {
        int i = 0;
        while (i < F_N && strcmp(key, fields[i].name) != 0) i++;
        if (i < F_N) continue;
        bt_buf m;
        bt_buf_init(&m, 4096);
        int kl = (int)strlen(key); /* cut between two characters: json_pack refuses one cut inside */
        if (kl > 100)
            for (kl = 100; kl > 0 && ((unsigned char)key[kl] & 0xC0) == 0x80;) kl--;
        bt_buf_appendf(&m, "unknown field '%.*s'; the fields are", kl, key);
        for (int k = 0; k < F_N; k++) bt_buf_appendf(&m, "%s %s", k ? "," : "", fields[k].name);
        respond(http, 422, json_pack("{s:s#}", "error", m.data ? m.data : "unknown field", m.data ? m.len : 13));
        bt_buf_free(&m);
        json_decref(b);
        return;
    }
    json_t *v[F_N];
    bool any = false;
    for (int i = 0; i < F_N; i++) { /* every field is checked before any is set */
        v[i] = json_object_get(b, fields[i].name);
        if (v[i] && !json_is_number(v[i])) {
            char msg[96];
            snprintf(msg, sizeof msg, "%s must be a number", fields[i].name);
            respond(http, 422, json_pack("{s:s}", "error", msg));
            json_decref(b);
            return;
        }
        double x = v[i] ? json_number_value(v[i]) : 0;
        if (v[i] && (!(x >= fields[i].min && x <= fields[i].max) || (fields[i].integer && !json_is_integer(v[i])))) {
            char msg[128];
            snprintf(msg, sizeof msg, "%s must be %s from %g to %g, got %g", fields[i].name,
                     fields[i].integer ? "an integer" : "a number", fields[i].min, fields[i].max, x);
            respond(http, 400, json_pack("{s:s}", "error", msg));
            json_decref(b);
            return;
        }
        any = any || v[i];
    }
    fe_admit_policy *p = f->admit_policy;
    if (v[F_QREQ]) atomic_store(&p->max_requests, (int64_t)json_integer_value(v[F_QREQ]));
    if (v[F_QTOK]) atomic_store(&p->max_tokens, (int64_t)json_integer_value(v[F_QTOK]));
    if (v[F_QTIMEOUT]) atomic_store(&p->timeout_ms, (int64_t)(json_number_value(v[F_QTIMEOUT]) * 1000.0 + 0.5));
    if (v[F_MIGCONC]) atomic_store(&p->migration_concurrency, (int64_t)json_integer_value(v[F_MIGCONC]));
    if (v[F_BUDGET]) atomic_store(&p->retry_budget, json_number_value(v[F_BUDGET]));
    if (v[F_BUDGET_MIN]) atomic_store(&p->retry_budget_min, (int64_t)json_integer_value(v[F_BUDGET_MIN]));
    if (v[F_OUTLIER]) atomic_store(&p->outlier_factor, json_number_value(v[F_OUTLIER]));
    if (v[F_OWINDOW]) atomic_store(&p->outlier_window, json_number_value(v[F_OWINDOW]));
    if (v[F_OMIN]) atomic_store(&p->outlier_min_samples, (int64_t)json_integer_value(v[F_OMIN]));
    if (v[F_OBACKOFF]) atomic_store(&p->outlier_backoff, json_number_value(v[F_OBACKOFF]));
    if (v[F_OMAXEJ]) atomic_store(&p->outlier_max_ejected, json_number_value(v[F_OMAXEJ]));
    if (any)
        BT_INFO("admission limits set: queue of %lld requests, %lld tokens, timeout %.3f s; %lld concurrent "
                "migrations; retry budget %g (at least %lld); outlier factor %g, window %g s, %lld samples, "
                "back-off %g s, at most %g of a model's workers ejected",
                (long long)atomic_load(&p->max_requests), (long long)atomic_load(&p->max_tokens),
                (double)atomic_load(&p->timeout_ms) / 1000.0, (long long)atomic_load(&p->migration_concurrency),
                atomic_load(&p->retry_budget), (long long)atomic_load(&p->retry_budget_min),
                atomic_load(&p->outlier_factor), atomic_load(&p->outlier_window),
                (long long)atomic_load(&p->outlier_min_samples), atomic_load(&p->outlier_backoff),
                atomic_load(&p->outlier_max_ejected));
    if (v[F_MIGCONC] && f->admit) arm(f->admit); /* a raised cap lets waiting migrations go */
    json_decref(b);
    respond(http, 200, limits_json(f));
}

double fe_admit_retry_budget(const fe *f) { return atomic_load(&f->admit_policy->retry_budget); }
int64_t fe_admit_retry_budget_min(const fe *f) { return atomic_load(&f->admit_policy->retry_budget_min); }
double fe_admit_outlier_factor(const fe *f) { return atomic_load(&f->admit_policy->outlier_factor); }
double fe_admit_outlier_window(const fe *f) { return atomic_load(&f->admit_policy->outlier_window); }
int64_t fe_admit_outlier_min_samples(const fe *f) { return atomic_load(&f->admit_policy->outlier_min_samples); }
double fe_admit_outlier_backoff(const fe *f) { return atomic_load(&f->admit_policy->outlier_backoff); }
double fe_admit_outlier_max_ejected(const fe *f) { return atomic_load(&f->admit_policy->outlier_max_ejected); }

void fe_admit_policy_outlier(fe_admit_policy *p, double window, int64_t min_samples, double backoff,
                             double max_ejected) {
    atomic_store(&p->outlier_window, window);
    atomic_store(&p->outlier_min_samples, min_samples);
    atomic_store(&p->outlier_backoff, backoff);
    atomic_store(&p->outlier_max_ejected, max_ejected);
}

void fe_admit_policy_runtime(fe_admit_policy *p, double retry_budget, int64_t retry_budget_min, double outlier_factor) {
    atomic_store(&p->retry_budget, retry_budget);
    atomic_store(&p->retry_budget_min, retry_budget_min);
    atomic_store(&p->outlier_factor, outlier_factor);
}

void fe_admit_collect(fe *f, bt_metrics *r) {
    fe_admit *a = f->admit;
    if (!a) return;
    bt_metric_family *fam = bt_metrics_counter(r, "baton_frontend_admission_total", "Admission decisions, by tenant");
    for (int i = 0; i < a->ntenants; i++)
        for (int d = 0; d < D_N_; d++)
            if (a->tenants[i].count[d])
                bt_metrics_add(fam, (double)a->tenants[i].count[d], "tenant", a->tenants[i].name, "decision",
                               decision_names[d], NULL);
    bt_metrics_gauge_value(r, "baton_frontend_queue_requests", BT_MERGE_SUM, "Requests waiting in the admission queue",
                           (double)a->n);
    bt_metrics_gauge_value(r, "baton_frontend_queue_tokens", BT_MERGE_SUM,
                           "Estimated tokens of the requests in the admission queue", (double)a->tokens);
    bt_metrics_gauge_value(r, "baton_frontend_migrations_in_flight", BT_MERGE_SUM,
                           "Migrations sent and not yet at their first token", (double)a->mig_inflight);
    bt_metrics_gauge_value(r, "baton_frontend_migrations_waiting", BT_MERGE_SUM,
                           "Migrations waiting for a --migration-concurrency slot", (double)a->mwaiting);
    bt_metrics_counter_value(r, "baton_frontend_migrations_waited_total", "Migrations that waited for a slot",
                             (double)a->mig_waited_total);
    bt_metrics_counter_value(r, "baton_frontend_admission_held_total",
                             "Requests queued while a worker was free because their tenant held more than its share "
                             "of the tokens in flight",
                             (double)a->held_total);
    bt_metric_family *inf = bt_metrics_gauge(r, "baton_frontend_tenant_inflight_tokens", BT_MERGE_SUM,
                                             "Estimated tokens of the tenant's requests routed and not ended");
    for (int i = 0; i < a->ntenants; i++)
        if (i > 0 || a->tenants[i].inflight_n) /* slot 0 ("other") only once past TENANTS_MAX */
            bt_metrics_add(inf, (double)a->tenants[i].inflight_tokens, "tenant", a->tenants[i].name, NULL);
}
