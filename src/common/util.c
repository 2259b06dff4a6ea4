/* util.c — see util.h. */
#include "common/util.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

uint64_t bt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int64_t bt_wall_s(void) { return (int64_t)time(NULL); }

void bt_buf_init(bt_buf *b, size_t cap) {
    b->data = NULL;
    b->len = 0;
    b->alloc = 0;
    b->cap = cap;
    b->err = BT_OK;
}

void bt_buf_free(bt_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->alloc = 0;
    b->err = BT_OK;
}

void bt_buf_reset(bt_buf *b) {
    b->len = 0;
    b->err = BT_OK;
}

void bt_buf_fail(bt_buf *b, bt_status st) {
    if (b->err == BT_OK) b->err = st;
}

void bt_buf_truncate(bt_buf *b, size_t mark) {
    if (mark < b->len) {
        b->len = mark;
        b->data[mark] = '\0';
    }
    b->err = BT_OK;
}

/* Records the first failure (the sticky error) and returns it. */
static bt_status buf_fail(bt_buf *b, bt_status st) {
    if (b->err == BT_OK) b->err = st;
    return b->err;
}

/* Makes room for `extra` more bytes without touching the sticky error. */
static bt_status buf_try_reserve(bt_buf *b, size_t extra) {
    if (extra > b->cap || b->len > b->cap - extra) return BT_ERR_TOO_LARGE;
    size_t need = b->len + extra + 1; /* room for a NUL terminator */
    if (need <= b->alloc) return BT_OK;
    size_t n = b->alloc ? b->alloc : 256;
    while (n < need) n *= 2;
    if (n > b->cap + 1) n = b->cap + 1;
    char *p = realloc(b->data, n);
    if (!p) return BT_ERR_NOMEM;
    b->data = p;
    b->alloc = n;
    return BT_OK;
}

bt_status bt_buf_reserve(bt_buf *b, size_t extra) {
    if (b->err != BT_OK) return b->err;
    bt_status st = buf_try_reserve(b, extra);
    return st == BT_OK ? BT_OK : buf_fail(b, st);
}

bt_status bt_buf_append_grow(bt_buf *b, const void *p, size_t n) {
    bt_status st = bt_buf_reserve(b, n);
    if (st != BT_OK) return st;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return BT_OK;
}

bt_status bt_buf_append_str(bt_buf *b, const char *s) { return bt_buf_append(b, s, strlen(s)); }

void *bt_zalloc(size_t size) {
    void *p = malloc(size);
    /* p made opaque: gcc would otherwise fold the malloc and the memset back into a calloc */
    __asm__("" : "+r"(p));
    if (p) memset(p, 0, size);
    return p;
}

size_t bt_copy_str(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    size_t k = n < cap ? n : cap - 1;
    memcpy(dst, src, k);
    dst[k] = '\0';
    return n;
}

bt_status bt_buf_append_i64(bt_buf *b, int64_t v) {
    char tmp[24]; /* 19 digits and a sign */
    char *p = tmp + sizeof tmp;
    uint64_t u = v < 0 ? 0u - (uint64_t)v : (uint64_t)v; /* INT64_MIN included */
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    return bt_buf_append(b, p, (size_t)(tmp + sizeof tmp - p));
}

char *bt_prom_escape(const char *s, char *out, size_t cap) {
    size_t o = 0;
    for (; *s; s++) {
        const char *e = *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : *s == '\n' ? "\\n" : NULL;
        size_t n = e ? 2 : 1;
        if (o + n >= cap) break;
        if (e) memcpy(out + o, e, 2);
        else out[o] = *s;
        o += n;
    }
    out[o] = '\0';
    return out;
}

