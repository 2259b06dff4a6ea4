/* nats.c — the NATS event plane (see events.h): the nats.c client driven by our libuv loop.
 *
 * nats.c runs in its external-event-loop mode (natsOptions_SetEventLoop): it never reads or
 * writes the socket from its own threads while attached, it asks us to poll for readability and
 * writability, and we call natsConnection_ProcessReadEvent/ProcessWriteEvent from the loop. Its
 * remaining threads — the reconnect thread (blocking connects with a timeout), the ping timer, the
 * per-subscription delivery thread — talk to the loop only through the queue and the uv_async_t
 * below. The connect and close handshakes, which block for up to the connect timeout, run on the
 * libuv thread pool.
 *
 * Why a small adapter here instead of <nats/adapters/libuv.h>: the adapter nats.c 3.4 ships (the
 * Debian libnats-dev one) refuses the first attach from any thread but the loop's
 * (NATS_ILLEGAL_STATE), and with natsOptions_SetRetryOnFailedConnect the first successful connect
 * of a process that started while NATS was down happens on nats.c's reconnect thread, so such a
 * process would never connect. It also polls nats.c's own descriptor, which nats.c closes right
 * after asking (possibly from another thread) to stop polling it; the number can be reused by one
 * of our sockets before the loop gets to the request, and stopping the poll then removes our other
 * socket from epoll. Here every attach/read/write/detach request is applied at once when it comes
 * from the loop thread with nothing queued, and queued in order otherwise; and the poll watches a
 * dup() of the socket that only we close, so its number cannot be reused underneath it.
 *
 * Lifetime: the bt_events object outlives the natsConnection (destroyed on the loop in
 * finish_close, after the poll is closed), so every nats.c callback may use it. The message queue
 * lives in a separate refcounted `inbox` because the subscription's delivery thread can outlive
 * the connection; its last reference goes when nats.c reports the subscription complete. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nats/nats.h>
#include <openssl/crypto.h>

#include "common/closer.h"
#include "common/log.h"
#include "common/util.h"
#include "events/events_internal.h"
#include "events/nats_client.h"
#include "events/nkey.h"

#define MAX_MSG_BYTES 4096     /* an ActiveLoad is ~250 bytes; anything this large is not one */
#define RECONNECT_BUF (64 * 1024)
#define SUB_PENDING_MSGS 65536 /* nats.c's own per-subscription cap before our queue */
#define SUB_PENDING_BYTES (16 * 1024 * 1024)
#define MAX_PINGS_OUT 2 /* unanswered pings before nats.c declares the connection stale */
#define READ_BYTES (32 * 1024) /* nats.c's read size (its I/O buffer), and so what one peek sees */

/* ---- requests from nats.c to the loop ---- */

typedef enum { OP_ATTACH, OP_READ, OP_WRITE, OP_DETACH } op_type;

typedef struct op {
    op_type type;
    bool add;
    bool stale; /* OP_READ removed because the server stopped answering pings */
    int fd;     /* OP_ATTACH: our dup() of the socket, owned by the op until applied */
    natsConnection *nc;
    STAILQ_ENTRY(op) link; /* bt_events.ops */
} op;

/* ---- received messages, shared with the delivery thread ---- */

typedef struct qmsg {
    STAILQ_ENTRY(qmsg) link; /* inbox.msgs, then the loop's batch */
    size_t len;
    char data[];
} qmsg;
STAILQ_HEAD(qmsg_queue, qmsg);

typedef struct {
    uv_mutex_t mu;
    uv_async_t *async; /* NULL once the loop side is gone: messages are then discarded */
    struct qmsg_queue msgs;
    size_t n, cap;
    uint64_t overflow, too_big;
    int refs; /* the bt_events, plus the subscription until nats.c reports it complete */
} inbox;

typedef struct {
    uv_poll_t h;
    int fd;
    struct bt_events *e;
} pollw;

/* nats_client.h: the options and credentials of one connection (the event plane's, or another) */
struct bt_nats_client {
    char *url, *name;
    char *user, *password, *token, *nkey, *creds;
    char nkey_pub[BT_NKEY_PUBLIC_LEN + 1]; /* derived from the seed `nkey` when that is the credential */
    const char *auth;                      /* which credential is used, for the logs */
    atomic_uint sig_refusals;              /* signatures sign_nonce would not hand over ... */
    _Atomic uint64_t sig_refused_ms;       /* ... and when the last one was (bt_now_ms) */
    natsOptions *opts;
};

typedef enum { ST_IDLE, ST_CONNECTING, ST_RUNNING, ST_CLOSING, ST_CLOSED } ev_state;

struct bt_events {
    uv_loop_t *loop;
    uv_thread_t loop_thread;
    char *url, *subject, *name;
    bt_events_config c; /* string fields point at the copies above (auth: see make_options) */
    bt_nats_client *cl;         /* the options and credentials (bt_nats_client_new) */
    struct bt_events *reg_next; /* the registry of live objects (on_closed) */
    natsConnection *nc; /* set on the loop once the connect work returns */
    natsSubscription *sub;
    ev_state state;
    /* loop */
    uv_async_t async;
    uv_timer_t kick;     /* starts the connect work on the first loop iteration */
    uv_timer_t debounce; /* publisher */
    pollw *poll;
    int poll_events;
    natsConnection *poll_nc;
    bool live;           /* the loop has attached a connected socket and not lost it */
    char parting[160];   /* the -ERR text the last read ended with, "" if none: why the server closed */
    uint64_t parting_ms; /* when that read was peeked at (uv_now) */
    char peek[READ_BYTES]; /* what nats.c is about to read, peeked at (peek_parting) */
    bool shutting;       /* finish_close has begun: attaches are refused */
    atomic_bool up;      /* nats.c says the socket is attached (set from any thread) */
    /* queued requests */
    uv_mutex_t op_mu;
    STAILQ_HEAD(, op) ops;
    /* thread-pool work */
    uv_work_t work;
    bool work_busy;
    natsStatus work_status;
    natsStatus work_last; /* the connection's last error when the first connect is left to retry */
    char work_err[256];
    natsConnection *work_nc;
    natsSubscription *work_sub;
    /* subscriber */
    inbox *in;
    bt_events_load_cb cb;
    void *cb_ud;
    /* publisher */
    bool pending;
    uint64_t pending_id;
    bt_load_report pending_r;
    uint64_t last_drop_log_ms;
    /* close */
    bt_closer closer; /* every poll (held from its start), then the three handles of finish_close */
    void (*done)(void *ud);
    void *done_ud;
    bt_events_stats st;
};

