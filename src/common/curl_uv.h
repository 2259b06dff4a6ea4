/* curl_uv.h — a libcurl multi handle driven by a libuv loop: the object owns the CURLM, one
 * uv_timer for libcurl's timeouts and one uv_poll per socket libcurl asks to watch, and feeds
 * curl_multi_socket_action from them, so no transfer ever blocks the loop.
 *
 * After every libcurl step (socket activity or a timeout) the owner hears, in this order and
 * always outside libcurl's own callbacks, where curl_multi_remove_handle is allowed:
 *   1. on_step: the bytes the write callbacks buffered may be consumed now. Returning false skips
 *      steps 2 and the rest of this step's finished transfers;
 *   2. on_done, once per finished transfer, with its easy handle and result. The handle is still
 *      added: the owner removes it (bt_curl_uv_remove) and frees it. Returning false stops the
 *      reporting until the next step (the messages not read stay queued in libcurl);
 *   3. on_step_end, whatever steps 1 and 2 returned, so that it can pair with on_step.
 * Each hook may be NULL. A hook may close the object (bt_curl_uv_close): no on_done follows (only
 * the step's on_step_end), and the memory goes in a later loop turn, from the close callbacks.
 *
 * Ownership: bt_curl_uv_create returns an object owned by the caller, who gives it up with
 * bt_curl_uv_close after removing every easy handle it added. One loop, one thread. */
#ifndef BATON_CURL_UV_H
#define BATON_CURL_UV_H

#include <curl/curl.h>
#include <stdbool.h>
#include <uv.h>

#include "common/status.h"

typedef struct bt_curl_uv bt_curl_uv;

typedef struct {
    bool (*on_step)(void *ud);
    bool (*on_done)(void *ud, CURL *easy, CURLcode result);
    void (*on_step_end)(void *ud);
} bt_curl_uv_hooks;

/* curl_global_init once per process; true when libcurl is ready. Call at start-up, while the
 * process is single-threaded. */
bool bt_curl_uv_global_init(void);

/* NULL when out of memory or libcurl refuses. hooks are copied; ud is passed to each of them. */
bt_curl_uv *bt_curl_uv_create(uv_loop_t *loop, const bt_curl_uv_hooks *hooks, void *ud);

/* Starts a transfer on the loop. The easy handle stays the caller's. */
bt_status bt_curl_uv_add(bt_curl_uv *cu, CURL *easy);

/* Stops a transfer (closing its connection if it is still running). Never from inside a libcurl
 * callback; a no-op on a NULL object. */
void bt_curl_uv_remove(bt_curl_uv *cu, CURL *easy);

/* Cleans libcurl up (closing cached connections), stops and closes the timer and every poll, and
 * calls closed(ud) from the loop once the last of them has closed, after the memory is freed.
 * Every easy handle must have been removed first. No hook is called any more. NULL: a no-op. */
void bt_curl_uv_close(bt_curl_uv *cu, void (*closed)(void *ud), void *ud);

#endif
