/* resume.c — resumable streams: a client that lost its connection gets exactly the rest.
 *
 * Every event of a streamed answer carries an SSE id "<stream id>:<position>" (request.c), the
 * stream id being 128 random bits chosen when the stream's first event is journaled (journal.h)
 * and the position the number of tokens delivered up to and including that event; the events
 * after the last token are "<stream id>:<n>:end" (finish_reason), ":usage" and ":done" ([DONE]),
 * or ":error" for an error event. A client resumes in one of two ways:
 *
 *   POST /v1/chat/completions (or /v1/completions) with the same body and `Last-Event-ID: <id>`;
 *   GET  /v1/chat/completions/{stream id}?stream=true&starting_after={position}  (the EventSource
 *        form: it reconnects by itself with Last-Event-ID, which then wins over starting_after).
 *        HEAD there is refused (405): a resume is not a read, it takes the stream over.
 *
 * Either way the frontend finds the journal record, writes the events after that id exactly as
 * they were first written (replayed from the journal, paced by the client's write backlog), and
 * then: the tail events if the answer had finished; or, if it had not, a new attempt by the
 * migration mechanism (migrate.c) carrying every journaled token, whose events follow live. The
 * answers it refuses: 404 for an id it does not hold (unknown, expired, evicted, or bound to
 * another API key: the record's credential MAC must match), never a fresh generation; 400 for a
 * malformed id, a re-POST whose body differs from the original (below), a position the stream
 * never sent. A request still streaming the record is superseded: its client is taken to be gone
 * (a connection that died silently), it is killed on its worker at once, and the resume continues
 * from the journal. When that request lives on another shard (--threads), that shard is asked
 * to end it and the resume waits for the record (a 409 only if it is still held after a second).
 *
 * A re-POST's body is the original when its canonical JSON has the SHA-256 the record holds (the
 * same bytes, whatever key order and spacing the client used), or else when the two are equal as
 * values: the numbers compared by value (jcanon.h, bt_jcanon_dump_values), so that "temperature":
 * 1 sent first and 1.0 on the resume are one request, as they are to every reader of the body.
 * The record keeps the digest of json_dumps' form, as every build has: the second comparison is
 * made from the body the record holds, only when the first fails, so a record written by any
 * build resumes under either rule.
 *
 * Cancellation keeps its guarantees: a disconnect kills the request on the engine at once
 * (request.c); nothing generates while no client is connected. */
#include <inttypes.h>
/* SHA256_Init/Update/Final are deprecated in OpenSSL 3 in favour of EVP, but EVP (and the one-shot
 * SHA256(), which OpenSSL 3 routes through EVP_Q_digest) fetches the digest and allocates a context
 * per call: about a third of the digest's instructions for a request body of a few hundred bytes.
 * The low-level functions are still there and compute the same SHA-256 with the same code. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jcanon.h"
#include "common/log.h"
#include "common/metrics.h"
#include "frontend/fe.h"

/* http.c's high-water mark: above it, on_drain follows once the backlog has fallen again */
#define REPLAY_PAUSE_BYTES (256u * 1024u)
/* replayed events are gathered into writes of about this size */
#define REPLAY_WRITE_BYTES (64u * 1024u)

static const char *const mark_names[] = {"", "end", "usage", "done", "error"};
static const char *const outcome_names[FE_RESUME_N_] = {"replayed", "continued", "superseded", "not_found",
                                                        "invalid",  "conflict",  "dropped",    "unavailable"};

/* A position as the server writes it: decimal digits, no sign, no leading zero but in "0", at
 * most UINT32_MAX; *end is where it stops. The one rule of both forms (Last-Event-ID and
 * starting_after), so that no position is read by one and refused by the other. Not strtoull,
 * which takes a sign, leading blanks and zeros. */
static bool parse_position(const char *p, const char **end, uint64_t *pos) {
    uint64_t v = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        if (digits == 10) return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (digits == 0 || v > UINT32_MAX || (digits > 1 && p[-digits] == '0')) return false;
    *end = p;
    *pos = v;
    return true;
}

bool fe_resume_parse_id(const char *s, char sid[FE_STREAM_ID_LEN + 1], uint64_t *pos, int *mark) {
    if (!s) return false;
    for (int i = 0; i < FE_STREAM_ID_LEN; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    }
    if (s[FE_STREAM_ID_LEN] != ':') return false;
    const char *p;
    uint64_t v;
    if (!parse_position(s + FE_STREAM_ID_LEN + 1, &p, &v)) return false;
    int m = FE_MARK_NONE;
    if (*p == ':') {
        for (m = FE_MARK_END; m <= FE_MARK_ERROR; m++)
            if (strcmp(p + 1, mark_names[m]) == 0) break;
        if (m > FE_MARK_ERROR) return false;
    } else if (*p != '\0') {
        return false;
    }
    memcpy(sid, s, FE_STREAM_ID_LEN);
    sid[FE_STREAM_ID_LEN] = '\0';
    *pos = v;
    *mark = m;
    return true;
}

