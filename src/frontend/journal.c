/* journal.c — the in-process stream journal (see journal.h): one per frontend process, shared by
 * its shards under one mutex.
 *
 * Records are found by their stream id (128 random bits; the map is keyed by the first 64 and the
 * whole id is compared). A running stream's record is "live" and owned by its request; when the
 * request ends the record joins the "ended" list, in the order streams ended, and expires
 * `retention_s` later: since the window is the same for every record the list stays sorted, so
 * expiry pops from its head. Expired records are freed by the next call into the journal (any
 * open, claim or stats), so an idle frontend's /metrics still shows what it holds truthfully.
 *
 * Memory: each record accounts what it allocates (the struct, the body, the capacity of its id,
 * text and event arrays); the sum is capped at max_bytes. Growth that would pass the cap first
 * evicts ended records (oldest first); if that is not enough, a new record is refused and a live
 * one is dropped: its stream goes on unjournaled, and its ids and text go back to the request that
 * streams it (whose only copy they may be: fe_jrec_output).
 *
 * A dropped stream's client already holds ids for its first events. So that a resume from one of
 * them is told what happened rather than "unknown", the dropped record stays in the map (holding
 * nothing) until its request ends, and then leaves a tombstone (its id and credential, ~100 bytes)
 * for `retention_s`, as long as the record would have been kept. Tombstones are not charged to the
 * cap, which is what filled up; their number is bounded instead (TOMB_MAX, the oldest go first). */
#include "frontend/journal.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <uv.h>

#include "common/map.h"
#include "common/util.h"
#include "proto/request.h" /* BT_EXACTNESS_MAX */

typedef enum { REC_LIVE, REC_ENDED, REC_DROPPED } rec_state;

/* A record's fe_jsnap but its tail and fingerprint, which live out of line (journal.h). */
typedef struct {
    FE_JSNAP_FIELDS
} rec_snap;
_Static_assert(sizeof(rec_snap) == offsetof(fe_jsnap, tail), "rec_snap is the leading part of fe_jsnap");

struct fe_jrec {
    rec_snap s; /* ids/text/ev capacities below */
    fe_jtail *tail;  /* ENDED (and after a claim): how it ended; NULL before its first close */
    char *exactness; /* the fingerprint (fe_jsnap.exactness); NULL: none; EXACTNESS_LOST: see below */
    size_t ids_cap, text_cap, ev_cap;
    uint8_t key_mac[FE_KEY_MAC_LEN];
    uint64_t key; /* map key: the id's first 64 bits */
    rec_state state;
    int shard;   /* LIVE: the shard of the request that streams it */
    uint64_t expires_ms;     /* ENDED */
    TAILQ_ENTRY(fe_jrec) link; /* ENDED: the ended list */
    size_t bytes;            /* accounted */
    /* DROPPED: the ids and text it held, kept for its owner to take back (fe_jrec_take_output),
     * since a request whose output lived in the record has no other copy; freed at close if not */
    uint32_t *kept_ids;
    char *kept_text;
    size_t kept_nids, kept_text_len;
};

/* Under 1,000 bytes, a record is a small-bin allocation for glibc: over it, every record's
 * calloc first consolidated the fast bins (docs/benchmarks.md, fifth round). */
_Static_assert(sizeof(struct fe_jrec) <= 1000, "a journal record is a small-bin allocation");

/* What is left of a dropped record once its request has ended: enough to answer a resume from
 * one of the ids its client received (FE_CLAIM_DROPPED) for retention_s. */
#define TOMB_MAX 4096
typedef struct tomb {
    uint64_t key; /* as fe_jrec.key */
    char stream_id[FE_STREAM_ID_LEN];
    uint8_t key_mac[FE_KEY_MAC_LEN];
    uint64_t expires_ms;
    TAILQ_ENTRY(tomb) link; /* mem_journal.tombs, oldest first */
} tomb;

typedef struct {
    fe_journal pub;
    uv_mutex_t mu;
    bt_map recs; /* key → fe_jrec (LIVE, ENDED, and DROPPED until their owner closes them) */
    TAILQ_HEAD(, fe_jrec) ended; /* oldest first */
    bt_map tomb_map;             /* key → tomb */
    TAILQ_HEAD(, tomb) tombs;    /* oldest first: one window for all, so sorted by expiry too */
    size_t ntombs;
    fe_journal_stats st;
} mem_journal;

