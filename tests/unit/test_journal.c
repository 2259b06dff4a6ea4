/* test_journal.c — unit tests of the in-process stream journal (src/frontend/journal.c) and of
 * the event-id parser of resumable streams (fe_resume_parse_id, src/frontend/resume.c).
 *
 * Covers: a record's round trip (open, appends, close, claim gives back exactly what was
 * appended, with event boundaries and the tail); a claim while the stream is live reports its
 * shard; a claim with another credential or a wrong id finds nothing; expiry after the retention
 * window; the size cap (ended records evicted oldest first, the accounted bytes never above the
 * cap, a new record refused and a live record dropped when nothing can be evicted, and a claim of
 * a dropped one told so, for the retention and within a bounded number of tombstones); journaling
 * off with retention 0; stream ids are 32 hex digits and differ; and every accepted and refused
 * form of an event id. Also: the worker noted for a stream comes back with its claim, and a record
 * imported whole (as the shared journal does with a stream fetched from JetStream) is claimed
 * exactly as it was, bound to its credential, once only under its id; a fingerprint that cannot be
 * copied leaves a running record its output and makes it unresumable at its close. And the body digest a resume
 * compares (SHA-256 of the canonical body) against the standard's test vectors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "frontend/fe.h"

/* strndup made to fail on demand (the journal copies a stream's exactness fingerprint with it):
 * this definition takes the place of the C library's in this program */
static bool strndup_fails;
char *strndup(const char *s, size_t n) {
    if (strndup_fails) return NULL;
    size_t l = strnlen(s, n);
    char *p = malloc(l + 1);
    if (p) {
        memcpy(p, s, l);
        p[l] = '\0';
    }
    return p;
}

static const uint8_t key_a[FE_KEY_MAC_LEN] = {1};
static const uint8_t key_b[FE_KEY_MAC_LEN] = {2};

static fe_jrec *open_rec(fe_journal *j, fe_jsnap *meta, const char *body) {
    memset(meta, 0, sizeof *meta);
    meta->api = BT_API_CHAT;
    meta->body = (char *)body;
    meta->body_len = strlen(body);
    meta->max_tokens = 100;
    snprintf(meta->rid, sizeof meta->rid, "rid-1");
    snprintf(meta->model, sizeof meta->model, "m");
    return fe_journal_open(j, meta, key_a, 0);
}

static void test_roundtrip(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(60, 1 << 20);
    fe_jsnap meta;
    fe_jrec *r = open_rec(j, &meta, "{\"model\":\"m\"}");
    assert_non_null(r);
    assert_int_equal(strlen(meta.stream_id), FE_STREAM_ID_LEN);
    uint32_t a[] = {5, 6}, b[] = {7};
    assert_true(fe_journal_append(j, r, a, 2, "ab", 2));
    assert_true(fe_journal_append(j, r, b, 1, "cde", 3));
    fe_jsnap out;
    fe_jrec *h = NULL;
    int shard = -1;
    /* live: reported with its shard, not handed out */
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 1, &out, &h, &shard), FE_CLAIM_LIVE);
    assert_int_equal(shard, 0);
    fe_jtail t = {.kind = FE_JTAIL_FINISH, .prompt_tokens = 4, .completion_tokens = 3};
    snprintf(t.finish, sizeof t.finish, "length");
    fe_journal_close(j, r, &t);
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.live, 0);
    assert_int_equal(st.ended, 1);
    /* another credential, another id: nothing */
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_b, 1, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    char other[FE_STREAM_ID_LEN + 1];
    memcpy(other, meta.stream_id, sizeof other);
    other[FE_STREAM_ID_LEN - 1] = other[FE_STREAM_ID_LEN - 1] == '0' ? '1' : '0';
    assert_int_equal(fe_journal_claim(j, other, key_a, 1, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    assert_int_equal(fe_journal_claim(j, "short", key_a, 1, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 1, &out, &h, &shard), FE_CLAIM_OK);
    assert_non_null(h);
    assert_string_equal(out.body, "{\"model\":\"m\"}");
    assert_string_equal(out.rid, "rid-1");
    assert_int_equal(out.nids, 3);
    assert_int_equal(out.ids[0], 5);
    assert_int_equal(out.ids[2], 7);
    assert_int_equal(out.text_len, 5);
    assert_memory_equal(out.text, "abcde", 5);
    assert_int_equal(out.nev, 2);
    assert_int_equal(out.ev[0].end_tok, 2);
    assert_int_equal(out.ev[0].end_text, 2);
    assert_int_equal(out.ev[1].end_tok, 3);
    assert_int_equal(out.ev[1].end_text, 5);
    assert_int_equal(out.tail.kind, FE_JTAIL_FINISH);
    assert_string_equal(out.tail.finish, "length");
    assert_int_equal(out.tail.completion_tokens, 3);
    fe_jsnap_free(&out);
    /* claimed: live again until closed; appends continue the same record */
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 1, &out, &h, &shard), FE_CLAIM_LIVE);
    assert_int_equal(shard, 1);
    assert_true(fe_journal_append(j, h, b, 1, "f", 1));
    fe_jtail none = {0};
    fe_journal_close(j, h, &none);
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_OK);
    assert_int_equal(out.nids, 4);
    assert_int_equal(out.nev, 3);
    assert_int_equal(out.tail.kind, FE_JTAIL_NONE);
    fe_jsnap_free(&out);
    fe_journal_close(j, h, &none);
    fe_journal_destroy(j);
}

