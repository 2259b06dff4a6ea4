/* jstr.h — checks of a jansson string that hold up when it may contain U+0000.
 *
 * Request bodies and request-plane payloads are parsed with JSON_ALLOW_NUL (free text, a prompt or
 * a message's content, may carry U+0000 and is passed on whole), so a json_t string can hold a NUL
 * that json_string_value's C string stops at. A field read as a C string (a role, a request id, a
 * stop string) must therefore be refused when it holds one, or "user\u0000x" would be read as
 * "user"; and a field compared with a fixed value must be compared by length, for the same reason.
 * These two are the only ways the code asks either question. */
#ifndef BATON_COMMON_JSTR_H
#define BATON_COMMON_JSTR_H

#include <jansson.h>
#include <stdbool.h>

/* True if s is a JSON string holding U+0000 (its C string is shorter than its length). False for
 * anything else: NULL, another type, a string without one. */
bool bt_jstr_has_nul(const json_t *s);

/* True if s is the JSON string lit, byte for byte and of the same length: "user\u0000x" is not
 * "user". False for NULL or another type. lit is a C string (so holds no U+0000 itself). */
bool bt_jstr_is(const json_t *s, const char *lit);

/* The words a chat message's content part carries, as a JSON string: a text part's "text" (a part
 * without a type is read as one), an assistant's refusal part's "refusal"; NULL for any other part
 * (an image carries none) or one whose field is not a string. Every engine that renders parts
 * reads them through this, so that a refusal is the same prompt on each. */
const json_t *bt_jstr_part_text(const json_t *part);

#endif
