/* deliver.c — pending sink events of one engine and the liveness of its sequences (deliver.h).
 *
 * Owns the staged output and endings and the three lists (pending queue, every sequence, the
 * graveyard); the sequences' memory stays the engine's, freed only through ops.free_seq. It never
 * calls a sink from stage, finish, error, kill or close, only from drain or now; and it never
 * frees a sequence while an engine callback is on the stack, so code above a sink callback may
 * keep its pointer and ask bt_deliver_dead. */
#include "engine/deliver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void bt_deliver_init(bt_deliver *d, const bt_deliver_ops *ops, void *owner) {
    memset(d, 0, sizeof *d);
    TAILQ_INIT(&d->pending);
    LIST_INIT(&d->seqs);
    LIST_INIT(&d->graveyard);
    d->ops = ops;
    d->owner = owner;
}

void bt_deliver_add(bt_deliver *d, bt_deliver_seq *s, const bt_engine_sink *sink, void *ud, size_t text_cap) {
    s->sink = *sink;
    s->ud = ud;
    s->state = BT_DELIVER_LIVE;
    s->queued = false;
    s->wait_staged = false;
    s->end = BT_DELIVER_END_NONE;
    bt_buf_init(&s->text, text_cap);
    LIST_INSERT_HEAD(&d->seqs, s, all);
}

void bt_deliver_seq_release(bt_deliver_seq *s) {
    free(s->ids);
    s->ids = NULL;
    s->n_ids = s->cap_ids = 0;
    bt_buf_free(&s->text);
}

static void enqueue(bt_deliver *d, bt_deliver_seq *s) {
    if (s->queued || d->closed) return;
    s->queued = true;
    TAILQ_INSERT_TAIL(&d->pending, s, queue);
    if (d->ops->wake) d->ops->wake(d->owner);
}

static void dequeue(bt_deliver *d, bt_deliver_seq *s) {
    if (!s->queued) return;
    TAILQ_REMOVE(&d->pending, s, queue);
    s->queued = false;
}

/* s is dead: it leaves the set of sequences; its memory goes now or at the outermost leave. */
static void bury(bt_deliver *d, bt_deliver_seq *s) {
    s->state = BT_DELIVER_DEAD;
    dequeue(d, s);
    LIST_REMOVE(s, all);
    if (d->depth > 0) {
        LIST_INSERT_HEAD(&d->graveyard, s, all);
        return;
    }
    bt_deliver_seq_release(s);
    d->ops->free_seq(d->owner, s);
}

bt_status bt_deliver_stage(bt_deliver *d, bt_deliver_seq *s, const uint32_t *ids, size_t n, const char *text,
                           size_t text_len) {
    if (s->state != BT_DELIVER_LIVE) return BT_OK;
    if (s->n_ids + n > s->cap_ids) {
        size_t cap = s->cap_ids ? s->cap_ids : 16;
        while (cap < s->n_ids + n) cap *= 2;
        uint32_t *p = realloc(s->ids, cap * sizeof *p);
        if (!p) return BT_ERR_NOMEM;
        s->ids = p;
        s->cap_ids = cap;
    }
    if (text_len) {
        bt_status st = bt_buf_append(&s->text, text, text_len);
        if (st != BT_OK) return st;
    }
    if (n) memcpy(s->ids + s->n_ids, ids, n * sizeof *ids);
    s->n_ids += n;
    if (n) s->wait_staged = false; /* it ran again since: that wait is over */
    enqueue(d, s);
    return BT_OK;
}

void bt_deliver_wait(bt_deliver *d, bt_deliver_seq *s, bt_engine_wait reason) {
    if (s->state != BT_DELIVER_LIVE || !s->sink.on_wait) return;
    s->wait_staged = true;
    s->wait_reason = reason;
    enqueue(d, s);
}

bool bt_deliver_now(bt_deliver *d, bt_deliver_seq *s, const uint32_t *ids, size_t n, const char *text,
                    size_t text_len) {
    if (d->closed || s->state != BT_DELIVER_LIVE) return false;
    s->sink.on_tokens(s->ud, ids, n, text ? text : "", text_len);
    return !d->closed && s->state == BT_DELIVER_LIVE;
}

static void stage_end(bt_deliver *d, bt_deliver_seq *s, bt_deliver_end end) {
    s->end = end;
    s->state = BT_DELIVER_ENDING;
    enqueue(d, s);
}

