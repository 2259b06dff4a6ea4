/* frontend.h — `baton frontend`: the OpenAI-compatible HTTP server, router and migrator. */
#ifndef BATON_FRONTEND_H
#define BATON_FRONTEND_H

/* Entry point of the subcommand; argv[0] is "frontend". Returns the process exit code. */
int bt_frontend_main(int argc, char **argv);

#endif
