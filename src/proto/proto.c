/* proto.c — the request-plane frame codec (see proto.h and docs/protocol.md).
 *
 * Parsing never allocates and never reads past p[n): every read goes through the rd* helpers
 * after an explicit length check, and lengths from the wire are compared by subtraction so that
 * no sum can overflow. The header is validated as soon as its 12 bytes are present (and the
 * length cap as soon as its 4 bytes are), so a hostile peer is rejected before the receiver
 * buffers its payload. Encoders reserve the whole frame once in the bt_buf and write in place;
 * they refuse (BT_ERR_INVALID) to produce a frame that bt_frame_parse would reject. */
#include "proto/proto.h"

#include <string.h>

/* ---- big-endian helpers ------------------------------------------------------------------- */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)((unsigned)p[0] << 8 | p[1]); }

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) << 32 | rd32(p + 4); }

static uint8_t *wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}

static uint8_t *wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}

static uint8_t *wr64(uint8_t *p, uint64_t v) { return wr32(wr32(p, (uint32_t)(v >> 32)), (uint32_t)v); }

/* ---- shared validation -------------------------------------------------------------------- */

#define HELLO_LEN 12u
#define FINISH_LEN 12u
#define PING_LEN 8u
#define LOAD_LEN 52u
#define AUTH_PAYLOAD_LEN (1u + BT_AUTH_LEN)
#define WAITING_LEN 1u

static bool on_stream0(uint8_t type) {
    return type == BT_FRAME_HELLO || type == BT_FRAME_PING || type == BT_FRAME_PONG || type == BT_FRAME_LOAD ||
           type == BT_FRAME_GOAWAY || type == BT_FRAME_AUTH;
}

/* Checks everything the 12-byte header decides: type, stream rule, payload size. Returns NULL
 * when the header is acceptable, otherwise a static reason. */
static const char *check_header(uint8_t type, uint32_t stream, uint64_t plen) {
    if (type < 1 || type > BT_FRAME_TYPE_MAX_) return "unknown frame type";
    if (type != BT_FRAME_ERROR) {
        if (on_stream0(type) && stream != 0) return "frame must be on stream 0";
        if (!on_stream0(type) && stream == 0) return "frame must not be on stream 0";
    }
    switch (type) {
    case BT_FRAME_HELLO: return plen == HELLO_LEN ? NULL : "bad HELLO payload size";
    case BT_FRAME_FINISH: return plen == FINISH_LEN ? NULL : "bad FINISH payload size";
    case BT_FRAME_PING:
    case BT_FRAME_PONG: return plen == PING_LEN ? NULL : "bad PING/PONG payload size";
    case BT_FRAME_LOAD: return plen == LOAD_LEN ? NULL : "bad LOAD payload size";
    case BT_FRAME_AUTH: return plen == AUTH_PAYLOAD_LEN ? NULL : "bad AUTH payload size";
    case BT_FRAME_STOP:
    case BT_FRAME_KILL: return plen == 0 ? NULL : "STOP/KILL payload must be empty";
    case BT_FRAME_WAITING: return plen == WAITING_LEN ? NULL : "bad WAITING payload size";
    case BT_FRAME_TOKENS: return plen >= 2 ? NULL : "TOKENS payload too short";
    case BT_FRAME_ERROR:
    case BT_FRAME_GOAWAY: return plen >= 2 ? NULL : "ERROR/GOAWAY payload too short";
    case BT_FRAME_KVSTATE:
        return plen < BT_KV_HEADER                    ? "KVSTATE payload too short"
               : plen > BT_KV_HEADER + BT_KV_PIECE_MAX ? "KVSTATE piece too large"
                                                      : NULL;
    default: return NULL; /* REQUEST: any size; its JSON is judged by the worker */
    }
}

/* Checks what only the complete payload decides. */
static const char *check_payload(uint8_t type, const uint8_t *pl, uint32_t plen) {
    switch (type) {
    case BT_FRAME_TOKENS: {
        uint32_t n = rd16(pl);
        if (n > BT_TOKENS_MAX) return "too many token ids";
        if ((uint64_t)2 + 4u * (uint64_t)n > plen) return "TOKENS ids overrun payload";
        return NULL;
    }
    case BT_FRAME_FINISH:
        if (pl[0] > BT_FRAME_FINISH_MAX) return "bad FINISH reason";
        if ((pl[1] & ~BT_FINISH_F_USAGE_UNREPORTED) | pl[2] | pl[3]) return "FINISH padding not zero";
        return NULL;
    case BT_FRAME_WAITING: return pl[0] > BT_WAIT_PREEMPTED ? "bad WAITING reason" : NULL;
    case BT_FRAME_KVSTATE: {
        uint64_t total = rd64(pl), off = rd64(pl + 8);
        if (total > BT_KV_STATE_MAX || off > total || plen - BT_KV_HEADER > total - off)
            return "KVSTATE piece outside its state";
        return NULL;
    }
    default: return NULL;
    }
}

