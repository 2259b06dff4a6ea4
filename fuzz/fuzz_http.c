/* fuzz_http.c — libFuzzer driver for the frontend's HTTP/1.1 server (src/http/http.c).
 *
 * The real server runs once, on 127.0.0.1 port 0 in its own libuv loop, with small header and
 * body caps (so 431 and 413 are reachable with small inputs) and a handler that answers every
 * request: whole responses, chunked streams ended in each of the three ways, and answers deferred
 * to a later loop iteration. The first input byte picks how the client writes (all at once or in
 * small pieces with the loop running in between, and whether it half-closes at once or only once
 * the server is idle); the rest is what a client sends on one connection. After the server closes
 * the connection, the bytes the client received are parsed as HTTP/1.1 responses, and checked:
 * they start with "HTTP/1.1 ", parse without error, each answered request appears in order with
 * the status and body the handler gave it, a 400/413/431/501/505 can only be the last response, and
 * nothing follows a "Connection: close" response; and when the first request's head (the request
 * line and header section, or the blank lines before them) holds a bare CR, a CR followed by
 * anything but LF, which http_parser's lenient build took for a CRLF, the handler gets no request
 * at all; when it is an HTTP/1.0 request with a Transfer-Encoding line, the handler gets no
 * request after it (the connection closes after its answer); when it has a chunked body whose
 * framing breaks (a chunk-size line or the CRLF after chunk data not as RFC 9112 §7.1 writes them,
 * a bare CR or a folded line in the trailers), the handler gets no request at all. The handler
 * checks every request it gets
 * (NUL-terminated fields within the caps, a path without query or fragment) and the server must
 * return to no connections and no requests in flight after every input. A violated invariant
 * aborts, so libFuzzer reports it like a crash. Seeds are in fuzz/corpus/http/; build and run
 * with fuzz/build.sh. */
#include <errno.h>
#include <http_parser.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "check.h"
#include "common/log.h"
#include "common/util.h"
#include "http/http.h"

#define MAX_HEADER 512u
#define MAX_BODY 1024u
#define MAX_EXPECTED 64  /* answers recorded per input; more requests than this are not compared */
#define RESP_CAP (1u << 20)
#define DEADLINE_MS 5000 /* an input whose connection is still open after this is a hang */

/* What the handler answered, in order, for one input. */
typedef struct {
    int status;
    bool sure; /* answered from on_request itself, before the server could have seen EOF */
    bt_buf body;
} answer;

typedef struct deferred deferred;
struct deferred {
    bt_http_req *req;
    bool stream;
    int idx; /* into answers, or -1 */
    deferred *next;
};

static uv_loop_t g_loop;
static bt_http_server *g_srv;
static int g_port;
static uv_idle_t g_idle;

/* per input */
static answer g_ans[MAX_EXPECTED];
static int g_nans;
static bool g_ans_overflow;
static deferred *g_deferred;
static int g_seq; /* requests seen */
static const uint8_t *g_in;
static size_t g_in_len, g_in_off, g_piece;
static bool g_shut_at_once, g_shut, g_eof, g_reset;
static int g_fd;
static int g_quiet_rounds;
static bt_buf g_resp;
static uint64_t g_start_ms;
static bool g_verbose; /* FUZZ_HTTP_VERBOSE=1: one line per input with answers and responses */

static int record(int status, bool sure, const char *body, size_t len) {
    if (g_nans >= MAX_EXPECTED) {
        g_ans_overflow = true;
        return -1;
    }
    answer *a = &g_ans[g_nans];
    a->status = status;
    a->sure = sure;
    bt_buf_reset(&a->body);
    if (len) CHECK(bt_buf_append(&a->body, body, len) == BT_OK);
    return g_nans++;
}

static void check_request(const bt_http_req *r) {
    CHECK(r->method == BT_HTTP_GET || r->method == BT_HTTP_POST || r->method == BT_HTTP_OTHER ||
          r->method == BT_HTTP_HEAD || r->method == BT_HTTP_OPTIONS);
    CHECK(r->path && r->query && r->body);
    CHECK(strlen(r->path) <= MAX_HEADER && strlen(r->query) <= MAX_HEADER);
    CHECK(!strchr(r->path, '?') && !strchr(r->path, '#'));
    CHECK(r->body_len <= MAX_BODY && r->body[r->body_len] == '\0');
    if (r->request_id) CHECK(strlen(r->request_id) <= MAX_HEADER);
    if (r->authorization) CHECK(strlen(r->authorization) <= MAX_HEADER);
    if (r->content_type) CHECK(strlen(r->content_type) <= MAX_HEADER);
    CHECK(r->user == NULL);
}

