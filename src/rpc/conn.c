/* conn.c — request-plane connections: framing, corked writes, handshake, heartbeats. See conn.h. */
#include "rpc/conn.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "common/closer.h"
#include "common/log.h"

#define READ_CHUNK (64u * 1024)

/* CONN_AUTH: the worker got the frontend's HELLO and waits for the answer to its challenge. */
typedef enum { CONN_CONNECTING, CONN_HANDSHAKE, CONN_AUTH, CONN_OPEN, CONN_CLOSING } conn_state;

struct bt_rpc_conn {
    uv_loop_t *loop;
    uv_tcp_t tcp;
    uv_timer_t timer; /* connect timeout, then heartbeat */
    uv_idle_t flusher;
    uv_connect_t connect_req;
    uv_getaddrinfo_t gai;
    int port;
    bt_closer closer; /* the handles and a getaddrinfo in flight, once closing */
    conn_state state;
    bool flush_scheduled;
    bool tcp_inited;
    bool resolving; /* a getaddrinfo request references this connection */
    bt_rpc_config cfg;
    bt_rpc_handlers h;
    void *ud;
    bt_buf rbuf;
    bt_buf wbuf;
    size_t queued; /* bytes handed to uv_write and not yet written */
    bool backlogged; /* unsent reached BT_RPC_BACKLOG_CONTINUATION: on_drain when it falls below */
    /* Whether the peer takes what is written: of the bytes written to the socket or handed to
     * uv_write (handed), those the peer's TCP has acknowledged at the last heartbeat (out_progress),
     * and since when that count has not grown while bytes waited (heartbeat clock, as last_rx_ms). */
    uint64_t handed, taken_seen;
    uint64_t out_stuck_ms;
    /* last_rx_ms and session_ms are on the heartbeat clock: wall time minus the pauses of this
     * process that on_heartbeat found (they move forward by each pause). */
    uint64_t last_rx_ms, last_tx_ms;
    uint64_t session_ms;                 /* when the TCP session started */
    uint64_t last_tick_ms;               /* when on_heartbeat last ran */
    uint32_t tick_ms;                    /* the heartbeat period */
    bool verdict_deferred;               /* a dead verdict waited for waiting bytes to be read */
    uint8_t nonce[BT_AUTH_LEN];          /* our challenge (worker with a secret) */
    bool challenged;
    uint64_t peer_instance;
    uint8_t peer_flags; /* its HELLO's flags (BT_HELLO_*) */
    bt_status close_why;
    char close_reason[160];
    char peer[64];
};

typedef struct {
    uv_write_t req;
    char *data;
    size_t len;
    bt_rpc_conn *c;
} write_req;

struct bt_rpc_listener {
    uv_tcp_t tcp;
    uv_loop_t *loop;
    bt_rpc_config cfg;
    bt_rpc_handlers h;
    void *ud;
    int port;
};

void bt_rpc_config_default(bt_rpc_config *c, uint16_t role, uint64_t instance_id) {
    memset(c, 0, sizeof *c);
    c->role = role;
    c->instance_id = instance_id;
    c->max_frame = BT_FRAME_DEFAULT_MAX;
    c->ping_interval_ms = 500;
    c->dead_after_ms = 2000;
    c->connect_timeout_ms = 3000;
    c->max_out_bytes = BT_RPC_MAX_OUT_DEFAULT;
    c->hello_flags = BT_HELLO_KVSTATE | BT_HELLO_WAITING | BT_HELLO_UPSTREAM_BUSY | BT_HELLO_FINISH_REASONS;
}

