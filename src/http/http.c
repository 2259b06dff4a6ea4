/* http.c — baton's HTTP/1.1 server (see http.h): a libuv TCP listener, one http_parser per
 * connection with a strict scan of the framing beside it (frame_scan), capped request collection,
 * whole and chunked responses with write-backlog accounting, and per-connection timeouts driven
 * by a single uv_timer.
 *
 * A connection is a small state machine: READING (parsing the next request, or idle between
 * requests), IN_FLIGHT (the handler owns the request; bytes that arrive are buffered unparsed up
 * to a cap, and past it dropped along with the rest of the connection's input, which then closes
 * after the in-flight response: reading never stops, so EOF is always noticed and reported as
 * on_abort) and LINGER (the last response is
 * out, the write side is shut down and input is discarded until the peer closes, so that a
 * client still sending a rejected body sees our answer instead of a reset). Nothing is freed
 * inside a callback of the object being freed: connections are uv_close'd and freed in the last
 * close callback, which is also where a pending on_abort is delivered. That keeps every API
 * entry point (respond, stream_write, ...) safe to call from any handler callback, including
 * on_request itself, and means on_abort is never re-entered from inside a handler's own call. */
#include "http/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/closer.h"
#include "common/log.h"
#include "common/pool.h"
#include "common/util.h"

/* on_drain fires when the backlog falls under LOW_WATER after having exceeded HIGH_WATER. */
#define HIGH_WATER (256u * 1024u)
#define LOW_WATER (64u * 1024u)
/* Reads land in one server-wide buffer: callbacks run one at a time on the loop and every read is
 * consumed (parsed or copied) before the callback returns. */
#define READ_BUF_SIZE (64u * 1024u)
/* Closed connections kept for the next accepts (common/pool.h says why): enough for a burst of a
 * few thousand connections, ~1.1 KiB each; bt_http_server_release_kept frees them. */
#define CONN_POOL_CAP 4096u
/* Pipelined bytes that arrive while a request is in flight are kept up to this much. Beyond it
 * the connection stops taking requests: what is buffered and everything that follows is read and
 * dropped, and the connection closes after the in-flight response (a pipelining client must be
 * ready to resend what a closed connection did not answer, RFC 9112 §9.3.2). Reading must not
 * pause instead: a client that closes its socket would then never be noticed, and its request
 * would run for nobody. Between two requests (the parse of buffered bytes waits one loop turn)
 * one more read may land, hence the + READ_BUF_SIZE of the buffer's hard cap. */
#define PIPELINE_SOFT_CAP (64u * 1024u)
/* After the final response of a connection, how long we wait for the peer to close (restarted on
 * write progress). Capped by idle_timeout_ms when that is smaller. */
#define LINGER_MS 5000u
/* At most one WARN per this many ms for connections refused over max_connections: a flood of
 * them must not flood the log (each is counted in stats.max_connections). */
#define REJECT_LOG_MS 10000u
/* Response header sections we build (status line + caller's extra headers). */
#define OUT_HEADER_CAP (64u * 1024u)
#define HDR_NAME_MAX 32

typedef enum { CS_READING = 0, CS_IN_FLIGHT, CS_LINGER } conn_state;

/* What the connection's one timer currently means. */
typedef enum { TM_NONE = 0, TM_IDLE, TM_HEADER, TM_RESUME, TM_LINGER } timer_mode;

/* The request headers baton looks at. */
enum {
    H_REQUEST_ID = 0,
    H_AUTHORIZATION,
    H_CONTENT_TYPE,
    H_EXPECT,
    H_LAST_EVENT_ID,
    H_PRIORITY,
    H_TENANT,
    H_ORIGIN,
    H_AC_REQUEST_METHOD,
    H_AC_REQUEST_HEADERS,
    H_TRANSFER_ENCODING,
    H_HOST,
    H_COUNT
};
static const char *const interesting_headers[H_COUNT] = {
    "x-request-id", "authorization", "content-type", "expect", "last-event-id", "x-priority", "x-tenant", "origin",
    "access-control-request-method", "access-control-request-headers", "transfer-encoding", "host"};

typedef struct conn conn;

/* One server's place in bt_http_output_peers (http.h). largest and owed are written with plain
 * atomics: the server's loop keeps largest, other loops read it and reserve in owed only when a
 * write would pass the total; srv, under mu, is taken only to ask a cut, so that a server being
 * closed on its own thread is never signalled after its handle is gone. */
typedef struct {
    atomic_size_t largest; /* at least the server's largest backlog, at most twice it (peer_shrank) */
    atomic_size_t owed;    /* bytes other loops admitted past the total against a cut asked here */
    atomic_int asker;      /* the loop that asked last, for the log */
    uv_mutex_t mu;
    bt_http_server *srv; /* under mu: NULL before start and from close on */
} peer_slot;

struct bt_http_output_peers {
    int n;
    peer_slot slot[];
};

struct bt_http_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_timer_t aux; /* never started; closed by bt_http_server_close so completion is always async */
    bt_http_config cfg;
    bt_http_handlers h;
    void *ud;
    int port;
    LIST_HEAD(, conn) conns; /* every connection not yet freed */
    size_t nconns, ninflight, nrejecting;
    bt_http_stats stats;
    bool listener_closing, listener_closed, aux_closed, closing;
    uint64_t reject_logged_ms; /* when the last max_connections WARN was logged */
    bool nofd_logged;          /* the same for accept failures for want of descriptors */
    uint64_t nofd_logged_ms, nofd_quiet;
    uint64_t reject_quiet;     /* refusals since then that were counted but not logged */
    bool reject_logged;
    void (*done)(void *ud);
    void *done_ud;
    bt_pool conn_pool; /* closed connections' memory, for the next accepts */
    atomic_size_t own_bodies; /* body bytes charged (max_body_total) when no counter is shared */
    atomic_size_t *bodies;    /* cfg.shared_bodies, or &own_bodies */
    atomic_size_t own_output; /* queued response bytes (max_output_total) when none is shared */
    atomic_size_t *output;    /* cfg.shared_output, or &own_output */
    peer_slot *peer;          /* this server's slot of cfg.output_peers, or NULL */
    uv_async_t cut_async;     /* with peer: another loop asks for our largest backlog to be closed */
    bool cut_async_closed;
    conn *big;                /* with peer: the connection whose backlog peer->largest published */
    size_t big_pub;           /* what it published */
    char *allowed_hosts;      /* cfg.allowed_hosts, copied (bt_http_host_allowed) */
    bool loopback;            /* listening on a loopback address */
    bt_log_limit host_log;    /* the log lines of Host refusals */
    char rbuf[READ_BUF_SIZE];
};

/* Where frame_scan is in a request's framing bytes (frame_scan says what it checks). */
enum {
    FS_START,         /* before the request line, where blank lines are skipped */
    FS_START_CR,      /* a CR there: LF must follow */
    FS_LINE,          /* in the request line, a header line or a trailer line */
    FS_LINE_CR,       /* a CR in it: LF must follow */
    FS_LINE_START,    /* at the start of a header or trailer line, or of the blank line after them */
    FS_LINE_START_CR, /* a CR there: the blank line, if LF follows */
    FS_HEAD_END,      /* the header section ended: what follows is framed as the parser read the headers */
    FS_BODY,          /* a body of Content-Length bytes: not scanned */
    FS_SIZE_START,    /* the first hex digit of a chunk size */
    FS_SIZE,          /* its further digits */
    FS_EXT,           /* a chunk extension, up to its CR */
    FS_SIZE_LF,       /* the CR of a chunk-size line seen: LF */
    FS_DATA,          /* chunk_left bytes of chunk data: not scanned */
    FS_DATA_CR,       /* the CRLF after chunk data */
    FS_DATA_LF,       /* and its LF */
    FS_MSG_END,       /* the message ended: the next one is scanned once the parser is there */
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown;
    bt_http_server *srv;
    LIST_ENTRY(conn) link; /* bt_http_server.conns */
    http_parser parser;
    conn_state state;
    timer_mode tmode;
    bt_closer closer;  /* the two handles' closes, then conn_closed */
    bool closing;      /* uv_close issued; the connection is gone for every purpose but memory */
    bool reading;      /* uv_read_start is in effect */
    /* parsing of the current request */
    bool in_message;   /* on_message_begin seen, message not yet complete */
    bool msg_complete; /* the parser paused on a complete message that awaits dispatch */
    bool headers_done;
    bool hdr_in_value;
    bool keep_alive, is_head, http10;
    int err_status; /* 400 / 413 / 431 / 501 / 505 chosen by a parser callback that failed on purpose */
    uint8_t frame;  /* frame_scan's place in the current request's framing (FS_*) */
    bool frame_trailers; /* frame_scan's lines are the trailer section's */
    uint64_t chunk_left; /* frame_scan: the chunk size being read (FS_SIZE), or its data bytes left (FS_DATA) */
    const char *err_why; /* with err_status 400: what was malformed (a static string) */
    bool req_filled; /* req holds this request's method, path and headers (req_fill) */
    unsigned n_host;     /* Host header lines of the current request (RFC 9112 §3.2) */
    int cur_hdr;    /* index into interesting_headers of the header being read, or -1 */
    size_t hdr_bytes;
    char hdr_name[HDR_NAME_MAX];
    size_t hdr_name_len;
    bool hdr_name_long;
    bool have_hdr[H_COUNT];
    bt_buf hdr[H_COUNT];
    bt_buf url, body;
    size_t body_charged; /* bytes of this connection's body charged against max_body_total */
    bt_buf pending; /* pipelined bytes received while a request was in flight */
    bool discarding; /* pipelined input overflowed: drop all input, close after the response */
    /* the response */
    bool req_active; /* the handler owns req: dispatched, not ended, not aborted */
    bool resp_started, streaming, raw_stream;
    size_t backlog; /* bytes handed to uv_write and not yet written */
    char *held_head; /* a streamed response's head, written with the next bytes (stream_begin_held) */
    size_t held_head_len;
    bool above_high;
    bt_buf resp_hdrs; /* bt_http_set_headers: every response to the current request carries these */
    bt_http_req req;
};

typedef struct {
    uv_write_t req;
    conn *c;
    size_t len;
    char data[];
} wreq;

typedef struct {
    uv_tcp_t tcp;
    bt_http_server *srv;
} reject_conn;

#define REQ_CONN(r) ((conn *)(void *)((char *)(r) - offsetof(conn, req)))

static void conn_close(conn *c);
static void body_release(conn *c);
static void conn_linger(conn *c);
static void conn_resume(conn *c);
static bool conn_ask_expect(conn *c);
static void req_finish(conn *c);
static void server_maybe_finish(bt_http_server *s);
static void peer_grew(conn *c);
static void peer_shrank(conn *c);

/* ---------------------------------------------------------------------------------------------
 * Small helpers */

static bool addr_loopback(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family != AF_INET6) return false;
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

bool bt_http_addr_loopback(const char *addr) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    if (!addr ||
        (uv_ip4_addr(addr, 0, (struct sockaddr_in *)&ss) != 0 && uv_ip6_addr(addr, 0, (struct sockaddr_in6 *)&ss) != 0))
        return false;
    return addr_loopback((const struct sockaddr *)&ss);
}

/* Reads a Host value as host[:port] (RFC 9110 §7.2; the port may be empty): its name, without the
 * port, and without a final dot unless it is an IP literal; *ip when it is an IPv4 address or an
 * IPv6 one in brackets. False when it is not that shape ("::1" without brackets, "a:b"). */