static void test_expiry(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(0.2, 1 << 20);
    fe_jsnap meta;
    fe_jrec *r = open_rec(j, &meta, "{}");
    uint32_t a[] = {1};
    assert_true(fe_journal_append(j, r, a, 1, "x", 1));
    fe_jtail none = {0};
    fe_journal_close(j, r, &none);
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.ended, 1);
    usleep(300 * 1000);
    fe_jsnap out;
    fe_jrec *h;
    int shard;
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.ended, 0);
    assert_int_equal(st.bytes, 0);
    assert_int_equal(st.evicted_expired, 1);
    fe_journal_destroy(j);
}

/* A stream whose record the cap dropped, at its close: its tombstone answers FE_CLAIM_DROPPED for
 * the retention, at most 4096 of them (TOMB_MAX in journal.c), the oldest going first. */
static void test_tombstones(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(0.3, 8192);
    enum { N = 4096 + 1 };
    static char sids[N][FE_STREAM_ID_LEN + 1];
    uint32_t ids[64] = {0};
    char text[256] = {0};
    fe_jtail none = {0};
    for (int k = 0; k < N; k++) {
        fe_jsnap meta;
        fe_jrec *r = open_rec(j, &meta, "{}");
        assert_non_null(r);
        memcpy(sids[k], meta.stream_id, sizeof sids[k]);
        int n = 0;
        while (fe_journal_append(j, r, ids, 64, text, sizeof text)) assert_true(++n < 100);
        fe_journal_close(j, r, &none);
    }
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.dropped_live, N);
    assert_int_equal(st.bytes, 0);
    fe_jsnap out;
    fe_jrec *h;
    int shard;
    assert_int_equal(fe_journal_claim(j, sids[0], key_a, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND); /* the oldest */
    assert_int_equal(fe_journal_claim(j, sids[1], key_a, 0, &out, &h, &shard), FE_CLAIM_DROPPED);
    assert_int_equal(fe_journal_claim(j, sids[N - 1], key_a, 0, &out, &h, &shard), FE_CLAIM_DROPPED);
    usleep(400 * 1000);
    assert_int_equal(fe_journal_claim(j, sids[N - 1], key_a, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    fe_journal_destroy(j);
}

static void test_size_cap(void **state) {
    (void)state;
    const uint64_t cap = 8192;
    fe_journal *j = fe_journal_mem_new(60, cap);
    fe_jsnap m1, m2, m3;
    uint32_t ids[64];
    char text[256];
    for (uint32_t i = 0; i < 64; i++) ids[i] = i * 7 + 1;
    for (size_t i = 0; i < sizeof text; i++) text[i] = (char)('a' + i % 26);
    fe_jtail none = {0};
    fe_jrec *r1 = open_rec(j, &m1, "{}");
    assert_true(fe_journal_append(j, r1, ids, 64, text, 256));
    fe_journal_close(j, r1, &none);
    fe_jrec *r2 = open_rec(j, &m2, "{}");
    assert_true(fe_journal_append(j, r2, ids, 64, text, 256));
    fe_journal_close(j, r2, &none);
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_true(st.bytes <= cap);
    /* a live record that outgrows what is left: the ended ones go first, oldest first */
    fe_jrec *r3 = open_rec(j, &m3, "{}");
    assert_non_null(r3);
    bool ok = true;
    int appended = 0;
    const uint32_t *vi;
    const char *vt;
    size_t vn, vl;
    while (ok && appended < 100) {
        ok = fe_journal_append(j, r3, ids, 64, text, 256);
        fe_journal_stats_get(j, &st);
        assert_true(st.bytes <= cap);
        appended += ok;
        if (!ok) break;
        /* its owner reads what it appended, in place */
        assert_true(fe_jrec_output(r3, &vi, &vn, &vt, &vl));
        assert_int_equal(vn, 64 * (size_t)appended);
        assert_int_equal(vl, 256 * (size_t)appended);
        for (int k = 0; k < appended; k++) {
            assert_memory_equal(vi + 64 * k, ids, sizeof ids);
            assert_memory_equal(vt + 256 * k, text, sizeof text);
        }
    }
    assert_false(ok); /* it alone outgrew the cap: dropped */
    assert_true(appended >= 1);
    /* dropped: no longer read in place; what it held goes back to the owner, exactly */
    assert_false(fe_jrec_output(r3, &vi, &vn, &vt, &vl));
    uint32_t *ti;
    char *tt;
    size_t tn, tl;
    fe_jrec_take_output(r3, &ti, &tn, &tt, &tl);
    assert_int_equal(tn, 64 * (size_t)appended);
    assert_int_equal(tl, 256 * (size_t)appended);
    for (int k = 0; k < appended; k++) {
        assert_memory_equal(ti + 64 * k, ids, sizeof ids);
        assert_memory_equal(tt + 256 * k, text, sizeof text);
    }
    free(ti);
    free(tt);
    fe_jrec_take_output(r3, &ti, &tn, &tt, &tl); /* taken once: nothing the second time */
    assert_null(ti);
    assert_null(tt);
    assert_int_equal(tn + tl, 0);
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.evicted_size, 2);
    assert_int_equal(st.dropped_live, 1);
    assert_int_equal(st.live, 0);
    fe_jsnap out;
    fe_jrec *h;
    int shard;
    assert_int_equal(fe_journal_claim(j, m1.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    /* the dropped stream, while its request runs and after it ended: said to its own credential */
    assert_int_equal(fe_journal_claim(j, m3.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_DROPPED);
    assert_int_equal(fe_journal_claim(j, m3.stream_id, key_b, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    fe_journal_close(j, r3, &none); /* frees the dropped record */
    assert_int_equal(fe_journal_claim(j, m3.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_DROPPED);
    assert_int_equal(fe_journal_claim(j, m3.stream_id, key_b, 0, &out, &h, &shard), FE_CLAIM_NOT_FOUND);
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.bytes, 0);
    /* a cap too small for an empty record: refused */
    fe_journal *tiny = fe_journal_mem_new(60, 16);
    assert_null(open_rec(tiny, &m1, "{}"));
    fe_journal_stats_get(tiny, &st);
    assert_int_equal(st.refused_full, 1);
    fe_journal_destroy(tiny);
    fe_journal_destroy(j);
}

/* Opens a record for m; st->bytes is what the open added to the journal's accounting. */
static fe_jrec *open_counted(fe_journal *j, fe_jsnap *m, fe_journal_stats *st) {
    fe_journal_stats before;
    fe_journal_stats_get(j, &before);
    fe_jrec *r = fe_journal_open(j, m, key_a, 0);
    assert_non_null(r);
    fe_journal_stats_get(j, st);
    st->bytes -= before.bytes;
    return r;
}

/* A record opens with room for its max_tokens (up to 64 tokens, 8 bytes of text each), accounted
 * at once: appends within it do not change the accounted bytes (no growth, no lock); past it the
 * arrays grow and the growth is accounted; at the end what was not used is given back. */
static void test_reserved_room(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(60, 1 << 20);
    fe_jsnap meta;
    fe_journal_stats st0, st;
    fe_jrec *r = open_rec(j, &meta, "{}"); /* max_tokens 100: room for 64 */
    assert_non_null(r);
    fe_journal_stats_get(j, &st0);
    assert_true(st0.bytes >= 64 * (sizeof(uint32_t) + 8 + sizeof(fe_jevent)));
    const uint64_t open64 = st0.bytes; /* the journal was empty: this record's bytes at open */
    const size_t per_tok = sizeof(uint32_t) + 8 + sizeof(fe_jevent);
    uint32_t id = 9;
    for (int k = 0; k < 64; k++) assert_true(fe_journal_append(j, r, &id, 1, "abcdefgh", 8));
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.bytes, st0.bytes); /* within the room: nothing grew */
    assert_true(fe_journal_append(j, r, &id, 1, "x", 1));
    fe_journal_stats_get(j, &st);
    assert_true(st.bytes > st0.bytes); /* the 65th token: grown, and accounted */
    fe_jtail none = {0};
    fe_journal_close(j, r, &none);
    fe_journal_stats_get(j, &st);
    /* ended: exactly what it holds (65 ids, 513 bytes of text, 65 events), nothing reserved */
    assert_int_equal(st.bytes, st0.bytes - 64 * (sizeof(uint32_t) + 8 + sizeof(fe_jevent)) +
                                   65 * (sizeof(uint32_t) + sizeof(fe_jevent)) + 513);
    /* a short stream: room for its max_tokens only (the same record as above with 61 tokens
     * less room); without a limit (max_tokens -1, as the frontend passes it), room for 16 */
    fe_jsnap m2;
    memset(&m2, 0, sizeof m2);
    m2.body = "{}";
    m2.body_len = 2;
    m2.max_tokens = -1;
    fe_jrec *r3 = open_counted(j, &m2, &st0);
    assert_int_equal(st0.bytes, open64 - 48 * per_tok);
    fe_journal_close(j, r3, &none);
    /* max_tokens 0 is a request for no token (accepted, answered with finish_reason "length"):
     * no room at all */
    m2.max_tokens = 0;
    r3 = open_counted(j, &m2, &st0);
    assert_int_equal(st0.bytes, open64 - 64 * per_tok);
    fe_journal_close(j, r3, &none);
    m2.max_tokens = 3;
    fe_jrec *r2 = open_counted(j, &m2, &st0);
    assert_int_equal(st0.bytes, open64 - 61 * per_tok);
    fe_journal_stats_get(j, &st0);
    assert_true(fe_journal_append(j, r2, &id, 1, "ab", 2));
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.bytes, st0.bytes);
    fe_journal_close(j, r2, &none);
    fe_journal_destroy(j);
}

static void test_off_and_ids(void **state) {
    (void)state;
    fe_journal *off = fe_journal_mem_new(0, 1 << 20);
    fe_jsnap m;
    assert_null(open_rec(off, &m, "{}"));
    fe_journal_destroy(off);
    fe_journal *j = fe_journal_mem_new(60, 1 << 20);
    fe_jsnap a, b;
    fe_jrec *ra = open_rec(j, &a, "{}"), *rb = open_rec(j, &b, "{}");
    assert_string_not_equal(a.stream_id, b.stream_id);
    for (int i = 0; i < FE_STREAM_ID_LEN; i++) assert_non_null(strchr("0123456789abcdef", a.stream_id[i]));
    fe_jtail none = {0};
    fe_journal_close(j, ra, &none);
    fe_journal_close(j, rb, &none);
    fe_journal_destroy(j);
}

static void test_worker_and_import(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(60, 1 << 20);
    fe_jsnap meta;
    fe_jrec *r = open_rec(j, &meta, "{\"model\":\"m\"}");
    assert_non_null(r);
    uint32_t a[] = {5, 6}, b[] = {7};
    assert_true(fe_journal_append(j, r, a, 2, "ab", 2));
    /* the record keeps the last fingerprint noted (kept out of line, replaced when it changes) */
    fe_journal_note_worker(j, r, 0x99, "an earlier fingerprint, longer than the one after it");
    fe_journal_note_worker(j, r, 0x98, "");
    fe_journal_note_worker(j, r, 0x1234, "llama-0.4.0 cpu=x threads=1");
    fe_journal_note_worker(j, r, 0x1234, "llama-0.4.0 cpu=x threads=1");
    assert_true(fe_journal_append(j, r, b, 1, "cde", 3));
    fe_jtail none = {0};
    fe_journal_close(j, r, &none);
    fe_jsnap out;
    fe_jrec *h = NULL;
    int shard = -1;
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_OK);
    assert_int_equal(out.worker_id, 0x1234);
    assert_string_equal(out.exactness, "llama-0.4.0 cpu=x threads=1");
    fe_journal_close(j, h, &out.tail);
    /* the whole record into another store, as fetched from elsewhere */
    fe_journal *k = fe_journal_mem_new(60, 1 << 20);
    assert_true(fe_journal_mem_import(k, &out, key_b));
    assert_false(fe_journal_mem_import(k, &out, key_b)); /* the id is held already */
    fe_jsnap got;
    assert_int_equal(fe_journal_claim(k, out.stream_id, key_a, 0, &got, &h, &shard), FE_CLAIM_NOT_FOUND);
    assert_int_equal(fe_journal_claim(k, out.stream_id, key_b, 0, &got, &h, &shard), FE_CLAIM_OK);
    assert_string_equal(got.stream_id, out.stream_id);
    assert_string_equal(got.body, out.body);
    assert_int_equal(got.nids, 3);
    assert_memory_equal(got.ids, out.ids, 3 * sizeof(uint32_t));
    assert_int_equal(got.text_len, 5);
    assert_memory_equal(got.text, "abcde", 5);
    assert_int_equal(got.nev, 2);
    assert_int_equal(got.ev[0].end_tok, 2);
    assert_int_equal(got.ev[1].end_text, 5);
    assert_int_equal(got.worker_id, 0x1234);
    assert_string_equal(got.exactness, "llama-0.4.0 cpu=x threads=1");
    assert_int_equal(got.tail.kind, FE_JTAIL_NONE);
    fe_journal_close(k, h, &got.tail);
    fe_jsnap_free(&got);
    fe_jsnap_free(&out);
    fe_journal_destroy(k);
    fe_journal_destroy(j);
}

static void test_parse_id(void **state) {
    (void)state;
    const char *sid = "0123456789abcdef0123456789abcdef";
    char id[80], got[FE_STREAM_ID_LEN + 1];
    uint64_t pos;
    int mark;
    struct {
        const char *suffix;
        uint64_t pos;
        int mark;
    } good[] = {{":0", 0, FE_MARK_NONE},       {":17", 17, FE_MARK_NONE},        {":4294967295", 4294967295u, 0},
                {":5:end", 5, FE_MARK_END},    {":5:usage", 5, FE_MARK_USAGE},   {":5:done", 5, FE_MARK_DONE},
                {":5:error", 5, FE_MARK_ERROR}};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        snprintf(id, sizeof id, "%s%s", sid, good[i].suffix);
        assert_true(fe_resume_parse_id(id, got, &pos, &mark));
        assert_string_equal(got, sid);
        assert_int_equal(pos, good[i].pos);
        assert_int_equal(mark, good[i].mark);
    }
    const char *bad_suffix[] = {"", ":", ":x", ":-1", ":01", ":4294967296", ":12345678901", ":5:", ":5:fin",
                                ":5:end:", ":5 ", " :5", ":5:END"};
    for (size_t i = 0; i < sizeof bad_suffix / sizeof bad_suffix[0]; i++) {
        snprintf(id, sizeof id, "%s%s", sid, bad_suffix[i]);
        assert_false(fe_resume_parse_id(id, got, &pos, &mark));
    }
    const char *bad[] = {NULL, "", "0123456789ABCDEF0123456789abcdef:1", "0123456789abcdef0123456789abcde:1",
                         "0123456789abcdef0123456789abcdef0:1", "g123456789abcdef0123456789abcdef:1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) assert_false(fe_resume_parse_id(bad[i], got, &pos, &mark));
}

/* The body digest of a resume (fe_body_digest_canon): SHA-256 in lower-case hex, checked against
 * the FIPS 180-2 vectors ("abc", the empty string, the two-block message), and fe_body_digest of a
 * parsed body equal to the digest of its canonical text. */
static void test_body_digest(void **state) {
    (void)state;
    char out[65];
    fe_body_digest_canon("abc", 3, out);
    assert_string_equal(out, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    fe_body_digest_canon("", 0, out);
    assert_string_equal(out, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    fe_body_digest_canon(two, strlen(two), out);
    assert_string_equal(out, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    json_t *body = json_loads("{ \"model\": \"m\", \"a\": [1, \"x\"] }", 0, NULL);
    char want[65];
    const char *canon = "{\"a\":[1,\"x\"],\"model\":\"m\"}";
    fe_body_digest_canon(canon, strlen(canon), want);
    assert_true(fe_body_digest(body, out));
    assert_string_equal(out, want);
    json_decref(body);
}

/* No memory for a stream's fingerprint (fe_journal_note_worker, at an attempt's dispatch): the
 * record must not be resumed without it, but while its stream runs it still holds the request's
 * only copy of the output, which the next migration carries (fe_request_output): it stays live
 * until its owner closes it, and only then is dropped, accounted as such. A fingerprint noted
 * successfully afterwards makes it resumable again. */
static void test_fingerprint_nomem(void **state) {
    (void)state;
    fe_journal *j = fe_journal_mem_new(60, 1 << 20);
    fe_jsnap meta;
    fe_jrec *r = open_rec(j, &meta, "{}");
    assert_non_null(r);
    uint32_t a[] = {5, 6};
    assert_true(fe_journal_append(j, r, a, 2, "ab", 2));
    strndup_fails = true;
    fe_journal_note_worker(j, r, 7, "llama-0.4.0 cpu=x threads=1");
    strndup_fails = false;
    const uint32_t *ids;
    const char *text;
    size_t nids, text_len;
    assert_true(fe_jrec_output(r, &ids, &nids, &text, &text_len)); /* still the owner's output */
    assert_int_equal(nids, 2);
    assert_memory_equal(ids, a, sizeof a);
    assert_memory_equal(text, "ab", 2);
    uint32_t b[] = {7};
    assert_true(fe_journal_append(j, r, b, 1, "c", 1));
    fe_journal_stats st;
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.live, 1);
    assert_int_equal(st.dropped_live, 0);
    fe_jtail none = {0};
    fe_journal_close(j, r, &none);
    fe_journal_stats_get(j, &st);
    assert_int_equal(st.dropped_live, 1); /* dropped at its close: never resumable without it */
    assert_int_equal(st.live, 0);
    assert_int_equal(st.ended, 0);
    assert_int_equal(st.bytes, 0);
    fe_jsnap out;
    fe_jrec *h = NULL;
    int shard = -1;
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_DROPPED);
    /* the copy failed, then a later attempt's note succeeded: resumable, with it */
    r = open_rec(j, &meta, "{}");
    assert_non_null(r);
    strndup_fails = true;
    fe_journal_note_worker(j, r, 7, "fp-1");
    strndup_fails = false;
    fe_journal_note_worker(j, r, 8, "fp-2");
    assert_true(fe_journal_append(j, r, b, 1, "c", 1));
    fe_journal_close(j, r, &none);
    assert_int_equal(fe_journal_claim(j, meta.stream_id, key_a, 0, &out, &h, &shard), FE_CLAIM_OK);
    assert_string_equal(out.exactness, "fp-2");
    fe_journal_close(j, h, &out.tail);
    fe_jsnap_free(&out);
    fe_journal_destroy(j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip), cmocka_unit_test(test_expiry), cmocka_unit_test(test_size_cap), cmocka_unit_test(test_tombstones), cmocka_unit_test(test_reserved_room),
        cmocka_unit_test(test_off_and_ids), cmocka_unit_test(test_parse_id), cmocka_unit_test(test_worker_and_import),
        cmocka_unit_test(test_fingerprint_nomem),
        cmocka_unit_test(test_body_digest),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
