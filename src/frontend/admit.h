/* admit.h — admission of new requests at the frontend: their priority, their tenant, and the
 * bounded queue where they wait for a worker that is not busy (docs/load-shedding.md).
 *
 * Priority: the body's `priority` (an integer, lower served sooner, default 0, as in vLLM) or the
 * X-Priority header when the body has none, bounded by the ceiling of the caller's API key
 * (--priority-ceiling): a key whose ceiling is 5 asking for 0 gets 5. It travels to the worker in
 * the REQUEST payload, where the engine admits its waiting sequences by (priority, arrival).
 *
 * Tenant: the API key (the Bearer token, shown only as a keyed hash), or with --trust-tenant-header the
 * X-Tenant header (a header can be spoofed: trust it only behind a gateway that sets it).
 *
 * The queue (off unless --queue-max-requests > 0): a first attempt that finds every worker of its
 * model busy, or that arrives while others of its model are queued, or whose tenant holds more
 * than its share of the estimated tokens in flight once they reach what the workers take before
 * they are busy, waits instead of being refused, bounded by a count, a sum of estimated tokens and
 * --queue-timeout. It leaves in
 * priority order and, within a priority, by weighted fair queueing over tenants on estimated
 * tokens (prompt bytes / 4 + max_tokens): a tenant that sends ten times more requests does not
 * get ten times the tokens. A full queue refuses the arrival with 429 when its tenant holds more
 * than its share (the queue's capacity over the tenants that have queued requests, the arrival's
 * included; a tenant alone has no share to be over), otherwise it
 * makes room by refusing (429) the newest request of the tenant furthest over its share, and only
 * when no tenant is over its share does the arrival get 503. A request that waits past the
 * timeout gets 503. Every refusal carries Retry-After from the observed rate at which the queue
 * drains, and an OpenAI error body. A queued request whose client leaves is dropped at once.
 *
 * One queue per frontend thread (shard); the limits are shared by the threads and changed at run
 * time by POST /admission. Everything runs on the shard's loop. */
#ifndef BATON_FRONTEND_ADMIT_H
#define BATON_FRONTEND_ADMIT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/metrics.h"
#include "common/status.h"
#include "http/http.h"

typedef struct fe fe;
typedef struct fe_req fe_req;
typedef struct fe_admit fe_admit;
typedef struct fe_admit_policy fe_admit_policy;
typedef struct fe_ticket fe_ticket;

/* The policy shared by every shard: the per-key ceilings (read-only after start) and the queue
 * limits (atomics: POST /admission changes them for every shard at once). spec is
 * --priority-ceiling: comma-separated KEY=N entries, "*=N" for every other caller (a key is split
 * at its last '='). NULL with a reason in err when spec is malformed or out of memory. */
fe_admit_policy *fe_admit_policy_new(const char *spec, int64_t max_requests, int64_t max_tokens, double timeout_s,
                                     int64_t migration_concurrency, bool trust_tenant_header, char *err,
                                     size_t errlen);
/* The largest --priority-ceiling-file read. */
#define FE_CEILING_FILE_MAX (1 << 20)
/* Adds the ceilings of --priority-ceiling-file `path` (NULL: none) to p: one KEY=N a line, split at
 * the last '=' and checked as --priority-ceiling's entries are; blank lines and lines whose first
 * non-blank is '#' are skipped, a line's surrounding blanks are not part of it. Read once at
 * start-up by bt_read_text_file (blocking). False with the reason in err, naming the file and
 * the line, never the key: the file is not a readable regular file, is over FE_CEILING_FILE_MAX,
 * holds a NUL, or a line is malformed. */
bool fe_admit_policy_ceiling_file(fe_admit_policy *p, const char *path, char *err, size_t errlen);
void fe_admit_policy_free(fe_admit_policy *p);
/* Checks p's ceilings against the API's key (--api-key; NULL: the API is open). With a key, only
 * that key opens the API, so a ceiling for any other could never apply: false with the entry (or
 * file line) named in err, never the key. Without one, callers choose their own Bearer token, so
 * any caller may claim a key whose ceiling is more urgent than '*''s: *claimable is then the
 * number of such entries, for a warning (with no '*', other callers have no ceiling at all). */
bool fe_admit_policy_keys_check(const fe_admit_policy *p, const char *api_key, const char *where, char *err,
                                size_t errlen, size_t *claimable);
