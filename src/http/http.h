/* http.h — baton's HTTP/1.1 server on libuv + http-parser: the frontend's API and the worker's
 * status server (routes: http/route.h).
 *
 * Keep-alive, one request in flight per connection (pipelined requests wait, buffered unparsed up
 * to 64 KiB; past that the connection takes no more requests and closes after the in-flight
 * response; reading never stops, so a client closing its socket is noticed and becomes on_abort),
 * hard caps on header and body sizes (413 / 431 answered here), idle and header timeouts. The
 * server parses; the handler decides. A request object is owned by its connection and is valid
 * from on_request until the handler ends the response (bt_http_respond / bt_http_stream_end) or
 * until on_abort is called, whichever comes first; after either, the handler must not touch it.
 *
 * Responses either go out whole (bt_http_respond) or streamed with chunked transfer encoding
 * (bt_http_stream_begin / _write / _end), which is how SSE is served. */
#ifndef BATON_HTTP_H
#define BATON_HTTP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/status.h"
#include "common/util.h"

typedef struct bt_http_server bt_http_server;
typedef struct bt_http_req bt_http_req;
typedef struct bt_http_output_peers bt_http_output_peers;

/* A HEAD request's response goes out without its body (the server drops it): a handler answers
 * HEAD as it answers GET. */
typedef enum { BT_HTTP_GET = 1, BT_HTTP_POST = 2, BT_HTTP_OTHER = 3, BT_HTTP_HEAD = 4, BT_HTTP_OPTIONS = 5 } bt_http_method;

struct bt_http_req {
    bt_http_method method;
    const char *path;         /* URL path without the query, NUL-terminated */
    const char *query;        /* after '?', or "" */
    const char *body;         /* NUL-terminated for convenience; body_len excludes the NUL */
    size_t body_len;
    const char *request_id;   /* X-Request-Id header value, or NULL */
    const char *authorization;/* Authorization header value, or NULL */
    const char *content_type; /* Content-Type header value, or NULL */
    const char *last_event_id;/* Last-Event-ID header value (an SSE client resuming), or NULL */
    const char *priority;     /* X-Priority header value, or NULL */
    const char *tenant;       /* X-Tenant header value, or NULL (trusted only if the frontend says so) */
    const char *origin;       /* Origin header value (a browser's cross-origin or POST request), or NULL */
    const char *preflight;    /* Access-Control-Request-Method header value (a CORS preflight), or NULL */
    const char *preflight_headers; /* Access-Control-Request-Headers header value (a preflight's), or NULL */
    void *user;               /* free for the handler */
};

typedef struct {
    /* A complete request arrived. The handler must eventually answer or get on_abort. */
    void (*on_request)(void *ud, bt_http_req *req);
    /* The client went away (read EOF/error, write error, or timeout) before the response ended.
     * The request object dies after this call returns. */
    void (*on_abort)(void *ud, bt_http_req *req);
    /* Optional: the connection's write backlog fell below the low-water mark after having
     * exceeded the high-water mark (for SSE backpressure). */
    void (*on_drain)(void *ud, bt_http_req *req);
    /* Optional: a request announced its body with Expect: 100-continue. Called once its headers are
     * in, before the 100 is sent, with req whole but its body (empty). True: the 100 goes out, the
     * body is read and on_request follows as for any request. False: the handler has answered req
     * within this call (bt_http_respond), and that final answer goes out instead of the 100, with
     * the connection closed after it (the body is never read: RFC 9110 §10.1.1). A client without
     * the right key is so refused before it uploads its body. */
    bool (*on_expect)(void *ud, bt_http_req *req);
} bt_http_handlers;

