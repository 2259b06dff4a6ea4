/* llama_kv.h — a sequence's KV state as it travels between workers (the KV hand-off,
 * docs/engines.md and docs/protocol.md "KV hand-off"): export on the giving engine, checks and
 * import on the receiving one.
 *
 * A state is one self-describing byte string:
 *
 *     header (72 bytes, little-endian)
 *       u8[8] magic "BTKVST02"
 *       u64 exactness  FNV-1a 64 of the engine's exactness fingerprint (llama.h: llama.cpp version,
 *                      CPU backend variant, threads, ubatch, flash attention, model file identity):
 *                      the one description of this worker's numerics, also in its model card
 *       u64 reserved   0
 *       u32 n_layer, u32 n_embd, u32 flags (bit 0 kv_unified), u32 n_seq_max
 *       u32 n_ctx      KV cells of the context
 *       u32 n_tokens   positions 0 .. n_tokens-1 of the sequence are in the state
 *       u64 state_len  bytes of llama.cpp's per-sequence state (llama_state_seq_get_data)
 *       u64 checksum   FNV-1a 64 of everything after the header
 *       u64 reserved   0
 *     n_tokens × u32   the token ids at those positions
 *     state_len bytes  llama.cpp's state
 *
 * The receiver accepts a state only when the header says the same exactness fingerprint and KV
 * layout as its own, the checksum holds, and the token ids are its sequence's own first tokens;
 * anything else is a fallback to prefill (never a wrong continuation). Sampling needs nothing from
 * the state: the sampler is counter-based (llama_sample.h), a function of the seed and the position.
 *
 * These functions run on the engine thread (they call llama.cpp) and know nothing of its
 * scheduler: llama.c calls them with the context, the sequence's slot and its tokens. */
#ifndef BATON_LLAMA_KV_H
#define BATON_LLAMA_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "engine/llama/llama.h"
#include "engine/llama/llama_lib.h"

#define LL_KV_HEADER 72u

typedef struct {
    uint64_t exactness; /* FNV-1a 64 of the exactness fingerprint string */
    uint32_t n_layer, n_embd, flags, n_seq_max, n_ctx;
} ll_kv_ident;

#ifdef BATON_HAVE_LLAMA
/* What a state made here says of its maker, and what one must say to be imported here: the
 * engine's exactness fingerprint `exactness` (computed once, by llama.c, for the model card too)
 * and the context's KV layout. Tolerant of a function table that lacks the optional functions, as
 * the unit tests' fake one does. */
void ll_kv_ident_init(ll_kv_ident *id, const bt_llama_api *L, const struct llama_model *model,
                      struct llama_context *ctx, const char *exactness, const bt_llama_config *cfg);

/* Exports positions [0, n_past) of `slot`, whose token ids are tok[0..n_past). Returns a malloc'd
 * state of *len bytes, or NULL (nothing to export, or out of memory). corrupt != 0 (fault
 * injection, --fault-kv-corrupt) flips one byte of llama.cpp's state after the checksum is made. */
uint8_t *ll_kv_export(const bt_llama_api *L, struct llama_context *ctx, int slot, const llama_token *tok, size_t n_past,
                      const ll_kv_ident *id, bool corrupt, size_t *len);

/* Imports a state into the empty `slot` of a sequence whose tokens are tok[0..n_tok). On success
 * returns true and sets *n_past to the positions now in the cache (at most n_tok - 1: the newest
 * token is always decoded, it yields the next token's logits). On failure the slot is empty again
 * and *why says which fallback it is. */
bool ll_kv_import(const bt_llama_api *L, struct llama_context *ctx, int slot, const llama_token *tok, size_t n_tok,
                  const uint8_t *state, size_t len, const ll_kv_ident *id, size_t *n_past, bt_kv_fallback *why);
#endif

/* FNV-1a 64 of p[0..n), continuing from h (start with LL_FNV_INIT). */
#define LL_FNV_INIT 0xcbf29ce484222325ull
uint64_t ll_fnv(uint64_t h, const void *p, size_t n);

#endif
