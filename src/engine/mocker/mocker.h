/* mocker.h — the simulated engine: Dynamo's mocker timing model with a deterministic token
 * function.
 *
 * Scheduling follows Dynamo's mocker (waiting → prefill → decode, paged KV blocks with a
 * watermark, max sequences, max batched tokens, chunked prefill, preemption) and each step lasts
 * prefill_ms + decode_ms divided by the speedup ratio, on a libuv timer. The next token id is a
 * pure function of (seed, temperature, top_p, the whole token prefix): a continuation from
 * prompt + first k generated tokens yields exactly the rest of an uninterrupted run.
 *
 * KV hand-off: the mocker models it like the llama engine (same counters, same fallbacks), with a
 * state whose size is kv_bytes_per_token × tokens: a 40-byte header ("BTMKST01", bytes per
 * token, tokens covered, the rolling state of that prefix, an FNV-1a checksum) and deterministic
 * filler. It is accepted when the bytes per token match, the checksum holds and the rolling state
 * is that of the continuation's own first tokens. */
#ifndef BATON_MOCKER_H
#define BATON_MOCKER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "engine/engine.h"

typedef struct {
    int64_t num_gpu_blocks;         /* --num-gpu-blocks-override, 16384 */
    int64_t block_size;             /* --block-size, 64 */
    int64_t max_num_seqs;           /* --max-num-seqs, 256 */
    int64_t max_num_batched_tokens; /* --max-num-batched-tokens, 8192 */
    double watermark;               /* --watermark, 0.01 */
    double speedup_ratio;           /* --speedup-ratio, 1.0 */
    int64_t default_max_tokens;     /* when a request sets none, 256 */
    /* --context-length: prompt + completion tokens of one sequence; 0 = what the KV cache admits
     * (usable blocks × block size), and more than that is a configuration error. Advertised in the
     * model card ("context_length") so that the frontend checks what it can before routing. */
    int64_t context_length;
    /* Fault hooks for tests, 0 = off. Counted over all tokens the engine emitted. */
    int64_t fault_die_after_tokens;   /* the engine declares itself dead (hooks.on_dead) */
    int64_t fault_stall_after_tokens; /* the scheduler stops making progress (a hung engine) */
    int64_t fault_error_after_tokens; /* every running sequence fails with BT_ERR_ENGINE */
    /* A slow engine (a bad GPU, a thermal throttle): every step lasts this many times longer;
     * 1 = off (the default), 0 is read as 1. Changed at run time by bt_mocker_set_slow. */
    double fault_slow_factor;
    /* The KV hand-off model (docs/engines.md): a sequence handed off exports a state of this many
     * bytes per token it holds (0 = it exports none); a continuation that brings a matching
     * state skips the prefill of the tokens it covers. */
    int64_t kv_bytes_per_token;
    /* --batch-gather-us: the first step of an idle engine waits until no request has arrived for
     * this many µs, at most BT_GATHER_BOUND times as long after the first (engine.h); 0 = off. */
    int64_t batch_gather_us;
} bt_mocker_config;

typedef enum {
    BT_MOCKER_FAULT_DIE = 1,   /* engine dead now */
    BT_MOCKER_FAULT_STALL = 2, /* scheduler stops stepping */
    BT_MOCKER_FAULT_RESUME = 3 /* undo a stall */
} bt_mocker_fault;

void bt_mocker_config_default(bt_mocker_config *c);
/* Validates a configuration; on error writes why into err. */
bt_status bt_mocker_config_check(const bt_mocker_config *c, char *err, size_t errlen);

/* Creates the engine on `loop`. `hooks` (copied) may be NULL. */
bt_engine *bt_mocker_create(uv_loop_t *loop, const bt_mocker_config *cfg, const bt_engine_hooks *hooks,
                            void *hooks_ud);
/* Sets the slow fault's factor (1 = healthy) from the next step on. */
void bt_mocker_set_slow(bt_engine *e, double factor);
/* Injects a fault at once (used by the worker's fault signals and by tests). */
void bt_mocker_inject(bt_engine *e, bt_mocker_fault f);

/* The mocker's tokenizer and vocabulary: pure functions, usable without an engine. */
#define BT_MOCKER_VOCAB 4096u
/* Tokenizes text into ids (at most cap written); returns the number of tokens it has. */
size_t bt_mocker_tokenize(const char *text, size_t len, uint32_t *out, size_t cap);
/* The text of one token id (e.g. " fenlo", ",", "."); never NULL. */
const char *bt_mocker_token_text(uint32_t id, size_t *len);
/* The next token after a prefix whose rolling state is `state` (see bt_mocker_state_push), for a
 * request's seed, temperature and top_p (1: no nucleus). top_p takes part only when temperature >
 * 0 and top_p < 1 (then 0 chooses as temperature 0 does, the greedy choice); otherwise the choice
 * is that of (state, seed, temperature) alone. */
uint32_t bt_mocker_next_token(uint64_t state, uint64_t seed, double temperature, double top_p);
/* Rolling prefix state: state' = push(state, token); the empty prefix has state 0. */
uint64_t bt_mocker_state_push(uint64_t state, uint32_t token);

#endif
