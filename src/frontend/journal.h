/* journal.h — the stream journal: what a resume needs, kept beyond the client's connection.
 *
 * A streamed answer is journaled from its first event: the request (its body, canonical JSON),
 * every token id and the text of every event with the event's boundaries, and how it ended. A
 * client that loses its connection resumes with the id of the last event it received (the SSE
 * `id:` line, "<stream id>:<position>"); the frontend replays the events after that position from
 * the journal and, when the answer was not finished, continues it by migration from the
 * journal's tokens (docs/fault-tolerance.md, "Resumable streams").
 *
 * The journal is an interface (fe_journal_ops) so that another store can take the place of the
 * in-process one (fe_journal_mem_new, below) without touching the request code: a store shared
 * by several frontends keeps the same records. Every call is made on a frontend loop and
 * returns without blocking; the in-process store is one per process, shared by its shards
 * (--threads) under a mutex held to create, grow, close or copy a record (an event that fits in
 * its record's room is appended without it). A store on the network would keep appends local and
 * send them in batches, and answer a claim it cannot answer at once with FE_CLAIM_LIVE-like
 * deferral: resume.c already waits and retries a claim (its pending resumes).
 *
 * Records are kept while their stream runs and for `retention_s` seconds after it ends; all of
 * them together are capped at `max_bytes` (the journal's accounting of its own allocations).
 * At the cap, ended records are evicted oldest first; a running stream whose record cannot grow
 * any more loses its record (it is no longer resumable; the stream itself goes on), and a claim of
 * it answers FE_CLAIM_DROPPED, not NOT_FOUND, while it runs and for retention_s after. */
#ifndef BATON_JOURNAL_H
#define BATON_JOURNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "engine/engine.h"
#include "events/events.h"

#define FE_STREAM_ID_LEN 32 /* 128 random bits in lower-case hex */
#define FE_KEY_MAC_LEN 32   /* HMAC-SHA256 of the caller's credential */

typedef struct fe_journal fe_journal;
typedef struct fe_jrec fe_jrec; /* one stream's record, owned by the journal */

/* How a journaled stream ended. NONE: not finished (the client left, a supersede, or an error the
 * request could not get past): a resume continues it. FINISH: the answer is complete. ERROR: it
 * was ended on purpose (operator kill) with the error event below: a resume replays it. */
typedef enum { FE_JTAIL_NONE = 0, FE_JTAIL_FINISH, FE_JTAIL_ERROR } fe_jtail_kind;

typedef struct {
    fe_jtail_kind kind;
    char finish[24]; /* FINISH: the finish_reason */
    uint32_t prompt_tokens, completion_tokens;
    bool usage_unreported; /* FINISH: the answer's usage was null (no usage from the upstream) */
    int status;        /* ERROR: the error event's HTTP status */
    char code[32];     /* ERROR: its code string (fe_error_body) */
    char message[200]; /* ERROR: its message */
} fe_jtail;

/* One SSE event with tokens: the position (tokens delivered) and text length after it. */
typedef struct {
    uint32_t end_tok;
    uint32_t end_text;
} fe_jevent;

/* What a record holds. As the argument of fe_journal_open: the request's description (body,
 * rid, model, ...; ids, text, ev and tail empty). As the result of a claim: a copy of the whole
 * record, owned by the caller and freed with fe_jsnap_free.
 *
 * FE_JSNAP_FIELDS are its members but the tail and the exactness fingerprint: the in-memory
 * journal keeps those two out of line, allocated when they are set, so that a record is served
 * from glibc's small bins (under 1,000 bytes: docs/benchmarks.md, fifth round). Of them:
 *   body         the request as its attempts send it: canonical JSON (sorted keys, compact)
 *   body_digest  SHA-256 (hex) of `body`, the client's body in canonical JSON: what a re-POST
 *                matches when it is the same bytes; one that writes its numbers otherwise (1.0 for
 *                1) is compared with `body` by value instead (resume.c)
 *   seed         the sampling seed the frontend chose (0: the body's own): a resume keeps it
 *   priority     the request's settled priority (admit.h, after the key's ceiling): a resume keeps it
 *   worker_id    the worker whose attempt streamed it last (0: none yet): a resume re-attaches
 *                there first, since the worker may keep the stream running after its frontend died
 *                (--orphan-grace)
 * and `exactness` is the fingerprint its tokens follow ("" = none; docs/engines.md §3.4): a resume
 * continues it only on a worker with the same one, as its first frontend would have. */
#define FE_JSNAP_FIELDS                   \
    char stream_id[FE_STREAM_ID_LEN + 1]; \
    char rid[80];                         \
    char model[128];                      \
    bt_api api;                           \
    char *body;                           \
    size_t body_len;                      \
    char body_digest[65];                 \
    int64_t created, max_tokens;          \
    uint64_t seed;                        \
    int32_t priority;                     \
    bool include_usage, return_ids;       \
    uint32_t *ids;                        \
    size_t nids;                          \
    char *text;                           \
    size_t text_len;                      \
    fe_jevent *ev;                        \
    size_t nev;                           \
    uint64_t worker_id;

