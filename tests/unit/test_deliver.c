/* test_deliver.c — unit tests of the engines' delivery module (engine/deliver.h) and of the close
 * countdown (common/closer.h).
 *
 * A fake engine stages output and endings and drains them the way the mocker and the openai
 * engine do. Covered: output before the ending, coalescing per sequence, exactly one ending and
 * nothing after it, no callback from stage/finish/kill, kills of the current and of another
 * sequence from inside a callback (memory kept until the outermost leave: ASan shows a
 * use-after-free otherwise), output staged by a callback for the sequence being delivered, destroy
 * from inside a callback (no further callback, teardown once, at the outermost leave), direct
 * delivery (bt_deliver_now) and close with live sequences. The closer: done only after the seal
 * and the last close, exactly once, with libuv handles and a non-libuv hold. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "common/closer.h"
#include "engine/deliver.h"

/* ---- a fake engine ----------------------------------------------------------------------------- */

typedef struct fake_engine fake_engine;
typedef struct fseq fseq;
typedef void (*fseq_action)(fseq *s, int event);

struct fseq {
    bt_deliver_seq dl;
    fake_engine *e;
    int id;
    fseq_action action; /* called from inside each of its sink callbacks */
    fseq *other;
};

#define LOG_MAX 64

struct fake_engine {
    bt_deliver dl;
    int freed[LOG_MAX], n_freed;
    int wakes, teardowns;
    char log[LOG_MAX][48];
    int n_log;
};

enum { EV_TOKENS, EV_FINISH, EV_ERROR };

static void logf_(fake_engine *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(fake_engine *e, const char *fmt, ...) {
    assert_true(e->n_log < LOG_MAX);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->log[e->n_log++], sizeof e->log[0], fmt, ap);
    va_end(ap);
}

static void on_tokens(void *ud, const uint32_t *ids, size_t n, const char *text, size_t len) {
    fseq *s = ud;
    char ids_s[24] = "";
    for (size_t i = 0; i < n && i < 4; i++)
        snprintf(ids_s + strlen(ids_s), sizeof ids_s - strlen(ids_s), "%u,", ids[i]);
    logf_(s->e, "%d tok %s%.*s", s->id, ids_s, (int)len, text);
    if (s->action) s->action(s, EV_TOKENS);
}

static void on_finish(void *ud, bt_finish_reason r, const bt_usage *u) {
    fseq *s = ud;
    logf_(s->e, "%d fin %s %u", s->id, bt_finish_reason_name(r), u->completion_tokens);
    if (s->action) s->action(s, EV_FINISH);
}

static void on_error(void *ud, bt_status code, const char *msg) {
    fseq *s = ud;
    logf_(s->e, "%d err %s %s", s->id, bt_status_name(code), msg);
    if (s->action) s->action(s, EV_ERROR);
}

static const bt_engine_sink sink = {on_tokens, on_finish, on_error, NULL};

static void free_seq(void *owner, bt_deliver_seq *ds) {
    fake_engine *e = owner;
    fseq *s = BT_DELIVER_OWNER(ds, fseq, dl);
    e->freed[e->n_freed++] = s->id;
    free(s);
}

static void wake(void *owner) { ((fake_engine *)owner)->wakes++; }
static void teardown(void *owner) { ((fake_engine *)owner)->teardowns++; }

static const bt_deliver_ops ops = {free_seq, wake, teardown};

static void engine_init(fake_engine *e) {
    memset(e, 0, sizeof *e);
    bt_deliver_init(&e->dl, &ops, e);
}

static fseq *seq_new(fake_engine *e, int id) {
    fseq *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->e = e;
    s->id = id;
    bt_deliver_add(&e->dl, &s->dl, &sink, s, 1024);
    return s;
}

static void stage(fake_engine *e, fseq *s, uint32_t id, const char *text) {
    assert_int_equal(bt_deliver_stage(&e->dl, &s->dl, &id, 1, text, strlen(text)), BT_OK);
}

static void finish(fake_engine *e, fseq *s, uint32_t n) {
    bt_usage u = {.prompt_tokens = 1, .completion_tokens = n};
    bt_deliver_finish(&e->dl, &s->dl, BT_FINISH_STOP, &u);
}

static void assert_log(fake_engine *e, const char *const *want, int n) {
    for (int i = 0; i < n && i < e->n_log; i++) assert_string_equal(e->log[i], want[i]);
    assert_int_equal(e->n_log, n);
}

/* ---- tests ------------------------------------------------------------------------------------ */

