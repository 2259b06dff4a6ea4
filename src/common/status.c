/* status.c — lookups into the status table of status.h. */
#include "common/status.h"

#include <stddef.h>

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
    return code == BT_ERR_CONTEXT_LENGTH || code == BT_ERR_INVALID_PROMPT || code == BT_ERR_INVALID_LOGIT_BIAS;
}

bool bt_status_migratable(int code) {
    const status_row *r = row(code);
    return r ? r->migratable : false;
}