void fe_jsnap_free(fe_jsnap *s) {
    if (!s) return;
    free(s->body);
    free(s->ids);
    free(s->text);
    free(s->ev);
    s->body = s->text = NULL;
    s->ids = NULL;
    s->ev = NULL;
}

static uint64_t id_key(const char *sid) {
    uint64_t k = 0;
    for (int i = 0; i < 16; i++) {
        char c = sid[i];
        k = (k << 4) | (uint64_t)(c <= '9' ? c - '0' : c - 'a' + 10);
    }
    return k ? k : 1;
}

/* A LIVE record's `exactness` when the last fingerprint noted could not be copied (no memory):
 * the record is dropped at its close unless a later note succeeds (mem_note_worker). A mark
 * rather than a flag, which would take the record past 576 bytes. Never freed. */
static char exactness_lost_mark[1];
#define EXACTNESS_LOST exactness_lost_mark

static void exactness_free(fe_jrec *r) {
    if (r->exactness != EXACTNESS_LOST) free(r->exactness);
    r->exactness = NULL;
}

/* What a record is charged against --stream-retention-bytes. Its tail and fingerprint are
 * charged at their largest whether set or not, so that setting them never needs room. */
static size_t rec_bytes(const fe_jrec *r) {
    return sizeof *r + sizeof(fe_jtail) + BT_EXACTNESS_MAX + 1 + r->s.body_len + 1 + r->ids_cap * sizeof(uint32_t) +
           r->text_cap + r->ev_cap * sizeof(fe_jevent);
}

/* Frees what a record holds but its struct (and a DROPPED record's kept output). */
static void rec_free_data(fe_jrec *r) {
    free(r->s.body);
    free(r->s.ids);
    free(r->s.text);
    free(r->s.ev);
    free(r->tail);
    exactness_free(r);
    r->s.body = r->s.text = NULL;
    r->s.ids = NULL;
    r->s.ev = NULL;
    r->tail = NULL;
}

static void ended_unlink(mem_journal *m, fe_jrec *r) { TAILQ_REMOVE(&m->ended, r, link); }

/* Frees a record's data; a LIVE record's struct stays with its owner (DROPPED), and in the map so
 * that a claim can tell it was dropped, until close. */
static void rec_release(mem_journal *m, fe_jrec *r) {
    if (r->state == REC_ENDED) bt_map_del(&m->recs, r->key);
    m->st.bytes -= r->bytes;
    r->bytes = 0;
    rec_free_data(r);
    r->ids_cap = r->text_cap = r->ev_cap = 0;
    if (r->state == REC_ENDED) {
        ended_unlink(m, r);
        m->st.ended--;
        free(r);
    } else if (r->state == REC_LIVE) {
        m->st.live--;
        r->state = REC_DROPPED;
    }
}

static void tomb_free(mem_journal *m, tomb *t) {
    bt_map_del(&m->tomb_map, t->key);
    TAILQ_REMOVE(&m->tombs, t, link);
    m->ntombs--;
    free(t);
}

/* Under the mutex, at the close of a DROPPED record: its tombstone, for retention_s. Without
 * memory for one, a resume from the stream's ids is answered as for an unknown stream. */
static void tomb_add(mem_journal *m, const fe_jrec *r) {
    tomb *old = bt_map_get(&m->tomb_map, r->key);
    if (old) tomb_free(m, old);
    if (m->ntombs >= TOMB_MAX) tomb_free(m, TAILQ_FIRST(&m->tombs));
    tomb *t = malloc(sizeof *t);
    if (!t) return;
    t->key = r->key;
    memcpy(t->stream_id, r->s.stream_id, FE_STREAM_ID_LEN);
    memcpy(t->key_mac, r->key_mac, FE_KEY_MAC_LEN);
    t->expires_ms = bt_now_ms() + (uint64_t)(m->pub.retention_s * 1000.0);
    if (bt_map_put(&m->tomb_map, t->key, t) != 0) {
        free(t);
        return;
    }
    TAILQ_INSERT_TAIL(&m->tombs, t, link);
    m->ntombs++;
}

