/* journal_js.c — the stream journal shared by frontends through NATS JetStream.
 *
 * A frontend whose event plane is NATS journals its streams in the JetStream stream
 * BATON_JOURNAL_<namespace> (subjects baton.journal.<namespace>.<stream id>), so that a client whose
 * frontend died can resume on any other frontend of the namespace (docs/fault-tolerance.md,
 * "Frontend failover"). The in-process store (journal.c) stays the working copy: every call on
 * the request path is answered by it at once, and each change is also queued here — a copy under
 * a mutex, nothing else on the token path. A thread of this module drains the queue whenever it
 * wakes (every BATCH_MS), folds everything queued for one stream into one message, and publishes
 * it on the stream's subject (a core NATS publish, which the JetStream stream stores; no PubAck
 * is waited for): writes are batched and off the loops. The journal on NATS
 * therefore lags the client by at most a batch; a resume from further on is still exact, because
 * the continuation regenerates the missing tokens (or the worker's orphan replays them) and the
 * frontend skips what the client has (resume.c).
 *
 * A resume of a stream the working copy does not hold is answered FE_CLAIM_PENDING while the
 * thread reads the stream's messages (direct gets by subject, stream AllowDirect) and rebuilds
 * the record; it is then imported into the working copy (fe_journal_mem_import) and the retried
 * claim proceeds as for a local record. A record not on NATS answers NOT_FOUND.
 *
 * Bounds: nats-server 2.9 has no per-message TTL, so the JetStream stream has MaxAge (the
 * retention plus MAX_STREAM_S, the longest a stream may run) and MaxBytes (the journal's byte cap),
 * discarding the oldest; a stream's messages are purged by subject once its retention after its
 * end has passed. The queue to the thread is capped at QUEUE_MAX bytes; past it, changes are
 * dropped and counted; a stream that lost a change that way, or in a failed publish, has nothing
 * more published (its record on NATS stays a prefix, which a resume elsewhere continues from).
 *
 * Writers: a stream has one writer at a time, but a frontend that was superseded (stopped, or its
 * client vanished silently, while its client resumed elsewhere) may still publish after its
 * successor: its late events and its close. So that such records never override the successor's,
 * every writer after the first has an epoch, one more than the highest its fetch read: its first
 * change is {"o":"own","e":epoch,"p":tokens,"b":text bytes} (it writes from that position of the
 * record on), and each of its operations carries "e". A reader follows the highest epoch it has
 * seen: an "own" cuts the record back to its position (what an older writer published after the
 * new one had read the record is not the new one's), and operations of a lower epoch are ignored.
 * The first writer's operations carry no "e" (epoch 0), as every older frontend's. The "own" is
 * also published alone on <subject>.own, so that a frontend can ask in one read whether a stream
 * it writes has a later writer (js_check_writer: one that was away, stopped, and migrates its
 * stream on waking learns there that it was superseded, and stops). A frontend asked to resume a
 * stream it still holds reads that subject first too (js_claim): its copy is claimed only when no
 * later writer took the stream over, and is otherwise replaced by the shared record, whose next
 * writer it becomes.
 *
 * Message: a JSON array of operations, in order: {"o":"open", the request's description},
 * {"o":"ev","p":tokens before it,"b":text bytes before it,"i":base64 of the ids (u32
 * little-endian),"t":base64 of the text},
 * {"o":"worker","id":N}, {"o":"close", the tail}, {"o":"own", ...} (above). */
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <jansson.h>
#include <nats/nats.h>
#include <uv.h>

#include "common/log.h"
#include "common/map.h"
#include "common/util.h"
#include "events/nats_client.h"
#include "frontend/journal.h"
#include "proto/request.h" /* BT_PRIORITY_LIMIT */

#define BATCH_MS 20                      /* the thread's longest sleep while changes are queued */
#define QUEUE_MAX (64u * 1024 * 1024)    /* bytes of changes waiting for the thread */
#define MAX_STREAM_S 3600                /* MaxAge beyond the retention: the longest a stream runs */
#define FETCH_WAIT_MS 700                /* per JetStream request of a fetch (claims retry for 1 s) */
#define MAX_FETCHES 256                  /* resumes of remote streams being fetched at once */
#define FETCH_FRESH_MS 1000              /* a fetch's answer older than this is read again */
#define CHECKS_MS BATCH_MS               /* the reads of check_writer questions in one pass */

typedef enum { OP_OPEN, OP_EV, OP_WORKER, OP_CLOSE, OP_OWN } op_kind;

typedef struct op {
    STAILQ_ENTRY(op) link; /* js_journal.ops, then the thread's batch */
    op_kind kind;
    uint32_t epoch; /* its writer's (above), stamped when queued */
    char sid[FE_STREAM_ID_LEN + 1];
    json_t *j; /* OPEN, WORKER, CLOSE: the operation as JSON */
    size_t bytes;
    /* EV: copied as they are on the token path; the thread turns them into JSON. at_tok, at_text:
     * the record's tokens and text bytes before them, published with them so that a reader sees a
     * change lost on the way (apply_msg) */
    size_t n, len, at_tok, at_text;
    uint32_t *ids; /* points into data */
    char *text;    /* points into data */
    uint32_t data[];
} op;
STAILQ_HEAD(op_queue, op);

/* F_NONE: JetStream answered that the stream is not there (or its record is unreadable);
 * F_FAILED: it did not answer (a timeout, no connection): the stream may well be there;
 * F_CURRENT: the record held here is the latest writer's (no later epoch in JetStream) */
typedef enum { F_WAIT, F_FOUND, F_NONE, F_FAILED, F_CURRENT } fetch_state;

typedef struct fetch {
    LIST_ENTRY(fetch) link; /* js_journal.fetches */
    char sid[FE_STREAM_ID_LEN + 1];
    fetch_state state;
    fe_jsnap snap; /* F_FOUND */
    uint8_t mac[FE_KEY_MAC_LEN];
    uint32_t epoch; /* F_FOUND: the highest writer's epoch read */
    /* The working copy held an ended record of the stream when it was asked, written by this
     * frontend as `local_epoch`: the record is read only if JetStream has a later writer */
    bool local;
    uint32_t local_epoch;
    uint64_t done_ms; /* when the thread answered */
} fetch;

/* This frontend's epoch as the writer of a stream it took over from another frontend (a record
 * it fetched and claimed). `owned`: its "own" has been queued; until then (a resume that was
 * refused, or a finished answer replayed) the other writer's record stands and nothing of this
 * one's is published. */
typedef struct {
    uint32_t epoch;
    bool owned;
    size_t at_tok, at_text; /* where it took over */
    uint64_t until_ms;      /* kept as long as the stream may run and be retained */
} owner;

typedef struct purge {
    LIST_ENTRY(purge) link; /* js_journal.purges, then the due ones */
    char sid[FE_STREAM_ID_LEN + 1];
    uint64_t due_ms;
    bool own; /* a later writer's: its <subject>.own goes too */
} purge;

/* A check_writer question, queued for the thread. */
typedef struct wcheck {
    STAILQ_ENTRY(wcheck) link; /* js_journal.checks, then the thread's list */
    char sid[FE_STREAM_ID_LEN + 1];
    uint32_t epoch; /* this frontend's as the stream's writer */
    void (*done)(void *arg, bool taken);
    void *arg;
} wcheck;
STAILQ_HEAD(wcheck_queue, wcheck);
LIST_HEAD(purge_list, purge);

/* CONNECTING: the first attempt; WAITING: the server was unreachable, retried in the background,
 * changes not kept meanwhile (below); READY: publishing; OFF: no JetStream, or refused. */
typedef enum { JS_CONNECTING, JS_WAITING, JS_READY, JS_OFF } js_state;