static bool host_split(const char *host, const char **name, size_t *nlen, bool *ip) {
    const char *port;
    char buf[INET6_ADDRSTRLEN + 1];
    *ip = false;
    if (host[0] == '[') {
        const char *close = strchr(host, ']');
        size_t n = close ? (size_t)(close - host - 1) : 0;
        struct in6_addr a6;
        if (n == 0 || n >= sizeof buf) return false;
        memcpy(buf, host + 1, n);
        buf[n] = '\0';
        if (inet_pton(AF_INET6, buf, &a6) != 1) return false;
        *ip = true;
        *name = host + 1;
        *nlen = n;
        port = close + 1;
    } else {
        size_t n = strcspn(host, ":");
        struct in_addr a4;
        *name = host;
        *nlen = n;
        port = host + n;
        if (n < sizeof buf) {
            memcpy(buf, host, n);
            buf[n] = '\0';
            *ip = inet_pton(AF_INET, buf, &a4) == 1; /* dotted quad only, as browsers write it */
        }
        if (!*ip && n > 1 && host[n - 1] == '.') (*nlen)--; /* "example.com." is example.com */
    }
    if (*port && *port++ != ':') return false;
    for (; *port; port++)
        if (*port < '0' || *port > '9') return false;
    return true;
}

/* The authority of an absolute-form request target ("http://evil.example/v1/models"): RFC 9112
 * §3.2.2 has a server take the request's host from it, not from Host, so the Host rule reads it
 * too. False for any other form; an authority longer than `cap` is cut (and then refused, unless
 * the rule is off). */
static bool target_authority(const bt_buf *url, char *out, size_t cap) {
    const char *u = url->data;
    if (!u || !url->len) return false;
    size_t skip = strncasecmp(u, "http://", 7) == 0 ? 7 : strncasecmp(u, "https://", 8) == 0 ? 8 : 0;
    if (!skip) return false;
    size_t n = strcspn(u + skip, "/?#");
    if (n >= cap) n = cap - 1;
    memcpy(out, u + skip, n);
    out[n] = '\0';
    return true;
}

/* name[0..n) is `suffix` or a name under it (ASCII case ignored) */
static bool name_under(const char *name, size_t n, const char *suffix, size_t slen, bool subdomains) {
    if (n == slen && strncasecmp(name, suffix, n) == 0) return true;
    return subdomains && n > slen + 1 && name[n - slen - 1] == '.' && strncasecmp(name + n - slen, suffix, slen) == 0;
}

bool bt_http_host_allowed(const char *allowed, bool loopback, const char *host) {
    if (!host || !*host) return true; /* HTTP/1.0 without one: no browser leaves it out */
    if (!allowed && !loopback) return true;
    const char *e;
    size_t elen;
    for (const char *pos = allowed; bt_list_next(&pos, &e, &elen);)
        if (elen == 1 && *e == '*') return true;
    const char *name;
    size_t n;
    bool ip;
    if (!host_split(host, &name, &n, &ip)) return false;
    /* an address names this machine, not a page's origin; *.localhost resolves to loopback in the
     * browser itself (RFC 6761 §6.3), never through a DNS answer a page's owner could change */
    if (ip || name_under(name, n, "localhost", 9, true)) return true;
    for (const char *pos = allowed; bt_list_next(&pos, &e, &elen);) {
        bool sub = elen > 1 && *e == '.';
        if (sub) e++, elen--;
        if (elen > 1 && e[elen - 1] == '.') elen--;
        if (name_under(name, n, e, elen, sub)) return true;
    }
    return false;
}

bool bt_http_hosts_valid(const char *flag, const char *list, char *err, size_t errlen) {
    if (!list) return true;
    const char *e;
    size_t n;
    bool any = false;
    for (const char *pos = list; bt_list_next(&pos, &e, &n);) {
        bool ok = n == 1 && *e == '*';
        if (!ok && n > 0 && !(n == 1 && *e == '.')) {
            ok = true;
            for (size_t i = 0; i < n && ok; i++)
                ok = (e[i] >= 'a' && e[i] <= 'z') || (e[i] >= 'A' && e[i] <= 'Z') || (e[i] >= '0' && e[i] <= '9') ||
                     e[i] == '-' || e[i] == '_' || e[i] == '.';
        }
        if (!ok) {
            snprintf(err, errlen,
                     "%s: '%.*s' is not a host name: give names (api.example.com, or .example.com for it and every "
                     "name under it) without scheme, port or path, or *, comma-separated; IP addresses are always "
                     "served and need not be listed",
                     flag, n > 100 ? 100 : (int)n, e);
            return false;
        }
        any = true;
    }
    if (!any) {
        snprintf(err, errlen,
                 "%s is given empty: leave it out for the default (on a loopback address, localhost and IP addresses "
                 "only; on any other, every name)",
                 flag);
        return false;
    }
    return true;
}

const char *bt_http_reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return status >= 500 ? "Server Error" : status >= 400 ? "Client Error" : "Unknown";
    }
}

void bt_http_config_default(bt_http_config *c) {
    c->host = "0.0.0.0";
    c->port = 8000;
    c->max_header_bytes = 16u * 1024u;
    c->max_body_bytes = 4u * 1024u * 1024u;
    c->idle_timeout_ms = 60000;
    c->header_timeout_ms = 30000;
    c->max_connections = 10000;
    c->write_backlog_max = 8u * 1024u * 1024u;
    c->reuse_port = false;
    c->reuse_port_first = false;
    c->shared_conns = NULL;
    c->max_body_total = 0;
    c->shared_bodies = NULL;
    c->max_output_total = 0;
    c->shared_output = NULL;
    c->output_peers = NULL;
    c->output_peer = 0;
    c->allowed_hosts = NULL;
}

static uint64_t timer_ms(const conn *c, timer_mode m) {
    const bt_http_config *cfg = &c->srv->cfg;
    switch (m) {
    case TM_IDLE: return cfg->idle_timeout_ms;
    case TM_HEADER: return cfg->header_timeout_ms;
    case TM_LINGER:
        return cfg->idle_timeout_ms && cfg->idle_timeout_ms < LINGER_MS ? cfg->idle_timeout_ms : LINGER_MS;
    default: return 0;
    }
}

static void on_timer(uv_timer_t *t);

/* Gives the connection's timer a new meaning. A zero timeout disables IDLE/HEADER timers; RESUME
 * always fires on the next loop iteration. */