bt_status bt_buf_appendf(bt_buf *b, const char *fmt, ...) {
    if (b->err != BT_OK) return b->err;
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return buf_fail(b, BT_ERR_INVALID);
    if ((size_t)n < sizeof tmp) return bt_buf_append(b, tmp, (size_t)n);
    bt_status st = bt_buf_reserve(b, (size_t)n);
    if (st != BT_OK) return st;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return BT_OK;
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if it is invalid. */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

/* Escapes one byte that is not plain printable ASCII (a quote, a backslash, a control character,
 * or the start of a UTF-8 sequence at p[0..left)) into out, which has room for 6 bytes; returns
 * the bytes written and sets *used to the input bytes consumed. */
static size_t json_escape_one(const unsigned char *p, size_t left, char *out, size_t *used) {
    static const char hex[] = "0123456789abcdef";
    unsigned char c = p[0];
    *used = 1;
    switch (c) {
    case '"': out[0] = '\\', out[1] = '"'; return 2;
    case '\\': out[0] = '\\', out[1] = '\\'; return 2;
    case '\n': out[0] = '\\', out[1] = 'n'; return 2;
    case '\r': out[0] = '\\', out[1] = 'r'; return 2;
    case '\t': out[0] = '\\', out[1] = 't'; return 2;
    default: break;
    }
    if (c < 0x20) {
        memcpy(out, "\\u00", 4);
        out[4] = hex[c >> 4], out[5] = hex[c & 15];
        return 6;
    }
    size_t sl = utf8_seq_len(p, left);
    if (sl == 0) {
        memcpy(out, "\xEF\xBF\xBD", 3); /* U+FFFD for an invalid byte */
        return 3;
    }
    memcpy(out, p, sl);
    *used = sl;
    return sl;
}

/* SWAR test of 8 bytes at once: non-zero iff one of them is below 0x20, is '"' or '\\', or has
 * its top bit set, i.e. cannot be copied into a JSON string as it is. Exact (no false positive
 * for the "is there any" question); the byte-wise loop then finds which. */
static inline uint64_t json_needs_escape8(uint64_t x) {
    const uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;
    uint64_t q = x ^ (ones * '"'), bs = x ^ (ones * '\\');
    uint64_t lt20 = (x - ones * 0x20) & ~x;
    uint64_t zq = (q - ones) & ~q, zb = (bs - ones) & ~bs;
    return (lt20 | zq | zb | x) & high;
}

/* Per-token hot path of the frontend: every SSE chunk's text goes through here. The output is
 * written in place into space reserved once per piece of input (worst case 6 output bytes per
 * input byte, so a piece of PIECE bytes never needs a second check), and runs of plain ASCII are
 * found 8 bytes at a time. Near the buffer's cap, where the worst-case reservation would fail
 * although the real output may fit, it falls back to checked appends. */
#define JSON_PIECE 4096u
bt_status bt_buf_append_json_str(bt_buf *b, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    if (b->err != BT_OK) return b->err;
    size_t mark = b->len; /* on failure the string is taken back whole: never half of it */
    if (n == 0) { /* still leaves an allocated, NUL-terminated buffer, as any append does */
        bt_status st = bt_buf_reserve(b, 0);
        if (st == BT_OK) b->data[b->len] = '\0';
        return st;
    }
    while (i < n) {
        size_t piece = n - i < JSON_PIECE ? n - i : JSON_PIECE;
        /* + 3: a UTF-8 sequence starting inside the piece may end up to 3 bytes past it */
        if (buf_try_reserve(b, (piece + 3) * 6) != BT_OK) break; /* not sticky: the slow path may fit */
        size_t stop = i + piece;
        char *o = b->data + b->len;
        while (i < stop) {
            while (i + 8 <= stop) {
                uint64_t x;
                memcpy(&x, p + i, 8);
                if (json_needs_escape8(x)) break;
                memcpy(o, p + i, 8);
                o += 8, i += 8;
            }
            while (i < stop && p[i] >= 0x20 && p[i] < 0x80 && p[i] != '"' && p[i] != '\\') *o++ = (char)p[i++];
            if (i < stop) {
                size_t used;
                o += json_escape_one(p + i, n - i, o, &used);
                i += used;
            }
        }
        b->len = (size_t)(o - b->data);
        b->data[b->len] = '\0';
    }
    /* the slow path: checked appends, one escape or run at a time */
    while (i < n) {
        size_t j = i;
        while (j < n && p[j] >= 0x20 && p[j] < 0x80 && p[j] != '"' && p[j] != '\\') j++;
        if (j > i) {
            bt_status st = bt_buf_append(b, s + i, j - i);
            if (st != BT_OK) goto fail;
            i = j;
            continue;
        }
        char esc[8];
        size_t used, el = json_escape_one(p + i, n - i, esc, &used);
        bt_status st = bt_buf_append(b, esc, el);
        if (st != BT_OK) goto fail;
        i += used;
    }
    return BT_OK;
fail:
    b->len = mark;
    if (b->data) b->data[mark] = '\0';
    return b->err;
}

void bt_buf_consume(bt_buf *b, size_t n) {
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
    b->data[b->len] = '\0';
}

char *bt_buf_steal(bt_buf *b, size_t *len) {
    char *p = b->data;
    if (len) *len = b->len;
    b->data = NULL;
    b->len = b->alloc = 0;
    b->err = BT_OK;
    return p;
}

/* Random bytes come from the kernel's CSPRNG (getrandom), drawn RANDOM_POOL bytes at a time into a
 * per-thread pool rather than one syscall per value: a request id and a seed took three getrandom
 * calls per request on the frontend's hot path, now one per ~10 requests. The bytes are the
 * kernel's output, unmodified and each handed out once, so an id made from them is exactly as
 * unguessable as one drawn by its own syscall (request ids, stream ids and instance ids must not be
 * predictable from ids seen before: nothing here derives one value from another). A consumed byte
 * is zeroed at once, so a later memory disclosure does not reveal ids already issued. The pool is
 * per thread (no lock; each event loop has its own) and emptied in a forked child, which must not
 * hand out the bytes its parent will also use. */
#define RANDOM_POOL 256 /* getrandom returns up to 256 bytes whole, never a short read (random(7)) */
static _Thread_local uint8_t rnd_pool[RANDOM_POOL];
static _Thread_local size_t rnd_pos = RANDOM_POOL; /* next unused byte; RANDOM_POOL = empty */
static pthread_once_t rnd_once = PTHREAD_ONCE_INIT;

static void rnd_forget(void) { /* in the child of a fork, on the forking thread (the only one) */
    memset(rnd_pool, 0, sizeof rnd_pool);
    rnd_pos = RANDOM_POOL;
}

static void rnd_init(void) { (void)pthread_atfork(NULL, NULL, rnd_forget); }

/* Fills out[0..n) from the kernel; false if it could not (no entropy source at all). */
static bool rnd_os(void *out, size_t n) {
    uint8_t *p = out;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        p += got;
        n -= (size_t)got;
    }
    return true;
}

