/* mocker.c — the simulated engine: Dynamo's mocker scheduler and timing model on a libuv timer,
 * producing the deterministic token stream of vocab.c.
 *
 * Sequences move waiting → running (prefill, then decode) → done. Each scheduler step admits
 * waiting sequences in (priority, arrival) order (lower priority values first, FIFO among equals)
 * while their KV blocks fit under the watermark, the batched-token
 * budget and max_num_seqs allow; prefills up to max_num_batched_tokens prompt tokens (a longer
 * prompt is prefilled in chunks over several steps); then lets every decoding sequence emit one
 * token, allocating a block when a sequence crosses a block boundary and preempting the most
 * recently admitted of the least urgent decoding sequences when none is free. A waiting sequence
 * that cannot be admitted (no sequence slot or not enough KV blocks) preempts, by the same path,
 * decoding sequences strictly less urgent than itself (priority preemption, as vLLM's priority
 * policy), except one preempted for priority that has not produced a token since. A step lasts
 * (prefill_ms + decode_ms) / speedup_ratio of a virtual clock; each tick (a uv_timer set for the
 * end of the current step, or a uv_idle when the clock is behind real time) runs the steps whose
 * start time has come (at most 64 or 2 ms of work, then it yields to the loop) and delivers
 * their output once real time has reached the end of the step that produced it, coalesced into
 * one on_tokens call per sequence per tick. Sink and hook callbacks are only made from a tick, never from
 * submit, stop, kill or inject; the staged output, the endings and the rules that let a callback
 * submit, stop or kill any sequence (its own included) or destroy the engine are engine/deliver.h's.
 * With --batch-gather-us, the first step of an idle engine waits for the rest of a burst
 * (bt_engine_gather, engine.h): to the microsecond, on a timerfd polled by the loop, since a libuv
 * timer counts whole milliseconds and the window is a fraction of one.
 * KV accounting is a counter of blocks per sequence:
 * there is no prefix caching, so no block is shared. */
#include "engine/mocker/mocker.h"
#include "engine/stops.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "common/closer.h"
#include "common/jstr.h"
#include "common/log.h"
#include "common/util.h"
#include "engine/deliver.h"
#include "engine/mocker/mocker_internal.h"
#include "engine/params.h"

#define MK_MAX_STEPS_PER_CB 64
#define MK_MAX_NS_PER_CB 2000000ull
#define MK_TEXT_CAP ((size_t)1 << 30) /* hard cap on any per-sequence text buffer */

/* SEQ_NEW (0, from calloc) until the sequence first enters a queue; SEQ_DONE once it has ended. */
typedef enum { SEQ_NEW = 0, SEQ_WAITING, SEQ_PREFILL, SEQ_DECODE, SEQ_DONE } mk_phase;
typedef enum { END_FINISH, END_ERROR } mk_end;

typedef struct mk_engine mk_engine;

struct bt_engine_seq {
    bt_deliver_seq dl; /* sink, staged output, ending, liveness */
    mk_phase phase;
    int32_t priority; /* lower is admitted sooner; the waiting queue is sorted by it */
    bool prio_held;   /* preempted for priority and no token since: not preempted for priority again */
    bool wait_told;   /* waiting, and its sink was told (bt_deliver_wait); cleared at admission */
    TAILQ_ENTRY(bt_engine_seq) link; /* waiting or running list, by phase */

    /* Token function. */
    uint64_t state; /* rolling state over prompt + carried + generated */
    uint64_t seed;
    double temperature;
    double top_p; /* the body's top_p, 1 when absent */
    bt_gen_params gp; /* its stop_token_ids end the completion */

    /* Accounting. */
    uint32_t prompt_tokens, n_carried;
    uint32_t max_new, generated;
    uint64_t seq_len;   /* tokens whose KV the sequence needs: prompt + carried + generated */
    uint64_t prefilled; /* of seq_len, computed since the last admission */
    uint64_t imported;  /* of seq_len, covered by an imported KV state: not prefilled at admission */
    /* For a hand-off (kv_bytes_per_token > 0): the rolling state after prompt + carried, and the
     * ids generated since, so that a receiver can check the state against its own tokens (the
     * client may not have received the newest ones: they are cut off there). */
    uint64_t state0;
    uint32_t *gen;
    size_t gen_n, gen_cap;
    uint64_t blocks;    /* KV blocks held */

    /* Stop strings. `win` holds up to max_stop-1 bytes of final text (ctx_len, already delivered
     * or carried) followed by the text of the held-back tokens `held`. */
    bt_stops stops;
    bt_buf win;
    size_t ctx_len;
    uint32_t *held;
    size_t held_n, held_cap;
};

TAILQ_HEAD(mk_seq_queue, bt_engine_seq);

typedef struct {
    struct mk_seq_queue q;
    uint64_t n;
} mk_list;

struct mk_engine {
    bt_engine base; /* first: the engine handle is a pointer to it */
    uv_loop_t *loop;
    uv_timer_t timer; /* the next step's end, when it lies in the future */
    uv_idle_t idle;   /* an immediate tick (see arm) */
    uv_poll_t gpoll;  /* the end of a batch gather: readable when gfd expires */
    int gfd;          /* a CLOCK_MONOTONIC timerfd, -1 when gathering is off */
    bt_engine_gather gather;
    bt_closer closer; /* freed when every handle has closed */
    bt_deliver dl;    /* pending sink events; the re-entrancy and liveness rules */
    bt_mocker_config cfg;
    bt_engine_hooks hooks;
    void *hooks_ud;
    uint64_t usable_blocks; /* floor((1 - watermark) * num_gpu_blocks): the admission limit */
    uint64_t context_length; /* tokens: cfg.context_length, or usable_blocks × block_size */

    mk_list waiting, running;
    uint64_t untold; /* waiting sequences not told they wait (new arrivals): told after admit() */
    uint64_t used_blocks;
    uint64_t prefill_pending; /* prompt tokens of admitted sequences not yet prefilled */
    uint64_t total_emitted;   /* tokens generated since creation, for the fault hooks */
    uint64_t vclock;          /* virtual time (bt_now_ns scale) at which the next step starts */

    bool stalled, dead, dead_notified;
    bool stall_fired, error_fired, error_now;
    bt_engine_load last_load; /* as last reported through hooks.on_load */
    bt_engine_kv_stats kvs;   /* KV hand-off counters */
};

/* ---- lists ---------------------------------------------------------------------------------- */

static void list_remove(mk_list *l, bt_engine_seq *s) {
    TAILQ_REMOVE(&l->q, s, link);
    l->n--;
}

static void list_push_tail(mk_list *l, bt_engine_seq *s) {
    TAILQ_INSERT_TAIL(&l->q, s, link);
    l->n++;
}

/* The waiting queue is kept in (priority, arrival) order. A new sequence goes after every waiting
 * one of its priority or a more urgent one; a preempted one (first = true) goes before every one of
 * its priority, since it arrived before them. The walk is from the end the sequence is nearer to in
 * the common case (all of one priority: O(1) either way). */
static void waiting_insert(mk_list *l, bt_engine_seq *s, bool first) {
    if (first) {
        bt_engine_seq *at = TAILQ_FIRST(&l->q);
        while (at && at->priority < s->priority) at = TAILQ_NEXT(at, link);
        if (at) TAILQ_INSERT_BEFORE(at, s, link);
        else TAILQ_INSERT_TAIL(&l->q, s, link);
    } else {
        bt_engine_seq *at = TAILQ_LAST(&l->q, mk_seq_queue);
        while (at && at->priority > s->priority) at = TAILQ_PREV(at, mk_seq_queue, link);
        if (at) TAILQ_INSERT_AFTER(&l->q, at, s, link);
        else TAILQ_INSERT_HEAD(&l->q, s, link);
    }
    l->n++;
}

/* ---- sequence lifecycle --------------------------------------------------------------------- */

