/* conn.h — one request-plane connection (either side) over libuv TCP.
 *
 * A connection frames and unframes (proto.h), handshakes with HELLO, keeps itself alive with
 * PING/PONG and declares the peer dead when nothing arrives for `dead_after_ms`, counted on a
 * clock that leaves out the time this process did not run, and only once the bytes waiting on
 * the socket have been read (docs/protocol.md §8); and closes it as not reading when it takes none
 * of the bytes waiting for it (acknowledged by its TCP) for as long. Outgoing frames are appended to a corked
 * buffer and written once per loop iteration (one syscall for every token frame produced in a
 * scheduler step), with uv_try_write first.
 *
 * Lifetime: the owner creates a connection with bt_rpc_dial() or receives it from a listener,
 * and ends it with bt_rpc_conn_close(). on_close is called exactly once, from the loop (never
 * from inside a bt_rpc_* call), after which the connection memory is freed. No on_frame call
 * happens after bt_rpc_conn_close() or after a fatal error. */
#ifndef BATON_RPC_CONN_H
#define BATON_RPC_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/status.h"
#include "common/util.h"
#include "proto/proto.h"

typedef struct bt_rpc_conn bt_rpc_conn;

/* Unsent bytes per connection. A peer that takes none of them for dead_after_ms is not reading
 * and is closed, however few they are; the count itself is a memory bound. Past
 * BT_RPC_BACKLOG_BUSY a frontend gives the worker no new request (it counts as busy) so that a
 * burst of large bodies waits in the HTTP layer or is refused there, and the hard cap
 * (max_out_bytes, BT_RPC_MAX_OUT_DEFAULT) stays out of reach of anything but a peer that stops
 * reading: it must exceed the busy mark by more than a few frames of the largest size. */
#define BT_RPC_BACKLOG_BUSY (8u * 1024 * 1024)
#define BT_RPC_MAX_OUT_DEFAULT (64u * 1024 * 1024)
/* A continuation (a stream already running, moved off a failed worker) may pass the busy mark,
 * since failing a stream that has tokens is worse than queueing it behind a backlog; but not this
 * one, which keeps the hard cap out of its reach too (this mark plus one frame of at most
 * BT_FRAME_DEFAULT_MAX, 16 MiB, is 48 MiB). Past it on every worker, continuations wait in the
 * frontend, holding nothing they did not hold already. */
#define BT_RPC_BACKLOG_CONTINUATION (32u * 1024 * 1024)

typedef struct {
    /* The peer's HELLO arrived: the connection is usable. */
    void (*on_open)(void *ud, bt_rpc_conn *c);
    /* A frame other than HELLO/PING/PONG. The frame's payload is valid during the call only. */
    void (*on_frame)(void *ud, bt_rpc_conn *c, const bt_frame *f);
    /* The connection ended (error, EOF, dead peer, or bt_rpc_conn_close). `why` is BT_OK for a
     * local close. The connection is freed when this returns. */
    void (*on_close)(void *ud, bt_rpc_conn *c, bt_status why, const char *reason);
    /* Optional, listeners only: a connection was accepted (before its handshake), so that the
     * owner can track and close every connection, not only those that completed HELLO. */
    void (*on_accept)(void *ud, bt_rpc_conn *c);
    /* Optional: a look ahead at the next frames before they are handed to on_frame one by one
     * (up to BT_RPC_BATCH of them, in order, all of them complete in the read buffer), so that the
     * owner can prefetch what they will touch: one read brings the frames of hundreds of streams,
     * each of whose state is cold, and loads issued together overlap where the same loads made
     * frame after frame each wait for memory. It must not change any state or act on the frames
     * (on_frame does, after it, for each of them unless the connection closes first). */
    void (*on_peek)(void *ud, bt_rpc_conn *c, const bt_frame *frames, size_t n);
    /* Optional: the unsent bytes (bt_rpc_unsent) fell below BT_RPC_BACKLOG_CONTINUATION after
     * reaching it, so that an owner holding work back for link room learns when there is some
     * rather than polling. Called from the write path (inside bt_rpc_flush too): it must not write
     * to or close the connection. */
    void (*on_drain)(void *ud, bt_rpc_conn *c);
} bt_rpc_handlers;

