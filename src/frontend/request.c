/* request.c — one client request from validation to its last byte.
 *
 * Lifecycle (rq_state): routing → streaming → done. An attempt is one REQUEST frame on one
 * worker; the request keeps every token id it delivered to the client, so when an attempt fails
 * with a migratable error the next attempt carries them and the worker continues from
 * prompt + delivered tokens with max_tokens reduced by their number: the client sees one
 * continuous stream. The attempt budget (--migration-limit + 1) is shared by failures before the
 * first token and failures mid-stream.
 *
 * Cancellation (common/cancel.h): each request has a root context and each attempt a child
 * context whose callback sends STOP or KILL for the attempt's stream. A client that goes away
 * kills the root; the operator endpoint stops or kills it. A stopped or killed request never gets
 * another attempt (checked before every one), so it is never migrated.
 *
 * Streaming responses are OpenAI SSE chunks; headers go out with the first token, so that a
 * request that cannot be served at all still gets a proper HTTP status. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "frontend/fe.h"

#define MAX_TOKENS_DEFAULT 256
#define MAX_TOKENS_LIMIT 1000000
#define RID_MAX 64

void fe_json_error(bt_http_req *http, const char *rid, int status, const char *type, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* client mistakes at debug level (a hostile client must not flood the log), the rest at info */
    if (status >= 500) BT_INFO("request %s answered %d: %s", rid ? rid : "-", status, msg);
    else BT_DEBUG("request %s answered %d: %s", rid ? rid : "-", status, msg);
    bt_buf b;
    bt_buf_init(&b, 4096);
    bt_buf_append_str(&b, "{\"error\":{\"message\":\"");
    bt_buf_append_json_str(&b, msg, strlen(msg));
    bt_buf_appendf(&b, "\",\"type\":\"%s\",\"code\":%d}}", type, status);
    char hdr[160] = "";
    size_t hl = 0;
    if (rid) hl += (size_t)snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", rid);
    if (status == 503 && hl < sizeof hdr) snprintf(hdr + hl, sizeof hdr - hl, "Retry-After: 1\r\n");
    bt_http_respond(http, status, "application/json", hdr, b.data, b.len);
    bt_buf_free(&b);
}

static int status_for(bt_status code) {
    switch (code) {
    case BT_ERR_INVALID:
    case BT_ERR_TOO_LARGE: return 400;
    case BT_ERR_NOT_FOUND: return 404;
    case BT_ERR_CANCELLED: return 499;
    case BT_ERR_OVERLOADED:
    case BT_ERR_NO_WORKER: return 503;
    default: return bt_status_migratable(code) ? 503 : 500;
    }
}

static const char *type_for(int status) {
    switch (status) {
    case 400: return "invalid_request_error";
    case 404: return "not_found_error";
    case 499: return "cancelled";
    case 503: return "service_unavailable";
    default: return "internal_error";
    }
}

/* ---- lifetime ---- */

static void req_free(fe_req *r) {
    fe *f = r->fe;
    if (r->prev) r->prev->next = r->next;
    else f->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    f->nreqs--;
    fe_reqs_release(f);
    if (r->model) r->model->st.inflight--;
    if (r->http) r->http->user = NULL;
    json_decref(r->body);
    free(r->ids);
    bt_buf_free(&r->text);
    bt_buf_free(&r->prefix);
    bt_ctx_free(r->actx);
    bt_ctx_free(r->ctx);
    free(r);
}

/* Ends the request: counts the outcome, releases the attempt, frees the request. */
static void req_done(fe_req *r, fe_outcome out) {
    r->state = RQ_DONE;
    if (r->worker) {
        /* nothing generates for a request that has ended: the attempt's context sends KILL
         * (once: not again when the kill came from the request's own context) */
        if (r->actx) bt_ctx_kill(r->actx);
        else fe_worker_send_cancel(r->worker, r->stream_id, true);
        fe_worker_stream_done(r->worker, r->stream_id);
        r->worker = NULL;
    }
    bt_ctx_free(r->actx);
    r->actx = NULL;
    if (r->model) {
        r->model->st.requests[r->api][r->stream][out]++;
        fe_hist_observe(&r->model->st.duration, (double)(bt_now_us() - r->t_start_us) / 1e6);
    }
    req_free(r);
}

