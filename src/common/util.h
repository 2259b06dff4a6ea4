/* util.h — small shared helpers: clocks, a capped growable byte buffer, ids, number parsing. */
#ifndef BATON_UTIL_H
#define BATON_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "common/status.h"

/* Monotonic clock in nanoseconds / microseconds / milliseconds. */
uint64_t bt_now_ns(void);
static inline uint64_t bt_now_us(void) { return bt_now_ns() / 1000u; }
static inline uint64_t bt_now_ms(void) { return bt_now_ns() / 1000000u; }
/* Wall clock, seconds since the epoch. */
int64_t bt_wall_s(void);

/* A growable byte buffer with a hard cap. Appends beyond `cap` fail with BT_ERR_TOO_LARGE: a peer
 * can never make it grow without bound.
 *
 * Errors are sticky: the first failed append (over the cap, out of memory) is kept in `err`, the
 * bytes it would have added are not there (an escaped JSON string is added whole or not at all),
 * and every later append fails at once with the same status until bt_buf_reset (or _free,
 * _steal). So a caller that builds a message from many appends checks once, at the end, with
 * bt_buf_status, and can never send half of it. */
typedef struct {
    char *data;
    size_t len;
    size_t alloc;
    size_t cap;
    bt_status err; /* the first failure since the last reset, BT_OK if none */
} bt_buf;

void bt_buf_init(bt_buf *b, size_t cap);
void bt_buf_free(bt_buf *b);
/* Empties the buffer and clears its error. */
void bt_buf_reset(bt_buf *b);
/* BT_OK, or the first append failure since the last reset. */
static inline bt_status bt_buf_status(const bt_buf *b) { return b->err; }
/* Poisons the buffer with st (kept only if it holds no error yet), as a failed append would: for
 * a builder whose failure happened outside the buffer, so that the caller's one check sees it. */
void bt_buf_fail(bt_buf *b, bt_status st);
/* Undoes every append since len was `mark` (a length read before them) and clears the error:
 * the caller drops a message that did not fit and keeps what came before it. */
void bt_buf_truncate(bt_buf *b, size_t mark);
bt_status bt_buf_reserve(bt_buf *b, size_t extra);
/* bt_buf_append when the bytes do not fit the storage as it is (or the buffer holds an error). */
bt_status bt_buf_append_grow(bt_buf *b, const void *p, size_t n);
/* Appends n bytes. Inline for the usual case, room already there (an SSE event is a handful of
 * appends per token into a reused buffer): a compare and a copy, no call; the rest (growth, the
 * cap, the sticky error) in bt_buf_append_grow, with the same outcome either way. */
