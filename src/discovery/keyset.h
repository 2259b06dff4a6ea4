/* keyset.h — what both discovery backends (file.c, etcd*.c) keep the same way: the keys this
 * process owns, and the diff of two sorted views of a prefix that a watcher is told.
 *
 * The owned set (bt_keyset): each key this process put, with the value it last put (the JSON
 * text, so a backend can write it again: the file backend on every refresh, the etcd backend
 * under a new lease), a sequence number bumped by every put (to tell whether a write that just
 * completed carried the newest value) and a few flag bits that are the backend's. A handful of
 * keys per process: a list, found by a linear search.
 *
 * The diff (bt_view_diff): both backends list a prefix into an array sorted by key and compare it
 * with the view the watcher was last told; one merge pass visits every key of either array once,
 * in key order, telling the backend whether the key is old only (gone), new only (added) or in both
 * (maybe changed). The arrays hold the backend's own entry type, whose first member is the key. */
#ifndef BATON_DISCOVERY_KEYSET_H
#define BATON_DISCOVERY_KEYSET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "common/status.h"

typedef struct bt_owned_key {
    LIST_ENTRY(bt_owned_key) link;
    char *key;
    char *text; /* the value last put, len bytes + NUL */
    size_t len;
    uint64_t seq;   /* bumped by every put of this key */
    unsigned flags; /* the backend's */
} bt_owned_key;

typedef struct {
    LIST_HEAD(, bt_owned_key) keys;
    size_t n;
} bt_keyset;

void bt_keyset_init(bt_keyset *s);
void bt_keyset_free(bt_keyset *s); /* frees every key; the set is empty and usable afterwards */
bt_owned_key *bt_keyset_find(const bt_keyset *s, const char *key);
/* Records `text` (taken over: freed by the set) as key's value; creates the key if new (*created
 * says which). Returns the key, or NULL when out of memory (text freed). */
bt_owned_key *bt_keyset_put(bt_keyset *s, const char *key, char *text, size_t len, bool *created);
/* Forgets key; false if the set did not hold it. */
bool bt_keyset_del(bt_keyset *s, const char *key);
#define BT_KEYSET_FOREACH(k, s) LIST_FOREACH(k, &(s)->keys, link)

/* Visits the keys of two arrays sorted by key (strcmp), each entry `size` bytes with its key
 * (char *) as first member, in key order: visit(ud, old, NULL) for a key only in old,
 * visit(ud, NULL, new) for one only in new, visit(ud, old, new) for one in both. Stops early when
 * visit returns false (the watcher's callback closed the handle). */
typedef bool (*bt_view_visit)(void *ud, void *old_entry, void *new_entry);
void bt_view_diff(void *old_v, size_t on, void *new_v, size_t nn, size_t size, bt_view_visit visit, void *ud);

#endif