static void conn_fail(bt_rpc_conn *c, bt_status why, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The closer's done: every handle has closed and no request references the connection. */
static void conn_free(void *ud) {
    bt_rpc_conn *c = ud;
    if (c->h.on_close) c->h.on_close(c->ud, c, c->close_why, c->close_reason);
    bt_buf_free(&c->rbuf);
    bt_buf_free(&c->wbuf);
    free(c);
}

void bt_rpc_conn_close(bt_rpc_conn *c, bt_status why, const char *reason) {
    if (!c || c->state == CONN_CLOSING) return;
    bool was_connecting = c->state == CONN_CONNECTING;
    c->state = CONN_CLOSING;
    c->close_why = why;
    snprintf(c->close_reason, sizeof c->close_reason, "%s", reason ? reason : "closed");
    if (!was_connecting && c->tcp_inited && c->wbuf.len > 0 && c->queued == 0) {
        /* best effort: push out what is corked (e.g. ERROR frames) before closing */
        uv_buf_t b = uv_buf_init(c->wbuf.data, (unsigned)c->wbuf.len);
        (void)uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    }
    bt_closer_init(&c->closer, conn_free, c);
    if (c->resolving) { /* on_resolved releases it */
        bt_closer_hold(&c->closer);
        uv_cancel((uv_req_t *)&c->gai);
    }
    bt_closer_close(&c->closer, (uv_handle_t *)&c->timer);
    bt_closer_close(&c->closer, (uv_handle_t *)&c->flusher);
    if (c->tcp_inited) bt_closer_close(&c->closer, (uv_handle_t *)&c->tcp);
    bt_closer_seal(&c->closer);
}

static void conn_fail(bt_rpc_conn *c, bt_status why, const char *fmt, ...) {
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    bt_rpc_conn_close(c, why, msg);
}

/* Unsent bytes only grow by the owner's appends, all of which pass through bt_rpc_flush, whose
 * entry marks the backlog; they fall in on_write and in bt_rpc_flush's uv_try_write, which call
 * this. */
static void drain_check(bt_rpc_conn *c) {
    if (!c->backlogged || bt_rpc_unsent(c) >= BT_RPC_BACKLOG_CONTINUATION || c->state == CONN_CLOSING) return;
    c->backlogged = false;
    if (c->h.on_drain) c->h.on_drain(c->ud, c);
}

static void on_write(uv_write_t *req, int status) {
    write_req *w = (write_req *)req;
    bt_rpc_conn *c = w->c;
    c->queued -= w->len;
    free(w->data);
    free(w);
    if (status < 0 && status != UV_ECANCELED)
        conn_fail(c, BT_ERR_DISCONNECTED, "write to %s failed: %s", c->peer, uv_strerror(status));
    else drain_check(c);
}

void bt_rpc_flush(bt_rpc_conn *c) {
    c->flush_scheduled = false;
    uv_idle_stop(&c->flusher);
    if (c->state == CONN_CLOSING || c->state == CONN_CONNECTING || c->wbuf.len == 0) return;
    if (bt_rpc_unsent(c) >= BT_RPC_BACKLOG_CONTINUATION) c->backlogged = true;
    size_t off = 0;
    if (c->queued == 0) {
        uv_buf_t b = uv_buf_init(c->wbuf.data, (unsigned)c->wbuf.len);
        int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (n > 0) off = (size_t)n;
        else if (n < 0 && n != UV_EAGAIN) {
            conn_fail(c, BT_ERR_DISCONNECTED, "write to %s failed: %s", c->peer, uv_strerror(n));
            return;
        }
    }
    c->handed += off;
    c->last_tx_ms = bt_now_ms();
    if (off == c->wbuf.len) {
        c->wbuf.len = 0;
        drain_check(c);
        return;
    }
    /* hand the unwritten rest to libuv; the request owns its copy */
    write_req *w = malloc(sizeof *w);
    size_t len;
    char *data;
    if (off == 0) {
        data = bt_buf_steal(&c->wbuf, &len);
    } else {
        len = c->wbuf.len - off;
        data = malloc(len);
        if (data) memcpy(data, c->wbuf.data + off, len);
        c->wbuf.len = 0;
    }
    if (!w || !data) {
        free(w);
        free(data);
        conn_fail(c, BT_ERR_NOMEM, "out of memory writing to %s", c->peer);
        return;
    }
    w->data = data;
    w->len = len;
    w->c = c;
    if (c->queued == 0) c->out_stuck_ms = c->last_tick_ms; /* waiting starts now, not at the last write */
    c->queued += len;
    c->handed += len;
    uv_buf_t b = uv_buf_init(data, (unsigned)len);
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        c->queued -= len;
        c->handed -= len;
        free(data);
        free(w);
        conn_fail(c, BT_ERR_DISCONNECTED, "write to %s failed: %s", c->peer, uv_strerror(rc));
        return;
    }
    /* The memory bound, not the liveness check (that is on_heartbeat's: no byte taken for
     * dead_after_ms). Owners keep below it by backpressure: bt_rpc_unsent() past
     * BT_RPC_BACKLOG_BUSY makes a frontend route new requests elsewhere. */
    if (c->queued > c->cfg.max_out_bytes)
        conn_fail(c, BT_ERR_TOO_LARGE, "%zu bytes unsent to %s: past the cap of %zu", c->queued, c->peer,
                  c->cfg.max_out_bytes);
    else drain_check(c); /* uv_try_write may have taken enough */
}