typedef struct {
    FE_JSNAP_FIELDS
    fe_jtail tail;
    char exactness[256];
} fe_jsnap;

void fe_jsnap_free(fe_jsnap *s);

typedef enum {
    FE_CLAIM_OK,        /* *out is a copy of the record, which is now attached to the claimant */
    FE_CLAIM_NOT_FOUND, /* no such stream, expired, evicted, or another caller's */
    FE_CLAIM_LIVE,      /* a request still streams it, on shard *cur_shard */
    FE_CLAIM_NOMEM,
    FE_CLAIM_PENDING, /* the store is fetching the record from elsewhere: ask again in a few ms */
    FE_CLAIM_DROPPED, /* the caller's stream, whose record was dropped while it ran (the cap, or no
                       * memory): said while it runs and for retention_s after it ended */
    FE_CLAIM_UNAVAILABLE, /* the store could not tell: reading it from elsewhere failed (a timeout, a
                           * server down or stopped); the same claim may succeed once it answers */
} fe_claim_result;

typedef struct {
    uint64_t live, ended; /* records */
    uint64_t bytes;       /* what the records hold, by the journal's own accounting */
    uint64_t opened;      /* records created since start */
    uint64_t evicted_expired, evicted_size, dropped_live, refused_full;
    /* the JetStream store only (journal_js.c; 0 for the in-process one) */
    bool shared;                           /* connected to JetStream: streams resume on other frontends */
    uint64_t js_published, js_failed;      /* messages published, and publishes that failed */
    uint64_t js_dropped;                   /* changes never sent: the queue to the publisher was full */
    uint64_t js_purged, js_purge_failed;   /* finished streams purged by subject after their retention */
    uint64_t js_fetched, js_fetch_missing; /* resumes of other frontends' streams: read back, or not there */
    uint64_t js_fetch_gaps; /* of js_fetched: read only up to a change lost on its way to JetStream */
    uint64_t js_fetch_failed; /* fetches that got no answer (timeout, no connection): not "not found" */
    uint64_t js_cut;                       /* streams whose record on NATS stops short: a change was lost */
} fe_journal_stats;

typedef struct {
    /* A record for a new stream described by `meta` (its stream_id is chosen here and written
     * back into meta->stream_id), streamed by a request on shard `shard`, bound to `key_mac`.
     * NULL when journaling is off or the journal is full even after evicting every ended
     * record. */
    fe_jrec *(*open)(fe_journal *j, fe_jsnap *meta, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard);
    /* One event of the record's stream: n token ids and their text. False when the record was
     * dropped (the cap): the stream is no longer resumable and `rec` must not be used again
     * except in fe_jrec_take_output and close. */
    bool (*append)(fe_journal *j, fe_jrec *rec, const uint32_t *ids, size_t n, const char *text, size_t len);
    /* The stream's request ended (tail says how): the record is detached and kept for the
     * retention window. `rec` is not used afterwards. */
    void (*close)(fe_journal *j, fe_jrec *rec, const fe_jtail *tail);
    /* A resume: finds the record of stream `sid` bound to `key_mac`. On FE_CLAIM_OK fills *out
     * and attaches the record to a request on `shard` (*rec is the handle to append and close
     * with, as for open); on FE_CLAIM_LIVE reports the shard whose request streams it. */
    fe_claim_result (*claim)(fe_journal *j, const char *sid, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard,
                             fe_jsnap *out, fe_jrec **rec, int *cur_shard);
    void (*stats)(fe_journal *j, fe_journal_stats *out);
    /* The record's stream is now generated by worker `worker_id` (an attempt was sent there),
     * following the exactness fingerprint `exactness` ("" = none). A fingerprint that cannot be
     * kept (no memory) leaves the record live, its output still its owner's, and drops it at its
     * close: it is never resumed without its constraint. */
    void (*note_worker)(fe_journal *j, fe_jrec *rec, uint64_t worker_id, const char *exactness);
    void (*destroy)(fe_journal *j);
    /* Whether another frontend has taken the record's stream over (a client resumed it there:
     * journal_js.c, "Writers"), asked of the shared store in the background. False when the store
     * cannot tell (NULL here: the in-process one; or not connected), and when a question about
     * the same stream is waiting (its answer ends the stream if it was taken over): done is never
     * called, and arg stays the caller's. True: done(arg, taken) is called exactly once, on another thread; after
     * checks_stop it is called with taken false (and at once for the checks still queued). */
    bool (*check_writer)(fe_journal *j, fe_jrec *rec, void (*done)(void *arg, bool taken), void *arg);
    void (*checks_stop)(fe_journal *j);
} fe_journal_ops;