/* ---- output ---- */

static void begin_stream(fe_req *r) {
    if (r->headers_sent || !r->http) return;
    char hdr[160];
    snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", r->rid);
    bt_http_stream_begin(r->http, 200, "text/event-stream", hdr);
    r->headers_sent = true;
}

static void append_ids(bt_buf *b, const uint32_t *ids, size_t n) {
    bt_buf_append(b, "[", 1);
    for (size_t i = 0; i < n; i++) {
        char num[16];
        int l = snprintf(num, sizeof num, i ? ",%u" : "%u", ids[i]);
        bt_buf_append(b, num, (size_t)l);
    }
    bt_buf_append(b, "]", 1);
}

static void build_prefix(fe_req *r) {
    bt_buf *p = &r->prefix;
    bt_buf_init(p, 4096);
    bt_buf_appendf(p, "data: {\"id\":\"%s%s\",\"object\":\"%s\",\"created\":%" PRId64 ",\"model\":\"",
                   r->api == BT_API_CHAT ? "chatcmpl-" : "cmpl-", r->rid,
                   r->api == BT_API_CHAT ? "chat.completion.chunk" : "text_completion", r->created);
    bt_buf_append_json_str(p, r->model->name, strlen(r->model->name));
    bt_buf_append_str(p, "\",\"choices\":[{\"index\":0,");
}

/* Appends one SSE event with new text (and ids), or the final one when finish != NULL, to b. */
static void build_chunk(fe_req *r, bt_buf *b, const uint32_t *ids, size_t n, const char *text, size_t len,
                        const char *finish) {
    bt_buf_append(b, r->prefix.data, r->prefix.len);
    if (r->api == BT_API_CHAT) {
        if (finish) bt_buf_append_str(b, "\"delta\":{}");
        else {
            bt_buf_append_str(b, r->role_sent ? "\"delta\":{\"content\":\"" : "\"delta\":{\"role\":\"assistant\",\"content\":\"");
            r->role_sent = true;
            bt_buf_append_json_str(b, text, len);
            bt_buf_append_str(b, "\"}");
        }
    } else {
        bt_buf_append_str(b, "\"text\":\"");
        bt_buf_append_json_str(b, text, len);
        bt_buf_append_str(b, "\",\"logprobs\":null");
    }
    if (finish) bt_buf_appendf(b, ",\"finish_reason\":\"%s\"", finish);
    else bt_buf_append_str(b, ",\"finish_reason\":null");
    if (r->return_ids && !finish) {
        bt_buf_append_str(b, ",\"token_ids\":");
        append_ids(b, ids, n);
    }
    bt_buf_append_str(b, "}]}\n\n");
}

/* One SSE event with new text (and ids): one write to the client. */
static void write_chunk(fe_req *r, const uint32_t *ids, size_t n, const char *text, size_t len) {
    bt_buf *b = &r->fe->scratch;
    bt_buf_reset(b);
    build_chunk(r, b, ids, n, text, len, NULL);
    bt_http_stream_write(r->http, b->data, b->len);
}

static void usage_json(bt_buf *b, uint32_t pt, uint32_t ct) {
    bt_buf_appendf(b, "{\"prompt_tokens\":%u,\"completion_tokens\":%u,\"total_tokens\":%u}", pt, ct, pt + ct);
}

/* The final event, the usage event if asked for, [DONE] and the end of the chunked body go out
 * in one write (one HTTP chunk holding the three SSE events). */
static void finish_streaming(fe_req *r, const char *reason) {
    begin_stream(r);
    bt_buf *b = &r->fe->scratch;
    bt_buf_reset(b);
    build_chunk(r, b, NULL, 0, NULL, 0, reason);
    if (r->include_usage) {
        /* the prefix ends inside "choices":[{ — a usage chunk has an empty choices list */
        size_t head = r->prefix.len - strlen("[{\"index\":0,");
        bt_buf_append(b, r->prefix.data, head);
        bt_buf_append_str(b, "[],\"usage\":");
        usage_json(b, r->prompt_tokens, r->completion_tokens);
        bt_buf_append_str(b, "}\n\n");
    }
    bt_buf_append_str(b, "data: [DONE]\n\n");
    bt_http_stream_finish(r->http, b->data, b->len);
}