static void test_order_and_coalescing(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *a = seq_new(&e, 1), *b = seq_new(&e, 2);
    stage(&e, a, 10, "x");
    stage(&e, b, 20, "y");
    stage(&e, a, 11, "z"); /* coalesced with a's first batch */
    finish(&e, a, 2);
    bt_deliver_error(&e.dl, &b->dl, BT_ERR_ENGINE, "boom");
    finish(&e, b, 9);             /* the first ending counts */
    assert_int_equal(e.n_log, 0); /* staging never calls a sink */
    assert_int_equal(e.wakes, 2); /* one per sequence queued */
    assert_true(bt_deliver_ended(&a->dl));
    assert_false(bt_deliver_dead(&a->dl));
    bt_deliver_drain(&e.dl);
    static const char *const want[] = {"1 tok 10,11,xz", "1 fin stop 2", "2 tok 20,y", "2 err BT_ERR_ENGINE boom"};
    assert_log(&e, want, 4);
    assert_int_equal(e.n_freed, 2); /* both dead: freed at the drain's own leave */
    assert_false(bt_deliver_pending(&e.dl));
    bt_deliver_close(&e.dl);
    assert_int_equal(e.teardowns, 1);
}

static void on_wait(void *ud, bt_engine_wait why) {
    fseq *s = ud;
    logf_(s->e, "%d wait %s", s->id, why == BT_ENGINE_WAIT_PREEMPTED ? "preempted" : "queued");
}

static const bt_engine_sink wait_sink = {on_tokens, on_finish, on_error, on_wait};

/* A wait is told after the output staged before it, once; output staged after it ends it (nothing
 * told), and so does an ending; a sink without on_wait is never queued for one. */
static void test_wait(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *w[4];
    for (int i = 0; i < 4; i++) {
        w[i] = calloc(1, sizeof *w[i]);
        assert_non_null(w[i]);
        w[i]->e = &e;
        w[i]->id = i + 1;
        bt_deliver_add(&e.dl, &w[i]->dl, &wait_sink, w[i], 1024);
    }
    stage(&e, w[0], 10, "x"); /* tokens, then preempted */
    bt_deliver_wait(&e.dl, &w[0]->dl, BT_ENGINE_WAIT_PREEMPTED);
    bt_deliver_wait(&e.dl, &w[1]->dl, BT_ENGINE_WAIT_QUEUED); /* queued, then admitted and ran */
    stage(&e, w[1], 20, "y");
    bt_deliver_wait(&e.dl, &w[2]->dl, BT_ENGINE_WAIT_QUEUED); /* queued, then stopped */
    finish(&e, w[2], 0);
    bt_deliver_wait(&e.dl, &w[3]->dl, BT_ENGINE_WAIT_QUEUED);
    assert_int_equal(e.n_log, 0); /* staging a wait calls no sink */
    bt_deliver_drain(&e.dl);
    static const char *const want[] = {"1 tok 10,x", "1 wait preempted", "2 tok 20,y", "3 fin stop 0", "4 wait queued"};
    assert_log(&e, want, 5);
    bt_deliver_drain(&e.dl); /* told once */
    assert_int_equal(e.n_log, 5);
    fseq *plain = seq_new(&e, 5); /* no on_wait */
    int wakes = e.wakes;
    bt_deliver_wait(&e.dl, &plain->dl, BT_ENGINE_WAIT_QUEUED);
    assert_int_equal(e.wakes, wakes);
    assert_false(bt_deliver_pending(&e.dl));
    bt_deliver_close(&e.dl);
    assert_int_equal(e.teardowns, 1);
}

static void kill_other(fseq *s, int ev) {
    if (ev == EV_TOKENS && s->other) {
        bt_deliver_kill(&s->e->dl, &s->other->dl);
        /* still in memory while the drain runs: the graveyard */
        assert_true(bt_deliver_dead(&s->other->dl));
        assert_int_equal(s->e->n_freed, 0);
        s->other = NULL;
    }
}

static void kill_self(fseq *s, int ev) {
    if (ev == EV_TOKENS) bt_deliver_kill(&s->e->dl, &s->dl);
}

static void test_kill_inside_callbacks(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *a = seq_new(&e, 1), *b = seq_new(&e, 2), *c = seq_new(&e, 3);
    a->action = kill_other;
    a->other = b;
    c->action = kill_self;
    stage(&e, a, 1, "a");
    stage(&e, b, 2, "b"); /* queued, but killed by a's callback before its turn */
    finish(&e, b, 1);
    stage(&e, c, 3, "c");
    finish(&e, c, 1); /* c kills itself in its on_tokens: no on_finish */
    bt_deliver_drain(&e.dl);
    static const char *const want[] = {"1 tok 1,a", "3 tok 3,c"};
    assert_log(&e, want, 2);
    assert_int_equal(e.n_freed, 2);
    /* a is still live; kill it outside any callback: freed at once, no callback */
    bt_deliver_kill(&e.dl, &a->dl);
    assert_int_equal(e.n_freed, 3);
    assert_int_equal(e.freed[2], 1);
    assert_int_equal(e.n_log, 2);
    bt_deliver_close(&e.dl);
}

