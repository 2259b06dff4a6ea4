/* discovery.c — the discovery plane's front door: default configuration, key helpers, and the
 * choice of backend by name. Every public call checks its arguments here and is then dispatched
 * through the handle's operation table (discovery_internal.h), so backends implement behaviour
 * only: file.c and etcd.c, listed in the table below. */
#include "discovery/discovery_internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    bt_discovery_create_fn create; /* NULL: known but not built; `missing` says why */
    const char *missing;
} backend_entry;

static const backend_entry backends[] = {
    {"file", bt_discovery_file_create, NULL},
    {"etcd", bt_discovery_etcd_create, NULL},
};

/* The returned strings point into the environment or into thread-local storage that the next
 * call on the same thread overwrites; bt_discovery_create() copies what it keeps. */
void bt_discovery_config_default(bt_discovery_config *c) {
    static _Thread_local char dir[PATH_MAX];
    if (!c) return;
    memset(c, 0, sizeof *c);
    c->backend = "file";
    c->ttl_s = 10;
    const char *kv = getenv("DYN_FILE_KV");
    if (kv && *kv) {
        c->dir = kv;
    } else {
        const char *tmp = getenv("TMPDIR");
        if (!tmp || !*tmp) tmp = "/tmp";
        size_t n = strlen(tmp);
        while (n > 1 && tmp[n - 1] == '/') n--; /* "/tmp/" → "/tmp" so the path has no "//" */
        snprintf(dir, sizeof dir, "%.*s/baton_store_kv", (int)n, tmp);
        c->dir = dir;
    }
    const char *ep = getenv("ETCD_ENDPOINTS");
    c->etcd_endpoints = (ep && *ep) ? ep : "http://localhost:2379";
    const char *user = getenv("ETCD_AUTH_USERNAME");
    c->etcd_username = (user && *user) ? user : NULL;
    c->etcd_password = getenv("ETCD_AUTH_PASSWORD");
    const char *ca = getenv("ETCD_AUTH_CA"), *cert = getenv("ETCD_AUTH_CLIENT_CERT"),
               *key = getenv("ETCD_AUTH_CLIENT_KEY");
    c->etcd_ca = (ca && *ca) ? ca : NULL;
    c->etcd_client_cert = (cert && *cert) ? cert : NULL;
    c->etcd_client_key = (key && *key) ? key : NULL;
}

bt_status bt_discovery_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                              size_t errlen) {
    char dummy[1];
    if (!err || errlen == 0) err = dummy, errlen = sizeof dummy;
    err[0] = '\0';
    if (out) *out = NULL;
    if (!loop || !cfg || !out) {
        snprintf(err, errlen, "discovery: loop, config and out are required");
        return BT_ERR_INVALID;
    }
    const char *name = (cfg->backend && *cfg->backend) ? cfg->backend : "file";
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++) {
        if (strcmp(backends[i].name, name) != 0) continue;
        if (!backends[i].create) {
            snprintf(err, errlen, "%s", backends[i].missing);
            return BT_ERR_INVALID;
        }
        return backends[i].create(loop, cfg, out, err, errlen);
    }
    snprintf(err, errlen, "unknown discovery backend '%s' (expected 'file' or 'etcd')", name);
    return BT_ERR_INVALID;
}

bt_status bt_discovery_put(bt_discovery *d, const char *key, const json_t *value) {
    if (!d || !key || !*key || !value) return BT_ERR_INVALID;
    return d->ops->put(d, key, value);
}

bt_status bt_discovery_delete(bt_discovery *d, const char *key) {
    if (!d || !key || !*key) return BT_ERR_INVALID;
    return d->ops->del(d, key);
}

bt_status bt_discovery_watch(bt_discovery *d, const char *prefix, const bt_discovery_watcher *w, void *ud) {
    if (!d || !w) return BT_ERR_INVALID;
    return d->ops->watch(d, prefix ? prefix : "", w, ud);
}

void bt_discovery_get_stats(const bt_discovery *d, bt_discovery_stats *out) {
    memset(out, 0, sizeof *out);
    if (d) d->ops->stats(d, out);
}

void bt_discovery_close(bt_discovery *d, void (*done)(void *ud), void *ud) {
    if (!d) return;
    d->ops->close(d, done, ud);
}

int bt_discovery_instance_key(char *out, size_t cap, const char *ns, const char *component, const char *endpoint,
                              uint64_t instance_id) {
    if (!out || cap == 0 || !ns || !component || !endpoint) return -1;
    int n = snprintf(out, cap, "v1/instances/%s/%s/%s/%llx", ns, component, endpoint,
                     (unsigned long long)instance_id);
    if (n < 0 || (size_t)n >= cap) {
        out[0] = '\0';
        return -1;
    }
    return n;
}

bool bt_discovery_model_name_ok(const char *name, size_t len, char *err, size_t errlen) {
    if (len == 0 || len > BT_MODEL_NAME_MAX) {
        snprintf(err, errlen, "model name of %zu bytes (1 to %d allowed)", len, BT_MODEL_NAME_MAX);
        return false;
    }
    if (memchr(name, '\0', len)) {
        snprintf(err, errlen, "model name holds U+0000");
        return false;
    }
    if (len == strlen(BT_MODEL_NAME_RESERVED) && memcmp(name, BT_MODEL_NAME_RESERVED, len) == 0) {
        snprintf(err, errlen, "model name '%s' is reserved (the model label of requests for models no worker serves)",
                 BT_MODEL_NAME_RESERVED);
        return false;
    }
    return true;
}
