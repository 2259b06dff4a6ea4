/* test_rpc_conn.c — unit tests of the request-plane heartbeat (src/rpc/conn.c): how a connection
 * judges its peer dead when this process itself did not run for a while.
 *
 * Each test listens on 127.0.0.1 (port 0) in its own uv loop and plays the peer with a plain
 * blocking socket on the same thread, so the test decides exactly when the loop runs and when the
 * peer's bytes arrive. A "pause" of the process is a stretch during which the test does not run
 * the loop. `resume` then runs one loop iteration in UV_RUN_DEFAULT mode, which starts with due
 * timers before any poll in every libuv version (the order that makes the bug possible), and stops
 * after that iteration's poll (a check handle).
 *
 * Covers: a pause longer than dead_after is not counted as the peer's silence (and a peer that
 * stays silent afterwards is still declared dead); bytes that arrived during a pause are read
 * before a verdict that would otherwise be due; a peer silent through many short pauses in a row
 * (a starved loop) is still declared dead.
 *
 * And the batched dispatch of a read (on_peek): 200 frames sent in one write reach on_frame all,
 * in order, and each was shown to on_peek first, in order, in batches of at most BT_RPC_BATCH; a
 * malformed frame after valid ones fails the connection only once the valid ones are handled; a
 * connection closed from on_frame mid-batch hands over no frame after that one.
 *
 * And what "not reading" means: a peer that keeps sending (PINGs) but takes none of the bytes
 * waiting for it is closed after dead_after, though they are far below the memory cap; a peer
 * that reads slowly, megabytes waiting for it for many times dead_after, is never closed. And the
 * drain notice (on_drain): once, when the unsent bytes fall below BT_RPC_BACKLOG_CONTINUATION. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "common/util.h"
#include "proto/proto.h"
#include "rpc/conn.h"

typedef struct {
    uv_loop_t loop;
    uv_check_t stopper;
    bt_rpc_listener *l;
    bt_rpc_conn *conn; /* the accepted connection, NULL once closed */
    bool opened, closed;
    bt_status why;
    char reason[160];
    int fd; /* the peer: a blocking client socket */
    /* frames handed over: on_frame's and on_peek's streams in order, the largest peek */
    uint32_t got[512], peeked[512];
    size_t ngot, npeeked, max_peek;
    uint32_t close_at; /* on_frame closes the connection on this stream (0: never) */
    bool pings;        /* the peer sends PINGs, which on_peek may show and on_frame never gets */
    size_t peer_got;   /* bytes the peer read */
    size_t drains, drain_unsent, drain_got; /* on_drain calls; the unsent bytes and peer_got at the last */
} fixture;

static void on_accept(void *ud, bt_rpc_conn *c) { ((fixture *)ud)->conn = c; }
static void on_open(void *ud, bt_rpc_conn *c) {
    (void)c;
    ((fixture *)ud)->opened = true;
}
static void on_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    fixture *x = ud;
    if (x->ngot < 512) x->got[x->ngot++] = f->stream;
    if (x->close_at && f->stream == x->close_at) bt_rpc_conn_close(c, BT_OK, "closed by the owner");
}
static void on_peek(void *ud, bt_rpc_conn *c, const bt_frame *fr, size_t n) {
    (void)c;
    fixture *x = ud;
    if (n > x->max_peek) x->max_peek = n;
    if (x->pings) return;
    /* a peek comes before the frames it shows are handed over, and shows the next ones */
    assert_int_equal(x->npeeked, x->ngot);
    for (size_t i = 0; i < n && x->npeeked < 512; i++) x->peeked[x->npeeked++] = fr[i].stream;
}
static void on_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)c;
    fixture *f = ud;
    f->closed = true;
    f->conn = NULL;
    f->why = why;
    snprintf(f->reason, sizeof f->reason, "%s", reason ? reason : "");
}
static void on_drain(void *ud, bt_rpc_conn *c) {
    fixture *f = ud;
    f->drains++;
    f->drain_unsent = bt_rpc_unsent(c);
    f->drain_got = f->peer_got;
}
static const bt_rpc_handlers handlers = {on_open, on_frame, on_close, on_accept, on_peek, on_drain};

static void on_stopper(uv_check_t *h) {
    uv_check_stop(h);
    uv_stop(h->loop);
}