/* A streamed answer: three chunks, or one chunk and a finish, or one chunk and a closing end. */
static void answer_stream(bt_http_req *r, char kind, bool sure) {
    char c[3][32];
    int n = g_seq;
    for (int i = 0; i < 3; i++) snprintf(c[i], sizeof c[i], "data: %d.%d\n\n", n, i);
    bt_http_stream_begin(r, 200, "text/event-stream", "X-Fuzz: 1\r\n");
    bt_buf exp;
    bt_buf_init(&exp, 4096);
    if (kind == 'f') {
        bt_http_stream_write(r, c[0], strlen(c[0]));
        bt_http_stream_finish(r, c[1], strlen(c[1]));
        bt_buf_append_str(&exp, c[0]);
        bt_buf_append_str(&exp, c[1]);
    } else if (kind == 'c') {
        bt_http_stream_write(r, c[0], strlen(c[0]));
        bt_http_stream_end(r, true);
        bt_buf_append_str(&exp, c[0]);
    } else {
        for (int i = 0; i < 3; i++) {
            bt_http_stream_write(r, c[i], strlen(c[i]));
            bt_buf_append_str(&exp, c[i]);
        }
        bt_http_stream_end(r, false);
    }
    record(200, sure, exp.data, exp.len);
    bt_buf_free(&exp);
}

static void answer_whole(bt_http_req *r, bool sure) {
    if (r->method == BT_HTTP_OTHER || r->method == BT_HTTP_HEAD) { /* HEAD among them: no body, so the response parser needs none */
        bt_http_respond(r, 204, NULL, NULL, NULL, 0);
        record(204, sure, NULL, 0);
        return;
    }
    char body[160];
    int n = snprintf(body, sizeof body, "{\"n\":%d,\"method\":%d,\"path_len\":%zu,\"body_len\":%zu}", g_seq,
                     (int)r->method, strlen(r->path), r->body_len);
    bt_http_respond(r, 200, "application/json", "X-Fuzz: 1\r\n", body, (size_t)n);
    record(200, sure, body, (size_t)n);
}

static void on_request(void *ud, bt_http_req *r) {
    (void)ud;
    check_request(r);
    g_seq++;
    char k = r->path[0] == '/' ? r->path[1] : 0;
    if (r->method != BT_HTTP_OTHER && r->method != BT_HTTP_HEAD && (k == 's' || k == 'f' || k == 'c')) {
        answer_stream(r, k, true);
    } else if (k == 'a' || k == 'd') {
        deferred *d = calloc(1, sizeof *d);
        CHECK(d != NULL);
        d->req = r;
        d->stream = k == 'd' && r->method != BT_HTTP_OTHER && r->method != BT_HTTP_HEAD;
        r->user = d;
        d->next = g_deferred;
        g_deferred = d;
    } else {
        answer_whole(r, true);
    }
}

static void on_abort(void *ud, bt_http_req *r) {
    (void)ud;
    deferred *d = r->user;
    CHECK(d != NULL); /* only deferred requests can still be owned by the handler */
    for (deferred **pp = &g_deferred; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            free(d);
            return;
        }
    }
    CHECK(!"aborted request not in the deferred list");
}

static void answer_deferred(void) {
    while (g_deferred) {
        deferred *d = g_deferred;
        g_deferred = d->next;
        bt_http_req *r = d->req;
        bool stream = d->stream;
        free(d);
        r->user = NULL;
        if (stream) answer_stream(r, 's', false);
        else answer_whole(r, false);
    }
}

/* Client side, run on every loop iteration (the idle handle keeps the loop from blocking). */
static void on_idle(uv_idle_t *h) {
    (void)h;
    CHECK(uv_now(&g_loop) - g_start_ms < DEADLINE_MS);
    answer_deferred();
    bool progress = false;
    if (!g_shut && !g_reset && g_in_off < g_in_len) {
        size_t n = g_in_len - g_in_off;
        if (g_piece && n > g_piece) n = g_piece;
        ssize_t w = send(g_fd, g_in + g_in_off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            g_in_off += (size_t)w;
            progress = true;
        } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            g_reset = true; /* the server closed on us (EPIPE / ECONNRESET) */
        }
    }
    char buf[16384];
    while (!g_eof) {
        ssize_t r = recv(g_fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            CHECK(bt_buf_append(&g_resp, buf, (size_t)r) == BT_OK);
            progress = true;
        } else if (r == 0) {
            g_eof = true;
        } else {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            g_reset = true;
            g_eof = true;
        }
    }
    g_quiet_rounds = progress ? 0 : g_quiet_rounds + 1;
    if (!g_shut && (g_reset || g_in_off == g_in_len)) {
        /* half-close: at once, or once the server has answered everything it can */
        if (g_shut_at_once || g_reset ||
            (g_quiet_rounds >= 4 && !g_deferred && bt_http_server_requests(g_srv) == 0)) {
            shutdown(g_fd, SHUT_WR);
            g_shut = true;
        }
    }
    if (g_eof && g_shut && bt_http_server_connections(g_srv) == 0) uv_stop(&g_loop);
}