void fe_key_mac(fe *f, const bt_http_req *http, uint8_t out[FE_KEY_MAC_LEN]) {
    memset(out, 0, FE_KEY_MAC_LEN);
    bool keyed = f->o.api_key && *f->o.api_key;
    if (!keyed && !f->o.trust_tenant_header) return;
    unsigned int len = FE_KEY_MAC_LEN;
    if (keyed) {
        /* the key, not the header's spelling: every form the API accepts for one key ("Bearer KEY",
         * "bearer  KEY", ...: fe_bearer_key) is the same credential, and resumes as it */
        size_t kl = 0;
        const char *a = http ? fe_bearer_key(http, &kl) : NULL;
        if (!a) { /* no bearer key: the header as it is (the API refused such a request with a key set) */
            a = http && http->authorization ? http->authorization : "";
            kl = strlen(a);
        }
        HMAC(EVP_sha256(), f->grp->mac_secret, (int)sizeof f->grp->mac_secret, (const unsigned char *)a, kl, out,
             &len);
    }
    if (!f->o.trust_tenant_header) return; /* the MAC of the key alone, as records of every build have it */
    /* Behind a gateway that names the caller (X-Tenant), one API key is shared by many tenants: the
     * record is bound to the tenant too, as the cancel endpoint binds a request to it
     * (fe_caller_tag; no header is the tenant ""). Over the key's MAC and the tenant's digest, both
     * of fixed length: no two (key, tenant) pairs give one input. */
    const char *t = http && http->tenant ? http->tenant : "";
    unsigned char in[FE_KEY_MAC_LEN + SHA256_DIGEST_LENGTH];
    memcpy(in, out, FE_KEY_MAC_LEN);
    SHA256_CTX ctx; /* on the stack, as fe_body_digest_canon's */
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, t, strlen(t));
    SHA256_Final(in + FE_KEY_MAC_LEN, &ctx);
    len = FE_KEY_MAC_LEN;
    HMAC(EVP_sha256(), f->grp->mac_secret, (int)sizeof f->grp->mac_secret, in, sizeof in, out, &len);
}

void fe_body_digest_canon(const char *canon, size_t len, char out[65]) {
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx; /* on the stack: no EVP fetch, no context allocated (above) */
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, canon, len);
    SHA256_Final(md, &ctx);
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof md; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
}

bool fe_body_digest(const json_t *body, char out[65]) {
    out[0] = '\0';
    size_t len;
    char *canon = bt_jcanon_dump(body, 0, &len); /* the bytes of json_dumps(body, COMPACT | SORT_KEYS) */
    if (!canon) return false;
    fe_body_digest_canon(canon, len, out);
    free(canon);
    return true;
}

/* The digest of body's value form (bt_jcanon_dump_values); false when out of memory. */
static bool body_digest_values(const json_t *body, char out[65]) {
    out[0] = '\0';
    size_t len;
    char *v = bt_jcanon_dump_values(body, 0, &len);
    if (!v) return false;
    fe_body_digest_canon(v, len, out);
    free(v);
    return true;
}

/* What a re-POST's body is compared by: the digest of its canonical JSON, and of its value form. */
typedef struct {
    char canon[65];
    char values[65];
} body_digests;

/* Whether the re-POSTed body (d) is the one the record was created with (the rule at the top). */
static bool same_body(const body_digests *d, const fe_jsnap *snap) {
    if (snap->body_digest[0] && strcmp(d->canon, snap->body_digest) == 0) return true;
    json_t *orig = snap->body ? json_loads(snap->body, JSON_ALLOW_NUL, NULL) : NULL; /* as it was accepted */
    char values[65];
    bool same = orig && body_digest_values(orig, values) && strcmp(values, d->values) == 0;
    json_decref(orig);
    return same;
}

static void refuse(fe *f, bt_http_req *http, fe_resume_outcome why, int status, const char *code, const char *msg,
                   const char *sid);

/* The shared journal could not say whether it holds the stream (NATS down, stopped, or slower than
 * the wait): 503 with Retry-After, never a 404, which a client takes as final (an SDK stops
 * retrying, an EventSource closes for good) while the same resume succeeds once NATS answers. */