/* Takes the sequence out of the scheduler and returns its KV blocks to the pool. */
static void seq_unschedule(mk_engine *e, bt_engine_seq *s) {
    if (s->phase == SEQ_WAITING) {
        list_remove(&e->waiting, s);
        if (!s->wait_told) e->untold--;
    } else if (s->phase == SEQ_PREFILL || s->phase == SEQ_DECODE) {
        if (s->phase == SEQ_PREFILL) e->prefill_pending -= s->seq_len - s->prefilled;
        list_remove(&e->running, s);
    }
    e->used_blocks -= s->blocks;
    s->blocks = 0;
    s->phase = SEQ_DONE;
}

/* deliver's free_seq: the sequence is dead and no longer known to the delivery queue. */
static void seq_free(void *owner, bt_deliver_seq *ds) {
    bt_engine_seq *s = BT_DELIVER_OWNER(ds, bt_engine_seq, dl);
    seq_unschedule(owner, s);
    bt_stops_free(&s->stops);
    bt_buf_free(&s->win);
    free(s->held);
    free(s->gen);
    free(s);
}

static bt_status held_release_all(mk_engine *e, bt_engine_seq *s);

/* Ends the sequence: it leaves the scheduler now (so the load shows its blocks freed) and its
 * sink hears the ending at the next flush. A finish first releases the held-back tokens: nothing
 * can complete a stop string any more. */
static void seq_end(mk_engine *e, bt_engine_seq *s, mk_end end, bt_finish_reason reason, bt_status err,
                    const char *msg) {
    if (bt_deliver_ended(&s->dl)) return;
    seq_unschedule(e, s);
    if (end == END_FINISH && held_release_all(e, s) != BT_OK) {
        end = END_ERROR;
        err = BT_ERR_NOMEM;
        msg = "mocker: out of memory for output";
    }
    if (end == END_ERROR) {
        bt_deliver_error(&e->dl, &s->dl, err, msg);
    } else {
        bt_usage u = {.prompt_tokens = s->prompt_tokens, .completion_tokens = s->n_carried + s->generated};
        bt_deliver_finish(&e->dl, &s->dl, reason, &u);
    }
}


/* Appends one token (and `text_len` bytes of its text) to the output batch. */
static bt_status out_add(mk_engine *e, bt_engine_seq *s, uint32_t id, size_t text_len) {
    return bt_deliver_stage(&e->dl, &s->dl, &id, 1, bt_mocker_token_text(id, NULL), text_len);
}

/* Releases every held-back token with its full text (used when the sequence ends for a reason
 * other than a stop string: nothing can complete a stop any more). */
static bt_status held_release_all(mk_engine *e, bt_engine_seq *s) {
    for (size_t i = 0; i < s->held_n; i++) {
        bt_status st = out_add(e, s, s->held[i], mk_token_len(s->held[i]));
        if (st != BT_OK) return st;
    }
    s->held_n = 0;
    bt_buf_reset(&s->win);
    s->ctx_len = 0;
    return BT_OK;
}

/* The earliest stop string in win (matches lying entirely in the context bytes were looked for
 * when those bytes were new), and the tail of win that could still become one (stops.h). */
static size_t stop_find(const bt_engine_seq *s) { return bt_stops_find(&s->stops, s->win.data, s->win.len); }

static size_t stop_partial(const bt_engine_seq *s) { return bt_stops_partial(&s->stops, s->win.data, s->win.len); }

/* Keeps only the last max_stop-1 bytes of the final (context) text in win. */
static void ctx_trim(bt_engine_seq *s) { bt_stops_trim_ctx(&s->stops, &s->win, &s->ctx_len); }

/* Passes a newly generated token through stop-string matching: whole tokens are held back while
 * the text could still be the start of a stop string and released (ids with their text) once it
 * cannot. On a match the sequence finishes with BT_FINISH_STOP and only the text before the stop
 * string is delivered (through its end with include_stop_str_in_output). When the stop string begins inside a token, that token's id is delivered
 * with just the text before the stop; tokens wholly inside or after it are not delivered. */
static bt_status emit(mk_engine *e, bt_engine_seq *s, uint32_t id) {
    size_t tl = mk_token_len(id);
    if (s->stops.n == 0) return out_add(e, s, id, tl);

    bt_status st = bt_u32_reserve(&s->held, &s->held_cap, s->held_n + 1);
    if (st == BT_OK) st = bt_buf_append(&s->win, bt_mocker_token_text(id, NULL), tl);
    if (st != BT_OK) return st;
    s->held[s->held_n++] = id;

    size_t m = stop_find(s);
    size_t off = s->ctx_len;
    if (m != SIZE_MAX) {
        m = bt_stops_cut(&s->stops, s->win.data, s->win.len, m); /* past the stop string when it is kept */
        for (size_t i = 0; i < s->held_n && off < m; i++) {
            size_t l = mk_token_len(s->held[i]);
            st = out_add(e, s, s->held[i], off + l <= m ? l : m - off);
            if (st != BT_OK) return st;
            off += l;
        }
        s->held_n = 0;
        seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
        return BT_OK;
    }
    size_t boundary = s->win.len - stop_partial(s); /* text before it can no longer change */
    size_t i = 0;
    while (i < s->held_n) {
        size_t l = mk_token_len(s->held[i]);
        if (off + l > boundary) break;
        st = out_add(e, s, s->held[i], l);
        if (st != BT_OK) return st;
        off += l;
        i++;
    }
    if (i) {
        memmove(s->held, s->held + i, (s->held_n - i) * sizeof *s->held);
        s->held_n -= i;
        s->ctx_len = off;
        ctx_trim(s);
    }
    return BT_OK;
}

/* ---- the scheduler -------------------------------------------------------------------------- */

/* ---- KV hand-off model (mocker.h) ------------------------------------------------------------ */

#define MK_KV_HEADER 48u
#define MK_KV_MAX ((uint64_t)1 << 30)

static void kv_put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t kv_get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* FNV-1a 64 of a state, its checksum field (bytes 40..47) read as zeros. */
static uint64_t kv_fnv(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (i >= 40 && i < 48 ? 0 : p[i])) * 0x100000001b3ull;
    return h;
}

/* Remembers a generated id for the hand-off (on failure the sequence just exports nothing). */
static void kv_note(bt_engine_seq *s, uint32_t tok) {
    if (s->gen_n == SIZE_MAX) return;
    if (s->gen_n == s->gen_cap) {
        size_t cap = s->gen_cap ? 2 * s->gen_cap : 256;
        uint32_t *g = realloc(s->gen, cap * sizeof *g);
        if (!g) {
            s->gen_n = SIZE_MAX;
            return;
        }
        s->gen = g;
        s->gen_cap = cap;
    }
    s->gen[s->gen_n++] = tok;
}

static size_t kv_len(uint64_t n, uint64_t ngen, uint64_t bpt) {
    uint64_t min = MK_KV_HEADER + 4 * ngen;
    return (size_t)(n * bpt < min ? min : n * bpt);
}

/* Checks an offered state against a sequence whose prompt ids are ids[0..n_ids) and carried ids
 * car[0..n_car); BT_KV_FB_N_ with *n = the tokens it covers, else the fallback. */
