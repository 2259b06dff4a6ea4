/* openai.c — the openai engine (see openai.h): sequences as streaming HTTP requests to an
 * OpenAI-compatible upstream, through libcurl's multi interface on the worker's loop.
 *
 * libcurl is fed by uv_poll handles (one per socket it asks us to watch) and one uv_timer
 * (common/curl_uv.h), so no call blocks the loop. libcurl callbacks only append bytes to a
 * bounded per-transfer buffer and list the transfer as having data; everything else (SSE parsing,
 * sink callbacks, ending transfers) runs after curl_multi_socket_action returns, where
 * curl_multi_remove_handle is allowed. Tokens go to the sink as they are parsed; endings are
 * staged and delivered after the libcurl step or, when they do not come from upstream data (stop,
 * errors found at submit time, a continuation with no tokens left), from a uv_idle, never from
 * submit, stop or kill.
 * Which callbacks may kill, stop, submit or destroy what, and when memory goes, is
 * engine/deliver.h's: every loop callback of the engine is bracketed by enter/leave.
 *
 * Sequence states: pending (the upstream has not answered its first probe yet) → preparing (a
 * continuation asks the upstream's /tokenize for the prompt's ids) → streaming → ended. The
 * upstream itself: unknown until GET /v1/models answers (which also tells its kind and model
 * name), then up; a refused connection after it was up, `health_failures` failed polls in a row,
 * or no answer at all within `startup_timeout` make it dead, which calls hooks.on_dead once. A poll
 * answered 401 or 403 means the upstream refuses the credentials: hooks.on_serving(false) keeps the
 * worker not ready until a poll is accepted (polling goes on; the same bounds apply). Messages a
 * client can read never name the upstream's address: the URL and libcurl's detail go to the log. */
#include "engine/openai/openai.h"

#include <curl/curl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/closer.h"
#include "common/curl_uv.h"
#include "common/log.h"
#include "common/util.h"
#include "engine/deliver.h"
#include "engine/openai/openai_wire.h"
#include "engine/openai/sse_parse.h"

#define OA_SSE_MAX_LINE ((size_t)4 << 20)     /* one SSE line */
#define OA_SSE_MAX_EVENT ((size_t)8 << 20)    /* one event's data */
#define OA_RX_STREAM_CAP ((size_t)16 << 20)   /* unparsed stream bytes, or a whole non-SSE answer */
#define OA_RX_PROBE_CAP ((size_t)8 << 20)     /* a probe's answer (/metrics of a big server included) */
#define OA_PROBE_TIMEOUT_MS 5000L             /* a health, models or metrics poll */
#define OA_TOKENIZE_TIMEOUT_MS 30000L         /* a /tokenize call before a continuation */
#define OA_ORPHAN_MS 5000u                    /* a finished stream's transfer may drain this long */
#define OA_METRICS_ABSENT_RETRY_MS 30000u     /* /metrics without vLLM gauges: look again this late */
/* At the request's token budget without the upstream's finish the answer is complete: the
 * upstream's own finish and usage are waited for this long, no more, since it is still generating
 * and its request is closed then. */
#define OA_FINISH_GRACE_MS 500u
/* After the upstream's finish its usage is waited for this long at most (and less when the
 * response goes silent for the stall bound, on_wait_timer): the usage is the client's bill and an
 * upstream may send it late, but a finished answer is not held back for good by an upstream that
 * never sends it (nor [DONE]) and keeps its response open, or sends only keep-alive comments. */
#define OA_USAGE_WAIT_MS 5000u

/* An upstream whose answer is not the API (invalid JSON, a broken event stream) is at fault, not
 * this worker: the attempt ends with an engine error, which is not migratable (the next worker
 * before the same upstream would be handed the same answer) and does not quarantine the worker,
 * which keeps serving other requests. BT_ERR_PROTOCOL, migratable, would quarantine each worker
 * in turn as the stream moved along them, leaving the model with none to route to. */
#define UPSTREAM_MALFORMED BT_ERR_ENGINE

typedef struct oa_engine oa_engine;
typedef enum { X_SEQ, X_TOKENIZE, X_RENDER, X_MODELS, X_HEALTH, X_METRICS } xfer_kind;
static const char *xfer_names[] = {"stream", "tokenize", "render", "models", "health", "metrics"};

typedef struct oa_xfer {
    oa_engine *e;
    xfer_kind kind;
    bt_engine_seq *seq; /* X_SEQ, X_TOKENIZE, X_RENDER; NULL once the sequence ended (an orphan draining) */
    CURL *easy;
    struct curl_slist *hdrs;
    char *body;
    bt_buf rx; /* response bytes not yet parsed */
    bool overflow, head_checked, sse, dirty;
    bool completing; /* libcurl reported it done: on_curl_done frees it, nothing else does */
    uint64_t orphan_ms; /* when it became an orphan */
    uint64_t start_ms, rx_ms; /* X_SEQ: when it started, when a byte of its body last came (0: none yet) */
    char errbuf[CURL_ERROR_SIZE];
    LIST_ENTRY(oa_xfer) link;   /* every transfer */
    TAILQ_ENTRY(oa_xfer) dlink; /* transfers with new bytes, while `dirty` */
} oa_xfer;

typedef enum { S_PENDING, S_PREPARING, S_STREAMING, S_ENDED } seq_state;
typedef enum { MODE_UNDECIDED, MODE_IDS, MODE_TEXT } seq_mode;

struct bt_engine_seq {
    bt_deliver_seq dl; /* sink, ending, liveness; the engine's list of sequences */
    oa_engine *e;
    seq_state state;
    char rid[72];
    /* the request, copied */
    bt_api api;
    json_t *body;
    uint32_t *carried;
    size_t n_carried;
    uint32_t max_tokens;
    int32_t priority;
    bt_oa_carried_kind carried_kind;
    bt_buf carried_text;
    uint32_t *prompt_ids;
    size_t n_prompt_ids;
    bool have_prompt_ids;
    char *rendered; /* a chat rendered by the upstream, for a continuation from text */
    size_t rendered_len;
    bool have_rendered;
    bool carried_in_body; /* sent as carried_token_ids: the upstream's usage already counts them */
    bool carried_in_prompt; /* appended to a token-id prompt: the upstream counts them as prompt */
    /* the attempt */
    oa_xfer *x;
    bt_sse_parser sse;
    seq_mode mode;
    bt_buf held_text; /* ids mode: text that came before its ids */
    uint64_t emitted; /* ids delivered on this attempt */
    bool usage_seen;
    uint32_t up_prompt, up_completion;
    int finish; /* from the upstream: a bt_finish_reason or BT_OA_FINISH_NONE */
    bool at_budget; /* max_tokens ids were delivered: anything more the upstream sends is dropped */
    uint64_t grace_ms; /* when the finish grace ends (OA_FINISH_GRACE_MS); 0: not in it */
};

#define SEQ_OF(ds) BT_DELIVER_OWNER(ds, bt_engine_seq, dl)

struct oa_engine {
    bt_engine base; /* first: the engine handle is a pointer to it */
    uv_loop_t *loop;
    bt_openai_config cfg;
    char *url, *model_cfg, *served, *api_key; /* owned copies */
    bt_oa_kind kind_cfg;
    bt_engine_hooks hooks;
    void *hooks_ud;

    bt_curl_uv *cu; /* libcurl on the loop; NULL once torn down */
    uv_timer_t health_timer, metrics_timer, grace_timer, wait_timer;
    uv_idle_t idle;
    bt_closer closer; /* the timers, the idle and cu, until their close callbacks */
    LIST_HEAD(, oa_xfer) xfers;
    TAILQ_HEAD(, oa_xfer) dirty;

    bt_deliver dl; /* the sequences, their pending endings, the re-entrancy rules */
    size_t n_pending, n_preparing, n_streaming;

    /* the upstream */
    bool detected, ever_up, dead, probe_failed, use_models_for_health;
    bool warned_no_usage; /* a stream finished without the upstream's usage: said once in the log */
    long auth_refused; /* the HTTP status (401, 403) of the upstream refusing the credentials, else 0 */
    /* a request was refused with 401 or 403: the next polls ask GET /v1/models, which checks the
     * credentials as GET /health (vLLM's, baton's) does not, until one is answered */
    bool check_auth;
    bt_oa_kind kind;
    char model[256];
    unsigned failures;
    uint64_t created_ms, last_ok_ms;
    oa_xfer *probe, *metrics_x;
    char last_err[256];

    /* load */
    bool have_vm, metrics_absent;
    uint64_t metrics_next_ms;
    bt_oa_vllm_metrics vm;
    bt_engine_load last_load;
};

