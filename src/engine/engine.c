/* engine.c — helpers shared by every engine implementation, and the argument checks of
 * bt_engine_submit, made once here rather than in each engine. */
#include "engine/engine.h"

#include <stdio.h>

bt_status bt_engine_submit(bt_engine *e, const bt_engine_request *req, const bt_engine_sink *sink, void *ud,
                           bt_engine_seq **out, char *err, size_t errlen) {
    char dummy[1];
    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = '\0';
    if (out) *out = NULL;
    if (!req || !sink || !out || !sink->on_tokens || !sink->on_finish || !sink->on_error) {
        snprintf(err, errlen, "submit needs a request, a complete sink and an output handle");
        return BT_ERR_INVALID;
    }
    return e->ops->submit(e, req, sink, ud, out, err, errlen);
}

const char *bt_finish_reason_name(bt_finish_reason r) {
    switch (r) {
    case BT_FINISH_STOP: return "stop";
    case BT_FINISH_LENGTH: return "length";
    case BT_FINISH_CANCELLED: return "cancelled";
    }
    return "stop";
}
