/* linelog.c — see linelog.h. */
#include "common/linelog.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "common/log.h"
#include "common/util.h"

#define REOPEN_CHECK_NS 1000000000ull /* how often the writer looks for a rotated file */
/* How long a line may wait for the writer: it wakes this often, or when the buffer is half full,
 * and writes everything queued with one write(2). Woken for every line instead, at thousands of
 * requests a second, it made a wake-up and a write per line: the access log's cost was 1.5x the
 * frontend's CPU per short request (bench/access_log.py). */
#define FLUSH_NS 100000000ull
#define CLOSE_WAIT_NS 3000000000ull /* how long a close waits for the last lines to be written */

struct bt_linelog {
    uv_mutex_t mu;
    uv_cond_t cv;
    char *buf;   /* the lines queued (under mu) */
    size_t len, cap;
    char *spare; /* the writer's: the lines being written, swapped with buf */
    bool stop;   /* under mu */
    bool done;   /* under mu: the writer has ended (close waits for it, for a while) */
    uv_cond_t done_cv;
    uv_thread_t th;
    int fd;        /* the writer's only */
    bool cut;      /* the writer's: the file ends inside a line (a write failed part-way) */
    bool is_stdout;
    char *path;
    dev_t dev; /* of the file held, to see a rename */
    ino_t ino;
    atomic_uint_fast64_t dropped, written;
};

/* A log whose writer was stuck at close (bt_linelog_close): its memory stays the writer's, kept
 * reachable here (volatile: a store never read back would be dropped, and a leak checker would
 * report the memory the writer still uses). */
static bt_linelog *volatile abandoned;

static int open_append(const char *path) { return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640); }

static size_t count_lines(const char *p, size_t n) {
    size_t k = 0;
    for (const char *e = p + n; (p = memchr(p, '\n', (size_t)(e - p))) != NULL; p++) k++;
    return k;
}

#define WRITABLE_WAIT_MS 5000 /* a non-blocking output (an inherited stdout) that takes nothing this long fails */

/* Writes n bytes; returns how many were written, fewer on an error (a full disk, a closed pipe,
 * errno set). A non-blocking output (a standard output inherited with O_NONBLOCK, which the dup
 * shares) is waited for, a while. */
static size_t write_all(int fd, const char *p, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, p + done, n - done);
        if (w >= 0) {
            done += (size_t)w;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int r = poll(&pf, 1, WRITABLE_WAIT_MS);
            if (r == 0) errno = EAGAIN;
            if (r <= 0 && errno != EINTR) return done;
        } else if (errno != EINTR) {
            return done;
        }
    }
    return done;
}

/* Writes a batch of whole lines. A write that fails part-way leaves the file inside a line: the
 * next batch starts with a line feed, so that the cut line stays alone (malformed, but no good
 * line is joined to it). Lines count as written when their line feed was. */
static void write_batch(bt_linelog *l, const char *p, size_t n) {
    size_t lines = count_lines(p, n);
    size_t w = 0;
    if (!l->cut || write_all(l->fd, "\n", 1) == 1) {
        l->cut = false;
        w = write_all(l->fd, p, n);
    }
    size_t whole = count_lines(p, w);
    atomic_fetch_add(&l->written, whole);
    if (w == n) return;
    int e = errno;
    if (w > 0 && p[w - 1] != '\n') l->cut = true;
    atomic_fetch_add(&l->dropped, lines - whole);
    static bt_log_limit lim; /* the writer thread's only */
    unsigned unsaid;
    if (bt_log_limit_take(&lim, bt_now_ms(), 1, &unsaid))
        BT_WARN("access log: writing to %s failed (%s); %zu lines lost", l->is_stdout ? "the standard output" : l->path,
                strerror(e), lines - whole);
}

/* The path names another file than the one held (rotated: renamed, then a new one made, or not
 * yet): the path is opened again. An open that fails keeps the old file and is tried again at the
 * next check. */
static void reopen_if_moved(bt_linelog *l) {
    struct stat st;
    if (stat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino) return;
    int fd = open_append(l->path);
    if (fd < 0 || fstat(fd, &st) != 0) {
        static bt_log_limit lim; /* the writer thread's only */
        unsigned unsaid;
        if (bt_log_limit_take(&lim, bt_now_ms(), 1, &unsaid))
            BT_WARN("access log: %s was moved or removed and cannot be opened again (%s); still writing to the "
                    "file it was",
                    l->path, strerror(errno));
        if (fd >= 0) close(fd);
        return;
    }
    close(l->fd);
    l->fd = fd;
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    BT_INFO("access log: %s opened again (the file it had was moved or removed)", l->path);
}

static void writer(void *arg) {
    bt_linelog *l = arg;
    uint64_t next_check = uv_hrtime() + REOPEN_CHECK_NS;
    uv_mutex_lock(&l->mu);
    for (;;) {
        /* a pause of FLUSH_NS gathers the lines made meanwhile; a half-full buffer or the close
         * ends it early (a spurious wake-up only writes sooner) */
        if (!l->stop && l->len < l->cap / 2) (void)uv_cond_timedwait(&l->cv, &l->mu, FLUSH_NS);
        if (!l->len && l->stop) break;
        char *p = l->buf;
        size_t n = l->len;
        l->buf = l->spare;
        l->spare = p;
        l->len = 0;
        uv_mutex_unlock(&l->mu);
        if (n) write_batch(l, p, n);
        if (!l->is_stdout && uv_hrtime() >= next_check) {
            reopen_if_moved(l);
            next_check = uv_hrtime() + REOPEN_CHECK_NS;
        }
        uv_mutex_lock(&l->mu);
    }
    l->done = true;
    uv_cond_signal(&l->done_cv);
    uv_mutex_unlock(&l->mu);
}