static bt_status fail(const char **err, bt_status st, const char *why) {
    if (err) *err = why;
    return st;
}

bt_status bt_frame_parse(const uint8_t *p, size_t n, uint32_t max_len, bt_frame *out, size_t *consumed,
                         const char **err) {
    if (!p || n < 4) return BT_ERR_AGAIN;
    uint32_t len = rd32(p);
    if (len > max_len) return fail(err, BT_ERR_TOO_LARGE, "frame length above the cap");
    if (len < 8) return fail(err, BT_ERR_PROTOCOL, "frame length below 8");
    if (n < BT_FRAME_HEADER) return BT_ERR_AGAIN;

    uint8_t type = p[4];
    if (rd16(p + 6) != 0) return fail(err, BT_ERR_PROTOCOL, "reserved header bytes not zero");
    uint32_t stream = rd32(p + 8);
    uint32_t plen = len - 8;
    const char *why = check_header(type, stream, plen);
    if (why) return fail(err, BT_ERR_PROTOCOL, why);

    if (n - 4 < len) return BT_ERR_AGAIN; /* n >= 12 here, no underflow; no 4 + len overflow */
    const uint8_t *pl = p + BT_FRAME_HEADER;
    why = check_payload(type, pl, plen);
    if (why) return fail(err, BT_ERR_PROTOCOL, why);

    out->type = type;
    out->flags = p[5];
    out->stream = stream;
    out->payload = pl;
    out->len = plen;
    *consumed = (size_t)len + 4;
    return BT_OK;
}

/* ---- encoders ----------------------------------------------------------------------------- */

/* Reserves a whole frame of payload size plen in out and writes its header. Returns a pointer
 * to the payload area (to be filled by the caller, then committed with end_frame), or NULL with
 * *st set. */
static uint8_t *begin_frame(bt_buf *out, uint8_t type, uint32_t stream, size_t plen, bt_status *st) {
    if (!out) {
        *st = BT_ERR_INVALID;
        return NULL;
    }
    if (plen > UINT32_MAX - 8u) {
        *st = BT_ERR_TOO_LARGE;
        return NULL;
    }
    if (check_header(type, stream, plen)) {
        *st = BT_ERR_INVALID;
        return NULL;
    }
    *st = bt_buf_reserve(out, BT_FRAME_HEADER + plen);
    if (*st != BT_OK) return NULL;
    uint8_t *h = (uint8_t *)out->data + out->len;
    wr32(h, (uint32_t)(plen + 8));
    h[4] = type;
    h[5] = 0;
    wr16(h + 6, 0);
    wr32(h + 8, stream);
    return h + BT_FRAME_HEADER;
}

static bt_status end_frame(bt_buf *out, size_t plen) {
    out->len += BT_FRAME_HEADER + plen;
    out->data[out->len] = '\0'; /* bt_buf keeps a terminator; reserve left room for it */
    return BT_OK;
}

bt_status bt_frame_put(bt_buf *out, uint8_t type, uint32_t stream, const void *payload, size_t len) {
    if (len && !payload) return BT_ERR_INVALID;
    bt_status st;
    uint8_t *pl = begin_frame(out, type, stream, len, &st);
    if (!pl) return st;
    if (len && check_payload(type, payload, (uint32_t)len)) return BT_ERR_INVALID;
    if (len) memcpy(pl, payload, len);
    return end_frame(out, len);
}

bt_status bt_frame_put_hello_flags(bt_buf *out, uint8_t flags, uint16_t role, uint64_t instance_id) {
    bt_status st;
    uint8_t *pl = begin_frame(out, BT_FRAME_HELLO, 0, HELLO_LEN, &st);
    if (!pl) return st;
    pl[5 - (int)BT_FRAME_HEADER] = flags; /* the header's flags byte */
    wr64(wr16(wr16(pl, BT_PROTO_VERSION), role), instance_id);
    return end_frame(out, HELLO_LEN);
}

bt_status bt_frame_put_hello(bt_buf *out, uint16_t role, uint64_t instance_id) {
    return bt_frame_put_hello_flags(out, 0, role, instance_id);
}