static void apply_op(bt_events *e, const op *o);

/* ---- the poll on our copy of the socket ---- */

static void on_poll_closed(uv_handle_t *h) {
    pollw *p = h->data;
    close(p->fd);
    bt_events *e = p->e;
    free(p);
    bt_closer_release(&e->closer);
}

static void poll_close(bt_events *e) {
    pollw *p = e->poll;
    if (!p) return;
    e->poll = NULL;
    e->poll_events = 0;
    uv_poll_stop(&p->h);
    uv_close((uv_handle_t *)&p->h, on_poll_closed);
}

/* nats-server says why it drops a client in an -ERR line just before it closes the socket
 * ('Stale Connection' for a client that left its pings unanswered, a paused or overloaded
 * process; 'Authorization Violation'; 'Maximum Payload Violation'), and nats.c reads and
 * handles that line without keeping its text (for a stale connection it reconnects at once and
 * keeps nothing), so that all the loss would show is a closed socket, the same as a server
 * restart. So each read is peeked at first, on our dup() of the socket, and an -ERR line that ends
 * it is kept as the reason of a loss that follows at once: inside that read (nats.c drops the
 * connection itself on most -ERRs), or at the end of the stream the next read meets, within
 * PARTING_MS (the server's close behind its line). Any bytes after it clear it. A 'Permissions
 * Violation' is never kept: the server goes on after it (nats.c reports it to on_async_error),
 * and a publisher denied its subject gets one for each report, so an unrelated close (a server
 * restart) would otherwise be told as its doing.
 *
 * The cost is one recv(MSG_PEEK) per read event: about 1 us for a few hundred bytes, 2 us for
 * 20 KB, on loopback TCP. A worker's publisher reads little (PONGs); the frontend's subscription
 * carries every worker's load report, each every 0.3 s: with 100 workers up to some 330 read
 * events a second, about 0.35 ms of CPU a second, beside nats.c's own read and parse of the same
 * bytes. Peeking only when the poll reports the peer's close would save it but miss the reason
 * whenever that close arrives a moment after the -ERR, as it does on a live process (nats.c has
 * read and handled the line by then). Over TLS the bytes peeked are encrypted, never match, and
 * the loss is told as a closed socket. */
#define PARTING_MS 1000

static void peek_parting(bt_events *e, int fd) {
    ssize_t n = recv(fd, e->peek, READ_BYTES, MSG_PEEK | MSG_DONTWAIT);
    if (n <= 0) return; /* the end of the stream (or an error): an -ERR just before it stays the reason */
    if (bt__events_parting_err(e->peek, (size_t)n, e->parting, sizeof e->parting) &&
        strcasestr(e->parting, "Permissions Violation"))
        e->parting[0] = '\0';
    e->parting_ms = uv_now(e->loop);
}

static void on_poll(uv_poll_t *h, int status, int events) {
    pollw *p = h->data;
    bt_events *e = p->e;
    natsConnection *nc = e->poll_nc;
    if (!nc || e->poll != p) return;
    if (status == 0 && (events & (UV_READABLE | UV_DISCONNECT))) peek_parting(e, p->fd);
    /* an error is handed to the read side, which fails and starts nats.c's reconnect */
    if (status < 0 || (events & (UV_READABLE | UV_DISCONNECT))) natsConnection_ProcessReadEvent(nc);
    if (e->poll != p) return; /* the read closed the connection (and this poll) */
    if (status == 0 && (events & UV_WRITABLE)) natsConnection_ProcessWriteEvent(nc);
}

static void poll_set(bt_events *e, int flag, bool add) {
    if (!e->poll) return;
    int ev = add ? (e->poll_events | flag) : (e->poll_events & ~flag);
    if (ev == e->poll_events) return;
    e->poll_events = ev;
    int rc = ev ? uv_poll_start(&e->poll->h, ev, on_poll) : uv_poll_stop(&e->poll->h);
    if (rc != 0) BT_WARN("NATS: cannot change polling of the socket: %s", uv_strerror(rc));
}

static bool poll_open(bt_events *e, int fd) {
    pollw *p = calloc(1, sizeof *p);
    if (!p) return false;
    int rc = uv_poll_init(e->loop, &p->h, fd);
    if (rc != 0) {
        BT_ERROR("NATS: cannot poll the socket: %s", uv_strerror(rc));
        free(p);
        return false;
    }
    p->fd = fd;
    p->e = e;
    p->h.data = p;
    bt_closer_hold(&e->closer);
    e->poll = p;
    e->poll_events = 0;
    poll_set(e, UV_READABLE, true);
    return true;
}

/* ---- requests from nats.c (any thread) ---- */

static void run_ops(bt_events *e) {
    for (;;) {
        uv_mutex_lock(&e->op_mu);
        op *o = STAILQ_FIRST(&e->ops);
        if (o) STAILQ_REMOVE_HEAD(&e->ops, link);
        uv_mutex_unlock(&e->op_mu);
        if (!o) return;
        apply_op(e, o); /* never calls into nats.c, so no lock-order question arises */
        free(o);
    }
}

