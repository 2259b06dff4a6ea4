/* sse_parse.c — see sse_parse.h. Hand-written because none of the packaged C libraries parses
 * event streams incrementally with caps and without owning the I/O. A line that lies wholly in
 * the caller's input is processed in place; only a line split across inputs is copied. */
#include "engine/openai/sse_parse.h"

#include <string.h>

void bt_sse_init(bt_sse_parser *p, size_t max_line, size_t max_data) {
    memset(p, 0, sizeof *p);
    p->max_line = max_line;
    p->max_data = max_data;
    /* +1: the line buffer holds at most max_line bytes; the data buffer adds one LF per line */
    bt_buf_init(&p->line, max_line);
    bt_buf_init(&p->data, max_data + 1);
}

void bt_sse_free(bt_sse_parser *p) {
    bt_buf_free(&p->line);
    bt_buf_free(&p->data);
}

static bt_status fail(bt_sse_parser *p, bt_status st, const char *why, const char **err) {
    p->failed = st;
    if (err) *err = why;
    return st;
}

static void reset_event(bt_sse_parser *p) {
    bt_buf_reset(&p->data);
    p->event_len = 0;
    p->have_data = false;
}

/* Fills *ev from the event being built. */
static void make_event(bt_sse_parser *p, bt_sse_event *ev) {
    if (p->event_len) {
        ev->event = p->event;
        ev->event_len = p->event_len;
    } else {
        ev->event = "message";
        ev->event_len = 7;
    }
    ev->data = p->data.data ? p->data.data : "";
    ev->data_len = p->data.len ? p->data.len - 1 : 0; /* the last data line's LF is not part of it */
    p->dispatched = true;
}

/* Processes one complete line. Returns BT_OK, BT_ERR_AGAIN (nothing to dispatch) or a failure;
 * *dispatch is set when the line was blank and an event is ready. */
static bt_status process_line(bt_sse_parser *p, const char *s, size_t n, bool *dispatch, const char **err) {
    *dispatch = false;
    if (!p->started) {
        p->started = true;
        if (n >= 3 && (unsigned char)s[0] == 0xEF && (unsigned char)s[1] == 0xBB && (unsigned char)s[2] == 0xBF) {
            s += 3;
            n -= 3;
        }
    }
    if (n == 0) {
        if (p->have_data) *dispatch = true;
        else reset_event(p); /* an event without data is dropped, its name with it */
        return BT_OK;
    }
    if (s[0] == ':') return BT_OK; /* comment (servers use them as keep-alives) */
    const char *colon = memchr(s, ':', n);
    size_t flen = colon ? (size_t)(colon - s) : n;
    const char *v = colon ? colon + 1 : s + n;
    size_t vlen = colon ? n - flen - 1 : 0;
    if (vlen && v[0] == ' ') {
        v++;
        vlen--;
    }
    if (flen == 4 && memcmp(s, "data", 4) == 0) {
        if (p->data.len + vlen + 1 > p->max_data + 1)
            return fail(p, BT_ERR_TOO_LARGE, "event data exceeds the parser's cap", err);
        if (bt_buf_append(&p->data, v, vlen) != BT_OK || bt_buf_append(&p->data, "\n", 1) != BT_OK)
            return fail(p, BT_ERR_NOMEM, "out of memory", err);
        p->have_data = true;
    } else if (flen == 5 && memcmp(s, "event", 5) == 0) {
        if (vlen > BT_SSE_EVENT_NAME_MAX) return fail(p, BT_ERR_TOO_LARGE, "event name too long", err);
        memcpy(p->event, v, vlen);
        p->event[vlen] = '\0';
        p->event_len = vlen;
    }
    /* id, retry and unknown fields carry nothing this parser's users need */
    return BT_OK;
}

/* Every call begins here: a failed parser stays failed; the event handed out last is dropped. */
static bt_status resume(bt_sse_parser *p, const char **err) {
    if (p->failed) {
        if (err) *err = "the event stream failed earlier";
        return p->failed;
    }
    if (p->dispatched) {
        p->dispatched = false;
        reset_event(p);
    }
    return BT_OK;
}

bt_status bt_sse_next(bt_sse_parser *p, const char *in, size_t len, size_t *used, bt_sse_event *ev,
                      const char **err) {
    *used = 0;
    bt_status st = resume(p, err);
    if (st != BT_OK) return st;
    size_t i = 0;
    while (i < len) {
        if (p->after_cr) {
            p->after_cr = false;
            if (in[i] == '\n') { /* the LF of a CRLF */
                i++;
                continue;
            }
        }
        /* find the end of the current line in what is left */
        size_t j = i;
        while (j < len && in[j] != '\n' && in[j] != '\r') j++;
        if (j == len) { /* no line end yet: keep the piece */
            if (p->line.len + (j - i) > p->max_line)
                return fail(p, BT_ERR_TOO_LARGE, "line exceeds the parser's cap", err);
            if (bt_buf_append(&p->line, in + i, j - i) != BT_OK) return fail(p, BT_ERR_NOMEM, "out of memory", err);
            *used = len;
            return BT_ERR_AGAIN;
        }
        const char *s = in + i;
        size_t n = j - i;
        if (p->line.len) { /* the line began in an earlier input */
            if (p->line.len + n > p->max_line) return fail(p, BT_ERR_TOO_LARGE, "line exceeds the parser's cap", err);
            if (bt_buf_append(&p->line, s, n) != BT_OK) return fail(p, BT_ERR_NOMEM, "out of memory", err);
            s = p->line.data;
            n = p->line.len;
        } else if (n > p->max_line) {
            return fail(p, BT_ERR_TOO_LARGE, "line exceeds the parser's cap", err);
        }
        if (in[j] == '\r') p->after_cr = true;
        i = j + 1;
        bool dispatch;
        bt_status st = process_line(p, s, n, &dispatch, err);
        bt_buf_reset(&p->line);
        if (st != BT_OK) return st;
        if (dispatch) {
            make_event(p, ev);
            *used = i;
            return BT_OK;
        }
    }
    *used = len;
    return BT_ERR_AGAIN;
}

bt_status bt_sse_end(bt_sse_parser *p, bt_sse_event *ev, const char **err) {
    bt_status st = resume(p, err);
    if (st != BT_OK) return st;
    p->after_cr = false;
    if (p->line.len) {
        bool dispatch;
        bt_status st = process_line(p, p->line.data, p->line.len, &dispatch, err);
        bt_buf_reset(&p->line);
        if (st != BT_OK) return st;
    }
    if (!p->have_data) return BT_ERR_AGAIN;
    make_event(p, ev);
    return BT_OK;
}