static void unavailable(fe *f, bt_http_req *http, const char *why, const char *sid) {
    f->resumes[FE_RESUME_UNAVAILABLE]++;
    /* not a warning: the journal's thread has warned of the read that failed, and an outage of NATS
     * would repeat this line for every client retrying */
    BT_INFO("resume of stream %s answered 503: %s", sid, why);
    fe_json_error_ex(http, NULL, 503, "journal_unavailable", NULL, "Retry-After: 1\r\n",
                     "stream '%s' cannot be resumed right now: %s; retry", sid, why);
}

static void refuse(fe *f, bt_http_req *http, fe_resume_outcome why, int status, const char *code, const char *msg,
                   const char *sid) {
    f->resumes[why]++;
    /* a client's error (4xx), at debug as every other (docs/security.md): a client sending guessed
     * ids must not fill the log; the counter above shows them */
    BT_DEBUG("resume of stream %s refused (%d): %s", sid && *sid ? sid : "-", status, msg);
    fe_json_error(http, NULL, status, code, "%s", msg);
}

/* Writes replayed events until the replay is over or the client's backlog is full; at the end of
 * the replay, finishes the response (a finished record) or continues the answer. */
static void replay_step(fe_req *r) {
    fe_jsnap *s = r->replay;
    bt_buf *b = &r->fe->scratch;
    while (r->http && r->replay_ev < s->nev) {
        if (bt_http_backlog(r->http) > REPLAY_PAUSE_BYTES) return; /* on_drain resumes it */
        bt_buf_reset(b);
        while (r->replay_ev < s->nev && b->len < REPLAY_WRITE_BYTES) {
            size_t k = r->replay_ev++;
            uint32_t t0 = k ? s->ev[k - 1].end_tok : 0, x0 = k ? s->ev[k - 1].end_text : 0;
            fe_request_write_replayed(r, b, r->ids + t0, s->ev[k].end_tok - t0, s->text + x0, s->ev[k].end_text - x0,
                                      s->ev[k].end_tok, k == 0);
        }
        if (!bt_http_stream_write(r->http, b->data, b->len)) return; /* the client is gone: on_abort follows */
    }
    if (!r->http) return;
    r->role_sent = r->api == BT_API_CHAT && s->nev > 0;
    int mark = r->replay_tail;
    fe_jtail tail = s->tail;
    fe_jsnap_free(s);
    free(s);
    r->replay = NULL;
    if (tail.kind != FE_JTAIL_NONE) {
        fe_request_replay_tail(r, &tail, mark); /* frees r */
        return;
    }
    BT_INFO("request %s: stream %s resumed after %zu journaled tokens; continuing it", r->rid, r->stream_id, r->nids);
    fe_migrate_dispatch(r);
}

void fe_resume_on_drain(fe *f, bt_http_req *http) {
    (void)f;
    fe_req *r = http->user;
    if (r && r->replay) replay_step(r);
}

/* Ends the request on this shard that streams `sid`, if any, unless it is a resume that claimed
 * the record after claim `upto` (fe_group.claims): true if one was ended. */
static bool supersede_local(fe *f, const char *sid, uint64_t upto) {
    for (fe_req *r = LIST_FIRST(&f->reqs); r; r = LIST_NEXT(r, link))
        if (r->jrec && strcmp(r->stream_id, sid) == 0 && r->state != FE_REQ_DONE && r->claim_seq <= upto) {
            fe_request_supersede(r);
            return true;
        }
    return false;
}

/* Another shard's resume asks this shard to end the request that streams sid. */
typedef struct {
    char sid[FE_STREAM_ID_LEN + 1];
    uint64_t upto; /* the claims counted when it asked: a resume that claimed since is newer, and stays */
} supersede_ask;

static void supersede_job(fe *f, void *arg) {
    supersede_ask *a = arg;
    supersede_local(f, a->sid, a->upto);
    free(a);
}

/* A resume waiting for another shard to end the request that still streams its record (its
 * client vanished without the frontend noticing yet): retried every RETRY_MS, up to RETRY_MAX
 * times, then answered 409. Owned by its shard's list (f->pending_resumes) until its timer's
 * close callback frees it. */
#define RETRY_MS 5
#define RETRY_MAX 200
struct fe_pending_resume {
    fe *f;
    bt_http_req *http;
    bt_api api;
    char sid[FE_STREAM_ID_LEN + 1];
    uint64_t pos;
    int mark;
    bool has_digests; /* a re-POST, not the GET form */
    body_digests digests;
    int tries;
    bool superseding; /* it waits for another shard to end the request streaming the record */
    uv_timer_t timer;
    LIST_ENTRY(fe_pending_resume) link; /* fe.pending_resumes */
};

static void resume(fe *f, bt_http_req *http, bt_api api, const char *sid, uint64_t pos, int mark,
                   const body_digests *digests, int tries, bool superseding);