/* Applies the request now when on the loop thread with nothing queued before it (the common case:
 * nats.c reacting to a read or write event we gave it), else queues it for the loop, in order. */
static natsStatus submit(bt_events *e, op_type t, bool add, bool stale, int fd, natsConnection *nc) {
    uv_thread_t self = uv_thread_self();
    uv_mutex_lock(&e->op_mu);
    bool direct = uv_thread_equal(&self, &e->loop_thread) && STAILQ_EMPTY(&e->ops);
    if (direct) {
        uv_mutex_unlock(&e->op_mu);
        op o = {t, add, stale, fd, nc, {NULL}};
        apply_op(e, &o);
        return NATS_OK;
    }
    op *o = malloc(sizeof *o);
    if (!o) {
        uv_mutex_unlock(&e->op_mu);
        return NATS_NO_MEMORY;
    }
    *o = (op){t, add, stale, fd, nc, {NULL}};
    STAILQ_INSERT_TAIL(&e->ops, o, link);
    uv_mutex_unlock(&e->op_mu);
    uv_async_send(&e->async);
    return NATS_OK;
}

static natsStatus ev_attach(void **user, void *loop, natsConnection *nc, natsSock sock) {
    bt_events *e = loop;
    int fd = fcntl(sock, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return NATS_SYS_ERROR;
    *user = e;
    atomic_store(&e->up, true);
    natsStatus s = submit(e, OP_ATTACH, true, false, fd, nc);
    if (s != NATS_OK) {
        close(fd);
        atomic_store(&e->up, false);
    }
    return s;
}

/* nats.c stops reading when the socket is done. It finds that out on our loop, inside the read or
 * write event we hand it (an error, or the server closing the socket), or on its ping timer's
 * thread, when MAX_PINGS_OUT pings in a row went unanswered: the connection is stale (a server
 * paused, a partition that drops packets without a reset). The thread tells the two apart; nats.c
 * keeps no error for the second (it reconnects at once), and the log should say which it was. */
static natsStatus ev_read(void *user, bool add) {
    bt_events *e = user;
    bool stale = false;
    if (!add) {
        atomic_store(&e->up, false);
        uv_thread_t self = uv_thread_self();
        stale = !uv_thread_equal(&self, &e->loop_thread);
    }
    return submit(e, OP_READ, add, stale, -1, NULL);
}

static natsStatus ev_write(void *user, bool add) { return submit(user, OP_WRITE, add, false, -1, NULL); }

static natsStatus ev_detach(void *user) {
    bt_events *e = user;
    atomic_store(&e->up, false);
    return submit(e, OP_DETACH, false, false, -1, NULL);
}

/* `why` names what nats.c saw; an -ERR the server sent before it closed (peek_parting) says more */
static void lost(bt_events *e, const char *why) {
    if (!e->live) return;
    e->live = false;
    e->st.disconnects++;
    char said[sizeof e->parting + 48];
    if (e->parting[0] && uv_now(e->loop) - e->parting_ms <= PARTING_MS) {
        snprintf(said, sizeof said, "closed by the server after -ERR %s", e->parting);
        why = said;
    }
    if (e->state != ST_CLOSING)
        BT_WARN("NATS connection to %s lost (%s); reconnecting in the background — load reports go on the "
                "request plane only until then",
                e->url, why);
}

static void apply_op(bt_events *e, const op *o) {
    switch (o->type) {
    case OP_ATTACH:
        poll_close(e); /* the socket of a previous connection, if still polled */
        if (e->shutting || !poll_open(e, o->fd)) {
            close(o->fd);
            return;
        }
        e->poll_nc = o->nc;
        e->live = true;
        e->parting[0] = '\0';
        e->st.connects++;
        BT_INFO("NATS connected to %s (%s %s)", e->url, e->cb ? "subscribed to" : "publishing on", e->subject);
        return;
    case OP_READ:
        if (o->add) {
            poll_set(e, UV_READABLE, true);
            return;
        }
        /* nats.c stops reading only when the socket is done (lost, or closing): ev_read */
        if (o->stale) {
            char why[96];
            snprintf(why, sizeof why, "stale: no answer to %d pings in %g s", MAX_PINGS_OUT,
                     MAX_PINGS_OUT * e->c.ping_interval_ms / 1000.0);
            lost(e, why);
        } else {
            lost(e, "socket closed");
        }
        poll_close(e);
        return;
    case OP_WRITE:
        poll_set(e, UV_WRITABLE, o->add);
        return;
    case OP_DETACH:
        lost(e, "connection closed");
        poll_close(e);
        return;
    }
}

/* ---- nats.c callbacks on its own threads ---- */

static void on_connected(natsConnection *nc, void *closure) {
    /* required for the asynchronous first connect; the loop logs the attach instead */
    (void)nc;
    (void)closure;
}

/* nats.c keeps the text of the -ERR behind a refusal (a permissions or authorization violation):
 * the log line gives it, escaped, after nats.c's name for the status. */
static void on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure) {
    (void)sub;
    (void)closure;
    const char *txt = NULL;
    char said[160] = "";
    if ((err == NATS_NOT_PERMITTED || err == NATS_CONNECTION_AUTH_FAILED) &&
        natsConnection_GetLastError(nc, &txt) == err && txt && *txt) {
        char esc[128];
        snprintf(said, sizeof said, " (server: -ERR '%s')", bt__events_log_text(txt, strlen(txt), esc, sizeof esc));
    }
    BT_WARN("NATS: asynchronous error: %s%s", natsStatus_GetText(err), said);
}

