/* proc.h — the process scaffolding that `baton frontend` and `baton worker` share.
 *
 *   - the options of the planes both use (discovery, event plane, request-plane secret), as one
 *     struct and as rows for a bt_opt table;
 *   - the command line: --help, and start-up errors printed as "baton <cmd>: <reason>";
 *   - discovery, the event plane and the request-plane secret set up from those options;
 *   - signal handlers, and the teardown of the loop: discovery, then the event plane, then every
 *     remaining handle (a clean exit), or every handle at once (a failed start-up).
 *
 * What differs between the commands (their own options and checks, what a signal does, what they
 * log) stays in frontend.c and worker.c / drain.c. Nothing here logs. */
#ifndef BATON_PROC_H
#define BATON_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/opts.h"
#include "common/status.h"
#include "discovery/discovery.h"
#include "events/events.h"

/* The options of the planes every long-running command uses. */
typedef struct {
    const char *discovery;       /* DYN_DISCOVERY_BACKEND: "file" or "etcd" */
    const char *discovery_dir;   /* DYN_FILE_KV; bt_proc_discovery_dir_default: the discovery default */
    const char *etcd_endpoints;  /* ETCD_ENDPOINTS; NULL: the discovery default */
    const char *etcd_ca;          /* ETCD_AUTH_CA; NULL: the discovery default (the same variable) */
    const char *etcd_client_cert; /* ETCD_AUTH_CLIENT_CERT; likewise */
    const char *etcd_client_key;  /* ETCD_AUTH_CLIENT_KEY; likewise */
    const char *event_plane;     /* DYN_EVENT_PLANE: "direct" or "nats" */
    const char *nats_server;     /* NATS_SERVER */
    const char *nats_tls_ca;     /* NATS_TLS_CA; NULL: OpenSSL's default trust */
    const char *nats_tls_cert;   /* NATS_TLS_CERT; NULL: no client certificate */
    const char *nats_tls_key;    /* NATS_TLS_KEY; with nats_tls_cert */
    const char *rpc_secret_file; /* DYN_RPC_SECRET_FILE; NULL: DYN_RPC_SECRET, else no secret */
} bt_proc_opts;

/* True in a child of `baton run` (main.c sets it before the command starts). The launcher alone
 * decides how its children stop: one SIGTERM each, then SIGKILL on a second Ctrl-C. A child
 * therefore does not take a repeated SIGTERM/SIGINT as "exit at once": a terminal's Ctrl-C (or
 * `kill -- -PGID`, or `timeout`) signals the whole process group, and with the launcher's own
 * SIGTERM every child would see two signals and cut its streams instead of draining. */
extern bool bt_proc_supervised;

/* Set by `baton run` to the command it checks arguments for ("run"), NULL otherwise. While set,
 * bt_frontend_main and bt_worker_main only check their arguments (flags, environment twins and
 * the values' consistency), print any error through bt_proc_error and return 2, or return 0 once
 * everything is valid, before they create, open or bind anything: the launcher then refuses a
 * flag that a child would refuse before it starts any process. bt_proc_error then names the
 * launcher and the command the argument was passed on to. */
extern const char *bt_proc_check_for;

/* --discovery-dir's default as --help shows it. The directory itself is computed by discovery at
 * start-up (bt_discovery_config_default); a discovery_dir that is this very pointer means "that". */
extern const char bt_proc_discovery_dir_default[];

/* file discovery in bt_proc_discovery_dir_default, direct event plane, nats://localhost:4222, the
 * rest NULL */
void bt_proc_opts_default(bt_proc_opts *p);

/* Rows of a command's bt_opt table for the fields of a bt_proc_opts *p: one macro a row, so that
 * each command keeps its own order in --help. */
#define BT_PROC_OPT_DISCOVERY(p, help) {"--discovery", "DYN_DISCOVERY_BACKEND", BT_OPT_STR, &(p)->discovery, 0, 0, help}
#define BT_PROC_OPT_DISCOVERY_DIR(p)                                                                                  \
    {"--discovery-dir", "DYN_FILE_KV", BT_OPT_STR, &(p)->discovery_dir, 0, 0,                                       \
     "file discovery directory (/tmp when TMPDIR is unset)"}
#define BT_PROC_OPT_ETCD_ENDPOINTS(p)                                                                                 \
    {"--etcd-endpoints", "ETCD_ENDPOINTS", BT_OPT_STR, &(p)->etcd_endpoints, 0, 0,                                     \
     "comma-separated URLs (none: http://localhost:2379)"}
#define BT_PROC_OPT_ETCD_CA(p)                                                                                        \
    {"--etcd-ca", "ETCD_AUTH_CA", BT_OPT_STR, &(p)->etcd_ca, 0, 0,                                                    \
     "PEM CA file for https:// etcd endpoints (none: the system's CA store)"}
