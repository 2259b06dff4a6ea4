/* events_internal.h — what events.c shares with the NATS backend (nats.c). Not a public
 * interface: events.c validates the configuration and owns the payload codec; nats.c owns the
 * bt_events object and everything that talks to a server. */
#ifndef BATON_EVENTS_INTERNAL_H
#define BATON_EVENTS_INTERNAL_H

#include "events/events.h"

/* Creates the NATS plane from a validated configuration (same contract as bt_events_create). */
bt_status bt__events_nats_create(uv_loop_t *loop, const bt_events_config *c, bt_events **out, char *err,
                                 size_t errlen);

#endif
