/* llama_text.h — the text side of one llama sequence: token pieces → UTF-8 text, stop strings.
 *
 * A real tokenizer's pieces split characters (byte-fallback tokens carry one byte of a multi-byte
 * character), so text is released in two stages, both pure functions of the token stream:
 *  1. UTF-8: piece bytes are decoded as they come; a token whose bytes end inside a character is
 *     held until the character completes, and then released together with the tokens that
 *     completed it. Invalid bytes become U+FFFD, one per byte, as soon as they are known to be
 *     invalid; at the end of the stream an unfinished character is invalid.
 *  2. Stop strings: as in the mocker, tokens are held while their text could be the start of a
 *     stop string; on a match only the text before it is released.
 * Release points are always whole tokens at character boundaries, so the ids released equal the
 * text released, and a continuation that starts from the released ids (a migration) decodes the
 * rest exactly as the uninterrupted stream would. No llama.cpp dependency: unit-tested alone. */
#ifndef BATON_LLAMA_TEXT_H
#define BATON_LLAMA_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/stops.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/engine.h"

typedef struct {
    /* stage 1: tokens whose bytes do not yet end at a character boundary */
    uint32_t *u8_ids;
    size_t u8_n, u8_cap;
    bt_buf u8_raw;  /* their undecoded bytes */
    bt_buf u8_text; /* text decoded from earlier tokens of u8_ids, not yet attributed */
    /* stage 2: stop strings; win = up to max_stop-1 bytes of released text, then held text */
    bt_stops stops;
    bt_buf win;
    size_t ctx_len;
    uint32_t *held;
    size_t *held_len; /* text bytes of each held token */
    size_t held_n, held_cap;
    /* released, not yet taken by the caller */
    uint32_t *out;
    size_t out_n, out_cap;
    bt_buf out_text;
    bool stopped; /* a stop string matched: nothing more is released */
    /* min_tokens: the text of generated tokens numbered below it (carried ones counted, from 1) is
     * final at once, stop strings not looked for in it, as vLLM's; a match may still begin there
     * and end in the text of later tokens */
    uint64_t min_tokens, n_pushed;
} bt_lltext;

/* Sets up with the request's stop strings (copied; empty ones ignored). */
bt_status bt_lltext_init(bt_lltext *t, const char *const *stop, int n_stop);
void bt_lltext_free(bt_lltext *t);
/* Text already delivered (a migration's carried text): context for stop-string matching only. */
bt_status bt_lltext_context(bt_lltext *t, const char *text, size_t len);
/* Stop strings are not looked for in the text of tokens numbered below min_tokens, the first
 * token pushed being number n_carried + 1. */
void bt_lltext_min_tokens(bt_lltext *t, uint64_t min_tokens, uint64_t n_carried);
/* One generated token and its piece bytes. After it, t->stopped tells whether a stop string
 * matched (the sequence then ends with finish_reason "stop"). */
bt_status bt_lltext_push(bt_lltext *t, uint32_t id, const char *piece, size_t len);
/* End of stream (EOS, length, context limit): releases everything still held. */
bt_status bt_lltext_finish(bt_lltext *t);
/* Decodes a complete byte string as stage 1 would (invalid bytes → U+FFFD) into out. */
bt_status bt_lltext_decode_all(const char *raw, size_t len, bt_buf *out);

#endif
