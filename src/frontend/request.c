/* request.c — one client request from validation to its last byte.
 *
 * Lifecycle (fe_req_state, fe.h): admitted → routing → streaming → done, with migrating between
 * an attempt's failure and the next attempt's first token; every change goes through
 * fe_req_set_state, which logs it. The attempts themselves — dispatch, the budget, the
 * continuation — are migrate.c's; this file validates and admits the request, writes what its
 * attempts deliver to the client, and ends it.
 *
 * Cancellation (common/cancel.h): each request has a root context and each attempt a child
 * context whose callback sends STOP or KILL for the attempt's stream. A client that goes away
 * kills the root; the operator endpoint stops or kills it. A stopped or killed request never gets
 * another attempt (checked before every one), so it is never migrated.
 *
 * Streaming responses are OpenAI SSE chunks; headers go out with the first token, so that a
 * request that cannot be served at all still gets a proper HTTP status. Each event has an `id:`
 * line naming the stream and the position (tokens delivered) after it, and is journaled first
 * (journal.h), so that a client that loses its connection can resume after it (resume.c). */
#include <inttypes.h>
#include <math.h>
#include <openssl/sha.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jcanon.h"
#include "common/jstr.h"
#include "common/log.h"
#include "engine/params.h"
#include "frontend/fe.h"

#define MAX_TOKENS_LIMIT 1000000
#define RID_MAX 64
/* OpenAI's documented bounds on `metadata` (characters, not bytes) */
#define MAX_METADATA 16
#define MAX_METADATA_KEY 64
#define MAX_METADATA_VALUE 512

const char *fe_error_type(int status) {
    if (status == 499) return "cancelled";
    return status >= 500 ? "server_error" : "invalid_request_error";
}

void fe_error_body(bt_buf *b, int status, const char *code, const char *param, const char *msg) {
    bt_buf_append_str(b, "{\"error\":{\"message\":\"");
    bt_buf_append_json_str(b, msg, strlen(msg));
    bt_buf_appendf(b, "\",\"type\":\"%s\",\"param\":", fe_error_type(status));
    if (param) {
        bt_buf_append_str(b, "\"");
        bt_buf_append_json_str(b, param, strlen(param));
        bt_buf_append_str(b, "\"");
    } else {
        bt_buf_append_str(b, "null");
    }
    bt_buf_append_str(b, ",\"code\":");
    if (code) bt_buf_appendf(b, "\"%s\"}}", code);
    else bt_buf_append_str(b, "null}}");
}

static void json_error_v(bt_http_req *http, const char *rid, int status, const char *code, const char *param,
                         const char *headers, const char *fmt, va_list ap) {
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    /* a request's own failure is written with the request (req_done); here, what never became one */
    if (!http->user) fe_access_answer(http, rid, status, code);
    /* client mistakes at debug level (a hostile client must not flood the log), the rest at info,
     * ten a second at most per event loop: under the overload that sheds requests with 503, a line
     * per request would be a flood (baton_frontend_requests_total counts them all) */
    static _Thread_local bt_log_limit lim;
    unsigned unsaid = 0;
    if (status < 500) BT_DEBUG("request %s answered %d: %s", rid ? rid : "-", status, msg);
    else if (bt_log_enabled(BT_LOG_INFO) && bt_log_limit_take(&lim, bt_now_ms(), 10, &unsaid)) {
        if (unsaid)
            BT_INFO("request %s answered %d: %s (%u more answers of 5xx in the second before, not logged)",
                    rid ? rid : "-", status, msg, unsaid);
        else BT_INFO("request %s answered %d: %s", rid ? rid : "-", status, msg);
    }
    bt_buf b;
    bt_buf_init(&b, 4096);
    fe_error_body(&b, status, code, param, msg);
    char hdr[320] = "";
    size_t hl = 0;
    if (rid) hl += (size_t)snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", rid);
    if (status == 503 && !(headers && strstr(headers, "Retry-After:")) && hl < sizeof hdr)
        hl += (size_t)snprintf(hdr + hl, sizeof hdr - hl, "Retry-After: 1\r\n");
    if (headers && hl < sizeof hdr) snprintf(hdr + hl, sizeof hdr - hl, "%s", headers);
    static const char fallback[] = "{\"error\":{\"message\":\"error\",\"type\":\"server_error\",\"param\":null,"
                                   "\"code\":null}}"; /* the body could not be built (out of memory) */
    if (bt_buf_status(&b) == BT_OK) bt_http_respond(http, status, "application/json", hdr, b.data, b.len);
    else bt_http_respond(http, status, "application/json", hdr, fallback, sizeof fallback - 1);
    bt_buf_free(&b);
}

void fe_json_error(bt_http_req *http, const char *rid, int status, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    json_error_v(http, rid, status, code, NULL, NULL, fmt, ap);
    va_end(ap);
}

void fe_json_error_ex(bt_http_req *http, const char *rid, int status, const char *code, const char *param,
                      const char *headers, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    json_error_v(http, rid, status, code, param, headers, fmt, ap);
    va_end(ap);
}

/* The longest Retry-After passed on from a busy upstream's refusal. */
#define UPSTREAM_RETRY_AFTER_MAX_S 60

static int status_for(bt_status code) {
    switch (code) {
    case BT_ERR_INVALID:
    case BT_ERR_INVALID_PROMPT:
    case BT_ERR_INVALID_LOGIT_BIAS:
    case BT_ERR_UNSUPPORTED_PARAM:
    case BT_ERR_INVALID_PARAM:
    case BT_ERR_TOO_LARGE:
    case BT_ERR_CONTEXT_LENGTH: return 400;
    case BT_ERR_NOT_FOUND: return 404;
    case BT_ERR_CANCELLED: return 499;
    case BT_ERR_UPSTREAM_RATE_LIMITED: return 429;
    case BT_ERR_UPSTREAM_BUSY:
    case BT_ERR_OVERLOADED:
    case BT_ERR_NO_WORKER: return 503;
    case BT_ERR_UPSTREAM_TIMEOUT: return 504;
    default: return bt_status_migratable(code) ? 503 : 500;
    }
}

/* The OpenAI error code (a string) for a request that failed with `code`. */
static const char *code_for(bt_status code) {
    switch (code) {
    case BT_ERR_INVALID:
    case BT_ERR_INVALID_PROMPT:
    case BT_ERR_INVALID_LOGIT_BIAS:
    case BT_ERR_INVALID_PARAM: return "invalid_value";
    case BT_ERR_UNSUPPORTED_PARAM: return "unsupported_value";
    case BT_ERR_TOO_LARGE: return "request_too_large";
    case BT_ERR_CONTEXT_LENGTH: return "context_length_exceeded";
    case BT_ERR_NOT_FOUND: return "not_found";
    case BT_ERR_CANCELLED: return "request_cancelled";
    case BT_ERR_UPSTREAM_BUSY:
    case BT_ERR_OVERLOADED: return "overloaded";
    case BT_ERR_UPSTREAM_RATE_LIMITED: return "rate_limit_exceeded";
    case BT_ERR_NO_WORKER: return "no_worker_available";
    case BT_ERR_SHUTDOWN: return "shutting_down";
    case BT_ERR_ENGINE: return "engine_error";
    case BT_ERR_UPSTREAM_TIMEOUT: return "upstream_timeout";
    case BT_ERR_NOMEM: return "out_of_memory";
    default: return bt_status_migratable(code) ? "worker_unavailable" : "internal_error";
    }
}

/* ---- lifetime ---- */

static const char *const state_names[] = {"admitted", "routing", "streaming", "migrating", "done"};

const char *fe_req_state_name(fe_req_state s) { return state_names[s]; }

void fe_req_set_state(fe_req *r, fe_req_state s, const char *reason) {
    if (r->state == s) return;
    BT_DEBUG("request %s: %s -> %s (%s)", r->rid, state_names[r->state], state_names[s], reason);
    r->state = s;
}

static void req_free(fe_req *r) {
    fe *f = r->fe;
    if (r->jrec) fe_journal_close(f->grp->journal, r->jrec, &r->jtail);
    if (r->dropped_jrec) fe_journal_close(f->grp->journal, r->dropped_jrec, &r->jtail);
    if (r->replay) {
        fe_jsnap_free(r->replay);
        free(r->replay);
    }
    LIST_REMOVE(r, link);
    f->nreqs--;
    fe_admit_forget(r); /* a queued request leaves the queue at once */
    fe_migrate_unwait(r);
    fe_reqs_release(f);
    if (r->model) r->model->st.inflight--;
    if (r->http) r->http->user = NULL;
    json_decref(r->body);
    free(r->canon);
    free(r->ids);
    bt_buf_free(&r->text);
    if (r->prefix != r->prefix_in) free((char *)r->prefix);
    fe_kv_free(&r->kv);
    bt_ctx_free(r->ctx);
    bt_pool_put(&f->req_pool, r);
}

/* Ends the request: counts the outcome, releases the attempt, frees the request. */
static void req_done(fe_req *r, fe_outcome out) {
    static const char *const outcome_names[] = {"answered", "failed", "cancelled", "rejected: every worker is busy"};
    fe_req_set_state(r, FE_REQ_DONE, outcome_names[out]);
    if (r->attempt) fe_attempt_abandon(r->attempt);
    if (r->mig_pending && r->model) r->model->st.migrations_unserved++;
    fe_access_request(r, out); /* before req_free: it reads the ticket */
    if (r->model) {
        r->model->st.requests[r->api][r->stream][out]++;
        fe_hist_observe(&r->model->st.duration, (double)(bt_now_us() - r->t_start_us) / 1e6);
    }
    req_free(r);
}

/* ---- output ---- */

/* Opens the stream's journal record, unless journaling is off or full (then the stream has no
 * ids and cannot be resumed) or the request is a resume (it has its record already). */