static void conn_timer(conn *c, timer_mode m) {
    if (c->closing) return;
    uint64_t ms = timer_ms(c, m);
    if (m == TM_NONE || (m != TM_RESUME && ms == 0)) {
        c->tmode = TM_NONE;
        uv_timer_stop(&c->timer);
        return;
    }
    c->tmode = m;
    uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
    (void)suggested;
    conn *c = h->data;
    b->base = c->srv->rbuf;
    b->len = sizeof c->srv->rbuf;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

/* Reads always, except for the one loop turn between a response and the parse of a full pending
 * buffer (conn_resume). While a request is in flight or the connection lingers, reading goes on
 * whatever is buffered: that is how a client that goes away is noticed. */
static void conn_update_reading(conn *c) {
    if (c->closing) return;
    bool want = c->state != CS_READING || c->pending.len < PIPELINE_SOFT_CAP;
    if (want && !c->reading) {
        int r = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        if (r < 0) {
            BT_DEBUG("http: read_start: %s", uv_strerror(r));
            conn_close(c);
            return;
        }
        c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Writing */

static void on_write(uv_write_t *r, int status) {
    wreq *w = (wreq *)(void *)r;
    conn *c = w->c;
    c->backlog -= w->len;
    /* the kernel took these bytes: their charge goes back (a closing connection gave back all of
     * its backlog in conn_close) */
    if (c->srv->cfg.max_output_total && !c->closing) {
        atomic_fetch_sub(c->srv->output, w->len);
        peer_shrank(c);
    }
    free(w);
    if (c->closing) return; /* UV_ECANCELED while closing, or the connection already failed */
    if (status < 0) {
        BT_DEBUG("http: write failed: %s", uv_strerror(status));
        conn_close(c);
        return;
    }
    /* Progress on a slow reader is not idleness. */
    if (c->tmode == TM_IDLE || c->tmode == TM_LINGER) conn_timer(c, c->tmode);
    if (c->above_high && c->backlog < LOW_WATER) {
        c->above_high = false;
        if (c->req_active && c->srv->h.on_drain) c->srv->h.on_drain(c->srv->ud, &c->req);
    }
}

/* The connection of this server with the largest write backlog, or NULL if none has any. */
static conn *largest_backlog(bt_http_server *s) {
    conn *big = NULL;
    for (conn *c = LIST_FIRST(&s->conns); c; c = LIST_NEXT(c, link))
        if (!c->closing && c->backlog && (!big || c->backlog > big->backlog)) big = c;
    return big;
}

/* ---- the largest backlog of every loop (bt_http_output_peers) ----
 *
 * A server with peers publishes in its slot's largest a bound on its largest backlog: raised at
 * once when a connection's backlog passes it (peer_grew, one compare on a write that queues), and
 * rescanned only when the connection that set it falls under half of it or closes (peer_shrank),
 * so a connection draining its queue costs a scan each time it halves, not one per write. The
 * published value is thus at least the largest backlog and at most twice it: another loop may ask
 * for a cut that frees less than it counted on (the cut then goes on to the next largest while
 * the total is still over, on_cut_async), or ask this loop while its own largest is larger than
 * ours (by less than a factor two). A writer is still cut when every byte another loop's pending cut will
 * free is already spoken for (peer_cut_elsewhere): the total stays bounded first. */

static void peer_publish(bt_http_server *s, conn *big) {
    s->big = big;
    s->big_pub = big ? big->backlog : 0;
    atomic_store_explicit(&s->peer->largest, s->big_pub, memory_order_relaxed);
}

/* c's backlog grew. */
static void peer_grew(conn *c) {
    bt_http_server *s = c->srv;
    if (s->peer && c->backlog > s->big_pub) peer_publish(s, c);
}

/* c's backlog shrank, or c is closing. */
static void peer_shrank(conn *c) {
    bt_http_server *s = c->srv;
    if (!s->peer || c != s->big) return;
    if (s->closing) peer_publish(s, NULL); /* every connection is closing: no scan for each */
    else if (c->closing || c->backlog < s->big_pub / 2) peer_publish(s, largest_backlog(s));
}

/* The write of n bytes by c would pass the total and mine is the largest backlog this loop could
 * close for it (c's own with n, or a larger one's): if another loop publishes a larger one, n is
 * reserved against it and that loop asked to close it. True when n may be queued past the total. */
static bool peer_cut_elsewhere(bt_http_server *s, size_t mine, size_t n) {
    bt_http_output_peers *p = s->cfg.output_peers;
    peer_slot *far = NULL;
    size_t far_size = mine;
    for (int i = 0; i < p->n; i++) {
        size_t l = atomic_load_explicit(&p->slot[i].largest, memory_order_relaxed);
        if (&p->slot[i] != s->peer && l > far_size) {
            far = &p->slot[i];
            far_size = l;
        }
    }
    if (!far) return false;
    /* what the loops asked admit against one cut stays within what it frees */
    size_t owed = atomic_load(&far->owed);
    do {
        if (owed + n > far_size || owed + n < n) return false;
    } while (!atomic_compare_exchange_weak(&far->owed, &owed, owed + n));
    atomic_store_explicit(&far->asker, s->cfg.output_peer, memory_order_relaxed);
    uv_mutex_lock(&far->mu);
    bool open = far->srv != NULL;
    if (open) uv_async_send(&far->srv->cut_async); /* under the lock: its close waits for it */
    uv_mutex_unlock(&far->mu);
    if (!open) { /* closing: its connections give their backlogs back, no cut is needed */
        atomic_fetch_sub(&far->owed, n);
        return false;
    }
    BT_DEBUG("http: %zu bytes queued for clients (limit %zu, --max-output-bytes-total); admitting %zu more until "
             "event loop %d closes its largest backlog (%zu bytes), larger than any on this one (event loop %d)",
             atomic_load(s->output), s->cfg.max_output_total, n, (int)(far - p->slot), far_size,
             s->cfg.output_peer);
    return true;
}

/* Another loop admitted bytes past the total against our largest backlog: it is closed, and the
 * next largest after it while the total is still over, until the bytes owed are freed. Nothing is
 * closed when the kernel took enough meanwhile (the total is back within the cap). */
static void on_cut_async(uv_async_t *h) {
    bt_http_server *s = h->data;
    peer_slot *me = s->peer;
    size_t cap = s->cfg.max_output_total, owed;
    while ((owed = atomic_load(&me->owed)) > 0) {
        size_t left = owed, before;
        while (left && !s->closing && (before = atomic_load(s->output)) > cap) {
            conn *hog = largest_backlog(s);
            if (!hog) break;
            size_t freed = hog->backlog;
            BT_WARN("http: %zu bytes queued for clients (limit %zu, --max-output-bytes-total); closing the connection "
                    "with the largest backlog of all event loops, on this one (event loop %d, %zu bytes), the client "
                    "furthest behind, for a write on event loop %d",
                    before, cap, s->cfg.output_peer, freed, atomic_load_explicit(&me->asker, memory_order_relaxed));
            s->stats.output_budget++;
            conn_close(hog); /* gives its backlog's charge back at once */
            left = freed >= left ? 0 : left - freed;
        }
        atomic_fetch_sub(&me->owed, owed);
    }
}

bt_http_output_peers *bt_http_output_peers_new(int n) {
    if (n < 1) return NULL;
    bt_http_output_peers *p = calloc(1, sizeof *p + (size_t)n * sizeof p->slot[0]);
    if (!p) return NULL;
    p->n = n;
    for (int i = 0; i < n; i++) uv_mutex_init(&p->slot[i].mu);
    return p;
}

void bt_http_output_peers_free(bt_http_output_peers *p) {
    if (!p) return;
    for (int i = 0; i < p->n; i++) uv_mutex_destroy(&p->slot[i].mu);
    free(p);
}

/* Charges n more queued bytes of c against max_output_total. The per-connection cap
 * (write_backlog_max) alone bounds nothing: every client that opens a long stream and never reads
 * holds up to it, 20,000 of them 160 GB. When the charge would pass the total, a connection is
 * closed to make room, and it is the one with the LARGEST backlog, not simply the writer: the
 * writer may be a client that reads well and queued a few KiB in a burst while the budget is
 * full of clients that read nothing; cutting it would let the hogs starve every good reader,
 * whereas the largest backlog is the client furthest behind, the one a cut costs least (its
 * stream stays journaled and resumable) and frees most. The scan covers this server's
 * connections (one event loop: the others' are not ours to touch). With output_peers (several
 * loops), a larger backlog another loop publishes is closed instead, by that loop on its next
 * turn (peer_cut_elsewhere, on_cut_async): meanwhile this write is admitted past the total, by
 * at most what that cut will free. The writer is cut when none here or there has more queued
 * than it would have. False when c was closed. Runs only for bytes that are queued (never for
 * writes the socket took at once): one atomic add, and the scans only at the limit. */
static bool output_charge(conn *c, size_t n) {
    bt_http_server *s = c->srv;
    size_t cap = s->cfg.max_output_total;
    if (!cap) return true;
    for (;;) {
        size_t before = atomic_fetch_add(s->output, n);
        if (before + n <= cap && before + n >= n) return true;
        atomic_fetch_sub(s->output, n);
        conn *hog = n > cap ? c : largest_backlog(s); /* more than the total at once: no room helps */
        if (!hog || hog->backlog <= c->backlog + n) hog = c;
        size_t mine = hog == c ? c->backlog + n : hog->backlog;
        if (s->peer && n <= cap && peer_cut_elsewhere(s, mine, n)) {
            atomic_fetch_add(s->output, n);
            return true;
        }
        BT_WARN("http: %zu bytes queued for clients (limit %zu, --max-output-bytes-total); closing the connection "
                "with the largest backlog on this event loop (%zu bytes), the client furthest behind",
                before, cap, mine);
        s->stats.output_budget++;
        conn_close(hog); /* gives its backlog's charge back at once */
        if (hog == c) return false;
    }
}

/* Writes bufs in order: as much as the socket takes now (uv_try_write), the rest copied into one
 * queued uv_write. Returns false, and closes the connection, on a write error or when the queue
 * would exceed write_backlog_max (a client that does not read); one write onto an empty queue is
 * always accepted so a large whole response can still go out. */
static bool conn_write(conn *c, const uv_buf_t *bufs, unsigned n) {
    if (c->closing) return false;
    if (c->held_head) { /* a stream's held head (bt_http_stream_begin_held) goes first, same write */
        uv_buf_t v[5];
        unsigned k = n < 4 ? n : 0; /* more parts than fit here: the head goes in a write of its own */
        v[0] = uv_buf_init(c->held_head, (unsigned)c->held_head_len);
        if (k) memcpy(v + 1, bufs, k * sizeof *bufs);
        char *head = c->held_head;
        c->held_head = NULL;
        bool ok = conn_write(c, v, k + 1); /* a part not written now is copied into the queue */
        free(head);
        if (!ok || k == n) return ok;
    }
    size_t total = 0;
    for (unsigned i = 0; i < n; i++) total += bufs[i].len;
    if (total == 0) return true;
    size_t done = 0;
    if (c->backlog == 0) {
        int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
        if (r >= 0) {
            done = (size_t)r;
        } else if (r != UV_EAGAIN) {
            BT_DEBUG("http: write failed: %s", uv_strerror(r));
            conn_close(c);
            return false;
        }
    }
    if (done == total) return true;
    size_t rest = total - done;
    if (c->backlog > 0 && (c->backlog + rest > c->srv->cfg.write_backlog_max || c->backlog + rest < rest)) {
        BT_WARN("http: client is not reading (%zu bytes queued, limit %zu); closing the connection",
                c->backlog + rest, c->srv->cfg.write_backlog_max);
        c->srv->stats.slow_reader++;
        conn_close(c);
        return false;
    }
    if (!output_charge(c, rest)) return false;
    wreq *w = malloc(sizeof *w + rest);
    if (!w) {
        BT_ERROR("http: out of memory queueing %zu bytes", rest);
        if (c->srv->cfg.max_output_total) atomic_fetch_sub(c->srv->output, rest);
        conn_close(c);
        return false;
    }
    w->c = c;
    w->len = rest;
    size_t skip = done, off = 0;
    for (unsigned i = 0; i < n; i++) {
        size_t len = bufs[i].len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        memcpy(w->data + off, bufs[i].base + skip, len - skip);
        off += len - skip;
        skip = 0;
    }
    uv_buf_t b = uv_buf_init(w->data, (unsigned)rest);
    int r = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (r < 0) {
        free(w);
        if (c->srv->cfg.max_output_total) atomic_fetch_sub(c->srv->output, rest);
        BT_DEBUG("http: write failed: %s", uv_strerror(r));
        conn_close(c);
        return false;
    }
    c->backlog += rest;
    peer_grew(c);
    if (c->backlog > HIGH_WATER) c->above_high = true;
    return true;
}

/* Answers a request we could not accept (400/413/431/501/505) with a JSON error body and closes. */
static void conn_error_close(conn *c, int status, const char *msg) {
    bt_buf body, head;
    bt_buf_init(&body, 4096);
    bt_buf_init(&head, 1024);
    bt_buf_append_str(&body, "{\"error\":{\"message\":\"");
    bt_buf_append_json_str(&body, msg, strlen(msg));
    /* OpenAI's error shape, as the frontend's own errors (a string code) */
    bt_buf_appendf(&body, "\",\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}",
                   status >= 500 ? "server_error" : "invalid_request_error",
                   status == 413   ? "request_too_large"
                   : status == 431 ? "headers_too_large"
                   : status == 501 ? "not_implemented"
                   : status == 505 ? "http_version_not_supported"
                   : status == 503 ? "too_many_request_bytes"
                   : status == 403 ? "host_not_allowed"
                                   : "malformed_request");
    bt_buf_appendf(&head,
                   "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                   "%sConnection: close\r\n\r\n",
                   status, bt_http_reason(status), body.len, status == 503 ? "Retry-After: 1\r\n" : "");
    uv_buf_t bufs[2] = {uv_buf_init(head.data, (unsigned)head.len), uv_buf_init(body.data, (unsigned)body.len)};
    BT_DEBUG("http: %d: %s", status, msg);
    body_release(c); /* nothing more of it is kept: the connection lingers only to be read out */
    bt_buf_free(&c->body);
    if (status == 413) c->srv->stats.body_too_large++;
    else if (status == 431) c->srv->stats.header_too_large++;
    else if (status == 503) c->srv->stats.body_budget++;
    else if (status == 403) c->srv->stats.host_not_allowed++;
    else c->srv->stats.bad_request++;
    conn_write(c, bufs, 2);
    bt_buf_free(&body);
    bt_buf_free(&head);
    conn_linger(c);
}

/* ---------------------------------------------------------------------------------------------
 * Parser callbacks. They only collect; a complete message pauses the parser and is dispatched
 * after http_parser_execute returns, so the handler never runs inside the parser. */

/* Charges the connection's request body up to `want` bytes against max_body_total: false, with
 * nothing charged, when that would pass it. Bodies are what one client can make the server hold
 * by sending bytes: up to max_body_bytes on every connection, which alone is no bound (20,000
 * connections of 4 MiB are 80 GB); this one is over all connections (and servers sharing it).
 * A body is charged while it is being received (a declared Content-Length whole, from its
 * headers), and given back when it is dispatched, refused, or its connection closes. */
static bool body_charge(conn *c, size_t want) {
    bt_http_server *s = c->srv;
    if (!s->cfg.max_body_total || want <= c->body_charged) return true;
    size_t extra = want - c->body_charged;
    if (atomic_fetch_add(s->bodies, extra) + extra > s->cfg.max_body_total) {
        atomic_fetch_sub(s->bodies, extra);
        return false;
    }
    c->body_charged = want;
    return true;
}

/* The body is received (or dropped): its charge goes back. */
static void body_release(conn *c) {
    if (c->body_charged) atomic_fetch_sub(c->srv->bodies, c->body_charged);
    c->body_charged = 0;
}

static void conn_reset_request(conn *c) {
    c->headers_done = c->hdr_in_value = false;
    c->err_status = 0;
    c->err_why = NULL;
    c->req_filled = false;
    bt_buf_reset(&c->resp_hdrs);
    c->n_host = 0;
    c->cur_hdr = -1;
    c->hdr_bytes = 0;
    c->hdr_name_len = 0;
    c->hdr_name_long = false;
    for (int i = 0; i < H_COUNT; i++) {
        c->have_hdr[i] = false;
        bt_buf_reset(&c->hdr[i]);
    }
    bt_buf_reset(&c->url);
    /* Do not let one large body pin memory on an idle keep-alive connection. */
    if (c->body.alloc > 64u * 1024u) bt_buf_free(&c->body);
    bt_buf_reset(&c->body);
    body_release(c);
}

static bool count_header_bytes(conn *c, size_t n) {
    c->hdr_bytes += n;
    if (c->hdr_bytes > c->srv->cfg.max_header_bytes) {
        c->err_status = 431;
        return false;
    }
    return true;
}

static int cb_message_begin(http_parser *p) {
    conn *c = p->data;
    conn_reset_request(c);
    c->in_message = true;
    conn_timer(c, TM_HEADER);
    return 0;
}

static int cb_url(http_parser *p, const char *at, size_t len) {
    conn *c = p->data;
    if (!count_header_bytes(c, len) || bt_buf_append(&c->url, at, len) != BT_OK) {
        c->err_status = 431;
        return -1;
    }
    return 0;
}

static int cb_header_field(http_parser *p, const char *at, size_t len) {
    conn *c = p->data;
    if (c->hdr_in_value || (c->hdr_name_len == 0 && !c->hdr_name_long)) {
        /* a new header line: its ": " and CRLF count too */
        c->hdr_in_value = false;
        c->hdr_name_len = 0;
        c->hdr_name_long = false;
        if (!count_header_bytes(c, 4)) return -1;
    }
    if (!count_header_bytes(c, len)) return -1;
    /* http_parser (not strict) takes spaces into a name: "Content-Length : 5" would be honoured
     * while a proxy in front may read that line otherwise, the start of request smuggling. A
     * server must reject it (RFC 9112 5.1). */
    if (memchr(at, ' ', len)) {
        c->err_status = 400;
        c->err_why = "whitespace in a header name (before its colon)";
        return -1;
    }
    if (c->hdr_name_len + len >= HDR_NAME_MAX) {
        c->hdr_name_long = true; /* longer than anything we look at */
    } else {
        memcpy(c->hdr_name + c->hdr_name_len, at, len);
        c->hdr_name_len += len;
    }
    return 0;
}

static int cb_header_value(http_parser *p, const char *at, size_t len) {
    conn *c = p->data;
    if (!c->hdr_in_value) {
        c->hdr_in_value = true;
        c->cur_hdr = -1;
        if (!c->headers_done && !c->hdr_name_long) { /* trailers never override headers */
            c->hdr_name[c->hdr_name_len] = '\0';
            if (strcasecmp(c->hdr_name, "host") == 0) c->n_host++;
            for (int i = 0; i < H_COUNT; i++) {
                if (strcasecmp(c->hdr_name, interesting_headers[i]) == 0) {
                    /* Authorization and X-Tenant say who the caller is. A second line of either
                     * would be read by this server as the last one and by a proxy in front
                     * perhaps as the first (the one it checked): a request that is one caller to
                     * the proxy and another here. Both are singleton fields (RFC 9110 §5.3). */
                    if (c->have_hdr[i] && (i == H_AUTHORIZATION || i == H_TENANT)) {
                        c->err_status = 400;
                        c->err_why = i == H_AUTHORIZATION ? "more than one Authorization header"
                                                          : "more than one X-Tenant header";
                        return -1;
                    }
                    c->cur_hdr = i;
                    /* Transfer-Encoding lines make one list (RFC 9110 §5.3): "gzip" then "chunked"
                     * is "gzip, chunked", and so do a preflight's requested headers; of any other
                     * repeated header the last one wins */
                    if ((i == H_TRANSFER_ENCODING || i == H_AC_REQUEST_HEADERS) && c->have_hdr[i]) {
                        bt_buf_append(&c->hdr[i], ", ", 2);
                    } else {
                        bt_buf_reset(&c->hdr[i]);
                        bt_buf_append(&c->hdr[i], "", 0);
                    }
                    c->have_hdr[i] = true;
                    break;
                }
            }
        }
        c->hdr_name_len = 0;
        c->hdr_name_long = false;
    }
    if (!count_header_bytes(c, len)) return -1;
    if (c->cur_hdr >= 0 && bt_buf_append(&c->hdr[c->cur_hdr], at, len) != BT_OK) {
        c->err_status = 431;
        return -1;
    }
    return 0;
}

static int cb_headers_complete(http_parser *p) {
    conn *c = p->data;
    c->headers_done = true;
    c->hdr_in_value = false;
    c->hdr_name_len = 0;
    /* http_parser takes any digits as a version, and a request line without one as HTTP/0.9,
     * whose answer would be a bare body. This server speaks HTTP/1.0 and 1.1: another major
     * version is a 505 (RFC 9110 §15.6.6), a request line without a version a 400; a later 1.x is
     * served as 1.1, the highest minor version of its major this server implements (RFC 9110
     * §2.5). */
    if (p->http_major != 1) {
        c->err_status = p->http_major == 0 && p->http_minor == 9 ? 400 : 505; /* err_why: a 400 only */
        c->err_why = "HTTP/0.9 (a request line without a version) is not served";
        return -1;
    }
    /* Trailing whitespace is not part of a field value (RFC 9110 §5.5); http_parser drops only the
     * leading one. "Bearer KEY " is the key KEY, "3 " the priority 3. Here, before Expect is read:
     * "100-continue " is 100-continue. */
    for (int i = 0; i < H_COUNT; i++) {
        bt_buf *v = &c->hdr[i];
        while (c->have_hdr[i] && v->len > 0 && (v->data[v->len - 1] == ' ' || v->data[v->len - 1] == '\t'))
            v->data[--v->len] = '\0';
    }
    size_t max_body = c->srv->cfg.max_body_bytes;
    bool has_cl = (p->flags & F_CONTENTLENGTH) != 0;
    if (has_cl && p->content_length > max_body) {
        c->err_status = 413;
        return -1;
    }
    if (has_cl && !body_charge(c, (size_t)p->content_length)) { /* before a 100 Continue asks for it */
        c->err_status = 503;
        return -1;
    }
    c->is_head = p->method == HTTP_HEAD;
    c->http10 = p->http_major < 1 || (p->http_major == 1 && p->http_minor == 0);
    /* RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header and to
     * any request with more than one (a proxy and this server could each pick another). HTTP/1.0
     * has no Host requirement: a 1.0 request without one is served. */
    if (c->n_host > 1 || (c->n_host == 0 && !c->http10)) {
        c->err_status = 400;
        c->err_why = c->n_host ? "more than one Host header" : "an HTTP/1.1 request without a Host header";
        return -1;
    }
    /* before anything else is said about the request: a page that reached this server by DNS
     * rebinding learns nothing, not even whether its body would have fitted */
    char authority[256];
    bool absolute = target_authority(&c->url, authority, sizeof authority);
    if (!bt_http_host_allowed(c->srv->allowed_hosts, c->srv->loopback,
                              c->have_hdr[H_HOST] ? c->hdr[H_HOST].data : NULL) ||
        (absolute && !bt_http_host_allowed(c->srv->allowed_hosts, c->srv->loopback, authority))) {
        c->err_status = 403;
        return -1;
    }
    /* Transfer codings. Without chunked last ("gzip", "identity", "chunked, gzip") where the body
     * ends cannot be known: RFC 9112 §6.3 says 400 and close. With chunked last and another coding
     * before it ("gzip, chunked") the framing is known, but the body would have to be decoded
     * before it means anything; http_parser only takes the chunked framing off, and would hand
     * the handler the still-coded bytes: a coding the server does not implement, 501 (RFC 9112
     * §6.1), closed. A Content-Length beside either is refused by http_parser before this runs
     * (conn_parse names it). */
    if (c->have_hdr[H_TRANSFER_ENCODING] && !(p->flags & F_CHUNKED)) {
        c->err_status = 400;
        c->err_why = "Transfer-Encoding does not end in chunked: the body's length cannot be known";
        return -1;
    }
    if (c->have_hdr[H_TRANSFER_ENCODING] &&
        !(c->hdr[H_TRANSFER_ENCODING].data && strcasecmp(c->hdr[H_TRANSFER_ENCODING].data, "chunked") == 0)) {
        c->err_status = 501;
        return -1;
    }
    bool has_body = (p->flags & F_CHUNKED) || (has_cl && p->content_length > 0);
    if (has_body && !c->http10 && c->have_hdr[H_EXPECT] && c->hdr[H_EXPECT].data &&
        strcasecmp(c->hdr[H_EXPECT].data, "100-continue") == 0) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (c->srv->h.on_expect && !conn_ask_expect(c)) return -1;
        uv_buf_t b = uv_buf_init((char *)cont, sizeof cont - 1);
        if (!conn_write(c, &b, 1)) return -1;
    }
    if (has_cl && p->content_length > 0) bt_buf_reserve(&c->body, (size_t)p->content_length);
    return 0;
}

static int cb_body(http_parser *p, const char *at, size_t len) {
    conn *c = p->data;
    if (!body_charge(c, c->body.len + len)) { /* a chunked body, as it grows */
        c->err_status = 503;
        return -1;
    }
    if (bt_buf_append(&c->body, at, len) != BT_OK) {
        c->err_status = 413;
        return -1;
    }
    return 0;
}

static int cb_message_complete(http_parser *p) {
    conn *c = p->data;
    /* HTTP/1.0 has no Transfer-Encoding: a recipient along the way may have read this body
     * otherwise, so after it the connection is not trusted with another (RFC 9112 §6.1: MUST
     * close), whatever its Connection header says */
    c->keep_alive = http_should_keep_alive(p) && !p->upgrade && !(c->http10 && c->have_hdr[H_TRANSFER_ENCODING]);
    c->in_message = false;
    c->msg_complete = true;
    c->frame = FS_START; /* the next bytes parsed are the next request's */
    c->frame_trailers = false;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = cb_message_begin,
    .on_url = cb_url,
    .on_header_field = cb_header_field,
    .on_header_value = cb_header_value,
    .on_headers_complete = cb_headers_complete,
    .on_body = cb_body,
    .on_message_complete = cb_message_complete,
};

/* The 403 of a Host the server does not answer (cb_headers_complete), logged at warn, five lines a
 * second at most: it is what an attack looks like, and also what a proxy on this machine that
 * passes its clients' Host on looks like until --allowed-hosts lists it. */
static void host_refused(conn *c) {
    bt_http_server *s = c->srv;
    /* the name as the client sent it, printable ASCII only: it goes to the log and the answer */
    char name[104];
    size_t n = 0;
    const char *h = c->hdr[H_HOST].data ? c->hdr[H_HOST].data : "";
    char authority[256];
    /* the Host header passed: the name refused was an absolute-form target's */
    if (target_authority(&c->url, authority, sizeof authority) && bt_http_host_allowed(s->allowed_hosts, s->loopback, h))
        h = authority;
    for (; h[n] && n < 100; n++) name[n] = h[n] >= 0x20 && h[n] < 0x7f ? h[n] : '?';
    snprintf(name + n, sizeof name - n, "%s", h[n] ? "..." : "");
    unsigned unsaid = 0;
    if (bt_log_limit_take(&s->host_log, uv_now(s->loop), 5, &unsaid)) {
        char more[80] = "";
        if (unsaid) snprintf(more, sizeof more, " (%u more refused in the second before, not logged)", unsaid);
        BT_WARN("http: refused a request for Host '%s' (port %d): not a name this server answers; a proxy or a name "
                "of this server's own goes in --allowed-hosts (BATON_ALLOWED_HOSTS)%s",
                name, s->port, more);
    }
    char msg[400];
    snprintf(msg, sizeof msg,
             "Host '%s' is not served here: this server answers requests for an IP address, localhost and the "
             "names listed in --allowed-hosts (BATON_ALLOWED_HOSTS) only, so that a web page whose name was pointed "
             "at it (DNS rebinding) cannot read it",
             name);
    conn_error_close(c, 403, msg);
}

/* Framing that http_parser accepts in the build Debian ships (without its strict checks) while a
 * proxy in front may read it otherwise: two readings of where a line, a chunk or a message ends,
 * the stuff of request smuggling. frame_scan reads a request's framing bytes before the parser
 * does and refuses, with a 400 and the connection closed:
 *   - a header or trailer line that starts with a space or tab (RFC 9112 §5.2, obsolete line
 *     folding; or §2.2, whitespace before the first header line): http_parser unfolds it into the
 *     line before it ("Transfer-Encoding:" then " chunked" is chunked), a proxy may take it as a
 *     line of its own or drop it;
 *   - a CR not followed by LF, in the request line, the blank lines before it, the header section,
 *     a chunk-size line or the trailer section (RFC 9112 §2.2 lets a recipient reject a bare CR):
 *     where a header section, a trailer section or a chunk-size line ends, http_parser takes
 *     whatever byte follows a CR for its LF ("\r\n\rX" ends a header section, the X swallowed);
 *     before the request line it skips a lone CR as a blank line; in the request and header lines
 *     it wants the LF, and the scan names the fault the same way;
 *   - a chunk-size line other than hex digits, an optional extension without control characters,
 *     and CRLF; chunk data not followed by exactly CRLF: http_parser takes any two bytes there for
 *     the CRLF ("{...}XY0\r\n\r\n" is a whole body to it).
 * A bare LF still ends the request line and a header or trailer line, as http_parser reads it and
 * RFC 9112 §2.2 allows; it ends no chunk line (§7.1 has CRLF there and no such latitude).
 *
 * Bodies are not read: a Content-Length body is skipped whole and chunk data by its size, so what
 * is looked at byte by byte is what the parser itself reads byte by byte. The scan runs ahead of
 * the parser over the same bytes and stops where a header section ends (FS_HEAD_END): only the
 * parser knows then how the body is framed, and conn_parse, having run the parser up to there,
 * says so (frame_body). At the end of a message the scan waits (FS_MSG_END) for the parser to
 * complete it (cb_message_complete starts the scan again), so that a request pipelined behind
 * another is scanned, and refused, as its own once the one before it is answered. The state
 * carries over reads: the bytes may be split anywhere.
 *
 * A stricter parser instead of this scan: llhttp, whose default is strict, is not packaged by
 * Debian 12, and bringing its sources in is a larger change than checking the few bytes that the
 * lenient build misreads.
 *
 * Returns NULL when data holds nothing malformed, with *used the bytes scanned: all of them, or
 * those up to the end of a header section (the scan then waits in FS_HEAD_END); else what is
 * malformed. */
static const char *frame_scan(conn *c, const char *data, size_t len, size_t *used) {
    static const char fold[] = "a header line that starts with whitespace (obsolete line folding, refused as RFC "
                               "9112 §5.2 allows: a proxy may read the line otherwise)";
    static const char bare_cr[] = "a CR not followed by LF (refused as RFC 9112 §2.2 allows: a proxy may read "
                                  "where the line ends otherwise)";
    static const char bad_size[] = "a chunk-size line that is not a hexadecimal size, an optional extension and CRLF";
    static const char bad_data_end[] = "chunk data not followed by CRLF";
    /* the bound http_parser keeps ((2^64 - 17) / 16), so that both refuse alike */
    static const char too_large[] = "chunk size too large (at most 2^60 - 2 bytes)";
    uint8_t s = c->frame;
    const char *why = NULL;
    size_t i = 0;
    while (i < len && !why && s != FS_HEAD_END) {
        if (s == FS_BODY || s == FS_MSG_END) {
            i = len;
            break;
        }
        if (s == FS_DATA) { /* chunk_left > 0 */
            size_t n = len - i < c->chunk_left ? len - i : (size_t)c->chunk_left;
            i += n;
            c->chunk_left -= n;
            if (!c->chunk_left) s = FS_DATA_CR;
            continue;
        }
        unsigned char ch = (unsigned char)data[i++];
        int hex = ch >= '0' && ch <= '9'   ? ch - '0'
                  : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
                  : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                           : -1;
        switch (s) {
        case FS_START: /* blank lines before a request line are skipped, as http_parser does */
            s = ch == '\r' ? FS_START_CR : ch == '\n' ? FS_START : FS_LINE;
            break;
        case FS_START_CR:
            if (ch != '\n') why = bare_cr;
            s = FS_START;
            break;
        case FS_LINE:
            /* the line's other bytes are the parser's to judge: on to its end */
            while (ch != '\r' && ch != '\n' && i < len) ch = (unsigned char)data[i++];
            s = ch == '\r' ? FS_LINE_CR : ch == '\n' ? FS_LINE_START : FS_LINE;
            break;
        case FS_LINE_CR:
            if (ch != '\n') why = bare_cr;
            s = FS_LINE_START;
            break;
        case FS_LINE_START:
            if (ch == ' ' || ch == '\t') why = fold;
            else if (ch == '\r') s = FS_LINE_START_CR;
            else if (ch == '\n') s = c->frame_trailers ? FS_MSG_END : FS_HEAD_END;
            else s = FS_LINE;
            break;
        case FS_LINE_START_CR:
            if (ch != '\n') why = bare_cr;
            s = c->frame_trailers ? FS_MSG_END : FS_HEAD_END;
            break;
        case FS_SIZE_START:
            if (hex < 0) why = bad_size;
            c->chunk_left = (uint64_t)(hex < 0 ? 0 : hex);
            s = FS_SIZE;
            break;
        case FS_SIZE:
            if (hex >= 0 && c->chunk_left > ((UINT64_MAX - 16) / 16 - (uint64_t)hex) / 16) why = too_large;
            else if (hex >= 0) c->chunk_left = c->chunk_left << 4 | (uint64_t)hex;
            else if (ch == ';' || ch == ' ' || ch == '\t') s = FS_EXT; /* whitespace before ';' (RFC 9112 §7.1.1) */
            else if (ch == '\r') s = FS_SIZE_LF;
            else why = bad_size;
            break;
        case FS_EXT: /* names, values, quoted strings: no control character but HTAB */
            if (ch == '\r') s = FS_SIZE_LF;
            else if ((ch < 0x20 && ch != '\t') || ch == 0x7f) why = bad_size;
            break;
        case FS_SIZE_LF:
            if (ch != '\n') why = bare_cr;
            c->frame_trailers = c->chunk_left == 0; /* the last chunk: the trailer section follows */
            s = c->chunk_left ? FS_DATA : FS_LINE_START;
            break;
        case FS_DATA_CR:
            if (ch != '\r') why = bad_data_end;
            s = FS_DATA_LF;
            break;
        case FS_DATA_LF:
            if (ch != '\n') why = bad_data_end;
            s = FS_SIZE_START;
            break;
        }
    }
    c->frame = s;
    *used = i;
    return why;
}

/* The parser has read the header section frame_scan stopped at, and a body follows: the scan goes
 * on in it as the parser frames it. */
static void frame_body(conn *c) {
    c->frame = (c->parser.flags & F_CHUNKED) ? FS_SIZE_START : FS_BODY;
    c->chunk_left = 0;
}

/* The parser stopped on an error (e) or a callback that failed on purpose: the answer, and the
 * connection closed. */
static void conn_parse_failed(conn *c, enum http_errno e) {
    char msg[256];
    if (c->err_status == 403) {
        host_refused(c);
    } else if (c->err_status == 413) {
        snprintf(msg, sizeof msg, "request body too large (limit %zu bytes)", c->srv->cfg.max_body_bytes);
        conn_error_close(c, 413, msg);
    } else if (c->err_status == 503) {
        snprintf(msg, sizeof msg, "too many request bodies are being received at once (limit %zu bytes); retry",
                 c->srv->cfg.max_body_total);
        conn_error_close(c, 503, msg);
    } else if (c->err_status == 501) {
        snprintf(msg, sizeof msg,
                 "Transfer-Encoding '%.60s' is not supported: send the body as is (Content-Length) or with "
                 "Transfer-Encoding: chunked alone",
                 c->hdr[H_TRANSFER_ENCODING].data ? c->hdr[H_TRANSFER_ENCODING].data : "");
        conn_error_close(c, 501, msg);
    } else if (c->err_status == 505) {
        snprintf(msg, sizeof msg, "HTTP/%u.%u is not supported: this server speaks HTTP/1.1 and HTTP/1.0",
                 c->parser.http_major, c->parser.http_minor);
        conn_error_close(c, 505, msg);
    } else if (c->err_status == 431 || e == HPE_HEADER_OVERFLOW) {
        snprintf(msg, sizeof msg, "request header section too large (limit %zu bytes)",
                 c->srv->cfg.max_header_bytes);
        conn_error_close(c, 431, msg);
    } else {
        /* http_parser reports a chunk size past (2^64 - 17) / 16 as a bad Content-Length (it keeps both in one
         * field): past the headers of a chunked body, it can only be the chunk size */
        bool chunk_size = e == HPE_INVALID_CONTENT_LENGTH && c->headers_done && (c->parser.flags & F_CHUNKED);
        /* http_parser's "unexpected content-length" is a second Content-Length line, or one beside
         * a Transfer-Encoding (RFC 9112 §6.1: the server may refuse it, and must close) */
        bool cl_te = e == HPE_UNEXPECTED_CONTENT_LENGTH && c->have_hdr[H_TRANSFER_ENCODING];
        snprintf(msg, sizeof msg, "malformed HTTP request: %s",
                 c->err_status == 400 && c->err_why ? c->err_why
                 : chunk_size                       ? "chunk size too large (at most 2^60 - 2 bytes)"
                 : cl_te                            ? "both Transfer-Encoding and Content-Length"
                 : e == HPE_UNEXPECTED_CONTENT_LENGTH ? "more than one Content-Length"
                 : e == HPE_OK                        ? "unexpected data"
                                                      : http_errno_description(e));
        conn_error_close(c, 400, msg);
    }
}

/* Runs the scan and the parser over data and returns how many bytes the parser consumed.
 * Afterwards either the connection is answered-and-lingering / closed (malformed framing, a parse
 * error or a cap), or c->msg_complete is set (parser paused right after the message), or all
 * bytes were consumed. The parser is run up to the end of a header section first and then on, so
 * that the scan learns from it how the body that follows is framed. */
static size_t conn_parse(conn *c, const char *data, size_t len) {
    size_t off = 0;
    while (off < len) {
        size_t used;
        const char *bad = frame_scan(c, data + off, len - off, &used);
        if (bad) {
            char msg[256];
            snprintf(msg, sizeof msg, "malformed HTTP request: %s", bad);
            conn_error_close(c, 400, msg);
            return len;
        }
        /* used > 0: the scan stops only after a header section's last byte (a length of 0 would
         * tell the parser the input ended) */
        size_t n = http_parser_execute(&c->parser, &parser_settings, data + off, used);
        if (c->closing || c->state != CS_READING) return len;
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        if (e == HPE_PAUSED && c->msg_complete) return off + n;
        if (e != HPE_OK || n != used) {
            conn_parse_failed(c, e);
            return len;
        }
        off += n;
        if (c->frame == FS_HEAD_END) {
            if (!c->headers_done) { /* the two readings of where the headers end differ: never seen */
                conn_parse_failed(c, HPE_OK);
                return len;
            }
            frame_body(c);
        }
    }
    return len;
}

/* Fills c->req from the parsed request line and headers (its body is set at dispatch). Once per
 * request: the URL is cut in place (path, query), which cannot be done twice. */
static void req_fill(conn *c) {
    bt_http_req *r = &c->req;
    if (c->req_filled) return;
    c->req_filled = true;
    memset(r, 0, sizeof *r);
    switch (c->parser.method) {
    case HTTP_GET: r->method = BT_HTTP_GET; break;
    case HTTP_POST: r->method = BT_HTTP_POST; break;
    case HTTP_HEAD: r->method = BT_HTTP_HEAD; break;
    case HTTP_OPTIONS: r->method = BT_HTTP_OPTIONS; break;
    default: r->method = BT_HTTP_OTHER; break;
    }
    if (bt_buf_append(&c->url, "", 0) != BT_OK || !c->url.data) { /* ensures storage and a NUL */
        r->path = "/";
        r->query = "";
    } else {
        char *u = c->url.data;
        /* absolute-form ("http://host/path") → path */
        if (strncasecmp(u, "http://", 7) == 0 || strncasecmp(u, "https://", 8) == 0) {
            char *slash = strchr(strstr(u, "//") + 2, '/');
            u = slash ? slash : (char *)"/";
        }
        char *hash = strchr(u, '#');
        if (hash) *hash = '\0';
        char *q = strchr(u, '?');
        if (q) *q = '\0';
        r->path = u;
        r->query = q ? q + 1 : "";
    }
    r->body = "";
    r->request_id = c->have_hdr[H_REQUEST_ID] ? c->hdr[H_REQUEST_ID].data : NULL;
    r->authorization = c->have_hdr[H_AUTHORIZATION] ? c->hdr[H_AUTHORIZATION].data : NULL;
    r->content_type = c->have_hdr[H_CONTENT_TYPE] ? c->hdr[H_CONTENT_TYPE].data : NULL;
    r->last_event_id = c->have_hdr[H_LAST_EVENT_ID] ? c->hdr[H_LAST_EVENT_ID].data : NULL;
    r->priority = c->have_hdr[H_PRIORITY] ? c->hdr[H_PRIORITY].data : NULL;
    r->tenant = c->have_hdr[H_TENANT] ? c->hdr[H_TENANT].data : NULL;
    r->origin = c->have_hdr[H_ORIGIN] ? c->hdr[H_ORIGIN].data : NULL;
    r->preflight = c->have_hdr[H_AC_REQUEST_METHOD] ? c->hdr[H_AC_REQUEST_METHOD].data : NULL;
    r->preflight_headers = c->have_hdr[H_AC_REQUEST_HEADERS] ? c->hdr[H_AC_REQUEST_HEADERS].data : NULL;
}

/* Expect: 100-continue, from cb_headers_complete: the handler's on_expect sees the request before
 * its body. True: send the 100 and read on. False: the handler answered (or, had it not, a 417
 * goes out here), Connection: close, and the connection lingers: the caller stops the parser. */
static bool conn_ask_expect(conn *c) {
    bt_http_server *s = c->srv;
    req_fill(c);
    c->is_head = c->parser.method == HTTP_HEAD;
    c->keep_alive = false; /* an answer now is the last one: the body that follows is never read */
    c->req_active = true;
    c->resp_started = c->streaming = c->raw_stream = false;
    s->ninflight++;
    bool go = s->h.on_expect(s->ud, &c->req);
    if (go && !c->resp_started) {
        req_finish(c);
        return true;
    }
    if (c->req_active && !c->resp_started) {
        static const char m[] = "{\"error\":{\"message\":\"expectation refused\",\"type\":\"invalid_request_error\","
                                "\"param\":null,\"code\":\"expectation_failed\"}}";
        bt_http_respond(&c->req, 417, "application/json", NULL, m, sizeof m - 1);
    } else if (c->req_active) { /* a stream begun here: it cannot be; end it */
        bt_http_stream_end(&c->req, true);
    }
    body_release(c);
    return false;
}

/* Hands the complete request to the handler. */
static void conn_dispatch(conn *c) {
    bt_http_server *s = c->srv;
    c->msg_complete = false;
    conn_timer(c, TM_NONE);

    bt_http_req *r = &c->req;
    req_fill(c);
    bt_buf_append(&c->body, "", 0);
    r->body = c->body.data ? c->body.data : "";
    r->body_len = c->body.len;

    /* received: what the budget bounds is what a client holds by sending bytes slowly or not at
     * all; a request in flight is bounded by the handler's own limits (requests in flight) */
    body_release(c);
    c->state = CS_IN_FLIGHT;
    c->req_active = true;
    c->resp_started = c->streaming = c->raw_stream = false;
    s->ninflight++;
    s->h.on_request(s->ud, r);
}

/* Bytes from the socket while READING. */
static void conn_feed(conn *c, const char *data, size_t len) {
    size_t n = conn_parse(c, data, len);
    if (c->closing || c->state != CS_READING || !c->msg_complete) return;
    /* pending is empty here: bytes only go there while a request is in flight or queued */
    if (n < len && bt_buf_append(&c->pending, data + n, len - n) != BT_OK) {
        conn_close(c);
        return;
    }
    conn_dispatch(c);
    conn_update_reading(c);
}

/* Parses pipelined bytes buffered during the previous request (runs from the timer, never from
 * inside a handler call). */
static void conn_resume(conn *c) {
    if (c->pending.len == 0 || c->state != CS_READING) return;
    size_t n = conn_parse(c, c->pending.data, c->pending.len);
    if (c->closing || c->state != CS_READING) return;
    bt_buf_consume(&c->pending, n);
    if (c->msg_complete) {
        conn_dispatch(c);
    } else if (!c->in_message) {
        conn_timer(c, TM_IDLE); /* only blank lines were buffered */
    }
    conn_update_reading(c);
}

/* ---------------------------------------------------------------------------------------------
 * Connection life cycle */

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    conn *c = st->data;
    if (c->closing || nread == 0) return;
    if (nread < 0) {
        /* EOF or error: a request in flight is aborted (delivered from the close callback). */
        if (nread != UV_EOF) BT_DEBUG("http: read: %s", uv_strerror((int)nread));
        conn_close(c);
        return;
    }
    if (c->state == CS_LINGER || c->discarding) return; /* discard */
    if (c->state == CS_IN_FLIGHT && c->pending.len + (size_t)nread > PIPELINE_SOFT_CAP) {
        /* The client pipelines more than we keep: this connection takes no further request. The
         * in-flight one goes on, and reading goes on (discarding) so that EOF still aborts it. */
        BT_DEBUG("http: over %u bytes pipelined behind a request in flight; dropping the connection's "
                 "further input and closing it after the response",
                 PIPELINE_SOFT_CAP);
        c->discarding = true;
        c->keep_alive = false;
        bt_buf_free(&c->pending);
        return;
    }
    if (c->state == CS_IN_FLIGHT || c->pending.len > 0) {
        if (bt_buf_append(&c->pending, buf->base, (size_t)nread) != BT_OK) {
            conn_close(c);
            return;
        }
        conn_update_reading(c);
        return;
    }
    conn_feed(c, buf->base, (size_t)nread);
}

static void on_shutdown(uv_shutdown_t *r, int status) {
    conn *c = r->data;
    if (c->closing) return;
    if (status < 0) conn_close(c);
    /* otherwise wait for the peer's EOF or the linger timer */
}

/* The final response is written (or queued): half-close after the queue drains and discard input
 * until the peer closes or the linger timer fires. */
static void conn_linger(conn *c) {
    if (c->closing || c->state == CS_LINGER) return;
    c->state = CS_LINGER;
    bt_buf_free(&c->pending);
    c->shutdown.data = c;
    int r = uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown);
    if (r < 0) {
        conn_close(c);
        return;
    }
    conn_timer(c, TM_LINGER);
    conn_update_reading(c);
}