static bt_kv_fallback kv_check(const mk_engine *e, const uint8_t *st, size_t len, const uint32_t *ids, size_t n_ids,
                               const uint32_t *car, size_t n_car, uint64_t *n) {
    if (e->cfg.kv_bytes_per_token <= 0) return BT_KV_FB_UNSUPPORTED;
    if (len < MK_KV_HEADER || memcmp(st, "BTMKST01", 8) != 0) return BT_KV_FB_CORRUPT;
    uint64_t bpt = kv_get64(st + 8), n0 = kv_get64(st + 16), state0 = kv_get64(st + 24), ngen = kv_get64(st + 32);
    if (bpt != (uint64_t)e->cfg.kv_bytes_per_token) return BT_KV_FB_MISMATCH;
    if (n0 > MK_KV_MAX || ngen > MK_KV_MAX || n0 + ngen == 0 || n0 + ngen > MK_KV_MAX / bpt ||
        len != kv_len(n0 + ngen, ngen, bpt))
        return BT_KV_FB_CORRUPT;
    if (kv_fnv(st, len) != kv_get64(st + 40)) return BT_KV_FB_CORRUPT;
    /* the first n0 tokens: their rolling state; then the generated ids, as far as this sequence has them */
    size_t total = n_ids + n_car;
    if (total < n0) return BT_KV_FB_TOKENS;
    uint64_t h = 0;
    for (size_t i = 0; i < n0; i++) h = bt_mocker_state_push(h, i < n_ids ? ids[i] : car[i - n_ids]);
    if (h != state0) return BT_KV_FB_TOKENS;
    uint64_t k = 0;
    for (; k < ngen && n0 + k < total; k++) {
        size_t i = (size_t)(n0 + k);
        uint32_t mine = i < n_ids ? ids[i] : car[i - n_ids];
        const uint8_t *q = st + MK_KV_HEADER + 4 * k;
        uint32_t theirs = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
        if (mine != theirs) return BT_KV_FB_TOKENS;
    }
    *n = n0 + k;
    return BT_KV_FB_N_;
}

static uint64_t blocks_for(const mk_engine *e, uint64_t tokens) {
    uint64_t bs = (uint64_t)e->cfg.block_size;
    return (tokens + bs - 1) / bs;
}

typedef enum { PREEMPT_KV, PREEMPT_PRIORITY } mk_preempt_reason;
static void preempt(mk_engine *e, bt_engine_seq *s, mk_preempt_reason why);

/* The victim of a priority preemption for a waiting sequence of priority `prio`: the least urgent
 * decoding sequence strictly less urgent than prio, the most recently admitted among those, never
 * one preempted for priority that has not produced a token since (so a sequence always makes
 * progress between two such preemptions and equal priorities never preempt each other); NULL
 * when there is none. */
static bt_engine_seq *priority_victim(mk_engine *e, int32_t prio) {
    bt_engine_seq *best = NULL;
    for (bt_engine_seq *s = TAILQ_LAST(&e->running.q, mk_seq_queue); s; s = TAILQ_PREV(s, mk_seq_queue, link))
        if (s->phase == SEQ_DECODE && !s->prio_held && s->priority > prio && (!best || s->priority > best->priority))
            best = s;
    return best;
}

static void admit(mk_engine *e) {
    bt_engine_seq *s;
    while ((s = TAILQ_FIRST(&e->waiting.q)) != NULL) {
        uint64_t need = blocks_for(e, s->seq_len);
        /* Chunked prefill: the candidate's own prompt is not counted against the budget. */
        if (e->prefill_pending >= (uint64_t)e->cfg.max_num_batched_tokens) break;
        if (e->used_blocks + need > e->usable_blocks || e->running.n + 1 > (uint64_t)e->cfg.max_num_seqs) {
            /* Priority preemption, one victim at a time, only when the candidate could run on
             * this engine at all (else the victims would be preempted for nothing). The victim
             * goes back to the waiting queue behind the candidate (it is less urgent). */
            bt_engine_seq *v = need <= e->usable_blocks ? priority_victim(e, s->priority) : NULL;
            if (!v) break;
            preempt(e, v, PREEMPT_PRIORITY);
            continue;
        }
        list_remove(&e->waiting, s);
        if (!s->wait_told) e->untold--;
        s->wait_told = false;
        list_push_tail(&e->running, s);
        s->phase = SEQ_PREFILL;
        s->prefilled = s->imported < s->seq_len ? s->imported : s->seq_len; /* an imported state's tokens */
        s->imported = 0; /* once: a preempted sequence recomputes everything */
        if (s->prefilled == s->seq_len) s->phase = SEQ_DECODE;
        s->blocks = need;
        e->used_blocks += need;
        e->prefill_pending += s->seq_len - s->prefilled;
    }
}

/* Preemption by recomputation: the sequence gives back its blocks and returns to the front of the
 * waiting queue; on readmission it prefills prompt + everything generated so far and continues
 * from its rolling state, so no token is generated or delivered twice. */
static void preempt(mk_engine *e, bt_engine_seq *s, mk_preempt_reason why) {
    BT_DEBUG("mocker: preempting a sequence of priority %d, %llu tokens holding %llu blocks (%s)", (int)s->priority,
             (unsigned long long)s->seq_len, (unsigned long long)s->blocks,
             why == PREEMPT_PRIORITY ? "priority: a more urgent sequence waits" : "KV full");
    if (why == PREEMPT_PRIORITY) {
        e->kvs.preempted_priority++;
        s->prio_held = true;
    } else {
        e->kvs.preempted_kv++;
    }
    list_remove(&e->running, s);
    e->used_blocks -= s->blocks;
    s->blocks = 0;
    s->prefilled = 0;
    s->phase = SEQ_WAITING;
    waiting_insert(&e->waiting, s, true);
    s->wait_told = true;
    bt_deliver_wait(&e->dl, &s->dl, BT_ENGINE_WAIT_PREEMPTED); /* its stream hears nothing until readmitted */
}

/* The sequences that arrived since the last step and that its admit() left waiting (no slot, no
 * blocks, or the prefill budget is spent) are told they are queued: their streams will hear nothing
 * until a later step admits them. One walk of the queue, only in a step that left arrivals waiting.
 * A told sequence (this or a preemption) is in the waiting queue until a step admits it, and the
 * load is read from that queue on this loop (load_snapshot), so every LOAD written after its
 * WAITING counts it until then: a frontend takes one that shows nothing waiting as the end of the
 * wait (docs/protocol.md §4). */
static void tell_queued(mk_engine *e) {
    for (bt_engine_seq *s = TAILQ_FIRST(&e->waiting.q); s && e->untold; s = TAILQ_NEXT(s, link)) {
        if (s->wait_told) continue;
        s->wait_told = true;
        e->untold--;
        bt_deliver_wait(&e->dl, &s->dl, BT_ENGINE_WAIT_QUEUED);
    }
}

/* The victim of a preemption: the decoding sequence of the largest priority value (the least
 * urgent), the most recently admitted among those. */
static bt_engine_seq *last_decoding(mk_engine *e) {
    bt_engine_seq *best = NULL;
    for (bt_engine_seq *s = TAILQ_LAST(&e->running.q, mk_seq_queue); s; s = TAILQ_PREV(s, mk_seq_queue, link))
        if (s->phase == SEQ_DECODE && (!best || s->priority > best->priority)) best = s;
    return best;
}

/* Generates one token for s; returns false when a fault says the step must stop now. */
static bool generate(mk_engine *e, bt_engine_seq *s) {
    uint32_t tok = bt_mocker_next_token(s->state, s->seed, s->temperature, s->top_p);
    s->state = bt_mocker_state_push(s->state, tok);
    if (e->cfg.kv_bytes_per_token > 0) kv_note(s, tok);
    s->seq_len++;
    s->generated++;
    s->prio_held = false;
    e->total_emitted++;
    if (emit(e, s, tok) != BT_OK) {
        seq_end(e, s, END_ERROR, BT_FINISH_STOP, BT_ERR_NOMEM, "mocker: out of memory for output");
    } else if (!bt_deliver_ended(&s->dl) && bt_gen_params_stops_at(&s->gp, tok)) {
        /* delivered with its text (held-back text too: no stop string can complete now) */
        seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
    } else if (!bt_deliver_ended(&s->dl) && s->generated >= s->max_new) {
        seq_end(e, s, END_FINISH, BT_FINISH_LENGTH, BT_OK, NULL);
    }

    const bt_mocker_config *c = &e->cfg;
    bool halt = false;
    if (c->fault_die_after_tokens > 0 && e->total_emitted >= (uint64_t)c->fault_die_after_tokens) {
        BT_WARN("mocker: fault hook: engine dies after %llu tokens", (unsigned long long)e->total_emitted);
        e->dead = true;
        halt = true;
    }
    if (c->fault_stall_after_tokens > 0 && !e->stall_fired &&
        e->total_emitted >= (uint64_t)c->fault_stall_after_tokens) {
        BT_WARN("mocker: fault hook: engine stalls after %llu tokens", (unsigned long long)e->total_emitted);
        e->stall_fired = e->stalled = true;
        halt = true;
    }
    if (c->fault_error_after_tokens > 0 && !e->error_fired &&
        e->total_emitted >= (uint64_t)c->fault_error_after_tokens) {
        BT_WARN("mocker: fault hook: engine error after %llu tokens", (unsigned long long)e->total_emitted);
        e->error_fired = e->error_now = true;
        halt = true;
    }
    return !halt;
}

