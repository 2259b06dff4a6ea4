/* file.c — the file backend of the discovery plane: one file per key in a shared directory.
 *
 * A key is stored as the file dir/<encoded key> (see bt_discovery_file_encode_key) whose content
 * is the value as compact JSON. Writers replace files atomically (temp file + rename), keep their
 * own keys alive by touching the mtime every min(max(ttl/3, 1 s), ttl/2), and rewrite a key that
 * vanished. Readers treat a file whose mtime is older than the TTL as expired and remove it, which
 * is how a crashed writer's keys go away. Watchers rescan the directory when inotify reports a
 * change (bursts coalesced: one scan in flight, at most one more queued) and every second, and
 * diff each snapshot against the previous one. Only a file that is not listed (or ENOENT when it
 * is opened) is a deleted key: a listing that fails keeps the whole previous snapshot, and a key
 * that is listed but cannot be opened or read (EMFILE under descriptor pressure, EIO, ...) keeps
 * its previous value, so that resource trouble in the reader never looks like a worker leaving.
 * All file-system work — writes, unlinks, listing,
 * stat and reads — runs on the libuv thread pool; the loop only diffs and calls back. Writes go
 * through one FIFO per handle, one batch at a time, so operations on a key happen in call order
 * (a put followed by a delete always ends absent). See docs/discovery.md. */
#include "discovery/discovery_internal.h"
#include "discovery/keyset.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/closer.h"
#include "common/log.h"

#define FILE_MAX_VALUE (64 * 1024)  /* larger values are refused on put and ignored on read */
#define FILE_MAX_KEYS 100000        /* a scan reports at most this many keys */
#define FILE_SCAN_INTERVAL_MS 1000  /* periodic rescan: expiry and missed inotify events */
#define FILE_TMP_PREFIX ".tmp."

/* ---- key encoding ------------------------------------------------------------------------- */

