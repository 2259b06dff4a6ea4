/* worker.h — `baton worker`: one engine behind a request-plane listener.
 *
 * The worker registers its instance in discovery, accepts frontend connections, runs each
 * REQUEST as an engine sequence and streams TOKENS/FINISH/ERROR back, pushes LOAD reports when
 * the engine's load changes, and drains on SIGTERM/SIGINT (see docs/fault-tolerance.md). */
#ifndef BATON_WORKER_H
#define BATON_WORKER_H

/* Entry point of the subcommand; argv[0] is "worker". Returns the process exit code. */
int bt_worker_main(int argc, char **argv);

#endif
