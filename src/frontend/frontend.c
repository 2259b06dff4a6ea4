/* frontend.c — `baton frontend`: process set-up, HTTP routing, probes, models, operator
 * endpoints and shutdown.
 *
 * Shutdown (SIGTERM/SIGINT/SIGHUP): /live turns 503 at once; new requests are still accepted for the
 * accept window (--shutdown-accept-window-ms, default 5 s as Dynamo's
 * DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS, which is honoured: a load balancer needs that long to
 * notice), then refused with 503 (the listener stays open so that late clients get an answer
 * they can read, not a refused connection); running streams get --shutdown-drain-timeout seconds
 * to finish, and any still running at that bound end with an explicit SSE error; then every
 * connection closes and the process exits 0. A second signal exits at once. */
#include "frontend/frontend.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <math.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

#include "common/linelog.h"
#include "common/log.h"
#include "common/opts.h"
#include "common/proc.h"
#include "frontend/fe.h"
#include "http/route.h"

/* The largest --active-prefill-tokens-threshold, on the command line and on POST /busy_threshold. */
#define FE_PREFILL_THRESHOLD_MAX 1e12

static void respond_json(bt_http_req *http, int status, json_t *j) {
    /* 15 significant digits, as a double holds any decimal of that many: an operator who set 0.1
     * reads 0.1, not jansson's default 17 digits (0.10000000000000001) */
    char *s = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(15));
    bt_http_respond(http, status, "application/json", NULL, s ? s : "{}", s ? strlen(s) : 2);
    free(s);
    json_decref(j);
}

static void handle_health(fe *f, bt_http_req *http) {
    json_t *eps = json_array();
    json_t *insts = json_array();
    for (fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link)) {
        if (!fe_worker_routable(w)) continue;
        char ep[256];
        snprintf(ep, sizeof ep, "dyn://%s.%s.%s", w->ns, w->component, w->endpoint);
        bool seen = false;
        size_t i;
        json_t *v;
        json_array_foreach(eps, i, v) seen = seen || strcmp(json_string_value(v), ep) == 0;
        if (!seen) json_array_append_new(eps, json_string(ep));
        json_array_append_new(insts, json_pack("{s:s, s:s, s:s, s:I, s:{s:s}, s:s}", "namespace", w->ns, "component",
                                               w->component, "endpoint", w->endpoint, "instance_id",
                                               (json_int_t)w->id, "transport", "tcp", w->transport, "model", w->model));
    }
    respond_json(http, 200, json_pack("{s:s, s:o, s:o}", "status", "healthy", "endpoints", eps, "instances", insts));
}

/* A model is listed while at least one known worker serves it. "created" is Unix time: when this
 * frontend started (baton does not know when a model was made). */
static bool model_served(const fe *f, const char *name) {
    for (const fe_worker *w = LIST_FIRST(&f->workers); w; w = LIST_NEXT(w, link))
        if (strcmp(w->model, name) == 0) return true;
    return false;
}

static json_t *model_json(const fe *f, const fe_model *m) {
    return json_pack("{s:s, s:s, s:I, s:s}", "id", m->name, "object", "model", "created",
                     (json_int_t)f->grp->started_wall_s, "owned_by", "baton");
}