static void on_flush_idle(uv_idle_t *h) { bt_rpc_flush(h->data); }

size_t bt_rpc_unsent(const bt_rpc_conn *c) { return c->queued + c->wbuf.len; }

uint8_t bt_rpc_peer_flags(const bt_rpc_conn *c) { return c->peer_flags; }

bt_buf *bt_rpc_wbuf(bt_rpc_conn *c) {
    if (c->state == CONN_CLOSING) return NULL;
    if (!c->flush_scheduled) {
        c->flush_scheduled = true;
        uv_idle_start(&c->flusher, on_flush_idle);
    }
    return &c->wbuf;
}

/* HMAC-SHA256(secret, "baton-rpc-auth-v1" || nonce || worker instance id, big-endian). */
static void auth_mac(const char *secret, const uint8_t nonce[BT_AUTH_LEN], uint64_t instance,
                     uint8_t out[BT_AUTH_LEN]) {
    uint8_t msg[17 + BT_AUTH_LEN + 8];
    memcpy(msg, "baton-rpc-auth-v1", 17);
    memcpy(msg + 17, nonce, BT_AUTH_LEN);
    for (int i = 0; i < 8; i++) msg[17 + BT_AUTH_LEN + i] = (uint8_t)(instance >> (56 - 8 * i));
    unsigned int len = BT_AUTH_LEN;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), msg, sizeof msg, out, &len);
}

static void conn_opened(bt_rpc_conn *c) {
    c->state = CONN_OPEN;
    if (c->h.on_open) c->h.on_open(c->ud, c);
}

static void handle_auth(bt_rpc_conn *c, const bt_frame *f) {
    uint8_t kind;
    const uint8_t *bytes;
    if (bt_frame_get_auth(f, &kind, &bytes) != BT_OK) {
        conn_fail(c, BT_ERR_PROTOCOL, "malformed AUTH from %s", c->peer);
        return;
    }
    if (kind == BT_AUTH_CHALLENGE) { /* we are the frontend */
        if (c->cfg.role != BT_ROLE_FRONTEND) {
            conn_fail(c, BT_ERR_PROTOCOL, "unexpected AUTH challenge from %s", c->peer);
            return;
        }
        if (!c->cfg.secret || !*c->cfg.secret) {
            conn_fail(c, BT_ERR_UNAUTHORIZED, "worker %s requires a shared secret (--rpc-secret-file)", c->peer);
            return;
        }
        uint8_t mac[BT_AUTH_LEN];
        auth_mac(c->cfg.secret, bytes, c->peer_instance, mac);
        bt_buf *w = bt_rpc_wbuf(c);
        if (w) bt_frame_put_auth(w, BT_AUTH_RESPONSE, mac);
        return;
    }
    /* a response: we are the worker that challenged */
    if (!c->challenged || c->state != CONN_AUTH) {
        conn_fail(c, BT_ERR_PROTOCOL, "unexpected AUTH response from %s", c->peer);
        return;
    }
    uint8_t want[BT_AUTH_LEN];
    auth_mac(c->cfg.secret, c->nonce, c->cfg.instance_id, want);
    if (CRYPTO_memcmp(want, bytes, BT_AUTH_LEN) != 0) {
        BT_WARN("frontend %s failed authentication; closing", c->peer);
        bt_buf *w = bt_rpc_wbuf(c);
        if (w) bt_frame_put_error(w, 0, BT_ERR_UNAUTHORIZED, "authentication failed");
        conn_fail(c, BT_ERR_UNAUTHORIZED, "frontend %s failed authentication", c->peer);
        return;
    }
    c->challenged = false;
    conn_opened(c);
}

