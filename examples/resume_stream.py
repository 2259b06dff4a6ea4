#!/usr/bin/env python3
"""resume_stream.py — a streamed chat completion that survives a lost connection (baton's
resumable streams, docs/fault-tolerance.md#resumable-streams). Python 3 standard library only.

    python3 examples/resume_stream.py [--url http://localhost:8000] [--api-key KEY]
                                      [--prompt TEXT] [--max-tokens N] [--drop-after N]

Every event baton sends has an `id:` line. The client remembers the last one; when the connection
breaks before `data: [DONE]`, it POSTs the same body again with the header `Last-Event-ID: <id>`
and receives exactly the events after it. --drop-after N closes the connection by itself after N
events each time (to see a resume happen). Prints the answer to stdout and each reconnection to
stderr. The official openai SDK cannot do this by itself (it has no notion of event ids).
"""

import argparse
import http.client
import json
import sys
import time
import urllib.parse


class Cut(Exception):
    """The connection ended before [DONE]."""


def stream_once(url, body, headers, last_id, drop_after, on_text):
    """One connection. Returns the last event id; raises Cut if the stream did not end."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
    h = dict(headers, **({"Last-Event-ID": last_id} if last_id else {}))
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=h)
        resp = conn.getresponse()
        if resp.status == 204:
            return last_id  # the previous connection had received everything already
        if resp.status != 200:
            # 404: the stream expired (--stream-retention) or is unknown; 400: a different body
            raise SystemExit(f"HTTP {resp.status}: {resp.read().decode(errors='replace')}")
        event_id, data, n = None, [], 0
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                payload = "\n".join(data)
                data = []
                if payload == "[DONE]":
                    return event_id
                obj = json.loads(payload)
                if "error" in obj:
                    raise SystemExit(f"stream error: {obj['error']}")
                for choice in obj.get("choices", []):
                    on_text((choice.get("delta") or {}).get("content") or "")
                last_id = event_id or last_id  # only a whole event counts as received
                n += 1
                if drop_after and n >= drop_after:
                    break
        raise Cut(last_id)
    except (OSError, http.client.HTTPException) as e:
        raise Cut(last_id) from e
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="mock-model")
    ap.add_argument("--prompt", default="Tell me a story")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--drop-after", type=int, default=0, help="close the connection after N events (a demo)")
    ap.add_argument("--retries", type=int, default=10)
    args = ap.parse_args()
    body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": args.prompt}]}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    last_id = None
    failures = 0  # reconnections in a row that brought nothing new
    while failures <= args.retries:
        try:
            stream_once(args.url, body, headers, last_id, args.drop_after,
                        lambda t: (sys.stdout.write(t), sys.stdout.flush()))
            sys.stdout.write("\n")
            return
        except Cut as c:
            failures = failures + 1 if c.args[0] == last_id else 0
            last_id = c.args[0]
            if last_id is None:
                raise SystemExit("the connection broke before the first event: nothing to resume; send it again")
            print(f"\n[connection lost; resuming after {last_id}]", file=sys.stderr)
            time.sleep(min(2.0, 0.05 * 2 ** failures))
    raise SystemExit("gave up after too many reconnections")


if __name__ == "__main__":
    main()
