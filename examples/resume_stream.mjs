// resume_stream.mjs — a streamed chat completion that survives a lost connection (baton's
// resumable streams, docs/fault-tolerance.md#resumable-streams). Node 18+, no dependency.
//
//   node examples/resume_stream.mjs [--url http://localhost:8000] [--api-key KEY]
//                                   [--prompt TEXT] [--max-tokens N] [--drop-after N]
//
// Every event baton sends has an `id:` line. The client remembers the last one; when the
// connection breaks before `data: [DONE]`, it POSTs the same body again with the header
// `Last-Event-ID: <id>` and receives exactly the events after it. --drop-after N closes the
// connection by itself after N events each time (to see a resume happen). The answer goes to
// stdout, each reconnection to stderr. (A browser-style EventSource can resume by itself through
// GET /v1/chat/completions/{X-Stream-Id}; see the docs.)
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string', default: 'http://localhost:8000' },
    'api-key': { type: 'string' },
    model: { type: 'string', default: 'mock-model' },
    prompt: { type: 'string', default: 'Tell me a story' },
    'max-tokens': { type: 'string', default: '100' },
    'drop-after': { type: 'string', default: '0' },
    retries: { type: 'string', default: '10' },
  },
});
const body = JSON.stringify({
  model: opt.model, stream: true, max_tokens: Number(opt['max-tokens']),
  messages: [{ role: 'user', content: opt.prompt }],
});
const dropAfter = Number(opt['drop-after']);

class Cut extends Error {}

// One connection: writes the text, returns at [DONE]; throws Cut (with the last whole event's id).
async function streamOnce(lastId) {
  const ctl = new AbortController();
  const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
  if (opt['api-key']) headers.Authorization = `Bearer ${opt['api-key']}`;
  if (lastId) headers['Last-Event-ID'] = lastId;
  let res;
  try {
    res = await fetch(`${opt.url}/v1/chat/completions`, { method: 'POST', headers, body, signal: ctl.signal });
  } catch (e) {
    throw Object.assign(new Cut(e.message), { lastId });
  }
  if (res.status === 204) return; // everything had arrived already
  if (res.status !== 200) {
    // 404: the stream expired (--stream-retention) or is unknown; 400: a different body
    console.error(`HTTP ${res.status}: ${await res.text()}`);
    process.exit(1);
  }
  const decoder = new TextDecoder();
  let buf = '', n = 0;
  try {
    for await (const chunk of res.body) {
      buf += decoder.decode(chunk, { stream: true });
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let id = null;
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('id:')) id = line.slice(3).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).trim());
        }
        const payload = data.join('\n');
        if (payload === '[DONE]') return;
        const obj = JSON.parse(payload);
        if (obj.error) {
          console.error(`stream error: ${JSON.stringify(obj.error)}`);
          process.exit(1);
        }
        for (const c of obj.choices || []) process.stdout.write((c.delta && c.delta.content) || '');
        lastId = id || lastId; // only a whole event counts as received
        if (dropAfter && ++n >= dropAfter) {
          ctl.abort();
          throw Object.assign(new Cut('dropped on purpose'), { lastId });
        }
      }
    }
  } catch (e) {
    if (e instanceof Cut) throw e;
    throw Object.assign(new Cut(e.message), { lastId });
  }
  throw Object.assign(new Cut('the stream ended before [DONE]'), { lastId });
}

let lastId = null;
let failures = 0; // reconnections in a row that brought nothing new
while (failures <= Number(opt.retries)) {
  try {
    await streamOnce(lastId);
    process.stdout.write('\n');
    process.exit(0);
  } catch (e) {
    if (!(e instanceof Cut)) throw e;
    failures = e.lastId === lastId ? failures + 1 : 0;
    lastId = e.lastId;
    if (!lastId) {
      console.error('the connection broke before the first event: nothing to resume; send it again');
      process.exit(1);
    }
    console.error(`\n[connection lost; resuming after ${lastId}]`);
    await new Promise((r) => setTimeout(r, Math.min(2000, 50 * 2 ** failures)));
  }
}
console.error('gave up after too many reconnections');
process.exit(1);
