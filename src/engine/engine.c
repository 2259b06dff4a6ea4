/* engine.c — helpers shared by every engine implementation, the argument checks of
 * bt_engine_submit, made once here rather than in each engine, and the batch-gathering policy
 * (bt_engine_gather) of the engines that schedule steps. */
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
    case BT_FINISH_CONTENT_FILTER: return "content_filter";
    case BT_FINISH_TOOL_CALLS: return "tool_calls";
    case BT_FINISH_FUNCTION_CALL: return "function_call";
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

void bt_engine_gather_init(bt_engine_gather *g, int64_t window_us) {
    memset(g, 0, sizeof *g);
    if (window_us > 0 && window_us <= BT_GATHER_MAX_US) g->window_ns = (uint64_t)window_us * 1000u;
}

void bt_engine_gather_arrive(bt_engine_gather *g, uint64_t now_ns, bool idle) {
    if (!g->window_ns) return;
    if (g->active) {
        if (now_ns > g->last_ns) g->last_ns = now_ns;
    } else if (idle) {
        g->active = true;
        g->first_ns = g->last_ns = now_ns;
    }
}

uint64_t bt_engine_gather_deadline(const bt_engine_gather *g) {
    uint64_t quiet = g->last_ns + g->window_ns, bound = g->first_ns + BT_GATHER_BOUND * g->window_ns;
    return quiet < bound ? quiet : bound;
}

bool bt_engine_gather_holds(const bt_engine_gather *g, uint64_t now_ns) {
    return g->active && now_ns < bt_engine_gather_deadline(g);
}

uint64_t bt_engine_gather_end(bt_engine_gather *g, uint64_t now_ns) {
    if (!g->active) return 0;
    g->active = false;
    return now_ns > g->first_ns ? now_ns - g->first_ns : 0;
}
