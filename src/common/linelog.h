/* linelog.h — lines appended to a file by a thread of their own (the frontend's access log).
 *
 * An event loop must not wait on a disk: bt_linelog_put copies the line into a bounded buffer
 * and returns; a writer thread empties the buffer into the file with one write(2) every 100 ms (or
 * at once when the buffer is half full), so a line waits 100 ms at most. When the buffer is
 * full (the disk slower than the lines), the line is dropped and counted, never waited for.
 * The file is opened with O_APPEND; once a second the writer compares the path with the file it
 * holds and reopens the path when the file was renamed or removed, so that logrotate works
 * without copytruncate and without a signal. "-" is the standard output (never reopened).
 *
 * The process ignores SIGPIPE (baton's main does): an output whose reader went away is a failed
 * write, counted, not the process's end.
 *
 * A logging library (zlog, log4c) would bring configuration files and formats of its own for
 * what is a buffer, a thread and a rename check; these are written here. */
#ifndef BATON_LINELOG_H
#define BATON_LINELOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct bt_linelog bt_linelog;

/* Opens (creates, mode 0640) `path` for appending, or takes the standard output for "-", and
 * starts the writer. `cap` bounds the bytes waiting for the writer (at least 4096). NULL with a
 * reason in err when the file cannot be opened or the thread cannot start. */
bt_linelog *bt_linelog_open(const char *path, size_t cap, char *err, size_t errlen);
/* Queues one line (its bytes as given: the caller ends it with '\n'). Any thread. False, and the
 * line counted as dropped, when the buffer has no room for it. */
bool bt_linelog_put(bt_linelog *l, const char *line, size_t len);
/* Counts a line as dropped that the caller could not make (out of memory). */
void bt_linelog_drop(bt_linelog *l);
/* Lines dropped so far: no room in the buffer, or the write of their bytes failed. */
uint64_t bt_linelog_dropped(const bt_linelog *l);
/* Lines written so far. */
uint64_t bt_linelog_written(const bt_linelog *l);
/* Writes what is queued, stops the writer and closes the file. A writer still inside a write
 * after 3 s (an output that takes nothing) is left behind with its memory, and the lines it held
 * are lost (logged). NULL is a no-op. */
void bt_linelog_close(bt_linelog *l);

#endif