static void pending_closed(uv_handle_t *h) { free(h->data); }

static void pending_unlink(fe_pending_resume *p) {
    LIST_REMOVE(p, link);
    uv_timer_stop(&p->timer);
    uv_close((uv_handle_t *)&p->timer, pending_closed);
}

static void pending_tick(uv_timer_t *t) {
    fe_pending_resume *p = t->data;
    pending_unlink(p); /* freed on the next loop iteration: its fields stay valid below */
    resume(p->f, p->http, p->api, p->sid, p->pos, p->mark, p->has_digests ? &p->digests : NULL, p->tries + 1,
           p->superseding);
}

bool fe_resume_abort(fe *f, bt_http_req *http) {
    for (fe_pending_resume *p = LIST_FIRST(&f->pending_resumes); p; p = LIST_NEXT(p, link))
        if (p->http == http) {
            pending_unlink(p);
            return true;
        }
    return false;
}

/* Defers the resume; false if it cannot (out of memory, or waited long enough). */
static bool pending_add(fe *f, bt_http_req *http, bt_api api, const char *sid, uint64_t pos, int mark,
                        const body_digests *digests, int tries, bool superseding) {
    if (tries >= RETRY_MAX) return false;
    fe_pending_resume *p = calloc(1, sizeof *p);
    if (!p) return false;
    if (digests) {
        p->has_digests = true;
        p->digests = *digests;
    }
    p->f = f;
    p->http = http;
    p->api = api;
    memcpy(p->sid, sid, sizeof p->sid);
    p->pos = pos;
    p->mark = mark;
    p->tries = tries;
    p->superseding = superseding;
    uv_timer_init(f->loop, &p->timer);
    p->timer.data = p;
    LIST_INSERT_HEAD(&f->pending_resumes, p, link);
    uv_timer_start(&p->timer, pending_tick, RETRY_MS, 0);
    return true;
}

/* The resume itself, once the id is parsed: digests are those of the re-POSTed body, or NULL for
 * the GET form; tries counts the times it waited (for another shard, or for the shared journal's
 * fetch), superseding whether it waited for another shard to end a request streaming the record. */