static inline bt_status bt_buf_append(bt_buf *b, const void *p, size_t n) {
    /* len + n <= cap and len + n + 1 <= alloc, written so that nothing can wrap */
    if (b->err == BT_OK && b->len <= b->cap && n <= b->cap - b->len && b->len < b->alloc && n < b->alloc - b->len) {
        if (n) memcpy(b->data + b->len, p, n); /* p may be NULL when n is 0 (memcpy's contract) */
        b->len += n;
        b->data[b->len] = '\0';
        return BT_OK;
    }
    return bt_buf_append_grow(b, p, n);
}
bt_status bt_buf_appendf(bt_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bt_status bt_buf_append_str(bt_buf *b, const char *s);
/* size zeroed bytes, as calloc(1, size) gives, but taken through malloc: glibc's calloc skips the
 * thread cache and takes a chunk from the bins (or the top of the heap, after consolidating the
 * fast bins), cold memory, where malloc first reuses a chunk of the size freed lately, likely
 * still in the cache. For the small objects made at every request (docs/benchmarks.md, a
 * seventh round). NULL when out of memory. */
void *bt_zalloc(size_t size);
/* Copies src into dst[cap] (cap > 0) as snprintf(dst, cap, "%s", src) would: truncated to cap - 1
 * bytes, always terminated; returns strlen(src). Without printf's format parsing, for the strings
 * copied once or twice per request. */
size_t bt_copy_str(char *dst, size_t cap, const char *src);
/* Appends v in decimal, as printf's "%" PRId64 would, without printf (a hot path's numbers). */
bt_status bt_buf_append_i64(bt_buf *b, int64_t v);
/* Appends `s[0..n)` as the content of a JSON string (escaped, without quotes). Invalid UTF-8 bytes
 * are replaced with U+FFFD so the output is always valid JSON. */
bt_status bt_buf_append_json_str(bt_buf *b, const char *s, size_t n);
/* Removes the first n bytes. */
void bt_buf_consume(bt_buf *b, size_t n);
/* Hands the storage to the caller (who frees it with free()) and empties the buffer. */
char *bt_buf_steal(bt_buf *b, size_t *len);

/* Grows the array *a of *cap token ids (doubling, from 16) so that it holds at least `need`;
 * BT_ERR_NOMEM leaves it as it was. Callers bound `need`. */
bt_status bt_u32_reserve(uint32_t **a, size_t *cap, size_t need);

/* Writes s into out (cap bytes, cap >= 1) as a Prometheus label value: backslash, double quote
 * and line feed escaped as the text exposition format requires. Output that would not fit is cut
 * before the escape or byte that overflows (never in the middle of an escape); always
 * NUL-terminated. 2 * strlen(s) + 1 bytes always suffice. Returns out. */
char *bt_prom_escape(const char *s, char *out, size_t cap);

/* 64-bit mixing (splitmix64 finaliser): a fast, well-distributed pure function. */
static inline uint64_t bt_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* A random 64-bit value from the OS (getrandom, drawn through a per-thread pool: util.c); used for
 * instance ids and request ids. */
uint64_t bt_random64(void);
/* n random bytes from the OS (getrandom), drawn through the same per-thread pool (each byte used
 * once); false if the OS gave none (no weaker fallback here: the caller chooses one). */
bool bt_random_bytes(void *out, size_t n);
/* Writes a random UUID v4 string (37 bytes with NUL) into out. */
void bt_uuid4(char out[37]);

/* Strict number parsing: the whole string must be a number in range, in decimal (bt_parse_i64:
 * an optional "-" and digits). */
bool bt_parse_i64(const char *s, int64_t min, int64_t max, int64_t *out);
/* bt_parse_double reads decimal only (digits, a point, an exponent, a sign): no hex, inf or nan */
bool bt_parse_double(const char *s, double min, double max, double *out);
bool bt_parse_bool(const char *s, bool *out);

/* The CPUs this process may run on: its affinity mask (sched_getaffinity, what taskset, cgroup
 * cpusets and container CPU pinning restrict), else the CPUs online; at least 1. Children started
 * later inherit the mask. */
long bt_cpus_usable(void);

/* Opens the file an operator named where a file is expected (a TLS certificate or key, a secret,
 * a model, a payload), for reading, and checks that it is a regular file. Anything else would block
 * the start-up or never end it: a FIFO until some writer comes, /dev/zero read for ever, a
 * directory read as an error much later. The type is checked before the open (a device is never
 * opened), and again on the descriptor, which is opened with O_NONBLOCK so that a FIFO swapped in
 * meanwhile does not block the open either. Returns the descriptor (O_CLOEXEC, back in blocking
 * mode; the caller closes it), or -1 with the reason in why[whylen]: the system's ("No such file
 * or directory", "Permission denied", "Is a directory"), or "a FIFO, not a regular file" and the
 * like. Blocking file I/O: start-up only, never on an event loop. */
int bt_open_regular(const char *path, char *why, size_t whylen);
/* bt_open_regular, the descriptor closed at once: true when `path` is a regular file this process
 * can open for reading (for a file that a library opens itself, such as a TLS file). */
bool bt_check_regular(const char *path, char *why, size_t whylen);
/* Reads from fd until `cap` bytes or the end of the file, retrying EINTR: the number of bytes read
 * (less than cap only at the end), or -1 with errno set. A blocking read: start-up only. */
ssize_t bt_read_full(int fd, void *buf, size_t cap);

/* Steps through a comma-separated list, as the list flags give them (--allowed-origins,
 * --allowed-hosts, --priority-ceiling): true with the next element in *item and *len, false at the
 * end. Blanks (space, tab) around an element are not part of it. Every element is given, empty
 * ones too ("a,,b" and "a, ,b" are three, the middle one empty: a caller that refuses them says
 * so), except after a trailing comma: "a," is one element, and "" (or a NULL list) none. *pos
 * starts at the list and is moved on; nothing is copied or changed. One splitter for every list,
 * so that all of them read blanks and commas alike. */
bool bt_list_next(const char **pos, const char **item, size_t *len);

/* True when the len bytes at k (len > 0) are a key that can travel as "Authorization: Bearer KEY":
 * visible ASCII only (0x21-0x7e). An HTTP header parser drops blanks at either end of a field, so
 * a key that begins or ends with one can never be matched; one inside, a control character (a CR
 * LF would end the header) or a byte past ASCII is refused or mangled by most clients, and RFC
 * 6750's token is visible ASCII. Every configured key is checked with it at start-up: the
 * frontend's (--api-key, --admin-api-key, their files, the --priority-ceiling keys) and the one the
 * openai engine sends upstream (--upstream-api-key). */
bool bt_bearer_token_ok(const char *k, size_t len);

/* The length of s[0..n) without the blanks (space, tab) and line ends (CR, LF) that end it: the
 * tail an editor, `echo` or a template leaves after the text of a file. */
size_t bt_text_trim_end(const char *s, size_t n);

/* The whole of a small text file an operator named for a key, a secret or a list of keys, read
 * once at start-up through bt_open_regular (a FIFO would block the start, /dev/zero never end it):
 * at most `max` bytes of text, without a NUL byte (its content is used as a C string: a NUL would
 * cut a key or a secret short, to nothing at worst). The blanks and line ends that end the file
 * (bt_text_trim_end) are not counted against `max`, so that a key or a secret of the largest size
 * followed by a newline or a few blank lines is not refused for them; they are read and handed
 * over with the rest (what they mean is the caller's to say: a key file refuses a second line),
 * up to BT_TEXT_TAIL_MAX bytes of them. On BT_OK *out is the content, NUL-terminated, of *len
 * bytes (an empty file gives "" and 0: whether that will do is the caller's to say); the caller
 * frees it, cleansing it first when it held a secret. Otherwise *out is NULL, and why[whylen] says
 * what is wrong, never quoting the content: for BT_ERR_TOO_LARGE ("is over MAX bytes", or "ends in
 * over BT_TEXT_TAIL_MAX bytes of blanks and line ends") and BT_ERR_INVALID ("holds a NUL byte") in
 * words that follow the file's name; for any other status (BT_ERR_IO, BT_ERR_NOMEM) the reason the
 * file cannot be read ("No such file or directory", "a FIFO, not a regular file", "out of
 * memory"). Blocking reads: start-up only. */
bt_status bt_read_text_file(const char *path, size_t max, char **out, size_t *len, char *why, size_t whylen);
/* The most blanks and line ends bt_read_text_file takes after a file's text (not counted in max). */
#define BT_TEXT_TAIL_MAX 4096
/* The largest request-plane secret (and --tenant-label-secret-file) bt_load_secret takes. */
#define BT_SECRET_FILE_MAX 4096
/* The request-plane shared secret: the contents of `file` without the blanks and line ends that end
 * it (bt_text_trim_end) if given, else `value`, else none (*out = NULL). The file is read once at
 * start-up by bt_read_text_file; an empty one (or one of blanks and newlines only) is refused, and
 * so is one whose secret is over BT_SECRET_FILE_MAX bytes. The caller frees *out. */
bt_status bt_load_secret(const char *file, const char *value, char **out, char *err, size_t errlen);

#endif
