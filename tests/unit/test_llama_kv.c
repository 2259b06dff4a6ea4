/* test_llama_kv.c — the KV state format and its checks (src/engine/llama/llama_kv.c) with a fake
 * llama.cpp whose per-sequence state is the list of token ids its memory holds: an export of one
 * slot imported into another must give back the same memory, cut at the right position.
 *
 * Covers: export → import round trip (n_past = the state's tokens, or the continuation's tokens
 * but one when it has fewer: held-back tokens are cut off with seq_rm); every fallback reason:
 * a flipped byte anywhere (corrupt: checksum), a truncated or extended state (corrupt), another
 * exactness fingerprint or KV layout (mismatch; the identity is made from the fingerprint string
 * itself, so a worker differing only in --llama-threads is another one), other token ids (tokens), llama.cpp refusing the data
 * (import, the slot left empty), a table without the function (unsupported); the fault hook
 * (--fault-kv-corrupt) makes a state the importer refuses. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/llama/llama_kv.h"

#ifdef BATON_HAVE_LLAMA

#define NSEQ 4
#define NPOS 64

static int fake_ctx_obj, fake_mem_obj;
static int32_t mem[NSEQ][NPOS];
static int32_t nmem[NSEQ];
static bool refuse_set;

/* the fake's state of a sequence: u32 count, then the ids */
static size_t f_get_size(struct llama_context *c, llama_seq_id s) {
    (void)c;
    return 4 + 4 * (size_t)nmem[s];
}
static size_t f_get_data(struct llama_context *c, uint8_t *dst, size_t size, llama_seq_id s) {
    size_t need = f_get_size(c, s);
    if (size < need) return 0;
    memcpy(dst, &nmem[s], 4);
    memcpy(dst + 4, mem[s], 4 * (size_t)nmem[s]);
    return need;
}
static size_t f_set_data(struct llama_context *c, const uint8_t *src, size_t size, llama_seq_id s) {
    (void)c;
    int32_t n;
    if (refuse_set || size < 4) return 0;
    memcpy(&n, src, 4);
    if (n < 0 || n > NPOS || size != 4 + 4 * (size_t)n) return 0;
    memcpy(mem[s], src + 4, 4 * (size_t)n);
    nmem[s] = n;
    return size;
}
static llama_memory_t f_get_memory(const struct llama_context *c) {
    (void)c;
    return (llama_memory_t)&fake_mem_obj;
}
static bool f_seq_rm(llama_memory_t m, llama_seq_id s, llama_pos p0, llama_pos p1) {
    (void)m;
    (void)p1;
    nmem[s] = p0 < 0 ? 0 : (p0 < nmem[s] ? p0 : nmem[s]);
    return true;
}
static llama_pos f_pos_max(llama_memory_t m, llama_seq_id s) {
    (void)m;
    return nmem[s] - 1;
}

static bt_llama_api api = {
    .llama_state_seq_get_size = f_get_size,
    .llama_state_seq_get_data = f_get_data,
    .llama_state_seq_set_data = f_set_data,
    .llama_get_memory = f_get_memory,
    .llama_memory_seq_rm = f_seq_rm,
    .llama_memory_seq_pos_max = f_pos_max,
};

static const ll_kv_ident ident = {.exactness = 0x1111,
                                  .n_layer = 5,
                                  .n_embd = 64,
                                  .flags = 1,
                                  .n_seq_max = NSEQ,
                                  .n_ctx = NSEQ * NPOS};

#define CTX ((struct llama_context *)&fake_ctx_obj)

/* Fills slot 0 with tokens 100..100+n-1 and exports it. */
static uint8_t *export_n(int n, bool corrupt, size_t *len, llama_token *tok) {
    for (int i = 0; i < n; i++) tok[i] = mem[0][i] = 100 + i;
    nmem[0] = n;
    return ll_kv_export(&api, CTX, 0, tok, (size_t)n, &ident, corrupt, len);
}

static void test_roundtrip(void **state) {
    (void)state;
    llama_token tok[NPOS];
    size_t len = 0, n_past = 99;
    uint8_t *st = export_n(20, false, &len, tok);
    assert_non_null(st);
    assert_int_equal(len, LL_KV_HEADER + 4 * 20 + 4 + 4 * 20);
    bt_kv_fallback why = BT_KV_FB_N_;
    /* the continuation has the 20 tokens and one more (its newest): all 20 come from the state */
    tok[20] = 7;
    nmem[1] = 0;
    assert_true(ll_kv_import(&api, CTX, 1, tok, 21, st, len, &ident, &n_past, &why));
    assert_int_equal(n_past, 20);
    assert_int_equal(nmem[1], 20);
    assert_memory_equal(mem[1], mem[0], 4 * 20);
    /* a continuation with fewer tokens (the client never got the last 5): cut to its own but one */
    nmem[2] = 0;
    assert_true(ll_kv_import(&api, CTX, 2, tok, 15, st, len, &ident, &n_past, &why));
    assert_int_equal(n_past, 14);
    assert_int_equal(nmem[2], 14);
    free(st);
}

static void expect_fallback(const uint8_t *st, size_t len, const llama_token *tok, size_t n_tok, const ll_kv_ident *id,
                            bt_kv_fallback want) {
    size_t n_past = 99;
    bt_kv_fallback why = BT_KV_FB_N_;
    nmem[3] = 0;
    assert_false(ll_kv_import(&api, CTX, 3, tok, n_tok, st, len, id, &n_past, &why));
    assert_int_equal(why, want);
    assert_int_equal(n_past, 0);
    assert_int_equal(nmem[3], 0); /* the slot is left empty */
}

