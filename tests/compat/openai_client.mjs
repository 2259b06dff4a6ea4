// openai_client.mjs — drives a baton frontend with the unmodified official `openai` npm SDK.
//
// Run by tests/compat/test_openai_npm.py from a directory whose node_modules holds the SDK.
// Environment: BATON_BASE_URL (e.g. http://127.0.0.1:8000/v1), BATON_MODEL (default mock-model),
// BATON_SLASHED_MODEL (a model whose id holds '/', served with a context length of BATON_CONTEXT
// tokens), BATON_FAULTY_MODEL (its engine fails every sequence after a few tokens),
// BATON_AUTH_URL + BATON_API_KEY (a frontend that requires that key), BATON_LIMITED_URL (a
// frontend that takes one request at a time).
// Prints one JSON object: {"sdk": version, "checks": [{"name", "ok", "detail"}...]}. Every check
// runs even if an earlier one failed; the Python test asserts on all of them.
import OpenAI from 'openai';
import { readFileSync } from 'node:fs';

// The SDK's package.json is not in its "exports": read it from node_modules beside this script.
const sdkVersion = JSON.parse(
  readFileSync(new URL('./node_modules/openai/package.json', import.meta.url), 'utf8')).version;
const baseURL = process.env.BATON_BASE_URL;
const model = process.env.BATON_MODEL || 'mock-model';
if (!baseURL) {
  console.error('BATON_BASE_URL is not set');
  process.exit(2);
}

// maxRetries 0: a failure must show, not be retried away by the SDK.
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
const checks = [];

async function check(name, fn) {
  try {
    const detail = await fn();
    checks.push({ name, ok: true, detail });
  } catch (e) {
    checks.push({
      name,
      ok: false,
      detail: `${e && e.constructor ? e.constructor.name : 'Error'}: ${e && e.message ? e.message : String(e)}`,
    });
  }
}

function expect(cond, what) {
  if (!cond) throw new Error(`expected ${what}`);
}

await check('models.list', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  expect(ids.includes(model), `${model} in ${JSON.stringify(ids)}`);
  return { ids };
});

await check('chat.stream', async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Hello' }],
    stream: true,
    max_tokens: 20,
  });
  let text = '';
  let finish = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    expect(chunk.object === 'chat.completion.chunk', `object chat.completion.chunk, got ${chunk.object}`);
    const c = chunk.choices && chunk.choices[0];
    if (!c) continue;
    if (c.delta && typeof c.delta.content === 'string') text += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
  expect(text.length > 0, 'non-empty streamed content');
  expect(finish !== null, 'a finish_reason');
  return { text, finish, chunks };
});

await check('completions.create', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 16 });
  const text = r.choices && r.choices[0] ? r.choices[0].text : undefined;
  expect(typeof text === 'string' && text.length > 0, `non-empty choices[0].text, got ${JSON.stringify(text)}`);
  expect(r.usage && r.usage.completion_tokens === 16,
    `usage.completion_tokens == 16, got ${JSON.stringify(r.usage)}`);
  return { text, usage: r.usage, finish: r.choices[0].finish_reason };
});

await check('chat.stream.include_usage', async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Count to three' }],
    stream: true,
    max_tokens: 8,
    stream_options: { include_usage: true },
  });
  let usage = null;
  let text = '';
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices && chunk.choices[0];
    if (c && c.delta && typeof c.delta.content === 'string') text += c.delta.content;
  }
  expect(usage !== null, 'a chunk with usage');
  expect(usage.completion_tokens > 0 && usage.prompt_tokens > 0, `positive token counts, got ${JSON.stringify(usage)}`);
  expect(usage.total_tokens === usage.prompt_tokens + usage.completion_tokens,
    `total_tokens = prompt + completion, got ${JSON.stringify(usage)}`);
  return { usage, text };
});

// The SDK's error class, status and OpenAI fields (type, code, param) of a rejected call.
async function expectError(fn, cls, status, type, code, param) {
  try {
    await fn();
  } catch (e) {
    const name = e && e.constructor ? e.constructor.name : typeof e;
    expect(e instanceof cls, `${cls.name}, got ${name}: ${e && e.message}`);
    expect(e.status === status, `status ${status}, got ${e.status}`);
    expect(e.type === type, `type ${type}, got ${e.type}`);
    expect(e.code === code, `code ${code}, got ${e.code}`);
    expect(e.param === param, `param ${param}, got ${e.param}`);
    return { class: name, status: e.status, type: e.type, code: e.code, param: e.param, message: e.message };
  }
  throw new Error(`expected ${cls.name}, the call succeeded`);
}

const chat = (c, extra) => c.chat.completions.create({
  model, messages: [{ role: 'user', content: 'Hello' }], max_tokens: 4, ...extra,
});

await check('unknown_model.404', () => expectError(() => chat(client, { model: 'no-such-model' }),
  OpenAI.NotFoundError, 404, 'invalid_request_error', 'model_not_found', 'model'));

const slashed = process.env.BATON_SLASHED_MODEL;
const context = Number(process.env.BATON_CONTEXT);