struct fe_journal {
    const fe_journal_ops *ops;
    /* Other frontends read and write it too (journal_js.c, once connected to JetStream): a stream
     * may be resumed elsewhere, and the journal may lag what a client received. */
    atomic_bool shared;
    double retention_s;
    uint64_t max_bytes;
};

/* The in-process store. retention_s 0 turns journaling off (open returns NULL). */
fe_journal *fe_journal_mem_new(double retention_s, uint64_t max_bytes);
/* Copies a whole record (s: its stream id, description, events, worker and tail) into an
 * in-process store as an ended record, bound to key_mac; false if the store holds that id
 * already, is full or out of memory. For a store that fetched the record from elsewhere. */
bool fe_journal_mem_import(fe_journal *mem, const fe_jsnap *s, const uint8_t key_mac[FE_KEY_MAC_LEN]);
/* Whether an in-process store holds an ended record of stream `sid` (whatever its credential),
 * one a claim would take at once. */
bool fe_journal_mem_holds(fe_journal *mem, const char *sid);
/* Drops the ended record of stream `sid` from an in-process store, if it holds one: its copy is
 * behind the shared one, which is imported in its place. A live record is left to its owner. */
void fe_journal_mem_forget(fe_journal *mem, const char *sid);
/* A record's stream id. */
const char *fe_jrec_stream_id(const fe_jrec *r);
/* What the record's owner has appended to a live record so far: its token ids and text, read in
 * place (valid until the owner's next append or close). A streaming request keeps no copy of its
 * own output while its record is live and reads it here (request.c). False when the record was
 * dropped (the journal ran out of room): then fe_jrec_take_output hands the ids and text it held
 * to the owner, who frees them; a dropped record closed without taking them frees them. */
bool fe_jrec_output(const fe_jrec *r, const uint32_t **ids, size_t *nids, const char **text, size_t *text_len);
void fe_jrec_take_output(fe_jrec *r, uint32_t **ids, size_t *nids, char **text, size_t *text_len);
/* A hint for the record's owner, no effect on state: stage 0 starts loading the record, stage 1
 * (once it is loaded) the ends of its arrays that the next fe_journal_append writes to. */
void fe_jrec_prefetch(const fe_jrec *r, int stage);

/* The NATS JetStream store (journal_js.c): the in-process store `mem` (taken over) for this
 * process's own streams, every change of it replicated in batches to the JetStream stream
 * BATON_JOURNAL_<c->ns>, and records of other frontends fetched from there on a resume. It
 * connects in the background to c->nats_server with the event plane's options and credentials
 * (c: the event plane's configuration, events/nats_client.h); until it has (and when the server
 * has no JetStream or refuses it) it is `mem` alone. NULL (mem not taken) with err on failure. */
fe_journal *fe_journal_js_new(fe_journal *mem, const bt_events_config *c, char *err, size_t errlen);

static inline fe_jrec *fe_journal_open(fe_journal *j, fe_jsnap *meta, const uint8_t key_mac[FE_KEY_MAC_LEN],
                                       int shard) {
    return j ? j->ops->open(j, meta, key_mac, shard) : NULL;
}
static inline bool fe_journal_append(fe_journal *j, fe_jrec *rec, const uint32_t *ids, size_t n, const char *text,
                                     size_t len) {
    return j->ops->append(j, rec, ids, n, text, len);
}
static inline void fe_journal_close(fe_journal *j, fe_jrec *rec, const fe_jtail *tail) { j->ops->close(j, rec, tail); }
static inline fe_claim_result fe_journal_claim(fe_journal *j, const char *sid, const uint8_t key_mac[FE_KEY_MAC_LEN],
                                               int shard, fe_jsnap *out, fe_jrec **rec, int *cur_shard) {
    if (!j) return FE_CLAIM_NOT_FOUND;
    return j->ops->claim(j, sid, key_mac, shard, out, rec, cur_shard);
}
static inline void fe_journal_note_worker(fe_journal *j, fe_jrec *rec, uint64_t worker_id, const char *exactness) {
    j->ops->note_worker(j, rec, worker_id, exactness);
}
static inline void fe_journal_stats_get(fe_journal *j, fe_journal_stats *out) { j->ops->stats(j, out); }
static inline bool fe_journal_check_writer(fe_journal *j, fe_jrec *rec, void (*done)(void *arg, bool taken),
                                           void *arg) {
    return j && j->ops->check_writer && j->ops->check_writer(j, rec, done, arg);
}
/* Before the loops that asked check_writer go away: no done is called with taken true after it. */
static inline void fe_journal_checks_stop(fe_journal *j) {
    if (j && j->ops->checks_stop) j->ops->checks_stop(j);
}
static inline void fe_journal_destroy(fe_journal *j) {
    if (j) j->ops->destroy(j);
}

#endif
