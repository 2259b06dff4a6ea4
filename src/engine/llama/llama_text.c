/* llama_text.c — incremental UTF-8 release and stop strings for llama sequences (llama_text.h). */
#include "engine/llama/llama_text.h"

#include <stdlib.h>
#include <string.h>

#define LT_TEXT_CAP ((size_t)1 << 30)

static const char REPLACEMENT[3] = {(char)0xEF, (char)0xBF, (char)0xBD};


bt_status bt_lltext_init(bt_lltext *t, const char *const *stop, int n_stop) {
    memset(t, 0, sizeof *t);
    bt_buf_init(&t->u8_raw, LT_TEXT_CAP);
    bt_buf_init(&t->u8_text, LT_TEXT_CAP);
    bt_buf_init(&t->win, LT_TEXT_CAP);
    bt_buf_init(&t->out_text, LT_TEXT_CAP);
    return bt_stops_init(&t->stops, stop, n_stop);
}

void bt_lltext_free(bt_lltext *t) {
    bt_stops_free(&t->stops);
    free(t->u8_ids);
    free(t->held);
    free(t->held_len);
    free(t->out);
    bt_buf_free(&t->u8_raw);
    bt_buf_free(&t->u8_text);
    bt_buf_free(&t->win);
    bt_buf_free(&t->out_text);
    memset(t, 0, sizeof *t);
}

/* Length of the valid UTF-8 character at p (1..4), 0 when the bytes are invalid, or -1 when they
 * are a valid but unfinished start (more bytes needed). Rejects overlongs, surrogates, > U+10FFFF. */
static int u8_char(const unsigned char *p, size_t avail) {
    unsigned char c = p[0];
    if (c < 0x80) return 1;
    int need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= avail) return -1;
        unsigned char b = p[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
    }
    return need;
}

/* Decodes raw[0..len) into out; returns the bytes consumed (stops before an unfinished character
 * unless `final`, where it becomes U+FFFD per byte). */
static size_t u8_decode(const char *raw, size_t len, bool final, bt_buf *out, bt_status *st) {
    size_t i = 0;
    *st = BT_OK;
    while (i < len) {
        int n = u8_char((const unsigned char *)raw + i, len - i);
        if (n < 0 && !final) break;
        if (n <= 0) {
            *st = bt_buf_append(out, REPLACEMENT, sizeof REPLACEMENT);
            i++;
        } else {
            *st = bt_buf_append(out, raw + i, (size_t)n);
            i += (size_t)n;
        }
        if (*st != BT_OK) break;
    }
    return i;
}

bt_status bt_lltext_decode_all(const char *raw, size_t len, bt_buf *out) {
    bt_status st;
    u8_decode(raw, len, true, out, &st);
    return st;
}

bt_status bt_lltext_context(bt_lltext *t, const char *text, size_t len) {
    if (!t->stops.n || t->held_n) return BT_OK;
    bt_status st = bt_buf_append(&t->win, text, len);
    if (st != BT_OK) return st;
    t->ctx_len = t->win.len;
    bt_stops_trim_ctx(&t->stops, &t->win, &t->ctx_len);
    return BT_OK;
}

static bt_status out_add(bt_lltext *t, uint32_t id, const char *text, size_t len) {
    bt_status st = bt_u32_reserve(&t->out, &t->out_cap, t->out_n + 1);
    if (st == BT_OK) st = bt_buf_append(&t->out_text, text, len);
    if (st == BT_OK) t->out[t->out_n++] = id;
    return st;
}

/* The context was looked in already, or was final before min_tokens: a match ends after it. */
static size_t stop_find(const bt_lltext *t) {
    return bt_stops_find_after(&t->stops, t->win.data, t->win.len, t->ctx_len);
}

static size_t stop_partial(const bt_lltext *t) { return bt_stops_partial(&t->stops, t->win.data, t->win.len); }

