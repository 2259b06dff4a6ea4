/* deliver.h — the engines' delivery of sink callbacks and the liveness rules around them, in one
 * place (engine.h states the rules an engine promises the worker; this module keeps them).
 *
 * An engine embeds one bt_deliver and, in each of its sequence handles, one bt_deliver_seq. The
 * module then owns:
 *  - the sink and its user data, and the sequence's liveness: live → ending staged → dead. A
 *    sequence is dead once it was killed or its ending was delivered; a dead sequence gets no
 *    callback, ever;
 *  - a queue of pending events per engine: output staged with bt_deliver_stage (coalesced per
 *    sequence until the next drain) and the ending staged with bt_deliver_finish /
 *    bt_deliver_error. bt_deliver_drain hands them to the sinks in queue order, each sequence's
 *    output before its ending. Engines drain from their own loop callbacks (a timer, an idle, an
 *    async), never from submit, stop or kill, which only stage;
 *  - re-entrancy: every engine loop callback that may reach user code is bracketed by
 *    bt_deliver_enter / bt_deliver_leave. While one is on the stack (depth > 0) a killed or
 *    finished sequence keeps its memory (the engine's code above may still hold a pointer to it:
 *    it checks bt_deliver_dead) and is freed, through ops.free_seq, when the outermost callback
 *    unwinds; and bt_deliver_close (the engine's destroy) only marks the engine closed: the drain
 *    stops at once, and the sequences are freed and ops.teardown runs at the outermost leave.
 *    So a sink or hook callback may submit, stop or kill any sequence (its own included) and may
 *    destroy the engine;
 *  - the set of every sequence not yet freed (bt_deliver_first / bt_deliver_next), so that close
 *    frees them all.
 *
 * An engine whose work runs on its own thread (llama.cpp, via uv_async) uses it from the loop side
 * only; nothing here may be called from another thread. Its thread posts events to a queue of its
 * own under its own mutex and wakes the loop with uv_async_send; the async callback does
 * bt_deliver_enter, moves each posted event in with bt_deliver_stage / bt_deliver_finish /
 * bt_deliver_error (dropping those of sequences that bt_deliver_dead reports), bt_deliver_drain,
 * then bt_deliver_leave. Its kill marks the handle with bt_deliver_kill and tells the thread;
 * because the thread may still name the handle in events on their way, its ops.free_seq (called
 * once the module has released its part of the handle; bt_deliver_dead stays readable) keeps the
 * handle's memory until the thread's last event for it has been taken off its queue (or the
 * thread has been joined, in close).
 *
 * Loop thread only. No function here blocks. */
#ifndef BATON_ENGINE_DELIVER_H
#define BATON_ENGINE_DELIVER_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "common/util.h"
#include "engine/engine.h"

typedef enum { BT_DELIVER_LIVE = 0, BT_DELIVER_ENDING, BT_DELIVER_DEAD } bt_deliver_state;
typedef enum { BT_DELIVER_END_NONE = 0, BT_DELIVER_END_FINISH, BT_DELIVER_END_ERROR } bt_deliver_end;

#define BT_DELIVER_MSG_MAX 256

typedef struct bt_deliver_seq {
    bt_engine_sink sink;
    void *ud;
    bt_deliver_state state;
    bool queued;                       /* on the pending queue */
    TAILQ_ENTRY(bt_deliver_seq) queue; /* pending queue */
    LIST_ENTRY(bt_deliver_seq) all;    /* every sequence not yet freed (the graveyard once dead) */
    /* staged output */
    uint32_t *ids;
    size_t n_ids, cap_ids;
    bt_buf text;
    /* staged wait (bt_engine_sink.on_wait): told after the staged output, dropped by later output */
    bool wait_staged;
    bt_engine_wait wait_reason;
    /* staged ending */
    bt_deliver_end end;
    bt_finish_reason reason;
    bt_usage usage;
    bt_status err;
    char msg[BT_DELIVER_MSG_MAX];
} bt_deliver_seq;

typedef struct {
    /* Frees the engine's sequence that embeds s (after bt_deliver_seq_release). s is no longer
     * known to the module; it is dead, no callback is made for it. */
    void (*free_seq)(void *owner, bt_deliver_seq *s);
    /* Something was queued: the engine arranges a drain from its loop (an idle, a timer). Called
     * at most once per sequence per queueing, never while the engine is closed. */
    void (*wake)(void *owner);
    /* bt_deliver_close was called and no engine callback is on the stack any more: every
     * sequence has been freed; the engine closes its handles (and frees itself in their close
     * callbacks). Called once. */
    void (*teardown)(void *owner);
} bt_deliver_ops;

