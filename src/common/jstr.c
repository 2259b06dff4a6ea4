/* jstr.c — checks of a jansson string that may contain U+0000 (see jstr.h). */
#include "common/jstr.h"

#include <string.h>

bool bt_jstr_has_nul(const json_t *s) {
    return json_is_string(s) && strlen(json_string_value(s)) != json_string_length(s);
}

bool bt_jstr_is(const json_t *s, const char *lit) {
    size_t n = strlen(lit);
    return json_is_string(s) && json_string_length(s) == n && memcmp(json_string_value(s), lit, n) == 0;
}
