/* events.c — see events.h: configuration defaults and checks, plane selection, and the ActiveLoad
 * JSON codec. The encoder is hand-written (one snprintf, no allocation: a worker publishes on
 * every load change); the decoder uses jansson because it reads what other programs wrote. */
#include "events/events.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "events/events_internal.h"

void bt_events_collect(const bt_events *e, const bt_events_stats *s, bt_metrics *r, const char *prefix) {
    char name[96];
    snprintf(name, sizeof name, "%s_event_plane_connected", prefix);
    bt_metrics_add(bt_metrics_gauge(r, name, BT_MERGE_MIN, "1 while the event plane is connected"),
                   s->connected ? 1 : 0, "plane", bt_events_plane(e), NULL);
    snprintf(name, sizeof name, "%s_event_plane_connects_total", prefix);
    bt_metrics_counter_value(r, name, "Connections made to the event plane", (double)s->connects);
}

static const char *env_or_null(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

void bt_events_config_default(bt_events_config *c) {
    memset(c, 0, sizeof *c);
    c->plane = "direct";
    c->nats_server = "nats://localhost:4222";
    c->ns = "dynamo";
    c->name = "baton";
    c->user = env_or_null("NATS_AUTH_USERNAME");
    c->password = env_or_null("NATS_AUTH_PASSWORD");
    c->token = env_or_null("NATS_AUTH_TOKEN");
    c->nkey = env_or_null("NATS_AUTH_NKEY");
    c->creds_file = env_or_null("NATS_AUTH_CREDENTIALS_FILE");
    c->debounce_ms = 2;
    c->reconnect_min_ms = 100;
    c->reconnect_max_ms = 2000;
    c->connect_timeout_ms = 2000;
    c->ping_interval_ms = 5000;
    c->max_pending_bytes = 256 * 1024;
    c->max_queued_msgs = 4096;
}

bool bt_events_urls_ok(const char *s, char *err, size_t errlen) {
    if (!s || !*s) {
        snprintf(err, errlen, "NATS_SERVER is empty");
        return false;
    }
    /* split here by hand, not with bt_list_next: the list goes whole to the NATS library, which
     * splits it itself, and a trailing comma (an empty URL to it) must be refused, not dropped */
    const char *p = s;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        while (n && *p == ' ') p++, n--;
        bool ok = (n > 7 && strncmp(p, "nats://", 7) == 0) || (n > 6 && strncmp(p, "tls://", 6) == 0);
        if (!ok) {
            snprintf(err, errlen, "invalid NATS server URL '%.*s' in '%s' (expected nats://host:port)", (int)n, p, s);
            return false;
        }
        if (!end) return true;
        p = end + 1;
    }
}

bt_status bt_events_create(uv_loop_t *loop, const bt_events_config *c, bt_events **out, char *err, size_t errlen) {
    *out = NULL;
    if (!c->plane || strcmp(c->plane, "direct") == 0) return BT_OK;
    if (strcmp(c->plane, "nats") != 0) {
        snprintf(err, errlen, "unknown event plane '%s' (direct or nats)", c->plane);
        return BT_ERR_INVALID;
    }
    if (!bt_events_urls_ok(c->nats_server, err, errlen)) return BT_ERR_INVALID;
    if (!c->ns || !*c->ns || strpbrk(c->ns, " .*>\t\r\n")) {
        snprintf(err, errlen, "namespace '%s' cannot be part of a NATS subject", c->ns ? c->ns : "");
        return BT_ERR_INVALID;
    }
    if (c->debounce_ms < 1 || c->debounce_ms > 1000 || c->reconnect_min_ms < 1 ||
        c->reconnect_max_ms < c->reconnect_min_ms || c->max_queued_msgs < 1) {
        snprintf(err, errlen, "invalid event-plane timing configuration");
        return BT_ERR_INVALID;
    }
    return bt__events_nats_create(loop, c, out, err, errlen);
}

/* ---- codec ---- */

size_t bt_events_encode_load(char *buf, size_t cap, uint64_t worker_id, const bt_load_report *r) {
    /* the priority-preemption fields (proto.h, BT_LOAD_PREEMPT) only when the worker has victims */
    uint32_t victims;
    int32_t vprio;
    char pre[64] = "";
    if (bt_load_get_preempt(r, &victims, &vprio))
        snprintf(pre, sizeof pre, ",\"preempt_victims\":%u,\"preempt_priority\":%d", (unsigned)victims, (int)vprio);
    int n = snprintf(buf, cap,
                     "{\"worker_id\":%" PRIu64 ",\"dp_rank\":0,\"active_decode_blocks\":%" PRIu64
                     ",\"active_prefill_tokens\":%" PRIu64 ",\"total_blocks\":%" PRIu64 ",\"waiting\":%" PRIu64
                     ",\"running\":%" PRIu64 ",\"max_num_batched_tokens\":%" PRIu64 ",\"ready\":%s%s}",
                     worker_id, r->active_decode_blocks, r->active_prefill_tokens, r->total_blocks, r->waiting,
                     r->running, r->max_num_batched_tokens, (r->flags & BT_LOAD_READY) ? "true" : "false", pre);
    if (n < 0 || (size_t)n >= cap) {
        if (cap) buf[0] = '\0';
        return 0;
    }
    return (size_t)n;
}