static void finish_unary(fe_req *r, const char *reason) {
    bt_buf b;
    bt_buf_init(&b, (size_t)1 << 30);
    bt_buf_appendf(&b, "{\"id\":\"%s%s\",\"object\":\"%s\",\"created\":%" PRId64 ",\"model\":\"",
                   r->api == BT_API_CHAT ? "chatcmpl-" : "cmpl-", r->rid,
                   r->api == BT_API_CHAT ? "chat.completion" : "text_completion", r->created);
    bt_buf_append_json_str(&b, r->model->name, strlen(r->model->name));
    bt_buf_append_str(&b, "\",\"choices\":[{\"index\":0,");
    if (r->api == BT_API_CHAT) bt_buf_append_str(&b, "\"message\":{\"role\":\"assistant\",\"content\":\"");
    else bt_buf_append_str(&b, "\"text\":\"");
    bt_buf_append_json_str(&b, r->text.data ? r->text.data : "", r->text.len);
    bt_buf_append_str(&b, r->api == BT_API_CHAT ? "\"}" : "\",\"logprobs\":null");
    bt_buf_appendf(&b, ",\"finish_reason\":\"%s\"", reason);
    if (r->return_ids) {
        bt_buf_append_str(&b, ",\"token_ids\":");
        append_ids(&b, r->ids, r->nids);
    }
    bt_buf_append_str(&b, "}],\"usage\":");
    usage_json(&b, r->prompt_tokens, r->completion_tokens);
    bt_buf_append_str(&b, "}");
    char hdr[128];
    snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", r->rid);
    bt_http_respond(r->http, 200, "application/json", hdr, b.data, b.len);
    bt_buf_free(&b);
}

/* Ends the request with an error the client can read. */
static void fail_request(fe_req *r, bt_status code, const char *msg) {
    int status = status_for(code);
    fe_outcome out = code == BT_ERR_CANCELLED ? FE_OUT_CANCELLED : FE_OUT_ERROR;
    BT_WARN("request %s failed after %zu tokens and %d attempts: %s (%s)", r->rid, r->nids, r->attempts, msg,
            bt_status_name(code));
    if (r->http) {
        if (r->headers_sent) {
            /* mid-stream: a final data event with an OpenAI error object, then close, no [DONE] */
            bt_buf *b = &r->fe->scratch;
            bt_buf_reset(b);
            bt_buf_append_str(b, "data: {\"error\":{\"message\":\"");
            bt_buf_append_json_str(b, msg, strlen(msg));
            bt_buf_appendf(b, "\",\"type\":\"%s\",\"code\":%d}}\n\n", type_for(status), status);
            bt_http_stream_write(r->http, b->data, b->len);
            bt_http_stream_end(r->http, true);
        } else {
            fe_json_error(r->http, r->rid, status, type_for(status), "%s", msg);
        }
        r->http->user = NULL;
        r->http = NULL;
    }
    req_done(r, out);
}

/* Ends a running request with an error the client can read (the frontend's shutdown bound). */
void fe_request_fail(fe_req *r, bt_status code, const char *msg) { fail_request(r, code, msg); }

/* ---- cancellation ---- */

/* Ends a request whose context is stopped or killed and that has no attempt running: a stopped
 * one with what was generated and finish_reason "cancelled", a killed one with an error (or
 * quietly when the client is gone). */
static void end_cancelled(fe_req *r) {
    if (!r->http) {
        req_done(r, FE_OUT_CANCELLED);
        return;
    }
    if (bt_ctx_is_killed(r->ctx)) {
        fail_request(r, BT_ERR_CANCELLED, "request cancelled");
        return;
    }
    r->completion_tokens = (uint32_t)r->nids;
    if (r->stream) finish_streaming(r, "cancelled");
    else finish_unary(r, "cancelled");
    r->http->user = NULL;
    r->http = NULL;
    req_done(r, FE_OUT_CANCELLED);
}