typedef struct {
    fe_journal pub;
    fe_journal *mem;
    char *url;
    /* The event plane's options and credentials (nats_client.h), on a connection of its own: the
     * event plane's connection is driven by shard 0's loop, so the journal's publishes, JetStream
     * requests and fetches would run their socket I/O on that loop (the journal's whole point is
     * to keep it off the loops), and its volume would fill the send buffer the load reports are
     * capped by (they are dropped past 256 KiB). Its lifetime is its own too: it flushes at exit
     * after the event plane has closed. */
    bt_nats_client *cl;
    char ns[64];
    char stream[96];
    char prefix[96];
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cv;
    /* under mu */
    struct op_queue ops;
    size_t qbytes;
    LIST_HEAD(, fetch) fetches;
    size_t nfetches;
    struct purge_list purges;
    bool stop;
    js_state state;
    uint64_t dropped, published, pub_errors, purged, purge_errors, fetched, fetch_missing, fetch_gaps, fetch_failed,
        cut_streams;
    /* Streams a change of which was lost on its way to NATS (a full queue, a failed publish): key
     * cut_key(sid), value the time (bt_now_ms) after which the entry may go. Nothing more of them
     * is published, so that their record on NATS stays a prefix of what they sent — a resume
     * handles a journal behind the client (it continues from its end) but not one with a hole. */
    bt_map cut;
    uint64_t cut_swept_ms;
    /* Streams this frontend writes as a later writer (owner, above), by cut_key(sid); owned. */
    bt_map owners;
    struct wcheck_queue checks;
    bt_map checking; /* the streams of `checks` and of the one being read, by cut_key(sid) */
    bool checks_stopped;
} js_journal;

static uint64_t cut_key(const char *sid) {
    uint64_t k = 0;
    for (int i = 0; i < 16 && sid[i]; i++) k = k * 16 + (uint64_t)(sid[i] <= '9' ? sid[i] - '0' : sid[i] - 'a' + 10);
    return k ? k : 1;
}

/* Under mu. why: what happened to the stream's change ("did not reach JetStream"). */
static void cut_add(js_journal *js, const char *sid, const char *why) {
    uint64_t key = cut_key(sid);
    if (bt_map_get(&js->cut, key)) return;
    uint64_t until = bt_now_ms() + (uint64_t)((js->pub.retention_s + MAX_STREAM_S) * 1000.0);
    if (bt_map_put(&js->cut, key, (void *)(uintptr_t)until) == 0) js->cut_streams++;
    BT_WARN("stream journal: a change of stream %s %s; nothing more of it is published (its record there stays a "
            "prefix: a resume elsewhere continues from its end)",
            sid, why);
}

/* ---- the loops' side ------------------------------------------------------------------------ */

/* An operation given as JSON (OPEN, WORKER, CLOSE, OWN; j taken over); NULL when out of memory. */
static op *json_op(op_kind kind, const char *sid, json_t *j) {
    if (!j) return NULL;
    op *o = calloc(1, sizeof *o);
    if (!o) {
        json_decref(j);
        return NULL;
    }
    char *dump = json_dumps(j, JSON_COMPACT);
    o->kind = kind;
    memcpy(o->sid, sid, sizeof o->sid);
    o->j = j;
    o->bytes = sizeof *o + (dump ? strlen(dump) : 0);
    free(dump);
    return o;
}

/* Queues o (built by the caller; NULL: out of memory, the change is lost like a full queue's). */
static void enqueue_op(js_journal *js, const char *sid, op *o) {
    size_t bytes = o ? o->bytes : 0;
    uv_mutex_lock(&js->mu);
    /* While the server is unreachable nothing is kept: a stream's changes on NATS must be whole
     * from its open on, or a frontend reading it back would rebuild a record with a hole; a stream
     * whose open was not published is simply not found elsewhere. */
    if (!o || js->state == JS_OFF || js->state == JS_WAITING || js->qbytes + bytes > QUEUE_MAX) {
        if (js->state != JS_OFF && js->state != JS_WAITING) {
            js->dropped++;
            cut_add(js, sid, "did not reach JetStream");
        }
        uv_mutex_unlock(&js->mu);
        if (o) json_decref(o->j);
        free(o);
        return;
    }
    owner *w = js->owners.len ? bt_map_get(&js->owners, cut_key(sid)) : NULL;
    if (w && !w->owned && o->kind == OP_CLOSE) {
        /* a stream taken over that this frontend never wrote to (a refused resume, a finished
         * answer replayed): the record its writer left stands as it is */
        uv_mutex_unlock(&js->mu);
        json_decref(o->j);
        free(o);
        return;
    }
    if (w && !w->owned) { /* its first change: the takeover goes ahead of it (the top of the file) */
        w->owned = true;
        op *own = json_op(OP_OWN, sid,
                          json_pack("{s:s, s:I, s:I, s:I}", "o", "own", "e", (json_int_t)w->epoch, "p",
                                    (json_int_t)w->at_tok, "b", (json_int_t)w->at_text));
        if (!own) { /* without it a reader would take this writer's changes for a hole: none go */
            js->dropped++;
            cut_add(js, sid, "(its takeover by this frontend) did not reach JetStream");
            uv_mutex_unlock(&js->mu);
            json_decref(o->j);
            free(o);
            return;
        }
        own->epoch = w->epoch;
        STAILQ_INSERT_TAIL(&js->ops, own, link);
        js->qbytes += own->bytes;
    }
    o->epoch = w ? w->epoch : 0;
    STAILQ_INSERT_TAIL(&js->ops, o, link);
    js->qbytes += bytes;
    uv_mutex_unlock(&js->mu);
    /* no signal: the thread wakes every BATCH_MS while it has work, which is what batches */
}

static void enqueue(js_journal *js, op_kind kind, const char *sid, json_t *j) {
    if (!j) return;
    enqueue_op(js, sid, json_op(kind, sid, j));
}

static void hex(const uint8_t *b, size_t n, char *out) {
    static const char h[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = h[b[i] >> 4];
        out[2 * i + 1] = h[b[i] & 15];
    }
    out[2 * n] = '\0';
}

static bool unhex(const char *s, uint8_t *b, size_t n) {
    if (!s || strlen(s) != 2 * n) return false;
    for (size_t i = 0; i < 2 * n; i++) {
        char c = s[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0) return false;
        if (i % 2 == 0) b[i / 2] = (uint8_t)(v << 4);
        else b[i / 2] |= (uint8_t)v;
    }
    return true;
}

static fe_jrec *js_open(fe_journal *j, fe_jsnap *meta, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard) {
    js_journal *js = (js_journal *)j;
    fe_jrec *r = fe_journal_open(js->mem, meta, key_mac, shard);
    if (!r) return NULL;
    char mac[2 * FE_KEY_MAC_LEN + 1], seed[24];
    hex(key_mac, FE_KEY_MAC_LEN, mac);
    snprintf(seed, sizeof seed, "%" PRIu64, meta->seed); /* a string: JSON numbers lose 64-bit precision */
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s%, s:s, s:I, s:I, s:b, s:b, s:s}", "o", "open", "rid", meta->rid,
                          "model", meta->model, "api", meta->api == BT_API_CHAT ? "chat" : "completion", "body",
                          meta->body, meta->body_len, "digest", meta->body_digest, "created", (json_int_t)meta->created,
                          "max_tokens", (json_int_t)meta->max_tokens, "usage", meta->include_usage, "ids",
                          meta->return_ids, "mac", mac);
    if (o) json_object_set_new(o, "seed", json_string(seed));
    if (o) json_object_set_new(o, "prio", json_integer(meta->priority));
    enqueue(js, OP_OPEN, meta->stream_id, o);
    return r;
}

static bool js_append(fe_journal *j, fe_jrec *rec, const uint32_t *ids, size_t n, const char *text, size_t len) {
    js_journal *js = (js_journal *)j;
    const char *sid = fe_jrec_stream_id(rec);
    char sidc[FE_STREAM_ID_LEN + 1];
    memcpy(sidc, sid, sizeof sidc); /* before the append: a dropped record loses its data */
    const uint32_t *had_ids = NULL;
    const char *had_text = NULL;
    size_t at_tok = 0, at_text = 0;
    (void)fe_jrec_output(rec, &had_ids, &at_tok, &had_text, &at_text); /* where these go in it */
    if (!fe_journal_append(js->mem, rec, ids, n, text, len)) {
        /* The working copy dropped the record (its cap). Its request goes on and closes it at its
         * end with how it ended: published, that close would make the prefix on NATS a finished
         * answer, and a resume elsewhere would end the client's answer short. Cut here, the record
         * there stays an unfinished prefix, which a resume elsewhere continues from its end. */
        uv_mutex_lock(&js->mu);
        if (js->state != JS_OFF && js->state != JS_WAITING) /* as enqueue_op: nothing is published then */
            cut_add(js, sidc, "was dropped by this frontend's journal (--stream-retention-bytes)");
        uv_mutex_unlock(&js->mu);
        return false;
    }
    /* one allocation and two copies: the token path pays nothing more */
    op *o = malloc(sizeof *o + n * sizeof *ids + len);
    if (o) {
        memset(o, 0, sizeof *o);
        o->kind = OP_EV;
        memcpy(o->sid, sidc, sizeof o->sid);
        o->n = n;
        o->len = len;
        o->at_tok = at_tok;
        o->at_text = at_text;
        o->ids = o->data;
        o->text = (char *)(o->data + n);
        if (n) memcpy(o->ids, ids, n * sizeof *ids);
        if (len) memcpy(o->text, text, len);
        o->bytes = sizeof *o + n * sizeof *ids + len;
    }
    enqueue_op(js, sidc, o);
    return true;
}