static void on_timer(uv_timer_t *t) {
    conn *c = t->data;
    if (c->closing) return;
    timer_mode m = c->tmode;
    c->tmode = TM_NONE;
    switch (m) {
    case TM_RESUME: conn_resume(c); break;
    case TM_HEADER:
        BT_DEBUG("http: request not received within %u ms; closing", c->srv->cfg.header_timeout_ms);
        c->srv->stats.header_timeout++;
        conn_close(c);
        break;
    case TM_IDLE:
    case TM_LINGER: conn_close(c); break;
    case TM_NONE: break;
    }
}

static void conn_free(conn *c) {
    body_release(c);
    for (int i = 0; i < H_COUNT; i++) bt_buf_free(&c->hdr[i]);
    bt_buf_free(&c->resp_hdrs);
    bt_buf_free(&c->url);
    bt_buf_free(&c->body);
    bt_buf_free(&c->pending);
    free(c->held_head);
    bt_pool_put(&c->srv->conn_pool, c);
}

/* Both handles are closed: deliver a pending abort, then free. */
static void conn_closed(void *arg) {
    conn *c = arg;
    bt_http_server *s = c->srv;
    if (c->req_active) {
        c->req_active = false;
        s->ninflight--;
        if (s->h.on_abort) s->h.on_abort(s->ud, &c->req);
    }
    LIST_REMOVE(c, link);
    s->nconns--;
    if (s->cfg.shared_conns) atomic_fetch_sub(s->cfg.shared_conns, 1);
    conn_free(c);
    server_maybe_finish(s);
}