static void journal_open(fe_req *r) {
    fe_journal *j = r->fe->grp->journal;
    if (!j || r->resumed || r->jrec) return;
    /* the canonical body made once at the start (fe_request_start); dumped here only without it */
    char *dumped = r->canon ? NULL : bt_jcanon_dump(r->body, 0, NULL);
    const char *body = r->canon ? r->canon : dumped;
    if (!body) return;
    fe_jsnap meta = {.api = r->api,
                     .body = (char *)body, /* copied by the journal */
                     .body_len = r->canon ? r->canon_len : strlen(body),
                     .created = r->created,
                     .max_tokens = r->max_tokens,
                     .seed = r->seed,
                     .priority = fe_admit_priority(r),
                     .include_usage = r->include_usage,
                     .return_ids = r->return_ids};
    memcpy(meta.body_digest, r->body_digest, sizeof meta.body_digest);
    bt_copy_str(meta.rid, sizeof meta.rid, r->rid);
    bt_copy_str(meta.model, sizeof meta.model, r->model->name);
    uint8_t mac[FE_KEY_MAC_LEN];
    fe_key_mac(r->fe, r->http, mac);
    r->jrec = fe_journal_open(j, &meta, mac, r->fe->shard);
    if (r->jrec) memcpy(r->stream_id, meta.stream_id, sizeof r->stream_id);
    /* from the first token on, the record is the one copy of the output (fe_request_output) */
    r->out_in_rec = r->jrec && r->nids == 0;
    free(dumped);
}

/* hold: the head goes out with the next bytes written (the caller writes at once, then flushes) */
static void stream_head(fe_req *r, bool hold) {
    if (r->headers_sent || !r->http) return;
    journal_open(r);
    char hdr[200];
    if (r->jrec) snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\nX-Stream-Id: %s\r\n", r->rid, r->stream_id);
    else snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", r->rid);
    r->http_status = 200;
    if (hold) bt_http_stream_begin_held(r->http, 200, "text/event-stream", hdr);
    else bt_http_stream_begin(r->http, 200, "text/event-stream", hdr);
    r->headers_sent = true;
}

void fe_request_begin_stream(fe_req *r) { stream_head(r, false); }

/* The SSE id line of an event: "<stream id>:<position>" for a token event, with ":end",
 * ":usage", ":done" or ":error" for the events after the last token (resume.c parses it). */
static void append_id(bt_buf *b, const fe_req *r, size_t pos, const char *mark) {
    if (!r->jrec) return;
    /* on the per-token path: built by hand, not by a formatted print */
    char line[4 + FE_STREAM_ID_LEN + 1 + 20 + 8 + 1];
    size_t n = 0;
    memcpy(line, "id: ", 4);
    n = 4;
    memcpy(line + n, r->stream_id, FE_STREAM_ID_LEN);
    n += FE_STREAM_ID_LEN;
    line[n++] = ':';
    char digits[20];
    size_t d = 0;
    do digits[d++] = (char)('0' + pos % 10);
    while ((pos /= 10) != 0);
    while (d) line[n++] = digits[--d];
    size_t ml = strlen(mark);
    memcpy(line + n, mark, ml); /* "", ":end", ":usage", ":done" or ":error" */
    n += ml;
    line[n++] = '\n';
    bt_buf_append(b, line, n);
}

static void append_ids(bt_buf *b, const uint32_t *ids, size_t n) {
    bt_buf_append(b, "[", 1);
    for (size_t i = 0; i < n; i++) { /* per token with return_ids: no printf */
        if (i) bt_buf_append(b, ",", 1);
        bt_buf_append_i64(b, ids[i]);
    }
    bt_buf_append(b, "]", 1);
}

/* Makes r->prefix: in the request (prefix_in) when it fits, where a token finds it with the
 * fields it reads; else in its own heap block. Left NULL when out of memory. */
static void build_prefix(fe_req *r) {
    bt_buf buf, *p = &buf;
    bt_buf_init(p, 4096);
    /* by pieces rather than one printf: this runs once per streamed request */
    bt_buf_append_str(p, r->api == BT_API_CHAT ? "data: {\"id\":\"chatcmpl-" : "data: {\"id\":\"cmpl-");
    bt_buf_append_str(p, r->rid);
    bt_buf_append_str(p, r->api == BT_API_CHAT ? "\",\"object\":\"chat.completion.chunk\",\"created\":"
                                               : "\",\"object\":\"text_completion\",\"created\":");
    bt_buf_append_i64(p, r->created);
    bt_buf_append_str(p, ",\"model\":\"");
    bt_buf_append_json_str(p, r->model->name, strlen(r->model->name));
    bt_buf_append_str(p, "\",\"choices\":[{\"index\":0,");
    if (bt_buf_status(p) != BT_OK) {
        bt_buf_free(p);
        return;
    }
    if (p->len <= sizeof r->prefix_in) {
        memcpy(r->prefix_in, p->data, p->len);
        r->prefix = r->prefix_in;
        r->prefix_len = p->len;
        bt_buf_free(p);
        return;
    }
    r->prefix = bt_buf_steal(p, &r->prefix_len);
}

/* A string literal appended with its length known at compile time: the per-token path's pieces. */
#define APPEND_LIT(b, lit) bt_buf_append((b), (lit), sizeof(lit) - 1)

/* Appends one SSE event with new text (and ids), or the final one when finish != NULL, to b. */
static void build_chunk(fe_req *r, bt_buf *b, const uint32_t *ids, size_t n, const char *text, size_t len,
                        const char *finish) {
    bt_buf_append(b, r->prefix, r->prefix_len);
    if (r->api == BT_API_CHAT) {
        /* a stream that delivered no text (max_tokens 0, a stop or EOS at once, a stop before the
         * first token) still names the role once, as OpenAI's first chunk does: SDK stream helpers
         * (openai-node's finalChatCompletion) fail on a choice without one */
        if (finish && r->role_sent) APPEND_LIT(b, "\"delta\":{}");
        else if (finish) {
            APPEND_LIT(b, "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}");
            r->role_sent = true;
        } else {
            if (r->role_sent) APPEND_LIT(b, "\"delta\":{\"content\":\"");
            else APPEND_LIT(b, "\"delta\":{\"role\":\"assistant\",\"content\":\"");
            r->role_sent = true;
            bt_buf_append_json_str(b, text, len);
            APPEND_LIT(b, "\"}");
        }
    } else {
        APPEND_LIT(b, "\"text\":\"");
        bt_buf_append_json_str(b, text, len);
        APPEND_LIT(b, "\",\"logprobs\":null");
    }
    if (finish) {
        APPEND_LIT(b, ",\"finish_reason\":\"");
        bt_buf_append_str(b, finish);
        bt_buf_append(b, "\"", 1);
    } else {
        APPEND_LIT(b, ",\"finish_reason\":null");
    }
    if (r->return_ids && !finish) {
        APPEND_LIT(b, ",\"token_ids\":");
        append_ids(b, ids, n);
    }
    /* With include_usage, OpenAI gives every chunk before the usage one "usage": null (the final
     * event included); without it, no key. A replayed event (resume.c) is built here too, from the
     * journaled body's include_usage, so a resumed stream repeats these bytes exactly. */
    if (r->include_usage) APPEND_LIT(b, "}],\"usage\":null}\n\n");
    else APPEND_LIT(b, "}]}\n\n");
}

/* Stores n ids at position pos of the request's own copy of its output; false when out of memory. */
static bool store_ids(fe_req *r, size_t pos, const uint32_t *ids, size_t n) {
    if (pos + n > r->ids_cap) {
        size_t cap = r->ids_cap ? r->ids_cap * 2 : 64;
        while (cap < pos + n) cap *= 2;
        uint32_t *p = realloc(r->ids, cap * sizeof *p);
        if (!p) return false;
        r->ids = p;
        r->ids_cap = cap;
    }
    if (n) memcpy(r->ids + pos, ids, n * sizeof *ids);
    return true;
}

/* The record of a request whose output lived in it was dropped (the journal is full): what it
 * held becomes the request's own copy, which the caller completes with the current event. */
static void take_output(fe_req *r) {
    uint32_t *ids;
    char *text;
    size_t nids, text_len;
    fe_jrec_take_output(r->jrec, &ids, &nids, &text, &text_len);
    r->out_in_rec = false;
    free(r->ids); /* empty while the output lived in the record */
    r->ids = ids;
    r->ids_cap = ids ? nids : 0;
    bt_buf_free(&r->text);
    if (text_len && bt_buf_append(&r->text, text, text_len) != BT_OK) {
        r->text_lost = true;
        bt_buf_free(&r->text);
    }
    free(text);
}

void fe_request_output(const fe_req *r, const uint32_t **ids, const char **text, size_t *text_len) {
    size_t nids = 0;
    if (r->out_in_rec && r->jrec && fe_jrec_output(r->jrec, ids, &nids, text, text_len)) {
        /* the text is carried under the same cap as the request's own copy */
        if (*text_len > r->text.cap) *text = NULL;
        else if (!*text) *text = "";
        return;
    }
    *ids = r->ids;
    *text = r->text_lost ? NULL : r->text.data ? r->text.data : "";
    *text_len = r->text_lost ? 0 : r->text.len;
}

/* One SSE event with new text (and ids): journaled, then one write to the client. Returns NULL, or
 * why not, with nothing written or journaled: the event did not fit the scratch buffer (the caller
 * ends the request), or it straddles the position of a client ahead of the journal (the caller
 * catches up, below). */
static const char chunk_too_large[] = "a chunk is larger than the frontend's output buffer";
static const char chunk_straddles[] = "the continuation's events do not line up with the client's position";

static const char *write_chunk(fe_req *r, const uint32_t *ids, size_t n, const char *text, size_t len) {
    /* a resume ahead of the journal (resume.c) whose client's position falls inside this event:
     * the client cannot be given only the part it lacks */
    if (r->skip_to && r->nids > r->skip_to && r->nids - n < r->skip_to) return chunk_straddles;
    bt_buf *b = &r->fe->scratch;
    bt_buf_reset(b);
    append_id(b, r, r->nids, "");
    build_chunk(r, b, ids, n, text, len, NULL);
    if (bt_buf_status(b) != BT_OK) return chunk_too_large;
    if (r->jrec && !fe_journal_append(r->fe->grp->journal, r->jrec, ids, n, text, len)) {
        BT_WARN("request %s: stream journal full; stream %s is no longer resumable", r->rid, r->stream_id);
        if (r->out_in_rec) take_output(r);
        r->dropped_jrec = r->jrec; /* closed (and freed) at the request's end: req_free */
        r->jrec = NULL;
    }
    if (r->skip_to) { /* a resume ahead of the journal: the client has these events (resume.c) */
        if (r->nids <= r->skip_to) return NULL;
        r->skip_to = 0;
        r->catch_up = false;
    }
    bt_http_stream_write(r->http, b->data, b->len);
    return NULL;
}