static void tail_json(json_t *o, const fe_jtail *t) {
    json_object_set_new(o, "kind", json_integer(t->kind));
    json_object_set_new(o, "finish", json_string(t->finish));
    json_object_set_new(o, "pt", json_integer(t->prompt_tokens));
    json_object_set_new(o, "ct", json_integer(t->completion_tokens));
    if (t->usage_unreported) json_object_set_new(o, "nu", json_true());
    json_object_set_new(o, "status", json_integer(t->status));
    json_object_set_new(o, "code", json_string(t->code));
    json_object_set_new(o, "msg", json_string(t->message));
}

static void js_close(fe_journal *j, fe_jrec *rec, const fe_jtail *tail) {
    js_journal *js = (js_journal *)j;
    char sid[FE_STREAM_ID_LEN + 1];
    memcpy(sid, fe_jrec_stream_id(rec), sizeof sid);
    json_t *o = json_pack("{s:s}", "o", "close");
    if (o) tail_json(o, tail);
    /* Queued before the record is released, not after: once released, a resume on another loop
     * (--threads) may claim it at once and queue its own events and close, and the subject must
     * hold them after this close. Queued the other way round, a thread descheduled between the two
     * steps could put this close (unfinished) after the resumed stream's finish, and a frontend
     * reading the stream back would continue an answer that had ended. */
    enqueue(js, OP_CLOSE, sid, o);
    fe_journal_close(js->mem, rec, tail);
}

static void js_note_worker(fe_journal *j, fe_jrec *rec, uint64_t worker_id, const char *exactness) {
    js_journal *js = (js_journal *)j;
    fe_journal_note_worker(js->mem, rec, worker_id, exactness);
    json_t *o = json_pack("{s:s, s:I}", "o", "worker", "id", (json_int_t)worker_id);
    if (o && exactness && exactness[0]) json_object_set_new(o, "x", json_string(exactness));
    enqueue(js, OP_WORKER, fe_jrec_stream_id(rec), o);
}

/* A record fetched from JetStream was claimed: this frontend becomes the stream's writer of `epoch`
 * from the claimed record's end on, announced with its first change (enqueue_op). */
static void take_over(js_journal *js, const char *sid, uint32_t epoch, const fe_jsnap *at) {
    uint64_t key = cut_key(sid);
    uv_mutex_lock(&js->mu);
    owner *w = bt_map_get(&js->owners, key);
    if (!w && (w = calloc(1, sizeof *w)) != NULL && bt_map_put(&js->owners, key, w) != 0) {
        free(w);
        w = NULL;
    }
    if (w) {
        w->epoch = epoch;
        w->owned = false;
        w->at_tok = at->nids;
        w->at_text = at->text_len;
        w->until_ms = bt_now_ms() + (uint64_t)((js->pub.retention_s + MAX_STREAM_S) * 1000.0);
    } else {
        /* its changes would carry the first writer's epoch, and a reader could take a late change
         * of that writer for one of this: nothing of this stream is published from here */
        cut_add(js, sid, "(its takeover: out of memory) is not published");
    }
    uv_mutex_unlock(&js->mu);
}

static bool js_check_writer(fe_journal *j, fe_jrec *rec, void (*done)(void *arg, bool taken), void *arg) {
    js_journal *js = (js_journal *)j;
    const char *sid = fe_jrec_stream_id(rec);
    wcheck *c = calloc(1, sizeof *c);
    if (!c) return false;
    memcpy(c->sid, sid, sizeof c->sid);
    c->done = done;
    c->arg = arg;
    uv_mutex_lock(&js->mu);
    if (js->state != JS_READY || js->checks_stopped) {
        uv_mutex_unlock(&js->mu);
        free(c);
        return false;
    }
    /* One question per stream at a time: in a worker's death every stream it ran migrates at
     * once, and one stream may migrate again before its answer comes; the answer to the question
     * asked already ends the stream (the caller finds it by its id) if it was taken over. */
    uint64_t key = cut_key(sid);
    if (bt_map_get(&js->checking, key) || bt_map_put(&js->checking, key, (void *)1) != 0) {
        uv_mutex_unlock(&js->mu);
        free(c);
        return false;
    }
    const owner *w = js->owners.len ? bt_map_get(&js->owners, key) : NULL;
    c->epoch = w ? w->epoch : 0;
    STAILQ_INSERT_TAIL(&js->checks, c, link);
    uv_cond_signal(&js->cv);
    uv_mutex_unlock(&js->mu);
    return true;
}

static void js_checks_stop(fe_journal *j) {
    js_journal *js = (js_journal *)j;
    uv_mutex_lock(&js->mu);
    js->checks_stopped = true;
    struct wcheck_queue left = STAILQ_HEAD_INITIALIZER(left);
    STAILQ_CONCAT(&left, &js->checks);
    uv_mutex_unlock(&js->mu);
    wcheck *c;
    while ((c = STAILQ_FIRST(&left)) != NULL) {
        STAILQ_REMOVE_HEAD(&left, link);
        c->done(c->arg, false);
        free(c);
    }
}

/* A claim when JetStream is connected. Another frontend may have taken over a stream whose record
 * is held here too (its client resumed there, then came back): the copy here is then behind, and
 * writing on from it under this frontend's epoch, which readers no longer follow, would leave the
 * shared record behind the live stream, and this frontend's next check_writer would end its own
 * stream as taken over. So a record held here is claimed only once the thread has read the
 * stream's <subject>.own (one direct get) and found no writer later than this frontend; otherwise
 * the shared record is read and replaces it, and this frontend becomes its next writer, as for a
 * record it did not hold. A record not held here is fetched whole. */