static void sweep(mem_journal *m, uint64_t now) {
    while (!TAILQ_EMPTY(&m->ended) && TAILQ_FIRST(&m->ended)->expires_ms <= now) {
        m->st.evicted_expired++;
        rec_release(m, TAILQ_FIRST(&m->ended));
    }
    while (!TAILQ_EMPTY(&m->tombs) && TAILQ_FIRST(&m->tombs)->expires_ms <= now) tomb_free(m, TAILQ_FIRST(&m->tombs));
}

/* Makes room for `extra` more bytes by evicting ended records; false if there is not enough. */
static bool make_room(mem_journal *m, size_t extra) {
    while (m->st.bytes + extra > m->pub.max_bytes && !TAILQ_EMPTY(&m->ended)) {
        m->st.evicted_size++;
        rec_release(m, TAILQ_FIRST(&m->ended));
    }
    return m->st.bytes + extra <= m->pub.max_bytes;
}

static void random_id(char out[FE_STREAM_ID_LEN + 1]) {
    unsigned char b[FE_STREAM_ID_LEN / 2];
    /* the OS generator through the per-thread pool (no DRBG call per stream), then OpenSSL's,
     * then a mix of the OS generator: never a constant */
    if (!bt_random_bytes(b, sizeof b) && RAND_bytes(b, sizeof b) != 1) {
        uint64_t a = bt_random64(), c = bt_random64();
        memcpy(b, &a, 8);
        memcpy(b + 8, &c, 8);
    }
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof b; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[FE_STREAM_ID_LEN] = '\0';
}

/* Initial room for the stream's events, sized from its max_tokens (at most REC_PRESIZE_TOKENS;
 * 16 without a limit, max_tokens < 0; none for max_tokens 0, which request validation accepts and
 * which produces no token: the arrays would grow on demand should an event come all the same) and
 * accounted with the record when it opens: a short stream appends every event without growing
 * its arrays, so without the lock and without a realloc (mem_append), where doubling from 16
 * took ~6 locked reallocs for a stream of 30 tokens; a long one doubles from there. The text is
 * guessed at REC_PRESIZE_TEXT bytes per token. What is not used is given back when the stream
 * ends (shrink in mem_close). If an allocation fails nothing is reserved: the arrays grow on
 * demand, as they would anyway. */
#define REC_PRESIZE_TOKENS 64
#define REC_PRESIZE_TEXT 8
static void presize(fe_jrec *r, int64_t max_tokens) {
    if (max_tokens == 0) return;
    size_t n = max_tokens > 0 ? (size_t)(max_tokens < REC_PRESIZE_TOKENS ? max_tokens : REC_PRESIZE_TOKENS) : 16;
    uint32_t *ids = malloc(n * sizeof *ids);
    char *text = malloc(n * REC_PRESIZE_TEXT);
    fe_jevent *ev = malloc(n * sizeof *ev);
    if (!ids || !text || !ev) {
        free(ids);
        free(text);
        free(ev);
        return;
    }
    r->s.ids = ids;
    r->s.text = text;
    r->s.ev = ev;
    r->ids_cap = r->ev_cap = n;
    r->text_cap = n * REC_PRESIZE_TEXT;
}

/* A new LIVE record; its id is given_id (NULL: a fresh random one; a given id already held: NULL). */
static fe_jrec *open_rec(fe_journal *j, fe_jsnap *meta, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard,
                         const char *given_id) {
    mem_journal *m = (mem_journal *)j;
    if (j->retention_s <= 0) return NULL;
    /* calloc, not the frontend's object pool: a record outlives its loop's use of it (it is freed
     * by whichever shard expires it, under the journal's mutex), it is a small-bin size, and it
     * is cold when reused; measured in docs/benchmarks.md ("Not done, and why") */
    fe_jrec *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    memcpy(&r->s, meta, sizeof r->s); /* its tail and fingerprint stay NULL until set */
    r->s.body = malloc(meta->body_len + 1);
    if (!r->s.body) {
        free(r);
        return NULL;
    }
    memcpy(r->s.body, meta->body, meta->body_len + 1);
    r->s.ids = NULL;
    r->s.text = NULL;
    r->s.ev = NULL;
    r->s.nids = r->s.text_len = r->s.nev = 0;
    presize(r, meta->max_tokens);
    memcpy(r->key_mac, key_mac, FE_KEY_MAC_LEN);
    r->shard = shard;
    r->state = REC_LIVE;
    uv_mutex_lock(&m->mu);
    sweep(m, bt_now_ms());
    r->bytes = rec_bytes(r);
    if (!make_room(m, r->bytes)) {
        m->st.refused_full++;
        uv_mutex_unlock(&m->mu);
        rec_free_data(r);
        free(r);
        return NULL;
    }
    if (given_id) memcpy(r->s.stream_id, given_id, FE_STREAM_ID_LEN + 1);
    else do random_id(r->s.stream_id);
        while (bt_map_get(&m->recs, id_key(r->s.stream_id)));
    r->key = id_key(r->s.stream_id);
    if ((given_id && bt_map_get(&m->recs, r->key)) || bt_map_put(&m->recs, r->key, r) != 0) {
        uv_mutex_unlock(&m->mu);
        rec_free_data(r);
        free(r);
        return NULL;
    }
    m->st.bytes += r->bytes;
    m->st.live++;
    m->st.opened++;
    uv_mutex_unlock(&m->mu);
    memcpy(meta->stream_id, r->s.stream_id, sizeof meta->stream_id);
    return r;
}

