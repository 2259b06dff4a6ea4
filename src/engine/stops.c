/* stops.c — stop-string matching shared by the engines that generate text (see stops.h). */
#include "engine/stops.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

bt_status bt_stops_init(bt_stops *st, const char *const *stop, int n) {
    memset(st, 0, sizeof *st);
    for (int i = 0; i < n && st->n < BT_MAX_STOP; i++) {
        if (!stop[i] || !stop[i][0]) continue;
        size_t l = strlen(stop[i]);
        char *c = malloc(l + 1);
        if (!c) {
            bt_stops_free(st);
            return BT_ERR_NOMEM;
        }
        memcpy(c, stop[i], l + 1);
        st->s[st->n] = c;
        st->len[st->n++] = l;
        if (l > st->max) st->max = l;
    }
    return BT_OK;
}

void bt_stops_free(bt_stops *st) {
    for (int i = 0; i < st->n; i++) free(st->s[i]);
    memset(st, 0, sizeof *st);
}

size_t bt_stops_find(const bt_stops *st, const char *p, size_t n) {
    size_t best = SIZE_MAX;
    if (n == 0) return best;
    for (int i = 0; i < st->n; i++) {
        const char *m = memmem(p, n, st->s[i], st->len[i]);
        if (m && (size_t)(m - p) < best) best = (size_t)(m - p);
    }
    return best;
}

size_t bt_stops_find_after(const bt_stops *st, const char *p, size_t n, size_t from) {
    size_t best = SIZE_MAX;
    for (int i = 0; i < st->n; i++) {
        size_t at = from + 1 > st->len[i] ? from + 1 - st->len[i] : 0; /* the first start ending past from */
        if (at >= n) continue;
        const char *m = memmem(p + at, n - at, st->s[i], st->len[i]);
        if (m && (size_t)(m - p) < best) best = (size_t)(m - p);
    }
    return best;
}

size_t bt_stops_cut(const bt_stops *st, const char *p, size_t n, size_t at) {
    if (!st->keep) return at;
    for (int i = 0; i < st->n; i++)
        if (at + st->len[i] <= n && memcmp(p + at, st->s[i], st->len[i]) == 0) return at + st->len[i];
    return at;
}

size_t bt_stops_partial(const bt_stops *st, const char *p, size_t n) {
    size_t best = 0;
    for (int i = 0; i < st->n; i++) {
        size_t l = st->len[i] - 1;
        if (l > n) l = n;
        for (; l > best; l--)
            if (memcmp(p + n - l, st->s[i], l) == 0) {
                best = l;
                break;
            }
    }
    return best;
}

void bt_stops_trim_ctx(const bt_stops *st, bt_buf *win, size_t *ctx_len) {
    size_t keep = st->max ? st->max - 1 : 0;
    if (*ctx_len > keep) {
        bt_buf_consume(win, *ctx_len - keep);
        *ctx_len = keep;
    }
}
