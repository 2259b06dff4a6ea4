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
 * (a starved loop) is still declared dead. */
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
} fixture;

static void on_accept(void *ud, bt_rpc_conn *c) { ((fixture *)ud)->conn = c; }
static void on_open(void *ud, bt_rpc_conn *c) {
    (void)c;
    ((fixture *)ud)->opened = true;
}
static void on_frame(void *ud, bt_rpc_conn *c, const bt_frame *f) {
    (void)ud;
    (void)c;
    (void)f;
}
static void on_close(void *ud, bt_rpc_conn *c, bt_status why, const char *reason) {
    (void)c;
    fixture *f = ud;
    f->closed = true;
    f->conn = NULL;
    f->why = why;
    snprintf(f->reason, sizeof f->reason, "%s", reason ? reason : "");
}
static const bt_rpc_handlers handlers = {on_open, on_frame, on_close, on_accept};

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

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pause_not_counted),
        cmocka_unit_test(test_waiting_bytes_read_first),
        cmocka_unit_test(test_silent_peer_dead_through_pauses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