static fe_jrec *mem_open(fe_journal *j, fe_jsnap *meta, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard) {
    return open_rec(j, meta, key_mac, shard, NULL);
}

const char *fe_jrec_stream_id(const fe_jrec *r) { return r->s.stream_id; }

bool fe_jrec_output(const fe_jrec *r, const uint32_t **ids, size_t *nids, const char **text, size_t *text_len) {
    /* read without the lock, as mem_append does: a live record's arrays are its owner's alone */
    if (r->state != REC_LIVE) return false;
    *ids = r->s.ids;
    *nids = r->s.nids;
    *text = r->s.text;
    *text_len = r->s.text_len;
    return true;
}

void fe_jrec_take_output(fe_jrec *r, uint32_t **ids, size_t *nids, char **text, size_t *text_len) {
    *ids = r->kept_ids;
    *nids = r->kept_nids;
    *text = r->kept_text;
    *text_len = r->kept_text_len;
    r->kept_ids = NULL;
    r->kept_text = NULL;
    r->kept_nids = r->kept_text_len = 0;
}

void fe_jrec_prefetch(const fe_jrec *r, int stage) {
    /* read without the lock, as mem_append does: a live record's arrays are its owner's alone */
    if (stage == 0) { /* every field mem_append reads: they span several lines of the record */
        __builtin_prefetch(&r->s.ids);
        __builtin_prefetch(&r->s.nids);
        __builtin_prefetch(&r->s.text);
        __builtin_prefetch(&r->s.text_len);
        __builtin_prefetch(&r->s.ev);
        __builtin_prefetch(&r->s.nev);
        __builtin_prefetch(&r->ids_cap);
        __builtin_prefetch(&r->text_cap);
        __builtin_prefetch(&r->ev_cap);
        __builtin_prefetch(&r->state);
        return;
    }
    if (r->s.ids) __builtin_prefetch(r->s.ids + r->s.nids, 1);
    if (r->s.text) __builtin_prefetch(r->s.text + r->s.text_len, 1);
    if (r->s.ev) __builtin_prefetch(r->s.ev + r->s.nev, 1);
}

/* Grows *p (elements of size sz, capacity *cap) to hold `need`, doubling. */
static bool grow(void **p, size_t *cap, size_t need, size_t sz) {
    if (need <= *cap) return true;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * sz);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

/* Copies one event into room the record already has. */
static void rec_put(fe_jrec *r, const uint32_t *ids, size_t n, const char *text, size_t len) {
    if (n) memcpy(r->s.ids + r->s.nids, ids, n * sizeof *ids);
    r->s.nids += n;
    if (len) memcpy(r->s.text + r->s.text_len, text, len);
    r->s.text_len += len;
    r->s.ev[r->s.nev++] = (fe_jevent){(uint32_t)r->s.nids, (uint32_t)r->s.text_len};
}

/* Under the mutex: a LIVE record is dropped (the cap, or no memory). What it held goes back to
 * its owner, not freed (no longer accounted: it is the request's own output now, as with a stream
 * that was never journaled); the record is DROPPED, and its owner closes it. */
static void drop_live(mem_journal *m, fe_jrec *r) {
    m->st.dropped_live++;
    if (r->state == REC_LIVE) {
        r->kept_ids = r->s.ids;
        r->kept_nids = r->s.nids;
        r->kept_text = r->s.text;
        r->kept_text_len = r->s.text_len;
        r->s.ids = NULL;
        r->s.text = NULL;
    }
    rec_release(m, r);
}