static double prefill_ms(uint64_t n) {
    double x = (double)n;
    double ms = 4.209989e-07 * x * x + 1.518344e-02 * x + 16.50142;
    return ms > 0 ? ms : 0;
}

static double decode_ms(double p) {
    double ms = -25.74 * p * p + 54.01 * p + 5.74;
    return ms > 1.0 ? ms : 1.0;
}

/* Runs one scheduler step; returns its duration in virtual nanoseconds. */
static uint64_t step(mk_engine *e) {
    bt_engine_seq *s, *nx;
    admit(e);
    if (e->untold) tell_queued(e);

    uint64_t budget = (uint64_t)e->cfg.max_num_batched_tokens, n_prefill = 0;
    TAILQ_FOREACH(s, &e->running.q, link) {
        if (s->phase != SEQ_PREFILL) continue;
        uint64_t rem = s->seq_len - s->prefilled;
        uint64_t chunk = rem < budget ? rem : budget;
        s->prefilled += chunk;
        e->prefill_pending -= chunk;
        budget -= chunk;
        n_prefill += chunk;
        if (s->prefilled == s->seq_len) s->phase = SEQ_DECODE;
    }

    e->kvs.prefill_tokens += n_prefill;
    double ms = n_prefill ? prefill_ms(n_prefill) : 0.0;
    bool decoding = last_decoding(e) != NULL;
    if (decoding) {
        double p = (double)e->used_blocks / (double)e->cfg.num_gpu_blocks;
        ms += decode_ms(p);
    }
    if (n_prefill || decoding) e->kvs.steps++;

    uint64_t bs = (uint64_t)e->cfg.block_size, cap = (uint64_t)e->cfg.num_gpu_blocks;
    for (s = TAILQ_FIRST(&e->running.q); s; s = nx) {
        nx = TAILQ_NEXT(s, link);
        if (s->phase != SEQ_DECODE) continue;
        if (s->seq_len + 1 > s->blocks * bs) {
            bool self = false;
            while (e->used_blocks >= cap) {
                bt_engine_seq *v = last_decoding(e); /* s is decoding: never NULL here */
                if (v == s) {
                    nx = TAILQ_NEXT(s, link); /* only prefilling sequences follow s */
                    preempt(e, s, PREEMPT_KV);
                    self = true;
                    break;
                }
                preempt(e, v, PREEMPT_KV);
            }
            if (self) continue;
            nx = TAILQ_NEXT(s, link); /* the victims (before or after s) have left the list */
            s->blocks++;
            e->used_blocks++;
        }
        if (!generate(e, s)) break;
    }

    if (e->error_now) {
        e->error_now = false;
        while ((nx = TAILQ_FIRST(&e->running.q)) != NULL)
            seq_end(e, nx, END_ERROR, BT_FINISH_STOP, BT_ERR_ENGINE, "mocker fault: engine error");
    }

    double slow = e->cfg.fault_slow_factor > 1.0 ? e->cfg.fault_slow_factor : 1.0;
    double ns = ms * slow * 1e6 / e->cfg.speedup_ratio;
    return ns >= 1.0 ? (uint64_t)ns : 1u;
}

static void load_snapshot(const mk_engine *e, bt_engine_load *l) {
    l->active_decode_blocks = e->used_blocks;
    l->total_blocks = (uint64_t)e->cfg.num_gpu_blocks;
    l->active_prefill_tokens = e->prefill_pending;
    l->waiting = e->waiting.n;
    l->preparing = 0; /* prompts are counted in tokens at submit */
    l->running = e->running.n;
    l->max_num_batched_tokens = (uint64_t)e->cfg.max_num_batched_tokens;
    /* What priority_victim would offer a more urgent arrival: the preemptible decoding sequences
     * of the least urgent priority, less the waiting ones more urgent than them (they claim those
     * victims first; the waiting queue is in priority order, so the walk stops at the first one
     * that is not). */
    uint64_t n = 0;
    int32_t vp = 0;
    for (const bt_engine_seq *s = TAILQ_FIRST(&e->running.q); s; s = TAILQ_NEXT(s, link)) {
        if (s->phase != SEQ_DECODE || s->prio_held) continue;
        if (!n || s->priority > vp) vp = s->priority, n = 0;
        if (s->priority == vp) n++;
    }
    for (const bt_engine_seq *s = TAILQ_FIRST(&e->waiting.q); s && n && s->priority < vp; s = TAILQ_NEXT(s, link)) n--;
    l->victims = n;
    l->victim_priority = n ? vp : 0;
}

static bool load_changed(const mk_engine *e) {
    bt_engine_load l;
    load_snapshot(e, &l);
    return memcmp(&l, &e->last_load, sizeof l) != 0;
}

static void on_timer(uv_timer_t *t);
static void on_idle(uv_idle_t *h);

static void on_gather(uv_poll_t *h, int status, int events);

static void gather_timer_stop(mk_engine *e) {
    if (e->gfd >= 0) uv_poll_stop(&e->gpoll);
}

static void disarm(mk_engine *e) {
    uv_timer_stop(&e->timer);
    uv_idle_stop(&e->idle);
    gather_timer_stop(e);
}

/* Runs tick() at deadline_ns (bt_now_ns's clock). timerfd_settime resets the expirations a
 * previous setting left unread, so an earlier deadline cannot fire this one early. */
static void arm_gather(mk_engine *e, uint64_t deadline_ns) {
    uv_timer_stop(&e->timer);
    uv_idle_stop(&e->idle);
    struct itimerspec its = {.it_value = {.tv_sec = (time_t)(deadline_ns / 1000000000u),
                                          .tv_nsec = (long)(deadline_ns % 1000000000u)}};
    if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1; /* 0 would disarm */
    if (timerfd_settime(e->gfd, TFD_TIMER_ABSTIME, &its, NULL) != 0 ||
        uv_poll_start(&e->gpoll, UV_READABLE, on_gather) != 0) {
        BT_WARN("mocker: cannot arm the batch-gather timer (%s): the step starts now", strerror(errno));
        bt_engine_gather_end(&e->gather, bt_now_ns());
        uv_poll_stop(&e->gpoll);
        uv_idle_start(&e->idle, on_idle);
    }
}

/* Runs tick() after delay_ms, or on the next loop iteration when 0. An immediate tick uses the idle
 * handle, not a 0 ms timer: libuv (1.44) runs a timer re-armed with 0 from its own callback again in
 * the same pass, which would starve the loop's I/O while the engine catches up with real time. */
static void arm(mk_engine *e, uint64_t delay_ms) {
    gather_timer_stop(e);
    if (delay_ms == 0) {
        uv_timer_stop(&e->timer);
        if (!uv_is_active((uv_handle_t *)&e->idle)) uv_idle_start(&e->idle, on_idle);
    } else {
        uv_idle_stop(&e->idle);
        uv_update_time(e->loop); /* count from now, not from the start of this loop iteration */
        uv_timer_start(&e->timer, on_timer, delay_ms, 0);
    }
}

static bool armed(mk_engine *e) {
    return uv_is_active((uv_handle_t *)&e->timer) || uv_is_active((uv_handle_t *)&e->idle) ||
           (e->gfd >= 0 && uv_is_active((uv_handle_t *)&e->gpoll));
}

