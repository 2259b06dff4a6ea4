/* test_engine.c — unit tests of the engine helpers of engine/engine.h: the batch-gathering policy
 * (bt_engine_gather), a pure function of the arrival times.
 *
 * Covered: off (window 0, or out of range) never holds; a gather starts only on an idle engine;
 * each arrival moves the quiet deadline (last + window); the bound (first + 8 windows) caps a
 * trickle; the deadline is exclusive (the step may start at it); end reports the wait and a new
 * gather starts afresh; arrivals at an earlier time (a clock read before another's) never move the
 * deadline back. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "engine/engine.h"

#define US 1000ull
#define MS 1000000ull

static void test_off(void **state) {
    (void)state;
    bt_engine_gather g;
    bt_engine_gather_init(&g, 0);
    bt_engine_gather_arrive(&g, 5 * MS, true);
    assert_false(g.active);
    assert_false(bt_engine_gather_holds(&g, 5 * MS));
    assert_int_equal(bt_engine_gather_end(&g, 6 * MS), 0);
    bt_engine_gather_init(&g, -3);
    bt_engine_gather_arrive(&g, 5 * MS, true);
    assert_false(bt_engine_gather_holds(&g, 5 * MS));
    bt_engine_gather_init(&g, BT_GATHER_MAX_US + 1);
    bt_engine_gather_arrive(&g, 5 * MS, true);
    assert_false(bt_engine_gather_holds(&g, 5 * MS));
}

static void test_running_engine_never_waits(void **state) {
    (void)state;
    bt_engine_gather g;
    bt_engine_gather_init(&g, 500);
    bt_engine_gather_arrive(&g, 10 * MS, false); /* a sequence is running: no gather */
    assert_false(g.active);
    assert_false(bt_engine_gather_holds(&g, 10 * MS));
}

static void test_quiet_window(void **state) {
    (void)state;
    bt_engine_gather g;
    bt_engine_gather_init(&g, 500);
    uint64_t t0 = 10 * MS;
    bt_engine_gather_arrive(&g, t0, true);
    assert_true(g.active);
    assert_int_equal(bt_engine_gather_deadline(&g), t0 + 500 * US);
    assert_true(bt_engine_gather_holds(&g, t0 + 499 * US));
    assert_false(bt_engine_gather_holds(&g, t0 + 500 * US)); /* the step may start at the deadline */
    /* an arrival 300 us later: quiet until 800 us; `idle` no longer matters while it is under way */
    bt_engine_gather_arrive(&g, t0 + 300 * US, false);
    assert_int_equal(bt_engine_gather_deadline(&g), t0 + 800 * US);
    assert_true(bt_engine_gather_holds(&g, t0 + 700 * US));
    /* a clock read earlier than the last arrival does not move the deadline back */
    bt_engine_gather_arrive(&g, t0 + 100 * US, true);
    assert_int_equal(bt_engine_gather_deadline(&g), t0 + 800 * US);
    assert_int_equal(bt_engine_gather_end(&g, t0 + 800 * US), 800 * US);
    assert_false(g.active);
    assert_false(bt_engine_gather_holds(&g, t0 + 700 * US));
    assert_int_equal(bt_engine_gather_end(&g, t0 + 900 * US), 0); /* none under way */
}

static void test_bound(void **state) {
    (void)state;
    bt_engine_gather g;
    bt_engine_gather_init(&g, 500);
    uint64_t t0 = 1 * MS, t = t0;
    bt_engine_gather_arrive(&g, t, true);
    /* a trickle every 400 us (inside the window) for 10 ms: the bound ends the gather at 4 ms */
    while (t < t0 + 10 * MS) {
        t += 400 * US;
        if (!bt_engine_gather_holds(&g, t)) break;
        bt_engine_gather_arrive(&g, t, true);
        assert_true(bt_engine_gather_deadline(&g) <= t0 + BT_GATHER_BOUND * 500 * US);
    }
    assert_int_equal(bt_engine_gather_deadline(&g), t0 + BT_GATHER_BOUND * 500 * US);
    assert_true(t >= t0 + BT_GATHER_BOUND * 500 * US && t < t0 + BT_GATHER_BOUND * 500 * US + 400 * US);
    assert_int_equal(bt_engine_gather_end(&g, t), t - t0);
    /* the next arrival on an idle engine starts a new gather with its own bound */
    bt_engine_gather_arrive(&g, t + 1 * MS, true);
    assert_int_equal(bt_engine_gather_deadline(&g), t + 1 * MS + 500 * US);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_off),
        cmocka_unit_test(test_running_engine_never_waits),
        cmocka_unit_test(test_quiet_window),
        cmocka_unit_test(test_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
