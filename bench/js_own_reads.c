/* js_own_reads.c — what the shared journal's check_writer questions cost: the direct gets of a
 * stream's <subject>.own that the journal's thread makes, one after another, when a worker's death
 * migrates many streams at once (src/frontend/journal_js.c, do_checks). Measured against a
 * nats-server -js of the caller's (docs/benchmarks.md, "check_writer reads in a migration storm").
 *
 *   baton-js-own-reads [--url nats://127.0.0.1:4222] [--reads 1000] [--taken 100]
 *
 * Creates the JetStream stream BATON_BENCH_OWN (subjects baton.bench.own.>, AllowDirect, memory),
 * publishes an own for --taken of the --reads streams (the others were never taken over: the
 * read answers "not found", the common case), then reads each stream's last own as read_own does,
 * one at a time, and prints the total and the time per read. The stream is deleted at the end. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nats/nats.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    const char *url = "nats://127.0.0.1:4222";
    long reads = 1000, taken = 100;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--url") == 0) url = argv[i + 1];
        else if (strcmp(argv[i], "--reads") == 0) reads = strtol(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--taken") == 0) taken = strtol(argv[i + 1], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--url URL] [--reads N] [--taken N]\n", argv[0]);
            return 2;
        }
    }
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    natsStatus st = natsConnection_ConnectTo(&nc, url);
    if (st == NATS_OK) st = natsConnection_JetStream(&js, nc, NULL);
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    const char *subjects[] = {"baton.bench.own.>"};
    cfg.Name = "BATON_BENCH_OWN";
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_MemoryStorage;
    cfg.AllowDirect = true;
    jsErrCode je = 0;
    if (st == NATS_OK) st = js_AddStream(NULL, js, &cfg, NULL, &je);
    if (st != NATS_OK) {
        fprintf(stderr, "cannot use JetStream at %s: %s (error %d)\n", url, natsStatus_GetText(st), (int)je);
        return 1;
    }
    char subj[96];
    for (long i = 0; i < taken && st == NATS_OK; i++) {
        snprintf(subj, sizeof subj, "baton.bench.own.%032lx.own", i);
        st = js_Publish(NULL, js, subj, "{\"e\":1}", 7, NULL, &je);
    }
    long found = 0, failed = 0;
    double t0 = now_ms();
    for (long i = 0; i < reads && st == NATS_OK; i++) {
        snprintf(subj, sizeof subj, "baton.bench.own.%032lx.own", i);
        jsOptions jo;
        jsOptions_Init(&jo);
        jo.Wait = 700; /* FETCH_WAIT_MS */
        jsDirectGetMsgOptions dg;
        jsDirectGetMsgOptions_Init(&dg);
        dg.LastBySubject = subj;
        natsMsg *m = NULL;
        natsStatus r = js_DirectGetMsg(&m, js, cfg.Name, &jo, &dg);
        if (r == NATS_OK) found++;
        else if (r != NATS_NOT_FOUND) failed++;
        natsMsg_Destroy(m);
    }
    double ms = now_ms() - t0;
    js_DeleteStream(js, cfg.Name, NULL, NULL);
    printf("%ld reads (%ld found, %ld failed) in %.1f ms: %.1f us per read\n", reads, found, failed, ms,
           reads ? ms * 1000.0 / (double)reads : 0.0);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return st == NATS_OK && failed == 0 ? 0 : 1;
}
