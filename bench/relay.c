/* relay.c — baton-relay: the floor under the frontend's token path, for bench/perf.py latency.
 *
 * It does only the work a frontend cannot avoid on the same load: accept HTTP/1.1 keep-alive
 * connections, read one streaming chat request per connection at a time, send it to one worker as a
 * REQUEST frame on one multiplexed request-plane connection (baton's own framing and payload codec),
 * and turn every TOKENS frame into one SSE chunk written to its client socket at once (one write per
 * chunk, as the frontend does); FINISH becomes the usage chunk and [DONE]; a client that goes away
 * gets a KILL. Nothing else: no validation beyond what parsing needs, no routing, no metrics, no
 * migration, no limits. The chunks carry the same text as the frontend's (what baton-sse-load
 * hashes), so its digest proves the relay streamed the same tokens.
 *
 * With --frontend-bytes every token's event carries what the frontend's does beyond the text: an
 * SSE id line (a 32-hex stream id and the position) and the OpenAI chunk's id, object, created and
 * model fields, the role on the first event, and "usage":null when the client asked for usage: the
 * same bytes per event (~300 against ~100), built from a per-request prefix as the frontend builds
 * them. The floor then writes what the API obliges any frontend to write.
 *
 * It is a measuring tool, not part of baton.
 *   baton-relay --listen PORT --worker HOST:PORT [--frontend-bytes] */
#include <errno.h>
#include <http_parser.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "common/map.h"
#include "common/util.h"
#include "proto/proto.h"
#include "proto/request.h"
#include "rpc/conn.h"

typedef struct client {
    uv_tcp_t tcp;
    http_parser parser;
    bt_buf body;
    uint32_t stream; /* the request-plane stream of the request in flight, 0 = none */
    uint64_t seq;
    bool closing;
    /* --frontend-bytes: the request's constant head of each event, its SSE stream id, the next
     * position, whether the role went out and whether "usage":null ends each event */
    bt_buf prefix;
    char sid[33];
    uint64_t pos;
    bool role_sent, usage_null;
} client;

static bool frontend_bytes;

typedef struct {
    uv_write_t req;
    uv_buf_t buf;
} wreq;

static uv_loop_t *loop;
static bt_rpc_conn *worker;
static bt_map streams; /* stream id -> client */
static uint32_t next_stream = 1;
static uint64_t next_seq;
static http_parser_settings hp;

static void on_written(uv_write_t *w, int status) {
    (void)status;
    wreq *r = (wreq *)w;
    free(r->buf.base);
    free(r);
}

/* Writes n bytes to the client now: uv_try_write, the rest queued with uv_write. */
static void client_write(client *c, const char *p, size_t n) {
    if (c->closing) return;
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    int done = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (done == (int)n) return;
    if (done < 0 && done != UV_EAGAIN) return; /* the read side sees the error and closes */
    size_t off = done > 0 ? (size_t)done : 0;
    wreq *r = malloc(sizeof *r);
    char *copy = malloc(n - off);
    if (!r || !copy) {
        free(r);
        free(copy);
        return;
    }
    memcpy(copy, p + off, n - off);
    r->buf = uv_buf_init(copy, (unsigned)(n - off));
    if (uv_write(&r->req, (uv_stream_t *)&c->tcp, &r->buf, 1, on_written) != 0) {
        free(copy);
        free(r);
    }
}

static void on_client_closed(uv_handle_t *h) {
    client *c = h->data;
    bt_buf_free(&c->body);
    bt_buf_free(&c->prefix);
    free(c);
}

static void client_close(client *c) {
    if (c->closing) return;
    c->closing = true;
    if (c->stream) {
        bt_buf *w = worker ? bt_rpc_wbuf(worker) : NULL;
        if (w) bt_frame_put(w, BT_FRAME_KILL, c->stream, NULL, 0);
        bt_map_del(&streams, c->stream);
        c->stream = 0;
    }
    uv_close((uv_handle_t *)&c->tcp, on_client_closed);
}

/* One HTTP chunk holding `n` bytes of SSE. */
static void write_chunked(client *c, const char *p, size_t n, bool last) {
    char buf[16384];
    int h = snprintf(buf, sizeof buf, "%zx\r\n", n);
    if ((size_t)h + n + 7 > sizeof buf) return; /* a chunk this large does not happen here */
    memcpy(buf + h, p, n);
    size_t len = (size_t)h + n;
    memcpy(buf + len, last ? "\r\n0\r\n\r\n" : "\r\n", last ? 7 : 2);
    len += last ? 7 : 2;
    client_write(c, buf, len);
}

