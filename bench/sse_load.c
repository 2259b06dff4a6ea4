/* sse_load.c — baton-sse-load: a load generator for streaming chat completions, on one libuv loop.
 *
 * HTTP mode (--url) opens N keep-alive connections to an OpenAI-compatible server (a baton
 * frontend, or nginx/HAProxy in front of one), sends streaming chat requests back to back on each
 * and reads the SSE answers. Request-plane mode (--rpc host:port) speaks baton's request plane
 * straight to a worker, the way a frontend does (one connection, N concurrent streams), so that the
 * same figures can be measured with no frontend in the path. Either way it records, per request,
 * the time to the first token (from the write of the request to the first chunk or TOKENS frame
 * with text) and every gap between two consecutive token-bearing chunks; it counts tokens (the
 * usage the server reports), chunks and bytes; it checks that every request ended properly
 * ([DONE] after a usage chunk; FINISH on the request plane) and computes an order-independent
 * digest of every request's text, keyed by request number, so that two runs that must stream the
 * same tokens (direct vs through a proxy) can be compared byte for byte. The prompt of request i
 * is "bench <i> ...", so request i streams the same text in every mode.
 *
 * --burst starts every request at once instead of ramping: in HTTP mode the N connections are
 * opened first (at --rate) and, once all are up, one request is written on each in a single pass of
 * the loop; on the request plane the N REQUEST frames go out in one write. TTFT is still taken per
 * request from its own write, and the result also gives the spread of those writes (the client's
 * own cost of sending the burst), so that a server's burst TTFT can be compared with the same burst
 * sent straight to a worker (bench/perf.py burst).
 *
 * It is a measuring tool, not part of baton: it prints one JSON object on stdout at the end and
 * exits 0 only if every request succeeded. Run it without arguments for the options. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <http_parser.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/util.h"
#include "proto/proto.h"
#include "rpc/conn.h"

#define MAX_ERR_SAMPLES 5

typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples;

static void samples_add(samples *s, uint64_t x) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4096;
        uint32_t *p = realloc(s->v, cap * sizeof *p);
        if (!p) return; /* a sample lost to memory exhaustion; the counts still say how many */
        s->v = p;
        s->cap = cap;
    }
    s->v[s->n++] = x > UINT32_MAX ? UINT32_MAX : (uint32_t)x;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- options and global state ---- */

static struct {
    const char *host;
    int port;
    bool rpc;
    const char *path;
    const char *model;
    int64_t streams, requests, max_tokens, prompt_words, rate, timeout_s;
    const char *ready_file;
    const char *timestamps; /* file: one line per token-bearing chunk, CLOCK_MONOTONIC ns */
    bool quiet;
    bool burst;
    bool arrival;
} opt = {.path = "/v1/chat/completions", .model = "mock-model", .streams = 1, .requests = 0, .max_tokens = 100,
         .prompt_words = 8, .rate = 5000, .timeout_s = 600};

typedef struct target {
    char host[64];
    int port;
} target;
#define MAX_TARGETS 16
static target targets[MAX_TARGETS];
static int n_targets;

static uv_loop_t *loop;
static uv_timer_t ramp_timer, deadline_timer;
static uint64_t t_start_ns, t_end_ns;
static int64_t issued, finished, failed, open_clients, streaming_now;
static bool ready_written, timed_out, interrupted;
static FILE *ts_file;
static uv_signal_t sig_int, sig_term;
static uint64_t total_tokens, total_chunks, total_bytes, digest;
static samples ttft_us, gap_us;
static samples ttft_read_us; /* --arrival: TTFT to the read of the first token instead */
static uint64_t burst_first_send, burst_last_send; /* --burst: the first and last request write */
static char err_samples[MAX_ERR_SAMPLES][200];
static int n_err_samples;