static void test_fallbacks(void **state) {
    (void)state;
    llama_token tok[NPOS];
    size_t len = 0;
    uint8_t *st = export_n(20, false, &len, tok);
    assert_non_null(st);
    tok[20] = 7;
    /* a flipped byte anywhere: header, ids or llama.cpp's part */
    for (size_t i = 0; i < len; i += 7) {
        st[i] ^= 0x10;
        size_t n_past;
        bt_kv_fallback why = BT_KV_FB_N_;
        assert_false(ll_kv_import(&api, CTX, 3, tok, 21, st, len, &ident, &n_past, &why));
        assert_true(why == BT_KV_FB_CORRUPT || why == BT_KV_FB_MISMATCH);
        st[i] ^= 0x10;
    }
    expect_fallback(st, len - 1, tok, 21, &ident, BT_KV_FB_CORRUPT);
    expect_fallback(st, LL_KV_HEADER - 1, tok, 21, &ident, BT_KV_FB_CORRUPT);
    uint8_t *longer = calloc(1, len + 8);
    memcpy(longer, st, len);
    expect_fallback(longer, len + 8, tok, 21, &ident, BT_KV_FB_CORRUPT);
    free(longer);
    /* another fingerprint, layout */
    ll_kv_ident other = ident;
    other.exactness++;
    expect_fallback(st, len, tok, 21, &other, BT_KV_FB_MISMATCH);
    other = ident;
    other.flags = 0;
    expect_fallback(st, len, tok, 21, &other, BT_KV_FB_MISMATCH);
    other = ident;
    other.n_ctx /= 2;
    expect_fallback(st, len, tok, 21, &other, BT_KV_FB_MISMATCH);
    /* other tokens: one id differs inside the covered prefix */
    llama_token mine[NPOS];
    memcpy(mine, tok, sizeof mine);
    mine[11] = 3;
    expect_fallback(st, len, mine, 21, &ident, BT_KV_FB_TOKENS);
    /* a continuation of one token only has nothing the state can cover */
    expect_fallback(st, len, tok, 1, &ident, BT_KV_FB_TOKENS);
    /* llama.cpp refuses the data */
    refuse_set = true;
    expect_fallback(st, len, tok, 21, &ident, BT_KV_FB_IMPORT);
    refuse_set = false;
    /* a table without llama_state_seq_set_data */
    bt_llama_api none = api;
    none.llama_state_seq_set_data = NULL;
    size_t n_past;
    bt_kv_fallback why;
    assert_false(ll_kv_import(&none, CTX, 3, tok, 21, st, len, &ident, &n_past, &why));
    assert_int_equal(why, BT_KV_FB_UNSUPPORTED);
    free(st);
    /* the fault hook */
    st = export_n(20, true, &len, tok);
    expect_fallback(st, len, tok, 21, &ident, BT_KV_FB_CORRUPT);
    free(st);
    /* nothing to export: an empty sequence, no slot */
    assert_null(ll_kv_export(&api, CTX, 0, tok, 0, &ident, false, &len));
    assert_null(ll_kv_export(&api, CTX, -1, tok, 5, &ident, false, &len));
}

/* The identity comes from the exactness fingerprint string and nothing else numerical: states
 * cross between engines whose fingerprints are equal, never between ones that differ in any part
 * of it (here --llama-threads, which the ggml device list does not show). */
static void test_ident_is_the_fingerprint(void **state) {
    (void)state;
    static const char fp1[] = "llama-0.4.0 cpu=libggml-cpu-haswell.so threads=1 ubatch=1 fa=0 model=1185376:65f0";
    static const char fp2[] = "llama-0.4.0 cpu=libggml-cpu-haswell.so threads=2 ubatch=1 fa=0 model=1185376:65f0";
    bt_llama_config cfg = {.kv_unified = true};
    ll_kv_ident a, a2, b;
    ll_kv_ident_init(&a, &api, NULL, CTX, fp1, &cfg);
    ll_kv_ident_init(&a2, &api, NULL, CTX, fp1, &cfg);
    ll_kv_ident_init(&b, &api, NULL, CTX, fp2, &cfg);
    assert_int_equal(a.exactness, a2.exactness);
    assert_int_not_equal(a.exactness, b.exactness);
    assert_int_equal(a.flags, 1);
    llama_token tok[NPOS];
    for (int i = 0; i < 20; i++) tok[i] = mem[0][i] = 100 + i;
    nmem[0] = 20;
    tok[20] = 7;
    size_t len = 0, n_past = 0;
    uint8_t *st = ll_kv_export(&api, CTX, 0, tok, 20, &a, false, &len);
    assert_non_null(st);
    expect_fallback(st, len, tok, 21, &b, BT_KV_FB_MISMATCH);
    bt_kv_fallback why = BT_KV_FB_N_;
    nmem[1] = 0;
    assert_true(ll_kv_import(&api, CTX, 1, tok, 21, st, len, &a2, &n_past, &why));
    assert_int_equal(n_past, 20);
    free(st);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_fallbacks),
        cmocka_unit_test(test_ident_is_the_fingerprint),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

int main(void) {
    printf("skipped: built without llama.cpp's headers\n");
    return 77;
}

#endif