bt_status bt_frame_put_tokens(bt_buf *out, uint32_t stream, const uint32_t *ids, size_t n, const char *text,
                              size_t text_len) {
    if (n > BT_TOKENS_MAX || (n && !ids) || (text_len && !text)) return BT_ERR_INVALID;
    if (text_len > UINT32_MAX) return BT_ERR_TOO_LARGE;
    size_t plen = 2 + 4 * n + text_len;
    if (plen < text_len) return BT_ERR_TOO_LARGE; /* wrapped */
    bt_status st;
    uint8_t *pl = begin_frame(out, BT_FRAME_TOKENS, stream, plen, &st);
    if (!pl) return st;
    uint8_t *w = wr16(pl, (uint16_t)n);
    for (size_t i = 0; i < n; i++) w = wr32(w, ids[i]);
    if (text_len) memcpy(w, text, text_len);
    return end_frame(out, plen);
}

bt_status bt_frame_put_finish(bt_buf *out, uint32_t stream, uint8_t reason, uint32_t prompt_tokens,
                              uint32_t completion_tokens) {
    return bt_frame_put_finish_flags(out, stream, reason, 0, prompt_tokens, completion_tokens);
}

bt_status bt_frame_put_finish_flags(bt_buf *out, uint32_t stream, uint8_t reason, uint8_t flags,
                                    uint32_t prompt_tokens, uint32_t completion_tokens) {
    if (reason > BT_FRAME_FINISH_MAX || (flags & ~BT_FINISH_F_USAGE_UNREPORTED)) return BT_ERR_INVALID;
    bt_status st;
    uint8_t *pl = begin_frame(out, BT_FRAME_FINISH, stream, FINISH_LEN, &st);
    if (!pl) return st;
    pl[0] = reason;
    pl[1] = flags;
    pl[2] = pl[3] = 0;
    wr32(wr32(pl + 4, prompt_tokens), completion_tokens);
    return end_frame(out, FINISH_LEN);
}

/* ERROR and GOAWAY share one layout: u16 code, then the message bytes. */
static bt_status put_code_msg(bt_buf *out, uint8_t type, uint32_t stream, uint16_t code, const char *msg) {
    size_t ml = msg ? strlen(msg) : 0;
    if (ml > UINT32_MAX) return BT_ERR_TOO_LARGE;
    bt_status st;
    uint8_t *pl = begin_frame(out, type, stream, 2 + ml, &st);
    if (!pl) return st;
    uint8_t *w = wr16(pl, code);
    if (ml) memcpy(w, msg, ml);
    return end_frame(out, 2 + ml);
}

bt_status bt_frame_put_error(bt_buf *out, uint32_t stream, uint16_t code, const char *msg) {
    return put_code_msg(out, BT_FRAME_ERROR, stream, code, msg);
}

bt_status bt_frame_put_goaway(bt_buf *out, uint16_t code, const char *reason) {
    return put_code_msg(out, BT_FRAME_GOAWAY, 0, code, reason);
}

bt_status bt_frame_put_ping(bt_buf *out, uint8_t type, uint64_t opaque) {
    if (type != BT_FRAME_PING && type != BT_FRAME_PONG) return BT_ERR_INVALID;
    bt_status st;
    uint8_t *pl = begin_frame(out, type, 0, PING_LEN, &st);
    if (!pl) return st;
    wr64(pl, opaque);
    return end_frame(out, PING_LEN);
}

bt_status bt_frame_put_load(bt_buf *out, const bt_load_report *r) {
    if (!r) return BT_ERR_INVALID;
    bt_status st;
    uint8_t *pl = begin_frame(out, BT_FRAME_LOAD, 0, LOAD_LEN, &st);
    if (!pl) return st;
    uint8_t *w = pl;
    w = wr64(w, r->active_decode_blocks);
    w = wr64(w, r->total_blocks);
    w = wr64(w, r->active_prefill_tokens);
    w = wr64(w, r->waiting);
    w = wr64(w, r->running);
    w = wr64(w, r->max_num_batched_tokens);
    wr32(w, r->flags);
    return end_frame(out, LOAD_LEN);
}

/* ---- payload decoders --------------------------------------------------------------------- */

/* The decoders re-check type and size themselves, so a hand-built bt_frame cannot make them
 * read out of bounds: a wrong type is the caller's bug (BT_ERR_INVALID), a wrong size a
 * malformed frame (BT_ERR_PROTOCOL). */
static bt_status expect(const bt_frame *f, uint8_t type, uint32_t want_len) {
    if (!f || f->type != type || (f->len && !f->payload)) return BT_ERR_INVALID;
    return f->len == want_len ? BT_OK : BT_ERR_PROTOCOL;
}