static bool rnd_bytes(void *out, size_t n) {
    if (n > RANDOM_POOL / 4) return rnd_os(out, n); /* large draws go straight to the kernel */
    (void)pthread_once(&rnd_once, rnd_init);
    if (RANDOM_POOL - rnd_pos < n) {
        if (!rnd_os(rnd_pool, RANDOM_POOL)) return false;
        rnd_pos = 0;
    }
    memcpy(out, rnd_pool + rnd_pos, n);
    memset(rnd_pool + rnd_pos, 0, n);
    rnd_pos += n;
    return true;
}

bool bt_random_bytes(void *out, size_t n) { return rnd_bytes(out, n); }

uint64_t bt_random64(void) {
    uint64_t v = 0;
    if (!rnd_bytes(&v, sizeof v)) v = bt_mix64(bt_now_ns() ^ (uint64_t)clock());
    return v;
}

void bt_uuid4(char out[37]) {
    uint8_t r[16];
    if (!rnd_bytes(r, sizeof r)) {
        uint64_t a = bt_random64(), c = bt_random64();
        memcpy(r, &a, 8);
        memcpy(r + 8, &c, 8);
    }
    r[6] = (uint8_t)((r[6] & 0x0F) | 0x40);
    r[8] = (uint8_t)((r[8] & 0x3F) | 0x80);
    /* 8-4-4-4-12 lowercase hex by hand: snprintf with 16 conversions was ~6,000 instructions, one
     * call per request */
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) *p++ = '-';
        *p++ = hex[r[i] >> 4];
        *p++ = hex[r[i] & 15];
    }
    *p = '\0';
}

