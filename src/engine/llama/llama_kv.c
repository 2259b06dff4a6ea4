/* llama_kv.c — export, checks and import of a sequence's KV state (see llama_kv.h). */
#include "engine/llama/llama_kv.h"

#include <stdlib.h>
#include <string.h>

#include "common/log.h"

uint64_t ll_fnv(uint64_t h, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

#ifdef BATON_HAVE_LLAMA

static const uint8_t MAGIC[8] = {'B', 'T', 'K', 'V', 'S', 'T', '0', '2'};

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}
static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

void ll_kv_ident_init(ll_kv_ident *id, const bt_llama_api *L, const struct llama_model *model,
                      struct llama_context *ctx, const char *exactness, const bt_llama_config *cfg) {
    memset(id, 0, sizeof *id);
    id->exactness = ll_fnv(LL_FNV_INIT, exactness, strlen(exactness));
    id->n_layer = L->llama_model_n_layer ? (uint32_t)L->llama_model_n_layer(model) : 0;
    id->n_embd = L->llama_model_n_embd ? (uint32_t)L->llama_model_n_embd(model) : 0;
    id->flags = cfg->kv_unified ? 1u : 0u;
    id->n_seq_max = L->llama_n_seq_max ? L->llama_n_seq_max(ctx) : 0;
    id->n_ctx = L->llama_n_ctx ? L->llama_n_ctx(ctx) : 0;
}

uint8_t *ll_kv_export(const bt_llama_api *L, struct llama_context *ctx, int slot, const llama_token *tok, size_t n_past,
                      const ll_kv_ident *id, bool corrupt, size_t *len) {
    if (!L->llama_state_seq_get_size || !L->llama_state_seq_get_data || slot < 0 || n_past == 0 || n_past > UINT32_MAX)
        return NULL;
    size_t sl = L->llama_state_seq_get_size(ctx, slot);
    if (sl == 0) return NULL;
    size_t total = LL_KV_HEADER + 4 * n_past + sl;
    uint8_t *b = malloc(total);
    if (!b) return NULL;
    uint8_t *st = b + LL_KV_HEADER + 4 * n_past;
    size_t got = L->llama_state_seq_get_data(ctx, st, sl, slot);
    if (got == 0 || got > sl) {
        free(b);
        return NULL;
    }
    total = LL_KV_HEADER + 4 * n_past + got;
    memcpy(b, MAGIC, 8);
    put64(b + 8, id->exactness);
    put64(b + 16, 0); /* reserved */
    put32(b + 24, id->n_layer);
    put32(b + 28, id->n_embd);
    put32(b + 32, id->flags);
    put32(b + 36, id->n_seq_max);
    put32(b + 40, id->n_ctx);
    put32(b + 44, (uint32_t)n_past);
    put64(b + 48, got);
    for (size_t i = 0; i < n_past; i++) put32(b + LL_KV_HEADER + 4 * i, (uint32_t)tok[i]);
    put64(b + 56, ll_fnv(LL_FNV_INIT, b + LL_KV_HEADER, total - LL_KV_HEADER));
    put64(b + 64, 0); /* reserved */
    if (corrupt) st[got / 2] ^= 0x5a;
    *len = total;
    return b;
}

bool ll_kv_import(const bt_llama_api *L, struct llama_context *ctx, int slot, const llama_token *tok, size_t n_tok,
                  const uint8_t *s, size_t len, const ll_kv_ident *id, size_t *n_past, bt_kv_fallback *why) {
    *n_past = 0;
    if (!L->llama_state_seq_set_data) return *why = BT_KV_FB_UNSUPPORTED, false;
    if (len < LL_KV_HEADER || memcmp(s, MAGIC, 8) != 0 || get64(s + 16) != 0 || get64(s + 64) != 0)
        return *why = BT_KV_FB_CORRUPT, false;
    uint64_t n = get32(s + 44), sl = get64(s + 48);
    if (n == 0 || (len - LL_KV_HEADER) / 4 < n || sl != len - LL_KV_HEADER - 4 * n)
        return *why = BT_KV_FB_CORRUPT, false;
    if (get64(s + 56) != ll_fnv(LL_FNV_INIT, s + LL_KV_HEADER, len - LL_KV_HEADER))
        return *why = BT_KV_FB_CORRUPT, false;
    if (get64(s + 8) != id->exactness || get32(s + 24) != id->n_layer ||
        get32(s + 28) != id->n_embd || get32(s + 32) != id->flags || get32(s + 36) != id->n_seq_max ||
        get32(s + 40) != id->n_ctx)
        return *why = BT_KV_FB_MISMATCH, false;
    /* the state's positions must be this sequence's own tokens, at least up to the newest one but
     * one (the source may have generated tokens the client never got: those are cut off below) */
    size_t keep = n < n_tok - 1 ? (size_t)n : n_tok - 1;
    if (keep == 0) return *why = BT_KV_FB_TOKENS, false;
    for (size_t i = 0; i < keep; i++)
        if (get32(s + LL_KV_HEADER + 4 * i) != (uint32_t)tok[i]) return *why = BT_KV_FB_TOKENS, false;
    llama_memory_t mem = L->llama_get_memory(ctx);
    const uint8_t *st = s + LL_KV_HEADER + 4 * n;
    if (L->llama_state_seq_set_data(ctx, st, sl, slot) == 0 ||
        L->llama_memory_seq_pos_max(mem, slot) != (llama_pos)n - 1) {
        L->llama_memory_seq_rm(mem, slot, -1, -1);
        return *why = BT_KV_FB_IMPORT, false;
    }
    if (keep < n) L->llama_memory_seq_rm(mem, slot, (llama_pos)keep, -1);
    *n_past = keep;
    return true;
}

#endif