static fe_claim_result js_claim(fe_journal *j, const char *sid, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard,
                                fe_jsnap *out, fe_jrec **rec, int *cur_shard) {
    js_journal *js = (js_journal *)j;
    if (strlen(sid) != FE_STREAM_ID_LEN) return fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
    uv_mutex_lock(&js->mu);
    js_state state = js->state;
    uv_mutex_unlock(&js->mu);
    fe_claim_result res;
    if (state != JS_READY) {
        res = fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
        /* not connected yet (the server unreachable since start): the stream may be there, and a
         * 404 would end a client that can resume once the journal connects */
        if (res == FE_CLAIM_NOT_FOUND && state != JS_OFF) res = FE_CLAIM_UNAVAILABLE;
        return res;
    }
    bool held = fe_journal_mem_holds(js->mem, sid);
    if (!held) { /* live here (another shard's request streams it), dropped, or not here */
        res = fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
        if (res != FE_CLAIM_NOT_FOUND) return res;
    }
    uv_mutex_lock(&js->mu);
    fetch *f = LIST_FIRST(&js->fetches);
    while (f && strcmp(f->sid, sid) != 0) f = LIST_NEXT(f, link);
    if (f && f->state != F_WAIT && (bt_now_ms() - f->done_ms > FETCH_FRESH_MS || f->local != held)) {
        /* an answer nobody took in time, or to another question: the record may have moved on */
        LIST_REMOVE(f, link);
        js->nfetches--;
        fe_jsnap_free(&f->snap);
        free(f);
        f = NULL;
    }
    if (!f) { /* the first ask: the thread reads it */
        res = FE_CLAIM_NOT_FOUND;
        if (js->nfetches < MAX_FETCHES && (f = calloc(1, sizeof *f))) {
            memcpy(f->sid, sid, sizeof f->sid);
            f->local = held;
            const owner *w = held && js->owners.len ? bt_map_get(&js->owners, cut_key(sid)) : NULL;
            f->local_epoch = w ? w->epoch : 0;
            LIST_INSERT_HEAD(&js->fetches, f, link);
            js->nfetches++;
            uv_cond_signal(&js->cv);
            res = FE_CLAIM_PENDING;
        }
        uv_mutex_unlock(&js->mu);
        /* too many reads under way: a record held here is claimed as it is */
        if (res == FE_CLAIM_NOT_FOUND && held)
            res = fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
        return res;
    }
    if (f->state == F_WAIT) {
        uv_mutex_unlock(&js->mu);
        return FE_CLAIM_PENDING;
    }
    LIST_REMOVE(f, link);
    js->nfetches--;
    uv_mutex_unlock(&js->mu);
    if (f->state == F_FOUND) {
        if (f->local) {
            BT_INFO("stream journal: stream %s was written by another frontend after this one (epoch %" PRIu32
                    "): its record here is replaced by the shared one",
                    sid, f->epoch);
            fe_journal_mem_forget(js->mem, sid);
        }
        if (!fe_journal_mem_import(js->mem, &f->snap, f->mac))
            BT_WARN("stream journal: stream %s fetched from JetStream but not kept (journal full?)", sid);
        else BT_INFO("stream journal: stream %s fetched from JetStream (%zu tokens, %s)", sid, f->snap.nids,
                     f->snap.tail.kind == FE_JTAIL_NONE ? "unfinished" : "finished");
        res = fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
        if (res == FE_CLAIM_OK) take_over(js, sid, f->epoch + 1, out);
    } else if (f->state == F_FAILED && !f->local) {
        res = FE_CLAIM_UNAVAILABLE;
    } else {
        /* F_CURRENT; F_NONE (not in JetStream: the copy here is all there is); F_FAILED with a
         * record held here: JetStream did not answer, and the resume goes on from this copy as
         * without a shared journal rather than wait for it */
        if (f->state == F_FAILED)
            BT_WARN("stream journal: stream %s is resumed from this frontend's record without knowing whether "
                    "another frontend wrote it since (JetStream did not answer)",
                    sid);
        res = fe_journal_claim(js->mem, sid, key_mac, shard, out, rec, cur_shard);
    }
    fe_jsnap_free(&f->snap);
    free(f);
    return res;
}

static void js_stats(fe_journal *j, fe_journal_stats *out) {
    js_journal *js = (js_journal *)j;
    fe_journal_stats_get(js->mem, out);
    out->shared = atomic_load(&js->pub.shared);
    uv_mutex_lock(&js->mu);
    out->js_published = js->published;
    out->js_failed = js->pub_errors;
    out->js_dropped = js->dropped;
    out->js_purged = js->purged;
    out->js_purge_failed = js->purge_errors;
    out->js_fetched = js->fetched;
    out->js_fetch_missing = js->fetch_missing;
    out->js_fetch_gaps = js->fetch_gaps;
    out->js_fetch_failed = js->fetch_failed;
    out->js_cut = js->cut_streams;
    uv_mutex_unlock(&js->mu);
}

/* ---- the thread ----------------------------------------------------------------------------- */

static void subject(const js_journal *js, const char *sid, char *out, size_t n) {
    snprintf(out, n, "%s.%s", js->prefix, sid);
}

/* Appends s[0..n) in base64 to b. */
static void put_b64(bt_buf *b, const void *s, size_t n) {
    size_t need = 4 * ((n + 2) / 3) + 1;
    if (bt_buf_reserve(b, need) != BT_OK) return;
    int w = EVP_EncodeBlock((unsigned char *)b->data + b->len, (const unsigned char *)s, (int)n);
    b->len += (size_t)w;
}

/* Publishes every queued change: one message per stream. Called with mu not held. An event is
 * written by hand ({"o":"ev","i":base64 of its ids as u32 little-endian,"t":base64 of its text}):
 * building it through jansson cost more than everything else the journal does per token. */
static void publish_batch(js_journal *js, natsConnection *nc, struct op_queue *list) {
    bt_buf b;
    bt_buf_init(&b, 64u * 1024 * 1024);
    while (!STAILQ_EMPTY(list)) {
        char sid[FE_STREAM_ID_LEN + 1];
        memcpy(sid, STAILQ_FIRST(list)->sid, sizeof sid);
        struct op_queue rest = STAILQ_HEAD_INITIALIZER(rest); /* other streams' changes, in order */
        uint64_t now = bt_now_ms();
        uv_mutex_lock(&js->mu);
        bool skip = bt_map_get(&js->cut, cut_key(sid)) != NULL; /* a change of it was lost: nothing more */
        uv_mutex_unlock(&js->mu);
        bt_buf_reset(&b);
        bt_buf_append(&b, "[", 1);
        bool first = true;
        uint32_t own = 0; /* the epoch of an "own" in this message (0: none) */
        op *o;
        while ((o = STAILQ_FIRST(list)) != NULL) {
            STAILQ_REMOVE_HEAD(list, link);
            if (strcmp(o->sid, sid) != 0) {
                STAILQ_INSERT_TAIL(&rest, o, link);
                continue;
            }
            if (skip) {
                json_decref(o->j);
                free(o);
                continue;
            }
            if (o->kind == OP_CLOSE && json_integer_value(json_object_get(o->j, "kind")) != FE_JTAIL_NONE) {
                purge *p = calloc(1, sizeof *p); /* the stream's messages go once its retention has passed */
                if (p) {
                    memcpy(p->sid, sid, sizeof p->sid);
                    p->own = o->epoch > 0;
                    p->due_ms = now + (uint64_t)(js->pub.retention_s * 1000.0) + 1000;
                    uv_mutex_lock(&js->mu);
                    LIST_INSERT_HEAD(&js->purges, p, link);
                    uv_mutex_unlock(&js->mu);
                }
            }
            if (!first) bt_buf_append(&b, ",", 1);
            first = false;
            if (o->kind == OP_OWN) own = o->epoch;
            if (o->kind == OP_EV) {
                char at[96];
                if (o->epoch)
                    snprintf(at, sizeof at, "{\"o\":\"ev\",\"e\":%" PRIu32 ",\"p\":%zu,\"b\":%zu,\"i\":\"", o->epoch,
                             o->at_tok, o->at_text);
                else snprintf(at, sizeof at, "{\"o\":\"ev\",\"p\":%zu,\"b\":%zu,\"i\":\"", o->at_tok, o->at_text);
                bt_buf_append_str(&b, at);
                put_b64(&b, o->ids, o->n * sizeof *o->ids); /* the host is little-endian (x86-64, arm64) */
                bt_buf_append_str(&b, "\",\"t\":\"");
                put_b64(&b, o->text, o->len);
                bt_buf_append_str(&b, "\"}");
            } else {
                if (o->epoch) json_object_set_new(o->j, "e", json_integer(o->epoch));
                char *d = json_dumps(o->j, JSON_COMPACT);
                if (d) bt_buf_append_str(&b, d);
                free(d);
                json_decref(o->j);
            }
            free(o);
        }
        STAILQ_CONCAT(list, &rest);
        if (skip) continue;
        bt_buf_append(&b, "]", 1);
        char subj[160];
        subject(js, sid, subj, sizeof subj);
        /* a plain publish: the stream stores it all the same, and no PubAck comes back to parse (the
         * journal does nothing with one: what a dead frontend did not get stored at the end is
         * regenerated). A change lost in the middle (a connection that went stale with bytes in
         * flight, then reconnected) shows to the reader by the positions each "ev" carries, and
         * the record is read up to it (apply_msg) */
        natsStatus st =
            bt_buf_status(&b) == BT_OK ? natsConnection_Publish(nc, subj, b.data, (int)b.len) : NATS_NO_MEMORY;
        uv_mutex_lock(&js->mu);
        if (st == NATS_OK) js->published++;
        else {
            js->pub_errors++;
            cut_add(js, sid, "did not reach JetStream");
        }
        uv_mutex_unlock(&js->mu);
        if (st != NATS_OK) BT_WARN("stream journal: cannot publish to %s: %s", subj, natsStatus_GetText(st));
        if (st == NATS_OK && own) { /* after the record's own: js_check_writer reads it alone */
            char osubj[168], e[32];
            snprintf(osubj, sizeof osubj, "%s.own", subj);
            int n = snprintf(e, sizeof e, "{\"e\":%" PRIu32 "}", own);
            st = natsConnection_Publish(nc, osubj, e, n);
            if (st != NATS_OK) BT_WARN("stream journal: cannot publish to %s: %s", osubj, natsStatus_GetText(st));
        }
    }
    bt_buf_free(&b);
}

