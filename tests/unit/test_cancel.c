/* test_cancel.c — unit tests of the cancellation contexts (common/cancel.h).
 *
 * Covers the state rules (live → stopped → killed, no downgrade, idempotence), propagation order
 * (children in link order, depth first, each parent after its children), one callback per rise,
 * linking under an already cancelled parent, unlinking, and callbacks that free, kill, link or
 * unlink contexts in the middle of a propagation. A randomised run of such callbacks checks the
 * tree invariants; memory errors show under the sanitizer build (BATON_SANITIZE=ON). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cancel.h"

/* ---- a callback that records what happened --------------------------------------------------- */

#define LOG_MAX 256

typedef struct {
    char what[LOG_MAX][32]; /* "id:state" */
    int n;
} cb_log;

typedef struct node node;
typedef void (*node_action)(node *self, bt_ctx_state s);

struct node {
    cb_log *log;
    bt_ctx *ctx;
    node_action action; /* optional extra work inside the callback */
    void *arg;
    int calls;
};

static void record(bt_ctx *c, bt_ctx_state s, void *ud) {
    node *n = ud;
    n->calls++;
    if (n->log && n->log->n < LOG_MAX)
        snprintf(n->log->what[n->log->n++], 32, "%s:%s", bt_ctx_id(c), bt_ctx_state_name(s));
    if (n->action) n->action(n, s);
}

static void mk(node *n, cb_log *log, const char *id) {
    memset(n, 0, sizeof *n);
    n->log = log;
    n->ctx = bt_ctx_new(id, record, n);
    assert_non_null(n->ctx);
}

/* A NULL-terminated list of nodes, for the helpers below. */
#define NODES(...) ((node *const[]){__VA_ARGS__, NULL})

/* Makes each node of ns, logging to log, with the ids of the space-separated list ids in order. */
static void mk_all(cb_log *log, const char *ids, node *const *ns) {
    for (; *ns; ns++) {
        char id[32];
        size_t len = strcspn(ids, " ");
        assert_true(len > 0 && len < sizeof id);
        memcpy(id, ids, len);
        id[len] = '\0';
        mk(*ns, log, id);
        ids += len + (ids[len] == ' ');
    }
    assert_int_equal(*ids, '\0'); /* as many ids as nodes */
}

/* Links each node of kids under parent, in order; the parent is live. */
static void link_all(node *parent, node *const *kids) {
    for (; *kids; kids++) assert_int_equal(bt_ctx_link(parent->ctx, (*kids)->ctx), BT_CTX_LIVE);
}

static void free_all(node *const *ns) {
    for (; *ns; ns++) bt_ctx_free((*ns)->ctx);
}

static void expect_log(const cb_log *log, const char *const *want, int nwant) {
    if (log->n != nwant) {
        for (int i = 0; i < log->n; i++) fprintf(stderr, "  got[%d] %s\n", i, log->what[i]);
    }
    assert_int_equal(log->n, nwant);
    for (int i = 0; i < nwant; i++) assert_string_equal(log->what[i], want[i]);
}

/* ---- state rules --------------------------------------------------------------------------- */