/* Arms the driver for the next thing to do, or stops it when there is nothing. */
static void schedule(mk_engine *e) {
    if (bt_deliver_closed(&e->dl)) return;
    if (e->dead) {
        if (!e->dead_notified) arm(e, 0);
        else disarm(e);
        return;
    }
    bool work = (!e->stalled && (e->waiting.n || e->running.n)) || bt_deliver_pending(&e->dl) || load_changed(e);
    if (!work) {
        disarm(e);
        return;
    }
    uint64_t now = bt_now_ns(), delay = 0;
    if (!e->stalled && bt_engine_gather_holds(&e->gather, now) && bt_engine_gather_deadline(&e->gather) >= e->vclock) {
        arm_gather(e, bt_engine_gather_deadline(&e->gather));
        return;
    }
    if (e->vclock > now) delay = (e->vclock - now + 999999u) / 1000000u;
    arm(e, delay);
}

/* A sequence joined the waiting queue: on an idle engine (nothing admitted) it starts or extends
 * a batch gather; a running engine takes it at its next step as always. */
static void gather_arrive(mk_engine *e) {
    bt_engine_gather_arrive(&e->gather, bt_now_ns(), e->running.n == 0);
}

/* A kill or stop emptied the waiting queue during a gather: the gather ends, and the tick armed
 * for its deadline is dropped so that kick arms one now (an ending to deliver, the load). */
static void gather_drop_if_empty(mk_engine *e) {
    if (!e->gather.active || e->waiting.n) return;
    bt_engine_gather_end(&e->gather, bt_now_ns());
    if (!bt_deliver_busy(&e->dl) && !bt_deliver_closed(&e->dl)) disarm(e);
}

/* Whether the steps may run at now: false while a gather holds the first step. A gather that
 * ends here counts (kv_stats), and its step starts now, not at the first arrival: the wait is real
 * time the virtual clock must not make up for. */
static bool gather_release(mk_engine *e, uint64_t now) {
    bt_engine_gather *g = &e->gather;
    if (!g->active) return true;
    if (!e->waiting.n) {
        bt_engine_gather_end(g, now);
        return true;
    }
    if (bt_engine_gather_holds(g, now)) return false;
    uint64_t waited = bt_engine_gather_end(g, now);
    e->kvs.gathers++;
    e->kvs.gathered_seqs += e->waiting.n;
    e->kvs.gather_ns += waited;
    BT_DEBUG("mocker: batch gather: first step with %llu waiting sequences after %llu us",
             (unsigned long long)e->waiting.n, (unsigned long long)(waited / 1000u));
    if (e->vclock < now) e->vclock = now;
    return true;
}

/* Wakes the driver after submit/stop/kill/inject; a no-op while it is armed or running, since the
 * end of a tick re-arms it for whatever is pending then. */
static void kick(mk_engine *e) {
    if (e->dead || bt_deliver_closed(&e->dl) || bt_deliver_busy(&e->dl)) return;
    if (armed(e)) return;
    uint64_t now = bt_now_ns();
    if (e->vclock < now) e->vclock = now; /* time spent idle is not simulated */
    arm(e, 0);
}

/* Delivers the staged output and endings; false when a callback destroyed the engine. */
static bool deliver_due(mk_engine *e) {
    bt_deliver_drain(&e->dl);
    return !bt_deliver_closed(&e->dl);
}

/* The engine died: deliver what was already produced, then tell the worker once. */
static void die(mk_engine *e) {
    disarm(e);
    if (e->dead_notified) return;
    if (!deliver_due(e)) return;
    e->dead_notified = true;
    if (e->hooks.on_dead) e->hooks.on_dead(e->hooks_ud, "mocker fault: engine dead");
}

/* One turn of the engine: deliver output that is due, run the steps whose start time has come
 * (bounded), deliver their output if they have ended, report a changed load. */
static void tick_run(mk_engine *e) {
    disarm(e);
    uint64_t now = bt_now_ns();
    if (e->dead) {
        die(e);
        return;
    }
    if (e->vclock <= now) {
        /* The steps run so far have all ended by now: their output is due before the next step. */
        if (!deliver_due(e)) return;
        uint64_t t0 = now;
        bool go = gather_release(e, now);
        for (int n = 0; go && n < MK_MAX_STEPS_PER_CB && !e->stalled && !e->dead; n++) {
            if (!e->waiting.n && !e->running.n) break;
            if (e->vclock > now) break; /* the last step has not ended yet */
            e->vclock += step(e);
            now = bt_now_ns();
            if (now - t0 >= MK_MAX_NS_PER_CB) break;
        }
        if (e->dead) {
            die(e);
            return;
        }
        /* Output is delivered when real time reaches the end of the step that produced it. */
        if (e->vclock <= now && !deliver_due(e)) return;
    }
    if (load_changed(e)) {
        load_snapshot(e, &e->last_load);
        if (e->hooks.on_load) e->hooks.on_load(e->hooks_ud);
    }
}

/* A tick, then the driver armed for what is pending; a destroy from a callback in it is finished
 * when it unwinds (bt_deliver_leave). */
static void tick(mk_engine *e) {
    bt_deliver_enter(&e->dl);
    tick_run(e);
    if (bt_deliver_leave(&e->dl)) schedule(e);
}

static void on_timer(uv_timer_t *t) { tick(t->data); }
static void on_idle(uv_idle_t *h) { tick(h->data); }

static void on_gather(uv_poll_t *h, int status, int events) {
    (void)status, (void)events;
    mk_engine *e = h->data;
    uint64_t expirations;
    ssize_t r = read(e->gfd, &expirations, sizeof expirations); /* clears the readiness; EAGAIN is fine */
    (void)r;
    tick(e);
}

/* ---- prompts -------------------------------------------------------------------------------- */

static bt_status append_content(bt_buf *b, const json_t *content, char *err, size_t errlen) {
    if (!content || json_is_null(content)) return BT_OK;
    if (json_is_string(content)) return bt_buf_append(b, json_string_value(content), json_string_length(content));
    if (!json_is_array(content)) {
        snprintf(err, errlen, "message content must be a string or an array of parts");
        return BT_ERR_INVALID;
    }
    size_t i;
    const json_t *part;
    json_array_foreach(content, i, part) {
        const json_t *text = bt_jstr_part_text(part);
        if (!text) continue; /* images etc. carry no text */
        bt_status st = bt_buf_append(b, json_string_value(text), json_string_length(text));
        if (st != BT_OK) return st;
    }
    return BT_OK;
}

/* Renders chat messages as "<role>: <content>\n" each, then "assistant:". */
static bt_status render_chat(const json_t *body, bt_buf *b, char *err, size_t errlen) {
    const json_t *msgs = json_object_get(body, "messages");
    if (!json_is_array(msgs)) {
        snprintf(err, errlen, "chat request has no \"messages\" array");
        return BT_ERR_INVALID;
    }
    /* vLLM's continue_final_message: a final assistant message stays open (no line end, no new
     * "assistant:" turn), so generation continues its text */
    size_t n = json_array_size(msgs);
    const char *last_role = n ? json_string_value(json_object_get(json_array_get(msgs, n - 1), "role")) : NULL;
    bool open_last = json_is_true(json_object_get(body, "continue_final_message")) && last_role &&
                     strcmp(last_role, "assistant") == 0;
    size_t i;
    const json_t *m;
    json_array_foreach(msgs, i, m) {
        if (!json_is_object(m)) {
            snprintf(err, errlen, "messages[%zu] is not an object", i);
            return BT_ERR_INVALID;
        }
        const char *role = json_string_value(json_object_get(m, "role"));
        bt_status st = bt_buf_append_str(b, role ? role : "user");
        if (st == BT_OK) st = bt_buf_append(b, ": ", 2);
        if (st == BT_OK) st = append_content(b, json_object_get(m, "content"), err, errlen);
        if (st == BT_OK && !(open_last && i + 1 == n)) st = bt_buf_append(b, "\n", 1);
        if (st != BT_OK) {
            if (st != BT_ERR_INVALID) snprintf(err, errlen, "chat prompt too large");
            return st;
        }
    }
    if (open_last) return BT_OK;
    if (bt_buf_append_str(b, "assistant:") != BT_OK) {
        snprintf(err, errlen, "chat prompt too large");
        return BT_ERR_TOO_LARGE;
    }
    return BT_OK;
}

