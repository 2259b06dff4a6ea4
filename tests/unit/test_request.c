/* test_request.c — unit tests of the REQUEST payload codec (src/proto/request.c).
 *
 * Covers: a round trip of a first attempt (no carried tokens, no max_tokens) and of a
 * continuation (carried ids at the edges of their range, max_tokens, carried text with a NUL and
 * multi-byte UTF-8, the most urgent priority); a body given already serialized, whose payload is written
 * directly and must be the jansson path's bytes for every combination of members; the exact members the encoder writes; every malformed payload the decoder must
 * refuse, each with its reason; unknown members ignored; and a loop over truncations of a valid
 * payload, each in an exactly-sized heap block, so that AddressSanitizer catches a read past the
 * end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "proto/proto.h"
#include "proto/request.h"

static bt_request_msg decode_ok(const char *p, size_t n) {
    bt_request_msg m;
    char err[256] = "";
    bt_status st = bt_request_decode(p, n, &m, err, sizeof err);
    if (st != BT_OK) fail_msg("decode failed: %s", err);
    return m;
}

static void test_first_attempt_roundtrip(void **state) {
    (void)state;
    json_t *body = json_pack("{s:s, s:[{s:s, s:s}], s:b}", "model", "m", "messages", "role", "user", "content", "Hi",
                             "stream", 1);
    bt_request rq = {.request_id = "req-1", .api = BT_API_CHAT, .body = body};
    size_t len = 0;
    char *p = bt_request_encode(&rq, &len);
    assert_non_null(p);
    assert_int_equal(len, strlen(p));
    /* a first attempt says nothing of max_tokens: the engine's default applies */
    assert_null(strstr(p, "max_tokens"));
    assert_null(strstr(p, "carried_text"));
    assert_null(strstr(p, "priority")); /* the default priority is not sent */
    bt_request_msg m = decode_ok(p, len);
    assert_string_equal(m.rq.request_id, "req-1");
    assert_int_equal(m.rq.api, BT_API_CHAT);
    assert_true(json_equal((json_t *)m.rq.body, body));
    assert_int_equal(m.rq.n_carried, 0);
    assert_false(m.rq.has_max_tokens);
    assert_null(m.rq.carried_text);
    assert_true(m.rq.seed == 0);
    assert_null(strstr(p, "seed"));
    assert_int_equal(m.rq.priority, 0);
    assert_null(m.rq.stream_key);
    assert_false(m.rq.adopt);
    assert_true(m.rq.kv_state_bytes == 0);
    assert_null(strstr(p, "stream_key"));
    assert_null(m.rq.exactness);
    assert_null(strstr(p, "exactness"));
    bt_request_msg_free(&m);
    bt_request_msg_free(&m); /* a freed message frees again as nothing */
    free(p);
    json_decref(body);
}

static void test_continuation_roundtrip(void **state) {
    (void)state;
    json_t *body = json_pack("{s:s, s:s}", "model", "m", "prompt", "Once");
    uint32_t ids[] = {0, 1, 4294967295u, 42};
    static const char text[] = "a\0b \xc3\xa9 \xe2\x82\xac \"q\"\n";
    bt_request rq = {.request_id = "cmpl-x.y:z_1",
                     .api = BT_API_COMPLETION,
                     .body = body,
                     .carried = ids,
                     .n_carried = 4,
                     .has_max_tokens = true,
                     .max_tokens = 123456,
                     .carried_text = text,
                     .carried_text_len = sizeof text - 1,
                     .seed = 0x7fffffffffffffffull,
                     .priority = -BT_PRIORITY_LIMIT,
                     .stream_key = "0123456789abcdef0123456789abcdef",
                     .adopt = true,
                     .kv_state_bytes = BT_KV_STATE_MAX,
                     .exactness = "llama cpu=libggml-cpu-haswell.so threads=2"};
    size_t len = 0;
    char *p = bt_request_encode(&rq, &len);
    assert_non_null(p);
    bt_request_msg m = decode_ok(p, len);
    assert_string_equal(m.rq.request_id, rq.request_id);
    assert_int_equal(m.rq.api, BT_API_COMPLETION);
    assert_int_equal(m.rq.n_carried, 4);
    assert_memory_equal(m.rq.carried, ids, sizeof ids);
    assert_true(m.rq.has_max_tokens);
    assert_int_equal(m.rq.max_tokens, 123456);
    assert_int_equal(m.rq.carried_text_len, sizeof text - 1);
    assert_memory_equal(m.rq.carried_text, text, sizeof text - 1);
    assert_true(m.rq.seed == 0x7fffffffffffffffull);
    assert_int_equal(m.rq.priority, -BT_PRIORITY_LIMIT);
    assert_string_equal(m.rq.stream_key, "0123456789abcdef0123456789abcdef");
    assert_true(m.rq.adopt);
    assert_true(m.rq.kv_state_bytes == BT_KV_STATE_MAX);
    assert_string_equal(m.rq.exactness, "llama cpu=libggml-cpu-haswell.so threads=2");
    /* encoding the decoded request gives the same payload */
    size_t len2 = 0;
    char *p2 = bt_request_encode(&m.rq, &len2);
    assert_non_null(p2);
    assert_int_equal(len2, len);
    assert_memory_equal(p2, p, len);
    free(p2);
    bt_request_msg_free(&m);
    free(p);
    json_decref(body);
}

