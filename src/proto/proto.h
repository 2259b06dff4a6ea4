/* proto.h — the request-plane frame codec (no I/O).
 *
 * One persistent TCP connection per frontend–worker pair carries many streams. Every frame is
 *
 *     u32 length | u8 type | u8 flags | u16 reserved | u32 stream_id | payload
 *
 * all integers big-endian; `length` counts every byte after itself (so length = 8 + payload
 * size). stream_id 0 is the connection itself. docs/protocol.md is the full specification.
 *
 * Decoding is bounds-checked and never trusts a length: a frame longer than the decoder's cap,
 * a length below 8, an unknown type or a payload of the wrong size is BT_ERR_PROTOCOL (or
 * BT_ERR_TOO_LARGE), after which the caller closes the connection. */
#ifndef BATON_PROTO_H
#define BATON_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "common/util.h"

#define BT_PROTO_VERSION 1
#define BT_FRAME_HEADER 12u                     /* bytes before the payload */
#define BT_FRAME_DEFAULT_MAX (16u * 1024 * 1024) /* default cap on `length` */
#define BT_TOKENS_MAX 4096u                     /* max token ids in one TOKENS frame */

typedef enum {
    BT_FRAME_HELLO = 1,    /* both ways, stream 0: u16 version, u16 role, u64 instance_id */
    BT_FRAME_REQUEST = 2,  /* FE→W: JSON request (see docs/protocol.md) */
    BT_FRAME_TOKENS = 3,   /* W→FE: u16 n, n × u32 token id, then UTF-8 text (rest of payload) */
    BT_FRAME_FINISH = 4,   /* W→FE: u8 reason, u8[3] zero, u32 prompt_tokens, u32 completion_tokens */
    BT_FRAME_ERROR = 5,    /* W→FE: u16 status code, then UTF-8 message (rest); stream 0 = connection */
    BT_FRAME_STOP = 6,     /* FE→W: empty; finish gracefully */
    BT_FRAME_KILL = 7,     /* FE→W: empty; drop at once */
    BT_FRAME_PING = 8,     /* both ways, stream 0: u64 opaque */
    BT_FRAME_PONG = 9,     /* answer to PING, stream 0: the same u64 */
    BT_FRAME_LOAD = 10,    /* W→FE, stream 0: see bt_load_report */
    BT_FRAME_GOAWAY = 11,  /* W→FE, stream 0: u16 status code, then UTF-8 reason; route nothing new */
    BT_FRAME_AUTH = 12,    /* both ways, stream 0: u8 kind (1 challenge, 2 response), 32 bytes */
    BT_FRAME_KVSTATE = 13, /* both ways, stream != 0: u64 total, u64 offset, bytes: one piece of a KV state */
    BT_FRAME_WAITING = 14, /* W→FE, stream != 0: u8 reason (BT_WAIT_*); the engine keeps the stream waiting */
    BT_FRAME_TYPE_MAX_ = 14
} bt_frame_type;

typedef enum { BT_ROLE_FRONTEND = 1, BT_ROLE_WORKER = 2 } bt_role;

/* HELLO flags (the frame header's flags byte of a HELLO; a receiver ignores bits it does not know,
 * so a peer without them is simply one that lacks the capability) */
#define BT_HELLO_KVSTATE 0x1u /* the sender understands KVSTATE frames (the KV hand-off) */
/* A frontend: it understands WAITING frames. A worker: its engine reports every wait of a stream
 * with a WAITING frame (to a frontend that announced the flag), so a silent stream that had none
 * is not waiting in its engine (docs/protocol.md, WAITING). */
#define BT_HELLO_WAITING 0x2u
/* A frontend: it understands BT_ERR_UPSTREAM_BUSY and BT_ERR_UPSTREAM_RATE_LIMITED (an upstream's
 * refusal, retried elsewhere without quarantining the worker). A worker sends an older frontend
 * BT_ERR_CANNOT_CONNECT instead, which that frontend retries as before (docs/protocol.md §12). */
#define BT_HELLO_UPSTREAM_BUSY 0x4u
/* A frontend: it understands FINISH reasons 3-5 (content_filter, tool_calls, function_call, an
 * upstream's own) and FINISH flags. A worker sends an older frontend, which rejects both, reason 0
 * (stop) and no flags. */
#define BT_HELLO_FINISH_REASONS 0x8u
#define BT_FRAME_FINISH_MAX 5 /* the highest FINISH reason (bt_finish_reason) */
/* FINISH flags (payload byte 1, sent only to a frontend with BT_HELLO_FINISH_REASONS, 0 to any
 * other): the usage counts are not the model server's (an upstream reported none) */