static void enter(oa_engine *e) { bt_deliver_enter(&e->dl); }
static void leave(oa_engine *e);
static void start_probe(oa_engine *e);
static void on_idle(uv_idle_t *h);
static void on_grace_timer(uv_timer_t *t);
static void wait_timer_arm(oa_engine *e);
static void seq_complete(bt_engine_seq *s);
static void on_metrics_timer(uv_timer_t *t);
static void seq_fail(bt_engine_seq *s, bt_status code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Why a transfer failed, in words a client may read: libcurl's generic text for cc. Its error
 * buffer names the upstream's host and port ("Failed to connect to 10.0.0.7 port 8000"), which is
 * this deployment's inside and goes to the log only, with the URL. */
static const char *xfer_why(const oa_engine *e, const oa_xfer *x, CURLcode cc, const char *rid) {
    BT_INFO("openai: %s: %s to upstream %s failed: %s", rid, xfer_names[x->kind], e->url,
            x->errbuf[0] ? x->errbuf : curl_easy_strerror(cc));
    return curl_easy_strerror(cc);
}

/* Whether an upstream error's "param" can be passed on as the field a refusal names: a short
 * name without the quote that delimits it in the message, nor a control character. */
static bool param_ok(const char *p) {
    if (!p || !*p || strlen(p) > 64) return false;
    for (; *p; p++)
        if (*p == '\'' || (unsigned char)*p < 0x20 || *p == 0x7f) return false;
    return true;
}

/* The upstream's Retry-After on a finished transfer, in whole seconds (libcurl reads both the
 * delay and the HTTP-date form), capped at a day; 0 when it gave none. */
static long xfer_retry_after(const oa_xfer *x) {
    curl_off_t ra = 0;
    if (curl_easy_getinfo(x->easy, CURLINFO_RETRY_AFTER, &ra) != CURLE_OK || ra <= 0) return 0;
    return ra > 86400 ? 86400 : (long)ra;
}

/* The head of an upstream refusal's message: "retry after N s: " when the upstream is busy and
 * said for how long (bt_status_retry_after reads it back at the frontend), else "". */
static const char *retry_head(const oa_xfer *x, bt_status st, char *buf, size_t len) {
    long ra = bt_status_upstream_busy(st) ? xfer_retry_after(x) : 0;
    if (!ra) return "";
    snprintf(buf, len, "retry after %ld s: ", ra);
    return buf;
}

/* ---- libcurl on the loop ------------------------------------------------------------------ */

static void engine_free(void *ud) {
    oa_engine *e = ud;
    free(e->url);
    free(e->model_cfg);
    free(e->served);
    free(e->api_key);
    free(e);
}

/* libcurl's write callback: only buffers (bounded) and lists the transfer; parsing and sink
 * callbacks happen in on_curl_step and on_curl_done, outside libcurl. */
static size_t on_write(char *ptr, size_t size, size_t nmemb, void *ud) {
    oa_xfer *x = ud;
    size_t n = size * nmemb;
    if (!x->seq && x->kind == X_SEQ) return n; /* an orphan draining after [DONE]: discard */
    if (bt_buf_append(&x->rx, ptr, n) != BT_OK) {
        x->overflow = true;
        return 0; /* aborts the transfer */
    }
    if (x->kind == X_SEQ && n) x->rx_ms = bt_now_ms();
    if (x->kind == X_SEQ && !x->dirty) {
        x->dirty = true;
        TAILQ_INSERT_TAIL(&x->e->dirty, x, dlink);
    }
    return n;
}

static void dirty_remove(oa_engine *e, oa_xfer *x) {
    if (!x->dirty) return;
    TAILQ_REMOVE(&e->dirty, x, dlink);
    x->dirty = false;
}

/* Stops a transfer (closing its connection if it is still running) and frees it. Never called
 * from inside a libcurl callback. */
static void xfer_free(oa_engine *e, oa_xfer *x) {
    if (!x) return;
    dirty_remove(e, x);
    if (x->easy) {
        bt_curl_uv_remove(e->cu, x->easy);
        curl_easy_cleanup(x->easy);
    }
    LIST_REMOVE(x, link);
    if (e->probe == x) e->probe = NULL;
    if (e->metrics_x == x) e->metrics_x = NULL;
    curl_slist_free_all(x->hdrs);
    bt_buf_free(&x->rx);
    free(x->body);
    free(x);
}

static bool rid_is_header_safe(const char *s) {
    if (!*s) return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_' || *s == '.' || *s == ':'))
            return false;
    return true;
}

/* Starts GET (body NULL) or POST (body taken over) of url+path. NULL when out of memory or
 * libcurl refuses; body is freed then. */
static oa_xfer *xfer_start(oa_engine *e, xfer_kind kind, const char *path, char *body, long timeout_ms,
                           const char *rid) {
    oa_xfer *x = calloc(1, sizeof *x);
    if (!x) {
        free(body);
        return NULL;
    }
    x->e = e;
    x->kind = kind;
    x->body = body;
    bt_buf_init(&x->rx, kind == X_SEQ || kind == X_TOKENIZE || kind == X_RENDER ? OA_RX_STREAM_CAP : OA_RX_PROBE_CAP);
    LIST_INSERT_HEAD(&e->xfers, x, link);
    x->easy = curl_easy_init();
    if (!x->easy) goto fail;
    char url[1200];
    snprintf(url, sizeof url, "%s%s", e->url, path);
    char hdr[600];
    if (e->api_key) {
        snprintf(hdr, sizeof hdr, "Authorization: Bearer %s", e->api_key);
        x->hdrs = curl_slist_append(x->hdrs, hdr);
    }
    if (body) {
        x->hdrs = curl_slist_append(x->hdrs, "Content-Type: application/json");
        x->hdrs = curl_slist_append(x->hdrs, "Expect:");
    }
    if (kind == X_SEQ) x->hdrs = curl_slist_append(x->hdrs, "Accept: text/event-stream");
    if (rid && rid_is_header_safe(rid)) {
        snprintf(hdr, sizeof hdr, "X-Request-Id: %s", rid);
        x->hdrs = curl_slist_append(x->hdrs, hdr);
    }
    CURL *c = x->easy;
    curl_easy_setopt(c, CURLOPT_URL, url);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, x->body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(x->body));
    }
    if (x->hdrs) curl_easy_setopt(c, CURLOPT_HTTPHEADER, x->hdrs);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(c, CURLOPT_PRIVATE, x);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, x->errbuf);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROXY, ""); /* the upstream is reached directly, whatever *_proxy says */
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)(e->cfg.connect_timeout * 1000.0));
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms); /* 0 = none: a stream lasts as long as it must */
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPIDLE, 10L);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPINTVL, 5L);
    curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
    /* A stream's silences are timed by on_wait_timer, not by libcurl's low-speed limit: that limit
     * runs from the request on, so the upstream's queue and prefill before the first byte would
     * count as a stall, and a transfer's options cannot be changed once it runs. */
    x->start_ms = bt_now_ms();
    if (bt_curl_uv_add(e->cu, c) != BT_OK) goto fail;
    return x;
fail:
    if (x->easy) {
        curl_easy_cleanup(x->easy);
        x->easy = NULL;
    }
    xfer_free(e, x);
    return NULL;
}

/* ---- load ----------------------------------------------------------------------------------- */

static void load_snapshot(oa_engine *e, bt_engine_load *out) {
    memset(out, 0, sizeof *out);
    out->total_blocks = (uint64_t)e->cfg.total_blocks;
    out->running = e->n_streaming + e->n_preparing;
    out->waiting = e->n_pending;
    if (e->have_vm) {
        if (e->vm.have_usage) out->active_decode_blocks = (uint64_t)llround(e->vm.kv_usage * (double)out->total_blocks);
        if (e->vm.have_running) out->running = (uint64_t)llround(e->vm.running);
        if (e->vm.have_waiting) out->waiting = (uint64_t)llround(e->vm.waiting);
    }
}

static void report_load(oa_engine *e) {
    if (bt_deliver_closed(&e->dl)) return;
    bt_engine_load l;
    load_snapshot(e, &l);
    if (memcmp(&l, &e->last_load, sizeof l) == 0) return;
    e->last_load = l;
    if (e->hooks.on_load) e->hooks.on_load(e->hooks_ud);
}

/* ---- sequences ------------------------------------------------------------------------------ */

static void count_state(oa_engine *e, seq_state st, int d) {
    size_t *c = st == S_PENDING ? &e->n_pending : st == S_PREPARING ? &e->n_preparing
                : st == S_STREAMING ? &e->n_streaming : NULL;
    if (c) *c = (size_t)((long)*c + d);
}

static void seq_set_state(bt_engine_seq *s, seq_state st) {
    count_state(s->e, s->state, -1);
    s->state = st;
    count_state(s->e, st, +1);
}

/* Frees what the engine owns in s (deliver's part is released by its caller). */
static void seq_free(bt_engine_seq *s) {
    json_decref(s->body);
    free(s->carried);
    free(s->prompt_ids);
    free(s->rendered);
    bt_buf_free(&s->carried_text);
    bt_buf_free(&s->held_text);
    bt_sse_free(&s->sse);
    free(s);
}

/* Lets the sequence's transfer go: a running stream is cut (closing the connection, which makes
 * the upstream abort), a finished one may drain to its end as an orphan. */
static void seq_detach(bt_engine_seq *s, bool cut) {
    oa_xfer *x = s->x;
    if (!x) return;
    s->x = NULL;
    if (x->completing) { /* on_curl_done frees it */
        dirty_remove(s->e, x);
        x->seq = NULL;
        return;
    }
    if (cut) {
        xfer_free(s->e, x);
    } else {
        dirty_remove(s->e, x);
        x->seq = NULL;
        x->orphan_ms = bt_now_ms();
    }
}

/* deliver's free_seq: s is dead; its transfer is cut if it still has one. */
static void free_seq(void *owner, bt_deliver_seq *ds) {
    (void)owner;
    bt_engine_seq *s = SEQ_OF(ds);
    seq_detach(s, true);
    seq_set_state(s, S_ENDED);
    seq_free(s);
}

