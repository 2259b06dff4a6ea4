/* keyset.c — the owned key set and the sorted-view diff shared by the discovery backends (see
 * keyset.h). */
#include "discovery/keyset.h"

#include <stdlib.h>
#include <string.h>

void bt_keyset_init(bt_keyset *s) {
    LIST_INIT(&s->keys);
    s->n = 0;
}

static void owned_free(bt_owned_key *k) {
    free(k->key);
    free(k->text);
    free(k);
}

void bt_keyset_free(bt_keyset *s) {
    bt_owned_key *k;
    while ((k = LIST_FIRST(&s->keys))) {
        LIST_REMOVE(k, link);
        owned_free(k);
    }
    s->n = 0;
}

bt_owned_key *bt_keyset_find(const bt_keyset *s, const char *key) {
    bt_owned_key *k;
    LIST_FOREACH(k, &s->keys, link)
    if (strcmp(k->key, key) == 0) return k;
    return NULL;
}

bt_owned_key *bt_keyset_put(bt_keyset *s, const char *key, char *text, size_t len, bool *created) {
    bt_owned_key *k = bt_keyset_find(s, key);
    if (created) *created = k == NULL;
    if (!k) {
        size_t kl = strlen(key);
        k = calloc(1, sizeof *k);
        if (!k || !(k->key = malloc(kl + 1))) {
            free(k);
            free(text);
            return NULL;
        }
        memcpy(k->key, key, kl + 1);
        LIST_INSERT_HEAD(&s->keys, k, link);
        s->n++;
    }
    free(k->text);
    k->text = text;
    k->len = len;
    k->seq++;
    return k;
}

bool bt_keyset_del(bt_keyset *s, const char *key) {
    bt_owned_key *k = bt_keyset_find(s, key);
    if (!k) return false;
    LIST_REMOVE(k, link);
    s->n--;
    owned_free(k);
    return true;
}

void bt_view_diff(void *old_v, size_t on, void *new_v, size_t nn, size_t size, bt_view_visit visit, void *ud) {
    char *ov = old_v, *nv = new_v;
    size_t i = 0, j = 0;
    while (i < on || j < nn) {
        char *o = i < on ? ov + i * size : NULL, *n = j < nn ? nv + j * size : NULL;
        int c = !o ? 1 : !n ? -1 : strcmp(*(char **)o, *(char **)n);
        bool go_on;
        if (c < 0) {
            go_on = visit(ud, o, NULL);
            i++;
        } else if (c > 0) {
            go_on = visit(ud, NULL, n);
            j++;
        } else {
            go_on = visit(ud, o, n);
            i++, j++;
        }
        if (!go_on) return;
    }
}