static bool mem_append(fe_journal *j, fe_jrec *r, const uint32_t *ids, size_t n, const char *text, size_t len) {
    mem_journal *m = (mem_journal *)j;
    /* The per-event path takes no lock while the record has room: a live record's arrays and
     * counts are its owner's alone (a claim reads them only once the record has ended), and its
     * state changes only here, on the owner's thread. Growth takes the lock: it is accounted. */
    if (r->state == REC_LIVE && r->s.nids + n <= r->ids_cap && r->s.text_len + len <= r->text_cap &&
        r->s.nev < r->ev_cap) {
        rec_put(r, ids, n, text, len);
        return true;
    }
    uv_mutex_lock(&m->mu);
    bool ok = r->state == REC_LIVE;
    if (ok && (r->s.nids + n > UINT32_MAX || r->s.text_len + len > UINT32_MAX)) {
        ok = false;
    }
    if (ok) {
        /* account the growth before doing it: the cap holds at every moment */
        size_t ic = r->ids_cap, tc = r->text_cap, ec = r->ev_cap;
        size_t need_i = r->s.nids + n, need_t = r->s.text_len + len, need_e = r->s.nev + 1;
        while (ic < need_i) ic = ic ? ic * 2 : 16;
        while (tc < need_t) tc = tc ? tc * 2 : 16;
        while (ec < need_e) ec = ec ? ec * 2 : 16;
        size_t extra = (ic - r->ids_cap) * sizeof(uint32_t) + (tc - r->text_cap) + (ec - r->ev_cap) * sizeof(fe_jevent);
        ok = extra == 0 || make_room(m, extra);
        ok = ok && grow((void **)&r->s.ids, &r->ids_cap, need_i, sizeof(uint32_t)) &&
             grow((void **)&r->s.text, &r->text_cap, need_t, 1) &&
             grow((void **)&r->s.ev, &r->ev_cap, need_e, sizeof(fe_jevent));
        if (ok) {
            rec_put(r, ids, n, text, len);
            size_t b = rec_bytes(r);
            m->st.bytes += b - r->bytes;
            r->bytes = b;
        }
        if (!ok) drop_live(m, r);
    }
    uv_mutex_unlock(&m->mu);
    return ok;
}

/* A finished stream's arrays keep only what they hold: what is retained is what a resume needs.
 * Safe without the lock: while a record is live, nothing but its owner reads its arrays. */
static void shrink(void **p, size_t *cap, size_t n, size_t sz) {
    if (n == *cap) return;
    if (n == 0) {
        free(*p);
        *p = NULL;
        *cap = 0;
        return;
    }
    void *q = realloc(*p, n * sz);
    if (!q) return; /* keeps the larger block, still accounted */
    *p = q;
    *cap = n;
}

static void mem_close(fe_journal *j, fe_jrec *r, const fe_jtail *tail) {
    mem_journal *m = (mem_journal *)j;
    if (r->state == REC_LIVE) {
        shrink((void **)&r->s.ids, &r->ids_cap, r->s.nids, sizeof(uint32_t));
        shrink((void **)&r->s.text, &r->text_cap, r->s.text_len, 1);
        shrink((void **)&r->s.ev, &r->ev_cap, r->s.nev, sizeof(fe_jevent));
    }
    uv_mutex_lock(&m->mu);
    /* no memory for how it ended, or for its fingerprint: not resumable, rather than resumed as
     * unfinished or without its constraint */
    if (r->state == REC_LIVE && (r->exactness == EXACTNESS_LOST || (!r->tail && !(r->tail = malloc(sizeof *r->tail)))))
        drop_live(m, r);
    if (r->state == REC_DROPPED) {
        bt_map_del(&m->recs, r->key);
        tomb_add(m, r);
        uv_mutex_unlock(&m->mu);
        rec_free_data(r); /* a fingerprint noted after the drop */
        free(r->kept_ids);
        free(r->kept_text);
        free(r);
        return;
    }
    size_t b = rec_bytes(r);
    m->st.bytes = m->st.bytes - r->bytes + b;
    r->bytes = b;
    *r->tail = *tail;
    r->state = REC_ENDED;
    r->expires_ms = bt_now_ms() + (uint64_t)(j->retention_s * 1000.0);
    TAILQ_INSERT_TAIL(&m->ended, r, link);
    m->st.live--;
    m->st.ended++;
    sweep(m, bt_now_ms());
    uv_mutex_unlock(&m->mu);
}