/* Decodes base64 s into out (room for 3/4 of strlen(s)); the decoded length, or -1. */
static int from_b64(const char *s, size_t sl, unsigned char *out) {
    if (sl == 0) return 0;
    int n = EVP_DecodeBlock(out, (const unsigned char *)s, (int)sl);
    if (n < 0) return -1;
    if (s[sl - 1] == '=') n--; /* EVP_DecodeBlock counts the padding as bytes */
    if (sl >= 2 && s[sl - 2] == '=') n--;
    return n;
}

static const char *sv(json_t *o, const char *k) {
    const char *v = json_string_value(json_object_get(o, k));
    return v ? v : "";
}

static void apply_tail(fe_jtail *t, json_t *o) {
    memset(t, 0, sizeof *t);
    t->kind = (fe_jtail_kind)json_integer_value(json_object_get(o, "kind"));
    snprintf(t->finish, sizeof t->finish, "%s", sv(o, "finish"));
    t->prompt_tokens = (uint32_t)json_integer_value(json_object_get(o, "pt"));
    t->completion_tokens = (uint32_t)json_integer_value(json_object_get(o, "ct"));
    t->usage_unreported = json_is_true(json_object_get(o, "nu"));
    t->status = (int)json_integer_value(json_object_get(o, "status"));
    snprintf(t->code, sizeof t->code, "%s", sv(o, "code"));
    snprintf(t->message, sizeof t->message, "%s", sv(o, "msg"));
}

static bool grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap * 2 : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

/* Applies one message's operations to the record being rebuilt; false if it is malformed. An "ev"
 * that does not start where the record has got to (its "p" and "b", absent in records of older
 * frontends) follows a change that was lost on its way: *gap is then set, and nothing from there
 * on is applied, so that the record stays a prefix of what was streamed, unfinished (a resume
 * continues it from its end, regenerating the rest). *epoch is the writer followed (the top of the
 * file): operations of an earlier one are ignored, and an "own" of a later one cuts the record
 * back to where that writer took it over. */
static bool apply_msg(fe_jsnap *s, uint8_t mac[FE_KEY_MAC_LEN], bool *opened, bool *gap, uint32_t *epoch,
                      size_t caps[3], const char *data, int len) {
    json_t *arr = json_loadb(data, (size_t)len, 0, NULL);
    bool ok = json_is_array(arr);
    size_t i;
    json_t *o;
    json_array_foreach(arr, i, o) {
        if (!ok) break;
        const char *k = json_string_value(json_object_get(o, "o"));
        json_int_t e = json_integer_value(json_object_get(o, "e")); /* 0 when absent: the first writer */
        if (!k || e < 0 || e > UINT32_MAX) {
            ok = false;
            break;
        }
        if ((uint32_t)e < *epoch) continue; /* a superseded writer's late change */
        if ((uint32_t)e > *epoch) *epoch = (uint32_t)e;
        if (strcmp(k, "own") == 0) {
            /* a new writer took the stream over at this position: what was published after it read
             * the record is not part of its stream. The position must be an event boundary of what
             * was read, or the record is read up to here (as after a lost change) */
            json_int_t p = json_integer_value(json_object_get(o, "p")), b = json_integer_value(json_object_get(o, "b"));
            size_t k2 = 0;
            while (k2 < s->nev && s->ev[k2].end_tok < (uint64_t)p) k2++;
            bool at_event =
                p == 0 ? b == 0 : k2 < s->nev && s->ev[k2].end_tok == (uint64_t)p && s->ev[k2].end_text == (uint64_t)b;
            if (p < 0 || b < 0 || (uint64_t)p > s->nids || !at_event) {
                *gap = true;
                s->tail.kind = FE_JTAIL_NONE;
                break;
            }
            s->nev = p == 0 ? 0 : k2 + 1;
            s->nids = (size_t)p;
            s->text_len = (size_t)b;
            s->tail.kind = FE_JTAIL_NONE; /* whatever the earlier writer said of its end */
        } else if (strcmp(k, "open") == 0) {
            const char *body = json_string_value(json_object_get(o, "body"));
            ok = body && unhex(json_string_value(json_object_get(o, "mac")), mac, FE_KEY_MAC_LEN);
            if (!ok) break;
            free(s->body);
            s->body_len = json_string_length(json_object_get(o, "body"));
            s->body = malloc(s->body_len + 1);
            if (!(ok = s->body != NULL)) break;
            memcpy(s->body, body, s->body_len + 1);
            snprintf(s->rid, sizeof s->rid, "%s", sv(o, "rid"));
            snprintf(s->model, sizeof s->model, "%s", sv(o, "model"));
            const char *api = json_string_value(json_object_get(o, "api"));
            s->api = api && strcmp(api, "chat") == 0 ? BT_API_CHAT : BT_API_COMPLETION;
            snprintf(s->body_digest, sizeof s->body_digest, "%s", sv(o, "digest"));
            s->created = json_integer_value(json_object_get(o, "created"));
            s->max_tokens = json_integer_value(json_object_get(o, "max_tokens"));
            s->include_usage = json_is_true(json_object_get(o, "usage"));
            s->return_ids = json_is_true(json_object_get(o, "ids"));
            const char *seed = json_string_value(json_object_get(o, "seed"));
            s->seed = seed ? strtoull(seed, NULL, 10) : 0;
            /* absent in records of an older frontend: the default priority */
            json_int_t prio = json_integer_value(json_object_get(o, "prio"));
            s->priority = prio >= -BT_PRIORITY_LIMIT && prio <= BT_PRIORITY_LIMIT ? (int32_t)prio : 0;
            *opened = true;
        } else if (strcmp(k, "ev") == 0) {
            json_t *at_tok = json_object_get(o, "p"), *at_text = json_object_get(o, "b");
            if ((at_tok && (!json_is_integer(at_tok) || (uint64_t)json_integer_value(at_tok) != s->nids)) ||
                (at_text && (!json_is_integer(at_text) || (uint64_t)json_integer_value(at_text) != s->text_len))) {
                *gap = true;
                s->tail.kind = FE_JTAIL_NONE;
                break;
            }
            const char *i64 = json_string_value(json_object_get(o, "i"));
            const char *t64 = json_string_value(json_object_get(o, "t"));
            size_t il = i64 ? strlen(i64) : 0, tl = t64 ? strlen(t64) : 0;
            if (!i64 || !t64 || !grow((void **)&s->ids, &caps[0], s->nids + il / 4 * 3 / 4 + 4, sizeof *s->ids) ||
                !grow((void **)&s->text, &caps[1], s->text_len + tl / 4 * 3 + 4, 1) ||
                !grow((void **)&s->ev, &caps[2], s->nev + 1, sizeof *s->ev)) {
                ok = false;
                break;
            }
            int ib = from_b64(i64, il, (unsigned char *)(s->ids + s->nids));
            int tb = from_b64(t64, tl, (unsigned char *)s->text + s->text_len);
            if (ib < 0 || tb < 0 || ib % 4 != 0) {
                ok = false;
                break;
            }
            s->nids += (size_t)ib / 4;
            s->text_len += (size_t)tb;
            s->ev[s->nev].end_tok = (uint32_t)s->nids;
            s->ev[s->nev].end_text = (uint32_t)s->text_len;
            s->nev++;
            s->tail.kind = FE_JTAIL_NONE; /* a resumed stream went on after an unfinished close */
        } else if (strcmp(k, "worker") == 0) {
            s->worker_id = (uint64_t)json_integer_value(json_object_get(o, "id"));
            const char *x = json_string_value(json_object_get(o, "x"));
            snprintf(s->exactness, sizeof s->exactness, "%s", x ? x : "");
        } else if (strcmp(k, "close") == 0) {
            apply_tail(&s->tail, o);
        }
    }
    json_decref(arr);
    return ok;
}