#define BT_PROC_OPT_ETCD_CLIENT_CERT(p)                                                                               \
    {"--etcd-client-cert", "ETCD_AUTH_CLIENT_CERT", BT_OPT_STR, &(p)->etcd_client_cert, 0, 0,                       \
     "PEM client certificate for https:// etcd endpoints"}
#define BT_PROC_OPT_ETCD_CLIENT_KEY(p)                                                                                \
    {"--etcd-client-key", "ETCD_AUTH_CLIENT_KEY", BT_OPT_STR, &(p)->etcd_client_key, 0, 0,                          \
     "PEM key of --etcd-client-cert"}
#define BT_PROC_OPT_RPC_SECRET_FILE(p)                                                                                \
    {"--rpc-secret-file", "DYN_RPC_SECRET_FILE", BT_OPT_STR, &(p)->rpc_secret_file, 0, 0,                           \
     "file holding the request-plane shared secret (or DYN_RPC_SECRET)"}
#define BT_PROC_OPT_EVENT_PLANE(p)                                                                                    \
    {"--event-plane", "DYN_EVENT_PLANE", BT_OPT_STR, &(p)->event_plane, 0, 0,                                        \
     "direct (load on the request plane) or nats (also namespace.{ns}.kv_metrics)"}
#define BT_PROC_OPT_NATS_SERVER(p)                                                                                    \
    {"--nats-server", "NATS_SERVER", BT_OPT_STR, &(p)->nats_server, 0, 0, "nats://host:port[,nats://...]"}
/* The TLS of every NATS connection of the process (event plane and stream journal alike). */
#define BT_PROC_OPT_NATS_TLS_CA(p)                                                                                    \
    {"--nats-tls-ca", "NATS_TLS_CA", BT_OPT_STR, &(p)->nats_tls_ca, 0, 0,                                           \
     "PEM CA file the NATS server's certificate must chain to (TLS even at a nats:// URL)"}
#define BT_PROC_OPT_NATS_TLS_CERT(p)                                                                                  \
    {"--nats-tls-cert", "NATS_TLS_CERT", BT_OPT_STR, &(p)->nats_tls_cert, 0, 0,                                     \
     "PEM client certificate for a NATS server that verifies clients"}
#define BT_PROC_OPT_NATS_TLS_KEY(p)                                                                                   \
    {"--nats-tls-key", "NATS_TLS_KEY", BT_OPT_STR, &(p)->nats_tls_key, 0, 0, "PEM key of --nats-tls-cert"}

/* True, after printing the usage of `baton <cmd>`, when --help or -h is among argv[1..argc). */
bool bt_proc_help(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv);
/* bt_opts_parse over argv[1..argc) with no forwarding; on an error prints "baton <cmd>: <reason>"
 * to stderr and returns false. */
bool bt_proc_parse(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv);
/* Prints "baton <cmd>: <message>" and a newline to stderr: a start-up error found before the
 * process runs. Returns 2, the exit code of a usage error. */
int bt_proc_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Checks of values that the option table cannot express, made at parse time so that a wrong value
 * is a usage error (exit 2, and refused by `baton run` before it starts anything) rather than a
 * failed start-up that a supervisor would repeat. Each names the value as it was given: the flag
 * itself, or "ENV (--flag)" when it came from the environment twin. */
/* True when `value`, the value of row `flag`, is a numeric IPv4 or IPv6 address (what the
 * listeners accept); else prints the error through bt_proc_error and returns false. */
bool bt_proc_check_host(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv, const char *flag,
                        const char *value);
/* True when `value`, the value of row `flag`, is one of the NULL-terminated `choices`; else prints
 * "unknown <flag> 'value' (<listed>)" through bt_proc_error and returns false. */
bool bt_proc_check_choice(const char *cmd, const bt_opt *opts, int nopts, int argc, char **argv, const char *flag,
                          const char *value, const char *const *choices, const char *listed);
/* The choices of --discovery (file, etcd) and --event-plane (direct, nats) of a bt_proc_opts. */
bool bt_proc_check_planes(const char *cmd, const bt_proc_opts *p, const bt_opt *opts, int nopts, int argc,
                          char **argv);

/* False with the reason in err when `flag` is given empty, on the command line (val is "") or as
 * its environment twin `env` (set but empty, which option parsing otherwise takes as unset); the
 * message says to leave it out to run without `without`. For a setting whose absence means
 * "none" (a key, the priority ceilings): an empty value is most often a template or a secret store
 * that failed to fill it in, and taking it as "none" would run, say, an open API without a word. */
