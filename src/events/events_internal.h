/* events_internal.h — what events.c shares with the NATS backend (nats.c). Not a public
 * interface: events.c validates the configuration and owns the payload codec; nats.c owns the
 * bt_events object and everything that talks to a server. */
#ifndef BATON_EVENTS_INTERNAL_H
#define BATON_EVENTS_INTERNAL_H

#include "events/events.h"

/* Creates the NATS plane from a validated configuration (same contract as bt_events_create). */
bt_status bt__events_nats_create(uv_loop_t *loop, const bt_events_config *c, bt_events **out, char *err,
                                 size_t errlen);

/* Writes s[0..n) into out[cap] (cap >= 4) for a log line: printable ASCII as it is, a backslash
 * doubled, any other byte as \xNN; what does not fit is cut at a whole character and marked with a
 * trailing "..." (the text comes from the server). Returns out. */
char *bt__events_log_text(const char *s, size_t n, char *out, size_t cap);

/* The server's last words in buf[0..n), the bytes of one read from a NATS server: when they end
 * with a complete "-ERR ..." protocol line, which nats-server sends just before it closes a client
 * (-ERR 'Stale Connection', -ERR 'Authorization Violation', -ERR 'Maximum Payload Violation'),
 * its text after "-ERR " goes to out as bt__events_log_text writes it ("'Stale Connection'") and
 * the result is true; else out is "" and false. No I/O: nats.c reads its socket, the caller peeks. */
bool bt__events_parting_err(const char *buf, size_t n, char *out, size_t cap);

#endif