/* The request's (root) context changed state; it runs after every attempt's callback. A kill
 * ends the request now. A stop waits for the attempt's FINISH (reason cancelled), which brings
 * what the engine generated, unless no attempt is running. */
static void on_req_cancel(bt_ctx *c, bt_ctx_state s, void *ud) {
    (void)c;
    fe_req *r = ud;
    if (r->state == RQ_DONE) return;
    if (s == BT_CTX_KILLED || !r->worker) end_cancelled(r);
}

/* An attempt's context changed state: a STOP or KILL frame for its stream goes to its worker,
 * written now rather than at the end of the loop iteration (a KILL frees the engine's KV blocks;
 * there is no reason to wait). */
static void on_attempt_cancel(bt_ctx *c, bt_ctx_state s, void *ud) {
    (void)c;
    fe_req *r = ud;
    fe_worker *w = r->worker;
    if (!w) return;
    bool kill = s == BT_CTX_KILLED;
    uint64_t t_write = bt_now_us();
    fe_worker_send_cancel(w, r->stream_id, kill);
    if (w->conn) bt_rpc_flush(w->conn);
    uint64_t now = bt_now_us();
    /* monotonic timestamps, for bench/cancel_latency.py */
    BT_DEBUG("request %s: %s written to worker %" PRIx64 " stream %u, %" PRIu64 " us after the cancel (cancel t=%" PRIu64
             " us, write t=%" PRIu64 " us; %u tokens on this attempt, %zu delivered)",
             r->rid, kill ? "KILL" : "STOP", w->id, r->stream_id, r->t_cancel_us ? now - r->t_cancel_us : 0,
             r->t_cancel_us, t_write, r->attempt_tokens, r->nids);
}

/* ---- dispatch and migration ---- */

static void attempt_failed(fe_req *r, bt_status code, const char *msg);

/* Sends the next attempt to a routable worker, preferring one other than the worker that failed
 * last. Called once per attempt: the first, and each migration (attempts > 0), which logs the
 * one line that records it. */
static void dispatch(fe_req *r) {
    fe *f = r->fe;
    if (bt_ctx_is_stopped(r->ctx)) { /* a stopped or killed request never gets another attempt */
        end_cancelled(r);
        return;
    }
    bool all_busy = false;
    /* a continuation was admitted already: it may go to a busy worker rather than fail */
    fe_worker *w = fe_route(f, r->model, r->failed_worker, r->attempts ? NULL : &all_busy);
    if (!w) {
        if (all_busy) {
            r->model->st.rejections[r->api]++;
            BT_WARN("rejecting request %s: all workers are busy", r->rid);
            if (r->http) {
                char hdr[160];
                snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\nRetry-After: %d\r\n", r->rid,
                         fe_retry_after_s(f, r->model));
                static const char body[] = "{\"error\":{\"message\":\"Service temporarily unavailable: All "
                                           "workers are busy, please retry later\",\"type\":\"Service "
                                           "Unavailable\",\"code\":503}}";
                bt_http_respond(r->http, 503, "application/json", hdr, body, sizeof body - 1);
                r->http->user = NULL;
                r->http = NULL;
            }
            req_done(r, FE_OUT_REJECTED);
            return;
        }
        if (r->attempts) {
            char m[256];
            snprintf(m, sizeof m, "no worker left to continue the request (last attempt: %s)", r->fail_msg);
            fail_request(r, BT_ERR_NO_WORKER, m);
        } else {
            fail_request(r, BT_ERR_NO_WORKER, "no worker available for the model");
        }
        return;
    }
    r->attempts_left--;
    r->attempts++;
    uint32_t id = fe_worker_send_request(w, r);
    if (id == 0) { /* the connection is going away under us: that attempt failed at once */
        fe_worker_quarantine(w, "cannot send a request");
        r->failed_worker = w->id;
        attempt_failed(r, BT_ERR_CANNOT_CONNECT, "cannot send the request to the worker");
        return;
    }
    r->worker = w;
    r->stream_id = id;
    r->attempt_tokens = 0;
    r->actx = bt_ctx_new(r->rid, on_attempt_cancel, r);
    if (!r->actx) {
        fail_request(r, BT_ERR_NOMEM, "out of memory"); /* req_done kills the stream */
        return;
    }
    bt_ctx_link(r->ctx, r->actx); /* the request is live (checked above): no callback here */
    if (r->attempts > 1)
        BT_WARN("request %s migrated from worker %" PRIx64 " to worker %" PRIx64
                " with %zu tokens carried (%s after %s: %s; attempt %d of %d)",
                r->rid, r->failed_worker, w->id, r->nids, r->nids ? "ongoing_request" : "new_request",
                bt_status_name(r->fail_code), r->fail_msg, r->attempts, r->attempts + r->attempts_left);
    /* for bench/migration_recovery.py: CLOCK_MONOTONIC, comparable across local processes */
    if (r->attempts > 1 && r->t_fail_us)
        BT_DEBUG("request %s: failure seen at t=%" PRIu64 " us, re-dispatched at t=%" PRIu64 " us", r->rid,
                 r->t_fail_us, bt_now_us());
}

