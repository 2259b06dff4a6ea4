/* jcanon.h — jansson's canonical serialization, without jansson's dumper.
 *
 * bt_jcanon_dump(v) returns exactly the bytes of json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS): a
 * request body's canonical form, which the frontend makes once per request for the resume digest,
 * the journal record and every attempt's REQUEST (docs/benchmarks.md). jansson's dumper goes
 * through a callback per piece, a strbuffer that doubles, a key array and qsort per object, and
 * snprintf per integer; this writes into one buffer with one reserve per string. The output is the
 * same by construction where it matters: strings are escaped as jansson escapes them (\" \\ \b \f
 * \n \r \t, other control characters as \u00XX in upper-case hex, everything else, '/' and UTF-8
 * included, as it is), object members sorted by key as bytes (memcmp, then the shorter first),
 * integers as "%" JSON_INTEGER_FORMAT, and a real number is handed to json_dumps itself (there is
 * no real on the hot path, and its formatting rules are jansson's to keep). tests/unit/test_jcanon.c
 * holds it to json_dumps byte for byte, and fuzz/fuzz_jcanon.c does on fuzzed JSON.
 *
 * bt_jcanon_str appends a string escaped the same way (with its quotes), for the hand-built REQUEST
 * payload (src/proto/request.c). */
#ifndef BATON_COMMON_JCANON_H
#define BATON_COMMON_JCANON_H

#include <jansson.h>
#include <stddef.h>

#include "common/util.h"

/* The canonical dump of v (malloc'd, NUL-terminated, its length in *len), or NULL when out of
 * memory or when v holds something json_dumps refuses (then json_dumps would have returned NULL
 * too). hint: the expected size (e.g. the raw body's length), for the first allocation. */
char *bt_jcanon_dump(const json_t *v, size_t hint, size_t *len);

/* Appends "s[0..n)" (quoted, escaped as json_dumps escapes a string) to b. s must be valid UTF-8
 * (every jansson string is); the error, as always with bt_buf, is sticky in b. */
bt_status bt_jcanon_str(bt_buf *b, const char *s, size_t n);

#endif
