/* engine.h — the interface between a worker and the engine it hosts.
 *
 * An engine runs on the worker's libuv loop and never blocks it. The worker submits sequences;
 * the engine reports their output through a per-sequence sink and its overall load through the
 * engine hooks. Implementations: the mocker (engine/mocker/), the OpenAI-compatible upstream
 * proxy (engine/openai/) and llama.cpp in process (engine/llama/).
 *
 * Ownership and call rules:
 *  - bt_engine_submit() copies everything it needs from the request; the caller keeps ownership.
 *  - A sequence's sink receives zero or more on_tokens calls, then exactly one of on_finish or
 *    on_error, after which the sequence handle is dead and must not be used. Sink callbacks are
 *    never made from inside bt_engine_submit(), bt_engine_stop() or bt_engine_kill().
 *  - bt_engine_kill() removes the sequence at once (waiting queue or running batch), returns its
 *    KV blocks to the free pool and makes no further sink callback. The handle is dead on return.
 *  - bt_engine_stop() asks for a graceful end: the sequence ends soon with on_finish(reason
 *    BT_FINISH_CANCELLED) and the usage so far.
 *  - Tokens are delivered only once they are final: text held back for stop-string matching is
 *    delivered with its token ids, never before, so "ids sent" always equals "text sent".
 * Implementations keep the callback rules above through one module, engine/deliver.h. */
#ifndef BATON_ENGINE_H
#define BATON_ENGINE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/status.h"

typedef enum { BT_API_CHAT = 0, BT_API_COMPLETION = 1 } bt_api;

typedef enum {
    BT_FINISH_STOP = 0,      /* a stop string or end of sequence */
    BT_FINISH_LENGTH = 1,    /* max_tokens reached */
    BT_FINISH_CANCELLED = 2, /* stopped on request */
    /* an upstream's own reasons, passed through by the openai engine (OpenAI's names) */
    BT_FINISH_CONTENT_FILTER = 3, /* the upstream withheld content */
    BT_FINISH_TOOL_CALLS = 4,     /* the answer is tool calls */
    BT_FINISH_FUNCTION_CALL = 5,  /* the answer is a function call (OpenAI's older form) */
    BT_FINISH_MAX_ = 5
} bt_finish_reason;

/* "stop", "length", "cancelled", "content_filter", "tool_calls", "function_call" */
const char *bt_finish_reason_name(bt_finish_reason r);

typedef struct {
    uint32_t prompt_tokens;     /* the original prompt (carried tokens not included) */
    uint32_t completion_tokens; /* every generated token, carried ones included */
    /* the counts are not the model server's: an OpenAI upstream that reported no usage leaves the
     * openai engine with its own count of what it delivered and no prompt count; the client is
     * told that no usage was reported instead of given them (docs/engines.md §2.1) */
    bool unreported;
} bt_usage;

#define BT_MAX_STOP 4 /* OpenAI allows up to 4 stop sequences */
/* entries of a request's logit_bias: each is applied at every generated token; OpenAI's API refuses
 * larger maps too (docs/security.md) */
#define BT_MAX_LOGIT_BIAS 300
/* Bytes in one stop string. Every stop string is matched against the text after each token, so
 * its length is work a client would otherwise choose: 4 stop strings of 1 MB slowed every other
 * stream of a worker 8x. The frontend refuses longer ones (400) and so does the worker. */
#define BT_MAX_STOP_LEN 1024