void fe_request_write_replayed(fe_req *r, bt_buf *b, const uint32_t *ids, size_t n, const char *text, size_t len,
                               uint32_t pos, bool role) {
    r->role_sent = !role;
    append_id(b, r, pos, "");
    build_chunk(r, b, ids, n, text, len, NULL);
}

/* OpenAI's three fields; a request whose body carried tokens in (carried_token_ids) also gets
 * carried_tokens: how many of completion_tokens it did not generate but was given, so that an
 * operator can bill them as the prefill work they were (docs/engines.md §2.6). */
static void usage_json(bt_buf *b, const fe_req *r, uint32_t pt, uint32_t ct) {
    if (r->usage_unreported) { /* the upstream gave none: no counts are made up (docs/engines.md §2.1) */
        bt_buf_append_str(b, "null");
        return;
    }
    bt_buf_append_str(b, "{\"prompt_tokens\":");
    bt_buf_append_i64(b, pt);
    bt_buf_append_str(b, ",\"completion_tokens\":");
    bt_buf_append_i64(b, ct);
    bt_buf_append_str(b, ",\"total_tokens\":");
    bt_buf_append_i64(b, (uint32_t)(pt + ct)); /* as "%u" printed it: unsigned, wrapping */
    if (r->body_carried) {
        bt_buf_append_str(b, ",\"carried_tokens\":");
        bt_buf_append_i64(b, r->body_carried);
    }
    bt_buf_append(b, "}", 1);
}

/* The events after the last token, from the one after `mark` (FE_MARK_NONE: all of them): the
 * final event, the usage event if asked for, [DONE]. */
static void build_tail(fe_req *r, bt_buf *b, const char *reason, int mark) {
    if (mark < FE_MARK_END) {
        append_id(b, r, r->nids, ":end");
        build_chunk(r, b, NULL, 0, NULL, 0, reason);
    }
    if (r->include_usage && mark < FE_MARK_USAGE) {
        append_id(b, r, r->nids, ":usage");
        /* the prefix ends inside "choices":[{ — a usage chunk has an empty choices list */
        size_t tail = strlen("[{\"index\":0,");
        bt_buf_append(b, r->prefix, r->prefix_len > tail ? r->prefix_len - tail : 0);
        bt_buf_append_str(b, "[],\"usage\":");
        usage_json(b, r, r->prompt_tokens, r->completion_tokens);
        bt_buf_append_str(b, "}\n\n");
    }
    append_id(b, r, r->nids, ":done");
    bt_buf_append_str(b, "data: [DONE]\n\n");
}

/* The final event, the usage event if asked for, [DONE] and the end of the chunked body go out
 * in one write (one HTTP chunk holding the three SSE events). */
static void finish_streaming(fe_req *r, const char *reason) {
    stream_head(r, false);
    bt_buf *b = &r->fe->scratch;
    bt_buf_reset(b);
    /* a resume from one of these events whose record lacked them (resume.c: the client was ahead
     * of a shared journal) writes only those after it; any other request has FE_MARK_NONE here */
    build_tail(r, b, reason, r->replay_tail);
    if (bt_buf_status(b) != BT_OK) { /* out of memory: end the stream short rather than malformed */
        BT_ERROR("request %s: cannot build its last events (%s); closing the stream", r->rid,
                 bt_status_msg(bt_buf_status(b)));
        bt_http_stream_end(r->http, true);
        return;
    }
    r->jtail.kind = FE_JTAIL_FINISH;
    bt_copy_str(r->jtail.finish, sizeof r->jtail.finish, reason);
    r->jtail.prompt_tokens = r->prompt_tokens;
    r->jtail.completion_tokens = r->completion_tokens;
    r->jtail.usage_unreported = r->usage_unreported;
    bt_http_stream_finish(r->http, b->data, b->len);
}

/* Writes a mid-stream error event (with its id) and closes the response; no [DONE]. */
static void write_error_event(fe_req *r, int status, const char *code, const char *msg) {
    bt_buf *b = &r->fe->scratch;
    bt_buf_reset(b);
    append_id(b, r, r->nids, ":error");
    bt_buf_append_str(b, "data: ");
    fe_error_body(b, status, code, NULL, msg);
    bt_buf_append_str(b, "\n\n");
    if (bt_buf_status(b) == BT_OK) bt_http_stream_write(r->http, b->data, b->len);
    /* The response ends whole (its last chunk) and the connection stays open: its head said
     * keep-alive, so a client reuses it, and closing it now would fail that client's next request
     * (a POST, which no client retries) whenever the close beats the request. */
    bt_http_stream_end(r->http, false);
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
    usage_json(&b, r, r->prompt_tokens, r->completion_tokens);
    bt_buf_append_str(&b, "}");
    char hdr[128];
    snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\n", r->rid);
    r->http_status = bt_buf_status(&b) == BT_OK ? 200 : 500;
    if (bt_buf_status(&b) == BT_OK) bt_http_respond(r->http, 200, "application/json", hdr, b.data, b.len);
    else fe_json_error_ex(r->http, r->rid, 500, "internal_error", NULL, NULL, "cannot build the response: %s",
                          bt_status_msg(bt_buf_status(&b)));
    bt_buf_free(&b);
}

/* Ends the request with an error the client can read. */
/* Lines of one kind of request refusal or failure written per second and event loop (past them,
 * counted and said with the next one written: bt_log_limit). */
#define REFUSAL_LOG_BURST 5

/* The line of a request's failure. A prompt over the context or ids outside the vocabulary are the
 * client's 400 (the engine counted them): debug, as the frontend's own refusals of bad input are
 * (docs/security.md). The rest is the server's, at warn; but a request that ends before any token
 * reached its client ends so for a condition of the service (no worker for its model, every
 * upstream busy, the retry budget spent, an engine that fails every request) that lasts while
 * clients send requests at their own rate, so those lines are rate-limited per status, each
 * saying how many like it were not written (dynamo_frontend_requests_total counts every one). A
 * stream cut short after tokens went out keeps its own line. */
static void log_failure(const fe_req *r, bt_status code, const char *msg) {
    bt_log_level lvl = bt_status_client_input(code) ? BT_LOG_DEBUG : BT_LOG_WARN;
    if (!bt_log_enabled(lvl)) return;
    static _Thread_local bt_log_limit lim[BT_STATUS_COUNT_];
    unsigned unsaid = 0;
    if (lvl == BT_LOG_WARN && r->nids == 0 && (unsigned)code < BT_STATUS_COUNT_ &&
        !bt_log_limit_take(&lim[code], bt_now_ms(), REFUSAL_LOG_BURST, &unsaid))
        return;
    char more[96] = "";
    if (unsaid)
        snprintf(more, sizeof more, " (%u more requests ended so since the last such line, not logged)", unsaid);
    bt_log(lvl, "request %s failed after %zu tokens and %d attempts: %s (%s)%s", r->rid, r->nids, r->attempts, msg,
           bt_status_name(code), more);
}

static void fail_request(fe_req *r, bt_status code, const char *msg) {
    int status = status_for(code);
    fe_outcome out = code == BT_ERR_CANCELLED ? FE_OUT_CANCELLED : FE_OUT_ERROR;
    log_failure(r, code, msg);
    r->err_code = code_for(code);
    if (r->http && !r->headers_sent) r->http_status = (uint16_t)status;
    if (r->http) {
        if (r->headers_sent) {
            /* mid-stream: a final data event with an OpenAI error object and the end of the
             * response (the connection stays open), no [DONE].
             * An operator's kill is an answer (a resume replays it); any other error leaves the
             * stream unfinished: a resume continues it. The kill is this request's own context
             * killed: a worker's cancelled error is not one (its stream was taken over by a
             * resume through another frontend, orphan.c), and must not end the stream's record. */
            if (code == BT_ERR_CANCELLED && bt_ctx_is_killed(r->ctx)) {
                r->jtail.kind = FE_JTAIL_ERROR;
                r->jtail.status = status;
                snprintf(r->jtail.code, sizeof r->jtail.code, "%s", code_for(code));
                snprintf(r->jtail.message, sizeof r->jtail.message, "%s", msg);
            }
            write_error_event(r, status, code_for(code), msg);
        } else {
            /* the engine's refusals of the client's input name the field, as OpenAI's do */
            bool of_prompt = code == BT_ERR_CONTEXT_LENGTH || code == BT_ERR_INVALID_PROMPT;
            const char *param = of_prompt ? (r->api == BT_API_CHAT ? "messages" : "prompt")
                                : code == BT_ERR_INVALID_LOGIT_BIAS ? "logit_bias"
                                                                    : NULL;
            char field[64]; /* an engine's refusal of a field names it first (engine/params.h) */
            if ((code == BT_ERR_UNSUPPORTED_PARAM || code == BT_ERR_INVALID_PARAM) &&
                bt_gen_params_field(msg, field, sizeof field))
                param = field;
            /* a busy upstream's refusal tells the client when to come back, as the upstream told
             * its worker (bounded: a client is not sent away for longer than a minute) */
            char ra[48] = "";
            if (bt_status_upstream_busy(code)) {
                int secs = r->busy_retry_after < 1 ? 1 : r->busy_retry_after;
                if (secs > UPSTREAM_RETRY_AFTER_MAX_S) secs = UPSTREAM_RETRY_AFTER_MAX_S;
                snprintf(ra, sizeof ra, "Retry-After: %d\r\n", secs);
            }
            fe_json_error_ex(r->http, r->rid, status, code_for(code), param, ra, "%s", msg);
        }
        r->http->user = NULL;
        r->http = NULL;
    }
    req_done(r, out);
}

/* Ends a running request with an error the client can read (the frontend's shutdown bound). */
void fe_request_fail(fe_req *r, bt_status code, const char *msg) { fail_request(r, code, msg); }