static void stop_self(fseq *s, int ev) {
    if (ev != EV_TOKENS || bt_deliver_ended(&s->dl)) return;
    /* a stop from inside on_tokens releases held-back text, then the ending: both this drain */
    stage(s->e, s, 99, "held");
    finish(s->e, s, 5);
}

static void test_stage_from_own_callback(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *a = seq_new(&e, 1), *b = seq_new(&e, 2);
    a->action = stop_self;
    stage(&e, a, 1, "one");
    stage(&e, b, 2, "two");
    bt_deliver_drain(&e.dl);
    static const char *const want[] = {"1 tok 1,one", "1 tok 99,held", "1 fin stop 5", "2 tok 2,two"};
    assert_log(&e, want, 4);
    bt_deliver_close(&e.dl);
    assert_int_equal(e.n_freed, 2);
}

static void close_engine(fseq *s, int ev) {
    (void)ev;
    bt_deliver_close(&s->e->dl);
    assert_int_equal(s->e->teardowns, 0); /* not while the drain is on the stack */
    assert_int_equal(s->e->n_freed, 0);
}

static void test_close_inside_callback(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *a = seq_new(&e, 1), *b = seq_new(&e, 2);
    (void)seq_new(&e, 3); /* live, nothing staged */
    a->action = close_engine;
    stage(&e, a, 1, "a");
    finish(&e, a, 1);
    stage(&e, b, 2, "b");
    bt_deliver_enter(&e.dl); /* as an engine's loop callback does around its drain */
    bt_deliver_drain(&e.dl);
    assert_int_equal(e.teardowns, 0);
    assert_false(bt_deliver_leave(&e.dl));
    static const char *const want[] = {"1 tok 1,a"}; /* nothing after the close */
    assert_log(&e, want, 1);
    assert_int_equal(e.teardowns, 1);
    assert_int_equal(e.n_freed, 3);
    bt_deliver_close(&e.dl); /* idempotent */
    assert_int_equal(e.teardowns, 1);
}

static void test_now(void **st) {
    (void)st;
    fake_engine e;
    engine_init(&e);
    fseq *a = seq_new(&e, 1), *b = seq_new(&e, 2);
    b->action = kill_self;
    uint32_t id = 7;
    bt_deliver_enter(&e.dl);
    assert_true(bt_deliver_now(&e.dl, &a->dl, &id, 1, "x", 1));
    assert_false(bt_deliver_now(&e.dl, &b->dl, &id, 1, "y", 1)); /* killed itself */
    assert_false(bt_deliver_now(&e.dl, &b->dl, &id, 1, "z", 1)); /* dead: no call */
    finish(&e, a, 1);
    assert_false(bt_deliver_now(&e.dl, &a->dl, &id, 1, "w", 1)); /* ending staged */
    assert_int_equal(e.n_freed, 0);
    assert_true(bt_deliver_leave(&e.dl));
    assert_int_equal(e.n_freed, 1);
    bt_deliver_drain(&e.dl);
    static const char *const want[] = {"1 tok 7,x", "2 tok 7,y", "1 fin stop 1"};
    assert_log(&e, want, 3);
    bt_deliver_close(&e.dl);
    assert_int_equal(e.n_freed, 2);
}

/* ---- closer ------------------------------------------------------------------------------------ */

typedef struct {
    bt_closer closer;
    uv_timer_t t1, t2;
    int done;
} closer_owner;

static void on_done(void *ud) { ((closer_owner *)ud)->done++; }

static void test_closer(void **st) {
    (void)st;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    closer_owner o = {0};
    bt_closer_init(&o.closer, on_done, &o);
    uv_timer_init(&loop, &o.t1);
    uv_timer_init(&loop, &o.t2);
    bt_closer_hold(&o.closer);
    bt_closer_close(&o.closer, (uv_handle_t *)&o.t1);
    bt_closer_close(&o.closer, (uv_handle_t *)&o.t2);
    uv_run(&loop, UV_RUN_DEFAULT); /* both handles closed, but not sealed yet */
    assert_int_equal(o.done, 0);
    bt_closer_seal(&o.closer);
    assert_int_equal(o.done, 0); /* the hold is still pending */
    bt_closer_release(&o.closer);
    assert_int_equal(o.done, 1);
    assert_int_equal(uv_loop_close(&loop), 0);

    /* nothing to close: done runs from the seal */
    closer_owner p = {0};
    bt_closer_init(&p.closer, on_done, &p);
    bt_closer_seal(&p.closer);
    assert_int_equal(p.done, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order_and_coalescing),
        cmocka_unit_test(test_wait),
        cmocka_unit_test(test_kill_inside_callbacks),
        cmocka_unit_test(test_stage_from_own_callback),
        cmocka_unit_test(test_close_inside_callback),
        cmocka_unit_test(test_now),
        cmocka_unit_test(test_closer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