/* ---- response checking ---- */

typedef struct {
    int status;
    bool keep_alive;
    bool done;
    bt_buf body;
} parsed;

static parsed g_got[MAX_EXPECTED + 8];
static int g_ngot;
static bool g_got_overflow;

static int rp_begin(http_parser *p) {
    (void)p;
    if (g_ngot >= (int)(sizeof g_got / sizeof g_got[0])) {
        g_got_overflow = true;
        return -1;
    }
    parsed *x = &g_got[g_ngot++];
    x->status = 0;
    x->done = false;
    bt_buf_reset(&x->body);
    return 0;
}
static int rp_headers(http_parser *p) {
    g_got[g_ngot - 1].status = (int)p->status_code;
    return 0;
}
static int rp_body(http_parser *p, const char *at, size_t len) {
    (void)p;
    CHECK(bt_buf_append(&g_got[g_ngot - 1].body, at, len) == BT_OK);
    return 0;
}
static int rp_complete(http_parser *p) {
    g_got[g_ngot - 1].done = true;
    g_got[g_ngot - 1].keep_alive = http_should_keep_alive(p);
    return 0;
}
static const http_parser_settings rp_settings = {
    .on_message_begin = rp_begin,
    .on_headers_complete = rp_headers,
    .on_body = rp_body,
    .on_message_complete = rp_complete,
};

/* True when the first request of the input holds a bare CR (one followed by a byte other than LF)
 * before its header section ends: the server refuses it (frame_scan in http.c) and so can have
 * handed no request to the handler. Worked out here independently of the server: the head ends
 * at the first blank line after the request line (LF, or CRLF, right after an LF). A CR as the
 * input's last byte is not bare (the server still waits for what follows). */
static bool first_head_bare_cr(const uint8_t *in, size_t len) {
    bool started = false, line_start = false;
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\r') {
            if (i + 1 < len && in[i + 1] != '\n') return true;
            continue; /* its LF comes next */
        }
        if (in[i] == '\n') {
            if (started && line_start) return false; /* the blank line: the head ended whole */
            line_start = started;
            continue;
        }
        started = true;
        line_start = false;
    }
    return false;
}

/* True when the first request of the input is HTTP/1.0 (its request line ends in " HTTP/1.0") and
 * has a Transfer-Encoding line in its header section: served at most, never followed by another
 * (RFC 9112 §6.1: the connection closes after it). */
static bool first_http10_te(const uint8_t *in, size_t len) {
    size_t i = 0;
    while (i < len && (in[i] == '\r' || in[i] == '\n')) i++;
    bool http10 = false;
    for (int line = 0; i < len; line++) {
        const uint8_t *lf = memchr(in + i, '\n', len - i);
        if (!lf) return false; /* the head never ends: nothing is served */
        size_t n = (size_t)(lf - (in + i));
        if (n && in[i + n - 1] == '\r') n--;
        if (line > 0 && n == 0) return false; /* the blank line: no Transfer-Encoding */
        if (line == 0) http10 = n >= 9 && memcmp(in + i + n - 9, " HTTP/1.0", 9) == 0;
        else if (http10 && n >= 18 && strncasecmp((const char *)in + i, "transfer-encoding:", 18) == 0) return true;
        i += (size_t)(lf - (in + i)) + 1;
    }
    return false;
}

static int hex_digit(uint8_t ch) {
    return ch >= '0' && ch <= '9'   ? ch - '0'
           : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
           : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                    : -1;
}

/* True when the first request of the input has a Transfer-Encoding line of "chunked" alone and its
 * body, read strictly, breaks within the input: the server refuses it (or refuses it earlier for
 * something else) and so hands no request to the handler. Worked out independently of the
 * server; no claim (false) where the server could read otherwise without being wrong: a head with
 * a bare CR (first_head_bare_cr's), more than one Transfer-Encoding line, CONNECT (http_parser
 * reads no body after it), chunks larger than the input could hold, an input that stops before
 * the break is certain. */