void fe_request_replay_tail(fe_req *r, const fe_jtail *tail, int mark) {
    r->jtail = *tail;
    if (tail->kind == FE_JTAIL_ERROR) r->err_code = r->jtail.code;
    else r->finish = r->jtail.finish;
    if (tail->kind == FE_JTAIL_ERROR) {
        write_error_event(r, tail->status, tail->code, tail->message);
    } else {
        r->prompt_tokens = tail->prompt_tokens;
        r->completion_tokens = tail->completion_tokens;
        r->usage_unreported = tail->usage_unreported;
        bt_buf *b = &r->fe->scratch;
        bt_buf_reset(b);
        build_tail(r, b, tail->finish, mark);
        if (bt_buf_status(b) == BT_OK) bt_http_stream_finish(r->http, b->data, b->len);
        else bt_http_stream_end(r->http, true); /* out of memory: short, never malformed */
    }
    r->http->user = NULL;
    r->http = NULL;
    req_done(r, tail->kind == FE_JTAIL_ERROR ? FE_OUT_CANCELLED : FE_OUT_SUCCESS);
}

/* ---- cancellation ---- */

/* Ends a request whose context is stopped or killed and that has no attempt running: a stopped
 * one with what was generated and finish_reason "cancelled", a killed one with an error (or
 * quietly when the client is gone). */
void fe_request_end_cancelled(fe_req *r) {
    if (!r->http) {
        req_done(r, FE_OUT_CANCELLED);
        return;
    }
    if (bt_ctx_is_killed(r->ctx)) {
        fail_request(r, BT_ERR_CANCELLED, "request cancelled");
        return;
    }
    r->completion_tokens = (uint32_t)(r->nids + r->body_carried);
    r->finish = "cancelled";
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
    if (r->state == FE_REQ_DONE) return;
    if (s == BT_CTX_KILLED || !r->attempt) fe_request_end_cancelled(r);
}

/* ---- admission and output, for migrate.c ---- */

void fe_request_refuse(fe_req *r, int status, const char *code, int retry_after_s, const char *msg) {
    r->model->st.rejections[r->api]++;
    r->err_code = code;
    if (r->http) {
        r->http_status = (uint16_t)status;
        char hdr[160];
        snprintf(hdr, sizeof hdr, "X-Request-Id: %s\r\nRetry-After: %d\r\n", r->rid, retry_after_s);
        bt_buf body;
        bt_buf_init(&body, 1024);
        fe_error_body(&body, status, code, NULL, msg);
        bt_http_respond(r->http, status, "application/json", hdr, body.data, body.len);
        bt_buf_free(&body);
        r->http->user = NULL;
        r->http = NULL;
    }
    req_done(r, FE_OUT_REJECTED);
}

/* Every worker of the model is over its busy thresholds: 503 with a Retry-After. */
void fe_request_reject_busy(fe_req *r) {
    /* an overload that lasts while clients send at their own rate: rate-limited as a failure's line */
    static _Thread_local bt_log_limit lim;
    unsigned unsaid = 0;
    if (bt_log_limit_take(&lim, bt_now_ms(), REFUSAL_LOG_BURST, &unsaid)) {
        if (unsaid)
            BT_WARN("rejecting request %s: all workers are busy (%u more rejected so since the last such line, not "
                    "logged)",
                    r->rid, unsaid);
        else BT_WARN("rejecting request %s: all workers are busy", r->rid);
    }
    fe_request_refuse(r, 503, "overloaded", fe_retry_after_s(r->fe, r->model),
                      "Service temporarily unavailable: All workers are busy, please retry later");
}

/* One engine step brings the tokens of hundreds of streams in one read, and each stream's state
 * (attempt, request, its id and text buffers, SSE prefix, client connection, journal record) has
 * gone cold since the last step: taken one token at a time, each of those loads waits for memory
 * in turn. Here they are issued for a batch of frames (workers.c, BT_RPC_BATCH at a time) in
 * dependency order, each stage a pass over the batch, so that the misses of one stage overlap;
 * each stage reads only what the one before it loaded. Loads only: nothing is changed. */
void fe_attempts_prefetch(fe_attempt *const *as, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!as[i]) continue;
        const fe_req *r = as[i]->req;
        /* what a token reads of the request: its first fields, through stream_id, and the chunk
         * head kept after them (fe.h) */
        const char *p = (const char *)r,
                   *end = r->prefix == r->prefix_in ? r->prefix_in + r->prefix_len : (const char *)(&r->stream_id + 1);
        for (; p < end; p += 64) __builtin_prefetch(p);
        __builtin_prefetch(end - 1);
    }
    for (size_t i = 0; i < n; i++) {
        if (!as[i]) continue;
        const fe_req *r = as[i]->req;
        if (r->ids) __builtin_prefetch(r->ids + r->nids, 1);
        if (r->text.data) __builtin_prefetch(r->text.data + r->text.len, 1);
        if (r->prefix != r->prefix_in)
            for (size_t off = 0; off < r->prefix_len; off += 64) __builtin_prefetch(r->prefix + off);
        if (r->http) bt_http_prefetch(r->http);
        if (r->jrec) fe_jrec_prefetch(r->jrec, 0);
    }
    for (size_t i = 0; i < n; i++)
        if (as[i] && as[i]->req->jrec) fe_jrec_prefetch(as[i]->req->jrec, 1);
}

void fe_request_deliver(fe_req *r, const uint32_t *ids, size_t n, const char *text, size_t len, uint64_t now) {
    fe_stats *st = &r->model->st;
    if (n && r->max_tokens >= 0 && r->nids >= (size_t)r->max_tokens) {
        /* A worker that goes on past max_tokens (a broken or hostile engine): its tokens, and the
         * text that comes with them, are not part of the answer. Written, they would give the
         * client text past its limit in events that all repeat the last position's id (the
         * journal and a resume rely on positions growing), and a whole answer text its token ids
         * do not account for. The frame is dropped; the worker's FINISH still ends the request.
         * (A frame without ids never gets here: fe_attempt_on_tokens ignores it.) */
        if (!r->overran)
            BT_WARN("request %s: worker %" PRIx64 " sent tokens past max_tokens %" PRId64 "; dropping them", r->rid,
                    r->attempt && r->attempt->worker ? r->attempt->worker->id : 0, r->max_tokens);
        r->overran = true;
        return;
    }
    if (r->nids == 0) {
        r->t_first_us = now;
        fe_hist_observe(&st->ttft, (double)(now - r->t_start_us) / 1e6);
    } else {
        double itl = (double)(now - r->t_last_us) / 1e6 / (double)n;
        fe_hist_observe_n(&st->itl, itl, n); /* n tokens, each after itl: one bucket search */
    }
    r->t_last_us = now;
    /* the delivered ids are exactly what a continuation must carry; never more than max_tokens
     * (with no limit from the client, the worker's default bounds the attempt). A frame that
     * crosses the limit fails its attempt before it gets here (migrate.c, attempt_overran); the
     * cut stays as the bound of what is stored. */
    if (r->max_tokens >= 0 && r->nids + n > (size_t)r->max_tokens) n = (size_t)r->max_tokens - r->nids;
    /* a stream with a live record keeps its output there only: write_chunk appends it */
    bool in_rec = r->out_in_rec;
    if (!in_rec && !store_ids(r, r->nids, ids, n)) {
        fail_request(r, BT_ERR_NOMEM, "out of memory");
        return;
    }
    r->nids += n;
    st->tokens_out += n;
    if (r->stream) {
        /* the first token: the response's head and its chunk in one write (one syscall and one
         * wakeup of the client per stream less in the fan-out of the step that made the first
         * tokens of a burst: docs/benchmarks.md, burst TTFT); the head is written alone if no
         * chunk was */
        bool first = !r->headers_sent && r->http;
        if (first) stream_head(r, true);
        const char *why = write_chunk(r, ids, n, text, len);
        if (first && r->http) bt_http_stream_flush_head(r->http);
        if (why == chunk_straddles && !r->catch_up && r->attempt) {
            /* The continuation of a client ahead of the journal batched its tokens otherwise than
             * the events the client got. The event is dropped (the ids stored above are past
             * nids again), the attempt killed, and the next one only catches up: it stops at the
             * client's position (migrate.c), and the rest follows from there. A catch-up that
             * straddles too (an engine that breaks its own limit) ends the request below. */
            r->nids -= n;
            st->tokens_out -= n;
            r->catch_up = true;
            BT_INFO("request %s: stream %s: the continuation's event of tokens %zu-%zu straddles its client's "
                    "position %" PRIu64 "; catching up to it first",
                    r->rid, r->stream_id, r->nids, r->nids + n, r->skip_to);
            fe_attempt_abandon(r->attempt); /* its KILL; r->attempt is NULL after it */
            fe_migrate_dispatch(r);
            return;
        }
        if (why) {
            fail_request(r, why == chunk_too_large ? BT_ERR_TOO_LARGE : BT_ERR_INTERNAL, why);
            return;
        }
        if (in_rec && r->out_in_rec) return;
        /* the record was dropped with this event (take_output): the event joins the own copy */
        if (in_rec && !store_ids(r, r->nids - n, ids, n)) {
            fail_request(r, BT_ERR_NOMEM, "out of memory");
            return;
        }
        /* kept for continuations on engines that resume from text (docs/protocol.md §6) */
        if (!r->text_lost && bt_buf_append(&r->text, text, len) != BT_OK) {
            r->text_lost = true;
            bt_buf_free(&r->text);
        }
    } else if (bt_buf_append(&r->text, text, len) != BT_OK) {
        fail_request(r, BT_ERR_TOO_LARGE, "response too large");
    }
}

void fe_request_finish(fe_req *r, uint8_t reason, uint32_t prompt_tokens, uint32_t completion_tokens,
                       bool usage_unreported) {
    if (!r->http) {
        req_done(r, FE_OUT_CANCELLED);
        return;
    }
    r->prompt_tokens = prompt_tokens;
    r->usage_unreported = usage_unreported;
    /* usage never counts more than the answer may hold: tokens a worker sent past max_tokens were
     * dropped (fe_request_deliver). The worker counts the body's carried ids as completion
     * (docs/protocol.md §6), and max_tokens limits only the new ones. */
    if (r->max_tokens >= 0 && completion_tokens > (uint64_t)r->max_tokens + r->body_carried)
        completion_tokens = (uint32_t)((uint64_t)r->max_tokens + r->body_carried);
    r->completion_tokens = completion_tokens;
    const char *why = bt_finish_reason_name((bt_finish_reason)reason);
    r->finish = why;
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
    r->client_gone = true;
    r->t_cancel_us = bt_now_us();
    bt_ctx_kill(r->ctx); /* r is freed by the time this returns */
}