bt_status bt_frame_get_hello(const bt_frame *f, uint16_t *version, uint16_t *role, uint64_t *instance_id) {
    bt_status st = expect(f, BT_FRAME_HELLO, HELLO_LEN);
    if (st != BT_OK) return st;
    if (version) *version = rd16(f->payload);
    if (role) *role = rd16(f->payload + 2);
    if (instance_id) *instance_id = rd64(f->payload + 4);
    return BT_OK;
}

bt_status bt_frame_get_tokens(const bt_frame *f, uint32_t *ids, size_t cap, size_t *n, const char **text,
                              size_t *text_len) {
    if (!f || f->type != BT_FRAME_TOKENS || (f->len && !f->payload)) return BT_ERR_INVALID;
    if (f->len < 2) return BT_ERR_PROTOCOL;
    size_t cnt = rd16(f->payload);
    if (cnt > BT_TOKENS_MAX || 2 + 4 * cnt > f->len || cnt > cap || (cnt && !ids)) return BT_ERR_PROTOCOL;
    const uint8_t *r = f->payload + 2;
    for (size_t i = 0; i < cnt; i++, r += 4) ids[i] = rd32(r);
    if (n) *n = cnt;
    if (text) *text = (const char *)r;
    if (text_len) *text_len = f->len - 2 - 4 * cnt;
    return BT_OK;
}

bt_status bt_frame_get_finish(const bt_frame *f, uint8_t *reason, uint32_t *prompt_tokens,
                              uint32_t *completion_tokens) {
    bt_status st = expect(f, BT_FRAME_FINISH, FINISH_LEN);
    if (st != BT_OK) return st;
    if (f->payload[0] > BT_FRAME_FINISH_MAX) return BT_ERR_PROTOCOL;
    if (reason) *reason = f->payload[0];
    if (prompt_tokens) *prompt_tokens = rd32(f->payload + 4);
    if (completion_tokens) *completion_tokens = rd32(f->payload + 8);
    return BT_OK;
}

bt_status bt_frame_get_finish_flags(const bt_frame *f, uint8_t *flags) {
    bt_status st = expect(f, BT_FRAME_FINISH, FINISH_LEN);
    if (st != BT_OK) return st;
    if (flags) *flags = f->payload[1];
    return BT_OK;
}

bt_status bt_frame_get_error(const bt_frame *f, uint16_t *code, const char **msg, size_t *msg_len) {
    if (!f || (f->type != BT_FRAME_ERROR && f->type != BT_FRAME_GOAWAY) || (f->len && !f->payload))
        return BT_ERR_INVALID;
    if (f->len < 2) return BT_ERR_PROTOCOL;
    if (code) *code = rd16(f->payload);
    if (msg) *msg = (const char *)f->payload + 2;
    if (msg_len) *msg_len = f->len - 2;
    return BT_OK;
}

bt_status bt_frame_get_ping(const bt_frame *f, uint64_t *opaque) {
    if (!f || (f->type != BT_FRAME_PING && f->type != BT_FRAME_PONG) || (f->len && !f->payload))
        return BT_ERR_INVALID;
    if (f->len != PING_LEN) return BT_ERR_PROTOCOL;
    if (opaque) *opaque = rd64(f->payload);
    return BT_OK;
}

void bt_load_set_preempt(bt_load_report *r, uint64_t victims, int64_t victim_priority) {
    r->flags &= BT_LOAD_READY; /* bits 1-31 are the preemption fields: re-written below */
    if (!victims) return;
    if (victims > BT_LOAD_VICTIMS_MAX) victims = BT_LOAD_VICTIMS_MAX;
    if (victim_priority > BT_LOAD_VICTIM_PRIO_MAX) victim_priority = BT_LOAD_VICTIM_PRIO_MAX;
    if (victim_priority < -BT_LOAD_VICTIM_PRIO_MAX) victim_priority = -BT_LOAD_VICTIM_PRIO_MAX;
    uint32_t p24 = (uint32_t)victim_priority & 0xFFFFFFu;
    r->flags |= BT_LOAD_PREEMPT | ((uint32_t)victims << 2) | (p24 << 8);
}

bool bt_load_get_preempt(const bt_load_report *r, uint32_t *victims, int32_t *victim_priority) {
    uint32_t n = (r->flags >> 2) & BT_LOAD_VICTIMS_MAX;
    bool on = (r->flags & BT_LOAD_PREEMPT) && n > 0;
    uint32_t p24 = (r->flags >> 8) & 0xFFFFFFu;
    int32_t prio = p24 & 0x800000u ? (int32_t)p24 - (1 << 24) : (int32_t)p24; /* sign-extend 24 bits */
    if (victims) *victims = on ? n : 0;
    if (victim_priority) *victim_priority = on ? prio : 0;
    return on;
}