#define BT_RPC_BATCH 32 /* frames per on_peek: their state stays in the core's caches until used */

typedef struct {
    uint16_t role;            /* BT_ROLE_FRONTEND or BT_ROLE_WORKER */
    uint64_t instance_id;     /* sent in HELLO */
    uint32_t max_frame;       /* cap on a frame's length field */
    uint32_t ping_interval_ms;/* send PING after this long without sending anything */
    uint32_t dead_after_ms;   /* peer declared dead after this long without receiving anything
                               * (pauses of this process beyond two heartbeat ticks not counted) */
    uint32_t connect_timeout_ms;
    size_t max_out_bytes;     /* hard cap on unsent bytes (memory): past it the connection closes */
    /* Shared secret (NULL = none). A worker with a secret challenges every frontend after HELLO
     * and accepts nothing until it proves the secret (HMAC-SHA256 of a fresh nonce; the secret
     * never crosses the wire). A frontend with a secret answers such challenges. */
    const char *secret;
    /* The flags of this side's HELLO (BT_HELLO_*): what it understands or does. Default
     * BT_HELLO_KVSTATE | BT_HELLO_WAITING | BT_HELLO_UPSTREAM_BUSY | BT_HELLO_FINISH_REASONS; a worker whose engine does not report its streams' waits
     * clears BT_HELLO_WAITING. */
    uint8_t hello_flags;
} bt_rpc_config;

void bt_rpc_config_default(bt_rpc_config *c, uint16_t role, uint64_t instance_id);

/* Connects to host:port (an IP literal or a name, resolved asynchronously). Failures arrive as
 * on_close(BT_ERR_CANNOT_CONNECT). */
bt_rpc_conn *bt_rpc_dial(uv_loop_t *loop, const char *host, int port, const bt_rpc_config *cfg,
                         const bt_rpc_handlers *h, void *ud);

/* Starts closing. Safe to call more than once and from inside handlers. */
void bt_rpc_conn_close(bt_rpc_conn *c, bt_status why, const char *reason);

/* Outgoing buffer for appending frames, or NULL if the connection is closing. Frames appended
 * are flushed later in this loop iteration. */
bt_buf *bt_rpc_wbuf(bt_rpc_conn *c);
/* Flushes now instead of at the end of the iteration (e.g. before a close). */
void bt_rpc_flush(bt_rpc_conn *c);

/* Bytes written by the owner and not yet taken by the kernel (corked plus queued in libuv). */
size_t bt_rpc_unsent(const bt_rpc_conn *c);
/* The flags of the peer's HELLO (BT_HELLO_*: what it understands); 0 before the handshake. This
 * side announces its config's hello_flags. */
uint8_t bt_rpc_peer_flags(const bt_rpc_conn *c);
bool bt_rpc_is_open(const bt_rpc_conn *c);   /* handshake done and not closing */
uint64_t bt_rpc_peer_instance(const bt_rpc_conn *c);
const char *bt_rpc_peer_name(const bt_rpc_conn *c); /* "ip:port" */
/* When bytes last arrived, moved forward by later pauses of this process: bt_now_ms() minus it is
 * the silence that counts towards dead_after_ms. */
uint64_t bt_rpc_last_rx_ms(const bt_rpc_conn *c);
void bt_rpc_set_ud(bt_rpc_conn *c, void *ud);
void *bt_rpc_get_ud(const bt_rpc_conn *c);

/* Listener: accepted connections use `h` and start with ud = listener's ud. */
typedef struct bt_rpc_listener bt_rpc_listener;
bt_status bt_rpc_listen(uv_loop_t *loop, const char *host, int port, const bt_rpc_config *cfg,
                        const bt_rpc_handlers *h, void *ud, bt_rpc_listener **out, char *err, size_t errlen);
int bt_rpc_listener_port(const bt_rpc_listener *l);
/* Stops accepting and frees the listener (asynchronously). Open connections are unaffected. */
void bt_rpc_listener_close(bt_rpc_listener *l);

#endif