typedef struct {
    const char *host;            /* "0.0.0.0" */
    int port;                    /* 0 picks a free port */
    size_t max_header_bytes;     /* 16 KiB: larger → 431 and close */
    size_t max_body_bytes;       /* 4 MiB: larger → 413 and close */
    uint32_t idle_timeout_ms;    /* keep-alive idle, 60 s */
    uint32_t header_timeout_ms;  /* a request must arrive whole within this, 30 s (slowloris) */
    size_t max_connections;      /* beyond this new connections are closed at once; 0 = 10000 */
    size_t write_backlog_max;    /* a client that does not read: past this many queued bytes
                                    the connection is closed and on_abort called; 8 MiB */
    bool reuse_port;             /* SO_REUSEPORT: several servers (threads) listen on one port */
    bool reuse_port_first;       /* with reuse_port: the first of them; fails if the port is in use
                                    (SO_REUSEPORT alone would join another process's listener) */
    atomic_size_t *shared_conns; /* if set, max_connections counts the connections of every
                                    server sharing this counter */
    size_t max_body_total;       /* request body bytes being received at once (a declared
                                    Content-Length counts whole from its headers; given back when
                                    the request is dispatched): a body that would pass it is
                                    refused with 503 and the connection closed. 0 = no cap; else
                                    at least max_body_bytes (raised to it) */
    atomic_size_t *shared_bodies;/* if set, max_body_total counts the bodies of every server
                                    sharing this counter */
    size_t max_output_total;     /* response bytes queued for clients at once (what the socket
                                    did not take at once, until the kernel takes it): when a write
                                    would pass it, the connection of this server with the largest
                                    backlog is closed (on_abort), the writer's own if none is
                                    larger, or another loop's larger one (output_peers). 0 = no
                                    cap */
    atomic_size_t *shared_output;/* if set, max_output_total counts the backlogs of every server
                                    sharing this counter */
    bt_http_output_peers *output_peers; /* with shared_output, servers on other event loops: when
                                    one of them has a larger backlog than any here, it is that
                                    one that is closed (on its own loop), see below */
    int output_peer;             /* this server's index in output_peers */
    const char *allowed_hosts;   /* the Host names served (bt_http_host_allowed; copied), or NULL:
                                    then a server on a loopback address serves only IP literals,
                                    localhost and *.localhost, and one on any other address every
                                    Host. A request refused is a 403 host_not_allowed, and its
                                    connection closes */
} bt_http_config;               /* zero sizes mean the defaults; a zero timeout disables it */

void bt_http_config_default(bt_http_config *c);

/* Servers on several event loops (one each) sharing one max_output_total. Each publishes the size
 * of its largest backlog here, in atomics its own loop keeps (only when queued bytes change); a
 * write that would pass the total on one loop, when another loop's largest is larger than any of
 * its own, is admitted past the total and that loop is asked (uv_async_send) to close its largest
 * backlog on its next turn. Bytes so admitted are reserved against the asked loop's published
 * largest, so the total passes max_output_total by at most the sum of the other servers' largest
 * backlogs (each at most write_backlog_max, or one larger write onto an empty queue), and only
 * until those loops run. n servers, indexes 0..n-1; NULL when out of memory. Freed (free(NULL) a
 * no-op) once every server that used it is closed. */
bt_http_output_peers *bt_http_output_peers_new(int n);
void bt_http_output_peers_free(bt_http_output_peers *p);

bt_status bt_http_server_start(uv_loop_t *loop, const bt_http_config *cfg, const bt_http_handlers *h, void *ud,
                               bt_http_server **out, char *err, size_t errlen);
/* The port actually bound (useful with port 0). */
int bt_http_server_port(const bt_http_server *s);
/* Stops accepting new connections (existing ones continue). */
void bt_http_server_stop_accepting(bt_http_server *s);
/* Number of open client connections and of requests in flight (handed to on_request, not yet
 * ended or aborted). */
size_t bt_http_server_connections(const bt_http_server *s);
size_t bt_http_server_requests(const bt_http_server *s);
/* The server keeps the memory of closed connections for the next accepts (a bounded number);
 * this frees it and returns how many it freed. Loop thread; for an idle process giving memory
 * back. */
size_t bt_http_server_release_kept(bt_http_server *s);
/* Response bytes queued for clients and not yet taken by the kernel, over every server sharing
 * the counter (max_output_total); 0 when that cap is off (nothing is counted then). */
size_t bt_http_server_output_queued(const bt_http_server *s);

/* Limits hit since start: every refusal the server decides on its own is counted here. */
typedef struct {
    uint64_t max_connections; /* connections refused at the connection limit */
    uint64_t bad_request;     /* 400: not HTTP, a bad header line, Host missing or repeated */
    uint64_t body_too_large;  /* 413 */
    uint64_t header_too_large;/* 431 */
    uint64_t header_timeout;  /* a request not received whole in time (slowloris, idle opener) */
    uint64_t slow_reader;     /* a client that stopped reading past the backlog cap */
    uint64_t body_budget;     /* 503: a body past max_body_total */
    uint64_t output_budget;   /* connections closed as the largest backlog at max_output_total */
    uint64_t host_not_allowed; /* 403: a Host the server does not answer (allowed_hosts) */
    uint64_t no_descriptors;   /* accept(2) failed for want of a descriptor and libuv's fallback too */
} bt_http_stats;
void bt_http_server_stats(const bt_http_server *s, bt_http_stats *out);
/* Closes every connection (in-flight requests get on_abort) and frees the server once all
 * handles are closed, then calls done(ud). */
