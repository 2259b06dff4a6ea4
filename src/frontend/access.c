/* access.c — the frontend's access log (--access-log): one JSON object a line per API request.
 *
 * An inference request is written once, as it ends (req_done), with what an operator looks for
 * when a client says a request went wrong: its id (the X-Request-Id it was answered with), the
 * status, how it ended, model, tenant label (never the key), tokens, time to first token,
 * duration, attempts (a migration is an attempt more). A request the API refused before it was
 * made a request (bad JSON, unknown model, a key or origin refused, the frontend shutting down, a
 * resume of an unknown stream) is written with its status and error code. The lines are built on
 * the event loop (a few hundred bytes, per request, never per token) and written by linelog's
 * thread. docs/operations.md, "Access log". */
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "common/linelog.h"
#include "common/log.h"
#include "frontend/fe.h"

/* One per process, like the log: the shards share it, and the refusals (fe_json_error) reach it
 * without a shard at hand. Set before any shard runs, cleared after they all ended. */
static bt_linelog *access_log;

#define LINE_MAX_BYTES 8192 /* its fields are cut below it; a line past it would be counted as dropped */
#define RID_SHOWN 128       /* bytes of a client's X-Request-Id written with a refusal */
#define PATH_SHOWN 256      /* bytes of a refused request's path written (escaped: at most 6 each) */

void fe_access_start(bt_linelog *l) { access_log = l; }

void fe_access_stop(void) {
    bt_linelog_close(access_log);
    access_log = NULL;
}

bool fe_access_on(void) { return access_log != NULL; }

uint64_t fe_access_dropped(void) { return access_log ? bt_linelog_dropped(access_log) : 0; }

uint64_t fe_access_written(void) { return access_log ? bt_linelog_written(access_log) : 0; }

static void put_str(bt_buf *b, const char *key, const char *v) {
    bt_buf_appendf(b, ",\"%s\":", key);
    if (!v) {
        bt_buf_append_str(b, "null");
        return;
    }
    bt_buf_append_str(b, "\"");
    bt_buf_append_json_str(b, v, strlen(v));
    bt_buf_append_str(b, "\"");
}

static void put_ms(bt_buf *b, const char *key, uint64_t from_us, uint64_t to_us) {
    if (!from_us || to_us < from_us) bt_buf_appendf(b, ",\"%s\":null", key);
    else bt_buf_appendf(b, ",\"%s\":%.3f", key, (double)(to_us - from_us) / 1000.0);
}

/* The line's start: its time and the request id. */
static void begin(bt_buf *b, const char *rid) {
    char when[40];
    bt_log_time(when, sizeof when);
    bt_buf_appendf(b, "{\"time\":\"%s\"", when);
    put_str(b, "request_id", rid);
}

static void end(bt_buf *b) {
    bt_buf_append_str(b, "}\n");
    if (bt_buf_status(b) == BT_OK) (void)bt_linelog_put(access_log, b->data, b->len);
    else bt_linelog_drop(access_log); /* out of memory */
}

static const char *method_name(bt_http_method m) {
    switch (m) {
    case BT_HTTP_GET: return "GET";
    case BT_HTTP_POST: return "POST";
    case BT_HTTP_HEAD: return "HEAD";
    case BT_HTTP_OPTIONS: return "OPTIONS";
    default: return "OTHER";
    }
}

void fe_access_request(const fe_req *r, fe_outcome out) {
    if (!access_log) return;
    static const char *const outcome[FE_OUT_N_] = {"success", "error", "cancelled", "rejected"};
    uint64_t now = bt_now_us();
    bt_buf b;
    bt_buf_init(&b, LINE_MAX_BYTES);
    begin(&b, r->rid);
    put_str(&b, "path", r->api == BT_API_CHAT ? "/v1/chat/completions" : "/v1/completions");
    /* a client gone before any answer has none: 499, as proxies log it */
    bt_buf_appendf(&b, ",\"status\":%u", r->http_status ? r->http_status : (r->client_gone ? 499u : 0u));
    put_str(&b, "outcome", outcome[out]);
    put_str(&b, "model", r->model ? r->model->name : NULL);
    bt_buf_appendf(&b, ",\"stream\":%s", r->stream ? "true" : "false");
    put_str(&b, "stream_id", r->stream_id[0] ? r->stream_id : NULL);
    put_str(&b, "tenant", r->resumed ? NULL : fe_admit_tenant(r));
    bt_buf_appendf(&b, ",\"priority\":%" PRId32, fe_admit_priority(r));
    /* what the client was given: the usage it was told, or the tokens it received */
    uint32_t completion = r->completion_tokens ? r->completion_tokens : (uint32_t)r->nids;
    bt_buf_appendf(&b, ",\"prompt_tokens\":%" PRIu32 ",\"completion_tokens\":%" PRIu32, r->prompt_tokens, completion);
    put_str(&b, "finish_reason", r->finish);
    put_str(&b, "error", r->err_code);
    put_ms(&b, "ttft_ms", r->t_start_us, r->t_first_us ? r->t_first_us : 0);
    put_ms(&b, "duration_ms", r->t_start_us, now);
    if (r->last_worker) bt_buf_appendf(&b, ",\"worker\":\"%" PRIx64 "\"", r->last_worker);
    else bt_buf_append_str(&b, ",\"worker\":null");
    bt_buf_appendf(&b, ",\"attempts\":%d,\"migrations\":%d", r->attempts,
                   r->attempts > 1 + r->moves ? r->attempts - 1 - r->moves : 0);
    bt_buf_appendf(&b, ",\"resumed\":%s,\"client_gone\":%s", r->resumed ? "true" : "false",
                   r->client_gone ? "true" : "false");
    end(&b);
    bt_buf_free(&b);
}

void fe_access_refusal(const bt_http_req *http, const char *rid, int status, const char *code) {
    if (!access_log) return;
    bt_buf b;
    bt_buf_init(&b, LINE_MAX_BYTES);
    /* a refusal made no request id of its own but for a completion; the client's then (cut) */
    char cid[RID_SHOWN + 1];
    if (!rid && http->request_id) rid = cid, bt_copy_str(cid, sizeof cid, http->request_id);
    begin(&b, rid);
    put_str(&b, "method", method_name(http->method));
    /* a client's path, cut (a line must stay short) */
    char path[PATH_SHOWN + 1];
    bt_copy_str(path, sizeof path, http->path);
    put_str(&b, "path", path);
    bt_buf_appendf(&b, ",\"status\":%d", status);
    put_str(&b, "outcome", status >= 500 ? "error" : "refused");
    put_str(&b, "error", code);
    end(&b);
    bt_buf_free(&b);
}
