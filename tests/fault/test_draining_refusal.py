"""A request refused by a draining worker before it ran is rerouted, and is no migration.

A REQUEST that crosses a worker's GOAWAY is answered ERROR "worker is draining" (docs/protocol.md
§10) and the frontend routes it elsewhere, uncharged to --migration-limit. It was still counted as a
migration by the access log ("migrations":1) and by the retry budget, which took the request's
first real failure afterwards for a repeat migration. Here a fake worker refuses every REQUEST so,
beside a mocker worker: the request completes on the mocker with the mocker's own answer, the
access log says 2 attempts and 0 migrations, and the migration counter does not move.
"""

import json
import os

import batonlib as bl
import fakeworker as fk

bl.deadline(60, "test_draining_refusal")

DRAINING = 15  # BT_ERR_DRAINING (src/common/status.h)


def body(stream):
    b = bl.chat_body("refused by a draining worker", max_tokens=12, return_token_ids=True, seed=5, temperature=0.7)
    if stream:
        b["stream"] = True
        b["stream_options"] = {"include_usage": True}
    return b


with bl.Cluster() as c:
    log_path = os.path.join(c.dir, "access.log")
    fe, ref, ref_u, _ = fk.start_with_reference(c, body, 1, access_log=log_path)

    def refuse(fw_, stream, payload):
        fw_.send(fk.error(stream, DRAINING, "worker is draining"))

    fw = fk.FakeWorker.joined(c, fe, refuse, 2)
    try:
        def migrations():
            return sum(bl.metric_sum(bl.metrics(fe.url), "dynamo_frontend_model_migration_total", migration_type=t)
                       for t in ("new_request", "ongoing_request"))

        m0 = migrations()
        rid, s, _, others = fw.first_routed("drain", lambda rid: bl.stream_chat(
            fe.url, body(True), timeout=30, headers={"X-Request-Id": rid}))
        s.assert_ok(f"{rid}: refused by the draining worker, then served")
        assert bl.stream_outcome(s) == ref, (bl.stream_outcome(s), ref)
        assert migrations() == m0, f"a draining refusal counted as a migration ({migrations() - m0})"
        fe.proc.wait_log(rf"request {rid} refused by draining worker {fw.instance_id:x} before it started", 5)

        def line_of(r):
            if not os.path.exists(log_path):
                return None
            for ln in open(log_path):
                rec = json.loads(ln)
                if rec.get("request_id") == r:
                    return rec
            return None

        bl.wait_for(lambda: line_of(rid), 5, what="the access log line")
        rec = line_of(rid)
        assert rec["attempts"] == 2 and rec["migrations"] == 0, rec
    finally:
        fw.close()
print("test_draining_refusal: ok")
