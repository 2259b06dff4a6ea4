/* discovery.h — the discovery plane: who serves what, where.
 *
 * Keys follow Dynamo: v1/instances/{namespace}/{component}/{endpoint}/{instance_id:x}, the value
 * a JSON object (see docs/discovery.md). A process writes its own keys with bt_discovery_put();
 * they live while the process keeps them alive (file mtime refresh, etcd lease) and vanish after
 * the TTL when it dies. Watchers see every key under a prefix: first the keys that exist, then
 * each change. Backends: "file" (a directory, inotify) and "etcd" (v3 JSON gateway, a lease per
 * process). A backend that loses its store for a while keeps the watcher's view as it was (no
 * deletes are reported for keys it can no longer see) and reconciles when the store is back.
 *
 * Everything runs on the caller's loop; no call blocks it. Callbacks are never made from inside
 * the call that registered them. */
#ifndef BATON_DISCOVERY_H
#define BATON_DISCOVERY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/status.h"

typedef struct {
    const char *backend;        /* "file" (default) or "etcd" */
    const char *dir;            /* file: the directory (created if missing) */
    int64_t ttl_s;              /* lifetime without refresh, 10 */
    const char *etcd_endpoints; /* etcd: comma-separated URLs, tried in order, failing over */
    const char *etcd_username;  /* etcd: optional auth, with etcd_password */
    const char *etcd_password;
    const char *etcd_ca;          /* etcd over https://: PEM CA bundle that signs the members' certs */
    const char *etcd_client_cert; /* etcd over https://: PEM client certificate, with etcd_client_key */
    const char *etcd_client_key;
} bt_discovery_config;

typedef struct {
    /* A key appeared or changed. `value` is borrowed for the call. */
    void (*on_put)(void *ud, const char *key, const json_t *value);
    /* A key was deleted or expired. */
    void (*on_delete)(void *ud, const char *key);
} bt_discovery_watcher;

typedef struct bt_discovery bt_discovery;

/* Fills defaults: backend "file", dir $DYN_FILE_KV or $TMPDIR/baton_store_kv, ttl 10, etcd endpoints
 * $ETCD_ENDPOINTS or http://localhost:2379, etcd user and password $ETCD_AUTH_USERNAME and
 * $ETCD_AUTH_PASSWORD (NULL when unset: no auth), etcd TLS files $ETCD_AUTH_CA, $ETCD_AUTH_CLIENT_CERT
 * and $ETCD_AUTH_CLIENT_KEY (NULL when unset). The strings point into the environment or thread-local
 * storage (overwritten by the next call); bt_discovery_create() copies what it keeps. */
void bt_discovery_config_default(bt_discovery_config *c);

bt_status bt_discovery_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                              size_t errlen);
/* Writes key=value (value is copied) owned by this process and keeps it alive until deleted. */
bt_status bt_discovery_put(bt_discovery *d, const char *key, const json_t *value);
/* Removes a key this process put, as fast as the backend allows (file: unlink now). */
bt_status bt_discovery_delete(bt_discovery *d, const char *key);
/* Watches every key that starts with `prefix`. One watch per handle is enough for baton (a second
 * call fails with BT_ERR_INVALID). The keys that exist are delivered later from the loop, never
 * from inside this call. */
bt_status bt_discovery_watch(bt_discovery *d, const char *prefix, const bt_discovery_watcher *w, void *ud);
/* How the store looks from this handle, for metrics an operator can alert on. */
typedef struct {
    /* The watch is established and the store answers: etcd, the watch stream is created and its
     * member answered the last liveness probe; file, the last listing of the directory succeeded.
     * False before the first listing, while the store cannot be reached, and without a watch. */
    bool watching;
    /* Every key this process put is in the store: etcd, written under the current live lease;
     * file, written and refreshed without error. True when it put none. */
    bool registered;
    /* Times this process found its keys gone and wrote them again: etcd, a lease found expired
     * (after an etcd pause or a partition longer than the TTL); file, a key file that had vanished. */
    uint64_t reregistrations;
} bt_discovery_stats;

/* Fills *out (zeroed for a NULL handle). */
void bt_discovery_get_stats(const bt_discovery *d, bt_discovery_stats *out);

/* Removes this process's keys, stops watching, closes handles, then calls done(ud) from the loop
 * and frees the handle. Safe to call once; d must not be used afterwards. */
void bt_discovery_close(bt_discovery *d, void (*done)(void *ud), void *ud);

/* Key helpers. Writes "v1/instances/{ns}/{component}/{endpoint}/{instance_id:x}"; returns its
 * length, or -1 (and an empty string) if it does not fit in cap. */
int bt_discovery_instance_key(char *out, size_t cap, const char *ns, const char *component, const char *endpoint,
                              uint64_t instance_id);

/* The model name a worker announces (model.name, what clients send as "model"): 1 to
 * BT_MODEL_NAME_MAX bytes, and not BT_MODEL_NAME_RESERVED, the model label under which a frontend
 * counts the requests it refused for models no worker serves (docs/operations.md), which a model
 * of that name would share. A worker refuses to start with another; a frontend does not register
 * one it discovers (a longer name would be kept as its prefix and served to clients asking for
 * that). False with the reason in err ("model name ..."). */
#define BT_MODEL_NAME_MAX 127
#define BT_MODEL_NAME_RESERVED "unknown"
bool bt_discovery_model_name_ok(const char *name, size_t len, char *err, size_t errlen);

#endif
