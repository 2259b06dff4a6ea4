/* access.c — the frontend's access log (--access-log): one JSON object a line per API request.
 *
 * An inference request is written once, as it ends (req_done), with what an operator looks for
 * when a client says a request went wrong: its id (the X-Request-Id it was answered with), the
 * status, how it ended, model, tenant label (never the key), tokens, time to first token,
 * duration, attempts (a migration is an attempt more), the worker of its last attempt. A request
 * the API refused before it was made a request (bad JSON, unknown model, a key or origin refused,
 * the frontend shutting down, a resume of an unknown stream) is written with its status and error
 * code. The lines are built on the event loop (a few hundred bytes, per request, never per token)
 * and written by linelog's thread. docs/operations.md, "Access log". */
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

#define RID_SHOWN 128  /* bytes of a client's X-Request-Id written with a refusal */
#define PATH_SHOWN 256 /* bytes of a refused request's path written (escaped: at most 6 each) */

void fe_access_start(bt_linelog *l) { access_log = l; }

void fe_access_stop(void) {
    bt_linelog_close(access_log);
    access_log = NULL;
}

bool fe_access_on(void) { return access_log != NULL; }

uint64_t fe_access_dropped(void) { return access_log ? bt_linelog_dropped(access_log) : 0; }

uint64_t fe_access_written(void) { return access_log ? bt_linelog_written(access_log) : 0; }

/* The lines are built with appends of literals and numbers, not printf, into a buffer each event
 * loop reuses: under callgrind the first version, printf and a buffer allocated per line, cost
 * 11,600 instructions a request, 12 % of a short stream's whole cost (bench/callgrind.py
 * --frontend-flags '--access-log FILE'). KEY is a literal: `,"name":`. */
#define PUT_KEY(b, lit) bt_buf_append((b), lit, sizeof lit - 1)

/* A string as a JSON string, or null. `escape`: one a client or an operator chose (a model name, a
 * path, a client's request id, a journal record's finish reason or error code). Without: one of
 * this frontend's own making that needs no escape, written as it is: a request id that passed
 * fe_valid_rid (letters, digits, - _ . :) or a UUID, a stream id and a worker id (hex), a tenant
 * label (key- and hex, "anonymous", "other", or an X-Tenant reduced to letters, digits, . _ -),
 * a literal. */
static void put_str(bt_buf *b, const char *v, bool escape) {
    if (!v) {
        bt_buf_append(b, "null", 4);
        return;
    }
    bt_buf_append(b, "\"", 1);
    if (escape) bt_buf_append_json_str(b, v, strlen(v));
    else bt_buf_append(b, v, strlen(v));
    bt_buf_append(b, "\"", 1);
}
#define put_text(b, v) put_str((b), (v), true)
#define put_plain(b, v) put_str((b), (v), false)

static void put_bool(bt_buf *b, bool v) { bt_buf_append(b, v ? "true" : "false", v ? 4 : 5); }

/* milliseconds with three decimals (microseconds), or null */
static void put_ms(bt_buf *b, uint64_t from_us, uint64_t to_us) {
    if (!from_us || to_us < from_us) {
        bt_buf_append(b, "null", 4);
        return;
    }
    uint64_t us = to_us - from_us;
    char frac[4] = {'.', (char)('0' + us / 100 % 10), (char)('0' + us / 10 % 10), (char)('0' + us % 10)};
    bt_buf_append_i64(b, (int64_t)(us / 1000));
    bt_buf_append(b, frac, 4);
}

/* The line's start: its time. */
static void begin(bt_buf *b) {
    char when[40];
    size_t n = bt_log_time(when, sizeof when);
    PUT_KEY(b, "{\"time\":\"");
    bt_buf_append(b, when, n);
    bt_buf_append(b, "\"", 1);
}

