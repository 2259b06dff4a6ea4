"""Under --trust-tenant-header a stream resumes only for the tenant that made it, as the cancel
endpoint cancels only the caller's own requests (docs/security.md; docs/fault-tolerance.md,
"Resuming").

nats-server -js, one mocker worker, frontends A and B with --api-key and --trust-tenant-header
(the journal shared through JetStream). A stream made on A with X-Tenant: alice is cut by its
client. With the same API key:
- X-Tenant: bob (and no X-Tenant at all) resumes it on A by re-POST and by GET: 404
  stream_not_found, as for an unknown stream; and on B (the record read from JetStream) likewise.
  Before, the record was bound to the API key only, and bob read alice's answer whole.
- the cancel endpoint refuses bob alice's request (404), the behaviour the resume now matches;
- alice resumes it on B, exactly.
"""

import os
import time

import batonlib as bl
import natslib

bl.deadline(150, "test_resume_tenant")

KEY = "sekret"
BODY = bl.chat_body("alice's private answer", max_tokens=120, return_token_ids=True, seed=11,
                    stream_options={"include_usage": True})


def hdr(tenant, **more):
    h = {"Authorization": f"Bearer {KEY}"}
    if tenant is not None:
        h["X-Tenant"] = tenant
    h.update(more)
    return h


with bl.Cluster() as c:
    nats = natslib.NatsServer(c.dir, config=f'jetstream {{ store_dir: "{os.path.join(c.dir, "js")}" }}').start()
    plane = dict(event_plane="nats", nats_server=nats.url)
    c.start_worker(**plane)
    fa = c.start_frontend(api_key=KEY, trust_tenant_header=True, **plane)
    fb = c.start_frontend(api_key=KEY, trust_tenant_header=True, **plane)
    for fe in (fa, fb):
        fe.proc.wait_log(r"journal shared through NATS JetStream", timeout=15)
        c.wait_workers(fe, 1)
    ref = bl.stream_chat(fb.url, BODY, headers=hdr("alice"), timeout=60).assert_ok("reference")

    # the cancel endpoint: another tenant's request is not even said to exist
    live = {}

    def on_event(st, obj):
        live.setdefault("rid", st.headers.get("x-request-id"))
        if len(st.events) == 3:
            s, _, b = bl.request("POST", fa.url + f"/v1/requests/{live['rid']}/cancel", {"mode": "stop"},
                                 headers=hdr("bob"))
            live["cancel"] = (s, b)
            return True  # the client cuts its own stream here
        return False
    cut = bl.stream_chat(fa.url, BODY, headers=hdr("alice"), on_event=on_event, timeout=30)
    assert cut.aborted and cut.last_event_id, cut.summary()
    assert live["cancel"][0] == 404, live["cancel"]
    sid = cut.last_event_id.split(":")[0]
    time.sleep(0.3)  # A's batch reaches JetStream

    for fe, where in ((fa, "A"), (fb, "B")):
        for tenant in ("bob", None, "Alice"):
            st = bl.stream_chat(fe.url, BODY, headers=hdr(tenant, **{"Last-Event-ID": cut.last_event_id}), timeout=30)
            assert st.status == 404 and st.error and st.error.get("code") == "stream_not_found", \
                f"re-POST by tenant {tenant!r} on {where}: {st.summary()}"
            st = bl.stream_sse(fe.url, f"/v1/chat/completions/{sid}?stream=true", None, method="GET",
                               headers=hdr(tenant), timeout=30)
            assert st.status == 404 and st.error and st.error.get("code") == "stream_not_found", \
                f"GET by tenant {tenant!r} on {where}: {st.summary()}"
    print("another tenant (bob, none, 'Alice') gets 404 for alice's stream on A and on B, POST and GET", flush=True)

    rest = bl.stream_chat(fb.url, BODY, headers=hdr("alice", **{"Last-Event-ID": cut.last_event_id}), timeout=60)
    assert rest.ok, rest.summary()
    assert cut.token_ids + rest.token_ids == ref.token_ids and cut.text + rest.text == ref.text
    assert rest.usage == ref.usage
    print("alice resumed her stream on B, exactly", flush=True)

print("test_resume_tenant: ok")