typedef struct {
    const char *request_id;
    bt_api api;
    const json_t *body; /* the original OpenAI request body (messages or prompt live here) */
    /* Tokens already generated (and delivered to the client) by earlier attempts: the engine
     * continues from prompt + carried, and counts them in usage.completion_tokens. */
    const uint32_t *carried;
    uint32_t n_carried;
    /* The text the client received with the carried tokens (NULL when the frontend sent none).
     * Engines whose token ids cannot be turned back into text continue from it. */
    const char *carried_text;
    size_t carried_text_len;
    uint32_t max_tokens; /* new tokens still allowed (already reduced by n_carried) */
    /* Scheduling priority, lower served sooner (vLLM's convention), 0 by default. An engine with a
     * waiting queue admits by (priority, arrival): a sequence never waits behind one of a larger
     * priority value that arrived later (docs/engines.md). */
    int32_t priority;
    double temperature;
    uint64_t seed;
    /* A seed the frontend chose for a request whose body has none, the same for every attempt
     * (0 = none): engines that sample for real use it so a continuation is exact. */
    uint64_t attempt_seed;
    const char *stop[BT_MAX_STOP];
    int n_stop;
    /* A KV state exported by another worker's engine for this sequence (docs/engines.md, "KV
     * hand-off"), NULL when none: an engine that can import it continues from it instead of
     * prefilling the tokens it covers; one that cannot, or finds it does not match, falls back to
     * prefilling (counted in bt_engine_kv_stats.fallbacks). Copied by submit. */
    const uint8_t *kv_state;
    size_t kv_state_len;
} bt_engine_request;

/* Why an offered KV state was not used (baton_worker_kv_handoff_fallbacks_total{reason}). */
typedef enum {
    BT_KV_FB_MISSING,     /* announced, but not all of it arrived (worker) */
    BT_KV_FB_CORRUPT,     /* bad format or checksum */
    BT_KV_FB_MISMATCH,    /* another model, backend or KV layout */
    BT_KV_FB_TOKENS,      /* its tokens are not this sequence's */
    BT_KV_FB_IMPORT,      /* the engine could not load it */
    BT_KV_FB_UNSUPPORTED, /* this engine imports no state */
    BT_KV_FB_N_
} bt_kv_fallback;

const char *bt_kv_fallback_name(bt_kv_fallback r); /* "missing", "corrupt", ... */

/* KV hand-off counters of one engine, totals since it started. */
typedef struct {
    uint64_t exports;        /* states exported at a hand-off */
    uint64_t export_bytes;   /* their bytes */
    uint64_t imports;        /* states imported: those sequences were not prefilled */
    uint64_t imported_tokens; /* tokens those states covered */
    uint64_t fallbacks[BT_KV_FB_N_];
    /* Tokens computed that were not a sequence's newest token: prompt, carried and recomputed
     * (preempted) tokens, i.e. prefill work. A continuation that imported its state adds none. */
    uint64_t prefill_tokens;
    /* Running sequences preempted (KV dropped, recomputed later from their tokens): because the KV
     * cache was full, or for a strictly more urgent waiting sequence (priority preemption). */
    uint64_t preempted_kv, preempted_priority;
    /* Scheduler steps that computed something (a prefill chunk or a decoded token). */
    uint64_t steps;
    /* Batch gathering (bt_engine_gather below): first steps of an idle engine that waited, the
     * sequences waiting when those steps began, and the time they waited in total (ns). */
    uint64_t gathers, gathered_seqs, gather_ns;
} bt_engine_kv_stats;

/* Batch gathering (docs/engines.md, "Batch gathering"), shared by the engines that schedule
 * steps (the mocker, llama). An engine that starts a step as soon as a request waits gives the
 * first few requests of a burst that reached it over a fraction of a millisecond a step of their
 * own, and the rest wait a whole step. With a window of N µs, the first step of an idle engine
 * (no running sequence) waits until no request has arrived for N µs, and never longer than
 * BT_GATHER_BOUND x N after the first arrival, so a steady trickle cannot postpone it. A running
 * engine never waits: arrivals join at its next step boundary. A pure policy (no clock, no I/O):
 * the engine gives it the time of each arrival and asks it until when to hold its first step. */
#define BT_GATHER_BOUND 8
#define BT_GATHER_MAX_US 1000000 /* the largest window accepted (1 s) */

typedef struct {
    uint64_t window_ns; /* 0: off, every arrival is stepped at once */
    uint64_t first_ns;  /* the arrival that started the gather under way */
    uint64_t last_ns;   /* the latest arrival since */
    bool active;        /* a gather is under way: the engine holds its first step */
} bt_engine_gather;

/* window_us <= 0 (or more than BT_GATHER_MAX_US, which configuration checks refuse) turns it off. */
void bt_engine_gather_init(bt_engine_gather *g, int64_t window_us);
/* A sequence joined the waiting queue at now_ns; `idle`: the engine has no running sequence.
 * Starts a gather on an idle engine, or extends the one under way; no-op when off or running. */
