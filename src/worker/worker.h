/* worker.h — `baton worker`: one engine behind a request-plane listener.
 *
 * The worker registers its instance in discovery, accepts frontend connections, runs each
 * REQUEST as an engine sequence and streams TOKENS/FINISH/ERROR back, pushes LOAD reports when
 * the engine's load changes, serves a status server, checks its engine with canaries and a
 * monitor, and drains on SIGTERM/SIGINT/SIGHUP (see docs/operations.md; the modules are listed in
 * worker_internal.h). */
#ifndef BATON_WORKER_H
#define BATON_WORKER_H

#include <stdint.h>

/* Entry point of the subcommand; argv[0] is "worker". Returns the process exit code. */
int bt_worker_main(int argc, char **argv);

/* Set by bt_worker_main when it only checked its arguments (bt_proc_check_for, `baton run`) and
 * found them valid: the decode threads a llama engine of those arguments runs (--llama-threads or
 * DYN_LLAMA_THREADS), 0 for another engine. The launcher adds them up over its workers. */
extern int64_t bt_worker_checked_llama_threads;

#endif