static bt_status tokenize_alloc(const char *text, size_t len, uint32_t **ids, size_t *n) {
    *ids = malloc((len + 1) * sizeof **ids); /* every token covers at least one byte */
    if (!*ids) return BT_ERR_NOMEM;
    *n = bt_mocker_tokenize(text, len, *ids, len + 1);
    return BT_OK;
}

/* The prompt's token ids (malloc'd into *ids). */
static bt_status prompt_ids(const bt_engine_request *req, uint32_t **ids, size_t *n, char *err, size_t errlen) {
    *ids = NULL;
    *n = 0;
    if (!req->body || !json_is_object(req->body)) {
        snprintf(err, errlen, "request has no JSON body");
        return BT_ERR_INVALID;
    }
    if (req->api == BT_API_CHAT) {
        bt_buf b;
        bt_buf_init(&b, MK_TEXT_CAP);
        bt_status st = render_chat(req->body, &b, err, errlen);
        if (st == BT_OK) st = tokenize_alloc(b.data ? b.data : "", b.len, ids, n);
        bt_buf_free(&b);
        return st;
    }
    const json_t *p = json_object_get(req->body, "prompt");
    if (json_is_string(p)) return tokenize_alloc(json_string_value(p), json_string_length(p), ids, n);
    if (!json_is_array(p)) {
        snprintf(err, errlen, "completion request has no \"prompt\" (a string or an array of token ids)");
        return BT_ERR_INVALID;
    }
    size_t len = json_array_size(p);
    if (len == 1 && json_is_string(json_array_get(p, 0))) {
        const json_t *s = json_array_get(p, 0);
        return tokenize_alloc(json_string_value(s), json_string_length(s), ids, n);
    }
    *ids = malloc((len + 1) * sizeof **ids);
    if (!*ids) return BT_ERR_NOMEM;
    for (size_t i = 0; i < len; i++) {
        const json_t *v = json_array_get(p, i);
        json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
        if (!json_is_integer(v) || id < 0 || id >= (json_int_t)BT_MOCKER_VOCAB) {
            if (json_is_integer(v))
                snprintf(err, errlen, "prompt token id %lld is outside the vocabulary [0, %u)", (long long)id,
                         BT_MOCKER_VOCAB);
            else
                snprintf(err, errlen, "a prompt array must hold token ids or exactly one string");
            free(*ids);
            *ids = NULL;
            return BT_ERR_INVALID_PROMPT; /* the frontend's 400 names "prompt" */
        }
        (*ids)[i] = (uint32_t)id;
    }
    *n = len;
    return BT_OK;
}

/* max_tokens as the request means it: req->max_tokens when the body states a limit (or the caller
 * filled one in); otherwise default_max_tokens less what earlier attempts generated. */
static uint32_t effective_max_tokens(const mk_engine *e, const bt_engine_request *req) {
    const json_t *mt = json_object_get(req->body, "max_tokens");
    const json_t *mct = json_object_get(req->body, "max_completion_tokens");
    bool explicit_limit = json_is_integer(mt) || json_is_integer(mct);
    if (explicit_limit || req->max_tokens > 0) return req->max_tokens;
    uint64_t d = (uint64_t)e->cfg.default_max_tokens;
    return d > req->n_carried ? (uint32_t)(d - req->n_carried) : 0;
}

/* ---- engine operations ---------------------------------------------------------------------- */