void fe_request_on_attempt_failed(fe_req *r, bt_status code, const char *msg) {
    if (r->state == RQ_DONE) return;
    fe_worker *failed = r->worker; /* usually already detached by the caller */
    if (failed) {
        r->failed_worker = failed->id;
        fe_worker_stream_done(failed, r->stream_id);
        r->worker = NULL;
    }
    bt_ctx_free(r->actx);
    r->actx = NULL;
    attempt_failed(r, code, msg);
}

/* Ends the failed attempt: a cancellation or a non-migratable error ends the request; a
 * migratable one counts a migration (new_request before the first token reached the client,
 * ongoing_request after) and starts the next attempt while the budget lasts. */
static void attempt_failed(fe_req *r, bt_status code, const char *msg) {
    if (!r->http) {
        req_done(r, FE_OUT_CANCELLED);
        return;
    }
    if (bt_ctx_is_stopped(r->ctx)) { /* cancelled: never migrated; ends with what was generated */
        end_cancelled(r);
        return;
    }
    if (!bt_status_migratable(code)) {
        fail_request(r, code, msg);
        return;
    }
    if (code == BT_ERR_DRAINING && r->attempt_tokens == 0) {
        /* refused before it ran: the REQUEST crossed the worker's GOAWAY (docs/protocol.md §10).
         * Not a migration and not charged to the budget, so it holds with migration off too; the
         * worker is marked draining, so the retry goes elsewhere and cannot repeat there. */
        r->attempts_left++;
        r->fail_code = code;
        snprintf(r->fail_msg, sizeof r->fail_msg, "%s", msg);
        BT_INFO("request %s refused by draining worker %" PRIx64 " before it started; routing it elsewhere", r->rid,
                r->failed_worker);
        dispatch(r);
        return;
    }
    /* counted whether or not budget is left, as Dynamo does: the counters show how many
     * requests a failure touched; the exhausted counter shows how many of them it cost */
    if (r->nids > 0) r->model->st.migrations_ongoing++;
    else r->model->st.migrations_new++;
    if (r->attempts_left <= 0) {
        if (r->fe->o.migration_limit > 0) r->model->st.migrations_exhausted++;
        char m[256];
        if (r->fe->o.migration_limit > 0)
            snprintf(m, sizeof m, "%s (migration limit of %lld exhausted)", msg, (long long)r->fe->o.migration_limit);
        else
            snprintf(m, sizeof m, "%s (migration is disabled)", msg);
        fail_request(r, code, m);
        return;
    }
    if (!r->t_fail_us) r->t_fail_us = bt_now_us(); /* kept across back-to-back failures */
    r->fail_code = code;
    snprintf(r->fail_msg, sizeof r->fail_msg, "%s", msg);
    dispatch(r);
}

