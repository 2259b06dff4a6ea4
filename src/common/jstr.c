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

const json_t *bt_jstr_part_text(const json_t *part) {
    const json_t *type = json_object_get(part, "type");
    const json_t *t = NULL;
    if (!type || bt_jstr_is(type, "text")) t = json_object_get(part, "text");
    else if (bt_jstr_is(type, "refusal")) t = json_object_get(part, "refusal");
    return json_is_string(t) ? t : NULL;
}
