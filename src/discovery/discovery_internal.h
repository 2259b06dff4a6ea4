/* discovery_internal.h — what discovery.c shares with its backends (file.c, etcd.c).
 *
 * A backend handle embeds `bt_discovery` as its first member and points it at the backend's
 * operation table; discovery.c checks arguments and dispatches through that table, so a backend
 * never sees NULL handles or keys. A backend is added by writing its create function and listing
 * it in discovery.c's backend table. Nothing here is part of the public interface; the key
 * encoding helpers are exposed only so that the unit tests can check them. */
#ifndef BATON_DISCOVERY_INTERNAL_H
#define BATON_DISCOVERY_INTERNAL_H

#include <stdbool.h>

#include "discovery/discovery.h"

typedef struct bt_discovery_ops {
    const char *name; /* "file", "etcd" */
    bt_status (*put)(bt_discovery *d, const char *key, const json_t *value);
    bt_status (*del)(bt_discovery *d, const char *key);
    bt_status (*watch)(bt_discovery *d, const char *prefix, const bt_discovery_watcher *w, void *ud);
    void (*close)(bt_discovery *d, void (*done)(void *ud), void *ud);
    void (*stats)(const bt_discovery *d, bt_discovery_stats *out);
} bt_discovery_ops;

/* The common head of every backend handle. */
struct bt_discovery {
    const bt_discovery_ops *ops;
};

/* A backend constructor: same contract as bt_discovery_create() (cfg already checked non-NULL). */
typedef bt_status (*bt_discovery_create_fn)(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out,
                                            char *err, size_t errlen);

/* file.c */
bt_status bt_discovery_file_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                                   size_t errlen);

/* The longest file name the file backend produces (NAME_MAX on Linux). */
#define BT_DISCOVERY_FILE_NAME_MAX 255

/* Encodes a key as a file name: '/' → "%2F", '%' → "%25", and a leading '.' → "%2E" (names that
 * start with '.' are reserved for temporary files). Returns the length written (NUL added), or -1
 * if the key is empty or the name does not fit in `cap` or in BT_DISCOVERY_FILE_NAME_MAX. */
int bt_discovery_file_encode_key(const char *key, char *out, size_t cap);
/* The inverse: decodes every "%XX" (hex, either case). Returns the key length, or -1 if the name
 * has a malformed escape, decodes to an empty key or a NUL byte, or does not fit in `cap`. */
int bt_discovery_file_decode_name(const char *name, char *out, size_t cap);

/* etcd.c (the handle; its pieces are in etcd_internal.h) */
bt_status bt_discovery_etcd_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                                   size_t errlen);

/* etcd_wire.c: the pure pieces of the etcd backend (request bodies, answer parsers), exposed for the
 * unit tests and the fuzz driver: no I/O, no loop. */

/* Standard base64 with padding (the gateway's encoding of bytes fields). encode returns the
 * length written (NUL added) or -1 if it does not fit in cap; decode accepts padded or unpadded
 * input and returns the number of bytes written, or -1 on a character outside the alphabet, a bad
 * length or padding, or an output that does not fit in cap. */
int bt_etcd_b64_encode(const void *in, size_t n, char *out, size_t cap);
int bt_etcd_b64_decode(const char *in, size_t n, void *out, size_t cap);

/* The range end that makes [prefix, end) cover every key starting with prefix: the prefix with
 * trailing 0xff bytes dropped and its last byte incremented; "\0" (length 1, meaning "to the end
 * of the keyspace") for an empty or all-0xff prefix. out needs n + 1 bytes; returns the length. */
size_t bt_etcd_prefix_end(const char *prefix, size_t n, char *out);

/* Parses a comma-separated endpoint list: spaces around items and empty items are ignored, an
 * item without a scheme gets "http://", trailing '/' are dropped; only http and https are taken.
 * On success *out is a malloc'd array of *n malloc'd strings (free with bt_etcd_endpoints_free). */