static void note_error(int64_t req, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note_error(int64_t req, const char *fmt, ...) {
    failed++;
    if (n_err_samples >= MAX_ERR_SAMPLES) return;
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(err_samples[n_err_samples++], sizeof err_samples[0], "request %" PRId64 ": %s", req, msg);
}

static void maybe_ready(void) {
    if (ready_written || streaming_now < opt.streams || !opt.ready_file) return;
    ready_written = true;
    FILE *f = fopen(opt.ready_file, "w");
    if (f) {
        fprintf(f, "%.6f\n", (double)(bt_now_ns() - t_start_ns) / 1e9);
        fclose(f);
    }
}

/* FNV-1a over one request's text; the request number is mixed in at the end. */
#define FNV_OFF 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull
static inline uint64_t fnv_byte(uint64_t h, unsigned char c) { return (h ^ c) * FNV_PRIME; }

/* Per-request progress, shared by both modes. */
typedef struct {
    int64_t index;
    uint64_t t_sent, t_last;
    bool got_first, done_seen, usage_seen;
    uint64_t hash;
    uint64_t tokens, chunks;
} rq;

static void rq_begin(rq *r, int64_t index) {
    memset(r, 0, sizeof *r);
    r->index = index;
    r->hash = FNV_OFF;
    r->t_sent = bt_now_ns();
    if (!burst_first_send) burst_first_send = r->t_sent;
    burst_last_send = r->t_sent;
    issued++;
}

static uint64_t read_now; /* when the bytes being handled were read (--arrival: now is when they arrived) */

/* A chunk carrying text arrived at time now. */
static void rq_token_chunk(rq *r, uint64_t now) {
    if (ts_file) fprintf(ts_file, "%" PRIu64 "\n", now);
    if (!r->got_first) {
        r->got_first = true;
        samples_add(&ttft_us, (now - r->t_sent) / 1000u);
        if (opt.arrival) samples_add(&ttft_read_us, (read_now - r->t_sent) / 1000u);
        streaming_now++;
        maybe_ready();
    } else {
        samples_add(&gap_us, (now - r->t_last) / 1000u);
    }
    r->t_last = now;
    r->chunks++;
}

/* The request ended; ok says whether its protocol was followed to the end. */
static void rq_end(rq *r, bool ok, const char *why) {
    if (r->got_first) streaming_now--;
    finished++;
    if (!ok) {
        note_error(r->index, "%s", why);
        return;
    }
    total_tokens += r->tokens;
    total_chunks += r->chunks;
    digest += bt_mix64(r->hash ^ bt_mix64((uint64_t)r->index + 1));
}

static int64_t total_requests(void) { return opt.requests > 0 ? opt.requests : opt.streams; }

static int build_body(char *out, size_t cap, int64_t index) {
    char prompt[1024];
    size_t pl = (size_t)snprintf(prompt, sizeof prompt, "bench %" PRId64, index);
    for (int64_t i = 0; i < opt.prompt_words && pl + 8 < sizeof prompt; i++)
        pl += (size_t)snprintf(prompt + pl, sizeof prompt - pl, " word%d", (int)(i % 10));
    return snprintf(out, cap,
                    "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"%s\"}],\"stream\":true,"
                    "\"max_tokens\":%" PRId64 ",\"stream_options\":{\"include_usage\":true}}",
                    opt.model, prompt, opt.max_tokens);
}

static void check_done(void);

/* ============================================================================================
 * HTTP mode */

typedef struct client {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    http_parser parser;
    const struct target *t; /* the server this connection talks to */
    bool closing, in_request;
    rq r;
    int status;
    char *ev; /* SSE bytes not yet split into events */
    size_t ev_len, ev_cap, ev_scan;
    uv_poll_t poll; /* --arrival: reads go through this, on rfd, a duplicate of the socket */
    int rfd, open_handles;
    char wbuf[2048];
} client;

static http_parser_settings hp_settings;

static void client_close(client *c);

/* Hashes the JSON string at s (just after its opening quote), unescaped, into *h. Returns false
 * when the string does not end inside [s, end). */
static bool hash_json_string(const char *s, const char *end, uint64_t *h) {
    while (s < end) {
        unsigned char ch = (unsigned char)*s++;
        if (ch == '"') return true;
        if (ch != '\\') {
            *h = fnv_byte(*h, ch);
            continue;
        }
        if (s >= end) return false;
        char e = *s++;
        switch (e) {
        case 'n': *h = fnv_byte(*h, '\n'); break;
        case 't': *h = fnv_byte(*h, '\t'); break;
        case 'r': *h = fnv_byte(*h, '\r'); break;
        case 'b': *h = fnv_byte(*h, '\b'); break;
        case 'f': *h = fnv_byte(*h, '\f'); break;
        case 'u': {
            if (end - s < 4) return false;
            unsigned v = 0;
            for (int i = 0; i < 4; i++) {
                char x = s[i];
                v = v * 16 + (unsigned)(x >= 'a' ? x - 'a' + 10 : x >= 'A' ? x - 'A' + 10 : x - '0');
            }
            s += 4;
            /* UTF-8 of the code point (no surrogate pairs in what baton escapes: only < 0x20) */
            if (v < 0x80) *h = fnv_byte(*h, (unsigned char)v);
            else if (v < 0x800) {
                *h = fnv_byte(*h, (unsigned char)(0xC0 | (v >> 6)));
                *h = fnv_byte(*h, (unsigned char)(0x80 | (v & 0x3F)));
            } else {
                *h = fnv_byte(*h, (unsigned char)(0xE0 | (v >> 12)));
                *h = fnv_byte(*h, (unsigned char)(0x80 | ((v >> 6) & 0x3F)));
                *h = fnv_byte(*h, (unsigned char)(0x80 | (v & 0x3F)));
            }
            break;
        }
        default: *h = fnv_byte(*h, (unsigned char)e); break;
        }
    }
    return false;
}

static void on_sse_event(client *c, const char *p, size_t n, uint64_t now) {
    /* an event may begin with other fields (baton's resumable streams write an id: line first) */
    while (n >= 6 && memcmp(p, "data: ", 6) != 0) {
        const char *nl = memchr(p, '\n', n);
        if (!nl) return;
        n -= (size_t)(nl + 1 - p);
        p = nl + 1;
    }
    if (n < 6 || memcmp(p, "data: ", 6) != 0) return;
    p += 6;
    n -= 6;
    const char *end = p + n;
    if (n >= 6 && memcmp(p, "[DONE]", 6) == 0) {
        c->r.done_seen = true;
        return;
    }
    if (n >= 9 && memcmp(p, "{\"error\"", 8) == 0) {
        note_error(c->r.index, "error event: %.120s", p);
        c->r.index = -1; /* counted; the end of the response must not count it again */
        return;
    }
    static const char ck[] = "\"content\":\"";
    const char *q = memmem(p, n, ck, sizeof ck - 1);
    if (q) {
        if (!hash_json_string(q + sizeof ck - 1, end, &c->r.hash)) return;
        rq_token_chunk(&c->r, now);
        return;
    }
    static const char uk[] = "\"completion_tokens\":";
    q = memmem(p, n, uk, sizeof uk - 1);
    if (q) {
        c->r.tokens = strtoull(q + sizeof uk - 1, NULL, 10);
        c->r.usage_seen = true;
    }
}

static uint64_t body_now;

static int hp_on_body(http_parser *hp, const char *at, size_t len) {
    client *c = hp->data;
    if (c->ev_len + len > c->ev_cap) {
        size_t cap = c->ev_cap ? c->ev_cap : 1024;
        while (cap < c->ev_len + len) cap *= 2;
        char *p = realloc(c->ev, cap);
        if (!p) return -1;
        c->ev = p;
        c->ev_cap = cap;
    }
    memcpy(c->ev + c->ev_len, at, len);
    c->ev_len += len;
    size_t start = 0;
    for (;;) {
        size_t from = c->ev_scan > start + 1 ? c->ev_scan - 1 : start;
        const char *e = from < c->ev_len ? memmem(c->ev + from, c->ev_len - from, "\n\n", 2) : NULL;
        if (!e) {
            c->ev_scan = c->ev_len;
            break;
        }
        size_t elen = (size_t)(e - (c->ev + start));
        on_sse_event(c, c->ev + start, elen, body_now);
        start += elen + 2;
        c->ev_scan = start;
    }
    if (start) {
        memmove(c->ev, c->ev + start, c->ev_len - start);
        c->ev_len -= start;
        c->ev_scan -= start;
    }
    return 0;
}

static int hp_on_headers_complete(http_parser *hp) {
    client *c = hp->data;
    c->status = (int)hp->status_code;
    return 0;
}

static void client_next(client *c);

static int hp_on_message_complete(http_parser *hp) {
    client *c = hp->data;
    c->in_request = false;
    if (c->r.index < 0) { /* an error event was counted already */
        finished++;
        if (c->r.got_first) streaming_now--;
    } else if (c->status != 200) {
        char why[160];
        snprintf(why, sizeof why, "HTTP %d: %.*s", c->status, (int)(c->ev_len < 100 ? c->ev_len : 100),
                 c->ev_len ? c->ev : "");
        rq_end(&c->r, false, why);
    } else if (!c->r.done_seen || !c->r.usage_seen || !c->r.got_first) {
        rq_end(&c->r, false, c->r.done_seen ? "no usage chunk or no token" : "response ended without [DONE]");
    } else {
        rq_end(&c->r, true, NULL);
    }
    c->ev_len = c->ev_scan = 0;
    if (!http_should_keep_alive(hp)) {
        client_close(c);
        return 0;
    }
    http_parser_pause(hp, 1); /* the next request starts after this read is handled */
    return 0;
}

static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
    (void)h;
    (void)sz;
    static char buf[256 * 1024];
    b->base = buf;
    b->len = sizeof buf;
}