/* Reads the epoch of the latest writer that took stream `sid` over (its <subject>.own; 0 when none
 * did: NATS_NOT_FOUND) into *epoch. Blocking: this thread only. */
static natsStatus read_own(js_journal *js, jsCtx *ctx, const char *sid, uint32_t *epoch) {
    char subj[168];
    snprintf(subj, sizeof subj, "%s.%s.own", js->prefix, sid);
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = FETCH_WAIT_MS;
    jsDirectGetMsgOptions dg;
    jsDirectGetMsgOptions_Init(&dg);
    dg.LastBySubject = subj;
    natsMsg *m = NULL;
    natsStatus st = js_DirectGetMsg(&m, ctx, js->stream, &jo, &dg);
    *epoch = 0;
    if (st == NATS_OK) {
        json_t *o = json_loadb(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), 0, NULL);
        json_int_t e = json_integer_value(json_object_get(o, "e"));
        *epoch = e > 0 && e <= UINT32_MAX ? (uint32_t)e : 0;
        json_decref(o);
    } else if (st != NATS_NOT_FOUND) {
        BT_WARN("stream journal: cannot read %s: %s", subj, natsStatus_GetText(st));
    }
    natsMsg_Destroy(m);
    return st;
}

/* Reads every message of stream `sid` (blocking: this thread only) into f; for a record held here
 * (f->local), only when JetStream has a writer later than this frontend. */
static void fetch_one(js_journal *js, jsCtx *ctx, fetch *f) {
    uint32_t own = 0;
    if (f->local) {
        natsStatus st = read_own(js, ctx, f->sid, &own);
        if (st != NATS_OK && st != NATS_NOT_FOUND) {
            uv_mutex_lock(&js->mu);
            f->state = F_FAILED; /* not counted in fetch_failed: the resume goes on here, no 503 */
            f->done_ms = bt_now_ms();
            uv_mutex_unlock(&js->mu);
            return;
        }
        if (own <= f->local_epoch) {
            uv_mutex_lock(&js->mu);
            f->state = F_CURRENT;
            f->done_ms = bt_now_ms();
            uv_mutex_unlock(&js->mu);
            return;
        }
    }
    char subj[160];
    subject(js, f->sid, subj, sizeof subj);
    fe_jsnap s;
    memset(&s, 0, sizeof s);
    memcpy(s.stream_id, f->sid, sizeof s.stream_id);
    uint8_t mac[FE_KEY_MAC_LEN] = {0};
    bool opened = false, ok = true, gap = false, failed = false;
    uint32_t epoch = 0;
    size_t caps[3] = {0, 0, 0};
    uint64_t seq = 1;
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = FETCH_WAIT_MS;
    for (;;) {
        jsDirectGetMsgOptions dg;
        jsDirectGetMsgOptions_Init(&dg);
        dg.Sequence = seq;
        dg.NextBySubject = subj;
        natsMsg *m = NULL;
        natsStatus st = js_DirectGetMsg(&m, ctx, js->stream, &jo, &dg);
        if (st == NATS_NOT_FOUND) break; /* no more */
        if (st != NATS_OK) {
            /* no answer is not "not there": the resume is told to come back (503), not that the
             * stream is unknown (404), which ends an EventSource or an SDK's retries for good */
            BT_WARN("stream journal: reading stream %s from JetStream failed: %s; its resume is answered 503 "
                    "(retry)",
                    f->sid, natsStatus_GetText(st));
            ok = false;
            failed = true;
            break;
        }
        const char *sq = NULL;
        if (natsMsgHeader_Get(m, "Nats-Sequence", &sq) != NATS_OK || !sq) ok = false;
        else seq = strtoull(sq, NULL, 10) + 1;
        if (ok) ok = apply_msg(&s, mac, &opened, &gap, &epoch, caps, natsMsg_GetData(m), natsMsg_GetDataLength(m));
        natsMsg_Destroy(m);
        if (!ok || gap) break;
    }
    if (ok && opened && gap)
        BT_WARN("stream journal: the record of stream %s in JetStream misses a change after %zu tokens (lost on its "
                "way, as in a NATS outage): it is read up to there, and a resume continues it from that point",
                f->sid, s.nids);
    if (ok && opened && !s.text) s.text = calloc(1, 1);
    uv_mutex_lock(&js->mu);
    f->done_ms = bt_now_ms();
    if (ok && opened && s.text) {
        f->snap = s;
        f->epoch = epoch > own ? epoch : own; /* its own is stored after the record's */
        memcpy(f->mac, mac, sizeof mac);
        f->state = F_FOUND;
        js->fetched++;
        js->fetch_gaps += gap;
    } else if (failed) {
        f->state = F_FAILED;
        js->fetch_failed++;
        fe_jsnap_free(&s);
    } else {
        f->state = F_NONE;
        js->fetch_missing++;
        fe_jsnap_free(&s);
    }
    uv_mutex_unlock(&js->mu);
}

/* Answers check_writer questions (blocking reads: this thread only): a stream has a later writer
 * when its <subject>.own names an epoch above the asker's. A read that fails answers "not taken":
 * the stream goes on as it would have without the question.
 *
 * A worker's death migrates every stream it ran at once, and a thousand questions read one by one
 * would keep this thread from publishing for as long (each read may wait FETCH_WAIT_MS on a slow
 * server): the queue to it fills and streams are cut, and resumes' fetches wait behind. So a pass
 * reads for CHECKS_MS at most (one read at least), and the rest wait for the next pass, after the
 * next batch is published; a question is asked once per stream at a time (js_check_writer). One
 * read that gets no answer (a timeout, no connection) answers every question queued then "not
 * taken" without reading: the server that did not answer it would keep each waiting as long. The
 * questions are not batched into one request: a direct get reads one subject's last message
 * (multi_last needs nats-server 2.11), and a reply subscription of our own would be a second
 * reader to keep in step with nats.c's. */
static void do_checks(js_journal *js, jsCtx *ctx) {
    uint64_t t0 = bt_now_ms();
    bool answering = true;
    size_t unread = 0;
    for (bool first = true;; first = false) {
        uv_mutex_lock(&js->mu);
        wcheck *c = STAILQ_FIRST(&js->checks);
        if (!c || (!first && answering && bt_now_ms() - t0 >= CHECKS_MS)) {
            uv_mutex_unlock(&js->mu);
            break;
        }
        STAILQ_REMOVE_HEAD(&js->checks, link);
        uv_mutex_unlock(&js->mu);
        uint32_t e = 0;
        if (answering) {
            natsStatus st = read_own(js, ctx, c->sid, &e);
            answering = st == NATS_OK || st == NATS_NOT_FOUND;
            if (!answering) BT_WARN("stream journal: stream %s is taken to be still this frontend's", c->sid);
        } else {
            unread++;
        }
        uv_mutex_lock(&js->mu); /* held through done: checks_stop waits for it */
        bt_map_del(&js->checking, cut_key(c->sid));
        c->done(c->arg, e > c->epoch && !js->checks_stopped);
        uv_mutex_unlock(&js->mu);
        free(c);
    }
    if (unread)
        BT_WARN("stream journal: %zu more streams that migrated are taken to be still this frontend's without "
                "reading JetStream (it did not answer)",
                unread);
}

/* Deletes the entries of m whose time has passed: a cut's value is its time; an owner's (owners
 * true) is in it, freed with the entry. The expired keys are gathered first and deleted after (no
 * deleting during an iteration): one scan, under js->mu, which every loop takes for every token
 * journaled. Out of memory for the list, the entries wait for the next sweep. */
static void sweep_map(bt_map *m, uint64_t now, bool owners) {
    uint64_t *dead = m->len ? malloc(m->len * sizeof *dead) : NULL;
    if (!dead) return;
    size_t n = 0, it = 0;
    uint64_t k;
    void *v;
    while (n < m->len && bt_map_next(m, &it, &k, &v))
        if ((owners ? ((owner *)v)->until_ms : (uint64_t)(uintptr_t)v) <= now) dead[n++] = k;
    for (size_t i = 0; i < n; i++) {
        void *gone = bt_map_del(m, dead[i]);
        if (owners) free(gone);
    }
    free(dead);
}