static bt_status mk_submit(bt_engine *be, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                           bt_engine_seq **out, char *err, size_t errlen) {
    mk_engine *e = (mk_engine *)be;
    if (e->dead) {
        snprintf(err, errlen, "mocker engine is dead");
        return BT_ERR_ENGINE;
    }
    if (req->n_carried && !req->carried) {
        snprintf(err, errlen, "n_carried is %u but carried is NULL", req->n_carried);
        return BT_ERR_INVALID;
    }
    /* Fields asking for output the mocker cannot give are refused, not ignored. It has no end of
     * sequence, so ignore_eos holds by itself, and so does min_tokens without stop strings (every
     * completion runs to max_tokens, which is at least min_tokens); with stop strings it would need
     * them held off, which the mocker does not do: refused rather than stopped early. */
    bt_gen_params gp;
    bt_status gst = bt_gen_params_read(req->body, &gp, err, errlen);
    if (gst != BT_OK) return gst;
    bool has_stop = false;
    for (int i = 0; i < req->n_stop && i < BT_MAX_STOP; i++) has_stop = has_stop || (req->stop[i] && req->stop[i][0]);
    if (gp.min_tokens > 0 && has_stop) {
        snprintf(err, errlen, "'min_tokens' with stop strings is not supported by the mocker");
        return BT_ERR_UNSUPPORTED_PARAM;
    }

    uint32_t *ids = NULL;
    size_t n_ids = 0;
    bt_status st = prompt_ids(req, &ids, &n_ids, err, errlen);
    if (st != BT_OK) {
        if (st == BT_ERR_NOMEM) snprintf(err, errlen, "out of memory tokenizing the prompt");
        return st;
    }
    uint32_t max_new = effective_max_tokens(e, req);
    /* The context length, as OpenAI and vLLM apply it: prompt + completion (carried tokens are part
     * of the completion). Without an explicit max_tokens the default shrinks to what fits. */
    uint64_t used = (uint64_t)n_ids + req->n_carried;
    const json_t *body_mt = json_object_get(req->body, "max_tokens");
    const json_t *body_mct = json_object_get(req->body, "max_completion_tokens");
    bool asked = json_is_integer(body_mt) || json_is_integer(body_mct);
    if (!asked && used < e->context_length && used + max_new > e->context_length)
        max_new = (uint32_t)(e->context_length - used);
    /* without the client's max_tokens a full context refuses the least completion, one new token:
     * the message names that, not the default it would have been cut from */
    if (!asked && used >= e->context_length && max_new > 0) max_new = 1;
    if (used + max_new > e->context_length) {
        snprintf(err, errlen,
                 "This model's maximum context length is %llu tokens. However, you requested %llu tokens (%zu in "
                 "the %s, %llu in the completion). Please reduce the length of the %s or completion.",
                 (unsigned long long)e->context_length, (unsigned long long)(used + max_new), n_ids,
                 req->api == BT_API_CHAT ? "messages" : "prompt", (unsigned long long)req->n_carried + max_new,
                 req->api == BT_API_CHAT ? "messages" : "prompt");
        free(ids);
        return BT_ERR_CONTEXT_LENGTH;
    }
    uint64_t total = used + max_new;
    uint64_t need = blocks_for(e, total);
    if (n_ids > UINT32_MAX || need > e->usable_blocks) {
        snprintf(err, errlen,
                 "prompt of %zu tokens + %u carried + max_tokens %u needs %llu KV blocks of %lld tokens; "
                 "the engine admits at most %llu",
                 n_ids, req->n_carried, max_new, (unsigned long long)need, (long long)e->cfg.block_size,
                 (unsigned long long)e->usable_blocks);
        free(ids);
        return BT_ERR_TOO_LARGE;
    }

    bt_engine_seq *s = calloc(1, sizeof *s);
    if (!s) {
        free(ids);
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    bt_deliver_add(&e->dl, &s->dl, sink, ud, MK_TEXT_CAP);
    s->seed = req->seed;
    s->gp = gp;
    s->temperature = req->temperature;
    /* read from the body, as the llama engine reads it (the frontend checks it is in [0, 1]) */
    json_t *top_p = json_object_get(req->body, "top_p");
    s->top_p = json_is_number(top_p) ? json_number_value(top_p) : 1.0;
    s->priority = req->priority;
    s->prompt_tokens = (uint32_t)n_ids;
    s->n_carried = req->n_carried;
    s->max_new = max_new;
    s->seq_len = n_ids + req->n_carried;
    bt_buf_init(&s->win, MK_TEXT_CAP);
    for (size_t i = 0; i < n_ids; i++) s->state = bt_mocker_state_push(s->state, ids[i]);
    for (uint32_t i = 0; i < req->n_carried; i++) s->state = bt_mocker_state_push(s->state, req->carried[i]);
    s->state0 = s->state;
    if (req->kv_state) { /* an offered KV state must cover this sequence's own first tokens */
        uint64_t kv_n = 0;
        bt_kv_fallback why = kv_check(e, req->kv_state, req->kv_state_len, ids, n_ids, req->carried, req->n_carried,
                                      &kv_n);
        if (why == BT_KV_FB_N_) {
            s->imported = kv_n;
            e->kvs.imports++;
            e->kvs.imported_tokens += kv_n;
        } else {
            e->kvs.fallbacks[why]++;
            BT_WARN("mocker: KV state not imported (%s): prefilling instead", bt_kv_fallback_name(why));
        }
    }
    free(ids);

    if (bt_stops_init(&s->stops, req->stop, req->n_stop < BT_MAX_STOP ? req->n_stop : BT_MAX_STOP) != BT_OK)
        goto nomem;
    s->stops.keep = gp.include_stop;

    if (s->stops.n) {
        /* Carried text was delivered by an earlier attempt: it is context for matching. A stop
         * string wholly inside it means the stream had already ended; one that starts in it can
         * still be completed by the first new tokens. */
        for (uint32_t i = 0; i < req->n_carried; i++) {
            size_t l;
            const char *t = bt_mocker_token_text(req->carried[i], &l);
            if (bt_buf_append(&s->win, t, l) != BT_OK) goto nomem;
        }
        s->ctx_len = s->win.len;
        if (stop_find(s) != SIZE_MAX) seq_end(e, s, END_FINISH, BT_FINISH_STOP, BT_OK, NULL);
        ctx_trim(s);
    }
    if (!bt_deliver_ended(&s->dl) && max_new == 0) seq_end(e, s, END_FINISH, BT_FINISH_LENGTH, BT_OK, NULL);
    if (!bt_deliver_ended(&s->dl)) {
        s->phase = SEQ_WAITING;
        waiting_insert(&e->waiting, s, false);
        e->untold++;
        gather_arrive(e);
    }
    BT_DEBUG("mocker: submitted %s: %u prompt + %u carried tokens, max_tokens %u", req->request_id ? req->request_id : "-",
             s->prompt_tokens, s->n_carried, max_new);
    *out = s;
    kick(e);
    return BT_OK;

nomem:
    bt_deliver_kill(&e->dl, &s->dl);
    snprintf(err, errlen, "out of memory");
    return BT_ERR_NOMEM;
}

static void mk_stop(bt_engine *be, bt_engine_seq *s) {
    mk_engine *e = (mk_engine *)be;
    if (!s || bt_deliver_ended(&s->dl) || e->dead) return;
    seq_end(e, s, END_FINISH, BT_FINISH_CANCELLED, BT_OK, NULL);
    gather_drop_if_empty(e);
    kick(e);
}

static void mk_kill(bt_engine *be, bt_engine_seq *s) {
    mk_engine *e = (mk_engine *)be;
    if (!s || bt_deliver_dead(&s->dl)) return;
    seq_unschedule(e, s); /* the load shows its blocks free at once; its memory may go later */
    bt_deliver_kill(&e->dl, &s->dl);
    gather_drop_if_empty(e);
    kick(e);
}

/* The state of a sequence handed off: the tokens whose KV it holds (prefilled so far, or all of
 * them once decoding), kv_bytes_per_token bytes each (see mocker.h). Made and handed over at
 * once: the mocker has no engine thread. */
static void mk_handoff(bt_engine *be, bt_engine_seq *s, bt_engine_handoff_cb cb, void *ud) {
    mk_engine *e = (mk_engine *)be;
    uint8_t *st = NULL;
    size_t len = 0;
    /* only a decoding sequence exports (one being prefilled has little to give) */
    bool ok = s && !bt_deliver_ended(&s->dl) && s->phase == SEQ_DECODE && s->gen_n != SIZE_MAX;
    uint64_t bpt = (uint64_t)e->cfg.kv_bytes_per_token;
    uint64_t n0 = ok ? s->prompt_tokens + (uint64_t)s->n_carried : 0, ngen = ok ? s->gen_n : 0;
    if (ok && bpt && n0 + ngen <= MK_KV_MAX / bpt) {
        len = kv_len(n0 + ngen, ngen, bpt);
        st = malloc(len);
    }
    if (st) {
        memcpy(st, "BTMKST01", 8);
        kv_put64(st + 8, bpt);
        kv_put64(st + 16, n0);
        kv_put64(st + 24, s->state0);
        kv_put64(st + 32, ngen);
        for (uint64_t k = 0; k < ngen; k++)
            for (int b = 0; b < 4; b++) st[MK_KV_HEADER + 4 * k + (uint64_t)b] = (uint8_t)(s->gen[k] >> (8 * b));
        for (size_t i = MK_KV_HEADER + 4 * ngen; i < len; i++) st[i] = (uint8_t)(i * 131u + (unsigned)s->state0);
        kv_put64(st + 40, kv_fnv(st, len));
        e->kvs.exports++;
        e->kvs.export_bytes += len;
    }
    mk_kill(be, s);
    cb(ud, st, st ? len : 0);
}

static void mk_kv_stats(bt_engine *be, bt_engine_kv_stats *out) { *out = ((mk_engine *)be)->kvs; }

static void mk_get_load(bt_engine *be, bt_engine_load *out) { load_snapshot((mk_engine *)be, out); }

static void mk_card(bt_engine *be, json_t *card) {
    mk_engine *e = (mk_engine *)be;
    json_object_set_new(card, "total_kv_blocks", json_integer(e->cfg.num_gpu_blocks));
    json_object_set_new(card, "block_size", json_integer(e->cfg.block_size));
    json_object_set_new(card, "context_length", json_integer((json_int_t)e->context_length));
    json_object_set_new(card, "max_num_seqs", json_integer(e->cfg.max_num_seqs));
    json_object_set_new(card, "max_num_batched_tokens", json_integer(e->cfg.max_num_batched_tokens));
}

static void engine_free(void *ud) {
    mk_engine *e = ud;
    if (e->gfd >= 0) close(e->gfd);
    free(e);
}

/* deliver's teardown: every sequence is gone; the handles close, the last close frees the engine. */
static void teardown(void *owner) {
    mk_engine *e = owner;
    disarm(e);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->timer);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->idle);
    if (e->gfd >= 0) bt_closer_close(&e->closer, (uv_handle_t *)&e->gpoll);
    bt_closer_seal(&e->closer);
}

/* Drops every sequence without callbacks and closes the handles; the engine's memory is freed by
 * the close callbacks, so the loop must run once more (as for any libuv handle). Safe to call from
 * inside a sink or hook callback of this engine: it is finished when that callback's tick unwinds. */
static void mk_destroy(bt_engine *be) { bt_deliver_close(&((mk_engine *)be)->dl); }

static const bt_deliver_ops mk_deliver_ops = {.free_seq = seq_free, .wake = NULL, .teardown = teardown};

static const bt_engine_ops mk_ops = {.submit = mk_submit,
                                     .stop = mk_stop,
                                     .kill = mk_kill,
                                     .get_load = mk_get_load,
                                     .card = mk_card,
                                     .destroy = mk_destroy,
                                     .handoff = mk_handoff,
                                     .kv_stats = mk_kv_stats,
                                     .tells_waits = true};

/* ---- public --------------------------------------------------------------------------------- */

