/* closer.c — the countdown of closes behind an object's free (see closer.h). It owns nothing:
 * the object that embeds it decides what `done` frees. It never calls `done` before the seal, so
 * a close that completes while the owner is still starting the others cannot free it early. */
#include "common/closer.h"

void bt_closer_init(bt_closer *c, void (*done)(void *ud), void *ud) {
    c->pending = 0;
    c->sealed = false;
    c->done = done;
    c->ud = ud;
}

static void finish_if_done(bt_closer *c) {
    if (c->sealed && c->pending == 0 && c->done) {
        void (*done)(void *) = c->done;
        c->done = NULL; /* once */
        done(c->ud);
    }
}

static void on_closed(uv_handle_t *h) { bt_closer_release(h->data); }

void bt_closer_close(bt_closer *c, uv_handle_t *h) {
    c->pending++;
    h->data = c;
    uv_close(h, on_closed);
}

void bt_closer_hold(bt_closer *c) { c->pending++; }

void bt_closer_release(void *closer) {
    bt_closer *c = closer;
    c->pending--;
    finish_if_done(c);
}

void bt_closer_seal(bt_closer *c) {
    c->sealed = true;
    finish_if_done(c);
}