static void resume(fe *f, bt_http_req *http, bt_api api, const char *sid, uint64_t pos, int mark,
                   const body_digests *digests, int tries, bool superseding) {
    fe_journal *j = f->grp->journal;
    if (f->shutting_down && f->o.accept_window_ms >= 0 &&
        bt_now_ms() - f->shutdown_started_ms > (uint64_t)f->o.accept_window_ms) {
        fe_json_error(http, NULL, 503, "shutting_down", "the frontend is shutting down");
        return;
    }
    uint8_t mac[FE_KEY_MAC_LEN];
    fe_key_mac(f, http, mac);
    fe_jsnap *snap = calloc(1, sizeof *snap);
    if (!snap) {
        fe_json_error(http, NULL, 500, "out_of_memory", "out of memory");
        return;
    }
    fe_jrec *rec = NULL;
    int cur_shard = -1;
    bool superseded = superseding; /* it waited for another shard to end the request (not for a fetch) */
    /* counted before the claim: a request seen streaming the record below claimed it no later */
    uint64_t seq = atomic_fetch_add(&f->grp->claims, 1) + 1;
    fe_claim_result cr = fe_journal_claim(j, sid, mac, f->shard, snap, &rec, &cur_shard);
    if (cr == FE_CLAIM_LIVE && cur_shard == f->shard && supersede_local(f, sid, UINT64_MAX)) {
        superseded = true;
        cr = fe_journal_claim(j, sid, mac, f->shard, snap, &rec, &cur_shard);
    }
    char msg[200];
    if (cr != FE_CLAIM_OK) {
        free(snap);
        if (cr == FE_CLAIM_PENDING) {
            /* a shared journal is fetching the record, or asking whether the copy here is still
             * the latest (journal_js.c): ask again shortly; a request of this shard it superseded
             * for it is still counted so */
            if (!pending_add(f, http, api, sid, pos, mark, digests, tries, superseded))
                unavailable(f, http, "the stream could not be read from the shared journal in time", sid);
        } else if (cr == FE_CLAIM_UNAVAILABLE) {
            unavailable(f, http, "the shared journal (NATS JetStream) did not answer", sid);
        } else if (cr == FE_CLAIM_LIVE) {
            /* Another shard's request streams it: that shard ends it, and this resume waits. Asked
             * at every try, not only the first: the request streaming it may be another resume
             * that claimed it meanwhile (concurrent resumes of one stream), and each is taken over
             * as on one thread, the last to claim keeping the stream. A resume that claimed after
             * this ask is newer than what this one saw, and is spared (supersede_local). */
            if (!superseding)
                BT_INFO("resume of stream %s waits for thread %d to end the request that streams it", sid,
                        cur_shard);
            supersede_ask *a = malloc(sizeof *a);
            if (a) {
                memcpy(a->sid, sid, sizeof a->sid);
                a->upto = seq;
            }
            if (a && (cur_shard < 0 || cur_shard >= f->grp->n ||
                      !fe_shard_post(f->grp->shard[cur_shard], supersede_job, a)))
                free(a);
            if (!pending_add(f, http, api, sid, pos, mark, digests, tries, true))
                refuse(f, http, FE_RESUME_CONFLICT, 409, "stream_busy",
                       "the stream is still attached to another connection, which is being closed; retry", sid);
        } else if (cr == FE_CLAIM_NOMEM) {
            fe_json_error(http, NULL, 500, "out_of_memory", "out of memory");
        } else if (cr == FE_CLAIM_DROPPED) {
            /* its client holds ids of its first events: it is told why they lead nowhere */
            snprintf(msg, sizeof msg,
                     "stream '%s' is no longer resumable: its journal record was dropped while it ran (the journal "
                     "was full at --stream-retention-bytes, or out of memory)",
                     sid);
            refuse(f, http, FE_RESUME_DROPPED, 404, "stream_not_found", msg, sid);
        } else {
            snprintf(msg, sizeof msg, "no stream with id '%s' (unknown, or expired after %gs)", sid, j ? j->retention_s : 0.0);
            refuse(f, http, FE_RESUME_NOT_FOUND, 404, "stream_not_found", msg, sid);
        }
        return;
    }
    /* From here the record is this resume's; every refusal gives it back unchanged. */
    const char *bad = NULL;
    /* the refusal names what the client sent: the GET form without the header gave starting_after */
    const char *unsent = !http->last_event_id ? "starting_after names a position this stream never sent"
                                  : "Last-Event-ID names a position this stream never sent";
    size_t start = 0;
    uint64_t skip_to = 0;
    if (snap->api != api && digests) bad = "this stream was not created on this endpoint";
    else if (snap->api != api) { /* the GET form on the other endpoint: no such stream there */
        fe_journal_close(j, rec, &snap->tail);
        fe_jsnap_free(snap);
        free(snap);
        snprintf(msg, sizeof msg, "no stream with id '%s' on this endpoint", sid);
        refuse(f, http, FE_RESUME_NOT_FOUND, 404, "stream_not_found", msg, sid);
        return;
    }
    if (!bad && digests && !same_body(digests, snap))
        bad = "the request body differs from the one the stream was created with";
    /* An error event is the stream's last only when an operator's kill ended it there (its tail).
     * Any other one stopped the stream at its position, and a resume went on from there: that id
     * names the position, whatever the stream did after it (the journal does not keep those error
     * events, which are not replayed; a resume from one gets the same as from the position). */
    if (mark == FE_MARK_ERROR && !(snap->tail.kind == FE_JTAIL_ERROR && pos == snap->nids)) mark = FE_MARK_NONE;
    /* The client may be ahead of a shared journal: its frontend died before its last events
     * reached JetStream (a batch, 20 ms). Then the record is unfinished, and the client's position
     * is at or past its end, within the stream's max_tokens. */
    bool ahead = snap->tail.kind == FE_JTAIL_NONE && j->shared && pos >= snap->nids &&
                 (snap->max_tokens < 0 || pos <= (uint64_t)snap->max_tokens);
    bool nothing_left = mark == FE_MARK_DONE || (mark == FE_MARK_ERROR && snap->tail.kind == FE_JTAIL_ERROR);
    if (!bad && ahead &&
        (mark == FE_MARK_END || mark == FE_MARK_DONE || (mark == FE_MARK_USAGE && snap->include_usage))) {
        /* ahead with one of the events after the last token: the journal lacks how the stream
         * ended. As from a token position (below), the stream continues from the journal's end (the
         * orphan, or the same tokens regenerated), nothing up to the client's position is written,
         * and of the events after the last token only those after the client's (r->replay_tail,
         * request.c); a client that had [DONE] has everything (204, below). */
        skip_to = pos;
        start = snap->nev;
    } else if (!bad && mark != FE_MARK_NONE) {
        /* after the last token: only the events that ended this stream */
        if (pos != snap->nids) bad = unsent;
        else if ((mark == FE_MARK_ERROR) == (snap->tail.kind == FE_JTAIL_FINISH))
            bad = "Last-Event-ID names an event this stream never sent";
        else if (mark == FE_MARK_USAGE && !snap->include_usage)
            bad = "Last-Event-ID names an event this stream never sent";
        start = snap->nev;
    } else if (!bad && ahead && pos > snap->nids) {
        /* The client is ahead of the journal: its frontend died before its last events reached a
         * shared journal. The continuation from the journal's tokens produces them again (or the
         * worker's orphan sends them), the same bytes: they are skipped up to the client's position. */
        skip_to = pos;
        start = snap->nev;
    } else if (!bad && pos > 0) {
        size_t k = 0;
        while (k < snap->nev && snap->ev[k].end_tok < pos) k++;
        if (k == snap->nev || snap->ev[k].end_tok != pos) bad = unsent;
        start = k + 1;
    }
    if (bad) {
        fe_journal_close(j, rec, &snap->tail);
        fe_jsnap_free(snap);
        free(snap);
        refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value", bad, sid);
        return;
    }
    if (nothing_left) { /* the client has every event: 204 also tells an EventSource to stop */
        fe_journal_close(j, rec, &snap->tail);
        fe_jsnap_free(snap);
        free(snap);
        f->resumes[FE_RESUME_REPLAYED]++;
        fe_access_answer(http, NULL, 204, NULL);
        bt_http_respond(http, 204, NULL, NULL, NULL, 0);
        return;
    }
    /* A record in the shared journal may come from another frontend (an older build during a
     * rolling upgrade): its model name is held to the rule discovery holds a worker's to, so that a
     * resume never creates a model under a reserved name (the label of refused requests) */
    char why[160];
    if (!bt_discovery_model_name_ok(snap->model, strlen(snap->model), why, sizeof why)) {
        fe_journal_close(j, rec, &snap->tail);
        fe_jsnap_free(snap);
        free(snap);
        char msg[224];
        snprintf(msg, sizeof msg, "the stream's record cannot be resumed: %s", why);
        refuse(f, http, FE_RESUME_NOT_FOUND, 404, "stream_not_found", msg, sid);
        return;
    }
    /* the body was accepted with U+0000 in its strings (request.c): read back the same way */
    json_t *body = json_loads(snap->body, JSON_ALLOW_NUL, NULL);
    fe_model *m = body ? fe_model_get(f, snap->model, true) : NULL;
    /* the id goes into a response header and the logs: a record (another frontend's, read from
     * JetStream) whose id this frontend would not have taken gets a new one */
    char rid[80];
    if (fe_valid_rid(snap->rid)) bt_copy_str(rid, sizeof rid, snap->rid);
    else bt_uuid4(rid);
    fe_req *r = m ? fe_request_new(f, http, api, body, rid, m, snap->created) : NULL;
    if (!r) { /* answered by fe_request_new, unless the body or model could not be made */
        if (!m) {
            json_decref(body);
            fe_json_error(http, NULL, 500, "out_of_memory", "out of memory");
        }
        fe_journal_close(j, rec, &snap->tail);
        fe_jsnap_free(snap);
        free(snap);
        return;
    }
    r->resumed = true;
    r->claim_seq = seq;
    r->seed = snap->seed; /* the continuation samples as the original did (an engine that samples) */
    if (!fe_admit_resume(r, snap->priority))
        BT_WARN("request %s: out of memory for its admission ticket; it continues at priority 0", r->rid);
    /* and computes as the original did, or not at all (docs/engines.md §3.4) */
    snprintf(r->exactness, sizeof r->exactness, "%s", snap->exactness);
    r->canon = snap->body; /* the body in canonical form, as every attempt of the stream sent it */
    r->canon_len = snap->body_len;
    snap->body = NULL;
    json_decref(r->body); /* not read again, with canon set (fe.h) */
    r->body = NULL;
    r->jrec = rec;
    r->jtail = snap->tail; /* until the answer changes it: a resume that dies keeps what it had */
    memcpy(r->stream_id, snap->stream_id, sizeof r->stream_id);
    r->ids = snap->ids;
    r->nids = snap->nids;
    r->ids_cap = snap->nids;
    snap->ids = NULL;
    if (snap->text_len && bt_buf_append(&r->text, snap->text, snap->text_len) != BT_OK) r->text_lost = true;
    r->t_last_us = r->t_start_us;
    r->adopt_worker = snap->tail.kind == FE_JTAIL_NONE ? snap->worker_id : 0;
    r->skip_to = skip_to;
    r->replay = snap;
    r->replay_ev = start;
    r->replay_tail = mark;
    f->resumes[snap->tail.kind != FE_JTAIL_NONE ? FE_RESUME_REPLAYED
                                                : superseded ? FE_RESUME_SUPERSEDED : FE_RESUME_CONTINUED]++;
    BT_INFO("request %s: stream %s resumed (%s) at position %" PRIu64 "%s%s of %zu journaled tokens, %s", r->rid,
            r->stream_id, digests ? "POST" : "GET", pos, mark ? ":" : "", mark_names[mark], snap->nids,
            snap->tail.kind == FE_JTAIL_NONE ? "unfinished" : "finished");
    fe_request_begin_stream(r);
    replay_step(r); /* may free r */
}