void bt_engine_gather_arrive(bt_engine_gather *g, uint64_t now_ns, bool idle);
/* While a gather is under way: when the first step may start, min(last + window, first + bound). */
uint64_t bt_engine_gather_deadline(const bt_engine_gather *g);
/* True while a gather is under way and its deadline is after now_ns: the first step waits. */
bool bt_engine_gather_holds(const bt_engine_gather *g, uint64_t now_ns);
/* Ends the gather under way (its step starts, or nothing waits any more: a kill or a stop during
 * it); returns how long it lasted, now_ns - first (0 when none was under way). */
uint64_t bt_engine_gather_end(bt_engine_gather *g, uint64_t now_ns);

/* The result of bt_engine_handoff, on the loop: `state` (malloc'd, the callee owns it; NULL when
 * the engine had no state to give, e.g. the sequence was still waiting) of `len` bytes. */
typedef void (*bt_engine_handoff_cb)(void *ud, uint8_t *state, size_t len);

/* Why an engine holds a sequence without computing it (bt_engine_sink.on_wait). */
typedef enum {
    /* a scheduler step left it waiting: no sequence slot, KV blocks or prefill budget for it (an
     * admitted sequence too, whose prefill the steps leave out while others take the budget) */
    BT_ENGINE_WAIT_QUEUED = 0,
    BT_ENGINE_WAIT_PREEMPTED = 1, /* its KV was dropped (KV full, or a more urgent sequence); to be recomputed */
} bt_engine_wait;

typedef struct {
    void (*on_tokens)(void *ud, const uint32_t *ids, size_t n, const char *text, size_t text_len);
    void (*on_finish)(void *ud, bt_finish_reason reason, const bt_usage *usage);
    void (*on_error)(void *ud, bt_status code, const char *msg);
    /* Optional (NULL: not told). The sequence waits in the engine, computed by no step, until its
     * next on_tokens or its ending: told once per wait, after the output produced before it, and
     * only for a wait still on when the engine delivers (a wait that ended before is not told). An
     * engine whose ops say tells_waits tells every wait of its sequences: queued at a scheduler step
     * that could not admit them (or, for llama, at steps that left an admitted prefill out for want
     * of budget, and at submit for a prompt queued behind another for its prompt thread),
     * preempted. */
    void (*on_wait)(void *ud, bt_engine_wait reason);
} bt_engine_sink;

typedef struct {
    uint64_t active_decode_blocks;  /* KV blocks in use */
    uint64_t total_blocks;          /* KV capacity */
    uint64_t active_prefill_tokens; /* prompt tokens admitted but not yet prefilled */
    /* sequences queued, not yet admitted; and admitted ones told they wait (on_wait) until a step
     * computes them again, which `running` then leaves out: every sequence told it waits is
     * counted here from before the wait is delivered until it runs again (docs/protocol.md §4) */
    uint64_t waiting;
    /* of those waiting, the ones not yet ready for admission: their prompt still queued for
     * tokenization (llama's prompt thread, docs/engines.md §3.2); 0 for the other engines. They
     * will take a slot, but one freed now does not let them in sooner. */
    uint64_t preparing;
    uint64_t running; /* sequences admitted (prefill or decode), less those counted in waiting */
    uint64_t max_num_batched_tokens;
    /* Priority preemption (0 for an engine without it): the running sequences that a strictly more
     * urgent arrival would preempt now — those of the least urgent running priority that may be
     * preempted (not preempted for priority since their last token), less the waiting sequences
     * more urgent than them, which claim them first — and that priority. The frontend routes an
     * urgent request past its busy verdict to such a worker (docs/load-shedding.md). */
    uint64_t victims;
    int64_t victim_priority;
} bt_engine_load;

/* Engine-wide notifications to the worker. */
typedef struct {
    void (*on_load)(void *ud);                  /* load changed; read it with bt_engine_get_load */
    void (*on_dead)(void *ud, const char *why); /* the engine failed; the worker shuts down, exit 1 */
    /* Optional (NULL: not told). The engine cannot serve for now, or can again (`why` says why
     * not, NULL when serving): the openai engine while its upstream refuses its credentials. The
     * worker is not ready meanwhile (docs/operations.md, Health). Engines start serving. */
    void (*on_serving)(void *ud, bool serving, const char *why);
} bt_engine_hooks;