int bt_discovery_file_encode_key(const char *key, char *out, size_t cap) {
    if (!key || !*key || !out || cap == 0) return -1;
    size_t n = 0;
    for (const char *p = key; *p; p++) {
        const char *esc = NULL;
        if (*p == '/') esc = "%2F";
        else if (*p == '%') esc = "%25";
        else if (*p == '.' && p == key) esc = "%2E";
        size_t add = esc ? 3 : 1;
        if (n + add >= cap || n + add > BT_DISCOVERY_FILE_NAME_MAX) {
            out[0] = '\0';
            return -1;
        }
        if (esc) memcpy(out + n, esc, 3);
        else out[n] = *p;
        n += add;
    }
    out[n] = '\0';
    return (int)n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int bt_discovery_file_decode_name(const char *name, char *out, size_t cap) {
    if (!name || !out || cap == 0) return -1;
    size_t n = 0;
    for (const char *p = name; *p; p++) {
        char c = *p;
        if (c == '%') {
            int hi = hexval(p[1]), lo = hi < 0 ? -1 : hexval(p[2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) return -1;
            c = (char)(hi * 16 + lo);
            p += 2;
        }
        if (n + 1 >= cap) return -1;
        out[n++] = c;
    }
    out[n] = '\0';
    return n ? (int)n : -1;
}

/* ---- types -------------------------------------------------------------------------------- */

typedef enum { OP_WRITE, OP_TOUCH, OP_UNLINK } op_kind;

/* One queued file operation. It owns copies of everything the worker thread reads, so the loop
 * may change or free its own state while the operation runs. */
typedef struct op {
    STAILQ_ENTRY(op) link; /* file_disc.pend or .op_running */
    op_kind kind;
    char *key;  /* for logs */
    char *path;
    char *text; /* OP_WRITE, and OP_TOUCH (to rewrite a vanished key) */
    size_t len;
    int err;      /* result: 0 or an errno */
    bool rewrote; /* OP_TOUCH found the file gone and wrote it again */
} op;
STAILQ_HEAD(op_queue, op);

/* One key of a snapshot. `live` = reported to the watcher with on_put and not deleted since;
 * `bad` = its content was already warned about (malformed or too large); `unread` = the scan
 * listed the file but could not open or read it (EMFILE, EIO, ...): the loop keeps the previous
 * snapshot's view of the key, or leaves the key out if it had none. */
typedef struct {
    char *key;
    char *text; /* NULL when too_large or unread */
    size_t len;
    bool too_large;
    bool live;
    bool bad;
    bool unread;
} entry;

typedef struct {
    bt_discovery base;
    uv_loop_t *loop;
    char *dir;
    int64_t ttl_s;
    uint64_t refresh_ms;

    uv_timer_t refresh_timer;
    uv_timer_t scan_timer;
    uv_fs_event_t fs_event;

    bt_keyset owned; /* the keys this process put and keeps alive (keyset.h) */

    /* The write queue: pend waits; op_running is owned by the thread while op_busy. */
    struct op_queue pend;
    struct op_queue op_running;
    bool op_busy;
    uv_work_t op_req;

    /* Watching. prefix and ttl_s are immutable once the first scan is queued (threads read them). */
    bool watching;
    char *prefix;
    bt_discovery_watcher w;
    void *wud;
    bool scan_busy, scan_again;
    uv_work_t scan_req;
    entry *scan_v; /* the thread's result: sorted by key */
    size_t scan_n, scan_cap;
    int scan_err;
    bool scan_truncated;
    size_t scan_expired;
    int scan_read_err;       /* the first error opening or reading a listed key, or 0 */
    char scan_read_key[BT_DISCOVERY_FILE_NAME_MAX + 1]; /* ... and that key */
    size_t scan_unread;      /* how many listed keys could not be read */
    entry *snap; /* the last snapshot, sorted by key */
    size_t nsnap;
    int last_scan_err;
    bool scanned;       /* a listing succeeded: the last one, unless last_scan_err says otherwise */
    bool write_failing; /* the last write or refresh of an owned key failed */
    uint64_t rewrites;  /* refreshes that found an owned key's file gone and wrote it again */
    int last_read_err; /* scan_read_err of the last scan: a run of failures is logged once */
    bool warned_cap, warned_fs_event;

    /* Closing. */
    bool closing, handles_closing;
    bt_closer closer; /* the three handles' closes, then free_disc */
    void (*done)(void *ud);
    void *done_ud;
} file_disc;

static atomic_ulong g_tmp_seq; /* temp file names are unique per process across handles */

static void request_scan(file_disc *d);
static void maybe_finish_close(file_disc *d);

/* ---- helpers ------------------------------------------------------------------------------ */

static int64_t wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static char *xstrndup(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static char *xstrdup(const char *s) { return xstrndup(s, strlen(s)); }

/* mkdir -p; returns 0 or an errno. */
static int mkdir_p(const char *dir) {
    char buf[PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof buf) return ENAMETOOLONG;
    memcpy(buf, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return errno;
        buf[i] = c;
    }
    struct stat st;
    if (stat(dir, &st) != 0) return errno;
    return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
}

static void free_op(op *o) {
    free(o->key);
    free(o->path);
    free(o->text);
    free(o);
}

/* Frees every operation of q and leaves it empty. */
static void free_ops(struct op_queue *q) {
    op *o;
    while ((o = STAILQ_FIRST(q)) != NULL) {
        STAILQ_REMOVE_HEAD(q, link);
        free_op(o);
    }
}

static void free_entries(entry *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(v[i].key);
        free(v[i].text);
    }
    free(v);
}

/* ---- the write queue (thread side) -------------------------------------------------------- */

/* Writes text to path atomically: a uniquely named temp file in the same directory, renamed over
 * the target, so a reader sees the old content or the new one, never a part. No fsync: the store
 * describes live processes and does not need to survive a machine crash. Returns 0 or an errno. */
static int write_atomic(const char *dir, const char *path, const char *text, size_t len) {
    char tmp[PATH_MAX];
    unsigned long seq = atomic_fetch_add(&g_tmp_seq, 1);
    int n = snprintf(tmp, sizeof tmp, "%s/" FILE_TMP_PREFIX "%ld.%lu", dir, (long)getpid(), seq);
    if (n < 0 || (size_t)n >= sizeof tmp) return ENAMETOOLONG;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT && mkdir_p(dir) == 0) /* the directory was removed under us */
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return errno;
    int err = 0;
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        off += (size_t)w;
    }
    if (close(fd) != 0 && !err) err = errno;
    if (!err && rename(tmp, path) != 0) err = errno;
    if (err) unlink(tmp);
    return err;
}