static void end(bt_buf *b) {
    bt_buf_append(b, "}\n", 2);
    if (bt_buf_status(b) == BT_OK) (void)bt_linelog_put(access_log, b->data, b->len);
    else bt_linelog_drop(access_log); /* out of memory, or past FE_ACCESS_LINE_MAX */
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
    bt_buf *b = &r->fe->access_line;
    bt_buf_reset(b);
    begin(b);
    PUT_KEY(b, ",\"request_id\":");
    put_plain(b, r->rid); /* fe_valid_rid's, or one made here (a journal record's too: resume.c) */
    PUT_KEY(b, ",\"path\":");
    put_plain(b, r->api == BT_API_CHAT ? "/v1/chat/completions" : "/v1/completions");
    /* a client gone before any answer has none: 499, as proxies log it */
    PUT_KEY(b, ",\"status\":");
    bt_buf_append_i64(b, r->http_status ? r->http_status : (r->client_gone ? 499 : 0));
    PUT_KEY(b, ",\"outcome\":");
    put_plain(b, outcome[out]);
    PUT_KEY(b, ",\"model\":");
    put_text(b, r->model ? r->model->name : NULL);
    PUT_KEY(b, ",\"stream\":");
    put_bool(b, r->stream);
    PUT_KEY(b, ",\"stream_id\":");
    put_plain(b, r->stream_id[0] ? r->stream_id : NULL);
    PUT_KEY(b, ",\"tenant\":");
    put_plain(b, r->resumed ? NULL : fe_admit_tenant(r));
    PUT_KEY(b, ",\"priority\":");
    bt_buf_append_i64(b, fe_admit_priority(r));
    /* what the client was given: the usage it was told, or the tokens it received */
    PUT_KEY(b, ",\"prompt_tokens\":");
    bt_buf_append_i64(b, r->prompt_tokens);
    PUT_KEY(b, ",\"completion_tokens\":");
    bt_buf_append_i64(b, r->completion_tokens ? r->completion_tokens : (int64_t)r->nids + r->body_carried);
    PUT_KEY(b, ",\"carried_tokens\":"); /* the client's carried_token_ids (usage.carried_tokens) */
    bt_buf_append_i64(b, (int64_t)r->body_carried);
    /* escaped: a replayed stream's are its journal record's, maybe another frontend's */
    PUT_KEY(b, ",\"finish_reason\":");
    put_text(b, r->finish);
    PUT_KEY(b, ",\"error\":");
    put_text(b, r->err_code);
    PUT_KEY(b, ",\"ttft_ms\":");
    put_ms(b, r->t_start_us, r->t_first_us);
    PUT_KEY(b, ",\"duration_ms\":");
    put_ms(b, r->t_start_us, now);
    PUT_KEY(b, ",\"worker\":");
    if (r->last_worker) {
        char wid[17];
        size_t n = 0;
        for (int shift = 60; shift >= 0; shift -= 4) {
            unsigned d = (unsigned)(r->last_worker >> shift) & 15;
            if (d || n) wid[n++] = "0123456789abcdef"[d]; /* no leading zeros, as PRIx64 */
        }
        wid[n] = '\0';
        put_plain(b, wid);
    } else {
        bt_buf_append(b, "null", 4);
    }
    PUT_KEY(b, ",\"attempts\":");
    bt_buf_append_i64(b, r->attempts);
    PUT_KEY(b, ",\"migrations\":");
    /* a move and a draining worker's refusal before it ran are attempts, not migrations */
    int migrations = r->attempts - 1 - r->moves - r->declined;
    bt_buf_append_i64(b, migrations > 0 ? migrations : 0);
    PUT_KEY(b, ",\"resumed\":");
    put_bool(b, r->resumed);
    PUT_KEY(b, ",\"client_gone\":");
    put_bool(b, r->client_gone);
    end(b);
}

void fe_access_answer(const bt_http_req *http, const char *rid, int status, const char *code) {
    if (!access_log) return;
    bt_buf b;
    bt_buf_init(&b, FE_ACCESS_LINE_MAX);
    begin(&b);
    /* a refusal made no request id of its own but for a completion; the client's then (cut) */
    char cid[RID_SHOWN + 1];
    PUT_KEY(&b, ",\"request_id\":");
    if (rid) put_text(&b, rid);
    else put_text(&b, http->request_id ? (bt_copy_str(cid, sizeof cid, http->request_id), cid) : NULL);
    PUT_KEY(&b, ",\"method\":");
    put_plain(&b, method_name(http->method));
    /* a client's path, cut (a line must stay short) */
    char path[PATH_SHOWN + 1];
    bt_copy_str(path, sizeof path, http->path);
    PUT_KEY(&b, ",\"path\":");
    put_text(&b, path);
    PUT_KEY(&b, ",\"status\":");
    bt_buf_append_i64(&b, status);
    PUT_KEY(&b, ",\"outcome\":");
    put_plain(&b, status >= 500 ? "error" : status >= 400 ? "refused" : "success");
    PUT_KEY(&b, ",\"error\":");
    put_plain(&b, code);
    end(&b);
    bt_buf_free(&b);
}
