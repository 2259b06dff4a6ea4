/* test_opts.c — unit tests of bt_opts_origin (src/common/opts.c): where an option's value came
 * from, which the worker uses to refuse a setting of the engine it does not run.
 *
 * Covers: a flag given as `--name value` and as `--name=value`; a flag followed by another flag has
 * no value (bt_opts_parse refuses it: `--api-key --http-port 9000` must not set the key to
 * "--http-port"), while `--name=--value` is a value, and then a flag name in value position is not
 * "given"; a
 * bare boolean flag before another flag; the environment twin when the command line lacks the
 * flag (and not when the variable is empty), and an invalid variable that the flag overrides is not
 * read (an error only without the flag); unknown flags skipped with their values as
 * bt_opts_parse forwards them; an unknown row name. Each case also runs bt_opts_parse over the
 * same arguments, so that the two readings are seen to agree. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/opts.h"

static const char *s_up, *s_payload;
static int64_t s_blocks;
static bool s_fault;

#define NOPTS 4
static const bt_opt opts[NOPTS] = {
    {"--upstream", "TEST_OPTS_UPSTREAM", BT_OPT_STR, &s_up, 0, 0, "upstream"},
    {"--payload", NULL, BT_OPT_STR, &s_payload, 0, 0, "a value that may look like a flag"},
    {"--blocks", "TEST_OPTS_BLOCKS", BT_OPT_INT, &s_blocks, 1, 100, "blocks"},
    {"--fault", NULL, BT_OPT_BOOL, &s_fault, 0, 0, "bare boolean"},
};

/* bt_opts_parse must accept argv (with forwarding when `forward`), as the callers do first. */
static void parse_ok(int argc, char **argv, bool forward) {
    const char *rest[16];
    int nrest = 0;
    char err[256] = "";
    s_up = s_payload = NULL;
    s_blocks = 1;
    s_fault = false;
    bool ok = bt_opts_parse(opts, NOPTS, argc, argv, 1, forward ? rest : NULL, 16, &nrest, err, sizeof err);
    if (!ok) fail_msg("bt_opts_parse refused the arguments: %s", err);
}

static void test_flag_forms(void **state) {
    (void)state;
    char *a[] = {"cmd", "--upstream", "http://x", "--blocks=5"};
    parse_ok(4, a, false);
    assert_string_equal(bt_opts_origin(opts, NOPTS, 4, a, 1, "--upstream"), "argument");
    assert_string_equal(bt_opts_origin(opts, NOPTS, 4, a, 1, "--blocks"), "argument");
    assert_null(bt_opts_origin(opts, NOPTS, 4, a, 1, "--fault"));
    assert_null(bt_opts_origin(opts, NOPTS, 4, a, 1, "--payload"));
}

static void test_value_that_looks_like_a_flag(void **state) {
    (void)state;
    /* the next flag is not a value: refused, with or without forwarding */
    char *a[] = {"cmd", "--payload", "--upstream", "http://x"};
    const char *rest[16];
    int nrest = 0;
    char err[256] = "";
    assert_false(bt_opts_parse(opts, NOPTS, 4, a, 1, NULL, 16, &nrest, err, sizeof err));
    assert_string_equal(err, "--payload needs a value");
    assert_false(bt_opts_parse(opts, NOPTS, 4, a, 1, rest, 16, &nrest, err, sizeof err));
    assert_string_equal(err, "--payload needs a value");
    char *b[] = {"cmd", "--blocks", "--fault"};
    assert_false(bt_opts_parse(opts, NOPTS, 3, b, 1, NULL, 16, &nrest, err, sizeof err));
    assert_string_equal(err, "--blocks needs a value");
    /* with '=' a value may start with "--" */
    char *c[] = {"cmd", "--payload=--upstream"};
    parse_ok(2, c, false);
    assert_string_equal(s_payload, "--upstream");
    assert_null(s_up);
    assert_null(bt_opts_origin(opts, NOPTS, 2, c, 1, "--upstream"));
    assert_string_equal(bt_opts_origin(opts, NOPTS, 2, c, 1, "--payload"), "argument");
    /* a value out of range names the flag, not where it came from */
    char *d[] = {"cmd", "--blocks", "0"};
    assert_false(bt_opts_parse(opts, NOPTS, 3, d, 1, NULL, 16, &nrest, err, sizeof err));
    assert_string_equal(err, "invalid value '0' for --blocks (expected an integer from 1 to 100)");
}