bt_status bt_etcd_parse_endpoints(const char *list, char ***out, size_t *n, char *err, size_t errlen);
void bt_etcd_endpoints_free(char **eps, size_t n);

/* Request bodies for the gateway, as malloc'd compact JSON (NULL when out of memory). 64-bit
 * integers are written as JSON strings, as the gateway itself writes them. */
char *bt_etcd_body_put(const char *key, const char *value, size_t vlen, int64_t lease);
char *bt_etcd_body_delete(const char *key);
char *bt_etcd_body_range(const char *prefix, bool count_only);
char *bt_etcd_body_watch(const char *prefix, int64_t start_revision);
char *bt_etcd_body_lease(int64_t id); /* keepalive and revoke */
char *bt_etcd_body_grant(int64_t ttl_s);
char *bt_etcd_body_auth(const char *user, const char *password);

/* The gateway writes 64-bit integers as strings; accept numbers too. Missing = 0 (and true);
 * false when v is neither. */
bool bt_etcd_json_i64(const json_t *v, int64_t *out);
/* True when a watch's cancel reason says the token or the permissions were refused. */
bool bt_etcd_reason_is_auth(const char *reason);

/* How a unary gateway answer is to be treated. */
typedef enum {
    BT_ETCD_OK = 0,
    BT_ETCD_RETRY,      /* unreachable, timed out, no leader, overloaded: try another member later */
    BT_ETCD_AUTH,       /* the token is missing or expired: authenticate again */
    BT_ETCD_LEASE_GONE, /* "requested lease not found": the lease expired or was revoked */
    BT_ETCD_FAIL,       /* refused for good (permission, bad request): retrying at once will not help */
} bt_etcd_result;

/* Classifies an answer: transport_ok = the HTTP exchange completed (libcurl said CURLE_OK),
 * http = its status, body = the parsed JSON answer or NULL. Writes a one-line reason to why. */
bt_etcd_result bt_etcd_classify(bool transport_ok, long http, const json_t *body, char *why, size_t whylen);

/* One key-value from a range answer or a watch event. key is NUL-terminated (keys holding a NUL
 * byte are skipped); value holds vlen bytes plus a NUL. */
typedef struct {
    char *key;
    char *value;
    size_t vlen;
    bool is_delete;
    int64_t mod_revision;
} bt_etcd_kv;

/* The header's cluster_id of a gateway answer (a decimal uint64 as a string), or "". */
const char *bt_etcd_cluster_id(const json_t *body);
/* Parses a range answer: its kvs (in answer order) and header revision. */
bt_status bt_etcd_parse_range(const json_t *body, bt_etcd_kv **kvs, size_t *n, int64_t *revision);
void bt_etcd_kvs_free(bt_etcd_kv *kvs, size_t n);

typedef enum {
    BT_ETCD_WMSG_CREATED = 1, /* the watch is set up */
    BT_ETCD_WMSG_EVENTS,      /* one or more events */
    BT_ETCD_WMSG_PROGRESS,    /* a header only */
    BT_ETCD_WMSG_CANCELED,    /* the server ended the watch: compact_revision > 0 if compacted */
    BT_ETCD_WMSG_ERROR,       /* the gateway reported a stream error */
} bt_etcd_wmsg_kind;

typedef struct {
    bt_etcd_wmsg_kind kind;
    int64_t header_revision;
    char cluster_id[24]; /* the header's cluster_id ("" if absent): a new one means a new store */
    int64_t compact_revision;
    char reason[256];
    bt_etcd_kv *events;
    size_t nevents;
} bt_etcd_wmsg;

/* Parses one message of the watch stream (one line of the gateway's newline-delimited JSON). */
bt_status bt_etcd_parse_watch_msg(const char *text, size_t len, bt_etcd_wmsg *out);
void bt_etcd_wmsg_free(bt_etcd_wmsg *m);

#endif