/* nats.c posts the closed callback to its own callback thread, which may run it after
 * bt_events_close() has freed the object; so the callback touches an object only while it is in
 * this registry, which bt_events_close() leaves first. */
static uv_once_t reg_once = UV_ONCE_INIT;
static uv_mutex_t reg_mu;
static bt_events *reg_head;

static void reg_init(void) {
    if (uv_mutex_init(&reg_mu) != 0) abort();
}

static void reg_add(bt_events *e) {
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    e->reg_next = reg_head;
    reg_head = e;
    uv_mutex_unlock(&reg_mu);
}

static void reg_remove(bt_events *e) {
    uv_mutex_lock(&reg_mu);
    for (bt_events **p = &reg_head; *p; p = &(*p)->reg_next)
        if (*p == e) {
            *p = e->reg_next;
            break;
        }
    uv_mutex_unlock(&reg_mu);
}

/* With unlimited reconnects nats.c closes a connection by itself only when it has dropped every
 * server from its list, which it does to a server that refuses the credentials: the event plane
 * is then down until the process restarts. */
static void on_closed(natsConnection *nc, void *closure) {
    uv_once(&reg_once, reg_init);
    uv_mutex_lock(&reg_mu);
    bt_events *e = reg_head;
    while (e && e != closure) e = e->reg_next;
    /* a close that follows a signature sign_nonce kept back is connect_work's to retry */
    if (e && bt_now_ms() - atomic_load(&e->cl->sig_refused_ms) < 2000) e = NULL;
    if (e) {
        const char *txt = NULL;
        natsStatus s = natsConnection_GetLastError(nc, &txt);
        const char *why = txt && *txt ? txt : natsStatus_GetText(s);
        char esc[128];
        bt__events_log_text(why, strlen(why), esc, sizeof esc);
        /* nats.c also gives up, for good, on an -ERR it has no other answer to: NATS_ERR, its text kept
         * (a refusal of the credentials ends as that refusal, or as no server left to try) */
        if (s == NATS_ERR)
            BT_ERROR("NATS event plane: the client gave up on %s after the server's -ERR '%s'; load reports go on the "
                     "request plane only until this process restarts",
                     e->url, esc);
        else
            BT_ERROR("NATS event plane: the client gave up on %s (%s) after the server refused its credentials (%s); "
                     "load reports go on the request plane only until this process restarts",
                     e->url, esc, e->cl->auth);
    }
    uv_mutex_unlock(&reg_mu);
}

/* Backoff between rounds over the server list: min, doubling, capped, plus up to 25 % jitter so
 * that a fleet of workers does not reconnect in lock step. */
static int64_t reconnect_delay(natsConnection *nc, int attempts, void *closure) {
    (void)nc;
    bt_events *e = closure;
    uint64_t d = e->c.reconnect_min_ms;
    for (int i = 1; i < attempts && d < e->c.reconnect_max_ms; i++) d *= 2;
    if (d > e->c.reconnect_max_ms) d = e->c.reconnect_max_ms;
    d += bt_random64() % (d / 4 + 1);
    if (attempts > 1 && attempts % 30 == 0)
        BT_INFO("NATS: %s still unreachable after %d attempts; retrying every ~%" PRIu64 " ms", e->url, attempts, d);
    return (int64_t)d;
}

static void inbox_unref(inbox *in) {
    uv_mutex_lock(&in->mu);
    int refs = --in->refs;
    uv_mutex_unlock(&in->mu);
    if (refs > 0) return;
    for (qmsg *q = STAILQ_FIRST(&in->msgs), *n; q; q = n) {
        n = STAILQ_NEXT(q, link);
        free(q);
    }
    uv_mutex_destroy(&in->mu);
    free(in);
}

static void on_sub_complete(void *closure) { inbox_unref(closure); }

/* Delivery thread: copy the payload into the loop's queue (bounded) and wake the loop. */
static void on_msg(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *closure) {
    (void)nc;
    (void)sub;
    inbox *in = closure;
    int len = natsMsg_GetDataLength(m);
    qmsg *q = NULL;
    if (len >= 0 && len <= MAX_MSG_BYTES) {
        q = malloc(sizeof *q + (size_t)len);
        if (q) {
            q->len = (size_t)len;
            memcpy(q->data, natsMsg_GetData(m), (size_t)len);
        }
    }
    natsMsg_Destroy(m);
    uv_mutex_lock(&in->mu);
    if (!q) {
        in->too_big += len > MAX_MSG_BYTES;
        in->overflow += len <= MAX_MSG_BYTES;
    } else if (!in->async || in->n >= in->cap) {
        if (in->async) in->overflow++;
        free(q);
    } else {
        STAILQ_INSERT_TAIL(&in->msgs, q, link);
        in->n++;
        uv_async_send(in->async);
    }
    uv_mutex_unlock(&in->mu);
}

/* ---- the loop side ---- */

static void drain_inbox(bt_events *e) {
    inbox *in = e->in;
    if (!in) return;
    uv_mutex_lock(&in->mu);
    qmsg *q = STAILQ_FIRST(&in->msgs);
    STAILQ_INIT(&in->msgs);
    in->n = 0;
    uv_mutex_unlock(&in->mu);
    while (q) {
        qmsg *next = STAILQ_NEXT(q, link);
        uint64_t id;
        bt_load_report r;
        char err[128];
        if (bt_events_decode_load(q->data, q->len, &id, &r, err, sizeof err) == BT_OK) {
            e->st.received++;
            if (e->cb && !e->shutting) e->cb(e->cb_ud, id, &r);
        } else {
            if (e->st.invalid++ == 0 || e->st.invalid % 1000 == 0)
                BT_WARN("NATS: ignoring a message on %s that is not an ActiveLoad (%s; %" PRIu64 " so far)",
                        e->subject, err, e->st.invalid);
        }
        free(q);
        q = next;
    }
}