static void test_bare_bool(void **state) {
    (void)state;
    char *a[] = {"cmd", "--fault", "--blocks", "7"};
    parse_ok(4, a, false);
    assert_true(s_fault);
    assert_int_equal(s_blocks, 7);
    assert_string_equal(bt_opts_origin(opts, NOPTS, 4, a, 1, "--fault"), "argument");
    assert_string_equal(bt_opts_origin(opts, NOPTS, 4, a, 1, "--blocks"), "argument");
}

static void test_environment(void **state) {
    (void)state;
    char *a[] = {"cmd", "--blocks", "3"};
    setenv("TEST_OPTS_UPSTREAM", "http://env", 1);
    setenv("TEST_OPTS_BLOCKS", "9", 1);
    parse_ok(3, a, false);
    assert_string_equal(s_up, "http://env");
    assert_string_equal(bt_opts_origin(opts, NOPTS, 3, a, 1, "--upstream"), "TEST_OPTS_UPSTREAM");
    assert_string_equal(bt_opts_origin(opts, NOPTS, 3, a, 1, "--blocks"), "argument"); /* the flag wins */
    setenv("TEST_OPTS_UPSTREAM", "", 1); /* empty: as if unset, for both */
    parse_ok(3, a, false);
    assert_null(s_up);
    assert_null(bt_opts_origin(opts, NOPTS, 3, a, 1, "--upstream"));
    /* a variable the flag overrides is not read: an invalid one is no error then, and still one
     * without the flag */
    setenv("TEST_OPTS_BLOCKS", "abc", 1);
    parse_ok(3, a, false);
    assert_int_equal(s_blocks, 3);
    char *b[] = {"cmd", "--blocks=4"};
    parse_ok(2, b, false);
    assert_int_equal(s_blocks, 4);
    char *none[] = {"cmd", "--upstream", "http://x"}, err[256] = "";
    assert_false(bt_opts_parse(opts, NOPTS, 3, none, 1, NULL, 0, NULL, err, sizeof err));
    assert_non_null(strstr(err, "TEST_OPTS_BLOCKS: invalid value 'abc' for --blocks"));
    unsetenv("TEST_OPTS_UPSTREAM");
    unsetenv("TEST_OPTS_BLOCKS");
}

static void test_forwarded_unknown_flags(void **state) {
    (void)state;
    /* `--other --upstream`: --other is unknown and takes no value (the next starts with --);
     * `--else v`: unknown, forwarded with its value, so "--fault" after it is read as a flag */
    char *a[] = {"cmd", "--other", "--upstream", "u", "--else", "v", "--fault"};
    parse_ok(7, a, true);
    assert_string_equal(s_up, "u");
    assert_true(s_fault);
    assert_string_equal(bt_opts_origin(opts, NOPTS, 7, a, 1, "--upstream"), "argument");
    assert_string_equal(bt_opts_origin(opts, NOPTS, 7, a, 1, "--fault"), "argument");
    char *b[] = {"cmd", "--else", "--payload=x"};
    parse_ok(3, b, true);
    assert_string_equal(bt_opts_origin(opts, NOPTS, 3, b, 1, "--payload"), "argument");
    assert_null(bt_opts_origin(opts, NOPTS, 3, b, 1, "--nonexistent"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flag_forms),
        cmocka_unit_test(test_value_that_looks_like_a_flag),
        cmocka_unit_test(test_bare_bool),
        cmocka_unit_test(test_environment),
        cmocka_unit_test(test_forwarded_unknown_flags),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