/* A resume wants the stream r still holds: r's client is taken to be gone (a connection that died
 * without a FIN or RST is noticed only by a later write). Its response is closed without [DONE],
 * and the request is killed as on a disconnect; its record is left unfinished for the resume. */
void fe_request_supersede(fe_req *r) {
    BT_INFO("request %s: stream %s resumed by another connection after %zu tokens; ending this one", r->rid,
            r->stream_id, r->nids);
    if (r->http) {
        bt_http_stream_end(r->http, true);
        r->http->user = NULL;
        r->http = NULL;
    }
    r->client_gone = true;
    r->fe->disconnected_clients++;
    r->t_cancel_us = bt_now_us();
    bt_ctx_kill(r->ctx); /* r is freed by the time this returns */
}

bool fe_request_hand_off(fe_req *r) {
    fe_journal *j = r->fe->grp->journal;
    if (!r->stream || !r->jrec || !j || !j->shared || !r->http || !r->headers_sent || r->state == FE_REQ_DONE)
        return false;
    BT_INFO("request %s: stream %s handed off after %zu tokens at the shutdown bound: its client resumes it on "
            "another frontend (Last-Event-ID)%s",
            r->rid, r->stream_id, r->nids, r->attempt ? "; its worker keeps the stream to be re-attached" : "");
    if (r->attempt) fe_attempt_release(r->attempt);
    r->err_code = "handed_off"; /* its access-log line says where it went */
    bt_http_stream_end(r->http, true); /* a clean end without [DONE]: nothing the client must repeat */
    r->http->user = NULL;
    r->http = NULL;
    r->fe->handed_off++;
    r->t_cancel_us = bt_now_us();
    bt_ctx_kill(r->ctx); /* r is freed by the time this returns; it has no attempt left to kill */
    return true;
}

void fe_caller_tag(const fe *f, const bt_http_req *http, uint8_t out[FE_CALLER_LEN]) {
    memset(out, 0, FE_CALLER_LEN);
    if (!f->o.trust_tenant_header) return;
    const char *t = http && http->tenant ? http->tenant : "";
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)t, strlen(t), md);
    memcpy(out, md, FE_CALLER_LEN);
}

/* Operator stop or kill of every running request with this id (client-chosen ids may repeat)
 * and, unless caller is NULL, this caller's tag: a caller cannot end another's request by
 * naming its id, and another's request is not even said to exist (404).
 * A stop lets the attempt finish with what it generated (finish_reason "cancelled"); a kill ends
 * the request with an error at once. Either way nothing is migrated any more. */