/* Runs the loop without blocking for `ms` milliseconds, or until the connection closes. */
static void run_for(fixture *f, uint64_t ms) {
    uint64_t end = bt_now_ms() + ms;
    while (!f->closed && bt_now_ms() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
}

/* The loop's first iteration after a pause: due timers, then one poll (see the top comment). */
static void resume(fixture *f) {
    uv_check_start(&f->stopper, on_stopper);
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static void peer_send(fixture *f, const bt_buf *b) {
    assert_int_equal(send(f->fd, b->data, b->len, 0), (ssize_t)b->len);
}

static void peer_ping(fixture *f) {
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put_ping(&b, BT_FRAME_PING, 7), BT_OK);
    peer_send(f, &b);
    bt_buf_free(&b);
}

/* A worker-side listener with the given heartbeat settings and one open connection from the
 * peer, which has sent its HELLO and nothing else. */
static void setup(fixture *f, uint32_t ping_ms, uint32_t dead_ms) {
    memset(f, 0, sizeof *f);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    uv_check_init(&f->loop, &f->stopper);
    bt_rpc_config cfg;
    bt_rpc_config_default(&cfg, BT_ROLE_WORKER, 42);
    cfg.ping_interval_ms = ping_ms;
    cfg.dead_after_ms = dead_ms;
    char err[160];
    assert_int_equal(bt_rpc_listen(&f->loop, "127.0.0.1", 0, &cfg, &handlers, f, &f->l, err, sizeof err), BT_OK);
    f->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(f->fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)bt_rpc_listener_port(f->l))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(f->fd, (struct sockaddr *)&a, sizeof a), 0);
    bt_buf b;
    bt_buf_init(&b, 1024);
    assert_int_equal(bt_frame_put_hello(&b, BT_ROLE_FRONTEND, 7), BT_OK);
    peer_send(f, &b);
    bt_buf_free(&b);
    uint64_t end = bt_now_ms() + 3000;
    while (!f->opened && !f->closed && bt_now_ms() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    assert_true(f->opened);
    assert_false(f->closed);
}