static void handle_frame(bt_rpc_conn *c, const bt_frame *f) {
    if (c->state == CONN_HANDSHAKE) {
        uint16_t ver, role;
        uint64_t inst;
        if (f->type != BT_FRAME_HELLO || bt_frame_get_hello(f, &ver, &role, &inst) != BT_OK) {
            conn_fail(c, BT_ERR_PROTOCOL, "peer %s did not start with HELLO (got %s)", c->peer,
                      bt_frame_type_name(f->type));
            return;
        }
        if (ver != BT_PROTO_VERSION) {
            bt_buf *w = bt_rpc_wbuf(c);
            if (w) bt_frame_put_error(w, 0, BT_ERR_PROTOCOL, "unsupported protocol version");
            conn_fail(c, BT_ERR_PROTOCOL, "peer %s speaks protocol version %u, this is %u", c->peer, ver,
                      BT_PROTO_VERSION);
            return;
        }
        /* only the opposite role: a frontend talks to workers and a worker to frontends, and a
         * role this version does not know is no peer at all */
        uint16_t want = c->cfg.role == BT_ROLE_FRONTEND ? BT_ROLE_WORKER : BT_ROLE_FRONTEND;
        if (role != want) {
            BT_WARN("peer %s announced role %u in its HELLO, expected %u (%s); closing the connection", c->peer,
                    role, want, want == BT_ROLE_WORKER ? "worker" : "frontend");
            conn_fail(c, BT_ERR_PROTOCOL, "peer %s announced role %u in its HELLO; expected %u", c->peer, role, want);
            return;
        }
        c->peer_instance = inst;
        c->peer_flags = f->flags;
        if (c->challenged) c->state = CONN_AUTH;
        else conn_opened(c);
        return;
    }
    if (f->type == BT_FRAME_AUTH) {
        handle_auth(c, f);
        return;
    }
    if (c->state == CONN_AUTH && f->type != BT_FRAME_PING && f->type != BT_FRAME_PONG) {
        bt_buf *w = bt_rpc_wbuf(c);
        if (w) bt_frame_put_error(w, 0, BT_ERR_UNAUTHORIZED, "authenticate first");
        conn_fail(c, BT_ERR_UNAUTHORIZED, "unauthenticated frontend %s sent %s", c->peer,
                  bt_frame_type_name(f->type));
        return;
    }
    switch (f->type) {
    case BT_FRAME_PING: {
        uint64_t v;
        bt_buf *w;
        if (bt_frame_get_ping(f, &v) == BT_OK && (w = bt_rpc_wbuf(c))) bt_frame_put_ping(w, BT_FRAME_PONG, v);
        return;
    }
    case BT_FRAME_PONG:
        return;
    case BT_FRAME_HELLO:
        conn_fail(c, BT_ERR_PROTOCOL, "peer %s sent a second HELLO", c->peer);
        return;
    default:
        if (c->h.on_frame) c->h.on_frame(c->ud, c, f);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    bt_rpc_conn *c = h->data;
    if (bt_buf_reserve(&c->rbuf, READ_CHUNK) != BT_OK) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    buf->base = c->rbuf.data + c->rbuf.len;
    buf->len = c->rbuf.alloc - c->rbuf.len - 1;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    (void)buf;
    bt_rpc_conn *c = s->data;
    if (nread == UV_ENOBUFS) {
        conn_fail(c, BT_ERR_TOO_LARGE, "read buffer from %s exceeded its cap", c->peer);
        return;
    }
    if (nread < 0) {
        if (nread == UV_EOF) conn_fail(c, BT_ERR_DISCONNECTED, "%s closed the connection", c->peer);
        else conn_fail(c, BT_ERR_DISCONNECTED, "read from %s failed: %s", c->peer, uv_strerror((int)nread));
        return;
    }
    if (nread == 0) return;
    c->rbuf.len += (size_t)nread;
    c->last_rx_ms = bt_now_ms();
    c->verdict_deferred = false;
    /* Frames are parsed BT_RPC_BATCH at a time: the batch is shown to on_peek, then each frame is
     * handled in order, exactly as one at a time (a frame is handled only while the connection is
     * not closing; a malformed frame fails the connection once the frames before it are handled).
     * The batch points into rbuf, which is stable meanwhile: only on_alloc grows it, only conn_free
     * (from the loop, after on_close) frees it. */
    size_t off = 0;
    while (c->state != CONN_CLOSING) {
        bt_frame fr[BT_RPC_BATCH];
        size_t end[BT_RPC_BATCH];
        size_t n = 0, pos = off, used = 0;
        const char *why = NULL;
        bt_status st = BT_OK;
        while (n < BT_RPC_BATCH) {
            st = bt_frame_parse((const uint8_t *)c->rbuf.data + pos, c->rbuf.len - pos, c->cfg.max_frame, &fr[n], &used,
                                &why);
            if (st != BT_OK) break;
            pos += used;
            end[n++] = pos;
        }
        if (n > 1 && c->h.on_peek) c->h.on_peek(c->ud, c, fr, n);
        for (size_t i = 0; i < n && c->state != CONN_CLOSING; i++) {
            off = end[i];
            handle_frame(c, &fr[i]);
        }
        if (c->state == CONN_CLOSING || n == BT_RPC_BATCH) continue;
        if (st == BT_ERR_AGAIN) break;
        BT_WARN("malformed frame from %s: %s; closing the connection", c->peer, why ? why : bt_status_msg(st));
        conn_fail(c, st, "malformed frame from %s: %s", c->peer, why ? why : bt_status_msg(st));
        return;
    }
    if (c->state != CONN_CLOSING) bt_buf_consume(&c->rbuf, off);
}

/* Bytes the kernel holds for us on the socket, not yet read (0 when unknown). */
static size_t bytes_waiting(bt_rpc_conn *c) {
    uv_os_fd_t fd;
    int n = 0;
    if (!c->tcp_inited || uv_fileno((const uv_handle_t *)&c->tcp, &fd) != 0) return 0;
    if (ioctl(fd, FIONREAD, &n) != 0 || n < 0) return 0;
    return (size_t)n;
}

/* The heartbeat clock counts only time this process ran. Ticks come every tick_ms; a tick that
 * comes more than two periods after the previous one means the process did not run in between
 * (SIGSTOP, a paused VM, swapping, CPU starvation, a blocked loop), so it could read nothing: the
 * time beyond two periods is not the peer's silence, and the silence and handshake clocks move
 * forward by it. Every tick still counts at least one period (a repeating timer never comes
 * sooner), so a peer that really is silent is declared dead after at most dead_after / tick + 1
 * ticks however slow the loop is. */
static void heartbeat_skip_pause(bt_rpc_conn *c, uint64_t now) {
    uint64_t gap = now - c->last_tick_ms;
    uint64_t counted = 2 * (uint64_t)c->tick_ms;
    c->last_tick_ms = now;
    if (gap <= counted) return;
    uint64_t skip = gap - counted;
    c->last_rx_ms = c->last_rx_ms + skip < now ? c->last_rx_ms + skip : now;
    c->out_stuck_ms = c->out_stuck_ms + skip < now ? c->out_stuck_ms + skip : now;
    c->session_ms = c->session_ms + skip < now ? c->session_ms + skip : now;
    BT_DEBUG("request plane %s: this process did not run for %llu ms; not counted as the peer's silence", c->peer,
             (unsigned long long)skip);
}

/* "Not reading" is no progress: bytes wait for the peer and it has taken none of them for
 * dead_after_ms. How many wait says nothing about the peer (a burst of large requests queues many
 * megabytes for a worker that reads them as fast as the network allows); that is a memory matter,
 * bounded by max_out_bytes and by the owner's backpressure. False when the connection failed. */
static bool out_progress(bt_rpc_conn *c, uint64_t now) {
    size_t waiting = c->queued ? uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) : 0;
    /* What the kernel holds unacknowledged counts as waiting too: libuv's queue moves only when the
     * socket's send buffer (megabytes, autotuned) has drained to its low mark, so alone it would
     * show a steady slow reader no progress for seconds. The peer's TCP acknowledges what reaches
     * its receive buffer, which stays full while its process reads nothing. */
    uv_os_fd_t fd;
    int outq = 0;
    if (waiting && uv_fileno((const uv_handle_t *)&c->tcp, &fd) == 0 && ioctl(fd, TIOCOUTQ, &outq) == 0 && outq > 0)
        waiting += (size_t)outq;
    uint64_t taken = c->handed > waiting ? c->handed - waiting : 0;
    if (waiting == 0 || taken != c->taken_seen) {
        c->taken_seen = taken;
        c->out_stuck_ms = now;
        return true;
    }
    if (now - c->out_stuck_ms < c->cfg.dead_after_ms) return true;
    conn_fail(c, BT_ERR_TIMEOUT, "peer %s is not reading: none of %zu unsent bytes taken for %llu ms", c->peer, waiting,
              (unsigned long long)(now - c->out_stuck_ms));
    return false;
}

