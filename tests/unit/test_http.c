/* test_http.c — unit tests of the frontend HTTP server (src/http/http.c).
 *
 * Each test starts a real server on 127.0.0.1 (port 0) in its own uv loop on the main thread and
 * drives it from a client thread with plain blocking sockets (5 s receive/send timeouts), so the
 * bytes on the wire are exactly what a real client sees. The client thread never calls cmocka:
 * it records the first failed check in the fixture, and the main thread asserts after joining.
 * When the client is done it wakes the loop with uv_async_send; the server is then closed and the
 * loop runs until every handle is gone. A 15 s watchdog timer bounds every test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/util.h"
#include "http/http.h"

/* ---------------------------------------------------------------------------------------------
 * Fixture: server + loop + client thread */

typedef enum { TICK_NONE, TICK_SLOW, TICK_STREAM, TICK_FOREVER, TICK_FLOOD, TICK_DRAIN } tick_mode;

typedef struct fixture fixture;
struct fixture {
    uv_loop_t loop;
    bt_http_config cfg;
    bt_http_server *srv;
    int port;
    uv_async_t async;
    uv_timer_t watchdog;
    uv_timer_t tick;
    pthread_t th;
    void (*client)(fixture *f);

    /* loop-thread state of the test handler */
    bt_http_req *held; /* request answered later by the tick timer */
    tick_mode mode;
    int stream_i;
    size_t stream_bytes;
    bool write_failed;
    bool abort_matched;
    int aborts_at_done;
    bt_http_stats at_abort; /* the server's counters when the last on_abort came */
    size_t burst_bytes;     /* /burst: bytes written */
    bool burst_failed;      /* /burst: a write was refused */
    atomic_int hog_loaded;  /* /hog: its backlog is built */
    fixture *peer;          /* test_output_total_peers: the server on the other loop */
    bool expect_hook;       /* test_expect_hook: the server gets h_expect as on_expect */
    atomic_int expects;     /* h_expect calls */

    /* shared with the client thread */
    atomic_int requests, aborts, drains, done_called;
    atomic_bool timed_out;

    /* written by the client thread, read after join */
    int fail_line;
    char fail_msg[256];
    int measured_ms;
};

static void client_fail(fixture *f, int line, const char *what) {
    if (f->fail_line) return;
    f->fail_line = line;
    snprintf(f->fail_msg, sizeof f->fail_msg, "%s", what);
}