static void on_async(uv_async_t *a) {
    bt_events *e = a->data;
    run_ops(e);
    drain_inbox(e);
}

static void publish_now(bt_events *e) {
    if (!e->pending) return;
    e->pending = false;
    const char *why = NULL;
    if (!e->nc || !atomic_load(&e->up) || !e->live) {
        why = "not connected";
    } else if (natsConnection_Buffered(e->nc) > (int)e->c.max_pending_bytes) {
        why = "send buffer full";
    } else {
        char buf[512];
        size_t n = bt_events_encode_load(buf, sizeof buf, e->pending_id, &e->pending_r);
        natsStatus s = n ? natsConnection_Publish(e->nc, e->subject, buf, (int)n) : NATS_INSUFFICIENT_BUFFER;
        if (s == NATS_OK) {
            e->st.published++;
            return;
        }
        why = natsStatus_GetText(s);
    }
    e->st.dropped++;
    uint64_t now = bt_now_ms();
    if (e->live && now - e->last_drop_log_ms > 10000) {
        e->last_drop_log_ms = now;
        BT_WARN("NATS: load report not published (%s; %" PRIu64 " dropped so far)", why, e->st.dropped);
    }
}

static void on_debounce(uv_timer_t *t) { publish_now(t->data); }

/* ---- connect and close, off the loop ---- */

static void connect_work(uv_work_t *w) {
    bt_events *e = w->data;
    natsConnection *nc = NULL;
    natsStatus s = bt_nats_client_connect(e->cl, &nc);
    e->work_status = s;
    if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED) {
        snprintf(e->work_err, sizeof e->work_err, "%s", nats_GetLastError(NULL));
        return;
    }
    if (s == NATS_NOT_YET_CONNECTED) {
        /* why the first attempt failed: unreachable, or refused (then nats.c will not retry) */
        const char *txt = NULL;
        e->work_last = natsConnection_GetLastError(nc, &txt);
        snprintf(e->work_err, sizeof e->work_err, "%s", txt ? txt : "");
    }
    e->work_nc = nc;
    if (!e->cb) return;
    natsSubscription *sub = NULL;
    /* the subscription is registered now and (re)sent by nats.c on every (re)connect */
    natsStatus ss = natsConnection_Subscribe(&sub, nc, e->subject, on_msg, e->in);
    if (ss == NATS_OK) {
        natsSubscription_SetPendingLimits(sub, SUB_PENDING_MSGS, SUB_PENDING_BYTES);
        uv_mutex_lock(&e->in->mu);
        e->in->refs++;
        uv_mutex_unlock(&e->in->mu);
        if (natsSubscription_SetOnCompleteCB(sub, on_sub_complete, e->in) != NATS_OK) inbox_unref(e->in);
        e->work_sub = sub;
    } else {
        e->work_status = ss;
        snprintf(e->work_err, sizeof e->work_err, "subscribe to %s: %s", e->subject, nats_GetLastError(NULL));
    }
}

static void close_step(bt_events *e);

static void after_connect(uv_work_t *w, int status) {
    (void)status;
    bt_events *e = w->data;
    e->work_busy = false;
    e->nc = e->work_nc;
    e->sub = e->work_sub;
    if (e->work_status == NATS_NOT_YET_CONNECTED && e->work_last == NATS_CONNECTION_AUTH_FAILED)
        BT_ERROR("NATS server %s refused this client's credentials (%s: %s); load reports go on the request plane "
                 "only",
                 e->url, e->cl->auth, e->work_err);
    else if (e->work_status == NATS_NOT_YET_CONNECTED)
        BT_WARN("NATS server %s is not reachable yet; connecting in the background (load reports go on the "
                "request plane only until then)",
                e->url);
    else if (e->work_status != NATS_OK)
        BT_ERROR("NATS event plane: %s (%s); load reports go on the request plane only",
                 natsStatus_GetText(e->work_status), e->work_err);
    if (e->state == ST_CLOSING) close_step(e);
    else e->state = ST_RUNNING;
}

static void close_work(uv_work_t *w) {
    bt_events *e = w->data;
    natsConnection_Close(e->nc); /* flushes what is buffered, joins nats.c's reconnect thread */
}

static void free_secret(char *s) {
    if (s) OPENSSL_cleanse(s, strlen(s));
    free(s);
}

/* The closer's done: finish_close has run and every handle has closed. */
static void events_free(void *closer_ud) {
    bt_events *e = closer_ud;
    e->state = ST_CLOSED;
    void (*done)(void *) = e->done;
    void *ud = e->done_ud;
    free(e->url);
    free(e->subject);
    free(e->name);
    bt_nats_client_free(e->cl);
    uv_mutex_destroy(&e->op_mu);
    free(e);
    if (done) done(ud);
}

/* On the loop, with the connection closed (or never made): nats.c calls us no more after the
 * destroy below, so the remaining requests are applied (fds closed) and the handles go. */
static void finish_close(bt_events *e) {
    e->shutting = true;
    run_ops(e);
    poll_close(e);
    if (e->sub) natsSubscription_Destroy(e->sub);
    e->sub = NULL;
    if (e->nc) natsConnection_Destroy(e->nc);
    e->nc = NULL;
    run_ops(e);
    poll_close(e);
    if (e->in) {
        uv_mutex_lock(&e->in->mu);
        e->in->async = NULL;
        uv_mutex_unlock(&e->in->mu);
        inbox_unref(e->in);
        e->in = NULL;
    }
    bt_closer_close(&e->closer, (uv_handle_t *)&e->async);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->kick);
    bt_closer_close(&e->closer, (uv_handle_t *)&e->debounce);
    bt_closer_seal(&e->closer);
}

