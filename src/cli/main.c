/* main.c — the `baton` binary: dispatches to a subcommand. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "cli/run.h"
#include "frontend/frontend.h"
#include "worker/worker.h"

static void usage(void) {
    printf("usage: baton <command> [options]\n\n"
           "commands:\n"
           "  run        a frontend and N simulated workers on this machine (start here)\n"
           "  frontend   the OpenAI-compatible HTTP frontend and router\n"
           "  worker     one engine behind the request plane\n\n"
           "`baton <command> --help` lists a command's options.\n");
}

int main(int argc, char **argv) {
    /* a peer that vanishes mid-write must be an error code, never a signal that kills the process */
    signal(SIGPIPE, SIG_IGN);
    /* children of `baton run` stop with it, even when it is killed with SIGKILL */
    const char *ppid = getenv("BATON_PARENT_PID");
    if (ppid) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (strtol(ppid, NULL, 10) != (long)getppid()) return 1; /* the parent is already gone */
        unsetenv("BATON_PARENT_PID");
    }
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage();
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "run") == 0) return bt_run_main(argc - 1, argv + 1);
    if (strcmp(cmd, "frontend") == 0) return bt_frontend_main(argc - 1, argv + 1);
    if (strcmp(cmd, "worker") == 0) return bt_worker_main(argc - 1, argv + 1);
    fprintf(stderr, "baton: unknown command '%s'\n", cmd);
    usage();
    return 2;
}
