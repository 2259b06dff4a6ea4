/* cancel.h — cancellation contexts: one per request (and per attempt, per engine stream), linked
 * into trees so that a stop or a kill given at the root reaches every piece of work below it.
 *
 * States only rise: live → stopped → killed. `stop` asks for a graceful end (return what was
 * generated, finish reason "cancelled"); `kill` ends at once. Killed implies stopped. A stop after
 * a kill changes nothing (Dynamo's controller overwrites killed with stopped; baton does not).
 * Both are idempotent.
 *
 * Propagation order of bt_ctx_stop / bt_ctx_kill on a context c:
 *   1. c's state is raised (so that anything looking at c from here on sees it cancelled, and a
 *      child linked to c from a callback during the propagation is cancelled at link);
 *   2. the same operation runs on each child, in the order they were linked (depth first);
 *   3. c's callback runs, once, with c's new state.
 * So a parent's callback runs after every child's: a frontend request (root) can end itself in
 * its callback after each attempt (child) has sent its STOP/KILL frame. The callback is made for
 * each rise of the state: once for stopped and once more for killed when a kill follows a stop.
 * When a kill overtakes a stop inside the stop's own propagation (a callback kills), the callback
 * sees only the kill.
 *
 * bt_ctx_link(parent, child) on a parent that is already stopped or killed cancels the child the
 * same way, synchronously: the child's callback runs inside bt_ctx_link, before it returns. The
 * return value tells the caller which state the child is in, so a caller that must not start work
 * for a cancelled child checks it (and is ready for its own callback to have run already).
 *
 * Ownership: bt_ctx_new returns a context owned by the caller; bt_ctx_free gives it up. Freeing
 * unlinks the context from its parent (it is the "unlink on child completion" step) and orphans
 * its children (they keep their state and their own owners). A callback may free any context —
 * its own, its parent, a sibling, a child — and may stop, kill, link or unlink any context: the
 * module holds a reference on every context it is working on and releases the memory only when
 * both the owner and the module are done with it. After bt_ctx_free the owner must not touch the
 * context again; no callback is made for a freed context.
 *
 * A context belongs to one loop (one thread); nothing here is thread-safe. */
#ifndef BATON_CANCEL_H
#define BATON_CANCEL_H

#include <stdbool.h>
#include <stddef.h>

typedef enum { BT_CTX_LIVE = 0, BT_CTX_STOPPED = 1, BT_CTX_KILLED = 2 } bt_ctx_state;

typedef struct bt_ctx bt_ctx;

/* Called once per rise of the state (see above). `state` is the new state. */
typedef void (*bt_ctx_cb)(bt_ctx *c, bt_ctx_state state, void *ud);

/* A live context with an id (copied, truncated to 95 bytes; NULL gives "") and a callback (may be
 * NULL). Returns NULL when out of memory. */
bt_ctx *bt_ctx_new(const char *id, bt_ctx_cb cb, void *ud);
/* Gives the owner's reference up: unlinks from the parent, orphans the children, no further
 * callback. NULL is a no-op. */
void bt_ctx_free(bt_ctx *c);

/* Replaces the callback (NULL silences the context). */
void bt_ctx_set_cb(bt_ctx *c, bt_ctx_cb cb, void *ud);

const char *bt_ctx_id(const bt_ctx *c);
bt_ctx_state bt_ctx_state_of(const bt_ctx *c);
bool bt_ctx_is_stopped(const bt_ctx *c); /* stopped or killed */
bool bt_ctx_is_killed(const bt_ctx *c);
const char *bt_ctx_state_name(bt_ctx_state s); /* "live", "stopped", "killed" */

void bt_ctx_stop(bt_ctx *c);
void bt_ctx_kill(bt_ctx *c);

/* Links child under parent, after the parent's existing children. A child linked elsewhere is
 * moved. Linking that would make a cycle (parent is child or below it) is refused and returns the
 * child's state unchanged. If the parent is stopped or killed, the child is brought to the same
 * state now (its callback runs before this returns). Returns the child's state afterwards. */
bt_ctx_state bt_ctx_link(bt_ctx *parent, bt_ctx *child);
/* Detaches child from its parent, if any; its state is kept. */
void bt_ctx_unlink(bt_ctx *child);

bt_ctx *bt_ctx_parent(const bt_ctx *c);
size_t bt_ctx_children(const bt_ctx *c);

#endif