static void on_heartbeat(uv_timer_t *t) {
    bt_rpc_conn *c = t->data;
    uint64_t now = bt_now_ms();
    if (c->state == CONN_CONNECTING) {
        conn_fail(c, BT_ERR_CANNOT_CONNECT, "connect to %s timed out after %u ms", c->peer, c->cfg.connect_timeout_ms);
        return;
    }
    heartbeat_skip_pause(c, now);
    if ((c->state == CONN_AUTH || c->state == CONN_HANDSHAKE) && now - c->session_ms >= c->cfg.connect_timeout_ms) {
        conn_fail(c, BT_ERR_UNAUTHORIZED, "%s did not complete its handshake within %u ms", c->peer,
                  c->cfg.connect_timeout_ms);
        return;
    }
    if (now - c->last_rx_ms >= c->cfg.dead_after_ms) {
        /* libuv runs due timers before it polls for input, so after a pause of this process the
         * peer's frames may be waiting unread. A verdict waits for them once: this iteration's
         * poll reads them (on_read clears the flag); if the next tick still finds silence, the
         * peer is dead whatever the socket holds. */
        size_t waiting = c->verdict_deferred ? 0 : bytes_waiting(c);
        if (waiting == 0) {
            conn_fail(c, BT_ERR_TIMEOUT, "no frame from %s for %llu ms: peer declared dead", c->peer,
                      (unsigned long long)(now - c->last_rx_ms));
            return;
        }
        c->verdict_deferred = true;
        BT_DEBUG("request plane %s: silent for %llu ms but %zu bytes are waiting: reading them first", c->peer,
                 (unsigned long long)(now - c->last_rx_ms), waiting);
    }
    if (!out_progress(c, now)) return;
    if (now - c->last_tx_ms >= c->cfg.ping_interval_ms) {
        bt_buf *w = bt_rpc_wbuf(c);
        if (w) bt_frame_put_ping(w, BT_FRAME_PING, now);
        c->last_tx_ms = now;
    }
}