void fe_request_on_tokens(fe_req *r, const uint32_t *ids, size_t n, const char *text, size_t len) {
    if (r->state == RQ_DONE || !r->http || n == 0) return;
    fe_stats *st = &r->model->st;
    uint64_t now = bt_now_us();
    if (r->nids == 0) {
        r->t_first_us = now;
        fe_hist_observe(&st->ttft, (double)(now - r->t_start_us) / 1e6);
    } else {
        double itl = (double)(now - r->t_last_us) / 1e6 / (double)n;
        fe_hist_observe_n(&st->itl, itl, n); /* n tokens, each after itl: one bucket search */
    }
    if (r->t_fail_us) {
        /* the stall the client saw: from the last token before the failure (or the request's
         * start, if none had come) to this one; it includes the detection time */
        fe_hist_observe(&st->migration_stall, (double)(now - (r->nids ? r->t_last_us : r->t_start_us)) / 1e6);
        BT_DEBUG("request %s: first token after the migration at t=%" PRIu64 " us", r->rid, now);
        r->t_fail_us = 0;
    }
    r->t_last_us = now;
    r->state = RQ_STREAMING;
    /* the delivered ids are exactly what a continuation must carry; never more than max_tokens */
    if (r->nids + n > (size_t)r->max_tokens) n = (size_t)r->max_tokens - r->nids;
    if (r->nids + n > r->ids_cap) {
        size_t cap = r->ids_cap ? r->ids_cap * 2 : 64;
        while (cap < r->nids + n) cap *= 2;
        uint32_t *p = realloc(r->ids, cap * sizeof *p);
        if (!p) {
            fail_request(r, BT_ERR_NOMEM, "out of memory");
            return;
        }
        r->ids = p;
        r->ids_cap = cap;
    }
    memcpy(r->ids + r->nids, ids, n * sizeof *ids);
    r->nids += n;
    r->attempt_tokens += (uint32_t)n;
    st->tokens_out += n;
    if (r->stream) {
        begin_stream(r);
        write_chunk(r, ids, n, text, len);
        /* kept for continuations on engines that resume from text (docs/protocol.md §6) */
        if (!r->text_lost && bt_buf_append(&r->text, text, len) != BT_OK) {
            r->text_lost = true;
            bt_buf_free(&r->text);
        }
    } else if (bt_buf_append(&r->text, text, len) != BT_OK) {
        fail_request(r, BT_ERR_TOO_LARGE, "response too large");
    }
}

void fe_request_on_finish(fe_req *r, uint8_t reason, uint32_t prompt_tokens, uint32_t completion_tokens) {
    if (r->state == RQ_DONE) return;
    bt_ctx_free(r->actx); /* the attempt is over (the caller detached it from its worker) */
    r->actx = NULL;
    if (!r->http) {
        req_done(r, FE_OUT_CANCELLED);
        return;
    }
    r->prompt_tokens = prompt_tokens;
    r->completion_tokens = completion_tokens;
    const char *why = bt_finish_reason_name((bt_finish_reason)reason);
    if (r->stream) finish_streaming(r, why);
    else finish_unary(r, why);
    r->http->user = NULL;
    r->http = NULL;
    req_done(r, reason == BT_FINISH_CANCELLED ? FE_OUT_CANCELLED : FE_OUT_SUCCESS);
}

/* The client went away (socket closed or reset, a write failed, or it stopped reading past the
 * backlog cap), at any point: queued in an engine, streaming, or waiting for a whole answer. The
 * request's context is killed: the attempt's KILL frame reaches the engine, which drops the
 * sequence and frees its KV blocks, and the request ends in its context's callback. */
void fe_request_abort(fe *f, bt_http_req *http) {
    fe_req *r = http->user;
    if (!r) return;
    f->disconnected_clients++;
    if (!bt_ctx_is_stopped(r->ctx)) r->model->st.cancellations[r->stream]++;
    BT_INFO("request %s: client disconnected after %zu tokens (%s, attempt %d); killing it", r->rid, r->nids,
            r->stream ? "streaming" : "unary", r->attempts);
    http->user = NULL;
    r->http = NULL;
    r->t_cancel_us = bt_now_us();
    bt_ctx_kill(r->ctx); /* r is freed by the time this returns */
}

/* Operator stop or kill of every running request with this id (client-chosen ids may repeat).
 * A stop lets the attempt finish with what it generated (finish_reason "cancelled"); a kill ends
 * the request with an error at once. Either way nothing is migrated any more. */
