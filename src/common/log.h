/* log.h — one line per event, to stderr.
 *
 * Human-readable by default ("2026-11-26T10:00:00.123Z INFO  worker: message"); JSON lines when
 * DYN_LOGGING_JSONL is 1/true. The level comes from DYN_LOG (error, warn, info, debug, trace;
 * default info). Messages are printf-style; the component is a short fixed word. */
#ifndef BATON_LOG_H
#define BATON_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum { BT_LOG_ERROR = 0, BT_LOG_WARN, BT_LOG_INFO, BT_LOG_DEBUG, BT_LOG_TRACE } bt_log_level;

/* Reads DYN_LOG and DYN_LOGGING_JSONL; `component` names the process role ("frontend"). A value
 * that names no level, or is neither on nor off, is said once per process on stderr. */
void bt_log_init(const char *component);
/* The launcher of this process (`baton run`, whose children inherit its environment) has said
 * already what is wrong with DYN_LOG and DYN_LOGGING_JSONL: bt_log_init reads them as before but
 * says nothing, so that a group of processes says it once. Call before bt_log_init. */
void bt_log_env_reported(void);
/* Prints the settings above for --help: a heading and one row per variable, in the layout of
 * bt_opts_usage without its environment column ("  NAME  meaning [default: value]"). */
void bt_log_usage(void);
bool bt_log_enabled(bt_log_level lvl);
/* The wall clock now, as every line shows it: "2026-11-26T10:00:00.123Z" (UTC, milliseconds).
 * `cap` of at least 25 bytes; returns the length written. */
size_t bt_log_time(char *out, size_t cap);
void bt_log(bt_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define BT_ERROR(...) bt_log(BT_LOG_ERROR, __VA_ARGS__)
#define BT_WARN(...)  bt_log(BT_LOG_WARN, __VA_ARGS__)
#define BT_INFO(...)  bt_log(BT_LOG_INFO, __VA_ARGS__)
#define BT_DEBUG(...) do { if (bt_log_enabled(BT_LOG_DEBUG)) bt_log(BT_LOG_DEBUG, __VA_ARGS__); } while (0)
#define BT_TRACE(...) do { if (bt_log_enabled(BT_LOG_TRACE)) bt_log(BT_LOG_TRACE, __VA_ARGS__); } while (0)

/* A bound on how often one kind of line is written: at most `burst` in a second; past that the
 * lines are counted instead, and the next one written says how many were not. For lines a client
 * or a signal sender can provoke at will (the counters in /metrics still count every event).
 * Zero-initialized; one per call site (and per thread where several threads share the site). */
typedef struct {
    uint64_t window_ms; /* start of the current second */
    unsigned n;         /* lines written in it */
    unsigned unsaid;    /* lines held back since the last one written */
} bt_log_limit;

/* True when a line may be written at now_ms (a millisecond clock); *unsaid is then the number held
 * back before it (and the count starts again). */
bool bt_log_limit_take(bt_log_limit *l, uint64_t now_ms, unsigned burst, unsigned *unsaid);

#endif
