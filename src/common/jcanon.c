/* jcanon.c — jansson's canonical serialization, without jansson's dumper (see jcanon.h). */
#include "common/jcanon.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define KEYS_ON_STACK 32 /* members of an object sorted without an allocation */

typedef struct {
    const char *key;
    size_t len;
    json_t *value;
} member;

/* jansson's order of keys: as bytes, then the shorter first (its compare_keys). */
static int member_cmp(const void *a, const void *b) {
    const member *x = a, *y = b;
    int c = memcmp(x->key, y->key, x->len < y->len ? x->len : y->len);
    if (c) return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

bt_status bt_jcanon_str(bt_buf *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t extra = 0; /* first the exact size, so that the bytes go in place after one reserve */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') extra += 1;
        else if (c < 0x20) extra += 5;
    }
    bt_status st = bt_buf_reserve(b, n + extra + 2);
    if (st != BT_OK) return st;
    static const char hex[] = "0123456789ABCDEF"; /* jansson writes "\\u%04X" */
    char *o = b->data + b->len;
    *o++ = '"';
    if (!extra) {
        memcpy(o, s, n);
        o += n;
    } else {
        for (size_t i = 0; i < n; i++) {
            unsigned char c = p[i];
            if (c >= 0x20 && c != '"' && c != '\\') {
                *o++ = (char)c;
                continue;
            }
            *o++ = '\\';
            switch (c) {
            case '"': *o++ = '"'; break;
            case '\\': *o++ = '\\'; break;
            case '\b': *o++ = 'b'; break;
            case '\f': *o++ = 'f'; break;
            case '\n': *o++ = 'n'; break;
            case '\r': *o++ = 'r'; break;
            case '\t': *o++ = 't'; break;
            default:
                memcpy(o, "u00", 3);
                o[3] = hex[c >> 4];
                o[4] = hex[c & 15];
                o += 5;
            }
        }
    }
    *o++ = '"';
    b->len = (size_t)(o - b->data);
    b->data[b->len] = '\0';
    return BT_OK;
}

static void dump(bt_buf *b, const json_t *v, bool by_value);

static void dump_object(bt_buf *b, const json_t *v, bool by_value) {
    size_t n = json_object_size(v);
    member stack[KEYS_ON_STACK];
    member *m = n <= KEYS_ON_STACK ? stack : malloc(n * sizeof *m);
    if (!m) {
        bt_buf_fail(b, BT_ERR_NOMEM);
        return;
    }
    size_t k = 0;
    const char *key;
    size_t key_len;
    json_t *value;
    json_object_keylen_foreach((json_t *)v, key, key_len, value) {
        if (k == n) break; /* cannot happen: the size is the number of members */
        m[k++] = (member){key, key_len, value};
    }
    if (k <= KEYS_ON_STACK) { /* insertion sort: the usual few members, no call per comparison */
        for (size_t i = 1; i < k; i++) {
            member x = m[i];
            size_t j = i;
            while (j > 0 && member_cmp(&m[j - 1], &x) > 0) {
                m[j] = m[j - 1];
                j--;
            }
            m[j] = x;
        }
    } else {
        qsort(m, k, sizeof *m, member_cmp);
    }
    bt_buf_append(b, "{", 1);
    for (size_t i = 0; i < k; i++) {
        if (i) bt_buf_append(b, ",", 1);
        bt_jcanon_str(b, m[i].key, m[i].len);
        bt_buf_append(b, ":", 1);
        dump(b, m[i].value, by_value);
    }
    bt_buf_append(b, "}", 1);
    if (m != stack) free(m);
}

/* Within ±2^53 every integer is a double and every integral double is an exact integer: there a
 * real and an integer are the same number exactly when their values are equal. Beyond it a real
 * has already lost digits to rounding (9007199254740993.0 reads as ...992), so it is never taken
 * for an integer, which is exact there. */
#define EXACT_INTEGRAL 9007199254740992.0

static void dump(bt_buf *b, const json_t *v, bool by_value) {
    if (bt_buf_status(b) != BT_OK) return;
    switch (json_typeof(v)) {
    case JSON_OBJECT: dump_object(b, v, by_value); return;
    case JSON_ARRAY: {
        bt_buf_append(b, "[", 1);
        size_t n = json_array_size(v);
        for (size_t i = 0; i < n; i++) {
            if (i) bt_buf_append(b, ",", 1);
            dump(b, json_array_get(v, i), by_value);
        }
        bt_buf_append(b, "]", 1);
        return;
    }
    case JSON_STRING: bt_jcanon_str(b, json_string_value(v), json_string_length(v)); return;
    case JSON_INTEGER: bt_buf_append_i64(b, (int64_t)json_integer_value(v)); return;
    case JSON_REAL: {
        double d = json_real_value(v);
        if (by_value && d == trunc(d) && fabs(d) <= EXACT_INTEGRAL) { /* 1.0, 1e0, 10E-1, -0.0 */
            bt_buf_append_i64(b, (int64_t)d);
            return;
        }
        /* jansson's own formatting ("%.17g", its locale and exponent fix-ups): not on the hot path */
        char *s = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
        if (!s) {
            bt_buf_fail(b, BT_ERR_INVALID); /* json_dumps refuses a non-finite real */
            return;
        }
        bt_buf_append_str(b, s);
        free(s);
        return;
    }
    case JSON_TRUE: bt_buf_append(b, "true", 4); return;
    case JSON_FALSE: bt_buf_append(b, "false", 5); return;
    case JSON_NULL: bt_buf_append(b, "null", 4); return;
    }
}

static char *dump_root(const json_t *v, size_t hint, size_t *len, bool by_value) {
    if (!json_is_object(v) && !json_is_array(v)) return NULL; /* json_dumps needs JSON_ENCODE_ANY */
    bt_buf b;
    bt_buf_init(&b, (size_t)1 << 30);
    if (hint) bt_buf_reserve(&b, hint);
    dump(&b, v, by_value);
    if (bt_buf_status(&b) != BT_OK) {
        bt_buf_free(&b);
        return NULL;
    }
    return bt_buf_steal(&b, len);
}

char *bt_jcanon_dump(const json_t *v, size_t hint, size_t *len) { return dump_root(v, hint, len, false); }

char *bt_jcanon_dump_values(const json_t *v, size_t hint, size_t *len) { return dump_root(v, hint, len, true); }