static void test_states(void **state) {
    (void)state;
    cb_log log = {0};
    node a;
    mk(&a, &log, "a");
    assert_int_equal(bt_ctx_state_of(a.ctx), BT_CTX_LIVE);
    assert_false(bt_ctx_is_stopped(a.ctx));
    assert_false(bt_ctx_is_killed(a.ctx));
    assert_string_equal(bt_ctx_id(a.ctx), "a");
    bt_ctx_stop(a.ctx);
    bt_ctx_stop(a.ctx); /* idempotent */
    assert_true(bt_ctx_is_stopped(a.ctx));
    assert_false(bt_ctx_is_killed(a.ctx));
    bt_ctx_kill(a.ctx);
    bt_ctx_kill(a.ctx);
    assert_true(bt_ctx_is_stopped(a.ctx)); /* killed implies stopped */
    assert_true(bt_ctx_is_killed(a.ctx));
    bt_ctx_stop(a.ctx); /* no downgrade */
    assert_int_equal(bt_ctx_state_of(a.ctx), BT_CTX_KILLED);
    const char *want[] = {"a:stopped", "a:killed"};
    expect_log(&log, want, 2);
    bt_ctx_free(a.ctx);
    bt_ctx_free(NULL);

    /* kill first: one callback, a later stop changes nothing */
    cb_log l2 = {0};
    node b;
    mk(&b, &l2, "b");
    bt_ctx_kill(b.ctx);
    bt_ctx_stop(b.ctx);
    const char *want2[] = {"b:killed"};
    expect_log(&l2, want2, 1);
    bt_ctx_free(b.ctx);

    /* a context without a callback, a NULL id, a long id */
    bt_ctx *q = bt_ctx_new(NULL, NULL, NULL);
    assert_string_equal(bt_ctx_id(q), "");
    bt_ctx_kill(q);
    assert_true(bt_ctx_is_killed(q));
    bt_ctx_free(q);
    char longid[300];
    memset(longid, 'x', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    q = bt_ctx_new(longid, NULL, NULL);
    assert_int_equal(strlen(bt_ctx_id(q)), 95);
    bt_ctx_free(q);
}

/* ---- propagation --------------------------------------------------------------------------- */

static void test_propagation_order(void **state) {
    (void)state;
    cb_log log = {0};
    node r, a, b, c, a1, a2;
    mk_all(&log, "r a b c a1 a2", NODES(&r, &a, &b, &c, &a1, &a2));
    link_all(&r, NODES(&a, &b, &c));
    link_all(&a, NODES(&a1, &a2));
    assert_int_equal(bt_ctx_children(r.ctx), 3);
    assert_ptr_equal(bt_ctx_parent(a1.ctx), a.ctx);
    bt_ctx_stop(r.ctx);
    const char *want[] = {"a1:stopped", "a2:stopped", "a:stopped", "b:stopped", "c:stopped", "r:stopped"};
    expect_log(&log, want, 6);
    log.n = 0;
    bt_ctx_kill(r.ctx);
    const char *want2[] = {"a1:killed", "a2:killed", "a:killed", "b:killed", "c:killed", "r:killed"};
    expect_log(&log, want2, 6);
    /* a kill of a subtree does not go up */
    log.n = 0;
    node s, t;
    mk_all(&log, "s t", NODES(&s, &t));
    link_all(&s, NODES(&t));
    bt_ctx_kill(t.ctx);
    assert_false(bt_ctx_is_stopped(s.ctx));
    const char *want3[] = {"t:killed"};
    expect_log(&log, want3, 1);
    free_all(NODES(&r, &a, &b, &c, &a1, &a2, &s, &t));
}

static void test_link_to_cancelled_parent(void **state) {
    (void)state;
    cb_log log = {0};
    node p, c1, c2, c3;
    mk_all(&log, "p c1 c2 c3", NODES(&p, &c1, &c2, &c3));
    bt_ctx_stop(p.ctx);
    log.n = 0;
    /* the child's callback runs inside link */
    assert_int_equal(bt_ctx_link(p.ctx, c1.ctx), BT_CTX_STOPPED);
    assert_int_equal(c1.calls, 1);
    bt_ctx_kill(c2.ctx); /* a killed child stays killed under a stopped parent */
    log.n = 0;
    assert_int_equal(bt_ctx_link(p.ctx, c2.ctx), BT_CTX_KILLED);
    assert_int_equal(log.n, 0);
    bt_ctx_kill(p.ctx);
    log.n = 0;
    assert_int_equal(bt_ctx_link(p.ctx, c3.ctx), BT_CTX_KILLED);
    const char *want[] = {"c3:killed"};
    expect_log(&log, want, 1);
    /* linking twice to the same parent is harmless */
    assert_int_equal(bt_ctx_link(p.ctx, c3.ctx), BT_CTX_KILLED);
    assert_int_equal(bt_ctx_children(p.ctx), 3);
    bt_ctx_free(p.ctx); /* orphans the children */
    assert_null(bt_ctx_parent(c1.ctx));
    assert_int_equal(bt_ctx_state_of(c1.ctx), BT_CTX_KILLED); /* the parent's kill reached it */
    free_all(NODES(&c1, &c2, &c3));
}

static void test_unlink_and_relink(void **state) {
    (void)state;
    cb_log log = {0};
    node p, q, c;
    mk_all(&log, "p q c", NODES(&p, &q, &c));
    link_all(&p, NODES(&c));
    bt_ctx_unlink(c.ctx);
    assert_null(bt_ctx_parent(c.ctx));
    assert_int_equal(bt_ctx_children(p.ctx), 0);
    bt_ctx_kill(p.ctx);
    assert_false(bt_ctx_is_stopped(c.ctx));
    /* relinking moves the child */
    bt_ctx_link(q.ctx, c.ctx);
    bt_ctx_link(p.ctx, c.ctx); /* p is killed: c is killed on link */
    assert_int_equal(bt_ctx_children(q.ctx), 0);
    assert_int_equal(bt_ctx_children(p.ctx), 1);
    assert_true(bt_ctx_is_killed(c.ctx));
    assert_false(bt_ctx_is_stopped(q.ctx));
    /* a freed child leaves its parent and gets no callback */
    node d;
    mk(&d, &log, "d");
    bt_ctx_link(q.ctx, d.ctx);
    bt_ctx_free(d.ctx);
    assert_int_equal(bt_ctx_children(q.ctx), 0);
    log.n = 0;
    bt_ctx_stop(q.ctx);
    const char *want[] = {"q:stopped"};
    expect_log(&log, want, 1);
    /* cycles are refused */
    node x, y;
    mk_all(&log, "x y", NODES(&x, &y));
    link_all(&x, NODES(&y));
    bt_ctx_link(y.ctx, x.ctx);
    assert_null(bt_ctx_parent(x.ctx));
    bt_ctx_link(x.ctx, x.ctx);
    assert_null(bt_ctx_parent(x.ctx));
    bt_ctx_kill(x.ctx); /* terminates */
    assert_true(bt_ctx_is_killed(y.ctx));
    free_all(NODES(&p, &q, &c, &x, &y));
}

/* ---- callbacks that change the tree ------------------------------------------------------- */

static void act_free_self(node *n, bt_ctx_state s) {
    (void)s;
    bt_ctx_free(n->ctx);
    n->ctx = NULL;
}

static void act_free_arg(node *n, bt_ctx_state s) {
    (void)s;
    node *o = n->arg;
    if (o->ctx) bt_ctx_free(o->ctx);
    o->ctx = NULL;
}

static void test_callback_frees(void **state) {
    (void)state;
    cb_log log = {0};
    /* every context frees itself in its callback */
    node r, a, b;
    mk_all(&log, "r a b", NODES(&r, &a, &b));
    link_all(&r, NODES(&a, &b));
    r.action = a.action = b.action = act_free_self;
    bt_ctx_kill(r.ctx);
    const char *want[] = {"a:killed", "b:killed", "r:killed"};
    expect_log(&log, want, 3);
    assert_null(r.ctx);

    /* the first child frees the root (its parent) and a sibling not yet visited */
    log.n = 0;
    node r2, c1, c2, c3;
    mk_all(&log, "r2 c1 c2 c3", NODES(&r2, &c1, &c2, &c3));
    link_all(&r2, NODES(&c1, &c2, &c3));
    c1.action = act_free_arg;
    c1.arg = &c2;
    node *pr = &r2;
    c3.action = act_free_arg;
    c3.arg = pr;
    bt_ctx_kill(r2.ctx);
    /* c2 was freed before its turn: no callback. r2 was freed by c3: no callback. */
    const char *want2[] = {"c1:killed", "c3:killed"};
    expect_log(&log, want2, 2);
    assert_int_equal(c2.calls, 0);
    assert_int_equal(r2.calls, 0);
    free_all(NODES(&c1, &c3));
}

static node *g_newborn;

static void act_link_new(node *n, bt_ctx_state s) {
    (void)s;
    node *parent = n->arg;
    if (g_newborn && !bt_ctx_parent(g_newborn->ctx)) {
        bt_ctx_state got = bt_ctx_link(parent->ctx, g_newborn->ctx);
        assert_int_equal(got, BT_CTX_KILLED); /* the parent's state is already raised */
    }
}

static void test_callback_links_during_propagation(void **state) {
    (void)state;
    cb_log log = {0};
    node r, a, nb;
    mk_all(&log, "r a new", NODES(&r, &a, &nb));
    link_all(&r, NODES(&a));
    a.action = act_link_new;
    a.arg = &r;
    g_newborn = &nb;
    bt_ctx_kill(r.ctx);
    g_newborn = NULL;
    /* the newborn is cancelled exactly once, inside link, and the root reports last */
    const char *want[] = {"a:killed", "new:killed", "r:killed"};
    expect_log(&log, want, 3);
    assert_int_equal(nb.calls, 1);
    free_all(NODES(&r, &a, &nb));
}

static void act_kill_arg(node *n, bt_ctx_state s) {
    (void)s;
    bt_ctx_kill(((node *)n->arg)->ctx);
}

static void test_kill_overtakes_stop(void **state) {
    (void)state;
    cb_log log = {0};
    node r, a, b;
    mk_all(&log, "r a b", NODES(&r, &a, &b));
    link_all(&r, NODES(&a, &b));
    a.action = act_kill_arg; /* a's stop callback kills the root */
    a.arg = &r;
    bt_ctx_stop(r.ctx);
    /* a saw the stop, then the kill reached a (again), b and r; r reports only the kill; b never
     * sees a stop after its kill */
    const char *want[] = {"a:stopped", "a:killed", "b:killed", "r:killed"};
    expect_log(&log, want, 4);
    assert_int_equal(r.calls, 1);
    assert_int_equal(b.calls, 1);
    free_all(NODES(&r, &a, &b));
}

static void act_unlink_next(node *n, bt_ctx_state s) {
    (void)s;
    bt_ctx_unlink(((node *)n->arg)->ctx);
}

static void test_callback_unlinks_sibling(void **state) {
    (void)state;
    cb_log log = {0};
    node r, a, b, c;
    mk_all(&log, "r a b c", NODES(&r, &a, &b, &c));
    link_all(&r, NODES(&a, &b, &c));
    a.action = act_unlink_next;
    a.arg = &b;
    bt_ctx_stop(r.ctx);
    const char *want[] = {"a:stopped", "c:stopped", "r:stopped"};
    expect_log(&log, want, 3);
    assert_false(bt_ctx_is_stopped(b.ctx));
    free_all(NODES(&r, &a, &b, &c));
}

/* ---- randomised: callbacks free, kill, stop, link at random; invariants hold ------------------- */

#define RN 40

typedef struct {
    bt_ctx *ctx[RN];
    int calls[RN][3];
    bt_ctx_state last[RN];
    unsigned seed;
} rnd;

static rnd *g_r;

static unsigned rnd_next(unsigned *s) {
    *s = *s * 1103515245u + 12345u;
    return (*s >> 16) & 0x7fff;
}

static void rnd_cb(bt_ctx *c, bt_ctx_state s, void *ud) {
    int i = (int)(intptr_t)ud;
    rnd *r = g_r;
    assert_ptr_equal(r->ctx[i], c);
    assert_true(s > r->last[i]); /* states only rise, one callback per rise */
    r->last[i] = s;
    r->calls[i][s]++;
    int j = (int)(rnd_next(&r->seed) % RN);
    switch (rnd_next(&r->seed) % 6) {
    case 0:
        bt_ctx_free(r->ctx[j]);
        r->ctx[j] = NULL;
        break;
    case 1:
        if (r->ctx[j]) bt_ctx_kill(r->ctx[j]);
        break;
    case 2:
        if (r->ctx[j]) bt_ctx_stop(r->ctx[j]);
        break;
    case 3:
        if (r->ctx[j] && r->ctx[i]) bt_ctx_link(r->ctx[i], r->ctx[j]);
        break;
    default: break;
    }
}

static void check_invariants(rnd *r) {
    for (int i = 0; i < RN; i++) {
        if (!r->ctx[i]) continue;
        bt_ctx *p = bt_ctx_parent(r->ctx[i]);
        if (p) assert_true(bt_ctx_state_of(r->ctx[i]) >= bt_ctx_state_of(p)); /* no live child of a dead parent */
        assert_true(r->last[i] == bt_ctx_state_of(r->ctx[i]) || r->last[i] < bt_ctx_state_of(r->ctx[i]));
        for (int s = 1; s < 3; s++) assert_true(r->calls[i][s] <= 1);
    }
}

static void test_randomised(void **state) {
    (void)state;
    for (unsigned round = 0; round < 300; round++) {
        rnd *r = calloc(1, sizeof *r);
        assert_non_null(r);
        g_r = r;
        r->seed = round * 7919u + 1;
        for (int i = 0; i < RN; i++) {
            r->ctx[i] = bt_ctx_new("n", rnd_cb, (void *)(intptr_t)i);
            assert_non_null(r->ctx[i]);
        }
        for (int i = 1; i < RN; i++) bt_ctx_link(r->ctx[rnd_next(&r->seed) % (unsigned)i], r->ctx[i]);
        for (int op = 0; op < 30; op++) {
            int i = (int)(rnd_next(&r->seed) % RN);
            if (!r->ctx[i]) continue;
            if (rnd_next(&r->seed) % 2) bt_ctx_kill(r->ctx[i]);
            else bt_ctx_stop(r->ctx[i]);
            check_invariants(r);
        }
        for (int i = 0; i < RN; i++) bt_ctx_free(r->ctx[i]);
        g_r = NULL;
        free(r);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_states),
        cmocka_unit_test(test_propagation_order),
        cmocka_unit_test(test_link_to_cancelled_parent),
        cmocka_unit_test(test_unlink_and_relink),
        cmocka_unit_test(test_callback_frees),
        cmocka_unit_test(test_callback_links_during_propagation),
        cmocka_unit_test(test_kill_overtakes_stop),
        cmocka_unit_test(test_callback_unlinks_sibling),
        cmocka_unit_test(test_randomised),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