void fe_resume_post(fe *f, bt_http_req *http, bt_api api) {
    char sid[FE_STREAM_ID_LEN + 1] = "";
    uint64_t pos;
    int mark;
    if (!fe_resume_parse_id(http->last_event_id, sid, &pos, &mark)) {
        refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value",
               "Last-Event-ID is not an event id of this server (<stream id>:<position>)", NULL);
        return;
    }
    json_error_t jerr;
    json_t *body = json_loadb(http->body, http->body_len, FE_BODY_JSON_FLAGS, &jerr); /* as fe_request_start */
    body_digests d;
    if (json_is_object(body)) fe_body_integers(body); /* the form fe_check_body gave the original */
    bool ok = body && fe_body_digest(body, d.canon) && body_digest_values(body, d.values);
    json_decref(body);
    if (!body) { /* as fe_request_start answers it: a key given twice is named */
        char msg[224];
        snprintf(msg, sizeof msg, "invalid JSON body: %s (line %d, column %d)", jerr.text, jerr.line, jerr.column);
        refuse(f, http, FE_RESUME_INVALID, 400, "invalid_json", msg, sid);
        return;
    }
    if (!ok) {
        refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value", "invalid JSON body", sid);
        return;
    }
    resume(f, http, api, sid, pos, mark, &d, 0, false);
}