static bool first_chunked_broken(const uint8_t *in, size_t len) {
    size_t i = 0;
    while (i < len && (in[i] == '\r' || in[i] == '\n')) i++;
    if (len - i >= 8 && memcmp(in + i, "CONNECT ", 8) == 0) return false;
    int te_lines = 0;
    bool chunked = false;
    for (int line = 0;; line++) {
        const uint8_t *lf = i < len ? memchr(in + i, '\n', len - i) : NULL;
        if (!lf) return false;
        size_t n = (size_t)(lf - (in + i)), next = i + n + 1;
        if (n && in[i + n - 1] == '\r') n--;
        if (memchr(in + i, '\r', n)) return false;
        if (line > 0 && n == 0) {
            i = next;
            break;
        }
        if (line > 0 && n >= 18 && strncasecmp((const char *)in + i, "transfer-encoding:", 18) == 0) {
            size_t a = i + 18, b = i + n;
            while (a < b && (in[a] == ' ' || in[a] == '\t')) a++;
            while (b > a && (in[b - 1] == ' ' || in[b - 1] == '\t')) b--;
            chunked = b - a == 7 && strncasecmp((const char *)in + a, "chunked", 7) == 0;
            te_lines++;
        }
        i = next;
    }
    if (!chunked || te_lines != 1) return false;
    for (;;) { /* chunks */
        uint64_t size = 0;
        size_t digits = 0;
        for (; i < len && hex_digit(in[i]) >= 0; i++, digits++) {
            size = size * 16 + (uint64_t)hex_digit(in[i]);
            if (size > len) return false;
        }
        if (i >= len) return false;
        if (!digits) return true;
        if (in[i] == ' ' || in[i] == '\t' || in[i] == ';')
            for (; i < len && in[i] != '\r'; i++)
                if ((in[i] < 0x20 && in[i] != '\t') || in[i] == 0x7f) return true;
        if (i >= len) return false;
        if (in[i] != '\r') return true;
        if (i + 1 >= len) return false;
        if (in[i + 1] != '\n') return true;
        i += 2;
        if (size == 0) break;
        if (len - i < size + 1) return false;
        i += size;
        if (in[i] != '\r') return true;
        if (i + 1 >= len) return false;
        if (in[i + 1] != '\n') return true;
        i += 2;
    }
    for (bool start = true; i < len; i++) { /* the trailer section */
        if (in[i] == '\r') {
            if (i + 1 >= len) return false;
            if (in[i + 1] != '\n') return true;
            continue;
        }
        if (in[i] == '\n') {
            if (start) return false; /* its blank line: the body is whole */
            start = true;
            continue;
        }
        if (start && (in[i] == ' ' || in[i] == '\t')) return true;
        start = false;
    }
    return false;
}

static void check_responses(void) {
    if (first_chunked_broken(g_in, g_in_len)) CHECK(g_seq == 0);
    if (first_head_bare_cr(g_in, g_in_len)) CHECK(g_seq == 0);
    if (first_http10_te(g_in, g_in_len)) CHECK(g_seq <= 1);
    if (g_resp.len == 0) return; /* e.g. blank input, or a request never completed */
    CHECK(g_resp.len >= 9 && memcmp(g_resp.data, "HTTP/1.1 ", 9) == 0);
    if (g_reset) { /* the tail may be lost with a reset; the start was checked */
        if (g_verbose) fprintf(stderr, "fuzz_http: connection reset after %zu bytes\n", g_resp.len);
        return;
    }
    http_parser p;
    http_parser_init(&p, HTTP_RESPONSE);
    g_ngot = 0;
    g_got_overflow = false;
    size_t n = http_parser_execute(&p, &rp_settings, g_resp.data, g_resp.len);
    if (g_got_overflow) return;
    if (HTTP_PARSER_ERRNO(&p) == HPE_OK) http_parser_execute(&p, &rp_settings, NULL, 0); /* EOF */
    if (HTTP_PARSER_ERRNO(&p) != HPE_OK || n != g_resp.len) {
        fprintf(stderr, "fuzz_http: response stream does not parse: %s at %zu of %zu\n",
                http_errno_name(HTTP_PARSER_ERRNO(&p)), n, g_resp.len);
        CHECK(!"responses parse");
    }
    if (g_verbose) {
        fprintf(stderr, "fuzz_http: %d answers:", g_nans);
        for (int i = 0; i < g_nans; i++) fprintf(stderr, " %d%s", g_ans[i].status, g_ans[i].sure ? "" : "?");
        fprintf(stderr, "; %d responses:", g_ngot);
        for (int i = 0; i < g_ngot; i++)
            fprintf(stderr, " %d/%zu%s", g_got[i].status, g_got[i].body.len, g_got[i].keep_alive ? "" : "/close");
        fprintf(stderr, "\n");
    }
    int k = 0; /* index into the handler's answers */
    for (int i = 0; i < g_ngot; i++) {
        parsed *x = &g_got[i];
        CHECK(x->done);
        if (x->status == 100) continue;
        if (x->status == 400 || x->status == 413 || x->status == 431 || x->status == 501 || x->status == 505) {
            CHECK(i == g_ngot - 1); /* the server's own error answer ends the connection */
            CHECK(!x->keep_alive);
            continue;
        }
        if (k >= g_nans) { /* more answers than the handler gave, unless it gave too many to record */
            CHECK(g_ans_overflow);
            return;
        }
        CHECK(x->status == g_ans[k].status);
        CHECK(x->body.len == g_ans[k].body.len &&
              (x->body.len == 0 || memcmp(x->body.data, g_ans[k].body.data, x->body.len) == 0));
        if (!x->keep_alive) CHECK(i == g_ngot - 1);
        k++;
    }
    /* Every answer given from on_request went out, unless the connection ended (close or error
     * answer) before its request or a deferred answer met a closing connection. */
    bool ended_early = false;
    for (int i = 0; i < g_ngot; i++)
        if (!g_got[i].keep_alive) ended_early = true;
    if (!ended_early && !g_ans_overflow)
        for (int j = k; j < g_nans; j++) CHECK(!g_ans[j].sure);
}