#define BT_FINISH_F_USAGE_UNREPORTED 0x1u

/* LOAD flags */
#define BT_LOAD_READY 0x1u /* the worker's endpoint is ready (canary passing, not draining) */
/* The worker's engine preempts by priority and a strictly more urgent arrival would find a victim
 * now: bits 2-7 of the flags then carry how many (1-63, saturated) and bits 8-31 the priority of
 * those victims (the least urgent running priority), as a 24-bit two's complement integer.
 * Packed into the flags so that a LOAD stays 52 bytes (docs/protocol.md §4: a receiver of an
 * older build ignores flag bits it does not know). Read and written with bt_load_*_preempt. */
#define BT_LOAD_PREEMPT 0x2u
#define BT_LOAD_VICTIMS_MAX 63u
#define BT_LOAD_VICTIM_PRIO_MAX ((1 << 23) - 1)

typedef struct {
    uint8_t type;
    uint8_t flags;
    uint32_t stream;
    const uint8_t *payload; /* points into the decoded buffer */
    uint32_t len;           /* payload size */
} bt_frame;

typedef struct {
    uint64_t active_decode_blocks;
    uint64_t total_blocks;
    uint64_t active_prefill_tokens;
    uint64_t waiting;
    uint64_t running;
    uint64_t max_num_batched_tokens;
    uint32_t flags; /* BT_LOAD_* */
} bt_load_report;     /* payload: 6 × u64, u32 flags = 52 bytes */

/* Sets (victims > 0) or clears (victims == 0) BT_LOAD_PREEMPT and its fields in r->flags, keeping
 * BT_LOAD_READY; victims saturates at BT_LOAD_VICTIMS_MAX, the priority is clamped to
 * ±BT_LOAD_VICTIM_PRIO_MAX (request priorities are within ±BT_PRIORITY_LIMIT, well inside). */
void bt_load_set_preempt(bt_load_report *r, uint64_t victims, int64_t victim_priority);
/* True when r carries BT_LOAD_PREEMPT with at least one victim: *victims and *victim_priority
 * (either may be NULL) get them. False (both 0) otherwise. */
bool bt_load_get_preempt(const bt_load_report *r, uint32_t *victims, int32_t *victim_priority);

/* Parses one frame at the start of p[0..n). BT_OK: *out describes it and *consumed is its whole
 * size. BT_ERR_AGAIN: more bytes are needed (nothing consumed). BT_ERR_TOO_LARGE: length above
 * max_len. BT_ERR_PROTOCOL: anything malformed (err gets a short reason if non-NULL). Payload
 * sizes of fixed-size types are checked here. */
bt_status bt_frame_parse(const uint8_t *p, size_t n, uint32_t max_len, bt_frame *out, size_t *consumed,
                         const char **err);

/* Encoders append one complete frame to out (BT_ERR_TOO_LARGE if out's cap is hit; out is then
 * unchanged). They return BT_ERR_INVALID instead of writing a frame bt_frame_parse would reject
 * (unknown type, wrong stream for the type, wrong fixed payload size, more than BT_TOKENS_MAX
 * ids, FINISH reason above 2). Flags are written as 0. */
bt_status bt_frame_put(bt_buf *out, uint8_t type, uint32_t stream, const void *payload, size_t len);
bt_status bt_frame_put_hello(bt_buf *out, uint16_t role, uint64_t instance_id);
/* HELLO with header flags (BT_HELLO_*). */
bt_status bt_frame_put_hello_flags(bt_buf *out, uint8_t flags, uint16_t role, uint64_t instance_id);
bt_status bt_frame_put_tokens(bt_buf *out, uint32_t stream, const uint32_t *ids, size_t n, const char *text,
                              size_t text_len);
bt_status bt_frame_put_finish(bt_buf *out, uint32_t stream, uint8_t reason, uint32_t prompt_tokens,
                              uint32_t completion_tokens);
/* FINISH with flags (BT_FINISH_F_*): to a frontend that announced BT_HELLO_FINISH_REASONS only. */
bt_status bt_frame_put_finish_flags(bt_buf *out, uint32_t stream, uint8_t reason, uint8_t flags,
                                    uint32_t prompt_tokens, uint32_t completion_tokens);