/* deliver's wake: an ending was staged; it is delivered from the idle (or the step's end). */
static void idle_arm(void *owner) {
    oa_engine *e = owner;
    if (!bt_deliver_closed(&e->dl) && !uv_is_active((uv_handle_t *)&e->idle)) uv_idle_start(&e->idle, on_idle);
}

static void seq_usage(const bt_engine_seq *s, bt_usage *u);

/* The sequence leaves the upstream's work, once: false when it had ended already. Its sink hears
 * the ending at the next drain. */
static bool seq_ending(bt_engine_seq *s, bool cut) {
    if (bt_deliver_ended(&s->dl)) return false;
    seq_detach(s, cut);
    seq_set_state(s, S_ENDED);
    return true;
}

static void seq_finish(bt_engine_seq *s, bt_finish_reason reason, bool cut) {
    if (!seq_ending(s, cut)) return;
    BT_DEBUG("openai: %s finished after %llu ids (%s)", s->rid, (unsigned long long)s->emitted,
             bt_finish_reason_name(reason));
    bt_usage u;
    seq_usage(s, &u);
    bool asked = s->max_tokens || !s->n_carried; /* a spent continuation may have asked nothing */
    if (!s->usage_seen && asked && reason != BT_FINISH_CANCELLED && !s->e->warned_no_usage) {
        /* asked for (stream_options.include_usage) but not given: the usage is marked unreported
         * (a client's answer says null; an older frontend gets this engine's own count) */
        s->e->warned_no_usage = true;
        BT_WARN("openai: %s: upstream %s finished a stream without usage although it was asked for: its usage is "
                "reported as unknown (said once)", s->rid, s->e->url);
    }
    bt_deliver_finish(&s->e->dl, &s->dl, reason, &u);
}

static void seq_fail(bt_engine_seq *s, bt_status code, const char *fmt, ...) {
    if (!seq_ending(s, true)) return;
    va_list ap;
    va_start(ap, fmt);
    bt_deliver_verror(&s->e->dl, &s->dl, code, fmt, ap);
    va_end(ap);
    BT_DEBUG("openai: %s failed after %llu ids (%s)", s->rid, (unsigned long long)s->emitted, s->dl.msg);
}

static void seq_usage(const bt_engine_seq *s, bt_usage *u) {
    uint32_t pt = s->usage_seen ? s->up_prompt : 0;
    if (s->carried_in_prompt && pt >= s->n_carried) pt -= (uint32_t)s->n_carried;
    if (s->carried_in_prompt && s->have_prompt_ids) pt = (uint32_t)s->n_prompt_ids;
    /* A raw completion's prompt is the prompt text + the delivered text, which the upstream counts
     * as prompt; the delivered chunks are counted as completion below (one per chunk, as the
     * frontend's budget counts them), so they leave the prompt here: the usage is the run's, not
     * the delivered text twice, and its total stays the upstream's own. */
    if (s->carried_kind == BT_OA_CARRIED_TEXT)
        pt = pt > s->n_carried ? pt - (uint32_t)s->n_carried : 0;
    uint64_t ct;
    /* A baton upstream counts the carried_token_ids it was given in completion_tokens
     * (docs/engines.md §2.6). Older versions capped that count at max_tokens, so it may fall short
     * of the carried ids and the ids streamed here: those are then the count (never the upstream's
     * count plus the carried ones, which it may already hold in part). */
    if (s->carried_in_body) {
        uint64_t known = s->n_carried + s->emitted;
        ct = s->usage_seen && s->up_completion > known ? s->up_completion : known;
    } else {
        ct = s->n_carried + (s->usage_seen ? s->up_completion : s->emitted);
    }
    u->prompt_tokens = pt;
    u->completion_tokens = ct > UINT32_MAX ? UINT32_MAX : (uint32_t)ct;
    u->unreported = !s->usage_seen;
}

/* A continuation this upstream cannot make exactly. BT_ERR_NO_WORKER is not migratable, so the
 * frontend ends the stream with its error event (503) instead of trying the next worker, which
 * would refuse it the same way in a fleet of one kind; and a worker that refuses is not faulty,
 * so it is not quarantined either. */
static void seq_refuse(bt_engine_seq *s, const char *why) {
    BT_WARN("openai: %s: refusing to continue a stream after %zu delivered tokens: %s", s->rid, s->n_carried, why);
    seq_fail(s, BT_ERR_NO_WORKER, "no worker can continue this stream exactly after %zu tokens: %s", s->n_carried,
             why);
}

/* Ends the sequences whose finish grace is over, with what the upstream gave, and waits for the
 * next one. */
static void on_grace_timer(uv_timer_t *t) {
    oa_engine *e = t->data;
    enter(e);
    uint64_t now = bt_now_ms(), next = 0;
    for (bt_deliver_seq *d = bt_deliver_first(&e->dl), *nx; d && !bt_deliver_closed(&e->dl); d = nx) {
        nx = bt_deliver_next(d);
        bt_engine_seq *s = SEQ_OF(d);
        if (!s->grace_ms || bt_deliver_ended(&s->dl)) continue;
        if (now >= s->grace_ms) seq_complete(s);
        else if (!next || s->grace_ms < next) next = s->grace_ms;
    }
    if (next && !bt_deliver_closed(&e->dl)) uv_timer_start(&e->grace_timer, on_grace_timer, next - now, 0);
    leave(e);
}

/* The period of the sweep that times the streams' upstream requests: a quarter of the shorter
 * bound, within [50 ms, 1 s], so a request fails within a quarter of its bound past it. 0: no
 * bound is set. */
static uint64_t wait_period_ms(const oa_engine *e) {
    double b = e->cfg.stall_timeout > 0 ? e->cfg.stall_timeout : 0;
    if (e->cfg.first_byte_timeout > 0 && (b == 0 || e->cfg.first_byte_timeout < b)) b = e->cfg.first_byte_timeout;
    if (b <= 0) return 0;
    double p = b * 1000.0 / 4.0;
    return p < 50.0 ? 50u : p > 1000.0 ? 1000u : (uint64_t)p;
}

/* Each stream's upstream request is timed on its own, so that one slow request fails alone (the
 * worker-wide engine monitor does not watch this engine):
 * - before the first byte of its answer's body, first_byte_timeout. The upstream holds the request
 *   in its queue or its prefill (vLLM sends its headers at once and its first event only then):
 *   neither the worker nor the upstream is broken, and another worker's upstream would make the
 *   client wait again from the start, so the request fails with BT_ERR_UPSTREAM_TIMEOUT (504 to
 *   the client), not migrated, and no worker is quarantined.
 * - once the answer began, stall_timeout without a byte: a stream broken mid-way, BT_ERR_TIMEOUT,
 *   migrated as a cut one; after the upstream's finish, the end of the wait for its usage.
 * A request that fails is closed, which makes the upstream drop it. */
static void on_wait_timer(uv_timer_t *t) {
    oa_engine *e = t->data;
    enter(e);
    uint64_t now = bt_now_ms();
    double fb = e->cfg.first_byte_timeout, st = e->cfg.stall_timeout;
    bool any = false;
    for (oa_xfer *x = LIST_FIRST(&e->xfers), *next; x && !bt_deliver_closed(&e->dl); x = next) {
        next = LIST_NEXT(x, link); /* seq_fail frees x, and nothing else */
        bt_engine_seq *s = x->seq;
        if (x->kind != X_SEQ || !s || s->x != x || x->completing || bt_deliver_ended(&s->dl)) continue;
        any = true;
        if (!x->rx_ms && fb > 0 && (double)(now - x->start_ms) >= fb * 1000.0) {
            BT_WARN("openai: %s: upstream %s has not begun its answer within %gs (--upstream-first-byte-timeout); "
                    "failing that request alone", s->rid, e->url, fb);
            seq_fail(s, BT_ERR_UPSTREAM_TIMEOUT,
                     "the upstream did not begin its answer within %gs (--upstream-first-byte-timeout): it may be "
                     "queueing the request", fb);
        } else if (x->rx_ms && st > 0 && (double)(now - x->rx_ms) >= st * 1000.0) {
            if (s->finish != BT_OA_FINISH_NONE || s->at_budget) /* the answer is whole: only its usage is missing */
                seq_complete(s);
            else
                seq_fail(s, BT_ERR_TIMEOUT, "the upstream sent nothing for %gs after %llu ids (--engine-stuck-timeout)",
                         st, (unsigned long long)s->emitted);
        }
    }
    if (!any) uv_timer_stop(&e->wait_timer);
    leave(e);
}

static void wait_timer_arm(oa_engine *e) {
    uint64_t p = wait_period_ms(e);
    if (p && !bt_deliver_closed(&e->dl) && !uv_is_active((uv_handle_t *)&e->wait_timer))
        uv_timer_start(&e->wait_timer, on_wait_timer, p, p);
}

static void on_idle(uv_idle_t *h) {
    oa_engine *e = h->data;
    enter(e);
    bt_deliver_drain(&e->dl);
    if (!bt_deliver_pending(&e->dl)) uv_idle_stop(&e->idle);
    leave(e);
}

