/* fuzz_jcanon.c — differential libFuzzer driver for the hand-written canonical JSON writer
 * (bt_jcanon_dump and bt_jcanon_str, src/common/jcanon.c) against jansson's own dumper.
 *
 * bt_jcanon_dump(v) must be exactly json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS): the frontend
 * hashes that form for the resume digest, so one differing byte makes a resume of a request
 * journaled by another build of the frontend fail. The first input byte is a mode:
 *   bit 0 (JSON_DECODE_ANY), bit 1 (JSON_ALLOW_NUL), bit 2 (JSON_REJECT_DUPLICATES): the flags the
 *     rest of the input is parsed with by json_loadb (the frontend parses bodies with
 *     JSON_ALLOW_NUL); whatever parses is dumped both ways and the bytes must be equal, and a
 *     value json_dumps refuses (a bare scalar, without JSON_ENCODE_ANY) must be refused by
 *     bt_jcanon_dump too;
 *   bit 3: the rest is instead taken as the bytes of one string (when it is valid UTF-8, as every
 *     jansson string is): bt_jcanon_str must write it as json_dumps writes that string, and an
 *     object holding it as a key (the parser refuses a key with U+0000; json_object_setn makes
 *     one), next to keys that are its prefixes and extensions, must dump the same both ways, so
 *     that the key sort sees arbitrary bytes;
 *   bit 4: the size hint bt_jcanon_dump gets is the input's length (as fe_request_start passes
 *     the body's), else 0.
 * Every value dumped is also dumped by value (bt_jcanon_dump_values, what a resume compares
 * re-POSTed bodies by): it must be exactly json_dumps of the same value with each integral real
 * within ±2^53 replaced by the integer it equals, and refused exactly when bt_jcanon_dump is.
 * A difference prints both outputs and aborts, so libFuzzer reports it like a crash. Seeds are in
 * fuzz/corpus/jcanon/; build and run with fuzz/build.sh. */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "common/jcanon.h"
#include "common/util.h"

/* Aborts, showing both, unless got[0..got_len) is want (a NUL-terminated json_dumps output). */
static void same_bytes(const char *what, const char *want, const char *got, size_t got_len) {
    if (strlen(want) == got_len && memcmp(want, got, got_len) == 0) return;
    fprintf(stderr, "fuzz_jcanon: %s differs\njson_dumps: %s\njcanon:     %.*s\n", what, want, (int)got_len, got);
    abort();
}

/* v with every integral real within ±2^53 made the integer it equals (a new reference): the value
 * whose json_dumps bt_jcanon_dump_values must give. */
static json_t *integral_reals_as_integers(json_t *v) {
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == trunc(d) && fabs(d) <= 9007199254740992.0) return json_integer((json_int_t)d);
    }
    if (json_is_array(v)) {
        json_t *a = json_array();
        CHECK(a != NULL);
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) CHECK(json_array_append_new(a, integral_reals_as_integers(x)) == 0);
        return a;
    }
    if (json_is_object(v)) {
        json_t *o = json_object();
        CHECK(o != NULL);
        const char *k;
        size_t kl;
        json_t *x;
        json_object_keylen_foreach(v, k, kl, x)
            CHECK(json_object_setn_new_nocheck(o, k, kl, integral_reals_as_integers(x)) == 0);
        return o;
    }
    return json_incref(v);
}

static void check_values(const json_t *v, size_t hint) {
    json_t *ints = integral_reals_as_integers((json_t *)v);
    char *want = json_dumps(ints, JSON_COMPACT | JSON_SORT_KEYS);
    size_t len = 0;
    char *got = bt_jcanon_dump_values(v, hint, &len);
    if (!want) {
        CHECK(got == NULL);
    } else {
        CHECK(got != NULL);
        CHECK(got[len] == '\0');
        same_bytes("bt_jcanon_dump_values", want, got, len);
    }
    free(want);
    free(got);
    json_decref(ints);
}

/* v dumped both ways: the same bytes, or both refused; and by value (check_values). */
static void check_dump(const json_t *v, size_t hint) {
    check_values(v, hint);
    char *want = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
    size_t len = 0;
    char *got = bt_jcanon_dump(v, hint, &len);
    if (!want) {
        /* json_dumps refuses only a bare scalar here (a parsed value has no cycle, no NaN) */
        CHECK(!json_is_object(v) && !json_is_array(v));
        CHECK(got == NULL);
        return;
    }
    CHECK(got != NULL);
    CHECK(got[len] == '\0');
    same_bytes("bt_jcanon_dump", want, got, len);
    free(want);
    free(got);
}

static void check_string(const char *s, size_t n, size_t hint) {
    json_t *js = json_stringn(s, n);
    if (!js) return; /* not valid UTF-8: no jansson string holds it */
    char *want = json_dumps(js, JSON_COMPACT | JSON_ENCODE_ANY);
    CHECK(want != NULL);
    bt_buf b;
    bt_buf_init(&b, (size_t)1 << 30);
    CHECK(bt_jcanon_str(&b, s, n) == BT_OK);
    CHECK(b.data[b.len] == '\0');
    same_bytes("bt_jcanon_str", want, b.data, b.len);
    bt_buf_free(&b);
    free(want);

    /* the same bytes as a key, among its prefixes and extensions, and as a value */
    json_t *o = json_object();
    CHECK(o != NULL);
    CHECK(json_object_setn_new_nocheck(o, s, n, json_incref(js)) == 0);
    for (size_t k = 0; k < n && k < 4; k++) /* prefixes cut between characters: valid UTF-8 too */
        if (((unsigned char)s[k] & 0xC0) != 0x80)
            CHECK(json_object_setn_new_nocheck(o, s, k, json_integer((json_int_t)k)) == 0);
    char *longer = malloc(n + 1);
    CHECK(longer != NULL);
    memcpy(longer, s, n);
    longer[n] = '\0'; /* U+0000 after it: sorts after s, before any other extension */
    CHECK(json_object_setn_new_nocheck(o, longer, n + 1, json_null()) == 0);
    longer[n] = 'z';
    CHECK(json_object_setn_new_nocheck(o, longer, n + 1, json_array()) == 0);
    free(longer);
    json_t *arr = json_pack("[O,O,{}]", js, o);
    CHECK(arr != NULL);
    check_dump(o, hint);
    check_dump(arr, hint);
    json_decref(arr);
    json_decref(o);
    json_decref(js);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t mode = data[0];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    size_t hint = (mode & 16) ? len : 0;
    if (mode & 8) {
        check_string(text, len, hint);
        return 0;
    }
    size_t flags = 0;
    if (mode & 1) flags |= JSON_DECODE_ANY;
    if (mode & 2) flags |= JSON_ALLOW_NUL;
    if (mode & 4) flags |= JSON_REJECT_DUPLICATES;
    json_error_t jerr;
    json_t *v = json_loadb(text, len, flags, &jerr);
    if (!v) return 0;
    check_dump(v, hint);
    json_decref(v);
    return 0;
}