#define CHECK(f, cond)                                                                                             \
    do {                                                                                                           \
        if (!(cond)) {                                                                                             \
            client_fail((f), __LINE__, #cond);                                                                     \
            return;                                                                                                \
        }                                                                                                          \
    } while (0)

static const char *method_name(bt_http_method m) {
    return m == BT_HTTP_GET ? "GET" : m == BT_HTTP_POST ? "POST" : m == BT_HTTP_HEAD ? "HEAD" : "OTHER";
}

/* "<METHOD> <path>?<query> rid=<..> auth=<..> ct=<..> body=<..>" */
static void respond_echo(bt_http_req *req) {
    bt_buf b;
    bt_buf_init(&b, 1u << 20);
    bt_buf_appendf(&b, "%s %s?%s rid=%s auth=%s ct=%s body=", method_name(req->method), req->path, req->query,
                   req->request_id ? req->request_id : "-", req->authorization ? req->authorization : "-",
                   req->content_type ? req->content_type : "-");
    bt_buf_append(&b, req->body, req->body_len);
    bt_http_respond(req, 200, "text/plain", "X-Test: yes\r\n", b.data, b.len);
    bt_buf_free(&b);
}

static void flood_burst(fixture *f);
static void drain_burst(fixture *f);

static void on_tick(uv_timer_t *t) {
    fixture *f = t->data;
    bt_http_req *req = f->held;
    if (!req) return;
    switch (f->mode) {
    case TICK_SLOW:
        f->held = NULL;
        uv_timer_stop(&f->tick);
        respond_echo(req);
        break;
    case TICK_STREAM: {
        char ev[32];
        int n = snprintf(ev, sizeof ev, "data: %d\n\n", f->stream_i);
        bt_http_stream_write(req, ev, (size_t)n);
        if (++f->stream_i == 5) {
            f->held = NULL;
            uv_timer_stop(&f->tick);
            bt_http_stream_end(req, false);
        }
        break;
    }
    case TICK_FOREVER:
        if (!bt_http_stream_write(req, "data: tick\n\n", 12)) f->write_failed = true;
        break;
    case TICK_FLOOD: flood_burst(f); break;
    case TICK_DRAIN: drain_burst(f); break;
    case TICK_NONE: break;
    }
}

static char big_chunk[64 * 1024];

/* Writes 1 MiB per tick until the server refuses (write backlog cap). */
static void flood_burst(fixture *f) {
    for (int i = 0; i < 16 && f->held && !f->write_failed; i++) {
        if (!bt_http_stream_write(f->held, big_chunk, sizeof big_chunk)) {
            f->write_failed = true; /* keep the request: on_abort follows */
            uv_timer_stop(&f->tick);
            return;
        }
        f->stream_bytes += sizeof big_chunk;
    }
}

#define DRAIN_TOTAL (16u * 1024u * 1024u)

/* Writes until the backlog passes the high-water mark, then waits for on_drain. */
static void drain_burst(fixture *f) {
    uv_timer_stop(&f->tick);
    bt_http_req *req = f->held;
    while (f->stream_bytes < DRAIN_TOTAL && bt_http_backlog(req) <= 256u * 1024u) {
        if (!bt_http_stream_write(req, big_chunk, sizeof big_chunk)) {
            f->write_failed = true;
            return;
        }
        f->stream_bytes += sizeof big_chunk;
    }
    if (f->stream_bytes >= DRAIN_TOTAL) {
        f->held = NULL;
        bt_http_stream_end(req, false);
    }
}

static void h_request(void *ud, bt_http_req *req) {
    fixture *f = ud;
    f->requests++;
    const char *p = req->path;
    if (strcmp(p, "/slow") == 0) {
        f->held = req;
        f->mode = TICK_SLOW;
        uv_timer_start(&f->tick, on_tick, 50, 0);
    } else if (strcmp(p, "/hang") == 0) {
        /* never answered: on_abort must come */
    } else if (strcmp(p, "/stream") == 0) {
        bt_http_stream_begin(req, 200, "text/event-stream", NULL);
        f->held = req;
        f->mode = TICK_STREAM;
        f->stream_i = 0;
        uv_timer_start(&f->tick, on_tick, 5, 5);
    } else if (strcmp(p, "/sync-stream") == 0) {
        bt_http_stream_begin(req, 200, "text/event-stream", "X-Sync: 1\r\n");
        bt_http_stream_write(req, "a", 1);
        bt_http_stream_write(req, "bc", 2);
        bt_http_stream_end(req, false);
    } else if (strcmp(p, "/held-stream") == 0) {
        /* the head held and written with the first chunk; the flush after it finds nothing left */
        bt_http_stream_begin_held(req, 200, "text/event-stream", "X-Sync: 1\r\n");
        bt_http_stream_write(req, "a", 1);
        bt_http_stream_flush_head(req);
        bt_http_stream_write(req, "bc", 2);
        bt_http_stream_end(req, false);
    } else if (strcmp(p, "/held-alone") == 0) {
        /* the head held, no chunk after it: the flush writes it by itself, before any chunk */
        bt_http_stream_begin_held(req, 200, "text/event-stream", "X-Sync: 1\r\n");
        bt_http_stream_flush_head(req);
        bt_http_stream_write(req, "ab", 2);
        bt_http_stream_finish(req, "c", 1);
    } else if (strcmp(p, "/finish-stream") == 0 || strcmp(p, "/finish-big") == 0) {
        /* bt_http_stream_finish: a small last chunk (framed in one buffer) or a large one (an iovec) */
        bt_http_stream_begin(req, 200, "text/event-stream", NULL);
        bt_http_stream_write(req, "a", 1);
        if (p[8] == 's') bt_http_stream_finish(req, "bcd", 3);
        else bt_http_stream_finish(req, big_chunk, 5000);
    } else if (strcmp(p, "/forever") == 0) {
        bt_http_stream_begin(req, 200, "text/event-stream", NULL);
        f->held = req;
        f->mode = TICK_FOREVER;
        uv_timer_start(&f->tick, on_tick, 5, 5);
    } else if (strcmp(p, "/flood") == 0) {
        bt_http_stream_begin(req, 200, "application/octet-stream", NULL);
        f->held = req;
        f->mode = TICK_FLOOD;
        uv_timer_start(&f->tick, on_tick, 1, 1);
    } else if (strcmp(p, "/hog") == 0) {
        /* a backlog of 600 KiB, built at once (the client does not read) */
        bt_http_stream_begin(req, 200, "application/octet-stream", NULL);
        f->held = req;
        for (int i = 0; i < 4096 && bt_http_backlog(req) < 600u * 1024u; i++)
            if (!bt_http_stream_write(req, big_chunk, sizeof big_chunk)) break;
        f->hog_loaded = 1;
    } else if (strcmp(p, "/burst") == 0) {
        /* a whole response whose last 500 KiB the socket does not take at once: it is answered
         * whole, with keep-alive, and the client reads it afterwards */
        bt_http_stream_begin(req, 200, "application/octet-stream", NULL);
        for (int i = 0; i < 4096 && bt_http_backlog(req) < 500u * 1024u; i++) {
            if (!bt_http_stream_write(req, big_chunk, sizeof big_chunk)) {
                f->burst_failed = true;
                break;
            }
            f->burst_bytes += sizeof big_chunk;
        }
        if (!f->burst_failed) bt_http_stream_end(req, false);
    } else if (strcmp(p, "/drain") == 0) {
        bt_http_stream_begin(req, 200, "application/octet-stream", NULL);
        f->held = req;
        f->mode = TICK_DRAIN;
        f->stream_bytes = 0;
        uv_timer_start(&f->tick, on_tick, 1, 0);
    } else {
        if (f->expect_hook && strcmp(p, "/ok") == 0) bt_http_set_headers(req, "X-Hook: seen\r\n"); /* again */
        respond_echo(req);
    }
}

/* on_expect of test_expect_hook: /deny is answered 401 before its body, /mute refused without an
 * answer (the server's 417), anything else goes on; every answer carries X-Hook (added here). */
static bool h_expect(void *ud, bt_http_req *req) {
    fixture *f = ud;
    f->expects++;
    bt_http_set_headers(req, "X-Hook: seen\r\n");
    if (strcmp(req->path, "/deny") == 0 && strcmp(req->query, "k=1") == 0) {
        bt_http_respond(req, 401, "text/plain", NULL, "no key", 6);
        return false;
    }
    return strcmp(req->path, "/mute") != 0;
}

static void h_abort(void *ud, bt_http_req *req) {
    fixture *f = ud;
    if (req == f->held) {
        f->abort_matched = true;
        f->held = NULL;
        uv_timer_stop(&f->tick);
    }
    bt_http_server_stats(f->srv, &f->at_abort);
    f->aborts++;
}

static void h_drain(void *ud, bt_http_req *req) {
    fixture *f = ud;
    f->drains++;
    if (f->mode == TICK_DRAIN && req == f->held) drain_burst(f);
}

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void on_server_done(void *ud) {
    fixture *f = ud;
    f->done_called++;
    f->aborts_at_done = f->aborts;
    f->srv = NULL;
    uv_close((uv_handle_t *)&f->async, on_handle_closed);
    uv_close((uv_handle_t *)&f->watchdog, on_handle_closed);
    uv_close((uv_handle_t *)&f->tick, on_handle_closed);
}

static void finish(fixture *f) {
    if (f->srv) bt_http_server_close(f->srv, on_server_done, f);
}

static void on_async(uv_async_t *a) { finish(a->data); }

static void on_watchdog(uv_timer_t *t) {
    fixture *f = t->data;
    f->timed_out = true;
    finish(f);
}

static void *client_main(void *arg) {
    fixture *f = arg;
    f->client(f);
    uv_async_send(&f->async);
    return NULL;
}

static void fixture_init(fixture *f) {
    memset(f, 0, sizeof *f);
    bt_http_config_default(&f->cfg);
    f->cfg.host = "127.0.0.1";
    f->cfg.port = 0;
    /* the scripts send "Host: t", a name a loopback server refuses by default: the Host rule has
     * tests of its own (test_host_rule, test_host_allowed) */
    f->cfg.allowed_hosts = "*";
}

/* Starts the server and the fixture's handles on its loop (not yet run). */
static void start_server(fixture *f) {
    assert_int_equal(uv_loop_init(&f->loop), 0);
    char err[256] = "";
    bt_http_handlers h = {h_request, h_abort, h_drain, f->expect_hook ? h_expect : NULL};
    assert_int_equal(bt_http_server_start(&f->loop, &f->cfg, &h, f, &f->srv, err, sizeof err), BT_OK);
    f->port = bt_http_server_port(f->srv);
    assert_true(f->port > 0);
    uv_async_init(&f->loop, &f->async, on_async);
    f->async.data = f;
    uv_timer_init(&f->loop, &f->watchdog);
    f->watchdog.data = f;
    uv_timer_start(&f->watchdog, on_watchdog, 15000, 0);
    uv_timer_init(&f->loop, &f->tick);
    f->tick.data = f;
}

/* Runs the server until the client thread is done, then closes it and checks the client's result. */
static void run(fixture *f, void (*client)(fixture *f)) {
    start_server(f);
    f->client = client;
    assert_int_equal(pthread_create(&f->th, NULL, client_main, f), 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    pthread_join(f->th, NULL);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    if (f->fail_line) fail_msg("client check failed at line %d: %s", f->fail_line, f->fail_msg);
    assert_false(f->timed_out);
    assert_int_equal(f->done_called, 1);
}

/* Runs the client script against a server of default settings and checks what the server saw:
 * the requests it handled and the aborts it reported (-1: that count is not checked). */
static void run_counted(void (*client)(fixture *f), int requests, int aborts) {
    fixture f;
    fixture_init(&f);
    run(&f, client);
    if (requests >= 0) assert_int_equal(f.requests, requests);
    if (aborts >= 0) assert_int_equal(f.aborts, aborts);
}

/* ---------------------------------------------------------------------------------------------
 * Blocking client */

typedef struct {
    int fd;
    http_parser p;
    char in[64 * 1024];
    size_t inlen;
    /* the last response */
    int status;
    bool complete;
    bool in_value;
    bt_buf body;
    char hdrs[4096]; /* "name: value\n" lines, names lowercased */
    size_t hlen;
} client;

static int ms_since(const struct timespec *t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int)((t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000);
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static bool wait_for(atomic_int *v, int want, int timeout_ms) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (atomic_load(v) < want) {
        if (ms_since(&t0) > timeout_ms) return false;
        sleep_ms(2);
    }
    return true;
}

static void hdr_add(client *c, const char *at, size_t len, bool lower) {
    for (size_t i = 0; i < len && c->hlen + 2 < sizeof c->hdrs; i++) {
        char ch = at[i];
        if (lower && ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
        c->hdrs[c->hlen++] = ch;
    }
    c->hdrs[c->hlen] = '\0';
}

static int ccb_begin(http_parser *p) {
    client *c = p->data;
    c->hlen = 0;
    c->hdrs[0] = '\0';
    c->in_value = false;
    bt_buf_reset(&c->body);
    bt_buf_append(&c->body, "", 0);
    return 0;
}
static int ccb_field(http_parser *p, const char *at, size_t len) {
    client *c = p->data;
    if (c->in_value) hdr_add(c, "\n", 1, false);
    c->in_value = false;
    hdr_add(c, at, len, true);
    return 0;
}
static int ccb_value(http_parser *p, const char *at, size_t len) {
    client *c = p->data;
    if (!c->in_value) hdr_add(c, ": ", 2, false);
    c->in_value = true;
    hdr_add(c, at, len, false);
    return 0;
}
static int ccb_headers_complete(http_parser *p) {
    client *c = p->data;
    if (c->in_value) hdr_add(c, "\n", 1, false);
    return 0;
}
static int ccb_body(http_parser *p, const char *at, size_t len) {
    client *c = p->data;
    bt_buf_append(&c->body, at, len);
    return 0;
}
static int ccb_complete(http_parser *p) {
    client *c = p->data;
    c->status = (int)p->status_code;
    c->complete = true;
    http_parser_pause(p, 1);
    return 0;
}
static const http_parser_settings client_settings = {
    .on_message_begin = ccb_begin,
    .on_header_field = ccb_field,
    .on_header_value = ccb_value,
    .on_headers_complete = ccb_headers_complete,
    .on_body = ccb_body,
    .on_message_complete = ccb_complete,
};

static client *cl_open(fixture *f, int rcvbuf) {
    client *c = calloc(1, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {5, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (rcvbuf) setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)f->port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(c->fd);
        free(c);
        return NULL;
    }
    http_parser_init(&c->p, HTTP_RESPONSE);
    c->p.data = c;
    bt_buf_init(&c->body, 64u << 20);
    return c;
}

static void cl_close(client *c) {
    if (!c) return;
    if (c->fd >= 0) close(c->fd);
    bt_buf_free(&c->body);
    free(c);
}

static bool cl_send(client *c, const char *data, size_t len) {
    while (len) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        data += n;
        len -= (size_t)n;
    }
    return true;
}

static bool cl_sends(client *c, const char *s) { return cl_send(c, s, strlen(s)); }

/* Reads one response (1xx included). Returns its status, -1 on EOF/reset, -2 on timeout, -3 on a
 * response the client parser rejects. */
static int cl_response(client *c) {
    c->complete = false;
    http_parser_pause(&c->p, 0);
    for (;;) {
        if (c->inlen) {
            size_t n = http_parser_execute(&c->p, &client_settings, c->in, c->inlen);
            memmove(c->in, c->in + n, c->inlen - n);
            c->inlen -= n;
            if (c->complete) return c->status;
            if (HTTP_PARSER_ERRNO(&c->p) != HPE_OK) return -3;
        }
        ssize_t n = recv(c->fd, c->in + c->inlen, sizeof c->in - c->inlen, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -2;
        if (n == 0) { /* EOF ends a close-delimited body */
            http_parser_execute(&c->p, &client_settings, NULL, 0);
            return c->complete ? c->status : -1;
        }
        if (n < 0) return -1;
        c->inlen += (size_t)n;
    }
}

/* Reads until EOF. Returns 0 on a clean EOF, -1 on reset, -2 on timeout. */
static int cl_wait_eof(client *c) {
    char buf[4096];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) continue;
        if (n == 0) return 0;
        if (errno == EINTR) continue;
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? -2 : -1;
    }
}

static bool has_header(const client *c, const char *line) { return strstr(c->hdrs, line) != NULL; }

static bool body_is(const client *c, const char *s) {
    return c->body.len == strlen(s) && memcmp(c->body.data, s, c->body.len) == 0;
}

/* ---------------------------------------------------------------------------------------------
 * Tests */

static void cl_get_post(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /v1/models?x=1&y=2 HTTP/1.1\r\nHost: t\r\nx-request-id: rid-7\r\n"
                         "AUTHORIZATION: Bearer k\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /v1/models?x=1&y=2 rid=rid-7 auth=Bearer k ct=- body="));
    CHECK(f, has_header(c, "content-type: text/plain\n"));
    CHECK(f, has_header(c, "connection: keep-alive\n"));
    CHECK(f, has_header(c, "x-test: yes\n"));
    CHECK(f, has_header(c, "content-length: 57\n"));
    cl_close(c);

    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         "Content-Length: 13\r\nConnection: close\r\n\r\n{\"a\":\"hello\"}"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /v1/chat/completions? rid=- auth=- ct=application/json body={\"a\":\"hello\"}"));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_get_post(void **state) {
    (void)state;
    run_counted(cl_get_post, 2, 0);
}

