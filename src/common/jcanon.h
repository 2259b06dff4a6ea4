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
 * bt_jcanon_dump_values(v) is the same form with numbers written by value, for comparing two
 * bodies as the server reads them (the resume digest, resume.c): an integral real within ±2^53 is
 * written as the integer it equals, so 1, 1.0, 1e0 and 10E-1 all become 1 and -0.0 becomes 0.
 * Every other number is written as bt_jcanon_dump writes it: an integer exactly (all 64 bits, so
 * two seeds beyond 2^53 that differ in their last digit stay different), and a real as jansson
 * writes the double it was read as (0.1 and 1e-1, one double, are one text; "%.17g" tells any two
 * doubles apart). Beyond ±2^53 a real is never written as an integer: doubles there skip
 * integers, and 9007199254740993.0 has already been read as ...992, so equating it with an
 * integer would take a different number for the same.
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

/* The same with numbers by value (above): equal for two values that differ only in how their
 * numbers are spelled. Not json_dumps' bytes wherever v holds an integral real. */
char *bt_jcanon_dump_values(const json_t *v, size_t hint, size_t *len);

/* Appends "s[0..n)" (quoted, escaped as json_dumps escapes a string) to b. s must be valid UTF-8
 * (every jansson string is); the error, as always with bt_buf, is sticky in b. */
bt_status bt_jcanon_str(bt_buf *b, const char *s, size_t n);

#endif