static void start_session(bt_rpc_conn *c) {
    c->state = CONN_HANDSHAKE;
    c->last_rx_ms = c->last_tx_ms = bt_now_ms();
    uv_tcp_nodelay(&c->tcp, 1);
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc < 0) {
        conn_fail(c, BT_ERR_DISCONNECTED, "read from %s failed: %s", c->peer, uv_strerror(rc));
        return;
    }
    c->session_ms = c->out_stuck_ms = c->last_rx_ms;
    bt_frame_put_hello_flags(bt_rpc_wbuf(c), c->cfg.hello_flags, c->cfg.role, c->cfg.instance_id);
    if (c->cfg.role == BT_ROLE_WORKER && c->cfg.secret && *c->cfg.secret) {
        for (size_t i = 0; i < BT_AUTH_LEN; i += 8) {
            uint64_t r = bt_random64();
            memcpy(c->nonce + i, &r, 8);
        }
        c->challenged = true;
        bt_frame_put_auth(bt_rpc_wbuf(c), BT_AUTH_CHALLENGE, c->nonce);
    }
    uint32_t tick = c->cfg.ping_interval_ms < c->cfg.dead_after_ms / 4 ? c->cfg.ping_interval_ms
                                                                       : c->cfg.dead_after_ms / 4;
    if (tick < 10) tick = 10;
    c->tick_ms = tick;
    c->last_tick_ms = c->last_rx_ms;
    uv_timer_start(&c->timer, on_heartbeat, tick, tick);
}

