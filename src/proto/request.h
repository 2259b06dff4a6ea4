/* request.h — the codec of the REQUEST frame's payload: one attempt of one client request, sent
 * by the frontend (src/frontend/migrate.c) and read by the worker (src/worker/worker.c).
 *
 * The payload is a JSON object (docs/protocol.md §6):
 *   request_id    string, 1..BT_REQUEST_ID_MAX bytes: the client-visible request id
 *   api           "chat" or "completion"
 *   body          object: the client's OpenAI request body, as received
 *   carried       array of token ids in [0, 2^32) (optional, default []): tokens already
 *                 delivered to the client by earlier attempts, which this one continues after
 *   max_tokens    integer >= 0 (optional): new tokens still allowed; absent = the engine's default
 *   carried_text  string (optional): the text delivered with the carried tokens, for engines that
 *                 continue from text; absent when the frontend has not kept it
 *   seed          integer in [1, 2^63) (optional): the sampling seed the frontend chose for a request
 *                 whose body has none, the same for every attempt (an engine that samples for real
 *                 continues a migrated stream exactly only with it); absent: the body's seed, if any
 *   priority      integer in [-BT_PRIORITY_LIMIT, BT_PRIORITY_LIMIT] (optional, default 0): the
 *                 request's scheduling priority as the frontend settled it (the client's ask,
 *                 bounded by its key's ceiling); lower is served sooner, as in vLLM
 *   stream_key    string of 32 lower-case hex digits (optional): the stream's journal id. A
 *                 worker given one may keep the stream running as an orphan when this frontend's
 *                 connection ends (--orphan-grace), so that another frontend can re-attach to it
 *   adopt         boolean (optional, default false; needs stream_key): re-attach to the orphan of
 *                 stream_key if the worker holds one, replaying what it produced after
 *                 len(carried) tokens; if it holds none, the payload is an ordinary continuation
 *   kv_state_bytes integer in [1, 2^32] (optional): the KVSTATE frames sent on this stream just
 *                 before this REQUEST carry an exported KV state of that many bytes, which the
 *                 worker may import instead of prefilling (docs/protocol.md, "KV hand-off")
 *   exactness     string, 1..BT_EXACTNESS_MAX bytes, no NUL (optional): the exactness fingerprint
 *                 of the worker that produced the carried tokens (its engine's numerics: for the
 *                 llama engine the CPU backend variant, threads, ubatch and model identity; see
 *                 docs/engines.md). A worker whose own fingerprint differs refuses to continue
 *                 the carried tokens (BT_ERR_NO_WORKER); absent or empty: no constraint
 * Unknown members are ignored, so that a newer frontend can add some. No I/O: unit-tested
 * (tests/unit/test_request.c) and fuzzed (fuzz/fuzz_request.c; fuzz/fuzz_request_direct.c holds
 * the payload written directly for a serialized body to the jansson path's bytes). */
#ifndef BATON_PROTO_REQUEST_H
#define BATON_PROTO_REQUEST_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "engine/engine.h"

#define BT_REQUEST_ID_MAX 128
/* The range of a priority, on the wire and from a client (body `priority` or X-Priority). */
#define BT_PRIORITY_LIMIT 1000000
#define BT_STREAM_KEY_LEN 32 /* the journal's stream id: 128 bits in lower-case hex */
#define BT_EXACTNESS_MAX 255 /* bytes in an exactness fingerprint */

typedef struct {
    const char *request_id;
    bt_api api;
    const json_t *body;
    /* body already serialized (body_json_len bytes of JSON text, e.g. the frontend's canonical
     * form, made once per request): sent as it is instead of serializing body again; NULL: body */
    const char *body_json;
    size_t body_json_len;
    const uint32_t *carried;
    size_t n_carried;
    bool has_max_tokens;
    int64_t max_tokens;
    const char *carried_text; /* NULL: none */
    size_t carried_text_len;
    uint64_t seed; /* 0: none */
    int32_t priority; /* 0 is not sent (the default) */
    const char *stream_key; /* NULL: none (the stream cannot be orphaned); else BT_STREAM_KEY_LEN hex */
    bool adopt;             /* re-attach to the orphan of stream_key, if any */
    uint64_t kv_state_bytes; /* 0: no KV state precedes the REQUEST */
    const char *exactness;  /* NULL or "": no constraint; else the carried tokens' fingerprint */
} bt_request;

/* Encodes rq as a payload: a malloc'd string (free with free()) of *len bytes, NUL-terminated;
 * NULL when out of memory. rq is not checked: the encoder's caller builds it from checked data. */
char *bt_request_encode(const bt_request *rq, size_t *len);

/* A decoded payload: rq's pointers point into the message, which owns them. */
typedef struct {
    bt_request rq;
    json_t *root;
    uint32_t *carried;
} bt_request_msg;

/* Decodes and checks a payload (NUL bytes are allowed inside strings: a prompt may hold one). On success fills *out (release it with bt_request_msg_free);
 * otherwise BT_ERR_INVALID (or BT_ERR_NOMEM) with a one-line reason in err, and *out holds
 * nothing to release. */
bt_status bt_request_decode(const void *payload, size_t len, bt_request_msg *out, char *err, size_t errlen);
void bt_request_msg_free(bt_request_msg *m);

#endif