static bool copy_out(const fe_jrec *r, fe_jsnap *out) {
    memcpy(out, &r->s, sizeof r->s);
    if (r->tail) out->tail = *r->tail;
    else memset(&out->tail, 0, sizeof out->tail);
    bt_copy_str(out->exactness, sizeof out->exactness, r->exactness ? r->exactness : "");
    out->body = malloc(r->s.body_len + 1);
    out->ids = malloc((r->s.nids ? r->s.nids : 1) * sizeof(uint32_t));
    out->text = malloc(r->s.text_len + 1);
    out->ev = malloc((r->s.nev ? r->s.nev : 1) * sizeof(fe_jevent));
    if (!out->body || !out->ids || !out->text || !out->ev) {
        fe_jsnap_free(out);
        return false;
    }
    memcpy(out->body, r->s.body, r->s.body_len + 1);
    if (r->s.nids) memcpy(out->ids, r->s.ids, r->s.nids * sizeof(uint32_t));
    if (r->s.text_len) memcpy(out->text, r->s.text, r->s.text_len);
    out->text[r->s.text_len] = '\0';
    if (r->s.nev) memcpy(out->ev, r->s.ev, r->s.nev * sizeof(fe_jevent));
    return true;
}

static fe_claim_result mem_claim(fe_journal *j, const char *sid, const uint8_t key_mac[FE_KEY_MAC_LEN], int shard,
                                 fe_jsnap *out, fe_jrec **rec, int *cur_shard) {
    mem_journal *m = (mem_journal *)j;
    if (strlen(sid) != FE_STREAM_ID_LEN) return FE_CLAIM_NOT_FOUND;
    uv_mutex_lock(&m->mu);
    sweep(m, bt_now_ms());
    fe_jrec *r = bt_map_get(&m->recs, id_key(sid));
    fe_claim_result res = FE_CLAIM_NOT_FOUND;
    /* the id and the credential compared in constant time: neither leaks through timing */
    if (!r || CRYPTO_memcmp(r->s.stream_id, sid, FE_STREAM_ID_LEN) != 0 ||
        CRYPTO_memcmp(r->key_mac, key_mac, FE_KEY_MAC_LEN) != 0) {
        const tomb *t = bt_map_get(&m->tomb_map, id_key(sid));
        res = t && CRYPTO_memcmp(t->stream_id, sid, FE_STREAM_ID_LEN) == 0 &&
                      CRYPTO_memcmp(t->key_mac, key_mac, FE_KEY_MAC_LEN) == 0
                  ? FE_CLAIM_DROPPED
                  : FE_CLAIM_NOT_FOUND;
    } else if (r->state == REC_DROPPED) {
        res = FE_CLAIM_DROPPED;
    } else if (r->state == REC_LIVE) {
        *cur_shard = r->shard;
        res = FE_CLAIM_LIVE;
    } else if (!copy_out(r, out)) {
        res = FE_CLAIM_NOMEM;
    } else {
        ended_unlink(m, r);
        m->st.ended--;
        m->st.live++;
        r->state = REC_LIVE;
        r->shard = shard;
        *rec = r;
        res = FE_CLAIM_OK;
    }
    uv_mutex_unlock(&m->mu);
    return res;
}

static void mem_stats(fe_journal *j, fe_journal_stats *out) {
    mem_journal *m = (mem_journal *)j;
    uv_mutex_lock(&m->mu);
    sweep(m, bt_now_ms());
    *out = m->st;
    uv_mutex_unlock(&m->mu);
}

/* At the end of the process, once no request is left: every record is freed. */
static void mem_destroy(fe_journal *j) {
    mem_journal *m = (mem_journal *)j;
    while (!TAILQ_EMPTY(&m->ended)) rec_release(m, TAILQ_FIRST(&m->ended));
    size_t it = 0;
    uint64_t k;
    void *v;
    while (bt_map_next(&m->recs, &it, &k, &v)) { /* live records whose owner never closed them */
        fe_jrec *r = v;
        rec_free_data(r);
        free(r->kept_ids);
        free(r->kept_text);
        free(r);
    }
    bt_map_free(&m->recs);
    while (!TAILQ_EMPTY(&m->tombs)) tomb_free(m, TAILQ_FIRST(&m->tombs));
    bt_map_free(&m->tomb_map);
    uv_mutex_destroy(&m->mu);
    free(m);
}