bt_linelog *bt_linelog_open(const char *path, size_t cap, char *err, size_t errlen) {
    if (cap < 4096) cap = 4096;
    bt_linelog *l = calloc(1, sizeof *l);
    if (!l || !(l->buf = malloc(cap)) || !(l->spare = malloc(cap)) || !(l->path = strdup(path))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    l->fd = -1;
    l->cap = cap;
    l->is_stdout = strcmp(path, "-") == 0;
    if (l->is_stdout) {
        l->fd = dup(STDOUT_FILENO);
        if (l->fd < 0) {
            snprintf(err, errlen, "cannot use the standard output: %s", strerror(errno));
            goto fail;
        }
    } else {
        struct stat st;
        l->fd = open_append(path);
        if (l->fd < 0 || fstat(l->fd, &st) != 0) {
            snprintf(err, errlen, "cannot open %s for appending: %s", path, strerror(errno));
            goto fail;
        }
        if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode) && !S_ISCHR(st.st_mode)) {
            snprintf(err, errlen, "%s is not a file", path);
            goto fail;
        }
        l->dev = st.st_dev;
        l->ino = st.st_ino;
    }
    if (uv_mutex_init(&l->mu) != 0) {
        snprintf(err, errlen, "cannot make a mutex");
        goto fail;
    }
    if (uv_cond_init(&l->cv) != 0) {
        uv_mutex_destroy(&l->mu);
        snprintf(err, errlen, "cannot make a condition variable");
        goto fail;
    }
    if (uv_cond_init(&l->done_cv) != 0) {
        uv_cond_destroy(&l->cv);
        uv_mutex_destroy(&l->mu);
        snprintf(err, errlen, "cannot make a condition variable");
        goto fail;
    }
    if (uv_thread_create(&l->th, writer, l) != 0) {
        uv_cond_destroy(&l->done_cv);
        uv_cond_destroy(&l->cv);
        uv_mutex_destroy(&l->mu);
        snprintf(err, errlen, "cannot start the access log's writer thread");
        goto fail;
    }
    return l;
fail:
    if (l) {
        if (l->fd >= 0) close(l->fd);
        free(l->buf);
        free(l->spare);
        free(l->path);
        free(l);
    }
    return NULL;
}

bool bt_linelog_put(bt_linelog *l, const char *line, size_t len) {
    uv_mutex_lock(&l->mu);
    if (len > l->cap - l->len) {
        uv_mutex_unlock(&l->mu);
        atomic_fetch_add(&l->dropped, 1);
        return false;
    }
    bool half = l->len < l->cap / 2 && l->len + len >= l->cap / 2;
    memcpy(l->buf + l->len, line, len);
    l->len += len;
    uv_mutex_unlock(&l->mu);
    /* the writer wakes on its own every FLUSH_NS; only a buffer filling fast calls it sooner */
    if (half) uv_cond_signal(&l->cv);
    return true;
}

void bt_linelog_drop(bt_linelog *l) { atomic_fetch_add(&l->dropped, 1); }

uint64_t bt_linelog_dropped(const bt_linelog *l) { return atomic_load(&((bt_linelog *)l)->dropped); }
uint64_t bt_linelog_written(const bt_linelog *l) { return atomic_load(&((bt_linelog *)l)->written); }

void bt_linelog_close(bt_linelog *l) {
    if (!l) return;
    uv_mutex_lock(&l->mu);
    l->stop = true;
    uv_cond_signal(&l->cv);
    /* the writer ends once what is queued is written; an output that takes nothing (a pipe no one
     * reads, a hung network file system) must not keep the process from exiting */
    uint64_t deadline = uv_hrtime() + CLOSE_WAIT_NS;
    while (!l->done && uv_hrtime() < deadline) (void)uv_cond_timedwait(&l->done_cv, &l->mu, deadline - uv_hrtime());
    bool done = l->done;
    uv_mutex_unlock(&l->mu);
    if (!done) {
        /* left to the process's exit, with its memory: it may still be inside write(2) */
        BT_WARN("access log: %s takes no more lines (a write has waited over %llu s); the lines not yet written "
                "are lost",
                l->is_stdout ? "the standard output" : l->path, (unsigned long long)(CLOSE_WAIT_NS / 1000000000ull));
        (void)pthread_detach(l->th);
        abandoned = l; /* still the writer's: kept reachable, never freed */
        return;
    }
    uv_thread_join(&l->th);
    uv_cond_destroy(&l->done_cv);
    uv_cond_destroy(&l->cv);
    uv_mutex_destroy(&l->mu);
    close(l->fd);
    free(l->buf);
    free(l->spare);
    free(l->path);
    free(l);
}