static void handle_models(fe *f, bt_http_req *http) {
    json_t *data = json_array();
    for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
        if (model_served(f, m->name)) json_array_append_new(data, model_json(f, m));
    respond_json(http, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decodes src into out (cap bytes). False if an escape is malformed, decodes to U+0000,
 * or the result does not fit. */
static bool percent_decode(const char *src, char *out, size_t cap) {
    size_t o = 0;
    for (const char *p = src; *p; p++) {
        char c = *p;
        if (c == '%') {
            int hi = hex_digit(p[1]), lo = hi < 0 ? -1 : hex_digit(p[2]);
            if (lo < 0 || (hi == 0 && lo == 0)) return false;
            c = (char)(hi * 16 + lo);
            p += 2;
        }
        if (o + 1 >= cap) return false;
        out[o++] = c;
    }
    out[o] = '\0';
    return true;
}

/* GET /v1/models/{id}: the id is percent-decoded and may hold '/' (as "org/model"), either raw or
 * as %2F (the openai SDK encodes it). */
static void handle_model(fe *f, bt_http_req *http, const char *raw_id) {
    char id[sizeof LIST_FIRST(&f->models)->name];
    fe_model *m = NULL;
    if (percent_decode(raw_id, id, sizeof id)) {
        m = fe_model_get(f, id, false);
        if (m && !model_served(f, m->name)) m = NULL;
    }
    if (!m) {
        fe_json_error_ex(http, NULL, 404, "model_not_found", "model", NULL, "The model '%.200s' does not exist",
                         raw_id);
        return;
    }
    respond_json(http, 200, model_json(f, m));
}

static json_t *threshold_json(const fe_model *m) {
    return json_pack("{s:s, s:o, s:o}", "model", m->name, "active_decode_blocks_threshold",
                     isnan(m->decode_threshold) ? json_null() : json_real(m->decode_threshold),
                     "active_prefill_tokens_threshold",
                     isnan(m->prefill_threshold) ? json_null() : json_integer((json_int_t)m->prefill_threshold));
}

/* GET/POST /busy_threshold with Dynamo's bodies and codes (400 out of range, 404 unknown model,
 * 422 bad JSON). HEAD is a GET (http.h): only a POST sets, whatever body a HEAD carries. */
static void handle_busy_threshold(fe *f, bt_http_req *http) {
    if (http->method != BT_HTTP_POST) {
        json_t *arr = json_array();
        for (fe_model *m = LIST_FIRST(&f->models); m; m = LIST_NEXT(m, link))
            json_array_append_new(arr, threshold_json(m));
        respond_json(http, 200, json_pack("{s:o}", "thresholds", arr));
        return;
    }
    json_error_t jerr;
    json_t *b = json_loadb(http->body, http->body_len, JSON_REJECT_DUPLICATES, &jerr); /* as fe_admit_handle */
    const char *name = json_string_value(json_object_get(b, "model"));
    if (!json_is_object(b) || !name) {
        respond_json(http, 422, json_pack("{s:s}", "error", b ? "'model' (string) is required" : jerr.text));
        json_decref(b);
        return;
    }
    /* a field not known here (a typo) is refused rather than skipped, as on /admission: 422 */
    const char *key;
    json_t *val;
    json_object_foreach(b, key, val) {
        if (strcmp(key, "model") == 0 || strcmp(key, "active_decode_blocks_threshold") == 0 ||
            strcmp(key, "active_prefill_tokens_threshold") == 0)
            continue;
        int kl = (int)strlen(key); /* cut between two characters, as the model name below */
        if (kl > 100)
            for (kl = 100; kl > 0 && ((unsigned char)key[kl] & 0xC0) == 0x80;) kl--;
        char msg[256];
        snprintf(msg, sizeof msg,
                 "unknown field '%.*s'; the fields are model, active_decode_blocks_threshold, "
                 "active_prefill_tokens_threshold",
                 kl, key);
        respond_json(http, 422, json_pack("{s:s}", "error", msg));
        json_decref(b);
        return;
    }
    fe_model *m = fe_model_get(f, name, false);
    if (!m) {
        /* the name cut between two characters: json_pack refuses a string cut inside one */
        size_t nl = strlen(name);
        if (nl > 200)
            for (nl = 200; nl > 0 && ((unsigned char)name[nl] & 0xC0) == 0x80;) nl--;
        char msg[300];
        snprintf(msg, sizeof msg, "Model '%.*s' not found. Thresholds can only be set for discovered models.", (int)nl,
                 name);
        respond_json(http, 404, json_pack("{s:s}", "error", msg));
        json_decref(b);
        return;
    }
    json_t *d = json_object_get(b, "active_decode_blocks_threshold");
    json_t *p = json_object_get(b, "active_prefill_tokens_threshold");
    if ((d && !json_is_number(d) && !json_is_null(d)) || (p && !json_is_number(p) && !json_is_null(p))) {
        respond_json(http, 422, json_pack("{s:s}", "error", "thresholds must be numbers or null"));
        json_decref(b);
        return;
    }
    if (json_is_number(d) && (json_number_value(d) < 0 || json_number_value(d) > 1)) {
        char msg[160];
        snprintf(msg, sizeof msg, "active_decode_blocks_threshold must be between 0.0 and 1.0, got %g",
                 json_number_value(d));
        respond_json(http, 400, json_pack("{s:s}", "error", msg));
        json_decref(b);
        return;
    }
    /* Bounded as --active-prefill-tokens-threshold is: the value is stored as a double and shown as
     * an integer, and a double beyond the int64 range has no integer (the conversion is undefined). */
    if (json_is_number(p) && !(json_number_value(p) >= 0 && json_number_value(p) <= FE_PREFILL_THRESHOLD_MAX)) {
        char msg[160];
        snprintf(msg, sizeof msg, "active_prefill_tokens_threshold must be between 0 and %.0f, got %g",
                 FE_PREFILL_THRESHOLD_MAX, json_number_value(p));
        respond_json(http, 400, json_pack("{s:s}", "error", msg));
        json_decref(b);
        return;
    }
    if (d) m->decode_threshold = json_is_null(d) ? NAN : json_number_value(d);
    if (p) m->prefill_threshold = json_is_null(p) ? NAN : json_number_value(p);
    if (d || p) fe_shards_set_threshold(f, m, d != NULL, p != NULL);
    if (d || p)
        BT_INFO("Updated busy thresholds for model '%s': decode %g, prefill tokens %g", m->name, m->decode_threshold,
                m->prefill_threshold);
    json_decref(b);
    respond_json(http, 200, threshold_json(m));
}

/* a == b in a time that depends on their lengths only, never on where they first differ: a
 * client timing 401s learns nothing of the key byte by byte. */
static bool equal_ct(const char *a, size_t alen, const char *b, size_t blen) {
    volatile unsigned char diff = alen != blen;
    for (size_t i = 0; i < alen; i++) diff |= (unsigned char)(a[i] ^ (blen ? b[i % blen] : 0));
    return diff == 0;
}

/* The request's bearer key (fe_bearer_key) is `key`, compared in constant time. */
static bool bearer_is(const bt_http_req *http, const char *key) {
    size_t len;
    const char *k = fe_bearer_key(http, &len);
    return k && equal_ct(k, len, key, strlen(key));
}

/* Set keys are never empty (key_given_ok): NULL is "no key". */
static bool has_key(const char *k) { return k != NULL; }

/* Keys read by key_from_file: the process's for its whole life (every shard's fe_opts points here). */
static char *file_keys[2];

/* The longest key key_from_file takes (the line end after it is not counted: bt_read_text_file) */
#define KEY_FILE_MAX 4096

/* A key option (--api-key, --admin-api-key, or the file of one) as given: false with the reason in
 * err when it is given empty, flag or twin (bt_proc_given_nonempty: taking it as "no key" would
 * serve an open API without a word), the message saying to leave it out to run `without` the key;
 * or, for a key itself (is_key), when it is not a Bearer token (bt_bearer_token_ok). The error
 * never quotes the key. */
static bool key_given_ok(const char *flag, const char *env, const char *val, bool is_key, const char *without,
                         char *err, size_t errlen) {
    if (!bt_proc_given_nonempty(flag, env, val, without, err, errlen)) return false;
    if (is_key && val && !bt_bearer_token_ok(val, strlen(val))) {
        snprintf(err, errlen,
                 "%s (%s): the key holds a blank, a control character or a byte outside ASCII, which no Bearer token "
                 "carries (a client could never present it)",
                 flag, env);
        return false;
    }
    return true;
}

/* *key from the file named by *file (the --api-key-file form of a key, kept out of ps): the whole
 * file, one trailing newline ("\n" or "\r\n") and a leading UTF-8 byte order mark (which some
 * editors write) removed. False with the reason in err when the file is not a readable regular
 * file, is empty, holds more than one line, a NUL or anything else a Bearer token cannot carry (a
 * blank before or after the key included: bt_bearer_token_ok), or is over KEY_FILE_MAX
 * (bt_read_text_file), or when the key is given both ways. Start-up only: blocking reads. */
static bool key_from_file(const char *flag, const char *env, const char *key_flag, const char *key_env,
                          const char *file, const char **key, char **store, char *err, size_t errlen) {
    if (!file) return true;
    if (*key) {
        snprintf(err, errlen, "%s (%s) and %s (%s) are both given: give the key one way", key_flag, key_env, flag,
                 env);
        return false;
    }
    char why[128], *buf;
    size_t n = 0;
    bt_status st = bt_read_text_file(file, KEY_FILE_MAX, &buf, &n, why, sizeof why);
    if (st != BT_OK && st != BT_ERR_TOO_LARGE && st != BT_ERR_INVALID) {
        snprintf(err, errlen, "%s (%s): cannot read %s: %s", flag, env, file, why);
        return false;
    }
    if (n && buf[n - 1] == '\n') buf[--n] = '\0';
    if (n && buf[n - 1] == '\r') buf[--n] = '\0';
    if (n >= 3 && memcmp(buf, "\xef\xbb\xbf", 3) == 0) {
        memmove(buf, buf + 3, n - 3 + 1);
        n -= 3;
    }
    const char *what = st != BT_OK            ? why
                       : n == 0               ? "is empty"
                       : strpbrk(buf, "\r\n") ? "holds more than one line"
                       : buf[0] == ' ' || buf[0] == '\t' || buf[n - 1] == ' ' || buf[n - 1] == '\t'
                           ? "has a blank before or after the key, which no Authorization header carries"
                       : !bt_bearer_token_ok(buf, n)
                           ? "holds a blank, a control character or a byte outside ASCII in the key, which no Bearer "
                             "token carries"
                           : NULL;
    if (what) {
        snprintf(err, errlen, "%s (%s): %s %s: it must hold the key alone", flag, env, file, what);
        if (buf) OPENSSL_cleanse(buf, n);
        free(buf);
        return false;
    }
    *key = *store = buf;
    return true;
}

/* The request carries the --admin-api-key (set). */
static bool is_admin(fe *f, const bt_http_req *http) {
    return has_key(f->o.admin_api_key) && bearer_is(http, f->o.admin_api_key);
}

/* The API's check: the --api-key, or anyone without one. */
static bool authorized(fe *f, bt_http_req *http) { return !has_key(f->o.api_key) || bearer_is(http, f->o.api_key); }

/* The operator endpoints' check (/busy_threshold, /admission): with --admin-api-key that key
 * only, so that an API client cannot change load shedding; without it the API's check, as
 * before the flag existed (anyone holding the API key may change the thresholds). */
static bool admin_authorized(fe *f, bt_http_req *http) {
    return has_key(f->o.admin_api_key) ? is_admin(f, http) : authorized(f, http);
}

/* The operator cancel: whoever may use the API (its caller), or the operator. */
static bool api_or_admin(fe *f, bt_http_req *http) {
    return authorized(f, http) || is_admin(f, http);
}

/* /metrics under --metrics-api-key-required: one of the keys that are set (a scrape job usually
 * holds an operator's credential); with only --admin-api-key, that key, though the API is open. */
static bool either_key(fe *f, bt_http_req *http) {
    return (has_key(f->o.api_key) && bearer_is(http, f->o.api_key)) || is_admin(f, http);
}

/* POST /v1/requests/{id}/cancel, body {"mode":"stop"|"kill"}; an empty body means stop. Any other
 * body ({}, [], a mode that is not one of the two strings) is a 400 and cancels nothing: an
 * operator's typo must not end a request. */
static void handle_cancel(fe *f, bt_http_req *http, const char *rid) {
    json_t *b = http->body_len ? json_loadb(http->body, http->body_len, JSON_REJECT_DUPLICATES, NULL)
                               : json_pack("{s:s}", "mode", "stop");
    const char *mode = json_string_value(json_object_get(b, "mode"));
    if (!json_is_object(b) || !mode || (strcmp(mode, "stop") != 0 && strcmp(mode, "kill") != 0)) {
        fe_json_error_ex(http, NULL, 400, "invalid_value", "mode", NULL, "body must be {\"mode\":\"stop\"|\"kill\"}");
        json_decref(b);
        return;
    }
    bool kill = strcmp(mode, "kill") == 0;
    json_decref(b);
    /* the operator (--admin-api-key) cancels any request; a caller only its own, as far as the
     * frontend tells callers apart (fe_caller_tag: the trusted X-Tenant) */
    uint8_t caller[FE_CALLER_LEN];
    fe_caller_tag(f, http, caller);
    fe_shards_cancel(f, http, rid, kill, is_admin(f, http) ? NULL : caller); /* it may live on another shard */
}

void fe_cancel_respond(bt_http_req *http, const char *rid, bool kill, bool found) {
    if (!found) {
        fe_json_error(http, NULL, 404, "request_not_found", "no running request with id '%s'", rid);
        return;
    }
    respond_json(http, 200, json_pack("{s:s, s:s, s:s}", "request_id", rid, "mode", kill ? "kill" : "stop", "status",
                                      "cancelling"));
}

static void route_live(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    fe *f = ud;
    static const char down[] = "{\"status\":\"shutting_down\",\"message\":\"Service is shutting down\"}";
    static const char live[] = "{\"status\":\"live\",\"message\":\"Service is live\"}";
    if (f->shutting_down) bt_http_respond(http, 503, "application/json", NULL, down, sizeof down - 1);
    else bt_http_respond(http, 200, "application/json", NULL, live, sizeof live - 1);
}

static void route_health(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    handle_health(ud, http);
}

static void unauthorized(bt_http_req *http) {
    fe_json_error_ex(http, NULL, 401, "invalid_api_key", NULL, "WWW-Authenticate: Bearer realm=\"baton\"\r\n",
                     "missing or invalid API key");
}

/* Open unless --metrics-api-key-required: the label values say which tenants call and how much. */
static void route_metrics(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    fe *f = ud;
    if (f->o.metrics_api_key_required && !either_key(f, http)) return unauthorized(http);
    fe_shards_metrics(ud, http); /* every shard's */
}

static void route_chat(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    fe_request_start(ud, http, BT_API_CHAT);
}

static void route_completions(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    fe_request_start(ud, http, BT_API_COMPLETION);
}

static void route_models(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    handle_models(ud, http);
}

static void route_model(void *ud, bt_http_req *http, const char *tail) { handle_model(ud, http, tail); }

static void route_busy_threshold(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    handle_busy_threshold(ud, http);
}

static void route_admission(void *ud, bt_http_req *http, const char *tail) {
    (void)tail;
    fe_admit_handle(ud, http);
}

/* /v1/requests/{id}/cancel */
static void route_request_op(void *ud, bt_http_req *http, const char *tail) {
    const char *slash = strchr(tail, '/');
    if (!slash || strcmp(slash, "/cancel") != 0 || slash == tail || slash - tail >= 80) {
        fe_json_error(http, NULL, 404, "unknown_url", "no route for %s", http->path);
        return;
    }
    char id[80];
    snprintf(id, sizeof id, "%.*s", (int)(slash - tail), tail);
    handle_cancel(ud, http, id);
}

/* Resumable streams, the EventSource form: GET /v1/chat/completions/{stream id} (resume.c). */
static void route_resume_chat(void *ud, bt_http_req *http, const char *tail) {
    fe_resume_get(ud, http, BT_API_CHAT, tail);
}

static void route_resume_completion(void *ud, bt_http_req *http, const char *tail) {
    fe_resume_get(ud, http, BT_API_COMPLETION, tail);
}

/* Route flags of this table beside route.h's: which key opens the route (on_http_request). */
#define FE_ROUTE_ADMIN (1u << 8)  /* operator endpoint: the --admin-api-key when set (admin_authorized) */
#define FE_ROUTE_CANCEL (1u << 9) /* the API key or the --admin-api-key (api_or_admin) */

/* The frontend's routes, in order of precedence. Probes and metrics are open (a load balancer's
 * probe or Prometheus carries no API key; /metrics checks it itself under
 * --metrics-api-key-required); the operator endpoints need the admin key when one is set;
 * everything else needs the API key when one is set. */
static const bt_http_route routes[] = {
    {"/live", BT_ROUTE_GET, BT_ROUTE_OPEN, route_live},
    {"/health", BT_ROUTE_GET, BT_ROUTE_OPEN, route_health},
    {"/metrics", BT_ROUTE_GET, BT_ROUTE_OPEN, route_metrics},
    {"/v1/chat/completions", BT_ROUTE_POST, 0, route_chat},
    {"/v1/completions", BT_ROUTE_POST, 0, route_completions},
    {"/v1/models", BT_ROUTE_GET, 0, route_models},
    {"/v1/models/", BT_ROUTE_GET, 0, route_model},
    {"/busy_threshold", BT_ROUTE_GET | BT_ROUTE_POST, FE_ROUTE_ADMIN, route_busy_threshold},
    {"/admission", BT_ROUTE_GET | BT_ROUTE_POST, FE_ROUTE_ADMIN, route_admission},
    {"/v1/requests/", BT_ROUTE_POST, FE_ROUTE_CANCEL, route_request_op},
    {"/v1/chat/completions/", BT_ROUTE_GET, BT_ROUTE_NO_HEAD, route_resume_chat}, /* resume.c refuses HEAD */
    {"/v1/completions/", BT_ROUTE_GET, BT_ROUTE_NO_HEAD, route_resume_completion},
};

/* ---- browsers (Origin, CORS) ----
 *
 * A web page can make a browser send a POST to any address, this one included, without asking
 * first: a "simple" request (text/plain body, no Authorization) goes out with no CORS preflight,
 * and only its response is hidden from the page. On a frontend without --api-key that is enough
 * to change load shedding (/admission, /busy_threshold), start generations or cancel them; the
 * address need not be public (`baton run` listens on 0.0.0.0, and DNS rebinding reaches loopback).
 * Browsers mark such requests with an Origin header, which no page can forge or leave out of a
 * cross-origin POST, and which curl, the SDKs and other servers do not send. So a request with an
 * Origin is served only when --allowed-origins lists that origin, and those origins get the CORS
 * headers (and preflight answers) that let a browser app the operator allows use the API; a
 * request without one is served as ever.
 *
 * GET and HEAD of the probes and /metrics (the open routes) are exempt: they change nothing, and a
 * page on an origin not listed cannot read their answer anyway (no Access-Control-Allow-Origin);
 * refusing them would only break a probe or a dashboard that happens to send an Origin. Every
 * other route, reads included, follows the rule, so that a page is refused before its request
 * runs and the answer says why. */

/* origin (the Origin header's value) is listed in --allowed-origins: an entry equal to it (ASCII
 * case ignored: browsers send scheme and host in lower case, an operator may not write them so),
 * or "*". The list was checked at start-up (origins_valid); blanks around entries are dropped. */
static bool origin_listed(const char *list, const char *origin) {
    size_t olen = strlen(origin);
    const char *p;
    size_t n;
    for (const char *pos = list; bt_list_next(&pos, &p, &n);)
        if ((n == 1 && *p == '*') || (n == olen && n > 0 && strncasecmp(p, origin, n) == 0)) return true;
    return false;
}

/* --allowed-origins holds only "*" and origins as a browser writes them: a scheme (http, https, or
 * another a browser sends: chrome-extension, moz-extension, tauri, capacitor...), "://", a host,
 * an optional ":port", nothing after (no path, not even "/": it would never match). "null" (what
 * sandboxed frames and file: pages send) cannot be listed: any page can be one. */
static bool origins_valid(const char *list, char *err, size_t errlen) {
    if (!list) return true;
    const char *p;
    size_t len;
    bool any = false;
    for (const char *pos = list; bt_list_next(&pos, &p, &len);) {
        const char *end = p + len;
        int n = (int)len;
        const char *host = NULL; /* past "scheme://", RFC 3986's scheme syntax */
        if (n > 0 && isalpha((unsigned char)*p)) {
            const char *q = p + 1;
            while (q < end && (isalnum((unsigned char)*q) || *q == '+' || *q == '-' || *q == '.')) q++;
            if (end - q > 3 && strncmp(q, "://", 3) == 0) host = q + 3;
        }
        bool ok = n == 1 && *p == '*';
        if (host && host < end) {
            const char *colon = NULL;
            ok = true;
            for (const char *q = host; q < end && ok; q++) {
                if (*q == ':' && !colon && q > host) colon = q;
                else if (colon && !(*q >= '0' && *q <= '9')) ok = false;
                else if (!colon && !(isalnum((unsigned char)*q) || *q == '-' || *q == '.' || *q == '[' ||
                                     *q == ']' || (*q == ':' && host[0] == '['))) ok = false;
            }
            if (colon && colon + 1 == end) ok = false;
        }
        if (!ok) {
            snprintf(err, errlen,
                     "--allowed-origins (BATON_ALLOWED_ORIGINS): '%.*s' is not an origin: give scheme://host[:port] "
                     "(no path, no trailing /) or *, comma-separated",
                     n > 100 ? 100 : n, p);
            return false;
        }
        any = true;
    }
    if (!any) {
        snprintf(err, errlen, "--allowed-origins (BATON_ALLOWED_ORIGINS) is given empty: leave it out to refuse every "
                              "cross-origin browser request");
        return false;
    }
    return true;
}

/* What a CORS preflight may ask to send when it names nothing it needs: the request headers this
 * API reads. A preflight that names its headers gets them back (cors_requested_headers). */
#define CORS_ALLOW_HEADERS "Authorization, Content-Type, X-Request-Id, Last-Event-ID, X-Priority, X-Tenant"
/* The largest Access-Control-Request-Headers echoed */
#define CORS_REQUEST_HEADERS_MAX 2048

/* A preflight's Access-Control-Request-Headers, when it is a well-formed list of header names
 * (RFC 9110 tokens, comma-separated, blanks around them) no longer than CORS_REQUEST_HEADERS_MAX:
 * then the listed origin may send them all. Clients add their own headers (the openai SDKs send
 * X-Stainless-*, OpenAI-Organization, ...), which this server ignores, so a fixed list would make
 * the browser block them; the origin is trusted already. NULL otherwise (the fixed list). */
static const char *cors_requested_headers(const char *v) {
    if (!v || strlen(v) > CORS_REQUEST_HEADERS_MAX) return NULL;
    enum { BEFORE, IN_NAME, AFTER } st = BEFORE; /* of the list element being read */
    bool any = false;
    for (const char *p = v; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (isalnum(ch) || strchr("!#$%&'*+-.^_`|~", ch)) {
            if (st == AFTER) return NULL; /* two names without a comma */
            st = IN_NAME;
            any = true;
        } else if (ch == ' ' || ch == '\t') {
            if (st == IN_NAME) st = AFTER;
        } else if (ch == ',') {
            st = BEFORE;
        } else {
            return NULL;
        }
    }
    return any ? v : NULL;
}

/* The Origin rule (above) for a request that carries one: false when it has been answered (403,
 * or a preflight's 204), true when it goes on, as a listed origin's with its CORS headers. */
static bool origin_ok(fe *f, bt_http_req *http, bt_route_result res, const bt_http_route *r) {
    const char *origin = http->origin;
    /* with origins listed, every answer depends on Origin, also one to a request without it: a
     * shared cache must not hand it to a page (Fetch, "CORS protocol and HTTP caches") */
    if (!origin) {
        if (f->o.allowed_origins) (void)bt_http_set_headers(http, "Vary: Origin\r\n"); /* no memory: none */
        return true;
    }
    bool listed = origin_listed(f->o.allowed_origins, origin);
    if (!listed) {
        bool probe = res == BT_ROUTE_FOUND && (r->flags & BT_ROUTE_OPEN) &&
                     (http->method == BT_HTTP_GET || http->method == BT_HTTP_HEAD);
        if (probe) return true;
        fe_json_error_ex(http, NULL, 403, "origin_not_allowed", NULL, "Vary: Origin\r\n",
                         "cross-origin request from %.200s refused: this frontend serves browser pages only of the "
                         "origins listed in --allowed-origins (BATON_ALLOWED_ORIGINS)",
                         origin);
        return false;
    }
    /* the origin itself, not "*", even under "*": the answer differs by Origin (Vary), and a page
     * that sends credentials needs its own origin named */
    /* X-Request-Id exposed: a page cancels its request by that id (/v1/requests/{id}/cancel);
     * Retry-After: how long a shed request should wait (docs/load-shedding.md) */
    bool preflight = http->method == BT_HTTP_OPTIONS && http->preflight; /* its answer varies by both */
    size_t n = strlen(origin) + 160;
    char *acao = malloc(n);
    bool added = acao &&
                 snprintf(acao, n,
                          "Access-Control-Allow-Origin: %s\r\nVary: %s\r\nAccess-Control-Expose-Headers: "
                          "X-Request-Id, Retry-After\r\n",
                          origin, preflight ? "Origin, Access-Control-Request-Headers" : "Origin") > 0 &&
                 bt_http_set_headers(http, acao);
    free(acao);
    if (!added) {
        fe_json_error(http, NULL, 500, "out_of_memory", "out of memory");
        return false;
    }
    if (preflight) {
        unsigned m = bt_http_route_allowed(routes, sizeof routes / sizeof routes[0], http->path);
        if (!m) return true; /* no such path: the 404 (or 401) it gets without asking */
        const char *asked = cors_requested_headers(http->preflight_headers);
        char h[CORS_REQUEST_HEADERS_MAX + 256];
        snprintf(h, sizeof h,
                 "Access-Control-Allow-Methods: %s%s%s\r\nAccess-Control-Allow-Headers: %s\r\n"
                 "Access-Control-Max-Age: 600\r\n",
                 (m & BT_ROUTE_GET) ? "GET, HEAD" : "", (m & BT_ROUTE_GET) && (m & BT_ROUTE_POST) ? ", " : "",
                 (m & BT_ROUTE_POST) ? "POST" : "", asked ? asked : CORS_ALLOW_HEADERS);
        bt_http_respond(http, 204, NULL, h, NULL, 0);
        return false;
    }
    return true;
}

/* Everything a request passes before its handler runs: the Origin rule, then the key its route
 * needs. False when it has been answered. *rp and *tailp are the route found (res). */
static bool request_gate(fe *f, bt_http_req *http, bt_route_result *resp, const bt_http_route **rp,
                         const char **tailp) {
    *resp = bt_http_route_find(routes, sizeof routes / sizeof routes[0], http->method, http->path, rp, tailp);
    bt_route_result res = *resp;
    const bt_http_route *r = *rp;
    if (!origin_ok(f, http, res, r)) return false;
    if (res == BT_ROUTE_FOUND && (r->flags & BT_ROUTE_OPEN)) return true;
    if (res == BT_ROUTE_FOUND && (r->flags & (FE_ROUTE_ADMIN | FE_ROUTE_CANCEL))) {
        bool ok = (r->flags & FE_ROUTE_ADMIN) ? admin_authorized(f, http) : api_or_admin(f, http);
        if (!ok) unauthorized(http);
        return ok;
    }
    /* past the open routes, nothing is said without the key, not even whether a path exists */
    if (!authorized(f, http)) {
        unauthorized(http);
        return false;
    }
    return true;
}

/* Expect: 100-continue: a request the gate refuses is answered before its body is sent. */
static bool on_http_expect(void *ud, bt_http_req *http) {
    bt_route_result res;
    const bt_http_route *r;
    const char *tail;
    return request_gate(ud, http, &res, &r, &tail);
}

static void on_http_request(void *ud, bt_http_req *http) {
    fe *f = ud;
    const bt_http_route *r = NULL;
    const char *tail = NULL;
    bt_route_result res;
    if (!request_gate(f, http, &res, &r, &tail)) return;
    if (res == BT_ROUTE_FOUND) return r->handler(f, http, tail);
    if (res == BT_ROUTE_BAD_METHOD) {
        /* a 405 names what the path takes (RFC 9110 15.5.6: MUST) */
        unsigned m = bt_http_route_allowed(routes, sizeof routes / sizeof routes[0], http->path);
        const char *post = !(m & BT_ROUTE_POST) ? "" : (m & BT_ROUTE_GET) ? ", POST" : "POST";
        char allow[48];
        snprintf(allow, sizeof allow, "Allow: %s%s%s\r\n", (m & BT_ROUTE_GET) ? "GET" : "",
                 (m & BT_ROUTE_HEAD) ? ", HEAD" : "", post);
        fe_json_error_ex(http, NULL, 405, "method_not_allowed", NULL, allow, "method not allowed on %s", http->path);
    } else {
        fe_json_error(http, NULL, 404, "unknown_url", "no route for %s", http->path);
    }
}

static void on_http_abort(void *ud, bt_http_req *http) {
    if (!fe_gather_abort(ud, http) && !fe_resume_abort(ud, http)) fe_request_abort(ud, http);
}

static void on_http_drain(void *ud, bt_http_req *http) { fe_resume_on_drain(ud, http); }

/* ---- shutdown ---- */

/* A worker's load from the event plane (NATS). */
static void on_event_load(void *ud, uint64_t worker_id, const bt_load_report *r) {
    fe *f = ud;
    if (!fe_workers_apply_load(f, worker_id, r)) f->events_unknown++;
}

/* The last step of a shutdown: the shard stops taking jobs from the others (then its handles
 * close and its loop ends). */
static void on_planes_closed(void *ud) { fe_mail_close(ud); }

/* Discovery (and then every remaining handle) closes only once every worker connection has
 * finished closing: a connection's close callback still uses its worker's handles. */
static void workers_gone_tick(uv_timer_t *t) {
    fe *f = t->data;
    if (f->nworkers > 0 && bt_now_ms() - f->shutdown_started_ms < f->shutdown_close_deadline_ms) return;
    if (f->nworkers > 0) BT_WARN("%zu worker connections still closing; exiting anyway", f->nworkers);
    uv_timer_stop(t);
    bt_proc_close_planes(&f->closer, f->loop, &f->disc, &f->events, on_planes_closed, f);
}

static void on_http_closed(void *ud) {
    fe *f = ud;
    f->http = NULL;
    fe_admit_stop(f);
    fe_workers_stop(f);
    f->shutdown_close_deadline_ms = bt_now_ms() - f->shutdown_started_ms + 2000;
    uv_timer_start(&f->shutdown_timer, workers_gone_tick, 0, 5);
}

static void shutdown_tick(uv_timer_t *t) {
    fe *f = t->data;
    uint64_t el = bt_now_ms() - f->shutdown_started_ms;
    bool window_over = el >= (uint64_t)f->o.accept_window_ms;
    bool drained = f->nreqs == 0;
    bool bound = el >= (uint64_t)f->o.accept_window_ms + (uint64_t)f->o.drain_timeout * 1000;
    if (window_over && !f->window_logged && !drained) {
        f->window_logged = true;
        BT_INFO("accept window over: new requests get 503; %zu running requests have %llds to finish", f->nreqs,
                (long long)f->o.drain_timeout);
    }
    if ((window_over && drained) || bound) {
        if (!drained) {
            BT_WARN("shutdown bound reached with %zu requests running; handing journaled streams off, ending the "
                    "rest with an error",
                    f->nreqs);
            for (size_t n = f->nreqs; !LIST_EMPTY(&f->reqs) && n > 0; n--) /* each call frees the request */
                if (!fe_request_hand_off(LIST_FIRST(&f->reqs)))
                    fe_request_fail(LIST_FIRST(&f->reqs), BT_ERR_SHUTDOWN, "the frontend is shutting down");
            /* the process exits right after: its last value is in the log, as no scrape can read it */
            BT_INFO("%" PRIu64 " streams handed off at the shutdown bound%s (baton_frontend_streams_handed_off_total)",
                    f->handed_off, f->grp->n > 1 ? " on this thread" : "");
        }
        BT_INFO("frontend shutting down after %llu ms", (unsigned long long)el);
        uv_timer_stop(t);
        if (f->http) bt_http_server_close(f->http, on_http_closed, f);
        else on_http_closed(f);
    }
}

static void on_signal(void *data, int signum) {
    fe *f = data;
    if (f->shutting_down) {
        if (bt_proc_supervised) return; /* the same stop reaching the whole group: `baton run` escalates */
        /* forced: running streams are cut, which a script must be able to tell from a drain (as
         * `baton run` does) */
        BT_WARN("second signal: exiting at once (status %d)", 128 + signum);
        _exit(128 + signum);
    }
    BT_INFO("HTTP server shutdown requested (%s): /live answers 503; accepting for %lld ms more, then draining "
            "running requests for up to %llds",
            bt_proc_signal_name(signum), (long long)f->o.accept_window_ms, (long long)f->o.drain_timeout);
    fe_shutdown_begin(f, bt_now_ms());
    fe_shards_shutdown(f);
}

/* Memory back to the system once the process is idle. A burst of streams grows the heap (each
 * connection, request, body and its SSE and token buffers) and glibc keeps what is freed for the
 * next burst: after 10,000 streams the frontend stayed at 56 MiB against 9 MiB idle before. So,
 * once no request has been in flight in any shard for two checks in a row (1 to 2 s) and some
 * were admitted since the last trim, each shard frees the connections and requests it keeps for
 * reuse (its HTTP server's and its own pools: their memory is the loop's, so each loop frees its
 * own), and shard 0 calls malloc_trim(0), which returns the free top of each arena and the free
 * pages inside them (madvise); another shard calls it too when it freed kept memory, which may
 * come after shard 0's trim. It runs once per idle period, when the loops have nothing to
 * serve; its cost (a walk over the free chunks) is logged at debug level. */
#define TRIM_CHECK_MS 1000u
/* Ended requests a shard keeps for the next ones (~1.3 KiB each), freed when idle (trim_tick). */
#define REQ_POOL_CAP 4096u

static void trim_tick(uv_timer_t *t) {
    fe *f = t->data;
    uint64_t admitted = atomic_load(&f->grp->admitted);
    if (atomic_load(&f->grp->nreqs) > 0) {
        f->trim_admitted = UINT64_MAX;
        return;
    }
    bool settled = f->trim_admitted == admitted; /* idle at the last check too, nothing since */
    f->trim_admitted = admitted;
    if (!settled || admitted == f->trimmed_admitted) return;
    f->trimmed_admitted = admitted;
    size_t kept = bt_pool_drain(&f->req_pool) + (f->http ? bt_http_server_release_kept(f->http) : 0);
#ifdef __GLIBC__
    if (f->shard != 0 && !kept) return; /* shard 0's trim covers every arena */
    uint64_t t0 = bt_now_us();
    int released = malloc_trim(0);
    BT_DEBUG("idle: malloc_trim %s memory in %" PRIu64 " us (%zu kept connections and requests freed before)",
             released ? "released" : "found no", bt_now_us() - t0, kept);
#else
    (void)kept;
#endif
}

static void trim_start(fe *f) {
    uv_timer_init(f->loop, &f->trim_timer);
    f->trim_timer.data = f;
    f->trim_admitted = UINT64_MAX;
    uv_timer_start(&f->trim_timer, trim_tick, TRIM_CHECK_MS, TRIM_CHECK_MS);
    uv_unref((uv_handle_t *)&f->trim_timer); /* never what keeps the loop running */
    f->trim_inited = true;
}

void fe_shutdown_begin(fe *f, uint64_t started_ms) {
    if (f->shutting_down) return;
    f->shutting_down = true;
    if (f->trim_inited) {
        f->trim_inited = false;
        uv_close((uv_handle_t *)&f->trim_timer, NULL);
    }
    f->shutdown_started_ms = started_ms;
    if (f->nreqs) BT_INFO("%zu requests running%s", f->nreqs, f->grp->n > 1 ? " on this thread" : "");
    uv_timer_start(&f->shutdown_timer, shutdown_tick, 0, 50);
}

/* Opens one shard: its loop, discovery, worker connections, listener (on `port`; with several
 * shards each listens with SO_REUSEPORT), signals (shard 0 only), mailbox and event plane.
 * Returns 0 or the process's exit code; what was opened is closed by the caller. */
static int shard_open(fe *f, int port, char *err, size_t errlen) {
    fe_opts *o = &f->o;
    f->loop = malloc(sizeof *f->loop);
    if (!f->loop || uv_loop_init(f->loop) != 0) {
        free(f->loop);
        f->loop = NULL;
        BT_ERROR("cannot create an event loop");
        return 1;
    }
    /* requests over 1 KiB: kept for reuse rather than through glibc's large-chunk path (pool.h) */
    bt_pool_init(&f->req_pool, sizeof(fe_req), REQ_POOL_CAP);
    f->started_ms = bt_now_ms();
    f->instance_id = bt_random64() & 0x7fffffffffffffffull;
    bt_buf_init(&f->scratch, (size_t)64 << 20);
    bt_buf_init(&f->access_line, FE_ACCESS_LINE_MAX);
    bt_map_init(&f->workers_by_id);
    fe_mail_init(f);
    bt_status dst = bt_proc_discovery_create(f->loop, &o->p, 0, &f->disc, err, errlen);
    if (dst != BT_OK) {
        BT_ERROR("discovery: %s", err);
        return dst == BT_ERR_INVALID ? 2 : 1; /* a setting to fix (bad TLS file, endpoint, TTL), not to retry */
    }
    /* the discovery grace (workers.c): before the watch; closed with the loop's handles */
    uv_timer_init(f->loop, &f->grace_timer);
    TAILQ_INIT(&f->grace_workers);
    f->grace_timer.data = f;
    uv_unref((uv_handle_t *)&f->grace_timer);
    fe_workers_start(f);
    if (fe_admit_start(f) != BT_OK) {
        BT_ERROR("out of memory");
        return 1;
    }

    bt_http_config hc;
    bt_http_config_default(&hc);
    hc.host = o->http_host;
    hc.port = port;
    hc.max_body_bytes = (size_t)o->max_body;
    hc.max_body_total = (size_t)o->max_body_total;
    hc.shared_bodies = &f->grp->nbodies; /* one process-wide budget, however many shards */
    hc.max_output_total = (size_t)o->max_output_total;
    hc.shared_output = &f->grp->noutput;
    hc.header_timeout_ms = (uint32_t)o->header_timeout_ms;
    hc.idle_timeout_ms = (uint32_t)o->idle_timeout_ms;
    hc.max_connections = (size_t)o->max_connections;
    hc.write_backlog_max = (size_t)o->max_backlog;
    hc.allowed_hosts = o->allowed_hosts;
    if (f->grp->n > 1) {
        hc.reuse_port = true;
        hc.reuse_port_first = f->shard == 0;
        hc.shared_conns = &f->grp->nconns;
        /* past the total, the largest backlog of every shard is closed, not only of the writer's */
        hc.output_peers = f->grp->output_peers;
        hc.output_peer = f->shard;
    }
    bt_http_handlers hh = {on_http_request, on_http_abort, on_http_drain, on_http_expect};
    if (bt_http_server_start(f->loop, &hc, &hh, f, &f->http, err, errlen) != BT_OK) {
        /* the flag that fixes it: an address this machine does not have is not the port's fault */
        if (strstr(err, uv_strerror(UV_EADDRNOTAVAIL)))
            BT_ERROR("%s; this machine has no such address: choose another --http-host (DYN_HTTP_HOST)", err);
        else BT_ERROR("%s; choose another --http-port (DYN_HTTP_PORT)", err);
        return 1;
    }
    if (f->shard == 0) bt_proc_signals_start(f->loop, &f->sigs, on_signal, NULL, f);
    uv_timer_init(f->loop, &f->shutdown_timer);
    f->shutdown_timer.data = f;
    uv_timer_init(f->loop, &f->relay_timer); /* KV relays (workers.c); closed with the loop's handles */
    f->relay_timer.data = f;
    uv_unref((uv_handle_t *)&f->relay_timer);
    TAILQ_INIT(&f->link_waits); /* continuations waiting for link room (migrate.c) */
    uv_timer_init(f->loop, &f->link_timer); /* closed with the loop's handles */
    f->link_timer.data = f;
    uv_unref((uv_handle_t *)&f->link_timer);
    uv_timer_init(f->loop, &f->token_sweep); /* --stream-token-timeout (migrate.c); closed with the loop's handles */
    fe_token_sweep_start(f);
    uv_check_init(f->loop, &f->req_flush); /* REQUEST coalescing (workers.c); closed with the loop's handles */
    f->req_flush.data = f;
    uv_unref((uv_handle_t *)&f->req_flush);
    trim_start(f);
    /* last, so that no failure below leaves a connecting event plane behind */
    if (bt_proc_events_create(f->loop, &o->p, o->ns, "frontend", f->instance_id, &f->events, err, errlen) != BT_OK) {
        BT_ERROR("event plane: %s", err);
        return 2;
    }
    if (bt_events_subscribe_load(f->events, on_event_load, f) != BT_OK) {
        BT_ERROR("event plane: cannot subscribe to load reports");
        bt_events_close(f->events, NULL, NULL);
        f->events = NULL;
        return 1;
    }
    return 0;
}

static void shard_run(void *arg) {
    fe *f = arg;
    uv_run(f->loop, UV_RUN_DEFAULT);
    atomic_fetch_sub(&f->grp->running, 1);
}

/* Shard 0 has finished its shutdown while others still drain: its signal handles were closed with
 * the rest, and a second signal must still exit at once (not kill the process by its default
 * action). They are opened again until the other threads are done. */
static void others_done_tick(uv_timer_t *t) {
    fe *f = t->data;
    if (atomic_load(&f->grp->running) == 0) bt_proc_close_handles(f->loop);
}

/* The frontend's flags, one row each in --help order: flag, environment twin, type, field of fe_opts,
 * default, range, help. Both the defaults and the bt_opt table are made from these rows, so each flag
 * is written once; PROC rows are the options every process shares (proc.h: bt_proc_opts_default
 * sets their defaults). One row is one line, wider than the usual 120 columns: the table reads
 * across, and a grep for a flag or its twin shows its default, range and help. */
/* clang-format off */
#define FE_OPTIONS(OPT, PROC) \
    OPT("--http-port", "DYN_HTTP_PORT", INT, http_port, 8000, 0, 65535, "HTTP port") \
    OPT("--http-host", "DYN_HTTP_HOST", STR, http_host, "0.0.0.0", 0, 0, "HTTP address") \
    OPT("--namespace", "DYN_NAMESPACE", STR, ns, "dynamo", 0, 0, "discovery namespace") \
    PROC(BT_PROC_OPT_DISCOVERY(&o->p, "file or etcd")) \
    PROC(BT_PROC_OPT_DISCOVERY_DIR(&o->p)) \
    PROC(BT_PROC_OPT_ETCD_ENDPOINTS(&o->p)) \
    PROC(BT_PROC_OPT_ETCD_CA(&o->p)) \
    PROC(BT_PROC_OPT_ETCD_CLIENT_CERT(&o->p)) \
    PROC(BT_PROC_OPT_ETCD_CLIENT_KEY(&o->p)) \
    OPT("--migration-limit", "DYN_MIGRATION_LIMIT", INT, migration_limit, 3, 0, 1000, "extra attempts per request (0 = off)") \
    OPT("--router-mode", "DYN_ROUTER_MODE", STR, router_mode, "round-robin", 0, 0, "round-robin, random, least-loaded") \
    OPT("--active-decode-blocks-threshold", "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD", DOUBLE, decode_threshold, NAN, 0, 1, "busy above this fraction of KV blocks") \
    OPT("--active-prefill-tokens-threshold", "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD", DOUBLE, prefill_threshold, NAN, 0, FE_PREFILL_THRESHOLD_MAX, "busy above this many prefill tokens") \
    OPT("--stream-stall-timeout", "DYN_STREAM_STALL_TIMEOUT", DOUBLE, stall_timeout, 2.0, 0.1, 3600, "seconds of silence before a worker is declared dead") \
    OPT("--discovery-grace", "BATON_DISCOVERY_GRACE", DOUBLE, discovery_grace, 10, 0, 3600, "seconds a worker whose discovery key vanished stays routable while its connection is healthy (connected, reporting its load, not draining), so that it can register again: a lease lost to an etcd pause or partition; a worker that drains, whose connection ends, or that does not register again within this is dropped (0 = dropped at once)") \
    OPT("--stream-token-timeout", "BATON_STREAM_TOKEN_TIMEOUT", DOUBLE, token_timeout, 0, 0, 86400, "seconds an attempt may hear nothing of its stream from its worker (no token, first or next, and no other frame for it) before the worker is told to drop it and the request migrates, even while the worker's connection is alive; a stream the worker reports waiting in its engine (queued, preempted) is not judged while that worker runs others (0 = off: a request may wait long in a worker's queue)") \
    OPT("--api-key", "DYN_API_KEY", STR, api_key, NULL, 0, 0, "require Authorization: Bearer KEY (visible ASCII); an empty value, flag or twin, is refused: leave both out for an API without a key") \
    OPT("--admin-api-key", "BATON_ADMIN_API_KEY", STR, admin_api_key, NULL, 0, 0, "the operator endpoints (/busy_threshold, /admission) require Authorization: Bearer KEY with this key, and the --api-key no longer opens them; it does not open the API, and it may cancel any request; unset, whoever holds the --api-key (everyone without one) may change the load-shedding settings; an empty value is refused as for --api-key") \
    OPT("--api-key-file", "DYN_API_KEY_FILE", STR, api_key_file, NULL, 0, 0, "read the --api-key from this file (one trailing newline and a leading byte order mark removed), so that the key is not on the command line; not with --api-key") \
    OPT("--admin-api-key-file", "BATON_ADMIN_API_KEY_FILE", STR, admin_api_key_file, NULL, 0, 0, "read the --admin-api-key from this file (one trailing newline and a leading byte order mark removed); not with --admin-api-key") \
    OPT("--metrics-api-key-required", "BATON_METRICS_API_KEY_REQUIRED", BOOL, metrics_api_key_required, false, 0, 0, "GET /metrics needs the --api-key or the --admin-api-key (Authorization: Bearer KEY); off, /metrics is open like /live and /health") \
    OPT("--allowed-origins", "BATON_ALLOWED_ORIGINS", STR, allowed_origins, NULL, 0, 0, "browser origins (scheme://host[:port], comma-separated, matched exactly; * for any) whose cross-origin requests are served, with CORS headers and preflights; a request with an Origin header not listed is refused with 403 (GETs of /live, /health and /metrics excepted); requests without Origin (curl, SDKs, servers) are not concerned") \
    OPT("--allowed-hosts", "BATON_ALLOWED_HOSTS", STR, allowed_hosts, NULL, 0, 0, "Host header names served besides IP addresses and localhost (comma-separated, ASCII case and port ignored; .example.com for it and every name under it; * for any): a request for another is refused with 403 host_not_allowed, against DNS rebinding. Not given: on a loopback --http-host only IP addresses, localhost and *.localhost are served, on any other address every name") \
    OPT("--max-body-bytes", "DYN_HTTP_MAX_BODY_BYTES", INT, max_body, 4 << 20, 1024, 1 << 30, "request body cap") \
    OPT("--max-body-bytes-total", "BATON_HTTP_MAX_BODY_BYTES_TOTAL", INT, max_body_total, 1 << 30, 0, (int64_t)1 << 40, "request body bytes being received at once over all connections (a declared Content-Length counts whole); a body past it is refused with 503; at least --max-body-bytes; 0: no cap") \
    OPT("--max-output-bytes-total", "BATON_HTTP_MAX_OUTPUT_BYTES_TOTAL", INT, max_output_total, 1 << 30, 0, (int64_t)1 << 40, "response bytes queued at once for all clients that read slower than they are sent to (each one bounded by --max-client-backlog-bytes); past it the connection with the largest backlog is closed (its stream stays resumable); 0: no cap") \
    OPT("--shutdown-drain-timeout", "DYN_HTTP_DRAIN_TIMEOUT", INT, drain_timeout, 30, 0, 86400, "seconds running streams get after SIGTERM") \
    OPT("--http-header-timeout-ms", "DYN_HTTP_HEADER_TIMEOUT_MS", INT, header_timeout_ms, 30000, 10, 3600000, "a request must arrive whole within this (slowloris guard)") \
    OPT("--http-idle-timeout-ms", "DYN_HTTP_IDLE_TIMEOUT_MS", INT, idle_timeout_ms, 60000, 10, 86400000, "idle keep-alive connections close after this") \
    OPT("--max-connections", "DYN_HTTP_MAX_CONNECTIONS", INT, max_connections, 20000, 1, 10000000, "open client connections; more are refused") \
    OPT("--max-client-backlog-bytes", "DYN_HTTP_MAX_CLIENT_BACKLOG_BYTES", INT, max_backlog, 8 << 20, 4096, 1 << 30, "bytes queued for a client that does not read before it is dropped") \
    OPT("--max-concurrent-requests", "DYN_MAX_CONCURRENT_REQUESTS", INT, max_requests, 20000, 1, 10000000, "requests in flight; more get 503") \
    PROC(BT_PROC_OPT_RPC_SECRET_FILE(&o->p)) \
    PROC(BT_PROC_OPT_EVENT_PLANE(&o->p)) \
    PROC(BT_PROC_OPT_NATS_SERVER(&o->p)) \
    PROC(BT_PROC_OPT_NATS_TLS_CA(&o->p)) \
    PROC(BT_PROC_OPT_NATS_TLS_CERT(&o->p)) \
    PROC(BT_PROC_OPT_NATS_TLS_KEY(&o->p)) \
    OPT("--shutdown-accept-window-ms", "DYN_HTTP_ACCEPT_WINDOW_MS", INT, accept_window_ms, 5000, 0, 600000, "milliseconds new requests are still accepted after SIGTERM") \
    OPT("--threads", "DYN_HTTP_THREADS", INT, threads, 1, 1, FE_MAX_THREADS, "event loops, one per core to use; connections are spread over them (SO_REUSEPORT)") \
    OPT("--stream-retention", "DYN_STREAM_RETENTION", DOUBLE, stream_retention, 300, 0, 86400, "seconds a stream stays resumable after it ends (0 = streams are not resumable)") \
    OPT("--stream-retention-bytes", "DYN_STREAM_RETENTION_BYTES", INT, stream_retention_bytes, (int64_t)256 << 20, 4096, (double)((int64_t)1 << 40), "memory cap of the stream journal (resumable streams)") \
    OPT("--priority-ceiling", "BATON_PRIORITY_CEILING", STR, priority_ceiling, NULL, 0, 0, "KEY=N,...,*=N: the most urgent priority each API key (* = any other caller) may ask for (with --api-key, a key other than it is refused: no request could carry it); blanks around keys and numbers are dropped; each key once; an empty value, flag or twin, is refused: leave both out for no ceilings") \
    OPT("--priority-ceiling-file", "BATON_PRIORITY_CEILING_FILE", STR, priority_ceiling_file, NULL, 0, 0, "read the --priority-ceiling entries from this file, one KEY=N a line (blank lines and # comments skipped), so that the keys are not on the command line; not with --priority-ceiling; an empty value is refused as for --priority-ceiling") \
    OPT("--trust-tenant-header", "BATON_TRUST_TENANT_HEADER", BOOL, trust_tenant_header, false, 0, 0, "the tenant is the X-Tenant header, not the API key (only behind a gateway that sets it)") \
    OPT("--tenant-label-secret-file", "BATON_TENANT_LABEL_SECRET_FILE", STR, tenant_label_secret_file, NULL, 0, 0, "file whose content keys the API keys' tenant labels in metrics and logs (key- + HMAC-SHA256); give every frontend the same file for the same labels; unset, a random secret: labels hold for this process's life only") \
    OPT("--queue-max-requests", "BATON_QUEUE_MAX_REQUESTS", INT, queue_max_requests, 0, 0, 1e7, "requests that may wait for a worker that is not busy (0 = no queue: refuse at once)") \
    OPT("--queue-max-tokens", "BATON_QUEUE_MAX_TOKENS", INT, queue_max_tokens, 0, 0, 1e12, "estimated tokens that may wait in the queue (0 = no bound)") \
    OPT("--queue-timeout", "BATON_QUEUE_TIMEOUT", DOUBLE, queue_timeout, 30, 0, 3600, "seconds a request may wait in the queue before a 503 (0 = no limit)") \
    OPT("--outlier-factor", "BATON_OUTLIER_FACTOR", DOUBLE, outlier_factor, 0, 0, 1000, "eject a worker whose mean TTFT or inter-token latency is this many times the median of the others (0 = off)") \
    OPT("--outlier-window", "BATON_OUTLIER_WINDOW", DOUBLE, outlier_window, 10, 1, FE_OUTLIER_BUCKETS, "seconds of latency samples a worker is judged on") \
    OPT("--outlier-min-samples", "BATON_OUTLIER_MIN_SAMPLES", INT, outlier_min_samples, 50, 1, 1e9, "samples of a signal a worker (and each worker it is compared with) needs in the window") \
    OPT("--outlier-backoff", "BATON_OUTLIER_BACKOFF", DOUBLE, outlier_backoff, 5, 0.1, 3600, "seconds an ejected worker stays out, doubled for each ejection in a row (at most 16x)") \
    OPT("--outlier-max-ejected", "BATON_OUTLIER_MAX_EJECTED", DOUBLE, outlier_max_ejected, 0.5, 0, 1, "largest share of a model's routable workers ejected at once (at least one, with two or more; none with one)") \
    OPT("--retry-budget", "BATON_RETRY_BUDGET", DOUBLE, retry_budget, 0, 0, 100, "re-routes before the first token and repeat migrations allowed per request started, over 10 s (0 = off)") \
    OPT("--retry-budget-min", "BATON_RETRY_BUDGET_MIN", INT, retry_budget_min, 10, 0, 1e9, "retries always allowed per 10 s, whatever the traffic") \
    OPT("--migration-concurrency", "BATON_MIGRATION_CONCURRENCY", INT, migration_concurrency, 0, 0, 1e7, "migrations sent at once (from a failure to their first token); more wait, never fail (0 = no cap)") \
    OPT("--access-log", "BATON_ACCESS_LOG", STR, access_log, NULL, 0, 0, "append one JSON line per API request to this file (- for the standard output): each inference request when it ends (status, model, tenant label, tokens, TTFT, duration, attempts) and each request the API refuses; written by a thread of its own, a line dropped and counted when the disk falls behind; a file renamed or removed (logrotate) is opened again within a second")
/* clang-format on */
#define FE_OPT_DEFAULT(flag, env, type, field, def, min, max, help) o->field = (def);
#define FE_OPT_ROW(flag, env, type, field, def, min, max, help) {flag, env, BT_OPT_##type, &o->field, min, max, help},
#define FE_PROC_NONE(row)
#define FE_PROC_ROW(row) row,

/* Each client connection is a descriptor. Over the process's descriptor limit accept(2) fails,
 * and libuv then resets the connections waiting (its EMFILE fallback) with no answer, no count and
 * nothing in the log, while a connection over --max-connections gets a 503 and is counted. So the
 * limit is kept under the descriptors left once the frontend's own are set aside: a connection to
 * every worker per event loop, discovery, the event plane, logs (an eighth of the limit, at least
 * 256: 2,500 of 20,000 covers 1,000 workers on two loops). The soft limit was already raised to
 * the hard one at start (cli/main.c). */
static void fit_connections_to_descriptors(fe_opts *o, int argc, char **argv) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return;
    uint64_t nofile = (uint64_t)rl.rlim_cur;
    uint64_t reserve = nofile / 8 < 256 ? 256 : nofile / 8;
    uint64_t room = nofile > reserve + 16 ? nofile - reserve : 16;
    if ((uint64_t)o->max_connections <= room) return;
    bool given = getenv("DYN_HTTP_MAX_CONNECTIONS") != NULL;
    for (int i = 1; i < argc && !given; i++)
        given = strncmp(argv[i], "--max-connections", 17) == 0 && (argv[i][17] == '\0' || argv[i][17] == '=');
    /* the default over a small limit is the limit's business, said once; a value asked for is not
     * what it gets, which is worth a warning */
    if (given)
        BT_WARN("--max-connections %" PRId64 " is more than the descriptor limit allows (ulimit -n %" PRIu64
                ", of which %" PRIu64 " are kept for worker connections, discovery and logs): serving at most %" PRIu64
                " client connections, the rest get 503 too_many_connections; raise the limit (ulimit -n, systemd "
                "LimitNOFILE=) for more",
                o->max_connections, nofile, reserve, room);
    else
        BT_INFO("at most %" PRIu64 " client connections (--max-connections %" PRId64 " by default, but ulimit -n is %" PRIu64
                " and %" PRIu64 " descriptors are kept for worker connections, discovery and logs)",
                room, o->max_connections, nofile, reserve);
    o->max_connections = (int64_t)room;
}

int bt_frontend_main(int argc, char **argv) {
    bt_log_init("frontend");
    fe *f = calloc(1, sizeof *f);
    if (!f) return 1;
    fe_opts *o = &f->o;
    bt_proc_opts_default(&o->p);
    FE_OPTIONS(FE_OPT_DEFAULT, FE_PROC_NONE)
    const bt_opt opts[] = {FE_OPTIONS(FE_OPT_ROW, FE_PROC_ROW)};
    int nopts = (int)(sizeof opts / sizeof opts[0]);
    if (bt_proc_help("frontend", opts, nopts, argc, argv)) {
        free(f);
        return 0;
    }
    char err[256];
    /* Dynamo's name for the accept window (seconds); the baton flag and its twin override it */
    const char *dyn_window = getenv("DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS");
    if (dyn_window && *dyn_window) {
        double secs;
        if (!bt_parse_double(dyn_window, 0, 600, &secs)) {
            bt_proc_error("frontend", "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS='%s' is not a number of seconds from 0 "
                                      "to 600", dyn_window);
            goto bad_usage;
        }
        o->accept_window_ms = (int64_t)(secs * 1000.0 + 0.5);
    }
    if (!bt_proc_parse("frontend", opts, nopts, argc, argv)) goto bad_usage;
    static const char *const modes[] = {"round-robin", "random", "least-loaded", NULL};
    if (!bt_proc_check_choice("frontend", opts, nopts, argc, argv, "--router-mode", o->router_mode, modes,
                              "round-robin, random, least-loaded"))
        goto bad_usage;
    if (strcmp(o->router_mode, "round-robin") == 0) f->mode = ROUTE_ROUND_ROBIN;
    else if (strcmp(o->router_mode, "random") == 0) f->mode = ROUTE_RANDOM;
    else f->mode = ROUTE_LEAST_LOADED;
    if (!bt_proc_check_planes("frontend", &o->p, opts, nopts, argc, argv) ||
        !bt_proc_check_host("frontend", opts, nopts, argc, argv, "--http-host", o->http_host))
        goto bad_usage;
    const char *no_api = "an API key", *no_admin = "an operator key";
    if (!key_given_ok("--api-key", "DYN_API_KEY", o->api_key, true, no_api, err, sizeof err) ||
        !key_given_ok("--admin-api-key", "BATON_ADMIN_API_KEY", o->admin_api_key, true, no_admin, err, sizeof err) ||
        !key_given_ok("--api-key-file", "DYN_API_KEY_FILE", o->api_key_file, false, no_api, err, sizeof err) ||
        !key_given_ok("--admin-api-key-file", "BATON_ADMIN_API_KEY_FILE", o->admin_api_key_file, false, no_admin, err,
                      sizeof err) ||
        !key_from_file("--api-key-file", "DYN_API_KEY_FILE", "--api-key", "DYN_API_KEY", o->api_key_file, &o->api_key,
                       &file_keys[0], err, sizeof err) ||
        !key_from_file("--admin-api-key-file", "BATON_ADMIN_API_KEY_FILE", "--admin-api-key", "BATON_ADMIN_API_KEY",
                       o->admin_api_key_file, &o->admin_api_key, &file_keys[1], err, sizeof err) ||
        /* an empty list of ceilings is not "no ceilings" (every key could ask for any priority),
         * as an empty key is not "no key" */
        !bt_proc_given_nonempty("--priority-ceiling", "BATON_PRIORITY_CEILING", o->priority_ceiling,
                                "priority ceilings", err, sizeof err) ||
        !bt_proc_given_nonempty("--priority-ceiling-file", "BATON_PRIORITY_CEILING_FILE", o->priority_ceiling_file,
                                "priority ceilings", err, sizeof err) ||
        !bt_proc_given_nonempty("--access-log", "BATON_ACCESS_LOG", o->access_log, "an access log", err, sizeof err)) {
        bt_proc_error("frontend", "%s", err);
        goto bad_usage;
    }
    if (!origins_valid(o->allowed_origins, err, sizeof err) ||
        !bt_http_hosts_valid("--allowed-hosts (BATON_ALLOWED_HOSTS)", o->allowed_hosts, err, sizeof err)) {
        bt_proc_error("frontend", "%s", err);
        goto bad_usage;
    }
    if (o->metrics_api_key_required && !has_key(o->api_key) && !has_key(o->admin_api_key)) {
        bt_proc_error("frontend", "--metrics-api-key-required (BATON_METRICS_API_KEY_REQUIRED) needs --api-key "
                                  "(DYN_API_KEY) or --admin-api-key (BATON_ADMIN_API_KEY): the key /metrics would "
                                  "require");
        goto bad_usage;
    }
    /* one key for both would let every API client change load shedding, which the flag is for */
    if (has_key(o->admin_api_key) && has_key(o->api_key) && strcmp(o->admin_api_key, o->api_key) == 0) {
        bt_proc_error("frontend", "--admin-api-key (BATON_ADMIN_API_KEY) must differ from --api-key (DYN_API_KEY)");
        goto bad_usage;
    }
    if (bt_proc_load_secret(&o->p, &f->rpc_secret, err, sizeof err) != BT_OK) {
        bt_proc_error("frontend", "%s", err);
        goto bad_usage;
    }
    /* the tenant-label secret, read as the request-plane one is; only the policy keeps it */
    char *label_secret = NULL;
    if (!bt_proc_given_nonempty("--tenant-label-secret-file", "BATON_TENANT_LABEL_SECRET_FILE",
                                o->tenant_label_secret_file, "a tenant-label secret", err, sizeof err)) {
        bt_proc_error("frontend", "%s", err);
        free(f->rpc_secret);
        goto bad_usage;
    }
    if (bt_load_secret(o->tenant_label_secret_file, NULL, &label_secret, err, sizeof err) != BT_OK) {
        bt_proc_error("frontend", "--tenant-label-secret-file (BATON_TENANT_LABEL_SECRET_FILE): %s", err);
        free(f->rpc_secret);
        goto bad_usage;
    }
    /* the file replaces the flag rather than adding to it: one place holds every ceiling, so that
     * no key's ceiling is decided by which of two lists a lookup reads first */
    if (o->priority_ceiling_file && o->priority_ceiling) {
        snprintf(err, sizeof err,
                 "--priority-ceiling (BATON_PRIORITY_CEILING) and --priority-ceiling-file "
                 "(BATON_PRIORITY_CEILING_FILE) are both given: give the ceilings one way");
        f->admit_policy = NULL;
    } else {
        f->admit_policy =
            fe_admit_policy_new(o->priority_ceiling, o->queue_max_requests, o->queue_max_tokens, o->queue_timeout,
                                o->migration_concurrency, o->trust_tenant_header, err, sizeof err);
        if (f->admit_policy &&
            !fe_admit_policy_ceiling_file(f->admit_policy, o->priority_ceiling_file, err, sizeof err)) {
            fe_admit_policy_free(f->admit_policy);
            f->admit_policy = NULL;
        }
    }
    size_t claimable = 0;
    if (f->admit_policy &&
        !fe_admit_policy_keys_check(f->admit_policy, o->api_key,
                                    o->priority_ceiling_file ? "--priority-ceiling-file: line" : "--priority-ceiling: entry",
                                    err, sizeof err, &claimable)) {
        fe_admit_policy_free(f->admit_policy);
        f->admit_policy = NULL;
    }
    bool labels_keyed = f->admit_policy && fe_admit_policy_label_key(f->admit_policy, label_secret, err, sizeof err);
    if (label_secret) OPENSSL_cleanse(label_secret, strlen(label_secret));
    free(label_secret);
    if (!labels_keyed) {
        bt_proc_error("frontend", "%s", err);
        free(f->rpc_secret);
        goto bad_usage;
    }
    fe_admit_policy_runtime(f->admit_policy, o->retry_budget, o->retry_budget_min, o->outlier_factor);
    fe_admit_policy_outlier(f->admit_policy, o->outlier_window, o->outlier_min_samples, o->outlier_backoff,
                            o->outlier_max_ejected);
    if (bt_proc_check_for) { /* `baton run` checks its frontend's arguments before it starts it */
        fe_admit_policy_free(f->admit_policy);
        free(f->rpc_secret);
        free(f);
        return 0;
    }
    if (claimable) /* once: after `baton run`'s check of these arguments, by the frontend it starts */
        BT_WARN("--priority-ceiling: %zu key(s) may ask for more urgent work than every other caller, but without "
                "--api-key a caller sends whatever Bearer token it likes and may claim theirs (put an authenticating "
                "gateway in front, or give the API a key)",
                claimable);
    /* opened before any shard runs (a path it cannot write is the operator's mistake: exit 2), and
     * by the frontend itself, not `baton run`'s check above, which must not create the file */
    bt_linelog *access_log = NULL;
    if (o->access_log) {
        access_log = bt_linelog_open(o->access_log, FE_ACCESS_LOG_BUFFER, err, sizeof err);
        if (!access_log) {
            bt_proc_error("frontend", "--access-log (BATON_ACCESS_LOG): %s", err);
            free(f->rpc_secret);
            goto bad_usage;
        }
    }
    fit_connections_to_descriptors(o, argc, argv);
    fe_group *g = calloc(1, sizeof *g);
    if (!g) {
        bt_linelog_close(access_log);
        goto bad_usage;
    }
    fe_access_start(access_log);
    g->n = (int)o->threads;
    if (g->n > 1 && !(g->output_peers = bt_http_output_peers_new(g->n))) {
        BT_ERROR("out of memory");
        fe_access_stop();
        free(g);
        goto bad_usage;
    }
    g->started_wall_s = bt_wall_s();
    g->shard[0] = f;
    bool shared_journal = o->stream_retention > 0 && strcmp(o->p.event_plane, "nats") == 0;
    if (o->stream_retention > 0) {
        g->journal = fe_journal_mem_new(o->stream_retention, (uint64_t)o->stream_retention_bytes);
        bool keyed = RAND_bytes(g->mac_secret, sizeof g->mac_secret) == 1;
        if (g->journal && shared_journal) {
            /* records are resumed by other frontends: the credential MAC must be the same on all of
             * them, so its key is derived from what they share, the API key */
            const char *k = o->api_key ? o->api_key : "";
            char *material = malloc(strlen(k) + 32);
            unsigned int len = 0;
            keyed = material && snprintf(material, strlen(k) + 32, "baton stream journal\n%s", k) > 0 &&
                    EVP_Digest(material, strlen(material), g->mac_secret, &len, EVP_sha256(), NULL) == 1;
            free(material);
            /* the journal's own NATS connection, made as the event plane's (same server, credentials, TLS) */
            bt_events_config ec;
            bt_proc_events_config(&o->p, o->ns, &ec);
            char name[64];
            snprintf(name, sizeof name, "baton-frontend-journal-%ld", (long)getpid());
            ec.name = name;
            fe_journal *js = keyed ? fe_journal_js_new(g->journal, &ec, err, sizeof err) : NULL;
            if (js) g->journal = js;
            else {
                if (keyed) BT_ERROR("event plane (the stream journal's connection): %s", err);
                keyed = false;
            }
        }
        if (!g->journal || !keyed) {
            BT_ERROR("cannot create the stream journal");
            fe_journal_destroy(g->journal);
            bt_http_output_peers_free(g->output_peers);
            fe_access_stop();
            free(g);
            goto bad_usage;
        }
    }
    int rc = 0, opened = 0;
    for (int i = 0; i < g->n && rc == 0; i++) {
        fe *s = g->shard[i];
        if (i > 0) {
            s = calloc(1, sizeof *s);
            if (!s) {
                BT_ERROR("out of memory starting thread %d", i);
                rc = 1;
                break;
            }
            s->o = f->o;
            s->mode = f->mode;
            s->rpc_secret = f->rpc_secret; /* shard 0's, shared read-only */
            s->admit_policy = f->admit_policy;
            g->shard[i] = s;
        }
        s->grp = g;
        s->shard = i;
        opened = i + 1;
        /* shard 0 may have picked the port (0 = a free one); the others join it */
        rc = shard_open(s, i == 0 ? (int)o->http_port : bt_http_server_port(f->http), err, sizeof err);
    }
    if (rc == 0) {
        BT_INFO("Request migration %s (limit: %lld); router %s; stall timeout %.1fs",
                o->migration_limit ? "enabled" : "disabled", (long long)o->migration_limit, o->router_mode,
                o->stall_timeout);
        if (o->token_timeout > 0)
            BT_INFO("stream token timeout %gs: a stream silent that long is dropped and migrated", o->token_timeout);
        if (g->journal && shared_journal)
            BT_INFO("resumable streams: event plane NATS: connecting the journal to JetStream at %s (kept %gs after "
                    "a stream ends, capped at %lld bytes)",
                    o->p.nats_server, o->stream_retention, (long long)o->stream_retention_bytes);
        else if (g->journal)
            BT_INFO("resumable streams: in-process journal, kept %gs after a stream ends, capped at %lld bytes",
                    o->stream_retention, (long long)o->stream_retention_bytes);
        else BT_INFO("resumable streams: off (--stream-retention 0)");
        BT_INFO("frontend listening on http://%s:%d (discovery %s, namespace %s, event plane %s, %d thread%s)",
                o->http_host, bt_http_server_port(f->http), o->p.discovery, o->ns, bt_events_plane(f->events), g->n,
                g->n > 1 ? "s" : "");
        int started = 1;
        for (int i = 1; i < g->n; i++, started++) {
            atomic_fetch_add(&g->running, 1);
            if (uv_thread_create(&g->shard[i]->thread, shard_run, g->shard[i]) != 0) {
                /* the shards already running stop through the normal shutdown */
                atomic_fetch_sub(&g->running, 1);
                BT_ERROR("cannot start thread %d of %d; shutting down", i, g->n);
                f->exit_code = 1;
                kill(getpid(), SIGTERM);
                break;
            }
        }
        uv_run(f->loop, UV_RUN_DEFAULT);
        if (atomic_load(&g->running) > 0) {
            bt_proc_signals_start(f->loop, &f->sigs, on_signal, NULL, f);
            uv_timer_init(f->loop, &f->shutdown_timer); /* closed with the rest; serves again */
            f->shutdown_timer.data = f;
            uv_timer_start(&f->shutdown_timer, others_done_tick, 0, 20);
            uv_run(f->loop, UV_RUN_DEFAULT);
        }
        for (int i = 1; i < started; i++) uv_thread_join(&g->shard[i]->thread);
    } else {
        for (int i = 0; i < opened; i++) {
            fe *s = g->shard[i];
            if (!s || !s->loop) continue;
            /* its close callbacks free the server (closing its handles by uv_walk would not) */
            bt_http_server_close(s->http, NULL, NULL);
            s->http = NULL;
            bt_proc_unwind(s->loop, &s->disc, &s->events);
        }
    }
    fe_journal_checks_stop(g->journal); /* its answers go to the shards' mailboxes, freed below */
    for (int i = 0; i < opened; i++) {
        fe *s = g->shard[i];
        if (!s) continue;
        if (s->loop) {
            uv_loop_close(s->loop);
            free(s->loop);
        }
        /* the admission state whose timer a start-up failure's unwind (or an ended loop) closed
         * without its close callback: no callback can run any more */
        free(s->admit);
        free(s->admit_closing);
        s->admit = s->admit_closing = NULL;
        for (fe_model *m = LIST_FIRST(&s->models), *n; m; m = n) {
            n = LIST_NEXT(m, link);
            free(m->ws);
            free(m);
        }
        bt_map_free(&s->workers_by_id);
        bt_buf_free(&s->scratch);
        bt_buf_free(&s->access_line);
        bt_pool_destroy(&s->req_pool);
        fe_mail_destroy(s);
        if (rc == 0 && s->exit_code) rc = s->exit_code;
        if (i > 0) free(s);
    }
    free(f->rpc_secret);
    fe_admit_policy_free(f->admit_policy);
    fe_journal_destroy(g->journal);
    bt_http_output_peers_free(g->output_peers);
    fe_access_stop(); /* after every shard: their last lines are written */
    free(g);
    free(f);
    return rc;

bad_usage:
    fe_admit_policy_free(f->admit_policy);
    free(f);
    return 2;
}
