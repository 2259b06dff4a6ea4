/* fuzz_event_id.c — libFuzzer driver for the event-id parser of resumable streams
 * (fe_resume_parse_id, src/frontend/resume.c), which reads the client's Last-Event-ID header.
 *
 * The input, as a NUL-terminated string (an exactly-sized heap copy, so ASan sees a read past it),
 * is parsed; an accepted id must be in canonical form: writing back what was parsed
 * ("<32 hex>:<position>[:end|:usage|:done|:error]") gives exactly the input, the position fits in
 * 32 bits and the stream id is 32 lower-case hex digits. A violated invariant aborts. Seeds are in
 * fuzz/corpus/event_id/; build and run with fuzz/build.sh. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "frontend/fe.h"

#include "check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (memchr(data, 0, size)) return 0; /* a header value holds no NUL: http.c ends it there */
    char *s = malloc(size + 1);
    if (!s) return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    char sid[FE_STREAM_ID_LEN + 1];
    uint64_t pos = 0;
    int mark = -1;
    if (fe_resume_parse_id(s, sid, &pos, &mark)) {
        static const char *const marks[] = {"", ":end", ":usage", ":done", ":error"};
        CHECK(mark >= FE_MARK_NONE && mark <= FE_MARK_ERROR);
        CHECK(pos <= UINT32_MAX);
        CHECK(strlen(sid) == FE_STREAM_ID_LEN);
        for (int i = 0; i < FE_STREAM_ID_LEN; i++) CHECK(strchr("0123456789abcdef", sid[i]) != NULL);
        char back[FE_STREAM_ID_LEN + 32];
        snprintf(back, sizeof back, "%s:%llu%s", sid, (unsigned long long)pos, marks[mark]);
        CHECK(strcmp(back, s) == 0);
    }
    free(s);
    return 0;
}