bool fe_request_cancel_by_id(fe *f, const char *rid, bool kill, const uint8_t *caller) {
    bool found = false;
    for (fe_req *r = LIST_FIRST(&f->reqs), *next; r; r = next) {
        next = LIST_NEXT(r, link); /* a kill frees r, and only r */
        if (strcmp(r->rid, rid) != 0 || r->state == FE_REQ_DONE) continue;
        if (caller && memcmp(caller, r->caller, FE_CALLER_LEN) != 0) continue;
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

bool fe_valid_rid(const char *s) {
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

/* A rejection: the message, the field and the OpenAI code. */
#define REJECT(prm, cd, ...)                                                                                      \
    do {                                                                                                           \
        snprintf(err, errlen, __VA_ARGS__);                                                                       \
        if (param) *param = (prm);                                                                                 \
        if (code) *code = (cd);                                                                                    \
        return false;                                                                                              \
    } while (0)

/* True if v is absent, null, false or 0: a field that asks for nothing. */
static bool asks_nothing(const json_t *v) {
    return !v || json_is_null(v) || json_is_false(v) || (json_is_integer(v) && json_integer_value(v) == 0);
}

/* Characters (code points) in a JSON string: jansson holds valid UTF-8, so every byte but a
 * continuation byte starts one. */
static size_t utf8_chars(const char *s, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

/* `metadata` as OpenAI documents it: an object of at most 16 string values, keys of at most 64
 * characters, values of at most 512. Not read by baton, but a client that sends another shape
 * would be refused by OpenAI, and should hear of it here too. */
static bool check_metadata(const json_t *md, char *err, size_t errlen, const char **code) {
    if (!md || json_is_null(md)) return true;
    if (code) *code = "invalid_type";
    if (!json_is_object(md)) {
        snprintf(err, errlen, "'metadata' must be an object of strings");
        return false;
    }
    if (code) *code = "invalid_value";
    if (json_object_size(md) > MAX_METADATA) {
        snprintf(err, errlen, "'metadata' may have at most %d pairs (got %zu)", MAX_METADATA, json_object_size(md));
        return false;
    }
    const char *key;
    size_t klen;
    json_t *v;
    json_object_keylen_foreach((json_t *)md, key, klen, v) {
        if (utf8_chars(key, klen) > MAX_METADATA_KEY) {
            snprintf(err, errlen, "'metadata' keys may be at most %d characters long (\"%.32s...\")",
                     MAX_METADATA_KEY, key);
            return false;
        }
        if (!json_is_string(v)) {
            if (code) *code = "invalid_type";
            snprintf(err, errlen, "'metadata' values must be strings (key \"%.64s\")", key);
            return false;
        }
        if (utf8_chars(json_string_value(v), json_string_length(v)) > MAX_METADATA_VALUE) {
            snprintf(err, errlen, "'metadata' values may be at most %d characters long (key \"%.64s\")",
                     MAX_METADATA_VALUE, key);
            return false;
        }
    }
    if (code) *code = NULL;
    return true;
}

/* The roles OpenAI's chat API defines. */
static bool known_role(const json_t *role) {
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool", "function"};
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (bt_jstr_is(role, roles[i])) return true;
    return false;
}

/* A logit_bias key of n bytes: a token id in decimal, as OpenAI's and vLLM's parsers take it ("0",
 * "264"; not "-1", "+1", " 1", "1.0", "0x10" or one holding U+0000), at most INT32_MAX (llama.cpp's
 * token type). */
static bool token_id_key(const char *key, size_t n) {
    if (n == 0 || n > 10) return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (key[i] < '0' || key[i] > '9') return false;
        v = v * 10 + (uint64_t)(key[i] - '0');
    }
    return v <= INT32_MAX;
}

/* The integer parameters baton reads. JSON has one number type, and OpenAI's and vLLM's parsers
 * take an integral 1.0 as 1: fe_body_integers writes such a value back as an integer, so that
 * every reader (checks, engines, the digest a resume compares) sees one form. */
static const char *const int_params[] = {"max_tokens", "max_completion_tokens", "seed",    "n",
                                         "best_of",    "logprobs",              "top_logprobs", "top_k",
                                         "priority"};

void fe_body_integers(json_t *body) {
    for (size_t i = 0; i < sizeof int_params / sizeof int_params[0]; i++) {
        json_t *v = json_object_get(body, int_params[i]);
        double d = json_real_value(v);
        /* within ±2^53 every double is exact, and far beyond any range checked below */
        if (json_is_real(v) && d == trunc(d) && fabs(d) <= 9007199254740992.0)
            json_object_set_new(body, int_params[i], json_integer((json_int_t)d));
    }
}

/* Checks the OpenAI body (see fe.h). Fields baton does not read are ignored, except those that ask
 * for a feature baton cannot give (log probabilities, several choices, tool calls, echo, suffix,
 * content parts other than text): those are refused with "unsupported_value" rather than silently
 * answered without it. Their neutral values (n 1, logprobs false or 0, tools []) pass. A chat role
 * OpenAI does not define, and a tool_choice that asks for a tool (none can be given), are
 * "invalid_value" as OpenAI's. Every fixed value is compared by length (bt_jstr_is), and a field read
 * as a C string that holds U+0000 is "invalid_value" by name: read up to the NUL it would pass as
 * another value ("user\u0000x" as "user", a stop string as its prefix). */
bool fe_check_body(json_t *body, bt_api api, char *err, size_t errlen, const char **param, const char **code) {
    /* a param that names an element (messages.[2].role) is written here; the caller reads it
     * before its thread checks another body */
    static _Thread_local char param_buf[96];
    if (param) *param = NULL;
    if (code) *code = NULL;
    if (!json_is_object(body)) REJECT(NULL, "invalid_type", "request body must be a JSON object");
    fe_body_integers(body);
    json_t *model = json_object_get(body, "model");
    if (!json_is_string(model)) REJECT("model", "invalid_type", "'model' is required and must be a string");
    if (bt_jstr_has_nul(model)) REJECT("model", "invalid_value", "'model' must not contain U+0000");
    if (api == BT_API_CHAT) {
        json_t *msgs = json_object_get(body, "messages");
        if (!json_is_array(msgs) || json_array_size(msgs) == 0)
            REJECT("messages", "invalid_value", "'messages' is required and must be a non-empty array");
        size_t i;
        json_t *m;
        json_array_foreach(msgs, i, m) {
            json_t *c = json_object_get(m, "content");
            /* as OpenAI's schema: content may be null or absent only on an assistant message that
             * carries its tool or function calls instead (a conversation's history replayed), and
             * on a function message */
            bool may_omit = (bt_jstr_is(json_object_get(m, "role"), "assistant") &&
                             (json_array_size(json_object_get(m, "tool_calls")) > 0 ||
                              json_is_object(json_object_get(m, "function_call")))) ||
                            bt_jstr_is(json_object_get(m, "role"), "function");
            if (!json_is_object(m) || !json_is_string(json_object_get(m, "role")) ||
                !(json_is_string(c) || json_is_array(c) || json_is_null(c) || (!c && may_omit)))
                REJECT("messages", "invalid_value", "messages[%zu] must have a string 'role' and a 'content'", i);
            /* a role OpenAI does not define would reach the template as an unknown speaker; the
             * engines read it as a C string, so one holding U+0000 is refused by name */
            json_t *role = json_object_get(m, "role");
            if (bt_jstr_has_nul(role)) {
                snprintf(param_buf, sizeof param_buf, "messages.[%zu].role", i);
                REJECT(param_buf, "invalid_value", "messages[%zu].role must not contain U+0000", i);
            }
            if (!known_role(role)) {
                snprintf(param_buf, sizeof param_buf, "messages.[%zu].role", i);
                REJECT(param_buf, "invalid_value",
                       "Invalid value for messages[%zu].role: supported values are 'system', 'developer', 'user', "
                       "'assistant', 'tool' and 'function'",
                       i);
            }
            if (!c || json_is_null(c)) {
                if (!may_omit) {
                    snprintf(param_buf, sizeof param_buf, "messages.[%zu].content", i);
                    REJECT(param_buf, "invalid_type",
                           "messages[%zu].content must be a string or an array of content parts (null only on an "
                           "assistant message with 'tool_calls' or 'function_call')",
                           i);
                }
                continue;
            }
            if (json_is_array(c) && json_array_size(c) == 0) { /* OpenAI's schema: at least one part */
                snprintf(param_buf, sizeof param_buf, "messages.[%zu].content", i);
                REJECT(param_buf, "invalid_value", "messages[%zu].content must not be an empty array", i);
            }
            size_t j;
            json_t *part;
            json_array_foreach(c, j, part) {
                /* the engines read the text parts only: an image, audio or file part would be
                 * dropped and the model would answer without ever seeing it */
                json_t *type = json_object_get(part, "type");
                bool typed = json_is_string(type);
                if (bt_jstr_has_nul(type)) { /* the message below would print it as its prefix ("text") */
                    snprintf(param_buf, sizeof param_buf, "messages.[%zu].content.[%zu].type", i, j);
                    REJECT(param_buf, "invalid_value", "messages[%zu].content[%zu].type must not contain U+0000", i,
                           j);
                }
                /* OpenAI's schema has a refusal part on assistant messages only (a conversation's
                 * history replayed): its text is the refusal string, which every engine renders as
                 * it would a text part's (bt_jstr_part_text) */
                bool refusal = bt_jstr_is(type, "refusal") && bt_jstr_is(role, "assistant");
                if (typed && !bt_jstr_is(type, "text") && !refusal) {
                    snprintf(param_buf, sizeof param_buf, "messages.[%zu].content.[%zu].type", i, j);
                    if (bt_jstr_is(type, "refusal"))
                        REJECT(param_buf, "invalid_value",
                               "content parts of type 'refusal' are allowed on assistant messages only "
                               "(messages[%zu].content[%zu])",
                               i, j);
                    REJECT(param_buf, "unsupported_value",
                           "content parts of type '%.64s' are not supported: the models served here take text only "
                           "(messages[%zu].content[%zu])",
                           json_string_value(type), i, j);
                }
                const char *field = refusal ? "refusal" : "text";
                if (!json_is_object(part) || !typed || !json_is_string(json_object_get(part, field))) {
                    snprintf(param_buf, sizeof param_buf, "messages.[%zu].content.[%zu]", i, j);
                    REJECT(param_buf, "invalid_type",
                           "messages[%zu].content[%zu] must be an object with 'type' \"%s\" (required) and a "
                           "string '%s'",
                           i, j, field, field);
                }
            }
        }
    } else {
        json_t *p = json_object_get(body, "prompt");
        if (!p) REJECT("prompt", "invalid_value", "'prompt' is required");
        if (json_is_array(p)) {
            if (json_array_size(p) == 0) REJECT("prompt", "invalid_value", "'prompt' must not be empty");
            size_t i;
            json_t *v;
            json_array_foreach(p, i, v) {
                if (json_is_integer(v)) {
                    if (json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX)
                        REJECT("prompt", "invalid_value", "prompt token %zu is out of range", i);
                } else if (!json_is_string(v) || json_array_size(p) != 1) {
                    REJECT("prompt", "invalid_value",
                           "'prompt' must be a string, one string in an array, or token ids");
                }
            }
        } else if (!json_is_string(p)) {
            REJECT("prompt", "invalid_type", "'prompt' must be a string or an array of token ids");
        }
    }
    const char *ints[] = {"max_tokens", "max_completion_tokens"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, ints[i]);
        if (v && !json_is_null(v) &&
            (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > MAX_TOKENS_LIMIT))
            REJECT(ints[i], "invalid_value", "'%s' must be an integer from 0 to %d", ints[i], MAX_TOKENS_LIMIT);
    }
    json_t *t = json_object_get(body, "temperature");
    if (t && !json_is_null(t) && (!json_is_number(t) || json_number_value(t) < 0 || json_number_value(t) > 2))
        REJECT("temperature", "invalid_value", "'temperature' must be a number from 0 to 2");
    /* read by the llama engine and the mocker: a wrong type or range must not pass as "no nucleus sampling" */
    json_t *tp = json_object_get(body, "top_p");
    if (tp && !json_is_null(tp) && (!json_is_number(tp) || json_number_value(tp) < 0 || json_number_value(tp) > 1))
        REJECT("top_p", "invalid_value", "'top_p' must be a number from 0 to 1");
    json_t *seed = json_object_get(body, "seed");
    if (seed && !json_is_null(seed) && !json_is_integer(seed)) REJECT("seed", "invalid_type", "'seed' must be an integer");
    /* vLLM's extension, read by the llama engine: "1" or 1.5 must not pass as "off" */
    json_t *tk = json_object_get(body, "top_k");
    if (tk && !json_is_null(tk) && !json_is_integer(tk)) REJECT("top_k", "invalid_type", "'top_k' must be an integer");
    /* -1 is vLLM's and SGLang's "off", which their clients send; 0 is off too */
    if (json_is_integer(tk) && (json_integer_value(tk) < -1 || json_integer_value(tk) > INT32_MAX))
        REJECT("top_k", "invalid_value", "'top_k' must be an integer from -1 or 0 (off) to %d", INT32_MAX);
    /* OpenAI's ranges; the llama engine applies them (docs/engines.md §3.4) */
    const char *pens[] = {"frequency_penalty", "presence_penalty"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, pens[i]);
        if (v && !json_is_null(v) && !json_is_number(v))
            REJECT(pens[i], "invalid_type", "'%s' must be a number from -2 to 2", pens[i]);
        if (json_is_number(v) && !(json_number_value(v) >= -2 && json_number_value(v) <= 2))
            REJECT(pens[i], "invalid_value", "'%s' must be a number from -2 to 2", pens[i]);
    }
    /* vLLM's generation fields (engine/params.h): their form is checked here for every engine, as
     * vLLM checks it; whether an engine can honour them is its own answer */
    const char *gp_param, *gp_code;
    if (!bt_gen_params_check(body, &gp_param, &gp_code, err, errlen)) {
        if (param) *param = gp_param;
        if (code) *code = gp_code;
        return false;
    }
    json_t *lb = json_object_get(body, "logit_bias");
    if (lb && !json_is_null(lb)) {
        if (!json_is_object(lb))
            REJECT("logit_bias", "invalid_type", "'logit_bias' must be an object of token ids to numbers");
        /* bounded: every entry is applied to the logits of every token generated */
        if (json_object_size(lb) > BT_MAX_LOGIT_BIAS)
            REJECT("logit_bias", "invalid_value", "'logit_bias' may have at most %d entries (got %zu)", BT_MAX_LOGIT_BIAS,
                   json_object_size(lb));
        const char *key;
        size_t klen;
        json_t *v;
        json_object_keylen_foreach(lb, key, klen, v) {
            if (!token_id_key(key, klen))
                REJECT("logit_bias", "invalid_value",
                       "'logit_bias' keys must be token ids (decimal integers from 0 to %u), got \"%.32s\"", INT32_MAX,
                       key);
            if (!json_is_number(v))
                REJECT("logit_bias", "invalid_type", "'logit_bias' values must be numbers from -100 to 100 (token %.32s)",
                       key);
            if (!(json_number_value(v) >= -100 && json_number_value(v) <= 100))
                REJECT("logit_bias", "invalid_value", "'logit_bias' values must be numbers from -100 to 100 (token %.32s)",
                       key);
        }
    }
    json_t *stop = json_object_get(body, "stop");
    if (stop && !json_is_null(stop)) {
        /* bounded: every stop string is matched against the text after each token */
        bool ok = json_is_string(stop) || (json_is_array(stop) && json_array_size(stop) <= BT_MAX_STOP);
        size_t i;
        json_t *v;
        if (json_is_array(stop)) json_array_foreach(stop, i, v) ok = ok && json_is_string(v) && json_string_length(v) > 0;
        if (json_is_string(stop)) ok = json_string_length(stop) > 0;
        if (!ok) REJECT("stop", "invalid_value", "'stop' must be a non-empty string or up to %d of them", BT_MAX_STOP);
        json_t *one = json_is_string(stop) ? stop : NULL;
        for (i = 0; json_is_array(stop) ? i < json_array_size(stop) : i < 1; i++) {
            v = one ? one : json_array_get(stop, i);
            if (json_string_length(v) > BT_MAX_STOP_LEN)
                REJECT("stop", "invalid_value", "a stop string may be at most %d bytes long (got %zu)", BT_MAX_STOP_LEN,
                       json_string_length(v));
            if (bt_jstr_has_nul(v)) REJECT("stop", "invalid_value", "stop strings must not contain U+0000");
        }
    }
    json_t *st = json_object_get(body, "stream");
    if (st && !json_is_null(st) && !json_is_boolean(st)) REJECT("stream", "invalid_type", "'stream' must be a boolean");
    json_t *so = json_object_get(body, "stream_options");
    if (so && !json_is_null(so) && !json_is_object(so))
        REJECT("stream_options", "invalid_type", "'stream_options' must be an object");
    json_t *iu = json_object_get(so, "include_usage");
    if (iu && !json_is_null(iu) && !json_is_boolean(iu)) /* "yes" or 1 would otherwise read as false */
        REJECT("stream_options.include_usage", "invalid_type", "'stream_options.include_usage' must be a boolean");
    /* as OpenAI and vLLM: options of a stream on a request that does not stream are a mistake the
     * client should hear of (include_usage would otherwise be dropped in silence); null is absent,
     * as for every optional field here */
    if (so && !json_is_null(so) && !json_is_true(st))
        REJECT("stream_options", "invalid_value", "'stream_options' is only allowed when 'stream' is true");
    /* features baton does not have */
    json_t *n = json_object_get(body, "n");
    if (n && !json_is_null(n) && !json_is_integer(n)) REJECT("n", "invalid_type", "'n' must be an integer");
    if (json_is_integer(n) && json_integer_value(n) < 1) REJECT("n", "invalid_value", "'n' must be at least 1");
    if (json_is_integer(n) && json_integer_value(n) != 1) REJECT("n", "unsupported_value", "only n = 1 is supported");
    json_t *lp = json_object_get(body, "logprobs");
    if (lp && !json_is_null(lp) && !json_is_boolean(lp) && !json_is_integer(lp))
        REJECT("logprobs", "invalid_type", "'logprobs' must be a boolean (chat) or an integer (completions)");
    if (json_is_integer(lp) && json_integer_value(lp) < 0)
        REJECT("logprobs", "invalid_value", "'logprobs' must not be negative");
    if (!asks_nothing(lp)) REJECT("logprobs", "unsupported_value", "log probabilities are not supported");
    /* OpenAI's range, checked before "not supported": -1 is a mistake, not a request for them */
    json_t *tlp = json_object_get(body, "top_logprobs");
    if (tlp && !json_is_null(tlp) && !json_is_integer(tlp))
        REJECT("top_logprobs", "invalid_type", "'top_logprobs' must be an integer");
    if (json_is_integer(tlp) && (json_integer_value(tlp) < 0 || json_integer_value(tlp) > 20))
        REJECT("top_logprobs", "invalid_value", "'top_logprobs' must be an integer from 0 to 20");
    if (!asks_nothing(tlp)) REJECT("top_logprobs", "unsupported_value", "log probabilities are not supported");
    const char *lists[] = {"tools", "functions"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, lists[i]);
        if (v && !json_is_null(v) && !json_is_array(v))
            REJECT(lists[i], "invalid_type", "'%s' must be an array", lists[i]);
        if (json_array_size(v) > 0) REJECT(lists[i], "unsupported_value", "tool and function calling are not supported");
    }
    /* Tools are refused above, so a choice that asks for a tool call names a tool that is not
     * there (OpenAI: only allowed when tools are specified); "none" and "auto" ask for nothing. */
    const char *choices[] = {"tool_choice", "function_call"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(body, choices[i]);
        if (bt_jstr_has_nul(v)) REJECT(choices[i], "invalid_value", "'%s' must not contain U+0000", choices[i]);
        if (v && !json_is_null(v) && !bt_jstr_is(v, "none") && !bt_jstr_is(v, "auto"))
            REJECT(choices[i], "invalid_value",
                   "'%s' is only allowed when '%s' are specified (\"none\" or \"auto\" otherwise)", choices[i],
                   i == 0 ? "tools" : "functions");
    }
    if (api == BT_API_COMPLETION) {
        json_t *sfx = json_object_get(body, "suffix");
        if (sfx && !json_is_null(sfx)) REJECT("suffix", "unsupported_value", "suffix is not currently supported");
    }
    /* a flag of another type ("true", 1) is not absent: read by json_is_true it would be false,
     * and the client would get an answer it did not ask for without a word. return_token_ids and
     * continue_final_message are vLLM's extensions, read by the frontend and the mocker. */
    const char *flags[] = {"echo", "return_token_ids", "continue_final_message"};
    for (int i = 0; i < 3; i++) {
        json_t *v = json_object_get(body, flags[i]);
        if (v && !json_is_null(v) && !json_is_boolean(v))
            REJECT(flags[i], "invalid_type", "'%s' must be a boolean", flags[i]);
    }
    if (json_is_true(json_object_get(body, "echo"))) REJECT("echo", "unsupported_value", "'echo' is not supported");
    json_t *user = json_object_get(body, "user");
    if (user && !json_is_null(user) && !json_is_string(user)) REJECT("user", "invalid_type", "'user' must be a string");
    if (!check_metadata(json_object_get(body, "metadata"), err, errlen, code)) {
        if (param) *param = "metadata";
        return false;
    }
    json_t *best = json_object_get(body, "best_of");
    if (best && !json_is_null(best) && !(json_is_integer(best) && json_integer_value(best) == 1))
        REJECT("best_of", "unsupported_value", "only best_of = 1 is supported");
    return true;
}