await check('models.retrieve', async () => {
  const m = await client.models.retrieve(model);
  expect(m.id === model && m.object === 'model', `model ${model}, got ${JSON.stringify(m)}`);
  const now = Date.now() / 1000;
  expect(m.created > now - 3600 && m.created <= now + 5, `created in Unix seconds, got ${m.created}`);
  const s = await client.models.retrieve(slashed); // the SDK sends the '/' as %2F
  expect(s.id === slashed, `model ${slashed}, got ${JSON.stringify(s)}`);
  return { ids: [m.id, s.id], created: m.created };
});

await check('models.retrieve.404', () => expectError(() => client.models.retrieve('no-such-model'),
  OpenAI.NotFoundError, 404, 'invalid_request_error', 'model_not_found', 'model'));

await check('bad_request.400', () => expectError(() => chat(client, { logprobs: true }),
  OpenAI.BadRequestError, 400, 'invalid_request_error', 'unsupported_value', 'logprobs'));

await check('context_length.400', () => expectError(() => chat(client, { model: slashed, max_tokens: context + 1 }),
  OpenAI.BadRequestError, 400, 'invalid_request_error', 'context_length_exceeded', 'messages'));

await check('neutral_parameters', async () => {
  const r = await chat(client, { n: 1, logprobs: false, tools: [] });
  expect(r.choices[0].message.content.length > 0, 'content');
  return { content: r.choices[0].message.content };
});

await check('authentication.401', async () => {
  const bad = new OpenAI({ baseURL: process.env.BATON_AUTH_URL, apiKey: 'wrong-key', maxRetries: 0, timeout: 30_000 });
  const detail = await expectError(() => chat(bad), OpenAI.AuthenticationError, 401, 'invalid_request_error',
    'invalid_api_key', null);
  const good = new OpenAI({ baseURL: process.env.BATON_AUTH_URL, apiKey: process.env.BATON_API_KEY, maxRetries: 0,
    timeout: 30_000 });
  const r = await chat(good);
  expect(r.choices[0].message.content.length > 0, 'an answer with the right key');
  return detail;
});

await check('overloaded.503', async () => {
  const lim = new OpenAI({ baseURL: process.env.BATON_LIMITED_URL, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
  const held = await chat(lim, { stream: true, max_tokens: 100000 });
  const it = held[Symbol.asyncIterator]();
  await it.next(); // the first chunk: the request is in flight and holds the one place
  try {
    return await expectError(() => chat(lim), OpenAI.InternalServerError, 503, 'server_error', 'overloaded', null);
  } finally {
    held.controller.abort();
  }
});

await check('stream_error.sse', async () => {
  const stream = await chat(client, { model: process.env.BATON_FAULTY_MODEL, stream: true, max_tokens: 50 });
  let text = '';
  try {
    for await (const chunk of stream) {
      const c = chunk.choices && chunk.choices[0];
      if (c && c.delta && typeof c.delta.content === 'string') text += c.delta.content;
    }
  } catch (e) {
    expect(e instanceof OpenAI.APIError, `OpenAI.APIError, got ${e && e.constructor && e.constructor.name}: ${e.message}`);
    expect(e.type === 'server_error' && e.code === 'engine_error' && e.param === null,
      `type server_error, code engine_error, param null; got ${e.type} ${e.code} ${e.param}`);
    expect(text.length > 0, 'some text before the error');
    return { class: e.constructor.name, type: e.type, code: e.code, message: e.message, text };
  }
  throw new Error(`the stream ended without an error (text ${JSON.stringify(text)})`);
});

// The SDK's stream helper assembles the message from the chunks and fails ("missing role for
// choice 0") on a stream that never named the role: one that delivers no text at all (max_tokens
// 0; a stop string matching the first token, which starts with a space) must still carry it once,
// as OpenAI's does; a stream with text carries it in its first chunk.
await check('chat.stream_helper', async () => {
  const seen = [];
  for (const extra of [{ max_tokens: 0 }, { max_tokens: 10, stop: [' '] }, { max_tokens: 5 }]) {
    const s = client.chat.completions.stream({ model, messages: [{ role: 'user', content: 'Hello' }], ...extra });
    let roles = 0;
    s.on('chunk', (chunk) => {
      const c = chunk.choices && chunk.choices[0];
      if (c && c.delta && c.delta.role !== undefined) roles++;
    });
    const r = await s.finalChatCompletion();
    const ch = r.choices[0];
    const want = extra.max_tokens === 0 ? 'length' : extra.stop ? 'stop' : 'length';
    expect(ch.message.role === 'assistant', `${JSON.stringify(extra)}: role assistant, got ${ch.message.role}`);
    expect(roles === 1, `${JSON.stringify(extra)}: the role in exactly one chunk, got ${roles}`);
    expect(ch.finish_reason === want, `${JSON.stringify(extra)}: finish_reason ${want}, got ${ch.finish_reason}`);
    expect(!ch.message.content === (extra.max_tokens !== 5),
      `${JSON.stringify(extra)}: content empty (or null) exactly when nothing is generated, got ${JSON.stringify(ch.message.content)}`);
    seen.push({ ...extra, content: ch.message.content, finish: ch.finish_reason });
  }
  return seen;
});

console.log(JSON.stringify({ sdk: sdkVersion, checks }));