/* Delivers one chunk's tokens. Returns false when the sequence is gone or ended afterwards. */
static bool seq_emit(bt_engine_seq *s, const bt_oa_chunk *c) {
    const char *text = c->text ? c->text : "";
    size_t tl = c->text ? c->text_len : 0;
    if (s->mode == MODE_UNDECIDED) {
        if (c->has_ids && (c->n_ids > 0 || tl > 0)) s->mode = MODE_IDS;
        else if (tl > 0) s->mode = MODE_TEXT;
        else return true;
        BT_DEBUG("openai: %s: the upstream gives %s", s->rid, s->mode == MODE_IDS ? "token ids" : "text only");
    }
    if (s->mode == MODE_IDS) {
        if (!c->has_ids) {
            if (tl == 0) return true;
            seq_fail(s, UPSTREAM_MALFORMED, "the upstream sent text without token ids after sending token ids");
            return false;
        }
        if (c->n_ids == 0) { /* text ahead of its ids: it goes with the next ids */
            if (tl && bt_buf_append(&s->held_text, text, tl) != BT_OK) {
                seq_fail(s, BT_ERR_TOO_LARGE, "text without token ids exceeds the engine's cap");
                return false;
            }
            return true;
        }
        if (s->held_text.len) {
            if (bt_buf_append(&s->held_text, text, tl) != BT_OK) {
                seq_fail(s, BT_ERR_TOO_LARGE, "text without token ids exceeds the engine's cap");
                return false;
            }
            text = s->held_text.data;
            tl = s->held_text.len;
        }
        s->emitted += c->n_ids;
        bool live = bt_deliver_now(&s->e->dl, &s->dl, c->ids, c->n_ids, text, tl);
        if (!bt_deliver_dead(&s->dl)) bt_buf_reset(&s->held_text);
        return live;
    }
    if (tl == 0) return true;
    uint32_t id = bt_oa_text_id(s->n_carried + s->emitted); /* one per chunk: its position */
    s->emitted++;
    return bt_deliver_now(&s->e->dl, &s->dl, &id, 1, text, tl);
}

/* The upstream's finish, or the token budget reached: delivered when the usage, [DONE] or the
 * end of the transfer comes, or when the finish grace ends. After the upstream's own finish the
 * transfer is not cut: it may read the rest of the response, so the upstream sees no client
 * disconnect; at the budget without one, the upstream is still generating and its request is
 * closed. */
static void seq_complete(bt_engine_seq *s) {
    if (s->finish != BT_OA_FINISH_NONE) seq_finish(s, (bt_finish_reason)s->finish, false);
    else seq_finish(s, BT_FINISH_LENGTH, true);
}

/* The answer is complete (at the budget, or the upstream's finish): what may still come is the
 * upstream's finish and usage, waited for ms at most (on_grace_timer ends the wait). */
static void seq_grace(bt_engine_seq *s, uint64_t ms) {
    oa_engine *e = s->e;
    if (s->grace_ms) return;
    s->grace_ms = bt_now_ms() + ms;
    /* the timer is armed for the earliest grace: a shorter one restarts it */
    if (!uv_is_active((uv_handle_t *)&e->grace_timer) || uv_timer_get_due_in(&e->grace_timer) > ms)
        uv_timer_start(&e->grace_timer, on_grace_timer, ms, 0);
}

/* The upstream's answer is over: [DONE], or the end of a whole (non-streamed) answer. Without a
 * finish (or the budget reached) the answer may be cut short, so it is no success; but it is the
 * upstream's way of answering (a server that never sends finish_reason would answer the same on
 * every worker), so it is UPSTREAM_MALFORMED, not a cut to migrate: no worker is quarantined for
 * it. The same rule for both shapes of answer: a server that ignores "stream": true is not
 * believed more than one that streams. */
static void seq_answer_end(bt_engine_seq *s, const char *how) {
    if (s->finish != BT_OA_FINISH_NONE || s->at_budget) seq_complete(s);
    else
        seq_fail(s, UPSTREAM_MALFORMED, "the upstream %s after %llu ids without a finish_reason", how,
                 (unsigned long long)s->emitted);
}

/* One chunk of the answer (an SSE event's, or a whole answer's) that is neither [DONE] nor an
 * error: its usage, its tokens, its finish. Returns false when the sequence is gone or ended. */
static bool seq_chunk(bt_engine_seq *s, const bt_oa_chunk *c) {
    if (c->has_usage) {
        s->usage_seen = true;
        s->up_prompt = c->prompt_tokens;
        s->up_completion = c->completion_tokens;
    }
    bool tail = s->finish != BT_OA_FINISH_NONE || s->at_budget;
    bool content = (c->text && c->text_len > 0) || (c->has_ids && c->n_ids > 0);
    if (tail && content) {
        /* past the budget (or the finish): the answer is complete, and an upstream that goes on
         * generating is told to stop by closing its request */
        seq_finish(s, s->finish != BT_OA_FINISH_NONE ? (bt_finish_reason)s->finish : BT_FINISH_LENGTH, true);
        return false;
    }
    bool live = tail || seq_emit(s, c);
    if (live && c->finish != BT_OA_FINISH_NONE && s->finish == BT_OA_FINISH_NONE) {
        if (c->finish == BT_OA_FINISH_ABORT) {
            seq_fail(s, BT_ERR_DISCONNECTED, "the upstream aborted the request");
            return false;
        }
        s->finish = c->finish;
    }
    if (live && s->finish == BT_OA_FINISH_NONE && !s->at_budget && s->max_tokens && s->emitted >= s->max_tokens)
        s->at_budget = true;
    if (live && (s->finish != BT_OA_FINISH_NONE || s->at_budget)) {
        if (c->has_usage && s->finish != BT_OA_FINISH_NONE) { /* the usage came with or after the finish */
            seq_complete(s);
            return false;
        }
        /* After the upstream's own finish its usage chunk is waited for: the usage is the
         * client's bill, and an upstream that sends it late has still reported it. The wait ends
         * at [DONE] or the end of the response, and at the latest after OA_USAGE_WAIT_MS or the
         * stall bound's silence (on_wait_timer), the answer whole and its usage unreported. At
         * the budget without a finish, the upstream is still generating: OA_FINISH_GRACE_MS. */
        seq_grace(s, s->finish == BT_OA_FINISH_NONE ? OA_FINISH_GRACE_MS : OA_USAGE_WAIT_MS);
    }
    return live;
}

/* One SSE data payload. Returns false when the sequence is gone or ended. */
static bool seq_event(bt_engine_seq *s, const char *data, size_t len) {
    bt_oa_chunk c;
    char err[256];
    bt_status st = bt_oa_parse_chunk(data, len, false, &c, err, sizeof err);
    bool live = false;
    if (st != BT_OK) { /* not migratable, no quarantine: see UPSTREAM_MALFORMED */
        seq_fail(s, st == BT_ERR_NOMEM ? st : UPSTREAM_MALFORMED, "%s", err);
    } else if (c.done) {
        seq_answer_end(s, "sent [DONE]");
    } else if (c.is_error) {
        /* a busy upstream's error after this attempt's tokens is a stream broken mid-way: it moves
         * as it always did, its worker quarantined until it proves itself */
        bt_status code = bt_status_upstream_busy(c.err_code) && s->emitted ? BT_ERR_CANNOT_CONNECT : c.err_code;
        seq_fail(s, code, "upstream error: %s", c.err_msg);
    } else {
        live = seq_chunk(s, &c);
    }
    bt_oa_chunk_free(&c);
    return live;
}

/* Parses what a stream transfer received. */
static void xfer_process(oa_engine *e, oa_xfer *x) {
    bt_engine_seq *s = x->seq;
    if (!s) return;
    if (!x->head_checked) {
        long code = 0;
        char *ctype = NULL;
        curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
        curl_easy_getinfo(x->easy, CURLINFO_CONTENT_TYPE, &ctype);
        x->head_checked = true;
        x->sse = code == 200 && ctype && strncasecmp(ctype, "text/event-stream", 17) == 0;
    }
    if (!x->sse) return; /* a whole answer (or an error body): read when the transfer ends */
    size_t off = 0;
    while (s->x == x && !bt_deliver_ended(&s->dl) && !bt_deliver_closed(&e->dl) && off < x->rx.len) {
        size_t used = 0;
        bt_sse_event ev;
        const char *perr = NULL;
        bt_status st = bt_sse_next(&s->sse, x->rx.data + off, x->rx.len - off, &used, &ev, &perr);
        off += used;
        if (st == BT_ERR_AGAIN) break;
        if (st != BT_OK) {
            seq_fail(s, st == BT_ERR_PROTOCOL ? UPSTREAM_MALFORMED : st, "upstream event stream: %s",
                     perr ? perr : bt_status_msg(st));
            return;
        }
        if (ev.event_len == 5 && memcmp(ev.event, "error", 5) == 0) {
            seq_fail(s, BT_ERR_ENGINE, "upstream error event: %.200s", ev.data);
            return;
        }
        if (!seq_event(s, ev.data, ev.data_len)) return;
    }
    if (s->x == x) bt_buf_consume(&x->rx, off);
}

/* The upstream answered a stream request with something other than 200 + SSE, or a stream
 * transfer ended: decides how the sequence ends. */
