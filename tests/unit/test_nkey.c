/* test_nkey.c — unit tests of NATS user nkeys (src/events/nkey.c) and of NATS_AUTH_NKEY in the
 * event plane's configuration (src/events/nats.c).
 *
 * Covers: the public key derived from the seed of the example pair in the NATS documentation;
 * every kind of malformed seed refused with its own message that never echoes the seed; and
 * bt_events_create() refusing a malformed NATS_AUTH_NKEY only when it is the credential in use
 * (username+password and token come first, as in Dynamo). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "events/events.h"
#include "events/nkey.h"

/* the example user pair of the NATS server documentation (nkey_auth.md) */
static const char SEED[] = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY";
static const char PUB[] = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
/* the same key bytes written as an account seed (prefix 0x90 0x00): valid, but the wrong kind */
static const char ACCOUNT_SEED[] = "SAACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCTIMI";

static void expect_refused(const char *seed, const char *why) {
    char pub[BT_NKEY_PUBLIC_LEN + 1] = "untouched";
    char err[200] = "";
    assert_false(bt__nkey_user_public(seed, pub, err, sizeof err));
    if (!strstr(err, why)) fail_msg("seed '%s': expected an error with '%s', got '%s'", seed, why, err);
    if (seed && strlen(seed) > 8 && strstr(err, seed)) fail_msg("the error echoes the seed: %s", err);
}

static void test_derive(void **state) {
    (void)state;
    char pub[BT_NKEY_PUBLIC_LEN + 1];
    char err[200];
    assert_true(bt__nkey_user_public(SEED, pub, err, sizeof err));
    assert_string_equal(pub, PUB);
    assert_int_equal(strlen(pub), BT_NKEY_PUBLIC_LEN);
}

static void test_malformed(void **state) {
    (void)state;
    char s[sizeof SEED];
    expect_refused(NULL, "0 characters");
    expect_refused("", "0 characters");
    memcpy(s, SEED, sizeof s);
    s[sizeof s - 2] = '\0'; /* one character short */
    expect_refused(s, "57 characters");
    expect_refused(PUB, "public key");
    memcpy(s, SEED, sizeof s);
    s[20] = 'a'; /* lower case is not the alphabet */
    expect_refused(s, "character 21 is not base32");
    s[20] = '1';
    expect_refused(s, "character 21 is not base32");
    memcpy(s, SEED, sizeof s);
    s[30] = s[30] == 'A' ? 'B' : 'A'; /* one flipped character */
    expect_refused(s, "checksum");
    expect_refused(ACCOUNT_SEED, "account key");
}

/* A seed whose checksum is right but whose first byte says "not a seed": built by re-encoding. */
static void test_not_a_seed(void **state) {
    (void)state;
    /* base32 of 0x00 0x00 then 32 zero bytes, then the CRC-16/XMODEM of those 34 bytes (0x0000) */
    char s[59];
    memset(s, 'A', 58);
    s[58] = '\0';
    expect_refused(s, "not an nkey seed (a seed starts with S)");
}

static void test_config_priority(void **state) {
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    bt_events_config c;
    bt_events_config_default(&c);
    c.plane = "nats";
    c.nats_server = "nats://127.0.0.1:1";
    c.nkey = "SUNOTASEED";
    bt_events *e = NULL;
    char err[256] = "";
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_ERR_INVALID);
    assert_null(e);
    assert_non_null(strstr(err, "NATS_AUTH_NKEY"));
    assert_non_null(strstr(err, "not an nkey seed"));
    c.nkey = PUB;
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "NATS_AUTH_NKEY: this is a user public key"));
    /* a token comes first: the seed is not used, so not checked */
    c.token = "s3cret";
    err[0] = '\0';
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_OK);
    assert_non_null(e);
    bt_events_close(e, NULL, NULL);
    e = NULL;
    uv_run(&loop, UV_RUN_DEFAULT);
    /* a well-formed seed, with the newline a file leaves behind, is taken */
    c.token = NULL;
    c.nkey = "  SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n";
    assert_int_equal(bt_events_create(&loop, &c, &e, err, sizeof err), BT_OK);
    assert_non_null(e);
    bt_events_close(e, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_derive),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_not_a_seed),
        cmocka_unit_test(test_config_priority),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
