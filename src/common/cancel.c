/* cancel.c — cancellation contexts (see cancel.h for the contract).
 *
 * Memory safety under callbacks that free contexts rests on two things. Every context carries a
 * reference count: one reference for its owner (dropped by bt_ctx_free) and one for each
 * propagation step working on it, so memory outlives the step even if the owner lets go in a
 * callback. And the walk over a context's children never keeps a pointer across a callback: each
 * child has a link number that grows along the list, and after each child the walk finds the next
 * one by number from the head again, so children unlinked, freed or added meanwhile are handled
 * (a child added during the walk is visited too). Lists are short (a request has a handful of
 * attempts), so the rescan costs nothing worth saving. */
#include "common/cancel.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/queue.h>

#include "common/util.h"

struct bt_ctx {
    bt_ctx_state state;
    bt_ctx_state reported; /* the last state the callback was told about */
    bt_ctx_cb cb;
    void *ud;
    bt_ctx *parent;
    TAILQ_HEAD(ctx_children, bt_ctx) children; /* in link order */
    TAILQ_ENTRY(bt_ctx) sibling;
    uint64_t seq;          /* link number under the parent: grows along the parent's list */
    uint64_t next_seq;     /* the next link number handed to a child of this context */
    size_t nchildren;
    unsigned refs;
    bool freed; /* the owner gave it up */
    char id[96];
};

static void ctx_ref(bt_ctx *c) { c->refs++; }

static void ctx_unref(bt_ctx *c) {
    if (--c->refs == 0) free(c);
}

bt_ctx *bt_ctx_new(const char *id, bt_ctx_cb cb, void *ud) {
    bt_ctx *c = bt_zalloc(sizeof *c); /* made at every request and attempt (util.h) */
    if (!c) return NULL;
    c->cb = cb;
    c->ud = ud;
    c->refs = 1;
    TAILQ_INIT(&c->children);
    bt_copy_str(c->id, sizeof c->id, id ? id : "");
    return c;
}

static void detach(bt_ctx *c) {
    bt_ctx *p = c->parent;
    if (!p) return;
    TAILQ_REMOVE(&p->children, c, sibling);
    p->nchildren--;
    c->parent = NULL;
    c->seq = 0;
}

void bt_ctx_free(bt_ctx *c) {
    if (!c || c->freed) return;
    c->freed = true;
    c->cb = NULL;
    c->ud = NULL;
    detach(c);
    while (!TAILQ_EMPTY(&c->children)) detach(TAILQ_FIRST(&c->children));
    ctx_unref(c);
}

void bt_ctx_set_cb(bt_ctx *c, bt_ctx_cb cb, void *ud) {
    if (!c || c->freed) return;
    c->cb = cb;
    c->ud = ud;
}

const char *bt_ctx_id(const bt_ctx *c) { return c ? c->id : ""; }
bt_ctx_state bt_ctx_state_of(const bt_ctx *c) { return c ? c->state : BT_CTX_LIVE; }
bool bt_ctx_is_stopped(const bt_ctx *c) { return c && c->state != BT_CTX_LIVE; }
bool bt_ctx_is_killed(const bt_ctx *c) { return c && c->state == BT_CTX_KILLED; }
bt_ctx *bt_ctx_parent(const bt_ctx *c) { return c ? c->parent : NULL; }
size_t bt_ctx_children(const bt_ctx *c) { return c ? c->nchildren : 0; }

const char *bt_ctx_state_name(bt_ctx_state s) {
    switch (s) {
    case BT_CTX_LIVE: return "live";
    case BT_CTX_STOPPED: return "stopped";
    case BT_CTX_KILLED: return "killed";
    }
    return "?";
}

/* Raises c to `to` (if it is lower), then its children in link order, then tells c's callback. */
static void raise_state(bt_ctx *c, bt_ctx_state to) {
    if (c->freed || c->state >= to) return;
    ctx_ref(c);
    c->state = to;
    uint64_t done = 0;
    for (;;) {
        bt_ctx *ch = TAILQ_FIRST(&c->children);
        while (ch && ch->seq <= done) ch = TAILQ_NEXT(ch, sibling);
        if (!ch) break;
        done = ch->seq;
        raise_state(ch, to);
    }
    /* Report the state as it is now: a kill that overtook this stop has been reported already. */
    if (!c->freed && c->cb && c->reported < c->state) {
        bt_ctx_state s = c->state;
        c->reported = s;
        c->cb(c, s, c->ud);
    }
    ctx_unref(c);
}

void bt_ctx_stop(bt_ctx *c) {
    if (c) raise_state(c, BT_CTX_STOPPED);
}

void bt_ctx_kill(bt_ctx *c) {
    if (c) raise_state(c, BT_CTX_KILLED);
}

bt_ctx_state bt_ctx_link(bt_ctx *parent, bt_ctx *child) {
    if (!child) return BT_CTX_LIVE;
    if (!parent || parent->freed || child->freed) return child->state;
    for (bt_ctx *a = parent; a; a = a->parent)
        if (a == child) return child->state; /* would make a cycle */
    if (child->parent != parent) {
        detach(child);
        child->parent = parent;
        child->seq = ++parent->next_seq;
        TAILQ_INSERT_TAIL(&parent->children, child, sibling);
        parent->nchildren++;
    }
    ctx_ref(child);
    if (parent->state > child->state) raise_state(child, parent->state);
    bt_ctx_state s = child->state;
    ctx_unref(child);
    return s;
}

void bt_ctx_unlink(bt_ctx *child) {
    if (child) detach(child);
}