/* Closes the connection now. A request the handler still owns gets on_abort from the close
 * callback (never synchronously: we may be inside one of the handler's own calls). */
static void conn_close(conn *c) {
    if (c->closing) return;
    c->closing = true;
    c->reading = false;
    /* the queued writes are cancelled and freed in this close: their charge goes back now, so
     * that a connection cut to make room makes it at once (on_write skips a closing one's) */
    if (c->backlog && c->srv->cfg.max_output_total) atomic_fetch_sub(c->srv->output, c->backlog);
    peer_shrank(c);
    bt_closer_init(&c->closer, conn_closed, c);
    bt_closer_close(&c->closer, (uv_handle_t *)&c->tcp);
    bt_closer_close(&c->closer, (uv_handle_t *)&c->timer);
    bt_closer_seal(&c->closer);
}

static void on_reject_closed(uv_handle_t *h) {
    reject_conn *r = h->data;
    bt_http_server *s = r->srv;
    free(r);
    s->nrejecting--;
    server_maybe_finish(s);
}

/* Over max_connections: accept, say 503 if the socket takes it at once, close. */
static void server_reject(bt_http_server *s) {
    reject_conn *r = malloc(sizeof *r);
    if (!r) return;
    r->srv = s;
    uv_tcp_init(s->loop, &r->tcp);
    r->tcp.data = r;
    s->nrejecting++;
    if (uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&r->tcp) == 0) {
        static const char body[] =
            "{\"error\":{\"message\":\"too many connections\",\"type\":\"server_error\",\"param\":null,"
            "\"code\":\"too_many_connections\"}}";
        char head[160];
        int hn = snprintf(head, sizeof head,
                          "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                          "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                          sizeof body - 1);
        uv_buf_t bufs[2] = {uv_buf_init(head, (unsigned)hn), uv_buf_init((char *)body, sizeof body - 1)};
        (void)uv_try_write((uv_stream_t *)&r->tcp, bufs, 2);
    }
    uv_close((uv_handle_t *)&r->tcp, on_reject_closed);
}