bool bt_parse_i64(const char *s, int64_t min, int64_t max, int64_t *out) {
    if (!s || !*s) return false;
    if (*s != '-' && !(*s >= '0' && *s <= '9')) return false; /* strtoll also skips blanks, takes a '+' */
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max) return false;
    *out = v;
    return true;
}

bool bt_parse_double(const char *s, double min, double max, double *out) {
    if (!s || !*s) return false;
    /* decimal only: strtod also reads hex ("0x10" is 16), "inf", "nan" and leading blanks, none
     * of which a person means by a number of seconds or bytes */
    if (s[strspn(s, "0123456789.eE+-")] != '\0') return false;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < min || v > max) return false;
    *out = v;
    return true;
}

/* The kind of a file that is not a regular one, for bt_open_regular's reason */
static const char *file_kind(mode_t m) {
    return S_ISFIFO(m)   ? "a FIFO"
           : S_ISCHR(m)  ? "a character device"
           : S_ISBLK(m)  ? "a block device"
           : S_ISSOCK(m) ? "a socket"
                         : "not a file";
}

int bt_open_regular(const char *path, char *why, size_t whylen) {
    struct stat st;
    int fd = -1;
    if (stat(path, &st) != 0) goto fail_errno;
    if (S_ISDIR(st.st_mode)) {
        errno = EISDIR;
        goto fail_errno;
    }
    if (!S_ISREG(st.st_mode)) goto fail_kind;
    fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0) goto fail_errno;
    if (S_ISDIR(st.st_mode)) {
        errno = EISDIR;
        goto fail_errno;
    }
    if (!S_ISREG(st.st_mode)) goto fail_kind;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) goto fail_errno;
    return fd;
fail_errno:
    snprintf(why, whylen, "%s", strerror(errno));
    goto fail;
fail_kind:
    snprintf(why, whylen, "%s, not a regular file", file_kind(st.st_mode));
fail:
    if (fd >= 0) close(fd);
    return -1;
}

bool bt_check_regular(const char *path, char *why, size_t whylen) {
    int fd = bt_open_regular(path, why, whylen);
    if (fd < 0) return false;
    close(fd);
    return true;
}

ssize_t bt_read_full(int fd, void *buf, size_t cap) {
    size_t n = 0;
    while (n < cap) {
        ssize_t got = read(fd, (char *)buf + n, cap - n);
        if (got > 0) n += (size_t)got;
        else if (got == 0) break;
        else if (errno != EINTR) return -1;
    }
    return (ssize_t)n;
}

bool bt_list_next(const char **pos, const char **item, size_t *len) {
    const char *p = *pos;
    if (!p || !*p) return false;
    const char *e = p;
    while (*e && *e != ',') e++;
    *pos = *e ? e + 1 : e;
    while (p < e && (*p == ' ' || *p == '\t')) p++;
    while (e > p && (e[-1] == ' ' || e[-1] == '\t')) e--;
    *item = p;
    *len = (size_t)(e - p);
    return true;
}

bool bt_bearer_token_ok(const char *k, size_t len) {
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)k[i] < 0x21 || (unsigned char)k[i] > 0x7e) return false;
    return len > 0;
}

size_t bt_text_trim_end(const char *s, size_t n) {
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n')) n--;
    return n;
}