static void on_client_closed(uv_handle_t *h) {
    client *c = h->data;
    if (--c->open_handles > 0) return; /* --arrival: the socket and its poll handle */
    if (c->rfd >= 0) close(c->rfd);
    free(c->ev);
    free(c);
    open_clients--;
    check_done();
}

static void client_close(client *c) {
    if (c->closing) return;
    c->closing = true;
    if (c->in_request) {
        c->in_request = false;
        if (c->r.index >= 0) rq_end(&c->r, false, "connection closed mid-response");
        else {
            finished++;
            if (c->r.got_first) streaming_now--;
        }
    }
    if (c->open_handles > 1) uv_close((uv_handle_t *)&c->poll, on_client_closed);
    uv_close((uv_handle_t *)&c->tcp, on_client_closed);
}

/* Handles nread bytes of c's response that arrived at time now. */
static void client_feed(client *c, const char *data, size_t nread, uint64_t now) {
    total_bytes += (uint64_t)nread;
    body_now = now;
    size_t off = 0;
    while (off < nread && !c->closing) {
        size_t used = http_parser_execute(&c->parser, &hp_settings, data + off, nread - off);
        off += used;
        if (HTTP_PARSER_ERRNO(&c->parser) == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            client_next(c);
            continue;
        }
        if (HTTP_PARSER_ERRNO(&c->parser) != HPE_OK) {
            if (c->in_request && c->r.index >= 0) {
                rq_end(&c->r, false, http_errno_description(HTTP_PARSER_ERRNO(&c->parser)));
                c->in_request = false;
            }
            client_close(c);
            return;
        }
        if (used == 0) break;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    client *c = s->data;
    if (nread < 0) {
        client_close(c);
        return;
    }
    if (nread == 0) return;
    read_now = bt_now_ns();
    client_feed(c, buf->base, (size_t)nread, read_now);
}

/* --arrival: how many of the n bytes at p to read so that the read ends with the first event that
 * carries text (a chunk holding "content":"...), or 0 when that event is not all there yet. A
 * TCP read reports the arrival time of the last segment it took, so a read that stops there
 * times the first token's own segment rather than a later token's. Not always: segments that wait
 * in the socket together may be merged by the kernel (tcp_try_coalesce), and a merged one keeps the
 * newest arrival time, so a first token that waited with the next is timed at the next's arrival.
 * The TTFT by arrival is thus an upper bound, never below the true one. */
static size_t first_token_end(const char *p, size_t n) {
    static const char ck[] = "\"content\":\"";
    const char *q = memmem(p, n, ck, sizeof ck - 1);
    const char *e = q ? memmem(q, n - (size_t)(q - p), "\n\n", 2) : NULL;
    return e ? (size_t)(e + 2 - p) : 0;
}

/* --arrival: c's socket is readable. The bytes are read with recvmsg(2) and the kernel's receive
 * time of their last segment (SO_TIMESTAMPNS), which libuv's reads do not return: the client's
 * own delay in reading (a burst's client writes N requests in one pass before it reads anything)
 * is then not counted in the server's TTFT. Until the first token, the read stops at the end of
 * its event (first_token_end). */
static void on_poll(uv_poll_t *h, int status, int events) {
    client *c = h->data;
    (void)events;
    if (status < 0) {
        client_close(c);
        return;
    }
    static char buf[256 * 1024];
    while (!c->closing) {
        size_t want = sizeof buf;
        if (c->in_request && !c->r.got_first) {
            ssize_t k = recv(c->rfd, buf, sizeof buf, MSG_PEEK);
            if (k > 0 && first_token_end(buf, (size_t)k)) want = first_token_end(buf, (size_t)k);
        }
        union {
            char b[CMSG_SPACE(sizeof(struct timespec))];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = {buf, want};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
        ssize_t n = recvmsg(c->rfd, &mh, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) {
            client_close(c);
            return;
        }
        read_now = bt_now_ns();
        uint64_t arrived = read_now;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_TIMESTAMPNS) continue;
            struct timespec ts, real;
            memcpy(&ts, CMSG_DATA(cm), sizeof ts);
            clock_gettime(CLOCK_REALTIME, &real); /* the stamp is on this clock; now is CLOCK_MONOTONIC */
            int64_t ago = ((int64_t)real.tv_sec - ts.tv_sec) * 1000000000 + (real.tv_nsec - ts.tv_nsec);
            if (ago > 0 && (uint64_t)ago < read_now) arrived = read_now - (uint64_t)ago;
        }
        client_feed(c, buf, (size_t)n, arrived);
    }
}