bool fe_validate_body(json_t *body, bt_api api, char *err, size_t errlen) {
    return fe_check_body(body, api, err, errlen, NULL, NULL);
}

/* Bytes that certainly reach the model's prompt, whatever the chat template does with them: a
 * string prompt whole; a chat's system and user message contents (text parts included), each without
 * the blanks at its ends (a template may trim them, and some drop parts of earlier assistant turns,
 * such as their reasoning). The template's own text only adds to it. */
static size_t content_bytes(const json_t *c) {
    const char *s = json_string_value(c);
    size_t n = json_string_length(c);
    if (!s) return 0;
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\t' || s[n - 1] == '\r')) n--;
    size_t i = 0;
    while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    return n - i;
}

static uint64_t prompt_text_bytes(const json_t *body, bt_api api) {
    if (api == BT_API_COMPLETION) {
        const json_t *p = json_object_get(body, "prompt");
        if (json_is_array(p) && json_array_size(p) == 1) p = json_array_get(p, 0);
        return json_is_string(p) ? json_string_length(p) : 0;
    }
    uint64_t n = 0;
    size_t i, j;
    const json_t *msg, *part;
    json_array_foreach(json_object_get(body, "messages"), i, msg) {
        /* system and user only: every template renders those; some (llama.cpp's DeepSeek-V3 and
         * EXAONE 3 ones) drop tool, developer and function messages, and parts of assistant turns */
        const char *role = json_string_value(json_object_get(msg, "role"));
        if (!role || (strcmp(role, "system") != 0 && strcmp(role, "user") != 0)) continue;
        const json_t *c = json_object_get(msg, "content");
        if (json_is_string(c)) n += content_bytes(c);
        else json_array_foreach(c, j, part) n += content_bytes(json_object_get(part, "text"));
    }
    return n;
}

/* What the frontend can check of prompt + max_tokens against the context length without a
 * tokenizer: max_tokens alone, a prompt given as token ids, and a text prompt longer than the
 * context's worth of the longest token (prompt_bytes_max), which holds more tokens than the
 * context whatever the tokenizer makes of it. Any other text prompt is counted by the engine,
 * which refuses with BT_ERR_CONTEXT_LENGTH (the same 400). The context is the largest that m's
 * workers advertise (fe_model.context_max): a request that fits it is routed only to a worker
 * whose card holds it (fe_request_context_need), and refused there when none that does is left
 * (migrate.c). False with a message. */
static bool context_fits(const fe_model *m, const json_t *body, bt_api api, char *err, size_t errlen) {
    uint64_t ctx = m->context_max;
    if (!ctx) return true;
    json_t *mt = json_object_get(body, "max_completion_tokens");
    if (!json_is_integer(mt)) mt = json_object_get(body, "max_tokens");
    /* without the client's max_tokens the engine cuts its default to what is left of the context,
     * so the least the request asks for is one completion token: a prompt that fills the context
     * is refused naming that one, as the engines do */
    uint64_t want = json_is_integer(mt) ? (uint64_t)json_integer_value(mt) : 1;
    uint64_t max_bytes = m->prompt_bytes_max;
    uint64_t text = max_bytes ? prompt_text_bytes(body, api) : 0;
    if (text > max_bytes) {
        /* in OpenAI's words (clients match them), with the least number of tokens the text can be:
         * no token covers more than the longest vocabulary entry's bytes */
        const char *what = api == BT_API_CHAT ? "messages" : "prompt";
        uint64_t tb = m->token_bytes_max, least = (text + tb - 1) / tb;
        snprintf(err, errlen,
                 "This model's maximum context length is %" PRIu64 " tokens. However, you requested %" PRIu64
                 " tokens or more (%" PRIu64 " or more in the %s, %" PRIu64 " in the completion): %" PRIu64
                 " bytes hold at least %" PRIu64 " tokens, none longer than %" PRIu64 " bytes. Please reduce the "
                 "length of the %s.",
                 ctx, least + want, least, what, want, text, least, tb, what);
        return false;
    }
    json_t *p = api == BT_API_COMPLETION ? json_object_get(body, "prompt") : NULL;
    uint64_t prompt = json_is_array(p) && json_is_integer(json_array_get(p, 0)) ? json_array_size(p) : 0;
    if (prompt + want <= ctx) return true;
    if (prompt)
        snprintf(err, errlen,
                 "This model's maximum context length is %" PRIu64 " tokens. However, you requested %" PRIu64
                 " tokens (%" PRIu64 " in the prompt, %" PRIu64 " in the completion). Please reduce the length "
                 "of the prompt or completion.",
                 ctx, prompt + want, prompt, want);
    else
        snprintf(err, errlen,
                 "This model's maximum context length is %" PRIu64 " tokens. However, you requested %" PRIu64
                 " tokens for the completion alone. Please reduce max_tokens.",
                 ctx, want);
    return false;
}

uint64_t fe_request_context_need(const fe_req *r) {
    uint64_t prompt = r->prompt_ids_len;
    if (!prompt && r->prompt_bytes && r->model->prompt_bytes_max) { /* context_fits' least tokens */
        uint64_t tb = r->model->token_bytes_max;
        prompt = (r->prompt_bytes + tb - 1) / tb;
    }
    /* with max_tokens, the carried tokens are part of it; without, the engine cuts its default to
     * what is left of the context, and the least the continuation asks for is one more token. A
     * max_tokens of 0 (or one the stream has reached) asks for none: the engines answer it with the
     * prompt's usage and no completion when the prompt fits, a prompt that fills the context too
     * (context_fits counts it the same way). */
    uint64_t done = r->body_carried + r->nids;
    uint64_t more = 1;
    if (r->max_tokens >= 0)
        more = (uint64_t)r->max_tokens > r->nids ? (uint64_t)r->max_tokens - r->nids : 0;
    uint64_t need = prompt + done + more;
    return need > r->context_floor ? need : r->context_floor;
}