static void stream_done(oa_engine *e, oa_xfer *x, CURLcode cc) {
    bt_engine_seq *s = x->seq;
    if (!s || s->x != x) return;
    if (cc == CURLE_OK) xfer_process(e, x);
    if (s->x != x || bt_deliver_ended(&s->dl) || bt_deliver_closed(&e->dl)) return;
    long code = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    if (cc != CURLE_OK) {
        if (x->overflow) {
            seq_fail(s, BT_ERR_TOO_LARGE, "the upstream's answer exceeds the engine's cap");
        } else if (cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST || cc == CURLE_OPERATION_TIMEDOUT) {
            /* a stream's only libcurl time limit is the connect timeout (on_wait_timer times the rest) */
            seq_fail(s, BT_ERR_CANNOT_CONNECT, "cannot connect to the upstream: %s", xfer_why(e, x, cc, s->rid));
            start_probe(e); /* find out now whether the upstream is gone */
        } else {
            seq_fail(s, BT_ERR_DISCONNECTED, "the upstream stream broke after %llu ids: %s",
                     (unsigned long long)s->emitted, xfer_why(e, x, cc, s->rid));
            start_probe(e);
        }
        return;
    }
    if (code != 200) {
        bt_oa_chunk c;
        char err[256];
        const char *what = "";
        char field[72] = ""; /* "'param': " when the upstream's error names a request field */
        bt_status st = bt_oa_status_for_http(code);
        if (bt_oa_parse_chunk(x->rx.data ? x->rx.data : "", x->rx.len, true, &c, err, sizeof err) == BT_OK &&
            c.is_error) {
            what = c.err_msg;
            /* OpenAI's (and a baton upstream's) 400 context_length_exceeded stays that error, so
             * the client gets it with its code and param, as from the upstream itself */
            if (code == 400 && c.err_code == BT_ERR_CONTEXT_LENGTH) st = BT_ERR_CONTEXT_LENGTH;
            /* a 400 or 422 that names the field goes on as a refusal of that field: the message
             * begins with its quoted name, which the frontend answers as `param` (engine/params.h),
             * and an upstream's "unsupported_value" keeps its code */
            else if ((code == 400 || code == 422) && param_ok(c.err_param)) {
                bool unsup = c.err_scode && strcmp(c.err_scode, "unsupported_value") == 0;
                st = unsup ? BT_ERR_UNSUPPORTED_PARAM : BT_ERR_INVALID_PARAM;
                snprintf(field, sizeof field, "'%s': ", c.err_param);
            }
        }
        char head[48];
        seq_fail(s, st, "%s%sthe upstream answered HTTP %ld%s%.200s", field, retry_head(x, st, head, sizeof head),
                 code, *what ? ": " : "", what);
        if (code == 401 || code == 403) { /* the key may have been revoked: the poll decides readiness */
            e->check_auth = true;
            start_probe(e);
        }
        bt_oa_chunk_free(&c);
        return;
    }
    if (x->sse) {
        bt_sse_event ev;
        if (bt_sse_end(&s->sse, &ev, NULL) == BT_OK && !seq_event(s, ev.data, ev.data_len)) return;
        if (s->x != x || bt_deliver_ended(&s->dl)) return;
        if (s->finish != BT_OA_FINISH_NONE || s->at_budget) seq_complete(s);
        else
            seq_fail(s, BT_ERR_DISCONNECTED, "the upstream ended the stream after %llu ids without finishing it",
                     (unsigned long long)s->emitted);
        return;
    }
    /* a whole (non-streamed) answer, from a server that ignored "stream": true */
    bt_oa_chunk c;
    char err[256];
    bt_status st = bt_oa_parse_chunk(x->rx.data ? x->rx.data : "", x->rx.len, true, &c, err, sizeof err);
    if (st != BT_OK) seq_fail(s, st == BT_ERR_NOMEM ? st : UPSTREAM_MALFORMED, "%s", err);
    else if (c.is_error) seq_fail(s, c.err_code, "upstream error: %s", c.err_msg);
    else if (seq_chunk(s, &c) && s->x == x && !bt_deliver_ended(&s->dl))
        seq_answer_end(s, "ended its whole (non-streamed) answer"); /* as [DONE] after that one chunk */
    bt_oa_chunk_free(&c);
}

static void fill_build(oa_engine *e, const bt_engine_seq *s, bt_oa_build *b) {
    memset(b, 0, sizeof *b);
    b->api = s->api;
    b->body = s->body;
    b->model = e->model[0] ? e->model : NULL;
    b->kind = e->kind;
    b->max_tokens = s->max_tokens;
    b->priority = s->priority;
    b->carried = s->carried;
    b->n_carried = s->n_carried;
    b->carried_text = s->carried_text.data ? s->carried_text.data : "";
    b->carried_text_len = s->carried_text.len;
    b->prompt_ids = s->prompt_ids;
    b->n_prompt_ids = s->n_prompt_ids;
    b->have_prompt_ids = s->have_prompt_ids;
    b->raw_completions = e->cfg.raw_completions;
    b->rendered = s->rendered;
    b->rendered_len = s->rendered_len;
    b->have_rendered = s->have_rendered;
}

/* Gives the sequence its new transfer x (NULL: it could not start, out of memory, which fails the
 * sequence) and moves it to state st. True when x started. */
static bool seq_attach(bt_engine_seq *s, oa_xfer *x, seq_state st, const char *what) {
    if (!x) {
        seq_fail(s, BT_ERR_NOMEM, "cannot start %s (out of memory)", what);
        return false;
    }
    x->seq = s;
    s->x = x;
    seq_set_state(s, st);
    return true;
}

static void seq_start_stream(bt_engine_seq *s) {
    oa_engine *e = s->e;
    bt_oa_build b;
    fill_build(e, s, &b);
    const char *path;
    json_t *body = NULL;
    char err[256];
    bt_status st = bt_oa_build_request(&b, &path, &body, err, sizeof err);
    if (st != BT_OK) {
        seq_fail(s, st, "%s", err);
        return;
    }
    s->carried_in_body = s->carried_kind == BT_OA_CARRIED_IDS && json_object_get(body, "carried_token_ids") != NULL;
    s->carried_in_prompt = s->carried_kind == BT_OA_CARRIED_IDS && !s->carried_in_body;
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    oa_xfer *x = text ? xfer_start(e, X_SEQ, path, text, 0, s->rid) : NULL;
    if (!seq_attach(s, x, S_STREAMING, "the upstream request")) return;
    wait_timer_arm(e);
    BT_DEBUG("openai: %s: POST %s%s (%zu carried, max_tokens %u)", s->rid, e->url, path, s->n_carried, s->max_tokens);
}

/* A continuation with nothing left to generate (its whole budget was delivered before the stream
 * moved): its answer is the carried tokens, ending with length, and what is left to learn is its
 * usage, which is the upstream's count wherever one can be had without generating:
 * - a baton upstream given the carried ids and max_tokens 0 counts the prompt and the carried ids,
 *   as for the whole run: the request goes upstream as any other (false);
 * - a token-id continuation (vLLM's): the prompt's ids are the prompt itself or what /tokenize
 *   answers (plan's step first: false), the completion is the carried ids (vLLM refuses
 *   max_tokens 0, so nothing goes to its completions);
 * - otherwise the upstream never counted any of this answer (text-mode ids are chunks, not
 *   tokens, and the prompt's count is the upstream's alone): its usage is unreported.
 * True when the sequence ended here. */
static bool seq_spent(bt_engine_seq *s, bt_oa_plan plan) {
    const bt_oa_caps *caps = bt_oa_kind_caps(s->e->kind);
    if (s->carried_kind == BT_OA_CARRIED_IDS && caps->ids == BT_OA_CONT_CARRIED_IDS) return false;
    if (s->carried_kind == BT_OA_CARRIED_IDS && caps->ids == BT_OA_CONT_TOKEN_PROMPT) {
        if (plan != BT_OA_PLAN_DIRECT) return false;
        s->usage_seen = true;
        s->up_prompt = (uint32_t)(s->have_prompt_ids ? s->n_prompt_ids
                                                     : json_array_size(json_object_get(s->body, "prompt")));
        s->up_completion = 0;
    }
    seq_finish(s, BT_FINISH_LENGTH, true);
    return true;
}

/* Starts the sequence once the upstream is known: a continuation that needs the prompt's token
 * ids asks /tokenize first, one that needs a chat rendered asks the kind's render path first. */
static void seq_start(bt_engine_seq *s) {
    oa_engine *e = s->e;
    bt_oa_build b;
    fill_build(e, s, &b);
    char err[256];
    bt_oa_plan plan = bt_oa_plan_for(&b, err, sizeof err);
    if (s->max_tokens == 0 && s->n_carried && seq_spent(s, plan)) return;
    switch (plan) {
    case BT_OA_PLAN_IMPOSSIBLE: seq_refuse(s, err); return;
    case BT_OA_PLAN_DIRECT: seq_start_stream(s); return;
    case BT_OA_PLAN_TOKENIZE:
    case BT_OA_PLAN_RENDER: break;
    }
    bool render = plan == BT_OA_PLAN_RENDER;
    const char *path = render ? bt_oa_kind_caps(e->kind)->render_path : "/tokenize";
    json_t *t = render ? bt_oa_render_body(&b) : bt_oa_tokenize_body(&b);
    char *text = t ? json_dumps(t, JSON_COMPACT) : NULL;
    json_decref(t);
    oa_xfer *x = text ? xfer_start(e, render ? X_RENDER : X_TOKENIZE, path, text, OA_TOKENIZE_TIMEOUT_MS, s->rid)
                      : NULL;
    seq_attach(s, x, S_PREPARING, render ? "the chat rendering request" : "the /tokenize request");
}

