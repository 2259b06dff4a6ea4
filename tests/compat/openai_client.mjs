// openai_client.mjs — drives a baton frontend with the unmodified official `openai` npm SDK.
//
// Run by tests/compat/test_openai_npm.py from a directory whose node_modules holds the SDK.
// Environment: BATON_BASE_URL (e.g. http://127.0.0.1:8000/v1), BATON_MODEL (default mock-model),
// BATON_EXPECT_TEXT (optional: the exact greedy completion of "Once upon a time", 64 tokens).
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

// With a real model (the llama engine and its bundled stories260K), the greedy continuation is
// known text (models/README.md): BATON_EXPECT_TEXT holds it.
if (process.env.BATON_EXPECT_TEXT) {
  await check('completions.greedy_text', async () => {
    const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 64, temperature: 0 });
    const text = r.choices && r.choices[0] ? r.choices[0].text : undefined;
    expect(text === process.env.BATON_EXPECT_TEXT, `the model's greedy text, got ${JSON.stringify(text)}`);
    expect(r.usage && r.usage.prompt_tokens === 5 && r.usage.completion_tokens === 64,
      `usage 5 + 64, got ${JSON.stringify(r.usage)}`);
    return { text, usage: r.usage };
  });
}

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

await check('unknown_model.404', async () => {
  try {
    await client.chat.completions.create({
      model: 'no-such-model',
      messages: [{ role: 'user', content: 'Hello' }],
      max_tokens: 4,
    });
  } catch (e) {
    expect(e instanceof OpenAI.NotFoundError, `OpenAI.NotFoundError, got ${e && e.constructor && e.constructor.name}: ${e && e.message}`);
    expect(e.status === 404, `status 404, got ${e.status}`);
    return { status: e.status, message: e.message };
  }
  throw new Error('expected the request for an unknown model to be rejected');
});

console.log(JSON.stringify({ sdk: sdkVersion, checks }));