static void op_work(uv_work_t *req) {
    file_disc *d = req->data;
    for (op *o = STAILQ_FIRST(&d->op_running); o; o = STAILQ_NEXT(o, link)) {
        switch (o->kind) {
        case OP_WRITE:
            o->err = write_atomic(d->dir, o->path, o->text, o->len);
            break;
        case OP_TOUCH:
            if (utimensat(AT_FDCWD, o->path, NULL, 0) == 0) break;
            if (errno != ENOENT) {
                o->err = errno;
                break;
            }
            /* Someone removed it (an expiry sweep after we were paused, an operator): we are
             * alive, so the key must exist again. */
            o->err = write_atomic(d->dir, o->path, o->text, o->len);
            o->rewrote = o->err == 0;
            break;
        case OP_UNLINK:
            if (unlink(o->path) != 0 && errno != ENOENT) o->err = errno;
            break;
        }
    }
}

static void ops_kick(file_disc *d);

static void op_done(uv_work_t *req, int status) {
    file_disc *d = req->data;
    (void)status; /* never cancelled */
    for (op *o = STAILQ_FIRST(&d->op_running); o; o = STAILQ_NEXT(o, link)) {
        static const char *names[] = {"write", "refresh", "unlink"};
        if (o->kind != OP_UNLINK) d->write_failing = o->err != 0;
        if (o->err)
            BT_WARN("discovery(file): %s of key %s failed: %s", names[o->kind], o->key, strerror(o->err));
        else if (o->rewrote)
            BT_INFO("discovery(file): key %s had vanished; written again", o->key);
        else
            BT_TRACE("discovery(file): %s %s", names[o->kind], o->key);
        if (o->rewrote && !o->err) d->rewrites++;
    }
    free_ops(&d->op_running);
    d->op_busy = false;
    ops_kick(d);
    maybe_finish_close(d);
}

/* Starts the next batch: everything queued so far, executed in order by one thread. */
static void ops_kick(file_disc *d) {
    if (d->op_busy || STAILQ_EMPTY(&d->pend)) return;
    STAILQ_CONCAT(&d->op_running, &d->pend); /* op_running is empty: it takes the whole queue */
    d->op_busy = true;
    d->op_req.data = d;
    int rc = uv_queue_work(d->loop, &d->op_req, op_work, op_done);
    if (rc != 0) { /* only fails on invalid arguments: a bug, not a runtime condition */
        BT_ERROR("discovery(file): uv_queue_work: %s", uv_strerror(rc));
        free_ops(&d->op_running);
        d->op_busy = false;
    }
}

/* Drops queued (not yet running) writes and refreshes of `key`: the write or unlink about to be
 * queued makes them moot, and dropping them keeps a delete fast even behind a backlog. Running
 * operations are never touched; the new one runs after them, so call order is preserved. */
static void drop_pending_writes(file_disc *d, const char *key) {
    struct op_queue keep = STAILQ_HEAD_INITIALIZER(keep);
    op *o;
    while ((o = STAILQ_FIRST(&d->pend)) != NULL) {
        STAILQ_REMOVE_HEAD(&d->pend, link);
        if (o->kind != OP_UNLINK && strcmp(o->key, key) == 0) free_op(o);
        else STAILQ_INSERT_TAIL(&keep, o, link);
    }
    STAILQ_CONCAT(&d->pend, &keep);
}

static bool pending_touch(file_disc *d, const char *key) {
    for (op *o = STAILQ_FIRST(&d->pend); o; o = STAILQ_NEXT(o, link))
        if (o->kind == OP_TOUCH && strcmp(o->key, key) == 0) return true;
    return false;
}

static bt_status enqueue(file_disc *d, op_kind kind, const char *key, const char *path, const char *text,
                         size_t len) {
    op *o = calloc(1, sizeof *o);
    if (!o) return BT_ERR_NOMEM;
    o->kind = kind;
    o->key = xstrdup(key);
    o->path = xstrdup(path);
    o->text = text ? xstrndup(text, len) : NULL;
    o->len = len;
    if (!o->key || !o->path || (text && !o->text)) {
        free_op(o);
        return BT_ERR_NOMEM;
    }
    STAILQ_INSERT_TAIL(&d->pend, o, link);
    ops_kick(d);
    return BT_OK;
}

/* ---- refresh ------------------------------------------------------------------------------ */

static bt_status key_path(file_disc *d, const char *key, char *path, size_t cap);

static void on_refresh_timer(uv_timer_t *t) {
    file_disc *d = t->data;
    bt_owned_key *o;
    BT_KEYSET_FOREACH(o, &d->owned) {
        char path[PATH_MAX];
        if (pending_touch(d, o->key)) continue; /* the pool is backed up; one pending is enough */
        if (key_path(d, o->key, path, sizeof path) != BT_OK ||
            enqueue(d, OP_TOUCH, o->key, path, o->text, o->len) != BT_OK)
            BT_WARN("discovery(file): out of memory refreshing %s", o->key);
    }
}