static void on_written(uv_write_t *w, int status) {
    client *c = w->data;
    if (status < 0) client_close(c);
}

/* Sends the next request on c, or closes it when every request has been issued. */
static void client_next(client *c) {
    if (c->closing) return;
    if (issued >= total_requests() || timed_out) {
        client_close(c);
        return;
    }
    int64_t index = issued;
    char body[1536];
    int bl = build_body(body, sizeof body, index);
    int n = snprintf(c->wbuf, sizeof c->wbuf,
                     "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nAccept: "
                     "text/event-stream\r\nContent-Length: %d\r\n\r\n%s",
                     opt.path, c->t->host, c->t->port, bl, body);
    rq_begin(&c->r, index);
    c->in_request = true;
    c->status = 0;
    http_parser_init(&c->parser, HTTP_RESPONSE);
    c->parser.data = c;
    uv_buf_t b = uv_buf_init(c->wbuf, (unsigned)n);
    c->wreq.data = c;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written) < 0) client_close(c);
}

/* --burst: the connections that are up and wait for the burst, and how many connects ended */
static client **burst_clients;
static int64_t burst_ready, burst_settled;

/* --burst: once every connection attempt has ended, one request on each, in one pass. */
static void burst_maybe_fire(void) {
    if (burst_settled < opt.streams) return;
    for (int64_t i = 0; i < burst_ready; i++) client_next(burst_clients[i]);
    burst_ready = 0;
}