static void after_close(uv_work_t *w, int status) {
    (void)status;
    bt_events *e = w->data;
    e->work_busy = false;
    finish_close(e);
}

static void close_step(bt_events *e) {
    if (e->nc) {
        e->work_busy = true;
        int rc = uv_queue_work(e->loop, &e->work, close_work, after_close);
        if (rc == 0) return;
        e->work_busy = false;
        BT_WARN("NATS: cannot close in the background (%s); closing on the loop", uv_strerror(rc));
        natsConnection_Close(e->nc);
    }
    finish_close(e);
}

static void on_kick(uv_timer_t *t) {
    bt_events *e = t->data;
    if (e->state != ST_IDLE) return;
    /* The loop's thread is the one running it now, not necessarily the one that created the
     * object (a frontend with --threads opens every loop on the main thread). Nothing of nats.c
     * runs before this: the connect starts below. */
    uv_mutex_lock(&e->op_mu);
    e->loop_thread = uv_thread_self();
    uv_mutex_unlock(&e->op_mu);
    e->state = ST_CONNECTING;
    e->work_busy = true;
    int rc = uv_queue_work(e->loop, &e->work, connect_work, after_connect);
    if (rc != 0) {
        e->work_busy = false;
        e->state = ST_RUNNING;
        BT_ERROR("NATS event plane: cannot start connecting: %s", uv_strerror(rc));
    }
}

/* ---- options: every NATS connection of the process (nats_client.h) ---- */

static char *dup_or_null(const char *s) { return s && *s ? strdup(s) : NULL; }

/* A copy without surrounding whitespace (a seed read into the environment from a file keeps its
 * newline), or NULL when nothing is left. */
static char *dup_trimmed(const char *s) {
    if (!s) return NULL;
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n')) n--;
    return n ? strndup(s, n) : NULL;
}

/* NATS_AUTH_NKEY holds the seed itself, as in Dynamo. nats.c's natsOptions_SetNKeyFromSeed()
 * wants a seed file, and writing the secret to disk is what a seed in the environment avoids; so
 * the public key is derived here (nkey.c) and each server nonce is signed with nats_Sign(), the
 * library's own signer, from the seed in memory. Runs on nats.c's threads; reads only cl->nkey.
 *
 * nats.c 3.4 base64-encodes a signature whose first byte is 0 as an empty string, which the
 * server refuses; that is one nonce in 256, and nats.c never retries a server that refused its
 * credentials. Such a signature is not handed over: the attempt fails as a connect error, which
 * nats.c retries on a new connection, with a new nonce (bt_nats_client_connect does the same for
 * a first connect). */
static natsStatus sign_nonce(char **custom_err, unsigned char **sig, int *sig_len, const char *nonce, void *closure) {
    bt_nats_client *cl = closure;
    natsStatus s = nats_Sign(cl->nkey, nonce, sig, sig_len);
    if (s != NATS_OK) {
        *custom_err = strdup("NATS_AUTH_NKEY: cannot sign the server's nonce");
        return s;
    }
    if (*sig_len > 0 && (*sig)[0] == 0) {
        free(*sig);
        *sig = NULL;
        *sig_len = 0;
        *custom_err = strdup("NATS_AUTH_NKEY: this nonce's signature cannot be sent; connecting again");
        atomic_store(&cl->sig_refused_ms, bt_now_ms());
        atomic_fetch_add(&cl->sig_refusals, 1);
        BT_INFO("NATS: the signature of this server nonce cannot be sent by the NATS library; connecting again "
                "for a new nonce");
        return NATS_ERR;
    }
    return NATS_OK;
}

/* Checks the seed and derives its public key; a seed nats.c cannot sign with is refused here too,
 * so that a bad one stops the process at start instead of failing every connect. */
static bool nkey_prepare(bt_nats_client *cl, char *err, size_t errlen) {
    char why[160];
    if (!bt__nkey_user_public(cl->nkey, cl->nkey_pub, why, sizeof why)) {
        snprintf(err, errlen, "NATS_AUTH_NKEY: %s", why);
        return false;
    }
    unsigned char *sig = NULL;
    int len = 0;
    natsStatus s = nats_Sign(cl->nkey, "baton", &sig, &len);
    free(sig);
    if (s != NATS_OK) {
        snprintf(err, errlen, "NATS_AUTH_NKEY: the NATS library cannot sign with this seed: %s", natsStatus_GetText(s));
        return false;
    }
    return true;
}

void bt_nats_client_free(bt_nats_client *cl) {
    if (!cl) return;
    natsOptions_Destroy(cl->opts);
    free(cl->url);
    free(cl->name);
    free(cl->user);
    free_secret(cl->password);
    free_secret(cl->token);
    free_secret(cl->nkey);
    free(cl->creds);
    free(cl);
}

/* Runs `call` (a natsStatus expression) only while every call before it succeeded; `what` then names
 * the last one run, for the error message. Used by the two option builders below. */
#define TRY(call, w)                                                                                                   \
    do {                                                                                                               \
        if (s == NATS_OK) {                                                                                            \
            s = (call);                                                                                                \
            what = (w);                                                                                                \
        }                                                                                                              \
    } while (0)