typedef struct bt_engine bt_engine;
typedef struct bt_engine_seq bt_engine_seq;

typedef struct {
    /* Called through bt_engine_submit, which has checked the arguments: req, sink (all three
     * callbacks) and out are set, *out is NULL, err holds "" and errlen > 0. */
    bt_status (*submit)(bt_engine *e, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                        bt_engine_seq **out, char *err, size_t errlen);
    void (*stop)(bt_engine *e, bt_engine_seq *s);
    void (*kill)(bt_engine *e, bt_engine_seq *s);
    void (*get_load)(bt_engine *e, bt_engine_load *out);
    /* Fills the model card fields this engine knows ("total_kv_blocks", "block_size", ...). */
    void (*card)(bt_engine *e, json_t *card);
    /* Destroys the engine; every live sequence is dropped without callbacks. */
    void (*destroy)(bt_engine *e);
    /* Optional (NULL: the engine exports nothing). Ends the sequence as bt_engine_kill does (no
     * further sink callback, the handle is dead on return) after exporting its KV state; cb is
     * called exactly once, on the loop (possibly before handoff returns) — unless the engine is
     * destroyed first. */
    void (*handoff)(bt_engine *e, bt_engine_seq *s, bt_engine_handoff_cb cb, void *ud);
    /* Optional: the engine's KV hand-off counters (zeros when NULL). */
    void (*kv_stats)(bt_engine *e, bt_engine_kv_stats *out);
    /* The engine tells its sequences' every wait (bt_engine_sink.on_wait): a sequence it has not
     * told about is being computed. False for an engine that cannot see its sequences wait (the
     * OpenAI proxy: its upstream queues them), whose worker then does not announce
     * BT_HELLO_WAITING (docs/protocol.md). */
    bool tells_waits;
    /* The engine fails a sequence that makes no progress on its own (the OpenAI proxy: each one is
     * an upstream request with its own stall timeout), so the worker's engine monitor, which fails
     * the whole worker, does not watch it (docs/engines.md). */
    bool times_own_streams;
} bt_engine_ops;

struct bt_engine {
    const bt_engine_ops *ops;
};

/* The ops table of an engine whose operations are named <prefix>_submit, <prefix>_stop, ... */
#define BT_ENGINE_OPS(prefix)                                                                                          \
    {                                                                                                                  \
        .submit = prefix##_submit, .stop = prefix##_stop, .kill = prefix##_kill, .get_load = prefix##_get_load,        \
        .card = prefix##_card, .destroy = prefix##_destroy                                                             \
    }

/* err may be NULL (or errlen 0): the message is then dropped. BT_ERR_INVALID without a request,
 * a complete sink or an output handle. */
bt_status bt_engine_submit(bt_engine *e, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                           bt_engine_seq **out, char *err, size_t errlen);
static inline void bt_engine_stop(bt_engine *e, bt_engine_seq *s) { e->ops->stop(e, s); }
static inline void bt_engine_kill(bt_engine *e, bt_engine_seq *s) { e->ops->kill(e, s); }
static inline void bt_engine_get_load(bt_engine *e, bt_engine_load *out) { e->ops->get_load(e, out); }
static inline void bt_engine_card(bt_engine *e, json_t *card) { e->ops->card(e, card); }
/* Hands the sequence off (see bt_engine_ops.handoff); an engine without export kills it and calls
 * cb(ud, NULL, 0) before returning. */
void bt_engine_handoff(bt_engine *e, bt_engine_seq *s, bt_engine_handoff_cb cb, void *ud);
void bt_engine_kv_stats_get(bt_engine *e, bt_engine_kv_stats *out);
static inline bool bt_engine_tells_waits(const bt_engine *e) { return e && e->ops->tells_waits; }
static inline bool bt_engine_times_own_streams(const bt_engine *e) { return e && e->ops->times_own_streams; }
static inline void bt_engine_destroy(bt_engine *e) {
    if (e) e->ops->destroy(e);
}

#endif
