/* closer.h — "close N handles, then free": one countdown for an object that owns several libuv
 * handles (and other things that close asynchronously, such as a bt_curl_uv) and may be freed
 * only once every one of them has reported closed.
 *
 * Use: embed a bt_closer in the object; when tearing down, start each close through
 * bt_closer_close (libuv handles) or bt_closer_hold + a later bt_closer_release (anything else),
 * then call bt_closer_seal. `done` runs exactly once, after the seal and the last completed close:
 * from the close callback that completes last, or from bt_closer_seal itself when nothing is
 * pending any more. `done` typically frees the object that embeds the closer; nothing touches the
 * closer after `done` has been called.
 *
 * bt_closer_close repoints h->data at the closer: after uv_close libuv makes no callback of h but
 * the close callback, so nothing else may read h->data from then on. Requests still pending on the
 * handle (a write, a connect) complete with UV_ECANCELED and must find their owner through the
 * request, not through the handle. Loop thread only. */
#ifndef BATON_COMMON_CLOSER_H
#define BATON_COMMON_CLOSER_H

#include <stdbool.h>
#include <uv.h>

typedef struct bt_closer {
    unsigned pending; /* closes started and not completed */
    bool sealed;      /* every close has been started */
    void (*done)(void *ud);
    void *ud;
} bt_closer;

void bt_closer_init(bt_closer *c, void (*done)(void *ud), void *ud);

/* uv_close(h) counted by c. h must be initialised and not closing already. */
void bt_closer_close(bt_closer *c, uv_handle_t *h);

/* One more asynchronous close to wait for; bt_closer_release reports it complete. The release's
 * signature fits completion callbacks that pass a `void *` (give c as their user data). */
void bt_closer_hold(bt_closer *c);
void bt_closer_release(void *closer);

/* Every close has been started: `done` runs once the pending ones complete (now, if none is). */
void bt_closer_seal(bt_closer *c);

#endif