static void do_purges(js_journal *js, jsCtx *ctx, bool all) {
    uint64_t now = bt_now_ms();
    uv_mutex_lock(&js->mu);
    if (now - js->cut_swept_ms >= 60000) { /* cut streams are forgotten once NATS has dropped them (MaxAge) */
        js->cut_swept_ms = now;
        sweep_map(&js->cut, now, false);
        sweep_map(&js->owners, now, true);
    }
    struct purge_list due = LIST_HEAD_INITIALIZER(due);
    for (purge *p = LIST_FIRST(&js->purges), *next; p; p = next) {
        next = LIST_NEXT(p, link);
        if (all || p->due_ms <= now) {
            LIST_REMOVE(p, link);
            LIST_INSERT_HEAD(&due, p, link);
        }
    }
    uv_mutex_unlock(&js->mu);
    purge *p;
    while ((p = LIST_FIRST(&due)) != NULL) {
        LIST_REMOVE(p, link);
        if (!all) {
            char subj[160];
            subject(js, p->sid, subj, sizeof subj);
            jsOptions jo;
            jsOptions_Init(&jo);
            jo.Stream.Purge.Subject = subj;
            jsErrCode je = 0;
            natsStatus st = js_PurgeStream(ctx, js->stream, &jo, &je);
            if (st == NATS_OK && p->own) {
                char osubj[168];
                snprintf(osubj, sizeof osubj, "%s.own", subj);
                jo.Stream.Purge.Subject = osubj;
                st = js_PurgeStream(ctx, js->stream, &jo, &je);
            }
            if (st != NATS_OK) BT_DEBUG("stream journal: purge of %s failed: %s", subj, natsStatus_GetText(st));
            uv_mutex_lock(&js->mu);
            if (st == NATS_OK) js->purged++;
            else js->purge_errors++;
            uv_mutex_unlock(&js->mu);
        }
        free(p);
    }
}

/* A limit of the stream, the larger of two: n <= 0 is none (MaxAge 0, MaxBytes -1: unlimited). */
static int64_t larger_limit(int64_t have, int64_t want) {
    if (have <= 0) return have;
    return want > have ? want : have;
}

/* Creates the JetStream stream, or takes it as other frontends made it. Its limits only ever grow:
 * the stream holds every frontend's records under one MaxBytes and one MaxAge, so a frontend whose
 * own settings are smaller (a test instance, a typo) must not cut the others' records — lowering
 * MaxBytes deletes the oldest messages of every frontend at once, and their streams would no longer
 * resume anywhere. A frontend whose settings are larger raises them, as a rolling restart with a
 * larger --stream-retention-bytes means to; lowering them is an operator's deliberate act (`nats
 * stream edit`, docs/operations.md). *max_age_ns and *max_bytes: the stream's limits from here on.
 * Blocking: this thread only. */
static natsStatus ensure_stream(js_journal *js, jsCtx *ctx, jsErrCode *je, int64_t *max_age_ns, int64_t *max_bytes) {
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    char subj[128];
    snprintf(subj, sizeof subj, "%s.>", js->prefix);
    const char *subjects[] = {subj};
    cfg.Name = js->stream;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    cfg.Discard = js_DiscardOld;
    cfg.MaxAge = (int64_t)((js->pub.retention_s + MAX_STREAM_S) * 1e9);
    cfg.MaxBytes = (int64_t)js->pub.max_bytes;
    cfg.AllowDirect = true;
    jsStreamInfo *si = NULL;
    natsStatus st = js_GetStreamInfo(&si, ctx, js->stream, NULL, je);
    if (st == NATS_NOT_FOUND || *je == JSStreamNotFoundErr) {
        *je = 0;
        st = js_AddStream(&si, ctx, &cfg, NULL, je);
        if (st == NATS_OK) {
            BT_INFO("resumable streams: created the JetStream stream %s (MaxAge %gs, MaxBytes %" PRId64 ")",
                    js->stream, (double)cfg.MaxAge / 1e9, cfg.MaxBytes);
            *max_age_ns = cfg.MaxAge;
            *max_bytes = cfg.MaxBytes;
            jsStreamInfo_Destroy(si);
            return NATS_OK;
        }
        if (*je != JSStreamNameExistErr) return st;
        *je = 0; /* another frontend created it meanwhile: take it as it made it */
        st = js_GetStreamInfo(&si, ctx, js->stream, NULL, je);
    }
    if (st != NATS_OK) return st;
    if (!si || !si->Config) {
        jsStreamInfo_Destroy(si);
        return NATS_ERR;
    }
    jsStreamConfig *have = si->Config;
    int64_t age0 = have->MaxAge, bytes0 = have->MaxBytes;
    int64_t age = larger_limit(age0, cfg.MaxAge), bytes = larger_limit(bytes0, cfg.MaxBytes);
    if (age > age0 || bytes > bytes0 || !have->AllowDirect) {
        have->MaxAge = age;
        have->MaxBytes = bytes;
        have->AllowDirect = true; /* resumes read it with direct gets */
        jsStreamInfo *upd = NULL;
        jsErrCode uje = 0;
        natsStatus ust = js_UpdateStream(&upd, ctx, have, NULL, &uje);
        jsStreamInfo_Destroy(upd);
        if (ust == NATS_OK) {
            BT_WARN("resumable streams: raised the limits of the JetStream stream %s, shared by every frontend of "
                    "namespace %s, from MaxAge %gs, MaxBytes %" PRId64 " to this frontend's MaxAge %gs "
                    "(--stream-retention + %ds), MaxBytes %" PRId64 " (--stream-retention-bytes); a frontend never "
                    "lowers them (docs/operations.md)",
                    js->stream, js->ns, (double)age0 / 1e9, bytes0, (double)age / 1e9, MAX_STREAM_S, bytes);
        } else {
            /* the stream as it is still serves: its records resume, under its own limits */
            BT_WARN("resumable streams: cannot raise the limits of the JetStream stream %s (MaxAge %gs, MaxBytes %" PRId64
                    ") to this frontend's (MaxAge %gs, MaxBytes %" PRId64 "): %s, error %d; it is used as it is",
                    js->stream, (double)age0 / 1e9, bytes0, (double)cfg.MaxAge / 1e9, cfg.MaxBytes,
                    natsStatus_GetText(ust), (int)uje);
            age = age0;
            bytes = bytes0;
        }
    }
    bool larger = age <= 0 || age > cfg.MaxAge || bytes <= 0 || bytes > cfg.MaxBytes;
    if (larger)
        BT_INFO("resumable streams: the JetStream stream %s keeps its MaxAge %gs and MaxBytes %" PRId64 " (0 and -1: "
                "none), not this frontend's %gs (--stream-retention + %ds) and %" PRId64 " (--stream-retention-bytes): "
                "it holds every frontend's records, and a frontend never lowers its limits; to lower them, lower the "
                "flags on every frontend and run `nats stream edit %s --max-age ... --max-bytes ...` "
                "(docs/operations.md)",
                js->stream, (double)age / 1e9, bytes, (double)cfg.MaxAge / 1e9, MAX_STREAM_S, cfg.MaxBytes,
                js->stream);
    *max_age_ns = age;
    *max_bytes = bytes;
    jsStreamInfo_Destroy(si);
    return NATS_OK;
}