static void on_connection(uv_stream_t *server, int status) {
    bt_http_server *s = server->data;
    if (status < 0) {
        /* Out of descriptors, libuv closes the connections waiting itself (its EMFILE fallback
         * frees a descriptor it keeps, accepts and closes) and calls here only when that fails
         * too, so this counts such events, not connections: said at most once per REJECT_LOG_MS
         * with a count, as a connection flood would otherwise flood the log. */
        bool nofd = status == UV_EMFILE || status == UV_ENFILE;
        if (nofd) s->stats.no_descriptors++;
        uint64_t now = uv_now(s->loop);
        if (!nofd || !s->nofd_logged || now - s->nofd_logged_ms >= REJECT_LOG_MS) {
            BT_WARN("http: accept failed: %s%s (%" PRIu64 " more since the last such message)", uv_strerror(status),
                    nofd ? ": waiting connections were closed unanswered; lower --max-connections or raise the "
                           "descriptor limit (ulimit -n, LimitNOFILE=)"
                         : "",
                    nofd ? s->nofd_quiet : 0);
            if (nofd) {
                s->nofd_logged = true;
                s->nofd_logged_ms = now;
                s->nofd_quiet = 0;
            }
        } else {
            s->nofd_quiet++;
        }
        return;
    }
    if (s->closing) return;
    /* With a shared counter the limit is over every server that shares it (the frontend's shards) */
    size_t open = s->cfg.shared_conns ? atomic_fetch_add(s->cfg.shared_conns, 1) : s->nconns;
    if (open >= s->cfg.max_connections) {
        if (s->cfg.shared_conns) atomic_fetch_sub(s->cfg.shared_conns, 1);
        uint64_t now = uv_now(s->loop);
        if (!s->reject_logged || now - s->reject_logged_ms >= REJECT_LOG_MS) {
            BT_WARN("http: %zu connections open (limit %zu); rejecting a new one (%" PRIu64
                    " more rejected since the last such message; at most one every %u s)",
                    open, s->cfg.max_connections, s->reject_quiet, REJECT_LOG_MS / 1000u);
            s->reject_logged = true;
            s->reject_logged_ms = now;
            s->reject_quiet = 0;
        } else {
            s->reject_quiet++;
        }
        s->stats.max_connections++;
        server_reject(s);
        return;
    }
    conn *c = bt_pool_get(&s->conn_pool);
    if (!c) {
        if (s->cfg.shared_conns) atomic_fetch_sub(s->cfg.shared_conns, 1);
        BT_ERROR("http: out of memory accepting a connection");
        server_reject(s);
        return;
    }
    c->srv = s;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    LIST_INSERT_HEAD(&s->conns, c, link);
    s->nconns++;
    c->cur_hdr = -1;
    c->frame = FS_START;
    c->frame_trailers = false;
    for (int i = 0; i < H_COUNT; i++) bt_buf_init(&c->hdr[i], s->cfg.max_header_bytes);
    bt_buf_init(&c->url, s->cfg.max_header_bytes);
    bt_buf_init(&c->resp_hdrs, OUT_HEADER_CAP / 2);
    bt_buf_init(&c->body, s->cfg.max_body_bytes);
    bt_buf_init(&c->pending, PIPELINE_SOFT_CAP + READ_BUF_SIZE);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    int r = uv_accept(server, (uv_stream_t *)&c->tcp);
    if (r < 0) {
        BT_WARN("http: accept failed: %s", uv_strerror(r));
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    /* A fresh connection must start its first request within the header timeout. */
    c->state = CS_READING;
    c->tmode = TM_HEADER;
    if (s->cfg.header_timeout_ms) uv_timer_start(&c->timer, on_timer, s->cfg.header_timeout_ms, 0);
    else c->tmode = TM_NONE;
    conn_update_reading(c);
}

/* ---------------------------------------------------------------------------------------------
 * Responses */

/* The handler no longer owns the request (it ended the response). */
static void req_finish(conn *c) {
    c->req_active = false;
    c->srv->ninflight--;
}

/* The response ended: keep the connection for the next request or close it. */
static void conn_response_done(conn *c, bool close) {
    req_finish(c);
    /* the handler is done with the body (http.h): a large one's memory goes back now, not when
     * the connection's next request begins */
    if (c->body.alloc > 64u * 1024u) bt_buf_free(&c->body);
    if (c->closing) return;
    c->state = CS_READING;
    if (close || !c->keep_alive) {
        conn_linger(c);
        return;
    }
    http_parser_pause(&c->parser, 0);
    /* Buffered pipelined bytes are parsed on the next loop iteration, not here: we may be inside
     * the handler's on_request, which must not be re-entered. */
    conn_timer(c, c->pending.len ? TM_RESUME : TM_IDLE);
}

static bool req_usable(conn *c, const char *what) {
    if (!c->req_active) {
        BT_WARN("http: %s on a request that already ended", what);
        return false;
    }
    return true;
}

/* "HTTP/1.1 <status> <reason>\r\n" and "<name><value>\r\n", built without printf (once or twice
 * per response: printf's parsing cost more than the rest of the head). */
static void status_line(bt_buf *h, int status) {
    bt_buf_append_str(h, "HTTP/1.1 ");
    bt_buf_append_i64(h, status);
    bt_buf_append(h, " ", 1);
    bt_buf_append_str(h, bt_http_reason(status));
    bt_buf_append(h, "\r\n", 2);
}

static void header_line(bt_buf *h, const char *name, const char *value) {
    bt_buf_append_str(h, name);
    bt_buf_append_str(h, value);
    bt_buf_append(h, "\r\n", 2);
}

/* Ends a response head built in h: Connection, the caller's extra headers, the blank line. False,
 * with the connection closed, when the head does not fit its cap (nothing of it is sent). */
static bool head_end(conn *c, bt_buf *h, const char *headers) {
    bt_buf_append_str(h, c->keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
    if (headers) bt_buf_append_str(h, headers);
    if (c->resp_hdrs.len) bt_buf_append(h, c->resp_hdrs.data, c->resp_hdrs.len);
    bt_buf_append(h, "\r\n", 2);
    if (bt_buf_status(h) == BT_OK) return true;
    BT_ERROR("http: response headers exceed %u bytes; closing the connection", OUT_HEADER_CAP);
    conn_close(c);
    return false;
}

void bt_http_respond_buf(bt_http_req *req, int status, const char *content_type, const char *headers,
                         const bt_buf *b) {
    if (bt_buf_status(b) != BT_OK) {
        char msg[160];
        int n = snprintf(msg, sizeof msg, "the response could not be built: %s\n", bt_status_msg(bt_buf_status(b)));
        BT_ERROR("http: %s %s: %s", req->method == BT_HTTP_POST ? "POST" : "GET", req->path, msg);
        bt_http_respond(req, 500, "text/plain", NULL, msg, (size_t)n);
        return;
    }
    bt_http_respond(req, status, content_type, headers, b->data ? b->data : "", b->len);
}

void bt_http_respond(bt_http_req *req, int status, const char *content_type, const char *headers, const char *body,
                     size_t len) {
    conn *c = REQ_CONN(req);
    if (!req_usable(c, "respond")) return;
    if (c->resp_started) {
        BT_WARN("http: respond after the response started; ignored");
        return;
    }
    c->resp_started = true;
    if (!c->closing) {
        bool no_body = status == 204 || status == 304 || (status >= 100 && status < 200);
        bt_buf h;
        bt_buf_init(&h, OUT_HEADER_CAP);
        status_line(&h, status);
        if (content_type) header_line(&h, "Content-Type: ", content_type);
        if (!no_body) {
            bt_buf_append_str(&h, "Content-Length: ");
            bt_buf_append_i64(&h, (int64_t)len);
            bt_buf_append(&h, "\r\n", 2);
        }
        if (head_end(c, &h, headers)) {
            uv_buf_t bufs[2] = {uv_buf_init(h.data, (unsigned)h.len), uv_buf_init((char *)body, (unsigned)len)};
            conn_write(c, bufs, (no_body || c->is_head || !body || !len) ? 1 : 2);
        }
        bt_buf_free(&h);
    }
    conn_response_done(c, false);
}

static void stream_begin(bt_http_req *req, int status, const char *content_type, const char *headers, bool hold) {
    conn *c = REQ_CONN(req);
    if (!req_usable(c, "stream_begin")) return;
    if (c->resp_started) {
        BT_WARN("http: stream_begin after the response started; ignored");
        return;
    }
    c->resp_started = c->streaming = true;
    if (c->closing) return; /* on_abort follows from the close callback */
    /* HTTP/1.0 has no chunked encoding: stream raw bytes and delimit by closing. */
    c->raw_stream = c->http10;
    if (c->raw_stream) c->keep_alive = false;
    bt_buf h;
    bt_buf_init(&h, OUT_HEADER_CAP);
    status_line(&h, status);
    if (content_type) header_line(&h, "Content-Type: ", content_type);
    bt_buf_append_str(&h, "Cache-Control: no-cache\r\n");
    if (!c->raw_stream) bt_buf_append_str(&h, "Transfer-Encoding: chunked\r\n");
    if (head_end(c, &h, headers)) {
        if (hold && !c->held_head) c->held_head = bt_buf_steal(&h, &c->held_head_len);
        if (!c->held_head) { /* not held (or no memory to hold it): written now */
            uv_buf_t b = uv_buf_init(h.data, (unsigned)h.len);
            conn_write(c, &b, 1);
        }
    }
    bt_buf_free(&h);
}

void bt_http_stream_begin(bt_http_req *req, int status, const char *content_type, const char *headers) {
    stream_begin(req, status, content_type, headers, false);
}

void bt_http_stream_begin_held(bt_http_req *req, int status, const char *content_type, const char *headers) {
    stream_begin(req, status, content_type, headers, true);
}

void bt_http_stream_flush_head(bt_http_req *req) {
    conn *c = REQ_CONN(req);
    if (c->held_head) conn_write(c, NULL, 0);
}

/* The chunk-size line of a chunk of len bytes ("1a3\r\n") into out (room for 18); its length. */
static size_t chunk_size_line(char *out, size_t len) {
    static const char hex[] = "0123456789abcdef";
    char tmp[16];
    size_t n = 0;
    do {
        tmp[n++] = hex[len & 15];
        len >>= 4;
    } while (len);
    for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
    out[n] = '\r', out[n + 1] = '\n';
    return n + 2;
}

/* Chunks up to this size (every SSE event of a stream) are framed in one stack buffer. */
#define SMALL_CHUNK 2048u

/* Writes data as one chunk and, when last, the terminating zero-size chunk after it. This is the
 * per-token path of every stream, so it makes exactly one write(2) per call: a small chunk is
 * framed (size line, data, CRLF) in one contiguous buffer, which costs a copy of a few hundred
 * bytes but neither a formatted print nor a three-part iovec for the kernel to walk; a large one
 * goes out as an iovec of its three parts, uncopied. */
static bool conn_write_chunk(conn *c, const char *data, size_t len, bool last) {
    char pre[18];
    size_t pn = chunk_size_line(pre, len);
    static const char tail[] = "\r\n0\r\n\r\n";
    size_t tn = last ? sizeof tail - 1 : 2;
    if (len <= SMALL_CHUNK) {
        char buf[sizeof pre + SMALL_CHUNK + sizeof tail];
        memcpy(buf, pre, pn);
        memcpy(buf + pn, data, len);
        memcpy(buf + pn + len, tail, tn);
        uv_buf_t b = uv_buf_init(buf, (unsigned)(pn + len + tn));
        return conn_write(c, &b, 1);
    }
    uv_buf_t bufs[3] = {uv_buf_init(pre, (unsigned)pn), uv_buf_init((char *)data, (unsigned)len),
                        uv_buf_init((char *)tail, (unsigned)tn)};
    return conn_write(c, bufs, 3);
}

bool bt_http_stream_write(bt_http_req *req, const char *data, size_t len) {
    conn *c = REQ_CONN(req);
    if (!c->req_active || !c->streaming || c->closing) return false;
    if (len == 0 || c->is_head) return true; /* an empty chunk would end the stream */
    if (c->raw_stream) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
        return conn_write(c, &b, 1);
    }
    return conn_write_chunk(c, data, len, false);
}

void bt_http_stream_end(bt_http_req *req, bool close) {
    conn *c = REQ_CONN(req);
    if (!req_usable(c, "stream_end")) return;
    if (!c->streaming) {
        BT_WARN("http: stream_end without stream_begin; closing the connection");
        conn_close(c);
        close = true;
    }
    if (!c->closing && !c->is_head && !c->raw_stream) {
        uv_buf_t b = uv_buf_init((char *)"0\r\n\r\n", 5);
        conn_write(c, &b, 1);
    }
    conn_response_done(c, close || c->raw_stream);
}

void bt_http_stream_finish(bt_http_req *req, const char *data, size_t len) {
    conn *c = REQ_CONN(req);
    if (!req_usable(c, "stream_finish")) return;
    if (!c->streaming || c->closing || c->is_head || c->raw_stream || len == 0) {
        bt_http_stream_write(req, data, len); /* the general path handles every special case */
        bt_http_stream_end(req, false);
        return;
    }
    conn_write_chunk(c, data, len, true);
    conn_response_done(c, false);
}

void bt_http_prefetch(const bt_http_req *req) {
    const conn *c = (const conn *)(const void *)((const char *)req - offsetof(conn, req));
    /* the handle uv_try_write reads (its flags, write queue and fd), the flags bt_http_stream_write
     * checks, and the response state next to req */
    for (size_t off = 0; off < sizeof c->tcp; off += 64) __builtin_prefetch((const char *)&c->tcp + off);
    __builtin_prefetch(&c->closing);
    __builtin_prefetch(&c->backlog);
}

size_t bt_http_backlog(const bt_http_req *req) {
    const conn *c = (const conn *)(const void *)((const char *)req - offsetof(conn, req));
    return c->backlog;
}

/* ---------------------------------------------------------------------------------------------
 * The server */

static void server_maybe_finish(bt_http_server *s) {
    if (!s->closing || !s->listener_closed || !s->aux_closed || !s->cut_async_closed || s->nconns || s->nrejecting)
        return;
    void (*done)(void *) = s->done;
    void *dud = s->done_ud;
    bt_pool_destroy(&s->conn_pool);
    free(s->allowed_hosts);
    free(s);
    if (done) done(dud);
}

static void on_listener_closed(uv_handle_t *h) {
    bt_http_server *s = h->data;
    s->listener_closed = true;
    server_maybe_finish(s);
}

static void on_aux_closed(uv_handle_t *h) {
    bt_http_server *s = h->data;
    s->aux_closed = true;
    server_maybe_finish(s);
}

static void on_cut_async_closed(uv_handle_t *h) {
    bt_http_server *s = h->data;
    s->cut_async_closed = true;
    server_maybe_finish(s);
}

bt_status bt_http_server_start(uv_loop_t *loop, const bt_http_config *cfg, const bt_http_handlers *h, void *ud,
                               bt_http_server **out, char *err, size_t errlen) {
    *out = NULL;
    if (!loop || !cfg || !h || !h->on_request) {
        snprintf(err, errlen, "http server: missing loop, config or on_request handler");
        return BT_ERR_INVALID;
    }
    bt_http_config def;
    bt_http_config_default(&def);
    const char *host = cfg->host ? cfg->host : def.host;
    if (cfg->port < 0 || cfg->port > 65535) {
        snprintf(err, errlen, "cannot listen on %s:%d: port out of range", host, cfg->port);
        return BT_ERR_INVALID;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    if (uv_ip4_addr(host, cfg->port, (struct sockaddr_in *)&ss) != 0 &&
        uv_ip6_addr(host, cfg->port, (struct sockaddr_in6 *)&ss) != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: not a numeric IPv4 or IPv6 address", host, cfg->port);
        return BT_ERR_INVALID;
    }
    bt_http_server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "cannot listen on %s:%d: out of memory", host, cfg->port);
        return BT_ERR_NOMEM;
    }
    s->loop = loop;
    bt_pool_init(&s->conn_pool, sizeof(conn), CONN_POOL_CAP);
    s->cfg = *cfg;
    s->cfg.host = NULL; /* not kept: the caller's string need not outlive the call */
    /* Zero sizes mean the defaults; zero timeouts mean "no timeout". */
    if (!s->cfg.max_header_bytes) s->cfg.max_header_bytes = def.max_header_bytes;
    if (!s->cfg.max_body_bytes) s->cfg.max_body_bytes = def.max_body_bytes;
    if (!s->cfg.max_connections) s->cfg.max_connections = def.max_connections;
    if (!s->cfg.write_backlog_max) s->cfg.write_backlog_max = def.write_backlog_max;
    if (s->cfg.max_body_total && s->cfg.max_body_total < s->cfg.max_body_bytes)
        s->cfg.max_body_total = s->cfg.max_body_bytes; /* else a body within its own cap could never pass */
    s->bodies = s->cfg.shared_bodies ? s->cfg.shared_bodies : &s->own_bodies;
    s->output = s->cfg.shared_output ? s->cfg.shared_output : &s->own_output;
    s->cut_async_closed = true; /* until there is one (peers) */
    if (s->cfg.output_peers && (!s->cfg.shared_output || s->cfg.output_peer < 0 ||
                                s->cfg.output_peer >= s->cfg.output_peers->n)) {
        snprintf(err, errlen, "http server: output_peers without shared_output, or output_peer out of range");
        bt_pool_destroy(&s->conn_pool);
        free(s);
        return BT_ERR_INVALID;
    }
    if (!s->cfg.max_output_total) s->cfg.output_peers = NULL; /* nothing is charged: nothing to cut */
    s->h = *h;
    s->ud = ud;
    s->cfg.allowed_hosts = NULL; /* the copy below is the server's */
    s->loopback = addr_loopback((const struct sockaddr *)&ss);
    if (cfg->allowed_hosts && !(s->allowed_hosts = strdup(cfg->allowed_hosts))) {
        snprintf(err, errlen, "cannot listen on %s:%d: out of memory", host, cfg->port);
        bt_pool_destroy(&s->conn_pool);
        free(s);
        return BT_ERR_NOMEM;
    }
    int r = 0;
    if (cfg->reuse_port && cfg->reuse_port_first && cfg->port != 0) {
        /* A listener of the same user with SO_REUSEPORT (another frontend) would let our bind
         * succeed and take half its connections: a plain bind finds the port in use. */
        int probe = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        if (probe < 0 || setsockopt(probe, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
            bind(probe, (const struct sockaddr *)&ss,
                 ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in)) != 0)
            r = -errno;
        if (probe >= 0) close(probe);
    }
    if (r != 0) {
        uv_tcp_init(loop, &s->listener); /* a handle for the error path to close */
    } else if (cfg->reuse_port) {
        /* The socket must exist before the bind to carry SO_REUSEPORT, which libuv 1.44 does not
         * set itself (UV_TCP_REUSEPORT came in 1.49). */
        r = uv_tcp_init_ex(loop, &s->listener, ss.ss_family);
        uv_os_fd_t fd;
        int one = 1;
        if (r != 0) uv_tcp_init(loop, &s->listener); /* a handle for the error path to close */
        else if (uv_fileno((uv_handle_t *)&s->listener, &fd) == 0 &&
                 setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
            r = -errno;
    } else {
        uv_tcp_init(loop, &s->listener);
    }
    uv_timer_init(loop, &s->aux);
    s->listener.data = s;
    s->aux.data = s;

    /* libuv sets SO_REUSEADDR on every TCP bind on Unix; bind errors may surface at listen. */
    if (r == 0) r = uv_tcp_bind(&s->listener, (const struct sockaddr *)&ss, 0);
    if (r == 0) r = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
    if (r == 0) {
        struct sockaddr_storage bound;
        int blen = sizeof bound;
        r = uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
        if (r == 0)
            s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                        : ((struct sockaddr_in *)&bound)->sin_port);
    }
    if (r != 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, cfg->port, uv_strerror(r));
        s->closing = true;
        s->listener_closing = true;
        uv_close((uv_handle_t *)&s->listener, on_listener_closed);
        uv_close((uv_handle_t *)&s->aux, on_aux_closed); /* the server is freed once both are closed */
        return BT_ERR_IO;
    }
    if (s->cfg.output_peers) {
        s->peer = &s->cfg.output_peers->slot[s->cfg.output_peer];
        uv_async_init(loop, &s->cut_async, on_cut_async);
        s->cut_async.data = s;
        s->cut_async_closed = false;
        uv_mutex_lock(&s->peer->mu);
        s->peer->srv = s;
        uv_mutex_unlock(&s->peer->mu);
    }
    /* at debug: the caller says what listens there, once (the frontend's address with its
     * settings, the worker's status server with its paths); a frontend's --threads servers share
     * one port, and the first of them says what the Host rule is */
    BT_DEBUG("http: listening on %s:%d", host, s->port);
    if (!s->allowed_hosts && s->loopback && (!cfg->reuse_port || cfg->reuse_port_first))
        BT_INFO("http: on a loopback address, requests are answered for Host localhost, *.localhost or an IP address "
                "only (--allowed-hosts adds names)");
    *out = s;
    return BT_OK;
}