/* ---- setup and the per-input run ---- */

/* Called by libFuzzer once, before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    g_verbose = getenv("FUZZ_HTTP_VERBOSE") != NULL;
    setenv("DYN_LOG", "error", 1);
    bt_log_init("fuzz");
    signal(SIGPIPE, SIG_IGN);
    CHECK(uv_loop_init(&g_loop) == 0);
    bt_http_config cfg;
    bt_http_config_default(&cfg);
    cfg.host = "127.0.0.1";
    cfg.port = 0;
    cfg.max_header_bytes = MAX_HEADER;
    cfg.max_body_bytes = MAX_BODY;
    cfg.idle_timeout_ms = 0; /* every connection ends by the client's EOF, not by a timer */
    cfg.header_timeout_ms = 0;
    /* the oracle models framing, not the Host rule (tests/unit/test_http.c has it): the corpus
     * sends "Host: f", which a loopback server refuses by default */
    cfg.allowed_hosts = "*";
    static const bt_http_handlers h = {on_request, on_abort, NULL, NULL};
    char err[256];
    CHECK(bt_http_server_start(&g_loop, &cfg, &h, NULL, &g_srv, err, sizeof err) == BT_OK);
    g_port = bt_http_server_port(g_srv);
    CHECK(g_port > 0);
    CHECK(uv_idle_init(&g_loop, &g_idle) == 0);
    for (int i = 0; i < MAX_EXPECTED; i++) bt_buf_init(&g_ans[i].body, 64u * 1024);
    for (size_t i = 0; i < sizeof g_got / sizeof g_got[0]; i++) bt_buf_init(&g_got[i].body, RESP_CAP);
    bt_buf_init(&g_resp, RESP_CAP);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t mode = data[0];
    g_in = data + 1;
    g_in_len = size - 1;
    g_in_off = 0;
    static const size_t pieces[4] = {0, 1, 7, 64};
    g_piece = pieces[mode & 3];
    g_shut_at_once = (mode & 4) == 0;
    g_shut = g_eof = g_reset = false;
    g_quiet_rounds = 0;
    g_nans = 0;
    g_ans_overflow = false;
    g_seq = 0;
    bt_buf_reset(&g_resp);

    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)g_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* a busy machine may run short of ephemeral ports for a moment: retry, it is not the server */
    for (int tries = 0;; tries++) {
        g_fd = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(g_fd >= 0);
        if (connect(g_fd, (struct sockaddr *)&a, sizeof a) == 0) break;
        CHECK(errno == EADDRNOTAVAIL || errno == EAGAIN || errno == EINTR);
        CHECK(tries < 1000);
        close(g_fd);
        usleep(1000);
    }

    uv_update_time(&g_loop);
    g_start_ms = uv_now(&g_loop);
    CHECK(uv_idle_start(&g_idle, on_idle) == 0);
    uv_run(&g_loop, UV_RUN_DEFAULT);
    uv_idle_stop(&g_idle);
    close(g_fd);

    /* back to baseline */
    CHECK(bt_http_server_connections(g_srv) == 0);
    CHECK(bt_http_server_requests(g_srv) == 0);
    CHECK(g_deferred == NULL);
    check_responses();
    return 0;
}