/* How many times query parameter `name` is in q ("a=1&b=2"), its first value into out. A caller
 * refuses a parameter given twice rather than pick one of its values. */
static int query_param(const char *q, const char *name, char *out, size_t outlen) {
    size_t n = strlen(name);
    int found = 0;
    for (const char *p = q; p && *p; p = strchr(p, '&') ? strchr(p, '&') + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == '=' && found++ == 0) {
            const char *v = p + n + 1, *e = strchr(v, '&');
            size_t l = e ? (size_t)(e - v) : strlen(v);
            if (l >= outlen) l = 0; /* too long for any valid value: read as "", which no caller accepts */
            memcpy(out, v, l);
            out[l] = '\0';
        }
    }
    return found;
}

void fe_resume_get(fe *f, bt_http_req *http, bt_api api, const char *stream_id) {
    char sid[FE_STREAM_ID_LEN + 1] = "", v[32];
    uint64_t pos = 0;
    int mark = FE_MARK_NONE;
    if (http->method == BT_HTTP_HEAD) {
        /* HEAD is safe (RFC 9110 §9.2.1) and a GET here is not: it takes the stream over,
         * superseding the request still streaming it, and continues it on a worker. A HEAD
         * would do all that for a response without a body, cutting the live client off and
         * generating for no one; it is refused instead, with the stream left untouched. */
        fe_json_error_ex(http, NULL, 405, "method_not_allowed", NULL, "Allow: GET\r\n",
                         "HEAD is not supported on %s: a GET here resumes the stream", http->path);
        return;
    }
    char probe[FE_STREAM_ID_LEN + 8];
    snprintf(probe, sizeof probe, "%.*s:0", FE_STREAM_ID_LEN + 1, stream_id);
    if (strlen(stream_id) != FE_STREAM_ID_LEN || !fe_resume_parse_id(probe, sid, &pos, &mark)) {
        refuse(f, http, FE_RESUME_NOT_FOUND, 404, "stream_not_found", "no stream with this id", NULL);
        return;
    }
    /* `stream` absent counts as true: the GET form only ever streams */
    int given = query_param(http->query, "stream", v, sizeof v);
    if (given > 1 || (given == 1 && strcmp(v, "true") != 0)) {
        refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value",
               given > 1 ? "the query parameter 'stream' is given more than once"
                         : "only stream=true is supported: a stream is retrieved as server-sent events",
               sid);
        return;
    }
    given = query_param(http->query, "starting_after", v, sizeof v);
    if (given > 0) {
        const char *end;
        if (given > 1 || !parse_position(v, &end, &pos) || *end) {
            refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value",
                   given > 1 ? "the query parameter 'starting_after' is given more than once"
                             : "starting_after must be a position (a number of tokens, in decimal digits)",
                   sid);
            return;
        }
    }
    if (http->last_event_id) { /* an EventSource reconnecting: it knows better than its URL */
        char hsid[FE_STREAM_ID_LEN + 1];
        if (!fe_resume_parse_id(http->last_event_id, hsid, &pos, &mark) || strcmp(hsid, sid) != 0) {
            refuse(f, http, FE_RESUME_INVALID, 400, "invalid_value",
                   "Last-Event-ID is not an event id of this stream", sid);
            return;
        }
    }
    resume(f, http, api, sid, pos, mark, NULL, 0, false);
}