static void on_frame(void *ud, bt_rpc_conn *conn, const bt_frame *f) {
    (void)ud;
    (void)conn;
    client *c = bt_map_get(&streams, f->stream);
    if (!c) return;
    static bt_buf b; /* reused for every event: one allocation for the life of the relay */
    if (!b.cap) bt_buf_init(&b, 12288);
    bt_buf_reset(&b);
    if (f->type == BT_FRAME_TOKENS) {
        uint32_t ids[BT_TOKENS_MAX];
        size_t n, tl;
        const char *text;
        if (bt_frame_get_tokens(f, ids, BT_TOKENS_MAX, &n, &text, &tl) != BT_OK) return;
        if (frontend_bytes) {
            bt_buf_append_str(&b, "id: ");
            bt_buf_append(&b, c->sid, 32);
            bt_buf_append(&b, ":", 1);
            bt_buf_append_i64(&b, (int64_t)c->pos);
            bt_buf_append(&b, "\n", 1);
            c->pos += n;
            bt_buf_append(&b, c->prefix.data, c->prefix.len);
            bt_buf_append_str(&b, c->role_sent ? "\"delta\":{\"content\":\""
                                               : "\"delta\":{\"role\":\"assistant\",\"content\":\"");
            c->role_sent = true;
        } else {
            bt_buf_append_str(&b, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"");
        }
        bt_buf_append_json_str(&b, text, tl);
        bt_buf_append_str(&b, frontend_bytes && c->usage_null ? "\"},\"finish_reason\":null}],\"usage\":null}\n\n"
                                                              : "\"},\"finish_reason\":null}]}\n\n");
        write_chunked(c, b.data, b.len, false);
    } else if (f->type == BT_FRAME_FINISH) {
        uint8_t reason;
        uint32_t pt, ct;
        bt_frame_get_finish(f, &reason, &pt, &ct);
        bt_buf_appendf(&b,
                       "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"%s\"}]}\n\n"
                       "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,"
                       "\"total_tokens\":%u}}\n\ndata: [DONE]\n\n",
                       bt_finish_reason_name((bt_finish_reason)reason), pt, ct, pt + ct);
        bt_map_del(&streams, f->stream);
        c->stream = 0;
        write_chunked(c, b.data, b.len, true);
    } else if (f->type == BT_FRAME_ERROR) {
        bt_map_del(&streams, f->stream);
        c->stream = 0;
        client_close(c);
    }
}

static void on_open(void *ud, bt_rpc_conn *c) {
    (void)ud;
    (void)c;
    fprintf(stderr, "baton-relay: connected to the worker\n");
}

static void on_worker_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)ud;
    (void)c;
    (void)why;
    fprintf(stderr, "baton-relay: worker connection closed: %s\n", reason);
    worker = NULL;
    exit(1);
}

static int hp_on_body(http_parser *p, const char *at, size_t n) {
    client *c = p->data;
    return bt_buf_append(&c->body, at, n) == BT_OK ? 0 : -1;
}

static int hp_on_message_begin(http_parser *p) {
    client *c = p->data;
    bt_buf_reset(&c->body);
    return 0;
}