/* A body given already serialized (body_json) goes in as it is: the payload decodes to the same
 * request as with the body serialized by the codec, and the body text is in it byte for byte. */
static void test_preserialized_body(void **state) {
    (void)state;
    json_t *body = json_pack("{s:s, s:[{s:s, s:s}], s:b, s:i}", "model", "m", "messages", "role", "user", "content",
                             "Hi \"there\" \xc3\xa9", "stream", 1, "max_tokens", 7);
    char *canon = json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS);
    assert_non_null(canon);
    uint32_t ids[] = {5, 6};
    bt_request rq = {.request_id = "req-2",
                     .api = BT_API_CHAT,
                     .body = body,
                     .body_json = canon,
                     .body_json_len = strlen(canon),
                     .carried = ids,
                     .n_carried = 2,
                     .has_max_tokens = true,
                     .max_tokens = 5,
                     .seed = 99,
                     .stream_key = "0123456789abcdef0123456789abcdef"};
    size_t len = 0;
    char *p = bt_request_encode(&rq, &len);
    assert_non_null(p);
    assert_int_equal(len, strlen(p));
    assert_non_null(strstr(p, canon)); /* the given text, not a re-serialization */
    bt_request_msg m = decode_ok(p, len);
    assert_string_equal(m.rq.request_id, "req-2");
    assert_int_equal(m.rq.api, BT_API_CHAT);
    assert_true(json_equal((json_t *)m.rq.body, body));
    assert_int_equal(m.rq.n_carried, 2);
    assert_memory_equal(m.rq.carried, ids, sizeof ids);
    assert_true(m.rq.has_max_tokens);
    assert_int_equal(m.rq.max_tokens, 5);
    assert_true(m.rq.seed == 99);
    assert_string_equal(m.rq.stream_key, "0123456789abcdef0123456789abcdef");
    /* the same request with the body serialized by the codec decodes to the same members */
    rq.body_json = NULL;
    rq.body_json_len = 0;
    size_t len2 = 0;
    char *p2 = bt_request_encode(&rq, &len2);
    assert_non_null(p2);
    assert_int_equal(len2, len); /* the same members, only in another order */
    json_t *a = json_loadb(p, len, 0, NULL), *b = json_loadb(p2, len2, 0, NULL);
    assert_non_null(a);
    assert_non_null(b);
    assert_true(json_equal(a, b));
    json_decref(a);
    json_decref(b);
    free(p2);
    bt_request_msg_free(&m);
    free(p);
    free(canon);
    json_decref(body);
}

/* The payload of a body given serialized is written directly (request.c, encode_direct); it must
 * be the bytes the jansson path wrote for it: the jansson payload without body_json (a body parsed
 * from canonical text dumps back to that text) with the body moved to the front, as the splice
 * did. Checked for every combination of members below, byte for byte. */