/* Keys the tenant labels of API keys ("key-" + 16 hex digits of HMAC-SHA256(secret, key)) with
 * secret, the content of --tenant-label-secret-file, or, when NULL, with 32 random bytes drawn
 * here: then a key's label holds for this process's life only. Called once, before any shard
 * starts (the shards only read it). False with a reason in err if OpenSSL fails. */
bool fe_admit_policy_label_key(fe_admit_policy *p, const char *secret, char *err, size_t errlen);

/* Per shard: created with the shard's loop, stopped (its timer closed, the memory freed by the
 * close callback) when the shard's HTTP server has closed. */
bt_status fe_admit_start(fe *f);
void fe_admit_stop(fe *f);

/* A new request's admission facts, settled before it is created: its priority (400 on a bad
 * `priority` or X-Priority: false with a reason and *param), its tenant, its token estimate. The
 * ticket is owned by the request (r->ticket) from fe_admit_attach on. */
fe_ticket *fe_admit_ticket(fe *f, const bt_http_req *http, const json_t *body, char *err, size_t errlen,
                           const char **param, bool *nomem);
void fe_admit_attach(fe_req *r, fe_ticket *t);
/* The request's priority (0 without a ticket). */
int32_t fe_admit_priority(const fe_req *r);
/* The request's tenant label as metrics show it ("anonymous", "key-…", a trusted X-Tenant, or
 * "other" past the table's size); NULL without a ticket. */
const char *fe_admit_tenant(const fe_req *r);
/* A resumed stream (resume.c) continues at the priority its request was admitted with, kept in
 * the journal: r gets a ticket that carries it (never queued: a resume was admitted already).
 * False when out of memory (r then continues at the default priority). */
bool fe_admit_resume(fe_req *r, int32_t priority);

/* For the first attempt of r, before routing: true when r must wait (others of its model are
 * queued, or its tenant is over its share of the tokens in flight while they fill the workers:
 * admit.c, "in-flight shares") and has been queued or refused; false: route it now (it counts
 * as in flight for its tenant until it ends or comes back to the queue). */
bool fe_admit_before_route(fe_req *r);
/* Every worker of r's model is busy: true when r has been queued or refused here (429/503 with
 * the body and Retry-After); false when the queue is off (the caller refuses as before). */
bool fe_admit_all_busy(fe_req *r);
/* r ends: it leaves the queue (a client that left is dropped at once) and its ticket is freed. */
void fe_admit_forget(fe_req *r);

/* Migrations past --migration-concurrency (0 = no cap) wait, never fail: r's attempt failed and
 * r is about to be dispatched again. True when r now waits (the pump dispatches it when a slot
 * frees); false: dispatch it now (it holds a slot, or there is no cap). A slot is held from the
 * dispatch to the migration's first token (fe_admit_migration_done) or the request's end. */
bool fe_admit_migration_hold(fe_req *r);
void fe_admit_migration_done(fe_req *r);
/* The limits of budget.h and outlier.h that /admission changes at run time: their start-up values
 * (set once, before the shards start) and their current ones. */
void fe_admit_policy_runtime(fe_admit_policy *p, double retry_budget, int64_t retry_budget_min, double outlier_factor);
double fe_admit_retry_budget(const fe *f);
int64_t fe_admit_retry_budget_min(const fe *f);
double fe_admit_outlier_factor(const fe *f);
/* The outlier detector's window (s), sample minimum, back-off (s) and ejection cap (a share of a
 * model's workers): set from their flags before the shards start, changed by POST /admission. */
void fe_admit_policy_outlier(fe_admit_policy *p, double window, int64_t min_samples, double backoff,
                             double max_ejected);
double fe_admit_outlier_window(const fe *f);
int64_t fe_admit_outlier_min_samples(const fe *f);
double fe_admit_outlier_backoff(const fe *f);
double fe_admit_outlier_max_ejected(const fe *f);
/* GET/POST /admission: the limits (queue, migration cap, retry budget, outlier detector), this
 * shard's queue and migrations. Every field is checked before any is set. */
void fe_admit_handle(fe *f, bt_http_req *http);
/* The queue's Prometheus families (metrics.c). */
void fe_admit_collect(fe *f, bt_metrics *r);

#endif
