/* run.h — `baton run`: the all-in-one launcher. */
#ifndef BATON_RUN_H
#define BATON_RUN_H

int bt_run_main(int argc, char **argv);

#endif