bool fe_request_cancel_by_id(fe *f, const char *rid, bool kill) {
    bool found = false;
    for (fe_req *r = f->reqs, *next; r; r = next) {
        next = r->next; /* a kill frees r, and only r */
        if (strcmp(r->rid, rid) != 0 || r->state == RQ_DONE) continue;
        found = true;
        if (!bt_ctx_is_stopped(r->ctx)) r->model->st.cancellations[r->stream]++;
        BT_INFO("request %s: %s by the operator after %zu tokens (attempt %d)", r->rid, kill ? "killed" : "stopped",
                r->nids, r->attempts);
        if (!r->t_cancel_us) r->t_cancel_us = bt_now_us();
        if (kill) bt_ctx_kill(r->ctx);
        else bt_ctx_stop(r->ctx);
    }
    return found;
}

/* ---- validation ---- */

static bool valid_rid(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > RID_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
              c == '.' || c == ':'))
            return false;
    }
    return true;
}

/* Checks the OpenAI body (see fe.h); on error writes a message and returns false. */
bool fe_validate_body(json_t *body, bt_api api, char *err, size_t errlen) {
    if (!json_is_object(body)) return snprintf(err, errlen, "request body must be a JSON object"), false;
    if (!json_is_string(json_object_get(body, "model")))
        return snprintf(err, errlen, "'model' is required and must be a string"), false;
    if (api == BT_API_CHAT) {
        json_t *msgs = json_object_get(body, "messages");
        if (!json_is_array(msgs) || json_array_size(msgs) == 0)
            return snprintf(err, errlen, "'messages' is required and must be a non-empty array"), false;
        size_t i;
        json_t *m;
        json_array_foreach(msgs, i, m) {
            json_t *c = json_object_get(m, "content");
            if (!json_is_object(m) || !json_is_string(json_object_get(m, "role")) ||
                !(json_is_string(c) || json_is_array(c) || json_is_null(c)))
                return snprintf(err, errlen, "messages[%zu] must have a string 'role' and a 'content'", i), false;
        }
    } else {
        json_t *p = json_object_get(body, "prompt");
        if (!p) return snprintf(err, errlen, "'prompt' is required"), false;
        if (json_is_array(p)) {
            if (json_array_size(p) == 0) return snprintf(err, errlen, "'prompt' must not be empty"), false;
            size_t i;
            json_t *v;
            json_array_foreach(p, i, v) {
                if (json_is_integer(v)) {
                    if (json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX)
                        return snprintf(err, errlen, "prompt token %zu is out of range", i), false;
                } else if (!json_is_string(v) || json_array_size(p) != 1) {
                    return snprintf(err, errlen, "'prompt' must be a string, one string in an array, or token ids"),
                           false;
                }
            }
        } else if (!json_is_string(p)) {
            return snprintf(err, errlen, "'prompt' must be a string or an array of token ids"), false;
        }
    }
    const char *ints[] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, ints[i]);
        if (v && !json_is_null(v) &&
            (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > MAX_TOKENS_LIMIT))
            return snprintf(err, errlen, "'%s' must be an integer from 0 to %d", ints[i], MAX_TOKENS_LIMIT), false;
    }
    json_t *t = json_object_get(body, "temperature");
    if (t && !json_is_null(t) && (!json_is_number(t) || json_number_value(t) < 0 || json_number_value(t) > 2))
        return snprintf(err, errlen, "'temperature' must be a number from 0 to 2"), false;
    json_t *seed = json_object_get(body, "seed");
    if (seed && !json_is_null(seed) && !json_is_integer(seed))
        return snprintf(err, errlen, "'seed' must be an integer"), false;
    json_t *stop = json_object_get(body, "stop");
    if (stop && !json_is_null(stop)) {
        bool ok = json_is_string(stop) || (json_is_array(stop) && json_array_size(stop) <= BT_MAX_STOP);
        size_t i;
        json_t *v;
        if (json_is_array(stop)) json_array_foreach(stop, i, v) ok = ok && json_is_string(v) && json_string_length(v) > 0;
        if (json_is_string(stop)) ok = json_string_length(stop) > 0;
        if (!ok) return snprintf(err, errlen, "'stop' must be a non-empty string or up to %d of them", BT_MAX_STOP), false;
    }
    json_t *st = json_object_get(body, "stream");
    if (st && !json_is_null(st) && !json_is_boolean(st)) return snprintf(err, errlen, "'stream' must be a boolean"), false;
    json_t *so = json_object_get(body, "stream_options");
    if (so && !json_is_null(so) && !json_is_object(so))
        return snprintf(err, errlen, "'stream_options' must be an object"), false;
    json_t *n = json_object_get(body, "n");
    if (n && !json_is_null(n) && !(json_is_integer(n) && json_integer_value(n) == 1))
        return snprintf(err, errlen, "only n = 1 is supported"), false;
    return true;
}