static void on_connect(uv_connect_t *req, int status) {
    client *c = req->data;
    if (opt.burst) burst_settled++;
    if (status < 0) {
        note_error(issued, "connect: %s", uv_strerror(status));
        issued++; /* the request this connection would have sent is the failure */
        finished++;
        client_close(c);
        if (opt.burst) burst_maybe_fire();
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_os_fd_t fd;
    int one = 1;
    if (!opt.arrival) uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    else if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0 ||
             setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) != 0 || (c->rfd = dup(fd)) < 0 ||
             uv_poll_init_socket(loop, &c->poll, c->rfd) != 0) {
        note_error(issued, "--arrival: cannot watch the socket: %s", strerror(errno));
        abort(); /* a measuring tool: no half-measured run */
    } else {
        c->poll.data = c;
        c->open_handles = 2;
        uv_poll_start(&c->poll, UV_READABLE, on_poll);
    }
    if (!opt.burst) {
        client_next(c);
        return;
    }
    burst_clients[burst_ready++] = c;
    burst_maybe_fire();
}

static int64_t clients_started;

static void start_client(void) {
    client *c = calloc(1, sizeof *c);
    if (!c) {
        note_error(-1, "out of memory");
        return;
    }
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    c->rfd = -1;
    c->open_handles = 1;
    c->creq.data = c;
    open_clients++;
    c->t = &targets[clients_started % n_targets];
    clients_started++;
    struct sockaddr_in sa;
    uv_ip4_addr(c->t->host, c->t->port, &sa);
    int r = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)&sa, on_connect);
    if (r < 0) {
        note_error(-1, "connect: %s", uv_strerror(r));
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, on_client_closed);
        if (opt.burst) {
            burst_settled++;
            burst_maybe_fire();
        }
    }
}

/* ============================================================================================
 * Request-plane mode */

static bt_rpc_conn *rpc;
static rq *rpc_rqs;       /* one per request, indexed by (stream id - 1) / 2 */
static int64_t rpc_started; /* streams opened */
static bool rpc_open, rpc_closed;

static void rpc_start_streams(int64_t n) {
    bt_buf *w = rpc ? bt_rpc_wbuf(rpc) : NULL;
    if (!w) return;
    for (int64_t k = 0; k < n && rpc_started < total_requests() && !timed_out; k++) {
        int64_t index = rpc_started++;
        char body[1536], payload[2048];
        build_body(body, sizeof body, index);
        int pl = snprintf(payload, sizeof payload,
                          "{\"request_id\":\"bench-%" PRId64 "\",\"api\":\"chat\",\"body\":%s,\"carried\":[],"
                          "\"max_tokens\":%" PRId64 "}",
                          index, body, opt.max_tokens);
        rq_begin(&rpc_rqs[index], index);
        if (bt_frame_put(w, BT_FRAME_REQUEST, (uint32_t)(index * 2 + 1), payload, (size_t)pl) != BT_OK)
            rq_end(&rpc_rqs[index], false, "cannot encode the request");
    }
}

static rq *rpc_rq(uint32_t stream) {
    if (!(stream & 1u)) return NULL;
    int64_t i = (int64_t)(stream - 1) / 2;
    if (i >= rpc_started) return NULL;
    rq *r = &rpc_rqs[i];
    return r->index == i && !r->done_seen ? r : NULL;
}

