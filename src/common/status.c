/* status.c — lookups into the status table of status.h. */
#include "common/status.h"

#include <stddef.h>
#include <string.h>

typedef struct {
    const char *name;
    const char *msg;
    bool migratable;
} status_row;

static const status_row rows[] = {
#define BT_X(name, code, mig, msg) [code] = {#name, msg, mig},
    BT_STATUS_TABLE(BT_X)
#undef BT_X
};

static const status_row *row(int code) {
    if (code < 0 || (size_t)code >= sizeof rows / sizeof rows[0] || rows[code].name == NULL)
        return NULL;
    return &rows[code];
}

const char *bt_status_name(int code) {
    const status_row *r = row(code);
    return r ? r->name : "unknown";
}

const char *bt_status_msg(int code) {
    const status_row *r = row(code);
    return r ? r->msg : "unknown";
}

bool bt_status_client_input(int code) {
    return code == BT_ERR_CONTEXT_LENGTH || code == BT_ERR_INVALID_PROMPT || code == BT_ERR_INVALID_LOGIT_BIAS ||
           code == BT_ERR_UNSUPPORTED_PARAM || code == BT_ERR_INVALID_PARAM;
}

bool bt_status_upstream_busy(int code) { return code == BT_ERR_UPSTREAM_BUSY || code == BT_ERR_UPSTREAM_RATE_LIMITED; }

int bt_status_retry_after(const char *msg, size_t len) {
    static const char head[] = "retry after ";
    size_t hl = sizeof head - 1;
    if (!msg || len <= hl || memcmp(msg, head, hl) != 0) return 0;
    long n = 0;
    size_t i = hl;
    for (; i < len && msg[i] >= '0' && msg[i] <= '9' && n <= 86400; i++) n = n * 10 + (msg[i] - '0');
    if (i == hl || n < 1 || n > 86400 || len - i < 2 || msg[i] != ' ' || msg[i + 1] != 's') return 0;
    return (int)n;
}

bool bt_status_migratable(int code) {
    const status_row *r = row(code);
    return r ? r->migratable : false;
}