/* The integer parameter (int_params) of a body jansson refused for an integer past 64 bits, or
 * NULL. jansson holds integers in 64 bits and says only "too big integer": read again with every
 * number as a double, the body shows which field held it. Only on that error, so the cost of a
 * second parse is the client's mistake's. */
static const char *too_big_field(const bt_http_req *http) {
    json_t *loose = json_loadb(http->body, http->body_len, FE_BODY_JSON_FLAGS | JSON_DECODE_INT_AS_REAL, NULL);
    const char *name = NULL;
    for (size_t i = 0; loose && !name && i < sizeof int_params / sizeof int_params[0]; i++) {
        double d = json_real_value(json_object_get(loose, int_params[i])); /* 0 when not a real */
        /* -2^63 itself fits; a double past it, or at or past 2^63, does not */
        if (d >= 9223372036854775808.0 || d < -9223372036854775808.0) name = int_params[i];
    }
    json_decref(loose);
    return name;
}

/* Counts a request refused before it was routed (a 400 or 404) in dynamo_frontend_requests_total
 * with status "error": under its model when a worker serves it, else under FE_MODEL_UNKNOWN (the
 * model name is the client's: counting it as given would let a client add series without bound). */
static void count_refused(fe *f, bt_api api, const json_t *body) {
    int streaming = json_is_true(json_object_get(body, "stream"));
    /* a name holding U+0000 is not the served one before the NUL */
    json_t *jname = json_object_get(body, "model");
    const char *name = bt_jstr_has_nul(jname) ? NULL : json_string_value(jname);
    fe_model *m = name ? fe_model_get(f, name, false) : NULL;
    if (m) m->st.requests[api][streaming][FE_OUT_ERROR]++;
    else f->refused_unknown[api][streaming]++;
}

void fe_request_start(fe *f, bt_http_req *http, bt_api api) {
    if (http->last_event_id) { /* the same request again, after a lost connection */
        fe_resume_post(f, http, api);
        return;
    }
    char err[512]; /* the context message names five numbers */
    char rid[RID_MAX + 8];
    if (http->request_id && fe_valid_rid(http->request_id)) snprintf(rid, sizeof rid, "%s", http->request_id);
    else bt_uuid4(rid);
    f->requests_seen++;

    json_error_t jerr;
    /* U+0000 inside a string is valid JSON and OpenAI accepts it; jansson keeps the length. A key
     * given twice is refused: jansson would keep the last, and a gateway in front may have read
     * the first ("model" or "max_tokens" one thing to it and another here). */
    json_t *body = json_loadb(http->body, http->body_len, FE_BODY_JSON_FLAGS, &jerr);
    if (!body) {
        count_refused(f, api, NULL);
        const char *big = json_error_code(&jerr) == json_error_numeric_overflow ? too_big_field(http) : NULL;
        if (big)
            fe_json_error_ex(http, rid, 400, "invalid_value", big, NULL,
                             "'%s' must be an integer from %" PRId64 " to %" PRId64 " (line %d, column %d)", big,
                             INT64_MIN, INT64_MAX, jerr.line, jerr.column);
        else
            fe_json_error(http, rid, 400, "invalid_json", "invalid JSON body: %s (line %d, column %d)", jerr.text,
                          jerr.line, jerr.column);
        return;
    }
    const char *param, *code;
    if (!fe_check_body(body, api, err, sizeof err, &param, &code)) {
        count_refused(f, api, body);
        fe_json_error_ex(http, rid, 400, code, param, NULL, "%s", err);
        json_decref(body);
        return;
    }
    /* what a resume's re-POST must match: the body exactly as the client sent it, taken before
     * anything is added to it (resume.c) */
    /* serialized once, in canonical form: the digest, the journal record and every attempt's
     * REQUEST use this one string (NULL when out of memory: each makes its own then) */
    size_t canon_len = 0;
    char *canon = bt_jcanon_dump(body, http->body_len, &canon_len); /* json_dumps' bytes (jcanon.h) */
    if (!canon) canon_len = 0;
    char digest[65] = "";
    if (json_is_true(json_object_get(body, "stream")) && f->grp->journal) {
        if (canon) fe_body_digest_canon(canon, canon_len, digest);
        else fe_body_digest(body, digest);
    }
    const char *model_name = json_string_value(json_object_get(body, "model"));
    fe_model *m = fe_model_get(f, model_name, false);
    if (!m) {
        count_refused(f, api, body);
        fe_json_error_ex(http, rid, 404, "model_not_found", "model", NULL, "The model '%s' does not exist",
                         model_name);
        json_decref(body);
        free(canon);
        return;
    }
    if (!context_fits(m, body, api, err, sizeof err)) {
        count_refused(f, api, body);
        fe_json_error_ex(http, rid, 400, "context_length_exceeded", api == BT_API_CHAT ? "messages" : "prompt", NULL,
                         "%s", err);
        json_decref(body);
        free(canon);
        return;
    }
    if (f->shutting_down && f->o.accept_window_ms >= 0 &&
        bt_now_ms() - f->shutdown_started_ms > (uint64_t)f->o.accept_window_ms) {
        fe_json_error(http, rid, 503, "shutting_down", "the frontend is shutting down");
        json_decref(body);
        free(canon);
        return;
    }
    bool nomem;
    fe_ticket *t = fe_admit_ticket(f, http, body, err, sizeof err, &param, &nomem);
    if (!t) {
        if (!nomem) count_refused(f, api, body);
        fe_json_error_ex(http, rid, nomem ? 500 : 400, nomem ? "out_of_memory" : "invalid_value", param, NULL, "%s",
                         err);
        json_decref(body);
        free(canon);
        return;
    }
    fe_req *r = fe_request_new(f, http, api, body, rid, m, 0);
    if (!r) {
        free(t);
        free(canon);
        return;
    }
    r->canon = canon;
    r->canon_len = canon_len;
    if (canon) { /* the tree is not read again (fe.h): freed now, while it is still in the cache */
        json_decref(r->body);
        r->body = NULL;
    }
    fe_admit_attach(r, t);
    memcpy(r->body_digest, digest, sizeof digest);
    BT_DEBUG("request %s: admitted (%s, %s, max_tokens %" PRId64 ")", r->rid, api == BT_API_CHAT ? "chat" : "completion",
             r->stream ? "streaming" : "unary", r->max_tokens);
    /* before the first attempt: its REQUEST names the stream, which lets the worker keep it for
     * another frontend if this one dies (docs/protocol.md §6, "Orphans and re-attachment") */
    if (r->stream) journal_open(r);
    fe_migrate_dispatch(r);
}

fe_req *fe_request_new(fe *f, bt_http_req *http, bt_api api, json_t *body, const char *rid, fe_model *m,
                       int64_t created) {
    if (!fe_reqs_reserve(f)) { /* the limit is the process's, over every shard */
        f->limit_rejections++;
        fe_json_error(http, rid, 503, "overloaded", "too many concurrent requests (limit %lld)",
                      (long long)f->o.max_requests);
        json_decref(body);
        return NULL;
    }
    /* zeroed, like calloc, up to the strings at its end (fe.h), which start empty */
    fe_req *r = bt_pool_get_head(&f->req_pool, offsetof(fe_req, exactness));
    if (!r) {
        fe_reqs_release(f);
        fe_json_error(http, rid, 500, "out_of_memory", "out of memory");
        json_decref(body);
        return NULL;
    }
    r->exactness[0] = '\0';
    r->fail_msg[0] = '\0';
    r->ctx = bt_ctx_new(rid, on_req_cancel, r);
    if (!r->ctx) {
        fe_reqs_release(f);
        fe_json_error(http, rid, 500, "out_of_memory", "out of memory");
        json_decref(body);
        bt_pool_put(&f->req_pool, r);
        return NULL;
    }
    r->fe = f;
    r->model = m;
    r->http = http;
    http->user = r;
    bt_copy_str(r->rid, sizeof r->rid, rid);
    fe_caller_tag(f, http, r->caller);
    r->api = api;
    r->body = body;
    r->stream = json_is_true(json_object_get(body, "stream"));
    r->include_usage = json_is_true(json_object_get(json_object_get(body, "stream_options"), "include_usage"));
    r->return_ids = json_is_true(json_object_get(body, "return_token_ids"));
    json_t *mt = json_object_get(body, "max_completion_tokens");
    if (!json_is_integer(mt)) mt = json_object_get(body, "max_tokens");
    /* No limit from the client: none is sent, and the worker applies its --default-max-tokens */
    r->max_tokens = json_is_integer(mt) ? json_integer_value(mt) : -1;
    json_t *bcar = json_object_get(body, "carried_token_ids");
    r->body_carried = json_is_array(bcar) ? (uint32_t)json_array_size(bcar) : 0;
    /* what context_fits counted of the prompt, kept for the continuations' routing (the tree may be
     * freed before them); the text only when a worker's card bounds its tokens' length */
    json_t *p = api == BT_API_COMPLETION ? json_object_get(body, "prompt") : NULL;
    if (json_is_array(p) && json_is_integer(json_array_get(p, 0))) r->prompt_ids_len = json_array_size(p);
    else if (m->prompt_bytes_max) r->prompt_bytes = prompt_text_bytes(body, api);
    /* One seed for every attempt of a request without one, so an engine that samples for real
     * continues a migrated stream exactly (docs/protocol.md, "seed"). */
    if (!json_is_integer(json_object_get(body, "seed")))
        while (!r->seed) r->seed = bt_random64() & 0x7fffffffffffffffull;
    r->attempts_left = (int)f->o.migration_limit + 1;
    r->t_start_us = bt_now_us();
    r->created = created ? created : bt_wall_s();
    bt_buf_init(&r->text, (size_t)64 << 20);
    build_prefix(r);
    LIST_INSERT_HEAD(&f->reqs, r, link);
    f->nreqs++;
    m->st.inflight++;
    return r;
}
