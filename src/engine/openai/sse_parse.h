/* sse_parse.h — an incremental parser for Server-Sent Events (text/event-stream) with hard caps.
 *
 * It follows the WHATWG event-stream grammar: lines end in LF, CR or CRLF (a CRLF split across
 * two inputs is still one line end); a line starting with ':' is a comment; "field: value" with
 * one optional space after the colon; `data` lines accumulate (joined by LF), `event` names the
 * event, `id` and `retry` and unknown fields are ignored; a blank line dispatches the event if any
 * data line came; a UTF-8 byte-order mark at the very start is skipped. The parser does no I/O and
 * keeps its state between calls, so input may arrive in pieces of any size, one byte at a time
 * included. Every buffer a peer fills has a cap: a line longer than max_line or an event whose data
 * exceeds max_data fails the parser with BT_ERR_TOO_LARGE, and it stays failed. */
#ifndef BATON_SSE_PARSE_H
#define BATON_SSE_PARSE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/status.h"
#include "common/util.h"

#define BT_SSE_EVENT_NAME_MAX 64 /* longest event name accepted */

typedef struct {
    size_t max_line; /* bytes in one line, its line end excluded */
    size_t max_data; /* bytes of data in one event */
    bt_buf line;     /* the current line while it is incomplete */
    bt_buf data;     /* data of the event being built, each data line followed by LF */
    char event[BT_SSE_EVENT_NAME_MAX + 1];
    size_t event_len;
    bool have_data;  /* a data field came since the last dispatch */
    bool after_cr;   /* the last byte consumed was a CR: an LF right after it ends nothing */
    bool started;    /* the first line has been seen (the BOM check is done) */
    bool dispatched; /* the last call returned an event: its buffers are reset on the next call */
    bt_status failed;
} bt_sse_parser;

/* One dispatched event. The pointers stay valid until the next call on the parser. */
typedef struct {
    const char *event; /* "message" when the stream named none */
    size_t event_len;
    const char *data; /* the data lines joined by LF, without a final LF; not NUL-terminated */
    size_t data_len;
} bt_sse_event;

void bt_sse_init(bt_sse_parser *p, size_t max_line, size_t max_data);
/* Frees the parser's buffers; the parser may be initialised again. */
void bt_sse_free(bt_sse_parser *p);

/* Consumes input up to the end of the next event. Returns BT_OK with *ev filled and *used the
 * bytes consumed (at most len; call again with the rest), BT_ERR_AGAIN when all len bytes were
 * consumed without completing an event (*used == len), or BT_ERR_TOO_LARGE (with *err naming the
 * cap) once a cap is exceeded; a failed parser returns that status on every later call. */
bt_status bt_sse_next(bt_sse_parser *p, const char *in, size_t len, size_t *used, bt_sse_event *ev,
                      const char **err);

/* The input has ended: a last line without a line end, and a last event without its blank line,
 * are taken as complete (lenient towards servers that close right after the final data line).
 * Returns BT_OK with *ev when that completes an event, BT_ERR_AGAIN otherwise. */
bt_status bt_sse_end(bt_sse_parser *p, bt_sse_event *ev, const char **err);

#endif