static void test_direct_encoding(void **state) {
    (void)state;
    const char *canon = "{\"max_tokens\":7,\"messages\":[{\"content\":\"Hi \\\"there\\\" \\u001F\\n \u00e9\",\"role\":\"user\"}],"
                        "\"model\":\"m\",\"stream\":true}";
    json_t *body = json_loads(canon, 0, NULL);
    assert_non_null(body);
    char *check = json_dumps(body, JSON_COMPACT);
    assert_string_equal(check, canon); /* the premise: the jansson path writes the same body */
    free(check);
    uint32_t ids[] = {0, 1, 4294967295u};
    const char *texts[] = {NULL, "", "ab\"c\\\n\x01\x1f/\x7f", "caf\xc3\xa9" /* not ASCII: the jansson path */};
    const size_t text_lens[] = {0, 0, 10, 5};
    const char *rids[] = {"req-1", "r\"id\t\x02"};
    const char *exacts[] = {NULL, "", "cpu-x86:threads=4 \"q\""};
    int64_t prios[] = {0, -1000000, 17};
    uint64_t seeds[] = {0, 1, 0x8000000000000001ull};
    int n = 0;
    for (int t = 0; t < 4; t++)
        for (int ri = 0; ri < 2; ri++)
            for (int e = 0; e < 3; e++)
                for (int pi = 0; pi < 3; pi++)
                    for (int si = 0; si < 3; si++)
                        for (int k = 0; k < 8; k++) {
                            bt_request rq = {.request_id = rids[ri],
                                             .api = k & 1 ? BT_API_CHAT : BT_API_COMPLETION,
                                             .body = body,
                                             .body_json = canon,
                                             .body_json_len = strlen(canon),
                                             .carried = ids,
                                             .n_carried = (size_t)(k % 4),
                                             .has_max_tokens = k & 2,
                                             .max_tokens = k * 1000,
                                             .carried_text = texts[t],
                                             .carried_text_len = text_lens[t],
                                             .seed = seeds[si],
                                             .priority = (int32_t)prios[pi],
                                             .stream_key = k & 4 ? "0123456789abcdef0123456789abcdef" : NULL,
                                             .adopt = k >= 6,
                                             .kv_state_bytes = k == 5 ? 123456789 : 0,
                                             .exactness = exacts[e]};
                            size_t l1 = 0, l2 = 0;
                            char *direct = bt_request_encode(&rq, &l1);
                            rq.body_json = NULL;
                            rq.body_json_len = 0;
                            char *viaj = bt_request_encode(&rq, &l2);
                            assert_non_null(direct);
                            assert_non_null(viaj);
                            /* the spliced payload the jansson path made with body_json: the body
                             * first, then the members as jansson wrote them, in their order */
                            char member[512], want[2048];
                            snprintf(member, sizeof member, ",\"body\":%s", canon);
                            char *at = strstr(viaj, member);
                            assert_non_null(at);
                            int wl = snprintf(want, sizeof want, "{\"body\":%s,%.*s%s", canon, (int)(at - viaj - 1),
                                              viaj + 1, at + strlen(member));
                            assert_int_equal((size_t)wl, l2);
                            if (l1 != l2 || memcmp(direct, want, l1) != 0)
                                fail_msg("direct:  %s\nspliced: %s", direct, want);
                            assert_int_equal(l1, strlen(direct));
                            free(direct);
                            free(viaj);
                            n++;
                        }
    assert_int_equal(n, 4 * 2 * 3 * 3 * 3 * 8);
    json_decref(body);
}

static void expect_invalid(const char *payload, const char *reason) {
    bt_request_msg m;
    char err[256] = "";
    assert_int_equal(bt_request_decode(payload, strlen(payload), &m, err, sizeof err), BT_ERR_INVALID);
    if (!strstr(err, reason)) fail_msg("payload %s: reason '%s' does not mention '%s'", payload, err, reason);
    assert_null(m.root);
    assert_null(m.carried);
}

