/* nats_client.h — how a NATS connection of baton is made: one builder of nats.c options from the
 * event plane's configuration (implemented in nats.c, next to the event plane that uses it too).
 *
 * Every NATS connection of a process reaches the same server with the same credentials: the event
 * plane's (nats.c) and the frontend's stream journal in JetStream (frontend/journal_js.c). Both
 * build their options here, so that a server requiring an nkey, a token, a user and password or a
 * .creds file — or TLS, chosen by a tls:// URL or required by the server — admits both, with one
 * copy of the credential handling (the nkey seed is checked and signed with in memory, never
 * written to disk; docs/security.md). A caller adds what is its own (the event plane: its libuv
 * loop, its asynchronous first connect) to the options before it connects. */
#ifndef BATON_NATS_CLIENT_H
#define BATON_NATS_CLIENT_H

#include <nats/nats.h>

#include "events/events.h"

typedef struct bt_nats_client bt_nats_client;

/* Options for connections to c->nats_server under the client name c->name: connect timeout, ping
 * interval (a server silent for 2 pings is lost), unlimited reconnects c->reconnect_min_ms apart,
 * and the credential (Dynamo's order: user and password, token, nkey seed, .creds file). The
 * secrets are copied. A malformed nkey seed, when it is the credential in use, is an error here
 * (in err), so that it stops a process at start. NULL on error. */
bt_nats_client *bt_nats_client_new(const bt_events_config *c, char *err, size_t errlen);
/* The options, owned by cl: a caller may add to them before its first connect. */
natsOptions *bt_nats_client_options(bt_nats_client *cl);
/* Which credential is in use ("NATS_AUTH_NKEY", ..., "no credentials"), for the logs. */
const char *bt_nats_client_auth(const bt_nats_client *cl);
/* natsConnection_Connect with the options, blocking (never on an event loop). A handshake that
 * failed because nats.c cannot send the signature of this nonce (see sign_nonce in nats.c) is
 * retried on a new connection, up to 8 attempts. *nc is set when nats.c made a connection object
 * (always on NATS_OK). */
natsStatus bt_nats_client_connect(bt_nats_client *cl, natsConnection **nc);
/* Frees the options and the secrets: after every connection made with them is destroyed. */
void bt_nats_client_free(bt_nats_client *cl);

#endif