void bt_deliver_finish(bt_deliver *d, bt_deliver_seq *s, bt_finish_reason reason, const bt_usage *usage) {
    if (s->state != BT_DELIVER_LIVE) return;
    s->reason = reason;
    if (usage) s->usage = *usage;
    stage_end(d, s, BT_DELIVER_END_FINISH);
}

void bt_deliver_error(bt_deliver *d, bt_deliver_seq *s, bt_status code, const char *msg) {
    if (s->state != BT_DELIVER_LIVE) return;
    s->err = code;
    snprintf(s->msg, sizeof s->msg, "%s", msg ? msg : "");
    stage_end(d, s, BT_DELIVER_END_ERROR);
}

void bt_deliver_verror(bt_deliver *d, bt_deliver_seq *s, bt_status code, const char *fmt, va_list ap) {
    if (s->state != BT_DELIVER_LIVE) return;
    s->err = code;
    vsnprintf(s->msg, sizeof s->msg, fmt, ap);
    stage_end(d, s, BT_DELIVER_END_ERROR);
}

void bt_deliver_kill(bt_deliver *d, bt_deliver_seq *s) {
    if (s->state == BT_DELIVER_DEAD) return;
    bury(d, s);
}

/* Calls on_tokens with what s has staged. The buffers are taken out of s first: the callback may
 * stage more for s (a stop releases held-back text), which then goes to fresh buffers. */
static void deliver_output(bt_deliver_seq *s) {
    uint32_t *ids = s->ids;
    size_t n = s->n_ids, cap = s->cap_ids;
    bt_buf text = s->text;
    s->ids = NULL;
    s->n_ids = s->cap_ids = 0;
    bt_buf_init(&s->text, text.cap);
    s->sink.on_tokens(s->ud, ids, n, text.data ? text.data : "", text.len);
    if (!s->ids && !s->text.data) { /* nothing new: keep the allocations for the next batch */
        s->ids = ids;
        s->cap_ids = cap;
        s->text = text;
        bt_buf_reset(&s->text);
    } else {
        free(ids);
        bt_buf_free(&text);
    }
}

void bt_deliver_drain(bt_deliver *d) {
    bt_deliver_seq *s;
    bt_deliver_enter(d);
    while (!d->closed && (s = TAILQ_FIRST(&d->pending)) != NULL) {
        dequeue(d, s);
        /* s stays in memory until the outermost leave whatever its callbacks do (depth > 0) */
        while (s->n_ids && s->state != BT_DELIVER_DEAD) {
            deliver_output(s);
            if (d->closed) goto out;
            dequeue(d, s); /* what the callback staged for s is delivered now, in order */
        }
        if (s->wait_staged && s->state == BT_DELIVER_LIVE) { /* after the output that came before it */
            s->wait_staged = false;
            s->sink.on_wait(s->ud, s->wait_reason);
            if (d->closed) goto out;
        }
        if (s->state != BT_DELIVER_ENDING) continue;
        bury(d, s); /* the handle is dead once the sink hears the ending */
        if (s->end == BT_DELIVER_END_FINISH) s->sink.on_finish(s->ud, s->reason, &s->usage);
        else s->sink.on_error(s->ud, s->err, s->msg);
    }
out:
    bt_deliver_leave(d);
}

void bt_deliver_enter(bt_deliver *d) { d->depth++; }

/* Frees the sequences that died while a callback was on the stack. */
static void free_graveyard(bt_deliver *d) {
    bt_deliver_seq *s;
    while ((s = LIST_FIRST(&d->graveyard)) != NULL) {
        LIST_REMOVE(s, all);
        bt_deliver_seq_release(s);
        d->ops->free_seq(d->owner, s);
    }
}

static void finish_close(bt_deliver *d) {
    bt_deliver_seq *s;
    d->torn_down = true;
    while ((s = TAILQ_FIRST(&d->pending)) != NULL) dequeue(d, s);
    while ((s = LIST_FIRST(&d->seqs)) != NULL) {
        s->state = BT_DELIVER_DEAD;
        LIST_REMOVE(s, all);
        bt_deliver_seq_release(s);
        d->ops->free_seq(d->owner, s);
    }
    free_graveyard(d);
    if (d->ops->teardown) d->ops->teardown(d->owner);
}

bool bt_deliver_leave(bt_deliver *d) {
    if (--d->depth > 0) return !d->closed;
    free_graveyard(d);
    if (d->closed && !d->torn_down) finish_close(d);
    return !d->closed;
}

void bt_deliver_close(bt_deliver *d) {
    if (d->closed) return;
    d->closed = true;
    if (d->depth == 0) finish_close(d);
}