/* The /tokenize or render answer came: the stream starts, or the sequence ends. */
static void prepare_done(oa_xfer *x, CURLcode cc) {
    bt_engine_seq *s = x->seq;
    if (!s || s->x != x) return;
    const char *what = x->kind == X_RENDER ? bt_oa_kind_caps(s->e->kind)->render_path : "/tokenize";
    long code = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    char err[256];
    if (cc == CURLE_OK && (code == 404 || code == 405 || code == 501)) {
        /* the mechanism the continuation needs is not there: no other attempt would do better */
        snprintf(err, sizeof err, "the upstream has no POST %s (HTTP %ld)", what, code);
        seq_refuse(s, err);
        return;
    }
    if (cc != CURLE_OK || code != 200) {
        bt_status st = cc != CURLE_OK ? BT_ERR_CANNOT_CONNECT : bt_oa_status_for_http(code);
        char head[48];
        if (cc != CURLE_OK) seq_fail(s, st, "the upstream's %s failed: %s", what, xfer_why(s->e, x, cc, s->rid));
        else seq_fail(s, st, "%sthe upstream's %s answered HTTP %ld", retry_head(x, st, head, sizeof head), what, code);
        return;
    }
    const char *body = x->rx.data ? x->rx.data : "";
    bt_status st;
    if (x->kind == X_RENDER) {
        st = bt_oa_read_rendered(body, x->rx.len, &s->rendered, &s->rendered_len, err, sizeof err);
        s->have_rendered = st == BT_OK;
    } else {
        st = bt_oa_read_tokens(body, x->rx.len, &s->prompt_ids, &s->n_prompt_ids, err, sizeof err);
        s->have_prompt_ids = st == BT_OK;
    }
    if (st != BT_OK) {
        seq_fail(s, st, "%s", err);
        return;
    }
    s->x = NULL; /* this transfer is over (on_curl_done frees it); the stream's starts now */
    x->seq = NULL;
    seq_start(s); /* planned again, with what came: the stream, or the end of a spent continuation */
}

/* ---- the upstream's health ------------------------------------------------------------------ */

static void upstream_dead(oa_engine *e, const char *why) {
    if (e->dead) return;
    e->dead = true;
    uv_timer_stop(&e->health_timer);
    uv_timer_stop(&e->metrics_timer);
    BT_ERROR("openai: upstream %s is dead: %s", e->url, why);
    /* sequences still waiting for the upstream end now; running ones are the worker's to hand back */
    for (bt_deliver_seq *ds = bt_deliver_first(&e->dl); ds; ds = bt_deliver_next(ds))
        if (SEQ_OF(ds)->state == S_PENDING)
            seq_fail(SEQ_OF(ds), BT_ERR_CANNOT_CONNECT, "the upstream is dead: %s", why);
    if (e->hooks.on_dead) {
        char msg[320];
        snprintf(msg, sizeof msg, "upstream %s: %s", e->url, why);
        e->hooks.on_dead(e->hooks_ud, msg);
    }
}

/* The upstream refuses this engine's credentials (code 401 or 403), or accepts them again (0):
 * the worker is not ready meanwhile. A key can be fixed upstream, so polling goes on, within the
 * start-up bound before the upstream was ever up and within health_failures after. */
static void set_auth_refused(oa_engine *e, long code) {
    if (e->auth_refused == code) return;
    bool was = e->auth_refused != 0;
    e->auth_refused = code;
    if (code) {
        BT_ERROR("openai: upstream %s refused the credentials (HTTP %ld): %s", e->url, code,
                 e->api_key ? "check --upstream-api-key (DYN_UPSTREAM_API_KEY), the upstream does not accept it"
                            : "it requires an API key: set --upstream-api-key (DYN_UPSTREAM_API_KEY)");
    } else if (was) {
        BT_INFO("openai: upstream %s accepts the credentials now", e->url);
    }
    if (was != (code != 0) && e->hooks.on_serving) {
        char why[96];
        snprintf(why, sizeof why, "the upstream refused its credentials, HTTP %ld", code);
        e->hooks.on_serving(e->hooks_ud, code == 0, code ? why : NULL);
    }
}

static void upstream_up(oa_engine *e) {
    set_auth_refused(e, 0);
    e->failures = 0;
    e->last_ok_ms = bt_now_ms();
    if (!e->ever_up) {
        e->ever_up = true;
        BT_INFO("openai: upstream %s is up (kind %s%s, model '%s')", e->url, bt_oa_kind_name(e->kind),
                e->kind_cfg == BT_OA_KIND_AUTO ? ", detected" : "", e->model);
        e->metrics_next_ms = 0;
        uint64_t iv = (uint64_t)(e->cfg.metrics_interval * 1000.0 + 0.5);
        uv_timer_start(&e->metrics_timer, on_metrics_timer, 0, iv ? iv : 1);
    }
    /* sequences that waited for the first answer start now */
    for (bt_deliver_seq *ds = bt_deliver_first(&e->dl); ds && !bt_deliver_closed(&e->dl); ds = bt_deliver_next(ds))
        if (SEQ_OF(ds)->state == S_PENDING && !bt_deliver_ended(ds)) seq_start(SEQ_OF(ds));
}

/* Why requests are refused before the upstream answered once, for the client. */
static const char *not_up_why(const oa_engine *e) {
    return e->auth_refused ? "the upstream refuses this worker's credentials" : "the upstream is not reachable yet";
}

/* what: the failure as a client may read it (no address); detail: the same for the log. */
static void upstream_failed(oa_engine *e, const char *what, const char *detail, bool refused) {
    snprintf(e->last_err, sizeof e->last_err, "%s", what);
    e->failures++;
    if (e->ever_up) {
        if (refused) {
            upstream_dead(e, "connection refused");
            return;
        }
        BT_WARN("openai: upstream %s health check failed (%u of %lld in a row): %s", e->url, e->failures,
                (long long)e->cfg.health_failures, detail);
        if (e->failures >= (unsigned)e->cfg.health_failures) {
            char why[300];
            snprintf(why, sizeof why, "%u health checks failed in a row (last: %s)", e->failures, what);
            upstream_dead(e, why);
        }
        return;
    }
    /* not up yet: requests fail fast (migratable) instead of waiting; the startup bound applies */
    if (e->auth_refused) { /* said when it began (set_auth_refused), then now and then */
        if (e->failures % 15 == 0) BT_ERROR("openai: upstream %s still refuses the credentials (%s)", e->url, what);
    } else if (!e->probe_failed || e->failures % 15 == 1) {
        BT_WARN("openai: upstream %s not reachable yet (%s); requests are refused until it answers", e->url, detail);
    }
    e->probe_failed = true;
    for (bt_deliver_seq *ds = bt_deliver_first(&e->dl); ds; ds = bt_deliver_next(ds))
        if (SEQ_OF(ds)->state == S_PENDING)
            seq_fail(SEQ_OF(ds), BT_ERR_CANNOT_CONNECT, "%s: %s", not_up_why(e), what);
    if ((double)(bt_now_ms() - e->created_ms) >= e->cfg.startup_timeout * 1000.0) {
        char why[300];
        snprintf(why, sizeof why, "no answer within the start-up bound of %gs (last: %s)", e->cfg.startup_timeout,
                 what);
        upstream_dead(e, why);
    }
}

static void probe_done(oa_engine *e, oa_xfer *x, CURLcode cc) {
    long code = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    char what[300], detail[300];
    const char *path = x->kind == X_MODELS ? "/v1/models" : "/health";
    if (cc != CURLE_OK) {
        snprintf(what, sizeof what, "GET %s: %s", path, curl_easy_strerror(cc));
        snprintf(detail, sizeof detail, "GET %s: %s", path, x->errbuf[0] ? x->errbuf : curl_easy_strerror(cc));
        upstream_failed(e, what, detail, cc == CURLE_COULDNT_CONNECT);
        return;
    }
    if (x->kind == X_HEALTH && (code == 404 || code == 405)) {
        BT_INFO("openai: upstream %s has no GET /health (HTTP %ld); polling GET /v1/models instead", e->url, code);
        e->use_models_for_health = true;
        start_probe(e);
        return;
    }
    if (code == 401 || code == 403) { /* not an upstream that is not up yet: one that refuses this engine */
        snprintf(what, sizeof what, "GET %s answered HTTP %ld: the upstream refused the credentials", path, code);
        set_auth_refused(e, code);
        upstream_failed(e, what, what, false);
        return;
    }
    if (code < 200 || code > 299) {
        snprintf(what, sizeof what, "GET %s answered HTTP %ld", path, code);
        upstream_failed(e, what, what, false);
        return;
    }
    if (x->kind == X_MODELS) e->check_auth = false; /* the credentials are accepted */
    if (x->kind == X_MODELS && !e->detected) {
        bt_oa_kind k;
        char model[256], err[256];
        if (!bt_oa_read_models(x->rx.data ? x->rx.data : "", x->rx.len, e->model_cfg ? e->model_cfg : e->served,
                               e->served, &k, model, sizeof model, err, sizeof err)) {
            upstream_failed(e, err, err, false);
            return;
        }
        e->kind = e->kind_cfg == BT_OA_KIND_AUTO ? k : e->kind_cfg;
        snprintf(e->model, sizeof e->model, "%s", e->model_cfg ? e->model_cfg : model);
        e->detected = true;
    }
    upstream_up(e);
}