bt_nats_client *bt_nats_client_new(const bt_events_config *c, char *err, size_t errlen) {
    bt_nats_client *cl = calloc(1, sizeof *cl);
    if (!cl) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&cl->sig_refusals, 0);
    atomic_init(&cl->sig_refused_ms, 0);
    cl->url = strdup(c->nats_server);
    cl->name = strdup(c->name ? c->name : "baton");
    cl->user = dup_or_null(c->user);
    cl->password = dup_or_null(c->password);
    cl->token = dup_or_null(c->token);
    cl->nkey = dup_trimmed(c->nkey);
    cl->creds = dup_or_null(c->creds_file);
    if (!cl->url || !cl->name) {
        snprintf(err, errlen, "out of memory");
        bt_nats_client_free(cl);
        return NULL;
    }
    if (!c->tls_cert != !c->tls_key) {
        snprintf(err, errlen, "--nats-tls-cert and --nats-tls-key go together (one was given without the other)");
        bt_nats_client_free(cl);
        return NULL;
    }
    bool use_nkey = cl->nkey && !(cl->user && cl->password) && !cl->token;
    /* nats.c reports a file it cannot open without the reason ("…: (null)"), and would wait for
     * ever on a FIFO: each file is checked here, named with its setting. The credentials file
     * only when it is the credential in use (the first match below). */
    bool use_creds = cl->creds && !(cl->user && cl->password) && !cl->token && !use_nkey;
    const char *const files[][2] = {{"--nats-tls-ca", c->tls_ca},
                                    {"--nats-tls-cert", c->tls_cert},
                                    {"--nats-tls-key", c->tls_key},
                                    {"NATS_AUTH_CREDENTIALS_FILE", use_creds ? cl->creds : NULL}};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char why[128];
        if (!files[i][1] || bt_check_regular(files[i][1], why, sizeof why)) continue;
        snprintf(err, errlen, "%s '%s' cannot be read: %s", files[i][0], files[i][1], why);
        bt_nats_client_free(cl);
        return NULL;
    }
    natsOptions *o = NULL;
    natsStatus s = natsOptions_Create(&o); /* also initializes the library, which nats_Sign needs */
    const char *what = "create options";
    if (s == NATS_OK && use_nkey && !nkey_prepare(cl, err, errlen)) {
        natsOptions_Destroy(o);
        bt_nats_client_free(cl);
        return NULL;
    }
    /* a tls:// URL (or a server that requires TLS) makes nats.c connect with TLS */
    TRY(natsOptions_SetURL(o, cl->url), "server URL");
    TRY(natsOptions_SetName(o, cl->name), "name");
    TRY(natsOptions_SetTimeout(o, c->connect_timeout_ms), "connect timeout");
    TRY(natsOptions_SetPingInterval(o, c->ping_interval_ms), "ping interval");
    TRY(natsOptions_SetMaxPingsOut(o, MAX_PINGS_OUT), "max pings out");
    TRY(natsOptions_SetAllowReconnect(o, true), "allow reconnect");
    TRY(natsOptions_SetMaxReconnect(o, -1), "max reconnect");
    TRY(natsOptions_SetReconnectWait(o, c->reconnect_min_ms), "reconnect wait");
    /* TLS settings given by the operator (a missing or unreadable file is an error here, at start):
     * either makes the connection TLS whatever the URL's scheme */
    if (c->tls_ca || c->tls_cert) TRY(natsOptions_SetSecure(o, true), "TLS");
    if (c->tls_ca) TRY(natsOptions_LoadCATrustedCertificates(o, c->tls_ca), "--nats-tls-ca");
    if (c->tls_cert) TRY(natsOptions_LoadCertificatesChain(o, c->tls_cert, c->tls_key), "--nats-tls-cert/--nats-tls-key");
    /* authentication, first match wins (Dynamo's order); cl->auth names it in the logs */
    if (cl->user && cl->password)
        TRY(natsOptions_SetUserInfo(o, cl->user, cl->password), "NATS_AUTH_USERNAME/PASSWORD");
    else if (cl->token) TRY(natsOptions_SetToken(o, cl->token), "NATS_AUTH_TOKEN");
    else if (use_nkey) TRY(natsOptions_SetNKey(o, cl->nkey_pub, sign_nonce, cl), "NATS_AUTH_NKEY");
    else if (cl->creds) TRY(natsOptions_SetUserCredentialsFromFiles(o, cl->creds, NULL), "NATS_AUTH_CREDENTIALS_FILE");
    cl->auth = cl->user && cl->password ? "NATS_AUTH_USERNAME/PASSWORD"
               : cl->token              ? "NATS_AUTH_TOKEN"
               : use_nkey               ? "NATS_AUTH_NKEY"
               : cl->creds              ? "NATS_AUTH_CREDENTIALS_FILE"
                                        : "no credentials";
    if (s != NATS_OK) {
        snprintf(err, errlen, "NATS options (%s): %s", what, nats_GetLastError(NULL));
        natsOptions_Destroy(o);
        bt_nats_client_free(cl);
        return NULL;
    }
    cl->opts = o;
    return cl;
}

natsOptions *bt_nats_client_options(bt_nats_client *cl) { return cl->opts; }

const char *bt_nats_client_auth(const bt_nats_client *cl) { return cl->auth; }

natsStatus bt_nats_client_connect(bt_nats_client *cl, natsConnection **out) {
    natsConnection *nc = NULL;
    natsStatus s;
    for (int attempt = 1;; attempt++) {
        unsigned refusals = atomic_load(&cl->sig_refusals);
        s = natsConnection_Connect(&nc, cl->opts);
        /* When this first attempt reaches the server and fails its handshake, nats.c gives up on
         * it for good; after a signature kept back by sign_nonce a new connection (a new nonce)
         * is what is needed. (With retry-on-failed-connect the failure is NATS_NOT_YET_CONNECTED
         * and nc exists; without, it is the handshake's error.) */
        if (s == NATS_OK || atomic_load(&cl->sig_refusals) == refusals || attempt == 8) break;
        natsConnection_Destroy(nc);
        nc = NULL;
    }
    *out = nc;
    return s;
}

