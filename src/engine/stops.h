/* stops.h — stop strings as every engine that generates text itself matches them (the mocker, the
 * llama engine): a set of non-empty strings, the earliest match in a window of text, the longest
 * tail of the window that could still become a match (held back until it is decided), and the
 * trimming of the window's already-final head to the bytes a match could still start in. */
#ifndef BATON_ENGINE_STOPS_H
#define BATON_ENGINE_STOPS_H

#include <stddef.h>

#include "common/status.h"
#include "common/util.h"
#include "engine/engine.h"

typedef struct {
    int n;
    char *s[BT_MAX_STOP];
    size_t len[BT_MAX_STOP];
    size_t max; /* the longest, 0 when none */
    bool keep;  /* vLLM's include_stop_str_in_output: the text ends after the stop string, not before */
} bt_stops;

/* Copies the non-empty strings of stop[0..n) (at most BT_MAX_STOP; an empty stop string matches
 * nothing). BT_ERR_NOMEM leaves st empty. */
bt_status bt_stops_init(bt_stops *st, const char *const *stop, int n);
void bt_stops_free(bt_stops *st);
/* The start of the earliest match of any stop string in p[0..n), or SIZE_MAX. */
size_t bt_stops_find(const bt_stops *st, const char *p, size_t n);
/* As bt_stops_find, among the matches that end after p[from]: those of text a stop string was not
 * yet looked for in (text before min_tokens is final without being matched, llama_text.h). */
size_t bt_stops_find_after(const bt_stops *st, const char *p, size_t n, size_t from);
/* Where the text ends for a match that starts at p[at] (bt_stops_find): at, or with keep the end
 * of the stop string matched there (the first of the set, as bt_stops_find takes it). */
size_t bt_stops_cut(const bt_stops *st, const char *p, size_t n, size_t at);
/* The length of the longest suffix of p[0..n) that is a proper prefix of some stop string. */
size_t bt_stops_partial(const bt_stops *st, const char *p, size_t n);
/* win starts with *ctx_len bytes of final text (delivered or carried): keeps only the last
 * max - 1 of them, the most a match that ends in later text can start in. */
void bt_stops_trim_ctx(const bt_stops *st, bt_buf *win, size_t *ctx_len);

#endif