static int hp_on_message_complete(http_parser *p) {
    client *c = p->data;
    json_t *body = json_loadb(c->body.data ? c->body.data : "", c->body.len, 0, NULL);
    json_t *mt = json_object_get(body, "max_tokens");
    char rid[32];
    snprintf(rid, sizeof rid, "relay-%" PRIu64, ++next_seq);
    if (frontend_bytes && body) { /* the frontend's head of each event (src/frontend/request.c) */
        char uuid[37];
        bt_uuid4(uuid);
        snprintf(c->sid, sizeof c->sid, "%016" PRIx64 "%016" PRIx64, bt_random64(), bt_random64());
        c->pos = 0;
        c->role_sent = false;
        c->usage_null = json_is_true(json_object_get(json_object_get(body, "stream_options"), "include_usage"));
        const char *model = json_string_value(json_object_get(body, "model"));
        if (!c->prefix.cap) bt_buf_init(&c->prefix, 4096);
        bt_buf_reset(&c->prefix);
        bt_buf_append_str(&c->prefix, "data: {\"id\":\"chatcmpl-");
        bt_buf_append_str(&c->prefix, uuid);
        bt_buf_append_str(&c->prefix, "\",\"object\":\"chat.completion.chunk\",\"created\":");
        bt_buf_append_i64(&c->prefix, (int64_t)time(NULL));
        bt_buf_append_str(&c->prefix, ",\"model\":\"");
        bt_buf_append_json_str(&c->prefix, model ? model : "", model ? strlen(model) : 0);
        bt_buf_append_str(&c->prefix, "\",\"choices\":[{\"index\":0,");
    }
    bt_request rq = {.request_id = rid,
                     .api = BT_API_CHAT,
                     .body = body,
                     .has_max_tokens = json_is_integer(mt),
                     .max_tokens = json_is_integer(mt) ? json_integer_value(mt) : 0};
    size_t len = 0;
    char *payload = body ? bt_request_encode(&rq, &len) : NULL;
    json_decref(body);
    bt_buf *w = worker ? bt_rpc_wbuf(worker) : NULL;
    if (!payload || !w) {
        free(payload);
        static const char bad[] = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        client_write(c, bad, sizeof bad - 1);
        client_close(c);
        return -1;
    }
    uint32_t id = next_stream;
    next_stream += 2;
    bt_frame_put(w, BT_FRAME_REQUEST, id, payload, len);
    free(payload);
    bt_map_put(&streams, id, c);
    c->stream = id;
    static const char head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                               "Cache-Control: no-cache\r\n\r\n";
    client_write(c, head, sizeof head - 1);
    return 0;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    (void)h;
    (void)hint;
    static char rbuf[65536];
    *buf = uv_buf_init(rbuf, sizeof rbuf);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    client *c = s->data;
    if (n < 0) {
        client_close(c);
        return;
    }
    if (n == 0) return;
    size_t used = http_parser_execute(&c->parser, &hp, buf->base, (size_t)n);
    if (c->parser.http_errno != HPE_OK || used != (size_t)n) client_close(c);
}

static void on_connection(uv_stream_t *server, int status) {
    if (status < 0) return;
    client *c = calloc(1, sizeof *c);
    if (!c) return;
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = c;
    bt_buf_init(&c->body, 1 << 20);
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        client_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_signal(uv_signal_t *s, int sig) {
    (void)sig;
    uv_stop(s->loop);
}

int main(int argc, char **argv) {
    int64_t port = 0, wport = 0;
    const char *wk = NULL;
    bool bad = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--frontend-bytes") == 0) frontend_bytes = true;
        else if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc && bt_parse_i64(argv[i + 1], 1, 65535, &port)) i++;
        else if (strcmp(argv[i], "--worker") == 0 && i + 1 < argc) wk = argv[++i];
        else bad = true;
    }
    const char *colon = wk ? strrchr(wk, ':') : NULL;
    if (bad || port <= 0 || !colon || !bt_parse_i64(colon + 1, 1, 65535, &wport)) {
        fprintf(stderr, "usage: baton-relay --listen PORT --worker HOST:PORT [--frontend-bytes]\n");
        return 2;
    }
    char host[256];
    snprintf(host, sizeof host, "%.*s", (int)(colon - wk), wk);
    signal(SIGPIPE, SIG_IGN);
    loop = uv_default_loop();
    bt_map_init(&streams);
    hp.on_message_begin = hp_on_message_begin;
    hp.on_body = hp_on_body;
    hp.on_message_complete = hp_on_message_complete;
    bt_rpc_config cfg;
    bt_rpc_config_default(&cfg, BT_ROLE_FRONTEND, bt_random64());
    static const bt_rpc_handlers h = {.on_open = on_open, .on_frame = on_frame, .on_close = on_worker_close};
    worker = bt_rpc_dial(loop, host, (int)wport, &cfg, &h, NULL);
    uv_tcp_t server;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", (int)port, &addr);
    uv_tcp_init(loop, &server);
    if (uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&server, 4096, on_connection) != 0) {
        fprintf(stderr, "baton-relay: cannot listen on 127.0.0.1:%" PRId64 "\n", port);
        return 1;
    }
    uv_signal_t sigs[2];
    uv_signal_init(loop, &sigs[0]);
    uv_signal_start(&sigs[0], on_signal, SIGTERM);
    uv_signal_init(loop, &sigs[1]);
    uv_signal_start(&sigs[1], on_signal, SIGINT);
    uv_run(loop, UV_RUN_DEFAULT);
    return 0;
}