void bt_mocker_config_default(bt_mocker_config *c) {
    *c = (bt_mocker_config){.num_gpu_blocks = 16384,
                            .block_size = 64,
                            .max_num_seqs = 256,
                            .max_num_batched_tokens = 8192,
                            .watermark = 0.01,
                            .speedup_ratio = 1.0,
                            .default_max_tokens = 256,
                            .fault_slow_factor = 1.0}; /* the other fault hooks: 0, off */
}

bt_status bt_mocker_config_check(const bt_mocker_config *c, char *err, size_t errlen) {
    char dummy[1];
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (c->block_size <= 1) {
        snprintf(err, errlen, "block_size must be greater than 1 (got %lld)", (long long)c->block_size);
    } else if (c->num_gpu_blocks <= 0) {
        snprintf(err, errlen, "num_gpu_blocks must be positive (got %lld)", (long long)c->num_gpu_blocks);
    } else if (c->num_gpu_blocks > INT64_MAX / c->block_size) {
        snprintf(err, errlen, "num_gpu_blocks × block_size overflows (%lld × %lld)", (long long)c->num_gpu_blocks,
                 (long long)c->block_size);
    } else if (c->max_num_seqs <= 0) {
        snprintf(err, errlen, "max_num_seqs must be positive (got %lld)", (long long)c->max_num_seqs);
    } else if (c->max_num_batched_tokens <= 0) {
        snprintf(err, errlen, "max_num_batched_tokens must be positive (got %lld)",
                 (long long)c->max_num_batched_tokens);
    } else if (!(c->watermark >= 0.0 && c->watermark < 1.0)) {
        snprintf(err, errlen, "watermark must be in [0, 1) (got %g)", c->watermark);
    } else if (floor((1.0 - c->watermark) * (double)c->num_gpu_blocks) < 1.0) {
        snprintf(err, errlen, "watermark %g leaves none of the %lld KV blocks usable", c->watermark,
                 (long long)c->num_gpu_blocks);
    } else if (!(c->speedup_ratio > 0.0) || isinf(c->speedup_ratio)) {
        snprintf(err, errlen, "speedup_ratio must be a positive finite number (got %g)", c->speedup_ratio);
    } else if (c->default_max_tokens <= 0 || c->default_max_tokens > UINT32_MAX) {
        snprintf(err, errlen, "default_max_tokens must be in [1, %u] (got %lld)", UINT32_MAX,
                 (long long)c->default_max_tokens);
    } else if (c->context_length < 0 ||
               (uint64_t)c->context_length >
                   (uint64_t)floor((1.0 - c->watermark) * (double)c->num_gpu_blocks) * (uint64_t)c->block_size) {
        snprintf(err, errlen,
                 "context_length %lld is more than the KV cache admits (%llu tokens: %lld blocks of %lld, watermark "
                 "%g); 0 means exactly that",
                 (long long)c->context_length,
                 (unsigned long long)floor((1.0 - c->watermark) * (double)c->num_gpu_blocks) *
                     (unsigned long long)c->block_size,
                 (long long)c->num_gpu_blocks, (long long)c->block_size, c->watermark);
    } else if (!(c->fault_slow_factor >= 0.0 && c->fault_slow_factor <= 1000.0)) {
        snprintf(err, errlen, "fault_slow_factor must be from 1 to 1000 (0 = 1, off; got %g)", c->fault_slow_factor);
    } else if (c->batch_gather_us < 0 || c->batch_gather_us > BT_GATHER_MAX_US) {
        snprintf(err, errlen, "batch_gather_us must be from 0 (off) to %d (got %lld)", BT_GATHER_MAX_US,
                 (long long)c->batch_gather_us);
    } else if (c->fault_die_after_tokens < 0 || c->fault_stall_after_tokens < 0 || c->fault_error_after_tokens < 0) {
        snprintf(err, errlen, "fault hook token counts must be >= 0 (0 = off)");
    } else {
        err[0] = '\0';
        return BT_OK;
    }
    return BT_ERR_INVALID;
}

bt_engine *bt_mocker_create(uv_loop_t *loop, const bt_mocker_config *cfg, const bt_engine_hooks *hooks,
                            void *hooks_ud) {
    char err[256];
    if (!loop || !cfg) return NULL;
    if (bt_mocker_config_check(cfg, err, sizeof err) != BT_OK) {
        BT_ERROR("mocker: bad configuration: %s", err);
        return NULL;
    }
    mk_engine *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->base.ops = &mk_ops;
    e->loop = loop;
    e->cfg = *cfg;
    if (hooks) e->hooks = *hooks;
    e->hooks_ud = hooks_ud;
    e->usable_blocks = (uint64_t)floor((1.0 - cfg->watermark) * (double)cfg->num_gpu_blocks);
    e->context_length =
        cfg->context_length ? (uint64_t)cfg->context_length : e->usable_blocks * (uint64_t)cfg->block_size;
    TAILQ_INIT(&e->waiting.q);
    TAILQ_INIT(&e->running.q);
    bt_deliver_init(&e->dl, &mk_deliver_ops, e);
    bt_closer_init(&e->closer, engine_free, e);
    bt_engine_gather_init(&e->gather, cfg->batch_gather_us);
    e->gfd = -1;
    if (uv_timer_init(loop, &e->timer) != 0) {
        free(e);
        return NULL;
    }
    if (uv_idle_init(loop, &e->idle) != 0) { /* cannot fail on Unix; close the timer all the same */
        bt_closer_close(&e->closer, (uv_handle_t *)&e->timer);
        bt_closer_seal(&e->closer);
        return NULL;
    }
    if (cfg->batch_gather_us > 0) {
        e->gfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (e->gfd < 0 || uv_poll_init(loop, &e->gpoll, e->gfd) != 0) {
            BT_ERROR("mocker: cannot create the batch-gather timer: %s", strerror(errno));
            bt_closer_close(&e->closer, (uv_handle_t *)&e->timer);
            bt_closer_close(&e->closer, (uv_handle_t *)&e->idle);
            bt_closer_seal(&e->closer); /* engine_free closes gfd */
            return NULL;
        }
        e->gpoll.data = e;
    }
    e->timer.data = e;
    e->idle.data = e;
    load_snapshot(e, &e->last_load);
    bt_mocker_token_text(0, NULL); /* build the vocabulary now rather than on the first request */
    BT_INFO("mocker: %lld KV blocks of %lld tokens (watermark %g), context length %llu, %lld seqs, %lld batched "
            "tokens, speedup %g, batch gather %lld us",
            (long long)cfg->num_gpu_blocks, (long long)cfg->block_size, cfg->watermark,
            (unsigned long long)e->context_length, (long long)cfg->max_num_seqs, (long long)cfg->max_num_batched_tokens,
            cfg->speedup_ratio, (long long)cfg->batch_gather_us);
    return &e->base;
}

void bt_mocker_set_slow(bt_engine *be, double factor) {
    mk_engine *e = (mk_engine *)be;
    if (!e || bt_deliver_closed(&e->dl) || !(factor >= 1.0 && factor <= 1000.0)) return;
    BT_WARN("mocker: fault: steps take %gx their time", factor);
    e->cfg.fault_slow_factor = factor;
}

void bt_mocker_inject(bt_engine *be, bt_mocker_fault f) {
    mk_engine *e = (mk_engine *)be;
    if (!e || bt_deliver_closed(&e->dl) || e->dead) return;
    switch (f) {
    case BT_MOCKER_FAULT_DIE:
        BT_WARN("mocker: fault injected: engine dead");
        e->dead = true;
        if (!bt_deliver_busy(&e->dl)) arm(e, 0); /* on_dead comes from the loop, never from here */
        break;
    case BT_MOCKER_FAULT_STALL:
        BT_WARN("mocker: fault injected: engine stalled");
        e->stalled = true;
        break;
    case BT_MOCKER_FAULT_RESUME:
        if (e->stalled) BT_WARN("mocker: fault cleared: engine resumes");
        e->stalled = false;
        kick(e);
        break;
    }
}