/* A count field: missing or null is 0; otherwise a non-negative integer. */
static bool get_count(const json_t *o, const char *k, uint64_t *v, char *err, size_t errlen) {
    const json_t *j = json_object_get(o, k);
    if (!j || json_is_null(j)) {
        *v = 0;
        return true;
    }
    if (!json_is_integer(j) || json_integer_value(j) < 0) {
        snprintf(err, errlen, "'%s' must be a non-negative integer or null", k);
        return false;
    }
    *v = (uint64_t)json_integer_value(j);
    return true;
}

bt_status bt_events_decode_load(const char *p, size_t n, uint64_t *worker_id, bt_load_report *r, char *err,
                                size_t errlen) {
    json_error_t jerr;
    bt_status st = BT_ERR_INVALID;
    memset(r, 0, sizeof *r);
    json_t *o = json_loadb(p, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(o)) {
        snprintf(err, errlen, "not a JSON object%s%s", o ? "" : ": ", o ? "" : jerr.text);
        goto out;
    }
    const json_t *id = json_object_get(o, "worker_id");
    if (!json_is_integer(id) || json_integer_value(id) < 0) {
        snprintf(err, errlen, "'worker_id' must be a non-negative integer");
        goto out;
    }
    *worker_id = (uint64_t)json_integer_value(id);
    const json_t *dp = json_object_get(o, "dp_rank");
    if (dp && !json_is_null(dp) && (!json_is_integer(dp) || json_integer_value(dp) < 0)) {
        snprintf(err, errlen, "'dp_rank' must be a non-negative integer");
        goto out;
    }
    if (!get_count(o, "active_decode_blocks", &r->active_decode_blocks, err, errlen) ||
        !get_count(o, "active_prefill_tokens", &r->active_prefill_tokens, err, errlen) ||
        !get_count(o, "total_blocks", &r->total_blocks, err, errlen) ||
        !get_count(o, "waiting", &r->waiting, err, errlen) || !get_count(o, "running", &r->running, err, errlen) ||
        !get_count(o, "max_num_batched_tokens", &r->max_num_batched_tokens, err, errlen))
        goto out;
    const json_t *ready = json_object_get(o, "ready");
    if (ready && !json_is_boolean(ready)) {
        snprintf(err, errlen, "'ready' must be a boolean");
        goto out;
    }
    r->flags = (!ready || json_is_true(ready)) ? BT_LOAD_READY : 0;
    /* optional: the victims a more urgent arrival would find, and their priority (both or neither) */
    uint64_t victims;
    if (!get_count(o, "preempt_victims", &victims, err, errlen)) goto out;
    const json_t *vp = json_object_get(o, "preempt_priority");
    if (victims) {
        if (!json_is_integer(vp) || json_integer_value(vp) < -BT_LOAD_VICTIM_PRIO_MAX ||
            json_integer_value(vp) > BT_LOAD_VICTIM_PRIO_MAX) {
            snprintf(err, errlen, "'preempt_priority' must be an integer from %d to %d with 'preempt_victims'",
                     -BT_LOAD_VICTIM_PRIO_MAX, BT_LOAD_VICTIM_PRIO_MAX);
            goto out;
        }
        bt_load_set_preempt(r, victims, (int64_t)json_integer_value(vp));
    }
    st = BT_OK;
out:
    json_decref(o);
    return st;
}

char *bt__events_log_text(const char *s, size_t n, char *out, size_t cap) {
    static const char hex[] = "0123456789abcdef";
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        total += c == '\\' ? 2 : c >= 0x20 && c < 0x7f ? 1 : 4;
    }
    bool cut = total + 1 > cap;
    size_t room = cut ? cap - 4 : cap - 1, o = 0; /* cap >= 4: room for "..." and the NUL */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[4];
        size_t k = 0;
        if (c == '\\') esc[k++] = '\\', esc[k++] = '\\';
        else if (c >= 0x20 && c < 0x7f) esc[k++] = (char)c;
        else esc[k++] = '\\', esc[k++] = 'x', esc[k++] = hex[c >> 4], esc[k++] = hex[c & 15];
        if (o + k > room) break; /* an escape goes whole or not at all */
        memcpy(out + o, esc, k);
        o += k;
    }
    if (cut) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
    return out;
}

bool bt__events_parting_err(const char *buf, size_t n, char *out, size_t cap) {
    out[0] = '\0';
    if (n < 2 || buf[n - 2] != '\r' || buf[n - 1] != '\n') return false;
    size_t end = n - 2, start = end;
    while (start > 0 && buf[start - 1] != '\n') start--;
    if (end - start < 4 || memcmp(buf + start, "-ERR", 4) != 0) return false;
    start += 4;
    while (start < end && (buf[start] == ' ' || buf[start] == '\t')) start++;
    while (end > start && (buf[end - 1] == ' ' || buf[end - 1] == '\t')) end--;
    bt__events_log_text(buf + start, end - start, out, cap);
    return true;
}