void fe_request_start(fe *f, bt_http_req *http, bt_api api) {
    char err[256];
    char rid[RID_MAX + 8];
    if (http->request_id && valid_rid(http->request_id)) snprintf(rid, sizeof rid, "%s", http->request_id);
    else bt_uuid4(rid);
    f->requests_seen++;

    json_error_t jerr;
    json_t *body = json_loadb(http->body, http->body_len, 0, &jerr);
    if (!body) {
        fe_json_error(http, rid, 400, "invalid_request_error", "invalid JSON body: %s (line %d, column %d)",
                      jerr.text, jerr.line, jerr.column);
        return;
    }
    if (!fe_validate_body(body, api, err, sizeof err)) {
        fe_json_error(http, rid, 400, "invalid_request_error", "%s", err);
        json_decref(body);
        return;
    }
    const char *model_name = json_string_value(json_object_get(body, "model"));
    fe_model *m = fe_model_get(f, model_name, false);
    if (!m) {
        fe_json_error(http, rid, 404, "not_found_error", "The model '%s' does not exist", model_name);
        json_decref(body);
        return;
    }
    if (f->shutting_down && f->o.accept_window_ms >= 0 &&
        bt_now_ms() - f->shutdown_started_ms > (uint64_t)f->o.accept_window_ms) {
        fe_json_error(http, rid, 503, "service_unavailable", "the frontend is shutting down");
        json_decref(body);
        return;
    }
    if (!fe_reqs_reserve(f)) { /* the limit is the process's, over every shard */
        f->limit_rejections++;
        fe_json_error(http, rid, 503, "service_unavailable", "too many concurrent requests (limit %lld)",
                      (long long)f->o.max_requests);
        json_decref(body);
        return;
    }
    fe_req *r = calloc(1, sizeof *r);
    if (!r) {
        fe_reqs_release(f);
        fe_json_error(http, rid, 500, "internal_error", "out of memory");
        json_decref(body);
        return;
    }
    r->ctx = bt_ctx_new(rid, on_req_cancel, r);
    if (!r->ctx) {
        fe_reqs_release(f);
        fe_json_error(http, rid, 500, "internal_error", "out of memory");
        json_decref(body);
        free(r);
        return;
    }
    r->fe = f;
    r->model = m;
    r->http = http;
    http->user = r;
    snprintf(r->rid, sizeof r->rid, "%s", rid);
    r->api = api;
    r->body = body;
    r->stream = json_is_true(json_object_get(body, "stream"));
    r->include_usage = json_is_true(json_object_get(json_object_get(body, "stream_options"), "include_usage"));
    r->return_ids = json_is_true(json_object_get(body, "return_token_ids"));
    json_t *mt = json_object_get(body, "max_completion_tokens");
    if (!json_is_integer(mt)) mt = json_object_get(body, "max_tokens");
    r->max_tokens = json_is_integer(mt) ? json_integer_value(mt) : MAX_TOKENS_DEFAULT;
    /* One seed for every attempt of a request without one, so an engine that samples for real
     * continues a migrated stream exactly (docs/protocol.md, "seed"). */
    if (!json_is_integer(json_object_get(body, "seed")))
        while (!r->seed) r->seed = bt_random64() & 0x7fffffffffffffffull;
    r->attempts_left = (int)f->o.migration_limit + 1;
    r->t_start_us = bt_now_us();
    r->created = bt_wall_s();
    bt_buf_init(&r->text, (size_t)64 << 20);
    build_prefix(r);
    r->next = f->reqs;
    if (f->reqs) f->reqs->prev = r;
    f->reqs = r;
    f->nreqs++;
    m->st.inflight++;
    dispatch(r);
}