/* The event plane's own additions: its backoff, its reconnect buffer, the asynchronous first
 * connect, and above all the libuv loop that drives the socket. */
static bool make_options(bt_events *e, char *err, size_t errlen) {
    e->cl = bt_nats_client_new(&e->c, err, errlen);
    if (!e->cl) return false;
    natsOptions *o = e->cl->opts;
    natsStatus s = NATS_OK;
    const char *what = "";
    TRY(natsOptions_SetCustomReconnectDelay(o, reconnect_delay, e), "reconnect delay");
    TRY(natsOptions_SetReconnectBufSize(o, RECONNECT_BUF), "reconnect buffer");
    TRY(natsOptions_SetIOBufSize(o, READ_BYTES), "I/O buffer");
    TRY(natsOptions_SetRetryOnFailedConnect(o, true, on_connected, NULL), "retry on failed connect");
    TRY(natsOptions_SetSendAsap(o, true), "send asap");
    TRY(natsOptions_SetErrorHandler(o, on_async_error, NULL), "error handler");
    TRY(natsOptions_SetClosedCB(o, on_closed, e), "closed callback");
    TRY(natsOptions_SetEventLoop(o, e, ev_attach, ev_read, ev_write, ev_detach), "event loop");
    if (s != NATS_OK) {
        snprintf(err, errlen, "NATS options (%s): %s", what, nats_GetLastError(NULL));
        bt_nats_client_free(e->cl);
        e->cl = NULL;
        return false;
    }
    return true;
}

/* ---- public ---- */

bt_status bt__events_nats_create(uv_loop_t *loop, const bt_events_config *c, bt_events **out, char *err,
                                 size_t errlen) {
    bt_events *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    e->loop = loop;
    STAILQ_INIT(&e->ops);
    e->loop_thread = uv_thread_self();
    e->c = *c;
    size_t sl = strlen(c->ns) + 32;
    e->subject = malloc(sl);
    if (e->subject) snprintf(e->subject, sl, "namespace.%s.kv_metrics", c->ns);
    e->url = strdup(c->nats_server);
    e->name = strdup(c->name ? c->name : "baton");
    e->c.nats_server = e->url;
    e->c.name = e->name;
    e->c.ns = NULL;
    atomic_init(&e->up, false);
    if (!e->subject || !e->url || !e->name || uv_mutex_init(&e->op_mu) != 0) {
        free(e->subject);
        free(e->url);
        free(e->name);
        free(e);
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    /* the credentials are copied into e->cl; e->c keeps none of the caller's pointers */
    bool ok = make_options(e, err, errlen);
    e->c.user = e->c.password = e->c.token = e->c.nkey = e->c.creds_file = NULL;
    if (!ok) {
        uv_mutex_destroy(&e->op_mu);
        free(e->subject);
        free(e->url);
        free(e->name);
        free(e);
        return BT_ERR_INVALID;
    }
    uv_async_init(loop, &e->async, on_async);
    uv_timer_init(loop, &e->kick);
    uv_timer_init(loop, &e->debounce);
    e->async.data = e->kick.data = e->debounce.data = e;
    e->work.data = e;
    bt_closer_init(&e->closer, events_free, e);
    /* connecting starts on the next loop iteration, so that a frontend can subscribe first */
    reg_add(e);
    uv_timer_start(&e->kick, on_kick, 0, 0);
    BT_INFO("event plane: NATS at %s, subject %s", e->url, e->subject);
    *out = e;
    return BT_OK;
}

bt_status bt_events_subscribe_load(bt_events *e, bt_events_load_cb cb, void *ud) {
    if (!e) return BT_OK;
    if (e->cb || e->state != ST_IDLE) return BT_ERR_INVALID;
    inbox *in = calloc(1, sizeof *in);
    if (!in || uv_mutex_init(&in->mu) != 0) {
        free(in);
        return BT_ERR_NOMEM;
    }
    STAILQ_INIT(&in->msgs);
    in->async = &e->async;
    in->cap = e->c.max_queued_msgs;
    in->refs = 1;
    e->in = in;
    e->cb = cb;
    e->cb_ud = ud;
    return BT_OK;
}

void bt_events_publish_load(bt_events *e, uint64_t worker_id, const bt_load_report *r) {
    if (!e || e->state == ST_CLOSING || e->state == ST_CLOSED) return;
    e->pending = true;
    e->pending_id = worker_id;
    e->pending_r = *r;
    if (!uv_is_active((uv_handle_t *)&e->debounce)) uv_timer_start(&e->debounce, on_debounce, e->c.debounce_ms, 0);
}

void bt_events_get_stats(const bt_events *e, bt_events_stats *s) {
    memset(s, 0, sizeof *s);
    if (!e) return;
    *s = e->st;
    s->connected = e->live;
    if (e->in) {
        uv_mutex_lock(&e->in->mu);
        s->overflow = e->in->overflow;
        s->invalid += e->in->too_big;
        uv_mutex_unlock(&e->in->mu);
    }
}

const char *bt_events_plane(const bt_events *e) { return e ? "nats" : "direct"; }

void bt_events_close(bt_events *e, void (*done)(void *ud), void *ud) {
    if (!e) {
        if (done) done(ud);
        return;
    }
    if (e->state == ST_CLOSING || e->state == ST_CLOSED) return;
    reg_remove(e); /* from now on our own close is under way: on_closed keeps quiet */
    bool idle = e->state == ST_IDLE;
    e->state = ST_CLOSING;
    e->done = done;
    e->done_ud = ud;
    uv_timer_stop(&e->kick);
    uv_timer_stop(&e->debounce);
    publish_now(e); /* the last word, e.g. a draining worker's ready=false */
    if (idle || !e->work_busy) close_step(e);
    /* else after_connect continues */
}
