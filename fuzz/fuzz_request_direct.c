/* fuzz_request_direct.c — differential libFuzzer driver for the REQUEST payload writer
 * (bt_request_encode, src/proto/request.c) given a pre-serialized body, as the frontend calls it
 * (src/frontend/migrate.c: body_json is the request's canonical form, bt_jcanon_dump).
 *
 * With body_json and ASCII-only strings the payload is written by hand (encode_direct); otherwise
 * jansson builds it and the body text is spliced in first. Both must give the same bytes: the
 * jansson payload of the same request without body_json (its body parsed back from the canonical
 * text, so that jansson writes that text again), with the body member moved to the front — as
 * tests/unit/test_request.c compares them. The worker-side decoder must then read the payload
 * back to the same request (body included, dumping to the same canonical text), or refuse it
 * exactly when a field is outside the format's contract (request.h).
 *
 * Input: a flags byte (bit 0 api, 1 max_tokens, 2 carried_text, 3 stream_key, 4 adopt,
 * 5 exactness, 6 raw: numbers and strings as given, possibly outside the contract, else mapped
 * into it, 7 body from the input, else a fixed one); then request_id, exactness, stream_key (a
 * length byte and the bytes each, the exactness's length counted in pairs of bytes), carried_text (two length bytes and the bytes), carried ids (a
 * count byte and 4 bytes each), max_tokens, seed, kv_state_bytes, priority (8, 8, 8, 4 bytes);
 * the rest is the body, parsed as the frontend parses one (json_loadb with JSON_ALLOW_NUL). Input
 * that runs out reads as zeros. A violated invariant aborts, so libFuzzer reports it like a
 * crash. Seeds are in fuzz/corpus/request_direct/; build and run with fuzz/build.sh. */
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "common/jcanon.h"
#include "proto/proto.h"
#include "proto/request.h"

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static uint8_t take8(input *in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

static uint64_t take_n(input *in, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v = v << 8 | take8(in);
    return v;
}

/* Up to want bytes of the input (fewer when it runs out) into out; their count. */
static size_t take_bytes(input *in, char *out, size_t want) {
    size_t k = want < in->n ? want : in->n;
    memcpy(out, in->p, k);
    in->p += k;
    in->n -= k;
    return k;
}

static bool utf8(const char *s, size_t n) {
    json_t *j = json_stringn(s, n); /* jansson's own check: the jansson path refuses what it refuses */
    json_decref(j);
    return j != NULL;
}

/* Aborts, showing both, unless the two byte strings are equal. */
static void same_bytes(const char *want, size_t wl, const char *got, size_t gl) {
    if (wl == gl && memcmp(want, got, wl) == 0) return;
    fprintf(stderr, "fuzz_request_direct: payloads differ\njansson: %.*s\nencode:  %.*s\n", (int)wl, want, (int)gl, got);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input in = {data, size};
    uint8_t fl = take8(&in);
    bool raw = fl & 64;

    /* ---- the fields ---- */
    char rid[256], exact[512], key[256], text[65536];
    size_t rid_len = take_bytes(&in, rid, take8(&in));
    rid[rid_len] = '\0';
    rid_len = strlen(rid); /* C strings: they end at a NUL */
    if (!raw) {
        if (rid_len > BT_REQUEST_ID_MAX) rid[rid_len = BT_REQUEST_ID_MAX] = '\0';
        if (!rid_len) rid[rid_len++] = 'r', rid[1] = '\0';
    }
    size_t ex_len = take_bytes(&in, exact, 2u * take8(&in)); /* up to 510: past BT_EXACTNESS_MAX */
    exact[ex_len] = '\0';
    size_t key_len = take_bytes(&in, key, take8(&in));
    key[key_len] = '\0';
    key_len = strlen(key);
    if (!raw) { /* 32 lower-case hex digits, whatever was given */
        for (size_t i = 0; i < BT_STREAM_KEY_LEN; i++) key[i] = "0123456789abcdef"[(i < key_len ? key[i] : 0) & 15];
        key[key_len = BT_STREAM_KEY_LEN] = '\0';
    }
    size_t text_len = take_bytes(&in, text, (size_t)take_n(&in, 2));
    size_t n_carried = take8(&in);
    uint32_t carried[255];
    for (size_t i = 0; i < n_carried; i++) carried[i] = (uint32_t)take_n(&in, 4);
    uint64_t max_tokens = take_n(&in, 8), seed = take_n(&in, 8), kv = take_n(&in, 8);
    uint32_t prio = (uint32_t)take_n(&in, 4);

    bt_request rq = {.request_id = rid,
                     .api = fl & 1 ? BT_API_COMPLETION : BT_API_CHAT,
                     .carried = n_carried ? carried : NULL,
                     .n_carried = n_carried,
                     .has_max_tokens = fl & 2,
                     .max_tokens = (int64_t)(raw ? max_tokens : max_tokens & INT64_MAX),
                     .carried_text = fl & 4 ? text : NULL,
                     .carried_text_len = fl & 4 ? text_len : 0,
                     .seed = raw ? seed : seed & INT64_MAX,
                     .priority = raw ? (int32_t)prio
                                     : (int32_t)(prio % (2u * BT_PRIORITY_LIMIT + 1)) - BT_PRIORITY_LIMIT,
                     .stream_key = fl & 8 ? key : NULL,
                     .adopt = fl & 16,
                     .kv_state_bytes = raw || kv == 0 ? kv : kv % BT_KV_STATE_MAX + 1,
                     .exactness = fl & 32 ? exact : NULL};
    /* within the format's contract (request.h): what the decoder must accept */
    size_t ex_c = strlen(exact);
    bool valid = rid_len >= 1 && rid_len <= BT_REQUEST_ID_MAX && (!rq.has_max_tokens || rq.max_tokens >= 0) &&
                 rq.seed <= (uint64_t)INT64_MAX && rq.priority >= -BT_PRIORITY_LIMIT &&
                 rq.priority <= BT_PRIORITY_LIMIT && rq.kv_state_bytes <= BT_KV_STATE_MAX &&
                 (!rq.exactness || ex_c <= BT_EXACTNESS_MAX);
    if (rq.stream_key) {
        valid = valid && key_len == BT_STREAM_KEY_LEN;
        for (size_t i = 0; i < key_len; i++) valid = valid && ((key[i] >= '0' && key[i] <= '9') || (key[i] >= 'a' && key[i] <= 'f'));
    }
    /* every string jansson can hold: else both paths refuse the request (NULL) */
    bool encodable = utf8(rid, rid_len) && (!rq.exactness || utf8(exact, ex_c)) && (!rq.stream_key || utf8(key, key_len)) &&
                     (!rq.carried_text || utf8(text, text_len));

    /* ---- the body, and its canonical text as the frontend makes it ---- */
    json_t *body = NULL;
    if (fl & 128) {
        body = json_loadb((const char *)in.p, in.n, JSON_ALLOW_NUL, NULL);
        if (!json_is_object(body)) json_decref(body), body = NULL;
    }
    if (!body) body = json_pack("{s:s,s:[{s:s,s:s}]}", "model", "m", "messages", "role", "user", "content", "Hi");
    CHECK(body != NULL);
    size_t canon_len = 0;
    char *canon = bt_jcanon_dump(body, in.n, &canon_len);
    CHECK(canon != NULL);
    /* the body as the jansson path will write it: parsed back from the canonical text (members in
     * its order), which json_dumps writes back to that text */
    json_t *body2 = json_loadb(canon, canon_len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, NULL);
    CHECK(body2 != NULL && json_equal(body, body2));
    char *again = json_dumps(body2, JSON_COMPACT);
    CHECK(again != NULL);
    same_bytes(canon, canon_len, again, strlen(again));
    free(again);

    /* ---- both paths ---- */
    rq.body = body;
    rq.body_json = canon;
    rq.body_json_len = canon_len;
    size_t got_len = 0;
    char *got = bt_request_encode(&rq, &got_len);
    rq.body = body2;
    rq.body_json = NULL;
    rq.body_json_len = 0;
    size_t viaj_len = 0;
    char *viaj = bt_request_encode(&rq, &viaj_len);
    rq.body = body;
    CHECK((viaj != NULL) == encodable);
    CHECK((got != NULL) == encodable);
    if (!encodable) goto done;
    CHECK(viaj_len == strlen(viaj) && got_len == strlen(got));
    /* the jansson payload is {"request_id":..,"api":..,"body":<canon>,"carried":..}: its body
     * member moved to the front is what the direct writer and the splice must both give. The
     * member is found as text: inside a JSON string '"' is always escaped, so ,"body": there is
     * the member itself. */
    size_t ml = 8 + canon_len;
    char *member = malloc(ml + 1);
    CHECK(member != NULL);
    memcpy(member, ",\"body\":", 8);
    memcpy(member + 8, canon, canon_len + 1);
    char *at = strstr(viaj, member);
    CHECK(at != NULL && at > viaj);
    size_t want_len = viaj_len; /* the same bytes, rearranged */
    char *want = malloc(want_len + 1);
    CHECK(want != NULL);
    char *w = want;
    memcpy(w, "{\"body\":", 8), w += 8;
    memcpy(w, canon, canon_len), w += canon_len;
    *w++ = ',';
    memcpy(w, viaj + 1, (size_t)(at - viaj - 1)), w += at - viaj - 1; /* request_id and api */
    memcpy(w, at + ml, viaj_len - (size_t)(at - viaj) - ml), w += viaj_len - (size_t)(at - viaj) - ml; /* ,"carried".. */
    CHECK((size_t)(w - want) == want_len);
    *w = '\0';
    same_bytes(want, want_len, got, got_len);
    free(want);
    free(member);

    /* ---- the worker's decoder reads it back ---- */
    bt_request_msg m;
    char err[256] = "";
    bt_status st = bt_request_decode(got, got_len, &m, err, sizeof err);
    if (!valid) {
        CHECK(st == BT_ERR_INVALID && err[0] != '\0');
        goto done;
    }
    if (st != BT_OK) {
        fprintf(stderr, "fuzz_request_direct: a valid payload refused: %s\n%s\n", err, got);
        abort();
    }
    const bt_request *d = &m.rq;
    CHECK(strcmp(d->request_id, rid) == 0);
    CHECK(d->api == rq.api);
    CHECK(json_equal((json_t *)d->body, body));
    size_t dl = 0;
    char *dcanon = bt_jcanon_dump(d->body, 0, &dl);
    CHECK(dcanon != NULL);
    same_bytes(canon, canon_len, dcanon, dl);
    free(dcanon);
    CHECK(d->n_carried == n_carried && (!n_carried || memcmp(d->carried, carried, n_carried * sizeof *carried) == 0));
    CHECK(d->has_max_tokens == rq.has_max_tokens && (!rq.has_max_tokens || d->max_tokens == rq.max_tokens));
    CHECK((d->carried_text != NULL) == (rq.carried_text != NULL));
    CHECK(!rq.carried_text || (d->carried_text_len == text_len && memcmp(d->carried_text, text, text_len) == 0));
    CHECK(d->seed == rq.seed);
    CHECK(d->priority == rq.priority);
    CHECK((d->stream_key != NULL) == (rq.stream_key != NULL) && (!rq.stream_key || strcmp(d->stream_key, key) == 0));
    CHECK(d->adopt == (rq.stream_key && rq.adopt));
    CHECK(d->kv_state_bytes == rq.kv_state_bytes);
    bool has_ex = rq.exactness && rq.exactness[0];
    CHECK((d->exactness != NULL) == has_ex && (!has_ex || strcmp(d->exactness, exact) == 0));
    bt_request_msg_free(&m);
done:
    free(got);
    free(viaj);
    json_decref(body2);
    free(canon);
    json_decref(body);
    return 0;
}