bt_status bt_frame_get_load(const bt_frame *f, bt_load_report *r) {
    bt_status st = expect(f, BT_FRAME_LOAD, LOAD_LEN);
    if (st != BT_OK) return st;
    if (!r) return BT_OK;
    const uint8_t *p = f->payload;
    r->active_decode_blocks = rd64(p);
    r->total_blocks = rd64(p + 8);
    r->active_prefill_tokens = rd64(p + 16);
    r->waiting = rd64(p + 24);
    r->running = rd64(p + 32);
    r->max_num_batched_tokens = rd64(p + 40);
    r->flags = rd32(p + 48);
    return BT_OK;
}

bt_status bt_frame_put_auth(bt_buf *out, uint8_t kind, const uint8_t bytes[BT_AUTH_LEN]) {
    if (kind != BT_AUTH_CHALLENGE && kind != BT_AUTH_RESPONSE) return BT_ERR_INVALID;
    uint8_t p[AUTH_PAYLOAD_LEN];
    p[0] = kind;
    memcpy(p + 1, bytes, BT_AUTH_LEN);
    return bt_frame_put(out, BT_FRAME_AUTH, 0, p, sizeof p);
}

bt_status bt_frame_get_auth(const bt_frame *f, uint8_t *kind, const uint8_t **bytes) {
    if (!f || f->type != BT_FRAME_AUTH) return BT_ERR_INVALID;
    if (f->len != AUTH_PAYLOAD_LEN || !f->payload) return BT_ERR_PROTOCOL;
    if (f->payload[0] != BT_AUTH_CHALLENGE && f->payload[0] != BT_AUTH_RESPONSE) return BT_ERR_PROTOCOL;
    *kind = f->payload[0];
    *bytes = f->payload + 1;
    return BT_OK;
}

const char *bt_frame_type_name(uint8_t type) {
    static const char *const names[] = {NULL,   "HELLO", "REQUEST", "TOKENS", "FINISH", "ERROR",
                                        "STOP", "KILL",  "PING",    "PONG",   "LOAD",   "GOAWAY",
                                        "AUTH", "KVSTATE", "WAITING"};
    if (type >= 1 && type <= BT_FRAME_TYPE_MAX_) return names[type];
    return "UNKNOWN";
}

bt_status bt_frame_put_kvstate(bt_buf *out, uint32_t stream, uint64_t total, uint64_t offset, const void *data,
                               size_t len) {
    if (stream == 0 || len > BT_KV_PIECE_MAX || total > BT_KV_STATE_MAX || offset > total || len > total - offset ||
        (len && !data))
        return BT_ERR_INVALID;
    bt_status st;
    uint8_t *pl = begin_frame(out, BT_FRAME_KVSTATE, stream, BT_KV_HEADER + len, &st);
    if (!pl) return st;
    uint8_t *w = wr64(wr64(pl, total), offset);
    if (len) memcpy(w, data, len);
    return end_frame(out, BT_KV_HEADER + len);
}

bt_status bt_frame_get_kvstate(const bt_frame *f, uint64_t *total, uint64_t *offset, const uint8_t **data,
                               size_t *len) {
    if (!f || f->type != BT_FRAME_KVSTATE) return BT_ERR_INVALID;
    if (f->len < BT_KV_HEADER || f->len > BT_KV_HEADER + BT_KV_PIECE_MAX || !f->payload) return BT_ERR_PROTOCOL;
    uint64_t t = rd64(f->payload), o = rd64(f->payload + 8);
    size_t n = f->len - BT_KV_HEADER;
    if (t > BT_KV_STATE_MAX || o > t || n > t - o) return BT_ERR_PROTOCOL;
    if (total) *total = t;
    if (offset) *offset = o;
    if (data) *data = f->payload + BT_KV_HEADER;
    if (len) *len = n;
    return BT_OK;
}

bt_status bt_frame_put_waiting(bt_buf *out, uint32_t stream, uint8_t reason) {
    if (reason > BT_WAIT_PREEMPTED) return BT_ERR_INVALID;
    return bt_frame_put(out, BT_FRAME_WAITING, stream, &reason, WAITING_LEN);
}

bt_status bt_frame_get_waiting(const bt_frame *f, uint8_t *reason) {
    bt_status st = expect(f, BT_FRAME_WAITING, WAITING_LEN);
    if (st != BT_OK) return st;
    if (f->payload[0] > BT_WAIT_PREEMPTED) return BT_ERR_PROTOCOL;
    if (reason) *reason = f->payload[0];
    return BT_OK;
}
