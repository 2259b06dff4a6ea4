/* status.h — the one status type of baton.
 *
 * Every fallible function returns a bt_status. The table below is the only place where codes,
 * names and messages are defined; the request plane carries the numeric code on the wire (ERROR
 * frames), so values are stable: append, never renumber. `migratable` says whether the frontend
 * may retry a stream that failed with this code on another worker. */
#ifndef BATON_STATUS_H
#define BATON_STATUS_H

#include <stdbool.h>
#include <stddef.h>

/*   name                 code  migratable  message */
#define BT_STATUS_TABLE(X)                                                             \
    X(BT_OK,                 0, false, "ok")                                           \
    X(BT_ERR_INVALID,        1, false, "invalid argument")                             \
    X(BT_ERR_NOMEM,          2, false, "out of memory")                                \
    X(BT_ERR_IO,             3, false, "i/o error")                                    \
    X(BT_ERR_PROTOCOL,       4, true,  "protocol error")                               \
    X(BT_ERR_TOO_LARGE,      5, false, "too large")                                    \
    X(BT_ERR_NOT_FOUND,      6, false, "not found")                                    \
    X(BT_ERR_CANNOT_CONNECT, 7, true,  "cannot connect")                               \
    X(BT_ERR_DISCONNECTED,   8, true,  "stream ended before generation completed")    \
    X(BT_ERR_TIMEOUT,        9, true,  "timed out")                                    \
    X(BT_ERR_CANCELLED,     10, false, "cancelled")                                    \
    X(BT_ERR_OVERLOADED,    11, false, "all workers are busy, please retry later")     \
    X(BT_ERR_SHUTDOWN,      12, true,  "engine shutting down")                         \
    X(BT_ERR_ENGINE,        13, false, "engine error")                                 \
    X(BT_ERR_NO_WORKER,     14, false, "no worker available")                          \
    X(BT_ERR_DRAINING,      15, true,  "worker is draining")                           \
    X(BT_ERR_AGAIN,         16, false, "try again")                                    \
    X(BT_ERR_UNAUTHORIZED,  17, false, "unauthorized")                                 \
    X(BT_ERR_INTERNAL,      18, false, "internal error")                              \
    X(BT_ERR_CONTEXT_LENGTH, 19, false, "prompt + max_tokens exceed the model's context length") \
    X(BT_ERR_MOVED,         20, true,  "stream moved to another worker")                   \
    X(BT_ERR_INVALID_PROMPT, 21, false, "the prompt is not valid for this model") \
    X(BT_ERR_INVALID_LOGIT_BIAS, 22, false, "the logit_bias is not valid for this model") \
    X(BT_ERR_UPSTREAM_BUSY, 23, true, "the upstream is busy, please retry later")         \
    X(BT_ERR_UPSTREAM_RATE_LIMITED, 24, true, "the upstream is rate limiting, please retry later") \
    X(BT_ERR_UNSUPPORTED_PARAM, 25, false, "a request field asks for output this engine cannot give") \
    X(BT_ERR_INVALID_PARAM, 26, false, "a request field is not valid")                   \
    X(BT_ERR_UPSTREAM_TIMEOUT, 27, false, "the upstream did not begin its answer in time")

typedef enum {
#define BT_X(name, code, mig, msg) name = code,
    BT_STATUS_TABLE(BT_X)
#undef BT_X
    BT_STATUS_COUNT_
} bt_status;

/* Symbolic name ("BT_ERR_TIMEOUT") and human message of a status; unknown codes give "unknown". */
const char *bt_status_name(int code);
const char *bt_status_msg(int code);
/* True when a stream that failed with this status may be continued on another worker. */
bool bt_status_migratable(int code);
/* Whether an engine refused the client's request itself (its prompt over the context, or a token id
 * outside the vocabulary in the prompt or logit_bias, a field it cannot honour or that is malformed,
 * engine/params.h): the client's 400, which the frontend cannot
 * check without the model, so not worth a warning per request in either process (docs/security.md). */
bool bt_status_client_input(int code);
/* Whether an engine's upstream refused the sequence as busy (HTTP 503 or 504) or rate limited
 * (429) before it began: the attempt may be retried on another worker, but the worker is not at
 * fault and is not quarantined (docs/engines.md §2.4). The message of such an error may begin with
 * "retry after N s: ", the upstream's Retry-After in whole seconds (docs/protocol.md §12). */
bool bt_status_upstream_busy(int code);
/* The N of a message that begins "retry after N s: " (N from 1 to 86400), else 0. */
int bt_status_retry_after(const char *msg, size_t len);

#endif