void bt_http_server_close(bt_http_server *s, void (*done)(void *ud), void *ud);

/* Header lines ("Name: value\r\n" each) that every response to req carries, after the ones each
 * call gives (copied; they replace any set before, so that a policy checked twice, in on_expect
 * and in on_request, sets them once). For headers a request's policy decides once (CORS) while
 * many code paths answer it. False when they do not fit (none set then). */
bool bt_http_set_headers(bt_http_req *req, const char *lines);

/* A whole response. `headers` is extra header lines, each ending in "\r\n", or NULL. Copies body. */
void bt_http_respond(bt_http_req *req, int status, const char *content_type, const char *headers, const char *body,
                     size_t len);
/* bt_http_respond with the bytes of b, or, when b holds a failed append (bt_buf_status), a 500
 * with a one-line text instead: a response built in a capped buffer never goes out cut. */
void bt_http_respond_buf(bt_http_req *req, int status, const char *content_type, const char *headers,
                         const bt_buf *b);
/* Starts a chunked response (e.g. text/event-stream). */
void bt_http_stream_begin(bt_http_req *req, int status, const char *content_type, const char *headers);
/* bt_http_stream_begin whose head is held back and goes out in the same write(2) as the next bytes
 * written on the connection (the first chunk), saving a syscall and a wakeup of the client per
 * stream; the caller writes at once after it, then calls bt_http_stream_flush_head, which writes
 * the head if nothing took it (the bytes on the wire are the same either way). */
void bt_http_stream_begin_held(bt_http_req *req, int status, const char *content_type, const char *headers);
void bt_http_stream_flush_head(bt_http_req *req);
/* Queues one chunk (copied). Returns false if the connection is already gone (write error or
 * backlog cap); on_abort then follows from the loop unless the handler ends the response first.
 * on_abort is never called from inside one of these calls. The process must ignore SIGPIPE. */
bool bt_http_stream_write(bt_http_req *req, const char *data, size_t len);
/* Ends the chunked response. If close is true the connection closes after it (no keep-alive). */
void bt_http_stream_end(bt_http_req *req, bool close);
/* Writes data as the last chunk and ends the response (keep-alive), in one write: the same
 * bytes as bt_http_stream_write + bt_http_stream_end(req, false), one syscall fewer. */
void bt_http_stream_finish(bt_http_req *req, const char *data, size_t len);
/* Bytes queued for the client and not yet written. */
size_t bt_http_backlog(const bt_http_req *req);
/* A hint, no effect on state: starts loading the connection state a bt_http_stream_write on req
 * will read (the socket handle and the response flags), so that a caller about to write to many
 * connections can overlap those cache misses (the frontend does, one engine step at a time). */
void bt_http_prefetch(const bt_http_req *req);

/* The Host rule, against DNS rebinding (docs/security.md). A page on evil.example whose name its
 * owner re-points to 127.0.0.1 makes the browser send requests to a server on this machine that
 * the browser takes for same-origin: it sends no Origin with a GET and lets the page read the
 * answer. Only the Host header still names evil.example, so a server answers only the names it
 * knows for its own.
 *
 * True when a request whose Host header is `host` (NULL: none, as HTTP/1.0 may send; "" too) is
 * served. `allowed` is a comma-separated list (bt_http_hosts_valid) or NULL, `loopback` whether
 * the server listens on a loopback address. Without a list, a server not on loopback serves every
 * Host (behind a load balancer it gets any name), one on loopback only these: an IP literal (IPv4,
 * or IPv6 in brackets), localhost and its subdomains, which browsers resolve to loopback
 * themselves and no page can re-point. With a list, those and the names listed (ASCII case
 * ignored; ".example.com" is example.com and every name under it); "*" serves every Host. The
 * port is not part of the match, nor a final dot of a name. A Host that is no host[:port] at all
 * is refused wherever a check applies. */
bool bt_http_host_allowed(const char *allowed, bool loopback, const char *host);
/* An allowed_hosts list as an operator gives it, named `flag` in the message: "*", or host names
 * ("api.example.com", ".example.com"), comma-separated, no scheme, port or path; none empty. */
bool bt_http_hosts_valid(const char *flag, const char *list, char *err, size_t errlen);
/* The numeric address `addr` is a loopback one: 127.0.0.0/8, ::1, or ::ffff:127.x.y.z. */
bool bt_http_addr_loopback(const char *addr);

/* Reason phrase of a status code ("Service Unavailable"). */
const char *bt_http_reason(int status);

#endif
