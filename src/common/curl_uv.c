/* curl_uv.c — libcurl's multi socket interface on a libuv loop (see curl_uv.h). libcurl tells us
 * which sockets to watch (sock_cb) and when to call it back (timer_cb); each socket gets a uv_poll
 * and the timeout one uv_timer, and both feed curl_multi_socket_action. The polls are listed so
 * that close reaches those libcurl never asked us to remove. */
#include "common/curl_uv.h"

#include <stdlib.h>
#include <sys/queue.h>

#include "common/closer.h"

typedef struct cu_sock {
    uv_poll_t poll;
    curl_socket_t fd;
    bt_curl_uv *cu;
    LIST_ENTRY(cu_sock) link;
} cu_sock;

struct bt_curl_uv {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    LIST_HEAD(, cu_sock) socks;
    bt_curl_uv_hooks h;
    void *ud;
    bt_closer closer; /* every poll (held from its start) and the timer, until their close callbacks */
    bool closing;
    void (*closed)(void *ud);
    void *closed_ud;
};

bool bt_curl_uv_global_init(void) {
    static bool ready = false;
    if (!ready) ready = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
    return ready;
}

/* The closer's done: the last handle has closed after bt_curl_uv_close. */
static void cu_free(void *ud) {
    bt_curl_uv *cu = ud;
    void (*closed)(void *) = cu->closed;
    void *closed_ud = cu->closed_ud;
    free(cu);
    if (closed) closed(closed_ud);
}

static void on_sock_closed(uv_handle_t *h) {
    cu_sock *c = h->data;
    bt_curl_uv *cu = c->cu;
    free(c);
    bt_closer_release(&cu->closer);
}

static void sock_release(cu_sock *c) {
    LIST_REMOVE(c, link);
    uv_poll_stop(&c->poll);
    uv_close((uv_handle_t *)&c->poll, on_sock_closed);
}

/* After curl_multi_socket_action: the owner's hooks, outside libcurl. */
static void step(bt_curl_uv *cu) {
    bool go = !cu->h.on_step || cu->h.on_step(cu->ud);
    CURLMsg *msg;
    int left;
    while (go && !cu->closing && cu->h.on_done && (msg = curl_multi_info_read(cu->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE) continue;
        go = cu->h.on_done(cu->ud, msg->easy_handle, msg->data.result);
    }
    if (cu->h.on_step_end) cu->h.on_step_end(cu->ud);
}

static void on_poll(uv_poll_t *h, int status, int events) {
    cu_sock *c = h->data;
    bt_curl_uv *cu = c->cu;
    int flags = 0;
    if (status < 0) flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
    int running;
    curl_multi_socket_action(cu->multi, c->fd, flags, &running);
    step(cu);
}

static int sock_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
    (void)easy;
    bt_curl_uv *cu = userp;
    cu_sock *c = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (c) {
            curl_multi_assign(cu->multi, s, NULL);
            sock_release(c);
        }
        return 0;
    }
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c) return -1;
        c->fd = s;
        c->cu = cu;
        if (uv_poll_init_socket(cu->loop, &c->poll, s) != 0) {
            free(c);
            return -1;
        }
        c->poll.data = c;
        bt_closer_hold(&cu->closer);
        LIST_INSERT_HEAD(&cu->socks, c, link);
        curl_multi_assign(cu->multi, s, c);
    }
    int ev = 0;
    if (what & CURL_POLL_IN) ev |= UV_READABLE;
    if (what & CURL_POLL_OUT) ev |= UV_WRITABLE;
    uv_poll_start(&c->poll, ev, on_poll);
    return 0;
}

static void on_timer(uv_timer_t *t) {
    bt_curl_uv *cu = t->data;
    int running;
    curl_multi_socket_action(cu->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    step(cu);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp) {
    (void)multi;
    bt_curl_uv *cu = userp;
    if (timeout_ms < 0) uv_timer_stop(&cu->timer);
    else uv_timer_start(&cu->timer, on_timer, (uint64_t)timeout_ms, 0);
    return 0;
}

bt_curl_uv *bt_curl_uv_create(uv_loop_t *loop, const bt_curl_uv_hooks *hooks, void *ud) {
    bt_curl_uv *cu = calloc(1, sizeof *cu);
    if (!cu) return NULL;
    cu->multi = curl_multi_init();
    if (!cu->multi) {
        free(cu);
        return NULL;
    }
    cu->loop = loop;
    if (hooks) cu->h = *hooks;
    cu->ud = ud;
    curl_multi_setopt(cu->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
    curl_multi_setopt(cu->multi, CURLMOPT_SOCKETDATA, cu);
    curl_multi_setopt(cu->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(cu->multi, CURLMOPT_TIMERDATA, cu);
    uv_timer_init(loop, &cu->timer);
    cu->timer.data = cu;
    LIST_INIT(&cu->socks);
    bt_closer_init(&cu->closer, cu_free, cu);
    return cu;
}

bt_status bt_curl_uv_add(bt_curl_uv *cu, CURL *easy) {
    if (!cu || cu->closing) return BT_ERR_SHUTDOWN;
    return curl_multi_add_handle(cu->multi, easy) == CURLM_OK ? BT_OK : BT_ERR_INTERNAL;
}

void bt_curl_uv_remove(bt_curl_uv *cu, CURL *easy) {
    if (cu && cu->multi && easy) curl_multi_remove_handle(cu->multi, easy);
}

void bt_curl_uv_close(bt_curl_uv *cu, void (*closed)(void *ud), void *ud) {
    if (!cu || cu->closing) return;
    cu->closing = true;
    cu->closed = closed;
    cu->closed_ud = ud;
    /* Closes cached connections; their sockets' polls are released through sock_cb. */
    curl_multi_cleanup(cu->multi);
    cu->multi = NULL;
    while (!LIST_EMPTY(&cu->socks)) sock_release(LIST_FIRST(&cu->socks));
    uv_timer_stop(&cu->timer);
    bt_closer_close(&cu->closer, (uv_handle_t *)&cu->timer);
    bt_closer_seal(&cu->closer);
}
