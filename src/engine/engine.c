/* engine.c — helpers shared by every engine implementation, and the argument checks of
 * bt_engine_submit, made once here rather than in each engine. */
#include "engine/engine.h"

#include <stdio.h>
#include <string.h>

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

const char *bt_kv_fallback_name(bt_kv_fallback r) {
    static const char *const names[BT_KV_FB_N_] = {"missing", "corrupt", "mismatch", "tokens", "import", "unsupported"};
    return (unsigned)r < BT_KV_FB_N_ ? names[r] : "unknown";
}

void bt_engine_handoff(bt_engine *e, bt_engine_seq *s, bt_engine_handoff_cb cb, void *ud) {
    if (e->ops->handoff) {
        e->ops->handoff(e, s, cb, ud);
        return;
    }
    e->ops->kill(e, s);
    cb(ud, NULL, 0);
}

void bt_engine_kv_stats_get(bt_engine *e, bt_engine_kv_stats *out) {
    memset(out, 0, sizeof *out);
    if (e && e->ops->kv_stats) e->ops->kv_stats(e, out);
}