typedef struct bt_deliver {
    TAILQ_HEAD(, bt_deliver_seq) pending;
    LIST_HEAD(, bt_deliver_seq) seqs;      /* live or ending */
    LIST_HEAD(, bt_deliver_seq) graveyard; /* dead, memory kept until the outermost leave */
    int depth;
    bool closed, torn_down;
    const bt_deliver_ops *ops;
    void *owner;
} bt_deliver;

/* The engine's `container_of`: the sequence handle that embeds the bt_deliver_seq `ds`. */
#define BT_DELIVER_OWNER(ds, type, member) ((type *)(void *)((char *)(ds)-offsetof(type, member)))

void bt_deliver_init(bt_deliver *d, const bt_deliver_ops *ops, void *owner);

/* Registers a new sequence (live, nothing staged). text_cap bounds its staged text (bt_buf cap).
 * The sink is copied. */
void bt_deliver_add(bt_deliver *d, bt_deliver_seq *s, const bt_engine_sink *sink, void *ud, size_t text_cap);

/* Frees the module's buffers in s; for the engine's free_seq (and for a sequence that failed
 * before bt_deliver_add finished: it may be called on a zeroed bt_deliver_seq). */
void bt_deliver_seq_release(bt_deliver_seq *s);

/* Appends output (ids and their text) to what s will receive at the next drain; queues s. Token
 * ids end a staged wait (bt_deliver_wait): the sequence runs again. A no-op for a sequence that is
 * not live. BT_ERR_NOMEM or BT_ERR_TOO_LARGE: nothing was added. */
bt_status bt_deliver_stage(bt_deliver *d, bt_deliver_seq *s, const uint32_t *ids, size_t n, const char *text,
                           size_t text_len);

/* Delivers output at once, for an engine that parses its output inside one of its own loop
 * callbacks (depth > 0) and stages none for s. False when s is dead or its ending is staged
 * afterwards, or the engine was closed, so that the caller stops working on it. */
bool bt_deliver_now(bt_deliver *d, bt_deliver_seq *s, const uint32_t *ids, size_t n, const char *text, size_t text_len);

/* The engine holds s without computing it (engine.h, bt_engine_sink.on_wait): its sink is told at
 * the next drain, after the output staged before, unless output staged after this call ends the
 * wait first or its ending is staged (then nothing is told). A no-op for a sequence that is not live
 * or whose sink has no on_wait. */
void bt_deliver_wait(bt_deliver *d, bt_deliver_seq *s, bt_engine_wait reason);

/* Stages the ending (the first one counts; later ones and those of dead sequences are ignored);
 * delivered after the staged output at the next drain. msg may be NULL. */
void bt_deliver_finish(bt_deliver *d, bt_deliver_seq *s, bt_finish_reason reason, const bt_usage *usage);
void bt_deliver_error(bt_deliver *d, bt_deliver_seq *s, bt_status code, const char *msg);
/* bt_deliver_error with the message formatted (truncated to BT_DELIVER_MSG_MAX - 1 bytes). */
void bt_deliver_verror(bt_deliver *d, bt_deliver_seq *s, bt_status code, const char *fmt, va_list ap)
    __attribute__((format(printf, 4, 0)));

/* The worker killed s: it is dead now (no callback), leaves the queue, and is freed through
 * ops.free_seq at once, or at the outermost leave when a callback is on the stack. The engine has
 * taken it out of its own scheduling first. */
void bt_deliver_kill(bt_deliver *d, bt_deliver_seq *s);

/* Hands pending output and endings to the sinks; stops at once when a callback closes the engine. */
void bt_deliver_drain(bt_deliver *d);

void bt_deliver_enter(bt_deliver *d);
/* Leaves one level; at the outermost one frees the graveyard and, when closed, every sequence,
 * then calls ops.teardown. False when the engine is closed (the caller touches nothing more but
 * what its teardown left alive). */
bool bt_deliver_leave(bt_deliver *d);

/* The engine is being destroyed: no callback from here on; sequences freed and teardown called
 * now, or at the outermost leave. Idempotent. */
void bt_deliver_close(bt_deliver *d);

static inline bool bt_deliver_dead(const bt_deliver_seq *s) { return s->state == BT_DELIVER_DEAD; }
static inline bool bt_deliver_ended(const bt_deliver_seq *s) { return s->state != BT_DELIVER_LIVE; }
static inline bool bt_deliver_busy(const bt_deliver *d) { return d->depth > 0; }
static inline bool bt_deliver_closed(const bt_deliver *d) { return d->closed; }
static inline bool bt_deliver_pending(const bt_deliver *d) { return !TAILQ_EMPTY(&d->pending); }
static inline bt_deliver_seq *bt_deliver_first(bt_deliver *d) { return LIST_FIRST(&d->seqs); }
static inline bt_deliver_seq *bt_deliver_next(bt_deliver_seq *s) { return LIST_NEXT(s, all); }

#endif