int bt_http_server_port(const bt_http_server *s) { return s ? s->port : 0; }

void bt_http_server_stop_accepting(bt_http_server *s) {
    if (!s || s->listener_closing) return;
    s->listener_closing = true;
    uv_close((uv_handle_t *)&s->listener, on_listener_closed);
}

size_t bt_http_server_release_kept(bt_http_server *s) { return bt_pool_drain(&s->conn_pool); }

size_t bt_http_server_connections(const bt_http_server *s) { return s ? s->nconns : 0; }

size_t bt_http_server_output_queued(const bt_http_server *s) { return s ? atomic_load(s->output) : 0; }

void bt_http_server_stats(const bt_http_server *s, bt_http_stats *out) {
    if (s) *out = s->stats;
    else memset(out, 0, sizeof *out);
}

size_t bt_http_server_requests(const bt_http_server *s) { return s ? s->ninflight : 0; }

void bt_http_server_close(bt_http_server *s, void (*done)(void *ud), void *ud) {
    if (!s || s->closing) return;
    s->closing = true;
    s->done = done;
    s->done_ud = ud;
    bt_http_server_stop_accepting(s);
    if (s->peer) {
        /* no other loop signals the handle once it is closing; our backlogs all go back below */
        uv_mutex_lock(&s->peer->mu);
        s->peer->srv = NULL;
        uv_mutex_unlock(&s->peer->mu);
        atomic_store(&s->peer->largest, 0);
        uv_close((uv_handle_t *)&s->cut_async, on_cut_async_closed);
    }
    for (conn *c = LIST_FIRST(&s->conns); c; c = LIST_NEXT(c, link)) conn_close(c);
    uv_close((uv_handle_t *)&s->aux, on_aux_closed);
}

bool bt_http_set_headers(bt_http_req *req, const char *lines) {
    conn *c = REQ_CONN(req);
    bt_buf_reset(&c->resp_hdrs);
    if (bt_buf_append_str(&c->resp_hdrs, lines) == BT_OK) return true;
    bt_buf_reset(&c->resp_hdrs);
    return false;
}