static void cl_keepalive(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    for (int i = 0; i < 3; i++) {
        CHECK(f, cl_sends(c, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n"));
        CHECK(f, cl_response(c) == 200);
        CHECK(f, body_is(c, "GET /a? rid=- auth=- ct=- body="));
    }
    /* HTTP/1.0 with Connection: keep-alive stays open too */
    CHECK(f, cl_sends(c, "GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, has_header(c, "connection: keep-alive\n"));
    CHECK(f, cl_sends(c, "GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* plain HTTP/1.0 closes after the response */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /d HTTP/1.0\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_keepalive(void **state) {
    (void)state;
    run_counted(cl_keepalive, 6, -1);
}

static void cl_pipelined(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    /* The first one is answered 50 ms later; the next two wait, buffered, and must follow in order. */
    CHECK(f, cl_sends(c, "GET /slow?n=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                         "POST /p?n=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                         "GET /p?n=3 HTTP/1.1\r\nHost: t\r\n\r\n"
                         "GET /slow?n=4 HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /slow?n=1 rid=- auth=- ct=- body="));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /p?n=2 rid=- auth=- ct=- body=abc"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /p?n=3 rid=- auth=- ct=- body="));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /slow?n=4 rid=- auth=- ct=- body="));
    cl_close(c);
}

static void test_pipelined(void **state) {
    (void)state;
    run_counted(cl_pipelined, 4, -1);
}

static void cl_chunked_body(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"));
    sleep_ms(20); /* split across reads */
    CHECK(f, cl_sends(c, "lo\r\n6\r\n world\r\n0\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /c? rid=- auth=- ct=- body=hello world"));
    /* Expect: 100-continue, as curl sends for large bodies */
    CHECK(f, cl_sends(c, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 100);
    CHECK(f, cl_sends(c, "12345"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /e? rid=- auth=- ct=- body=12345"));
    cl_close(c);
}

static void test_chunked_body_and_continue(void **state) {
    (void)state;
    run_counted(cl_chunked_body, 2, -1);
}

/* Sends s one byte at a time, each in its own segment as far as the kernel keeps them apart. */
static bool cl_sends_bytewise(client *c, const char *s) {
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    for (; *s; s++) {
        if (!cl_send(c, s, 1)) return false;
        sleep_ms(1);
    }
    return true;
}

/* Framing that http_parser's lenient build took (a bare CR or any two bytes for a CRLF, in the
 * start line, the headers, a chunk-size line, after chunk data, in the trailers): a 400 naming
 * it, the connection closed and the request pipelined behind never served, whole or split at
 * every byte; the same requests framed right are served, split at every byte too. An HTTP/1.0
 * request with Transfer-Encoding is served and the connection closed after it (RFC 9112 §6.1). */
#define CHUNKED_HEAD "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
static void cl_strict_framing(fixture *f) {
    static const struct {
        const char *req, *why;
    } bad[] = {
        {CHUNKED_HEAD "5\r\nhelloXY0\r\n\r\n", "chunk data not followed by CRLF"},
        {CHUNKED_HEAD "5\r\nhello\n\n0\r\n\r\n", "chunk data not followed by CRLF"},
        {CHUNKED_HEAD "5\rXhello\r\n0\r\n\r\n", "a CR not followed by LF"},
        {CHUNKED_HEAD "5;a=b\rXhello\r\n0\r\n\r\n", "a CR not followed by LF"},
        {CHUNKED_HEAD "5;a\nb\r\nhello\r\n0\r\n\r\n", "a chunk-size line that is not"},
        {CHUNKED_HEAD "5\nhello\r\n0\r\n\r\n", "a chunk-size line that is not"},
        {CHUNKED_HEAD "5;a=\x01\r\nhello\r\n0\r\n\r\n", "a chunk-size line that is not"},
        {CHUNKED_HEAD "5\r\nhello\r\n0\r\n\rX", "a CR not followed by LF"},
        {CHUNKED_HEAD "5\r\nhello\r\n0\r\nX-T: 1\rX: 2\r\n\r\n", "a CR not followed by LF"},
        {CHUNKED_HEAD "5\r\nhello\r\n0\r\n X-T: 1\r\n\r\n", "obsolete line folding"},
        {CHUNKED_HEAD "FFFFFFFFFFFFFFFFF\r\n", "chunk size too large"},
        /* 64 bits, past http_parser's bound of 2^60 - 2: the same words, not "more than 64 bits" */
        {CHUNKED_HEAD "FFFFFFFFFFFFFFFF\r\n", "chunk size too large (at most 2^60 - 2 bytes)"},
        {CHUNKED_HEAD "1000000000000000\r\n", "chunk size too large (at most 2^60 - 2 bytes)"},
        {"GET /a HTTP/1.1\r\nHost: t\r\n\rX", "a CR not followed by LF"},
        {"GET /a HTTP/1.1\r\nHost: t\rX-A: 1\r\n\r\n", "a CR not followed by LF"},
        {"GET /a HTTP/1.1\r\nHost: t\r\nX-A: 1\r\rX-B: 2\r\n\r\n", "a CR not followed by LF"},
        {"\rGET /a HTTP/1.1\r\nHost: t\r\n\r\n", "a CR not followed by LF"},
    };
    static const char next[] = "GET /next HTTP/1.1\r\nHost: t\r\n\r\n";
    char req[512];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        for (int split = 0; split < 2; split++) {
            snprintf(req, sizeof req, "%s%s", bad[i].req, next);
            client *c = cl_open(f, 0);
            CHECK(f, c);
            CHECK(f, split ? cl_sends_bytewise(c, req) : cl_sends(c, req));
            CHECK(f, cl_response(c) == 400);
            CHECK(f, strstr(c->body.data, "malformed HTTP request: ") && strstr(c->body.data, bad[i].why));
            CHECK(f, has_header(c, "connection: close\n"));
            CHECK(f, cl_response(c) == -1); /* closed, and /next never answered */
            cl_close(c);
        }
    }
    /* framed right: chunk extensions (with whitespace before them), trailers, bare LF ending
     * header and trailer lines, blank lines before the request line; then the next request */
    static const char *const good[] = {
        CHUNKED_HEAD "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        CHUNKED_HEAD "005 ;a=b;c=\"d\te\"\r\nhello\r\n6 ;x\r\n world\r\n0;last\r\nX-T: 1\r\nX-U: 2\n\r\n",
        "\r\n\nPOST /c HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n5\r\nhello\r\n6\r\n world\r\n0\r\n\n",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        for (int split = 0; split < 2; split++) {
            snprintf(req, sizeof req, "%s%s", good[i], next);
            client *c = cl_open(f, 0);
            CHECK(f, c);
            CHECK(f, split ? cl_sends_bytewise(c, req) : cl_sends(c, req));
            CHECK(f, cl_response(c) == 200);
            CHECK(f, body_is(c, "POST /c? rid=- auth=- ct=- body=hello world"));
            CHECK(f, cl_response(c) == 200);
            CHECK(f, body_is(c, "GET /next? rid=- auth=- ct=- body="));
            cl_close(c);
        }
    }
    /* HTTP/1.0 with Transfer-Encoding: served, then closed, keep-alive or not */
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /c HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /c? rid=- auth=- ct=- body=hello"));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_response(c) == -1);
    cl_close(c);
}

static void test_strict_framing(void **state) {
    (void)state;
    run_counted(cl_strict_framing, 3 * 2 * 2 + 1, -1);
}

/* on_expect sees the request before its body: a refusal is the final answer, no 100, and the
 * connection closes; a request let through gets its 100 and is served with its query intact and
 * the headers the hook added. Transfer codings other than chunked alone are a 501; a chunk size
 * past 64 bits is named as such. */
static void cl_expect_hook(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f,
          cl_sends(c, "POST /deny?k=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 401);
    CHECK(f, body_is(c, "no key"));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, has_header(c, "x-hook: seen\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /mute HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 417);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /ok?q=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 100);
    CHECK(f, cl_sends(c, "12345"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "POST /ok?q=2 rid=- auth=- ct=- body=12345"));
    CHECK(f, has_header(c, "x-hook: seen\n"));
    /* set in on_expect and again in on_request: once in the answer */
    CHECK(f, strstr(strstr(c->hdrs, "x-hook: seen\n") + 1, "x-hook:") == NULL);
    /* the next request on the connection carries no header of the previous one */
    CHECK(f, cl_sends(c, "GET /plain HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, !has_header(c, "x-hook: seen\n"));
    cl_close(c);

    const char *codings[] = {"Transfer-Encoding: gzip, chunked\r\n",
                             "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"};
    for (int i = 0; i < 2; i++) {
        c = cl_open(f, 0);
        CHECK(f, c);
        CHECK(f, cl_sends(c, "POST /x HTTP/1.1\r\nHost: t\r\n"));
        CHECK(f, cl_sends(c, codings[i]));
        CHECK(f, cl_sends(c, "\r\n2\r\n{}\r\n0\r\n\r\n"));
        CHECK(f, cl_response(c) == 501);
        CHECK(f, strstr(c->body.data, "Transfer-Encoding 'gzip, chunked' is not supported") != NULL);
        CHECK(f, strstr(c->body.data, "\"code\":\"not_implemented\"") != NULL);
        CHECK(f, cl_wait_eof(c) == 0);
        cl_close(c);
    }

    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\n"));
    CHECK(f, cl_response(c) == 400);
    CHECK(f, strstr(c->body.data, "malformed HTTP request: chunk size too large") != NULL);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_expect_hook(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.expect_hook = true;
    run(&f, cl_expect_hook);
    assert_int_equal(f.requests, 2); /* /ok and /plain: the refused ones never reached on_request */
    assert_int_equal(f.expects, 3);
}

static void cl_too_large(fixture *f) {
    const char *want = "{\"error\":{\"message\":\"request body too large (limit 1000 bytes)\","
                       "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"request_too_large\"}}";
    /* Content-Length over the limit, body sent anyway: the server drains it and answers. */
    client *c = cl_open(f, 0);
    CHECK(f, c);
    char body[5000];
    memset(body, 'x', sizeof body);
    CHECK(f, cl_sends(c, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"));
    CHECK(f, cl_send(c, body, sizeof body));
    CHECK(f, cl_response(c) == 413);
    CHECK(f, body_is(c, want));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, has_header(c, "content-type: application/json\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* Chunked body that grows past the limit. */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"));
    for (int i = 0; i < 3; i++) {
        CHECK(f, cl_sends(c, "1f4\r\n"));
        CHECK(f, cl_send(c, body, 500));
        CHECK(f, cl_sends(c, "\r\n"));
    }
    CHECK(f, cl_sends(c, "0\r\n\r\n"));
    CHECK(f, cl_response(c) == 413);
    CHECK(f, body_is(c, want));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* Expect: 100-continue with a huge length: 413 instead of 100, no body sent. */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 413);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* Header section too large. */
    c = cl_open(f, 0);
    CHECK(f, c);
    char big[3000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    CHECK(f, cl_sends(c, "GET / HTTP/1.1\r\nHost: t\r\nX-Big: "));
    CHECK(f, cl_sends(c, big));
    CHECK(f, cl_sends(c, "\r\n\r\n"));
    CHECK(f, cl_response(c) == 431);
    CHECK(f, body_is(c, "{\"error\":{\"message\":\"request header section too large (limit 1024 bytes)\","
                        "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"headers_too_large\"}}"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* Garbage. */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GARBAGE\x01\r\n\r\n"));
    CHECK(f, cl_response(c) == 400);
    CHECK(f, strstr(c->body.data, "\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"malformed_request\"}}") != NULL);
    CHECK(f, strncmp(c->body.data, "{\"error\":{\"message\":\"malformed HTTP request", 42) == 0);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);

    /* A bad request after a good one on the same connection. */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /ok HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nContent-Length: zz\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, cl_response(c) == 400);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_limits_and_errors(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.max_body_bytes = 1000;
    f.cfg.max_header_bytes = 1024;
    run(&f, cl_too_large);
    assert_int_equal(f.requests, 1);
    assert_int_equal(f.aborts, 0);
}

/* Reads a chunked response raw until its terminating chunk; returns headers+body in out. */
static bool read_raw_stream(client *c, bt_buf *out) {
    for (;;) {
        char *hend = out->data ? strstr(out->data, "\r\n\r\n") : NULL;
        if (hend && strstr(hend, "\r\n0\r\n\r\n")) return true;
        char buf[4096];
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n <= 0) return false;
        if (bt_buf_append(out, buf, (size_t)n) != BT_OK) return false;
    }
}

/* Decodes chunked framing strictly; returns the number of chunks or -1. */
static int dechunk(const char *p, const char *end, bt_buf *out) {
    int chunks = 0;
    for (;;) {
        char *e;
        unsigned long len = strtoul(p, &e, 16);
        if (e == p || e + 2 > end || e[0] != '\r' || e[1] != '\n') return -1;
        p = e + 2;
        if (len == 0) return (p + 2 == end && p[0] == '\r' && p[1] == '\n') ? chunks : -1;
        if (p + len + 2 > end || p[len] != '\r' || p[len + 1] != '\n') return -1;
        bt_buf_append(out, p, len);
        p += len + 2;
        chunks++;
    }
}

static void cl_stream(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"));
    bt_buf raw, dec;
    bt_buf_init(&raw, 1u << 20);
    bt_buf_init(&dec, 1u << 20);
    bool ok = read_raw_stream(c, &raw);
    char *hend = ok ? strstr(raw.data, "\r\n\r\n") : NULL;
    int n = hend ? dechunk(hend + 4, raw.data + raw.len, &dec) : -2;
    bool hdr_ok = hend && strstr(raw.data, "HTTP/1.1 200 OK\r\n") == raw.data &&
                  strstr(raw.data, "Transfer-Encoding: chunked\r\n") && strstr(raw.data, "Cache-Control: no-cache\r\n") &&
                  strstr(raw.data, "Content-Type: text/event-stream\r\n");
    bool body_ok = n == 5 && dec.len == 45 &&
                   memcmp(dec.data, "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n", 45) == 0;
    bt_buf_free(&raw);
    bt_buf_free(&dec);
    CHECK(f, ok);
    CHECK(f, hdr_ok);
    CHECK(f, body_ok);

    /* The same connection goes on: a stream made entirely inside on_request, then a plain one. */
    CHECK(f, cl_sends(c, "GET /sync-stream HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "abc"));
    CHECK(f, has_header(c, "transfer-encoding: chunked\n"));
    CHECK(f, has_header(c, "x-sync: 1\n"));
    CHECK(f, cl_sends(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /after? rid=- auth=- ct=- body="));

    /* A held head (bt_http_stream_begin_held): the same bytes, whether a chunk took it or the
     * flush wrote it alone; keep-alive goes on. */
    const char *held[] = {"/held-stream", "/held-alone"};
    for (int i = 0; i < 2; i++) {
        char line[64];
        snprintf(line, sizeof line, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", held[i]);
        CHECK(f, cl_sends(c, line));
        CHECK(f, cl_response(c) == 200);
        CHECK(f, body_is(c, "abc"));
        CHECK(f, has_header(c, "transfer-encoding: chunked\n"));
        CHECK(f, has_header(c, "x-sync: 1\n"));
        CHECK(f, has_header(c, "content-type: text/event-stream\n"));
    }
    CHECK(f, cl_sends(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /after? rid=- auth=- ct=- body="));

    /* The last chunk and the end of the body in one write, small and large; keep-alive goes on. */
    CHECK(f, cl_sends(c, "GET /finish-stream HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "abcd"));
    CHECK(f, cl_sends(c, "GET /finish-big HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, c->body.len == 5001 && c->body.data[0] == 'a' && memcmp(c->body.data + 1, big_chunk, 5000) == 0);
    CHECK(f, cl_sends(c, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /after? rid=- auth=- ct=- body="));

    /* HTTP/1.0 gets the stream raw, delimited by close. */
    client *c10 = cl_open(f, 0);
    CHECK(f, c10);
    CHECK(f, cl_sends(c10, "GET /sync-stream HTTP/1.0\r\n\r\n"));
    CHECK(f, cl_response(c10) == 200);
    CHECK(f, body_is(c10, "abc"));
    CHECK(f, !has_header(c10, "transfer-encoding"));
    cl_close(c10);
    c10 = cl_open(f, 0); /* a held head too */
    CHECK(f, c10);
    CHECK(f, cl_sends(c10, "GET /held-stream HTTP/1.0\r\n\r\n"));
    CHECK(f, cl_response(c10) == 200);
    CHECK(f, body_is(c10, "abc"));
    CHECK(f, !has_header(c10, "transfer-encoding"));
    cl_close(c10);
    c10 = cl_open(f, 0); /* and bt_http_stream_finish falls back to raw bytes and a close */
    CHECK(f, c10);
    CHECK(f, cl_sends(c10, "GET /finish-stream HTTP/1.0\r\n\r\n"));
    CHECK(f, cl_response(c10) == 200);
    CHECK(f, body_is(c10, "abcd"));
    CHECK(f, !has_header(c10, "transfer-encoding"));
    cl_close(c10);
    cl_close(c);
}

static void test_stream(void **state) {
    (void)state;
    run_counted(cl_stream, 12, 0);
}

/* The request, then PIPE_FLOOD bytes of pipelined requests: far past what the server buffers
 * behind a request in flight. */
#define PIPE_FLOOD (1u << 20)
static bool cl_send_flooded(client *c, const char *first) {
    static const char one[] = "GET /p HTTP/1.1\r\nHost: t\r\n\r\n";
    size_t n0 = strlen(first), per = sizeof one - 1, len = n0 + PIPE_FLOOD / per * per;
    char *buf = malloc(len);
    if (!buf) return false;
    memcpy(buf, first, n0);
    for (size_t off = n0; off < len; off += per) memcpy(buf + off, one, per);
    bool ok = cl_send(c, buf, len);
    free(buf);
    return ok;
}

/* A request the server holds, then the client closes: the server reports the abort. Flooded, the
 * request is followed by more pipelined bytes than the server keeps: it must not stop reading at
 * its cap, or the request would run for nobody. */
static void abort_pending(fixture *f, bool flood) {
    static const char req[] = "POST /hang HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi";
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, flood ? cl_send_flooded(c, req) : cl_sends(c, req));
    CHECK(f, wait_for(&f->requests, 1, 3000));
    sleep_ms(20);
    close(c->fd);
    c->fd = -1;
    CHECK(f, wait_for(&f->aborts, 1, 3000));
    cl_close(c);
}

static void cl_abort_pending(fixture *f) { abort_pending(f, false); }

static void test_abort_pending(void **state) {
    (void)state;
    run_counted(cl_abort_pending, 1, 1);
}

static void cl_abort_pending_flood(fixture *f) { abort_pending(f, true); }

static void test_abort_pending_flood(void **state) {
    (void)state;
    run_counted(cl_abort_pending_flood, 1, 1);
}

/* Past the cap the in-flight request is still answered, with Connection: close, and the
 * connection then closes: the dropped pipelined requests are never half-parsed. */
static void cl_pipeline_overflow_answer(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_send_flooded(c, "GET /slow?n=1 HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, body_is(c, "GET /slow?n=1 rid=- auth=- ct=- body="));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_pipeline_overflow_answer(void **state) {
    (void)state;
    run_counted(cl_pipeline_overflow_answer, 1, 0);
}

static void cl_abort_stream(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /forever HTTP/1.1\r\nHost: t\r\n\r\n"));
    char buf[256];
    CHECK(f, recv(c->fd, buf, sizeof buf, 0) > 0);
    sleep_ms(30);
    close(c->fd);
    c->fd = -1;
    CHECK(f, wait_for(&f->aborts, 1, 3000));
    cl_close(c);
}

static void test_abort_stream(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    run(&f, cl_abort_stream);
    assert_int_equal(f.aborts, 1);
    assert_true(f.abort_matched);
    assert_null(f.held);
}

static void cl_slowloris(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(f, cl_sends(c, "GET / HTTP/1.1\r\nHost: t\r\n"));
    sleep_ms(50);
    CHECK(f, cl_sends(c, "X-A: 1\r\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    f->measured_ms = ms_since(&t0);
    cl_close(c);

    /* Idle keep-alive connections are closed after idle_timeout_ms. */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
}

static void test_header_timeout(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.header_timeout_ms = 200;
    f.cfg.idle_timeout_ms = 200;
    run(&f, cl_slowloris);
    assert_true(f.measured_ms >= 150);
    assert_true(f.measured_ms < 2000);
    assert_int_equal(f.requests, 1);
}

static void cl_backlog(fixture *f) {
    client *c = cl_open(f, 4096); /* small receive window; never read */
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /flood HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&f->aborts, 1, 10000));
    /* the server closed its end: reading yields what was buffered, then EOF or reset */
    CHECK(f, cl_wait_eof(c) != -2);
    cl_close(c);
}

static void test_backlog_cap(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.write_backlog_max = 1u << 20;
    run(&f, cl_backlog);
    assert_int_equal(f.aborts, 1);
    assert_true(f.write_failed);
    assert_true(f.abort_matched);
    assert_true(f.stream_bytes > (1u << 20));
}

/* The total over connections (max_output_total) binds before the connection's own cap: the
 * client that does not read is cut as the largest backlog, counted as output_budget, and every
 * byte charged is given back. */
static void test_output_total(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    atomic_size_t queued = 0;
    f.cfg.max_output_total = 1u << 20;
    f.cfg.shared_output = &queued;
    run(&f, cl_backlog);
    assert_int_equal(f.aborts, 1);
    assert_true(f.write_failed);
    assert_true(f.abort_matched);
    assert_int_equal(f.at_abort.output_budget, 1);
    assert_int_equal(f.at_abort.slow_reader, 0); /* 8 MiB, the connection's own cap, never reached */
    assert_true(f.stream_bytes > (1u << 20));
    assert_int_equal(atomic_load(&queued), 0);
}

/* A hog holds 600 KiB queued; another client's response queues 500 KiB: together past the 1 MiB
 * total, and the hog, the largest backlog, is the one cut. The other is served whole. */
static void cl_largest_cut(fixture *f) {
    client *hog = cl_open(f, 4096), *other = cl_open(f, 4096);
    CHECK(f, hog && other);
    CHECK(f, cl_sends(hog, "GET /hog HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&f->hog_loaded, 1, 5000));
    CHECK(f, cl_sends(other, "GET /burst HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&f->aborts, 1, 5000));
    CHECK(f, cl_response(other) == 200); /* whole: the chunked body ended with its last chunk */
    f->measured_ms = (int)other->body.len;
    CHECK(f, cl_wait_eof(hog) != -2);
    cl_close(hog);
    cl_close(other);
}

static void test_output_total_largest(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.max_output_total = 1u << 20;
    run(&f, cl_largest_cut);
    assert_int_equal(f.aborts, 1);
    assert_true(f.abort_matched); /* the aborted request is the hog's */
    assert_false(f.burst_failed);
    assert_int_equal(f.at_abort.output_budget, 1);
    assert_int_equal((size_t)f.measured_ms, f.burst_bytes);
}

/* With two servers on two loops sharing the total (output_peers): the hog holds 600 KiB on the
 * other loop, and a response here queues 500 KiB past the 1 MiB total. The largest backlog is the
 * other loop's: that loop closes it, and the response here is served whole. */
static void cl_peer_cut(fixture *f) {
    fixture *far = f->peer;
    client *hog = cl_open(far, 4096), *other = cl_open(f, 4096);
    CHECK(f, hog && other);
    CHECK(f, cl_sends(hog, "GET /hog HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&far->hog_loaded, 1, 5000));
    CHECK(f, cl_sends(other, "GET /burst HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&far->aborts, 1, 5000));
    CHECK(f, cl_response(other) == 200);
    f->measured_ms = (int)other->body.len;
    CHECK(f, cl_wait_eof(hog) != -2);
    cl_close(hog);
    cl_close(other);
}

static void *loop_main(void *arg) {
    fixture *f = arg;
    uv_run(&f->loop, UV_RUN_DEFAULT);
    return NULL;
}

static void test_output_total_peers(void **state) {
    (void)state;
    fixture far, near;
    fixture_init(&far);
    fixture_init(&near);
    atomic_size_t queued = 0;
    bt_http_output_peers *peers = bt_http_output_peers_new(2);
    assert_non_null(peers);
    fixture *both[2] = {&far, &near};
    for (int i = 0; i < 2; i++) {
        both[i]->cfg.max_output_total = 1u << 20;
        both[i]->cfg.shared_output = &queued;
        both[i]->cfg.output_peers = peers;
        both[i]->cfg.output_peer = i;
    }
    start_server(&far); /* on a thread of its own, closed by its async once the client is done */
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, loop_main, &far), 0);
    near.peer = &far;
    run(&near, cl_peer_cut);
    uv_async_send(&far.async);
    pthread_join(th, NULL);
    assert_int_equal(uv_loop_close(&far.loop), 0);
    assert_false(far.timed_out);
    assert_int_equal(far.done_called, 1);
    /* the hog was cut, by its own loop, as the largest backlog of both */
    assert_int_equal(far.aborts, 1);
    assert_true(far.abort_matched);
    assert_int_equal(far.at_abort.output_budget, 1);
    /* the response that passed the total was admitted and served whole */
    assert_int_equal(near.aborts, 0);
    assert_false(near.burst_failed);
    assert_int_equal((size_t)near.measured_ms, near.burst_bytes);
    assert_int_equal(atomic_load(&queued), 0);
    bt_http_output_peers_free(peers);
}

static void cl_drain(fixture *f) {
    client *c = cl_open(f, 8192);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /drain HTTP/1.1\r\nHost: t\r\n\r\n"));
    sleep_ms(200); /* let the backlog build */
    CHECK(f, cl_response(c) == 200);
    CHECK(f, c->body.len == DRAIN_TOTAL);
    cl_close(c);
}

static void test_drain(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    run(&f, cl_drain);
    assert_true(f.drains >= 1);
    assert_int_equal(f.aborts, 0);
    assert_false(f.write_failed);
}

static void cl_max_conns(fixture *f) {
    client *a = cl_open(f, 0), *b = cl_open(f, 0);
    CHECK(f, a && b);
    CHECK(f, cl_sends(a, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(a) == 200);
    CHECK(f, cl_sends(b, "GET /b HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_response(b) == 200);
    client *c = cl_open(f, 0);
    CHECK(f, c);
    cl_sends(c, "GET /c HTTP/1.1\r\nHost: t\r\n\r\n"); /* may fail: the server closes at once */
    int st = cl_response(c);
    CHECK(f, st == 503 || st == -1);
    cl_close(c);
    cl_close(a);
    /* once a slot frees up, a new connection is served */
    bool served = false;
    for (int i = 0; i < 100 && !served; i++) {
        client *d = cl_open(f, 0);
        if (d && cl_sends(d, "GET /d HTTP/1.1\r\nHost: t\r\n\r\n") && cl_response(d) == 200) served = true;
        cl_close(d);
        if (!served) sleep_ms(20);
    }
    CHECK(f, served);
    cl_close(b);
}

static void test_max_connections(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.max_connections = 2;
    run(&f, cl_max_conns);
    assert_int_equal(f.requests, 3);
}

static void cl_close_inflight(fixture *f) {
    client *a = cl_open(f, 0), *b = cl_open(f, 0);
    CHECK(f, a && b);
    CHECK(f, cl_sends(a, "GET /hang HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, cl_sends(b, "GET /hang HTTP/1.1\r\nHost: t\r\n\r\n"));
    CHECK(f, wait_for(&f->requests, 2, 3000));
    uv_async_send(&f->async); /* close the server now, with both requests in flight */
    CHECK(f, cl_wait_eof(a) != -2);
    CHECK(f, cl_wait_eof(b) != -2);
    cl_close(a);
    cl_close(b);
}

static void *client_main_no_signal(void *arg) {
    fixture *f = arg;
    f->client(f);
    return NULL;
}

static void test_server_close_inflight(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    /* like run(), but the client signals the close itself while requests are in flight */
    assert_int_equal(uv_loop_init(&f.loop), 0);
    char err[256];
    bt_http_handlers h = {h_request, h_abort, NULL, NULL};
    assert_int_equal(bt_http_server_start(&f.loop, &f.cfg, &h, &f, &f.srv, err, sizeof err), BT_OK);
    f.port = bt_http_server_port(f.srv);
    uv_async_init(&f.loop, &f.async, on_async);
    f.async.data = &f;
    uv_timer_init(&f.loop, &f.watchdog);
    f.watchdog.data = &f;
    uv_timer_start(&f.watchdog, on_watchdog, 15000, 0);
    uv_timer_init(&f.loop, &f.tick);
    f.tick.data = &f;
    f.client = cl_close_inflight;
    assert_int_equal(pthread_create(&f.th, NULL, client_main_no_signal, &f), 0);
    uv_run(&f.loop, UV_RUN_DEFAULT);
    pthread_join(f.th, NULL);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    if (f.fail_line) fail_msg("client check failed at line %d: %s", f.fail_line, f.fail_msg);
    assert_false(f.timed_out);
    assert_int_equal(f.done_called, 1);
    assert_int_equal(f.requests, 2);
    assert_int_equal(f.aborts_at_done, 2);
}

static void on_done_flag(void *ud) { *(int *)ud += 1; }

/* The Host rule as the matcher applies it: defaults by the listening address, the list, "*". */
static void test_host_allowed(void **state) {
    (void)state;
    /* on loopback, no list: addresses and localhost only */
    static const char *const served[] = {"127.0.0.1", "127.0.0.1:8000", "10.1.2.3:80", "[::1]", "[::1]:8000",
                                         "[2001:db8::7]:1", "localhost", "LOCALHOST:8000", "localhost.",
                                         "app.localhost:3000", "a.b.localhost", "127.0.0.1:", NULL, ""};
    for (size_t i = 0; i < sizeof served / sizeof served[0]; i++)
        if (!bt_http_host_allowed(NULL, true, served[i])) fail_msg("refused '%s' on loopback", served[i]);
    static const char *const refused[] = {"evil.example", "evil.example:8000", "localhost.evil.example",
                                          "evillocalhost", "127.0.0.1.evil.example", "0x7f.1", "2130706433",
                                          "::1", "[::1", "[evil.example]", "[::1]x", "localhost:80x",
                                          "localhost:8000:1", "[]:80", ":80", "x"};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        if (bt_http_host_allowed(NULL, true, refused[i])) fail_msg("served '%s' on loopback", refused[i]);
        /* not on loopback and no list: no check at all */
        if (!bt_http_host_allowed(NULL, false, refused[i])) fail_msg("refused '%s' off loopback", refused[i]);
    }
    /* a list, on loopback or not: the names listed, addresses and localhost */
    const char *list = " API.example.com ,.corp.example., other.example";
    for (int lo = 0; lo < 2; lo++) {
        assert_true(bt_http_host_allowed(list, lo, "api.example.com"));
        assert_true(bt_http_host_allowed(list, lo, "Api.Example.Com:443"));
        assert_true(bt_http_host_allowed(list, lo, "api.example.com."));
        assert_true(bt_http_host_allowed(list, lo, "corp.example"));
        assert_true(bt_http_host_allowed(list, lo, "x.y.corp.example:8000"));
        assert_true(bt_http_host_allowed(list, lo, "other.example"));
        assert_true(bt_http_host_allowed(list, lo, "192.0.2.1:8000"));
        assert_true(bt_http_host_allowed(list, lo, "localhost:8000"));
        assert_true(bt_http_host_allowed(list, lo, NULL));
        assert_false(bt_http_host_allowed(list, lo, "x.api.example.com")); /* no leading dot: that name only */
        assert_false(bt_http_host_allowed(list, lo, "xcorp.example"));
        assert_false(bt_http_host_allowed(list, lo, "sub.other.example"));
        assert_false(bt_http_host_allowed(list, lo, "evil.example"));
        assert_false(bt_http_host_allowed(list, lo, "example.com"));
        assert_false(bt_http_host_allowed(list, lo, "api.example.com:x"));
        assert_true(bt_http_host_allowed("a.example, *", lo, "evil.example"));
        assert_true(bt_http_host_allowed("*", lo, "not a host at all"));
    }
}

static void test_hosts_valid(void **state) {
    (void)state;
    char err[400];
    const char *flag = "--allowed-hosts (BATON_ALLOWED_HOSTS)";
    assert_true(bt_http_hosts_valid(flag, NULL, err, sizeof err));
    assert_true(bt_http_hosts_valid(flag, "*", err, sizeof err));
    assert_true(bt_http_hosts_valid(flag, "api.example.com, .corp.example,my_host,", err, sizeof err));
    static const char *const bad[] = {"", " ", "a,,b", "http://api.example.com", "api.example.com:8000",
                                      "api.example.com/", "[::1]", ".", "a b", "*.example.com"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        if (bt_http_hosts_valid(flag, bad[i], err, sizeof err)) fail_msg("took '%s'", bad[i]);
        assert_non_null(strstr(err, flag));
    }
    assert_true(bt_http_hosts_valid(flag, "ok.example, http://x", err, sizeof err) == false);
    assert_non_null(strstr(err, "'http://x' is not a host name"));
}

static void test_addr_loopback(void **state) {
    (void)state;
    assert_true(bt_http_addr_loopback("127.0.0.1"));
    assert_true(bt_http_addr_loopback("127.8.9.10"));
    assert_true(bt_http_addr_loopback("::1"));
    assert_true(bt_http_addr_loopback("::ffff:127.0.0.1"));
    assert_false(bt_http_addr_loopback("0.0.0.0"));
    assert_false(bt_http_addr_loopback("::"));
    assert_false(bt_http_addr_loopback("10.0.0.1"));
    assert_false(bt_http_addr_loopback("128.0.0.1"));
    assert_false(bt_http_addr_loopback("::ffff:10.0.0.1"));
    assert_false(bt_http_addr_loopback("localhost")); /* not numeric: listeners are */
    assert_false(bt_http_addr_loopback(NULL));
}

/* A server on loopback with no list: a request for another name is a 403 host_not_allowed in
 * OpenAI's error shape, before its handler or a 100 Continue, and its connection closes; the
 * names of this machine, HTTP/1.0 without Host, are served; HTTP/1.1 without Host stays a 400. */
static void cl_host_rule(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /v1/models HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n"));
    CHECK(f, cl_response(c) == 403);
    CHECK(f, strstr(c->body.data, "\"code\":\"host_not_allowed\""));
    CHECK(f, strstr(c->body.data, "\"type\":\"invalid_request_error\""));
    CHECK(f, strstr(c->body.data, "Host 'evil.example:8000' is not served here"));
    CHECK(f, has_header(c, "connection: close\n"));
    CHECK(f, cl_wait_eof(c) == 0);
    cl_close(c);
    /* a body announced with Expect: the refusal comes instead of the 100 */
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "POST /p HTTP/1.1\r\nHost: EVIL.example\r\nContent-Length: 5\r\n"
                         "Expect: 100-continue\r\n\r\n"));
    CHECK(f, cl_response(c) == 403);
    cl_close(c);
    c = cl_open(f, 0);
    CHECK(f, c);
    static const char *const ok[] = {"localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char req[128];
        snprintf(req, sizeof req, "GET /a HTTP/1.1\r\nHost: %s\r\n\r\n", ok[i]);
        CHECK(f, cl_sends(c, req));
        CHECK(f, cl_response(c) == 200);
    }
    cl_close(c);
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /b HTTP/1.0\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    cl_close(c);
    c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /c HTTP/1.1\r\n\r\n"));
    CHECK(f, cl_response(c) == 400);
    cl_close(c);
}

/* The same server with the name listed serves it; on 0.0.0.0 with no list, any name is served. */
static void cl_host_listed(fixture *f) {
    client *c = cl_open(f, 0);
    CHECK(f, c);
    CHECK(f, cl_sends(c, "GET /a HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    CHECK(f, cl_sends(c, "GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
    CHECK(f, cl_response(c) == 200);
    cl_close(c);
}

static void test_host_rule(void **state) {
    (void)state;
    fixture f;
    fixture_init(&f);
    f.cfg.allowed_hosts = NULL;
    f.expect_hook = true;
    run(&f, cl_host_rule);
    assert_int_equal(f.requests, 5); /* the four names of this machine and the HTTP/1.0 request */
    assert_int_equal(f.expects, 0);  /* the refused Expect never reached the hook */
    fixture_init(&f);
    f.cfg.allowed_hosts = "other.example, Evil.Example";
    run(&f, cl_host_listed);
    assert_int_equal(f.requests, 2);
    fixture_init(&f);
    f.cfg.allowed_hosts = NULL;
    f.cfg.host = "0.0.0.0";
    run(&f, cl_host_listed);
    assert_int_equal(f.requests, 2);
}

static void test_bind_error(void **state) {
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    bt_http_config cfg;
    bt_http_config_default(&cfg);
    cfg.host = "127.0.0.1";
    cfg.port = 0;
    bt_http_handlers h = {h_request, h_abort, NULL, NULL};
    bt_http_server *a = NULL, *b = NULL;
    char err[256] = "";
    assert_int_equal(bt_http_server_start(&loop, &cfg, &h, NULL, &a, err, sizeof err), BT_OK);
    cfg.port = bt_http_server_port(a);
    assert_int_equal(bt_http_server_start(&loop, &cfg, &h, NULL, &b, err, sizeof err), BT_ERR_IO);
    assert_null(b);
    char want[128];
    snprintf(want, sizeof want, "cannot listen on 127.0.0.1:%d: address already in use", cfg.port);
    assert_string_equal(err, want);

    cfg.host = "not-an-address";
    assert_int_equal(bt_http_server_start(&loop, &cfg, &h, NULL, &b, err, sizeof err), BT_ERR_INVALID);
    assert_non_null(strstr(err, "not-an-address"));

    int done = 0;
    bt_http_server_stop_accepting(a);
    bt_http_server_close(a, on_done_flag, &done);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(done, 1);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_reason_and_defaults(void **state) {
    (void)state;
    assert_string_equal(bt_http_reason(200), "OK");
    assert_string_equal(bt_http_reason(413), "Payload Too Large");
    assert_string_equal(bt_http_reason(431), "Request Header Fields Too Large");
    assert_string_equal(bt_http_reason(499), "Client Closed Request");
    assert_string_equal(bt_http_reason(503), "Service Unavailable");
    assert_string_equal(bt_http_reason(504), "Gateway Timeout");
    assert_string_equal(bt_http_reason(429), "Too Many Requests");
    assert_non_null(bt_http_reason(999));
    bt_http_config c;
    bt_http_config_default(&c);
    assert_string_equal(c.host, "0.0.0.0");
    assert_int_equal(c.port, 8000);
    assert_int_equal(c.max_header_bytes, 16 * 1024);
    assert_int_equal(c.max_body_bytes, 4 * 1024 * 1024);
    assert_int_equal(c.idle_timeout_ms, 60000);
    assert_int_equal(c.header_timeout_ms, 30000);
    assert_int_equal(c.max_connections, 10000);
    assert_int_equal(c.write_backlog_max, 8 * 1024 * 1024);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* as the frontend does: write errors come back as EPIPE */
    memset(big_chunk, 'z', sizeof big_chunk);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reason_and_defaults),
        cmocka_unit_test(test_bind_error),
        cmocka_unit_test(test_host_allowed),
        cmocka_unit_test(test_hosts_valid),
        cmocka_unit_test(test_addr_loopback),
        cmocka_unit_test(test_host_rule),
        cmocka_unit_test(test_get_post),
        cmocka_unit_test(test_keepalive),
        cmocka_unit_test(test_pipelined),
        cmocka_unit_test(test_abort_pending_flood),
        cmocka_unit_test(test_pipeline_overflow_answer),
        cmocka_unit_test(test_chunked_body_and_continue),
        cmocka_unit_test(test_strict_framing),
        cmocka_unit_test(test_expect_hook),
        cmocka_unit_test(test_limits_and_errors),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_abort_pending),
        cmocka_unit_test(test_abort_stream),
        cmocka_unit_test(test_header_timeout),
        cmocka_unit_test(test_backlog_cap),
        cmocka_unit_test(test_output_total),
        cmocka_unit_test(test_output_total_largest),
        cmocka_unit_test(test_output_total_peers),
        cmocka_unit_test(test_drain),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_server_close_inflight),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