static void rpc_on_open(void *ud, bt_rpc_conn *c) {
    (void)ud;
    (void)c;
    rpc_open = true;
}

static void rpc_on_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    (void)ud;
    (void)c;
    uint64_t now = read_now = bt_now_ns(); /* one connection read as it comes: --arrival changes nothing */
    total_bytes += f->len + BT_FRAME_HEADER;
    rq *r = rpc_rq(f->stream);
    if (!r) return;
    switch (f->type) {
    case BT_FRAME_TOKENS: {
        static uint32_t ids[BT_TOKENS_MAX];
        size_t n, tl;
        const char *text;
        if (bt_frame_get_tokens(f, ids, BT_TOKENS_MAX, &n, &text, &tl) != BT_OK) return;
        for (size_t i = 0; i < tl; i++) r->hash = fnv_byte(r->hash, (unsigned char)text[i]);
        if (tl) rq_token_chunk(r, now);
        return;
    }
    case BT_FRAME_FINISH: {
        uint32_t pt, ct;
        uint8_t reason;
        bt_frame_get_finish(f, &reason, &pt, &ct);
        r->tokens = ct;
        r->done_seen = true;
        rq_end(r, r->got_first, "FINISH without a token");
        rpc_start_streams(1);
        check_done();
        return;
    }
    case BT_FRAME_ERROR: {
        uint16_t code;
        const char *msg;
        size_t ml;
        if (bt_frame_get_error(f, &code, &msg, &ml) != BT_OK) return;
        r->done_seen = true;
        char why[160];
        snprintf(why, sizeof why, "ERROR %u: %.*s", code, (int)(ml < 100 ? ml : 100), msg);
        rq_end(r, false, why);
        rpc_start_streams(1);
        check_done();
        return;
    }
    default: return;
    }
}

static void rpc_on_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)ud;
    (void)c;
    rpc = NULL;
    rpc_closed = true;
    for (int64_t i = 0; i < rpc_started; i++) {
        if (!rpc_rqs[i].done_seen) {
            rpc_rqs[i].done_seen = true;
            rq_end(&rpc_rqs[i], false, "request-plane connection closed");
        }
    }
    if (why != BT_OK) note_error(-1, "request plane: %s", reason);
    open_clients--;
    check_done();
}

/* ============================================================================================
 * Driver */

static void on_ramp(uv_timer_t *t) {
    int64_t per_tick = opt.rate / 1000 > 0 ? opt.rate / 1000 : 1;
    if (opt.rpc) {
        if (!rpc_open) return;
        int64_t want = opt.streams - (rpc_started - finished);
        if (want > per_tick && !opt.burst) want = per_tick;
        if (want > 0) rpc_start_streams(want);
        if (want > 0 && opt.burst && rpc) bt_rpc_flush(rpc); /* the burst's frames in one write, now */
        if (rpc_started >= opt.streams || rpc_started >= total_requests()) uv_timer_stop(t);
        return;
    }
    for (int64_t k = 0; k < per_tick && clients_started < opt.streams; k++) start_client();
    if (clients_started >= opt.streams) uv_timer_stop(t);
}

/* SIGINT / SIGTERM: stop where we are and report (a probe stream is ended this way). */
static void on_signal(uv_signal_t *h, int signum) {
    (void)h;
    (void)signum;
    interrupted = true;
    uv_stop(loop);
}

static void on_deadline(uv_timer_t *t) {
    (void)t;
    timed_out = true;
    note_error(-1, "timed out after %" PRId64 " s with %" PRId64 " of %" PRId64 " requests finished", opt.timeout_s,
               finished, total_requests());
    uv_stop(loop);
}

static void check_done(void) {
    static bool done_once;
    bool done = opt.rpc ? finished >= total_requests() || rpc_closed
                        : open_clients == 0 && clients_started >= opt.streams;
    if (!done || done_once) return;
    done_once = true;
    if (!t_end_ns) t_end_ns = bt_now_ns();
    if (opt.rpc && rpc) bt_rpc_conn_close(rpc, BT_OK, "done");
    uv_timer_stop(&ramp_timer);
    uv_timer_stop(&deadline_timer);
    uv_close((uv_handle_t *)&ramp_timer, NULL);
    uv_close((uv_handle_t *)&deadline_timer, NULL);
}