/* Stage 2: one token with its final text. */
static bt_status stop_push(bt_lltext *t, uint32_t id, const char *text, size_t len) {
    if (t->stopped) return BT_OK;
    if (t->stops.n == 0) return out_add(t, id, text, len);
    if (t->n_pushed < t->min_tokens) { /* final as it comes: context for later matches only (held_n is 0) */
        bt_status st = out_add(t, id, text, len);
        if (st == BT_OK) st = bt_buf_append(&t->win, text, len);
        if (st != BT_OK) return st;
        t->ctx_len = t->win.len;
        bt_stops_trim_ctx(&t->stops, &t->win, &t->ctx_len);
        return BT_OK;
    }
    if (t->held_n + 1 > t->held_cap) {
        size_t n = t->held_cap ? t->held_cap * 2 : 16;
        uint32_t *h = realloc(t->held, n * sizeof *h);
        if (!h) return BT_ERR_NOMEM;
        t->held = h;
        size_t *hl = realloc(t->held_len, n * sizeof *hl);
        if (!hl) return BT_ERR_NOMEM;
        t->held_len = hl;
        t->held_cap = n;
    }
    bt_status st = bt_buf_append(&t->win, text, len);
    if (st != BT_OK) return st;
    t->held[t->held_n] = id;
    t->held_len[t->held_n++] = len;

    size_t m = stop_find(t);
    size_t off = t->ctx_len;
    if (m != SIZE_MAX) {
        /* the token in which the stop string begins is released with the text before it (or the
         * one in which it ends with the text through it, when it is kept: bt_stops_cut) */
        m = bt_stops_cut(&t->stops, t->win.data, t->win.len, m);
        for (size_t i = 0; i < t->held_n && off < m; i++) {
            size_t l = t->held_len[i];
            st = out_add(t, t->held[i], t->win.data + off, off + l <= m ? l : m - off);
            if (st != BT_OK) return st;
            off += l;
        }
        t->held_n = 0;
        t->stopped = true;
        return BT_OK;
    }
    size_t boundary = t->win.len - stop_partial(t);
    size_t i = 0;
    while (i < t->held_n && off + t->held_len[i] <= boundary) {
        st = out_add(t, t->held[i], t->win.data + off, t->held_len[i]);
        if (st != BT_OK) return st;
        off += t->held_len[i];
        i++;
    }
    if (i) {
        memmove(t->held, t->held + i, (t->held_n - i) * sizeof *t->held);
        memmove(t->held_len, t->held_len + i, (t->held_n - i) * sizeof *t->held_len);
        t->held_n -= i;
        t->ctx_len = off;
        bt_stops_trim_ctx(&t->stops, &t->win, &t->ctx_len);
    }
    return BT_OK;
}

/* Stage 1 → 2: when the pending bytes end at a character boundary (or at the end, `final`), the
 * pending tokens go on; all but the last carry no text of their own (their bytes belong to the
 * character the last one completed), the last carries all the decoded text. */
static bt_status u8_flush(bt_lltext *t, bool final) {
    bt_status st;
    size_t used = u8_decode(t->u8_raw.data, t->u8_raw.len, final, &t->u8_text, &st);
    if (st != BT_OK) return st;
    bt_buf_consume(&t->u8_raw, used);
    if (t->u8_raw.len) return BT_OK; /* inside a character: wait for more bytes */
    for (size_t i = 0; i < t->u8_n; i++) {
        bool last = i + 1 == t->u8_n;
        st = stop_push(t, t->u8_ids[i], last ? t->u8_text.data : "", last ? t->u8_text.len : 0);
        if (st != BT_OK) return st;
    }
    t->u8_n = 0;
    bt_buf_reset(&t->u8_text);
    return BT_OK;
}

void bt_lltext_min_tokens(bt_lltext *t, uint64_t min_tokens, uint64_t n_carried) {
    t->min_tokens = min_tokens;
    t->n_pushed = n_carried;
}

bt_status bt_lltext_push(bt_lltext *t, uint32_t id, const char *piece, size_t len) {
    if (t->stopped) return BT_OK;
    t->n_pushed++;
    bt_status st = bt_u32_reserve(&t->u8_ids, &t->u8_cap, t->u8_n + 1);
    if (st == BT_OK) st = bt_buf_append(&t->u8_raw, piece, len);
    if (st != BT_OK) return st;
    t->u8_ids[t->u8_n++] = id;
    return u8_flush(t, false);
}

bt_status bt_lltext_finish(bt_lltext *t) {
    if (t->stopped) return BT_OK;
    bt_status st = u8_flush(t, true);
    if (st != BT_OK || t->stopped) return st;
    size_t off = t->ctx_len;
    for (size_t i = 0; i < t->held_n; i++) {
        st = out_add(t, t->held[i], t->win.data + off, t->held_len[i]);
        if (st != BT_OK) return st;
        off += t->held_len[i];
    }
    t->held_n = 0;
    return BT_OK;
}