bt_status bt_frame_put_error(bt_buf *out, uint32_t stream, uint16_t code, const char *msg);
bt_status bt_frame_put_ping(bt_buf *out, uint8_t type /* PING or PONG */, uint64_t opaque);
bt_status bt_frame_put_load(bt_buf *out, const bt_load_report *r);
bt_status bt_frame_put_goaway(bt_buf *out, uint16_t code, const char *reason);

/* Payload decoders for a frame returned by bt_frame_parse (type already checked by caller). They
 * re-check type (BT_ERR_INVALID if wrong) and size (BT_ERR_PROTOCOL), so they are safe on any
 * bt_frame. Output pointers may be NULL. Text and messages point into the payload and are not
 * NUL-terminated. bt_frame_get_error also decodes GOAWAY (same layout). */
bt_status bt_frame_get_hello(const bt_frame *f, uint16_t *version, uint16_t *role, uint64_t *instance_id);
/* ids: up to cap ids are copied; *n gets the count (BT_ERR_PROTOCOL if it exceeds cap or the payload). */
bt_status bt_frame_get_tokens(const bt_frame *f, uint32_t *ids, size_t cap, size_t *n, const char **text,
                              size_t *text_len);
bt_status bt_frame_get_finish(const bt_frame *f, uint8_t *reason, uint32_t *prompt_tokens,
                              uint32_t *completion_tokens);
/* FINISH's flags byte (BT_FINISH_F_*); 0 from a worker of an older build. */
bt_status bt_frame_get_finish_flags(const bt_frame *f, uint8_t *flags);
bt_status bt_frame_get_error(const bt_frame *f, uint16_t *code, const char **msg, size_t *msg_len);
bt_status bt_frame_get_ping(const bt_frame *f, uint64_t *opaque);
bt_status bt_frame_get_load(const bt_frame *f, bt_load_report *r);

/* AUTH: a challenge carries a random nonce, a response the HMAC-SHA256 that proves the secret. */
#define BT_AUTH_CHALLENGE 1
#define BT_AUTH_RESPONSE 2
#define BT_AUTH_LEN 32u
bt_status bt_frame_put_auth(bt_buf *out, uint8_t kind, const uint8_t bytes[BT_AUTH_LEN]);
bt_status bt_frame_get_auth(const bt_frame *f, uint8_t *kind, const uint8_t **bytes);

/* KVSTATE: one piece of a sequence's exported KV state (docs/protocol.md, "KV hand-off"). A piece
 * holds at most BT_KV_PIECE_MAX bytes, so that a token frame queued behind it waits for at most that
 * much; a whole state at most BT_KV_STATE_MAX. The codec checks offset + piece <= total <= the cap. */
#define BT_KV_PIECE_MAX (256u * 1024)
#define BT_KV_STATE_MAX ((uint64_t)1 << 32)
#define BT_KV_HEADER 16u /* u64 total, u64 offset */
/* Pacing, both directions: a sender writes another piece only while fewer than BT_KV_WATERMARK
 * bytes wait unsent on the connection (so any other frame waits behind at most that much); states
 * take turns piece by piece. A frontend relays at most BT_KV_INFLIGHT states to one worker
 * connection at a time, and a worker keeps that many part-received states per connection. */
#define BT_KV_WATERMARK (512u * 1024)
#define BT_KV_INFLIGHT 4u
/* The largest state a frontend relays and a worker accepts: Llama-2-7B's whole 4,096-token context
 * (4,096 x 512 KiB = 2 GiB) plus the state's header and token ids (docs/protocol.md, KV hand-off). */
#define BT_KV_RELAY_MAX (((uint64_t)2 << 30) + ((uint64_t)16 << 20))
bt_status bt_frame_put_kvstate(bt_buf *out, uint32_t stream, uint64_t total, uint64_t offset, const void *data,
                               size_t len);
bt_status bt_frame_get_kvstate(const bt_frame *f, uint64_t *total, uint64_t *offset, const uint8_t **data,
                               size_t *len);

/* WAITING: the worker's engine holds the stream without computing it, until the stream's next
 * TOKENS (or its FINISH or ERROR). The reason is informative; the frontend treats both alike. */
#define BT_WAIT_QUEUED 0    /* not admitted yet: no sequence slot or KV blocks free */
#define BT_WAIT_PREEMPTED 1 /* preempted (its KV dropped) for a more urgent sequence or a full KV cache; to be recomputed */
bt_status bt_frame_put_waiting(bt_buf *out, uint32_t stream, uint8_t reason);
bt_status bt_frame_get_waiting(const bt_frame *f, uint8_t *reason);

const char *bt_frame_type_name(uint8_t type);

#endif