static void teardown(fixture *f) {
    close(f->fd);
    if (f->conn) bt_rpc_conn_close(f->conn, BT_OK, "test over");
    bt_rpc_listener_close(f->l);
    uv_close((uv_handle_t *)&f->stopper, NULL);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

static void assert_declared_dead(fixture *f) {
    assert_true(f->closed);
    assert_int_equal(f->why, BT_ERR_TIMEOUT);
    if (!strstr(f->reason, "peer declared dead")) fail_msg("closed for another reason: %s", f->reason);
}

/* dead_after 400 ms, tick 50 ms. The process does not run for 1 s while the peer is silent too:
 * on resume the peer is not dead (the pause is not its silence, and nothing is waiting on the
 * socket to save it). It stays silent, so it is declared dead a little later. */
static void test_pause_not_counted(void **state) {
    (void)state;
    fixture f;
    setup(&f, 50, 400);
    usleep(1000 * 1000);
    resume(&f);
    if (f.closed) fail_msg("a 1 s pause of this process was taken for the peer's silence: %s", f.reason);
    uint64_t t0 = bt_now_ms();
    run_for(&f, 3000);
    assert_declared_dead(&f);
    printf("silent peer declared dead %llu ms after the resume\n", (unsigned long long)(bt_now_ms() - t0));
    teardown(&f);
}

/* dead_after 2000 ms, tick 200 ms (at most 400 ms of a gap between ticks counts). The peer is
 * silent for 1.85 s while the loop runs, then sends a PING, and the process does not run for
 * 250 ms: at the first tick after it the silence is at least 2 s, and the PING is waiting
 * unread. It must be read before any verdict. */
static void test_waiting_bytes_read_first(void **state) {
    (void)state;
    fixture f;
    setup(&f, 200, 2000);
    uint64_t end = bt_now_ms() + 5000;
    while (!f.closed && bt_now_ms() < end && bt_now_ms() - bt_rpc_last_rx_ms(f.conn) < 1850) {
        uv_run(&f.loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    if (f.closed) fail_msg("declared dead before the silence reached 1.85 s: %s", f.reason);
    uint64_t rx_before = bt_rpc_last_rx_ms(f.conn);
    peer_ping(&f);
    usleep(250 * 1000);
    resume(&f);
    if (f.closed) fail_msg("the peer was declared dead with its PING waiting on the socket: %s", f.reason);
    assert_true(bt_rpc_last_rx_ms(f.conn) > rx_before);
    /* the deferral is one poll, not an exemption: silent from now on, the peer is declared dead */
    run_for(&f, 5000);
    assert_declared_dead(&f);
    teardown(&f);
}

/* dead_after 400 ms, tick 50 ms. A starved process: it runs one loop iteration every 200 ms. A
 * silent peer is still declared dead after a bounded number of iterations (each counts at least
 * one tick, at most two: dead_after / tick + 1 = 9 at most). */
static void test_silent_peer_dead_through_pauses(void **state) {
    (void)state;
    fixture f;
    setup(&f, 50, 400);
    int n = 0;
    while (!f.closed && n < 12) {
        usleep(200 * 1000);
        resume(&f);
        n++;
    }
    assert_declared_dead(&f);
    assert_true(n >= 2); /* not at the first resume: the pauses are not the peer's silence */
    printf("silent peer declared dead at resume %d of a loop that runs every 200 ms\n", n);
    teardown(&f);
}

/* Queues `mib` MiB for the peer on the accepted connection (REQUEST frames of 1 MiB), with its
 * receive buffer shrunk so that the kernel holds little of it. Returns the bytes queued. */
static size_t queue_for_peer(fixture *f, size_t mib) {
    size_t len = 0;
    int small = 64 * 1024;
    assert_int_equal(setsockopt(f->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    static char chunk[1 << 20];
    memset(chunk, 'x', sizeof chunk);
    for (size_t i = 0; i < mib; i++) {
        bt_buf *w = bt_rpc_wbuf(f->conn);
        assert_non_null(w);
        assert_int_equal(bt_frame_put(w, BT_FRAME_REQUEST, 1 + 2 * (uint32_t)i, chunk, sizeof chunk), BT_OK);
        len = w->len;
    }
    bt_rpc_flush(f->conn);
    return len;
}

/* dead_after 400 ms, tick 50 ms. 8 MiB wait for a peer that PINGs every 50 ms (so it is not
 * silent) and never reads: closed as not reading within a few ticks past dead_after. The bytes are
 * an eighth of the 64 MiB cap, which alone would have kept it forever. */
static void test_not_reading_is_no_progress(void **state) {
    (void)state;
    fixture f;
    setup(&f, 50, 400);
    f.pings = true;
    queue_for_peer(&f, 8);
    assert_true(bt_rpc_unsent(f.conn) > (size_t)4 << 20);
    uint64_t t0 = bt_now_ms(), last_ping = 0;
    while (!f.closed && bt_now_ms() - t0 < 3000) {
        if (bt_now_ms() - last_ping >= 50) {
            peer_ping(&f);
            last_ping = bt_now_ms();
        }
        uv_run(&f.loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    uint64_t took = bt_now_ms() - t0;
    if (!f.closed) fail_msg("a peer that took no byte for 3 s (dead_after 400 ms) is still connected");
    assert_int_equal(f.why, BT_ERR_TIMEOUT);
    if (!strstr(f.reason, "not reading")) fail_msg("closed for another reason: %s", f.reason);
    /* waiting is counted from the tick before the bytes were queued: dead_after less one tick */
    if (took < 350 || took >= 1000) fail_msg("closed after %llu ms, not within [350, 1000)", (unsigned long long)took);
    printf("peer that does not read closed after %llu ms: %s\n", (unsigned long long)took, f.reason);
    teardown(&f);
}

/* dead_after 400 ms, tick 50 ms. 8 MiB wait for a peer that reads 64 KiB every 20 ms (about 3 MB/s):
 * bytes wait for it for more than 2 s, five times dead_after, and it is never closed. */
static void test_slow_reader_not_dead(void **state) {
    (void)state;
    fixture f;
    setup(&f, 50, 400);
    f.pings = true;
    size_t total = queue_for_peer(&f, 8), got = 0;
    static char sink[64 * 1024];
    uint64_t t0 = bt_now_ms(), last_read = 0;
    while (!f.closed && got < total && bt_now_ms() - t0 < 20000) {
        if (bt_now_ms() - last_read >= 20) {
            ssize_t n = recv(f.fd, sink, sizeof sink, MSG_DONTWAIT);
            if (n > 0) got += (size_t)n;
            peer_ping(&f);
            last_read = bt_now_ms();
        }
        uv_run(&f.loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
    if (f.closed) fail_msg("a peer reading steadily was closed after %zu of %zu bytes: %s", got, total, f.reason);
    assert_true(got >= total);
    assert_true(bt_now_ms() - t0 > 5 * 400);
    printf("slow reader took %zu bytes in %llu ms, still connected\n", got, (unsigned long long)(bt_now_ms() - t0));
    teardown(&f);
}

/* Appends KILL frames for streams first..last (odd: the frontend's) to b. */
static void put_kills(bt_buf *b, uint32_t first, uint32_t last) {
    for (uint32_t s = first; s <= last; s += 2) assert_int_equal(bt_frame_put(b, BT_FRAME_KILL, s, NULL, 0), BT_OK);
}

/* Runs the loop until `n` frames were handed over or the connection closed (3 s at most). */
static void run_until_frames(fixture *f, size_t n) {
    uint64_t end = bt_now_ms() + 3000;
    while (f->ngot < n && !f->closed && bt_now_ms() < end) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        usleep(1000);
    }
}

/* 200 frames in one write: all handed over in order, each peeked at just before (batches of at
 * most BT_RPC_BATCH, and more than one frame per batch: the look-ahead is real). */
static void test_batch_in_order(void **state) {
    (void)state;
    fixture f;
    setup(&f, 1000, 10000);
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    put_kills(&b, 1, 399);
    peer_send(&f, &b);
    bt_buf_free(&b);
    run_until_frames(&f, 200);
    assert_false(f.closed);
    assert_int_equal(f.ngot, 200);
    for (size_t i = 0; i < 200; i++) assert_int_equal(f.got[i], 1 + 2 * i);
    assert_int_equal(f.npeeked, 200); /* every one peeked (a batch of one is not shown: nothing to overlap) */
    for (size_t i = 0; i < 200; i++) assert_int_equal(f.peeked[i], 1 + 2 * i);
    assert_true(f.max_peek > 1 && f.max_peek <= BT_RPC_BATCH);
    teardown(&f);
}

/* Valid frames, then a frame of an unknown type in the same write: the valid ones are handed
 * over, then the connection fails as malformed. */
static void test_batch_then_malformed(void **state) {
    (void)state;
    fixture f;
    setup(&f, 1000, 10000);
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    put_kills(&b, 1, 19);
    static const uint8_t bad[12] = {0, 0, 0, 8, 200, 0, 0, 0, 0, 0, 0, 1}; /* type 200 */
    bt_buf_append(&b, (const char *)bad, sizeof bad);
    put_kills(&b, 21, 29); /* never handed over */
    peer_send(&f, &b);
    bt_buf_free(&b);
    run_until_frames(&f, 1000);
    assert_true(f.closed);
    assert_int_equal(f.why, BT_ERR_PROTOCOL);
    assert_int_equal(f.ngot, 10);
    for (size_t i = 0; i < 10; i++) assert_int_equal(f.got[i], 1 + 2 * i);
    teardown(&f);
}

/* The owner closes the connection while handling the 5th frame of a batch: no later frame of
 * that batch or of the rest of the read is handed over. */
static void test_batch_closed_midway(void **state) {
    (void)state;
    fixture f;
    setup(&f, 1000, 10000);
    f.close_at = 9;
    bt_buf b;
    bt_buf_init(&b, 1 << 20);
    put_kills(&b, 1, 99);
    peer_send(&f, &b);
    bt_buf_free(&b);
    run_until_frames(&f, 1000);
    assert_true(f.closed);
    assert_int_equal(f.ngot, 5);
    assert_int_equal(f.got[4], 9);
    teardown(&f);
}

/* 40 MiB in 1 MiB writes wait for a peer that does not read, past BT_RPC_BACKLOG_CONTINUATION: no on_drain. The
 * peer then reads, and on_drain comes once, as soon as the unsent bytes fall below the mark (while
 * most of them still wait), not again when the rest go. */
static void test_drain_below_mark(void **state) {
    (void)state;
    fixture f;
    setup(&f, 50, 10000);
    f.pings = true;
    size_t total = 0;
    for (int i = 0; i < 40; i++) total += queue_for_peer(&f, 1); /* 40 writes, as over 40 loop iterations */
    assert_true(bt_rpc_unsent(f.conn) >= BT_RPC_BACKLOG_CONTINUATION);
    run_for(&f, 100);
    assert_int_equal(f.drains, 0);
    static char sink[256 * 1024];
    uint64_t t0 = bt_now_ms();
    while (!f.closed && f.peer_got < total && bt_now_ms() - t0 < 20000) {
        ssize_t n = recv(f.fd, sink, sizeof sink, MSG_DONTWAIT);
        if (n > 0) f.peer_got += (size_t)n;
        uv_run(&f.loop, UV_RUN_NOWAIT);
    }
    if (f.closed) fail_msg("closed while the peer read: %s", f.reason);
    assert_true(f.peer_got >= total);
    run_for(&f, 50);
    assert_int_equal(f.drains, 1);
    assert_true(f.drain_unsent < BT_RPC_BACKLOG_CONTINUATION);
    /* the mark is 32 of the 40 MiB: it fell below with some 8 MiB read (the kernel's buffers hold a
     * few more), far from all of it */
    if (f.drain_got > (size_t)20 << 20) fail_msg("on_drain came only after %zu bytes read", f.drain_got);
    printf("on_drain once, %zu bytes unsent, after the peer read %zu of %zu\n", f.drain_unsent, f.drain_got, total);
    teardown(&f);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pause_not_counted),
        cmocka_unit_test(test_waiting_bytes_read_first),
        cmocka_unit_test(test_silent_peer_dead_through_pauses),
        cmocka_unit_test(test_batch_in_order),
        cmocka_unit_test(test_batch_then_malformed),
        cmocka_unit_test(test_batch_closed_midway),
        cmocka_unit_test(test_not_reading_is_no_progress),
        cmocka_unit_test(test_slow_reader_not_dead),
        cmocka_unit_test(test_drain_below_mark),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