static void print_pct(const char *name, samples *s) {
    if (s->n == 0) {
        printf("\"%s\":{\"n\":0}", name);
        return;
    }
    qsort(s->v, s->n, sizeof *s->v, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < s->n; i++) sum += s->v[i];
#define PCT(p) s->v[(size_t)((double)(s->n - 1) * (p))]
    printf("\"%s\":{\"n\":%zu,\"mean\":%.1f,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"p999\":%u,\"max\":%u}", name, s->n,
           sum / (double)s->n, PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999), s->v[s->n - 1]);
#undef PCT
}

static void usage(void) {
    fprintf(stderr,
            "usage: baton-sse-load (--url http://HOST:PORT[,http://HOST:PORT...] | --rpc HOST:PORT) [options]\n"
            "  --url A,B,...     several servers: connection k goes to server k mod n\n"
            "  --streams N       concurrent streams (HTTP: connections) [1]\n"
            "  --requests R      requests in all, back to back on the streams [= streams]\n"
            "  --max-tokens T    max_tokens of each request [100]\n"
            "  --prompt-words W  extra words in each prompt [8]\n"
            "  --rate C          connections (or streams) opened per second while ramping up [5000]\n"
            "  --path P          HTTP path [/v1/chat/completions]\n"
            "  --model M         model name [mock-model]\n"
            "  --ready-file F    write F when N streams are streaming at the same time\n"
            "  --timeout S       give up after S seconds [600]\n"
            "  --timestamps F    write the arrival time (CLOCK_MONOTONIC ns) of every token chunk to F\n"
            "  --burst           one request per stream, all written at once (HTTP: once every\n"
            "                    connection is up; --requests is ignored)\n"
            "  --arrival         HTTP: time each chunk by its arrival at the socket (the kernel's\n"
            "                    receive time), not by when this client read it; ttft_read_us\n"
            "                    gives the TTFT to the read as well\n"
            "SIGINT or SIGTERM stops the run and reports what was measured (\"interrupted\": true).\n"
            "Prints one JSON object; exit status 0 only if every request succeeded.\n");
}

/* One HOST:PORT, or (HTTP) a comma-separated list of URLs: connection k then goes to target
 * k mod n, which spreads one client's load over several frontends (bench/perf.py --frontends). */
static bool parse_hostport(const char *s, bool url) {
    n_targets = 0;
    while (*s) {
        if (n_targets == MAX_TARGETS) return false;
        if (url) {
            if (strncmp(s, "http://", 7) != 0) return false;
            s += 7;
        }
        target *t = &targets[n_targets];
        size_t len = strcspn(s, ",");
        const char *colon = memrchr(s, ':', len);
        if (!colon || (size_t)(colon - s) >= sizeof t->host || (!url && len != strlen(s))) return false;
        memcpy(t->host, s, (size_t)(colon - s));
        t->host[colon - s] = '\0';
        char port[8];
        size_t plen = strcspn(colon + 1, "/,");
        if (plen >= sizeof port) return false;
        snprintf(port, sizeof port, "%.*s", (int)plen, colon + 1);
        int64_t p;
        if (!bt_parse_i64(port, 1, 65535, &p)) return false;
        t->port = (int)p;
        n_targets++;
        s += len;
        if (*s == ',') s++;
    }
    if (n_targets == 0) return false;
    opt.host = targets[0].host;
    opt.port = targets[0].port;
    return true;
}