static void start_probe(oa_engine *e) {
    if (e->probe || e->dead || bt_deliver_closed(&e->dl)) return;
    bool models = !e->detected || e->use_models_for_health || e->check_auth || e->auth_refused;
    e->probe = xfer_start(e, models ? X_MODELS : X_HEALTH, models ? "/v1/models" : "/health", NULL,
                          OA_PROBE_TIMEOUT_MS, NULL);
}

static void on_health_timer(uv_timer_t *t) {
    oa_engine *e = t->data;
    enter(e);
    /* finished streams whose transfers never completed are cut now */
    uint64_t now = bt_now_ms();
    for (oa_xfer *x = LIST_FIRST(&e->xfers), *next; x; x = next) {
        next = LIST_NEXT(x, link);
        if (x->kind == X_SEQ && !x->seq && now - x->orphan_ms >= OA_ORPHAN_MS) xfer_free(e, x);
    }
    start_probe(e);
    leave(e);
}

/* ---- the upstream's load -------------------------------------------------------------------- */

static void on_metrics_timer(uv_timer_t *t) {
    oa_engine *e = t->data;
    if (e->metrics_x || e->dead || bt_deliver_closed(&e->dl)) return;
    uint64_t now = bt_now_ms();
    if (e->metrics_absent && now < e->metrics_next_ms) return;
    enter(e);
    e->metrics_x = xfer_start(e, X_METRICS, "/metrics", NULL, OA_PROBE_TIMEOUT_MS, NULL);
    leave(e);
}

static void metrics_done(oa_engine *e, oa_xfer *x, CURLcode cc) {
    long code = 0;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &code);
    bt_oa_vllm_metrics vm;
    bool found = cc == CURLE_OK && code == 200 &&
                 bt_oa_parse_vllm_metrics(x->rx.data ? x->rx.data : "", x->rx.len, &vm);
    if (found) {
        if (!e->have_vm) BT_INFO("openai: upstream %s exposes vLLM metrics: they feed the load reports", e->url);
        e->vm = vm;
        e->have_vm = true;
        e->metrics_absent = false;
    } else {
        if (e->have_vm || !e->metrics_absent)
            BT_INFO("openai: upstream %s gives no vLLM metrics on /metrics (%s); load comes from this engine's own "
                    "request counts", e->url, cc != CURLE_OK ? curl_easy_strerror(cc) : code != 200 ? "not HTTP 200"
                                                                                                   : "no vllm: gauges");
        e->have_vm = false;
        e->metrics_absent = true;
        e->metrics_next_ms = bt_now_ms() + OA_METRICS_ABSENT_RETRY_MS;
    }
}

/* ---- after every libcurl step --------------------------------------------------------------- */

/* Stream bytes first, so that the events that came just before a transfer's end are seen. */
static bool on_curl_step(void *ud) {
    oa_engine *e = ud;
    oa_xfer *x;
    enter(e);
    while (!bt_deliver_closed(&e->dl) && (x = TAILQ_FIRST(&e->dirty)) != NULL) {
        dirty_remove(e, x);
        xfer_process(e, x);
    }
    return !bt_deliver_closed(&e->dl);
}

static bool on_curl_done(void *ud, CURL *easy, CURLcode cc) {
    oa_engine *e = ud;
    oa_xfer *x = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&x);
    if (!x) return true;
    BT_TRACE("openai: %s transfer done: %s", xfer_names[x->kind], curl_easy_strerror(cc));
    x->completing = true;
    switch (x->kind) {
    case X_SEQ: stream_done(e, x, cc); break;
    case X_TOKENIZE:
    case X_RENDER: prepare_done(x, cc); break;
    case X_MODELS:
    case X_HEALTH:
        e->probe = NULL;
        probe_done(e, x, cc);
        break;
    case X_METRICS:
        e->metrics_x = NULL;
        metrics_done(e, x, cc);
        break;
    }
    if (x->seq && x->seq->x == x) x->seq->x = NULL; /* cannot happen: each handler ends or moves it */
    xfer_free(e, x);
    return !bt_deliver_closed(&e->dl);
}

static void on_curl_step_end(void *ud) {
    oa_engine *e = ud;
    bt_deliver_drain(&e->dl);
    leave(e);
}

static const bt_curl_uv_hooks curl_hooks = {on_curl_step, on_curl_done, on_curl_step_end};

/* The outermost leave reports a changed load (a destroy from on_load is finished right after). */
static void leave(oa_engine *e) {
    if (e->dl.depth == 1) report_load(e);
    bt_deliver_leave(&e->dl);
}

/* ---- engine operations ---------------------------------------------------------------------- */

static bt_status oa_submit(bt_engine *be, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                           bt_engine_seq **out, char *err, size_t errlen) {
    oa_engine *e = (oa_engine *)be;
    if (e->dead) { /* migratable: the worker is about to shut down, another one serves it */
        snprintf(err, errlen, "the upstream is dead");
        return BT_ERR_CANNOT_CONNECT;
    }
    if (!e->ever_up && e->probe_failed) {
        snprintf(err, errlen, "%s (%s)", not_up_why(e), e->last_err);
        return BT_ERR_CANNOT_CONNECT;
    }
    if (!json_is_object(req->body)) {
        snprintf(err, errlen, "request has no JSON body");
        return BT_ERR_INVALID;
    }
    if (req->n_carried && !req->carried) {
        snprintf(err, errlen, "n_carried is %u but carried is NULL", req->n_carried);
        return BT_ERR_INVALID;
    }
    bt_oa_carried_kind ck = bt_oa_carried_classify(req->carried, req->n_carried);
    if (ck == BT_OA_CARRIED_MIXED) {
        snprintf(err, errlen, "no worker can continue this stream exactly: the carried tokens mix upstream token ids "
                              "and text-mode ids (the workers of one model must front upstreams of one kind)");
        return BT_ERR_NO_WORKER; /* refused, not migrated: see seq_refuse */
    }
    bt_engine_seq *s = calloc(1, sizeof *s);
    if (!s) goto nomem;
    s->e = e;
    s->state = S_ENDED; /* not counted until placed below */
    s->api = req->api;
    s->max_tokens = req->max_tokens;
    s->priority = req->priority;
    s->carried_kind = ck;
    s->finish = BT_OA_FINISH_NONE;
    s->mode = ck == BT_OA_CARRIED_IDS ? MODE_IDS : ck == BT_OA_CARRIED_TEXT ? MODE_TEXT : MODE_UNDECIDED;
    snprintf(s->rid, sizeof s->rid, "%s", req->request_id ? req->request_id : "-");
    bt_buf_init(&s->carried_text, (size_t)64 << 20);
    bt_buf_init(&s->held_text, (size_t)1 << 20);
    bt_sse_init(&s->sse, OA_SSE_MAX_LINE, OA_SSE_MAX_EVENT);
    s->body = json_deep_copy(req->body);
    if (!s->body) goto nomem_seq;
    if (req->n_carried) {
        s->carried = malloc(req->n_carried * sizeof *s->carried);
        if (!s->carried) goto nomem_seq;
        memcpy(s->carried, req->carried, req->n_carried * sizeof *s->carried);
        s->n_carried = req->n_carried;
    }
    if (ck == BT_OA_CARRIED_TEXT) {
        if (!req->carried_text) {
            seq_free(s);
            snprintf(err, errlen, "no worker can continue this stream exactly: continuing from text needs the "
                                  "delivered text, which the frontend did not send (carried_text)");
            return BT_ERR_NO_WORKER;
        }
        if (bt_buf_append(&s->carried_text, req->carried_text, req->carried_text_len) != BT_OK) {
            seq_free(s);
            snprintf(err, errlen, "the carried text is too large");
            return BT_ERR_TOO_LARGE;
        }
    }
    bt_deliver_add(&e->dl, &s->dl, sink, ud, 0); /* tokens are delivered as parsed, never staged */
    seq_set_state(s, S_PENDING);
    *out = s;
    /* A client's max_tokens 0 goes upstream like any request: only the upstream can count the
     * prompt's tokens for the usage (and an upstream that refuses 0 says so, as it would to the
     * client itself). A continuation with nothing left to generate too, when the upstream's kind
     * can count it (seq_spent). */
    if (e->detected) seq_start(s); /* failures here end it through the ready list, never with a callback now */
    BT_DEBUG("openai: submitted %s: %s, %zu carried (%s), max_tokens %u%s", s->rid,
             s->api == BT_API_CHAT ? "chat" : "completion", s->n_carried,
             ck == BT_OA_CARRIED_IDS ? "ids" : ck == BT_OA_CARRIED_TEXT ? "text" : "none", s->max_tokens,
             e->detected ? "" : " (waiting for the upstream's first answer)");
    return BT_OK;

nomem_seq:
    seq_free(s);
nomem:
    snprintf(err, errlen, "out of memory");
    return BT_ERR_NOMEM;
}