bt_status bt_read_text_file(const char *path, size_t max, char **out, size_t *len, char *why, size_t whylen) {
    bt_status st = BT_ERR_IO;
    char *buf = NULL;
    ssize_t got = -1;
    *out = NULL;
    *len = 0;
    int fd = bt_open_regular(path, why, whylen);
    if (fd < 0) return BT_ERR_IO;
    /* room for max bytes of text and the blanks and line ends after it; one byte past both tells a
     * file over them from one that fits, without reading the rest */
    size_t room = max + BT_TEXT_TAIL_MAX;
    if (!(buf = malloc(room + 1))) {
        st = BT_ERR_NOMEM;
        snprintf(why, whylen, "out of memory");
        goto out;
    }
    got = bt_read_full(fd, buf, room + 1);
    if (got < 0) {
        snprintf(why, whylen, "%s", strerror(errno));
        goto out;
    }
    if (bt_text_trim_end(buf, (size_t)got) > max) {
        st = BT_ERR_TOO_LARGE;
        snprintf(why, whylen, "is over %zu bytes", max);
        goto out;
    }
    if ((size_t)got > room) { /* what was read ends in blanks, but what follows it was not read */
        st = BT_ERR_TOO_LARGE;
        snprintf(why, whylen, "is over %zu bytes, or ends in over %d bytes of blanks and line ends", max,
                 BT_TEXT_TAIL_MAX);
        goto out;
    }
    if (memchr(buf, '\0', (size_t)got)) {
        st = BT_ERR_INVALID;
        snprintf(why, whylen, "holds a NUL byte");
        goto out;
    }
    buf[got] = '\0';
    *out = buf;
    *len = (size_t)got;
    buf = NULL;
    st = BT_OK;
out:
    close(fd);
    if (buf) {
        OPENSSL_cleanse(buf, got > 0 ? (size_t)got : 0); /* what was read of a refused file may be a secret */
        free(buf);
    }
    return st;
}

bt_status bt_load_secret(const char *file, const char *value, char **out, char *err, size_t errlen) {
    *out = NULL;
    if (file && *file) {
        char why[128];
        size_t n;
        /* the newline ending the line of a secret of the largest size (`openssl rand -hex 2048 >
         * file`), and any blank lines or blanks after it, are not part of it nor counted */
        bt_status st = bt_read_text_file(file, BT_SECRET_FILE_MAX, out, &n, why, sizeof why);
        if (st == BT_ERR_INVALID || st == BT_ERR_TOO_LARGE) {
            /* refused, not cut to the cap: a secret cut short is one no DYN_RPC_SECRET holding the
             * whole could match */
            snprintf(err, errlen, "the secret file %s %s", file, why);
            return st;
        }
        if (st != BT_OK) {
            snprintf(err, errlen, "cannot read the secret file %s (DYN_RPC_SECRET_FILE, --rpc-secret-file): %s", file,
                     why);
            return st;
        }
        size_t text = bt_text_trim_end(*out, n);
        (*out)[text] = '\0';
        if (text == 0) {
            free(*out);
            *out = NULL;
            snprintf(err, errlen, "the secret file %s is empty", file);
            return BT_ERR_INVALID;
        }
        return BT_OK;
    }
    if (!value || !*value) return BT_OK;
    *out = strdup(value);
    return *out ? BT_OK : BT_ERR_NOMEM;
}

bool bt_parse_bool(const char *s, bool *out) {
    if (!s) return false;
    if (!strcasecmp(s, "1") || !strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcasecmp(s, "on"))
        return *out = true, true;
    if (!strcasecmp(s, "0") || !strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcasecmp(s, "off"))
        return *out = false, true;
    return false;
}

bt_status bt_u32_reserve(uint32_t **a, size_t *cap, size_t need) {
    if (need <= *cap) return BT_OK;
    size_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    uint32_t *p = realloc(*a, n * sizeof *p);
    if (!p) return BT_ERR_NOMEM;
    *a = p;
    *cap = n;
    return BT_OK;
}

long bt_cpus_usable(void) {
    cpu_set_t cpus;
    long n = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? n : 1;
}