bool bt_proc_given_nonempty(const char *flag, const char *env, const char *val, const char *without, char *err,
                            size_t errlen);

/* The request-plane secret from --rpc-secret-file, else $DYN_RPC_SECRET (bt_load_secret). */
bt_status bt_proc_load_secret(const bt_proc_opts *p, char **out, char *err, size_t errlen);
/* Creates discovery from the options; ttl_s > 0 sets the lease of what this process puts (0: the
 * default). As bt_discovery_create. */
bt_status bt_proc_discovery_create(uv_loop_t *loop, const bt_proc_opts *p, int64_t ttl_s, bt_discovery **out,
                                   char *err, size_t errlen);
/* The event plane's configuration from the options (the credentials from the environment,
 * bt_events_config_default), namespace ns, the default client name: what every NATS connection of
 * the process is made with (the frontend's JetStream journal uses it too). */
void bt_proc_events_config(const bt_proc_opts *p, const char *ns, bt_events_config *ec);
/* Creates the event plane of one process: namespace ns, client name "baton-<role>-<id in hex>".
 * As bt_events_create (*out is NULL for the direct plane). */
bt_status bt_proc_events_create(uv_loop_t *loop, const bt_proc_opts *p, const char *ns, const char *role,
                                uint64_t id, bt_events **out, char *err, size_t errlen);

/* The signals of a long-running command (`baton frontend`, `baton worker`, `baton run`), set up
 * here so that all three answer alike (docs/operations.md, "Signals"):
 *  - SIGTERM, SIGINT and SIGHUP call on_stop(data, signum): the graceful stop. SIGHUP is what a
 *    closed terminal sends and what many tools send to mean "reload"; baton has no configuration
 *    to reload, so it stops as for SIGTERM and says so in the log, rather than dying on the
 *    signal's default action with its streams cut. A SIGHUP that was ignored when the process
 *    started (nohup) stays ignored: that is what the one who started it asked for.
 *    The same stop signal again within BT_PROC_REPEAT_MS is ignored (one stop delivered twice).
 *  - SIGUSR1 and SIGUSR2 call on_user(data, signum), if given; when there is none or it returns
 *    false the signal is ignored with a line at INFO: a stray `kill -USR1` must not kill a server.
 * SIGPIPE is ignored for the whole process by main.c. The handles live on `loop` and close with
 * its other handles (bt_proc_close_handles); s may be started again on a loop whose handles have
 * all closed. */
/* A stop signal repeated within this many ms of the same one is taken as that stop delivered twice
 * (`timeout`, a process group's signal beside the command's own) and not passed to on_stop. */
#define BT_PROC_REPEAT_MS 100
typedef void (*bt_proc_stop_cb)(void *data, int signum);
typedef bool (*bt_proc_user_cb)(void *data, int signum);
typedef struct {
    uv_signal_t h[5]; /* SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 */
    int n;            /* handles started: 4 while SIGHUP stays ignored */
    bt_proc_stop_cb on_stop;
    bt_proc_user_cb on_user;
    void *data;
} bt_proc_signals;

void bt_proc_signals_start(uv_loop_t *loop, bt_proc_signals *s, bt_proc_stop_cb on_stop, bt_proc_user_cb on_user,
                           void *data);
/* "SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1" or "SIGUSR2"; "signal" for any other. */
const char *bt_proc_signal_name(int signum);
/* True when SIGHUP was ignored as the process started (nohup): bt_proc_signals_start leaves it so.
 * `baton run` passes that on to its children, whose signals uv_spawn resets to their defaults. */
bool bt_proc_sighup_ignored(void);

/* Closing the planes at the end of a clean shutdown (bt_proc_close_planes). */
typedef struct {
    uv_loop_t *loop;
    bt_events **events;
    void (*done)(void *ud);
    void *ud;
} bt_proc_closer;

/* Closes discovery (*disc, which may be NULL; set to NULL at once), then the event plane
 * (*events, set to NULL when discovery has closed), then calls done(ud) (may be NULL) and closes
 * every handle left on the loop, so that uv_run returns. c holds the state in between and must
 * stay valid until then. */
void bt_proc_close_planes(bt_proc_closer *c, uv_loop_t *loop, bt_discovery **disc, bt_events **events,
                          void (*done)(void *ud), void *ud);
/* Closes every handle of the loop that is not closing already. */
void bt_proc_close_handles(uv_loop_t *loop);
/* After a failed start-up: closes discovery (*disc, may be NULL), then the event plane (*events;
 * events may be NULL), then every other handle, and runs the loop until all have closed. */
void bt_proc_unwind(uv_loop_t *loop, bt_discovery **disc, bt_events **events);

#endif