void fe_resume_collect(fe *f, bt_metrics *r) {
    bt_metric_family *fam = bt_metrics_counter(
        r, "baton_frontend_stream_resumes_total", "Resume requests (Last-Event-ID or the GET form) by outcome");
    for (int i = 0; i < FE_RESUME_N_; i++) bt_metrics_add(fam, (double)f->resumes[i], "outcome", outcome_names[i], NULL);
    /* per shard (each hands off its own streams at the shutdown bound); the shards' counts add up */
    bt_metrics_add(bt_metrics_counter(r, "baton_frontend_streams_handed_off_total",
                                      "Streams handed off at the shutdown bound, to be resumed on another frontend"),
                   (double)f->handed_off, NULL);
    fe_journal *j = f->grp ? f->grp->journal : NULL;
    if (f->shard != 0 || !j) return; /* one journal per process: shard 0 reports it */
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    fam = bt_metrics_gauge(r, "baton_frontend_stream_journal_streams", BT_MERGE_MAX,
                           "Streams held in the stream journal, live or ended and kept for --stream-retention");
    bt_metrics_add(fam, (double)st.live, "state", "live", NULL);
    bt_metrics_add(fam, (double)st.ended, "state", "ended", NULL);
    bt_metrics_gauge_value(r, "baton_frontend_stream_journal_bytes", BT_MERGE_MAX, "Bytes the stream journal holds",
                           (double)st.bytes);
    bt_metrics_gauge_value(r, "baton_frontend_stream_journal_limit_bytes", BT_MERGE_MAX,
                           "The stream journal's size cap (--stream-retention-bytes)", (double)j->max_bytes);
    bt_metrics_counter_value(r, "baton_frontend_stream_journal_opened_total", "Streams journaled since start",
                             (double)st.opened);
    fam = bt_metrics_counter(r, "baton_frontend_stream_journal_evictions_total",
                             "Streams dropped from the stream journal, by reason");
    bt_metrics_add(fam, (double)st.evicted_expired, "reason", "expired", NULL);
    bt_metrics_add(fam, (double)st.evicted_size, "reason", "size", NULL);
    bt_metrics_add(fam, (double)st.dropped_live, "reason", "dropped_live", NULL);
    bt_metrics_add(fam, (double)st.refused_full, "reason", "refused", NULL);
    bt_metrics_add(bt_metrics_gauge(r, "baton_frontend_stream_journal_shared", BT_MERGE_MAX,
                                    "1 while the stream journal is shared through NATS JetStream"),
                   st.shared ? 1 : 0, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_stream_journal_jetstream_messages_total",
                             "Batches of journal changes published to JetStream (one message per stream), by result");
    bt_metrics_add(fam, (double)st.js_published, "result", "published", NULL);
    bt_metrics_add(fam, (double)st.js_failed, "result", "failed", NULL);
    bt_metrics_add(bt_metrics_counter(r, "baton_frontend_stream_journal_jetstream_dropped_total",
                                      "Journal changes never sent to JetStream: the publisher's queue was full"),
                   (double)st.js_dropped, NULL);
    fam = bt_metrics_counter(r, "baton_frontend_stream_journal_jetstream_purges_total",
                             "Finished streams purged from JetStream by subject after their retention, by result");
    bt_metrics_add(fam, (double)st.js_purged, "result", "purged", NULL);
    bt_metrics_add(fam, (double)st.js_purge_failed, "result", "failed", NULL);
    fam = bt_metrics_counter(r, "baton_frontend_stream_journal_jetstream_fetches_total",
                             "Streams of other frontends read back from JetStream for a resume, by result");
    bt_metrics_add(fam, (double)(st.js_fetched - st.js_fetch_gaps), "result", "found", NULL);
    bt_metrics_add(fam, (double)st.js_fetch_gaps, "result", "truncated", NULL); /* up to a lost change */
    bt_metrics_add(fam, (double)st.js_fetch_missing, "result", "not_found", NULL);
    bt_metrics_add(fam, (double)st.js_fetch_failed, "result", "unavailable", NULL); /* no answer: a 503 */
    bt_metrics_add(bt_metrics_counter(r, "baton_frontend_stream_journal_jetstream_streams_cut_total",
                                      "Streams whose record in JetStream stops short: a change was lost on its way "
                                      "(nothing more of them is published)"),
                   (double)st.js_cut, NULL);
}