static void thread_main(void *arg) {
    js_journal *js = arg;
    natsConnection *nc = NULL;
    jsCtx *ctx = NULL;
    jsErrCode je = 0;
    natsStatus st = bt_nats_client_connect(js->cl, &nc);
    /* A server not reachable yet (started after this frontend, or down for a while) is retried
     * in the background, as the event plane does, every 100 ms doubling to 2 s; the journal is
     * the in-process one meanwhile. A server that answers and refuses is not retried (below). */
    bool stopped = false;
    for (uint64_t wait_ms = 100; st == NATS_NO_SERVER || st == NATS_TIMEOUT;
         wait_ms = wait_ms < 1000 ? wait_ms * 2 : 2000) {
        natsConnection_Destroy(nc);
        nc = NULL;
        uv_mutex_lock(&js->mu);
        if (js->state == JS_CONNECTING) {
            BT_WARN("resumable streams: the NATS server at %s is not reachable yet (%s); the journal connects to "
                    "JetStream in the background and is the in-process one until then (streams started meanwhile "
                    "resume only on this frontend)",
                    js->url, natsStatus_GetText(st));
            js->state = JS_WAITING;
            op *o;
            while ((o = STAILQ_FIRST(&js->ops)) != NULL) { /* queued by the first attempt: see enqueue_op */
                STAILQ_REMOVE_HEAD(&js->ops, link);
                json_decref(o->j);
                free(o);
            }
            js->qbytes = 0;
        }
        if (!js->stop) uv_cond_timedwait(&js->cv, &js->mu, wait_ms * 1000000u);
        stopped = js->stop;
        uv_mutex_unlock(&js->mu);
        if (stopped) break;
        st = bt_nats_client_connect(js->cl, &nc);
    }
    if (st == NATS_OK) st = natsConnection_JetStream(&ctx, nc, NULL);
    int64_t max_age_ns = 0, max_bytes = 0; /* the stream's, as found or set */
    if (st == NATS_OK) st = ensure_stream(js, ctx, &je, &max_age_ns, &max_bytes);
    uv_mutex_lock(&js->mu);
    js->state = st == NATS_OK ? JS_READY : JS_OFF;
    uv_mutex_unlock(&js->mu);
    atomic_store(&js->pub.shared, st == NATS_OK);
    if (stopped) {
        BT_INFO("resumable streams: the NATS server at %s was never reached; the journal stayed in-process", js->url);
    } else if (st != NATS_OK) {
        if (je == JSNotEnabledErr || je == JSNotEnabledForAccountErr || st == NATS_NO_RESPONDERS ||
            st == NATS_TIMEOUT)
            BT_WARN("resumable streams: the NATS server at %s has no JetStream (start it with -js): keeping the "
                    "in-process journal; streams resume only on the frontend that served them",
                    js->url);
        else if (st == NATS_CONNECTION_AUTH_FAILED)
            BT_WARN("resumable streams: the NATS server at %s refused the journal's credentials (%s: %s): keeping "
                    "the in-process journal; streams resume only on the frontend that served them",
                    js->url, bt_nats_client_auth(js->cl), nats_GetLastError(NULL));
        else
            BT_WARN("resumable streams: cannot use JetStream at %s (%s, error %d; credentials: %s): keeping the "
                    "in-process journal; streams resume only on the frontend that served them",
                    js->url, natsStatus_GetText(st), (int)je, bt_nats_client_auth(js->cl));
    } else {
        BT_INFO("resumable streams: journal shared through NATS JetStream at %s (stream %s, subjects %s.*, MaxAge "
                "%gs, MaxBytes %" PRId64 ", credentials: %s); a stream resumes on any frontend of namespace %s",
                js->url, js->stream, js->prefix, (double)max_age_ns / 1e9, max_bytes, bt_nats_client_auth(js->cl),
                js->ns);
    }
    uv_mutex_lock(&js->mu);
    while (st == NATS_OK) {
        if (!js->stop) { /* a batch is what BATCH_MS gathers; a resume's fetch cuts the wait short */
            bool waiting = false;
            for (fetch *f = LIST_FIRST(&js->fetches); f; f = LIST_NEXT(f, link)) waiting |= f->state == F_WAIT;
            waiting |= !STAILQ_EMPTY(&js->checks);
            if (!waiting) uv_cond_timedwait(&js->cv, &js->mu, (uint64_t)BATCH_MS * 1000000u);
        }
        struct op_queue list = STAILQ_HEAD_INITIALIZER(list);
        STAILQ_CONCAT(&list, &js->ops);
        js->qbytes = 0;
        bool stop = js->stop;
        fetch *todo[MAX_FETCHES];
        size_t nt = 0;
        for (fetch *f = LIST_FIRST(&js->fetches); f && nt < MAX_FETCHES; f = LIST_NEXT(f, link))
            if (f->state == F_WAIT) todo[nt++] = f;
        uv_mutex_unlock(&js->mu);
        publish_batch(js, nc, &list);
        for (size_t i = 0; i < nt; i++) fetch_one(js, ctx, todo[i]); /* f stays listed: only claims unlink it */
        do_checks(js, ctx);
        do_purges(js, ctx, false);
        if (stop) {
            natsConnection_FlushTimeout(nc, 2000); /* what was published reaches the server */
            uv_mutex_lock(&js->mu);
            break;
        }
        uv_mutex_lock(&js->mu);
    }
    uv_mutex_unlock(&js->mu);
    do_purges(js, ctx, true);
    jsCtx_Destroy(ctx);
    natsConnection_Destroy(nc);
}

static void js_destroy(fe_journal *j) {
    js_journal *js = (js_journal *)j;
    uv_mutex_lock(&js->mu);
    js->stop = true;
    uv_cond_signal(&js->cv);
    uv_mutex_unlock(&js->mu);
    uv_thread_join(&js->thread);
    BT_INFO("stream journal: %" PRIu64 " JetStream messages published, %" PRIu64 " failed, %" PRIu64
            " changes dropped (queue full)",
            js->published, js->pub_errors, js->dropped);
    for (op *o = STAILQ_FIRST(&js->ops), *n; o; o = n) {
        n = STAILQ_NEXT(o, link);
        json_decref(o->j);
        free(o);
    }
    for (fetch *f = LIST_FIRST(&js->fetches), *n; f; f = n) {
        n = LIST_NEXT(f, link);
        fe_jsnap_free(&f->snap);
        free(f);
    }
    js_checks_stop(j); /* those the thread did not answer */
    fe_journal_destroy(js->mem);
    bt_map_free(&js->cut);
    bt_map_free(&js->checking);
    size_t it = 0;
    uint64_t k;
    void *v;
    while (bt_map_next(&js->owners, &it, &k, &v)) free(v);
    bt_map_free(&js->owners);
    bt_nats_client_free(js->cl);
    uv_cond_destroy(&js->cv);
    uv_mutex_destroy(&js->mu);
    free(js->url);
    free(js);
}

static const fe_journal_ops js_ops = {.open = js_open,
                                      .append = js_append,
                                      .close = js_close,
                                      .claim = js_claim,
                                      .stats = js_stats,
                                      .note_worker = js_note_worker,
                                      .destroy = js_destroy,
                                      .check_writer = js_check_writer,
                                      .checks_stop = js_checks_stop};

fe_journal *fe_journal_js_new(fe_journal *mem, const bt_events_config *c, char *err, size_t errlen) {
    js_journal *js = calloc(1, sizeof *js);
    if (!js) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    STAILQ_INIT(&js->ops);
    STAILQ_INIT(&js->checks);
    js->pub.ops = &js_ops;
    js->pub.retention_s = mem->retention_s;
    js->pub.max_bytes = mem->max_bytes;
    js->mem = mem;
    js->url = strdup(c->nats_server);
    snprintf(js->ns, sizeof js->ns, "%s", c->ns);
    snprintf(js->stream, sizeof js->stream, "BATON_JOURNAL_%s", c->ns);
    snprintf(js->prefix, sizeof js->prefix, "baton.journal.%s", c->ns);
    js->state = JS_CONNECTING;
    bt_map_init(&js->cut);
    bt_map_init(&js->owners);
    bt_map_init(&js->checking);
    js->cl = bt_nats_client_new(c, err, errlen);
    if (!js->url || !js->cl || uv_mutex_init(&js->mu) != 0) {
        if (!js->url) snprintf(err, errlen, "out of memory");
        bt_nats_client_free(js->cl);
        free(js->url);
        free(js);
        return NULL;
    }
    uv_cond_init(&js->cv);
    if (uv_thread_create(&js->thread, thread_main, js) != 0) {
        snprintf(err, errlen, "cannot start the journal's thread");
        uv_cond_destroy(&js->cv);
        uv_mutex_destroy(&js->mu);
        bt_nats_client_free(js->cl);
        free(js->url);
        free(js);
        return NULL;
    }
    return &js->pub;
}
