/* log.c — see log.h. Each line is formatted into one buffer and written with a single write(2),
 * so lines from concurrent processes sharing a terminal do not interleave. */
#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static bt_log_level g_level = BT_LOG_INFO;
static bool g_jsonl = false;
static char g_component[32] = "baton";
static bool g_env_told; /* bt_log_env_reported: the launcher reported the variables' values */

static const char *level_names[] = {"ERROR", "WARN", "INFO", "DEBUG", "TRACE"};

void bt_log_init(const char *component) {
    const char *lvl = getenv("DYN_LOG");
    if (lvl && *lvl) {
        bool known = false;
        for (int i = 0; i <= BT_LOG_TRACE; i++)
            if (strncasecmp(lvl, level_names[i], strlen(level_names[i])) == 0) {
                g_level = (bt_log_level)i;
                known = true;
            }
        if (strncasecmp(lvl, "warning", 7) == 0) g_level = BT_LOG_WARN;
        /* a typo would otherwise leave the default in silence (the user asked for another level) */
        static bool told; /* once per process: `baton run` initializes the log more than once */
        if (!known && !told && !g_env_told) {
            told = true;
            fprintf(stderr, "baton %s: DYN_LOG='%.64s' names no level (error, warn, info, debug or trace); logging "
                            "at %s\n",
                    component ? component : "", lvl, level_names[g_level]);
        }
    }
    const char *j = getenv("DYN_LOGGING_JSONL");
    g_jsonl = j && (strcmp(j, "1") == 0 || strcasecmp(j, "true") == 0);
    /* like DYN_LOG: a value that is neither on nor off (yes, json) is said, not ignored */
    static bool told_jsonl;
    if (j && *j && !g_jsonl && strcmp(j, "0") != 0 && strcasecmp(j, "false") != 0 && !told_jsonl && !g_env_told) {
        told_jsonl = true;
        fprintf(stderr, "baton %s: DYN_LOGGING_JSONL='%.64s' is neither 1/true nor 0/false; logging plain text\n",
                component ? component : "", j);
    }
    if (component) snprintf(g_component, sizeof g_component, "%s", component);
}

void bt_log_env_reported(void) { g_env_told = true; }

void bt_log_usage(void) {
    printf("\nlogging (environment only, every command):\n");
    printf("  %-38s %s [default: %s]\n", "DYN_LOG",
           "level: error, warn, info, debug or trace (case-insensitive)", "info");
    printf("  %-38s %s [default: %s]\n", "DYN_LOGGING_JSONL",
           "1 or true: each line one JSON object {time, level, component, pid, message}", "false");
}

bool bt_log_enabled(bt_log_level lvl) { return lvl <= g_level; }

/* Appends `s` to out as JSON string content (no quotes). Returns the new length. */
static size_t json_escape_into(char *out, size_t len, size_t cap, const char *s) {
    for (; *s && len + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[len++] = '\\';
            out[len++] = (char)c;
        } else if (c < 0x20) {
            len += (size_t)snprintf(out + len, cap - len, "\\u%04x", c);
        } else {
            out[len++] = (char)c;
        }
    }
    return len;
}

size_t bt_log_time(char *out, size_t cap) {
    /* the date and time of day change once a second: made then (gmtime_r and strftime cost more
     * than the rest of an access-log line), per thread */
    static _Thread_local time_t sec = -1;
    static _Thread_local char day[24];
    static _Thread_local size_t dn;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != sec) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        dn = strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
        sec = ts.tv_sec;
    }
    if (cap < dn + 6) {
        if (cap) out[0] = '\0';
        return 0;
    }
    memcpy(out, day, dn);
    long ms = ts.tv_nsec / 1000000;
    out[dn] = '.';
    out[dn + 1] = (char)('0' + ms / 100);
    out[dn + 2] = (char)('0' + ms / 10 % 10);
    out[dn + 3] = (char)('0' + ms % 10);
    out[dn + 4] = 'Z';
    out[dn + 5] = '\0';
    return dn + 5;
}

void bt_log(bt_log_level lvl, const char *fmt, ...) {
    if (lvl > g_level) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    char when[40];
    bt_log_time(when, sizeof when);

    char line[4608];
    size_t len;
    if (g_jsonl) {
        len = (size_t)snprintf(line, sizeof line,
                               "{\"time\":\"%s\",\"level\":\"%s\",\"component\":\"%s\",\"pid\":%d,\"message\":\"",
                               when, level_names[lvl], g_component, (int)getpid());
        len = json_escape_into(line, len, sizeof line - 4, msg);
        len += (size_t)snprintf(line + len, sizeof line - len, "\"}\n");
    } else {
        len = (size_t)snprintf(line, sizeof line, "%s %-5s %s[%d]: %s\n", when, level_names[lvl],
                               g_component, (int)getpid(), msg);
    }
    if (len >= sizeof line) len = sizeof line - 1, line[len - 1] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

bool bt_log_limit_take(bt_log_limit *l, uint64_t now_ms, unsigned burst, unsigned *unsaid) {
    if (now_ms - l->window_ms >= 1000) {
        l->window_ms = now_ms;
        l->n = 0;
    }
    if (l->n >= burst) {
        l->unsaid++;
        return false;
    }
    l->n++;
    *unsaid = l->unsaid;
    l->unsaid = 0;
    return true;
}