static void oa_stop(bt_engine *be, bt_engine_seq *s) {
    (void)be;
    if (!s || bt_deliver_ended(&s->dl)) return;
    BT_DEBUG("openai: %s stopped after %llu ids", s->rid, (unsigned long long)s->emitted);
    seq_finish(s, BT_FINISH_CANCELLED, true);
}

static void oa_kill(bt_engine *be, bt_engine_seq *s) {
    oa_engine *e = (oa_engine *)be;
    if (!s || bt_deliver_dead(&s->dl)) return;
    BT_DEBUG("openai: %s killed after %llu ids%s", s->rid, (unsigned long long)s->emitted,
             s->x ? ": upstream connection closed" : "");
    seq_detach(s, true);
    seq_set_state(s, S_ENDED);
    bt_deliver_kill(&e->dl, &s->dl); /* its memory goes now, or when the running callback unwinds */
}

static void oa_get_load(bt_engine *be, bt_engine_load *out) { load_snapshot((oa_engine *)be, out); }

static void oa_card(bt_engine *be, json_t *card) {
    oa_engine *e = (oa_engine *)be;
    json_object_set_new(card, "total_kv_blocks", json_integer(e->cfg.total_blocks));
    json_object_set_new(card, "block_size", json_integer(16)); /* vLLM's default; only an estimate here */
    json_object_set_new(card, "engine", json_string("openai"));
    json_object_set_new(card, "upstream", json_string(e->url));
}

/* deliver's teardown: the sequences are gone; drops every transfer and closes the handles.
 * Memory goes with the last close. */
static void teardown(void *owner) {
    oa_engine *e = owner;
    while (!LIST_EMPTY(&e->xfers)) xfer_free(e, LIST_FIRST(&e->xfers));
    bt_closer_hold(&e->closer);
    bt_curl_uv_close(e->cu, bt_closer_release, &e->closer);
    e->cu = NULL;
    uv_idle_stop(&e->idle);
    uv_timer_stop(&e->health_timer);
    uv_timer_stop(&e->metrics_timer);
    uv_timer_stop(&e->grace_timer);
    uv_timer_stop(&e->wait_timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->health_timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->wait_timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->grace_timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->metrics_timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->idle);
    bt_closer_seal(&e->closer);
}

/* Safe from inside a sink or hook callback: finished when the running callback unwinds. */
static void oa_destroy(bt_engine *be) { bt_deliver_close(&((oa_engine *)be)->dl); }

static const bt_deliver_ops oa_deliver_ops = {.free_seq = free_seq, .wake = idle_arm, .teardown = teardown};

/* Each sequence is its own upstream request, timed on its own (on_wait_timer): one stalled or
 * queued request fails alone instead of the worker's engine monitor taking every stream down. */
static const bt_engine_ops oa_ops = {.submit = oa_submit,
                                     .stop = oa_stop,
                                     .kill = oa_kill,
                                     .get_load = oa_get_load,
                                     .card = oa_card,
                                     .destroy = oa_destroy,
                                     .times_own_streams = true};

/* ---- public --------------------------------------------------------------------------------- */

void bt_openai_config_default(bt_openai_config *c) {
    *c = (bt_openai_config){.kind = "auto",
                            .total_blocks = 1000,
                            .health_interval = 2.0,
                            .health_failures = 3,
                            .metrics_interval = 1.0,
                            .connect_timeout = 5.0,
                            .startup_timeout = 600.0,
                            .first_byte_timeout = 300.0}; /* the upstream, model and key: none */
}

bt_status bt_openai_config_check(const bt_openai_config *c, char *err, size_t errlen) {
    char dummy[1];
    bt_oa_kind k;
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (!c->upstream || !*c->upstream) {
        snprintf(err, errlen, "the openai engine needs --upstream (or DYN_UPSTREAM_URL), e.g. http://127.0.0.1:8000");
    } else if (strncmp(c->upstream, "http://", 7) != 0 && strncmp(c->upstream, "https://", 8) != 0) {
        snprintf(err, errlen, "--upstream '%s' must be an http:// or https:// URL", c->upstream);
    } else if (strlen(c->upstream) > 900) {
        snprintf(err, errlen, "--upstream is longer than 900 characters");
    } else if (!bt_oa_kind_parse(c->kind ? c->kind : "auto", &k)) {
        snprintf(err, errlen, "unknown --upstream-kind '%s' (auto, baton, vllm, sglang, llamacpp or openai)", c->kind);
    } else if (c->total_blocks <= 0) {
        snprintf(err, errlen, "--upstream-total-blocks must be positive (got %lld)", (long long)c->total_blocks);
    } else if (!(c->health_interval > 0) || !(c->metrics_interval > 0) || !(c->connect_timeout > 0) ||
               !(c->startup_timeout > 0)) {
        snprintf(err, errlen, "the openai engine's intervals and timeouts must be positive");
    } else if (!(c->stall_timeout >= 0) || !(c->first_byte_timeout >= 0)) {
        snprintf(err, errlen, "the openai engine's stall and first-byte bounds must not be negative (0 = none)");
    } else if (c->health_failures < 1) {
        snprintf(err, errlen, "health_failures must be at least 1");
    } else if (c->api_key && strlen(c->api_key) > 400) {
        snprintf(err, errlen, "--upstream-api-key is longer than 400 characters");
    } else if (c->api_key && !*c->api_key) {
        snprintf(err, errlen, "--upstream-api-key is empty (leave it out for no key)");
    } else if (c->api_key && !bt_bearer_token_ok(c->api_key, strlen(c->api_key))) {
        /* it is sent as "Authorization: Bearer KEY": a CR LF would end the header and begin another,
         * and a blank or a byte outside ASCII is no key the upstream could have been given */
        snprintf(err, errlen, "--upstream-api-key holds a blank, a control character or a byte outside ASCII, which no "
                              "Bearer token carries");
    } else {
        err[0] = '\0';
        return BT_OK;
    }
    return BT_ERR_INVALID;
}

static char *dup_or_null(const char *s) {
    if (!s || !*s) return NULL;
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

bt_engine *bt_openai_create(uv_loop_t *loop, const bt_openai_config *cfg, const bt_engine_hooks *hooks,
                            void *hooks_ud) {
    char err[256];
    if (!loop || !cfg) return NULL;
    if (bt_openai_config_check(cfg, err, sizeof err) != BT_OK) {
        BT_ERROR("openai: bad configuration: %s", err);
        return NULL;
    }
    if (!bt_curl_uv_global_init()) {
        BT_ERROR("openai: libcurl initialisation failed");
        return NULL;
    }
    oa_engine *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->base.ops = &oa_ops;
    e->loop = loop;
    e->cfg = *cfg;
    LIST_INIT(&e->xfers);
    TAILQ_INIT(&e->dirty);
    bt_deliver_init(&e->dl, &oa_deliver_ops, e);
    bt_closer_init(&e->closer, engine_free, e);
    bt_oa_kind_parse(cfg->kind ? cfg->kind : "auto", &e->kind_cfg);
    e->kind = e->kind_cfg == BT_OA_KIND_AUTO ? BT_OA_KIND_OPENAI : e->kind_cfg;
    e->url = dup_or_null(cfg->upstream);
    e->model_cfg = dup_or_null(cfg->model);
    e->served = dup_or_null(cfg->served_model);
    e->api_key = dup_or_null(cfg->api_key);
    if (e->url && !(cfg->model && *cfg->model && !e->model_cfg) &&
        !(cfg->served_model && *cfg->served_model && !e->served) && !(cfg->api_key && *cfg->api_key && !e->api_key))
        e->cu = bt_curl_uv_create(loop, &curl_hooks, e);
    if (!e->cu) {
        free(e->url);
        free(e->model_cfg);
        free(e->served);
        free(e->api_key);
        free(e);
        return NULL;
    }
    /* the base URL without a trailing slash or /v1: paths are appended as /v1/... and /health */
    size_t n = strlen(e->url);
    while (n > 0 && e->url[n - 1] == '/') e->url[--n] = '\0';
    if (n >= 3 && strcmp(e->url + n - 3, "/v1") == 0) e->url[n -= 3] = '\0';
    if (hooks) e->hooks = *hooks;
    e->hooks_ud = hooks_ud;
    e->created_ms = bt_now_ms();
    snprintf(e->last_err, sizeof e->last_err, "no answer yet");
    uv_timer_init(loop, &e->health_timer);
    uv_timer_init(loop, &e->grace_timer);
    e->grace_timer.data = e;
    uv_timer_init(loop, &e->wait_timer);
    e->wait_timer.data = e;
    uv_timer_init(loop, &e->metrics_timer);
    uv_idle_init(loop, &e->idle);
    e->health_timer.data = e->metrics_timer.data = e;
    e->idle.data = e;
    load_snapshot(e, &e->last_load);
    uint64_t iv = (uint64_t)(cfg->health_interval * 1000.0 + 0.5);
    uv_timer_start(&e->health_timer, on_health_timer, 0, iv ? iv : 1); /* the first probe at once */
    BT_INFO("openai: upstream %s (kind %s, model %s%s), health every %gs (dead after %lld failures), %lld KV blocks",
            e->url, bt_oa_kind_name(e->kind_cfg), e->model_cfg ? e->model_cfg : "from /v1/models",
            cfg->raw_completions ? ", raw completions declared" : "", cfg->health_interval,
            (long long)cfg->health_failures, (long long)cfg->total_blocks);
    return &e->base;
}