static bt_rpc_conn *conn_new(uv_loop_t *loop, const bt_rpc_config *cfg, const bt_rpc_handlers *h, void *ud) {
    bt_rpc_conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->loop = loop;
    c->cfg = *cfg;
    c->h = *h;
    c->ud = ud;
    bt_buf_init(&c->rbuf, (size_t)cfg->max_frame + 4 + READ_CHUNK);
    bt_buf_init(&c->wbuf, SIZE_MAX / 2);
    uv_timer_init(loop, &c->timer);
    uv_idle_init(loop, &c->flusher);
    c->timer.data = c->flusher.data = c->tcp.data = c;
    c->state = CONN_CONNECTING;
    return c;
}

static void on_connect(uv_connect_t *req, int status) {
    bt_rpc_conn *c = req->data;
    if (c->state == CONN_CLOSING) return;
    if (status < 0) {
        conn_fail(c, BT_ERR_CANNOT_CONNECT, "connect to %s failed: %s", c->peer, uv_strerror(status));
        return;
    }
    uv_timer_stop(&c->timer);
    start_session(c);
}

static void connect_addr(bt_rpc_conn *c, const struct sockaddr *sa) {
    int rc = uv_tcp_init(c->loop, &c->tcp);
    if (rc == 0) {
        c->tcp_inited = true;
        c->connect_req.data = c;
        rc = uv_tcp_connect(&c->connect_req, &c->tcp, sa, on_connect);
    }
    if (rc < 0) conn_fail(c, BT_ERR_CANNOT_CONNECT, "connect to %s failed: %s", c->peer, uv_strerror(rc));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
    bt_rpc_conn *c = req->data;
    c->resolving = false;
    if (c->state == CONN_CLOSING) {
        uv_freeaddrinfo(res);
        bt_closer_release(&c->closer);
        return;
    }
    if (status < 0 || !res) {
        conn_fail(c, BT_ERR_CANNOT_CONNECT, "cannot resolve %s: %s", c->peer, uv_strerror(status));
    } else {
        struct sockaddr_storage ss;
        memcpy(&ss, res->ai_addr, res->ai_addrlen);
        if (ss.ss_family == AF_INET6) ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)c->port);
        else ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)c->port);
        connect_addr(c, (struct sockaddr *)&ss);
    }
    uv_freeaddrinfo(res);
}