/* ---- put / delete ------------------------------------------------------------------------- */

static bt_status key_path(file_disc *d, const char *key, char *path, size_t cap) {
    char name[BT_DISCOVERY_FILE_NAME_MAX + 1];
    if (bt_discovery_file_encode_key(key, name, sizeof name) < 0) return BT_ERR_INVALID;
    int n = snprintf(path, cap, "%s/%s", d->dir, name);
    return (n < 0 || (size_t)n >= cap) ? BT_ERR_INVALID : BT_OK;
}

static bt_status file_put(bt_discovery *base, const char *key, const json_t *value) {
    file_disc *d = (file_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    char path[PATH_MAX];
    if (key_path(d, key, path, sizeof path) != BT_OK) {
        BT_WARN("discovery(file): key too long for a file name: %.80s…", key);
        return BT_ERR_INVALID;
    }
    char *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text) return BT_ERR_INVALID;
    size_t len = strlen(text);
    bt_status st = BT_OK;
    if (len > FILE_MAX_VALUE) {
        BT_WARN("discovery(file): value of key %s is %zu bytes, over the %d byte limit", key, len, FILE_MAX_VALUE);
        st = BT_ERR_TOO_LARGE;
        goto out;
    }
    /* A directory this user cannot write in fails every write, and would leave the process
     * running but never discoverable: refused on the first put of a key (at start-up), with
     * the reason, so that the process can exit. Later failures are retried by the refresh. */
    if (!bt_keyset_find(&d->owned, key) && access(d->dir, W_OK | X_OK) != 0) {
        int e = errno;
        BT_ERROR("discovery(file): cannot write key %s in %s: %s (choose another --discovery-dir / DYN_FILE_KV, or "
                 "let this user write there)",
                 key, d->dir, strerror(e));
        st = BT_ERR_IO;
        goto out;
    }
    bool created;
    bt_owned_key *o = bt_keyset_put(&d->owned, key, text, len, &created);
    text = NULL; /* the set's now (or freed) */
    if (!o) {
        st = BT_ERR_NOMEM;
        goto out;
    }
    if (created && !uv_is_active((uv_handle_t *)&d->refresh_timer))
        uv_timer_start(&d->refresh_timer, on_refresh_timer, d->refresh_ms, d->refresh_ms);
    drop_pending_writes(d, key); /* superseded: this write carries the newest value */
    st = enqueue(d, OP_WRITE, key, path, o->text, o->len);
out:
    free(text);
    return st;
}

/* Forgets `key` as ours and queues its unlink (also for a key we never put: unlinking is how an
 * operator tool would remove a stale registration). */
static bt_status forget_and_unlink(file_disc *d, const char *key, const char *path) {
    bt_keyset_del(&d->owned, key);
    if (d->owned.n == 0) uv_timer_stop(&d->refresh_timer);
    drop_pending_writes(d, key);
    return enqueue(d, OP_UNLINK, key, path, NULL, 0);
}

static bt_status file_del(bt_discovery *base, const char *key) {
    file_disc *d = (file_disc *)base;
    if (d->closing) return BT_ERR_SHUTDOWN;
    char path[PATH_MAX];
    if (key_path(d, key, path, sizeof path) != BT_OK) return BT_ERR_INVALID;
    return forget_and_unlink(d, key, path);
}

/* ---- scanning (thread side) --------------------------------------------------------------- */

static int64_t mtime_ns(const struct stat *st) { return (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec; }

/* Removes an expired file. The mtime is checked again just before the unlink so that a writer who
 * refreshed it since our first look keeps it (the remaining window is tiny, and a writer whose
 * file is removed anyway rewrites it at its next refresh). */
static bool remove_if_expired(int dfd, const char *name, int64_t now, int64_t ttl_ns) {
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) return false;
    if (!S_ISREG(st.st_mode) || now - mtime_ns(&st) <= ttl_ns) return false;
    return unlinkat(dfd, name, 0) == 0;
}

static int cmp_entry(const void *a, const void *b) { return strcmp(((const entry *)a)->key, ((const entry *)b)->key); }

/* Reads a regular file of at most FILE_MAX_VALUE bytes; sets *too_large if it is bigger. Returns
 * NULL with *err set (an errno) when reading fails or memory runs out. */