/* Under the mutex: a claim on another shard may be copying the record. */
static void mem_note_worker(fe_journal *j, fe_jrec *rec, uint64_t worker_id, const char *exactness) {
    mem_journal *m = (mem_journal *)j;
    uv_mutex_lock(&m->mu);
    rec->s.worker_id = worker_id;
    /* copied only when it changes (every attempt of a stream notes one, nearly always the same).
     * Without memory for it the record must not be resumed (a resume must not lose the
     * constraint), but it is not dropped here: while its stream runs it may hold the request's only
     * copy of the output (out_in_rec), which the attempt being dispatched, or the next one,
     * carries; its owner learns of a drop only from an append. It is dropped at its close
     * (mem_close), and no claim copies a live record in between. */
    if (!exactness || !exactness[0]) {
        exactness_free(rec);
    } else if (!rec->exactness || strcmp(rec->exactness, exactness) != 0) { /* the mark is "" */
        exactness_free(rec);
        rec->exactness = strndup(exactness, BT_EXACTNESS_MAX);
        if (!rec->exactness) rec->exactness = EXACTNESS_LOST;
    }
    uv_mutex_unlock(&m->mu);
}

bool fe_journal_mem_import(fe_journal *j, const fe_jsnap *s, const uint8_t key_mac[FE_KEY_MAC_LEN]) {
    fe_jsnap meta = *s;
    fe_jrec *r = open_rec(j, &meta, key_mac, -1, s->stream_id);
    if (!r) return false;
    bool ok = true;
    for (size_t k = 0; ok && k < s->nev; k++) {
        uint32_t t0 = k ? s->ev[k - 1].end_tok : 0, x0 = k ? s->ev[k - 1].end_text : 0;
        ok = j->ops->append(j, r, s->ids + t0, s->ev[k].end_tok - t0, s->text + x0, s->ev[k].end_text - x0);
    }
    if (ok) mem_note_worker(j, r, s->worker_id, s->exactness);
    j->ops->close(j, r, &s->tail); /* a dropped record is freed by its close */
    return ok;
}

/* The ended record of stream sid, whatever its credential; NULL if none. Under the mutex. */
static fe_jrec *ended_rec(mem_journal *m, const char *sid) {
    if (strlen(sid) != FE_STREAM_ID_LEN) return NULL;
    sweep(m, bt_now_ms());
    fe_jrec *r = bt_map_get(&m->recs, id_key(sid));
    return r && r->state == REC_ENDED && memcmp(r->s.stream_id, sid, FE_STREAM_ID_LEN) == 0 ? r : NULL;
}

bool fe_journal_mem_holds(fe_journal *j, const char *sid) {
    mem_journal *m = (mem_journal *)j;
    uv_mutex_lock(&m->mu);
    bool held = ended_rec(m, sid) != NULL;
    uv_mutex_unlock(&m->mu);
    return held;
}

void fe_journal_mem_forget(fe_journal *j, const char *sid) {
    mem_journal *m = (mem_journal *)j;
    uv_mutex_lock(&m->mu);
    fe_jrec *r = ended_rec(m, sid);
    if (r) rec_release(m, r);
    uv_mutex_unlock(&m->mu);
}

static const fe_journal_ops mem_ops = {.open = mem_open,
                                       .append = mem_append,
                                       .close = mem_close,
                                       .claim = mem_claim,
                                       .stats = mem_stats,
                                       .note_worker = mem_note_worker,
                                       .destroy = mem_destroy};

fe_journal *fe_journal_mem_new(double retention_s, uint64_t max_bytes) {
    mem_journal *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->pub.ops = &mem_ops;
    m->pub.retention_s = retention_s;
    m->pub.max_bytes = max_bytes;
    bt_map_init(&m->recs);
    TAILQ_INIT(&m->ended);
    bt_map_init(&m->tomb_map);
    TAILQ_INIT(&m->tombs);
    if (uv_mutex_init(&m->mu) != 0) {
        free(m);
        return NULL;
    }
    return &m->pub;
}