bt_rpc_conn *bt_rpc_dial(uv_loop_t *loop, const char *host, int port, const bt_rpc_config *cfg,
                         const bt_rpc_handlers *h, void *ud) {
    bt_rpc_conn *c = conn_new(loop, cfg, h, ud);
    if (!c) return NULL;
    c->port = port;
    snprintf(c->peer, sizeof c->peer, "%s:%d", host, port);
    uv_timer_start(&c->timer, on_heartbeat, cfg->connect_timeout_ms, 0);
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    if (uv_ip4_addr(host, port, &a4) == 0) connect_addr(c, (struct sockaddr *)&a4);
    else if (uv_ip6_addr(host, port, &a6) == 0) connect_addr(c, (struct sockaddr *)&a6);
    else {
        c->gai.data = c;
        c->resolving = true;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        int rc = uv_getaddrinfo(loop, &c->gai, on_resolved, host, NULL, &hints);
        if (rc < 0) {
            c->resolving = false;
            conn_fail(c, BT_ERR_CANNOT_CONNECT, "cannot resolve %s: %s", c->peer, uv_strerror(rc));
        }
    }
    return c;
}

bool bt_rpc_is_open(const bt_rpc_conn *c) { return c && c->state == CONN_OPEN; }
uint64_t bt_rpc_peer_instance(const bt_rpc_conn *c) { return c->peer_instance; }
const char *bt_rpc_peer_name(const bt_rpc_conn *c) { return c->peer; }
uint64_t bt_rpc_last_rx_ms(const bt_rpc_conn *c) { return c->last_rx_ms; }
void bt_rpc_set_ud(bt_rpc_conn *c, void *ud) { c->ud = ud; }
void *bt_rpc_get_ud(const bt_rpc_conn *c) { return c->ud; }

static void on_accept(uv_stream_t *server, int status) {
    bt_rpc_listener *l = server->data;
    if (status < 0) {
        BT_WARN("request-plane accept failed: %s", uv_strerror(status));
        return;
    }
    bt_rpc_conn *c = conn_new(l->loop, &l->cfg, &l->h, l->ud);
    if (!c) return;
    uv_tcp_init(l->loop, &c->tcp);
    c->tcp_inited = true;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        bt_rpc_conn_close(c, BT_ERR_IO, "accept failed");
        return;
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char ip[48] = "?";
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET) {
            uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
            snprintf(c->peer, sizeof c->peer, "%s:%d", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
        } else {
            uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
            snprintf(c->peer, sizeof c->peer, "[%s]:%d", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
        }
    }
    if (l->h.on_accept) l->h.on_accept(l->ud, c);
    start_session(c);
}

static void free_listener(uv_handle_t *h) { free(h->data); }

bt_status bt_rpc_listen(uv_loop_t *loop, const char *host, int port, const bt_rpc_config *cfg,
                        const bt_rpc_handlers *h, void *ud, bt_rpc_listener **out, char *err, size_t errlen) {
    bt_rpc_listener *l = calloc(1, sizeof *l);
    if (!l) return BT_ERR_NOMEM;
    l->loop = loop;
    l->cfg = *cfg;
    l->h = *h;
    l->ud = ud;
    struct sockaddr_storage ss;
    int rc = uv_ip4_addr(host, port, (struct sockaddr_in *)&ss);
    if (rc < 0) rc = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss);
    if (rc < 0) {
        snprintf(err, errlen, "invalid request-plane host '%s' (an IP address is expected)", host);
        free(l);
        return BT_ERR_INVALID;
    }
    uv_tcp_init(loop, &l->tcp);
    l->tcp.data = l;
    rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&l->tcp, 511, on_accept);
    if (rc < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, uv_strerror(rc));
        uv_close((uv_handle_t *)&l->tcp, free_listener);
        return BT_ERR_IO;
    }
    int len = sizeof ss;
    uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&ss, &len);
    l->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *out = l;
    return BT_OK;
}

int bt_rpc_listener_port(const bt_rpc_listener *l) { return l->port; }

void bt_rpc_listener_close(bt_rpc_listener *l) {
    if (l) uv_close((uv_handle_t *)&l->tcp, free_listener);
}