static char *read_capped(int fd, size_t *len, bool *too_large, int *err) {
    char *buf = malloc(FILE_MAX_VALUE + 1);
    if (!buf) {
        *err = ENOMEM;
        return NULL;
    }
    size_t n = 0;
    while (n < FILE_MAX_VALUE + 1) {
        ssize_t r = read(fd, buf + n, FILE_MAX_VALUE + 1 - n);
        if (r < 0) {
            if (errno == EINTR) continue;
            *err = errno;
            free(buf);
            return NULL;
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    if (n > FILE_MAX_VALUE) {
        free(buf);
        *too_large = true;
        return NULL;
    }
    char *shrunk = realloc(buf, n + 1);
    if (shrunk) buf = shrunk;
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Reads one listed key into *e (key not set). Returns false when the file is not a key after all
 * (gone since readdir, a symlink, a socket, a FIFO, a directory, expired and removed); otherwise
 * true, with e->unread set and *err holding the errno if it could not be opened or read. Only
 * ENOENT means absent: an error such as EMFILE, ENFILE, EACCES or EIO says nothing about the key,
 * and treating it as a deletion would drop a live worker from every watcher. ELOOP (O_NOFOLLOW on a
 * symlink) and ENXIO (a socket) are answers about what the file is, like a non-regular fstat. */
static bool scan_read_key(file_disc *d, int dfd, const char *name, int64_t now, int64_t ttl_ns, entry *e, int *err) {
    *err = 0;
    /* O_NONBLOCK: a FIFO someone dropped here must not hang the thread. */
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT || errno == ELOOP || errno == ENXIO) return false;
        *err = errno;
        e->unread = true;
        return true;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *err = errno;
        e->unread = true;
        close(fd);
        return true;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return false;
    }
    if (now - mtime_ns(&st) > ttl_ns) {
        close(fd);
        if (remove_if_expired(dfd, name, now, ttl_ns)) d->scan_expired++;
        return false;
    }
    if (st.st_size > FILE_MAX_VALUE) e->too_large = true;
    else e->text = read_capped(fd, &e->len, &e->too_large, err);
    close(fd);
    if (!e->text && !e->too_large) e->unread = true;
    return true;
}

static void scan_work(uv_work_t *req) {
    file_disc *d = req->data;
    d->scan_v = NULL;
    d->scan_n = d->scan_cap = 0;
    d->scan_err = 0;
    d->scan_truncated = false;
    d->scan_expired = 0;
    d->scan_read_err = 0;
    d->scan_read_key[0] = '\0';
    d->scan_unread = 0;

    DIR *dp = opendir(d->dir);
    if (!dp) {
        /* A missing directory holds no keys (writers recreate it on their next write). */
        if (errno != ENOENT) d->scan_err = errno;
        return;
    }
    int dfd = dirfd(dp);
    const int64_t now = wall_ns();
    const int64_t ttl_ns = d->ttl_s * 1000000000;
    const size_t plen = strlen(d->prefix);
    struct dirent *de;
    /* errno is cleared before each readdir: NULL with errno set is a failed listing, not its end */
    while ((errno = 0, de = readdir(dp)) != NULL) {
        const char *name = de->d_name;
        if (name[0] == '.') {
            /* Temp files of writers that died between create and rename. */
            if (strncmp(name, FILE_TMP_PREFIX, strlen(FILE_TMP_PREFIX)) == 0) remove_if_expired(dfd, name, now, ttl_ns);
            continue;
        }
        char key[BT_DISCOVERY_FILE_NAME_MAX + 1];
        if (bt_discovery_file_decode_name(name, key, sizeof key) < 0) continue;
        if (strncmp(key, d->prefix, plen) != 0) continue;
        if (d->scan_n >= FILE_MAX_KEYS) {
            d->scan_truncated = true;
            break;
        }
        entry e = {0};
        int rerr;
        if (!scan_read_key(d, dfd, name, now, ttl_ns, &e, &rerr)) continue;
        if (e.unread) {
            d->scan_unread++;
            if (!d->scan_read_err) {
                d->scan_read_err = rerr ? rerr : EIO;
                snprintf(d->scan_read_key, sizeof d->scan_read_key, "%s", key);
            }
        }
        if (d->scan_n == d->scan_cap) {
            size_t ncap = d->scan_cap ? d->scan_cap * 2 : 64;
            entry *nv = realloc(d->scan_v, ncap * sizeof *nv);
            if (!nv) {
                free(e.text);
                d->scan_err = ENOMEM;
                break;
            }
            d->scan_v = nv;
            d->scan_cap = ncap;
        }
        e.key = xstrdup(key);
        if (!e.key) {
            free(e.text);
            d->scan_err = ENOMEM;
            break;
        }
        d->scan_v[d->scan_n++] = e;
    }
    if (!de && errno != 0 && !d->scan_err) d->scan_err = errno; /* the listing is incomplete */
    closedir(dp);
    if (d->scan_n) qsort(d->scan_v, d->scan_n, sizeof *d->scan_v, cmp_entry);
}

/* ---- scanning (loop side) ----------------------------------------------------------------- */

/* Decides what a new or changed entry means and tells the watcher. `prev` is the entry of the
 * same key in the previous snapshot, or NULL. Callbacks may close the handle: check closing. */
static void evaluate(file_disc *d, const entry *prev, entry *e) {
    bool same = prev && prev->too_large == e->too_large &&
                (e->too_large || (prev->len == e->len && memcmp(prev->text, e->text, e->len) == 0));
    if (same) { /* unchanged (a refresh touched only the mtime) */
        e->live = prev->live;
        e->bad = prev->bad;
        return;
    }
    json_t *v = NULL;
    if (e->too_large) {
        BT_WARN("discovery(file): key %s in %s is larger than %d bytes; ignored", e->key, d->dir, FILE_MAX_VALUE);
    } else {
        json_error_t je;
        v = json_loadb(e->text, e->len, JSON_DECODE_ANY, &je);
        if (!v)
            BT_WARN("discovery(file): key %s in %s is not valid JSON (line %d: %s); ignored", e->key, d->dir,
                    je.line, je.text);
    }
    if (!v) {
        /* Unusable content means the key is not usable either: a watcher that knew it forgets it. */
        e->bad = true;
        if (prev && prev->live && !d->closing && d->w.on_delete) d->w.on_delete(d->wud, e->key);
        return;
    }
    e->live = true;
    if (!d->closing && d->w.on_put) d->w.on_put(d->wud, e->key, v);
    json_decref(v);
}

/* One key of the old snapshot (p) and/or the new scan (e), in key order (bt_view_diff). */
static bool scan_visit(void *ud, void *old_entry, void *new_entry) {
    file_disc *d = ud;
    entry *p = old_entry, *e = new_entry;
    if (!e) {
        if (p->live && !d->closing && d->w.on_delete) d->w.on_delete(d->wud, p->key);
    } else if (!p) {
        if (!e->unread) evaluate(d, NULL, e); /* unread and unknown: not seen yet */
    } else if (e->unread) {
        /* listed but unreadable: the key is still there, so the previous view stands */
        e->text = p->text;
        p->text = NULL;
        e->len = p->len;
        e->too_large = p->too_large;
        e->live = p->live;
        e->bad = p->bad;
        e->unread = false;
    } else {
        evaluate(d, p, e);
    }
    return true; /* the snapshot is replaced whole even when a callback closed the handle */
}

static void scan_done(uv_work_t *req, int status) {
    file_disc *d = req->data;
    (void)status; /* never cancelled */
    entry *nv = d->scan_v;
    size_t nn = d->scan_n;
    d->scan_v = NULL;
    d->scan_n = d->scan_cap = 0;

    if (d->closing) {
        free_entries(nv, nn);
    } else if (d->scan_err) {
        /* Keep the previous snapshot: a failed listing says nothing about the keys. */
        if (d->scan_err != d->last_scan_err)
            BT_WARN("discovery(file): cannot scan %s: %s", d->dir, strerror(d->scan_err));
        d->last_scan_err = d->scan_err;
        free_entries(nv, nn);
    } else {
        d->last_scan_err = 0;
        d->scanned = true;
        if (d->scan_truncated && !d->warned_cap) {
            BT_WARN("discovery(file): more than %d keys under %s; the rest are ignored", FILE_MAX_KEYS, d->dir);
            d->warned_cap = true;
        }
        if (d->scan_expired) BT_INFO("discovery(file): removed %zu expired key(s) from %s", d->scan_expired, d->dir);
        if (d->scan_read_err && d->scan_read_err != d->last_read_err)
            BT_WARN("discovery(file): cannot read %zu key(s) in %s (%s: %s); keeping their last known values "
                    "until they can be read",
                    d->scan_unread, d->dir, d->scan_read_key, strerror(d->scan_read_err));
        else if (!d->scan_read_err && d->last_read_err)
            BT_INFO("discovery(file): every key in %s can be read again", d->dir);
        d->last_read_err = d->scan_read_err;
        /* Both snapshots are sorted by key: one merge pass finds additions, changes, removals. */
        entry *pv = d->snap;
        size_t pn = d->nsnap;
        bt_view_diff(pv, pn, nv, nn, sizeof *nv, scan_visit, d);
        /* Keys never read stay out of the snapshot: the next scan that reads them reports them. */
        size_t kept = 0;
        for (size_t k = 0; k < nn; k++) {
            if (nv[k].unread) {
                free(nv[k].key);
                free(nv[k].text);
            } else {
                nv[kept++] = nv[k];
            }
        }
        free_entries(pv, pn);
        d->snap = nv;
        d->nsnap = kept;
    }
    d->scan_busy = false;
    if (d->closing) {
        maybe_finish_close(d);
    } else if (d->scan_again) {
        d->scan_again = false;
        request_scan(d);
    }
}

/* Starts a scan now, or marks one to run right after the one in flight. */
static void request_scan(file_disc *d) {
    if (!d->watching || d->closing) return;
    if (d->scan_busy) {
        d->scan_again = true;
        return;
    }
    d->scan_req.data = d;
    int rc = uv_queue_work(d->loop, &d->scan_req, scan_work, scan_done);
    if (rc != 0) {
        BT_ERROR("discovery(file): uv_queue_work: %s", uv_strerror(rc));
        return; /* the periodic timer tries again */
    }
    d->scan_busy = true;
}

static void on_scan_timer(uv_timer_t *t) { request_scan(t->data); }

static void on_fs_event(uv_fs_event_t *h, const char *filename, int events, int status) {
    file_disc *d = h->data;
    (void)events;
    if (status < 0) {
        if (!d->warned_fs_event)
            BT_WARN("discovery(file): watching %s: %s; relying on the 1 s rescan", d->dir, uv_strerror(status));
        d->warned_fs_event = true;
    }
    /* Temp files come and go on every write; the rename that follows names the real key. */
    if (filename && filename[0] == '.') return;
    request_scan(d);
}

static bt_status file_watch(bt_discovery *base, const char *prefix, const bt_discovery_watcher *w, void *ud) {
    file_disc *d = (file_disc *)base;
    if (d->closing || d->watching) return BT_ERR_INVALID;
    d->prefix = xstrdup(prefix);
    if (!d->prefix) return BT_ERR_NOMEM;
    d->w = *w;
    d->wud = ud;
    d->watching = true;
    int rc = uv_fs_event_start(&d->fs_event, on_fs_event, d->dir, 0);
    if (rc != 0) {
        BT_WARN("discovery(file): cannot watch %s: %s; relying on the 1 s rescan", d->dir, uv_strerror(rc));
        d->warned_fs_event = true;
    }
    uv_timer_start(&d->scan_timer, on_scan_timer, FILE_SCAN_INTERVAL_MS, FILE_SCAN_INTERVAL_MS);
    request_scan(d); /* the first snapshot arrives from its after-work callback, not from here */
    return BT_OK;
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

static void free_disc(file_disc *d) {
    bt_keyset_free(&d->owned);
    free_ops(&d->pend);
    free_entries(d->snap, d->nsnap);
    free(d->prefix);
    free(d->dir);
    free(d);
}

static void on_handles_closed(void *arg) {
    file_disc *d = arg;
    void (*done)(void *) = d->done;
    void *ud = d->done_ud;
    free_disc(d);
    if (done) done(ud);
}

/* Closes the handles once no thread-pool request can still touch `d`. */
static void maybe_finish_close(file_disc *d) {
    if (!d->closing || d->handles_closing) return;
    if (d->op_busy || !STAILQ_EMPTY(&d->pend) || d->scan_busy) return;
    d->handles_closing = true;
    bt_closer_init(&d->closer, on_handles_closed, d);
    bt_closer_close(&d->closer, (uv_handle_t *)&d->refresh_timer);
    bt_closer_close(&d->closer, (uv_handle_t *)&d->scan_timer);
    bt_closer_close(&d->closer, (uv_handle_t *)&d->fs_event);
    bt_closer_seal(&d->closer);
}

static void file_close(bt_discovery *base, void (*done)(void *ud), void *ud) {
    file_disc *d = (file_disc *)base;
    if (d->closing) return;
    d->closing = true;
    d->done = done;
    d->done_ud = ud;
    uv_timer_stop(&d->refresh_timer);
    uv_timer_stop(&d->scan_timer);
    uv_fs_event_stop(&d->fs_event);
    /* Our keys go now rather than after the TTL: watchers stop routing to us at once. */
    bt_owned_key *o;
    BT_KEYSET_FOREACH(o, &d->owned) {
        char path[PATH_MAX];
        drop_pending_writes(d, o->key);
        if (key_path(d, o->key, path, sizeof path) != BT_OK || enqueue(d, OP_UNLINK, o->key, path, NULL, 0) != BT_OK)
            BT_WARN("discovery(file): out of memory removing %s; it expires after the TTL", o->key);
    }
    bt_keyset_free(&d->owned);
    maybe_finish_close(d); /* never completes here: handle close callbacks run on a later turn */
}

static void file_stats(const bt_discovery *base, bt_discovery_stats *out) {
    const file_disc *d = (const file_disc *)base;
    out->watching = d->watching && d->scanned && !d->last_scan_err;
    out->registered = !d->write_failing;
    out->reregistrations = d->rewrites;
}

static const bt_discovery_ops file_ops = {
    .name = "file",
    .put = file_put,
    .del = file_del,
    .watch = file_watch,
    .close = file_close,
    .stats = file_stats,
};

bt_status bt_discovery_file_create(uv_loop_t *loop, const bt_discovery_config *cfg, bt_discovery **out, char *err,
                                   size_t errlen) {
    bt_discovery_config def;
    bt_discovery_config_default(&def);
    const char *dir = (cfg->dir && *cfg->dir) ? cfg->dir : def.dir;
    if (cfg->ttl_s < 1 || cfg->ttl_s > 86400) {
        snprintf(err, errlen, "discovery ttl must be between 1 and 86400 seconds, got %lld", (long long)cfg->ttl_s);
        return BT_ERR_INVALID;
    }
    size_t dlen = strlen(dir);
    while (dlen > 1 && dir[dlen - 1] == '/') dlen--;
    if (dlen + 1 + BT_DISCOVERY_FILE_NAME_MAX >= PATH_MAX) {
        snprintf(err, errlen, "discovery directory path is too long: %.100s…", dir);
        return BT_ERR_INVALID;
    }
    file_disc *d = calloc(1, sizeof *d);
    if (!d || !(d->dir = xstrndup(dir, dlen))) {
        free(d);
        snprintf(err, errlen, "out of memory");
        return BT_ERR_NOMEM;
    }
    bt_keyset_init(&d->owned);
    STAILQ_INIT(&d->pend);
    STAILQ_INIT(&d->op_running);
    /* Done synchronously, once, at start-up: a local mkdir is not worth an asynchronous dance, and
     * inotify needs the directory to exist before the first watch. */
    int e = mkdir_p(d->dir);
    if (e != 0) {
        snprintf(err, errlen, "cannot create discovery directory %s: %s", d->dir, strerror(e));
        free(d->dir);
        free(d);
        return BT_ERR_IO;
    }
    /* A frontend (or `baton run`) that cannot list the directory would run and never see a
     * worker: a start-up error instead. Checked for every process, since none that shares the
     * directory is expected to be unable to read it; writing is checked by the first put. */
    if (access(d->dir, R_OK | X_OK) != 0) {
        e = errno;
        snprintf(err, errlen, "cannot read discovery directory %s: %s (choose another --discovery-dir / DYN_FILE_KV, "
                 "or let this user read it)", d->dir, strerror(e));
        free(d->dir);
        free(d);
        return BT_ERR_IO;
    }
    d->base.ops = &file_ops;
    d->loop = loop;
    d->ttl_s = cfg->ttl_s;
    uint64_t ttl_ms = (uint64_t)cfg->ttl_s * 1000;
    /* Dynamo's max(ttl/3, 1 s), capped at ttl/2 so that a 1 s TTL still gets two refreshes per TTL. */
    d->refresh_ms = ttl_ms / 3 > 1000 ? ttl_ms / 3 : 1000;
    if (d->refresh_ms > ttl_ms / 2) d->refresh_ms = ttl_ms / 2;
    uv_timer_init(loop, &d->refresh_timer);
    uv_timer_init(loop, &d->scan_timer);
    uv_fs_event_init(loop, &d->fs_event);
    d->refresh_timer.data = d->scan_timer.data = d->fs_event.data = d;
    BT_DEBUG("discovery(file): store %s, ttl %llds, refresh every %llu ms", d->dir, (long long)d->ttl_s,
             (unsigned long long)d->refresh_ms);
    *out = &d->base;
    return BT_OK;
}