int main(int argc, char **argv) {
    static const struct option lo[] = {
        {"url", 1, 0, 'u'},      {"rpc", 1, 0, 'c'},         {"streams", 1, 0, 'n'}, {"requests", 1, 0, 'r'},
        {"max-tokens", 1, 0, 't'}, {"prompt-words", 1, 0, 'w'}, {"rate", 1, 0, 'R'},  {"path", 1, 0, 'p'},
        {"model", 1, 0, 'm'},    {"ready-file", 1, 0, 'f'},  {"timeout", 1, 0, 'T'}, {"timestamps", 1, 0, 'S'},
        {"burst", 0, 0, 'B'},    {"arrival", 0, 0, 'A'}, {0, 0, 0, 0}};
    int ch;
    bool have_target = false;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        bool ok = true;
        switch (ch) {
        case 'u': ok = have_target = parse_hostport(optarg, true); break;
        case 'c': ok = have_target = parse_hostport(optarg, false), opt.rpc = true; break;
        case 'n': ok = bt_parse_i64(optarg, 1, 1000000, &opt.streams); break;
        case 'r': ok = bt_parse_i64(optarg, 1, 100000000, &opt.requests); break;
        case 't': ok = bt_parse_i64(optarg, 1, 1000000, &opt.max_tokens); break;
        case 'w': ok = bt_parse_i64(optarg, 0, 100, &opt.prompt_words); break;
        case 'R': ok = bt_parse_i64(optarg, 1, 10000000, &opt.rate); break;
        case 'p': opt.path = optarg; break;
        case 'm': opt.model = optarg; break;
        case 'f': opt.ready_file = optarg; break;
        case 'S': opt.timestamps = optarg; break;
        case 'T': ok = bt_parse_i64(optarg, 1, 86400, &opt.timeout_s); break;
        case 'B': opt.burst = true; break;
        case 'A': opt.arrival = true; break;
        default: ok = false;
        }
        if (!ok) {
            usage();
            return 2;
        }
    }
    if (!have_target) {
        usage();
        return 2;
    }
    if (opt.rpc && total_requests() > 1000000000) return 2; /* stream ids must stay below 2^31 */
    if (opt.burst) {
        opt.requests = opt.streams; /* one request per stream, all at once */
        if (!opt.rpc && !(burst_clients = calloc((size_t)opt.streams, sizeof *burst_clients))) return 2;
    }
    /* every connection is a descriptor: take the hard limit */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    loop = uv_default_loop();
    hp_settings.on_body = hp_on_body;
    hp_settings.on_headers_complete = hp_on_headers_complete;
    hp_settings.on_message_complete = hp_on_message_complete;
    uv_timer_init(loop, &ramp_timer);
    uv_timer_init(loop, &deadline_timer);
    uv_signal_init(loop, &sig_int);
    uv_signal_init(loop, &sig_term);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_unref((uv_handle_t *)&sig_int); /* signal watchers do not keep the loop alive */
    uv_unref((uv_handle_t *)&sig_term);
    if (opt.timestamps && !(ts_file = fopen(opt.timestamps, "w"))) {
        perror(opt.timestamps);
        return 2;
    }
    t_start_ns = bt_now_ns();
    if (opt.rpc) {
        rpc_rqs = calloc((size_t)total_requests(), sizeof *rpc_rqs);
        if (!rpc_rqs) return 2;
        for (int64_t i = 0; i < total_requests(); i++) rpc_rqs[i].index = -1;
        bt_rpc_config cfg;
        bt_rpc_config_default(&cfg, BT_ROLE_FRONTEND, bt_random64());
        cfg.dead_after_ms = 10000;
        static const bt_rpc_handlers h = {.on_open = rpc_on_open, .on_frame = rpc_on_frame, .on_close = rpc_on_close};
        open_clients = 1;
        rpc = bt_rpc_dial(loop, opt.host, opt.port, &cfg, &h, NULL);
        if (!rpc) return 2;
    }
    uv_timer_start(&ramp_timer, on_ramp, 0, 1);
    uv_timer_start(&deadline_timer, on_deadline, (uint64_t)opt.timeout_s * 1000, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    if (!t_end_ns) t_end_ns = bt_now_ns();
    if (ts_file) fclose(ts_file);
    double wall = (double)(t_end_ns - t_start_ns) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    int64_t ok = finished - failed > 0 ? finished - failed : 0;
    printf("{\"mode\":\"%s\",\"streams\":%" PRId64 ",\"requests\":%" PRId64 ",\"ok\":%" PRId64 ",\"failed\":%" PRId64
           ",\"max_tokens\":%" PRId64 ",\"tokens\":%" PRIu64 ",\"chunks\":%" PRIu64 ",\"bytes\":%" PRIu64
           ",\"wall_s\":%.4f,\"client_cpu_s\":%.3f,\"interrupted\":%s,\"digest\":\"%016" PRIx64 "\",",
           opt.rpc ? "rpc" : "http", opt.streams, total_requests(), ok, failed, opt.max_tokens, total_tokens,
           total_chunks, total_bytes, wall, cpu, interrupted ? "true" : "false", digest);
    if (opt.burst) printf("\"send_spread_us\":%.1f,", (double)(burst_last_send - burst_first_send) / 1e3);
    print_pct("ttft_us", &ttft_us);
    if (opt.arrival) {
        printf(",");
        print_pct("ttft_read_us", &ttft_read_us);
    }
    printf(",");
    print_pct("gap_us", &gap_us);
    printf(",\"errors\":[");
    for (int i = 0; i < n_err_samples; i++) {
        printf("%s\"", i ? "," : "");
        for (const char *p = err_samples[i]; *p; p++) {
            if (*p == '"' || *p == '\\') putchar('\\');
            putchar((unsigned char)*p < 0x20 ? ' ' : *p);
        }
        printf("\"");
    }
    printf("]}\n");
    if (interrupted) return failed == 0 ? 0 : 1;
    return failed == 0 && ok == total_requests() ? 0 : 1;
}