static void test_malformed(void **state) {
    (void)state;
    expect_invalid("", "malformed");
    expect_invalid("{", "malformed");
    expect_invalid("[]", "not an object");
    expect_invalid("{\"api\":\"chat\",\"body\":{}}", "request_id");
    expect_invalid("{\"request_id\":\"\",\"api\":\"chat\",\"body\":{}}", "request_id");
    expect_invalid("{\"request_id\":7,\"api\":\"chat\",\"body\":{}}", "request_id");
    expect_invalid("{\"request_id\":\"a\\u0000b\",\"api\":\"chat\",\"body\":{}}", "request_id");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"embeddings\",\"body\":{}}", "api");
    expect_invalid("{\"request_id\":\"a\",\"body\":{}}", "api");
    /* compared over its length: "chat" then U+0000 is not "chat" */
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\\u0000x\",\"body\":{}}", "api");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"completion\\u0000\",\"body\":{}}", "api");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\"}", "body");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":[]}", "body");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"carried\":{}}", "carried");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"carried\":[1,-1]}", "carried token 1");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"carried\":[4294967296]}", "carried token 0");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"carried\":[\"1\"]}", "carried token 0");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"max_tokens\":-1}", "max_tokens");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"max_tokens\":1.5}", "max_tokens");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"carried_text\":3}", "carried_text");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"seed\":0}", "seed");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"seed\":\"7\"}", "seed");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"priority\":1.5}", "priority");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"priority\":\"1\"}", "priority");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"priority\":1000001}", "priority");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"priority\":-1000001}", "priority");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"stream_key\":\"0123\"}", "stream_key");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"stream_key\":"
                   "\"0123456789ABCDEF0123456789abcdef\"}", "stream_key");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"adopt\":true}", "adopt needs");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"stream_key\":"
                   "\"0123456789abcdef0123456789abcdef\",\"adopt\":1}", "adopt must");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"kv_state_bytes\":0}", "kv_state_bytes");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"kv_state_bytes\":4294967297}",
                   "kv_state_bytes");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"kv_state_bytes\":\"1\"}", "kv_state_bytes");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"exactness\":\"\"}", "exactness");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"exactness\":7}", "exactness");
    expect_invalid("{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{},\"exactness\":\"a\\u0000b\"}",
                   "exactness");
    expect_invalid("{\"request_id\":\"a\",\"request_id\":\"b\",\"api\":\"chat\",\"body\":{}}", "malformed");
    char big[BT_REQUEST_ID_MAX + 64];
    memset(big, 'r', sizeof big);
    int n = snprintf(big, sizeof big, "{\"request_id\":\"");
    memset(big + n, 'r', BT_REQUEST_ID_MAX + 1);
    snprintf(big + n + BT_REQUEST_ID_MAX + 1, sizeof big - (size_t)n - BT_REQUEST_ID_MAX - 1,
             "\",\"api\":\"chat\",\"body\":{}}");
    expect_invalid(big, "request_id");
}

static void test_unknown_members_ignored(void **state) {
    (void)state;
    const char *p = "{\"request_id\":\"a\",\"api\":\"chat\",\"body\":{\"x\":1},\"future\":[1,2],\"carried\":[]}";
    bt_request_msg m = decode_ok(p, strlen(p));
    assert_int_equal(m.rq.n_carried, 0);
    assert_null(m.carried);
    bt_request_msg_free(&m);
}

static void test_truncations(void **state) {
    (void)state;
    const char *p = "{\"request_id\":\"r\",\"api\":\"completion\",\"body\":{\"prompt\":\"x\"},\"carried\":[5,6,7],"
                    "\"max_tokens\":9,\"carried_text\":\"abc\"}";
    size_t n = strlen(p);
    for (size_t i = 0; i < n; i++) {
        char *b = malloc(i ? i : 1);
        memcpy(b, p, i);
        bt_request_msg m;
        char err[128];
        assert_int_equal(bt_request_decode(b, i, &m, err, sizeof err), BT_ERR_INVALID);
        free(b);
    }
    bt_request_msg m = decode_ok(p, n);
    assert_int_equal(m.rq.n_carried, 3);
    assert_int_equal(m.rq.carried[2], 7);
    bt_request_msg_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_first_attempt_roundtrip),
        cmocka_unit_test(test_continuation_roundtrip),
        cmocka_unit_test(test_preserialized_body),
        cmocka_unit_test(test_direct_encoding),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_unknown_members_ignored),
        cmocka_unit_test(test_truncations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
