// eventsource_client.mjs — a third-party EventSource client (the `eventsource` npm package,
// unmodified) reading a baton stream through the GET form, reconnecting by itself with
// Last-Event-ID whenever its connection is cut. Driven by tests/compat/test_eventsource_npm.py.
//
// 1. POSTs the request (stream: true) to BATON_URL, reads the X-Stream-Id response header and
//    drops the connection (the frontend cancels the request; its journal keeps what was sent);
// 2. opens an EventSource on BATON_ES_URL + /v1/chat/completions/{stream id}?stream=true (the test
//    points it at a proxy that cuts connections) and collects every message until [DONE];
// 3. prints one JSON line: what it received and how many times it connected.
import { EventSource } from 'eventsource';

const base = process.env.BATON_URL;
const esBase = process.env.BATON_ES_URL;
const path = process.env.BATON_PATH;
const body = JSON.parse(process.env.BATON_BODY);

const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: 'timed out' }));
  process.exit(2);
}, 90000);

const ctl = new AbortController();
const first = await fetch(base + path, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
  body: JSON.stringify(body),
  signal: ctl.signal,
});
const sid = first.headers.get('x-stream-id');
ctl.abort();
if (first.status !== 200 || !sid) {
  console.log(JSON.stringify({ error: `POST answered ${first.status} without X-Stream-Id` }));
  process.exit(1);
}

const out = { sid, opens: 0, errors: 0, ids: [], text: '', token_ids: [], finish_reason: null, usage: null,
              done: false, package: 'eventsource' };
const es = new EventSource(`${esBase}${path}/${sid}?stream=true`);
es.onopen = () => { out.opens++; };
es.onerror = () => { out.errors++; };
es.onmessage = (ev) => {
  out.ids.push(ev.lastEventId);
  if (ev.data === '[DONE]') {
    out.done = true;
    es.close();
    clearTimeout(timer);
    console.log(JSON.stringify(out));
    return;
  }
  const obj = JSON.parse(ev.data);
  if (obj.usage) out.usage = obj.usage;
  const c = (obj.choices || [])[0];
  if (!c) return;
  out.text += (c.delta ? c.delta.content : c.text) || '';
  if (c.token_ids) out.token_ids.push(...c.token_ids);
  if (c.finish_reason) out.finish_reason = c.finish_reason;
};
