/* discovery_internal.h — what discovery.c shares with its backends (file.c, later etcd.c).
 *
 * A backend handle embeds `bt_discovery` as its first member and points it at the backend's
 * operation table; discovery.c checks arguments and dispatches through that table, so a backend
 * never sees NULL handles or keys. A backend is added by writing its create function and listing
 * it in discovery.c's backend table. Nothing here is part of the public interface; the key
 * encoding helpers are exposed only so that the unit tests can check them. */
#ifndef BATON_DISCOVERY_INTERNAL_H
#define BATON_DISCOVERY_INTERNAL_H

#include "discovery/discovery.h"

typedef struct bt_discovery_ops {
    const char *name; /* "file" */
    bt_status (*put)(bt_discovery *d, const char *key, const json_t *value);
    bt_status (*del)(bt_discovery *d, const char *key);
    bt_status (*watch)(bt_discovery *d, const char *prefix, const bt_discovery_watcher *w, void *ud);
    void (*close)(bt_discovery *d, void (*done)(void *ud), void *ud);
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

#endif
